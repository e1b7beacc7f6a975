"""The recipes: one module per config file, each with `get_config(arg)`.

The tools load them by path (`--config configs/mixmim_b.py:tiny`); `mixmae_jax.config.load_config`
imports a file in this folder as `configs.<name>`, with the folder above it on sys.path, so the
recipes import each other (`from configs import common, mixmim_b`) from any working directory.
What they share is `common.py`.
"""
