"""Colour photographs (dermoscopy, fundus, clinical photos) as DICOM objects, with nothing lost
and nothing of the camera's metadata carried over.

    dicomflow import-photos FOLDER --table photos.csv --kind dermoscopy|fundus|photo --out data/

Each photo listed in the table becomes one object: VL Photographic Image Storage (modality XC)
for ``dermoscopy`` and ``photo``, Ophthalmic Photography 8 Bit Image Storage (modality OP) for
``fundus``. Patient, study, laterality and body site come from the table; nothing comes from the
file's name or its EXIF, XMP or comments.

* **JPEG** (baseline or extended 8-bit, Huffman, YCbCr or grey): the bitstream is encapsulated as
  it is (JPEG Baseline or JPEG Extended transfer syntax): quantisation and Huffman tables, frame
  and scan headers and the entropy-coded data byte for byte. Progressive JPEG (no current DICOM
  transfer syntax) and RGB JPEG (Adobe "no transform"; the photograph IODs allow none) are
  decoded and stored losslessly instead, still marked lossy-compressed. Only the marker segments that decoding does
  not need are left out: APP1 (EXIF, XMP), APP2 (ICC, moved to the header), APP3-APP13, APP15,
  COM, a JFIF thumbnail and anything after EOI. The JFIF APP0 and Adobe APP14 segments stay:
  they say whether the three components are YCbCr or RGB (:func:`jpeg_photometric`).
* **PNG** (8 bits per sample, grey, RGB or palette): stored losslessly, RLE Lossless; ancillary
  chunks (tEXt, iTXt, zTXt, eXIf, tIME) are never read.
* **ICC profile** (JPEG APP2 ``ICC_PROFILE`` chunks, PNG iCCP): (0028,2000) ICC Profile, with
  (0028,2002) Color Space when the profile names sRGB, Adobe RGB or ROMM RGB. A colour photo
  without one is declared sRGB (the default of cameras and the web), with the sRGB profile.
* **EXIF orientation** (the camera's "rotate me when shown" flag): a JPEG cannot be rotated and
  stay bit-exact. ``orientation="apply"`` (the default) decodes a photo whose flag is not 1
  (top-left), turns it upright and stores those pixels losslessly (ImageType DERIVED, still
  marked lossy-compressed); ``orientation="keep"`` keeps the bitstream, as encoded. Photos with
  no flag or flag 1, nearly every fundus and dermoscopy camera's, are always bit-exact.

UIDs are derived from the photo's bytes and its table row (:func:`photo_uids`), so a second run
finds every object in place and writes nothing; objects are written under a hidden temporary
name and renamed, so a run killed mid-way leaves nothing half-written and a rerun completes it.
A photo that cannot be imported is listed with a reason code (:data:`REASONS`) and the rest go on.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import hashlib
import io
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    OphthalmicPhotography8BitImageStorage,
    RLELossless,
    VLPhotographicImageStorage,
    generate_uid,
)

from dicomflow.errors import DataError, SettingsError
from dicomflow.runtime.progress import progress

KINDS = ("dermoscopy", "fundus", "photo")
ORIENTATIONS = ("apply", "keep")
TABLE_COLUMNS = ("file", "patient_id", "study_date", "label")
OPTIONAL_COLUMNS = ("study_id", "laterality", "body_site", "split")
SPLITS = ("train", "val", "test")  # a table's own split, for split.method: predefined
OBJECT_FOLDER = "photos"           # objects go to OUT/photos/<SOP Instance UID>.dcm
LABELS_FILE = "labels.csv"         # beside them, the pipeline's paths.labels when OUT is data/
REPORT_SUFFIX = ".import_report.csv"  # the report goes beside the table: it names source files
LABEL_COLUMNS = ("sop_instance_uid", "accession_number", "study_instance_uid", "path", "label")
REPORT_COLUMNS = ("file", "status", "reason", "detail", "path")
PARTIAL_SUFFIX = ".partial"

# Reason codes of a photo that is not imported (the report's ``reason`` column).
REASONS = {
    "no_table_row": "a file in FOLDER that no table row names",
    "missing_photo": "a table row whose file is not in FOLDER",
    "bad_row": "a table row with a missing or malformed value",
    "no_laterality": "a fundus photo whose row gives no laterality (L or R)",
    "duplicate_row": "a second table row for the same file",
    "duplicate_photo": "the same bytes as a photo already imported in this run",
    "label_not_in_classes": "a label outside the declared classes",
    "not_an_image": "neither JPEG nor PNG, nor any picture format",
    "unsupported_format": "a picture format other than JPEG and PNG (TIFF, HEIC, ...)",
    "truncated_jpeg": "the JPEG ends before its end-of-image marker",
    "corrupt_jpeg": "the JPEG's markers or data cannot be read",
    "cmyk_jpeg": "a 4-component (CMYK or YCCK) JPEG",
    "unsupported_jpeg": "a JPEG process DICOM or the decoders do not take (12-bit, lossless, ...)",
    "png_16bit": "a PNG with 16 bits per sample",
    "unsupported_png": "a PNG with transparency, under 8 bits of grey, or animation",
    "corrupt_png": "the PNG cannot be decoded",
    "too_large": "more pixels than the decoders accept",
    "unreadable": "the file cannot be read",
    "worker_died": "the decoding process died on it (a decoder crash, or out of memory)",
    "timeout": "decoding it took longer than the per-photo limit",
    "worker_error": "an unexpected error (a bug in dicomflow: please report it)",
}

_SOP_CLASS = {"dermoscopy": VLPhotographicImageStorage, "photo": VLPhotographicImageStorage,
              "fundus": OphthalmicPhotography8BitImageStorage}
_MODALITY = {"dermoscopy": "XC", "photo": "XC", "fundus": "OP"}
_UID_NAMESPACE = "dicomflow import-photos 1"  # changing it changes every UID: never, once used
_MAX_LO, _MAX_SH, _MAX_CS = 64, 16, 16

# JPEG markers (ITU-T T.81 Table B.1).
_SOI, _EOI, _SOS, _DHT, _DQT, _DRI, _DNL, _DAC, _COM = 0xD8, 0xD9, 0xDA, 0xC4, 0xDB, 0xDD, 0xDC, 0xCC, 0xFE
_APP0, _APP2, _APP14 = 0xE0, 0xE2, 0xEE
_SOF = {0xC0: "baseline", 0xC1: "extended", 0xC2: "progressive", 0xC3: "lossless", 0xC5: "hierarchical",
        0xC6: "hierarchical", 0xC7: "hierarchical", 0xC9: "arithmetic", 0xCA: "arithmetic",
        0xCB: "arithmetic", 0xCD: "arithmetic", 0xCE: "arithmetic", 0xCF: "arithmetic"}
_KEPT = {_DHT, _DQT, _DRI, _DNL, _DAC, *_SOF}
_ICC_TAG = b"ICC_PROFILE\x00"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_OTHER_PICTURES = (b"II*\x00", b"MM\x00*", b"BM", b"GIF8", b"RIFF", b"\x00\x00\x00\x0cjP")


class PhotoRejected(Exception):
    """A photo that cannot be imported: ``reason`` is a code of :data:`REASONS`, the message the
    detail (never a value read from the photo's metadata)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class PhotoRow:
    """One table row, checked: what the object says about the patient, study and image."""

    number: int          # 1-based data row number in the table (the header is row 0)
    file: str            # relative to FOLDER, with /
    patient_id: str
    study_date: str      # YYYYMMDD
    label: str
    study_id: str = ""
    laterality: str = ""  # L, R or empty
    body_site: str = ""   # as (0018,0015) Body Part Examined: upper case, at most 16 characters
    split: str = ""       # train, val, test or empty: carried into the labels file's split column


@dataclass(frozen=True)
class JpegStream:
    """A JPEG bitstream parsed: ``stream`` is it without the segments decoding does not need."""

    stream: bytes
    process: str          # baseline | extended | progressive | lossless | hierarchical | arithmetic
    precision: int
    rows: int
    columns: int
    components: int
    photometric: str      # MONOCHROME2 | RGB | YBR_FULL_422
    icc_profile: bytes | None
    removed: tuple[str, ...]  # kinds of segment left out ("APP1", "COM", "JFIF thumbnail", ...)


@dataclass(frozen=True)
class Photo:
    """What goes into one object's Image Pixel module: an encapsulated JPEG stream, or pixels."""

    sha256: str
    rows: int
    columns: int
    samples: int
    photometric: str
    icc_profile: bytes | None
    jpeg: JpegStream | None = None      # encapsulated as it is
    pixels: np.ndarray | None = None    # stored losslessly (RLE), (rows, cols[, 3]) uint8
    lossy: bool = False                 # the pixels went through lossy compression (JPEG)
    compression_ratio: float = 0.0      # of that JPEG: decoded bytes over its stream's bytes
    turned_upright: bool = False        # decoded and rotated by the EXIF orientation flag
    orientation: int = 1                # the EXIF orientation flag (1 = as stored)


@dataclass
class ImportResult:
    """What a run did: one report row per photo or table row, the counts and the report's path."""

    rows: list[dict] = field(default_factory=list)
    written: int = 0
    present: int = 0
    pruned: int = 0
    report: Path | None = None

    @property
    def failed(self) -> Counter:
        return Counter(row["reason"] for row in self.rows if row["status"] == "failed")

    def summary(self) -> str:
        """One line: counts, failures by reason, and where the report is."""
        failed = self.failed
        text = f"import-photos: {self.written} written, {self.present} already there"
        if self.pruned:
            text += f", {self.pruned} pruned"
        if failed:
            text += (f", {sum(failed.values())} not imported ("
                     + ", ".join(f"{n} {reason}" for reason, n in failed.most_common()) + ")")
        return f"{text}; report: {self.report}"


# --- the table --------------------------------------------------------------------------------

def read_photo_table(table: Path, *, classes: Iterable[int | str]) -> tuple[list[PhotoRow], list[dict]]:
    """The table's rows, checked, and the rows that cannot be used as report rows.

    Parameters
    ----------
    table : Path
        CSV with columns ``file``, ``patient_id``, ``study_date`` (YYYY-MM-DD or YYYYMMDD) and
        ``label``, and optionally ``study_id``, ``laterality`` (L or R) and ``body_site``.
    classes : iterable of int or str
        The declared classes (``ingest.classes``); a label outside them is listed.

    Returns
    -------
    rows : list of PhotoRow
        The usable rows, in table order.
    problems : list of dict
        Report rows (:data:`REPORT_COLUMNS`) for the rows left out, with the reason.

    Raises
    ------
    DataError
        When the table cannot be read or lacks a required column.
    """
    try:
        with open(table, newline="", encoding="utf-8-sig") as stream:
            reader = csv.DictReader(stream)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [name for name in TABLE_COLUMNS if name not in header]
            if missing:
                raise DataError(f"{table}: missing column(s) {', '.join(missing)}; a photo table needs "
                                f"{', '.join(TABLE_COLUMNS)} (optional: {', '.join(OPTIONAL_COLUMNS)})")
            reader.fieldnames = header
            records = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{table}: cannot be read as a UTF-8 CSV table ({type(err).__name__}); "
                        "save it as CSV UTF-8") from None
    allowed = {str(c) for c in classes}
    rows, problems, seen = [], [], set()
    for number, record in enumerate(records, start=1):
        values = {key: (value or "").strip() for key, value in record.items() if key}
        try:
            row = _checked_row(number, values, allowed)
        except PhotoRejected as err:
            problems.append(_report_row(values.get("file", ""), "failed", err.reason, f"table row {number}: {err}"))
            continue
        if row.file in seen:
            problems.append(_report_row(row.file, "failed", "duplicate_row",
                                        f"table row {number}: a second row for this file; one row per photo"))
            continue
        seen.add(row.file)
        rows.append(row)
    return rows, problems


def _checked_row(number: int, values: dict[str, str], allowed: set[str]) -> PhotoRow:
    """A PhotoRow from one table row's values, or raise PhotoRejected (bad_row, label_not_in_classes)."""
    file = values.get("file", "").replace("\\", "/")
    if not file or file.startswith("/") or ".." in file.split("/"):
        raise PhotoRejected("bad_row", "'file' must be a path inside FOLDER (relative, no '..')")
    patient_id = values.get("patient_id", "")
    if not patient_id or len(patient_id) > _MAX_LO or "\\" in patient_id:
        raise PhotoRejected("bad_row", f"'patient_id' must be 1 to {_MAX_LO} characters without '\\'")
    study_date = _dicom_date(values.get("study_date", ""))
    label = values.get("label", "")
    if label not in allowed:
        raise PhotoRejected("label_not_in_classes", f"the label is not one of the classes {sorted(allowed)}")
    study_id = values.get("study_id", "")
    if len(study_id) > _MAX_SH or "\\" in study_id:
        raise PhotoRejected("bad_row", f"'study_id' must be at most {_MAX_SH} characters without '\\' "
                            "(it becomes (0020,0010) Study ID and (0008,0050) Accession Number)")
    laterality = values.get("laterality", "").upper()
    if laterality not in ("", "L", "R"):
        raise PhotoRejected("bad_row", "'laterality' must be L, R or empty")
    body_site = re.sub(r"[^A-Z0-9_ ]+", " ", values.get("body_site", "").upper()).strip()
    body_site = re.sub(r" +", " ", body_site)
    if len(body_site) > _MAX_CS:
        raise PhotoRejected("bad_row", f"'body_site' must be at most {_MAX_CS} characters (it becomes "
                            "(0018,0015) Body Part Examined, e.g. FOREARM, BACK, EYE)")
    split = values.get("split", "").lower()
    if split not in ("", *SPLITS):
        raise PhotoRejected("bad_row", f"'split' must be one of {', '.join(SPLITS)} or empty "
                            "(the labels file's split column, read by split.method: predefined)")
    return PhotoRow(number, file, patient_id, study_date, label, study_id, laterality, body_site, split)


def _dicom_date(text: str) -> str:
    """``text`` (YYYY-MM-DD or YYYYMMDD) as a DICOM DA value, or raise PhotoRejected."""
    digits = text.replace("-", "")
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError
        dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise PhotoRejected("bad_row", "'study_date' must be a date written YYYY-MM-DD or YYYYMMDD") from None
    return digits


# --- JPEG -------------------------------------------------------------------------------------

def parse_jpeg(data: bytes) -> JpegStream:
    """The JPEG bitstream ``data`` with only what decoding needs, and what its frame header says.

    Kept byte for byte: SOI, DQT, DHT, DRI, DAC, SOFn, each SOS with its entropy-coded data
    (restart markers included), DNL, EOI; APP0 JFIF without its thumbnail; APP14 Adobe. Left out:
    every other APPn (EXIF and XMP in APP1, the ICC profile in APP2, returned apart), COM, APP0
    extensions (JFXX thumbnails) and any bytes after EOI.

    Raises
    ------
    PhotoRejected
        truncated_jpeg, corrupt_jpeg, cmyk_jpeg or unsupported_jpeg.
    """
    if not data.startswith(b"\xff\xd8"):
        raise PhotoRejected("corrupt_jpeg", "no start-of-image marker")
    out = bytearray(data[:2])
    icc_chunks: dict[int, bytes] = {}
    removed: list[str] = []
    frame: tuple[str, bytes] | None = None
    jfif = adobe_transform = None
    pos, size = 2, len(data)
    while True:
        if pos + 2 > size:
            raise PhotoRejected("truncated_jpeg", "the file ends before the end-of-image marker")
        if data[pos] != 0xFF:
            raise PhotoRejected("corrupt_jpeg", f"no marker where one must be, at byte {pos}")
        while pos + 1 < size and data[pos + 1] == 0xFF:  # fill bytes before a marker (T.81 B.1.1.2)
            pos += 1
        if pos + 2 > size:
            raise PhotoRejected("truncated_jpeg", "the file ends before the end-of-image marker")
        marker = data[pos + 1]
        if marker == _EOI:
            out += b"\xff\xd9"
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers, no length
            out += data[pos:pos + 2]
            pos += 2
            continue
        if pos + 4 > size:
            raise PhotoRejected("truncated_jpeg", "the file ends inside a marker segment")
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if end > size:
            raise PhotoRejected("truncated_jpeg", "the file ends inside a marker segment")
        payload = data[pos + 4:end]
        if marker == _SOS:
            scan_end = _entropy_end(data, end)
            if scan_end >= size:
                raise PhotoRejected("truncated_jpeg", "the file ends inside the compressed image data")
            out += data[pos:scan_end]
            pos = scan_end
            continue
        if marker in _KEPT:
            if marker in _SOF:
                if frame is not None and _SOF[marker] != "hierarchical":
                    raise PhotoRejected("corrupt_jpeg", "two frame headers")
                frame = (_SOF[marker], payload)
            out += data[pos:end]
        elif marker == _APP0 and payload.startswith(b"JFIF\x00") and len(payload) >= 14:
            jfif = True
            if payload[12] or payload[13]:
                removed.append("JFIF thumbnail")
            segment = payload[:12] + b"\x00\x00"  # version, units, density; no thumbnail
            out += b"\xff\xe0" + (len(segment) + 2).to_bytes(2, "big") + segment
        elif marker == _APP14 and payload.startswith(b"Adobe") and len(payload) >= 12:
            adobe_transform = payload[11]
            out += data[pos:end]
        elif marker == _APP2 and payload.startswith(_ICC_TAG) and len(payload) >= 14:
            icc_chunks[payload[12]] = payload[14:]
            removed.append("APP2 ICC profile")
        elif 0xE0 <= marker <= 0xEF or marker == _COM:
            removed.append("COM" if marker == _COM else f"APP{marker - 0xE0}")
        else:
            raise PhotoRejected("unsupported_jpeg", f"marker 0x{marker:02X} is not part of a JPEG photo's "
                                "stream (JPEG-LS or an extension?)")
        pos = end
    if frame is None:
        raise PhotoRejected("corrupt_jpeg", "no frame header (SOFn)")
    process, header = frame
    if len(header) < 6:
        raise PhotoRejected("corrupt_jpeg", "the frame header is cut short")
    precision, rows, columns, components = header[0], int.from_bytes(header[1:3], "big"), \
        int.from_bytes(header[3:5], "big"), header[5]
    specs = [header[6 + 3 * i:9 + 3 * i] for i in range(components)]
    if len(header) < 6 + 3 * components:
        raise PhotoRejected("corrupt_jpeg", "the frame header is cut short")
    if components == 4:
        raise PhotoRejected("cmyk_jpeg", "4 colour components (CMYK or YCCK): DICOM stores no CMYK; "
                            "convert the photo to sRGB first (e.g. ImageMagick: magick IN -profile sRGB.icc OUT)")
    if components not in (1, 3):
        raise PhotoRejected("unsupported_jpeg", f"{components} colour components; photos have 1 or 3")
    if precision != 8:
        raise PhotoRejected("unsupported_jpeg", f"{precision}-bit samples; photos are 8-bit")
    if process not in ("baseline", "extended", "progressive"):
        raise PhotoRejected("unsupported_jpeg", f"a {process} JPEG, which DICOM photographs and the "
                            "decoders do not take; save it as baseline JPEG or PNG")
    if rows == 0 or columns == 0:
        raise PhotoRejected("unsupported_jpeg", "the height is given after the scan (DNL marker)")
    icc = b"".join(icc_chunks[n] for n in sorted(icc_chunks)) or None
    return JpegStream(bytes(out), process, precision, rows, columns, components,
                      jpeg_photometric(specs, jfif=bool(jfif), adobe_transform=adobe_transform),
                      icc, tuple(dict.fromkeys(removed)))


def _entropy_end(data: bytes, start: int) -> int:
    """Where the entropy-coded data that begins at ``start`` ends: the next marker other than a
    stuffed zero (FF00) or a restart marker (FFD0-FFD7); ``len(data)`` when there is none."""
    pos = start
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7 or following == 0xFF:
            pos += 1 if following == 0xFF else 2
            continue
        return pos


def jpeg_photometric(specs: list[bytes], *, jfif: bool, adobe_transform: int | None) -> str:
    """(0028,0004) Photometric Interpretation of a JPEG with these component specifications.

    One component: MONOCHROME2. Three: RGB when an Adobe APP14 segment says "no transform"
    (transform 0) or, with neither JFIF nor Adobe segment, the components are named R, G, B (as
    libjpeg decides); otherwise YCbCr, YBR_FULL_422. That is the one full-range YCbCr value the
    PS3.3 VL Image and Ophthalmic Photography Image modules allow (dciodvfy rejects YBR_FULL,
    which PS3.5 8.2.1 names for unsubsampled 4:4:4 chroma); decoders take the sampling from the
    JPEG frame header, which the stream keeps.
    """
    if len(specs) == 1:
        return "MONOCHROME2"
    if adobe_transform == 0 or (adobe_transform is None and not jfif
                                and bytes(spec[0] for spec in specs) == b"RGB"):
        return "RGB"
    return "YBR_FULL_422"


# --- reading a photo --------------------------------------------------------------------------

def read_photo(data: bytes, *, orientation: str = "apply") -> Photo:
    """The pixels (or the bitstream) and colour profile of a JPEG or PNG file's bytes.

    Parameters
    ----------
    data : bytes
        The whole file.
    orientation : {"apply", "keep"}, default="apply"
        What to do with an EXIF orientation flag other than 1: turn the pixels upright (decoded,
        stored losslessly) or keep the JPEG bitstream as encoded.

    Returns
    -------
    Photo

    Raises
    ------
    PhotoRejected
        With a reason code of :data:`REASONS`.
    """
    if orientation not in ORIENTATIONS:
        raise SettingsError(f"orientation must be one of {', '.join(ORIENTATIONS)}; got {orientation!r}")
    sha256 = hashlib.sha256(data).hexdigest()
    if data.startswith(b"\xff\xd8\xff"):
        return _read_jpeg(data, sha256, orientation)
    if data.startswith(_PNG_MAGIC):
        return _read_png(data, sha256, orientation)
    if data.startswith(_OTHER_PICTURES) or data[4:12] in (b"ftypheic", b"ftypmif1", b"ftypavif"):
        raise PhotoRejected("unsupported_format", "a picture format other than JPEG and PNG; convert it to "
                            "PNG (lossless) first")
    raise PhotoRejected("not_an_image", "neither a JPEG nor a PNG file (by its first bytes)")


def _read_jpeg(data: bytes, sha256: str, orientation: str) -> Photo:
    jpeg = parse_jpeg(data)
    with _opened(data, "jpeg") as image:
        flag = _orientation_flag(image)
        decoded = _decoded(image, "jpeg")  # proves the stream decodes whole (a cut scan fails here)
    if decoded.shape[:2] != (jpeg.rows, jpeg.columns):
        raise PhotoRejected("corrupt_jpeg", "the decoded size differs from the frame header's")
    stripped = _decoded_stream(jpeg.stream)
    if not np.array_equal(stripped, decoded):  # what was left out must not have mattered
        raise PhotoRejected("corrupt_jpeg", "the stream without its metadata segments decodes differently")
    turn = orientation == "apply" and flag not in (0, 1)
    ratio = jpeg.rows * jpeg.columns * jpeg.components / len(jpeg.stream)
    # Stored decoded: progressive JPEG (no current transfer syntax) and RGB JPEG (the photograph
    # IODs allow YCbCr JPEG only); lossless from the decoded pixels, still marked lossy.
    if turn or jpeg.process == "progressive" or jpeg.photometric == "RGB":
        pixels = _upright(decoded, flag) if turn else decoded
        samples = 1 if pixels.ndim == 2 else 3
        return Photo(sha256, pixels.shape[0], pixels.shape[1], samples,
                     "MONOCHROME2" if samples == 1 else "RGB", jpeg.icc_profile, pixels=pixels,
                     lossy=True, compression_ratio=ratio, turned_upright=turn, orientation=flag or 1)
    return Photo(sha256, jpeg.rows, jpeg.columns, jpeg.components, jpeg.photometric, jpeg.icc_profile,
                 jpeg=jpeg, lossy=True, compression_ratio=ratio, orientation=flag or 1)


def _read_png(data: bytes, sha256: str, orientation: str) -> Photo:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise PhotoRejected("corrupt_png", "no IHDR chunk where the PNG format puts it")
    depth, colour_type = data[24], data[25]
    if depth == 16:
        raise PhotoRejected("png_16bit", "16 bits per sample; reduce it to 8 (DICOM photographs of "
                            "these kinds are 8-bit), e.g. magick IN -depth 8 OUT.png")
    if colour_type in (0, 4) and depth != 8:
        raise PhotoRejected("unsupported_png", f"{depth}-bit grey; save it as 8-bit grey or RGB")
    with _opened(data, "png") as image:
        if getattr(image, "n_frames", 1) > 1:
            raise PhotoRejected("unsupported_png", "an animated PNG; one still image per file")
        flag = _orientation_flag(image)
        icc = image.info.get("icc_profile") or None
        pixels = _decoded(image, "png")
    if pixels.ndim == 3 and pixels.shape[2] in (2, 4):
        if not (pixels[..., -1] == 255).all():
            raise PhotoRejected("unsupported_png", "transparent pixels (an alpha channel that is not all "
                                "opaque): DICOM photographs have none; flatten the image first")
        pixels = pixels[..., :-1] if pixels.shape[2] == 4 else pixels[..., 0]
    turn = orientation == "apply" and flag not in (0, 1)
    if turn:
        pixels = _upright(pixels, flag)
    samples = 1 if pixels.ndim == 2 else 3
    return Photo(sha256, pixels.shape[0], pixels.shape[1], samples, "MONOCHROME2" if samples == 1 else "RGB",
                 icc, pixels=np.ascontiguousarray(pixels), turned_upright=turn, orientation=flag or 1)


def _opened(data: bytes, kind: str):
    """``data`` opened with Pillow, or raise PhotoRejected (corrupt_*, too_large)."""
    from PIL import Image

    try:
        return Image.open(io.BytesIO(data), formats=["JPEG" if kind == "jpeg" else "PNG"])
    except Image.DecompressionBombError:
        raise PhotoRejected("too_large", f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as err:  # noqa: BLE001  Pillow raises many types for damaged files
        raise PhotoRejected(f"corrupt_{kind}", f"Pillow cannot open it ({type(err).__name__})") from None


def _decoded(image, kind: str) -> np.ndarray:
    """Pillow's decoded pixels as uint8: (rows, cols) grey, (rows, cols, 3) RGB, alpha kept."""
    from PIL import Image

    try:
        if image.mode == "P":
            image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        elif image.mode not in ("L", "LA", "RGB", "RGBA"):
            raise PhotoRejected(f"unsupported_{kind}" if kind == "png" else "unsupported_jpeg",
                                f"Pillow mode {image.mode}, not grey or RGB")
        return np.asarray(image)
    except PhotoRejected:
        raise
    except Image.DecompressionBombError:
        raise PhotoRejected("too_large", f"more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels") from None
    except Exception as err:  # noqa: BLE001
        reason = "truncated_jpeg" if kind == "jpeg" and "truncated" in str(err) else f"corrupt_{kind}"
        raise PhotoRejected(reason, f"the image data cannot be decoded ({type(err).__name__})") from None


def _decoded_stream(stream: bytes) -> np.ndarray:
    with _opened(stream, "jpeg") as image:
        return _decoded(image, "jpeg")


def _orientation_flag(image) -> int:
    """The EXIF orientation flag (0274) 1-8, or 0 when there is none or it is unreadable."""
    try:
        flag = int(image.getexif().get(0x0112, 0))
    except Exception:  # noqa: BLE001  a damaged EXIF block must not stop the pixels
        return 0
    return flag if 1 <= flag <= 8 else 0


def _upright(pixels: np.ndarray, flag: int) -> np.ndarray:
    """``pixels`` as the EXIF orientation ``flag`` says to show them (CIPA DC-008 4.6.4 A)."""
    turned = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
              5: lambda a: a.swapaxes(0, 1), 6: lambda a: a.swapaxes(0, 1)[:, ::-1],
              7: lambda a: a.swapaxes(0, 1)[::-1, ::-1], 8: lambda a: a.swapaxes(0, 1)[::-1]}
    return np.ascontiguousarray(turned[flag](pixels)) if flag in turned else pixels


# --- the DICOM object -------------------------------------------------------------------------

@dataclass(frozen=True)
class PhotoUids:
    study: str
    series: str
    instance: str


def photo_uids(row: PhotoRow, *, kind: str, sha256: str) -> PhotoUids:
    """Deterministic UIDs: the study from the patient and study (ID, else date), the series from
    the study, kind and laterality (a series-level attribute), the instance from those and the
    photo's bytes, study date, laterality and body site.
    The label is not part of any: a corrected label changes the labels file, not the object."""
    study = generate_uid(entropy_srcs=[_UID_NAMESPACE, "study", row.patient_id, row.study_id or row.study_date])
    series = generate_uid(entropy_srcs=[_UID_NAMESPACE, "series", study, kind, row.laterality])
    instance = generate_uid(entropy_srcs=[_UID_NAMESPACE, "instance", series, sha256, row.study_date,
                                          row.laterality, row.body_site])
    return PhotoUids(study, series, instance)


def build_dataset(photo: Photo, row: PhotoRow, *, kind: str) -> Dataset:
    """The DICOM object for ``photo`` with the patient, study and image attributes of ``row``.

    Parameters
    ----------
    photo : Photo
        From :func:`read_photo`.
    row : PhotoRow
        Its table row.
    kind : {"dermoscopy", "fundus", "photo"}
        VL Photographic Image (XC) for dermoscopy and photo, Ophthalmic Photography 8 Bit Image
        (OP) for fundus.

    Returns
    -------
    Dataset
        With file meta; nothing in it comes from the photo's metadata but its ICC profile.
    """
    if kind not in KINDS:
        raise SettingsError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    uids = photo_uids(row, kind=kind, sha256=photo.sha256)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: patient IDs are the user's text
    ds.SOPClassUID = _SOP_CLASS[kind]
    ds.SOPInstanceUID = uids.instance
    # Patient and General Study: from the table only (type 2 attributes present and empty).
    ds.PatientName = ""
    ds.PatientID = row.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = uids.study
    ds.StudyDate = row.study_date
    ds.StudyTime = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = row.study_id
    ds.AccessionNumber = row.study_id
    # General Series, General Equipment
    ds.Modality = _MODALITY[kind]
    ds.SeriesInstanceUID = uids.series
    ds.SeriesNumber = 1
    if row.body_site:
        ds.BodyPartExamined = row.body_site
    ds.Manufacturer = ""  # never the camera's make from EXIF
    # General Image, VL Image / Ophthalmic Photography Image
    ds.InstanceNumber = row.number
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED" if photo.turned_upright else "ORIGINAL", "PRIMARY"]
    if photo.turned_upright:
        ds.DerivationDescription = "Decoded and turned upright as the photo's orientation flag says"
    ds.LossyImageCompression = "01" if photo.lossy else "00"
    if photo.lossy:
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.LossyImageCompressionRatio = f"{photo.compression_ratio:.4g}"
    ds.AcquisitionContextSequence = Sequence()
    if kind == "fundus":
        _ophthalmic_modules(ds, row, samples=photo.samples)
    elif row.laterality:
        ds.ImageLaterality = row.laterality
    else:  # General Series (0020,0060) Laterality, type 2C: required, empty, without Image Laterality
        ds.Laterality = ""
    # Image Pixel
    ds.SamplesPerPixel = photo.samples
    ds.PhotometricInterpretation = photo.photometric
    if photo.samples == 3:
        ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = photo.rows, photo.columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if photo.samples == 3:  # ICC Profile module: the photo's own profile, else sRGB's
        icc = photo.icc_profile or srgb_profile()
        ds.ICCProfile = icc
        if space := color_space(icc):
            ds.ColorSpace = space
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if photo.jpeg is not None:
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit if photo.jpeg.process == "baseline" else JPEGExtended12Bit
        ds.PixelData = encapsulate([photo.jpeg.stream])
        ds["PixelData"].VR = "OB"
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.compress(RLELossless, photo.pixels, generate_instance_uid=False)
    return ds


def _ophthalmic_modules(ds: Dataset, row: PhotoRow, *, samples: int) -> None:
    """The Ophthalmic Photography Series, Image, Acquisition Parameters, Photographic Parameters and
    Ocular Region Imaged modules (PS3.3 A.39.1): what the table says, type 2 attributes empty."""
    ds.NumberOfFrames = 1
    ds.FrameIncrementPointer = 0x00181063  # (0018,1063) Frame Time: one frame
    ds.FrameTime = 0
    # Synchronization module (mandatory here): the UTC frame of reference, nothing synchronised.
    ds.SynchronizationFrameOfReferenceUID = "1.2.840.10008.15.1.1"
    ds.SynchronizationTrigger = "NO TRIGGER"
    ds.AcquisitionTimeSynchronized = "N"
    ds.ImageLaterality = row.laterality or "U"  # U only with allow_unknown_laterality (not standard here)
    if samples == 1:
        ds.PresentationLUTShape = "IDENTITY"  # type 1C for MONOCHROME2
    # Type 1 here, and not known: fundus cameras often print the name and date on the image, so
    # YES makes every reader look (the deidentify stage reads every image for text either way).
    ds.BurnedInAnnotation = "YES"
    ds.AnatomicRegionSequence = Sequence([_code("81745001", "SCT", "Eye")])
    ds.PatientEyeMovementCommanded = ""
    ds.HorizontalFieldOfView = None
    ds.EmmetropicMagnification = None
    ds.IntraOcularPressure = None
    ds.PupilDilated = ""
    ds.AcquisitionDeviceTypeCodeSequence = Sequence([_code("409898007", "SCT", "Fundus Camera")])
    ds.IlluminationTypeCodeSequence = Sequence()
    ds.LightPathFilterTypeStackCodeSequence = Sequence()
    ds.LensesCodeSequence = Sequence()
    ds.ImagePathFilterTypeStackCodeSequence = Sequence()
    ds.RefractiveStateSequence = Sequence()
    ds.DetectorType = "CCD"
    # Type 1 in this IOD: the study date, at a midnight that stands for "time not known" (the
    # camera's capture time is in its EXIF, which is never read).
    ds.ContentDate, ds.ContentTime = row.study_date, "000000"
    ds.AcquisitionDateTime = f"{row.study_date}000000"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


@functools.cache
def srgb_profile() -> bytes:
    """The sRGB ICC profile (Little CMS's), for colour photos that carry none; its header's
    creation date fixed, so that the same photo always gives the same object."""
    from PIL import ImageCms

    profile = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    profile[24:36] = struct.pack(">6H", 2000, 1, 1, 0, 0, 0)  # ICC.1 7.2.1: dateTimeNumber
    return bytes(profile)


def color_space(icc: bytes) -> str:
    """(0028,2002) Color Space for an ICC profile: SRGB, ADOBERGB or ROMMRGB by its description,
    "" when it is none of them (or cannot be read)."""
    from PIL import ImageCms

    try:
        description = ImageCms.ImageCmsProfile(io.BytesIO(icc)).profile.profile_description or ""
    except Exception:  # noqa: BLE001  an unreadable profile is still carried, without a name
        return ""
    folded = description.casefold().replace(" ", "")
    return next((space for words, space in (("srgb", "SRGB"), ("adobergb", "ADOBERGB"), ("romm", "ROMMRGB"),
                                            ("prophoto", "ROMMRGB")) if words in folded), "")


# --- the run ----------------------------------------------------------------------------------

def report_path(table: Path) -> Path:
    """Where the report goes by default: beside the table (``photos.csv`` ->
    ``photos.import_report.csv``). Not in the data folder: it names the source files, whose names
    may hold patients' names, and the data folder holds nothing the table did not give."""
    return table.with_name(table.stem + REPORT_SUFFIX)


def import_photos(folder: Path, table: Path, *, kind: str, out: Path, classes: Iterable[int | str],
                  orientation: str = "apply", allow_unknown_laterality: bool = False, workers: int = 0,
                  timeout_s: float | None = 120.0, report: Path | None = None, prune: bool = False) -> ImportResult:
    """Write one DICOM object per photo of ``table`` under ``out/photos/`` and the labels file
    ``out/labels.csv``, and the report (one row per file or table row) to ``report``.

    Parameters
    ----------
    folder : Path
        Where the photos are (the table's ``file`` column is relative to it).
    table : Path
        The photo table (:func:`read_photo_table`).
    kind : {"dermoscopy", "fundus", "photo"}
        Which object type (:func:`build_dataset`).
    out : Path
        The data folder; created when absent.
    classes : iterable of int or str
        The declared classes; rows with other labels are listed, not imported.
    orientation : {"apply", "keep"}, default="apply"
        See :func:`read_photo`.
    allow_unknown_laterality : bool, default=False
        Fundus rows without laterality: listed (``no_laterality``) when False; imported with
        (0020,0062) Image Laterality ``U`` when True, a value the Ophthalmic Photography IOD does
        not allow (dciodvfy reports it), for public sets that do not record the eye.
    workers : int, default=0
        Processes that decode and write (0: every core). A photo whose process dies on it (a
        decoder crash) or runs past ``timeout_s`` seconds is listed, and costs nothing else.
    timeout_s : float or None, default=120.0
        Per photo.
    report : Path, optional
        The report CSV (:data:`REPORT_COLUMNS`); :func:`report_path` when None.
    prune : bool, default=False
        Remove the objects under ``out/photos/`` that this table no longer gives (a row whose
        patient, study, laterality, body site or photo changed gives a new object; a row now
        refused gives none), with their rows of the labels file. For an ``out`` that holds this
        table's photos only; without it, earlier objects and their labels stay.

    Returns
    -------
    ImportResult
        The report rows and counts; nothing is raised for a single photo.

    Raises
    ------
    SettingsError
        For an unknown ``kind`` or ``orientation``, or a missing ``folder``.
    DataError
        When the table cannot be read, or ``out/labels.csv`` exists and was not written by this
        import (no ``sop_instance_uid`` column).

    Notes
    -----
    Idempotent: an object already at its path (named by its deterministic SOP Instance UID) is
    not written again, and the labels file and report are rewritten only when their content
    changes. Objects are written as hidden ``.*.partial`` files and renamed into place, so the
    output is the same bytes whatever the number of workers and however often a run was killed.
    """
    from dicomflow.dicom.sources import list_sources
    from dicomflow.runtime.parallel import ordered_map, worker_count

    if kind not in KINDS:
        raise SettingsError(f"--kind must be one of {', '.join(KINDS)}; got {kind!r}")
    if orientation not in ORIENTATIONS:
        raise SettingsError(f"--orientation must be one of {', '.join(ORIENTATIONS)}; got {orientation!r}")
    if not folder.is_dir():
        raise SettingsError(f"FOLDER {folder} is not a folder: give the folder that holds the photos")
    rows, problems = read_photo_table(table, classes=classes)
    objects = out / OBJECT_FOLDER
    objects.mkdir(parents=True, exist_ok=True)
    for leftover in objects.glob(f".*{PARTIAL_SUFFIX}"):  # a killed run's half-written object
        leftover.unlink()
    existing_labels = _existing_labels(out / LABELS_FILE)
    report = report or report_path(table)
    listing = list_sources(folder, exclude={table.resolve(), report.resolve(), (out / LABELS_FILE).resolve()})
    on_disk = {path.relative_to(folder).as_posix() for path in listing.files}
    listed = {row.file for row in rows} | {problem["file"] for problem in problems}
    result = ImportResult(rows=list(problems), report=report)
    result.rows += [_report_row(name, "failed", "no_table_row", "no table row names this file")
                    for name in sorted(on_disk - listed) if not _is_inside(folder / name, out)]
    # First pass, here: which photos are new (by their bytes' hash, which names the object).
    jobs: list[tuple[PhotoRow, str]] = []
    labels: list[dict] = []
    first_of: dict[str, str] = {}
    for row in rows:
        failure = _row_failure(row, kind=kind, on_disk=on_disk, allow_unknown_laterality=allow_unknown_laterality)
        sha256 = "" if failure else _sha256(folder / row.file)
        if not failure and not sha256:
            failure = ("unreadable", "the file cannot be read")
        elif not failure and sha256 in first_of:
            failure = ("duplicate_photo", f"the same bytes as {first_of[sha256]}; one row per photo")
        if failure:
            result.rows.append(_report_row(row.file, "failed", *failure))
            continue
        first_of[sha256] = row.file
        uids = photo_uids(row, kind=kind, sha256=sha256)
        relative = f"{OBJECT_FOLDER}/{uids.instance}.dcm"
        labels.append({"sop_instance_uid": uids.instance, "accession_number": row.study_id,
                       "study_instance_uid": uids.study, "path": relative, "label": row.label,
                       **({"split": row.split} if row.split else {})})
        if (out / relative).exists():
            result.present += 1
            result.rows.append(_report_row(row.file, "imported", "", "", relative))
        else:
            jobs.append((row, sha256))
    # Second pass, in worker processes: decode, build and write the new ones.
    done = ordered_map(import_one, jobs, workers=min(worker_count(workers), max(len(jobs), 1)),
                       timeout_s=timeout_s, on_failure=_worker_failure,
                       shared_args=(folder, kind, out, orientation))
    for row_report in progress(done, total=len(jobs), what="import-photos", unit="photo"):
        result.rows.append(row_report)
        result.written += row_report["status"] == "imported"
    present = {row_report["path"] for row_report in result.rows if row_report["status"] == "imported"}
    if prune:
        for path in sorted(objects.glob("*.dcm")):
            if f"{OBJECT_FOLDER}/{path.name}" not in present:
                path.unlink()
                result.pruned += 1
        existing_labels = [row for row in existing_labels
                           if not row.get("path", "").startswith(f"{OBJECT_FOLDER}/") or row["path"] in present]
    _write_labels(out / LABELS_FILE, existing_labels, [row for row in labels if row["path"] in present])
    result.rows.sort(key=lambda item: (item["file"], item["status"], item["reason"]))
    _write_if_changed(report, _csv_text(REPORT_COLUMNS, result.rows))
    return result


def import_one(job: tuple[PhotoRow, str], folder: Path, kind: str, out: Path, orientation: str) -> dict:
    """One photo read, checked, built and written (a worker's work): its report row. Never raises
    for the photo's own faults."""
    row, sha256 = job
    try:
        data = (folder / row.file).read_bytes()
    except OSError as err:
        return _report_row(row.file, "failed", "unreadable", f"cannot read it ({err.strerror})")
    try:
        photo = read_photo(data, orientation=orientation)
        if photo.sha256 != sha256:
            raise PhotoRejected("unreadable", "the file changed during the import; run it again")
        ds = build_dataset(photo, row, kind=kind)
    except PhotoRejected as err:
        return _report_row(row.file, "failed", err.reason, str(err))
    relative = f"{OBJECT_FOLDER}/{ds.SOPInstanceUID}.dcm"
    _write_object(ds, out / relative)
    return _report_row(row.file, "imported", "", "", relative)


def _worker_failure(job: tuple[PhotoRow, str], failure) -> dict:
    """The report row of a photo whose worker process died on it or ran out of time."""
    row, _ = job
    detail = f"the worker process {failure.detail} on this photo" if failure.reason == "worker_died" else failure.detail
    return _report_row(row.file, "failed", failure.reason, detail)


def _row_failure(row: PhotoRow, *, kind: str, on_disk: set[str],
                 allow_unknown_laterality: bool) -> tuple[str, str] | None:
    """(reason, detail) when a checked row still cannot be imported: no laterality for a fundus
    photo, or no photo."""
    if kind == "fundus" and not row.laterality and not allow_unknown_laterality:
        return ("no_laterality", f"table row {row.number}: (0020,0062) Image Laterality is required in "
                "Ophthalmic Photography objects: give L or R (or allow unknown laterality)")
    if row.file not in on_disk:
        return ("missing_photo", f"table row {row.number}: no such file in FOLDER")
    return None


def _sha256(path: Path) -> str:
    """The file's SHA-256 in hex, read in pieces; "" when it cannot be read."""
    try:
        with open(path, "rb") as stream:
            return hashlib.file_digest(stream, "sha256").hexdigest()
    except OSError:
        return ""


def _report_row(file: str, status: str, reason: str, detail: str, path: str = "") -> dict:
    return {"file": file, "status": status, "reason": reason, "detail": detail, "path": path}


def _is_inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _write_object(ds: Dataset, target: Path) -> None:
    """``ds`` to ``target`` through a hidden temporary name beside it (ingest skips hidden names)."""
    partial = target.with_name(f".{target.name}{PARTIAL_SUFFIX}")
    try:
        ds.save_as(partial, enforce_file_format=True)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _existing_labels(path: Path) -> list[dict]:
    """The rows of a labels file this import wrote before (to merge with), none when absent."""
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        if "sop_instance_uid" not in (reader.fieldnames or []):
            raise DataError(f"{path} exists without a sop_instance_uid column, so it was not written by "
                            "import-photos: import into another --out folder, or move that labels file")
        return list(reader)


def _write_labels(path: Path, existing: list[dict], new: list[dict]) -> None:
    """The labels file: earlier rows of other objects kept, this run's rows replacing their own."""
    ours = {row["sop_instance_uid"] for row in new}
    merged = [row for row in existing if row.get("sop_instance_uid") not in ours] + new
    columns = list(dict.fromkeys([*LABEL_COLUMNS, *(key for row in existing + new for key in row)]))
    merged.sort(key=lambda row: (row.get("path", ""), row.get("sop_instance_uid", "")))
    _write_if_changed(path, _csv_text(columns, merged))


def _csv_text(columns: Iterable[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (whole, through a rename) unless it already holds it."""
    from dicomflow.runtime.outputs import write_text

    if path.exists() and path.read_text(encoding="utf-8") == text:
        return
    write_text(path, text)

