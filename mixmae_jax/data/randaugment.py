"""timm's RandAugment as TF ops, for the fine-tuning recipes (`augment.randaug`).

Policy strings follow timm (`rand_augment_transform`): "rand-m9-mstd0.5-inc1" = 2 ops per image
(`n`), magnitude 9 of 10 (`m`) drawn per op from N(9, 0.5) and clipped to [0, 10] (`mstd`), the
"increasing" op set (`inc1`: a larger magnitude is always a stronger change). Each chosen op
(uniformly, with replacement) is applied with probability 0.5. The 15 ops and their magnitude
mappings are timm's (`timm/data/auto_augment.py`), each the PIL operation timm calls:

  AutoContrast, Equalize, Invert                          (no magnitude)
  Rotate: +-30 * m/10 degrees        ShearX/Y: +-0.3 * m/10         TranslateX/YRel: +-0.45 * m/10
  Posterize: keep 4 - int(4 * m/10) bits                  Solarize: threshold 256 - int(256 m/10)
  SolarizeAdd: +int(110 * m/10) below 128
  Color/Contrast/Brightness/Sharpness: enhance factor 1 +- 0.9 * m/10

Geometric ops fill with the ImageNet mean (124, 116, 104) as timm's `img_mean`. Deviation: they
resample bilinearly (TF's projective transform has no bicubic), where timm passes bicubic.
Everything random comes from a stateless seed, so an image's augmentation depends only on
(run seed, stream position). Images are uint8 [H, W, 3] in and out.
"""

from __future__ import annotations

import math
import re

from mixmae_jax.data.tf_setup import tf

_ALG = "philox"
FILL = (124, 116, 104)  # round(255 * ImageNet mean), timm's img_mean
OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
       "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
       "TranslateYRel")
OP_PROB = 0.5


def parse_policy(policy: str) -> dict:
    """'rand-m9-mstd0.5-inc1' -> {"n": 2, "m": 9.0, "mstd": 0.5}; ValueError naming the key."""
    parts = policy.split("-")
    if parts[0] != "rand":
        raise ValueError(f"augment.randaug={policy!r}: a timm RandAugment policy starts with "
                         "'rand-' (e.g. 'rand-m9-mstd0.5-inc1')")
    out = {"n": 2, "m": 10.0, "mstd": 0.0, "inc": 0}
    for part in parts[1:]:
        key = re.match(r"[a-z]+", part)
        value = part[key.end():] if key else ""
        if not key or key.group() not in ("n", "m", "mstd", "inc"):
            raise ValueError(f"augment.randaug={policy!r}: unknown field {part!r} (n, m, mstd, "
                             "inc)")
        try:
            out[key.group()] = float(value)
        except ValueError:
            raise ValueError(f"augment.randaug={policy!r}: {part!r} needs a number") from None
    if out["inc"] != 1:
        raise ValueError(f"augment.randaug={policy!r}: only the increasing op set ('inc1') is "
                         "implemented, as every official recipe uses")
    out["n"] = int(out["n"])
    return out


# -- pixel ops (uint8 in, uint8 out) ----------------------------------------------------------


def _lut(image, table):
    """Applies a per-channel lookup table int32 [3, 256]."""
    idx = tf.cast(image, tf.int32) + tf.constant([0, 256, 512])
    return tf.cast(tf.gather(tf.reshape(table, [-1]), idx), tf.uint8)


def auto_contrast(image):
    """PIL ImageOps.autocontrast (cutoff 0): each channel's [lo, hi] stretched to [0, 255]."""
    x = tf.cast(image, tf.float64)  # PIL computes the table in Python floats
    lo = tf.reduce_min(x, axis=[0, 1])[:, None]
    hi = tf.reduce_max(x, axis=[0, 1])[:, None]
    scale = 255.0 / tf.maximum(hi - lo, 1.0)
    i = tf.range(256, dtype=tf.float64)[None, :]
    table = tf.clip_by_value(tf.floor(i * scale + (-lo * scale)), 0, 255)
    table = tf.where(hi > lo, table, tf.broadcast_to(i, [3, 256]))
    return _lut(image, tf.cast(table, tf.int32))


def equalize(image):
    """PIL ImageOps.equalize: per channel, lut[i] = (step // 2 + cumsum(h)[:i]) // step with
    step = (count - count of the last non-empty bin) // 255; identity when step is 0."""
    tables = []
    for c in range(3):
        h = tf.math.bincount(tf.cast(image[..., c], tf.int32), minlength=256, maxlength=256)
        nonzero = tf.boolean_mask(h, h > 0)
        step = (tf.reduce_sum(h) - nonzero[-1]) // 255
        before = tf.concat([[0], tf.cumsum(h)[:-1]], axis=0)
        lut = (step // 2 + before) // tf.maximum(step, 1)
        tables.append(tf.where(step > 0, tf.clip_by_value(lut, 0, 255), tf.range(256)))
    return _lut(image, tf.stack(tables))


def posterize(image, bits):
    """Keep the top `bits` bits (bits >= 8: unchanged)."""
    mask = tf.bitwise.bitwise_and(tf.bitwise.left_shift(255, 8 - tf.clip_by_value(bits, 0, 8)),
                                  255)
    return tf.cast(tf.bitwise.bitwise_and(tf.cast(image, tf.int32), mask), tf.uint8)


def solarize(image, threshold):
    return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, add, threshold=128):
    x = tf.cast(image, tf.int32)
    return tf.cast(tf.where(x < threshold, tf.minimum(x + add, 255), x), tf.uint8)


def _grey(image):
    """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    x = tf.cast(image, tf.int32)
    return (x[..., 0] * 19595 + x[..., 1] * 38470 + x[..., 2] * 7471 + 0x8000) // 65536


def _blend(degenerate, image, factor):
    """PIL Image.blend(degenerate, image, factor): float32 arithmetic, truncated, clipped."""
    d = tf.cast(degenerate, tf.float32)
    out = d + tf.cast(factor, tf.float32) * (tf.cast(image, tf.float32) - d)
    return tf.cast(tf.clip_by_value(tf.floor(out), 0, 255), tf.uint8)


def color(image, factor):
    grey = tf.cast(_grey(image), tf.uint8)
    return _blend(tf.repeat(grey[..., None], 3, axis=-1), image, factor)


def contrast(image, factor):
    mean = tf.floor(tf.reduce_mean(tf.cast(_grey(image), tf.float64)) + 0.5)
    return _blend(tf.fill(tf.shape(image), tf.cast(mean, tf.float32)), image, factor)


def brightness(image, factor):
    return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor):
    """ImageEnhance.Sharpness: blend with PIL's SMOOTH filter (1 1 1 / 1 5 1 / 1 1 1, /13),
    the border pixels left as they are."""
    x = tf.cast(image, tf.float32)[None]
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "VALID")[0]
    smooth = tf.clip_by_value(tf.floor(smooth + 0.5), 0, 255)
    degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) + tf.cast(image, tf.float32) * tf.pad(
        tf.zeros_like(smooth), [[1, 1], [1, 1], [0, 0]], constant_values=1.0)
    return _blend(degenerate, image, factor)


# -- geometric ops ----------------------------------------------------------------------------


def affine(image, matrix):
    """PIL Image.transform(AFFINE, (a, b, c, d, e, f)): output (x, y) samples the input at
    (a x + b y + c, d x + e y + f) in pixel-centre coordinates; bilinear, FILL outside."""
    a, b, c, d, e, f = tf.unstack(tf.cast(matrix, tf.float32))
    # PIL samples at pixel centres (x + 0.5); TF's transform maps integer output coordinates.
    c = c + 0.5 * (a + b - 1.0)
    f = f + 0.5 * (d + e - 1.0)
    transform = tf.stack([a, b, c, d, e, f, 0.0, 0.0])[None]
    x = tf.cast(image, tf.float32)
    out = []
    for ch in range(3):  # one fill value per channel
        out.append(tf.raw_ops.ImageProjectiveTransformV3(
            images=x[None, ..., ch:ch + 1], transforms=transform,
            output_shape=tf.shape(image)[:2], fill_value=float(FILL[ch]),
            interpolation="BILINEAR", fill_mode="CONSTANT")[0, ..., 0])
    return tf.cast(tf.clip_by_value(tf.floor(tf.stack(out, -1) + 0.5), 0, 255), tf.uint8)


def rotate(image, degrees):
    """PIL Image.rotate(degrees) about the centre (counter-clockwise), size kept."""
    h = tf.cast(tf.shape(image)[0], tf.float32)
    w = tf.cast(tf.shape(image)[1], tf.float32)
    t = -degrees * math.pi / 180.0
    a, b = tf.cos(t), tf.sin(t)
    cx, cy = w / 2.0, h / 2.0
    # inverse map about the centre, as PIL builds it
    return affine(image, tf.stack([a, b, cx - a * cx - b * cy, -b, a, cy + b * cx - a * cy]))


def shear_x(image, s):
    return affine(image, tf.stack([1.0, s, 0.0, 0.0, 1.0, 0.0]))


def shear_y(image, s):
    return affine(image, tf.stack([1.0, 0.0, 0.0, s, 1.0, 0.0]))


def translate_x(image, pct):
    pixels = pct * tf.cast(tf.shape(image)[1], tf.float32)
    return affine(image, tf.stack([1.0, 0.0, pixels, 0.0, 1.0, 0.0]))


def translate_y(image, pct):
    pixels = pct * tf.cast(tf.shape(image)[0], tf.float32)
    return affine(image, tf.stack([1.0, 0.0, 0.0, 0.0, 1.0, pixels]))


# -- the policy -------------------------------------------------------------------------------


def apply_op(image, op: int, magnitude, negate):
    """Op `op` (index into OPS, a tensor) at `magnitude` in [0, 10]; `negate` flips the sign of
    signed magnitudes (timm's random negation)."""
    level = magnitude / 10.0
    sign = tf.where(negate, -1.0, 1.0)
    enhance = 1.0 + sign * level * 0.9
    branches = [
        lambda: auto_contrast(image),
        lambda: equalize(image),
        lambda: 255 - image,
        lambda: rotate(image, sign * level * 30.0),
        lambda: posterize(image, 4 - tf.cast(tf.floor(level * 4.0), tf.int32)),
        lambda: solarize(image, 256 - tf.cast(tf.floor(level * 256.0), tf.int32)),
        lambda: solarize_add(image, tf.cast(tf.floor(level * 110.0), tf.int32)),
        lambda: color(image, enhance),
        lambda: contrast(image, enhance),
        lambda: brightness(image, enhance),
        lambda: sharpness(image, enhance),
        lambda: shear_x(image, sign * level * 0.3),
        lambda: shear_y(image, sign * level * 0.3),
        lambda: translate_x(image, sign * level * 0.45),
        lambda: translate_y(image, sign * level * 0.45),
    ]
    return tf.switch_case(op, branches)


def rand_augment(image, seed, policy: dict):
    """`policy` (`parse_policy`) applied to one uint8 [H, W, 3] image, keyed by `seed`."""
    n = policy["n"]
    s_apply, s_op, s_mag = tf.unstack(tf.random.experimental.stateless_split(seed, 3, alg=_ALG))
    u = tf.random.stateless_uniform([n, 2], seed=s_apply, alg=_ALG)
    ops = tf.random.stateless_uniform([n], seed=s_op, maxval=len(OPS), dtype=tf.int32, alg=_ALG)
    mag = policy["m"] + policy["mstd"] * tf.random.stateless_normal([n], seed=s_mag, alg=_ALG)
    mag = tf.clip_by_value(mag, 0.0, 10.0)
    shape = image.shape
    for i in range(n):
        applied = apply_op(image, ops[i], mag[i], u[i, 1] < 0.5)
        image = tf.cond(u[i, 0] < OP_PROB, lambda a=applied: a, lambda im=image: im)
        image.set_shape(shape)
    return image
