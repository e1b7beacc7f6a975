"""Building blocks shared by the encoders and decoders.

Constants (sin-cos tables, relative-position indices) are numpy arrays computed at trace time: they
are not parameters and never reach the optimizer or the checkpoint. The converter emits them
because the official PyTorch layout stores them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax import parallel

LN_EPS = 1e-5  # PyTorch nn.LayerNorm default; Flax's default (1e-6) would break parity.

# ---------------------------------------------------------------------------------------------
# Initialisers matching the official PyTorch model (MixMIM `_init_weights` and torch defaults).
# ---------------------------------------------------------------------------------------------

# nn.Linear in MixMIM: xavier-uniform weight (on the fused qkv shape), zero bias.
linear_kernel_init = nnx.initializers.xavier_uniform()


def trunc_normal_init(std: float):
    """timm's trunc_normal_(std=std): a normal cut at the absolute bounds +-2."""
    return nnx.initializers.truncated_normal(stddev=std, lower=-2.0 / std, upper=2.0 / std)


class InitKeys:
    """The keys a model's constructor draws its initial values from: `params()` (or `()`)
    returns fold_in(key, 0), fold_in(key, 1), ..., the very keys of `nnx.Rngs(params=key)`, so
    the weights are the same bit for bit. It keeps its count in Python: nnx's count is a
    Variable whose update under tracing (every abstract build, every jitted init) makes JAX
    format an error message it then drops (a tracer's `.sharding`), at a cost that grows with
    the traced program: 6.6 of the 8.7 s of MixMIM-H's abstract build.

    key: an int seed, a typed key or a raw uint32 key (as jax.random.PRNGKey gives)."""

    def __init__(self, key):
        if isinstance(key, int):
            key = jax.random.key(key)
        elif not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.wrap_key_data(key)
        self._key, self._drawn = key, 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._drawn)
        self._drawn += 1
        return key

    __call__ = params


# relative-position tables and mask token: trunc_normal_(std=.02).
table_init = trunc_normal_init(0.02)
# torch Conv2d default: kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in)) for weight and bias.
conv_kernel_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def conv_bias_init(fan_in: int):
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


@jax.custom_vjp
def _matmul_float32_kernel_grad(x, kernel):
    """x @ kernel with the kernel cast to x's (compute) dtype, as autocast does; the kernel's
    gradient is accumulated and returned in float32, so across devices it is reduced in float32
    as the official code's fp32 .grad is (a bf16 product's gradient would be summed in bf16)."""
    return jnp.matmul(x, kernel.astype(x.dtype))


def _matmul_fwd(x, kernel):
    return _matmul_float32_kernel_grad(x, kernel), (x, kernel)


def _matmul_bwd(res, g):
    x, kernel = res
    dx = jnp.matmul(g, kernel.astype(g.dtype).T)
    dk = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dx, dk.astype(kernel.dtype)


_matmul_float32_kernel_grad.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nnx.Linear):
    """nnx.Linear whose output keeps the batch split over every device (`parallel`): with its
    kernel sharded over "fsdp", the kernel is then gathered where it is used (FSDP), rather than
    the activations moved to where the kernel's shards are. In a lower compute dtype its
    kernel's gradient stays float32 (`_matmul_float32_kernel_grad`)."""

    def __call__(self, x):
        if self.dtype is None or jnp.dtype(self.dtype) == jnp.float32:
            return parallel.batch_sharded(super().__call__(x))
        y = _matmul_float32_kernel_grad(x.astype(self.dtype), self.kernel.value)
        if self.bias is not None:
            y = y + self.bias.value.astype(self.dtype)
        return parallel.batch_sharded(y)


def dense(in_dim: int, out_dim: int, *, rngs: nnx.Rngs, use_bias: bool = True, dtype=None,
          kernel_init=linear_kernel_init) -> nnx.Linear:
    """nn.Linear with the official init; `dtype` is the compute dtype, params stay float32."""
    return Linear(in_dim, out_dim, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
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


def blend(x, y, mask):
    """x where mask is 0, y where it is 1 (mask: x's shape without the channel axis), with the
    official arithmetic `x * (1 - m) + y * m` (a select would not match it bit for bit): MixMIM's
    mixing and decoder input, SimMIM's mask token."""
    m = mask[..., None].astype(x.dtype)
    return x * (1.0 - m) + y * m


# ---------------------------------------------------------------------------------------------
# Blocks. Every block is called `block(x, context, rng, drop_rate)`: context is what the block
# sees beside x (Swin's source ids, UM-MAE's token coordinates, an attention rule; or None),
# rng its stochastic-depth key (None: off). drop_rate is an argument, not an attribute, so the
# blocks of a stage share one structure and run as a scan (`apply_blocks`).
# ---------------------------------------------------------------------------------------------


class Attention(nnx.Module):
    """timm ViT Attention: fused qkv, scale applied to the logits, then proj."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, dtype=None,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = dense(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = dense(dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, x, restrict=None):
        """restrict: None, or a rule on the logits (`attention`); then (out, what it measured)."""
        out = attend(self.qkv(x), self.num_heads, scale_queries=False, restrict=restrict)
        if restrict is None:
            return self.proj(out)
        out, measured = out
        return self.proj(out), measured


class Block(nnx.Module):
    """timm (0.3.2) ViT block, pre-norm: x + attn(norm1(x)), then x + mlp(norm2(x)). The ViT
    encoder's, every decoder's and MixedAE's (with its top-k rule as the context)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, eps: float,
                 qkv_bias: bool = True, dtype=None, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, eps=eps, rngs=rngs)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.norm2 = layer_norm(dim, eps=eps, rngs=rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x, context=None, rng=None, drop_rate=0.0):
        """context: None, or a rule on the attention logits (`attention`'s `restrict`); with a
        rule the result is (x, what the rule measured)."""
        keys = branch_keys(rng)
        y = self.attn(self.norm1(x), context)
        if context is not None:
            y, measured = y
        x = x + drop_path(y.astype(jnp.float32), drop_rate, keys[0])
        x = x + drop_path(self.mlp(self.norm2(x)).astype(jnp.float32), drop_rate, keys[1])
        return x if context is None else (x, measured)


class Encoder(nnx.Module):
    """What every backbone's encoder offers. `embed(images)` and `encode(tokens, ...)` are split
    because the methods act in between (mixing, masking, dropping tokens); `encoder(images, rng)`
    gives the final tokens of the whole image, (B, L, out_dim), patch tokens only."""

    def features(self, images):
        """(B, out_dim): the mean of the final tokens of the whole image (frozen features)."""
        return jnp.mean(self(images), axis=1)


# model.remat: what the backward pass keeps of each encoder block and what it recomputes.
#   "none": keep every intermediate (the most memory);
#   "dots": keep the outputs of the weight matmuls (qkv, proj, fc1, fc2), recompute the rest (the
#           norms, GELU, the attention logits and softmax) from them. Measured on CPU (MixMIM-B,
#           batch 8): 4.9 s per step against 5.7 s for "none"; the windows of 196 tokens make
#           the softmax probabilities the largest residual, and writing and reading them back
#           costs more than recomputing them. Neutral for MAE ViT-B and SimMIM Swin-B;
#   "full": keep only each block's input (the least memory, a second forward pass).
REMAT_MODES = ("none", "dots", "full")


def remat_mode(value) -> str:
    """`model.remat` as one of REMAT_MODES (a bool from older configs: True is "full")."""
    if isinstance(value, bool):
        return "full" if value else "none"
    if value not in REMAT_MODES:
        raise ValueError(f"model.remat: {value!r}: what the backward recomputes, one of "
                         f"{', '.join(REMAT_MODES)}")
    return value


def apply_blocks(blocks, x, context=None, *, drop_rates=None, rng=None, first: int = 0,
                 remat: str = "none", scan: bool = True, with_aux: bool = False):
    """x -> block_j(x, context, key_j, drop_rates[j]) for each block in turn.

    drop_rates: the blocks' stochastic-depth rates (None: none); key_j = `block_keys`' key of
    block first + j, the block's index in its encoder (rng None: no drop path).
    with_aux: the blocks return (x, aux) with aux a scalar (e.g. a per-layer metric); the result
    is (x, aux of every block stacked in block order).

    Blocks that share one structure run as a `lax.scan` over their stacked params: the
    activation and its gradient are materialised between blocks. Unrolled, XLA fuses the
    backward residual-gradient chain into every consumer and recomputes it from all later
    blocks, which is quadratic in depth (measured on CPU: MixMIM-B's backward took ~1.7x as long;
    optimization barriers do not help, XLA:CPU removes them before fusion). It also compiles
    each stage's block once; blocks that alternate between two structures (Swin's unshifted /
    shifted pairs) run as a scan over pairs.
    remat: what the backward pass recomputes (REMAT_MODES). scan=False unrolls
    (XLA's cost analysis counts a scanned body once, so FLOP counting lowers it unrolled).
    """
    if not blocks:
        return (x, jnp.zeros((0,), jnp.float32)) if with_aux else x
    per_block = ()
    if drop_rates is not None:
        per_block = (block_keys(rng, drop_rates, first), jnp.asarray(drop_rates, jnp.float32))
    splits = [nnx.split(b) for b in blocks]
    graphdef = splits[0][0]

    def run(g, state, x, *args):
        # Blocks take and give the batch split over every device (see `Linear`).
        block = nnx.merge(g, state)
        out = block(parallel.batch_sharded(x), context, *args)
        out, aux = out if with_aux else (out, jnp.zeros((), jnp.float32))
        return parallel.batch_sharded(out), aux

    if remat == "full":
        run = jax.checkpoint(run, static_argnums=(0,))
    elif remat == "dots":
        run = jax.checkpoint(run, static_argnums=(0,),
                             policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    def same(part):
        return all(g == part[0][0] for g, _ in part[1:])

    def stack(part):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[st for _, st in part])

    def every(k, start):
        return tuple(None if a is None else a[start::k] for a in per_block)

    def result(x, aux):
        return (x, aux) if with_aux else x

    if scan and len(blocks) >= 2 and same(splits):
        def step(x, inputs):
            state, args = inputs
            return run(graphdef, state, x, *args)

        return result(*jax.lax.scan(step, x, (stack(splits), every(1, 0))))
    # Swin's alternating unshifted / shifted blocks: scan over pairs.
    if scan and len(blocks) >= 4 and len(blocks) % 2 == 0 and same(splits[0::2]) and same(
            splits[1::2]):
        g0, g1 = splits[0][0], splits[1][0]

        def pair(x, inputs):
            (s0, a0), (s1, a1) = inputs
            x, aux0 = run(g0, s0, x, *a0)
            x, aux1 = run(g1, s1, x, *a1)
            return x, jnp.stack([aux0, aux1])

        xs = ((stack(splits[0::2]), every(2, 0)), (stack(splits[1::2]), every(2, 1)))
        x, aux = jax.lax.scan(pair, x, xs)
        return result(x, aux.reshape(-1))
    auxes = []
    for j, (g, state) in enumerate(splits):
        x, aux = run(g, state, x, *[None if a is None else a[j] for a in per_block])
        auxes.append(aux)
    return result(x, jnp.stack(auxes))


def block_keys(rng, drop_rates, first: int = 0):
    """(len(drop_rates), key) stochastic-depth keys, fold_in(rng, first + j): block i of an
    encoder gets the same key however its blocks are grouped into calls. None when rng is None or
    every rate is 0 (no drop path)."""
    if rng is None or not any(drop_rates):
        return None
    index = jnp.arange(first, first + len(drop_rates))
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(index)


def branch_keys(rng):
    """The keys of a block's two residual branches (attention, MLP); (None, None) without."""
    return (None, None) if rng is None else tuple(jax.random.split(rng))


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


def square_side(n: int) -> int | None:
    """The side of an n-token square grid (None: n is not a square)."""
    s = math.isqrt(n)
    return s if s * s == n else None


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of torch's 1-D bicubic resize (`F.interpolate(mode="bicubic",
    align_corners=False)`): source x = (i + 0.5) * n_in / n_out - 0.5, Keys' cubic with
    A = -0.75 on the 4 nearest samples, indices clamped at the border."""
    a = -0.75
    x = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    i0 = np.floor(x)
    t = x - i0
    d = np.stack([t + 1, t, 1 - t, 2 - t], axis=1)  # distances to samples i0-1 .. i0+2
    near = ((a + 2) * d - (a + 3)) * d * d + 1  # |d| <= 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a  # 1 < |d| < 2
    w = np.where(d <= 1, near, far)
    out = np.zeros((n_out, n_in))
    for k in range(4):
        np.add.at(out, (np.arange(n_out), np.clip(i0 + k - 1, 0, n_in - 1).astype(int)), w[:, k])
    return out


@functools.cache
def ape_table(dim: int, grid: int, source_grid: int = 0) -> np.ndarray:
    """The fixed position table added to a (grid x grid) token map, (grid * grid, dim) float32:
    the 2-D sin-cos table of `source_grid` (0: `grid`), bicubic-resized to `grid` as torch does
    when the grids differ -- the table the official MixMIM loader gives a 384 fine-tuning model
    from a 224 checkpoint (`util/pos_embed.py`: resized, not recomputed)."""
    if not source_grid or source_grid == grid:
        return sincos_pos_embed_2d(dim, grid, grid)
    src = sincos_pos_embed_2d(dim, source_grid, source_grid)
    table = resize_bicubic(src.reshape(source_grid, source_grid, dim), grid)
    table = table.reshape(grid * grid, dim)
    table.setflags(write=False)
    return table


def resize_bicubic(values: np.ndarray, size: int) -> np.ndarray:
    """A (side, side, C) map resized to (size, size, C) float32 as torch's 2-D bicubic
    `F.interpolate(align_corners=False)` does, in float64 (torch computes in the input's float32,
    so results agree to float32 rounding): the resize of every official loader (position tables,
    relative-position bias tables)."""
    side = values.shape[0]
    m = _bicubic_matrix(side, size)
    return np.einsum("ir,js,rsd->ijd", m, m, values.astype(np.float64)).astype(np.float32)


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


def pixel_shuffle(x, r: int):
    """torch.nn.PixelShuffle(r) on NHWC: (B, h, w, c*r*r) -> (B, h*r, w*r, c), with output pixel
    (h*r + i, w*r + j) of channel k taken from input channel k*r*r + i*r + j (torch's order)."""
    b, h, w, crr = x.shape
    c = crr // (r * r)
    x = x.reshape(b, h, w, c, r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c)


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


def attend(qkv, num_heads: int, *, scale_queries: bool, bias=None, labels=None, restrict=None):
    """Multi-head attention on a fused qkv projection (N, T, 3*C) laid out [q | k | v] with
    heads contiguous inside each part; see `attention`."""
    n, t, c3 = qkv.shape
    qkv = qkv.reshape(n, t, 3, num_heads, c3 // (3 * num_heads))
    return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], scale_queries=scale_queries,
                     bias=bias, labels=labels, restrict=restrict)


def attention(q, k, v, *, scale_queries: bool, bias=None, labels=None, restrict=None):
    """Multi-head attention: q (N, Tq, heads, d), k and v (N, Tk, heads, d) -> (N, Tq, heads*d).

    scale_queries: MixMIM's window attention scales q before q.k^T; timm's ViT Attention scales
    the logits afterwards. Both are kept so each side reproduces its reference's rounding.
    bias: added to the logits, (heads, Tq, Tk) shared by all N, or (M, heads, Tq, Tk) with N a
    multiple of M: row i of the N gets bias i % M (per window of one image, shared over the
    batch), or its own when M == N (UM-MAE's per-sample bias).
    labels: (N, T) integer ids or None; a query attends only to keys with the same label:
    cross-source pairs get NEG_INF added after the bias, as in the official code (an additive
    mask: XLA:CPU runs a broadcast select several times slower).
    restrict: a rule applied last to the float32 logits (N, heads, Tq, Tk),
    `restrict(logits) -> (logits, measured)` (MixedAE's top-k: keys a query may not see at
    NEG_INF); the result is then (out, measured).
    Logits and softmax in float32 whatever the compute dtype.
    """
    n, _, num_heads, head_dim = q.shape
    scale = head_dim**-0.5
    if scale_queries:
        q = q * jnp.asarray(scale, q.dtype)
    # Heads-major (N, heads, T, d) operands make both products plain batched matmuls: with the
    # einsums on (N, T, heads, d), XLA:CPU laid probs @ v out as v^T p^T and ran it at 3 GFLOP/s
    # in MixMIM-B's stage 0 (770 ms of a 6 s step).
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
    logits = jnp.matmul(q, jnp.swapaxes(k, 2, 3), preferred_element_type=jnp.float32)
    if not scale_queries:
        logits = logits * scale
    if bias is not None:
        bias = bias.astype(jnp.float32)
        if bias.ndim == 3:
            logits = add_shared_bias(logits, bias)
        elif bias.shape[0] == n:
            logits = logits + bias
        else:
            m = bias.shape[0]
            logits = add_shared_bias(logits.reshape(n // m, *bias.shape), bias)
            logits = logits.reshape(n, *bias.shape[1:])
    if labels is not None:
        cross = labels[:, None, :, None] != labels[:, None, None, :]
        logits = logits + cross.astype(jnp.float32) * NEG_INF
    if restrict is not None:
        logits, measured = restrict(logits)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.swapaxes(jnp.matmul(probs, v), 1, 2)  # (N, Tq, heads, d)
    out = out.reshape(n, q.shape[2], num_heads * head_dim)
    return out if restrict is None else (out, measured)
