"""MAE (facebookresearch/mae, `models_mae.py`): a ViT encodes a random 25% of the patches, a
light decoder fills in mask tokens and predicts the pixels of the removed ones.

Per-sample masking as the official code draws it: uniform noise per patch, `argsort`, keep the
first int(L * (1 - r)); drawn on device from the step's key. The encoder sees the kept patches
(position embedding added before the gather); the decoder puts its mask token at the removed
positions by the inverse permutation (`ids_restore`), adds its own sin-cos table, and predicts
every patch; the loss is the norm-pix MSE averaged over the removed patches only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax.methods import base
from mixmae_jax.methods.targets import patch_targets, pixels_of
from mixmae_jax.models import layers as L
from mixmae_jax.models import vit
from mixmae_jax.models.decoder import MAEDecoder


class MAEModel(nnx.Module):
    """Pretraining model: `encoder` (official `patch_embed`, `cls_token`, `blocks`, `norm`) and
    `decoder` (official `decoder_*`, `mask_token`)."""

    def __init__(self, cfg, *, dtype=None, rngs: nnx.Rngs):
        self.encoder = vit.encoder(cfg, dtype=dtype, rngs=rngs)
        grid = cfg.img_size // cfg.patch_size
        self.decoder = MAEDecoder(cfg.embed_dim, cfg.decoder_dim, cfg.decoder_depth,
                                  cfg.decoder_num_heads, grid, cfg.patch_size**2 * cfg.in_chans,
                                  mlp_ratio=cfg.mlp_ratio, eps=cfg.ln_eps,
                                  scan=self.encoder.scan, dtype=dtype, rngs=rngs)

    def __call__(self, images, plan, rng=None):
        """(B, L, p*p*3) predictions for every patch, from the kept patches of `plan`."""
        tokens = self.encoder.embed(images)
        kept = jnp.take_along_axis(tokens, plan["ids_keep"][..., None], axis=1)
        latent = self.encoder.encode(kept, rng)
        return self.decoder(latent, plan["ids_restore"])


def plan_from_order(ids_shuffle, num_keep: int):
    """The plan for a patch order: the first `num_keep` are kept, the rest removed."""
    ids_restore = jnp.argsort(ids_shuffle, axis=1)
    return {"ids_keep": ids_shuffle[:, :num_keep], "ids_restore": ids_restore,
            "mask": (ids_restore >= num_keep).astype(jnp.float32)}


class Method(base.Method):
    """MAE on a ViT (`config.model.name = "vit"`)."""

    name = "mae"
    models = ("vit",)
    mask_help = ("MAE: .npy (B, h, w) or (h, w) 0/1 on the patch grid (14x14 for ViT-B/16 at "
                 "224), 1 = patch removed, exactly L - int(L * (1 - mask_ratio)) ones per image "
                 "(147 of 196 at 0.75), as the official random_masking removes")

    def check_config(self, config, num_devices, check):
        m, r = config.model, config.method.mask_ratio
        check(0.0 < r < 1.0, "method.mask_ratio", f"{r} must lie inside (0, 1)")
        check(self.num_keep() >= 1, "method.mask_ratio",
              f"int({self.num_patches()} * (1 - {r})) = 0 patches would be kept")
        check(m.decoder_dim % 4 == 0 and m.decoder_dim % m.decoder_num_heads == 0,
              "model.decoder_dim", f"{m.decoder_dim} must be divisible by 4 and by "
              f"model.decoder_num_heads={m.decoder_num_heads}")

    def num_patches(self) -> int:
        return (self.model_cfg.img_size // self.model_cfg.patch_size) ** 2

    def num_keep(self) -> int:
        """Official `len_keep = int(L * (1 - mask_ratio))` (Python arithmetic)."""
        return int(self.num_patches() * (1 - self.cfg.mask_ratio))

    def build_model(self, rngs: nnx.Rngs) -> MAEModel:
        return MAEModel(self.model_cfg, dtype=self.compute_dtype, rngs=rngs)

    def make_plan(self, rng, batch_size: int, num_groups: int):
        """Per-sample masks (num_groups plays no part): the official noise-argsort draw."""
        noise = jax.random.uniform(rng, (batch_size, self.num_patches()))
        return plan_from_order(jnp.argsort(noise, axis=1), self.num_keep())

    def loss(self, model: MAEModel, batch, plan, num_groups: int, rng=None):
        images = batch["image"]
        pred = model(images, plan, rng)
        target = patch_targets(images, self.model_cfg.patch_size, self.cfg.norm_pix_loss)
        per_patch = jnp.mean((pred - target) ** 2, axis=-1)
        mask = plan["mask"]
        return jnp.sum(per_patch * mask) / jnp.sum(mask), {}

    # -- mixmae-visualize ---------------------------------------------------------------------

    def mask_from_file(self, mask, batch_size, path):
        grid = self.model_cfg.img_size // self.model_cfg.patch_size
        n, removed = grid * grid, self.num_patches() - self.num_keep()
        mask = self.one_array(mask, path)
        if mask.shape == (grid, grid):
            mask = np.broadcast_to(mask, (batch_size, grid, grid))
        if mask.shape != (batch_size, grid, grid):
            raise ValueError(f"--mask {path}: expected ({batch_size}, {grid}, {grid}) or "
                             f"({grid}, {grid}) on the patch grid, got shape {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"--mask {path}: values must be 0 or 1")
        counts = mask.reshape(batch_size, n).sum(axis=1)
        if (counts != removed).any():
            raise ValueError(f"--mask {path}: each image must have exactly {removed} removed "
                             f"patches (1s) at mask_ratio {self.cfg.mask_ratio}; got "
                             f"{counts.tolist()}")
        # Kept patches first, in ascending position (the encoder does not depend on their order).
        order = np.argsort(mask.reshape(batch_size, n), axis=1, kind="stable")
        return plan_from_order(jnp.asarray(order), self.num_keep())

    def panels(self, model: MAEModel, images, plan):
        """original | kept patches (removed ones grey) | kept patches + predicted removed ones."""
        p, size = self.model_cfg.patch_size, images.shape[1]
        pred = model(images, plan)
        target = patch_targets(images, p, self.cfg.norm_pix_loss)
        per_patch = jnp.mean((pred - target) ** 2, axis=-1)
        mask = plan["mask"]
        loss = jnp.sum(per_patch * mask) / jnp.sum(mask)
        patches = L.patchify(images, p)
        m = mask[..., None]
        filled = patches * (1 - m) + pixels_of(pred, patches, self.cfg.norm_pix_loss) * m
        columns = {"original": images,
                   "masked": L.unpatchify(patches * (1 - m), p, size, size),
                   "reconstruction": L.unpatchify(filled, p, size, size)}
        return loss, {}, columns
