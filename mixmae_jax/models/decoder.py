"""MixMIM's lightweight decoder: timm ViT blocks over the final-stage grid.

Parameters sit under `decoder` and map onto the official flat names (`decoder_embed`,
`decoder_blocks.{k}`, `decoder_norm`, `decoder_pred`, `mask_token`) through the converter's rename
table. The sin-cos position table is a constant.
"""

from __future__ import annotations

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
