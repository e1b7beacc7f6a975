r"""MAE ViT-B/16 pretraining, the official recipe (facebookresearch/mae, PRETRAIN.md).

  mixmae-pretrain --config configs/mae_vit_b.py --workdir gs://BUCKET/mae_vit_b \
      --config.data.manual_dir=/path/to/imagenet

Sized for 64 x V100/A100 (global batch 4096 = 64 x 64, as the paper) or a TPU v4-64; 800 epochs
of ImageNet-1k (about 250k steps). The encoder sees 25% of the patches, so a step costs about a
third of a full-input ViT-B step. Finetuned top-1 after 1600 epochs (official): 83.6.

Variants: `:tiny` (a CPU smoke run of a few steps on the embedded data, same code path).
Values: main_pretrain.py defaults and PRETRAIN.md (800-epoch ViT-B run), models_mae.py.
"""

from configs import common
from mixmae_jax.config import defaults, parse_arg
from mixmae_jax.models import vit


def get_config(arg=None, variant="B"):
    opts = parse_arg(arg, tiny=False)
    c = defaults()
    # ViT-B/16 (L/16, H/14) with the MAE decoder: 512 wide, 8 blocks, 16 heads; LN eps 1e-6.
    c.model = vit.model_config(variant, 224)
    c.method.update(dict(
        name="mae",
        mask_ratio=0.75,  # int(196 * 0.25) = 49 patches kept, 147 removed, per image
        norm_pix_loss=True,  # --norm_pix_loss in PRETRAIN.md (the class default is False)
    ))
    c.data.update(image_size=224,
                  crop_scale=(0.2, 1.0))  # RandomResizedCrop(224, (0.2, 1)), bicubic, + hflip
    c.batch_size = 4096  # 64 per GPU x 64 GPUs
    common.schedule(c, epochs=800, warmup=40)
    c.optim.update(dict(
        base_lr=1.5e-4,  # blr; peak lr = 1.5e-4 * 4096 / 256 = 2.4e-3
        lr_batch_divisor=256,
        min_lr=0.0,
        schedule="cosine",  # per-iteration half-cosine after a linear warmup (lr_sched.py)
        weight_decay=0.05,  # timm add_weight_decay: not on 1-D tensors (biases, LayerNorm)
        b1=0.9, b2=0.95, eps=1e-8,
        clip_grad_norm=0.0,  # none
    ))
    c.sharding_rules = common.sharding_rules(c.model.variant)
    return common.tiny(c) if opts["tiny"] else c
