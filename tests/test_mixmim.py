"""MixMIM (methods/mixmim.py, methods/mixing.py): parity of the Flax model with the plain torch
reference through the checkpoint converter, what is MixMIM's own in its exports (constants,
LayerNorms, the fresh head), exact invariants, mask draws and parameter counts. What every method
must do (conversion both ways, masks from files, training and resume) is the contract suite's
(test_methods.py).

Parity: random JAX params -> `params_to_state_dict` -> strict `load_state_dict` into the torch
reference; same images (NHWC / NCHW), same final-grid mask shared by the batch, JAX num_groups=1
so the partner of sample i is n-1-i (torch's x.flip(0)). The reference keeps the constants it
computes itself (relative-position indices, sin-cos tables): the export's are checked against
them, never loaded over them.

Tolerances: see parity.py and mixmae_jax/numerics.py (the JAX fp32 error against the float64
reference, bounded by the torch fp32 error).
"""

import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from numerics import assert_tensors_close
from parity import (
    FAST_COMPILE,
    abstract_model,
    check_against_exact,
    load_with_own_constants,
    mixmim_encode_case,
    nchw,
    random_params,
)
from recipes import mixmim_config, mixmim_model
from references import mixmim as R

from mixmae_jax.interop import keymap as K
from mixmae_jax.interop import to_torch
from mixmae_jax.interop.mixmim_layout import MixMIMLayout
from mixmae_jax.methods import mixing
from mixmae_jax.methods.mixmim import MixMIMModel, dual_reconstruction_loss
from mixmae_jax.models import swin
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.numerics import FLOOR, FWD_TOL, GRAD_TOL, RATIO, SAME_MATH_RTOL, rel_err
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
    graphdef, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=InitKeys(0)))
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


@pytest.mark.slow
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
    graphdef, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=InitKeys(0)))
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
# 3. Finetuning export: features, norms, constants, the fresh head.
# ---------------------------------------------------------------------------------------------


def test_finetune_features_parity():
    cfg = tiny_cfg("3stage")
    graphdef, abstract = abstract_model(lambda: build_classifier(cfg, 10, rngs=InitKeys(0)))
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


@pytest.mark.slow
def test_every_layer_norm_matches_the_references_own():
    """Each LayerNorm of the Flax model, with random affine params, equals the reference's
    module of the same name on low-variance tokens, where eps dominates the denominator (an eps
    of 1e-6 instead of 1e-5 changes the output by ~2x here, by ~5e-6 at unit variance)."""
    cfg = tiny_cfg("2stage")
    model = MixMIMModel(cfg, rngs=InitKeys(0))
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
    _, abstract = abstract_model(lambda: MixMIMModel(cfg, rngs=InitKeys(0)))
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
# 4. Exact invariants of the Flax model (no torch model involved): cross-source attention has
#    exactly zero effect; an all-zero mask gives the finetuning encoder; mask draws, pairing and
#    parameter counts match the official code.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return mixmim_encode_case(tiny_cfg("3stage"))


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
                                                                         rngs=InitKeys(0))),
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


@pytest.mark.slow
def test_groups_compute_what_separate_batches_compute(tiny):
    """Loss and gradients of a batch in G groups equal the mean over G separate one-group batches:
    pairing, masks and the loss never reach across a (device) group."""
    from mixmae_jax.methods import get_method

    config = mixmim_config()
    config.model = tiny_cfg("3stage")
    method = get_method(config)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: method.build_model(InitKeys(0))), nnx.Param)
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
            model = nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=InitKeys(0)))
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
    model = nnx.eval_shape(lambda: build_classifier(cfg, 1000, rngs=InitKeys(0)))
    params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
    assert set(params) == {"encoder", "head"}
    assert _numel(params) + _tables(cfg, pretrain=False) == FINETUNE_TOTALS[(variant, 384)]


def test_encoder_is_the_same_module_in_both_models():
    cfg = tiny_cfg("3stage")
    pre = nnx.split(nnx.eval_shape(lambda: MixMIMModel(cfg, rngs=InitKeys(0))), nnx.Param)[1]
    enc = nnx.split(nnx.eval_shape(lambda: swin.encoder(cfg, rngs=InitKeys(0))), nnx.Param)[1]
    shapes = jax.tree_util.tree_map(lambda x: x.shape, nnx.to_pure_dict(pre)["encoder"])
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, nnx.to_pure_dict(enc))


@pytest.mark.slow
def test_bf16_compute_keeps_fp32_params_and_close_loss(tiny):
    """compute_dtype=bfloat16: bf16 matmuls, fp32 master weights, loss within bf16 precision."""
    from mixmae_jax.methods import get_method

    losses = {}
    plan = {"mask": jnp.asarray(tiny["mask"])}
    for dtype in ("float32", "bfloat16"):
        config = mixmim_config()
        config.model = tiny_cfg("3stage")
        config.compute_dtype = dtype
        method = get_method(config)
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda m=method: m.build_model(
            InitKeys(0))), nnx.Param)
        dtypes = {x.dtype for x in jax.tree.leaves(nnx.to_pure_dict(abstract))}
        assert dtypes == {jnp.dtype("float32")}
        batch = {"image": tiny["images"]}
        loss = jax.jit(lambda p, g=graphdef, m=method, x=batch: m.loss(bind(g, p), x, plan, 1)[0])(
            tiny["params"])
        losses[dtype] = float(loss)
    assert losses["bfloat16"] != losses["float32"]  # bf16 really ran
    assert abs(losses["bfloat16"] - losses["float32"]) < 2e-2 * abs(losses["float32"])


