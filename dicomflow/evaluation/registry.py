"""The MLflow writes of evaluate: the runs it ends, the files it logs, and the registration of a
version in an order that a kill at any step cannot leave half-done where a user would see it.

Registration states
-------------------
A version is created with every tag it will carry (the training run, the evaluation's key, the
promotion decision and alias, what it trained on, the secret's fingerprint) in one write, and
:data:`REGISTRATION_TAG` ``incomplete``; then come its description (the model card), its signature
(:mod:`dicomflow.signing`), the aliases, and last ``complete``. So:

- before the aliases move, a version is reachable by its number only, and says ``incomplete``;
- once an alias points at it, it is already signed and described;
- a rerun of the same evaluation (same training run and evaluate settings:
  :data:`EVALUATION_KEY_TAG`) finds its version (:func:`find_version`) and completes it with the
  decision recorded at creation instead of registering another (one version per evaluation);
  a complete one is reused as it is.

What is registered at all
-------------------------
:func:`registration_decision` keeps two kinds of model out of the registry, and says why on the
evaluate run (:data:`DECISION_TAG`): one whose validation ROC AUC is below
``evaluate.min_validation_auc`` (an undertrained model is not a candidate anyone should serve),
and one equal to a registered version (:func:`model_digest`, the :data:`MODEL_DIGEST_TAG` each
version carries: the same weights, operating settings and training images are the same model,
however often it is retrained or re-evaluated).

A rerun also ends as KILLED the evaluate runs a killed stage left RUNNING (:func:`end_stale_runs`),
and the training run is never reopened: the test metrics are written to it without changing its
status, so a failed evaluate cannot mark a good training run FAILED.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from dicomflow.config.layout import TRAINING_DATA_FILE
from dicomflow.errors import DataError
from dicomflow.metrics import HEADLINE_PRIVACY
from dicomflow.runtime.outputs import out_of_space

logger = logging.getLogger(__name__)

REGISTRATION_TAG = "dicomflow.registration"  # "incomplete" from creation, "complete" after the aliases
INCOMPLETE, COMPLETE = "incomplete", "complete"
TRAINING_RUN_TAG = "training_run_id"
EVALUATION_KEY_TAG = "dicomflow.evaluation_key"  # the training run and the evaluate settings, hashed
ALIAS_TAG = "promotion_alias"  # the alias decided at creation: what a rerun applies
PREVIOUS_CHAMPION = "previous_champion"
STAGE_TAG = "dicomflow.stage"
# SHA-256 of the weights, the operating settings and the training images (model_digest).
MODEL_DIGEST_TAG = "dicomflow.model_digest"
DECISION_TAG = "registration_decision"  # on the evaluate run: registered, or why not

# Test-only: the registration step after which the process kills itself with SIGKILL (the names
# of :data:`STEPS`); tests/test_registry.py sets it to kill a real evaluate at each step.
KILL_AFTER_ENV = "DICOMFLOW_TEST_KILL_AFTER"
STEPS = ("logged", "created", "described", "signed", "aliased", "completed")


def _step(name: str) -> None:
    """The point after a registration write where :data:`KILL_AFTER_ENV` may end the process."""
    if os.environ.get(KILL_AFTER_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def artifact_space(what: str, where: str, *, then: str = "nothing is registered") -> Iterator[None]:
    """A full disk or quota while logging ``what`` to the artifact store ``where`` becomes one
    line naming the store (not the temporary file MLflow was copying from, which an OSError from
    a copy names) and what ``then`` holds, instead of a traceback; the run ends FAILED."""
    try:
        yield
    except Exception as err:  # MLflow wraps some OSErrors: look for the errno along the causes
        if cause := out_of_space(err):
            place = where.removeprefix("file://")
            raise DataError(f"{cause.strerror or 'no space'} while logging {what} to {place}: this evaluation is "
                            f"marked FAILED and {then}; free some space there (or raise the quota) and "
                            "re-run") from None
        raise


def end_stale_runs(client, training_run_id: str) -> list[str]:
    """End as KILLED the evaluate runs of ``training_run_id`` that are still RUNNING (a stage
    killed while it ran), and end the training run FINISHED when an older evaluate reopened it
    and was killed (its training had finished: its outputs exist). Returns the runs ended."""
    training = client.get_run(training_run_id)
    stale = client.search_runs([training.info.experiment_id],
                               filter_string=f"tags.mlflow.parentRunId = '{training_run_id}' "
                                             "and attributes.status = 'RUNNING'")
    ended = []
    for run in stale:
        client.set_terminated(run.info.run_id, status="KILLED")
        ended.append(run.info.run_id)
    if training.info.status == "RUNNING":
        client.set_terminated(training_run_id, status="FINISHED")
        ended.append(training_run_id)
    if ended:
        logger.info("ended %d run(s) a killed stage left RUNNING", len(ended))
    return ended


def log_to_training_run(client, training_run_id: str, metrics: Mapping[str, float],
                        tags: Mapping[str, str] | None = None) -> None:
    """``metrics`` and ``tags`` on the training run, without reopening it (its status stays what
    train left)."""
    import time

    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    client.log_batch(training_run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, str(value)) for key, value in (tags or {}).items()])


def log_files(files: Iterable[Path], *, artifact_path: str) -> None:
    """Each file into the active run's ``artifact_path``; a full disk is one line (:func:`artifact_space`)."""
    import mlflow

    where = mlflow.get_artifact_uri(artifact_path)
    with artifact_space(f"the {artifact_path} files", where):
        for path in files:
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_text(text: str, name: str) -> None:
    """``text`` as the active run's artifact ``name``; a full disk is one line."""
    import mlflow

    with artifact_space(name, mlflow.get_artifact_uri(),
                        then="the version being registered stays marked incomplete until a rerun completes it"):
        mlflow.log_text(text, name)


def log_candidate(keras_model_path: Path, *, training_data: dict, **registered: Any) -> Any:
    """Log the DICOM pyfunc (:func:`dicomflow.serving.pyfunc.log_classifier`, ``registered`` its
    arguments) into the active run, with ``training_data`` as its :data:`TRAINING_DATA_FILE`;
    returns its ModelInfo. A full disk is one line, and nothing is registered."""
    import mlflow

    from dicomflow.serving.pyfunc import log_classifier

    with artifact_space("the model", mlflow.get_artifact_uri()):
        info = log_classifier(keras_model_path, **registered)
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / TRAINING_DATA_FILE).write_text(json.dumps(training_data, indent=1), encoding="utf-8")
            mlflow.MlflowClient().log_model_artifacts(info.model_id, folder)
    _step("logged")
    return info


def evaluation_key(training_run_id: str, evaluate_params: Mapping[str, Any]) -> str:
    """What makes two evaluations the same one: the training run and the evaluate settings."""
    text = json.dumps({"training_run": training_run_id, "evaluate": dict(evaluate_params)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def find_version(client, name: str, key: str):
    """The version registered for evaluation ``key`` (newest first), or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:  # no registered model of that name yet
        return None
    found = [v for v in versions if v.tags.get(EVALUATION_KEY_TAG) == key]
    return max(found, key=lambda v: int(v.version)) if found else None


def model_digest(weights: Iterable[Any], *, training_data: Mapping[str, Any], threshold: float | None,
                 classes: Iterable[int], study: Mapping[str, Any] | None = None) -> str:
    """What makes two registered models the same: a SHA-256 over every weight array (dtype,
    shape and bytes, in the model's order), the operating threshold and classes, and the
    training images and pixel settings of ``training_data`` (:data:`TRAINING_DATA_FILE`'s record);
    and, for a model evaluated per study, its ``study`` metadata (the aggregation and study
    thresholds ``dicomflow predict --per-study`` answers with; None leaves the digest as it was).

    Weights, not the ``.keras`` file: the file also stores when it was saved, so one set of
    weights saved twice differs in bytes. The threshold is part of the model a user is served:
    the same weights at another threshold answer other labels.
    """
    import numpy as np

    from dicomflow.evaluation.promotion import training_data_digest

    digest = hashlib.sha256()
    for array in weights:
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
    settings = {"threshold": threshold, "classes": [int(c) for c in classes],
                "pixel_settings": training_data["pixel_settings"], "images": training_data_digest(training_data)}
    if study is not None:
        settings["study"] = dict(study)
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def find_same_model(client, name: str, digest: str):
    """The newest complete version of ``name`` whose :data:`MODEL_DIGEST_TAG` is ``digest``, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:  # no registered model of that name yet
        return None
    same = [v for v in versions if v.tags.get(MODEL_DIGEST_TAG) == digest and is_complete(v)]
    return max(same, key=lambda v: int(v.version)) if same else None


def registration_decision(validation_auc: float, *, floor: float, digest: str,
                          same_version: str | None) -> tuple[bool, str]:
    """Whether a model may be registered, and the one line that says why, on both counts.

    Parameters
    ----------
    validation_auc : float
        The model's validation ROC AUC (macro one-vs-rest with more than two classes; NaN when it
        cannot be computed, which no floor lets through).
    floor : float
        ``evaluate.min_validation_auc``.
    digest : str
        The model's :func:`model_digest`.
    same_version : str or None
        The registered version holding the same model (:func:`find_same_model`), or None.

    Returns
    -------
    (bool, str)
        True to register; the decision, e.g. ``not registered: validation ROC AUC 0.519 is below
        evaluate.min_validation_auc 0.6 (...); no version holds this model (digest 1a2b3c4d5e6f)``.
    """
    passes = bool(validation_auc >= floor)
    floor_text = (f"validation ROC AUC {validation_auc:.3f} reaches evaluate.min_validation_auc {floor:g}" if passes
                  else f"validation ROC AUC {validation_auc:.3f} is below evaluate.min_validation_auc {floor:g} "
                       "(train longer or on more data, or lower the floor)")
    same_text = (f"no version holds this model (digest {digest[:12]})" if same_version is None
                 else f"the same model (weights, threshold and training images; digest {digest[:12]}) is version "
                      f"{same_version} already")
    register = passes and same_version is None
    return register, f"{'registered' if register else 'not registered'}: {floor_text}; {same_text}"


def is_complete(version) -> bool:
    """Whether ``version`` carries every write of a registration (its tag says so last)."""
    return version.tags.get(REGISTRATION_TAG) == COMPLETE


def version_tags(comparison, *, alias: str, decision: str, key: str, training_run_id: str,
                 training_data: Mapping[str, Any], metrics: Mapping[str, float],
                 secret: Mapping[str, str], digest: str, lineage: Mapping[str, str] | None = None) -> dict[str, str]:
    """Every tag a new version is created with: the promotion decision and both figures
    (``promotion_*``), the alias decided, the training run and evaluation key, what it trained on
    (``training_*``; the images' digests are in its signed :data:`TRAINING_DATA_FILE`), the
    model's :data:`MODEL_DIGEST_TAG`, the test figures, the de-identification secret's
    fingerprint, and where its weights started (``lineage``: the training run's
    ``dicomflow.init*`` tags; ``dicomflow.init: scratch`` when None)."""
    from dicomflow.evaluation.promotion import PROMOTION_SPLIT, training_data_digest

    return {
        "promotion_decision": decision, ALIAS_TAG: alias, "promotion_metric": comparison.metric,
        "promotion_split": PROMOTION_SPLIT, "promotion_images": str(comparison.images),
        "promotion_excluded": str(comparison.excluded), "promotion_data_version": comparison.data_version,
        "promotion_candidate": f"{comparison.candidate:.10g}",
        "promotion_champion": "" if comparison.champion is None else f"{comparison.champion:.10g}",
        "promotion_champion_version": comparison.champion_version or "",
        TRAINING_RUN_TAG: training_run_id, EVALUATION_KEY_TAG: key, MODEL_DIGEST_TAG: digest,
        "training_data_version": str(training_data["data_version"]),
        "training_images": str(training_data["images"]),
        "training_images_digest": training_data_digest(training_data),
        **{f"test_{name}": f"{metrics[name]:.6g}" for name in ("roc_auc", "brier", "ece") if name in metrics},
        **{name: f"{metrics[name]:.6g}" for name in HEADLINE_PRIVACY if name in metrics},  # attack AUC, DP ε
        **secret,
        **(lineage or {"dicomflow.init": "scratch"}),
    }


def create_version(client, name: str, model_info: Any, *, run_id: str, tags: Mapping[str, str]) -> str:
    """A new version of ``name`` for the logged model, with all of ``tags`` and
    :data:`REGISTRATION_TAG` ``incomplete`` written with it; returns its number."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    version = client.create_model_version(name, model_info.model_uri, run_id=run_id, model_id=model_info.model_id,
                                          tags={**tags, REGISTRATION_TAG: INCOMPLETE})
    _step("created")
    return str(version.version)


def describe_version(client, name: str, version: str, description: str) -> None:
    """The version's description (the model card, :func:`~dicomflow.evaluation.model_card.registry_description`)."""
    client.update_model_version(name, version, description=description)
    _step("described")


def sign_version(name: str, version: str, *, key: Any) -> None:
    """Sign the version's files as stored (:func:`dicomflow.signing.sign_model_version`)."""
    from dicomflow.signing import sign_model_version

    sign_model_version(name, version, key=key)
    _step("signed")


def move_aliases(client, name: str, version: str, *, alias: str, replaced: str | None) -> None:
    """Point ``alias`` at ``version``; a replaced champion (``replaced``) keeps its version as
    :data:`PREVIOUS_CHAMPION`, set first, so that no moment has the old champion unnamed."""
    if alias == "champion" and replaced:
        client.set_registered_model_alias(name, PREVIOUS_CHAMPION, replaced)
    client.set_registered_model_alias(name, alias, version)
    _step("aliased")


def mark_complete(client, name: str, version: str) -> None:
    """The last write of a registration."""
    client.set_model_version_tag(name, version, REGISTRATION_TAG, COMPLETE)
    _step("completed")


def mark_failed(client, run_ids: Iterable[str]) -> None:
    """Mark each run FAILED (a degenerate model's: its report is kept, it is never registered)."""
    for run_id in run_ids:
        client.set_terminated(run_id, status="FAILED")



def current_champion(client, name: str) -> str | None:
    """The version the ``champion`` alias points at, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, "champion").version)
    except MlflowException:
        return None


def training_validation_metrics(client, training_run_id: str) -> dict[str, float]:
    """The training run's ``model_val_*`` metrics without the prefix (the model card's
    validation figures)."""
    return {key.removeprefix("model_val_"): value for key, value in client.get_run(training_run_id).data.metrics.items()
            if key.startswith("model_val_")}
