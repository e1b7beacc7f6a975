"""Weighted k-nearest-neighbour classification of frozen features, the common SSL monitor (as in
DINO's `knn_classifier`): cosine similarity to every training feature, the k most similar vote for
their class with weight exp(similarity / T), the class with the largest summed weight wins.

Defaults k = 20, T = 0.07. Queries are processed in chunks so that only (chunk, train) similarities
live at once; top-5 accuracy counts a query as right when its class is among the five classes with
the largest votes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mixmae_jax.eval import Evaluator


def normalize(x):
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = jnp.asarray(x, jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def votes(queries, train, train_labels, *, k: int, num_classes: int, temperature: float):
    """(Q, num_classes) summed weights of each query's k nearest training features (cosine)."""
    sim = normalize(queries) @ normalize(train).T
    top_sim, top_idx = jax.lax.top_k(sim, k)
    weights = jnp.exp(top_sim / temperature)
    onehot = jax.nn.one_hot(train_labels[top_idx], num_classes, dtype=jnp.float32)
    return jnp.einsum("qk,qkc->qc", weights, onehot)


def knn_accuracy(train_features, train_labels, test_features, test_labels, *, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None,
                 chunk: int = 1024) -> dict[str, float]:
    """Top-1 and top-5 accuracy (fractions) of the weighted k-NN classifier.

    Raises ValueError naming the argument when shapes or labels do not fit."""
    train_features, test_features = np.asarray(train_features), np.asarray(test_features)
    train_labels = np.asarray(train_labels, np.int64)
    test_labels = np.asarray(test_labels, np.int64)
    if train_features.ndim != 2 or test_features.ndim != 2 or (
            train_features.shape[1] != test_features.shape[1]):
        raise ValueError(f"features must be (N, D) with one D: train {train_features.shape}, "
                         f"test {test_features.shape}")
    if train_labels.shape != (len(train_features),) or test_labels.shape != (
            len(test_features),):
        raise ValueError(f"labels must have one entry per feature row: train "
                         f"{train_labels.shape} for {len(train_features)}, test "
                         f"{test_labels.shape} for {len(test_features)}")
    if not 1 <= k <= len(train_features):
        raise ValueError(f"k={k} must lie in [1, {len(train_features)}] (the training features)")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    if train_labels.min() < 0 or max(train_labels.max(), test_labels.max()) >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes})")
    top1 = top5 = 0
    for start in range(0, len(test_features), chunk):
        v = np.asarray(votes(test_features[start:start + chunk], train_features, train_labels,
                             k=k, num_classes=num_classes, temperature=temperature))
        y = test_labels[start:start + chunk]
        top1 += int(np.sum(np.argmax(v, axis=1) == y))
        order = np.argsort(-v, axis=1, kind="stable")[:, :min(5, num_classes)]
        top5 += int(np.sum(np.any(order == y[:, None], axis=1)))
    n = len(test_features)
    return {"top1": top1 / n, "top5": top5 / n}


class FrozenFeatures:
    """`Method.features` of whole images, one labelled split at a time: every example once
    (centre crops, `data/eval_pipeline.py`), padding dropped, in the split's stored order.
    Jitted once over `mesh` (default: this host's first device); the features are replicated
    to every process. Used by `mixmae-eval`, the k-NN evaluator and the digits experiment."""

    def __init__(self, method, graphdef, *, mesh=None, params_sharding=None):
        from mixmae_jax import imaging
        from mixmae_jax.train import sharding
        from mixmae_jax.train.step import bind

        mesh = mesh if mesh is not None else sharding.single_device_mesh()
        self.batch_sh = sharding.batch_sharding(mesh)
        params_sharding = params_sharding or sharding.replicated(mesh)

        def features(params, batch):
            f = method.features(bind(graphdef, params), imaging.normalize(batch["image"]))
            return f.astype(jnp.float32), batch["label"], batch["valid"], batch["index"]

        keys = ("image", "label", "valid", "index")
        self._features = jax.jit(features, in_shardings=(params_sharding, {
            k: self.batch_sh for k in keys}), out_shardings=sharding.replicated(mesh))

    def __call__(self, params, data, split: str, *, batch_size: int, image_size: int,
                 crop_pct: float):
        """(features (N, C) float32, labels (N,)) of `split` of a `LabelledData`."""
        from mixmae_jax.data import eval_pipeline

        it = eval_pipeline.EvalIterator(
            data, split, global_batch_size=batch_size, image_size=image_size,
            crop_pct=crop_pct, process_index=jax.process_index(),
            process_count=jax.process_count())
        feats, labels, index = [], [], []
        for local in it:
            batch = {k: jax.make_array_from_process_local_data(self.batch_sh, v)
                     for k, v in local.items()}
            f, y, valid, i = map(np.asarray, self._features(params, batch))
            feats.append(f[valid])
            labels.append(y[valid])
            index.append(i[valid])
        order = np.argsort(np.concatenate(index))
        return np.concatenate(feats)[order], np.concatenate(labels)[order]


class KnnEvaluator(Evaluator):
    """k-NN accuracy of the current encoder (`config.evals.<name>.type = "knn"`): the frozen
    features (`FrozenFeatures`) of a labelled train split and test split of its own data set
    (`source`: "digits" or a prepared "tfds" `name`), weighted k-NN from one to the other."""

    @staticmethod
    def check_config(name, cfg, config, check) -> None:
        key = f"evals.{name}"
        check(cfg.source in ("digits", "tfds"), f"{key}.source",
              f"{cfg.source!r}: the k-NN evaluator needs labels ('digits' or 'tfds')")
        check(cfg.k >= 1 and cfg.temperature > 0, f"{key}.k", "k >= 1 and temperature > 0")

    def __init__(self, name, cfg, exp):
        from mixmae_jax.data import eval_pipeline

        super().__init__(name, cfg, exp)
        self.data = eval_pipeline.labelled_data(cfg)
        self.features = FrozenFeatures(exp.method, exp.graphdef, mesh=exp.mesh,
                                       params_sharding=exp.state_shardings["params"])
        self.image_size = exp.config.data.image_size

    def __call__(self, params) -> dict[str, float]:
        c = self.cfg
        (xf, xl), (qf, ql) = (
            self.features(params, self.data, split, batch_size=c.batch_size,
                          image_size=self.image_size, crop_pct=c.crop_pct)
            for split in (c.train_split, c.test_split))
        return knn_accuracy(xf, xl, qf, ql, k=c.k, temperature=c.temperature,
                            num_classes=self.data.num_classes)

    def describe(self, step: int, results: dict) -> str:
        c = self.cfg
        where = f"{c.source} {c.name if c.source == 'tfds' else ''}".strip()
        return (f"{super().describe(step, results)}  (k-NN, {where} {c.train_split} -> "
                f"{c.test_split})")
