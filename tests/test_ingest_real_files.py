"""Every real file that pydicom, pydicom-data and deid-data ship, through the ingest stage.

Each file either lands in the quarantine with the reason written for it by hand in
:data:`QUARANTINED` (each checked by opening the file with pydicom and seeing what is wrong with
it), or, when it is not listed there, yields pixels equal to what pydicom's own decoders and LUT
functions give, following the steps documented in ``dicomflow.dicom.display.to_display_pixels``
(written out again here, not taken from the stage). No file may crash the stage (reason
``unreadable``) or be passed on as a blank, non-finite or out-of-range image.
"""

from __future__ import annotations

import fnmatch
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
    ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
)

from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.ingestion import ingest_file

# Every code the stage may give a file; "unreadable" (an unexpected exception) is deliberately absent.
REASONS = {"", "not_dicom", "truncated_header", "truncated_pixel_data", "dicomdir", "not_an_image", "no_pixel_data",
           "unsupported_pixel_data", "unsupported_photometric", "undecodable", "invalid_voi", "invalid_pixels", "blank",
           "no_pixel_spacing"}
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
LUMINANCE = np.array([0.299, 0.587, 0.114])
SETTINGS = PixelSettings(size=32)

# The files the stage must quarantine, by case id (a pattern where a whole series shares one
# reason), with the reason each deserves; every file not listed must give an image.
QUARANTINED: dict[str, str] = {
    # Not DICOM at all: documentation, package code, zip archives (their members are tested
    # below), an ICC profile, dcmdump output, JSON, gzip.
    "deid-data/README.md": "not_dicom",
    "deid-data/__init__.py": "not_dicom",
    "deid-data/ultrasounds/GREYSCALE_CINE.zip": "not_dicom",
    "deid-data/ultrasounds/RGB_CINE.zip": "not_dicom",
    "pydicom/charset_files/FileInfo.txt": "not_dicom",
    "pydicom/palettes/README.md": "not_dicom",
    "pydicom/test_files/README.txt": "not_dicom",
    "pydicom/test_files/crayons.icc": "not_dicom",
    "pydicom/test_files/dicomdirtests/README.txt": "not_dicom",
    "pydicom/test_files/dicomdirtests/TINY_ALPHA/README": "not_dicom",
    "pydicom/test_files/rtplan.dump": "not_dicom",
    "pydicom/test_files/rtstruct.dump": "not_dicom",
    "pydicom/test_files/test1.json": "not_dicom",
    "pydicom/test_files/test_PN.json": "not_dicom",
    "pydicom/test_files/zipMR.gz": "not_dicom",
    # "CT_small.dcm with no File Meta" (pydicom's README), but as shipped its first byte is a stray
    # 0x20 before (0008,0005): even forced, pydicom reads one element (0820,0500) and no SOP Class.
    "pydicom/test_files/no_meta.dcm": "not_dicom",
    # Media Storage Directories.
    "pydicom/test_files/dicomdirtests/DICOMDIR": "dicomdir",
    "pydicom/test_files/dicomdirtests/DICOMDIR-bigEnd": "dicomdir",
    "pydicom/test_files/dicomdirtests/DICOMDIR-empty.dcm": "dicomdir",
    "pydicom/test_files/dicomdirtests/DICOMDIR-implicit": "dicomdir",
    "pydicom/test_files/dicomdirtests/DICOMDIR-nooffset": "dicomdir",
    "pydicom/test_files/dicomdirtests/DICOMDIR-nopatient": "dicomdir",
    "pydicom/test_files/dicomdirtests/DICOMDIR-reordered": "dicomdir",
    "pydicom/test_files/dicomdirtests/TINY_ALPHA/DICOMDIR": "dicomdir",
    # SOP Classes that are no image: Color Palettes, RT (Ion) Plans, an RT Structure Set, SRs and
    # an ECG waveform (the two NoMeta files are RT Ion Plans without File Meta).
    "pydicom/palettes/*.dcm": "not_an_image",
    "pydicom/test_files/ExplVR_BigEndNoMeta.dcm": "not_an_image",
    "pydicom/test_files/ExplVR_LitEndNoMeta.dcm": "not_an_image",
    "pydicom/test_files/reportsi.dcm": "not_an_image",
    "pydicom/test_files/reportsi_with_empty_number_tags.dcm": "not_an_image",
    "pydicom/test_files/rtplan.dcm": "not_an_image",
    "pydicom/test_files/rtstruct.dcm": "not_an_image",
    "pydicom/test_files/test-SR.dcm": "not_an_image",
    "pydicom/test_files/waveform_ecg.dcm": "not_an_image",
    # Image SOP Classes without Pixel Data: the character-set files (CR headers) and the TINY_ALPHA
    # set's CT images, stripped to their headers.
    "pydicom/charset_files/chrJapMulti.dcm": "no_pixel_data",
    "pydicom/charset_files/chrJapMultiExplicitIR6.dcm": "no_pixel_data",
    "pydicom/charset_files/chrKoreanMulti.dcm": "no_pixel_data",
    "pydicom/test_files/dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM*": "no_pixel_data",
    # Parser fixtures of 1 to 4 elements: no SOP Class, no Pixel Data.
    "pydicom/charset_files/chrSQEncoding.dcm": "no_pixel_data",
    "pydicom/charset_files/chrSQEncoding1.dcm": "no_pixel_data",
    "pydicom/test_files/UN_sequence.dcm": "no_pixel_data",
    "pydicom/test_files/empty_charset_LEI.dcm": "no_pixel_data",
    "pydicom/test_files/no_meta_group_length.dcm": "no_pixel_data",
    "pydicom/test_files/priv_SQ.dcm": "no_pixel_data",
    # Two bytes of Pixel Data beside a private sequence and nothing else: no Photometric
    # Interpretation (nor rows, columns or bits) to read them with.
    "pydicom/test_files/meta_missing_tsyntax.dcm": "unsupported_photometric",
    "pydicom/test_files/nested_priv_SQ.dcm": "unsupported_photometric",
    # PALETTE COLOR in big-endian files: pydicom's apply_color_lut reads OW lookup tables as little
    # endian whatever the file's byte order, so the colours would be wrong (OBXXXX1A_expb.dcm shows
    # almost black); the little-endian copies give images.
    "pydicom-data/OBXXXX1A_expb.dcm": "unsupported_photometric",
    "pydicom-data/OBXXXX1A_expb_2frame.dcm": "unsupported_photometric",
    "pydicom-data/gdcm-US-ALOKA-16_big.dcm": "unsupported_photometric",
    # An RT plan cut inside its header: pydicom reads what is there without a word.
    "pydicom/test_files/rtplan_truncated.dcm": "truncated_header",
    # Cut 8 bytes short inside the encapsulated Pixel Data: pydicom only warns and returns a data
    # set without a single element, so nothing in it says "image", yet the file was one.
    "pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm": "truncated_pixel_data",
    # 8130 of the 8192 bytes of native Pixel Data that 64 x 64 x 16 bits need.
    "pydicom/test_files/MR_truncated.dcm": "truncated_pixel_data",
    # 12-bit lossy JPEG with invalid SOS parameters (pydicom's README): libjpeg and Pillow refuse it.
    "pydicom/test_files/JPEG-lossy.dcm": "undecodable",
    # A JPEG 2000 stream with 4 bytes overwritten by a Sequence Delimiter: no readable J2K header.
    "pydicom/test_files/JPEG2000-embedded-sequence-delimiter.dcm": "undecodable",
    # Number of Frames is "1A", not an integer: the size of the pixel data cannot be known.
    "pydicom/test_files/badVR.dcm": "undecodable",
    # CT of 991 to 1489 HU (17166) and 498 to 1399 HU (17196) under its only window, centre 30,
    # width 100 (-20 to 80 HU): every pixel above the window shows the same white.
    "pydicom/test_files/dicomdirtests/77654033/CT2/17166": "blank",
    "pydicom/test_files/dicomdirtests/77654033/CT2/17196": "blank",
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


def expected_reason(case_id: str) -> str:
    """The reason :data:`QUARANTINED` gives the file, ``""`` (an image) when it lists none."""
    reasons = [reason for pattern, reason in QUARANTINED.items() if fnmatch.fnmatchcase(case_id, pattern)]
    assert len(reasons) <= 1, f"{case_id} matches several patterns of QUARANTINED"
    return reasons[0] if reasons else ""


def test_every_quarantine_entry_names_real_files():
    """A stale entry (a file renamed or gone from a package) would otherwise go unnoticed."""
    ids = [case.id for case in CASES]
    assert [pattern for pattern in QUARANTINED if not fnmatch.filter(ids, pattern)] == []


def _read_with_pydicom(path: Path) -> pydicom.Dataset:
    """The data set as pydicom reads it; one without File Meta (no preamble, no "DICM") gets
    the transfer syntax pydicom found while reading it."""
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError:
        ds = pydicom.dcmread(path, force=True)
    implicit, little = ds.original_encoding
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
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


def _colour_reference(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """pydicom's RGB (YBR already converted by its decoders) or PALETTE COLOR LUTs, scaled to [0, 1]."""
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb, bits = apply_color_lut(stored, ds), int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        rgb, bits = stored, int(ds.BitsStored)
    assert rgb.ndim == 3 and rgb.shape[-1] == 3, rgb.shape
    return np.clip(rgb.astype(np.float64) / (2**bits - 1), 0.0, 1.0)


def reference_display(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """Frame 0 as pydicom shows it: grey levels, and RGB for a colour file (else None)."""
    ds = _read_with_pydicom(path)
    several = int(ds.get("NumberOfFrames", 1) or 1) > 1
    stored = pixel_array(ds, index=0) if several else ds.pixel_array
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. "Applying a VOI LUT on a float input array"
        if ds.PhotometricInterpretation in GRAYSCALE:
            return _grayscale_reference(ds, stored), None
        assert ds.PhotometricInterpretation in COLOUR, ds.PhotometricInterpretation
        rgb = _colour_reference(ds, stored)
        return rgb @ LUMINANCE, rgb


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


def check_file(root: Path, path: Path, reason: str) -> None:
    """Ingest ``path``: quarantined with ``reason``, or (``""``) an image equal to pydicom's."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about many odd headers; not under test
        result = ingest_file(path, data_dir=root, settings=SETTINGS)
        assert result.reason in REASONS, f"{result.reason}: {result.detail}"

        if reason:
            assert result.reason == reason, result.detail
            assert result.images == ()
            with pytest.raises(Quarantined) as info:
                read_image(path, SETTINGS)
            assert info.value.reason == reason
            return

        assert result.reason == "", result.detail
        gray, rgb = reference_display(path)
        assert len(result.images) == 1
        _, frames = read_image(path, SETTINGS)
        assert len(frames) == 1
        _check_display(frames[0], gray, channels=1)
        pixels, record = result.images[0]
        np.testing.assert_array_equal(pixels, frames[0].pixels)
        assert record["frame_index"] == 0
        if rgb is not None:
            colour = PixelSettings(size=SETTINGS.size, channels=3)
            _, frames = read_image(path, colour)
            _check_display(frames[0], rgb, channels=3)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_real_file_gives_pydicom_pixels_or_the_right_quarantine_reason(case):
    check_file(case.root, case.path, expected_reason(case.id))


# deid-data also ships two ultrasound cine loops zipped (the zips themselves are fed in above).
CINE_ZIPS = [case for case in CASES if case.id.startswith("deid-data/") and case.path.suffix == ".zip"]


@pytest.mark.parametrize("case", CINE_ZIPS, ids=[case.id for case in CINE_ZIPS])
def test_dicom_files_inside_the_deid_data_zips(case, tmp_path):
    with zipfile.ZipFile(case.path) as archive:
        archive.extractall(tmp_path)
    members = sorted(path for path in tmp_path.rglob("*") if path.is_file())
    assert members

    for member in members:  # real cine loops: every one must give an image
        check_file(tmp_path, member, "")


# The same image stored in several transfer syntaxes (or planar configurations), all lossless:
# whatever pydicom's functions do, the display must not depend on the encoding. (The big-endian
# copies of the PALETTE COLOR files, OBXXXX1A_expb*.dcm and gdcm-US-ALOKA-16_big.dcm, are
# quarantined instead: see QUARANTINED.)
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
