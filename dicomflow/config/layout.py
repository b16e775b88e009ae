"""File names inside each stage's output folder, and the columns of the tables stages exchange.

The folders themselves come from the ``paths`` section of ``params.yaml`` (interpolated into
``dvc.yaml``); the names below are the contract between a stage and the ones after it.
"""

from __future__ import annotations

import numpy as np

# ingest -> deidentify (contains PHI: nothing after deidentify may read these)
INGEST_INDEX = "index.parquet"        # one row per image (frame), row i <-> IMAGES[i]
INGEST_QUARANTINE = "quarantine.csv"  # path, reason, detail
IMAGES = "images.npy"                 # (n, size, size[, 3]) uint8 0-255 or float16 0-1, as displayed

# deidentify -> everything downstream
DEID_MANIFEST = "manifest.parquet"    # one row per image, row i <-> IMAGES[i]
DEID_DICOM_DIR = "dicom"              # de-identified DICOM files, named <image_key>.dcm
DEID_AUDIT = "audit.csv"              # per-file actions applied, no PHI values
DEID_QUARANTINE = "quarantine.csv"    # index_row, reason, detail: files left out, no PHI values
DEID_IDENTIFIER_DIGESTS = "identifier_digests.json"  # keyed digests of the sources' identifying values
# {"fingerprint": "<16 hex>", "demo": bool}: which secret made the pseudonyms (never the secret)
DEID_SECRET_FINGERPRINT = "secret_fingerprint.json"

# split -> augment, train, evaluate
SPLIT_MANIFEST = "manifest.parquet"   # the de-identified manifest plus a `split` column

# train -> evaluate (which finds the training run by the file's sha256: dicomflow.tracking)
MODEL_FILE = "model.keras"

# The ingest index: one row per image (a frame of a file), PHI included.
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
    "pixel_extreme_share": "float",
}
INDEX_COLUMNS = tuple(INDEX_SCHEMA)

# The de-identified manifest's columns and their kinds (validate checks both).
MANIFEST_SCHEMA = {
    "image_key": "string", "patient_key": "string", "study_key": "string", "label": "integer",
    "modality": "string", "manufacturer": "string", "body_part": "string",
    "view_position": "string", "patient_sex": "string", "patient_age_years": "integer",
    "rows": "integer", "columns": "integer", "pixel_spacing_mm": "float", "bits_stored": "integer",
    "photometric": "string", "predefined_split": "string", "pixel_min": "float",
    "pixel_max": "float", "pixel_mean": "float", "pixel_std": "float",
    "pixel_extreme_share": "float", "pixel_sha256": "string", "dicom_file": "string",
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
