"""Self-supervised pretraining of an encoder without labels: SimCLR (Chen et al., 2020).

Each image gives two views, drawn by the project's augmentation policy (its strengths scaled by
``pretrain.view_strength``) after a random resized crop; the encoder (the classifier's layers up
to ``features``, named as the classifier names them) and a projection head map both views, and the
NT-Xent loss pulls the two views of an image together against the other 2N - 2 views of the
batch. The projection head is dropped afterwards: the encoder is what train transfers (by layer
name and shape).

Imports TensorFlow inside functions: the stage with ``pretrain.method: none`` imports this module
without paying for it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.config.params import AugmentParams, PretrainParams
from dicomflow.errors import DataError, SettingsError
from dicomflow.model import architectures as models
from dicomflow.model.augment import apply_policy, build_policy, warp
from dicomflow.model.training import (
    DRAWN_AHEAD_BYTES,
    BatchNormStatistics,
    TrainingState,
    distributed_batches,
    drawn_ahead,
    replica_signature,
)

logger = logging.getLogger(__name__)

# The history's columns, in order.
HISTORY_COLUMNS = ("epoch", "loss", "positive_top1", "seconds")
# Those of the stage's report (a DVC output, committed with the code): not the seconds, so that the
# same inputs give the same bytes (they go to MLflow and the log). Also the header of method none's.
REPORT_COLUMNS = ("epoch", "loss", "positive_top1")
# A logit that no softmax gives any weight: each view's similarity to itself (not -inf: 0 * inf
# is NaN in the cross-entropy's gradient).
SELF_SIMILARITY = -1e9
# The largest strength each augment key may reach after view_strength (the transforms' own
# bounds, kept clear of degenerate views: a contrast factor of 0 is a flat image).
VIEW_LIMITS = {"rotation_deg": 180.0, "zoom": 0.5, "shift": 0.5, "brightness": 1.0, "contrast": 0.9,
               "noise_std": 1.0}


def view_augment(augment: AugmentParams, strength: float) -> AugmentParams:
    """``augment`` with every strength multiplied by ``strength`` (capped at :data:`VIEW_LIMITS`);
    the flip and the seed as they are (a left-right flip can turn anatomy into its mirror image:
    ``augment.flip`` decides for pretraining too)."""
    return dataclasses.replace(augment, **{key: min(getattr(augment, key) * strength, limit)
                                           for key, limit in VIEW_LIMITS.items()})


class RandomResizedCrop:
    """A random box of ``min_scale`` to all of the image's area, aspect ratio in [3/4, 4/3],
    resized (bilinear) back to the image's size.

    Why it matters most: in SimCLR's ablation (Chen et al. 2020, Fig. 5) crops with colour
    distortion are the strongest pair of augmentations, crops alone next. Two crops of one image
    show the same anatomy at other scales and places (sometimes one inside the other, a part and
    its context), so the encoder must describe the content, not where it sits; without crops the
    two views share their layout pixel for pixel and the task is solved by low-level cues. On
    grayscale images colour distortion reduces to the brightness and contrast of the augment
    policy, which ``view_strength`` makes stronger.
    """

    def __init__(self, min_scale: float) -> None:
        if not 0 < min_scale <= 1:
            raise ValueError(f"min_scale must be in (0, 1]; got {min_scale}")
        self.min_scale = min_scale

    def __call__(self, images, seed):
        import tensorflow as tf

        n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
        seeds = tf.random.experimental.stateless_split(seed, 4)
        area = tf.random.stateless_uniform([n], seeds[0], self.min_scale, 1.0)
        log_ratio = tf.random.stateless_uniform([n], seeds[1], np.log(3 / 4), np.log(4 / 3))
        # Box sides as shares of the image's (a box wider than the image is cut to it).
        box_height = tf.minimum(tf.sqrt(area / tf.exp(log_ratio)), 1.0)
        box_width = tf.minimum(tf.sqrt(area * tf.exp(log_ratio)), 1.0)
        top = tf.random.stateless_uniform([n], seeds[2]) * (1.0 - box_height)
        left = tf.random.stateless_uniform([n], seeds[3]) * (1.0 - box_width)
        # Output pixel (row, col) samples the input at (top (H - 1) + row h, left (W - 1) + col w):
        # the box's corners land on the output's corners, as tf.image.crop_and_resize places them.
        # Warped by augment's projective transform (crop_and_resize is not costed by TensorFlow's
        # graph optimiser, which logs two warnings for every trace of it).
        zeros = tf.zeros_like(box_width)
        transforms = tf.stack([box_width, zeros, left * (width - 1), zeros, box_height, top * (height - 1),
                               zeros, zeros], axis=1)
        return warp(images, transforms)


def view_policy(params: PretrainParams, augment: AugmentParams) -> list:
    """The transforms that draw one view: the random resized crop, then the augment policy at
    ``params.view_strength`` (:func:`view_augment`)."""
    return [RandomResizedCrop(params.crop_min_scale), *build_policy(view_augment(augment, params.view_strength))]


def nt_xent(z1, z2, temperature: float):
    """The NT-Xent loss of each of the 2N views, and whether its positive scored highest.

    Parameters
    ----------
    z1, z2 : tf.Tensor
        Projections (N, d) of the first and second view of the same N images, row i of both
        from image i.
    temperature : float
        The softmax's temperature over cosine similarities.

    Returns
    -------
    (tf.Tensor, tf.Tensor)
        float32 (2N,): for view k, ``-log(exp(s(k, p) / t) / sum over j != k of exp(s(k, j) / t))``,
        ``p`` the other view of its image, ``s`` the cosine similarity: the other 2N - 2 views
        are its negatives, and both views of a pair are anchors (symmetric); and float32 (2N,),
        1 where the positive is the most similar of the 2N - 1 other views.
    """
    import tensorflow as tf

    z = tf.math.l2_normalize(tf.concat([z1, z2], axis=0), axis=1)
    count = tf.shape(z)[0]
    logits = tf.matmul(z, z, transpose_b=True) / temperature
    logits = tf.where(tf.eye(count, dtype=tf.bool), SELF_SIMILARITY, logits)
    positives = (tf.range(count) + count // 2) % count
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=positives, logits=logits)
    correct = tf.cast(tf.equal(tf.argmax(logits, axis=1, output_type=tf.int32), positives), tf.float32)
    return losses, correct


def build_projection_head(features: int, projection_dim: int):
    """SimCLR's projection MLP: Dense (as wide as the features) - batch norm - ReLU - Dense
    ``projection_dim``. The loss is taken on its output, so what the augmentations remove (the
    crop's place, the intensity) may be lost there and kept in the features before it (Chen et
    al. 2020, section 4.2): the reason it is dropped afterwards."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=(features,), name="projection_input")
    x = layers.Dense(features, use_bias=False, name="projection_hidden")(inputs)
    x = layers.BatchNormalization(synchronized=True, name="projection_bn")(x)
    x = layers.ReLU(name="projection_relu")(x)
    return keras.Model(inputs, layers.Dense(projection_dim, name="projection")(x), name="projection_head")


def images_version(pixel_digests: Iterable[str]) -> str:
    """The sha256 over the images' ``pixel_sha256`` values in the order given (one per line):
    which images, in which order, an encoder was pretrained on."""
    digest = hashlib.sha256()
    for value in pixel_digests:
        digest.update(f"{value}\n".encode())
    return digest.hexdigest()


def pretrain_fingerprint(params: PretrainParams, architecture: str, augment: AugmentParams,
                         images: np.ndarray) -> str:
    """What a saved pretraining state belongs to: the params, the architecture and the exact images."""
    settings = {"pretrain": dataclasses.asdict(params), "architecture": architecture,
                "augment": dataclasses.asdict(augment)}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(images).tobytes())
    return digest.hexdigest()


def view_batches(images: np.ndarray, *, batch_size: int, epoch: int, params: PretrainParams,
                 augment: AugmentParams):
    """One epoch of (first views, second views) batches as a ``tf.data`` pipeline.

    Shuffled with a seed of its own per epoch (a resumed run sees the same batches); only whole
    batches (NT-Xent's negatives are the batch: a last batch of a few images would be an easy,
    noisy step), so an epoch leaves out ``len(images) % batch_size`` images, others each epoch;
    fewer images than ``batch_size`` make one batch of all. Batch ``b`` of the run draws its two
    views with seeds split from (``params.seed``, ``b``): the same pixels in any thread, on any
    number of replicas, and after a resume.
    """
    import tensorflow as tf

    policy = view_policy(params, augment)
    batch_size = min(batch_size, len(images))
    first_batch = (epoch - 1) * (len(images) // batch_size)

    def two_views(index, batch):
        first, second = tf.unstack(tf.random.experimental.stateless_split(
            tf.stack([tf.constant(params.seed, tf.int64), index]), 2))
        return apply_policy(batch, policy, first), apply_policy(batch, policy, second)

    return (tf.data.Dataset.from_tensor_slices(images)
            .shuffle(len(images), seed=params.seed + epoch, reshuffle_each_iteration=False)
            .batch(batch_size, drop_remainder=True)
            .enumerate(first_batch)
            .map(two_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def pretrain_encoder(images: np.ndarray, *, params: PretrainParams, architecture: str,
                     augment: AugmentParams, strategy=None,
                     on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
                     resume_dir: Path | None = None):
    """Learn an encoder from unlabelled images with SimCLR; returns it and its history.

    Parameters
    ----------
    images : ndarray
        float32 (n, h, w, c) in [0, 1]; no labels.
    params : PretrainParams
        Epochs, (global) batch size, learning rate (Adam), NT-Xent temperature, projection width,
        view strength, crop scale and seed.
    architecture : str
        A key of :data:`dicomflow.model.architectures.ARCHITECTURES`: the encoder is that
        network's layers up to ``features``, with the classifier's layer names.
    augment : AugmentParams
        The augmentation policy the views are drawn with (:func:`view_policy`).
    strategy : tf.distribute.Strategy, optional
        The default strategy when None. Under ``MirroredStrategy`` with several replicas each
        replica takes the NT-Xent loss over its own slice of the batch (its negatives are the
        slice's views, not the global batch's); the batch normalisation is synchronised.
        ``MultiWorkerMirroredStrategy`` is refused.
    on_epoch_end : callable, optional
        Called with the epoch number (from 1) and its history row.
    resume_dir : Path, optional
        Where the state is saved after every epoch; a run that finds the state of the same params,
        architecture and images there (a killed run) goes on after its last epoch and gives what
        an uninterrupted run gives. Removed when pretraining ends.

    Returns
    -------
    (keras.Model, pandas.DataFrame)
        The encoder (input to ``features``; no projection head), its batch-normalisation
        statistics those of the unaugmented ``images``; one history row per epoch:
        :data:`HISTORY_COLUMNS` (mean NT-Xent loss over the epoch's views, the share of views
        whose positive was the most similar, wall-clock seconds).

    Raises
    ------
    DataError
        Fewer than two images (no negatives).
    SettingsError
        Under ``MultiWorkerMirroredStrategy``.

    Notes
    -----
    Deterministic: the same params, architecture, augment policy and images give the same
    weights (op determinism, seeded initialisation, seeded stateless views).
    """
    import keras
    import tensorflow as tf

    if len(images) < 2:
        raise DataError(f"pretraining needs at least 2 images (the training and unlabelled splits); got "
                        f"{len(images)}: check the split manifest, or set pretrain.method to none")
    strategy = strategy or tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        raise SettingsError("pretraining does not run under train.strategy 'multi_worker' (its state, "
                            "encoder and record are one process's): set train.strategy to default or "
                            "mirrored for the pretrain stage")
    run_ops_one_at_a_time()
    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    with strategy.scope():
        encoder = models.encoder_of(models.ARCHITECTURES[architecture](images.shape[1:], 2))
        head = build_projection_head(encoder.output.shape[-1], params.projection_dim)
        # Encoder and head as one model: its weights are what the resume state saves.
        network = keras.Model(encoder.inputs, head(encoder.outputs[0]), name="simclr")
        optimizer = keras.optimizers.Adam(learning_rate=params.lr)
        optimizer.build(network.trainable_variables)

    def distributed_epoch(epoch: int):
        return distributed_batches(strategy, view_batches(images, batch_size=params.batch_size, epoch=epoch,
                                                          params=params, augment=augment))

    train_step = _train_step(network, optimizer, strategy=strategy, temperature=params.temperature,
                             input_signature=replica_signature(strategy, distributed_epoch(1)))
    chunk = max(1, DRAWN_AHEAD_BYTES // (2 * params.batch_size * images[0].nbytes))
    state = TrainingState.load(resume_dir, pretrain_fingerprint(params, architecture, augment, images))
    if state.epoch:
        state.restore(network, optimizer)
        logger.info("resuming pretraining after epoch %d from %s", state.epoch, resume_dir)
    for epoch in range(state.epoch + 1, params.epochs + 1):
        start = time.monotonic()
        stepped = [train_step(batch) for batch in drawn_ahead(distributed_epoch(epoch), chunk)]
        row = {"epoch": epoch,
               "loss": float(np.mean(np.concatenate([losses.numpy() for losses, _ in stepped]))),
               "positive_top1": float(np.mean(np.concatenate([correct.numpy() for _, correct in stepped]))),
               "seconds": round(time.monotonic() - start, 3)}
        logger.info("pretrain epoch %d/%d: loss %.4f, positive top-1 %.3f, %.1f s", epoch, params.epochs,
                    row["loss"], row["positive_top1"], row["seconds"])
        state = state.after_epoch(row, network.get_weights(), [v.numpy() for v in optimizer.variables],
                                  criterion="loss")
        if resume_dir is not None:
            state.save(resume_dir)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
    # The moving statistics describe the augmented views (crops, stronger intensity changes),
    # averaged with momentum over weights that kept moving: not the images the encoder will see.
    # Train uses them wherever the encoder runs in inference mode (a frozen encoder, validation),
    # so they are re-estimated over the unaugmented images with the final weights.
    BatchNormStatistics(encoder, batch_size=params.batch_size, strategy=strategy)(images)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)  # finished: the next run starts afresh
    return _rebuilt(encoder), pd.DataFrame(state.rows, columns=list(HISTORY_COLUMNS))


def _rebuilt(model):
    """A copy of ``model`` built from its config, with its weights, outside any strategy's scope.

    Why: the layers of a network as built share one dtype-policy object, and Keras writes a shared
    object's ``id()`` (``shared_object_id``) into the saved config, so the same weights saved by
    two processes gave two ``encoder.keras`` files of different bytes (a new DVC hash every run).
    Built from the config, each layer has its own policy.
    """
    import keras

    copy = keras.Model.from_config(model.get_config())
    copy.set_weights(model.get_weights())
    return copy


def run_ops_one_at_a_time() -> None:
    """Run TensorFlow's independent ops one after another (one inter-op thread; each op still
    uses every core). Call it before TensorFlow runs anything: afterwards it can only warn.

    Why: with ops running side by side, two SimCLR pretrainings of ``resnet_small`` (256 noise
    images of 32 x 32, the same views, op determinism on) gave other weights in 4 of 6 pairs of
    runs, by up to 1.4e-3 after one epoch, from the stem on. With one inter-op thread 6 of 6 pairs
    were bit-identical, and an epoch no slower on 2 cores (27-31 s against 25-29 s for 512 images
    of 64 x 64 at batch 128, under load). Which op races was not found; train's step does not show it.
    """
    import tensorflow as tf

    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # the runtime has started: the setting can no longer change
        if tf.config.threading.get_inter_op_parallelism_threads() != 1:
            logger.warning("TensorFlow started before pretraining set one inter-op thread: the encoder may "
                           "differ from run to run by about 1e-3 (call run_ops_one_at_a_time first)")


def _train_step(network, optimizer, *, strategy, temperature: float, input_signature: list | None = None):
    """One optimisation step on a distributed batch of view pairs; returns every view's NT-Xent
    loss and positive top-1, gathered from the replicas."""
    import tensorflow as tf

    @tf.function(input_signature=input_signature)
    def train_step(batch):
        def replica_step(first, second, size=None, drawn=None):
            with tf.GradientTape() as tape:
                projections = network(tf.concat([first, second], axis=0), training=True)
                z1, z2 = tf.split(projections, 2, axis=0)
                losses, correct = nt_xent(z1, z2, temperature)
                # Averaged over the global batch's 2 x size views (with one replica: the mean).
                loss = tf.nn.compute_average_loss(losses, global_batch_size=None if size is None else 2 * size)
            gradients = tape.gradient(loss, network.trainable_variables)
            optimizer.apply_gradients(zip(gradients, network.trainable_variables))
            return losses, correct

        losses, correct = strategy.run(replica_step, args=batch)
        return strategy.gather(losses, axis=0), strategy.gather(correct, axis=0)

    return train_step
