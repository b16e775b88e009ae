"""Stage 1, ingest: every DICOM file under ``data/`` to display-ready pixels, an index and a quarantine.

Inputs: the raw files under ``paths.data`` and the labels file ``paths.labels``.
Outputs (``paths.ingest_dir``): ``images.npy`` (n × size × size, or × 3 channels; uint8 or float16),
``index.parquet`` (one row per image, PHI included: only ``deidentify`` reads it) and
``quarantine.csv`` (every file that could not be used, with a reason code); counts go to
``paths.ingest_metrics``.
Params: every key of ``ingest``.

Pixels are what a radiologist's viewer shows: modality LUT, then the chosen VOI LUT or window,
MONOCHROME1 inverted, colour (RGB, YBR, PALETTE COLOR) converted to the configured channels, then
optionally resampled to a common pixel spacing, then fitted to the output size.

Files are read by a pool of worker processes (``ingest.workers``) and their results streamed to the
outputs in file order, so the output is the same whatever the worker count and memory does not grow
with the number of files. A bad file never stops the run: it lands in the quarantine with its
reason. DICOMDIR files and non-image objects (SR, presentation states, RT plans, ...) are listed
there too, as skipped, and do not count as failures. The stage fails only when the quarantined
share of the image files passes ``ingest.max_quarantine_fraction``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import shutil
import struct
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage,
)
from tqdm import tqdm

from stages import layout
from stages.cli import StageError, run_stage
from stages.log_privacy import hidden_pydicom_messages
from stages.outputs import staged_folder, write_json
from stages.parallel import WorkFailure, ordered_map, worker_count
from stages.params import IngestParams, PathsParams, load_params
from stages.source_files import SKIPPED_ENTRIES, list_sources

logger = logging.getLogger(__name__)

LABEL_KEYS = ("accession_number", "study_instance_uid", "sop_instance_uid", "path")
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
# Listed in the quarantine but not failures: these entries were never meant to be images.
SKIP_REASONS = ("dicomdir", "not_an_image", *SKIPPED_ENTRIES)
QUARANTINE_COLUMNS = ("path", "reason", "detail")
DEFLATED_UID = pydicom.uid.DeflatedExplicitVRLittleEndian.encode("ascii")
DETAIL_MAX_CHARS = 300  # a reader's message can quote the rest of a header: kept to a line
EXTREME_MARGIN = 0.5 / 255  # see extreme_share
INDEX_BATCH_ROWS = 1024  # index rows buffered before a Parquet row group is written


class Quarantined(Exception):
    """A file that cannot be used; ``reason`` is a short code, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def quoted(err: BaseException | str) -> str:
    """A library's message as a quarantine detail: at most :data:`DETAIL_MAX_CHARS` characters
    (pydicom can quote the rest of a header in one message)."""
    text = str(err)
    return text if len(text) <= DETAIL_MAX_CHARS else text[:DETAIL_MAX_CHARS - 3] + "..."


def failure_reason(err: BaseException, *, reading: str) -> Quarantined:
    """The quarantine entry for an unexpected error while ``reading`` ("the header", "the pixel
    data"): resource limits and decoder crashes get their own codes, not the damage they are not.

    A Rust decoder's panic (``PanicException``) is a ``BaseException``, so callers catch that.
    """
    name = type(err).__name__
    if isinstance(err, MemoryError):
        return Quarantined("too_large", f"ran out of memory reading {reading} ({name})")
    if isinstance(err, RecursionError):
        return Quarantined("too_deep", f"{reading} nests sequences deeper than can be read ({name})")
    if name == "PanicException":
        return Quarantined("undecodable", f"the decoder crashed on {reading} ({name})")
    if isinstance(err, (EOFError, struct.error)) and reading == "the header":
        return Quarantined("truncated_header", quoted(f"the header ends inside an element ({name}: {err})"))
    code = {"the header": "corrupt_header", "the pixel data": "undecodable"}.get(reading, "unreadable")
    return Quarantined(code, quoted(f"{reading} cannot be read ({name}: {err})"))


@dataclass(frozen=True)
class PixelSettings:
    """The ``ingest`` params that shape the pixels (what a worker process needs)."""

    size: int
    channels: int = 1               # 1: grayscale (colour to luminance); 3: RGB (grayscale repeated)
    frames: str = "first"           # first | middle | all (one image per frame)
    voi_index: int = 0              # which VOI LUT or window when a file has several
    target_spacing_mm: float | None = None  # resample to this spacing, then pad or crop to size
    dtype: str = "uint8"            # uint8 (0-255) or float16 ([0, 1])
    # Bound on what one file may cost: its size, its inflated size, its decoded frames. A default
    # here also serves models pickled before the bound existed.
    max_decoded_mib: int = 2048

    @classmethod
    def from_params(cls, params: IngestParams) -> PixelSettings:
        return cls(size=params.image_size, channels=params.channels, frames=params.frames,
                   voi_index=params.voi_index, target_spacing_mm=params.target_spacing_mm,
                   dtype=params.pixel_dtype, max_decoded_mib=params.max_decoded_mib)

    @property
    def max_bytes(self) -> int:
        return self.max_decoded_mib << 20

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.size, self.size) if self.channels == 1 else (self.size, self.size, 3)


@dataclass(frozen=True)
class Frame:
    """One image of a file: its frame number, full-resolution display pixels and output pixels."""

    index: int
    display: np.ndarray  # float32 in [0, 1], (rows, cols) or (rows, cols, 3)
    pixels: np.ndarray   # PixelSettings.image_shape in PixelSettings.dtype


@dataclass(frozen=True)
class FileResult:
    """What a worker returns for one file: its images with their index rows, or why not."""

    relative_path: str
    images: tuple[tuple[np.ndarray, dict], ...] = ()
    reason: str = ""
    detail: str = ""


def read_dataset(source: Path | BinaryIO, *, max_bytes: int | None = None) -> pydicom.Dataset:
    """Parse a DICOM file, or raise Quarantined (not_dicom, truncated_header, dicomdir,
    not_an_image, no_pixel_data, too_large, ...).

    A file without the 128-byte preamble and ``DICM`` prefix is read again with ``force=True`` and
    accepted only when that yields a SOP Class UID: forced parsing of arbitrary bytes "succeeds"
    on text files too, with nonsense elements. With ``max_bytes``, a deflated data set that
    would inflate past it is refused before pydicom inflates it whole.
    """
    if max_bytes is not None:
        if isinstance(source, Path):
            with open(source, "rb") as stream:
                check_inflated_size(stream, max_bytes)
        else:
            check_inflated_size(source, max_bytes)
    try:
        ds = pydicom.dcmread(source)
    except InvalidDicomError as err:
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            ds = pydicom.dcmread(source, force=True)
            sop_class = ds.get("SOPClassUID")
        except Exception:  # noqa: BLE001  forced parsing of non-DICOM fails in many ways
            sop_class = None
        if not sop_class:
            raise Quarantined("not_dicom", quoted(err)) from err
        _record_detected_encoding(ds)
    except Exception as err:  # pydicom raises many types for damaged headers
        raise failure_reason(err, reading="the header") from err
    if len(ds) == 0:  # pydicom only warns when the data set ends early, inside its first element
        state = _pixel_data_state(source)
        if state == "cut":  # e.g. encapsulated pixel data without its delimiter
            raise Quarantined("truncated_pixel_data", "the data set ends inside (7FE0,0010) Pixel "
                              "Data, so no element of it could be read")
        if state == "complete":
            raise Quarantined("corrupt_header", "no data element could be read, though (7FE0,0010) "
                              "Pixel Data is whole: the header before it is damaged")
        raise Quarantined("truncated_header", "no data element could be read after the file meta "
                          "information")
    media_class = getattr(ds, "file_meta", pydicom.Dataset()).get("MediaStorageSOPClassUID")
    if media_class == MediaStorageDirectoryStorage or "DirectoryRecordSequence" in ds:
        raise Quarantined("dicomdir", "a DICOMDIR (media directory), not an image")
    if "PixelData" not in ds and not ds.get("FloatPixelData") and not ds.get("DoubleFloatPixelData"):
        if _ends_early(ds, source):
            raise Quarantined("truncated_header", "the file ends inside an element of the header, "
                              "before (7FE0,0010) Pixel Data")
        sop_class = pydicom.uid.UID(str(ds.get("SOPClassUID", "") or ""))
        if sop_class.type == "SOP Class" and "Image" not in sop_class.name and "Rows" not in ds:
            raise Quarantined("not_an_image", f"{sop_class.name}: not an image object")
        raise Quarantined("no_pixel_data", "(7FE0,0010) Pixel Data is absent")
    if "PixelData" not in ds:
        raise Quarantined("unsupported_pixel_data", "float pixel data (parametric maps) is not supported")
    return ds


def check_inflated_size(stream: BinaryIO, max_bytes: int) -> None:
    """Raise Quarantined (too_large) when ``stream`` holds a deflated data set that inflates past
    ``max_bytes``; leave ``stream`` where it was.

    pydicom inflates a Deflated Explicit VR Little Endian data set whole, in one call: a few MB
    can hold gigabytes of zeros. This inflates it in bounded pieces, keeping none, to measure it.
    """
    start = stream.tell()
    try:
        head = stream.read(144)  # preamble, DICM, (0002,0000) File Meta Information Group Length
        if head[128:132] != b"DICM":
            return
        if head[132:138] == b"\x02\x00\x00\x00UL":  # the usual meta: its length says where it ends
            meta_bytes = stream.read(int.from_bytes(head[140:144], "little") + 2)
            if DEFLATED_UID not in meta_bytes and meta_bytes[-2:] != b"\x02\x00":
                return  # most files: no need to parse the meta a second time
        stream.seek(start + 132)
        # pydicom's own meta reader (private, but the only one that takes an open stream).
        meta = pydicom.filereader._read_file_meta_info(stream)
        if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
            return
        inflater, pending, inflated = zlib.decompressobj(-zlib.MAX_WBITS), stream.read(), 0
        while pending and not inflater.eof:
            inflated += len(inflater.decompress(pending, 1 << 24))
            if inflated > max_bytes:
                raise Quarantined("too_large", f"the deflated data set inflates to more than "
                                  f"{max_bytes >> 20} MiB (ingest.max_decoded_mib)")
            pending = inflater.unconsumed_tail
    except (zlib.error, Exception) as err:
        if isinstance(err, Quarantined):
            raise
        return  # damaged meta or stream: pydicom's reading says how
    finally:
        stream.seek(start)


def _ends_early(ds: pydicom.Dataset, source: Path | BinaryIO) -> bool:
    """Whether the last element read does not end where the file does: pydicom stops at the end
    of a truncated file without a word, leaving a data set that looks complete."""
    if getattr(ds, "file_meta", {}).get("TransferSyntaxUID") == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return False  # positions are in the inflated data
    last = ds.get_item(next(reversed(ds.keys())))  # still raw unless something read it
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", None)
    if tell is None or length is None or length == 0xFFFFFFFF:
        return False
    size = source.stat().st_size if isinstance(source, Path) else source.seek(0, io.SEEK_END)
    return tell + length != size


def _pixel_data_state(source: Path | BinaryIO) -> str:
    """Where the bytes of (7FE0,0010), little endian, are after the preamble: ``absent``, or the
    element ``complete`` (its length, or the sequence delimiter of encapsulated data, reaches no
    further than the file) or ``cut``. For a file pydicom read no element of."""
    if isinstance(source, Path):
        content = source.read_bytes()
    else:
        source.seek(0)
        content = source.read()
    at = content.rfind(b"\xe0\x7f\x10\x00", 132)
    if at < 0:
        return "absent"
    if content[at + 4:at + 6] in (b"OB", b"OW", b"OV", b"UN"):  # explicit VR: 2 reserved bytes
        start, length = at + 12, int.from_bytes(content[at + 8:at + 12], "little")
    else:  # implicit VR
        start, length = at + 8, int.from_bytes(content[at + 4:at + 8], "little")
    if length == 0xFFFFFFFF:
        return "complete" if content.endswith(b"\xfe\xff\xdd\xe0\x00\x00\x00\x00") else "cut"
    return "complete" if start + length <= len(content) else "cut"


def _record_detected_encoding(ds: pydicom.Dataset) -> None:
    """Give a file without meta information the transfer syntax pydicom found while reading it.

    Its pixel decoders need one; a viewer would show such a file, so ingest does too.
    """
    if "TransferSyntaxUID" in getattr(ds, "file_meta", {}):
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        return
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                      ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def working_bytes(ds: pydicom.Dataset, frames: int) -> int | None:
    """Memory ``frames`` decoded frames take in the display steps (float32, or the stored values
    when wider), from the header alone; None when the header does not say."""
    try:
        rows, cols, allocated = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return rows * cols * samples * frames * max(4, allocated // 8)


def decode_frames(ds: pydicom.Dataset, *, frames: str,
                  max_bytes: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Stored values of the chosen frame(s) as (frame number, array), or raise Quarantined.

    With ``max_bytes``, frames whose decoded size (:func:`working_bytes`, from the header) is
    larger are refused before any decoder allocates them.
    """
    photometric = ds.get("PhotometricInterpretation")
    if photometric not in GRAYSCALE + COLOUR:
        found = "is absent" if photometric is None else f"is {photometric!r}"
        raise Quarantined("unsupported_photometric", f"(0028,0004) Photometric Interpretation {found}, "
                          f"not one of {', '.join(GRAYSCALE + COLOUR)}")
    if photometric == "PALETTE COLOR" and ds.file_meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
        # pydicom's apply_color_lut reads the OW lookup tables as little endian: colours would be wrong.
        raise Quarantined("unsupported_photometric", "PALETTE COLOR in a big-endian file: its lookup "
                          "tables would be read with the wrong byte order")
    n_frames = number_of_frames(ds)
    wanted = {"first": 0, "middle": n_frames // 2}.get(frames)
    needed = working_bytes(ds, n_frames if wanted is None else 1)
    if max_bytes is not None and needed is not None and needed > max_bytes:
        raise Quarantined("too_large", f"decoding would take {needed >> 20} MiB (Rows x Columns x "
                          f"samples x frames), more than ingest.max_decoded_mib {max_bytes >> 20}")
    try:
        native = native_pixels(ds)
        if native is not None:
            return [(0, native)]
        if wanted is not None and n_frames > 1:
            ds.pixel_array_options(index=wanted)  # decode only that frame
        stored = ds.pixel_array
    except (ValueError, EOFError) as err:
        text = str(err)
        truncated = isinstance(err, EOFError) or "less than expected" in text or "truncat" in text.lower()
        raise Quarantined("truncated_pixel_data" if truncated else "undecodable", quoted(text)) from err
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a decoder plugin missing, failing or panicking
        raise failure_reason(err, reading="the pixel data") from err
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if n_frames > 1 and wanted is None:  # every frame: (frames, rows, cols[, samples])
        return list(enumerate(stored))
    if stored.ndim == (3 if samples == 1 else 4):  # a decoder that ignored the frame index
        stored = stored[wanted or 0]
    return [(wanted or 0, stored)]


def native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Stored values of an uncompressed little-endian single-frame grayscale image, else None.

    The most common archive export. pydicom's ``pixel_array`` gets there through a decoder
    framework that validates dozens of attributes per call, which for small images costs more
    than reading the file (``bench/ingest.py``); this reads the bytes directly, with pydicom's
    semantics: bits above (0028,0101) Bits Stored masked, signed values sign-extended. Anything
    else (compressed, big endian, colour, multi-frame, short data) returns None and goes to pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, bits, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or allocated not in (8, 16) or not 1 <= bits <= allocated or number_of_frames(ds) != 1:
        return None
    data = ds.PixelData
    if len(data) < rows * cols * allocated // 8:
        return None  # pydicom says how it is truncated
    values = np.frombuffer(data, dtype=f"<u{allocated // 8}", count=rows * cols).reshape(rows, cols)
    if bits < allocated:
        values = values & np.array((1 << bits) - 1, dtype=values.dtype)
    if not signed:
        return values
    signed_values = values.astype(f"<i{allocated // 8}")
    if bits < allocated:  # two's complement in `bits` bits
        signed_values = np.where(values >= 1 << (bits - 1),
                                 values.astype(np.int32) - (1 << bits), values).astype(signed_values.dtype)
    return signed_values


def number_of_frames(ds: pydicom.Dataset) -> int:
    """(0028,0008) Number of Frames, 1 when absent or empty."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def to_display_pixels(ds: pydicom.Dataset, stored: np.ndarray, *, voi_index: int = 0,
                      channels: int = 1) -> np.ndarray:
    """Stored values of one frame to float32 in [0, 1] as a viewer shows them.

    Grayscale: modality LUT ((0028,1052) Rescale Intercept, (0028,1053) Rescale Slope or a
    Modality LUT Sequence), then the VOI LUT or window number ``voi_index`` (the last one when the
    file has fewer), then MONOCHROME1 inverted so that 1 is always bright; without any VOI
    information the frame's own range is used. Colour: PALETTE COLOR through its lookup tables,
    YBR already converted to RGB by pydicom's decoders, scaled by the stored bit depth.
    ``channels`` 1 gives (rows, cols), colour reduced to luminance (ITU-R BT.601 weights);
    3 gives (rows, cols, 3), grayscale repeated.
    """
    if ds.PhotometricInterpretation in GRAYSCALE:
        gray = _grayscale_display(ds, stored, voi_index=voi_index)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    rgb = _colour_display(ds, stored)
    if channels == 3:
        return rgb
    return (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)


def _grayscale_display(ds: pydicom.Dataset, stored: np.ndarray, *, voi_index: int) -> np.ndarray:
    fast = _linear_display(ds, stored, voi_index=voi_index)
    if fast is not None:
        return fast
    values = apply_modality_lut(stored, ds)
    # Present but empty elements mean "no VOI", as pydicom's apply_voi_lut decides.
    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData"))
    has_window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
    if not (has_lut or has_window):
        return _min_max(values.astype(np.float64), ds)
    if not has_lut:  # a VOI LUT indexes by the integer values; a window computes in floats
        values = values.astype(np.float64)
    index = min(voi_index, (len(lut) if has_lut else _multiplicity(ds.WindowCenter)) - 1)
    values = apply_voi_lut(values, ds, index=index)
    low, high = _voi_output_range(ds, lut=has_lut, index=index)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return _orient(np.clip(scaled, 0.0, 1.0), ds)


def _linear_display(ds: pydicom.Dataset, stored: np.ndarray, *, voi_index: int) -> np.ndarray | None:
    """The common case in closed form: rescale slope/intercept and a LINEAR window, else None.

    pydicom's apply_modality_lut and apply_windowing produce values in the window's output range
    that the caller scales back to [0, 1]; the composition is clip((x - c) / w + 0.5, 0, 1) with
    x the rescaled value and, for LINEAR, c = centre - 0.5 and w = width - 1 (PS3.3 C.11.2.1.2.1).
    Computing that directly halves the time per image (``bench/ingest.py``). LUT sequences, SIGMOID
    and a LINEAR width of 1 or less (pydicom's errors and edge cases) go to pydicom.
    """
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    has_window = centre is not None and width is not None
    if function not in ("LINEAR", "LINEAR_EXACT") and has_window:
        return None
    try:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope, intercept = (1.0, 0.0) if slope is None or intercept is None else (float(slope), float(intercept))
        if not has_window:
            return _min_max(stored * slope + intercept, ds)
        index = min(voi_index, _multiplicity(centre) - 1, _multiplicity(width) - 1)
        c = float(centre[index] if _multiplicity(centre) > 1 else centre)
        w = float(width[index] if _multiplicity(width) > 1 else width)
    except (TypeError, ValueError):
        return None
    if function == "LINEAR":
        c, w = c - 0.5, w - 1
    if w <= 0:
        return None
    # One multiply-add and one clip: (x * slope + intercept - c) / w + 0.5, inverted for MONOCHROME1.
    gain, offset = slope / w, (intercept - c) / w + 0.5
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gain, offset = -gain, 1.0 - offset
    scaled = stored.astype(np.float64) * gain + offset
    return np.clip(scaled, 0.0, 1.0, out=scaled).astype(np.float32)


def _min_max(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """No VOI information: the frame's own range to [0, 1] (a constant frame to 0)."""
    low, high = float(values.min()), float(values.max())
    return _orient((values - low) / (high - low) if high > low else np.zeros_like(values), ds)


def _orient(scaled: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """MONOCHROME1 inverted so that 1 is always bright; float32."""
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def _multiplicity(value: object) -> int:
    return len(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else 1


def _colour_display(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        rgb, bits = stored, int(ds.BitsStored)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise Quarantined("unsupported_photometric", f"colour pixels of shape {rgb.shape}, expected rows x cols x 3")
    return np.clip(rgb.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def _voi_output_range(ds: pydicom.Dataset, *, lut: bool, index: int = 0) -> tuple[float, float]:
    """Output range of pydicom's ``apply_voi_lut`` (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    if lut:
        bits = int(ds.VOILUTSequence[index].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if ds.get("PixelRepresentation", 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Area-averaging resize of a 2-D float image, or of each channel of a 3-D one.

    PIL's box filter averages when shrinking, avoiding the aliasing of plain subsampling, which
    would drop small findings such as nodules; when enlarging it repeats pixels.
    """
    if image.ndim == 3:
        return np.stack([_resize(image[..., c], rows, cols) for c in range(image.shape[-1])], axis=-1)
    return np.asarray(Image.fromarray(image.astype(np.float32), mode="F").resize(
        (cols, rows), Image.Resampling.BOX))


def resize_with_padding(image: np.ndarray, size: int) -> np.ndarray:
    """Fit ``image`` into ``size`` × ``size`` keeping its aspect ratio, centred, zero padded."""
    rows, cols = image.shape[:2]
    scale = size / max(rows, cols)
    resized = _resize(image, max(1, round(rows * scale)), max(1, round(cols * scale)))
    return pad_or_crop(resized, size)


def pad_or_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre ``image`` in ``size`` × ``size``: zero padding where smaller, cropping where larger."""
    out = np.zeros((size, size, *image.shape[2:]), dtype=np.float32)
    rows, cols = image.shape[:2]
    src_top, src_left = max(0, (rows - size) // 2), max(0, (cols - size) // 2)
    dst_top, dst_left = max(0, (size - rows) // 2), max(0, (size - cols) // 2)
    n_rows, n_cols = min(rows, size), min(cols, size)
    out[dst_top:dst_top + n_rows, dst_left:dst_left + n_cols] = \
        image[src_top:src_top + n_rows, src_left:src_left + n_cols]
    return out


def pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from (0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        row, col = float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def resample_to_spacing(image: np.ndarray, spacing: tuple[float, float], target_mm: float) -> np.ndarray:
    """Resample so that one pixel covers ``target_mm`` in both directions."""
    rows, cols = image.shape[:2]
    return _resize(image, max(1, round(rows * spacing[0] / target_mm)),
                   max(1, round(cols * spacing[1] / target_mm)))


def read_image(source: Path | BinaryIO, settings: PixelSettings) -> tuple[pydicom.Dataset, list[Frame]]:
    """Read one file: its dataset and the chosen frames, ready to store, or raise Quarantined."""
    ds = read_dataset(source, max_bytes=settings.max_bytes)
    return ds, image_frames(ds, settings)


def image_frames(ds: pydicom.Dataset, settings: PixelSettings) -> list[Frame]:
    """The chosen frames of a parsed file (:func:`read_dataset`), decoded and ready to store, or
    raise Quarantined. Apart from read_image so that a header can be checked before decoding."""
    spacing = pixel_spacing(ds)
    if settings.target_spacing_mm is not None and spacing is None:
        raise Quarantined("no_pixel_spacing", "ingest.target_spacing_mm is set but the file has no "
                          "(0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing")
    frames = []
    for index, stored in decode_frames(ds, frames=settings.frames, max_bytes=settings.max_bytes):
        try:
            display = to_display_pixels(ds, stored, voi_index=settings.voi_index, channels=settings.channels)
        except ValueError as err:  # pydicom rejects e.g. (0028,1051) Window Width < 1
            raise Quarantined("invalid_voi", quoted(err)) from err
        if not np.isfinite(display).all():
            raise Quarantined("invalid_pixels", f"frame {index}: pixels are not finite numbers")
        if display.max() == display.min():
            raise Quarantined("blank", f"frame {index}: every pixel shows the same value once the "
                              "modality and VOI steps are applied")
        if settings.target_spacing_mm is None:
            fitted = resize_with_padding(display, settings.size)
        else:
            fitted = pad_or_crop(resample_to_spacing(display, spacing, settings.target_spacing_mm),
                                 settings.size)
        frames.append(Frame(index, display, layout.stored_pixels(fitted, settings.dtype)))
    return frames


def extreme_share(display: np.ndarray) -> float:
    """Share of pixels at the ends of the display range: high means saturated.

    "At an end" is within half an 8-bit display step of 0 or 1, so that pixels a window clips
    count the same whichever arithmetic computed them.
    """
    return float(np.mean((display < EXTREME_MARGIN) | (display > 1.0 - EXTREME_MARGIN)))


def describe_image(ds: pydicom.Dataset, frame: Frame, *, source_path: str, sha256: str) -> dict:
    """The index row for one frame (``layout.INDEX_SCHEMA``; label and split added later)."""
    spacing = pixel_spacing(ds)
    scaled = layout.unit_pixels(frame.pixels)
    return {
        "row_key": f"{sha256[:24]}-{frame.index}",
        "source_path": source_path,
        "sha256": sha256,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "accession_number": str(ds.get("AccessionNumber", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "modality": str(ds.get("Modality", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "manufacturer_model": str(ds.get("ManufacturerModelName", "")),
        "body_part": str(ds.get("BodyPartExamined", "")),
        "view_position": str(ds.get("ViewPosition", "")),
        "patient_sex": str(ds.get("PatientSex", "")),
        "patient_age": str(ds.get("PatientAge", "")),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "pixel_spacing_mm": spacing[0] if spacing else float("nan"),
        "bits_stored": int(ds.BitsStored),
        "photometric": str(ds.PhotometricInterpretation),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID) if "TransferSyntaxUID" in ds.file_meta else "",
        "number_of_frames": number_of_frames(ds),
        "frame_index": frame.index,
        "pixel_min": float(scaled.min()),
        "pixel_max": float(scaled.max()),
        "pixel_mean": float(scaled.mean()),
        "pixel_std": float(scaled.std()),
        "pixel_extreme_share": extreme_share(frame.display),
    }


def ingest_file(path: Path, *, data_dir: Path, settings: PixelSettings) -> FileResult:
    """All the work on one file, as a worker process does it; never raises.

    The file is read once: the same bytes are hashed and parsed.
    """
    relative = path.relative_to(data_dir).as_posix()
    try:
        content = read_file(path, max_bytes=settings.max_bytes)
        ds, frames = read_image(io.BytesIO(content), settings)
        sha256 = hashlib.sha256(content).hexdigest()
        return FileResult(relative, tuple(
            (frame.pixels, describe_image(ds, frame, source_path=relative, sha256=sha256))
            for frame in frames))
    except Quarantined as err:
        return FileResult(relative, reason=err.reason, detail=str(err))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  one odd file must not sink a run of thousands
        failure = failure_reason(err, reading="the file")
        return FileResult(relative, reason=failure.reason, detail=str(failure))


def read_file(path: Path, *, max_bytes: int) -> bytes:
    """The bytes of ``path``, or raise Quarantined (too_large, unreadable) before reading a file
    larger than ``max_bytes``."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise Quarantined("too_large", f"the file is {size >> 20} MiB, more than "
                              f"ingest.max_decoded_mib {max_bytes >> 20}")
        return path.read_bytes()
    except FileNotFoundError:
        raise Quarantined("not_found", "no file there (it may have been moved during the run)") from None
    except OSError as err:
        raise Quarantined("unreadable", f"cannot read the file ({err.strerror})") from None


def read_model_frames(source: bytes | str | Path, *, settings: PixelSettings,
                      check: Callable[[pydicom.Dataset], None] | None = None) -> np.ndarray | tuple[str, str]:
    """One file (its bytes or path) to its images as ingest stores them, stacked (frames, ...);
    or, for a file that cannot be used, (reason, detail): never raises, never logs a value.

    What the served model runs in its decoder processes. ``check(ds)`` may refuse the header
    (raising Quarantined) before any pixel is decoded.
    """
    with hidden_pydicom_messages():
        try:
            content = (bytes(source) if isinstance(source, (bytes, bytearray, memoryview))
                       else read_file(Path(source), max_bytes=settings.max_bytes))
            ds = read_dataset(io.BytesIO(content), max_bytes=settings.max_bytes)
            if check is not None:
                check(ds)
            return np.stack([frame.pixels for frame in image_frames(ds, settings)])
        except Quarantined as err:
            return err.reason, str(err)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001  one odd file must not fail the others
            failure = failure_reason(err, reading="the file")
            return failure.reason, str(failure)


def quarantined_by_worker(path: Path, failure: WorkFailure, *, data_dir: Path) -> FileResult:
    """The quarantine entry of a file whose worker process died or ran out of time on it."""
    return FileResult(path.relative_to(data_dir).as_posix(), reason=failure.reason,
                      detail=f"the reader process {failure.detail} on this file"
                      if failure.reason == "worker_died" else failure.detail)


def read_labels(labels_file: Path, *, key: str, column: str = "label") -> tuple[dict[str, str], set[str]]:
    """Map each key value to its ``column`` value; keys whose rows contradict are returned apart.

    Several rows may share a key (e.g. one accession number for all images of a study); they
    must agree. ``column="split"`` reads the optional predefined split the same way.
    """
    if key not in LABEL_KEYS:
        raise ValueError(f"label key must be one of {', '.join(LABEL_KEYS)}; got {key!r}")
    labels = pd.read_csv(labels_file, dtype=str, keep_default_na=False)
    missing = {key, column} - set(labels.columns)
    if missing:
        raise StageError(
            f"{labels_file}: missing column(s) {', '.join(sorted(missing))}; "
            f"found {', '.join(labels.columns)}"
        )
    labels = labels[(labels[key] != "") & (labels[column] != "")]
    per_key = labels.groupby(key)[column].unique()
    conflicting = {k for k, values in per_key.items() if len(values) > 1}
    mapping = {k: values[0] for k, values in per_key.items() if k not in conflicting}
    return mapping, conflicting


def has_column(labels_file: Path, column: str) -> bool:
    """Whether the labels file's header names ``column``."""
    return column in pd.read_csv(labels_file, dtype=str, nrows=0).columns


def _key_value(record: dict, key: str) -> str:
    return record["source_path"] if key == "path" else record[key]


def assign_label(record: dict, *, key: str, labels: dict[str, str], conflicting: set[str], classes: list[int]) -> int:
    """The image's class from the labels table, or raise Quarantined (no_label, ...)."""
    value = _key_value(record, key)
    if value in conflicting:
        raise Quarantined("conflicting_label", f"rows for this {key} disagree on the label")
    if value not in labels:
        raise Quarantined("no_label", f"no row in the labels file for this {key}")
    by_text = {str(c): c for c in classes}
    if labels[value] not in by_text:
        raise Quarantined(
            "label_not_in_classes",
            f"label {labels[value]!r} is not one of ingest.classes {classes}",
        )
    return by_text[labels[value]]


def read_all(files: list[Path], *, data_dir: Path, settings: PixelSettings, workers: int,
             timeout_s: float | None = None) -> Iterator[FileResult]:
    """Results of :func:`ingest_file` in file order, from ``workers`` processes. A file whose
    process dies on it (a decoder crash, the OOM killer) or takes longer than ``timeout_s`` is
    quarantined (``worker_died``, ``timeout``) and costs nothing else."""
    yield from ordered_map(partial(ingest_file, data_dir=data_dir, settings=settings), files,
                           workers=workers, timeout_s=timeout_s,
                           on_failure=partial(quarantined_by_worker, data_dir=data_dir))


class ImageWriter:
    """Appends images to an ``.npy`` file one by one, never holding them all in memory.

    The count is known only at the end (files are quarantined, multi-frame files give several
    images), so the raw bytes go to a side file and the header is written before them at close.
    """

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: str) -> None:
        self.path, self.shape, self.dtype = path, shape, np.dtype(dtype)
        self._raw_path = path.with_suffix(".raw")
        self._raw = open(self._raw_path, "wb")  # noqa: SIM115  closed in close()
        self.count = 0

    def append(self, pixels: np.ndarray) -> None:
        self._raw.write(np.ascontiguousarray(pixels, dtype=self.dtype).tobytes())
        self.count += 1

    def __enter__(self) -> ImageWriter:
        return self

    def __exit__(self, error_type: type | None, *_: object) -> None:
        """Completes the file; after an error only lets go of it (it is a staged output)."""
        if error_type is None:
            self.close()
            return
        try:
            self._raw.close()
        except OSError:  # the same full disk, flushing
            pass

    def close(self) -> None:
        self._raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.count, *self.shape)}
        with open(self.path, "wb") as out, open(self._raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, length=1 << 22)
        self._raw_path.unlink()


class IndexWriter:
    """Writes index rows to Parquet in row groups of :data:`INDEX_BATCH_ROWS`, with a fixed schema."""

    _TYPES = {"string": pa.string(), "integer": pa.int64(), "float": pa.float64()}

    def __init__(self, path: Path) -> None:
        self.schema = pa.schema([(name, self._TYPES[kind]) for name, kind in layout.INDEX_SCHEMA.items()])
        self._writer = pq.ParquetWriter(path, self.schema)
        self._rows: list[dict] = []

    def append(self, row: dict) -> None:
        self._rows.append(row)
        if len(self._rows) >= INDEX_BATCH_ROWS:
            self._flush()

    def _flush(self) -> None:
        self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
        self._rows = []

    def close(self) -> None:
        self._flush()  # also writes the schema when there are no rows at all
        self._writer.close()

    def __enter__(self) -> IndexWriter:
        return self

    def __exit__(self, error_type: type | None, *_: object) -> None:
        """Completes the file; after an error only lets go of it (it is a staged output)."""
        if error_type is None:
            self.close()
            return
        try:
            self._writer.close()
        except OSError:
            pass


def main() -> None:
    paths, params = load_params("paths"), load_params("ingest")
    data_dir, labels_file = Path(paths.data), Path(paths.labels)
    out_dir = Path(paths.ingest_dir)
    if not labels_file.is_file():
        raise StageError(f"labels file {labels_file} not found (see README: bring your own data)")

    listing = list_sources(data_dir, exclude={labels_file.resolve()})
    files = listing.files
    if not files:
        raise StageError(f"no files found under {data_dir}/")
    labels, conflicting = read_labels(labels_file, key=params.label_key)
    splits = {}
    if has_column(labels_file, "split"):
        splits, _ = read_labels(labels_file, key=params.label_key, column="split")
    settings = PixelSettings.from_params(params)
    workers = worker_count(params.workers)

    reasons: Counter[str] = Counter()
    with staged_folder(out_dir, what="the ingest outputs") as staging, \
            open(staging / layout.INGEST_QUARANTINE, "w", newline="", encoding="utf-8") as stream, \
            ImageWriter(staging / layout.IMAGES, settings.image_shape, settings.dtype) as images, \
            IndexWriter(staging / layout.INGEST_INDEX) as index:
        quarantine = csv.writer(stream)
        quarantine.writerow(QUARANTINE_COLUMNS)
        for entry in listing.unread:  # FIFOs, broken links, names that are not UTF-8, ...
            quarantine.writerow(entry)
            reasons[entry[1]] += 1
        # The bar shows counts and rates only: paths can hold accession numbers.
        results = tqdm(read_all(files, data_dir=data_dir, settings=settings, workers=workers,
                                timeout_s=params.file_timeout_s),
                       total=len(files), unit="file", desc="ingest", mininterval=2.0)
        for result in results:
            try:
                rows = [(pixels, labelled(record, key=params.label_key, labels=labels,
                                          conflicting=conflicting, classes=params.classes, splits=splits))
                        for pixels, record in result.images]
            except Quarantined as err:
                result = FileResult(result.relative_path, reason=err.reason, detail=str(err))
            if result.reason:
                # Paths and reader messages can carry PHI, so they go to the quarantine table,
                # not to logs that CI systems keep.
                quarantine.writerow((result.relative_path, result.reason, result.detail))
                reasons[result.reason] += 1
                continue
            for pixels, record in rows:
                images.append(pixels)
                index.append(record)
    report(files=len(files) + len(listing.unread), images=images.count, reasons=reasons,
           params=params, paths=paths, workers=workers, shape=settings.image_shape)


def labelled(record: dict, *, key: str, labels: dict[str, str], conflicting: set[str],
             classes: list[int], splits: dict[str, str]) -> dict:
    """``record`` with its label and predefined split (empty when none), or raise Quarantined."""
    label = assign_label(record, key=key, labels=labels, conflicting=conflicting, classes=classes)
    return {**record, "label": label, "predefined_split": splits.get(_key_value(record, key), "")}


def report(*, files: int, images: int, reasons: Counter[str], params: IngestParams,
           paths: PathsParams, workers: int, shape: tuple[int, ...]) -> None:
    """Write the stage's metrics, log the summary, and fail when too many image files were unusable."""
    skipped = sum(reasons[r] for r in SKIP_REASONS)
    failed = sum(reasons.values()) - skipped
    metrics = {"files": files, "images": images, "quarantined": failed, "skipped_not_images": skipped,
               **{f"quarantined_{reason}": count for reason, count in sorted(reasons.items())}}
    write_json(Path(paths.ingest_metrics), metrics)
    quarantine_file = Path(paths.ingest_dir) / layout.INGEST_QUARANTINE
    logger.info("ingested %d images of shape %s from %d files with %d worker(s)", images, shape, files, workers)
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    if reasons:
        logger.warning("%d files quarantined (%s): see %s", sum(reasons.values()), summary, quarantine_file)
    candidates = files - skipped
    share = failed / candidates if candidates else 1.0
    if share > params.max_quarantine_fraction:
        raise StageError(
            f"{failed} of {candidates} image files quarantined ({share:.1%} > "
            f"ingest.max_quarantine_fraction {params.max_quarantine_fraction:.1%}): {summary}; "
            f"see {quarantine_file}"
        )


if __name__ == "__main__":
    run_stage(main)
