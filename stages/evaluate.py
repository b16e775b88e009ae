"""Stage 7, evaluate: honest test-split metrics, DVC plots, and the model registered in MLflow.

Inputs: ``paths.model_dir`` (model and MLflow run), the split manifest and de-identified images.
Outputs: ``paths.eval_metrics`` (the headline test metrics, DVC metrics), ``paths.eval_report``
(every test metric, interval and count), ``paths.eval_plots`` (ROC,
confusion-matrix, precision-recall and calibration data for ``dvc plots show``, PNG renderings
and a Grad-CAM grid) and ``paths.eval_subgroups`` (metrics by sex, age band, manufacturer and
view position); all logged to MLflow.
Params: ``evaluate.*``; ``ingest.classes`` (more than two: macro AUC and per-class metrics, each
image called its most probable class) and the ``ingest`` pixel settings the registered model
carries.

The operating threshold is chosen on the validation split, never on test, so the test figures are
what a user of the model would see; test Brier and ECE are reported with and without the
calibration the model carries, beside a reliability diagram. A model that is degenerate on the
validation split (constant scores, every image called one class, a threshold outside [0.01,
0.99]; :func:`dicomflow.model.scoring.degeneracy`) gets its report, its runs marked FAILED in MLflow, and
is never registered. Otherwise the registered model is a pyfunc (:mod:`dicomflow.serving.pyfunc`) that takes
DICOM files, applies this threshold and refuses files outside its training domain. Before it is
registered, the leak scanner searches the MLflow run (params, tags, metric names, artifacts, the
models' files) for every identifying value of the ingested sources, through the keyed digests
deidentify wrote (``identifier_digests.json``: this stage never reads ``data/`` or ingest's index);
any hit fails the stage and nothing is registered.

Promotion never looks at the test split: the candidate and the registry's current champion are
both run, as registered, on the de-identified files of the validation split, in this run, and
compared on ``evaluate.promotion_metric``; the candidate takes the alias ``champion`` when it beats
the champion by at least ``evaluate.promotion_min_gain``, else ``challenger`` (a replaced champion
keeps its version, as ``previous_champion``). The decision, both figures and the images they were
measured on are tags of the new version.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow import tracking
from dicomflow.config import layout
from dicomflow.config.params import load_params, read_params_file
from dicomflow.evaluation.metrics import choose_threshold, headline, roc_auc
from dicomflow.evaluation.promotion import (
    log_evaluation,
    mark_failed,
    register_and_promote,
)
from dicomflow.evaluation.reporting import report_test_split
from dicomflow.metrics import metric_for
from dicomflow.model.architectures import predict_probabilities
from dicomflow.model.scoring import degeneracy
from dicomflow.model.training import split_arrays
from dicomflow.runtime.outputs import write_json, write_text
from dicomflow.errors import DataError
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)


def main() -> None:
    import keras

    paths, params, ingest = load_params("paths"), load_params("evaluate"), load_params("ingest")
    model_dir = Path(paths.model_dir)
    model = keras.models.load_model(model_dir / layout.MODEL_FILE)
    run_info = json.loads((model_dir / layout.RUN_INFO).read_text())
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES, mmap_mode="r")
    metric_for(params.promotion_metric, n_classes=len(ingest.classes), setting="evaluate.promotion_metric")
    val_x, val_y = split_arrays(manifest, images, "val", ingest.classes)
    test_x, test_y = split_arrays(manifest, images, "test", ingest.classes)

    val_score = predict_probabilities(model, val_x)
    threshold = None
    if len(ingest.classes) == 2:
        threshold = choose_threshold(val_y, val_score, method=params.threshold_method,
                                     fixed=params.fixed_threshold, target_sensitivity=params.target_sensitivity)
    metrics, plot_files, subgroups = report_test_split(
        model, test_y, test_x, manifest.iloc[layout.split_rows(manifest, "test")], threshold=threshold,
        classes=ingest.classes, plots_dir=Path(paths.eval_plots))
    write_json(Path(paths.eval_metrics), headline(metrics))
    write_json(Path(paths.eval_report), metrics)
    write_text(Path(paths.eval_subgroups), subgroups.to_csv(index=False, float_format="%.4f"))
    problems = [*run_info.get("degenerate", []), *degeneracy(val_y, val_score, threshold=threshold)]

    def register() -> None:
        register_and_promote(model_dir, manifest, run_id=run_info["run_id"], threshold=threshold,
                             metrics=metrics, paths=paths, params=params, ingest=ingest,
                             train=load_params("train"), augment=load_params("augment"))

    tracking.configure_mlflow()
    run_ids = log_evaluation(run_info["run_id"], metrics, evaluate_params=read_params_file()["evaluate"],
                             files=[*plot_files, Path(paths.eval_report), Path(paths.eval_subgroups)],
                             problems=problems, register=register,
                             log_inputs=lambda: tracking.log_dataset_inputs(
                                 manifest, source=str(Path(paths.split_dir) / layout.SPLIT_MANIFEST),
                                 contexts={"test": "testing", "val": "validation"}))
    if problems:
        mark_failed(run_ids)
        raise DataError(f"the model is degenerate on the validation split (validation AUC "
                         f"{roc_auc(val_y, val_score):.3f}): {'; '.join(problems)}. Its runs are marked "
                         f"FAILED and it is not registered; the test report is in {paths.eval_report}")


if __name__ == "__main__":
    run_stage(main)
