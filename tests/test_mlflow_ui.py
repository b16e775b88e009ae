"""The dicomflow experiment in the real MLflow UI, as a fresh browser profile shows it (headless Chromium)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dicomflow import tracking
from pipeline_repo import free_port

# Debian's `chromium` (tools/system-deps installs it for `make test`); Ubuntu's and GitHub's runners'
# names for it or for Chrome.
CHROMIUM = next((name for name in ("chromium", "chromium-browser", "google-chrome") if shutil.which(name)),
                "chromium")


def _log_a_training_run(store: Path, monkeypatch, run_name: str) -> None:
    """What train does to a new store: configure_mlflow creates the experiment, then one run."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    try:
        tracking.configure_mlflow()
        with mlflow.start_run(run_name=run_name):
            mlflow.log_param("train.lr", 0.001)
            mlflow.log_metric("val_auc", 0.9)
    finally:
        mlflow.set_tracking_uri(None)


def _dom_after_load(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran, in a new (empty) Chromium profile."""
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
               "--window-size=1400,900", "--virtual-time-budget=20000", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout


def _page_title(dom: str) -> str:
    """The experiment page's heading (Runs, Overview, Traces, ...)."""
    found = re.search(r"<h2[^>]*>\s*([^<]+?)\s*<", dom)
    return found.group(1) if found else ""


@pytest.mark.slow
def test_an_experiment_without_the_kind_tag_gets_it_on_the_next_run(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        experiment_id = client.create_experiment("dicomflow")  # as an older dicomflow left it
        assert "mlflow.experimentKind" not in client.get_experiment(experiment_id).tags
        tracking.configure_mlflow()
        assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_the_ui_address_names_the_experiment_and_the_model_training_view(tmp_path, monkeypatch):
    base = "http://127.0.0.1:5000/"
    assert tracking.experiment_ui_url(base, tmp_path / "none.db") == (
        "http://127.0.0.1:5000/#/experiments?workflowType=machine_learning")
    _log_a_training_run(tmp_path / "mlflow.db", monkeypatch, "train-first")
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment_id = mlflow.get_experiment_by_name("dicomflow").experiment_id
    finally:
        mlflow.set_tracking_uri(None)
    assert tracking.experiment_ui_url(base, tmp_path / "mlflow.db") == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}?workflowType=machine_learning")


@pytest.mark.slow
def test_a_fresh_browser_opens_the_experiment_on_its_runs_table(tmp_path, monkeypatch):
    """`make ui` prints this address; MLflow 3.17 opens the bare one on GenAI's overview."""
    store = tmp_path / "mlflow.db"
    _log_a_training_run(store, monkeypatch, "train-20261206-120000")
    port = free_port()
    environment = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    environment.pop("MLFLOW_TRACKING_URI", None)
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{store}",
                               "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, "mlflow ui exited before it answered"
                assert time.monotonic() < deadline, "mlflow ui did not answer within 180 s"
                time.sleep(1)

        url = tracking.experiment_ui_url(base, store)
        dom = _dom_after_load(url, tmp_path / "profile")
        assert _page_title(dom) == "Runs"
        assert "train-20261206-120000" in dom and 'role="grid"' in dom  # the runs table, with the run

        # Why the address carries the view: without it a fresh profile lands on GenAI's overview.
        # When this fails, MLflow honours the experiment's kind tag: the parameter and the docs'
        # note (docs/experiments.md) can go.
        bare = url.split("?")[0]
        assert _page_title(_dom_after_load(bare, tmp_path / "profile-bare")) == "Overview"
    finally:
        server.terminate()
        server.wait(timeout=60)
