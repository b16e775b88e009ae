"""The test-split report: metrics, plots, Grad-CAM examples and the subgroup table, the only use of the test split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.evaluation.explain import write_grad_cam_examples
from dicomflow.evaluation.intervals import interval_from_report
from dicomflow.evaluation.metrics import (
    calibration_metrics,
    compute_metrics,
    compute_multiclass_metrics,
    subgroup_metrics,
    weakest_subgroup,
)
from dicomflow.evaluation.plots import (
    write_confusion_data,
    write_plot_data,
    write_reliability_diagram,
)
from dicomflow.model.architectures import (
    members_of,
    predict_probabilities,
    temperature_of,
)

logger = logging.getLogger(__name__)

GRAD_CAM_FILE = "grad_cam.png"


def report_test_split(model, test_y: np.ndarray, test_x: np.ndarray, test_rows: pd.DataFrame, *,
                      threshold: float | None, classes: list[int], plots_dir: Path
                      ) -> tuple[dict, list[Path], pd.DataFrame]:
    """Test metrics (calibration with and without the model's own included), plot files and the
    subgroup table: the report, and the only use of the test split. The intervals resample the
    patients of ``test_rows["patient_key"]`` (the split manifest's test rows, in the images' order)."""
    test_score = predict_probabilities(model, test_x)
    uncalibrated = predict_probabilities(model, test_x, calibrated=False)
    patients = test_rows["patient_key"].to_numpy(dtype=object)
    if threshold is not None:
        metrics = compute_metrics(test_y, test_score, threshold=threshold, patients=patients)
        plot_files = write_plot_data(test_y, test_score, threshold=threshold, out_dir=plots_dir)
        plot_files.append(write_grad_cam_examples(model, test_x, test_y, test_score, threshold=threshold,
                                                  path=plots_dir / GRAD_CAM_FILE))
        logger.info("test ROC AUC %.3f (%s), sensitivity %.3f (%s), specificity %.3f (%s) at %.3f; 95%% "
                    "intervals resample the %d test patients", metrics["roc_auc"], _ci(metrics, "roc_auc"),
                    metrics["sensitivity"], _ci(metrics, "sensitivity"), metrics["specificity"],
                    _ci(metrics, "specificity"), threshold, metrics["n_test_patients"])
        logger.info("test PPV %.3f, NPV %.3f, F1 %.3f, average precision %.3f", metrics["ppv"],
                    metrics["npv"], metrics["f1"], metrics["average_precision"])
    else:
        metrics = compute_multiclass_metrics(test_y, test_score, classes=classes, patients=patients)
        plot_files = write_confusion_data(test_y, test_score.argmax(axis=1), out_dir=plots_dir)
        logger.info("test macro ROC AUC %.3f (%s), accuracy %.3f (%s), macro F1 %.3f; 95%% intervals "
                    "resample the %d test patients", metrics["roc_auc"], _ci(metrics, "roc_auc"),
                    metrics["accuracy"], _ci(metrics, "accuracy"), metrics["macro_f1"], metrics["n_test_patients"])
    metrics.update(calibration_metrics(test_y, test_score, uncalibrated,
                                       temperatures=[temperature_of(m) for m in members_of(model)]))
    plot_files += write_reliability_diagram(test_y, test_score, uncalibrated, out_dir=plots_dir)
    logger.info("test Brier %.4f, ECE %.4f (uncalibrated: Brier %.4f, ECE %.4f)", metrics["brier"],
                metrics["ece"], metrics["brier_uncalibrated"], metrics["ece_uncalibrated"])
    subgroups = subgroup_metrics(test_rows, test_y, test_score, threshold=threshold)
    logger.info("%s", weakest_subgroup(subgroups, overall_auc=metrics["roc_auc"]))
    return metrics, plot_files, subgroups


def _ci(metrics: dict, name: str) -> str:
    """``95% CI 0.912-0.987``, or why there is none, for a log line."""
    interval = interval_from_report(metrics, name)
    if interval is None:
        return "no interval"
    return f"95% CI {interval.describe()}" if interval.estimated else f"95% CI {interval.note}"
