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
    "photometric", "transfer_syntax", "label", "predefined_split", "pixel_min", "pixel_max",
    "pixel_mean", "pixel_std", "pixel_extreme_share",
)

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
