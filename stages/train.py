"""Stage 6, train: a Keras CNN on the augmented training split, chosen on validation AUC.

Inputs: ``paths.deid_dir``/images.npy with the split manifest (training and validation images),
and the reports logged with the run.
Outputs: ``paths.model_dir``/model.keras (the epoch with the best validation AUC),
``paths.model_dir``/mlflow_run.json (the run evaluate continues) and the per-epoch history
``paths.train_history`` (a DVC plot). Everything is also logged to one MLflow run.
Params: ``train.*``, ``augment.*`` (the policy applied to training batches), ``ingest.classes``
(two: a sigmoid output; more: softmax), ``ingest.image_size`` and ``ingest.channels`` (the input);
every param of ``params.yaml`` but ``evaluate.*`` is logged to MLflow.
"""

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

from stages import layout, tracking
from stages.cli import StageError, run_stage
from stages.augment import apply_policy, build_policy
from stages.params import AugmentParams, IngestParams, TrainParams, load_params, read_params_file

logger = logging.getLogger(__name__)


def build_seed_cnn(input_shape: tuple[int, int, int], n_classes: int = 2):
    """The seed's network, unchanged: two conv/pool blocks, a dense layer, a sigmoid output
    (a softmax over the classes when there are more than two)."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")

    # Feature extractor
    x = layers.Conv2D(32, (3, 3), activation="relu")(inputs)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Conv2D(64, (3, 3), activation="relu")(x)
    x = layers.MaxPooling2D((2, 2))(x)

    # Classifier head
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, _output_layer(n_classes)(x), name="seed_cnn")


def build_resnet_small(input_shape: tuple[int, int, int], n_classes: int = 2, *,
                       widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 2):
    """A small residual network for 28-128 pixel images, trained from scratch.

    The CIFAR layout of He et al. (2016): a 3x3 stem, then stages of basic residual blocks
    (two 3x3 convolutions with batch normalisation), each stage after the first halving the
    resolution and doubling the width, then global average pooling. About 0.17 M weights with
    the defaults: small enough for 2 CPU cores and a few hundred images, where ImageNet-sized
    networks (``keras.applications``) overfit and there are no pretrained weights to start from.
    """
    import keras
    from keras import layers

    # Synchronised: under a multi-worker or mirrored strategy the batch statistics are those of
    # the global batch, so several workers train what one process trains (local statistics of
    # half a batch did not: the two-worker test drifted by 7e-3 in loss).
    def batch_norm(x):
        return layers.BatchNormalization(synchronized=True)(x)

    def conv_bn(x, filters: int, strides: int = 1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                          kernel_initializer="he_normal")(x)
        return batch_norm(x)

    def residual_block(x, filters: int, strides: int):
        shortcut = x
        if strides != 1 or x.shape[-1] != filters:  # project the shortcut to the new shape
            shortcut = batch_norm(layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x))
        y = layers.ReLU()(conv_bn(x, filters, strides))
        y = conv_bn(y, filters)
        return layers.ReLU()(layers.Add()([shortcut, y]))

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.ReLU()(conv_bn(inputs, widths[0]))
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            x = residual_block(x, filters, strides=2 if stage and not block else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _output_layer(n_classes)(x), name="resnet_small")


def _output_layer(n_classes: int):
    from keras import layers

    if n_classes == 2:
        return layers.Dense(1, activation="sigmoid", name="probability")
    return layers.Dense(n_classes, activation="softmax", name="probability")


ARCHITECTURES = {"seed_cnn": build_seed_cnn, "resnet_small": build_resnet_small}
# Beside paths.model_dir, not in it: DVC deletes a stage's outputs before running it again.
RESUME_SUFFIX = ".resume"
# Training batches drawn ahead of the steps at most (see drawn_ahead): a bound on the memory that
# drawing ahead costs, whatever the data set's size.
DRAWN_AHEAD_BYTES = 512 * 2**20


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Stored images (n, h, w) or (n, h, w, c) -> float32 (n, h, w, c) in [0, 1], the model's input."""
    unit = layout.unit_pixels(images)
    return unit[..., None] if unit.ndim == 3 else unit


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
            raise ValueError("train.strategy is 'multi_worker' but TF_CONFIG is not set: give every "
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


def classification_scores(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Cross-entropy (Keras' clipping), ROC AUC and accuracy of a model's outputs.

    ``probabilities`` is (n,) or (n, 1) for two classes (the probability of class 1; accuracy at
    0.5), or (n, k) for k > 2 (AUC is the macro average of one-vs-rest AUCs, accuracy is for the
    most probable class). AUC is NaN when ``labels`` hold a single class.
    """
    from sklearn.metrics import roc_auc_score

    labels, probabilities = np.asarray(labels, int).ravel(), np.asarray(probabilities, float)
    clipped = np.clip(probabilities, 1e-7, 1 - 1e-7)
    if probabilities.ndim == 1 or probabilities.shape[1] == 1:
        probabilities, clipped = probabilities.ravel(), clipped.ravel()
        loss = -np.mean(labels * np.log(clipped) + (1 - labels) * np.log(1 - clipped))
        auc = roc_auc_score(labels, probabilities) if len(np.unique(labels)) == 2 else float("nan")
        predicted = (probabilities >= 0.5).astype(int)
    else:
        loss = -np.mean(np.log(clipped[np.arange(len(labels)), labels]))
        present = np.unique(labels)
        # Macro AUC over the classes present; a class absent from the labels has no ROC curve.
        auc = (float(np.mean([roc_auc_score(labels == k, probabilities[:, k]) for k in present]))
               if len(present) > 1 else float("nan"))
        predicted = probabilities.argmax(axis=1)
    return {"loss": float(loss), "auc": float(auc), "accuracy": float(np.mean(predicted == labels))}


def train_model(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                params: TrainParams, checkpoint: Path | None, n_classes: int = 2,
                augment: AugmentParams | None = None, strategy=None,
                on_epoch_end: Callable[[int, dict[str, float]], None] | None = None,
                resume_dir: Path | None = None):
    """Fit the configured architecture; returns the best-on-validation model and its history.

    The loop is ours rather than ``model.fit`` because Keras 3's ``fit`` cannot run under
    ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585: it fails on ``PerReplica`` inputs).
    One loop for every strategy keeps the strategies interchangeable: each global batch is split
    evenly across the replicas and the loss averaged over the global batch, so two workers compute
    what one process computes, up to float rounding.

    Parameters
    ----------
    train_x, val_x : ndarray
        float32 images (n, h, w, c) in [0, 1].
    train_y, val_y : ndarray
        Class indices (n,), 0 to ``n_classes`` - 1.
    params : TrainParams
        Architecture, epochs, (global) batch size, learning rate and its schedule, class weights,
        early-stopping patience (on validation AUC), which epoch to keep, and seed.
    checkpoint : Path or None
        Where the kept model (``params.keep``: highest validation AUC, or the last epoch) is
        saved as ``.keras``; None saves nothing (a multi-worker task other than the chief).
    n_classes : int, default=2
        Two: one sigmoid output, the probability of class 1. More: a softmax over the classes.
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

    Returns
    -------
    (keras.Model, pandas.DataFrame)
        The kept model and one history row per epoch: loss, auc, accuracy on the training batches
        as they were trained, and the same on the validation split (``val_`` prefix).
    """
    import keras
    import tensorflow as tf

    strategy = strategy or tf.distribute.get_strategy()
    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()
    steps_per_epoch = -(-len(train_x) // params.batch_size)
    learning_rate = params.lr
    if params.lr_schedule == "cosine":
        learning_rate = keras.optimizers.schedules.CosineDecay(params.lr, params.epochs * steps_per_epoch)
    with strategy.scope():
        model = ARCHITECTURES[params.architecture](train_x.shape[1:], n_classes)
        optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
        optimizer.build(model.trainable_variables)
    class_weights = tf.constant(class_weights_for(train_y, params.class_weight, n_classes), tf.float32)
    loss_function = (keras.losses.binary_crossentropy if n_classes == 2
                     else keras.losses.sparse_categorical_crossentropy)

    options = tf.data.Options()
    # Every worker builds the same shuffled batches and keeps its share of each one.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA

    def epoch_batches(epoch: int):
        dataset = training_batches(train_x, train_y, batch_size=params.batch_size, epoch=epoch,
                                   seed=params.seed, augment=augment)
        batches = strategy.experimental_distribute_dataset(dataset.with_options(options))
        return drawn_ahead(batches, max(1, DRAWN_AHEAD_BYTES // (params.batch_size * train_x[0].nbytes)))

    @tf.function
    def train_step(batch):
        def replica_step(images, labels):
            with tf.GradientTape() as tape:
                probabilities = model(images, training=True)
                per_image = loss_function(labels[:, None], probabilities)
                per_image *= tf.gather(class_weights, tf.cast(labels, tf.int32))
                loss = tf.nn.compute_average_loss(per_image)  # over the global batch
            gradients = tape.gradient(loss, model.trainable_variables)
            optimizer.apply_gradients(zip(gradients, model.trainable_variables))
            return probabilities, labels

        probabilities, labels = strategy.run(replica_step, args=batch)
        return strategy.gather(probabilities, axis=0), strategy.gather(labels, axis=0)

    @tf.function(reduce_retracing=True)
    def predict_batch(images):
        return model(images, training=False)

    def predict(images: np.ndarray) -> np.ndarray:
        return np.concatenate([predict_batch(images[i:i + 256]).numpy()
                               for i in range(0, len(images), 256)])

    resume = TrainingState.load(resume_dir, fingerprint(params, augment, train_x, train_y, val_x, val_y))
    if resume.epoch:
        model.set_weights(resume.weights)
        for variable, value in zip(optimizer.variables, resume.optimizer):
            variable.assign(value)
        logger.info("resuming after epoch %d from %s", resume.epoch, resume_dir)
    state = resume
    for epoch in range(resume.epoch + 1, params.epochs + 1):
        trained = [train_step(batch) for batch in epoch_batches(epoch)]
        row = {"epoch": epoch, **classification_scores(np.concatenate([y.numpy() for _, y in trained]),
                                                       np.concatenate([p.numpy() for p, _ in trained]))}
        row.update({f"val_{name}": value
                    for name, value in classification_scores(val_y, predict(val_x)).items()})
        logger.info("epoch %d/%d: %s", epoch, params.epochs,
                    " ".join(f"{name} {value:.4f}" for name, value in row.items() if name != "epoch"))
        state = state.after_epoch(row, model.get_weights(), [v.numpy() for v in optimizer.variables])
        if resume_dir is not None:
            state.save(resume_dir)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if 0 < params.early_stopping_patience <= epoch - state.best_epoch:
            logger.info("early stop: no better validation AUC in %d epochs", epoch - state.best_epoch)
            break
    kept = state.best_weights if params.keep == "best_val_auc" else state.weights
    model.set_weights(kept or model.get_weights())
    if checkpoint is not None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        model.save(checkpoint)
        # Reloaded outside the strategy's scope, so that predict and MLflow see a plain model.
        model = keras.models.load_model(checkpoint)
    if resume_dir is not None:
        shutil.rmtree(resume_dir, ignore_errors=True)  # finished: the next run starts afresh
    return model, pd.DataFrame(state.rows)


def class_weights_for(labels: np.ndarray, method: str, n_classes: int = 2) -> list[float]:
    """Loss weight of each class: 1 each, or ``n / (n_classes n_class)`` when ``balanced``."""
    if method == "none":
        return [1.0] * n_classes
    counts = np.bincount(np.asarray(labels, int), minlength=n_classes).astype(float)
    return [float(len(labels) / (n_classes * count)) if count else 0.0 for count in counts]


def fingerprint(params: TrainParams, augment: AugmentParams | None, *arrays: np.ndarray) -> str:
    """What a saved training state belongs to: the params and the exact data."""
    settings = {"train": dataclasses.asdict(params), "augment": augment and dataclasses.asdict(augment)}
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

    def after_epoch(self, row: dict, weights: list, optimizer: list) -> TrainingState:
        better = not self.rows or row["val_auc"] > max(r["val_auc"] for r in self.rows)
        return dataclasses.replace(
            self, epoch=row["epoch"], rows=[*self.rows, row], weights=weights, optimizer=optimizer,
            best_epoch=row["epoch"] if better else self.best_epoch,
            best_weights=weights if better else self.best_weights)

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


def class_indices(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Labels as the model's class indices: the position of each label in ``ingest.classes``."""
    order = np.argsort(classes)
    positions = np.searchsorted(np.asarray(classes)[order], labels)
    return order[np.clip(positions, 0, len(classes) - 1)]


def load_split(paths, split: str, classes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """One split's model input (float32 images) and class indices."""
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES, mmap_mode="r")
    chosen = np.flatnonzero((manifest["split"] == split).to_numpy())
    labels = manifest["label"].to_numpy()[chosen]
    return to_model_input(np.asarray(images[chosen])), class_indices(labels, classes)


def check_input_shape(images: np.ndarray, ingest: IngestParams) -> None:
    """The model's input is ``ingest.image_size`` square with ``ingest.channels``: say so when the
    de-identified images are not (params changed without ingest rerunning)."""
    expected = (ingest.image_size, ingest.image_size, ingest.channels)
    if images.shape[1:] != expected:
        raise StageError(f"the de-identified images are {'x'.join(map(str, images.shape[1:]))} but "
                         f"ingest.image_size and ingest.channels ask for {'x'.join(map(str, expected))}: "
                         "run the pipeline from ingest (dvc repro)")


def main() -> None:
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    paths, params = load_params("paths"), load_params("train")
    augment, ingest = load_params("augment"), load_params("ingest")
    strategy = make_strategy(params.strategy)
    model_dir = Path(paths.model_dir)
    train_x, train_y = load_split(paths, "train", ingest.classes)
    val_x, val_y = load_split(paths, "val", ingest.classes)
    check_input_shape(train_x, ingest)
    fit = functools.partial(train_model, train_x, train_y, val_x, val_y, params=params,
                            n_classes=len(ingest.classes), augment=augment, strategy=strategy)
    logger.info("training %s on %s, validating on %s, %d classes, %d replica(s)", params.architecture,
                train_x.shape, val_x.shape, len(ingest.classes), strategy.num_replicas_in_sync)
    if not is_chief(strategy):
        # A multi-worker task trains in step with the chief, which alone writes and logs.
        fit(checkpoint=None)
        return

    tracking.configure_mlflow()
    with mlflow.start_run(run_name=tracking.run_name("train"), tags=tracking.run_tags()) as run:
        # evaluate.* is logged by the evaluate stage's nested run, which reruns without training.
        logged = {section: values for section, values in read_params_file().items() if section != "evaluate"}
        mlflow.log_params(tracking.flatten_params(logged))
        logged_epochs: set[int] = set()

        def log_epoch(epoch: int, row: dict[str, float]) -> None:
            mlflow.log_metrics({name: value for name, value in row.items() if name != "epoch"},
                               step=epoch)
            logged_epochs.add(epoch)

        # A multi-worker run cannot resume: every worker would have to find the same state.
        resume_dir = None if params.strategy == "multi_worker" else model_dir.with_name(
            model_dir.name + RESUME_SUFFIX)
        model, history = fit(checkpoint=model_dir / layout.MODEL_FILE, on_epoch_end=log_epoch,
                             resume_dir=resume_dir)
        for row in history.to_dict("records"):  # epochs a killed run trained, into this run too
            if int(row["epoch"]) not in logged_epochs:
                log_epoch(int(row["epoch"]), row)
        Path(paths.train_history).parent.mkdir(parents=True, exist_ok=True)
        history.to_csv(paths.train_history, index=False)
        best_epoch = int(history.loc[history["val_auc"].idxmax(), "epoch"])
        mlflow.log_metrics({"best_epoch": best_epoch, "best_val_auc": float(history["val_auc"].max())})
        for report in (paths.validation_report, paths.validation_metrics, paths.split_counts,
                       paths.augment_preview, paths.train_history):
            mlflow.log_artifact(report, artifact_path="reports")

        example = val_x[:2]
        # mlflow.keras.log_model (3.17) writes the input example before creating its folder.
        model_info = mlflow.tensorflow.log_model(
            model,
            name="model",
            signature=infer_signature(example, model.predict(example, verbose=0)),
            input_example=example,
            # The inferred list can name both tensorflow and tensorflow-cpu; state what was tested.
            pip_requirements=[f"keras=={keras.__version__}", f"tensorflow-cpu=={tf.__version__}"],
        )
        (model_dir / layout.RUN_INFO).write_text(
            json.dumps({"run_id": run.info.run_id, "model_uri": model_info.model_uri}, indent=2) + "\n"
        )
    logger.info("best validation AUC %.3f at epoch %d; MLflow run %s",
                history["val_auc"].max(), best_epoch, run.info.run_id)


if __name__ == "__main__":
    run_stage(main)
