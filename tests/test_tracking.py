"""MLflow glue: the tracking URI, tags and flattened params."""

from __future__ import annotations

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


def test_the_experiment_opens_in_the_model_training_view(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        tracking.configure_mlflow()
        experiment = mlflow.MlflowClient().get_experiment_by_name("dicomflow")
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    finally:
        mlflow.set_tracking_uri(None)
