"""The official PyTorch MixMIM layouts (`models_mixmim.MixMIM` pretraining, 456 entries for B;
`models_mixmim_ft.MixMIM` finetuning, 354): `shared/reference/mixmim.md` §6.

The Flax modules are named so that one prefix table maps them (`encoder.` is the official top
level; the decoder's parts are flat `decoder_*` names). Constants: `absolute_pos_embed` and
`decoder_pos_embed` (frozen 2-D sin-cos tables) and the `relative_position_index` buffers.

On import, a file's sin-cos tables must be the sin-cos table of the file's own grid, or the
target's own table. mixmae-jax has no position-table parameter: it adds the sin-cos table of the
target grid, or with `model.ape_grid` set (the 384 fine-tuning configs: 56) the sin-cos table of
that grid bicubic-resized as the official loader does (`layers.ape_table`), so an official 384
finetune checkpoint imports exactly into a config with `ape_grid=56`. Any other table cannot be
represented exactly, so it is refused unless `allow_ape_mismatch=True`, which warns and uses the
model's table (the report records the largest deviation).
"""

from __future__ import annotations

import numpy as np

from mixmae_jax.interop.keymap import (
    FLAT_DECODER_PREFIXES,
    ConversionError,
    check_sincos,
    fresh_head,
)
from mixmae_jax.interop.swin_layout import SwinLayout, file_windows
from mixmae_jax.models import layers as L

_PREFIXES = FLAT_DECODER_PREFIXES + (
    ("encoder.", ""),
    ("head.", "head."),
)


class MixMIMLayout(SwinLayout):
    name = "mixmim"
    prefixes = {"pretrain": _PREFIXES, "finetune": _PREFIXES}
    pretrain_only = ("mask_token", "decoder_")

    order = ("mask_token", "absolute_pos_embed", "decoder_pos_embed",
             "relative_position_bias_table", "relative_position_index", "weight", "bias",
             "patch_embed", "layers", "blocks", "downsample", "norm1", "attn", "norm2", "mlp",
             "qkv", "reduction", "proj", "norm", "head", "fc1", "fc2",
             "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred")

    def pretraining_model(self, rngs):
        from mixmae_jax.methods.mixmim import MixMIMModel

        if self.model_cfg.get("shift_windows", False):
            raise ConversionError("model.shift_windows=True has no official MixMIM layout "
                                  "(MixMIM never shifts windows)")
        return MixMIMModel(self.model_cfg, rngs=rngs)

    def grids(self) -> tuple[int, int]:
        """(patch grid, final grid) sides."""
        cfg = self.model_cfg
        grid = cfg["img_size"] // cfg["patch_size"]
        return grid, grid // 2 ** (len(cfg["depths"]) - 1)

    def constant_entries(self, fmt: str) -> dict[str, np.ndarray]:
        cfg = self.model_cfg
        grid, final = self.grids()
        out = {"absolute_pos_embed": L.ape_table(cfg["embed_dim"], grid,
                                                 cfg.get("ape_grid", 0))[None]}
        out.update(self.index_entries())
        if fmt == "pretrain":
            out["decoder_pos_embed"] = L.sincos_pos_embed_2d(cfg["decoder_dim"], final,
                                                             final)[None]
        return out

    def is_constant_key(self, key: str) -> bool:
        return key in ("absolute_pos_embed", "decoder_pos_embed") or super().is_constant_key(key)

    def check_constant(self, name, value, state_dict, report, allow_mismatch=False):
        if name.endswith("relative_position_index"):
            return self.check_index(name, value, file_windows(state_dict))
        grid, final = self.grids()
        if name == "absolute_pos_embed":
            return check_sincos(name, value, self.model_cfg["embed_dim"], grid, report,
                                allow_mismatch, source_grid=self.model_cfg.get("ape_grid", 0))
        return check_sincos(name, value, self.model_cfg["decoder_dim"], final, report,
                            allow_mismatch)

    def fresh_finetune_entries(self, reference, num_classes, seed):
        return fresh_head(num_classes, reference["head.weight"][0][1], seed)
