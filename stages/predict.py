"""Batch prediction: the registered model on every file under a folder, to one CSV.

    python -m stages.predict INPUT_DIR [--output predictions.csv] [--model models:/NAME@champion]

Inputs: the files under ``INPUT_DIR`` (recursively; hidden files skipped, as ingest skips them)
and an MLflow pyfunc model (``stages.serving.DicomClassifier``), by default
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

import argparse
import logging
from collections import Counter
from pathlib import Path

import pandas as pd

from stages import tracking
from stages.cli import StageError, run_stage
from stages.outputs import write_text
from stages.params import load_params
from stages.source_files import display_path, list_sources

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path, help="folder of DICOM files (searched recursively)")
    parser.add_argument("--output", type=Path, default=Path("predictions.csv"), help="CSV to write")
    parser.add_argument("--model", help="model URI (default: models:/<evaluate.registered_model_name>@champion)")
    args = parser.parse_args(argv)

    if not args.input_dir.is_dir():
        raise StageError(f"input folder {args.input_dir} not found")
    listing = list_sources(args.input_dir, exclude={args.output.resolve()})
    files = listing.files
    if not files:
        raise StageError(f"no files found under {args.input_dir}/")
    uri = args.model or f"models:/{load_params('evaluate').registered_model_name}@champion"
    tracking.configure_mlflow(experiment=None)
    model = load_model(uri)

    predictions = with_unread(predict_files(model, files, root=args.input_dir), listing.unread)
    write_text(args.output, predictions.to_csv(index=False))
    failed = error_counts(predictions)
    # Counts only: paths and reader messages can carry PHI, so they stay in the CSV.
    logger.info("predicted %d of %d files with %s; wrote %s", len(predictions) - sum(failed.values()),
                len(predictions), uri, args.output)
    if failed:
        logger.warning("%d files not predicted (%s): see the error column of %s", sum(failed.values()),
                       ", ".join(f"{count} {reason}" for reason, count in failed.most_common()), args.output)
    if sum(failed.values()) == len(predictions):
        raise StageError(f"none of the {len(predictions)} files under {args.input_dir}/ could be predicted "
                         f"({', '.join(f'{count} {reason}' for reason, count in failed.most_common())}); "
                         f"see {args.output}")


if __name__ == "__main__":
    run_stage(main)
