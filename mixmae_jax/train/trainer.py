"""The training loop, readable top to bottom, of every task (pretraining and fine-tuning are
tasks: `mixmae_jax/tasks/`; the loop imports neither).

    mesh -> task's config and data checks -> checkpoint dir (config snapshot, resume step)
    -> input pipeline -> experiment (model, optimizer, sharded state: fresh or restored)
    -> loop (progress line, metrics, evaluators, async checkpoints, NaN guard, SIGTERM)
    -> final checkpoint

The loop never waits on the device except at logging, evaluation and checkpoint steps.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mixmae_jax.train import checkpoint as ckpt_lib
from mixmae_jax.train import experiment, optim, sharding
from mixmae_jax.train import metrics as metrics_lib
from mixmae_jax.train import step as step_lib


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN/inf; the last good state is kept in the checkpoints."""


@dataclasses.dataclass(frozen=True)
class Run:
    """What a task's hooks may need of the run: where it writes, how it speaks."""

    workdir: str
    print_fn: Callable[[str], None]  # this process's (quiet on all but the first)


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


def train(config, workdir: str, task, *, print_fn=print, stop_at: int | None = None) -> dict:
    """Runs `task` (`tasks.for_config(config)`) until the config's total steps, resuming from
    `workdir`; returns the final metrics.

    stop_at: end this invocation early at that step with a checkpoint, as an interruption would
    (the schedule still runs to the total); a later call resumes.
    """
    from mixmae_jax.data import input_pipeline  # imports TensorFlow

    # ----- Devices and config ----------------------------------------------------------------
    step_lib.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    mesh = sharding.make_mesh(config.mesh)
    num_devices = mesh.devices.size
    is_primary = jax.process_index() == 0
    run = Run(workdir, print_fn if is_primary else (lambda s: None))
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
        state = exp.init_state(task.initial_params(exp.abstract_params, run))
    evaluators = task.evaluators(exp)
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
    last, last_results = {}, {}
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
            for evaluator in evaluators:
                if evaluator.due(step, total_steps):
                    state = _evaluate(evaluator, step, state, task, exp, run, writer,
                                      last_results)
            t_log += time.perf_counter() - before  # evaluation is not training time
            if at_save or stop:
                ckpt.save(step, state, force=stop or step == total_steps)
            if stop:
                why = "Stopped as asked" if step == stop_at else "Preempted (SIGTERM)"
                print_fn(f"{why}: saved step {step}, exiting cleanly")
                break
        summary = task.finish(exp, state, evaluators, last_results, run)
    finally:
        preempt.uninstall()
        writer.close()
        ckpt.close()
    return {"step": step, **last, **summary}


def _evaluate(evaluator, step: int, state, task, exp, run, writer, last_results: dict):
    """One evaluator's run: its results logged as `<name>_<key>`, then the task's use of them
    (fine-tuning keeps the best params); returns the state."""
    results = last_results[evaluator.name] = evaluator(state["params"])
    writer.write_scalars(step, {f"{evaluator.name}_{k}": v for k, v in results.items()
                                if k != "count"})
    state, note = task.after_eval(exp, step, state, evaluator.name, results, run)
    run.print_fn(evaluator.describe(step, results) + note)
    return state


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

