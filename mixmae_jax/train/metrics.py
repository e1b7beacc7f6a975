"""Training metrics: JSON lines + TensorBoard on process 0, step averaging, a console progress line.

`create_writer` returns a `clu.metric_writers` writer: on process 0 a MultiWriter of a JSON-lines
writer (`workdir/metrics.jsonl`, one object per logging step: {"step": 100, "loss": 0.81, ...})
and clu's TensorBoard SummaryWriter (`workdir/tensorboard`); elsewhere one that writes nothing.
The JSON-lines file is appended to; on resume, or on a restart from step 0 after a run that
saved no checkpoint, the trainer first drops the lines past the restored step (`truncate_after`)
and marks the restart for TensorBoard (`mark_restart`), so both read as one run. clu
imports TensorFlow, so it is imported only when a writer is made (the benchmark's import path
stays free of it).
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tensorboard"


def create_writer(workdir: str | os.PathLike, *, is_primary: bool = True):
    """The run's metric writer (clu interface: write_scalars, write_images, flush, close)."""
    from mixmae_jax.data import tf_setup  # noqa: F401  (TensorFlow set up before clu imports it)

    # isort: split
    from clu import metric_writers

    from mixmae_jax.train.jsonl_writer import JsonLinesWriter

    if not is_primary:
        return metric_writers.MultiWriter([])
    os.makedirs(workdir, exist_ok=True)
    return metric_writers.MultiWriter([
        JsonLinesWriter(os.path.join(workdir, JSONL_NAME)),
        metric_writers.SummaryWriter(os.path.join(workdir, TB_DIR)),
    ])


def mark_restart(workdir: str | os.PathLike, step: int) -> None:
    """Tells TensorBoard that the run restarts after `step`: an events file holding a SessionLog
    START at step + 1, named to sort after the earlier runs' files and before the resumed run's.
    TensorBoard's loader then drops the earlier events from step + 1 on (purge_orphaned_data),
    as the trainer drops those lines of metrics.jsonl."""
    from tensorboard.compat.proto import event_pb2

    from mixmae_jax.data.tf_setup import tf

    directory = os.path.join(workdir, TB_DIR)
    os.makedirs(directory, exist_ok=True)
    now = time.time()
    # The resumed run's writer names its file by the current second: one second earlier sorts
    # before it, and after the files of any run that logged a step.
    path = os.path.join(directory, f"events.out.tfevents.{int(now) - 1:010d}.restart-{step}.v2")
    start = event_pb2.Event(wall_time=now, step=step + 1, session_log=event_pb2.SessionLog(
        status=event_pb2.SessionLog.START))
    with tf.io.TFRecordWriter(path) as f:
        f.write(event_pb2.Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        # TensorBoard takes a run's first START as its beginning and each later one as a
        # restart: two, so the purge happens whether or not an earlier marker exists (a second
        # purge at the same step drops nothing more).
        f.write(start.SerializeToString())
        f.write(start.SerializeToString())


def has_events(workdir: str | os.PathLike) -> bool:
    """Whether an earlier run left TensorBoard events in the workdir."""
    directory = os.path.join(workdir, TB_DIR)
    return os.path.isdir(directory) and any(
        name.startswith("events.out.tfevents.") for name in os.listdir(directory))


def truncate_after(workdir: str | os.PathLike, step: int) -> int:
    """Drop the lines of metrics.jsonl past `step` (a resumed run logs those steps again, so the
    file reads as one run); a line cut short by a kill is dropped too. Returns how many."""
    path = os.path.join(workdir, JSONL_NAME)
    if not os.path.exists(path):
        return 0
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    keep = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass
    if len(keep) < len(lines):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in keep))
        os.replace(tmp, path)  # readers see the old file or the new one
    return len(lines) - len(keep)


class MetricAverager:
    """Means of per-step metrics between logging steps, without a host sync per step.

    `add` only queues device additions; `result` fetches the means once and resets.
    """

    def __init__(self):
        self._sums: dict[str, Any] = {}
        self._count = 0

    def add(self, metrics: Mapping[str, Any]) -> None:
        for k, v in metrics.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v
        self._count += 1

    def result(self) -> dict[str, float]:
        out = {k: float(np.asarray(v)) / self._count for k, v in self._sums.items()}
        self._sums, self._count = {}, 0
        return out


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _format_value(key: str, v: float) -> str:
    if key == "lr":
        return f"{v:.1e}"
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4f}"
    return f"{v:.3e}"  # also nan / inf


class ProgressLine:
    """One console line per logging step, e.g.

        step 120/1000 | loss 0.8123 | lr 1.2e-04 | 512.3 img/s | ETA 3m12s

    Throughput and ETA come from a moving average of the time per step between calls; the first
    call only starts the clock (it would otherwise count compilation).
    """

    def __init__(
        self,
        total_steps: int,
        batch_size: int,
        *,
        window: int = 20,
        print_fn: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._times: collections.deque[float] = collections.deque(maxlen=window)
        self._last: tuple[int, float] | None = None
        self._print = print_fn or (lambda s: print(s, flush=True))
        self._clock = clock

    def step_time(self) -> float | None:
        """Moving average of seconds per step, None before two calls."""
        return sum(self._times) / len(self._times) if self._times else None

    def update(self, step: int, scalars: Mapping[str, Any] = {}) -> str:  # noqa: B006 - read only
        now = self._clock()
        if self._last is not None and step > self._last[0]:
            self._times.append((now - self._last[1]) / (step - self._last[0]))
        self._last = (step, now)
        parts = [f"step {step}/{self.total_steps}"]
        parts += [f"{k} {_format_value(k, float(np.asarray(v)))}" for k, v in scalars.items()]
        dt = self.step_time()
        if dt is not None and dt > 0:
            parts.append(f"{self.batch_size / dt:.1f} img/s")
            parts.append(f"ETA {format_duration(max(self.total_steps - step, 0) * dt)}")
        line = " | ".join(parts)
        self._print(line)
        logging.debug(line)
        return line
