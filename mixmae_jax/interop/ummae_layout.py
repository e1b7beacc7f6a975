"""The official PyTorch layouts of UM-MAE (implus/UM-MAE), per the plain torch reference
`tests/references/ummae.py`:

* UM-MAE's Swin: `models_mae_swin.MaskedAutoencoderSwin` (pretraining) and `models_swin.Swin`
  (finetuning, window 16 on the full grid: the continuous position bias has no window-sized
  weight, so the same tensors load);
* UM-MAE's PVT: `models_mae_pvt.MaskedAutoencoderPVT` and `models_pvt.PVT` (sr ratios
  4,2,1,1 -> 8,4,2,1: the average-pool reduction has no ratio-sized weight; the frozen sin-cos
  `pos_embed` of pretraining becomes the finetuning model's learned one);
* ViT-B: `models_mae.MaskedAutoencoderViT` with `vis_mask_token` (finetuning: MAE's layout);
* the paper's SimMIM baselines: `models_simmim_swin.SimMIMSwin`, `models_simmim_pvt.SimMIMPVT`
  (finetuning: the Swin / PVT finetuning models above).

Flax paths are the official names under `encoder.` (flat `blocks`, each stage's merge in its first
block's `downsample`) plus the flat decoder names; the position-bias MLP is an nnx.Sequential
whose layers 0 and 2 are the official `posmlp.0` and `posmlp.2` (1x1 convs).
"""

from __future__ import annotations

import re

import numpy as np

from mixmae_jax.interop.keymap import FLAT_DECODER_PREFIXES, Layout, check_sincos, fresh_head
from mixmae_jax.interop.mae_layout import MAELayout

_PREFIXES = FLAT_DECODER_PREFIXES + (
    ("encoder.", ""),
    ("decoder_pred.", "decoder_pred."),  # SimMIM baselines: a bare Linear + PixelShuffle
    ("fc_norm.", "fc_norm."),
    ("head.", "head."),
)


_UNIT_ORDER = (
    "vis_mask_token", "pos_embed", "mask_token", "decoder_pos_embed", "weight", "bias",
    "patch_embed", "blocks", "norm1", "attn", "norm2", "mlp", "downsample", "posmlp", "q", "kv",
    "qkv", "proj", "sr", "norm", "fc1", "fc2", "fc_norm", "head", "decoder_embed",
    "decoder_blocks", "decoder_norm", "decoder_pred")


class UnitLayout(Layout):
    """UM-MAE's Swin and PVT, pretrained by UM-MAE (`kind="ummae"`) or SimMIM (`"simmim"`)."""

    prefixes = {"pretrain": _PREFIXES, "finetune": _PREFIXES}
    pretrain_only = ("mask_token", "vis_mask_token", "decoder_", "norm.")
    finetune_only = ("head.", "fc_norm.")
    conv_kernels = re.compile(
        r"(^|\.)(patch_embed\.proj|downsample\.proj|posmlp\.layers\.\d+|attn\.sr)\.kernel$")
    order_within = {"downsample": ("norm", "proj")}  # UM-MAE's Swin merge: norm, then conv

    @property
    def order(self):
        if self.kind == "simmim":  # the SimMIM baselines define their mask token first
            return ("mask_token",) + tuple(n for n in _UNIT_ORDER if n != "mask_token")
        return _UNIT_ORDER

    @property
    def kind(self) -> str:
        return self.model_cfg.get("method", "ummae")

    def pretraining_model(self, rngs):
        from mixmae_jax.methods.simmim import UnitSimMIMModel
        from mixmae_jax.methods.ummae import UMPVTModel, UMSwinModel

        cfg = self.model_cfg
        if self.kind == "simmim":
            return UnitSimMIMModel(cfg, rngs=rngs)
        cls = UMSwinModel if cfg["name"] == "ummae_swin" else UMPVTModel
        return cls(cfg, secondary=cfg["vis_mask_ratio"] > 0, rngs=rngs)

    def torch_name(self, path: str, fmt: str) -> str:
        return super().torch_name(path, fmt).replace(".posmlp.layers.", ".posmlp.")

    def grids(self) -> dict[str, tuple[int, int]]:
        """Constant sin-cos tables: name -> (width, grid side)."""
        cfg, out = self.model_cfg, {}
        if cfg["name"] == "pvt":
            out["pos_embed"] = (cfg["embed_dims"][0], cfg["img_size"] // cfg["patch_size"])
        if self.kind == "ummae":
            out["decoder_pos_embed"] = (cfg["decoder_dim"], cfg["img_size"] // cfg["unit_size"])
        return out

    def constant_entries(self, fmt: str) -> dict[str, np.ndarray]:
        """PVT's `pos_embed` (finetuning learns it: exported from the table unless the params
        have their own) and, pretraining, the decoder's table."""
        from mixmae_jax.models import layers as L

        out = {}
        for name, (dim, side) in self.grids().items():
            if fmt == "pretrain" or name == "pos_embed":
                out[name] = L.sincos_pos_embed_2d(dim, side, side)[None]
        return out

    def is_constant_key(self, key: str) -> bool:
        return key in self.grids()

    def check_constant(self, name, value, state_dict, report, allow_mismatch=False):
        dim, side = self.grids()[name]
        return check_sincos(name, value, dim, side, report, allow_mismatch)

    def fresh_finetune_entries(self, reference, num_classes, seed):
        """main_finetune.py: head trunc_normal(std=2e-5), zero bias; a fresh fc_norm."""
        import torch

        dim = reference["fc_norm.weight"][0][0]
        return {**fresh_head(num_classes, reference["head.weight"][0][1], seed),
                "fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim)}


class UMViTLayout(MAELayout):
    """MAE's layout plus `vis_mask_token` and UM-MAE's decoder depth."""

    prefixes = {fmt: (("vis_mask_token", "vis_mask_token"),) + table
                for fmt, table in MAELayout.prefixes.items()}
    pretrain_only = MAELayout.pretrain_only + ("vis_mask_token",)

    order = ("vis_mask_token",) + MAELayout.order

    def pretraining_model(self, rngs):
        from mixmae_jax.methods.ummae import UMViTModel

        return UMViTModel(self.model_cfg, secondary=self.model_cfg["vis_mask_ratio"] > 0,
                          rngs=rngs)


def layout_for(model_cfg, method_cfg) -> Layout:
    """The layout of a UM-MAE or SimMIM-baseline run: the model config plus what of the method
    shapes the official state_dict (whether `vis_mask_token` exists)."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    cfg["method"] = method_cfg.name
    if method_cfg.name == "ummae":
        cfg["vis_mask_ratio"] = float(method_cfg.vis_mask_ratio)
    if cfg["name"] == "vit":
        return UMViTLayout(cfg)
    return UnitLayout(cfg)
