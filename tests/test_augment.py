"""Tests for stages/augment.py: the affine core, each random transform, the policy and the preview."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.augment import (
    RandomAffine,
    RandomFlip,
    RandomIntensity,
    RandomNoise,
    affine,
    augment_images,
    build_policy,
    write_preview,
)
from stages.params import AugmentParams, load_params

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _params(**changes: object) -> AugmentParams:
    values = dict(copies=2, seed=7, flip=True, rotation_deg=8.0, zoom=0.08, shift=0.05,
                  brightness=0.05, contrast=0.1, noise_std=0.01)
    values.update(changes)
    return AugmentParams(**values)


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).random((9, 9))


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (4, 12, 12), dtype=np.uint8)


class TestAffine:
    def test_identity(self, image):
        np.testing.assert_allclose(affine(image, degrees=0, scale=1, shift=(0, 0)), image, atol=1e-12)

    @pytest.mark.parametrize("size", [7, 8])
    def test_quarter_turns_equal_rot90(self, size):
        square = np.random.default_rng(size).random((size, size))

        # rows point down, so +90 degrees turns clockwise on screen: np.rot90 with k=-1
        clockwise = affine(square, degrees=90)
        anticlockwise = affine(square, degrees=-90)

        np.testing.assert_allclose(clockwise[1:-1, 1:-1], np.rot90(square, k=-1)[1:-1, 1:-1], atol=1e-9)
        np.testing.assert_allclose(anticlockwise[1:-1, 1:-1], np.rot90(square, k=1)[1:-1, 1:-1], atol=1e-9)

    @pytest.mark.parametrize("shift", [(2, -1), (-3, 0), (0, 4)])
    def test_whole_pixel_shift_moves_a_bright_pixel(self, shift):
        dark = np.zeros((11, 11))
        dark[5, 5] = 1.0

        moved = affine(dark, shift=shift)

        expected = np.zeros_like(dark)
        expected[5 + shift[0], 5 + shift[1]] = 1.0
        np.testing.assert_allclose(moved, expected, atol=1e-12)

    def test_scale_magnifies_about_the_centre(self, image):
        zoomed = affine(image, scale=2.0)

        centre = 4  # (9 - 1) / 2
        for k in range(-2, 3):  # output pixel centre + 2k shows input pixel centre + k
            assert zoomed[centre + 2 * k, centre + 2 * k] == pytest.approx(image[centre + k, centre + k])

    def test_input_is_not_modified(self, image):
        before = image.copy()

        affine(image, degrees=30, scale=1.1, shift=(1.5, -2))

        np.testing.assert_array_equal(image, before)


class TestRandomFlip:
    @pytest.mark.parametrize("prob", [-0.1, 1.5])
    def test_rejects_probability_outside_0_1(self, prob):
        with pytest.raises(ValueError, match=re.escape(f"prob must be in [0, 1]; got {prob}")):
            RandomFlip(prob)

    def test_prob_one_flips_left_right(self, image):
        flipped = RandomFlip(prob=1.0)(image, np.random.default_rng(0))

        np.testing.assert_array_equal(flipped, image[:, ::-1])

    def test_prob_zero_never_flips(self, image):
        rng = np.random.default_rng(0)
        flip = RandomFlip(prob=0.0)

        for _ in range(20):
            np.testing.assert_array_equal(flip(image, rng), image)

    def test_half_probability_flips_some_but_not_all(self, image):
        rng = np.random.default_rng(0)
        flip = RandomFlip(prob=0.5)

        flipped = [not np.array_equal(flip(image, rng), image) for _ in range(200)]

        assert 60 < sum(flipped) < 140


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

    def test_all_zero_is_identity(self, image):
        result = RandomAffine(degrees=0, zoom=0, shift=0)(image, np.random.default_rng(0))

        np.testing.assert_allclose(result, image, atol=1e-12)

    def test_changes_the_image_and_keeps_its_shape(self, image):
        result = RandomAffine(degrees=20, zoom=0.2, shift=0.1)(image, np.random.default_rng(0))

        assert result.shape == image.shape
        assert not np.allclose(result, image)


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

    def test_values_stay_in_0_1(self, image):
        rng = np.random.default_rng(0)
        transform = RandomIntensity(brightness=1.0, contrast=0.9)

        results = np.stack([transform(image, rng) for _ in range(50)])

        assert results.min() >= 0.0 and results.max() <= 1.0
        assert results.min() == 0.0 and results.max() == 1.0  # strong settings do reach the clip

    def test_brightness_alone_adds_one_offset(self):
        grey = np.linspace(0.3, 0.7, 25).reshape(5, 5)

        result = RandomIntensity(brightness=0.2, contrast=0.0)(grey, np.random.default_rng(3))

        offsets = result - grey
        assert np.ptp(offsets) < 1e-12
        assert 0 < abs(offsets[0, 0]) <= 0.2

    def test_contrast_alone_scales_about_the_mean(self):
        grey = np.linspace(0.4, 0.6, 25).reshape(5, 5)

        result = RandomIntensity(brightness=0.0, contrast=0.5)(grey, np.random.default_rng(3))

        mean = grey.mean()
        factor = (result[0, 0] - mean) / (grey[0, 0] - mean)
        assert result.mean() == pytest.approx(mean)
        assert 0.5 <= factor <= 1.5 and factor != pytest.approx(1.0)
        np.testing.assert_allclose(result - mean, factor * (grey - mean), atol=1e-12)


class TestRandomNoise:
    def test_rejects_negative_std(self):
        with pytest.raises(ValueError, match=re.escape("std must be >= 0; got -0.5")):
            RandomNoise(-0.5)

    def test_zero_std_is_identity(self, image):
        np.testing.assert_array_equal(RandomNoise(0.0)(image, np.random.default_rng(0)), image)

    def test_noise_has_the_asked_spread_and_stays_in_0_1(self):
        grey = np.full((64, 64), 0.5)

        noisy = RandomNoise(0.05)(grey, np.random.default_rng(0))

        assert np.std(noisy - grey) == pytest.approx(0.05, rel=0.1)
        edge = RandomNoise(0.5)(np.full((16, 16), 0.99), np.random.default_rng(0))
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
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw), encoding="utf-8")
        params = load_params("augment", path=path)

        policy = build_policy(params)

        assert [type(t) for t in policy] == [RandomFlip, RandomAffine, RandomIntensity, RandomNoise]


class TestAugmentImages:
    def test_originals_first_then_copies(self, images):
        before = images.copy()

        result = augment_images(images, build_policy(_params()), copies=2, rng=np.random.default_rng(7))

        assert result.dtype == np.uint8
        assert result.shape == (3 * len(images), 12, 12)
        np.testing.assert_array_equal(result[: len(images)], before)
        np.testing.assert_array_equal(images, before)  # input untouched
        assert not np.array_equal(result[4:8], before)
        assert not np.array_equal(result[4:8], result[8:12])

    def test_zero_copies_returns_the_originals(self, images):
        result = augment_images(images, build_policy(_params()), copies=0, rng=np.random.default_rng(7))

        np.testing.assert_array_equal(result, images)

    def test_empty_policy_copies_pixels_exactly(self, images):
        # uint8 -> [0, 1] -> uint8 must round-trip without drift
        result = augment_images(images, [], copies=2, rng=np.random.default_rng(7))

        np.testing.assert_array_equal(result, np.concatenate([images] * 3))

    def test_transformed_pixels_round_to_the_nearest_level(self):
        levels = np.arange(255, dtype=np.uint8).reshape(1, 15, 17)

        def brighten(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            return image + 0.6 / 255  # 0.6 of a level: rounds up, truncation would not

        result = augment_images(levels, [brighten], copies=1, rng=np.random.default_rng(0))

        np.testing.assert_array_equal(result[1], levels[0] + 1)

    def test_same_seed_same_result_other_seed_different(self, images):
        policy = build_policy(_params())

        first = augment_images(images, policy, copies=2, rng=np.random.default_rng(7))
        again = augment_images(images, policy, copies=2, rng=np.random.default_rng(7))
        other = augment_images(images, policy, copies=2, rng=np.random.default_rng(8))

        np.testing.assert_array_equal(first, again)
        assert not np.array_equal(first[4:], other[4:])


class TestWritePreview:
    def test_writes_a_png_grid_of_the_expected_size(self, tmp_path, images):
        import matplotlib.image

        path = tmp_path / "reports" / "preview.png"  # parent folder does not exist yet

        write_preview(images, build_policy(_params()), path, rng=np.random.default_rng(0),
                      n_images=2, n_variants=3)

        assert path.read_bytes()[:8] == PNG_SIGNATURE
        # figsize 1.6 inch per cell at 100 dpi: 2 rows x (3 variants + original) columns
        assert matplotlib.image.imread(path).shape[:2] == (2 * 160, 4 * 160)

    def test_fewer_images_than_asked_rows(self, tmp_path, images):
        import matplotlib.image

        path = Path(tmp_path / "preview.png")

        write_preview(images[:3], [], path, rng=np.random.default_rng(0))  # 6 rows asked, 3 given

        assert matplotlib.image.imread(path).shape[:2] == (3 * 160, 6 * 160)


def test_colour_and_float16_images_keep_their_shape_and_dtype():
    rng = np.random.default_rng(0)
    images = rng.random((3, 16, 16, 3)).astype(np.float16)
    policy = build_policy(load_params("augment", path=Path(__file__).resolve().parents[1] / "params.yaml"))

    augmented = augment_images(images, policy, copies=2, rng=np.random.default_rng(1))

    assert augmented.shape == (9, 16, 16, 3) and augmented.dtype == np.float16
    np.testing.assert_array_equal(augmented[:3], images)
    assert 0.0 <= float(augmented.min()) and float(augmented.max()) <= 1.0
    assert not np.array_equal(augmented[3:6], images)
