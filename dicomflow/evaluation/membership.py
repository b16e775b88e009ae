"""A membership-inference attack on the trained model, and the lower bound on ε it proves.

Differential privacy (DP) promises that no one training image changes what the model outputs by
more than a factor e^ε (plus δ). An attacker who sees the model's output on an image and guesses
"this image was trained on" can then reach no more than ``TPR <= e^ε FPR + δ`` (and, for the
opposite guess, ``1 - FPR <= e^ε (1 - TPR) + δ``; Kairouz, Oh & Viswanath 2015, Theorem 2.1). An
attack that does better than that on real images proves, with the confidence of its counts, that
the model is *less* private than ε: a lower bound on the ε that holds (Jagielski, Ullman & Oprea,
"Auditing differentially private machine learning", NeurIPS 2020). A model whose training claims
ε = 1 and whose attack proves ε >= 2 has a bug in its DP training or its accounting.

The attack is the loss threshold of Yeom, Giacomelli, Fredrikson & Jha ("Privacy risk in machine
learning", CSF 2018): a network fits its training images better than images it never saw, so a
low cross-entropy loss says "member". Members are training images, non-members images of the
same distribution the model never trained on (evaluate: the test split); the attack's ROC AUC
(0.5: it cannot tell them apart) and its true-positive rate at a 1 % false-positive rate (the
regime that matters for privacy: Carlini et al., "Membership inference attacks from first
principles", S&P 2022) are reported with bootstrap intervals.

It is the weakest attack of the literature, run on one trained model: a small ε lower bound says
little (stronger attacks with reference models, or many training runs, could prove more), a large
one is conclusive. Reference-model attacks (LiRA) are not run: they need several extra training
runs per evaluation. Without reference models the logit-scaled confidence of LiRA-offline is a
monotone function of this loss, so it would rank the images identically.

Pure functions: arrays and values in, a :class:`MembershipAttack` out; no model, no files, no
MLflow. SciPy is imported by the functions that need it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from dicomflow.errors import DataError
from dicomflow.evaluation.intervals import DIGITS, Interval
from dicomflow.metrics import ATTACK_AUC, PRIVACY_EPSILON, Scores, roc_auc

ALPHA = 0.05  # the ε lower bound holds with probability at least 1 - ALPHA
TARGET_FPR = 0.01  # the attack's true-positive rate is reported at this false-positive rate
N_RESAMPLES = 1000
LEVEL = 0.95  # of the bootstrap intervals of the AUC and the TPR
SEED = 0  # fixed: the same losses give the same report, the same members are drawn
# The attack's thresholds for the ε bound: these quantiles of the pooled losses (members and
# non-members together, so the grid does not depend on who is a member). A fixed, short grid
# keeps the multiple-comparison correction small (see epsilon_lower_bound); it reaches both tails,
# where a confident attack lives, and the middle, where it separates two groups of equal size.
THRESHOLD_LEVELS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99)
PROBABILITY_FLOOR = 1e-15  # a probability of the true class of 0 would make the loss infinite


@dataclass(frozen=True)
class EpsilonBound:
    """The empirical lower bound on ε and the attack threshold that proves it.

    Attributes
    ----------
    epsilon : float
        The bound; 0.0 when no threshold proves anything (the rates are within their confidence
        bounds of what ε = 0 allows).
    threshold : float or None
        The loss at or below which the attack says "member", at the bound (None when 0).
    tpr_low, fpr_high : float or None
        The Clopper-Pearson lower bound on the true-positive rate and upper bound on the
        false-positive rate at ``threshold``.
    thresholds : int
        How many thresholds were tried (the Bonferroni factor).
    alpha, delta : float
        The bound holds with probability at least 1 - ``alpha``, for (ε, ``delta``)-DP.
    """

    epsilon: float
    threshold: float | None
    tpr_low: float | None
    fpr_high: float | None
    thresholds: int
    alpha: float
    delta: float


@dataclass(frozen=True)
class MembershipAttack:
    """The loss-threshold attack's figures (:func:`membership_attack`).

    Attributes
    ----------
    auc : float
        ROC AUC of "lower loss is a member" (0.5: chance; 1: every member below every non-member).
    auc_interval : Interval
        Its 95 % bootstrap interval (members and non-members resampled separately).
    tpr : float
        True-positive rate at false-positive rate ``fpr``.
    tpr_interval : Interval
        Its 95 % bootstrap interval.
    fpr : float
        The false-positive rate ``tpr`` is read at: the largest share of the non-members, k / n,
        that is no more than the one asked for (with fewer than 100 non-members for 1 %: 0).
    bound : EpsilonBound
        The empirical lower bound on ε.
    n_members, n_nonmembers : int
        The images attacked.
    """

    auc: float
    auc_interval: Interval
    tpr: float
    tpr_interval: Interval
    fpr: float
    bound: EpsilonBound
    n_members: int
    n_nonmembers: int

    def as_report(self) -> dict[str, float | int | str | None]:
        """The figures as the test report stores them, each name starting ``membership_``."""
        tpr = "membership_tpr_at_fpr"
        return {ATTACK_AUC: round(self.auc, DIGITS), **self.auc_interval.as_report(ATTACK_AUC),
                tpr: round(self.tpr, DIGITS), **self.tpr_interval.as_report(tpr),
                "membership_fpr": self.fpr, "membership_epsilon_lower_bound": round(self.bound.epsilon, DIGITS),
                "membership_alpha": self.bound.alpha, "membership_delta": self.bound.delta,
                "membership_n_members": self.n_members, "membership_n_nonmembers": self.n_nonmembers}


def per_example_loss(labels: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Cross-entropy of each image: -log of the probability the model gives its true class.

    Parameters
    ----------
    labels : ndarray of shape (n,)
        Class indices.
    probabilities : ndarray of shape (n,) or (n, k)
        The probability of class index 1 (one sigmoid output) or of each class (softmax).

    Returns
    -------
    ndarray of shape (n,)
        float64, at most -log(:data:`PROBABILITY_FLOOR`).
    """
    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    if probabilities.ndim == 1 or probabilities.shape[1] == 1:
        positive = probabilities.ravel()
        of_truth = np.where(labels == 1, positive, 1.0 - positive)
    else:
        of_truth = probabilities[np.arange(len(labels)), labels]
    return -np.log(np.clip(of_truth, PROBABILITY_FLOOR, 1.0))


def draw_members(n_train: int, n_nonmembers: int, *, seed: int = SEED) -> np.ndarray:
    """Which training images to attack: all of them when there are no more than non-members, else
    a seeded random ``n_nonmembers`` of them (equal groups: the AUC and the ε bound then weigh
    both alike); sorted positions in 0..n_train - 1."""
    if n_train <= n_nonmembers:
        return np.arange(n_train)
    return np.sort(np.random.default_rng(seed).choice(n_train, size=n_nonmembers, replace=False))


def membership_attack(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, delta: float = 0.0,
                      alpha: float = ALPHA, fpr: float = TARGET_FPR, n_resamples: int = N_RESAMPLES,
                      seed: int = SEED) -> MembershipAttack:
    """The loss-threshold attack (Yeom et al. 2018): its AUC and TPR at ``fpr`` with intervals,
    and the ε lower bound it proves.

    Parameters
    ----------
    member_losses, nonmember_losses : ndarray of shape (n,)
        :func:`per_example_loss` of training images and of images the model never trained on.
    delta : float, default=0.0
        The δ of the guarantee the bound is for (the model's own; 0 without DP).
    alpha : float, default=:data:`ALPHA`
        The ε bound holds with probability at least 1 - alpha.
    fpr : float, default=:data:`TARGET_FPR`
        The false-positive rate the true-positive rate is read at.
    n_resamples, seed : int
        The bootstrap of the intervals: members and non-members each resampled with replacement,
        percentile interval at :data:`LEVEL`. Images are resampled, not patients: where patients
        have several images, which are alike, the intervals come out somewhat too narrow (the
        test report's patient bootstrap, :mod:`dicomflow.evaluation.intervals`, says why).

    Returns
    -------
    MembershipAttack

    Raises
    ------
    DataError
        A group has fewer than two images, or a loss is NaN.
    """
    members, nonmembers = np.asarray(member_losses, float).ravel(), np.asarray(nonmember_losses, float).ravel()
    for name, losses in (("members", members), ("non-members", nonmembers)):
        if len(losses) < 2 or np.isnan(losses).any():
            raise DataError(f"the membership attack needs at least two {name} with a loss each; got "
                            f"{len(losses)} ({int(np.isnan(losses).sum())} NaN)")
    rng = np.random.default_rng(seed)
    aucs, tprs = np.empty(n_resamples), np.empty(n_resamples)
    for i in range(n_resamples):
        drawn_members = members[rng.integers(0, len(members), len(members))]
        drawn_nonmembers = nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))]
        aucs[i] = attack_auc(drawn_members, drawn_nonmembers)
        tprs[i] = tpr_at_fpr(drawn_members, drawn_nonmembers, fpr=fpr)
    return MembershipAttack(
        auc=attack_auc(members, nonmembers), auc_interval=_percentile_interval(aucs),
        tpr=tpr_at_fpr(members, nonmembers, fpr=fpr), tpr_interval=_percentile_interval(tprs),
        fpr=_allowed(fpr, len(nonmembers)) / len(nonmembers),
        bound=epsilon_lower_bound(members, nonmembers, delta=delta, alpha=alpha),
        n_members=len(members), n_nonmembers=len(nonmembers))


def attack_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """ROC AUC of the attack "the lower the loss, the likelier a member": the share of (member,
    non-member) pairs whose member has the lower loss, ties counting one half."""
    labels = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
    return roc_auc(Scores.at_threshold(labels, -np.r_[member_losses, nonmember_losses]))


def tpr_at_fpr(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, fpr: float = TARGET_FPR) -> float:
    """The attack's true-positive rate at the strictest threshold that calls no more than ``fpr``
    of the non-members members: the share of members whose loss is below the
    (floor(fpr * n) + 1)-th lowest non-member loss (with fewer than 1 / fpr non-members, below
    them all: the rate at no false positive)."""
    cut = np.sort(nonmember_losses)[_allowed(fpr, len(nonmember_losses))]
    return float(np.mean(np.asarray(member_losses) < cut))


def epsilon_lower_bound(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, delta: float = 0.0,
                        alpha: float = ALPHA, thresholds: np.ndarray | None = None) -> EpsilonBound:
    """The ε that the loss-threshold attack proves, with probability at least 1 - ``alpha``.

    For each threshold t the attack calls the images with loss <= t members. (ε, δ)-DP bounds any
    such test (Kairouz et al. 2015): ``TPR <= e^ε FPR + δ`` and ``1 - FPR <= e^ε (1 - TPR) + δ``.
    With a lower confidence bound TPR_lo on the true-positive rate and an upper bound FPR_hi on the
    false-positive rate (Clopper-Pearson, exact for binomial counts), each inequality gives a lower
    bound on ε (Jagielski et al. 2020, Algorithm 2)::

        ε_lb(t) = max(log((TPR_lo - δ) / FPR_hi), log((1 - FPR_hi - δ) / (1 - TPR_lo)))

    and ε_lb = max(0, max over t of ε_lb(t)): 0 when no threshold proves anything.

    Parameters
    ----------
    member_losses, nonmember_losses : ndarray of shape (n,)
        Per-image losses (:func:`per_example_loss`).
    delta : float, default=0.0
        The guarantee's δ.
    alpha : float, default=:data:`ALPHA`
        The bound's error probability, for all thresholds together.
    thresholds : ndarray, optional
        The thresholds t; default the :data:`THRESHOLD_LEVELS` quantiles of the pooled losses
        (observed values, duplicates dropped).

    Returns
    -------
    EpsilonBound

    Notes
    -----
    Taking the best of m thresholds is a search: the best of m bounds, each at confidence
    1 - alpha, fails far more often than alpha (two samples of the same normal losses, 50 or 150
    each, every observed loss a threshold: ε_lb > 0 in 8 and 13 % of 200 simulations; with this
    correction and grid, in none). So each threshold's two bounds
    are one-sided Clopper-Pearson at alpha / (2 m) (Bonferroni over the m thresholds and the two
    rates): ε_lb then holds for all thresholds at once with probability at least 1 - alpha. The
    thresholds come from the pooled losses, which do not say who is a member.

    The counts are treated as independent draws, as in an audit over many training runs; here
    one model is attacked on many images, which the one-run audit of Steinke, Nasr & Jagielski
    ("Privacy auditing with one (1) training run", NeurIPS 2023) justifies when each image's
    membership is decided at random, independently of the others: the split stage draws patients
    at random, so images of one patient share their membership. A patient with many images then
    counts several times, and the guarantee to compare ε_lb with is the patient's
    (``privacy.json``'s ``patient_epsilon``).
    """
    from scipy.stats import beta

    members, nonmembers = np.asarray(member_losses, float), np.asarray(nonmember_losses, float)
    if thresholds is None:
        thresholds = np.quantile(np.r_[members, nonmembers], THRESHOLD_LEVELS, method="lower")
    thresholds = np.unique(np.asarray(thresholds, float))
    level = alpha / (2 * len(thresholds))
    best = EpsilonBound(0.0, None, None, None, len(thresholds), alpha, delta)
    for t in thresholds:
        true_pos, false_pos = int((members <= t).sum()), int((nonmembers <= t).sum())
        n_pos, n_neg = len(members), len(nonmembers)
        # Clopper-Pearson: the one-sided bounds of a binomial proportion, from the beta quantiles.
        tpr_low = float(beta.ppf(level, true_pos, n_pos - true_pos + 1)) if true_pos > 0 else 0.0
        fpr_high = float(beta.ppf(1 - level, false_pos + 1, n_neg - false_pos)) if false_pos < n_neg else 1.0
        candidates = []
        if tpr_low - delta > 0 and fpr_high > 0:
            candidates.append(math.log((tpr_low - delta) / fpr_high))
        if 1 - fpr_high - delta > 0 and tpr_low < 1:
            candidates.append(math.log((1 - fpr_high - delta) / (1 - tpr_low)))
        epsilon = max(candidates, default=0.0)
        if epsilon > best.epsilon:
            best = EpsilonBound(epsilon, float(t), tpr_low, fpr_high, len(thresholds), alpha, delta)
    return best


def privacy_figures(privacy: Mapping | None) -> dict[str, float | int | str]:
    """The guarantee of ``privacy.json`` (:func:`dicomflow.config.layout.read_privacy_record`) as
    the test report stores it: each number and text prefixed ``privacy_`` (``privacy_epsilon``,
    ``privacy_delta``, ...; an infinite one, a patient's ε without a bound, as the text "inf"); without
    DP (None) only ``privacy_guarantee: "none"``."""
    if privacy is None:
        return {"privacy_guarantee": "none"}
    figures = {f"privacy_{key}": value if isinstance(value, str) or math.isfinite(value) else str(value)
               for key, value in privacy.items()
               if isinstance(value, (int, float, str)) and not isinstance(value, bool)}
    return {"privacy_guarantee": "differential privacy", **figures, PRIVACY_EPSILON: float(privacy["epsilon"])}


def claimed_epsilon(privacy: Mapping) -> float:
    """The accounted ε an image-level attack on this split may be held to: the whole patient's
    (``patient_epsilon``, group privacy over a patient's images) where the record gives one, since
    a member's patient is wholly in training and a non-member's wholly out; else ``epsilon``."""
    patient = privacy.get("patient_epsilon")
    usable = isinstance(patient, (int, float)) and not isinstance(patient, bool) and patient == patient
    return float(patient) if usable else float(privacy["epsilon"])


def check_privacy_claim(bound: EpsilonBound, privacy: Mapping | None, *, source: str) -> None:
    """DataError (one line) when the attack proves more than the accounted ε of ``privacy``
    (:func:`claimed_epsilon`; read from ``source``): the DP training or its accountant is wrong,
    whatever the data. Nothing to check without DP (None). The bound is computed at the record's
    δ, at which its ``patient_epsilon`` is accounted too."""
    if privacy is None:
        return
    claimed = claimed_epsilon(privacy)
    if bound.epsilon > claimed:
        raise DataError(
            f"the membership attack proves ε >= {bound.epsilon:.3f} (confidence {1 - bound.alpha:.0%}, δ "
            f"{bound.delta:g}) but {source} accounts ε = {claimed:.3f}: this is an implementation bug in the "
            "DP training or its accounting, not a privacy result; the model is not registered")


def _allowed(fpr: float, n: int) -> int:
    """How many of ``n`` non-members a false-positive rate ``fpr`` allows: floor(fpr * n)."""
    return math.floor(fpr * n + 1e-9)  # 0.07 * 100 is 7.000000000000001, 0.29 * 100 28.999999999999996


def _percentile_interval(values: np.ndarray) -> Interval:
    """The :data:`LEVEL` percentile interval of bootstrap figures, rounded to :data:`DIGITS`."""
    tail = (1 - LEVEL) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(round(float(low), DIGITS), round(float(high), DIGITS))
