"""Scoring at the level the label lives at: the images of a study combined into one answer.

A radiograph study's PA and lateral views carry one label (the sample's labels belong to the
study, :mod:`dicomflow.devtools.sample_data`), yet a nodule seen on the PA view may not show on
the lateral one: scored per image, that lateral view is a false negative of a study the model
found. With ``evaluate.level: study`` the evaluate stage groups the validation and test images by
the split manifest's ``study_key``, combines each study's calibrated per-image probabilities with
``evaluate.study_aggregation`` (:func:`dicomflow.model.aggregation.aggregate`; more than two
classes: each class's probability, then renormalised to sum to 1), and computes every figure on
the studies: the operating threshold chosen on validation studies, the test metrics, calibration,
subgroups and intervals.

The intervals still resample patients (:mod:`dicomflow.evaluation.intervals`): a study is one row
after grouping, so its images always move together, and a patient's studies move together too
(some patients have two studies; they are not independent draws). Where every patient has one
study this is the bootstrap of studies.

This module takes values and returns values; it reads no files.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dicomflow.config.params import EVALUATION_LEVELS
from dicomflow.errors import DataError
from dicomflow.metrics import is_binary
from dicomflow.model.aggregation import AGGREGATIONS, aggregate

logger = logging.getLogger(__name__)

STUDY_KEY = "study_key"  # the split manifest's de-identified study pseudonym
# The manifest columns a study row keeps (patient_key for the intervals, the rest for subgroups).
STUDY_ATTRIBUTES = ("patient_key", "patient_sex", "patient_age_years", "manufacturer", "view_position")
MIXED_SEPARATOR = "+"  # a study whose images differ (PA and LL views) is the group "LL+PA"
PREDICTIONS_FILE = "test_predictions.csv"  # per test image, with its study, in the plots folder


@dataclass(frozen=True)
class Aggregation:
    """How a study's per-image probabilities are combined (``evaluate.study_aggregation`` and
    ``evaluate.study_top_k``).

    Attributes
    ----------
    method : {"mean", "max", "topk_mean"}
    k : int
        ``topk_mean``: the largest probabilities averaged (capped by the study's images).
    """

    method: str
    k: int = 2

    def __post_init__(self) -> None:
        if self.method not in AGGREGATIONS:
            raise ValueError(f"method must be one of {', '.join(map(repr, AGGREGATIONS))}; got {self.method!r}")
        if self.k < 1:
            raise ValueError(f"k must be an int >= 1; got {self.k!r}")

    def describe(self) -> str:
        """``max``, ``mean`` or ``top-2 mean``: the words the report and the card use."""
        return f"top-{self.k} mean" if self.method == "topk_mean" else self.method

    def as_report(self) -> dict[str, str | int]:
        """What the test report states: ``study_aggregation`` and ``study_top_k``."""
        return {"study_aggregation": self.method, "study_top_k": self.k}

    def as_metadata(self, *, threshold: float | None, referable_threshold: float | None = None) -> dict:
        """A registered model's MLmodel metadata ``study``: how ``dicomflow predict --per-study``
        combines a study's files (``aggregation``, ``top_k``) and the thresholds chosen on
        validation studies it calls the study at (``threshold``: binary; ``referable_threshold``:
        ordinal with a referable grade; None otherwise)."""
        return {"aggregation": self.method, "top_k": self.k,
                "threshold": None if threshold is None else float(threshold),
                "referable_threshold": None if referable_threshold is None else float(referable_threshold)}


def study_aggregation(level: str, method: str, *, k: int) -> Aggregation | None:
    """``evaluate.level``, ``evaluate.study_aggregation`` and ``evaluate.study_top_k`` as the
    :class:`Aggregation` to score studies with, or None to score images (level ``image``).

    Raises
    ------
    ValueError
        ``level`` not one of :data:`dicomflow.config.params.EVALUATION_LEVELS`, or as :class:`Aggregation`.
    """
    if level not in EVALUATION_LEVELS:
        raise ValueError(f"level must be one of {', '.join(map(repr, EVALUATION_LEVELS))}; got {level!r}")
    return Aggregation(method, k) if level == "study" else None


def at_level(labels: np.ndarray, probabilities: np.ndarray, rows: pd.DataFrame, *,
             study: Aggregation | None) -> tuple[np.ndarray, np.ndarray]:
    """The labels and probabilities to score: the images' as given (``study`` None), or their
    studies' (:func:`study_scores`). ``rows`` are the images' manifest rows, in their order."""
    if study is None:
        return labels, probabilities
    grouped = study_scores(labels, probabilities, rows, aggregation=study)
    logger.info("scoring %d studies of %d images (%s of each study's image probabilities)", len(grouped.labels),
                len(labels), study.describe())
    return grouped.labels, grouped.probabilities


def served_thresholds(study: Aggregation | None, *, threshold: float | None,
                      referable_threshold: float | None) -> dict[str, float]:
    """At level study, the report's extra figures: the per-image thresholds (chosen on validation
    images) at which the served model calls a single file, ``image_threshold`` and
    ``image_referable_threshold`` where set; nothing at level image (``threshold`` is that one)."""
    if study is None:
        return {}
    figures = {"image_threshold": threshold, "image_referable_threshold": referable_threshold}
    return {name: float(value) for name, value in figures.items() if value is not None}


@dataclass(frozen=True)
class StudyScores:
    """Images grouped into studies: one label and one probability (vector) per study.

    Attributes
    ----------
    labels : ndarray of shape (s,)
        Each study's class index (its images' common label).
    probabilities : ndarray of shape (s,) or (s, k)
        The aggregated probability of class 1 (two classes) or of each class, rows summing to 1.
    rows : DataFrame
        One row per study, in order of first appearance: ``study_key``, ``n_images`` and the
        columns of :data:`STUDY_ATTRIBUTES` the images' rows have (a value the images disagree on
        is their sorted values joined by ``+``, e.g. view position ``LL+PA``; the age is the first
        image's).
    study_of : ndarray of shape (n,)
        Each image's study, as a row position in ``rows``.
    aggregation : Aggregation
    """

    labels: np.ndarray
    probabilities: np.ndarray
    rows: pd.DataFrame
    study_of: np.ndarray
    aggregation: Aggregation

    def combine(self, probabilities: np.ndarray) -> np.ndarray:
        """Other per-image probabilities of the same images (e.g. uncalibrated), grouped the same way."""
        return _combine(np.asarray(probabilities, float), self.study_of, len(self.rows), self.aggregation)


def study_scores(labels: np.ndarray, probabilities: np.ndarray, rows: pd.DataFrame, *,
                 aggregation: Aggregation) -> StudyScores:
    """Group images into their studies and combine each study's probabilities.

    Parameters
    ----------
    labels : ndarray of shape (n,)
        Each image's class index.
    probabilities : ndarray of shape (n,), (n, 1) or (n, k)
        Each image's calibrated probability of class 1, or of each class.
    rows : DataFrame
        The images' rows of the split manifest, in the order of ``labels``: ``study_key``, and
        whichever of :data:`STUDY_ATTRIBUTES` are wanted downstream (``patient_key`` for the
        intervals).
    aggregation : Aggregation

    Returns
    -------
    StudyScores

    Raises
    ------
    DataError
        Not one row per image, ``study_key`` missing or empty, or a study whose images carry
        different labels or belong to different patients.
    """
    labels = np.asarray(labels, int).ravel()
    if len(rows) != len(labels):
        raise DataError(f"rows holds {len(rows)} manifest rows for {len(labels)} images; pass the split "
                        "manifest's rows of these images, in their order")
    if STUDY_KEY not in rows:
        raise DataError(f"the manifest has no {STUDY_KEY} column; evaluate.level study groups images by it: "
                        "rerun deidentify and split, or set evaluate.level: image")
    keys = rows[STUDY_KEY].astype("object")
    missing = int((keys.isna() | (keys.astype(str).str.strip() == "")).sum())
    if missing:
        raise DataError(f"{STUDY_KEY} is missing for {missing} of {len(keys)} images; every image needs its "
                        "study to be scored per study: rerun deidentify and split, or set evaluate.level: image")
    order = pd.unique(keys.astype(str))
    study_of = pd.Index(order).get_indexer(keys.astype(str))
    table = pd.DataFrame({STUDY_KEY: keys.astype(str).to_numpy(), "label": labels, "study": study_of})
    if "patient_key" in rows:
        table["patient_key"] = rows["patient_key"].astype(str).to_numpy()
    for column, what in (("label", "labels"), ("patient_key", "patients")):
        if column not in table:
            continue
        spread = table.groupby("study")[column].nunique()
        if (spread > 1).any():
            first, n = order[int(spread.index[spread > 1][0])], int((spread > 1).sum())
            raise DataError(f"{n} stud{'y holds' if n == 1 else 'ies hold'} images of different {what} (the first: "
                            f"{STUDY_KEY} {first}); a study-level score needs one {what[:-1]} per study: fix "
                            f"the labels, or set evaluate.level: image")
    study_labels = table.groupby("study")["label"].first().to_numpy()
    study_rows = pd.DataFrame({STUDY_KEY: order, "n_images": np.bincount(study_of, minlength=len(order))})
    for column in STUDY_ATTRIBUTES:
        if column in rows:
            study_rows[column] = [_common_value(rows[column].iloc[np.flatnonzero(study_of == s)], column)
                                  for s in range(len(order))]
    combined = _combine(np.asarray(probabilities, float), study_of, len(order), aggregation)
    return StudyScores(study_labels, combined, study_rows, study_of, aggregation)


def _combine(probabilities: np.ndarray, study_of: np.ndarray, n_studies: int, aggregation: Aggregation) -> np.ndarray:
    """Per study, the aggregated probability (two classes) or the aggregated and renormalised
    class probabilities."""
    if len(probabilities) != len(study_of):
        raise DataError(f"probabilities holds {len(probabilities)} rows for {len(study_of)} images")
    members = [np.flatnonzero(study_of == s) for s in range(n_studies)]
    if is_binary(probabilities):
        flat = probabilities.ravel()
        return np.array([aggregate(flat[rows], aggregation.method, k=aggregation.k) for rows in members])
    per_class = np.array([[aggregate(probabilities[rows, c], aggregation.method, k=aggregation.k)
                           for c in range(probabilities.shape[1])] for rows in members])
    # max and top-k mean do not keep a sum of 1 (each class's largest may come from another image).
    return per_class / per_class.sum(axis=1, keepdims=True)


def _common_value(values: pd.Series, column: str) -> object:
    """One study's value of ``column``: the images' common value, or their sorted values joined
    (the age: the first image's, a number)."""
    if column == "patient_age_years":
        return values.iloc[0]
    present = sorted({str(value) for value in values if not pd.isna(value) and str(value) != ""})
    if not present:
        return values.iloc[0]
    return present[0] if len(present) == 1 else MIXED_SEPARATOR.join(present)


def predictions_table(rows: pd.DataFrame, labels: np.ndarray, probabilities: np.ndarray,
                      grouped: StudyScores | None, *, classes: list[int]) -> pd.DataFrame:
    """Per test image (or series, for volumes): ``image_key`` (when ``rows`` has it), ``study_key``,
    ``label`` (the class), the image's calibrated ``probability`` (two classes) or
    ``probability_<c>`` per class, and with ``grouped`` its study's aggregated
    ``study_probability`` (or ``study_probability_<c>``); without, ``rows``' own ``study_key``
    (when it has one). Pseudonyms only: the manifest's keys are keyed digests, never a source value."""
    probabilities = np.asarray(probabilities, float)
    table = pd.DataFrame({"image_key": rows["image_key"].astype(str).to_numpy()} if "image_key" in rows else {})
    if grouped is not None:
        table[STUDY_KEY] = grouped.rows[STUDY_KEY].to_numpy()[grouped.study_of]
    elif STUDY_KEY in rows:
        table[STUDY_KEY] = rows[STUDY_KEY].astype(str).to_numpy()
    table["label"] = np.asarray(classes)[np.asarray(labels, int).ravel()]
    binary = is_binary(probabilities)
    if binary:
        table["probability"] = probabilities.ravel()
    else:
        for c, label in enumerate(classes):
            table[f"probability_{label}"] = probabilities[:, c]
    if grouped is not None and binary:
        table["study_probability"] = grouped.probabilities[grouped.study_of]
    elif grouped is not None:
        for c, label in enumerate(classes):
            table[f"study_probability_{label}"] = grouped.probabilities[grouped.study_of, c]
    return table
