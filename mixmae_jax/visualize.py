"""Reconstruction pictures: one row per image, the method's panels as columns (`panels` of the
method contract: the original, what the encoder saw, what the decoder predicted). Loading the
images and the user's mask file, and writing the grid, are shared here.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image


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


def load_mask(path: str):
    """The array in a .npy file (or the dict of arrays in a .npz); errors name --mask and the
    file. Whether it fits is the method's to say (`Method.mask_from_file`)."""
    try:
        data = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
        raise ValueError(f"--mask {path}: no such file") from e
    except (OSError, ValueError) as e:
        raise ValueError(f"--mask {path}: not a numpy .npy/.npz array file ({e})") from e
    if isinstance(data, np.lib.npyio.NpzFile):
        with data:
            return {k: data[k] for k in data.files}
    return data


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
