"""The method contract (methods/base.py), checked once for every method of `methods.NAMES` on its
tiny recipe (tests/recipes.py; the conversion checks also on the other backbones a method runs):

* PyTorch interop: a random official state_dict imports and exports back bit for bit (keys,
  order, dtypes, values), pretraining and fine-tuning layouts; an export loads strictly into the
  plain torch reference; a checkpoint of another shape is refused naming each key;
* config: a method refuses a model family it does not run, naming the key;
* mixmae-visualize: a mask file in the official convention gives back the plan, a file that does
  not fit is refused naming --mask and the file; `panels` shows the training loss;
* frozen features: one finite vector per image, that depends on the image;
* training (slow): two steps give finite losses and move the params; a run killed during step 4
  and resumed from step 2 equals the straight run bit for bit (params and logged losses), and
  mixmae-visualize on it prints the loss the method trains on.

What is particular to a method (parity with its reference, its invariants, its recipe) is in the
test file of its module (test_mixmim.py, test_mae.py, ...). The collectives rule of every method's
compiled step is in test_aot.py.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
import torch
from parity import (
    FAST_COMPILE,
    abstract_model,
    assert_exports_back_exactly,
    random_params,
    random_torch_state_dict,
)
from recipes import BACKBONE_RECIPES, METHOD_RECIPES, tiny

from mixmae_jax import config as config_lib
from mixmae_jax import imaging, methods
from mixmae_jax.interop import from_torch, layout_for, to_torch
from mixmae_jax.interop import keymap as K
from mixmae_jax.methods import get_method
from mixmae_jax.methods import ummae as U
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.numerics import SAME_MATH_RTOL, rel_err
from mixmae_jax.train.step import bind

assert tuple(METHOD_RECIPES) == methods.NAMES  # a new method gets its tiny recipe here
NAMES = methods.NAMES
CASES = list(BACKBONE_RECIPES)
NUM_CLASSES = 10

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# PyTorch interop: round trip, strict export, refusing what does not fit
# ---------------------------------------------------------------------------------------------


def _templates(method):
    """{format: abstract params of the JAX model that format's state_dict imports into}."""
    return {"pretrain": abstract_model(lambda: method.build_model(InitKeys(0)))[1],
            "finetune": abstract_model(lambda: method.build_classifier(NUM_CLASSES,
                                                                       InitKeys(0)))[1]}


@pytest.fixture(scope="module", params=CASES)
def interop(request):
    config = tiny(request.param)
    method = get_method(config)
    return dict(case=request.param, config=config, method=method,
                layout=layout_for(method.config), templates=_templates(method))


@pytest.mark.parametrize("fmt", ["pretrain", "finetune"])
def test_round_trip_is_bit_exact(interop, fmt):
    """A random state_dict of the reference (every trainable tensor, norms and biases too)
    imports strictly and exports back: the same keys in the same order, dtypes and values."""
    layout = interop["layout"]
    torch.manual_seed(0)
    reference = references.build(layout, fmt, NUM_CLASSES)
    sd = random_torch_state_dict(reference, seed=11)
    params, report = from_torch.state_dict_to_params(sd, layout, interop["templates"][fmt])
    assert report.file_format == fmt and report.template_format == fmt
    assert not report.skipped and not report.kept_fresh and not report.resized
    assert not report.notes, report.notes
    assert report.loaded == sum(p.requires_grad for p in reference.parameters())
    back = assert_exports_back_exactly(params, sd, layout, fmt, NUM_CLASSES)
    reference.load_state_dict(back, strict=True)


def test_exports_load_strictly_into_the_reference(interop):
    """Pretraining params export to the official pretraining layout and (decoder dropped, a
    fresh head) to the fine-tuning one; a classifier's to the fine-tuning one: each loads into
    the reference with strict=True, the encoder's tensors the same in both."""
    layout, templates = interop["layout"], interop["templates"]
    params = random_params(templates["pretrain"], seed=3)
    pretrain = to_torch.params_to_state_dict(params, layout)
    finetune = to_torch.params_to_state_dict(params, layout, format="finetune",
                                             num_classes=NUM_CLASSES)
    classifier = to_torch.params_to_state_dict(random_params(templates["finetune"], seed=4),
                                               layout, format="finetune",
                                               num_classes=NUM_CLASSES)
    for fmt, sd in (("pretrain", pretrain), ("finetune", finetune), ("finetune", classifier)):
        references.build(layout, fmt, NUM_CLASSES).load_state_dict(sd, strict=True)
        assert list(sd) == list(layout.reference_layout(fmt, NUM_CLASSES)), fmt
    head = finetune["head.weight"]
    assert head.shape == (NUM_CLASSES, head.shape[1]) and 0 < float(head.std()) < 0.03
    assert torch.equal(finetune["head.bias"], torch.zeros(NUM_CLASSES))
    assert not any(k.startswith(("decoder", "mask_token")) for k in finetune)
    # The encoder's tensors are the same in both (SimMIM's pretraining keys add `encoder.`).
    same = [k for k in finetune if not layout.is_constant_key(k)
            and (k in pretrain or f"encoder.{k}" in pretrain)]
    assert len(same) > len(finetune) / 2
    assert all(torch.equal(finetune[k], pretrain.get(k, pretrain.get(f"encoder.{k}")))
               for k in same)


def test_a_checkpoint_of_another_shape_is_refused_naming_each_key(interop):
    """A missing tensor, one of another shape, an unknown one and a constant that is not the
    model's own (an index or a table): one ConversionError naming all four keys."""
    layout = interop["layout"]
    torch.manual_seed(0)
    sd = references.build(layout, "pretrain", 0).state_dict()
    weights = [k for k in sd if not layout.is_constant_key(k) and sd[k].ndim >= 1]
    missing, reshaped = weights[len(weights) // 2], weights[len(weights) // 3]
    # Not every layout has a constant (UM-MAE's Swin has no index or table).
    constant = next((k for k in sd if layout.is_constant_key(k)), None)
    bad = dict(sd)
    del bad[missing]
    bad[reshaped] = torch.zeros(tuple(sd[reshaped].shape) + (2,))
    bad["blocks.0.attn.unknown.weight"] = torch.zeros(3)
    if constant:
        bad[constant] = sd[constant] + (1 if not sd[constant].is_floating_point() else 1e-3)
    with pytest.raises(K.ConversionError) as e:
        from_torch.state_dict_to_params(bad, layout, interop["templates"]["pretrain"])
    for key in (missing, reshaped, "blocks.0.attn.unknown.weight", constant or missing):
        assert key in str(e.value), key


def _same_tensors(got, want) -> bool:
    """The tensors of `got` that `want` holds too are equal (SimMIM's pretraining names add
    `encoder.` to its fine-tuning ones); that is most of `got`."""
    pairs = [(k, n) for k in got for n in (k, f"encoder.{k}", k.removeprefix("encoder."))
             if n in want]
    assert len({k for k, _ in pairs}) > len(got) / 2, sorted(got)
    return all(torch.equal(got[k], want[n]) for k, n in pairs)


def test_a_file_of_the_other_format_loads_what_it_has(interop):
    """A pretraining file into a classifier: the pretraining-only tensors skipped, the head kept
    as the template has it; a fine-tuning file into the pretraining model: its head skipped, the
    decoder kept as the template has it (an abstract template cannot supply it: refused by
    name). What both have is the file's, bit for bit."""
    layout, templates = interop["layout"], interop["templates"]
    torch.manual_seed(0)
    for fmt, other in (("pretrain", "finetune"), ("finetune", "pretrain")):
        reference = references.build(layout, fmt, NUM_CLASSES)
        # Its tables and indices as a file of the other format's model holds them (a learned
        # fine-tuning pos_embed that left its sin-cos start is refused by a pretraining model).
        tables = {k: torch.from_numpy(np.array(v))
                  for k, v in layout.constant_entries(other).items()}
        sd = {k: tables[k] if k in tables and tables[k].shape == v.shape else v
              for k, v in random_torch_state_dict(reference, seed=5).items()}
        template = random_params(templates[other], seed=13)  # concrete: stands in for an init
        params, report = from_torch.state_dict_to_params(sd, layout, template)
        assert (report.file_format, report.template_format) == (fmt, other)
        assert report.skipped and report.kept_fresh
        flat, flat_template = K.flatten(params), K.flatten(template)
        assert all(np.array_equal(flat[p], flat_template[p]) for p in report.kept_fresh)
        if other == "finetune":
            assert {"head.kernel", "head.bias"} <= set(report.kept_fresh)
        else:
            assert {"head.weight", "head.bias"} <= {s.split(":")[0] for s in report.skipped}
            with pytest.raises(K.ConversionError) as e:
                from_torch.state_dict_to_params(sd, layout, templates["pretrain"])
            assert all(f"({p})" in str(e.value) for p in report.kept_fresh)
        fresh = {layout.torch_name(p, other) for p in report.kept_fresh}
        back = to_torch.params_to_state_dict(params, layout, format=other,
                                             num_classes=NUM_CLASSES)
        assert _same_tensors({k: v for k, v in back.items() if k not in fresh
                              and not layout.is_constant_key(k)}, sd)


def test_params_that_do_not_fit_are_refused_by_the_export_naming_each(interop):
    """Export of params with a missing tensor, one of another shape and one the layout does not
    know: one ConversionError naming their official keys; a classifier's params have no
    decoder, so its pretraining export names the decoder's keys."""
    layout, templates = interop["layout"], interop["templates"]
    flat = K.flatten(random_params(templates["pretrain"], seed=0))
    kernels = [p for p in flat if p.endswith(".kernel") and len(flat[p].shape) == 2]
    missing, reshaped = kernels[len(kernels) // 2], kernels[len(kernels) // 3]
    del flat[missing]
    flat[reshaped] = np.zeros((3, 3, 3), np.float32)
    extra = reshaped.rsplit(".", 2)[0] + ".gate.kernel"
    flat[extra] = np.zeros((4, 4), np.float32)
    with pytest.raises(K.ConversionError) as e:
        to_torch.params_to_state_dict(K.unflatten(flat), layout)
    for path in (missing, reshaped):
        assert layout.torch_name(path, "pretrain") in str(e.value), path
    assert "gate" in str(e.value)
    with pytest.raises(K.ConversionError) as e:
        to_torch.params_to_state_dict(random_params(templates["finetune"], seed=0), layout)
    finetune = layout.reference_layout("finetune", NUM_CLASSES)
    decoder = [k for k in layout.reference_layout("pretrain", 0) if not layout.is_constant_key(k)
               and k not in finetune and k.removeprefix("encoder.") not in finetune]
    assert decoder and all(k in str(e.value) for k in decoder), decoder


def _other_family(method):
    """A tiny recipe's model the method does not run."""
    for case in CASES:
        model = tiny(case).model
        if model.name not in method.models:
            return model
    raise AssertionError(f"every model family runs {method.name}")


@pytest.mark.parametrize("name", NAMES)
def test_a_model_the_method_does_not_run_is_refused_naming_the_key(name):
    config = tiny(name)
    config_lib.validate(config)
    method = get_method(config)
    config.model = _other_family(method)
    with pytest.raises(config_lib.ConfigError,
                       match=rf"^method\.name: method '{name}' cannot run model\.name="
                             rf"'{config.model.name}' \(it runs "):
        config_lib.validate(config)


# ---------------------------------------------------------------------------------------------
# mixmae-visualize: masks from files, the panels' loss
# ---------------------------------------------------------------------------------------------


def official_mask(method, plan):
    """A plan written in the method's official mask convention (`mask_help`): what a user's
    --mask file holds."""
    name = method.name
    if name == "mixmim":  # one final-grid mask shared by the batch, 1 = the partner's cell
        g = int(round(method.num_cells() ** 0.5))
        return np.asarray(plan["mask"][0]).reshape(g, g).astype(np.int64)
    if name in ("mae", "simmim"):  # (B, grid, grid) 1 = removed / masked
        mask = np.asarray(plan["mask"])
        g = int(round(mask[0].size ** 0.5))
        return mask.reshape(-1, g, g).astype(np.int64)
    if name == "ummae":  # mask 1 = removed unit, vis_mask 1 = secondary-masked
        b, g = plan["slot"].shape[0], method.unit_grid()
        return {"mask": np.asarray(U.removed_units(plan["slot"])).astype(np.int64),
                "vis_mask": np.asarray(method.secondary_units(plan)).reshape(b, g, g)
                .astype(np.int64)}
    if name == "mixedae":  # (B / S, grid, grid) source ids
        source = np.asarray(plan["source"])
        g = int(round(source.shape[1] ** 0.5))
        return source.reshape(-1, g, g).astype(np.int64)
    raise AssertionError(f"{name}: write its official mask convention here")


BATCH = 4  # MixMIM pairs images, MixedAE mixes 2 per sample in its tiny recipe


@pytest.fixture(scope="module", params=NAMES)
def tiny_model(request):
    """A method's tiny model at random init, images, a plan, and its loss and panels compiled
    once (the plan an argument)."""
    config = tiny(request.param)
    method = get_method(config)
    graphdef, abstract = abstract_model(lambda: method.build_model(InitKeys(0)))
    params = random_params(abstract, seed=1)
    size = config.model.img_size
    images = jnp.asarray(np.random.default_rng(2).standard_normal((BATCH, size, size, 3)),
                         jnp.float32)
    plan = jax.tree.map(jnp.asarray, method.make_plan(jax.random.key(3), BATCH, 1))

    def loss_and_panels(params, images, plan):
        model = bind(graphdef, params)
        return method.loss(model, {"image": images}, plan, 1), method.panels(model, images, plan)

    fn = jax.jit(loss_and_panels, compiler_options=FAST_COMPILE)
    return dict(name=request.param, config=config, method=method, params=params, images=images,
                plan=plan, run=lambda plan: fn(params, images, plan))


@pytest.mark.slow
def test_panels_show_the_training_loss(tiny_model):
    """`panels` (what mixmae-visualize prints and draws) computes the loss and metrics the
    method trains on, for the same plan; the first column is the original image."""
    (loss, metrics), (p_loss, p_metrics, columns) = tiny_model["run"](tiny_model["plan"])
    assert np.isfinite(float(loss)) and float(loss) > 0
    assert rel_err(p_loss, loss) <= SAME_MATH_RTOL, (float(p_loss), float(loss))
    for k in set(metrics) & set(p_metrics):
        assert rel_err(p_metrics[k], metrics[k]) <= SAME_MATH_RTOL, k
    images = np.asarray(tiny_model["images"])
    assert len(columns) >= 3 and all(np.shape(c) == images.shape for c in columns.values())
    np.testing.assert_array_equal(columns["original"], images)
    assert all(np.isfinite(c).all() for c in columns.values())


def test_a_mask_file_in_the_official_convention_gives_back_the_plan(tiny_model):
    method, plan = tiny_model["method"], tiny_model["plan"]
    from_file = method.mask_from_file(official_mask(method, plan), BATCH, "m.npy")
    assert from_file.keys() == plan.keys()
    (loss, _), _ = tiny_model["run"](plan)
    (again, _), _ = tiny_model["run"](jax.tree.map(jnp.asarray, from_file))
    assert rel_err(again, loss) <= SAME_MATH_RTOL, (float(again), float(loss))


def test_a_mask_file_that_does_not_fit_is_refused_naming_it(tiny_model):
    """The wrong shape, values other than the convention's and the wrong kind of file (an .npz
    archive where one array is expected, or the other way round): a ValueError naming --mask
    and the file, never another error, and saying what is wrong (the shape it got and the grid
    it must be on, the values allowed, both kinds of file)."""
    method, path = tiny_model["method"], "masks/m.npz"
    good = official_mask(method, tiny_model["plan"])
    if isinstance(good, dict):
        wrong_shape = {k: np.zeros((3, 5, 7), np.int64) for k in good}
        wrong_values = {k: 2 * v for k, v in good.items()}
        wrong_kind = good["mask"]
    else:
        wrong_shape, wrong_values, wrong_kind = np.zeros((3, 5, 7), np.int64), 2 * good, {
            "mask": good}
    g = np.shape(good["mask"] if isinstance(good, dict) else good)[-1]
    says = {"shape": [r"\(3, 5, 7\)", rf"{g}x{g}|\({g}, {g}\)"],  # what it got, the grid
            "values": [r"0 or 1|exactly"], "kind": [r"\.npy", r"\.npz"]}
    for what, mask in (("shape", wrong_shape), ("values", wrong_values), ("kind", wrong_kind)):
        with pytest.raises(ValueError, match=f"^--mask {path}: ") as e:
            method.mask_from_file(mask, BATCH, path)
        print(f"{tiny_model['name']} wrong {what}: {e.value}")
        assert all(re.search(r, str(e.value)) for r in says[what]), (what, str(e.value))


# ---------------------------------------------------------------------------------------------
# Frozen features
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c != "simmim-ummae_swin"])
def test_features_are_one_finite_vector_per_image_that_depends_on_it(case):
    """`Method.features` (k-NN, linear probe): whole unmasked images, one vector per image."""
    config = tiny(case)
    method = get_method(config)
    model = method.build_model(InitKeys(0))
    size = config.model.img_size
    images = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    fn = jax.jit(lambda x: method.features(model, x), compiler_options=FAST_COMPILE)
    f = np.asarray(fn(images))
    assert f.ndim == 2 and f.shape[0] == 4 and np.isfinite(f).all()
    assert np.abs(f[0] - f[1]).max() > 1e-4  # different images, different features


# ---------------------------------------------------------------------------------------------
# Training: two steps, exact resume, mixmae-visualize on the run
# ---------------------------------------------------------------------------------------------

# The loss at init: about 1 for a norm-pix MSE, an L1 of normalised pixels for SimMIM, plus
# MixedAE's contrastive term.
LOSS_AT_INIT = {"mixmim": (0.3, 3.0), "mae": (0.3, 3.0), "simmim": (0.1, 10.0),
                "ummae": (0.3, 3.0), "mixedae": (0.3, 5.0)}


def _jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module", params=NAMES)
def trained(request, tmp_path_factory):
    """A method's tiny recipe run 4 steps straight; and the same run as a kill during step 4
    leaves it (checkpoints of steps 2 and 4, the log of steps 3-4 written, step 4's save lost and
    its log line cut short), then resumed to step 4."""
    import shutil

    from mixmae_jax import tasks

    config = tiny(request.param)
    root = tmp_path_factory.mktemp(request.param)
    straight, interrupted = str(root / "straight"), str(root / "interrupted")
    tasks.train(config, straight, print_fn=lambda s: None)
    shutil.copytree(straight, interrupted)
    shutil.rmtree(os.path.join(interrupted, "checkpoints", "4"))
    stopped_at = tasks.restore_params(interrupted)[2]
    log = os.path.join(interrupted, "metrics.jsonl")
    with open(log) as f:
        text = f.read()
    with open(log, "w") as f:  # killed mid-line
        f.write(text[:text.rindex('"loss"')])
    lines = []
    tasks.train(config, interrupted, print_fn=lines.append)
    return dict(name=request.param, config=config, straight=straight, interrupted=interrupted,
                stopped_at=stopped_at, lines=lines, root=root)


@pytest.mark.slow
def test_two_training_steps(trained):
    """Finite, plausible losses and every logged metric finite; the optimizer moved the params
    (steps 3-4 changed most tensors and no tensor is non-finite)."""
    from mixmae_jax import tasks

    rows = _jsonl(trained["straight"])
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    lo, hi = LOSS_AT_INIT[trained["name"]]
    for r in rows[:2]:
        assert {"loss", "lr", "grad_norm", "param_norm", "images_per_sec"} <= set(r), sorted(r)
        for key, value in r.items():  # the method's own metrics too (MixMIM's branch losses)
            assert np.isfinite(value), key
        assert lo < r["loss"] < hi and r["grad_norm"] > 0, r
    assert rows[0]["param_norm"] != rows[1]["param_norm"]
    p2 = K.flatten(tasks.restore_params(trained["straight"], 2)[1])
    p4 = K.flatten(tasks.restore_params(trained["straight"], 4)[1])
    assert all(np.isfinite(v).all() for v in p4.values())
    moved = [k for k in p4 if not np.array_equal(p2[k], p4[k])]
    assert len(moved) > 0.5 * len(p4), sorted(set(p4) - set(moved))
    assert os.path.exists(os.path.join(trained["straight"], "config.json"))
    assert os.listdir(os.path.join(trained["straight"], "tensorboard"))


@pytest.mark.slow
def test_resume_is_bit_exact(trained):
    """Killed during step 4 and resumed from step 2: the params of step 4 and the logged losses
    of steps 3 and 4 equal the straight run's bit for bit; the log reads as one run."""
    from mixmae_jax import tasks

    assert trained["stopped_at"] == 2
    assert any("Resumed from step 2" in s for s in trained["lines"]), trained["lines"]
    _, straight, s1 = tasks.restore_params(trained["straight"])
    _, resumed, s2 = tasks.restore_params(trained["interrupted"])
    assert s1 == s2 == 4
    a, b = K.flatten(straight), K.flatten(resumed)
    assert a.keys() == b.keys()
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"resumed params differ: {differ[:5]}"
    by_step = lambda rows: {r["step"]: r["loss"] for r in rows}  # noqa: E731
    la, lb = by_step(_jsonl(trained["straight"])), by_step(_jsonl(trained["interrupted"]))
    assert la[3] == lb[3] and la[4] == lb[4]
    assert [r["step"] for r in _jsonl(trained["interrupted"])] == [1, 2, 3, 4]


@pytest.mark.slow
def test_visualize_prints_the_loss_the_method_trains_on(trained, capsys):
    """mixmae-visualize --mask on the run: its printed loss is the method's training loss of the
    run's params on the same images (loaded and normalised as the tool does) and plan."""
    from PIL import Image

    from mixmae_jax import cli, tasks
    from mixmae_jax.visualize import load_images

    config, root = trained["config"], trained["root"]
    method = get_method(config)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(BATCH):
        paths.append(str(root / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(paths[-1])
    plan = method.make_plan(jax.random.key(9), BATCH, 1)
    mask = official_mask(method, plan)
    mask_path = str(root / ("m.npz" if isinstance(mask, dict) else "m.npy"))
    if isinstance(mask, dict):
        np.savez(mask_path, **mask)
    else:
        np.save(mask_path, mask)
    out = str(root / "grid.png")
    cli.visualize_main(["--workdir", trained["straight"], "--images", *paths, "--out", out,
                        "--mask", mask_path])
    printed = [s for s in capsys.readouterr().out.splitlines() if s.startswith("loss: ")]
    assert len(printed) == 1, printed
    shown = float(printed[0].split()[1])
    assert np.asarray(Image.open(out)).std() > 10  # real pictures

    graphdef, _ = abstract_model(lambda: method.build_model(InitKeys(0)))
    params = tasks.restore_params(trained["straight"])[1]
    images = imaging.normalize(load_images(paths, config.model.img_size))
    loss, _ = jax.jit(lambda p, x: method.loss(bind(graphdef, p), {"image": x}, plan, 1))(
        params, images)
    # Another program for the same math, printed to 6 decimals.
    assert abs(shown - float(loss)) <= SAME_MATH_RTOL * abs(float(loss)) + 1e-6, (
        shown, float(loss))
