"""The weighted k-NN monitor (mixmae_jax/eval/knn.py) against its definition."""

import numpy as np
import pytest

from mixmae_jax.eval import knn
from mixmae_jax.numerics import SAME_MATH_RTOL, rel_err


def brute_force(train, train_y, test, test_y, k, t, c):
    """Loops over queries: cosine similarities, the k largest vote with exp(s / t)."""
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for q, y in zip(qn, test_y):
        sim = tn @ q
        nearest = np.argsort(-sim, kind="stable")[:k]
        v = np.zeros(c)
        for i in nearest:
            v[train_y[i]] += np.exp(sim[i] / t)
        top1 += int(np.argmax(v) == y)
        top5 += int(y in np.argsort(-v, kind="stable")[:5])
    return top1 / len(test), top5 / len(test)


def test_features_equal_to_one_hot_labels_give_100_percent():
    labels = np.arange(100) % 10
    feats = np.eye(10, dtype=np.float32)[labels]
    acc = knn.knn_accuracy(feats, labels, feats, labels, k=5)
    assert acc == {"top1": 1.0, "top5": 1.0}


def test_matches_a_brute_force_classifier_in_chunks():
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((7, 16))
    train_y, test_y = rng.integers(0, 7, 300), rng.integers(0, 7, 101)
    train = centers[train_y] + 1.5 * rng.standard_normal((300, 16))
    test = centers[test_y] + 1.5 * rng.standard_normal((101, 16))
    got = knn.knn_accuracy(train, train_y, test, test_y, k=20, temperature=0.07, chunk=32)
    want = brute_force(train, train_y, test, test_y, 20, 0.07, 7)
    assert (got["top1"], got["top5"]) == pytest.approx(want)
    assert 0.2 < got["top1"] < 1.0  # a case where the votes decide, not a trivial one


def test_votes_are_the_summed_exp_of_similarity_over_temperature():
    """The votes themselves, not only the winner: each class sums exp(cos / T) over the query's k
    nearest. float32 cosines are off by a few U32, which 1/T = 14 turns into ~1e-6 relative in
    each weight: SAME_MATH_RTOL holds them, a wrong weight is off by far more."""
    rng = np.random.default_rng(1)
    train, train_y = rng.standard_normal((200, 8)), rng.integers(0, 5, 200)
    test = rng.standard_normal((9, 8))
    got = np.asarray(knn.votes(test, train, train_y, k=10, num_classes=5, temperature=0.07))
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    want = np.zeros((9, 5))
    for q in range(9):
        sim = tn @ (test[q] / np.linalg.norm(test[q]))
        for i in np.argsort(-sim)[:10]:
            want[q, train_y[i]] += np.exp(sim[i] / 0.07)
    assert rel_err(got, want) <= SAME_MATH_RTOL


def test_the_temperature_lets_close_neighbours_outvote_many_far_ones():
    """Two neighbours of class 0 at cosine 0.99 against three of class 1 at 0.6 (k = 5): at
    T = 0.07 the close ones win (2 e^14.1 against 3 e^8.6); at T = 10 the vote is almost a head
    count and class 1 wins."""
    angle = lambda c: [c, np.sqrt(1 - c * c)]  # noqa: E731
    train = np.array([angle(0.99), angle(0.99), angle(0.6), angle(0.6), angle(0.6)])
    train_y, query, label = np.array([0, 0, 1, 1, 1]), np.array([[1.0, 0.0]]), np.array([0])
    assert knn.knn_accuracy(train, train_y, query, label, k=5, temperature=0.07)["top1"] == 1.0
    assert knn.knn_accuracy(train, train_y, query, label, k=5, temperature=10.0)["top1"] == 0.0


def test_bad_input_names_the_argument():
    f, y = np.ones((4, 3)), np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="one D"):
        knn.knn_accuracy(f, y, np.ones((2, 5)), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="one entry per feature row"):
        knn.knn_accuracy(f, y[:3], f, y)
    with pytest.raises(ValueError, match=r"k=9 must lie in \[1, 4\]"):
        knn.knn_accuracy(f, y, f, y, k=9)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\)"):
        knn.knn_accuracy(f, y, f, y + 3, k=2, num_classes=2)


@pytest.mark.slow
def test_mixmae_eval_knn_on_a_pretraining_workdir(tmp_path, capsys):
    """A 2-step MAE run, then `mixmae-eval knn` on the embedded digits: one JSON line with the
    accuracies; the frozen features of even a barely trained encoder keep the digits apart."""
    import json

    from recipes import load

    from mixmae_jax import cli, tasks

    c = load("mae_vit_b.py", "tiny")
    c.total_steps = 2
    tasks.train(c, str(tmp_path / "w"), print_fn=lambda s: None)
    data_dir = str(tmp_path / "tfds")
    cli.eval_main(["knn", "--workdir", str(tmp_path / "w"), "--data-dir", data_dir])
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    assert result["method"] == "mae" and result["step"] == 2
    assert result["dataset"] == "mixmae_digits" and 0.3 < result["top1"] <= result["top5"] <= 1
    cli.eval_main(["linprobe", "--workdir", str(tmp_path / "w"), "--data-dir", data_dir,
                   "--epochs", "30", "--warmup-epochs", "3", "--probe-batch", "64",
                   "--base-lr", "50"])
    probe = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert probe["eval"] == "linprobe" and 0.3 < probe["top1"] <= probe["top5"] <= 1
    with pytest.raises(SystemExit) as e:
        cli.eval_main(["knn", "--workdir", str(tmp_path / "w"), "--data", "no_such_set",
                       "--data-dir", data_dir])
    assert e.value.code == 2
    assert "tfds dataset 'no_such_set': not found" in capsys.readouterr().err


@pytest.mark.slow
def test_pretraining_knn_monitor_equals_the_offline_tool(tmp_path, capsys):
    """`config.evals.knn` logs knn_top1/top5 beside the loss; at the last step they equal
    what `mixmae-eval knn` computes from the saved checkpoint."""
    import json
    import os

    from recipes import load

    from mixmae_jax import tasks
    from mixmae_jax.cli import eval_main

    c = load("mixmim_b.py", "tiny")
    c.model.update(img_size=32, embed_dim=16, depths=(1, 1), num_heads=(2, 4),
                   window_sizes=(4, 4), decoder_dim=32, decoder_depth=1, decoder_num_heads=2)
    c.data.update(source="digits", split="train", image_size=32)
    c.total_steps = 2
    c.evals.knn.update(every_steps=1, batch_size=300)
    workdir = str(tmp_path)
    lines = []
    tasks.train(c, workdir, print_fn=lines.append)
    assert sum(s.startswith("knn step") and "(k-NN, digits train -> test)" in s
               for s in lines) == 2
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    knn_rows = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in knn_rows] == [1, 2]
    assert all(0.0 <= r["knn_top1"] <= r["knn_top5"] <= 1.0 for r in knn_rows)
    capsys.readouterr()
    eval_main(["knn", "--workdir", workdir, "--data", "digits", "--crop-pct", "1.0"])
    offline = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert offline["step"] == 2
    assert offline["top1"] == knn_rows[-1]["knn_top1"]
    assert offline["top5"] == knn_rows[-1]["knn_top5"]
