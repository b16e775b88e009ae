"""Evaluate stage: threshold choice, metrics against hand counts, and champion/challenger aliases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from stages.cli import StageError
from stages.evaluate import (
    bootstrap_auc_interval,
    choose_threshold,
    compute_metrics,
    register_model,
    should_promote,
)


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

    def test_fixed_returns_the_param(self, scored):
        assert choose_threshold(*scored, method="fixed", fixed=0.3) == 0.3

    def test_rejects_unknown_method_and_one_class(self, scored):
        with pytest.raises(ValueError, match="'youden' or 'fixed'; got 'best'"):
            choose_threshold(*scored, method="best", fixed=0.5)
        with pytest.raises(StageError, match="one class only"):
            choose_threshold(np.ones(5), np.linspace(0, 1, 5), method="youden", fixed=0.5)


class TestComputeMetrics:
    def test_matches_hand_counts(self):
        y_true = np.array([1, 1, 1, 0, 0, 0, 0, 1])
        y_score = np.array([0.9, 0.8, 0.3, 0.2, 0.6, 0.1, 0.4, 0.7])
        metrics = compute_metrics(y_true, y_score, threshold=0.5)
        # at 0.5: TP = 3 (0.9, 0.8, 0.7), FN = 1 (0.3), FP = 1 (0.6), TN = 3
        assert metrics["sensitivity"] == pytest.approx(3 / 4)
        assert metrics["specificity"] == pytest.approx(3 / 4)
        assert metrics["accuracy"] == pytest.approx(6 / 8)
        assert metrics["roc_auc"] == pytest.approx(roc_auc_score(y_true, y_score))
        assert (metrics["n_test"], metrics["n_test_positive"]) == (8, 4)

    def test_confidence_interval_brackets_the_auc(self, scored):
        y_true, y_score = scored
        low, high = bootstrap_auc_interval(y_true, y_score, n_resamples=300)
        assert low < roc_auc_score(y_true, y_score) < high
        assert high - low < 0.2
        narrow = bootstrap_auc_interval(np.tile(y_true, 4), np.tile(y_score, 4), n_resamples=300)
        assert narrow[1] - narrow[0] < high - low


def test_should_promote():
    assert should_promote(0.8, None)
    assert should_promote(0.81, 0.8)
    assert not should_promote(0.8, 0.8)
    assert not should_promote(0.7, 0.8)


def test_register_model_moves_champion_only_on_improvement(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")

    class Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return np.zeros(len(model_input))

    def log_candidate() -> str:
        with mlflow.start_run():
            return mlflow.pyfunc.log_model(name="model", python_model=Constant(),
                                           pip_requirements=["numpy"]).model_uri

    try:
        first = register_model(log_candidate(), name="m", metric="roc_auc", value=0.80)
        worse = register_model(log_candidate(), name="m", metric="roc_auc", value=0.70)
        better = register_model(log_candidate(), name="m", metric="roc_auc", value=0.90)
        client = mlflow.MlflowClient()
        assert (first, worse, better) == (("1", "champion"), ("2", "challenger"), ("3", "champion"))
        assert str(client.get_model_version_by_alias("m", "champion").version) == "3"
        assert str(client.get_model_version_by_alias("m", "challenger").version) == "2"
        assert client.get_model_version("m", "1").tags["test_roc_auc"] == "0.8"  # old champion kept
    finally:
        mlflow.set_tracking_uri(None)
