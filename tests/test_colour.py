"""Colour as the camera saw it: RGB and YBR photos decoded to known colours, ICC profiles
converted to sRGB with littleCMS, and the colour statistics ingest records for validate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from PIL import ImageCms
from pydicom.data import get_testdata_file

from dicomflow.config import layout
from dicomflow.config.params import load_params
from dicomflow.devtools.icc import ADOBE_RGB_CURVE, ADOBE_RGB_PRIMARIES, SRGB_PRIMARIES, matrix_profile
from dicomflow.dicom.display import (
    PROFILE_ASSUMED_SRGB,
    PROFILE_CONVERTED,
    PixelSettings,
    colour_spread,
    convert_to_srgb,
    read_image,
)
from dicomflow.dicom.ingestion import ingest_file
from dicomflow.dicom.reading import Quarantined
from dicomflow.evaluation.promotion import training_data_record
from dicomflow.quality.expectations import WARNING, build_checks, find_text_columns
from dicomflow.quality.report import run_checks
from stages import ingest
from test_validate import PARAMS, make_manifest

# SC_rgb*.dcm (pydicom's test files): 100 x 100, ten bands of ten rows, each one colour.
SC_RGB_BANDS = [(255, 0, 0), (255, 128, 128), (0, 255, 0), (128, 255, 128), (0, 0, 255),
                (128, 128, 255), (0, 0, 0), (64, 64, 64), (192, 192, 192), (255, 255, 255)]

SRGB_RED, SRGB_GREEN, SRGB_BLUE = SRGB_PRIMARIES
# Red stored as the colour of sRGB's green, green as blue, blue as red: a channel rotation.
ROTATED = matrix_profile(SRGB_GREEN, SRGB_BLUE, SRGB_RED, description="rotated sRGB")
SRGB_BY_HAND = matrix_profile(SRGB_RED, SRGB_GREEN, SRGB_BLUE, description="sRGB by hand")


def band_colours(display: np.ndarray) -> np.ndarray:
    """The colour at the centre of each of SC_rgb's ten bands, in 0-255 (rows 3-6, every column)."""
    return np.stack([display[10 * b + 3:10 * b + 7].reshape(-1, 3).mean(axis=0) for b in range(10)]) * 255


class TestDecodedColours:
    @pytest.mark.parametrize("name", [
        "SC_rgb.dcm",            # native, planar configuration 0
        "SC_rgb_rle.dcm",        # RLE Lossless (stored colour by colour)
        "SC_rgb_expb.dcm",       # big endian
        "SC_rgb_16bit.dcm",      # 16 bits per sample
    ])
    def test_lossless_encodings_give_the_known_band_colours(self, name):
        _, frames = read_image(Path(get_testdata_file(name)), PixelSettings(size=32, channels=3))

        np.testing.assert_allclose(band_colours(frames[0].display), SC_RGB_BANDS, atol=1.0)

    @pytest.mark.parametrize("name", [
        "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG Baseline, YBR_FULL_422 (chroma subsampled)
        "SC_rgb_dcmtk_+eb+cy+s2.dcm",  # JPEG Baseline, YBR_FULL_422
        "SC_ybr_full_422_uncompressed.dcm",  # native YBR (rounded when converted from RGB)
        "SC_ybr_full_uncompressed.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",       # JPEG Baseline, YBR_FULL
    ])
    def test_ybr_photos_give_the_known_band_colours(self, name):
        ds = pydicom.dcmread(get_testdata_file(name), stop_before_pixels=True)
        assert ds.PhotometricInterpretation.startswith("YBR_FULL")

        _, frames = read_image(Path(get_testdata_file(name)), PixelSettings(size=32, channels=3))

        # Lossy or rounded: within a few levels at the band centres (subsampled chroma blurs edges).
        np.testing.assert_allclose(band_colours(frames[0].display), SC_RGB_BANDS, atol=8.0)

    def test_planar_configuration_one_shows_the_same_colours(self):
        by_plane, by_pixel = (pydicom.dcmread(get_testdata_file(name)) for name in ("color-pl.dcm", "color-px.dcm"))
        assert (by_plane.PlanarConfiguration, by_pixel.PlanarConfiguration) == (1, 0)
        # The planar file's bytes are R plane, G plane, B plane: read them by hand.
        planes = np.frombuffer(by_plane.PixelData, np.uint8).reshape(3, by_plane.Rows, by_plane.Columns)

        _, frames = read_image(Path(get_testdata_file("color-pl.dcm")), PixelSettings(size=32, channels=3))
        _, reference = read_image(Path(get_testdata_file("color-px.dcm")), PixelSettings(size=32, channels=3))

        np.testing.assert_allclose(frames[0].display * 255, np.moveaxis(planes, 0, -1), atol=1e-3)
        np.testing.assert_array_equal(frames[0].display, reference[0].display)


class TestConvertToSrgb:
    def colours(self) -> np.ndarray:
        grid = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (200, 120, 40), (30, 60, 90),
                         (128, 128, 128)], np.float32)
        return (grid / 255).reshape(2, 3, 3)

    def test_a_rotated_profile_rotates_the_channels(self):
        rgb = self.colours()

        srgb = convert_to_srgb(rgb, ROTATED)

        # Stored (r, g, b) is r of sRGB's green, g of its blue, b of its red: sRGB (b, r, g).
        expected = rgb[..., [2, 0, 1]]
        np.testing.assert_allclose(srgb * 255, expected * 255, atol=1.0)

    def test_an_srgb_profile_changes_nothing(self):
        rgb = self.colours()

        np.testing.assert_allclose(convert_to_srgb(rgb, SRGB_BY_HAND) * 255, rgb * 255, atol=1.0)

    def test_no_profile_is_taken_as_srgb(self):
        rgb = self.colours()

        assert convert_to_srgb(rgb, None) is rgb
        assert convert_to_srgb(rgb, b"") is rgb

    def test_a_wide_gamut_profile_clips_into_srgb_and_keeps_grey(self):
        # Adobe RGB (1998)'s pure green lies outside sRGB: clipped to sRGB's green. Its grey 0.5 is
        # 0.5 ^ 2.2 = 0.2176 linear, which sRGB encodes as 1.055 * 0.2176 ^ (1 / 2.4) - 0.055 = 0.5038.
        adobe = matrix_profile(*ADOBE_RGB_PRIMARIES, curve=ADOBE_RGB_CURVE)
        rgb = np.array([[[0, 1, 0], [0.5, 0.5, 0.5]]], np.float32)

        srgb = convert_to_srgb(rgb, adobe) * 255

        assert srgb[0, 0, 1] == pytest.approx(255, abs=1) and srgb[0, 0, 0] < 5 and srgb[0, 0, 2] < 5
        np.testing.assert_allclose(srgb[0, 1], [0.5038 * 255] * 3, atol=1.0)

    def test_the_profile_bytes_are_the_same_every_time(self):
        assert matrix_profile(*ADOBE_RGB_PRIMARIES, curve=ADOBE_RGB_CURVE) == \
            matrix_profile(*ADOBE_RGB_PRIMARIES, curve=ADOBE_RGB_CURVE)
        with pytest.raises(ValueError, match="curve must hold 1 .gamma. or 5"):
            matrix_profile(*SRGB_PRIMARIES, curve=(1.0, 2.0))

    def test_a_corrupt_profile_is_quarantined(self):
        with pytest.raises(Quarantined, match=r"\(0028,2000\) ICC Profile cannot be read") as info:
            convert_to_srgb(self.colours(), b"not a profile at all" * 10)

        assert info.value.reason == "invalid_icc_profile"

    def test_a_profile_of_another_colour_space_is_quarantined(self):
        lab = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()

        with pytest.raises(Quarantined, match=r"describes Lab colour space, not RGB") as info:
            convert_to_srgb(self.colours(), lab)

        assert info.value.reason == "invalid_icc_profile"


class TestColourManagementInIngest:
    def photo(self, tmp_path: Path, make_dicom, name: str, **attributes: object) -> Path:
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[:8] = (200, 120, 40)   # orange
        pixels[8:] = (30, 60, 90)     # dark blue
        return make_dicom(tmp_path / name, pixels, photometric="RGB", **attributes)

    def test_srgb_converts_through_the_files_profile_before_resizing(self, tmp_path, make_dicom):
        path = self.photo(tmp_path, make_dicom, "rotated.dcm", ICCProfile=ROTATED)

        _, stored = read_image(path, PixelSettings(size=8, channels=3))
        _, managed = read_image(path, PixelSettings(size=8, channels=3, color_management="srgb"))

        np.testing.assert_array_equal(stored[0].pixels[0, 0], (200, 120, 40))
        np.testing.assert_allclose(managed[0].pixels[0, 0], (40, 200, 120), atol=1)
        np.testing.assert_allclose(managed[0].pixels[7, 7], (90, 30, 60), atol=1)
        assert (stored[0].colour_profile, managed[0].colour_profile) == ("", PROFILE_CONVERTED)

    def test_a_file_without_profile_is_taken_as_srgb_and_says_so(self, tmp_path, make_dicom):
        path = self.photo(tmp_path, make_dicom, "plain.dcm")

        result = ingest_file(path, data_dir=tmp_path,
                             settings=PixelSettings(size=8, channels=3, color_management="srgb"))

        pixels, record = result.images[0]
        np.testing.assert_array_equal(pixels[0, 0], (200, 120, 40))
        assert record["colour_profile"] == PROFILE_ASSUMED_SRGB

    def test_a_corrupt_profile_quarantines_the_file_with_its_reason(self, tmp_path, make_dicom):
        path = self.photo(tmp_path, make_dicom, "corrupt.dcm", ICCProfile=ROTATED[:200])

        result = ingest_file(path, data_dir=tmp_path,
                             settings=PixelSettings(size=8, channels=3, color_management="srgb"))
        untouched = ingest_file(path, data_dir=tmp_path, settings=PixelSettings(size=8, channels=3))

        assert result.reason == "invalid_icc_profile" and "(0028,2000) ICC Profile" in result.detail
        assert untouched.reason == ""  # color_management none never reads the profile

    def test_grayscale_files_are_left_alone(self):
        _, frames = read_image(Path(get_testdata_file("CT_small.dcm")),
                               PixelSettings(size=8, channels=3, color_management="srgb"))

        assert frames[0].colour_profile == ""

    def test_from_params_threads_color_management(self, repo_params_file):
        params = load_params("ingest", repo_params_file)

        settings = PixelSettings.from_params(dataclasses.replace(params, color_management="srgb"))

        assert PixelSettings.from_params(params).color_management == "none"
        assert settings.color_management == "srgb"


class TestColourStatistics:
    def test_colour_spread_is_the_mean_channel_range(self):
        display = np.zeros((2, 2, 3), np.float32)
        display[0, 0] = (1.0, 0.5, 0.0)   # range 1
        display[0, 1] = (0.2, 0.4, 0.3)   # range 0.2
        display[1] = 0.7                  # grey: 0

        assert colour_spread(display) == pytest.approx((1.0 + 0.2) / 4)
        assert np.isnan(colour_spread(display[..., 0]))

    def test_ingest_records_source_channels_and_spread(self, tmp_path, make_dicom):
        colour = make_dicom(tmp_path / "colour.dcm", np.full((8, 8, 3), (255, 0, 51), np.uint8), photometric="RGB")
        grey_rgb = make_dicom(tmp_path / "grey.dcm", np.repeat(np.arange(64, dtype=np.uint8).reshape(8, 8, 1), 3, -1),
                              photometric="RGB")
        settings = PixelSettings(size=8, channels=3)

        rows = {path.name: ingest_file(path, data_dir=tmp_path, settings=settings).images[0][1]
                for path in (colour, grey_rgb)}
        ct_path = Path(get_testdata_file("CT_small.dcm"))
        ct = ingest_file(ct_path, data_dir=ct_path.parent, settings=settings).images[0][1]

        assert rows["colour.dcm"]["source_channels"] == 3
        assert rows["colour.dcm"]["pixel_colour_spread"] == pytest.approx(1.0)
        assert rows["grey.dcm"]["source_channels"] == 3 and rows["grey.dcm"]["pixel_colour_spread"] == 0.0
        assert ct["source_channels"] == 1 and np.isnan(ct["pixel_colour_spread"])


class TestColourChecks:
    """validate's colour checks, through real Great Expectations on a manifest of colour photos."""

    def manifest(self) -> pd.DataFrame:
        manifest = make_manifest(12).assign(modality="XC", photometric="YBR_FULL_422", source_channels=3,
                                            pixel_colour_spread=[0.3 + 0.01 * i for i in range(12)])
        manifest.loc[4, ["photometric", "source_channels", "pixel_colour_spread"]] = ["MONOCHROME2", 1, np.nan]
        manifest.loc[7, "pixel_colour_spread"] = 0.004  # an RGB file whose channels are (almost) equal
        return manifest

    def results(self, manifest: pd.DataFrame, *, channels: int) -> dict:
        checks = build_checks(**{**PARAMS, "modalities": ["XC"]}, text_columns=find_text_columns(manifest),
                              channels=channels, min_colour_spread=0.02)
        return {r.check.name: r for r in run_checks(manifest, checks)}

    @pytest.mark.slow
    def test_grey_colour_and_grayscale_sources_are_warnings_naming_the_images(self):
        results = self.results(self.manifest(), channels=3)

        failed = {name: r for name, r in results.items() if r.failed}
        assert set(failed) == {"image_is_colour", "colour_not_grey"}
        assert {r.check.severity for r in failed.values()} == {WARNING}
        assert failed["image_is_colour"].unexpected_count == 1
        assert failed["image_is_colour"].examples == ("img004",)
        # The grayscale source (null spread) is not counted twice.
        assert failed["colour_not_grey"].unexpected_count == 1
        assert failed["colour_not_grey"].examples == ("img007",)

    @pytest.mark.slow
    def test_a_clean_colour_set_passes(self):
        manifest = self.manifest()
        manifest.loc[4, ["source_channels", "pixel_colour_spread"]] = [3, 0.25]
        manifest.loc[7, "pixel_colour_spread"] = 0.25

        results = self.results(manifest, channels=3)

        assert not [name for name, r in results.items() if r.failed]
        assert {"image_is_colour", "colour_not_grey"} <= set(results)

    def test_one_channel_sets_have_no_colour_checks(self):
        results = self.results(self.manifest(), channels=1)

        assert not {"image_is_colour", "colour_not_grey"} & set(results)


class TestIngestStage:
    """The ingest stage with ``color_management: srgb``: counts, index column and quarantine."""

    def test_counts_profiles_and_quarantines_a_corrupt_one(self, tmp_path, monkeypatch, make_dicom,
                                                           repo_params_file):
        params = yaml.safe_load(repo_params_file.read_text(encoding="utf-8"))
        params["ingest"].update(channels=3, color_management="srgb", max_quarantine_fraction=0.5, workers=1,
                                label_key="accession_number", classes=[0, 1])
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        pixels = np.zeros((16, 16, 3), np.uint8)
        pixels[:8], pixels[8:] = (200, 120, 40), (30, 60, 90)
        data = tmp_path / "data"
        for name, accession, profile in (("a.dcm", "A1", ROTATED), ("b.dcm", "A2", None), ("c.dcm", "A3", None),
                                         ("d.dcm", "A4", b"\0" * 200)):
            make_dicom(data / name, pixels, photometric="RGB", AccessionNumber=accession,
                       **({"ICCProfile": profile} if profile else {}))
        (data / "labels.csv").write_text("accession_number,label\nA1,0\nA2,1\nA3,0\nA4,1\n", encoding="utf-8")
        monkeypatch.chdir(tmp_path)

        ingest.main()

        metrics = json.loads((tmp_path / "reports" / "ingest.json").read_text(encoding="utf-8"))
        index = pd.read_parquet(tmp_path / "outputs" / "ingest" / layout.INGEST_INDEX)
        quarantine = pd.read_csv(tmp_path / "outputs" / "ingest" / layout.INGEST_QUARANTINE)
        images = np.load(tmp_path / "outputs" / "ingest" / layout.IMAGES)
        assert (metrics["images"], metrics["colour_icc_to_srgb"], metrics["colour_assumed_srgb"]) == (3, 1, 2)
        assert metrics["quarantined_invalid_icc_profile"] == 1
        assert quarantine[["path", "reason"]].values.tolist() == [["d.dcm", "invalid_icc_profile"]]
        assert index["colour_profile"].tolist() == [PROFILE_CONVERTED, PROFILE_ASSUMED_SRGB, PROFILE_ASSUMED_SRGB]
        np.testing.assert_allclose(images[0, 0, 0], (40, 200, 120), atol=1)  # rotated, through the profile
        np.testing.assert_array_equal(images[1, 0, 0], (200, 120, 40))  # no profile: as stored


class TestTrainingRecord:
    def test_records_before_color_management_compare_equal_and_srgb_does_not(self):
        manifest = pd.DataFrame({"split": ["train", "train", "test"], "pixel_sha256": ["a", "b", "c"]})
        settings = dataclasses.asdict(PixelSettings(size=64, channels=3))
        before = {k: v for k, v in settings.items() if k != "color_management"}  # a record from before

        def record(pixel_settings: dict) -> dict:
            return training_data_record(manifest, data_version="d" * 32, pixel_settings=pixel_settings)

        assert record(settings) == record(before)
        assert record({**settings, "color_management": "srgb"})["pixel_settings"] != record(before)["pixel_settings"]
