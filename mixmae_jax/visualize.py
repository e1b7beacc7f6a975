"""Reconstruction pictures: one row per image, the method's panels as columns (`panels` of the
method contract: the original, what the encoder saw, what the decoder predicted). Loading the
images and the user's mask file, and writing the grid, are shared here.
"""

from __future__ import annotations

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


def check_count(config, count: int) -> None:
    """ValueError naming --images unless `count` images form one batch of the run's method (as
    the config checks a batch: MixMIM pairs them, MixedAE mixes groups of its num_sources)."""
    from mixmae_jax import config as config_lib

    batch = config.copy_and_resolve_references()
    batch.batch_size = count
    batch.optim.grad_accum_steps = 1
    try:
        config_lib.validate(batch)
    except config_lib.ConfigError as e:
        if not str(e).startswith("batch_size: "):
            raise
        why = str(e).removeprefix("batch_size: ").removeprefix(f"{count}: ")
        raise ValueError(f"--images: {count} given, which this run cannot take as one batch "
                         f"({why})") from None


def load_mask(path: str, names: tuple[str, ...] = (), expects: str = ""):
    """The user's mask file: one array (a .npy, or an .npz holding one), or, for a method whose
    mask is several named arrays (`names`, UM-MAE's), the dict of an .npz's arrays. Errors name
    --mask, the file and, from `expects` (the method's `mask_help`), what it takes. Whether the
    arrays fit is the method's to say (`Method.mask_from_file`)."""
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise ValueError(f"--mask {path}: cannot read it ({e.strerror})") from None
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise ValueError(f"--mask {path}: not a NumPy .npy or .npz file (write the mask with "
                         "numpy.save or numpy.savez)")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                data = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"--mask {path}: not a readable NumPy array file ({e})") from None
    if names:
        if not isinstance(data, dict) or set(data) != set(names):
            got = f"arrays {', '.join(sorted(data))}" if isinstance(data, dict) else "one array"
            raise ValueError(f"--mask {path}: holds {got}; the run's method takes an .npz of "
                             f"arrays {', '.join(names)} ({expects})")
        return data
    if isinstance(data, dict):
        if len(data) != 1:
            raise ValueError(f"--mask {path}: an .npz of {len(data)} arrays "
                             f"({', '.join(sorted(data)) or 'none'}); the run's method takes "
                             f"one array ({expects})")
        (data,) = data.values()
    return data


def grid_image(columns: dict, title: str = "", pad: int = 2, min_size: int = 128) -> Image.Image:
    """One row per image, columns in the dict's order under their names, `title` above them,
    white padding. Images smaller than `min_size` are enlarged by pixel repetition so patches
    stay visible."""
    from PIL import ImageDraw, ImageFont

    cols = list(columns.values())
    factor = max(1, -(-min_size // cols[0].shape[1]))
    cols = [np.repeat(np.repeat(c, factor, axis=1), factor, axis=2) for c in cols]
    b, h, w, _ = cols[0].shape
    font = ImageFont.load_default(size=max(10, min(16, w // 10)))
    line = font.getbbox("Ag")[3] + 4
    top = line * (2 if title else 1) + pad
    grid = np.full((top + b * (h + pad), len(cols) * (w + pad) + pad, 3), 255, np.uint8)
    for i in range(b):
        for j, col in enumerate(cols):
            y, x = top + i * (h + pad), pad + j * (w + pad)
            grid[y:y + h, x:x + w] = col[i]
    image = Image.fromarray(grid)
    draw = ImageDraw.Draw(image)
    if title:
        draw.text((pad, 2), title, fill=(0, 0, 0), font=font)
    for j, name in enumerate(columns):
        x = pad + j * (w + pad) + w // 2
        draw.text((x, top - pad - 2), name, fill=(0, 0, 0), font=font, anchor="mb")
    return image


def save_grid(columns: dict, path: str, title: str = "") -> None:
    """`grid_image` written atomically to `path`, in the format of its extension (.png, .jpg)."""
    import io

    from mixmae_jax import outputs

    buffer = io.BytesIO()
    fmt = outputs.image_format(path)
    grid_image(columns, title).save(buffer, format=fmt, **({"quality": 95} if fmt == "JPEG"
                                                           else {}))
    outputs.write_bytes(path, buffer.getvalue())
