"""UM-MAE (methods/ummae.py, models/ummae_swin.py, models/pvt.py) and the UM-MAE paper's SimMIM
baselines: uniform sampling, secondary masking, compaction, the decoder position order, the
features' full-grid geometry, configs and masks from files; parity with the plain torch
references of the official models (tests/references/ummae.py) and what is UM-MAE's own in the
conversion (the fine-tuning geometry, its tables). What every method must do (conversion both
ways, masks from files, training and resume) is the contract suite's (test_methods.py).

Expectations are written out independently (loops over units and blocks, numpy). Parity as for
the other methods (parity.py): random JAX params -> export -> strict load into the torch reference
(which keeps its own sin-cos tables), the same images and the same plan (mask and secondary
mask), torch in float32 and float64. With decoder_pos_order="official" the JAX model reproduces
the official pairing of latents and decoder positions; "true" is checked against the reference's
own "true" mode.
"""

import jax
import jax.numpy as jnp
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

from mixmae_jax import config as config_lib
from mixmae_jax.interop import from_torch, layout_for, to_torch
from mixmae_jax.methods import get_method
from mixmae_jax.methods import ummae as U
from mixmae_jax.methods.ummae import removed_units
from mixmae_jax.models import layers as L
from mixmae_jax.models import pvt, ummae_swin
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.numerics import FWD_TOL, GRAD_TOL
from mixmae_jax.train.step import bind

BACKBONES = ("ummae_swin_t.py", "ummae_pvt_s.py", "ummae_vit_b.py")


def tiny(name="ummae_swin_t.py", overrides=()):
    return load(name, "tiny", list(overrides))


@pytest.fixture(scope="module", params=BACKBONES)
def tiny_setup(request):
    """(method, model, images) of a tiny config per backbone."""
    config = tiny(request.param)
    method = get_method(config)
    model = method.build_model(L.InitKeys(0))
    size = config.model.img_size
    images = jax.random.normal(jax.random.key(1), (3, size, size, 3))
    return method, model, images


# -- uniform sampling and secondary masking --------------------------------------------------


@pytest.mark.parametrize("name, grid, kept, secondary", [
    ("ummae_swin_t.py", 16, 64, 16), ("ummae_swin_l.py", 16, 64, 16),
    ("ummae_pvt_s.py", 16, 64, 16), ("ummae_vit_b.py", 14, 49, 13)])
def test_official_mask_counts(name, grid, kept, secondary):
    """16x16 units at 256 (14x14 for ViT-B at 224), one kept per 2x2 block; int(K * 0.75) of
    the kept stay visible (48 of 64, 36 of 49) as the official code counts."""
    method = get_method(load(name))
    assert method.unit_grid() == grid and method.num_kept() == kept
    assert method.num_kept() - method.num_visible() == secondary
    plan = method.make_plan(jax.random.key(0), 5, 1)
    slot, sm = np.asarray(plan["slot"]), np.asarray(plan["sm"])
    g = grid // 2
    assert slot.shape == (5, g, g) and sm.shape == (5, g, g)
    assert set(np.unique(slot)) <= {0, 1, 2, 3}
    assert (sm.reshape(5, -1).sum(axis=1) == secondary).all()
    mask = np.asarray(U.removed_units(plan["slot"]))
    for i in range(5):
        for a in range(g):
            for b in range(g):
                block = mask[i, 2 * a:2 * a + 2, 2 * b:2 * b + 2]
                assert block.sum() == 3
                di, dj = divmod(int(slot[i, a, b]), 2)
                assert block[di, dj] == 0


def test_plans_are_uniform_over_slots_and_secondary_positions():
    """Every slot and every kept unit are equally likely (8192 blocks: 4-sigma bounds)."""
    method = get_method(load("ummae_swin_t.py"))
    plan = method.make_plan(jax.random.key(3), 128, 1)
    counts = np.bincount(np.asarray(plan["slot"]).reshape(-1), minlength=4)
    n = 128 * 64
    assert np.all(np.abs(counts - n / 4) < 4 * np.sqrt(n * 3 / 16)), counts
    per_unit = np.asarray(plan["sm"]).sum(axis=0).reshape(-1)  # expected 128 * 16/64 = 32
    assert per_unit.min() > 10 and per_unit.max() < 60, per_unit


def test_compaction_equals_a_brute_force_gather():
    """Compact unit (a, b) holds the tokens of unit (2a + di, 2b + dj), with their coordinates."""
    rng = np.random.default_rng(0)
    b, g, u, c = 2, 3, 2, 5
    x = rng.standard_normal((b, 2 * g * u, 2 * g * u, c)).astype(np.float32)
    slot = rng.integers(0, 4, (b, g, g)).astype(np.int32)
    out = np.asarray(U.compact_kept_units(jnp.asarray(x), jnp.asarray(slot), u))
    coords = np.stack(np.meshgrid(np.arange(2 * g * u), np.arange(2 * g * u), indexing="ij"), -1)
    cout = np.asarray(U.compact_kept_units(jnp.asarray(coords[None]), jnp.asarray(slot), u))
    ids = np.asarray(U.kept_unit_ids(jnp.asarray(slot)))
    for i in range(b):
        for a in range(g):
            for bb in range(g):
                di, dj = divmod(int(slot[i, a, bb]), 2)
                r, s = (2 * a + di) * u, (2 * bb + dj) * u
                want = x[i, r:r + u, s:s + u]
                np.testing.assert_array_equal(out[i, a * u:(a + 1) * u, bb * u:(bb + 1) * u], want)
                np.testing.assert_array_equal(
                    cout[i, a * u:(a + 1) * u, bb * u:(bb + 1) * u], coords[r:r + u, s:s + u])
                assert ids[i, a * g + bb] == (2 * a + di) * 2 * g + (2 * bb + dj)


def test_ids_where_lists_positions_in_row_major_order():
    mask = jnp.asarray([[0, 1, 1, 0, 1], [1, 0, 0, 1, 1]], jnp.float32)
    np.testing.assert_array_equal(U.ids_where(mask, 3), [[1, 2, 4], [0, 3, 4]])


# -- the model ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_removed_units_do_not_change_the_encoder_output(tiny_setup):
    """Pixels of removed units never reach the encoder (only the kept units are gathered)."""
    method, model, images = tiny_setup
    plan = method.make_plan(jax.random.key(5), images.shape[0], 1)
    unit = method.unit_size()
    mask = U.removed_units(plan["slot"])
    pixel_mask = L.upsample_grid(mask, unit)[..., None]
    noisy = images + pixel_mask * 5.0 * jax.random.normal(jax.random.key(6), images.shape)

    def latent(x):
        if method.model_cfg.name == "vit":
            _, masked_ids, kept_ids = method.unit_ids(plan["slot"])
            kept = jnp.take_along_axis(model.encoder.embed(x), kept_ids[..., None], axis=1)
            return model.encoder.encode(kept)
        return model.encode(x, plan)

    latent = jax.jit(latent, compiler_options=FAST_COMPILE)
    np.testing.assert_array_equal(latent(images), latent(noisy))
    # ... while the kept units do change it
    kept_noise = images + (1 - pixel_mask) * 0.5
    assert not np.allclose(latent(images), latent(kept_noise))


@pytest.mark.slow
def test_secondary_masking_hides_the_kept_units_it_hits(tiny_setup):
    """The pixels of secondary-masked units do not reach the encoder; the others do."""
    method, model, images = tiny_setup
    plan = method.make_plan(jax.random.key(7), images.shape[0], 1)
    sm_units = method.secondary_units(plan).reshape(images.shape[0], method.unit_grid(), -1)
    pixel_sm = L.upsample_grid(sm_units, method.unit_size())[..., None]
    loss = lambda x: method.loss(model, {"image": x}, plan, 1)[0]  # noqa: E731
    # (SM units are kept units, never targets: the loss sees their pixels through nothing)
    grad = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(images)
    assert float(jnp.abs(grad * pixel_sm).max()) == 0.0
    visible = (1 - L.upsample_grid(U.removed_units(plan["slot"]), method.unit_size()))[..., None]
    assert float(jnp.abs(grad * visible * (1 - pixel_sm)).max()) > 0.0


def test_decoder_orders_agree_exactly_when_every_block_keeps_the_same_slot():
    """"true" and "official" pair latents with the same positions when compact order is row-major
    order (every block keeps the same slot), and differ otherwise."""
    base = tiny("ummae_swin_t.py")
    methods = {}
    for order in ("true", "official"):
        c = tiny("ummae_swin_t.py", [f"--config.method.decoder_pos_order={order}"])
        methods[order] = get_method(c)
    model = methods["true"].build_model(L.InitKeys(0))
    size = base.model.img_size
    images = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    plan = methods["true"].make_plan(jax.random.key(2), 4, 1)
    g = plan["slot"].shape[1]
    losses = {o: jax.jit(lambda p, m=m: m.loss(model, {"image": images}, p, 1)[0],
                         compiler_options=FAST_COMPILE) for o, m in methods.items()}
    for s in range(4):
        same = dict(plan, slot=jnp.full((4, g, g), s, jnp.int32))
        a, b = (float(fn(same)) for fn in losses.values())
        assert a == b, (s, a, b)
    # Random slots: most latents get another unit's position (rounding alone would be ~1e-7).
    a, b = (float(fn(plan)) for fn in losses.values())
    assert abs(a - b) > 1e-5 * abs(a), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name, res, windows, shifts", [
    ("ummae_swin_t.py", 32, (8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 4, 4), (0, 4, 0, 4) + (0,) * 8),
    ("simmim_ummae_swin_t.py", 64, (16,) * 10 + (8, 8), (0, 8, 0, 8) + (0,) * 8)])
def test_swin_window_geometry_of_the_official_configs(name, res, windows, shifts):
    """Pretraining runs window 8 on the 32x32 compact grid (stages 32, 16, 8, 4), the SimMIM
    baseline window 16 on the 64x64 grid: a stage no larger than the window has one unshifted
    window of the whole map (official clipping)."""
    method = get_method(load(name))
    model = nnx.eval_shape(lambda: method.build_model(L.InitKeys(0)))
    enc = model.encoder
    assert enc.run_grid == res
    assert tuple(b.window for b in enc.blocks) == windows
    assert tuple(b.shift for b in enc.blocks) == shifts
    assert [hasattr(b, "downsample") for b in enc.blocks] == [
        j in (2, 4, 10) for j in range(12)]


def test_continuous_bias_is_the_mlp_of_log_spaced_differences():
    """bias[m, h, i, j] = MLP(sign(d) log(1 + |d|))[h] with d = coords[j] - coords[i]."""
    from mixmae_jax.models.ummae_swin import WindowAttention

    attn = WindowAttention(8, 2, 4, qkv_bias=True, rngs=L.InitKeys(0))
    rng = np.random.default_rng(0)
    coords = rng.integers(0, 20, (3, 5, 2)).astype(np.float32) / 2
    got = np.asarray(attn.position_bias(jnp.asarray(coords)))
    w1 = np.asarray(attn.posmlp.layers[0].kernel[...]).reshape(2, 4)
    b1 = np.asarray(attn.posmlp.layers[0].bias[...])
    w2 = np.asarray(attn.posmlp.layers[2].kernel[...]).reshape(4, 2)
    b2 = np.asarray(attn.posmlp.layers[2].bias[...])
    for m in range(3):
        for i in range(5):
            for j in range(5):
                d = coords[m, j] - coords[m, i]
                f = np.sign(d) * np.log1p(np.abs(d))
                want = np.maximum(f @ w1 + b1, 0) @ w2 + b2
                np.testing.assert_allclose(got[m, :, i, j], want, rtol=1e-5, atol=1e-6)


# -- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, epochs, warmup", [
    ("ummae_swin_t.py", 200, 10), ("ummae_swin_l.py", 800, 40), ("ummae_pvt_s.py", 200, 10),
    ("ummae_vit_b.py", 200, 10), ("simmim_ummae_swin_t.py", 200, 10),
    ("simmim_ummae_pvt_s.py", 200, 10)])
def test_official_recipes(name, epochs, warmup):
    c = load(name)
    config_lib.validate(c)
    assert c.batch_size == 4096 and c.epochs == epochs and c.optim.warmup_epochs == warmup
    assert c.optim.base_lr * c.batch_size / c.optim.lr_batch_divisor == pytest.approx(2.4e-3)
    assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.min_lr) == (0.9, 0.95, 0.05, 0)
    assert c.data.crop_scale == (0.2, 1.0)
    assert c.data.image_size == (224 if "vit" in name else 256)


@pytest.mark.parametrize("override, key", [
    ("--config.method.mask_ratio=0.6", "method.mask_ratio"),
    ("--config.method.vis_mask_ratio=1.0", "method.vis_mask_ratio"),
    ("--config.method.decoder_pos_order=rowmajor", "method.decoder_pos_order"),
    ("--config.model.unit_size=4", "model.unit_size"),
    ("--config.model.window_size=3", "model.window_size"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(tiny("ummae_swin_t.py", [override]))


def test_pvt_sr_ratio_must_divide_the_compact_grid():
    with pytest.raises(config_lib.ConfigError, match=r"model\.sr_ratios"):
        config_lib.validate(tiny("ummae_pvt_s.py", ["--config.model.sr_ratios=(3,1,1)"]))


# -- frozen features ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name, kind", [("ummae_swin_t.py", "swin"), ("ummae_pvt_s.py", "pvt")])
def test_ummae_features_use_the_full_grid_finetuning_geometry(name, kind):
    """The pretraining encoder's weights in an encoder built for the full grid (Swin window x2,
    PVT's full-grid sr ratios): the features equal that encoder's, computed independently."""
    config = load(name, "tiny")
    method = get_method(config)
    model = method.build_model(L.InitKeys(0))
    m = config.model.copy_and_resolve_references()
    if kind == "swin":
        m.window_size *= 2
        full = ummae_swin.encoder(m, vis_mask_token=True, rngs=L.InitKeys(5))
    else:
        m.sr_ratios = m.full_sr_ratios
        full = pvt.encoder(m, vis_mask_token=True, rngs=L.InitKeys(5))
    nnx.update(full, nnx.state(model.encoder))
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    want = jnp.mean(full(images), axis=1)
    np.testing.assert_allclose(method.features(model, images), want, rtol=1e-6, atol=1e-6)
    if kind == "swin":
        assert [b.window for b in full.blocks][:2] == [8, 8] and full.blocks[1].shift == 4


# -- masks from files ---------------------------------------------------------------------------


def plan_to_arrays(method, plan):
    """The official convention of a plan: mask (B, G, G) 1 = removed, vis_mask 1 = SM."""
    b = plan["slot"].shape[0]
    grid = method.unit_grid()
    mask = np.asarray(U.removed_units(plan["slot"])).astype(np.int64)
    vis = np.asarray(method.secondary_units(plan)).reshape(b, grid, grid).astype(np.int64)
    return mask, vis


def test_mask_from_file_names_what_is_wrong():
    method = get_method(load("ummae_swin_t.py"))
    plan = method.make_plan(jax.random.key(4), 2, 1)
    mask, vis = plan_to_arrays(method, plan)
    # The contract suite checks the wrong kind of file, shapes and values.
    cases = [
        ({"mask": mask}, r"arrays `mask` and `vis_mask`"),
        ({"mask": np.zeros_like(mask), "vis_mask": vis}, r"image 0, block \(0, 0\) keeps 4"),
        ({"mask": mask, "vis_mask": 1 - mask}, "16 secondary-masked"),
        ({"mask": mask, "vis_mask": np.roll(vis, 1, axis=2) * mask + vis * 0},
         "only where `mask` is 0"),
    ]
    for arrays, message in cases:
        with pytest.raises(ValueError, match=message):
            method.mask_from_file(arrays, 2, "m.npz")


# ---------------------------------------------------------------------------------------------
# Parity with the references of the official models, and the conversion
# ---------------------------------------------------------------------------------------------

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
    graphdef, abstract = abstract_model(lambda: method.build_model(L.InitKeys(0)))
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


@pytest.mark.slow
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
    graphdef, abstract = abstract_model(lambda: build_classifier(cfg, 7, rngs=L.InitKeys(0)))
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


@pytest.mark.slow
@pytest.mark.parametrize("name, window_or_sr", [
    ("ummae_swin_t.py", ("window_size", 16)), ("ummae_pvt_s.py", ("sr_ratios", (8, 4, 2, 1)))])
def test_pretraining_export_loads_strictly_into_the_finetune_geometry(name, window_or_sr):
    """The finetuning model runs the full grid (Swin window 16, PVT sr 8,4,2,1): no weight
    depends on them, so the pretraining params export to it with a fresh head, strictly, and a
    fine-tuning file of that geometry imports into its classifier and exports back bit for bit
    (the contract suite checks the recipe's own geometry)."""
    config = load(name)
    method = get_method(config)
    layout = layout_for(method.config)
    _, abstract = abstract_model(lambda: method.build_model(L.InitKeys(0)))
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
    _, template = abstract_model(lambda: build_classifier(ft_cfg, 10, rngs=L.InitKeys(0)))
    ft_sd = random_torch_state_dict(tmodel, seed=8)  # a fine-tuning file of that geometry
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
