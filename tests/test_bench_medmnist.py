"""bench.medmnist's DICOM wrapping, on a handful of synthetic 28x28 images (fast, no TF).

The benchmark's numbers are only comparable with the MedMNIST paper if the pipeline sees the
published pixels, labels and split: checked here through ingest's own reader and label join.
Its main path (``dvc repro`` on a few real BreastMNIST images) runs in tests/test_bench.py.
"""

from __future__ import annotations

import hashlib
import json
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


# --- the data-scarcity curve (bench.medmnist --scarcity, bench/scarcity.py) ----------------------


class TestStratifiedSubset:
    labels = np.array([0] * 40 + [1] * 60)

    @pytest.mark.parametrize(("fraction", "per_class"), [(0.1, (4, 6)), (0.25, (10, 15)), (0.5, (20, 30)),
                                                         (1.0, (40, 60))])
    def test_each_class_keeps_its_share(self, fraction, per_class):
        from bench.scarcity import stratified_subset

        chosen = stratified_subset(self.labels, fraction, seed=3)
        assert tuple(np.bincount(self.labels[chosen])) == per_class
        assert len(np.unique(chosen)) == len(chosen) and np.all(np.diff(chosen) > 0)

    def test_the_seed_chooses_the_subset(self):
        from bench.scarcity import stratified_subset

        first = stratified_subset(self.labels, 0.25, seed=42)
        np.testing.assert_array_equal(first, stratified_subset(self.labels, 0.25, seed=42))
        assert not np.array_equal(first, stratified_subset(self.labels, 0.25, seed=43))
        np.testing.assert_array_equal(stratified_subset(self.labels, 1.0, seed=7), np.arange(100))

    def test_a_rare_class_keeps_one_image(self):
        from bench.scarcity import stratified_subset

        labels = np.array([0] * 3 + [1] * 97)
        assert np.bincount(labels[stratified_subset(labels, 0.1, seed=0)]).tolist() == [1, 10]

    def test_a_fraction_outside_the_unit_interval_is_refused(self):
        from bench.scarcity import stratified_subset

        with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\]; got 0"):
            stratified_subset(self.labels, 0, seed=0)


def _tiny_medmnist(path: Path, sizes=(("train", 24), ("val", 10), ("test", 10))) -> Path:
    """A MedMNIST-format npz whose class 1 images are brighter: a few epochs can tell them apart."""
    rng = np.random.default_rng(5)
    arrays = {}
    for split, n in sizes:
        labels = (np.arange(n) % 2).astype(np.uint8)
        base = rng.integers(0, 120, size=(n, 28, 28))
        arrays[f"{split}_images"] = (base + 100 * labels[:, None, None]).astype(np.uint8)
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)
    np.savez(path, **arrays)
    return path


def _run_scarcity(monkeypatch, *argv: str) -> None:
    import sys

    monkeypatch.setattr(sys, "argv", ["bench.medmnist", "--scarcity", *argv])
    medmnist.main()


RECORD_FIELDS = {"label_fraction", "init", "seed", "test_auc", "test_acc", "val_auc", "seconds"}


@pytest.mark.slow
def test_scarcity_scratch_arm_writes_records_and_the_curve_and_resumes(tmp_path, monkeypatch, capsys):
    npz = _tiny_medmnist(tmp_path / "tiny.npz")
    out, png = tmp_path / "scarcity.json", tmp_path / "curve.png"
    args = ["--npz", str(npz), "--inits", "scratch", "--fractions", "0.5", "1", "--seeds", "2", "--epochs", "1",
            "--set", "train.batch_size=8", "--json", str(out), "--png", str(png)]
    _run_scarcity(monkeypatch, *args)
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())["figures"]["records"]
    runs = [r for r in records if r["init"] == "scratch"]
    assert sorted((r["label_fraction"], r["seed"]) for r in runs) == [(0.5, 42), (0.5, 43), (1.0, 42), (1.0, 43)]
    for record in runs:
        assert set(record) >= RECORD_FIELDS
        assert 0 <= record["test_auc"] <= 1 and 0 <= record["test_acc"] <= 1 and record["seconds"] > 0
        # 24 training images, 12 of each class: half keeps 6 of each.
        assert record["n_labelled"] == (12 if record["label_fraction"] == 0.5 else 24)
    ensemble = [r for r in records if r["init"] == "scratch_ensemble"]
    assert [(e["label_fraction"], e["seed"]) for e in ensemble] == [(1.0, [42, 43])]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| 50 % (12 labels) | scratch | 2 |" in printed
    assert "MedMNIST v2 paper: ResNet-18 (28) | - | - | 0.901 | 0.863" in printed

    # The same file and settings again: every run is recorded already, nothing is retrained.
    _run_scarcity(monkeypatch, *args)
    assert json.loads(out.read_text())["figures"]["records"] == records


@pytest.mark.slow
def test_scarcity_no_test_leaves_the_test_split_unread(tmp_path, monkeypatch):
    npz = _tiny_medmnist(tmp_path / "tiny.npz")
    out = tmp_path / "scarcity.json"
    _run_scarcity(monkeypatch, "--npz", str(npz), "--inits", "scratch", "--fractions", "1", "--seeds", "1",
                  "--epochs", "1", "--no-test", "--json", str(out), "--png", str(tmp_path / "curve.png"))
    (record,) = json.loads(out.read_text())["figures"]["records"]
    assert record["test_auc"] is None and record["test_acc"] is None and 0 <= record["val_auc"] <= 1
    assert not (tmp_path / "curve.png").exists()


@pytest.mark.slow
def test_scarcity_pretrain_arm_fine_tunes_pretrained_encoders_and_averages_them(tmp_path, monkeypatch):
    pytest.importorskip("dicomflow.model.pretraining")
    npz = _tiny_medmnist(tmp_path / "tiny.npz")
    encoders = tmp_path / "encoders"
    args = ["--npz", str(npz), "--inits", "pretrain", "--fractions", "1", "--seeds", "2", "--epochs", "2",
            "--set", "pretrain.epochs=1", "--set", "pretrain.batch_size=8", "--set", "train.batch_size=8",
            "--set", "train.freeze_epochs=1", "--encoders", str(encoders)]
    _run_scarcity(monkeypatch, *args, "--json", str(tmp_path / "first.json"))
    records = json.loads((tmp_path / "first.json").read_text())["figures"]["records"]
    runs = [r for r in records if r["init"] == "pretrain"]
    assert sorted(r["seed"] for r in runs) == [42, 43]
    assert [r["pretrain_seed"] for r in sorted(runs, key=lambda r: r["seed"])] == [11, 12]  # pretrain.seed + i
    assert all(set(r) >= RECORD_FIELDS and r["pretrain_epochs"] == 1 for r in runs)
    (ensemble,) = [r for r in records if r["init"] == "pretrain_ensemble"]
    assert ensemble["seed"] == [42, 43] and 0 <= ensemble["test_auc"] <= 1
    assert len(list(encoders.glob("encoder-*.keras"))) == 2

    # A new file with the same encoders folder: the encoders are loaded, not pretrained again
    # (their recorded cost is the first run's), and fine-tuning from them gives the same network.
    _run_scarcity(monkeypatch, *args, "--json", str(tmp_path / "second.json"))
    again = json.loads((tmp_path / "second.json").read_text())["figures"]["records"]
    for first, second in zip(records, again, strict=True):
        assert first.get("pretrain_seconds") == second.get("pretrain_seconds")
        assert first["val_auc"] == pytest.approx(second["val_auc"], abs=1e-6)
