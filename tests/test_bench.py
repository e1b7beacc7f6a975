"""mixmae-bench prints a table and, last, one JSON object with the figures users rely on."""

import json
import os

import pytest

from mixmae_jax import bench

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


# Forward + backward (+ optimizer) FLOPs of each tiny recipe's step: XLA counts the unrolled
# blocks. MixMIM's tiny model: 1.1 GFLOP per step.
FLOPS_RANGE = {
    "mixmim_b.py:tiny": (0.5e9, 5e9),
    "mae_vit_b.py:tiny": (1e6, 5e9),
    "simmim_swin_b.py:tiny": (1e7, 5e9),
    "ummae_swin_t.py:tiny": (1e7, 5e9),
    "simmim_ummae_pvt_s.py:tiny": (1e7, 5e9),
    "mixedae_vit_b.py:tiny": (1e6, 5e9),
    "finetune_mixmim_b.py:tiny": (0.5e9, 5e9),  # the classifier step
}


# The recipes the whole bench runs for: a Swin and a ViT pretraining, and fine-tuning.
BENCHED = ("mixmim_b.py:tiny", "mae_vit_b.py:tiny", "finetune_mixmim_b.py:tiny")


@pytest.mark.slow
@pytest.mark.parametrize("config", BENCHED)
def test_bench_reports_mfu_and_flops(capsys, config):
    """A Swin and a ViT pretraining, and fine-tuning (synthetic labels), bench through the
    trainer's step (every method's step trains in test_methods.py; its FLOPs count is below)."""
    assert bench.main(["--config", os.path.join(CONFIGS, config), "--steps", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    for key in ("step_time_s", "images_per_sec", "flops_per_step", "tflops_per_sec", "mfu",
                "peak_flops", "peak_source", "peak_memory_bytes", "device", "method", "model"):
        assert key in result, key
    assert result["method"] == config.removeprefix("finetune_").split("_")[0]
    assert result["task"] == ("fine-tuning" if config.startswith("finetune") else "pretraining")
    lo, hi = FLOPS_RANGE[config]
    assert lo < result["flops_per_step"] < hi
    assert 0 < result["mfu"] < 1.5 and result["peak_flops"] > 1e9
    assert result["images_per_sec"] == result["batch"] / result["step_time_s"]


@pytest.mark.parametrize("config", sorted(set(FLOPS_RANGE) - set(BENCHED)))
def test_every_methods_step_has_its_model_flops(config):
    """The FLOPs the bench's MFU divides by (aot.model_flops: the step lowered unrolled, without
    remat, nothing compiled) for the methods the bench test above does not run."""
    from mixmae_jax import config as config_lib
    from mixmae_jax import tasks
    from mixmae_jax.train import aot

    c = config_lib.load_config(os.path.join(CONFIGS, config))
    lo, hi = FLOPS_RANGE[config]
    assert lo < aot.model_flops(c, tasks.for_config, c.batch_size) < hi


def test_bench_takes_and_names_config_overrides(capsys):
    demo = os.path.join(CONFIGS, "demo.py")
    assert bench.main(["--config", demo, "--config.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err


@pytest.mark.slow
def test_compilation_cache_makes_a_repeated_run_compile_nothing(tmp_path):
    """config.compilation_cache_dir: the first bench fills the cache, a second identical one
    (a fresh process) finds every compiled function there and adds no entry."""
    from jax_subprocess import run_python

    cache = tmp_path / "xla"
    script = """
        import sys
        from mixmae_jax import bench
        sys.exit(bench.main(sys.argv[1:]))
    """
    args = ("--config", os.path.join(CONFIGS, "mae_vit_b.py:tiny"), "--steps", "1",
            f"--config.compilation_cache_dir={cache}")
    run_python(script, *args)
    first = sorted(p.name for p in cache.iterdir())
    assert first, "nothing cached"
    run_python(script, *args)
    assert sorted(p.name for p in cache.iterdir()) == first
