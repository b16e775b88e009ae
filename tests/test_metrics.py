"""The metrics registry: every metric against figures worked out by hand, and everything built from
the registry (params choices, messages, headline list, promotion direction) kept in step with it."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    balanced_accuracy_score,
    cohen_kappa_score,
    mean_absolute_error,
    precision_score,
    roc_auc_score,
)

from dicomflow import metrics
from dicomflow.config.params import EvaluateParams
from dicomflow.errors import SettingsError
from dicomflow.metrics import Scores, reliability_table

# Four images at threshold 0.5: one true positive (0.9), one false negative (0.4), one false
# positive (0.6) and one true negative (0.1).
BINARY = Scores.at_threshold(np.array([1, 1, 0, 0]), np.array([0.9, 0.4, 0.6, 0.1]))
# Three classes; the last image is called class 0 but is class 2.
THREE = Scores.at_threshold(np.array([0, 1, 2]), np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.5, 0.1, 0.4]]))
# Three ordered grades, five images, called their median grade: [0, 1, 1, 2, 0] (the most probable
# grade would be [0, 2, 1, 2, 0]: image 1's 0.45 on grade 2 is its mode, but its median is grade 1).
# Referable from grade index 2: P(grade >= 2) = [0.10, 0.45, 0.30, 0.75, 0.40], called at 0.42.
ORDINAL = Scores.at_threshold(
    np.array([0, 1, 1, 2, 2]),
    np.array([[0.65, 0.25, 0.10], [0.30, 0.25, 0.45], [0.15, 0.55, 0.30], [0.05, 0.20, 0.75], [0.55, 0.05, 0.40]]),
    task="ordinal", referable=2, referable_threshold=0.42)

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
    ("balanced_accuracy", "multiclass"): (1 + 1 + 0) / 3,  # recall per class
    # one-vs-rest AUCs: grade 0 1.0; grade 1 (0.25, 0.55 vs 0.25, 0.20, 0.05) 5.5/6; grade 2 (0.75, 0.40 vs
    # 0.10, 0.45, 0.30) 5/6
    ("roc_auc", "ordinal"): (1 + 5.5 / 6 + 5 / 6) / 3,
    ("accuracy", "ordinal"): 4 / 5,  # the median calls; the most probable grade would score 3/5
    ("brier", "ordinal"): (0.195 + 0.855 + 0.315 + 0.105 + 0.665) / 5,
    # top-label confidences 0.65 (right), 0.45 (wrong), 0.55 (right), 0.75 (right), 0.55 (wrong)
    ("ece", "ordinal"): (0.35 + 0.45 + 2 * abs(0.55 - 0.5) + 0.25) / 5,
    ("balanced_accuracy", "ordinal"): (1 + 1 + 0.5) / 3,
    ("macro_f1", "ordinal"): (2 / 3 + 1 + 2 / 3) / 3,
    # observed (true, called): (0,0), (1,1) x2, (2,2), (2,0); row sums [1, 2, 2], column sums [2, 2, 1];
    # sum w O = 4 (the 2 called 0), sum w E = (0.4 + 0.8) + (0.8 + 0.4) + (3.2 + 0.8) = 6.4
    ("qwk", "ordinal"): 1 - 4 / 6.4,
    ("mae_grade", "ordinal"): 2 / 5,  # one image off by two grades
    # referable (grade 2) 0.75 beats all three others, 0.40 beats 0.10 and 0.30 but not 0.45
    ("referable_auc", "ordinal"): 5 / 6,
    ("referable_sensitivity", "ordinal"): 1 / 2,  # 0.75 called, 0.40 not
    ("referable_specificity", "ordinal"): 2 / 3,  # 0.45 called referable
}


def test_every_registered_metric_has_a_figure_by_hand_for_each_of_its_tasks():
    covered = {(name, task) for name, metric in metrics.METRICS.items() for task in metric.tasks}
    assert covered == set(BY_HAND)


@pytest.mark.parametrize(("name", "task"), sorted(BY_HAND))
def test_metric_by_hand(name, task):
    scores = {"binary": BINARY, "multiclass": THREE, "ordinal": ORDINAL}[task]
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
    assert lower_is_better == {"brier", "ece", "mae_grade"}
    assert metrics.gain("brier", 0.1, 0.2) == pytest.approx(0.1)
    assert metrics.gain("roc_auc", 0.8, 0.9) == pytest.approx(-0.1)


def test_headline_metrics_are_the_dvc_exp_show_columns_in_order():
    assert metrics.HEADLINE_METRICS == ("roc_auc", "sensitivity", "specificity", "accuracy", "brier", "ece", "qwk",
                                        "referable_auc", "balanced_accuracy")


def test_the_params_loader_offers_every_registered_metric():
    import dataclasses

    field = {f.name: f for f in dataclasses.fields(EvaluateParams)}["promotion_metric"]
    assert field.metadata["choices"] == tuple(metrics.METRICS)


def test_a_metric_of_another_task_is_refused_naming_the_setting_and_the_choices():
    with pytest.raises(SettingsError, match=r"^evaluate.promotion_metric 'sensitivity' is not computed for the "
                                            r"multiclass task; use one of roc_auc, accuracy, brier, ece, "
                                            r"balanced_accuracy, macro_f1$"):
        metrics.metric_for("sensitivity", task="multiclass", setting="evaluate.promotion_metric")
    with pytest.raises(SettingsError, match=r"^metric 'auc' is not a metric; use one of roc_auc, sensitivity"):
        metrics.metric_for("auc", task="binary")


def test_ordinal_promotion_metrics_need_a_referable_grade_and_no_threshold():
    assert metrics.metric_for("qwk", task="ordinal", promotion=True).name == "qwk"
    assert metrics.metric_for("referable_auc", task="ordinal", referable=True, promotion=True).name == "referable_auc"
    with pytest.raises(SettingsError, match=r"^evaluate.promotion_metric 'referable_auc' needs "
                                            r"evaluate.referable_grade, which is not set; use one of roc_auc, "
                                            r"accuracy, brier, ece, qwk, balanced_accuracy, mae_grade, macro_f1$"):
        metrics.metric_for("referable_auc", task="ordinal", setting="evaluate.promotion_metric")
    with pytest.raises(SettingsError, match="'referable_sensitivity' reads an operating threshold"):
        metrics.metric_for("referable_sensitivity", task="ordinal", referable=True, promotion=True)
    with pytest.raises(SettingsError, match="'qwk' is not computed for the multiclass task"):
        metrics.metric_for("qwk", task="multiclass")


def test_an_ordinal_matrix_is_called_its_median_and_a_plain_matrix_its_mode():
    probabilities = ORDINAL.probabilities
    assert ORDINAL.task == "ordinal" and ORDINAL.called.tolist() == [0, 1, 1, 2, 0]
    plain = Scores.at_threshold(ORDINAL.labels, probabilities)
    assert plain.task == "multiclass" and plain.called.tolist() == [0, 2, 1, 2, 0]
    assert metrics.compute("accuracy", plain) == pytest.approx(3 / 5)
    with pytest.raises(SettingsError, match="'qwk' is not computed for the multiclass task"):
        metrics.compute("qwk", plain)
    with pytest.raises(ValueError, match="needs an \\(n, k\\) probability matrix"):
        Scores.at_threshold(np.array([0, 1]), np.array([0.2, 0.9]), task="ordinal")
    with pytest.raises(ValueError, match="referable and referable_threshold apply to ordinal scores"):
        Scores(np.array([0]), np.array([[1.0, 0, 0]]), np.array([0]), referable=1)


def test_the_referable_figures_need_their_grade_and_threshold():
    graded = Scores.at_threshold(ORDINAL.labels, ORDINAL.probabilities, task="ordinal")
    with pytest.raises(SettingsError, match="'referable_auc' needs evaluate.referable_grade"):
        metrics.compute("referable_auc", graded)
    no_threshold = Scores.at_threshold(ORDINAL.labels, ORDINAL.probabilities, task="ordinal", referable=2)
    assert metrics.referable_auc(no_threshold) == pytest.approx(5 / 6)
    with pytest.raises(ValueError, match="no referable_threshold; choose it on validation"):
        metrics.referable_sensitivity(no_threshold)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ordinal_metrics_are_scikit_learns(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, 200)
    # Grade probabilities peaked near the true grade, grade 3 never called most likely on some seeds.
    logits = -0.5 * (np.arange(5)[None, :] - labels[:, None] - rng.normal(0, 1.2, (200, 1))) ** 2
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    scores = Scores.at_threshold(labels, probabilities, task="ordinal", referable=2, referable_threshold=0.5)
    called = metrics.median_grade(probabilities)
    assert metrics.qwk(scores) == pytest.approx(
        cohen_kappa_score(labels, called, weights="quadratic", labels=range(5)), abs=1e-12)
    assert metrics.balanced_accuracy(scores) == pytest.approx(balanced_accuracy_score(labels, called), abs=1e-12)
    assert metrics.mae_grade(scores) == pytest.approx(mean_absolute_error(labels, called), abs=1e-12)
    referable = probabilities[:, 2:].sum(axis=1)
    assert metrics.referable_auc(scores) == pytest.approx(roc_auc_score(labels >= 2, referable), abs=1e-12)
    called_referable = referable >= 0.5
    assert metrics.referable_sensitivity(scores) == pytest.approx(np.mean(called_referable[labels >= 2]))
    assert metrics.referable_specificity(scores) == pytest.approx(np.mean(~called_referable[labels < 2]))


def test_qwk_keeps_the_distance_of_a_grade_absent_from_the_set():
    # Grade 1 never occurs: calling a 2 a 0 is still two grades off (weight 4), where scikit-learn
    # left to the labels it sees would make 0 and 2 neighbours (weight 1, as 2 and 3 are).
    labels, called = np.array([0, 0, 2, 2, 3]), np.array([0, 2, 2, 0, 3])
    scores = Scores(labels, np.eye(4)[called], called, "ordinal")
    assert metrics.qwk(scores) == pytest.approx(
        cohen_kappa_score(labels, called, weights="quadratic", labels=[0, 1, 2, 3]))
    assert metrics.qwk(scores) != pytest.approx(cohen_kappa_score(labels, called, weights="quadratic"))


def test_qwk_of_one_grade_everywhere_is_undefined():
    scores = Scores(np.zeros(3, int), np.tile([1.0, 0.0, 0.0], (3, 1)), np.zeros(3, int), "ordinal")
    assert np.isnan(metrics.qwk(scores))


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
    assert metrics.with_interval("ordinal") == ("roc_auc", "accuracy", "qwk", "referable_auc",
                                                "referable_sensitivity", "referable_specificity")
    assert all(metric.bounds == (0.0, 1.0) for metric in metrics.METRICS.values()
               if metric.interval and metric.name != "qwk")
    assert metrics.METRICS["qwk"].bounds == (-1.0, 1.0)  # worse than chance is negative
    assert metrics.METRICS["brier"].bounds == (0.0, 2.0)  # three classes, all mass on a wrong one: 1 + 1
    assert metrics.brier(Scores.at_threshold(np.array([0]), np.array([[0.0, 1.0, 0.0]]))) == 2.0
