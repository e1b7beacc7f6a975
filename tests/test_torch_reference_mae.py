"""Tests of the plain torch.nn MAE reference (tests/references/mae.py).

Full-size models (B/L/H) are only built on the ``meta`` device; behaviour is checked on a tiny
config (32 px, patch 8: a 4x4 grid of 16 patches). Expected layouts, counts and numerics are
written out independently here (loops, hand arithmetic, numpy / functional re-computations).
"""

import math

import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from references import mae as M
from torch import nn

TINY = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            mlp_ratio=4.0)
TINY_DEC = dict(decoder_dim=16, decoder_depth=1, decoder_num_heads=2)
L_TINY = 16  # (32 / 8) ** 2


def tiny_pretrain(seed=0, **kw):
    torch.manual_seed(seed)
    return M.MAEPretrainTorch(**TINY, **TINY_DEC, **kw).eval()


def tiny_finetune(seed=0, **kw):
    torch.manual_seed(seed)
    return M.MAEFinetuneTorch(**TINY, num_classes=10, **kw).eval()


def images(n=2, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g, dtype=dtype)


def noise_for(n=2, L=L_TINY, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, L, generator=g)


# ------------------------------------------------------------------------------------------------
# 1. state_dict layout (ViT-B) and parameter counts (B / L / H), on the meta device
# ------------------------------------------------------------------------------------------------


def block_entries(prefix, d, hidden):
    return [
        (f"{prefix}.norm1.weight", (d,)),
        (f"{prefix}.norm1.bias", (d,)),
        (f"{prefix}.attn.qkv.weight", (3 * d, d)),
        (f"{prefix}.attn.qkv.bias", (3 * d,)),
        (f"{prefix}.attn.proj.weight", (d, d)),
        (f"{prefix}.attn.proj.bias", (d,)),
        (f"{prefix}.norm2.weight", (d,)),
        (f"{prefix}.norm2.bias", (d,)),
        (f"{prefix}.mlp.fc1.weight", (hidden, d)),
        (f"{prefix}.mlp.fc1.bias", (hidden,)),
        (f"{prefix}.mlp.fc2.weight", (d, hidden)),
        (f"{prefix}.mlp.fc2.bias", (d,)),
    ]


def expected_pretrain_b():
    out = [
        ("cls_token", (1, 1, 768)),
        ("pos_embed", (1, 197, 768)),
        ("mask_token", (1, 1, 512)),
        ("decoder_pos_embed", (1, 197, 512)),
        ("patch_embed.proj.weight", (768, 3, 16, 16)),
        ("patch_embed.proj.bias", (768,)),
    ]
    for i in range(12):
        out += block_entries(f"blocks.{i}", 768, 3072)
    out += [("norm.weight", (768,)), ("norm.bias", (768,))]
    out += [("decoder_embed.weight", (512, 768)), ("decoder_embed.bias", (512,))]
    for i in range(8):
        out += block_entries(f"decoder_blocks.{i}", 512, 2048)
    out += [("decoder_norm.weight", (512,)), ("decoder_norm.bias", (512,))]
    out += [("decoder_pred.weight", (16 * 16 * 3, 512)), ("decoder_pred.bias", (768,))]
    return out


def expected_finetune_b(global_pool=True):
    out = [
        ("cls_token", (1, 1, 768)),
        ("pos_embed", (1, 197, 768)),
        ("patch_embed.proj.weight", (768, 3, 16, 16)),
        ("patch_embed.proj.bias", (768,)),
    ]
    for i in range(12):
        out += block_entries(f"blocks.{i}", 768, 3072)
    head = [("head.weight", (1000, 768)), ("head.bias", (1000,))]
    if global_pool:  # models_vit adds fc_norm after the timm constructor registered head
        out += head + [("fc_norm.weight", (768,)), ("fc_norm.bias", (768,))]
    else:
        out += [("norm.weight", (768,)), ("norm.bias", (768,))] + head
    return out


def layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_pretrain_b_state_dict_layout():
    with torch.device("meta"):
        model = M.mae_vit_base_patch16()
    assert layout(model) == expected_pretrain_b()
    assert len(model.state_dict()) == 254
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    assert frozen == ["decoder_pos_embed", "pos_embed"]
    assert not list(model.buffers())


@pytest.mark.parametrize("global_pool", [True, False])
def test_finetune_b_state_dict_layout(global_pool):
    with torch.device("meta"):
        model = M.vit_base_patch16(global_pool=global_pool)
    assert layout(model) == expected_finetune_b(global_pool)
    assert all(p.requires_grad for p in model.parameters())  # pos_embed is learnable here
    assert hasattr(model, "norm") != global_pool  # models_vit deletes norm with global pool


def block_params(d, ratio=4):
    h = d * ratio
    return 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * h + h) + (h * d + d)


SIZES = {  # patch, embed, depth (heads do not change the count)
    "B": (16, 768, 12),
    "L": (16, 1024, 24),
    "H": (14, 1280, 32),
}


def hand_counts(size):
    p, D, depth = SIZES[size]
    L = (224 // p) ** 2
    d = 512
    patch = D * 3 * p * p + D
    enc = patch + D + depth * block_params(D)  # + cls token
    pretrain_trainable = (
        enc + 2 * D  # norm
        + (D * d + d) + d  # decoder_embed, mask_token
        + 8 * block_params(d) + 2 * d  # decoder blocks, decoder_norm
        + (d * p * p * 3 + p * p * 3)  # decoder_pred
    )
    pretrain_total = pretrain_trainable + (L + 1) * D + (L + 1) * d  # + frozen sin-cos tables
    finetune = enc + (L + 1) * D + 2 * D + (D * 1000 + 1000)  # pos, fc_norm, head
    return pretrain_total, pretrain_trainable, finetune


def test_hand_counts_match_published_timm_vit_sizes():
    # The ViT-B/16, L/16, H/14 classifier sizes timm reports (86.57M, 304.33M, 632.05M): guards the
    # hand formula itself.
    assert [hand_counts(s)[2] for s in "BLH"] == [86_567_656, 304_326_632, 632_045_800]


@pytest.mark.parametrize("size", ["B", "L", "H"])
def test_parameter_counts(size):
    factories = {
        "B": (M.mae_vit_base_patch16, M.vit_base_patch16),
        "L": (M.mae_vit_large_patch16, M.vit_large_patch16),
        "H": (M.mae_vit_huge_patch14, M.vit_huge_patch14),
    }[size]
    with torch.device("meta"):
        pre, fin = factories[0](), factories[1]()
    total, trainable, ft = hand_counts(size)
    assert sum(p.numel() for p in pre.parameters()) == total
    assert sum(p.numel() for p in pre.parameters() if p.requires_grad) == trainable
    assert sum(p.numel() for p in fin.parameters()) == ft
    heads = {"B": 12, "L": 16, "H": 16}[size]
    assert pre.blocks[0].attn.num_heads == fin.blocks[0].attn.num_heads == heads
    assert pre.decoder_blocks[0].attn.num_heads == 16


# ------------------------------------------------------------------------------------------------
# 2. sin-cos tables
# ------------------------------------------------------------------------------------------------


def spot(dim, grid, r, c, j):
    """Entry j of the MAE table for grid token (r, c), from the formula, in float64 math."""
    q = dim // 4
    k = j % q
    w = 1.0 / 10000 ** (k / (dim / 4))
    pos = c if j < dim // 2 else r  # column first (meshgrid(w, h)), row second
    return math.sin(pos * w) if (j % (dim // 2)) < q else math.cos(pos * w)


@pytest.mark.parametrize("dim,grid", [(32, 4), (16, 4), (768, 14), (512, 16)])
def test_sincos_table_spot_values(dim, grid):
    t = M.sincos_pos_embed_2d_with_cls(dim, grid)
    assert t.shape == (1 + grid * grid, dim) and t.dtype == np.float32
    assert not t[0].any()  # cls row
    rng = np.random.default_rng(dim + grid)
    for _ in range(40):
        r, c, j = rng.integers(grid), rng.integers(grid), rng.integers(dim)
        assert t[1 + r * grid + c, j] == pytest.approx(spot(dim, grid, r, c, j), abs=1e-6)
    # Column, not row, in the first half: token (0, 1) has sin(1) at j = 0, token (1, 0) has 0.
    assert t[1 + 1, 0] == pytest.approx(math.sin(1.0), abs=1e-7)
    assert t[1 + grid, 0] == 0.0 and t[1 + grid, dim // 2] == pytest.approx(math.sin(1.0))


def test_sincos_table_is_float32_rounding_of_float64():
    dim, grid = 64, 6
    t = M.sincos_pos_embed_2d_with_cls(dim, grid)
    exact = np.array([[spot(dim, grid, r, c, j) for j in range(dim)]
                      for r in range(grid) for c in range(grid)])
    np.testing.assert_allclose(t[1:], exact.astype(np.float32), rtol=0, atol=1e-7)
    with pytest.raises(ValueError):
        M.sincos_pos_embed_2d_with_cls(30, 4)


def test_model_pos_tables_are_the_frozen_sincos_tables():
    m = tiny_pretrain()
    np.testing.assert_array_equal(m.pos_embed[0].numpy(), M.sincos_pos_embed_2d_with_cls(32, 4))
    np.testing.assert_array_equal(
        m.decoder_pos_embed[0].numpy(), M.sincos_pos_embed_2d_with_cls(16, 4))
    assert not m.pos_embed.requires_grad and not m.decoder_pos_embed.requires_grad
    loss, _, _ = m(images(), noise=noise_for())
    loss.backward()
    assert m.pos_embed.grad is None and m.cls_token.grad is not None


# ------------------------------------------------------------------------------------------------
# 3. patches and masking
# ------------------------------------------------------------------------------------------------


def test_patchify_layout_and_roundtrip():
    m = tiny_pretrain()
    x = images(3)
    p = 8
    pt = m.patchify(x)
    assert pt.shape == (3, 16, p * p * 3)
    # patch (i, j) at index i*4+j; element (r, c, ch) at (r*p + c)*3 + ch.
    for n, i, j, r, c, ch in [(0, 0, 0, 0, 0, 0), (1, 2, 3, 5, 1, 2), (2, 3, 1, 7, 6, 1)]:
        assert pt[n, i * 4 + j, (r * p + c) * 3 + ch] == x[n, ch, i * p + r, j * p + c]
    assert torch.equal(m.unpatchify(pt), x)


@pytest.mark.parametrize("ratio,keep", [(0.75, 4), (0.5, 8), (0.0, 16), (0.7, 4), (0.9, 1)])
def test_random_masking_with_given_noise(ratio, keep):
    m = tiny_pretrain()
    N, L, D = 3, L_TINY, 5
    x = torch.randn(N, L, D)
    noise = noise_for(N, L, seed=7)
    kept, mask, ids_restore = m.random_masking(x, ratio, noise)
    assert kept.shape == (N, keep, D)
    assert mask.shape == (N, L) and mask.sum(1).tolist() == [L - keep] * N
    order = np.argsort(noise.numpy(), axis=1, kind="stable")  # ascending: smallest kept
    for n in range(N):
        kept_idx = order[n, :keep]
        np.testing.assert_array_equal(kept[n].numpy(), x[n, kept_idx].numpy())
        expect = np.ones(L)
        expect[kept_idx] = 0
        np.testing.assert_array_equal(mask[n].numpy(), expect)
        # ids_restore is the inverse permutation of the ascending-noise order
        np.testing.assert_array_equal(order[n][ids_restore[n].numpy()], np.arange(L))
    assert ids_restore.dtype == torch.int64


def test_random_masking_default_noise_is_torch_rand():
    m = tiny_pretrain()
    x = torch.randn(2, L_TINY, 4)
    torch.manual_seed(123)
    got = m.random_masking(x, 0.75)
    torch.manual_seed(123)
    ref = m.random_masking(x, 0.75, torch.rand(2, L_TINY))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    with pytest.raises(ValueError):
        m.random_masking(x, 0.75, torch.rand(2, L_TINY + 1))


# ------------------------------------------------------------------------------------------------
# 4. loss
# ------------------------------------------------------------------------------------------------


def numpy_loss(imgs, pred, mask, norm_pix, p=8, ddof=1):
    x = imgs.numpy().astype(np.float64)
    N, C, H, W = x.shape
    h = H // p
    tgt = np.zeros((N, h * h, p * p * C))
    for i in range(h):
        for j in range(h):
            patch = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]  # N C p p
            tgt[:, i * h + j] = patch.transpose(0, 2, 3, 1).reshape(N, -1)
    if norm_pix:
        tgt = (tgt - tgt.mean(-1, keepdims=True)) / np.sqrt(tgt.var(-1, ddof=ddof, keepdims=True)
                                                             + 1e-6)
    per = ((pred.numpy() - tgt) ** 2).mean(-1)
    m = mask.numpy()
    return (per * m).sum() / m.sum()


@pytest.mark.parametrize("norm_pix", [True, False])
def test_forward_loss_matches_numpy(norm_pix):
    m = tiny_pretrain(norm_pix_loss=norm_pix).double()
    imgs = images(2, dtype=torch.float64) * 0.3 + 0.1
    g = torch.Generator().manual_seed(5)
    pred = torch.randn(2, L_TINY, 192, generator=g, dtype=torch.float64)
    mask = (torch.rand(2, L_TINY, generator=g) < 0.75).double()
    got = m.forward_loss(imgs, pred, mask).item()
    assert got == pytest.approx(numpy_loss(imgs, pred, mask, norm_pix), rel=1e-6)
    if norm_pix:  # the biased variance would be measurably different: the test can tell
        assert got != pytest.approx(numpy_loss(imgs, pred, mask, True, ddof=0), rel=1e-6)


# ------------------------------------------------------------------------------------------------
# 5. building blocks against functional re-computations
# ------------------------------------------------------------------------------------------------


def functional_block(blk, x, heads):
    d = x.shape[-1]
    hd = d // heads
    h = F.layer_norm(x, (d,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    qkv = h @ blk.attn.qkv.weight.T + blk.attn.qkv.bias
    q, k, v = qkv.split(d, dim=-1)

    def heads_first(t):
        return t.reshape(*t.shape[:-1], heads, hd).transpose(-3, -2)

    att = F.scaled_dot_product_attention(heads_first(q), heads_first(k), heads_first(v))
    att = att.transpose(-3, -2).reshape(x.shape)
    x = x + att @ blk.attn.proj.weight.T + blk.attn.proj.bias
    h = F.layer_norm(x, (d,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    h = h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def test_block_matches_functional_vit_block():
    m = tiny_pretrain().double()
    for mod in m.modules():  # non-trivial norm parameters so the check sees them
        if isinstance(mod, nn.LayerNorm):
            with torch.no_grad():
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.2, 0.2)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    blk = m.blocks[0]
    torch.testing.assert_close(blk(x), functional_block(blk, x, 2), rtol=1e-12, atol=1e-12)
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    assert len(norms) == 2 * 2 + 1 + 2 * 1 + 1 and all(n.eps == 1e-6 for n in norms)
    assert blk.attn.scale == 16**-0.5


def test_encoder_matches_manual_gather():
    m = tiny_pretrain()
    with torch.no_grad():  # a non-zero cls row, so adding it (or not) is visible
        m.pos_embed[0, 0].normal_()
    x = images(2)
    noise = noise_for(2)
    latent, mask, _ = m.forward_encoder(x, 0.75, noise)
    assert latent.shape == (2, 1 + 4, 32)
    w = m.patch_embed.proj.weight  # (D, C, p, p) -> rows over (r, c, ch), patchify's order
    tok = m.patchify(x) @ w.permute(0, 2, 3, 1).reshape(32, -1).T + m.patch_embed.proj.bias
    tok = tok + m.pos_embed[0, 1:]
    order = torch.from_numpy(np.argsort(noise.numpy(), axis=1, kind="stable")[:, :4])
    seq = torch.stack([tok[n, order[n]] for n in range(2)])
    cls = (m.cls_token[0] + m.pos_embed[0, :1]).expand(2, 1, 32)
    h = torch.cat([cls, seq], 1)
    for blk in m.blocks:
        h = blk(h)
    h = F.layer_norm(h, (32,), m.norm.weight, m.norm.bias, eps=1e-6)
    torch.testing.assert_close(latent, h, rtol=1e-5, atol=1e-5)


def test_decoder_matches_manual_scatter():
    m = tiny_pretrain()
    with torch.no_grad():
        m.mask_token.normal_()  # make the filled positions distinguishable
    noise = noise_for(2)
    latent, mask, ids_restore = m.forward_encoder(images(2), 0.75, noise)
    pred = m.forward_decoder(latent, ids_restore)
    assert pred.shape == (2, L_TINY, 8 * 8 * 3)
    emb = m.decoder_embed(latent)
    order = np.argsort(noise.numpy(), axis=1, kind="stable")[:, :4]
    full = m.mask_token.expand(2, L_TINY, 16).clone()
    for n in range(2):
        for j, idx in enumerate(order[n]):
            full[n, idx] = emb[n, 1 + j]
    h = torch.cat([emb[:, :1], full], 1) + m.decoder_pos_embed
    for blk in m.decoder_blocks:
        h = blk(h)
    ref = m.decoder_pred(m.decoder_norm(h))[:, 1:]
    torch.testing.assert_close(pred, ref, rtol=1e-5, atol=1e-5)
    # consistent with the mask: the kept positions are exactly mask == 0
    kept = torch.zeros(2, L_TINY)
    kept[torch.arange(2)[:, None], torch.from_numpy(order)] = 1
    assert torch.equal(1 - kept, mask)


def test_forward_is_encoder_decoder_loss():
    m = tiny_pretrain()
    x, noise = images(2), noise_for(2)
    loss, pred, mask = m(x, 0.75, noise)
    latent, mask2, ids = m.forward_encoder(x, 0.75, noise)
    pred2 = m.forward_decoder(latent, ids)
    assert torch.equal(mask, mask2) and torch.equal(pred, pred2)
    assert torch.equal(loss, m.forward_loss(x, pred2, mask2))


# ------------------------------------------------------------------------------------------------
# 6. fine-tuning model
# ------------------------------------------------------------------------------------------------


def test_pretrained_encoder_loads_into_finetune_like_main_finetune():
    pre = tiny_pretrain()
    fin = tiny_finetune(seed=3)
    msg = fin.load_state_dict(pre.state_dict(), strict=False)
    # main_finetune.py:251-252 asserts exactly this set of missing keys with global pool
    assert set(msg.missing_keys) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert set(msg.unexpected_keys) == {k for k in pre.state_dict()
                                        if k.startswith(("mask_token", "decoder", "norm."))}


def test_finetune_features_global_pool_and_cls():
    pre = tiny_pretrain()
    x = images(2)
    fin = tiny_finetune(seed=3)
    fin.load_state_dict(pre.state_dict(), strict=False)
    with torch.no_grad():
        fin.fc_norm.weight.uniform_(0.5, 1.5)
        fin.fc_norm.bias.uniform_(-0.5, 0.5)
    # mask_ratio 0 and ascending noise keep every token in place: the full encoder
    ident = torch.arange(L_TINY, dtype=torch.float32).expand(2, L_TINY)
    latent, mask, _ = pre.forward_encoder(x, 0.0, ident)
    assert not mask.any()
    tokens = fin.forward_tokens(x)
    torch.testing.assert_close(
        F.layer_norm(tokens, (32,), pre.norm.weight, pre.norm.bias, eps=1e-6), latent)
    pooled = F.layer_norm(tokens[:, 1:].mean(1), (32,), fin.fc_norm.weight, fin.fc_norm.bias,
                          eps=1e-6)
    torch.testing.assert_close(fin.forward_features(x), pooled)
    torch.testing.assert_close(fin(x), pooled @ fin.head.weight.T + fin.head.bias)
    # cls-token variant (global_pool=False): norm(tokens)[:, 0], identical to the pretrain latent
    cls_model = tiny_finetune(seed=3, global_pool=False)
    cls_model.load_state_dict(pre.state_dict(), strict=False)
    torch.testing.assert_close(cls_model.forward_features(x), latent[:, 0])


@torch.no_grad()
def test_finetune_init():
    fin = tiny_finetune(seed=0, drop_path_rate=0.2)
    assert fin.pos_embed.requires_grad and fin.pos_embed.abs().max() > 0
    assert fin.cls_token.abs().max() > 0
    assert all(float(p.abs().max()) <= 2.0 for p in (fin.pos_embed, fin.cls_token))
    assert fin.head.bias.abs().max() == 0 and fin.blocks[0].attn.qkv.bias.abs().max() == 0
    assert float(fin.head.weight.std()) == pytest.approx(0.02, rel=0.25)
    assert isinstance(fin.blocks[0].drop_path, nn.Identity)  # rate 0 for the first block
    assert fin.blocks[1].drop_path.p == pytest.approx(0.2)  # linspace(0, rate, depth)
    M.init_head_for_finetune(fin)
    # std 2e-5 (the cutoff stays at +-2 in absolute units, so nothing is clipped)
    assert float(fin.head.weight.std()) == pytest.approx(2e-5, rel=0.25)


# ------------------------------------------------------------------------------------------------
# 7. init, dtype, config
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_pretrain_init():
    m = tiny_pretrain()
    for name, mod in m.named_modules():
        if isinstance(mod, nn.Linear):
            bound = math.sqrt(6 / (mod.in_features + mod.out_features))
            assert float(mod.weight.abs().max()) <= bound, name
            assert float(mod.weight.abs().max()) > 0.8 * bound, name
            assert not mod.bias.any(), name
        if isinstance(mod, nn.LayerNorm):
            assert torch.all(mod.weight == 1) and not mod.bias.any()
        if isinstance(mod, nn.GELU):
            assert mod.approximate == "none"
    conv = m.patch_embed.proj
    bound = math.sqrt(6 / (32 + 3 * 64))  # xavier on the (out, in*p*p) view
    assert bound * 0.8 < float(conv.weight.abs().max()) <= bound
    assert conv.bias.abs().max() > 0  # the official init leaves the conv bias at its default
    assert 0 < float(m.cls_token.abs().max()) < 0.2 and 0 < float(m.mask_token.abs().max()) < 0.2
    again = tiny_pretrain()
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  again.state_dict().values()))


def test_runs_in_float64():
    m = tiny_pretrain()
    x, noise = images(2), noise_for(2)
    loss32, pred32, _ = m(x, 0.75, noise)
    m64 = m.double()
    assert all(v.dtype == torch.float64 for v in m64.state_dict().values())
    loss64, pred64, mask64 = m64(x.double(), 0.75, noise)
    assert pred64.dtype == torch.float64 and loss64.dtype == torch.float64
    assert mask64.dtype == torch.float64
    torch.testing.assert_close(pred64.float(), pred32, rtol=1e-4, atol=1e-4)
    assert loss64.item() == pytest.approx(loss32.item(), rel=1e-5)
    fin = tiny_finetune().double()
    assert fin(x.double()).dtype == torch.float64


def test_from_model_config():
    cfg = ml_collections.ConfigDict(dict(
        name="mae", remat=False, drop_path_rate=0.0, **TINY, **TINY_DEC))
    m = M.MAEPretrainTorch.from_model_config(cfg)
    assert m.norm_pix_loss is True
    assert len(m.blocks) == 2 and len(m.decoder_blocks) == 1
    assert m.decoder_pred.weight.shape == (8 * 8 * 3, 16) and m.pos_embed.shape == (1, 17, 32)
    assert M.from_model_config(cfg, norm_pix_loss=False).norm_pix_loss is False
    official = dict(TINY, decoder_embed_dim=24, decoder_depth=1, decoder_num_heads=2)
    assert M.MAEPretrainTorch.from_model_config(official).mask_token.shape == (1, 1, 24)
    fin = M.MAEFinetuneTorch.from_model_config(cfg, num_classes=7, global_pool=False)
    assert fin.head.weight.shape == (7, 32) and hasattr(fin, "norm")
    fin = M.from_model_config(cfg, finetune=True)
    assert fin.head.weight.shape == (1000, 32) and hasattr(fin, "fc_norm")
    with pytest.raises(ValueError):
        M.MAEPretrainTorch.from_model_config(dict(cfg.to_dict(), depth=(1, 1)))


def test_patch_embed_rejects_other_sizes():
    m = tiny_pretrain()
    with pytest.raises(ValueError):
        m.patch_embed(torch.zeros(1, 3, 40, 40))
