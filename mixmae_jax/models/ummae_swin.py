"""UM-MAE's own Swin (implus/UM-MAE `models_mae_swin.py`, finetuning `models_swin.py`).

Not weight-compatible with the official Swin of `swin.py`: a conv 4x4 stem + LayerNorm, patch
merging as LayerNorm + a 2x2 stride-2 conv held by the first block of stages 2..4 (one flat
`blocks` list, as the official keys are), no absolute position embedding, and a continuous
relative position bias: a 1x1-conv MLP (2 -> posmlp_dim -> heads, ReLU) on
sign(d) * log(1 + |d|) of the true coordinate differences of the tokens of a window. Every token
carries its (row, col) on the stage-1 token grid; patch merging keeps the top-left token's
coordinates, halved. Because the bias depends only on coordinates, the same weights run on the
compact grid of uniform sampling (pretraining, window 8: tokens of a window are unevenly spaced
in the image, and their coordinates differ per sample) and on the full grid (finetuning and the
SimMIM baseline, window 16: one set of coordinates shared by the batch).

Window geometry as the official `SwinBlock`: a stage whose map is no larger than the window uses
one window of the whole map and no shift; otherwise odd blocks shift by half a window (cyclic
roll, attention restricted to the rolled regions, coordinates rolled with the tokens).

LayerNorm eps as the official code builds them: the blocks' norm1/norm2 are plain
nn.LayerNorm (1e-5); the stem, merge, final and decoder norms take `ln_eps` (1e-6).

The model config (`config.model`, name "ummae_swin"): img_size, patch_size, in_chans, embed_dim,
depths, num_heads, window_size, posmlp_dim, mlp_ratio, qkv_bias, ln_eps, drop_path_rate,
unit_size (the mask unit and decoder patch, the official `stride`), decoder_dim, decoder_depth,
decoder_num_heads, remat, scan_blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mixmae_jax.models import layers as L
from mixmae_jax.models import loading
from mixmae_jax.models.classifier import PooledClassifier
from mixmae_jax.models.pyramid import conv, run_stages, stage_blocks, stem_kernel_init
from mixmae_jax.models.swin import shift_regions

# mae_swin_tiny_256 / mae_swin_large_256 (dec512d8b64pmd) and swin_tiny_256 / swin_large_256.
VARIANTS = {
    "T": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), posmlp_dim=32,
              decoder_depth=2),
    "L": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), posmlp_dim=64,
              decoder_depth=8),
}


def model_config(variant: str = "T", img_size: int = 256, *, window_size: int = 8,
                 decoder: tuple[int, int, int] | None = None) -> ml_collections.ConfigDict:
    """`config.model` of a variant: window 8 for pretraining on the compact grid, 16 for
    finetuning and the SimMIM baseline on the full grid. decoder: (width, depth, heads),
    default the official 512-d, 16 heads, 2 blocks (T) or 8 (L)."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant: unknown UM-MAE Swin variant {variant!r} "
                         f"({sorted(VARIANTS)})")
    v = dict(VARIANTS[variant])
    decoder = decoder or (512, v.pop("decoder_depth"), 16)
    v.pop("decoder_depth", None)
    return ml_collections.ConfigDict(dict(
        name="ummae_swin",
        variant=variant,
        img_size=img_size,
        patch_size=4,
        in_chans=3,
        **v,
        window_size=window_size,
        mlp_ratio=4.0,
        qkv_bias=True,
        ln_eps=1e-6,
        drop_path_rate=0.0,
        unit_size=16,
        decoder_dim=decoder[0],
        decoder_depth=decoder[1],
        decoder_num_heads=decoder[2],
        remat="none",
        scan_blocks=True,
    ))


def stage_geometry(res: int, window: int, shifted: bool) -> tuple[int, int]:
    """(window, shift) of a block on a res x res map (official `SwinBlock` clipping)."""
    if res <= window:
        return res, 0
    return window, (window // 2 if shifted else 0)


def check_config(cfg, check) -> None:
    """Geometry checks of `config.model` that hold whatever grid a method runs the encoder on;
    `check_grid` checks one grid."""
    n = len(cfg.depths)
    check(n >= 1 and len(cfg.num_heads) == n, "model.depths",
          f"depths {tuple(cfg.depths)} and num_heads {tuple(cfg.num_heads)} must have one entry "
          "per stage")
    check(cfg.img_size % cfg.patch_size == 0, "model.img_size",
          f"{cfg.img_size} is not a multiple of model.patch_size={cfg.patch_size}")
    for s in range(n):
        dim, heads = cfg.embed_dim * 2**s, cfg.num_heads[s]
        check(dim % heads == 0, "model.num_heads",
              f"stage {s} width {dim} is not divisible by {heads} heads")
    check(cfg.window_size >= 1, "model.window_size", f"{cfg.window_size} (at least 1)")


def check_grid(cfg, grid: int, what: str, check) -> None:
    """The stage-1 token grid `grid` halves through every stage and every stage's windows tile
    it; `what` says which grid (e.g. "the compact grid of uniform sampling")."""
    n = len(cfg.depths)
    check(grid % 2 ** (n - 1) == 0, "model.img_size",
          f"{what} ({grid}x{grid} tokens) cannot be halved {n - 1} times by patch merging")
    for s in range(n):
        res = grid // 2**s
        win, _ = stage_geometry(res, cfg.window_size, True)
        check(res % win == 0 and (win == res or win % 2 == 0), "model.window_size",
              f"stage {s}: window {cfg.window_size} does not tile the {res}x{res} map of {what} "
              "with an even window")


def token_coords(h: int, w: int) -> np.ndarray:
    """(1, h, w, 2) float32 (row, col) of every token (the official `pos_hw`)."""
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    return np.stack([rows, cols], axis=-1)[None].astype(np.float32)


class WindowAttention(nnx.Module):
    """Window attention with the continuous relative position bias (`posmlp`)."""

    def __init__(self, dim: int, num_heads: int, posmlp_dim: int, *, qkv_bias: bool,
                 dtype=None, rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.qkv = L.dense(dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.proj = L.dense(dim, dim, dtype=dtype, rngs=rngs)
        # Sequential(Conv2d(2, d, 1), ReLU, Conv2d(d, heads, 1)): layers 0 and 2 as the official.
        self.posmlp = nnx.Sequential(conv(2, posmlp_dim, 1, rngs=rngs), jax.nn.relu,
                                     conv(posmlp_dim, num_heads, 1, rngs=rngs))

    def position_bias(self, coords):
        """coords (M, T, 2) -> (M, heads, T, T): MLP of sign(d) log(1 + |d|), d[i, j] =
        coords[j] - coords[i] (query i, key j; the official difference direction)."""
        d = coords[:, None, :, :] - coords[:, :, None, :]
        d = jnp.sign(d) * jnp.log(1.0 + jnp.abs(d))
        first, _, last = self.posmlp.layers
        # The 1x1 convs as matmuls over the flattened pairs.
        h = jax.nn.relu(d @ first.kernel[...].reshape(2, -1) + first.bias[...])
        out = h @ last.kernel[...].reshape(h.shape[-1], -1) + last.bias[...]
        return out.transpose(0, 3, 1, 2)

    def __call__(self, x, coords, labels=None):
        """x (N, T, C) windows; coords (M, T, 2) with N a multiple of M (one set per window of
        each sample, or per window shared by the batch); labels (N, T) shift regions or None."""
        out = L.attend(self.qkv(x), self.num_heads, scale_queries=True,
                       bias=self.position_bias(coords), labels=labels)
        return self.proj(out)


class PatchMerge(nnx.Module):
    """LayerNorm(C) -> Conv 2x2 stride 2 (C -> C'); coordinates of the top-left token, halved."""

    def __init__(self, in_dim: int, out_dim: int, *, eps: float, dtype=None, rngs: nnx.Rngs):
        self.norm = L.layer_norm(in_dim, eps=eps, rngs=rngs)
        self.proj = conv(in_dim, out_dim, 2, dtype=dtype, rngs=rngs)

    def __call__(self, x, coords):
        return self.proj(self.norm(x)).astype(jnp.float32), coords[:, ::2, ::2] / 2.0


class SwinBlock(nnx.Module):
    """Pre-norm block; the first block of stages 2.. also holds the stage's `downsample`."""

    def __init__(self, dim: int, num_heads: int, window: int, shift: int, *, posmlp_dim: int,
                 mlp_ratio: float, qkv_bias: bool, merge_from: int | None, merge_eps: float,
                 dtype=None, rngs: nnx.Rngs):
        if merge_from is not None:
            self.downsample = PatchMerge(merge_from, dim, eps=merge_eps, dtype=dtype, rngs=rngs)
        self.window, self.shift = window, shift
        self.norm1 = L.layer_norm(dim, rngs=rngs)  # official: plain nn.LayerNorm (1e-5)
        self.attn = WindowAttention(dim, num_heads, posmlp_dim, qkv_bias=qkv_bias, dtype=dtype,
                                    rngs=rngs)
        self.norm2 = L.layer_norm(dim, rngs=rngs)
        self.mlp = L.Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x, coords, rng=None, drop_rate=0.0):
        """x (B, H, W, C) float32; coords (the context): (B or 1, H, W, 2)."""
        b, h, w, _ = x.shape
        window, shift = self.window, self.shift
        keys = L.branch_keys(rng)
        y = self.norm1(x)
        labels = None
        if shift:
            y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
            coords = jnp.roll(coords, (-shift, -shift), axis=(1, 2))
            regions = jnp.asarray(shift_regions(h, w, window, shift))
            labels = L.window_partition(jnp.broadcast_to(regions, (b, h, w)), window)
        windows = L.window_partition(y, window)
        y = self.attn(windows, L.window_partition(coords, window), labels)
        y = L.window_reverse(y, window, h, w)
        if shift:
            y = jnp.roll(y, (shift, shift), axis=(1, 2))
        x = x + L.drop_path(y.astype(jnp.float32), drop_rate, keys[0])
        y = self.mlp(self.norm2(x))
        return x + L.drop_path(y.astype(jnp.float32), drop_rate, keys[1])


class PatchEmbed(nnx.Module):
    def __init__(self, patch: int, in_chans: int, dim: int, *, eps: float, dtype=None,
                 rngs: nnx.Rngs):
        self.proj = conv(in_chans, dim, patch, dtype=dtype, rngs=rngs,
                         kernel_init=stem_kernel_init)
        self.norm = L.layer_norm(dim, eps=eps, rngs=rngs)

    def __call__(self, images):
        return self.norm(self.proj(images).astype(jnp.float32))


class UMSwinEncoder(L.Encoder):
    """`patch_embed`, optional `vis_mask_token` / `mask_token`, flat `blocks`, optional `norm`.
    Arguments as `config.model`'s keys (`encoder` reads them); compact: the blocks run on the
    compact grid of uniform sampling."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int, depths,
                 num_heads, window_size: int, posmlp_dim: int, mlp_ratio: float, qkv_bias: bool,
                 ln_eps: float, drop_path_rate: float, remat, scan_blocks: bool,
                 compact: bool = False, vis_mask_token: bool = False, mask_token: bool = False,
                 final_norm: bool = True, dtype=None, rngs: nnx.Rngs):
        depths = tuple(depths)
        self.patch_size, self.embed_dim = patch_size, embed_dim
        self.grid = img_size // patch_size
        # The grid the blocks run on fixes each block's window and shift (official clipping):
        # the compact grid of uniform sampling is half the token grid.
        self.run_grid = self.grid // 2 if compact else self.grid
        self.num_stages = len(depths)
        self.remat = L.remat_mode(remat)
        self.scan = bool(scan_blocks)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, eps=ln_eps, dtype=dtype,
                                      rngs=rngs)
        if vis_mask_token:  # UM-MAE secondary masking (official N(0, .02))
            self.vis_mask_token = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        if mask_token:  # the SimMIM baseline's mask token
            self.mask_token = nnx.Param(
                0.02 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        self.drop_rates = tuple(np.linspace(0.0, drop_path_rate, sum(depths)).tolist())
        self.stages = stage_blocks(depths)
        blocks = []
        for s, idx in enumerate(self.stages):
            dim, res = embed_dim * 2**s, self.run_grid // 2**s
            for j in range(len(idx)):
                merge = embed_dim * 2 ** (s - 1) if (s > 0 and j == 0) else None
                window, shift = stage_geometry(res, window_size, j % 2 == 1)
                blocks.append(SwinBlock(dim, num_heads[s], window, shift, posmlp_dim=posmlp_dim,
                                        mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, merge_from=merge,
                                        merge_eps=ln_eps, dtype=dtype, rngs=rngs))
        self.blocks = nnx.List(blocks)
        self.out_dim = embed_dim * 2 ** (self.num_stages - 1)
        if final_norm:
            self.norm = L.layer_norm(self.out_dim, eps=ln_eps, rngs=rngs)

    @property
    def stride(self) -> int:
        """Pixels per final-stage token of the full grid."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    def embed(self, images):
        """(B, H, W, 3) -> (B, H/p, W/p, C) tokens after the stem's LayerNorm."""
        return self.patch_embed(images)

    def secondary_token(self):
        """Swin's secondary-mask token goes through the stem's LayerNorm, like the patch
        embeddings it replaces (official; UM-MAE issue #10)."""
        return self.patch_embed.norm(self.vis_mask_token[...]).reshape(-1)

    def encode(self, x, coords, rng=None):
        """x (B, h, w, C) stage-1 tokens on the grid the encoder was built for (`run_grid`);
        coords (B or 1, h, w, 2) their true (row, col) -> (B, L_last, C_last), after the final
        norm if the encoder has one."""
        if x.shape[1:3] != (self.run_grid, self.run_grid):
            raise ValueError(f"tokens of shape {x.shape}: this encoder runs on the "
                             f"{self.run_grid}x{self.run_grid} grid")
        x = run_stages(self, x.astype(jnp.float32), coords.astype(jnp.float32), rng)
        b, h, w, c = x.shape
        x = x.reshape(b, h * w, c)
        return self.norm(x) if hasattr(self, "norm") else x

    def encode_full(self, x, rng=None):
        """Stage-1 tokens of the whole (B, G, G, C) grid, at their own coordinates."""
        return self.encode(x, jnp.asarray(token_coords(self.grid, self.grid)), rng)

    def __call__(self, images, rng=None):
        """Full-grid encoding (finetuning, features)."""
        return self.encode_full(self.embed(images), rng)


def encoder(cfg, *, dtype=None, rngs: nnx.Rngs, **options) -> UMSwinEncoder:
    """UM-MAE's Swin of `config.model`; options: `compact`, `vis_mask_token`, `mask_token`,
    `final_norm`."""
    return UMSwinEncoder(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim, depths=cfg.depths, num_heads=cfg.num_heads,
        window_size=cfg.window_size, posmlp_dim=cfg.posmlp_dim, mlp_ratio=cfg.mlp_ratio,
        qkv_bias=cfg.qkv_bias, ln_eps=cfg.ln_eps, drop_path_rate=cfg.drop_path_rate,
        remat=cfg.remat, scan_blocks=cfg.scan_blocks, dtype=dtype, rngs=rngs, **options)


def classifier(cfg, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> PooledClassifier:
    """The finetuning model (`models_swin.Swin`): blocks on the full grid, no final `norm`; the
    mean of the final tokens, `fc_norm`, `head`."""
    enc = encoder(cfg, final_norm=False, dtype=dtype, rngs=rngs)
    return PooledClassifier(enc, num_classes, fc_norm_eps=cfg.ln_eps, dtype=dtype, rngs=rngs)


def load(source, source_cfg, target, target_cfg):
    """(target params with the source's UM-MAE Swin encoder, `loading.LoadReport`): UM-MAE's
    official finetuning: `vis_mask_token`, the SimMIM baseline's `mask_token` and the final `norm`
    dropped. The continuous position bias has no window-sized weight, so window 8 on the compact
    grid loads into window 16 on the full grid with nothing to resize."""
    return loading.load_encoder(source, target,
                                pretraining_only=("vis_mask_token", "mask_token", "norm"))
