"""Random masks the methods draw on device, written once: a uniformly random permutation per row
(the rank of uniform noise, as the official code's argsort of noise) and a random subset of a
fixed size (MixMIM's mixing mask, SimMIM's mask, UM-MAE's secondary masking, MixedAE's balanced
assignment cuts the permutation into equal parts)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def random_ranks(rng, shape):
    """(..., n) int32: each row a uniformly random permutation of 0..n-1."""
    noise = jax.random.uniform(rng, shape)
    return jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)


def random_subset(rng, shape, count):
    """(..., n) bool: `count` positions of each row, a uniformly random subset. count: an int, or
    one per row, (..., 1)."""
    return random_ranks(rng, shape) < count
