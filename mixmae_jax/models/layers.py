"""Building blocks shared by the encoders and decoders.

Constants (sin-cos tables, relative-position indices) are numpy arrays computed at trace time: they
are not parameters and never reach the optimizer or the checkpoint. The converter emits them
because the official PyTorch layout stores them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LN_EPS = 1e-5  # PyTorch nn.LayerNorm default; Flax's default (1e-6) would break parity.

# ---------------------------------------------------------------------------------------------
# Initialisers matching the official PyTorch model (MixMIM `_init_weights` and torch defaults).
# ---------------------------------------------------------------------------------------------

# nn.Linear in MixMIM: xavier-uniform weight (on the fused qkv shape), zero bias.
linear_kernel_init = nnx.initializers.xavier_uniform()
# relative-position tables and mask token: trunc_normal_(std=.02) with bounds +-2 (absolute).
table_init = nnx.initializers.truncated_normal(stddev=0.02, lower=-2.0 / 0.02, upper=2.0 / 0.02)
# torch Conv2d default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weight and bias.
conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def dense(in_dim: int, out_dim: int, *, rngs: nnx.Rngs, use_bias: bool = True, dtype=None,
          kernel_init=linear_kernel_init) -> nnx.Linear:
    """nn.Linear with the official init; `dtype` is the compute dtype, params stay float32."""
    return nnx.Linear(in_dim, out_dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=kernel_init, bias_init=nnx.initializers.zeros, rngs=rngs)


def layer_norm(dim: int, *, eps: float = LN_EPS, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Always float32: LayerNorm statistics in bf16 lose too much precision.
    # Two-pass variance as in PyTorch: the fast E[x^2] - E[x]^2 form costs parity digits.
    return nnx.LayerNorm(dim, epsilon=eps, dtype=jnp.float32, param_dtype=jnp.float32,
                         use_fast_variance=False, rngs=rngs)


class Mlp(nnx.Module):
    """timm Mlp: fc1 -> exact (erf) GELU -> fc2."""

    def __init__(self, dim: int, hidden: int, *, dtype=None, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, dtype=dtype, rngs=rngs)
        self.fc2 = dense(hidden, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


def apply_blocks(blocks, x, call, per_block=(), *, remat: bool = False, scan: bool = True):
    """x -> call(block_j, x, *per_block[j]) for each block in turn.

    Blocks that share one structure run as a `lax.scan` over their stacked params: the
    activation and its gradient are materialised between blocks. Unrolled, XLA fuses the
    backward residual-gradient chain into every consumer and recomputes it from all later
    blocks, which is quadratic in depth (measured on CPU: MixMIM-B's backward took ~1.7x as long;
    optimization barriers do not help, XLA:CPU removes them before fusion). It also compiles
    each stage's block once; blocks that alternate between two structures (Swin's unshifted /
    shifted pairs) run as a scan over pairs. per_block: arrays with a leading axis of
    len(blocks), or None.
    remat: recompute each block in the backward pass (memory for compute). scan=False unrolls
    (XLA's cost analysis counts a scanned body once, so FLOP counting lowers it unrolled).
    """
    splits = [nnx.split(b) for b in blocks]
    graphdef = splits[0][0]

    def run(g, state, x, *args):
        return call(nnx.merge(g, state), x, *args)

    if remat:
        run = jax.checkpoint(run, static_argnums=(0,))

    def same(part):
        return all(g == part[0][0] for g, _ in part[1:])

    def stack(part):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[st for _, st in part])

    def every(k, start):
        return tuple(None if a is None else a[start::k] for a in per_block)

    if scan and len(blocks) >= 2 and same(splits):
        def step(x, inputs):
            state, args = inputs
            return run(graphdef, state, x, *args), None

        return jax.lax.scan(step, x, (stack(splits), every(1, 0)))[0]
    # Swin's alternating unshifted / shifted blocks: scan over pairs.
    if scan and len(blocks) >= 4 and len(blocks) % 2 == 0 and same(splits[0::2]) and same(
            splits[1::2]):
        g0, g1 = splits[0][0], splits[1][0]

        def pair(x, inputs):
            (s0, a0), (s1, a1) = inputs
            return run(g1, s1, run(g0, s0, x, *a0), *a1), None

        xs = ((stack(splits[0::2]), every(2, 0)), (stack(splits[1::2]), every(2, 1)))
        return jax.lax.scan(pair, x, xs)[0]
    for j, (g, state) in enumerate(splits):
        x = run(g, state, x, *[None if a is None else a[j] for a in per_block])
    return x


def drop_path(x, rate, rng):
    """Stochastic depth per sample; identity when rng is None (evaluation) or rate is 0."""
    if rng is None or (isinstance(rate, float) and rate == 0.0):
        return x
    keep = 1.0 - rate
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(rng, keep, shape)
    return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Constant tables.
# ---------------------------------------------------------------------------------------------


@functools.cache
def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """MAE 2-D sin-cos table, (grid_h * grid_w, dim) float32, row-major tokens.

    For the token at row r, column c: [sin(c w), cos(c w), sin(r w), cos(r w)] with
    w_k = 10000^(-k / (dim / 4)): the column (x) fills the first half, as in the official code.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                             np.arange(grid_w, dtype=np.float64), indexing="ij")
    parts = []
    for coord in (cols.reshape(-1), rows.reshape(-1)):
        out = np.einsum("m,d->md", coord, omega)
        parts += [np.sin(out), np.cos(out)]
    table = np.concatenate(parts, axis=1).astype(np.float32)
    table.setflags(write=False)
    return table


@functools.cache
def relative_position_index(window: int) -> np.ndarray:
    """(w*w, w*w) int64 index into the [(2w-1)^2, heads] bias table (Swin formula)."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"))
    coords = coords.reshape(2, -1)  # (2, N): row, column of each token in the window
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    index = (rel[0] * (2 * window - 1) + rel[1]).astype(np.int64)
    index.setflags(write=False)
    return index


# ---------------------------------------------------------------------------------------------
# Reshapes.
# ---------------------------------------------------------------------------------------------


def window_partition(x, window: int):
    """(B, H, W, ...) -> (B * nH * nW, window*window, ...): batch, window row, window column."""
    b, h, w = x.shape[:3]
    rest = x.shape[3:]
    x = x.reshape(b, h // window, window, w // window, window, *rest)
    x = jnp.moveaxis(x, 3, 2)  # (B, nH, nW, wh, ww, ...)
    return x.reshape(b * (h // window) * (w // window), window * window, *rest)


def window_reverse(windows, window: int, h: int, w: int):
    """Inverse of `window_partition`."""
    rest = windows.shape[2:]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.reshape(b, h // window, w // window, window, window, *rest)
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape(b, h, w, *rest)


def patchify(images, patch: int):
    """(B, H, W, C) -> (B, L, patch*patch*C), patches row-major, (row, col, channel) inside."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c)
    x = jnp.moveaxis(x, 3, 2)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches, patch: int, h: int, w: int, channels: int = 3):
    """Inverse of `patchify` for an (h, w) image."""
    b = patches.shape[0]
    x = patches.reshape(b, h // patch, w // patch, patch, patch, channels)
    x = jnp.moveaxis(x, 2, 3)
    return x.reshape(b, h, w, channels)


def upsample_grid(ids, factor: int):
    """Nearest-neighbour upsampling of a (B, h, w) map by an integer factor."""
    return jnp.repeat(jnp.repeat(ids, factor, axis=1), factor, axis=2)


# ---------------------------------------------------------------------------------------------
# Attention core shared by window attention (encoder) and global attention (decoder).
# ---------------------------------------------------------------------------------------------

NEG_INF = -1e30  # what the official code adds to cross-source logits; exp() of it is exactly 0


@jax.custom_vjp
def add_shared_bias(logits, bias):
    """logits (N, ...) + bias (...) broadcast over N.

    Same forward as `logits + bias[None]`; the backward sums the N gradients with a dot against
    ones, because XLA:CPU's reduction over a leading axis is ~40x slower (measured: 125 ms vs 3 ms
    for the stage-1 window attention of MixMIM-B at batch 8).
    """
    return logits + bias[None]


def _add_shared_bias_fwd(logits, bias):
    return logits + bias[None], None


def _add_shared_bias_bwd(_, g):
    n = g.shape[0]
    dbias = jnp.dot(jnp.ones((n,), g.dtype), g.reshape(n, -1)).reshape(g.shape[1:])
    return g, dbias


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def attend(qkv, num_heads: int, *, scale_queries: bool, bias=None, labels=None):
    """Multi-head attention on a fused qkv projection.

    qkv: (N, T, 3*C) laid out [q | k | v] with heads contiguous inside each part.
    scale_queries: MixMIM's window attention scales q before q.k^T; timm's ViT Attention scales
    the logits afterwards. Both are kept so each side reproduces its reference's rounding.
    bias: (heads, T, T) added to the logits. labels: (N, T) integer ids or None; a query attends
    only to keys with the same label: cross-source pairs get NEG_INF added after the bias, as in
    the official code (an additive mask: XLA:CPU runs a broadcast select several times slower).
    Logits and softmax in float32 whatever the compute dtype.
    """
    n, t, c3 = qkv.shape
    head_dim = c3 // (3 * num_heads)
    qkv = qkv.reshape(n, t, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scale = head_dim**-0.5
    if scale_queries:
        q = q * jnp.asarray(scale, q.dtype)
    logits = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32)
    if not scale_queries:
        logits = logits * scale
    if bias is not None:
        logits = add_shared_bias(logits, bias.astype(jnp.float32))
    if labels is not None:
        cross = labels[:, None, :, None] != labels[:, None, None, :]
        logits = logits + cross.astype(jnp.float32) * NEG_INF
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("nhqk,nkhd->nqhd", probs, v)
    return out.reshape(n, t, num_heads * head_dim)
