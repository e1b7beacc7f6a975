r"""Demo: a real pretraining run on the embedded photo crops, on CPU, in a few minutes.

  make demo      # or: mixmae-pretrain --config configs/demo.py --workdir workdirs/demo
  mixmae-pretrain --config configs/demo.py:mae --workdir workdirs/demo_mae
  mixmae-pretrain --config configs/demo.py:simmim --workdir workdirs/demo_simmim
  mixmae-pretrain --config configs/demo.py:ummae --workdir workdirs/demo_ummae
  mixmae-pretrain --config configs/demo.py:mixedae --workdir workdirs/demo_mixedae

The variant is the method (default mixmim). Each is its method's recipe (configs/<method>_*.py)
shrunk for a 2-core CPU: 64 px images, a narrow model, batch 32, 600 steps (MixedAE: 1500), a
short warmup.
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

from mixmae_jax.config import ConfigError, sibling


def get_config(arg=None):
    method = arg or "mixmim"
    if method == "mixmim":
        c = sibling(__file__, "mixmim_b.py").get_config()
        c.model.update(img_size=64, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                       window_sizes=(8, 8, 4), decoder_dim=128, decoder_depth=2,
                       decoder_num_heads=4)
        c.optim.base_lr = 1.5e-4 * 8  # a short run on little data: 8x the official blr
    elif method == "mae":
        c = sibling(__file__, "mae_vit_b.py").get_config()
        c.model.update(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                       decoder_dim=128, decoder_depth=2, decoder_num_heads=4)
        c.optim.base_lr = 1.5e-4 * 8  # as the mixmim demo
    elif method == "simmim":
        c = sibling(__file__, "simmim_swin_b.py").get_config()
        c.model.update(img_size=64, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                       window_sizes=(4, 4, 4))
        c.method.mask_patch_size = 16  # the final stride: a 4x4 grid of squares, 10 masked
        # peak 1.5e-4 at batch 32, as the other demos; warmup from ~0, constant after it
        c.optim.update(base_lr=1.5e-4 * 512 / 32, warmup_lr=0.0, min_lr=0.0)
    elif method == "ummae":
        c = sibling(__file__, "ummae_swin_t.py").get_config()
        c.model.update(img_size=64, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                       window_size=4, posmlp_dim=16, unit_size=8, decoder_dim=128,
                       decoder_depth=2, decoder_num_heads=4)
        c.optim.base_lr = 1.5e-4 * 8  # as the mae demo
    elif method == "mixedae":
        c = sibling(__file__, "mixedae_vit_b.py").get_config()
        c.model.update(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4,
                       decoder_dim=128, decoder_depth=2, decoder_num_heads=4)
        c.optim.base_lr = 1.5e-4 * 8  # as the mae demo
        # A stronger, sharper contrastive term than the recipe's guess: recognition rises
        # faster within the demo.
        c.method.update(contrast_weight=1.0, contrast_temperature=0.1)
    else:
        raise ConfigError(f"config arg: unknown demo method {method!r} (mixmim, mae, simmim, "
                          "ummae, mixedae)")
    c.data.update(source="embedded", image_size=64, shuffle_buffer=2048)
    c.batch_size = 32
    # MixedAE's steps are cheap (a quarter of the tokens per image) and recognition is slow to
    # rise: 1500 steps take about the time of the others' 600.
    c.total_steps = 1500 if method == "mixedae" else 600
    c.optim.warmup_epochs = 1
    c.log_every = 25
    c.checkpoint_every = 200
    return c
