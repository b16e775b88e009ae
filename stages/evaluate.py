"""Stage 7, evaluate: honest test-split metrics, DVC plots, and the model registered in MLflow.

Inputs: ``paths.model_dir`` (model and MLflow run), the split manifest and de-identified images.
Outputs: ``paths.eval_metrics`` (flat JSON, DVC metrics), ``paths.eval_plots`` (ROC,
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
0.99]; :func:`stages.scoring.degeneracy`) gets its report, its runs marked FAILED in MLflow, and
is never registered. Otherwise the registered model is a pyfunc (:mod:`stages.serving`) that takes
DICOM files, applies this threshold and refuses files outside its training domain. Before it is
registered, the leak scanner searches the MLflow run (params, tags, metric names, artifacts, the
models' files) for every identifying value of the ingested sources (``paths.ingest_dir`` and
``paths.data``, read for this check only); any hit fails the stage and nothing is registered.

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
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

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

from stages import layout, tracking
from stages.cli import StageError, run_stage
from stages.outputs import write_json, write_text
from stages.deid_leaks import identifiers_at_ingest, scan_mlflow_run
from stages.domain import TrainingDomain
from stages.eval_plots import write_confusion_data, write_plot_data, write_reliability_diagram
from stages.explain import write_grad_cam_examples
from stages.ingest import PixelSettings
from stages.models import class_indices, members_of, predict_probabilities, temperature_of, to_model_input
from stages.params import load_params, read_params_file
from stages.scoring import brier_score, degeneracy, expected_calibration_error
from stages.serving import DicomClassifier, log_classifier

logger = logging.getLogger(__name__)


THRESHOLD_METHODS = ("youden", "fixed", "target_sensitivity")
GRAD_CAM_FILE = "grad_cam.png"


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
    StageError
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
        raise StageError("the validation split holds one class only; cannot choose a threshold")
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
    StageError
        The test split holds one class only.

    Notes
    -----
    PPV and NPV are never NaN: with no predicted positives PPV is 0.0, with no predicted
    negatives NPV is 0.0 (scikit-learn's ``zero_division=0.0``), and a warning is logged, since
    0.0 then stands for "undefined". F1 is defined whenever the split holds a positive. PPV and
    NPV depend on prevalence: they hold at the test split's (``n_test_positive / n_test``).
    """
    if len(np.unique(y_true)) < 2:
        raise StageError("the test split holds one class only; ROC AUC is undefined")
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
    StageError
        The test split lacks one of the classes: its AUC and sensitivity are undefined.
    """
    missing = sorted(set(range(len(classes))) - set(np.unique(y_true)))
    if missing:
        raise StageError(f"the test split holds no image of class(es) {[classes[k] for k in missing]}; "
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


LOWER_IS_BETTER = ("brier",)
PROMOTION_SPLIT = "val"  # the images candidate and champion are compared on; never the test split


# Gains below this are the float rounding of two processes scoring the same model, not a better
# one (seen: a model re-registered unchanged "beat" itself on Brier by 1e-9).
ROUNDING = 1e-6


def should_promote(candidate: float, champion: float | None, *, metric: str = "roc_auc",
                   min_gain: float = 0.0) -> bool:
    """A candidate becomes champion when there is none, or it beats the champion on ``metric``
    by more than :data:`ROUNDING` and by at least ``min_gain`` (lower is better for the Brier
    score)."""
    if champion is None:
        return True
    gain = champion - candidate if metric in LOWER_IS_BETTER else candidate - champion
    return gain > ROUNDING and gain >= min_gain


def promotion_score(metric: str, labels: np.ndarray, predictions: pd.DataFrame, classes: list[int]) -> float:
    """``metric`` of one model's answers (``stages.serving`` output columns) against class indices.

    Threshold-dependent metrics use the model's own ``label`` column, so each model is judged at
    its own operating threshold, as it would be used.
    """
    called = class_indices(predictions["label"].to_numpy(), classes)
    if "probability" in predictions:
        scores = predictions["probability"].to_numpy(float)
        if metric == "roc_auc":
            return float(roc_auc_score(labels, scores))
        if metric == "average_precision":
            return float(average_precision_score(labels, scores))
        if metric == "brier":
            return float(brier_score_loss(labels, scores))
        if metric == "f1":
            return float(f1_score(labels, called, zero_division=0.0))
        if metric in ("sensitivity", "specificity"):
            wanted = 1 if metric == "sensitivity" else 0
            return float(np.mean(called[labels == wanted] == wanted))
    elif metric == "roc_auc":
        return roc_auc(labels, predictions[[f"probability_{c}" for c in classes]].to_numpy(float))
    if metric == "accuracy":
        return float(np.mean(called == labels))
    raise StageError(f"evaluate.promotion_metric {metric!r} is not computed for {len(classes)} classes; "
                     "use one of roc_auc, accuracy")


@dataclass(frozen=True)
class Comparison:
    """The candidate and the current champion, scored on the same images in the same run.

    ``champion`` is None when there is no champion or it could not be scored (``reason`` says
    why); ``images`` counts the files both models answered.
    """

    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    images: int
    data_version: str
    reason: str = ""

    def decide(self, *, min_gain: float) -> tuple[str, str]:
        """The alias the candidate gets (champion or challenger) and the decision in words."""
        on = (f"{self.metric} on {self.images} {PROMOTION_SPLIT} images of data {self.data_version[:12]}")
        if self.champion_version is None:
            return "champion", f"champion: no champion before ({on}: {self.candidate:.4f})"
        if self.champion is None:
            return "challenger", (f"challenger: champion version {self.champion_version} could not be "
                                  f"scored ({self.reason}); compare them and move the alias by hand")
        promote = should_promote(self.candidate, self.champion, metric=self.metric, min_gain=min_gain)
        verdict = "champion" if promote else "challenger"
        return verdict, (f"{verdict}: {on}, candidate {self.candidate:.4f} vs champion version "
                         f"{self.champion_version} {self.champion:.4f} (minimum gain {min_gain:g})")


def score_registered(model_uri: str, files: list[Path]) -> pd.DataFrame:
    """A registered pyfunc's answers for ``files``, from a fresh ``python -m stages.predict``.

    A fresh process, not this one: loading a model adds its own copy of ``stages`` (its
    ``code_paths``) to the import path, and a champion logged by older code must run its own
    code, not ours. Returns the CSV (a ``path`` column of file names), or raises StageError with
    the command's last line.
    """
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        for file in files:
            try:  # a hard link costs nothing; a copy where the file system has none
                os.link(file, inputs / file.name)
            except OSError:
                shutil.copyfile(file, inputs / file.name)
        output = Path(folder) / "predictions.csv"
        result = subprocess.run([sys.executable, "-m", "stages.predict", str(inputs), "--model", model_uri,
                                 "--output", str(output)], capture_output=True, text=True)
        if result.returncode != 0 and not output.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageError(f"scoring {model_uri} failed: {last}")
        return pd.read_csv(output, keep_default_na=False, na_values=[""], dtype={"error": str})


def compare_with_champion(candidate: pd.DataFrame, *, name: str, metric: str, files: list[Path],
                          labels: np.ndarray, classes: list[int]) -> Comparison:
    """Score the registry's current champion on ``files`` (class indices ``labels``), beside the
    candidate's answers for the same files (``candidate``, with a ``path`` column of file
    names); each figure on the files both of them answered."""
    import mlflow
    from mlflow.exceptions import MlflowException

    data = tracking.data_version()
    by_name = {file.name: label for file, label in zip(files, labels)}
    try:
        current = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    except MlflowException:  # no registered model or no champion yet
        current = None
    answered = candidate["error"].isna().to_numpy() | (candidate["error"] == "").to_numpy()
    reason, champion = "", None
    if current is not None:
        try:
            champion = score_registered(f"models:/{name}/{current.version}", files)
        except StageError as err:
            reason = str(err)
        else:
            if set(candidate.columns) != set(champion.columns):
                reason = (f"its outputs {[c for c in champion.columns if c != 'path']} are not the "
                          f"candidate's {[c for c in candidate.columns if c != 'path']}")
            else:
                champion = champion.set_index("path").loc[candidate["path"]].reset_index()
                answered &= champion["error"].isna().to_numpy()
                if not answered.any():
                    reason = f"it answered none of the {len(files)} files with a probability"
    value = promotion_score(metric, candidate_labels(candidate[answered], by_name), candidate[answered], classes)
    version = None if current is None else str(current.version)
    if current is None or reason:
        return Comparison(metric, value, None, version, int(answered.sum()), data, reason)
    champion_value = promotion_score(metric, candidate_labels(champion[answered], by_name),
                                     champion[answered], classes)
    return Comparison(metric, value, champion_value, version, int(answered.sum()), data)


def candidate_labels(predictions: pd.DataFrame, by_name: dict[str, int]) -> np.ndarray:
    """The class index of each answered file, in the order of ``predictions``."""
    return np.array([by_name[Path(path).name] for path in predictions["path"]], dtype=int)


def register_model(model_uri: str, *, name: str, comparison: Comparison, min_gain: float = 0.0,
                   tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Register ``model_uri`` with the alias the comparison decides; returns (version, alias).

    The decision, both figures and the images they were measured on are tags of the new version
    (``promotion_*``), beside ``tags``. Earlier versions stay registered; a replaced champion
    keeps its version and tags and is found as ``previous_champion``.
    """
    import mlflow

    client = mlflow.MlflowClient()
    alias, decision = comparison.decide(min_gain=min_gain)
    version = mlflow.register_model(model_uri, name).version
    promotion = {"promotion_decision": decision, "promotion_metric": comparison.metric,
                 "promotion_split": PROMOTION_SPLIT, "promotion_images": str(comparison.images),
                 "promotion_data_version": comparison.data_version,
                 "promotion_candidate": f"{comparison.candidate:.10g}",
                 "promotion_champion": "" if comparison.champion is None else f"{comparison.champion:.10g}",
                 "promotion_champion_version": comparison.champion_version or ""}
    for key, value in {**promotion, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    if alias == "champion" and comparison.champion_version is not None:
        client.set_registered_model_alias(name, "previous_champion", comparison.champion_version)
    client.set_registered_model_alias(name, alias, version)
    logger.info("registered %s version %s: %s", name, version, decision)
    return str(version), alias


def check_run(run_id: str, *, ingest_dir: Path, data_dir: Path) -> None:
    """Leak scan of the MLflow run and its children; StageError (one line, no value) on any hit."""
    identifiers = identifiers_at_ingest(ingest_dir, data_dir)
    leaks = scan_mlflow_run(identifiers, run_id)
    if leaks:
        raise StageError(f"leak check: {len(leaks)} identifying value(s) in MLflow, where and what "
                         "kind (never the value): "
                         + "; ".join(f"a {leak.source} value at {leak.output} {leak.location}"
                                     for leak in leaks[:20]) + "; the model is not registered")
    logger.info("leak check: none of %s identifying values found in MLflow run %s",
                f"{len(identifiers):,}", run_id)


def report_test_split(model, test_y: np.ndarray, test_x: np.ndarray, test_rows: pd.DataFrame, *,
                      threshold: float | None, classes: list[int], plots_dir: Path) -> tuple[dict, list[Path], pd.DataFrame]:
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


def register_and_promote(model_dir: Path, manifest: pd.DataFrame, *, run_id: str, threshold: float | None,
                         metrics: dict, paths, params, ingest) -> None:
    """Log the DICOM pyfunc into the active run, leak-check the run, compare the candidate with the
    champion on the promotion split and register it with the alias that decides."""
    import mlflow

    # The registered model: DICOM in, probabilities and the label at this threshold out.
    registered = dict(threshold=threshold, classes=ingest.classes, settings=PixelSettings.from_params(ingest),
                      domain=TrainingDomain.from_manifest(manifest[(manifest["split"] == "train").to_numpy()]))
    classifier = log_classifier(model_dir / layout.MODEL_FILE, **registered)
    check_run(run_id, ingest_dir=Path(paths.ingest_dir), data_dir=Path(paths.data))
    promotion = promotion_files(manifest, Path(paths.deid_dir), classes=ingest.classes)
    # The candidate as it was just logged, in this process; the champion in a process of its own.
    local = DicomClassifier(**registered).load(model_dir / layout.MODEL_FILE)
    candidate = local.predict(None, pd.DataFrame({"path": [str(file) for file in promotion["files"]]}))
    candidate.insert(0, "path", [file.name for file in promotion["files"]])
    comparison = compare_with_champion(candidate, name=params.registered_model_name,
                                       metric=params.promotion_metric, **promotion)
    version, alias = register_model(
        classifier.model_uri, name=params.registered_model_name, comparison=comparison,
        min_gain=params.promotion_min_gain,
        tags={f"test_{name}": f"{metrics[name]:.6g}" for name in ("roc_auc", "brier", "ece")})
    mlflow.set_tags({"registered_version": version, "registered_alias": alias})


def main() -> None:
    import keras
    import mlflow

    paths, params, ingest = load_params("paths"), load_params("evaluate"), load_params("ingest")
    model_dir = Path(paths.model_dir)
    model = keras.models.load_model(model_dir / layout.MODEL_FILE)
    run_info = json.loads((model_dir / layout.RUN_INFO).read_text())
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES, mmap_mode="r")

    def split_inputs(split: str) -> tuple[np.ndarray, np.ndarray]:
        chosen = np.flatnonzero((manifest["split"] == split).to_numpy())
        labels = class_indices(manifest["label"].to_numpy()[chosen], ingest.classes)
        return labels, to_model_input(np.asarray(images[chosen]))

    val_y, val_x = split_inputs("val")
    val_score = predict_probabilities(model, val_x)
    threshold = None
    if len(ingest.classes) == 2:
        threshold = choose_threshold(val_y, val_score, method=params.threshold_method,
                                     fixed=params.fixed_threshold, target_sensitivity=params.target_sensitivity)
    metrics, plot_files, subgroups = report_test_split(
        model, *split_inputs("test"), manifest[(manifest["split"] == "test").to_numpy()], threshold=threshold,
        classes=ingest.classes, plots_dir=Path(paths.eval_plots))
    if params.promotion_metric not in metrics:
        raise StageError(f"evaluate.promotion_metric {params.promotion_metric!r} is not computed for "
                         f"{len(ingest.classes)} classes; use one of roc_auc, accuracy")
    write_json(Path(paths.eval_metrics), metrics)
    write_text(Path(paths.eval_subgroups), subgroups.to_csv(index=False, float_format="%.4f"))
    problems = [*run_info.get("degenerate", []), *degeneracy(val_y, val_score, threshold=threshold)]

    # Evaluation is a nested run of the training run: evaluate.* can change and rerun this
    # stage alone, and MLflow forbids changing a param already logged on a run.
    tracking.configure_mlflow()
    test_metrics = {f"test_{name}": value for name, value in metrics.items()}
    with mlflow.start_run(run_id=run_info["run_id"]):
        mlflow.log_metrics(test_metrics)
        with mlflow.start_run(run_name="evaluate", nested=True, tags=tracking.run_tags()) as evaluation:
            mlflow.log_params(tracking.flatten_params({"evaluate": read_params_file()["evaluate"]}))
            mlflow.log_metrics(test_metrics)
            for path in [*plot_files, Path(paths.eval_metrics), Path(paths.eval_subgroups)]:
                mlflow.log_artifact(str(path), artifact_path="evaluation")
            if problems:
                mlflow.set_tag(tracking.DEGENERATE_TAG, "; ".join(problems))
            else:
                register_and_promote(model_dir, manifest, run_id=run_info["run_id"], threshold=threshold,
                                     metrics=metrics, paths=paths, params=params, ingest=ingest)
    if problems:
        client = mlflow.MlflowClient()
        for run_id in (run_info["run_id"], evaluation.info.run_id):
            client.set_terminated(run_id, status="FAILED")
        raise StageError(f"the model is degenerate on the validation split (validation AUC "
                         f"{roc_auc(val_y, val_score):.3f}): {'; '.join(problems)}. Its runs are marked "
                         f"FAILED and it is not registered; the test report is in {paths.eval_metrics}")


def promotion_files(manifest: pd.DataFrame, deid_dir: Path, *, classes: list[int]) -> dict:
    """The de-identified files of the promotion split and their class indices (one per file:
    every frame of a file carries its label)."""
    rows = manifest[(manifest["split"] == PROMOTION_SPLIT).to_numpy()].drop_duplicates("dicom_file")
    return {"files": [deid_dir / name for name in rows["dicom_file"]],
            "labels": class_indices(rows["label"].to_numpy(), classes), "classes": classes}


def calibration_metrics(y_true: np.ndarray, calibrated: np.ndarray, uncalibrated: np.ndarray, *,
                        temperatures: list[float]) -> dict[str, float]:
    """Brier score and ECE (10 bins) of the test probabilities with and without the calibration
    the model carries, and its temperature (the mean over an ensemble's members)."""
    return {"brier": brier_score(y_true, calibrated), "ece": expected_calibration_error(y_true, calibrated),
            "brier_uncalibrated": brier_score(y_true, uncalibrated),
            "ece_uncalibrated": expected_calibration_error(y_true, uncalibrated),
            "temperature": float(np.mean(temperatures))}


if __name__ == "__main__":
    run_stage(main)
