"""Registering a model and deciding its alias: candidate and champion compared on the validation
split (never the test split), with a minimum gain; and the leak check of the run first.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from dicomflow import tracking
from dicomflow.config import layout
from dicomflow.config.params import AugmentParams, TrainParams
from dicomflow.deid.digests import read_digests
from dicomflow.deid.secret import read_secret
from dicomflow.deid.leaks import scan_mlflow_run, scan_paths
from dicomflow.dicom.display import PixelSettings
from dicomflow.evaluation.model_card import CARD_FILE, model_card, registry_description
from dicomflow.model.architectures import class_indices
from dicomflow.errors import DataError
from dicomflow.metrics import Scores, gain, metric_for
from dicomflow.serving.domain import TrainingDomain
from dicomflow.serving.pyfunc import PATH_EXAMPLE, DicomClassifier, log_classifier

logger = logging.getLogger(__name__)


PROMOTION_SPLIT = "val"  # the images candidate and champion are compared on; never the test split


# Gains below this are the float rounding of two processes scoring the same model, not a better
# one (seen: a model re-registered unchanged "beat" itself on Brier by 1e-9).
ROUNDING = 1e-6


def should_promote(candidate: float, champion: float | None, *, metric: str = "roc_auc",
                   min_gain: float = 0.0) -> bool:
    """A candidate becomes champion when there is none, or it beats the champion on ``metric``
    by more than :data:`ROUNDING` and by at least ``min_gain``, in the metric's direction
    (:class:`dicomflow.metrics.Metric`: lower is better for the Brier score)."""
    if champion is None:
        return True
    better_by = gain(metric, candidate, champion)
    return better_by > ROUNDING and better_by >= min_gain - ROUNDING  # 0.82 - 0.80 is 0.01999... in floats


def promotion_score(metric: str, labels: np.ndarray, predictions: pd.DataFrame, classes: list[int]) -> float:
    """``metric`` of one model's answers (``dicomflow.serving.pyfunc`` output columns) against class indices.

    Threshold-dependent metrics use the model's own ``label`` column, so each model is judged at
    its own operating threshold, as it would be used.
    """
    registered = metric_for(metric, n_classes=len(classes), setting="evaluate.promotion_metric")
    called = class_indices(predictions["label"].to_numpy(), classes)
    columns = ["probability"] if "probability" in predictions else [f"probability_{c}" for c in classes]
    probabilities = predictions[columns].to_numpy(float)
    return registered.compute(Scores(np.asarray(labels, int), probabilities.ravel() if len(columns) == 1
                                     else probabilities, called))


@dataclass(frozen=True)
class Comparison:
    """The candidate and the current champion, scored on the same images in the same run.

    ``champion`` is None when there is no champion or it could not be scored (``reason`` says
    why); ``images`` counts the files both models answered.
    """

    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    images: int
    data_version: str
    reason: str = ""

    def decide(self, *, min_gain: float) -> tuple[str, str]:
        """The alias the candidate gets (champion or challenger) and the decision in words."""
        on = (f"{self.metric} on {self.images} {PROMOTION_SPLIT} images of data {self.data_version[:12]}")
        if self.champion_version is None:
            return "champion", f"champion: no champion before ({on}: {self.candidate:.4f})"
        if self.champion is None:
            return "challenger", (f"challenger: champion version {self.champion_version} could not be "
                                  f"scored ({self.reason}); compare them and move the alias by hand")
        promote = should_promote(self.candidate, self.champion, metric=self.metric, min_gain=min_gain)
        verdict = "champion" if promote else "challenger"
        return verdict, (f"{verdict}: {on}, candidate {self.candidate:.4f} vs champion version "
                         f"{self.champion_version} {self.champion:.4f} (minimum gain {min_gain:g})")


def score_registered(model_uri: str, files: list[Path]) -> pd.DataFrame:
    """A registered pyfunc's answers for ``files``, from a fresh ``dicomflow predict``.

    A fresh process, not this one: loading a model adds its own copy of ``dicomflow`` (its
    ``code_paths``) to the import path, and a champion logged by older code must run its own
    code, not ours. Returns the CSV (a ``path`` column of file names), or raises DataError with
    the command's last line.
    """
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        for file in files:
            try:  # a hard link costs nothing; a copy where the file system has none
                os.link(file, inputs / file.name)
            except OSError:
                shutil.copyfile(file, inputs / file.name)
        output = Path(folder) / "predictions.csv"
        result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", str(inputs), "--model", model_uri,
                                 "--output", str(output)], capture_output=True, text=True)
        if result.returncode != 0 and not output.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"scoring {model_uri} failed: {last}")
        return pd.read_csv(output, keep_default_na=False, na_values=[""], dtype={"error": str})


def compare_with_champion(candidate: pd.DataFrame, *, name: str, metric: str, files: list[Path],
                          labels: np.ndarray, classes: list[int]) -> Comparison:
    """Score the registry's current champion on ``files`` (class indices ``labels``), beside the
    candidate's answers for the same files (``candidate``, with a ``path`` column of file
    names); each figure on the files both of them answered."""
    import mlflow
    from mlflow.exceptions import MlflowException

    data = tracking.data_version()
    by_name = {file.name: label for file, label in zip(files, labels)}
    try:
        current = mlflow.MlflowClient().get_model_version_by_alias(name, "champion")
    except MlflowException:  # no registered model or no champion yet
        current = None
    answered = candidate["error"].isna().to_numpy() | (candidate["error"] == "").to_numpy()
    reason, champion = "", None
    if current is not None:
        try:
            champion = score_registered(f"models:/{name}/{current.version}", files)
        except DataError as err:
            reason = str(err)
        else:
            if set(candidate.columns) != set(champion.columns):
                reason = (f"its outputs {[c for c in champion.columns if c != 'path']} are not the "
                          f"candidate's {[c for c in candidate.columns if c != 'path']}")
            else:
                champion = champion.set_index("path").loc[candidate["path"]].reset_index()
                answered &= champion["error"].isna().to_numpy()
                if not answered.any():
                    reason = f"it answered none of the {len(files)} files with a probability"
    value = promotion_score(metric, candidate_labels(candidate[answered], by_name), candidate[answered], classes)
    version = None if current is None else str(current.version)
    if current is None or reason:
        return Comparison(metric, value, None, version, int(answered.sum()), data, reason)
    champion_value = promotion_score(metric, candidate_labels(champion[answered], by_name),
                                     champion[answered], classes)
    return Comparison(metric, value, champion_value, version, int(answered.sum()), data)


def candidate_labels(predictions: pd.DataFrame, by_name: dict[str, int]) -> np.ndarray:
    """The class index of each answered file, in the order of ``predictions``."""
    return np.array([by_name[Path(path).name] for path in predictions["path"]], dtype=int)


def register_model(model_uri: str, *, name: str, comparison: Comparison, min_gain: float = 0.0,
                   tags: dict[str, str] | None = None) -> tuple[str, str]:
    """Register ``model_uri`` with the alias the comparison decides; returns (version, alias).

    The decision, both figures and the images they were measured on are tags of the new version
    (``promotion_*``), beside ``tags``. Earlier versions stay registered; a replaced champion
    keeps its version and tags and is found as ``previous_champion``.
    """
    import mlflow

    client = mlflow.MlflowClient()
    alias, decision = comparison.decide(min_gain=min_gain)
    version = mlflow.register_model(model_uri, name).version
    promotion = {"promotion_decision": decision, "promotion_metric": comparison.metric,
                 "promotion_split": PROMOTION_SPLIT, "promotion_images": str(comparison.images),
                 "promotion_data_version": comparison.data_version,
                 "promotion_candidate": f"{comparison.candidate:.10g}",
                 "promotion_champion": "" if comparison.champion is None else f"{comparison.champion:.10g}",
                 "promotion_champion_version": comparison.champion_version or ""}
    for key, value in {**promotion, **(tags or {})}.items():
        client.set_model_version_tag(name, version, key, value)
    if alias == "champion" and comparison.champion_version is not None:
        client.set_registered_model_alias(name, "previous_champion", comparison.champion_version)
    client.set_registered_model_alias(name, alias, version)
    logger.info("registered %s version %s: %s", name, version, decision)
    return str(version), alias


def check_run(run_id: str, *, digests_file: Path, secret: bytes) -> None:
    """Leak scan of the MLflow run and its children against the identifying values' digests that
    deidentify wrote (:mod:`dicomflow.deid.digests`); DataError (one line, no value) on any hit."""
    try:
        identifiers = read_digests(digests_file, secret)
    except ValueError as err:
        raise DataError(f"leak check: {err}; the model is not registered") from err
    leaks = scan_mlflow_run(identifiers, run_id)
    if leaks:
        raise DataError(f"leak check: {len(leaks)} identifying value(s) in MLflow, where and what "
                         "kind (never the value): "
                         + "; ".join(f"a {leak.source} value at {leak.output} {leak.location}"
                                     for leak in leaks[:20]) + "; the model is not registered")
    logger.info("leak check: none of %s identifying values found in MLflow run %s",
                f"{len(identifiers):,}", run_id)


def register_and_promote(model_dir: Path, manifest: pd.DataFrame, *, run_id: str, threshold: float | None,
                         metrics: dict, paths, params, ingest, train: TrainParams | None = None,
                         augment: AugmentParams | None = None) -> None:
    """Log the DICOM pyfunc into the active run, leak-check the run, compare the candidate with the
    champion on the promotion split and register it with the alias that decides; then give the
    version its model card (:func:`dicomflow.evaluation.model_card.model_card`): the active
    (evaluation) run's ``model_card.md`` and the version's description.

    ``train`` and ``augment`` are the params the model was trained with, for the card (None: "not
    recorded"); the card's validation figures are the training run's ``model_val_*`` metrics and
    its subgroup table ``paths.eval_subgroups``. The card is leak-checked before the version is
    registered.
    """
    import mlflow

    # The registered model: DICOM in, probabilities and the label at this threshold out.
    registered = dict(threshold=threshold, classes=ingest.classes, settings=PixelSettings.from_params(ingest),
                      domain=TrainingDomain.from_manifest(manifest.iloc[layout.split_rows(manifest, "train")]))
    classifier = log_classifier(model_dir / layout.MODEL_FILE, **registered, input_example=PATH_EXAMPLE)
    digests_file, secret = Path(paths.deid_dir) / layout.DEID_IDENTIFIER_DIGESTS, read_secret(os.environ)[0]
    check_run(run_id, digests_file=digests_file, secret=secret)
    promotion = promotion_files(manifest, Path(paths.deid_dir), classes=ingest.classes)
    # The candidate as it was just logged, in this process; the champion in a process of its own.
    local = DicomClassifier(**registered).load(model_dir / layout.MODEL_FILE)
    candidate = local.predict(None, pd.DataFrame({"path": [str(file) for file in promotion["files"]]}))
    candidate.insert(0, "path", [file.name for file in promotion["files"]])
    comparison = compare_with_champion(candidate, name=params.registered_model_name,
                                       metric=params.promotion_metric, **promotion)

    # The model card, from what this stage has; its version number is known once registered.
    client = mlflow.MlflowClient()
    subgroups_file = Path(paths.eval_subgroups)
    subgroups = (pd.read_csv(subgroups_file, keep_default_na=False, na_values=[""], dtype={"group": str})
                 if subgroups_file.is_file() else None)
    validation = {key.removeprefix("model_val_"): value for key, value in client.get_run(run_id).data.metrics.items()
                  if key.startswith("model_val_")}
    alias, decision = comparison.decide(min_gain=params.promotion_min_gain)
    card = functools.partial(model_card, name=params.registered_model_name, decision=decision, manifest=manifest,
                             data_version=comparison.data_version, metrics=metrics, subgroups=subgroups,
                             domain=registered["domain"], threshold=threshold, ingest=ingest, evaluate=params,
                             train=train, augment=augment, validation=validation)
    with tempfile.TemporaryDirectory() as folder:  # read as the scanner reads the logged artifact
        draft = Path(folder) / CARD_FILE
        draft.write_text(card(version=None, alias=alias), encoding="utf-8")
        leaks = scan_paths(read_digests(digests_file, secret), [draft])
    if leaks:
        raise DataError(f"leak check: {len(leaks)} identifying value(s) in the model card, where and what "
                         "kind (never the value): " + "; ".join(
                             f"a {leak.source} value at {leak.location}" for leak in leaks[:20])
                         + "; the model is not registered")

    version, alias = register_model(
        classifier.model_uri, name=params.registered_model_name, comparison=comparison,
        min_gain=params.promotion_min_gain,
        tags={f"test_{name}": f"{metrics[name]:.6g}" for name in ("roc_auc", "brier", "ece")})
    text = card(version=version, alias=alias)
    mlflow.log_text(text, CARD_FILE)
    evaluation = mlflow.active_run().info.run_id
    client.update_model_version(params.registered_model_name, version, description=registry_description(
        text, where=f"the {CARD_FILE} artifact of run {evaluation}"))
    mlflow.set_tags({"registered_version": version, "registered_alias": alias})


def promotion_files(manifest: pd.DataFrame, deid_dir: Path, *, classes: list[int]) -> dict:
    """The de-identified files of the promotion split and their class indices (one per file:
    every frame of a file carries its label)."""
    rows = manifest.iloc[layout.split_rows(manifest, PROMOTION_SPLIT)].drop_duplicates("dicom_file")
    return {"files": [deid_dir / name for name in rows["dicom_file"]],
            "labels": class_indices(rows["label"].to_numpy(), classes), "classes": classes}


def log_evaluation(train_run_id: str, metrics: dict[str, float], *, evaluate_params: dict, files: list[Path],
                   problems: list[str], register: Callable[[], None], log_inputs: Callable[[], None]
                   ) -> tuple[str, str]:
    """Log the test metrics to the training run and to its nested ``evaluate`` run (in the same
    experiment), with the evaluate params, its dataset inputs (``log_inputs``) and the report
    files; then, unless the model is degenerate (``problems``,
    tagged instead), call ``register`` inside the nested run. Returns both runs' ids.

    Evaluation is a nested run of the training run: evaluate.* can change and rerun this stage
    alone, and MLflow forbids changing a param already logged on a run.
    """
    import mlflow

    test_metrics = {f"test_{name}": value for name, value in metrics.items()}
    with mlflow.start_run(run_id=train_run_id) as training:
        mlflow.log_metrics(test_metrics)
        # In the training run's experiment by name, whatever experiment is active in this process.
        with mlflow.start_run(run_name="evaluate", nested=True, tags=tracking.run_tags(),
                              experiment_id=training.info.experiment_id) as evaluation:
            mlflow.log_params(tracking.flatten_params({"evaluate": evaluate_params}))
            log_inputs()
            mlflow.log_metrics(test_metrics)
            for path in files:
                mlflow.log_artifact(str(path), artifact_path="evaluation")
            if problems:
                mlflow.set_tag(tracking.DEGENERATE_TAG, "; ".join(problems))
            else:
                register()
    return train_run_id, evaluation.info.run_id


def mark_failed(run_ids: Iterable[str]) -> None:
    """Mark each run FAILED (a degenerate model's: its report is kept, it is never registered)."""
    import mlflow

    client = mlflow.MlflowClient()
    for run_id in run_ids:
        client.set_terminated(run_id, status="FAILED")
