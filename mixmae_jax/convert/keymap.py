"""Parameter names and layouts: mixmae-jax params <-> the official PyTorch MixMIM state_dict.

One rename table (module prefixes) plus per-leaf layout rules (Linear kernels transpose, conv HWIO
<-> OIHW, LayerNorm scale <-> weight). The official layout also stores constants that mixmae-jax
computes (sin-cos tables, relative-position indices); `constant_entries` regenerates them.
Pure numpy: no torch needed here.
"""

from __future__ import annotations

import re

import numpy as np

from mixmae_jax.models import layers as L

# (flax dotted prefix, torch dotted prefix); first match wins.
PREFIXES = (
    ("decoder.mask_token", "mask_token"),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "decoder_pred."),
    ("encoder.", ""),
    ("head.", "head."),
)

_CONV = re.compile(r"(^|\.)patch_embed\.proj\.kernel$")


class ConversionError(ValueError):
    """A checkpoint does not match the expected layout; the message names every bad key."""


def flatten(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested dict (str or int keys) -> {"a.0.b": leaf}."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: dict[str, np.ndarray]) -> dict:
    """Inverse of `flatten`; all-digit components become int keys (nnx.List indices)."""
    tree: dict = {}
    for key, v in flat.items():
        parts = [int(p) if p.isdigit() else p for p in key.split(".")]
        node = tree
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return tree


def _rename(name: str, table) -> str | None:
    for src, dst in table:
        if name == src or name.startswith(src) and src.endswith("."):
            return dst + name[len(src):]
    return None


def flax_to_torch_name(path: str) -> str:
    name = _rename(path, PREFIXES)
    if name is None:
        raise ConversionError(f"no official name for parameter {path!r}")
    if name.endswith(".kernel"):
        return name[: -len("kernel")] + "weight"
    if name.endswith(".scale"):
        return name[: -len("scale")] + "weight"
    return name


def to_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if _CONV.search(path):
        return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
    if path.endswith(".kernel"):
        return np.ascontiguousarray(value.T)  # [in, out] -> [out, in]
    return value


def from_torch_layout(path: str, value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if _CONV.search(path):
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))  # OIHW -> HWIO
    if path.endswith(".kernel"):
        return np.ascontiguousarray(value.T)
    return value


def constant_entries(model_cfg, *, pretrain: bool) -> dict[str, np.ndarray]:
    """The official state_dict's frozen tables and index buffers, computed from the config."""
    grid = model_cfg.img_size // model_cfg.patch_size
    out = {"absolute_pos_embed": L.sincos_pos_embed_2d(model_cfg.embed_dim, grid, grid)[None]}
    res = grid
    for s, (depth, window) in enumerate(zip(model_cfg.depths, model_cfg.window_sizes)):
        w = min(window, res)  # the block clamps its window to a small map
        for j in range(depth):
            out[f"layers.{s}.blocks.{j}.attn.relative_position_index"] = (
                L.relative_position_index(w))
        res //= 2
    if pretrain:
        final = grid // 2 ** (len(model_cfg.depths) - 1)
        out["decoder_pos_embed"] = L.sincos_pos_embed_2d(model_cfg.decoder_dim, final, final)[None]
    return out


def is_constant_key(key: str) -> bool:
    return key in ("absolute_pos_embed", "decoder_pos_embed") or key.endswith(
        "relative_position_index")
