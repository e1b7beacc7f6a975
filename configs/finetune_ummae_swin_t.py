r"""UM-MAE Swin-T fine-tuning on ImageNet-1k, the official recipe (implus/UM-MAE, Makefile
L127-L221): the full grid (window 16), 256 px evaluated as Resize(256) + CenterCrop(256), layer
decay 0.85 (the flat-blocks rule), drop path 0.1, 100 epochs, batch 1024.
Official top-1 after 200 pretraining epochs: 82.04.

  mixmae-finetune --config configs/finetune_ummae_swin_t.py --workdir gs://BUCKET/ft \
      --init gs://BUCKET/ummae_swin_t --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny`. The recipe is shared: see configs/finetune_mixmim_b.py.
"""

from mixmae_jax.config import sibling


def get_config(arg=None):
    c = sibling(__file__, "finetune_mixmim_b.py").get_config(
        arg, pretrain="ummae_swin_t.py", layer_decay=0.85, drop_path=0.1, crop_pct=1.0)
    # Fine-tuning runs the full grid: window 8 -> 16 (the bias MLP has no window-sized weight).
    c.model.window_size = 2 * c.model.window_size
    return c
