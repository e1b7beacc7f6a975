r"""UM-MAE Swin-T fine-tuning on ImageNet-1k, the official recipe (implus/UM-MAE, Makefile
L127-L221): the full grid (window 16), 256 px evaluated as Resize(256) + CenterCrop(256), layer
decay 0.85 (the flat-blocks rule), drop path 0.1, 100 epochs, batch 1024.
Official top-1 after 200 pretraining epochs: 82.04.

  mixmae-finetune --config configs/finetune_ummae_swin_t.py --workdir gs://BUCKET/ft \
      --init gs://BUCKET/ummae_swin_t --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny`. The recipe is the one MixMIM, MAE and UM-MAE share: see configs/common.py
`finetune`.
"""

from configs import common, ummae_swin_t
from mixmae_jax.config import parse_arg


def get_config(arg=None):
    opts = parse_arg(arg, tiny=False)
    # Makefile: --layer_decay 0.85; eval Resize(256) + CenterCrop(256) (crop_pct 1.0 above 224)
    c = common.finetune(ummae_swin_t.get_config(), layer_decay=0.85, crop_pct=1.0)
    # Fine-tuning runs the full grid: window 8 -> 16 (the bias MLP has no window-sized weight).
    c.model.window_size = 16
    return common.tiny(c) if opts["tiny"] else c
