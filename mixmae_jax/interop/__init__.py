"""PyTorch interop: mixmae-jax params <-> each method's official PyTorch state_dicts.

The only package of mixmae-jax that imports torch, and only where torch tensors are made or read:
`to_torch` (export, atomic `.pth` writer), `from_torch` (import, `--trust-pickle`, the
fine-tuning `--init` of an official `.pth`). The layouts are torch-free: `keymap.Layout` (rename
tables, leaf transposes, the official definition order, the official state_dict derived from the
JAX model's parameter paths) and one `<method>_layout.py` per method (constants, checks, fresh
heads). Nothing outside this package needs torch: a mixmae-jax checkpoint loads into another
mixmae-jax model natively (`models/loading.py`).
"""


def layout_for(config):
    """The `keymap.Layout` of a run's official PyTorch models, from its `config.method` and
    `config.model` (a method's layout lives here, not in the method: the JAX core knows no
    PyTorch layout)."""
    method, model = config.method, config.model
    if method.name == "mixmim":
        from mixmae_jax.interop.mixmim_layout import MixMIMLayout

        return MixMIMLayout(model)
    if method.name == "mae":
        from mixmae_jax.interop.mae_layout import MAELayout

        return MAELayout(model)
    if method.name == "mixedae":
        from mixmae_jax.interop.mae_layout import MixedAELayout

        return MixedAELayout(model)
    if method.name == "simmim" and model.name == "swin":
        from mixmae_jax.interop.simmim_layout import SimMIMLayout

        return SimMIMLayout(model)
    if method.name in ("simmim", "ummae"):  # UM-MAE's models and the paper's SimMIM baseline
        from mixmae_jax.interop import ummae_layout

        return ummae_layout.layout_for(model, method)
    raise ValueError(f"method.name: no PyTorch layout for {method.name!r}")
