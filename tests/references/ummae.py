"""Plain ``torch.nn`` reference of the official UM-MAE models (implus/UM-MAE).

Written from the method spec (``reference/ummae_mixedae.md`` section 1) and a reading of the
official code, not copied from it. Every model has exactly the official ``state_dict`` (key names,
order, shapes, dtypes) and the official numerics; modules are created in the official order and
initialised the official way, so a given ``torch.manual_seed`` gives the official initial weights.

* ``UMSwinPretrainTorch``  -- ``models_mae_swin.MaskedAutoencoderSwin`` (UM-MAE's own Swin).
* ``UMSwinFinetuneTorch``  -- ``models_swin.Swin``.
* ``UMPVTPretrainTorch``   -- ``models_mae_pvt.MaskedAutoencoderPVT`` (UM-MAE's own PVT).
* ``UMPVTFinetuneTorch``   -- ``models_pvt.PVT``.
* ``UMViTPretrainTorch``   -- ``models_mae.MaskedAutoencoderViT`` of UM-MAE (MAE + secondary mask).
* ``SimMIMUMSwinTorch``    -- ``models_simmim_swin.SimMIMSwin`` (the repo's SimMIM baseline).
* ``SimMIMPVTTorch``       -- ``models_simmim_pvt.SimMIMPVT``.

No timm, torchvision or einops. The timm 0.3.2 ViT ``Block`` / ``Mlp`` / ``PatchEmbed`` come from
``references.mae`` (same parameter names and numerics); ``DropPath`` from ``references.mixmim``.

Differences from the official classes (interface only, never numerics)
----------------------------------------------------------------------
* The secondary-mask (SM) selection is an input: ``forward(imgs, mask, vis_mask)`` with ``vis_mask``
  (N, L) bool, 1 = a kept unit replaced by ``vis_mask_token``. The official ``forward_encoder``
  draws it from ``torch.rand``; :func:`secondary_mask` / :func:`secondary_mask_vit` reproduce those
  draws given the noise. ``forward`` returns ``(loss, pred)`` (the official also returns ``mask``).
* ``decoder_pos_order="true"`` (Swin / PVT pretraining) pairs every kept latent with the decoder
  position embedding of its own unit; the default ``"official"`` reproduces the official pairing.
* ``in_chans`` is honoured by ``patchify`` (the official code hard-codes 3 channels).
* The official ``pos_hw`` / ``kernel`` attributes are float32 plain tensors, so the official models
  crash in float64 (``conv2d`` on mixed dtypes); here coordinates are built in the model dtype and
  compaction is a gather, so ``model.double()`` works. Shift masks stay plain float32 attributes
  as in the official code (their values, 0 and -100, are exact in any dtype).

Sources read
------------
implus/UM-MAE at HEAD ``cb7776b`` ("Update README.md"); README line 11 pins ``timm==0.3.2``
(``main_pretrain.py:27`` asserts it). timm 0.3.2's ViT pieces are described in
``references.mae``.

``models_mae_swin.py``
  * 27-43 ``Mlp``: ``fc1``, GELU, ``fc2`` (+ parameter-free dropout).
  * 46-57 ``window_partition`` / ``window_reverse``: windows batch-major, then row, then column.
  * 60-116 ``WindowAttention``: registration ``posmlp`` (Sequential ``0`` Conv2d(2, posmlp_dim, 1),
    ``1`` ReLU, ``2`` Conv2d(posmlp_dim, heads, 1)), ``qkv``, ``proj``. ``q = q * scale`` BEFORE the
    product. Bias input (93): ``pos_windows.unsqueeze(2) - pos_windows.unsqueeze(3)``, i.e. element
    ``[., :, i, j] = p_j - p_i`` (KEY minus QUERY coordinate), then ``sign(d) * log(1 + |d|)`` (95)
    and ``posmlp`` -> (B*nW, heads, N, N). With ``pos_hw`` of batch 1 (finetuning) the bias is
    repeated over the batch (98-102). Order of additions: ``attn + bias``, then the shift mask.
  * 119-146 ``PatchMerge``: registration ``norm`` (``norm_layer(in_chans)``), ``proj`` Conv2d 2x2
    stride 2; tokens -> (N, C, H, W) -> conv -> (N, HW/4, 2C); ``pos_hw[:, ::2, ::2] / 2``.
  * 149-255 ``SwinBlock``: if ``min(resolution) <= window`` the shift is 0 and the window is the
    resolution (162-165). ``norm1`` / ``norm2`` use the ``norm_layer`` ARGUMENT, whose default is
    ``nn.LayerNorm`` (eps 1e-5); no caller passes it, so the block norms have eps 1e-5 while every
    other norm has the factories' 1e-6. Registration ``norm1, attn, drop_path, norm2, mlp``, then
    ``downsample`` (201; created by the caller BEFORE the block's own modules). Shift mask
    (177-198): region ids over ``slice(0, -w), slice(-w, -s), slice(-s, None)`` on both axes,
    -100 where the ids differ. Forward (203-248): optional ``downsample`` first, ``H, W`` from
    ``pos_hw``, roll tokens and ``pos_hw`` by ``-s``, windows, attention, roll back, residuals.
  * 258-280 ``PatchEmbed``: ``proj`` Conv2d(patch, stride patch), then ``norm``.
  * 283-370 ``MaskedAutoencoderSwin.__init__``: own parameters ``vis_mask_token`` (only when
    ``vis_mask_ratio > 0``), ``mask_token``, ``decoder_pos_embed`` (frozen); modules
    ``patch_embed``, flat ``blocks`` (stage s > 0 starts with a ``PatchMerge``; input resolution
    ``patches_resolution // 2**(s+1)``, the compact grid; shift ``window // 2`` on odd blocks;
    ``qkv_bias=True`` and ``drop_path=0`` hard-coded), ``norm``, ``decoder_embed`` Linear(C_last,
    4*D), ``decoder_expand`` PixelShuffle(2), timm ``Block`` x depth with ``norm_layer`` and the
    ENCODER ``mlp_ratio``, ``decoder_norm``, ``decoder_pred`` Linear(D, stride**2 * in_chans).
    ``pos_hw`` (313-315, (1, 2, H, W) = (row, col)) and ``kernel`` (318) are plain attributes.
  * 372-404 init: sin-cos ``decoder_pos_embed`` (no cls), ``normal_(0.02)`` on ``mask_token`` then
    ``vis_mask_token``, ``apply``: Linear xavier-uniform / zero bias, LayerNorm 1 / 0, Conv2d
    ``normal_(0, sqrt(2 / (kh*kw*out/groups)))`` / zero bias; finally xavier-uniform on the
    patch-embed conv weight viewed as (out, in*p*p) (its bias stays zero from ``apply``).
  * 406-433 ``patchify``: ``nchpwq -> nhwpqc`` with p = stride (16).
  * 435-497 ``forward_encoder``: SM selection 441-450 (noise + mask, argsort, the
    ``int(vis_cnt * (1 - ratio))`` smallest stay visible, ``vis_cnt`` from sample 0); masks
    upsampled by ``repeat_interleave`` (453-458); ``vis_mask_token`` passed through
    ``patch_embed.norm`` (463) and put on SM tokens, removed tokens zeroed (477); compaction by a
    depthwise all-ones 2x2 conv with dilation K on 2K x 2K tiles (478-480): the sum of the four
    K x K sub-units of a 2x2 unit block, of which exactly one is non-zero; ``pos_hw`` compacted the
    same way with the PRIMARY mask (483-488).
  * 499-524 ``forward_decoder``: ``decoder_embed``, ``(N, L, 4D) -> (N, 4D, M, M)``, PixelShuffle
    (channel ``4c + 2i + j`` -> feature c of sub-position (i, j)), flatten row-major over the
    2M x 2M compact grid; ``pos_vis = decoder_pos_embed[~mask]`` (ROW-MAJOR over the unit grid,
    511) is added to the compact-order latents; ``[x_vis + pos_vis, mask_token + pos_mask]``.
  * 526-548 loss: ``target[mask]``, norm-pix with ``var`` (unbiased) + 1e-6, ``((pred - target)**2)
    .mean()`` on ``pred[:, -n_masked:]``; ``forward`` returns ``(loss, pred, mask)``.
  * 551-583 factories: Swin-T (96, [2,2,6,2], [3,6,12,24], window 8, posmlp 32, dec 512/2/16) and
    Swin-L (192, [2,2,18,2], [6,12,24,48], posmlp 64, dec 512/8/16), ``norm_layer`` eps 1e-6.

``models_swin.py``
  * 26-83 ``Swin``: ``patch_embed``, flat ``blocks`` on the full grid (resolution
    ``patches_resolution // 2**s``), drop path ``linspace(0, rate, sum(depths))`` (50),
    ``fc_norm``, ``head``; ``pos_hw`` (46-48) is (1, H, W, 2) = (row, col); only ``apply`` init
    (the patch-embed conv keeps the Conv2d normal init). Default drop path 0.1.
  * 105-118 forward: blocks, ``mean(1)``, ``fc_norm``, ``head``. 121-135: ``swin_tiny_256`` /
    ``swin_large_256`` with window 16.

``models_mae_pvt.py``
  * 43-79 ``Attention``: registration ``q``, ``kv`` (Linear(dim, 2 dim)), ``proj``, ``sr``
    Conv2d(dim, dim, 1), ``norm`` = ``nn.LayerNorm(dim)`` (DEFAULT eps 1e-5). K/V input:
    ``avg_pool2d(x, sr_ratio)`` (also for ratio 1) -> ``sr`` -> ``norm``. ``(q @ k^T) * scale``
    (scale AFTER the product, unlike the Swin attention).
  * 82-102 ``PVTBlock``: ``norm1, attn, drop_path, norm2, mlp, downsample``; ``norm_layer`` default
    (eps 1e-5) is never overridden by a caller.
  * 105-146 ``PatchMerge`` (plain Conv2d 2x2/2, no norm) and ``PatchEmbed`` (Conv2d, no norm).
  * 149-222 ``MaskedAutoencoderPVT.__init__``: own parameters ``vis_mask_token`` (optional),
    ``pos_embed`` (frozen sin-cos on the full token grid), ``mask_token``, ``decoder_pos_embed``;
    decoder ``Block`` uses ``decoder_mlp_ratio``. 224-260: init as the Swin model plus the
    ``pos_embed`` table.
  * 290-356 ``forward_encoder``: as the Swin one, but the RAW ``vis_mask_token`` (318) and the
    ``pos_embed`` compacted with the primary mask and added after the compaction (336-345).
  * 358-407: decoder / loss / forward identical to the Swin model. 409-419: PVT-S factory,
    ``sr_ratios=[4, 2, 1, 1]``, ``mlp_ratios=[8, 8, 4, 4]``.

``models_pvt.py``
  * 27-71 ``PVT``: ``patch_embed``, LEARNABLE ``pos_embed`` (zeros; ``apply`` leaves it at 0),
    blocks with drop path schedule, ``fc_norm``, ``head``; 93-110 forward ``x + pos_embed``,
    blocks, mean, ``fc_norm``, ``head``; 113-119 ``pvt_small_256`` with ``sr_ratios=[8, 4, 2, 1]``.

``models_mae.py`` (UM-MAE's ViT)
  * 24-68: own parameters ``vis_mask_token`` (optional), ``cls_token``, ``pos_embed``,
    ``mask_token``, ``decoder_pos_embed``; timm ``PatchEmbed`` / ``Block`` (``qkv_bias=True``).
  * 70-100 init: both tables (with cls row), xavier patch conv, ``normal_(0.02)`` on ``cls_token``,
    ``mask_token``, ``vis_mask_token``, then ``apply`` (Linear / LayerNorm only: the conv bias keeps
    its PyTorch default).
  * 131-166 encoder: ``+ pos_embed[:, 1:]``, ``x[~mask]`` (row-major), SM 141-154: token =
    ``vis_mask_token + pos_embed``, noise over the gathered tokens, ``ids = argsort(noise)``, and
    token k is replaced iff ``ids[k] >= int(L_vis * (1 - ratio))`` (a gather with the shuffle, not
    its inverse: still a uniform choice); cls prepended after.
  * 169-196 decoder: ``[cls + dpe[:1], x_vis + dpe_vis, mask_token + dpe_mask]`` (row-major; no
    ordering issue), drop the cls row. 198-220 loss as above. 253-258: ``dec512d2b`` factory.

``models_simmim_swin.py`` / ``models_simmim_pvt.py``
  * swin 27-91 / pvt 27-83: own ``mask_token`` (stage-1 width) first (PVT: then ``pos_embed``);
    encoder on the FULL grid (resolution ``patches_resolution // 2**s``); ``decoder_pred``
    Linear(C_last, 4 * stride**2 * in_chans) + ``decoder_shuffle`` PixelShuffle(2). Init: (PVT:
    sin-cos ``pos_embed``), ``normal_(0.02)`` on ``mask_token``, ``apply``, xavier patch conv.
  * swin 149-173 / pvt 146-171: masked tokens = ``x * (1 - w) + mask_token * w`` with the raw token
    (no ``patch_embed.norm``); PVT adds ``pos_embed`` afterwards.
  * swin 175-203 / pvt 173-201: ``decoder_pred`` -> PixelShuffle -> (N, L, stride**2 * 3) row-major;
    L1 loss ``|pred[mask] - target[mask]|.mean()`` (norm-pix optional, off in the runs).
  * swin 212-218: ``simmim_swin_tiny_256`` with window 16; pvt 211-217: ``sr_ratios=[8, 4, 2, 1]``.

``util/pos_embed.py`` 17-64: the MAE sin-cos table (see ``references.mae``), here without cls.
``mask_transform.py`` 18-51: ``--mask_regular`` masks keep exactly one unit per 2x2 block (1 =
removed); without it, a uniform random subset.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import mae
from .mixmim import DropPath

__all__ = [
    "DECODER_POS_ORDERS",
    "SimMIMPVTTorch",
    "SimMIMUMSwinTorch",
    "UMPVTFinetuneTorch",
    "UMPVTPretrainTorch",
    "UMSwinFinetuneTorch",
    "UMSwinPretrainTorch",
    "UMViTPretrainTorch",
    "compact_grid",
    "compact_unit_index",
    "from_model_config",
    "kept_slots",
    "mae_pvt_small_256",
    "mae_swin_large_256",
    "mae_swin_tiny_256",
    "mae_vit_base_patch16_dec512d2b",
    "pvt_small_256",
    "secondary_mask",
    "secondary_mask_vit",
    "shifted_window_mask",
    "simmim_pvt_small_256",
    "simmim_swin_tiny_256",
    "sincos_pos_embed_2d",
    "swin_large_256",
    "swin_tiny_256",
    "uniform_sampling_mask",
]

NORM_EPS = 1e-6  # partial(nn.LayerNorm, eps=1e-6): every official factory's norm_layer
TORCH_LN_EPS = 1e-5  # nn.LayerNorm's default: Swin/PVT block norms and PVT Attention.norm
SHIFT_MASK_VALUE = -100.0
DECODER_POS_ORDERS = ("official", "true")


# ------------------------------------------------------------------------------------------------
# Tables, masks and geometry helpers
# ------------------------------------------------------------------------------------------------


def sincos_pos_embed_2d(dim: int, grid: int) -> np.ndarray:
    """The MAE / UM-MAE fixed table without cls row: float32 ``(grid*grid, dim)``; token (r, c)
    holds ``[sin(c w), cos(c w), sin(r w), cos(r w)]`` (column first)."""
    return mae.sincos_pos_embed_2d_with_cls(dim, grid)[1:]


def shifted_window_mask(resolution: int, window: int, shift: int) -> np.ndarray:
    """Attention mask of a cyclically shifted window layer: float32 ``(nW, w*w, w*w)`` with
    -100 between tokens of different pre-roll regions and 0 elsewhere (windows row-major)."""
    if not 0 < shift < window <= resolution or resolution % window:
        raise ValueError(f"bad shift geometry: resolution {resolution}, window {window}, "
                         f"shift {shift}")
    region = np.zeros((resolution, resolution), np.int64)
    cuts = [0, resolution - window, resolution - shift, resolution]
    label = 0
    for r0, r1 in zip(cuts[:-1], cuts[1:]):
        for c0, c1 in zip(cuts[:-1], cuts[1:]):
            region[r0:r1, c0:c1] = label
            label += 1
    n = resolution // window
    wins = region.reshape(n, window, n, window).transpose(0, 2, 1, 3).reshape(n * n, -1)
    differ = wins[:, :, None] != wins[:, None, :]
    return np.where(differ, SHIFT_MASK_VALUE, 0.0).astype(np.float32)


def _as_bool_mask(mask, n: int | None, L: int, name: str) -> torch.Tensor:
    m = torch.as_tensor(mask)
    if m.ndim != 2 or m.shape[1] != L or (n is not None and m.shape[0] != n):
        want = f"({n if n is not None else 'N'}, {L})"
        raise ValueError(f"{name} must be {want}, got {tuple(m.shape)}")
    if m.dtype != torch.bool:
        if torch.is_floating_point(m) and not torch.all((m == 0) | (m == 1)):
            raise ValueError(f"{name} must be 0/1")
        m = m != 0
    return m


def kept_slots(mask, grid: int) -> torch.Tensor:
    """Slot ``2*di + dj`` of the kept unit of every 2x2 block: (N, grid/2, grid/2) int64.

    ``mask``: (N, grid*grid), 1 = removed, with exactly one kept unit per 2x2 block (uniform
    sampling); anything else raises ``ValueError``.
    """
    if grid % 2:
        raise ValueError(f"uniform sampling needs an even unit grid, got {grid}")
    m = _as_bool_mask(mask, None, grid * grid, "mask")
    N, g = m.shape[0], grid // 2
    kept = (~m).view(N, g, 2, g, 2).permute(0, 1, 3, 2, 4).reshape(N, g, g, 4)
    if not torch.all(kept.sum(-1) == 1):
        raise ValueError("mask must keep exactly one unit in every 2x2 block (uniform sampling)")
    return kept.to(torch.int64).argmax(-1)


def compact_unit_index(mask, grid: int) -> torch.Tensor:
    """Unit index (row-major on the full unit grid) of each compact position: (N, (grid/2)**2).

    Compact unit (a, b), position ``a * grid/2 + b``, is original unit ``(2a + di, 2b + dj)``.
    """
    slots = kept_slots(mask, grid)
    g = grid // 2
    a = torch.arange(g).view(1, g, 1)
    b = torch.arange(g).view(1, 1, g)
    rows = 2 * a + slots // 2
    cols = 2 * b + slots % 2
    return (rows * grid + cols).reshape(slots.shape[0], -1)


def compact_grid(x: torch.Tensor, slots: torch.Tensor, per_unit: int) -> torch.Tensor:
    """Keep the kept unit of every 2x2 unit block: (N, T, T, C) -> (N, T/2, T/2, C).

    ``per_unit`` tokens per unit side (T = grid * per_unit), ``slots`` from :func:`kept_slots`.
    Exactly what the official dilated all-ones convolution computes when the other three units
    are zero; done here as a gather.
    """
    N, T, _, C = x.shape
    k = per_unit
    g = slots.shape[1]
    if T != 2 * g * k:
        raise ValueError(f"token grid {T} does not match {g} blocks of 2x{k} tokens")
    if x.shape[0] != slots.shape[0]:
        x = x.expand(slots.shape[0], -1, -1, -1)
        N = slots.shape[0]
    # (N, a, di, ti, b, dj, tj, C) -> (N, a, b, di*2+dj, ti, tj, C)
    blocks = x.reshape(N, g, 2, k, g, 2, k, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    blocks = blocks.reshape(N, g, g, 4, k, k, C)
    idx = slots.to(x.device).view(N, g, g, 1, 1, 1, 1).expand(N, g, g, 1, k, k, C)
    picked = torch.gather(blocks, 3, idx).squeeze(3)  # (N, a, b, ti, tj, C)
    return picked.permute(0, 1, 3, 2, 4, 5).reshape(N, g * k, g * k, C)


def uniform_sampling_mask(batch: int, grid: int, generator: torch.Generator | None = None
                          ) -> torch.Tensor:
    """UM-MAE uniform sampling: one random kept unit per 2x2 block, (batch, grid*grid) bool with
    True = removed. Slots are drawn independently (the official loader draws them from a balanced
    pool without replacement; the two agree in distribution per block)."""
    g = grid // 2
    slot = torch.randint(0, 4, (batch, g, g), generator=generator)
    keep = F.one_hot(slot, 4).bool().view(batch, g, g, 2, 2).permute(0, 1, 3, 2, 4)
    return ~keep.reshape(batch, grid * grid)


def secondary_mask(mask, vis_mask_ratio: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The official Swin / PVT secondary-mask draw (``forward_encoder`` lines 441-450).

    Of the kept units, the ``int(n_kept * (1 - ratio))`` with the smallest ``noise`` stay visible
    (``n_kept`` counted on sample 0); the others are returned as True. ``noise``: (N, L) in [0, 1)
    or None (``torch.rand``). Returns ``vis_mask`` (N, L) bool, never True on removed units.
    """
    m = _as_bool_mask(mask, None, torch.as_tensor(mask).shape[-1], "mask")
    N, L = m.shape
    n_vis = L - int(m[0].sum())
    keep = int(n_vis * (1.0 - vis_mask_ratio))
    if noise is None:
        noise = torch.rand(N, L)
    order = torch.argsort(m.float() + noise.float(), dim=1)
    rank = torch.argsort(order, dim=1)
    return ~m & (rank >= keep)


def secondary_mask_vit(mask, vis_mask_ratio: float, noise: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """The official ViT secondary-mask draw (``models_mae.py`` 141-152), on the patch grid.

    ``noise``: (N, n_kept) over the row-major kept patches (None: ``torch.rand``); kept patch k is
    replaced iff ``argsort(noise)[k] >= int(n_kept * (1 - ratio))``.
    """
    m = _as_bool_mask(mask, None, torch.as_tensor(mask).shape[-1], "mask")
    N, L = m.shape
    n_vis = L - int(m[0].sum())
    if not torch.all((~m).sum(1) == n_vis):
        raise ValueError("every sample must keep the same number of patches")
    keep = int(n_vis * (1.0 - vis_mask_ratio))
    if noise is None:
        noise = torch.rand(N, n_vis)
    replaced = torch.argsort(noise, dim=1) >= keep  # (N, n_vis) in gathered order
    out = torch.zeros(N, L, dtype=torch.bool)
    out[~m] = replaced.reshape(-1)
    return out


def _upsample(m: torch.Tensor, grid: int, factor: int) -> torch.Tensor:
    """(N, grid*grid) unit mask -> (N, grid*factor, grid*factor) token mask (replication)."""
    m = m.view(m.shape[0], grid, grid)
    return m.repeat_interleave(factor, 1).repeat_interleave(factor, 2)


def _partition(x: torch.Tensor, w: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/w * W/w, w, w, C): windows batch-major, then row, then column."""
    B, H, W, C = x.shape
    x = x.view(B, H // w, w, W // w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, w, w, C)


def _unpartition(windows: torch.Tensor, w: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`_partition`: (B*nW, w, w, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // w, W // w, w, w, C).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, H, W, C)


def _token_coords(T: int, dtype, device) -> torch.Tensor:
    """(1, T, T, 2) with (row, col) of every token."""
    r = torch.arange(T, device=device, dtype=dtype)
    rows = r.view(T, 1).expand(T, T)
    cols = r.view(1, T).expand(T, T)
    return torch.stack([rows, cols], dim=-1)[None]


def _patchify(imgs: torch.Tensor, p: int, in_chans: int) -> torch.Tensor:
    """(N, C, H, H) -> (N, (H/p)**2, p*p*C); units row-major, each flattened (row, col, ch)."""
    N, C, H, W = imgs.shape
    if C != in_chans or H != W or H % p:
        raise ValueError(f"patchify needs (N, {in_chans}, H, H) with H % {p} == 0, "
                         f"got {tuple(imgs.shape)}")
    h = H // p
    x = imgs.reshape(N, C, h, p, h, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(N, h * h, p * p * C)


def _unpatchify(x: torch.Tensor, p: int, in_chans: int) -> torch.Tensor:
    N, L, _ = x.shape
    h = math.isqrt(L)
    if h * h != L:
        raise ValueError(f"unpatchify needs a square number of units, got {L}")
    x = x.reshape(N, h, h, p, p, in_chans).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, in_chans, h * p, h * p)


def _norm_pix(t: torch.Tensor) -> torch.Tensor:
    mean = t.mean(dim=-1, keepdim=True)
    var = t.var(dim=-1, keepdim=True, unbiased=True)
    return (t - mean) / (var + 1e-6) ** 0.5


def _drop_path_rates(rate: float, n: int) -> list[float]:
    return [float(r) for r in torch.linspace(0, rate, n, device="cpu")]


def _per_stage(value, n: int, name: str) -> tuple:
    if isinstance(value, (int, float)):
        return (value,) * n
    value = tuple(value)
    if len(value) != n:
        raise ValueError(f"{name} needs one entry per stage ({n}), got {value!r}")
    return value


# ------------------------------------------------------------------------------------------------
# Init (models_mae_swin.py 390-404 and the same function in every other UM-MAE model file)
# ------------------------------------------------------------------------------------------------


def _init_um(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def _init_linear_norm(m: nn.Module) -> None:
    # models_mae.py 92-100: Linear and LayerNorm only.
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.zeros_(m.bias)
        nn.init.ones_(m.weight)


def _xavier_conv_(conv: nn.Conv2d) -> None:
    w = conv.weight
    nn.init.xavier_uniform_(w.view(w.shape[0], -1))


# ------------------------------------------------------------------------------------------------
# UM-MAE Swin pieces
# ------------------------------------------------------------------------------------------------


class SwinPatchEmbed(nn.Module):
    """Conv ``patch x patch`` / stride patch, then LayerNorm (``norm_layer`` eps)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, eps: float):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input size {tuple(x.shape[-2:])} != model size {self.img_size}")
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class SwinPatchMerge(nn.Module):
    """LayerNorm(C_in) then Conv 2x2 / stride 2 (C_in -> C_out); coordinates subsampled and
    halved."""

    def __init__(self, in_chans: int, embed_dim: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(in_chans, eps=eps)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, pos_hw: torch.Tensor):
        N, L, C = x.shape
        H, W = pos_hw.shape[1], pos_hw.shape[2]
        if L != H * W:
            raise ValueError(f"{L} tokens for a {H}x{W} grid")
        x = self.norm(x).transpose(1, 2).reshape(N, C, H, W)
        x = self.proj(x).flatten(2).transpose(1, 2)
        return x, pos_hw[:, ::2, ::2] / 2.0


class UMWindowAttention(nn.Module):
    """Window attention with the continuous position bias MLP of UM-MAE."""

    def __init__(self, dim: int, window_size: int, num_heads: int, posmlp_dim: int = 32,
                 qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.window_size = window_size
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.posmlp = nn.Sequential(
            nn.Conv2d(2, posmlp_dim, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(posmlp_dim, num_heads, 1),
        )
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def position_bias(self, pos_hw: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 2) coordinates -> (B * nW, heads, w*w, w*w) bias; entry (i, j) is the MLP of
        ``sign(d) * log(1 + |d|)`` with ``d = p_j - p_i`` (key minus query), as officially."""
        w = self.window_size
        p = _partition(pos_hw, w).reshape(-1, w * w, 2).transpose(1, 2)  # (b, 2, n)
        d = p[:, :, None, :] - p[:, :, :, None]  # [b, c, i, j] = p[b, c, j] - p[b, c, i]
        d = torch.sign(d) * torch.log(1.0 + d.abs())
        return self.posmlp(d)

    def forward(self, x: torch.Tensor, pos_hw: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        Bw, n, C = x.shape
        h = self.num_heads
        q, k, v = self.qkv(x).reshape(Bw, n, 3, h, C // h).permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)  # scale BEFORE the product
        bias = self.position_bias(pos_hw)
        if bias.shape[0] != Bw:  # coordinates shared by the batch (finetuning): repeat
            reps = Bw // bias.shape[0]
            bias = bias.unsqueeze(0).expand(reps, *bias.shape).reshape(Bw, h, n, n)
        attn = attn + bias
        if mask is not None:
            nW = mask.shape[0]
            attn = attn.view(Bw // nW, nW, h, n, n) + mask.to(attn.dtype)[None, :, None]
            attn = attn.view(Bw, h, n, n)
        attn = attn.softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(Bw, n, C))


class UMSwinBlock(nn.Module):
    """UM-MAE ``SwinBlock``: optional ``downsample`` first, then (shifted) window attention + MLP.

    ``norm1`` / ``norm2`` have eps ``norm_eps`` (official: nn.LayerNorm's default 1e-5).
    """

    def __init__(self, dim: int, input_resolution: int, num_heads: int, window_size: int,
                 shift_size: int, mlp_ratio: float, qkv_bias: bool, posmlp_dim: int,
                 drop_path: float = 0.0, downsample: SwinPatchMerge | None = None,
                 norm_eps: float = TORCH_LN_EPS):
        super().__init__()
        self.dim = dim
        self.input_resolution = (input_resolution, input_resolution)
        self.num_heads = num_heads
        if input_resolution <= window_size:  # one window covers the stage: no partition, no shift
            window_size, shift_size = input_resolution, 0
        if not 0 <= shift_size < window_size or input_resolution % window_size:
            raise ValueError(f"window {window_size} / shift {shift_size} do not fit resolution "
                             f"{input_resolution}")
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = UMWindowAttention(dim, window_size, num_heads, posmlp_dim, qkv_bias)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mae.Mlp(dim, int(dim * mlp_ratio))
        # Plain attribute, as in the official code (not in the state_dict).
        self.attn_mask = (torch.from_numpy(shifted_window_mask(input_resolution, window_size,
                                                               shift_size))
                          if shift_size > 0 else None)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, pos_hw: torch.Tensor):
        """x (B, H*W, C), pos_hw (B or 1, H, W, 2) token coordinates (before the merge)."""
        if self.downsample is not None:
            x, pos_hw = self.downsample(x, pos_hw)
        B, L, C = x.shape
        H, W = pos_hw.shape[1], pos_hw.shape[2]
        if L != H * W:
            raise ValueError(f"{L} tokens for a {H}x{W} grid")
        s, w = self.shift_size, self.window_size
        h = self.norm1(x).view(B, H, W, C)
        pos = pos_hw
        if s:
            h = torch.roll(h, shifts=(-s, -s), dims=(1, 2))
            pos = torch.roll(pos, shifts=(-s, -s), dims=(1, 2))
        mask = None if self.attn_mask is None else self.attn_mask.to(x.device)
        out = self.attn(_partition(h, w).reshape(-1, w * w, C), pos, mask)
        h = _unpartition(out.view(-1, w, w, C), w, H, W)
        if s:
            h = torch.roll(h, shifts=(s, s), dims=(1, 2))
        x = x + self.drop_path(h.reshape(B, L, C))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, pos_hw


def _swin_blocks(embed_dim: int, depths, num_heads, resolutions, window_size: int,
                 posmlp_dim: int, mlp_ratio: float, qkv_bias: bool, ln_eps: float,
                 block_ln_eps: float, drop_path_rates) -> nn.ModuleList:
    blocks = nn.ModuleList()
    idx = 0
    for s, depth in enumerate(depths):
        dim = embed_dim * 2**s
        for j in range(depth):
            # The merge is built before the block's own modules (it is a constructor argument).
            merge = SwinPatchMerge(dim // 2, dim, ln_eps) if (s > 0 and j == 0) else None
            blocks.append(UMSwinBlock(
                dim, resolutions[s], num_heads[s], window_size,
                0 if j % 2 == 0 else window_size // 2, mlp_ratio, qkv_bias, posmlp_dim,
                drop_path_rates[idx], merge, block_ln_eps))
            idx += 1
    return blocks


# ------------------------------------------------------------------------------------------------
# UM-MAE PVT pieces
# ------------------------------------------------------------------------------------------------


class PVTPatchEmbed(nn.Module):
    """Conv ``patch x patch`` / stride patch, no norm."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input size {tuple(x.shape[-2:])} != model size {self.img_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class PVTPatchMerge(nn.Module):
    """Plain Conv 2x2 / stride 2, no norm."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor, H: int, W: int):
        N, L, C = x.shape
        if L != H * W:
            raise ValueError(f"{L} tokens for a {H}x{W} grid")
        x = self.proj(x.transpose(1, 2).reshape(N, C, H, W)).flatten(2).transpose(1, 2)
        return x, (H // 2, W // 2)


class PVTAttention(nn.Module):
    """Spatial-reduction attention: K/V from avg-pool(sr) -> 1x1 conv -> LayerNorm (eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, sr_ratio: int = 1,
                 norm_eps: float = TORCH_LN_EPS):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        self.sr = nn.Conv2d(dim, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, n, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, n, h, C // h).transpose(1, 2)
        r = F.avg_pool2d(x.transpose(1, 2).reshape(B, C, H, W), self.sr_ratio)
        r = self.norm(self.sr(r).reshape(B, C, -1).transpose(1, 2))
        k, v = self.kv(r).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # scale AFTER
        return self.proj((attn @ v).transpose(1, 2).reshape(B, n, C))


class PVTBlock(nn.Module):
    """Optional ``downsample`` first, then pre-norm SR attention and MLP (norms eps 1e-5)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float,
                 qkv_bias: bool = True, drop_path: float = 0.0,
                 downsample: PVTPatchMerge | None = None, norm_eps: float = TORCH_LN_EPS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = PVTAttention(dim, num_heads, qkv_bias, sr_ratio, norm_eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = mae.Mlp(dim, int(dim * mlp_ratio))
        self.downsample = downsample

    def forward(self, x: torch.Tensor, H: int, W: int):
        if self.downsample is not None:
            x, (H, W) = self.downsample(x, H, W)
        x = x + self.drop_path(self.attn(self.norm1(x), H, W))
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, (H, W)


def _pvt_blocks(embed_dims, depths, num_heads, mlp_ratios, sr_ratios, qkv_bias: bool,
                block_ln_eps: float, drop_path_rates) -> nn.ModuleList:
    blocks = nn.ModuleList()
    idx = 0
    for s, depth in enumerate(depths):
        for j in range(depth):
            merge = PVTPatchMerge(embed_dims[s - 1], embed_dims[s]) if (s > 0 and j == 0) else None
            blocks.append(PVTBlock(embed_dims[s], num_heads[s], sr_ratios[s], mlp_ratios[s],
                                   qkv_bias, drop_path_rates[idx], merge, block_ln_eps))
            idx += 1
    return blocks


# ------------------------------------------------------------------------------------------------
# Shared UM-MAE pretraining decoder / loss (Swin and PVT)
# ------------------------------------------------------------------------------------------------


def _check_pyramid(img_size: int, patch_size: int, unit_size: int, num_stages: int,
                   compact: bool) -> tuple[int, int, int]:
    """(T tokens per side, K tokens per unit side, G units per side); checks that the last stage
    times 2 (PixelShuffle) lands on the kept-unit grid (compact) or the unit grid (SimMIM)."""
    if img_size % patch_size or unit_size % patch_size or img_size % unit_size:
        raise ValueError(f"img {img_size}, patch {patch_size}, unit {unit_size} do not divide")
    T, K, G = img_size // patch_size, unit_size // patch_size, img_size // unit_size
    first = T // 2 if compact else T
    last = first // 2 ** (num_stages - 1)
    want = G // 2 if compact else G
    if first % 2 ** (num_stages - 1) or 2 * last != want or (compact and G % 2):
        raise ValueError(
            f"geometry does not close: {num_stages} stages from a {first}-token grid end at "
            f"{last}, PixelShuffle(2) gives {2 * last}, the decoder needs {want}")
    return T, K, G


class _UMPretrainMixin:
    """Decoder, targets and loss shared by the Swin and PVT pretraining models."""

    def _build_decoder(self, enc_dim: int, decoder_dim: int, decoder_depth: int,
                       decoder_num_heads: int, decoder_mlp_ratio: float, in_chans: int,
                       unit_size: int, num_units: int, ln_eps: float) -> None:
        self.decoder_embed = nn.Linear(enc_dim, 4 * decoder_dim)
        self.decoder_expand = nn.PixelShuffle(2)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_units, decoder_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            mae.Block(decoder_dim, decoder_num_heads, decoder_mlp_ratio, True, norm_eps=ln_eps)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=ln_eps)
        self.decoder_pred = nn.Linear(decoder_dim, unit_size**2 * in_chans)

    def _check_masks(self, mask, vis_mask, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        L = self.unit_grid**2
        m = _as_bool_mask(mask, n, L, "mask")
        if vis_mask is None:
            v = torch.zeros_like(m)
        else:
            v = _as_bool_mask(vis_mask, n, L, "vis_mask")
        if torch.any(v & m):
            raise ValueError("vis_mask may only mark kept units (mask == 0)")
        if v.any() and self.vis_mask_ratio <= 0:
            raise ValueError("vis_mask needs vis_mask_ratio > 0 (no vis_mask_token)")
        return m, v

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return _patchify(imgs, self.unit_size, self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return _unpatchify(x, self.unit_size, self.in_chans)

    def forward_decoder(self, latent: torch.Tensor, mask) -> torch.Tensor:
        """latent (N, l, C_last) on the compact grid -> pred (N, L, unit**2 * C).

        Rows ``[:n_kept]`` sit at the decoder positions of the kept units in row-major order
        (``decoder_pos_embed[~mask]``), rows ``[n_kept:]`` at the removed units, row-major.
        ``decoder_pos_order="official"`` puts the compact-order latents on those kept positions
        (latent k on the k-th kept unit, the official pairing); ``"true"`` puts each latent on
        its own unit.
        """
        N = latent.shape[0]
        m = _as_bool_mask(mask, N, self.unit_grid**2, "mask").to(latent.device)
        x = self.decoder_embed(latent)
        M = math.isqrt(x.shape[1])
        x = self.decoder_expand(x.transpose(1, 2).reshape(N, -1, M, M))
        x = x.flatten(2).transpose(1, 2)  # (N, 4l, D), compact row-major
        D = x.shape[-1]
        if self.decoder_pos_order == "true":
            order = compact_unit_index(m.cpu(), self.unit_grid).argsort(dim=1).to(x.device)
            x = torch.gather(x, 1, order[..., None].expand(-1, -1, D))
        pos = self.decoder_pos_embed.expand(N, -1, -1)
        pos_vis = pos[~m].reshape(N, -1, D)
        pos_mask = pos[m].reshape(N, -1, D)
        if pos_vis.shape[1] != x.shape[1]:
            raise ValueError(f"{x.shape[1]} latents for {pos_vis.shape[1]} kept units")
        x = torch.cat([x + pos_vis, self.mask_token + pos_mask], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))

    def target(self, imgs: torch.Tensor, mask) -> torch.Tensor:
        """Targets of the removed units (N, n_masked, unit**2 * C), row-major, norm-pix if set."""
        t = self.patchify(imgs)
        m = _as_bool_mask(mask, t.shape[0], t.shape[1], "mask").to(t.device)
        t = t[m].reshape(t.shape[0], -1, t.shape[-1])
        return _norm_pix(t) if self.norm_pix_loss else t

    def forward_loss(self, imgs: torch.Tensor, pred_masked: torch.Tensor, mask) -> torch.Tensor:
        """Plain mean of the squared error over every removed unit and value."""
        return ((pred_masked - self.target(imgs, mask)) ** 2).mean()

    def forward(self, imgs: torch.Tensor, mask, vis_mask=None):
        """imgs (N, C, H, W); mask (N, L) bool on the unit grid (1 = removed, one kept unit per
        2x2 block); vis_mask (N, L) bool (1 = kept unit given the SM token; None = none).
        Returns ``(loss, pred (N, L, unit**2 * C))`` -- see :meth:`forward_decoder`."""
        m, v = self._check_masks(mask, vis_mask, imgs.shape[0])
        latent = self.forward_encoder(imgs, m, v)
        pred = self.forward_decoder(latent, m)
        n_kept = int((~m[0]).sum())
        return self.forward_loss(imgs, pred[:, n_kept:], m), pred


# ------------------------------------------------------------------------------------------------
# Config plumbing
# ------------------------------------------------------------------------------------------------

_ALIASES = {"stride": "unit_size", "decoder_embed_dim": "decoder_dim", "norm_eps": "ln_eps"}
_TUPLE_FIELDS = ("depths", "num_heads", "embed_dims", "mlp_ratios", "sr_ratios")


def _cfg_kwargs(cls, cfg, overrides: Mapping, aliases: Mapping = _ALIASES) -> dict:
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    d.update(overrides)
    for old, new in aliases.items():
        if old in d and new not in d:
            d[new] = d.pop(old)
    accepted = inspect.signature(cls.__init__).parameters
    out = {k: v for k, v in d.items() if k in accepted and k != "self"}
    for k in _TUPLE_FIELDS:
        if k in out and isinstance(out[k], (list, tuple)):
            out[k] = tuple(out[k])
    return out


class _FromConfig:
    @classmethod
    def from_model_config(cls, cfg, **overrides):
        """Build from a dict / ConfigDict (unknown fields ignored; ``stride``,
        ``decoder_embed_dim`` and ``norm_eps`` accepted as aliases of ``unit_size``,
        ``decoder_dim`` and ``ln_eps``); keyword ``overrides`` win over the config."""
        return cls(**_cfg_kwargs(cls, cfg, overrides))


# ------------------------------------------------------------------------------------------------
# 1. UM-MAE Swin pretraining
# ------------------------------------------------------------------------------------------------


class UMSwinPretrainTorch(_UMPretrainMixin, _FromConfig, nn.Module):
    """Official ``models_mae_swin.MaskedAutoencoderSwin``.

    State-dict order: ``[vis_mask_token,] mask_token, decoder_pos_embed, patch_embed.*, blocks.*
    (blocks.{i}.downsample.* last in the first block of stages 2..), norm.*, decoder_embed.*,
    decoder_blocks.*, decoder_norm.*, decoder_pred.*``.
    """

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        unit_size: int = 16,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 8,
        posmlp_dim: int = 32,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = NORM_EPS,
        block_ln_eps: float = TORCH_LN_EPS,
        drop_path_rate: float = 0.0,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float | None = None,
        vis_mask_ratio: float = 0.25,
        norm_pix_loss: bool = True,
        decoder_pos_order: str = "official",
    ):
        super().__init__()
        depths = tuple(depths)
        num_heads = _per_stage(num_heads, len(depths), "num_heads")
        if decoder_pos_order not in DECODER_POS_ORDERS:
            raise ValueError(f"decoder_pos_order must be one of {DECODER_POS_ORDERS}")
        T, K, G = _check_pyramid(img_size, patch_size, unit_size, len(depths), compact=True)
        self.in_chans, self.unit_size, self.embed_dim = in_chans, unit_size, embed_dim
        self.token_grid, self.tokens_per_unit, self.unit_grid = T, K, G
        self.vis_mask_ratio = vis_mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_pos_order = decoder_pos_order
        self.stage_resolutions = tuple(T // 2 ** (s + 1) for s in range(len(depths)))

        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = SwinPatchEmbed(img_size, patch_size, in_chans, embed_dim, ln_eps)
        self.blocks = _swin_blocks(embed_dim, depths, num_heads, self.stage_resolutions,
                                   window_size, posmlp_dim, mlp_ratio, qkv_bias, ln_eps,
                                   block_ln_eps, _drop_path_rates(drop_path_rate, sum(depths)))
        enc_dim = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(enc_dim, eps=ln_eps)
        self._build_decoder(enc_dim, decoder_dim, decoder_depth, decoder_num_heads,
                            mlp_ratio if decoder_mlp_ratio is None else decoder_mlp_ratio,
                            in_chans, unit_size, G * G, ln_eps)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        self.decoder_pos_embed.copy_(
            torch.from_numpy(sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1],
                                                 self.unit_grid))[None])
        nn.init.normal_(self.mask_token, std=0.02)
        if hasattr(self, "vis_mask_token"):
            nn.init.normal_(self.vis_mask_token, std=0.02)
        self.apply(_init_um)
        _xavier_conv_(self.patch_embed.proj)

    def compact(self, x_grid: torch.Tensor, mask) -> torch.Tensor:
        """(N, T, T, C) token grid -> (N, T/2, T/2, C) kept units (see :func:`compact_grid`)."""
        return compact_grid(x_grid, kept_slots(mask, self.unit_grid), self.tokens_per_unit)

    def encoder_input(self, imgs: torch.Tensor, mask, vis_mask=None):
        """Compacted tokens (N, (T/2)**2, C) and their true coordinates (N, T/2, T/2, 2)."""
        N = imgs.shape[0]
        m, v = self._check_masks(mask, vis_mask, N)
        x = self.patch_embed(imgs)
        T, C = self.token_grid, x.shape[-1]
        x = x.view(N, T, T, C)
        if hasattr(self, "vis_mask_token"):
            token = self.patch_embed.norm(self.vis_mask_token).view(1, 1, 1, C)
            sm = _upsample(v, self.unit_grid, self.tokens_per_unit).to(x.device)[..., None]
            x = torch.where(sm, token, x)
        slots = kept_slots(m, self.unit_grid).to(x.device)
        x = compact_grid(x, slots, self.tokens_per_unit)
        pos = compact_grid(_token_coords(T, x.dtype, x.device), slots, self.tokens_per_unit)
        return x.reshape(N, -1, C), pos

    def forward_encoder(self, imgs: torch.Tensor, mask, vis_mask=None) -> torch.Tensor:
        """-> latent (N, (T / 2**num_stages)**2, C_last) after ``norm``, compact row-major."""
        x, pos = self.encoder_input(imgs, mask, vis_mask)
        for blk in self.blocks:
            x, pos = blk(x, pos)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------
# 2. UM-MAE Swin fine-tuning
# ------------------------------------------------------------------------------------------------


class UMSwinFinetuneTorch(_FromConfig, nn.Module):
    """Official ``models_swin.Swin``: full-grid Swin, mean pool, ``fc_norm``, ``head``.

    State-dict order: ``patch_embed.*, blocks.*, fc_norm.*, head.*``.
    """

    def __init__(
        self,
        img_size: int = 256,
        num_classes: int = 1000,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 16,
        posmlp_dim: int = 32,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = NORM_EPS,
        block_ln_eps: float = TORCH_LN_EPS,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        depths = tuple(depths)
        num_heads = _per_stage(num_heads, len(depths), "num_heads")
        T = img_size // patch_size
        self.token_grid = T
        self.num_classes = num_classes
        self.stage_resolutions = tuple(T // 2**s for s in range(len(depths)))
        self.patch_embed = SwinPatchEmbed(img_size, patch_size, in_chans, embed_dim, ln_eps)
        self.blocks = _swin_blocks(embed_dim, depths, num_heads, self.stage_resolutions,
                                   window_size, posmlp_dim, mlp_ratio, qkv_bias, ln_eps,
                                   block_ln_eps, _drop_path_rates(drop_path_rate, sum(depths)))
        enc_dim = embed_dim * 2 ** (len(depths) - 1)
        self.fc_norm = nn.LayerNorm(enc_dim, eps=ln_eps)
        self.head = nn.Linear(enc_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_um)

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs)
        pos = _token_coords(self.token_grid, x.dtype, x.device)  # batch 1: bias shared
        for blk in self.blocks:
            x, pos = blk(x, pos)
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(self.forward_tokens(imgs).mean(dim=1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))


# ------------------------------------------------------------------------------------------------
# 3. UM-MAE PVT pretraining
# ------------------------------------------------------------------------------------------------


class UMPVTPretrainTorch(_UMPretrainMixin, _FromConfig, nn.Module):
    """Official ``models_mae_pvt.MaskedAutoencoderPVT``.

    State-dict order: ``[vis_mask_token,] pos_embed, mask_token, decoder_pos_embed,
    patch_embed.*, blocks.*, norm.*, decoder_embed.*, decoder_blocks.*, decoder_norm.*,
    decoder_pred.*``.
    """

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        unit_size: int = 16,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (4, 2, 1, 1),
        qkv_bias: bool = True,
        ln_eps: float = NORM_EPS,
        block_ln_eps: float = TORCH_LN_EPS,
        drop_path_rate: float = 0.0,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        decoder_mlp_ratio: float = 4.0,
        vis_mask_ratio: float = 0.25,
        norm_pix_loss: bool = True,
        decoder_pos_order: str = "official",
    ):
        super().__init__()
        depths = tuple(depths)
        n = len(depths)
        embed_dims = _per_stage(embed_dims, n, "embed_dims")
        num_heads = _per_stage(num_heads, n, "num_heads")
        mlp_ratios = _per_stage(mlp_ratios, n, "mlp_ratios")
        sr_ratios = _per_stage(sr_ratios, n, "sr_ratios")
        if decoder_pos_order not in DECODER_POS_ORDERS:
            raise ValueError(f"decoder_pos_order must be one of {DECODER_POS_ORDERS}")
        T, K, G = _check_pyramid(img_size, patch_size, unit_size, n, compact=True)
        self.in_chans, self.unit_size, self.embed_dims = in_chans, unit_size, embed_dims
        self.token_grid, self.tokens_per_unit, self.unit_grid = T, K, G
        self.vis_mask_ratio = vis_mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.decoder_pos_order = decoder_pos_order

        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dims[0]))
        self.patch_embed = PVTPatchEmbed(img_size, patch_size, in_chans, embed_dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, T * T, embed_dims[0]), requires_grad=False)
        self.blocks = _pvt_blocks(embed_dims, depths, num_heads, mlp_ratios, sr_ratios, qkv_bias,
                                  block_ln_eps, _drop_path_rates(drop_path_rate, sum(depths)))
        self.norm = nn.LayerNorm(embed_dims[-1], eps=ln_eps)
        self._build_decoder(embed_dims[-1], decoder_dim, decoder_depth, decoder_num_heads,
                            decoder_mlp_ratio, in_chans, unit_size, G * G, ln_eps)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        self.pos_embed.copy_(torch.from_numpy(
            sincos_pos_embed_2d(self.pos_embed.shape[-1], self.token_grid))[None])
        self.decoder_pos_embed.copy_(torch.from_numpy(
            sincos_pos_embed_2d(self.decoder_pos_embed.shape[-1], self.unit_grid))[None])
        nn.init.normal_(self.mask_token, std=0.02)
        if hasattr(self, "vis_mask_token"):
            nn.init.normal_(self.vis_mask_token, std=0.02)
        self.apply(_init_um)
        _xavier_conv_(self.patch_embed.proj)

    def compact(self, x_grid: torch.Tensor, mask) -> torch.Tensor:
        return compact_grid(x_grid, kept_slots(mask, self.unit_grid), self.tokens_per_unit)

    def encoder_input(self, imgs: torch.Tensor, mask, vis_mask=None) -> torch.Tensor:
        """Compacted tokens + compacted position table: (N, (T/2)**2, C0)."""
        N = imgs.shape[0]
        m, v = self._check_masks(mask, vis_mask, N)
        x = self.patch_embed(imgs)
        T, C = self.token_grid, x.shape[-1]
        x = x.view(N, T, T, C)
        if hasattr(self, "vis_mask_token"):
            sm = _upsample(v, self.unit_grid, self.tokens_per_unit).to(x.device)[..., None]
            x = torch.where(sm, self.vis_mask_token.view(1, 1, 1, C), x)  # raw token
        slots = kept_slots(m, self.unit_grid).to(x.device)
        x = compact_grid(x, slots, self.tokens_per_unit)
        pos = compact_grid(self.pos_embed.view(1, T, T, C), slots, self.tokens_per_unit)
        return (x + pos).reshape(N, -1, C)

    def forward_encoder(self, imgs: torch.Tensor, mask, vis_mask=None) -> torch.Tensor:
        x = self.encoder_input(imgs, mask, vis_mask)
        H = W = self.token_grid // 2
        for blk in self.blocks:
            x, (H, W) = blk(x, H, W)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------
# 4. UM-MAE PVT fine-tuning
# ------------------------------------------------------------------------------------------------


class UMPVTFinetuneTorch(_FromConfig, nn.Module):
    """Official ``models_pvt.PVT``: learnable ``pos_embed`` (zeros at init), mean pool,
    ``fc_norm``, ``head``. State-dict order: ``pos_embed, patch_embed.*, blocks.*, fc_norm.*,
    head.*``."""

    def __init__(
        self,
        img_size: int = 256,
        num_classes: int = 1000,
        patch_size: int = 4,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        ln_eps: float = NORM_EPS,
        block_ln_eps: float = TORCH_LN_EPS,
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        depths = tuple(depths)
        n = len(depths)
        embed_dims = _per_stage(embed_dims, n, "embed_dims")
        self.token_grid = img_size // patch_size
        self.num_classes = num_classes
        self.patch_embed = PVTPatchEmbed(img_size, patch_size, in_chans, embed_dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, self.token_grid**2, embed_dims[0]))
        self.blocks = _pvt_blocks(embed_dims, depths, _per_stage(num_heads, n, "num_heads"),
                                  _per_stage(mlp_ratios, n, "mlp_ratios"),
                                  _per_stage(sr_ratios, n, "sr_ratios"), qkv_bias, block_ln_eps,
                                  _drop_path_rates(drop_path_rate, sum(depths)))
        self.fc_norm = nn.LayerNorm(embed_dims[-1], eps=ln_eps)
        self.head = nn.Linear(embed_dims[-1], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_um)

    def forward_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed
        H = W = self.token_grid
        for blk in self.blocks:
            x, (H, W) = blk(x, H, W)
        return x

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.fc_norm(self.forward_tokens(imgs).mean(dim=1))

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs))


# ------------------------------------------------------------------------------------------------
# 5. UM-MAE ViT pretraining (models_mae.py of UM-MAE)
# ------------------------------------------------------------------------------------------------


class UMViTPretrainTorch(nn.Module):
    """UM-MAE's ``models_mae.MaskedAutoencoderViT``: MAE with a secondary-mask token.

    State-dict order: ``[vis_mask_token,] cls_token, pos_embed, mask_token, decoder_pos_embed,
    patch_embed.*, blocks.*, norm.*, decoder_embed.*, decoder_blocks.*, decoder_norm.*,
    decoder_pred.*``.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_dim: int = 512,
        decoder_depth: int = 2,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = NORM_EPS,
        vis_mask_ratio: float = 0.25,
        norm_pix_loss: bool = True,
    ):
        super().__init__()
        self.in_chans, self.embed_dim, self.decoder_dim = in_chans, embed_dim, decoder_dim
        self.vis_mask_ratio = vis_mask_ratio
        self.norm_pix_loss = norm_pix_loss
        if vis_mask_ratio > 0:
            self.vis_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = mae.PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        n_tok = self.patch_embed.num_patches + 1
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, n_tok, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            mae.Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_eps=norm_eps)
            for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.decoder_embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, n_tok, decoder_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            mae.Block(decoder_dim, decoder_num_heads, mlp_ratio, qkv_bias, norm_eps=norm_eps)
            for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=norm_eps)
        self.decoder_pred = nn.Linear(decoder_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> int:
        return self.patch_embed.grid_size

    @torch.no_grad()
    def initialize_weights(self) -> None:
        g = self.grid_size
        self.pos_embed.copy_(torch.from_numpy(
            mae.sincos_pos_embed_2d_with_cls(self.embed_dim, g))[None])
        self.decoder_pos_embed.copy_(torch.from_numpy(
            mae.sincos_pos_embed_2d_with_cls(self.decoder_dim, g))[None])
        _xavier_conv_(self.patch_embed.proj)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if hasattr(self, "vis_mask_token"):
            nn.init.normal_(self.vis_mask_token, std=0.02)
        self.apply(_init_linear_norm)

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return _patchify(imgs, self.patch_size, self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return _unpatchify(x, self.patch_size, self.in_chans)

    def _check_masks(self, mask, vis_mask, n: int):
        L = self.grid_size**2
        m = _as_bool_mask(mask, n, L, "mask")
        v = torch.zeros_like(m) if vis_mask is None else _as_bool_mask(vis_mask, n, L, "vis_mask")
        if torch.any(v & m):
            raise ValueError("vis_mask may only mark kept patches (mask == 0)")
        if v.any() and self.vis_mask_ratio <= 0:
            raise ValueError("vis_mask needs vis_mask_ratio > 0 (no vis_mask_token)")
        if not torch.all(m.sum(1) == m[0].sum()):
            raise ValueError("every sample must remove the same number of patches")
        return m, v

    def forward_encoder(self, imgs: torch.Tensor, mask, vis_mask=None) -> torch.Tensor:
        """-> latent (N, 1 + n_kept, D) after ``norm``: cls, then the kept patches row-major."""
        N = imgs.shape[0]
        m, v = self._check_masks(mask, vis_mask, N)
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:]
        D = x.shape[-1]
        m, v = m.to(x.device), v.to(x.device)
        x = x[~m].reshape(N, -1, D)
        if hasattr(self, "vis_mask_token"):
            token = (self.vis_mask_token + self.pos_embed[:, 1:]).expand(N, -1, -1)
            token = token[~m].reshape(N, -1, D)
            sm = v[~m].reshape(N, -1, 1)
            x = torch.where(sm, token, x)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(N, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward_decoder(self, latent: torch.Tensor, mask) -> torch.Tensor:
        """-> pred (N, L, p*p*C): kept patches (row-major) first, then removed ones; no cls."""
        N = latent.shape[0]
        m = _as_bool_mask(mask, N, self.grid_size**2, "mask").to(latent.device)
        x = self.decoder_embed(latent)
        D = x.shape[-1]
        pos = self.decoder_pos_embed[:, 1:].expand(N, -1, -1)
        body = torch.cat([x[:, 1:] + pos[~m].reshape(N, -1, D),
                          self.mask_token + pos[m].reshape(N, -1, D)], dim=1)
        x = torch.cat([x[:, :1] + self.decoder_pos_embed[:, :1], body], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]

    def target(self, imgs: torch.Tensor, mask) -> torch.Tensor:
        t = self.patchify(imgs)
        m = _as_bool_mask(mask, t.shape[0], t.shape[1], "mask").to(t.device)
        t = t[m].reshape(t.shape[0], -1, t.shape[-1])
        return _norm_pix(t) if self.norm_pix_loss else t

    def forward_loss(self, imgs: torch.Tensor, pred_masked: torch.Tensor, mask) -> torch.Tensor:
        return ((pred_masked - self.target(imgs, mask)) ** 2).mean()

    def forward(self, imgs: torch.Tensor, mask, vis_mask=None):
        """mask (N, L) bool on the patch grid (1 = removed); vis_mask (N, L) bool, 1 only on kept
        patches (replaced by ``vis_mask_token`` + their position embedding). -> (loss, pred)."""
        m, v = self._check_masks(mask, vis_mask, imgs.shape[0])
        pred = self.forward_decoder(self.forward_encoder(imgs, m, v), m)
        n_kept = int((~m[0]).sum())
        return self.forward_loss(imgs, pred[:, n_kept:], m), pred

    @classmethod
    def from_model_config(cls, cfg, **overrides) -> UMViTPretrainTorch:
        """From a MAE ViT config (img_size, patch_size, in_chans, embed_dim, depth, num_heads,
        mlp_ratio, decoder_dim / decoder_embed_dim, decoder_depth, decoder_num_heads; ``ln_eps``
        accepted for ``norm_eps``); other fields ignored, ``overrides`` win."""
        kw = _cfg_kwargs(cls, cfg, overrides,
                         {"decoder_embed_dim": "decoder_dim", "ln_eps": "norm_eps"})
        for name in ("depth", "num_heads", "decoder_depth", "decoder_num_heads"):
            if isinstance(kw.get(name), (list, tuple)):
                raise ValueError(f"ViT: {name} must be an int, got {kw[name]!r}")
        return cls(**kw)


# ------------------------------------------------------------------------------------------------
# 6. SimMIM baselines of the UM-MAE repository
# ------------------------------------------------------------------------------------------------


class _SimMIMMixin:
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        return _patchify(imgs, self.unit_size, self.in_chans)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        return _unpatchify(x, self.unit_size, self.in_chans)

    def _masked_tokens(self, x: torch.Tensor, mask) -> torch.Tensor:
        """(N, T*T, C) tokens with the tokens of removed units replaced by ``mask_token``."""
        m = _as_bool_mask(mask, x.shape[0], self.unit_grid**2, "mask")
        w = _upsample(m, self.unit_grid, self.tokens_per_unit).reshape(x.shape[0], -1, 1)
        return torch.where(w.to(x.device), self.mask_token, x)

    def forward_decoder(self, latent: torch.Tensor) -> torch.Tensor:
        """(N, l, C_last) -> (N, 4l, unit**2 * C): Linear then PixelShuffle(2), row-major units."""
        x = self.decoder_pred(latent)
        N, l, _ = x.shape
        M = math.isqrt(l)
        x = self.decoder_shuffle(x.transpose(1, 2).reshape(N, -1, M, M))
        return x.flatten(2).transpose(1, 2)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask) -> torch.Tensor:
        """L1 between ``pred[mask]`` and the (optionally norm-pix) targets of the removed units."""
        t = self.patchify(imgs)
        N, L, U = t.shape
        m = _as_bool_mask(mask, N, L, "mask").to(t.device)
        t = t[m].reshape(N, -1, U)
        if self.norm_pix_loss:
            t = _norm_pix(t)
        return (pred[m].reshape(N, -1, U) - t).abs().mean()

    def forward(self, imgs: torch.Tensor, mask):
        """mask (N, L) bool on the unit grid, 1 = removed. -> (loss, pred (N, L, unit**2 * C))."""
        m = _as_bool_mask(mask, imgs.shape[0], self.unit_grid**2, "mask")
        pred = self.forward_decoder(self.forward_encoder(imgs, m))
        return self.forward_loss(imgs, pred, m), pred


class SimMIMUMSwinTorch(_SimMIMMixin, _FromConfig, nn.Module):
    """Official ``models_simmim_swin.SimMIMSwin``. State-dict order: ``mask_token,
    patch_embed.*, blocks.*, norm.*, decoder_pred.*``."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        unit_size: int = 16,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 16,
        posmlp_dim: int = 32,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ln_eps: float = NORM_EPS,
        block_ln_eps: float = TORCH_LN_EPS,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        depths = tuple(depths)
        num_heads = _per_stage(num_heads, len(depths), "num_heads")
        T, K, G = _check_pyramid(img_size, patch_size, unit_size, len(depths), compact=False)
        self.in_chans, self.unit_size = in_chans, unit_size
        self.token_grid, self.tokens_per_unit, self.unit_grid = T, K, G
        self.norm_pix_loss = norm_pix_loss
        self.stage_resolutions = tuple(T // 2**s for s in range(len(depths)))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = SwinPatchEmbed(img_size, patch_size, in_chans, embed_dim, ln_eps)
        self.blocks = _swin_blocks(embed_dim, depths, num_heads, self.stage_resolutions,
                                   window_size, posmlp_dim, mlp_ratio, qkv_bias, ln_eps,
                                   block_ln_eps, [0.0] * sum(depths))
        enc_dim = embed_dim * 2 ** (len(depths) - 1)
        self.norm = nn.LayerNorm(enc_dim, eps=ln_eps)
        self.decoder_pred = nn.Linear(enc_dim, 4 * unit_size**2 * in_chans)
        self.decoder_shuffle = nn.PixelShuffle(2)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_um)
        _xavier_conv_(self.patch_embed.proj)

    def forward_encoder(self, imgs: torch.Tensor, mask) -> torch.Tensor:
        x = self._masked_tokens(self.patch_embed(imgs), mask)
        pos = _token_coords(self.token_grid, x.dtype, x.device)
        for blk in self.blocks:
            x, pos = blk(x, pos)
        return self.norm(x)


class SimMIMPVTTorch(_SimMIMMixin, _FromConfig, nn.Module):
    """Official ``models_simmim_pvt.SimMIMPVT``. State-dict order: ``mask_token, pos_embed,
    patch_embed.*, blocks.*, norm.*, decoder_pred.*``."""

    def __init__(
        self,
        img_size: int = 256,
        patch_size: int = 4,
        in_chans: int = 3,
        unit_size: int = 16,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        depths: Sequence[int] = (3, 4, 6, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        mlp_ratios: Sequence[float] = (8, 8, 4, 4),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        qkv_bias: bool = True,
        ln_eps: float = NORM_EPS,
        block_ln_eps: float = TORCH_LN_EPS,
        norm_pix_loss: bool = False,
    ):
        super().__init__()
        depths = tuple(depths)
        n = len(depths)
        embed_dims = _per_stage(embed_dims, n, "embed_dims")
        T, K, G = _check_pyramid(img_size, patch_size, unit_size, n, compact=False)
        self.in_chans, self.unit_size = in_chans, unit_size
        self.token_grid, self.tokens_per_unit, self.unit_grid = T, K, G
        self.norm_pix_loss = norm_pix_loss
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dims[0]))
        self.patch_embed = PVTPatchEmbed(img_size, patch_size, in_chans, embed_dims[0])
        self.pos_embed = nn.Parameter(torch.zeros(1, T * T, embed_dims[0]), requires_grad=False)
        self.blocks = _pvt_blocks(embed_dims, depths, _per_stage(num_heads, n, "num_heads"),
                                  _per_stage(mlp_ratios, n, "mlp_ratios"),
                                  _per_stage(sr_ratios, n, "sr_ratios"), qkv_bias, block_ln_eps,
                                  [0.0] * sum(depths))
        self.norm = nn.LayerNorm(embed_dims[-1], eps=ln_eps)
        self.decoder_pred = nn.Linear(embed_dims[-1], 4 * unit_size**2 * in_chans)
        self.decoder_shuffle = nn.PixelShuffle(2)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self) -> None:
        self.pos_embed.copy_(torch.from_numpy(
            sincos_pos_embed_2d(self.pos_embed.shape[-1], self.token_grid))[None])
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_um)
        _xavier_conv_(self.patch_embed.proj)

    def forward_encoder(self, imgs: torch.Tensor, mask) -> torch.Tensor:
        x = self._masked_tokens(self.patch_embed(imgs), mask) + self.pos_embed
        H = W = self.token_grid
        for blk in self.blocks:
            x, (H, W) = blk(x, H, W)
        return self.norm(x)


# ------------------------------------------------------------------------------------------------
# Official configurations
# ------------------------------------------------------------------------------------------------

SWIN_T = dict(img_size=256, patch_size=4, in_chans=3, embed_dim=96, depths=(2, 2, 6, 2),
              num_heads=(3, 6, 12, 24), mlp_ratio=4.0, posmlp_dim=32)
SWIN_L = dict(img_size=256, patch_size=4, in_chans=3, embed_dim=192, depths=(2, 2, 18, 2),
              num_heads=(6, 12, 24, 48), mlp_ratio=4.0, posmlp_dim=64)
PVT_S = dict(img_size=256, patch_size=4, in_chans=3, embed_dims=(64, 128, 320, 512),
             depths=(3, 4, 6, 3), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4))


def _merge(base: dict, **kw) -> dict:
    out = dict(base)
    out.update(kw)
    return out


def mae_swin_tiny_256(**kw) -> UMSwinPretrainTorch:
    """``mae_swin_tiny_256_dec512d2b``: window 8, decoder 512-d x 2, 16 heads."""
    return UMSwinPretrainTorch(**_merge(SWIN_T, window_size=8, unit_size=16, decoder_dim=512,
                                        decoder_depth=2, decoder_num_heads=16, **kw))


def mae_swin_large_256(**kw) -> UMSwinPretrainTorch:
    """``mae_swin_large_256_dec512d8b64pmd``: posmlp 64, decoder 512-d x 8."""
    return UMSwinPretrainTorch(**_merge(SWIN_L, window_size=8, unit_size=16, decoder_dim=512,
                                        decoder_depth=8, decoder_num_heads=16, **kw))


def mae_pvt_small_256(**kw) -> UMPVTPretrainTorch:
    """``mae_pvt_small_256_dec512d2b``: sr ratios (4, 2, 1, 1) on the compact grid."""
    return UMPVTPretrainTorch(**_merge(PVT_S, sr_ratios=(4, 2, 1, 1), unit_size=16,
                                       decoder_dim=512, decoder_depth=2, decoder_num_heads=16,
                                       decoder_mlp_ratio=4.0, **kw))


def mae_vit_base_patch16_dec512d2b(**kw) -> UMViTPretrainTorch:
    return UMViTPretrainTorch(**_merge(dict(
        img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12, decoder_dim=512,
        decoder_depth=2, decoder_num_heads=16, mlp_ratio=4.0), **kw))


def swin_tiny_256(**kw) -> UMSwinFinetuneTorch:
    """``models_swin.swin_tiny_256``: window 16 on the full grid."""
    return UMSwinFinetuneTorch(**_merge(SWIN_T, window_size=16, **kw))


def swin_large_256(**kw) -> UMSwinFinetuneTorch:
    return UMSwinFinetuneTorch(**_merge(SWIN_L, window_size=16, **kw))


def pvt_small_256(**kw) -> UMPVTFinetuneTorch:
    """``models_pvt.pvt_small_256``: sr ratios (8, 4, 2, 1)."""
    return UMPVTFinetuneTorch(**_merge(PVT_S, sr_ratios=(8, 4, 2, 1), **kw))


def simmim_swin_tiny_256(**kw) -> SimMIMUMSwinTorch:
    """``models_simmim_swin.simmim_swin_tiny_256``: window 16, L1 on raw pixels."""
    return SimMIMUMSwinTorch(**_merge(SWIN_T, window_size=16, unit_size=16, **kw))


def simmim_pvt_small_256(**kw) -> SimMIMPVTTorch:
    return SimMIMPVTTorch(**_merge(PVT_S, sr_ratios=(8, 4, 2, 1), unit_size=16, **kw))


_KINDS = {
    "ummae_swin": {"pretrain": UMSwinPretrainTorch, "finetune": UMSwinFinetuneTorch,
                   "simmim": SimMIMUMSwinTorch},
    "pvt": {"pretrain": UMPVTPretrainTorch, "finetune": UMPVTFinetuneTorch,
            "simmim": SimMIMPVTTorch},
}


def from_model_config(cfg: Mapping, kind: str = "pretrain", **overrides):
    """Reference model for a model config: ``cfg["name"]`` ``"ummae_swin"`` -> Swin classes,
    ``"pvt"`` -> PVT classes, anything else -> the ViT (``kind="pretrain"``:
    :class:`UMViTPretrainTorch`; ``"finetune"``: ``references.mae.MAEFinetuneTorch``).
    ``kind`` is ``"pretrain"``, ``"finetune"`` or ``"simmim"``. The config is taken as it is
    (e.g. its ``window_size`` / ``sr_ratios``); pass the fine-tuning geometry as overrides."""
    name = cfg.get("name") if hasattr(cfg, "get") else None
    if kind not in ("pretrain", "finetune", "simmim"):
        raise ValueError(f"kind must be pretrain, finetune or simmim, got {kind!r}")
    if name in _KINDS:
        return _KINDS[name][kind].from_model_config(cfg, **overrides)
    if kind == "pretrain":
        return UMViTPretrainTorch.from_model_config(cfg, **overrides)
    if kind == "finetune":
        return mae.MAEFinetuneTorch.from_model_config(cfg, **overrides)
    raise ValueError(f"no SimMIM reference for model {name!r}")
