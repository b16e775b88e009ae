"""Differentially private training: DP-SGD (Abadi et al., 2016) with Poisson sampling, and the
accountant that states what it guarantees.

One DP-SGD step: every training unit (an image, or all the images of one patient with
``train.privacy.unit: patient``) joins the batch with probability ``q``, independently and
seeded (:func:`poisson_sample`: the batch size varies, and an empty batch is still a step); each
unit's gradient is taken on its own (vectorised, :func:`per_example_gradients`), clipped to L2
norm ``C`` (``max_grad_norm``) as one flat vector; Gaussian noise of standard deviation ``σ C``
is added to their sum once per global step; the total is divided by the expected batch size
``q N``, and Adam steps on it. Under a strategy with ``R`` replicas each replica adds noise of
``σ C / √R``: the optimizer sums the replicas' gradients, and the sum's noise has ``σ C``.

The accountant (Google's ``dp_accounting``) composes ``PoissonSampledDpEvent(q,
GaussianDpEvent(σ))`` once per step that ran, under the add-or-remove-one relation that Poisson
sampling is analysed under, with privacy loss distributions (``pld``, tight) or Rényi DP
(``rdp``, an upper bound); σ for a target ε comes from ``calibrate_dp_mechanism``. The result is
a :class:`PrivacyGuarantee`, logged to MLflow (:meth:`PrivacyGuarantee.as_params`) and written
beside the model (:data:`dicomflow.config.layout.PRIVACY_FILE`).

Not private, and so not done under DP: batch normalisation (it mixes a batch's images; its
moving statistics are an unaccounted release), training-batch metrics (the history's training
columns are NaN), class weights from the training labels. Validation is taken to be public to
the training: early stopping, the kept epoch and the temperature use it, and the guarantee covers
the training images only (docs/privacy.md).

The functions take plain values, so a benchmark can call them in-process; :func:`train_private`
is what :func:`dicomflow.model.training.train_model` runs when ``train.privacy.enabled``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dicomflow.config.params import AugmentParams, PrivacyParams, TrainParams
from dicomflow.errors import SettingsError
from dicomflow.model import architectures as models
from dicomflow.model import scoring
from dicomflow.model.augment import apply_policy, build_policy
from dicomflow.model.saving import save_model

logger = logging.getLogger(__name__)

SAMPLING = "poisson"
NEIGHBOURING = "add_or_remove_one"
# δ when train.privacy.delta is null: 1 / (DELTA_DIVISOR N). δ is the chance the guarantee fails
# outright; at 1 / N a mechanism that publishes one random training unit is (0, δ)-private, so δ
# must be well below 1 / N (Ponomareva et al., 2023, section 5.1).
DELTA_DIVISOR = 10
# The PLD accountant's grid of privacy-loss values. Its estimate is pessimistic (an upper bound on
# ε) at any grid; 1e-3 against the library's 1e-4 moved ε by 1e-4 on BreastMNIST's settings (546
# images, batch 64, 270 steps, σ 2.1: 3.1115 against 3.1114) and costs 1/18 of the time, which
# matters when calibration evaluates ε twenty times.
PLD_DISCRETISATION = 1e-3
# How close calibrate_dp_mechanism gets to the smallest σ meeting the target (it returns a σ
# whose ε is at most the target).
NOISE_TOLERANCE = 1e-4


@dataclass(frozen=True)
class PrivacyGuarantee:
    """What a DP-SGD run guarantees: (ε, δ)-differential privacy for one ``unit`` under the
    ``neighbouring`` relation, from ``steps`` Poisson-sampled Gaussian steps.

    ``patient_epsilon`` is ε for a whole patient at the same δ: equal to ``epsilon`` with
    ``unit: patient`` or when no training patient has several images, else the group-privacy
    bound over the most images one training patient has (:func:`group_epsilon`); None when the
    patients were not known.
    """

    epsilon: float
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    sampling_probability: float
    steps: int
    accountant: str
    unit: str
    patient_epsilon: float | None = None
    sampling: str = SAMPLING
    neighbouring: str = NEIGHBOURING

    def as_params(self) -> dict[str, Any]:
        """The MLflow params: ``privacy.epsilon``, ``privacy.delta``, ... (one per field)."""
        return {f"privacy.{name}": value for name, value in self.as_record().items()}

    def as_record(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict (the record beside the model)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> PrivacyGuarantee:
        """The guarantee :meth:`as_record` wrote."""
        return cls(**record)


@dataclass(frozen=True)
class PrivacyPlan:
    """The settings one DP-SGD run trains with, fixed before it starts."""

    noise_multiplier: float
    sampling_probability: float
    delta: float
    planned_steps: int
    units: int  # N: training images, or patients with unit: patient


# ---- accounting ------------------------------------------------------------------------------

def dp_event(*, noise_multiplier: float, sampling_probability: float, steps: int):
    """``steps`` compositions of the Poisson-subsampled Gaussian mechanism."""
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(sampling_probability,
                                               dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, int(steps))


def make_accountant(name: str):
    """A fresh ``pld`` or ``rdp`` accountant under the add-or-remove-one relation."""
    import dp_accounting
    from dp_accounting import pld, rdp

    relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    if name == "pld":
        return pld.PLDAccountant(relation, value_discretization_interval=PLD_DISCRETISATION)
    if name == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    raise ValueError(f"accountant must be 'pld' or 'rdp'; got {name!r}")


def compute_epsilon(*, noise_multiplier: float, sampling_probability: float, steps: int, delta: float,
                    accountant: str = "pld") -> float:
    """ε at ``delta`` after ``steps`` Poisson-sampled Gaussian steps (0 for no step)."""
    if steps == 0:
        return 0.0
    ledger = make_accountant(accountant).compose(dp_event(
        noise_multiplier=noise_multiplier, sampling_probability=sampling_probability, steps=steps))
    return float(ledger.get_epsilon(delta))


def calibrate_noise(*, target_epsilon: float, sampling_probability: float, steps: int, delta: float,
                    accountant: str = "pld") -> float:
    """The smallest noise multiplier σ (within :data:`NOISE_TOLERANCE`) whose ε after ``steps``
    steps is at most ``target_epsilon`` at ``delta``.

    The bracket is found by halving or doubling from σ = 1 (not dp_accounting's default search
    from 0: a tiny σ's privacy-loss distribution is vast, one evaluation took tens of seconds),
    then ``calibrate_dp_mechanism`` searches it.
    """
    import dp_accounting

    def event(sigma: float):
        return dp_event(noise_multiplier=sigma, sampling_probability=sampling_probability, steps=steps)

    def too_little_noise(sigma: float) -> bool:
        return make_accountant(accountant).compose(event(sigma)).get_epsilon(delta) > target_epsilon

    low, high = 1.0, 1.0
    if too_little_noise(high):
        while too_little_noise(high):
            low, high = high, 2 * high
    else:
        while not too_little_noise(low):
            if low < 1e-2:
                raise SettingsError(f"train.privacy.target_epsilon {target_epsilon:g} is met with almost no noise "
                                    f"(noise multiplier below {low:g}): lower target_epsilon")
            low, high = low / 2, low
    return float(dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(accountant), event, target_epsilon, delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(low, high), tol=NOISE_TOLERANCE))


def group_epsilon(epsilon_at: Callable[[float], float], *, group_size: int, delta: float) -> float:
    """ε for a group of ``group_size`` units at ``delta``, from ``epsilon_at(δ')``: the unit's ε at δ'.

    The standard group-privacy bound (Dwork and Roth, 2014, for pure DP; its approximate form
    e.g. Vadhan, 2017, Lemma 2.2): an (ε, δ')-DP mechanism is (k ε, k e^{(k-1) ε} δ')-DP for
    groups of k. The unit's δ' is chosen so that the group's δ is ``delta``: the largest δ' with
    ``k e^{(k-1) ε(δ')} δ' <= delta``, found on a grid of log δ' going down from ``delta / k``
    in steps of 0.5, then by bisection. Infinite when none exists above 1e-300 (the PLD
    accountant's ε is infinite below its truncated tail mass, about 1e-15).
    """
    if group_size <= 1:
        return epsilon_at(delta)
    k = group_size

    def fits(log_unit_delta: float) -> bool:
        epsilon = epsilon_at(math.exp(log_unit_delta))
        return math.isfinite(epsilon) and math.log(k) + (k - 1) * epsilon + log_unit_delta <= math.log(delta)

    high = math.log(delta / k)  # never fits: ε(δ / k) > 0
    low = high - 0.5
    while not fits(low):
        if low < math.log(1e-300):
            return math.inf
        high, low = low, low - 0.5
    for _ in range(30):  # the gap between a δ' that fits and a larger one that does not: halved
        middle = (low + high) / 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return k * epsilon_at(math.exp(low))


def resolve_delta(settings: PrivacyParams, units: int) -> float:
    """``settings.delta``, or 1 / (:data:`DELTA_DIVISOR` ``units``) when null; checked below 1 / N.

    Raises
    ------
    SettingsError
        δ at or above 1 / N (N = ``units``).
    """
    delta = settings.delta if settings.delta is not None else 1.0 / (DELTA_DIVISOR * units)
    if delta >= 1.0 / units:
        raise SettingsError(f"train.privacy.delta is {delta:g}, not below 1/N = {1 / units:.3g} for N = {units} "
                            f"training {settings.unit}s (a δ that large allows publishing one of them outright): "
                            f"set delta below {1 / units:.3g}, e.g. {1 / (DELTA_DIVISOR * units):.2g}, or null")
    return delta


def plan_privacy(settings: PrivacyParams, *, units: int, n_images: int, batch_size: int, epochs: int) -> PrivacyPlan:
    """σ, q and δ for a run of ``epochs`` epochs of ``ceil(n_images / batch_size)`` steps each.

    Parameters
    ----------
    settings : PrivacyParams
        ``train.privacy``.
    units : int
        N: training images, or training patients with ``unit: patient``.
    n_images : int
        Training images (the expected batch holds ``batch_size`` of them).
    batch_size, epochs : int
        ``train.batch_size`` (the expected batch size, in images), ``train.epochs``.

    Raises
    ------
    SettingsError
        δ not below 1/N; a given noise multiplier whose ε over the planned steps exceeds
        ``target_epsilon``.
    """
    delta = resolve_delta(settings, units)
    # The expected batch holds batch_size images: with unit patient, q N patients of n_images / N images each.
    q = min(1.0, batch_size / n_images)
    steps = epochs * -(-n_images // batch_size)
    if settings.noise_multiplier is None:
        sigma = calibrate_noise(target_epsilon=settings.target_epsilon, sampling_probability=q, steps=steps,
                                delta=delta, accountant=settings.accountant)
    else:
        sigma = settings.noise_multiplier
        if settings.target_epsilon is not None:
            epsilon = compute_epsilon(noise_multiplier=sigma, sampling_probability=q, steps=steps, delta=delta,
                                      accountant=settings.accountant)
            if epsilon > settings.target_epsilon:
                raise SettingsError(f"train.privacy.noise_multiplier {sigma:g} gives epsilon {epsilon:.3g} over "
                                    f"{steps} steps, above train.privacy.target_epsilon {settings.target_epsilon:g}: "
                                    "raise noise_multiplier, or set it null to calibrate it to the target")
    return PrivacyPlan(noise_multiplier=float(sigma), sampling_probability=q, delta=delta, planned_steps=steps,
                       units=units)


def account(settings: PrivacyParams, plan: PrivacyPlan, *, steps: int,
            largest_patient: int | None = None) -> PrivacyGuarantee:
    """The guarantee of ``steps`` steps (those that ran) of ``plan``.

    ``largest_patient``: the most training images one patient has (None: patients unknown), for
    ``patient_epsilon`` with ``unit: image``.
    """
    ledger = None
    if steps:
        ledger = make_accountant(settings.accountant).compose(dp_event(
            noise_multiplier=plan.noise_multiplier, sampling_probability=plan.sampling_probability, steps=steps))

    def epsilon_at(delta: float) -> float:
        return float(ledger.get_epsilon(delta)) if ledger is not None else 0.0

    epsilon = epsilon_at(plan.delta)
    if settings.unit == "patient":
        patient_epsilon = epsilon
    elif largest_patient is None:
        patient_epsilon = None
    else:
        patient_epsilon = group_epsilon(epsilon_at, group_size=largest_patient, delta=plan.delta)
    return PrivacyGuarantee(epsilon=epsilon, delta=plan.delta, noise_multiplier=plan.noise_multiplier,
                            max_grad_norm=settings.max_grad_norm, sampling_probability=plan.sampling_probability,
                            steps=int(steps), accountant=settings.accountant, unit=settings.unit,
                            patient_epsilon=patient_epsilon)


# ---- the DP-SGD step -------------------------------------------------------------------------

def poisson_sample(units: int, *, sampling_probability: float, seed: int, step: int) -> np.ndarray:
    """The units (indices, ascending) in step ``step``'s batch: each one independently with
    probability ``sampling_probability``, drawn from the seed (``seed``, ``step``); may be empty."""
    return np.flatnonzero(np.random.default_rng([seed, step]).random(units) < sampling_probability)


def per_example_gradients(model, loss_function, variables: list, images, labels) -> list:
    """Each image's gradient of ``loss_function(label, model(image))`` with respect to
    ``variables``, one tensor (n, *variable.shape) per variable, vectorised with
    ``tf.vectorized_map`` (one batched graph, not n passes); for n = 0, zeros of shape (0, ...)."""
    import tensorflow as tf

    def one(example):
        image, label = example
        with tf.GradientTape() as tape:
            loss = loss_function(label[None, None], model(image[None], training=True))[0]
        return [tf.zeros_like(v) if g is None else g for g, v in zip(tape.gradient(loss, variables), variables)]

    # vectorized_map cannot run over no example (pfor's shapes break): a branch of its own.
    return tf.cond(tf.shape(images)[0] > 0, lambda: tf.vectorized_map(one, (images, labels)),
                   lambda: [tf.zeros((0, *v.shape), v.dtype) for v in variables])


def clipped_sum(gradients: list, *, max_grad_norm: float, groups=None, n_groups=None) -> list:
    """The sum over units of each unit's gradient clipped to L2 norm ``max_grad_norm``, the
    norm taken over every variable at once (flat clipping).

    ``gradients``: per-image tensors (n, ...) from :func:`per_example_gradients`. ``groups``:
    each image's unit (0 .. ``n_groups`` - 1) when a unit has several images (a patient): the
    unit's gradient is the sum of its images' and is clipped as one. None: each image a unit.
    """
    import tensorflow as tf

    n = tf.shape(gradients[0])[0]
    flat = tf.concat([tf.reshape(g, [n, -1]) for g in gradients], axis=1)
    if groups is not None:  # a matrix product: deterministic, where segment sums need not be
        flat = tf.matmul(tf.one_hot(groups, n_groups, dtype=flat.dtype), flat, transpose_a=True)
    norms = tf.norm(flat, axis=1)
    factors = tf.minimum(1.0, max_grad_norm / tf.maximum(norms, 1e-12))
    total = tf.reduce_sum(flat * factors[:, None], axis=0)
    sizes = [int(np.prod(g.shape[1:])) for g in gradients]
    return [tf.reshape(part, g.shape[1:]) for part, g in zip(tf.split(total, sizes), gradients)]


def noise_like(variables: list, *, stddev: float, seed) -> list:
    """Gaussian noise of standard deviation ``stddev``, one tensor per variable, from the
    stateless seed ``seed`` (two int32)."""
    import tensorflow as tf

    seeds = tf.random.experimental.stateless_split(seed, len(variables))
    return [tf.random.stateless_normal(v.shape, seed=seeds[i], stddev=stddev, dtype=v.dtype)
            for i, v in enumerate(variables)]


def private_train_step(model, optimizer, *, strategy, plan: PrivacyPlan, max_grad_norm: float, n_classes: int,
                       noise_seed: int, grouped: bool = False):
    """One DP-SGD step, as a function of (images, labels, groups, n_groups, step) per replica:
    per-unit gradients clipped and summed, noise of σ C / √R per replica (R replicas: their sum
    has σ C), divided by the expected batch size q N; the optimizer sums the replicas' results
    and steps. ``grouped``: the units are patients (``groups`` numbers each image's), else images."""
    import tensorflow as tf

    variables = model.trainable_variables
    # The task's loss (for an ordinal head, from its grade log-probabilities): see training_view.
    network, loss_function = models.training_view(model)
    replicas = strategy.num_replicas_in_sync
    stddev = plan.noise_multiplier * max_grad_norm / math.sqrt(replicas)
    expected_batch = plan.sampling_probability * plan.units

    # Traced once for every batch size with one replica (a trace costs seconds: the batch size
    # varies from step to step); with several, traced again until the shapes are generalised.
    signature = None if replicas > 1 else [
        tf.TensorSpec((None, *model.input_shape[1:]), tf.float32), tf.TensorSpec((None,), tf.float32),
        tf.TensorSpec((None,), tf.int32), tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.int64)]

    @tf.function(input_signature=signature, reduce_retracing=True)
    def step(images, labels, groups, n_groups, step_index):
        def replica_step(images, labels, groups, n_groups):
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            summed = clipped_sum(per_example_gradients(network, loss_function, variables, images, labels),
                                 max_grad_norm=max_grad_norm, groups=groups if grouped else None,
                                 n_groups=n_groups)
            seed = tf.stack([tf.cast(noise_seed, tf.int64), tf.cast(step_index, tf.int64) * replicas
                             + tf.cast(replica, tf.int64)])
            noise = noise_like(variables, stddev=stddev, seed=seed)
            optimizer.apply_gradients(zip([(s + z) / expected_batch for s, z in zip(summed, noise)], variables))

        strategy.run(replica_step, args=(images, labels, groups, n_groups))

    return step


def replica_batches(strategy, images: np.ndarray, labels: np.ndarray, groups: np.ndarray):
    """A global batch as per-replica values: replica k of R takes units [k U / R, (k+1) U / R)
    (U units in the batch; a unit's images stay together), with its groups renumbered from 0."""
    replicas = strategy.num_replicas_in_sync
    units = int(groups.max()) + 1 if len(groups) else 0

    def part(index: int):
        first, last = index * units // replicas, (index + 1) * units // replicas
        chosen = (groups >= first) & (groups < last)
        return images[chosen], labels[chosen], (groups[chosen] - first).astype(np.int32), np.int32(last - first)

    if replicas == 1:
        return part(0)
    parts = [part(index) for index in range(replicas)]
    return tuple(strategy.experimental_distribute_values_from_function(
        lambda context, i=i: parts[context.replica_id_in_sync_group][i]) for i in range(4))


# ---- the training loop -----------------------------------------------------------------------

def train_private(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                  params: TrainParams, checkpoint: Path | None, n_classes: int = 2,
                  augment: AugmentParams | None = None, strategy=None,
                  on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
                  groups: np.ndarray | None = None, secret_seed: int | None = None):
    """Fit one network by DP-SGD (``params.privacy``); returns the kept, calibrated model and its
    history, as :func:`dicomflow.model.training.train_model` does.

    Each epoch is ``ceil(n / batch_size)`` Poisson-sampled steps (:func:`poisson_sample`, seeded
    by ``secret_seed`` and the step's number), each batch augmented per image (its seed
    (``augment.seed``, step)). After each epoch the network is scored on validation only;
    early stopping and the kept epoch (``params.keep``) use those figures, and the temperature
    is fitted on validation. The history has ``steps`` (steps run so far: the accountant counts
    them all, after the kept epoch too) and NaN training figures: scores on the private
    batches would be a release no accountant counts. No resume: a killed run starts over.

    Parameters
    ----------
    groups : ndarray, optional
        Each training image's patient (any hashable labels), for ``params.privacy.unit: patient``:
        patients are sampled, and their images' gradients summed and clipped together.
    secret_seed : int, optional
        The seed of the sampling and the noise. None (what train passes): drawn from the operating
        system's entropy, never logged or stored. The guarantee assumes the noise and the batches
        are unknown to the attacker: a seed in the run's params (``train.seed``) would let anyone
        who also knows the other images recompute the noise and take it away. So a private run is
        not repeatable bit for bit; tests pass a seed to check the arithmetic.

    Raises
    ------
    SettingsError
        ``unit: patient`` without ``groups``; δ or a given σ out of bounds (:func:`plan_privacy`).
    """
    import keras
    import tensorflow as tf

    settings = params.privacy
    strategy = strategy or tf.distribute.get_strategy()
    if settings.unit == "patient" and groups is None:
        raise SettingsError("train.privacy.unit is 'patient' but the training images' patients were not given: "
                            "pass groups (the split manifest's patient_key) or set unit: image")
    members = unit_members(settings.unit, len(train_x), groups)
    plan = plan_privacy(settings, units=len(members), n_images=len(train_x), batch_size=params.batch_size,
                        epochs=params.epochs)
    logger.info("DP-SGD: noise multiplier %.4f, sampling probability %.4f, delta %.3g, up to %d steps, "
                "%d %ss", plan.noise_multiplier, plan.sampling_probability, plan.delta, plan.planned_steps,
                plan.units, settings.unit)

    if secret_seed is None:
        secret_seed = secrets.randbits(63)
    keras.utils.set_random_seed(params.seed)  # the initial weights and augmentation: public, as DP-SGD allows
    tf.config.experimental.enable_op_determinism()
    with strategy.scope():
        model = models.ARCHITECTURES[params.architecture](train_x.shape[1:], n_classes,
                                                          ordinal=params.task == models.ORDINAL)
        rate = (keras.optimizers.schedules.CosineDecay(params.lr, plan.planned_steps)
                if params.lr_schedule == "cosine" else params.lr)
        optimizer = keras.optimizers.Adam(learning_rate=rate)
        optimizer.build(model.trainable_variables)
    step = private_train_step(model, optimizer, strategy=strategy, plan=plan, max_grad_norm=settings.max_grad_norm,
                              n_classes=n_classes, noise_seed=secret_seed, grouped=settings.unit == "patient")
    policy = build_policy(augment) if augment is not None else []
    labels = train_y.astype(np.float32)
    criterion, lower_is_better = ("val_auc", False) if params.keep == "best_val_auc" else ("val_loss", True)
    steps_per_epoch = plan.planned_steps // params.epochs
    rows, weights, best = [], None, (None, None)  # best: (epoch, weights)
    for epoch in range(1, params.epochs + 1):
        for index in range((epoch - 1) * steps_per_epoch, epoch * steps_per_epoch):
            chosen = poisson_sample(len(members), sampling_probability=plan.sampling_probability,
                                    seed=secret_seed, step=index)
            rows_of = [members[unit] for unit in chosen]
            images_at = np.concatenate(rows_of) if rows_of else np.zeros(0, int)
            batch_groups = np.repeat(np.arange(len(rows_of)), [len(r) for r in rows_of]).astype(np.int32)
            images = train_x[images_at]
            if policy and len(images):
                images = apply_policy(images, policy, seed=[augment.seed, index]).numpy()
            step(*replica_batches(strategy, images, labels[images_at], batch_groups), np.int64(index))
        row = {"epoch": epoch, "steps": epoch * steps_per_epoch,
               **{name: float("nan") for name in ("loss", "auc", "accuracy", "brier", "ece")}}
        row.update({f"val_{name}": value for name, value in scoring.classification_scores(
            val_y, models.predict_probabilities(model, val_x), task=params.task).items()})
        logger.info("epoch %d/%d (%d DP steps): %s", epoch, params.epochs, row["steps"],
                    " ".join(f"{k} {v:.4f}" for k, v in row.items() if k.startswith("val_")))
        weights = model.get_weights()
        sign = 1.0 if lower_is_better else -1.0
        if best[0] is None or sign * row[criterion] < min(sign * r[criterion] for r in rows):
            best = (epoch, weights)
        rows.append(row)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if 0 < params.early_stopping_patience <= epoch - best[0]:
            logger.info("early stop: no better %s in %d epochs", criterion, epoch - best[0])
            break
    kept_epoch = rows[-1]["epoch"] if params.keep == "last_epoch" else best[0]
    model.set_weights(weights if params.keep == "last_epoch" else best[1])
    model = _finished(model, params=params, val_x=val_x, val_y=val_y, checkpoint=checkpoint)
    history = pd.DataFrame(rows)
    return model, history.assign(kept=history["epoch"] == kept_epoch)


def _finished(model, *, params: TrainParams, val_x: np.ndarray, val_y: np.ndarray, checkpoint: Path | None):
    """The kept network with its temperature fitted on validation, saved and reloaded when asked."""
    import keras

    if params.calibration == "temperature":
        temperature = scoring.fit_temperature(val_y, models.infer(models.logit_model(model), val_x),
                                              ordinal=models.is_ordinal(model))
        model = models.set_temperature(model, temperature)
        logger.info("temperature %.3f fitted on the validation split", temperature)
    if checkpoint is not None:
        save_model(model, checkpoint)
        model = keras.models.load_model(checkpoint)  # outside the strategy's scope, as train_model's
    return model


def unit_members(unit: str, n_images: int, patients: np.ndarray | None) -> list[np.ndarray]:
    """The training images (row positions) of each unit: one image each, or each patient's."""
    if unit == "image":
        return [np.array([row]) for row in range(n_images)]
    codes = np.unique(np.asarray(patients), return_inverse=True)[1].ravel()
    order = np.argsort(codes, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(codes[order])) + 1)


def privacy_guarantee(params: TrainParams, *, n_images: int, steps: int,
                      patients: np.ndarray | None = None) -> PrivacyGuarantee:
    """What a :func:`train_private` run of ``steps`` steps (its history's last ``steps``)
    guarantees, on ``n_images`` training images of ``patients`` (each image's patient; None:
    unknown, then no ``patient_epsilon`` with ``unit: image``).

    The plan is recomputed as the run computed it (the same inputs give the same σ).
    """
    settings = params.privacy
    members = unit_members(settings.unit, n_images, patients)
    plan = plan_privacy(settings, units=len(members), n_images=n_images, batch_size=params.batch_size,
                        epochs=params.epochs)
    largest = None if patients is None else int(pd.Series(np.asarray(patients)).value_counts().max())
    return account(settings, plan, steps=steps, largest_patient=largest)
