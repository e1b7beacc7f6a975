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


# The contract suite's cases (tests/test_methods.py): one tiny pretraining recipe per method of
# `methods.NAMES`, and the other backbones a method runs (UM-MAE's PVT and ViT, the UM-MAE
# paper's SimMIM baselines on its Swin and PVT) for the checks that compile nothing.
METHOD_RECIPES = {"mixmim": "mixmim_b.py", "mae": "mae_vit_b.py", "simmim": "simmim_swin_b.py",
                  "ummae": "ummae_swin_t.py", "mixedae": "mixedae_vit_b.py"}
BACKBONE_RECIPES = {**METHOD_RECIPES, "ummae-pvt": "ummae_pvt_s.py",
                    "ummae-vit": "ummae_vit_b.py", "simmim-ummae_swin": "simmim_ummae_swin_t.py",
                    "simmim-pvt": "simmim_ummae_pvt_s.py"}


def tiny(case: str, overrides=()):
    """The `:tiny` variant of a contract case (a METHOD_RECIPES or BACKBONE_RECIPES key)."""
    return load(BACKBONE_RECIPES[case], "tiny", list(overrides))
