"""UM-MAE and the UM-MAE paper's SimMIM baselines: parity with the plain torch references of the
official models (tests/references/ummae.py), conversion both ways, and the loss printed by
mixmae-convert + mixmae-visualize.

Parity as for the other methods (parity.py): random JAX params -> export -> strict load into the
torch reference (which keeps its own sin-cos tables), the same images and the same plan (mask and
secondary mask), torch in float32 and float64. With decoder_pos_order="official" the JAX model
reproduces the official pairing of latents and decoder positions; "true" is checked against the
reference's own "true" mode.
"""

import jax
import numpy as np
import pytest
import torch
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
from recipes import load
from references import ummae as R

from mixmae_jax.interop import from_torch, layout_for, to_torch
from mixmae_jax.interop import keymap as K
from mixmae_jax.methods import get_method
from mixmae_jax.methods.ummae import removed_units
from mixmae_jax.models import layers as L
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.numerics import FWD_TOL, GRAD_TOL
from mixmae_jax.train.step import bind

PRETRAIN = {"ummae_swin_t.py": R.UMSwinPretrainTorch, "ummae_pvt_s.py": R.UMPVTPretrainTorch,
            "ummae_vit_b.py": R.UMViTPretrainTorch,
            "simmim_ummae_swin_t.py": R.SimMIMUMSwinTorch,
            "simmim_ummae_pvt_s.py": R.SimMIMPVTTorch}
FINETUNE = {"ummae_swin": R.UMSwinFinetuneTorch, "pvt": R.UMPVTFinetuneTorch}


def reference(name, config):
    """The torch reference of a config's pretraining model (official pairing unless "true")."""
    cls = PRETRAIN[name]
    if config.method.name == "simmim":
        return cls.from_model_config(config.model)
    kw = dict(vis_mask_ratio=config.method.vis_mask_ratio)
    if config.model.name != "vit":
        kw["decoder_pos_order"] = config.method.decoder_pos_order
    return cls.from_model_config(config.model, **kw)


def torch_masks(method, plan):
    """The plan in the official convention: (mask, vis_mask) (B, L) bool on the unit grid."""
    if "slot" not in plan:  # SimMIM: one mask
        return torch.from_numpy(np.asarray(plan["mask"]).reshape(len(plan["mask"]), -1) > 0),
    b = plan["slot"].shape[0]
    mask = np.asarray(removed_units(plan["slot"])).reshape(b, -1) > 0
    vis = np.asarray(method.secondary_units(plan)) > 0
    return torch.from_numpy(mask), torch.from_numpy(vis)


def jax_run(method, graphdef, params, images, plan):
    """Loss, masked-unit predictions and gradients of the JAX model (one compiled call)."""

    def loss_fn(p):
        model = bind(graphdef, p)
        loss, _ = method.loss(model, {"image": images}, plan, 1)
        if method.name == "simmim":
            token_mask, _ = method.upsampled(plan["mask"], model)
            pred = L.patchify(model(images, token_mask), model.unit)
        else:
            pred = method.predict(model, images, plan)[0]
        return loss, pred

    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    return fn(params)


def torch_run(tmodel, images, masks, dtype, masked_only):
    x = nchw(images).to(dtype)
    loss, pred = tmodel(x, *masks)
    loss.backward()
    if masked_only:  # pretraining: the removed units' rows come last
        pred = pred[:, int((~masks[0][0]).sum()):]
    values = {"predictions": pred.detach().double().numpy(), "loss": loss.detach().double().numpy()}
    grads = {k: p.grad.double().numpy() for k, p in tmodel.named_parameters() if p.requires_grad}
    return values, grads


def parity_run(config, name, batch=3, seed=1):
    method = get_method(config)
    layout = layout_for(method.config)
    graphdef, abstract = abstract_model(lambda: method.build_model(nnx.Rngs(0)))
    params = random_params(abstract, seed=seed)
    state_dict = to_torch.params_to_state_dict(params, layout)
    size = config.model.img_size
    images = np.random.default_rng(seed + 1).standard_normal((batch, size, size, 3),
                                                              dtype=np.float32)
    plan = method.make_plan(jax.random.key(seed + 2), batch, 1)
    (loss, pred), grads = jax_run(method, graphdef, params, images, plan)
    values = {"predictions": pred, "loss": loss}
    if method.name == "simmim":  # the reference's rows are the units, masked or not
        values["predictions"] = pred
    masks = torch_masks(method, plan)
    torch_values, torch_grads = {}, {}
    for dtype in (torch.float32, torch.float64):
        tmodel = load_with_own_constants(reference(name, config), state_dict, layout)
        tmodel = tmodel.to(dtype).eval()
        torch_values[dtype], torch_grads[dtype] = torch_run(
            tmodel, images, masks, dtype, masked_only=method.name == "ummae")
    jax_grads = to_torch.params_to_state_dict(grads, layout)
    return dict(values=values, grads=jax_grads, torch_values=torch_values,
                torch_grads=torch_grads, layout=layout)


def check_run(title, r):
    check_against_exact(f"{title} forward", r["values"], r["torch_values"][torch.float32],
                        r["torch_values"][torch.float64], FWD_TOL)
    t32, t64 = r["torch_grads"][torch.float32], r["torch_grads"][torch.float64]
    assert set(t64) == {k for k in r["grads"] if not r["layout"].is_constant_key(k)}
    jax_grads = {k: r["grads"][k].numpy() for k in t64}
    # The position-bias MLP's output bias adds one constant to every logit of a softmax row:
    # its exact gradient is 0 (float64: ~1e-20), so a relative error means nothing; both fp32
    # sides are rounding noise of a sum of zero-mean terms, far below the other gradients.
    scale = max(float(np.abs(g).max()) for g in t64.values())
    vanishing = [k for k in t64 if float(np.abs(t64[k]).max()) < 1e-12 * scale]
    assert all(k.endswith("posmlp.2.bias") for k in vanishing), vanishing
    for k in vanishing:
        assert float(np.abs(jax_grads.pop(k)).max()) < 1e-6 * scale, k
    check_against_exact(f"{title} gradients ({len(jax_grads)} tensors, {len(vanishing)} exactly "
                        "0)", jax_grads, t32, t64, GRAD_TOL)


@pytest.mark.parametrize("name, order", [
    ("ummae_swin_t.py", "official"), ("ummae_swin_t.py", "true"),
    ("ummae_pvt_s.py", "official"), ("ummae_vit_b.py", "official"),
    ("simmim_ummae_swin_t.py", None), ("simmim_ummae_pvt_s.py", None)])
def test_tiny_parity(name, order):
    """Loss, predictions and every gradient against the float64 reference (tiny models: 64 px,
    three stages, shifted windows on the compact grid; ViT 32 px)."""
    overrides = [f"--config.method.decoder_pos_order={order}"] if order else []
    config = load(name, "tiny", overrides)
    check_run(f"{name} {order or ''} tiny", parity_run(config, name))


@pytest.mark.slow
def test_swin_t_full_size_parity():
    """UM-MAE Swin-T at 256 px, batch 2, official pairing: loss and gradients."""
    config = load("ummae_swin_t.py", None, ["--config.method.decoder_pos_order=official"])
    check_run("UM-MAE Swin-T 256", parity_run(config, "ummae_swin_t.py", batch=2))


@pytest.mark.parametrize("model_name, name", [("ummae_swin", "simmim_ummae_swin_t.py"),
                                              ("pvt", "simmim_ummae_pvt_s.py")])
def test_finetune_classifier_parity(model_name, name):
    """The finetuning models (full grid: window 8 of a 16-token map, sr 4,2,1 in the tiny
    geometry) give the reference's logits from the same exported params."""
    cfg = load(name, "tiny").model
    torch_cls = FINETUNE[model_name]
    method = get_method(load(name, "tiny"))
    layout = layout_for(method.config)
    graphdef, abstract = abstract_model(lambda: build_classifier(cfg, 7, rngs=nnx.Rngs(0)))
    params = random_params(abstract, seed=4)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=7)
    images = np.random.default_rng(5).standard_normal((2, 64, 64, 3), dtype=np.float32)
    logits = jax.jit(lambda p, x: bind(graphdef, p)(x), compiler_options=FAST_COMPILE)(
        params, images)
    out = {}
    for dtype in (torch.float32, torch.float64):
        tmodel = torch_cls.from_model_config(cfg, num_classes=7)
        tmodel.load_state_dict(sd, strict=True)
        with torch.no_grad():
            out[dtype] = {"logits": tmodel.to(dtype).eval()(nchw(images).to(dtype)).double()
                          .numpy()}
    check_against_exact(f"{model_name} finetune logits", {"logits": logits},
                        out[torch.float32], out[torch.float64], FWD_TOL)


# -- conversion -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["ummae_swin_t.py", "ummae_pvt_s.py", "ummae_vit_b.py",
                                  "simmim_ummae_swin_t.py", "simmim_ummae_pvt_s.py"])
def test_official_pretraining_layout_round_trips_bit_exactly(name):
    """Every key, order, shape and dtype of the official pretraining state_dict of the full-size
    config; a random official state_dict imports (strict) and exports back bit for bit."""
    config = load(name)
    method = get_method(config)
    layout = layout_for(method.config)
    _, abstract = abstract_model(lambda: method.build_model(nnx.Rngs(0)))
    tmodel = reference(name, config)
    export = to_torch.params_to_state_dict(random_params(abstract, seed=3), layout)
    assert list(export) == list(tmodel.state_dict())
    tmodel.load_state_dict(export, strict=True)
    sd = random_torch_state_dict(tmodel, seed=6)
    params, report = from_torch.state_dict_to_params(sd, layout, abstract)
    assert not report.kept_fresh and report.loaded == sum(
        1 for k, p in tmodel.named_parameters() if p.requires_grad)
    assert_exports_back_exactly(params, sd, layout, "pretrain", 1000)


@pytest.mark.parametrize("name, window_or_sr", [
    ("ummae_swin_t.py", ("window_size", 16)), ("ummae_pvt_s.py", ("sr_ratios", (8, 4, 2, 1)))])
def test_pretraining_export_loads_strictly_into_the_finetune_geometry(name, window_or_sr):
    """The finetuning model runs the full grid (Swin window 16, PVT sr 8,4,2,1): no weight
    depends on them, so the pretraining params export to it with a fresh head, strictly; and a
    finetune file imports into the classifier and exports back bit for bit."""
    config = load(name)
    method = get_method(config)
    layout = layout_for(method.config)
    _, abstract = abstract_model(lambda: method.build_model(nnx.Rngs(0)))
    sd = to_torch.params_to_state_dict(random_params(abstract, seed=3), layout,
                                       format="finetune", num_classes=10)
    key, value = window_or_sr
    ft_cfg = config.model.copy_and_resolve_references()
    ft_cfg[key] = value
    torch_cls = FINETUNE[config.model.name]
    tmodel = torch_cls.from_model_config(ft_cfg, num_classes=10)
    tmodel.load_state_dict(sd, strict=True)
    assert not any(k.startswith(("decoder", "mask_token", "vis_mask_token", "norm.")) for k in sd)
    assert torch.equal(sd["fc_norm.weight"], torch.ones(sd["fc_norm.weight"].shape))
    assert 0 < float(sd["head.weight"].std()) < 1e-4
    if config.model.name == "pvt":  # the frozen table becomes the learned one's start
        table = L.sincos_pos_embed_2d(64, 64, 64)
        np.testing.assert_array_equal(sd["pos_embed"].numpy()[0], table)
    _, template = abstract_model(lambda: build_classifier(ft_cfg, 10, rngs=nnx.Rngs(0)))
    ft_sd = random_torch_state_dict(tmodel, seed=8)
    params, _ = from_torch.state_dict_to_params(ft_sd, layout, template)
    assert_exports_back_exactly(params, ft_sd, layout, "finetune", 10)


def test_exported_tables_equal_the_references_own():
    for name in ("ummae_swin_t.py", "ummae_pvt_s.py", "ummae_vit_b.py", "simmim_ummae_pvt_s.py"):
        config = load(name)
        own = reference(name, config).state_dict()
        entries = layout_for(config).constant_entries("pretrain")
        assert entries, name
        for k, v in entries.items():
            np.testing.assert_array_equal(v, own[k].numpy(), err_msg=f"{name}: {k}")


def test_import_names_bad_keys_and_checks_tables():
    config = load("ummae_pvt_s.py", "tiny")
    method = get_method(config)
    layout = layout_for(method.config)
    sd = reference("ummae_pvt_s.py", config).state_dict()
    _, template = abstract_model(lambda: method.build_model(nnx.Rngs(0)))
    bad = dict(sd)
    del bad["blocks.1.attn.sr.bias"]
    bad["blocks.0.attn.posmlp.0.weight"] = torch.zeros(3)
    bad["decoder_pred.weight"] = torch.zeros(3, 3)
    bad["pos_embed"] = sd["pos_embed"] + 1e-3
    with pytest.raises(K.ConversionError) as e:
        from_torch.state_dict_to_params(bad, layout, template)
    for key in ("blocks.1.attn.sr.bias", "blocks.0.attn.posmlp.0.weight",
                "decoder_pred.weight", "pos_embed"):
        assert key in str(e.value)


# -- the tools print the official loss --------------------------------------------------------


@pytest.mark.parametrize("name", ["ummae_swin_t.py", "ummae_pvt_s.py", "ummae_vit_b.py"])
def test_convert_and_visualize_give_the_official_loss(tmp_path, capsys, name):
    """mixmae-convert from-torch, then mixmae-visualize --mask M.npz (official convention: mask
    1 = removed, vis_mask 1 = secondary-masked): the printed loss is the reference's (with the
    official decoder pairing) on the same images and masks."""
    from PIL import Image
    from recipes import CONFIGS

    from mixmae_jax import cli
    from mixmae_jax.visualize import load_images

    order = ["--config.method.decoder_pos_order=official"]
    config = load(name, "tiny", order)
    method = get_method(config)
    torch.manual_seed(0)
    ref = reference(name, config)
    ref.load_state_dict(random_torch_state_dict(ref, seed=2))
    official = tmp_path / "official.pth"
    torch.save({"model": ref.state_dict()}, official)
    workdir = tmp_path / "w"
    cli.convert_main(["from-torch", "--checkpoint", str(official), "--config",
                      f"{CONFIGS}/{name}:tiny", "--workdir", str(workdir), *order])
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(rng.integers(0, 256, (70, 90, 3), dtype=np.uint8)).save(paths[-1])
    plan = method.make_plan(jax.random.key(9), 2, 1)
    mask, vis = torch_masks(method, plan)
    grid = method.unit_grid()
    np.savez(tmp_path / "m.npz", mask=mask.numpy().reshape(2, grid, grid).astype(np.int64),
             vis_mask=vis.numpy().reshape(2, grid, grid).astype(np.int64))
    cli.visualize_main(["--workdir", str(workdir), "--images", *paths, "--out",
                        str(tmp_path / "grid.png"), "--mask", str(tmp_path / "m.npz")])
    line = [s for s in capsys.readouterr().out.splitlines() if s.startswith("loss: ")]
    jax_loss = float(line[0].split()[1])

    size = config.model.img_size
    x = (load_images(paths, size) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    x = torch.tensor(x, dtype=torch.float32).permute(0, 3, 1, 2)
    with torch.no_grad():
        loss, _ = ref.eval()(x, mask, vis)
    assert abs(jax_loss - float(loss)) <= 1e-5 * abs(float(loss)), (jax_loss, float(loss))
