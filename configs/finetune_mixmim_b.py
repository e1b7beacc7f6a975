r"""MixMIM-B fine-tuning on ImageNet-1k, the official recipe (Sense-X/MixMIM, exp/base_600ep).

  mixmae-finetune --config configs/finetune_mixmim_b.py --workdir gs://BUCKET/mixmim_b_ft \
      --init gs://BUCKET/mixmim_b --config.data.manual_dir=/path/to/imagenet

Global batch 1024 (8 GPUs x 128), 100 epochs with 5 of warmup (about 125k steps), layer-wise
lr decay 0.7 with MixMIM's rule (the head shares the last block's factor), drop path 0.1.
Official top-1 after 600 pretraining epochs: 85.1.

The recipe is the one MixMIM, MAE and UM-MAE share (configs/common.py `finetune`); MixMIM's own
values are below.
Variants: `:tiny` (a CPU smoke run on the embedded digits, same code path), `:res=384` (the
384 fine-tuning of a 224 pretraining: windows 16/16/24/12, the resized APE, eval crop 1.0).
Values: shared/reference/mixmim.md §5.2-5.3.
"""

from configs import common, mixmim_b
from mixmae_jax.config import ConfigError, parse_arg


def get_config(arg=None):
    opts = parse_arg(arg, tiny=False, res=(224, 384))
    if opts["tiny"] and opts["res"] != 224:
        raise ConfigError("tiny is its own geometry: it takes no res")
    # finetune.sh --layer_decay 0.7 (main_finetune.py default 0.75); no_weight_decay() is empty
    c = common.finetune(mixmim_b.get_config(f"res={opts['res']}"), layer_decay=0.7)
    if opts["res"] == 384:
        # models_mixmim_ft mixmim_base_384: windows 16/16/24/12; the APE is the 224 checkpoint's
        # 56x56 sin-cos table bicubic-resized to 96x96 (main_finetune.py interpolate_pos_embed)
        c.model.ape_grid = 224 // c.model.patch_size
        c.evals.eval.crop_pct = 1.0  # evaluation at 384: resize 384, centre crop (ref. §5.2)
    return common.tiny(c) if opts["tiny"] else c
