"""Exact invariants of the Flax MixMIM model (no torch model involved).

Cross-source attention has exactly zero effect; an all-zero mask gives the finetuning encoder;
mask draws, pairing, constant tables and parameter counts match the official code.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import assert_tensors_close
from recipes import mixmim_config, mixmim_model

from mixmae_jax.interop import keymap as K
from mixmae_jax.interop.mixmim_layout import MixMIMLayout
from mixmae_jax.methods import mixing
from mixmae_jax.methods.mixmim import MixMIMModel
from mixmae_jax.models import layers as L
from mixmae_jax.models import swin
from mixmae_jax.models.classifier import build_classifier
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


def random_params(abstract, seed):
    """Random params with init-like scales and non-trivial norms/biases (numpy float32)."""
    rng = np.random.default_rng(seed)
    out = {}
    for path, leaf in K.flatten(abstract).items():
        noise = rng.standard_normal(tuple(leaf.shape), dtype=np.float32)
        if path.endswith(".scale"):
            out[path] = 1.0 + 0.2 * noise
        elif path.endswith(".bias"):
            out[path] = 0.1 * noise
        elif path.endswith(".kernel"):
            out[path] = noise * np.float32(np.sqrt(2.0 / (np.prod(leaf.shape[:-1]) +
                                                          leaf.shape[-1])))
        else:
            out[path] = 0.5 * noise
    return K.unflatten({k: v.astype(np.float32) for k, v in out.items()})


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0))),
                                   nnx.Param)
    params = random_params(nnx.to_pure_dict(abstract), seed=0)

    def encode(params, images, mask):
        return bind(graphdef, params).encode_mixed(images, mask, 1)

    encode = jax.jit(encode, compiler_options=FAST_COMPILE)
    images = np.random.default_rng(1).standard_normal((4, 64, 64, 3), dtype=np.float32)
    cells = np.zeros(16, np.float32)
    cells[np.random.default_rng(2).permutation(16)[:8]] = 1.0
    return dict(cfg=cfg, params=params, encode=encode, images=images, cells=cells.reshape(4, 4),
                mask=np.tile(cells, (4, 1)))


def pixel_region(cells, value, stride=16):
    """(H, W) bool: pixels of the final-grid cells whose mask equals `value`."""
    return np.kron(cells == value, np.ones((stride, stride), bool))


# ---------------------------------------------------------------------------------------------
# Mixing: the other source has no influence at all.
# ---------------------------------------------------------------------------------------------


def test_partner_pixels_hidden_from_a_sample_have_exactly_no_effect(tiny):
    images, mask, cells = tiny["images"], tiny["mask"], tiny["cells"]
    z = np.asarray(tiny["encode"](tiny["params"], images, mask))
    noise = 3.0 * np.random.default_rng(3).standard_normal(images.shape[1:], dtype=np.float32)
    b = images.shape[0]
    for i in range(b):
        p = b - 1 - i  # partner of sample i (num_groups=1)
        # Sample i takes its own image where m = 0: the partner's pixels there are hidden from it.
        hidden = images.copy()
        hidden[p] += np.where(pixel_region(cells, 0)[..., None], noise, 0.0)
        z_hidden = np.asarray(tiny["encode"](tiny["params"], hidden, mask))
        assert np.array_equal(z_hidden[i], z[i]), f"sample {i} saw hidden partner pixels"
        assert not np.array_equal(z_hidden[p], z[p])  # the partner itself did change

        # Partner pixels sample i does see (m = 1) change only its m = 1 tokens.
        visible = images.copy()
        visible[p] += np.where(pixel_region(cells, 1)[..., None], noise, 0.0)
        z_visible = np.asarray(tiny["encode"](tiny["params"], visible, mask))
        own = cells.reshape(-1) == 0
        assert np.array_equal(z_visible[i][own], z[i][own])
        assert not np.array_equal(z_visible[i][~own], z[i][~own])


def test_all_zero_mask_equals_the_finetuning_encoder(tiny):
    cfg, params, images = tiny["cfg"], tiny["params"], tiny["images"]
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: build_classifier(cfg, 10,
                                                                         rngs=nnx.Rngs(0))),
                                   nnx.Param)
    cls_params = {"encoder": params["encoder"],
                  "head": random_params(nnx.to_pure_dict(abstract), 1)["head"]}
    feats = jax.jit(lambda p, x: bind(graphdef, p).encoder(x),
                    compiler_options=FAST_COMPILE)(cls_params, images)
    z = tiny["encode"](params, images, np.zeros_like(tiny["mask"]))
    err = rel_err(z, feats)  # two compiled programs: equal up to fp32 summation order
    print(f"\nall-zero mask vs the classifier's encoder: rel. error {err:.3g}")
    assert err <= SAME_MATH_RTOL


# ---------------------------------------------------------------------------------------------
# Mask draws and pairing.
# ---------------------------------------------------------------------------------------------


draw_mask = jax.jit(mixing.draw_mask, static_argnums=(1, 2, 3, 4, 5, 6),
                    compiler_options=FAST_COMPILE)


@pytest.mark.parametrize("cells,ratio", [(49, 0.5), (16, 0.5), (49, 0.75), (64, 0.3), (10, 0.25),
                                         (144, 0.5)])
def test_draw_mask_counts_and_groups(cells, ratio):
    batch, groups = 12, 3
    for per_sample in (False, True):
        m = np.asarray(draw_mask(jax.random.key(cells), batch, groups, cells, ratio,
                                 per_sample=per_sample))
        assert m.shape == (batch, cells) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}
        assert (m.sum(axis=1) == int(cells * ratio)).all(), m.sum(axis=1)  # official int(L * r)
        g = m.reshape(groups, batch // groups, cells)
        if per_sample:
            assert len({row.tobytes() for row in m}) > 1
        else:  # the official shared mask: one per device-local group, identical rows inside
            assert (g == g[:, :1]).all()
            if math.comb(cells, int(cells * ratio)) > 10**6:  # groups draw their own masks
                assert len({grp[0].tobytes() for grp in g}) == groups


def test_draw_mask_with_a_ratio_range():
    m = np.asarray(draw_mask(jax.random.key(0), 8, 2, 49, 0.5, range_mask_ratio=0.25))
    counts = m.sum(axis=1)
    assert ((counts >= int(49 * 0.5)) & (counts <= int(49 * 0.75))).all()
    assert (m.reshape(2, 4, 49) == m.reshape(2, 4, 49)[:, :1]).all()


def test_method_plan_draws_one_mask_per_device_group():
    """The trainer's plan (base recipe, 7x7 final grid): each device group gets its own mask."""
    from mixmae_jax.methods import get_method

    method = get_method(mixmim_config())
    m = np.asarray(jax.jit(method.make_plan, static_argnums=(1, 2))(jax.random.key(0), 32, 8)
                   ["mask"])
    assert m.shape == (32, 49) and (m.sum(axis=1) == 24).all()
    groups = m.reshape(8, 4, 49)
    assert (groups == groups[:, :1]).all()
    assert len({g[0].tobytes() for g in groups}) == 8


def test_groups_compute_what_separate_batches_compute(tiny):
    """Loss and gradients of a batch in G groups equal the mean over G separate one-group batches:
    pairing, masks and the loss never reach across a (device) group."""
    from mixmae_jax.methods import get_method

    config = mixmim_config()
    config.model = tiny_cfg()
    method = get_method(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: method.build_model(nnx.Rngs(0))), nnx.Param)
    groups, per = 3, 2
    images = np.random.default_rng(4).standard_normal((groups * per, 64, 64, 3), np.float32)
    table = np.zeros((groups, 16), np.float32)
    for g, count in enumerate((3, 8, 12)):  # a different mask and count per group
        table[g, np.random.default_rng(5 + g).permutation(16)[:count]] = 1.0

    @jax.jit
    def loss_and_grads(params, images, mask):
        n = images.shape[0] // per
        def loss(p):
            return method.loss(bind(graphdef, p), {"image": images}, {"mask": mask}, n)[0]

        return jax.value_and_grad(loss)(params)

    loss, grads = loss_and_grads(tiny["params"], images, np.repeat(table, per, axis=0))
    parts = [loss_and_grads(tiny["params"], images[g * per:(g + 1) * per],
                            np.repeat(table[g:g + 1], per, axis=0)) for g in range(groups)]
    assert float(loss) == pytest.approx(np.mean([float(p[0]) for p in parts]), rel=SAME_MATH_RTOL)
    mean = {k: np.mean([K.flatten(p[1])[k] for p in parts], axis=0, dtype=np.float64)
            for k in K.flatten(grads)}
    assert_tensors_close(K.flatten(grads), mean, SAME_MATH_RTOL, "grouped gradients")


def test_partner_reverses_within_each_group_only():
    b, groups = 12, 3
    x = np.arange(b)
    got = np.asarray(mixing.partner(jnp.asarray(x), groups))
    n = b // groups
    for i in range(b):
        g, j = divmod(i, n)
        assert got[i] == g * n + (n - 1 - j)
        assert got[i] // n == g  # never across groups
    assert np.array_equal(np.asarray(mixing.partner(jnp.asarray(x), 1)), x[::-1])
    with pytest.raises(ValueError):
        mixing.partner(jnp.asarray(x), 5)


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
# Parameter counts against the official totals (frozen sin-cos tables included).
# ---------------------------------------------------------------------------------------------

PRETRAIN_TOTALS = {"B": 114_665_784, "L": 223_468_244, "H": 684_709_594}
FINETUNE_TOTALS = {("B", 224): 88_344_352, ("L", 224): 197_396_668, ("H", 224): 659_262_658,
                   ("B", 384): 89_577_440, ("L", 384): 199_246_300}


def _numel(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


def _tables(cfg, pretrain: bool) -> int:
    """The frozen sin-cos parameters of the official model (the int64 buffers are not params)."""
    fmt = "pretrain" if pretrain else "finetune"
    return sum(v.size for k, v in MixMIMLayout(cfg).constant_entries(fmt).items()
               if not k.endswith("relative_position_index"))


@pytest.fixture(scope="module")
def abstract_pretrain():
    """Abstract MixMIMModel params per size (nnx.eval_shape: nothing is allocated)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            cfg = mixmim_model(variant, 224)
            model = nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0)))
            cache[variant] = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", ["B", "L", "H"])
def test_pretraining_parameter_counts(abstract_pretrain, variant):
    params = abstract_pretrain(variant)
    total = _numel(params) + _tables(mixmim_model(variant, 224), pretrain=True)
    assert total == PRETRAIN_TOTALS[variant]


@pytest.mark.parametrize("variant", ["B", "L", "H"])
def test_finetuning_parameter_counts_224(abstract_pretrain, variant):
    # The classifier = the same Swin encoder + a Linear(C_final -> 1000) head; the classifier
    # itself is counted directly at 384 below.
    encoder = abstract_pretrain(variant)["encoder"]
    cfg = mixmim_model(variant, 224)
    head = (cfg.embed_dim * 8 + 1) * 1000
    assert _numel(encoder) + head + _tables(cfg, pretrain=False) == FINETUNE_TOTALS[(variant, 224)]


@pytest.mark.parametrize("variant", ["B", "L"])
def test_finetuning_parameter_counts_384(variant):
    cfg = mixmim_model(variant, 384)
    model = nnx.eval_shape(lambda: build_classifier(cfg, 1000, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    assert set(params) == {"encoder", "head"}
    assert _numel(params) + _tables(cfg, pretrain=False) == FINETUNE_TOTALS[(variant, 384)]


def test_encoder_is_the_same_module_in_both_models():
    cfg = tiny_cfg()
    pre = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]
    enc = nnx.split(nnx.eval_shape(lambda: swin.encoder(cfg, rngs=nnx.Rngs(0))), nnx.Param)[1]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nnx.to_pure_dict(pre)["encoder"])
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, nnx.to_pure_dict(enc))


def test_remat_changes_memory_not_numbers(tiny):
    """config.model.remat recomputes parts ("dots": all but the weight matmuls) or all ("full")
    of each encoder block in the backward pass: the same loss and gradients as "none"."""
    from mixmae_jax.methods.mixmim import dual_reconstruction_loss

    def loss_and_grad(remat):
        cfg = tiny_cfg()
        cfg.remat = remat
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0))),
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
        model = nnx.eval_shape(lambda: get_method(c).build_model(nnx.Rngs(0)))
        return jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(nnx.split(model, nnx.Param)[1]))

    assert shapes(old) == shapes(config)


def test_drop_path_is_per_sample_and_off_without_an_rng(tiny):
    """Stochastic depth (finetuning) runs inside the scanned blocks with per-block rates."""
    cfg = tiny_cfg()
    cfg.drop_path_rate = 0.5
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=nnx.Rngs(0))), nnx.Param)

    @jax.jit
    def encode(params, rng):
        return bind(graphdef, params).encode_mixed(tiny["images"], tiny["mask"], 1, rng)

    plain = tiny["encode"](tiny["params"], tiny["images"], tiny["mask"])
    assert rel_err(encode(tiny["params"], None), plain) <= SAME_MATH_RTOL
    a = encode(tiny["params"], jax.random.PRNGKey(0))
    b = encode(tiny["params"], jax.random.PRNGKey(1))
    assert np.abs(np.asarray(a) - np.asarray(plain)).max() > 1e-3  # some blocks were dropped
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3  # and which depends on the key


def test_a_bf16_linear_keeps_its_kernel_gradient_in_float32():
    """In bf16 compute a Linear multiplies bf16 operands, but its kernel's gradient is the
    float32 sum of the bf16 products (what the official fp32 .grad holds, and what devices then
    reduce): rounding it to bf16 first would be off by ~2^-9 relative."""
    graphdef, params = nnx.split(L.dense(64, 48, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 64))
    w = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 48))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x).astype(jnp.float32) * w)

    grad = jax.grad(loss)(params)["kernel"].value
    assert grad.dtype == jnp.float32
    xb = np.asarray(x.astype(jnp.bfloat16), np.float64).reshape(-1, 64)
    wb = np.asarray(w.astype(jnp.bfloat16), np.float64).reshape(-1, 48)
    assert rel_err(grad, xb.T @ wb) < 1e-6


def test_bf16_compute_keeps_fp32_params_and_close_loss(tiny):
    """compute_dtype=bfloat16: bf16 matmuls, fp32 master weights, loss within bf16 precision."""
    from mixmae_jax.methods import get_method

    losses = {}
    plan = {"mask": jnp.asarray(tiny["mask"])}
    for dtype in ("float32", "bfloat16"):
        config = mixmim_config()
        config.model = tiny_cfg()
        config.compute_dtype = dtype
        method = get_method(config)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda m=method: m.build_model(
            nnx.Rngs(0))), nnx.Param)
        dtypes = {x.dtype for x in jax.tree.leaves(nnx.to_pure_dict(abstract))}
        assert dtypes == {jnp.dtype("float32")}
        batch = {"image": tiny["images"]}
        loss = jax.jit(lambda p, g=graphdef, m=method, x=batch: m.loss(bind(g, p), x, plan, 1)[0])(
            tiny["params"])
        losses[dtype] = float(loss)
    assert losses["bfloat16"] != losses["float32"]  # bf16 really ran
    assert abs(losses["bfloat16"] - losses["float32"]) < 2e-2 * abs(losses["float32"])


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
                      rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 8), dtype=np.float32)
    y = x.copy()
    y[0, 0, 0, 0] += 5.0  # one channel (a shift of all channels would vanish in the LayerNorm)
    change = np.abs(np.asarray(block(y) - block(x)))[0].max(-1)
    inside = np.zeros((8, 8), bool)
    inside[tuple(np.array(sorted(expected)).T)] = True
    assert (change[~inside] == 0).all(), "a token outside the window/region saw the change"
    assert (change[inside] > 1e-4).all(), change[inside]


def test_alternating_shifted_blocks_scan_in_pairs_with_the_same_numbers():
    """A stage of 4 blocks alternating unshifted/shifted runs as a scan over 2 pairs: the same
    output and gradients as the unrolled blocks (two programs: fp32 summation order only)."""
    def build(scan):
        cfg = mixmim_model("B")
        cfg.update(img_size=32, embed_dim=16, depths=(4,), num_heads=(2,), window_sizes=(4,),
                   shift_windows=True, scan_blocks=scan)
        return nnx.split(swin.encoder(cfg, rngs=nnx.Rngs(0)), nnx.Param)

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
