"""PyTorch interop: mixmae-jax params <-> each method's official PyTorch state_dicts.

The only package of mixmae-jax that imports torch, and only where torch tensors are made or read:
`to_torch` (export, atomic `.pth` writer), `from_torch` (import, `--trust-pickle`, the
fine-tuning `--init` of an official `.pth`). The layouts are torch-free: `keymap.Layout` (rename
tables, leaf transposes, the official definition order, the official state_dict derived from the
JAX model's parameter paths) and one `<method>_layout.py` per method (constants, checks, fresh
heads). Nothing outside this package needs torch: a mixmae-jax checkpoint loads into another
mixmae-jax model natively (`models/loading.py`).
"""
