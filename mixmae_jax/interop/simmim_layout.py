"""The official PyTorch SimMIM Swin layouts (microsoft/SimMIM `models/simmim.py::SimMIM` for
pretraining, 365 entries for Swin-B/192/w6; the `models/swin_transformer.py::SwinTransformer`
classifier that `main_finetune.py` trains, 364 with its head): the plain torch reference is
`tests/references/simmim.py`.

Pretraining keys are `encoder.*` (the Swin, its `mask_token`) and `decoder.0.*` (the 1x1
convolution before `PixelShuffle`); finetuning keys are the Swin's without a prefix, then `head.*`.
Constants: the `relative_position_index` buffers of every block and the `attn_mask` buffers of the
shifted blocks (float32 (nW, N, N): 0 within a region of the rolled map, -100 across regions).
mixmae-jax computes both from the geometry; on import, each is checked against the geometry its
own shape implies (window w = sqrt(N), map side w * sqrt(nW), shift w // 2), so a checkpoint at
another resolution or window (official 192/w6 pretraining -> 224/w7 finetuning) imports, while a
corrupted buffer is refused.

Bias tables of another window are resized by `SwinLayout.resize` (bicubic `F.interpolate`, the
MixMIM loader's method). The official SimMIM finetune loader (`utils.py::
remap_pretrained_keys_swin`) uses a geometric-progression cubic spline instead (scipy
`interp2d`), so a resized table differs from what the official finetuning would start from; the
report says so.
"""

from __future__ import annotations

import re

import numpy as np

from mixmae_jax.interop.keymap import ConversionError, fresh_head, square_side, tensor_to_numpy
from mixmae_jax.interop.swin_layout import SwinLayout, file_windows

# Logit offset between tokens of different regions of a shifted window (official value).
MASK_NEG = -100.0
# The SimMIM finetune classifier keeps the Swin init pass for its head (`_init_weights`:
# trunc_normal_(std=.02), zero bias); `load_pretrained` (utils.py) loads the encoder with
# strict=False and never re-initialises the head.
HEAD_INIT_STD = 0.02


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """The official `attn_mask` of a shifted block: float32 (nW, w*w, w*w), 0 or -100.

    On the rolled map, rows (and columns) fall in the bands [0, H-w), [H-w, H-s), [H-s, H); a
    token's region is (row band, column band); windows in row-major order, tokens row-major.
    """
    idx = np.arange(resolution)
    band = (idx >= resolution - window).astype(np.int64) + (idx >= resolution - shift)
    region = band[:, None] * 3 + band[None, :]
    n = resolution // window
    windows = region.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, -1)
    differ = windows[:, None, :] != windows[:, :, None]
    return np.where(differ, np.float32(MASK_NEG), np.float32(0.0)).astype(np.float32)


class SimMIMLayout(SwinLayout):
    name = "simmim"
    prefixes = {
        "pretrain": (("encoder.", "encoder."), ("decoder.", "decoder.0.")),
        "finetune": (("encoder.", ""), ("head.", "head.")),
    }
    pretrain_only = ("encoder.mask_token", "decoder.")
    finetune_only = ("head.",)
    # The decoder is a 1x1 Conv2d (OIHW in torch, HWIO in Flax), like the stem.
    conv_kernels = re.compile(r"(^|\.)patch_embed\.proj\.kernel$|^decoder\.kernel$")

    order = ("encoder", "decoder", "mask_token", "attn_mask", "relative_position_bias_table",
             "relative_position_index", "weight", "bias", "patch_embed", "layers", "blocks",
             "downsample", "norm1", "attn", "norm2", "mlp", "qkv", "reduction", "proj", "norm",
             "head", "fc1", "fc2")

    def jax_model(self, fmt, num_classes, rngs):
        ape = self.model_cfg.get("ape", "none")
        if ape != "none":
            raise ConversionError(f"model.ape={ape!r} has no official SimMIM layout (the "
                                  "official Swin's APE is a learned table, off in SimMIM)")
        return super().jax_model(fmt, num_classes, rngs)

    def pretraining_model(self, rngs):
        from mixmae_jax.methods.simmim import SimMIMModel

        return SimMIMModel(self.model_cfg, rngs=rngs)

    # -- constants ------------------------------------------------------------------------------

    def shifted_blocks(self) -> dict[str, tuple[int, int, int]]:
        """"layers.s.blocks.j" -> (map side, window, shift) of every shifted block: odd blocks
        whose window is smaller than the map (a block clamps its window to a small map and
        then does not shift)."""
        cfg, out = self.model_cfg, {}
        res = cfg["img_size"] // cfg["patch_size"]
        for s, (depth, window) in enumerate(zip(cfg["depths"], cfg["window_sizes"])):
            if cfg.get("shift_windows", True) and window < res and window // 2 > 0:
                for j in range(1, depth, 2):
                    out[f"layers.{s}.blocks.{j}"] = (res, window, window // 2)
            res //= 2
        return out

    def constant_entries(self, fmt: str) -> dict[str, np.ndarray]:
        prefix = "encoder." if fmt == "pretrain" else ""
        out = self.index_entries(prefix)
        for block, (res, window, shift) in self.shifted_blocks().items():
            out[f"{prefix}{block}.attn_mask"] = shifted_window_mask(res, window, shift)
        return out

    def is_constant_key(self, key: str) -> bool:
        return key.endswith(".attn_mask") or super().is_constant_key(key)

    def check_constant(self, name, value, state_dict, report, allow_mismatch=False):
        if name.endswith("relative_position_index"):
            problem = self.check_index(name, value, file_windows(state_dict))
        else:
            problem = self.check_attn_mask(name, value, file_windows(state_dict), report)
        if problem is None:
            report.constants.append(name)
        return problem

    def check_attn_mask(self, name: str, value, windows: dict, report) -> str | None:
        """A file's `attn_mask`: the shifted-window mask of the geometry its shape implies."""
        shape = tuple(value.shape)
        w = square_side(shape[1]) if len(shape) == 3 and shape[1] == shape[2] else None
        side = square_side(shape[0]) if w else None
        if w is None or side is None:
            return f"{name}: shape {shape}, expected (nW, w*w, w*w) with nW a square"
        if not value.is_floating_point():
            return f"{name}: dtype {value.dtype}, expected a floating-point mask"
        res = side * w
        want = shifted_window_mask(res, w, w // 2)
        if not np.array_equal(tensor_to_numpy(value), want):
            return (f"{name}: differs from the shifted-window mask of a {res}x{res} map, window "
                    f"{w}, shift {w // 2} (0 within a region, {MASK_NEG:g} across)")
        block = name[: -len(".attn_mask")]
        table_window = windows.get(block + ".attn")
        if table_window is not None and table_window != w:
            return (f"{name}: mask of window {w}, but the file's bias table is for window "
                    f"{table_window}")
        target = self.shifted_blocks().get(block.removeprefix("encoder."))
        if target is not None and target[:2] != (res, w):
            report.notes.append(f"{name}: {res}x{res} map, window {w} in the file; mixmae-jax "
                                f"computes the target's {target[0]}x{target[0]}, window "
                                f"{target[1]}")
        return None

    def resize(self, name: str, value, shape: tuple, report):
        out = super().resize(name, value, shape, report)
        if out is not None:
            report.notes.append(f"{name}: resized bicubic (F.interpolate); the official SimMIM "
                                "finetune loader uses a geometric-progression cubic spline, so "
                                "the values differ from an official finetuning start")
        return out

    def fresh_finetune_entries(self, reference, num_classes, seed):
        return fresh_head(num_classes, reference["head.weight"][0][1], seed, std=HEAD_INIT_STD)
