r"""Demo: a real pretraining run on the embedded photo crops, on CPU, in a few minutes.

  make demo      # or: mixmae-pretrain --config configs/demo.py --workdir workdirs/demo
  mixmae-pretrain --config configs/demo.py:mae --workdir workdirs/demo_mae
  mixmae-pretrain --config configs/demo.py:simmim --workdir workdirs/demo_simmim
  mixmae-pretrain --config configs/demo.py:ummae --workdir workdirs/demo_ummae
  mixmae-pretrain --config configs/demo.py:mixedae --workdir workdirs/demo_mixedae

The variant is the method (default mixmim). Each is its method's recipe (configs/<method>_*.py)
shrunk for a 2-core CPU: 64 px images, a narrow model, batch 32, 600 steps (MixedAE: 1500), a
short warmup.

`finetune` fine-tunes a demo run of the method (the same model) on the labelled digits,
upscaled to 64 px, with the method's fine-tuning recipe shrunk as configs/digits.py's (300 steps
of batch 32, a few minutes):

  mixmae-finetune --config configs/demo.py:finetune --workdir workdirs/demo_ft \
      --init workdirs/demo
  mixmae-finetune --config configs/demo.py:mae,finetune --workdir workdirs/demo_mae_ft \
      --init workdirs/demo_mae
Expect the reconstruction loss to fall clearly within the run (see README for measured figures).

  mixmim: Swin, 3 stages (16x16 -> 8x8 -> 4x4 tokens), mask on the 4x4 final grid (8 of 16
          cells mixed), a 2-block decoder predicting 16x16x3 patches.
  mae:    ViT with 8x8-px patches (8x8 grid), 4 blocks, 75% of the 64 patches removed
          (16 kept), a 2-block decoder predicting 8x8x3 patches.
  simmim: Swin, 3 stages (16x16 -> 8x8 -> 4x4 tokens), shifted windows, 10 of the 16 16-px
          squares replaced by the mask token, L1 on their pixels.
  ummae:  UM-MAE's Swin on the compact grid of uniform sampling (8x8 -> 4x4 -> 2x2 tokens from
          one kept 8-px unit of every 2x2 block: 16 of 64 units, 4 of them secondary-masked),
          shifted windows in stage 1, a 2-block decoder predicting the 48 removed units.
  mixedae: the mae demo's ViT on mixed samples of 4 images (16 of the 64 patches of each),
          top-k attention (k = 16) in every layer and the homologous contrastive loss (weight 1,
          temperature 0.1); the recognition accuracy per layer (chance 0.25) is logged in
          metrics.jsonl.
"""

from configs import common, digits, mae_vit_b, mixedae_vit_b, mixmim_b, simmim_swin_b, ummae_swin_t
from mixmae_jax.config import ConfigError, parse_arg

# method: (its recipe, the run's steps, warmup steps). MixedAE's steps are cheap (a quarter of
# the tokens per image) and recognition is slow to rise: 1500 steps take about the time of the
# others' 600. The warmup is what the README's demo figures were measured with: 1/E of the run
# for a recipe of E epochs (a 1-epoch warmup cut to its fraction of the recipe).
RECIPES = {
    "mixmim": (mixmim_b, 600, 1),
    "mae": (mae_vit_b, 600, 1),
    "simmim": (simmim_swin_b, 600, 1),
    "ummae": (ummae_swin_t, 600, 3),
    "mixedae": (mixedae_vit_b, 1500, 2),
}


def get_config(arg=None):
    opts = parse_arg(arg, **dict.fromkeys(RECIPES, False), finetune=False)
    methods = [m for m in RECIPES if opts[m]]
    if len(methods) > 1:
        raise ConfigError(f"one method per run (got {', '.join(methods)})")
    method = methods[0] if methods else "mixmim"
    if opts["finetune"]:
        return _finetune(method)
    recipe, steps, warmup = RECIPES[method]
    c = common.shrink(recipe.get_config(), "demo")  # the model sizes: configs/common.py SIZES
    if method == "simmim":
        # peak 1.5e-4 at batch 32, as the other demos; warmup from ~0, constant after it
        c.optim.update(base_lr=1.5e-4 * 512 / 32, warmup_lr=0.0, min_lr=0.0)
    else:
        c.optim.base_lr = 1.5e-4 * 8  # a short run on little data: 8x the official blr
    if method == "mixedae":
        # A stronger, sharper contrastive term than the recipe's guess: recognition rises
        # faster within the demo.
        c.method.update(contrast_weight=1.0, contrast_temperature=0.1)
    c.data.update(source="embedded", shuffle_buffer=2048)
    c.batch_size = 32
    common.schedule(c, steps=steps, warmup=warmup)
    c.log_every = 25
    c.checkpoint_every = 200
    return c


def _finetune(method):
    """The method's fine-tuning recipe on the demo's model: digits.py's labels=all recipe (its
    base lr, no RandAugment) in 300 steps of batch 32, evaluated on the test split at the end."""
    c = common.shrink(digits.METHODS[method][1].get_config(), "demo")
    c.data.update(source="digits", split="train", shuffle_buffer=2048)
    c.num_classes = 10
    c.augment.randaug = ""
    c.batch_size = 32
    c.evals.eval.update(split="test", batch_size=597 + 3, crop_pct=1.0, every_steps=-1,
                        every_epochs=0.0)
    common.schedule(c, steps=300, warmup=30)
    c.optim.base_lr = 2e-2 * c.optim.lr_batch_divisor / 256  # as configs/digits.py
    c.optim.update(warmup_lr=0.0, min_lr=1e-6)
    c.log_every = 25
    c.checkpoint_every = 100
    return c
