"""MixMIM / MixMAE: mixed-token input, source-restricted attention, dual reconstruction.

Two images of a device-local batch (i and n-1-i) are mixed token by token with a mask on the
final-stage grid; the encoder attends only within each source image; the decoder reconstructs
both images from the one encoding (the tokens of the other image replaced by the mask token);
each patch is predicted by the branch in which it was hidden.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx

from mixmae_jax.methods import base, mixing
from mixmae_jax.methods.targets import patch_targets, pixels_of
from mixmae_jax.models import layers as L
from mixmae_jax.models import swin
from mixmae_jax.models.decoder import MixMIMDecoder


class MixMIMModel(nnx.Module):
    """Pretraining model: `encoder` (official `patch_embed`, `layers`, `norm`) + `decoder`."""

    def __init__(self, cfg, *, dtype=None, rngs: nnx.Rngs):
        self.encoder = swin.encoder(cfg, dtype=dtype, rngs=rngs)
        enc = self.encoder
        self.decoder = MixMIMDecoder(enc.out_dim, cfg.decoder_dim, cfg.decoder_depth,
                                     cfg.decoder_num_heads, enc.final_grid,
                                     enc.stride**2 * cfg.in_chans, mlp_ratio=cfg.mlp_ratio,
                                     scan=enc.scan, dtype=dtype, rngs=rngs)

    def mixed_tokens(self, images, mask, num_groups: int):
        """(tokens, source ids), both on the stage-1 grid: each image's patch embeddings mixed
        with its partner's (mask: (B, L_final), 1 = partner), and where each token comes from."""
        enc = self.encoder
        b = images.shape[0]
        tokens = enc.embed(images)
        fg = enc.final_grid
        token_mask = L.upsample_grid(mask.reshape(b, fg, fg), enc.grid // fg)
        mixed = L.blend(tokens, mixing.partner(tokens, num_groups), token_mask)
        return mixed, token_mask.astype(jnp.int32)

    def encode_mixed(self, images, mask, num_groups: int, rng=None):
        """Mix each image with its partner and encode, attention within each source."""
        return self.encoder.encode(*self.mixed_tokens(images, mask, num_groups), rng=rng)

    def reconstruct(self, z, mask):
        """Both branches in one decoder pass: (rec1, rec2), each (B, L, stride*stride*3).

        Branch 1 hides the partner's tokens (m = 1) and predicts image i there; branch 2 hides
        the own tokens (m = 0) and predicts the partner there. The two branches of a sample sit
        side by side (rows 2i, 2i+1), so the doubled batch splits over the devices as the batch
        does and nothing crosses between them (stacking them as [z; z] would move half of every
        device's rows to another device, and back in the backward pass).
        """
        both = lambda a, b: jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])  # noqa: E731
        rec = self.decoder(both(z, z), both(mask, 1.0 - mask))
        rec = rec.reshape(z.shape[0], 2, *rec.shape[1:])
        return rec[:, 0], rec[:, 1]

    def __call__(self, images, mask, num_groups: int, rng=None):
        return self.reconstruct(self.encode_mixed(images, mask, num_groups, rng), mask)


def dual_reconstruction_loss(images, rec, mask, num_groups: int, patch: int, norm_pix: bool):
    """Loss and the per-branch losses for logging.

    rec: (rec1, rec2), each (B, L, P), from `MixMIMModel.reconstruct`. The official loss stitches
    pred[i] = rec1[i] * m + rec2[partner(i)] * (1 - m) and takes the plain mean over every
    element (each patch counted once). Branch losses average the squared error over the patches
    that branch predicts (m = 1 for branch 1, m = 0 for branch 2).
    """
    target = patch_targets(images, patch, norm_pix)
    rec1, rec2 = rec
    m = mask[..., None]
    pred = rec1 * m + mixing.partner(rec2, num_groups) * (1.0 - m)
    loss = jnp.mean((pred - target) ** 2)
    err1 = jnp.mean((rec1 - target) ** 2, axis=-1)
    err2 = jnp.mean((rec2 - mixing.partner(target, num_groups)) ** 2, axis=-1)
    branch1 = jnp.sum(err1 * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    branch2 = jnp.sum(err2 * (1.0 - mask)) / jnp.maximum(jnp.sum(1.0 - mask), 1.0)
    return loss, {"loss_branch1": branch1, "loss_branch2": branch2}


class Method(base.Method):
    """MixMIM on a Swin encoder (`config.model.name = "swin"`)."""

    name = "mixmim"
    models = ("swin",)
    min_images_per_group = 2  # image i is mixed with image n-1-i of its device's batch
    layer_decay_rule = "mixmim"  # the official quirk: the head shares the last block's id
    mask_help = ("MixMIM: .npy (h, w) 0/1 on the final-stage grid (7x7 at 224), 1 = the token "
                 "comes from the partner image; the same mask for every image (official)")

    def check_config(self, config, num_devices, check):
        m, meth = config.model, config.method
        check(not m.shift_windows, "model.shift_windows", "MixMIM never shifts windows")
        check(m.ape == "sincos", "model.ape", "MixMIM adds the fixed sin-cos table ('sincos')")
        check(m.decoder_dim % 4 == 0 and m.decoder_dim % m.decoder_num_heads == 0,
              "model.decoder_dim", f"{m.decoder_dim} must be divisible by 4 and by "
              f"model.decoder_num_heads={m.decoder_num_heads}")
        cells = self.num_cells()
        final = int(round(cells**0.5))
        lo, hi = meth.mask_ratio, meth.mask_ratio + meth.range_mask_ratio
        check(0.0 < lo and hi < 1.0, "method.mask_ratio",
              f"mask ratio range [{lo}, {hi}] must lie inside (0, 1)")
        check(int(cells * lo) >= 1, "method.mask_ratio",
              f"int({cells} * {lo}) = 0 cells of the {final}x{final} mask grid would be mixed")

    def build_model(self, rngs: nnx.Rngs) -> MixMIMModel:
        return MixMIMModel(self.model_cfg, dtype=self.compute_dtype, rngs=rngs)

    def num_cells(self) -> int:
        m = self.model_cfg
        final = m.img_size // (m.patch_size * 2 ** (len(m.depths) - 1))
        return final * final

    def make_plan(self, rng, batch_size: int, num_groups: int):
        """Everything random about a batch except drop path: here, the mixing mask."""
        return {"mask": mixing.draw_mask(rng, batch_size, num_groups, self.num_cells(),
                                         self.cfg.mask_ratio, self.cfg.range_mask_ratio,
                                         self.cfg.mask_per_sample)}

    def loss(self, model: MixMIMModel, batch, plan, num_groups: int, rng=None):
        """batch["image"]: normalised float (B, H, W, 3). Returns (loss, branch losses)."""
        images, mask = batch["image"], plan["mask"]
        rec = model(images, mask, num_groups, rng)
        return dual_reconstruction_loss(images, rec, mask, num_groups, model.encoder.stride,
                                        self.cfg.norm_pix_loss)

    # -- mixmae-visualize ---------------------------------------------------------------------

    def mask_from_file(self, mask, batch_size, path):
        cells = self.num_cells()
        grid = int(round(cells**0.5))
        mask = self.one_array(mask, path)
        if mask.size != cells:
            raise ValueError(f"--mask {path}: expected {grid}x{grid} = {cells} values on the "
                             f"final-stage grid, got shape {mask.shape}")
        if not np.isin(mask, (0, 1)).all():
            raise ValueError(f"--mask {path}: values must be 0 or 1")
        row = jnp.asarray(mask.reshape(-1), jnp.float32)
        return {"mask": jnp.broadcast_to(row, (batch_size, cells))}

    def panels(self, model: MixMIMModel, images, plan):
        """original i | mixed input | branch 1: image i, its hidden cells predicted | branch 2:
        partner n-1-i, its hidden cells predicted (one device group: the pairs of the batch)."""
        mask = plan["mask"]
        stride = model.encoder.stride
        rec = model(images, mask, 1)
        loss, aux = dual_reconstruction_loss(images, rec, mask, 1, stride, self.cfg.norm_pix_loss)
        size = images.shape[1]
        target = L.patchify(images, stride)
        partner_target = mixing.partner(target, 1)
        unnorm = self.cfg.norm_pix_loss
        m = mask[..., None]
        rec1 = target * (1 - m) + pixels_of(rec[0], target, unnorm) * m
        rec2 = partner_target * m + pixels_of(rec[1], partner_target, unnorm) * (1 - m)
        mixed = target * (1 - m) + partner_target * m
        columns = {"original": images,
                   "mixed": L.unpatchify(mixed, stride, size, size),
                   "branch1": L.unpatchify(rec1, stride, size, size),
                   "branch2": L.unpatchify(rec2, stride, size, size)}
        return loss, aux, columns
