"""The fine-tuning model of every backbone: its encoder on the whole image, the mean of the final
tokens, an optional `fc_norm`, a linear `head` (the official `head.weight` / `head.bias`).

Each backbone module's `classifier(cfg, num_classes)` builds its official fine-tuning model
with it: MixMIM's and SimMIM's Swin (final norm in the encoder, no `fc_norm`), MAE's ViT (global
pool + `fc_norm`), UM-MAE's Swin and PVT (mean + `fc_norm`). `mixmae-finetune` trains it, and
it is the reference for MixMIM's "all-zero mask" invariant.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mixmae_jax.models import get_model_module
from mixmae_jax.models import layers as L

# The official fine-tuning scripts re-initialise the head with trunc_normal_(std=2e-5).
head_init = L.trunc_normal_init(2e-5)


class PooledClassifier(nnx.Module):
    def __init__(self, encoder: L.Encoder, num_classes: int, *, fc_norm_eps: float | None,
                 dtype=None, rngs: nnx.Rngs):
        """fc_norm_eps: the eps of the LayerNorm on the pooled features (None: no `fc_norm`)."""
        self.encoder = encoder
        if fc_norm_eps is not None:
            self.fc_norm = L.layer_norm(encoder.out_dim, eps=fc_norm_eps, rngs=rngs)
        self.head = L.dense(encoder.out_dim, num_classes, dtype=dtype, kernel_init=head_init,
                            rngs=rngs)

    def forward_features(self, images, rng=None):
        """(B, C): the pooled features the head reads; `rng` drives drop path (None: off)."""
        x = jnp.mean(self.encoder(images, rng), axis=1)
        return self.fc_norm(x) if hasattr(self, "fc_norm") else x

    def __call__(self, images, rng=None):
        """Logits (B, num_classes)."""
        return self.head(self.forward_features(images, rng)).astype(jnp.float32)


def build_classifier(model_cfg, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> nnx.Module:
    """The official fine-tuning model of the backbone `config.model.name`."""
    return get_model_module(model_cfg.name).classifier(model_cfg, num_classes, dtype=dtype,
                                                       rngs=rngs)
