"""Official state_dicts <-> timm checkpoints (`config.json` + `model.safetensors`, the folder
`timm.create_model("local-dir:DIR", pretrained=True)` reads; the weights also load into
`timm.create_model(architecture, **model_args)` with `load_state_dict(strict=True)`).

    MAE-style ViT   classifier -> VisionTransformer(global_pool="avg", fc_norm=True): the official
                                  `models_vit` keys are timm's (MAE fine-tunes a timm ViT)
                    encoder    -> VisionTransformer(global_pool="avg", fc_norm=False,
                                  num_classes=0): the pretraining encoder, its final `norm` kept;
                                  the output is the mean of the normalised patch tokens
    SimMIM's Swin   classifier -> SwinTransformer (per-stage windows): timm moves each patch
                                  merging to the start of the next stage and calls the head
                                  `head.fc`; it computes the index and mask buffers itself

MixMIM's Swin (never shifted, a sin-cos table), UM-MAE's Swin (continuous position bias) and
PVT (average-pool reduction) have no timm model.
"""

from __future__ import annotations

import re

from mixmae_jax.interop.keymap import ConversionError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIT_ARCH = {"B": "vit_base_patch16_224", "L": "vit_large_patch16_224",
            "H": "vit_huge_patch14_224"}
SWIN_ARCH = {"B": "swin_base_patch4_window7_224", "L": "swin_large_patch4_window7_224"}


def vit_names(key: str):
    if key.startswith(("mask_token", "decoder_", "vis_mask_token")):
        return []  # the pretraining decoder: timm's ViT has none
    return [(key, None)]


def swin_names(key: str):
    key = key.removeprefix("encoder.")
    if key.endswith(("relative_position_index", "attn_mask")):
        return []  # buffers timm computes itself
    if key.startswith(("mask_token", "decoder.")):
        return []
    m = re.match(r"layers\.(\d+)\.downsample\.(.+)", key)
    if m:  # the official merge ends stage s, timm's starts stage s + 1
        return [(f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}", None)]
    if key.startswith("head."):
        return [("head.fc." + key[len("head."):], None)]
    return [(key, None)]


def _pretrained_cfg(model_cfg, num_classes: int, classifier: str, crop_pct: float) -> dict:
    size = model_cfg.img_size
    return {"tag": "mixmae_jax", "input_size": [model_cfg.in_chans, size, size],
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": crop_pct,
            "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "num_classes": num_classes, "first_conv": "patch_embed.proj",
            "classifier": classifier}


def vit_config(model_cfg, num_classes: int, *, fc_norm: bool, crop_pct: float = 0.875) -> dict:
    """config.json of a timm ViT: the fine-tuning classifier (fc_norm) or the pretraining
    encoder (num_classes 0, the final norm before the average pool)."""
    m = model_cfg
    args = {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans,
            "embed_dim": m.embed_dim, "depth": m.depth, "num_heads": m.num_heads,
            "mlp_ratio": float(m.mlp_ratio), "qkv_bias": bool(m.qkv_bias),
            "class_token": True, "global_pool": "avg", "fc_norm": fc_norm,
            "drop_path_rate": float(m.drop_path_rate), "num_classes": num_classes}
    return {"architecture": VIT_ARCH.get(m.get("variant", "B"), VIT_ARCH["B"]),
            "num_classes": num_classes, "num_features": m.embed_dim, "global_pool": "avg",
            "model_args": args,
            "pretrained_cfg": _pretrained_cfg(m, num_classes, "head", crop_pct)}


def swin_config(model_cfg, num_classes: int, crop_pct: float = 0.875) -> dict:
    m = model_cfg
    if not m.get("shift_windows", True) or m.get("ape", "none") != "none":
        raise ConversionError("timm's Swin shifts every odd block and has no sin-cos position "
                              "table: only SimMIM's official Swin maps onto it")
    args = {"img_size": m.img_size, "patch_size": m.patch_size, "in_chans": m.in_chans,
            "embed_dim": m.embed_dim, "depths": list(m.depths), "num_heads": list(m.num_heads),
            "window_size": list(m.window_sizes), "mlp_ratio": float(m.mlp_ratio),
            "qkv_bias": bool(m.qkv_bias), "drop_path_rate": float(m.drop_path_rate),
            "global_pool": "avg", "num_classes": num_classes}
    return {"architecture": SWIN_ARCH.get(m.get("variant", "B"), SWIN_ARCH["B"]),
            "num_classes": num_classes,
            "num_features": m.embed_dim * 2 ** (len(m.depths) - 1), "global_pool": "avg",
            "model_args": args,
            "pretrained_cfg": _pretrained_cfg(m, num_classes, "head.fc", crop_pct)}


def describe(foreign: dict) -> tuple[str, str, bool]:
    """(backbone, official format, encoder only) of a timm config.json this project reads."""
    arch = str(foreign.get("architecture", ""))
    args = foreign.get("model_args", {})
    classes = int(args.get("num_classes", foreign.get("num_classes", 0)) or 0)
    pool = args.get("global_pool", foreign.get("global_pool", "avg"))
    if arch.startswith("vit_"):
        fc_norm = args.get("fc_norm")
        fc_norm = pool == "avg" if fc_norm is None else bool(fc_norm)
        if pool == "avg" and fc_norm and classes:
            return "vit", "finetune", False
        if pool == "avg" and not fc_norm and not classes:
            return "vit", "pretrain", True
        raise ConversionError(
            f"config.json: a timm ViT with global_pool={pool!r}, fc_norm={fc_norm}, "
            f"num_classes={classes}; mixmae-jax reads the official fine-tuning model (global_pool "
            "'avg', fc_norm, a head) and the pretraining encoder (global_pool 'avg', no fc_norm, "
            "num_classes 0)")
    if arch.startswith("swin_") and pool == "avg":
        return "swin", "finetune", not classes
    raise ConversionError(f"config.json: timm architecture {arch!r} (global_pool {pool!r}); "
                          "mixmae-jax reads timm's ViT and Swin (average pool)")
