"""Stage 1, ingest: every DICOM file under ``data/`` to display-ready pixels, an index and a quarantine.

Inputs: the raw files under ``paths.data`` and the labels file ``paths.labels``.
Outputs (``paths.ingest_dir``): ``images.npy`` (n × size × size, or × 3 channels; uint8 or float16),
``index.parquet`` (one row per image, PHI included: only ``deidentify`` reads it) and
``quarantine.csv`` (every file that could not be used, with a reason code); counts go to
``paths.ingest_metrics``.
Params: every key of ``ingest``.

With ``ingest.unit: series`` (CT) a row is a series, not a file: every file's header is read,
the files grouped into series (Series Instance UID, Frame of Reference, matrix, spacing,
orientation), localizers and objects without pixels set aside, each series diagnosed (positions
along the slice normal, gaps, duplicates, spacing, tilt: ``dicomflow.dicom.series``) and handled
by ``ingest.series.policy``; a refused series puts each of its files in the quarantine with the
series' reason. A kept series becomes one volume of ``images.npy`` ((n, d, h, w, 1) uint8: HU
windowed, resampled to ``ingest.series.spacing_mm``, cropped or padded), its diagnosis in the
index's series columns and its slices in ``series_files.parquet``.

Pixels are what a radiologist's viewer shows: modality LUT, then the chosen VOI LUT or window,
MONOCHROME1 inverted, colour (RGB, YBR, PALETTE COLOR) converted to the configured channels, then
optionally resampled to a common pixel spacing, then fitted to the output size.

Files are read by a pool of worker processes (``ingest.workers``) and their results streamed to the
outputs in file order, so the output is the same whatever the worker count and memory does not grow
with the number of files. A bad file never stops the run: it lands in the quarantine with its
reason. DICOMDIR files and non-image objects (SR, presentation states, RT plans, ...) are listed
there too, as skipped, and do not count as failures. The stage fails only when the quarantined
share of the image files passes ``ingest.max_quarantine_fraction``.

An image with no row in the labels file is quarantined (``no_label``), or, with
``ingest.unlabelled: pretrain``, kept like the rest with label ``layout.UNLABELLED_LABEL`` (-1)
and no predefined split, for self-supervised pretraining; ``reports/ingest.json`` then counts
them (``unlabelled``). Contradicting label rows and labels outside ``ingest.classes`` are
quarantined either way.

With ``ingest.color_management: srgb`` colour images go through their (0028,2000) ICC Profile to
sRGB; one without a profile is taken as sRGB, and ``reports/ingest.json`` counts both
(``colour_icc_to_srgb``, ``colour_assumed_srgb``); an unreadable or non-RGB profile quarantines
the file (``invalid_icc_profile``).
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

from dicomflow.config import layout
from dicomflow.config.params import IngestParams, PathsParams, load_params
from dicomflow.dicom.display import PROFILE_ASSUMED_SRGB, PROFILE_CONVERTED, PixelSettings
from dicomflow.dicom.ingestion import (
    QUARANTINE_COLUMNS,
    SKIP_REASONS,
    FileResult,
    ImageWriter,
    IndexWriter,
    decode_counts,
    read_all,
    read_all_series,
)
from dicomflow.dicom.labels import has_column, labelled, read_labels
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.series import VolumeSettings
from dicomflow.dicom.sources import list_sources
from dicomflow.runtime.cluster import scheduler_address
from dicomflow.runtime.outputs import staged_folder, write_json
from dicomflow.runtime.parallel import worker_count
from dicomflow.runtime.progress import progress
from dicomflow.errors import DataError
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)


def main() -> None:
    paths, params = load_params("paths"), load_params("ingest")
    # Absolute, so that workers of a Dask cluster started in another folder find the files too.
    data_dir, labels_file = Path(paths.data).absolute(), Path(paths.labels)
    out_dir = Path(paths.ingest_dir)
    if not labels_file.is_file():
        raise DataError(f"labels file {labels_file} not found (see README: bring your own data)")

    listing = list_sources(data_dir, exclude={labels_file.resolve()})
    files = listing.files
    if not files:
        raise DataError(f"no files found under {data_dir}/")
    labels, conflicting = read_labels(labels_file, key=params.label_key)
    splits = {}
    if has_column(labels_file, "split"):
        splits, _ = read_labels(labels_file, key=params.label_key, column="split")
    settings = PixelSettings.from_params(params)
    workers = worker_count(params.workers)
    keep_unlabelled = params.unlabelled == "pretrain"
    if params.unit == "series":
        volume = VolumeSettings.from_params(params)
        shape, dtype = (*volume.size, 1), "uint8"  # volumes: always uint8 (a window of 1500 HU in 256 steps)
        results = read_all_series(files, data_dir=data_dir, volume=volume, policy=params.series.policy,
                                  min_slices=params.series.min_slices, workers=workers,
                                  timeout_s=params.file_timeout_s)
    else:
        shape, dtype = settings.image_shape, settings.dtype
        results = read_all(files, data_dir=data_dir, settings=settings, workers=workers,
                           timeout_s=params.file_timeout_s)

    reasons: Counter[str] = Counter()
    profiles: Counter[str] = Counter()  # how colour images reached sRGB (color_management: srgb)
    decoded: Counter[str] = Counter()  # how images were decoded (decode: reduced)
    unlabelled = 0
    series: list[dict] = []  # unit series: the index rows, for the diagnosis in the metrics
    with staged_folder(out_dir, what="the ingest outputs") as staging, \
            open(staging / layout.INGEST_QUARANTINE, "w", newline="", encoding="utf-8") as stream, \
            ImageWriter(staging / layout.IMAGES, shape, dtype) as images, \
            IndexWriter(staging / layout.INGEST_INDEX) as index, \
            IndexWriter(staging / layout.SERIES_FILES, layout.SERIES_FILES_SCHEMA) as slice_files:
        quarantine = csv.writer(stream)
        quarantine.writerow(QUARANTINE_COLUMNS)
        for entry in listing.unread:  # FIFOs, broken links, names that are not UTF-8, ...
            quarantine.writerow(entry)
            reasons[entry[1]] += 1
        # Counts and rates only: paths can hold accession numbers.
        for result in progress(results, total=len(files), what="ingest"):
            try:
                rows = [(pixels, labelled(record, key=params.label_key, labels=labels,
                                          conflicting=conflicting, classes=params.classes, splits=splits,
                                          keep_unlabelled=keep_unlabelled))
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
                for slice_file in record.get("slice_files", ()):
                    slice_files.append(slice_file)
                if params.unit == "series":
                    series.append(record)
                unlabelled += int(record["label"] == layout.UNLABELLED_LABEL)
                profiles[record["colour_profile"]] += 1
            decoded.update(result.decode)
    report(files=len(files) + len(listing.unread), images=images.count, reasons=reasons,
           unlabelled=unlabelled if keep_unlabelled else None,
           colour_profiles=profiles if params.color_management == "srgb" else None,
           series=series_summary(series) if params.unit == "series" else None,
           decoded=decoded if params.decode == "reduced" and params.unit == "image" else None,
           params=params, paths=paths, shape=shape,
           where=f"on the Dask cluster at {address}" if (address := scheduler_address())
           else f"with {workers} worker(s)")


def report(*, files: int, images: int, reasons: Counter[str], params: IngestParams,
           paths: PathsParams, where: str, shape: tuple[int, ...], unlabelled: int | None = None,
           colour_profiles: Counter[str] | None = None, series: dict | None = None,
           decoded: Counter[str] | None = None) -> None:
    """Write the stage's metrics, log the summary, and fail when too many image files were unusable.

    ``unlabelled``: the images kept without a label (``ingest.unlabelled: pretrain``), counted in
    the metrics as ``unlabelled``; None (quarantine) leaves the key out, as before the option.
    ``colour_profiles``: with ``ingest.color_management: srgb``, the images by how they reached
    sRGB (``display.PROFILE_CONVERTED``, ``display.PROFILE_ASSUMED_SRGB``), counted as
    ``colour_<way>``; None leaves the keys out. ``series``: with ``ingest.unit: series``, the
    kept series' diagnosis (:func:`series_summary`); None leaves the keys out. ``decoded``: with
    ``ingest.decode: reduced``, the images by how they were decoded
    (:func:`~dicomflow.dicom.ingestion.decode_outcome`), as ``decode_*`` counts
    (:func:`~dicomflow.dicom.ingestion.decode_counts`); None leaves the keys out.
    """
    skipped = sum(reasons[r] for r in SKIP_REASONS)
    failed = sum(reasons.values()) - skipped
    metrics = {"files": files, "images": images,
               **({"unlabelled": unlabelled} if unlabelled is not None else {}),
               **({f"colour_{way}": colour_profiles[way] for way in (PROFILE_CONVERTED, PROFILE_ASSUMED_SRGB)}
                  if colour_profiles is not None else {}),
               **(series or {}),
               **(decode_counts(decoded) if decoded is not None else {}),
               "quarantined": failed, "skipped_not_images": skipped,
               **{f"quarantined_{reason}": count for reason, count in sorted(reasons.items())}}
    write_json(Path(paths.ingest_metrics), metrics)
    quarantine_file = Path(paths.ingest_dir) / layout.INGEST_QUARANTINE
    logger.info("ingested %d images of shape %s from %d files %s", images, shape, files, where)
    if colour_profiles is not None and colour_profiles[PROFILE_ASSUMED_SRGB]:
        logger.info("%d colour images have no (0028,2000) ICC Profile: taken as sRGB",
                    colour_profiles[PROFILE_ASSUMED_SRGB])
    if unlabelled is not None:
        logger.info("%d of the %d images have no label: kept for pretraining (label %d)",
                    unlabelled, images, layout.UNLABELLED_LABEL)
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
    if reasons:
        logger.warning("%d files quarantined (%s): see %s", sum(reasons.values()), summary, quarantine_file)
    candidates = files - skipped
    share = failed / candidates if candidates else 1.0
    if share > params.max_quarantine_fraction:
        raise DataError(
            f"{failed} of {candidates} image files quarantined ({share:.1%} > "
            f"ingest.max_quarantine_fraction {params.max_quarantine_fraction:.1%}): {summary}; "
            f"see {quarantine_file}"
        )


def series_summary(rows: list[dict]) -> dict:
    """The kept series' diagnosis for the metrics: how many, their slices, what the policy
    repaired and the worst spacing and orientation deviations (0 when there is no series)."""
    def worst(column: str) -> float:
        return round(max((row[column] for row in rows), default=0.0), 4)

    return {"series": len(rows), "series_slices": sum(row["number_of_frames"] for row in rows),
            "series_duplicates_dropped": sum(row["series_duplicates_identical"] for row in rows),
            "series_filled_slices": sum(row["series_filled"] for row in rows),
            "series_max_spacing_deviation_mm": worst("series_spacing_deviation_mm"),
            "series_max_orientation_deviation_deg": worst("series_orientation_deviation_deg")}


if __name__ == "__main__":
    run_stage(main)
