"""evaluate's registry writes and the champion comparison, on a real SQLite store, real signatures,
real child processes, a real full disk and real SIGKILLs of the evaluate stage.

The fast tests use hand-set Keras models (no training): the probability is a function of the
image's mean, so dark DICOM files are class 0 and bright ones class 1. The slow test trains the
tiny sample once (``dvc repro train``) and kills the real stage at each registration step.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
import yaml

from dicomflow import tracking
from dicomflow.dicom.display import PixelSettings
from dicomflow.errors import DataError
from dicomflow.evaluation import registry
from dicomflow.evaluation.promotion import (
    MIN_COMPARED_IMAGES,
    Comparison,
    child_environment,
    compare_with_champion,
    read_secret_fingerprint,
    score_candidate,
    score_model_folder,
    training_data_record,
)
from dicomflow.serving.domain import TrainingDomain
from dicomflow.signing import SIGNATURE_TAG, signing_key_from_env, verify_key_from_env, write_key_pair

REPO = Path(__file__).resolve().parents[1]
SETTINGS = PixelSettings(size=32)
PIXELS = dataclasses.asdict(SETTINGS)
WINDOW = {"WindowCenter": 128, "WindowWidth": 256}
DX = TrainingDomain(modalities={"DX"}, photometrics={"MONOCHROME2"}, channels={1}, rows=(40, 80), columns=(40, 80))
CT_ONLY = TrainingDomain(modalities={"CT"}, photometrics={"MONOCHROME2"}, channels={1}, rows=(40, 80),
                         columns=(40, 80))
N_FILES = 14  # 7 dark (class 0) and 7 bright (class 1): above MIN_COMPARED_IMAGES
# Environment variables that must never reach the champion's process.
SECRETS = {"DICOMFLOW_SECRET": "s3cret-value", "DICOMFLOW_SECRET_FILE": "/run/secret",
           "DICOMFLOW_SIGNING_KEY": "pem", "DICOMFLOW_SIGNING_KEY_FILE": "/k.pem",
           "MLFLOW_TRACKING_PASSWORD": "pw", "MLFLOW_TRACKING_TOKEN": "tok", "MLFLOW_TRACKING_USERNAME": "ci",
           "MLFLOW_TRACKING_URI": "http://user:pw@host", "AWS_SECRET_ACCESS_KEY": "aws", "AWS_ACCESS_KEY_ID": "id",
           "AZURE_STORAGE_KEY": "az", "GOOGLE_APPLICATION_CREDENTIALS": "/gcp.json", "GITHUB_TOKEN": "gh"}


def _mean_model(path: Path, *, weight: float, bias: float, units: int = 1) -> Path:
    """A real Keras model whose output depends on the mean pixel only."""
    inputs = keras.Input(shape=(SETTINGS.size, SETTINGS.size, 1))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.full((1, units), weight, np.float32), np.full(units, bias, np.float32)])
    model.save(path)
    return path


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A SQLite store with its artifacts beside it, keys from files, the experiment created once."""
    import mlflow

    root = tmp_path_factory.mktemp("registry")
    signing, verify = write_key_pair(root / "keys")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        settings = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_DISABLE_TELEMETRY": "true",
                    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
                    "DICOMFLOW_SIGNING_KEY_FILE": str(signing), "DICOMFLOW_VERIFY_KEY_FILE": str(verify)}
        for name, value in settings.items():
            patch.setenv(name, value)
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.create_experiment("registry", artifact_location=(root / "artifacts").as_uri())
        try:
            yield {"root": root, "experiment": experiment, "client": mlflow.MlflowClient(),
                   "signing": signing_key_from_env(os.environ), "verify": verify_key_from_env(os.environ)}
        finally:
            mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def files(tmp_path_factory, make_dicom):
    """Validation files: dark (class 0) then bright (class 1), and each one's image digest."""
    folder = tmp_path_factory.mktemp("val")
    paths, labels = [], []
    for i in range(N_FILES):
        label = int(i >= N_FILES // 2)
        rng = np.random.default_rng(i)
        pixels = np.clip(rng.normal(200 if label else 40, 8, (48, 64)), 0, 255).astype(np.uint8)
        paths.append(make_dicom(folder / f"im{i:02d}.dcm", pixels, Modality="DX", **WINDOW))
        labels.append(label)
    return {"files": paths, "labels": np.array(labels), "classes": [0, 1],
            "digests": [frozenset({f"digest-{i:02d}"}) for i in range(N_FILES)]}


@pytest.fixture(scope="module")
def keras_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keras")
    return {"good": _mean_model(folder / "good.keras", weight=12.0, bias=-6.0),      # separates the classes
            "poor": _mean_model(folder / "poor.keras", weight=-2.0, bias=1.0),       # ranks them backwards
            "three": _mean_model(folder / "three.keras", weight=1.0, bias=0.0, units=3)}


def _record(trained_on: list[int], *, pixel_settings=None) -> dict:
    manifest = pd.DataFrame({"split": "train", "pixel_sha256": [f"digest-{i:02d}" for i in trained_on]})
    return training_data_record(manifest, data_version="d" * 32, pixel_settings=pixel_settings or PIXELS)


def _register(store, name: str, keras_path: Path, *, trained_on: list[int], domain=DX, classes=(0, 1),
              threshold: float | None = 0.5, sign: bool = True, record: dict | None = None) -> str:
    """Log, create, sign and make champion one version, as evaluate does; its number."""
    import mlflow

    client = store["client"]
    with mlflow.start_run(experiment_id=store["experiment"]) as run:
        info = registry.log_candidate(keras_path, training_data=record or _record(trained_on), threshold=threshold,
                                      classes=list(classes), settings=SETTINGS, domain=domain)
    version = registry.create_version(client, name, info, run_id=run.info.run_id, tags={"note": "test"})
    if sign:
        registry.sign_version(name, version, key=store["signing"])
    registry.move_aliases(client, name, version, alias="champion", replaced=None)
    registry.mark_complete(client, name, version)
    return version


def _compare(store, files, name: str, candidate_keras: Path, *, metric: str = "roc_auc") -> Comparison:
    candidate = score_candidate(candidate_keras, files["files"], threshold=0.5, classes=[0, 1], settings=SETTINGS,
                                domain=DX)
    champion = registry.current_champion(store["client"], name)
    return compare_with_champion(candidate, champion_version=champion, champion_uri=f"models:/{name}/{champion}",
                                 verify_key=store["verify"], metric=metric, data_version="d" * 32,
                                 pixel_settings=PIXELS, **files)


@pytest.mark.slow
class TestCompareWithChampion:
    def test_no_champion_scores_the_candidate_alone(self, store, files, keras_models):
        comparison = _compare(store, files, "none-yet", keras_models["good"])
        assert (comparison.champion, comparison.champion_version, comparison.images) == (None, None, N_FILES)
        assert comparison.candidate == 1.0  # the good model separates dark from bright
        assert comparison.decide(min_gain=0.0)[0] == "champion"

    @pytest.mark.slow  # runs the champion in a child process (TensorFlow there: about 25 s on 2 cores)
    def test_images_the_champion_trained_on_are_left_out(self, store, files, keras_models):
        _register(store, "fair", keras_models["poor"], trained_on=[0, 1, 12])  # two dark, one bright
        comparison = _compare(store, files, "fair", keras_models["good"])
        assert (comparison.images, comparison.excluded) == (N_FILES - 3, 3)
        assert comparison.candidate == 1.0 and comparison.champion == 0.0  # "poor" ranks them backwards
        alias, decision = comparison.decide(min_gain=0.0)
        assert alias == "champion"
        assert f"roc_auc on {N_FILES - 3} val images (3 left out: the champion trained on them)" in decision

    @pytest.mark.slow
    def test_too_few_fair_images_make_a_challenger_with_the_reason(self, store, files, keras_models):
        trained_on = list(range(N_FILES - MIN_COMPARED_IMAGES + 1))  # leaves MIN - 1
        _register(store, "unfair", keras_models["poor"], trained_on=trained_on)
        comparison = _compare(store, files, "unfair", keras_models["good"])
        assert comparison.champion is None and comparison.excluded == len(trained_on)
        assert f"{MIN_COMPARED_IMAGES - 1} val images remain that it did not train on" in comparison.reason
        assert comparison.decide(min_gain=0.0)[0] == "challenger"

    def test_a_champion_trained_on_every_image_of_one_class_cannot_be_compared(self, store, files, keras_models):
        _register(store, "one-class", keras_models["poor"], trained_on=list(range(N_FILES // 2)))  # all dark
        comparison = _compare(store, files, "one-class", keras_models["good"])
        assert comparison.champion is None and "(classes [1])" in comparison.reason

    def test_an_unsigned_champion_is_never_loaded(self, store, files, keras_models):
        _register(store, "unsigned", keras_models["poor"], trained_on=[], sign=False)
        comparison = _compare(store, files, "unsigned", keras_models["good"])
        assert comparison.champion is None and comparison.reason.startswith("its signature does not verify: refused")
        assert comparison.decide(min_gain=0.0)[0] == "challenger"

    def test_an_altered_champion_is_never_loaded(self, store, files, keras_models):
        """A signed version whose training record was replaced afterwards in the artifact store."""
        version = _register(store, "altered", keras_models["poor"], trained_on=[0, 1, 2, 3])
        source = store["client"].get_model_version("altered", version)
        logged = store["client"].get_logged_model(source.source.removeprefix("models:/"))
        folder = Path(logged.artifact_location.removeprefix("file://"))
        (folder / "training_data.json").write_text(json.dumps(_record([])))  # hides what it trained on
        comparison = _compare(store, files, "altered", keras_models["good"])
        assert comparison.champion is None and "training_data.json" in comparison.reason
        assert "signature does not verify" in comparison.reason

    @pytest.mark.slow  # runs the champion in a child process (TensorFlow there: about 25 s on 2 cores)
    def test_a_champion_from_another_domain_makes_a_challenger(self, store, files, keras_models):
        """The issue's case: a champion that answers no file (here: trained on CT, given DX)."""
        _register(store, "ct", keras_models["good"], trained_on=[], domain=CT_ONLY)
        comparison = _compare(store, files, "ct", keras_models["good"])
        assert comparison.champion is None
        assert "answered by both (it answered 0)" in comparison.reason
        assert comparison.decide(min_gain=0.0)[0] == "challenger"

    @pytest.mark.slow  # runs the champion in a child process (TensorFlow there: about 25 s on 2 cores)
    def test_a_champion_with_other_outputs_makes_a_challenger(self, store, files, keras_models):
        _register(store, "three", keras_models["three"], trained_on=[], classes=(0, 1, 2), threshold=None)
        comparison = _compare(store, files, "three", keras_models["good"])
        assert comparison.champion is None and "are not the candidate's" in comparison.reason

    def test_a_champion_without_a_training_record_makes_a_challenger(self, store, files, keras_models):
        import mlflow

        with mlflow.start_run(experiment_id=store["experiment"]) as run:  # as versions before this change
            from dicomflow.serving.pyfunc import log_classifier

            info = log_classifier(keras_models["poor"], threshold=0.5, classes=[0, 1], settings=SETTINGS, domain=DX)
        version = registry.create_version(store["client"], "old", info, run_id=run.info.run_id, tags={})
        registry.sign_version("old", version, key=store["signing"])
        registry.move_aliases(store["client"], "old", version, alias="champion", replaced=None)
        comparison = _compare(store, files, "old", keras_models["good"])
        assert comparison.champion is None and "records no training images" in comparison.reason

    def test_a_champion_at_other_pixel_settings_makes_a_challenger(self, store, files, keras_models):
        _register(store, "pixels", keras_models["poor"], trained_on=[],
                  record=_record([], pixel_settings={**PIXELS, "size": 64}))
        comparison = _compare(store, files, "pixels", keras_models["good"])
        assert comparison.champion is None and "other pixel settings" in comparison.reason


def _environment_probe(folder: Path) -> Path:
    """A pyfunc (models from code: no pickle) that answers each file with the names of the
    environment variables it can see, and whether it can read the signing key file."""
    import mlflow

    code = folder / "probe.py"
    code.write_text(textwrap.dedent("""
        import os
        import mlflow.pyfunc
        import pandas as pd

        class Probe(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                names = ",".join(sorted(os.environ))
                return pd.DataFrame({"probability": 0.5, "label": 1, "error": "", "names": names,
                                     "secret": os.environ.get("DICOMFLOW_SECRET", "")}, index=model_input.index)

        mlflow.models.set_model(Probe())
        """))
    mlflow.pyfunc.save_model(folder / "model", python_model=str(code), pip_requirements=["pandas"])
    return folder / "model"


@pytest.mark.slow
def test_the_champions_process_sees_no_secret(tmp_path, files):
    probe = _environment_probe(tmp_path)
    environ = {**os.environ, **SECRETS, "LC_ALL": "C.UTF-8"}
    answers = score_model_folder(probe, files["files"][:2], environ=environ)
    seen = set(answers["names"].iloc[0].split(","))
    assert not seen & set(SECRETS), seen & set(SECRETS)
    assert (answers["secret"].fillna("") == "").all()
    assert {"PATH", "LC_ALL", "DICOMFLOW_SERVING_ROOT", "MLFLOW_DISABLE_TELEMETRY"} <= seen
    assert not any(name.startswith(("AWS_", "MLFLOW_TRACKING", "DICOMFLOW_SECRET", "DICOMFLOW_SIGNING"))
                   for name in seen)
    # The allow-list itself, without a child: only named variables pass.
    assert set(child_environment(environ)) <= {*child_environment({}), "PATH", "HOME", "LANG", "LC_ALL", "TMPDIR",
                                               "TZ", "LANGUAGE", "OMP_NUM_THREADS", "KERAS_BACKEND",
                                               "CUDA_VISIBLE_DEVICES", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS",
                                               "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "TEMP", "TMP"}


@pytest.mark.slow
def test_a_champion_that_fails_to_load_is_one_line(tmp_path, files):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "MLmodel").write_text("not: [a model\n")
    with pytest.raises(DataError, match=r"^scoring it failed: .*Error"):
        score_model_folder(broken, files["files"][:1])


class TestRegistrationWrites:
    def test_a_version_is_created_with_all_its_tags_and_incomplete(self, store, keras_models):
        version = _register(store, "tags", keras_models["good"], trained_on=[1, 2])
        client = store["client"]
        # _register went through every step: complete, signed, champion, training record signed.
        done = client.get_model_version("tags", version)
        assert registry.is_complete(done) and SIGNATURE_TAG in done.tags and done.aliases == ["champion"]
        assert "training_data.json" in json.loads(done.tags[SIGNATURE_TAG])["files"]

        import mlflow

        with mlflow.start_run(experiment_id=store["experiment"]) as run:
            info = registry.log_candidate(keras_models["good"], training_data=_record([]), threshold=0.5,
                                          classes=[0, 1], settings=SETTINGS, domain=DX)
        second = registry.create_version(client, "tags", info, run_id=run.info.run_id,
                                         tags={registry.EVALUATION_KEY_TAG: "k2", registry.ALIAS_TAG: "challenger"})
        fresh = client.get_model_version("tags", second)
        assert fresh.tags[registry.REGISTRATION_TAG] == "incomplete" and not registry.is_complete(fresh)
        assert fresh.tags[registry.EVALUATION_KEY_TAG] == "k2" and fresh.aliases == []
        assert registry.find_version(client, "tags", "k2").version == fresh.version
        assert registry.find_version(client, "tags", "other") is None
        assert registry.find_version(client, "no-such-model", "k2") is None

    def test_version_tags_record_decision_training_data_and_secret(self):
        comparison = Comparison("roc_auc", 0.9, 0.8, "3", images=11, data_version="ab" * 16, excluded=3)
        record = _record([0, 1, 2])
        tags = registry.version_tags(comparison, alias="champion", decision="champion: ...", key="k",
                                     training_run_id="r1", training_data=record,
                                     metrics={"roc_auc": 0.91, "brier": 0.1, "ece": 0.02},
                                     secret={"deid_secret_fingerprint": "0123456789abcdef",
                                             "deid_demo_secret": "false"}, digest="f" * 64)
        assert tags[registry.MODEL_DIGEST_TAG] == "f" * 64
        assert (tags["promotion_alias"], tags["promotion_excluded"], tags["promotion_images"]) == (
            "champion", "3", "11")
        assert (tags["training_run_id"], tags["training_images"], tags["training_data_version"]) == (
            "r1", "3", "d" * 32)
        assert tags["deid_secret_fingerprint"] == "0123456789abcdef" and tags["deid_demo_secret"] == "false"
        assert all(isinstance(value, str) for value in tags.values())

    def test_stale_runs_end_killed_and_the_training_run_keeps_its_status(self, store):
        import mlflow

        client = store["client"]
        training = client.create_run(store["experiment"])
        client.set_terminated(training.info.run_id, status="FINISHED")
        stale = client.create_run(store["experiment"], tags={"mlflow.parentRunId": training.info.run_id})
        other = client.create_run(store["experiment"])  # not this training run's: left alone
        registry.log_to_training_run(client, training.info.run_id, {"test_roc_auc": 0.8},
                                     tags={"deid_secret_fingerprint": "not recorded"})
        assert client.get_run(training.info.run_id).info.status == "FINISHED"
        assert registry.end_stale_runs(client, training.info.run_id) == [stale.info.run_id]
        assert client.get_run(stale.info.run_id).info.status == "KILLED"
        assert client.get_run(other.info.run_id).info.status == "RUNNING"
        assert client.get_run(training.info.run_id).data.metrics["test_roc_auc"] == 0.8
        assert client.get_run(training.info.run_id).data.tags["deid_secret_fingerprint"] == "not recorded"
        # A training run an older evaluate reopened and left RUNNING: its training had finished.
        client.update_run(training.info.run_id, status="RUNNING")
        assert registry.end_stale_runs(client, training.info.run_id) == [training.info.run_id]
        assert client.get_run(training.info.run_id).info.status == "FINISHED"
        mlflow.MlflowClient().set_terminated(other.info.run_id)


class TestSecretFingerprint:
    def test_absent_is_not_recorded(self, tmp_path):
        assert read_secret_fingerprint(tmp_path / "secret_fingerprint.json") == {
            "deid_secret_fingerprint": "not recorded", "deid_demo_secret": "not recorded"}

    @pytest.mark.parametrize("demo", [True, False])
    def test_present_is_read(self, tmp_path, demo):
        path = tmp_path / "secret_fingerprint.json"
        path.write_text(json.dumps({"fingerprint": "0123456789abcdef", "demo": demo}))
        assert read_secret_fingerprint(path) == {"deid_secret_fingerprint": "0123456789abcdef",
                                                 "deid_demo_secret": "true" if demo else "false"}

    @pytest.mark.parametrize("content", ['{"fingerprint": "xyz", "demo": false}', '{"fingerprint": '
                                         '"0123456789abcdef"}', "not json"])
    def test_malformed_is_one_line(self, tmp_path, content):
        path = tmp_path / "secret_fingerprint.json"
        path.write_text(content)
        with pytest.raises(DataError, match="rerun deidentify"):
            read_secret_fingerprint(path)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (needs root, as on this project's machines; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_while_logging_the_model_is_one_line_and_registers_nothing(store, tiny_disk, keras_models):
    import mlflow

    client = store["client"]
    experiment = mlflow.create_experiment("full-disk", artifact_location=tiny_disk.as_uri())
    training = client.create_run(experiment)
    client.set_terminated(training.info.run_id, status="FINISHED")
    (tiny_disk / "filler").write_bytes(b"\0" * ((2048 - 24) * 1024))  # 24 KiB left: less than the model
    with pytest.raises(DataError) as caught, \
            mlflow.start_run(experiment_id=experiment, parent_run_id=training.info.run_id) as run:
        registry.log_candidate(keras_models["good"], training_data=_record([]), threshold=0.5, classes=[0, 1],
                               settings=SETTINGS, domain=DX)
    message = str(caught.value)
    assert "\n" not in message and f"No space left on device while logging the model to {tiny_disk}/" in message
    assert "nothing is registered; free some space there" in message
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert client.get_run(training.info.run_id).info.status == "FINISHED"
    assert client.search_model_versions(f"run_id = '{run.info.run_id}'") == []


def _weights(path: Path) -> list[np.ndarray]:
    return keras.models.load_model(path).get_weights()


class TestWhatIsRegistered:
    """registry.model_digest, find_same_model and registration_decision: the floor and the duplicates."""

    def test_the_same_weights_saved_twice_have_one_digest(self, keras_models, tmp_path):
        again = _mean_model(tmp_path / "good-again.keras", weight=12.0, bias=-6.0)  # saved at another time
        digests = [registry.model_digest(_weights(path), training_data=_record([0, 1]), threshold=0.5,
                                         classes=[0, 1]) for path in (keras_models["good"], again)]
        assert digests[0] == digests[1] and len(digests[0]) == 64

    @pytest.mark.parametrize("change", ["weights", "threshold", "training images", "pixel settings", "classes"])
    def test_any_change_of_what_is_served_or_trained_on_changes_the_digest(self, keras_models, change):
        same = dict(weights=_weights(keras_models["good"]), training_data=_record([0, 1]), threshold=0.5,
                    classes=[0, 1])
        other = dict(same)
        if change == "weights":
            other["weights"] = _weights(keras_models["poor"])
        elif change == "threshold":
            other["threshold"] = 0.4
        elif change == "training images":
            other["training_data"] = _record([0, 2])
        elif change == "pixel settings":
            other["training_data"] = _record([0, 1], pixel_settings={**PIXELS, "size": 64})
        else:
            other["classes"] = [1, 2]
        first = registry.model_digest(same.pop("weights"), **same)
        assert registry.model_digest(other.pop("weights"), **other) != first

    def test_a_complete_version_with_the_digest_is_found_an_incomplete_one_is_not(self, store, keras_models):
        import mlflow

        client = store["client"]
        with mlflow.start_run(experiment_id=store["experiment"]) as run:
            info = registry.log_candidate(keras_models["good"], training_data=_record([]), threshold=0.5,
                                          classes=[0, 1], settings=SETTINGS, domain=DX)
        version = registry.create_version(client, "digests", info, run_id=run.info.run_id,
                                          tags={registry.MODEL_DIGEST_TAG: "a" * 64})
        assert registry.find_same_model(client, "digests", "a" * 64) is None  # incomplete: a killed registration
        registry.mark_complete(client, "digests", version)
        assert str(registry.find_same_model(client, "digests", "a" * 64).version) == version
        assert registry.find_same_model(client, "digests", "b" * 64) is None
        assert registry.find_same_model(client, "no-such-model", "a" * 64) is None

    @pytest.mark.parametrize(("auc", "same", "register", "line"), [
        (0.912, None, True, "registered: validation ROC AUC 0.912 reaches evaluate.min_validation_auc 0.6; "
                            "no version holds this model (digest 0123456789ab)"),
        (0.6, None, True, "registered: validation ROC AUC 0.600 reaches evaluate.min_validation_auc 0.6; "),
        (0.519, None, False, "not registered: validation ROC AUC 0.519 is below evaluate.min_validation_auc 0.6 "
                             "(train longer or on more data, or lower the floor); no version holds this model"),
        (float("nan"), None, False, "not registered: validation ROC AUC nan is below"),
        (0.99, "1", False, "not registered: validation ROC AUC 0.990 reaches evaluate.min_validation_auc 0.6; the "
                           "same model (weights, threshold and training images; digest 0123456789ab) is version 1 "
                           "already"),
        (0.5, "3", False, "is below evaluate.min_validation_auc 0.6 (train longer or on more data, or lower the "
                          "floor); the same model"),
    ])
    def test_the_decision_is_one_line_on_both_counts(self, auc, same, register, line):
        decided, text = registry.registration_decision(auc, floor=0.6, digest="0123456789abcdef" * 4,
                                                       same_version=same)
        assert decided is register and "\n" not in text
        assert (text.startswith(line) if line.startswith(("registered", "not registered")) else line in text), text


# --- the real stage, killed at each registration step ------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A temporary copy of the repository with the tiny sample run through train (once)."""
    root = tmp_path_factory.mktemp("evaluate-kill")
    shutil.copy(REPO / "dvc.yaml", root)
    for package in ("stages", "dicomflow"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(epochs=10, batch_size=8)  # as tests/pipeline_repo.py: a model that learns
    params["evaluate"]["min_validation_auc"] = 0.5  # as tests/pipeline_repo.py: its AUC is near the default floor
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlruns/\n/mlartifacts/\n/.dicomflow/\n__pycache__/\n")
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "DICOMFLOW_", "DVC_", "PYTHONPATH"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               DICOMFLOW_SECRET="registry tests: the tiny sample is not the embedded one", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.org")
    for args in (["git", "init", "-q"], ["dvc", "init", "-q"],
                 [sys.executable, "-m", "dicomflow", "sample-data", "data", "--patients", "40"],
                 ["dvc", "add", "-q", "data"], ["git", "add", "-A"], ["git", "commit", "-qm", "sample"],
                 ["dvc", "repro", "train"]):
        result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return root, env


def _evaluate(root: Path, env: dict[str, str], **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.evaluate"], cwd=root, env={**env, **extra},
                          capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_a_kill_at_any_registration_step_leaves_one_complete_version(trained):
    """SIGKILL of the real stage after each registration write, then a rerun: one version for
    the evaluation, complete (signed, described, its alias), and no run left RUNNING."""
    import mlflow

    root, env = trained
    first = _evaluate(root, env)
    assert first.returncode == 0, first.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        training_run = tracking.training_run_for(root / "outputs" / "model" / "model.keras", client).info.run_id
        params = yaml.safe_load((root / "params.yaml").read_text())
        for i, step in enumerate(registry.STEPS, start=1):
            # Another evaluation of the same training run (a new key) each time, and another model:
            # the same weights at another operating threshold (the same model is not registered twice).
            params["evaluate"].update(threshold_method="fixed", fixed_threshold=0.3 + i / 100)
            (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            killed = _evaluate(root, env, **{registry.KILL_AFTER_ENV: step})
            assert killed.returncode == -9, f"{step}: {killed.stderr[-2000:]}"
            rerun = _evaluate(root, env)
            assert rerun.returncode == 0, f"{step}: {rerun.stderr[-3000:]}"

            key = registry.evaluation_key(training_run, params["evaluate"])
            mine = [v for v in client.search_model_versions("name = 'dicomflow-classifier'")
                    if v.tags.get(registry.EVALUATION_KEY_TAG) == key]
            assert len(mine) == 1, f"{step}: {len(mine)} versions for one evaluation"
            version = client.get_model_version("dicomflow-classifier", mine[0].version)
            assert registry.is_complete(version) and SIGNATURE_TAG in version.tags, step
            assert version.description.startswith(f"# Model card: dicomflow-classifier version {version.version}")
            assert version.aliases == [version.tags[registry.ALIAS_TAG]], step
            # Which secret made the data (deidentify's fingerprint file): on the version, the card, the runs.
            fingerprint = json.loads((root / "outputs" / "deidentify" / "secret_fingerprint.json").read_text())
            assert (version.tags["deid_secret_fingerprint"], version.tags["deid_demo_secret"]) == (
                fingerprint["fingerprint"], "false")
            assert f"a site secret, fingerprint `{fingerprint['fingerprint']}`" in version.description
            assert client.get_run(training_run).data.tags["deid_secret_fingerprint"] == fingerprint["fingerprint"]
            runs = client.search_runs([client.get_run(training_run).info.experiment_id])
            assert not [r for r in runs if r.info.status == "RUNNING"], step
            assert client.get_run(training_run).info.status == "FINISHED", step
            assert sum(r.info.status == "KILLED" for r in runs) == i, step
        assert str(client.get_model_version_by_alias("dicomflow-classifier", "champion").version) == "1"
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_a_full_artifact_disk_fails_evaluate_in_one_line_and_keeps_the_training_run(trained, tmp_path):
    """The real stage with its experiment's artifact folder on a nearly full tmpfs (root only)."""
    import mlflow

    root, env = trained
    artifacts = next((root / "mlruns").iterdir())  # the experiment's folder (the store's default root)
    aside = tmp_path / "aside"
    shutil.move(artifacts, aside)
    artifacts.mkdir()
    used = sum(path.stat().st_size for path in aside.rglob("*") if path.is_file())
    size = used + 4 * 1024 * 1024  # 4 MiB more than it holds: the plots fit, the model does not
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(artifacts)]).returncode != 0:
        shutil.rmtree(artifacts)
        shutil.move(aside, artifacts)
        pytest.skip("cannot mount a tmpfs here (not root)")
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        shutil.copytree(aside, artifacts, dirs_exist_ok=True)
        params = yaml.safe_load((root / "params.yaml").read_text())
        # A new evaluation of a new model (another threshold): it would register a version.
        params["evaluate"].update(threshold_method="fixed", fixed_threshold=0.45)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        client = mlflow.MlflowClient()
        before = len(client.search_model_versions("name = 'dicomflow-classifier'"))
        # 1 MiB left when evaluate starts: less than the model it logs (about 1.2 MB with its code)
        free = os.statvfs(artifacts).f_bavail * os.statvfs(artifacts).f_frsize
        (artifacts / "filler").write_bytes(b"\0" * max(free - 1024 * 1024, 0))
        result = _evaluate(root, env)
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode == 1, result.stderr[-3000:]
        assert len(errors) == 1 and "No space left on device while logging" in errors[0], result.stderr[-3000:]
        assert f" to {artifacts}/" in errors[0] and "nothing is registered" in errors[0]
        assert len(client.search_model_versions("name = 'dicomflow-classifier'")) == before
        training_run = tracking.training_run_for(root / "outputs" / "model" / "model.keras", client).info.run_id
        assert client.get_run(training_run).info.status == "FINISHED"
        newest = client.search_runs([client.get_run(training_run).info.experiment_id],
                                    filter_string="attributes.run_name = 'evaluate'", order_by=["start_time DESC"])[0]
        assert newest.info.status == "FAILED"
    finally:
        mlflow.set_tracking_uri(None)
        subprocess.run(["umount", "-l", str(artifacts)], check=False)
        shutil.rmtree(artifacts, ignore_errors=True)
        shutil.move(aside, artifacts)


@pytest.mark.slow
def test_the_same_model_evaluated_again_is_not_registered_and_the_run_says_why(trained):
    """The real stage twice on one trained model with other evaluate settings that leave the model as it
    is (a new evaluation key): one version; the second run logs and tags why nothing was registered."""
    import mlflow

    root, env = trained
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"].update(threshold_method="youden", promotion_min_gain=0.25)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    first = _evaluate(root, env)
    assert first.returncode == 0, first.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        before = client.search_model_versions("name = 'dicomflow-classifier'")
        params["evaluate"]["promotion_min_gain"] = 0.125  # not part of the model
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        second = _evaluate(root, env)
        assert second.returncode == 0, second.stderr[-3000:]
        after = client.search_model_versions("name = 'dicomflow-classifier'")
        assert len(after) == len(before)
        [line] = [line for line in second.stderr.splitlines() if "not registered:" in line]
        assert "reaches evaluate.min_validation_auc 0.5; the same model (weights, threshold and training " \
               "images; digest" in line and line.rstrip().endswith(" already"), line
        training_run = tracking.training_run_for(root / "outputs" / "model" / "model.keras", client).info.run_id
        newest = client.search_runs([client.get_run(training_run).info.experiment_id],
                                    filter_string="attributes.run_name = 'evaluate'", order_by=["start_time DESC"])[0]
        assert newest.data.tags[registry.DECISION_TAG] == line[line.index("not registered:"):].rstrip()
        assert "registered_version" not in newest.data.tags and newest.info.status == "FINISHED"
        assert 0.5 <= newest.data.metrics["val_roc_auc"] <= 1.0

        # A new model (another threshold) under a floor it does not reach (its AUC is about 0.66).
        params["evaluate"].update(threshold_method="fixed", fixed_threshold=0.42, min_validation_auc=0.99)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        third = _evaluate(root, env)
        assert third.returncode == 0, third.stderr[-3000:]
        assert len(client.search_model_versions("name = 'dicomflow-classifier'")) == len(before)
        [line] = [line for line in third.stderr.splitlines() if "not registered:" in line]
        assert "is below evaluate.min_validation_auc 0.99 (train longer or on more data, or lower the floor); " \
               "no version holds this model" in line, line
    finally:
        mlflow.set_tracking_uri(None)
