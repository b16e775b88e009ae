"""Stage 2, deidentify: the PS3.15 Basic Profile on every ingested file, and a PHI-free manifest.

Inputs: ``paths.ingest_dir``/index.parquet and images.npy (row i <-> image i), and the raw DICOM
files under ``paths.data`` (``source_path`` in the index is relative to it).
Outputs (``paths.deid_dir``): ``dicom/<image_key>.dcm`` (de-identified headers, original pixel data
and transfer syntax, or blanked regions decoded), ``manifest.parquet`` (``layout.MANIFEST_COLUMNS``,
index order), ``images.npy`` and ``audit.csv`` (actions, options and the burned-in decision per
file); counts to ``paths.deid_metrics``. Images at risk of burned-in text (``BurnedInAnnotation``
YES, or a modality, image type or manufacturer listed in params) are excluded, or have the
configured regions blanked in the DICOM file and in ``images.npy``.
Params: ``deidentify.*`` (private tags, the PS3.15 options, burned-in text rules); the ``ingest``
pixel params, to redo the images of files whose burned-in regions are blanked.
Secret: ``DICOMFLOW_SECRET``, or the file named by ``DICOMFLOW_SECRET_FILE``; without either the
demo secret :data:`DEMO_SECRET` is used (with a warning): fine for the embedded sample only.

A first pass reads every source header for its identifying values (:func:`source_identifiers`);
the second de-identifies each file, replacing any kept text (manufacturer, codes, what an option
keeps) that holds one of them, whichever file it came from. Nothing downstream reads ``data/`` or
the ingest index again, so before the outputs are moved into place every identifying value of the
sources is searched in them (:func:`find_leaks`): the safety net, which real exports do not trip;
any hit deletes them and fails the stage, listing every attribute involved. Logs and errors carry counts, tags and row numbers, never PHI
(not even source paths, which hold accession numbers).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from stages import layout
from stages.cli import StageError, run_stage
from stages.deid_leaks import find_leaks, identifiers_from_index, summarise_leaks
from stages.deid_profile import (ACTIONS, COUNT_KEYS, PSEUDONYM_LENGTH, TOP_CODED_AGE_YEARS,
                                 DeidOptions, Profile, age_in_years, deidentify_dataset, keyed_hex,
                                 load_profile)
from stages.identifiers import Identifiers, collect_identifiers, project_words
from stages.ingest import PixelSettings, read_image
from stages.log_privacy import hidden_pydicom_messages
from stages.parallel import ordered_map, worker_count
from stages.params import DeidentifyParams, load_params

logger = logging.getLogger(__name__)

SECRET_ENV = "DICOMFLOW_SECRET"
SECRET_FILE_ENV = "DICOMFLOW_SECRET_FILE"
DEMO_SECRET = b"dicomflow demo secret: for the embedded sample data only, never for real data"
IMAGE_KEY_LENGTH = 16  # hex characters of image_key; patient_key and study_key have 12
AUDIT_COLUMNS = ("image_key", *COUNT_KEYS, "options", "burned_in", "burned_in_action")
SEXES = ("M", "F", "O")


def read_secret(environ: Mapping[str, str]) -> tuple[bytes, bool]:
    """The HMAC key and whether it is the demo one.

    ``DICOMFLOW_SECRET`` wins over ``DICOMFLOW_SECRET_FILE`` (whose content is stripped of
    surrounding whitespace). Raises StageError when either is set but empty or unreadable.
    """
    if SECRET_ENV in environ:
        if not environ[SECRET_ENV]:
            raise StageError(f"{SECRET_ENV} is set but empty; unset it or give a secret")
        return environ[SECRET_ENV].encode(), False
    if SECRET_FILE_ENV in environ:
        path = Path(environ[SECRET_FILE_ENV])
        try:
            secret = path.read_bytes().strip()
        except OSError as err:
            raise StageError(
                f"{SECRET_FILE_ENV}={path}: cannot read the file ({err.strerror})") from err
        if not secret:
            raise StageError(f"{SECRET_FILE_ENV}={path}: the file is empty")
        return secret, False
    return DEMO_SECRET, True


def check_inputs(index: pd.DataFrame, images: np.ndarray) -> None:
    """Raise StageError unless the index has its columns, one image per row and every SOP UID."""
    missing = [c for c in layout.INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise StageError(f"{layout.INGEST_INDEX}: missing column(s) {', '.join(missing)}")
    if images.ndim not in (3, 4) or images.dtype not in (np.uint8, np.float16) or len(images) != len(index):
        raise StageError(f"{layout.IMAGES}: expected uint8 or float16 of shape ({len(index)}, size, size[, 3]) "
                         f"for {len(index)} index rows; got {images.dtype} {images.shape}")
    empty = np.flatnonzero(index["sop_instance_uid"].fillna("").astype(str).str.strip() == "")
    if len(empty):
        raise StageError(f"{layout.INGEST_INDEX}: {len(empty)} row(s) have no (0008,0018) SOP "
                         f"Instance UID, first row {empty[0]}; an image key needs it")


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
    """One source file done: its audit row, whether it was left out, its images redone after blanking (frame index -> pixels), the pydicom warnings hidden and
    the Manufacturer written (the manifest's, so the two never differ)."""

    audit: dict
    excluded: bool = False
    frames: dict[int, np.ndarray] | None = None
    hidden_warnings: int = 0
    manufacturer: str | None = None  # as written to the file: kept, or its pseudonym


_known = Identifiers()  # every source's identifying values, set once per worker by share_identifiers


def share_identifiers(identifiers: Identifiers) -> None:
    """Give this process the identifying values of all the sources (a process pool initializer:
    sent once per worker, not with every chunk of files)."""
    global _known
    _known = identifiers


def source_identifiers(job: tuple[str, int, str], settings: FileSettings) -> Identifiers:
    """The identifying values of one source file's header (the first of the two passes)."""
    with hidden_pydicom_messages():
        return collect_identifiers(_read_source(job, settings, header_only=True),
                                   device_identity_kept=settings.params.retain_device_identity)


def _read_source(job: tuple[str, int, str], settings: FileSettings, *,
                 header_only: bool = False) -> pydicom.Dataset:
    """The source file of ``job``, read as ingest read it; StageError naming the index row."""
    source, number, sop_uid = job
    try:
        ds = pydicom.dcmread(settings.data_dir / source, force=True, stop_before_pixels=header_only)
    except Exception as err:  # pydicom raises many types; its message may hold the path
        raise StageError(f"{layout.INGEST_INDEX} row {number}: source file unreadable "
                         f"({type(err).__name__}); re-run ingest") from None
    if str(ds.get("SOPInstanceUID", "")) != sop_uid:
        raise StageError(f"{layout.INGEST_INDEX} row {number}: the source file's (0008,0018) "
                         "SOP Instance UID differs from the index; re-run ingest")
    return ds


def deidentify_file(job: tuple[str, int, str], settings: FileSettings) -> FileOutcome:
    """De-identify one source file (``job``: path under ``data_dir``, its first index row, its
    SOP Instance UID) into ``dicom_dir/<key>.dcm``, or leave it out for burned-in text. Kept text
    is checked against the identifying values of every source (:func:`share_identifiers`), so a
    manufacturer field typed with another patient's or the hospital's name is replaced here
    rather than found by the leak check."""
    source, number, sop_uid = job
    params = settings.params
    with hidden_pydicom_messages() as hidden:
        ds = _read_source(job, settings)
        image_key = keyed_hex(settings.secret, sop_uid, IMAGE_KEY_LENGTH)
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
        counts, manufacturer = dict.fromkeys(COUNT_KEYS, 0), None
        excluded = decision.startswith("excluded")
        if not excluded:
            # The dataset was read for this alone: de-identified in place, not copied.
            ds, counts = deidentify_dataset(ds, profile=settings.profile, secret=settings.secret,
                                            options=deid_options(params), in_place=True,
                                            identifiers=_known)
            ds.save_as(settings.dicom_dir / f"{image_key}.dcm", enforce_file_format=True)
            manufacturer = str(ds.get("Manufacturer", "") or "") or None
    audit = {"image_key": image_key, **counts, "options": option_names(params), "burned_in": risk,
             "burned_in_action": decision}
    return FileOutcome(audit, excluded, frames, len(hidden), manufacturer)


def option_names(params: DeidentifyParams) -> str:
    """The audit's ``options`` cell: the profile and the options in use, by name."""
    options = deid_options(params)
    return ";".join(
        ["basic_profile"]
        + [name for name in ("retain_patient_characteristics", "retain_longitudinal_dates",
                             "clean_descriptors", "retain_device_identity") if getattr(options, name)]
        + ["remove_private_tags" if params.remove_private_tags else "keep_private_tags"])


def deidentify_sources(index: pd.DataFrame, images: np.ndarray, settings: FileSettings, *,
                       workers: int = 1,
                       ) -> tuple[pd.DataFrame, Identifiers, pd.DataFrame, np.ndarray, int]:
    """De-identify each source file of the index (:func:`deidentify_file`), once per file, in
    ``workers`` processes, after a first pass that collects the identifying values of every
    source header (:func:`source_identifiers`).

    A file's ``key`` is the keyed hash of its SOP Instance UID: the ``image_key`` of a
    single-frame image, shared by every image of a multi-frame object. Files at risk of burned-in
    text (:func:`burned_in_risk`) are left out or have ``params.burned_in_regions`` blanked, their
    images then redone from the blanked file with the ingest settings ``settings.pixels``.

    Returns
    -------
    (DataFrame, Identifiers, DataFrame, ndarray, int)
        The audit table (``AUDIT_COLUMNS``, one row per file, index order); the identifying values
        of the sources and the index (for :func:`find_leaks`); the index rows kept, their
        ``manufacturer`` as written to the files (a value holding the file's own identifier is
        replaced there); their images, blanked where the files were; the number of pydicom
        warnings hidden. Errors name the index row, not the path, which holds an accession number.
    """
    identifiers = identifiers_from_index(index)
    keep = np.ones(len(index), dtype=bool)
    images = images.copy()
    manufacturers = index["manufacturer"].astype(object).to_numpy(copy=True)
    rows_of = index.groupby("source_path", sort=False).indices
    jobs = [(source, int(rows[0]), index["sop_instance_uid"].iat[rows[0]])
            for source, rows in rows_of.items()]
    for found in ordered_map(partial(source_identifiers, settings=settings), jobs, workers=workers):
        identifiers.update(found)
    project_words()  # read once here: the forked workers inherit it
    audit, hidden = [], 0
    outcomes = ordered_map(partial(deidentify_file, settings=settings), jobs, workers=workers,
                           initializer=share_identifiers, initargs=(identifiers,))
    for positions, outcome in zip(rows_of.values(), outcomes):
        audit.append(outcome.audit)
        hidden += outcome.hidden_warnings
        if outcome.excluded:
            keep[positions] = False
        manufacturers[positions] = outcome.manufacturer
        for position in positions if outcome.frames else ():
            frame = index["frame_index"].iat[position]
            images[position] = outcome.frames[0 if pd.isna(frame) else int(frame)]
    kept = index.assign(manufacturer=pd.array(manufacturers, dtype="string"))[keep]
    return (pd.DataFrame(audit, columns=list(AUDIT_COLUMNS)), identifiers,
            kept.reset_index(drop=True), images[keep], hidden)


def _as_file(ds: pydicom.Dataset) -> io.BytesIO:
    """``ds`` written to memory, to be read back as ingest reads a file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def summarise(audit: pd.DataFrame) -> dict[str, int]:
    """Flat metrics from the audit table (files, actions by code), logged as one line."""
    totals = {key: int(audit[key].sum()) for key in COUNT_KEYS}
    metrics = {"n_files": audit["image_key"].nunique(),
               **{f"actions_{key}" if key in ACTIONS else key: n for key, n in totals.items()},
               "burned_in_excluded": int(audit["burned_in_action"].str.startswith("excluded").sum()),
               "burned_in_blanked": int((audit["burned_in_action"] == "blanked").sum())}
    logger.info("de-identified %s files: %s elements removed (X), %s replaced by dummies (D), "
                "%s emptied (Z), %s UIDs replaced (U), %s cleaned (C), %s kept (K), %s private "
                "and %s overlay/curve elements removed; burned-in text risk: %s files excluded, "
                "%s blanked", *(f"{metrics[key]:,}" for key in (
                    "n_files", "actions_X", "actions_D", "actions_Z", "actions_U", "actions_C",
                    "actions_K", "private_removed", "overlay_removed", "burned_in_excluded",
                    "burned_in_blanked")))
    if metrics["n_files"] < len(audit):
        logger.warning("%d index rows share a SOP Instance UID with another row, hence one file",
                       len(audit) - metrics["n_files"])
    return metrics


def check_outputs(identifiers: Identifiers, *, out_dir: Path) -> None:
    """Leak check of the written outputs; on any hit delete them and raise StageError naming every
    attribute involved and in how many outputs (never a value)."""
    tables = {layout.DEID_MANIFEST: pd.read_parquet(out_dir / layout.DEID_MANIFEST),
              layout.DEID_AUDIT: pd.read_csv(out_dir / layout.DEID_AUDIT, dtype=str)}
    leaks = find_leaks(identifiers, dicom_dir=out_dir / layout.DEID_DICOM_DIR, tables=tables)
    if leaks:
        shutil.rmtree(out_dir)
        raise StageError(
            f"leak check: {len(leaks)} identifying value(s) found in the outputs, outputs deleted. "
            "Where, and what kind of value (never the value): " + "; ".join(summarise_leaks(leaks))
            + ". A kept attribute held a value that identifies someone: see the README, "
            "'When the leak check fails'")
    logger.info("leak check: none of %s identifying values found in the DICOM files and %d tables",
                f"{len(identifiers):,}", len(tables))


def main() -> None:
    paths, params = load_params("paths"), load_params("deidentify")
    pixels = PixelSettings.from_params(load_params("ingest"))
    ingest_dir, out_dir = Path(paths.ingest_dir), Path(paths.deid_dir)
    secret, is_demo = read_secret(os.environ)
    if is_demo:
        logger.warning("neither %s nor %s is set: the demo secret is in use, fine for the embedded "
                       "sample, never for real data", SECRET_ENV, SECRET_FILE_ENV)
    if not params.remove_private_tags:
        logger.warning("deidentify.remove_private_tags is false: private tags are kept, which the "
                       "Basic Profile does not allow; the leak check still scans them")

    index = pd.read_parquet(ingest_dir / layout.INGEST_INDEX)
    images = np.load(ingest_dir / layout.IMAGES)
    check_inputs(index, images)
    profile = load_profile()
    logger.info("read %d index rows and images %s; profile of %d attributes", len(index),
                images.shape, len(profile))

    staging = out_dir.with_name(out_dir.name + ".partial")  # moved into place only when clean
    for stale in (out_dir, staging):
        shutil.rmtree(stale, ignore_errors=True)
    (staging / layout.DEID_DICOM_DIR).mkdir(parents=True)
    settings = FileSettings(Path(paths.data), staging / layout.DEID_DICOM_DIR, profile, secret,
                            params, pixels)
    audit, identifiers, index, images, hidden = deidentify_sources(
        index, images, settings, workers=worker_count(params.workers))
    if hidden:
        logger.warning("%d pydicom warnings about source headers not shown (they quote values)",
                       hidden)
    metrics = summarise(audit)
    build_manifest(index, images, secret=secret,
                   retain_patient_characteristics=params.retain_patient_characteristics,
                   ).to_parquet(staging / layout.DEID_MANIFEST, index=False)
    audit.to_csv(staging / layout.DEID_AUDIT, index=False)
    np.save(staging / layout.IMAGES, images)
    check_outputs(identifiers, out_dir=staging)

    staging.rename(out_dir)
    metrics.update(identifiers_checked=len(identifiers), leak_hits=0, demo_secret=int(is_demo))
    Path(paths.deid_metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(paths.deid_metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("wrote %d manifest rows, images %s and the audit to %s", len(index),
                images.shape, out_dir)


if __name__ == "__main__":
    run_stage(main)
