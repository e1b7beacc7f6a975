"""The MAE-style decoders: embed the encoder's tokens, put a mask token where a token is hidden,
add a fixed sin-cos position table, run ViT blocks, norm, predict pixels. One base
(`MaskedDecoder`: the parts and their order, so the init draws and parameter paths are shared);
the methods differ only in how the tokens and mask tokens are laid out:

* `MixMIMDecoder`: the whole final-stage grid, hidden tokens blended with the mask token;
* `MAEDecoder`: the kept tokens plus mask tokens, unshuffled to the patch order (cls first);
* `UnitDecoder`: UM-MAE's, each final-stage token expanded to the 2x2 kept units it covers.

Parameters sit under `decoder` (`mask_token`, `embed`, `blocks`, `norm`, `pred`) and map onto the
official flat names (`mask_token`, `decoder_embed`, `decoder_blocks.{k}`, `decoder_norm`,
`decoder_pred`) through the interop's rename tables. The sin-cos tables are constants.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models.vit import pos_embed_with_cls


def normal_002(key, shape, dtype=jnp.float32):
    """torch.nn.init.normal_(std=.02): MAE's and UM-MAE's mask token."""
    return 0.02 * jax.random.normal(key, shape, dtype)


class MaskedDecoder(nnx.Module):
    """mask_token, embed (in_dim -> embed_dim, default dim), blocks, norm, pred (-> out_dim);
    a subclass assembles the (N, T, dim) tokens, `decode` runs the rest."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, out_dim: int, *,
                 mlp_ratio: float, eps: float, mask_token_init, embed_dim: int | None = None,
                 scan: bool = True, dtype=None, rngs: nnx.Rngs):
        self.dim, self.scan = dim, scan
        self.mask_token = nnx.Param(mask_token_init(rngs.params(), (1, 1, dim), jnp.float32))
        self.embed = L.dense(in_dim, embed_dim or dim, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([L.Block(dim, num_heads, mlp_ratio, eps=eps, dtype=dtype,
                                        rngs=rngs) for _ in range(depth)])
        self.norm = L.layer_norm(dim, eps=eps, rngs=rngs)
        self.pred = L.dense(dim, out_dim, dtype=dtype, rngs=rngs)

    def decode(self, x, predict_from: int = 0):
        """The blocks over all tokens, then norm and pred on the tokens from `predict_from`."""
        x = L.apply_blocks(self.blocks, x, scan=self.scan)
        return self.pred(self.norm(x[:, predict_from:])).astype(jnp.float32)


class MixMIMDecoder(MaskedDecoder):
    """MixMIM's, over the final-stage grid: embed -> the mask token at hidden positions -> + the
    grid's sin-cos table -> blocks -> pred. Mask token trunc_normal(.02), LayerNorm eps 1e-5."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int,
                 out_dim: int, *, mlp_ratio: float, scan: bool = True, dtype=None,
                 rngs: nnx.Rngs):
        super().__init__(in_dim, dim, depth, num_heads, out_dim, mlp_ratio=mlp_ratio,
                         eps=L.LN_EPS, mask_token_init=L.table_init, scan=scan, dtype=dtype,
                         rngs=rngs)
        self.grid = grid

    def __call__(self, tokens, hidden):
        """tokens: (N, L, in_dim); hidden: (N, L) with 1 where the mask token replaces a token."""
        x = L.blend(self.embed(tokens).astype(jnp.float32), self.mask_token[...], hidden)
        return self.decode(x + L.sincos_pos_embed_2d(self.dim, self.grid, self.grid))


class MAEDecoder(MaskedDecoder):
    """MAE's (`models_mae.py`): embed -> mask tokens at the removed positions (the inverse
    permutation `ids_restore`) -> + the sin-cos table with its zero cls row -> blocks -> pred."""

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int,
                 out_dim: int, *, mlp_ratio: float, eps: float, scan: bool = True, dtype=None,
                 rngs: nnx.Rngs):
        super().__init__(in_dim, dim, depth, num_heads, out_dim, mlp_ratio=mlp_ratio, eps=eps,
                         mask_token_init=normal_002, scan=scan, dtype=dtype, rngs=rngs)
        self.grid = grid

    def __call__(self, latent, ids_restore, fill_offset=None):
        """latent (B, 1 + K, C) with cls first; ids_restore (B, L) -> (B, L, p*p*3).
        fill_offset: (B, 1, C) added to each sample's mask tokens, or None."""
        x = self.embed(latent).astype(jnp.float32)
        b, k = x.shape[0], x.shape[1] - 1
        n = ids_restore.shape[1]
        fill = jnp.broadcast_to(self.mask_token[...], (b, n - k, self.dim))
        if fill_offset is not None:
            fill = fill + fill_offset
        shuffled = jnp.concatenate([x[:, 1:], fill], axis=1)  # kept tokens, then mask tokens
        restored = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
        x = jnp.concatenate([x[:, :1], restored], axis=1) + pos_embed_with_cls(self.dim, self.grid)
        return self.decode(x)[:, 1:]


class UnitDecoder(MaskedDecoder):
    """UM-MAE's (`models_mae_swin.py` / `models_mae_pvt.py`): decoder_embed to 4x width,
    PixelShuffle(2) turns each final-stage token into the 2x2 kept units it covers (one per
    2x2 block of the unit grid), then [kept latents + their position; mask tokens + theirs],
    blocks, norm, pred (unit*unit*3 pixels per unit).
    """

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, grid: int,
                 out_dim: int, *, mlp_ratio: float, eps: float, scan: bool = True, dtype=None,
                 rngs: nnx.Rngs):
        super().__init__(in_dim, dim, depth, num_heads, out_dim, mlp_ratio=mlp_ratio, eps=eps,
                         mask_token_init=normal_002, embed_dim=4 * dim, scan=scan, dtype=dtype,
                         rngs=rngs)
        self.grid = grid

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
        return self.decode(x, predict_from=kept.shape[1])
