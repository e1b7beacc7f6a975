"""Linear probing (mixmae_jax/eval/linear_probe.py): MAE's BatchNorm + linear head with LARS."""

import numpy as np

from mixmae_jax.eval.linear_probe import linear_probe


def clusters(seed, n, d=32, c=5, spread=1.0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((c, d)) * 2.0
    y = rng.integers(0, c, n)
    return (centers[y] + spread * rng.standard_normal((n, d))).astype(np.float32), y


def test_separable_features_are_learned_and_scale_does_not_matter():
    """Well-separated classes: near 100% on held-out features; BatchNorm makes the probe blind
    to the features' scale and offset."""
    x, y = clusters(0, 600)
    tx, ty = x[:400], y[:400]
    qx, qy = x[400:], y[400:]
    acc = linear_probe(tx, ty, qx, qy, num_classes=5, epochs=20, warmup_epochs=2,
                       batch_size=64, base_lr=50.0)
    assert acc["top1"] > 0.95 and acc["top5"] == 1.0
    scaled = linear_probe(tx * 300 + 7, ty, qx * 300 + 7, qy, num_classes=5, epochs=20,
                          warmup_epochs=2, batch_size=64, base_lr=50.0)
    assert abs(scaled["top1"] - acc["top1"]) <= 0.02


def test_random_labels_do_not_generalise():
    """Labels unrelated to the features: whatever the probe fits, test accuracy stays near
    chance (0.2 for 5 classes)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((800, 32)).astype(np.float32)
    y = rng.integers(0, 5, 800)
    acc = linear_probe(x[:600], y[:600], x[600:], y[600:], num_classes=5, epochs=20,
                       warmup_epochs=2, batch_size=64, base_lr=50.0)
    assert acc["top1"] < 0.35 and acc["train_top1"] > acc["top1"]


def test_the_default_base_lr_learns_a_small_dataset():
    """The default base lr is the official 0.1 scaled by ImageNet-1k's size over the training
    set's: the same lr x steps as the official probe. On 300 examples (1 step per epoch) the
    official 0.1 barely moves the head; the default learns the classes."""
    from mixmae_jax.eval.linear_probe import default_base_lr

    assert default_base_lr(1_281_167) == 0.1 and round(default_base_lr(1200), 1) == 106.8
    x, y = clusters(2, 500, spread=2.0)
    official = linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=5, base_lr=0.1)
    default = linear_probe(x[:300], y[:300], x[300:], y[300:], num_classes=5)
    assert default["top1"] > 0.9 and default["top1"] > official["top1"] + 0.2, (default,
                                                                               official)
