"""What UM-MAE's two pyramid encoders (`ummae_swin.py`, `pvt.py`) share: the official init of
their convolutions, and one flat `blocks` list whose first block of stages 2.. holds the stage's
`downsample` (the official key layout), run stage by stage.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax.models import layers as L

# Official init (`_init_weights`): Conv2d normal(0, sqrt(2 / fan_out)) with fan_out =
# k*k*out_channels, zero bias; the stem is then re-initialised xavier-uniform as a Linear.
conv_kernel_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
stem_kernel_init = nnx.initializers.xavier_uniform(in_axis=(0, 1, 2))


def conv(in_dim: int, out_dim: int, k: int, *, dtype=None, rngs: nnx.Rngs, kernel_init=None):
    """Conv2d(k, stride k) on NHWC with the official init."""
    return nnx.Conv(in_dim, out_dim, (k, k), strides=k, padding="VALID", dtype=dtype,
                    param_dtype=jnp.float32, kernel_init=kernel_init or conv_kernel_init,
                    bias_init=nnx.initializers.zeros, rngs=rngs)


def stage_blocks(depths) -> list[range]:
    """Indices into the flat block list, per stage."""
    ends = np.cumsum(depths)
    return [range(int(e - d), int(e)) for d, e in zip(depths, ends)]


def run_stages(encoder, x, context, rng=None):
    """x (B, h, w, C) through `encoder.blocks`, stage by stage (`encoder.stages`).

    context rides along: Swin's token coordinates, which a merge subsamples (None for PVT).
    Blocks are called `block(x, context, key, drop_rate)`, merges `downsample(x, context) ->
    (x, context)`. After a stage's first block (which holds the merge), the rest run through
    `layers.apply_blocks`, as a scan where they share one structure.
    """
    rates_all = encoder.drop_rates
    for idx in encoder.stages:
        rates = jnp.asarray(rates_all[idx.start:idx.stop], jnp.float32)
        keys = None
        if rng is not None and any(rates_all[idx.start:idx.stop]):
            keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(idx.start, idx.stop))
        first = encoder.blocks[idx.start]
        if hasattr(first, "downsample"):
            x, context = first.downsample(x, context)
        x = first(x, context, None if keys is None else keys[0], rates[0])
        if len(idx) > 1:
            x = L.apply_blocks([encoder.blocks[i] for i in idx[1:]], x,
                               lambda blk, x, rate, key, c=context: blk(x, c, key, rate),
                               (rates[1:], None if keys is None else keys[1:]),
                               remat=encoder.remat, scan=encoder.scan)
    return x


class PooledClassifier(nnx.Module):
    """The finetuning model of both (`models_swin.Swin`, `models_pvt.PVT`): the encoder on the
    full grid without a final norm, the mean of its final tokens, `fc_norm`, `head`."""

    def __init__(self, encoder, ln_eps: float, num_classes: int, *, dtype=None,
                 rngs: nnx.Rngs):
        from mixmae_jax.models.classifier import head_init

        self.encoder = encoder
        self.fc_norm = L.layer_norm(encoder.out_dim, eps=ln_eps, rngs=rngs)
        self.head = L.dense(encoder.out_dim, num_classes, dtype=dtype, kernel_init=head_init,
                            rngs=rngs)

    def forward_features(self, images, rng=None):
        return self.fc_norm(jnp.mean(self.encoder(images, rng), axis=1))

    def __call__(self, images, rng=None):
        return self.head(self.forward_features(images, rng)).astype(jnp.float32)
