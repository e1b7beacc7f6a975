"""SimMIM (methods/simmim.py): parity with the plain torch reference, its buffers in the
conversion, the mask plan, the recipe and its initialisation. What every method must do
(conversion both ways, masks from files, training and resume) is the contract suite's
(test_methods.py).

Parity as in test_mixmim.py (helpers in parity.py): random JAX params -> `params_to_state_dict`
-> strict load into `SimMIMPretrainTorch` keeping its own constants (index and `attn_mask`
buffers); torch in float32 and float64; the JAX float32 error to float64 bounded by RATIO x
torch's own float32 error (with a floor). The tiny model (64 px, 3 stages 16 -> 8 -> 4 tokens,
windows 4) shifts in stages 0 and 1 and clamps stage 2 to one window; its 8-px mask squares (2x2
tokens, stride 16) keep the mask patch, the token patch and the decoder stride apart, so a wrong
upsampling factor shows.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
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
from references import simmim as R

from mixmae_jax import config as config_lib
from mixmae_jax.config import ConfigError
from mixmae_jax.interop import from_torch, to_torch
from mixmae_jax.interop import keymap as K
from mixmae_jax.interop.simmim_layout import SimMIMLayout
from mixmae_jax.methods import get_method
from mixmae_jax.methods.simmim import SimMIMModel, masked_l1_loss, masked_tokens
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.models.layers import InitKeys
from mixmae_jax.numerics import FLOOR, FWD_TOL, GRAD_TOL, RATIO, rel_err
from mixmae_jax.train import optim
from mixmae_jax.train.step import bind, init_params

TINY = dict(img_size=64, patch_size=4, embed_dim=16, depths=(2, 2, 2), num_heads=(1, 2, 4),
            window_sizes=(4, 4, 4))
MASK_PATCH = 8  # 8x8 mask grid, ceil(64 * 0.6) = 39 squares of 2x2 tokens


def tiny_config(mask_patch=MASK_PATCH):
    c = load("simmim_swin_b.py", "tiny")
    c.model.update(TINY)
    c.method.mask_patch_size = mask_patch
    c.data.image_size = TINY["img_size"]
    return c


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------
# (a) Tiny pretraining model: every stage, encoder output, x_rec, loss, every gradient.
# ---------------------------------------------------------------------------------------------


def torch_run(tmodel, images, token_mask, dtype):
    """Stage outputs, encoder output, x_rec, loss and gradients of the reference in `dtype`. The
    float32 run gets the official int64 mask (the loader's), float64 a float64 one."""
    x = nchw(images).to(dtype)
    m = torch.from_numpy(token_mask).to(torch.int64 if dtype == torch.float32 else dtype)
    z, stages = tmodel.forward_encoder(x, m, return_stages=True)
    x_rec = tmodel.forward_decoder(z)
    loss = tmodel.forward_loss(x, x_rec, m)
    loss.backward()
    b = images.shape[0]
    values = {("patch embed + mask token" if s == 0 else f"stage {s - 1} output"):
              t.reshape(b, -1, t.shape[-1]) for s, t in enumerate(stages)}
    values.update({"encoder output (final norm)": z.flatten(2).transpose(1, 2),
                   "decoder output x_rec": x_rec.permute(0, 2, 3, 1), "loss": loss})
    grads = {k: p.grad for k, p in tmodel.named_parameters()}
    return ({k: v.detach().double().numpy() for k, v in values.items()},
            {k: v.double().numpy() for k, v in grads.items()})


@pytest.fixture(scope="module")
def tiny_run():
    config = tiny_config()
    method = get_method(config)
    cfg, layout = config.model, SimMIMLayout(config.model)
    graphdef, abstract = abstract_model(lambda: SimMIMModel(cfg, rngs=InitKeys(0)))
    params = random_params(abstract, seed=1)
    state_dict = to_torch.params_to_state_dict(params, layout)

    batch = 3
    images = np.random.default_rng(2).standard_normal((batch, 64, 64, 3), dtype=np.float32)
    mask = np.asarray(method.make_plan(jax.random.PRNGKey(3), batch, 1)["mask"])

    def loss_fn(params, images, mask):
        model = bind(graphdef, params)
        token_mask, pixel_mask = method.upsampled(mask, model)
        enc = model.encoder
        tokens = masked_tokens(enc, enc.embed(images), token_mask)
        stages, z = enc.stage_outputs(tokens), enc.encode(tokens)
        x_rec = model.decode(z)
        return masked_l1_loss(images, x_rec, pixel_mask), (z, stages, x_rec, token_mask)

    grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True), compiler_options=FAST_COMPILE)
    (loss, (z, stages, x_rec, token_mask)), grads = grad_fn(params, images, mask)
    token_mask = np.asarray(token_mask).astype(np.int64)
    values = {("patch embed + mask token" if s == 0 else f"stage {s - 1} output"):
              np.reshape(a, (batch, -1, a.shape[-1])) for s, a in enumerate(stages)}
    values.update({"encoder output (final norm)": z, "decoder output x_rec": x_rec,
                   "loss": loss})

    torch_values, torch_grads = {}, {}
    for dtype in (torch.float32, torch.float64):
        tmodel = references.build(layout, "pretrain", 0)
        tmodel = load_with_own_constants(tmodel, state_dict, layout).to(dtype).eval()
        torch_values[dtype], torch_grads[dtype] = torch_run(tmodel, images, token_mask, dtype)
    return dict(config=config, method=method, layout=layout, graphdef=graphdef, params=params,
                images=images, mask=mask, token_mask=token_mask, values=values,
                grad_sd=to_torch.params_to_state_dict(grads, layout), torch_values=torch_values,
                torch_grads=torch_grads)


@pytest.mark.slow
def test_tiny_forward_parity(tiny_run):
    r = tiny_run
    assert len(r["values"]) == 3 + 1 + 3  # input, 3 stages, encoder output, x_rec, loss
    check_against_exact("SimMIM tiny forward", r["values"], r["torch_values"][torch.float32],
                        r["torch_values"][torch.float64], FWD_TOL)


def test_tiny_gradient_parity(tiny_run):
    r = tiny_run
    t32, t64 = r["torch_grads"][torch.float32], r["torch_grads"][torch.float64]
    layout = r["layout"]
    assert set(t64) == {k for k in r["grad_sd"] if not layout.is_constant_key(k)}
    assert {"encoder.mask_token", "decoder.0.weight", "decoder.0.bias"} <= set(t64)
    jax_grads = {k: r["grad_sd"][k].numpy() for k in t64}
    check_against_exact(f"SimMIM tiny gradients ({len(t64)} tensors)", jax_grads, t32, t64,
                        GRAD_TOL)


def test_the_tiny_model_shifts_and_masks_what_it_should(tiny_run):
    """The geometry the parity covers: stages 0-1 shifted (attn_mask buffers), stage 2 one
    window; per-sample masks of 39 squares, each 2x2 tokens."""
    r = tiny_run
    masks = [k for k in r["grad_sd"] if k.endswith("attn_mask")]
    assert masks == ["encoder.layers.0.blocks.1.attn_mask", "encoder.layers.1.blocks.1.attn_mask"]
    assert r["mask"].shape == (3, 8, 8) and r["mask"].reshape(3, -1).sum(1).tolist() == [39] * 3
    np.testing.assert_array_equal(r["token_mask"], R.upsample_mask(r["mask"].astype(np.int64), 2))


def test_method_loss_is_the_parity_loss(tiny_run):
    """`Method.loss` (what training runs) and `panels` compute the loss checked above."""
    r = tiny_run
    method, graphdef = r["method"], r["graphdef"]
    plan = {"mask": jnp.asarray(r["mask"])}

    def both(params, images):
        model = bind(graphdef, params)
        loss, aux = method.loss(model, {"image": images}, plan, 1)
        return loss, aux, method.panels(model, images, plan)

    loss, aux, (ploss, paux, cols) = jax.jit(both, compiler_options=FAST_COMPILE)(
        r["params"], r["images"])
    assert aux == {} and paux == {}
    exact = float(r["torch_values"][torch.float64]["loss"])
    tol = RATIO * max(rel_err(r["torch_values"][torch.float32]["loss"], exact), FLOOR)
    assert rel_err(loss, exact) <= tol and rel_err(ploss, exact) <= tol
    # Panels: masked squares zero (the mean colour) in "masked", x_rec pasted in them. (jit
    # returns dicts in sorted key order, so the display order is not visible here.)
    assert set(cols) == {"original", "masked", "reconstruction"}
    pix = R.upsample_mask(r["mask"], MASK_PATCH)[..., None]
    images, x_rec = r["images"], r["values"]["decoder output x_rec"]
    np.testing.assert_array_equal(cols["original"], images)
    np.testing.assert_array_equal(cols["masked"], images * (1 - pix))
    np.testing.assert_array_equal(np.asarray(cols["reconstruction"])[pix[..., 0] == 0],
                                  images[pix[..., 0] == 0])
    # Two fp32 evaluations of x_rec (two programs), each within RATIO * FLOOR of exact.
    assert rel_err(np.asarray(cols["reconstruction"]) * pix, np.asarray(x_rec) * pix) < (
        2 * RATIO * FLOOR)


def test_initialisation_is_the_official_one():
    """Swin init pass (trunc-normal .02 on every Linear weight, zero biases; MixMIM's Swin would
    be xavier-uniform, std 0.18 for the 16 -> 48 qkv here), mask token and bias tables
    trunc-normal .02, the decoder conv torch's default U(+-1/sqrt(fan_in))."""
    method = get_method(tiny_config())
    init = jax.jit(lambda key: init_params(method, key), compiler_options=FAST_COMPILE)
    flat = K.flatten(jax.device_get(init(jax.random.PRNGKey(0))))
    linear = np.concatenate([np.ravel(v) for k, v in flat.items() if k.endswith(".kernel")
                             and k.startswith("encoder.layers")])
    assert linear.size > 50_000 and abs(linear.std() - 0.02) < 0.001
    assert all(not np.any(v) for k, v in flat.items() if k.startswith("encoder.layers")
               and k.endswith(".bias") and ".norm" not in k)
    for k in ("encoder.mask_token", "encoder.layers.0.blocks.1.attn.relative_position_bias_table"):
        assert 0.01 < flat[k].std() < 0.03, k
    bound = 1 / np.sqrt(64)
    w = flat["decoder.kernel"]
    assert w.shape == (1, 1, 64, 16 * 16 * 3) and np.abs(w).max() <= bound
    assert abs(w.std() - bound / np.sqrt(3)) < 0.01 * bound


# ---------------------------------------------------------------------------------------------
# (b) Swin-B at full size (192 px, window 6): the loss at batch 2.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_swin_b_loss_parity():
    t0 = time.perf_counter()
    config = load("simmim_swin_b.py")
    method, cfg = get_method(config), config.model
    layout = SimMIMLayout(cfg)
    graphdef, abstract = abstract_model(lambda: SimMIMModel(cfg, rngs=InitKeys(0)))
    params = random_params(abstract, seed=4)
    state_dict = to_torch.params_to_state_dict(params, layout)
    assert len(state_dict) == 365  # 330 params, 24 indices, 11 attn_masks

    images = np.random.default_rng(5).standard_normal((2, 192, 192, 3), dtype=np.float32)
    mask = method.make_plan(jax.random.PRNGKey(6), 2, 1)["mask"]
    assert np.asarray(mask).reshape(2, 36).sum(1).tolist() == [22, 22]
    loss, _ = jax.jit(lambda p, x: method.loss(bind(graphdef, p), {"image": x}, {"mask": mask},
                                               1))(params, images)
    del params

    token_mask = R.upsample_mask(np.asarray(mask).astype(np.int64), 8)
    tmodel = load_with_own_constants(references.build(layout, "pretrain", 0), state_dict,
                                        layout).eval()
    del state_dict
    exact = {}
    for dtype in (torch.float32, torch.float64):
        m = torch.from_numpy(token_mask).to(torch.int64 if dtype == torch.float32 else dtype)
        with torch.no_grad():
            exact[dtype] = {"loss": tmodel(nchw(images).to(dtype), m).double().numpy()}
        tmodel = tmodel.double()
    check_against_exact(f"SimMIM Swin-B 192/w6, batch 2 (loss {float(loss):.6f} vs "
                        f"{float(exact[torch.float64]['loss']):.6f}, "
                        f"{time.perf_counter() - t0:.1f} s)", {"loss": loss},
                        exact[torch.float32], exact[torch.float64], FWD_TOL)


# ---------------------------------------------------------------------------------------------
# (c) Conversion: the buffers, other windows, the fine-tuning export.
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pretrain_sd():
    cfg = tiny_config().model
    torch.manual_seed(0)
    sd = references.build(SimMIMLayout(cfg), "pretrain", 0).state_dict()
    _, template = abstract_model(lambda: SimMIMModel(cfg, rngs=InitKeys(0)))
    return cfg, sd, template


def _conversion_error(fn, *args, **kw) -> str:
    with pytest.raises(K.ConversionError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_buffers_that_are_not_the_models_own_are_refused_naming_each(tiny_pretrain_sd):
    """SimMIM's buffers are checked, not loaded: an attn_mask with a 0 turned -100 in one region,
    an attn_mask of another shape and a wrong relative_position_index are each named (the
    contract suite checks missing, unknown and reshaped tensors)."""
    cfg, sd, template = tiny_pretrain_sd
    layout = SimMIMLayout(cfg)
    bad = dict(sd)
    mask = bad["encoder.layers.0.blocks.1.attn_mask"].clone()
    mask[0, 0, 5] = -100.0  # same region: must be 0
    bad["encoder.layers.0.blocks.1.attn_mask"] = mask
    bad["encoder.layers.1.blocks.1.attn_mask"] = torch.zeros(4, 16, 16)
    index = bad["encoder.layers.2.blocks.0.attn.relative_position_index"].clone()
    index[0, 0] += 1
    bad["encoder.layers.2.blocks.0.attn.relative_position_index"] = index
    msg = _conversion_error(from_torch.state_dict_to_params, bad, layout, template)
    print("\n" + msg)
    for key in ("encoder.layers.0.blocks.1.attn_mask", "encoder.layers.1.blocks.1.attn_mask",
                "encoder.layers.2.blocks.0.attn.relative_position_index"):
        assert key in msg
    assert msg.count("\n  ") == 3


def test_attn_mask_of_another_geometry_is_accepted_and_noted(tiny_pretrain_sd):
    """A file at another map size (e.g. the official 224-px finetune of a 192-px pretraining)
    carries the masks of its own geometry: checked against that, then recomputed."""
    cfg, sd, template = tiny_pretrain_sd
    other = dict(sd, **{"encoder.layers.0.blocks.1.attn_mask": R.shifted_window_mask((32, 32), 4,
                                                                                    2)})
    _, rep = from_torch.state_dict_to_params(other, SimMIMLayout(cfg), template)
    assert len(rep.notes) == 1 and "32x32" in rep.notes[0] and "16x16" in rep.notes[0]
    # A mask of window 8 beside a window-4 bias table is inconsistent.
    other["encoder.layers.0.blocks.1.attn_mask"] = R.shifted_window_mask((16, 16), 8, 4)
    msg = _conversion_error(from_torch.state_dict_to_params, other, SimMIMLayout(cfg), template)
    assert "encoder.layers.0.blocks.1.attn_mask" in msg and "window 8" in msg


def test_window_change_resizes_tables_and_checks_masks_by_their_own_geometry(tiny_pretrain_sd):
    """The official 192/w6 -> 224/w7 flow in small: a window-4 file into a window-8 stage 0.
    Tables are resized (with a note: the official SimMIM loader interpolates differently), the
    window-4 index and attn_mask are checked as window 4 and the target's recomputed."""
    _, sd, _ = tiny_pretrain_sd
    target = tiny_config().model
    target.window_sizes = (8, 4, 4)
    layout = SimMIMLayout(target)
    _, template = abstract_model(lambda: SimMIMModel(target, rngs=InitKeys(0)))
    params, rep = from_torch.state_dict_to_params(sd, layout, template)
    print("\n" + str(rep))
    assert [r.split(":")[0] for r in rep.resized] == [
        f"encoder.layers.0.blocks.{j}.attn.relative_position_bias_table" for j in (0, 1)]
    table = params["encoder"]["layers"][0]["blocks"][1]["attn"]["relative_position_bias_table"]
    assert table.shape == (225, 1)
    assert sum("geometric" in n for n in rep.notes) == 2
    assert sum("encoder.layers.0.blocks.1.attn_mask: 16x16 map, window 4" in n
               for n in rep.notes) == 1
    assert len(rep.constants) == 8  # all of the file's index and mask buffers verified
    assert layout.constant_entries("pretrain")["encoder.layers.0.blocks.1.attn_mask"].shape == (
        4, 64, 64)


def test_pretraining_export_to_finetune_format():
    """Decoder and mask token dropped, a fresh head as the official finetuning starts it (Swin
    init pass: trunc-normal .02, zero bias); the keys lose their `encoder.` prefix."""
    cfg = tiny_config().model
    layout = SimMIMLayout(cfg)
    _, abstract = abstract_model(lambda: SimMIMModel(cfg, rngs=InitKeys(0)))
    params = random_params(abstract, seed=9)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=1000,
                                       seed=3)
    assert not any(k.startswith(("encoder.", "decoder.", "mask_token")) for k in sd)
    w = sd["head.weight"]
    assert w.shape == (1000, 64) and torch.equal(sd["head.bias"], torch.zeros(1000))
    assert 0.019 < float(w.std()) < 0.021
    np.testing.assert_array_equal(sd["norm.weight"].numpy(), params["encoder"]["norm"]["scale"])


@pytest.mark.slow
def test_odd_shifted_window_classifier_parity():
    """SimMIM fine-tunes Swin-B at window 7 (shift 3): an odd window, shifted. A 6x6 map with
    window 3 (shift 1) in stage 0 and a clamped 3x3 stage 1: the classifier's logits equal the
    official classifier's (float64 reference, strict load with its own index and mask buffers)."""
    cfg = tiny_config().model
    cfg.update(img_size=24, depths=(2, 2), num_heads=(2, 4), window_sizes=(3, 3))
    layout = SimMIMLayout(cfg)
    graphdef, abstract = abstract_model(lambda: build_classifier(cfg, 5, rngs=InitKeys(0)))
    params = random_params(abstract, seed=4)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=5)
    tmodel = R.SimMIMFinetuneTorch.from_model_config(dict(cfg.to_dict(), ape=False),
                                                     num_classes=5)
    assert tmodel.layers[0].blocks[1].shift == 1 and tmodel.layers[1].blocks[1].shift == 0
    load_with_own_constants(tmodel, sd, layout)
    x = np.random.default_rng(1).standard_normal((2, 24, 24, 3)).astype(np.float32)
    got = np.asarray(bind(graphdef, params)(x))
    with torch.no_grad():
        t32 = tmodel.float().eval()(nchw(x)).numpy()
        t64 = tmodel.double().eval()(nchw(x).double()).numpy()
    check_against_exact("odd window 3, shift 1", {"logits": got}, {"logits": t32},
                        {"logits": t64}, FWD_TOL)


# ---------------------------------------------------------------------------------------------
# (d) Exported constants are the reference's own.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "simmim_swin_b.py", "simmim_swin_l.py"])
def test_exported_constants_equal_the_references_own(name):
    """Index and attn_mask buffers computed by the layout (numpy) equal what the reference
    computes for each of its blocks (own geometry, own code): all keys, shapes, dtypes, values."""
    cfg = tiny_config().model if name == "tiny" else load(name).model
    layout = SimMIMLayout(cfg)
    for fmt in ("pretrain", "finetune"):
        prefix = "encoder." if fmt == "pretrain" else ""
        with torch.device("meta"):
            ref = references.build(layout, fmt, 1000)
        encoder = ref.encoder if fmt == "pretrain" else ref
        want = {}
        for s, stage in enumerate(encoder.layers):
            for j, blk in enumerate(stage.blocks):
                key = f"{prefix}layers.{s}.blocks.{j}."
                want[key + "attn.relative_position_index"] = R.relative_position_index(
                    blk.window)
                if blk.shift:
                    want[key + "attn_mask"] = R.shifted_window_mask(blk.resolution, blk.window,
                                                                    blk.shift).numpy()
        reference = ref.state_dict()
        assert set(want) == {k for k in reference if layout.is_constant_key(k)}
        exported = layout.constant_entries(fmt)
        assert set(exported) == set(want)
        for k, v in exported.items():
            assert tuple(v.shape) == tuple(reference[k].shape), k
            assert torch.from_numpy(np.array(v)).dtype == reference[k].dtype, k
            np.testing.assert_array_equal(v, want[k], err_msg=k)
    n_masks = sum(k.endswith("attn_mask") for k in want)
    assert n_masks == {"tiny": 2, "simmim_swin_b.py": 11, "simmim_swin_l.py": 2}[name]


# ---------------------------------------------------------------------------------------------
# (e) The plan; (f) masks from a file.
# ---------------------------------------------------------------------------------------------


def test_plan_invariants():
    method = get_method(load("simmim_swin_b.py"))
    assert (method.mask_grid(), method.num_masked()) == (6, 22)  # ceil(36 * 0.6)
    draw = jax.jit(lambda key: method.make_plan(key, 4096, 8)["mask"])
    mask = np.asarray(draw(jax.random.PRNGKey(0)))
    assert mask.shape == (4096, 6, 6) and mask.dtype == np.float32
    assert set(np.unique(mask)) == {0.0, 1.0}
    flat = mask.reshape(4096, 36)
    assert (flat.sum(1) == 22).all()
    assert len({row.tobytes() for row in flat}) > 4000  # per sample (C(36, 22) ~ 1.3e9 masks)
    # Uniform over the squares: each masked with probability 22/36 (std 0.0076 at 4096).
    assert np.abs(flat.mean(0) - 22 / 36).max() < 0.04
    assert not np.array_equal(mask, np.asarray(draw(jax.random.PRNGKey(1))))
    tiny = get_method(load("simmim_swin_b.py", "tiny"))
    assert (tiny.mask_grid(), tiny.num_masked()) == (4, 10)  # ceil(16 * 0.6)
    assert (np.asarray(tiny.make_plan(jax.random.PRNGKey(2), 5, 1)["mask"]).reshape(5, 16)
            .sum(1) == 10).all()


def test_mask_from_file():
    """The official generator's mask (1 = masked square), per image or shared, with exactly the
    recipe's count per image (the contract suite checks the rest of the file handling)."""
    method = get_method(load("simmim_swin_b.py"))
    good = R.make_mask(0)[::8, ::8]  # the official generator's mask, on the 6x6 square grid
    assert good.shape == (6, 6) and good.sum() == 22
    plan = method.mask_from_file(np.stack([good, good[::-1]]), 2, "m.npy")
    np.testing.assert_array_equal(plan["mask"], np.stack([good, good[::-1]]).astype(np.float32))
    shared = method.mask_from_file(good, 3, "m.npy")["mask"]
    assert shared.shape == (3, 6, 6) and (np.asarray(shared) == good).all()
    fewer = good.copy()
    fewer[good == 1] = 0
    fewer.flat[:21] = 1
    with pytest.raises(ValueError, match=r"^--mask masks/m.npy: each image must have exactly 22 "
                                         r".*\[22, 21\]"):
        method.mask_from_file(np.stack([good, fewer]), 2, "masks/m.npy")


# ---------------------------------------------------------------------------------------------
# (g) The recipes.
# ---------------------------------------------------------------------------------------------


def test_swin_b_recipe_is_the_official_one():
    c = load("simmim_swin_b.py")
    m, o = c.model, c.optim
    # yaml = configs/swin_base__800ep/simmim_pretrain__swin_base__img192_window6__800ep.yaml,
    # config.py = its defaults (microsoft/SimMIM @ d3e29bc).
    assert (m.embed_dim, tuple(m.depths), tuple(m.num_heads)) == (128, (2, 2, 18, 2),
                                                                  (4, 8, 16, 32))  # yaml SWIN
    assert tuple(m.window_sizes) == (6, 6, 6, 6)  # yaml WINDOW_SIZE 6
    assert m.img_size == c.data.image_size == 192  # yaml DATA.IMG_SIZE
    assert m.patch_size == 4 and m.ape == "none"  # config.py SWIN.PATCH_SIZE, SWIN.APE False
    assert m.shift_windows and m.mlp_ratio == 4.0 and m.qkv_bias  # config.py SWIN.MLP_RATIO ...
    assert m.drop_path_rate == 0.0  # yaml DROP_PATH_RATE
    assert (c.method.mask_patch_size, c.method.mask_ratio) == (32, 0.6)  # yaml DATA.MASK_*
    assert tuple(c.data.crop_scale) == (0.67, 1.0) and c.data.hflip  # data_simmim.py
    assert c.batch_size == 2048  # README: 16 GPUs x 128
    assert c.epochs == 800 and o.warmup_epochs == 10  # yaml TRAIN.EPOCHS, WARMUP_EPOCHS
    assert (o.base_lr, o.lr_batch_divisor) == (1e-4, 512)  # yaml BASE_LR; main_simmim.py / 512
    assert o.warmup_lr == pytest.approx(5e-7 * 4)  # yaml WARMUP_LR, scaled x 2048/512
    assert o.min_lr == pytest.approx(5e-6 * 4)  # config.py MIN_LR, scaled x 2048/512
    assert o.schedule == "multistep" and tuple(o.decay_epochs) == (700,)  # yaml LR_SCHEDULER
    assert o.decay_rate == 0.1 and o.weight_decay == 0.05  # yaml GAMMA, WEIGHT_DECAY
    assert (o.b1, o.b2, o.eps) == (0.9, 0.999, 1e-8)  # config.py OPTIMIZER.BETAS, EPS
    assert o.clip_grad_norm == 5.0 and o.grad_accum_steps == 1  # config.py CLIP_GRAD

    # lr_scheduler.py MultiStepLRScheduler, per step: warmup_lr -> 4e-4, x0.1 at epoch 700.
    spe = 625  # 1,281,167 // 2048
    _, schedule = optim.make_optimizer(c, spe)
    # float32 schedule: absolute error ~ ulp(4e-4) = 3e-11.
    lr = lambda step: pytest.approx(float(schedule(step)), rel=1e-6, abs=1e-10)  # noqa: E731
    assert lr(0) == 2e-6 and lr(5 * spe) == (2e-6 + 4e-4) / 2
    assert lr(10 * spe) == 4e-4 and lr(700 * spe - 1) == 4e-4
    assert lr(700 * spe) == 4e-5 and lr(800 * spe) == 4e-5

    # optimizer.py: no decay on 1-D params and encoder.mask_token; bias tables and decoder
    # decayed (the skip keyword "encoder.relative_position_bias_table" never matches). The
    # tiny model has every kind of parameter Swin-B has.
    _, abstract = abstract_model(lambda: SimMIMModel(tiny_config().model, rngs=InitKeys(0)))
    decay = K.flatten(optim.decay_mask(abstract, tuple(o.no_decay)))
    assert not decay["encoder.mask_token"]
    assert decay["encoder.layers.1.blocks.1.attn.relative_position_bias_table"]
    assert decay["decoder.kernel"] and not decay["decoder.bias"]
    assert not any(v for k, v in decay.items() if k.endswith((".bias", ".scale")))
    assert sum(not v for v in decay.values()) == sum(
        len(leaf.shape) == 1 for leaf in K.flatten(abstract).values()) + 1


def test_swin_l_recipe_and_every_config_validates():
    c = load("simmim_swin_l.py")
    # yaml = configs/swin_large__800ep/simmim_pretrain__swin_large__img192_window12__800ep.yaml
    assert (c.model.embed_dim, tuple(c.model.num_heads)) == (192, (6, 12, 24, 48))
    assert tuple(c.model.window_sizes) == (12,) * 4  # yaml WINDOW_SIZE 12
    b = load("simmim_swin_b.py")
    assert c.optim.to_dict() == b.optim.to_dict() and c.method.to_dict() == b.method.to_dict()
    for name in ("simmim_swin_b.py", "simmim_swin_l.py"):
        for arg in (None, "tiny"):
            config_lib.validate(load(name, arg))


@pytest.mark.parametrize("key,value,match", [
    ("model.shift_windows", False, "model.shift_windows"),
    ("model.ape", "sincos", "model.ape"),
    ("method.mask_patch_size", 6, "method.mask_patch_size"),  # not a multiple of the patch 4
    ("method.mask_patch_size", 40, "method.mask_patch_size"),  # does not tile 192
    ("method.mask_ratio", 1.0, "method.mask_ratio"),
    ("model.in_chans", 4, "model.in_chans"),
])
def test_check_config_names_the_key(key, value, match):
    c = load("simmim_swin_b.py")
    section, leaf = key.split(".")
    c[section][leaf] = value
    with pytest.raises(ConfigError, match=match):
        config_lib.validate(c)


# ---------------------------------------------------------------------------------------------
# (h) The classifier's initialisation.
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_classifier_starts_as_the_official_swin_init_pass():
    """The official SimMIM classifier runs `_init_weights` over every Linear, the head included
    (trunc-normal .02, zero bias), and never re-draws the head; MixMIM's re-draws it at 2e-5 and
    keeps xavier-uniform in the blocks (xavier on qkv (64, 192): std sqrt(2 / 256) = 0.088)."""
    def classifier(name):
        c = tiny_config() if name == "simmim" else load("mixmim_b.py", "tiny")
        if name == "mixmim":
            c.model.update(TINY, ape="sincos")
        method = get_method(c)
        return jax.jit(lambda: init_params(method, jax.random.PRNGKey(0),
                                           lambda rngs: method.build_classifier(1000, rngs)))()

    sim, mix = classifier("simmim"), classifier("mixmim")
    # std of 64,000 / 12,288 draws: relative standard error below 1%
    head, qkv = sim["head"], sim["encoder"]["layers"][2]["blocks"][1]["attn"]["qkv"]
    assert 0.019 < float(jnp.std(head["kernel"])) < 0.021
    assert 0.019 < float(jnp.std(qkv["kernel"])) < 0.021
    assert not np.any(head["bias"]) and not np.any(qkv["bias"])
    assert 1.9e-5 < float(jnp.std(mix["head"]["kernel"])) < 2.1e-5
    assert float(jnp.std(mix["encoder"]["layers"][2]["blocks"][1]["attn"]["qkv"]["kernel"])) > 0.08
