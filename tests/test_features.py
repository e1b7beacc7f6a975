"""Frozen features of every method's pretraining model (`Method.features`, for k-NN and linear
probing): whole unmasked images, one vector per image, what the encoder computes on them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from parity import FAST_COMPILE
from recipes import load

from mixmae_jax.methods import get_method
from mixmae_jax.models import pvt, ummae_swin

CONFIGS = ["mixmim_b.py", "mae_vit_b.py", "simmim_swin_b.py", "ummae_swin_t.py",
           "ummae_pvt_s.py", "ummae_vit_b.py", "simmim_ummae_pvt_s.py", "mixedae_vit_b.py"]


@pytest.mark.parametrize("name", CONFIGS)
def test_features_are_one_finite_vector_per_image_that_depends_on_it(name):
    config = load(name, "tiny")
    method = get_method(config)
    model = method.build_model(nnx.Rngs(0))
    size = config.model.img_size
    images = jax.random.normal(jax.random.key(1), (4, size, size, 3))
    fn = jax.jit(lambda x: method.features(model, x), compiler_options=FAST_COMPILE)
    f = np.asarray(fn(images))
    assert f.ndim == 2 and f.shape[0] == 4 and np.isfinite(f).all()
    assert np.abs(f[0] - f[1]).max() > 1e-4  # different images, different features


@pytest.mark.parametrize("name, kind", [("ummae_swin_t.py", "swin"), ("ummae_pvt_s.py", "pvt")])
def test_ummae_features_use_the_full_grid_finetuning_geometry(name, kind):
    """The pretraining encoder's weights in an encoder built for the full grid (Swin window x2,
    PVT's full-grid sr ratios): the features equal that encoder's, computed independently."""
    config = load(name, "tiny")
    method = get_method(config)
    model = method.build_model(nnx.Rngs(0))
    m = config.model.copy_and_resolve_references()
    if kind == "swin":
        m.window_size *= 2
        full = ummae_swin.encoder(m, vis_mask_token=True, rngs=nnx.Rngs(5))
    else:
        m.sr_ratios = m.full_sr_ratios
        full = pvt.encoder(m, vis_mask_token=True, rngs=nnx.Rngs(5))
    nnx.update(full, nnx.state(model.encoder))
    images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    want = jnp.mean(full(images), axis=1)
    np.testing.assert_allclose(method.features(model, images), want, rtol=1e-6, atol=1e-6)
    if kind == "swin":
        assert [b.window for b in full.blocks][:2] == [8, 8] and full.blocks[1].shift == 4
