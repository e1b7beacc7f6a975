"""Metric writing (JSON lines, TensorBoard, process 0 only), step averaging, the progress line."""

import json
import os

import jax.numpy as jnp
import numpy as np

from mixmae_jax.train import metrics


def _lines(workdir):
    with open(os.path.join(workdir, metrics.JSONL_NAME)) as f:
        return [json.loads(line) for line in f]


def test_json_lines_and_tensorboard(tmp_path):
    w = metrics.create_writer(tmp_path)
    w.write_scalars(10, {"loss": jnp.float32(0.5), "lr": 1e-4})
    w.write_scalars(20, {"loss": np.float64(0.25)})
    w.write_images(20, {"recon": np.zeros((8, 8, 3), np.uint8)})
    w.close()
    assert _lines(tmp_path) == [{"step": 10, "loss": 0.5, "lr": 1e-4}, {"step": 20, "loss": 0.25}]
    events = os.listdir(tmp_path / metrics.TB_DIR)
    assert any(f.startswith("events.out.tfevents") for f in events)

    again = metrics.create_writer(tmp_path)  # a resumed run appends
    again.write_scalars(30, {"loss": 0.125})
    again.close()
    assert [r["step"] for r in _lines(tmp_path)] == [10, 20, 30]


def test_other_processes_write_nothing(tmp_path):
    w = metrics.create_writer(tmp_path / "w", is_primary=False)
    w.write_scalars(1, {"loss": 1.0})
    w.write_images(1, {"x": np.zeros((2, 2, 3), np.uint8)})
    w.flush()
    w.close()
    assert not os.path.exists(tmp_path / "w")


def test_averager_means_between_logging_steps():
    avg = metrics.MetricAverager()
    for loss in (1.0, 2.0, 6.0):
        avg.add({"loss": jnp.float32(loss), "grad_norm": jnp.float32(2 * loss)})
    assert avg.result() == {"loss": 3.0, "grad_norm": 6.0}
    avg.add({"loss": jnp.float32(5.0)})
    assert avg.result() == {"loss": 5.0}


def test_progress_line():
    now = [100.0]
    printed = []
    line = metrics.ProgressLine(1000, 512, print_fn=printed.append, clock=lambda: now[0])
    first = line.update(100, {"loss": 0.91234})
    assert first == "step 100/1000 | loss 0.9123"  # the first call only starts the clock
    now[0] += 20.0  # 20 steps in 20 s (compilation excluded)
    out = line.update(120, {"loss": jnp.float32(0.8123), "lr": 1.2e-4})
    assert out == "step 120/1000 | loss 0.8123 | lr 1.2e-04 | 512.0 img/s | ETA 14m40s"
    assert printed == [first, out]
    now[0] += 10.0  # twice as fast: the moving average moves half way
    assert line.update(140).endswith("| 682.7 img/s | ETA 10m45s")
    assert metrics.format_duration(3 * 3600 + 125) == "3h02m"
    assert metrics.format_duration(42) == "42s"
