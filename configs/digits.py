r"""The digits experiment: does masked-image pretraining help a classifier on real images no one
here made? scikit-learn's handwritten digits (1,200 train / 597 test scans, upscaled to 32 px,
`data/digits.py`), small models, all on a 2-core CPU.

  make experiment                    # MixMIM: everything below, 3 seeds, the README table
  make experiment METHOD=mae         # or ummae, mixedae, simmim (20-45 minutes, see README)
  mixmae-pretrain --config configs/digits.py --workdir workdirs/digits
  mixmae-finetune --config configs/digits.py:finetune --workdir workdirs/digits_ft \
      --init workdirs/digits
  mixmae-finetune --config configs/digits.py:finetune,labels=10 --workdir workdirs/digits_ft10 \
      --init workdirs/digits
  mixmae-eval knn --workdir workdirs/digits --data digits
  mixmae-pretrain --config configs/digits.py:method=mae --workdir workdirs/digits_mae

`:toy` is a 1-block-per-stage MixMIM Swin (embed 32) at a higher lr: the encoder the suite's
pretrained-vs-random test ships (`python -m mixmae_jax.digits_experiment --toy-encoder
tests/data/digits_toy_encoder.npz` makes it again, about 2 minutes).

Pretraining reads the train images without labels. Fine-tuning is each method's official recipe
(configs/finetune_*.py: layer decay, drop path 0.1, RandomErasing, Mixup/CutMix, label
smoothing) shrunk to this data: `labels=10` trains on 10 labelled images per class (the
`train_10pc` split, 100 epochs), `labels=all` on all 1,200 (50 epochs), with a 40x larger base
lr than MixMIM's official 5e-4 (see below) and no RandAugment (the README table was measured
without it). 1,000 pretraining steps of batch 64 (53 epochs), the k-NN monitor every 250.

Models (`method=`), all 4-px patches on the 32-px digits (an 8x8 token grid):
  mixmim:  a 2-stage MixMIM Swin (8x8 -> 4x4 tokens, 2.4M parameters), mixing 8 of the 16 final
           8-px cells as the demo does.
  mae:     a 4-block ViT, 96 wide, 75% of the 64 patches removed, a 2-block decoder.
  mixedae: the mae ViT on mixed samples of 4 images (16 patches of each), top-k attention and
           the homologous contrastive loss (weight 1, temperature 0.1, as the demo).
  ummae:   UM-MAE's 2-stage Swin (as mixmim's widths) on the compact grid of uniform sampling:
           one kept 4-px unit of every 2x2 block (16 of 64), 4 of them secondary-masked;
           fine-tuning runs the full 8x8 grid with one 8x8 window.
  simmim:  a 2-stage SimMIM Swin (shifted 4x4 windows), 10 of the 16 8-px squares masked, fine-
           tuned with SimMIM's own recipe (configs/finetune_simmim_swin_b.py).
"""

from configs import (
    common,
    finetune_mae_vit_b,
    finetune_mixmim_b,
    finetune_simmim_swin_b,
    finetune_ummae_swin_t,
    mae_vit_b,
    mixedae_vit_b,
    mixmim_b,
    simmim_swin_b,
    ummae_swin_t,
)
from mixmae_jax.config import ConfigError, parse_arg

# method: (pretraining recipe, fine-tuning recipe, warmup steps of the 1,000 pretraining steps);
# the model sizes are configs/common.py SIZES. The warmup is what the README table was measured
# with: 5/E of the run for a recipe of E epochs (a 5-epoch warmup cut to its fraction of the
# recipe; the toy's 1 epoch: 2 steps).
METHODS = {
    "mixmim": (mixmim_b, finetune_mixmim_b, 8),
    "mae": (mae_vit_b, finetune_mae_vit_b, 6),
    "mixedae": (mixedae_vit_b, finetune_mae_vit_b, 6),
    "ummae": (ummae_swin_t, finetune_ummae_swin_t, 25),
    "simmim": (simmim_swin_b, finetune_simmim_swin_b, 6),
}


def get_config(arg=None):
    opts = parse_arg(arg, method=tuple(METHODS), finetune=False, labels=("all", "10"), seed=0,
                     toy=False)
    if opts["toy"] and (opts["method"] != "mixmim" or opts["finetune"]):
        raise ConfigError("toy is a MixMIM pretraining model (digits.py:toy)")
    pretrain, finetune, warmup = METHODS[opts["method"]]
    c = (finetune if opts["finetune"] else pretrain).get_config()
    common.shrink(c, "toy" if opts["toy"] else "digits")
    c.seed = opts["seed"]
    c.data.update(source="digits", split="train", shuffle_buffer=2048)
    if not opts["finetune"]:
        if opts["method"] == "mixedae":  # as the demo: a stronger, sharper contrastive term
            c.method.update(contrast_weight=1.0, contrast_temperature=0.1)
        if opts["method"] == "simmim":
            # peak 3e-4 at batch 64 as the others; warmup from ~0, constant after it
            c.optim.update(base_lr=3e-4 * 512 / 64, warmup_lr=0.0, min_lr=0.0)
        else:  # as the demo: 8x the official blr (peak 3e-4 at batch 64)
            c.optim.base_lr = 1.5e-4 * 8
        c.batch_size = 64
        common.schedule(c, steps=1000, warmup=2 if opts["toy"] else warmup)
        c.log_every = 50
        c.checkpoint_every = 500
        c.evals.knn.every_steps = 250  # the k-NN monitor: digits train -> test (knn_top1)
        if opts["toy"]:  # the suite's pretrained-vs-random toy (tests/data/digits_toy_encoder.npz)
            c.optim.base_lr = 1e-2
            c.evals.knn.every_steps = 0
        return c
    few = opts["labels"] == "10"
    c.num_classes = 10
    c.data.split = "train_10pc" if few else "train"
    c.augment.randaug = ""  # the README table was measured without RandAugment
    c.batch_size = 32 if few else 64
    # at the end only, the whole test split in one padded batch
    c.evals.eval.update(split="test", batch_size=597 + 3, crop_pct=1.0, every_steps=-1,
                        every_epochs=0.0)
    common.schedule(c, epochs=100 if few else 50, warmup=10 if few else 5)  # 300 / 900 steps
    # 40x MixMIM's official blr 5e-4 (tried 5e-4, 5e-3, 2e-2 with 10 labels per class: 37/63/68%
    # top-1 from pretraining, 16/42/53% from random init; 2e-2 with all labels: 88% vs 72%). The
    # official value is sized for 100 epochs of 1.28M images; a few hundred small steps need
    # more. Peak lr = 2e-2 * batch / 256 for every method (SimMIM's recipe divides by 512).
    c.optim.base_lr = 2e-2 * c.optim.lr_batch_divisor / 256
    c.optim.update(warmup_lr=0.0, min_lr=1e-6)
    c.log_every = 50
    c.checkpoint_every = 1000
    return c
