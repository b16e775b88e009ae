"""File names inside each stage's output folder, and the columns of the tables stages exchange.

The folders themselves come from the ``paths`` section of ``params.yaml`` (interpolated into
``dvc.yaml``); the names below are the contract between a stage and the ones after it.
"""

from __future__ import annotations

# ingest -> deidentify (contains PHI: nothing after deidentify may read these)
INGEST_INDEX = "index.parquet"        # one row per usable image, row i <-> IMAGES[i]
INGEST_QUARANTINE = "quarantine.csv"  # path, reason, detail
IMAGES = "images.npy"                 # uint8 array (n, size, size), pixels as displayed

# deidentify -> everything downstream
DEID_MANIFEST = "manifest.parquet"    # one row per image, row i <-> IMAGES[i]
DEID_DICOM_DIR = "dicom"              # de-identified DICOM files, named <image_key>.dcm
DEID_AUDIT = "audit.csv"              # per-file actions applied, no PHI values

# split -> augment, train, evaluate
SPLIT_MANIFEST = "manifest.parquet"   # the de-identified manifest plus a `split` column

# augment -> train
AUGMENTED_IMAGES = "train_images.npy"
AUGMENTED_LABELS = "train_labels.npy"

# train -> evaluate
MODEL_FILE = "model.keras"
RUN_INFO = "mlflow_run.json"          # the MLflow run that evaluate continues

INDEX_COLUMNS = (
    "source_path", "sha256", "sop_instance_uid", "series_instance_uid", "study_instance_uid",
    "accession_number", "patient_id", "modality", "manufacturer", "body_part", "view_position",
    "patient_sex", "patient_age", "rows", "columns", "pixel_spacing_mm", "bits_stored",
    "photometric", "transfer_syntax", "label", "pixel_min", "pixel_max", "pixel_mean", "pixel_std",
)

MANIFEST_COLUMNS = (
    "image_key", "patient_key", "study_key", "label", "modality", "manufacturer", "body_part",
    "view_position", "patient_sex", "patient_age_years", "rows", "columns", "pixel_spacing_mm",
    "bits_stored", "photometric", "pixel_min", "pixel_max", "pixel_mean", "pixel_std",
    "pixel_sha256", "dicom_file",
)
