"""De-identifying the files of an ingest index: the per-file work in worker processes, the
quarantine of files that cannot be de-identified, the audit and the manifest of keys.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from dicomflow.config import layout
from dicomflow.config.params import DeidentifyParams
from dicomflow.deid.identifiers import (
    Identifiers,
    collect_identifiers,
    describe_tag,
    project_words,
)
from dicomflow.deid.leaks import (
    find_leaks,
    identifiers_from_index,
    leaks_in_file,
    leaks_in_values,
    summarise_leaks,
)
from dicomflow.deid.profile import (
    ACTIONS,
    COUNT_KEYS,
    PSEUDONYM_LENGTH,
    TOP_CODED_AGE_YEARS,
    DeidOptions,
    ElementError,
    Profile,
    age_in_years,
    deidentify_dataset,
    keyed_hex,
)
from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.dicom.reading import Quarantined, quoted
from dicomflow.runtime.log_privacy import hidden_pydicom_messages
from dicomflow.runtime.outputs import out_of_space
from dicomflow.runtime.parallel import WorkFailure, ordered_map
from dicomflow.errors import DataError

logger = logging.getLogger(__name__)

SECRET_ENV = "DICOMFLOW_SECRET"
SECRET_FILE_ENV = "DICOMFLOW_SECRET_FILE"
DEMO_SECRET = b"dicomflow demo secret: for the embedded sample data only, never for real data"
IMAGE_KEY_LENGTH = 16  # hex characters of image_key; patient_key and study_key have 12
AUDIT_COLUMNS = ("image_key", *COUNT_KEYS, "options", "burned_in", "burned_in_action")
# Files left out; ``index_row`` is the file's first row in the ingest index (its path holds PHI).
QUARANTINE_COLUMNS = ("index_row", "reason", "detail")
SEXES = ("M", "F", "O")
# Manifest columns read from the header: the manifest takes them as written to the de-identified
# file (a value holding an identifier is replaced there), never from ingest's index.
WRITTEN_COLUMNS = {"modality": "Modality", "manufacturer": "Manufacturer",
                   "body_part": "BodyPartExamined", "view_position": "ViewPosition",
                   "photometric": "PhotometricInterpretation"}


def read_secret(environ: Mapping[str, str]) -> tuple[bytes, bool]:
    """The HMAC key and whether it is the demo one.

    ``DICOMFLOW_SECRET`` wins over ``DICOMFLOW_SECRET_FILE`` (whose content is stripped of
    surrounding whitespace). Raises DataError when either is set but empty or unreadable.
    """
    if SECRET_ENV in environ:
        if not environ[SECRET_ENV]:
            raise DataError(f"{SECRET_ENV} is set but empty; unset it or give a secret")
        return environ[SECRET_ENV].encode(), False
    if SECRET_FILE_ENV in environ:
        path = Path(environ[SECRET_FILE_ENV])
        try:
            secret = path.read_bytes().strip()
        except OSError as err:
            raise DataError(
                f"{SECRET_FILE_ENV}={path}: cannot read the file ({err.strerror})") from err
        if not secret:
            raise DataError(f"{SECRET_FILE_ENV}={path}: the file is empty")
        return secret, False
    return DEMO_SECRET, True


def check_inputs(index: pd.DataFrame, images: np.ndarray) -> None:
    """Raise DataError unless the index has its columns and one image per row."""
    missing = [c for c in layout.INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{layout.INGEST_INDEX}: missing column(s) {', '.join(missing)}")
    if images.ndim not in (3, 4) or images.dtype not in (np.uint8, np.float16) or len(images) != len(index):
        raise DataError(f"{layout.IMAGES}: expected uint8 or float16 of shape ({len(index)}, size, size[, 3]) "
                         f"for {len(index)} index rows; got {images.dtype} {images.shape}")


def image_identity(sop_uid: str, number_of_frames: object, frame_index: object) -> str:
    """What an image key hashes: the SOP Instance UID, plus the frame for a multi-frame object."""
    if pd.isna(number_of_frames) or int(number_of_frames) <= 1:
        return sop_uid
    return f"{sop_uid}#{int(frame_index)}"


def build_manifest(index: pd.DataFrame, images: np.ndarray, *, secret: bytes,
                   retain_patient_characteristics: bool) -> pd.DataFrame:
    """The de-identified manifest.

    Parameters
    ----------
    index : DataFrame
        The ingest index (``layout.INDEX_COLUMNS``, PHI included).
    images : ndarray
        (n, size, size[, 3]) uint8 or float16, row i <-> index row i.
    secret : bytes
        HMAC key of the keys.
    retain_patient_characteristics : bool
        Keep ``patient_sex`` (M, F or O) and ``patient_age_years`` (top-coded at 90); else null.

    Returns
    -------
    DataFrame
        ``layout.MANIFEST_COLUMNS`` in index order. Keys are keyed hashes (:func:`keyed_hex`):
        ``image_key`` of (0008,0018) SOP Instance UID (16 hex; of the UID and the frame number
        for an image taken from a multi-frame object), ``patient_key`` of (0010,0020)
        Patient ID (12 hex, also the Patient ID of the de-identified files) and ``study_key`` of
        (0020,000D) Study Instance UID (12 hex). ``pixel_sha256`` hashes each row of ``images``.
    """
    def key(value: object, length: int = PSEUDONYM_LENGTH) -> str | None:
        return keyed_hex(secret, value, length) if isinstance(value, str) and value else None

    image_keys = [key(image_identity(uid, frames, frame), IMAGE_KEY_LENGTH) for uid, frames, frame
                  in zip(index["sop_instance_uid"], index["number_of_frames"], index["frame_index"])]
    manifest = index[[c for c in layout.MANIFEST_COLUMNS if c in index.columns]].copy()
    manifest["image_key"] = image_keys
    manifest["patient_key"] = [key(value) for value in index["patient_id"]]
    manifest["study_key"] = [key(value) for value in index["study_instance_uid"]]
    sexes = [s if s in SEXES else None for s in index["patient_sex"]]
    ages = [age_in_years(a) if isinstance(a, str) else None for a in index["patient_age"]]
    ages = [None if a is None else min(a, TOP_CODED_AGE_YEARS) for a in ages]
    if not retain_patient_characteristics:
        sexes, ages = [None] * len(index), [None] * len(index)
    manifest["patient_sex"] = pd.array(sexes, dtype="string")
    manifest["patient_age_years"] = pd.array(ages, dtype="Int64")
    manifest["pixel_sha256"] = [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest()
                                for im in images]
    manifest["dicom_file"] = [f"{layout.DEID_DICOM_DIR}/{key(uid, IMAGE_KEY_LENGTH)}.dcm"
                              for uid in index["sop_instance_uid"]]
    return manifest[list(layout.MANIFEST_COLUMNS)].reset_index(drop=True)


def deid_options(params: DeidentifyParams) -> DeidOptions:
    """The profile options that ``deidentify.*`` params choose."""
    return DeidOptions(
        remove_private_tags=params.remove_private_tags,
        retain_patient_characteristics=params.retain_patient_characteristics,
        retain_longitudinal_dates=params.retain_longitudinal_dates,
        clean_descriptors=params.clean_descriptors,
        retain_device_identity=params.retain_device_identity,
        max_date_shift_days=params.max_date_shift_days)


def burned_in_risk(ds: pydicom.Dataset, params: DeidentifyParams) -> str:
    """Why ``ds`` may show identifying text in its pixels ("" when no rule applies).

    The reason names the rule (the flag, or the listed modality, image type or manufacturer that
    matched), never a value that could identify a patient.
    """
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "BurnedInAnnotation YES"
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality and modality in {m.upper() for m in params.burned_in_modalities or []}:
        return f"modality {modality}"
    image_type = {str(v).strip().upper() for v in (ds.get("ImageType") or [])}
    for listed in params.burned_in_image_types or []:
        if listed.upper() in image_type:
            return f"image type {listed.upper()}"
    manufacturer = str(ds.get("Manufacturer", "")).strip().casefold()
    for listed in params.burned_in_manufacturers or []:
        if listed.casefold() == manufacturer:
            return f"manufacturer {listed}"
    return ""


def blank_regions(ds: pydicom.Dataset, regions: list[list[float]]) -> None:
    """Set each region ([top, left, bottom, right] as fractions of rows and columns) of every
    frame to the image's lowest stored value, in place; the pixel data is stored uncompressed."""
    pixels = ds.pixel_array.copy()
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
    for top, left, bottom, right in regions:
        r0, r1 = int(np.floor(top * rows)), int(np.ceil(bottom * rows))
        c0, c1 = int(np.floor(left * cols)), int(np.ceil(right * cols))
        frames[:, r0:r1, c0:c1] = pixels.min()
    photometric = ds.PhotometricInterpretation
    if photometric.startswith("YBR"):  # pixel_array converted it to RGB
        photometric = "RGB"
    ds.set_pixel_data(pixels, photometric, int(ds.BitsStored))


@dataclass(frozen=True)
class FileSettings:
    """What de-identifying one file needs besides the file (pickled with each chunk of work)."""

    data_dir: Path
    dicom_dir: Path
    profile: Profile
    secret: bytes
    params: DeidentifyParams
    pixels: PixelSettings


@dataclass(frozen=True)
class FileOutcome:
    """One source file done: its audit row, whether it was left out, its images redone after
    blanking (frame index -> pixels), the pydicom warnings hidden and the values of
    :data:`WRITTEN_COLUMNS` as written (the manifest's, so the two never differ); or, for a file
    that could not be de-identified, ``failure``: (reason code, detail free of values)."""

    audit: dict | None
    excluded: bool = False
    frames: dict[int, np.ndarray] | None = None
    hidden_warnings: int = 0
    written: dict[str, str | None] | None = None
    failure: tuple[str, str] | None = None


_known = Identifiers()  # every source's identifying values, set once per worker by share_identifiers


def share_identifiers(identifiers: Identifiers) -> None:
    """Give this process the identifying values of all the sources (a process pool initializer:
    sent once per worker, not with every chunk of files)."""
    global _known
    _known = identifiers


def source_identifiers(job: tuple[str, int, str], settings: FileSettings) -> Identifiers | tuple[str, str]:
    """The identifying values of one source file's header (the first of the two passes), or
    (reason, detail) when the file cannot be read again."""
    try:
        with hidden_pydicom_messages():
            return collect_identifiers(_read_source(job, settings, header_only=True),
                                       device_identity_kept=settings.params.retain_device_identity)
    except Quarantined as err:
        return err.reason, str(err)
    except RecursionError:
        return "too_deep", "sequences nest deeper than the header's values can be read (RecursionError)"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  the message can quote a value: its type only
        return "unreadable_source", f"reading the header's values failed ({type(err).__name__})"


def _read_source(job: tuple[str, int, str], settings: FileSettings, *,
                 header_only: bool = False) -> pydicom.Dataset:
    """The source file of ``job``, read as ingest read it, or raise Quarantined (never quoting the
    path, which holds an accession number, or pydicom's message, which can quote values)."""
    source, _, sop_uid = job
    try:
        ds = pydicom.dcmread(settings.data_dir / source, force=True, stop_before_pixels=header_only)
    except Exception as err:  # noqa: BLE001  pydicom raises many types
        raise Quarantined("unreadable_source", "the source file cannot be read again "
                          f"({type(err).__name__}); re-run ingest") from None
    if str(ds.get("SOPInstanceUID", "")) != sop_uid:
        raise Quarantined("source_changed", "the source file's (0008,0018) SOP Instance UID "
                          "differs from the index: it changed since ingest; re-run ingest")
    return ds


def deidentify_file(job: tuple[str, int, str], settings: FileSettings) -> FileOutcome:
    """De-identify one source file (``job``: path under ``data_dir``, its first index row, its
    SOP Instance UID) into ``dicom_dir/<key>.dcm``, or leave it out for burned-in text; never
    raises. Kept text is checked against the identifying values of every source
    (:func:`share_identifiers`), so a manufacturer field typed with another patient's or the
    hospital's name is replaced here rather than found by the leak check.

    A file that cannot be read, de-identified or written gets ``failure`` (:func:`failure_of`),
    and nothing of it is left in ``dicom_dir``.
    """
    output = settings.dicom_dir / f"{keyed_hex(settings.secret, job[2], IMAGE_KEY_LENGTH)}.dcm"
    try:
        return _deidentify_file(job, settings, output)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  one file's failure is its own
        output.unlink(missing_ok=True)
        return FileOutcome(None, failure=failure_of(err))


def failure_of(err: BaseException) -> tuple[str, str]:
    """(reason, detail) of a file that could not be de-identified; the detail names the error
    type and the attribute, never a value."""
    if isinstance(err, Quarantined):
        return err.reason, str(err)
    if isinstance(err, ElementError):
        return ("too_deep" if err.error == "RecursionError" else "deid_failed"), str(err)
    if isinstance(err, WriteError):
        return "write_failed", str(err)
    if isinstance(err, LeakFound):
        return "leak_found", f"identifying values left after the profile (where, and what kind): {err}"
    if isinstance(err, RecursionError):
        return "too_deep", "sequences nest deeper than the profile can follow (RecursionError)"
    if cause := out_of_space(err):
        return "no_space", cause.strerror or type(cause).__name__
    return "deid_failed", f"{type(err).__name__} while de-identifying the file"


class LeakFound(Exception):
    """The written file (or its manifest values) still holds an identifying value of a source."""

    def __init__(self, leaks: list) -> None:
        super().__init__("; ".join(summarise_leaks(leaks)))


class WriteError(Exception):
    """The de-identified data set could not be encoded: the first attribute that fails, by tag."""


def _write(ds: pydicom.Dataset, path: Path) -> None:
    """``ds.save_as(path)``, or WriteError naming the first top-level attribute pydicom cannot
    encode (found by encoding each alone, only once the file as a whole has failed)."""
    try:
        ds.save_as(path, enforce_file_format=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001  pydicom's message can quote the value
        path.unlink(missing_ok=True)
        raise WriteError(f"{type(err).__name__} writing {_unwritable(ds) or 'the file'}") from None


def _unwritable(ds: pydicom.Dataset) -> str:
    """The first top-level element of ``ds`` that pydicom fails to encode, as a tag and name."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    syntax = pydicom.uid.UID(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian))
    for elem in ds:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
        try:
            write_data_element(buffer, elem)
        except Exception:  # noqa: BLE001  this is the one
            return describe_tag(elem.tag)
    return ""


def _deidentify_file(job: tuple[str, int, str], settings: FileSettings, output: Path) -> FileOutcome:
    params = settings.params
    with hidden_pydicom_messages() as hidden:
        ds = _read_source(job, settings)
        risk, decision, frames = burned_in_risk(ds, params), "", None
        if risk and params.burned_in_action == "blank":
            try:
                blank_regions(ds, params.burned_in_regions)
                frames = {frame.index: frame.pixels
                          for frame in read_image(_as_file(ds), settings.pixels)[1]}
                decision = "blanked"
            except Exception as err:  # a file whose pixels cannot be rewritten is left out
                decision = f"excluded: blanking failed ({type(err).__name__})"
        elif risk:
            decision = "excluded"
        counts, written = dict.fromkeys(COUNT_KEYS, 0), None
        excluded = decision.startswith("excluded")
        if not excluded:
            # The dataset was read for this alone: de-identified in place, not copied.
            ds, counts = deidentify_dataset(ds, profile=settings.profile, secret=settings.secret,
                                            options=deid_options(params), in_place=True,
                                            identifiers=_known)
            _write(ds, output)
            written = {column: str(ds.get(keyword, "") or "") for column, keyword in WRITTEN_COLUMNS.items()}
            written["manufacturer"] = written["manufacturer"] or None
            # The leak check of this file, read back, and of what the manifest takes from it.
            leaks = (leaks_in_file(_known, output, output=output.name)
                     + leaks_in_values(_known, layout.DEID_MANIFEST, written))
            if leaks:
                raise LeakFound(leaks)
    audit = {"image_key": output.stem, **counts, "options": option_names(params), "burned_in": risk,
             "burned_in_action": decision}
    return FileOutcome(audit, excluded, frames, len(hidden), written)


def option_names(params: DeidentifyParams) -> str:
    """The audit's ``options`` cell: the profile and the options in use, by name."""
    options = deid_options(params)
    return ";".join(
        ["basic_profile"]
        + [name for name in ("retain_patient_characteristics", "retain_longitudinal_dates",
                             "clean_descriptors", "retain_device_identity") if getattr(options, name)]
        + ["remove_private_tags" if params.remove_private_tags else "keep_private_tags"])


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
                       workers: int = 1, timeout_s: float | None = None,
                       progress: Callable[[Iterable, int, str], Iterable] | None = None) -> Deidentified:
    """De-identify each source file of the index (:func:`deidentify_file`), once per file, in
    ``workers`` processes, after a first pass that collects the identifying values of every
    source header (:func:`source_identifiers`).

    A file's ``key`` is the keyed hash of its SOP Instance UID: the ``image_key`` of a
    single-frame image, shared by every image of a multi-frame object. Files at risk of burned-in
    text (:func:`burned_in_risk`) are left out or have ``params.burned_in_regions`` blanked, their
    images then redone from the blanked file with the ingest settings ``settings.pixels``.

    One file never stops the others: a file without SOP Instance UID, a second file with the
    UID of an earlier one (the first in index order is kept), a file that cannot be read,
    de-identified or written, or whose worker dies or takes longer than ``timeout_s`` seconds,
    is quarantined with its reason. A full disk raises DataError. ``progress(results, total,
    what)``, if given, wraps each pass's stream of results (a progress bar).
    """
    progress = progress or (lambda results, _total, _what: results)
    identifiers = identifiers_from_index(index)
    keep = np.ones(len(index), dtype=bool)
    images = images.copy()
    written = {column: index[column].astype(object).to_numpy(copy=True) for column in WRITTEN_COLUMNS}
    rows_of = index.groupby("source_path", sort=False).indices
    failures: dict[int, tuple[str, str]] = {}
    jobs = _jobs(index, rows_of, failures)

    def worker_failure(_job: object, failure: WorkFailure) -> tuple[str, str]:
        return failure.reason, f"the de-identifying process {failure.detail} on this file" \
            if failure.reason == "worker_died" else failure.detail

    readable = []
    found_in_headers = ordered_map(partial(source_identifiers, settings=settings), jobs,
                                   workers=workers, timeout_s=timeout_s, on_failure=worker_failure)
    for found, job in zip(progress(found_in_headers, len(jobs), "headers"), jobs):  # bar first: it ends
        if isinstance(found, Identifiers):
            identifiers.update(found)
            readable.append(job)
        else:
            failures[job[1]] = found
    project_words()  # read once here: the forked workers inherit it
    audit, hidden = [], 0
    outcomes = ordered_map(partial(deidentify_file, settings=settings), readable, workers=workers,
                           timeout_s=timeout_s, initializer=share_identifiers,
                           initargs=(identifiers,),
                           on_failure=lambda job, why: FileOutcome(None, failure=worker_failure(job, why)))
    for outcome, job in zip(progress(outcomes, len(readable), "deidentify"), readable):
        positions = rows_of[job[0]]
        if outcome.failure is not None:
            if outcome.failure[0] == "no_space":
                raise DataError(f"{outcome.failure[1]} while writing the de-identified files to "
                                 f"{os.path.relpath(settings.dicom_dir)}: nothing half-written is left; free some "
                                 "space and re-run")
            failures[job[1]] = outcome.failure
            continue
        audit.append(outcome.audit)
        hidden += outcome.hidden_warnings
        if outcome.excluded:
            keep[positions] = False
        for column, value in (outcome.written or {}).items():
            written[column][positions] = value
        for position in positions if outcome.frames else ():
            frame = index["frame_index"].iat[position]
            images[position] = outcome.frames[0 if pd.isna(frame) else int(frame)]
    for source, positions in rows_of.items():
        if int(positions[0]) in failures:
            keep[positions] = False
    kept = index.assign(**{column: pd.array(values, dtype="string")
                           for column, values in written.items()})[keep]
    quarantine = pd.DataFrame([(row, reason, quoted(detail)) for row, (reason, detail)
                               in sorted(failures.items())], columns=list(QUARANTINE_COLUMNS))
    return Deidentified(pd.DataFrame(audit, columns=list(AUDIT_COLUMNS)), identifiers,
                        kept.reset_index(drop=True), images[keep], quarantine, hidden)


def _jobs(index: pd.DataFrame, rows_of: dict, failures: dict[int, tuple[str, str]]) -> list[tuple[str, int, str]]:
    """One job per source file: (path, first index row, SOP Instance UID). A file without SOP
    Instance UID goes to ``failures`` instead, and so do the files that share a UID: identical
    copies after the first in index order; every one of them when they differ, since nothing
    says which is the object the UID names (a corrupted or forged file could replace a good one)."""
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
            jobs.append((source, row, uid))
    return jobs


def _as_file(ds: pydicom.Dataset) -> io.BytesIO:
    """``ds`` written to memory, to be read back as ingest reads a file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def summarise(audit: pd.DataFrame, quarantine: pd.DataFrame) -> dict[str, int]:
    """Flat metrics from the audit table (files, actions by code) and the quarantine (files left
    out, by reason), logged as one line."""
    totals = {key: int(audit[key].sum()) for key in COUNT_KEYS}
    metrics = {"n_files": audit["image_key"].nunique(),
               **{f"actions_{key}" if key in ACTIONS else key: n for key, n in totals.items()},
               "burned_in_excluded": int(audit["burned_in_action"].str.startswith("excluded").sum()),
               "burned_in_blanked": int((audit["burned_in_action"] == "blanked").sum()),
               "quarantined": len(quarantine),
               **{f"quarantined_{reason}": int(count) for reason, count
                  in sorted(quarantine["reason"].value_counts().items())}}
    logger.info("de-identified %s files: %s elements removed (X), %s replaced by dummies (D), "
                "%s emptied (Z), %s UIDs replaced (U), %s cleaned (C), %s kept (K), %s private "
                "and %s overlay/curve elements removed; burned-in text risk: %s files excluded, "
                "%s blanked", *(f"{metrics[key]:,}" for key in (
                    "n_files", "actions_X", "actions_D", "actions_Z", "actions_U", "actions_C",
                    "actions_K", "private_removed", "overlay_removed", "burned_in_excluded",
                    "burned_in_blanked")))
    return metrics


def check_outputs(identifiers: Identifiers, *, out_dir: Path) -> None:
    """Leak check of the output tables (each DICOM file was searched as it was written, and
    quarantined on a hit: :func:`deidentify_file`); on any hit delete the outputs and raise
    DataError naming every column involved and in how many tables (never a value)."""
    tables = {layout.DEID_MANIFEST: pd.read_parquet(out_dir / layout.DEID_MANIFEST),
              layout.DEID_AUDIT: pd.read_csv(out_dir / layout.DEID_AUDIT, dtype=str),
              layout.DEID_QUARANTINE: pd.read_csv(out_dir / layout.DEID_QUARANTINE, dtype=str)}
    leaks = find_leaks(identifiers, dicom_dir=None, tables=tables)
    if leaks:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise DataError(
            f"leak check: {len(leaks)} identifying value(s) found in the outputs, outputs deleted. "
            "Where, and what kind of value (never the value): " + "; ".join(summarise_leaks(leaks))
            + ". A kept attribute held a value that identifies someone: see the README, "
            "'When the leak check fails'")
    logger.info("leak check: none of %s identifying values found in the DICOM files and %d tables",
                f"{len(identifiers):,}", len(tables))
