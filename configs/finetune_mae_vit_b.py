r"""MAE ViT-B/16 fine-tuning on ImageNet-1k, the official recipe (facebookresearch/mae,
FINETUNE.md): global pool + fc_norm, layer decay 0.65, drop path 0.1, 100 epochs, batch 1024.
Also the fine-tuning of the MixedAE and UM-MAE ViT-B runs (`--init` any "vit" pretraining).

  mixmae-finetune --config configs/finetune_mae_vit_b.py --workdir gs://BUCKET/mae_vit_b_ft \
      --init gs://BUCKET/mae_vit_b --config.data.manual_dir=/path/to/imagenet

Official top-1 after 1600 pretraining epochs: 83.6. Variants: `:tiny`. The recipe is the one
MixMIM, MAE and UM-MAE share: see configs/common.py `finetune`.
"""

from configs import common, mae_vit_b
from mixmae_jax.config import parse_arg


def get_config(arg=None):
    opts = parse_arg(arg, tiny=False)
    # FINETUNE.md --layer_decay 0.65; MAE's no_weight_decay(): pos_embed, cls_token (besides
    # every 1-D tensor).
    c = common.finetune(mae_vit_b.get_config(), layer_decay=0.65,
                        no_decay=(r"pos_embed", r"cls_token"))
    return common.tiny(c) if opts["tiny"] else c
