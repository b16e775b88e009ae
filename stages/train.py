"""Stage 6, train: a Keras CNN (or an ensemble of them) on the augmented training split, kept and
calibrated on the validation split.

Inputs: ``paths.deid_dir``/images.npy with the split manifest (training and validation images),
and the reports logged with the run.
Outputs: ``paths.model_dir``/model.keras (the kept epoch of each network, by ``train.keep``:
lowest validation loss by default; its batch-normalisation statistics re-estimated over the
training images; its temperature fitted on validation; ``train.ensemble`` networks averaged),
``paths.model_dir``/mlflow_run.json (the run evaluate continues) and the per-epoch history
``paths.train_history`` (a DVC plot: loss, AUC, accuracy, Brier and ECE on training batches
and on validation). Everything is also logged to one MLflow run.
Params: ``train.*``, ``augment.*`` (the policy applied to training batches), ``ingest.classes``
(two: a sigmoid output; more: softmax), ``ingest.image_size`` and ``ingest.channels`` (the input);
every param of ``params.yaml`` but ``evaluate.*`` is logged to MLflow.

A model that is degenerate on the validation split (constant scores; with more than two classes,
every image called one class: :func:`dicomflow.model.scoring.degeneracy`; the operating threshold of two
classes is evaluate's to choose and check) fails the stage: its run is marked FAILED and tagged
with what was seen, and nothing downstream registers it.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

from dicomflow import tracking
from dicomflow.config import layout
from dicomflow.config.params import load_params, read_params_file
from dicomflow.model import architectures as models
from dicomflow.model import scoring
from dicomflow.model.training import (
    RESUME_SUFFIX,
    check_input_shape,
    is_chief,
    load_split,
    make_strategy,
    train_ensemble,
)
from dicomflow.runtime.stage import StageError, run_stage

logger = logging.getLogger(__name__)


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
    fit = functools.partial(train_ensemble, train_x, train_y, val_x, val_y, params=params,
                            n_classes=len(ingest.classes), augment=augment, strategy=strategy)
    logger.info("training %d x %s on %s, validating on %s, %d classes, %d replica(s)", params.ensemble,
                params.architecture, train_x.shape, val_x.shape, len(ingest.classes),
                strategy.num_replicas_in_sync)
    if not is_chief(strategy):
        # A multi-worker task trains in step with the chief, which alone writes and logs.
        fit(checkpoint=None)
        return

    tracking.configure_mlflow()
    with mlflow.start_run(run_name=tracking.run_name("train"), tags=tracking.run_tags()) as run:
        # evaluate.* is logged by the evaluate stage's nested run, which reruns without training.
        logged = {section: values for section, values in read_params_file().items() if section != "evaluate"}
        mlflow.log_params(tracking.flatten_params(logged))
        logged_epochs: set[tuple[int, int]] = set()

        def metric_name(member: int, name: str) -> str:
            return name if params.ensemble == 1 else f"member_{member}_{name}"

        def log_epoch(member: int, epoch: int, row: dict[str, float]) -> None:
            mlflow.log_metrics({metric_name(member, name): value for name, value in row.items()
                                if name not in ("epoch", "member", "kept")}, step=epoch)
            logged_epochs.add((member, epoch))

        # A multi-worker run cannot resume: every worker would have to find the same state.
        resume_dir = None if params.strategy == "multi_worker" else model_dir.with_name(
            model_dir.name + RESUME_SUFFIX)
        model, history = fit(checkpoint=model_dir / layout.MODEL_FILE, on_epoch_end=log_epoch,
                             resume_dir=resume_dir)
        for row in history.to_dict("records"):  # epochs a killed run trained, into this run too
            if (int(row["member"]), int(row["epoch"])) not in logged_epochs:
                log_epoch(int(row["member"]), int(row["epoch"]), row)
        Path(paths.train_history).parent.mkdir(parents=True, exist_ok=True)
        history.to_csv(paths.train_history, index=False)

        # The model as saved (kept epochs, calibrated, members averaged) on the validation split.
        val_probabilities = models.predict_probabilities(model, val_x)
        final = scoring.classification_scores(val_y, val_probabilities)
        uncalibrated = scoring.classification_scores(
            val_y, models.predict_probabilities(model, val_x, calibrated=False))
        kept = history.loc[history["kept"], "epoch"].astype(int).tolist()
        summary = {**{f"model_val_{name}": value for name, value in final.items()},
                   "model_val_ece_uncalibrated": uncalibrated["ece"],
                   "model_val_brier_uncalibrated": uncalibrated["brier"]}
        for member, (network, epoch) in enumerate(zip(models.members_of(model), kept)):
            summary[metric_name(member, "temperature")] = models.temperature_of(network)
            summary[metric_name(member, "kept_epoch")] = epoch
        mlflow.log_metrics(summary)
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
        problems = scoring.degeneracy(val_y, val_probabilities)
        (model_dir / layout.RUN_INFO).write_text(json.dumps(
            {"run_id": run.info.run_id, "model_uri": model_info.model_uri, "degenerate": problems},
            indent=2) + "\n")
        if problems:
            mlflow.set_tag(tracking.DEGENERATE_TAG, "; ".join(problems))
    logger.info("validation (model as saved): AUC %.3f, loss %.3f, Brier %.4f, ECE %.4f (uncalibrated "
                "%.4f); kept epoch(s) %s; MLflow run %s", final["auc"], final["loss"], final["brier"],
                final["ece"], uncalibrated["ece"], kept, run.info.run_id)
    if problems:
        mlflow.MlflowClient().set_terminated(run.info.run_id, status="FAILED")
        raise StageError(f"the trained model is degenerate on the validation split: {'; '.join(problems)}. "
                         f"The MLflow run {run.info.run_id} is marked FAILED and nothing will be "
                         "registered; see the history in " + paths.train_history)


if __name__ == "__main__":
    run_stage(main)
