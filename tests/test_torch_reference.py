"""Tests of the plain torch.nn MixMIM reference (tests/references/mixmim.py).

Full-size models (B/L/H) are only built on the ``meta`` device; behaviour is checked on tiny
2- and 3-stage configs.
"""

import math
import re
from pathlib import Path

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import mixmim as R
from torch import nn

KEYS_FILE = (
    Path(__file__).resolve().parents[1].parent / "shared/reference/mixmim_state_dict_keys.txt"
)

TINY = {
    # stride 8, final grid 4x4; stage-2 map 4x4 == window 4 (clamped to one global window).
    "2stage": {
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": (1, 1),
        "num_heads": (2, 4),
        "window_sizes": (4, 4),
    },
    # stride 16, final grid 4x4; grids 16/8/4 with windows 4: 16, 4 and 1 windows per image.
    "3stage": {
        "img_size": 64,
        "patch_size": 4,
        "embed_dim": 16,
        "depths": (1, 2, 1),
        "num_heads": (2, 2, 4),
        "window_sizes": (4, 4, 8),
    },
}
TINY_DECODER = {"decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2}


def tiny_pretrain(name, seed=0, **kw):
    torch.manual_seed(seed)
    return R.MixMIMPretrainTorch(**TINY[name], **TINY_DECODER, **kw).eval()


def tiny_finetune(name, seed=0, **kw):
    torch.manual_seed(seed)
    return R.MixMIMFinetuneTorch(**TINY[name], num_classes=10, **kw).eval()


def random_grid(g=4, ones=8, seed=0):
    rng = np.random.default_rng(seed)
    m = np.zeros(g * g, np.float32)
    m[rng.choice(g * g, ones, replace=False)] = 1
    return m.reshape(g, g)


# ------------------------------------------------------------------------------------------------
# 1. Official state_dict layout and parameter counts (B / L / H on the meta device)
# ------------------------------------------------------------------------------------------------

FACTORIES = {
    ("pretrain", "mixmim_base"): lambda: R.mixmim_base(),
    ("pretrain", "mixmim_large"): lambda: R.mixmim_large(),
    ("pretrain", "mixmim_huge"): lambda: R.mixmim_huge(),
    ("finetune", "mixmim_base"): lambda: R.mixmim_base(finetune=True),
    ("finetune", "mixmim_large"): lambda: R.mixmim_large(finetune=True),
    ("finetune", "mixmim_huge"): lambda: R.mixmim_huge(finetune=True),
    ("finetune", "mixmim_base_384"): lambda: R.mixmim_base_384(),
    ("finetune", "mixmim_large_384"): lambda: R.mixmim_large_384(),
}
# (all parameters incl. frozen sin-cos tables, trainable), from reference/mixmim.md §1.3.
COUNTS = {
    ("pretrain", "mixmim_base"): (114_665_784, 114_239_288),
    ("pretrain", "mixmim_large"): (223_468_244, None),
    ("pretrain", "mixmim_huge"): (684_709_594, None),
    ("finetune", "mixmim_base"): (88_344_352, None),
    ("finetune", "mixmim_large"): (197_396_668, None),
    ("finetune", "mixmim_huge"): (659_262_658, None),
    ("finetune", "mixmim_base_384"): (89_577_440, None),
    ("finetune", "mixmim_large_384"): (199_246_300, None),
}

_ENTRY = re.compile(r"^(\S+)\s+\[([\d, ]*)\](?:\s+\[(.+)\])?\s*$")
_STATS = re.compile(
    r"parameters \(all, incl\. frozen\): ([\d,]+) \| trainable \(requires_grad\): "
    r"([\d,]+)"
)


def parse_keys_file(path):
    """{(kind, name): {"entries": [(key, shape, note)], "params": int, "trainable": int}}."""
    models, cur = {}, None
    for line in path.read_text().splitlines():
        if line.startswith("MODEL:"):
            kind, name = line.split()[1:3]
            cur = models.setdefault((kind, name), {"entries": []})
        elif cur is not None and (s := _STATS.search(line)):
            cur["params"], cur["trainable"] = (int(v.replace(",", "")) for v in s.groups())
        elif cur is not None and (e := _ENTRY.match(line)):
            shape = tuple(int(v) for v in e.group(2).split(",") if v.strip())
            cur["entries"].append((e.group(1), shape, e.group(3)))
    return models


@pytest.fixture(scope="module")
def reference_layout():
    if not KEYS_FILE.exists():
        pytest.skip(f"official key listing not found at {KEYS_FILE} (shared/ checkout absent)")
    models = parse_keys_file(KEYS_FILE)
    assert set(models) == set(FACTORIES), "unexpected model list in the reference file"
    return models


@pytest.mark.parametrize("model_id", list(FACTORIES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_state_dict_matches_official_layout(reference_layout, model_id):
    ref = reference_layout[model_id]
    with torch.device("meta"):
        model = FACTORIES[model_id]()
    sd = model.state_dict(keep_vars=True)
    got = [(k, tuple(v.shape)) for k, v in sd.items()]
    assert got == [(k, s) for k, s, _ in ref["entries"]]  # names, order and shapes

    buffers = {k for k, _ in model.named_buffers()}
    frozen = {k for k, p in model.named_parameters() if not p.requires_grad}
    assert buffers == {k for k, _, n in ref["entries"] if n and "buffer" in n}
    assert frozen == {k for k, _, n in ref["entries"] if n and "requires_grad=False" in n}
    for k, v in sd.items():
        assert v.dtype == (torch.int64 if k in buffers else torch.float32), k

    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (n_all, n_train) == (ref["params"], ref["trainable"])
    want_all, want_train = COUNTS[model_id]
    assert n_all == want_all
    if want_train is not None:
        assert n_train == want_train


# ------------------------------------------------------------------------------------------------
# 2. Constants: relative position index and sin-cos tables
# ------------------------------------------------------------------------------------------------


def brute_force_index(w):
    n = w * w
    out = np.zeros((n, n), np.int64)
    for i in range(n):
        for j in range(n):
            yi, xi, yj, xj = i // w, i % w, j // w, j % w
            out[i, j] = (yi - yj + w - 1) * (2 * w - 1) + (xi - xj + w - 1)
    return out


@pytest.mark.parametrize("w", [4, 7])
def test_relative_position_index(w):
    idx = R.relative_position_index(w)
    assert idx.dtype == np.int64 and idx.shape == (w * w, w * w)
    np.testing.assert_array_equal(idx, brute_force_index(w))


def test_model_index_buffers_follow_clamped_windows():
    model = tiny_pretrain("3stage")
    # Stage grids 16 / 8 / 4 with windows 4 / 4 / 8: the last clamps to 4.
    for layer in model.layers:
        for blk in layer.blocks:
            assert blk.window == 4
            buf = blk.attn.relative_position_index
            assert buf.dtype == torch.int64
            np.testing.assert_array_equal(buf.numpy(), brute_force_index(4))


def test_sincos_closed_form():
    dim, grid = 128, 56  # MixMIM-B absolute_pos_embed
    table = R.sincos_pos_embed_2d(dim, grid)
    assert table.shape == (grid * grid, dim) and table.dtype == np.float64
    q = dim // 4
    for r, c, k in [(0, 0, 0), (0, 5, 3), (7, 2, 1), (55, 13, 31), (30, 55, 17)]:
        w = 10000.0 ** (-k / q)
        row = table[r * grid + c]
        assert row[k] == pytest.approx(math.sin(c * w), abs=1e-12)  # first half: column (x)
        assert row[q + k] == pytest.approx(math.cos(c * w), abs=1e-12)
        assert row[2 * q + k] == pytest.approx(math.sin(r * w), abs=1e-12)  # second half: row
        assert row[3 * q + k] == pytest.approx(math.cos(r * w), abs=1e-12)


def test_model_sincos_parameters_are_frozen_float32_tables():
    model = tiny_pretrain("2stage")
    for p, dim, grid in [(model.absolute_pos_embed, 16, 8), (model.decoder_pos_embed, 32, 4)]:
        assert not p.requires_grad and p.dtype == torch.float32
        want = torch.from_numpy(R.sincos_pos_embed_2d(dim, grid)).float()[None]
        assert torch.equal(p.data, want)


# ------------------------------------------------------------------------------------------------
# Building blocks and initialisation
# ------------------------------------------------------------------------------------------------


def test_patch_merging_timm_channel_order():
    merge = R.PatchMerging((4, 4), dim=3)
    merge.norm, merge.reduction = nn.Identity(), nn.Identity()
    x = torch.randn(2, 16, 3)
    out = merge(x).view(2, 2, 2, 12)
    g = x.view(2, 4, 4, 3)
    for r in range(2):
        for c in range(2):
            want = torch.cat(
                [
                    g[:, 2 * r, 2 * c],
                    g[:, 2 * r + 1, 2 * c],
                    g[:, 2 * r, 2 * c + 1],
                    g[:, 2 * r + 1, 2 * c + 1],
                ],
                -1,
            )
            assert torch.equal(out[:, r, c], want)


def test_patchify_order_and_inverse():
    model = tiny_pretrain("2stage")
    p, C = model.encoder_stride, 3
    imgs = torch.randn(2, C, 32, 32)
    t = model.patchify(imgs)
    assert t.shape == (2, 16, p * p * C)
    for n, i, j, r, c, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 5, 1, 2), (0, 3, 1, 7, 6, 1)]:
        assert t[n, i * 4 + j, (r * p + c) * C + ch] == imgs[n, ch, i * p + r, j * p + c]
    assert torch.equal(model.unpatchify(t), imgs)


def test_initialisation_follows_official_rules():
    model = tiny_pretrain("2stage")
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            fan_out, fan_in = m.weight.shape
            assert m.weight.abs().max() <= math.sqrt(6.0 / (fan_in + fan_out)), name
            if m.bias is not None:
                assert torch.all(m.bias == 0), name
        elif isinstance(m, nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
            assert m.eps == 1e-5
    assert model.layers[0].downsample.reduction.bias is None
    assert model.mask_token.abs().max() <= 2.0 and model.mask_token.std() > 0
    # Same seed, same weights.
    a, b = (
        tiny_pretrain("2stage", seed=3).state_dict(),
        tiny_pretrain("2stage", seed=3).state_dict(),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_make_stage_masks_is_nearest_upsampling():
    grid = random_grid()
    masks = R.make_stage_masks(grid, 3)
    for s, m in enumerate(masks):
        size = 4 * 2 ** (2 - s)
        up = F.interpolate(torch.from_numpy(grid)[None, None], size=(size, size), mode="nearest")
        assert m.shape == (1, size * size, 1) and m.dtype == torch.float32
        assert torch.equal(m, up.reshape(1, -1, 1))
    batched = R.make_stage_masks(np.stack([grid, 1 - grid]), 2)
    assert batched[0].shape == (2, 64, 1)
    assert torch.equal(batched[0][1], 1 - batched[0][0])


# ------------------------------------------------------------------------------------------------
# 3. Restricted attention: the partner's hidden pixels have exactly zero effect
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", list(TINY))
def test_hidden_partner_region_has_no_effect(cfg):
    model = tiny_pretrain(cfg)
    stride, size = model.encoder_stride, TINY[cfg]["img_size"]
    grid = random_grid()
    masks = model.make_stage_masks(grid)
    pix = torch.from_numpy(np.kron(grid, np.ones((stride, stride), np.float32))).bool()
    B = 4
    torch.manual_seed(1)
    imgs = torch.randn(B, 3, size, size)
    with torch.no_grad():
        z, stages = model.forward_encoder(imgs, masks, return_stages=True)

        # Sample 0's partner is sample 3; sample 0 only uses sample 3's tokens where m = 1.
        hidden = imgs.clone()
        hidden[3][:, ~pix] += 3.0 * torch.randn_like(hidden[3][:, ~pix])
        z_h, stages_h = model.forward_encoder(hidden, masks, return_stages=True)
        for a, b in zip([*stages, z], [*stages_h, z_h], strict=True):
            assert torch.equal(a[:3], b[:3])  # samples 0, 1, 2 bit-identical
        assert not torch.equal(z[3], z_h[3])  # sample 3 uses its own m = 0 region

        # Perturbing the partner where it is visible changes only sample 0's m = 1 tokens.
        visible = imgs.clone()
        visible[3][:, pix] += 3.0 * torch.randn_like(visible[3][:, pix])
        z_v = model.forward_encoder(visible, masks)
    m = torch.from_numpy(grid).reshape(-1).bool()
    assert torch.equal(z_v[0][~m], z[0][~m])
    assert (z_v[0][m] - z[0][m]).abs().min() > 0
    assert torch.equal(z_v[1:3], z[1:3])


# ------------------------------------------------------------------------------------------------
# 4. All-zero mask: the pretraining encoder is the finetuning encoder
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", list(TINY))
def test_zero_mask_encoder_equals_finetune_features(cfg):
    pre = tiny_pretrain(cfg)
    ft = tiny_finetune(cfg, seed=1)
    res = ft.load_state_dict(pre.state_dict(), strict=False)
    assert sorted(res.missing_keys) == ["head.bias", "head.weight"]
    unexpected = set(res.unexpected_keys)
    assert unexpected == {
        k
        for k in pre.state_dict()
        if k in ("mask_token", "decoder_pos_embed") or k.startswith("decoder_")
    }

    torch.manual_seed(2)
    imgs = torch.randn(3, 3, TINY[cfg]["img_size"], TINY[cfg]["img_size"])
    zero = pre.make_stage_masks(np.zeros((4, 4), np.float32))
    with torch.no_grad():
        z, stages = pre.forward_encoder(imgs, zero, return_stages=True)
        f, stages_f = ft.forward_features(imgs, return_stages=True)
        logits = ft(imgs)
    assert torch.equal(z, f)
    assert all(torch.equal(a, b) for a, b in zip(stages, stages_f, strict=True))
    assert len(stages) == len(zero) + 1
    with torch.no_grad():
        assert torch.equal(pre.forward_encoder(imgs, None), z)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, ft.head(f.mean(1)), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------
# 5. Loss (reference/mixmim.md §4) against an independent numpy version
# ------------------------------------------------------------------------------------------------


def numpy_loss(imgs, x_rec, m, p, norm_pix=True):
    """§4 in numpy: patchify (row, col, channel), unbiased var + 1e-6, stitch, mean."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    t = imgs.reshape(N, C, h, p, w, p).transpose(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)
    if norm_pix:
        t = (t - t.mean(-1, keepdims=True)) / np.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
    m = m.reshape(1, -1, 1)
    pred = x_rec[:N] * m + x_rec[N:][::-1] * (1 - m)
    return ((pred - t) ** 2).mean()


@pytest.mark.parametrize("ones", [0, 8])
@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_numpy(ones, norm_pix):
    model = tiny_pretrain("2stage", norm_pix_loss=norm_pix)
    torch.manual_seed(4)
    B, p = 3, model.encoder_stride
    imgs = torch.randn(B, 3, 32, 32)
    x_rec = torch.randn(2 * B, 16, p * p * 3)
    grid = random_grid(ones=ones)
    mask_last = model.make_stage_masks(grid)[-1]
    loss = model.forward_loss(imgs, x_rec, mask_last)
    want = numpy_loss(
        imgs.double().numpy(), x_rec.double().numpy(), grid.astype(np.float64), p, norm_pix
    )
    assert loss.item() == pytest.approx(want, rel=1e-5)

    l1, l2 = model.branch_losses(imgs, x_rec, mask_last)
    n1 = ones * B
    n2 = (16 - ones) * B
    assert ((n1 * l1 + n2 * l2) / (n1 + n2)).item() == pytest.approx(loss.item(), rel=1e-5)
    if ones == 0:
        # Only branch 2 is used: branch 1's predictions have no effect at all.
        other = x_rec.clone()
        other[:B] = torch.randn_like(other[:B])
        assert torch.equal(model.forward_loss(imgs, other, mask_last), loss)
        assert l1.item() == 0.0 and l2.item() == pytest.approx(loss.item(), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# Full pretraining forward, decoder and config construction
# ------------------------------------------------------------------------------------------------


def test_forward_draws_official_mask_and_is_consistent():
    model = tiny_pretrain("3stage")
    imgs = torch.randn(4, 3, 64, 64)
    torch.manual_seed(7)
    noise = torch.rand(1, 1, 16)
    torch.manual_seed(7)
    with torch.no_grad():
        loss, x_rec, mask = model(imgs, mask_ratio=0.5)
        want = torch.zeros(16)
        want[torch.argsort(noise.view(-1))[:8]] = 1
        assert mask.shape == (1, 16, 1) and torch.equal(mask.view(-1), want)
        assert x_rec.shape == (8, 16, 16 * 16 * 3)
        masks = model.make_stage_masks(want.view(4, 4))
        z = model.forward_encoder(imgs, masks)
        rec = model.forward_decoder(z, masks[-1])
        assert torch.equal(rec, x_rec)
        assert torch.equal(model.forward_loss(imgs, rec, masks[-1]), loss)


def test_decoder_unmixing_uses_shared_mask_token():
    model = tiny_pretrain("2stage")
    grid = random_grid()
    mask_last = model.make_stage_masks(grid)[-1]
    z = torch.randn(2, 16, model.num_features)
    seen = {}
    hook = model.decoder_blocks[0].register_forward_pre_hook(
        lambda mod, args: seen.setdefault("x", args[0].detach().clone())
    )
    with torch.no_grad():
        model.forward_decoder(z, mask_last)
        emb = model.decoder_embed(z)
    hook.remove()
    x = seen["x"] - model.decoder_pos_embed
    m = torch.from_numpy(grid).reshape(-1).bool()
    tok = model.mask_token[0, 0]
    torch.testing.assert_close(x[:2, ~m], emb[:, ~m])  # branch 1 keeps m = 0
    torch.testing.assert_close(x[:2, m], tok.expand_as(x[:2, m]))
    torch.testing.assert_close(x[2:, m], emb[:, m])  # branch 2 keeps m = 1
    torch.testing.assert_close(x[2:, ~m], tok.expand_as(x[2:, ~m]))


def test_from_model_config():
    cfg = ml_collections.ConfigDict(
        {
            "name": "mixmim",
            **TINY["2stage"],
            "in_chans": 3,
            "mlp_ratio": 4.0,
            "qkv_bias": True,
            "drop_path_rate": 0.1,
            "shift_windows": False,
            "remat": True,
            **TINY_DECODER,
        }
    )
    pre = R.from_model_config(cfg, norm_pix_loss=False)
    assert isinstance(pre, R.MixMIMPretrainTorch) and not pre.norm_pix_loss
    assert len(pre.decoder_blocks) == 1 and pre.encoder_stride == 8
    ft = R.MixMIMFinetuneTorch.from_model_config(cfg, num_classes=5)
    assert ft.head.out_features == 5 and ft.layers[1].blocks[0].drop_path.p == pytest.approx(0.1)
    with pytest.raises(ValueError, match="shift"):
        R.from_model_config({**cfg.to_dict(), "shift_windows": True})
