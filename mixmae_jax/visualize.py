"""Reconstruction pictures: originals, the mixed input, and both branches' reconstructions.

Image i is mixed with image B-1-i (the official pairing within a batch) using one mask on the
final-stage grid. Each row of the grid shows, for image i:

    original i | mixed input | branch 1: image i, its hidden patches predicted
               | branch 2: partner B-1-i, its hidden patches predicted

Predictions of a norm-pix model are per-patch normalised; they are mapped back to pixels with
the true patch's mean and variance (the usual MAE visualisation).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mixmae_jax import imaging
from mixmae_jax.methods import mixing
from mixmae_jax.methods.mixmim import MixMIMModel, dual_reconstruction_loss
from mixmae_jax.models import layers as L


def load_images(paths, size: int) -> np.ndarray:
    """uint8 (B, size, size, 3): resize the short side (bicubic) and centre-crop, if needed."""
    out = []
    for path in paths:
        try:
            img = Image.open(path).convert("RGB")
        except (OSError, ValueError) as e:
            raise ValueError(f"--images: cannot read {path}: {e}") from e
        if img.size != (size, size):
            w, h = img.size
            scale = size / min(w, h)
            img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                             Image.BICUBIC)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
        out.append(np.asarray(img, np.uint8))
    return np.stack(out)


def load_mask(path: str, grid: int) -> np.ndarray:
    """A 0/1 array on the final-stage grid (grid x grid, or flattened), 1 = token from partner."""
    mask = np.load(path)
    if mask.size != grid * grid:
        raise ValueError(f"--mask {path}: expected {grid}x{grid} = {grid * grid} values on the "
                         f"final-stage grid, got shape {mask.shape}")
    if not np.isin(mask, (0, 1)).all():
        raise ValueError(f"--mask {path}: values must be 0 or 1")
    return mask.reshape(-1).astype(np.float32)


def reconstruct(graphdef_bind, params, images_uint8, mask, norm_pix: bool):
    """Runs the model on one batch; returns (loss, dict of uint8 picture columns)."""
    model: MixMIMModel = graphdef_bind(params)
    enc = model.encoder
    b, size = images_uint8.shape[0], images_uint8.shape[1]
    masks = jnp.broadcast_to(jnp.asarray(mask), (b, mask.shape[-1]))
    images = imaging.normalize(jnp.asarray(images_uint8))

    @jax.jit
    def run(images, masks):
        rec = model.reconstruct(model.encode_mixed(images, masks, 1), masks)
        loss, aux = dual_reconstruction_loss(images, rec, masks, 1, enc.stride, norm_pix)
        return loss, aux, rec

    loss, aux, rec = run(images, masks)
    stride = enc.stride
    target = L.patchify(images, stride)
    pixels_of = lambda r, t: _unnormalize(r, t) if norm_pix else r  # noqa: E731
    partner_target = mixing.partner(target, 1)
    m = masks[..., None]
    # Branch 1 predicts image i where m = 1; branch 2 predicts the partner where m = 0.
    rec1 = target * (1 - m) + pixels_of(rec[:b], target) * m
    rec2 = partner_target * m + pixels_of(rec[b:], partner_target) * (1 - m)
    mixed = target * (1 - m) + partner_target * m
    cols = {
        "original": images,
        "mixed": L.unpatchify(mixed, stride, size, size),
        "branch1": L.unpatchify(rec1, stride, size, size),
        "branch2": L.unpatchify(rec2, stride, size, size),
    }
    return float(loss), {k: imaging.denormalize(v) for k, v in cols.items()}, {
        k: float(v) for k, v in aux.items()}


def _unnormalize(pred, target):
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, ddof=1, keepdims=True)
    return pred * jnp.sqrt(var + 1e-6) + mean


def save_grid(columns: dict, path: str, pad: int = 2, min_size: int = 128) -> None:
    """One row per image, columns in the dict's order, white padding; written atomically.

    Images smaller than `min_size` are enlarged by pixel repetition so patches stay visible.
    """
    cols = list(columns.values())
    factor = max(1, -(-min_size // cols[0].shape[1]))
    cols = [np.repeat(np.repeat(c, factor, axis=1), factor, axis=2) for c in cols]
    b, h, w, _ = cols[0].shape
    grid = np.full((b * (h + pad) + pad, len(cols) * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        for j, col in enumerate(cols):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = col[i]
    tmp = f"{path}.tmp"
    Image.fromarray(grid).save(tmp, format="PNG")
    os.replace(tmp, path)
