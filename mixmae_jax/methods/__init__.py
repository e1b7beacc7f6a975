"""Pretraining methods, found by `config.method.name` (one module per method)."""

import importlib


def get_method(config):
    """`mixmae_jax.methods.<name>.Method(config)`; adding a method is adding a module."""
    name = config.method.name
    try:
        module = importlib.import_module(f"mixmae_jax.methods.{name}")
    except ModuleNotFoundError as e:
        raise ValueError(f"config.method.name: unknown method {name!r}") from e
    return module.Method(config)
