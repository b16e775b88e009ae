"""bench.medmnist's DICOM wrapping, on a handful of synthetic 28x28 images (fast, no TF).

The benchmark's numbers are only comparable with the MedMNIST paper if the pipeline sees the
published pixels, labels and split: checked here through ingest's own reader and label join.
Its main path (``dvc repro`` on a few real BreastMNIST images) runs in tests/test_bench.py.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from bench import medmnist
from dicomflow.config.params import DeidentifyParams, build_section
from dicomflow.deid.burned_in import burned_in_risk
from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.dicom.labels import read_labels

NPZ = Path(__file__).resolve().parents[2] / "shared" / "medmnist" / "breastmnist.npz"


@pytest.fixture(scope="module")
def bench():
    return medmnist


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    images = {s: rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
              for s, n in (("train", 3), ("val", 2), ("test", 2))}
    labels = {s: (np.arange(len(images[s])) % 2).reshape(-1, 1) for s in images}
    return images, labels


@pytest.fixture(scope="module")
def written(bench, arrays, tmp_path_factory):
    out = tmp_path_factory.mktemp("bm")
    return out, bench.write_breastmnist(*arrays, out)


def test_pixels_reach_ingest_unchanged(written, arrays):
    out, rows = written
    images, _ = arrays
    expected = {hashlib.sha256(im.tobytes()).hexdigest(): im for s in images for im in images[s]}
    for row in rows:
        _, frames = read_image(out / row["path"], PixelSettings(size=28))
        stored = pydicom.dcmread(out / row["path"]).pixel_array
        np.testing.assert_array_equal(frames[0].pixels, stored)
        assert hashlib.sha256(stored.tobytes()).hexdigest() in expected


def test_labels_and_official_split_join_on_accession(written, arrays):
    out, rows = written
    images, labels = arrays
    table = pd.read_csv(out / "labels.csv", dtype=str)
    assert list(table.columns) == ["accession_number", "study_instance_uid", "sop_instance_uid",
                                   "path", "label", "split"]
    assert table["split"].value_counts().to_dict() == {s: len(images[s]) for s in images}
    by_label, _ = read_labels(out / "labels.csv", key="accession_number")
    by_split, _ = read_labels(out / "labels.csv", key="accession_number", column="split")
    for row in rows:
        ds = pydicom.dcmread(out / row["path"])
        split = by_split[ds.AccessionNumber]
        position = next(i for i, im in enumerate(images[split])
                        if np.array_equal(im, ds.pixel_array))
        assert by_label[ds.AccessionNumber] == str(int(labels[split][position, 0]))


def test_one_fake_patient_per_image_with_phi(written):
    out, rows = written
    datasets = [pydicom.dcmread(out / row["path"]) for row in rows]
    assert len({ds.PatientID for ds in datasets}) == len(datasets)
    for ds in datasets:
        assert ds.Modality == "US" and "^" in str(ds.PatientName) and len(ds.PatientBirthDate) == 8
        assert ds.InstitutionName and ds.AccessionNumber and ds.BurnedInAnnotation == "NO"


def test_bytes_are_deterministic(bench, arrays, written, tmp_path):
    out, rows = written
    bench.write_breastmnist(*arrays, tmp_path)
    for row in rows:
        assert (tmp_path / row["path"]).read_bytes() == (out / row["path"]).read_bytes()
    assert (tmp_path / "labels.csv").read_bytes() == (out / "labels.csv").read_bytes()


def test_overrides_keep_us_images_that_the_defaults_exclude(bench, written, repo_params_file):
    out, rows = written
    ds = pydicom.dcmread(out / rows[0]["path"])
    project = yaml.safe_load(repo_params_file.read_text())
    merged, skipped = bench.apply_overrides(project, bench.OVERRIDES, {})
    assert not [key for key in skipped if key.startswith("deidentify.")]
    default = build_section(DeidentifyParams, "deidentify", project["deidentify"])
    assert burned_in_risk(ds, default) == "modality US"
    assert burned_in_risk(ds, build_section(DeidentifyParams, "deidentify", merged["deidentify"])) == ""


def test_set_parses_dotted_yaml_values(bench):
    sets = bench.parse_sets(["train.lr=3e-4", "validate.modalities=[US, CR]", "train.epochs=5"])
    merged, _ = bench.apply_overrides({"train": {"lr": 0.1}}, {}, sets)
    assert merged["train"] == {"lr": 3e-4, "epochs": 5}
    assert merged["validate"]["modalities"] == ["US", "CR"]
    with pytest.raises(SystemExit, match="SECTION.KEY=VALUE"):
        bench.parse_sets(["epochs=5"])


@pytest.mark.skipif(not NPZ.is_file(), reason="../shared/medmnist/breastmnist.npz not beside the repository")
def test_per_split_keeps_the_first_images_of_each_label(bench):
    images, labels = bench.read_npz(NPZ, per_split=6)
    with np.load(NPZ) as data:
        for split in ("train", "val", "test"):
            every = data[f"{split}_labels"].reshape(-1)
            expected = sorted([*np.flatnonzero(every == 0)[:3], *np.flatnonzero(every == 1)[:3]])
            np.testing.assert_array_equal(images[split], data[f"{split}_images"][expected])
            np.testing.assert_array_equal(labels[split], every[expected])


@pytest.mark.parametrize(("interval", "printed"), [
    ({"roc_auc_ci_low": 0.8541, "roc_auc_ci_high": 0.9602, "roc_auc_ci_note": ""}, "(95 % CI of AUC 0.854-0.960)"),
    ({"roc_auc_ci_low": None, "roc_auc_ci_high": None,
      "roc_auc_ci_note": "not estimable: 1.000 in every one of 1000 resamples of 156 patients"},
     "(95 % CI of AUC not estimable: 1.000 in every one of 1000 resamples of 156 patients)"),
])
def test_the_results_table_prints_the_interval_or_why_there_is_none(capsys, interval, printed):
    import argparse

    from bench.common import Report

    metrics = {"roc_auc": 0.915, "accuracy": 0.878, "n_test": 156, "n_test_positive": 114, **interval}
    train = medmnist.TrainRun(seconds=1.0, val_auc=0.9, val_loss=0.3, kept_epochs=[5], epochs=10)
    medmnist.print_report(Report("medmnist", argparse.Namespace()), metrics=metrics, members=[(0.915, 0.878)],
                          train=train, timings={"train": 1.0}, total=2.0, setup=1.0, params={"evaluate": {}},
                          project_params={}, skipped=[], architecture="resnet_small", image_size=28, extra=[])
    assert f"| **dicomflow `resnet_small` (28), this run** {printed} | 0.915 | 0.878 |" in capsys.readouterr().out
