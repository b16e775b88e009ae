"""Reproducibility: same inputs, same bytes.

A fresh clone's `dvc repro` on the machine that wrote `dvc.lock` gives the committed outputs
byte for byte (no save time, run id or other volatile byte in any DVC output), so `git status`
stays clean and going back from an experiment finds every output in the cache. The fast tests
check the pieces (the model file, the run lookup that replaced the run id beside the model, the
params logged to MLflow); the slow one runs the whole pipeline in a real DVC repository.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomflow import tracking
from dicomflow.errors import DataError
from dicomflow.model.saving import FIXED_DATE_TIME, save_model

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model():
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))


def _members(path: Path) -> dict[str, tuple[tuple[int, ...], bytes]]:
    with zipfile.ZipFile(path) as archive:
        return {info.filename: (info.date_time, archive.read(info)) for info in archive.infolist()}


@pytest.mark.slow
class TestSaveModel:
    def test_two_saves_seconds_apart_are_byte_identical_where_kerass_own_are_not(self, small_model, tmp_path):
        save_model(small_model, tmp_path / "a" / "model.keras")
        small_model.save(tmp_path / "plain_a.keras")
        time.sleep(2.1)  # past a zip timestamp's 2-second resolution and date_saved's second
        save_model(small_model, tmp_path / "b" / "model.keras")
        small_model.save(tmp_path / "plain_b.keras")

        assert (tmp_path / "a" / "model.keras").read_bytes() == (tmp_path / "b" / "model.keras").read_bytes()
        # The premise: Keras's own file carries the save time.
        assert (tmp_path / "plain_a.keras").read_bytes() != (tmp_path / "plain_b.keras").read_bytes()
        assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["model.keras"]  # no scratch left

    def test_no_save_time_is_left_in_the_archive(self, small_model, tmp_path):
        path = save_model(small_model, tmp_path / "model.keras")
        members = _members(path)
        assert list(members) == list(_members(self._plain(small_model, tmp_path)))  # Keras's order kept
        assert {date_time for date_time, _ in members.values()} == {FIXED_DATE_TIME}
        metadata = json.loads(members["metadata.json"][1])
        assert "date_saved" not in metadata and metadata["keras_version"]

    def test_keras_loads_it_and_it_predicts_as_the_model_does(self, small_model, tmp_path):
        import keras

        images = np.random.default_rng(0).random((5, 8, 8, 1), dtype=np.float32)
        loaded = keras.models.load_model(save_model(small_model, tmp_path / "model.keras"))
        np.testing.assert_array_equal(loaded.predict(images, verbose=0), small_model.predict(images, verbose=0))

    def test_a_signature_over_the_model_still_verifies_after_it_is_saved_again(self, small_model, tmp_path):
        from dicomflow.signing import (
            SIGNING_KEY_FILE_ENV,
            VERIFY_KEY_FILE_ENV,
            check_folder,
            sign_folder,
            signing_key_from_env,
            verify_key_from_env,
            write_key_pair,
        )

        signing, verify = write_key_pair(tmp_path / "keys")
        folder = tmp_path / "model"
        save_model(small_model, folder / "model.keras")
        signature = sign_folder(folder, key=signing_key_from_env({SIGNING_KEY_FILE_ENV: str(signing)}))
        time.sleep(2.1)
        save_model(small_model, folder / "model.keras")  # the same weights, saved by another run
        check_folder(folder, signature, key=verify_key_from_env({VERIFY_KEY_FILE_ENV: str(verify)}))

    @staticmethod
    def _plain(model, tmp_path: Path) -> Path:
        model.save(tmp_path / "plain.keras")
        return tmp_path / "plain.keras"


@pytest.mark.slow
class TestTrainingRunFor:
    @pytest.fixture
    def client(self, tmp_path):
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        client.create_experiment(tracking.EXPERIMENT_NAME, artifact_location=(tmp_path / "mlruns").as_uri())
        return client

    def _run(self, client, digest: str | None):
        experiment = client.get_experiment_by_name(tracking.EXPERIMENT_NAME).experiment_id
        run = client.create_run(experiment, tags={} if digest is None else {tracking.MODEL_DIGEST_TAG: digest})
        time.sleep(0.01)  # distinct start times
        return run.info.run_id

    def test_the_newest_run_that_saved_these_bytes_is_found(self, client, tmp_path):
        import hashlib

        model = tmp_path / "model.keras"
        model.write_bytes(b"weights of one training")
        digest = hashlib.sha256(b"weights of one training").hexdigest()
        self._run(client, digest)
        self._run(client, "0" * 64)
        newest = self._run(client, digest)
        self._run(client, None)
        assert tracking.training_run_for(model, client).info.run_id == newest

    def test_a_model_no_run_saved_is_one_line_saying_what_to_do(self, client, tmp_path):
        model = tmp_path / "model.keras"
        model.write_bytes(b"pulled from a remote, trained elsewhere")
        self._run(client, "0" * 64)
        with pytest.raises(DataError, match=r"no training run of the tracking store saved this model .*"
                                            r"dvc repro --force train") as info:
            tracking.training_run_for(model, client)
        assert "\n" not in str(info.value)


class TestLoggedParams:
    def test_training_logs_what_a_person_compares_and_no_file_location(self):
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        logged = tracking.training_params(params)
        expected = {f"{section}.{key}": value for section in ("train", "augment", "split")
                    for key, value in params[section].items() if not isinstance(value, dict)}
        expected.update({f"ingest.{key}": params["ingest"][key] for key in ("classes", "image_size", "channels")})
        assert params["train"]["init"] == "scratch" and not params["train"]["privacy"]["enabled"]
        # The default trains from scratch without DP: the transfer and DP settings would be noise.
        for neutral in ("train.freeze_epochs", "train.encoder_lr_factor"):
            del expected[neutral]
        expected["train.privacy.enabled"] = False
        assert logged == expected
        assert not any(name.startswith("paths.") for name in logged) and len(logged) <= 30

    def test_transfer_and_dp_settings_are_logged_when_they_act(self):
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        params["train"].update(init="pretrain", freeze_epochs=3)
        params["train"]["privacy"]["enabled"] = True
        logged = tracking.training_params(params)
        assert logged["train.freeze_epochs"] == 3 and "train.encoder_lr_factor" in logged
        assert {f"train.privacy.{key}" for key in params["train"]["privacy"]} <= set(logged)

    def test_a_volume_run_logs_its_unit_and_the_volumes_geometry(self):
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        assert "ingest.unit" not in tracking.training_params(params)  # images: as before
        params["ingest"]["unit"] = "series"
        logged = tracking.training_params(params)
        assert logged["ingest.unit"] == "series"
        assert {f"ingest.series.{key}": value for key, value in params["ingest"]["series"].items()}.items() \
            <= logged.items()

    def test_the_params_train_declares_in_dvc_yaml_are_all_logged(self):
        declared = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["train"]["params"]
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        params["train"]["privacy"]["enabled"] = True  # every setting then acts
        params["train"]["init"] = "pretrain"
        params["ingest"]["unit"] = "series"
        logged = tracking.training_params(params)
        for name in declared:
            section, _, key = name.partition(".")
            keys = [key] if key else list(params[section])
            for k in keys:
                value = params[section][k]
                names = {f"{section}.{k}.{sub}" for sub in value} if isinstance(value, dict) else {f"{section}.{k}"}
                assert names <= set(logged), name


# ---- the whole pipeline, twice, in a real DVC repository -----------------------------------------


def _outs(lock: dict) -> dict[str, str]:
    """Every output of every stage in a dvc.lock, with its md5."""
    return {out["path"]: out["md5"] for stage in lock["stages"].values() for out in stage.get("outs", [])}


@pytest.mark.slow
def test_a_fresh_run_reproduces_the_committed_outputs_and_going_back_needs_no_retrain(repo):
    """As a user on a fresh clone of a commit made on this machine: the cache and outputs are gone,
    `dvc repro --force` (every stage) gives every output the committed md5 (git status clean), and
    after `dvc exp run`, checking the commit's params, lock and reports out and `dvc checkout`
    restore it all."""
    from pipeline_repo import run

    root, env = repo
    # The first run had no accepted data set to check drift against (validate skipped those
    # checks); every later run has one (reports/data_profile.json, persisted): run it once more.
    run(["dvc", "repro", "--force", "validate"], root, env)
    run(["dvc", "repro"], root, env)
    # What a commit of the project holds (the tracking store is no part of it: git-ignored there).
    run(["git", "add", "-A", "--", ".", ":!mlruns"], root, env)
    run(["git", "commit", "-qm", "baseline: the first run"], root, env)
    committed = _outs(yaml.safe_load((root / "dvc.lock").read_text()))
    assert "outputs/model" in committed

    # A fresh clone on this machine: no cache, no outputs, no tracking store.
    for name in (".dvc/cache", "outputs", "mlruns"):
        shutil.rmtree(root / name, ignore_errors=True)
    (root / "mlflow.db").unlink()
    run(["dvc", "commit", "-q", "--force", "data.dvc"], root, env)  # as `make data` caches data/
    # Every stage, not only those whose outputs are gone: the reports of git are rewritten too.
    run(["dvc", "repro", "--force"], root, env)
    rerun = _outs(yaml.safe_load((root / "dvc.lock").read_text()))
    differing = sorted(path for path in committed if rerun.get(path) != committed[path])
    assert differing == [], f"outputs whose bytes changed between two runs: {differing}"
    status = run(["git", "status", "--porcelain", "--untracked-files=no"], root, env)
    assert status.strip() == "", status

    # An experiment, then back to the commit without training anything.
    run(["dvc", "exp", "run", "-S", "train.seed=7"], root, env)  # a new model (fewer epochs can keep the same epoch)
    assert _outs(yaml.safe_load((root / "dvc.lock").read_text()))["outputs/model"] != committed["outputs/model"]
    run(["git", "checkout", "--", "params.yaml", "dvc.lock", "reports"], root, env)
    run(["dvc", "checkout"], root, env)
    status = run(["dvc", "status", "--json"], root, env)
    stale = {stage: changes for stage, changes in json.loads(status).items() if stage != "secret"}
    assert stale == {}, status
