r"""UM-MAE PVT-S fine-tuning on ImageNet-1k, the official recipe (implus/UM-MAE, Makefile
L127-L221): the full grid (sr 8,4,2,1), a learned position embedding started from the
pretraining sin-cos table, layer decay 0.85, drop path 0.1, 256 px, 100 epochs, batch 1024.
Official top-1 after 200 pretraining epochs: 79.31.

  mixmae-finetune --config configs/finetune_ummae_pvt_s.py --workdir gs://BUCKET/ft \
      --init gs://BUCKET/ummae_pvt_s --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny`. The recipe is shared: see configs/finetune_mixmim_b.py.
"""

from mixmae_jax.config import sibling


def get_config(arg=None):
    c = sibling(__file__, "finetune_mixmim_b.py").get_config(
        arg, pretrain="ummae_pvt_s.py", layer_decay=0.85, drop_path=0.1, crop_pct=1.0)
    c.model.sr_ratios = tuple(c.model.full_sr_ratios)  # compact (4,2,1,1) -> full (8,4,2,1)
    return c
