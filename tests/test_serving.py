"""Serving: the DICOM-reading pyfunc (dicomflow/serving/pyfunc.py), batch prediction (`dicomflow predict`) and
``mlflow models serve`` on it, with real Keras models, real DICOM files and a temporary MLflow store.

The served model is tested as its users meet it: the README's lines run as written, every payload
form it documents, answers read by a JSON client that refuses ``NaN``, and the ``path`` column
refused unless DICOMFLOW_SERVING_ROOT is set, then held inside it (TestServedModel).

The registered model carries a training domain (DX/CR grayscale): files unlike it (pydicom's MR,
ultrasound and RGB test files) get ``out_of_domain`` through all three, tested here beside the
store and server; dicomflow/serving/domain.py's own tests are in tests/test_domain.py."""

from __future__ import annotations

import base64
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from hostile_files import NON_UTF8_NAME, panicking_rle
from pydicom.data import get_testdata_file

from dicomflow.serving.domain import TrainingDomain
from dicomflow.dicom.display import PixelSettings, read_image

import keras
import mlflow

from dicomflow.serving import pyfunc as serving
from dicomflow.model.architectures import to_model_input
from signed_store import register_champion, signed_tracking_store

REPO = Path(__file__).resolve().parents[1]
SETTINGS = PixelSettings(size=32)
MODEL_NAME = "serving-test-classifier"
THRESHOLD = 0.3
# Display pixels (window 128/256 below) of the test images, 0-255.
BRIGHT, MID, DARK = 200, 115, 30
# A fixed window keeps dark images dark (without one ingest stretches each image's own range).
WINDOW = {"WindowCenter": 128, "WindowWidth": 256}
# What the model was "trained on": the test images below are DX or CR, 40-80 pixels a side.
DOMAIN = TrainingDomain(modalities={"CR", "DX"}, photometrics={"MONOCHROME2"}, channels={1},
                        rows=(40, 80), columns=(40, 80))
# pydicom's test files outside DOMAIN, by the name the dicoms fixture gives their copies.
FOREIGN = {"mr": "MR_small.dcm", "us": "US1_J2KR.dcm", "rgb": "SC_rgb.dcm", "mr_truncated": "MR_truncated.dcm"}


def _image(level: int, *, seed: int, shape: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A noisy uint8 image around ``level``."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, 8, shape), 0, 255).astype(np.uint8)


def _mean_intensity_model(units: int, weights: list[float], biases: list[float]):
    """A real Keras model whose output depends on the mean pixel: dense on global average pooling."""
    inputs = keras.Input(shape=(SETTINGS.size, SETTINGS.size, 1), name="image")
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(units, activation="sigmoid" if units == 1 else "softmax")(x)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.array([weights], np.float32), np.array(biases, np.float32)])
    return model


@pytest.fixture(autouse=True)
def paths_readable_under_the_test_folders(tmp_path_factory, monkeypatch):
    """A model loaded by MLflow reads paths only under DICOMFLOW_SERVING_ROOT (serving.PathRule):
    here, under pytest's temporary folder, where every test file is. The tests of the rule itself
    unset or change it; _run_env leaves it out of the subprocesses, which set their own."""
    monkeypatch.setenv(serving.SERVING_ROOT_ENV, str(tmp_path_factory.getbasetemp()))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary tracking store and signing key pair in the environment (tests/signed_store.py)."""
    with signed_tracking_store(tmp_path_factory, "serving") as made:
        yield made


@pytest.fixture(scope="module")
def binary_keras(tmp_path_factory):
    """Sigmoid(10 * mean - 5): about 0.02 for a dark image, 0.94 for a bright one."""
    path = tmp_path_factory.mktemp("keras") / "binary.keras"
    _mean_intensity_model(1, [10.0], [-5.0]).save(path)
    return path


@pytest.fixture(scope="module")
def registered(store, binary_keras):
    """The binary classifier logged with log_classifier, DOMAIN and its serving example as evaluate logs it,
    registered, signed as evaluate signs, alias champion; its URI."""
    _, info = register_champion(store, binary_keras, MODEL_NAME, threshold=THRESHOLD, classes=[0, 1],
                                settings=SETTINGS, domain=DOMAIN, input_example=serving.serving_example(DOMAIN))
    return {"uri": f"models:/{MODEL_NAME}@champion", "info": info}


@pytest.fixture(scope="module")
def model(registered, tmp_path_factory):
    """The champion loaded by MLflow from a verified copy. Not from ``models:/`` directly: on a local
    store MLflow then writes a ``registered_model_meta`` file into the stored version itself, which
    its signature does not cover, and every later verification would refuse it."""
    from dicomflow.signing import download_verified, verify_key_from_env

    local = download_verified(registered["uri"], tmp_path_factory.mktemp("verified"),
                              key=verify_key_from_env(os.environ))
    return mlflow.pyfunc.load_model(str(local))


@pytest.fixture(scope="module")
def dicoms(tmp_path_factory, make_dicom):
    """bright, mid and dark DX images (one without extension, one in a subfolder), a bright CR image,
    a truncated DICOM file, a text file, and under other/ copies of the FOREIGN files."""
    folder = tmp_path_factory.mktemp("dicoms")
    files = {
        "bright": make_dicom(folder / "a" / "bright.dcm", _image(BRIGHT, seed=1, shape=(64, 64)), **WINDOW),
        "mid": make_dicom(folder / "mid", _image(MID, seed=2, shape=(64, 64)), **WINDOW),
        "dark": make_dicom(folder / "dark.dcm", _image(DARK, seed=3, shape=(80, 40)), **WINDOW),
        "cr": make_dicom(folder / "cr.dcm", _image(BRIGHT, seed=6, shape=(50, 70)), Modality="CR", **WINDOW),
    }
    (folder / "other").mkdir()
    for name, test_file in FOREIGN.items():
        files[name] = Path(shutil.copy(get_testdata_file(test_file), folder / "other" / f"{name}.dcm"))
    content = files["bright"].read_bytes()
    truncated = folder / "a" / "truncated.dcm"
    truncated.write_bytes(content[:len(content) - 1500])  # cut inside Pixel Data
    (folder / "README").write_text("not an image\n")
    return {**files, "truncated": truncated, "text": folder / "README", "folder": folder}


def _keras_on_ingest_pixels(keras_path: Path, files: list[Path]) -> np.ndarray:
    """The Keras model on stages.ingest.read_image's pixels, through stages.models.to_model_input."""
    pixels = np.stack([read_image(path, SETTINGS)[1][0].pixels for path in files])
    return keras.models.load_model(keras_path).predict(to_model_input(pixels), verbose=0)


GOOD = ("bright", "mid", "dark")


class TestDicomClassifier:
    def test_paths_bytes_and_arrays_give_the_keras_probabilities(self, model, dicoms, binary_keras):
        files = [dicoms[name] for name in GOOD]
        expected = _keras_on_ingest_pixels(binary_keras, files)[:, 0]

        by_path = model.predict(pd.DataFrame({"path": [str(path) for path in files]}))
        by_bytes = model.predict(pd.DataFrame({"dicom": [path.read_bytes() for path in files]}))
        stored = np.stack([read_image(path, SETTINGS)[1][0].pixels for path in files])  # uint8 (n, 32, 32)
        classifier = model.unwrap_python_model()
        by_uint8 = classifier.predict(None, stored)
        by_float = classifier.predict(None, (stored / 255.0).astype(np.float32)[..., None])

        for result in (by_path, by_bytes, by_uint8, by_float):
            assert list(result.columns) == ["probability", "label", "error"]
            np.testing.assert_allclose(result["probability"], expected, atol=1e-6)
            assert list(result["error"]) == ["", "", ""]

    def test_a_bright_image_scores_far_above_a_dark_one(self, model, dicoms):
        result = model.predict(pd.DataFrame({"path": [str(dicoms["bright"]), str(dicoms["dark"])]}))
        bright, dark = result["probability"]
        assert bright > 0.9 and dark < 0.1
        assert list(result["label"]) == [1, 0]

    def test_bad_files_get_a_reason_and_the_others_are_predicted(self, model, dicoms):
        names = ["bright", "truncated", "text", "dark"]
        sources = [str(dicoms[name]) for name in names] + [str(dicoms["folder"] / "missing.dcm")]
        result = model.predict(pd.DataFrame({"path": sources}))
        errors = result["error"].tolist()
        assert errors[0] == "" and errors[3] == ""
        assert errors[1].startswith("truncated_pixel_data: ")
        assert errors[2].startswith("not_dicom: ")
        assert errors[4].startswith("not_found: ")
        bad = result.iloc[[1, 2, 4]]
        assert bad["probability"].isna().all() and (bad["label"] == -1).all()
        assert result["probability"].iloc[[0, 3]].notna().all()

        as_bytes = model.predict(pd.DataFrame({"dicom": [dicoms[name].read_bytes() for name in names]}))
        assert [error.split(":")[0] for error in as_bytes["error"]] == ["", "truncated_pixel_data", "not_dicom", ""]

    def test_label_follows_the_threshold(self, model, dicoms):
        result = model.predict(pd.DataFrame({"path": [str(dicoms[name]) for name in GOOD]}))
        mid = result["probability"].iloc[1]
        assert THRESHOLD <= mid < 0.5  # positive at the logged threshold, negative at 0.5
        np.testing.assert_array_equal(result["label"], (result["probability"] >= THRESHOLD).astype(int))
        assert list(result["label"]) == [1, 1, 0]

    def test_multi_class_gives_a_column_per_class_and_the_argmax(self, store, dicoms, tmp_path):
        # Logits -20m + 8, 2, 20m - 12 for mean pixel m: dark -> 0, mid -> 1, bright -> 2.
        path = tmp_path / "three.keras"
        _mean_intensity_model(3, [-20.0, 0.0, 20.0], [8.0, 2.0, -12.0]).save(path)
        with mlflow.start_run(experiment_id=store["experiment"]):
            info = serving.log_classifier(path, threshold=None, classes=[0, 1, 2], settings=SETTINGS)
        files = [dicoms[name] for name in ("dark", "mid", "bright", "text")]
        result = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"path": [str(p) for p in files]}))

        assert list(result.columns) == ["probability_0", "probability_1", "probability_2", "label", "error"]
        expected = _keras_on_ingest_pixels(path, files[:3])
        probabilities = result[["probability_0", "probability_1", "probability_2"]].to_numpy()
        np.testing.assert_allclose(probabilities[:3], expected, atol=1e-6)
        assert list(result["label"]) == [0, 1, 2, -1]
        assert np.isnan(probabilities[3]).all() and result["error"].iloc[3].startswith("not_dicom: ")

    def test_multi_frame_files_give_the_chosen_frame_or_the_mean_of_all(self, binary_keras, tmp_path,
                                                                       make_dicom):
        frames = np.stack([_image(BRIGHT, seed=4, shape=(32, 32)), _image(DARK, seed=5, shape=(32, 32))])
        path = make_dicom(tmp_path / "two_frames.dcm", frames, **WINDOW)
        context = mlflow.pyfunc.PythonModelContext({serving.KERAS_ARTIFACT: str(binary_keras)}, None)
        scores = {}
        for choice in ("first", "all"):
            classifier = serving.DicomClassifier(settings=PixelSettings(size=32, frames=choice),
                                                 threshold=0.5, classes=[0, 1])
            classifier.load_context(context)
            scores[choice] = classifier.predict(None, pd.DataFrame({"path": [str(path)]}))["probability"].iloc[0]
            per_frame = classifier.predict(None, frames)["probability"].to_numpy()
        assert scores["first"] == pytest.approx(per_frame[0], abs=1e-6)
        assert scores["all"] == pytest.approx(per_frame.mean(), abs=1e-6)

    def test_wrong_input_is_a_clear_error(self, model):
        classifier = model.unwrap_python_model()
        with pytest.raises(ValueError, match=r"images must be \(n, 32, 32\) .*got \(2, 16, 16\)"):
            classifier.predict(None, np.zeros((2, 16, 16), np.uint8))
        with pytest.raises(ValueError, match="float images must hold values in"):
            classifier.predict(None, np.full((1, 32, 32), 2.0, np.float32))
        with pytest.raises(serving.BadRequest, match=r"needs a 'dicom' column .* or a 'path' column .*; "
                                                     r"got columns \['file'\]") as info:
            classifier.predict(None, pd.DataFrame({"file": ["x.dcm"]}))
        assert isinstance(info.value, ValueError)

    def test_classes_must_match_the_model_output(self, binary_keras):
        with pytest.raises(ValueError, match="single sigmoid output, so classes must list 2 labels"):
            serving.log_classifier(binary_keras, threshold=0.5, classes=[0, 1, 2], settings=SETTINGS)
        with pytest.raises(ValueError, match="single sigmoid output, so threshold must be a float in .* got None"):
            serving.log_classifier(binary_keras, threshold=None, classes=[0, 1], settings=SETTINGS)
        with pytest.raises(ValueError, match=r"threshold must be a float in \[0, 1\] or None; got 1.5"):
            serving.DicomClassifier(settings=SETTINGS, threshold=1.5, classes=[0, 1])


OUT_OF_DOMAIN = {  # what each FOREIGN file's error starts with, and holds
    "mr": ("out_of_domain: Modality 'MR' is not one the model was trained on (CR, DX); ", "MR"),
    "us": ("out_of_domain: Modality 'US' is not one the model was trained on (CR, DX); ",
           "PhotometricInterpretation 'YBR_RCT' is colour (3 channels); the model was trained on grayscale "
           "(1 channel) images (MONOCHROME2)"),
    "rgb": ("out_of_domain: Modality 'OT' is not one the model was trained on (CR, DX); ",
            "PhotometricInterpretation 'RGB' is colour (3 channels)"),
}


@pytest.mark.slow
def test_a_volume_model_scores_the_series_of_a_request_as_ingest_assembles_them(store, dicoms, tmp_path):
    """A resnet3d_small logged as evaluate logs a CT model: its metadata states the volume; a request of
    files is grouped into series, each file's row gets its series' score (that of the volume ingest
    makes of the series), a broken series' rows say why, a radiograph is no slice; preprocessed volumes
    are scored as the network scores them."""
    import dataclasses

    from dicomflow.devtools.ct_sample import generate_ct_sample
    from dicomflow.dicom.series import VolumeSettings, group_series, read_slice_header, read_volume
    from dicomflow.model.architectures import build_resnet3d_small, predict_probabilities

    keras.utils.set_random_seed(0)
    path = tmp_path / "volume.keras"
    network = build_resnet3d_small((16, 16, 16, 1))
    network.save(path)
    volume = VolumeSettings(spacing_mm=(10.0, 20.0, 20.0), size=(16, 16, 16), window=(-600.0, 1500.0))
    with mlflow.start_run(experiment_id=store["experiment"]):
        info = serving.log_classifier(path, threshold=0.5, classes=[0, 1], settings=SETTINGS, domain=DOMAIN,
                                      input_example=serving.serving_example(DOMAIN),
                                      volume={**dataclasses.asdict(volume), "policy": "strict", "min_slices": 8})
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    assert loaded.metadata.metadata["volume"] == {"input_shape": [16, 16, 16, 1], "spacing_mm": [10.0, 20.0, 20.0],
                                                  "size": [16, 16, 16], "window": [-600.0, 1500.0],
                                                  "max_decoded_mib": 2048, "policy": "strict", "min_slices": 8}

    data = tmp_path / "ct"
    summary = generate_ct_sample(data, patients=2)
    gap = summary.by_defect("gap")
    gap_folder = (data / gap.files[0]).parent
    intact = sorted(p for p in (data / "studies").rglob("*.dcm") if p.parent != gap_folder
                    and not any(p.parent == (data / b.files[0]).parent for b in summary.broken))
    gap_files = sorted(gap_folder.glob("*.dcm"))
    request = [*intact, *gap_files, dicoms["dark"]]
    result = loaded.predict(pd.DataFrame({"path": [str(p) for p in request]}))

    # Expected: the volume of each intact series as ingest's reader makes it, scored by the network.
    headers = [read_slice_header(p, data_dir=data, max_bytes=volume.max_bytes) for p in intact]
    groups, _ = group_series(headers)
    assert len(groups) == 2
    expected = {}
    for group in groups:
        built = read_volume(group, data_dir=data, settings=volume, fill_gaps=False)
        score = predict_probabilities(network, built.pixels[None, ..., None] / 255.0)[0]
        expected.update({str(data / h.relative_path): score for h in group.headers})
    answered = dict(zip((str(p) for p in request), result["probability"]))
    for name, score in expected.items():
        assert answered[name] == pytest.approx(score, abs=1e-5)
    assert (result["error"].iloc[:len(intact)] == "").all()
    assert result["error"].iloc[len(intact):len(intact) + len(gap_files)].str.startswith("series_gap: ").all()
    assert result["probability"].iloc[len(intact):].isna().all()
    assert result["error"].iloc[-1].startswith("no_geometry: ")

    # What `dicomflow predict` does: calls of at most 10 files that never cut a series (each of
    # 32-40 files), then one numbered row per series with its score; no UID in the table.
    from dicomflow.serving.predict import StudySettings, predict_files, study_instance_uids, with_studies

    names = [p.name for p in request]
    table = predict_files(loaded, request, names=names, batch_files=10)
    pd.testing.assert_frame_equal(table.drop(columns="path"), result.reset_index(drop=True))
    table = with_studies(table, study_instance_uids(request, "SeriesInstanceUID"), unit="series",
                         settings=StudySettings("mean", 1, 0.5, None, "the series' own score"),
                         model_metadata=loaded.metadata.metadata)
    series = table[table["unit"] == "series"]
    assert sorted(series["n_files"]) == sorted(len(g.headers) for g in groups)
    assert sorted(series["probability"]) == pytest.approx(sorted({float(v) for v in expected.values()}), abs=1e-5)
    assert not any(uid in table.to_csv() for uid in filter(None, study_instance_uids(request, "SeriesInstanceUID")))

    volumes = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 16), dtype=np.uint8)
    classifier = loaded.unwrap_python_model()  # arrays go to the classifier itself, as for images
    result = classifier.predict(None, volumes)
    np.testing.assert_allclose(result["probability"], predict_probabilities(network, volumes[..., None] / 255.0),
                               atol=1e-5)
    assert (result["label"] == (result["probability"] >= 0.5).astype(int)).all()
    with pytest.raises(ValueError, match=r"volumes must be \(n, 16, 16, 16\)"):
        classifier.predict(None, volumes[:, :8])


def _assert_out_of_domain(result: pd.DataFrame, names: list[str]) -> None:
    """Rows of ``result`` (in ``names`` order): FOREIGN ones refused, the others predicted."""
    for (_, row), name in zip(result.iterrows(), names):
        if name in OUT_OF_DOMAIN:
            start, holds = OUT_OF_DOMAIN[name]
            assert row["error"].startswith(start) and holds in row["error"], (name, row["error"])
            assert np.isnan(row["probability"]) and row["label"] == -1, name
        else:
            assert row["error"] == "" and 0 <= row["probability"] <= 1 and row["label"] in (0, 1), name


class TestTrainingDomain:
    def test_files_outside_it_get_no_probability_and_the_reason_naming_the_value(self, model, dicoms,
                                                                                  binary_keras):
        names = ["mr", "cr", "us", "rgb", "bright"]
        by_path = model.predict(pd.DataFrame({"path": [str(dicoms[name]) for name in names]}))
        by_bytes = model.predict(pd.DataFrame({"dicom": [dicoms[name].read_bytes() for name in names]}))
        for result in (by_path, by_bytes):
            _assert_out_of_domain(result, names)
            expected = _keras_on_ingest_pixels(binary_keras, [dicoms["cr"], dicoms["bright"]])[:, 0]
            np.testing.assert_allclose(result["probability"].iloc[[1, 4]], expected, atol=1e-6)
        assert model.unwrap_python_model().domain == DOMAIN

    def test_the_header_is_checked_before_the_pixels_are_decoded(self, model, dicoms, binary_keras):
        # MR_truncated.dcm's pixel data is cut short: decoding it would say "truncated_pixel_data".
        result = model.predict(pd.DataFrame({"path": [str(dicoms["mr_truncated"])]}))
        assert result["error"].iloc[0].startswith("out_of_domain: Modality 'MR' is not one")
        unchecked = serving.DicomClassifier(settings=SETTINGS, threshold=THRESHOLD, classes=[0, 1])
        unchecked.load_context(mlflow.pyfunc.PythonModelContext({serving.KERAS_ARTIFACT: str(binary_keras)}, None))
        assert unchecked.predict(None, pd.DataFrame({"path": [str(dicoms["mr_truncated"])]}))["error"].iloc[0] \
            .startswith("truncated_pixel_data: ")

    def test_preprocessed_arrays_are_not_checked(self, model, dicoms):
        # They carry no header; the MR's pixels as ingest makes them are scored like any image.
        pixels = read_image(dicoms["mr"], SETTINGS)[1][0].pixels[None]
        result = model.unwrap_python_model().predict(None, pixels)
        assert result["error"].iloc[0] == "" and 0 <= result["probability"].iloc[0] <= 1

    def test_is_in_the_model_metadata(self, registered):
        metadata = mlflow.models.get_model_info(registered["uri"]).metadata
        assert metadata["training_domain"] == {
            "modalities": ["CR", "DX"], "photometric_interpretations": ["MONOCHROME2"], "channels": [1],
            "rows": [40, 80], "columns": [40, 80], "pixel_spacing_mm": None, "body_parts": [], "margin": 0.2}

    def test_a_model_pickled_before_the_domain_existed_still_predicts(self, registered, dicoms, tmp_path):
        """A champion registered before this change: its pickled classifier has no ``domain``."""
        import cloudpickle

        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["info"].model_uri,
                                                         dst_path=str(tmp_path)))
        pickled = local / "python_model.pkl"
        classifier = cloudpickle.loads(pickled.read_bytes())
        del classifier.domain
        pickled.write_bytes(cloudpickle.dumps(classifier))

        old = mlflow.pyfunc.load_model(str(local))
        assert not hasattr(old.unwrap_python_model(), "domain")
        result = old.predict(pd.DataFrame({"path": [str(dicoms["mr"]), str(dicoms["bright"])]}))
        assert list(result["error"]) == ["", ""]  # no domain, no check: the MR is scored too
        assert result["probability"].notna().all() and result["label"].iloc[1] == 1


class TestLoggedModel:
    def test_ships_the_package_without_its_developer_tools(self, registered, tmp_path):
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["info"].model_uri,
                                                         dst_path=str(tmp_path)))
        shipped = {path.relative_to(local / "code").as_posix() for path in local.rglob("*.py")}
        assert {"dicomflow/__init__.py", "dicomflow/serving/pyfunc.py", "dicomflow/dicom/display.py",
                "dicomflow/dicom/reading.py", "dicomflow/runtime/parallel.py"} <= shipped
        assert not [name for name in shipped if "devtools" in name or not name.startswith("dicomflow/")]
        assert not list(local.rglob("sample_data*"))
        requirements = (local / "requirements.txt").read_text()
        for package in ("keras==", "tensorflow", "pydicom==", "pylibjpeg-rle==", "pyarrow=="):
            assert package in requirements

    @pytest.mark.slow  # a process that loads the shipped model
    def test_runs_on_the_code_it_ships(self, registered, dicoms, tmp_path):
        """Loaded in a fresh process, the model predicts with its own copy of the package, and that
        copy (which has no developer tools) is all it needs, the decoder processes included."""
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["info"].model_uri,
                                                         dst_path=str(tmp_path)))
        script = (
            "import sys, mlflow, pandas as pd\n"
            f"model = mlflow.pyfunc.load_model({str(local)!r})\n"
            f"print(model.predict(pd.DataFrame({{'path': [{str(dicoms['bright'])!r}]}}))['error'].tolist())\n"
            "print(sorted({m.__file__ for n, m in sys.modules.items() if n.split('.')[0] == 'dicomflow'}))\n")
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        errors, files = result.stdout.strip().splitlines()[-2:]
        assert errors == "['']"
        loaded = eval(files)  # noqa: S307  a list of paths printed by the child above
        assert loaded and all(path.startswith(str(local / "code" / "dicomflow")) for path in loaded), loaded
        assert not [path for path in loaded if "devtools" in path]

    def test_leak_scanner_finds_none_of_the_sample_names(self, registered, tmp_path):
        from dicomflow.devtools import sample_data
        from dicomflow.deid.leaks import scan_paths
        from dicomflow.deid.identifiers import Identifiers

        names = [*sample_data.LAST, *sample_data.FIRST["M"], *sample_data.FIRST["F"], *sample_data.STREETS,
                 *sample_data.CITIES, *(part for entry in sample_data.INSTITUTIONS for part in entry)]
        for person in (*sample_data.PHYSICIANS, *sample_data.OPERATORS):
            names += [person, *person.split("^")]
        identifiers = Identifiers()
        for name in names:
            identifiers.add_text(name, "sample name")
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=registered["info"].model_uri,
                                                         dst_path=str(tmp_path)))
        leaks = scan_paths(identifiers, [local])
        assert [(Path(leak.output).relative_to(local).as_posix(), leak.location) for leak in leaks] == []

    def test_signature_declares_dicom_binary_and_path_string(self, registered):
        signature = registered["info"].signature
        assert {spec.name: (spec.type.name, spec.required) for spec in signature.inputs.inputs} == {
            "path": ("string", False), "dicom": ("binary", False)}
        assert signature.outputs.input_names() == ["probability", "label", "error"]


def _run_env(store) -> dict[str, str]:
    """This interpreter's bin first on PATH: ``mlflow models serve`` runs ``uvicorn`` from PATH."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    inherited = {key: value for key, value in os.environ.items() if key != serving.SERVING_ROOT_ENV}
    return {**inherited, "PATH": path, "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_predict_cli_writes_every_file_with_reasons(registered, store, dicoms, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # the project's, naming the test model
    params["evaluate"]["registered_model_name"] = MODEL_NAME
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", str(dicoms["folder"]),
                             "--output", "out.csv"], cwd=tmp_path, env=_run_env(store), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "probability", "label", "error"]
    names = ["README", "a/bright.dcm", "a/truncated.dcm", "cr.dcm", "dark.dcm", "mid", "other/mr.dcm",
             "other/mr_truncated.dcm", "other/rgb.dcm", "other/us.dcm"]
    assert list(table["path"]) == names
    reasons = [error.split(":")[0] for error in table["error"]]
    assert reasons == ["not_dicom", "", "truncated_pixel_data", "", "", "", "out_of_domain", "out_of_domain",
                       "out_of_domain", "out_of_domain"]
    assert list(table["label"]) == [-1, 1, -1, 1, 0, 1, -1, -1, -1, -1]
    scored = table.assign(probability=pd.to_numeric(table["probability"], errors="coerce"))  # "" -> NaN
    _assert_out_of_domain(scored.iloc[[1, 3, 4, 5, 6, 8, 9]], ["bright", "cr", "dark", "mid", "mr", "rgb", "us"])
    assert "predicted 4 of 10 files" in result.stderr
    assert "6 files not predicted (4 out_of_domain, 1 not_dicom, 1 truncated_pixel_data)" in result.stderr


LEGACY_UID = "1.2.3.MRN4471123.20181102.1"  # built from a record number and a date: invalid UI


def _legacy_export(make_dicom, path: Path) -> Path:
    """A file whose SOP Instance UID pydicom warns about, quoting it, whenever it is read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return make_dicom(path, _image(BRIGHT, seed=9, shape=(64, 64)), SOPInstanceUID=LEGACY_UID,
                          **WINDOW)


def test_the_served_model_lets_no_warning_quote_a_file(model, make_dicom, tmp_path):
    path = _legacy_export(make_dicom, tmp_path / "legacy.dcm")
    with warnings.catch_warnings(record=True) as escaped:
        warnings.simplefilter("always")
        predicted = model.predict(pd.DataFrame({"dicom": [path.read_bytes()]}))
    assert predicted["error"].tolist() == [""]
    assert not [w for w in escaped if "MRN4471123" in str(w.message)]


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_predict_cli_logs_no_value_of_the_files(registered, store, make_dicom, tmp_path):
    _legacy_export(make_dicom, tmp_path / "in" / "legacy.dcm")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["registered_model_name"] = MODEL_NAME
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", "in", "--output", "out.csv"],
                            cwd=tmp_path, env=_run_env(store), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "MRN4471123" not in result.stdout + result.stderr


def test_predict_cli_fails_when_no_file_could_be_predicted(registered, dicoms, tmp_path):
    from dicomflow.errors import DataError
    from dicomflow.cli import parser, predict

    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(dicoms["text"], folder / "notes")  # no extension: a file that could be DICOM, so it is read
    with pytest.raises(DataError, match=r"none of the 1 files in .*in could be predicted \(1 not_dicom\)"):
        predict(parser().parse_args(["predict", str(folder), "--model", registered["uri"],
                                     "--output", str(tmp_path / "out.csv")]))
    assert (tmp_path / "out.csv").read_text().startswith("path,probability,label,error\nnotes,,-1,not_dicom: ")


@pytest.mark.slow
def test_predict_cli_skips_tables_documents_dicomdir_and_hidden_files_with_a_count(registered, dicoms, tmp_path,
                                                                                    caplog):
    """`make predict` reads data/, where labels.csv lives: such files are counted by kind, never failures,
    and the log names no file (a name can hold an accession number)."""
    from dicomflow.cli import parser, predict

    folder = tmp_path / "data"
    (folder / "study").mkdir(parents=True)
    shutil.copy(dicoms["bright"], folder / "study" / "IM0001")
    (folder / "labels.csv").write_text("accession_number,label\nACC0042,1\n")
    (folder / "study" / "ACC0042_report.PDF").write_bytes(b"%PDF-1.4\n")
    shutil.copy(get_testdata_file("DICOMDIR"), folder / "DICOMDIR")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    caplog.set_level("INFO", logger="dicomflow.predict")
    predict(parser().parse_args(["predict", str(folder), "--model", registered["uri"],
                                 "--output", str(tmp_path / "out.csv")]))
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table["path"]) == ["study/IM0001"] and list(table["error"]) == [""]
    assert "skipped 4 files not meant for prediction (1 .csv, 1 .pdf, 1 DICOMDIR, 1 hidden)" in caplog.messages
    assert "ACC0042" not in caplog.text
    assert "not predicted" not in caplog.text


@pytest.mark.slow
def test_a_file_named_on_the_command_line_is_read_whatever_its_name(registered, dicoms, tmp_path):
    from dicomflow.cli import parser, predict

    named = Path(shutil.copy(dicoms["bright"], tmp_path / "scan.txt"))
    predict(parser().parse_args(["predict", str(named), "--model", registered["uri"],
                                 "--output", str(tmp_path / "out.csv")]))
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table["error"]) == [""] and list(table["label"]) == [1]


def _predict_elsewhere(folder: Path, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    folder.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "dicomflow", "predict", *args], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_predict_cli_from_any_folder_takes_the_model_from_the_store_it_is_named(registered, store, dicoms,
                                                                                  tmp_path):
    env = {key: value for key, value in _run_env(store).items() if key != "MLFLOW_TRACKING_URI"}
    elsewhere = tmp_path / "elsewhere"
    result = _predict_elsewhere(elsewhere, [str(dicoms["bright"]), "--output", "out.csv", "--tracking-uri",
                                            store["uri"], "--model", MODEL_NAME], env)
    assert result.returncode == 0, result.stderr[-3000:]
    table = pd.read_csv(elsewhere / "out.csv", keep_default_na=False)
    assert list(table["error"]) == [""] and list(table["label"]) == [1]
    assert f"with models:/{MODEL_NAME}@champion" in result.stderr
    assert sorted(path.name for path in elsewhere.iterdir()) == ["out.csv"]  # no store, no keys made here


class TestServingExample:
    def test_is_inside_the_domain_and_the_same_bytes_each_time(self):
        from io import BytesIO

        import pydicom

        first, again = (serving.serving_example(DOMAIN)["dicom"].iloc[0] for _ in range(2))
        assert first == again and first[128:132] == b"DICM" and len(first) < 4096
        dataset = pydicom.dcmread(BytesIO(first))
        DOMAIN.check(dataset)  # raises Quarantined("out_of_domain", ...) outside it
        assert (dataset.Modality, dataset.Rows, dataset.Columns) == ("CR", 40, 40)
        assert "PatientID" not in dataset and "PatientName" not in dataset and "AccessionNumber" not in dataset

    def test_colour_domains_get_a_colour_file(self):
        from io import BytesIO

        import pydicom

        colour = TrainingDomain(modalities={"XC"}, photometrics={"RGB"}, channels={3}, rows=(100, 200),
                                columns=(120, 200), pixel_spacing_mm=(0.5, 1.0))
        dataset = pydicom.dcmread(BytesIO(serving.serving_example(colour)["dicom"].iloc[0]))
        assert (dataset.Modality, dataset.PhotometricInterpretation, dataset.SamplesPerPixel) == ("XC", "RGB", 3)
        assert [float(value) for value in dataset.PixelSpacing] == [0.5, 0.5]

    def test_the_model_predicts_it_without_error(self, model):
        predicted = model.predict(serving.serving_example(DOMAIN))
        assert list(predicted["error"]) == [""] and predicted["label"].iloc[0] in (0, 1)


class TestPredictNamesTheModel:
    """Outside a project, without what names the model: one line saying how to name it, no traceback."""

    @pytest.mark.slow
    def test_no_store_here_and_none_named(self, dicoms, tmp_path):
        env = {key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")}
        env["PYTHONPATH"] = str(REPO)
        result = _predict_elsewhere(tmp_path / "elsewhere", [str(dicoms["bright"])], env)
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith("error: no MLflow tracking store here (") and "--tracking-uri sqlite:////" in line
        assert sorted((tmp_path / "elsewhere").iterdir()) == []

    @pytest.mark.slow
    def test_a_store_that_does_not_exist(self, dicoms, tmp_path):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = _predict_elsewhere(tmp_path / "elsewhere", [str(dicoms["bright"]), "--tracking-uri",
                                                             f"sqlite:///{tmp_path}/nope/mlflow.db"], env)
        assert result.returncode == 1
        [line] = result.stderr.strip().splitlines()
        assert line.startswith(f"error: tracking store sqlite:///{tmp_path}/nope/mlflow.db: ")
        assert "does not exist" in line

    @pytest.mark.slow
    def test_a_store_without_a_champion_and_no_model_named(self, dicoms, tmp_path):
        uri = f"sqlite:///{tmp_path / 'empty.db'}"
        mlflow.MlflowClient(tracking_uri=uri).search_experiments()  # creates the store's tables
        env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
        result = _predict_elsewhere(tmp_path / "elsewhere", [str(dicoms["bright"])], env)
        assert result.returncode == 1
        [line] = [line for line in result.stderr.strip().splitlines() if line.startswith("error:")]
        assert "Traceback" not in result.stderr
        assert line == (f"error: which model? no params.yaml here and {uri}: it holds no registered model with "
                        "a champion alias; name one with --model NAME (models:/NAME@champion) or --model "
                        "models:/NAME/VERSION")


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_predict_cli_survives_hostile_files(registered, store, make_dicom, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["registered_model_name"] = MODEL_NAME
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    folder = tmp_path / "in"
    bright = make_dicom(folder / "bright.dcm", _image(BRIGHT, seed=1, shape=(64, 64)), **WINDOW)
    (folder / "panic.dcm").write_bytes(panicking_rle(modality="DX"))  # pylibjpeg-rle panics on it
    os.mkfifo(folder / "fifo")
    with open(os.path.join(os.fsencode(folder), NON_UTF8_NAME), "wb") as stream:
        stream.write(bright.read_bytes())

    result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", "in", "--output", "out.csv"],
                            cwd=tmp_path, env=_run_env(store), capture_output=True, text=True, timeout=180)

    assert result.returncode == 0, result.stderr
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table["path"]) == ["bright.dcm", "caf\\xe9.dcm", "fifo", "panic.dcm"]
    assert [error.split(":")[0] for error in table["error"]] == ["", "non_utf8_name", "not_a_file", "undecodable"]
    assert list(table["label"]) == [1, -1, -1, -1]
    assert "predicted 1 of 4 files" in result.stderr


def test_a_fifo_is_refused_before_it_is_opened_and_costs_nothing(model, dicoms, tmp_path):
    os.mkfifo(tmp_path / "stalled")  # a reader would wait there for a writer, as on a stalled share
    rows = pd.DataFrame({"path": [str(dicoms["bright"]), str(tmp_path / "stalled"), str(dicoms["dark"])]})
    started = time.monotonic()
    result = model.predict(rows)
    assert time.monotonic() - started < 20  # DECODE_TIMEOUT_S is 30: nothing waited on the FIFO
    assert list(result["error"]) == ["", "not_a_file: not a regular file (a folder, FIFO, device or socket): "
                                         "not read", ""]
    assert list(result["label"]) == [1, -1, 0]


@pytest.mark.slow  # waits out a decode time limit in the model's decoder processes
def test_a_file_past_the_decode_time_limit_costs_its_row_and_the_model_goes_on(binary_keras, dicoms, tmp_path):
    from hostile_files import deflate_bomb

    classifier = serving.DicomClassifier(settings=SETTINGS, threshold=THRESHOLD, classes=[0, 1], domain=DOMAIN)
    classifier.load(binary_keras)
    classifier.limit_decoding(timeout_s=0.5, processes=1)  # ingest's 2,048 MiB bound, half a second
    bomb = deflate_bomb(1500)  # inflating 1.5 GiB to measure it takes seconds
    rows = pd.DataFrame({"dicom": [dicoms["bright"].read_bytes(), bomb, dicoms["dark"].read_bytes()]})
    result = classifier.predict(None, rows)
    assert list(result["error"]) == ["", "timeout: still running after 0.5 s (the per-file time limit)", ""]
    assert list(result["label"]) == [1, -1, 0]
    again = classifier.predict(None, rows.iloc[[0, 2]])  # a new decoder took the overrun one's place
    assert list(again["label"]) == [1, 0]


def test_predict_cli_unknown_model_is_one_line(store):
    from dicomflow.errors import DataError
    from dicomflow.serving.predict import load_model

    with pytest.raises(DataError, match=f"cannot load model models:/{MODEL_NAME}-nope@champion from sqlite:"):
        load_model(f"models:/{MODEL_NAME}-nope@champion")


def _strict_json(text: str):
    """``text`` parsed as strict JSON: a bare NaN or Infinity (Python's json writes and reads them) fails."""
    return json.loads(text, parse_constant=lambda token: pytest.fail(f"not strict JSON: bare {token} in {text[:500]}"))


def _post(url: str, body: dict | bytes, *, token: str | None = None) -> tuple[int, object]:
    """POST ``body`` to ``url``/invocations; the status and the strictly parsed answer, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {token}"} if token else {})
    request = urllib.request.Request(f"{url}/invocations", data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, _strict_json(response.read().decode())
    except urllib.error.HTTPError as err:
        return err.code, _strict_json(err.read().decode())


TOKEN = "test-token-" + "x" * 32  # DICOMFLOW_SERVE_TOKEN of the server with a root
# The second server's limits: small, so that the tests can pass them with small requests.
SMALL_LIMITS = {"max_body_mib": 2, "max_files": 12, "max_decoded_mib": 64, "decode_timeout_s": 10.0,
                "request_timeout_s": 30.0, "decoders": 2}


def _start_server(uri: str, store, folder: Path, *, root: Path | None, limits: dict | None = None,
                  token: str | None = None) -> tuple[subprocess.Popen, str]:
    """The model at ``uri`` downloaded and served as ``dicomflow serve`` serves it once its signature
    is verified (``server.serve_folder``), on loopback, DICOMFLOW_SERVING_ROOT ``root`` or unset; once
    it answers /ping, the process and its base URL."""
    port = _free_port()
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder / "model"))
    env = _run_env(store) | ({serving.SERVING_ROOT_ENV: str(root)} if root else {}) \
        | ({"DICOMFLOW_SERVE_TOKEN": token} if token else {})
    script = ("import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO)\n"
              "from dicomflow.serving.server import ServingLimits, serve_folder, token_from_env\n"
              f"serve_folder(Path({local!r}), host='127.0.0.1', port={port}, "
              f"limits=ServingLimits(**{limits or {}!r}), token=token_from_env(__import__('os').environ, "
              "host='127.0.0.1'))\n")
    log = folder / "server.log"
    with open(log, "wb") as stream:
        server = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=stream, stderr=subprocess.STDOUT,
                                  start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    return server, f"http://127.0.0.1:{port}"
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            _stop(server)
            pytest.fail(f"server not up: {log.read_text(errors='replace')[-3000:]}")
        time.sleep(1)


@pytest.fixture(scope="module")
def served(registered, store, tmp_path_factory):
    """The champion served with the default limits, without DICOMFLOW_SERVING_ROOT or token; its base URL."""
    server, url = _start_server(registered["uri"], store, tmp_path_factory.mktemp("served"), root=None)
    try:
        yield url
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def served_root(dicoms, tmp_path_factory):
    """The folder the second server may read: a DICOM file, a subfolder with another, a link to a
    file outside (a DICOM file: readable, but not this server's to read), one to /etc/passwd and
    one to /dev/zero, a FIFO and a socket."""
    root = tmp_path_factory.mktemp("served_root")
    shutil.copy(dicoms["bright"], root / "bright.dcm")
    (root / "sub").mkdir()
    shutil.copy(dicoms["dark"], root / "sub" / "dark.dcm")
    (root / "outside.dcm").symlink_to(dicoms["cr"])
    (root / "passwd").symlink_to("/etc/passwd")
    (root / "zero").symlink_to("/dev/zero")
    os.mkfifo(root / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "socket"))
    yield root
    listener.close()


@pytest.fixture(scope="module")
def served_with_root(registered, store, served_root, tmp_path_factory):
    """The champion served with DICOMFLOW_SERVING_ROOT=served_root, SMALL_LIMITS and TOKEN; its base URL."""
    server, url = _start_server(registered["uri"], store, tmp_path_factory.mktemp("served"), root=served_root,
                                limits=SMALL_LIMITS, token=TOKEN)
    try:
        yield url
    finally:
        _stop(server)


def _readme_predicting() -> str:
    """The "Over HTTP" section of the docs page on serving (the README's "Predicting" once)."""
    text = (REPO / "docs" / "serving.md").read_text()
    start = text.index("## Over HTTP\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _big_in_domain_dicom(make_dicom, path: Path) -> Path:
    """A bright DX file, 64 x 64 like those the model knows, of 200 frames (800 KiB): its base64 is
    far past the 128 KiB the system lets one command-line argument be (MAX_ARG_STRLEN)."""
    frames = np.stack([_image(BRIGHT, seed=10 + i, shape=(64, 64)) for i in range(200)])
    return make_dicom(path, frames, **WINDOW)


@pytest.mark.slow  # starts a server
class TestServedModel:
    """The model served as `dicomflow serve` serves it, in a process of its own, spoken to over loopback."""

    def test_the_readme_recipe_works_for_a_file_too_big_for_the_command_line(self, served, store, make_dicom,
                                                                              model, tmp_path):
        # The README's three lines, as written; only the port and the .venv location differ.
        block = _readme_predicting().split("```bash\n", 1)[1].split("```", 1)[0]
        lines = [line for line in block.splitlines() if " request " in line or line.startswith("curl ")]
        assert [line.split()[0] for line in lines] == [".venv/bin/dicomflow", "curl"], block
        assert "-d @request.json" in lines[1] and "> request.json" in lines[0]
        assert ".venv/bin/dicomflow serve --port 5001" in block
        big = _big_in_domain_dicom(make_dicom, tmp_path / "IM0001.dcm")
        assert len(base64.b64encode(big.read_bytes())) > 4 * 128 * 1024
        port = served.rsplit(":", 1)[1]
        script = "\n".join(line.replace(".venv/bin/", f"{Path(sys.executable).parent}/").replace("5001", port)
                           for line in lines)
        if shutil.which("curl") is None:  # the body as curl would send it, by another real HTTP client
            script = script.splitlines()[0]
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True,
                                text=True, timeout=300, env=_run_env(store))
        assert result.returncode == 0, result.stderr[-2000:]
        if shutil.which("curl") is None:
            answer = _post(served, (tmp_path / "request.json").read_bytes())[1]
        else:
            answer = _strict_json(result.stdout)
        [row] = answer["predictions"]
        local = model.predict(pd.DataFrame({"dicom": [big.read_bytes()]}))
        assert row["error"] == "" and row["label"] == 1
        assert row["probability"] == pytest.approx(local["probability"].iloc[0], abs=1e-6)

    def test_the_registered_models_serving_example_is_answered_as_it_is(self, served, registered, tmp_path):
        """What MLflow shows as the model's example request (serving_input_example.json), sent unchanged."""
        from dicomflow.signing import download_verified, verify_key_from_env

        local = download_verified(registered["uri"], tmp_path / "verified", key=verify_key_from_env(os.environ))
        body = (local / "serving_input_example.json").read_bytes()
        assert json.loads(body)["dataframe_split"]["columns"] == ["dicom"]
        status, answer = _post(served, body)
        assert status == 200, answer
        [row] = answer["predictions"]
        assert row["error"] == "" and 0.0 <= row["probability"] <= 1.0 and row["label"] in (0, 1), row

    def test_every_documented_payload_form_delivers_the_file(self, served, model, dicoms):
        names = ["bright", "dark", "cr"]
        encoded = [base64.b64encode(dicoms[name].read_bytes()).decode("ascii") for name in names]
        local = model.predict(pd.DataFrame({"dicom": [dicoms[name].read_bytes() for name in names]}))
        forms = {
            "dataframe_split": {"dataframe_split": {"columns": ["dicom"], "data": [[text] for text in encoded]}},
            "dataframe_records": {"dataframe_records": [{"dicom": text} for text in encoded]},
            "inputs": {"inputs": {"dicom": encoded}},
            "instances": {"instances": [{"dicom": text} for text in encoded]},
            # base64 as the base64 tool writes it without -w0: lines of 76 characters
            "inputs, wrapped": {"inputs": {"dicom": [base64.encodebytes(dicoms[name].read_bytes()).decode()
                                                     for name in names]}},
        }
        for form, body in forms.items():
            status, answer = _post(served, body)
            assert status == 200, (form, answer)
            served_rows = pd.DataFrame(answer["predictions"])
            assert list(served_rows["error"]) == ["", "", ""], form
            assert list(served_rows["label"]) == list(local["label"]), form
            np.testing.assert_allclose(served_rows["probability"], local["probability"], atol=1e-6, err_msg=form)

    def test_text_that_is_not_base64_of_a_dicom_file_is_not_dicom(self, served, dicoms):
        content = dicoms["bright"].read_bytes()
        values = [base64.b64encode(content).decode() + "!",  # not base64 (strictly)
                  base64.b64encode(content).decode()[:-3],  # base64 cut short
                  base64.b64encode(b"patient list, not an image\n").decode(),  # base64, not DICOM
                  "just text"]
        status, answer = _post(served, {"inputs": {"dicom": values}})
        assert status == 200
        for row in answer["predictions"]:
            assert row["error"].startswith("not_dicom: not a DICOM file: ") and row["label"] == -1, row
            assert row["probability"] is None

    def test_unreadable_rows_are_null_never_nan(self, served, dicoms):
        contents = [dicoms[name].read_bytes() for name in ("bright", "text", "mr", "truncated")]
        contents.append(panicking_rle(modality="DX"))
        body = {"dataframe_split": {"columns": ["dicom"],
                                    "data": [[base64.b64encode(content).decode("ascii")] for content in contents]}}
        status, answer = _post(served, body)  # _post's parser fails on a bare NaN
        assert status == 200
        rows = answer["predictions"]
        assert [row["probability"] is None for row in rows] == [False, True, True, True, True]
        assert [row["error"].split(":")[0] for row in rows] == ["", "not_dicom", "out_of_domain",
                                                                 "truncated_pixel_data", "undecodable"]
        # A file that makes the decoder panic costs its row; the server answers the rest.
        assert rows[4]["error"] == "undecodable: the decoder crashed on the pixel data (PanicException)"
        assert "force" not in json.dumps(answer)  # the project's words, not pydicom's "Use force=True"

    @pytest.mark.parametrize("body", [
        {"dataframe_split": {"columns": ["file"], "data": [["x.dcm"]]}},
        {"dataframe_records": [{"dicom_file": "AAAA"}]},
        {"inputs": {"image": ["AAAA"]}},
        {"inputs": ["AAAA"]},
        {"dataframe_split": {"columns": [], "data": []}},
    ], ids=["wrong name", "misspelt dicom", "inputs wrong name", "no column name", "no column"])
    def test_a_request_without_the_columns_is_a_400_of_one_line(self, served, body):
        status, answer = _post(served, body)
        assert status == 400, answer
        assert set(answer) >= {"error_code", "message"} and "stack_trace" not in answer
        message = answer["message"]
        assert "\n" not in message and "Traceback" not in message and len(message) < 600, message
        assert message.startswith("the model needs a 'dicom' column (the DICOM file's bytes, base64 in JSON) "
                                  "or a 'path' column (a file under DICOMFLOW_SERVING_ROOT"), message

    def test_without_a_serving_root_no_path_is_read(self, served, dicoms):
        paths = ["/etc/passwd", str(dicoms["bright"]), str(dicoms["folder"] / "missing.dcm"), "bright.dcm"]
        status, answer = _post(served, {"dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]}})
        assert status == 200
        assert len(answer["predictions"]) == len(paths)
        for row in answer["predictions"]:
            # The same answer whether the file exists, is DICOM or not: nothing was opened.
            assert row["error"] == ("path_refused: not read: this model reads files by path only when "
                                    "DICOMFLOW_SERVING_ROOT names the folder it may read on the machine that runs "
                                    "it; send the file's content in the 'dicom' column instead"), row
            assert row["probability"] is None and row["label"] == -1

    def test_with_a_serving_root_only_paths_inside_it_are_read(self, served_with_root, served_root, model, dicoms):
        paths = {
            str(served_root / "bright.dcm"): "",  # absolute, inside
            "sub/dark.dcm": "",  # relative: under the root
            "sub/../bright.dcm": "",  # ".." that stays inside
            "missing.dcm": "not_found",  # inside: the reader says what it is
            "/etc/passwd": "path_refused",
            "../" + served_root.name + "-elsewhere/x.dcm": "path_refused",  # ".." out of it
            str(served_root / ".." / "x.dcm"): "path_refused",
            "outside.dcm": "path_refused",  # a link inside to a DICOM file outside
            "passwd": "path_refused",  # a link inside to /etc/passwd
            str(dicoms["bright"]): "path_refused",  # a DICOM file outside
        }
        status, answer = _post(served_with_root,
                               {"dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]}}, token=TOKEN)
        assert status == 200
        rows = answer["predictions"]
        assert [row["error"].split(":")[0] for row in rows] == list(paths.values()), rows
        expected = model.predict(pd.DataFrame({"dicom": [dicoms[name].read_bytes() for name in ("bright", "dark")]}))
        np.testing.assert_allclose([row["probability"] for row in rows[:3]],
                                   expected["probability"].iloc[[0, 1, 0]], atol=1e-6)
        for row in rows[4:]:
            assert row["error"] == ("path_refused: not read: it is not a file under DICOMFLOW_SERVING_ROOT once "
                                    "links and '..' are resolved; send a path inside it, or the file's content in "
                                    "the 'dicom' column"), row
            assert row["probability"] is None and row["label"] == -1
        # Neither the path sent nor where a link points nor the root is said: no path in any answer.
        assert "/" not in json.dumps([row["error"] for row in rows])


def _raw_post(url: str, body: bytes, *, token: str | None = TOKEN, chunked: bool = False,
              content_type: str = "application/json") -> tuple[int, bytes, float]:
    """POST ``body`` with http.client (``chunked``: no Content-Length); status, raw answer, seconds."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    headers = {"Content-Type": content_type} | ({"Authorization": f"Bearer {token}"} if token else {})
    started = time.monotonic()
    try:
        if chunked:
            chunks = iter([body[i:i + 65536] for i in range(0, len(body), 65536)])
            connection.request("POST", "/invocations", body=chunks, headers=headers, encode_chunked=True)
        else:
            connection.request("POST", "/invocations", body=body, headers=headers)
        response = connection.getresponse()
        return response.status, response.read(), time.monotonic() - started
    except (BrokenPipeError, ConnectionResetError):  # the server answered and closed before the upload ended
        response = connection.getresponse()
        return response.status, response.read(), time.monotonic() - started
    finally:
        connection.close()


def _assert_one_line_refusal(raw: bytes, *, code: str, starts: str, absent: tuple[str, ...] = ()) -> str:
    """An error answer: MLflow's JSON shape, one short line of the server's words, nothing echoed."""
    answer = _strict_json(raw.decode())
    assert set(answer) == {"error_code", "message"} and answer["error_code"] == code, answer
    message = answer["message"]
    assert "\n" not in message and len(message) < 400 and message.startswith(starts), message
    assert "/tmp" not in message and str(Path.home()) not in message, message  # no absolute path
    for text in absent:
        assert text not in raw.decode(), text
    return message


class _Meanwhile:
    """Another client, in a thread, sending one good file again and again while a test's request
    runs: each answer's status and time, to show that it was served meanwhile."""

    def __init__(self, url: str, content: bytes) -> None:
        self.body = json.dumps({"dataframe_split": {"columns": ["dicom"],
                                                    "data": [[base64.b64encode(content).decode()]]}}).encode()
        self.url, self.answers, self._stop = url, [], threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.is_set():
            status, raw, seconds = _raw_post(self.url, self.body)
            label = _strict_json(raw.decode())["predictions"][0]["label"] if status == 200 else None
            self.answers.append((status, label, seconds))

    def __enter__(self) -> _Meanwhile:
        self._thread.start()
        time.sleep(0.5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


@pytest.mark.slow
class TestServingLimits:
    """The served model under hostile requests (served_with_root: SMALL_LIMITS, TOKEN), while
    another client is served: status, one-line answers, nothing of the request echoed back."""

    def test_non_regular_paths_are_refused_before_any_read(self, served_with_root, served_root, dicoms):
        paths = ["fifo", "socket", "zero", "sub", "bright.dcm"]
        with _Meanwhile(served_with_root, dicoms["bright"].read_bytes()) as other:
            status, raw, seconds = _raw_post(served_with_root, json.dumps(
                {"dataframe_split": {"columns": ["path"], "data": [[p] for p in paths]}}).encode())
        assert status == 200 and seconds < 10, (status, seconds)  # the decode limit is 10 s: nothing waited
        errors = [row["error"] for row in _strict_json(raw.decode())["predictions"]]
        not_a_file = "not_a_file: not a regular file (a folder, FIFO, device or socket): not read"
        assert errors[:2] == [not_a_file, not_a_file] and errors[3] == not_a_file, errors
        assert errors[2].startswith("path_refused: ") and errors[4] == "", errors  # /dev/zero is outside the root
        assert other.answers and all(status == 200 and label == 1 for status, label, _ in other.answers)

    @pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
    def test_a_body_over_the_cap_is_413_and_another_client_is_served(self, served_with_root, dicoms, chunked):
        name = "Fakename^Patient"
        body = json.dumps({"dataframe_split": {"columns": ["dicom"], "data": [[name + "A" * (3 << 20)]]}}).encode()
        with _Meanwhile(served_with_root, dicoms["bright"].read_bytes()) as other:
            status, raw, seconds = _raw_post(served_with_root, body, chunked=chunked)
        assert status == 413 and seconds < 10, (status, seconds)
        _assert_one_line_refusal(raw, code="REQUEST_TOO_LARGE", starts="the request body is larger than the "
                                 "server's --max-body-mib 2; ", absent=(name,))
        assert other.answers and all(status == 200 and label == 1 for status, label, _ in other.answers)

    def test_too_many_files_is_413(self, served_with_root, dicoms):
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [["bright.dcm"]] * 13}}).encode()
        status, raw, _ = _raw_post(served_with_root, body)
        assert status == 413
        _assert_one_line_refusal(raw, code="REQUEST_TOO_LARGE", starts="the request holds 13 files, more than the "
                                 "server's --max-files 12; send them in several requests")

    def test_a_deflate_bomb_is_too_large_within_seconds_and_another_client_is_served(self, served_with_root,
                                                                                       dicoms):
        from hostile_files import deflate_bomb

        bomb = deflate_bomb(512)  # a file of about 500 KiB that inflates to 512 MiB; the cap is 64 MiB
        assert len(bomb) < (2 << 20) * 3 // 4
        body = json.dumps({"dataframe_split": {"columns": ["dicom"],
                                               "data": [[base64.b64encode(bomb).decode()]]}}).encode()
        with _Meanwhile(served_with_root, dicoms["bright"].read_bytes()) as other:
            status, raw, seconds = _raw_post(served_with_root, body)
        assert status == 200 and seconds < 5, (status, seconds)
        [row] = _strict_json(raw.decode())["predictions"]
        assert row["error"] == ("too_large: the deflated data set inflates to more than 64 MiB (the server's "
                                "--max-decoded-mib)") and row["label"] == -1, row
        assert other.answers and all(status == 200 and label == 1 for status, label, _ in other.answers)

    def test_malformed_json_is_a_one_line_400_that_echoes_nothing(self, served_with_root, dicoms):
        name = "Fakename^Patient"
        content = base64.b64encode(dicoms["bright"].read_bytes()).decode()
        body = ('{"dataframe_split": {"columns": ["dicom", "note"], "data": [["' + content + '", "' + name
                + '"],, ]}}').encode()  # a stray comma
        status, raw, _ = _raw_post(served_with_root, body)
        assert status == 400 and len(raw) < 500, (status, len(raw))
        _assert_one_line_refusal(raw, code="BAD_REQUEST", starts="the request body is not valid JSON: Expecting "
                                 "value at line 1 column ", absent=(name, content[:40]))

    @pytest.mark.parametrize("body, starts", [
        (b"\xff\xfe not text", "the request body is not UTF-8 text"),
        (b'["not", "an object"]', "the request must be a JSON object with one of the keys"),
        (b'{"dataframe_split": {"columns": ["dicom"], "data": [[12]]}}', "every 'dicom' value must be text"),
        (b'{"dataframe_split": {"columns": ["dicom"], "data": [["a", "Fakename^Patient"]]}}',
         "each row of 'dataframe_split' must hold one value per column (1)"),
    ], ids=["not utf-8", "not an object", "number", "row too long"])
    def test_other_bad_bodies_are_one_line_400s(self, served_with_root, body, starts):
        status, raw, _ = _raw_post(served_with_root, body)
        assert status == 400
        _assert_one_line_refusal(raw, code="BAD_REQUEST", starts=starts, absent=("Fakename",))

    def test_without_the_token_nothing_is_scored(self, served_with_root, dicoms):
        body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [["bright.dcm"]]}}).encode()
        for token in (None, TOKEN[:-1] + "y"):
            status, raw, _ = _raw_post(served_with_root, body, token=token)
            assert status == 401
            _assert_one_line_refusal(raw, code="UNAUTHENTICATED", starts="this server wants 'Authorization: Bearer "
                                     "<token>' with the token it was started with (DICOMFLOW_SERVE_TOKEN)",
                                     absent=(TOKEN[:12],))
        with urllib.request.urlopen(f"{served_with_root}/ping", timeout=10) as response:  # health checks stay open
            assert response.status == 200

    def test_a_content_type_other_than_json_is_415(self, served_with_root):
        status, raw, _ = _raw_post(served_with_root, b"dicom\nAAAA\n", content_type="text/csv")
        assert status == 415
        _assert_one_line_refusal(raw, code="UNSUPPORTED_MEDIA_TYPE", starts="send the request as Content-Type: "
                                 "application/json")

    def test_eight_concurrent_clients_get_the_answers_one_client_gets(self, served_with_root, model, dicoms):
        names = ["bright", "dark", "cr", "mid"]
        contents = {name: dicoms[name].read_bytes() for name in names}
        expected = model.predict(pd.DataFrame({"dicom": list(contents.values())}))
        answers: dict[int, list] = {}

        def client(number: int) -> None:
            answers[number] = []
            for round_ in range(5):
                name = names[(number + round_) % len(names)]
                status, raw, _ = _raw_post(served_with_root, json.dumps({"dataframe_split": {
                    "columns": ["dicom"], "data": [[base64.b64encode(contents[name]).decode()]]}}).encode())
                answers[number].append((name, status, _strict_json(raw.decode())))

        threads = [threading.Thread(target=client, args=(number,)) for number in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
        assert sum(len(got) for got in answers.values()) == 40
        for name, status, answer in (item for got in answers.values() for item in got):
            assert status == 200, answer
            [row] = answer["predictions"]
            local = expected.iloc[names.index(name)]
            assert row["error"] == "" and row["label"] == local["label"], (name, row)
            assert row["probability"] == pytest.approx(local["probability"], abs=1e-6)


class TestServeCommand:
    @pytest.mark.slow
    def test_binding_beyond_loopback_without_a_token_is_refused(self, tmp_path):
        env = {key: value for key, value in os.environ.items() if key != "DICOMFLOW_SERVE_TOKEN"}
        result = subprocess.run([sys.executable, "-m", "dicomflow", "serve", "--model", "models:/x@champion",
                                 "--host", "0.0.0.0"], cwd=tmp_path, env=env | {"PYTHONPATH": str(REPO)},
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            "error: refusing to serve on --host 0.0.0.0 without authentication: anyone who can reach it could use "
            "the model; set DICOMFLOW_SERVE_TOKEN (clients then send 'Authorization: Bearer <token>'), or serve on "
            "127.0.0.1 behind your own authenticating proxy")

    def test_a_short_token_is_refused_and_loopback_needs_none(self):
        from dicomflow.errors import SettingsError
        from dicomflow.serving.server import token_from_env

        with pytest.raises(SettingsError, match=r"DICOMFLOW_SERVE_TOKEN must be at least 32 characters; got 6"):
            token_from_env({"DICOMFLOW_SERVE_TOKEN": "secret"}, host="127.0.0.1")
        assert token_from_env({}, host="127.0.0.1") is None and token_from_env({}, host="::1") is None
        assert token_from_env({"DICOMFLOW_SERVE_TOKEN": TOKEN}, host="0.0.0.0") == TOKEN

    def test_limits_are_checked_when_given(self):
        from dicomflow.errors import SettingsError
        from dicomflow.serving.server import ServingLimits

        with pytest.raises(SettingsError, match=r"--decode-timeout-s must be above 0 and below "
                                                r"--request-timeout-s \(60\), so that a slow file costs its row "
                                                r"and not the answer; got 90"):
            ServingLimits(decode_timeout_s=90)
        with pytest.raises(SettingsError, match=r"--max-files must be at least 1; got 0"):
            ServingLimits(max_files=0)


def _serve_command(model_uri: str, store, keys: tuple[Path, Path], log: Path) -> tuple[subprocess.Popen, int]:
    """``dicomflow serve --model model_uri`` on a free loopback port, verifying with ``keys``' public key."""
    from dicomflow.signing import VERIFY_KEY_FILE_ENV

    port = _free_port()
    env = _run_env(store) | {VERIFY_KEY_FILE_ENV: str(keys[1])}
    with open(log, "wb") as stream:
        server = subprocess.Popen([sys.executable, "-m", "dicomflow", "serve", "--model", model_uri,
                                   "--port", str(port)], cwd=log.parent, env=env, stdout=stream,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    return server, port


@pytest.mark.slow
class TestServeVerifies:
    """``dicomflow serve`` downloads the version and verifies its signature before loading any of it."""

    def test_an_unsigned_or_altered_model_is_refused_before_its_code_runs(self, store, tmp_path):
        from dicomflow.signing import SIGNATURE_TAG, SIGNING_KEY_FILE_ENV, sign_model_version, signing_key_from_env, \
            write_key_pair

        class Planted(mlflow.pyfunc.PythonModel):  # defined here: pickled by value, loads anywhere
            def __init__(self, marker: str) -> None:
                self.marker = marker

            def load_context(self, context) -> None:
                Path(self.marker).write_text("the planted model's code ran")

            def predict(self, context, model_input, params=None):
                return model_input

        keys = write_key_pair(tmp_path / "keys")
        name, client = "serving-test-planted", mlflow.MlflowClient()
        markers = [tmp_path / "unsigned.marker", tmp_path / "altered.marker"]
        for marker in markers:
            with mlflow.start_run(experiment_id=store["experiment"]):
                info = mlflow.pyfunc.log_model(name="planted", python_model=Planted(str(marker)))
            mlflow.register_model(info.model_uri, name)
            marker.unlink()  # log_model loads the model once to check it: only what runs later counts
        sign_model_version(name, "1", key=signing_key_from_env({SIGNING_KEY_FILE_ENV: str(keys[0])}))
        # Version 2 carries version 1's signature, as anyone who may write tags could copy it.
        client.set_model_version_tag(name, "2", SIGNATURE_TAG, client.get_model_version(name, "1").tags[SIGNATURE_TAG])
        client.delete_model_version_tag(name, "1", SIGNATURE_TAG)  # version 1: unsigned

        for version, reason in (("1", "not signed"), ("2", "")):
            server, _ = _serve_command(f"models:/{name}/{version}", store, keys, tmp_path / f"serve{version}.log")
            try:
                server.wait(timeout=180)
            finally:
                _stop(server)
            lines = (tmp_path / f"serve{version}.log").read_text().strip().splitlines()
            assert server.returncode == 1, lines[-20:]
            assert lines[-1].startswith(f"error: refused models:/{name}/{version}: {reason}"), lines[-1]
        assert not [marker for marker in markers if marker.exists()]

        # The markers could have appeared: loaded without verification, version 1's code runs.
        loaded = subprocess.run([sys.executable, "-c", f"import mlflow; mlflow.pyfunc.load_model('models:/{name}/1')"],
                                env=_run_env(store), capture_output=True, text=True, timeout=300)
        assert loaded.returncode == 0, loaded.stderr[-2000:]
        assert markers[0].read_text() == "the planted model's code ran"

    def test_a_signed_model_is_served(self, registered, store, dicoms, model, tmp_path):
        server, port = _serve_command(registered["uri"], store, store["keys"], tmp_path / "serve.log")
        try:
            deadline = time.monotonic() + 180
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                        break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, \
                        (tmp_path / "serve.log").read_text()[-3000:]
                    time.sleep(1)
            status, answer = _post(f"http://127.0.0.1:{port}", {"dataframe_split": {
                "columns": ["dicom"], "data": [[base64.b64encode(dicoms["bright"].read_bytes()).decode()]]}})
        finally:
            _stop(server)
        assert status == 200
        [row] = answer["predictions"]
        expected = model.predict(pd.DataFrame({"dicom": [dicoms["bright"].read_bytes()]}))
        assert row["error"] == "" and row["probability"] == pytest.approx(expected["probability"].iloc[0], abs=1e-6)
        assert "verified" in (tmp_path / "serve.log").read_text()


class TestPathRule:
    """The same rule in this process: the model loaded by MLflow, and the classifier without it."""

    def test_mlflow_loaded_model_refuses_paths_without_a_root(self, model, dicoms, monkeypatch):
        monkeypatch.delenv(serving.SERVING_ROOT_ENV)
        result = model.predict(pd.DataFrame({"path": ["/etc/passwd", str(dicoms["bright"])]}))
        assert [error.split(":")[0] for error in result["error"]] == ["path_refused", "path_refused"]
        assert result["probability"].isna().all()  # NaN outside the scoring server: float columns kept
        assert result["probability"].dtype == np.float64

    def test_a_root_that_is_not_a_folder_refuses_with_its_name(self, model, dicoms, monkeypatch):
        monkeypatch.setenv(serving.SERVING_ROOT_ENV, str(dicoms["bright"]))
        [error] = model.predict(pd.DataFrame({"path": [str(dicoms["bright"])]}))["error"]
        assert error == ("path_refused: not read: DICOMFLOW_SERVING_ROOT is not a folder on the machine that runs "
                         "the model; set it to the folder the files are in")

    def test_load_without_mlflow_reads_any_path_for_the_projects_own_code(self, binary_keras, dicoms, monkeypatch):
        """evaluate scores the candidate so (dicomflow/evaluation/promotion.py)."""
        monkeypatch.delenv(serving.SERVING_ROOT_ENV)
        local = serving.DicomClassifier(settings=SETTINGS, threshold=THRESHOLD, classes=[0, 1], domain=DOMAIN)
        local.load(binary_keras)
        assert list(local.predict(None, pd.DataFrame({"path": [str(dicoms["bright"])]}))["error"]) == [""]
        assert local.predict(None, pd.DataFrame({"path": ["/etc/passwd"]}))["error"].iloc[0].startswith("not_dicom")
        # The right is this process's: a pickled copy (what MLflow logs) is back to the served rule.
        import cloudpickle

        copy = cloudpickle.loads(cloudpickle.dumps(local))
        copy.load_context(mlflow.pyfunc.PythonModelContext({serving.KERAS_ARTIFACT: str(binary_keras)}, None))
        assert copy.predict(None, pd.DataFrame({"path": [str(dicoms["bright"])]}))["error"].iloc[0] \
            .startswith("path_refused: ")

    def test_dicom_content_decodes_only_strict_base64(self, dicoms):
        content = dicoms["bright"].read_bytes()
        text = base64.b64encode(content)
        assert serving.dicom_content(content) == content
        assert serving.dicom_content(text) == content and serving.dicom_content(text.decode()) == content
        assert serving.dicom_content(base64.encodebytes(content)) == content  # line breaks allowed
        assert serving.dicom_content(text + b"!") == text + b"!"  # not base64: kept, read as not_dicom
        assert serving.dicom_content(np.bytes_(text)) == content  # what MLflow's `inputs` form passes


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_predict_cli_takes_files_and_folders(registered, store, dicoms, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["registered_model_name"] = MODEL_NAME
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(dicoms["folder"] / "other", tmp_path / "other")
    shutil.copy(dicoms["bright"], tmp_path / "bright.dcm")
    shutil.copy(dicoms["dark"], tmp_path / "dark.dcm")
    result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", "bright.dcm", "other",
                             str(tmp_path / "dark.dcm"), "--output", "out.csv"],
                            cwd=tmp_path, env=_run_env(store), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table["path"]) == ["bright.dcm", "other/mr.dcm", "other/mr_truncated.dcm", "other/rgb.dcm",
                                   "other/us.dcm", str(tmp_path / "dark.dcm")]
    assert [error.split(":")[0] for error in table["error"]] == ["", *["out_of_domain"] * 4, ""]
    assert list(table["label"]) == [1, -1, -1, -1, -1, 0]

    missing = subprocess.run([sys.executable, "-m", "dicomflow", "predict", "bright.dcm", "nope.dcm"],
                             cwd=tmp_path, env=_run_env(store), capture_output=True, text=True, timeout=180)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == ("error: input nope.dcm not found: give DICOM files or "
                                                       "folders of them")


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_make_predict_line_on_one_file(registered, store, dicoms, tmp_path):
    """The Makefile's predict recipe, run as make would run it with INPUT=<a file> (without make's
    install step, which would touch the virtual environment)."""
    makefile = (REPO / "Makefile").read_text()
    recipe = makefile.split("\npredict:", 1)[1].split("\n\t", 1)[1].split("\n", 1)[0]
    assert recipe == "$(BIN)/dicomflow predict $(INPUT) --output predictions.csv"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"]["registered_model_name"] = MODEL_NAME
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(dicoms["bright"], tmp_path / "IM0001.dcm")
    command = recipe.replace("$(BIN)", str(Path(sys.executable).parent)).replace("$(INPUT)", "IM0001.dcm")
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=_run_env(store), capture_output=True,
                            text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    table = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert list(table["path"]) == ["IM0001.dcm"] and list(table["error"]) == [""] and list(table["label"]) == [1]


def test_request_cli_refuses_what_is_not_a_file(tmp_path):
    from dicomflow.errors import DataError
    from dicomflow.serving.predict import request_body

    with pytest.raises(DataError, match=r"nope.dcm not found: give the DICOM files to send"):
        request_body([tmp_path / "nope.dcm"])
    with pytest.raises(DataError, match=r"is a folder: give the DICOM files to send"):
        request_body([tmp_path])


def _stop(server: subprocess.Popen) -> None:
    """End the server's process group (mlflow starts uvicorn as a child)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, None)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:  # the group is gone already
            break
        try:
            server.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_evaluate_scores_the_champion_through_predict_with_its_paths(registered, dicoms, monkeypatch):
    """promotion.score_registered: the champion, loaded by MLflow in a `dicomflow predict` process,
    reads the files evaluate names there; no root is inherited, predict sets its own."""
    from dicomflow.evaluation.promotion import score_registered

    monkeypatch.delenv(serving.SERVING_ROOT_ENV)
    scored = score_registered(registered["uri"], [dicoms["bright"], dicoms["dark"], dicoms["text"]])
    assert list(scored["path"]) == ["README", "bright.dcm", "dark.dcm"]
    assert scored["error"].isna().tolist() == [False, True, True]  # na_values=[""]: answered rows
    assert list(scored["label"]) == [-1, 1, 0]
