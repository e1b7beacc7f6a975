"""UM-MAE (methods/ummae.py, models/ummae_swin.py, models/pvt.py): uniform sampling, secondary
masking, compaction, the decoder position order, configs and masks from files.

Expectations are written out independently here (loops over units and blocks, numpy); the parity
with the plain torch reference of the official models is in test_ummae_parity.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity import FAST_COMPILE
from recipes import load

from mixmae_jax import config as config_lib
from mixmae_jax.methods import get_method
from mixmae_jax.methods import ummae as U
from mixmae_jax.models import layers as L

BACKBONES = ("ummae_swin_t.py", "ummae_pvt_s.py", "ummae_vit_b.py")


def tiny(name="ummae_swin_t.py", overrides=()):
    return load(name, "tiny", list(overrides))


@pytest.fixture(scope="module", params=BACKBONES)
def tiny_setup(request):
    """(method, model, images) of a tiny config per backbone."""
    config = tiny(request.param)
    method = get_method(config)
    model = method.build_model(nnx.Rngs(0))
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
    model = methods["true"].build_model(nnx.Rngs(0))
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


@pytest.mark.parametrize("name, res, windows, shifts", [
    ("ummae_swin_t.py", 32, (8, 8, 8, 8, 8, 8, 8, 8, 8, 8, 4, 4), (0, 4, 0, 4) + (0,) * 8),
    ("simmim_ummae_swin_t.py", 64, (16,) * 10 + (8, 8), (0, 8, 0, 8) + (0,) * 8)])
def test_swin_window_geometry_of_the_official_configs(name, res, windows, shifts):
    """Pretraining runs window 8 on the 32x32 compact grid (stages 32, 16, 8, 4), the SimMIM
    baseline window 16 on the 64x64 grid: a stage no larger than the window has one unshifted
    window of the whole map (official clipping)."""
    method = get_method(load(name))
    model = nnx.eval_shape(lambda: method.build_model(nnx.Rngs(0)))
    enc = model.encoder
    assert enc.run_grid == res
    assert tuple(b.window for b in enc.blocks) == windows
    assert tuple(b.shift for b in enc.blocks) == shifts
    assert [hasattr(b, "downsample") for b in enc.blocks] == [
        j in (2, 4, 10) for j in range(12)]


def test_continuous_bias_is_the_mlp_of_log_spaced_differences():
    """bias[m, h, i, j] = MLP(sign(d) log(1 + |d|))[h] with d = coords[j] - coords[i]."""
    from mixmae_jax.models.ummae_swin import WindowAttention

    attn = WindowAttention(8, 2, 4, qkv_bias=True, rngs=nnx.Rngs(0))
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


def test_the_method_runs_only_its_backbones():
    c = load("ummae_swin_t.py")
    c.model = load("mixmim_b.py").model
    with pytest.raises(config_lib.ConfigError, match="cannot run model.name='swin'"):
        config_lib.validate(c)


# -- masks from files ----------------------------------------------------------------------


def plan_to_arrays(method, plan):
    """The official convention of a plan: mask (B, G, G) 1 = removed, vis_mask 1 = SM."""
    b = plan["slot"].shape[0]
    grid = method.unit_grid()
    mask = np.asarray(U.removed_units(plan["slot"])).astype(np.int64)
    vis = np.asarray(method.secondary_units(plan)).reshape(b, grid, grid).astype(np.int64)
    return mask, vis


@pytest.mark.parametrize("name", ["ummae_swin_t.py", "ummae_vit_b.py"])
def test_mask_from_file_round_trips_a_plan(name):
    method = get_method(load(name))
    plan = method.make_plan(jax.random.key(4), 3, 1)
    mask, vis = plan_to_arrays(method, plan)
    assert (vis * mask).sum() == 0
    back = method.mask_from_file({"mask": mask, "vis_mask": vis}, 3, "m.npz")
    np.testing.assert_array_equal(back["slot"], plan["slot"])
    np.testing.assert_array_equal(back["sm"], plan["sm"])


def test_mask_from_file_names_what_is_wrong():
    method = get_method(load("ummae_swin_t.py"))
    plan = method.make_plan(jax.random.key(4), 2, 1)
    mask, vis = plan_to_arrays(method, plan)
    cases = [
        (np.zeros((2, 16, 16)), "one .npy array"),
        ({"mask": mask}, r"arrays `mask` and `vis_mask`"),
        ({"mask": mask[:, :8], "vis_mask": vis}, r"`mask` must have shape \(2, 16, 16\)"),
        ({"mask": mask * 2, "vis_mask": vis}, "values must be 0 or 1"),
        ({"mask": np.zeros_like(mask), "vis_mask": vis}, r"image 0, block \(0, 0\) keeps 4"),
        ({"mask": mask, "vis_mask": 1 - mask}, "16 secondary-masked"),
        ({"mask": mask, "vis_mask": np.roll(vis, 1, axis=2) * mask + vis * 0},
         "only where `mask` is 0"),
    ]
    for arrays, message in cases:
        with pytest.raises(ValueError, match=message):
            method.mask_from_file(arrays, 2, "m.npz")


@pytest.mark.slow
@pytest.mark.parametrize("name", BACKBONES)
def test_two_training_steps(tmp_path, name):
    """The trainer runs UM-MAE end to end on each backbone."""
    from mixmae_jax import tasks

    c = tiny(name)
    c.total_steps = 2
    out = tasks.train(c, str(tmp_path / "w"), print_fn=lambda s: None)
    assert out["step"] == 2 and np.isfinite(out["loss"]) and 0.3 < out["loss"] < 3.0
