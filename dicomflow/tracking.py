"""MLflow glue shared by train and evaluate: where runs go, and how a run is tagged.

The default store is a SQLite file in the repository (git-ignored); ``MLFLOW_TRACKING_URI``
points runs at a server instead. Only non-identifying values are ever logged here: params,
the git commit and the data version (a content hash), never anything read from DICOM headers.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULT_TRACKING_DB = "mlflow.db"
EXPERIMENT_NAME = "dicomflow"
DATA_POINTER = Path("data.dvc")
# The experiment tag MLflow 3's UI opens an experiment's view by (read from its JavaScript: the
# values are "custom_model_development" and "genai_development"); without it an experiment
# opens on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# Tag of a run whose model is degenerate (dicomflow.model.scoring.degeneracy), with what was seen.
DEGENERATE_TAG = "dicomflow.degenerate"


# Where DVC runs queued experiments: a temporary copy of the repository under this folder.
DVC_QUEUE_WORKSPACES = (".dvc", "tmp", "exps")


def repository_root(cwd: Path | None = None) -> Path:
    """The repository a stage runs for: the working directory, or, inside a temporary workspace
    of ``dvc queue`` (``<repo>/.dvc/tmp/exps/...``), the repository that queued it, so that
    queued experiments log to the same store as ``dvc repro`` instead of a copy that is deleted.
    """
    parts = (cwd or Path.cwd()).resolve().parts
    n = len(DVC_QUEUE_WORKSPACES)
    for i in range(len(parts) - n + 1):
        if parts[i:i + n] == DVC_QUEUE_WORKSPACES:
            return Path(*parts[:i])
    return Path(*parts)


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` when set, else the SQLite store of :func:`repository_root`."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repository_root() / DEFAULT_TRACKING_DB}"


def configure_mlflow(experiment: str | None = EXPERIMENT_NAME) -> None:
    """Point MLflow at :func:`tracking_uri` (and an experiment), with its telemetry off.

    MLflow 3 reports usage to its developers by default; a pipeline that handles PHI-adjacent
    data on hospital networks sends nothing out that it does not have to.
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps stage logs readable
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    if experiment is not None:
        found = mlflow.set_experiment(experiment)
        if found.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            mlflow.set_experiment_tag(EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def git_commit() -> str:
    """The commit being run, or "unknown" outside a git checkout."""
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return result.stdout.strip()


def data_version(pointer: Path = DATA_POINTER) -> str:
    """The content hash DVC recorded for ``data/`` in ``data.dvc`` ("unknown" without one)."""
    if not pointer.is_file():
        return "unknown"
    with open(pointer, encoding="utf-8") as stream:
        outs = (yaml.safe_load(stream) or {}).get("outs") or [{}]
    return str(outs[0].get("md5", "unknown"))


def run_name(stage: str) -> str:
    """``train-20261125-211503``: a run name of our own. MLflow's default draws two random words,
    which the leak scanner can find among a data set's names (e.g. an operator called "Wren")."""
    return f"{stage}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"


# What decides a run's outcome besides the data: a run made with these changed since the commit
# (``dvc exp run -S ...`` changes params.yaml) is tagged, so git_commit alone does not mislead.
PIPELINE_FILES = ("params.yaml", "dvc.yaml", "stages", "dicomflow")


def workspace_modified() -> bool:
    """Whether :data:`PIPELINE_FILES` differ from the commit being run (False outside git)."""
    try:
        result = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *PIPELINE_FILES],
                                capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return False
    return bool(result.stdout.strip())


def source_name() -> str:
    """The entry point as a path relative to the repository (MLflow records an absolute one)."""
    entry = Path(sys.argv[0]).resolve()
    try:
        return entry.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return entry.name


def run_tags() -> dict[str, str]:
    """Tags every run carries, so it can be traced back to code and data: the commit, whether the
    workspace differed from it, the data version and, under ``dvc exp run``, the experiment's name."""
    tags = {"git_commit": git_commit(), "data_version": data_version(), "mlflow.source.name": source_name()}
    if workspace_modified():
        tags["workspace_modified"] = "true"
    if experiment := os.environ.get("DVC_EXP_NAME"):
        tags["dvc_experiment"] = experiment
    return tags


def log_dataset_inputs(manifest, *, source: str, contexts: dict[str, str]) -> None:
    """Log each split of the (de-identified) split manifest as an MLflow dataset input of the
    active run, in its context (``{"train": "training", ...}``), with the data version as its
    digest: the runs table's Dataset column, and a way to find every run trained on a version."""
    import mlflow

    from dicomflow.config.layout import split_rows

    version = data_version()
    for split, context in contexts.items():
        rows = manifest.iloc[split_rows(manifest, split)]
        mlflow.log_input(mlflow.data.from_pandas(rows, source=source, name=f"dicomflow-{split}", digest=version),
                         context=context)


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``, the keys ``dvc exp run -S`` uses."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = value
    return flat


class EpochLogger:
    """Logs each epoch's history row to the active run as step metrics (``member_<i>_`` before
    the names of an ensemble's members), and afterwards the epochs it did not see: those a killed
    run trained before this one resumed."""

    def __init__(self, ensemble: int) -> None:
        self.ensemble = ensemble
        self.logged: set[tuple[int, int]] = set()

    def metric_name(self, member: int, name: str) -> str:
        return name if self.ensemble == 1 else f"member_{member}_{name}"

    def __call__(self, member: int, epoch: int, row: dict[str, float]) -> None:
        import mlflow

        mlflow.log_metrics({self.metric_name(member, name): value for name, value in row.items()
                            if name not in ("epoch", "member", "kept")}, step=epoch)
        self.logged.add((member, epoch))

    def log_missing(self, history) -> None:
        for row in history.to_dict("records"):
            if (int(row["member"]), int(row["epoch"])) not in self.logged:
                self(int(row["member"]), int(row["epoch"]), row)


def log_keras_model(model, example) -> Any:
    """Log ``model`` into the active run with its signature and input example (``example``, a
    few model inputs), pinned to the Keras and TensorFlow that trained it; returns its ModelInfo."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    # mlflow.keras.log_model (3.17) writes the input example before creating its folder.
    return mlflow.tensorflow.log_model(
        model, name="model", signature=infer_signature(example, model.predict(example, verbose=0)),
        input_example=example,
        # The inferred list can name both tensorflow and tensorflow-cpu; state what was tested.
        pip_requirements=[f"keras=={keras.__version__}", f"tensorflow-cpu=={tf.__version__}"])
