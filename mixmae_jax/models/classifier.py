"""Finetuning model: the encoder, global average pooling over the final tokens, a linear head.

Matches the official `models_mixmim_ft` layout (`head.weight` / `head.bias`); `mixmae-finetune`
trains it, and it is the reference for the "all-zero mask" invariant. `build_classifier` picks
the fine-tuning model of any backbone.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models.swin import SwinEncoder

# main_finetune.py re-initialises the head with trunc_normal_(std=2e-5) after loading.
head_init = L.trunc_normal_init(2e-5)


class SwinClassifier(nnx.Module):
    def __init__(self, cfg, num_classes: int = 1000, *, dtype=None, rngs: nnx.Rngs):
        self.encoder = SwinEncoder(cfg, dtype=dtype, rngs=rngs)
        self.head = L.dense(self.encoder.out_dim, num_classes, dtype=dtype, kernel_init=head_init,
                            rngs=rngs)

    def forward_features(self, images, rng=None):
        return self.encoder(images, None, rng)

    def __call__(self, images, rng=None):
        """Logits (B, num_classes); `rng` drives drop path (None: off, as in evaluation)."""
        return self.head(jnp.mean(self.forward_features(images, rng), axis=1)).astype(jnp.float32)


def build_classifier(model_cfg, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Module:
    """The official fine-tuning model of a backbone (`config.model.name`): MixMIM/SimMIM Swin,
    MAE's ViT (global pool + fc_norm), UM-MAE's Swin and PVT (mean + fc_norm)."""
    from mixmae_jax.models.pvt import PVTClassifier
    from mixmae_jax.models.ummae_swin import UMSwinClassifier
    from mixmae_jax.models.vit import ViTClassifier

    classes = {"swin": SwinClassifier, "vit": ViTClassifier, "ummae_swin": UMSwinClassifier,
               "pvt": PVTClassifier}
    if model_cfg.name not in classes:
        raise ValueError(f"model.name={model_cfg.name!r}: no fine-tuning model (known: "
                         f"{', '.join(classes)})")
    return classes[model_cfg.name](model_cfg, num_classes, dtype=dtype, rngs=rngs)
