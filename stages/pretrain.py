"""Stage 6, pretrain: an encoder learnt without labels (SimCLR), for train to start from.

Inputs: ``paths.deid_dir``/images.npy and the split manifest (``paths.split_dir``): the images of
the training split and of the unlabelled split (``ingest.unlabelled: pretrain``); no label is read.
Outputs: ``paths.pretrain_dir``/pretrain.json (method, image count, the images' version, the params,
the encoder file's sha256) and, with ``pretrain.method: simclr``, encoder.keras (the classifier's
layers up to ``features``, its layer names, the same bytes for the same weights); the per-epoch
history ``paths.pretrain_history`` (loss and positive-pair top-1; header only with method none;
the seconds per epoch go to MLflow and the log only, so the same inputs give the same report).
With simclr everything is also logged to one MLflow run tagged with the encoder's sha256, by
which train finds it.
Params: ``pretrain.*``, ``train.architecture`` (the encoder's network), ``train.strategy``,
``augment.*`` (the views' policy), ``ingest.image_size`` and ``ingest.channels``.

With ``pretrain.method: none`` (the default) the stage trains nothing and imports no TensorFlow:
it writes the record ``{"method": "none"}`` and the empty history in well under a second.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow import tracking
from dicomflow.config import layout
from dicomflow.config.params import load_params, read_params_file
from dicomflow.runtime.outputs import staged_folder, write_json, write_text
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)

# Here and not in dicomflow.model.pretraining: that module imports the model code, which the
# method-none path has no use for. Kept equal to its REPORT_COLUMNS (tested).
HISTORY_HEADER = "epoch,loss,positive_top1\n"


def pretraining_rows(manifest: pd.DataFrame) -> np.ndarray:
    """The rows (of the manifest and of the images) pretraining reads: the training split's and
    the unlabelled split's, in manifest order."""
    return np.flatnonzero(manifest["split"].isin(["train", layout.UNLABELLED_SPLIT]).to_numpy())


def main() -> None:
    paths, params = load_params("paths"), load_params("pretrain")
    out_dir, history_path = Path(paths.pretrain_dir), Path(paths.pretrain_history)
    if params.method == "none":
        with staged_folder(out_dir, what="the pretrain record") as staging:
            write_json(staging / layout.PRETRAIN_RECORD, {"method": "none"})
        write_text(history_path, HISTORY_HEADER)
        logger.info("pretrain.method is none: no encoder")
        return

    import mlflow

    from dicomflow.model.architectures import to_model_input
    from dicomflow.model.pretraining import REPORT_COLUMNS, images_version, pretrain_encoder, run_ops_one_at_a_time
    from dicomflow.model.saving import save_model
    from dicomflow.model.training import RESUME_SUFFIX, check_input_shape, make_strategy

    train, augment, ingest = load_params("train"), load_params("augment"), load_params("ingest")
    run_ops_one_at_a_time()  # before the strategy starts TensorFlow: the same encoder every run
    strategy = make_strategy(train.strategy)
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    rows = pretraining_rows(manifest)
    images = to_model_input(np.asarray(np.load(Path(paths.deid_dir) / layout.IMAGES, mmap_mode="r")[rows]))
    check_input_shape(images, ingest)
    logger.info("pretraining a %s encoder (%s) on %s images, %d replica(s)", train.architecture, params.method,
                images.shape, strategy.num_replicas_in_sync)

    tracking.configure_mlflow()
    with mlflow.start_run(run_name=tracking.run_name("pretrain"), tags=tracking.run_tags()):
        mlflow.log_params(tracking.select_params(read_params_file(), tracking.PRETRAINING_PARAMS))
        logged = set()

        def log_epoch(epoch: int, row: dict[str, float]) -> None:
            mlflow.log_metrics({name: value for name, value in row.items() if name != "epoch"}, step=epoch)
            logged.add(epoch)

        encoder, history = pretrain_encoder(images, params=params, architecture=train.architecture,
                                            augment=augment, strategy=strategy, on_epoch_end=log_epoch,
                                            resume_dir=out_dir.with_name(out_dir.name + RESUME_SUFFIX))
        for row in history.to_dict("records"):  # the epochs a killed run trained before this one resumed
            if int(row["epoch"]) not in logged:
                log_epoch(int(row["epoch"]), row)
        with staged_folder(out_dir, what="the encoder") as staging:
            save_model(encoder, staging / layout.ENCODER_FILE)  # no save time in it: same weights, same bytes
            digest = tracking.file_sha256(staging / layout.ENCODER_FILE)
            write_json(staging / layout.PRETRAIN_RECORD, {
                "method": params.method, "images": len(rows),
                "data_version": images_version(manifest["pixel_sha256"].iloc[rows]),
                "architecture": train.architecture, "params": dataclasses.asdict(params),
                "encoder_sha256": digest})
        write_text(history_path, history[list(REPORT_COLUMNS)].to_csv(index=False))  # no seconds: same bytes
        mlflow.set_tag(tracking.ENCODER_DIGEST_TAG, digest)
        with tracking.artifact_writes("the encoder and the pretraining history"):
            mlflow.log_artifact(str(out_dir / layout.ENCODER_FILE), artifact_path="encoder")
            mlflow.log_artifact(str(out_dir / layout.PRETRAIN_RECORD), artifact_path="encoder")
            mlflow.log_artifact(str(history_path), artifact_path="reports")
    logger.info("encoder saved: %s (sha256 %s), final loss %.4f", out_dir / layout.ENCODER_FILE, digest[:16],
                history["loss"].iloc[-1])


if __name__ == "__main__":
    run_stage(main)
