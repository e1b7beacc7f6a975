"""Top-1 / top-5 accuracy and cross entropy of a classifier on a labelled split: the fine-tuning
evaluation (`config.evals.<name>.type = "classification"`).

Every example of the split is seen exactly once over all hosts (`data/eval_pipeline.py`: resize
the shorter side to size / crop_pct, bicubic, centre crop; the last batch padded and the padding
masked). The data set is the run's (`config.data`); the evaluator names its split.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mixmae_jax import imaging
from mixmae_jax.eval import Evaluator
from mixmae_jax.train import sharding
from mixmae_jax.train import step as step_lib

KEYS = ("image", "label", "valid")


def make_eval_step(graphdef, num_classes: int):
    """(params, batch) -> sums over the valid rows: count, top-1 / top-5 hits, loss."""

    def eval_step(params, batch):
        logits = step_lib.bind(graphdef, params)(imaging.normalize(batch["image"]))
        labels, valid = batch["label"], batch["valid"]
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        top5 = jax.lax.top_k(logits, min(5, num_classes))[1]
        hit1 = jnp.argmax(logits, axis=-1) == labels
        hit5 = jnp.any(top5 == labels[:, None], axis=-1)
        return {"count": jnp.sum(valid), "top1": jnp.sum(hit1 & valid),
                "top5": jnp.sum(hit5 & valid), "loss": jnp.sum(jnp.where(valid, loss, 0.0))}

    return eval_step


def evaluate(eval_step, params, iterator, batch_sharding) -> dict[str, float]:
    """Top-1 / top-5 accuracy and mean cross entropy over one pass of an `EvalIterator`."""
    totals = None
    for local in iterator:
        batch = {k: jax.make_array_from_process_local_data(batch_sharding, local[k])
                 for k in KEYS}
        out = eval_step(params, batch)
        totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    n = max(int(totals["count"]), 1)
    return {"top1": float(totals["top1"]) / n, "top5": float(totals["top5"]) / n,
            "loss": float(totals["loss"]) / n, "count": int(totals["count"])}


class ClassificationEvaluator(Evaluator):
    """`config.evals.<name>`: type "classification", split, batch_size (global), crop_pct."""

    @staticmethod
    def check_config(name, cfg, config, check) -> None:
        check(0.0 < cfg.crop_pct <= 1.0, f"evals.{name}.crop_pct", f"{cfg.crop_pct}: in (0, 1]")
        check(config.get("num_classes") is not None, f"evals.{name}.type",
              "a classification evaluator needs a classifier (config.num_classes)")

    def __init__(self, name, cfg, exp):
        from mixmae_jax.data import eval_pipeline

        super().__init__(name, cfg, exp)
        config = exp.config
        self._step = jax.jit(make_eval_step(exp.graphdef, config.num_classes),
                             in_shardings=(exp.state_shardings["params"],
                                           {k: exp.batch_sharding for k in KEYS}),
                             out_shardings=sharding.replicated(exp.mesh))
        self._iterator = eval_pipeline.EvalIterator(
            eval_pipeline.labelled_data(config.data), cfg.split,
            global_batch_size=cfg.batch_size, image_size=config.data.image_size,
            crop_pct=cfg.crop_pct, process_index=jax.process_index(),
            process_count=jax.process_count())

    def __call__(self, params) -> dict[str, float]:
        return evaluate(self._step, params, self._iterator, self.exp.batch_sharding)

    def describe(self, step: int, results: dict) -> str:
        return f"{super().describe(step, results)}  ({results['count']} images)"
