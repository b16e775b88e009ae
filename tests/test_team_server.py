"""The team server's authentication: a real `mlflow server --app-name basic-auth` on loopback,
started by `make mlflow-server`, its users set up by `dicomflow team-users`, and refusals checked
over plain HTTP (SQLite backend here; tests/test_pipeline_queues.py runs the pipeline against
PostgreSQL)."""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from dicomflow import team
from dicomflow.errors import SettingsError

REPO = Path(__file__).resolve().parents[1]
MODEL = "dicomflow-classifier"  # evaluate.registered_model_name in params.yaml


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TestBinding:
    @pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
    def test_loopback_may_run_without_authentication(self, host):
        team.check_binding(host, authenticated=False)

    @pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "mlflow.example.org"])
    def test_beyond_loopback_without_authentication_is_refused(self, host):
        with pytest.raises(SettingsError, match=rf"--host {host} listens beyond loopback.*without authentication"):
            team.check_binding(host, authenticated=False)
        team.check_binding(host, authenticated=True)

    def test_the_command_refuses_in_one_line_before_starting_anything(self, tmp_path):
        result = subprocess.run(
            [sys.executable, "-m", "dicomflow", "team-server", "--backend-store-uri",
             f"sqlite:///{tmp_path / 'm.db'}", "--host", "0.0.0.0", "--no-auth"],
            env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and not (tmp_path / "m.db").exists()
        assert result.stderr.strip().splitlines() == [
            "error: --host 0.0.0.0 listens beyond loopback, and the server would run without "
            "authentication: anyone who reaches it could move aliases, delete versions and runs, and "
            "register code. Start it with authentication (drop --no-auth / MLFLOW_AUTH=none), or bind 127.0.0.1"]


class TestAuthConfig:
    def test_the_ini_file_holds_no_password_and_only_its_owner_reads_it(self, tmp_path):
        path = team.write_auth_config(tmp_path / "auth", default_permission="NO_PERMISSIONS")
        import configparser

        config = configparser.ConfigParser()
        config.read(path)
        assert dict(config["mlflow"]) == {
            "default_permission": "NO_PERMISSIONS", "admin_username": "admin",
            "database_uri": f"sqlite:///{tmp_path / 'auth' / 'basic_auth.db'}",
            "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth"}
        assert path.stat().st_mode & 0o777 == 0o600
        assert (tmp_path / "auth" / ".gitignore").read_text() == "*\n"

    def test_an_unknown_default_permission_is_refused(self, tmp_path):
        with pytest.raises(SettingsError, match="--default-permission must be one of NO_PERMISSIONS, READ; got 'EDIT'"):
            team.write_auth_config(tmp_path, default_permission="EDIT")

    def test_the_secrets_must_be_in_the_environment(self, tmp_path):
        with pytest.raises(SettingsError, match="MLFLOW_FLASK_SERVER_SECRET_KEY is not set"):
            team.check_auth_environment(tmp_path, {"MLFLOW_AUTH_ADMIN_PASSWORD": "x" * 16})
        with pytest.raises(SettingsError, match="MLFLOW_AUTH_ADMIN_PASSWORD is not set"):
            team.check_auth_environment(tmp_path, {"MLFLOW_FLASK_SERVER_SECRET_KEY": "k"})
        (tmp_path / "basic_auth.db").touch()  # the admin exists: its password is no longer needed
        team.check_auth_environment(tmp_path, {"MLFLOW_FLASK_SERVER_SECRET_KEY": "k"})


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`make mlflow-server` with basic-auth on a SQLite store; yields (uri, admin password, folder)."""
    folder = tmp_path_factory.mktemp("team")
    port, password = _free_port(), secrets.token_urlsafe(18)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(name, None)
    log = open(folder / "server.log", "w")  # noqa: SIM115 -- the server writes it until the fixture ends
    # -o: the environment is installed already; make must not reinstall it (a shared .venv here).
    process = subprocess.Popen(
        ["make", "-s", "-o", ".venv/.installed", "mlflow-server",
         f"MLFLOW_BACKEND_STORE_URI=sqlite:///{folder / 'mlflow.db'}",
         f"MLFLOW_ARTIFACT_ROOT={folder / 'artifacts'}", f"MLFLOW_AUTH_DIR={folder / 'auth'}",
         f"MLFLOW_PORT={port}", "MLFLOW_WORKERS=1"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                requests.get(f"{uri}/health", timeout=2)
                break
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, \
                    (folder / "server.log").read_text()[-3000:]
                time.sleep(1)
        yield uri, password, folder
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@pytest.fixture(scope="module")
def users(server):
    """`dicomflow team-users` as the admin: a CI identity and a reader; yields their passwords."""
    uri, password, folder = server
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri,
           "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
    result = subprocess.run(
        [sys.executable, "-m", "dicomflow", "team-users", "--credentials-dir", str(folder / "credentials"),
         "--ci", "ci-bot", "--reader", "alice"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    files = {name: folder / "credentials" / f"{name}.password" for name in ("ci-bot", "alice")}
    for name, file in files.items():
        assert f"{name}: " in result.stdout and file.stat().st_mode & 0o777 == 0o600
        assert file.read_text().strip() not in result.stdout + result.stderr  # never printed
    # Rerunning changes no password.
    again = subprocess.run(
        [sys.executable, "-m", "dicomflow", "team-users", "--credentials-dir", str(folder / "credentials"),
         "--ci", "ci-bot", "--reader", "alice"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and again.stdout.count("existed; password unchanged") == 2, again.stderr[-2000:]
    return {name: file.read_text().strip() for name, file in files.items()}


@contextlib.contextmanager
def _as(uri: str, user: str, password: str):
    """MLflow's client in this process, as ``user`` on the server at ``uri``."""
    import mlflow

    saved = {name: os.environ.get(name) for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def registered(server, users):
    """As CI: a run with a tiny logged model, registered as a version of the project's model
    with the champion alias (each step would raise if refused). Returns (run id, version)."""
    import mlflow
    import mlflow.pyfunc

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input):
            return model_input

    with _as(server[0], "ci-bot", users["ci-bot"]):
        mlflow.set_experiment("dicomflow")
        with mlflow.start_run() as run:
            mlflow.log_param("lr", 0.001)
            mlflow.log_text("trained", "notes.txt")
            info = mlflow.pyfunc.log_model(name="model", python_model=Echo(), pip_requirements=["mlflow"])
        version = mlflow.register_model(info.model_uri, MODEL).version
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(MODEL, "champion", version)
        assert client.get_model_version_by_alias(MODEL, "champion").version == version
        assert client.get_run(run.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    return run.info.run_id, str(version)


def _writes(run_id: str, version: str) -> dict[str, tuple[str, str, dict]]:
    """The registry and run writes an attacker would make: method, REST path, body."""
    return {
        "move the champion alias": ("POST", "registered-models/alias",
                                    {"name": MODEL, "alias": "champion", "version": version}),
        "delete the champion alias": ("DELETE", "registered-models/alias", {"name": MODEL, "alias": "champion"}),
        "delete a model version": ("DELETE", "model-versions/delete", {"name": MODEL, "version": version}),
        "delete a run": ("POST", "runs/delete", {"run_id": run_id}),
        "register a version": ("POST", "model-versions/create", {"name": MODEL, "source": f"runs:/{run_id}/model",
                                                                  "run_id": run_id}),
    }


def _call(uri: str, method: str, path: str, body: dict, auth: tuple[str, str] | None) -> requests.Response:
    if method == "DELETE" and path == "registered-models/alias":
        return requests.delete(f"{uri}/api/2.0/mlflow/{path}", params=body, auth=auth, timeout=30)
    return requests.request(method, f"{uri}/api/2.0/mlflow/{path}", json=body, auth=auth, timeout=30)


@pytest.mark.slow
class TestRealServer:
    def test_an_unauthenticated_client_is_refused_everything(self, server, registered):
        uri = server[0]
        for action, (method, path, body) in _writes(*registered).items():
            assert _call(uri, method, path, body, None).status_code == 401, action
        assert requests.get(f"{uri}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                            timeout=30).status_code == 401
        assert requests.get(f"{uri}/api/2.0/mlflow/artifacts/list", params={"run_id": registered[0]},
                            timeout=30).status_code == 401
        assert _call(uri, "POST", "registered-models/alias", {"name": MODEL, "alias": "champion", "version": "1"},
                     ("admin", "not-the-password")).status_code == 401

    def test_a_reader_reads_but_is_refused_every_write(self, server, users, registered):
        uri, reader = server[0], ("alice", users["alice"])
        model = requests.get(f"{uri}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                             auth=reader, timeout=30)
        assert model.status_code == 200 and model.json()["registered_model"]["aliases"][0]["alias"] == "champion"
        assert requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": registered[0]}, auth=reader,
                            timeout=30).status_code == 200
        listed = requests.get(f"{uri}/api/2.0/mlflow/artifacts/list", params={"run_id": registered[0]},
                              auth=reader, timeout=30)
        assert listed.status_code == 200 and [item["path"] for item in listed.json()["files"]] == ["notes.txt"]
        import mlflow
        import pandas as pd

        with _as(uri, *reader):
            assert mlflow.artifacts.load_text(f"runs:/{registered[0]}/notes.txt") == "trained"
            model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
            assert model.predict(pd.DataFrame({"x": [1, 2]}))["x"].tolist() == [1, 2]
        for action, (method, path, body) in _writes(*registered).items():
            assert _call(uri, method, path, body, reader).status_code == 403, action

    def test_ci_registers_and_moves_aliases_but_deletes_nothing(self, server, users, registered):
        uri, ci = server[0], ("ci-bot", users["ci-bot"])
        writes = _writes(*registered)
        for action in ("register a version", "move the champion alias"):
            method, path, body = writes[action]
            assert _call(uri, method, path, body, ci).status_code == 200, action
        for action in ("delete a model version", "delete a run", "delete the champion alias"):
            method, path, body = writes[action]
            assert _call(uri, method, path, body, ci).status_code == 403, action

    def test_nothing_was_changed_by_the_refused_calls(self, server, registered):
        uri, password = server[0], server[1]
        admin = ("admin", password)
        alias = requests.get(f"{uri}/api/2.0/mlflow/registered-models/alias",
                             params={"name": MODEL, "alias": "champion"}, auth=admin, timeout=30)
        assert alias.status_code == 200 and alias.json()["model_version"]["version"] == registered[1]
        run = requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": registered[0]}, auth=admin, timeout=30)
        assert run.json()["run"]["info"]["lifecycle_stage"] == "active"

    def test_a_user_without_a_grant_sees_nothing(self, server, users, registered):
        """Default permission NO_PERMISSIONS: an account the team did not grant reads nothing."""
        from mlflow.server.auth.client import AuthServiceClient

        uri, password = server[0], server[1]
        with _as(uri, "admin", password):
            AuthServiceClient(uri).create_user("stranger", "a-long-enough-password-1")
        stranger = ("stranger", "a-long-enough-password-1")
        assert requests.get(f"{uri}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                            auth=stranger, timeout=30).status_code == 403
        assert requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": registered[0]},
                            auth=stranger, timeout=30).status_code == 403
