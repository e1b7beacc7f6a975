"""The fine-tuning recipes' batch augmentations, on device: timm's RandomErasing (mode "pixel"),
Mixup / CutMix (mode "batch") and label smoothing, as the official MixMIM, UM-MAE and MAE
fine-tuning scripts configure them.

Semantics follow timm (`timm/data/mixup.py`, `timm/data/random_erasing.py`), re-derived here:

* RandomErasing(p, mode="pixel", count 1): with probability p an image gets one box of area
  U(0.02, 1/3) of the image and aspect exp(U(log 0.3, log 1/0.3)), h = round(sqrt(area*aspect)),
  w = round(sqrt(area/aspect)), up to 10 tries for a box strictly smaller than the image, the
  box's top-left uniform over the positions where it fits; its pixels (normalised space) become
  N(0, 1) noise per pixel and channel. timm runs it per image in the data transform, so before
  Mixup; so does `augment_batch`.
* Mixup/CutMix, mode "batch": one draw for the whole (per-device) batch. With probability `prob`
  the batch is mixed; CutMix is chosen with probability `switch_prob` when both alphas are > 0,
  lam ~ Beta(alpha, alpha) of the chosen kind. Image i is mixed with image n-1-i (`x.flip(0)`).
  Mixup: lam * x + (1 - lam) * flip(x). CutMix: a box of side int(H * sqrt(1 - lam)) (same for
  W) centred at a uniform pixel, clipped to the image, is pasted from the partner, and lam
  becomes 1 - box area / image area (timm's correct_lam).
* Targets: smoothed one-hots (off = smoothing / C, on = 1 - smoothing + off), mixed with the
  same lam: lam * y_i + (1 - lam) * y_{n-1-i}; they sum to 1. The loss is the soft-target
  cross entropy.

The official code draws per GPU; here each device-local group (`num_groups`, as the pretraining
methods do) gets its own draw and pairs only within itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from mixmae_jax import parallel

ERASE_AREA = (0.02, 1.0 / 3.0)
ERASE_LOG_ASPECT = (math.log(0.3), math.log(1.0 / 0.3))
ERASE_ATTEMPTS = 10


def smooth_one_hot(labels, num_classes: int, smoothing: float):
    """(B,) labels -> (B, C): on = 1 - smoothing + smoothing / C, off = smoothing / C."""
    off = smoothing / num_classes
    return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32) * (1.0 - smoothing) + off


def soft_cross_entropy(logits, targets):
    """Mean over the batch of -sum(targets * log_softmax(logits)) (timm SoftTargetCrossEntropy)."""
    return jnp.mean(jnp.sum(-targets * jax.nn.log_softmax(logits.astype(jnp.float32)), axis=-1))


def erase_boxes(key, batch: int, height: int, width: int, prob: float):
    """(B, 4) int32 boxes (top, left, h, w) of timm's RandomErasing; h = w = 0: not erased."""
    k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    area = height * width * jax.random.uniform(k_area, (batch, ERASE_ATTEMPTS),
                                               minval=ERASE_AREA[0], maxval=ERASE_AREA[1])
    aspect = jnp.exp(jax.random.uniform(k_aspect, (batch, ERASE_ATTEMPTS),
                                        minval=ERASE_LOG_ASPECT[0], maxval=ERASE_LOG_ASPECT[1]))
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    fits = (h < height) & (w < width)
    first = jnp.argmax(fits, axis=1)  # the first attempt that fits (timm breaks there)
    pick = lambda a: jnp.take_along_axis(a, first[:, None], axis=1)[:, 0]  # noqa: E731
    h, w = pick(h), pick(w)
    erase = (jax.random.uniform(k_apply, (batch,)) < prob) & jnp.any(fits, axis=1)
    # randint(0, H - h) inclusive: floor(u * (H - h + 1)).
    top = jnp.floor(jax.random.uniform(k_top, (batch,)) * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_left, (batch,)) * (width - w + 1)).astype(jnp.int32)
    zero = jnp.zeros_like(h)
    return jnp.stack([top, left, jnp.where(erase, h, zero), jnp.where(erase, w, zero)], axis=1)


def box_mask(boxes, height: int, width: int):
    """(B, H, W) bool: inside each (top, left, h, w) box."""
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    top, left, h, w = (boxes[:, i, None, None] for i in range(4))
    return (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)


def random_erasing(key, images, prob: float):
    """timm RandomErasing(prob, mode="pixel") on normalised (B, H, W, C) images."""
    if prob <= 0:
        return images
    k_boxes, k_noise = jax.random.split(key)
    b, h, w, _ = images.shape
    inside = box_mask(erase_boxes(k_boxes, b, h, w, prob), h, w)[..., None]
    return jnp.where(inside, jax.random.normal(k_noise, images.shape, images.dtype), images)


def mix_params(key, height: int, width: int, *, mixup_alpha: float, cutmix_alpha: float,
               prob: float, switch_prob: float):
    """One batch's draw: (lam, cutmix box (top, left, h, w), use_cutmix). lam is already
    corrected to the box area for CutMix; lam = 1 (and an empty box) when not mixed."""
    k_mix, k_switch, k_lam, k_cy, k_cx = jax.random.split(key, 5)
    mixed = jax.random.uniform(k_mix) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    alpha = jnp.where(use_cutmix, max(cutmix_alpha, 1e-6), max(mixup_alpha, 1e-6))
    lam = jax.random.beta(k_lam, alpha, alpha)
    lam = jnp.where(mixed, lam, 1.0)
    use_cutmix = use_cutmix & mixed
    # timm rand_bbox: cut = int(size * sqrt(1 - lam)), centre uniform, clipped.
    ratio = jnp.sqrt(1.0 - lam)
    cut_h, cut_w = (jnp.floor(height * ratio).astype(jnp.int32),
                    jnp.floor(width * ratio).astype(jnp.int32))
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    y0, y1 = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    x0, x1 = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    box = jnp.where(use_cutmix, jnp.stack([y0, x0, y1 - y0, x1 - x0]), 0)
    box_lam = 1.0 - (box[2] * box[3]).astype(jnp.float32) / (height * width)
    return jnp.where(use_cutmix, box_lam, lam), box, use_cutmix


def mix_group(params, images, targets):
    """Mixup/CutMix of one device's batch with its draw (`mix_params`): image i with image
    n-1-i, one lam for all."""
    lam, box, use_cutmix = params
    _, h, w, _ = images.shape
    partner = images[::-1]
    pasted = jnp.where(box_mask(box[None], h, w)[0][None, ..., None], partner, images)
    blended = lam * images + (1.0 - lam) * partner
    images = jnp.where(use_cutmix, pasted, blended)
    return images, lam * targets + (1.0 - lam) * targets[::-1], lam


def augment_batch(key, images, labels, *, num_classes: int, num_groups: int, aug_cfg):
    """(images, soft targets (B, C), lam per group (G,)): random erasing, then Mixup/CutMix with
    label smoothing, each device-local group on its own; `aug_cfg` is `config.augment`."""
    k_erase, k_mix = jax.random.split(key)
    images = random_erasing(k_erase, images, aug_cfg.reprob)
    targets = smooth_one_hot(labels, num_classes, aug_cfg.smoothing)
    b, h, w, _ = images.shape
    if aug_cfg.mixup <= 0 and aug_cfg.cutmix <= 0:
        return images, targets, jnp.ones((num_groups,))
    draw = jax.vmap(lambda k: mix_params(
        k, h, w, mixup_alpha=aug_cfg.mixup, cutmix_alpha=aug_cfg.cutmix, prob=aug_cfg.mix_prob,
        switch_prob=aug_cfg.switch_prob))
    # Every device draws every group's few scalars: drawn where the groups are (sharded like the
    # batch), Beta's rejection loop would all-reduce its condition across devices each round.
    params = parallel.replicated(draw(jax.random.split(k_mix, num_groups)))
    grouped = lambda x: x.reshape(num_groups, b // num_groups, *x.shape[1:])  # noqa: E731
    images, targets, lam = jax.vmap(mix_group)(params, grouped(images), grouped(targets))
    return images.reshape(b, *images.shape[2:]), targets.reshape(b, -1), lam
