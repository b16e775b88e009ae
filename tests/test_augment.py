"""Tests for dicomflow/model/augment.py: the affine core, each random transform, the policy and the preview."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomflow.model.augment import (
    RandomAffine, RandomFlip, RandomIntensity, RandomNoise, affine_transforms, apply_policy, build_policy, warp,
    write_preview,
)
from dicomflow.config.params import AugmentParams, load_params

import tensorflow as tf
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEED = tf.constant([7, 0], tf.int64)


def _params(**changes: object) -> AugmentParams:
    values = dict(seed=7, flip=True, rotation_deg=8.0, zoom=0.08, shift=0.05,
                  brightness=0.05, contrast=0.1, noise_std=0.01)
    values.update(changes)
    return AugmentParams(**values)


def _batch(*images: np.ndarray) -> np.ndarray:
    """(h, w) images -> float32 (n, h, w, 1), the shape the transforms take."""
    return np.stack(images).astype(np.float32)[..., None]


def _affine(image: np.ndarray, *, degrees: float = 0.0, scale: float = 1.0,
            shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    transforms = affine_transforms([degrees], [scale], [shift[0]], [shift[1]],
                                   height=image.shape[0], width=image.shape[1])
    return warp(_batch(image), transforms).numpy()[0, ..., 0]


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).random((9, 9)).astype(np.float32)


@pytest.fixture
def batch() -> np.ndarray:
    return np.random.default_rng(1).random((64, 12, 12, 1)).astype(np.float32)


class TestAffine:
    def test_identity(self, image):
        np.testing.assert_allclose(_affine(image), image, atol=1e-6)

    @pytest.mark.parametrize("size", [7, 8])
    def test_quarter_turns_equal_rot90(self, size):
        square = np.random.default_rng(size).random((size, size)).astype(np.float32)

        # rows point down, so +90 degrees turns clockwise on screen: np.rot90 with k=-1
        clockwise = _affine(square, degrees=90)
        anticlockwise = _affine(square, degrees=-90)

        np.testing.assert_allclose(clockwise[1:-1, 1:-1], np.rot90(square, k=-1)[1:-1, 1:-1], atol=1e-5)
        np.testing.assert_allclose(anticlockwise[1:-1, 1:-1], np.rot90(square, k=1)[1:-1, 1:-1], atol=1e-5)

    @pytest.mark.parametrize("shift", [(2, -1), (-3, 0), (0, 4)])
    def test_whole_pixel_shift_moves_a_bright_pixel(self, shift):
        dark = np.zeros((11, 11), np.float32)
        dark[5, 5] = 1.0

        moved = _affine(dark, shift=shift)

        expected = np.zeros_like(dark)
        expected[5 + shift[0], 5 + shift[1]] = 1.0
        np.testing.assert_allclose(moved, expected, atol=1e-6)

    def test_scale_magnifies_about_the_centre(self, image):
        zoomed = _affine(image, scale=2.0)

        centre = 4  # (9 - 1) / 2
        for k in range(-2, 3):  # output pixel centre + 2k shows input pixel centre + k
            assert zoomed[centre + 2 * k, centre + 2 * k] == pytest.approx(image[centre + k, centre + k],
                                                                            abs=1e-6)

    def test_each_image_of_a_batch_gets_its_own_transform(self, image):
        transforms = affine_transforms([0.0, 90.0], [1.0, 1.0], [0.0, 0.0], [0.0, 0.0], height=9, width=9)

        result = warp(_batch(image, image), transforms).numpy()[..., 0]

        np.testing.assert_allclose(result[0], image, atol=1e-6)
        np.testing.assert_allclose(result[1][1:-1, 1:-1], np.rot90(image, k=-1)[1:-1, 1:-1], atol=1e-5)


class TestRandomFlip:
    @pytest.mark.parametrize("prob", [-0.1, 1.5])
    def test_rejects_probability_outside_0_1(self, prob):
        with pytest.raises(ValueError, match=re.escape(f"prob must be in [0, 1]; got {prob}")):
            RandomFlip(prob)

    def test_prob_one_flips_left_right(self, batch):
        np.testing.assert_array_equal(RandomFlip(prob=1.0)(batch, SEED), batch[:, :, ::-1])

    def test_prob_zero_never_flips(self, batch):
        np.testing.assert_array_equal(RandomFlip(prob=0.0)(batch, SEED), batch)

    def test_half_probability_flips_some_images_of_a_batch_but_not_all(self, batch):
        flipped = RandomFlip(prob=0.5)(batch, SEED).numpy()

        was_flipped = [np.array_equal(f, b[:, ::-1]) for f, b in zip(flipped, batch)]
        kept = [np.array_equal(f, b) for f, b in zip(flipped, batch)]
        assert all(a != b for a, b in zip(was_flipped, kept))  # each image one or the other
        assert 16 < sum(was_flipped) < 48


class TestRandomAffine:
    @pytest.mark.parametrize(
        ("kwargs", "shown"),
        [
            (dict(degrees=-5, zoom=0.1, shift=0.1), "got -5, 0.1, 0.1"),
            (dict(degrees=5, zoom=1.0, shift=0.1), "got 5, 1.0, 0.1"),
            (dict(degrees=5, zoom=-0.1, shift=0.1), "got 5, -0.1, 0.1"),
            (dict(degrees=5, zoom=0.1, shift=1.0), "got 5, 0.1, 1.0"),
        ],
    )
    def test_rejects_bad_arguments_naming_the_values(self, kwargs, shown):
        with pytest.raises(ValueError, match=re.escape(
                f"need degrees >= 0, zoom in [0, 1), shift in [0, 1); {shown}")):
            RandomAffine(**kwargs)

    def test_all_zero_is_identity(self, batch):
        result = RandomAffine(degrees=0, zoom=0, shift=0)(batch, SEED)

        np.testing.assert_allclose(result, batch, atol=1e-6)

    def test_changes_each_image_differently_and_keeps_the_shape(self, batch):
        same = np.repeat(batch[:1], 4, axis=0)

        result = RandomAffine(degrees=20, zoom=0.2, shift=0.1)(same, SEED).numpy()

        assert result.shape == same.shape
        assert not np.allclose(result[0], same[0])
        assert not np.allclose(result[0], result[1])


class TestRandomIntensity:
    @pytest.mark.parametrize(
        ("kwargs", "shown"),
        [
            (dict(brightness=-0.1, contrast=0.1), "got -0.1, 0.1"),
            (dict(brightness=0.1, contrast=-0.2), "got 0.1, -0.2"),
            (dict(brightness=0.1, contrast=1.5), "got 0.1, 1.5"),
        ],
    )
    def test_rejects_bad_arguments_naming_the_values(self, kwargs, shown):
        with pytest.raises(ValueError, match=re.escape(
                f"need brightness >= 0 and contrast in [0, 1); {shown}")):
            RandomIntensity(**kwargs)

    def test_values_stay_in_0_1(self, batch):
        results = RandomIntensity(brightness=1.0, contrast=0.9)(batch, SEED).numpy()

        assert results.min() == 0.0 and results.max() == 1.0  # strong settings do reach the clip

    def test_brightness_alone_adds_one_offset_per_image(self):
        grey = np.linspace(0.3, 0.7, 25, dtype=np.float32).reshape(5, 5)

        result = RandomIntensity(brightness=0.2, contrast=0.0)(_batch(grey, grey), SEED).numpy()[..., 0]

        offsets = result - grey
        assert np.ptp(offsets[0]) < 1e-6 and np.ptp(offsets[1]) < 1e-6
        assert 0 < abs(offsets[0, 0, 0]) <= 0.2
        assert offsets[0, 0, 0] != pytest.approx(offsets[1, 0, 0])

    def test_contrast_alone_scales_about_the_mean(self):
        grey = np.linspace(0.4, 0.6, 25, dtype=np.float32).reshape(5, 5)

        result = RandomIntensity(brightness=0.0, contrast=0.5)(_batch(grey), SEED).numpy()[0, ..., 0]

        mean = grey.mean()
        factor = (result[0, 0] - mean) / (grey[0, 0] - mean)
        assert result.mean() == pytest.approx(mean, abs=1e-6)
        assert 0.5 <= factor <= 1.5 and factor != pytest.approx(1.0)
        np.testing.assert_allclose(result - mean, factor * (grey - mean), atol=1e-6)


class TestRandomNoise:
    def test_rejects_negative_std(self):
        with pytest.raises(ValueError, match=re.escape("std must be >= 0; got -0.5")):
            RandomNoise(-0.5)

    def test_zero_std_is_identity(self, batch):
        np.testing.assert_array_equal(RandomNoise(0.0)(batch, SEED), batch)

    def test_noise_has_the_asked_spread_and_stays_in_0_1(self):
        grey = np.full((4, 64, 64, 1), 0.5, np.float32)

        noisy = RandomNoise(0.05)(grey, SEED).numpy()

        assert np.std(noisy - grey) == pytest.approx(0.05, rel=0.1)
        edge = RandomNoise(0.5)(np.full((1, 16, 16, 1), 0.99, np.float32), SEED).numpy()
        assert edge.min() >= 0.0 and edge.max() <= 1.0


class TestBuildPolicy:
    def test_all_on_in_order(self):
        policy = build_policy(_params())

        assert [type(t) for t in policy] == [RandomFlip, RandomAffine, RandomIntensity, RandomNoise]
        affine_step, intensity, noise = policy[1], policy[2], policy[3]
        assert (affine_step.degrees, affine_step.zoom, affine_step.shift) == (8.0, 0.08, 0.05)
        assert (intensity.brightness, intensity.contrast) == (0.05, 0.1)
        assert noise.std == 0.01

    def test_all_off_is_empty(self):
        assert build_policy(_params(flip=False, rotation_deg=0.0, zoom=0.0, shift=0.0, brightness=0.0,
                                    contrast=0.0, noise_std=0.0)) == []

    @pytest.mark.parametrize(
        ("changes", "left_out"),
        [
            (dict(flip=False), RandomFlip),
            (dict(rotation_deg=0.0, zoom=0.0, shift=0.0), RandomAffine),
            (dict(brightness=0.0, contrast=0.0), RandomIntensity),
            (dict(noise_std=0.0), RandomNoise),
        ],
    )
    def test_each_switch(self, changes, left_out):
        kinds = [type(t) for t in build_policy(_params(**changes))]

        assert left_out not in kinds
        assert len(kinds) == 3

    @pytest.mark.parametrize("changes", [dict(rotation_deg=5.0, zoom=0.0, shift=0.0),
                                         dict(rotation_deg=0.0, zoom=0.1, shift=0.0),
                                         dict(rotation_deg=0.0, zoom=0.0, shift=0.1)])
    def test_any_affine_key_switches_the_affine_on(self, changes):
        assert RandomAffine in [type(t) for t in build_policy(_params(**changes))]

    def test_every_value_params_yaml_accepts_builds_a_policy(self, tmp_path, repo_params_file):
        # Whatever upper end params.py allows for an augment.* key, the transforms must accept.
        raw = yaml.safe_load(repo_params_file.read_text(encoding="utf-8"))
        for fld in dataclasses.fields(AugmentParams):
            if "interval" in fld.metadata and fld.type == "float":
                low, high, closed = fld.metadata["interval"]
                largest = high if closed in ("both", "right") else np.nextafter(high, low).item()
                raw["augment"][fld.name] = largest
        raw["augment"]["flip"] = True  # off by default; every transform on here
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        params = load_params("augment", path=path)

        policy = build_policy(params)

        assert [type(t) for t in policy] == [RandomFlip, RandomAffine, RandomIntensity, RandomNoise]


class TestApplyPolicy:
    def test_same_seed_same_pixels_other_seed_different(self, batch):
        policy = build_policy(_params())

        first = apply_policy(batch, policy, seed=[7, 3]).numpy()
        again = apply_policy(batch, policy, seed=[7, 3]).numpy()
        other = apply_policy(batch, policy, seed=[7, 4]).numpy()

        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first, other)
        assert first.min() >= 0.0 and first.max() <= 1.0

    def test_empty_policy_returns_the_images(self, batch):
        np.testing.assert_array_equal(apply_policy(batch, [], seed=[7, 3]), batch)

    def test_same_pixels_in_a_parallel_tf_data_map(self, batch):
        # What the train stage does: many batches mapped in parallel threads, each with its seed.
        policy = build_policy(_params())
        expected = [apply_policy(batch[i:i + 8], policy, seed=[7, i // 8]).numpy()
                    for i in range(0, len(batch), 8)]

        dataset = (tf.data.Dataset.from_tensor_slices(batch).batch(8).enumerate()
                   .map(lambda index, images: apply_policy(images, policy, seed=[7, index]),
                        num_parallel_calls=4, deterministic=True))

        first, again = [[images.numpy() for images in dataset] for _ in range(2)]

        np.testing.assert_array_equal(np.concatenate(first), np.concatenate(again))
        # Eager and graph kernels may round the last bit differently.
        np.testing.assert_allclose(np.concatenate(first), np.concatenate(expected), atol=1e-6)

    def test_colour_images_move_together(self):
        grey = np.random.default_rng(2).random((2, 16, 16, 1)).astype(np.float32)
        colour = np.repeat(grey, 3, axis=-1)
        policy = build_policy(_params(noise_std=0.0))

        result = apply_policy(colour, policy, seed=[1, 1]).numpy()

        assert result.shape == colour.shape
        np.testing.assert_allclose(result[..., 0], result[..., 2], atol=1e-6)
        np.testing.assert_allclose(result[..., :1], apply_policy(grey, policy, seed=[1, 1]), atol=1e-6)


class TestWritePreview:
    @pytest.fixture
    def stored(self) -> np.ndarray:
        return np.random.default_rng(1).integers(0, 256, (4, 12, 12), dtype=np.uint8)

    def test_writes_a_png_grid_of_the_expected_size(self, tmp_path, stored):
        import matplotlib.image

        path = tmp_path / "reports" / "preview.png"  # parent folder does not exist yet

        write_preview(stored, build_policy(_params()), path, seed=0, n_images=2, n_variants=3)

        assert path.read_bytes()[:8] == PNG_SIGNATURE
        # figsize 1.6 inch per cell at 100 dpi: 2 rows x (3 variants + original) columns
        assert matplotlib.image.imread(path).shape[:2] == (2 * 160, 4 * 160)

    def test_fewer_images_than_asked_rows_and_colour(self, tmp_path):
        import matplotlib.image

        colour = np.random.default_rng(0).random((3, 16, 16, 3)).astype(np.float16)
        path = Path(tmp_path / "preview.png")

        write_preview(colour, build_policy(_params()), path, seed=0)  # 6 rows asked, 3 given

        assert matplotlib.image.imread(path).shape[:2] == (3 * 160, 6 * 160)
