"""The method contract: everything the trainer, bench, visualize and the interop ask of a method.

A method is a module `methods/<name>.py` defining `Method(config)`, a subclass of `Method` below;
`config.method.name` finds it. It owns what differs between methods and nothing else:

* which model families it runs (`models`, matched against `config.model.name`) and its model:
  `build_model(rngs)`;
* its config checks: `check_config(config, num_devices, check)`, errors naming the key;
* its plan: `make_plan(rng, batch_size, num_groups)`, everything random about a batch (masks,
  pairing, mixing) drawn on device. `num_groups` is the number of device-local groups the batch
  is laid out in (one per data-parallel device); a method that mixes or shares a mask within a
  device's batch draws per group, the others ignore it;
* its loss: `loss(model, batch, plan, num_groups, rng)` -> (scalar loss, dict of scalar metrics),
  from the batch dict (`{"image": normalised float (B, H, W, 3), ...}`);
* what `mixmae-visualize` shows: `mask_from_file` (the official code's mask convention, documented
  in `mask_help`) and `panels(model, images, plan)`.

Its PyTorch layout (the official state_dicts) is PyTorch interop's: `interop.layout_for(config)`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax import models


class Method(abc.ABC):
    name: str = ""
    models: tuple[str, ...] = ()  # config.model.name values this method runs
    # Images each device's (micro-)batch must hold (MixMIM pairs images within it).
    min_images_per_group: int = 1

    def __init__(self, config):
        self.config = config
        self.model_cfg = models.with_defaults(config.model)  # an old snapshot may lack a key
        self.cfg = config.method
        self.dtype = jnp.dtype(config.compute_dtype)

    @property
    def compute_dtype(self):
        """None for float32 (the modules' default), else the compute dtype."""
        return None if self.dtype == jnp.float32 else self.dtype

    def check_config(self, config, num_devices: int, check: Callable) -> None:  # noqa: B027
        """Method-specific checks; `check(ok, key, message)` raises ConfigError naming the key.
        Nothing to check by default."""

    @abc.abstractmethod
    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        """The pretraining model (params float32; compute in `compute_dtype`)."""

    @abc.abstractmethod
    def make_plan(self, rng, batch_size: int, num_groups: int) -> dict:
        """Everything random about a batch except drop path, as arrays with a batch axis."""

    @abc.abstractmethod
    def loss(self, model, batch: dict, plan: dict, num_groups: int, rng=None):
        """(loss, metrics): scalar float32 loss and a dict of scalar metrics."""

    # -- mixmae-visualize ---------------------------------------------------------------------

    mask_help: str = ""
    # The named arrays of an .npz mask (UM-MAE's two); () for one array (a .npy, or an .npz of one).
    mask_arrays: tuple[str, ...] = ()

    @abc.abstractmethod
    def mask_from_file(self, mask: np.ndarray, batch_size: int, path: str) -> dict:
        """A plan from a user's mask in the official code's convention (`mask_help`); raises
        ValueError naming `--mask` and the file when the array does not fit."""

    @staticmethod
    def one_array(mask, path: str) -> np.ndarray:
        """The array of a --mask file that holds one (`.npy`); an `.npz` archive is refused."""
        if isinstance(mask, dict):
            raise ValueError(f"--mask {path}: expected one .npy array, got an .npz archive of "
                             f"{len(mask)} arrays ({', '.join(sorted(mask))})")
        return np.asarray(mask)

    @abc.abstractmethod
    def panels(self, model, images, plan) -> tuple[float, dict, dict]:
        """(loss, metrics, columns): columns are normalised (B, H, W, 3) images, one per panel,
        in display order (original first)."""

    # -- evaluation ---------------------------------------------------------------------------

    def features(self, model, images):
        """(B, C) frozen features of whole, unmasked images (k-NN, linear probe): the mean of the
        encoder's final tokens (patch tokens for a ViT) after its final norm."""
        return model.encoder.features(images)

    # -- fine-tuning ----------------------------------------------------------------------------

    # The official fine-tuning recipe's layer-wise lr decay rule (`tasks/layer_decay.py`).
    layer_decay_rule: str = "blocks"

    def build_classifier(self, num_classes: int, rngs: nnx.Rngs) -> nnx.Module:
        """The official fine-tuning model of `config.model` (a head of `num_classes`)."""
        from mixmae_jax.models.classifier import build_classifier

        return build_classifier(self.model_cfg, num_classes, dtype=self.compute_dtype, rngs=rngs)
