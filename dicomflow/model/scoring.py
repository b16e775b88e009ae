"""How a classifier's probabilities are scored, shared by train and evaluate.

Proper scores (cross-entropy, Brier), ranking (ROC AUC), calibration (expected calibration error
and the reliability table behind it), the temperature that calibrates logits on a held-out split,
and the check that a model is not degenerate. Plain functions of labels and probabilities.

Probabilities are ``(n,)`` or ``(n, 1)`` for two classes (the probability of class 1) or ``(n, k)``
for k > 2 classes; labels are class indices.
"""

from __future__ import annotations

import numpy as np

# Keras' clipping of probabilities inside its cross-entropy: the same loss figures as training.
EPSILON = 1e-7
ECE_BINS = 10
# A threshold this close to 0 or 1 calls images on the tail of a sigmoid: the scores carry no
# usable margin there, and such a threshold is what a model with shifted outputs gets chosen.
THRESHOLD_RANGE = (0.01, 0.99)
# Scores whose spread is below this are one value for every practical purpose.
CONSTANT_SPREAD = 1e-4
TEMPERATURE_PRIOR_SD = 1.0  # of log T (see fit_temperature)


def _binary(probabilities: np.ndarray) -> bool:
    return probabilities.ndim == 1 or probabilities.shape[1] == 1


def called_classes(probabilities: np.ndarray, *, threshold: float = 0.5) -> np.ndarray:
    """The class each image is called: class 1 when its probability is >= ``threshold`` (two
    classes), else the most probable class."""
    probabilities = np.asarray(probabilities, float)
    if _binary(probabilities):
        return (probabilities.ravel() >= threshold).astype(int)
    return probabilities.argmax(axis=1)


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared error of the probabilities: (p - y)^2 for two classes (0 is perfect, a
    constant 0.5 scores 0.25), the sum over classes of (p_k - [y = k])^2 for more."""
    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    if _binary(probabilities):
        return float(np.mean((probabilities.ravel() - labels) ** 2))
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


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
    if _binary(probabilities):
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


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, *,
                               n_bins: int = ECE_BINS) -> float:
    """ECE: the count-weighted mean gap between predicted and observed in the bins of
    :func:`reliability_table` (0 is perfectly calibrated)."""
    rows = reliability_table(labels, probabilities, n_bins=n_bins)
    total = sum(row["count"] for row in rows)
    return float(sum(row["count"] * abs(row["mean_predicted"] - row["observed"])
                     for row in rows if row["count"]) / total)


def classification_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Cross-entropy (Keras' clipping), ROC AUC, accuracy, Brier score and ECE of a model's outputs.

    Accuracy is at 0.5 for two classes and for the most probable class otherwise; AUC is the
    macro average of one-vs-rest AUCs for more than two classes, NaN when ``labels`` hold a
    single class.
    """
    from sklearn.metrics import roc_auc_score

    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    clipped = np.clip(probabilities, EPSILON, 1 - EPSILON)
    if _binary(probabilities):
        probabilities, clipped = probabilities.ravel(), clipped.ravel()
        loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
        auc = roc_auc_score(labels, probabilities) if len(np.unique(labels)) == 2 else float("nan")
    else:
        loss = -np.mean(np.log(clipped[np.arange(len(labels)), labels]))
        present = np.unique(labels)
        # Macro AUC over the classes present; a class absent from the labels has no ROC curve.
        auc = (float(np.mean([roc_auc_score(labels == k, probabilities[:, k]) for k in present]))
               if len(present) > 1 else float("nan"))
    return {"loss": float(loss), "auc": float(auc),
            "accuracy": float(np.mean(called_classes(probabilities) == labels)),
            "brier": brier_score(labels, probabilities),
            "ece": expected_calibration_error(labels, probabilities)}


def probabilities_from_logits(logits: np.ndarray, *, temperature: float = 1.0) -> np.ndarray:
    """Sigmoid of ``logits / temperature`` for one output unit, softmax over units otherwise."""
    scaled = np.asarray(logits, float) / temperature
    if scaled.ndim == 1 or scaled.shape[1] == 1:
        return 1.0 / (1.0 + np.exp(-scaled))
    shifted = np.exp(scaled - scaled.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def fit_temperature(labels: np.ndarray, logits: np.ndarray) -> float:
    """The temperature T > 0 that calibrates ``logits / T`` on a held-out split (Guo et al., 2017).

    One scalar for every logit: it changes how sure the model is, never its ranking (AUC) nor,
    for one sigmoid output, which side of 0.5 an image falls. The maximum a posteriori T under a
    standard normal prior on log T (:data:`TEMPERATURE_PRIOR_SD`), searched on log T in
    [1/100, 100]. Why not plain maximum likelihood: on a split the model separates perfectly the
    cross-entropy falls for ever as T -> 0 (on the embedded sample it chose T = 0.04, sharpening
    the logits 26-fold, and the test loss quadrupled); the prior weighs as much as one image, so
    any split with errors overrules it.
    """
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels, int).ravel()

    def objective(log_temperature: float) -> float:
        mean_loss = classification_scores(labels, probabilities_from_logits(
            logits, temperature=float(np.exp(log_temperature))))["loss"]
        return len(labels) * mean_loss + 0.5 * (log_temperature / TEMPERATURE_PRIOR_SD) ** 2

    result = minimize_scalar(objective, bounds=(np.log(0.01), np.log(100.0)), method="bounded",
                             options={"xatol": 1e-4})
    return float(np.exp(result.x))


def degeneracy(labels: np.ndarray, probabilities: np.ndarray, *, threshold: float | None = None) -> list[str]:
    """What makes a model's outputs on a split unusable, in words; empty when nothing does.

    Looked for: constant scores; every image called the same class at the operating point (for
    two classes at ``threshold``, only when one is given: a weak but calibrated model scores
    every image near the prevalence, below 0.5, and is still usable at a threshold chosen for it;
    for more classes by the most probable class), so that accuracy is that class's share; and a
    binary threshold outside :data:`THRESHOLD_RANGE`.
    """
    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    binary = _binary(probabilities)
    problems = []
    scores = probabilities.ravel() if binary else probabilities.max(axis=1)
    if np.ptp(scores) < CONSTANT_SPREAD:
        problems.append(f"constant predictions: every image scores {scores.min():.5f}-{scores.max():.5f}")
    if not binary or threshold is not None:
        called = called_classes(probabilities, threshold=threshold if binary else 0.5)
        if len(np.unique(labels)) > 1 and len(np.unique(called)) == 1:
            only = int(called[0])
            at = f" at threshold {threshold:.5g}" if binary else ""
            problems.append(f"every one of {len(labels)} images is called class index {only}{at}: "
                            f"accuracy {np.mean(labels == only):.3f} is that class's share")
    if threshold is not None and binary and not THRESHOLD_RANGE[0] <= threshold <= THRESHOLD_RANGE[1]:
        problems.append(f"operating threshold {threshold:.5g} is outside [{THRESHOLD_RANGE[0]}, "
                        f"{THRESHOLD_RANGE[1]}]: the scores are shifted to one end")
    return problems
