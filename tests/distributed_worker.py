"""Subprocess body for the multi-device and multi-process tests (run by test_distributed.py).

    python distributed_worker.py OUT.npz MODE [PROCESS_ID NUM_PROCESSES COORDINATOR]

Sets up host devices itself (XLA_FLAGS must be in the environment before JAX starts), builds the
real sharded state and jitted step of the trainer, and writes losses and final params to OUT.npz.

MODE:
  equivalence  one device on a shard vs 8 devices each given the same shard and mask, and the
               same on a 2 x 4 data x fsdp mesh with FSDP rules
  train        a few steps on all devices of all processes from a fixed global batch stream,
               save a checkpoint collectively, restore it, take one more step
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
    from mixmae_jax import config as config_lib

    c = config_lib.base_config()
    c.model.update(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                   window_sizes=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    c.data.update(image_size=32)
    c.total_steps = 10
    c.optim.update(warmup_epochs=0, base_lr=1e-3)
    return c


def build(config, mesh, method=None):
    import jax

    from mixmae_jax.train import sharding
    from mixmae_jax.train.trainer import build_state_fns, jit_train_step

    m, tx, lr, graphdef, init_fn, abstract, state_sh = build_state_fns(config, mesh, 10)
    step = jit_train_step(config, mesh, method or m, graphdef, tx, lr, state_sh)
    batch_sh = sharding.batch_sharding(mesh)
    state = jax.jit(init_fn, out_shardings=state_sh)()
    return state, step, batch_sh, abstract, state_sh


def flat_params(state):
    import jax
    import numpy as np

    from mixmae_jax.train.sharding import path_str

    leaves = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    return {path_str(p): np.asarray(jax.device_get(x)) for p, x in leaves}


def equivalence(out):
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from mixmae_jax.methods import get_method
    from mixmae_jax.train import sharding

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    shard = rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    mask_row = np.zeros(16, np.float32)
    mask_row[rng.permutation(16)[:8]] = 1.0

    class FixedMask:  # the same mask on every device: the one thing the test pins
        def __init__(self, config):
            self._m = get_method(config)

        def __getattr__(self, name):
            return getattr(self._m, name)

        def make_plan(self, rng, b, g):
            return {"mask": jnp.broadcast_to(jnp.asarray(mask_row), (b, 16))}

    results = {}
    for name, (data, fsdp, devices, rules, accum) in {
        "one": (1, 1, jax.devices()[:1], (), 1),
        "dp8": (8, 1, jax.devices(), (), 1),
        "fsdp2x4": (2, 4, jax.devices(), ((".*", "fsdp", 64),), 1),
        # Two micro-batches per device, each the same shard: the accumulated update is the same.
        "accum2": (1, 1, jax.devices()[:1], (), 2),
    }.items():
        config = tiny_config()
        copies = data * fsdp * accum
        config.batch_size = 4 * copies
        config.optim.base_lr = 1e-3 / copies  # the lr scales with the global batch
        config.optim.grad_accum_steps = accum
        config.sharding_rules = rules
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}),
                                  devices)
        state, step, batch_sh, _, state_sh = build(config, mesh, FixedMask(config))
        images = np.concatenate([shard] * copies)
        batch = {"image": jax.device_put(images, batch_sh)}
        state, metrics = step(state, batch)
        results[f"{name}/loss"] = np.asarray(metrics["loss"])
        results[f"{name}/grad_norm"] = np.asarray(metrics["grad_norm"])
        results[f"{name}/lr"] = np.asarray(metrics["lr"])
        for k, v in flat_params(state).items():
            results[f"{name}/params/{k}"] = v
        sharded = [s.spec for s in jax.tree.leaves(state_sh["params"]) if any(s.spec)]
        results[f"{name}/num_sharded"] = np.asarray(len(sharded))
    np.savez(out, **results)


def train(out):
    import jax
    import ml_collections
    import numpy as np

    from mixmae_jax.train import checkpoint as ckpt_lib
    from mixmae_jax.train import sharding
    from mixmae_jax.train.trainer import _device_prefetch

    workdir = os.environ["WORKDIR"]
    config = tiny_config()
    config.batch_size = 16
    config.sharding_rules = ((".*", "fsdp", 64),)
    mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": 4, "fsdp": 2}))
    state, step, batch_sh, abstract, state_sh = build(config, mesh)
    # A fixed global stream; each process feeds only its own rows (as the input pipeline does).
    rng = np.random.default_rng(1)
    stream = [rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8) for _ in range(4)]
    per = 16 // jax.process_count()
    lo = jax.process_index() * per
    local = ({"image": b[lo:lo + per]} for b in stream)
    batches = _device_prefetch(local, 1, batch_sh)
    losses = []
    for _ in range(3):
        state, metrics = step(state, next(batches))
        losses.append(float(metrics["loss"]))
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=0, keep=2, config=config)
    ckpt.save(3, state, force=True)
    ckpt.wait()
    restored = ckpt.restore(3, sharding.abstract_with_shardings(abstract, state_sh))
    ckpt.close()
    same = all(np.array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)))
               for a, b in zip(jax.tree.leaves(restored["params"]),
                               jax.tree.leaves(state["params"]), strict=True))
    state, metrics = step(restored, next(batches))
    losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        np.savez(out, losses=np.asarray(losses), lr=np.asarray(metrics["lr"]),
                 restored_equal=np.asarray(same), processes=np.asarray(jax.process_count()), **{
                     f"params/{k}": v for k, v in flat_params(state).items()})


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        import jax

        pid, nproc, coordinator = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=nproc,
                                   process_id=pid)
    {"equivalence": equivalence, "train": train}[mode](out)
