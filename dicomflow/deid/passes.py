"""De-identifying the files of an ingest index in two passes over worker processes.

The first pass reads every source header for its identifying values
(:func:`~dicomflow.deid.worker.source_identifiers`); the second de-identifies each file
(:func:`~dicomflow.deid.worker.deidentify_file`) with the values of all the sources at hand, so
kept text holding another file's identifier is replaced too. Files that cannot be done are
quarantined by their first index row (their paths hold accession numbers).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.deid.identifiers import Identifiers, project_words
from dicomflow.deid.leaks import INDEX_IDENTIFIERS, identifiers_from_index
from dicomflow.deid.manifest import series_keys
from dicomflow.deid.pixel_text import tessdata_dir
from dicomflow.deid.profile import ACTIONS, COUNT_KEYS
from dicomflow.deid.worker import (
    AUDIT_COLUMNS,
    WRITTEN_COLUMNS,
    FileJob,
    FileOutcome,
    FileSettings,
    deidentify_file,
    source_identifiers,
)
from dicomflow.dicom.reading import quoted
from dicomflow.dicom.series import VolumeSettings, group_series, read_slice_header, read_volume
from dicomflow.errors import DataError
from dicomflow.runtime.parallel import WorkFailure, ordered_map

logger = logging.getLogger(__name__)

# Files left out; ``index_row`` is the file's first row in the ingest index (its path holds PHI).
QUARANTINE_COLUMNS = ("index_row", "reason", "detail")


@dataclass(frozen=True)
class Deidentified:
    """What :func:`deidentify_sources` made.

    ``audit``: ``AUDIT_COLUMNS``, one row per file de-identified, index order. ``identifiers``:
    the identifying values of the sources and the index (for :func:`find_leaks`). ``index``: the
    index rows kept, their :data:`WRITTEN_COLUMNS` as written to the files (a value holding an
    identifier is replaced there), and ``images`` theirs, blanked where the files were.
    ``quarantine``: ``QUARANTINE_COLUMNS``, one row per source file left out because it could not
    be de-identified (by its first row in the ingest index: paths hold accession numbers).
    ``hidden_warnings``: pydicom warnings about source headers not shown.
    """

    audit: pd.DataFrame
    identifiers: Identifiers
    index: pd.DataFrame
    images: np.ndarray
    quarantine: pd.DataFrame
    hidden_warnings: int


def deidentify_sources(index: pd.DataFrame, images: np.ndarray, settings: FileSettings, *,
                       series_files: pd.DataFrame | None = None, volume: VolumeSettings | None = None,
                       fill_gaps: bool = False, workers: int = 1, timeout_s: float | None = None,
                       progress: Callable[[Iterable, int, str], Iterable] | None = None) -> Deidentified:
    """De-identify each source file of the index (:func:`deidentify_file`), once per file, in
    ``workers`` processes, after a first pass that collects the identifying values of every
    source header (:func:`source_identifiers`).

    A file's ``key`` is the keyed hash of its SOP Instance UID: the ``image_key`` of a
    single-frame image, shared by every image of a multi-frame object. Every file's pixels are
    read for text (:func:`~dicomflow.deid.burned_in.read_burned_in_text`): a file showing
    identifying text has it blanked (or is left out, ``params.burned_in_action``), its images
    then redone from the blanked file with the ingest settings ``settings.pixels``; pixels that
    cannot be read fall back on the header rules (:func:`~dicomflow.deid.burned_in.burned_in_risk`).

    One file never stops the others: a file without SOP Instance UID, a second file with the
    UID of an earlier one (the first in index order is kept), a file that cannot be read,
    de-identified or written, or whose worker dies or takes longer than ``timeout_s`` seconds,
    is quarantined with its reason. A full disk raises DataError. ``progress(results, total,
    what)``, if given, wraps each pass's stream of results (a progress bar).

    With ``series_files`` (``layout.SERIES_FILES``; ``ingest.unit: series``) each index row is
    a series and each of its slice files is done as above into ``dicom_dir/<series key>/``
    (:func:`~dicomflow.deid.manifest.series_keys`); the keyed UIDs give every slice the same new
    Series Instance and Frame of Reference UIDs, positions and orientation are kept. A series is
    whole or absent: one slice that cannot be done quarantines its series (by the series' row,
    with that slice's reason), one slice left out for burned-in text leaves the series out, and
    neither leaves a file of it behind. A series with a blanked slice gets its volume redone
    from its de-identified slices with ``volume`` and ``fill_gaps`` (the ingest settings).
    """
    progress = progress or (lambda results, _total, _what: results)
    tessdata_dir()  # the text reader's model: a missing one stops the stage here, not in each file
    identifiers = identifiers_from_index(index)
    keep = np.ones(len(index), dtype=bool)
    images = images.copy()
    written = {column: index[column].astype(object).to_numpy(copy=True) for column in WRITTEN_COLUMNS}
    failures: dict[int, tuple[str, str]] = {}
    if series_files is None:
        rows_of = index.groupby("source_path", sort=False).indices
        jobs = _jobs(index, rows_of, failures)
    else:
        jobs = _slice_jobs(index, series_files, settings.secret, failures)
        rows_of = {job.source: np.array([job.first_row]) for job in jobs}
        for uid in series_files["sop_instance_uid"].dropna().astype(str).unique():
            identifiers.add_text(uid, INDEX_IDENTIFIERS["sop_instance_uid"], uid=True)

    def fail(job: FileJob, failure: tuple[str, str]) -> None:
        """The file's failure, by its row; a series keeps the first of its slices' failures."""
        if series_files is not None:
            slices = int(index["number_of_frames"].iat[job.first_row])
            failure = (failure[0], f"one of the {slices} slices of the series: {failure[1]}")
        failures.setdefault(job.first_row, failure)

    # First pass: the identifying values of every readable source header.
    readable = []
    found_in_headers = ordered_map(partial(source_identifiers, settings=settings), jobs,
                                   workers=workers, timeout_s=timeout_s, on_failure=_worker_failure)
    for found, job in zip(progress(found_in_headers, len(jobs), "headers"), jobs):  # bar first: it ends
        if isinstance(found, Identifiers):
            identifiers.update(found)
            readable.append(job)
        else:
            fail(job, found)
    readable = [job for job in readable if job.first_row not in failures]  # a series lost no slice

    # Second pass: each readable file, with every source's values (sent once to each worker).
    project_words()  # read once here: the forked workers inherit it
    audit, audit_rows, hidden, redo, written_rows = [], [], 0, set(), set()
    outcomes = ordered_map(partial(deidentify_file, settings=settings), readable,
                           workers=workers, timeout_s=timeout_s, shared_args=(identifiers,),
                           on_failure=lambda job, why: FileOutcome(None, failure=_worker_failure(job, why)))
    for outcome, job in zip(progress(outcomes, len(readable), "deidentify"), readable):
        positions = rows_of[job.source]
        if outcome.failure is not None:
            if outcome.failure[0] == "no_space":
                raise DataError(f"{outcome.failure[1]} while writing the de-identified files to "
                                f"{os.path.relpath(settings.dicom_dir)}: nothing half-written is left; free some "
                                "space and re-run")
            fail(job, outcome.failure)
            continue
        audit.append(outcome.audit)
        audit_rows.append(job.first_row)
        hidden += outcome.hidden_warnings
        if outcome.excluded:
            keep[positions] = False
        first_slice = series_files is None or job.first_row not in written_rows
        if first_slice:  # a series row describes its first slice
            for column, value in (outcome.written or {}).items():
                written[column][positions] = value
            written_rows.add(job.first_row)
        if series_files is not None and outcome.audit["burned_in_action"] == "blanked":
            redo.add(job.first_row)
        for position in positions if outcome.frames and series_files is None else ():
            frame = index["frame_index"].iat[position]
            images[position] = outcome.frames[0 if pd.isna(frame) else int(frame)]

    if series_files is None:
        for positions in rows_of.values():
            if int(positions[0]) in failures:
                keep[positions] = False
    else:
        keys = series_keys(index, series_files, settings.secret)
        for row in sorted(redo):
            if keep[row] and row not in failures:
                try:
                    images[row] = _volume_of(settings.dicom_dir, keys[row], volume, fill_gaps)
                except Exception as err:  # noqa: BLE001  one series' failure is its own
                    failures[row] = ("deid_failed", "the volume could not be redone from the series' "
                                     f"blanked slices ({type(err).__name__})")
        keep[list(failures)] = False
        audit = _series_audit(audit, audit_rows, keep, failures)
        for row in np.flatnonzero(~keep):  # a series is whole or absent
            shutil.rmtree(settings.dicom_dir / keys[row], ignore_errors=True)
    kept = index.assign(**{column: pd.array(values, dtype="string")
                           for column, values in written.items()})[keep]
    quarantine = pd.DataFrame([(row, reason, quoted(detail)) for row, (reason, detail)
                               in sorted(failures.items())], columns=list(QUARANTINE_COLUMNS))
    return Deidentified(pd.DataFrame(audit, columns=list(AUDIT_COLUMNS)), identifiers,
                        kept.reset_index(drop=True), images[keep], quarantine, hidden)


def _slice_jobs(index: pd.DataFrame, series_files: pd.DataFrame, secret: bytes,
                failures: dict[int, tuple[str, str]]) -> list[FileJob]:
    """One job per slice file of each series row, in the series' geometric order, written to the
    series' folder. A series with a slice without SOP Instance UID, or two slices with one, goes
    to ``failures`` instead: its slices would not have one file each."""
    keys = series_keys(index, series_files, secret)
    slices_of = series_files.groupby("row_key", sort=False).indices
    jobs = []
    for row, (row_key, key) in enumerate(zip(index["row_key"], keys)):
        slices = series_files.iloc[slices_of[row_key]]
        uids = [str(uid or "").strip() for uid in slices["sop_instance_uid"]]
        if not all(uids):
            failures[row] = ("no_sop_instance_uid", "a slice's (0008,0018) SOP Instance UID is empty: "
                             "it has no identity to key its file by")
        elif len(set(uids)) < len(uids):
            failures[row] = ("duplicate_sop_instance_uid", "two slices of the series carry one (0008,0018) "
                             "SOP Instance UID: they cannot have a file each")
        else:
            jobs.extend(FileJob(source, row, uid, key) for source, uid in zip(slices["source_path"], uids))
    return jobs


def _volume_of(dicom_dir: Path, key: str, volume: VolumeSettings | None, fill_gaps: bool) -> np.ndarray:
    """The (d, h, w, 1) volume of the de-identified slices in ``dicom_dir/key``, assembled as
    ingest assembles a series (:func:`~dicomflow.dicom.series.read_volume`)."""
    if volume is None:
        raise ValueError("a series' volume is redone from its slices only with the ingest volume settings")
    headers = [read_slice_header(path, data_dir=dicom_dir, max_bytes=volume.max_bytes)
               for path in sorted((dicom_dir / key).glob("*.dcm"))]
    groups, set_aside = group_series(headers)
    if len(groups) != 1 or set_aside:
        raise ValueError(f"the blanked slices form {len(groups)} series and {len(set_aside)} files set aside")
    return read_volume(groups[0], data_dir=dicom_dir, settings=volume, fill_gaps=fill_gaps).pixels[..., None]


def _series_audit(audit: list[dict], rows: list[int], keep: np.ndarray,
                  failures: dict[int, tuple[str, str]]) -> list[dict]:
    """The audit rows of the slices of series that are kept or left out for burned-in text; the
    slices of a quarantined series wrote no file, as a quarantined file writes none. A slice
    written and then removed because another slice left its series out says so."""
    kept = []
    for entry, row in zip(audit, rows):
        if row in failures:
            continue
        if not keep[row] and not entry["burned_in_action"].startswith("excluded"):
            entry = {**entry, "burned_in_action": "excluded: with its series"}
        kept.append(entry)
    return kept


def _worker_failure(_job: object, failure: WorkFailure) -> tuple[str, str]:
    """(reason, detail) of a file whose worker died, overran its time or raised."""
    if failure.reason == "worker_died":
        return failure.reason, f"the de-identifying process {failure.detail} on this file"
    return failure.reason, failure.detail


def _jobs(index: pd.DataFrame, rows_of: dict, failures: dict[int, tuple[str, str]]) -> list[FileJob]:
    """One job per source file. A file without SOP Instance UID goes to ``failures`` instead,
    and so do the files that share a UID: identical copies after the first in index order;
    every one of them when they differ, since nothing says which is the object the UID names (a
    corrupted or forged file could replace a good one)."""
    first_rows = {source: int(rows[0]) for source, rows in rows_of.items()}
    uids = {source: str(index["sop_instance_uid"].iat[row] or "").strip() for source, row in first_rows.items()}
    sharing: dict[str, list[int]] = {}
    for source, uid in uids.items():
        sharing.setdefault(uid, []).append(first_rows[source])
    jobs = []
    for source, row in first_rows.items():
        uid, rows = uids[source], sharing[uids[source]]
        contents = {index["sha256"].iat[other] for other in rows}
        if not uid:
            failures[row] = ("no_sop_instance_uid", "(0008,0018) SOP Instance UID is empty: the "
                             "file has no identity to key its image by")
        elif len(contents) > 1:
            others = ", ".join(str(other) for other in rows if other != row)
            failures[row] = ("conflicting_sop_instance_uid", "other files carry this (0008,0018) SOP "
                             f"Instance UID with different content (index rows {others}): none is kept")
        elif row != rows[0]:
            failures[row] = ("duplicate_sop_instance_uid", "an identical copy of the file at index "
                             f"row {rows[0]}, which is kept")
        else:
            jobs.append(FileJob(source, row, uid))
    return jobs


def summarise(audit: pd.DataFrame, quarantine: pd.DataFrame) -> dict[str, int]:
    """Flat metrics from the audit table (files, actions by code) and the quarantine (files left
    out, by reason), logged as one line."""
    totals = {key: int(audit[key].sum()) for key in COUNT_KEYS}
    metrics = {"n_files": audit["image_key"].nunique(),
               **{f"actions_{key}" if key in ACTIONS else key: n for key, n in totals.items()},
               "text_regions_read": int(audit["text_regions"].sum()),
               "text_regions_blanked": int(audit["text_blanked"].sum()),
               "text_regions_kept": int(audit["text_kept"].sum()),
               "images_with_identifying_text": int((audit["text_blanked"] > 0).sum()),
               "pixels_not_read": int(audit["burned_in"].str.startswith("pixels not read").sum()),
               "burned_in_excluded": int(audit["burned_in_action"].str.startswith("excluded").sum()),
               "burned_in_blanked": int((audit["burned_in_action"] == "blanked").sum()),
               "quarantined": len(quarantine),
               **{f"quarantined_{reason}": int(count) for reason, count
                  in sorted(quarantine["reason"].value_counts().items())}}
    logger.info("de-identified %s files: %s elements removed (X), %s replaced by dummies (D), "
                "%s emptied (Z), %s UIDs replaced (U), %s cleaned (C), %s kept (K), %s private "
                "and %s overlay/curve elements removed; burned-in text: %s regions read, %s files "
                "showed identifying text (%s regions blanked, %s kept), %s files blanked, %s excluded, "
                "%s files' pixels could not be read (header rules applied)", *(f"{metrics[key]:,}" for key in (
                    "n_files", "actions_X", "actions_D", "actions_Z", "actions_U", "actions_C",
                    "actions_K", "private_removed", "overlay_removed", "text_regions_read",
                    "images_with_identifying_text", "text_regions_blanked", "text_regions_kept",
                    "burned_in_blanked", "burned_in_excluded", "pixels_not_read")))
    return metrics
