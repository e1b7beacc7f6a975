"""Plain ``torch.nn`` reference of the official MixMIM / MixMAE models (Sense-X/MixMIM).

Written from the method spec (``reference/mixmim.md``), not copied from the official code. Two
models, with exactly the official ``state_dict`` layout (key names, order, shapes, dtypes):

* ``MixMIMPretrainTorch`` -- ``models_mixmim.MixMIM``: encoder, decoder, dual reconstruction loss.
* ``MixMIMFinetuneTorch``  -- ``models_mixmim_ft.MixMIM``: encoder + mean pool + linear head.

Both are generalised over the number of stages (tiny test configs): the encoder stride is
``patch_size * 2**(num_stages - 1)`` (32 for the official 4-stage models), the mixing mask lives
on the final-stage grid and reconstruction targets are ``stride x stride x in_chans`` patches.

Modules are constructed in the official order (default ``nn.Linear`` / ``nn.Conv2d`` init, then
the truncated-normal draws, then the xavier pass in module order), so a given ``torch.manual_seed``
is meant to give the same initial weights as the official classes; this is by construction and has
not been checked against the official code (which needs timm).

Uses no timm or torchvision: the few timm pieces the official code relies on (``PatchEmbed``,
``PatchMerging``, ViT ``Block``/``Attention``, ``Mlp``, ``DropPath``, ``trunc_normal_``,
``window_partition``) are re-written here with the same parameter names.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = [
    "MixMIMFinetuneTorch",
    "MixMIMPretrainTorch",
    "from_model_config",
    "make_stage_masks",
    "mixmim_base",
    "mixmim_base_384",
    "mixmim_huge",
    "mixmim_large",
    "mixmim_large_384",
    "relative_position_index",
    "sincos_pos_embed_2d",
    "trunc_normal_",
]

# Added to the logits of query/key pairs from different source images (official value for fp32
# masks; -65500 is used when the mask tensor is fp16, which the official code never hits).
_MASK_NEG = 1e30
_MASK_NEG_FP16 = 65500.0


# ------------------------------------------------------------------------------------------------
# Constants and small helpers
# ------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """Fixed 2-D sin-cos table (MAE formula), float64, shape (grid*grid, dim).

    Token (r, c) at index ``r * grid + c`` gets ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` with
    ``w_k = 10000**(-k / (dim/4))``: the column (x) fills the first half. The arithmetic follows
    the MAE code path (float32 coordinates, float64 frequencies and products) so the float32 cast
    of the result is bit-identical to the official table.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
    coords = np.arange(grid, dtype=np.float32)
    omega = np.arange(dim // 4, dtype=np.float64) / (dim / 4.0)
    omega = 1.0 / 10000**omega

    def encode(pos: np.ndarray) -> np.ndarray:
        out = np.einsum("m,d->md", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    cols = np.tile(coords, grid)  # x of token r*grid+c is c
    rows = np.repeat(coords, grid)  # y is r
    return np.concatenate([encode(cols), encode(rows)], axis=1)


def relative_position_index(window: int) -> np.ndarray:
    """Swin relative-position index for a ``window x window`` window, int64 (N, N), N = window**2.

    Query i at (yi, xi), key j at (yj, xj), both row-major in the window:
    ``(yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)``.
    """
    ys, xs = np.divmod(np.arange(window * window), window)
    dy = ys[:, None] - ys[None, :] + window - 1
    dx = xs[:, None] - xs[None, :] + window - 1
    return (dy * (2 * window - 1) + dx).astype(np.int64)


@torch.no_grad()
def trunc_normal_(
    t: torch.Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0, b: float = 2.0
) -> torch.Tensor:
    """Truncated normal by inverse CDF, bounds ``[a, b]`` in absolute units (timm semantics).

    Draws one ``uniform_`` over the tensor, the same RNG use as timm's ``trunc_normal_``.
    """

    def cdf(v: float) -> float:
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    t.uniform_(2 * lo - 1, 2 * hi - 1)
    t.erfinv_()
    t.mul_(std * math.sqrt(2.0)).add_(mean)
    return t.clamp_(min=a, max=b)


class DropPath(nn.Module):
    """Stochastic depth per sample; identity when ``p == 0`` or in eval mode."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        keep_mask = (keep + torch.rand(shape, dtype=x.dtype, device=x.device)).floor_()
        return x.div(keep) * keep_mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


def window_partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w*w, C); windows batch-major, then row, then column."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w * w, C)


def window_reverse(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (nW*B, w*w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def make_stage_masks(mask_grid, num_stages: int) -> list[torch.Tensor]:
    """Per-stage token masks from a 0/1 mask on the final-stage grid.

    ``mask_grid``: (Hf, Wf) or (B, Hf, Wf), tensor or array, 1 = token from the partner image.
    Returns ``num_stages`` float32 tensors, stage 0 first, each (1 or B, L_s, 1) row-major, made by
    nearest upsampling (factor 2 per stage, i.e. plain replication); the last is the final grid.
    """
    m = torch.as_tensor(mask_grid, dtype=torch.float32)
    if m.ndim == 2:
        m = m[None]
    if m.ndim != 3:
        raise ValueError(f"mask_grid must be (Hf, Wf) or (B, Hf, Wf), got {tuple(m.shape)}")
    out = []
    for s in range(num_stages):
        f = 2 ** (num_stages - 1 - s)
        up = m.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)
        out.append(up.reshape(up.shape[0], -1, 1).contiguous())
    return out


# ------------------------------------------------------------------------------------------------
# Building blocks (official / timm parameter names)
# ------------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Conv stem (kernel = stride = patch) -> (B, L, C) tokens -> LayerNorm (timm PatchEmbed)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.grid = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(f"input {tuple(x.shape[-2:])} != model size {self.img_size}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact erf form
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class WindowAttention(nn.Module):
    """Window self-attention with a relative position bias and the same-source mask."""

    def __init__(self, dim: int, window: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.window = window
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(
            torch.zeros((2 * window - 1) ** 2, num_heads)
        )
        index = torch.from_numpy(relative_position_index(window))
        self.register_buffer(
            "relative_position_index", index.to(self.relative_position_bias_table.device)
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        # After the Linear layers' default init: keeps the official RNG order.
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (nW*B, N, C); labels: (nW*B, N, 1) 0/1 source of each token, or None."""
        Bw, N, C = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # scale before the product (official)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        attn = attn + bias.view(N, N, -1).permute(2, 0, 1).unsqueeze(0)
        if labels is not None:
            m = labels.reshape(Bw, 1, 1, N)
            same = m * m.transpose(2, 3) + (1 - m) * (1 - m).transpose(2, 3)
            neg = _MASK_NEG_FP16 if m.dtype == torch.float16 else _MASK_NEG
            attn = attn - neg * (1 - same)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(Bw, N, C))


class MixMIMBlock(nn.Module):
    """Pre-norm window-attention block, no shift, no layer scale."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        num_heads: int,
        window: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.resolution = resolution
        # Official behaviour: a map not larger than the window is one global window.
        window = min(window, *resolution)
        if resolution[0] % window or resolution[1] % window:
            raise ValueError(f"feature map {resolution} is not divisible by window {window}")
        self.window = window
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, L, C); labels: (1 or B, L, 1) per-token source, or None (no restriction)."""
        H, W = self.resolution
        B, L, C = x.shape
        w = self.window
        h = window_partition(self.norm1(x).view(B, H, W, C), w)
        if labels is not None:
            labels = window_partition(labels.expand(B, L, 1).reshape(B, H, W, 1), w)
        h = window_reverse(self.attn(h, labels), w, H, W).reshape(B, L, C)
        x = x + self.drop_path(h)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 merge, timm channel order [(0,0), (1,0), (0,1), (1,1)] as (row, col) offsets,
    then LayerNorm(4C) and a bias-free Linear(4C -> 2C)."""

    def __init__(self, resolution: tuple[int, int], dim: int):
        super().__init__()
        self.resolution = resolution
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)  # before norm: official key order
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.resolution
        B, _, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class MixMIMLayer(nn.Module):
    """One stage: ``depth`` blocks, then (all stages but the last) patch merging."""

    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        qkv_bias: bool,
        drop_path: Sequence[float],
        downsample: bool,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            MixMIMBlock(dim, resolution, num_heads, window, mlp_ratio, qkv_bias, drop_path[i])
            for i in range(depth)
        )
        self.downsample = PatchMerging(resolution, dim) if downsample else None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x, labels)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class Attention(nn.Module):
    """timm ViT attention (decoder): full attention, scale applied after q @ k^T."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """timm ViT block (decoder): pre-norm attention + MLP, no drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def _init_weights(m: nn.Module) -> None:
    # Official init pass: xavier-uniform on every Linear (fused qkv included), zero bias;
    # LayerNorm 1/0; the stem conv keeps PyTorch's default init.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def _frozen_sincos(dim: int, grid: int) -> nn.Parameter:
    """Frozen [1, grid*grid, dim] sin-cos parameter (computed in float64, stored float32)."""
    p = nn.Parameter(torch.zeros(1, grid * grid, dim), requires_grad=False)
    with torch.no_grad():
        p.copy_(torch.from_numpy(sincos_pos_embed_2d(dim, grid)).float()[None])
    return p


class _MixMIMEncoderBase(nn.Module):
    """Shared encoder construction and forward. Subclasses decide where the frozen
    ``absolute_pos_embed`` parameter is registered (it fixes the state_dict order)."""

    def _build_encoder(
        self,
        img_size,
        patch_size,
        in_chans,
        embed_dim,
        depths,
        num_heads,
        window_sizes,
        mlp_ratio,
        qkv_bias,
        drop_path_rate,
    ) -> None:
        depths, num_heads, window_sizes = tuple(depths), tuple(num_heads), tuple(window_sizes)
        if not len(depths) == len(num_heads) == len(window_sizes):
            raise ValueError("depths, num_heads and window_sizes need one entry per stage")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_layers = len(depths)
        self.encoder_stride = patch_size * 2 ** (self.num_layers - 1)
        self.num_features = embed_dim * 2 ** (self.num_layers - 1)
        if img_size % self.encoder_stride:
            raise ValueError(f"img_size {img_size} not divisible by stride {self.encoder_stride}")
        self.patch_grid = img_size // patch_size
        self.out_grid = img_size // self.encoder_stride

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths), device="cpu")]
        self.layers = nn.ModuleList()
        for s in range(self.num_layers):
            g = self.patch_grid // 2**s
            self.layers.append(
                MixMIMLayer(
                    dim=embed_dim * 2**s,
                    resolution=(g, g),
                    depth=depths[s],
                    num_heads=num_heads[s],
                    window=window_sizes[s],
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=dpr[sum(depths[:s]) : sum(depths[: s + 1])],
                    downsample=s < self.num_layers - 1,
                )
            )
        self.norm = nn.LayerNorm(self.num_features)

    def _encode(self, x, masks, return_stages):
        """patch_embed -> mix (stage-0 mask) -> + APE -> stages (per-stage masks) -> norm."""
        x = self.patch_embed(x)
        if masks is not None:
            masks = self._check_masks(masks, x)
            x = x * (1.0 - masks[0]) + x.flip(0) * masks[0]
        x = x + self.absolute_pos_embed
        stages = [x]
        for s, layer in enumerate(self.layers):
            x = layer(x, None if masks is None else masks[s])
            stages.append(x)
        x = self.norm(x)
        return (x, stages) if return_stages else x

    def _check_masks(self, masks, x):
        if len(masks) != self.num_layers:
            raise ValueError(f"need {self.num_layers} stage masks, got {len(masks)}")
        out = []
        for s, m in enumerate(masks):
            m = torch.as_tensor(m).to(dtype=x.dtype, device=x.device)
            L = (self.patch_grid // 2**s) ** 2
            if m.ndim != 3 or m.shape[0] not in (1, x.shape[0]) or m.shape[1:] != (L, 1):
                raise ValueError(f"stage {s} mask must be (1 or B, {L}, 1), got {tuple(m.shape)}")
            out.append(m)
        return out

    @classmethod
    def from_model_config(cls, cfg, **kw):
        """Build from a dict / ConfigDict with the constructor's field names; ``kw`` override.

        Fields the class does not take (``name``, ``remat``, decoder fields for the finetune
        model, ...) are ignored; ``shift_windows=True`` is refused (MixMIM never shifts).
        """
        d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
        d.update(kw)
        if d.pop("shift_windows", False):
            raise ValueError("MixMIM has no shifted windows; shift_windows=True is not supported")
        accepted = inspect.signature(cls.__init__).parameters
        args = {
            k: (tuple(v) if isinstance(v, list) else v)
            for k, v in d.items()
            if k in accepted and k != "self"
        }
        return cls(**args)


class MixMIMPretrainTorch(_MixMIMEncoderBase):
    """Official MixMIM pretraining model (``models_mixmim.MixMIM``), generalised over stages.

    State-dict order: mask_token, absolute_pos_embed, decoder_pos_embed, patch_embed.*,
    layers.*, norm.*, decoder_embed.*, decoder_blocks.*, decoder_norm.*, decoder_pred.*.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_sizes=(14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        range_mask_ratio: float = 0.0,
    ):
        super().__init__()
        self.norm_pix_loss = norm_pix_loss
        self.range_mask_ratio = range_mask_ratio
        self.decoder_dim = decoder_dim
        self._build_encoder(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            depths,
            num_heads,
            window_sizes,
            mlp_ratio,
            qkv_bias,
            drop_path_rate,
        )
        # Registration order of the three direct parameters is the official state_dict order.
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        trunc_normal_(self.mask_token, std=0.02)
        self.absolute_pos_embed = _frozen_sincos(embed_dim, self.patch_grid)
        self.decoder_pos_embed = _frozen_sincos(decoder_dim, self.out_grid)

        self.decoder_embed = nn.Linear(self.num_features, decoder_dim)
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_num_heads, mlp_ratio) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        self.decoder_pred = nn.Linear(decoder_dim, self.encoder_stride**2 * in_chans)
        self.apply(_init_weights)

    # -- masks -----------------------------------------------------------------------------------

    def make_stage_masks(self, mask_grid) -> list[torch.Tensor]:
        """(Hf, Wf) or (B, Hf, Wf) 0/1 final-grid mask -> list of (1 or B, L_s, 1) stage masks."""
        return make_stage_masks(mask_grid, self.num_layers)

    def random_masking(self, x: torch.Tensor, mask_ratio: float) -> list[torch.Tensor]:
        """Official draw: one mask for the batch, ``int(L * r)`` ones at the first indices of
        ``argsort(torch.rand(1, 1, L))``, ``r = mask_ratio + random.uniform(0, range)``."""
        L = self.out_grid**2
        ratio = mask_ratio + random.uniform(0.0, self.range_mask_ratio)  # same Python RNG use
        noise = torch.rand(1, 1, L, device=x.device)
        idx = torch.argsort(noise, dim=2)[:, :, : int(L * ratio)]
        mask = torch.zeros(1, 1, L, device=x.device).scatter_(2, idx, 1.0)
        return self.make_stage_masks(mask.reshape(self.out_grid, self.out_grid))

    # -- forward pieces --------------------------------------------------------------------------

    def forward_encoder(
        self, x: torch.Tensor, masks: Sequence[torch.Tensor] | None, return_stages: bool = False
    ):
        """x: NCHW normalised images; masks: one (1 or B, L_s, 1) mask per stage (1 = token from
        the partner ``x.flip(0)``), or None for no mixing. Returns the final-norm tokens
        (B, L, C); with ``return_stages`` also [after patch embed+mix+APE, stage outputs...]."""
        return self._encode(x, masks, return_stages)

    def forward_decoder(self, z: torch.Tensor, mask_last: torch.Tensor) -> torch.Tensor:
        """z: (B, L, C) encoder output; mask_last: (1 or B, L, 1). Returns x_rec (2B, L, P)."""
        x = self.decoder_embed(z)
        m = mask_last.to(dtype=x.dtype, device=x.device)
        tok = self.mask_token.expand_as(x)
        x1 = x * (1 - m) + tok * m  # branch 1: own tokens kept, m = 1 cells to predict
        x2 = x * m + tok * (1 - m)  # branch 2: partner tokens kept, m = 0 cells to predict
        x = torch.cat([x1, x2], dim=0) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, L, p*p*C), p = encoder stride, flattened (row, col, channel)."""
        p = self.encoder_stride
        N, C, H, W = imgs.shape
        x = imgs.reshape(N, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`patchify` for a square grid."""
        p, C = self.encoder_stride, self.in_chans
        h = self.out_grid
        x = x.reshape(x.shape[0], h, h, p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, h * p, h * p)

    def _target(self, imgs: torch.Tensor) -> torch.Tensor:
        t = self.patchify(imgs)
        if self.norm_pix_loss:  # unbiased (N-1) variance, as torch.var's default
            t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
        return t

    def _branch_errors(self, imgs, x_rec, mask_last):
        B = x_rec.shape[0] // 2
        m = mask_last.to(dtype=x_rec.dtype, device=x_rec.device)
        target = self._target(imgs)
        err1 = (x_rec[:B] - target) ** 2  # image i from branch 1 (valid where m = 1)
        err2 = (x_rec[B:].flip(0) - target) ** 2  # image i from branch 2 of row B-1-i (m = 0)
        return err1, err2, m

    def forward_loss(
        self, imgs: torch.Tensor, x_rec: torch.Tensor, mask_last: torch.Tensor
    ) -> torch.Tensor:
        """Official loss: stitch ``rec1[i]*m + rec2[B-1-i]*(1-m)``, mean squared error against the
        (norm-pix) target over every element."""
        B = x_rec.shape[0] // 2
        m = mask_last.to(dtype=x_rec.dtype, device=x_rec.device)
        pred = x_rec[:B] * m + x_rec[B:].flip(0) * (1 - m)
        return ((pred - self._target(imgs)) ** 2).mean()

    def branch_losses(
        self, imgs: torch.Tensor, x_rec: torch.Tensor, mask_last: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss_branch1, loss_branch2): the MSE over the patches each branch predicts.

        Branch 1 predicts image i at its m = 1 patches, branch 2 (row B-1-i) at its m = 0 patches;
        each loss is averaged over its own patches (all values of those patches), 0 when a branch
        predicts nothing. With n1 / n2 patch counts, ``(n1*l1 + n2*l2) / (n1 + n2)`` equals
        :meth:`forward_loss`. Not part of the official code (diagnostic only).
        """
        err1, err2, m = self._branch_errors(imgs, x_rec, mask_last)
        m = m.expand(err1.shape[0], -1, -1)[..., 0]  # (B, L)
        e1, e2 = err1.mean(-1), err2.mean(-1)
        l1 = (e1 * m).sum() / m.sum().clamp_min(1)
        l2 = (e2 * (1 - m)).sum() / (1 - m).sum().clamp_min(1)
        return l1, l2

    def forward(self, x: torch.Tensor, mask_ratio: float = 0.5):
        """Draw a mask like the official code; returns (loss, x_rec, mask_last (1, L, 1))."""
        masks = self.random_masking(x, mask_ratio)
        z = self.forward_encoder(x, masks)
        x_rec = self.forward_decoder(z, masks[-1])
        return self.forward_loss(x, x_rec, masks[-1]), x_rec, masks[-1]


class MixMIMFinetuneTorch(_MixMIMEncoderBase):
    """Official MixMIM finetuning model (``models_mixmim_ft.MixMIM``): encoder, final norm,
    mean over tokens, ``head``. State-dict order: absolute_pos_embed, patch_embed.*, layers.*,
    norm.*, head.*."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 128,
        depths=(2, 2, 18, 2),
        num_heads=(4, 8, 16, 32),
        window_sizes=(14, 14, 14, 7),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        num_classes: int = 1000,
    ):
        super().__init__()
        self.num_classes = num_classes
        self._build_encoder(
            img_size,
            patch_size,
            in_chans,
            embed_dim,
            depths,
            num_heads,
            window_sizes,
            mlp_ratio,
            qkv_bias,
            drop_path_rate,
        )
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.absolute_pos_embed = _frozen_sincos(embed_dim, self.patch_grid)
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor, return_stages: bool = False):
        """Final-norm tokens (B, L, C); with ``return_stages`` also the per-stage activations
        (same list as :meth:`MixMIMPretrainTorch.forward_encoder`)."""
        return self._encode(x, None, return_stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean(dim=1))


# ------------------------------------------------------------------------------------------------
# Factories (official sizes)
# ------------------------------------------------------------------------------------------------

_SIZES = {
    "base": {"embed_dim": 128, "num_heads": (4, 8, 16, 32)},
    "large": {"embed_dim": 192, "num_heads": (6, 12, 24, 48)},
    "huge": {"embed_dim": 352, "num_heads": (11, 22, 44, 88)},
}
_WINDOWS = {224: (14, 14, 14, 7), 384: (16, 16, 24, 12)}


def _build(size: str, img_size: int, finetune: bool, **kw):
    args = dict(
        img_size=img_size,
        patch_size=4,
        depths=(2, 2, 18, 2),
        window_sizes=_WINDOWS[img_size],
        **_SIZES[size],
    )
    args.update(kw)
    return (MixMIMFinetuneTorch if finetune else MixMIMPretrainTorch)(**args)


def mixmim_base(finetune: bool = False, **kw):
    """MixMIM-B at 224: pretraining model, or the finetuning model with ``finetune=True``."""
    return _build("base", 224, finetune, **kw)


def mixmim_large(finetune: bool = False, **kw):
    return _build("large", 224, finetune, **kw)


def mixmim_huge(finetune: bool = False, **kw):
    return _build("huge", 224, finetune, **kw)


def mixmim_base_384(**kw):
    """Finetuning model at 384 (windows 16/16/24/12); the official repo has no 384 pretraining."""
    return _build("base", 384, True, **kw)


def mixmim_large_384(**kw):
    return _build("large", 384, True, **kw)


def from_model_config(cfg: Mapping, finetune: bool = False, **kw):
    """Pretraining (default) or finetuning reference model from a model config dict."""
    cls = MixMIMFinetuneTorch if finetune else MixMIMPretrainTorch
    return cls.from_model_config(cfg, **kw)
