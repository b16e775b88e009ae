"""Every metric dicomflow reports or promotes on, in one registry.

A :class:`Metric` is a name, a function of :class:`Scores` (labels, probabilities and the classes
called at the operating point), the direction that is better, the tasks it is defined for, and
whether the test report gives it an interval (and its range, and when it is undefined).
The allowed ``evaluate.promotion_metric`` values, the error messages that list them, the headline
metrics of ``dvc exp show``, the promotion scoring, the test report and its intervals all read :data:`METRICS`:
adding a metric is one entry here and its test (``tests/test_metrics.py``).

Only NumPy is imported at module level: the params loader builds its choices from this module, and
every stage and the registered model import the loader. scikit-learn is imported by the functions
that need it.

Tasks: ``binary`` (two classes, one probability per image: that of class index 1) and
``multiclass`` (k > 2 classes, an ``(n, k)`` probability matrix; an image is called its most
probable class). Labels are class indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dicomflow.errors import SettingsError

BINARY, MULTICLASS = "binary", "multiclass"
ECE_BINS = 10


@dataclass(frozen=True)
class Scores:
    """One model's answers on a set of images, as every metric reads them.

    Attributes
    ----------
    labels : ndarray of shape (n,)
        True class indices.
    probabilities : ndarray of shape (n,) or (n, k)
        The probability of class index 1 (binary) or of each class (multi-class).
    called : ndarray of shape (n,)
        The class index each image is called at the model's operating point (its threshold for two
        classes, the most probable class otherwise).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    called: np.ndarray

    @classmethod
    def at_threshold(cls, labels: np.ndarray, probabilities: np.ndarray, *, threshold: float = 0.5) -> Scores:
        """Scores whose calls are class 1 at ``probability >= threshold`` (two classes) or the most
        probable class (more)."""
        labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
        if is_binary(probabilities):
            probabilities = probabilities.ravel()
            return cls(labels, probabilities, (probabilities >= threshold).astype(int))
        return cls(labels, probabilities, probabilities.argmax(axis=1))

    @property
    def task(self) -> str:
        return BINARY if self.probabilities.ndim == 1 else MULTICLASS


def is_binary(probabilities: np.ndarray) -> bool:
    """True for ``(n,)`` or ``(n, 1)`` probabilities: two classes."""
    return probabilities.ndim == 1 or probabilities.shape[1] == 1


# The metric functions: Scores in, a float out. Each says what it returns for degenerate input.

def roc_auc(scores: Scores) -> float:
    """ROC AUC of class 1 (binary), or the macro average of the one-vs-rest AUCs of the classes
    present in the labels (multi-class). Raises ValueError when the labels hold one class, as
    scikit-learn's ``roc_auc_score`` does."""
    if scores.task == BINARY:
        return _binary_auc(scores.labels == 1, scores.probabilities)
    return float(np.mean([_binary_auc(scores.labels == k, scores.probabilities[:, k])
                          for k in np.unique(scores.labels)]))


def _binary_auc(positive: np.ndarray, probabilities: np.ndarray) -> float:
    """The Mann-Whitney form of the ROC AUC: the share of (positive, negative) pairs the positive
    outscores, a tie counting one half (midranks).

    The area scikit-learn's ``roc_auc_score`` integrates, to the last bit or so, in NumPy alone:
    about 30 times faster on a test split, which the patient bootstrap of
    :mod:`dicomflow.evaluation.intervals` needs (a thousand AUCs per subgroup).
    """
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        raise ValueError("only one class is present in the labels; ROC AUC is not defined then")
    if not np.isfinite(probabilities).all():
        raise ValueError("the probabilities hold NaN or infinity; ROC AUC is not defined then")
    _, rank_of, counts = np.unique(probabilities, return_inverse=True, return_counts=True)
    midranks = np.cumsum(counts) - (counts - 1) / 2  # 1-based: tied values share their mean rank
    wins = midranks[rank_of][positive].sum() - n_positive * (n_positive + 1) / 2
    return float(wins / (n_positive * n_negative))


def average_precision(scores: Scores) -> float:
    """Area under the precision-recall curve of class 1 (scikit-learn's step sum)."""
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(scores.labels, scores.probabilities))


def brier(scores: Scores) -> float:
    """Mean squared error of the probabilities: (p - y)^2 for two classes (0 is perfect, a
    constant 0.5 scores 0.25), the sum over classes of (p_k - [y = k])^2 for more."""
    if scores.task == BINARY:
        return float(np.mean((scores.probabilities - scores.labels) ** 2))
    one_hot = np.eye(scores.probabilities.shape[1])[scores.labels]
    return float(np.mean(np.sum((scores.probabilities - one_hot) ** 2, axis=1)))


def reliability_table(labels: np.ndarray, probabilities: np.ndarray, *, n_bins: int = ECE_BINS) -> list[dict]:
    """The reliability diagram in ``n_bins`` equal-width bins of [0, 1], empty bins included.

    Two classes: bins of the probability of class 1, against the share of class 1 in the bin.
    More classes: bins of the top-label confidence (the highest probability), against the share
    of images whose most probable class is right (Guo et al., 2017).

    Returns
    -------
    list of dict
        Per bin: ``low``, ``high`` (edges; the last bin includes 1), ``count``, and
        ``mean_predicted`` and ``observed`` (NaN in an empty bin).
    """
    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    if is_binary(probabilities):
        predicted, observed = probabilities.ravel(), labels.astype(float)
    else:
        predicted = probabilities.max(axis=1)
        observed = (probabilities.argmax(axis=1) == labels).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.searchsorted(edges, predicted, side="right") - 1, 0, n_bins - 1)
    rows = []
    for b in range(n_bins):
        members = bins == b
        count = int(members.sum())
        rows.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": count,
                     "mean_predicted": float(predicted[members].mean()) if count else float("nan"),
                     "observed": float(observed[members].mean()) if count else float("nan")})
    return rows


def ece(scores: Scores) -> float:
    """Expected calibration error: the count-weighted mean gap between predicted and observed in
    the :data:`ECE_BINS` bins of :func:`reliability_table` (0 is perfectly calibrated)."""
    rows = reliability_table(scores.labels, scores.probabilities)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] * abs(row["mean_predicted"] - row["observed"])
                     for row in rows if row["count"]) / total)


def accuracy(scores: Scores) -> float:
    """Share of images called their true class."""
    return float(np.mean(scores.called == scores.labels))


def sensitivity(scores: Scores) -> float:
    """Share of class-1 images called class 1 (recall, true positive rate)."""
    return float(np.mean(scores.called[scores.labels == 1] == 1))


def specificity(scores: Scores) -> float:
    """Share of class-0 images called class 0 (true negative rate)."""
    return float(np.mean(scores.called[scores.labels == 0] == 0))


def ppv(scores: Scores) -> float:
    """Positive predictive value (precision of class 1); 0.0 when no image is called class 1
    (scikit-learn's ``zero_division=0.0``)."""
    called = scores.called == 1
    return float(np.mean(scores.labels[called] == 1)) if called.any() else 0.0


def npv(scores: Scores) -> float:
    """Negative predictive value (precision of class 0); 0.0 when no image is called class 0."""
    called = scores.called == 0
    return float(np.mean(scores.labels[called] == 0)) if called.any() else 0.0


def f1(scores: Scores) -> float:
    """F1 of class 1 at the operating point; 0.0 when it has no true or called positive."""
    from sklearn.metrics import f1_score

    return float(f1_score(scores.labels, scores.called, zero_division=0.0))


def macro_f1(scores: Scores) -> float:
    """Unweighted mean of the per-class F1 scores."""
    from sklearn.metrics import f1_score

    return float(f1_score(scores.labels, scores.called, average="macro", zero_division=0.0))


def _called_positive(scores: Scores) -> bool:
    """Some image is called class 1 (PPV is defined)."""
    return bool((scores.called == 1).any())


def _called_negative(scores: Scores) -> bool:
    """Some image is called class 0 (NPV is defined)."""
    return bool((scores.called == 0).any())


@dataclass(frozen=True)
class Metric:
    """A registered metric.

    Attributes
    ----------
    name : str
        Its key in reports, MLflow (``test_<name>``) and ``evaluate.promotion_metric``.
    compute : callable
        ``Scores -> float``.
    higher_is_better : bool
        Its direction, for promotion.
    tasks : tuple of str
        The tasks it is defined for (:data:`BINARY`, :data:`MULTICLASS`).
    headline : bool
        Whether ``dvc exp show`` shows it (the headline metrics file).
    interval : bool
        Whether the test report gives it a 95 % interval (a patient bootstrap:
        :mod:`dicomflow.evaluation.intervals`).
    bounds : tuple of float
        The range of its values; interval ends are clipped to it.
    defined : callable or None
        ``Scores -> bool``: whether it is defined on a set of images that holds every class
        (None: always). A bootstrap resample on which it is not is left out of its interval.
    undefined : str
        When it is not defined, in words (for the reason an interval is not estimable).
    """

    name: str
    compute: Callable[[Scores], float]
    higher_is_better: bool
    tasks: tuple[str, ...]
    headline: bool = False
    interval: bool = False
    bounds: tuple[float, float] = (0.0, 1.0)
    defined: Callable[[Scores], bool] | None = None
    undefined: str = ""


BOTH = (BINARY, MULTICLASS)
# In the order of the headline columns of `dvc exp show`. The metrics with an interval are those
# the model card prints with one: the AUC and the proportions of images (rates at the threshold).
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("roc_auc", roc_auc, True, BOTH, headline=True, interval=True),
    Metric("sensitivity", sensitivity, True, (BINARY,), headline=True, interval=True),
    Metric("specificity", specificity, True, (BINARY,), headline=True, interval=True),
    Metric("accuracy", accuracy, True, BOTH, headline=True, interval=True),
    Metric("brier", brier, False, BOTH, headline=True, bounds=(0.0, 2.0)),  # 2: all mass on a wrong class
    Metric("ece", ece, False, BOTH, headline=True),
    Metric("average_precision", average_precision, True, (BINARY,)),
    Metric("ppv", ppv, True, (BINARY,), interval=True, defined=_called_positive,
           undefined="no image is called positive"),
    Metric("npv", npv, True, (BINARY,), interval=True, defined=_called_negative,
           undefined="no image is called negative"),
    Metric("f1", f1, True, (BINARY,)),
    Metric("macro_f1", macro_f1, True, (MULTICLASS,)),
)}
METRIC_NAMES = tuple(METRICS)
HEADLINE_METRICS = tuple(name for name, metric in METRICS.items() if metric.headline)


def task_of(n_classes: int) -> str:
    """The task of a model with ``n_classes`` classes."""
    return BINARY if n_classes == 2 else MULTICLASS


def names_for(task: str) -> tuple[str, ...]:
    """The metrics defined for ``task``, in registry order."""
    return tuple(name for name, metric in METRICS.items() if task in metric.tasks)


def metric_for(name: str, *, n_classes: int, setting: str = "metric") -> Metric:
    """The registered metric ``name``, checked against a model of ``n_classes`` classes.

    Raises
    ------
    SettingsError
        ``name`` is not registered, or not defined for that many classes; the message names
        ``setting`` (where the name came from) and lists the metrics that are.
    """
    task = task_of(n_classes)
    metric = METRICS.get(name)
    if metric is None or task not in metric.tasks:
        why = "is not a metric" if metric is None else f"is not computed for {n_classes} classes"
        raise SettingsError(f"{setting} {name!r} {why}; use one of {', '.join(names_for(task))}")
    return metric


def with_interval(task: str) -> tuple[str, ...]:
    """The metrics of ``task`` that the test report gives an interval, in registry order."""
    return tuple(name for name in names_for(task) if METRICS[name].interval)


def compute(name: str, scores: Scores) -> float:
    """The metric ``name`` of ``scores`` (SettingsError when it does not apply to their task)."""
    n_classes = 2 if scores.task == BINARY else scores.probabilities.shape[1]
    return metric_for(name, n_classes=n_classes).compute(scores)


def gain(name: str, candidate: float, reference: float) -> float:
    """How much better ``candidate`` is than ``reference`` on metric ``name`` (negative: worse)."""
    return candidate - reference if METRICS[name].higher_is_better else reference - candidate
