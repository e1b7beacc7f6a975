"""Tests of the plain torch.nn SimMIM reference (tests/references/simmim.py).

Full-size Swin-B / Swin-L models are only built on the ``meta`` device (layout and parameter
counts); behaviour is checked on a tiny 2-stage config whose stage 0 (8x8 map, window 4) has
shifted windows and whose stage 1 (4x4 map) is a single window.
"""

import itertools

import ml_collections
import numpy as np
import pytest
import torch
from references import simmim as S
from torch import nn

TINY = {
    "img_size": 32,
    "patch_size": 4,
    "in_chans": 3,
    "embed_dim": 16,
    "depths": (2, 2),
    "num_heads": (2, 4),
    "window_sizes": (4, 4),
}
TINY_MASK = {"input_size": 32, "mask_patch_size": 8, "model_patch_size": 4}  # 4x4 -> 8x8 tokens


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_pretrain(seed=0, **kw):
    torch.manual_seed(seed)
    return S.SimMIMPretrainTorch(**{**TINY, **kw}).eval()


def tiny_masks(batch=2, seed=0, ratio=0.6):
    rng = np.random.RandomState(seed)
    return torch.from_numpy(np.stack([S.make_mask(rng, mask_ratio=ratio, **TINY_MASK)
                                      for _ in range(batch)]))


def images(batch=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g, dtype=dtype)


# ------------------------------------------------------------------------------------------------
# Layout: keys, order, shapes (Swin-B/192/w6), parameter counts (B and L)
# ------------------------------------------------------------------------------------------------

SWIN_B = dict(embed=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32), window=6)
SWIN_L = dict(embed=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48), window=12)


def expected_swin_entries(spec, img=192, patch=4, num_classes=None):
    """(name, shape) in official registration order, generated from the architecture."""
    C, depths, heads, window = spec["embed"], spec["depths"], spec["heads"], spec["window"]
    out = []
    if num_classes is None:  # pretraining encoder: own parameter before any child module
        out.append(("mask_token", (1, 1, C)))
    out += [("patch_embed.proj.weight", (C, 3, patch, patch)), ("patch_embed.proj.bias", (C,)),
            ("patch_embed.norm.weight", (C,)), ("patch_embed.norm.bias", (C,))]
    res = img // patch
    for s, depth in enumerate(depths):
        d = C * 2**s
        clamped = res <= window
        w = res if clamped else window
        n = w * w
        for i in range(depth):
            p = f"layers.{s}.blocks.{i}."
            if i % 2 == 1 and not clamped:  # shifted block: its own buffer comes first
                out.append((p + "attn_mask", ((res // w) ** 2, n, n)))
            out += [(p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)),
                    (p + "attn.relative_position_bias_table", ((2 * w - 1) ** 2, heads[s])),
                    (p + "attn.relative_position_index", (n, n)),
                    (p + "attn.qkv.weight", (3 * d, d)), (p + "attn.qkv.bias", (3 * d,)),
                    (p + "attn.proj.weight", (d, d)), (p + "attn.proj.bias", (d,)),
                    (p + "norm2.weight", (d,)), (p + "norm2.bias", (d,)),
                    (p + "mlp.fc1.weight", (4 * d, d)), (p + "mlp.fc1.bias", (4 * d,)),
                    (p + "mlp.fc2.weight", (d, 4 * d)), (p + "mlp.fc2.bias", (d,))]
        if s < len(depths) - 1:
            out += [(f"layers.{s}.downsample.reduction.weight", (2 * d, 4 * d)),
                    (f"layers.{s}.downsample.norm.weight", (4 * d,)),
                    (f"layers.{s}.downsample.norm.bias", (4 * d,))]
            res //= 2
    F = C * 2 ** (len(depths) - 1)
    out += [("norm.weight", (F,)), ("norm.bias", (F,))]
    if num_classes is None:
        return [("encoder." + k, v) for k, v in out] + [
            ("decoder.0.weight", (32 * 32 * 3, F, 1, 1)), ("decoder.0.bias", (32 * 32 * 3,))]
    return out + [("head.weight", (num_classes, F)), ("head.bias", (num_classes,))]


def layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_swin_b_pretrain_state_dict_layout():
    with torch.device("meta"):
        model = S.simmim_swin_base()
    got = layout(model)
    assert got == expected_swin_entries(SWIN_B)
    masks = {k: s for k, s in got if k.endswith("attn_mask")}
    # Odd blocks of stages 0-2 (maps 48/24/12 > window 6); stage 3 (6x6 map) is one window.
    assert masks == {"encoder.layers.0.blocks.1.attn_mask": (64, 36, 36),
                     "encoder.layers.1.blocks.1.attn_mask": (16, 36, 36),
                     **{f"encoder.layers.2.blocks.{i}.attn_mask": (4, 36, 36)
                        for i in range(1, 18, 2)}}
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    assert {dtypes[k] for k in dtypes if k.endswith("relative_position_index")} == {torch.int64}
    assert {dtypes[k] for k in dtypes if not k.endswith("relative_position_index")} == {
        torch.float32}


def test_swin_b_finetune_state_dict_layout():
    with torch.device("meta"):
        model = S.simmim_swin_base(finetune=True)
    assert layout(model) == expected_swin_entries(SWIN_B, num_classes=1000)
    assert isinstance(model.head, nn.Linear) and isinstance(model.avgpool, nn.AdaptiveAvgPool1d)


def test_swin_l_stage_windows():
    # 48 and 24 maps keep window 12 (odd blocks shifted by 6); the 12x12 map is one window of 12
    # and the 6x6 map one window of 6: neither shifts.
    with torch.device("meta"):
        model = S.simmim_swin_large()
    layers = model.encoder.layers
    assert [(b.window, b.shift) for b in layers[0].blocks] == [(12, 0), (12, 6)]
    assert [(b.window, b.shift) for b in layers[1].blocks] == [(12, 0), (12, 6)]
    assert {(b.window, b.shift) for b in layers[2].blocks} == {(12, 0)}
    assert {(b.window, b.shift) for b in layers[3].blocks} == {(6, 0)}
    assert layout(model) == expected_swin_entries(SWIN_L)


def hand_param_count(C, depths, heads, windows, patch=4, stride=32):
    """Pretraining parameter count from the formula; ``windows`` are the effective per-stage
    windows (after the clamp)."""
    total = C  # mask_token
    total += 3 * patch * patch * C + C + 2 * C  # patch_embed conv + norm
    for s, (depth, h, w) in enumerate(zip(depths, heads, windows)):
        d = C * 2**s
        # norm1 2d + qkv 3d^2+3d + proj d^2+d + norm2 2d + fc1 4d^2+4d + fc2 4d^2+d + table
        block = 12 * d * d + 13 * d + (2 * w - 1) ** 2 * h
        total += depth * block
        if s < len(depths) - 1:
            total += 8 * d * d + 8 * d  # merging: Linear(4d, 2d, no bias) + LayerNorm(4d)
    F = C * 2 ** (len(depths) - 1)
    total += 2 * F  # final norm
    total += F * stride * stride * 3 + stride * stride * 3  # decoder 1x1 conv
    return total


def test_parameter_counts():
    with torch.device("meta"):
        b, l = S.simmim_swin_base(), S.simmim_swin_large()
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(b) == hand_param_count(128, (2, 2, 18, 2), (4, 8, 16, 32), (6, 6, 6, 6))
    assert count(l) == hand_param_count(192, (2, 2, 18, 2), (6, 12, 24, 48), (12, 12, 12, 6))
    assert count(b) == 89_874_104 and count(l) == 199_881_204  # the same formulas, evaluated


def test_tiny_layout_options():
    # ape: its parameter is registered before mask_token; no patch_norm: no patch_embed.norm.
    model = tiny_pretrain(ape=True, patch_norm=False)
    keys = list(model.state_dict())
    assert keys[:4] == ["encoder.absolute_pos_embed", "encoder.mask_token",
                        "encoder.patch_embed.proj.weight", "encoder.patch_embed.proj.bias"]
    assert model.state_dict()["encoder.absolute_pos_embed"].shape == (1, 64, 16)
    assert not any(k.startswith("encoder.patch_embed.norm") for k in keys)
    assert [k for k in keys if "attn_mask" in k] == ["encoder.layers.0.blocks.1.attn_mask"]
    assert model.state_dict()["decoder.0.weight"].shape == (8 * 8 * 3, 32, 1, 1)  # stride 8


# ------------------------------------------------------------------------------------------------
# Relative positions, shifted-window mask, locality
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("window", [2, 4, 6, 7])
def test_relative_position_index_brute_force(window):
    attn = S.WindowAttention(8, window, 2)
    n = window * window
    expected = np.zeros((n, n), np.int64)
    for i, j in itertools.product(range(n), range(n)):
        (yi, xi), (yj, xj) = divmod(i, window), divmod(j, window)
        expected[i, j] = (yi - yj + window - 1) * (2 * window - 1) + (xi - xj + window - 1)
    idx = attn.relative_position_index
    assert idx.dtype == torch.int64
    np.testing.assert_array_equal(idx.numpy(), expected)
    assert attn.relative_position_bias_table.shape == ((2 * window - 1) ** 2, 2)


@pytest.mark.parametrize("res, window", [(8, 4), (12, 6), (24, 6), (48, 12)])
def test_attn_mask_brute_force(res, window):
    """On the rolled map, a token whose row (column) came from the wrapped-around part sits in a
    different region from one that did not; pairs across regions get -100."""
    shift = window // 2
    block = S.SwinTransformerBlock(8, (res, res), 2, window, shift=shift)
    per_side = res // window
    n = window * window
    expected = np.zeros((per_side**2, n, n), np.float32)
    for wr, wc in itertools.product(range(per_side), range(per_side)):
        def wrapped(t, wr=wr, wc=wc):
            a, b = divmod(t, window)
            return (wr * window + a + shift >= res, wc * window + b + shift >= res)

        for i, j in itertools.product(range(n), range(n)):
            if wrapped(i) != wrapped(j):
                expected[wr * per_side + wc, i, j] = -100.0
    assert block.attn_mask.dtype == torch.float32
    np.testing.assert_array_equal(block.attn_mask.numpy(), expected)
    assert (expected != 0).any()  # the comparison is not vacuous
    unshifted = S.SwinTransformerBlock(8, (res, res), 2, window, shift=0)
    assert unshifted.attn_mask is None and "attn_mask" not in unshifted.state_dict()


@pytest.mark.parametrize("shift, token, rows, cols", [
    (0, (0, 0), range(0, 4), range(0, 4)),  # plain 4x4 window
    # Shift 2: after the roll (0, 0) sits in the bottom-right window, whose wrapped corner
    # (original rows 0-1, cols 0-1) is a region of its own.
    (2, (0, 0), range(0, 2), range(0, 2)),
    (2, (3, 3), range(2, 6), range(2, 6)),  # a window of the shifted grid, no wrap
    (2, (0, 3), range(0, 2), range(2, 6)),  # wrapped rows, unwrapped columns
])
def test_perturbation_stays_in_its_shifted_window(shift, token, rows, cols):
    torch.manual_seed(0)
    block = S.SwinTransformerBlock(8, (8, 8), 2, 4, shift=shift).double().eval()
    x = torch.randn(1, 64, 8, dtype=torch.float64)
    y = x.clone()
    y[0, token[0] * 8 + token[1], 0] += 5.0  # one channel (all channels vanish in LayerNorm)
    with torch.no_grad():
        change = (block(y) - block(x)).abs().amax(-1).reshape(8, 8).numpy()
    inside = np.zeros((8, 8), bool)
    inside[np.ix_(list(rows), list(cols))] = True
    assert (change[~inside] == 0).all(), "a token outside the window/region saw the change"
    assert (change[inside] > 1e-6).all(), change[inside]


def test_tiny_stage_windows_and_drop_path():
    model = S.SimMIMPretrainTorch(**TINY, drop_path_rate=0.3)
    l0, l1 = model.encoder.layers
    assert [(b.window, b.shift) for b in l0.blocks] == [(4, 0), (4, 2)]
    assert [(b.window, b.shift) for b in l1.blocks] == [(4, 0), (4, 0)]  # 4x4 map: one window
    blocks = list(l0.blocks) + list(l1.blocks)
    assert isinstance(blocks[0].drop_path, nn.Identity)  # rate 0 -> Identity (official)
    np.testing.assert_allclose([b.drop_path.p for b in blocks[1:]], [0.1, 0.2, 0.3], rtol=1e-6)


def test_patch_merging_channel_order():
    torch.manual_seed(0)
    merge = S.PatchMerging((4, 6), 3).double()
    x = torch.randn(2, 24, 3, dtype=torch.float64)
    grid = x.view(2, 4, 6, 3).numpy()
    # Official order x0..x3 = (row, col) offsets (0,0), (1,0), (0,1), (1,1).
    cat = np.concatenate([grid[:, 0::2, 0::2], grid[:, 1::2, 0::2], grid[:, 0::2, 1::2],
                          grid[:, 1::2, 1::2]], axis=-1).reshape(2, 6, 12)
    with torch.no_grad():
        expected = merge.reduction(merge.norm(torch.from_numpy(cat)))
        got = merge(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert list(merge.state_dict()) == ["reduction.weight", "norm.weight", "norm.bias"]


# ------------------------------------------------------------------------------------------------
# Masks
# ------------------------------------------------------------------------------------------------


def test_make_mask_official_defaults():
    m = S.make_mask(0)  # 192 px, mask patch 32, model patch 4, ratio 0.6
    assert m.shape == (48, 48) and m.dtype == np.int64
    assert set(np.unique(m)) == {0, 1}
    blocks = m.reshape(6, 8, 6, 8).transpose(0, 2, 1, 3).reshape(36, 64)
    assert (blocks.min(1) == blocks.max(1)).all()  # each 32-px patch is one 8x8 token block
    assert blocks[:, 0].sum() == 22  # ceil(36 * 0.6) = ceil(21.6)
    assert m.sum() == 22 * 64


def test_make_mask_uses_the_global_numpy_stream_like_the_official_generator():
    np.random.seed(5)
    got = S.make_mask()
    np.random.seed(5)
    chosen = np.random.permutation(36)[:22]
    expected = np.zeros((6, 6), np.int64)
    expected.flat[chosen] = 1
    np.testing.assert_array_equal(got[::8, ::8], expected)
    np.testing.assert_array_equal(S.make_mask(5), got)  # int seed = fresh RandomState(seed)


@pytest.mark.parametrize("rng, ratio, count", [
    (np.random.default_rng(1), 0.5, 8),
    (torch.Generator().manual_seed(1), 0.75, 12),
    (np.random.RandomState(2), 0.6, 10),  # ceil(16 * 0.6) = ceil(9.6)
])
def test_make_mask_counts(rng, ratio, count):
    m = S.make_mask(rng, mask_ratio=ratio, **TINY_MASK)
    assert m.shape == (8, 8)
    assert m[::2, ::2].sum() == count and m.sum() == 4 * count
    np.testing.assert_array_equal(S.upsample_mask(m[::2, ::2], 2), m)


def test_upsample_mask():
    grid = np.array([[1, 0], [0, 1]])
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]])
    np.testing.assert_array_equal(S.upsample_mask(grid, 2), expected)
    t = S.upsample_mask(torch.from_numpy(np.stack([grid, 1 - grid])), 2)
    assert t.dtype == torch.int64
    np.testing.assert_array_equal(t.numpy(), np.stack([expected, 1 - expected]))


# ------------------------------------------------------------------------------------------------
# Forward: masking, decoder, loss, encoder equivalence, float64
# ------------------------------------------------------------------------------------------------


def test_mask_token_replaces_exactly_the_masked_tokens():
    model = tiny_pretrain()
    with torch.no_grad():
        model.encoder.mask_token.normal_()
        x, mask = images(), tiny_masks()
        _, stages = model.forward_encoder(x, mask, return_stages=True)
        embedded = model.encoder.patch_embed(x)
    m = mask.reshape(2, 64).bool()
    assert m.any() and (~m).any()
    tok = model.encoder.mask_token[0, 0]
    torch.testing.assert_close(stages[0][m], tok.expand(int(m.sum()), -1), rtol=0, atol=0)
    torch.testing.assert_close(stages[0][~m], embedded[~m], rtol=0, atol=0)


def test_decoder_is_a_1x1_conv_then_pixel_shuffle():
    model = tiny_pretrain().double()
    z = torch.randn(2, 32, 4, 4, dtype=torch.float64)
    W = model.decoder[0].weight[:, :, 0, 0]
    b = model.decoder[0].bias
    with torch.no_grad():
        conv = torch.einsum("oc,bchw->bohw", W, z) + b[None, :, None, None]
        got = model.forward_decoder(z)
    s = 8
    # x_rec[b, c, h*s + i, w*s + j] = conv[b, c*s*s + i*s + j, h, w]
    expected = conv.reshape(2, 3, s, s, 4, 4).permute(0, 1, 4, 2, 5, 3).reshape(2, 3, 32, 32)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def numpy_loss(x, x_rec, token_mask, patch=4):
    x, x_rec = np.asarray(x, np.float64), np.asarray(x_rec, np.float64)
    m = np.stack([np.kron(t, np.ones((patch, patch))) for t in np.asarray(token_mask)])[:, None]
    return (np.abs(x - x_rec) * m).sum() / (m.sum() + 1e-5) / 3


def test_loss_matches_numpy_float64():
    model = tiny_pretrain().double()
    x = images(dtype=torch.float64)
    mask = tiny_masks().double()
    with torch.no_grad():
        loss = model(x, mask)
        x_rec = model.forward_decoder(model.forward_encoder(x, mask))
    assert loss.dtype == torch.float64
    np.testing.assert_allclose(loss.item(), numpy_loss(x, x_rec, mask), rtol=1e-9)
    # forward_loss alone, on an unrelated reconstruction and a one-token mask (where the 1e-5
    # and the per-pixel (not per-value) count in the denominator matter most).
    other = images(seed=1, dtype=torch.float64)
    one = torch.zeros(2, 8, 8, dtype=torch.float64)
    one[1, 3, 5] = 1
    got = model.forward_loss(x, other, one).item()
    np.testing.assert_allclose(got, numpy_loss(x, other, one), rtol=1e-9)
    # The loader's int64 mask gives the same loss up to the float32 denominator (official).
    got_int = model.forward_loss(x, other, one.long()).item()
    np.testing.assert_allclose(got_int, got, rtol=1e-6)


def test_zero_mask_matches_the_finetune_encoder():
    pre = tiny_pretrain(seed=1)
    torch.manual_seed(2)
    fine = S.SimMIMFinetuneTorch(**TINY, num_classes=5, drop_path_rate=0.0).eval()
    state = {k[len("encoder."):]: v for k, v in pre.state_dict().items()
             if k.startswith("encoder.") and k != "encoder.mask_token"}
    state.update({k: v for k, v in fine.state_dict().items() if k.startswith("head.")})
    fine.load_state_dict(state, strict=True)
    x = images()
    with torch.no_grad():
        z = pre.forward_encoder(x, torch.zeros(2, 8, 8, dtype=torch.int64))
        tokens = fine.forward_tokens(x)
        pooled = fine.forward_features(x)
        logits = fine(x)
        masked = pre.forward_encoder(x, tiny_masks())
    assert z.shape == (2, 32, 4, 4)
    torch.testing.assert_close(z, tokens.transpose(1, 2).reshape(2, 32, 4, 4), rtol=0, atol=0)
    torch.testing.assert_close(pooled, tokens.mean(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits, pooled @ fine.head.weight.T + fine.head.bias)
    assert (masked - z).abs().max() > 1e-3  # a real mask does change the features


def test_runs_in_float64():
    model32 = tiny_pretrain()
    model64 = tiny_pretrain().double()
    assert model64.encoder.layers[0].blocks[1].attn_mask.dtype == torch.float64
    assert model64.encoder.layers[0].blocks[0].attn.relative_position_index.dtype == torch.int64
    x, mask = images(), tiny_masks()
    with torch.no_grad():
        l32 = model32(x, mask)
        l64 = model64(x.double(), mask)
        z64 = model64.forward_encoder(x.double(), mask)
        z32 = model32.forward_encoder(x, mask)
    assert l64.dtype == torch.float64 and z64.dtype == torch.float64
    assert l64.item() != l32.item()  # really a different precision
    np.testing.assert_allclose(l64.item(), l32.item(), rtol=1e-5)
    torch.testing.assert_close(z64.float(), z32, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Construction from a model config
# ------------------------------------------------------------------------------------------------


def test_from_model_config():
    cfg = ml_collections.ConfigDict(dict(
        name="simmim", **TINY, mlp_ratio=4.0, qkv_bias=True, drop_path_rate=0.1,
        shift_windows=True, remat=False))
    pre = S.SimMIMPretrainTorch.from_model_config(cfg)
    assert layout(pre) == layout(tiny_pretrain())
    assert not any("absolute_pos_embed" in k for k in pre.state_dict())  # ape default False
    assert isinstance(pre.encoder.patch_embed.norm, nn.LayerNorm)  # patch_norm default True
    assert pre.encoder.layers[1].blocks[1].drop_path.p == pytest.approx(0.1)
    fine = S.SimMIMFinetuneTorch.from_model_config(cfg, num_classes=7)
    assert fine.head.weight.shape == (7, 32) and "mask_token" not in fine.state_dict()
    cfg.ape = True
    assert "encoder.absolute_pos_embed" in S.SimMIMPretrainTorch.from_model_config(cfg).state_dict()
    cfg.shift_windows = False
    with pytest.raises(ValueError, match="shift"):
        S.SimMIMPretrainTorch.from_model_config(cfg)
