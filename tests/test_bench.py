"""mixmae-bench prints a table and, last, one JSON object with the figures users rely on."""

import json
import os

from mixmae_jax import bench

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_bench_reports_mfu_and_flops(capsys):
    config = os.path.join(CONFIGS, "mixmim_b.py") + ":tiny"
    assert bench.main(["--config", config, "--steps", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in ("step_time_s", "images_per_sec", "flops_per_step", "tflops_per_sec", "mfu",
                "peak_flops", "peak_source", "peak_memory_bytes", "device"):
        assert key in result, key
    # Forward + backward of a 1.1 GFLOP-per-step tiny model: XLA counts the unrolled blocks.
    assert 0.5e9 < result["flops_per_step"] < 5e9
    assert 0 < result["mfu"] < 1.5 and result["peak_flops"] > 1e9
    assert result["images_per_sec"] == result["batch"] / result["step_time_s"]


def test_bench_takes_and_names_config_overrides(capsys):
    demo = os.path.join(CONFIGS, "demo.py")
    assert bench.main(["--config", demo, "--config.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().out
