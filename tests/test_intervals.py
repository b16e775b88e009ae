"""Intervals that resample patients: the cluster bootstrap against bootstraps written out here with
scikit-learn, wider than the image bootstrap when a patient's images agree, and "not estimable"
with the reason wherever the bootstrap cannot give an interval."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from dicomflow.evaluation.intervals import (
    DIGITS,
    Interval,
    _percentile_interval,
    interval_from_report,
    patient_bootstrap,
)
from dicomflow.metrics import Scores


def percentile_interval(values: list[float]) -> tuple[float, float]:
    """The 95 % percentile interval of bootstrap values, to 4 decimals."""
    return round(float(np.quantile(values, 0.025)), 4), round(float(np.quantile(values, 0.975)), 4)


def image_bootstrap_auc(labels: np.ndarray, scores: np.ndarray, *, seed: int = 0, n: int = 1000) -> tuple[float, float]:
    """The ordinary bootstrap of scikit-learn's AUC: images drawn with replacement."""
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n):
        rows = rng.integers(0, len(labels), len(labels))
        if len(np.unique(labels[rows])) == 2:
            aucs.append(roc_auc_score(labels[rows], scores[rows]))
    return percentile_interval(aucs)


def cluster_bootstrap_auc(labels: np.ndarray, scores: np.ndarray, patients: np.ndarray, *, seed: int = 0,
                          n: int = 1000) -> tuple[float, float]:
    """The cluster bootstrap written out: patients (in sorted order) drawn with replacement, their
    images concatenated, scikit-learn's AUC."""
    names = sorted(set(patients))
    members = [np.flatnonzero(patients == name) for name in names]
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(n):
        rows = np.concatenate([members[p] for p in rng.integers(0, len(names), len(names))])
        if len(np.unique(labels[rows])) == 2:
            aucs.append(roc_auc_score(labels[rows], scores[rows]))
    return percentile_interval(aucs)


@pytest.fixture
def clustered():
    """60 patients of three images each; a patient's images share its label and nearly its score."""
    rng = np.random.default_rng(7)
    patient_label = rng.integers(0, 2, 60)
    patient_score = np.clip(0.5 + 0.2 * (patient_label - 0.5) + rng.normal(0, 0.2, 60), 0, 1)
    labels = np.repeat(patient_label, 3)
    scores = np.repeat(patient_score, 3) + rng.normal(0, 0.01, 180)
    patients = np.repeat([f"patient-{i:02d}" for i in range(60)], 3)
    return labels, scores, patients


def auc_interval(labels, scores, patients, **options) -> Interval:
    return patient_bootstrap(Scores.at_threshold(labels, scores), patients, ["roc_auc"], **options)["roc_auc"]


class TestPatientBootstrap:
    @pytest.mark.slow
    def test_one_image_per_patient_is_the_ordinary_bootstrap(self):
        rng = np.random.default_rng(1)
        labels = rng.integers(0, 2, 80)
        scores = np.clip(0.3 * labels + rng.normal(0.35, 0.2, 80), 0, 1)
        patients = np.array([f"p{i:03d}" for i in range(80)])  # sorted as the images
        interval = auc_interval(labels, scores, patients)
        assert (interval.low, interval.high) == pytest.approx(image_bootstrap_auc(labels, scores), abs=1e-4)

    @pytest.mark.slow
    def test_it_is_the_cluster_bootstrap_written_out(self, clustered):
        labels, scores, patients = clustered
        interval = auc_interval(labels, scores, patients)
        assert (interval.low, interval.high) == pytest.approx(cluster_bootstrap_auc(labels, scores, patients),
                                                              abs=1e-4)

    @pytest.mark.slow
    def test_patients_of_three_alike_images_widen_the_interval(self, clustered):
        labels, scores, patients = clustered
        by_patient = auc_interval(labels, scores, patients)
        low, high = image_bootstrap_auc(labels, scores)
        # Three near-copies per patient: the image bootstrap sees 180 observations where there are
        # 60, and its interval is about sqrt(3) = 1.73 times too narrow.
        assert (by_patient.high - by_patient.low) / (high - low) > 1.4
        assert by_patient.low < low and by_patient.high > high

    def test_the_ends_are_rounded_and_inside_the_metrics_range(self, clustered):
        labels, scores, patients = clustered
        called = Scores.at_threshold(labels, scores, threshold=0.5)
        intervals = patient_bootstrap(called, patients, ["roc_auc", "sensitivity", "specificity", "ppv", "npv"])
        for name, interval in intervals.items():
            assert interval.estimated and interval.note == "", name
            for end in (interval.low, interval.high):
                assert 0.0 <= end <= 1.0 and end == round(end, DIGITS), (name, end)

    def test_the_same_scores_give_the_same_interval(self, clustered):
        assert auc_interval(*clustered) == auc_interval(*clustered)


class TestNotEstimable:
    def test_an_auc_of_one_in_every_resample(self):
        labels = np.repeat([0, 1] * 23, 3)  # 46 patients of three images
        patients = np.repeat(np.arange(46), 3)
        interval = auc_interval(labels, np.where(labels == 1, 0.99, 0.02), patients)
        assert (interval.low, interval.high) == (None, None)
        assert interval.note == "not estimable: 1.000 in every one of 1000 resamples of 46 patients"
        assert interval.describe() == interval.note

    def test_too_few_patients(self):
        labels = np.array([0, 1] * 12)  # 24 images of 9 patients
        patients = np.array([i % 9 for i in range(24)])
        interval = auc_interval(labels, np.linspace(0, 1, 24), patients)
        assert interval.note == "not estimable: 9 patients, fewer than the 10 an interval needs"

    def test_one_positive_patient_leaves_most_resamples_with_one_class(self):
        labels = np.repeat([1] + [0] * 19, 2)  # 20 patients, one of them positive
        scores = np.linspace(0, 1, 40)
        interval = auc_interval(labels, scores, np.repeat(np.arange(20), 2))
        # The positive patient is in a resample with probability 1 - (19/20)^20 = 0.64.
        assert interval.note.startswith("not estimable: only ")
        assert interval.note.endswith(" of 1000 resamples of 20 patients hold every class")
        held = int(interval.note.split()[3])
        assert 600 <= held <= 690

    def test_ppv_when_nothing_is_called_positive(self, clustered):
        labels, scores, patients = clustered
        none_called = Scores.at_threshold(labels, scores, threshold=2.0)
        interval = patient_bootstrap(none_called, patients, ["ppv"])["ppv"]
        assert interval.note == ("not estimable: no image is called positive in 1000 of 1000 resamples of "
                                 "60 patients")

    def test_an_interval_that_is_a_point(self):
        values = np.array([1.0] * 980 + [0.9] * 20)  # the 2.5th percentile is 1.0 too
        interval = _percentile_interval(values, (0.0, 1.0), level=0.95, of="46 patients")
        assert interval.note == ("not estimable: 1.000 in 980 of 1000 resamples of 46 patients, so the 95% "
                                 "interval is a point")


    def test_resamples_left_out_are_counted_in_the_reason(self):
        labels = np.repeat([1, 1, 1] + [0] * 27, 2)  # 30 patients, three positive: (27/30)^30 = 4 % left out
        interval = auc_interval(labels, labels * 0.8 + 0.1, np.repeat(np.arange(30), 2))
        kept = int(interval.note.split()[7])
        assert 940 <= kept <= 980
        assert interval.note == (f"not estimable: 1.000 in every one of {kept} resamples of 30 patients "
                                 f"({1000 - kept} more left out: a class missing or the metric undefined)")


class TestInterval:
    def test_stored_and_read_back(self):
        estimated = Interval(0.7, 0.9)
        absent = Interval.not_estimable("9 patients, fewer than the 10 an interval needs")
        report = {**estimated.as_report("roc_auc"), **absent.as_report("ppv")}
        assert report == {"roc_auc_ci_low": 0.7, "roc_auc_ci_high": 0.9, "roc_auc_ci_note": "",
                          "ppv_ci_low": None, "ppv_ci_high": None,
                          "ppv_ci_note": "not estimable: 9 patients, fewer than the 10 an interval needs"}
        assert interval_from_report(report, "roc_auc") == estimated
        assert interval_from_report(report, "ppv") == absent
        assert interval_from_report(report, "npv") is None  # a report without one
        # A CSV read back has NaN for empty cells.
        assert interval_from_report({"roc_auc_ci_low": 0.7, "roc_auc_ci_high": 0.9, "roc_auc_ci_note": float("nan")},
                                    "roc_auc") == estimated
        assert estimated.describe() == "0.700-0.900"
