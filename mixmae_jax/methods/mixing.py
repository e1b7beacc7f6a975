"""MixMIM's pairing and mixing mask, drawn per device group.

"Groups" are the device-local batches of the official per-GPU implementation: the batch is split
into `num_groups` equal consecutive chunks (one per data-parallel device, because the global batch
is laid out device by device), each chunk draws its own mask and pairs sample i with sample
n-1-i of the same chunk. Expressed as a reshape of the leading axis, this stays device-local under
`jax.jit` with the batch sharded over the mesh: no cross-device traffic, and the result does not
depend on how many processes feed the devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mixmae_jax.methods.masks import random_subset


def partner(x, num_groups: int):
    """Reverse the batch inside each group: row i <- row (n-1-i) of its group."""
    b = x.shape[0]
    if b % num_groups:
        raise ValueError(f"batch {b} is not divisible into {num_groups} device groups")
    g = x.reshape(num_groups, b // num_groups, *x.shape[1:])
    return jnp.flip(g, axis=1).reshape(x.shape)


def draw_mask(rng, batch_size: int, num_groups: int, num_cells: int, mask_ratio: float,
              range_mask_ratio: float = 0.0, per_sample: bool = False):
    """(batch_size, num_cells) float32 0/1 mask, 1 = token taken from the partner.

    Exactly int(num_cells * r) ones per row with r = mask_ratio + U(0, range_mask_ratio), a
    uniformly random subset (argsort of uniform noise, as the official code). One mask per group
    (official) or one per sample.
    """
    ratio_rng, noise_rng = jax.random.split(rng)
    per_group = batch_size // num_groups
    rows = batch_size if per_sample else num_groups
    if range_mask_ratio:
        ratio = mask_ratio + jax.random.uniform(ratio_rng, (rows, 1), maxval=range_mask_ratio)
        count = jnp.floor(num_cells * ratio).astype(jnp.int32)
    else:  # Python arithmetic, exactly the official int(L * r)
        count = int(num_cells * mask_ratio)
    mask = random_subset(noise_rng, (rows, num_cells), count).astype(jnp.float32)
    if not per_sample:
        mask = jnp.repeat(mask, per_group, axis=0)
    return mask
