"""Stage 2, deidentify: the PS3.15 Basic Profile on every ingested file, and a PHI-free manifest.

Inputs: ``paths.ingest_dir``/index.parquet and images.npy (row i <-> image i), and the raw DICOM
files under ``paths.data`` (``source_path`` in the index is relative to it).
Outputs (``paths.deid_dir``): ``dicom/<image_key>.dcm`` (de-identified headers, original pixel data
and transfer syntax, or blanked pixels uncompressed), ``manifest.parquet`` (``layout.MANIFEST_COLUMNS``,
index order), ``images.npy``, ``audit.csv`` (actions, options, the text regions read, blanked and
kept, and the burned-in decision per file), ``identifier_digests.json`` and
``secret_fingerprint.json``; counts to ``paths.deid_metrics``. Every image is read for burned-in
text (Tesseract): regions holding an identifying value are blanked where they stand in the DICOM
file and in ``images.npy`` (or the file left out); pixels the reader cannot handle fall back on
the header rules (``BurnedInAnnotation`` YES, or a modality, image type or manufacturer listed in
params).
Params: ``deidentify.*`` (private tags, the PS3.15 options, burned-in text); the ``ingest``
pixel params, to redo the images of files whose pixels are blanked.
Secret: ``DICOMFLOW_SECRET``, or the file named by ``DICOMFLOW_SECRET_FILE`` (at least 32 bytes);
without either, the public demo secret, which the stage refuses unless every file is one of the
embedded sample's and no team server is in use (:func:`~dicomflow.deid.secret.check_secret_use`).
Its keyed fingerprint goes to ``secret_fingerprint.json``, never the secret.

A first pass reads every source header for its identifying values;
the second de-identifies each file, replacing any kept text (manufacturer, codes, what an option
keeps) that holds one of them, whichever file it came from. Nothing downstream reads ``data/`` or
the ingest index again, so before the outputs are moved into place every identifying value of the
sources is searched in them (:func:`find_leaks`; each file's pixels were read for text again as
it was written): the safety net, which real exports do not trip;
any hit deletes them and fails the stage, listing every attribute involved. Logs and errors carry
counts, tags and row numbers, never PHI (not even source paths, which hold accession numbers).

With ``ingest.unit: series`` (``images.npy`` holds volumes and ``series_files.parquet`` lists each
series' slice files, which must cover every row) a row is a series: each of its slice files is
de-identified as above into ``dicom/<image_key>/<keyed SOP UID>.dcm``, where ``image_key`` is keyed
on the Series Instance UID and the first slice's SOP Instance UID
(:func:`~dicomflow.deid.manifest.series_identity`); the manifest has one row per series, its
``dicom_file`` that folder. The keyed UIDs give every slice of a series one new Series Instance and
Frame of Reference UID, positions and orientation are kept, dates shift by the patient's one shift
(``retain_longitudinal_dates``). A slice that cannot be de-identified (unreadable, unwritable, a
leak) quarantines its series by the series' row, one left out for burned-in text leaves its series
out: a series with a slice missing is not a volume. Slices meet the header rules even when the reader
finds their pixels clean (:func:`~dicomflow.deid.worker.deidentify_file`); a series with a blanked
slice has its volume redone from its de-identified slices with ``ingest.series``. The metrics count
series and slice files; ``deidentify.max_quarantine_fraction`` is a share of the series.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.config.params import load_params
from dicomflow.deid.checks import check_inputs, check_outputs
from dicomflow.deid.digests import write_digests
from dicomflow.deid.manifest import build_manifest
from dicomflow.deid.passes import deidentify_sources, summarise
from dicomflow.deid.profile import load_profile
from dicomflow.deid.secret import (
    check_secret_use,
    fingerprint_record,
    is_embedded_sample,
    is_team_mode,
    read_secret,
)
from dicomflow.deid.worker import FileSettings
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.series import VolumeSettings
from dicomflow.errors import DataError
from dicomflow.runtime.outputs import staged_folder, write_json
from dicomflow.runtime.parallel import worker_count
from dicomflow.runtime.progress import progress
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)


def progress_bar(results: Iterable, total: int, what: str) -> Iterable:
    """Counts and rates only: paths can hold accession numbers."""
    return progress(results, total=total, what=what)


def main() -> None:
    paths, params, ingest = load_params("paths"), load_params("deidentify"), load_params("ingest")
    pixels = PixelSettings.from_params(ingest)
    ingest_dir, out_dir = Path(paths.ingest_dir), Path(paths.deid_dir)
    secret, is_demo = read_secret(os.environ)
    if not params.remove_private_tags:
        logger.warning("deidentify.remove_private_tags is false: private tags are kept, which the "
                       "Basic Profile does not allow; the leak check still scans them")

    index = pd.read_parquet(ingest_dir / layout.INGEST_INDEX)
    images = np.load(ingest_dir / layout.IMAGES)
    series_files = read_series_files(ingest_dir / layout.SERIES_FILES)
    check_inputs(index, images, series_files)
    series_files = series_files if images.ndim == 5 else None  # images: no slice is listed
    # The demo secret is public: on the embedded sample only, and never in team mode.
    check_secret_use(is_demo, sample=is_embedded_sample(index["sha256"].dropna()),
                     team_mode=is_team_mode(os.environ))
    if is_demo:
        logger.warning("the demo secret is in use: the data is the embedded sample, for which it is "
                       "allowed; real data needs a secret of its own (docs/security/secret.md)")
    profile = load_profile()
    logger.info("read %d index rows and images %s; profile of %d attributes", len(index),
                images.shape, len(profile))

    # Moved into place only when complete and clean (no leak), removed otherwise.
    with staged_folder(out_dir, what="the de-identified outputs") as staging:
        (staging / layout.DEID_DICOM_DIR).mkdir()
        # Absolute, so that workers of a Dask cluster started in another folder find the files too.
        settings = FileSettings(Path(paths.data).absolute(), (staging / layout.DEID_DICOM_DIR).absolute(),
                                profile, secret, params, pixels)
        done = deidentify_sources(index, images, settings, series_files=series_files,
                                  volume=VolumeSettings.from_params(ingest),
                                  fill_gaps=ingest.series.policy == "fill_gaps",
                                  workers=worker_count(params.workers),
                                  timeout_s=params.file_timeout_s, progress=progress_bar)
        if done.hidden_warnings:
            logger.warning("%d pydicom warnings about source headers not shown (they quote values)",
                           done.hidden_warnings)
        metrics = summarise(done.audit, done.quarantine)
        if series_files is not None:
            metrics.update(series_metrics(index, done.index, done.quarantine))
        build_manifest(done.index, done.images, secret=secret,
                       retain_patient_characteristics=params.retain_patient_characteristics,
                       series_files=series_files).to_parquet(staging / layout.DEID_MANIFEST, index=False)
        done.audit.to_csv(staging / layout.DEID_AUDIT, index=False)
        done.quarantine.to_csv(staging / layout.DEID_QUARANTINE, index=False)
        np.save(staging / layout.IMAGES, done.images)
        check_outputs(done.identifiers, out_dir=staging)
        # What later leak scans search for, as digests: no later stage may read the values.
        write_digests(done.identifiers, secret, staging / layout.DEID_IDENTIFIER_DIGESTS)
        # Which secret made the pseudonyms (evaluate logs it to MLflow and the model card).
        write_json(staging / layout.DEID_SECRET_FINGERPRINT, fingerprint_record(secret, is_demo))

    metrics.update(identifiers_checked=len(done.identifiers), leak_hits=0, demo_secret=int(is_demo))
    write_json(Path(paths.deid_metrics), metrics)
    logger.info("wrote %d manifest rows, images %s and the audit to %s", len(done.index),
                done.images.shape, out_dir)
    if series_files is None:
        check_quarantine(done.quarantine, files=metrics["n_files"] + len(done.quarantine),
                         max_fraction=params.max_quarantine_fraction, out_dir=out_dir)
    else:  # a quarantined series is one entry: its share is of the series
        logger.info("series: %d of %d de-identified (%d of %d slice files), %d left out for burned-in text, "
                    "%d quarantined", *(metrics[key] for key in (
                        "series_deidentified", "series", "series_deidentified_slices", "series_slices",
                        "series_burned_in_excluded", "series_quarantined")))
        check_quarantine(done.quarantine, files=len(index), max_fraction=params.max_quarantine_fraction,
                         out_dir=out_dir, unit="series")


def read_series_files(path: Path) -> pd.DataFrame | None:
    """``layout.SERIES_FILES`` (the slice files of each series row), or None when ingest wrote none."""
    return pd.read_parquet(path) if path.is_file() else None


def series_metrics(index: pd.DataFrame, kept: pd.DataFrame, quarantine: pd.DataFrame) -> dict[str, int]:
    """Series and slices in, de-identified, left out for burned-in text and quarantined
    (``ingest.unit: series``; ``n_files`` counts the slice files de-identified)."""
    excluded = len(index) - len(kept) - len(quarantine)
    return {"series": len(index), "series_slices": int(index["number_of_frames"].sum()),
            "series_deidentified": len(kept), "series_deidentified_slices": int(kept["number_of_frames"].sum()),
            "series_burned_in_excluded": excluded, "series_quarantined": len(quarantine)}


def check_quarantine(quarantine: pd.DataFrame, *, files: int, max_fraction: float, out_dir: Path,
                     unit: str = "files") -> None:
    """Log the files (or series: ``unit``) left out by reason; raise DataError when their share
    of ``files`` passes ``max_fraction`` (``deidentify.max_quarantine_fraction``)."""
    if quarantine.empty:
        return
    reasons = quarantine["reason"].value_counts()
    summary = ", ".join(f"{count} {reason}" for reason, count in reasons.items())
    where = out_dir / layout.DEID_QUARANTINE
    logger.warning("%d %s quarantined (%s): see %s", len(quarantine), unit, summary, where)
    share = len(quarantine) / files
    if share > max_fraction:
        raise DataError(f"{len(quarantine)} of {files} {unit} could not be de-identified "
                         f"({share:.1%} > deidentify.max_quarantine_fraction {max_fraction:.1%}): "
                         f"{summary}; see {where}")


if __name__ == "__main__":
    run_stage(main)
