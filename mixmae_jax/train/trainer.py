"""The training loop, readable top to bottom, of every task (pretraining and fine-tuning are
tasks: `mixmae_jax/tasks/`; the loop imports neither).

    mesh -> checks of the config, the data, where a fresh run's params come from and the
    workdir (nothing written yet) -> input pipeline (its first batch read) -> config snapshot
    (the run now exists in its workdir) -> experiment (model, optimizer, sharded state: fresh
    or restored) -> loop (progress line, metrics, evaluators, async checkpoints, NaN guard,
    SIGTERM and Ctrl-C) -> final checkpoint

The loop never waits on the device except at logging, evaluation and checkpoint steps.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
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
    from mixmae_jax import console, outputs
    from mixmae_jax.data import input_pipeline  # imports TensorFlow

    # ----- Devices, config and inputs: checked before anything is written or compiled --------
    step_lib.enable_compilation_cache(config.get("compilation_cache_dir", ""))
    mesh = sharding.make_mesh(config.mesh)
    num_devices = mesh.devices.size
    is_primary = jax.process_index() == 0
    run = Run(workdir, print_fn if is_primary else (lambda s: None))
    task.check_config(num_devices, jax.process_count())
    task.check_data()
    outputs.check_writable(workdir, "--workdir")
    peek = ckpt_lib.Checkpointer(workdir, save_every=0, keep=0, read_only=True)
    latest = peek.latest_step()
    peek.close()
    if latest is None:  # a fresh run: where its params come from (a resume ignores that)
        task.check_init()

    def open_data(start_step):
        """The input stream from `start_step`, its first batch read (a bad image or folder is
        refused here, before compiling) and put back in front."""
        data = input_pipeline.create_train_iterator(
            config.data, global_batch_size=config.batch_size, seed=config.seed,
            process_index=jax.process_index(), process_count=jax.process_count(),
            start_step=start_step, **task.input_options())
        return data, itertools.chain([next(data)], data)

    data, stream = open_data(latest or 0)
    steps_per_epoch = data.steps_per_epoch
    total_steps = optim.total_steps(config, steps_per_epoch)

    # ----- Checkpoints: the config snapshot (refused if it cannot resume the run) -------------
    ckpt = ckpt_lib.Checkpointer(workdir, save_every=config.checkpoint_every,
                                 keep=config.keep_checkpoints, config=config)
    log = console.keep_log_in(workdir)  # the run exists: library output goes to WORKDIR/log.txt
    if log and "://" in workdir:
        print_fn(f"Library output of this run: {log}")
    for key, (old, new) in ckpt.config_changes.items():
        print_fn(f"Resuming with config change {key}: {old!r} -> {new!r}")

    # ----- Model, optimizer and state --------------------------------------------------------
    exp = experiment.build(config, mesh, task=task, steps_per_epoch=steps_per_epoch)
    start_step, state = 0, None
    if latest is not None:  # the newest step that can be read; unreadable ones moved aside
        start_step, state = ckpt.restore_newest_intact(exp.abstract_state, warn=print_fn)
        redo = (f" ({_count(latest - start_step, 'step')} will be redone)"
                if start_step < latest else "")
        print_fn(f"Resumed from step {start_step} in {workdir}{redo}")
        if start_step != latest:  # an older step than the data stream was opened at
            data.close()
            data, stream = open_data(start_step)
    if state is None:
        state = exp.init_state(task.initial_params(exp.abstract_params, run))
    evaluators = task.evaluators(exp)
    print_fn(f"{exp.method.name} {task.kind} ({config.model.name}): "
             f"{exp.num_params / 1e6:.2f}M params, "
             f"{_count(num_devices, 'device')}, "
             f"global batch {config.batch_size}, {_count(steps_per_epoch, 'step')}/epoch, "
             f"steps {start_step} -> {total_steps}")

    # ----- Loop ------------------------------------------------------------------------------
    if is_primary:  # a resume, or a restart from 0: the metrics past it are logged again
        dropped = metrics_lib.truncate_after(workdir, start_step)
        if start_step or dropped or metrics_lib.has_events(workdir):
            metrics_lib.mark_restart(workdir, start_step)
        if dropped:
            print_fn(f"Dropped {_count(dropped, 'line')} of {metrics_lib.JSONL_NAME} past step "
                     f"{start_step}")
    writer = metrics_lib.create_writer(workdir, is_primary=is_primary)
    progress = metrics_lib.ProgressLine(total_steps, config.batch_size,
                                        print_fn=print_fn if is_primary else lambda s: None)
    averager = metrics_lib.MetricAverager()
    preempt = ckpt_lib.install_preemption_handler(console.say if is_primary else lambda s: None)
    batches = _device_prefetch(stream, max(int(config.data.prefetch), 1), exp.batch_sharding)
    last, last_results = {}, {}
    step, stopped_by = start_step, None
    t_log, n_log = time.perf_counter(), 0
    try:
        while step < total_steps:
            state, metrics = exp.train_step(state, next(batches))
            step += 1
            averager.add(metrics)
            n_log += 1
            at_log = step % config.log_every == 0 or step == total_steps
            if step == start_step + 1:  # compiled: start the clocks now, not before compiling
                jax.block_until_ready(metrics)
                if not at_log:  # (a logging step prints its own line)
                    progress.update(step)
                t_log, n_log = time.perf_counter(), 0
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
                    _report_skipped(data, print_fn)
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
                stopped_by = "asked" if step == stop_at else preempt.stopped_by or "SIGTERM"
                why = {"asked": "Stopped as asked", "Ctrl-C": "Interrupted (Ctrl-C)"}.get(
                    stopped_by, "Preempted (SIGTERM)")
                print_fn(f"{why}: saved step {step}, exiting cleanly")
                break
        summary = task.finish(exp, state, evaluators, last_results, run)
    finally:
        preempt.uninstall()
        data.close()
        writer.close()
        ckpt.close()
    # stopped_by: None (the end), "asked" (stop_at), "SIGTERM" or "Ctrl-C"
    return {"step": step, **last, **summary, "stopped_by": stopped_by}


def _report_skipped(data, print_fn) -> None:
    """Names the images data.skip_corrupt skipped since the last logging step."""
    names = collections.Counter(data.skipped_images())  # an image is met once per epoch
    if names:
        shown = [n if k == 1 else f"{n} ({k} times)" for n, k in list(names.items())[:5]]
        more = f" and {len(names) - 5} more" if len(names) > 5 else ""
        print_fn(f"Skipped {_count(names.total(), 'unreadable image')} (data.skip_corrupt): "
                 f"{', '.join(shown)}{more}; {data.corrupt_count()} so far")


def _count(n: int, noun: str) -> str:
    """'1 step', '3 steps'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


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

