"""Reading a DICOM file safely: bounded size, honest failure reasons, no value in messages.

:func:`read_dataset` refuses what would cost more than the configured bound (file size, the
inflated size of a deflated data set) before pydicom allocates it, and :func:`failure_reason`
turns any reader error into a :class:`Quarantined` reason code with a message capped to a line.
"""

from __future__ import annotations

import io
import logging
import struct
import zlib
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

logger = logging.getLogger(__name__)
DEFLATED_UID = pydicom.uid.DeflatedExplicitVRLittleEndian.encode("ascii")
DETAIL_MAX_CHARS = 300  # a reader's message can quote the rest of a header: kept to a line


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


def read_dataset(source: Path | BinaryIO, *, max_bytes: int | None = None,
                 defer_size: int | None = None) -> pydicom.Dataset:
    """Parse a DICOM file, or raise Quarantined (not_dicom, truncated_header, dicomdir,
    not_an_image, no_pixel_data, too_large, ...).

    A file without the 128-byte preamble and ``DICM`` prefix is read again with ``force=True`` and
    accepted only when that yields a SOP Class UID: forced parsing of arbitrary bytes "succeeds"
    on text files too, with nonsense elements. With ``max_bytes``, a deflated data set that
    would inflate past it is refused before pydicom inflates it whole. With ``defer_size``,
    values longer than that many bytes (the pixel data) are skipped, not read (pydicom's
    ``defer_size``): for a caller that needs the header only.
    """
    if max_bytes is not None:
        if isinstance(source, Path):
            with open(source, "rb") as stream:
                check_inflated_size(stream, max_bytes)
        else:
            check_inflated_size(source, max_bytes)
    try:
        ds = pydicom.dcmread(source, defer_size=defer_size)
    except InvalidDicomError as err:
        if hasattr(source, "seek"):
            source.seek(0)
        try:
            ds = pydicom.dcmread(source, force=True, defer_size=defer_size)
            sop_class = ds.get("SOPClassUID")
        except Exception:  # noqa: BLE001  forced parsing of non-DICOM fails in many ways
            sop_class = None
        if not sop_class:
            # Our words, not pydicom's: its message tells the user to "Use force=True", which
            # was tried just above and which no user of ingest or a served model can pass.
            raise Quarantined("not_dicom", "not a DICOM file: no 'DICM' marker after a 128-byte preamble "
                              "and no SOP Class UID when read as a data set without one") from err
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
