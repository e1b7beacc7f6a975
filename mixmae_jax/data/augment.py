"""The official MixMIM pretraining augmentation as TF ops: RandomResizedCrop + horizontal flip.

Matches torchvision's `RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=BICUBIC)` followed by
`RandomHorizontalFlip()`: up to 10 attempts at a window of random area and log-uniform aspect ratio,
then a centre-crop fallback. All randomness comes from stateless ops keyed by a per-example seed, so
an example's crop depends only on (run seed, its position in the stream), never on thread timing.

JPEG input is decoded and cropped in one step (`decode_and_crop_jpeg` decodes only the window);
other formats are decoded whole, then cropped. Output is uint8 [size, size, 3]; normalisation
happens on the device.
"""

import math

from mixmae_jax.data.tf_setup import tf

RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
_ALG = "philox"  # pinned so streams do not depend on which algorithm "auto_select" picks


def sample_crop_window(seed, height, width, scale=(0.2, 1.0), ratio=RATIO):
    """torchvision's RandomResizedCrop.get_params, vectorised over the 10 attempts.

    Args:
      seed: stateless seed, int [2].
      height, width: image size (scalars).
    Returns:
      int32 [4]: (top, left, crop_height, crop_width).
    """
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    h = tf.cast(height, tf.float32)
    w = tf.cast(width, tf.float32)
    u = tf.random.stateless_uniform([ATTEMPTS, 4], seed=seed, alg=_ALG)
    target_area = h * w * (scale[0] + u[:, 0] * (scale[1] - scale[0]))
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = tf.exp(log_lo + u[:, 1] * (log_hi - log_lo))
    # tf.round, like Python's round(), rounds halves to even.
    cw = tf.cast(tf.round(tf.sqrt(target_area * aspect)), tf.int32)
    ch = tf.cast(tf.round(tf.sqrt(target_area / aspect)), tf.int32)
    ok = (cw > 0) & (cw <= width) & (ch > 0) & (ch <= height)
    first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)  # first valid attempt
    ch_a, cw_a = ch[first], cw[first]
    top_a = tf.cast(u[first, 2] * tf.cast(height - ch_a + 1, tf.float32), tf.int32)
    left_a = tf.cast(u[first, 3] * tf.cast(width - cw_a + 1, tf.float32), tf.int32)
    # Centre-crop fallback: the whole image, clamped to the ratio range.
    in_ratio = w / h
    ch_f = tf.where(in_ratio < ratio[0], tf.cast(tf.round(w / ratio[0]), tf.int32), height)
    cw_f = tf.where(in_ratio > ratio[1], tf.cast(tf.round(h * ratio[1]), tf.int32), width)
    top_f, left_f = (height - ch_f) // 2, (width - cw_f) // 2
    found = tf.reduce_any(ok)
    return tf.stack(
        [
            # The clamps only guard against float32 rounding u * n up to n.
            tf.where(found, tf.minimum(top_a, height - ch_a), top_f),
            tf.where(found, tf.minimum(left_a, width - cw_a), left_f),
            tf.where(found, ch_a, ch_f),
            tf.where(found, cw_a, cw_f),
        ]
    )


def decode_crop(encoded, seed, scale=(0.2, 1.0)):
    """Decodes an encoded image (JPEG/PNG/BMP/GIF/WebP) and cuts a random-resized-crop window.

    Returns uint8 [h, w, 3] (the window, not yet resized). Raises a TF error on corrupt bytes.
    """

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = sample_crop_window(seed, shape[0], shape[1], scale)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        shape = tf.shape(image)
        top, left, ch, cw = tf.unstack(sample_crop_window(seed, shape[0], shape[1], scale))
        return image[top : top + ch, left : left + cw]

    return tf.cond(tf.io.is_jpeg(encoded), jpeg, other)


def random_resized_crop_flip(encoded, seed, size: int, scale=(0.2, 1.0), hflip: bool = True,
                             randaug: dict | None = None):
    """Encoded image bytes -> uint8 [size, size, 3]; deterministic given `seed` (int [2]).
    randaug: a parsed RandAugment policy applied after the flip (fine-tuning), or None."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2, alg=_ALG))
    crop = decode_crop(encoded, crop_seed, scale)
    # Antialiased bicubic, as PIL's bicubic resize that torchvision uses on images.
    image = tf.image.resize(crop, [size, size], method="bicubic", antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    if hflip:
        flip = tf.random.stateless_uniform([], seed=flip_seed, alg=_ALG) < 0.5
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
    image.set_shape([size, size, 3])
    if randaug:
        from mixmae_jax.data.randaugment import rand_augment

        ra_seed = tf.random.experimental.stateless_fold_in(seed, 2, alg=_ALG)
        image = rand_augment(image, ra_seed, randaug)
    return image
