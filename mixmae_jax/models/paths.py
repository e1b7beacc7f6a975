"""A parameter's path as one string: the name every tool uses for a parameter (the npz keys of
`train.step.flat_arrays`, the sharding rules' subject, the layer-decay and interop lookups)."""

from __future__ import annotations

from flax import traverse_util


def path_name(path, sep: str = ".") -> str:
    """("encoder", 0, "kernel") -> "encoder.0.kernel". The parts may be plain keys (a
    `flatten_dict` tuple) or a jax key path's entries (`tree_map_with_path`)."""
    return sep.join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten(tree) -> dict[str, object]:
    """Nested dict (str or int keys) -> {"a.0.b": leaf}."""
    return {path_name(k): v for k, v in traverse_util.flatten_dict(tree).items()}


def unflatten(flat: dict[str, object]) -> dict:
    """Inverse of `flatten`; all-digit components become int keys (nnx.List indices)."""
    return traverse_util.unflatten_dict(
        {tuple(int(p) if p.isdigit() else p for p in k.split(".")): v for k, v in flat.items()})
