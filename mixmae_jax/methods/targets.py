"""Per-patch reconstruction targets shared by the methods that predict pixels of patches."""

from __future__ import annotations

import jax.numpy as jnp

from mixmae_jax.models import layers as L


def patch_targets(images, patch: int, norm_pix: bool):
    """(B, L, patch*patch*3) targets; norm_pix normalises each patch by its mean and unbiased
    variance + 1e-6, like the official MAE / MixMIM code (torch.var's default is unbiased)."""
    target = L.patchify(images.astype(jnp.float32), patch)
    if norm_pix:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, ddof=1, keepdims=True)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return target


def pixels_of(pred, target, norm_pix: bool):
    """Predicted patches back in pixel space: a norm-pix prediction takes the true patch's mean
    and variance (the usual MAE visualisation)."""
    if not norm_pix:
        return pred
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    return pred * jnp.sqrt(var + 1e-6) + mean
