"""Plain ``torch.nn`` reference of the official SimMIM Swin models (microsoft/SimMIM).

Written for the parity tests of the JAX port, from a reading of the official repository at commit
``d3e29bcac950b83edc34ca33fe4404f38309052c`` (2022-09-29); nothing is copied from it. Uses no timm
or torchvision: the timm helpers the official code imports (``DropPath``, ``to_2tuple``,
``trunc_normal_``) are replaced by the project's own equivalents in :mod:`references.mixmim`.

Models (exact official ``state_dict`` layout: names, order, shapes, dtypes):

* :class:`SwinTransformerTorch` -- ``models/swin_transformer.py::SwinTransformer``.
* :class:`SwinForSimMIMTorch`   -- ``models/simmim.py::SwinTransformerForSimMIM`` (encoder).
* :class:`SimMIMPretrainTorch`  -- ``models/simmim.py::SimMIM(encoder, encoder_stride)``.
* :class:`SimMIMFinetuneTorch`  -- the ``SwinTransformer`` classifier ``main_finetune.py`` trains.
* :func:`make_mask` / :func:`upsample_mask` -- ``data/data_simmim.py::MaskGenerator``.

Official facts relied on (file:line at the commit above)
--------------------------------------------------------
``models/swin_transformer.py``

* 15-31  ``Mlp``: fc1, GELU (exact erf), dropout, fc2, dropout.
* 34-63  ``window_partition`` / ``window_reverse``: windows batch-major, then window row, column.
* 87     attention scale ``qk_scale or head_dim ** -0.5``; 124-125 applied to q before ``q @ k^T``.
* 90-91  ``relative_position_bias_table`` zeros ((2Wh-1)(2Ww-1), nH); 111 trunc-normal std .02,
  drawn after ``qkv`` (106) and ``proj`` (108) are built.
* 94-104 ``relative_position_index`` = (dy + Wh-1) * (2Ww-1) + (dx + Ww-1), dy = y_query - y_key,
  a registered (persistent, int64) buffer; 127-130 bias added as (1, nH, N, N).
* 132-136 shifted-window mask added as ``attn.view(B_/nW, nW, nH, N, N) + mask[None, :, None]``.
* 193-197 block clamp: if ``min(input_resolution) <= window_size`` then window = min(resolution)
  and shift = 0; asserts ``0 <= shift < window``.
* 209-232 ``attn_mask``: region ids 0..8 from the row/column slices ``[0, -ws)``, ``[-ws, -s)``,
  ``[-s, H)`` on the (already rolled) map, partitioned into windows; pairs with different ids get
  -100.0, else 0.0; built in the default dtype (float32). ``register_buffer("attn_mask", ...)`` is
  called in both cases, so shifted blocks carry ``...blocks.i.attn_mask`` (nW, N, N) in the
  state_dict -- listed *before* the block's ``norm1`` (own buffers precede children) -- while
  unshifted blocks register ``None``, which the state_dict omits.
* 234-271 block forward: pre-norm, ``torch.roll`` by (-s, -s) on dims (1, 2), window attention,
  reverse, roll back by (+s, +s), residual + drop path, then pre-norm MLP + drop path.
* 305-306 ``PatchMerging`` registers ``reduction`` (Linear(4C, 2C, bias=False)) before
  ``norm`` (LayerNorm(4C)); 319-327 concat order x0 = [0::2, 0::2], x1 = [1::2, 0::2],
  x2 = [0::2, 1::2], x3 = [1::2, 1::2] (row, col), then norm, then reduction.
* 375     shift = 0 for even block index, ``window_size // 2`` for odd; 379 per-block drop path;
  204 ``DropPath`` only when > 0, else ``nn.Identity``.
* 435-439 ``PatchEmbed``: Conv2d(k = s = patch) -> flatten -> (B, L, C) -> LayerNorm if
  ``patch_norm``.
* 502 ``num_features = embed_dim * 2**(num_layers-1)``; 514-516 ``absolute_pos_embed``
  (1, L, C) trunc-normal .02 only when ``ape``; 518 ``pos_drop``; 521 drop path
  ``linspace(0, drop_path_rate, sum(depths))``; 524-539 stages, one window size for all;
  541-543 ``norm``, ``avgpool`` (AdaptiveAvgPool1d), ``head`` (Identity when num_classes == 0);
  545-554 init pass: trunc-normal .02 on every Linear weight, zero biases, LayerNorm 1/0 (the
  conv stem keeps PyTorch's default init); 564-581 classifier forward: norm -> mean over tokens
  -> head. LayerNorm eps is the PyTorch default 1e-5 throughout.

``models/simmim.py``

* 19-26  ``SwinTransformerForSimMIM``: asserts num_classes == 0; ``mask_token`` (1, 1, embed_dim)
  zeros then trunc-normal std .02, registered after the Swin init pass.
* 28-50  encoder forward: patch embed; ``w = mask.flatten(1).unsqueeze(-1).type_as(token)``;
  ``x = x * (1 - w) + mask_token * w``; + APE if any; pos_drop; layers; norm; (B, L, C) ->
  transpose -> (B, C, H, W) with H = W = int(L ** 0.5).
* 104-109 decoder ``Sequential(Conv2d(num_features, encoder_stride**2 * 3, 1),
  PixelShuffle(encoder_stride))`` -- 3 output channels hard-coded.
* 111-112 ``in_chans`` and ``patch_size`` taken from the encoder.
* 114-121 forward: mask repeated ``patch_size`` times on dims 1 and 2, ``unsqueeze(1)``;
  ``l1_loss(x, x_rec, reduction='none')``; ``loss = (l1 * mask).sum() / (mask.sum() + 1e-5) /
  in_chans``. The mask is used as given: the data loader yields int64 (``dtype=int`` in
  ``data_simmim.py:39``), so ``mask.sum() + 1e-5`` is then a float32 (torch default dtype) value.
* 143, 156 ``build_simmim`` for Swin: ``num_classes=0``, ``encoder_stride=32``.

``data/data_simmim.py``

* 21-45  ``MaskGenerator``: rand_size = input // mask_patch; scale = mask_patch // model_patch;
  token_count = rand_size**2; mask_count = ``int(np.ceil(token_count * mask_ratio))``;
  ``np.random.permutation(token_count)[:mask_count]`` set to 1 in an int array, reshape
  (rand_size, rand_size), ``repeat(scale)`` on axis 0 then axis 1 -> token-level mask.

Generalisation: the stride is ``patch_size * 2**(num_stages - 1)`` (32 for the official 4-stage
models, where ``build_simmim`` hard-codes 32), and ``window_sizes`` may give one window per stage
(the official code has a single ``WINDOW_SIZE``; the official configs are the all-equal case).

State-dict layout (pretraining; ``[...]`` present only when the condition holds)::

    [encoder.absolute_pos_embed]                         (ape)
    encoder.mask_token                                   (1, 1, C)
    encoder.patch_embed.proj.{weight,bias}
    [encoder.patch_embed.norm.{weight,bias}]             (patch_norm)
    encoder.layers.{s}.blocks.{i}.[attn_mask]            (shifted blocks: (nW, N, N))
    encoder.layers.{s}.blocks.{i}.norm1.{weight,bias}
    encoder.layers.{s}.blocks.{i}.attn.relative_position_bias_table
    encoder.layers.{s}.blocks.{i}.attn.relative_position_index
    encoder.layers.{s}.blocks.{i}.attn.{qkv,proj}.{weight,bias}
    encoder.layers.{s}.blocks.{i}.norm2.{weight,bias}
    encoder.layers.{s}.blocks.{i}.mlp.{fc1,fc2}.{weight,bias}
    encoder.layers.{s}.downsample.reduction.weight       (all stages but the last)
    encoder.layers.{s}.downsample.norm.{weight,bias}
    encoder.norm.{weight,bias}
    decoder.0.{weight,bias}                              (stride**2 * 3, C_last, 1, 1)

The finetuning classifier has the same keys without the ``encoder.`` prefix and without
``mask_token``, followed by ``head.{weight,bias}`` instead of the decoder.

Construction follows the official module order (default Linear/Conv init, the truncated-normal
draws, the init pass, then ``mask_token`` and the decoder), so a given ``torch.manual_seed`` is
meant to reproduce the official initial weights; that is by construction, not checked against
the official code (which needs timm).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .mixmim import (
    DropPath,
    relative_position_index,
    trunc_normal_,
    window_partition,
    window_reverse,
)

__all__ = [
    "MASK_NEG",
    "SimMIMFinetuneTorch",
    "SimMIMPretrainTorch",
    "SwinForSimMIMTorch",
    "SwinTransformerTorch",
    "make_mask",
    "shifted_window_mask",
    "simmim_swin_base",
    "simmim_swin_large",
    "upsample_mask",
]

# Logit offset for query/key pairs from different regions of a shifted window (official value).
MASK_NEG = -100.0
# Added to the mask pixel count in the loss denominator (official value).
LOSS_EPS = 1e-5


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------


def upsample_mask(mask, scale: int):
    """Nearest upsampling of a 0/1 mask by ``scale`` on its last two axes (numpy or torch).

    ``(..., h, w) -> (..., h*scale, w*scale)``: every cell becomes a ``scale x scale`` block, as
    ``np.repeat`` / ``Tensor.repeat_interleave`` along rows then columns. The dtype is kept.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    if isinstance(mask, torch.Tensor):
        return mask.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)
    mask = np.asarray(mask)
    return np.repeat(np.repeat(mask, scale, axis=-2), scale, axis=-1)


def _permutation(rng, n: int) -> np.ndarray:
    if rng is None:  # the global NumPy RNG, exactly what the official generator draws from
        return np.random.permutation(n)
    if isinstance(rng, (int, np.integer)):  # same stream as np.random.seed(rng)
        return np.random.RandomState(int(rng)).permutation(n)
    if isinstance(rng, (np.random.Generator, np.random.RandomState)):
        return rng.permutation(n)
    if isinstance(rng, torch.Generator):
        return torch.randperm(n, generator=rng).numpy()
    raise TypeError(f"unsupported RNG {type(rng).__name__}")


def make_mask(
    rng_or_generator=None,
    input_size: int = 192,
    mask_patch_size: int = 32,
    model_patch_size: int = 4,
    mask_ratio: float = 0.6,
) -> np.ndarray:
    """One token-level SimMIM mask, as ``data_simmim.MaskGenerator()`` returns it.

    ``rng_or_generator``: None (global ``np.random``: bit-identical to the official call after
    ``np.random.seed``), an int seed (a fresh ``RandomState``, the same stream), a NumPy
    ``Generator`` / ``RandomState``, or a ``torch.Generator``. Returns an int64 array of shape
    ``(input/model_patch, input/model_patch)``, 1 = masked: ``ceil(token_count * mask_ratio)``
    mask patches of ``mask_patch x mask_patch`` pixels, each ``scale x scale`` tokens.
    """
    if input_size % mask_patch_size or mask_patch_size % model_patch_size:
        raise ValueError(
            f"need input_size % mask_patch_size == 0 and mask_patch_size % model_patch_size == 0,"
            f" got {input_size}, {mask_patch_size}, {model_patch_size}"
        )
    rand_size = input_size // mask_patch_size
    scale = mask_patch_size // model_patch_size
    token_count = rand_size**2
    mask_count = int(np.ceil(token_count * mask_ratio))
    chosen = _permutation(rng_or_generator, token_count)[:mask_count]
    flat = np.zeros(token_count, dtype=np.int64)
    flat[chosen] = 1
    return upsample_mask(flat.reshape(rand_size, rand_size), scale)


def shifted_window_mask(
    resolution: tuple[int, int], window: int, shift: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """The official ``attn_mask`` (nW, window**2, window**2) of a shifted-window block.

    On the rolled map, rows (and columns) fall in three bands ``[0, H-ws)``, ``[H-ws, H-s)``,
    ``[H-s, H)``; a token's region is (row band, column band). Pairs of tokens of one window in
    different regions get ``MASK_NEG``, others 0. ``dtype`` defaults to torch's default dtype.
    """
    H, W = resolution

    def bands(n: int) -> np.ndarray:
        idx = np.arange(n)
        return (idx >= n - window).astype(np.int64) + (idx >= n - shift).astype(np.int64)

    region = bands(H)[:, None] * 3 + bands(W)[None, :]  # (H, W) ids in 0..8
    r = torch.from_numpy(region).reshape(1, H, W, 1)
    r = window_partition(r, window)[..., 0]  # (nW, N)
    differ = r[:, None, :] != r[:, :, None]
    out = torch.zeros(differ.shape, dtype=dtype or torch.get_default_dtype(), device="cpu")
    return out.masked_fill_(differ, MASK_NEG)


# ------------------------------------------------------------------------------------------------
# Swin building blocks (official parameter / buffer names)
# ------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv stem (kernel = stride = patch) -> (B, L, C) tokens -> optional LayerNorm."""

    def __init__(
        self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, patch_norm: bool
    ):
        super().__init__()
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input {tuple(x.shape[-2:])} != model size {self.img_size}")
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x if self.norm is None else self.norm(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Window self-attention with a relative position bias and an optional additive mask."""

    def __init__(
        self,
        dim: int,
        window: int,
        num_heads: int,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.window = window
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5  # official `or`: 0/None -> default
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        index = torch.from_numpy(relative_position_index(window))
        self.register_buffer(
            "relative_position_index", index.to(self.relative_position_bias_table.device)
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)  # after qkv/proj: RNG order

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (nW*B, N, C) windows (batch-major); mask: (nW, N, N) additive, or None."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, self.num_heads).permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(Bw // nW, nW, self.num_heads, N, N) + mask[None, :, None]
            attn = attn.view(Bw, self.num_heads, N, N)
        attn = self.attn_drop(attn.softmax(dim=-1))
        return self.proj_drop(self.proj((attn @ v).transpose(1, 2).reshape(Bw, N, C)))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention block, official clamp and ``attn_mask`` buffer."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window: int,
        shift: int = 0,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.resolution = tuple(resolution)
        self.num_heads = num_heads
        if min(self.resolution) <= window:  # the map is one window: no partition, no shift
            window, shift = min(self.resolution), 0
        if not 0 <= shift < window:
            raise ValueError(f"shift must be in [0, window), got {shift} for window {window}")
        if self.resolution[0] % window or self.resolution[1] % window:
            raise ValueError(f"feature map {self.resolution} is not divisible by window {window}")
        self.window = window
        self.shift = shift

        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        mask = None
        if shift > 0:
            mask = shifted_window_mask(self.resolution, window, shift).to(self.norm1.weight.device)
        self.register_buffer("attn_mask", mask)  # None is registered too, and not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        if L != H * W:
            raise ValueError(f"expected {H * W} tokens, got {L}")
        w, s = self.window, self.shift
        h = self.norm1(x).view(B, H, W, C)
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
        h = window_reverse(self.attn(window_partition(h, w), self.attn_mask), w, H, W)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(h.reshape(B, L, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 merge: channels [(0,0), (1,0), (0,1), (1,1)] as (row, col) offsets, LayerNorm(4C),
    bias-free Linear(4C -> 2C). ``reduction`` is registered first (official key order)."""

    def __init__(self, resolution: tuple[int, int], dim: int):
        super().__init__()
        H, W = resolution
        if H % 2 or W % 2:
            raise ValueError(f"patch merging needs an even map, got {resolution}")
        self.resolution = (H, W)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        parts = [x[:, dr::2, dc::2] for dc in (0, 1) for dr in (0, 1)]  # column offset outer
        x = torch.cat(parts, dim=-1).view(B, (H // 2) * (W // 2), 4 * C)
        return self.reduction(self.norm(x))


class BasicLayer(nn.Module):
    """One stage: ``depth`` blocks (odd ones shifted by ``window // 2``), optional merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        qk_scale: float | None,
        drop: float,
        attn_drop: float,
        drop_path: Sequence[float],
        downsample: bool,
    ):
        super().__init__()
        self.dim = dim
        self.resolution = tuple(resolution)
        self.blocks = nn.ModuleList(
            SwinTransformerBlock(
                dim,
                resolution,
                num_heads,
                window,
                shift=0 if i % 2 == 0 else window // 2,
                mlp_ratio=mlp_ratio,
                qkv_bias=qkv_bias,
                qk_scale=qk_scale,
                drop=drop,
                attn_drop=attn_drop,
                drop_path=drop_path[i],
            )
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


def _init_weights(m: nn.Module) -> None:
    # Official init pass: trunc-normal(.02) Linear weights, zero biases, LayerNorm 1 / 0.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _per_stage(value, n: int, name: str) -> tuple:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs one entry per stage ({n}), got {value}")
    return value


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


class SwinTransformerTorch(nn.Module):
    """The official Swin Transformer of the SimMIM repository (``SwinTransformer``).

    ``window_sizes``: an int (the official single ``window_size``) or one entry per stage.
    State-dict order: [absolute_pos_embed], patch_embed.*, layers.*, norm.*, [head.*].
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_sizes=7,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
        ape: bool = False,
        patch_norm: bool = True,
    ):
        super().__init__()
        depths = tuple(depths)
        self.num_layers = len(depths)
        num_heads = _per_stage(num_heads, self.num_layers, "num_heads")
        window_sizes = _per_stage(window_sizes, self.num_layers, "window_sizes")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.depths = depths
        self.window_sizes = window_sizes
        self.ape = ape
        self.patch_norm = patch_norm
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.mlp_ratio = mlp_ratio
        self.stride = patch_size * 2 ** (self.num_layers - 1)
        if img_size % self.stride:
            raise ValueError(f"img_size {img_size} not divisible by the stride {self.stride}")
        self.patch_grid = img_size // patch_size
        self.out_grid = img_size // self.stride

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, patch_norm)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, self.patch_grid**2, embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(drop_rate)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for s in range(self.num_layers):
            g = self.patch_grid // 2**s
            start = sum(depths[:s])
            self.layers.append(
                BasicLayer(
                    dim=embed_dim * 2**s,
                    resolution=(g, g),
                    depth=depths[s],
                    num_heads=num_heads[s],
                    window=window_sizes[s],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    qk_scale=qk_scale,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[start : start + depths[s]],
                    downsample=s < self.num_layers - 1,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    def _run(self, x: torch.Tensor, return_stages: bool):
        """Tokens after patch embed (+ mask, in subclasses) -> + APE -> stages -> final norm."""
        if self.absolute_pos_embed is not None:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        stages = [x]
        for layer in self.layers:
            x = layer(x)
            stages.append(x)
        x = self.norm(x)
        return (x, stages) if return_stages else x

    def forward_tokens(self, x: torch.Tensor, return_stages: bool = False):
        """Final-norm tokens (B, L, C); with ``return_stages`` also [input to stage 0 (after
        patch embed and APE), output of each stage (after its merging)]."""
        return self._run(self.patch_embed(x), return_stages)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled (B, C): final norm, then the mean over tokens (``avgpool``)."""
        return torch.flatten(self.avgpool(self.forward_tokens(x).transpose(1, 2)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    @classmethod
    def _kwargs_from_config(cls, cfg) -> dict:
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        if "shift_windows" in d and not d["shift_windows"]:
            raise ValueError("the SimMIM Swin always shifts odd blocks; shift_windows=False given")
        windows = d.get("window_sizes", d.get("window_size"))
        if windows is None:
            raise ValueError("config needs window_sizes (or window_size)")
        kw = dict(
            img_size=d["img_size"],
            patch_size=d["patch_size"],
            in_chans=d.get("in_chans", 3),
            embed_dim=d["embed_dim"],
            depths=tuple(d["depths"]),
            num_heads=tuple(d["num_heads"]),
            window_sizes=windows if isinstance(windows, int) else tuple(windows),
            mlp_ratio=d.get("mlp_ratio", 4.0),
            qkv_bias=d.get("qkv_bias", True),
            qk_scale=d.get("qk_scale"),
            drop_rate=d.get("drop_rate", 0.0),
            attn_drop_rate=d.get("attn_drop_rate", 0.0),
            drop_path_rate=d.get("drop_path_rate", 0.0),
            ape=d.get("ape", False) not in (False, None, "none"),  # mixmae-jax writes "none"
            patch_norm=bool(d.get("patch_norm", True)),
        )
        return kw


class SimMIMFinetuneTorch(SwinTransformerTorch):
    """The Swin classifier SimMIM finetunes (``build_swin``): encoder, ``norm``, ``avgpool``,
    ``head``. Same constructor as :class:`SwinTransformerTorch`."""

    @classmethod
    def from_model_config(cls, cfg: Mapping, num_classes: int = 1000, **kw):
        """From a dict / ConfigDict (img_size, patch_size, in_chans, embed_dim, depths,
        num_heads, window_sizes, mlp_ratio, qkv_bias, [ape, patch_norm, drop_path_rate, qk_scale,
        drop_rate, attn_drop_rate]); other fields are ignored, ``kw`` override."""
        args = cls._kwargs_from_config(cfg)
        args.update(kw)
        return cls(num_classes=num_classes, **args)


class SwinForSimMIMTorch(SwinTransformerTorch):
    """``SwinTransformerForSimMIM``: the Swin with ``num_classes=0`` and a ``mask_token``."""

    def __init__(self, **kw):
        kw.setdefault("num_classes", 0)
        if kw["num_classes"] != 0:
            raise ValueError("the SimMIM encoder has no head (num_classes must be 0)")
        super().__init__(**kw)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        trunc_normal_(self.mask_token, mean=0.0, std=0.02)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, return_stages: bool = False):
        """x: (B, C_in, H, W); mask: (B, H/p, W/p) or (B, L) token mask, 1 = masked (any dtype).

        Returns the final-norm map (B, C, H/stride, W/stride); with ``return_stages`` also the
        per-stage token list of :meth:`forward_tokens` (entry 0 is after masking and APE).
        """
        x = self.patch_embed(x)
        B, L, _ = x.shape
        if mask is None or mask.shape[0] != B or mask[0].numel() != L:
            shape = None if mask is None else tuple(mask.shape)
            raise ValueError(f"mask must hold {L} tokens per image for batch {B}, got {shape}")
        tokens = self.mask_token.expand(B, L, -1)
        w = mask.flatten(1).unsqueeze(-1).type_as(tokens)
        x = x * (1.0 - w) + tokens * w
        out = self._run(x, return_stages)
        z, stages = out if return_stages else (out, None)
        B, L, C = z.shape
        side = int(L**0.5)
        z = z.transpose(1, 2).reshape(B, C, side, side)
        return (z, stages) if return_stages else z


class SimMIMPretrainTorch(nn.Module):
    """Official ``SimMIM(encoder=SwinTransformerForSimMIM(...), encoder_stride)``.

    ``encoder`` (:class:`SwinForSimMIMTorch`) + ``decoder`` (1x1 conv to ``stride**2 * 3``
    channels, ``PixelShuffle(stride)``) + the masked L1 loss. Constructor arguments are those of
    :class:`SwinTransformerTorch` without ``num_classes`` (defaults: Swin-B/192/w6, no drop path).
    """

    def __init__(
        self,
        img_size: int = 192,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths: Sequence[int] = (2, 2, 18, 2),
        num_heads: Sequence[int] = (4, 8, 16, 32),
        window_sizes=6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        ape: bool = False,
        patch_norm: bool = True,
    ):
        super().__init__()
        self.encoder = SwinForSimMIMTorch(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            embed_dim=embed_dim,
            depths=depths,
            num_heads=num_heads,
            window_sizes=window_sizes,
            mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias,
            qk_scale=qk_scale,
            drop_rate=drop_rate,
            attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate,
            ape=ape,
            patch_norm=patch_norm,
        )
        self.encoder_stride = self.encoder.stride  # 32 for 4 stages (official hard-coded value)
        self.decoder = nn.Sequential(
            nn.Conv2d(self.encoder.num_features, self.encoder_stride**2 * 3, kernel_size=1),
            nn.PixelShuffle(self.encoder_stride),
        )
        self.in_chans = self.encoder.in_chans
        self.patch_size = self.encoder.patch_size

    @classmethod
    def from_model_config(cls, cfg: Mapping, **kw):
        """From a dict / ConfigDict (fields as :meth:`SimMIMFinetuneTorch.from_model_config`);
        ``kw`` override."""
        args = SwinTransformerTorch._kwargs_from_config(cfg)
        args.update(kw)
        return cls(**args)

    def forward_encoder(self, x: torch.Tensor, mask: torch.Tensor, return_stages: bool = False):
        """(B, C, H/stride, W/stride) feature map; see :meth:`SwinForSimMIMTorch.forward`."""
        return self.encoder(x, mask, return_stages)

    def forward_decoder(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> x_rec (B, 3, h*stride, w*stride)."""
        return self.decoder(z)

    def upsample_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, H/p, W/p) token mask -> (B, 1, H, W) pixel mask, dtype kept (official)."""
        if mask.ndim != 3:
            raise ValueError(f"mask must be (B, H/p, W/p), got {tuple(mask.shape)}")
        return upsample_mask(mask, self.patch_size).unsqueeze(1).contiguous()

    def forward_loss(self, x: torch.Tensor, x_rec: torch.Tensor, mask: torch.Tensor):
        """Official loss: ``sum(|x - x_rec| * m) / (sum(m) + 1e-5) / in_chans``, m the pixel mask.

        The mask is used in the dtype given, as the official code does: with the loader's int64
        mask, ``sum(m) + 1e-5`` is a float32 (torch default dtype) scalar; pass a float64 mask
        for an all-float64 loss.
        """
        if x.shape != x_rec.shape:
            raise ValueError(f"x {tuple(x.shape)} and x_rec {tuple(x_rec.shape)} differ")
        m = self.upsample_mask(torch.as_tensor(mask, device=x.device))
        recon = (x - x_rec).abs()  # F.l1_loss(x, x_rec, reduction="none")
        return (recon * m).sum() / (m.sum() + LOSS_EPS) / self.in_chans

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) normalised images; mask: (B, H/p, W/p), 1 = masked. Returns the loss."""
        mask = torch.as_tensor(mask, device=x.device)
        x_rec = self.forward_decoder(self.forward_encoder(x, mask))
        return self.forward_loss(x, x_rec, mask)


# ------------------------------------------------------------------------------------------------
# Factories (the official SimMIM pretraining configs)
# ------------------------------------------------------------------------------------------------

_SIZES = {
    # configs/swin_base__*/simmim_pretrain__swin_base__img192_window6__*.yaml
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_sizes=6),
    # configs/swin_large__800ep/simmim_pretrain__swin_large__img192_window12__800ep.yaml
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_sizes=12),
}


def _factory(size: str, finetune: bool, **kw):
    args = dict(img_size=192, patch_size=4, in_chans=3, **_SIZES[size])
    args.update(kw)
    if finetune:
        args.setdefault("num_classes", 1000)
        return SimMIMFinetuneTorch(**args)
    return SimMIMPretrainTorch(**args)


def simmim_swin_base(finetune: bool = False, **kw):
    """Swin-B, 192 px, window 6: the pretraining model, or the classifier with ``finetune``
    (note the finetune constructor's drop-path default is the official 0.1)."""
    return _factory("base", finetune, **kw)


def simmim_swin_large(finetune: bool = False, **kw):
    """Swin-L, 192 px, window 12 (stage 2 clamps to 12 unshifted, stage 3 to 6)."""
    return _factory("large", finetune, **kw)
