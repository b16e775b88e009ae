"""MLflow glue: the tracking URI, tags and flattened params."""

from __future__ import annotations

import pytest

from dicomflow import tracking


def test_tracking_uri_defaults_to_the_repository_sqlite_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_queued_experiments_log_to_the_repository_that_queued_them(tmp_path, monkeypatch):
    workspace = tmp_path / ".dvc" / "tmp" / "exps" / "run" / "3f2a9c"
    workspace.mkdir(parents=True)
    monkeypatch.chdir(workspace)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.repository_root() == tmp_path.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.repository_root(tmp_path / "src") == (tmp_path / "src").resolve()


def test_data_version_reads_the_hash_in_data_dvc(tmp_path):
    pointer = tmp_path / "data.dvc"
    assert tracking.data_version(pointer) == "unknown"
    pointer.write_text("outs:\n- md5: 0123abcd.dir\n  path: data\n")
    assert tracking.data_version(pointer) == "0123abcd.dir"


def test_flatten_params_uses_dvc_dotted_keys():
    nested = {"train": {"lr": 0.1, "epochs": 3}, "ingest": {"classes": [0, 1]}}
    assert tracking.flatten_params(nested) == {"train.lr": 0.1, "train.epochs": 3, "ingest.classes": [0, 1]}


def test_run_names_hold_no_random_words():
    import re

    assert re.fullmatch(r"train-\d{8}-\d{6}", tracking.run_name("train"))


def test_run_tags_mark_a_workspace_that_differs_from_its_commit(tmp_path, monkeypatch):
    """As `dvc exp run -S train.lr=...` leaves it: params changed, the experiment's name set."""
    import subprocess

    monkeypatch.chdir(tmp_path)
    for command in (["git", "init", "-q"], ["git", "config", "user.email", "t@example.org"],
                    ["git", "config", "user.name", "t"]):
        subprocess.run(command, check=True)
    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.001\n")
    (tmp_path / "notes.txt").write_text("not part of the pipeline\n")
    subprocess.run(["git", "add", "-A"], check=True)
    subprocess.run(["git", "commit", "-qm", "base"], check=True)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    (tmp_path / "notes.txt").write_text("edited, but not a pipeline file\n")
    clean = tracking.run_tags()
    assert "workspace_modified" not in clean and "dvc_experiment" not in clean
    assert clean["git_commit"] == subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                 text=True).stdout.strip()

    (tmp_path / "params.yaml").write_text("train:\n  lr: 0.01\n")
    monkeypatch.setenv("DVC_EXP_NAME", "tangy-frog")
    changed = tracking.run_tags()
    assert changed["workspace_modified"] == "true" and changed["dvc_experiment"] == "tangy-frog"


@pytest.mark.slow
def test_the_experiment_opens_in_the_model_training_view(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        tracking.configure_mlflow()
        experiment = mlflow.MlflowClient().get_experiment_by_name("dicomflow")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    finally:
        mlflow.set_tracking_uri(None)


def _log_a_run(folder, monkeypatch, text: str) -> str:
    """In ``folder`` as a stage runs there: configure_mlflow, then a run with one text artifact."""
    import mlflow

    monkeypatch.chdir(folder)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        tracking.configure_mlflow()
        with mlflow.start_run() as run:
            mlflow.log_text(text, "notes.txt")
        return run.info.run_id
    finally:
        mlflow.set_tracking_uri(None)


def _read_artifact(folder, run_id: str) -> str:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    try:
        return mlflow.artifacts.load_text(f"runs:/{run_id}/notes.txt")
    finally:
        mlflow.set_tracking_uri(None)


class TestMovedRepository:
    """A repository with its SQLite store and artifacts copied or moved elsewhere: new runs land in
    the new folder, never the old, and the old runs are read from the copy."""

    @pytest.mark.slow
    def test_a_copy_writes_its_runs_into_its_own_tree(self, tmp_path, monkeypatch):
        import shutil

        original, copy = tmp_path / "original", tmp_path / "copy"
        original.mkdir()
        first = _log_a_run(original, monkeypatch, "first")
        before = sorted(path.relative_to(original) for path in (original / "mlruns").rglob("*"))
        shutil.copytree(original, copy)
        (original / "mlruns" / "1" / first / "artifacts" / "notes.txt").write_text("only in the original")

        second = _log_a_run(copy, monkeypatch, "second")
        assert (copy / "mlruns" / "1" / second / "artifacts" / "notes.txt").read_text() == "second"
        assert sorted(path.relative_to(original) for path in (original / "mlruns").rglob("*")) == before
        assert _read_artifact(copy, first) == "first"  # the copy's own file, not the original's
        assert _read_artifact(original, first) == "only in the original"

    @pytest.mark.slow
    def test_a_moved_repository_reads_its_old_runs_and_writes_where_it_is(self, tmp_path, monkeypatch):
        before, after = tmp_path / "before", tmp_path / "after"
        before.mkdir()
        first = _log_a_run(before, monkeypatch, "first")
        before.rename(after)
        second = _log_a_run(after, monkeypatch, "second")
        assert not before.exists()
        assert _read_artifact(after, first) == "first" and _read_artifact(after, second) == "second"
        assert (after / "mlruns" / "1" / second / "artifacts" / "notes.txt").is_file()

    @pytest.mark.slow
    def test_an_artifact_location_placed_elsewhere_on_purpose_is_kept(self, tmp_path, monkeypatch):
        import mlflow

        repo, elsewhere = tmp_path / "repo", tmp_path / "big-disk" / "artifacts"
        repo.mkdir()
        monkeypatch.chdir(repo)  # the store made here, as a stage makes it
        mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
        try:
            mlflow.create_experiment("dicomflow", artifact_location=str(elsewhere))
        finally:
            mlflow.set_tracking_uri(None)
        assert tracking.relocate_artifact_paths(repo / "mlflow.db", repo) == 0
        run_id = _log_a_run(repo, monkeypatch, "kept")
        assert (elsewhere / run_id / "artifacts" / "notes.txt").read_text() == "kept"

    @pytest.mark.slow
    def test_nothing_changes_in_place_or_without_a_store(self, tmp_path, monkeypatch):
        assert tracking.relocate_artifact_paths(tmp_path / "mlflow.db", tmp_path) == 0
        _log_a_run(tmp_path, monkeypatch, "here")
        assert tracking.relocate_artifact_paths(tmp_path / "mlflow.db", tmp_path) == 0


@pytest.mark.slow
def test_a_full_disk_while_logging_artifacts_is_one_line_naming_the_file_and_disk(tmp_path):
    """A real write past a file size limit (EFBIG, handled as ENOSPC and EDQUOT are) while a
    run logs an artifact, in a stage process: one line, and the run is FAILED."""
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    big = tmp_path / "history.csv"
    big.write_bytes(b"0" * (8 << 20))
    child = (
        "import mlflow\n"
        "from dicomflow import tracking\n"
        "from dicomflow.runtime.stage import run_stage\n"
        "def main():\n"
        "    tracking.configure_mlflow()\n"
        "    with mlflow.start_run():\n"
        "        with tracking.artifact_writes('the training history and curves'):\n"
        f"            mlflow.log_artifact({str(big)!r}, artifact_path='reports')\n"
        "run_stage(main)\n")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))  # above the store, below the file

    repo = Path(__file__).resolve().parents[1]
    env = {key: value for key, value in __import__("os").environ.items() if key != "MLFLOW_TRACKING_URI"}
    result = subprocess.run([sys.executable, "-c", child], cwd=tmp_path, env={**env, "PYTHONPATH": str(repo)},
                            capture_output=True, text=True, timeout=300, preexec_fn=limit)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 1, result.stderr[-2000:]
    assert last.startswith("error: File too large while writing the training history and curves to "
                           f"{tmp_path}/mlruns/1/")
    assert "/artifacts, on the disk mounted at " in last and " GiB free): the run is marked FAILED" in last
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        (run,) = mlflow.search_runs(experiment_names=["dicomflow"], output_format="list")
        assert run.info.status == "FAILED"
    finally:
        mlflow.set_tracking_uri(None)
