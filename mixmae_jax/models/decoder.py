"""Lightweight Transformer decoders: MixMIM's over the final-stage grid, UM-MAE's over the
mask-unit grid.

Parameters sit under `decoder` and map onto the official flat names (`decoder_embed`,
`decoder_blocks.{k}`, `decoder_norm`, `decoder_pred`, `mask_token`) through the converter's rename
table. The sin-cos position tables are constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models.vit import Block


class MaskedDecoder(nnx.Module):
    """embed -> fill hidden positions with the mask token -> + sin-cos PE -> blocks -> pred."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int,
                 out_dim: int, *, mlp_ratio: float = 4.0, scan: bool = True, dtype=None,
                 rngs: nnx.Rngs):
        self.dim, self.grid, self.scan = dim, grid, scan
        self.mask_token = nnx.Param(L.table_init(rngs.params(), (1, 1, dim), jnp.float32))
        self.embed = L.dense(in_dim, dim, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([Block(dim, num_heads, mlp_ratio, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        self.norm = L.layer_norm(dim, rngs=rngs)
        self.pred = L.dense(dim, out_dim, dtype=dtype, rngs=rngs)

    def __call__(self, tokens, hidden):
        """tokens: (N, L, in_dim); hidden: (N, L) with 1 where the mask token replaces a token."""
        x = self.embed(tokens).astype(jnp.float32)
        h = hidden[..., None].astype(jnp.float32)
        # Same arithmetic as the official `x * (1 - m) + mask_token * m` (bit-for-bit parity).
        x = x * (1.0 - h) + self.mask_token[...] * h
        x = x + L.sincos_pos_embed_2d(self.dim, self.grid, self.grid)
        x = L.apply_blocks(self.blocks, x, lambda block, x: block(x), scan=self.scan)
        return self.pred(self.norm(x)).astype(jnp.float32)


class UnitDecoder(nnx.Module):
    """UM-MAE's decoder (`models_mae_swin.py` / `models_mae_pvt.py`): decoder_embed to 4x width,
    PixelShuffle(2) turns each final-stage token into the 2x2 kept units it covers (one per
    2x2 block of the unit grid), then [kept latents + their position; mask tokens + theirs],
    blocks, norm, pred (unit*unit*3 pixels per unit).
    """

    def __init__(self, in_dim: int, cfg, grid: int, *, scan: bool = True, dtype=None,
                 rngs: nnx.Rngs):
        dim, eps = cfg.decoder_dim, cfg.ln_eps
        self.dim, self.grid, self.scan = dim, grid, scan
        self.mask_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, dim)))
        self.embed = L.dense(in_dim, 4 * dim, dtype=dtype, rngs=rngs)
        mlp_ratio = cfg.get("decoder_mlp_ratio", cfg.get("mlp_ratio", 4.0))
        self.blocks = nnx.List([Block(dim, cfg.decoder_num_heads, mlp_ratio, eps=eps, dtype=dtype,
                                      rngs=rngs) for _ in range(cfg.decoder_depth)])
        self.norm = L.layer_norm(dim, eps=eps, rngs=rngs)
        self.pred = L.dense(dim, cfg.unit_size**2 * cfg.in_chans, dtype=dtype, rngs=rngs)

    def __call__(self, latent, pos_ids, masked_ids):
        """latent (B, n*n, C) on the final-stage grid; pos_ids (B, K = 4n*n): the unit whose
        position embedding each kept latent gets, in compact order; masked_ids (B, M): the
        removed units. Returns the predictions of the removed units, (B, M, unit*unit*3)."""
        b, n2, _ = latent.shape
        n = int(round(n2**0.5))
        x = self.embed(latent).astype(jnp.float32).reshape(b, n, n, 4 * self.dim)
        x = L.pixel_shuffle(x, 2).reshape(b, 4 * n2, self.dim)
        pos = jnp.asarray(L.sincos_pos_embed_2d(self.dim, self.grid, self.grid))
        kept = x + jnp.take(pos, pos_ids, axis=0)
        fill = self.mask_token[...] + jnp.take(pos, masked_ids, axis=0)
        x = jnp.concatenate([kept, fill], axis=1)
        x = L.apply_blocks(self.blocks, x, lambda block, x: block(x), scan=self.scan)
        return self.pred(self.norm(x[:, kept.shape[1]:])).astype(jnp.float32)
