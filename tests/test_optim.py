"""The optimiser against the official recipe: decay mask, lr schedule, AdamW, clipping, accum."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from recipes import mixmim_config

from mixmae_jax.train import optim


def _config(**optim_overrides):
    c = mixmim_config()
    c.batch_size = 512
    c.epochs = 10
    c.optim.base_lr = 1.5e-4
    c.optim.min_lr = 1e-6
    c.optim.warmup_epochs = 2
    c.optim.update(optim_overrides)
    return c


def _model_like_params():
    """The parameter kinds of the MixMIM model, at toy sizes, with its path layout."""

    def linear(i, o, bias=True):
        p = {"kernel": jnp.ones((i, o))}
        return {**p, "bias": jnp.zeros(o)} if bias else p

    def norm(d):
        return {"scale": jnp.ones(d), "bias": jnp.zeros(d)}

    block = {
        "norm1": norm(8),
        "attn": {
            "qkv": linear(8, 24),
            "proj": linear(8, 8),
            "relative_position_bias_table": jnp.zeros((49, 2)),
        },
        "norm2": norm(8),
        "mlp": {"fc1": linear(8, 32), "fc2": linear(32, 8)},
    }
    return {
        "encoder": {
            "patch_embed": {
                "proj": {"kernel": jnp.ones((4, 4, 3, 8)), "bias": jnp.zeros(8)},
                "norm": norm(8),
            },
            "layers": {
                0: {
                    "blocks": {0: block, 1: block},
                    "downsample": {"norm": norm(32), "reduction": linear(32, 16, False)},
                }
            },
            "norm": norm(16),
        },
        "decoder": {
            "mask_token": jnp.zeros((1, 1, 8)),
            "embed": linear(16, 8),
            "pred": linear(8, 48),
        },
    }


def test_decay_mask_matches_timm_add_weight_decay():
    mask = optim.decay_mask(_model_like_params())
    flat = {
        "/".join(str(k.key) for k in path): v
        for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]
    }
    decayed = {k for k, v in flat.items() if v}
    assert "encoder/layers/0/blocks/1/attn/qkv/kernel" in decayed
    assert "encoder/layers/0/blocks/0/attn/relative_position_bias_table" in decayed
    assert "encoder/patch_embed/proj/kernel" in decayed
    assert "encoder/layers/0/downsample/reduction/kernel" in decayed
    assert "decoder/mask_token" in decayed
    for k in flat.keys() - decayed:
        assert k.endswith(("bias", "scale")), k
    assert all(k.endswith(("kernel", "table", "mask_token")) for k in decayed)
    # 1-D: patch-embed bias + norm (3), 8 per block (16), merge norm, final norm, 2 decoder biases
    assert len(flat) - len(decayed) == 3 + 16 + 2 + 2 + 2


def _official_lr(step, spe, c):
    """`util/lr_sched.adjust_learning_rate` at fractional epoch step / steps_per_epoch."""
    lr, min_lr, warmup = c.optim.base_lr * c.batch_size / 256, c.optim.min_lr, c.optim.warmup_epochs
    e = step / spe
    if e < warmup:
        return lr * e / warmup
    progress = (e - warmup) / (c.epochs - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_schedule_matches_official_per_iteration_formula():
    c, spe = _config(), 7
    _, schedule = optim.make_optimizer(c, spe)
    assert optim.total_steps(c, spe) == 70 and optim.warmup_steps(c, spe) == 14
    assert optim.peak_lr(c) == pytest.approx(3e-4)
    # start, mid-warmup, end of warmup, mid-cosine, a fractional epoch, end, past the end
    for step, expected in [(0, 0.0), (7, 1.5e-4), (14, 3e-4), (42, None), (23, None), (70, 1e-6)]:
        expected = _official_lr(step, spe, c) if expected is None else expected
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(float(schedule(42)), (3e-4 + 1e-6) / 2, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(1000)), 1e-6, rtol=1e-6)


def test_multistep_schedule_matches_timm_with_warmup_lr():
    """SimMIM: warmup from warmup_lr (timm: init + t * (peak - init) / warmup_t), then
    peak * gamma ** (milestones passed), a milestone counting from its own step on."""
    c = _config(schedule="multistep", warmup_lr=1e-6, decay_epochs=(6,), decay_rate=0.1,
                lr_batch_divisor=512)
    spe = 7
    _, schedule = optim.make_optimizer(c, spe)
    peak = 1.5e-4 * 512 / 512
    assert optim.peak_lr(c) == pytest.approx(peak)
    for step, expected in [(0, 1e-6), (7, 1e-6 + 7 * (peak - 1e-6) / 14), (14, peak), (41, peak),
                           (42, peak * 0.1), (69, peak * 0.1)]:
        # optax interpolates in fp32 from the peak: a few roundings of the peak's size
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-6, atol=1e-6 * peak)


def test_timm_cosine_schedule_matches_timm_with_warmup_lr():
    """SimMIM fine-tuning: timm CosineLRScheduler(t_initial=total, lr_min, warmup_lr_init,
    warmup_t): init + t * (peak - init) / warmup_t, then min + (peak - min) / 2 *
    (1 + cos(pi * t / total)) with t counted from step 0 (no warmup prefix), min past the end."""
    c = _config(schedule="timm_cosine", warmup_lr=1e-6, min_lr=2e-6, lr_batch_divisor=512)
    spe = 7
    _, schedule = optim.make_optimizer(c, spe)
    peak = optim.peak_lr(c)

    def timm(t):
        if t < 14:
            return 1e-6 + t * (peak - 1e-6) / 14
        return 2e-6 + (peak - 2e-6) * 0.5 * (1 + math.cos(math.pi * min(t, 70) / 70))

    for step in (0, 5, 13, 14, 15, 40, 69, 70, 200):
        np.testing.assert_allclose(float(schedule(step)), timm(step), rtol=1e-6, atol=1e-6 * peak)
    # the cosine starts below the peak: its phase at the end of the warmup is already 14 / 70
    assert float(schedule(14)) < peak * 0.91


def test_no_decay_patterns_exempt_named_tensors():
    params = {"encoder": {"mask_token": jnp.ones((1, 1, 4)), "qkv": {"kernel": jnp.ones((4, 4)),
                                                                      "bias": jnp.ones(4)}},
              "decoder": {"0": {"kernel": jnp.ones((1, 1, 4, 8))}}}
    plain = optim.decay_mask(params)
    exempt = optim.decay_mask(params, no_decay=(r"^encoder/mask_token$",))
    assert plain["encoder"]["mask_token"] and not exempt["encoder"]["mask_token"]
    assert exempt["encoder"]["qkv"]["kernel"] and exempt["decoder"]["0"]["kernel"]
    assert not exempt["encoder"]["qkv"]["bias"]


def test_total_steps_override_keeps_warmup_fraction():
    c = _config()
    c.epochs, c.optim.warmup_epochs, c.total_steps = 600, 40, 60
    assert optim.total_steps(c, 1000) == 60
    assert optim.warmup_steps(c, 1000) == 4  # 40/600 of the run, not 40 epochs
    c.total_steps = 10**9  # longer than the recipe: warmup stays 40 epochs
    assert optim.warmup_steps(c, 1000) == 40_000
    c.total_steps, c.optim.warmup_epochs, c.epochs = 5, 3, 2  # warmup >= run: capped
    assert optim.warmup_steps(c, 10) == 5


def test_warmup_in_steps_wins_and_a_snapshot_without_it_counts_epochs():
    c = _config()
    c.total_steps, c.optim.warmup_steps = 600, 7  # the CPU runs: length and warmup in steps
    assert optim.warmup_steps(c, 1000) == 7
    c.total_steps = 5  # `--config.total_steps` below the warmup: capped
    assert optim.warmup_steps(c, 1000) == 5
    c.total_steps, c.optim.warmup_steps = -1, -1  # off: 2 epochs of 1000 steps
    assert optim.warmup_steps(c, 1000) == 2000
    del c.optim["warmup_steps"]  # a run's snapshot from before the key
    assert optim.warmup_steps(c, 1000) == 2000


def _toy():
    rng = np.random.default_rng(0)
    params = {
        "kernel": rng.normal(size=(3, 4)).astype(np.float32),
        "bias": rng.normal(size=(4,)).astype(np.float32),
        "mask_token": rng.normal(size=(1, 1, 4)).astype(np.float32),
    }
    grads = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for _ in range(4)
    ]
    return params, grads


def _run(tx, params, grads):
    p = jax.tree.map(jnp.asarray, params)
    state = tx.init(p)
    for g in grads:
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, updates)
    return jax.tree.map(np.asarray, p), state


def test_adamw_matches_pytorch_semantics():
    c = _config(warmup_epochs=0, weight_decay=0.05)
    c.epochs, spe = 1, 10
    tx, _ = optim.make_optimizer(c, spe)
    params, grads = _toy()
    got, _ = _run(tx, params, grads)

    # torch.optim.AdamW: p *= 1 - lr * wd (decayed tensors only); then the bias-corrected Adam step.
    b1, b2, eps, wd = c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay
    p = {k: v.astype(np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, g in enumerate(grads, start=1):
        lr = _official_lr(t - 1, spe, c)
        for k in p:
            if p[k].ndim >= 2:
                p[k] = p[k] * (1 - lr * wd)
            m[k] = b1 * m[k] + (1 - b1) * g[k]
            v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
            denom = np.sqrt(v[k]) / math.sqrt(1 - b2**t) + eps
            p[k] = p[k] - lr / (1 - b1**t) * m[k] / denom
    for k in p:
        np.testing.assert_allclose(got[k], p[k], rtol=0, atol=1e-6, err_msg=k)
    assert not np.allclose(got["kernel"], params["kernel"])


def test_clipping_scales_large_gradients_only():
    params, grads = _toy()
    plain, _ = optim.make_optimizer(_config(), 10)
    clipped, _ = optim.make_optimizer(_config(clip_grad_norm=0.5), 10)
    g = grads[:2]
    norms = [float(optax.tree.norm(x)) for x in g]
    assert min(norms) > 0.5
    scaled = [jax.tree.map(lambda x, n=n: x * (0.5 / n), x) for x, n in zip(g, norms)]
    a, _ = _run(clipped, params, g)
    b, _ = _run(plain, params, scaled)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7)
    small = [jax.tree.map(lambda x, n=n: x * (0.1 / n), x) for x, n in zip(g, norms)]
    a, _ = _run(clipped, params, small)
    b, _ = _run(plain, params, small)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_accumulation_is_left_to_the_train_step():
    # step.py averages micro-batch gradients before the update; the optimizer must not
    # accumulate again (optax.MultiSteps here would apply only every k-th step).
    params, grads = _toy()
    accum, _ = optim.make_optimizer(_config(warmup_epochs=0, grad_accum_steps=4), 10)
    plain, _ = optim.make_optimizer(_config(warmup_epochs=0), 10)
    assert jax.tree.structure(accum.init(params)) == jax.tree.structure(plain.init(params))
    a, _ = _run(accum, params, grads[:1])
    b, _ = _run(plain, params, grads[:1])
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["kernel"], params["kernel"])
