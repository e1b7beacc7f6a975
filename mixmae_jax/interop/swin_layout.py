"""What the Swin layouts share (MixMIM's and the official Swin that SimMIM uses): the
relative-position index buffers, checked on import, and the bias tables, resized like the
official finetune loaders when the window changes.

`relative_position_bias_table`s whose window differs from the target config are resized exactly
like the official MixMIM finetune loader (`util/pos_embed.py`): [(2w-1)^2, h] ->
(1, h, 2w-1, 2w-1), `F.interpolate(mode="bicubic", align_corners=False)`, back to
[(2w'-1)^2, h], in float32 torch. (SimMIM's own loader interpolates on a geometric grid with
scipy instead; the SimMIM layout notes the difference in its report.)
"""

from __future__ import annotations

import numpy as np

from mixmae_jax.interop.keymap import Layout, square_side, tensor_to_numpy
from mixmae_jax.models import layers as L


def resize_bias_table(table, new_len: int):
    """Official finetune loaders: bicubic resize of a [(2w-1)^2, h] table to [new_len, h]."""
    import torch
    import torch.nn.functional as F

    old_len, heads = table.shape
    s1, s2 = square_side(old_len), square_side(new_len)
    t = table.detach().to(torch.float32)
    t = t.permute(1, 0).reshape(1, heads, s1, s1)
    t = F.interpolate(t, size=(s2, s2), mode="bicubic", align_corners=False)
    return t.reshape(heads, new_len).permute(1, 0).contiguous()


class SwinLayout(Layout):
    """Index buffers and bias-table resizing, for any Swin layout."""

    def is_constant_key(self, key: str) -> bool:
        return key.endswith("relative_position_index")

    def index_entries(self, prefix: str = "") -> dict[str, np.ndarray]:
        """`{prefix}layers.s.blocks.j.attn.relative_position_index` of every block."""
        cfg, out = self.model_cfg, {}
        res = cfg["img_size"] // cfg["patch_size"]
        for s, (depth, window) in enumerate(zip(cfg["depths"], cfg["window_sizes"])):
            w = min(window, res)  # the block clamps its window to a small map
            for j in range(depth):
                out[f"{prefix}layers.{s}.blocks.{j}.attn.relative_position_index"] = (
                    L.relative_position_index(w))
            res //= 2
        return out

    def check_index(self, name: str, value, file_windows: dict) -> str | None:
        shape = tuple(value.shape)
        w = square_side(shape[0]) if len(shape) == 2 and shape[0] == shape[1] else None
        if w is None:
            return f"{name}: shape {shape}, expected (w*w, w*w)"
        if value.is_floating_point() or value.is_complex():
            return f"{name}: dtype {value.dtype}, expected an integer index"
        if not np.array_equal(tensor_to_numpy(value), L.relative_position_index(w)):
            return f"{name}: differs from the Swin relative-position index of window {w}"
        table_window = file_windows.get(name.rsplit(".", 1)[0])
        if table_window is not None and table_window != w:
            return (f"{name}: index of window {w}, but the file's bias table is for window "
                    f"{table_window}")
        return None

    def resize(self, name: str, value, shape: tuple, report):
        old = tuple(value.shape)
        if not name.endswith("relative_position_bias_table"):
            return None
        if not (value.ndim == 2 and len(shape) == 2 and old[1] == shape[1]
                and (square_side(old[0]) or 0) % 2 and (square_side(shape[0]) or 0) % 2):
            return None
        report.resized.append(f"{name}: {old} -> {shape} (bicubic, window "
                              f"{(square_side(old[0]) + 1) // 2} -> "
                              f"{(square_side(shape[0]) + 1) // 2})")
        return resize_bias_table(value, shape[0])


def file_windows(state_dict) -> dict[str, int]:
    """"...attn" -> window of each bias table in a file (to check its index buffer against)."""
    out = {}
    for name, value in state_dict.items():
        if name.endswith("relative_position_bias_table") and value.ndim == 2:
            side = square_side(value.shape[0])
            if side is not None and side % 2:
                out[name.rsplit(".", 1)[0]] = (side + 1) // 2
    return out
