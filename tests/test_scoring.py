"""Training's scores of probabilities: the temperature and the degeneracy check."""

from __future__ import annotations

import numpy as np
import pytest

from dicomflow.model.scoring import degeneracy, fit_temperature, probabilities_from_logits


def test_temperature_recovers_the_one_that_made_the_labels():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 6, 40_000)
    labels = (rng.random(logits.size) < 1 / (1 + np.exp(-logits / 3.0))).astype(int)
    assert fit_temperature(labels, logits) == pytest.approx(3.0, rel=0.05)
    three = rng.normal(0, 4, (20_000, 3))
    truth = probabilities_from_logits(three, temperature=0.5)
    labels = np.array([rng.choice(3, p=p) for p in truth])
    assert fit_temperature(labels, three) == pytest.approx(0.5, rel=0.05)


class TestDegeneracy:
    labels = np.array([0, 1, 0, 1, 0, 0, 1, 0])

    def test_a_sound_model_has_no_problem(self):
        scores = np.array([0.1, 0.8, 0.3, 0.6, 0.2, 0.4, 0.9, 0.05])
        assert degeneracy(self.labels, scores) == []
        assert degeneracy(self.labels, scores, threshold=0.5) == []

    def test_constant_scores(self):
        problems = degeneracy(self.labels, np.full(8, 0.99997))
        assert problems[0] == "constant predictions: every image scores 0.99997-0.99997"

    def test_everything_called_positive_is_the_positive_share(self):
        scores = np.array([0.9991, 0.9999, 0.9995, 0.9998, 0.9992, 0.9994, 0.99995, 0.9993])
        (problem,) = degeneracy(self.labels, scores, threshold=0.5)
        assert problem == ("every one of 8 images is called class index 1 at threshold 0.5: accuracy "
                           "0.375 is that class's share")

    def test_without_a_threshold_a_calibrated_weak_model_is_not_degenerate(self):
        # Every score below 0.5, near the prevalence, but ranked: usable at a threshold of its own.
        scores = np.array([0.30, 0.42, 0.33, 0.41, 0.31, 0.36, 0.45, 0.29])
        assert degeneracy(self.labels, scores) == []
        assert degeneracy(self.labels, scores, threshold=0.39) == []

    def test_a_threshold_at_the_end_of_the_sigmoid(self):
        scores = np.array([0.9991, 0.99999, 0.9995, 0.99998, 0.9992, 0.9994, 0.99995, 0.9993])
        problems = degeneracy(self.labels, scores, threshold=0.99995)
        assert problems == ["operating threshold 0.99995 is outside [0.01, 0.99]: the scores are "
                            "shifted to one end"]

    def test_three_classes_all_called_one(self):
        probabilities = np.tile([0.2, 0.5, 0.3], (8, 1)) + np.linspace(0, 0.01, 8)[:, None] * [-1, 2, -1]
        labels = np.array([0, 1, 2, 1, 0, 2, 1, 0])
        (problem,) = degeneracy(labels, probabilities)
        assert problem.startswith("every one of 8 images is called class index 1: accuracy 0.375")


def test_a_separable_split_gets_a_finite_temperature_not_the_bound():
    logits = np.array([-6.0, -4.0, -3.0, 3.5, 5.0, 7.0] * 10)
    labels = (logits > 0).astype(int)
    # Maximum likelihood would take T -> 0; the prior keeps it a modest sharpening.
    assert 0.1 < fit_temperature(labels, logits) < 1.0
