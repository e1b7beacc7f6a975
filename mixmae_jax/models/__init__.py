"""Backbones, found by `config.model.name`: `models/<name>.py` defines the modules, its variants
(`model_config(variant, ...)`), `check_config(model_cfg, check)` and `load(source, source_cfg,
target, target_cfg)` (a trained encoder into another model of the family, `loading.py`); adding
one is adding a file."""

import importlib

NAMES = ("swin", "vit", "ummae_swin", "pvt")


def get_model_module(name: str):
    """`mixmae_jax.models.<name>`; ValueError naming `model.name` if there is none."""
    if name not in NAMES:
        raise ValueError(f"model.name: unknown model {name!r} (known: {', '.join(NAMES)})")
    return importlib.import_module(f"mixmae_jax.models.{name}")
