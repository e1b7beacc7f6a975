"""Finetuning model: the encoder, global average pooling over the final tokens, a linear head.

Matches the official `models_mixmim_ft` layout (`head.weight` / `head.bias`); used to export
finetune checkpoints and as the reference for the "all-zero mask" invariant.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models.swin import SwinEncoder

# main_finetune.py re-initialises the head with trunc_normal_(std=2e-5) after loading.
head_init = nnx.initializers.truncated_normal(stddev=2e-5, lower=-2.0 / 2e-5, upper=2.0 / 2e-5)


class SwinClassifier(nnx.Module):
    def __init__(self, cfg, num_classes: int = 1000, *, dtype=None, rngs: nnx.Rngs):
        self.encoder = SwinEncoder(cfg, dtype=dtype, rngs=rngs)
        self.head = L.dense(self.encoder.out_dim, num_classes, dtype=dtype, kernel_init=head_init,
                            rngs=rngs)

    def forward_features(self, images):
        return self.encoder(images)

    def __call__(self, images):
        return self.head(jnp.mean(self.forward_features(images), axis=1)).astype(jnp.float32)
