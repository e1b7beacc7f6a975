"""Parity of the Flax MixMIM with the plain torch reference, through the checkpoint converter.

Random JAX params -> `params_to_state_dict` -> strict `load_state_dict` into the torch reference;
same images (NHWC / NCHW), same final-grid mask shared by the batch, JAX num_groups=1 so the
partner of sample i is n-1-i (torch's x.flip(0)). Errors are relative Frobenius errors
||a - b|| / ||b|| (b = torch), printed per quantity (`pytest -s`).

Also: the converter's round trip, error paths, atomic writes and window resizing.
"""

import argparse
import os
import time

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from mixmae_jax.config import model_config
from mixmae_jax.convert import from_torch, to_torch
from mixmae_jax.convert import keymap as K
from mixmae_jax.convert import torch_reference as R
from mixmae_jax.methods.mixmim import MixMIMModel, dual_reconstruction_loss
from mixmae_jax.models.classifier import SwinClassifier
from mixmae_jax.train.step import bind

FWD_TOL = 1e-5
GRAD_TOL = 1e-4
# Tiny graphs compile ~3x faster at LLVM -O0; the HLO and the fp semantics (no fast-math) are
# unchanged. The full-size MixMIM-B test compiles with the default options.
FAST_COMPILE = {"xla_backend_optimization_level": 0}

TINY = {
    # grid 8 (8x8 -> 4x4), windows 4: 4 windows then one global window; stride 8.
    "2stage": dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                   window_sizes=(4, 4), decoder_dim=32, decoder_depth=2, decoder_num_heads=2),
    # grid 16 (16 -> 8 -> 4), windows 8/8/4: 4 windows, then global, global; stride 16.
    "3stage": dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2),
                   num_heads=(1, 2, 4), window_sizes=(8, 8, 4), decoder_dim=32, decoder_depth=1,
                   decoder_num_heads=2),
}


def tiny_cfg(name, **kw):
    cfg = model_config("B", 224)
    cfg.update(TINY[name])
    cfg.update(kw)
    return cfg


def rel_err(a, b) -> float:
    """||a - b||_F / ||b||_F (b is the torch reference)."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b.detach().numpy() if isinstance(b, torch.Tensor) else b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def abstract_model(build):
    """(graphdef, abstract params) without allocating."""
    graphdef, state = nnx.split(nnx.eval_shape(build), nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def random_params(abstract, seed):
    """Random params with init-like scales, non-trivial norms and biases (numpy, float32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in K.flatten(abstract).items():
        shape = tuple(leaf.shape)
        noise = rng.standard_normal(shape, dtype=np.float32)
        if path.endswith(".scale"):
            v = 1.0 + 0.2 * noise
        elif path.endswith(".bias"):
            v = 0.1 * noise
        elif path.endswith(".kernel"):
            fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]
            v = noise * np.float32(np.sqrt(2.0 / (fan_in + fan_out)))
        else:  # relative_position_bias_table, mask_token
            v = 0.5 * noise
        out[path] = v.astype(np.float32)
    return K.unflatten(out)


def shared_mask(final_grid, batch, seed):
    """Final-grid mask with exactly int(L * 0.5) ones, the same for every sample."""
    n = final_grid * final_grid
    grid = np.zeros(n, np.float32)
    grid[np.random.default_rng(seed).permutation(n)[: int(n * 0.5)]] = 1.0
    return grid.reshape(final_grid, final_grid), np.tile(grid, (batch, 1))


def nchw(images):
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def torch_pretrain(cfg, state_dict):
    model = R.MixMIMPretrainTorch.from_model_config(cfg)
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def loss_and_grads(graphdef, norm_pix=True):
    def loss_fn(params, images, mask):
        model = bind(graphdef, params)
        z, stages = model.encode_mixed(images, mask, 1, return_stages=True)
        rec = model.reconstruct(z, mask)
        loss, aux = dual_reconstruction_loss(images, rec, mask, 1, model.encoder.stride,
                                             norm_pix)
        return loss, (aux, z, stages, rec)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)


def report(title, errors, tol):
    worst = max(errors, key=errors.get)
    print(f"\n[{title}] rel. error ||a-b||/||b||, tol {tol:g}; worst {worst} = "
          f"{errors[worst]:.3g}")
    for k, v in errors.items():
        print(f"    {k:58s} {v:.3g}")
    return worst, errors[worst]


# ---------------------------------------------------------------------------------------------
# 1. Tiny pretraining models: activations, loss and every gradient.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=list(TINY))
def tiny_run(request):
    name = request.param
    cfg = tiny_cfg(name)
    graphdef, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=1)
    state_dict = to_torch.params_to_state_dict(params, cfg)
    tmodel = torch_pretrain(cfg, state_dict)

    batch, n_stages = 4, len(cfg.depths)
    final = cfg.img_size // (cfg.patch_size * 2 ** (n_stages - 1))
    images = np.random.default_rng(2).standard_normal(
        (batch, cfg.img_size, cfg.img_size, 3), dtype=np.float32)
    grid, mask = shared_mask(final, batch, seed=3)

    (loss, (aux, z, stages, rec)), grads = loss_and_grads(graphdef)(params, images, mask)

    x = nchw(images)
    masks = R.make_stage_masks(grid, n_stages)
    tz, tstages = tmodel.forward_encoder(x, masks, return_stages=True)
    trec = tmodel.forward_decoder(tz, masks[-1])
    tloss = tmodel.forward_loss(x, trec, masks[-1])
    tb1, tb2 = tmodel.branch_losses(x, trec, masks[-1])
    tloss.backward()
    return dict(name=name, cfg=cfg, params=params, tmodel=tmodel, loss=loss, aux=aux, z=z,
                stages=stages, rec=rec, grads=grads, tz=tz, tstages=tstages, trec=trec,
                tloss=tloss, tb1=tb1, tb2=tb2)


def test_tiny_forward_parity(tiny_run):
    r = tiny_run
    b = r["z"].shape[0]
    errors = {}
    for s, (a, t) in enumerate(zip(r["stages"], r["tstages"], strict=True)):
        label = "patch embed + mix + APE" if s == 0 else f"stage {s - 1} output"
        errors[label] = rel_err(np.reshape(a, (b, -1, a.shape[-1])), t)
    errors["encoder output (final norm)"] = rel_err(r["z"], r["tz"])
    errors["decoder output x_rec"] = rel_err(r["rec"], r["trec"])
    errors["loss"] = rel_err(r["loss"], r["tloss"])
    errors["loss_branch1"] = rel_err(r["aux"]["loss_branch1"], r["tb1"])
    errors["loss_branch2"] = rel_err(r["aux"]["loss_branch2"], r["tb2"])
    worst, err = report(f"{r['name']} forward", errors, FWD_TOL)
    assert err <= FWD_TOL, f"worst forward error {worst}: {err:.3g} > {FWD_TOL}"


def test_tiny_gradient_parity(tiny_run):
    r = tiny_run
    grad_sd = to_torch.params_to_state_dict(r["grads"], r["cfg"])
    trainable = {k: p for k, p in r["tmodel"].named_parameters() if p.requires_grad}
    assert set(trainable) == {k for k in grad_sd if not K.is_constant_key(k)}
    errors = {k: rel_err(grad_sd[k].numpy(), p.grad) for k, p in trainable.items()}
    worst, err = report(f"{r['name']} gradients ({len(errors)} tensors)", errors, GRAD_TOL)
    assert err <= GRAD_TOL, f"worst gradient error {worst}: {err:.3g} > {GRAD_TOL}"


# ---------------------------------------------------------------------------------------------
# 2. MixMIM-B at full size: one loss, batch 2.
# ---------------------------------------------------------------------------------------------


def test_mixmim_b_loss_parity():
    t0 = time.perf_counter()
    cfg = model_config("B", 224)
    graphdef, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=4)
    state_dict = to_torch.params_to_state_dict(params, cfg)
    assert len(state_dict) == 456

    images = np.random.default_rng(5).standard_normal((2, 224, 224, 3), dtype=np.float32)
    grid, mask = shared_mask(7, 2, seed=6)
    assert mask.sum(axis=1).tolist() == [24.0, 24.0]

    @jax.jit
    def loss_fn(params, images, mask):
        model = bind(graphdef, params)
        rec = model(images, mask, 1)
        return dual_reconstruction_loss(images, rec, mask, 1, 32, True)

    loss, aux = loss_fn(params, images, mask)
    loss = float(loss)
    del params

    with torch.device("meta"):
        tmodel = R.MixMIMPretrainTorch.from_model_config(cfg)
    tmodel.load_state_dict(state_dict, strict=True, assign=True)
    tmodel.eval()
    x = nchw(images)
    masks = R.make_stage_masks(grid, 4)
    with torch.no_grad():
        trec = tmodel.forward_decoder(tmodel.forward_encoder(x, masks), masks[-1])
        tloss = tmodel.forward_loss(x, trec, masks[-1])
        tb1, tb2 = tmodel.branch_losses(x, trec, masks[-1])
    errors = {"loss": rel_err(loss, tloss), "loss_branch1": rel_err(aux["loss_branch1"], tb1),
              "loss_branch2": rel_err(aux["loss_branch2"], tb2)}
    worst, err = report(f"MixMIM-B 224, batch 2 (loss {loss:.6f} vs {tloss.item():.6f}, "
                        f"{time.perf_counter() - t0:.1f} s)", errors, FWD_TOL)
    assert err <= FWD_TOL, f"MixMIM-B {worst} error {err:.3g} > {FWD_TOL}"


# ---------------------------------------------------------------------------------------------
# 3. Finetuning export.
# ---------------------------------------------------------------------------------------------


def test_finetune_features_parity():
    cfg = tiny_cfg("3stage")
    graphdef, abstract = abstract_model(lambda: SwinClassifier(cfg, 10, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=7)
    state_dict = to_torch.params_to_state_dict(params, cfg, format="finetune", num_classes=10)
    assert list(state_dict)[0] == "absolute_pos_embed" and list(state_dict)[-1] == "head.bias"
    tmodel = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10)
    tmodel.load_state_dict(state_dict, strict=True)
    tmodel.eval()
    np.testing.assert_array_equal(state_dict["head.weight"].numpy(), params["head"]["kernel"].T)

    images = np.random.default_rng(8).standard_normal((3, 64, 64, 3), dtype=np.float32)
    def features_and_logits(params, images):
        model = bind(graphdef, params)
        feats = model.forward_features(images)
        return feats, model.head(feats.mean(axis=1))

    feats, logits = jax.jit(features_and_logits, compiler_options=FAST_COMPILE)(params, images)
    with torch.no_grad():
        tfeats = tmodel.forward_features(nchw(images))
        tlogits = tmodel.head(tfeats.mean(1))
    errors = {"forward_features": rel_err(feats, tfeats), "logits": rel_err(logits, tlogits)}
    worst, err = report("finetune tiny 3-stage", errors, FWD_TOL)
    assert err <= FWD_TOL, f"finetune {worst} error {err:.3g} > {FWD_TOL}"


def test_finetune_export_of_pretraining_params_has_fresh_head():
    cfg = tiny_cfg("2stage")
    _, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=9)
    sd = to_torch.params_to_state_dict(params, cfg, format="finetune", num_classes=10, seed=3)
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    w, b = sd["head.weight"], sd["head.bias"]
    assert w.shape == (10, 32) and torch.equal(b, torch.zeros(10))
    assert 1e-5 < float(w.std()) < 3e-5 and float(w.abs().max()) < 1e-4
    again = to_torch.params_to_state_dict(params, cfg, format="finetune", num_classes=10, seed=3)
    assert torch.equal(again["head.weight"], w)  # deterministic in `seed`
    tmodel = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10)
    tmodel.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# 4. Round trip torch -> JAX -> torch, bit-exact.
# ---------------------------------------------------------------------------------------------


def random_torch_state_dict(model, seed):
    """The reference's state_dict with every trainable tensor randomised (norms, biases too)."""
    gen = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    for k, v in sd.items():
        if v.is_floating_point() and k not in frozen:
            sd[k] = torch.randn(v.shape, generator=gen) * 0.1 + (1.0 if k.endswith("norm.weight")
                                                                 else 0.0)
    return sd


@pytest.mark.parametrize("fmt", ["pretrain", "finetune"])
@pytest.mark.parametrize("name", list(TINY))
def test_round_trip_is_bit_exact(name, fmt):
    cfg = tiny_cfg(name)
    torch.manual_seed(0)
    if fmt == "pretrain":
        tmodel = R.MixMIMPretrainTorch.from_model_config(cfg)
        build = lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    else:
        tmodel = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10)
        build = lambda: SwinClassifier(cfg, 10, rngs=nnx.Rngs(0))  # noqa: E731
    sd = random_torch_state_dict(tmodel, seed=11)
    _, template = abstract_model(build)
    params, rep = from_torch.state_dict_to_params(sd, cfg, template)
    assert rep.file_format == fmt and not rep.resized and not rep.skipped and not rep.kept_fresh
    back = to_torch.params_to_state_dict(params, cfg, format=fmt, num_classes=10)
    assert list(back) == list(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype, k
        assert torch.equal(back[k], v), k
    assert back[next(k for k in sd if k.endswith("relative_position_index"))].dtype == torch.int64


# ---------------------------------------------------------------------------------------------
# 5. Error paths.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pretrain_sd():
    cfg = tiny_cfg("2stage")
    torch.manual_seed(0)
    sd = R.MixMIMPretrainTorch.from_model_config(cfg).state_dict()
    _, template = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    return cfg, sd, template


def _conversion_error(fn, *args, **kw) -> str:
    with pytest.raises(K.ConversionError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_from_torch_unknown_missing_and_wrong_shape_keys_are_named(tiny_pretrain_sd):
    cfg, sd, template = tiny_pretrain_sd
    bad = dict(sd)
    bad["layers.0.blocks.0.attn.extra_thing"] = torch.zeros(3)
    del bad["layers.1.blocks.1.mlp.fc2.weight"]
    del bad["decoder_norm.bias"]
    bad["layers.0.blocks.1.norm1.weight"] = torch.ones(17)
    bad["decoder_embed.weight"] = torch.ones(32, 31)
    msg = _conversion_error(from_torch.state_dict_to_params, bad, cfg, template)
    print("\n" + msg)
    for key in ("layers.0.blocks.0.attn.extra_thing", "layers.1.blocks.1.mlp.fc2.weight",
                "decoder_norm.bias", "layers.0.blocks.1.norm1.weight", "decoder_embed.weight"):
        assert key in msg


def test_from_torch_checks_constants(tiny_pretrain_sd):
    cfg, sd, template = tiny_pretrain_sd
    bad = dict(sd)
    index = bad["layers.0.blocks.1.attn.relative_position_index"].clone()
    index[0, 0] += 1
    bad["layers.0.blocks.1.attn.relative_position_index"] = index
    msg = _conversion_error(from_torch.state_dict_to_params, bad, cfg, template)
    assert "layers.0.blocks.1.attn.relative_position_index" in msg

    # An APE that is not sin-cos (e.g. bicubic-resized by the official finetune loader).
    bad = dict(sd)
    bad["absolute_pos_embed"] = sd["absolute_pos_embed"] + 1e-3
    msg = _conversion_error(from_torch.state_dict_to_params, bad, cfg, template)
    assert "absolute_pos_embed" in msg and "allow_ape_mismatch" in msg
    with pytest.warns(UserWarning, match="absolute_pos_embed"):
        _, rep = from_torch.state_dict_to_params(bad, cfg, template, allow_ape_mismatch=True)
    assert any("absolute_pos_embed" in n for n in rep.notes)


def test_to_torch_missing_extra_and_wrong_shape_params_are_named():
    cfg = tiny_cfg("2stage")
    _, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=0)
    flat = K.flatten(params)
    del flat["encoder.layers.1.blocks.0.mlp.fc1.bias"]
    flat["encoder.layers.0.blocks.0.attn.qkv.kernel"] = np.zeros((16, 47), np.float32)
    flat["encoder.layers.0.blocks.0.attn.gate.kernel"] = np.zeros((16, 16), np.float32)
    msg = _conversion_error(to_torch.params_to_state_dict, K.unflatten(flat), cfg)
    print("\n" + msg)
    for key in ("layers.1.blocks.0.mlp.fc1.bias", "layers.0.blocks.0.attn.qkv.weight",
                "layers.0.blocks.0.attn.gate.weight"):
        assert key in msg
    # A classifier's params have no decoder: a pretraining export names every decoder key.
    _, cls_abstract = abstract_model(lambda: SwinClassifier(cfg, 10, rngs=nnx.Rngs(0)))
    msg = _conversion_error(to_torch.params_to_state_dict, random_params(cls_abstract, 0), cfg)
    assert "mask_token" in msg and "decoder_pred.weight" in msg and "head.weight" in msg


def test_load_refuses_pickled_objects_without_trust(tmp_path, tiny_pretrain_sd):
    _, sd, _ = tiny_pretrain_sd
    official = tmp_path / "official.pth"
    torch.save({"model": sd, "args": argparse.Namespace(lr=1e-3, model="mixmim_base"),
                "epoch": 599}, official)
    msg = _conversion_error(from_torch.load_torch_checkpoint, official)
    assert "--trust-pickle" in msg
    loaded = from_torch.load_torch_checkpoint(official, trust_pickle=True)
    assert list(loaded) == list(sd) and all(torch.equal(loaded[k], sd[k]) for k in sd)

    bare = tmp_path / "bare.pth"
    torch.save(sd, bare)  # a bare state_dict loads with the safe loader
    assert list(from_torch.load_torch_checkpoint(bare)) == list(sd)


def test_save_is_atomic_and_loads_with_weights_only(tmp_path, monkeypatch, tiny_pretrain_sd):
    _, sd, _ = tiny_pretrain_sd
    path = tmp_path / "out.pth"
    to_torch.save_torch_checkpoint(sd, path)
    loaded = torch.load(path, weights_only=True)
    assert list(loaded) == ["model"] and list(loaded["model"]) == list(sd)
    assert all(torch.equal(loaded["model"][k], sd[k]) for k in sd)
    before = path.read_bytes()

    real_save = torch.save

    def failing_save(obj, f, *a, **kw):  # writes half a file, then fails
        real_save(obj, f, *a, **kw)
        f.truncate(100)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", failing_save)
    changed = {k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}
    with pytest.raises(OSError, match="simulated"):
        to_torch.save_torch_checkpoint(changed, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.pth"]


# ---------------------------------------------------------------------------------------------
# 6. Window resize and pretraining <-> finetuning templates.
# ---------------------------------------------------------------------------------------------


def test_bias_tables_are_resized_like_the_official_loader(tiny_pretrain_sd):
    _, sd, _ = tiny_pretrain_sd  # img 32, windows (4, 4)
    target = tiny_cfg("2stage", img_size=64, window_sizes=(8, 4))  # 16x16 map, window 8
    _, template = abstract_model(lambda: MixMIMModel(target, rngs=nnx.Rngs(0)))
    params, rep = from_torch.state_dict_to_params(sd, target, template)
    print("\n" + str(rep))
    assert len(rep.resized) == 2 and all(k.startswith("layers.0.") for k in rep.resized)
    assert any("absolute_pos_embed" in n for n in rep.notes)
    for j in range(2):
        src = sd[f"layers.0.blocks.{j}.attn.relative_position_bias_table"]  # [49, 2]
        want = F.interpolate(src.T.reshape(1, 2, 7, 7), size=(15, 15), mode="bicubic",
                             align_corners=False).reshape(2, 225).T
        got = params["encoder"]["layers"][0]["blocks"][j]["attn"]["relative_position_bias_table"]
        assert got.shape == (225, 2)
        np.testing.assert_array_equal(got, want.numpy())
        same = params["encoder"]["layers"][1]["blocks"][j]["attn"]["relative_position_bias_table"]
        np.testing.assert_array_equal(
            same, sd[f"layers.1.blocks.{j}.attn.relative_position_bias_table"].numpy())


def test_finetune_file_into_pretraining_template_keeps_fresh_decoder():
    cfg = tiny_cfg("2stage")
    torch.manual_seed(0)
    sd = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10).state_dict()
    _, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    template = random_params(abstract, seed=12)  # concrete: stands in for a fresh init
    params, rep = from_torch.state_dict_to_params(sd, cfg, template)
    assert rep.file_format == "finetune" and rep.template_format == "pretrain"
    assert sorted(rep.skipped) == sorted(
        f"{k}: finetuning head, the pretraining template has none" for k in ("head.weight",
                                                                             "head.bias"))
    fresh = {p for p in K.flatten(template) if p.startswith("decoder.")}
    assert set(rep.kept_fresh) == fresh
    flat = K.flatten(params)
    for p in fresh:
        np.testing.assert_array_equal(flat[p], K.flatten(template)[p])
    np.testing.assert_array_equal(flat["encoder.norm.scale"], sd["norm.weight"].numpy())
    # An abstract template cannot supply the fresh decoder: refused, naming the keys.
    msg = _conversion_error(from_torch.state_dict_to_params, sd, cfg, abstract)
    assert "mask_token" in msg and "decoder_pred.weight" in msg


def test_pretraining_file_into_finetuning_template(tiny_pretrain_sd):
    cfg, sd, _ = tiny_pretrain_sd
    template = random_params(abstract_model(lambda: SwinClassifier(cfg, 10, rngs=nnx.Rngs(0)))[1],
                             seed=13)
    params, rep = from_torch.state_dict_to_params(sd, cfg, template)
    assert rep.file_format == "pretrain" and set(rep.kept_fresh) == {"head.kernel", "head.bias"}
    assert {s.split(":")[0] for s in rep.skipped} == {
        k for k in sd if k.startswith(("mask_token", "decoder_"))}
    np.testing.assert_array_equal(params["head"]["kernel"], template["head"]["kernel"])
    lines = list(rep)
    assert lines[0].startswith("pretrain checkpoint -> finetune params")


def test_finetune_head_with_another_number_of_classes():
    cfg = tiny_cfg("2stage")
    torch.manual_seed(0)
    sd = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10).state_dict()
    template = random_params(abstract_model(lambda: SwinClassifier(cfg, 5, rngs=nnx.Rngs(0)))[1],
                             seed=14)
    msg = _conversion_error(from_torch.state_dict_to_params, sd, cfg, template)
    assert "head.weight" in msg and "head.bias" in msg and "drop head.weight" in msg
    no_head = {k: v for k, v in sd.items() if not k.startswith("head.")}
    params, rep = from_torch.state_dict_to_params(no_head, cfg, template, format="finetune")
    assert set(rep.kept_fresh) == {"head.kernel", "head.bias"}
    np.testing.assert_array_equal(params["head"]["kernel"], template["head"]["kernel"])
    partial = dict(no_head, **{"head.weight": torch.zeros(5, 32)})  # weight without bias
    assert "head.bias" in _conversion_error(from_torch.state_dict_to_params, partial, cfg,
                                            template)


def test_load_rejects_files_that_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    msg = _conversion_error(from_torch.load_torch_checkpoint, junk, trust_pickle=True)
    assert "junk.pth" in msg
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    assert "state_dict" in _conversion_error(from_torch.load_torch_checkpoint, not_sd)
