"""Batch prediction: the registered model on every file under a folder, to one CSV.

    dicomflow predict INPUT_DIR [--output predictions.csv] [--model models:/NAME@champion]  (dicomflow/cli.py)

Inputs: the files under ``INPUT_DIR`` (recursively; hidden files skipped, as ingest skips them)
and an MLflow pyfunc model (``dicomflow.serving.pyfunc.DicomClassifier``), by default
``models:/<evaluate.registered_model_name>@champion`` in the project's tracking store
(``MLFLOW_TRACKING_URI`` or ``mlflow.db``).
Outputs: the CSV, one row per file in path order: ``path`` (relative to ``INPUT_DIR``, with
``/``), the probability column(s), ``label`` and ``error`` (empty, or the reason a file could not
be used: ``not_dicom: ...``, ``truncated_pixel_data: ...``, ``out_of_domain: ...`` for a file unlike the
model's training files).
Params: ``evaluate.registered_model_name`` (only when ``--model`` is not given).

A bad file gets its reason in the CSV and never stops the run; the command fails (exit 1, one
line) only when the model cannot be loaded or no file at all could be predicted.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from dicomflow import tracking
from dicomflow.dicom.sources import display_path
from dicomflow.runtime.stage import StageError

logger = logging.getLogger(__name__)

BATCH_FILES = 256  # files per model call: bounds memory on large folders


def load_model(uri: str):
    """The pyfunc model at ``uri``, or StageError naming the URI and why not."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as err:  # noqa: BLE001  MLflow, I/O and unpickling errors all mean "cannot load"
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise StageError(f"cannot load model {uri} from {tracking.tracking_uri()}: "
                         f"{type(err).__name__}: {first_line}") from err


def predict_files(model, files: list[Path], *, root: Path, batch_files: int = BATCH_FILES) -> pd.DataFrame:
    """The model's output for each file, with its ``path`` relative to ``root`` first, in ``files`` order."""
    parts = []
    for start in range(0, len(files), batch_files):
        batch = files[start:start + batch_files]
        predicted = model.predict(pd.DataFrame({"path": [str(path) for path in batch]}))
        predicted = predicted.reset_index(drop=True)
        predicted.insert(0, "path", [display_path(path, root) for path in batch])
        parts.append(predicted)
    return pd.concat(parts, ignore_index=True)


def with_unread(predictions: pd.DataFrame, unread: list[tuple[str, str, str]]) -> pd.DataFrame:
    """``predictions`` and a row for each entry that was not read (a FIFO, a broken link, a name
    that is not UTF-8, ...) with its reason as the error, all in path order."""
    if not unread:
        return predictions
    rows = pd.DataFrame({"path": [path for path, _, _ in unread],
                         "label": -1, "error": [f"{reason}: {detail}" for _, reason, detail in unread]})
    both = pd.concat([predictions, rows], ignore_index=True)
    both["label"] = both["label"].astype("int64")
    return both.sort_values("path", kind="stable", ignore_index=True)


def error_counts(predictions: pd.DataFrame) -> Counter[str]:
    """How many files failed, by reason code (the ``error`` text before its first colon)."""
    errors = predictions.loc[predictions["error"] != "", "error"]
    return Counter(error.split(":", 1)[0] for error in errors)
