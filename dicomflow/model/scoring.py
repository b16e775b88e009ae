"""How training scores a classifier's probabilities: the figures of every epoch, the temperature
that calibrates logits on a held-out split, and the check that a model is not degenerate. Plain
functions of labels and probabilities; the metrics themselves live in :mod:`dicomflow.metrics`.

Probabilities are ``(n,)`` or ``(n, 1)`` for two classes (the probability of class 1) or ``(n, k)``
for k > 2 classes; labels are class indices.
"""

from __future__ import annotations

import numpy as np

from dicomflow.metrics import Scores, accuracy, brier, ece, is_binary, roc_auc

# Keras' clipping of probabilities inside its cross-entropy: the same loss figures as training.
EPSILON = 1e-7
# A threshold this close to 0 or 1 calls images on the tail of a sigmoid: the scores carry no
# usable margin there, and such a threshold is what a model with shifted outputs gets chosen.
THRESHOLD_RANGE = (0.01, 0.99)
# Scores whose spread is below this are one value for every practical purpose.
CONSTANT_SPREAD = 1e-4
TEMPERATURE_PRIOR_SD = 1.0  # of log T (see fit_temperature)


def classification_scores(labels: np.ndarray, probabilities: np.ndarray, *,
                          task: str | None = None) -> dict[str, float]:
    """Cross-entropy (Keras' clipping), ROC AUC, accuracy, Brier score and ECE of a model's outputs.

    Accuracy is at 0.5 for two classes, for the median grade with ``task="ordinal"`` (the grade the
    model answers) and for the most probable class otherwise; AUC is the macro average of
    one-vs-rest AUCs for more than two classes, NaN when ``labels`` hold a single class.
    """
    scores = Scores.at_threshold(labels, probabilities, task=task)
    labels, probabilities = scores.labels, scores.probabilities
    clipped = np.clip(probabilities, EPSILON, 1 - EPSILON)
    if scores.task == "binary":
        loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
    else:
        loss = -np.mean(np.log(clipped[np.arange(len(labels)), labels]))
    # A split of one class has no ROC curve (macro AUC: over the classes present).
    auc = roc_auc(scores) if len(np.unique(labels)) > 1 else float("nan")
    return {"loss": float(loss), "auc": float(auc), "accuracy": accuracy(scores), "brier": brier(scores),
            "ece": ece(scores)}


def probabilities_from_logits(logits: np.ndarray, *, temperature: float = 1.0, ordinal: bool = False) -> np.ndarray:
    """Sigmoid of ``logits / temperature`` for one output unit, softmax over units otherwise; with
    ``ordinal`` the grade probabilities of the continuation-ratio head's k - 1 conditional logits
    (:func:`ordinal_log_probabilities`)."""
    scaled = np.asarray(logits, float) / temperature
    if ordinal:
        return np.exp(ordinal_log_probabilities(scaled))
    if scaled.ndim == 1 or scaled.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-scaled))
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def ordinal_log_probabilities(logits: np.ndarray) -> np.ndarray:
    """The k grades' log-probabilities (n, k) of continuation-ratio logits (n, k - 1), l_j = logit
    P(grade > j | grade >= j): log P(grade = j) = sum_{i<j} log sigmoid(l_i) + log sigmoid(-l_j),
    the last grade the sum alone. In float64, log sigmoid as -log(1 + e^-x) (``logaddexp``): exact
    where a probability rounds to 0 or 1. The NumPy twin of the Keras head
    (:func:`dicomflow.model.architectures.ordinal_link_matrix`)."""
    logits = np.asarray(logits, float)
    passed, stopped = -np.logaddexp(0.0, -logits), -np.logaddexp(0.0, logits)
    reached = np.concatenate([np.zeros((len(logits), 1)), np.cumsum(passed, axis=1)], axis=1)
    return reached + np.concatenate([stopped, np.zeros((len(logits), 1))], axis=1)


def fit_temperature(labels: np.ndarray, logits: np.ndarray, *, ordinal: bool = False) -> float:
    """The temperature T > 0 that calibrates ``logits / T`` on a held-out split (Guo et al., 2017).

    One scalar for every logit: it changes how sure the model is, never its ranking (AUC) nor,
    for one sigmoid output, which side of 0.5 an image falls. The maximum a posteriori T under a
    standard normal prior on log T (:data:`TEMPERATURE_PRIOR_SD`), searched on log T in
    [1/100, 100]. Why not plain maximum likelihood: on a split the model separates perfectly the
    cross-entropy falls for ever as T -> 0 (on the embedded sample it chose T = 0.04, sharpening
    the logits 26-fold, and the test loss quadrupled); the prior weighs as much as one image, so
    any split with errors overrules it.

    ``ordinal``: ``logits`` are the continuation-ratio head's k - 1 conditional logits, each
    divided by T (the same calibration layer); the loss is that of the grade probabilities.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, int).ravel()

    def objective(log_temperature: float) -> float:
        mean_loss = classification_scores(labels, probabilities_from_logits(
            logits, temperature=float(np.exp(log_temperature)), ordinal=ordinal))["loss"]
        return len(labels) * mean_loss + 0.5 * (log_temperature / TEMPERATURE_PRIOR_SD) ** 2

    result = minimize_scalar(objective, bounds=(np.log(0.01), np.log(100.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def degeneracy(labels: np.ndarray, probabilities: np.ndarray, *, threshold: float | None = None,
               task: str | None = None) -> list[str]:
    """What makes a model's outputs on a split unusable, in words; empty when nothing does.

    Looked for: constant scores; every image called the same class at the operating point (for
    two classes at ``threshold``, only when one is given: a weak but calibrated model scores
    every image near the prevalence, below 0.5, and is still usable at a threshold chosen for it;
    for more classes by the most probable class, or the median grade with ``task="ordinal"``), so
    that accuracy is that class's share; and a
    binary threshold outside :data:`THRESHOLD_RANGE`.
    """
    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    binary = is_binary(probabilities)
    problems = []
    scores = probabilities.ravel() if binary else probabilities.max(axis=1)
    if np.ptp(scores) < CONSTANT_SPREAD:
        problems.append(f"constant predictions: every image scores {scores.min():.5f}-{scores.max():.5f}")
    if not binary or threshold is not None:
        called = Scores.at_threshold(labels, probabilities, threshold=threshold if binary else 0.5,
                                     task=None if binary else task).called
        if len(np.unique(labels)) > 1 and len(np.unique(called)) == 1:
            only = int(called[0])
            at = f" at threshold {threshold:.5g}" if binary else ""
            problems.append(f"every one of {len(labels)} images is called class index {only}{at}: "
                            f"accuracy {np.mean(labels == only):.3f} is that class's share")
    if threshold is not None and binary and not THRESHOLD_RANGE[0] <= threshold <= THRESHOLD_RANGE[1]:
        problems.append(f"operating threshold {threshold:.5g} is outside [{THRESHOLD_RANGE[0]}, "
                        f"{THRESHOLD_RANGE[1]}]: the scores are shifted to one end")
    return problems
