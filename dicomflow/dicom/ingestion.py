"""Ingesting a folder: each file read in a worker process, its images and index rows streamed to
staged writers in file order, so the output is the same whatever the worker count and memory does
not grow with the number of files.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

from dicomflow.config import layout
from dicomflow.dicom.display import (
    Frame,
    PixelSettings,
    extreme_share,
    number_of_frames,
    pixel_spacing,
    read_image,
)
from dicomflow.dicom.reading import Quarantined, failure_reason, read_file
from dicomflow.dicom.sources import SKIPPED_ENTRIES
from dicomflow.runtime.parallel import WorkFailure, ordered_map

logger = logging.getLogger(__name__)

# Listed in the quarantine but not failures: these entries were never meant to be images.
SKIP_REASONS = ("dicomdir", "not_an_image", *SKIPPED_ENTRIES)
QUARANTINE_COLUMNS = ("path", "reason", "detail")
INDEX_BATCH_ROWS = 1024  # index rows buffered before a Parquet row group is written


@dataclass(frozen=True)
class FileResult:
    """What a worker returns for one file: its images with their index rows, or why not."""

    relative_path: str
    images: tuple[tuple[np.ndarray, dict], ...] = ()
    reason: str = ""
    detail: str = ""


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


def quarantined_by_worker(path: Path, failure: WorkFailure, *, data_dir: Path) -> FileResult:
    """The quarantine entry of a file whose worker process died or ran out of time on it."""
    return FileResult(path.relative_to(data_dir).as_posix(), reason=failure.reason,
                      detail=f"the reader process {failure.detail} on this file"
                      if failure.reason == "worker_died" else failure.detail)


def read_all(files: list[Path], *, data_dir: Path, settings: PixelSettings, workers: int,
             timeout_s: float | None = None) -> Iterator[FileResult]:
    """Results of :func:`ingest_file` in file order, from ``workers`` processes. A file whose
    process dies on it (a decoder crash, the OOM killer) or takes longer than ``timeout_s`` is
    quarantined (``worker_died``, ``timeout``) and costs nothing else."""
    yield from ordered_map(partial(ingest_file, data_dir=data_dir, settings=settings), files,
                           workers=workers, timeout_s=timeout_s,
                           on_failure=partial(quarantined_by_worker, data_dir=data_dir))


class _StagedWriter:
    """A writer of one staged output file: ``with`` completes it, or after an error only lets go of
    it (the staged folder it is in is removed)."""

    def __enter__(self):
        return self

    def __exit__(self, error_type: type | None, *_: object) -> None:
        if error_type is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # the same full disk, flushing
            self._release()

    def close(self) -> None:
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


class ImageWriter(_StagedWriter):
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

    def _release(self) -> None:
        self._raw.close()

    def close(self) -> None:
        self._raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.count, *self.shape)}
        with open(self.path, "wb") as out, open(self._raw_path, "rb") as raw:
            np.lib.format.write_array_header_1_0(out, header)
            shutil.copyfileobj(raw, out, length=1 << 22)
        self._raw_path.unlink()


class IndexWriter(_StagedWriter):
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

    def _release(self) -> None:
        self._writer.close()
