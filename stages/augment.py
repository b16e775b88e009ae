"""Stage 5, augment: the training split plus ``augment.copies`` randomly transformed copies of it.

Inputs: ``paths.deid_dir``/images.npy and the split manifest (``paths.split_dir``).
Outputs: ``paths.augment_dir``/train_images.npy and train_labels.npy (originals first, then each
round of copies), and a preview grid ``paths.augment_preview`` so the policy can be seen.
Params: every key of ``augment``.

Each transform does one thing (in the manner of MONAI's transforms): its deterministic core is a
plain function, and the random draw comes from the generator passed in, seeded by ``augment.seed``.
Validation and test images are never augmented.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage

from stages import layout
from stages.cli import run_stage
from stages.params import AugmentParams, load_params

logger = logging.getLogger(__name__)

Transform = Callable[[np.ndarray, np.random.Generator], np.ndarray]


def affine(image: np.ndarray, *, degrees: float = 0.0, scale: float = 1.0,
           shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Rotate by ``degrees``, scale by ``scale`` about the centre and shift by ``shift`` pixels.

    A channels-last image (h, w, c) gets the same motion in every channel.
    """
    if image.ndim == 3:
        return np.stack([affine(image[..., c], degrees=degrees, scale=scale, shift=shift)
                         for c in range(image.shape[-1])], axis=-1)
    theta = np.deg2rad(degrees)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    matrix = rotation / scale  # maps output coordinates back into the input
    centre = (np.array(image.shape) - 1) / 2
    offset = centre - matrix @ (centre + np.asarray(shift))
    return ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)


class RandomFlip:
    """Left-right flip with probability ``prob``."""

    def __init__(self, prob: float = 0.5) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"prob must be in [0, 1]; got {prob}")
        self.prob = prob

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return image[:, ::-1] if rng.random() < self.prob else image


class RandomAffine:
    """Rotation in ±``degrees``, zoom in [1 - ``zoom``, 1 + ``zoom``], shift in ±``shift`` × side."""

    def __init__(self, *, degrees: float, zoom: float, shift: float) -> None:
        if degrees < 0 or not 0 <= zoom < 1 or not 0 <= shift < 1:
            raise ValueError(
                f"need degrees >= 0, zoom in [0, 1), shift in [0, 1); got {degrees}, {zoom}, {shift}"
            )
        self.degrees, self.zoom, self.shift = degrees, zoom, shift

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        degrees = rng.uniform(-self.degrees, self.degrees)
        scale = rng.uniform(1 - self.zoom, 1 + self.zoom)
        shift = rng.uniform(-self.shift, self.shift, size=2) * np.array(image.shape[:2])
        return affine(image, degrees=degrees, scale=scale, shift=tuple(shift))


class RandomIntensity:
    """Contrast factor in [1 - ``contrast``, 1 + ``contrast``] about the mean, then + brightness."""

    def __init__(self, *, brightness: float, contrast: float) -> None:
        if brightness < 0 or not 0 <= contrast < 1:
            raise ValueError(f"need brightness >= 0 and contrast in [0, 1); got {brightness}, {contrast}")
        self.brightness, self.contrast = brightness, contrast

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        factor = rng.uniform(1 - self.contrast, 1 + self.contrast)
        offset = rng.uniform(-self.brightness, self.brightness)
        return np.clip((image - image.mean()) * factor + image.mean() + offset, 0.0, 1.0)


class RandomNoise:
    """Additive Gaussian noise of standard deviation ``std``."""

    def __init__(self, std: float) -> None:
        if std < 0:
            raise ValueError(f"std must be >= 0; got {std}")
        self.std = std

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return np.clip(image + rng.normal(0.0, self.std, image.shape), 0.0, 1.0)


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


def augment_images(images: np.ndarray, policy: Sequence[Transform], *, copies: int,
                   rng: np.random.Generator) -> np.ndarray:
    """Originals followed by ``copies`` rounds of transformed images, in the input's stored dtype."""
    rounds = [images]
    for _ in range(copies):
        transformed = np.empty_like(images)
        for i, image in enumerate(images):
            result = layout.unit_pixels(image)
            for transform in policy:
                result = transform(result, rng)
            transformed[i] = layout.stored_pixels(result, images.dtype)
        rounds.append(transformed)
    return np.concatenate(rounds)


def write_preview(images: np.ndarray, policy: Sequence[Transform], path: Path, *,
                  rng: np.random.Generator, n_images: int = 6, n_variants: int = 5) -> None:
    """PNG grid: one row per image, the original first, then ``n_variants`` augmentations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = images[: min(n_images, len(images))]
    fig, axes = plt.subplots(len(chosen), n_variants + 1, figsize=(1.6 * (n_variants + 1), 1.6 * len(chosen)),
                             squeeze=False)
    for row, image in enumerate(chosen):
        variants = augment_images(image[None], policy, copies=n_variants, rng=rng)
        for col, variant in enumerate(variants):
            axes[row, col].imshow(layout.unit_pixels(variant), cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_axis_off()
        axes[row, 0].set_title("original" if row == 0 else "", fontsize=8)
    fig.suptitle("augmentation policy preview", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    paths, params = load_params("paths"), load_params("augment")
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES)
    is_train = (manifest["split"] == "train").to_numpy()
    train_images, train_labels = images[is_train], manifest.loc[is_train, "label"].to_numpy()

    policy = build_policy(params)
    rng = np.random.default_rng(params.seed)
    augmented = augment_images(train_images, policy, copies=params.copies, rng=rng)
    labels = np.tile(train_labels, params.copies + 1)

    out_dir = Path(paths.augment_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / layout.AUGMENTED_IMAGES, augmented)
    np.save(out_dir / layout.AUGMENTED_LABELS, labels)
    write_preview(train_images, policy, Path(paths.augment_preview), rng=np.random.default_rng(params.seed))
    logger.info("augmented %d training images into %d with %d transform(s)",
                len(train_images), len(augmented), len(policy))


if __name__ == "__main__":
    run_stage(main)
