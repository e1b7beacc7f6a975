"""Pretraining methods, found by `config.method.name` (one module per method, the contract in
`base.py`); adding a method is adding a module and its name here."""

import importlib

NAMES = ("mixmim", "mae", "simmim", "ummae", "mixedae")


def get_method(config):
    """`mixmae_jax.methods.<name>.Method(config)`."""
    name = config.method.name
    if name not in NAMES:
        raise ValueError(f"method.name: unknown method {name!r} (known: {', '.join(NAMES)})")
    return importlib.import_module(f"mixmae_jax.methods.{name}").Method(config)
