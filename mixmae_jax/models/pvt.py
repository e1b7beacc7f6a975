"""UM-MAE's PVT (implus/UM-MAE `models_mae_pvt.py`, finetuning `models_pvt.py`).

Four stages of global attention with spatial reduction: keys and values come from the map
average-pooled by the stage's sr ratio, a 1x1 conv and a LayerNorm (not PVT-v1's strided conv,
so no weight depends on the ratio: pretraining on the compact grid uses sr 4, 2, 1, 1 and
finetuning on the full grid 8, 4, 2, 1, and stage-1 keys are 8x8 in both). Conv 4x4 stem and
plain 2x2 stride-2 conv merges, no norms; the merge of stages 2.. is held by the stage's first
block (one flat `blocks` list, as the official keys are). One 2-D sin-cos position embedding on
the stage-1 grid, a constant in pretraining (compacted with the tokens under uniform sampling),
a learned `pos_embed` initialised from it in finetuning.

LayerNorm eps as the official code builds them: the blocks' norms and the attention's `norm`
are plain nn.LayerNorm (1e-5); the final and decoder norms take `ln_eps` (1e-6).

The model config (`config.model`, name "pvt"): img_size, patch_size, in_chans, embed_dims,
depths, num_heads, mlp_ratios, sr_ratios, full_sr_ratios (the full grid's, for finetuning and
features), qkv_bias, ln_eps, drop_path_rate, unit_size (the mask
unit and decoder patch, the official `stride`), decoder_dim, decoder_depth, decoder_num_heads,
decoder_mlp_ratio, remat, scan_blocks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models import loading
from mixmae_jax.models.classifier import PooledClassifier
from mixmae_jax.models.pyramid import conv, run_stages, stage_blocks, stem_kernel_init
from mixmae_jax.models.vit import resize_pos_embed

VARIANTS = {
    "S": dict(embed_dims=(64, 128, 320, 512), depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8),
              mlp_ratios=(8.0, 8.0, 4.0, 4.0)),
}
# Pretraining on the compact grid of uniform sampling; finetuning and the SimMIM baseline on the
# full grid (stage-1 keys are 8x8 in both).
SR_COMPACT = (4, 2, 1, 1)
SR_FULL = (8, 4, 2, 1)


def model_config(variant: str = "S", img_size: int = 256, *, sr_ratios=SR_COMPACT,
                 full_sr_ratios=SR_FULL,
                 decoder: tuple[int, int, int] = (512, 2, 16)) -> ml_collections.ConfigDict:
    """`config.model` of a PVT variant with UM-MAE's decoder (width, depth, heads).
    full_sr_ratios: the official finetuning ratios on the full grid, which UM-MAE's frozen
    features use too."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant: unknown PVT variant {variant!r} ({sorted(VARIANTS)})")
    return ml_collections.ConfigDict(dict(
        name="pvt",
        variant=variant,
        img_size=img_size,
        patch_size=4,
        in_chans=3,
        **VARIANTS[variant],
        sr_ratios=tuple(sr_ratios),
        full_sr_ratios=tuple(full_sr_ratios),
        qkv_bias=True,
        ln_eps=1e-6,
        drop_path_rate=0.0,
        unit_size=16,
        decoder_dim=decoder[0],
        decoder_depth=decoder[1],
        decoder_num_heads=decoder[2],
        decoder_mlp_ratio=4.0,
        remat="none",
        scan_blocks=True,
    ))


def check_config(cfg, check) -> None:
    """Checks that hold whatever grid a method runs the encoder on; `check_grid` checks one."""
    n = len(cfg.depths)
    for key in ("embed_dims", "num_heads", "mlp_ratios", "sr_ratios"):
        check(len(cfg[key]) == n, f"model.{key}",
              f"{tuple(cfg[key])} must have one entry per stage (depths {tuple(cfg.depths)})")
    check(cfg.img_size % cfg.patch_size == 0, "model.img_size",
          f"{cfg.img_size} is not a multiple of model.patch_size={cfg.patch_size}")
    check(cfg.embed_dims[0] % 4 == 0, "model.embed_dims",
          f"{cfg.embed_dims[0]}: the stage-1 width must be divisible by 4 (2-D sin-cos position "
          "embedding)")
    for s in range(n):
        check(cfg.embed_dims[s] % cfg.num_heads[s] == 0, "model.num_heads",
              f"stage {s} width {cfg.embed_dims[s]} is not divisible by {cfg.num_heads[s]} heads")


def check_grid(cfg, grid: int, what: str, check) -> None:
    """The stage-1 grid halves through every stage and each stage's sr ratio divides its map."""
    n = len(cfg.depths)
    check(grid % 2 ** (n - 1) == 0, "model.img_size",
          f"{what} ({grid}x{grid} tokens) cannot be halved {n - 1} times by patch merging")
    for s in range(n):
        res, sr = grid // 2**s, cfg.sr_ratios[s]
        check(sr >= 1 and res % sr == 0, "model.sr_ratios",
              f"stage {s}: sr ratio {sr} does not divide the {res}x{res} map of {what}")


class Attention(nnx.Module):
    """q from every token; k, v from avg-pool(sr) -> 1x1 conv `sr` -> LayerNorm `norm`."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, *, qkv_bias: bool, dtype=None,
                 rngs: nnx.Rngs):
        self.num_heads, self.sr_ratio = num_heads, sr_ratio
        self.q = L.dense(dim, dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.kv = L.dense(dim, 2 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = L.dense(dim, dim, dtype=dtype, rngs=rngs)
        self.sr = conv(dim, dim, 1, dtype=dtype, rngs=rngs)
        self.norm = L.layer_norm(dim, rngs=rngs)  # official: plain nn.LayerNorm (1e-5)

    def __call__(self, x):
        """x (B, H, W, C) -> (B, H*W, C)."""
        b, h, w, c = x.shape
        heads, r = self.num_heads, self.sr_ratio
        q = self.q(x).reshape(b, h * w, heads, c // heads)
        pooled = x if r == 1 else x.reshape(b, h // r, r, w // r, r, c).mean(axis=(2, 4))
        pooled = self.norm(self.sr(pooled).astype(jnp.float32)).reshape(b, -1, c)
        kv = self.kv(pooled).reshape(b, -1, 2, heads, c // heads)
        out = L.attention(q, kv[:, :, 0], kv[:, :, 1], scale_queries=False)
        return self.proj(out)


class PVTBlock(nnx.Module):
    """Pre-norm block; the first block of stages 2.. also holds the stage's `downsample`."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float, *,
                 qkv_bias: bool, merge_from: int | None, dtype=None, rngs: nnx.Rngs):
        if merge_from is not None:
            self.downsample = Merge(merge_from, dim, dtype=dtype, rngs=rngs)
        self.norm1 = L.layer_norm(dim, rngs=rngs)
        self.attn = Attention(dim, num_heads, sr_ratio, qkv_bias=qkv_bias, dtype=dtype,
                              rngs=rngs)
        self.norm2 = L.layer_norm(dim, rngs=rngs)
        self.mlp = L.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x, context=None, rng=None, drop_rate=0.0):
        """x (B, H, W, C) float32 (context: unused, see `pyramid.run_stages`)."""
        b, h, w, c = x.shape
        keys = L.branch_keys(rng)
        y = self.attn(self.norm1(x)).astype(jnp.float32).reshape(b, h, w, c)
        x = x + L.drop_path(y, drop_rate, keys[0])
        y = self.mlp(self.norm2(x))
        return x + L.drop_path(y.astype(jnp.float32), drop_rate, keys[1])


class Merge(nnx.Module):
    """Conv 2x2 stride 2, no norm (official `PatchMerge`)."""

    def __init__(self, in_dim: int, out_dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.proj = conv(in_dim, out_dim, 2, dtype=dtype, rngs=rngs)

    def __call__(self, x, context=None):
        return self.proj(x).astype(jnp.float32), context


class PatchEmbed(nnx.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, *, dtype=None, rngs: nnx.Rngs):
        self.proj = conv(in_chans, dim, patch, dtype=dtype, rngs=rngs,
                         kernel_init=stem_kernel_init)

    def __call__(self, images):
        return self.proj(images).astype(jnp.float32)


class PVTEncoder(L.Encoder):
    """`patch_embed`, optional `vis_mask_token` / `mask_token`, `pos_embed` (learned only when
    finetuning), flat `blocks`, optional `norm`. Arguments as `config.model`'s keys (`encoder`
    reads them)."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dims, depths,
                 num_heads, mlp_ratios, sr_ratios, qkv_bias: bool, ln_eps: float,
                 drop_path_rate: float, remat, scan_blocks: bool, vis_mask_token: bool = False,
                 mask_token: bool = False, learned_pos: bool = False, final_norm: bool = True,
                 dtype=None, rngs: nnx.Rngs):
        depths, dims = tuple(depths), tuple(embed_dims)
        self.patch_size, self.embed_dim = patch_size, dims[0]
        self.grid = img_size // patch_size
        self.num_stages = len(depths)
        self.remat = L.remat_mode(remat)
        self.scan = bool(scan_blocks)
        self.patch_embed = PatchEmbed(patch_size, in_chans, dims[0], dtype=dtype, rngs=rngs)
        if vis_mask_token:
            self.vis_mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                                     (1, 1, dims[0])))
        if mask_token:
            self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dims[0])))
        if learned_pos:
            self.pos_embed = nnx.Param(jnp.asarray(self.sincos_table())[None])
        self.drop_rates = tuple(np.linspace(0.0, drop_path_rate, sum(depths)).tolist())
        self.stages = stage_blocks(depths)
        blocks = []
        for s, idx in enumerate(self.stages):
            for j in range(len(idx)):
                merge = dims[s - 1] if (s > 0 and j == 0) else None
                blocks.append(PVTBlock(dims[s], num_heads[s], sr_ratios[s], mlp_ratios[s],
                                       qkv_bias=qkv_bias, merge_from=merge, dtype=dtype,
                                       rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.out_dim = dims[-1]
        if final_norm:
            self.norm = L.layer_norm(self.out_dim, eps=ln_eps, rngs=rngs)

    @property
    def stride(self) -> int:
        return self.patch_size * 2 ** (self.num_stages - 1)

    def sincos_table(self) -> np.ndarray:
        return L.sincos_pos_embed_2d(self.embed_dim, self.grid, self.grid)

    def position_map(self):
        """(1, G, G, C): the learned table, or the fixed sin-cos one."""
        table = self.pos_embed[...][0] if hasattr(self, "pos_embed") else self.sincos_table()
        return jnp.asarray(table).reshape(1, self.grid, self.grid, self.embed_dim)

    def embed(self, images):
        """(B, H, W, 3) -> (B, H/p, W/p, C) patch embeddings (no position yet)."""
        return self.patch_embed(images)

    def secondary_token(self):
        """PVT's secondary-mask token is used raw; the position embedding is added after it
        replaces a unit (official)."""
        return self.vis_mask_token[...].reshape(-1)

    def encode(self, x, rng=None):
        """x (B, h, w, C) stage-1 tokens with their position embedding (full or compact grid)
        -> (B, L_last, C_last), after the final norm if the encoder has one."""
        x = run_stages(self, x.astype(jnp.float32), None, rng)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        return self.norm(x) if hasattr(self, "norm") else x

    def encode_full(self, x, rng=None):
        """Stage-1 tokens of the whole (B, G, G, C) grid, their position embedding added."""
        return self.encode(x + self.position_map(), rng)

    def __call__(self, images, rng=None):
        """Full-grid encoding (finetuning, features)."""
        return self.encode_full(self.embed(images), rng)


def encoder(cfg, *, dtype=None, rngs: nnx.Rngs, **options) -> PVTEncoder:
    """The PVT of `config.model` (its pretraining sr ratios); options: `vis_mask_token`,
    `mask_token`, `learned_pos`, `final_norm`."""
    return PVTEncoder(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dims=cfg.embed_dims, depths=cfg.depths, num_heads=cfg.num_heads,
        mlp_ratios=cfg.mlp_ratios, sr_ratios=cfg.sr_ratios, qkv_bias=cfg.qkv_bias,
        ln_eps=cfg.ln_eps, drop_path_rate=cfg.drop_path_rate, remat=cfg.remat,
        scan_blocks=cfg.scan_blocks, dtype=dtype, rngs=rngs, **options)


def classifier(cfg, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> PooledClassifier:
    """The finetuning model (`models_pvt.PVT`): learned `pos_embed`, no final `norm`; the mean
    of the final tokens, `fc_norm`, `head`."""
    enc = encoder(cfg, learned_pos=True, final_norm=False, dtype=dtype, rngs=rngs)
    return PooledClassifier(enc, num_classes, fc_norm_eps=cfg.ln_eps, dtype=dtype, rngs=rngs)


def load(source, source_cfg, target, target_cfg):
    """(target params with the source's PVT encoder, `loading.LoadReport`): UM-MAE's official
    finetuning: `vis_mask_token`, the SimMIM baseline's `mask_token` and the final `norm` dropped;
    the learned `pos_embed` starts from the pretraining's fixed sin-cos table (resized to another
    grid as `interpolate_pos_embed` does, no extra tokens). The average-pool reduction has no
    ratio-sized weight, so sr ratios 4, 2, 1, 1 load into 8, 4, 2, 1."""
    grid = source_cfg.img_size // source_cfg.patch_size
    fixed = {"encoder.pos_embed": L.sincos_pos_embed_2d(source_cfg.embed_dims[0], grid, grid)[None]}
    return loading.load_encoder(
        source, target, pretraining_only=("vis_mask_token", "mask_token", "norm"),
        resize=functools.partial(resize_pos_embed, extra_tokens=0), fixed_tables=fixed)
