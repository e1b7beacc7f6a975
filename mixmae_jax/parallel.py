"""Sharding hints for code traced inside the train step: the mesh's axis names and constraints
that keep arrays where the sharding implies.

The experiment traces its step with the mesh in context (`jax.sharding.use_abstract_mesh`), so
models and methods can say how an intermediate is laid out without knowing the mesh. Outside a
mesh (a test calling a model directly, the visualizer) the hints do nothing.

XLA's sharding propagation otherwise decides on its own, and it can decide badly: a scalar drawn
per device group inherits the batch's sharding, so a rejection-sampling loop on it all-reduces
its condition across devices every round; an FSDP-sharded kernel can make XLA gather the
activations over the fsdp axis instead of the kernel.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch is split over every device


def _constrain(x, spec: P):
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec)


def batch_sharded(x):
    """x (or a pytree) with its leading axis split over every device, the rest whole."""
    return jax.tree.map(lambda a: _constrain(a, P(BATCH_AXES)), x)


def replicated(x):
    """x (or a pytree) whole on every device."""
    return jax.tree.map(lambda a: _constrain(a, P()), x)
