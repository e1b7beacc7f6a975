"""Subprocess body for the multi-device and multi-process tests (run by test_distributed.py).

    python distributed_worker.py OUT.npz MODE [PROCESS_ID NUM_PROCESSES COORDINATOR]

Sets up host devices itself (XLA_FLAGS must be in the environment before JAX starts), builds the
real sharded state and jitted step of the trainer, and writes losses and final params to OUT.npz.

MODE:
  equivalence  one device computing 8 device groups vs 8 devices, a 2 x 4 data x fsdp mesh with
               FSDP rules, and gradient accumulation over 2 micro-batches on 8 devices
  train        a few steps on all devices of all processes from a fixed global batch stream,
               save a checkpoint collectively, restore it, take one more step
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config():
    from mixmae_jax import config as config_lib

    c = config_lib.load_config(os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "configs", "mixmim_b.py"))
    c.model.update(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                   window_sizes=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    c.data.update(image_size=32)
    c.total_steps = 10
    # Adam with eps far above |g|: the update ~ lr * g / eps, so gradients that differ only by
    # reduction order give updates that differ by as little (eps 1e-8 would turn a near-zero
    # component's rounding noise into a step of up to lr).
    c.optim.update(warmup_epochs=0, base_lr=1e-3, eps=1.0)
    return c


def keep_gradient():
    """optax transformation that passes updates through and keeps them as its state.

    Chained in front of the optimizer, the train state's opt_state[0] is the exact gradient the
    step computed (sharded like the params), so tests can compare gradients, not only updates.
    """
    import jax
    import jax.numpy as jnp
    import optax

    return optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p),
                                        lambda g, state, params=None: (g, g))


def build(config, mesh, method=None, *, num_groups=None):
    """The trainer's experiment with the gradient kept in opt_state[0] (and `method`'s plan, if
    given): its sharded state, jitted step, batch sharding, and the experiment.

    num_groups: the device groups the step mixes within (default: the mesh's device count, as
    the trainer does); a one-device mesh with num_groups=8 computes what 8 devices compute.
    """
    import jax
    import optax

    from mixmae_jax.tasks.pretrain import PretrainTask as Task
    from mixmae_jax.train import experiment, optim, sharding
    from mixmae_jax.train import step as step_lib

    class KeepGradient(Task):
        def __init__(self, config):
            super().__init__(config)
            self.method = method or self.method

        def make_optimizer(self, abstract_params, steps_per_epoch):
            base_tx, lr = optim.make_optimizer(self.config, steps_per_epoch)
            return optax.chain(keep_gradient(), base_tx), lr

    exp = experiment.build(config, mesh, task=KeepGradient(config), steps_per_epoch=10)
    step = exp.train_step
    if num_groups is not None:
        step = jax.jit(step_lib.make_train_step(config, exp.method, exp.graphdef, exp.tx,
                                                exp.lr_schedule, num_groups),
                       in_shardings=(exp.state_shardings, {"image": exp.batch_sharding}),
                       out_shardings=(exp.state_shardings, sharding.replicated(mesh)))
    return exp.init_state(), step, exp.batch_sharding, exp


def flat_tree(tree):
    import jax
    import numpy as np

    from mixmae_jax.models.paths import path_name

    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_name(p, "/"): np.asarray(jax.device_get(x)) for p, x in leaves}


class FixedPlan:
    """The real method with its plan pinned: group g of every batch gets mask table[g].

    Checks that the step asks for a plan with the number of groups the table has, so a step
    that mixes within the wrong groups fails here rather than silently.
    """

    def __init__(self, config, table):
        from mixmae_jax.methods import get_method

        self._method = get_method(config)
        self._table = table

    def __getattr__(self, name):
        return getattr(self._method, name)

    def make_plan(self, rng, batch_size, num_groups):
        import jax.numpy as jnp

        assert num_groups == len(self._table), (num_groups, len(self._table))
        return {"mask": jnp.repeat(jnp.asarray(self._table), batch_size // num_groups, axis=0)}


def equivalence(out):
    """One step of: one device computing 8 device groups, 8 devices, FSDP 2x4, and 2-step
    gradient accumulation on 8 devices; losses, gradients and updated params.

    Every device gets its own shard S_d (and T_d for the second micro-batch) and its own mask, so
    a step that mixes across devices, drops a shard or mis-splits micro-batches changes numbers.
    (That 8 groups on one device compute what 8 separate one-group runs compute is tested in
    test_model.py, without devices.)
    """
    import jax
    import ml_collections
    import numpy as np

    from mixmae_jax.train import sharding

    assert jax.device_count() == 8
    rng = np.random.default_rng(0)
    shards_s = rng.integers(0, 256, (8, 4, 32, 32, 3), dtype=np.uint8)
    shards_t = rng.integers(0, 256, (8, 4, 32, 32, 3), dtype=np.uint8)
    # 8 different masks on the 4x4 final grid, with different counts (3..10 of 16 cells).
    table = np.zeros((8, 16), np.float32)
    for d in range(8):
        table[d, rng.permutation(16)[:3 + d]] = 1.0
    batch_s = shards_s.reshape(-1, 32, 32, 3)  # device d's rows are 4d .. 4d+3
    batch_t = shards_t.reshape(-1, 32, 32, 3)
    # Device d's 8 rows are S_d then T_d: micro-batch 0 is every S_d, micro-batch 1 every T_d.
    both = np.concatenate([shards_s, shards_t], axis=1).reshape(-1, 32, 32, 3)
    one, all8 = jax.devices()[:1], jax.devices()
    results = {}

    def setup(data, fsdp, devices, batch, *, rules=(), accum=1, num_groups=None):
        config = tiny_config()
        config.batch_size = batch
        config.optim.base_lr = 1e-3 * 256 / batch  # the same peak lr, 1e-3, at every batch
        config.optim.grad_accum_steps = accum
        config.sharding_rules = rules
        mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": data, "fsdp": fsdp}),
                                  devices)
        state, step, batch_sh, exp = build(config, mesh, FixedPlan(config, table),
                                           num_groups=num_groups)
        sharded = [s.spec for s in jax.tree.leaves(exp.state_shardings["params"]) if any(s.spec)]
        return state, step, batch_sh, len(sharded)

    def record(name, state, step, batch_sh, num_sharded, images):
        results.update({f"{name}/params0/{k}": v for k, v in flat_tree(state["params"]).items()})
        state, metrics = step(state, {"image": jax.device_put(images, batch_sh)})
        results[f"{name}/loss"] = np.asarray(metrics["loss"])
        results[f"{name}/lr"] = np.asarray(metrics["lr"])
        grads = flat_tree(state["opt_state"][0])
        results.update({f"{name}/grads/{k}": v for k, v in grads.items()})
        results.update({f"{name}/params/{k}": v for k, v in flat_tree(state["params"]).items()})
        results[f"{name}/num_sharded"] = np.asarray(num_sharded)

    state, step, batch_sh, n = setup(1, 1, one, 32, num_groups=8)  # not donated: reused
    record("one", state, step, batch_sh, n, batch_s)
    record("one_t", state, step, batch_sh, n, batch_t)
    record("dp8", *setup(8, 1, all8, 32), batch_s)
    record("fsdp2x4", *setup(2, 4, all8, 32, rules=((".*", "fsdp", 64),)), batch_s)
    record("accum2", *setup(8, 1, all8, 64, accum=2), both)
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
    state, step, batch_sh, exp = build(config, mesh)
    params0 = flat_tree(state["params"])
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
    restored = ckpt.restore(3, exp.abstract_state)
    ckpt.close()
    same = all(np.array_equal(np.asarray(jax.device_get(a)), np.asarray(jax.device_get(b)))
               for a, b in zip(jax.tree.leaves(restored["params"]),
                               jax.tree.leaves(state["params"]), strict=True))
    state, metrics = step(restored, next(batches))
    losses.append(float(metrics["loss"]))
    if jax.process_index() == 0:
        np.savez(out, losses=np.asarray(losses), lr=np.asarray(metrics["lr"]),
                 restored_equal=np.asarray(same), processes=np.asarray(jax.process_count()), **{
                     f"params/{k}": v for k, v in flat_tree(state["params"]).items()}, **{
                     f"params0/{k}": v for k, v in params0.items()})


if __name__ == "__main__":
    out, mode = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3:
        import jax

        pid, nproc, coordinator = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=nproc,
                                   process_id=pid)
    {"equivalence": equivalence, "train": train}[mode](out)
