r"""UM-MAE PVT-S fine-tuning on ImageNet-1k, the official recipe (implus/UM-MAE, Makefile
L127-L221): the full grid (sr 8,4,2,1), a learned position embedding started from the
pretraining sin-cos table, layer decay 0.85, drop path 0.1, 256 px, 100 epochs, batch 1024.
Official top-1 after 200 pretraining epochs: 79.31.

  mixmae-finetune --config configs/finetune_ummae_pvt_s.py --workdir gs://BUCKET/ft \
      --init gs://BUCKET/ummae_pvt_s --config.data.manual_dir=/path/to/imagenet

Variants: `:tiny`. The recipe is the one MixMIM, MAE and UM-MAE share: see configs/common.py
`finetune`.
"""

from configs import common, ummae_pvt_s
from mixmae_jax.config import parse_arg


def get_config(arg=None):
    opts = parse_arg(arg, tiny=False)
    # Makefile: --layer_decay 0.85; eval Resize(256) + CenterCrop(256) (crop_pct 1.0 above 224)
    c = common.finetune(ummae_pvt_s.get_config(), layer_decay=0.85, crop_pct=1.0)
    c.model.sr_ratios = tuple(c.model.full_sr_ratios)  # compact (4,2,1,1) -> full (8,4,2,1)
    return common.tiny(c) if opts["tiny"] else c
