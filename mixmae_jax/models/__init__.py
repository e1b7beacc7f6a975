"""Backbones, found by `config.model.name`. `models/<name>.py` defines

* `model_config(variant, ...)`: its variants, and the only place its config's defaults live;
* `check_config(model_cfg, check)`: geometry checks naming the key;
* `encoder(model_cfg, *, dtype, rngs, **options)`: its encoder (a `layers.Encoder`: `embed`,
  `encode`, the final tokens of a whole image, `features`), built from the config's keys;
* `classifier(model_cfg, num_classes, *, dtype, rngs)`: its official fine-tuning model, a
  `classifier.PooledClassifier`;
* `load(source, source_cfg, target, target_cfg)`: a trained encoder into another model of the
  family (`loading.py`).

Adding one is adding a file and its name here.
"""

import importlib

NAMES = ("swin", "vit", "ummae_swin", "pvt")


def get_model_module(name: str):
    """`mixmae_jax.models.<name>`; ValueError naming `model.name` if there is none."""
    if name not in NAMES:
        raise ValueError(f"model.name: unknown model {name!r} (known: {', '.join(NAMES)})")
    return importlib.import_module(f"mixmae_jax.models.{name}")


def with_defaults(model_cfg):
    """A copy of `model_cfg` with the keys it lacks taken from its module's `model_config()`.
    A config snapshot older than a key ran with the behaviour that the key's default keeps
    (a key is added with the old behaviour as its default), so an old workdir still builds."""
    out = model_cfg.copy_and_resolve_references()
    for key, value in get_model_module(model_cfg.name).model_config().items():
        if key not in out:
            out[key] = value
    return out
