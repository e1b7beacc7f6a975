"""Evaluators, declared in the config and built by name (big_vision's `config.evals`):

    c.evals.knn = dict(type="knn", every_steps=250, source="digits", ...)      # pretraining
    c.evals.eval = dict(type="classification", every_epochs=1.0, split="validation", ...)

Each entry of `config.evals` is an evaluator of `type` (`TYPES`), run by the trainer on the
current params every `every_epochs` epochs (when > 0), else every `every_steps` steps (when > 0),
and at the end of the run; `every_steps=-1` runs it only at the end, `every_steps=0` (and
`every_epochs=0`) not at all. Its results go to the metrics as `<name>_<key>` (`knn_top1`,
`eval_top1`, ...). The modules here also hold what the evaluation tools use: frozen features, the
k-NN classifier and the linear probe.
"""

from __future__ import annotations

import importlib

# type -> (module, class); the module is imported when an evaluator of the type is built.
TYPES = {"knn": ("mixmae_jax.eval.knn", "KnnEvaluator"),
         "classification": ("mixmae_jax.eval.classification", "ClassificationEvaluator")}


class Evaluator:
    """What the trainer asks of an evaluator: when it is due, its results, its log line."""

    def __init__(self, name: str, cfg, exp):
        self.name, self.cfg, self.exp = name, cfg, exp

    def every(self) -> int:
        """Steps between runs: > 0 periodic, -1 at the end only, 0 never."""
        epochs = float(self.cfg.get("every_epochs", 0.0))
        if epochs > 0:
            return max(round(epochs * self.exp.steps_per_epoch), 1)
        return int(self.cfg.get("every_steps", 0))

    def due(self, step: int, total_steps: int) -> bool:
        every = self.every()
        return every != 0 and (step == total_steps or (every > 0 and step % every == 0))

    def __call__(self, params) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, step: int, results: dict) -> str:
        keys = ("top1", "top5", "loss")
        shown = "  ".join(f"{k.replace('top', 'top-')} {results[k]:.4f}" for k in keys
                          if k in results)
        return f"{self.name} step {step}: {shown}"


def _check(ok: bool, key: str, message: str) -> None:
    if not ok:
        from mixmae_jax.config import ConfigError

        raise ConfigError(f"{key}: {message}")


def check_config(config, *, num_devices: int, process_count: int) -> None:
    """Every evaluator's settings, each error naming its key; nothing is read."""
    for name, cfg in config.get("evals", {}).items():
        key = f"evals.{name}"
        kind = cfg.get("type", "")
        _check(kind in TYPES, f"{key}.type", f"{kind!r}: one of {', '.join(TYPES)}")
        _check(float(cfg.get("every_epochs", 0.0)) >= 0 and int(cfg.get("every_steps", 0)) >= -1,
               f"{key}.every_steps", "every_steps >= -1 (-1: at the end only, 0: never) and "
               "every_epochs >= 0")
        if int(cfg.get("every_steps", 0)) == 0 and not float(cfg.get("every_epochs", 0.0)):
            continue  # off
        b = cfg.batch_size
        _check(b is not None and b > 0 and b % num_devices == 0 and b % process_count == 0,
               f"{key}.batch_size", f"{b}: a positive multiple of the {num_devices} devices "
               f"and {process_count} processes")
        cls = _class(kind)
        cls.check_config(name, cfg, config, _check)


def _class(kind: str):
    module, name = TYPES[kind]
    return getattr(importlib.import_module(module), name)


def build(config, exp) -> list[Evaluator]:
    """The config's evaluators that run at all, for the experiment `exp`."""
    out = []
    for name, cfg in config.get("evals", {}).items():
        evaluator = _class(cfg.type)(name, cfg, exp)
        if evaluator.every() != 0:
            out.append(evaluator)
    return out
