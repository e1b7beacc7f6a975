"""Official state_dicts <-> Hugging Face transformers checkpoints (`config.json` +
`model.safetensors` in the hub's key layout: what `save_pretrained` writes and `from_pretrained`
of transformers 4 and 5 reads).

    MAE-style ViT (MAE, MixedAE, UM-MAE's ViT)   pretraining -> ViTMAEForPreTraining
                                                 encoder     -> ViTModel (its final norm kept)
    SimMIM's Swin                                pretraining -> SwinForMaskedImageModeling
                                                 classifier  -> SwinForImageClassification

Each official key has its names here (`names`): q, k and v are separate Linear layers (the
official fused `qkv` is cut in three along its output rows), the blocks' parts have other names,
and the computed buffers (Swin's `relative_position_index`, `attn_mask`) are not stored
(transformers recomputes them). Everything else is the same tensor. What differs in the
computation is in the README (conversion section) and measured by tests/test_targets.py.

Torch-free at import: the tensors are sliced and concatenated by the caller's library.
"""

from __future__ import annotations

import re

from mixmae_jax.interop.keymap import ConversionError

# Official block part -> transformers block part (ViT and Swin blocks alike).
_BLOCK = (("norm1.", "layernorm_before."), ("attn.proj.", "attention.output.dense."),
          ("norm2.", "layernorm_after."), ("mlp.fc1.", "intermediate.dense."),
          ("mlp.fc2.", "output.dense."))
QKV = ("query.", "key.", "value.")


def _block(base: str, rest: str, attention: str):
    """Names of one official block tensor `rest` under the transformers block `base`."""
    if rest.startswith("attn.qkv."):
        leaf = rest[len("attn.qkv."):]
        return [(f"{base}{attention}{part}{leaf}", i) for i, part in enumerate(QKV)]
    if rest == "attn.relative_position_bias_table":
        return [(f"{base}{attention}relative_position_bias_table", None)]
    if rest in ("attn.relative_position_index", "attn_mask"):
        return []  # buffers transformers computes itself
    for src, dst in _BLOCK:
        if rest.startswith(src):
            return [(base + dst + rest[len(src):], None)]
    raise ConversionError(f"{rest}: no transformers name for this block tensor")


def _top(key: str, table) -> list:
    for src, dst in table:
        if key == src or (src.endswith(".") and key.startswith(src)):
            return [(dst + key[len(src):], None)]
    raise ConversionError(f"{key}: no transformers name for this official key")


# ---------------------------------------------------------------------------------------------
# ViT (MAE's models_mae / models_vit names).
# ---------------------------------------------------------------------------------------------

def vit_names(key: str, prefix: str = "vit."):
    """[(transformers key, qkv chunk or None)] of an official MAE pretraining key; `prefix`:
    "vit." in ViTMAEForPreTraining, "" in ViTModel. Keys ViTMAE has no place for map to []."""
    m = re.fullmatch(r"(decoder_)?blocks\.(\d+)\.(.+)", key)
    if m:
        decoder, i, rest = m.groups()
        base = f"decoder.decoder_encoder.layer.{i}." if decoder else f"{prefix}encoder.layer.{i}."
        return _block(base, rest, "attention.attention.")
    if key == "vis_mask_token":
        return []  # UM-MAE's secondary masking: ViTMAE has none
    return _top(key, (
        ("cls_token", f"{prefix}embeddings.cls_token"),
        ("pos_embed", f"{prefix}embeddings.position_embeddings"),
        ("patch_embed.proj.", f"{prefix}embeddings.patch_embeddings.projection."),
        ("norm.", f"{prefix}layernorm."),
        ("mask_token", "decoder.mask_token"),
        ("decoder_pos_embed", "decoder.decoder_pos_embed"),
        ("decoder_embed.", "decoder.decoder_embed."),
        ("decoder_norm.", "decoder.decoder_norm."),
        ("decoder_pred.", "decoder.decoder_pred."),
    ))


def vit_config(model_cfg, method_cfg, architecture: str) -> dict:
    """config.json of a ViTMAEForPreTraining or a ViTModel of this ViT."""
    m = model_cfg
    cfg = {
        "architectures": [architecture],
        "model_type": "vit_mae" if architecture == "ViTMAEForPreTraining" else "vit",
        "hidden_size": m.embed_dim, "num_hidden_layers": m.depth,
        "num_attention_heads": m.num_heads, "intermediate_size": int(m.embed_dim * m.mlp_ratio),
        "hidden_act": "gelu",  # exact erf GELU, as timm's nn.GELU in the official models
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
        "initializer_range": 0.02,
        # MAE's LayerNorms use eps 1e-6; transformers' default (and the hub's MAE configs) 1e-12.
        "layer_norm_eps": float(m.get("ln_eps", 1e-6)),
        "image_size": m.img_size, "patch_size": m.patch_size, "num_channels": m.in_chans,
        "qkv_bias": bool(m.qkv_bias), "dtype": "float32",
    }
    if architecture == "ViTMAEForPreTraining":
        cfg.update({
            "decoder_hidden_size": m.decoder_dim, "decoder_num_hidden_layers": m.decoder_depth,
            "decoder_num_attention_heads": m.decoder_num_heads,
            "decoder_intermediate_size": int(m.decoder_dim * m.mlp_ratio),
            "mask_ratio": float(method_cfg.get("mask_ratio", 0.75)),
            "norm_pix_loss": bool(method_cfg.get("norm_pix_loss", False)),
        })
    return cfg


# ---------------------------------------------------------------------------------------------
# Swin (the official Swin of SimMIM: `encoder.*` in pretraining, bare in fine-tuning).
# ---------------------------------------------------------------------------------------------

def swin_names(key: str, prefix: str = "swin."):
    """[(transformers key, qkv chunk or None)] of an official SimMIM key (either format);
    `prefix`: "swin." in the *For* models, "" in SwinModel."""
    key = key.removeprefix("encoder.")
    m = re.fullmatch(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key)
    if m:
        s, j, rest = m.groups()
        return _block(f"{prefix}encoder.layers.{s}.blocks.{j}.", rest, "attention.self.")
    return _top(key, (
        ("mask_token", f"{prefix}embeddings.mask_token"),
        ("patch_embed.proj.", f"{prefix}embeddings.patch_embeddings.projection."),
        ("patch_embed.norm.", f"{prefix}embeddings.norm."),
        ("layers.", f"{prefix}encoder.layers."),  # downsample.{reduction,norm}: same names
        ("norm.", f"{prefix}layernorm."),
        ("decoder.0.", "decoder.0."),
        ("head.", "classifier."),
    ))


def swin_window(model_cfg) -> int:
    """transformers' one `window_size` that gives every stage this config's window.

    transformers' Swin has one window for all stages and clamps it (no shift) on a map no larger
    than it, as the official Swin does per stage; a config whose stages use other windows (the
    `:tiny` variant's 4, 4, 2) has no transformers equivalent."""
    m = model_cfg
    res = [m.img_size // m.patch_size // 2**s for s in range(len(m.depths))]
    effective = [min(w, r) for w, r in zip(m.window_sizes, res)]
    window = max(effective)
    if [min(window, r) for r in res] != effective:
        raise ConversionError(
            f"model.window_sizes={tuple(m.window_sizes)} on maps {tuple(res)}: transformers' Swin "
            f"has one window size for every stage (clamped to smaller maps), which cannot give "
            "these windows; export with --to timm (per-stage windows) or --to official")
    return window


def swin_config(model_cfg, architecture: str, num_classes: int = 0) -> dict:
    m = model_cfg
    if not m.get("shift_windows", True) or m.get("ape", "none") != "none":
        raise ConversionError("transformers' Swin shifts every odd block and has no sin-cos "
                              "position table: only SimMIM's official Swin maps onto it")
    cfg = {
        "architectures": [architecture], "model_type": "swin",
        "image_size": m.img_size, "patch_size": m.patch_size, "num_channels": m.in_chans,
        "embed_dim": m.embed_dim, "depths": list(m.depths), "num_heads": list(m.num_heads),
        "window_size": swin_window(m), "mlp_ratio": float(m.mlp_ratio),
        "qkv_bias": bool(m.qkv_bias), "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0, "drop_path_rate": float(m.drop_path_rate),
        "use_absolute_embeddings": False, "patch_norm": True, "initializer_range": 0.02,
        "layer_norm_eps": 1e-5,  # torch's nn.LayerNorm default, the official Swin's
        "encoder_stride": m.patch_size * 2 ** (len(m.depths) - 1), "dtype": "float32",
    }
    if num_classes:
        cfg["id2label"] = {str(i): f"LABEL_{i}" for i in range(num_classes)}
        cfg["label2id"] = {f"LABEL_{i}": i for i in range(num_classes)}
    return cfg


# ---------------------------------------------------------------------------------------------
# What each architecture is, both ways.
# ---------------------------------------------------------------------------------------------

# architecture -> (backbone, official format of its tensors, key prefix, what it carries)
ARCHITECTURES = {
    "ViTMAEForPreTraining": ("vit", "pretrain", "vit.", "pretraining"),
    "ViTModel": ("vit", "pretrain", "", "encoder"),
    "SwinForMaskedImageModeling": ("swin", "pretrain", "swin.", "pretraining"),
    "SwinForImageClassification": ("swin", "finetune", "swin.", "classifier"),
    "SwinModel": ("swin", "finetune", "", "encoder"),
}


def names_for(architecture: str):
    """key -> [(name, qkv chunk)] in this architecture's checkpoint ([]: it has no place)."""
    backbone, _, prefix, what = ARCHITECTURES[architecture]
    fn = vit_names if backbone == "vit" else swin_names
    if what == "encoder":  # no decoder, mask token or head
        skip = ("mask_token", "decoder_", "vis_mask_token", "head.")
        return lambda key: [] if key.startswith(skip) else fn(key, prefix)
    return lambda key: fn(key, prefix)


def config_notes(foreign: dict, model_cfg, method_cfg) -> list[str]:
    """What a transformers config.json says that the tensors do not, against this config."""
    notes = []
    if foreign.get("hidden_act", "gelu") != "gelu":
        raise ConversionError(f"config.json: hidden_act={foreign['hidden_act']!r}; the "
                              "official models use the exact GELU ('gelu')")
    eps = foreign.get("layer_norm_eps")
    ours = float(model_cfg.get("ln_eps", 1e-6)) if model_cfg.name == "vit" else 1e-5
    if eps is not None and float(eps) != ours:
        notes.append(f"config.json: layer_norm_eps={eps}; mixmae-jax uses {ours} (the official "
                     "model's), so features differ slightly from the file's transformers model")
    for key, ours in (("mask_ratio", method_cfg.get("mask_ratio")),
                      ("norm_pix_loss", method_cfg.get("norm_pix_loss"))):
        if key in foreign and ours is not None and foreign[key] != ours:
            notes.append(f"config.json: {key}={foreign[key]}; this config's method uses {ours}")
    return notes
