"""The pretraining loop, readable top to bottom.

    mesh -> validate config -> checkpoint dir (config snapshot, resume step) -> input pipeline
    -> method, optimizer, sharded state (fresh or restored) -> jitted step -> loop
       (progress line, metrics, async checkpoints, NaN guard, SIGTERM) -> final checkpoint

The loop never waits on the device except at logging and checkpoint steps.
"""

from __future__ import annotations

import collections
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from mixmae_jax import config as config_lib
from mixmae_jax.methods import get_method
from mixmae_jax.train import checkpoint as ckpt_lib
from mixmae_jax.train import experiment, optim, sharding
from mixmae_jax.train import metrics as metrics_lib
from mixmae_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the last good state is kept in the checkpoints."""


class Task:
    """What `train` runs: pretraining here; fine-tuning (`eval/finetune.py`) overrides the hooks.

    The loop itself (devices, resume, checkpoints, metrics, preemption) is the same for both.
    """

    kind = "pretraining"
    batch_keys: tuple[str, ...] = ("image",)  # what the input yields and the step takes

    def __init__(self, config):
        self.config = config
        self.method = get_method(config)
        self.workdir = None  # set by `train`, with the primary process's print function
        self.print_fn = print
        self._knn = None  # the k-NN monitor, built on first use

    def check_config(self, num_devices: int, process_count: int) -> None:
        """The config's checks for this many devices and processes (ConfigError naming a key);
        nothing is read or compiled."""
        config_lib.validate(self.config, num_devices=num_devices, process_count=process_count)

    def check_data(self) -> None:
        """Checks of the data set the config names, before anything compiles."""

    def input_options(self) -> dict:
        """Extra `create_train_iterator` arguments (fine-tuning: labels, RandAugment)."""
        return {}

    def build_model(self, rngs):
        return self.method.build_model(rngs)

    @property
    def objective(self):
        """`make_plan` and `loss` for the train step."""
        return self.method

    def make_optimizer(self, abstract_params, steps_per_epoch: int):
        return optim.make_optimizer(self.config, steps_per_epoch)

    def extra_state(self) -> dict:
        """More train-state entries ({name: () -> array}); checkpointed with it."""
        return {}

    def initial_params(self, abstract_params):
        """Params a fresh run starts from (host arrays), or None for a random init."""
        return None

    def after_step(self, exp, step: int, state, *, total_steps: int, writer):
        """Runs after every step (before a checkpoint at that step); returns the state.
        Pretraining: the k-NN monitor every `eval.knn_every` steps and at the end."""
        e = self.config.get("eval")
        if e is None or e.knn_every <= 0 or (step % e.knn_every and step != total_steps):
            return state
        if self._knn is None:
            from mixmae_jax.eval.knn import FrozenFeatures, KnnMonitor

            features = FrozenFeatures(self.method, exp.graphdef, mesh=exp.mesh,
                                      params_sharding=exp.state_shardings["params"])
            self._knn = KnnMonitor(e, features, self.config.data.image_size)
        acc = self._knn(state["params"])
        writer.write_scalars(step, {f"knn_{k}": v for k, v in acc.items()})
        self.print_fn(f"k-NN step {step}: top-1 {acc['top1']:.4f}  top-5 {acc['top5']:.4f} "
                      f"({e.source} {e.name if e.source == 'tfds' else ''} {e.train_split} -> "
                      f"{e.test_split})")
        return state

    def finish(self, exp, state) -> dict:
        """Summary metrics at the end of a run."""
        return {}


def task_for(config) -> Task:
    """The task of a config: fine-tuning when `config.task == "finetune"`, else pretraining."""
    if config.get("task", "pretrain") == "finetune":
        from mixmae_jax.eval.finetune import FinetuneTask

        return FinetuneTask(config)
    return Task(config)


def load_config_snapshot(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was started with (config.json beside its checkpoints)."""
    path = epath.Path(workdir) / ckpt_lib.CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no config snapshot; is {workdir!r} a mixmae workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore_params(workdir: str, step: int | None = None, *, best: bool = False,
                   pretraining_only: bool = False):
    """(config, params, step) of a run's checkpoint, on this host's devices (for tools): the
    params only, not the optimizer moments. best: a fine-tuning run's best-top-1 params;
    pretraining_only: refuse a fine-tuning run (tools that need the pretraining model)."""
    config = load_config_snapshot(workdir)
    if pretraining_only and config.get("task", "pretrain") == "finetune":
        raise ValueError(f"--workdir {workdir}: a fine-tuning run (its classifier has no "
                         "decoder); this tool reads pretraining runs")
    if best and config.get("task", "pretrain") != "finetune":
        raise ValueError(f"--best: {workdir} is a pretraining run; only fine-tuning keeps a "
                         "best checkpoint")
    exp = experiment.build(config, sharding.single_device_mesh(), task=task_for(config),
                           steps_per_epoch=1)
    target = exp.abstract_params
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=0, keep=0,
                                 subdir="best" if best else ckpt_lib.CHECKPOINT_DIR)
    try:
        steps = ckpt.all_steps()
        step = ckpt.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}")
        if step not in steps:
            raise FileNotFoundError(f"--step {step}: no such checkpoint in {workdir} (steps: "
                                    f"{', '.join(map(str, steps)) or 'none'})")
        try:
            params = ckpt.restore_params(step, target)
        except Exception as e:  # noqa: BLE001 - any read failure: name the step and the others
            others = [s for s in steps if s != step]
            reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
            raise ValueError(
                f"checkpoint step {step} in {ckpt.directory / str(step)} cannot be read "
                f"({reason}); other steps: {', '.join(map(str, others)) or 'none'} (--step N)"
            ) from e
    finally:
        ckpt.close()
    return config, params, int(step)


def _device_prefetch(iterator, size: int, batch_sharding):
    """Keeps `size` global batches already on their way to the devices."""
    queue = collections.deque()

    def put(local):
        return {k: jax.make_array_from_process_local_data(batch_sharding, v)
                for k, v in local.items()}

    for local in iterator:
        queue.append(put(local))
        if len(queue) > size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def train(config, workdir: str, *, print_fn=print, stop_at: int | None = None,
          task: Task | None = None) -> dict:
    """Runs `task` (default: the config's, `task_for`) until config's total steps, resuming from
    `workdir`; returns final metrics.

    stop_at: end this invocation early at that step with a checkpoint, as an interruption would
    (the schedule still runs to the total); a later call resumes.
    """
    from mixmae_jax.data import input_pipeline  # imports TensorFlow

    # ----- Devices and config ----------------------------------------------------------------
    step_lib.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    mesh = sharding.make_mesh(config.mesh)
    num_devices = mesh.devices.size
    task = task or task_for(config)
    is_primary = jax.process_index() == 0
    task.workdir, task.print_fn = workdir, print_fn if is_primary else (lambda s: None)
    task.check_config(num_devices, jax.process_count())
    task.check_data()

    # ----- Checkpoints: config snapshot and resume step --------------------------------------
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints, config=config)
    latest = ckpt.latest_step()
    start_step = latest or 0

    # ----- Input pipeline (refuses bad batch sizes / tiny datasets before compiling) ---------
    data = input_pipeline.create_train_iterator(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step, **task.input_options())
    steps_per_epoch = data.steps_per_epoch
    total_steps = optim.total_steps(config, steps_per_epoch)

    # ----- Model, optimizer and state --------------------------------------------------------
    exp = experiment.build(config, mesh, task=task, steps_per_epoch=steps_per_epoch)
    state = None
    if latest is not None:  # the newest step that can be read; unreadable ones moved aside
        start_step, state = ckpt.restore_newest_intact(exp.abstract_state, warn=print_fn)
        redo = f" ({latest - start_step} steps will be redone)" if start_step < latest else ""
        print_fn(f"Resumed from step {start_step} in {workdir}{redo}")
        if start_step != latest:  # an older step than the data stream was opened at
            data = input_pipeline.create_train_iterator(
                config.data, global_batch_size=config.batch_size, seed=config.seed,
                process_index=jax.process_index(), process_count=jax.process_count(),
                start_step=start_step, **task.input_options())
    if state is None:
        state = exp.init_state(task.initial_params(exp.abstract_params))
    print_fn(f"{exp.method.name} {task.kind} ({config.model.name}): "
             f"{exp.num_params / 1e6:.2f}M params, "
             f"{num_devices} devices, "
             f"global batch {config.batch_size}, {steps_per_epoch} steps/epoch, "
             f"steps {start_step} -> {total_steps}")

    # ----- Loop ------------------------------------------------------------------------------
    if is_primary and start_step:
        metrics_lib.mark_restart(workdir, start_step)
        dropped = metrics_lib.truncate_after(workdir, start_step)
        if dropped:
            print_fn(f"Dropped {dropped} lines of {metrics_lib.JSONL_NAME} past step {start_step}")
    writer = metrics_lib.create_writer(workdir, is_primary=is_primary)
    progress = metrics_lib.ProgressLine(total_steps, config.batch_size,
                                        print_fn=print_fn if is_primary else lambda s: None)
    averager = metrics_lib.MetricAverager()
    preempt = ckpt_lib.install_preemption_handler()
    batches = _device_prefetch(data, max(int(config.data.prefetch), 1), exp.batch_sharding)
    last = {}
    step = start_step
    t_log, n_log = time.perf_counter(), 0
    try:
        while step < total_steps:
            state, metrics = exp.train_step(state, next(batches))
            step += 1
            averager.add(metrics)
            n_log += 1
            if step == start_step + 1:  # compiled: start the clocks now, not before compiling
                jax.block_until_ready(metrics)
                progress.update(step)
                t_log, n_log = time.perf_counter(), 0
            at_log = step % config.log_every == 0 or step == total_steps
            at_save = step % config.checkpoint_every == 0 or step == total_steps
            stop = preempt.should_stop(step) or step == stop_at
            if at_log or at_save or stop:
                _raise_if_nonfinite(state, ckpt)  # syncs; never saves a poisoned state
            if at_log:
                last = averager.result()
                dt = time.perf_counter() - t_log
                last["images_per_sec"] = n_log * config.batch_size / max(dt, 1e-9)
                if config.data.skip_corrupt:
                    last["corrupt_images"] = float(data.corrupt_count())
                writer.write_scalars(step, last)
                progress.update(step, {k: last[k] for k in ("loss", "lr") if k in last})
                t_log, n_log = time.perf_counter(), 0
            before = time.perf_counter()
            state = task.after_step(exp, step, state, total_steps=total_steps, writer=writer)
            t_log += time.perf_counter() - before  # evaluation is not training time
            if at_save or stop:
                ckpt.save(step, state, force=stop or step == total_steps)
            if stop:
                why = "Stopped as asked" if step == stop_at else "Preempted (SIGTERM)"
                print_fn(f"{why}: saved step {step}, exiting cleanly")
                break
        summary = task.finish(exp, state)
    finally:
        preempt.uninstall()
        writer.close()
        ckpt.close()
    return {"step": step, **last, **summary}


def _raise_if_nonfinite(state, ckpt) -> None:
    bad = int(jax.device_get(state["first_bad_step"]))
    if bad < 0:
        return
    # The step dropped every update from `bad` on, so the params are those after step bad - 1.
    good = dict(state, step=jnp.asarray(bad, jnp.int32), first_bad_step=jnp.asarray(-1, jnp.int32))
    saved = bad > 0 and ckpt.save(bad, good, force=True)
    ckpt.wait()
    where = f"; the last good state is saved as step {bad}" if saved else ""
    raise NonFiniteLossError(f"loss or gradient is not finite at step {bad + 1}{where}. "
                             "Lower optim.base_lr, enable optim.clip_grad_norm, or check the data.")

