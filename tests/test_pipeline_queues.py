"""End to end, queued: `dvc exp run --queue` on two workers, against the SQLite store and against a
team server on PostgreSQL, in a repository of their own (tests/pipeline_repo.py)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from dicomflow.serving.pyfunc import serving_root
from pipeline_repo import REPO
from pipeline_repo import free_port as _free_port
from pipeline_repo import run as _run

STAGES = ["ingest", "deidentify", "validate", "split", "augment", "train", "evaluate"]

pytestmark = pytest.mark.slow


def _run_queue(root: Path, env: dict[str, str], rates: list[str]) -> None:
    """Queue one experiment per learning rate, run them on two workers, assert all succeeded.

    Workers sometimes exit with experiments still queued (treeverse/dvc#10562, e.g. on a shutdown
    message left in the queue's broker by an earlier `dvc queue stop`); then, as the README says,
    `dvc queue start` again picks up the rest.
    """
    done_before = _run(["dvc", "queue", "status"], root, env).count("Success")
    for lr in rates:
        _run(["dvc", "exp", "run", "--queue", "-S", f"train.lr={lr}"], root, env)
    _run(["dvc", "queue", "start", "-j", "2"], root, env)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        status = _run(["dvc", "queue", "status"], root, env)
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        if "Queued" in status and "0 active, 0 idle" in status:
            _run(["dvc", "queue", "start", "-j", "2"], root, env)
        time.sleep(5)
    else:
        _run(["dvc", "queue", "stop", "--kill"], root, env)
    assert status.count("Success") == done_before + len(rates), status


def _assert_complete_runs(client, rates: list[str]) -> None:
    experiment = client.get_experiment_by_name("dicomflow").experiment_id
    runs = client.search_runs([experiment], filter_string="attributes.status = 'FINISHED'")
    trained = [run for run in runs if run.data.params.get("train.lr") in rates]
    assert sorted(run.data.params["train.lr"] for run in trained) == sorted(rates)
    assert all("test_roc_auc" in run.data.metrics and "val_auc" in run.data.metrics for run in trained)
    # Each named for its DVC experiment, and marked as made from params that differ from the commit.
    assert all(run.data.tags.get("dvc_experiment") and run.data.tags.get("workspace_modified") == "true"
               for run in trained)


def test_queued_experiments_on_two_workers_all_reach_the_store(repo, registry):
    root, env = repo
    rates = ["0.0005", "0.002"]  # two workers, one experiment each: as parallel as four, half the time
    _run_queue(root, env, rates)
    _assert_complete_runs(registry[1], rates)
    exps = root / ".dvc" / "tmp" / "exps"
    assert not exps.exists() or not list(exps.rglob("mlflow.db"))


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL cluster on loopback (Debian's package); yields its MLflow database URI."""
    initdbs = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not initdbs:
        message = "PostgreSQL is not installed (Debian: apt-get install postgresql)"
        if os.environ.get("DICOMFLOW_REQUIRE_POSTGRES"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    bin_dir = initdbs[-1].parent
    # Not under pytest's tmp_path: that folder is private to the user running the tests.
    folder = Path(tempfile.mkdtemp(prefix="dicomflow-postgres-"))
    # PostgreSQL refuses to run as root: the package's own user runs the cluster then.
    as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_owner:
        shutil.chown(folder, "postgres")
    cluster, port = folder / "cluster", _free_port()
    subprocess.run([*as_owner, bin_dir / "initdb", "-D", cluster, "-A", "trust", "-U", "dicomflow",
                    "--no-sync"], check=True, capture_output=True)
    subprocess.run([*as_owner, bin_dir / "pg_ctl", "-D", cluster, "-l", folder / "server.log", "-w",
                    "-o", f"-h 127.0.0.1 -p {port} -k {folder}", "start"], check=True, capture_output=True)
    try:
        subprocess.run([*as_owner, bin_dir / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U",
                        "dicomflow", "mlflow"], check=True, capture_output=True)
        yield f"postgresql://dicomflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run([*as_owner, bin_dir / "pg_ctl", "-D", cluster, "-m", "fast", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def team_server(postgres, tmp_path, repo):
    """`make mlflow-server` on that database, as the README starts it; yields its URI."""
    _, env = repo
    port = _free_port()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            ["make", "-s", "mlflow-server", "MLFLOW_AUTH=none", f"MLFLOW_BACKEND_STORE_URI={postgres}",
             f"MLFLOW_ARTIFACT_ROOT={tmp_path / 'artifacts'}", f"MLFLOW_PORT={port}"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)  # its own process group: make, mlflow and its workers stop together
        uri = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    urllib.request.urlopen(f"{uri}/health", timeout=2)
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, \
                        (tmp_path / "server.log").read_text()[-3000:]
                    time.sleep(1)
            yield uri
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


def test_stages_and_queued_experiments_log_to_a_team_server_on_postgresql(repo, team_server, tmp_path):
    import mlflow

    from dicomflow.signing import (
        SIGNING_KEY_FILE_ENV,
        VERIFY_KEY_FILE_ENV,
        download_verified,
        verify_key_from_env,
        write_key_pair,
    )

    root, env = repo
    # A team server takes no clone-local key: the team's key pair is given, as in CI.
    private, public = write_key_pair(tmp_path / "team-keys")
    server_env = {**env, "MLFLOW_TRACKING_URI": team_server, SIGNING_KEY_FILE_ENV: str(private),
                  VERIFY_KEY_FILE_ENV: str(public)}
    rates = ["0.0006"]  # its train and evaluate stages log to the server and register the champion
    _run_queue(root, server_env, rates)

    mlflow.set_tracking_uri(team_server)
    try:
        client = mlflow.MlflowClient()
        version = client.get_model_version_by_alias("dicomflow-classifier", "champion")
        evaluation = client.get_run(version.run_id)
        run = client.get_run(evaluation.data.tags["mlflow.parentRunId"])
        assert run.info.experiment_id == evaluation.info.experiment_id == client.get_experiment_by_name(
            "dicomflow").experiment_id
        assert run.info.status == "FINISHED" and run.data.params["train.epochs"]
        assert "test_roc_auc" in run.data.metrics and "val_auc" in run.data.metrics
        logged = {a.path for folder in ("reports", "data") for a in client.list_artifacts(run.info.run_id, folder)}
        assert {"reports/train_history.csv", "data/split_counts.csv"} <= logged
        _assert_complete_runs(client, rates)
        verified = download_verified("models:/dicomflow-classifier@champion", tmp_path / "champion",
                                     key=verify_key_from_env({VERIFY_KEY_FILE_ENV: str(public)}))
        model = mlflow.pyfunc.load_model(str(verified))
        files = sorted(str(path) for path in (root / "data").rglob("*.dcm"))[:3]
        with serving_root(root / "data"):
            predicted = model.predict(pd.DataFrame({"path": files}))
        assert predicted["probability"].between(0, 1).all() and len(predicted) == 3
    finally:
        mlflow.set_tracking_uri(None)
