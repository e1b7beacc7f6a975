"""The official PyTorch MixMIM layouts (`models_mixmim.MixMIM` pretraining, 456 entries for B;
`models_mixmim_ft.MixMIM` finetuning, 354): `shared/reference/mixmim.md` §6.

The Flax modules are named so that one prefix table maps them (`encoder.` is the official top
level; the decoder's parts are flat `decoder_*` names). Constants: `absolute_pos_embed` and
`decoder_pos_embed` (frozen 2-D sin-cos tables) and the `relative_position_index` buffers.

On import, a file's sin-cos tables must be the sin-cos table of the file's own grid. mixmae-jax
has no position-table parameter: it always adds the sin-cos table of the target grid. A file
whose table is something else -- e.g. a 384 finetune checkpoint made by the official loader,
which bicubic-resizes the 56x56 table instead of recomputing it -- cannot be represented exactly,
so it is refused unless `allow_ape_mismatch=True`, which warns and uses the sin-cos table (the
report records the largest deviation).
"""

from __future__ import annotations

import warnings

import numpy as np

from mixmae_jax.convert.keymap import square_side, tensor_to_numpy
from mixmae_jax.convert.swin_layout import SwinLayout
from mixmae_jax.models import layers as L

# A stored sin-cos table equals ours to float32 rounding (both computed in float64); a resized
# or trained table differs by orders of magnitude more.
APE_ATOL = 1e-5
# main_finetune.py re-initialises the head with timm trunc_normal_(std=2e-5) (bounds +-2).
HEAD_INIT_STD = 2e-5

_PREFIXES = (
    ("decoder.mask_token", "mask_token"),
    ("decoder.embed.", "decoder_embed."),
    ("decoder.blocks.", "decoder_blocks."),
    ("decoder.norm.", "decoder_norm."),
    ("decoder.pred.", "decoder_pred."),
    ("encoder.", ""),
    ("head.", "head."),
)


def fresh_head(num_classes: int, in_dim: int, seed: int, std: float = HEAD_INIT_STD) -> dict:
    """A finetuning head as the official finetuning code initialises it."""
    import torch

    gen = torch.Generator().manual_seed(int(seed))
    weight = torch.empty(num_classes, in_dim)
    torch.nn.init.trunc_normal_(weight, std=std, a=-2.0, b=2.0, generator=gen)
    return {"head.weight": weight, "head.bias": torch.zeros(num_classes)}


class MixMIMLayout(SwinLayout):
    name = "mixmim"
    prefixes = {"pretrain": _PREFIXES, "finetune": _PREFIXES}
    pretrain_only = ("mask_token", "decoder_")

    def build_reference(self, fmt: str, num_classes: int):
        from mixmae_jax.convert import torch_reference as R

        if self.model_cfg.get("shift_windows", False):
            from mixmae_jax.convert.keymap import ConversionError

            raise ConversionError("model.shift_windows=True has no official MixMIM layout "
                                  "(MixMIM never shifts windows)")
        if fmt == "pretrain":
            return R.MixMIMPretrainTorch.from_model_config(self.model_cfg)
        return R.MixMIMFinetuneTorch.from_model_config(self.model_cfg, num_classes=num_classes)

    def grids(self) -> tuple[int, int]:
        """(patch grid, final grid) sides."""
        cfg = self.model_cfg
        grid = cfg["img_size"] // cfg["patch_size"]
        return grid, grid // 2 ** (len(cfg["depths"]) - 1)

    def constant_entries(self, fmt: str) -> dict[str, np.ndarray]:
        cfg = self.model_cfg
        grid, final = self.grids()
        out = {"absolute_pos_embed": L.sincos_pos_embed_2d(cfg["embed_dim"], grid, grid)[None]}
        out.update(self.index_entries())
        if fmt == "pretrain":
            out["decoder_pos_embed"] = L.sincos_pos_embed_2d(cfg["decoder_dim"], final,
                                                             final)[None]
        return out

    def is_constant_key(self, key: str) -> bool:
        return key in ("absolute_pos_embed", "decoder_pos_embed") or super().is_constant_key(key)

    def check_constant(self, name, value, state_dict, report, allow_mismatch=False):
        from mixmae_jax.convert.swin_layout import file_windows

        if name.endswith("relative_position_index"):
            return self.check_index(name, value, file_windows(state_dict))
        grid, final = self.grids()
        if name == "absolute_pos_embed":
            return check_sincos(name, value, self.model_cfg["embed_dim"], grid, report,
                                allow_mismatch)
        return check_sincos(name, value, self.model_cfg["decoder_dim"], final, report,
                            allow_mismatch)

    def fresh_finetune_entries(self, reference, num_classes, seed):
        return fresh_head(num_classes, reference["head.weight"][0][1], seed)


def check_sincos(name: str, value, dim: int, target_grid: int, report,
                 allow_mismatch: bool, *, cls_row: bool = False) -> str | None:
    """A file's fixed position table: the 2-D sin-cos table of its own grid (a leading zero row
    for the cls token if `cls_row`), else a problem (or, allowed, a warning and a note)."""
    shape = tuple(value.shape)
    extra = int(cls_row)
    side = square_side(shape[1] - extra) if len(shape) == 3 else None
    if len(shape) != 3 or shape[0] != 1 or shape[2] != dim or side is None:
        return f"{name}: shape {shape}, expected (1, {'1 + ' if cls_row else ''}G*G, {dim})"
    table = L.sincos_pos_embed_2d(dim, side, side)
    if cls_row:
        table = np.concatenate([np.zeros((1, dim), np.float32), table])
    dev = float(np.max(np.abs(tensor_to_numpy(value)[0].astype(np.float64) - table)))
    if dev > APE_ATOL:
        msg = (f"{name}: not the 2-D sin-cos table of its {side}x{side} grid (max deviation "
               f"{dev:.3g}), e.g. a table bicubic-resized by the official finetune loader. "
               "mixmae-jax always adds the constant sin-cos table")
        if not allow_mismatch:
            return (msg + "; pass allow_ape_mismatch=True (--allow-ape-mismatch) to load anyway "
                    f"with the sin-cos table of the {target_grid}x{target_grid} grid")
        warnings.warn(msg + "; replaced by the sin-cos table (allow_ape_mismatch=True)",
                      stacklevel=3)
        report.notes.append(f"{name}: file table deviates from sin-cos by {dev:.3g}; replaced by "
                            f"the {target_grid}x{target_grid} sin-cos table")
    elif side != target_grid:
        report.notes.append(
            f"{name}: sin-cos at {side}x{side} in the file; mixmae-jax uses sin-cos at "
            f"{target_grid}x{target_grid} (the official loader would bicubic-resize the table)")
    report.constants.append(name)
    return None
