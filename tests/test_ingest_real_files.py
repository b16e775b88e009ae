"""Every real file that pydicom, pydicom-data and deid-data ship, through the ingest stage.

Each file either yields pixels equal to what pydicom's own decoders and LUT functions give, following
the steps documented in ``dicomflow.dicom.display.to_display_pixels`` (written out again here, not taken from
the stage), or lands in the quarantine with the reason the file deserves, derived here from what
pydicom makes of it. No file may crash the stage (reason ``unreadable``) or be passed on as a blank,
non-finite or out-of-range image.
"""

from __future__ import annotations

import importlib.resources
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, apply_windowing, pixel_array
from pydicom.uid import (
    ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage,
)

from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.ingestion import ingest_file

# Every code the stage may give a file; "unreadable" (an unexpected exception) is deliberately absent.
REASONS = {"", "not_dicom", "truncated_header", "truncated_pixel_data", "dicomdir", "not_an_image", "no_pixel_data", "unsupported_pixel_data",
           "unsupported_photometric", "undecodable", "invalid_voi", "invalid_pixels", "blank",
           "no_pixel_spacing"}
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
LUMINANCE = np.array([0.299, 0.587, 0.114])
SETTINGS = PixelSettings(size=32)

# Plainly not DICOM: text, JSON, archives, ICC profiles, dcmdump output, Python modules.
NOT_DICOM_SUFFIXES = {".txt", ".md", ".json", ".gz", ".zip", ".icc", ".dump", ".py"}
NOT_DICOM_NAMES = {"README"}

# Files the general rules below cannot judge, with the reason each deserves.
ODD_FILES: dict[str, str] = {
    # The data set is cut 8 bytes short, inside the encapsulated Pixel Data (the sequence
    # delimiter is missing). pydicom only warns ("End of file reached before delimiter") and
    # returns a data set without a single element, so nothing in it says "image": this is a
    # truncated file, not a file that never had pixels.
    "emri_small_jpeg_2k_lossless_too_short.dcm": "truncated_pixel_data",
    # An RT plan cut inside its header: pydicom reads what is there without a word, and the
    # data set looks like a complete non-image object.
    "rtplan_truncated.dcm": "truncated_header",
}

# Data folders of the test-data packages (distribution name -> top-level module holding `data/`).
DATA_PACKAGES = {"pydicom-data": "data_store", "deid-data": "deid_data"}


@dataclass(frozen=True)
class Case:
    root: Path  # ingest_file's data_dir
    path: Path
    id: str


def _pydicom_files() -> list[Case]:
    root = Path(pydicom.data.__file__).parent
    listed = (pydicom.data.get_testdata_files() + pydicom.data.get_charset_files()
              + pydicom.data.get_palette_files())
    cases = []
    for name in listed:
        path = Path(name)
        # get_testdata_files() also lists pydicom-data's files (an external source): counted there.
        if path.is_file() and path.resolve().is_relative_to(root.resolve()):
            cases.append(Case(root, path, f"pydicom/{path.relative_to(root).as_posix()}"))
    return cases


def _package_files(distribution: str, module: str) -> list[Case]:
    root = Path(str(importlib.resources.files(module) / "data"))
    return [Case(root, path, f"{distribution}/{path.relative_to(root).as_posix()}")
            for path in sorted(root.rglob("*"))
            if path.is_file() and "__pycache__" not in path.parts]


CASES = sorted(_pydicom_files() + [case for distribution, module in DATA_PACKAGES.items()
                                   for case in _package_files(distribution, module)], key=lambda c: c.id)


def test_every_package_contributes_files():
    """Guards the collection itself: a moved data folder must not shrink the test to nothing."""
    by_source = {source: sum(case.id.startswith(f"{source}/") for case in CASES)
                 for source in ("pydicom", *DATA_PACKAGES)}
    assert by_source["pydicom"] > 150, by_source
    assert by_source["pydicom-data"] > 60, by_source
    assert by_source["deid-data"] > 15, by_source
    assert len({case.path.resolve() for case in CASES}) == len(CASES)


@dataclass(frozen=True)
class Expected:
    """What a file should give: a quarantine reason, or reference display pixels of frame 0."""

    reason: str = ""
    gray: np.ndarray | None = None  # channels=1
    rgb: np.ndarray | None = None   # channels=3, colour files only


def _read_with_pydicom(path: Path) -> pydicom.Dataset | str:
    """The data set as pydicom reads it, or the quarantine reason when it is not a usable one."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path)
        except InvalidDicomError:
            # No preamble/"DICM": the stage accepts it only when forced parsing finds a SOP Class UID.
            try:
                ds = pydicom.dcmread(path, force=True)
            except Exception:  # noqa: BLE001
                return "not_dicom"
            if "SOPClassUID" not in ds:
                return "not_dicom"
            # No meta information: the transfer syntax is the encoding pydicom found while reading.
            implicit, little = ds.original_encoding
            if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}) and None not in (implicit, little):
                ds.ensure_file_meta()
                ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                                  ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        except Exception:  # noqa: BLE001  a damaged header
            return "truncated_header"
    if any("End of file reached" in str(warning.message) for warning in caught):
        return "truncated_header"
    return ds


def _grayscale_reference(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Modality LUT, VOI LUT or window number 0 scaled by its output range, MONOCHROME1 inverted."""
    values = apply_modality_lut(stored, ds)
    lut = ds.get("VOILUTSequence")
    uses_lut = bool(lut) and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData"))
    uses_window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
    if uses_lut:
        shown = apply_voi_lut(values, ds, index=0).astype(np.float64)
        low, high = 0.0, float(2 ** int(lut[0].LUTDescriptor[2]) - 1)  # PS3.3 C.11.2.1.1
    elif uses_window:
        shown = apply_voi_lut(values, ds, index=0)
        # The window's output range is what it maps the far ends of any input to.
        with np.errstate(over="ignore"):
            low, high = apply_windowing(np.array([-1e300, 1e300]), ds, index=0)
    else:
        shown = values.astype(np.float64)
        low, high = shown.min(), shown.max()
    scaled = np.clip((shown - low) / (high - low), 0.0, 1.0) if high > low else np.zeros(shown.shape)
    return 1.0 - scaled if ds.PhotometricInterpretation == "MONOCHROME1" else scaled


def _colour_reference(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray | str:
    """pydicom's RGB (YBR already converted by its decoders) or PALETTE COLOR LUTs, scaled to [0, 1]."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb, bits = apply_color_lut(stored, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        rgb, bits = stored, int(ds.BitsStored)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        return "unsupported_photometric"
    return np.clip(rgb.astype(np.float64) / (2**bits - 1), 0.0, 1.0)


def expected_outcome(path: Path) -> Expected:
    if path.name in ODD_FILES:
        return Expected(ODD_FILES[path.name])
    if path.suffix.lower() in NOT_DICOM_SUFFIXES or path.name in NOT_DICOM_NAMES:
        return Expected("not_dicom")
    ds = _read_with_pydicom(path)
    if isinstance(ds, str):
        return Expected(ds)
    if (ds.file_meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage
            or "DirectoryRecordSequence" in ds):
        return Expected("dicomdir")
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            return Expected("unsupported_pixel_data")
        sop_class = ds.get("SOPClassUID")
        if sop_class is not None and "Image" not in sop_class.name:  # SR, RT plan, waveform, palette ...
            return Expected("not_an_image")
        return Expected("no_pixel_data")
    photometric = ds.get("PhotometricInterpretation")
    if photometric not in GRAYSCALE + COLOUR:
        return Expected("unsupported_photometric")
    if photometric == "PALETTE COLOR" and ds.file_meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
        # pydicom's apply_color_lut reads OW lookup tables as little endian whatever the file's
        # byte order: the colours would be wrong (OBXXXX1A_expb.dcm shows almost black).
        return Expected("unsupported_photometric")
    try:
        several = int(ds.get("NumberOfFrames", 1) or 1) > 1
        stored = pixel_array(ds, index=0) if several else ds.pixel_array
    except Exception as err:  # noqa: BLE001  pydicom cannot decode it
        return Expected("truncated_pixel_data" if "less than expected" in str(err) else "undecodable")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Applying a VOI LUT on a float input array"
        if photometric in GRAYSCALE:
            try:
                gray = _grayscale_reference(ds, stored)
            except ValueError:  # pydicom rejects the window, e.g. (0028,1051) Window Width < 1
                return Expected("invalid_voi")
            rgb = None
        else:
            rgb = _colour_reference(ds, stored)
            if isinstance(rgb, str):
                return Expected(rgb)
            gray = rgb @ LUMINANCE
    if not np.isfinite(gray).all():
        return Expected("invalid_pixels")
    if gray.max() == gray.min():
        return Expected("blank")
    return Expected(gray=gray, rgb=rgb)


def _check_display(frame, expected: np.ndarray, channels: int) -> None:
    display = frame.display
    assert frame.index == 0
    assert display.dtype == np.float32
    assert display.shape == expected.shape
    assert np.isfinite(display).all()
    assert 0.0 <= display.min() < display.max() <= 1.0, "blank or out-of-range image passed on"
    # assert_allclose is slow on camera-sized arrays; the same tolerance, its message only on failure
    if np.abs(display - expected).max() > 1e-5:
        np.testing.assert_allclose(display, expected, atol=1e-5, rtol=0)
    assert frame.pixels.shape == PixelSettings(size=SETTINGS.size, channels=channels).image_shape
    assert frame.pixels.dtype == np.uint8


def check_file(root: Path, path: Path) -> str:
    """Ingest ``path`` and check the outcome against pydicom's; returns the stage's reason."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about many odd headers; not under test
        result = ingest_file(path, data_dir=root, settings=SETTINGS)
        assert result.reason in REASONS, f"{result.reason}: {result.detail}"
        expected = expected_outcome(path)

        if expected.reason:
            assert result.reason == expected.reason, result.detail
            assert result.images == ()
            with pytest.raises(Quarantined) as info:
                read_image(path, SETTINGS)
            assert info.value.reason == expected.reason
            return result.reason

        assert result.reason == "", result.detail
        assert len(result.images) == 1
        _, frames = read_image(path, SETTINGS)
        assert len(frames) == 1
        _check_display(frames[0], expected.gray, channels=1)
        pixels, record = result.images[0]
        np.testing.assert_array_equal(pixels, frames[0].pixels)
        assert record["frame_index"] == 0
        if expected.rgb is not None:
            colour = PixelSettings(size=SETTINGS.size, channels=3)
            _, frames = read_image(path, colour)
            _check_display(frames[0], expected.rgb, channels=3)
    return result.reason


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_real_file_gives_pydicom_pixels_or_the_right_quarantine_reason(case):
    check_file(case.root, case.path)


# deid-data also ships two ultrasound cine loops zipped (the zips themselves are fed in above).
CINE_ZIPS = [case for case in CASES if case.id.startswith("deid-data/") and case.path.suffix == ".zip"]


@pytest.mark.parametrize("case", CINE_ZIPS, ids=[case.id for case in CINE_ZIPS])
def test_dicom_files_inside_the_deid_data_zips(case, tmp_path):
    with zipfile.ZipFile(case.path) as archive:
        archive.extractall(tmp_path)
    members = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    assert members

    reasons = [check_file(tmp_path, member) for member in members]

    assert reasons == [""] * len(members)  # real cine loops: every one must give an image


# The same image stored in several transfer syntaxes (or planar configurations), all lossless:
# whatever pydicom's functions do, the display must not depend on the encoding. (The big-endian
# copies of the PALETTE COLOR files, OBXXXX1A_expb*.dcm and gdcm-US-ALOKA-16_big.dcm, are
# quarantined instead: see expected_outcome.)
SAME_IMAGE = [
    ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm",
     "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"],
    ["emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm",
     "emri_small_jpeg_2k_lossless.dcm", "emri_small_jpeg_ls_lossless.dcm"],
    ["OBXXXX1A.dcm", "OBXXXX1A_rle.dcm"],
    ["OBXXXX1A_2frame.dcm", "OBXXXX1A_rle_2frame.dcm"],
    ["SC_rgb.dcm", "SC_rgb_expb.dcm", "SC_rgb_rle.dcm", "SC_rgb_gdcm2k_uncompressed.dcm"],
    ["SC_rgb_16bit.dcm", "SC_rgb_expb_16bit.dcm", "SC_rgb_rle_16bit.dcm"],
    ["SC_rgb_32bit.dcm", "SC_rgb_expb_32bit.dcm", "SC_rgb_rle_32bit.dcm"],
    ["SC_rgb_2frame.dcm", "SC_rgb_expb_2frame.dcm", "SC_rgb_rle_2frame.dcm"],
    ["SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"],
    ["rtdose.dcm", "rtdose_expb.dcm", "rtdose_rle.dcm"],
    ["liver.dcm", "liver_expb.dcm"],
    ["color-pl.dcm", "color-px.dcm"],
    ["693_UNCR.dcm", "693_J2KR.dcm"],
    ["MR2_UNCR.dcm", "MR2_J2KR.dcm"],
    ["US1_UNCR.dcm", "US1_J2KR.dcm"],
]


@pytest.mark.parametrize("names", SAME_IMAGE, ids=[group[0] for group in SAME_IMAGE])
def test_the_encoding_does_not_change_the_display(names):
    by_name = {case.path.name: case.path for case in CASES if case.id.startswith(("pydicom/", "pydicom-data/"))}
    displays = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            _, frames = read_image(by_name[name], PixelSettings(size=SETTINGS.size, channels=3))
            displays[name] = frames[0].display
    first = names[0]
    for name in names[1:]:
        np.testing.assert_allclose(displays[name], displays[first], atol=1e-6,
                                   err_msg=f"{name} is shown differently from {first}")
