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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pydicom

from dicomflow.config import layout
from dicomflow.dicom.display import (
    COLOUR,
    Frame,
    colour_spread,
    PixelSettings,
    extreme_share,
    number_of_frames,
    pixel_spacing,
    read_image,
)
from dicomflow.dicom.reading import Quarantined, failure_reason, read_file
from dicomflow.dicom.series import (
    SERIES_SKIP_REASONS,
    SeriesDiagnosis,
    SeriesGroup,
    SliceHeader,
    VolumeSettings,
    apply_policy,
    diagnose,
    group_series,
    read_slice_header,
    read_volume,
)
from dicomflow.dicom.sources import SKIPPED_ENTRIES
from dicomflow.runtime.parallel import WorkFailure, ordered_map

logger = logging.getLogger(__name__)

# Listed in the quarantine but not failures: these entries were never meant to be images.
SKIP_REASONS = ("dicomdir", "not_an_image", *SERIES_SKIP_REASONS, *SKIPPED_ENTRIES)
QUARANTINE_COLUMNS = ("path", "reason", "detail")
INDEX_BATCH_ROWS = 1024  # index rows buffered before a Parquet row group is written


@dataclass(frozen=True)
class FileResult:
    """What a worker returns for one file: its images with their index rows, or why not."""

    relative_path: str
    images: tuple[tuple[np.ndarray, dict], ...] = ()
    reason: str = ""
    detail: str = ""
    # ingest.decode reduced: how its images were decoded (decode_counts), one entry per image.
    decode: tuple[str, ...] = ()


def decode_outcome(frame: Frame) -> str:
    """How a frame was decoded, for the ``decode_*`` metrics: "reduced", or "reduced:<reason>"
    (decoded in full, then averaged before the display steps, because the codec's reduced decoder
    declined), or "full:<reason>" (the full path)."""
    if frame.reduced:
        return f"reduced:{frame.full_because}" if frame.full_because else "reduced"
    return f"full:{frame.full_because or 'mode'}"


def decode_counts(outcomes: Counter[str]) -> dict[str, int]:
    """The ``decode_*`` metrics from :func:`decode_outcome` counts: ``decode_reduced`` (images
    decoded at a lower resolution or averaged before the display steps), ``decode_full`` (the full
    path, images not at least twice their fitted size included), and ``decode_fallback_<reason>``
    for each reason an image took a longer way."""
    counts = {"decode_reduced": sum(n for o, n in outcomes.items() if o.startswith("reduced")),
              "decode_full": sum(n for o, n in outcomes.items() if o.startswith("full"))}
    reasons: Counter[str] = Counter()
    for outcome, n in outcomes.items():
        # small: the full path is the right one, not a fallback (mode: decode full)
        if ":" in outcome and outcome.split(":", 1)[1] not in ("small", "mode"):
            reasons[outcome.split(":", 1)[1]] += n
    return {**counts, **{f"decode_fallback_{reason}": n for reason, n in sorted(reasons.items())}}


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
        # Colour: of the source (3 for RGB, YBR and PALETTE COLOR); validate flags grey "colour".
        "source_channels": 3 if ds.PhotometricInterpretation in COLOUR else 1,
        "pixel_colour_spread": (colour_spread(frame.display)
                                if ds.PhotometricInterpretation in COLOUR else float("nan")),
        "colour_profile": frame.colour_profile,
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
            for frame in frames), decode=tuple(decode_outcome(frame) for frame in frames))
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


# ---- ingest.unit: series -------------------------------------------------------------------

def header_or_failure(path: Path, *, data_dir: Path, max_bytes: int) -> SliceHeader | FileResult:
    """One file's :class:`~dicomflow.dicom.series.SliceHeader`, as a worker process reads it, or
    its quarantine entry; never raises."""
    try:
        return read_slice_header(path, data_dir=data_dir, max_bytes=max_bytes)
    except Quarantined as err:
        return FileResult(path.relative_to(data_dir).as_posix(), reason=err.reason, detail=str(err))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  one odd file must not sink a run of thousands
        failure = failure_reason(err, reading="the file's header")
        return FileResult(path.relative_to(data_dir).as_posix(), reason=failure.reason, detail=str(failure))


def series_folder(group: SeriesGroup) -> str:
    """Where a series' files are: their deepest common folder (the index's ``source_path``)."""
    parents = [PurePosixPath(h.relative_path).parent.parts for h in group.headers]
    common = []
    for names in zip(*parents):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return PurePosixPath(*common).as_posix() if common else "."


def _series_failure(kept: tuple[SeriesGroup, SeriesDiagnosis], failure: WorkFailure) -> FileResult:
    return FileResult(series_folder(kept[0]), reason=failure.reason, detail=failure.detail)


def ingest_series(kept: tuple[SeriesGroup, SeriesDiagnosis], *, data_dir: Path, volume: VolumeSettings,
                  fill_gaps: bool) -> FileResult:
    """One series to its volume and index row, as a worker process does it; never raises.

    The row is the first slice's :func:`describe_image` (patient, study, device; the volume's
    pixel statistics) with the series' own: ``row_key`` and ``sha256`` from the slices' hashes
    in geometric order, ``number_of_frames`` the slices, and the diagnosis (``layout.SERIES_SCHEMA``).
    Its ``slice_files`` (not an index column) lists each slice for ``layout.SERIES_FILES``.
    """
    group, diagnosis = kept
    folder = series_folder(group)
    try:
        built = read_volume(group, data_dir=data_dir, settings=volume, fill_gaps=fill_gaps)
        first = group.headers[0]
        ds = pydicom.dcmread(data_dir / first.relative_path, stop_before_pixels=True)
        sha256 = hashlib.sha256("".join(h.sha256 for h in group.headers).encode()).hexdigest()
        display = built.pixels.astype(np.float32) / 255.0
        row = describe_image(ds, Frame(index=0, display=display, pixels=built.pixels),
                             source_path=folder, sha256=sha256)
        row.update(row_key=f"{sha256[:24]}-series", sop_instance_uid="", number_of_frames=len(group.headers),
                   **diagnosis.as_metrics(), series_filled=built.filled,
                   slice_files=[{"row_key": f"{sha256[:24]}-series", "source_path": h.relative_path,
                                 "sha256": h.sha256, "sop_instance_uid": h.sop_instance_uid}
                                for h in group.headers])
        return FileResult(folder, ((built.pixels[..., None], row),))
    except Quarantined as err:
        return FileResult(folder, reason=err.reason, detail=str(err))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  one odd series must not sink the rest
        failure = failure_reason(err, reading="the series")
        return FileResult(folder, reason=failure.reason, detail=str(failure))


def read_all_series(files: list[Path], *, data_dir: Path, volume: VolumeSettings, policy: str,
                    min_slices: int, workers: int, timeout_s: float | None = None) -> Iterator[FileResult]:
    """``files`` as series: the quarantine entries, then one result per series, in a fixed order.

    Two passes over ``workers`` processes: every file's header (cheap), then, after grouping,
    diagnosis and ``policy`` (:func:`~dicomflow.dicom.series.apply_policy`), each kept series'
    volume. A file set aside (a localizer, an object without pixels) or unreadable gets its own
    entry; every file of a refused series gets one with the series' reason, so the quarantine
    still accounts for each file.
    """
    headers = []
    for outcome in ordered_map(partial(header_or_failure, data_dir=data_dir, max_bytes=volume.max_bytes), files,
                               workers=workers, timeout_s=timeout_s,
                               on_failure=partial(quarantined_by_worker, data_dir=data_dir)):
        if isinstance(outcome, FileResult):
            yield outcome
        else:
            headers.append(outcome)
    groups, set_aside = group_series(headers)
    for relative_path, reason, detail in set_aside:
        yield FileResult(relative_path, reason=reason, detail=detail)
    kept = []
    for group in groups:
        diagnosis = diagnose(group)
        try:
            kept.append((apply_policy(group, diagnosis, policy, min_slices=min_slices), diagnosis))
        except Quarantined as err:
            detail = f"{err} (one of the {len(group.headers)} files of its series)"
            yield from (FileResult(h.relative_path, reason=err.reason, detail=detail) for h in group.headers)
    # The kept series reach the workers once, as shared arguments (inherited at fork), and the
    # chunks carry only their numbers: a chunk of groups (17 series of 36 slices: ~370 kB pickled)
    # is larger than the socket's buffer, and the parent blocked sending it while the worker
    # blocked sending a volume back deadlocked both (290 series of the CT sample, bench.series).
    yield from ordered_map(partial(_ingest_kept, data_dir=data_dir, volume=volume, fill_gaps=policy == "fill_gaps"),
                           range(len(kept)), workers=workers, timeout_s=timeout_s, shared_args=(kept,),
                           on_failure=lambda number, failure: _series_failure(kept[number], failure))


def _ingest_kept(number: int, kept: list[tuple[SeriesGroup, SeriesDiagnosis]], **options) -> FileResult:
    """:func:`ingest_series` of ``kept[number]`` (``options``: its keyword arguments)."""
    return ingest_series(kept[number], **options)


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
    """Writes rows to Parquet in row groups of :data:`INDEX_BATCH_ROWS`, with a fixed schema
    (``layout.INDEX_SCHEMA`` unless another is given); keys outside it are not written."""

    _TYPES = {"string": pa.string(), "integer": pa.int64(), "float": pa.float64()}

    def __init__(self, path: Path, schema: dict[str, str] = layout.INDEX_SCHEMA) -> None:
        self.schema = pa.schema([(name, self._TYPES[kind]) for name, kind in schema.items()])
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
