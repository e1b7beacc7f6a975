"""Pixel conventions shared by the train step, visualisation and benchmarks.

The host sends uint8 images; normalisation happens on device (cheaper transfer, one place).
"""

import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def normalize(images_uint8):
    """uint8 (..., 3) -> float32 ImageNet-normalised, as torchvision ToTensor + Normalize."""
    x = images_uint8.astype(jnp.float32) / 255.0
    return (x - IMAGENET_MEAN) / IMAGENET_STD


def denormalize(images):
    """Normalised float -> uint8, clipped (for pictures)."""
    x = np.asarray(images, np.float32) * IMAGENET_STD + IMAGENET_MEAN
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
