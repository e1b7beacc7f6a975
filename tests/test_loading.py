"""The native loader (`models/loading.py` and each model's `load`): a pretraining run's encoder
into a fine-tuning classifier without torch, tensor for tensor what the JAX -> PyTorch -> JAX
round trip through the official layouts gives (which `mixmae-finetune --init WORKDIR` did before),
and position tables resized as the official `interpolate_pos_embed` does."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from parity import abstract_model, random_params
from recipes import load

from mixmae_jax.interop import from_torch, layout_for, to_torch
from mixmae_jax.interop.keymap import ConversionError
from mixmae_jax.methods import get_method
from mixmae_jax.models import get_model_module
from mixmae_jax.models import layers as L
from mixmae_jax.models.loading import LoadError
from mixmae_jax.models.paths import flatten

NUM_CLASSES = 10
# A resized table: ours in float64 rounded once, torch's bicubic in float32 (weights and two
# separable passes of 4 products each rounded), so they differ by float32 rounding, a few ulp of
# the table's largest value: measured at most 1.2e-6 of it (MixMIM, 8 -> 12). 32 ulp bound it;
# align_corners=True or bilinear instead moves values by 0.2 of it.
RESIZE_RTOL = 32 * np.finfo(np.float32).eps

# (pretraining config, method overrides, the classifier's model overrides): every method and
# backbone; the Swin cases fine-tune at another resolution and window (every bias table resized,
# MixMIM with the 384 recipe's resized position table), UM-MAE's Swin on the full grid at twice
# the window, its PVT with the full grid's sr ratios.
CASES = {
    "mixmim": ("mixmim_b.py", {}, dict(img_size=96, window_sizes=(12, 6, 6, 3), ape_grid=16)),
    "simmim": ("simmim_swin_b.py", {}, dict(img_size=96, window_sizes=(6, 6, 3))),
    "mae": ("mae_vit_b.py", {}, {}),
    "mixedae": ("mixedae_vit_b.py", dict(segment_embedding="encoder", contrast_projector=16), {}),
    "ummae_swin": ("ummae_swin_t.py", {}, dict(img_size=128, window_size=8)),
    "ummae_pvt": ("ummae_pvt_s.py", {}, dict(sr_ratios=(4, 2, 1))),
    "ummae_vit": ("ummae_vit_b.py", {}, {}),
    "simmim_ummae_swin": ("simmim_ummae_swin_t.py", {}, dict(img_size=128, window_size=16)),
    "simmim_ummae_pvt": ("simmim_ummae_pvt_s.py", {}, {}),
}


def _configs(name, method_overrides, model_overrides):
    source = load(name, "tiny")
    source.method.update(method_overrides)
    target = copy.deepcopy(source)
    target.model.update(model_overrides)
    return source, target


def _classifier_template(config, seed):
    """Stand-in for the classifier's fresh params (jitting the real init costs ~10 s a model):
    random, except `fc_norm` at nnx.LayerNorm's initial (1, 0). The old path took fc_norm from
    its export, (1, 0) too; the native path keeps the template's
    (test_finetune.py::test_init_from_a_workdir_with_fc_norm_loads_the_encoder runs the real
    init)."""
    method = get_method(config)
    abstract = abstract_model(lambda: method.build_classifier(NUM_CLASSES, L.InitKeys(0)))[1]
    template = random_params(abstract, seed)
    if "fc_norm" in template:
        template["fc_norm"] = {"scale": np.ones_like(template["fc_norm"]["scale"]),
                               "bias": np.zeros_like(template["fc_norm"]["bias"])}
    return template


def _source_params(config, seed):
    method = get_method(config)
    return random_params(abstract_model(lambda: method.build_model(L.InitKeys(0)))[1], seed)


def _torch_round_trip(source_params, source, target, template):
    """The old `--init WORKDIR`: export to the official fine-tuning layout (decoder and mask tokens
    dropped), drop the export's fresh head, import into the classifier by the official rules."""
    sd = to_torch.params_to_state_dict(source_params, layout_for(source),
                                       format="finetune", num_classes=NUM_CLASSES)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    params, _ = from_torch.classifier_params(sd, layout_for(target), template,
                                             NUM_CLASSES)
    return params


@pytest.mark.parametrize("case", list(CASES))
def test_native_load_equals_the_torch_round_trip(case):
    """Every leaf bit for bit (loaded, fresh and dropped alike), except the resized bias tables,
    which agree to float32 rounding; the report names what was resized, kept fresh and dropped."""
    source, target = _configs(*CASES[case])
    source_params = _source_params(source, seed=1)
    template = _classifier_template(target, seed=11)
    want = _torch_round_trip(source_params, source, target, template)
    got, report = get_model_module(target.model.name).load(source_params, source.model,
                                                           template, target.model)
    print(f"\n[{case}] {report}")
    flat_got, flat_want = flatten(got), flatten(want)
    assert list(flat_got) == list(flat_want)
    resized = {line.split(":")[0] for line in report.resized}
    worst = 0.0
    for path, value in flat_got.items():
        assert value.dtype == flat_want[path].dtype and value.shape == flat_want[path].shape
        if path in resized:
            scale = float(np.max(np.abs(flat_want[path])))
            diff = float(np.max(np.abs(value - flat_want[path])))
            worst = max(worst, diff / scale)
            assert diff <= RESIZE_RTOL * scale, (path, diff, scale)
        else:
            np.testing.assert_array_equal(value, flat_want[path], err_msg=path)
    if resized:
        print(f"[{case}] {len(resized)} resized tables: max |native - torch| / max |table| = "
              f"{worst:.2g}")
    if case in ("mixmim", "simmim"):  # another window in every stage: every table resized
        assert len(resized) == sum(target.model.depths) and worst > 0
    else:
        assert not resized
    fresh = {p for p in flat_got if not p.startswith("encoder.")}
    assert set(report.fresh) == fresh and {"head.kernel", "head.bias"} <= fresh
    dropped = {p.split(".")[0] if not p.startswith("encoder.") else p for p in report.dropped}
    assert "decoder" in dropped or "decoder_pred" in dropped


@pytest.mark.parametrize("case, new_size", [("mae", 48), ("ummae_pvt", 96)])
def test_position_tables_are_resized_like_interpolate_pos_embed(case, new_size):
    """At another grid a learned `pos_embed` starts from the pretraining's sin-cos table resized
    as MAE's (and UM-MAE's) `interpolate_pos_embed` does: the cls row kept, the grid part through
    torch's bicubic `F.interpolate(align_corners=False)`. The torch round trip refused this
    (another shape); every other encoder tensor loads as it is."""
    name, method_overrides, model_overrides = CASES[case]
    source, target = _configs(name, method_overrides, dict(model_overrides, img_size=new_size))
    source_params = _source_params(source, seed=2)
    template = _classifier_template(target, seed=12)
    with pytest.raises(ConversionError, match="pos_embed: shape"):
        _torch_round_trip(source_params, source, target, template)
    got, report = get_model_module(target.model.name).load(source_params, source.model,
                                                           template, target.model)
    assert [line.split(":")[0] for line in report.resized] == ["encoder.pos_embed"]
    m = source.model
    cls = int(case == "mae")
    dim = m.embed_dim if cls else m.embed_dims[0]
    old, new = m.img_size // m.patch_size, new_size // m.patch_size
    table = torch.from_numpy(np.asarray(L.sincos_pos_embed_2d(dim, old, old)))
    grid = F.interpolate(table.reshape(1, old, old, dim).permute(0, 3, 1, 2), size=(new, new),
                         mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, dim).numpy()
    pos = got["encoder"]["pos_embed"][0]
    assert pos.shape == (cls + new * new, dim)
    if cls:
        np.testing.assert_array_equal(pos[0], 0.0)  # the zero cls row, kept
    np.testing.assert_allclose(pos[cls:], grid, rtol=0, atol=RESIZE_RTOL)  # |values| <= 1
    assert np.max(np.abs(pos[cls:] - L.sincos_pos_embed_2d(dim, new, new))) > 0.05  # resized
    flat_src = flatten(source_params)
    for path, value in flatten(got).items():
        if path.startswith("encoder.") and path != "encoder.pos_embed":
            np.testing.assert_array_equal(value, flat_src[path], err_msg=path)


def test_another_depth_or_width_is_refused_naming_the_tensors():
    """A source of another model (one stage deeper, another width) cannot load: every tensor that
    is missing, extra or of another shape is named; nothing is silently dropped or kept fresh."""
    source, target = _configs("mixmim_b.py", {}, dict(depths=(1, 1, 1, 1)))
    source_params = _source_params(source, seed=3)
    template = _classifier_template(target, seed=13)
    load_fn = get_model_module("swin").load
    with pytest.raises(LoadError) as e:
        load_fn(source_params, source.model, template, target.model)
    assert "encoder.layers.2.blocks.1.attn.qkv.kernel: the target has no place for it" in str(
        e.value)
    wider = copy.deepcopy(source)
    wider.model.embed_dim = 48
    template = _classifier_template(wider, seed=14)
    with pytest.raises(LoadError, match=r"encoder.patch_embed.proj.bias: shape \(32,\) in the "
                       r"source, \(48,\) here"):
        load_fn(source_params, source.model, template, wider.model)
