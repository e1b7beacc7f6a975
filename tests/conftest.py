"""Test-wide settings: CPU only, quiet TensorFlow, one compilation cache, repository root
importable."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# One persistent compilation cache for the session, its subprocesses included (they inherit the
# environment): the suite compiles the same programs many times (each training run of a tiny
# recipe, each tool run), and XLA's compiled binary for the same program, options and flags is
# the same, so only the first compile of each costs (a repeated tiny training run: 12 -> 3 s of
# CPU). A fresh directory per session; a run's own `compilation_cache_dir` still wins.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="mixmae-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_cache,
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

# Compile for speed of compiling: the suite runs its tiny programs a few steps each, so XLA's
# time is in the compile (a tiny UM-MAE step: 18 s -> 8 s, MAE: 9 s -> 2 s) and not in the run
# (32 -> 116 ms a step). LLVM at -O0 and XLA:CPU's older elemental emitters only reorder float
# arithmetic, which every tolerance of the suite is derived to allow; a bit-exact comparison is
# always between two runs under the same flags (subprocesses inherit them). Tools run outside
# the suite keep XLA's defaults; TEST_XLA_DEFAULTS=1 runs the suite with them.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
if not os.environ.get("TEST_XLA_DEFAULTS"):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE_FLAGS).strip()

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module of tiny models: on a busy 2-core machine the OpenMP
    hand-offs made each op ~10 ms; the thread count is restored afterwards."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# The longest files first (CPU seconds on the 2-core machine, 2026-12-04: 210 down to 10), so
# that `make test`'s two workers (`--dist loadfile --no-loadscope-reorder`: a worker takes the
# next file in collection order when it is almost done) end together instead of one running the
# last long file alone. (Without --no-loadscope-reorder, xdist orders files by their number of
# tests.) Only the order changes; a file not listed keeps its place after these.
_LONGEST_FIRST = ("test_train.py", "test_aot.py", "test_methods.py", "test_ummae.py",
                  "test_finetune.py", "test_distributed.py", "test_bench.py", "test_mixmim.py",
                  "test_torch_free.py", "test_interop.py", "test_gpu_check.py", "test_data.py",
                  "test_simmim.py", "test_cli.py", "test_models.py", "test_mae.py",
                  "test_knn.py", "test_targets.py", "test_digits_experiment.py",
                  "test_mixedae.py", "test_checkpoint.py", "test_eval_pipeline.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
