"""Predictions as DICOM objects (dicomflow/pacs/results.py, ``dicomflow predict --dicom-out``):
a Comprehensive 3D SR and a FRACTIONAL Segmentation per image, checked with dciodvfy and read back
with highdicom, from a real Keras conv network registered, signed and loaded as predict loads it.

The network's score rises with a bright square (a 3x3 mean filter, ReLU past mid-grey, pooled):
so its Grad-CAM map peaks on the square, and the SEG's peak, in the source's own pixel grid,
must lie on the square for a non-square source (the inverse of the model input's geometry)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes

import keras
import mlflow

from dicomflow.dicom.display import PixelSettings, pad_or_crop, resample_to_spacing, resize_with_padding
from dicomflow.pacs import results
from dicomflow.serving import pyfunc as serving
from dicomflow.serving.domain import TrainingDomain
from dicomflow.serving.predict import predict_files
from signed_store import register_champion, signed_tracking_store

REPO = Path(__file__).resolve().parents[1]
SETTINGS = PixelSettings(size=32)
MODEL_NAME = "dicom-results-test-classifier"
THRESHOLD = 0.3
WINDOW = {"WindowCenter": 128, "WindowWidth": 256}
# Patient and study attributes an export keeps (type 2: present, even empty).
PATIENT_STUDY = {"PatientName": "Test^Patient", "PatientBirthDate": "19700101", "PatientSex": "O",
                 "StudyDate": "20260101", "StudyTime": "120000", "StudyID": "S1", "AccessionNumber": "A1",
                 "ReferringPhysicianName": ""}
# The non-square source's bright square: rows 1-12, columns 70-89 of 60 x 100. Near the top, so
# that a map stretched over the padded input (the padding ignored) would peak below it (row 15).
SQUARE = (slice(1, 13), slice(70, 90))
DOMAIN = TrainingDomain(modalities={"CR", "CT", "DX"}, photometrics={"MONOCHROME1", "MONOCHROME2"}, channels={1},
                        rows=(40, 2000), columns=(40, 2000))


def _square_image(shape=(60, 100), square=SQUARE, *, seed: int) -> np.ndarray:
    """A dark noisy uint8 image with a bright square (or none, ``square`` None)."""
    rng = np.random.default_rng(seed)
    image = np.clip(rng.normal(30, 6, shape), 0, 255).astype(np.uint8)
    if square is not None:
        image[square] = np.clip(rng.normal(220, 6, image[square].shape), 0, 255).astype(np.uint8)
    return image


def _square_network() -> keras.Model:
    """Conv2D 3x3 mean, ReLU past 0.5 (only bright pixels pass), pooled, dense sigmoid: a square
    of a few percent of the input scores about 0.9, a dark image about 0.05."""
    inputs = keras.Input(shape=(SETTINGS.size, SETTINGS.size, 1), name="image")
    features = keras.layers.Conv2D(1, 3, padding="same", activation="relu", name="features")(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    outputs = keras.layers.Dense(1, activation="sigmoid")(pooled)
    model = keras.Model(inputs, outputs)
    model.get_layer("features").set_weights([np.full((3, 3, 1, 1), 1 / 9, np.float32), np.array([-0.5], np.float32)])
    model.layers[-1].set_weights([np.array([[1500.0]], np.float32), np.array([-3.0], np.float32)])
    return model


@pytest.fixture(autouse=True)
def paths_readable_under_the_test_folders(tmp_path_factory, monkeypatch):
    """A model loaded by MLflow reads paths only under DICOMFLOW_SERVING_ROOT (as in test_serving)."""
    monkeypatch.setenv(serving.SERVING_ROOT_ENV, str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary tracking store and signing key pair in the environment (tests/signed_store.py)."""
    with signed_tracking_store(tmp_path_factory, "dicom-results") as made:
        yield made


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory):
    """The square network logged with log_classifier and DOMAIN, registered, signed, alias champion."""
    path = tmp_path_factory.mktemp("keras") / "square.keras"
    _square_network().save(path)
    version, _ = register_champion(store, path, MODEL_NAME, threshold=THRESHOLD, classes=[0, 1], settings=SETTINGS,
                                   domain=DOMAIN, input_example=serving.serving_example(DOMAIN))
    return {"uri": f"models:/{MODEL_NAME}@champion", "version": version}


@pytest.fixture(scope="module")
def model(registered, tmp_path_factory):
    """The champion loaded from a verified copy (as dicomflow predict loads it)."""
    from dicomflow.signing import download_verified, verify_key_from_env

    local = download_verified(registered["uri"], tmp_path_factory.mktemp("verified"),
                              key=verify_key_from_env(os.environ))
    return mlflow.pyfunc.load_model(str(local))


@pytest.fixture(scope="module")
def sources(tmp_path_factory, make_dicom):
    """The inputs: a non-square image with a bright square (a frame of reference and pixel spacing,
    no plane), a dark one (neither), pydicom's CT and CR (with
    Patient Orientation, MONOCHROME1, 1955 x 1841), an MR (out of the domain), a text file, an
    image without its patient and study attributes, a two-frame image."""
    folder = tmp_path_factory.mktemp("sources")
    files = {
        # As the sample data's radiographs: a frame of reference, spacing and orientation, no plane.
        "lesion": make_dicom(folder / "lesion.dcm", _square_image(seed=1), **WINDOW, **PATIENT_STUDY,
                             FrameOfReferenceUID=pydicom.uid.generate_uid(), PixelSpacing=[0.5, 0.5],
                             PatientOrientation=["L", "F"]),
        "clear": make_dicom(folder / "clear.dcm", _square_image((64, 64), None, seed=2), **WINDOW, **PATIENT_STUDY),
        "ct": Path(shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")),
        "cr": Path(shutil.copy(get_testdata_file("RG1_UNCR.dcm"), folder / "cr.dcm")),
        "mr": Path(shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")),
        "bare": make_dicom(folder / "bare.dcm", _square_image((64, 64), (slice(20, 40),) * 2, seed=3), **WINDOW),
        "frames": make_dicom(folder / "frames.dcm", np.stack([_square_image((64, 64), None, seed=4)] * 2),
                             **WINDOW, **PATIENT_STUDY),
    }
    files["text"] = folder / "notes.txt"
    files["text"].write_text("not an image\n")
    return files


ORDER = ("lesion", "clear", "ct", "cr", "mr", "text", "bare", "frames")


@pytest.fixture(scope="module")
def written(model, registered, sources, tmp_path_factory):
    """dicom_results on every source, predictions from predict_files written as predict writes its CSV."""
    files = [sources[name] for name in ORDER]
    predictions = predict_files(model, files, names=list(ORDER))
    csv = tmp_path_factory.mktemp("csv") / "predictions.csv"
    predictions.to_csv(csv, index=False)
    out = tmp_path_factory.mktemp("dicom-out")
    found = results.dicom_results(model, files, predictions, out, model_name=MODEL_NAME,
                                  model_version=registered["version"])
    return {"results": dict(zip(ORDER, found)), "csv": pd.read_csv(csv, keep_default_na=False).set_index("path"),
            "out": out}


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


WRITTEN = ("lesion", "clear", "ct", "cr")


@pytest.mark.slow  # Grad-CAM and a 1955 x 1841 SEG
class TestWrittenObjects:
    def test_each_accepted_image_gets_an_sr_and_a_seg_named_by_their_uids(self, written):
        for name in WRITTEN:
            sr_path, seg_path = written["results"][name].paths
            assert written["results"][name].reason == ""
            assert sr_path.name == f"{pydicom.dcmread(sr_path).SOPInstanceUID}.dcm"
            assert seg_path.name == f"{pydicom.dcmread(seg_path).SOPInstanceUID}.dcm"
        assert len(list(written["out"].iterdir())) == 2 * len(WRITTEN)  # nothing for the others

    def test_objects_pass_dciodvfy(self, written):
        for name in WRITTEN:
            for path in written["results"][name].paths:
                assert _dciodvfy_errors(path) == [], (name, path.name)

    def test_the_sr_states_the_csv_probability_threshold_and_finding(self, written, sources, registered):
        for name in WRITTEN:
            row = written["csv"].loc[name]
            report = hd.sr.srread(written["results"][name].paths[0])
            group, = report.content.get_image_measurement_groups()
            probability, = group.get_measurements(name=codes.DCM.Probability)
            assert probability.value == pytest.approx(float(row["probability"]), abs=1e-6)
            assert probability.unit == codes.UCUM.NoUnits
            threshold, = group.get_measurements(name=codes.DCM.ThresholdValue)
            assert threshold.value == pytest.approx(THRESHOLD)
            evaluation, = group.get_qualitative_evaluations(name=results.class_code(1))
            assert evaluation.value == (codes.SCT.Present if row["label"] == 1 else codes.SCT.Absent)
            source_image, = group.source_images
            assert source_image.referenced_sop_instance_uid == pydicom.dcmread(sources[name]).SOPInstanceUID
            algorithm = {code: find_content_items(group[0], name=code, recursive=True)[0].TextValue
                         for code in (codes.DCM.AlgorithmName, codes.DCM.AlgorithmVersion)}
            assert algorithm == {codes.DCM.AlgorithmName: MODEL_NAME, codes.DCM.AlgorithmVersion: registered["version"]}
            assert report.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == results.PRIVATE_SCHEME
        assert written["csv"].loc["lesion", "label"] == 1 and written["csv"].loc["clear", "label"] == 0

    def test_the_observer_is_dicomflow_with_the_model_name(self, written):
        report = hd.sr.srread(written["results"]["lesion"].paths[0])
        device = report.content[0].ContentSequence  # the observation context items at the top
        texts = {item.ConceptNameCodeSequence[0].CodeMeaning: getattr(item, "TextValue", None) for item in device}
        assert texts["Device Observer Name"] == "dicomflow"
        assert texts["Device Observer Model Name"] == MODEL_NAME
        assert report.SoftwareVersions.startswith("dicomflow ")

    def test_objects_belong_to_the_source_patient_and_study_in_new_series(self, written, sources):
        for name in WRITTEN:
            source = pydicom.dcmread(sources[name], stop_before_pixels=True)
            for path in written["results"][name].paths:
                made = pydicom.dcmread(path, stop_before_pixels=True)
                assert (made.PatientID, made.PatientName, made.StudyInstanceUID) == \
                    (source.PatientID, source.PatientName, source.StudyInstanceUID)
                assert made.SeriesInstanceUID != source.SeriesInstanceUID
                assert made.SOPInstanceUID != source.SOPInstanceUID
        sr_series = {pydicom.dcmread(written["results"][n].paths[0]).SeriesInstanceUID for n in WRITTEN}
        assert len(sr_series) == len(WRITTEN)

    def test_the_seg_is_on_the_source_grid_and_peaks_on_the_square(self, written, sources):
        for name in WRITTEN:
            source = pydicom.dcmread(sources[name], stop_before_pixels=True)
            seg = hd.seg.segread(written["results"][name].paths[1])
            assert (seg.Rows, seg.Columns) == (source.Rows, source.Columns)
            assert seg.SegmentationType == "FRACTIONAL" and seg.SegmentationFractionalType == "PROBABILITY"
            segment = seg.SegmentSequence[0]
            assert segment.SegmentAlgorithmType == "AUTOMATIC"
            assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "130403"
        seg = hd.seg.segread(written["results"]["lesion"].paths[1])
        probability = seg.pixel_array.reshape(60, 100)  # stored 0-255
        peak = np.unravel_index(np.argmax(probability), probability.shape)
        assert SQUARE[0].start <= peak[0] < SQUARE[0].stop and SQUARE[1].start <= peak[1] < SQUARE[1].stop
        outside = np.ones((60, 100), bool)
        outside[:SQUARE[0].stop + 3, SQUARE[1].start - 3:SQUARE[1].stop + 3] = False
        assert probability[outside].max() < 0.1 * probability.max()  # dark background: no evidence

    def test_projection_segs_keep_their_patient_orientation(self, written, sources):
        for name in ("cr", "lesion"):
            seg = pydicom.dcmread(written["results"][name].paths[1], stop_before_pixels=True)
            assert list(seg.PatientOrientation) == list(pydicom.dcmread(sources[name]).PatientOrientation)
            assert "FrameOfReferenceUID" not in seg

    def test_refused_and_odd_inputs_get_no_object_and_a_reason(self, written):
        reasons = {name: written["results"][name].reason for name in ("mr", "text", "bare", "frames")}
        assert written["csv"].loc["mr", "error"].startswith("out_of_domain")
        assert written["csv"].loc["text", "error"].startswith("not_dicom")
        assert reasons["mr"].startswith("not_predicted:") and reasons["text"].startswith("not_predicted:")
        assert reasons["bare"].startswith("missing_patient_study:")
        assert "PatientName" in reasons["bare"] and "StudyDate" in reasons["bare"]
        assert reasons["frames"].startswith("multi_frame:")
        assert all(not written["results"][name].paths for name in reasons)

    def test_the_summary_counts_without_names(self, written):
        line = results.describe_results([written["results"][name] for name in ORDER])
        assert line == ("wrote 4 SR and 4 SEG for 8 files; 4 files without (2 not_predicted, "
                        "1 missing_patient_study, 1 multi_frame)")


def test_write_dicom_results_returns_paths_per_file(model, registered, sources, tmp_path):
    files = [sources["mr"], sources["clear"]]
    predictions = predict_files(model, files, names=["mr", "clear"])
    paths = results.write_dicom_results(model, files, predictions, tmp_path / "out", model_name=MODEL_NAME,
                                        model_version=registered["version"])
    assert paths[0] == [] and [path.parent for path in paths[1]] == [tmp_path / "out"] * 2
    with pytest.raises(ValueError, match="predictions has 2 rows for 1 files"):
        results.write_dicom_results(model, files[:1], predictions, tmp_path, model_name="m", model_version="1")


class TestSourceGridMap:
    """The inverse of image_frames' fitting, checked against the forward functions themselves."""

    def test_non_square_source_map_comes_back_onto_its_square(self):
        display = np.zeros((60, 100), np.float32)
        display[5:35, 60:95] = 1.0
        fitted = resize_with_padding(display, SETTINGS.size)  # what the model sees
        ds = pydicom.Dataset()
        ds.Rows, ds.Columns = 60, 100
        back = results.source_grid_map(fitted, ds, SETTINGS)
        assert back.shape == (60, 100)
        assert back[9:31, 64:91].min() > 0.9  # the square's inside, its edges blurred by two resizes
        assert back[40:].max() == 0 and back[:, :55].max() == 0  # far from the square: nothing

    def test_the_padding_of_the_input_never_reaches_the_source(self):
        ds = pydicom.Dataset()
        ds.Rows, ds.Columns = 40, 120  # 11 of 32 rows are the image, the rest padding
        heatmap = np.ones((32, 32), np.float32)
        where = results.placement(40, 120, SETTINGS)
        assert (where.scaled, where.input_top, where.height) == ((11, 32), 10, 11)
        heatmap[:where.input_top] = 0.0
        heatmap[where.input_top + where.height:] = 0.0
        np.testing.assert_allclose(results.source_grid_map(heatmap, ds, SETTINGS), 1.0)

    def test_target_spacing_crops_and_the_cropped_part_gets_zero(self):
        settings = PixelSettings(size=32, target_spacing_mm=1.0)
        ds = pydicom.Dataset()
        ds.Rows, ds.Columns = 50, 80
        ds.PixelSpacing = [0.5, 0.5]  # 25 x 40 mm: 40 columns at 1 mm, 8 cropped away
        display = np.zeros((50, 80), np.float32)
        display[20:30, 30:50] = 1.0
        fitted = pad_or_crop(resample_to_spacing(display, (0.5, 0.5), 1.0), 32)
        back = results.source_grid_map(np.ones((32, 32), np.float32) * (fitted > 0), ds, settings)
        assert back.shape == (50, 80)
        assert back[22:28, 32:48].min() > 0.9 and back[:15].max() == 0
        cropped = results.source_grid_map(np.ones((32, 32), np.float32), ds, settings)
        assert cropped[:, :6].max() == 0 and cropped[:, -6:].max() == 0  # the model never saw these
        assert cropped[:, 10:70].min() > 0.99

    def test_a_map_of_another_size_is_refused(self):
        ds = pydicom.Dataset()
        ds.Rows, ds.Columns = 50, 80
        with pytest.raises(ValueError, match=r"heatmap must be \(32, 32\)"):
            results.source_grid_map(np.zeros((16, 16)), ds, SETTINGS)


def test_a_multiclass_sr_names_the_called_class_and_every_probability(tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    finding = results.finding_of({"probability_0": 0.1, "probability_1": 0.7, "probability_2": 0.2, "label": 1,
                                  "error": ""}, {"classes": [0, 1, 2], "task": "multiclass", "threshold": None})
    report = results.structured_report(source, finding, model_name="m", model_version="2")
    path = tmp_path / "sr.dcm"
    report.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    group, = hd.sr.srread(path).content.get_image_measurement_groups()
    evaluation, = group.get_qualitative_evaluations(name=codes.SCT.Classification)
    assert evaluation.value == results.class_code(1)
    assert group.get_measurements(name=codes.DCM.ThresholdValue) == []
    assert group.get_measurements(name=codes.DCM.Probability)[0].value == pytest.approx(0.7)
    for label, expected in ((0, 0.1), (1, 0.7), (2, 0.2)):
        measured, = group.get_measurements(name=results.class_probability_code(label))
        assert measured.value == pytest.approx(expected)


@pytest.mark.slow  # a dicomflow predict process (loads TensorFlow and the model)
def test_predict_cli_writes_dicom_objects_beside_the_csv(registered, store, sources, tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())  # the project's, naming the test model
    params["evaluate"]["registered_model_name"] = MODEL_NAME
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    inputs = [str(sources[name]) for name in ("lesion", "clear", "mr", "bare")]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**{k: v for k, v in os.environ.items() if k != serving.SERVING_ROOT_ENV}, "PATH": path,
           "MLFLOW_TRACKING_URI": store["uri"], "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONPATH": str(REPO),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    run = subprocess.run([sys.executable, "-m", "dicomflow", "predict", *inputs, "--output", "out.csv",
                          "--dicom-out", "objects"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out.csv", keep_default_na=False)
    assert list(table.columns) == ["path", "probability", "label", "error", "dicom_results"]
    by_name = {Path(p).stem: row for p, row in zip(table["path"], table.to_dict("records"))}
    for name in ("lesion", "clear"):
        sr_name, seg_name = by_name[name]["dicom_results"].split(" ")
        report = hd.sr.srread(tmp_path / "objects" / sr_name)
        group, = report.content.get_image_measurement_groups()
        measured, = group.get_measurements(name=codes.DCM.Probability)
        assert measured.value == pytest.approx(float(by_name[name]["probability"]), abs=1e-6)
        assert hd.seg.segread(tmp_path / "objects" / seg_name).Rows == pydicom.dcmread(sources[name]).Rows
    assert by_name["mr"]["dicom_results"].startswith("not_predicted:")
    assert by_name["bare"]["dicom_results"].startswith("missing_patient_study:")
    assert len(list((tmp_path / "objects").iterdir())) == 4
    assert ("wrote 2 SR and 2 SEG for 4 files; 2 files without (1 not_predicted, 1 missing_patient_study)"
            in run.stderr)
    for source in sources.values():  # counts only: no source's name or UID in the log
        assert source.name not in run.stderr
    assert pydicom.dcmread(sources["lesion"]).SOPInstanceUID not in run.stderr
