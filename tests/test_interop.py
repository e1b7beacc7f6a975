"""PyTorch interop (interop/): the official state_dicts as the interop derives them (JAX parameter
paths + rename tables + definition order + numpy constants, no torch model) equal the plain torch
references' own, every key, in order, with its shape and dtype, for every method, backbone and
format; and the converter's own behaviour, on MixMIM's layout: checked sin-cos tables and
--allow-ape-mismatch, --trust-pickle, atomic writes, resized bias tables, another number of
classes, files that are no checkpoint. What every method's layout must do (round trip, strict
export, naming what does not fit) is the contract suite's (test_methods.py)."""

import argparse
import os

import numpy as np
import pytest
import references
import torch
import torch.nn.functional as F
from parity import abstract_model, random_params
from recipes import CONFIGS, load, mixmim_model
from references import mixmim as R

from mixmae_jax.interop import from_torch, layout_for, to_torch
from mixmae_jax.interop import keymap as K
from mixmae_jax.interop.mixmim_layout import MixMIMLayout
from mixmae_jax.methods.mixmim import MixMIMModel
from mixmae_jax.models.classifier import build_classifier
from mixmae_jax.models.layers import InitKeys


def mixmim_2stage(**kw):
    """The conversion's example model: MixMIM at 32 px, 2 stages (8x8 -> 4x4 tokens), windows 4."""
    cfg = mixmim_model("B", 224)
    cfg.update(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
               window_sizes=(4, 4), decoder_dim=32, decoder_depth=2, decoder_num_heads=2)
    cfg.update(kw)
    return cfg


TINY = ["mixmim_b.py", "mae_vit_b.py", "mixedae_vit_b.py", "simmim_swin_b.py", "ummae_swin_t.py",
        "ummae_pvt_s.py", "ummae_vit_b.py", "simmim_ummae_swin_t.py", "simmim_ummae_pvt_s.py"]


def _check_against_the_reference(config, num_classes=10):
    layout = layout_for(config)
    for fmt in ("pretrain", "finetune"):
        derived = layout.reference_layout(fmt, num_classes)
        with torch.device("meta"):
            reference = references.build(layout, fmt, num_classes).state_dict()
        assert list(derived) == list(reference), fmt
        for key, tensor in reference.items():
            shape, dtype = derived[key]
            assert shape == tuple(tensor.shape), (fmt, key)
            assert torch.from_numpy(np.empty(0, dtype)).dtype == tensor.dtype, (fmt, key)


@pytest.mark.parametrize("name", TINY)
def test_derived_layouts_equal_the_references_tiny(name):
    _check_against_the_reference(load(name, "tiny"))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(
    [n for n in os.listdir(CONFIGS) if n.endswith(".py")
     and n not in ("demo.py", "digits.py", "__init__.py", "common.py")]  # common: shared parts
    + ["finetune_mixmim_b.py:res=384", "mixmim_l.py:res=384"]))
def test_derived_layouts_equal_the_references_shipped(name):
    """The shipped recipes at full size (MixMIM-H, ViT-H, SimMIM Swin-B 192/w6 with its clamped
    last-stage window, UM-MAE Swin-L, the 384 fine-tuning with its resized position table)."""
    _check_against_the_reference(load(*name.split(":")), num_classes=1000)


def test_a_name_outside_the_definition_order_is_refused():
    """A parameter the order table does not know cannot be placed in the official order: the
    error names the key and the table instead of exporting keys out of order."""
    layout = layout_for(load("mae_vit_b.py", "tiny"))
    with pytest.raises(K.ConversionError, match=r"blocks\.0\.attn\.gamma: 'gamma' has no place .*"
                       r"MAELayout\.order"):
        layout.order_key("blocks.0.attn.gamma")
    assert layout.order_key("cls_token") < layout.order_key("patch_embed.proj.weight")
    assert layout.order_key("blocks.2.norm1.weight") < layout.order_key("blocks.10.norm1.weight")


@pytest.fixture(scope="module")
def tiny_pretrain_sd():
    cfg = mixmim_2stage()
    torch.manual_seed(0)
    sd = R.MixMIMPretrainTorch.from_model_config(cfg).state_dict()
    _, template = abstract_model(lambda: MixMIMModel(cfg, rngs=InitKeys(0)))
    return cfg, sd, template


def _conversion_error(fn, *args, **kw) -> str:
    with pytest.raises(K.ConversionError) as e:
        fn(*args, **kw)
    return str(e.value)


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


def test_bias_tables_are_resized_like_the_official_loader(tiny_pretrain_sd):
    _, sd, _ = tiny_pretrain_sd  # img 32, windows (4, 4)
    target = mixmim_2stage(img_size=64, window_sizes=(8, 4))  # 16x16 map, window 8
    _, template = abstract_model(lambda: MixMIMModel(target, rngs=InitKeys(0)))
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


def test_finetune_head_with_another_number_of_classes():
    cfg = mixmim_2stage()
    torch.manual_seed(0)
    sd = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=10).state_dict()
    template = random_params(abstract_model(lambda: build_classifier(cfg, 5, rngs=InitKeys(0)))[1],
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
