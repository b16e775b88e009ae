"""The test-split report: metrics, plots, Grad-CAM examples and the subgroup table, the only use of the test split."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.evaluation.explain import write_grad_cam_examples
from dicomflow.evaluation.metrics import (
    calibration_metrics,
    compute_metrics,
    compute_multiclass_metrics,
    subgroup_metrics,
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
    subgroup table: the report, and the only use of the test split."""
    test_score = predict_probabilities(model, test_x)
    uncalibrated = predict_probabilities(model, test_x, calibrated=False)
    if threshold is not None:
        metrics = compute_metrics(test_y, test_score, threshold=threshold)
        plot_files = write_plot_data(test_y, test_score, threshold=threshold, out_dir=plots_dir)
        plot_files.append(write_grad_cam_examples(model, test_x, test_y, test_score, threshold=threshold,
                                                  path=plots_dir / GRAD_CAM_FILE))
        logger.info("test ROC AUC %.3f (95%% CI %.3f-%.3f), sensitivity %.3f, specificity %.3f at %.3f",
                    metrics["roc_auc"], metrics["roc_auc_ci_low"], metrics["roc_auc_ci_high"],
                    metrics["sensitivity"], metrics["specificity"], threshold)
        logger.info("test PPV %.3f, NPV %.3f, F1 %.3f, average precision %.3f", metrics["ppv"],
                    metrics["npv"], metrics["f1"], metrics["average_precision"])
    else:
        metrics = compute_multiclass_metrics(test_y, test_score, classes=classes)
        plot_files = write_confusion_data(test_y, test_score.argmax(axis=1), out_dir=plots_dir)
        logger.info("test macro ROC AUC %.3f (95%% CI %.3f-%.3f), accuracy %.3f, macro F1 %.3f",
                    metrics["roc_auc"], metrics["roc_auc_ci_low"], metrics["roc_auc_ci_high"],
                    metrics["accuracy"], metrics["macro_f1"])
    metrics.update(calibration_metrics(test_y, test_score, uncalibrated,
                                       temperatures=[temperature_of(m) for m in members_of(model)]))
    plot_files += write_reliability_diagram(test_y, test_score, uncalibrated, out_dir=plots_dir)
    logger.info("test Brier %.4f, ECE %.4f (uncalibrated: Brier %.4f, ECE %.4f)", metrics["brier"],
                metrics["ece"], metrics["brier_uncalibrated"], metrics["ece_uncalibrated"])
    subgroups = subgroup_metrics(test_rows, test_y, test_score, threshold=threshold)
    for row in subgroups.dropna(subset=["roc_auc"]).nsmallest(1, "roc_auc").itertuples():
        logger.info("weakest subgroup by AUC: %s = %s (n %d), AUC %.3f", row.attribute, row.group,
                    row.n, row.roc_auc)
    return metrics, plot_files, subgroups
