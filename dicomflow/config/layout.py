"""File names inside each stage's output folder, and the columns of the tables stages exchange.

The folders themselves come from the ``paths`` section of ``params.yaml`` (interpolated into
``dvc.yaml``); the names below are the contract between a stage and the ones after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dicomflow.errors import DataError

# ingest -> deidentify (contains PHI: nothing after deidentify may read these)
INGEST_INDEX = "index.parquet"        # one row per image (frame), row i <-> IMAGES[i]
INGEST_QUARANTINE = "quarantine.csv"  # path, reason, detail
IMAGES = "images.npy"                 # (n, size, size[, 3]) uint8 0-255 or float16 0-1, as displayed;
                                      # ingest.unit series: (n, d, h, w, 1) volumes, windowed
SERIES_FILES = "series_files.parquet"  # ingest.unit series: each slice file of each index row

# deidentify -> everything downstream
DEID_MANIFEST = "manifest.parquet"    # one row per image (or series), row i <-> IMAGES[i]
DEID_DICOM_DIR = "dicom"              # de-identified DICOM files, named <image_key>.dcm; a series'
                                      # slices in <image_key>/, each <keyed hash of its SOP UID>.dcm
DEID_AUDIT = "audit.csv"              # per-file actions applied, no PHI values (a slice: <series key>/<its key>)
DEID_QUARANTINE = "quarantine.csv"    # index_row, reason, detail: files (or series) left out, no PHI values
DEID_IDENTIFIER_DIGESTS = "identifier_digests.json"  # keyed digests of the sources' identifying values
# {"fingerprint": "<16 hex>", "demo": bool}: which secret made the pseudonyms (never the secret)
DEID_SECRET_FINGERPRINT = "secret_fingerprint.json"

# split -> augment, train, evaluate
SPLIT_MANIFEST = "manifest.parquet"   # the de-identified manifest plus a `split` column

# The split of images without a label (ingest.unlabelled: pretrain), of patients with no labelled
# image outside the training split; their label is UNLABELLED_LABEL. Unlabelled images of a
# validation or test patient get UNUSED_SPLIT: a patient stays in one place.
UNLABELLED_SPLIT = "unlabelled"
UNUSED_SPLIT = "unused"
UNLABELLED_LABEL = -1

# pretrain -> train
PRETRAIN_RECORD = "pretrain.json"     # method, images, data version, params: what the encoder is
ENCODER_FILE = "encoder.keras"        # the encoder (absent with pretrain.method: none)

# train -> evaluate (which finds the training run by the file's sha256: dicomflow.tracking)
MODEL_FILE = "model.keras"
# Beside a registered model's MLmodel (dicomflow.evaluation.registry logs it): what it trained on
# (read_training_record).
TRAINING_DATA_FILE = "training_data.json"
# Beside it when the weights came from a registered model (train.init): that model's training
# images, which the promotion comparison must leave out as it does the candidate's own.
INHERITED_TRAINING_DATA = "inherited_training_data.json"
# Beside it when the model was trained with train.privacy.enabled: the differential-privacy
# guarantee (dicomflow.model.privacy.PrivacyGuarantee.as_record: epsilon, delta, ...); absent: no DP
# (read_privacy_record).
PRIVACY_FILE = "privacy.json"

# With ingest.unit: series a row is a series (its volume in IMAGES) and these columns hold its
# diagnosis (dicomflow.dicom.series.diagnose); null for images.
SERIES_SCHEMA = {
    "series_files": "integer", "series_positions": "integer", "series_missing": "integer",
    "series_duplicates_identical": "integer", "series_duplicates_differing": "integer",
    "series_spacing_mm": "float", "series_spacing_deviation_mm": "float",
    "series_orientation_deviation_deg": "float", "series_filled": "integer",
}

# The ingest index: one row per image (a frame of a file) or series, PHI included.
INDEX_SCHEMA = {
    "row_key": "string", "source_path": "string", "sha256": "string",
    "sop_instance_uid": "string", "series_instance_uid": "string", "study_instance_uid": "string",
    "accession_number": "string", "patient_id": "string", "modality": "string",
    "manufacturer": "string", "manufacturer_model": "string", "body_part": "string",
    "view_position": "string", "patient_sex": "string", "patient_age": "string",
    "rows": "integer", "columns": "integer", "pixel_spacing_mm": "float", "bits_stored": "integer",
    "photometric": "string", "transfer_syntax": "string", "number_of_frames": "integer",
    "frame_index": "integer", "label": "integer", "predefined_split": "string",
    "pixel_min": "float", "pixel_max": "float", "pixel_mean": "float", "pixel_std": "float",
    "pixel_extreme_share": "float", "source_channels": "integer", "pixel_colour_spread": "float",
    "colour_profile": "string", **SERIES_SCHEMA,
}
INDEX_COLUMNS = tuple(INDEX_SCHEMA)
# SERIES_FILES: one row per slice file of a series row of the index (row_key), in geometric order.
SERIES_FILES_SCHEMA = {"row_key": "string", "source_path": "string", "sha256": "string",
                       "sop_instance_uid": "string"}

# The de-identified manifest's columns and their kinds (validate checks both).
MANIFEST_SCHEMA = {
    "image_key": "string", "patient_key": "string", "study_key": "string", "label": "integer",
    "modality": "string", "manufacturer": "string", "body_part": "string",
    "view_position": "string", "patient_sex": "string", "patient_age_years": "integer",
    "rows": "integer", "columns": "integer", "pixel_spacing_mm": "float", "bits_stored": "integer",
    "photometric": "string", "predefined_split": "string", "pixel_min": "float",
    "pixel_max": "float", "pixel_mean": "float", "pixel_std": "float",
    "pixel_extreme_share": "float", "source_channels": "integer", "pixel_colour_spread": "float",
    "colour_profile": "string", "pixel_sha256": "string", "dicom_file": "string",
    # The series' diagnosis (null for images): geometry only, nothing identifying; validate checks
    # slice count, spacing and orientation from them. rows, columns and pixel_spacing_mm describe
    # the source slices (in-plane), as they describe a source image.
    **SERIES_SCHEMA,
}
MANIFEST_COLUMNS = tuple(MANIFEST_SCHEMA)


def unit_pixels(images: np.ndarray) -> np.ndarray:
    """Stored pixels (uint8 0-255 or float16 0-1, as ``IMAGES`` holds them) as float32 in [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    return images.astype(np.float32)


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Stored images (n, h, w) or (n, h, w, c) -> float32 (n, h, w, c) in [0, 1], the model's input."""
    unit = unit_pixels(images)
    return unit[..., None] if unit.ndim == 3 else unit


def split_rows(manifest, split: str) -> np.ndarray:
    """The positions of ``split``'s rows in a split manifest: also their rows of ``IMAGES``."""
    return np.flatnonzero((manifest["split"] == split).to_numpy())


def stored_pixels(unit: np.ndarray, dtype: np.dtype | str) -> np.ndarray:
    """Pixels in [0, 1] back to the stored form ``dtype`` (uint8 or float16)."""
    if np.dtype(dtype) == np.uint8:
        return np.round(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.clip(unit, 0.0, 1.0).astype(np.float16)


def read_training_record(folder: Path) -> dict | None:
    """A (verified) model folder's :data:`TRAINING_DATA_FILE`, or None (registered before it
    existed, or not a record of training images)."""
    try:
        record = json.loads((Path(folder) / TRAINING_DATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pixel_sha256"), list) else None


def read_privacy_record(folder: Path) -> dict | None:
    """The DP guarantee train wrote beside the model (:data:`PRIVACY_FILE`), or None when the
    model was trained without differential privacy (no such file).

    Raises
    ------
    DataError
        The file is there but is not JSON with a positive ``epsilon`` and a ``delta`` in [0, 1).
    """
    path = Path(folder) / PRIVACY_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not JSON ({type(err).__name__}); rerun train (dvc repro train)") from None
    epsilon, delta = (record.get(key) if isinstance(record, dict) else None for key in ("epsilon", "delta"))
    if not (_number(epsilon) and epsilon > 0 and _number(delta) and 0 <= delta < 1):
        raise DataError(f"{path} must hold a positive 'epsilon' and a 'delta' in [0, 1); got epsilon "
                        f"{epsilon!r}, delta {delta!r}: rerun train (dvc repro train)")
    return record


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
