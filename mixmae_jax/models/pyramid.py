"""What UM-MAE's two pyramid encoders (`ummae_swin.py`, `pvt.py`) share: the official init of
their convolutions, and one flat `blocks` list whose first block of stages 2.. holds the stage's
`downsample` (the official key layout), run stage by stage.
"""

from __future__ import annotations

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
    Merges are called `downsample(x, context) -> (x, context)`. A stage's first block holds the
    merge, so it runs on its own and the rest of the stage as a scan where they share one
    structure (`layers.apply_blocks`).
    """
    for idx in encoder.stages:
        first = encoder.blocks[idx.start]
        if hasattr(first, "downsample"):
            x, context = first.downsample(x, context)
        for part in (idx[:1], idx[1:]):
            x = L.apply_blocks([encoder.blocks[i] for i in part], x, context,
                               drop_rates=encoder.drop_rates[part.start:part.stop], rng=rng,
                               first=part.start, remat=encoder.remat, scan=encoder.scan)
    return x
