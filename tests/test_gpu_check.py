"""The accelerator check (mixmae_jax/gpu_check.py, launch/gpu_check.sh) exercised on the CPU:
parity against references catches a wrong gradient, the bench halves its batch on
out-of-memory and keeps to its budget, and the whole check runs without TensorFlow or torch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mixmae_jax import gpu_check

ROOT = Path(__file__).resolve().parents[1]

# Packages the GPU image lacks: not found at all (find_spec gives None), as there.
ABSENT_SITE = '''
import sys
from importlib.machinery import PathFinder

class _WithoutAbsent(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "tensorflow_datasets", "clu", "torch"):
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [_WithoutAbsent if f is PathFinder else f for f in sys.meta_path]
'''


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("refs") / "refs.npz")
    gpu_check.make_refs(path, cases=("mae_vit_b.py:tiny",))
    return path


@pytest.mark.slow
def test_parity_passes_its_own_references_and_names_a_wrong_gradient(refs, tmp_path):
    (row,) = gpu_check.parity(refs)
    assert row["ok"] and row["gradients"] == 48
    # the same backend: only XLA's own run-to-run (here none) differences
    assert row["loss_rel_err"] <= 1e-7 and row["worst_grad_rel_err"] <= 1e-6
    data = dict(np.load(refs))
    key = "mae_vit_b.py:tiny|grads|encoder.blocks.1.mlp.fc1.kernel"
    data[key] = data[key] * (1 + 1e-3)  # a gradient 0.1% off
    bad = str(tmp_path / "bad.npz")
    np.savez(bad, **data)
    (row,) = gpu_check.parity(bad)
    assert not row["ok"] and row["worst_grad"] == key.split("|")[-1]
    assert row["worst_grad_rel_err"] == pytest.approx(1e-3 / (1 + 1e-3), rel=1e-3)


def test_bench_halves_on_out_of_memory_and_keeps_to_its_budget(tmp_path, monkeypatch):
    calls = []

    def fake_bench(spec, dtype, batch, steps):
        calls.append((spec, dtype, batch))
        if batch > 32:
            raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
        return dict(step_time_s=0.5, images_per_sec=batch / 0.5, mfu=0.4, compile_s=3.0,
                    peak_memory_bytes=2e9, config="overwritten")

    clock = iter(range(0, 1000, 10))  # 10 s per reading: the float32 MAE run starts at 170 s
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: next(clock))
    rows = gpu_check.run_bench(str(tmp_path), ["mixmim_b.py", "mae_vit_b.py"],
                               ("bfloat16", "float32"), budget_s=125, bench_one=fake_bench)
    assert [(r["config"], r["dtype"], r["batch"]) for r in rows] == [
        ("mixmim_b.py", "bfloat16", 32), ("mae_vit_b.py", "bfloat16", 32),
        ("mixmim_b.py", "float32", 32), ("mae_vit_b.py", "float32", 256)]
    assert calls[:3] == [("mixmim_b.py", "bfloat16", 128), ("mixmim_b.py", "bfloat16", 64),
                         ("mixmim_b.py", "bfloat16", 32)]
    assert "error" not in rows[2] and rows[3]["error"].startswith("skipped: past the 125 s")
    md = (tmp_path / "gpu_bench.md").read_text().splitlines()
    assert md[2] == "| mixmim_b.py | bfloat16 | 32 | 0.5000 | 64.0 | 40.0% | 2.00 | 3.0 |"
    assert json.loads((tmp_path / "gpu_bench.json").read_text())[0]["config"] == "mixmim_b.py"


def test_fit_keeps_each_fitted_batch_rounded_down_and_the_bench_uses_it(tmp_path):
    """`fit` asks `mixmae-bench --topology KIND:1 --fit` per config and dtype and keeps the
    largest fitting batch rounded down to a multiple of 8; `run_bench` starts there."""
    asked = []

    def fake_main(argv):
        asked.append(argv)
        spec = os.path.basename(argv[argv.index("--config") + 1])
        found = {"mixmim_b.py": 45, "mae_vit_b.py": 6}.get(spec)
        return (0, ["table", json.dumps({"fit_global_batch": found})]) if found else (
            2, ["error: batch_size: ..."])

    out = str(tmp_path / "batches.json")
    got = gpu_check.fit("h200", out, ["mixmim_b.py", "mae_vit_b.py", "simmim_swin_b.py"],
                        ("bfloat16",), run_bench_main=fake_main)
    assert got == {"mixmim_b.py|bfloat16": 40, "mae_vit_b.py|bfloat16": 6}
    assert json.loads(Path(out).read_text()) == got
    assert all(a[a.index("--topology") + 1] == "h200:1" and "--fit" in a for a in asked)
    calls = []

    def fake_bench(spec, dtype, batch, steps):
        calls.append((spec, batch))
        return dict(step_time_s=1.0, images_per_sec=batch, mfu=0.5, compile_s=1.0)

    gpu_check.run_bench(str(tmp_path), ["mixmim_b.py", "simmim_swin_b.py"], ("bfloat16",),
                        bench_one=fake_bench, batches=got)
    assert calls == [("mixmim_b.py", 40), ("simmim_swin_b.py", 128)]  # else its start


@pytest.mark.slow
def test_the_whole_check_runs_without_tensorflow_or_torch(refs, tmp_path):
    """launch/gpu_check.sh check on the CPU, the GPU image faked: nvidia-smi on PATH, TF, tfds,
    clu and torch unfindable; a small bench. Every part passes and gpu_check.json says so."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 'NVIDIA H200 (fake)'\n")
    (fake / "nvidia-smi").chmod(0o755)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(ABSENT_SITE)
    carry = tmp_path / "carry"
    carry.mkdir()
    os.symlink(refs, carry / "refs.npz")
    out = tmp_path / "out"
    env = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(site),
               CARRY=str(carry), OUT=str(out), PYTHON=sys.executable, JAX_PLATFORMS="cpu",
               BENCH_CONFIGS="mae_vit_b.py:tiny", BENCH_DTYPES="bfloat16 float32",
               BENCH_STEPS="1")
    proc = subprocess.run(["bash", str(ROOT / "launch" / "gpu_check.sh")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["ok"] and result["device"].startswith("NVIDIA H200 (fake)")
    assert result["smoke"]["ok"] and result["smoke"]["step"] == 2
    assert [r["dtype"] for r in result["bench"]] == ["bfloat16", "float32"]
    assert (out / "gpu_bench.md").read_text().count("| mae_vit_b.py:tiny |") == 2
