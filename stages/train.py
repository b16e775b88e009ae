"""Stage 6, train: a Keras CNN on the augmented training split, chosen on validation AUC.

Inputs: ``paths.augment_dir`` (training images and labels), ``paths.deid_dir``/images.npy with
the split manifest (validation images), and the reports logged with the run.
Outputs: ``paths.model_dir``/model.keras (the epoch with the best validation AUC),
``paths.model_dir``/mlflow_run.json (the run evaluate continues) and the per-epoch history
``paths.train_history`` (a DVC plot). Everything is also logged to one MLflow run.
Params: ``train.*``; every param of ``params.yaml`` is logged to MLflow.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from stages import layout, tracking
from stages.cli import run_stage
from stages.params import TrainParams, load_params, read_params_file

logger = logging.getLogger(__name__)


def build_seed_cnn(input_shape: tuple[int, int, int]):
    """The seed's network, unchanged: two conv/pool blocks, a dense layer, a sigmoid output."""
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
    outputs = layers.Dense(1, activation="sigmoid", name="probability")(x)
    return keras.Model(inputs, outputs, name="seed_cnn")


ARCHITECTURES = {"seed_cnn": build_seed_cnn}


def to_model_input(images: np.ndarray) -> np.ndarray:
    """Stored images (n, h, w) or (n, h, w, c) -> float32 (n, h, w, c) in [0, 1], the model's input."""
    unit = layout.unit_pixels(images)
    return unit[..., None] if unit.ndim == 3 else unit


def train_model(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray, *,
                params: TrainParams, checkpoint: Path, callbacks: list | None = None):
    """Fit the configured architecture; returns the best-on-validation model and its history.

    Parameters
    ----------
    train_x, val_x : ndarray
        float32 images (n, h, w, 1) in [0, 1].
    train_y, val_y : ndarray
        Binary labels (n,).
    params : TrainParams
        Architecture, epochs, batch size, learning rate and seed.
    checkpoint : Path
        Where the best model (highest validation AUC) is saved as ``.keras``.
    callbacks : list, optional
        Extra Keras callbacks (e.g. metric logging).

    Returns
    -------
    (keras.Model, pandas.DataFrame)
        The reloaded best model and one history row per epoch.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(params.seed)
    tf.config.experimental.enable_op_determinism()

    model = ARCHITECTURES[params.architecture](train_x.shape[1:])
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=params.lr),
        loss=keras.losses.BinaryCrossentropy(),
        metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
    )
    train_ds = (
        tf.data.Dataset.from_tensor_slices((train_x, train_y.astype(np.float32)))
        .shuffle(len(train_x), seed=params.seed, reshuffle_each_iteration=True)
        .batch(params.batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    val_ds = tf.data.Dataset.from_tensor_slices((val_x, val_y.astype(np.float32))).batch(256)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    best = keras.callbacks.ModelCheckpoint(checkpoint, monitor="val_auc", mode="max", save_best_only=True)
    history = model.fit(train_ds, validation_data=val_ds, epochs=params.epochs, verbose=2,
                        callbacks=[best, *(callbacks or [])])
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    return keras.models.load_model(checkpoint), table


def _load_split(paths, split: str) -> tuple[np.ndarray, np.ndarray]:
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES)
    chosen = (manifest["split"] == split).to_numpy()
    return images[chosen], manifest.loc[chosen, "label"].to_numpy()


def main() -> None:
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    paths, params = load_params("paths"), load_params("train")
    augment_dir, model_dir = Path(paths.augment_dir), Path(paths.model_dir)
    train_x = to_model_input(np.load(augment_dir / layout.AUGMENTED_IMAGES))
    train_y = np.load(augment_dir / layout.AUGMENTED_LABELS)
    val_images, val_y = _load_split(paths, "val")
    val_x = to_model_input(val_images)
    logger.info("training %s on %s, validating on %s", params.architecture, train_x.shape, val_x.shape)

    tracking.configure_mlflow()
    with mlflow.start_run(tags=tracking.run_tags()) as run:
        # evaluate.* is logged by the evaluate stage's nested run, which reruns without training.
        logged = {section: values for section, values in read_params_file().items() if section != "evaluate"}
        mlflow.log_params(tracking.flatten_params(logged))
        log_epoch = keras.callbacks.LambdaCallback(
            on_epoch_end=lambda epoch, logs: mlflow.log_metrics(
                {name: float(value) for name, value in logs.items()}, step=epoch + 1)
        )
        model, history = train_model(train_x, train_y, val_x, val_y, params=params,
                                     checkpoint=model_dir / layout.MODEL_FILE, callbacks=[log_epoch])
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
