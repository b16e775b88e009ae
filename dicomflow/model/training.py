"""Training: batches, distribution strategies, resumable training loop, kept epochs and ensembles."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.config.params import AugmentParams, IngestParams, TrainParams, check_task
from dicomflow.model import architectures as models
from dicomflow.model import scoring
from dicomflow.model.augment import apply_policy, build_policy
from dicomflow.model.saving import save_model
from dicomflow.model.transfer import InitialWeights, encoder_variables, set_encoder_trainable, transfer_weights
from dicomflow.errors import DataError, SettingsError

logger = logging.getLogger(__name__)


# Beside paths.model_dir, not in it: DVC deletes a stage's outputs before running it again.
RESUME_SUFFIX = ".resume"
# Training batches drawn ahead of the steps at most (see drawn_ahead): a bound on the memory that
# drawing ahead costs, whatever the data set's size.
DRAWN_AHEAD_BYTES = 512 * 2**20


def training_batches(images: np.ndarray, labels: np.ndarray, *, batch_size: int, epoch: int, seed: int,
                     augment: AugmentParams | None = None):
    """One epoch of training batches as a ``tf.data`` pipeline, augmented on the fly.

    Shuffled with a seed of its own per epoch (not one reshuffling iterator: a resumed run sees
    the same batches), batched, then augmented batch by batch in parallel threads (a batched
    transform costs one kernel call where per-image maps cost one per image) and prefetched, so
    the model does not wait for its input. Each batch's augmentation seed is (``augment.seed``,
    its place in the run): the same pixels whatever the parallelism, the worker count or a resume.
    """
    import tensorflow as tf

    policy = build_policy(augment) if augment is not None else []
    dataset = (tf.data.Dataset.from_tensor_slices((images, labels.astype(np.float32)))
               .shuffle(len(images), seed=seed + epoch, reshuffle_each_iteration=False)
               .batch(batch_size))
    if policy:
        first_batch = (epoch - 1) * -(-len(images) // batch_size)
        dataset = dataset.enumerate(first_batch).map(
            lambda index, batch: (apply_policy(batch[0], policy, seed=[augment.seed, index]), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def distributed_batches(strategy, dataset):
    """``dataset``'s global batches (tuples of tensors), each split into one contiguous slice per
    replica of ``strategy``, every replica stepping once per global batch.

    Why not ``experimental_distribute_dataset``: across workers it cuts a global batch into
    per-replica batches of the full per-replica size, so a last batch no larger than that reaches
    one worker only, and the other's empty step breaks the synchronised batch normalisation's
    all-reduces (a shape mismatch in the collective). Here replica ``k`` of ``n`` gets images
    ``[k * size // n, (k + 1) * size // n)``: slices differ by one image at most, and the
    all-reduces sum per-channel values, whatever a replica's batch size. A batch of fewer images
    than replicas is first repeated ``n`` times, so each replica gets one whole copy: its
    batch-normalisation moments are those of the batch itself, and :func:`distributed_train_step`
    and :class:`BatchNormStatistics` count each copy 1/n. Each element ends with the size of the
    global batch as split and as drawn. With one replica the dataset is distributed as it is.
    """
    import tensorflow as tf

    replicas = strategy.num_replicas_in_sync
    if replicas == 1:
        return strategy.experimental_distribute_dataset(dataset)

    def worker_dataset(context):
        local = replicas // context.num_input_pipelines
        first = context.input_pipeline_id * local

        def slices(*batch):
            drawn = tf.shape(batch[0])[0]
            copies = tf.where(drawn < replicas, replicas, 1)
            batch = tuple(tf.tile(tensor, tf.concat([[copies], tf.ones([tf.rank(tensor) - 1], tf.int32)], 0))
                          for tensor in batch)
            size = drawn * copies

            def replica_slice(index):
                start, end = (index * size) // replicas, ((index + 1) * size) // replicas
                return tuple(tensor[start:end] for tensor in batch) + (size, drawn)

            return tf.data.Dataset.range(first, first + local).map(
                lambda index: replica_slice(tf.cast(index, tf.int32)))

        return dataset.flat_map(slices)

    return strategy.distribute_datasets_from_function(worker_dataset)


def replica_signature(strategy, batches) -> list | None:
    """The input signature of a step over ``batches`` (from :func:`distributed_batches`): their
    element spec, batch sizes unknown, when ``strategy`` has several replicas; None (trace on the
    inputs' shapes, as ever) with one.

    Why: a function traced on its inputs' shapes traces again for a new batch size, and each trace
    numbers its collectives anew; workers whose slices differ in size (a last batch of 5 split
    3 + 2) would retrace at different steps. Traced once on unknown batch sizes, every worker
    runs the same graph at every step.
    """
    return [batches.element_spec] if strategy.num_replicas_in_sync > 1 else None


def drawn_ahead(batches: Iterable, chunk_size: int) -> Iterator:
    """The batches of ``batches``, drawn ``chunk_size`` at a time before any of them is yielded.

    Why not step by step: while a ``tf.data`` iterator is alive, even one that has reached its
    end, the train step's kernels often leave a core idle (resnet_small on 2 cores: 24-42
    images/s from run to run, 1.0-1.8 cores busy). Drawn ahead, the augmentation runs on every
    core at once; once the iterator is done and released, the steps run at the bare step's speed
    (44-46 images/s, 1.83 cores busy; ``bench/train.py``). Same batches, same order. An epoch
    larger than one chunk trains its earlier chunks beside a live iterator, at the slower speed.
    """
    iterator = iter(batches)
    while len(chunk := list(itertools.islice(iterator, chunk_size))) == chunk_size:
        yield from chunk
    del iterator  # done: released before the last chunk trains (see above)
    yield from chunk


def make_strategy(name: str):
    """The ``tf.distribute`` strategy that ``train.strategy`` names.

    Call it before any other TensorFlow op: MultiWorkerMirroredStrategy sets up the runtime's
    collective ops, and reads its cluster (every worker's host:port, and this process's task) from
    ``TF_CONFIG``.
    """
    import tensorflow as tf

    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise SettingsError("train.strategy is 'multi_worker' but TF_CONFIG is not set: give every "
                             "worker the cluster and its own task, e.g. TF_CONFIG='{\"cluster\": "
                             "{\"worker\": [\"host1:2222\", \"host2:2222\"]}, \"task\": "
                             "{\"type\": \"worker\", \"index\": 0}}'")
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def is_chief(strategy) -> bool:
    """Whether this process writes outputs and logs to MLflow: always, unless it is one task of a
    multi-worker cluster that is neither the ``chief`` task nor, in a cluster without one, worker 0."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    return (resolver.task_type == "worker" and resolver.task_id == 0
            and "chief" not in resolver.cluster_spec().as_dict())


class BatchNormStatistics:
    """Sets each batch-normalisation layer's moving mean and variance to those of its input over
    given images ("precise BN", Wu and Johnson, 2021), the network's weights as they are now.

    Why: Keras keeps moving statistics with momentum 0.99, an average over the last ~100 steps,
    while the weights move at every step. On a few hundred images the stored statistics lag the
    network that is saved; over 15 layers the small errors added up to validation logits of +7 to
    +19 (every image above 0.999) for a network that, with batch statistics, scored validation
    AUC 1.0. Re-estimated over a pass of the unaugmented training images in training mode (each
    layer normalised by its batch, as in training), inside ``strategy`` so synchronised layers see
    global batches; the per-batch means and variances are pooled in float64 into the mean and
    variance of all the pass's pixels. Built once per model: its traced function is reused, since
    tracing a new one per epoch cost as much as the pass itself.
    """

    def __init__(self, model, *, batch_size: int, strategy=None) -> None:
        import keras
        import tensorflow as tf

        self.strategy = strategy or tf.distribute.get_strategy()
        self.batch_size = batch_size
        self.norms = [layer for layer in model._flatten_layers(include_self=False)
                      if isinstance(layer, keras.layers.BatchNormalization)]
        probe = keras.Model(model.inputs, [norm.input for norm in self.norms]) if self.norms else None

        def replica_moments(batch_images, size=None, drawn=None):
            counts, sums, squares = [], [], []
            for features in probe(batch_images, training=True):
                mean, variance = tf.nn.moments(features, axes=list(range(len(features.shape) - 1)))
                count = tf.cast(tf.reduce_prod(tf.shape(features)[:-1]), tf.float32)
                if size is not None:  # a repeated batch counts once (see distributed_batches)
                    count *= tf.cast(drawn, tf.float32) / tf.cast(size, tf.float32)
                counts.append(count)
                sums.append(count * mean)
                squares.append(count * (variance + tf.square(mean)))
            return counts, sums, squares

        def pooled_moments(batch):
            per_replica = self.strategy.run(replica_moments, args=batch)
            return tf.nest.map_structure(
                lambda value: self.strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None), per_replica)

        self._moments = pooled_moments
        self._pooled_moments = None  # traced on the first pass (see replica_signature)

    def __call__(self, images: np.ndarray) -> None:
        """Re-estimate every layer's statistics over ``images`` (n, h, w, c)."""
        import tensorflow as tf

        if not self.norms:
            return
        batches = distributed_batches(
            self.strategy, tf.data.Dataset.from_tensor_slices((images,)).batch(self.batch_size))
        if self._pooled_moments is None:
            self._pooled_moments = tf.function(
                self._moments, input_signature=replica_signature(self.strategy, batches))
        totals = None
        for batch in batches:
            moments = tf.nest.map_structure(lambda value: value.numpy().astype(np.float64),
                                            self._pooled_moments(batch))
            totals = moments if totals is None else tf.nest.map_structure(np.add, totals, moments)
        for norm, count, total, square in zip(self.norms, *totals):
            mean = total / count
            norm.moving_mean.assign(mean.astype(np.float32))
            norm.moving_variance.assign(np.maximum(square / count - mean ** 2, 0.0).astype(np.float32))


# Share of the training images the per-epoch statistics pass reads (at least one batch); the kept
# weights get a pass over all of them before they are saved. Why not all, every epoch: a pass
# in training mode costs about 40 % of a training epoch (resnet_small, 2 cores), and the
# per-epoch figures only rank epochs.
EPOCH_STATISTICS_SHARE = 1 / 8


def statistics_subset(images: np.ndarray, *, seed: int, share: float = EPOCH_STATISTICS_SHARE,
                      at_least: int = 32) -> np.ndarray:
    """The same seeded random ``share`` of ``images`` every epoch (at least ``at_least``), in order."""
    count = min(len(images), max(at_least, int(np.ceil(share * len(images)))))
    chosen = np.sort(np.random.default_rng(seed).choice(len(images), count, replace=False))
    return images[chosen]


# What train.keep compares epochs on: the history column and whether lower is better.
KEEP_CRITERIA = {"best_val_loss": ("val_loss", True), "best_val_auc": ("val_auc", False),
                 "last_epoch": ("val_loss", True)}  # last_epoch: early stopping still on the loss


def train_model(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                params: TrainParams, checkpoint: Path | None, n_classes: int = 2,
                augment: AugmentParams | None = None, strategy=None,
                on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
                resume_dir: Path | None = None, initial: InitialWeights | None = None,
                groups: np.ndarray | None = None):
    """Fit one network of the configured architecture; returns the kept, calibrated model and its
    history. With ``params.privacy.enabled``, by DP-SGD instead
    (:func:`dicomflow.model.privacy.train_private`).

    The loop is ours rather than ``model.fit`` because Keras 3's ``fit`` cannot run under
    ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585: it fails on ``PerReplica`` inputs).
    One loop for every strategy keeps the strategies interchangeable: each global batch is split
    evenly across the replicas and the loss averaged over the global batch, so two workers compute
    what one process computes, up to float rounding. After every epoch the batch-normalisation
    statistics are re-estimated (:class:`BatchNormStatistics`) before validation, so
    the validation figures, the kept weights and the saved model are the network in inference
    mode as it will be used.

    Parameters
    ----------
    train_x, val_x : ndarray
        float32 images (n, h, w, c) in [0, 1].
    train_y, val_y : ndarray
        Class indices (n,), 0 to ``n_classes`` - 1.
    params : TrainParams
        Architecture, epochs, (global) batch size, learning rate and its schedule, class weights,
        early-stopping patience, which epoch to keep (``params.keep``: lowest validation loss,
        highest validation AUC, or the last), calibration, and seed.
    checkpoint : Path or None
        Where the returned model is saved as ``.keras``; None saves nothing (a multi-worker task
        other than the chief, or an ensemble member the caller combines).
    n_classes : int, default=2
        Two: one sigmoid output, the probability of class 1. More: a softmax over the classes, or
        with ``params.task: ordinal`` the continuation-ratio head over the grades
        (:mod:`dicomflow.model.architectures`), trained on its likelihood.
    augment : AugmentParams, optional
        The augmentation policy applied to the training batches (:func:`training_batches`).
    strategy : tf.distribute.Strategy, optional
        From :func:`make_strategy`; the default strategy when None.
    on_epoch_end : callable, optional
        Called with the epoch number (from 1) and its history row (e.g. to log metrics).
    resume_dir : Path, optional
        Where the training state is saved after every epoch; a run that finds the state of the
        same params and data there (a killed run) goes on after its last epoch, and gives what an
        uninterrupted run gives. Removed when training ends.
    initial : InitialWeights, optional
        Weights to start from (``train.init``: :mod:`dicomflow.model.transfer`), copied into the
        matching layers. Then the first ``params.freeze_epochs`` epochs train the head alone, the
        encoder frozen (its batch normalisation in inference mode, its statistics not
        re-estimated), and the encoder learns at ``params.encoder_lr_factor`` times the head's
        rate (its own Adam: scaling Adam's gradients would not change its steps).
    groups : ndarray, optional
        Each training image's patient: the unit DP-SGD samples and clips with
        ``params.privacy.unit: patient``; unused otherwise.

    Returns
    -------
    (keras.Model, pandas.DataFrame)
        The kept model, with ``params.calibration: temperature`` its temperature fitted on the
        validation split (:func:`dicomflow.model.scoring.fit_temperature`), and one history row per
        epoch: loss, auc, accuracy, brier, ece on the training batches as they were trained, and
        the same on the validation split (``val_`` prefix) in inference mode, before calibration,
        and ``kept``, True on the epoch whose weights were kept.
    """
    import keras
    import tensorflow as tf

    if params.task != "binary":  # ordinal with two classes has no head (binary with more: a softmax, as ever)
        check_task(params.task, list(range(n_classes)))
    if params.privacy.enabled:  # a loop of its own: Poisson-sampled batches, clipped and noised gradients
        from dicomflow.model.privacy import train_private

        return train_private(train_x, train_y, val_x, val_y, params=params, checkpoint=checkpoint,
                             n_classes=n_classes, augment=augment, strategy=strategy, on_epoch_end=on_epoch_end,
                             groups=groups)
    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    model, updates = build_network(params, train_x.shape[1:], n_classes, strategy=strategy,
                                   steps_per_epoch=-(-len(train_x) // params.batch_size), initial=initial)
    optimizers = [optimizer for optimizer, _ in updates]
    frozen_epochs = params.freeze_epochs if initial is not None else 0
    predict = batched_predictor(model)

    def distributed_epoch(epoch: int):
        # Every worker builds the same shuffled batches and keeps its share of each one.
        return distributed_batches(strategy, training_batches(
            train_x, train_y, batch_size=params.batch_size, epoch=epoch, seed=params.seed, augment=augment))

    def epoch_batches(epoch: int):
        return drawn_ahead(distributed_epoch(epoch),
                           max(1, DRAWN_AHEAD_BYTES // (params.batch_size * train_x[0].nbytes)))

    signature = replica_signature(strategy, distributed_epoch(1)) if strategy.num_replicas_in_sync > 1 else None
    train_steps = {}

    def train_step_for(epoch: int):
        # A frozen encoder is a step of its own, traced with the encoder's layers not trainable
        # (Keras reads `trainable` when tracing: batch normalisation then runs in inference mode).
        frozen = epoch <= frozen_epochs
        set_encoder_trainable(model, not frozen)
        if frozen not in train_steps:
            train_steps[frozen] = distributed_train_step(
                model, updates[-1:] if frozen else updates, strategy=strategy, n_classes=n_classes,
                class_weights=class_weights_for(train_y, params.class_weight, n_classes), input_signature=signature)
        return train_steps[frozen]

    refresh_statistics = BatchNormStatistics(model, batch_size=params.batch_size, strategy=strategy)
    epoch_statistics_images = statistics_subset(train_x, seed=params.seed)
    state = TrainingState.load(resume_dir, fingerprint(params, augment, train_x, train_y, val_x, val_y,
                                                       initial=initial))
    if state.epoch:
        state.restore(model, *optimizers)
        logger.info("resuming after epoch %d from %s", state.epoch, resume_dir)
    criterion, lower_is_better = KEEP_CRITERIA[params.keep]
    for epoch in range(state.epoch + 1, params.epochs + 1):
        train_step = train_step_for(epoch)
        trained = [train_step(batch) for batch in epoch_batches(epoch)]
        if epoch > frozen_epochs:  # a frozen encoder keeps the statistics it came with
            refresh_statistics(epoch_statistics_images)
        row = {"epoch": epoch, **scoring.classification_scores(
            np.concatenate([y.numpy() for _, y in trained]), np.concatenate([p.numpy() for p, _ in trained]),
            task=params.task)}
        row.update({f"val_{name}": value for name, value in scoring.classification_scores(
            val_y, predict(val_x), task=params.task).items()})
        logger.info("epoch %d/%d: %s", epoch, params.epochs,
                    " ".join(f"{name} {value:.4f}" for name, value in row.items() if name != "epoch"))
        state = state.after_epoch(row, model.get_weights(), [v.numpy() for o in optimizers for v in o.variables],
                                  criterion=criterion, lower_is_better=lower_is_better)
        if resume_dir is not None:
            state.save(resume_dir)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if 0 < params.early_stopping_patience <= epoch - state.best_epoch:
            logger.info("early stop: no better %s in %d epochs", criterion, epoch - state.best_epoch)
            break
    set_encoder_trainable(model, True)  # saved trainable: a model fine-tuned later starts unfrozen
    kept_epoch = state.epoch if params.keep == "last_epoch" else state.best_epoch
    model = finished_network(model, state, params=params, train_x=train_x, val_x=val_x, val_y=val_y,
                             refresh_statistics=refresh_statistics if kept_epoch > frozen_epochs else None,
                             checkpoint=checkpoint)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)  # finished: the next run starts afresh
    history = pd.DataFrame(state.rows)
    return model, history.assign(kept=history["epoch"] == (state.epoch if params.keep == "last_epoch"
                                                           else state.best_epoch))


def build_network(params: TrainParams, input_shape: tuple[int, ...], n_classes: int, *, strategy,
                  steps_per_epoch: int, initial: InitialWeights | None = None):
    """The network of ``params.architecture`` (with ``initial``'s weights when given) and its
    updates: (Adam optimizer, the variables it trains) pairs, built so that a resumed run can
    restore their variables, all under ``strategy``'s scope. From scratch one optimizer trains
    every variable; from ``initial`` the encoder and the head have one each (encoder first), the
    encoder's at ``params.encoder_lr_factor`` times the rate, over the epochs it is not frozen."""
    import keras

    def learning_rate(rate: float, epochs: int):
        if params.lr_schedule == "cosine":
            return keras.optimizers.schedules.CosineDecay(rate, max(1, epochs) * steps_per_epoch)
        return rate

    def adam(rate, variables: list):
        optimizer = keras.optimizers.Adam(learning_rate=rate)
        optimizer.build(variables)
        return optimizer, variables

    with strategy.scope():
        model = models.ARCHITECTURES[params.architecture](input_shape, n_classes,
                                                          ordinal=params.task == models.ORDINAL)
        if initial is None:
            return model, [adam(learning_rate(params.lr, params.epochs), model.trainable_variables)]
        transfer_weights(model, initial)
        encoder, head = encoder_variables(model)
        return model, [adam(learning_rate(params.lr * params.encoder_lr_factor, params.epochs - params.freeze_epochs),
                            encoder),
                       adam(learning_rate(params.lr, params.epochs), head)]


def distributed_train_step(model, updates: list[tuple], *, strategy, n_classes: int, class_weights: list[float],
                           input_signature: list | None = None):
    """One optimisation step on a distributed global batch; returns its probabilities and labels
    gathered from every replica. Each image's loss is weighted by its class and averaged over the
    global batch, so any number of replicas computes what one does. ``updates``: (optimizer,
    variables) pairs (:func:`build_network`); each optimizer applies the gradients of its own.
    The loss is the task's (:func:`dicomflow.model.architectures.training_view`: for an ordinal
    head, from its grade log-probabilities)."""
    import tensorflow as tf

    weights = tf.constant(class_weights, tf.float32)
    network, loss_function = models.training_view(model)
    ordinal = network is not model

    @tf.function(input_signature=input_signature)
    def train_step(batch):
        def replica_step(images, labels, size=None, drawn=None):
            with tf.GradientTape() as tape:
                outputs = network(images, training=True)
                per_image = loss_function(labels[:, None], outputs)
                per_image *= tf.gather(weights, tf.cast(labels, tf.int32))
                # Over the global batch: its size comes with the replica's slice (see
                # distributed_batches), since slices of an odd-sized batch differ in size.
                loss = tf.nn.compute_average_loss(per_image, global_batch_size=size)
            probabilities = tf.nn.softmax(outputs) if ordinal else outputs
            variables = [variable for _, group in updates for variable in group]
            gradients = iter(tape.gradient(loss, variables))
            for optimizer, group in updates:
                optimizer.apply_gradients(zip([next(gradients) for _ in group], group))
            return probabilities, labels

        probabilities, labels = strategy.run(replica_step, args=batch)
        probabilities, labels = strategy.gather(probabilities, axis=0), strategy.gather(labels, axis=0)
        if len(batch) > 2:  # of a repeated batch, the first copy (see distributed_batches)
            drawn = strategy.experimental_local_results(batch[3])[0]
            probabilities, labels = probabilities[:drawn], labels[:drawn]
        return probabilities, labels

    return train_step


def batched_predictor(model, batch_size: int = 256) -> Callable[[np.ndarray], np.ndarray]:
    """``model`` in inference mode on images of any count, ``batch_size`` at a time."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def predict_batch(images):
        return model(images, training=False)

    def predict(images: np.ndarray) -> np.ndarray:
        return np.concatenate([predict_batch(images[i:i + batch_size]).numpy()
                               for i in range(0, len(images), batch_size)])

    return predict


def finished_network(model, state: TrainingState, *, params: TrainParams, train_x: np.ndarray,
                     val_x: np.ndarray, val_y: np.ndarray, refresh_statistics: BatchNormStatistics | None,
                     checkpoint: Path | None):
    """The network as it is kept: the weights of the kept epoch, batch-norm statistics over every
    training image (unless ``refresh_statistics`` is None: a kept epoch whose encoder was frozen
    keeps the statistics its head was trained with), its temperature fitted on the validation
    split (``params.calibration``), and saved to ``checkpoint`` (then reloaded outside any
    strategy's scope) when one is given."""
    import keras

    kept = state.best_weights if params.keep != "last_epoch" else state.weights
    model.set_weights(kept or model.get_weights())
    if refresh_statistics is not None:
        refresh_statistics(train_x)  # the saved network: statistics over every training image
    if params.calibration == "temperature":
        temperature = scoring.fit_temperature(val_y, models.infer(models.logit_model(model), val_x),
                                              ordinal=models.is_ordinal(model))
        model = models.set_temperature(model, temperature)
        logger.info("temperature %.3f fitted on the validation split", temperature)
    if checkpoint is not None:
        save_model(model, checkpoint)  # no save time in it: same weights, same bytes
        # Reloaded outside the strategy's scope, so that predict and MLflow see a plain model.
        model = keras.models.load_model(checkpoint)
    return model


def class_weights_for(labels: np.ndarray, method: str, n_classes: int = 2) -> list[float]:
    """Loss weight of each class: 1 each, or ``n / (n_classes n_class)`` when ``balanced``."""
    if method == "none":
        return [1.0] * n_classes
    counts = np.bincount(np.asarray(labels, int), minlength=n_classes).astype(float)
    return [float(len(labels) / (n_classes * count)) if count else 0.0 for count in counts]


def fingerprint(params: TrainParams, augment: AugmentParams | None, *arrays: np.ndarray,
                initial: InitialWeights | None = None) -> str:
    """What a saved training state belongs to: the params, the exact data and the weights it started from."""
    settings = {"train": dataclasses.asdict(params), "augment": augment and dataclasses.asdict(augment),
                "initial": initial and initial.digest()}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class TrainingState:
    """Training as of the end of an epoch: enough to go on after the process was killed."""

    fingerprint: str
    epoch: int = 0
    rows: list = dataclasses.field(default_factory=list)
    best_epoch: int = 0
    weights: list | None = None
    optimizer: list | None = None
    best_weights: list | None = None

    def after_epoch(self, row: dict, weights: list, optimizer: list, *, criterion: str = "val_loss",
                    lower_is_better: bool = True) -> TrainingState:
        """The state after ``row``'s epoch; its weights become the best when ``row[criterion]``
        beats every earlier epoch's (strictly: the first of equal epochs stays)."""
        sign = 1.0 if lower_is_better else -1.0
        better = not self.rows or sign * row[criterion] < min(sign * r[criterion] for r in self.rows)
        return dataclasses.replace(
            self, epoch=row["epoch"], rows=[*self.rows, row], weights=weights, optimizer=optimizer,
            best_epoch=row["epoch"] if better else self.best_epoch,
            best_weights=weights if better else self.best_weights)

    def restore(self, model, *optimizers) -> None:
        """Put this state's weights into ``model`` and its optimizer variables into ``optimizers``
        (in the order their variables were saved)."""
        model.set_weights(self.weights)
        for variable, value in zip([v for o in optimizers for v in o.variables], self.optimizer, strict=True):
            variable.assign(value)

    def save(self, folder: Path) -> None:
        """Written beside and renamed into place, so a kill mid-write leaves the last good one."""
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        for name in ("weights", "optimizer", "best_weights"):
            np.savez(partial / f"{name}.npz", *getattr(self, name))
        (partial / "state.json").write_text(json.dumps(
            {"fingerprint": self.fingerprint, "epoch": self.epoch, "best_epoch": self.best_epoch,
             "rows": self.rows}))
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)

    @classmethod
    def load(cls, folder: Path | None, fingerprint: str) -> TrainingState:
        """The state saved in ``folder`` when it belongs to ``fingerprint``, else a fresh one."""
        if folder is None or not (folder / "state.json").is_file():
            return cls(fingerprint)
        saved = json.loads((folder / "state.json").read_text())
        if saved["fingerprint"] != fingerprint:
            return cls(fingerprint)

        def arrays(name: str) -> list:
            with np.load(folder / f"{name}.npz") as stored:
                return [stored[f"arr_{i}"] for i in range(len(stored.files))]

        return cls(fingerprint, saved["epoch"], saved["rows"], saved["best_epoch"],
                   arrays("weights"), arrays("optimizer"), arrays("best_weights"))


def split_arrays(manifest: pd.DataFrame, images: np.ndarray, split: str,
                 classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One split's model input (float32 images) and class indices, from the split manifest and
    the de-identified images (a memory map is fine: only the split's rows are read)."""
    chosen = layout.split_rows(manifest, split)
    labels = manifest["label"].to_numpy()[chosen]
    return models.to_model_input(np.asarray(images[chosen])), models.class_indices(labels, classes)


def validation_summary(model, val_x: np.ndarray, val_y: np.ndarray, history: pd.DataFrame, *,
                       metric_name: Callable[[int, str], str], task: str | None = None) -> dict[str, float]:
    """The saved model on the validation split (kept epochs, calibrated, members averaged), with
    and without its calibration, and each member's temperature and kept epoch (``task``: how
    images are called, :func:`dicomflow.model.scoring.classification_scores`)."""
    final = scoring.classification_scores(val_y, models.predict_probabilities(model, val_x), task=task)
    uncalibrated = scoring.classification_scores(val_y, models.predict_probabilities(model, val_x, calibrated=False),
                                                 task=task)
    summary = {**{f"model_val_{name}": value for name, value in final.items()},
               "model_val_ece_uncalibrated": uncalibrated["ece"],
               "model_val_brier_uncalibrated": uncalibrated["brier"]}
    kept = history.loc[history["kept"], "epoch"].astype(int).tolist()
    for member, (network, epoch) in enumerate(zip(models.members_of(model), kept)):
        summary[metric_name(member, "temperature")] = models.temperature_of(network)
        summary[metric_name(member, "kept_epoch")] = epoch
    return summary


def check_input_shape(images: np.ndarray, ingest: IngestParams) -> None:
    """The model's input is ``ingest.image_size`` square with ``ingest.channels`` (with
    ``ingest.unit: series``, ``ingest.series.volume_size`` with one channel): say so when the
    de-identified images are not (params changed without ingest rerunning)."""
    if ingest.unit == "series":  # grayscale volumes
        expected, asked = (*ingest.series.volume_size, 1), "ingest.series.volume_size"
    else:
        expected = (ingest.image_size, ingest.image_size, ingest.channels)
        asked = "ingest.image_size and ingest.channels"
    if images.shape[1:] != expected:
        raise DataError(f"the de-identified images are {'x'.join(map(str, images.shape[1:]))} but "
                         f"{asked} ask for {'x'.join(map(str, expected))}: "
                         "run the pipeline from ingest (dvc repro)")


def train_ensemble(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                   params: TrainParams, checkpoint: Path | None, n_classes: int = 2,
                   augment: AugmentParams | None = None, strategy=None,
                   on_epoch_end: Callable[[int, int, dict[str, float]], None] | None = None,
                   resume_dir: Path | None = None, initial: InitialWeights | None = None,
                   groups: np.ndarray | None = None):
    """``params.ensemble`` networks by :func:`train_model`, member i with seed ``params.seed + i``,
    combined by :func:`dicomflow.model.architectures.ensemble_of` (one member: that network).

    Returns the model (saved to ``checkpoint`` unless None) and every member's history, with a
    ``member`` column; ``on_epoch_end`` is called with (member, epoch, row). Each member resumes
    from its own folder under ``resume_dir``. Every member starts from ``initial`` when given.
    ``groups``: each training image's patient (:func:`train_model`).
    """
    import keras

    members, histories = [], []
    for member in range(params.ensemble):
        report = None if on_epoch_end is None else functools.partial(on_epoch_end, member)
        network, history = train_model(
            train_x, train_y, val_x, val_y, params=dataclasses.replace(params, seed=params.seed + member),
            checkpoint=None, n_classes=n_classes, augment=augment, strategy=strategy,
            on_epoch_end=report, resume_dir=None if resume_dir is None else resume_dir / f"member-{member}",
            initial=initial, groups=groups)
        members.append(network)
        histories.append(history.assign(member=member))
    model = models.ensemble_of(members)
    if checkpoint is not None:
        save_model(model, checkpoint)  # no save time in it: same weights, same bytes
        # Reloaded outside the strategy's scope, so that predict and MLflow see a plain model.
        model = keras.models.load_model(checkpoint)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)
    return model, pd.concat(histories, ignore_index=True)
