"""Augmentation as composable random transforms (flip, affine, intensity, noise), applied on the
fly to training batches, and the preview of what they do.

Every transform takes a batch of images (batch, height, width, channels) or of volumes (batch,
depth, height, width, channels) = (n, z, y, x, c), float32 in [0, 1], and a seed, and draws one
set of parameters per image or volume from that seed alone (stateless): the same batch and seed
give the same result, in a ``tf.data`` map or eagerly. A volume is flipped left-right only (the
x axis: the head-feet and front-back axes of a chest are not symmetric), rotated about the z
axis (in the axial plane), scaled isotropically about its centre and shifted along all three
axes; its intensity transforms are those of images, one draw per volume.
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

# images (batch, height, width, channels) or volumes (batch, depth, height, width, channels)
# float32 in [0, 1], seed int32 (2,) -> the same shape
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


def warp_volumes(volumes, transforms, scale, shift_slices):
    """Volumes (n, d, h, w, c) resampled: every slice of volume i by ``transforms[i]`` (an
    in-plane affine of :func:`affine_transforms`, bilinear), then along z scaled by ``scale[i]``
    about the centre and shifted by ``shift_slices[i]`` slices (linear). The two steps together
    are a trilinear resampling (they act on separate axes); outside the volume is each volume's
    darkest value: air for windowed CT (about 0.23 at the lung window, where black would draw an
    edge no scan has), black for a volume that reaches 0.
    """
    import tensorflow as tf

    n, depth = tf.shape(volumes)[0], volumes.shape[1]
    height, width, channels = volumes.shape[2:]
    # Resampling is linear: shifted down by the floor, the black fill becomes the floor.
    floor = tf.reduce_min(volumes, axis=[1, 2, 3, 4], keepdims=True)
    volumes = volumes - floor
    slices = tf.reshape(volumes, [-1, height, width, channels])
    planar = tf.reshape(warp(slices, tf.repeat(transforms, depth, axis=0)), [n, depth, height, width, channels])
    # Output slice k samples the input at z = centre + (k - centre - shift) / scale, as in-plane.
    centre = (depth - 1) / 2
    source = centre + (tf.range(depth, dtype=tf.float32)[None, :] - centre
                       - tf.cast(shift_slices, tf.float32)[:, None]) / tf.cast(scale, tf.float32)[:, None]
    below = tf.floor(source)
    weight = tf.reshape(source - below, [n, depth, 1, 1, 1])
    below = tf.cast(below, tf.int32)

    def slices_at(index):  # (n, d) slice indices -> their slices, black outside the volume
        inside = tf.reshape(tf.cast((index >= 0) & (index < depth), tf.float32), [n, depth, 1, 1, 1])
        return tf.gather(planar, tf.clip_by_value(index, 0, depth - 1), axis=1, batch_dims=1) * inside

    return slices_at(below) * (1 - weight) + slices_at(below + 1) * weight + floor


class RandomFlip:
    """Left-right flip (the width axis) of each image or volume with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1]; got {prob}")
        self.prob = prob

    def __call__(self, images, seed):
        import tensorflow as tf

        flip = tf.random.stateless_uniform(tf.shape(images)[:1], seed) < self.prob
        rank = len(images.shape)
        return tf.where(tf.reshape(flip, [-1] + [1] * (rank - 1)), tf.reverse(images, axis=[rank - 2]), images)


class RandomAffine:
    """Rotation in ±``degrees``, zoom in [1 - ``zoom``, 1 + ``zoom``], shift in ±``shift`` × side.

    A volume is rotated about its z axis (every slice by the same angle, in the axial plane),
    zoomed by the same factor along all three axes, and shifted along each (:func:`warp_volumes`).
    """

    def __init__(self, *, degrees: float, zoom: float, shift: float) -> None:
        if degrees < 0 or not 0 <= zoom < 1 or not 0 <= shift < 1:
            raise ValueError(
                f"need degrees >= 0, zoom in [0, 1), shift in [0, 1); got {degrees}, {zoom}, {shift}"
            )
        self.degrees, self.zoom, self.shift = degrees, zoom, shift

    def __call__(self, images, seed):
        import tensorflow as tf

        volumes = len(images.shape) == 5
        n, height, width = tf.shape(images)[0], images.shape[-3], images.shape[-2]
        seeds = tf.random.experimental.stateless_split(seed, 5 if volumes else 4)

        def draw(i: int, low: float, high: float):
            return tf.random.stateless_uniform([n], seeds[i], low, high)

        scale = draw(1, 1 - self.zoom, 1 + self.zoom)
        transforms = affine_transforms(
            draw(0, -self.degrees, self.degrees), scale,
            draw(2, -self.shift, self.shift) * height, draw(3, -self.shift, self.shift) * width,
            height=height, width=width)
        if volumes:
            return warp_volumes(images, transforms, scale, draw(4, -self.shift, self.shift) * images.shape[1])
        return warp(images, transforms)


class RandomIntensity:
    """Contrast factor in [1 - ``contrast``, 1 + ``contrast``] about the mean, then + brightness
    (one factor and offset per image or volume)."""

    def __init__(self, *, brightness: float, contrast: float) -> None:
        if brightness < 0 or not 0 <= contrast < 1:
            raise ValueError(f"need brightness >= 0 and contrast in [0, 1); got {brightness}, {contrast}")
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, images, seed):
        import tensorflow as tf

        rank = len(images.shape)
        shape = tf.concat([tf.shape(images)[:1], [1] * (rank - 1)], axis=0)
        seeds = tf.random.experimental.stateless_split(seed, 2)
        factor = tf.random.stateless_uniform(shape, seeds[0], 1 - self.contrast, 1 + self.contrast)
        offset = tf.random.stateless_uniform(shape, seeds[1], -self.brightness, self.brightness)
        mean = tf.reduce_mean(images, axis=list(range(1, rank)), keepdims=True)
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
        float32 (batch, height, width, channels) or volumes (batch, depth, height, width,
        channels) in [0, 1].
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
                  n_images: int = 6, n_variants: int = 5, volumes: bool = False) -> None:
    """PNG grid: one row per image, the original first, then ``n_variants`` augmentations (columns
    titled "original", "draw 1", ...: draw i applies the whole policy with seed ``[seed, i]``).

    With ``volumes``, ``images`` are stored volumes (n, depth, height, width), augmented whole,
    and each cell shows the central axial slice (a shift or zoom along z shows as a change of
    the slice shown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = layout.unit_pixels(np.asarray(images[: min(n_images, len(images))]))
    chosen = chosen[..., None] if chosen.ndim == (4 if volumes else 3) else chosen
    variants = [apply_policy(chosen, policy, seed=[seed, i]).numpy() for i in range(n_variants)]
    if volumes:  # the central axial slice of each
        centre = chosen.shape[1] // 2
        chosen, variants = chosen[:, centre], [variant[:, centre] for variant in variants]
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
    fig.suptitle("augmentation policy preview: each row one training "
                 + ("volume (central axial slice)" if volumes else "image"), fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
