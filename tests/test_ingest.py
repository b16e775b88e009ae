"""Tests for the ingest stage and dicomflow/dicom: display pixels, resizing, quarantine reasons, labels and main()."""

from __future__ import annotations

import hashlib
import json
import shutil
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from dicomflow.dicom import display as pixel_display
from stages import ingest
from dicomflow.config import layout
from dicomflow.errors import DataError, SettingsError
from dicomflow.dicom.sources import list_sources
from dicomflow.dicom.display import PixelSettings, read_image, resize_with_padding, to_display_pixels
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.labels import assign_label, read_labels


def _dataset(*, photometric: str = "MONOCHROME2", bits_stored: int = 8, signed: bool = False,
             **attributes: object) -> Dataset:
    """The image pixel attributes ``to_display_pixels`` reads; no Pixel Data needed."""
    ds = Dataset()
    ds.PhotometricInterpretation = photometric
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 8 if bits_stored <= 8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def _expected_display(stored: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0,
                      center: float | None = None, width: float | None = None,
                      monochrome1: bool = False) -> np.ndarray:
    """Written out again: rescale, then the LINEAR window of PS3.3 C.11.2.1.2.1, to [0, 1]."""
    values = stored.astype(np.float64) * slope + intercept
    if center is None:
        span = values.max() - values.min()
        out = (values - values.min()) / span if span else np.zeros_like(values)
    else:
        # y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped: 0 at or below the window, 1 above it
        out = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    return 1.0 - out if monochrome1 else out


def _block_mean(image: np.ndarray, factor: int) -> np.ndarray:
    rows, cols = image.shape
    return image.reshape(rows // factor, factor, cols // factor, factor).mean(axis=(1, 3))


_RNG = np.random.default_rng(0)

DISPLAY_CASES = [
    pytest.param(
        dict(bits_stored=8),
        _RNG.integers(0, 256, (5, 7)).astype(np.uint8),
        dict(),
        id="8bit-no-window",
    ),
    pytest.param(
        dict(bits_stored=8, WindowCenter=128, WindowWidth=64),
        _RNG.integers(0, 256, (5, 7)).astype(np.uint8),
        dict(center=128, width=64),
        id="8bit-window",
    ),
    pytest.param(
        dict(bits_stored=8, photometric="MONOCHROME1", WindowCenter=100, WindowWidth=101),
        _RNG.integers(0, 256, (6, 4)).astype(np.uint8),
        dict(center=100, width=101, monochrome1=True),
        id="8bit-window-monochrome1",
    ),
    pytest.param(
        dict(bits_stored=12),
        _RNG.integers(0, 4096, (6, 6)).astype(np.uint16),
        dict(),
        id="12bit-no-window",
    ),
    pytest.param(
        dict(bits_stored=12, photometric="MONOCHROME1"),
        _RNG.integers(0, 4096, (6, 6)).astype(np.uint16),
        dict(monochrome1=True),
        id="12bit-no-window-monochrome1",
    ),
    pytest.param(
        dict(bits_stored=12, RescaleSlope=2, RescaleIntercept=-1024, WindowCenter=500, WindowWidth=3000),
        _RNG.integers(0, 4096, (6, 6)).astype(np.uint16),
        dict(slope=2.0, intercept=-1024.0, center=500, width=3000),
        id="12bit-rescale-window",
    ),
    pytest.param(
        dict(bits_stored=12, RescaleSlope=0.5, RescaleIntercept=10),
        _RNG.integers(0, 4096, (6, 6)).astype(np.uint16),
        dict(slope=0.5, intercept=10.0),
        id="12bit-rescale-no-window",
    ),
    pytest.param(
        dict(bits_stored=16, signed=True, RescaleSlope=1, RescaleIntercept=-1024,
             WindowCenter=40, WindowWidth=400),
        _RNG.integers(-1000, 3000, (8, 5)).astype(np.int16),
        dict(intercept=-1024.0, center=40, width=400),
        id="16bit-signed-ct-window",
    ),
    pytest.param(
        dict(bits_stored=16, signed=True, photometric="MONOCHROME1", WindowCenter=0, WindowWidth=1000),
        _RNG.integers(-2000, 2000, (8, 5)).astype(np.int16),
        dict(center=0, width=1000, monochrome1=True),
        id="16bit-signed-window-monochrome1",
    ),
    pytest.param(
        dict(bits_stored=16, WindowCenter=[30000, 100], WindowWidth=[20000, 50]),
        _RNG.integers(0, 65536, (4, 4)).astype(np.uint16),
        dict(center=30000, width=20000),
        id="16bit-first-of-several-windows",
    ),
]


class TestToDisplayPixels:
    @pytest.mark.parametrize(("tags", "stored", "formula"), DISPLAY_CASES)
    def test_matches_the_formula_written_out(self, tags, stored, formula):
        ds = _dataset(**tags)

        display = to_display_pixels(ds, stored)

        assert display.dtype == np.float32
        assert display.shape == stored.shape
        np.testing.assert_allclose(display, _expected_display(stored, **formula), atol=1e-6)

    def test_linear_window_by_hand(self):
        # c=100, w=11: 0 at or below 94.5, 1 above 104.5, (x - 99.5) / 10 + 0.5 between
        ds = _dataset(bits_stored=8, WindowCenter=100, WindowWidth=11)
        stored = np.array([[0, 94, 95, 99, 100, 104, 105, 255]], dtype=np.uint8)

        display = to_display_pixels(ds, stored)

        np.testing.assert_allclose(display, [[0, 0, 0.05, 0.45, 0.55, 0.95, 1, 1]], atol=1e-6)

    @pytest.mark.filterwarnings("ignore:Applying a VOI LUT on a float input array:UserWarning")
    def test_voi_lut_sequence_by_hand(self):
        lut = Dataset()
        lut.LUTDescriptor = [4, 10, 8]  # 4 entries, first maps stored value 10, 8-bit output
        lut.LUTData = [0, 51, 102, 255]
        ds = _dataset(bits_stored=8, VOILUTSequence=[lut])
        stored = np.array([[0, 10, 11, 12, 13, 200]], dtype=np.uint8)

        display = to_display_pixels(ds, stored)

        np.testing.assert_allclose(display, [[0, 0, 0.2, 0.4, 1, 1]], atol=1e-6)

    def test_constant_image_without_window_is_black_not_nan(self):
        ds = _dataset(bits_stored=8)

        display = to_display_pixels(ds, np.full((3, 3), 77, dtype=np.uint8))

        np.testing.assert_array_equal(display, np.zeros((3, 3), dtype=np.float32))

    def test_empty_window_attributes_fall_back_to_the_image_range(self):
        # (0028,1050)/(0028,1051) present with no value: pydicom applies no window, so the
        # image's own range must be used, as when the attributes are absent.
        stored = np.array([[0, 100, 200]], dtype=np.int16)
        ds = _dataset(bits_stored=16, signed=True, WindowCenter=None, WindowWidth=None)

        display = to_display_pixels(ds, stored)

        np.testing.assert_allclose(display, [[0.0, 0.5, 1.0]], atol=1e-6)

    @pytest.mark.parametrize(
        "name",
        ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
         "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"],
    )
    def test_real_files_match_pydicom_luts(self, name):
        ds = pydicom.dcmread(get_testdata_file(name))
        stored = ds.pixel_array
        modality = apply_modality_lut(stored, ds).astype(np.float64)
        if "WindowCenter" in ds:
            reference = apply_voi_lut(modality, ds, index=0)
            bits = int(ds.BitsStored)
            low, high = ((-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation
                         else (0, 2**bits - 1))
            if "RescaleSlope" in ds:
                low = low * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                high = high * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        else:
            reference, low, high = modality, modality.min(), modality.max()
        expected = (reference - low) / (high - low)

        display = to_display_pixels(ds, stored)

        assert display.dtype == np.float32
        assert 0.0 <= display.min() < display.max() <= 1.0
        np.testing.assert_allclose(display, expected, atol=1e-6)

    def test_compressed_and_uncompressed_mr_give_the_same_pixels(self):
        plain = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
        rle = pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))

        np.testing.assert_array_equal(
            to_display_pixels(rle, rle.pixel_array), to_display_pixels(plain, plain.pixel_array)
        )


class TestNativePixels:
    @pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "OBXXXX1A.dcm", "rtdose.dcm",
                                      "liver_1frame.dcm", "MR_small_implicit.dcm"])
    def test_equals_pydicom_pixel_array(self, name):
        ds = pydicom.dcmread(get_testdata_file(name))
        native = pixel_display.native_pixels(ds)
        if native is None:  # multi-frame or 32-bit: must be pydicom's to decode
            assert pixel_display.number_of_frames(ds) > 1 or ds.BitsAllocated not in (8, 16)
            return
        np.testing.assert_array_equal(native, ds.pixel_array)
        assert native.dtype == ds.pixel_array.dtype

    @pytest.mark.parametrize("signed", [False, True])
    def test_masks_unused_high_bits_and_sign_extends_like_pydicom(self, tmp_path, make_dicom, signed):
        path = make_dicom(tmp_path / "12bit.dcm", np.zeros((2, 2), np.uint16), bits_stored=12)
        ds = pydicom.dcmread(path)
        # Garbage above bit 12 (overlays once lived there), and 12-bit negatives when signed.
        ds.PixelData = np.array([[0xF123, 0x0FFF], [0x0800, 5]], dtype="<u2").tobytes()
        ds.PixelRepresentation = int(signed)
        ds.save_as(path)
        ds = pydicom.dcmread(path)

        np.testing.assert_array_equal(pixel_display.native_pixels(ds), pydicom.dcmread(path).pixel_array)

    def test_compressed_and_short_data_go_to_pydicom(self, tmp_path):
        assert pixel_display.native_pixels(pydicom.dcmread(get_testdata_file("MR_small_RLE.dcm"))) is None
        assert pixel_display.native_pixels(pydicom.dcmread(get_testdata_file("MR_truncated.dcm"))) is None


class TestResizeWithPadding:
    def test_same_size_is_unchanged(self):
        image = np.random.default_rng(1).random((8, 8)).astype(np.float32)

        np.testing.assert_allclose(resize_with_padding(image, 8), image, atol=1e-6)

    def test_downscale_averages_boxes(self):
        image = np.random.default_rng(2).random((8, 8)).astype(np.float32)

        resized = resize_with_padding(image, 4)

        assert resized.dtype == np.float32
        np.testing.assert_allclose(resized, _block_mean(image, 2), atol=1e-6)

    def test_integer_upscale_repeats_pixels(self):
        image = np.array([[1, 2], [3, 4]], dtype=np.float32)

        np.testing.assert_array_equal(resize_with_padding(image, 4), np.kron(image, np.ones((2, 2))))

    def test_wide_image_keeps_aspect_centred_with_zero_padding(self):
        image = np.full((20, 40), 0.7, dtype=np.float32)

        resized = resize_with_padding(image, 16)

        assert resized.shape == (16, 16)
        rows_with_content = np.flatnonzero(resized.any(axis=1))
        np.testing.assert_array_equal(rows_with_content, np.arange(4, 12))  # 16 * 20 / 40 = 8 rows
        np.testing.assert_allclose(resized[4:12], 0.7, atol=1e-6)  # a constant stays constant
        assert not resized[:4].any() and not resized[12:].any()

    def test_tall_image_pads_columns(self):
        image = np.full((40, 20), 0.3, dtype=np.float32)

        resized = resize_with_padding(image, 16)

        np.testing.assert_array_equal(np.flatnonzero(resized.any(axis=0)), np.arange(4, 12))
        np.testing.assert_allclose(resized[:, 4:12], 0.3, atol=1e-6)

    def test_odd_padding_is_centred_within_one_pixel(self):
        image = np.ones((10, 30), dtype=np.float32)

        resized = resize_with_padding(image, 16)

        content = np.flatnonzero(resized.any(axis=1))
        top, bottom = content[0], 16 - 1 - content[-1]
        assert len(content) == round(16 * 10 / 30)
        assert abs(top - bottom) <= 1


class TestReadImage:
    def test_real_ct_gives_uint8_display_pixels(self):
        path = Path(get_testdata_file("CT_small.dcm"))  # 128 x 128, no window
        ds = pydicom.dcmread(path)
        modality = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        display = (modality - modality.min()) / (modality.max() - modality.min())
        expected = np.round(_block_mean(display, 4) * 255)

        read_ds, frames = read_image(path, PixelSettings(size=32))
        pixels = frames[0].pixels

        assert read_ds.SOPInstanceUID == ds.SOPInstanceUID
        assert pixels.dtype == np.uint8 and pixels.shape == (32, 32)
        np.testing.assert_allclose(pixels, expected, atol=1)

    @pytest.mark.parametrize(("frames", "expected"), [("first", [0]), ("middle", [1]), ("all", [0, 1, 2])])
    def test_multi_frame_objects_give_the_chosen_frames(self, tmp_path, make_dicom, frames, expected):
        stack = np.zeros((3, 16, 16), dtype=np.uint8)
        stack[0, :, :8] = 200   # left half bright in frame 0
        stack[1, :8, :] = 200   # top half in frame 1
        stack[2, :, 8:] = 200   # right half in frame 2
        path = make_dicom(tmp_path / "multi.dcm", stack)

        _, read = read_image(path, PixelSettings(size=16, frames=frames))

        assert [frame.index for frame in read] == expected
        for frame in read:
            np.testing.assert_array_equal(frame.pixels, (stack[frame.index] > 0) * 255)

    def test_text_file_is_not_dicom(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_text("patient list, not an image\n", encoding="utf-8")

        with pytest.raises(Quarantined, match="DICM") as info:
            read_image(path, PixelSettings(size=32))

        assert info.value.reason == "not_dicom"

    def test_truncated_copy_of_a_real_file(self, tmp_path):
        original = Path(get_testdata_file("CT_small.dcm")).read_bytes()
        path = tmp_path / "CT_small_cut.dcm"
        path.write_bytes(original[: len(original) // 2])  # cut inside (7FE0,0010) Pixel Data

        with pytest.raises(Quarantined, match="less than expected") as info:
            read_image(path, PixelSettings(size=32))

        assert info.value.reason == "truncated_pixel_data"

    def test_pydicom_truncated_test_file(self):
        with pytest.raises(Quarantined, match="less than expected") as info:
            read_image(Path(get_testdata_file("MR_truncated.dcm")), PixelSettings(size=32))

        assert info.value.reason == "truncated_pixel_data"

    def test_dataset_without_pixel_data(self, tmp_path):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        del ds.PixelData
        path = tmp_path / "no_pixels.dcm"
        ds.save_as(path)

        with pytest.raises(Quarantined, match=re.escape("(7FE0,0010) Pixel Data is absent")) as info:
            read_image(path, PixelSettings(size=32))

        assert info.value.reason == "no_pixel_data"

    @pytest.mark.parametrize("name", ["SC_rgb_small_odd.dcm", "examples_rgb_color.dcm", "SC_rgb_jpeg_dcmtk.dcm"])
    def test_colour_becomes_luminance_or_rgb_as_configured(self, name):
        path = Path(get_testdata_file(name))
        ds = pydicom.dcmread(path)
        rgb = ds.pixel_array.astype(np.float64) / (2 ** int(ds.BitsStored) - 1)  # YBR decoded to RGB

        _, gray = read_image(path, PixelSettings(size=32))
        _, colour = read_image(path, PixelSettings(size=32, channels=3))

        np.testing.assert_allclose(gray[0].display, rgb @ [0.299, 0.587, 0.114], atol=1e-5)
        np.testing.assert_allclose(colour[0].display, rgb, atol=1e-6)
        assert gray[0].pixels.shape == (32, 32) and colour[0].pixels.shape == (32, 32, 3)

    def test_palette_colour_goes_through_its_lookup_tables(self):
        path = Path(get_testdata_file("examples_palette.dcm"))
        ds = pydicom.dcmread(path)
        rgb = apply_color_lut(ds.pixel_array, ds).astype(np.float64) / (
            2 ** int(ds.RedPaletteColorLookupTableDescriptor[2]) - 1)

        _, frames = read_image(path, PixelSettings(size=32, channels=3))

        np.testing.assert_allclose(frames[0].display, rgb, atol=1e-6)

    def test_grayscale_repeated_into_three_channels(self):
        _, gray = read_image(Path(get_testdata_file("CT_small.dcm")), PixelSettings(size=32))
        _, colour = read_image(Path(get_testdata_file("CT_small.dcm")), PixelSettings(size=32, channels=3))

        for channel in range(3):
            np.testing.assert_array_equal(colour[0].pixels[..., channel], gray[0].pixels)

    def test_unknown_photometric_is_quarantined(self, tmp_path, make_dicom):
        path = make_dicom(tmp_path / "cmyk.dcm", np.zeros((8, 8), np.uint8))
        ds = pydicom.dcmread(path)
        ds.PhotometricInterpretation = "CMYK"  # retired: no decoder maps it to a display
        ds.save_as(path)

        with pytest.raises(Quarantined, match=r"Photometric Interpretation is 'CMYK', not one of") as info:
            read_image(path, PixelSettings(size=8))

        assert info.value.reason == "unsupported_photometric"

    def test_float16_output_keeps_the_display_values(self):
        path = Path(get_testdata_file("CT_small.dcm"))
        _, as_uint8 = read_image(path, PixelSettings(size=32))
        _, as_float = read_image(path, PixelSettings(size=32, dtype="float16"))

        assert as_float[0].pixels.dtype == np.float16
        np.testing.assert_allclose(as_float[0].pixels.astype(np.float32) * 255,
                                   as_uint8[0].pixels.astype(np.float32), atol=0.6)

    def test_second_window_when_asked(self, tmp_path, make_dicom):
        stored = np.arange(64, dtype=np.uint16).reshape(8, 8) * 64
        path = make_dicom(tmp_path / "two_windows.dcm", stored, bits_stored=12,
                          WindowCenter=[1000, 3000], WindowWidth=[500, 2000])
        ds = pydicom.dcmread(path)

        _, first = read_image(path, PixelSettings(size=8))
        _, second = read_image(path, PixelSettings(size=8, voi_index=1))
        _, beyond = read_image(path, PixelSettings(size=8, voi_index=5))  # fewer windows: the last

        np.testing.assert_allclose(second[0].display, np.clip(
            (stored - (3000 - 0.5)) / (2000 - 1) + 0.5, 0, 1), atol=1e-6)
        assert not np.allclose(first[0].display, second[0].display)
        np.testing.assert_array_equal(beyond[0].pixels, second[0].pixels)
        assert ds.WindowCenter == [1000, 3000]

    def test_common_pixel_spacing_resamples_then_pads(self, tmp_path, make_dicom):
        image = np.full((40, 20), 200, np.uint8)
        image[0, 0] = 0  # not blank
        path = make_dicom(tmp_path / "spaced.dcm", image, PixelSpacing=[0.5, 1.0])

        _, frames = read_image(path, PixelSettings(size=32, target_spacing_mm=1.0))

        bright = frames[0].pixels > 100
        rows, cols = np.flatnonzero(bright.any(axis=1)), np.flatnonzero(bright.any(axis=0))
        assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (20, 20)  # 20 mm x 20 mm

    def test_common_spacing_needs_a_spacing(self, tmp_path, make_dicom):
        path = make_dicom(tmp_path / "no_spacing.dcm", np.eye(8, dtype=np.uint8) * 9)

        with pytest.raises(Quarantined) as info:
            read_image(path, PixelSettings(size=8, target_spacing_mm=1.0))

        assert info.value.reason == "no_pixel_spacing"

    def test_blank_image_is_quarantined_not_passed_on(self, tmp_path, make_dicom):
        path = make_dicom(tmp_path / "blank.dcm", np.full((8, 8), 77, np.uint8), WindowCenter=100,
                          WindowWidth=50)

        with pytest.raises(Quarantined, match="every pixel shows the same value") as info:
            read_image(path, PixelSettings(size=8))

        assert info.value.reason == "blank"

    def test_file_without_preamble_is_read(self, tmp_path, make_dicom):
        path = make_dicom(tmp_path / "with_preamble.dcm", np.eye(8, dtype=np.uint8) * 9)
        raw = tmp_path / "raw"
        raw.write_bytes(path.read_bytes()[132:])  # drop the 128-byte preamble and "DICM"

        ds, frames = read_image(raw, PixelSettings(size=8))

        assert ds.SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID
        np.testing.assert_array_equal(frames[0].pixels, np.eye(8, dtype=np.uint8) * 255)

    @pytest.mark.parametrize(("name", "reason"), [
        ("DICOMDIR", "dicomdir"), ("test-SR.dcm", "not_an_image"), ("rtplan.dcm", "not_an_image"),
        ("ExplVR_LitEndNoMeta.dcm", "not_an_image"), ("README.txt", "not_dicom"),
    ])
    def test_directories_and_non_image_objects_are_skipped_with_a_reason(self, name, reason):
        with pytest.raises(Quarantined) as info:
            read_image(Path(get_testdata_file(name)), PixelSettings(size=8))

        assert info.value.reason == reason

    def test_invalid_window_width_is_quarantined_not_a_crash(self, tmp_path, make_dicom):
        # A bad file must never stop the run (module docstring); pydicom rejects width 0.
        path = make_dicom(tmp_path / "zero_width.dcm", np.zeros((8, 8), np.uint8),
                          WindowCenter=100, WindowWidth=0)

        with pytest.raises(Quarantined, match=r"\(0028,1051\) Window Width") as caught:
            read_image(path, PixelSettings(size=8))
        assert caught.value.reason == "invalid_voi"


def _write_labels(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


class TestReadLabels:
    def test_duplicate_keys_with_the_same_label_collapse(self, tmp_path):
        path = _write_labels(tmp_path / "labels.csv",
                             "accession_number,label\nA1,0\nA1,0\nA2,1\n007,1\n")

        mapping, conflicting = read_labels(path, key="accession_number")

        assert mapping == {"A1": "0", "A2": "1", "007": "1"}  # read as text: leading zeros kept
        assert conflicting == set()

    def test_conflicting_labels_are_reported_apart(self, tmp_path):
        path = _write_labels(tmp_path / "labels.csv",
                             "accession_number,label\nA1,0\nA1,1\nA2,1\nA2,1\n")

        mapping, conflicting = read_labels(path, key="accession_number")

        assert mapping == {"A2": "1"}
        assert conflicting == {"A1"}

    def test_blank_keys_and_labels_are_ignored(self, tmp_path):
        path = _write_labels(tmp_path / "labels.csv",
                             "study_instance_uid,label,note\n1.2.3,1,x\n,0,y\n1.2.4,,z\n")

        mapping, conflicting = read_labels(path, key="study_instance_uid")

        assert mapping == {"1.2.3": "1"}
        assert conflicting == set()

    def test_missing_column_names_the_column(self, tmp_path):
        path = _write_labels(tmp_path / "labels.csv", "study,label\nS1,0\n")

        with pytest.raises(DataError, match=re.escape(
                f"{path}: missing column(s) accession_number; found study, label")):
            read_labels(path, key="accession_number")

    def test_unknown_key(self, tmp_path):
        path = _write_labels(tmp_path / "labels.csv", "patient_id,label\nP1,0\n")

        with pytest.raises(SettingsError, match=r"label key must be one of .*; got 'patient_id'"):
            read_labels(path, key="patient_id")


class TestAssignLabel:
    LABELS = {"A1": "0", "A2": "1", "A3": "2", "scans/x.dcm": "1"}

    def test_returns_the_class_value(self):
        record = {"accession_number": "A2", "source_path": "a"}

        label = assign_label(record, key="accession_number", labels=self.LABELS,
                             conflicting=set(), classes=[0, 1])

        assert label == 1 and isinstance(label, int)

    def test_path_key_uses_the_relative_source_path(self):
        record = {"accession_number": "", "source_path": "scans/x.dcm"}

        assert assign_label(record, key="path", labels=self.LABELS, conflicting=set(),
                            classes=[0, 1]) == 1

    def test_no_label(self):
        with pytest.raises(Quarantined, match="no row in the labels file for this accession_number") as info:
            assign_label({"accession_number": "A9", "source_path": "a"}, key="accession_number",
                         labels=self.LABELS, conflicting=set(), classes=[0, 1])

        assert info.value.reason == "no_label"

    def test_label_not_in_classes(self):
        message = re.escape("label '2' is not one of ingest.classes [0, 1]")
        with pytest.raises(Quarantined, match=message) as info:
            assign_label({"accession_number": "A3", "source_path": "a"}, key="accession_number",
                         labels=self.LABELS, conflicting=set(), classes=[0, 1])

        assert info.value.reason == "label_not_in_classes"

    def test_conflicting_label(self):
        with pytest.raises(Quarantined, match="rows for this accession_number disagree") as info:
            assign_label({"accession_number": "A4", "source_path": "a"}, key="accession_number",
                         labels=self.LABELS, conflicting={"A4"}, classes=[0, 1])

        assert info.value.reason == "conflicting_label"


class TestListSources:
    def test_finds_files_without_extension_and_skips_hidden_and_excluded(self, tmp_path):
        data = tmp_path / "data"
        for relative in ["IMG0001", "b/IMG0002", "b/c/scan.dcm", "labels.csv", ".DS_Store",
                         "b/.hidden.dcm", ".git/objects/ab"]:
            (data / relative).parent.mkdir(parents=True, exist_ok=True)
            (data / relative).write_bytes(b"x")
        (data / "empty_dir").mkdir()

        found = list_sources(data, exclude={(data / "labels.csv").resolve()})

        assert found.files == [data / "IMG0001", data / "b" / "IMG0002", data / "b" / "c" / "scan.dcm"]
        assert found.unread == [(".DS_Store", "hidden", "hidden entry (name starts with '.'), not read"),
                                (".git", "hidden", "hidden entry (name starts with '.'), not read"),
                                ("b/.hidden.dcm", "hidden", "hidden entry (name starts with '.'), not read"),
                                ("empty_dir", "empty_folder", "an empty folder")]


def _levels(position: int, *, size: int = 64) -> np.ndarray:
    """Background 10, a bright 200 square at a position of its own, one mid-grey 60 pixel."""
    image = np.full((size, size), 10, dtype=np.uint8)
    image[position : position + 6, 2 * position : 2 * position + 6] = 210
    image[size - 1, size - 1] = 60
    return image


class TestIngestMain:
    # (relative path, image position or None for a text file, accession number, photometric)
    FILES = [
        ("scans/IMG0001", 0, "ACC0", "MONOCHROME2"),
        ("scans/IMG0002", 3, "ACC1", "MONOCHROME2"),
        ("scans/IMG0003", 6, "ACC2", "MONOCHROME1"),
        ("scans/sub/IMG0004", 9, "ACC3", "MONOCHROME2"),
        ("other/a.dcm", 12, "ACC4", "MONOCHROME2"),
        ("other/b.dcm", 15, "ACC5", "MONOCHROME2"),
        ("other/c.dcm", 18, "ACC6", "MONOCHROME2"),
        ("other/d.dcm", 21, "ACC7", "MONOCHROME2"),
        ("scans/unlabelled", 24, "ACC8", "MONOCHROME2"),   # no row in labels.csv
        ("scans/wrong_class.dcm", 27, "ACC9", "MONOCHROME2"),  # label 2 not in classes
        ("notes.txt", None, None, None),
    ]
    LABELS = ("accession_number,label\nACC0,0\nACC0,0\nACC1,1\nACC2,0\nACC3,1\nACC4,0\n"
              "ACC5,1\nACC6,0\nACC7,1\nACC9,2\n")
    USABLE = ["other/a.dcm", "other/b.dcm", "other/c.dcm", "other/d.dcm",
              "scans/IMG0001", "scans/IMG0002", "scans/IMG0003", "scans/sub/IMG0004"]  # sorted
    QUARANTINED = {".DS_Store": "hidden", "notes.txt": "not_dicom", "scans/unlabelled": "no_label",
                   "scans/wrong_class.dcm": "label_not_in_classes"}

    @pytest.fixture
    def workdir(self, tmp_path, monkeypatch, make_dicom, repo_params_file):
        params = yaml.safe_load(repo_params_file.read_text(encoding="utf-8"))
        params["ingest"]["max_quarantine_fraction"] = 0.5
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
        data = tmp_path / "data"
        for relative, position, accession, photometric in self.FILES:
            if position is None:
                (data / relative).write_text("not an image\n", encoding="utf-8")
            else:
                make_dicom(data / relative, _levels(position), photometric=photometric,
                           AccessionNumber=accession, PatientID=f"P{position}")
        (data / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
        (data / "labels.csv").write_text(self.LABELS, encoding="utf-8")
        monkeypatch.chdir(tmp_path)
        return tmp_path

    @staticmethod
    def _set(workdir: Path, **ingest_params: object) -> None:
        path = workdir / "params.yaml"
        params = yaml.safe_load(path.read_text(encoding="utf-8"))
        params["ingest"].update(ingest_params)
        path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    def _set_max_fraction(self, workdir: Path, value: float) -> None:
        self._set(workdir, max_quarantine_fraction=value)

    def _outputs(self, workdir: Path) -> tuple[bytes, pd.DataFrame, str]:
        out = workdir / "outputs" / "ingest"
        return ((out / layout.IMAGES).read_bytes(), pd.read_parquet(out / layout.INGEST_INDEX),
                (out / layout.INGEST_QUARANTINE).read_text())

    def test_worker_pool_writes_exactly_what_one_process_writes(self, workdir):
        self._set(workdir, workers=1)
        ingest.main()
        single = self._outputs(workdir)
        self._set(workdir, workers=3)
        ingest.main()
        pooled = self._outputs(workdir)

        assert pooled[0] == single[0]
        pd.testing.assert_frame_equal(pooled[1], single[1])
        assert pooled[2] == single[2]

    def test_every_frame_becomes_a_row_when_asked(self, workdir, make_dicom):
        stack = np.stack([_levels(3 * i) for i in range(4)])
        make_dicom(workdir / "data" / "cine" / "loop", stack, AccessionNumber="ACC0", PatientID="P99")
        self._set(workdir, frames="all")
        ingest.main()

        _, index, _ = self._outputs(workdir)
        cine = index[index["source_path"] == "cine/loop"]
        assert list(cine["frame_index"]) == [0, 1, 2, 3]
        assert set(cine["number_of_frames"]) == {4} and cine["row_key"].is_unique
        assert len(np.load(workdir / "outputs" / "ingest" / layout.IMAGES)) == len(index) == 12

    def test_non_image_objects_are_listed_but_not_failures(self, workdir):
        shutil.copy(get_testdata_file("test-SR.dcm"), workdir / "data" / "report")
        shutil.copy(get_testdata_file("DICOMDIR"), workdir / "data" / "DICOMDIR")
        self._set_max_fraction(workdir, 0.3)  # 3 of 11 images fail: 27 %, under 30 %

        ingest.main()

        _, _, quarantine = self._outputs(workdir)
        assert "report,not_an_image," in quarantine and "DICOMDIR,dicomdir," in quarantine
        metrics = json.loads((workdir / "reports" / "ingest.json").read_text())
        # the hidden .DS_Store is listed as skipped too
        assert metrics["skipped_not_images"] == 3 and metrics["quarantined"] == 3

    def test_float16_rgb_output(self, workdir):
        self._set(workdir, pixel_dtype="float16", channels=3)
        ingest.main()

        images = np.load(workdir / "outputs" / "ingest" / layout.IMAGES)
        assert images.dtype == np.float16 and images.shape == (8, 64, 64, 3)
        assert 0.0 <= float(images.min()) < float(images.max()) <= 1.0

    def test_writes_images_index_quarantine_and_metrics(self, workdir):
        ingest.main()

        out = workdir / "outputs" / "ingest"
        images = np.load(out / layout.IMAGES)
        index = pd.read_parquet(out / layout.INGEST_INDEX)
        quarantine = pd.read_csv(out / layout.INGEST_QUARANTINE)
        metrics = json.loads((workdir / "reports" / "ingest.json").read_text())

        assert images.dtype == np.uint8 and images.shape == (8, 64, 64)
        assert list(index.columns) == list(layout.INDEX_COLUMNS)
        assert list(index["source_path"]) == self.USABLE
        assert dict(zip(quarantine["path"], quarantine["reason"])) == self.QUARANTINED
        assert metrics == {"files": 12, "images": 8, "quarantined": 3, "skipped_not_images": 1,
                           "quarantined_hidden": 1, "quarantined_label_not_in_classes": 1,
                           "quarantined_no_label": 1, "quarantined_not_dicom": 1,
                           # decode: reduced (the default); the sample's small images are not worth it
                           "decode_reduced": 0, "decode_full": 8}

    def test_rows_line_up_with_images(self, workdir):
        ingest.main()

        out = workdir / "outputs" / "ingest"
        images = np.load(out / layout.IMAGES)
        index = pd.read_parquet(out / layout.INGEST_INDEX)
        by_path = {relative: (position, accession, photometric)
                   for relative, position, accession, photometric in self.FILES}
        labels = dict(line.split(",") for line in self.LABELS.splitlines()[1:])
        for row, image in zip(index.itertuples(), images):
            position, accession, photometric = by_path[row.source_path]
            # 64 x 64 at image_size 64: no resize; own range 10..210 -> 0..1 -> 0..255
            expected = np.round((_levels(position).astype(np.float64) - 10) / 200 * 255)
            if photometric == "MONOCHROME1":
                expected = 255 - expected
            np.testing.assert_array_equal(image, expected, err_msg=row.source_path)
            assert row.accession_number == accession
            assert row.label == int(labels[accession])
            assert row.photometric == photometric
            assert (row.rows, row.columns, row.bits_stored) == (64, 64, 8)
            assert row.sha256 == hashlib.sha256((workdir / "data" / row.source_path).read_bytes()).hexdigest()
            assert row.pixel_mean == pytest.approx(image.mean() / 255, abs=1e-6)

    def test_too_many_quarantined_files_fail_naming_counts_and_reasons(self, workdir):
        self._set_max_fraction(workdir, 0.2)

        with pytest.raises(DataError, match=re.escape(
                "3 of 11 image files quarantined (27.3% > ingest.max_quarantine_fraction 20.0%)")) as info:
            ingest.main()

        message = str(info.value)
        for reason in self.QUARANTINED.values():
            assert f"1 {reason}" in message
        assert "quarantine.csv" in message

    def test_missing_labels_file(self, workdir):
        (workdir / "data" / "labels.csv").unlink()

        with pytest.raises(DataError, match=re.escape("labels file data/labels.csv not found")):
            ingest.main()


def test_pydicom_test_files_are_local():
    """The tests above must not download anything: these files ship with pydicom."""
    for name in ["CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "MR_truncated.dcm",
                 "SC_rgb_small_odd.dcm", "examples_rgb_color.dcm", "examples_palette.dcm"]:
        path = get_testdata_file(name, download=False)
        assert path is not None and Path(path).is_file()


class TestPredefinedSplitAndExtremeShare:
    def test_split_column_of_the_labels_file_is_carried_into_the_index(self, tmp_path, monkeypatch,
                                                                       make_dicom, repo_params_file):
        data = tmp_path / "data"
        for number, split in enumerate(["train", "val", "test", ""]):
            make_dicom(data / f"IMG{number}", _levels(number * 3), AccessionNumber=f"ACC{number}")
        (data / "labels.csv").write_text(
            "accession_number,label,split\nACC0,0,train\nACC1,1,val\nACC2,0,test\nACC3,1,\n",
            encoding="utf-8")
        (tmp_path / "params.yaml").write_text(repo_params_file.read_text(encoding="utf-8"))
        monkeypatch.chdir(tmp_path)

        ingest.main()

        index = pd.read_parquet(tmp_path / "outputs" / "ingest" / layout.INGEST_INDEX)
        assert dict(zip(index["accession_number"], index["predefined_split"])) == {
            "ACC0": "train", "ACC1": "val", "ACC2": "test", "ACC3": ""}

    def test_extreme_share_counts_clipped_pixels(self):
        # Within half an 8-bit step of an end counts, whatever rounding put it there.
        display = np.array([[0.0, 0.2, 1.0, 1 - 1e-9], [0.5, 1e-12, 0.7, 0.01]])
        assert pixel_display.extreme_share(display) == pytest.approx(4 / 8)
