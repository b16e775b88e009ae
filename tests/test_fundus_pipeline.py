"""End to end on the second embedded sample: synthetic fundus photographs (JPEG files with planted
fake EXIF, XMP and comments, and a table) through ``dicomflow import-photos --kind fundus`` and
every stage of ``dvc repro`` as an ordinal task (diabetic-retinopathy grades 0-4, referable from
grade 2), in a repository of its own.

Real git, DVC, MLflow (SQLite), TensorFlow and Great Expectations; the photos are the project's
own generator's (:mod:`dicomflow.devtools.fundus_sample`), the fake identifiers it plants are its
``FAKE_IDENTIFIERS``, searched here byte by byte in everything downstream of the import.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from dicomflow.devtools.fundus_sample import FAKE_IDENTIFIERS, FAKE_STRINGS, GRADES
from dicomflow.serving.pyfunc import serving_root
from pipeline_repo import clean_env, copy_pipeline, run

pytestmark = pytest.mark.slow

REFERABLE = 2
MODEL_NAME = "fundus-grader"


@pytest.fixture(scope="module")
def fundus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("fundus")
    params = copy_pipeline(root)
    params["ingest"].update(channels=3, classes=list(GRADES), image_size=32, label_key="sop_instance_uid",
                            color_management="srgb")
    params["validate"].update(modalities=["OP"], min_class_fraction=0.05)
    params["augment"]["flip"] = True  # left and right eyes are mirror images
    params["train"].update(task="ordinal", epochs=12, batch_size=16)
    params["evaluate"].update(referable_grade=REFERABLE, promotion_metric="qwk", min_validation_auc=0.5,
                              registered_model_name=MODEL_NAME)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n__pycache__/\n/source/\n")
    env = clean_env("fundus pipeline test: not the embedded sample")
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    run([sys.executable, "-m", "dicomflow", "sample-data", "source", "--kind", "fundus", "--patients", "60"], root, env)
    run([sys.executable, "-m", "dicomflow", "import-photos", "source", "--table", "source/photos.csv",
         "--kind", "fundus", "--out", "data"], root, env)
    run(["dvc", "add", "-q", "data"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "fundus sample, imported"], root, env)
    (root.parent / f"{root.name}-repro.log").write_text(run(["dvc", "repro"], root, env))
    return root, env


def test_every_photo_became_an_ophthalmic_photograph_and_reached_a_split(fundus):
    root, _ = fundus
    table = pd.read_csv(root / "source" / "photos.csv", dtype=str)
    objects = sorted((root / "data" / "photos").glob("*.dcm"))
    assert len(objects) == len(table)
    ds = pydicom.dcmread(objects[0])
    assert (ds.Modality, ds.SamplesPerPixel) == ("OP", 3)
    counts = pd.read_csv(root / "reports" / "split_counts.csv")
    assert counts["images"].sum() == len(table)
    assert set(counts["label"]) == set(GRADES)


def test_the_network_sees_colour(fundus):
    root, _ = fundus
    images = np.load(root / "outputs" / "deidentify" / "images.npy", mmap_mode="r")
    assert images.shape[1:] == (32, 32, 3)
    sample = np.asarray(images[:20], dtype=np.float32)
    # A fundus is orange-red: red above blue on average, in every photo (grey would have them equal).
    assert (sample[..., 0].mean(axis=(1, 2)) > sample[..., 2].mean(axis=(1, 2)) + 0.05).all()


def test_the_report_holds_the_fields_metrics_for_an_ordinal_task(fundus):
    root, _ = fundus
    report = json.loads((root / "reports" / "test_metrics.json").read_text())
    for name in ("roc_auc", "accuracy", "balanced_accuracy", "qwk", "mae_grade", "referable_auc",
                 "referable_sensitivity", "referable_specificity"):
        assert name in report, name
    assert -1 <= report["qwk"] <= 1 and 0 <= report["mae_grade"] <= len(GRADES) - 1
    # Its patient-bootstrap interval, or why there is none (a grade held by one or two test patients
    # is missing from too many resamples of a sample this small).
    if report["qwk_ci_low"] is None:
        assert report["qwk_ci_note"].startswith("not estimable: ") and report["qwk_ci_high"] is None
    else:
        assert report["qwk_ci_low"] <= report["qwk"] <= report["qwk_ci_high"]
    for grade in GRADES:
        assert f"sensitivity_{grade}" in report and f"n_test_{grade}" in report
    headline = json.loads((root / "reports" / "metrics.json").read_text())
    assert "qwk" in headline


def test_the_registered_grader_answers_grades_and_the_referable_probability(fundus):
    root, _ = fundus
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        model = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
        files = sorted(str(path) for path in (root / "data" / "photos").glob("*.dcm"))[:5]
        with serving_root(root / "data"):
            predicted = model.predict(pd.DataFrame({"path": files}))
    finally:
        mlflow.set_tracking_uri(None)
    probabilities = predicted[[f"probability_{grade}" for grade in GRADES]].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # The called grade is the median of the grade distribution; the referable probability is the
    # mass at grade 2 or above: both computed here from the probabilities returned.
    median = (np.cumsum(probabilities, axis=1) < 0.5).sum(axis=1)
    np.testing.assert_array_equal(predicted["label"].to_numpy(), np.array(GRADES)[median])
    np.testing.assert_allclose(predicted["referable_probability"], probabilities[:, REFERABLE:].sum(axis=1), atol=1e-6)
    assert (predicted["error"] == "").all()


def test_nothing_the_camera_wrote_reaches_any_output(fundus):
    root, env = fundus
    # The import leaves EXIF, XMP and comments out: not in the objects it wrote, and so nowhere after.
    # The strings, each name part alone, and the EXIF and XMP blocks themselves (GPS is in EXIF).
    values = [value.encode() for value in FAKE_STRINGS]
    values += [part.encode() for part in FAKE_IDENTIFIERS["patient_name"].split("^")]
    values += [b"Exif\x00\x00", b"http://ns.adobe.com/xap/1.0/"]
    assert all((root / "source" / "photos").glob("*.jpg"))
    downstream = [root / "mlflow.db", *(root / "mlartifacts").rglob("*"), *(root / "reports").rglob("*"),
                  *(root / "outputs").rglob("*"), *(root / "data").rglob("*")]
    for path in (p for p in downstream if p.is_file()):
        content = path.read_bytes()
        found = [value for value in values if value in content]
        assert not found, f"{len(found)} planted camera value(s) in {path.relative_to(root)}"
    output = run([sys.executable, "-m", "dicomflow", "scan-leaks", "outputs/deidentify", "outputs/split",
                  "outputs/model", "reports"], root, env)
    assert output.strip().splitlines()[-1].startswith("0 hit(s) for ")
