"""Training metrics: JSON lines + TensorBoard on process 0, step averaging, a console progress line.

`workdir/metrics.jsonl` gets one object per logging step ({"step": 100, "loss": 0.81, ...}); it
is appended to, so after a resume the steps between the last checkpoint and the interruption
appear twice (readers keep the last occurrence). TensorBoard events go to `workdir/tensorboard`
through `clu.metric_writers`, imported lazily because it imports TensorFlow.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

JSONL_NAME = "metrics.jsonl"
TB_DIR = "tensorboard"


class MetricWriter:
    """Writes scalars (JSON lines + TensorBoard) and images (TensorBoard) from process 0 only."""

    def __init__(self, workdir: str | os.PathLike, *, is_primary: bool = True):
        self._enabled = is_primary
        self._tb = None
        self._jsonl = None
        if not is_primary:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, JSONL_NAME), "a", encoding="utf-8")
        try:
            from clu import metric_writers  # imports TensorFlow: only here, only on process 0
        except Exception as e:  # noqa: BLE001 - any import failure just disables TensorBoard
            warnings.warn(
                f"TensorBoard logging disabled ({e!r}); metrics go to {JSONL_NAME} only",
                stacklevel=2,
            )
        else:
            self._tb = metric_writers.SummaryWriter(os.path.join(workdir, TB_DIR))

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        if not self._enabled:
            return
        values = {k: float(np.asarray(v)) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write_scalars(int(step), values)

    def write_image(self, step: int, name: str, image: np.ndarray) -> None:
        """A uint8 [H, W, C] image (or [N, H, W, C] batch) to TensorBoard."""
        if self._enabled and self._tb is not None:
            self._tb.write_images(int(step), {name: np.asarray(image)})

    def flush(self) -> None:
        if not self._enabled:
            return
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if not self._enabled:
            return
        self.flush()
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        self._enabled = False


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
