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

Tasks: ``binary`` (two classes, one probability per image: that of class index 1),
``multiclass`` (k > 2 classes, an ``(n, k)`` probability matrix; an image is called its most
probable class) and ``ordinal`` (k > 2 ordered grades, the same ``(n, k)`` matrix; an image is
called its median grade, :func:`median_grade`). Labels are class indices. An ordinal matrix looks
like a multi-class one, so :class:`Scores` carries its task where the shape cannot tell; an
ordinal task may also carry its referable grade (the derived "at least grade r" binary task) and
the threshold on the referable probability chosen on validation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dicomflow.errors import SettingsError

BINARY, MULTICLASS, ORDINAL = "binary", "multiclass", "ordinal"
TASKS = (BINARY, MULTICLASS, ORDINAL)
ECE_BINS = 10


@dataclass(frozen=True)
class Scores:
    """One model's answers on a set of images, as every metric reads them.

    Attributes
    ----------
    labels : ndarray of shape (n,)
        True class indices.
    probabilities : ndarray of shape (n,) or (n, k)
        The probability of class index 1 (binary) or of each class (multi-class, ordinal).
    called : ndarray of shape (n,)
        The class index each image is called at the model's operating point (its threshold for two
        classes, the most probable class for multi-class, the median grade for ordinal).
    declared_task : str or None, default=None
        ``ordinal`` for grade probabilities; None reads the task from the shape (binary for
        ``(n,)``, multi-class for ``(n, k)``), as it always has.
    referable : int or None, default=None
        Ordinal only: the grade index from which an image counts as referable (the referable
        metrics need it).
    referable_threshold : float or None, default=None
        Ordinal only: an image is called referable when its probability of grade ``referable`` or
        higher (:func:`at_least`) is >= this (chosen on validation; the referable sensitivity and
        specificity need it).
    """

    labels: np.ndarray
    probabilities: np.ndarray
    called: np.ndarray
    declared_task: str | None = None
    referable: int | None = None
    referable_threshold: float | None = None

    def __post_init__(self) -> None:
        if self.declared_task not in (None, *TASKS):
            raise ValueError(f"declared_task must be one of {', '.join(TASKS)} or None; got {self.declared_task!r}")
        if (self.referable is not None or self.referable_threshold is not None) and self.declared_task != ORDINAL:
            raise ValueError("referable and referable_threshold apply to ordinal scores; set "
                             f"declared_task='ordinal' (got {self.declared_task!r})")

    @classmethod
    def at_threshold(cls, labels: np.ndarray, probabilities: np.ndarray, *, threshold: float = 0.5,
                     task: str | None = None, referable: int | None = None,
                     referable_threshold: float | None = None) -> Scores:
        """Scores whose calls are class 1 at ``probability >= threshold`` (two classes), the most
        probable class (multi-class) or the median grade (``task="ordinal"``).

        ``task`` None (or ``binary``, ``multiclass``) reads the task from the shape; ``referable``
        and ``referable_threshold`` are kept for the referable metrics of an ordinal task.
        """
        labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
        if is_binary(probabilities):
            if task not in (None, BINARY):
                raise ValueError(f"task {task!r} needs an (n, k) probability matrix of k > 2 classes; got shape "
                                 f"{probabilities.shape}")
            probabilities = probabilities.ravel()
            return cls(labels, probabilities, (probabilities >= threshold).astype(int))
        if task == ORDINAL:
            return cls(labels, probabilities, median_grade(probabilities), ORDINAL, referable, referable_threshold)
        return cls(labels, probabilities, probabilities.argmax(axis=1))

    @property
    def task(self) -> str:
        if self.declared_task is not None:
            return self.declared_task
        return BINARY if self.probabilities.ndim == 1 else MULTICLASS

    @property
    def n_classes(self) -> int:
        return 2 if self.probabilities.ndim == 1 else self.probabilities.shape[1]

    def referable_scores(self) -> Scores:
        """The derived binary task "grade ``referable`` or higher": labels, :func:`at_least`
        probabilities and calls at ``referable_threshold`` (0.5 when it is None; the referable AUC
        does not read the calls)."""
        if self.referable is None:
            raise ValueError("these ordinal scores carry no referable grade; pass referable (a grade index) "
                             "to Scores.at_threshold, from evaluate.referable_grade")
        probability = at_least(self.probabilities, self.referable)
        threshold = 0.5 if self.referable_threshold is None else self.referable_threshold
        return Scores((self.labels >= self.referable).astype(int), probability, (probability >= threshold).astype(int))


def median_grade(probabilities: np.ndarray) -> np.ndarray:
    """The predicted grade of an ordinal task: the median of each image's grade distribution.

    The smallest grade index whose cumulative probability reaches 0.5; it minimises the expected
    absolute grade error, where the most probable grade (argmax) ignores how far off the others are.

    Parameters
    ----------
    probabilities : ndarray of shape (n, k)
        Each image's probability of each grade, grades in order.

    Returns
    -------
    ndarray of shape (n,)
        Grade indices, 0 to k - 1.
    """
    cumulative = np.cumsum(np.asarray(probabilities, float), axis=1)
    return np.minimum((cumulative < 0.5 - 1e-12).sum(axis=1), cumulative.shape[1] - 1)


def at_least(probabilities: np.ndarray, grade_index: int) -> np.ndarray:
    """Each image's probability of grade index ``grade_index`` or higher (e.g. referable disease).

    Parameters
    ----------
    probabilities : ndarray of shape (n, k)
        Grade probabilities, grades in order.
    grade_index : int
        1 to k - 1.

    Returns
    -------
    ndarray of shape (n,)
    """
    probabilities = np.asarray(probabilities, float)
    if not 1 <= grade_index < probabilities.shape[1]:
        raise ValueError(f"grade_index must be 1 to {probabilities.shape[1] - 1} for {probabilities.shape[1]} grades; "
                         f"got {grade_index}")
    return np.clip(probabilities[:, grade_index:].sum(axis=1), 0.0, 1.0)


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


def balanced_accuracy(scores: Scores) -> float:
    """Unweighted mean over the classes present in the labels of each class's recall (scikit-learn's
    ``balanced_accuracy_score``): a rare class counts as much as a common one."""
    return float(np.mean([np.mean(scores.called[scores.labels == k] == k) for k in np.unique(scores.labels)]))


def qwk(scores: Scores) -> float:
    """Quadratic weighted kappa of the called grades against the true ones: 1 is perfect
    agreement, 0 the agreement of chance, negative worse; calling a grade 4 a 0 costs 16 times
    calling it a 3.

    The weights are the squared distances of the grade indices over all k grades of the
    probability matrix, so a grade absent from the set keeps its place (scikit-learn's kappa
    score with ``weights="quadratic", labels=range(k)``). NaN where it is 0 / 0: labels and calls
    all one and the same grade.

    Notes
    -----
    The kappa's author is not named in this module: the registered model ships this code, and
    the leak check (:mod:`dicomflow.deid.leaks`) rightly flags any surname of the synthetic
    sample's patients in it.
    """
    k = scores.n_classes
    observed = np.zeros((k, k))
    np.add.at(observed, (scores.labels, scores.called), 1.0)
    expected = np.outer(observed.sum(axis=1), observed.sum(axis=0)) / observed.sum()
    grades = np.arange(k)
    weights = (grades[:, None] - grades[None, :]) ** 2
    disagreement = float((weights * expected).sum())
    if disagreement == 0:
        return float("nan")
    return float(1.0 - (weights * observed).sum() / disagreement)


def mae_grade(scores: Scores) -> float:
    """Mean absolute grade error of the called grades, in grades (0 is perfect; lower is better)."""
    return float(np.mean(np.abs(scores.called - scores.labels)))


def referable_auc(scores: Scores) -> float:
    """ROC AUC of the probability of the referable grade or higher (:func:`at_least`) against
    "true grade >= referable grade"; ValueError when the set holds one side only."""
    referable = scores.referable_scores()
    return _binary_auc(referable.labels == 1, referable.probabilities)


def referable_sensitivity(scores: Scores) -> float:
    """Share of referable images (true grade >= the referable grade) called referable at the
    validation-chosen ``referable_threshold``."""
    return sensitivity(_referable_at_threshold(scores))


def referable_specificity(scores: Scores) -> float:
    """Share of non-referable images called non-referable at ``referable_threshold``."""
    return specificity(_referable_at_threshold(scores))


def _referable_at_threshold(scores: Scores) -> Scores:
    """The referable scores, refusing a missing threshold (the default 0.5 is no operating point)."""
    if scores.referable_threshold is None:
        raise ValueError("these ordinal scores carry no referable_threshold; choose it on validation "
                         "(dicomflow.evaluation.metrics.choose_referable_threshold) and pass it to Scores.at_threshold")
    return scores.referable_scores()


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
        The tasks it is defined for (:data:`BINARY`, :data:`MULTICLASS`, :data:`ORDINAL`).
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
    referable : bool
        Whether it needs a referable grade (``evaluate.referable_grade``).
    promotable : bool
        Whether promotion may compare models on it (``evaluate.promotion_metric``): the referable
        sensitivity and specificity read an operating threshold on the referable probability that
        the served answers do not carry.
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
    referable: bool = False
    promotable: bool = True


BOTH = (BINARY, MULTICLASS)  # the tasks a metric of the seed had
EVERY = TASKS
GRADED = (MULTICLASS, ORDINAL)  # an (n, k) probability matrix
# In the order of the headline columns of `dvc exp show`. The metrics with an interval are those
# the model card prints with one: the AUC and the proportions of images (rates at the threshold).
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("roc_auc", roc_auc, True, EVERY, headline=True, interval=True),
    Metric("sensitivity", sensitivity, True, (BINARY,), headline=True, interval=True),
    Metric("specificity", specificity, True, (BINARY,), headline=True, interval=True),
    Metric("accuracy", accuracy, True, EVERY, headline=True, interval=True),
    Metric("brier", brier, False, EVERY, headline=True, bounds=(0.0, 2.0)),  # 2: all mass on a wrong class
    Metric("ece", ece, False, EVERY, headline=True),
    # Ordinal: the agreement graders are judged by, with an interval, and the screening figure.
    Metric("qwk", qwk, True, (ORDINAL,), headline=True, interval=True, bounds=(-1.0, 1.0)),
    Metric("referable_auc", referable_auc, True, (ORDINAL,), headline=True, interval=True, referable=True),
    Metric("balanced_accuracy", balanced_accuracy, True, GRADED, headline=True),
    Metric("mae_grade", mae_grade, False, (ORDINAL,), bounds=(0.0, np.inf)),
    Metric("referable_sensitivity", referable_sensitivity, True, (ORDINAL,), interval=True, referable=True,
           promotable=False),
    Metric("referable_specificity", referable_specificity, True, (ORDINAL,), interval=True, referable=True,
           promotable=False),
    Metric("average_precision", average_precision, True, (BINARY,)),
    Metric("ppv", ppv, True, (BINARY,), interval=True, defined=_called_positive,
           undefined="no image is called positive"),
    Metric("npv", npv, True, (BINARY,), interval=True, defined=_called_negative,
           undefined="no image is called negative"),
    Metric("f1", f1, True, (BINARY,)),
    Metric("macro_f1", macro_f1, True, GRADED),
)}
METRIC_NAMES = tuple(METRICS)
HEADLINE_METRICS = tuple(name for name, metric in METRICS.items() if metric.headline)
# Privacy figures of the test report (dicomflow.evaluation.membership), not metrics of a model's
# answers (no promotion on them): the membership attack's ROC AUC, and the accounted ε of a model
# trained with differential privacy. Headline columns after the metrics, where the report has them.
ATTACK_AUC, PRIVACY_EPSILON = "membership_auc", "privacy_epsilon"
HEADLINE_PRIVACY = (ATTACK_AUC, PRIVACY_EPSILON)


def task_of(n_classes: int) -> str:
    """The task a model with ``n_classes`` classes has when its labels are not ordered grades."""
    return BINARY if n_classes == 2 else MULTICLASS


def names_for(task: str, *, referable: bool = True) -> tuple[str, ...]:
    """The metrics defined for ``task``, in registry order (without a referable grade: without
    the referable metrics)."""
    return tuple(name for name, metric in METRICS.items()
                 if task in metric.tasks and (referable or not metric.referable))


def metric_for(name: str, *, task: str, referable: bool = False, promotion: bool = False,
               setting: str = "metric") -> Metric:
    """The registered metric ``name``, checked against a model's task.

    Parameters
    ----------
    name : str
        A key of :data:`METRICS`.
    task : {"binary", "multiclass", "ordinal"}
        The model's task (``train.task``).
    referable : bool, default=False
        Whether a referable grade is set (``evaluate.referable_grade``); the referable metrics need one.
    promotion : bool, default=False
        Whether models are to be compared on it (:attr:`Metric.promotable`).
    setting : str, default="metric"
        Where the name came from, for the message.

    Raises
    ------
    SettingsError
        ``name`` is not registered, not defined for ``task``, needs a referable grade that is not
        set, or is not promotable where ``promotion``; the message names ``setting`` and lists the
        metrics that would do.
    """
    if task not in TASKS:
        raise SettingsError(f"task must be one of {', '.join(TASKS)}; got {task!r}")
    metric = METRICS.get(name)
    usable = [n for n in names_for(task, referable=referable) if METRICS[n].promotable or not promotion]
    if metric is None:
        why = "is not a metric"
    elif task not in metric.tasks:
        why = f"is not computed for the {task} task"
    elif metric.referable and not referable:
        why = "needs evaluate.referable_grade, which is not set"
    elif promotion and not metric.promotable:
        why = "reads an operating threshold the served answers do not carry, so models are not compared on it"
    else:
        return metric
    raise SettingsError(f"{setting} {name!r} {why}; use one of {', '.join(usable)}")


def with_interval(task: str) -> tuple[str, ...]:
    """The metrics of ``task`` that the test report gives an interval, in registry order."""
    return tuple(name for name in names_for(task) if METRICS[name].interval)


def compute(name: str, scores: Scores) -> float:
    """The metric ``name`` of ``scores`` (SettingsError when it does not apply to their task)."""
    return metric_for(name, task=scores.task, referable=scores.referable is not None).compute(scores)


def gain(name: str, candidate: float, reference: float) -> float:
    """How much better ``candidate`` is than ``reference`` on metric ``name`` (negative: worse)."""
    return candidate - reference if METRICS[name].higher_is_better else reference - candidate
