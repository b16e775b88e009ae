"""Signed models (dicomflow/signing.py, ``dicomflow predict``, ``dicomflow keygen``) with a real
MLflow SQLite store and file artifact store, real pyfunc models registered through MLflow's open
API, and real Ed25519 keys written to disk.

The models are tiny pyfuncs whose class lives in a module shipped as the model's code
(``code_paths``): importing that module or loading the model writes a marker file, so a test can
tell whether any of a model's code ran. The store's files are altered where an attacker with
write access to the artifact store would alter them (the version's storage location).
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from dicomflow.errors import DataError, SettingsError
from dicomflow.signing import (
    SIGNATURE_TAG,
    SIGNING_KEY_ENV,
    SIGNING_KEY_FILE_ENV,
    VERIFY_KEY_ENV,
    VERIFY_KEY_FILE_ENV,
    SignatureError,
    check_folder,
    download_verified,
    sign_folder,
    sign_model_version,
    signing_key_from_env,
    verify_key_from_env,
    write_key_pair,
)

REPO = Path(__file__).resolve().parents[1]
NAME = "signing-test"

# A model whose code leaves a trace: the module writes MARKER when imported, the model again
# when MLflow loads it (load_context). predict answers what `dicomflow predict` expects.
MODEL_MODULE = '''
import os
from pathlib import Path

import pandas as pd
import mlflow.pyfunc

MARKER = Path(os.environ["SIGNING_TEST_MARKER_DIR"]) / "{tag}.ran"
MARKER.write_text("imported")


class Model(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        MARKER.write_text("loaded")

    def predict(self, context, model_input, params=None):
        n = len(model_input)
        return pd.DataFrame({{"probability": [0.25] * n, "label": [0] * n, "error": [""] * n}})
'''


@pytest.fixture(scope="module")
def markers(tmp_path_factory):
    """The folder the models' code writes its markers to (named by an environment variable, so
    the same code works in this process and in `dicomflow predict`)."""
    folder = tmp_path_factory.mktemp("markers")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SIGNING_TEST_MARKER_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def store(tmp_path_factory, markers):
    """A temporary SQLite tracking store with file artifacts; MLFLOW_TRACKING_URI points at it."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("signing", artifact_location=(root / "artifacts").as_uri())
        try:
            yield {"root": root, "uri": uri, "experiment": experiment}
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The team's key pair and a stranger's, as files written by write_key_pair."""
    team = write_key_pair(tmp_path_factory.mktemp("keys") / "team")
    other = write_key_pair(tmp_path_factory.mktemp("keys") / "other")
    return {"team": team, "other": other,
            "sign": signing_key_from_env({SIGNING_KEY_FILE_ENV: str(team[0])}),
            "verify": verify_key_from_env({VERIFY_KEY_FILE_ENV: str(team[1])}),
            "other_sign": signing_key_from_env({SIGNING_KEY_FILE_ENV: str(other[0])}),
            "other_verify": verify_key_from_env({VERIFY_KEY_FILE_ENV: str(other[1])})}


def _register(store, folder: Path, tag: str) -> str:
    """Log a model whose code is the module ``model_<tag>`` and register it under NAME; its
    version. Its marker does not exist afterwards."""
    module = folder / f"model_{tag}.py"
    module.parent.mkdir(parents=True, exist_ok=True)
    module.write_text(MODEL_MODULE.format(tag=tag))
    sys.path.insert(0, str(folder))
    try:
        python_model = importlib.import_module(f"model_{tag}").Model()
    finally:
        sys.path.remove(str(folder))
    with mlflow.start_run(experiment_id=store["experiment"]):
        info = mlflow.pyfunc.log_model(name="model", python_model=python_model, code_paths=[str(module)],
                                       pip_requirements=["pandas"])
    # Importing the module here to log the model wrote its marker: what counts is what runs later.
    (Path(os.environ["SIGNING_TEST_MARKER_DIR"]) / f"{tag}.ran").unlink()
    return str(mlflow.register_model(info.model_uri, NAME).version)


def _stored_folder(version: str) -> Path:
    """Where the artifact store keeps the version's files (what an attacker with write access edits)."""
    uri = MlflowClient().get_model_version_download_uri(NAME, version)
    return Path(uri.removeprefix("file://"))


def _stored_files(version: str) -> list[Path]:
    folder = _stored_folder(version)
    return sorted(path for path in folder.rglob("*") if path.is_file())


@pytest.fixture(scope="module")
def signed(store, keys, markers, tmp_path_factory):
    """A version registered and signed with the team's key; alias champion."""
    version = _register(store, tmp_path_factory.mktemp("code"), "good")
    sign_model_version(NAME, version, key=keys["sign"])
    MlflowClient().set_registered_model_alias(NAME, "champion", version)
    return version


def _fresh_signed(store, keys, tmp_path, tag: str) -> str:
    version = _register(store, tmp_path / "code", tag)
    sign_model_version(NAME, version, key=keys["sign"])
    return version


def _predict(store, tmp_path: Path, uri: str, verify_key: Path) -> subprocess.CompletedProcess:
    """`dicomflow predict` on one file, in a process of its own, as a user runs it."""
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    (folder / "a.dcm").write_bytes(b"not read by these models")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store["uri"],
           VERIFY_KEY_FILE_ENV: str(verify_key)}
    return subprocess.run([sys.executable, "-m", "dicomflow", "predict", str(folder), "--model", uri,
                           "--output", str(tmp_path / "out.csv")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300)


def _error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


@pytest.mark.slow
class TestDownloadVerified:
    def test_a_signed_version_verifies_and_the_copy_holds_exactly_the_stored_files(self, signed, keys, tmp_path):
        local = download_verified(f"models:/{NAME}/{signed}", tmp_path / "dl", key=keys["verify"])
        stored = _stored_folder(signed)
        expected = {path.relative_to(stored).as_posix(): path.read_bytes() for path in _stored_files(signed)}
        copied = {path.relative_to(local).as_posix(): path.read_bytes() for path in local.rglob("*") if path.is_file()}
        assert copied == expected
        assert {"MLmodel", "python_model.pkl", "code/model_good.py", "requirements.txt"} <= set(copied)
        assert local.parent.parent == tmp_path / "dl"
        assert stat.S_IMODE(local.parent.stat().st_mode) == 0o700

    def test_an_alias_is_resolved_to_its_version(self, signed, keys, tmp_path):
        local = download_verified(f"models:/{NAME}@champion", tmp_path, key=keys["verify"])
        assert (local / "MLmodel").is_file()

    def test_the_tag_lists_every_stored_file_with_its_sha256(self, signed):
        import hashlib

        record = json.loads(MlflowClient().get_model_version(NAME, signed).tags[SIGNATURE_TAG])
        stored = _stored_folder(signed)
        assert record["files"] == {path.relative_to(stored).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
                                   for path in _stored_files(signed)}
        assert record["algorithm"] == "ed25519"

    def test_an_unsigned_version_is_refused(self, store, keys, tmp_path):
        version = _register(store, tmp_path / "code", "unsigned")
        with pytest.raises(SignatureError, match=rf"^refused models:/{NAME}/{version}: not signed \(no "
                                                 r"dicomflow.signature tag\); [^\n]*$"):
            download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])
        assert not list((tmp_path / "dl").iterdir())  # the refused copy is gone

    def test_one_byte_changed_in_any_file_is_refused_naming_the_file(self, store, keys, tmp_path):
        version = _fresh_signed(store, keys, tmp_path, "bytes")
        stored = _stored_folder(version)
        files = _stored_files(version)
        assert len(files) >= 6
        for path in files:
            original = path.read_bytes()
            path.write_bytes(bytes([original[0] ^ 1]) + original[1:])
            try:
                relative = path.relative_to(stored).as_posix()
                with pytest.raises(SignatureError, match=rf"^refused models:/{NAME}/{version}: its files differ "
                                                         rf"from the signed ones \(changed: {relative}\)"):
                    download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])
            finally:
                path.write_bytes(original)
        download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])  # restored: verifies

    def test_a_file_added_or_removed_is_refused(self, store, keys, tmp_path):
        version = _fresh_signed(store, keys, tmp_path, "added")
        stored = _stored_folder(version)
        (stored / "code" / "sitecustomize.py").write_text("print('hello')\n")
        with pytest.raises(SignatureError, match=r"\(not signed: code/sitecustomize.py\)"):
            download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])
        (stored / "code" / "sitecustomize.py").unlink()
        (stored / "requirements.txt").unlink()
        with pytest.raises(SignatureError, match=r"\(missing: requirements.txt\)"):
            download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])

    def test_mlflows_own_note_of_the_version_is_not_an_alteration_but_other_content_is(self, store, keys, tmp_path):
        """A plain ``mlflow.pyfunc.load_model("models:/...")`` on a local store writes
        ``registered_model_meta`` into the stored folder: a user's ordinary load must not make the
        version unverifiable; the same file name with anything else in it is refused."""
        version = _fresh_signed(store, keys, tmp_path, "note")
        stored = _stored_folder(version)
        mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")  # what any MLflow user may do
        assert (stored / "registered_model_meta").is_file()
        local = download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])
        assert not (local / "registered_model_meta").exists()
        (stored / "registered_model_meta").write_text(f"model_name: {NAME}\nmodel_version: '{version}'\nloader: x\n")
        with pytest.raises(SignatureError, match=r"\(not signed: registered_model_meta\)"):
            download_verified(f"models:/{NAME}/{version}", tmp_path / "dl2", key=keys["verify"])

    def test_a_file_name_cannot_break_the_one_line(self, keys, tmp_path):
        """On a folder (MLflow's own download refuses such a name before this check could)."""
        (tmp_path / "MLmodel").write_text("flavors: {}\n")
        signature = sign_folder(tmp_path, key=keys["sign"])
        (tmp_path / "x\nerror: all fine").write_text("")
        with pytest.raises(SignatureError) as caught:
            check_folder(tmp_path, signature, key=keys["verify"])
        assert str(caught.value) == "its files differ from the signed ones (not signed: x\\nerror: all fine)"

    def test_a_link_in_the_model_is_refused(self, store, keys, tmp_path):
        version = _fresh_signed(store, keys, tmp_path, "link")
        stored = _stored_folder(version)
        os.symlink("../MLmodel", stored / "code" / "linked.py")
        # MLflow's local download copies the link's target: the copy then holds an unsigned file.
        with pytest.raises(SignatureError, match=r"\(not signed: code/linked.py\)"):
            download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])
        (stored / "code" / "linked.py").unlink()
        (tmp_path / "elsewhere.py").write_text("x = 1\n")
        os.symlink(tmp_path / "elsewhere.py", stored / "code" / "linked.py")
        # A link out of the store: MLflow refuses to download it, and so the model is not loaded.
        with pytest.raises(DataError, match=rf"^cannot download models:/{NAME}/{version}: MlflowException: "):
            download_verified(f"models:/{NAME}/{version}", tmp_path / "dl", key=keys["verify"])

    def test_another_key_is_refused(self, signed, keys, tmp_path):
        expected = (rf"^refused models:/{NAME}@champion \(version {signed}\): signed with another key \(key id "
                    rf"{keys['verify'].key_id}; the verify key from {VERIFY_KEY_FILE_ENV}=.* is "
                    rf"{keys['other_verify'].key_id}\)")
        with pytest.raises(SignatureError, match=expected):
            download_verified(f"models:/{NAME}@champion", tmp_path, key=keys["other_verify"])

    def test_a_tag_forged_with_another_key_under_the_teams_key_id_is_refused(self, store, keys, tmp_path):
        version = _register(store, tmp_path / "code", "forged")
        sign_model_version(NAME, version, key=keys["other_sign"])
        client = MlflowClient()
        record = json.loads(client.get_model_version(NAME, version).tags[SIGNATURE_TAG])
        record["key_id"] = keys["verify"].key_id
        client.set_model_version_tag(NAME, version, SIGNATURE_TAG, json.dumps(record))
        with pytest.raises(SignatureError, match="the signature does not match its manifest"):
            download_verified(f"models:/{NAME}/{version}", tmp_path, key=keys["verify"])

    def test_a_signature_copied_from_another_version_is_refused(self, store, signed, keys, tmp_path):
        version = _register(store, tmp_path / "code", "copied")
        client = MlflowClient()
        client.set_model_version_tag(NAME, version, SIGNATURE_TAG,
                                     client.get_model_version(NAME, signed).tags[SIGNATURE_TAG])
        with pytest.raises(SignatureError, match=r"its files differ from the signed ones \(changed: .*"
                                                 r"not signed: code/model_copied.py; missing: code/model_good.py\)"):
            download_verified(f"models:/{NAME}/{version}", tmp_path, key=keys["verify"])

    def test_a_garbled_tag_is_refused_without_quoting_it(self, store, keys, tmp_path):
        version = _register(store, tmp_path / "code", "garbled")
        client = MlflowClient()
        client.set_model_version_tag(NAME, version, SIGNATURE_TAG, "Patient^Jane was here")
        with pytest.raises(SignatureError, match="tag is not a dicomflow-signature/1 signature") as caught:
            download_verified(f"models:/{NAME}/{version}", tmp_path, key=keys["verify"])
        assert "Jane" not in str(caught.value)
        client.set_model_version_tag(NAME, version, SIGNATURE_TAG, json.dumps(
            {"format": "dicomflow-signature/1", "algorithm": "ed25519", "key_id": "Patient^Jane",
             "files": {}, "signature": ""}))
        with pytest.raises(SignatureError, match=r"signed with another key \(key id not a key id;") as caught:
            download_verified(f"models:/{NAME}/{version}", tmp_path, key=keys["verify"])
        assert "Jane" not in str(caught.value)

    @pytest.mark.parametrize("uri", ["runs:/0123/model", "/tmp/some/model", f"models:/{NAME}/latest",
                                     f"models:/{NAME}/1/MLmodel"])
    def test_only_a_registered_version_or_alias_is_accepted(self, signed, keys, tmp_path, uri):
        with pytest.raises(SignatureError, match="give models:/NAME/VERSION or models:/NAME@ALIAS"):
            download_verified(uri, tmp_path, key=keys["verify"])

    def test_an_unknown_alias_is_a_data_error_naming_the_uri(self, signed, keys, tmp_path):
        with pytest.raises(DataError, match=rf"cannot load model models:/{NAME}@nope: "):
            download_verified(f"models:/{NAME}@nope", tmp_path, key=keys["verify"])


@pytest.mark.slow  # each starts a `dicomflow predict` process that loads a model
class TestPredictVerifies:
    def test_a_signed_champion_predicts(self, signed, store, keys, tmp_path):
        result = _predict(store, tmp_path, f"models:/{NAME}@champion", keys["team"][1])
        assert result.returncode == 0, result.stderr[-2000:]
        assert (tmp_path / "out.csv").read_text().splitlines() == ["path,probability,label,error", "a.dcm,0.25,0,"]

    def test_a_planted_champion_is_refused_before_any_of_its_code_runs(self, signed, store, keys, markers, tmp_path):
        planted = _register(store, tmp_path / "code", "planted")  # through the open API, no signature
        client = MlflowClient()
        client.set_registered_model_alias(NAME, "champion", planted)
        try:
            result = _predict(store, tmp_path, f"models:/{NAME}@champion", keys["team"][1])
        finally:
            client.set_registered_model_alias(NAME, "champion", signed)
        assert result.returncode == 1
        assert _error_lines(result) == [(f"error: refused models:/{NAME}@champion (version {planted}): not signed "
                                         f"(no {SIGNATURE_TAG} tag); only versions registered by evaluate are signed "
                                         "(docs/security/signed-models.md)")]
        assert not (markers / "planted.ran").exists()
        assert not (tmp_path / "out.csv").exists()

    def test_the_planted_models_code_does_run_when_loaded_unverified(self, store, markers, tmp_path):
        """The marker works: the same kind of model writes it as soon as MLflow loads it."""
        version = _register(store, tmp_path / "code", "control")
        mlflow.pyfunc.load_model(f"models:/{NAME}/{version}")
        assert (markers / "control.ran").read_text() == "loaded"

    def test_an_altered_champion_is_refused_before_any_of_its_code_runs(self, store, keys, markers, tmp_path):
        version = _fresh_signed(store, keys, tmp_path, "altered")
        module = _stored_folder(version) / "code" / "model_altered.py"
        module.write_text(module.read_text() + "\n# one more line\n")
        result = _predict(store, tmp_path, f"models:/{NAME}/{version}", keys["team"][1])
        assert result.returncode == 1
        assert _error_lines(result) == [(f"error: refused models:/{NAME}/{version}: its files differ from the signed "
                                         "ones (changed: code/model_altered.py); do not use this version; register "
                                         "the model again (docs/security/signed-models.md)")]
        assert not (markers / "altered.ran").exists()

    def test_another_verify_key_is_refused(self, signed, store, keys, tmp_path):
        result = _predict(store, tmp_path, f"models:/{NAME}/{signed}", keys["other"][1])
        assert result.returncode == 1
        assert len(_error_lines(result)) == 1
        assert "signed with another key" in _error_lines(result)[0]


class TestKeys:
    def test_a_private_key_open_to_others_is_refused_naming_the_file_and_the_chmod(self, tmp_path):
        private, _ = write_key_pair(tmp_path / "k")
        private.chmod(0o644)
        with pytest.raises(SettingsError, match=rf"^{SIGNING_KEY_FILE_ENV}={private}: the private key is open to "
                                                rf"group or others \(mode 0644\); run `chmod 600 {private}`$"):
            signing_key_from_env({SIGNING_KEY_FILE_ENV: str(private)})
        private.chmod(0o640)
        with pytest.raises(SettingsError, match=r"mode 0640"):
            signing_key_from_env({SIGNING_KEY_FILE_ENV: str(private)})

    def test_written_keys_have_safe_modes_and_are_never_overwritten(self, tmp_path):
        private, public = write_key_pair(tmp_path / "k")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
        assert stat.S_IMODE(public.stat().st_mode) == 0o644
        assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
        before = private.read_bytes()
        with pytest.raises(SettingsError, match="exists: a key is never overwritten"):
            write_key_pair(tmp_path / "k")
        assert private.read_bytes() == before

    def test_key_text_in_the_environment_wins_over_the_file(self, keys):
        from_text = signing_key_from_env({SIGNING_KEY_ENV: keys["other"][0].read_text(),
                                          SIGNING_KEY_FILE_ENV: str(keys["team"][0])})
        assert from_text.key_id == keys["other_verify"].key_id
        public = verify_key_from_env({VERIFY_KEY_ENV: keys["team"][1].read_text()})
        assert public.key_id == keys["verify"].key_id

    @pytest.mark.parametrize("environ, message", [
        ({SIGNING_KEY_ENV: "-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----"},
         f"{SIGNING_KEY_ENV}: not an unencrypted Ed25519 private key in PEM"),
        ({SIGNING_KEY_FILE_ENV: "/nonexistent/signing.pem"},
         f"{SIGNING_KEY_FILE_ENV}=/nonexistent/signing.pem: cannot read the key file"),
    ])
    def test_a_bad_signing_key_is_one_line_without_its_content(self, environ, message):
        with pytest.raises(SettingsError, match=f"^{message}") as caught:
            signing_key_from_env(environ)
        assert "not a key" not in str(caught.value)

    def test_a_public_key_is_not_taken_for_a_private_one(self, keys, tmp_path):
        copy = tmp_path / "verify.pub"
        shutil.copy(keys["team"][1], copy)
        copy.chmod(0o600)
        with pytest.raises(SettingsError, match="not an unencrypted Ed25519 private key"):
            signing_key_from_env({SIGNING_KEY_FILE_ENV: str(copy)})
        with pytest.raises(SettingsError, match="not an Ed25519 public key"):
            verify_key_from_env({VERIFY_KEY_FILE_ENV: str(keys["team"][0])})

    def test_a_local_store_gets_the_clones_own_key_pair_on_first_use(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        environ = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
        public = verify_key_from_env(environ)
        private = signing_key_from_env({})
        folder = tmp_path / ".dicomflow" / "keys"
        assert private.key_id == public.key_id
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        assert stat.S_IMODE((folder / "signing.pem").stat().st_mode) == 0o600
        assert signing_key_from_env({}).key_id == private.key_id  # the same pair next time

    def test_processes_starting_at_once_agree_on_one_clone_key_pair(self, tmp_path):
        code = ("from dicomflow.signing import signing_key_from_env, verify_key_from_env\n"
                "print(signing_key_from_env({}).key_id, verify_key_from_env({}).key_id)")
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        env.pop("MLFLOW_TRACKING_URI", None)
        started = [subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
        answers = [process.communicate(timeout=120) for process in started]
        assert [process.returncode for process in started] == [0] * 6, [err for _, err in answers]
        ids = {word for out, _ in answers for word in out.split()}
        assert len(ids) == 1
        assert sorted(path.name for path in (tmp_path / ".dicomflow").iterdir()) == ["keys"]

    @pytest.mark.parametrize("function", [signing_key_from_env, verify_key_from_env])
    @pytest.mark.parametrize("uri", ["https://mlflow.example.org", "http://127.0.0.1:5000",
                                     "postgresql://dicomflow@db/mlflow"])
    def test_a_team_server_needs_keys_given_explicitly(self, function, uri, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        with pytest.raises(SettingsError, match=r"set DICOMFLOW_\w+_KEY_FILE \(or DICOMFLOW_\w+_KEY\) when "
                                                r"MLFLOW_TRACKING_URI is a team server \((https?|postgresql):\)"):
            function({"MLFLOW_TRACKING_URI": uri})
        assert not (tmp_path / ".dicomflow").exists()

    @pytest.mark.parametrize("uri", ["", "sqlite:///mlflow.db", "file:///tmp/mlruns", "./mlruns"])
    def test_a_local_store_needs_no_keys_given(self, uri, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert verify_key_from_env({"MLFLOW_TRACKING_URI": uri}).key_id == signing_key_from_env({}).key_id


@pytest.mark.slow
def test_keygen_writes_a_pair_that_signs_and_verifies(store, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "dicomflow", "keygen", "--out", str(tmp_path / "team")]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 0, result.stderr
    private, public = tmp_path / "team" / "signing.pem", tmp_path / "team" / "verify.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = signing_key_from_env({SIGNING_KEY_FILE_ENV: str(private)})
    assert key.key_id in result.stderr
    assert verify_key_from_env({VERIFY_KEY_FILE_ENV: str(public)}).key_id == key.key_id
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=120)
    assert again.returncode == 1
    assert _error_lines(again) == [(f"error: {private} exists: a key is never overwritten (versions signed with it "
                                    "would no longer verify); choose another folder or remove it yourself")]


@pytest.mark.slow  # logs and loads a Keras model
def test_the_pipelines_dicom_classifier_verifies_and_predicts(store, keys, make_dicom, tmp_path, monkeypatch):
    """A real DicomClassifier (a Keras model, the dicomflow code it ships), logged as evaluate logs it."""
    import keras
    import numpy as np

    from dicomflow.dicom.display import PixelSettings
    from dicomflow.serving import pyfunc as serving

    inputs = keras.Input(shape=(32, 32, 1), name="image")
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    network = keras.Model(inputs, outputs)
    network.save(tmp_path / "net.keras")
    with mlflow.start_run(experiment_id=store["experiment"]):
        info = serving.log_classifier(tmp_path / "net.keras", threshold=0.5, classes=[0, 1],
                                      settings=PixelSettings(size=32))
    version = str(mlflow.register_model(info.model_uri, "signing-test-dicom").version)
    sign_model_version("signing-test-dicom", version, key=keys["sign"])
    files = json.loads(MlflowClient().get_model_version("signing-test-dicom", version).tags[SIGNATURE_TAG])["files"]
    assert "artifacts/net.keras" in files and "code/dicomflow/serving/pyfunc.py" in files

    pixels = np.random.default_rng(0).integers(60, 200, (40, 40), dtype=np.uint8)  # not blank
    make_dicom(tmp_path / "in" / "a.dcm", pixels)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store["uri"],
           VERIFY_KEY_FILE_ENV: str(keys["team"][1]), "TF_CPP_MIN_LOG_LEVEL": "2"}
    result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", "in", "--model",
                             f"models:/signing-test-dicom/{version}", "--output", "out.csv"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"verified signing-test-dicom version {version}: {len(files)} files signed with key " in result.stderr
    row = (tmp_path / "out.csv").read_text().splitlines()[1].split(",")
    assert row[0] == "a.dcm" and row[-1] == "" and 0 < float(row[1]) < 1
