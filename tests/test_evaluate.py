"""Evaluate stage: threshold choice, metrics against hand counts, plot data, champion/challenger aliases."""

from __future__ import annotations

import logging
import math

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from dicomflow.errors import DataError, SettingsError
from dicomflow.evaluation.plots import (
    calibration_table,
    confusion_table,
    write_class_reliability,
    write_confusion_matrix,
    write_plot_data,
)
from dicomflow.evaluation.metrics import (
    age_band,
    calibration_metrics,
    choose_referable_threshold,
    choose_threshold,
    compute_metrics,
    compute_multiclass_metrics,
    headline,
    loggable,
    subgroup_metrics,
    weakest_subgroup,
)
from dicomflow.evaluation.promotion import Comparison, promotion_score, should_promote

# Eight images, asymmetric on purpose so that PPV/NPV or sensitivity/PPV swapped would show.
# At threshold 0.5 (score >= 0.5 is positive; 0.5 itself is a false positive):
#   TP = 2 (0.9, 0.6), FN = 1 (0.4), FP = 2 (0.7, 0.5), TN = 3 (0.3, 0.2, 0.1)
HAND_TRUE = np.array([1, 1, 1, 0, 0, 0, 0, 0])
HAND_SCORE = np.array([0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1, 0.5])


NAN = float("nan")


def own_patients(n: int) -> np.ndarray:
    """One patient per image."""
    return np.array([f"p{i}" for i in range(n)], dtype=object)


@pytest.fixture
def scored():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 2, 300)
    y_score = np.clip(y_true * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    return y_true, y_score


class TestChooseThreshold:
    def test_youden_maximises_sensitivity_plus_specificity(self, scored):
        y_true, y_score = scored
        threshold = choose_threshold(y_true, y_score, method="youden", fixed=0.5)

        def youden(t):
            pred = y_score >= t
            sens = (pred & (y_true == 1)).sum() / (y_true == 1).sum()
            spec = (~pred & (y_true == 0)).sum() / (y_true == 0).sum()
            return sens + spec - 1

        best_by_search = max(youden(t) for t in np.unique(y_score))
        assert youden(threshold) == pytest.approx(best_by_search)

    def test_youden_on_a_separated_split_sits_between_the_classes(self):
        y_true = np.array([0, 0, 0, 1, 1, 1])
        y_score = np.array([0.01, 0.2, 0.3, 0.99990, 0.99995, 0.99999])
        # Any threshold in (0.3, 0.9999] separates them; the middle, not the positives' edge.
        assert choose_threshold(y_true, y_score, method="youden") == pytest.approx((0.3 + 0.9999) / 2)

    def test_fixed_returns_the_param(self, scored):
        assert choose_threshold(*scored, method="fixed", fixed=0.3) == 0.3

    def test_rejects_unknown_method_and_one_class(self, scored):
        with pytest.raises(ValueError, match="'youden', 'fixed', 'target_sensitivity'; got 'best'"):
            choose_threshold(*scored, method="best", fixed=0.5)
        with pytest.raises(DataError, match="one class only"):
            choose_threshold(np.ones(5), np.linspace(0, 1, 5), method="youden", fixed=0.5)
        with pytest.raises(DataError, match="one class only"):
            choose_threshold(np.ones(5), np.linspace(0, 1, 5), method="target_sensitivity",
                             target_sensitivity=0.9)

    def test_fixed_needs_its_value(self, scored):
        with pytest.raises(ValueError, match="fixed must be a float when method is 'fixed'; got None"):
            choose_threshold(*scored, method="fixed")

    @pytest.mark.parametrize("target", [None, 0, -0.1, 1.5])
    def test_target_sensitivity_must_be_in_zero_one(self, scored, target):
        with pytest.raises(ValueError, match=r"target_sensitivity must be a float in \(0, 1\] .*; "
                                             rf"got {target!r}"):
            choose_threshold(*scored, method="target_sensitivity", target_sensitivity=target)

    # Validation ranked by score: 1 1 0 1 0 1 0 0 (four positives). Reaching sensitivity k/4 needs
    # the k-th positive's score. 0.25 -> 0.95 fails if collinear ROC points are dropped
    # (roc_curve's default drops the 0.95 point, leaving 0.85 as the first with tpr >= 0.25).
    @pytest.mark.parametrize(("target", "expected"),
                             [(0.25, 0.95), (0.3, 0.85), (0.5, 0.85), (0.75, 0.65), (0.9, 0.45),
                              (1.0, 0.45)])
    def test_target_sensitivity_by_hand(self, target, expected):
        y_true = np.array([1, 1, 0, 1, 0, 1, 0, 0])
        y_score = np.array([0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25])
        threshold = choose_threshold(y_true, y_score, method="target_sensitivity",
                                     target_sensitivity=target)
        assert threshold == expected

    @pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
    def test_target_sensitivity_is_the_highest_threshold_meeting_it(self, scored, target):
        y_true, y_score = scored
        threshold = choose_threshold(y_true, y_score, method="target_sensitivity",
                                     target_sensitivity=target)

        def sensitivity(t):
            return (y_score[y_true == 1] >= t).mean()

        assert sensitivity(threshold) >= target
        higher = np.unique(y_score[y_score > threshold])
        assert len(higher) > 0 and sensitivity(higher[0]) < target  # next higher score falls short


class TestComputeMetrics:
    def test_matches_hand_counts(self):
        y_true = np.array([1, 1, 1, 0, 0, 0, 0, 1])
        y_score = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
        metrics = compute_metrics(y_true, y_score, threshold=0.5, patients=own_patients(8))
        # at 0.5: TP = 3 (0.9, 0.8, 0.7), FN = 1 (0.3), FP = 1 (0.6), TN = 3
        assert metrics["sensitivity"] == pytest.approx(3 / 4)
        assert metrics["specificity"] == pytest.approx(3 / 4)
        assert metrics["accuracy"] == pytest.approx(6 / 8)
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y_true, y_score))
        assert (metrics["n_test"], metrics["n_test_positive"]) == (8, 4)

    def test_new_metrics_match_hand_counts(self):
        metrics = compute_metrics(HAND_TRUE, HAND_SCORE, threshold=0.5, patients=own_patients(8))
        assert metrics["sensitivity"] == pytest.approx(2 / 3)
        assert metrics["specificity"] == pytest.approx(3 / 5)
        assert metrics["ppv"] == pytest.approx(2 / 4)  # TP / (TP + FP)
        assert metrics["npv"] == pytest.approx(3 / 4)  # TN / (TN + FN)
        assert metrics["f1"] == pytest.approx(4 / 7)  # 2 TP / (2 TP + FP + FN)
        # Brier: (0.1² + 0.4² + 0.6²) for the positives + (0.7² + 0.3² + 0.2² + 0.1² + 0.5²)
        # = 0.01 + 0.16 + 0.36 + 0.49 + 0.09 + 0.04 + 0.01 + 0.25 = 1.41, over 8 images
        assert metrics["brier"] == pytest.approx(1.41 / 8)
        # Average precision, by score: 0.9 (+) 0.7 (-) 0.6 (+) 0.5 (-) 0.4 (+); each positive adds
        # 1/3 of recall times the precision there: 1/3 * (1/1 + 2/3 + 3/5) = 34/45
        assert metrics["average_precision"] == pytest.approx(34 / 45)

    @pytest.mark.parametrize(("threshold", "nobody", "zero", "other", "expected"),
                             [(0.95, "positive", "ppv", "npv", 5 / 8),  # all negative: NPV = TN / n
                              (0.0, "negative", "npv", "ppv", 3 / 8)])  # all positive: PPV = prevalence
    def test_undefined_predictive_value_is_zero_with_a_warning(self, caplog, threshold, nobody, zero,
                                                               other, expected):
        with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
            metrics = compute_metrics(HAND_TRUE, HAND_SCORE, threshold=threshold, patients=own_patients(8))
        assert metrics[zero] == 0.0
        assert metrics[other] == pytest.approx(expected)
        assert all(math.isfinite(value) for value in metrics.values() if isinstance(value, float))
        assert f"no test image is predicted {nobody}" in caplog.text
        assert f"{zero.upper()} reported as 0.0" in caplog.text

    def test_every_interval_resamples_the_patients_given(self, scored):
        y_true, y_score = scored  # 300 images, here of 100 patients of three images each
        patients = np.repeat(np.arange(100), 3).astype(str)
        metrics = compute_metrics(y_true, y_score, threshold=0.5, patients=patients)
        assert metrics["n_test_patients"] == 100
        for name in ("roc_auc", "accuracy", "sensitivity", "specificity", "ppv", "npv"):
            assert metrics[f"{name}_ci_low"] < metrics[name] < metrics[f"{name}_ci_high"], name
            assert metrics[f"{name}_ci_note"] == ""
        assert "f1_ci_low" not in metrics and "brier_ci_low" not in metrics  # the registry gives them none

    def test_a_separated_split_has_no_interval_and_says_why(self):
        y_true = np.repeat([0, 1] * 23, 3)  # 46 patients of three images, each patient one class
        y_score = np.where(y_true == 1, 0.9, 0.1)
        metrics = compute_metrics(y_true, y_score, threshold=0.5, patients=np.repeat(np.arange(46), 3))
        assert metrics["roc_auc"] == 1.0
        assert metrics["roc_auc_ci_low"] is None and metrics["roc_auc_ci_high"] is None
        assert metrics["roc_auc_ci_note"] == "not estimable: 1.000 in every one of 1000 resamples of 46 patients"
        assert loggable(metrics)["roc_auc"] == 1.0
        assert not {"roc_auc_ci_low", "roc_auc_ci_note"} & set(loggable(metrics))  # MLflow takes numbers only

    def test_patients_must_match_the_images(self):
        with pytest.raises(DataError, match="patients holds 7 keys for 8 images"):
            compute_metrics(HAND_TRUE, HAND_SCORE, threshold=0.5, patients=own_patients(7))
        with pytest.raises(DataError, match="patient_key is missing for 1 of 8 images"):
            compute_metrics(HAND_TRUE, HAND_SCORE, threshold=0.5, patients=[*own_patients(7), None])


class TestCalibrationTable:
    def test_quantile_bins_by_hand(self):
        # n_bins=4 on 8 scores: quartile edges 0.1, 0.275, 0.45, 0.625, 0.9 put two images in each
        # bin: (0.1 -, 0.2 -), (0.3 -, 0.4 +), (0.5 -, 0.6 +), (0.7 -, 0.9 +)
        table = calibration_table(HAND_TRUE, HAND_SCORE, n_bins=4)
        assert list(table.columns) == ["mean_predicted", "fraction_positive", "count"]
        np.testing.assert_allclose(table["mean_predicted"], [0.15, 0.35, 0.55, 0.8])
        np.testing.assert_allclose(table["fraction_positive"], [0, 0.5, 0.5, 0.5])
        assert table["count"].tolist() == [2, 2, 2, 2]

    @pytest.mark.parametrize("tied", [False, True])
    def test_counts_sum_to_n_and_match_the_fractions(self, scored, tied):
        y_true, y_score = scored
        if tied:  # a saturated sigmoid: many identical scores make quantile edges coincide
            y_score = np.where(y_score > 0.6, 1.0, np.where(y_score < 0.2, 0.0, y_score))
        table = calibration_table(y_true, y_score)
        assert table["count"].sum() == len(y_true)
        # Ten bins even when ties make percentile edges coincide (3 of 10 were left before).
        assert len(table) == 10 and (table["count"] > 0).all()
        assert table["count"].max() - table["count"].min() <= 1
        positives = table["fraction_positive"] * table["count"]
        np.testing.assert_allclose(positives, np.round(positives), atol=1e-9)  # whole images per bin
        assert round(positives.sum()) == y_true.sum()
        assert table["mean_predicted"].is_monotonic_increasing

    def test_tied_scores_by_hand(self):
        # 6 scores, 3 bins of 2 by rank; the four tied 0.0 scores fill two bins in input order.
        table = calibration_table(np.array([0, 1, 0, 0, 1, 1]), np.array([0.0, 0.0, 0.0, 0.0, 1.0, 1.0]),
                                  n_bins=3)
        assert table["count"].tolist() == [2, 2, 2]
        np.testing.assert_allclose(table["mean_predicted"], [0.0, 0.0, 1.0])
        np.testing.assert_allclose(table["fraction_positive"], [0.5, 0.0, 1.0])

    def test_fewer_images_than_bins_and_bad_input(self):
        assert calibration_table(np.array([0, 1]), np.array([0.2, 0.9]))["count"].tolist() == [1, 1]
        with pytest.raises(ValueError, match="same length; got 2 and 3"):
            calibration_table(np.array([0, 1]), np.array([0.2, 0.9, 0.5]))
        with pytest.raises(ValueError, match="n_bins must be a positive int; got 0"):
            calibration_table(np.array([0, 1]), np.array([0.2, 0.9]), n_bins=0)


def test_write_plot_data_writes_and_returns_every_file(tmp_path, scored):
    y_true, y_score = scored
    files = write_plot_data(y_true, y_score, threshold=0.5, out_dir=tmp_path / "plots")
    assert {path.name for path in files} == {"roc.csv", "confusion.csv", "pr.csv", "calibration.csv",
                                             "roc_confusion.png", "pr_calibration.png"}
    assert all(path.stat().st_size > 0 for path in files)  # main logs this list to MLflow

    pr = pd.read_csv(tmp_path / "plots" / "pr.csv")
    assert list(pr.columns) == ["recall", "precision"]
    assert (np.diff(pr["recall"]) <= 0).all()
    assert (pr["recall"].iloc[0], pr["recall"].iloc[-1]) == (1.0, 0.0)
    assert pr["precision"].between(0, 1).all()
    calibration = pd.read_csv(tmp_path / "plots" / "calibration.csv")
    assert list(calibration.columns) == ["mean_predicted", "fraction_positive", "count"]
    assert calibration["count"].sum() == len(y_true)


# (candidate, champion, metric, min_gain) -> promoted, each decided by hand from the rule the
# evaluate stage documents: promote when there is no champion, or when the candidate beats it in
# the metric's direction (lower Brier is better) by more than float rounding and by min_gain.
PROMOTION_CASES = [
    (0.80, None, "roc_auc", 0.0, True),            # no champion yet: the first model is champion
    (0.10, None, "brier", 0.5, True),              # ...whatever the metric and the minimum gain
    (0.81, 0.80, "roc_auc", 0.0, True),
    (0.70, 0.80, "roc_auc", 0.0, False),
    (0.80, 0.80, "roc_auc", 0.0, False),           # a tie is no gain
    (0.80 + 1e-9, 0.80, "roc_auc", 0.0, False),    # the same model scored in another process
    (0.80 + 1e-5, 0.80, "roc_auc", 0.0, True),     # a small but real gain
    (0.83, 0.80, "roc_auc", 0.02, True),
    (0.81, 0.80, "roc_auc", 0.02, False),          # better, by less than the minimum gain
    (0.75, 0.50, "roc_auc", 0.25, True),           # exactly the minimum gain (exact in binary)
    (0.82, 0.80, "roc_auc", 0.02, True),           # exactly the minimum gain, 0.01999... in floats
    (0.70, 0.60, "accuracy", 0.05, True),
    (0.60, 0.70, "f1", 0.0, False),
    (0.10, 0.15, "brier", 0.02, True),             # lower Brier is better
    (0.15, 0.10, "brier", 0.0, False),             # a higher Brier is worse
    (0.14, 0.15, "brier", 0.02, False),            # better, by less than the minimum gain
    (0.25, 0.50, "brier", 0.25, True),             # exactly the minimum gain
    (0.10, 0.10, "brier", 0.0, False),             # a tie is no gain
    (0.10 - 1e-9, 0.10, "brier", 0.0, False),      # rounding, in the lower-is-better direction
]


@pytest.mark.parametrize("candidate, champion, metric, min_gain, promoted", PROMOTION_CASES)
def test_should_promote_by_hand(candidate, champion, metric, min_gain, promoted):
    """The promotion decision for hand-decided cases: ties, rounding, minimum gain, Brier."""
    assert should_promote(candidate, champion, metric=metric, min_gain=min_gain) is promoted


@pytest.mark.parametrize("candidate, champion, version, min_gain, alias", [
    (0.70, None, None, 0.0, "champion"),   # nothing registered as champion before
    (0.99, None, "3", 0.0, "challenger"),  # a champion that could not be scored is never replaced
    (0.90, 0.80, "3", 0.0, "champion"),
    (0.90, 0.80, "3", 0.2, "challenger"),
    (0.80, 0.80, "3", 0.0, "challenger"),
])
def test_comparison_decides_the_alias_by_hand(candidate, champion, version, min_gain, alias):
    """The alias a comparison gives the candidate, including an unscored and an absent champion."""
    comparison = Comparison("roc_auc", candidate, champion, version, images=10, data_version="d" * 12)
    assert comparison.decide(min_gain=min_gain)[0] == alias


def test_the_decision_in_words_by_hand():
    """The promotion_decision tag and the card's Decision line, written out by hand."""
    beaten = Comparison("roc_auc", 0.9, 0.79, "1", images=114, data_version="ab12" * 8)
    assert beaten.decide(min_gain=0.0) == ("champion", "champion: roc_auc on 114 val images of data ab12ab12ab12, "
                                           "candidate 0.9000 vs champion version 1 0.7900 (minimum gain 0)")
    fair = Comparison("brier", 0.1, 0.2, "4", images=30, data_version="ab12" * 8, excluded=7)
    assert fair.decide(min_gain=0.01) == ("champion", "champion: brier on 30 val images (7 left out: the champion "
                                          "trained on them) of data ab12ab12ab12, candidate 0.1000 vs champion "
                                          "version 4 0.2000 (minimum gain 0.01)")
    unscored = Comparison("roc_auc", 0.99, None, "3", images=114, data_version="x",
                          reason="it answered none of the 114 files with a probability")
    assert unscored.decide(min_gain=0.0) == (
        "challenger", "challenger: champion version 3 could not be compared (it answered none of the 114 files "
                      "with a probability); compare them and move the alias by hand")
    first = Comparison("roc_auc", 0.7, None, None, images=20, data_version="cd" * 16)
    assert first.decide(min_gain=0.5) == ("champion", "champion: no champion before (roc_auc on 20 val images of "
                                          "data cdcdcdcdcdcd: 0.7000)")


class TestMulticlassMetrics:
    # Six images, three classes; predicted = argmax: [0, 1, 1, 2, 2, 0]
    truth = np.array([0, 0, 1, 1, 2, 2])
    scores = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1],
                       [0.1, 0.3, 0.6], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])

    def test_matches_hand_counts(self):
        metrics = compute_multiclass_metrics(self.truth, self.scores, classes=[0, 1, 2], patients=own_patients(6))

        assert metrics["accuracy"] == pytest.approx(3 / 6)
        # class 1: actual {2, 3}, called {1, 2}: sensitivity 1/2, specificity 3/4, PPV 1/2
        assert metrics["sensitivity_1"] == pytest.approx(0.5)
        assert metrics["specificity_1"] == pytest.approx(0.75)
        assert metrics["ppv_1"] == pytest.approx(0.5)
        per_class = [roc_auc_score(self.truth == k, self.scores[:, k]) for k in range(3)]
        assert metrics["roc_auc_2"] == pytest.approx(per_class[2])
        assert metrics["roc_auc"] == pytest.approx(np.mean(per_class))
        assert metrics["n_test_0"] == 2 and metrics["n_test"] == 6 and metrics["n_test_patients"] == 6
        for name in ("roc_auc", "accuracy", "sensitivity_1", "specificity_2"):  # six patients: too few
            assert metrics[f"{name}_ci_low"] is None
            assert metrics[f"{name}_ci_note"] == "not estimable: 6 patients, fewer than the 10 an interval needs"
        assert "ppv_1_ci_low" not in metrics and "roc_auc_1_ci_low" not in metrics

    def test_intervals_resample_patients_for_more_classes_too(self):
        truth, scores = np.tile(self.truth, 10), np.tile(self.scores, (10, 1))  # 60 images of 20 patients
        metrics = compute_multiclass_metrics(truth, scores, classes=[0, 1, 2],
                                             patients=np.repeat(np.arange(20), 3))
        assert metrics["n_test_patients"] == 20
        assert metrics["accuracy_ci_low"] < 0.5 < metrics["accuracy_ci_high"]
        assert metrics["sensitivity_1_ci_low"] < 0.5 < metrics["sensitivity_1_ci_high"]

    def test_class_names_come_from_the_labels(self):
        metrics = compute_multiclass_metrics(self.truth, self.scores, classes=[3, 5, 9], patients=own_patients(6))

        assert "sensitivity_9" in metrics and "sensitivity_2" not in metrics

    def test_a_class_missing_from_test_is_a_clear_error(self):
        with pytest.raises(DataError, match=r"no image of class\(es\) \[2\]"):
            compute_multiclass_metrics(self.truth[:4], self.scores[:4], classes=[0, 1, 2], patients=own_patients(4))


@pytest.mark.parametrize(("years", "band"), [(None, "unknown"), (math.nan, "unknown"), (0, "0-17"),
                                             (17, "0-17"), (18, "18-39"), (64, "40-64"), (90, "65+")])
def test_age_band(years, band):
    assert age_band(years) == band


class TestSubgroupMetrics:
    def _manifest(self) -> pd.DataFrame:
        return pd.DataFrame({
            "patient_key": ["a", "b", "b", "c", "d", "e"],
            "patient_sex": pd.array(["F", "F", "F", "M", "M", None], dtype="string"),
            "patient_age_years": pd.array([30, 70, 70, 50, None, 10], dtype="Int64"),
            "manufacturer": ["A", "A", "B", "B", "B", "B"],
            "view_position": ["PA", "PA", "PA", "AP", "AP", ""],
        })

    def test_counts_and_metrics_by_hand(self):
        truth = np.array([1, 0, 1, 1, 0, 0])
        scores = np.array([0.9, 0.2, 0.4, 0.8, 0.6, 0.1])  # called at 0.5: [1, 0, 0, 1, 1, 0]

        table = subgroup_metrics(self._manifest(), truth, scores, threshold=0.5).set_index(
            ["attribute", "group"])

        female = table.loc[("patient_sex", "F")]
        assert (female["n"], female["n_patients"], female["n_positive"]) == (3, 2, 2)
        assert math.isnan(female["roc_auc_ci_low"]) and math.isnan(female["roc_auc_ci_high"])
        assert female["roc_auc_ci_note"] == "not estimable: 2 patients, fewer than the 10 an interval needs"
        assert female["sensitivity"] == pytest.approx(0.5) and female["specificity"] == pytest.approx(1.0)
        assert female["roc_auc"] == pytest.approx(roc_auc_score([1, 0, 1], [0.9, 0.2, 0.4]))
        male = table.loc[("patient_sex", "M")]
        assert (male["sensitivity"], male["specificity"]) == (1.0, 0.0)
        unknown_sex = table.loc[("patient_sex", "unknown")]
        assert unknown_sex["n"] == 1 and math.isnan(unknown_sex["roc_auc"])
        assert unknown_sex["roc_auc_ci_note"] == "not estimable: no AUC, the group lacks a class"
        assert math.isnan(unknown_sex["sensitivity"])  # no positive in the group
        assert table.loc[("age_band", "65+"), "n"] == 2
        assert table.loc[("age_band", "unknown"), "n"] == 1
        assert table.loc[("view_position", "unknown"), "n"] == 1  # empty text is unknown too
        for attribute in ("patient_sex", "age_band", "manufacturer", "view_position"):
            assert table.loc[attribute, "n"].sum() == 6

    def test_multiclass_groups_report_accuracy_and_macro_auc(self):
        truth = np.array([0, 1, 2, 0, 1, 2])
        scores = np.eye(3)[[0, 1, 2, 1, 1, 2]] * 0.8 + 0.2 / 3

        table = subgroup_metrics(self._manifest(), truth, scores, threshold=None).set_index(
            ["attribute", "group"])

        assert table.loc[("manufacturer", "B"), "accuracy"] == pytest.approx(3 / 4)
        assert "sensitivity" not in table.columns

    def test_the_auc_interval_of_a_group_resamples_its_patients(self):
        # 40 patients of three images, alternately F and M; F's scores overlap, M's separate.
        rng = np.random.default_rng(3)
        truth = np.repeat(np.arange(40) // 2 % 2, 3)
        female_rows = np.repeat(np.arange(40) % 2, 3) == 0
        scores = np.where(truth == 1, 0.7, 0.3) + np.repeat(rng.normal(0, 0.15, 40), 3) * female_rows
        manifest = pd.DataFrame({"patient_key": np.repeat([f"p{i}" for i in range(40)], 3),
                                 "patient_sex": np.repeat(["F", "M"] * 20, 3), "patient_age_years": 50,
                                 "manufacturer": "A", "view_position": "PA"})
        table = subgroup_metrics(manifest, truth, scores, threshold=0.5).set_index(["attribute", "group"])
        female, male = table.loc[("patient_sex", "F")], table.loc[("patient_sex", "M")]
        assert (female["n"], female["n_patients"]) == (60, 20)
        assert female["roc_auc_ci_low"] < female["roc_auc"] <= female["roc_auc_ci_high"]
        assert female["roc_auc_ci_note"] == ""
        assert male["roc_auc"] == 1.0 and math.isnan(male["roc_auc_ci_low"])
        assert male["roc_auc_ci_note"] == "not estimable: 1.000 in every one of 1000 resamples of 20 patients"


def subgroup_table(rows: list[tuple]) -> pd.DataFrame:
    """A subgroup table of (group, n_patients, AUC, interval low, high, note) rows of one attribute."""
    return pd.DataFrame([{"attribute": "manufacturer", "group": group, "n": 3 * patients, "n_patients": patients,
                          "roc_auc": auc, "roc_auc_ci_low": low, "roc_auc_ci_high": high, "roc_auc_ci_note": note}
                         for group, patients, auc, low, high, note in rows])


class TestWeakestSubgroup:
    NOT_ESTIMABLE = "not estimable: 1.000 in every one of 1000 resamples of 20 patients"

    def test_all_tied_names_no_subgroup(self):
        table = subgroup_table([("A", 20, 1.0, NAN, NAN, self.NOT_ESTIMABLE),
                                ("B", 30, 1.0, NAN, NAN, self.NOT_ESTIMABLE),
                                ("C", 4, NAN, NAN, NAN, "not estimable: no AUC, the group lacks a class")])
        assert weakest_subgroup(table, overall_auc=1.0) == (
            "weakest subgroup by AUC: none, no subgroup is weaker (all 2 with an AUC at 1.000)")

    def test_a_group_whose_interval_ends_below_the_whole_split_is_named(self):
        table = subgroup_table([("A", 20, 0.99, 0.95, 1.0, ""), ("B", 30, 0.80, 0.70, 0.88, "")])
        assert weakest_subgroup(table, overall_auc=0.93) == (
            "weakest subgroup by AUC: manufacturer = B (n 90, 30 patients), AUC 0.800 (95% CI 0.700-0.880), "
            "below the whole split's 0.930")

    def test_a_group_within_its_interval_of_the_whole_split_is_not_named_weaker(self):
        table = subgroup_table([("A", 20, 0.99, 0.95, 1.0, ""), ("B", 30, 0.90, 0.80, 0.97, "")])
        assert weakest_subgroup(table, overall_auc=0.95) == (
            "weakest subgroup by AUC: none shown; the lowest, manufacturer = B (n 90, 30 patients), AUC 0.900 "
            "(95% CI 0.800-0.970), is within its interval of the whole split's 0.950")

    def test_a_lowest_group_without_an_interval_says_why(self):
        few = "not estimable: 5 patients, fewer than the 10 an interval needs"
        table = subgroup_table([("A", 20, 1.0, NAN, NAN, self.NOT_ESTIMABLE), ("B", 5, 0.75, NAN, NAN, few)])
        assert weakest_subgroup(table, overall_auc=0.97) == (
            "weakest subgroup by AUC: none shown; the lowest, manufacturer = B (n 15, 5 patients), AUC 0.750, "
            "has no interval (not estimable: 5 patients, fewer than the 10 an interval needs)")


def test_promotion_scores_each_model_at_its_own_threshold():
    labels = np.array([1, 1, 0, 0])
    answers = pd.DataFrame({"probability": [0.9, 0.4, 0.35, 0.1], "label": [1, 1, 0, 0], "error": ""})
    # The label column says this model's threshold sits below 0.4: every image is called right.
    assert promotion_score("accuracy", labels, answers, [0, 1]) == 1.0
    assert promotion_score("sensitivity", labels, answers, [0, 1]) == 1.0
    assert promotion_score("roc_auc", labels, answers, [0, 1]) == 1.0
    assert promotion_score("brier", labels, answers, [0, 1]) == pytest.approx(
        (0.01 + 0.36 + 0.1225 + 0.01) / 4)
    three = pd.DataFrame({"probability_3": [0.7, 0.2, 0.1], "probability_5": [0.2, 0.7, 0.1],
                          "probability_9": [0.1, 0.1, 0.8], "label": [3, 5, 5], "error": ""})
    assert promotion_score("accuracy", np.array([0, 1, 2]), three, [3, 5, 9]) == pytest.approx(2 / 3)
    # Brier of three classes: (0.09 + 0.04 + 0.01) + (0.04 + 0.09 + 0.01) + (0.01 + 0.01 + 0.04), over 3
    assert promotion_score("brier", np.array([0, 1, 2]), three, [3, 5, 9]) == pytest.approx((0.14 + 0.14 + 0.06) / 3)
    with pytest.raises(SettingsError, match="evaluate.promotion_metric 'sensitivity' is not computed for the "
                                            "multiclass task; use one of roc_auc, accuracy, brier, ece, "
                                            "balanced_accuracy, macro_f1"):
        promotion_score("sensitivity", np.array([0, 1, 2]), three, [3, 5, 9])


def test_promotion_scores_an_ordinal_model_on_its_called_grades_and_referable_probability():
    # Three grades; the served label is the called grade. Probabilities of grade >= 5: 0.3, 0.8, 0.6.
    answers = pd.DataFrame({"probability_3": [0.7, 0.1, 0.2], "probability_5": [0.2, 0.4, 0.3],
                            "probability_9": [0.1, 0.4, 0.5], "label": [3, 5, 9], "error": ""})
    labels = np.array([0, 2, 1])
    # Called [0, 1, 2] against [0, 2, 1]: two off by one. Weighted disagreement 2 (observed) over
    # the chance 1/3 * (1 + 4 + 1 + 1 + 4 + 1) = 4: kappa 1 - 2/4.
    assert promotion_score("qwk", labels, answers, [3, 5, 9], task="ordinal") == pytest.approx(0.5)
    # Referable from grade 5: true [no, yes, yes]; 0.3 below both 0.8 and 0.6.
    assert promotion_score("referable_auc", labels, answers, [3, 5, 9], task="ordinal",
                           referable_grade=5) == 1.0
    with pytest.raises(SettingsError, match="'referable_auc' needs evaluate.referable_grade"):
        promotion_score("referable_auc", labels, answers, [3, 5, 9], task="ordinal")
    with pytest.raises(SettingsError, match="'referable_sensitivity' reads an operating threshold"):
        promotion_score("referable_sensitivity", labels, answers, [3, 5, 9], task="ordinal", referable_grade=5)


def peaked(called: list[int], k: int = 5) -> np.ndarray:
    """Grade probabilities peaked on each called grade, exp(-(g - c)^2) normalised: symmetric, so
    the median and the mode are the called grade, and P(grade >= r) grows with it."""
    weights = np.exp(-(np.arange(k)[None, :] - np.asarray(called)[:, None]) ** 2.0)
    return weights / weights.sum(axis=1, keepdims=True)


class TestOrdinalReport:
    """The evaluate library on five grades: figures by hand, the referable threshold from validation."""

    classes = [0, 1, 2, 3, 4]
    truth = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    called = [0, 1, 1, 1, 2, 3, 3, 4, 4, 2]  # wrong: images 1 (0 as 1), 5 (2 as 3), 7 (3 as 4), 9 (4 as 2)
    # Validation: non-referable images called grade 2 (P(>= 2) 0.79), referable ones 3 or 4 (0.99,
    # 1.0): the best cut there lies between 0.79 and 0.99.
    val_truth = np.array([0, 1, 1, 2, 3, 4])
    val_called = [0, 2, 2, 3, 3, 4]

    def report(self, **options):
        threshold = choose_referable_threshold(self.val_truth, peaked(self.val_called), referable=2,
                                               method="youden")
        return threshold, compute_multiclass_metrics(
            self.truth, peaked(self.called), classes=self.classes, patients=own_patients(10), task="ordinal",
            referable_grade=2, referable_threshold=threshold, **options)

    def test_the_report_keys_and_figures_by_hand(self):
        _, metrics = self.report()
        assert metrics["accuracy"] == pytest.approx(6 / 10)
        assert metrics["balanced_accuracy"] == pytest.approx((0.5 + 1 + 0.5 + 0.5 + 0.5) / 5)
        assert metrics["mae_grade"] == pytest.approx((1 + 1 + 1 + 2) / 10)
        assert metrics["qwk"] == pytest.approx(cohen_kappa_score(self.truth, self.called, weights="quadratic",
                                                                 labels=self.classes))
        # Grade 1: images 2 and 3 are grade 1, images 1, 2, 3 are called 1 (image 1 wrongly).
        assert (metrics["n_test_1"], metrics["n_called_1"]) == (2, 3)
        assert metrics["sensitivity_1"] == 1.0 and metrics["ppv_1"] == pytest.approx(2 / 3)
        assert metrics["specificity_1"] == pytest.approx(7 / 8)
        assert (metrics["n_test_4"], metrics["n_called_4"], metrics["sensitivity_4"]) == (2, 2, 0.5)
        per_class = [roc_auc_score(self.truth == k, peaked(self.called)[:, k]) for k in range(5)]
        assert metrics["roc_auc"] == pytest.approx(np.mean(per_class))
        for name in ("roc_auc", "accuracy", "qwk", "referable_auc", "referable_sensitivity",
                     "referable_specificity", "sensitivity_2"):
            assert {f"{name}_ci_low", f"{name}_ci_high", f"{name}_ci_note"} <= set(metrics), name
        assert "mae_grade_ci_low" not in metrics and "macro_f1" in metrics
        assert (metrics["referable_grade"], metrics["n_test_referable"]) == (2, 6)
        assert headline(metrics).keys() == {"roc_auc", "accuracy", "qwk", "referable_auc", "balanced_accuracy"}

    def test_the_referable_threshold_is_the_validation_splits(self):
        threshold, metrics = self.report()
        val_referable = peaked(self.val_called)[:, 2:].sum(axis=1)
        assert threshold == choose_threshold((self.val_truth >= 2).astype(int), val_referable, method="youden")
        assert 0.79 < threshold < 0.99 and metrics["referable_threshold"] == threshold
        # On test the grade-2 calls (P 0.79: images 4 and 9, both referable) fall below it: 4 of 6
        # referable images called; the test split's own best cut would have called all six.
        assert metrics["referable_sensitivity"] == pytest.approx(4 / 6)
        assert metrics["referable_specificity"] == 1.0
        test_referable = peaked(self.called)[:, 2:].sum(axis=1)
        assert choose_threshold((self.truth >= 2).astype(int), test_referable, method="youden") < 0.79
        assert metrics["referable_auc"] == roc_auc_score(self.truth >= 2, test_referable) == 1.0

    def test_target_sensitivity_and_fixed_apply_to_the_referable_probability(self):
        val_referable = peaked(self.val_called)[:, 2:].sum(axis=1)
        assert choose_referable_threshold(self.val_truth, peaked(self.val_called), referable=2,
                                          method="target_sensitivity", target_sensitivity=1.0) == pytest.approx(
            val_referable[self.val_truth >= 2].min())
        assert choose_referable_threshold(self.val_truth, peaked(self.val_called), referable=2, method="fixed",
                                          fixed=0.3) == 0.3

    def test_a_referable_grade_needs_the_ordinal_task_and_its_threshold(self):
        scores = peaked(self.called)
        with pytest.raises(ValueError, match="referable_threshold must be a float when referable_grade is set"):
            compute_multiclass_metrics(self.truth, scores, classes=self.classes, patients=own_patients(10),
                                       task="ordinal", referable_grade=2)
        with pytest.raises(ValueError, match="referable_grade applies to the ordinal task"):
            compute_multiclass_metrics(self.truth, scores, classes=self.classes, patients=own_patients(10),
                                       referable_grade=2, referable_threshold=0.5)
        with pytest.raises(ValueError, match=r"one of the grades after the first, \[1, 2, 3, 4\]; got 0"):
            compute_multiclass_metrics(self.truth, scores, classes=self.classes, patients=own_patients(10),
                                       task="ordinal", referable_grade=0, referable_threshold=0.5)

    def test_without_a_referable_grade_there_are_no_referable_figures(self):
        metrics = compute_multiclass_metrics(self.truth, peaked(self.called), classes=self.classes,
                                             patients=own_patients(10), task="ordinal")
        assert "qwk" in metrics and not any(name.startswith("referable") for name in metrics)

    def test_the_confusion_matrix_by_hand(self, tmp_path):
        table = confusion_table(self.truth, np.array(self.called), classes=self.classes)
        counts = table.pivot(index="actual", columns="called", values="count").to_numpy()
        np.testing.assert_array_equal(counts, [[1, 1, 0, 0, 0],
                                               [0, 2, 0, 0, 0],
                                               [0, 0, 1, 1, 0],
                                               [0, 0, 0, 1, 1],
                                               [0, 0, 1, 0, 1]])
        shares = table.pivot(index="actual", columns="called", values="row_share").to_numpy()
        np.testing.assert_allclose(shares, counts / 2.0)  # two images of each grade
        assert shares[1, 1] == 1.0 and shares[4, 2] == 0.5
        files = write_confusion_matrix(self.truth, np.array(self.called), classes=self.classes, out_dir=tmp_path,
                                       caption="median grade")
        assert [f.name for f in files] == ["confusion_matrix.csv", "confusion_matrix.png"]
        assert pd.read_csv(files[0])["count"].sum() == 10
        assert matplotlib.image.imread(files[1]).ndim == 3

    def test_per_class_calibration_and_its_plot(self, tmp_path):
        scores = peaked(self.called)
        figures = calibration_metrics(self.truth, scores, scores, temperatures=[1.0], classes=self.classes)
        for k, label in enumerate(self.classes):
            # Each class's one-vs-rest ECE, written out: the probability of k against "is k", in tenths.
            p, y = scores[:, k], (self.truth == k).astype(float)
            bins = np.minimum((p * 10).astype(int), 9)
            expected = sum(abs(p[bins == b].mean() - y[bins == b].mean()) * (bins == b).sum()
                           for b in np.unique(bins)) / len(p)
            assert figures[f"ece_{label}"] == pytest.approx(expected)
        files = write_class_reliability(self.truth, scores, classes=self.classes, out_dir=tmp_path)
        table = pd.read_csv(files[0])
        assert sorted(table["class"].unique()) == self.classes and (table.groupby("class")["count"].sum() == 10).all()
        assert matplotlib.image.imread(files[1]).ndim == 3

    def test_ordinal_subgroups_report_qwk_where_there_are_enough_images(self):
        truth = np.tile(self.truth, 3)  # 30 images: manufacturer A 24, B 6
        manifest = pd.DataFrame({"patient_key": [f"p{i}" for i in range(30)], "patient_sex": "F",
                                 "patient_age_years": 50, "manufacturer": ["A"] * 24 + ["B"] * 6,
                                 "view_position": "PA"})
        scores = peaked(self.called * 3)
        table = subgroup_metrics(manifest, truth, scores, threshold=None, task="ordinal").set_index(
            ["attribute", "group"])
        called = np.array(self.called * 3)
        assert table.loc[("manufacturer", "A"), "qwk"] == pytest.approx(
            cohen_kappa_score(truth[:24], called[:24], weights="quadratic", labels=self.classes))
        assert math.isnan(table.loc[("manufacturer", "B"), "qwk"])  # 6 images: too few
        assert table.loc[("patient_sex", "F"), "accuracy"] == pytest.approx(6 / 10)
        assert table.loc[("patient_sex", "F"), "roc_auc"] == pytest.approx(
            np.mean([roc_auc_score(truth == k, scores[:, k]) for k in range(5)]))


@pytest.mark.slow
def test_the_test_split_report_of_a_five_grade_keras_model(tmp_path):
    """report_test_split end to end on a real (untrained) five-way softmax network, as ordinal."""
    import keras

    from dicomflow.evaluation.reporting import report_test_split
    from dicomflow.model.architectures import build_seed_cnn, predict_probabilities

    keras.utils.set_random_seed(0)
    model = build_seed_cnn((16, 16, 1), 5)
    rng = np.random.default_rng(0)
    labels = np.arange(40) % 5
    images = (rng.uniform(0, 0.5, (40, 16, 16, 1)) + labels[:, None, None, None] / 10).astype(np.float32)
    rows = pd.DataFrame({"patient_key": [f"p{i // 2}" for i in range(40)], "patient_sex": ["F", "M"] * 20,
                         "patient_age_years": 50, "manufacturer": "A", "view_position": "PA"})
    metrics, files, subgroups = report_test_split(model, labels, images, rows, threshold=None,
                                                  classes=[0, 1, 2, 3, 4], plots_dir=tmp_path, task="ordinal",
                                                  referable_grade=2, referable_threshold=0.55)
    probabilities = predict_probabilities(model, images)
    called = np.argmax(np.cumsum(probabilities, axis=1) >= 0.5, axis=1)  # the median grade, written again
    assert metrics["accuracy"] == pytest.approx(np.mean(called == labels))
    assert metrics["qwk"] == pytest.approx(cohen_kappa_score(labels, called, weights="quadratic", labels=range(5)))
    assert metrics["referable_threshold"] == 0.55 and metrics["n_test_referable"] == 24
    assert metrics["referable_sensitivity"] == pytest.approx(np.mean(probabilities[labels >= 2, 2:].sum(1) >= 0.55))
    assert {"ece_0", "ece_4", "brier", "ece", "temperature", "mae_grade", "balanced_accuracy"} <= set(metrics)
    assert {f.name for f in files} == {"confusion.csv", "confusion_matrix.csv", "confusion_matrix.png",
                                       "reliability_per_class.csv", "reliability_per_class.png", "grad_cam.png",
                                       "reliability.csv", "reliability.png"}
    assert all(f.is_file() for f in files)
    assert pd.read_csv(tmp_path / "confusion.csv")["predicted"].tolist() == called.tolist()
    assert "qwk" in subgroups.columns and subgroups.set_index(["attribute", "group"]).loc[
        ("manufacturer", "A"), "qwk"] == pytest.approx(metrics["qwk"])


@pytest.mark.slow  # the report of a 3-D network, Grad-CAM montage included: ~17 s on 2 cores
def test_the_test_split_report_of_a_volume_model_is_per_series(tmp_path):
    """report_test_split on a real (untrained) resnet3d_small and 16^3 volumes (ingest.unit series): one
    row per series, the predictions table per series, the Grad-CAM montage."""
    import keras

    from dicomflow.evaluation.reporting import report_test_split
    from dicomflow.model.architectures import build_resnet3d_small, predict_probabilities

    keras.utils.set_random_seed(0)
    model = build_resnet3d_small((16, 16, 16, 1))
    rng = np.random.default_rng(0)
    labels = np.arange(12) % 2
    volumes = (rng.uniform(0, 0.5, (12, 16, 16, 16, 1)) + labels[:, None, None, None, None] / 4).astype(np.float32)
    rows = pd.DataFrame({"image_key": [f"s{i:02d}" for i in range(12)], "study_key": [f"t{i}" for i in range(12)],
                         "patient_key": [f"p{i}" for i in range(12)], "patient_sex": ["F", "M"] * 6,
                         "patient_age_years": 60, "manufacturer": "A", "view_position": ""})
    probabilities = predict_probabilities(model, volumes)
    threshold = float(np.median(probabilities))
    metrics, files, _ = report_test_split(model, labels, volumes, rows, threshold=threshold, classes=[0, 1],
                                          plots_dir=tmp_path, spacing_mm=5.0)
    assert metrics["level"] == "series" and metrics["n_test_patients"] == 12
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(labels, probabilities))
    table = pd.read_csv(tmp_path / "test_predictions.csv")
    assert table.columns.tolist() == ["image_key", "study_key", "label", "probability"]
    assert table["image_key"].tolist() == rows["image_key"].tolist()
    np.testing.assert_allclose(table["probability"], probabilities, atol=1e-6)
    assert {"grad_cam.png", "test_predictions.csv"} <= {f.name for f in files} and all(f.is_file() for f in files)
    assert matplotlib.image.imread(tmp_path / "grad_cam.png").shape[0] > 400


def test_a_volume_model_with_a_champion_is_challenger_with_the_reason(tmp_path):
    from dicomflow.evaluation.promotion import compare_volume_model

    labels = np.arange(12) % 2
    candidate = pd.DataFrame({"path": [f"s{i}" for i in range(12)], "probability": labels * 0.6 + 0.2,
                              "label": labels, "error": ""})
    common = dict(metric="roc_auc", files=[tmp_path / f"s{i}" for i in range(12)], labels=labels, classes=[0, 1],
                  digests=[frozenset({f"d{i}"}) for i in range(12)], data_version="abc", pixel_settings={},
                  champion_uri="models:/m/1", verify_key=None)
    alone = compare_volume_model(candidate, champion_version=None, **common)
    assert alone.decide(min_gain=0.0)[0] == "champion" and alone.candidate == 1.0 and alone.images == 12
    alias, decision = compare_volume_model(candidate, champion_version="3", **common).decide(min_gain=0.0)
    assert alias == "challenger" and "champion version 3 could not be compared" in decision
    assert "the comparison with the champion scores one file per row" in decision
