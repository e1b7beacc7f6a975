"""Train state and the pure train step.

State is a plain dict pytree: {"params", "opt_state", "step", "rng", "first_bad_step"}. The model
is an NNX module split once into a static graphdef and its params (a pure nested dict, the form
that Orbax, the sharding rules and the converter all work on); the step merges them back inside
`jax.jit`, which costs nothing at run time.

Randomness: the step's key is fold_in(state["rng"], step), so masks and drop path depend only on
the seed and the step: a resumed run replays the same masks as an uninterrupted one.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mixmae_jax import imaging
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.models.paths import path_name


def graphdef_and_abstract_params(method, build=None):
    """The model's static structure and abstract params, without allocating anything.
    build(rngs) -> model: the model to build (default: the method's pretraining model)."""
    build = build or method.build_model
    abstract = nnx.eval_shape(lambda: build(InitKeys(0)))
    graphdef, params = nnx.split(abstract, nnx.Param)
    return graphdef, nnx.to_pure_dict(params)


def init_params(method, rng, build=None):
    """Freshly initialised params (pure dict) from a key; call under jit for sharded init."""
    model = (build or method.build_model)(InitKeys(rng))
    return nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])


def flat_arrays(tree) -> dict:
    """{parameter path ("layers.0.norm.scale"): numpy array} of a params pytree: the npz form
    of the suite's toy encoder and the GPU check's references."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_name(p): np.asarray(v) for p, v in leaves}


def from_flat_arrays(tree, arrays, source: str):
    """`tree` with every leaf taken from `flat_arrays`' dict (or an npz) `arrays`, which must hold
    each path at the leaf's shape; else a ValueError naming `source` and the path."""
    def pick(path, leaf):
        key = path_name(path)
        if key not in arrays or arrays[key].shape != leaf.shape:
            found = f"shape {arrays[key].shape}" if key in arrays else "absent"
            raise ValueError(f"{source}: no {tuple(leaf.shape)} array {key} ({found})")
        return arrays[key]

    return jax.tree_util.tree_map_with_path(pick, tree)


def bind(graphdef, params):
    """An NNX model from the static graphdef and a params dict (inside or outside jit)."""
    return nnx.merge(graphdef, params)


def make_init_fn(method, tx, seed: int, *, build=None, extra=None):
    """(params=None) -> a fresh train state; jit it with out_shardings so the state is born
    sharded. params: start from these (fine-tuning from a pretrained encoder) instead of a
    random init; extra: more state entries ({name: () -> array}) a task keeps in the state."""

    def init(params=None):
        root = jax.random.PRNGKey(seed)
        if params is None:
            params = init_params(method, jax.random.fold_in(root, 0), build)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.fold_in(root, 1),
            # First step whose loss or gradient was not finite (-1: none). From that step on,
            # updates are dropped, so the state still holds the last good parameters.
            "first_bad_step": jnp.full((), -1, jnp.int32),
            **{name: make() for name, make in (extra or {}).items()},
        }

    return init


def _tree_where(pred, new, old):
    return jax.tree_util.tree_map(lambda n, o: jnp.where(pred, n, o), new, old)


def make_train_step(config, method, graphdef, tx, lr_schedule, num_groups: int):
    """(state, batch) -> (state, metrics). batch = {"image": uint8 (B, H, W, 3), ...}; the method
    (anything with `make_plan` and `loss`: a pretraining method, or fine-tuning's objective)
    gets it with the images normalised.

    num_groups: data-parallel device count; each device's slice of the batch is mixed and masked
    on its own where the method does that, as the official per-GPU code (methods/mixing.py).
    Gradient accumulation splits every device's slice into `optim.grad_accum_steps`
    micro-batches (a scan), so the update equals the one for the whole global batch.
    """
    accum = int(config.optim.grad_accum_steps)

    def loss_fn(params, batch, plan, rng):
        return method.loss(bind(graphdef, params), batch, plan, num_groups, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def loss_and_grads(params, batch, plan_key, rng):
        b = batch["image"].shape[0]
        if accum == 1:
            plan = method.make_plan(plan_key, b, num_groups)
            return grad_fn(params, batch, plan, rng)
        # (G * n) -> (accum, G * n / accum): micro-batch m takes rows m of each device's chunk,
        # so every micro-batch stays spread over (and local to) the devices.
        micro = b // accum

        def split(x):
            x = x.reshape(num_groups, accum, b // num_groups // accum, *x.shape[1:])
            return jnp.swapaxes(x, 0, 1).reshape(accum, micro, *x.shape[3:])

        micro_batches = jax.tree_util.tree_map(split, batch)

        def body(carry, inputs):
            batch_m, m = inputs
            plan = method.make_plan(jax.random.fold_in(plan_key, m), micro, num_groups)
            out = grad_fn(params, batch_m, plan, jax.random.fold_in(rng, m))
            return jax.tree_util.tree_map(jnp.add, carry, out), None

        first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
            grad_fn, params, first, method.make_plan(plan_key, micro, num_groups), rng))
        total, _ = jax.lax.scan(body, zeros, (micro_batches, jnp.arange(accum)))
        return jax.tree_util.tree_map(lambda t: t / accum, total)

    def train_step(state, batch):
        step = state["step"]
        key = jax.random.fold_in(state["rng"], step)
        plan_key, drop_key = jax.random.split(key)
        batch = dict(batch, image=imaging.normalize(batch["image"]))
        (loss, aux), grads = loss_and_grads(state["params"], batch, plan_key, drop_key)

        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        ok = finite & (state["first_bad_step"] < 0)
        first_bad = jnp.where((state["first_bad_step"] < 0) & ~finite, step,
                              state["first_bad_step"])
        new_state = {
            **state,  # entries a task keeps (fine-tuning's best accuracy) pass through
            "params": _tree_where(ok, params, state["params"]),
            "opt_state": _tree_where(ok, opt_state, state["opt_state"]),
            "step": step + 1,
            "first_bad_step": first_bad,
        }
        metrics = {
            "loss": loss,
            **aux,
            "lr": lr_schedule(step),
            "grad_norm": grad_norm,
            "param_norm": optax.tree.norm(new_state["params"]),
        }
        return new_state, metrics

    return train_step


def enable_compilation_cache(directory: str) -> None:
    """XLA's persistent compilation cache in `directory` (config.compilation_cache_dir; "": no
    change), for every compiled function however small or quick to compile."""
    if directory:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
