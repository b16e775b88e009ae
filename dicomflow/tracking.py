"""MLflow glue shared by train and evaluate: where runs go, and how a run is tagged.

The default store is a SQLite file in the repository (git-ignored), with artifacts under
``mlruns/``; ``MLFLOW_TRACKING_URI`` points runs at a server instead. MLflow records artifact
locations as absolute paths: a repository copied or moved with its store gets them pointed at
its own ``mlruns/`` (:func:`relocate_artifact_paths`), so it never writes into the old tree.
Only non-identifying values are ever logged here: params, the git commit and the data version
(a content hash), never anything read from DICOM headers.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import yaml

from dicomflow.runtime.native_logs import DETERMINISTIC_MAP_ATTRIBUTE, stderr_lines_dropped

logger = logging.getLogger(__name__)

DEFAULT_TRACKING_DB = "mlflow.db"
# Where MLflow puts a SQLite store's artifacts: <working directory>/mlruns/<experiment id>.
DEFAULT_ARTIFACT_DIR = "mlruns"
# The columns of MLflow's SQL schema that hold artifact locations (read from its migrations).
ARTIFACT_COLUMNS = (("experiments", "artifact_location"), ("runs", "artifact_uri"),
                    ("model_versions", "source"), ("model_versions", "storage_location"),
                    ("logged_models", "artifact_location"))
EXPERIMENT_NAME = "dicomflow"
DATA_POINTER = Path("data.dvc")
# The experiment's kind for MLflow 3's UI (values read from its JavaScript: "custom_model_development",
# "genai_development"); without it the UI asks which kind the experiment is.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# MLflow 3.17's UI ignores that tag when it picks a view: a browser-wide switch (GenAI | Model
# training, kept in the browser's local storage) decides, and a fresh profile starts on GenAI's
# traces. This query parameter of an experiment's address selects the model-training view (runs table).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# Tag of a run whose model is degenerate (dicomflow.model.scoring.degeneracy), with what was seen.
DEGENERATE_TAG = "dicomflow.degenerate"
# Tag of a training run: the sha256 of the model file it saved. Evaluate finds the run that made
# the model in outputs/model by it; a run id stored beside the model would change its DVC hash on
# every run, and after `dvc checkout` of another model it would name the wrong run.
MODEL_DIGEST_TAG = "dicomflow.model_sha256"


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


def experiment_ui_url(base_url: str, database: Path, name: str = EXPERIMENT_NAME) -> str:
    """The address of experiment ``name`` in the MLflow UI at ``base_url``, in the model-training view.

    Parameters
    ----------
    base_url : str
        Where the UI answers, e.g. ``http://127.0.0.1:5000``.
    database : Path
        The SQLite store the UI serves; read only, never created.
    name : str, default="dicomflow"
        The experiment.

    Returns
    -------
    str
        ``base_url/#/experiments/<id>?workflowType=machine_learning``; the experiments list (in
        the same view) while the store or the experiment does not exist yet.
    """
    base_url = base_url.rstrip("/")
    found = None
    if database.is_file():
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        try:
            found = connection.execute("SELECT experiment_id FROM experiments WHERE name = ?", (name,)).fetchone()
        except sqlite3.OperationalError:  # not a store MLflow has set up yet
            found = None
        finally:
            connection.close()
    where = f"experiments/{found[0]}" if found else "experiments"
    return f"{base_url}/#/{where}?{MODEL_TRAINING_VIEW}"


def _local_path(location: str) -> Path | None:
    """The folder an artifact location names on this machine (a path or ``file://``), else None."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and location.startswith("/"):
        return Path(location)
    return None


def relocate_artifact_paths(database: Path, root: Path) -> int:
    """Point the artifact locations of the SQLite store ``database`` at ``root``/mlruns when they
    name the ``mlruns/`` of another folder, where the store was made (a copied or moved
    repository); return how many locations were changed.

    An experiment whose location is MLflow's default for a store used from a folder ``OLD``
    (``OLD/mlruns/<experiment id>``) had its store copied or moved from ``OLD``: every location
    under ``OLD/`` (of experiments, runs, model versions and logged models) is rewritten to the
    same place under ``root``, so new runs write into this repository and the old ones are read
    from the copy here. A location placed deliberately elsewhere (not ``.../mlruns/<id>``) is left as it is.

    Notes
    -----
    MLflow has no API to change an experiment's artifact location, so this edits its SQL
    tables, in one transaction; each statement only touches rows under ``OLD/``.
    """
    if not database.is_file():
        return 0
    root = root.resolve()
    with sqlite3.connect(database, timeout=60) as connection:
        try:
            experiments = connection.execute("SELECT experiment_id, artifact_location FROM experiments").fetchall()
        except sqlite3.OperationalError:  # not an MLflow store yet
            return 0
        old_roots = set()
        for experiment_id, location in experiments:
            path = _local_path(location or "")
            if (path is not None and path.name == str(experiment_id) and path.parent.name == DEFAULT_ARTIFACT_DIR
                    and path.parent.parent != root):
                old_roots.add(path.parent.parent)
        tables = {name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        changed = 0
        for old in sorted(old_roots):
            for before, after in ((f"{old}/", f"{root}/"), (f"{old.as_uri()}/", f"{root.as_uri()}/")):
                for table, column in ARTIFACT_COLUMNS:
                    if table in tables:
                        changed += connection.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (after, len(before) + 1, len(before), before)).rowcount
    if old_roots:
        logger.warning("%s was made in another folder (a copied or moved repository): its %d artifact "
                       "locations now point into %s/ here", database.name, changed, DEFAULT_ARTIFACT_DIR)
    return changed


def configure_mlflow(experiment: str | None = EXPERIMENT_NAME) -> None:
    """Point MLflow at :func:`tracking_uri` (and an experiment), with its telemetry off.

    MLflow 3 reports usage to its developers by default; a pipeline that handles PHI-adjacent
    data on hospital networks sends nothing out that it does not have to. On the repository's
    own store, artifact locations left by another folder are moved here first
    (:func:`relocate_artifact_paths`).
    """
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keeps stage logs readable
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        relocate_artifact_paths(repository_root() / DEFAULT_TRACKING_DB, repository_root())
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


def file_sha256(path: Path) -> str:
    """The sha256 of the file at ``path``, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def training_run_for(model_file: Path, client) -> Any:
    """The training run that saved ``model_file``: the newest run of the dicomflow experiment
    tagged :data:`MODEL_DIGEST_TAG` with the file's sha256.

    Parameters
    ----------
    model_file : Path
        The saved model (``outputs/model/model.keras``).
    client : mlflow.MlflowClient
        A client of the tracking store the training logged to.

    Returns
    -------
    mlflow.entities.Run
        Any status: a run marked FAILED (a degenerate model) is found too, with its tags.

    Raises
    ------
    DataError
        No run of the store made this file (a model pulled from a DVC remote without its
        tracking store, or trained against another store).

    Notes
    -----
    Training is deterministic on one machine, so two runs can save the same bytes: both made
    this model, and the newest is returned.
    """
    from dicomflow.errors import DataError

    digest = file_sha256(model_file)
    runs = _newest_run_tagged(client, MODEL_DIGEST_TAG, digest)
    if not runs:
        raise DataError(f"{model_file}: no training run of the tracking store saved this model (sha256 "
                        f"{digest[:16]}...; MLFLOW_TRACKING_URI, else the repository's {DEFAULT_TRACKING_DB}): "
                        "run `dvc repro --force train` to train and log it, or point MLFLOW_TRACKING_URI at "
                        "the store it was trained against")
    return runs[0]


# The params a training run logs: those that decide the trained model (train's params in dvc.yaml)
# and the split it trained on. Not the data preparation's (ingest, deidentify, validate: the run's
# data_version tag names their result) nor operational settings: MLflow's runs table is for
# comparing trainings. A name is a whole section or one ``section.key``.
# ingest.unit and ingest.series: volumes, their geometry and window (what a volume network learns
# from; logged only with unit: series, ACTIVE_ONLY).
TRAINING_PARAMS = ("train", "augment", "split", "ingest.classes", "ingest.image_size", "ingest.channels",
                   "ingest.unit", "ingest.series")


# Settings that act only with another (transfer with train.init, DP-SGD with privacy.enabled):
# logged only then, so the run's params are what a person compares (a scratch, non-private run
# logs train.init and train.privacy.enabled, and nothing neutral).
ACTIVE_ONLY = {"train.freeze_epochs": ("train.init", "scratch"),
               "train.encoder_lr_factor": ("train.init", "scratch"),
               "train.privacy.": ("train.privacy.enabled", False),
               # an image run logs what it always did; a volume run its unit and geometry
               "ingest.unit": ("ingest.unit", "image"), "ingest.series.": ("ingest.unit", "image")}


def training_params(params: dict[str, Any]) -> dict[str, Any]:
    """The params train logs: :data:`TRAINING_PARAMS`, flattened, less the :data:`ACTIVE_ONLY`
    settings whose switch is off (``train.privacy.enabled`` itself is kept)."""
    chosen = select_params(params, TRAINING_PARAMS)
    inactive = [prefix for prefix, (switch, off) in ACTIVE_ONLY.items() if chosen.get(switch) == off]
    return {name: value for name, value in chosen.items()
            if name == "train.privacy.enabled" or not any(name.startswith(prefix) for prefix in inactive)}


def select_params(params: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """The ``names`` of ``params`` (sections whole, or ``section.key``), flattened to the
    ``section.key`` names that ``dvc exp run -S`` and ``dvc exp show`` use, in the order given.

    Raises
    ------
    KeyError
        A name that ``params`` does not hold (a caller's mistake, not the user's).
    """
    chosen: dict[str, Any] = {}
    for name in names:
        section, _, key = name.partition(".")
        chosen.update(flatten_params({section: params[section]} if not key else {section: {key: params[section][key]}}))
    return chosen


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


def _no_space(err: BaseException) -> tuple[OSError, str] | None:
    """The write that found no space in ``err``'s chain, with where it wrote: an OSError with
    ENOSPC, EDQUOT or EFBIG, or SQLite's "database or disk is full" (the tracking store)."""
    from dicomflow.runtime.outputs import out_of_space

    if cause := out_of_space(err):
        return cause, cause.filename or ""
    while err is not None:
        if isinstance(err, sqlite3.OperationalError) and getattr(err, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            database = str(repository_root() / DEFAULT_TRACKING_DB)
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), database), database
        err = err.__cause__ or err.__context__
    return None


@contextmanager
def artifact_writes(what: str) -> Iterator[None]:
    """Around MLflow calls that write ``what`` into the active run: a full disk or quota (ENOSPC,
    EDQUOT; EFBIG for a file size limit) becomes one line naming the file and its disk.

    Raises
    ------
    DataError
        When a write in the block found no space; the run is left to its ``start_run`` block,
        which marks it FAILED.
    """
    import mlflow

    try:
        yield
    except Exception as err:
        found = _no_space(err)
        if found is None:
            raise
        cause, where = found
        run = mlflow.active_run()
        where = where or (run.info.artifact_uri if run else "the MLflow artifact store")
        from dicomflow.runtime.outputs import no_space_error

        raise no_space_error(cause, what=what, where=where,
                             remedy="the run is marked FAILED and its artifacts may be incomplete; free "
                                    "some space (or raise the quota) and re-run the stage") from None


def log_keras_model(model, example) -> Any:
    """Log ``model`` into the active run with its signature and input example (``example``, a
    few model inputs), pinned to the Keras and TensorFlow that trained it; returns its ModelInfo."""
    import keras
    import mlflow
    import tensorflow as tf
    from mlflow.models import infer_signature

    # mlflow.keras.log_model (3.17) writes the input example before creating its folder. It also
    # checks the example by calling the model's predict with Keras's default verbosity, whose
    # progress bar writes colour codes and carriage returns to stdout even when it is no terminal
    # (Keras 3.15 treats every POSIX system as one): that output goes nowhere. Under the train
    # stage's op determinism each predict also logs a TensorFlow "ERROR" that is none.
    with artifact_writes("the trained model's MLflow artifacts"), \
            open(os.devnull, "w") as nowhere, contextlib.redirect_stdout(nowhere), \
            stderr_lines_dropped(DETERMINISTIC_MAP_ATTRIBUTE):
        return mlflow.tensorflow.log_model(
            model, name="model", signature=infer_signature(example, model.predict(example, verbose=0)),
            input_example=example,
            # The inferred list can name both tensorflow and tensorflow-cpu; state what was tested.
            pip_requirements=[f"keras=={keras.__version__}", f"tensorflow-cpu=={tf.__version__}"])


# ---- pretraining (the pretrain stage's run; train finds it by the encoder it saved) -------------

# Tag of a pretraining run: the sha256 of the encoder file it saved (as MODEL_DIGEST_TAG for models).
ENCODER_DIGEST_TAG = "dicomflow.encoder_sha256"
# The params a pretraining run logs: those that decide the encoder (pretrain's params in dvc.yaml,
# but for train.strategy, which changes how it runs, not what it learns).
PRETRAINING_PARAMS = ("pretrain", "augment", "train.architecture", "ingest.image_size", "ingest.channels")


def pretraining_run_for(encoder_sha256: str, client) -> Any:
    """The pretraining run that saved the encoder of sha256 ``encoder_sha256``: the newest run of
    the dicomflow experiment tagged :data:`ENCODER_DIGEST_TAG` with it.

    Parameters
    ----------
    encoder_sha256 : str
        The encoder file's sha256 in hex (``outputs/pretrain/pretrain.json`` records it).
    client : mlflow.MlflowClient
        A client of the tracking store the pretraining logged to.

    Returns
    -------
    mlflow.entities.Run

    Raises
    ------
    DataError
        No run of the store saved this encoder (pulled from a DVC remote without its tracking
        store, or pretrained against another store).
    """
    from dicomflow.errors import DataError

    runs = _newest_run_tagged(client, ENCODER_DIGEST_TAG, encoder_sha256)
    if not runs:
        raise DataError(f"no pretraining run of the tracking store saved the encoder of sha256 "
                        f"{encoder_sha256[:16]}... (MLFLOW_TRACKING_URI, else the repository's "
                        f"{DEFAULT_TRACKING_DB}): run `dvc repro --force pretrain` to pretrain and log it, "
                        "or point MLFLOW_TRACKING_URI at the store it was pretrained against")
    return runs[0]


def _newest_run_tagged(client, tag: str, value: str) -> list:
    """The newest run of the experiment whose ``tag`` is ``value`` (a list of one), or []."""
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    return [] if experiment is None else client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`{tag}` = '{value}'",
        order_by=["attributes.start_time DESC"], max_results=1)
