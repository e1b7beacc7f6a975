"""The official PyTorch MAE layouts: `models_mae.MaskedAutoencoderViT` (pretraining) and
`models_vit.VisionTransformer` with global pooling (finetuning), per the plain torch reference
`tests/references/mae.py`.

The Flax modules are named so that one prefix table maps both: the encoder's parts are the
official top level (`cls_token`, `patch_embed`, `blocks`, `norm`), the decoder's are flat
`decoder_*` names and `mask_token`. Pretraining stores the fixed sin-cos tables `pos_embed` and
`decoder_pos_embed` (with a zero cls row), which mixmae-jax computes; finetuning learns
`pos_embed` (initialised from the table on export of pretraining params), has no `norm` and adds
`fc_norm` and `head`.
"""

from __future__ import annotations

import numpy as np

from mixmae_jax.interop.keymap import FLAT_DECODER_PREFIXES, Layout, check_sincos, fresh_head
from mixmae_jax.models.vit import pos_embed_with_cls

_PREFIXES = FLAT_DECODER_PREFIXES + (
    ("encoder.", ""),
    ("fc_norm.", "fc_norm."),
    ("head.", "head."),
)


class MAELayout(Layout):
    name = "mae"
    prefixes = {"pretrain": _PREFIXES, "finetune": _PREFIXES}
    pretrain_only = ("mask_token", "decoder_", "norm.")
    finetune_only = ("head.", "fc_norm.")

    order = ("vis_mask_token", "cls_token", "pos_embed", "mask_token", "decoder_pos_embed",
             "weight", "bias", "patch_embed", "blocks", "norm1", "attn", "norm2", "mlp", "qkv",
             "proj", "fc1", "fc2", "norm", "head", "fc_norm", "decoder_embed", "decoder_blocks",
             "decoder_norm", "decoder_pred")

    def pretraining_model(self, rngs):
        from mixmae_jax.methods.mae import MAEModel

        return MAEModel(self.model_cfg, rngs=rngs)

    def grid(self) -> int:
        return self.model_cfg["img_size"] // self.model_cfg["patch_size"]

    def constant_entries(self, fmt: str) -> dict[str, np.ndarray]:
        cfg, grid = self.model_cfg, self.grid()
        out = {"pos_embed": pos_embed_with_cls(cfg["embed_dim"], grid)[None]}
        if fmt == "pretrain":
            out["decoder_pos_embed"] = pos_embed_with_cls(cfg["decoder_dim"], grid)[None]
        return out

    def is_constant_key(self, key: str) -> bool:
        return key in ("pos_embed", "decoder_pos_embed")

    def check_constant(self, name, value, state_dict, report, allow_mismatch=False):
        dim = self.model_cfg["embed_dim" if name == "pos_embed" else "decoder_dim"]
        return check_sincos(name, value, dim, self.grid(), report, allow_mismatch, cls_row=True)

    def fresh_finetune_entries(self, reference, num_classes, seed):
        """main_finetune.py: head trunc_normal(std=2e-5), zero bias; fc_norm is a fresh
        LayerNorm (weight 1, bias 0)."""
        import torch

        dim = reference["fc_norm.weight"][0][0]
        return {**fresh_head(num_classes, reference["head.weight"][0][1], seed),
                "fc_norm.weight": torch.ones(dim), "fc_norm.bias": torch.zeros(dim)}


class MixedAELayout(MAELayout):
    """MixedAE has no official code: its encoder and decoder are MAE's (the names of
    `models_mae`), so a run exports to MAE's finetuning layout (`models_vit`, what MixedAE
    finetunes with) and, when it has none of MixedAE's own parts (segment embeddings, a
    contrastive projection head), to MAE's pretraining layout too."""

    name = "mixedae"
    # `pretraining_model` is MAE's: segment_embed and contrast_head have no official key.
    prefixes = {fmt: (("segment_embed", "segment_embed"), ("contrast_head.", "contrast_head."))
                + table for fmt, table in MAELayout.prefixes.items()}
    pretrain_only = MAELayout.pretrain_only + ("segment_embed", "contrast_head.")
