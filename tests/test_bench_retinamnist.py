"""bench.retinamnist's data path, on a few synthetic 28x28 colour images (fast, no TF): the photos
and table it writes, and what ``import-photos`` makes of them, must be the published pixels,
grades and split, or the figures could not be set beside the MedMNIST paper's.
The whole path (``dvc repro`` as an ordinal task) runs in tests/test_fundus_pipeline.py on the
fundus sample; the benchmark itself on the real data set (docs/results/retinamnist.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pydicom
import pytest

from bench import retinamnist
from dicomflow.dicom.labels import read_labels
from dicomflow.dicom.photos import import_photos


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(3)
    images = {s: rng.integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8)
              for s, n in (("train", 5), ("val", 3), ("test", 2))}
    labels = {s: np.arange(len(images[s])) % 5 for s in images}
    return images, labels


@pytest.fixture(scope="module")
def imported(arrays, tmp_path_factory):
    source = tmp_path_factory.mktemp("retina")
    rows = retinamnist.write_photos(*arrays, source)
    out = source / "data"
    result = import_photos(source, source / "photos.csv", kind="fundus", out=out, classes=retinamnist.GRADES,
                           allow_unknown_laterality=True, workers=1)
    return rows, out, result


def test_every_image_is_imported_with_its_pixels_grade_and_split(arrays, imported):
    images, labels = arrays
    rows, out, result = imported
    assert result.written == 10 and not result.failed
    expected = [(image, str(label), split) for split in ("train", "val", "test")
                for image, label in zip(images[split], labels[split])]
    grades, _ = read_labels(out / "labels.csv", key="path", column="label")
    splits, _ = read_labels(out / "labels.csv", key="path", column="split")
    table = pd.read_csv(out / "labels.csv", dtype=str)
    assert len(table) == len(expected)
    by_patient = {}
    for path in table["path"]:
        ds = pydicom.dcmread(out / path)
        by_patient[ds.PatientID] = (ds.pixel_array, grades[path], splits[path], ds.Modality)
    for row, (image, grade, split) in zip(rows, expected):
        pixels, got_grade, got_split, modality = by_patient[row["patient_id"]]
        np.testing.assert_array_equal(pixels, image)  # PNG in, RLE Lossless out: the published pixels
        assert (got_grade, got_split, modality) == (grade, split, "OP")


def test_one_fake_patient_per_image_whose_id_is_the_value_searched_downstream(imported):
    rows, _, _ = imported
    assert len({row["patient_id"] for row in rows}) == len(rows)
    assert all(row["phi"] == [row["patient_id"]] and len(row["patient_id"]) >= 6 for row in rows)


def test_the_summary_has_each_seed_their_mean_and_sd_and_the_papers_rows():
    runs = [{"seed": 42, "test_auc": 0.70, "test_acc": 0.50, "qwk": 0.40, "referable_auc": 0.80},
            {"seed": 43, "test_auc": 0.74, "test_acc": 0.54, "qwk": 0.50, "referable_auc": 0.84}]
    rows = retinamnist.summary_rows(runs)
    mean = next(row for row in rows if "mean (SD)" in row["method"])
    assert mean["test_auc"] == "0.720 (0.028)" and mean["qwk"] == "0.450 (0.071)"
    assert [row["method"] for row in rows[-len(retinamnist.PAPER_ROWS):]] == [
        f"MedMNIST v2 paper: {name}" for name, _, _ in retinamnist.PAPER_ROWS]
