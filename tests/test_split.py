"""Tests for dicomflow/splitting.py: patient-level, label-stratified split and the counts table."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import StratifiedGroupKFold

from dicomflow.config import layout
from dicomflow.deid.manifest import build_manifest
from dicomflow.errors import DataError
from dicomflow.splitting import (
    SPLITS,
    _assign_group_folds,
    _take_one_fold,
    content_groups,
    count_by_split,
    split_by_patient,
)


def _manifest(n_patients: int = 80, *, seed: int = 0) -> pd.DataFrame:
    """Synthetic manifest: each patient has 1-9 images that share the patient's label."""
    rng = np.random.default_rng(seed)
    rows = []
    for patient in range(n_patients):
        label = patient % 2
        for image in range(int(rng.integers(1, 10))):
            rows.append({"image_key": f"img-{patient:03d}-{image}", "patient_key": f"pat-{patient:03d}",
                         "label": label, "pixel_sha256": hashlib.sha256(f"{patient}/{image}".encode()).hexdigest()})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def manifest() -> pd.DataFrame:
    return _manifest()


class TestSplitByPatient:
    def test_manifest_would_leak_under_an_image_level_split(self, manifest):
        # Sanity check of the fixture: shuffling images (not patients) puts patients in two sets.
        order = np.random.default_rng(1).permutation(len(manifest))
        naive = pd.Series("train", index=manifest.index)
        naive.iloc[order[: len(order) // 5]] = "test"

        assert (naive.groupby(manifest["patient_key"]).nunique() > 1).any()

    def test_no_patient_in_two_splits(self, manifest):
        split = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=42)

        assert split.groupby(manifest["patient_key"]).nunique().max() == 1
        patients = {name: set(manifest.loc[split == name, "patient_key"]) for name in SPLITS}
        assert not patients["train"] & patients["val"]
        assert not patients["train"] & patients["test"]
        assert not patients["val"] & patients["test"]

    def test_aligned_with_the_manifest(self, manifest):
        shuffled = manifest.sample(frac=1.0, random_state=3)

        split = split_by_patient(shuffled, val_size=0.15, test_size=0.2, seed=42)

        assert split.name == "split"
        assert split.index.equals(shuffled.index)
        assert set(split) == set(SPLITS)

    def test_every_split_has_both_labels(self, manifest):
        split = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=42)

        for name in SPLITS:
            assert set(manifest.loc[split == name, "label"]) == {0, 1}, name

    @pytest.mark.parametrize(("val_size", "test_size"), [(0.15, 0.2), (0.1, 0.1), (0.25, 0.25)])
    def test_shares_are_near_the_asked_fractions(self, val_size, test_size):
        manifest = _manifest(200, seed=5)

        shares = split_by_patient(manifest, val_size=val_size, test_size=test_size, seed=0).value_counts(
            normalize=True)

        assert shares["test"] == pytest.approx(test_size, abs=0.05)
        assert shares["val"] == pytest.approx(val_size, abs=0.05)
        assert shares["train"] == pytest.approx(1 - val_size - test_size, abs=0.07)

    def test_same_seed_same_split(self, manifest):
        first = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=7)
        second = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=7)

        pd.testing.assert_series_equal(first, second)

    def test_different_seed_different_split(self, manifest):
        first = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=7)
        second = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=8)

        assert not first.equals(second)

    @pytest.mark.parametrize(("val_size", "test_size"), [(0.5, 0.5), (0.6, 0.7)])
    def test_sizes_leaving_no_training_set(self, manifest, val_size, test_size):
        message = ("val_size + test_size must be below 1 to leave a training set; "
                   f"got {val_size} + {test_size}")
        with pytest.raises(ValueError, match=re.escape(message)):
            split_by_patient(manifest, val_size=val_size, test_size=test_size, seed=0)

    def test_too_few_patients_for_the_test_fold(self):
        manifest = _manifest(4)

        with pytest.raises(DataError, match=re.escape(
                "with 4 patients a 20% hold-out needs at least 5; "
                "add data or raise split.val_size / split.test_size")):
            split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=0)

    def test_too_few_patients_left_for_the_validation_fold(self):
        # 12 patients: the test fold (1 in 2) keeps about 6; a val share of 0.05 / 0.5 = 10% needs 10.
        manifest = _manifest(12)

        with pytest.raises(DataError, match=r"with [0-9]+ patients a 10% hold-out needs at least 10; "):
            split_by_patient(manifest, val_size=0.05, test_size=0.5, seed=0)


class TestStableUnderANewSecret:
    @staticmethod
    def deidentified(secret: bytes, n_patients: int = 60) -> pd.DataFrame:
        """The manifest deidentify writes for one synthetic ingest index, under ``secret``."""
        rng = np.random.default_rng(3)
        rows, images = [], []
        for patient in range(n_patients):
            study = f"1.2.826.0.1.3680043.99.{patient}"
            for image in range(int(rng.integers(1, 5))):
                rows.append({"sop_instance_uid": f"{study}.{image}", "study_instance_uid": study,
                             "patient_id": f"MRN-{patient:06d}", "label": patient % 3 % 2,
                             "number_of_frames": 1, "frame_index": 0, "patient_sex": "F", "patient_age": "050Y"})
                images.append(rng.integers(0, 256, (8, 8), dtype=np.uint8))
        index = pd.DataFrame(rows).reindex(columns=list(layout.INDEX_COLUMNS))
        return build_manifest(index, np.stack(images), secret=secret, retain_patient_characteristics=True)

    def test_the_same_images_go_to_the_same_split_under_two_secrets(self):
        first = self.deidentified(b"the first secret, 32 bytes or more")
        second = self.deidentified(b"the second secret, 32 bytes or more")
        # The keys differ, and so does their order: what the split followed before.
        assert not set(first["patient_key"]) & set(second["patient_key"])
        assert (first["patient_key"].rank(method="dense").tolist()
                != second["patient_key"].rank(method="dense").tolist())

        splits = [dict(zip(m["pixel_sha256"], split_by_patient(m, val_size=0.15, test_size=0.2, seed=42)))
                  for m in (first, second)]
        assert splits[0] == splits[1]
        assert set(splits[0].values()) == set(SPLITS)

    def test_patients_with_the_same_content_stay_together(self):
        manifest = pd.DataFrame({"patient_key": ["b", "a", "b", "c", "d"],
                                 "pixel_sha256": ["x", "y", "z", "y", "y"], "label": [0, 1, 0, 1, 0]})
        codes = content_groups(manifest)
        assert codes[1] == codes[3]  # a and c: one image "y" labelled 1 each
        assert len({codes[0], codes[1], codes[4]}) == 3 and codes[0] == codes[2]


class TestFoldsAsScikitLearn:
    """The split's own fold assignment against scikit-learn's StratifiedGroupKFold, fold for fold."""

    @pytest.mark.parametrize("n_splits", [2, 3, 5, 8, 13])
    @pytest.mark.parametrize("n_classes", [2, 3, 9])
    def test_every_fold_equals_stratified_group_kfold(self, n_splits, n_classes):
        rng = np.random.default_rng(n_splits * 10 + n_classes)
        # Few images per patient, so many patients share a count vector: ties decide folds too.
        patients = rng.integers(0, 400, 1200)
        groups = np.array([f"pat-{p:04d}" for p in patients], dtype=object)
        labels = rng.integers(0, n_classes, len(groups))
        splitter = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=11)
        folds = [test for _, test in splitter.split(np.zeros(len(labels)), labels, groups)]

        _, group_of_row = np.unique(groups, return_inverse=True)
        fold_of_group = _assign_group_folds(labels, group_of_row, group_of_row.max() + 1,
                                            n_splits=n_splits, seed=11)

        for fold, test in enumerate(folds):
            np.testing.assert_array_equal(np.flatnonzero(fold_of_group[group_of_row] == fold), test,
                                          err_msg=f"fold {fold}")
        first = np.zeros(len(labels), dtype=bool)
        first[folds[0]] = True
        np.testing.assert_array_equal(_take_one_fold(labels, groups, fraction=1 / n_splits, seed=11), first)

    def test_split_equals_two_stratified_group_kfold_folds(self, manifest):
        """split_by_patient: test = first fold of 1/test_size; val = first fold of the rest."""
        split = split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=42)

        labels = manifest["label"].to_numpy()
        # Each patient named by the SHA-256 of its sorted "pixel digest:label" lines.
        lines = {patient: sorted(f"{digest}:{label}" for digest, label in zip(rows["pixel_sha256"], rows["label"]))
                 for patient, rows in manifest.groupby("patient_key")}
        content = {patient: hashlib.sha256("\n".join(own).encode()).hexdigest() for patient, own in lines.items()}
        groups = manifest["patient_key"].map(content).to_numpy()
        _, test = next(StratifiedGroupKFold(5, shuffle=True, random_state=42).split(labels, labels, groups))
        rest = np.setdiff1d(np.arange(len(manifest)), test)
        _, val = next(StratifiedGroupKFold(round(1 / (0.15 / 0.8)), shuffle=True, random_state=43)
                      .split(rest, labels[rest], groups[rest]))
        expected = np.full(len(manifest), "train", dtype=object)
        expected[test], expected[rest[val]] = "test", "val"
        assert split.tolist() == expected.tolist()

    def test_labels_that_are_not_classes_are_refused_as_scikit_learn_does(self):
        with pytest.raises(ValueError, match=re.escape("Got 'continuous' instead.")):
            _take_one_fold(np.linspace(0, 1, 20), np.arange(20), fraction=0.2, seed=0)


class TestCountBySplit:
    def test_counts_images_and_patients_per_split_and_label(self, manifest):
        labelled = manifest.assign(split=split_by_patient(manifest, val_size=0.15, test_size=0.2, seed=42))

        counts = count_by_split(labelled)

        assert list(counts.columns) == ["split", "label", "images", "patients"]
        assert counts["images"].sum() == len(manifest)
        assert counts["patients"].sum() == manifest["patient_key"].nunique()  # a patient is in one split
        for row in counts.itertuples():
            rows = labelled[(labelled["split"] == row.split) & (labelled["label"] == row.label)]
            assert row.images == len(rows)
            assert row.patients == len(set(rows["patient_key"]))

    def test_small_table_by_hand(self):
        manifest = pd.DataFrame({
            "image_key": ["a", "b", "c", "d", "e"],
            "patient_key": ["p1", "p1", "p2", "p3", "p3"],
            "label": [0, 0, 1, 1, 1],
            "split": ["train", "train", "train", "test", "test"],
        })

        counts = count_by_split(manifest).set_index(["split", "label"])

        assert counts.loc[("train", 0)].tolist() == [2, 1]
        assert counts.loc[("train", 1)].tolist() == [1, 1]
        assert counts.loc[("test", 1)].tolist() == [2, 1]
        assert len(counts) == 3


class TestUsePredefinedSplit:
    def test_honours_a_patient_disjoint_split_column(self, manifest):
        from dicomflow.splitting import use_predefined_split

        patient_number = manifest["patient_key"].str[-3:].astype(int)
        given = manifest.assign(predefined_split=np.array(SPLITS)[patient_number % 3])
        result = use_predefined_split(given)
        assert (result == given["predefined_split"]).all()

    def test_rejects_missing_values_and_patients_in_two_splits(self, manifest):
        from dicomflow.splitting import use_predefined_split

        incomplete = manifest.assign(predefined_split="train")
        incomplete.loc[3, "predefined_split"] = ""
        with pytest.raises(DataError, match=r"1 image\(s\) have a split that is not one of train, val, test"):
            use_predefined_split(incomplete)

        leaking = manifest.assign(predefined_split="train")
        images_per_patient = leaking["patient_key"].value_counts()
        patient = images_per_patient[images_per_patient >= 2].index[0]
        leaking.loc[leaking.index[leaking["patient_key"] == patient][-1], "predefined_split"] = "test"
        with pytest.raises(DataError, match=r"puts 1 patient\(s\) in more than one split"):
            use_predefined_split(leaking)
