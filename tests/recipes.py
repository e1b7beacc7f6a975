"""The shipped recipes, loaded as the tools load them (tests start from these, then shrink)."""

import os

from mixmae_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


def load(name: str, arg: str | None = None, overrides=()):
    """configs/<name>[:arg] with `--config.KEY=VALUE` overrides."""
    spec = os.path.join(CONFIGS, name) + (f":{arg}" if arg else "")
    return config_lib.load_config(spec, overrides)


def mixmim_config(arg: str | None = None, variant: str = "B"):
    return load(f"mixmim_{variant.lower()}.py", arg)


def mixmim_model(variant: str = "B", res: int = 224):
    """The `config.model` of MixMIM-<variant> at 224 (windows 14/14/14/7) or 384 (16/16/24/12)."""
    return mixmim_config(f"res={res}", variant).model


def override(config, overrides: dict):
    """Sets dotted keys ({"data.source": "tfds"}) on a config; returns it."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
