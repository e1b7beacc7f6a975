r"""Demo: a real MixMIM pretraining run on the embedded photo crops, on CPU, in a few minutes.

  make demo      # or: mixmae-pretrain --config configs/demo.py --workdir workdirs/demo

Sized for a 2-core CPU: 64 px images, 3 stages (16x16 -> 8x8 -> 4x4 tokens), mask on the 4x4
final grid (8 of 16 cells mixed), a 2-block decoder predicting 16x16x3 patches.
Expect the reconstruction loss to fall clearly within the run (see README for measured figures).
"""

from mixmae_jax.config import base_config


def get_config(arg=None):
    del arg
    c = base_config()
    c.model.update(img_size=64, embed_dim=64, depths=(2, 2, 2), num_heads=(2, 4, 8),
                   window_sizes=(8, 8, 4), decoder_dim=128, decoder_depth=2,
                   decoder_num_heads=4)
    c.data.update(source="embedded", image_size=64, shuffle_buffer=2048)
    c.batch_size = 32
    c.total_steps = 600
    c.optim.update(base_lr=1.5e-4 * 8, warmup_epochs=1)
    c.log_every = 25
    c.checkpoint_every = 200
    c.visualize_every = 0
    return c
