"""Stage 8, evaluate: honest test-split metrics, DVC plots, and the model registered in MLflow.

Inputs: ``paths.model_dir`` (the model; its MLflow training run is found by the file's sha256;
its ``privacy.json``, the DP guarantee, when train used DP-SGD), the split manifest and
de-identified images (the training images too: the membership attack's members),
and deidentify's ``secret_fingerprint.json`` (tagged on the runs and the version, stated on the
model card; "not recorded" without it).
Outputs: ``paths.eval_metrics`` (the headline test metrics, DVC metrics), ``paths.eval_report``
(every test metric, interval and count), ``paths.eval_plots`` (ROC,
confusion-matrix, precision-recall and calibration data for ``dvc plots show``, PNG renderings
and a Grad-CAM grid) and ``paths.eval_subgroups`` (metrics by sex, age band, manufacturer and
view position); all logged to MLflow.
Params: ``evaluate.*``; ``train.task`` (binary; multiclass: macro AUC and per-class metrics, each
image called its most probable class; ordinal: the same with each image called its median grade,
quadratic weighted kappa, grade error, and with ``evaluate.referable_grade`` the referable AUC,
sensitivity and specificity at a threshold chosen on validation); ``evaluate.level`` (``image``;
``study``: each study's images combined by ``evaluate.study_aggregation``, every figure, the report's
threshold and the registration floor's AUC per study, :mod:`dicomflow.evaluation.studies`);
``ingest.classes`` and the ``ingest`` pixel settings the registered model carries.
With ``ingest.unit: series`` (CT) a row is a series' volume carrying its study's label: every figure
is per series (``level`` ``series`` in the report), ``test_predictions.csv`` has a row per series,
the Grad-CAM figure is a montage of each picked volume's most activated slices at their positions in
mm (``ingest.series.spacing_mm[0]`` apart; attention MIL: its highest-weighted slices), and the
registered pyfunc states its volume and refuses single DICOM files (a series is served later); the
candidate is scored for promotion on the de-identified validation volumes, and with a champion it is
``challenger`` with the reason (a champion is run on files).
Environment: the de-identification secret (the leak check's digests), the signing key (each new
version is signed) and the verify key (the champion): :mod:`dicomflow.signing`.

A membership-inference attack (:mod:`dicomflow.evaluation.membership`: the loss threshold,
training images against test images) is reported with the test metrics, with the lower bound on ε
it proves; when that bound exceeds the ε the model's ``privacy.json`` accounts, the reports are
written and the stage fails: a bug in the DP training, not a privacy result.

The operating threshold is chosen on the validation split, never on test, so the test figures are
what a user of the model would see; test Brier and ECE are reported with and without the
calibration the model carries, beside a reliability diagram. A model that is degenerate on the
validation split (constant scores, every image called one class, a threshold outside [0.01,
0.99]; :func:`dicomflow.model.scoring.degeneracy`) gets its report, its runs marked FAILED in MLflow, and
is never registered. Otherwise the registered model is a pyfunc (:mod:`dicomflow.serving.pyfunc`) that takes
DICOM files, applies this threshold (an ordinal model's: the referable threshold) and refuses files
outside its training domain. Before it is
registered, the leak scanner searches the MLflow run (params, tags, metric names, artifacts, the
models' files) for every identifying value of the ingested sources, through the keyed digests
deidentify wrote (``identifier_digests.json``: this stage never reads ``data/`` or ingest's index);
any hit fails the stage and nothing is registered.

A model is registered only when its validation ROC AUC reaches ``evaluate.min_validation_auc``
and no complete version holds the same model (its weights, threshold, classes, pixel settings and
training images: :func:`dicomflow.evaluation.registry.model_digest`); otherwise one line says why,
on both counts, and the evaluate run records it (``registration_decision``); the stage succeeds.
With ``evaluate.require_privacy`` (a cap on ε) a model above the cap, or trained without DP, is
registered as ``challenger`` with the reason, never ``champion``.

Promotion never looks at the test split: the candidate and the registry's current champion are
both run, as registered, on the de-identified files of the validation split that the champion did
not train on (the digests of its training images are in its signed ``training_data.json``), and
compared on ``evaluate.promotion_metric``; the candidate takes the alias ``champion`` when it beats
the champion by at least ``evaluate.promotion_min_gain``, else ``challenger`` (a replaced champion
keeps its version, as ``previous_champion``). The champion runs only from a copy whose signature
verified, in a process without secrets; one that is unsigned, altered, cannot be scored, or leaves
too few fair images makes the candidate ``challenger`` with the reason. The decision, both figures
and the images they were measured on are tags of the new version, which is signed before an alias
moves to it. The MLflow writes, in order, are the body of :func:`main`; their kill-safe order is
described in :mod:`dicomflow.evaluation.registry`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow import tracking
from dicomflow.config import layout
from dicomflow.config.params import check_task, load_params, read_params_file
from dicomflow.deid.secret import read_secret
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.series import VolumeSettings
from dicomflow.errors import DataError
from dicomflow.evaluation import registry
from dicomflow.evaluation.membership import check_privacy_claim, privacy_figures
from dicomflow.evaluation.metrics import choose_operating_points, headline, loggable, roc_auc
from dicomflow.evaluation.model_card import CARD_FILE, model_card, registry_description
from dicomflow.evaluation.promotion import (
    PROMOTION_SPLIT,
    check_card,
    check_run,
    compare_volume_model,
    compare_with_champion,
    inherit_training_data,
    promotion_files,
    read_secret_fingerprint,
    require_privacy,
    score_candidate,
    score_candidate_volumes,
    training_data_record,
)
from dicomflow.evaluation.reporting import attack_membership, report_test_split
from dicomflow.evaluation.studies import at_level, served_thresholds, study_aggregation
from dicomflow.metrics import Scores, metric_for
from dicomflow.model import transfer
from dicomflow.model.architectures import predict_probabilities
from dicomflow.model.scoring import degeneracy
from dicomflow.model.training import split_arrays
from dicomflow.runtime.outputs import write_json, write_text
from dicomflow.runtime.stage import run_stage
from dicomflow.serving.domain import TrainingDomain
from dicomflow.serving.pyfunc import serving_example
from dicomflow.signing import signing_key_from_env, verify_key_from_env

logger = logging.getLogger(__name__)


def main() -> None:
    import keras
    import mlflow

    paths, params, ingest = load_params("paths"), load_params("evaluate"), load_params("ingest")
    train = load_params("train")
    task, grade = train.task, params.referable_grade
    check_task(task, ingest.classes, referable_grade=grade)
    model_dir, deid_dir = Path(paths.model_dir), Path(paths.deid_dir)
    model = keras.models.load_model(model_dir / layout.MODEL_FILE)
    manifest = pd.read_parquet(Path(paths.split_dir) / layout.SPLIT_MANIFEST)
    images = np.load(deid_dir / layout.IMAGES, mmap_mode="r")
    metric_for(params.promotion_metric, task=task, referable=grade is not None, promotion=True,
               setting="evaluate.promotion_metric")
    val_x, val_y = split_arrays(manifest, images, "val", ingest.classes)
    test_x, test_y = split_arrays(manifest, images, "test", ingest.classes)
    # ingest.unit series: a row is a series' volume (n, d, h, w, 1), scored as one example with its
    # study's label; its slices sit ingest.series.spacing_mm[0] apart (the stored, resampled volume).
    volumes = images.ndim == 5
    spacing_z = ingest.series.spacing_mm[0] if volumes else None
    logger.info("loaded the model; scoring %d validation and %d test %s", len(val_y), len(test_y),
                "series (volumes)" if volumes else "images")

    val_score = predict_probabilities(model, val_x)
    # The operating thresholds, chosen on validation (evaluate.threshold_method): of class 1 (binary),
    # or of the referable probability (ordinal with evaluate.referable_grade); None otherwise.
    options = dict(task=task, classes=ingest.classes, referable_grade=grade, method=params.threshold_method,
                   fixed=params.fixed_threshold, target_sensitivity=params.target_sensitivity)
    # Per image: what the served model calls each file at (and what the degeneracy check reads).
    threshold, referable_threshold = choose_operating_points(val_y, val_score, **options)
    # evaluate.level: the report's thresholds are chosen on validation images, or on validation
    # studies (each study's images combined); the registration floor reads the same level's AUC.
    study = study_aggregation(params.level, params.study_aggregation, k=params.study_top_k)
    scored_y, scored = at_level(val_y, val_score, manifest.iloc[layout.split_rows(manifest, "val")], study=study)
    report_threshold, report_referable = choose_operating_points(scored_y, scored, **options)
    val_auc = validation_auc(scored_y, scored, task=task)  # against evaluate.min_validation_auc
    metrics, plot_files, subgroups = report_test_split(
        model, test_y, test_x, manifest.iloc[layout.split_rows(manifest, "test")], threshold=report_threshold,
        classes=ingest.classes, plots_dir=Path(paths.eval_plots), task=task, referable_grade=grade,
        referable_threshold=report_referable, study=study, spacing_mm=spacing_z)
    privacy = layout.read_privacy_record(model_dir)  # None: trained without differential privacy
    attack = attack_membership(model, manifest, images, test_x, test_y, classes=ingest.classes, privacy=privacy)
    metrics.update({**attack.as_report(), **privacy_figures(privacy), **served_thresholds(
        study, threshold=threshold, referable_threshold=referable_threshold)})
    write_json(Path(paths.eval_metrics), headline(metrics))
    write_json(Path(paths.eval_report), metrics)
    write_text(Path(paths.eval_subgroups), subgroups.to_csv(index=False, float_format="%.4f"))
    check_privacy_claim(attack.bound, privacy, source=str(model_dir / layout.PRIVACY_FILE))
    tracking.configure_mlflow()
    client = mlflow.MlflowClient()
    trained = tracking.training_run_for(model_dir / layout.MODEL_FILE, client)
    logger.info("evaluating the model of training run %s", trained.info.run_id)
    lineage = transfer.lineage_of(trained.data.tags)  # where its weights started
    problems = [*filter(None, trained.data.tags.get(tracking.DEGENERATE_TAG, "").split("; ")),
                *degeneracy(val_y, val_score, threshold=threshold, task=task)]

    # What the registered model is, what it trained on, and which secret made its data.
    name, training_run = params.registered_model_name, trained.info.run_id
    # The served model's operating thresholds: class 1's (binary), the referable probability's (ordinal).
    registered = dict(threshold=threshold, classes=ingest.classes, settings=PixelSettings.from_params(ingest),
                      domain=TrainingDomain.from_manifest(manifest.iloc[layout.split_rows(manifest, "train")]),
                      task=task, referable_grade=grade, referable_threshold=referable_threshold,
                      volume={**dataclasses.asdict(VolumeSettings.from_params(ingest)), "policy": ingest.series.policy,
                              "min_slices": ingest.series.min_slices} if volumes else None)
    # What `dicomflow predict --per-study` combines a study's files with and calls it at (level study).
    per_study = study and study.as_metadata(threshold=report_threshold, referable_threshold=report_referable)
    record = training_data_record(manifest, data_version=tracking.data_version(),
                                  pixel_settings=dataclasses.asdict(registered["settings"]))
    inherited = model_dir / layout.INHERITED_TRAINING_DATA  # weights from a registered model: what it saw
    record, unknown_inherited = inherit_training_data(
        record, json.loads(inherited.read_text(encoding="utf-8")) if inherited.is_file() else None)
    digest = registry.model_digest(model.get_weights(), training_data=record, classes=ingest.classes,
                                   threshold=threshold if referable_threshold is None else referable_threshold,
                                   study=per_study)
    # (the same model is never registered twice; a task has one of the two thresholds)
    secret_tags = read_secret_fingerprint(deid_dir / layout.DEID_SECRET_FINGERPRINT)
    key = registry.evaluation_key(training_run, read_params_file()["evaluate"])
    test_metrics = {f"test_{metric}": value for metric, value in loggable(metrics).items()}
    # The model card's content but for what registration decides (version, alias, decision).
    subgroups = pd.read_csv(paths.eval_subgroups, keep_default_na=False, na_values=[""], dtype={"group": str})
    card = functools.partial(
        model_card, name=name, manifest=manifest, data_version=record["data_version"], metrics=metrics,
        subgroups=subgroups, domain=registered["domain"], threshold=report_threshold,
        referable_threshold=report_referable, ingest=ingest, evaluate=params,
        train=train, augment=load_params("augment"), secret=secret_tags,
        validation=registry.training_validation_metrics(client, training_run), lineage=lineage, privacy=privacy)

    # The MLflow writes, in order. The training run is never reopened (a failed evaluate cannot
    # mark it FAILED); its evaluation is a run of its own, nested under it.
    registry.end_stale_runs(client, training_run)
    registry.log_to_training_run(client, training_run, test_metrics, tags=secret_tags)
    with mlflow.start_run(run_name="evaluate", parent_run_id=training_run,
                          experiment_id=client.get_run(training_run).info.experiment_id,
                          tags={**tracking.run_tags(), **secret_tags, registry.STAGE_TAG: "evaluate"}) as run:
        mlflow.log_params(tracking.flatten_params({"evaluate": read_params_file()["evaluate"]}))
        tracking.log_dataset_inputs(manifest, source=str(Path(paths.split_dir) / layout.SPLIT_MANIFEST),
                                    contexts={"test": "testing", "val": "validation"})
        mlflow.log_metrics(test_metrics)
        registry.log_files([*plot_files, Path(paths.eval_report), Path(paths.eval_subgroups)],
                           artifact_path="evaluation")
        mlflow.log_metric("val_roc_auc", val_auc)
        found = None if problems else registry.find_version(client, name, key)
        register = True
        if found is None and not problems:  # a new evaluation: above the floor, and not a model registered already
            same = registry.find_same_model(client, name, digest)
            register, decision = registry.registration_decision(
                val_auc, floor=params.min_validation_auc, digest=digest, same_version=same and str(same.version))
            logger.info("%s", decision)
            mlflow.set_tags({registry.DECISION_TAG: decision, registry.MODEL_DIGEST_TAG: digest})
        if problems:
            mlflow.set_tag(tracking.DEGENERATE_TAG, "; ".join(problems))
        elif not register:
            pass  # the decision is logged and on this run; the reports stand
        elif found is not None and registry.is_complete(found):
            logger.info("this evaluation is registered already: %s version %s", name, found.version)
            mlflow.set_tags({"registered_version": found.version, "registered_alias": found.tags[registry.ALIAS_TAG]})
        else:
            signing_key, verify_key = signing_key_from_env(os.environ), verify_key_from_env(os.environ)
            if found is None:  # a new version: log, leak-check, compare (the decision, once), create
                info = registry.log_candidate(model_dir / layout.MODEL_FILE, training_data=record, **registered,
                                              input_example=serving_example(registered["domain"]), privacy=privacy,
                                              study=per_study)
                digests, secret = deid_dir / layout.DEID_IDENTIFIER_DIGESTS, read_secret(os.environ)[0]
                check_run(training_run, digests_file=digests, secret=secret)
                promotion = promotion_files(manifest, deid_dir, classes=ingest.classes)
                champion = registry.current_champion(client, name)
                # Each scoring decodes every file as served: tens of seconds, so each is a milestone.
                logger.info("promotion: scoring the candidate on %d validation files as registered",
                            len(promotion["files"]))
                if volumes:  # the pyfunc reads no series yet: scored on the de-identified volumes
                    candidate_answers = score_candidate_volumes(
                        model_dir / layout.MODEL_FILE, images[layout.split_rows(manifest, PROMOTION_SPLIT)],
                        promotion["files"], **registered)
                else:
                    candidate_answers = score_candidate(model_dir / layout.MODEL_FILE, promotion["files"],
                                                        **registered)
                if champion is not None and not volumes:
                    logger.info("promotion: scoring champion version %s on the same files, in a process "
                                "of its own", champion)
                comparison = (compare_volume_model if volumes else compare_with_champion)(
                    candidate_answers,
                    champion_version=champion, champion_uri=f"models:/{name}/{champion}", verify_key=verify_key,
                    metric=params.promotion_metric, task=task, referable_grade=grade,
                    data_version=record["data_version"],
                    pixel_settings=record["pixel_settings"], candidate_seen=frozenset(record["pixel_sha256"]),
                    candidate_unknown=unknown_inherited, **promotion)
                alias, decision = require_privacy(*comparison.decide(min_gain=params.promotion_min_gain), privacy,
                                                  cap=params.require_privacy)
                logger.info("promotion: %s", decision)
                draft = card(version=None, alias=alias, decision=decision, excluded=comparison.excluded)
                check_card(draft, digests_file=digests, secret=secret, name=CARD_FILE)
                tags = registry.version_tags(comparison, alias=alias, decision=decision, key=key,
                                             training_run_id=training_run, training_data=record, metrics=metrics,
                                             secret=secret_tags, digest=digest, lineage=lineage)
                version = registry.create_version(client, name, info, run_id=run.info.run_id, tags=tags)
                found = client.get_model_version(name, version)
            # Complete the version, this run's or a killed run's, with the decision it was created with.
            version, tags = str(found.version), found.tags
            text = card(version=version, alias=tags[registry.ALIAS_TAG],
                              decision=tags["promotion_decision"], excluded=int(tags.get("promotion_excluded", 0)))
            registry.log_text(text, CARD_FILE)
            registry.describe_version(client, name, version, registry_description(
                text, where=f"the {CARD_FILE} artifact of run {run.info.run_id}"))
            registry.sign_version(name, version, key=signing_key)
            registry.move_aliases(client, name, version, alias=tags[registry.ALIAS_TAG],
                                  replaced=tags.get("promotion_champion_version") or None)
            registry.mark_complete(client, name, version)
            mlflow.set_tags({"registered_version": version, "registered_alias": tags[registry.ALIAS_TAG]})
    if problems:
        registry.mark_failed(client, [training_run, run.info.run_id])
        raise DataError(f"the model is degenerate on the validation split (validation AUC "
                         f"{roc_auc(val_y, val_score):.3f}): {'; '.join(problems)}. Its runs are marked "
                         f"FAILED and it is not registered; the test report is in {paths.eval_report}")


def validation_auc(labels: np.ndarray, probabilities: np.ndarray, *, task: str) -> float:
    """The task's ROC AUC (:func:`dicomflow.metrics.metric_for`; macro for more than two classes) on
    validation; NaN when it has one class."""
    auc = metric_for("roc_auc", task=task, setting="evaluate.min_validation_auc")
    if len(np.unique(labels)) < 2:
        return float("nan")
    return auc.compute(Scores.at_threshold(labels, probabilities))


if __name__ == "__main__":
    run_stage(main)
