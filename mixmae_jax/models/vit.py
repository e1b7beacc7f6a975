"""ViT encoder (MAE's `models_mae.py` / `models_vit.py`, timm 0.3.2 block layout).

Parameter paths mirror the official PyTorch keys (`patch_embed.proj`, `cls_token`,
`blocks.{i}.attn.qkv`, `norm`, `fc_norm`, `head`), so conversion is a rename plus transposes.

The model config (`config.model`, name "vit"): img_size, patch_size, in_chans, embed_dim, depth,
num_heads, mlp_ratio, qkv_bias, ln_eps (MAE: 1e-6), drop_path_rate, remat, scan_blocks and the
method's decoder (decoder_dim, decoder_depth, decoder_num_heads).

Pretraining adds the fixed 2-D sin-cos table (a zero row for the cls token) as a constant;
finetuning (`classifier`) learns `pos_embed`, initialised from that table as the official
finetuning does when it loads a pretraining checkpoint.
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

# ViT-B/16, L/16, H/14 (MAE's mae_vit_*_patch*_dec512d8b factories).
VARIANTS = {
    "B": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "L": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "H": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}


def model_config(variant: str = "B", img_size: int = 224, *,
                 decoder: tuple[int, int, int] = (512, 8, 16)) -> ml_collections.ConfigDict:
    """`config.model` of a ViT variant with MAE's decoder (width, depth, heads) = (512, 8, 16)."""
    if variant not in VARIANTS:
        raise ValueError(f"model.variant: unknown ViT variant {variant!r} ({sorted(VARIANTS)})")
    return ml_collections.ConfigDict(dict(
        name="vit",
        variant=variant,
        img_size=img_size,
        in_chans=3,
        **VARIANTS[variant],
        mlp_ratio=4.0,
        qkv_bias=True,
        ln_eps=1e-6,  # MAE: norm_layer=partial(nn.LayerNorm, eps=1e-6), decoder included
        drop_path_rate=0.0,
        decoder_dim=decoder[0],
        decoder_depth=decoder[1],
        decoder_num_heads=decoder[2],
        remat="none",
        scan_blocks=True,
    ))


def check_config(cfg, check) -> None:
    """Geometry checks of `config.model`; `check(ok, key, message)` raises naming the key."""
    check(cfg.img_size % cfg.patch_size == 0, "model.img_size",
          f"{cfg.img_size} is not a multiple of model.patch_size={cfg.patch_size}")
    check(cfg.embed_dim % 4 == 0, "model.embed_dim",
          f"{cfg.embed_dim} must be divisible by 4 (2-D sin-cos position embedding)")
    check(cfg.embed_dim % cfg.num_heads == 0, "model.num_heads",
          f"width {cfg.embed_dim} is not divisible by {cfg.num_heads} heads")
    check(cfg.depth >= 1, "model.depth", f"{cfg.depth} (at least one block)")


def pos_embed_with_cls(dim: int, grid: int) -> np.ndarray:
    """(1 + grid*grid, dim) float32: a zero row for the cls token, then the 2-D sin-cos table."""
    return np.concatenate([np.zeros((1, dim), np.float32), L.sincos_pos_embed_2d(dim, grid, grid)])


# ---------------------------------------------------------------------------------------------
# Encoder.
# ---------------------------------------------------------------------------------------------


class PatchEmbed(nnx.Module):
    """Conv(k=s=patch) stem, no norm (timm PatchEmbed as MAE uses it)."""

    def __init__(self, patch: int, in_chans: int, dim: int, *, dtype=None, rngs: nnx.Rngs):
        # MAE initialises the conv weight as a Linear: xavier_uniform on (dim, in*p*p).
        fan_in = in_chans * patch * patch
        self.proj = nnx.Conv(in_chans, dim, (patch, patch), strides=patch, padding="VALID",
                             dtype=dtype, param_dtype=jnp.float32,
                             kernel_init=nnx.initializers.xavier_uniform(in_axis=(0, 1, 2)),
                             bias_init=L.conv_bias_init(fan_in), rngs=rngs)

    def __call__(self, images):
        x = self.proj(images)
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c)


class ViTEncoder(L.Encoder):
    """patch_embed -> (+ pos) -> [visible tokens] -> cls -> blocks -> norm (or fc_norm later).
    Arguments as `config.model`'s keys (`encoder` reads them)."""

    def __init__(self, *, img_size: int, patch_size: int, in_chans: int, embed_dim: int,
                 depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, ln_eps: float,
                 drop_path_rate: float, remat, scan_blocks: bool, final_norm: bool = True,
                 learned_pos: bool = False, dtype=None, rngs: nnx.Rngs):
        self.grid = img_size // patch_size
        self.num_patches = self.grid * self.grid
        self.patch_size = patch_size
        self.embed_dim = self.out_dim = embed_dim
        self.remat = L.remat_mode(remat)
        self.scan = bool(scan_blocks)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, dtype=dtype, rngs=rngs)
        # MAE: torch.nn.init.normal_(cls_token, std=.02)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, embed_dim)))
        if learned_pos:
            self.pos_embed = nnx.Param(jnp.asarray(pos_embed_with_cls(embed_dim, self.grid))[None])
        self.drop_rates = tuple(np.linspace(0.0, drop_path_rate, depth).tolist())
        self.blocks = nnx.List([L.Block(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                        eps=ln_eps, dtype=dtype, rngs=rngs)
                                for _ in range(depth)])
        if final_norm:
            self.norm = L.layer_norm(embed_dim, eps=ln_eps, rngs=rngs)

    def position_table(self):
        """(1 + L, C): the learned table, or the fixed sin-cos one with its zero cls row."""
        if hasattr(self, "pos_embed"):
            return self.pos_embed[...][0]
        return jnp.asarray(pos_embed_with_cls(self.embed_dim, self.grid))

    def embed(self, images):
        """(B, H, W, 3) -> (B, L, C) patch tokens with their position embedding added."""
        return self.patch_embed(images).astype(jnp.float32) + self.position_table()[1:]

    def encode(self, tokens, rng=None):
        """(B, K, C) embedded tokens (all L, or a visible subset) -> (B, 1 + K, C) with cls first,
        after the blocks and, if the encoder has one, the final norm."""
        cls = self.cls_token[...] + self.position_table()[:1]
        x = jnp.concatenate([jnp.broadcast_to(cls, (tokens.shape[0], 1, self.embed_dim)),
                             tokens], axis=1)
        x = L.apply_blocks(self.blocks, x, drop_rates=self.drop_rates, rng=rng,
                           remat=self.remat, scan=self.scan)
        return self.norm(x) if hasattr(self, "norm") else x

    def __call__(self, images, rng=None):
        """The patch tokens of the whole image after the blocks (and the final norm): what MAE's
        finetuning pools."""
        return self.encode(self.embed(images), rng)[:, 1:]


def encoder(cfg, *, dtype=None, rngs: nnx.Rngs, **options) -> ViTEncoder:
    """The ViT of `config.model`; options: `final_norm`, `learned_pos`."""
    return ViTEncoder(
        img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, ln_eps=cfg.ln_eps,
        drop_path_rate=cfg.drop_path_rate, remat=cfg.remat, scan_blocks=cfg.scan_blocks,
        dtype=dtype, rngs=rngs, **options)


def classifier(cfg, num_classes: int, *, dtype=None, rngs: nnx.Rngs) -> PooledClassifier:
    """MAE's finetuning model (`models_vit.VisionTransformer`, global_pool=True): learned
    `pos_embed`, no final `norm`; the mean of the patch tokens, `fc_norm`, `head`."""
    enc = encoder(cfg, final_norm=False, learned_pos=True, dtype=dtype, rngs=rngs)
    return PooledClassifier(enc, num_classes, fc_norm_eps=cfg.ln_eps, dtype=dtype, rngs=rngs)


# ---------------------------------------------------------------------------------------------
# Loading a trained encoder (`models/loading.py`).
# ---------------------------------------------------------------------------------------------


def resize_pos_embed(path: str, value: np.ndarray, shape: tuple, extra_tokens: int = 1):
    """A (1, extra + G*G, C) position table resized to another grid as MAE's
    `interpolate_pos_embed` does (UM-MAE's finetuning uses it too): the extra (cls) rows kept, the
    grid part bicubic; None for anything else."""
    if not (path.endswith("pos_embed") and value.ndim == 3 and len(shape) == 3
            and value.shape[::2] == shape[::2]):
        return None
    old = L.square_side(value.shape[1] - extra_tokens)
    new = L.square_side(shape[1] - extra_tokens)
    if not (old and new):
        return None
    grid = L.resize_bicubic(value[0, extra_tokens:].reshape(old, old, -1), new)
    table = np.concatenate([value[0, :extra_tokens], grid.reshape(new * new, -1)])[None]
    return table, f"bicubic, grid {old}x{old} -> {new}x{new}"


def load(source, source_cfg, target, target_cfg):
    """(target params with the source's ViT encoder, `loading.LoadReport`): the final `norm` of
    MAE's pretraining dropped (the classifier pools into `fc_norm`); a learned `pos_embed` starts
    from the source's, or from its fixed sin-cos table (zero cls row), resized to another grid by
    `resize_pos_embed`."""
    grid = source_cfg.img_size // source_cfg.patch_size
    fixed = {"encoder.pos_embed": pos_embed_with_cls(source_cfg.embed_dim, grid)[None]}
    return loading.load_encoder(source, target, pretraining_only=("norm",),
                                resize=resize_pos_embed, fixed_tables=fixed)
