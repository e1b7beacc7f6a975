"""Fine-tuning: layer-wise lr decay against the official formulas, Mixup/CutMix/RandomErasing
invariants, the run itself (exact resume, best checkpoint, export), and bad input refused
before compiling."""

import json
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
from recipes import load, override

from mixmae_jax import tasks
from mixmae_jax.config import ConfigError, validate
from mixmae_jax.interop import layout_for
from mixmae_jax.methods import get_method
from mixmae_jax.tasks import layer_decay, mixup
from mixmae_jax.train import experiment, optim
from mixmae_jax.train import step as step_lib

QUIET = dict(print_fn=lambda s: None)
SMALL_SWIN = dict(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                  window_sizes=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


def finetune_config(**overrides):
    """The MixMIM fine-tuning recipe, shrunk: 32-px digits, a 2-stage Swin, batch 8, 4 steps."""
    c = load("finetune_mixmim_b.py", "tiny")
    c.model.update(SMALL_SWIN)
    c.data.image_size = 32
    return override(c, overrides)


@pytest.fixture(scope="module")
def pretrain_workdir(tmp_path_factory):
    """A 2-step MixMIM pretraining run of the same small Swin, on the digits images."""
    c = load("mixmim_b.py", "tiny")
    c.model.update(SMALL_SWIN)
    c.data.update(source="digits", split="train", image_size=32)
    c.total_steps = 2
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    tasks.train(c, workdir, **QUIET)
    return workdir


# -- layer-wise lr decay ----------------------------------------------------------------------


def _scales_by_name(config_name, decay, rule):
    config = load(config_name)
    method = get_method(config)
    _, abstract = step_lib.graphdef_and_abstract_params(
        method, lambda rngs: method.build_classifier(1000, rngs))
    layout = layout_for(method.config)
    scales = layer_decay.lr_scales(abstract, layout, rule, decay)
    from mixmae_jax.interop import keymap as K

    flat = K.flatten(scales)
    return {layout.torch_name(p, "finetune"): s for p, s in flat.items()}


@pytest.mark.slow
def test_mixmim_b_layer_decay_is_the_official_quirk():
    """MixMIM util/lr_decay.py for depths (2, 2, 18, 2): 25 layer ids, scale 0.7^(25 - id);
    the head and final norm share the last block's id 24; a stage's downsample takes the id of
    the next stage's first block; every trainable tensor of models_mixmim_ft gets one."""
    by_name = _scales_by_name("finetune_mixmim_b.py", 0.7, "mixmim")
    depths = (2, 2, 18, 2)
    first = [sum(depths[:s]) + 1 for s in range(4)]  # id of each stage's first block

    def official_id(name):
        parts = name.split(".")
        if parts[0] in ("patch_embed", "absolute_pos_embed"):
            return 0
        if parts[0] == "layers" and parts[2] == "blocks":
            return first[int(parts[1])] + int(parts[3])
        if parts[0] == "layers" and parts[2] == "downsample":
            return first[int(parts[1]) + 1]
        return 24

    from references import mixmim as R

    with torch.device("meta"):
        tmodel = R.MixMIMFinetuneTorch.from_model_config(load("finetune_mixmim_b.py").model)
    trainable = {n for n, p in tmodel.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable and len(trainable) == 329  # the optimizer's tensors
    for name, scale in by_name.items():
        assert scale == pytest.approx(0.7 ** (25 - official_id(name)), rel=1e-12), name
    assert by_name["head.weight"] == by_name["norm.weight"] == pytest.approx(0.7)
    assert by_name["layers.3.blocks.1.mlp.fc2.weight"] == pytest.approx(0.7)
    assert by_name["layers.2.downsample.reduction.weight"] == by_name[
        "layers.3.blocks.0.attn.qkv.weight"] == pytest.approx(0.7 ** 2)
    assert by_name["patch_embed.proj.weight"] == pytest.approx(0.7 ** 25)
    assert max(by_name.values()) < 1.0  # the quirk: nothing trains at the full lr


def test_mae_vit_b_layer_decay_is_the_official_rule():
    """MAE util/lr_decay.py: 13 layers; cls_token / pos_embed / patch_embed id 0, blocks.i
    id i + 1, fc_norm and head id 13 (scale 1)."""
    by_name = _scales_by_name("finetune_mae_vit_b.py", 0.65, "blocks")
    assert by_name["head.weight"] == by_name["fc_norm.weight"] == 1.0
    assert by_name["cls_token"] == by_name["patch_embed.proj.weight"] == pytest.approx(0.65 ** 13)
    for i in range(12):
        assert by_name[f"blocks.{i}.attn.qkv.weight"] == pytest.approx(0.65 ** (12 - i))


def test_ummae_swin_t_layer_decay_puts_merges_in_their_block():
    """UM-MAE: the flat `blocks` list (12 for Swin-T); a stage's patch merging lives in its first
    block and takes that block's id."""
    by_name = _scales_by_name("finetune_ummae_swin_t.py", 0.85, "blocks")
    merges = [n for n in by_name if ".downsample." in n]
    assert merges
    for name in merges:
        i = int(name.split(".")[1])
        assert by_name[name] == pytest.approx(0.85 ** (13 - (i + 1))), name
    assert by_name["head.weight"] == 1.0


@pytest.mark.slow
def test_simmim_swin_b_layer_decay_is_the_official_rule():
    """SimMIM optimizer.py get_swin_layer for depths (2, 2, 18, 2): 26 scales 0.8^(25 - id);
    patch_embed id 0; layers.s.blocks.j id sum(depths[:s]) + j + 1; a stage's downsample the id
    of its own last block; the final norm and head id 25 (the full lr)."""
    by_name = _scales_by_name("finetune_simmim_swin_b.py", 0.8, "simmim")
    depths = (2, 2, 18, 2)

    def official_id(name):
        parts = name.split(".")
        if parts[0] == "patch_embed":
            return 0
        if parts[0] == "layers" and parts[2] == "blocks":
            return sum(depths[:int(parts[1])]) + int(parts[3]) + 1
        if parts[0] == "layers" and parts[2] == "downsample":
            return sum(depths[:int(parts[1]) + 1])
        return 25

    from references import simmim as R

    with torch.device("meta"):
        tmodel = R.SimMIMFinetuneTorch.from_model_config(load("finetune_simmim_swin_b.py").model)
    trainable = {n for n, p in tmodel.named_parameters() if p.requires_grad}
    assert set(by_name) == trainable
    for name, scale in by_name.items():
        assert scale == pytest.approx(0.8 ** (25 - official_id(name)), rel=1e-12), name
    assert by_name["head.weight"] == by_name["norm.weight"] == 1.0
    assert by_name["layers.0.downsample.reduction.weight"] == by_name[
        "layers.0.blocks.1.attn.qkv.weight"] == pytest.approx(0.8 ** 23)
    assert by_name["layers.3.blocks.1.mlp.fc2.weight"] == pytest.approx(0.8)
    assert by_name["patch_embed.proj.weight"] == pytest.approx(0.8 ** 25)


def test_layer_scales_multiply_the_whole_adamw_update():
    """With scales s, each update (Adam step and decoupled weight decay) is s times the plain
    one, as PyTorch's per-group lr * (adam + wd * p)."""
    c = finetune_config()
    params = {"a": jnp.ones((3, 2)), "b": jnp.full((4,), 2.0)}
    grads = {"a": jnp.full((3, 2), 0.5), "b": jnp.full((4,), -1.0)}
    scales = {"a": 0.25, "b": 0.5}
    plain, _ = optim.make_optimizer(c, 100)
    scaled, _ = optim.make_optimizer(c, 100, scales)
    u_plain, _ = plain.update(grads, plain.init(params), params)
    u_scaled, _ = scaled.update(grads, scaled.init(params), params)
    for k in params:
        np.testing.assert_allclose(u_scaled[k], scales[k] * u_plain[k], rtol=1e-6)


# -- Mixup / CutMix / RandomErasing ------------------------------------------------------------

AUG = ml_collections.ConfigDict(dict(randaug="", reprob=0.0, mixup=0.8, cutmix=1.0,
                                     mix_prob=1.0, switch_prob=0.5, smoothing=0.1))


def _batch(n=8, size=16):
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((n, size, size, 3)), jnp.float32)
    return images, jnp.asarray(rng.integers(0, 10, n), jnp.int32)


@pytest.mark.parametrize("switch_prob", [0.0, 1.0])  # Mixup only / CutMix only
def test_mixup_and_cutmix_mix_the_right_pairs(switch_prob):
    images, labels = _batch()
    aug = AUG.copy_and_resolve_references()
    aug.switch_prob = switch_prob
    groups = 2
    fn = jax.jit(lambda k: mixup.augment_batch(k, images, labels, num_classes=10,
                                               num_groups=groups, aug_cfg=aug))
    smooth = np.asarray(mixup.smooth_one_hot(labels, 10, 0.1))
    assert smooth.max() == pytest.approx(0.91) and smooth.min() == pytest.approx(0.01)
    x = np.asarray(images)
    for seed in range(6):
        out, targets, lam = map(np.asarray, fn(jax.random.PRNGKey(seed)))
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, rtol=1e-6)
        for g in range(groups):
            rows = np.arange(4 * g, 4 * g + 4)
            partner = rows[::-1]  # image i of a device's batch pairs with n-1-i of that batch
            lg = float(lam[g])
            np.testing.assert_allclose(targets[rows], lg * smooth[rows]
                                       + (1 - lg) * smooth[partner], rtol=1e-5, atol=1e-7)
            if switch_prob == 0.0:  # Mixup: a convex blend of the pair
                np.testing.assert_allclose(out[rows], lg * x[rows] + (1 - lg) * x[partner],
                                           rtol=1e-5, atol=1e-6)
            else:  # CutMix: each pixel is the image's or the partner's; lam = the kept share
                own = np.all(out[rows] == x[rows], axis=-1)
                theirs = np.all(out[rows] == x[partner], axis=-1)
                assert np.all(own | theirs)
                np.testing.assert_allclose(own.mean(axis=(1, 2)), lg, atol=1e-6)
                # one box for the whole group
                assert np.all(own == own[0:1])


def test_no_mixing_leaves_images_and_gives_smoothed_labels():
    images, labels = _batch()
    aug = AUG.copy_and_resolve_references()
    aug.update(mixup=0.0, cutmix=0.0)
    out, targets, lam = mixup.augment_batch(jax.random.PRNGKey(0), images, labels,
                                            num_classes=10, num_groups=1, aug_cfg=aug)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_allclose(targets, mixup.smooth_one_hot(labels, 10, 0.1))


def test_random_erasing_boxes_follow_timm():
    """Erased with probability p; a box covers 2%..33% of the image with aspect in
    [0.3, 3.3] (up to rounding), lies inside it, and only its pixels change."""
    n, size, p = 4000, 32, 0.25
    boxes = np.asarray(jax.jit(lambda k: mixup.erase_boxes(k, n, size, size, p))(
        jax.random.PRNGKey(1)))
    erased = boxes[:, 2] > 0
    # Binomial(4000, 0.25): std 27 images; 6 std.
    assert abs(erased.sum() - p * n) < 6 * np.sqrt(n * p * (1 - p))
    top, left, h, w = boxes[erased].T
    assert np.all(top >= 0) and np.all(left >= 0)
    assert np.all(top + h <= size) and np.all(left + w <= size)
    assert np.all(h < size) and np.all(w < size)
    area = h * w / size**2
    assert area.min() >= 0.02 * 0.5 and area.max() <= 1 / 3 * 1.5  # rounding of h and w
    images, _ = _batch(8, 16)
    out = np.asarray(mixup.random_erasing(jax.random.PRNGKey(3), images, 1.0))
    changed = np.any(out != np.asarray(images), axis=-1)
    assert changed.any(axis=(1, 2)).all()  # p = 1: every image erased
    for i in range(8):  # the changed pixels form one rectangle
        rows, cols = np.nonzero(changed[i])
        assert changed[i, rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


# -- the run ----------------------------------------------------------------------------------


def _jsonl(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


FINETUNE_OVERRIDES = {"evals.eval.every_steps": 2}


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, pretrain_workdir):
    """`pretrain_workdir` fine-tuned 4 steps, evaluated at steps 2 and 4: (workdir, the run's
    result, its lines). The tests read it and write nothing into it."""
    workdir, lines = str(tmp_path_factory.mktemp("finetuned") / "ft"), []
    out = tasks.train(finetune_config(init=pretrain_workdir, **FINETUNE_OVERRIDES), workdir,
                      print_fn=lines.append)
    return workdir, out, lines


@pytest.mark.slow
def test_finetune_runs_resumes_exactly_and_keeps_the_best(tmp_path, pretrain_workdir,
                                                          finetuned):
    c = finetune_config(init=pretrain_workdir, **FINETUNE_OVERRIDES)
    (straight, out, lines), interrupted = finetuned, str(tmp_path / "interrupted")
    assert any("Initialised from mixmim pretraining step 2" in s for s in lines)
    tasks.train(c, interrupted, stop_at=2, **QUIET)
    tasks.train(c, interrupted, **QUIET)
    _, p_straight, _ = tasks.restore_params(straight)
    _, p_resumed, _ = tasks.restore_params(interrupted)
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))),
                                         p_straight, p_resumed))
    assert max(diffs) == 0.0
    a, b = _jsonl(straight), _jsonl(interrupted)
    assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]
    evals = [r["eval_top1"] for r in a if "eval_top1" in r]
    assert evals == [r["eval_top1"] for r in b if "eval_top1" in r] and len(evals) == 2
    # best_top1 lives in the train state as float32
    assert out["best_top1"] == pytest.approx(max(evals), rel=1e-7)
    assert out["final_top1"] == evals[-1]
    # The best params are kept in best/ and export to the official fine-tuning layout.
    with open(os.path.join(straight, "best", "best.json")) as f:
        best = json.load(f)
    assert best["top1"] == max(evals)
    _, best_params, best_step = tasks.restore_params(straight, best=True)
    assert best_step == best["step"]


@pytest.mark.slow
def test_finetuned_export_loads_strictly_and_computes_the_same_logits(tmp_path, finetuned):
    """mixmae-convert to-torch of a fine-tuning workdir: the official models_mixmim_ft
    state_dict, strict load into the plain torch reference, the same logits."""
    from references import mixmim as R

    from mixmae_jax.cli import convert_main

    workdir = finetuned[0]
    out = str(tmp_path / "ft.pth")
    convert_main(["to-torch", "--workdir", workdir, "--out", out, "--format", "finetune"])
    sd = torch.load(out, weights_only=True)["model"]
    config, params, _ = tasks.restore_params(workdir)
    tmodel = R.MixMIMFinetuneTorch.from_model_config(config.model, num_classes=10)
    tmodel.load_state_dict(sd, strict=True)
    method = get_method(config)
    graphdef, _ = step_lib.graphdef_and_abstract_params(
        method, lambda rngs: method.build_classifier(10, rngs))
    x = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype(np.float32)
    want = tmodel.double().eval()(torch.from_numpy(x).permute(0, 3, 1, 2).double())
    got = np.asarray(step_lib.bind(graphdef, params)(x))
    err = np.linalg.norm(got - want.detach().numpy()) / np.linalg.norm(want.detach().numpy())
    assert err < 1e-5, err


@pytest.mark.slow
def test_384_style_finetuning_adds_the_official_loaders_resized_ape(pretrain_workdir):
    """`finetune_mixmim_b.py:res=384` in small: a 32-px (8x8) pretraining fine-tuned at 48 px
    (12x12) with model.ape_grid=8. The official loader bicubic-resizes the 8x8 sin-cos table
    (F.interpolate, align_corners=False) instead of recomputing it at 12x12; the classifier adds
    that table, exports it, imports an official file holding it without allow_ape_mismatch, and
    its logits equal the reference's with the exported state_dict loaded strictly."""
    import torch.nn.functional as F
    from references import mixmim as R

    from mixmae_jax.interop import from_torch, to_torch
    from mixmae_jax.models import layers as L
    from mixmae_jax.tasks import finetune

    c = finetune_config(init=pretrain_workdir)
    c.model.update(img_size=48, window_sizes=(6, 6), ape_grid=8)
    c.data.image_size = 48
    finetune.validate(c)
    src = R.MixMIMPretrainTorch.from_model_config(dict(load("mixmim_b.py", "tiny").model,
                                                       **SMALL_SWIN)).absolute_pos_embed
    src = src.detach()  # the reference's own 8x8 table
    official = F.interpolate(src.reshape(1, 8, 8, 16).permute(0, 3, 1, 2), size=(12, 12),
                             mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    official = official.reshape(1, 144, 16)
    # fp32 sums of 16 products of |w| <= 1.3 with values in [-1, 1]: a few ulp of 1
    np.testing.assert_allclose(L.ape_table(16, 12, 8), official[0].numpy(), rtol=0, atol=4e-6)
    assert np.max(np.abs(L.ape_table(16, 12, 8) - L.sincos_pos_embed_2d(16, 12, 12))) > 0.1

    method = get_method(c)
    layout = layout_for(method.config)
    template = jax.device_get(jax.jit(lambda: step_lib.init_params(
        method, jax.random.PRNGKey(0), lambda rngs: method.build_classifier(10, rngs)))())
    params = finetune.load_pretrained(pretrain_workdir, c, template, print_fn=print)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=10)
    np.testing.assert_allclose(sd["absolute_pos_embed"].numpy(), official.numpy(), atol=4e-6)
    official_file = dict(sd, absolute_pos_embed=official)
    again, _ = from_torch.state_dict_to_params(official_file, layout, template)  # no mismatch
    tmodel = R.MixMIMFinetuneTorch.from_model_config(c.model, num_classes=10)
    tmodel.load_state_dict(official_file, strict=True)
    graphdef, _ = step_lib.graphdef_and_abstract_params(
        method, lambda rngs: method.build_classifier(10, rngs))
    x = np.random.default_rng(0).standard_normal((2, 48, 48, 3)).astype(np.float32)
    want = tmodel.double().eval()(torch.from_numpy(x).permute(0, 3, 1, 2).double())
    want = want.detach().numpy()
    got = np.asarray(step_lib.bind(graphdef, again)(x))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5


# -- bad input ----------------------------------------------------------------------------------


def _refuse(*a, **k):
    raise AssertionError("compiled before refusing the input")


@pytest.fixture
def no_compiling(monkeypatch):
    """Fail if the run gets as far as building the train step."""
    monkeypatch.setattr(experiment.Experiment, "_jit_step", _refuse)


@pytest.mark.parametrize("overrides, match", [
    ({"data.source": "embedded"}, "^data.source: .*labelled"),
    ({"num_classes": 7}, "^num_classes: 7, but tfds dataset 'mixmae_digits' has 10 classes"),
    ({"evals.eval.split": "validation"}, "^evals.eval.split: .*no split 'validation'"),
    ({"keep_best": "val"}, "^keep_best: 'val' names no evaluator"),
    ({"evals.eval.batch_size": 0}, "^evals.eval.batch_size: 0"),
    ({"augment.randaug": "auto-m9"}, "^augment.randaug=.*'rand-'"),
    ({"optim.layer_decay": 1.5}, "^optim.layer_decay:"),
    ({"batch_size": 7}, "^batch_size: Mixup/CutMix"),
])
def test_bad_finetune_configs_are_refused_naming_the_key(tmp_path, no_compiling, overrides,
                                                        match):
    with pytest.raises(ConfigError, match=match):
        tasks.train(finetune_config(**overrides), str(tmp_path), **QUIET)


@pytest.mark.slow
def test_init_from_a_workdir_with_fc_norm_loads_the_encoder(tmp_path):
    """MAE's classifier (UM-MAE's and MixedAE's too) adds an fc_norm the pretraining has not:
    --init of a pretraining workdir loads every encoder tensor and starts fc_norm at weight 1,
    bias 0."""
    from mixmae_jax.interop import keymap as K
    from mixmae_jax.tasks import finetune

    c = load("mae_vit_b.py", "tiny")
    c.total_steps = 1
    workdir = str(tmp_path / "pre")
    tasks.train(c, workdir, **QUIET)
    _, pre, _ = tasks.restore_params(workdir)
    ft = load("finetune_mae_vit_b.py", "tiny")
    ft.init = workdir
    method = get_method(ft)
    template = jax.device_get(jax.jit(lambda: step_lib.init_params(
        method, jax.random.PRNGKey(0), lambda rngs: method.build_classifier(10, rngs)))())
    lines = []
    params = finetune.load_pretrained(workdir, ft, template, print_fn=lines.append)
    assert "fresh: fc_norm.bias, fc_norm.scale, head.bias, head.kernel" in lines[0], lines
    assert "dropped: decoder (" in lines[0] and "encoder.norm (2 tensors)" in lines[0], lines
    flat, flat_pre = K.flatten(params), K.flatten(pre)
    fc_norm = {p: v for p, v in flat.items() if p.startswith("fc_norm")}
    assert sorted(np.unique(np.concatenate([np.ravel(v) for v in fc_norm.values()]))) == [0, 1]
    shared = [p for p in flat if p in flat_pre]
    assert len(shared) > 10
    for path in shared:  # the encoder, tensor for tensor (same paths in both models)
        np.testing.assert_array_equal(flat[path], flat_pre[path], err_msg=path)


@pytest.mark.slow
def test_init_from_another_model_family_is_refused(tmp_path, monkeypatch):
    mae = load("mae_vit_b.py", "tiny")
    mae.data.update(source="digits", split="train")
    mae.total_steps = 1
    mae_dir = str(tmp_path / "mae")
    tasks.train(mae, mae_dir, **QUIET)
    monkeypatch.setattr(experiment.Experiment, "_jit_step", _refuse)
    with pytest.raises(ValueError, match=r"--init .*mae run of model.name='vit'.*'swin'"):
        tasks.train(finetune_config(init=mae_dir), str(tmp_path / "ft"), **QUIET)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="notes.pth"):
        tasks.train(finetune_config(init=str(text)), str(tmp_path / "ft2"), **QUIET)


def test_a_pickled_init_names_finetunes_own_switch(tmp_path):
    """An official-style .pth that pickles `args`: the advice is mixmae-finetune's key, not
    mixmae-convert's --trust-pickle flag, and nothing is written."""
    import argparse

    pth = tmp_path / "official.pth"
    torch.save({"model": {}, "args": argparse.Namespace(lr=1)}, pth)
    with pytest.raises(ValueError, match=r"^--init \S+official.pth pickles objects other than "
                       r"tensors .* pass --config.init_trust_pickle=True: ") as e:
        tasks.train(finetune_config(init=str(pth)), str(tmp_path / "ft"), **QUIET)
    assert "--trust-pickle" not in str(e.value)
    assert not os.path.exists(tmp_path / "ft")


@pytest.mark.slow
def test_init_of_another_depth_is_refused_naming_the_tensors(tmp_path, pretrain_workdir,
                                                           no_compiling):
    """A workdir of the same family but another depth: the native load names --init, the model
    setting in which they differ and the tensors that do not fit, before the run writes or
    builds anything."""
    c = finetune_config(init=pretrain_workdir)
    c.model.depths = (1, 2)
    with pytest.raises(ValueError, match=r"^--init .*: its encoder does not fit this config's "
                       r"mixmim swin classifier; model.depths: \[1, 1\] there, \(1, 2\) here; "
                       r"13 tensor\(s\) differ: encoder.layers.1.blocks.1.attn.proj.bias: "
                       r"missing from the source; .* \(and 9 more\)$"):  # the 13 of one block
        tasks.train(c, str(tmp_path / "ft"), **QUIET)
    assert not os.path.exists(tmp_path / "ft")


@pytest.mark.slow
def test_evaluation_counts_every_example_once_on_8_devices():
    """`classification.evaluate` over an 8-device mesh: 597 test digits in padded batches of 200;
    the padding is masked out, and the figures equal those of one device."""
    from jax_subprocess import run_python

    out = run_python("""
        import json, sys
        import jax
        sys.path.insert(0, "tests")
        from recipes import load, override
        from mixmae_jax.data import eval_pipeline
        from mixmae_jax.eval import classification
        from mixmae_jax.methods import get_method
        from mixmae_jax.train import sharding, step as step_lib
        c = load("finetune_mixmim_b.py", "tiny")
        c.model.update(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                       window_sizes=(4, 4))
        method = get_method(c)
        build = lambda rngs: method.build_classifier(10, rngs)
        graphdef, _ = step_lib.graphdef_and_abstract_params(method, build)
        params = jax.jit(lambda: step_lib.init_params(method, jax.random.PRNGKey(0), build))()
        # a head large enough that predictions are not all one class
        params["head"]["kernel"] = params["head"]["kernel"] * 1e4
        data = eval_pipeline.labelled_data(c.data)
        res = {}
        for devices in (8, 1):
            mesh = sharding.make_mesh(c.mesh, jax.devices()[:devices])
            assert mesh.devices.size == devices
            p = jax.device_put(params, sharding.replicated(mesh))
            it = eval_pipeline.EvalIterator(data, "test", global_batch_size=200,
                                            image_size=32, crop_pct=1.0)
            step = jax.jit(classification.make_eval_step(graphdef, 10))
            res[devices] = classification.evaluate(step, p, it, sharding.batch_sharding(mesh))
        print(json.dumps(res))
    """, devices=8, timeout=600)
    res = json.loads(out.strip().splitlines()[-1])
    eight, one = res["8"], res["1"]
    assert eight["count"] == one["count"] == 597
    assert eight["top1"] == one["top1"] and eight["top5"] == one["top5"]
    assert 0.0 < eight["top1"] < 1.0
    assert eight["loss"] == pytest.approx(one["loss"], rel=1e-5)


def test_shipped_finetune_configs_hold_the_official_recipes():
    """shared/reference/mixmim.md §5.2, ummae_mixedae.md §1.9, MAE FINETUNE.md."""
    from mixmae_jax.tasks import finetune

    common = dict(batch_size=1024, epochs=100)
    for name, decay, geometry in (
            ("finetune_mixmim_b.py", 0.7, {"window_sizes": (14, 14, 14, 7)}),
            ("finetune_mae_vit_b.py", 0.65, {"img_size": 224}),
            ("finetune_ummae_swin_t.py", 0.85, {"window_size": 16, "img_size": 256}),
            ("finetune_ummae_pvt_s.py", 0.85, {"sr_ratios": (8, 4, 2, 1), "img_size": 256})):
        c = load(name)
        finetune.validate(c)
        assert c.task == "finetune" and c.num_classes == 1000
        assert {k: c[k] for k in common} == common
        o, a = c.optim, c.augment
        assert (o.base_lr, o.lr_batch_divisor, o.warmup_epochs, o.min_lr, o.weight_decay,
                o.b1, o.b2, o.layer_decay) == (5e-4, 256, 5, 1e-6, 0.05, 0.9, 0.999, decay), name
        assert (a.randaug, a.reprob, a.mixup, a.cutmix, a.mix_prob, a.switch_prob,
                a.smoothing) == ("rand-m9-mstd0.5-inc1", 0.25, 0.8, 1.0, 1.0, 0.5, 0.1), name
        assert c.model.drop_path_rate == 0.1 and tuple(c.data.crop_scale) == (0.08, 1.0)
        for key, value in geometry.items():
            got = c.model[key]
            assert (tuple(got) if isinstance(value, tuple) else got) == value, (name, key)
        load(name, "tiny")  # the smoke variant loads too
    assert load("finetune_mixmim_b.py").evals.eval.crop_pct == 0.875
    assert load("finetune_ummae_swin_t.py").evals.eval.crop_pct == 1.0  # Resize(256) + Crop
    assert load("finetune_mixmim_b.py", "res=384").evals.eval.crop_pct == 1.0
    assert tuple(load("finetune_mae_vit_b.py").optim.no_decay) == ("pos_embed", "cls_token")
    # SimMIM's own recipe (simmim_finetune__swin_base__img224_window7__800ep.yaml, config.py)
    c = load("finetune_simmim_swin_b.py")
    finetune.validate(c)
    o = c.optim
    assert (c.batch_size, c.epochs, c.model.img_size, tuple(c.model.window_sizes)) == (
        2048, 100, 224, (7, 7, 7, 7))
    assert (o.base_lr, o.lr_batch_divisor, o.warmup_epochs, o.warmup_lr, o.min_lr, o.schedule,
            o.layer_decay, o.clip_grad_norm, o.b2) == (1.25e-3, 512, 20, 1e-6, 1e-6,
                                                       "timm_cosine", 0.8, 5.0, 0.999)
    assert get_method(c).layer_decay_rule == "simmim" and c.evals.eval.crop_pct == 0.875
    assert c.augment.randaug == "rand-m9-mstd0.5-inc1" and c.model.drop_path_rate == 0.1
    load("finetune_simmim_swin_b.py", "tiny")
    for method in ("mixmim", "mae", "mixedae", "ummae", "simmim"):  # the digits experiment
        validate(load("digits.py", f"method={method}"))
        for arg in ("finetune", "finetune,labels=10"):
            finetune.validate(load("digits.py", f"method={method},{arg}"))


@pytest.mark.slow
def test_pretraining_tools_refuse_a_finetuning_workdir(pretrain_workdir, finetuned, capsys):
    from mixmae_jax.cli import eval_main

    workdir = finetuned[0]
    with pytest.raises(SystemExit) as e:
        eval_main(["knn", "--workdir", workdir])
    assert e.value.code == 2
    assert "a fine-tuning run" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--best: .* is a pretraining run"):
        tasks.restore_params(pretrain_workdir, best=True)


def _no_build(*a, **k):
    raise AssertionError("built the experiment before refusing the input")


@pytest.mark.slow
def test_bad_init_and_data_are_refused_before_anything_is_written_or_built(
        tmp_path, pretrain_workdir, monkeypatch, capsys):
    """--init missing, of another family, of another depth, and class folders with an
    unreadable image: one line each from mixmae-finetune, before the experiment is built, and
    the new workdir is not created (no config.json, no checkpoints/)."""
    from PIL import Image

    from mixmae_jax import cli
    from mixmae_jax.train import checkpoint as ckpt_lib

    vit = load("mae_vit_b.py", "tiny")
    exp = tasks.build_experiment(vit, steps_per_epoch=1)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "vit", save_every=0, keep=0, config=vit)
    ckpt.save(0, exp.init_state(), force=True)  # a ViT run: its config and a step
    ckpt.close()
    folder = tmp_path / "folder"
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for label in ("a", "b"):
            (folder / split / label).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (40, 40, 3), np.uint8)).save(
                    folder / split / label / f"{i}.png")
    (folder / "train" / "a" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    monkeypatch.setattr(experiment, "build", _no_build)
    config = tmp_path / "small.py"
    config.write_text(f"""
from configs import finetune_mixmim_b

def get_config(arg=None):
    c = finetune_mixmim_b.get_config("tiny")
    c.model.update({SMALL_SWIN!r}, depths=(1, 2) if arg == "deep" else (1, 1))
    c.data.image_size = 32
    return c
""")
    folder_data = ["--config.data.source=folder", f"--config.data.folder={folder}",
                   "--config.num_classes=2", "--config.batch_size=16"]
    for i, (variant, extra, expected) in enumerate([
        ("", ["--init", tmp_path / "nowhere"], r"error: --init \S+nowhere: no such workdir or "
         "file$"),
        ("", ["--init", tmp_path / "vit"], r"error: --init \S+vit: a mae run of "
         r"model.name='vit', but this config fine-tunes model.name='swin'"),
        (":deep", ["--init", pretrain_workdir], r"error: --init \S+: its encoder does not fit "
         r".*model.depths: \[1, 1\] there, \(1, 2\) here; 13 tensor"),
        ("", folder_data, r"error: image folder .*: cannot read or decode image "
         r".*train/a/0\.png"),
    ]):
        workdir = tmp_path / f"ft{i}"
        with pytest.raises(SystemExit) as e:
            cli.finetune_main(["--config", f"{config}{variant}", "--workdir", str(workdir),
                               *map(str, extra)])
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert re.match(expected, err), err
        assert not os.path.exists(workdir), os.listdir(workdir)


@pytest.mark.parametrize("method", ["mixmim", "mae", "simmim", "ummae", "mixedae"])
def test_a_demo_run_fine_tunes_with_the_demo_configs_variant(method):
    """configs/demo.py:<method>,finetune is the demo model's classifier: the demo pretraining's
    encoder loads into it tensor for tensor (a dry run: zero arrays of the right shapes)."""
    from mixmae_jax.models import get_model_module
    from mixmae_jax.tasks import finetune

    arg = "" if method == "mixmim" else f"{method},"
    pre, ft = load("demo.py", method if arg else None), load("demo.py", f"{arg}finetune")
    finetune.validate(ft)
    assert (ft.data.source, ft.num_classes, ft.model.img_size) == ("digits", 10, 64)
    assert ft.total_steps > 0 and ft.epochs == 0
    source = finetune._zeros(step_lib.graphdef_and_abstract_params(get_method(pre))[1])
    ft_method = get_method(ft)
    template = finetune._zeros(jax.eval_shape(lambda: step_lib.init_params(
        ft_method, jax.random.PRNGKey(0), lambda rngs: ft_method.build_classifier(10, rngs))))
    _, report = get_model_module(ft.model.name).load(source, pre.model, template, ft.model)
    assert len(report.loaded) > 10 and not [p for p in report.fresh if "encoder" in p]
