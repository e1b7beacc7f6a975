"""Device mesh, batch sharding and regex rules that place parameters (and their optimizer state).

The mesh has two axes, ("data", "fsdp"). The batch is split over both; parameters are replicated
unless a rule shards them over "fsdp" (ZeRO-3 style: XLA all-gathers them where they are used).

Rules are a sequence of `(regex, spec)` or `(regex, spec, min_size)`, matched with `re.search`
against "/"-joined parameter paths ("encoder/layers/0/blocks/1/attn/qkv/kernel"); the first match
wins and unmatched leaves are replicated. `spec` is one of:

* `None` or `"replicate"`: replicated;
* a mesh axis name such as `"fsdp"`: shard the largest dimension divisible by that axis's size
  (ties go to the later dimension), replicate if none divides; leaves with fewer than `min_size`
  elements (default 0) are replicated;
* a tuple such as `(None, "fsdp")`: an explicit PartitionSpec.

A rule `("FSDP_DEFAULT", "fsdp")` stands for the built-in `FSDP_RULES` (see `expand_rules`).
"""

from __future__ import annotations

import re
import types
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from mixmae_jax.models.paths import path_name
from mixmae_jax.parallel import BATCH_AXES, MESH_AXES

# FSDP for the L/H configs: every tensor of at least 64 Ki elements (all the big Linear kernels) is
# split over "fsdp"; biases, LayerNorms, mask_token, small relative-position tables and the
# patch-embedding conv stay replicated, where sharding would cost more in latency than it saves.
FSDP_MIN_SIZE = 1 << 16
FSDP_RULES = ((r".*", "fsdp", FSDP_MIN_SIZE),)
# Configs name the built-in set instead of spelling it out: ("FSDP_DEFAULT", "fsdp").
NAMED_RULES = {"FSDP_DEFAULT": FSDP_RULES}


# ---------------------------------------------------------------------------------------------
# Mesh
# ---------------------------------------------------------------------------------------------


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, int]:
    """(data, fsdp) sizes from `config.mesh`; `data == -1` takes all remaining devices."""
    data, fsdp = int(mesh_cfg.data), int(mesh_cfg.fsdp)
    if fsdp < 1:
        raise ValueError(f"mesh.fsdp must be >= 1, got {fsdp}")
    if data == -1:
        if num_devices % fsdp:
            raise ValueError(
                f"mesh.fsdp={fsdp} does not divide the {num_devices} devices "
                "(mesh.data=-1 takes the rest)"
            )
        data = num_devices // fsdp
    if data < 1 or data * fsdp != num_devices:
        raise ValueError(
            f"mesh.data={mesh_cfg.data} x mesh.fsdp={fsdp} = {data * fsdp} devices, but there are "
            f"{num_devices}; set mesh.data=-1 to use all remaining devices"
        )
    return data, fsdp


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The ("data", "fsdp") mesh over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    # Auto axes: jit in/out shardings drive the partitioning; jax.make_mesh defaults to Explicit
    # ("sharding in types"), which this codebase does not use.
    try:
        return jax.make_mesh(shape, MESH_AXES, (AxisType.Auto,) * 2, devices=devices)
    except NotImplementedError as e:  # a TPU torus: each mesh axis must map onto whole axes
        coords = [getattr(d, "coords", None) for d in devices]
        torus = ("x".join(str(1 + max(c[i] for c in coords)) for i in range(len(coords[0])))
                 if all(coords) else "physical")
        raise ValueError(
            f"mesh.data={shape[0]} x mesh.fsdp={shape[1]} cannot be laid out on the {torus} "
            "mesh of these devices: each mesh axis must span whole physical axes (its size the "
            "product of some of theirs); choose mesh.fsdp accordingly") from e


def single_device_mesh() -> jax.sharding.Mesh:
    """A 1 x 1 mesh on this host's first device: tools that read or write one checkpoint."""
    return make_mesh(types.SimpleNamespace(data=1, fsdp=1), jax.local_devices()[:1])


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ---------------------------------------------------------------------------------------------
# Parameter rules
# ---------------------------------------------------------------------------------------------


def expand_rules(rules: Sequence[Sequence]) -> tuple[tuple, ...]:
    """Rules with named sets expanded: ("FSDP_DEFAULT", axis) -> FSDP_RULES over `axis`."""
    out = []
    for rule in rules:
        if rule[0] in NAMED_RULES:
            out += [(r[0], rule[1], *r[2:]) for r in NAMED_RULES[rule[0]]]
        else:
            out.append(tuple(rule))
    return tuple(out)


def _spec_for(name: str, shape: tuple[int, ...], axis_sizes: Mapping[str, int], rules) -> P:
    for rule in rules:
        regex, spec = rule[0], rule[1]
        min_size = rule[2] if len(rule) > 2 else 0
        if not re.search(regex, name):
            continue
        if spec is None or spec == "replicate":
            return P()
        if isinstance(spec, str):
            if spec not in axis_sizes:
                raise ValueError(f"sharding rule {regex!r}: {spec!r} is not a mesh axis")
            n = axis_sizes[spec]
            if n == 1 or int(np.prod(shape)) < min_size:
                return P()
            candidates = [d for d in range(len(shape)) if shape[d] % n == 0]
            if not candidates:
                return P()
            dim = max(candidates, key=lambda d: (shape[d], d))
            return P(*([None] * dim + [spec]))
        spec = tuple(spec)
        if len(spec) > len(shape):
            raise ValueError(
                f"sharding rule {regex!r}: spec {spec} has more dims than {name}{shape}"
            )
        return P(*spec)
    return P()


def param_specs(params: Any, mesh: Any, rules: Sequence[tuple] = ()) -> Any:
    """PartitionSpecs for a params tree (arrays or ShapeDtypeStructs). `mesh` may be abstract."""
    axis_sizes, rules = dict(mesh.shape), expand_rules(rules)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: _spec_for(path_name(path, "/"), tuple(x.shape), axis_sizes, rules),
        params
    )


def state_shardings(state: Any, mesh: jax.sharding.Mesh, rules: Sequence[tuple] = ()) -> Any:
    """Shardings for the whole train state {"params", "opt_state", "step", "rng", ...}.

    Optimizer moments (optax mu/nu, MultiSteps' accumulated grads) are param-shaped subtrees whose
    key paths end with a parameter's path; any leaf whose path has such a suffix and the same
    shape is sharded like that parameter. Everything else (counts, step, rng) is replicated.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(state["params"])
    specs = jax.tree.leaves(
        param_specs(state["params"], mesh, rules), is_leaf=lambda x: isinstance(x, P)
    )
    by_path = {tuple(path): (tuple(x.shape), spec) for (path, x), spec in zip(flat, specs)}

    def for_leaf(path, x):
        shape = tuple(np.shape(x))
        for i in range(len(path)):  # longest suffix first
            hit = by_path.get(tuple(path[i:]))
            if hit is not None and hit[0] == shape:
                return NamedSharding(mesh, hit[1])
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(for_leaf, state)


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings`: the restore target for a (possibly new) mesh."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings
    )
