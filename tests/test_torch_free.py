"""Torch only at the edge: the console path a JAX-only machine runs -- pretrain, fine-tune from
that workdir, k-NN, linear probe, visualize -- in a process where `import torch` fails, and
every method's fine-tuning start (native load, layer decay on the official names, the derived
official layout). Any attempt to import torch on that path fails the test, even one caught by
the code that made it."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Installed first on sys.meta_path by `sitecustomize` (imported at start-up from PYTHONPATH):
# every import of torch or a torch submodule is recorded with its stack, then refused.
BLOCKER = '''
import os, sys, traceback

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            with open(os.environ["TORCH_IMPORT_LOG"], "a") as log:
                log.write(f"import {name}\\n{''.join(traceback.format_stack())}\\n")
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

sys.meta_path.insert(0, NoTorch())
'''

# Every method's fine-tuning start (the digits models), in one torch-blocked process.
EVERY_METHOD = '''
import sys
import numpy as np
from flax import nnx
from mixmae_jax.config import load_config
from mixmae_jax.interop import layout_for
from mixmae_jax.tasks.layer_decay import lr_scales
from mixmae_jax.methods import get_method
from mixmae_jax.models import get_model_module
from mixmae_jax.train import step as step_lib

for name in ("mixmim", "mae", "mixedae", "ummae", "simmim"):
    pre = load_config(f"configs/digits.py:method={name}")
    ft = load_config(f"configs/digits.py:method={name},finetune")
    method, ft_method = get_method(pre), get_method(ft)
    _, src = step_lib.graphdef_and_abstract_params(method)
    _, tgt = step_lib.graphdef_and_abstract_params(
        ft_method, lambda rngs: ft_method.build_classifier(10, rngs))
    zeros = lambda tree: {k: zeros(v) if isinstance(v, dict) else np.zeros(v.shape, v.dtype)
                          for k, v in tree.items()}
    params, report = get_model_module(ft.model.name).load(zeros(src), pre.model, zeros(tgt),
                                                          ft.model)
    scales = lr_scales(tgt, layout_for(ft_method.config), ft_method.layer_decay_rule,
                       ft.optim.layer_decay)
    sizes = [len(layout_for(method.config).reference_layout(fmt, 10))
             for fmt in ("pretrain", "finetune")]
    print(name, len(report.loaded), "loaded,", sizes, "official keys")
assert "torch" not in sys.modules
print("every method: no torch")
'''


def _env(tmp_path):
    blocker = tmp_path / "no_torch"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(BLOCKER)
    log = tmp_path / "torch_imports.log"
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(blocker), ROOT]), TORCH_IMPORT_LOG=str(log),
               # what the tools' huge-page re-exec would set: run them in this very process
               GLIBC_TUNABLES="glibc.malloc.hugetlb=1")
    return env, log


def _run(env, log, code, *args, timeout=900):
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    attempts = log.read_text() if log.exists() else ""
    assert not attempts, f"torch imported by {args[:1] or code[:60]!r}:\n{attempts[-4000:]}"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc.stdout


EVERY_MODULE = '''
import importlib, pkgutil, sys
import mixmae_jax
from mixmae_jax.interop import layout_for

# torch is imported by the two modules that make and read torch tensors, and nowhere else
EDGE = {"mixmae_jax.interop.to_torch", "mixmae_jax.interop.from_torch"}
names = [m.name for m in pkgutil.walk_packages(mixmae_jax.__path__, "mixmae_jax.")]
for name in names:
    if name not in EDGE:
        importlib.import_module(name)
assert "torch" not in sys.modules
# the PyTorch formats' libraries load only where a conversion uses them
assert not {"safetensors", "transformers", "timm"} & set(sys.modules), sys.modules.keys()
# TensorFlow loads through data/tf_setup.py, which keeps Keras from importing scikit-learn
# (~1 s of every tool's start); the digits build imports it when it needs it
assert "tensorflow" in sys.modules and "sklearn" not in sys.modules
print(len(names) - len(EDGE), "modules")
'''


@pytest.mark.slow
def test_no_module_but_the_torch_edge_imports_torch(tmp_path):
    env, log = _env(tmp_path)
    out = _run(env, log, EVERY_MODULE)
    assert int(out.split()[0]) > 50


# The console path, one tool after another in one torch-blocked process (as the console scripts
# call them, with argv): the process start is paid once. Each tool's output follows a marker.
TOOLS = '''
import json, sys
from mixmae_jax import cli

for main, argv in json.loads(sys.argv[1]):
    print(f"==== {main}", flush=True)
    try:
        getattr(cli, main)(argv)
    except SystemExit as e:
        if e.code:
            sys.exit(f"{main} {argv} exited with {e.code}")
''' + EVERY_METHOD


@pytest.mark.slow
def test_pretrain_finetune_evaluate_and_visualize_without_torch(tmp_path):
    env, log = _env(tmp_path)
    # The blocker works: importing torch fails there, and is recorded.
    proc = subprocess.run([sys.executable, "-c", "import torch"], env=env, cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr
    assert log.read_text().startswith("import torch\n")
    log.unlink()

    pre, ft = str(tmp_path / "pre"), str(tmp_path / "ft")
    small = ["--config.total_steps=2", "--config.batch_size=16", "--config.log_every=1",
             "--config.model.depths=(1,1)"]  # digits.py's Swin, one block a stage
    rng = np.random.default_rng(0)
    images = []
    for i in range(2):
        images.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(images[-1])
    tools = [
        ("pretrain_main", ["--config", "configs/digits.py", "--workdir", pre, *small,
                           "--config.evals.knn.every_steps=0"]),
        ("finetune_main", ["--config", "configs/digits.py:finetune", "--workdir", ft,
                           "--init", pre, *small]),
        ("eval_main", ["knn", "--workdir", pre, "--data", "digits"]),
        ("eval_main", ["linprobe", "--workdir", pre, "--data", "digits", "--epochs", "1",
                       "--warmup-epochs", "0"]),
        ("visualize_main", ["--workdir", pre, "--images", *images, "--out",
                            str(tmp_path / "grid.png")]),
    ]
    out = _run(env, log, TOOLS, json.dumps(tools))
    pretrain, finetune, knn, linprobe, visualize = out.split("==== ")[1:]
    assert "steps 0 -> 2" in pretrain
    assert f"Initialised from mixmim pretraining step 2 of {pre}" in finetune
    assert "eval step 2: top-1" in finetune
    assert "knn (mixmim, step 2, mixmae_digits train -> test" in knn
    assert "linprobe (mixmim, step 2" in linprobe
    assert "loss: " in visualize and (tmp_path / "grid.png").stat().st_size > 0
    assert out.strip().endswith("every method: no torch")
