r"""MixMIM-B (Swin-B/W14) pretraining, the official recipe (Sense-X/MixMIM, exp/base_600ep).

  mixmae-pretrain --config configs/mixmim_b.py --workdir gs://BUCKET/mixmim_b \
      --config.data.manual_dir=/path/to/imagenet

Sized for 16 x A100/H100 (global batch 2048 = 16 x 128, as the paper) or a TPU v4-32; 600 epochs
of ImageNet-1k (about 375k steps). Expect about 3,000 img/s per H100 in bf16 at 35% MFU, i.e.
~9 h on 8 H100s (estimate, see README). Finetuned top-1 after 600 epochs (official): 85.1.

Variants: `:tiny` (a CPU smoke run of a few steps on the embedded data, same code path),
`:res=384` (the 384 finetune geometry, windows 16/16/24/12, for conversion).
Values: shared/reference/mixmim.md §5.1 (main_pretrain.py defaults + pretrain.sh).
"""

from configs import common
from mixmae_jax.config import ConfigError, defaults, parse_arg
from mixmae_jax.models import swin

WINDOWS = {224: (14, 14, 14, 7), 384: (16, 16, 24, 12)}  # models_mixmim(_ft).py factories


def get_config(arg=None, variant="B"):
    opts = parse_arg(arg, tiny=False, res=(224, 384))
    if opts["tiny"] and opts["res"] != 224:
        raise ConfigError("tiny is its own geometry: it takes no res")
    c = defaults()
    # Swin with 4x4 patches, windows 14/14/14/7, no shift, sin-cos APE; decoder 512 x 8, 16 heads.
    c.model = swin.model_config(variant, opts["res"], window_sizes=WINDOWS[opts["res"]])
    # The backward recomputes the norms, GELU and the 196-token softmax from the weight matmuls'
    # outputs: faster than storing them (models/layers.py REMAT_MODES).
    c.model.remat = "dots"
    c.method.update(dict(
        name="mixmim",
        mask_ratio=0.5,  # int(L * r) = 24 of the 49 final-grid cells come from the partner
        range_mask_ratio=0.0,  # official constructor default: r = mask_ratio + U(0, range)
        mask_per_sample=False,  # official: one mask shared by each device-local batch
        norm_pix_loss=True,
    ))
    c.data.update(image_size=opts["res"],
                  crop_scale=(0.2, 1.0))  # RandomResizedCrop(224, (0.2, 1)), bicubic, + hflip
    c.batch_size = 2048  # 16 GPUs x 128
    common.schedule(c, epochs=600, warmup=40)
    c.optim.update(dict(
        base_lr=1.5e-4,  # blr; peak lr = 1.5e-4 * 2048 / 256 = 1.2e-3
        lr_batch_divisor=256,
        min_lr=0.0,
        schedule="cosine",  # per-iteration half-cosine after a linear warmup (lr_sched.py)
        weight_decay=0.05,  # on every >= 2-D tensor, mask_token and bias tables included
        b1=0.9, b2=0.95, eps=1e-8,
        clip_grad_norm=0.0,  # none
    ))
    c.sharding_rules = common.sharding_rules(c.model.variant)
    return common.tiny(c) if opts["tiny"] else c
