"""Swin-style hierarchical encoder: MixMIM's (large windows, no shift, sin-cos APE) and the
official Swin that SimMIM pretrains (shifted windows, no APE, a mask token at the input).

Parameter paths mirror the official PyTorch keys (`patch_embed.proj`,
`layers.{s}.blocks.{j}.attn.qkv`, `layers.{s}.downsample.reduction`, `norm`), so conversion is a
rename plus transposes.

Attention can be restricted by per-token integer source ids: a token attends only to tokens with
the same id inside its window. MixMIM uses ids {0, 1} (own image / partner image); the mechanism
is general over k sources.

The model config (`config.model`, name "swin"): img_size, patch_size, in_chans, embed_dim, depths,
num_heads, window_sizes (one per stage), mlp_ratio, qkv_bias, drop_path_rate, ape ("sincos": the
fixed 2-D table MixMIM adds; "none": official Swin's default), ape_grid (0, or the grid whose
sin-cos table is bicubic-resized to this one), shift_windows (odd blocks shift by half a window),
remat, scan_blocks, and the decoder of the method (decoder_*).
"""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models import loading
from mixmae_jax.models.classifier import PooledClassifier

# ---------------------------------------------------------------------------------------------
# Variants.
# ---------------------------------------------------------------------------------------------

# Swin-B/L widths, depths and heads (MixMIM's models_mixmim.py B and L, official Swin B and L);
# MixMIM-H (models_mixmim.py) widens to 352.
VARIANTS = {
    "B": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48)),
    "H": dict(embed_dim=352, depths=(2, 2, 18, 2), num_heads=(11, 22, 44, 88)),
}


def model_config(variant: str = "B", img_size: int = 224, *, window_sizes=(14, 14, 14, 7),
                 ape: str = "sincos", shift_windows: bool = False,
                 decoder: tuple[int, int, int] = (512, 8, 16)) -> ml_collections.ConfigDict:
    """`config.model` of a Swin variant; the defaults are MixMIM's geometry at 224.

    decoder: (width, depth, heads) of a Transformer decoder (MixMIM's: 512, 8, 16); unused by
    SimMIM, whose decoder is one 1x1 convolution.
    """
    if variant not in VARIANTS:
        raise ValueError(f"model.variant: unknown Swin variant {variant!r} ({sorted(VARIANTS)})")
    return ml_collections.ConfigDict(dict(
        name="swin",
        variant=variant,
        img_size=img_size,
        patch_size=4,
        in_chans=3,
        **VARIANTS[variant],
        window_sizes=tuple(window_sizes),
        mlp_ratio=4.0,
        qkv_bias=True,
        drop_path_rate=0.0,
        ape=ape,
        # "sincos" computed on this grid, then bicubic-resized to the token grid (0: the token
        # grid itself): the official 384 fine-tuning's table, 56 from its 224 checkpoint.
        ape_grid=0,
        shift_windows=shift_windows,
        decoder_dim=decoder[0],
        decoder_depth=decoder[1],
        decoder_num_heads=decoder[2],
        remat="none",  # what the backward recomputes: "none", "dots", "full" (layers.py)
        scan_blocks=True,  # run each stage's identical blocks as a lax.scan (see layers.py)
    ))


def stage_resolutions(cfg) -> list[int]:
    grid = cfg.img_size // cfg.patch_size
    return [grid // 2**s for s in range(len(cfg.depths))]


def check_config(cfg, check) -> None:
    """Geometry checks of `config.model`; `check(ok, key, message)` raises naming the key."""
    n = len(cfg.depths)
    check(n >= 1 and len(cfg.num_heads) == n and len(cfg.window_sizes) == n, "model.depths",
          f"depths {tuple(cfg.depths)}, num_heads {tuple(cfg.num_heads)} and window_sizes "
          f"{tuple(cfg.window_sizes)} must have one entry per stage")
    check(cfg.img_size % cfg.patch_size == 0, "model.img_size",
          f"{cfg.img_size} is not a multiple of model.patch_size={cfg.patch_size}")
    grid = cfg.img_size // cfg.patch_size
    check(grid % 2 ** (n - 1) == 0, "model.img_size",
          f"the {grid}x{grid} token grid cannot be halved {n - 1} times by patch merging")
    check(cfg.ape in ("sincos", "none"), "model.ape", f"{cfg.ape!r} (sincos or none)")
    if cfg.ape == "sincos":
        check(cfg.embed_dim % 4 == 0, "model.embed_dim", f"{cfg.embed_dim} must be divisible "
              "by 4 (2-D sin-cos position embedding)")
    ape_grid = cfg.ape_grid
    check(ape_grid >= 0 and (ape_grid == 0 or cfg.ape == "sincos"), "model.ape_grid",
          f"{ape_grid}: the grid of a resized sin-cos table (0: none), needs model.ape='sincos'")
    for s, res in enumerate(stage_resolutions(cfg)):
        dim, heads, window = cfg.embed_dim * 2**s, cfg.num_heads[s], cfg.window_sizes[s]
        check(dim % heads == 0, "model.num_heads",
              f"stage {s} width {dim} is not divisible by {heads} heads")
        win = min(window, res)
        check(window > 0 and res % win == 0, "model.window_sizes",
              f"stage {s}: window {window} does not tile the {res}x{res} token map")


class WindowAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, window: int, *, qkv_bias: bool, dtype=None,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.window = window
        self.qkv = L.dense(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = L.dense(dim, dim, dtype=dtype, rngs=rngs)
        self.relative_position_bias_table = nnx.Param(
            L.table_init(rngs.params(), ((2 * window - 1) ** 2, num_heads), jnp.float32))

    def __call__(self, x, labels=None):
        """x: (windows, w*w, C); labels: (windows, w*w) ints or None."""
        n = self.window * self.window
        index = L.relative_position_index(self.window).reshape(-1)
        bias = jnp.take(self.relative_position_bias_table[...], index, axis=0)
        bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)
        out = L.attend(self.qkv(x), self.num_heads, scale_queries=True, bias=bias, labels=labels)
        return self.proj(out)


def shift_regions(h: int, w: int, window: int, shift: int) -> np.ndarray:
    """Swin's region ids for a cyclically shifted map: tokens attend within their region."""
    regions = np.zeros((h, w), np.int32)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in cuts:
        for ws in cuts:
            regions[hs, ws] = label
            label += 1
    return regions


class SwinBlock(nnx.Module):
    """Pre-norm block: x + attn(norm1(x)), then x + mlp(norm2(x)); no layer scale."""

    def __init__(self, dim: int, num_heads: int, window: int, resolution: tuple[int, int], *,
                 shift: int, mlp_ratio: float, qkv_bias: bool, dtype=None, rngs: nnx.Rngs):
        if min(resolution) <= window:  # official: the window shrinks to a small feature map
            window, shift = min(resolution), 0
        self.window, self.shift = window, shift
        self.norm1 = L.layer_norm(dim, rngs=rngs)
        self.attn = WindowAttention(dim, num_heads, window, qkv_bias=qkv_bias, dtype=dtype,
                                    rngs=rngs)
        self.norm2 = L.layer_norm(dim, rngs=rngs)
        self.mlp = L.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x, source_ids=None, rng=None, drop_rate=0.0):
        """x: (B, H, W, C) float32; source_ids (the context): (B, H, W) ints or None."""
        b, h, w, c = x.shape
        keys = L.branch_keys(rng)
        y = self.norm1(x)
        labels = source_ids
        if self.shift:
            y = jnp.roll(y, (-self.shift, -self.shift), axis=(1, 2))
            regions = jnp.asarray(shift_regions(h, w, self.window, self.shift))
            if labels is None:
                labels = jnp.broadcast_to(regions, (b, h, w))
            else:  # same source AND same shifted region
                labels = jnp.roll(labels, (-self.shift, -self.shift), axis=(1, 2)) * 9 + regions
        windows = L.window_partition(y, self.window)
        win_labels = None if labels is None else L.window_partition(labels, self.window)
        y = L.window_reverse(self.attn(windows, win_labels), self.window, h, w)
        if self.shift:
            y = jnp.roll(y, (self.shift, self.shift), axis=(1, 2))
        x = x + L.drop_path(y.astype(jnp.float32), drop_rate, keys[0])
        y = self.mlp(self.norm2(x))
        return x + L.drop_path(y.astype(jnp.float32), drop_rate, keys[1])


class PatchMerging(nnx.Module):
    """2x2 merge in timm's channel order, LayerNorm(4C), bias-free Linear(4C -> 2C)."""

    def __init__(self, dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.norm = L.layer_norm(4 * dim, rngs=rngs)
        self.reduction = L.dense(4 * dim, 2 * dim, use_bias=False, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        x = jnp.concatenate(
            [x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
        return self.reduction(self.norm(x)).astype(jnp.float32)


class PatchEmbed(nnx.Module):
    """Conv(k=s=patch) stem followed by LayerNorm, on NHWC images."""

    def __init__(self, patch: int, in_chans: int, dim: int, *, dtype=None, rngs: nnx.Rngs):
        fan_in = in_chans * patch * patch
        self.proj = nnx.Conv(in_chans, dim, (patch, patch), strides=patch, padding="VALID",
                             dtype=dtype, param_dtype=jnp.float32, kernel_init=L.conv_kernel_init,
                             bias_init=L.conv_bias_init(fan_in), rngs=rngs)
        self.norm = L.layer_norm(dim, rngs=rngs)

    def __call__(self, images):
        return self.norm(self.proj(images))


class SwinStage(nnx.Module):
    def __init__(self, blocks: list[SwinBlock], downsample: PatchMerging | None):
        self.blocks = nnx.List(blocks)
        self.downsample = downsample


class SwinEncoder(L.Encoder):
    """Arguments as `config.model`'s keys (`encoder` reads them); mask_token: SimMIM's, which
    replaces masked patch embeddings (official trunc_normal .02)."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 depths, num_heads, window_sizes, mlp_ratio: float, qkv_bias: bool,
                 drop_path_rate: float, ape: str, ape_grid: int, shift_windows: bool, remat,
                 scan_blocks: bool, mask_token: bool = False, dtype=None, rngs: nnx.Rngs):
        depths = tuple(depths)
        self.patch_size = patch_size
        self.grid = img_size // patch_size
        self.embed_dim = embed_dim
        self.ape, self.ape_grid = ape, int(ape_grid)
        if mask_token:
            self.mask_token = nnx.Param(L.table_init(rngs.params(), (1, 1, embed_dim),
                                                     jnp.float32))
        self.num_stages = len(depths)
        self.remat = L.remat_mode(remat)
        self.scan = bool(scan_blocks)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, dtype=dtype, rngs=rngs)
        # Per-block stochastic depth, linear over all blocks (official schedule).
        self.drop_rates = tuple(np.linspace(0.0, drop_path_rate, sum(depths)).tolist())
        stages, dim, res = [], embed_dim, self.grid
        for s, (depth, nh, win) in enumerate(zip(depths, num_heads, window_sizes)):
            blocks = [SwinBlock(dim, nh, win, (res, res),
                                shift=win // 2 if (shift_windows and j % 2 == 1) else 0,
                                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, dtype=dtype, rngs=rngs)
                      for j in range(depth)]
            last = s == self.num_stages - 1
            stages.append(SwinStage(blocks, None if last else PatchMerging(dim, dtype=dtype,
                                                                           rngs=rngs)))
            if not last:
                dim, res = dim * 2, res // 2
        self.layers = nnx.List(stages)
        self.norm = L.layer_norm(dim, rngs=rngs)
        self.out_dim, self.final_grid = dim, res

    @property
    def stride(self) -> int:
        """Pixels per final-stage token (32 for the official 4-stage, patch-4 models)."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    def embed(self, images):
        """(B, H, W, 3) normalised images -> (B, H/p, W/p, C) tokens after the stem's LayerNorm."""
        return self.patch_embed(images)

    def stage_outputs(self, tokens, source_ids=None, rng=None) -> list:
        """[the input (+ APE), the output of each stage]: (B, h, w, C) maps, before the final
        norm (`encode` normalises the last; the parity tests compare them all).

        source_ids: (B, G, G) ints on the stage-1 grid or None (unrestricted attention). Each
        2x2 merge group lies inside one source region, so later stages take every second id.
        """
        x = tokens.astype(jnp.float32)
        if self.ape == "sincos":
            ape = L.ape_table(self.embed_dim, self.grid, self.ape_grid)
            x = x + ape.reshape(self.grid, self.grid, self.embed_dim)
        outputs, first = [x], 0
        for stage in self.layers:
            n = len(stage.blocks)
            x = L.apply_blocks(stage.blocks, x, source_ids,
                               drop_rates=self.drop_rates[first:first + n], rng=rng, first=first,
                               remat=self.remat, scan=self.scan)
            first += n
            if stage.downsample is not None:
                x = stage.downsample(x)
                if source_ids is not None:
                    source_ids = source_ids[:, ::2, ::2]
            outputs.append(x)
        return outputs

    def encode(self, tokens, source_ids=None, rng=None):
        """Tokens (B, G, G, C) -> final normalised tokens (B, L, C_last); see `stage_outputs`."""
        x = self.stage_outputs(tokens, source_ids, rng)[-1]
        b, h, w, c = x.shape
        return self.norm(x.reshape(b, h * w, c))

    def __call__(self, images, rng=None):
        return self.encode(self.embed(images), rng=rng)


def encoder(cfg, *, dtype=None, rngs: nnx.Rngs, **options) -> SwinEncoder:
    """The Swin of `config.model`; options: `mask_token`."""
    return SwinEncoder(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
        window_sizes=cfg.window_sizes, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        drop_path_rate=cfg.drop_path_rate, ape=cfg.ape, ape_grid=cfg.ape_grid,
        shift_windows=cfg.shift_windows, remat=cfg.remat, scan_blocks=cfg.scan_blocks,
        dtype=dtype, rngs=rngs, **options)


def classifier(cfg, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> PooledClassifier:
    """The official fine-tuning model (MixMIM's `models_mixmim_ft`, SimMIM's Swin): the encoder
    with its final norm, the mean of its final tokens, `head`."""
    return PooledClassifier(encoder(cfg, dtype=dtype, rngs=rngs), num_classes, fc_norm_eps=None,
                            dtype=dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Loading a trained encoder (`models/loading.py`).
# ---------------------------------------------------------------------------------------------


def resize_bias_table(path: str, value: np.ndarray, shape: tuple):
    """A [(2w-1)^2, heads] relative-position bias table resized to another window as the official
    MixMIM loader does (`util/pos_embed.py`: bicubic over the (2w-1) x (2w-1) offsets); None for
    anything else."""
    if not (path.endswith(".relative_position_bias_table") and value.ndim == 2
            and len(shape) == 2 and value.shape[1] == shape[1]):
        return None
    old, new = L.square_side(value.shape[0]), L.square_side(shape[0])
    if not (old and new and old % 2 and new % 2):
        return None
    table = L.resize_bicubic(value.reshape(old, old, -1), new).reshape(shape)
    return table, f"bicubic, window {(old + 1) // 2} -> {(new + 1) // 2}"


def load(source, source_cfg, target, target_cfg):
    """(target params with the source's Swin encoder, `loading.LoadReport`): bias tables of
    another window resized bicubically (MixMIM's official loader; SimMIM's own interpolates on a
    geometric grid with scipy instead, which the old torch path did not follow either), SimMIM's
    `mask_token` dropped. The position table and the index buffers are constants of the target's
    config, so another resolution needs nothing else."""
    return loading.load_encoder(source, target, pretraining_only=("mask_token",),
                                resize=resize_bias_table)
