"""The official state_dicts as the interop derives them (JAX parameter paths + rename tables +
definition order + numpy constants, no torch model) equal the plain torch references' own:
every key, in order, with its shape and dtype, for every method, backbone and format."""

import os

import numpy as np
import pytest
import references
import torch
from recipes import CONFIGS, load

from mixmae_jax.interop import layout_for
from mixmae_jax.interop.keymap import ConversionError

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
    with pytest.raises(ConversionError, match=r"blocks\.0\.attn\.gamma: 'gamma' has no place .*"
                       r"MAELayout\.order"):
        layout.order_key("blocks.0.attn.gamma")
    assert layout.order_key("cls_token") < layout.order_key("patch_embed.proj.weight")
    assert layout.order_key("blocks.2.norm1.weight") < layout.order_key("blocks.10.norm1.weight")
