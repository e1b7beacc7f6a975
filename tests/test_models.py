"""The models package (models/layers.py, swin.py, the model keys' defaults): relative-position
indices and sin-cos tables against brute force, rematerialisation and scanned blocks change
memory and program, not numbers; drop path; bf16 kernels' float32 gradients; shifted windows.
The example model is MixMIM's tiny Swin (no torch model involved)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_tensors_close
from parity import mixmim_encode_case
from recipes import mixmim_config, mixmim_model

from mixmae_jax.interop import keymap as K
from mixmae_jax.methods.mixmim import MixMIMModel
from mixmae_jax.models import layers as L
from mixmae_jax.models import swin
from mixmae_jax.numerics import SAME_MATH_RTOL, rel_err
from mixmae_jax.train.step import bind

# Grid 16 -> 8 -> 4, windows 8/8/4: a stage-0 window (8x8 tokens) spans four 4x4-token mask cells,
# so windows hold tokens of both images. Final grid 4x4 (16 cells), stride 16.
TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(1, 1, 2), num_heads=(1, 2, 4),
            window_sizes=(8, 8, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
# LLVM -O0 for these small graphs: same HLO and fp semantics, ~3x faster CPU compiles.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def tiny_cfg():
    cfg = mixmim_model("B", 224)
    cfg.update(TINY)
    return cfg


@pytest.fixture(scope="module")
def tiny():
    return mixmim_encode_case(tiny_cfg())


# ---------------------------------------------------------------------------------------------
# Constant tables.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("w", [2, 7, 14])
def test_relative_position_index_brute_force(w):
    n = w * w
    want = np.zeros((n, n), np.int64)
    for i in range(n):
        for j in range(n):
            (yi, xi), (yj, xj) = divmod(i, w), divmod(j, w)
            want[i, j] = (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)
    got = L.relative_position_index(w)
    assert got.dtype == np.int64
    np.testing.assert_array_equal(got, want)


def test_sincos_table_spot_checks():
    dim, grid = 128, 56  # MixMIM-B absolute_pos_embed
    table = L.sincos_pos_embed_2d(dim, grid, grid)
    assert table.shape == (grid * grid, dim) and table.dtype == np.float32
    q = dim // 4
    for r, c, k in [(0, 0, 0), (0, 5, 3), (7, 2, 1), (55, 13, 31), (30, 55, 17), (55, 55, 0)]:
        w = 10000.0 ** (-k / q)
        row = table[r * grid + c].astype(np.float64)
        assert row[k] == pytest.approx(math.sin(c * w), abs=1e-7)  # column (x) first
        assert row[q + k] == pytest.approx(math.cos(c * w), abs=1e-7)
        assert row[2 * q + k] == pytest.approx(math.sin(r * w), abs=1e-7)  # then row (y)
        assert row[3 * q + k] == pytest.approx(math.cos(r * w), abs=1e-7)
    dec = L.sincos_pos_embed_2d(512, 7, 7)  # decoder_pos_embed
    assert dec.shape == (49, 512) and dec[8, 0] == np.float32(math.sin(1.0))


# ---------------------------------------------------------------------------------------------
# Rematerialisation, drop path, bf16, shifted windows, scanned blocks.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_remat_changes_memory_not_numbers(tiny):
    """config.model.remat recomputes parts ("dots": all but the weight matmuls) or all ("full")
    of each encoder block in the backward pass: the same loss and gradients as "none"."""
    from mixmae_jax.methods.mixmim import dual_reconstruction_loss

    def loss_and_grad(remat):
        cfg = tiny_cfg()
        cfg.remat = remat
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=L.InitKeys(0))),
                                nnx.Param)

        def loss(params):
            model = bind(graphdef, params)
            rec = model(tiny["images"], tiny["mask"], 1)
            return dual_reconstruction_loss(tiny["images"], rec, tiny["mask"], 1, 16, True)[0]

        return jax.jit(jax.value_and_grad(loss), compiler_options=FAST_COMPILE)(tiny["params"])

    l0, g0 = loss_and_grad("none")
    for mode in ("dots", "full"):
        l1, g1 = loss_and_grad(mode)
        assert float(l0) == pytest.approx(float(l1), rel=SAME_MATH_RTOL)
        assert_tensors_close(K.flatten(g1), K.flatten(g0), SAME_MATH_RTOL, f"{mode} gradients")


def test_remat_modes_and_the_bools_of_older_configs():
    from mixmae_jax.models import layers as L

    assert [L.remat_mode(v) for v in (False, True, "none", "dots", "full")] == [
        "none", "full", "none", "dots", "full"]
    with pytest.raises(ValueError, match="model.remat: 'some'"):
        L.remat_mode("some")


def test_a_snapshot_older_than_a_model_key_builds_with_the_keys_default():
    """Keys added after runs had started take `model_config()`'s value where a config snapshot
    lacks them (the behaviour before the key existed); the keys it has stay as they are."""
    import ml_collections

    from mixmae_jax import models
    from mixmae_jax.methods import get_method

    config = mixmim_config("tiny")
    newer = ("scan_blocks", "remat", "ape", "ape_grid", "shift_windows")
    old = config.copy_and_resolve_references()
    with old.unlocked():
        old.model = ml_collections.ConfigDict(
            {k: v for k, v in config.model.items() if k not in newer})
    filled = models.with_defaults(old.model)
    defaults = swin.model_config()
    assert {k: filled[k] for k in newer} == {k: defaults[k] for k in newer}
    assert config.model.remat == "dots" and filled.remat == "none"
    assert all(filled[k] == config.model[k] for k in old.model)

    def shapes(c):
        model = nnx.eval_shape(lambda: get_method(c).build_model(L.InitKeys(0)))
        return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))

    assert shapes(old) == shapes(config)


def test_drop_path_is_per_sample_and_off_without_an_rng(tiny):
    """Stochastic depth (finetuning) runs inside the scanned blocks with per-block rates."""
    cfg = tiny_cfg()
    cfg.drop_path_rate = 0.5
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=L.InitKeys(0))), nnx.Param)

    @jax.jit
    def encode(params, rng):
        return bind(graphdef, params).encode_mixed(tiny["images"], tiny["mask"], 1, rng)

    plain = tiny["encode"](tiny["params"], tiny["images"], tiny["mask"])
    assert rel_err(encode(tiny["params"], None), plain) <= SAME_MATH_RTOL
    a = encode(tiny["params"], jax.random.PRNGKey(0))
    b = encode(tiny["params"], jax.random.PRNGKey(1))
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-3  # some blocks were dropped
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # and which depends on the key


@pytest.mark.parametrize("case", ["mixmim", "ummae-pvt", "mixedae"])
def test_init_keys_give_the_weights_of_nnx_rngs(case):
    """L.InitKeys, which the trainer and the abstract builds use, draws the keys of
    nnx.Rngs(params=key): a model initialises to the same weights bit for bit (from a raw key as
    the trainer passes it, and from an int seed). Swin, PVT with UM-MAE's secondary token, and
    MixedAE's ViT with its own draws."""
    from recipes import tiny as tiny_recipe

    from mixmae_jax.methods import get_method

    method = get_method(tiny_recipe(case))
    raw = jax.random.fold_in(jax.random.PRNGKey(7), 0)
    for ours, theirs in ((L.InitKeys(raw), nnx.Rngs(params=raw)), (L.InitKeys(3), nnx.Rngs(3))):
        a = K.flatten(nnx.to_pure_dict(nnx.state(method.build_model(ours), nnx.Param)))
        b = K.flatten(nnx.to_pure_dict(nnx.state(method.build_model(theirs), nnx.Param)))
        assert a.keys() == b.keys()
        assert all(np.array_equal(a[k], b[k]) for k in a), [k for k in a
                                                            if not np.array_equal(a[k], b[k])]
    assert len({float(np.asarray(v).ravel()[0]) for v in a.values() if v.ndim == 2}) > 5


@pytest.mark.parametrize("rate", [0.25, jnp.float32(0.25)])  # a block's rate, python or traced
def test_drop_path_keeps_the_expected_value(rate):
    """timm's drop_path: a sample is zeroed with probability `rate`, the others divided by
    1 - rate (so the expectation is unchanged); 4096 samples: the dropped share within 6 sigma
    (6 * sqrt(.25 * .75 / 4096) = 0.041) of the rate."""
    x = jnp.ones((4096, 3, 2), jnp.float32)
    y = np.asarray(jax.jit(L.drop_path)(x, rate, jax.random.PRNGKey(3)))
    dropped = (y == 0).all(axis=(1, 2))
    assert np.array_equal(y[~dropped], np.full_like(y[~dropped], np.float32(1 / 0.75)))
    assert abs(dropped.mean() - 0.25) < 0.041


def test_a_bf16_linear_keeps_its_kernel_gradient_in_float32():
    """In bf16 compute a Linear multiplies bf16 operands, but its kernel's gradient is the
    float32 sum of the bf16 products (what the official fp32 .grad holds, and what devices then
    reduce): rounding it to bf16 first would be off by ~2^-9 relative."""
    graphdef, params = nnx.split(L.dense(64, 48, dtype=jnp.bfloat16, rngs=L.InitKeys(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 64))
    w = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 48))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * w)

    grad = jax.grad(loss)(params)["kernel"].value
    assert grad.dtype == jnp.float32
    xb = np.asarray(x.astype(jnp.bfloat16), np.float64).reshape(-1, 64)
    wb = np.asarray(w.astype(jnp.bfloat16), np.float64).reshape(-1, 48)
    assert rel_err(grad, xb.T @ wb) < 1e-6


@pytest.mark.parametrize("shift, expected", [
    # No shift: token (0, 0) is seen by its whole 4x4 window.
    (0, {(r, c) for r in range(4) for c in range(4)}),
    # Shift 2 (Swin): after the cyclic roll, (0, 0) sits in the bottom-right window, whose
    # wrapped-around corner (rows 0-1, cols 0-1 of the original map) is a region of its own.
    (2, {(r, c) for r in range(2) for c in range(2)}),
])
def test_shifted_windows_attend_within_their_region(shift, expected):
    from mixmae_jax.models.swin import SwinBlock

    block = SwinBlock(8, 2, 4, (8, 8), shift=shift, mlp_ratio=4.0, qkv_bias=True,
                      rngs=L.InitKeys(0))
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8), dtype=np.float32)
    y = x.copy()
    y[0, 0, 0, 0] += 5.0  # one channel (a shift of all channels would vanish in the LayerNorm)
    change = np.abs(np.asarray(block(y) - block(x)))[0].max(-1)
    inside = np.zeros((8, 8), bool)
    inside[tuple(np.array(sorted(expected)).T)] = True
    assert (change[~inside] == 0).all(), "a token outside the window/region saw the change"
    assert (change[inside] > 1e-4).all(), change[inside]


@pytest.mark.slow
def test_alternating_shifted_blocks_scan_in_pairs_with_the_same_numbers():
    """A stage of 4 blocks alternating unshifted/shifted runs as a scan over 2 pairs: the same
    output and gradients as the unrolled blocks (two programs: fp32 summation order only)."""
    def build(scan):
        cfg = mixmim_model("B")
        cfg.update(img_size=32, embed_dim=16, depths=(4,), num_heads=(2,), window_sizes=(4,),
                   shift_windows=True, scan_blocks=scan)
        return nnx.split(swin.encoder(cfg, rngs=L.InitKeys(0)), nnx.Param)

    (g_scan, params), (g_unrolled, _) = build(True), build(False)
    shifts = [b.shift for b in nnx.merge(g_scan, params).layers[0].blocks]
    assert shifts == [0, 2, 0, 2]
    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32)

    def run(graphdef):
        def loss(p):
            z = bind(graphdef, p)(images)
            return jnp.sum(z * jnp.sin(z)), z
        return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(
            nnx.to_pure_dict(params))

    (_, z_scan), g_s = run(g_scan)
    (_, z_unrolled), g_u = run(g_unrolled)
    hlo = jax.jit(lambda p: bind(g_scan, p)(images)).lower(nnx.to_pure_dict(params)).as_text()
    assert "while" in hlo  # the pairs really ran as a loop
    assert rel_err(z_scan, z_unrolled) <= SAME_MATH_RTOL
    assert_tensors_close(K.flatten(g_s), K.flatten(g_u), SAME_MATH_RTOL, "paired-scan gradients")
