"""A temporary MLflow tracking store with a model-signing key pair in the environment: what the
tests that register, sign and load a champion share (serving, listener, DICOM results)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pathlib import Path

import mlflow
import pytest


@contextmanager
def signed_tracking_store(tmp_path_factory: pytest.TempPathFactory, experiment: str) -> Iterator[dict]:
    """A SQLite tracking store with its artifacts beside it; ``MLFLOW_TRACKING_URI`` points at it and
    ``DICOMFLOW_SIGNING_KEY_FILE`` / ``DICOMFLOW_VERIFY_KEY_FILE`` at a key pair made for it (predict,
    serve and listen verify what they load: dicomflow/signing.py), until the block ends.

    Yields ``{"root", "uri", "experiment" (the id of ``experiment``), "keys" (signing, verify paths)}``.
    """
    from dicomflow.signing import SIGNING_KEY_FILE_ENV, VERIFY_KEY_FILE_ENV, write_key_pair

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    keys = write_key_pair(tmp_path_factory.mktemp("keys") / "team")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(SIGNING_KEY_FILE_ENV, str(keys[0]))
        patch.setenv(VERIFY_KEY_FILE_ENV, str(keys[1]))
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        made = mlflow.create_experiment(experiment, artifact_location=(root / "artifacts").as_uri())
        try:
            yield {"root": root, "uri": uri, "experiment": made, "keys": keys}
        finally:
            mlflow.set_tracking_uri(None)


def register_champion(store: dict, keras_path: Path, name: str, **log_options) -> tuple[str, object]:
    """The Keras model at ``keras_path`` logged with ``log_classifier(**log_options)`` in ``store``'s
    experiment, registered as ``name``, signed as evaluate signs and given the alias champion;
    (its version, the logged model's info)."""
    import os

    from dicomflow.serving.pyfunc import log_classifier
    from dicomflow.signing import sign_model_version, signing_key_from_env

    with mlflow.start_run(experiment_id=store["experiment"]):
        info = log_classifier(keras_path, **log_options)
    version = mlflow.register_model(info.model_uri, name).version
    sign_model_version(name, version, key=signing_key_from_env(os.environ))
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", version)
    return str(version), info
