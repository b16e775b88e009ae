"""The metrics registry: every metric against figures worked out by hand, and everything built from
the registry (params choices, messages, headline list, promotion direction) kept in step with it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_score, roc_auc_score

from dicomflow import metrics
from dicomflow.config.params import EvaluateParams
from dicomflow.errors import SettingsError
from dicomflow.metrics import Scores, reliability_table

# Four images at threshold 0.5: one true positive (0.9), one false negative (0.4), one false
# positive (0.6) and one true negative (0.1).
BINARY = Scores.at_threshold(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
# Three classes; the last image is called class 0 but is class 2.
THREE = Scores.at_threshold(np.array([0, 1, 2]), np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]))

BY_HAND = {
    ("roc_auc", "binary"): 0.75,                 # pairs (pos, neg): 0.9>0.6, 0.9>0.1, 0.4<0.6, 0.4>0.1
    # ranked 0.9 (pos), 0.6, 0.4 (pos), 0.1: precision 1 at recall 0.5, 2/3 at recall 1
    ("average_precision", "binary"): 1 * 0.5 + 2 / 3 * 0.5,
    ("brier", "binary"): (0.01 + 0.36 + 0.36 + 0.01) / 4,
    # one image per bin: |0.9 - 1|, |0.4 - 1|, |0.6 - 0|, |0.1 - 0|
    ("ece", "binary"): (0.1 + 0.6 + 0.6 + 0.1) / 4,
    ("accuracy", "binary"): 0.5,
    ("sensitivity", "binary"): 0.5,
    ("specificity", "binary"): 0.5,
    ("ppv", "binary"): 0.5,
    ("npv", "binary"): 0.5,
    ("f1", "binary"): 0.5,
    # one-vs-rest AUCs: class 0 (0.7 vs 0.2, 0.5) 1.0; class 1 (0.7 vs 0.2, 0.1) 1.0; class 2 (0.4 vs 0.1, 0.1) 1.0
    ("roc_auc", "multiclass"): 1.0,
    ("accuracy", "multiclass"): 2 / 3,
    ("brier", "multiclass"): (0.14 + 0.14 + (0.25 + 0.01 + 0.36)) / 3,
    # top-label confidences 0.7 (right), 0.7 (right), 0.5 (wrong): bins 7 and 5
    ("ece", "multiclass"): (2 * abs(0.7 - 1.0) + 1 * abs(0.5 - 0.0)) / 3,
    # per-class F1: class 0 (tp 1, fp 1, fn 0) 2/3; class 1 1.0; class 2 (never called) 0.0
    ("macro_f1", "multiclass"): (2 / 3 + 1.0 + 0.0) / 3,
}


def test_every_registered_metric_has_a_figure_by_hand_for_each_of_its_tasks():
    covered = {(name, task) for name, metric in metrics.METRICS.items() for task in metric.tasks}
    assert covered == set(BY_HAND)


@pytest.mark.parametrize(("name", "task"), sorted(BY_HAND))
def test_metric_by_hand(name, task):
    scores = BINARY if task == "binary" else THREE
    assert metrics.compute(name, scores) == pytest.approx(BY_HAND[name, task])


def test_brier_by_hand_for_two_and_three_classes():
    assert metrics.brier(Scores.at_threshold(np.array([1, 0, 1]), np.array([0.9, 0.2, 0.5]))) == pytest.approx(
        (0.01 + 0.04 + 0.25) / 3)
    assert metrics.brier(Scores.at_threshold(np.array([0, 1]), np.full(2, 0.5))) == pytest.approx(0.25)
    three = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    # image 1 (class 0): 0.09 + 0.04 + 0.01; image 2 (class 1): 0.01 + 0.81 + 0.64
    assert metrics.brier(Scores.at_threshold(np.array([0, 1]), three)) == pytest.approx((0.14 + 1.46) / 2)


def test_reliability_bins_and_ece_by_hand():
    labels = np.array([0, 0, 1, 1, 1])
    scores = np.array([0.05, 0.15, 0.15, 0.95, 1.0])
    rows = reliability_table(labels, scores, n_bins=10)
    assert [row["count"] for row in rows] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]  # 1.0 in the last bin
    assert rows[1]["mean_predicted"] == pytest.approx(0.15) and rows[1]["observed"] == pytest.approx(0.5)
    assert np.isnan(rows[2]["observed"])
    # |0.05 - 0| * 1 + |0.15 - 0.5| * 2 + |0.975 - 1| * 2, over 5 images
    assert metrics.ece(Scores.at_threshold(labels, scores)) == pytest.approx((0.05 + 0.7 + 0.05) / 5)


def test_the_operating_threshold_decides_the_calls():
    strict = Scores.at_threshold(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]), threshold=0.95)
    assert metrics.sensitivity(strict) == 0.0 and metrics.specificity(strict) == 1.0
    assert metrics.ppv(strict) == 0.0  # nothing called positive: 0.0 stands for undefined


def test_directions():
    lower_is_better = {name for name, metric in metrics.METRICS.items() if not metric.higher_is_better}
    assert lower_is_better == {"brier", "ece"}
    assert metrics.gain("brier", 0.1, 0.2) == pytest.approx(0.1)
    assert metrics.gain("roc_auc", 0.8, 0.9) == pytest.approx(-0.1)


def test_headline_metrics_are_the_dvc_exp_show_columns_in_order():
    assert metrics.HEADLINE_METRICS == ("roc_auc", "sensitivity", "specificity", "accuracy", "brier", "ece")


def test_the_params_loader_offers_every_registered_metric():
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(EvaluateParams)}["promotion_metric"]
    assert field.metadata["choices"] == tuple(metrics.METRICS)


def test_a_metric_of_another_task_is_refused_naming_the_setting_and_the_choices():
    with pytest.raises(SettingsError, match=r"^evaluate.promotion_metric 'sensitivity' is not computed for 3 "
                                            r"classes; use one of roc_auc, accuracy, brier, ece, macro_f1$"):
        metrics.metric_for("sensitivity", n_classes=3, setting="evaluate.promotion_metric")
    with pytest.raises(SettingsError, match=r"^metric 'auc' is not a metric; use one of roc_auc, sensitivity"):
        metrics.metric_for("auc", n_classes=2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_roc_auc_is_scikit_learns_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 150)
    scores = np.round(np.clip(0.2 * labels + rng.normal(0.4, 0.2, 150), 0, 1), 1)  # rounded: many ties
    assert metrics.roc_auc(Scores.at_threshold(labels, scores)) == pytest.approx(roc_auc_score(labels, scores),
                                                                                   abs=1e-12)
    three = rng.dirichlet(np.ones(3), 150)
    classes = rng.integers(0, 3, 150)
    expected = np.mean([roc_auc_score(classes == k, three[:, k]) for k in range(3)])
    assert metrics.roc_auc(Scores.at_threshold(classes, three)) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_refuses_one_class_as_scikit_learn_does():
    with pytest.raises(ValueError, match="only one class"):
        metrics.roc_auc(Scores.at_threshold(np.ones(4, int), np.linspace(0, 1, 4)))


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.8])
def test_predictive_values_are_scikit_learns_precision(threshold):
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 60)
    scores = Scores.at_threshold(labels, rng.random(60), threshold=threshold)
    assert metrics.ppv(scores) == precision_score(labels, scores.called, pos_label=1, zero_division=0.0)
    assert metrics.npv(scores) == precision_score(labels, scores.called, pos_label=0, zero_division=0.0)


def test_the_metrics_with_an_interval_are_the_cards_and_each_says_its_range():
    assert metrics.with_interval("binary") == ("roc_auc", "sensitivity", "specificity", "accuracy", "ppv", "npv")
    assert metrics.with_interval("multiclass") == ("roc_auc", "accuracy")
    assert all(metric.bounds == (0.0, 1.0) for metric in metrics.METRICS.values() if metric.interval)
    assert metrics.METRICS["brier"].bounds == (0.0, 2.0)  # three classes, all mass on a wrong one: 1 + 1
    assert metrics.brier(Scores.at_threshold(np.array([0]), np.array([[0.0, 1.0, 0.0]]))) == 2.0
