"""The test-split report: metrics, plots, Grad-CAM examples and the subgroup table, the only use of
the test split; and the membership attack, whose non-members are the test images."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow import metrics as registry
from dicomflow.config import layout
from dicomflow.evaluation.explain import write_class_grad_cam_examples, write_grad_cam_examples
from dicomflow.evaluation.intervals import interval_from_report
from dicomflow.evaluation.membership import MembershipAttack, draw_members, membership_attack, per_example_loss
from dicomflow.evaluation.metrics import (
    calibration_metrics,
    compute_metrics,
    compute_multiclass_metrics,
    subgroup_metrics,
    weakest_subgroup,
)
from dicomflow.evaluation.plots import (
    write_class_reliability,
    write_confusion_data,
    write_confusion_matrix,
    write_plot_data,
    write_reliability_diagram,
)
from dicomflow.evaluation.studies import PREDICTIONS_FILE, Aggregation, predictions_table, study_scores
from dicomflow.model.architectures import (
    class_indices,
    members_of,
    predict_probabilities,
    temperature_of,
)

logger = logging.getLogger(__name__)

GRAD_CAM_FILE = "grad_cam.png"


def report_test_split(model, test_y: np.ndarray, test_x: np.ndarray, test_rows: pd.DataFrame, *,
                      threshold: float | None, classes: list[int], plots_dir: Path, task: str | None = None,
                      referable_grade: int | None = None, referable_threshold: float | None = None,
                      study: Aggregation | None = None,
                      spacing_mm: float | None = None) -> tuple[dict, list[Path], pd.DataFrame]:
    """Test metrics (calibration with and without the model's own included), plot files and the
    subgroup table: the report, and the only use of the test split. The intervals resample the
    patients of ``test_rows["patient_key"]`` (the split manifest's test rows, in the images' order).

    ``task`` is ``train.task`` (None: binary for two classes, multiclass for more); an ordinal
    task calls each image its median grade and, with ``referable_grade`` (a label) and the
    ``referable_threshold`` chosen on validation, reports the referable figures
    (:func:`~dicomflow.evaluation.metrics.compute_multiclass_metrics`).

    ``study`` None scores each image (``level`` ``image`` in the report). With an aggregation,
    the images are grouped by ``test_rows["study_key"]`` and every figure, the plots' data and the
    subgroups are per study (:mod:`dicomflow.evaluation.studies`; ``threshold`` and
    ``referable_threshold`` must then have been chosen on validation studies); the Grad-CAM grid
    still shows images, and ``test_predictions.csv`` keeps each image's probability beside its
    study's. The report states ``level``, the aggregation and ``n_test_images``.

    Volumes (``test_x`` (n, d, h, w, c), ``ingest.unit: series``): a row is a series carrying its
    study's label, so every figure is per series (``level`` ``series``; with ``study``, per study
    of series), ``test_predictions.csv`` has one row per series, and the Grad-CAM figure is a
    montage of each picked volume's most activated slices (the highest attention weights for
    attention MIL), placed in mm by ``spacing_mm``, the volumes' z spacing.
    """
    task = task or registry.task_of(len(classes))
    image_score = predict_probabilities(model, test_x)
    uncalibrated = predict_probabilities(model, test_x, calibrated=False)
    volumes = np.ndim(test_x) == 5
    image_y, test_y, test_score = test_y, test_y, image_score
    level = {"level": "series" if volumes else "image"}
    if volumes and study is None:  # the per-series table; per study it is written below
        plots_dir.mkdir(parents=True, exist_ok=True)
        predictions_table(test_rows, image_y, image_score, None, classes=classes).to_csv(
            plots_dir / PREDICTIONS_FILE, index=False, float_format="%.6f")
    if study is not None:
        grouped = study_scores(image_y, image_score, test_rows, aggregation=study)
        test_y, test_score, uncalibrated = grouped.labels, grouped.probabilities, grouped.combine(uncalibrated)
        level = {"level": "study", **study.as_report(), "n_test_images": int(len(image_y)),
                 "n_test_studies": int(len(test_y))}
        table = predictions_table(test_rows, image_y, image_score, grouped, classes=classes)
        plots_dir.mkdir(parents=True, exist_ok=True)
        table.to_csv(plots_dir / PREDICTIONS_FILE, index=False, float_format="%.6f")
        test_rows = grouped.rows
        logger.info("scoring %d test studies of %d images (%s of each study's image probabilities)",
                    len(test_y), len(image_y), study.describe())
    patients = test_rows["patient_key"].to_numpy(dtype=object)
    if task == registry.BINARY:
        metrics = compute_metrics(test_y, test_score, threshold=threshold, patients=patients)
        plot_files = write_plot_data(test_y, test_score, threshold=threshold, out_dir=plots_dir)
        plot_files.append(write_grad_cam_examples(model, test_x, image_y, image_score, threshold=threshold,
                                                  path=plots_dir / GRAD_CAM_FILE, spacing_mm=spacing_mm))
        called, caption = (test_score >= threshold).astype(int), f"threshold {threshold:.3f}"
        logger.info("test ROC AUC %.3f (%s), sensitivity %.3f (%s), specificity %.3f (%s) at %.3f; 95%% "
                    "intervals resample the %d test patients", metrics["roc_auc"], _ci(metrics, "roc_auc"),
                    metrics["sensitivity"], _ci(metrics, "sensitivity"), metrics["specificity"],
                    _ci(metrics, "specificity"), threshold, metrics["n_test_patients"])
        logger.info("test PPV %.3f, NPV %.3f, F1 %.3f, average precision %.3f", metrics["ppv"],
                    metrics["npv"], metrics["f1"], metrics["average_precision"])
    else:
        ordinal = task == registry.ORDINAL
        metrics = compute_multiclass_metrics(test_y, test_score, classes=classes, patients=patients, task=task,
                                             referable_grade=referable_grade, referable_threshold=referable_threshold)
        called = registry.Scores.at_threshold(test_y, test_score, task=task).called
        caption = "median grade" if ordinal else "most probable class"
        plot_files = write_confusion_data(test_y, called, out_dir=plots_dir)
        plot_files += write_class_reliability(test_y, test_score, classes=classes, out_dir=plots_dir)
        image_called = registry.Scores.at_threshold(image_y, image_score, task=task).called
        plot_files.append(write_class_grad_cam_examples(model, test_x, image_y, image_score, called=image_called,
                                                        classes=classes, path=plots_dir / GRAD_CAM_FILE,
                                                        noun="grade" if ordinal else "class", spacing_mm=spacing_mm))
        logger.info("test macro ROC AUC %.3f (%s), accuracy %.3f (%s), balanced accuracy %.3f, macro F1 %.3f; "
                    "95%% intervals resample the %d test patients", metrics["roc_auc"], _ci(metrics, "roc_auc"),
                    metrics["accuracy"], _ci(metrics, "accuracy"), metrics["balanced_accuracy"],
                    metrics["macro_f1"], metrics["n_test_patients"])
        if ordinal:
            logger.info("test quadratic weighted kappa %.3f (%s), mean absolute grade error %.3f", metrics["qwk"],
                        _ci(metrics, "qwk"), metrics["mae_grade"])
        if "referable_auc" in metrics:
            logger.info("test referable (grade %s or worse) AUC %.3f (%s), sensitivity %.3f (%s), specificity "
                        "%.3f (%s) at %.3f chosen on validation", referable_grade, metrics["referable_auc"],
                        _ci(metrics, "referable_auc"), metrics["referable_sensitivity"],
                        _ci(metrics, "referable_sensitivity"), metrics["referable_specificity"],
                        _ci(metrics, "referable_specificity"), referable_threshold)
    plot_files += write_confusion_matrix(test_y, called, classes=classes, out_dir=plots_dir, caption=caption)
    metrics.update(calibration_metrics(test_y, test_score, uncalibrated, classes=classes,
                                       temperatures=[temperature_of(m) for m in members_of(model)]))
    plot_files += write_reliability_diagram(test_y, test_score, uncalibrated, out_dir=plots_dir)
    logger.info("test Brier %.4f, ECE %.4f (uncalibrated: Brier %.4f, ECE %.4f)", metrics["brier"],
                metrics["ece"], metrics["brier_uncalibrated"], metrics["ece_uncalibrated"])
    subgroups = subgroup_metrics(test_rows, test_y, test_score, threshold=threshold, task=task)
    logger.info("%s", weakest_subgroup(subgroups, overall_auc=metrics["roc_auc"]))
    metrics.update(level)
    if study is not None or volumes:
        plot_files.append(plots_dir / PREDICTIONS_FILE)
    return metrics, plot_files, subgroups


def attack_membership(model, manifest: pd.DataFrame, images: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                      classes: list[int], privacy: Mapping | None) -> MembershipAttack:
    """The loss-threshold membership attack (:mod:`dicomflow.evaluation.membership`) on the model
    as registered (calibrated probabilities: a temperature does not change the losses' order).

    Non-members are the test images: held out by patient, never trained on, and never used to pick
    an epoch, a threshold or a temperature (the validation images were, so the model depends on
    them a little). Members are the training images (``manifest``'s train rows of ``images``, the
    de-identified images), a seeded sample as many as the test images when there are more. The ε
    bound is for the guarantee's δ (``privacy``, None without DP: δ = 0).
    """
    train_rows = layout.split_rows(manifest, "train")
    rows = train_rows[draw_members(len(train_rows), len(test_y))]
    member_y = class_indices(manifest["label"].to_numpy()[rows], classes)
    member_losses = per_example_loss(member_y, predict_probabilities(model, layout.to_model_input(images[rows])))
    nonmember_losses = per_example_loss(test_y, predict_probabilities(model, test_x))
    attack = membership_attack(member_losses, nonmember_losses, delta=float(privacy["delta"]) if privacy else 0.0)
    logger.info("membership attack (loss threshold) on %d training and %d test images: AUC %.3f (95%% CI %s), "
                "TPR %.3f at FPR %g, ε proven >= %.3f (%.0f%% confidence)", attack.n_members, attack.n_nonmembers,
                attack.auc, attack.auc_interval.describe(), attack.tpr, attack.fpr, attack.bound.epsilon,
                100 * (1 - attack.bound.alpha))
    return attack


def _ci(metrics: dict, name: str) -> str:
    """``95% CI 0.912-0.987``, or why there is none, for a log line."""
    interval = interval_from_report(metrics, name)
    if interval is None:
        return "no interval"
    return f"95% CI {interval.describe()}" if interval.estimated else f"95% CI {interval.note}"
