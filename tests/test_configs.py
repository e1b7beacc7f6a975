"""configs/ and its loader: every recipe and variant loads and validates; the shared pieces
(configs/common.py) are the only way recipes shrink, shard and fine-tune; the package is found
however the path is written; a bad config or variant is one line naming it."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
from recipes import CONFIGS, REPO, load

from configs import common
from mixmae_jax import config as config_lib
from mixmae_jax.config import ConfigError, parse_arg
from mixmae_jax.models import pvt
from mixmae_jax.train import sharding
from mixmae_jax.train.checkpoint import config_to_dict

# Every config file and the variants it documents.
VARIANTS = {
    "demo.py": ["", "mae", "simmim", "ummae", "mixedae", "finetune", "mae,finetune",
                "simmim,finetune", "ummae,finetune", "mixedae,finetune"],
    "digits.py": ["", "toy", "seed=3"] + [f"method={m}{ft}" for m in
                                          ("mixmim", "mae", "mixedae", "ummae", "simmim")
                                          for ft in ("", ",finetune", ",finetune,labels=10")],
    "mixmim_b.py": ["", "tiny", "res=384"],
    "mixmim_l.py": ["", "tiny", "res=384"],
    "mixmim_h.py": ["", "tiny"],
    "mae_vit_b.py": ["", "tiny"],
    "mae_vit_l.py": ["", "tiny"],
    "mae_vit_h.py": ["", "tiny"],
    "mixedae_vit_b.py": ["", "tiny", "naive"],
    "mixedae_vit_l.py": ["", "tiny", "naive"],
    "simmim_swin_b.py": ["", "tiny"],
    "simmim_swin_l.py": ["", "tiny"],
    "ummae_swin_t.py": ["", "tiny"],
    "ummae_swin_l.py": ["", "tiny"],
    "ummae_pvt_s.py": ["", "tiny"],
    "ummae_vit_b.py": ["", "tiny"],
    "simmim_ummae_swin_t.py": ["", "tiny"],
    "simmim_ummae_pvt_s.py": ["", "tiny"],
    "finetune_mixmim_b.py": ["", "tiny", "res=384"],
    "finetune_mae_vit_b.py": ["", "tiny"],
    "finetune_simmim_swin_b.py": ["", "tiny"],
    "finetune_ummae_swin_t.py": ["", "tiny"],
    "finetune_ummae_pvt_s.py": ["", "tiny"],
}
RECIPES = sorted(f for f in os.listdir(CONFIGS)
                 if f.endswith(".py") and f not in ("__init__.py", "common.py"))
SHIPPED = [(name, arg) for name, args in VARIANTS.items() for arg in args]


@pytest.fixture(scope="module")
def shipped():
    """{(file, variant): config} of every shipped variant."""
    return {(name, arg): load(name, arg or None) for name, arg in SHIPPED}


def _validate(c):
    from mixmae_jax.tasks import finetune

    if c.get("task") == "finetune":
        finetune.validate(c)
    else:
        config_lib.validate(c)


def test_every_recipe_and_variant_loads_and_validates(shipped):
    assert sorted(VARIANTS) == RECIPES  # a new config file lists its variants here
    for key, c in shipped.items():
        try:
            _validate(c)
        except ConfigError as e:
            raise AssertionError(f"{key}: {e}") from e


def test_the_mixmim_recipe_holds_the_official_values():
    b = load("mixmim_b.py")
    # The official recipe (shared/reference/mixmim.md §5.1: main_pretrain.py and its script).
    assert (b.batch_size, b.epochs, b.optim.warmup_epochs, b.optim.base_lr,
            b.method.mask_ratio) == (2048, 600, 40, 1.5e-4, 0.5)
    assert (b.optim.b1, b.optim.b2, b.optim.eps, b.optim.weight_decay, b.optim.min_lr,
            b.optim.clip_grad_norm) == (0.9, 0.95, 1e-8, 0.05, 0, 0)
    assert tuple(b.data.crop_scale) == (0.2, 1.0) and b.data.hflip and b.method.norm_pix_loss
    assert tuple(b.model.window_sizes) == (14, 14, 14, 7)
    assert tuple(load("mixmim_b.py", "res=384").model.window_sizes) == (16, 16, 24, 12)


def test_every_recipe_starts_with_the_command_that_runs_it():
    for name in RECIPES:
        with open(os.path.join(CONFIGS, name)) as f:
            doc = f.read().split('"""')[1]
        tool = "mixmae-finetune" if load(name).get("task") == "finetune" else "mixmae-pretrain"
        assert re.search(rf"{tool} --config configs/{name}\b", doc), name


def test_tiny_variants_are_the_recipe_in_small(shipped):
    """Every `:tiny` is its recipe with the same keys, model, method and sharding, shrunk to
    <= 64 px and run for 4 steps of batch 8 on data in the package (no download)."""
    for (name, arg), c in shipped.items():
        if arg != "tiny":
            continue
        full = shipped[(name, "")]
        assert set(config_to_flat(c)) == set(config_to_flat(full)), name
        assert (c.model.name, c.model.variant, c.method.name, c.sharding_rules) == (
            full.model.name, full.model.variant, full.method.name, full.sharding_rules), name
        assert c.data.image_size == c.model.img_size <= 64, name
        assert (c.batch_size, c.total_steps, c.optim.warmup_steps) == (8, 4, 0), name
        finetuning = c.get("task") == "finetune"
        assert c.data.source == ("digits" if finetuning else "embedded"), name


def config_to_flat(c):
    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"
    return list(walk(c.to_dict()))


def test_each_small_size_is_written_once_and_used(shipped):
    """Every SIZES entry is the model of a shipped variant (none dead, none missing), with the
    entry's values (UM-MAE's window halved on its compact pretraining grid)."""
    used = {size: set() for size in common.SIZES}
    for (name, arg), c in shipped.items():
        size = ("tiny" if arg == "tiny" else "demo" if name == "demo.py"
                else "toy" if arg == "toy" else "digits" if name == "digits.py" else None)
        if size is None:
            continue
        family = common.family(c)
        used[size].add(family)
        entry = common.SIZES[size][family]
        compact = c.method.name == "ummae" and c.get("task") != "finetune"
        for key, value in entry.items():
            want = value // 2 if key == "window_size" and compact else value
            got = c.model[key]
            assert (tuple(got) if isinstance(got, tuple | list) else got) == want, (name, arg,
                                                                                    key)
    assert used == {size: set(families) for size, families in common.SIZES.items()}


def test_shrink_derives_geometry_by_the_recipes_own_rules(shipped):
    """The rules `shrink` applies to small models hold for the official recipes too: SimMIM's
    mask squares are the final stride (32 at 4 stages of 4-px patches) or UM-MAE's unit (16);
    UM-MAE's compact-grid PVT halves the full grid's sr ratios, its Swin the window."""
    assert pvt.SR_COMPACT == tuple(max(r // 2, 1) for r in pvt.SR_FULL)
    assert (load("ummae_swin_t.py").model.window_size * 2
            == load("simmim_ummae_swin_t.py").model.window_size
            == load("finetune_ummae_swin_t.py").model.window_size == 16)
    simmim = [c for c in shipped.values() if c.method.name == "simmim"]
    assert {c.method.mask_patch_size for c in simmim} == {32, 16, 8}
    for c in simmim:
        m = c.model
        stride = m.patch_size * 2 ** (len(m.depths) - 1)
        assert c.method.mask_patch_size == (m.unit_size if "unit_size" in m else stride)


def test_fsdp_rules_for_the_l_and_h_models_only(shipped):
    fsdp = sharding.expand_rules(common.FSDP_RULES)
    assert fsdp == tuple((r[0], "fsdp", *r[2:]) for r in sharding.FSDP_RULES)
    for key, c in shipped.items():
        large = c.model.variant in ("L", "H")
        assert tuple(map(tuple, c.sharding_rules)) == (common.FSDP_RULES if large else ()), key
    assert {c.model.variant for c in shipped.values() if c.sharding_rules} == {"L", "H"}


def test_every_schedule_is_in_epochs_or_in_steps(shipped):
    """The recipes count epochs, as their official scripts do; the CPU runs (tiny, demo, digits
    pretraining) count steps. Either way the other unit is off: no recipe's 600 epochs linger in
    a 600-step demo (where `--config.total_steps=0` would have run them)."""
    units = {}
    for (name, arg), c in shipped.items():
        o = c.optim
        if c.total_steps > 0:
            assert c.epochs == 0 and o.warmup_epochs == 0 and o.warmup_steps >= 0, (name, arg)
        else:
            assert c.epochs > 0 and o.warmup_epochs >= 0 and o.warmup_steps == -1, (name, arg)
        units[(name, arg)] = "steps" if c.total_steps > 0 else "epochs"
    assert {k for k, unit in units.items() if unit == "steps"} == {
        k for k in units if k[1] in ("tiny", "toy") or k[0] == "demo.py"
        or (k[0] == "digits.py" and "finetune" not in k[1])}
    with pytest.raises(ConfigError, match="in epochs or in steps"):
        common.schedule(load("demo.py"), epochs=1, steps=1)


def test_shrink_refuses_a_size_it_does_not_have():
    with pytest.raises(ConfigError, match=r"no toy size of a vit model \(toy sizes: swin/mixmim"):
        common.shrink(load("mae_vit_b.py"), "toy")
    with pytest.raises(ConfigError, match="unknown size 'huge'"):
        common.shrink(load("mae_vit_b.py"), "huge")


# -- the loader -------------------------------------------------------------------------------


def test_configs_load_from_any_working_directory(tmp_path):
    """As a console tool runs: the repository is not on sys.path (the editable install maps
    mixmae_jax only) and the working directory is elsewhere. An absolute path, a relative one
    and a path through `..` give the configs loaded here, and `configs` is this checkout's."""
    site, cwd = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir()
    cwd.mkdir()
    (site / "mixmae_jax").symlink_to(os.path.join(REPO, "mixmae_jax"))
    specs = [os.path.join(CONFIGS, "finetune_mixmim_b.py:tiny"),
             os.path.relpath(os.path.join(CONFIGS, "digits.py"), cwd) + ":method=ummae",
             os.path.join(REPO, "tests", "..", "configs", "demo.py") + ":simmim"]
    code = textwrap.dedent(f"""
        import importlib.util, json, sys
        assert importlib.util.find_spec("configs") is None
        from mixmae_jax.config import load_config
        from mixmae_jax.train.checkpoint import config_to_dict
        out = [config_to_dict(load_config(s)) for s in {specs!r}]
        print(json.dumps([sys.modules["configs"].__file__, out]))
    """)
    env = dict(os.environ, PYTHONPATH=str(site), JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    package, got = json.loads(run.stdout.strip().splitlines()[-1])
    assert os.path.realpath(package) == os.path.realpath(os.path.join(CONFIGS, "__init__.py"))
    assert got == [config_to_dict(load("finetune_mixmim_b.py", "tiny")),
                   config_to_dict(load("digits.py", "method=ummae")),
                   config_to_dict(load("demo.py", "simmim"))]


def _one_line_error(spec, match):
    with pytest.raises(ConfigError) as e:
        config_lib.load_config(spec)
    message = str(e.value)
    assert "\n" not in message and re.search(match, message), message
    return message


def test_unknown_variants_are_named_with_the_known_ones():
    _one_line_error(f"{CONFIGS}/mixmim_b.py:tyni",
                    r"^--config: .*mixmim_b.py:tyni: unknown variant 'tyni' "
                    r"\(known: tiny, res=224\|384\)$")
    _one_line_error(f"{CONFIGS}/mixmim_b.py:res=512", r"variant 'res=512': res is one of 224\|384")
    _one_line_error(f"{CONFIGS}/mixmim_b.py:tiny,res=384", "tiny is its own geometry")
    _one_line_error(f"{CONFIGS}/demo.py:foo", r"unknown variant 'foo' \(known: mixmim, mae, "
                    "simmim, ummae, mixedae, finetune\\)")
    _one_line_error(f"{CONFIGS}/demo.py:mae,simmim", r"one method per run \(got mae, simmim\)")
    _one_line_error(f"{CONFIGS}/digits.py:method=foo",
                    r"method is one of mixmim\|mae\|mixedae\|ummae\|simmim")
    _one_line_error(f"{CONFIGS}/digits.py:seed=x", r"variant 'seed=x': seed is <int>")
    _one_line_error(f"{CONFIGS}/digits.py:method", r"variant 'method' takes a value: method=")
    _one_line_error(f"{CONFIGS}/finetune_mae_vit_b.py:res=384", r"\(known: tiny\)$")


def test_a_bad_config_file_is_one_line_naming_it(tmp_path):
    _one_line_error(CONFIGS, r"^--config: '.*configs' is a directory; name a config file in it")
    _one_line_error(os.path.join(REPO, "README.md"), r"README.md' is not a config file")
    _one_line_error(str(tmp_path / "nope.py"), r"^--config: no such file")
    cases = {
        "syntax.py": ("def get_config(arg=None):\n    return (\n", r"syntax.py:\d+: "),
        "empty.py": ("X = 1\n", r"empty.py defines no get_config"),
        "raises.py": ("def get_config(arg=None):\n    return {}['model']\n",
                      r"raises.py: get_config raised KeyError: 'model'"),
        "returns.py": ("def get_config(arg=None):\n    return {}\n",
                       r"returns.py: get_config returned dict, not a ConfigDict"),
        "imports.py": ("from configs import nope\n", r"imports.py: ImportError: cannot import"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        _one_line_error(str(tmp_path / name), match)


def test_a_second_copy_of_the_package_is_refused(tmp_path, monkeypatch):
    """`configs` of one checkout per process: a copy elsewhere would import the first copy's
    recipes under its name, so it is refused, naming both."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    shutil.copytree(CONFIGS, tmp_path / "configs")
    _one_line_error(str(tmp_path / "configs" / "demo.py"),
                    r"finds .*configs/demo.py: another 'configs' package is already imported")


def test_parse_arg_types_choices_and_flags():
    opts = dict(tiny=False, res=(224, 384), seed=0, lr=1.0, name="a")
    assert parse_arg(None, **opts) == dict(tiny=False, res=224, seed=0, lr=1.0, name="a")
    assert parse_arg("tiny,res=384,seed=3,lr=0.5,name=b", **opts) == dict(
        tiny=True, res=384, seed=3, lr=0.5, name="b")
    assert parse_arg("tiny=false", **opts)["tiny"] is False
    assert parse_arg("tiny=1", **opts)["tiny"] is True
    with pytest.raises(ConfigError, match=r"unknown variant 'big' \(known: tiny, res=224\|384, "
                       r"seed=<int>, lr=<float>, name=<str>\)"):
        parse_arg("big", **opts)


def test_a_run_of_no_length_names_the_run_length_key():
    """`--config.total_steps=0` on a step-counted recipe (the demo) is refused naming
    total_steps, not read as its epochs' length."""
    with pytest.raises(ConfigError, match=r"^total_steps: 0 with epochs 0\.0: the run's length "
                       r"is total_steps \(> 0, in steps\)"):
        config_lib.validate(load("demo.py", None, ["--config.total_steps=0"]))


def test_tilde_in_path_keys_is_the_home_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    c = load("demo.py", None, ["--config.data.folder=~/photos", "--config.data.data_dir=~/tfds",
                               "--config.compilation_cache_dir=~/cache"])
    assert (c.data.folder, c.data.data_dir, c.compilation_cache_dir) == (
        f"{tmp_path}/photos", f"{tmp_path}/tfds", f"{tmp_path}/cache")
