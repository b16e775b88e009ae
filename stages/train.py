"""Stage 7, train: a Keras CNN (or an ensemble of them) on the augmented training split, kept and
calibrated on the validation split.

Inputs: ``paths.deid_dir``/images.npy with the split manifest (training and validation images).
Outputs: ``paths.model_dir``/model.keras (the kept epoch of each network, by ``train.keep``:
lowest validation loss by default; its batch-normalisation statistics re-estimated over the
training images; its temperature fitted on validation; ``train.ensemble`` networks averaged;
the same bytes for the same weights: no save time in it) and the per-epoch history
``paths.train_history`` (a DVC plot: loss, AUC, accuracy, Brier and ECE on training batches
and on validation) with its curves as a PNG, ``paths.train_curves``. Everything is also logged
to one MLflow run, with the split counts of the images it trained and validated on (the
data-quality reports are DVC's: ``reports/``, versioned with the data, so restyling one never
retrains the model); the run is tagged with the model file's sha256, by which evaluate finds it
(no run id is written beside the model: every run would give ``outputs/model`` a new DVC hash).
Params: ``train.*``, ``augment.*`` (the policy applied to training batches), ``ingest.classes``
(``train.task``: binary, two classes and a sigmoid output; multiclass, more and a softmax; ordinal,
more, the grades in this order, and a continuation-ratio head: :mod:`dicomflow.model.architectures`;
checked before anything is read: ``check_task``),
``ingest.image_size`` and ``ingest.channels`` (the input), or with ``ingest.unit: series``
``ingest.series.volume_size`` (volumes, for ``resnet3d_small`` or ``attention_mil`` only: ``check_architecture``);
these and ``split.*`` (what it trained on) are logged to MLflow (:data:`dicomflow.tracking.TRAINING_PARAMS`).

With ``train.privacy.enabled`` the network is trained by DP-SGD (:mod:`dicomflow.model.privacy`;
docs/privacy.md): the guarantee (ε, δ, σ, steps, ...) is logged as ``privacy.*`` params and written
beside the model, ``paths.model_dir``/privacy.json (:data:`dicomflow.config.layout.PRIVACY_FILE`).

Where the weights start, ``train.init`` (:mod:`dicomflow.model.transfer`): ``scratch``; ``pretrain``,
the pretrain stage's encoder (``paths.pretrain_dir``); or a registered model, ``models:/NAME@ALIAS``,
``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``, verified by its signature. The source is read and
checked before anything trains, and where it came from is tagged on the run (``dicomflow.init*``).

A model that is degenerate on the validation split (constant scores; with more than two classes,
every image called one class: :func:`dicomflow.model.scoring.degeneracy`; the operating threshold of two
classes is evaluate's to choose and check) fails the stage: its run is marked FAILED and tagged
with what was seen, and nothing downstream registers it.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow import tracking
from dicomflow.config import layout
from dicomflow.config.params import TrainParams, check_architecture, check_task, load_params, read_params_file
from dicomflow.model import architectures as models
from dicomflow.model import scoring
from dicomflow.model.curves import write_training_curves
from dicomflow.model.privacy import privacy_guarantee
from dicomflow.model.transfer import load_initial_weights
from dicomflow.model.training import (
    RESUME_SUFFIX,
    check_input_shape,
    is_chief,
    make_strategy,
    split_arrays,
    train_ensemble,
    validation_summary,
)
from dicomflow.runtime.outputs import write_json, write_text
from dicomflow.errors import DataError
from dicomflow.runtime.stage import run_stage
from dicomflow.splitting import count_by_split

logger = logging.getLogger(__name__)


def record_privacy(params: TrainParams, history: pd.DataFrame, *, patients: np.ndarray, model_dir: Path) -> None:
    """The DP-SGD run's guarantee, over every step it ran, as MLflow params and beside the model."""
    import mlflow

    guarantee = privacy_guarantee(params, n_images=len(patients), steps=int(history["steps"].max()),
                                  patients=patients)
    mlflow.log_params(guarantee.as_params())
    write_json(model_dir / layout.PRIVACY_FILE, guarantee.as_record())
    logger.info("differential privacy: (%.3g, %.3g)-DP per %s over %d steps (noise multiplier %.3f, clip %.3g); "
                "per patient epsilon %s", guarantee.epsilon, guarantee.delta, guarantee.unit, guarantee.steps,
                guarantee.noise_multiplier, guarantee.max_grad_norm, guarantee.patient_epsilon)


def main() -> None:
    import mlflow

    paths, params = load_params("paths"), load_params("train")
    augment, ingest = load_params("augment"), load_params("ingest")
    # evaluate.referable_grade is evaluate's to check: read here, changing it would retrain the model.
    check_task(params.task, ingest.classes)
    check_architecture(params.architecture, ingest.unit)
    strategy = make_strategy(params.strategy)
    model_dir = Path(paths.model_dir)
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(Path(paths.deid_dir) / layout.IMAGES, mmap_mode="r")
    train_x, train_y = split_arrays(manifest, images, "train", ingest.classes)
    val_x, val_y = split_arrays(manifest, images, "val", ingest.classes)
    check_input_shape(train_x, ingest)
    patients = manifest["patient_key"].to_numpy()[layout.split_rows(manifest, "train")]  # the unit of privacy
    if params.init.startswith(("models:/", "runs:/")):
        tracking.configure_mlflow()  # the registry the source is read from
    # Read and checked before anything trains: a source that cannot be used stops the stage here.
    initial = load_initial_weights(params.init, input_shape=train_x.shape[1:], pretrain_dir=Path(paths.pretrain_dir))
    fit = functools.partial(train_ensemble, train_x, train_y, val_x, val_y, params=params,
                            n_classes=len(ingest.classes), augment=augment, strategy=strategy, initial=initial,
                            groups=patients)
    logger.info("training %d x %s on %s, validating on %s, %s task, %d classes, %d replica(s)", params.ensemble,
                params.architecture, train_x.shape, val_x.shape, params.task, len(ingest.classes),
                strategy.num_replicas_in_sync)
    if not is_chief(strategy):
        # A multi-worker task trains in step with the chief, which alone writes and logs.
        fit(checkpoint=None)
        return

    tracking.configure_mlflow()
    with mlflow.start_run(run_name=tracking.run_name("train"), tags=tracking.run_tags()) as run:
        # What a person compares; evaluate.* is logged by the evaluate stage's nested run.
        mlflow.log_params(tracking.training_params(read_params_file()))
        if initial is not None:  # where the weights came from: evaluate copies it to the registered version
            mlflow.set_tags(initial.lineage)
        with tracking.artifact_writes("the split counts and dataset inputs"):  # a full disk: one line
            mlflow.log_text(count_by_split(manifest).to_csv(index=False), "data/split_counts.csv")
            tracking.log_dataset_inputs(manifest, source=str(Path(paths.split_dir) / layout.SPLIT_MANIFEST),
                                        contexts={"train": "training", "val": "validation"})
        log_epoch = tracking.EpochLogger(params.ensemble)
        # A multi-worker run cannot resume: every worker would have to find the same state.
        resume_dir = None if params.strategy == "multi_worker" else model_dir.with_name(
            model_dir.name + RESUME_SUFFIX)
        model, history = fit(checkpoint=model_dir / layout.MODEL_FILE, on_epoch_end=log_epoch,
                             resume_dir=resume_dir)
        log_epoch.log_missing(history)
        if params.privacy.enabled:
            record_privacy(params, history, patients=patients, model_dir=model_dir)
        if initial is not None and initial.source_training_data is not None:
            # What the source model trained on: evaluate leaves it out of the promotion comparison.
            write_json(model_dir / layout.INHERITED_TRAINING_DATA,
                       {"source": "models:/{}/{}".format(initial.lineage["dicomflow.init.source_model"],
                                                         initial.lineage["dicomflow.init.source_version"]),
                        **initial.source_training_data})
        mlflow.set_tag(tracking.MODEL_DIGEST_TAG, tracking.file_sha256(model_dir / layout.MODEL_FILE))
        write_text(Path(paths.train_history), history.to_csv(index=False))
        write_training_curves(history, Path(paths.train_curves))
        with tracking.artifact_writes("the training history and curves"):
            for report in (paths.train_history, paths.train_curves):
                mlflow.log_artifact(report, artifact_path="reports")
        summary = validation_summary(model, val_x, val_y, history, metric_name=log_epoch.metric_name, task=params.task)
        mlflow.log_metrics(summary)
        tracking.log_keras_model(model, val_x[:2])
        problems = scoring.degeneracy(val_y, models.predict_probabilities(model, val_x), task=params.task)
        if problems:
            mlflow.set_tag(tracking.DEGENERATE_TAG, "; ".join(problems))
    logger.info("validation (model as saved): AUC %.3f, loss %.3f, Brier %.4f, ECE %.4f (uncalibrated "
                "%.4f); kept epoch(s) %s; MLflow run %s", summary["model_val_auc"], summary["model_val_loss"],
                summary["model_val_brier"], summary["model_val_ece"], summary["model_val_ece_uncalibrated"],
                history.loc[history["kept"], "epoch"].astype(int).tolist(), run.info.run_id)
    if problems:
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
        raise DataError(f"the trained model is degenerate on the validation split: {'; '.join(problems)}. "
                         f"The MLflow run {run.info.run_id} is marked FAILED and nothing will be "
                         "registered; see the history in " + paths.train_history)


if __name__ == "__main__":
    run_stage(main)
