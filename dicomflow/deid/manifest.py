"""The de-identified manifest: one row per image (or series), keyed by pseudonyms, no identifying
value."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.deid.profile import PSEUDONYM_LENGTH, TOP_CODED_AGE_YEARS, age_in_years, keyed_hex

IMAGE_KEY_LENGTH = 16  # hex characters of image_key; patient_key and study_key have 12
SEXES = ("M", "F", "O")


def image_identity(sop_uid: str, number_of_frames: object, frame_index: object) -> str:
    """What an image key hashes: the SOP Instance UID, plus the frame for a multi-frame object."""
    if pd.isna(number_of_frames) or int(number_of_frames) <= 1:
        return sop_uid
    return f"{sop_uid}#{int(frame_index)}"


def series_identity(series_uid: str, first_sop_uid: str) -> str:
    """What a series' key hashes (``ingest.unit: series``): ``series:<Series Instance UID>#<SOP
    Instance UID of its first slice>``.

    The Series UID alone is not enough: ingest splits one Series UID into several volumes when
    its files differ in frame of reference, matrix, pixel spacing or plane, and the first slice
    (in geometric order) names which. The ``series:`` prefix cannot begin a UID (digits and
    dots), so this never equals what an image key hashes (:func:`image_identity`): a series key
    and an image key can only meet by a collision of the keyed hash itself.
    """
    return f"series:{series_uid}#{first_sop_uid}"


def series_keys(index: pd.DataFrame, series_files: pd.DataFrame, secret: bytes) -> list[str]:
    """The key of each series row of ``index`` (:func:`series_identity`, 16 hex): its
    ``image_key`` and the name of its folder of de-identified slices."""
    first = series_files.groupby("row_key", sort=False)["sop_instance_uid"].first()
    return [keyed_hex(secret, series_identity(str(uid), str(first[row_key])), IMAGE_KEY_LENGTH)
            for row_key, uid in zip(index["row_key"], index["series_instance_uid"])]


def dicom_file_name(secret: bytes, sop_uid: str) -> str:
    """The de-identified file of the object ``sop_uid``: ``<keyed hash of its UID>.dcm``, shared
    by every image (frame) of a multi-frame object."""
    return f"{keyed_hex(secret, sop_uid, IMAGE_KEY_LENGTH)}.dcm"


def build_manifest(index: pd.DataFrame, images: np.ndarray, *, secret: bytes,
                   retain_patient_characteristics: bool,
                   series_files: pd.DataFrame | None = None) -> pd.DataFrame:
    """The de-identified manifest.

    Parameters
    ----------
    index : DataFrame
        The ingest index (``layout.INDEX_COLUMNS``, PHI included).
    images : ndarray
        (n, size, size[, 3]) uint8 or float16, or (n, d, h, w, 1) uint8 volumes, row i <->
        index row i.
    secret : bytes
        HMAC key of the keys.
    retain_patient_characteristics : bool
        Keep ``patient_sex`` (M, F or O) and ``patient_age_years`` (top-coded at 90); else null.
    series_files : DataFrame, optional
        ``layout.SERIES_FILES`` when the rows are series (``ingest.unit: series``).

    Returns
    -------
    DataFrame
        ``layout.MANIFEST_COLUMNS`` in index order. Keys are keyed hashes (:func:`keyed_hex`):
        ``image_key`` of (0008,0018) SOP Instance UID (16 hex; of the UID and the frame number
        for an image taken from a multi-frame object), ``patient_key`` of (0010,0020)
        Patient ID (12 hex, also the Patient ID of the de-identified files) and ``study_key`` of
        (0020,000D) Study Instance UID (12 hex). ``pixel_sha256`` hashes each row of ``images``.
        A series row's ``image_key`` is its :func:`series_keys` and its ``dicom_file`` the folder
        ``dicom/<image_key>`` holding its slices, each ``<keyed hash of its SOP UID>.dcm``.
    """
    def key(value: object, length: int = PSEUDONYM_LENGTH) -> str | None:
        return keyed_hex(secret, value, length) if isinstance(value, str) and value else None

    if series_files is None:
        image_keys = [key(image_identity(uid, frames, frame), IMAGE_KEY_LENGTH) for uid, frames, frame
                      in zip(index["sop_instance_uid"], index["number_of_frames"], index["frame_index"])]
        dicom_files = [f"{layout.DEID_DICOM_DIR}/{key(uid, IMAGE_KEY_LENGTH)}.dcm"
                       for uid in index["sop_instance_uid"]]
    else:
        image_keys = series_keys(index, series_files, secret)
        dicom_files = [f"{layout.DEID_DICOM_DIR}/{image_key}" for image_key in image_keys]
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
    manifest["dicom_file"] = dicom_files
    return manifest[list(layout.MANIFEST_COLUMNS)].reset_index(drop=True)
