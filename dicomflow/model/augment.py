"""Augmentation as composable random transforms (flip, affine, intensity, noise), applied on the
fly to training batches, and the preview of what they do.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from dicomflow.config import layout
from dicomflow.config.params import AugmentParams

logger = logging.getLogger(__name__)

# images (batch, height, width, channels) float32 in [0, 1], seed int32 (2,) -> images
Transform = Callable[["tf.Tensor", "tf.Tensor"], "tf.Tensor"]  # noqa: F821


def affine_transforms(degrees, scale, shift_rows, shift_cols, *, height: int, width: int):
    """Per-image projective transforms (batch, 8) for ``ImageProjectiveTransformV3``.

    Rotation by ``degrees`` (positive turns clockwise on screen, since rows point down) and
    scaling by ``scale`` about the image centre, then a shift by ``shift_rows``/``shift_cols``
    pixels. The transform maps each output pixel back to where it samples the input.
    """
    import tensorflow as tf

    degrees, scale, shift_rows, shift_cols = (tf.cast(value, tf.float32)
                                              for value in (degrees, scale, shift_rows, shift_cols))
    theta = degrees * (math.pi / 180.0)
    cos, sin = tf.cos(theta) / scale, tf.sin(theta) / scale
    centre_x, centre_y = (width - 1) / 2, (height - 1) / 2
    moved_x, moved_y = centre_x + shift_cols, centre_y + shift_rows
    zeros = tf.zeros_like(cos)
    return tf.stack([cos, sin, centre_x - cos * moved_x - sin * moved_y,
                     -sin, cos, centre_y + sin * moved_x - cos * moved_y, zeros, zeros], axis=1)


def warp(images, transforms):
    """Bilinear resampling of each image by its transform; outside the image is black."""
    import tensorflow as tf

    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=tf.shape(images)[1:3],
        fill_value=0.0, interpolation="BILINEAR", fill_mode="CONSTANT")


class RandomFlip:
    """Left-right flip of each image with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1]; got {prob}")
        self.prob = prob

    def __call__(self, images, seed):
        import tensorflow as tf

        flip = tf.random.stateless_uniform(tf.shape(images)[:1], seed) < self.prob
        return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


class RandomAffine:
    """Rotation in ±``degrees``, zoom in [1 - ``zoom``, 1 + ``zoom``], shift in ±``shift`` × side."""

    def __init__(self, *, degrees: float, zoom: float, shift: float) -> None:
        if degrees < 0 or not 0 <= zoom < 1 or not 0 <= shift < 1:
            raise ValueError(
                f"need degrees >= 0, zoom in [0, 1), shift in [0, 1); got {degrees}, {zoom}, {shift}"
            )
        self.degrees, self.zoom, self.shift = degrees, zoom, shift

    def __call__(self, images, seed):
        import tensorflow as tf

        n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
        seeds = tf.random.experimental.stateless_split(seed, 4)

        def draw(i: int, low: float, high: float):
            return tf.random.stateless_uniform([n], seeds[i], low, high)

        transforms = affine_transforms(
            draw(0, -self.degrees, self.degrees), draw(1, 1 - self.zoom, 1 + self.zoom),
            draw(2, -self.shift, self.shift) * height, draw(3, -self.shift, self.shift) * width,
            height=height, width=width)
        return warp(images, transforms)


class RandomIntensity:
    """Contrast factor in [1 - ``contrast``, 1 + ``contrast``] about the mean, then + brightness."""

    def __init__(self, *, brightness: float, contrast: float) -> None:
        if brightness < 0 or not 0 <= contrast < 1:
            raise ValueError(f"need brightness >= 0 and contrast in [0, 1); got {brightness}, {contrast}")
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, images, seed):
        import tensorflow as tf

        shape = tf.concat([tf.shape(images)[:1], [1, 1, 1]], axis=0)
        seeds = tf.random.experimental.stateless_split(seed, 2)
        factor = tf.random.stateless_uniform(shape, seeds[0], 1 - self.contrast, 1 + self.contrast)
        offset = tf.random.stateless_uniform(shape, seeds[1], -self.brightness, self.brightness)
        mean = tf.reduce_mean(images, axis=[1, 2, 3], keepdims=True)
        return tf.clip_by_value((images - mean) * factor + mean + offset, 0.0, 1.0)


class RandomNoise:
    """Additive Gaussian noise of standard deviation ``std``."""

    def __init__(self, std: float) -> None:
        if std < 0:
            raise ValueError(f"std must be >= 0; got {std}")
        self.std = std

    def __call__(self, images, seed):
        import tensorflow as tf

        noise = tf.random.stateless_normal(tf.shape(images), seed, stddev=self.std)
        return tf.clip_by_value(images + noise, 0.0, 1.0)


def build_policy(params: AugmentParams) -> list[Transform]:
    """The transforms that ``params`` switch on, in the order they are applied."""
    policy: list[Transform] = []
    if params.flip:
        policy.append(RandomFlip())
    if params.rotation_deg or params.zoom or params.shift:
        policy.append(RandomAffine(degrees=params.rotation_deg, zoom=params.zoom, shift=params.shift))
    if params.brightness or params.contrast:
        policy.append(RandomIntensity(brightness=params.brightness, contrast=params.contrast))
    if params.noise_std:
        policy.append(RandomNoise(params.noise_std))
    return policy


def apply_policy(images, policy: Sequence[Transform], seed):
    """Every transform of ``policy`` in turn, each with its own seed split from ``seed``.

    Parameters
    ----------
    images : tf.Tensor or ndarray
        float32 (batch, height, width, channels) in [0, 1].
    policy : sequence of transforms
        From :func:`build_policy`.
    seed : tf.Tensor or sequence of two ints
        The batch's seed; the same seed and images give the same result.
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    if not policy:
        return images
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), len(policy))
    for transform, transform_seed in zip(policy, tf.unstack(seeds)):
        images = transform(images, transform_seed)
    return images


def write_preview(images: np.ndarray, policy: Sequence[Transform], path: Path, *, seed: int,
                  n_images: int = 6, n_variants: int = 5) -> None:
    """PNG grid: one row per image, the original first, then ``n_variants`` augmentations (columns
    titled "original", "draw 1", ...: draw i applies the whole policy with seed ``[seed, i]``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = layout.to_model_input(images[: min(n_images, len(images))])
    variants = [apply_policy(chosen, policy, seed=[seed, i]).numpy() for i in range(n_variants)]
    fig, axes = plt.subplots(len(chosen), n_variants + 1, figsize=(1.6 * (n_variants + 1), 1.6 * len(chosen)),
                             squeeze=False)
    for row, image in enumerate(chosen):
        for col, shown in enumerate([image, *(variant[row] for variant in variants)]):
            axes[row, col].imshow(shown.squeeze(-1) if shown.shape[-1] == 1 else shown,
                                  cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_axis_off()
    # Every column named: the first is the stored image, each other one an independent draw.
    for col, ax in enumerate(axes[0]):
        ax.set_title("original" if col == 0 else f"draw {col}", fontsize=8)
    fig.suptitle("augmentation policy preview: each row one training image", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
