"""MixedAE (methods/mixedae.py): the balanced assignment, homologous attention, the contrastive
loss and recognition metric against brute force, exact invariants against MAE, what MAE's
layouts take of it, configs and the source ids of mask files. What every method must do
(conversion both ways, masks from files, training and resume) is the contract suite's
(test_methods.py).

There is no official code: the invariants below are what the method's definition fixes (oracle
attention = MAE per source; top-k over every key = full attention; without segment embeddings
the encoder cannot tell which slot a source occupies).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import FAST_COMPILE, abstract_model, random_params
from recipes import load
from references import mae as R

from mixmae_jax import config as config_lib
from mixmae_jax.interop import keymap as K
from mixmae_jax.interop import layout_for, to_torch
from mixmae_jax.methods import get_method
from mixmae_jax.methods import mixedae as M
from mixmae_jax.models import layers as L
from mixmae_jax.train.step import bind


def tiny(overrides=(), arg="tiny"):
    """ViT 32 px, 8-px patches (16 patches), 2 blocks; S = 4 sources of 4 patches each."""
    return load("mixedae_vit_b.py", arg, ["--config.method.num_sources=4", *overrides])


def setup(overrides=(), seed=0, batch=8):
    config = tiny(overrides)
    method = get_method(config)
    graphdef, abstract = abstract_model(lambda: method.build_model(L.InitKeys(0)))
    params = random_params(abstract, seed=seed)
    images = jax.random.normal(jax.random.key(seed + 1), (batch, 32, 32, 3))
    plan = method.make_plan(jax.random.key(seed + 2), batch, 1)
    return method, graphdef, params, images, plan


def test_assignment_is_balanced_per_mixed_sample():
    method = get_method(load("mixedae_vit_b.py"))  # ViT-B/16: 196 patches, S = 4
    plan = jax.jit(method.make_plan, static_argnums=(1, 2))(jax.random.key(0), 16, 2)
    source = np.asarray(plan["source"])
    assert source.shape == (4, 196)
    for row in source:
        assert np.bincount(row, minlength=4).tolist() == [49, 49, 49, 49]
    assert len({row.tobytes() for row in source}) == 4
    ids_keep, ids_restore, hidden = (np.asarray(a) for a in method.unmix_ids(plan["source"]))
    for i in range(16):
        own = np.flatnonzero(source[i // 4] == i % 4)
        np.testing.assert_array_equal(ids_keep[i], own)  # ascending own positions
        assert hidden[i].sum() == 147 and (hidden[i][own] == 0).all()
        assert sorted(ids_restore[i]) == list(range(196))


def encode_fn(method, graphdef):
    return jax.jit(lambda p, x, s: method.encode(bind(graphdef, p), x, s),
                   compiler_options=FAST_COMPILE)


def test_oracle_attention_is_mae_on_each_source():
    """With the same-source mask in every layer, each image's cls and tokens equal MAE's encoder
    fed that image's own patches (ViT has no cross-token operation outside attention)."""
    method, graphdef, params, images, plan = setup(["--config.method.attention=oracle"])
    latent, _ = encode_fn(method, graphdef)(params, images, plan["source"])
    ids_keep = method.unmix_ids(plan["source"])[0]

    def mae(p, x, ids):
        enc = bind(graphdef, p).encoder
        return enc.encode(jnp.take_along_axis(enc.embed(x), ids[..., None], axis=1))

    want = jax.jit(mae)(params, images, ids_keep)  # (B, 1 + K, C)
    s = 4
    for i in range(images.shape[0]):
        g, k = divmod(i, s)
        got = jnp.concatenate([latent[g, k:k + 1], latent[g, s + ids_keep[i]]], axis=0)
        err = float(jnp.max(jnp.abs(got - want[i])))
        assert err <= 1e-5 * float(jnp.max(jnp.abs(want[i]))), (i, err)


def test_topk_over_every_key_is_full_attention():
    method_full, graphdef, params, images, plan = setup(["--config.method.attention=full"])
    method_all = get_method(tiny(["--config.method.attention=topk", "--config.method.topk=20"]))
    a = encode_fn(method_full, graphdef)(params, images, plan["source"])[0]
    b = encode_fn(method_all, graphdef)(params, images, plan["source"])[0]
    np.testing.assert_array_equal(a, b)
    # ... and a real top-k changes the output
    method_k = get_method(tiny(["--config.method.attention=topk"]))
    c = encode_fn(method_k, graphdef)(params, images, plan["source"])[0]
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


@pytest.mark.parametrize("segment, leaks", [("none", False), ("encoder", True)])
def test_only_encoder_segment_embeddings_tell_the_encoder_the_slot(segment, leaks):
    """Swap which slot two sources occupy (their images and ids): without segment embeddings
    every image's predictions are unchanged, with them on the encoder input they change."""
    method, graphdef, params, images, plan = setup(
        [f"--config.method.segment_embedding={segment}"])
    s = 4
    perm = np.array([2, 1, 0, 3])  # slot j now holds the image that was in slot perm[j]
    b = images.shape[0]
    order = (np.arange(b) // s) * s + perm[np.arange(b) % s]
    inv = np.argsort(perm)
    source2 = jnp.asarray(inv[np.asarray(plan["source"])])

    def predictions(p, x, src):
        model = bind(graphdef, p)
        latent, _ = method.encode(model, x, src)
        return method.reconstruct(model, latent, src)

    fn = jax.jit(predictions, compiler_options=FAST_COMPILE)
    a = np.asarray(fn(params, images, plan["source"]))
    c = np.asarray(fn(params, images[order], source2))[np.argsort(order)]
    if leaks:
        assert np.max(np.abs(a - c)) > 1e-3
    else:
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5 * np.abs(a).max())


@pytest.mark.parametrize("across", [False, True])
def test_contrastive_loss_matches_a_brute_force_supcon(across):
    """Positives: the anchor's other tokens of the same source (and mixed sample); the
    denominator: every other token of its mixed sample, or of all mixed samples of its device
    batch (`contrast_across_samples`, here 2 devices of 2 mixed samples)."""
    method, graphdef, params, images, plan = setup(
        ["--config.method.contrast_temperature=0.5",
         f"--config.method.contrast_across_samples={across}"], batch=16)
    model = bind(graphdef, params)
    latent = jax.random.normal(jax.random.key(3), (4, 4 + 16, 32))
    source = plan["source"]
    got = float(method.contrastive_loss(model, latent, source, 2))
    z = np.asarray(latent)[:, 4:].astype(np.float64)
    z /= np.linalg.norm(z, axis=-1, keepdims=True)
    src = np.asarray(source)
    tokens = [(g, t) for g in range(4) for t in range(16)]
    losses = []
    for g, i in tokens:
        pool = [(h, t) for h, t in tokens if (h, t) != (g, i)
                and (h == g or (across and h // 2 == g // 2))]
        sims = {(h, t): z[g, i] @ z[h, t] / 0.5 for h, t in pool}
        log_den = np.log(np.sum(np.exp(list(sims.values()))))
        pos = [(h, t) for h, t in pool if h == g and src[h, t] == src[g, i]]
        losses.append(-np.mean([sims[p] - log_den for p in pos]))
    assert got == pytest.approx(np.mean(losses), rel=1e-5)


def test_recognition_accuracy_matches_brute_force():
    """The share of each patch query's top-N/S keys (all keys, per head) with its source."""
    rng = np.random.default_rng(0)
    s, n, heads, d = 4, 16, 2, 4
    qkv = rng.standard_normal((3, s + n, 3 * heads * d)).astype(np.float32)
    labels = np.concatenate([np.tile(np.arange(s), (3, 1)), rng.integers(0, s, (3, n))], 1)
    q, k, _ = qkv.reshape(3, s + n, 3, heads, d).transpose(2, 0, 3, 1, 4)
    logits = np.einsum("nhqd,nhkd->nhqk", q, k) / np.sqrt(d)
    hits = []
    for g in range(3):
        for h in range(heads):
            for i in range(s, s + n):
                top = np.argsort(-logits[g, h, i])[:n // s]
                hits.append(np.mean(labels[g, top] == labels[g, i]))
    for mode, kk in (("full", 0), ("topk", 4), ("topk", 9), ("oracle", 0)):
        rule = M.homologous(jnp.asarray(labels), mode, kk, s)
        _, got = L.attend(jnp.asarray(qkv), heads, scale_queries=False, restrict=rule)
        assert float(got) == pytest.approx(np.mean(hits), rel=1e-6), mode


def test_kth_largest_equals_a_sort():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 200)).astype(np.float32)
    x[:5, :10] = 3.0  # ties at the top
    x[5:10] *= 1e-6  # a narrow range
    for k in (1, 7, 49, 200):
        got = np.asarray(M.kth_largest(jnp.asarray(x), k))[:, 0]
        np.testing.assert_array_equal(got, np.sort(x, axis=-1)[:, -k])


def test_topk_attention_keeps_k_keys_per_query_and_head():
    rng = np.random.default_rng(1)
    qkv = jnp.asarray(rng.standard_normal((2, 10, 3 * 8)), jnp.float32)
    labels = jnp.zeros((2, 10), jnp.int32)
    out, _ = L.attend(qkv, 2, scale_queries=False, restrict=M.homologous(labels, "topk", 3, 1))
    q, k, v = np.asarray(qkv).reshape(2, 10, 3, 2, 4).transpose(2, 0, 3, 1, 4)
    logits = np.einsum("nhqd,nhkd->nhqk", q, k) / 2.0
    kth = np.sort(logits, axis=-1)[..., -3:-2]
    w = np.where(logits >= kth, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    w /= w.sum(-1, keepdims=True)
    assert ((w > 0).sum(-1) == 3).all()
    want = np.einsum("nhqk,nhkd->nqhd", w, v).reshape(2, 10, 8)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_exports_maes_pretraining_model_only_without_mixedaes_own_parts():
    """The encoder and decoder are MAE's: a MixedAE run without a contrastive projector exports
    to MAE's pretraining model (strict); one with it is refused naming `contrast_head`, as MAE's
    layout has no place for it, and still exports its encoder to models_vit (the contract suite
    checks the rest of the conversion)."""
    config = tiny(["--config.method.contrast_projector=16"])
    method = get_method(config)
    layout = layout_for(method.config)
    _, abstract = abstract_model(lambda: method.build_model(L.InitKeys(0)))
    params = random_params(abstract, seed=4)
    with pytest.raises(K.ConversionError, match="contrast_head"):
        to_torch.params_to_state_dict(params, layout)
    sd = to_torch.params_to_state_dict(params, layout, format="finetune", num_classes=5)
    R.MAEFinetuneTorch.from_model_config(config.model, num_classes=5).load_state_dict(sd,
                                                                                      strict=True)
    assert not any(k.startswith(("contrast_head", "segment_embed", "decoder")) for k in sd)
    plain = get_method(tiny())
    _, abstract = abstract_model(lambda: plain.build_model(L.InitKeys(0)))
    sd = to_torch.params_to_state_dict(random_params(abstract, seed=5), layout_for(plain.config))
    R.MAEPretrainTorch.from_model_config(config.model).load_state_dict(sd, strict=True)


@pytest.mark.parametrize("override, key", [
    ("--config.method.num_sources=3", "method.num_sources"),
    ("--config.method.attention=sparse", "method.attention"),
    ("--config.method.topk=99", "method.topk"),
    ("--config.method.segment_embedding=input", "method.segment_embedding"),
    ("--config.method.contrast_temperature=0.0", "method.contrast_temperature"),
    ("--config.batch_size=6", "batch_size"),
    ("--config.model.drop_path_rate=0.1", "model.drop_path_rate"),
])
def test_bad_values_are_refused_naming_the_key(override, key):
    with pytest.raises(config_lib.ConfigError, match=key.replace(".", r"\.")):
        config_lib.validate(tiny([override]))


def test_naive_mixing_baseline_config():
    c = load("mixedae_vit_b.py", "naive")
    config_lib.validate(c)
    assert (c.method.attention, c.method.contrast_weight) == ("full", 0.0)
    assert c.method.num_sources == 4 and get_method(c).topk() == 49


@pytest.mark.slow
def test_per_layer_attention_modes():
    c = tiny(["--config.method.attention=full,topk"])
    config_lib.validate(c)
    method = get_method(c)
    assert method.layer_modes() == ("full", "topk")
    model = method.build_model(L.InitKeys(0))
    images = jax.random.normal(jax.random.key(1), (8, 32, 32, 3))
    loss, metrics = method.loss(model, {"image": images}, method.make_plan(
        jax.random.key(2), 8, 1), 1)
    assert np.isfinite(float(loss)) and {"recognition_00", "recognition_01"} <= set(metrics)


def test_mask_from_file_holds_each_source_equally_often():
    """Source ids per mixed sample, each id exactly N/S times (the contract suite checks the
    rest of the file handling)."""
    method = get_method(tiny())
    source = np.repeat(np.arange(4), 4).reshape(4, 4)
    plan = method.mask_from_file(source, 8, "m.npy")
    np.testing.assert_array_equal(plan["source"], np.tile(source.reshape(1, 16), (2, 1)))
    with pytest.raises(ValueError, match=r"^--mask m.npy: every id 0..3 must appear exactly 4 "
                                         "times"):
        method.mask_from_file(np.zeros((4, 4), np.int64), 8, "m.npy")
