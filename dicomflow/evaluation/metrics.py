"""The test report's figures: operating threshold, ROC AUC and the confusion-matrix metrics with
95 % intervals that resample patients, multi-class and per-class metrics, calibration and subgroups.

Each figure is a metric of :mod:`dicomflow.metrics` (the registry) computed on the test split, and
each interval a patient bootstrap (:mod:`dicomflow.evaluation.intervals`) of the metrics the
registry marks ``interval``; this module chooses the threshold and assembles the report.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from dicomflow import metrics as registry
from dicomflow.config.params import THRESHOLD_METHODS
from dicomflow.errors import DataError
from dicomflow.evaluation.intervals import Interval, interval_from_report, patient_bootstrap
from dicomflow.metrics import HEADLINE_METRICS, HEADLINE_PRIVACY, Scores

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


def choose_referable_threshold(y_true: np.ndarray, y_score: np.ndarray, *, referable: int, method: str,
                               fixed: float | None = None, target_sensitivity: float | None = None) -> float:
    """The operating threshold of an ordinal task's referable call, chosen on the validation split.

    The derived binary task "grade index ``referable`` or higher", scored by each image's
    probability of it (:func:`dicomflow.metrics.at_least`), through :func:`choose_threshold`
    with the same ``method`` and options as a binary model's (``evaluate.threshold_method``).

    Parameters
    ----------
    y_true : ndarray of shape (n,)
        Validation grade indices, 0 to k - 1.
    y_score : ndarray of shape (n, k)
        Validation grade probabilities.
    referable : int
        The grade index from which an image is referable (1 to k - 1).
    method, fixed, target_sensitivity
        As for :func:`choose_threshold`.

    Returns
    -------
    float
        An image is called referable when its probability of grade ``referable`` or higher is >= it.

    Raises
    ------
    ValueError
        ``referable`` outside 1 to k - 1, or as :func:`choose_threshold`.
    DataError
        The validation split is all referable or all not (``youden``, ``target_sensitivity``).
    """
    positive = (np.asarray(y_true, int).ravel() >= referable).astype(int)
    return choose_threshold(positive, registry.at_least(y_score, referable), method=method, fixed=fixed,
                            target_sensitivity=target_sensitivity)


def choose_operating_points(y_true: np.ndarray, y_score: np.ndarray, *, task: str, classes: list[int],
                            referable_grade: int | None, method: str, fixed: float | None = None,
                            target_sensitivity: float | None = None) -> tuple[float | None, float | None]:
    """A task's operating thresholds, chosen on the validation split (images or studies).

    Parameters
    ----------
    y_true, y_score : ndarray
        Validation class indices and probabilities: ``(n,)`` (binary) or ``(n, k)``.
    task : str
        ``train.task``.
    classes : list of int
        ``ingest.classes``.
    referable_grade : int or None
        ``evaluate.referable_grade`` (ordinal only).
    method, fixed, target_sensitivity
        As for :func:`choose_threshold` (``evaluate.threshold_method`` and its options).

    Returns
    -------
    tuple of (float or None, float or None)
        Class 1's threshold (binary; None otherwise) and the referable threshold (an ordinal task
        with a referable grade; None otherwise).
    """
    options = dict(method=method, fixed=fixed, target_sensitivity=target_sensitivity)
    threshold = choose_threshold(y_true, y_score, **options) if task == registry.BINARY else None
    referable = None if referable_grade is None else choose_referable_threshold(
        y_true, y_score, referable=classes.index(referable_grade), **options)
    return threshold, referable


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """ROC AUC of binary scores (n,), or the macro average of one-vs-rest AUCs for (n, k) class
    probabilities (each class present in ``y_true``, class indices 0..k-1)."""
    return registry.roc_auc(Scores.at_threshold(y_true, y_score))


def loggable(metrics: dict[str, float | str | None]) -> dict[str, float]:
    """The figures of a report that are numbers: what MLflow logs as metrics (an interval that is
    not estimable is None, its reason text; both stay in the report file)."""
    return {name: value for name, value in metrics.items()
            if isinstance(value, (int, float, np.number)) and not isinstance(value, bool)}


def headline(metrics: dict[str, float]) -> dict[str, float]:
    """The headline metrics (:data:`dicomflow.metrics.HEADLINE_METRICS`, then
    :data:`~dicomflow.metrics.HEADLINE_PRIVACY`: what `dvc exp show` compares in its 160 columns,
    beside the params changed) that ``metrics`` has (multi-class: no sensitivity or specificity;
    without DP: no ε); every other figure is in the full test report."""
    return {name: metrics[name] for name in (*HEADLINE_METRICS, *HEADLINE_PRIVACY) if name in metrics}


# The registry's metrics in the test report, per task (calibration: :func:`calibration_metrics`).
REPORTED = {registry.BINARY: ("roc_auc", "average_precision", "brier", "accuracy", "sensitivity", "specificity",
                              "ppv", "npv", "f1"),
            registry.MULTICLASS: ("roc_auc", "accuracy", "balanced_accuracy", "macro_f1"),
            registry.ORDINAL: ("roc_auc", "accuracy", "balanced_accuracy", "macro_f1", "qwk", "mae_grade")}
# An ordinal task with a referable grade: the derived "at least grade r" figures.
REFERABLE = ("referable_auc", "referable_sensitivity", "referable_specificity")
PER_CLASS = ("roc_auc", "sensitivity", "specificity", "ppv", "f1")  # one-vs-rest, for more than two classes
PER_CLASS_INTERVALS = ("sensitivity", "specificity")  # the per-class figures the model card gives an interval


Report = dict[str, float | str | None]  # a figure, an interval end (None: not estimable) or its note


def compute_metrics(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float,
                    patients: np.ndarray) -> Report:
    """Test-split metrics: ranking, calibration, and the confusion counts at ``threshold``, with
    95 % intervals that resample patients.

    Parameters
    ----------
    y_true : ndarray of shape (n,)
        Test labels, 0 or 1.
    y_score : ndarray of shape (n,)
        Predicted probability of class 1, in [0, 1].
    threshold : float
        Operating threshold; an image is called positive when its score is >= ``threshold``.
    patients : ndarray of shape (n,)
        Each image's patient key (the split manifest's ``patient_key``): the unit the intervals
        resample.

    Returns
    -------
    dict
        ``roc_auc``; ``average_precision`` (area under the precision-recall curve, scikit-learn's
        step sum); ``brier`` (mean squared error of the probabilities: 0 is perfect, a constant 0.5
        scores 0.25); at ``threshold``: ``accuracy``, ``sensitivity``, ``specificity``, ``ppv``
        (precision), ``npv`` and ``f1``; and ``threshold``, ``n_test``, ``n_test_positive``,
        ``n_test_patients``. Each metric the registry marks ``interval`` (AUC, accuracy,
        sensitivity, specificity, PPV, NPV) is followed by ``<name>_ci_low`` and
        ``<name>_ci_high`` (a patient bootstrap, :func:`~dicomflow.evaluation.intervals.patient_bootstrap`;
        None where not estimable) and ``<name>_ci_note`` ("" or ``"not estimable: <why>"``).

    Raises
    ------
    DataError
        The test split holds one class only, or ``patients`` is not one key per image.

    Notes
    -----
    PPV and NPV are never NaN: with no predicted positives PPV is 0.0, with no predicted
    negatives NPV is 0.0 (scikit-learn's ``zero_division=0.0``), and a warning is logged, since
    0.0 then stands for "undefined". F1 is defined whenever the split holds a positive. PPV and
    NPV depend on prevalence: they hold at the test split's (``n_test_positive / n_test``).
    """
    if len(np.unique(y_true)) < 2:
        raise DataError("the test split holds one class only; ROC AUC is undefined")
    scores = Scores.at_threshold(y_true, y_score, threshold=threshold)
    for label, name in ((1, "PPV"), (0, "NPV")):
        if not (scores.called == label).any():
            logger.warning("no test image is predicted %s at threshold %.3f; %s reported as 0.0 "
                           "(undefined)", "positive" if label else "negative", threshold, name)
    return {**_with_intervals(scores, REPORTED[registry.BINARY], patients), "threshold": float(threshold),
            "n_test": int(len(y_true)), "n_test_positive": int(y_true.sum()),
            "n_test_patients": _count_patients(patients)}


def _with_intervals(scores: Scores, names: tuple[str, ...], patients: np.ndarray, *,
                    interval_names: tuple[str, ...] | None = None, suffix: str = "") -> Report:
    """The metrics ``names`` of ``scores``, each of ``interval_names`` (default: those the registry
    gives an interval) followed by its patient-bootstrap interval; ``suffix`` is appended to the
    names (``_<class>``)."""
    if interval_names is None:
        interval_names = registry.with_interval(scores.task)
    intervals = patient_bootstrap(scores, patients, [name for name in names if name in interval_names])
    report: Report = {}
    for name in names:
        report[f"{name}{suffix}"] = registry.compute(name, scores)
        if name in intervals:
            report.update(intervals[name].as_report(f"{name}{suffix}"))
    return report


def _count_patients(patients: np.ndarray) -> int:
    return int(pd.Series(np.asarray(patients, dtype=object)).nunique())


def compute_multiclass_metrics(y_true: np.ndarray, y_score: np.ndarray, *, classes: list[int],
                               patients: np.ndarray, task: str = registry.MULTICLASS,
                               referable_grade: int | None = None,
                               referable_threshold: float | None = None) -> Report:
    """Test-split metrics for more than two classes (multi-class or ordinal grades).

    Each image is called its most probable class (``multiclass``) or its median grade
    (``ordinal``, :func:`dicomflow.metrics.median_grade`).

    Parameters
    ----------
    y_true : ndarray of shape (n,)
        Class indices, 0 to k - 1 (positions in ``classes``).
    y_score : ndarray of shape (n, k)
        Predicted class probabilities.
    classes : list of int
        The label of each class index, used in the per-class metric names.
    patients : ndarray of shape (n,)
        Each image's patient key, as for :func:`compute_metrics`.
    task : {"multiclass", "ordinal"}, default="multiclass"
        ``train.task``.
    referable_grade : int or None, default=None
        Ordinal only: the label (a value of ``classes``) from which an image is referable
        (``evaluate.referable_grade``); None: no referable figures.
    referable_threshold : float or None, default=None
        With ``referable_grade``: the threshold on the referable probability chosen on validation
        (:func:`choose_referable_threshold`); required there.

    Returns
    -------
    dict
        ``roc_auc`` (macro average of one-vs-rest AUCs), ``accuracy`` (both with their patient
        intervals, ``_ci_low``, ``_ci_high``, ``_ci_note``), ``balanced_accuracy`` (mean per-class
        sensitivity), ``macro_f1``, ``n_test``, ``n_test_patients``; per class c (one-vs-rest):
        ``roc_auc_<c>``, ``sensitivity_<c>`` and ``specificity_<c>`` (with their intervals),
        ``ppv_<c>``, ``f1_<c>``, ``n_test_<c>`` (images of class c) and ``n_called_<c>`` (images
        called c). Ordinal adds ``qwk`` (quadratic weighted kappa, with its interval) and
        ``mae_grade`` (mean absolute grade error); with a referable grade also ``referable_grade``,
        ``referable_threshold``, ``referable_auc``, ``referable_sensitivity`` and
        ``referable_specificity`` (each with its interval; the last two at the threshold) and
        ``n_test_referable``.

    Raises
    ------
    DataError
        The test split lacks one of the classes: its AUC and sensitivity are undefined.
    ValueError
        ``task`` is not multiclass or ordinal, a referable grade for another task or not in
        ``classes`` after the first, or without its threshold.
    """
    if task not in (registry.MULTICLASS, registry.ORDINAL):
        raise ValueError(f"task must be 'multiclass' or 'ordinal' for {len(classes)} classes; got {task!r}")
    referable = _referable_index(classes, task=task, referable_grade=referable_grade,
                                 referable_threshold=referable_threshold)
    missing = sorted(set(range(len(classes))) - set(np.unique(y_true)))
    if missing:
        raise DataError(f"the test split holds no image of class(es) {[classes[k] for k in missing]}; "
                         "per-class metrics are undefined")
    scores = Scores.at_threshold(y_true, y_score, task=task, referable=referable,
                                 referable_threshold=referable_threshold)
    names = REPORTED[task] + (REFERABLE if referable is not None else ())
    metrics = {**_with_intervals(scores, names, patients), "n_test": int(len(y_true)),
               "n_test_patients": _count_patients(patients)}
    if referable is not None:
        metrics.update(referable_grade=referable_grade, referable_threshold=float(referable_threshold),
                       n_test_referable=int((y_true >= referable).sum()))
    for k, label in enumerate(classes):
        # Class k against the rest: a two-class problem, scored by the two-class metrics.
        one_vs_rest = Scores((y_true == k).astype(int), y_score[:, k], (scores.called == k).astype(int))
        metrics.update(_with_intervals(one_vs_rest, PER_CLASS, patients, interval_names=PER_CLASS_INTERVALS,
                                       suffix=f"_{label}"))
        metrics[f"n_test_{label}"] = int((y_true == k).sum())
        metrics[f"n_called_{label}"] = int((scores.called == k).sum())
    return metrics


def _referable_index(classes: list[int], *, task: str, referable_grade: int | None,
                     referable_threshold: float | None) -> int | None:
    """The grade index of ``referable_grade`` (None without one), after checking it fits."""
    if referable_grade is None:
        return None
    if task != registry.ORDINAL:
        raise ValueError(f"referable_grade applies to the ordinal task; got {referable_grade} for task {task!r}")
    if referable_grade not in classes[1:]:
        raise ValueError(f"referable_grade must be one of the grades after the first, {classes[1:]}; "
                         f"got {referable_grade!r}")
    if referable_threshold is None:
        raise ValueError("referable_threshold must be a float when referable_grade is set; choose it on "
                         "validation with choose_referable_threshold")
    return classes.index(referable_grade)


SUBGROUP_ATTRIBUTES = ("patient_sex", "age_band", "manufacturer", "view_position")
AGE_BANDS = ((0, "0-17"), (18, "18-39"), (40, "40-64"), (65, "65+"))  # lower bound, name
# An ordinal subgroup's QWK needs this many images (and two grades): below it one image moves it by
# a tenth or more.
MIN_QWK_IMAGES = 20


def age_band(years: float | None) -> str:
    """The band of an age in years (``AGE_BANDS``), or "unknown"."""
    if years is None or pd.isna(years):
        return "unknown"
    return next(name for low, name in reversed(AGE_BANDS) if years >= low)


def subgroup_metrics(manifest: pd.DataFrame, y_true: np.ndarray, y_score: np.ndarray, *,
                     threshold: float | None, task: str | None = None) -> pd.DataFrame:
    """AUC (with a patient interval), sensitivity and specificity (two classes) or QWK (ordinal)
    within each sex, age band, manufacturer and view position.

    Parameters
    ----------
    manifest : DataFrame
        The test images' rows of the de-identified manifest (``patient_key``, ``patient_sex``,
        ``patient_age_years``, ``manufacturer``, ``view_position``), in the order of ``y_true``.
    y_true, y_score : ndarray
        As for :func:`compute_metrics` (binary) or :func:`compute_multiclass_metrics`.
    threshold : float or None
        The operating threshold (binary); None for more than two classes.
    task : str or None, default=None
        ``train.task``: ``ordinal`` calls each image its median grade; None or ``multiclass`` its
        most probable class (more than two classes).

    Returns
    -------
    DataFrame
        One row per attribute and value (a missing value is its own group, "unknown"): ``n``
        (images), ``n_patients``, ``roc_auc`` (NaN when the group lacks a class) with its 95 %
        patient-bootstrap interval ``roc_auc_ci_low``, ``roc_auc_ci_high`` (NaN where not
        estimable) and ``roc_auc_ci_note`` ("" or why not), ``accuracy``, and for two classes
        ``n_positive`` and ``sensitivity`` and ``specificity`` at the threshold (NaN without
        positives or negatives). More than two classes: ``roc_auc`` is the macro one-vs-rest AUC
        (NaN unless the group holds every class); ordinal adds ``qwk`` (NaN below
        :data:`MIN_QWK_IMAGES` images or with one grade). A group of a few patients gives noisy
        figures: read them with ``n_patients``.

    Raises
    ------
    DataError
        ``manifest`` has no ``patient_key`` column, or a key is missing.
    """
    if "patient_key" not in manifest:
        raise DataError("the test rows have no patient_key column; subgroup intervals resample patients: "
                        "pass the split manifest's rows")
    groups = pd.DataFrame({
        "patient_sex": manifest["patient_sex"].astype("object"),
        "age_band": [age_band(years) for years in manifest["patient_age_years"]],
        "manufacturer": manifest["manufacturer"].astype("object"),
        "view_position": manifest["view_position"].astype("object"),
    }).fillna("unknown").replace("", "unknown")
    patients = manifest["patient_key"].to_numpy(dtype=object)
    binary = y_score.ndim == 1
    ordinal = task == registry.ORDINAL
    called = Scores.at_threshold(y_true, y_score, threshold=0.5 if threshold is None else threshold,
                                 task=None if binary else task).called
    rows = []
    for attribute in SUBGROUP_ATTRIBUTES:
        for value, members in groups.groupby(attribute, sort=True).groups.items():
            idx = groups.index.get_indexer(members)
            truth, scores, calls = y_true[idx], y_score[idx], called[idx]
            full = len(np.unique(truth)) == (2 if binary else y_score.shape[1])
            if full:
                interval = patient_bootstrap(Scores(truth, scores, calls), patients[idx], ["roc_auc"])["roc_auc"]
            else:
                interval = Interval.not_estimable("no AUC, the group lacks a class")
            row = {"attribute": attribute, "group": value, "n": len(idx),
                   "n_patients": _count_patients(patients[idx]),
                   "roc_auc": roc_auc(truth, scores) if full else float("nan"),
                   **{key: float("nan") if value is None else value
                      for key, value in interval.as_report("roc_auc").items()},
                   "accuracy": float(np.mean(calls == truth))}
            if ordinal:
                graded = len(idx) >= MIN_QWK_IMAGES and len(np.unique(truth)) > 1
                row["qwk"] = registry.qwk(Scores(truth, scores, calls, registry.ORDINAL)) if graded else float("nan")
            if binary:
                positive = truth == 1
                row.update(n_positive=int(positive.sum()),
                           sensitivity=float(np.mean(calls[positive])) if positive.any() else float("nan"),
                           specificity=float(np.mean(1 - calls[~positive])) if (~positive).any()
                           else float("nan"))
            rows.append(row)
    return pd.DataFrame(rows)


def weakest_subgroup(subgroups: pd.DataFrame, *, overall_auc: float) -> str:
    """The subgroup line of the test log: which subgroup is weaker by AUC, if any is.

    A subgroup is named weaker only when its interval's upper end is below the whole split's AUC.
    When every subgroup's AUC is the same to 3 decimals, when the lowest one's interval reaches the
    whole split's AUC, or when its interval is not estimable, the line says that no subgroup is
    shown to be weaker (the lowest is named, with why, unless all tie).

    Parameters
    ----------
    subgroups : DataFrame
        :func:`subgroup_metrics`.
    overall_auc : float
        The whole test split's ROC AUC.

    Returns
    -------
    str
        One line, starting "weakest subgroup by AUC: ".
    """
    head = "weakest subgroup by AUC: "
    rated = subgroups.dropna(subset=["roc_auc"])
    if rated.empty:
        return head + "none, no subgroup has an AUC (each lacks a class)"
    aucs = rated["roc_auc"].round(3)
    if aucs.nunique() == 1:
        return head + f"none, no subgroup is weaker (all {len(rated)} with an AUC at {aucs.iloc[0]:.3f})"
    row = rated.loc[rated["roc_auc"].idxmin()]
    who = (f"{row['attribute']} = {row['group']} (n {int(row['n'])}, {int(row['n_patients'])} patients), "
           f"AUC {row['roc_auc']:.3f}")
    interval = interval_from_report(row.to_dict(), "roc_auc")
    if interval is None or not interval.estimated:
        why = interval.note if interval is not None else "no interval"
        return head + f"none shown; the lowest, {who}, has no interval ({why})"
    if interval.high < overall_auc:
        return head + f"{who} (95% CI {interval.describe()}), below the whole split's {overall_auc:.3f}"
    return (head + f"none shown; the lowest, {who} (95% CI {interval.describe()}), is within its interval "
            f"of the whole split's {overall_auc:.3f}")


def calibration_metrics(y_true: np.ndarray, calibrated: np.ndarray, uncalibrated: np.ndarray, *,
                        temperatures: list[float], classes: list[int] | None = None) -> dict[str, float]:
    """Brier score and ECE (10 bins; top-label for more than two classes) of the test probabilities
    with and without the calibration the model carries, and its temperature (the mean over an
    ensemble's members). With more than two ``classes``, also ``ece_<c>`` per class c: the ECE of
    its one-vs-rest probability (the per-class reliability diagram's figure)."""
    calibrated_scores = Scores.at_threshold(y_true, calibrated)
    uncalibrated_scores = Scores.at_threshold(y_true, uncalibrated)
    figures = {"brier": registry.brier(calibrated_scores), "ece": registry.ece(calibrated_scores),
               "brier_uncalibrated": registry.brier(uncalibrated_scores),
               "ece_uncalibrated": registry.ece(uncalibrated_scores), "temperature": float(np.mean(temperatures))}
    if classes is not None and len(classes) > 2:
        y_true, calibrated = np.asarray(y_true, int).ravel(), np.asarray(calibrated, float)
        figures.update({f"ece_{label}": registry.ece(Scores.at_threshold((y_true == k).astype(int), calibrated[:, k]))
                        for k, label in enumerate(classes)})
    return figures
