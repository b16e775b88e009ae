"""Test metrics: operating threshold, ROC AUC with a bootstrap interval, sensitivity,
specificity, predictive values, multi-class metrics, calibration and subgroups.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import (
    average_precision_score,
    brier_score_loss,
    confusion_matrix,
    f1_score,
    precision_score,
    roc_auc_score,
    roc_curve,
)

from dicomflow.config.params import THRESHOLD_METHODS
from dicomflow.model.scoring import brier_score, expected_calibration_error
from dicomflow.errors import DataError

logger = logging.getLogger(__name__)


def choose_threshold(y_true: np.ndarray, y_score: np.ndarray, *, method: str, fixed: float | None = None,
                     target_sensitivity: float | None = None) -> float:
    """Operating threshold, chosen on the validation split; an image is positive when score >= it.

    Parameters
    ----------
    y_true, y_score : ndarray of shape (n,)
        Validation labels (0 or 1) and predicted probabilities of class 1.
    method : {"youden", "fixed", "target_sensitivity"}
        ``youden``: maximise Youden's J (sensitivity + specificity - 1), midway between the
        scores that bound the best cut. ``fixed``: return
        ``fixed``. ``target_sensitivity``: the highest threshold whose sensitivity on
        ``(y_true, y_score)`` is at least ``target_sensitivity``.
    fixed : float, default=None
        The threshold for ``method="fixed"``; required there.
    target_sensitivity : float in (0, 1], default=None
        The sensitivity to reach for ``method="target_sensitivity"``; required there.

    Returns
    -------
    float
        In [0, 1] for ``youden`` (an infinite ROC threshold is clipped to 1); one of the
        validation scores for ``target_sensitivity``.

    Raises
    ------
    ValueError
        Unknown ``method``, or the option it needs missing or out of range.
    DataError
        The validation split holds one class only (``youden`` and ``target_sensitivity``).

    Notes
    -----
    ``target_sensitivity`` takes the highest qualifying threshold because specificity only falls
    as the threshold falls: it is the most specific threshold that meets the target. The target
    is met on validation only; the test sensitivity can land below it, by more the fewer
    validation positives there are (with 20 positives one positive is 0.05 of sensitivity).
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, THRESHOLD_METHODS))}; got {method!r}")
    if method == "fixed":
        if fixed is None:
            raise ValueError("fixed must be a float when method is 'fixed'; got None")
        return fixed
    if method == "target_sensitivity" and (target_sensitivity is None or not 0 < target_sensitivity <= 1):
        raise ValueError("target_sensitivity must be a float in (0, 1] when method is "
                         f"'target_sensitivity'; got {target_sensitivity!r}")
    if len(np.unique(y_true)) < 2:
        raise DataError("the validation split holds one class only; cannot choose a threshold")
    if method == "youden":
        # Every distinct score a candidate, so that the next threshold is the next lower score.
        fpr, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
        best = int(np.argmax(tpr - fpr))
        if best + 1 < len(thresholds):
            # Every threshold in (next lower score, this score] calls the split alike: take the
            # middle. The score itself, scikit-learn's point, is the lowest score of a positive
            # called: on a split the model separates that is the edge of the positives (0.99999
            # on the embedded sample), not a margin.
            return float((min(thresholds[best], 1.0) + thresholds[best + 1]) / 2)
        return float(min(thresholds[best], 1.0))
    return _sensitivity_threshold(y_true, y_score, target=target_sensitivity)


def _sensitivity_threshold(y_true: np.ndarray, y_score: np.ndarray, *, target: float) -> float:
    """Highest threshold whose sensitivity is >= ``target`` (both classes present, 0 < target <= 1)."""
    # Every distinct score must stay a candidate: drop_intermediate would drop collinear ROC points
    # and could skip the first threshold that reaches the target.
    _, tpr, thresholds = roc_curve(y_true, y_score, drop_intermediate=False)
    # thresholds fall and tpr rises along the curve, ending at 1; tpr[0] = 0 at threshold inf, so
    # the first index reaching target > 0 is a finite score.
    return float(thresholds[int(np.argmax(tpr >= target))])


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of binary scores (n,), or the macro average of one-vs-rest AUCs for (n, k) class
    probabilities (each class present in ``y_true``, class indices 0..k-1)."""
    if y_score.ndim == 1:
        return float(roc_auc_score(y_true, y_score))
    return float(np.mean([roc_auc_score(y_true == k, y_score[:, k]) for k in np.unique(y_true)]))


def bootstrap_auc_interval(y_true: np.ndarray, y_score: np.ndarray, *, n_resamples: int = 1000,
                           seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of :func:`roc_auc` (resamples missing a class of
    the split skipped)."""
    rng = np.random.default_rng(seed)
    n_classes = len(np.unique(y_true))
    aucs = []
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y_true), len(y_true))
        if len(np.unique(y_true[idx])) == n_classes:
            aucs.append(roc_auc(y_true[idx], y_score[idx]))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(aucs, tail)), float(np.percentile(aucs, 100 - tail))


# What `dvc exp show` compares (its 160 columns hold these beside the params changed); every other
# figure, intervals and counts included, is in the full test report.
HEADLINE_METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy", "brier", "ece")


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The :data:`HEADLINE_METRICS` that ``metrics`` has (multi-class: no sensitivity or specificity)."""
    return {name: metrics[name] for name in HEADLINE_METRICS if name in metrics}


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float) -> dict[str, float]:
    """Test-split metrics: ranking, calibration, and the confusion counts at ``threshold``.

    Parameters
    ----------
    y_true : ndarray of shape (n,)
        Test labels, 0 or 1.
    y_score : ndarray of shape (n,)
        Predicted probability of class 1, in [0, 1].
    threshold : float
        Operating threshold; an image is called positive when its score is >= ``threshold``.

    Returns
    -------
    dict
        ``roc_auc`` with its 95 % bootstrap interval (``roc_auc_ci_low``, ``roc_auc_ci_high``);
        ``average_precision`` (area under the precision-recall curve, scikit-learn's step sum);
        ``brier`` (mean squared error of the probabilities: 0 is perfect, a constant 0.5 scores
        0.25); at ``threshold``: ``accuracy``, ``sensitivity``, ``specificity``, ``ppv``
        (precision), ``npv`` and ``f1``; and ``threshold``, ``n_test``, ``n_test_positive``.

    Raises
    ------
    DataError
        The test split holds one class only.

    Notes
    -----
    PPV and NPV are never NaN: with no predicted positives PPV is 0.0, with no predicted
    negatives NPV is 0.0 (scikit-learn's ``zero_division=0.0``), and a warning is logged, since
    0.0 then stands for "undefined". F1 is defined whenever the split holds a positive. PPV and
    NPV depend on prevalence: they hold at the test split's (``n_test_positive / n_test``).
    """
    if len(np.unique(y_true)) < 2:
        raise DataError("the test split holds one class only; ROC AUC is undefined")
    y_pred = (y_score >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    low, high = bootstrap_auc_interval(y_true, y_score)
    ppv, npv = _predictive_values(y_true, y_pred, threshold=threshold)
    return {
        "roc_auc": float(roc_auc_score(y_true, y_score)),
        "roc_auc_ci_low": low,
        "roc_auc_ci_high": high,
        "average_precision": float(average_precision_score(y_true, y_score)),
        "brier": float(brier_score_loss(y_true, y_score)),
        "accuracy": float((tp + tn) / len(y_true)),
        "sensitivity": float(tp / (tp + fn)),
        "specificity": float(tn / (tn + fp)),
        "ppv": ppv,
        "npv": npv,
        "f1": float(f1_score(y_true, y_pred, zero_division=0.0)),
        "threshold": float(threshold),
        "n_test": int(len(y_true)),
        "n_test_positive": int(y_true.sum()),
    }


def _predictive_values(y_true: np.ndarray, y_pred: np.ndarray, *, threshold: float) -> tuple[float, float]:
    """PPV and NPV as precision of class 1 and of class 0; 0.0 (with a warning) when undefined."""
    for label, name in ((1, "PPV"), (0, "NPV")):
        if not (y_pred == label).any():
            logger.warning("no test image is predicted %s at threshold %.3f; %s reported as 0.0 "
                           "(undefined)", "positive" if label else "negative", threshold, name)
    return (float(precision_score(y_true, y_pred, pos_label=1, zero_division=0.0)),
            float(precision_score(y_true, y_pred, pos_label=0, zero_division=0.0)))


def compute_multiclass_metrics(y_true: np.ndarray, y_score: np.ndarray, *,
                               classes: list[int]) -> dict[str, float]:
    """Test-split metrics for more than two classes; each image is called its most probable class.

    Parameters
    ----------
    y_true : ndarray of shape (n,)
        Class indices, 0 to k - 1 (positions in ``classes``).
    y_score : ndarray of shape (n, k)
        Predicted class probabilities.
    classes : list of int
        The label of each class index, used in the per-class metric names.

    Returns
    -------
    dict
        ``roc_auc`` (macro average of one-vs-rest AUCs) with its bootstrap interval, ``accuracy``,
        ``macro_f1``, ``n_test``; per class c (one-vs-rest): ``roc_auc_<c>``, ``sensitivity_<c>``,
        ``specificity_<c>``, ``ppv_<c>``, ``f1_<c>``, ``n_test_<c>``.

    Raises
    ------
    DataError
        The test split lacks one of the classes: its AUC and sensitivity are undefined.
    """
    missing = sorted(set(range(len(classes))) - set(np.unique(y_true)))
    if missing:
        raise DataError(f"the test split holds no image of class(es) {[classes[k] for k in missing]}; "
                         "per-class metrics are undefined")
    y_pred = y_score.argmax(axis=1)
    low, high = bootstrap_auc_interval(y_true, y_score)
    metrics = {"roc_auc": roc_auc(y_true, y_score), "roc_auc_ci_low": low, "roc_auc_ci_high": high,
               "accuracy": float(np.mean(y_pred == y_true)),
               "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0.0)),
               "n_test": int(len(y_true))}
    for k, label in enumerate(classes):
        actual, called = y_true == k, y_pred == k
        metrics.update({
            f"roc_auc_{label}": float(roc_auc_score(actual, y_score[:, k])),
            f"sensitivity_{label}": float(np.mean(called[actual])),
            f"specificity_{label}": float(np.mean(~called[~actual])),
            f"ppv_{label}": float(np.mean(actual[called])) if called.any() else 0.0,
            f"f1_{label}": float(f1_score(actual, called, zero_division=0.0)),
            f"n_test_{label}": int(actual.sum()),
        })
    return metrics


SUBGROUP_ATTRIBUTES = ("patient_sex", "age_band", "manufacturer", "view_position")
AGE_BANDS = ((0, "0-17"), (18, "18-39"), (40, "40-64"), (65, "65+"))  # lower bound, name


def age_band(years: float | None) -> str:
    """The band of an age in years (``AGE_BANDS``), or "unknown"."""
    if years is None or pd.isna(years):
        return "unknown"
    return next(name for low, name in reversed(AGE_BANDS) if years >= low)


def subgroup_metrics(manifest: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, *,
                     threshold: float | None) -> pd.DataFrame:
    """AUC, sensitivity and specificity within each sex, age band, manufacturer and view position.

    Parameters
    ----------
    manifest : DataFrame
        The test images' rows of the de-identified manifest (``patient_sex``,
        ``patient_age_years``, ``manufacturer``, ``view_position``), in the order of ``y_true``.
    y_true, y_score : ndarray
        As for :func:`compute_metrics` (binary) or :func:`compute_multiclass_metrics`.
    threshold : float or None
        The operating threshold (binary); None for more than two classes (most probable class).

    Returns
    -------
    DataFrame
        One row per attribute and value (a missing value is its own group, "unknown"): ``n``,
        ``n_positive`` (binary), ``roc_auc`` (NaN when the group lacks a class), ``sensitivity``
        and ``specificity`` at the threshold (NaN without positives or negatives; binary), and
        ``accuracy``. A group of a few images gives noisy figures: read them with ``n``.
    """
    groups = pd.DataFrame({
        "patient_sex": manifest["patient_sex"].astype("object"),
        "age_band": [age_band(years) for years in manifest["patient_age_years"]],
        "manufacturer": manifest["manufacturer"].astype("object"),
        "view_position": manifest["view_position"].astype("object"),
    }).fillna("unknown").replace("", "unknown")
    binary = y_score.ndim == 1
    called = (y_score >= threshold).astype(int) if binary else y_score.argmax(axis=1)
    rows = []
    for attribute in SUBGROUP_ATTRIBUTES:
        for value, members in groups.groupby(attribute, sort=True).groups.items():
            idx = groups.index.get_indexer(members)
            truth, scores, calls = y_true[idx], y_score[idx], called[idx]
            full = len(np.unique(truth)) == (2 if binary else y_score.shape[1])
            row = {"attribute": attribute, "group": value, "n": len(idx),
                   "roc_auc": roc_auc(truth, scores) if full else float("nan"),
                   "accuracy": float(np.mean(calls == truth))}
            if binary:
                positive = truth == 1
                row.update(n_positive=int(positive.sum()),
                           sensitivity=float(np.mean(calls[positive])) if positive.any() else float("nan"),
                           specificity=float(np.mean(1 - calls[~positive])) if (~positive).any()
                           else float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)


def calibration_metrics(y_true: np.ndarray, calibrated: np.ndarray, uncalibrated: np.ndarray, *,
                        temperatures: list[float]) -> dict[str, float]:
    """Brier score and ECE (10 bins) of the test probabilities with and without the calibration
    the model carries, and its temperature (the mean over an ensemble's members)."""
    return {"brier": brier_score(y_true, calibrated), "ece": expected_calibration_error(y_true, calibrated),
            "brier_uncalibrated": brier_score(y_true, uncalibrated),
            "ece_uncalibrated": expected_calibration_error(y_true, uncalibrated),
            "temperature": float(np.mean(temperatures))}
