"""The digits experiment's pieces (the whole run is `make experiment`, ~22 minutes)."""

import os

import jax
import pytest
from recipes import load

from mixmae_jax import digits_experiment as de
from mixmae_jax.methods import get_method
from mixmae_jax.train import step as step_lib


@pytest.mark.slow
def test_frozen_accuracy_of_an_encoder_on_the_digits():
    """k-NN and linear probe of a (random) tiny encoder's features: accuracies in (0.1, 1]
    (even random Swin features keep digits apart better than chance)."""
    c = load("digits.py")
    c.model.update(embed_dim=16, depths=(1, 1), num_heads=(2, 4), decoder_dim=32,
                   decoder_depth=1, decoder_num_heads=2)
    params = jax.jit(lambda: step_lib.init_params(get_method(c), jax.random.PRNGKey(0)))()
    acc = de.frozen_accuracy(c, params)
    assert set(acc) == {"knn", "linprobe"}
    assert 0.3 < acc["knn"] <= 1.0 and 0.3 < acc["linprobe"] <= 1.0


TOY_ENCODER = os.path.join(os.path.dirname(__file__), "data", "digits_toy_encoder.npz")


@pytest.mark.slow
def test_pretrained_encoder_beats_random_init_on_frozen_features():
    """The pretrained-vs-random toy: the encoder of configs/digits.py:toy after 1,000 MixMIM
    steps on the digits images without labels (shipped; 83.6% k-NN when made) against the same
    model from random init (64.0%): the probe machinery tells them apart in seconds. Margins are
    half the measured gaps (k-NN +19.6 points, linear probe +8.7)."""
    c = load("digits.py", "toy")
    init = jax.jit(lambda: step_lib.init_params(get_method(c), jax.random.PRNGKey(0)))()
    pretrained = de.load_toy_encoder(TOY_ENCODER, init)
    got = {name: de.frozen_accuracy(c, params)
           for name, params in (("pretrained", pretrained), ("random", init))}
    assert got["pretrained"]["knn"] - got["random"]["knn"] > 0.10, got
    assert got["pretrained"]["linprobe"] - got["random"]["linprobe"] > 0.04, got


def test_a_toy_encoder_of_another_shape_is_refused(tmp_path):
    c = load("digits.py", "toy")
    c.model.embed_dim = 16
    init = jax.jit(lambda: step_lib.init_params(get_method(c), jax.random.PRNGKey(0)))()
    with pytest.raises(ValueError, match="make the file again"):
        de.load_toy_encoder(TOY_ENCODER, init)


def test_table_reports_mean_and_spread_per_setting():
    runs = [{"seed": s, "labels": labels, "init": init, "top1": top1}
            for s, d in ((0, 0.0), (1, 0.02), (2, 0.04))
            for labels, init, top1 in (("10", "pretrained", 0.6 + d), ("10", "random", 0.5),
                                       ("all", "pretrained", 0.9), ("all", "random", 0.7 + d))]
    md = de.table({"frozen": {"pretrained": {"knn": 0.9, "linprobe": 0.95},
                              "random": {"knn": 0.7, "linprobe": 0.85}}, "finetune": runs})
    lines = md.splitlines()
    assert lines[2] == "| k-NN (k=20), frozen | 90.0 | 70.0 |"
    assert lines[4] == "| fine-tune, 10 labels per class | 62.0 ± 2.0 | 50.0 ± 0.0 |"
    assert lines[5] == "| fine-tune, all 1,200 labels | 90.0 ± 0.0 | 72.0 ± 2.0 |"
    assert "seeds [0, 1, 2]" in md


def test_the_experiment_needs_the_repository_configs(monkeypatch, tmp_path):
    monkeypatch.setattr(de, "CONFIG", str(tmp_path / "configs" / "digits.py"))
    with pytest.raises(FileNotFoundError, match="checkout"):
        de.main(["--workdir", str(tmp_path / "w")])
