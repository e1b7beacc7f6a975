r"""UM-MAE pretraining of UM-MAE's Swin-T, the official recipe (implus/UM-MAE, Makefile).

  mixmae-pretrain --config configs/ummae_swin_t.py --workdir gs://BUCKET/ummae_swin_t \
      --config.data.manual_dir=/path/to/imagenet

Global batch 4096 (official: 8 GPUs x 128 x 4 accumulation steps; add
`--config.optim.grad_accum_steps=K` where memory asks for it), 200 epochs of ImageNet-1k with 10
of warmup, 256-px inputs. The encoder sees 25% of the units (one of every 2x2 block), 25% of
those replaced by the secondary-mask token. Official finetuned top-1 (100 epochs): 82.04.

This file holds the recipe every UM-MAE config shares (ummae_swin_l, ummae_pvt_s, ummae_vit_b
and the SimMIM baselines of the paper, simmim_ummae_swin_t and simmim_ummae_pvt_s, call
`get_config` with their backbone and method).
Variants: `:tiny` (a CPU smoke run of a few steps on the embedded data, same code path).
Values: Makefile L1-L122, main_pretrain.py, engine_pretrain.py, mask_transform.py,
models_mae_swin.py / models_mae_pvt.py / models_mae.py / models_simmim_*.py factories.
"""

from configs import common
from mixmae_jax.config import ConfigError, defaults, parse_arg
from mixmae_jax.models import pvt, ummae_swin, vit

BACKBONES = ("swin_t", "swin_l", "pvt_s", "vit_b")


def model(backbone: str, method: str):
    """`config.model`: UM-MAE pretrains on the compact grid (Swin window 8, PVT sr 4,2,1,1);
    the SimMIM baseline runs the full grid (window 16, sr 8,4,2,1) as finetuning does."""
    full = method == "simmim"
    if backbone in ("swin_t", "swin_l"):
        return ummae_swin.model_config(backbone[-1].upper(), 256, window_size=16 if full else 8)
    if backbone == "pvt_s":
        return pvt.model_config("S", 256, sr_ratios=pvt.SR_FULL if full else pvt.SR_COMPACT)
    if backbone == "vit_b":  # mae_vit_base_patch16_dec512d2b: a 2-block decoder
        return vit.model_config("B", 224, decoder=(512, 2, 16))
    raise ConfigError(f"backbone {backbone!r} (one of {', '.join(BACKBONES)})")


def get_config(arg=None, backbone="swin_t", method="ummae"):
    opts = parse_arg(arg, tiny=False)
    c = defaults()
    c.model = model(backbone, method)
    if method == "ummae":
        c.method.update(dict(
            name="ummae",
            mask_ratio=0.75,  # --mask_regular: one kept unit per 2x2 block of 16-px units
            vis_mask_ratio=0.25,  # secondary masking: 16 of the 64 kept units (ViT: 13 of 49)
            norm_pix_loss=True,
            # "true": each kept latent gets its own unit's decoder position; "official": the
            # official Swin/PVT pairing (compact order against row-major order), see README.
            decoder_pos_order="true",
        ))
    elif method == "simmim":  # the paper's SimMIM baselines (models_simmim_swin/pvt.py)
        c.method.update(dict(
            name="simmim",
            mask_patch_size=16,  # random 75% of the 16x16 grid of 16-px units: 192 of 256
            mask_ratio=0.75,
        ))
    else:
        raise ConfigError(f"method {method!r} (ummae or simmim)")
    size = c.model.img_size
    c.data.update(image_size=size,
                  crop_scale=(0.2, 1.0))  # RandomResizedCrop(size, (0.2, 1)), bicubic, + hflip
    c.batch_size = 4096  # 8 GPUs x 128 (SimMIM Swin-T: 64) x 4 (8) accumulation steps
    long = backbone == "swin_l"
    common.schedule(c, epochs=800 if long else 200, warmup=40 if long else 10)
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
