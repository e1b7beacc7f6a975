"""Plain ``torch.nn`` reference of the official MAE models (facebookresearch/mae).

Written from a reading of the official code, not copied from it. Two models, with the official
``state_dict`` layout (key names, order, shapes, dtypes) and the official numerics:

* ``MAEPretrainTorch`` -- ``models_mae.MaskedAutoencoderViT`` (encoder, decoder, pixel loss).
* ``MAEFinetuneTorch``  -- ``models_vit.VisionTransformer`` as MAE fine-tunes it (timm 0.3.2
  ViT subclass; ``global_pool=True``: mean over patch tokens, ``fc_norm``, ``head``).

No timm or torchvision: the timm 0.3.2 pieces MAE relies on (``PatchEmbed``, ``Block``,
``Attention``, ``Mlp``, ``VisionTransformer``) are re-written here with the same parameter names.

Sources read
------------
facebookresearch/mae at commit ``efb2a8062c206524e35e47d04501ed4f544c0ae8`` (2022-04-20), and
huggingface/pytorch-image-models at ``2ed8f247154870be7acc1908fde0a7f457f67456`` (the 0.3.2
maintenance-release commit, ``timm/version.py`` == '0.3.2'; the repo has no ``v0.3.2`` tag).
The README of MAE (line 22) and ``main_finetune.py:26`` pin ``timm==0.3.2``.

``models_mae.py``
  * 33-63: registration order ``patch_embed``, ``cls_token``, ``pos_embed`` (frozen,
    ``requires_grad=False``, ``num_patches + 1`` rows), ``blocks`` (``Block(..., qkv_bias=True,
    qk_scale=None, norm_layer)``), ``norm``, ``decoder_embed``, ``mask_token``,
    ``decoder_pos_embed`` (frozen), ``decoder_blocks``, ``decoder_norm``, ``decoder_pred``
    (``Linear(decoder_dim, patch**2 * in_chans)``). ``state_dict`` lists a module's own
    parameters first (in registration order), then its children, so the key order is
    ``cls_token, pos_embed, mask_token, decoder_pos_embed, patch_embed.*, blocks.*, norm.*,
    decoder_embed.*, decoder_blocks.*, decoder_norm.*, decoder_pred.*``.
  * 65-93: init: both sin-cos tables with ``cls_token=True`` (float64 -> ``.float()``), xavier
    uniform on the conv weight viewed as ``(out, in*p*p)``, ``normal_(std=.02)`` on
    ``cls_token`` then ``mask_token``, then ``apply``: xavier uniform on every ``nn.Linear``
    weight with zero bias, LayerNorm weight 1 / bias 0. The conv bias keeps its PyTorch default.
  * 95-121: ``patchify`` ``nchpwq -> nhwpqc`` (row-major patches, each flattened (row, col,
    channel)); the official code hard-codes 3 channels, here ``in_chans`` (same for 3).
  * 123-148: ``random_masking``: ``noise = torch.rand(N, L)``, ``ids_shuffle = argsort(noise)``
    (ascending: small noise is kept), ``ids_restore = argsort(ids_shuffle)``, keep the first
    ``int(L * (1 - mask_ratio))``; mask 1 = removed, unshuffled to the original order.
  * 150-170: encoder: patch embed, ``+ pos_embed[:, 1:]``, masking, prepend
    ``cls_token + pos_embed[:, :1]``, blocks, ``norm``.
  * 172-196: decoder: ``decoder_embed``, append ``mask_token`` copies after the kept tokens
    (cls excluded), gather with ``ids_restore``, re-prepend cls, ``+ decoder_pos_embed``, blocks,
    ``decoder_norm``, ``decoder_pred``, drop the cls row.
  * 198-214: loss: with ``norm_pix_loss`` the target patch is normalised by its mean and
    ``(var + 1e-6) ** .5`` with ``var = target.var(-1)`` (torch default: unbiased, N - 1);
    per-patch mean of squared errors, averaged over the removed patches:
    ``(loss * mask).sum() / mask.sum()``.
  * 223-250: factories: B/16 (768, 12, 12), L/16 (1024, 24, 16), H/14 (1280, 32, 16), decoder
    512-d, 8 blocks, 16 heads, ``mlp_ratio=4``, ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``.
    The class default of ``norm_pix_loss`` is False (``main_pretrain.py:56-58`` too, enabled by
    ``--norm_pix_loss`` in PRETRAIN.md); this reference defaults to True (the project's setting).

``util/pos_embed.py``
  * 26-29: ``grid = np.meshgrid(grid_w, grid_h)`` ("w goes first"): ``grid[0][r, c] = c``.
  * 42-45: the half named ``emb_h`` is computed from ``grid[0]``, i.e. the COLUMN (x/w)
    coordinate, and comes first; the second half is the ROW (y/h) coordinate. Token
    ``r * grid + c`` therefore gets ``[sin(c w), cos(c w), sin(r w), cos(r w)]``.
  * 49-67: 1-D: ``omega = arange(D/4, float64) / (D/4)``, ``omega = 1 / 10000**omega``,
    ``out = einsum('m,d->md', pos_float32, omega)`` (float64), ``[sin(out), cos(out)]``.
  * 33-34: the cls row is all zeros, prepended.

``models_vit.py``
  * 20-32: ``VisionTransformer(timm VisionTransformer)``; with ``global_pool`` it adds
    ``fc_norm = norm_layer(embed_dim)`` AFTER the timm constructor ran and deletes ``norm``.
  * 34-53: ``forward_features``: patch embed, prepend cls, ``+ pos_embed``, ``pos_drop``, blocks,
    then ``x[:, 1:].mean(1)`` -> ``fc_norm`` (global pool) or ``norm(x)[:, 0]``.
  * 56-74: B/L/H factories: ``qkv_bias=True``, ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``.

timm 0.3.2 ``timm/models/vision_transformer.py``
  * 79-95 ``Mlp``: ``fc1``, ``act`` (``nn.GELU()``, exact erf), ``fc2`` (+ param-free dropouts).
  * 98-123 ``Attention``: ``qkv`` Linear(dim, 3 dim, bias=qkv_bias), ``proj``;
    ``scale = qk_scale or head_dim ** -0.5``; qkv reshaped ``(B, N, 3, heads, C/heads)`` and
    permuted to ``(3, B, heads, N, hd)``; ``attn = (q @ k^T) * scale`` (scale AFTER the product).
  * 126-143 ``Block``: ``norm1, attn, drop_path, norm2, mlp`` (hidden ``int(dim * mlp_ratio)``),
    pre-norm residuals; ``drop_path`` is ``nn.Identity`` when the rate is 0.
  * 146-166 ``PatchEmbed``: ``proj`` Conv2d(kernel = stride = patch), then
    ``flatten(2).transpose(1, 2)``; no norm; asserts the input size.
  * 204-252 ``VisionTransformer``: registration ``patch_embed, cls_token, pos_embed, pos_drop,
    blocks, norm, head``; no ``dist_token`` / ``pre_logits`` in 0.3.2. Init: default module init,
    ``trunc_normal_(pos_embed, .02)``, ``trunc_normal_(cls_token, .02)``, then ``apply``: Linear
    weights ``trunc_normal_(.02)``, zero bias, LayerNorm 1/0. ``pos_embed`` is learnable.
  Since MAE adds ``fc_norm`` after ``head`` is registered, the fine-tuning ``state_dict`` order is
  ``cls_token, pos_embed, patch_embed.*, blocks.*, head.*, fc_norm.*`` (``fc_norm`` LAST).
  ``main_finetune.py:251-257`` then re-draws ``head.weight`` with ``trunc_normal_(std=2e-5)``
  after loading the pretrained weights (not part of the model; see ``init_head_for_finetune``).

``state_dict`` of ViT-B/16 (pretraining), 4 + 2 + 12*12 + 2 + 2 + 8*12 + 2 + 2 = 254 entries::

    cls_token (1,1,768), pos_embed (1,197,768), mask_token (1,1,512),
    decoder_pos_embed (1,197,512), patch_embed.proj.{weight (768,3,16,16), bias (768,)},
    blocks.{i}.{norm1.weight, norm1.bias, attn.qkv.weight (2304,768), attn.qkv.bias,
      attn.proj.weight, attn.proj.bias, norm2.weight, norm2.bias, mlp.fc1.weight (3072,768),
      mlp.fc1.bias, mlp.fc2.weight (768,3072), mlp.fc2.bias}   for i in 0..11,
    norm.{weight, bias}, decoder_embed.{weight (512,768), bias},
    decoder_blocks.{i}.<same 12 names, width 512> for i in 0..7,
    decoder_norm.{weight, bias}, decoder_pred.{weight (768,512), bias (768,)}

and fine-tuning (global pool): ``cls_token, pos_embed, patch_embed.proj.{weight,bias},
blocks.{0..11}.<12 names>, head.{weight (1000,768), bias}, fc_norm.{weight, bias}`` (152 entries).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .mixmim import DropPath, trunc_normal_

__all__ = [
    "Attention",
    "Block",
    "MAEFinetuneTorch",
    "MAEPretrainTorch",
    "Mlp",
    "PatchEmbed",
    "VARIANTS",
    "from_model_config",
    "init_head_for_finetune",
    "mae_vit_base_patch16",
    "mae_vit_huge_patch14",
    "mae_vit_large_patch16",
    "sincos_pos_embed_2d_with_cls",
    "vit_base_patch16",
    "vit_huge_patch14",
    "vit_large_patch16",
]

NORM_EPS = 1e-6  # partial(nn.LayerNorm, eps=1e-6) in every official MAE factory


# ------------------------------------------------------------------------------------------------
# Fixed sin-cos table
# ------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d_with_cls(dim: int, grid: int) -> np.ndarray:
    """The MAE position table with its cls row: float32, shape ``(1 + grid*grid, dim)``.

    Row 0 (cls) is all zeros. Token ``(r, c)`` of the row-major grid sits at row
    ``1 + r*grid + c`` and holds ``[sin(c*w), cos(c*w), sin(r*w), cos(r*w)]`` with
    ``w_k = 10000**(-k / (dim/4))``, ``k = 0 .. dim/4 - 1``: the COLUMN coordinate fills the
    first half (MAE's ``meshgrid(grid_w, grid_h)`` puts w first), the ROW coordinate the second.

    Arithmetic as in ``util/pos_embed.py``: float32 coordinates, float64 frequencies, products and
    sin/cos in float64, then one rounding to float32 (the official ``.float()``).
    """
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos table needs dim % 4 == 0, got {dim}")
    quarter = dim // 4
    freqs = np.arange(quarter, dtype=np.float64)
    freqs /= dim / 4.0
    freqs = 1.0 / 10000.0**freqs
    axis = np.arange(grid, dtype=np.float32).astype(np.float64)

    def one_axis(coord: np.ndarray) -> np.ndarray:
        angles = coord[:, None] * freqs[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    col = np.tile(axis, grid)  # token r*grid + c -> c
    row = np.repeat(axis, grid)  # token r*grid + c -> r
    table = np.concatenate([one_axis(col), one_axis(row)], axis=1)
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
    return table.astype(np.float32)


def _pos_table(dim: int, grid: int) -> torch.Tensor:
    return torch.from_numpy(sincos_pos_embed_2d_with_cls(dim, grid))[None]


# ------------------------------------------------------------------------------------------------
# timm 0.3.2 ViT pieces (same parameter names)
# ------------------------------------------------------------------------------------------------


def _layer_norm(dim: int, eps: float) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=eps)


class PatchEmbed(nn.Module):
    """timm 0.3.2 ``PatchEmbed``: Conv2d with kernel = stride = patch -> (B, L, C); no norm."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"input size {tuple(x.shape[-2:])} != model size {self.img_size}")
        tokens = self.proj(x)  # (B, C, h, w)
        return tokens.flatten(start_dim=2).transpose(1, 2)


class Mlp(nn.Module):
    """timm 0.3.2 ``Mlp`` without dropout (MAE never sets it): fc1 -> exact GELU -> fc2."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()  # approximate='none': the erf form
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """timm 0.3.2 ``Attention``: fused qkv, softmax((q k^T) * head_dim**-0.5) v, proj."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        # Output features of qkv are laid out (3, heads, head_dim): q of all heads, then k, then v.
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, heads, N, head_dim)
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # scale after the product
        weights = logits.softmax(dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class Block(nn.Module):
    """timm 0.3.2 ``Block``: ``x + drop_path(attn(norm1(x)))``, ``x + drop_path(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_path: float = 0.0, norm_eps: float = NORM_EPS):
        super().__init__()
        self.norm1 = _layer_norm(dim, norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = _layer_norm(dim, norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _config_kwargs(cls, cfg, kw) -> dict:
    """Constructor kwargs from a dict / ConfigDict (unknown fields ignored) plus overrides."""
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.update(kw)
    if "decoder_embed_dim" in d and "decoder_dim" not in d:  # official spelling
        d["decoder_dim"] = d.pop("decoder_embed_dim")
    for name in ("depth", "num_heads", "decoder_depth", "decoder_num_heads"):
        if isinstance(d.get(name), (list, tuple)):
            raise ValueError(f"MAE is a plain ViT: {name} must be an int, got {d[name]!r}")
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in d.items() if k in accepted and k != "self"}


# ------------------------------------------------------------------------------------------------
# Pretraining model
# ------------------------------------------------------------------------------------------------


class MAEPretrainTorch(nn.Module):
    """Official MAE pretraining model (``models_mae.MaskedAutoencoderViT``).

    State-dict order: cls_token, pos_embed, mask_token, decoder_pos_embed, patch_embed.*,
    blocks.*, norm.*, decoder_embed.*, decoder_blocks.*, decoder_norm.*, decoder_pred.*.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        norm_eps: float = NORM_EPS,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.decoder_dim = decoder_dim
        self.norm_pix_loss = norm_pix_loss

        # Encoder. Registration order below fixes both the state_dict and the default-init RNG.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n_tok = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps=norm_eps)
            for _ in range(depth)
        )
        self.norm = _layer_norm(embed_dim, norm_eps)

        # Decoder.
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, n_tok, decoder_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_num_heads, mlp_ratio, qkv_bias, norm_eps=norm_eps)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = _layer_norm(decoder_dim, norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)

        self.initialize_weights()

    # -- init ------------------------------------------------------------------------------------

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> int:
        return self.patch_embed.grid_size

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Official init, in the official RNG order (see the module docstring)."""
        g = self.grid_size
        self.pos_embed.copy_(_pos_table(self.embed_dim, g))
        self.decoder_pos_embed.copy_(_pos_table(self.decoder_dim, g))
        conv_w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(conv_w.view(conv_w.shape[0], -1))  # as a Linear (out, in*p*p)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_xavier)

    # -- patches and masking ---------------------------------------------------------------------

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) square images -> (N, L, p*p*C); patches row-major, each (row, col, ch)."""
        p, C = self.patch_size, self.in_chans
        N, c, H, W = imgs.shape
        if c != C or H != W or H % p:
            raise ValueError(f"patchify needs (N, {C}, H, H) with H % {p} == 0, got {imgs.shape}")
        h = H // p
        x = imgs.reshape(N, C, h, p, h, p).permute(0, 2, 4, 3, 5, 1)  # n h w p q c
        return x.reshape(N, h * h, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify`: (N, L, p*p*C) -> (N, C, H, W), L a square number."""
        p, C = self.patch_size, self.in_chans
        N, L, _ = x.shape
        h = math.isqrt(L)
        if h * h != L:
            raise ValueError(f"unpatchify needs a square number of patches, got {L}")
        x = x.reshape(N, h, h, p, p, C).permute(0, 5, 1, 3, 2, 4)  # n c h p w q
        return x.reshape(N, C, h * p, h * p)

    def random_masking(self, x: torch.Tensor, mask_ratio: float,
                       noise: torch.Tensor | None = None):
        """Per-sample masking by sorting noise: keeps the ``int(L * (1 - mask_ratio))`` tokens of
        smallest noise, in ascending-noise order.

        x: (N, L, D). noise: (N, L) or None (then ``torch.rand(N, L)``, the official draw).
        Returns ``(x_kept (N, len_keep, D), mask (N, L) in x.dtype, 1 = removed, original token
        order, ids_restore (N, L) int64)``.
        """
        N, L, D = x.shape
        len_keep = int(L * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(N, L, device=x.device)
        elif tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must be {(N, L)}, got {tuple(noise.shape)}")
        noise = noise.to(x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: smallest noise first (kept)
        ids_restore = torch.argsort(ids_shuffle, dim=1)  # inverse permutation
        ids_keep = ids_shuffle[:, :len_keep]
        x_kept = torch.gather(x, 1, ids_keep[..., None].expand(N, len_keep, D))
        # In shuffled order the first len_keep are kept (0) and the rest removed (1); undo the
        # shuffle by gathering with ids_restore.
        shuffled = (torch.arange(L, device=x.device) >= len_keep).to(x.dtype).expand(N, L)
        mask = torch.gather(shuffled, 1, ids_restore)
        return x_kept, mask, ids_restore

    # -- forward pieces --------------------------------------------------------------------------

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float,
                        noise: torch.Tensor | None = None):
        """imgs (N, C, H, W) -> (latent (N, 1 + len_keep, D) after ``norm``, cls first;
        mask (N, L); ids_restore (N, L))."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + len_keep, D), ids_restore (N, L) -> pred (N, L, p*p*C), no cls row."""
        x = self.decoder_embed(latent)
        N, n_kept, d = x.shape[0], x.shape[1] - 1, x.shape[2]
        L = ids_restore.shape[1]
        fill = self.mask_token.expand(N, L - n_kept, d)
        shuffled = torch.cat([x[:, 1:], fill], dim=1)  # kept tokens, then mask tokens
        unshuffled = torch.gather(shuffled, 1, ids_restore[..., None].expand(N, L, d))
        x = torch.cat([x[:, :1], unshuffled], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Reconstruction target (N, L, p*p*C): patches, per-patch normalised with norm_pix_loss
        (unbiased variance, as ``torch.var``'s default, plus 1e-6 under the square root)."""
        t = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = t.mean(dim=-1, keepdim=True)
            var = t.var(dim=-1, keepdim=True, unbiased=True)
            t = (t - mean) / (var + 1e-6) ** 0.5
        return t

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
        """Mean over removed patches of the per-patch mean squared error."""
        per_patch = ((pred - self.target(imgs)) ** 2).mean(dim=-1)  # (N, L)
        return (per_patch * mask).sum() / mask.sum()

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75,
                noise: torch.Tensor | None = None):
        """Returns ``(loss, pred (N, L, p*p*C), mask (N, L))``."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    @classmethod
    def from_model_config(cls, cfg, norm_pix_loss: bool = True, **kw) -> MAEPretrainTorch:
        """Build from a dict / ConfigDict with fields img_size, patch_size, in_chans, embed_dim,
        depth, num_heads, mlp_ratio, decoder_dim (or decoder_embed_dim), decoder_depth,
        decoder_num_heads; other fields are ignored, ``kw`` override."""
        return cls(**_config_kwargs(cls, cfg, dict(kw, norm_pix_loss=norm_pix_loss)))


def _init_xavier(m: nn.Module) -> None:
    # models_mae._init_weights: xavier-uniform Linear weights (fused qkv as one matrix), zero bias.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


def _init_trunc_normal(m: nn.Module) -> None:
    # timm 0.3.2 VisionTransformer._init_weights.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


# ------------------------------------------------------------------------------------------------
# Fine-tuning model
# ------------------------------------------------------------------------------------------------


class MAEFinetuneTorch(nn.Module):
    """Official MAE fine-tuning ViT (``models_vit.VisionTransformer`` on timm 0.3.2).

    State-dict order with ``global_pool`` (MAE's default): cls_token, pos_embed, patch_embed.*,
    blocks.*, head.*, fc_norm.*; without it: cls_token, pos_embed, patch_embed.*, blocks.*,
    norm.*, head.*. ``pos_embed`` is learnable (trunc-normal init; fine-tuning loads the
    pretrained sin-cos table into it).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        global_pool: bool = True,
        norm_eps: float = NORM_EPS,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        # timm VisionTransformer.__init__ order.
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n_tok = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, embed_dim))
        self.pos_drop = nn.Dropout(p=0.0)  # drop_rate is never set by MAE
        rates = [float(r) for r in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, drop_path=rates[i], norm_eps=norm_eps)
            for i in range(depth)
        )
        self.norm = _layer_norm(embed_dim, norm_eps)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_trunc_normal)
        # models_vit.VisionTransformer additions (after the timm constructor).
        self.global_pool = global_pool
        if global_pool:
            self.fc_norm = _layer_norm(embed_dim, norm_eps)
            del self.norm

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """All tokens after the blocks (N, 1 + L, D), cls first, before any norm / pooling."""
        x = self.patch_embed(imgs)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, D): ``fc_norm(mean of patch tokens)`` (global pool) or ``norm(tokens)[:, 0]``."""
        x = self.forward_tokens(imgs)
        if self.global_pool:
            return self.fc_norm(x[:, 1:].mean(dim=1))
        return self.norm(x)[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))

    @classmethod
    def from_model_config(cls, cfg, num_classes: int = 1000, global_pool: bool = True,
                          **kw) -> MAEFinetuneTorch:
        """Build from the pretraining model config (decoder fields are ignored)."""
        kw = dict(kw, num_classes=num_classes, global_pool=global_pool)
        return cls(**_config_kwargs(cls, cfg, kw))


@torch.no_grad()
def init_head_for_finetune(model: MAEFinetuneTorch) -> None:
    """What ``main_finetune.py:257`` does after loading: ``trunc_normal_(head.weight, 2e-5)``."""
    trunc_normal_(model.head.weight, std=2e-5)


# ------------------------------------------------------------------------------------------------
# Official sizes
# ------------------------------------------------------------------------------------------------

# Encoder of each official size; every pretraining model has the 512-d, 8-block, 16-head decoder.
VARIANTS: dict[str, dict] = {
    "B": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "L": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "H": dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
}
DECODER = dict(decoder_dim=512, decoder_depth=8, decoder_num_heads=16)


def _pretrain(size: str, **kw) -> MAEPretrainTorch:
    return MAEPretrainTorch(**dict(dict(img_size=224, mlp_ratio=4.0, **VARIANTS[size], **DECODER),
                                   **kw))


def _finetune(size: str, **kw) -> MAEFinetuneTorch:
    return MAEFinetuneTorch(**dict(dict(img_size=224, mlp_ratio=4.0, **VARIANTS[size]), **kw))


def mae_vit_base_patch16(**kw) -> MAEPretrainTorch:
    """``models_mae.mae_vit_base_patch16`` (dec512d8b)."""
    return _pretrain("B", **kw)


def mae_vit_large_patch16(**kw) -> MAEPretrainTorch:
    return _pretrain("L", **kw)


def mae_vit_huge_patch14(**kw) -> MAEPretrainTorch:
    return _pretrain("H", **kw)


def vit_base_patch16(**kw) -> MAEFinetuneTorch:
    """``models_vit.vit_base_patch16`` (global pool by default, as ``main_finetune.py``)."""
    return _finetune("B", **kw)


def vit_large_patch16(**kw) -> MAEFinetuneTorch:
    return _finetune("L", **kw)


def vit_huge_patch14(**kw) -> MAEFinetuneTorch:
    return _finetune("H", **kw)


def from_model_config(cfg: Mapping, finetune: bool = False, **kw):
    """Pretraining (default) or fine-tuning MAE reference model from a model config."""
    cls = MAEFinetuneTorch if finetune else MAEPretrainTorch
    return cls.from_model_config(cfg, **kw)
