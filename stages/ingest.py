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
import logging
from collections import Counter
from pathlib import Path

from dicomflow.config import layout
from dicomflow.config.params import IngestParams, PathsParams, load_params
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.ingestion import (
    QUARANTINE_COLUMNS,
    SKIP_REASONS,
    FileResult,
    ImageWriter,
    IndexWriter,
    read_all,
)
from dicomflow.dicom.labels import has_column, labelled, read_labels
from dicomflow.dicom.reading import Quarantined
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
        # Counts and rates only: paths can hold accession numbers.
        results = progress(read_all(files, data_dir=data_dir, settings=settings, workers=workers,
                                    timeout_s=params.file_timeout_s), total=len(files), what="ingest")
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
           params=params, paths=paths, shape=settings.image_shape,
           where=f"on the Dask cluster at {address}" if (address := scheduler_address())
           else f"with {workers} worker(s)")


def report(*, files: int, images: int, reasons: Counter[str], params: IngestParams,
           paths: PathsParams, where: str, shape: tuple[int, ...]) -> None:
    """Write the stage's metrics, log the summary, and fail when too many image files were unusable."""
    skipped = sum(reasons[r] for r in SKIP_REASONS)
    failed = sum(reasons.values()) - skipped
    metrics = {"files": files, "images": images, "quarantined": failed, "skipped_not_images": skipped,
               **{f"quarantined_{reason}": count for reason, count in sorted(reasons.items())}}
    write_json(Path(paths.ingest_metrics), metrics)
    quarantine_file = Path(paths.ingest_dir) / layout.INGEST_QUARANTINE
    logger.info("ingested %d images of shape %s from %d files %s", images, shape, files, where)
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


if __name__ == "__main__":
    run_stage(main)
