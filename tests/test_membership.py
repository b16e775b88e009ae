"""The membership-inference attack and the lower bound on ε it proves (dicomflow.evaluation.membership),
the privacy record beside the model, and evaluate.require_privacy.

Expected values are computed here independently: Clopper-Pearson bounds from scipy.stats.beta,
rates and losses written out by hand.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import beta

from dicomflow.config import layout
from dicomflow.config.params import TrainParams
from dicomflow.errors import DataError
from dicomflow.evaluation.membership import (
    ALPHA,
    THRESHOLD_LEVELS,
    check_privacy_claim,
    claimed_epsilon,
    draw_members,
    epsilon_lower_bound,
    membership_attack,
    per_example_loss,
    privacy_figures,
    tpr_at_fpr,
)
from dicomflow.evaluation.metrics import headline
from dicomflow.evaluation.promotion import require_privacy
from dicomflow.serving.pyfunc import describe_privacy

PRIVACY = {"epsilon": 1.0, "delta": 1e-3, "noise_multiplier": 4.9, "max_grad_norm": 1.0,
           "sampling_probability": 0.117, "steps": 256, "accountant": "pld", "sampling": "poisson",
           "neighbouring": "add_or_remove_one", "unit": "image", "patient_epsilon": None}


def _hand_bound(tp: int, n_pos: int, fp: int, n_neg: int, *, level: float, delta: float) -> float:
    """ε_lb at one threshold, from one-sided Clopper-Pearson bounds at ``level``, written out."""
    tpr_low = beta.ppf(level, tp, n_pos - tp + 1) if tp else 0.0
    fpr_high = beta.ppf(1 - level, fp + 1, n_neg - fp) if fp < n_neg else 1.0
    return max(0.0, math.log((tpr_low - delta) / fpr_high), math.log((1 - fpr_high - delta) / (1 - tpr_low)))


class TestEpsilonLowerBound:
    # 18 of 20 members and 3 of 20 non-members at or below the threshold 0.5.
    MEMBERS = np.r_[np.full(18, 0.1), np.full(2, 0.9)]
    NONMEMBERS = np.r_[np.full(3, 0.1), np.full(17, 0.9)]

    def test_one_threshold_is_the_clopper_pearson_bound(self):
        bound = epsilon_lower_bound(self.MEMBERS, self.NONMEMBERS, delta=1e-3, alpha=0.05, thresholds=[0.5])
        expected = _hand_bound(18, 20, 3, 20, level=0.05 / 2, delta=1e-3)
        assert expected > 0.5  # the example proves something
        assert bound.epsilon == pytest.approx(expected, rel=1e-9)
        assert bound.tpr_low == pytest.approx(beta.ppf(0.025, 18, 3))
        assert bound.fpr_high == pytest.approx(beta.ppf(0.975, 4, 17))
        assert (bound.threshold, bound.thresholds, bound.alpha, bound.delta) == (0.5, 1, 0.05, 1e-3)

    def test_the_best_of_two_thresholds_pays_for_the_search(self):
        bound = epsilon_lower_bound(self.MEMBERS, self.NONMEMBERS, alpha=0.05, thresholds=[0.5, 0.05])
        # At 0.05 nothing is called a member: it proves nothing; the level is alpha / (2 * 2).
        assert bound.epsilon == pytest.approx(_hand_bound(18, 20, 3, 20, level=0.05 / 4, delta=0.0), rel=1e-9)
        assert bound.epsilon < epsilon_lower_bound(self.MEMBERS, self.NONMEMBERS, thresholds=[0.5]).epsilon

    def test_the_second_inequality_counts_too(self):
        # Every member at or below 0.5 and half the non-members above: the attack's confident
        # "not a member" calls prove ε through 1 - FPR <= e^ε (1 - TPR) + δ.
        members, nonmembers = np.full(20, 0.1), np.r_[np.full(10, 0.1), np.full(10, 0.9)]
        tpr_low, fpr_high = beta.ppf(ALPHA / 2, 20, 1), beta.ppf(1 - ALPHA / 2, 11, 10)
        second = math.log((1 - fpr_high) / (1 - tpr_low))
        assert second > math.log(tpr_low / fpr_high) > 0
        assert epsilon_lower_bound(members, nonmembers, thresholds=[0.5]).epsilon == pytest.approx(second)

    def test_identical_losses_prove_nothing(self):
        rng = np.random.default_rng(4)
        for _ in range(20):
            assert epsilon_lower_bound(rng.normal(size=150), rng.normal(size=150)).epsilon == 0.0

    def test_a_delta_as_large_as_the_rates_proves_nothing(self):
        assert epsilon_lower_bound(self.MEMBERS, self.NONMEMBERS, delta=0.9, thresholds=[0.5]).epsilon == 0.0

    def test_default_thresholds_are_pooled_quantiles(self):
        members, nonmembers = np.zeros(32), np.linspace(1, 2, 32)
        bound = epsilon_lower_bound(members, nonmembers)
        pooled = np.r_[members, nonmembers]
        m = len(np.unique(np.quantile(pooled, THRESHOLD_LEVELS, method="lower")))
        # Perfect separation at the median: TPR 32/32, FPR 0/32.
        assert bound.thresholds == m and bound.threshold == 0.0
        assert bound.epsilon == pytest.approx(_hand_bound(32, 32, 0, 32, level=ALPHA / (2 * m), delta=0.0))


class TestAttack:
    def test_members_with_lower_losses_are_found(self):
        rng = np.random.default_rng(0)
        attack = membership_attack(rng.exponential(0.2, 200), rng.exponential(1.0, 200), n_resamples=200)
        # AUC of Exp(rate 5) below Exp(rate 1): P(X < Y) = 5 / (5 + 1).
        assert attack.auc == pytest.approx(5 / 6, abs=0.05)
        assert attack.auc_interval.low < attack.auc < attack.auc_interval.high
        assert attack.tpr > 0.05 and attack.bound.epsilon > 0.5
        assert (attack.n_members, attack.n_nonmembers, attack.fpr) == (200, 200, 0.01)
        assert membership_attack(np.zeros(50), np.ones(50), n_resamples=10).fpr == 0.0  # 1 % of 50: none

    def test_identical_distributions_are_chance(self):
        rng = np.random.default_rng(1)
        attack = membership_attack(rng.normal(size=300), rng.normal(size=300), n_resamples=200)
        assert abs(attack.auc - 0.5) < 0.06
        assert attack.auc_interval.low < 0.5 < attack.auc_interval.high
        assert attack.bound.epsilon == 0.0

    def test_report_names_and_is_seeded(self):
        rng = np.random.default_rng(2)
        members, nonmembers = rng.normal(size=40), rng.normal(size=40)
        report = membership_attack(members, nonmembers, n_resamples=100).as_report()
        assert report == membership_attack(members, nonmembers, n_resamples=100).as_report()
        assert {"membership_auc", "membership_auc_ci_low", "membership_auc_ci_high", "membership_tpr_at_fpr",
                "membership_tpr_at_fpr_ci_low", "membership_epsilon_lower_bound", "membership_alpha",
                "membership_n_members"} <= set(report)

    def test_too_few_images_is_one_line(self):
        with pytest.raises(DataError, match="at least two non-members"):
            membership_attack(np.zeros(5), np.zeros(1))

    def test_tpr_at_fpr(self):
        nonmembers = np.arange(100.0)  # 1 % FPR allows one non-member: the cut is below the second, 1.0
        assert tpr_at_fpr(np.array([0.5, 0.5, 2.0, 3.0]), nonmembers, fpr=0.01) == 0.5
        # Fewer than 100 non-members: no false positive allowed, members below the lowest (0.0).
        assert tpr_at_fpr(np.array([-1.0, 0.5]), np.arange(50.0), fpr=0.01) == 0.5

    def test_per_example_loss(self):
        assert per_example_loss(np.array([1, 0]), np.array([0.8, 0.8])) == pytest.approx([-math.log(0.8),
                                                                                          -math.log(0.2)])
        softmax = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
        assert per_example_loss(np.array([1, 2]), softmax) == pytest.approx([-math.log(0.2), -math.log(0.8)])
        assert np.isfinite(per_example_loss(np.array([1]), np.array([0.0]))).all()

    def test_draw_members(self):
        drawn = draw_members(500, 120)
        assert len(drawn) == 120 == len(set(drawn)) and (np.diff(drawn) > 0).all() and drawn.max() < 500
        assert (drawn == draw_members(500, 120)).all()
        assert (draw_members(30, 120) == np.arange(30)).all()



def noise_splits(*sizes: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Noise images (16 x 16) with random labels, one (images, labels) pair per size, seeded."""
    rng = np.random.default_rng(0)
    return [(rng.uniform(0, 1, (n, 16, 16, 1)).astype(np.float32), rng.integers(0, 2, n)) for n in sizes]


def overfit_params(**changes) -> TrainParams:
    """seed_cnn at a rate that learns noise by heart, every epoch kept, no calibration."""
    base = dict(architecture="seed_cnn", strategy="default", epochs=40, batch_size=8, lr=0.003,
                lr_schedule="constant", class_weight="none", early_stopping_patience=0, keep="last_epoch",
                calibration="none", ensemble=1, seed=1)
    return TrainParams(**{**base, **changes})

class TestOverfitModel:
    @pytest.mark.slow
    def test_a_non_private_model_overfit_on_noise_is_attacked(self, tmp_path):
        """32 noise images with random labels, learnt by heart: their losses give them away."""
        from dicomflow.model.architectures import predict_probabilities
        from dicomflow.model.training import train_model

        (train_x, train_y), (val_x, val_y), (out_x, out_y) = noise_splits(32, 16, 32)
        params = overfit_params(epochs=40)
        model, _ = train_model(train_x, train_y, val_x, val_y, params=params, checkpoint=None)
        attack = membership_attack(per_example_loss(train_y, predict_probabilities(model, train_x)),
                                   per_example_loss(out_y, predict_probabilities(model, out_x)), n_resamples=200)
        assert attack.auc > 0.85, attack
        assert attack.auc_interval.low > 0.5
        assert attack.bound.epsilon > 0.5  # and no DP claim to fail: there is none


class TestPrivacyClaim:
    def test_a_bound_above_the_accounted_epsilon_fails_in_one_line(self):
        bound = epsilon_lower_bound(np.zeros(60), np.ones(60))
        assert bound.epsilon > 1.0
        with pytest.raises(DataError, match=r"accounts ε = 1\.000: this is an implementation bug") as caught:
            check_privacy_claim(bound, PRIVACY, source="outputs/model/privacy.json")
        assert "\n" not in str(caught.value) and "not a privacy result" in str(caught.value)

    def test_within_the_claim_or_without_dp_passes(self):
        bound = epsilon_lower_bound(np.zeros(60), np.ones(60))
        check_privacy_claim(bound, {**PRIVACY, "epsilon": 8.0}, source="privacy.json")
        check_privacy_claim(bound, None, source="privacy.json")

    def test_a_patients_epsilon_is_the_claim_when_recorded(self):
        assert claimed_epsilon(PRIVACY) == 1.0
        assert claimed_epsilon({**PRIVACY, "patient_epsilon": 3.5}) == 3.5

    def test_figures_and_headline(self):
        figures = privacy_figures(PRIVACY)
        assert figures["privacy_epsilon"] == 1.0 and figures["privacy_accountant"] == "pld"
        assert "privacy_patient_epsilon" not in figures  # None: not a figure
        report = {"roc_auc": 0.9, "membership_auc": 0.55, "membership_tpr_at_fpr": 0.02, **figures}
        assert headline(report) == {"roc_auc": 0.9, "membership_auc": 0.55, "privacy_epsilon": 1.0}
        assert headline({"roc_auc": 0.9, "membership_auc": 0.6, **privacy_figures(None)}) == \
            {"roc_auc": 0.9, "membership_auc": 0.6}

    def test_the_record_beside_the_model(self, tmp_path):
        assert layout.read_privacy_record(tmp_path) is None
        (tmp_path / layout.PRIVACY_FILE).write_text(json.dumps(PRIVACY))
        assert layout.read_privacy_record(tmp_path) == PRIVACY
        (tmp_path / layout.PRIVACY_FILE).write_text(json.dumps({**PRIVACY, "epsilon": 0}))
        with pytest.raises(DataError, match="must hold a positive 'epsilon'.*got epsilon 0"):
            layout.read_privacy_record(tmp_path)

    def test_a_patient_epsilon_without_bound(self):
        # Group privacy over a patient of many images can give no bound at the image's δ: inf.
        unbounded = {**PRIVACY, "patient_epsilon": math.inf}
        assert claimed_epsilon(unbounded) == math.inf
        check_privacy_claim(epsilon_lower_bound(np.zeros(60), np.ones(60)), unbounded, source="privacy.json")
        assert privacy_figures(unbounded)["privacy_patient_epsilon"] == "inf"
        assert describe_privacy({"privacy": unbounded}).endswith("ε 1 (no bound per patient), δ 0.001 per image "
                                                                 "(pld accountant)")

    def test_the_served_models_metadata_in_words(self):
        assert describe_privacy({"privacy": PRIVACY}) == "differential privacy: ε 1, δ 0.001 per image (pld accountant)"
        assert describe_privacy({"privacy": "none"}).startswith("no formal privacy guarantee")
        assert describe_privacy({}).startswith("privacy guarantee not recorded")


class TestRequirePrivacy:
    DECISION = "champion: no champion before (roc_auc on 20 val images of data abc: 0.9000)"

    @pytest.mark.parametrize(("privacy", "cap", "alias", "reason"), [
        (None, None, "champion", ""),
        (PRIVACY, 3.0, "champion", ""),
        (PRIVACY, 1.0, "champion", ""),
        (None, 3.0, "challenger", "trained without differential privacy"),
        ({**PRIVACY, "epsilon": 8.0}, 3.0, "challenger", "accounted ε 8 per image is above it"),
    ])
    def test_decision(self, privacy, cap, alias, reason):
        got_alias, decision = require_privacy("champion", self.DECISION, privacy, cap=cap)
        assert got_alias == alias
        if reason:
            assert decision.startswith(f"challenger: evaluate.require_privacy is ε <= {cap:g} and ")
            assert reason in decision and decision.endswith(self.DECISION)
        else:
            assert decision == self.DECISION

    def test_a_challenger_stays_one_and_says_why_too(self):
        assert require_privacy("challenger", "challenger: x", None, cap=1.0) == (
            "challenger", "challenger: x; evaluate.require_privacy is ε <= 1 and the model was trained without "
            "differential privacy (no privacy.json)")
        assert require_privacy("challenger", "challenger: x", PRIVACY, cap=1.0) == ("challenger", "challenger: x")


@pytest.mark.slow
class TestEvaluateStage:
    """The real stage on the tiny sample (tests/pipeline_repo.py: one dvc repro for this module)."""

    def test_the_attack_is_reported_and_a_model_without_dp_says_so(self, repo, registry):
        root, _ = repo
        mlflow, client = registry
        report = json.loads((root / "reports" / "test_metrics.json").read_text())
        figures = json.loads((root / "reports" / "metrics.json").read_text())
        # As many training images as test images, attacked; the AUC is a share of pairs.
        assert report["membership_n_members"] == report["membership_n_nonmembers"] == report["n_test"]
        assert 0.0 <= report["membership_auc_ci_low"] <= report["membership_auc"] <= report["membership_auc_ci_high"]
        assert report["membership_delta"] == 0.0 and report["privacy_guarantee"] == "none"
        assert figures["membership_auc"] == report["membership_auc"] and "privacy_epsilon" not in figures
        version = client.get_model_version_by_alias("dicomflow-classifier", "champion")
        assert mlflow.models.get_model_info(f"models:/dicomflow-classifier/{version.version}").metadata[
            "privacy"] == "none"
        assert "## Privacy\n\n**No formal privacy guarantee**" in version.description
        assert version.tags["membership_auc"] == f"{report['membership_auc']:.6g}"
        evaluation = client.get_run(version.run_id)
        assert evaluation.data.metrics["test_membership_auc"] == report["membership_auc"]

    def test_a_dp_model_above_the_cap_is_never_champion(self, repo, registry):
        root, env = repo
        mlflow, client = registry
        guarantee = {"epsilon": 8.0, "delta": 1e-3, "noise_multiplier": 1.1, "max_grad_norm": 1.0,
                     "sampling_probability": 0.1, "steps": 100, "accountant": "pld", "sampling": "poisson",
                     "neighbouring": "add_or_remove_one", "unit": "image", "patient_epsilon": 16.0}
        (root / "outputs" / "model" / layout.PRIVACY_FILE).write_text(json.dumps(guarantee))
        params_file = root / "params.yaml"
        original = params_file.read_text()
        # Another threshold: the same model at the same threshold is not registered twice.
        params_file.write_text(original.replace("require_privacy: null", "require_privacy: 3.0").replace(
            "threshold_method: youden", "threshold_method: fixed").replace("fixed_threshold: 0.5",
                                                                            "fixed_threshold: 0.37"))
        try:
            result = subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=root, env=env,
                                    capture_output=True, text=True, timeout=900)
        finally:
            params_file.write_text(original)
            (root / "outputs" / "model" / layout.PRIVACY_FILE).unlink()
        assert result.returncode == 0, result.stderr[-3000:]
        figures = json.loads((root / "reports" / "metrics.json").read_text())
        assert figures["privacy_epsilon"] == 8.0
        report = json.loads((root / "reports" / "test_metrics.json").read_text())
        assert report["membership_delta"] == 1e-3 and report["privacy_patient_epsilon"] == 16.0
        newest = client.get_model_version("dicomflow-classifier", str(max(  # search leaves the aliases out
            int(v.version) for v in client.search_model_versions("name='dicomflow-classifier'"))))
        assert newest.aliases == ["challenger"]
        assert "evaluate.require_privacy is ε <= 3 and its accounted ε 8 per image is above it" in \
            newest.tags["promotion_decision"]
        assert newest.tags["privacy_epsilon"] == "8"
        assert "**ε = 8.00, δ = 0.001 per image**" in newest.description
        assert mlflow.models.get_model_info(f"models:/dicomflow-classifier/{newest.version}").metadata[
            "privacy"] == guarantee


class TestPrivateModel:
    @pytest.mark.slow
    def test_a_model_at_epsilon_one_stays_near_chance(self):
        """The overfit recipe of TestOverfitModel, trained by DP-SGD at ε = 1: the attack finds
        nothing, and proves no more than the accountant states."""
        from dicomflow.config.params import PrivacyParams
        from dicomflow.model.architectures import predict_probabilities
        from dicomflow.model.privacy import privacy_guarantee, train_private

        (train_x, train_y), (val_x, val_y), (out_x, out_y) = noise_splits(48, 16, 48)
        params = overfit_params(epochs=8, privacy=PrivacyParams(enabled=True, target_epsilon=1.0, delta=1e-3))
        model, history = train_private(train_x, train_y, val_x, val_y, params=params, checkpoint=None, secret_seed=5)
        guarantee = privacy_guarantee(params, n_images=len(train_y), steps=int(history["steps"].max())).as_record()
        attack = membership_attack(per_example_loss(train_y, predict_probabilities(model, train_x)),
                                   per_example_loss(out_y, predict_probabilities(model, out_x)),
                                   delta=guarantee["delta"], n_resamples=200)
        assert guarantee["epsilon"] <= 1.0 + 1e-6
        assert attack.auc_interval.low < 0.5 < attack.auc_interval.high, attack
        assert abs(attack.auc - 0.5) < 0.15 and attack.bound.epsilon == 0.0
        check_privacy_claim(attack.bound, guarantee, source="the accountant")
