"""The team's MLflow server with MLflow's own authentication, and the identities that use it.

The server is ``mlflow server --app-name basic-auth``: every request needs a user name and a
password, and each user holds a permission per experiment and per registered model. This module
writes the auth app's configuration file (never a password in it: MLflow reads the admin's from
``MLFLOW_AUTH_ADMIN_PASSWORD``), builds the server's command line, refuses to listen beyond
loopback without authentication, and sets up the identities of a team:

- the **admin** (created by the server on its first start from ``MLFLOW_AUTH_ADMIN_PASSWORD``);
- a **CI identity** with EDIT on the project's experiment and registered model: it logs runs,
  registers versions and moves aliases, and cannot delete versions, runs or permissions;
- **read-only users** with READ on both.

The default permission is NO_PERMISSIONS: an account sees only what it was granted, so a user
added for another project, or a new experiment, is not readable by everyone (minimum necessary).
"""

from __future__ import annotations

import configparser
import ipaddress
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from dicomflow.errors import SettingsError

logger = logging.getLogger(__name__)

AUTH_CONFIG_FILE = "basic_auth.ini"
AUTH_DATABASE_FILE = "basic_auth.db"
DEFAULT_PERMISSION = "NO_PERMISSIONS"
DEFAULT_PERMISSIONS = ("NO_PERMISSIONS", "READ")
ADMIN_PASSWORD_ENV = "MLFLOW_AUTH_ADMIN_PASSWORD"  # MLflow's own variable
ADMIN_USERNAME_ENV = "MLFLOW_AUTH_ADMIN_USERNAME"  # MLflow's own variable
SECRET_KEY_ENV = "MLFLOW_FLASK_SERVER_SECRET_KEY"  # MLflow's own: the auth app's CSRF key
# What each identity is granted on the project's experiment and registered model.
ROLE_PERMISSIONS = {"ci": "EDIT", "reader": "READ"}
PASSWORD_SUFFIX = ".password"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (what ``--host`` binds) is reachable from this machine only.

    A host name other than ``localhost`` counts as beyond loopback: what it resolves to can change.
    """
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, *, authenticated: bool) -> None:
    """Refuse to serve beyond loopback without authentication.

    Raises
    ------
    SettingsError
        When ``host`` is not a loopback address and ``authenticated`` is False.
    """
    if not authenticated and not is_loopback(host):
        raise SettingsError(
            f"--host {host} listens beyond loopback, and the server would run without authentication: "
            "anyone who reaches it could move aliases, delete versions and runs, and register code. "
            "Start it with authentication (drop --no-auth / MLFLOW_AUTH=none), or bind 127.0.0.1")


def write_auth_config(folder: Path, *, default_permission: str = DEFAULT_PERMISSION,
                      admin_username: str = "admin") -> Path:
    """Write the basic-auth app's ini file into ``folder`` (mode 0600) and return its path.

    The file names the default permission, the user database (``basic_auth.db`` beside it) and
    the admin's user name; it holds no password: MLflow reads the admin's from
    ``MLFLOW_AUTH_ADMIN_PASSWORD`` when it first creates the admin.

    Raises
    ------
    SettingsError
        When ``default_permission`` is not one of :data:`DEFAULT_PERMISSIONS`.
    """
    if default_permission not in DEFAULT_PERMISSIONS:
        raise SettingsError(f"--default-permission must be one of {', '.join(DEFAULT_PERMISSIONS)}; "
                            f"got {default_permission!r}")
    folder = folder.resolve()
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The user database holds password hashes: never committed, wherever the folder is.
    (folder / ".gitignore").write_text("*\n", encoding="utf-8")
    config = configparser.ConfigParser()
    config["mlflow"] = {
        "default_permission": default_permission,
        "database_uri": f"sqlite:///{folder / AUTH_DATABASE_FILE}",
        "admin_username": admin_username,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    path = folder / AUTH_CONFIG_FILE
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write("# Written by `dicomflow team-server`; no password here (MLFLOW_AUTH_ADMIN_PASSWORD).\n")
        config.write(stream)
    return path


def check_auth_environment(folder: Path, environ: dict[str, str]) -> None:
    """Refuse to start the authenticated server without its secrets in the environment.

    Raises
    ------
    SettingsError
        When ``MLFLOW_FLASK_SERVER_SECRET_KEY`` is unset, or when the admin does not exist yet
        (no user database in ``folder``) and ``MLFLOW_AUTH_ADMIN_PASSWORD`` is unset.
    """
    if not environ.get(SECRET_KEY_ENV):
        raise SettingsError(f"{SECRET_KEY_ENV} is not set: the auth app needs a secret key against "
                            "cross-site request forgery; export a long random value (keep it, like the "
                            "admin password, out of the repository)")
    if not (folder / AUTH_DATABASE_FILE).exists() and not environ.get(ADMIN_PASSWORD_ENV):
        raise SettingsError(f"{ADMIN_PASSWORD_ENV} is not set and {folder}/ holds no user database yet: "
                            "export the admin's password (read -s, or from a file outside the "
                            "repository) for the server's first start")


def server_command(*, backend_store_uri: str, artifacts_destination: str, host: str, port: int,
                   authenticated: bool, workers: int | None = None,
                   allowed_hosts: str | None = None) -> list[str]:
    """The ``mlflow server`` command line of the team server.

    Artifacts are proxied (``--artifacts-destination``): clients upload and download them through
    the server, under its authentication, and runs record ``mlflow-artifacts:/...`` locations,
    which name no client's folder.
    """
    command = ["mlflow", "server", "--backend-store-uri", backend_store_uri, "--serve-artifacts",
               "--artifacts-destination", artifacts_destination, "--host", host, "--port", str(port)]
    if workers is not None:
        command += ["--workers", str(workers)]
    if allowed_hosts:  # the names clients use (a TLS proxy's): MLflow's DNS-rebinding check
        command += ["--allowed-hosts", allowed_hosts]
    if authenticated:
        command += ["--app-name", "basic-auth"]
    return command


@dataclass(frozen=True)
class Identity:
    """One account of the team server: its name, its role (``admin``, ``ci``, ``reader``) and,
    when it was created now, the file its generated password was written to."""

    name: str
    role: str
    password_file: Path | None


def _write_password(folder: Path, name: str) -> Path:
    """A new random password for ``name`` in ``folder``/NAME.password (0600); returns the path."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n", encoding="utf-8")  # passwords: never committed
    path = folder / f"{name}{PASSWORD_SUFFIX}"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as stream:
        stream.write(secrets.token_urlsafe(24) + "\n")
    return path


def _ensure_user(auth, name: str, credentials: Path) -> Path | None:
    """Create ``name`` with a generated password unless it exists; the password file or None."""
    from mlflow.exceptions import RestException

    try:
        auth.get_user(name)
        return None  # exists: its password stays as it is
    except RestException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
    if (credentials / f"{name}{PASSWORD_SUFFIX}").exists():
        raise SettingsError(f"{credentials}/{name}{PASSWORD_SUFFIX} exists but the server has no user {name}: "
                            "move the file away (it is not that user's password) and run again")
    path = _write_password(credentials, name)
    auth.create_user(name, path.read_text(encoding="utf-8").strip())
    return path


def set_up_team(tracking_uri: str, *, experiment: str, registered_model: str, ci: list[str],
                readers: list[str], admins: list[str], credentials: Path) -> list[Identity]:
    """Create the project's experiment and registered model (owned by the admin running this),
    the users, and their grants on both; return who was set up.

    Runs as an admin of the server at ``tracking_uri`` (``MLFLOW_TRACKING_USERNAME`` and
    ``MLFLOW_TRACKING_PASSWORD``). A new user gets a random password, written to
    ``credentials``/NAME.password (mode 0600) and never printed; an existing user keeps theirs.
    Rerunning it is safe: grants are set again, nothing is deleted.

    Raises
    ------
    SettingsError
        When a user is named in two roles.
    """
    import mlflow
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    from dicomflow.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND

    named = [*ci, *readers, *admins]
    if doubled := sorted({name for name in named if named.count(name) > 1}):
        raise SettingsError(f"each user has one role; named twice: {', '.join(doubled)}")
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(
        experiment, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND})
    try:
        client.create_registered_model(registered_model)
    except RestException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise

    auth = AuthServiceClient(tracking_uri)
    identities = []
    for role, names in (("admin", admins), ("ci", ci), ("reader", readers)):
        for name in names:
            identities.append(Identity(name, role, _ensure_user(auth, name, credentials)))
            if role == "admin":
                auth.update_user_admin(name, True)
                continue
            _grant(auth, name, "experiment", experiment_id, ROLE_PERMISSIONS[role])
            _grant(auth, name, "registered_model", registered_model, ROLE_PERMISSIONS[role])
    return identities


def _grant(auth, name: str, resource_type: str, resource_id: str, permission: str) -> None:
    """Grant ``permission``, replacing an earlier grant of ``name`` on the same resource."""
    from mlflow.exceptions import RestException

    try:
        auth.grant_user_permission(name, resource_type, resource_id, permission)
    except RestException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        auth.revoke_user_permission(name, resource_type, resource_id)
        auth.grant_user_permission(name, resource_type, resource_id, permission)
