"""MAE (methods/mae.py): parity with the plain torch reference of the official models, what is
MAE's own in its exports (the sin-cos start of models_vit's pos_embed, its tables), the plan's
counts and the recipe. What every method must do (conversion both ways, masks from files,
training and resume) is the contract suite's (test_methods.py).

Parity as for MixMIM (parity.py): random JAX params -> export -> strict load into the torch
reference (which keeps its own sin-cos tables), the same images and the same noise (so the same
kept patches), torch in float32 and float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from parity import (
    FAST_COMPILE,
    abstract_model,
    check_against_exact,
    load_with_own_constants,
    nchw,
    random_params,
)
from recipes import load
from references import mae as R

from mixmae_jax.config import validate
from mixmae_jax.interop import to_torch
from mixmae_jax.interop.mae_layout import MAELayout
from mixmae_jax.methods import get_method
from mixmae_jax.methods.mae import MAEModel, plan_from_order
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.models.vit import pos_embed_with_cls
from mixmae_jax.numerics import FWD_TOL, GRAD_TOL
from mixmae_jax.train.step import bind


def tiny_config():
    """ViT with 8-px patches on 32-px images (4x4 = 16 patches, 4 kept), 2 + 2 blocks."""
    c = load("mae_vit_b.py")
    c.model.update(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                   decoder_dim=32, decoder_depth=2, decoder_num_heads=4)
    c.data.image_size = 32
    return c


def jax_run(method, graphdef, params, images, plan):
    """Encoder output, predictions, loss and gradients of the JAX model (one compiled call)."""

    def loss_fn(p):
        model = bind(graphdef, p)
        kept = jnp.take_along_axis(model.encoder.embed(images), plan["ids_keep"][..., None], 1)
        latent = model.encoder.encode(kept)
        pred = model.decoder(latent, plan["ids_restore"])
        loss, _ = method.loss(model, {"image": images}, plan, 1)
        return loss, (latent, pred)

    fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    return fn(params)


def torch_run(tmodel, images, noise, dtype, ratio):
    x = nchw(images).to(dtype)
    latent, mask, ids_restore = tmodel.forward_encoder(x, ratio, torch.from_numpy(noise))
    pred = tmodel.forward_decoder(latent, ids_restore)
    loss = tmodel.forward_loss(x, pred, mask)
    loss.backward()
    values = {"encoder output (cls + kept, final norm)": latent, "decoder predictions": pred,
              "loss": loss}
    grads = {k: p.grad.double().numpy() for k, p in tmodel.named_parameters() if p.requires_grad}
    return {k: v.detach().double().numpy() for k, v in values.items()}, grads, mask


@pytest.fixture(scope="module")
def tiny_run():
    config = tiny_config()
    method = get_method(config)
    cfg = config.model
    layout = MAELayout(cfg)
    graphdef, abstract = abstract_model(lambda: method.build_model(InitKeys(0)))
    params = random_params(abstract, seed=1)
    state_dict = to_torch.params_to_state_dict(params, layout)
    images = np.random.default_rng(2).standard_normal((3, 32, 32, 3), dtype=np.float32)
    noise = np.random.default_rng(3).random((3, 16)).astype(np.float32)
    plan = plan_from_order(jnp.argsort(jnp.asarray(noise), axis=1), method.num_keep())
    (loss, (latent, pred)), grads = jax_run(method, graphdef, params, images, plan)
    values = {"encoder output (cls + kept, final norm)": latent, "decoder predictions": pred,
              "loss": loss}
    torch_values, torch_grads, masks = {}, {}, {}
    for dtype in (torch.float32, torch.float64):
        tmodel = load_with_own_constants(R.MAEPretrainTorch.from_model_config(cfg), state_dict,
                                         layout).to(dtype).eval()
        torch_values[dtype], torch_grads[dtype], masks[dtype] = torch_run(
            tmodel, images, noise, dtype, config.method.mask_ratio)
    return dict(values=values, grads=to_torch.params_to_state_dict(grads, layout), plan=plan,
                torch_values=torch_values, torch_grads=torch_grads, masks=masks, layout=layout)


@pytest.mark.slow
def test_tiny_forward_parity(tiny_run):
    r = tiny_run
    np.testing.assert_array_equal(np.asarray(r["plan"]["mask"]), r["masks"][torch.float32])
    check_against_exact("MAE tiny forward", r["values"], r["torch_values"][torch.float32],
                        r["torch_values"][torch.float64], FWD_TOL)


def test_tiny_gradient_parity(tiny_run):
    r = tiny_run
    t32, t64 = r["torch_grads"][torch.float32], r["torch_grads"][torch.float64]
    assert set(t64) == {k for k in r["grads"] if not r["layout"].is_constant_key(k)}
    jax_grads = {k: r["grads"][k].numpy() for k in t64}
    check_against_exact(f"MAE tiny gradients ({len(t64)} tensors)", jax_grads, t32, t64,
                        GRAD_TOL)


@pytest.mark.slow
def test_vit_b_loss_parity():
    """MAE ViT-B/16 at 224, batch 2: the loss against the reference in float32 and float64."""
    config = load("mae_vit_b.py")
    method = get_method(config)
    layout = MAELayout(config.model)
    graphdef, abstract = abstract_model(lambda: method.build_model(InitKeys(0)))
    params = random_params(abstract, seed=4)
    state_dict = to_torch.params_to_state_dict(params, layout)
    assert len(state_dict) == 254
    images = np.random.default_rng(5).standard_normal((2, 224, 224, 3), dtype=np.float32)
    noise = np.random.default_rng(6).random((2, 196)).astype(np.float32)
    plan = plan_from_order(jnp.argsort(jnp.asarray(noise), axis=1), method.num_keep())
    assert np.asarray(plan["mask"]).sum(axis=1).tolist() == [147, 147]
    loss = jax.jit(lambda p: method.loss(bind(graphdef, p), {"image": images}, plan, 1)[0])(
        params)
    del params
    tmodel = load_with_own_constants(R.MAEPretrainTorch.from_model_config(config.model),
                                     state_dict, layout).eval()
    exact = {}
    for dtype in (torch.float32, torch.float64):
        tmodel = tmodel.to(dtype)
        with torch.no_grad():
            t, _, _ = tmodel(nchw(images).to(dtype), 0.75, torch.from_numpy(noise))
        exact[dtype] = {"loss": t.double().numpy()}
    check_against_exact("MAE ViT-B/16 224, batch 2", {"loss": loss}, exact[torch.float32],
                        exact[torch.float64], FWD_TOL)


def test_finetune_features_parity():
    """The ViT classifier (global pool, fc_norm, learned pos_embed) against models_vit."""
    cfg = tiny_config().model
    layout = MAELayout(cfg)
    graphdef, abstract = abstract_model(lambda: build_classifier(cfg, 10, rngs=InitKeys(0)))
    params = random_params(abstract, seed=7)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=10)
    assert list(sd)[:2] == ["cls_token", "pos_embed"] and list(sd)[-2:] == ["fc_norm.weight",
                                                                           "fc_norm.bias"]
    np.testing.assert_array_equal(sd["pos_embed"].numpy(), params["encoder"]["pos_embed"])
    tmodel = R.MAEFinetuneTorch.from_model_config(cfg, num_classes=10)
    tmodel.load_state_dict(sd, strict=True)
    images = np.random.default_rng(8).standard_normal((3, 32, 32, 3), dtype=np.float32)
    feats, logits = jax.jit(lambda p: (bind(graphdef, p).forward_features(images),
                                       bind(graphdef, p)(images)),
                            compiler_options=FAST_COMPILE)(params)
    exact = {}
    for dtype in (torch.float32, torch.float64):
        tmodel = tmodel.to(dtype).eval()
        with torch.no_grad():
            x = nchw(images).to(dtype)
            exact[dtype] = {"features (fc_norm)": tmodel.forward_features(x).double().numpy(),
                            "logits": tmodel(x).double().numpy()}
    check_against_exact("MAE finetune tiny", {"features (fc_norm)": feats, "logits": logits},
                        exact[torch.float32], exact[torch.float64], FWD_TOL)


# ---------------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------------


def test_a_pretraining_export_starts_models_vit_as_the_official_finetuning_does():
    """A pretraining run exports to models_vit with its sin-cos pos_embed as the learned table's
    start, fc_norm at ones and timm's head init (trunc-normal 2e-5); the pretraining `norm` and
    the decoder are dropped (as the official finetune loader drops them)."""
    cfg = tiny_config().model
    layout = MAELayout(cfg)
    params = random_params(abstract_model(lambda: MAEModel(cfg, rngs=InitKeys(0)))[1], seed=9)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=10)
    np.testing.assert_array_equal(sd["pos_embed"].numpy()[0], pos_embed_with_cls(32, 4))
    assert torch.equal(sd["fc_norm.weight"], torch.ones(32)) and 0 < sd["head.weight"].std() < 1e-4
    assert not any(k.startswith(("norm.", "decoder", "mask_token")) for k in sd)


def test_exported_tables_equal_the_references_own():
    cfg = load("mae_vit_b.py").model
    own = R.MAEPretrainTorch.from_model_config(cfg).state_dict()
    for k, v in MAELayout(cfg).constant_entries("pretrain").items():
        np.testing.assert_array_equal(v, own[k].numpy(), err_msg=k)


# ---------------------------------------------------------------------------------------------
# Plan, mask files, recipe, bad input.
# ---------------------------------------------------------------------------------------------


def test_plan_masks_each_sample_with_the_official_count():
    method = get_method(load("mae_vit_b.py"))
    plan = jax.jit(method.make_plan, static_argnums=(1, 2))(jax.random.key(0), 16, 2)
    mask, keep, restore = (np.asarray(plan[k]) for k in ("mask", "ids_keep", "ids_restore"))
    assert mask.shape == (16, 196) and (mask.sum(axis=1) == 147).all()
    assert len({row.tobytes() for row in mask}) == 16  # per sample, not per group
    for i in range(16):
        assert (mask[i, keep[i]] == 0).all() and len(set(keep[i])) == 49
        assert sorted(restore[i]) == list(range(196))


def test_a_mask_file_removes_the_official_count_of_patches():
    """The official convention (1 = removed, a (B, grid, grid) or shared (grid, grid) map) with
    exactly the recipe's count of removed patches per image (the contract suite checks the rest
    of the file handling)."""
    method = get_method(tiny_config())  # 4x4 patches, 12 of 16 removed
    mask = np.zeros((2, 4, 4), np.int64)
    mask.reshape(2, 16)[0, :12] = 1
    mask.reshape(2, 16)[1, 4:] = 1
    plan = method.mask_from_file(mask, 2, "m.npy")
    np.testing.assert_array_equal(np.asarray(plan["mask"]).reshape(2, 4, 4), mask)
    shared = method.mask_from_file(mask[0], 3, "m.npy")
    np.testing.assert_array_equal(np.asarray(shared["mask"]).reshape(3, 4, 4), [mask[0]] * 3)
    with pytest.raises(ValueError, match=r"--mask m.npy: each image must have exactly 12 .*"
                                         r"\[16, 16\]"):
        method.mask_from_file(np.ones((2, 4, 4), np.int64), 2, "m.npy")


def test_recipe_is_the_official_one():
    c = load("mae_vit_b.py")
    # PRETRAIN.md (ViT-B, 800 epochs) and main_pretrain.py defaults.
    assert (c.batch_size, c.epochs, c.optim.warmup_epochs, c.optim.base_lr,
            c.optim.lr_batch_divisor) == (4096, 800, 40, 1.5e-4, 256)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.min_lr) == (0.9, 0.95, 0.05, 0)
    assert (c.method.mask_ratio, c.method.norm_pix_loss) == (0.75, True)
    assert tuple(c.data.crop_scale) == (0.2, 1.0)
    assert (c.model.embed_dim, c.model.depth, c.model.num_heads, c.model.patch_size) == (
        768, 12, 12, 16)
    assert (c.model.decoder_dim, c.model.decoder_depth, c.model.decoder_num_heads) == (512, 8, 16)
    for name in ("mae_vit_b.py", "mae_vit_l.py", "mae_vit_h.py"):
        validate(load(name), num_devices=1)
        validate(load(name, "tiny"), num_devices=1)


