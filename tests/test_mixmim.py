"""Parity of the Flax MixMIM with the plain torch reference, through the checkpoint converter.

Random JAX params -> `params_to_state_dict` -> strict `load_state_dict` into the torch reference;
same images (NHWC / NCHW), same final-grid mask shared by the batch, JAX num_groups=1 so the
partner of sample i is n-1-i (torch's x.flip(0)). The reference keeps the constants it computes
itself (relative-position indices, sin-cos tables): the export's are checked against them, never
loaded over them.

Tolerances: see parity.py (the JAX fp32 error against the float64 reference, bounded by the
torch fp32 error).

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
from parity import (
    FAST_COMPILE,
    abstract_model,
    assert_exports_back_exactly,
    check_against_exact,
    load_with_own_constants,
    nchw,
    random_params,
    random_torch_state_dict,
)
from recipes import mixmim_model
from references import mixmim as R

from mixmae_jax.interop import from_torch, to_torch
from mixmae_jax.interop import keymap as K
from mixmae_jax.interop.mixmim_layout import MixMIMLayout
from mixmae_jax.methods.mixmim import MixMIMModel, dual_reconstruction_loss
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.numerics import FLOOR, FWD_TOL, GRAD_TOL, RATIO, rel_err
from mixmae_jax.train.step import bind

# Which official keys are constants does not depend on the size.
LAYOUT = MixMIMLayout(mixmim_model("B"))

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
    cfg = mixmim_model("B", 224)
    cfg.update(TINY[name])
    cfg.update(kw)
    return cfg


def shared_mask(final_grid, batch, seed, count=None):
    """Final-grid mask with `count` ones (default int(L * 0.5)), the same for every sample."""
    n = final_grid * final_grid
    grid = np.zeros(n, np.float32)
    grid[np.random.default_rng(seed).permutation(n)[: int(n * 0.5) if count is None else count]] = 1
    return grid.reshape(final_grid, final_grid), np.tile(grid, (batch, 1))


def torch_pretrain(cfg, state_dict, dtype=torch.float32):
    model = R.MixMIMPretrainTorch.from_model_config(cfg)
    return load_with_own_constants(model, state_dict, LAYOUT).to(dtype).eval()


def loss_and_grads(graphdef, norm_pix=True):
    def loss_fn(params, images, mask):
        model = bind(graphdef, params)
        tokens, source_ids = model.mixed_tokens(images, mask, 1)
        stages = model.encoder.stage_outputs(tokens, source_ids)
        z = model.encoder.encode(tokens, source_ids)
        rec = model.reconstruct(z, mask)
        loss, aux = dual_reconstruction_loss(images, rec, mask, 1, model.encoder.stride,
                                             norm_pix)
        return loss, (aux, z, stages, rec)

    return jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)


# ---------------------------------------------------------------------------------------------
# 1. Tiny pretraining models: activations, loss and every gradient.
# ---------------------------------------------------------------------------------------------


# Lopsided masks: the dual loss weights the branches by how many cells each predicts, which a
# half-and-half mask cannot show (there the mean of the two branch losses is the same number).
MASK_COUNTS = {"2stage": 11, "3stage": 3}  # of 16 final-grid cells


def torch_run(tmodel, images, grid, n_stages, dtype):
    """Stage outputs, loss, branch losses and gradients of the reference, in `dtype`."""
    x = nchw(images).to(dtype)
    masks = R.make_stage_masks(grid, n_stages)
    tz, tstages = tmodel.forward_encoder(x, masks, return_stages=True)
    trec = tmodel.forward_decoder(tz, masks[-1])
    tloss = tmodel.forward_loss(x, trec, masks[-1])
    tb1, tb2 = tmodel.branch_losses(x, trec, masks[-1])
    tloss.backward()
    b = images.shape[0]
    values = {("patch embed + mix + APE" if s == 0 else f"stage {s - 1} output"): t.reshape(b, -1,
                                                                                     t.shape[-1])
              for s, t in enumerate(tstages)}
    values.update({"encoder output (final norm)": tz, "decoder output x_rec": trec,
                   "loss": tloss, "loss_branch1": tb1, "loss_branch2": tb2})
    grads = {k: p.grad for k, p in tmodel.named_parameters() if p.requires_grad}
    return ({k: v.detach().double().numpy() for k, v in values.items()},
            {k: v.double().numpy() for k, v in grads.items()})


@pytest.fixture(scope="module", params=list(TINY))
def tiny_run(request):
    name = request.param
    cfg = tiny_cfg(name)
    graphdef, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=1)
    state_dict = to_torch.params_to_state_dict(params, MixMIMLayout(cfg))

    batch, n_stages = 4, len(cfg.depths)
    final = cfg.img_size // (cfg.patch_size * 2 ** (n_stages - 1))
    images = np.random.default_rng(2).standard_normal(
        (batch, cfg.img_size, cfg.img_size, 3), dtype=np.float32)
    grid, mask = shared_mask(final, batch, seed=3, count=MASK_COUNTS[name])

    (loss, (aux, z, stages, rec)), grads = loss_and_grads(graphdef)(params, images, mask)
    values = {("patch embed + mix + APE" if s == 0 else f"stage {s - 1} output"):
              np.reshape(a, (batch, -1, a.shape[-1])) for s, a in enumerate(stages)}
    # The official decoder output stacks branch 1's rows over branch 2's ([z; z]).
    values.update({"encoder output (final norm)": z,
                   "decoder output x_rec": np.concatenate(rec, axis=0), "loss": loss,
                   "loss_branch1": aux["loss_branch1"], "loss_branch2": aux["loss_branch2"]})
    grad_sd = to_torch.params_to_state_dict(grads, MixMIMLayout(cfg))

    torch_values, torch_grads = {}, {}
    for dtype in (torch.float32, torch.float64):
        tmodel = torch_pretrain(cfg, state_dict, dtype)
        torch_values[dtype], torch_grads[dtype] = torch_run(tmodel, images, grid, n_stages, dtype)
    return dict(name=name, values=values, grad_sd=grad_sd, torch_values=torch_values,
                torch_grads=torch_grads)


def test_tiny_forward_parity(tiny_run):
    r = tiny_run
    check_against_exact(f"{r['name']} forward", r["values"], r["torch_values"][torch.float32],
                        r["torch_values"][torch.float64], FWD_TOL)


def test_tiny_gradient_parity(tiny_run):
    r = tiny_run
    t32, t64 = r["torch_grads"][torch.float32], r["torch_grads"][torch.float64]
    assert set(t64) == {k for k in r["grad_sd"] if not LAYOUT.is_constant_key(k)}
    jax_grads = {k: r["grad_sd"][k].numpy() for k in t64}
    check_against_exact(f"{r['name']} gradients ({len(t64)} tensors)", jax_grads, t32, t64,
                        GRAD_TOL)


def test_lopsided_mask_separates_the_dual_loss_from_the_mean_of_branches(tiny_run):
    """With the masks above, a loss computed as (branch1 + branch2) / 2 would miss the official
    loss by far more than the parity tolerance (at a 8/16 mask it would be the same number)."""
    v = tiny_run["torch_values"][torch.float64]
    mean_of_branches = (v["loss_branch1"] + v["loss_branch2"]) / 2
    assert abs(mean_of_branches - v["loss"]) > 10 * RATIO * FLOOR * abs(v["loss"])


# ---------------------------------------------------------------------------------------------
# 2. MixMIM-B at full size: one loss, batch 2.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_mixmim_b_loss_parity():
    t0 = time.perf_counter()
    cfg = mixmim_model("B", 224)
    graphdef, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=4)
    state_dict = to_torch.params_to_state_dict(params, MixMIMLayout(cfg))
    assert len(state_dict) == 456

    images = np.random.default_rng(5).standard_normal((2, 224, 224, 3), dtype=np.float32)
    grid, mask = shared_mask(7, 2, seed=6)
    assert mask.sum(axis=1).tolist() == [24.0, 24.0]  # 24 cells predicted by branch 1, 25 by 2

    @jax.jit
    def loss_fn(params, images, mask):
        model = bind(graphdef, params)
        rec = model(images, mask, 1)
        return dual_reconstruction_loss(images, rec, mask, 1, 32, True)

    loss, aux = loss_fn(params, images, mask)
    values = {"loss": loss, **aux}
    del params

    tmodel = torch_pretrain(cfg, state_dict)
    del state_dict
    masks = R.make_stage_masks(grid, 4)
    exact = {}
    for dtype in (torch.float32, torch.float64):
        x = nchw(images).to(dtype)
        with torch.no_grad():
            trec = tmodel.forward_decoder(tmodel.forward_encoder(x, masks), masks[-1])
            tb1, tb2 = tmodel.branch_losses(x, trec, masks[-1])
            exact[dtype] = {"loss": tmodel.forward_loss(x, trec, masks[-1]).double().numpy(),
                            "loss_branch1": tb1.double().numpy(),
                            "loss_branch2": tb2.double().numpy()}
        tmodel = tmodel.double()
    check_against_exact(f"MixMIM-B 224, batch 2 (loss {float(loss):.6f} vs "
                        f"{float(exact[torch.float64]['loss']):.6f}, "
                        f"{time.perf_counter() - t0:.1f} s)", values, exact[torch.float32],
                        exact[torch.float64], FWD_TOL)


# ---------------------------------------------------------------------------------------------
# 3. Finetuning export.
# ---------------------------------------------------------------------------------------------


def test_finetune_features_parity():
    cfg = tiny_cfg("3stage")
    graphdef, abstract = abstract_model(lambda: build_classifier(cfg, 10, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=7)
    state_dict = to_torch.params_to_state_dict(params, MixMIMLayout(cfg), format="finetune",
                                               num_classes=10)
    assert list(state_dict)[0] == "absolute_pos_embed" and list(state_dict)[-1] == "head.bias"
    tmodel = load_with_own_constants(R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10),
                                     state_dict, LAYOUT).eval()
    np.testing.assert_array_equal(state_dict["head.weight"].numpy(), params["head"]["kernel"].T)

    images = np.random.default_rng(8).standard_normal((3, 64, 64, 3), dtype=np.float32)
    def features_and_logits(params, images):
        model = bind(graphdef, params)
        return model.encoder(images), model(images)

    feats, logits = jax.jit(features_and_logits, compiler_options=FAST_COMPILE)(params, images)
    exact = {}
    for dtype in (torch.float32, torch.float64):
        tmodel = tmodel.to(dtype)
        with torch.no_grad():
            tfeats = tmodel.forward_features(nchw(images).to(dtype))
            exact[dtype] = {"forward_features": tfeats.double().numpy(),
                            "logits": tmodel.head(tfeats.mean(1)).double().numpy()}
    check_against_exact("finetune tiny 3-stage", {"forward_features": feats, "logits": logits},
                        exact[torch.float32], exact[torch.float64], FWD_TOL)


def test_every_layer_norm_matches_the_references_own():
    """Each LayerNorm of the Flax model, with random affine params, equals the reference's
    module of the same name on low-variance tokens, where eps dominates the denominator (an eps
    of 1e-6 instead of 1e-5 changes the output by ~2x here, by ~5e-6 at unit variance)."""
    cfg = tiny_cfg("2stage")
    model = MixMIMModel(cfg, rngs=nnx.Rngs(0))
    tmodel = R.MixMIMPretrainTorch.from_model_config(cfg)
    torch_modules = dict(tmodel.named_modules())
    rng = np.random.default_rng(0)
    checked = 0
    for path, node in nnx.iter_graph(model):
        if not isinstance(node, nnx.LayerNorm):
            continue
        name = LAYOUT.torch_name(".".join(map(str, path)) + ".scale", "pretrain")[: -len(".weight")]
        tln = torch_modules[name].double()
        assert isinstance(tln, torch.nn.LayerNorm), name
        dim = node.scale[...].shape[0]
        node.scale[...] = rng.standard_normal(dim).astype(np.float32)
        node.bias[...] = rng.standard_normal(dim).astype(np.float32)
        with torch.no_grad():
            tln.weight.copy_(torch.from_numpy(np.asarray(node.scale[...], np.float64)))
            tln.bias.copy_(torch.from_numpy(np.asarray(node.bias[...], np.float64)))
        x = (1e-3 * rng.standard_normal((5, dim))).astype(np.float32)  # variance 1e-6 << eps
        with torch.no_grad():
            want = tln(torch.from_numpy(x).double()).numpy()
        err = rel_err(node(x), want)
        assert err < RATIO * FLOOR, f"{name}: {err:.3g} (eps {node.epsilon} vs {tln.eps})"
        checked += 1
    assert checked == 4 * 2 + 1 + 1 + 2 * 2 + 1 + 1  # blocks, merge, embed, decoder, norms


def _reference_constants(key: str, value: np.ndarray) -> np.ndarray:
    """What the torch reference computes for a constant of the official layout, by its shape."""
    if key.endswith("relative_position_index"):
        return R.relative_position_index(int(round(np.sqrt(value.shape[0]))))
    grid = int(round(np.sqrt(value.shape[1])))
    return R.sincos_pos_embed_2d(value.shape[2], grid).astype(np.float32)[None]


@pytest.mark.parametrize("variant,res", [("B", 224), ("L", 224), ("H", 224), ("B", 384),
                                         ("tiny2", 32), ("tiny3", 64)])
def test_exported_constants_equal_the_references_own(variant, res):
    """The index buffers and sin-cos tables that mixmae-jax computes and exports are exactly the
    torch reference's own (computed there from the spec, independently)."""
    cfg = tiny_cfg(f"{variant[-1]}stage") if variant.startswith("tiny") else mixmim_model(variant,
                                                                                           res)
    for pretrain in (True, False):
        constants = MixMIMLayout(cfg).constant_entries("pretrain" if pretrain else "finetune")
        assert {k for k in constants if "pos_embed" in k} == (
            {"absolute_pos_embed", "decoder_pos_embed"} if pretrain else {"absolute_pos_embed"})
        for k, v in constants.items():
            want = _reference_constants(k, v)
            assert v.dtype == want.dtype and v.shape == want.shape, k
            np.testing.assert_array_equal(v, want, err_msg=k)
    if variant.startswith("tiny"):  # the whole model: every constant the reference holds
        own = R.MixMIMPretrainTorch.from_model_config(cfg).state_dict()
        exported = MixMIMLayout(cfg).constant_entries("pretrain")
        assert set(exported) == {k for k in own if LAYOUT.is_constant_key(k)}
        for k, v in exported.items():
            np.testing.assert_array_equal(v, own[k].numpy(), err_msg=k)


def test_finetune_export_of_pretraining_params_has_fresh_head():
    cfg = tiny_cfg("2stage")
    _, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=9)
    sd = to_torch.params_to_state_dict(params, MixMIMLayout(cfg), format="finetune",
                                       num_classes=10, seed=3)
    assert not any(k.startswith(("decoder", "mask_token")) for k in sd)
    w, b = sd["head.weight"], sd["head.bias"]
    assert w.shape == (10, 32) and torch.equal(b, torch.zeros(10))
    assert 1e-5 < float(w.std()) < 3e-5 and float(w.abs().max()) < 1e-4
    again = to_torch.params_to_state_dict(params, MixMIMLayout(cfg), format="finetune",
                                          num_classes=10, seed=3)
    assert torch.equal(again["head.weight"], w)  # deterministic in `seed`
    tmodel = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10)
    tmodel.load_state_dict(sd, strict=True)


# ---------------------------------------------------------------------------------------------
# 4. Round trip torch -> JAX -> torch, bit-exact.
# ---------------------------------------------------------------------------------------------


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
        build = lambda: build_classifier(cfg, 10, rngs=nnx.Rngs(0))  # noqa: E731
    sd = random_torch_state_dict(tmodel, seed=11)
    _, template = abstract_model(build)
    params, rep = from_torch.state_dict_to_params(sd, MixMIMLayout(cfg), template)
    assert rep.file_format == fmt and not rep.resized and not rep.skipped and not rep.kept_fresh
    back = assert_exports_back_exactly(params, sd, MixMIMLayout(cfg), fmt, 10)
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
    msg = _conversion_error(from_torch.state_dict_to_params, bad, MixMIMLayout(cfg), template)
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
    msg = _conversion_error(from_torch.state_dict_to_params, bad, MixMIMLayout(cfg), template)
    assert "layers.0.blocks.1.attn.relative_position_index" in msg

    # An APE that is not sin-cos (e.g. bicubic-resized by the official finetune loader).
    bad = dict(sd)
    bad["absolute_pos_embed"] = sd["absolute_pos_embed"] + 1e-3
    msg = _conversion_error(from_torch.state_dict_to_params, bad, MixMIMLayout(cfg), template)
    assert "absolute_pos_embed" in msg and "allow_ape_mismatch" in msg
    with pytest.warns(UserWarning, match="absolute_pos_embed"):
        _, rep = from_torch.state_dict_to_params(bad, MixMIMLayout(cfg), template,
                                                 allow_ape_mismatch=True)
    assert any("absolute_pos_embed" in n for n in rep.notes)


def test_to_torch_missing_extra_and_wrong_shape_params_are_named():
    cfg = tiny_cfg("2stage")
    _, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=0)
    flat = K.flatten(params)
    del flat["encoder.layers.1.blocks.0.mlp.fc1.bias"]
    flat["encoder.layers.0.blocks.0.attn.qkv.kernel"] = np.zeros((16, 47), np.float32)
    flat["encoder.layers.0.blocks.0.attn.gate.kernel"] = np.zeros((16, 16), np.float32)
    msg = _conversion_error(to_torch.params_to_state_dict, K.unflatten(flat), MixMIMLayout(cfg))
    print("\n" + msg)
    for key in ("layers.1.blocks.0.mlp.fc1.bias", "layers.0.blocks.0.attn.qkv.weight",
                "layers.0.blocks.0.attn.gate.weight"):
        assert key in msg
    # A classifier's params have no decoder: a pretraining export names every decoder key.
    _, cls_abstract = abstract_model(lambda: build_classifier(cfg, 10, rngs=nnx.Rngs(0)))
    msg = _conversion_error(to_torch.params_to_state_dict, random_params(cls_abstract, 0),
                            MixMIMLayout(cfg))
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
    params, rep = from_torch.state_dict_to_params(sd, MixMIMLayout(target), template)
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
    params, rep = from_torch.state_dict_to_params(sd, MixMIMLayout(cfg), template)
    assert rep.file_format == "finetune" and rep.template_format == "pretrain"
    assert sorted(rep.skipped) == sorted(
        f"{k}: finetuning-only, the pretraining template has none" for k in ("head.weight",
                                                                             "head.bias"))
    fresh = {p for p in K.flatten(template) if p.startswith("decoder.")}
    assert set(rep.kept_fresh) == fresh
    flat = K.flatten(params)
    for p in fresh:
        np.testing.assert_array_equal(flat[p], K.flatten(template)[p])
    np.testing.assert_array_equal(flat["encoder.norm.scale"], sd["norm.weight"].numpy())
    # An abstract template cannot supply the fresh decoder: refused, naming the keys.
    msg = _conversion_error(from_torch.state_dict_to_params, sd, MixMIMLayout(cfg), abstract)
    assert "mask_token" in msg and "decoder_pred.weight" in msg


def test_pretraining_file_into_finetuning_template(tiny_pretrain_sd):
    cfg, sd, _ = tiny_pretrain_sd
    template = random_params(abstract_model(lambda: build_classifier(cfg, 10, rngs=nnx.Rngs(0)))[1],
                             seed=13)
    params, rep = from_torch.state_dict_to_params(sd, MixMIMLayout(cfg), template)
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
    template = random_params(abstract_model(lambda: build_classifier(cfg, 5, rngs=nnx.Rngs(0)))[1],
                             seed=14)
    msg = _conversion_error(from_torch.state_dict_to_params, sd, MixMIMLayout(cfg), template)
    assert "head.weight" in msg and "head.bias" in msg and "drop head.weight" in msg
    no_head = {k: v for k, v in sd.items() if not k.startswith("head.")}
    params, rep = from_torch.state_dict_to_params(no_head, MixMIMLayout(cfg), template,
                                                  format="finetune")
    assert set(rep.kept_fresh) == {"head.kernel", "head.bias"}
    np.testing.assert_array_equal(params["head"]["kernel"], template["head"]["kernel"])
    partial = dict(no_head, **{"head.weight": torch.zeros(5, 32)})  # weight without bias
    assert "head.bias" in _conversion_error(from_torch.state_dict_to_params, partial,
                                            MixMIMLayout(cfg), template)


def test_load_rejects_files_that_are_not_checkpoints(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    msg = _conversion_error(from_torch.load_torch_checkpoint, junk, trust_pickle=True)
    assert "junk.pth" in msg
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    assert "state_dict" in _conversion_error(from_torch.load_torch_checkpoint, not_sd)
