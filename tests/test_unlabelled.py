"""ingest.unlabelled: pretrain, end to end on real DICOM files: ingest -> deidentify -> validate -> split.

A small folder of 25 patients: 20 with one labelled image each (14 of class 0, 6 of class 1) and
two more images without a label row, 3 with two unlabelled images only, and 2 with one image
whose label rows are errors (a class not in ingest.classes, two rows that disagree). Class 1 is
6 of 20 labelled images (30 %) but 6 of 66 kept images (9 %): under validate.min_class_fraction 10 %,
so validate passes only when the class shares are taken over the labelled rows.
The same folder runs once with ``ingest.unlabelled: pretrain`` and once with ``quarantine``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dicomflow.config import layout
from dicomflow.config.params import ParamsError, load_params
from dicomflow.deid import secret as deid_secret
from dicomflow.errors import DataError
from dicomflow.splitting import place_unlabelled
from stages import deidentify, ingest, split, validate

REPO = Path(__file__).resolve().parents[1]
CLASS_1 = {3, 7, 11, 13, 17, 19}  # of the 20 labelled patients 0..19
N_LABELLED, N_EXTRA_PER_PATIENT, N_UNLABELLED_ONLY = 20, 2, 3
N_LABELLED_IMAGES = N_LABELLED  # one each
N_UNLABELLED = N_LABELLED * N_EXTRA_PER_PATIENT + N_UNLABELLED_ONLY * 2  # 46: two each


def _pixels(number: int) -> np.ndarray:
    """A 64 x 64 image of its own: a gradient and a bright square at a place given by ``number``."""
    image = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8) + 20
    row, col = 2 + 5 * (number // 11), 2 + 5 * (number % 11)
    image[row:row + 6, col:col + 6] = 230
    return image


def _plan() -> list[tuple[str, str, str]]:
    """(patient ID, accession number, kind) of each file; kind ``0``/``1`` (labelled),
    ``unlabelled``, ``wrong_class`` or ``conflicting``."""
    plan = []
    for p in range(N_LABELLED):
        plan.append((f"PAT{p:02d}", f"A{p:02d}L", str(int(p in CLASS_1))))
        plan += [(f"PAT{p:02d}", f"A{p:02d}U{extra}", "unlabelled") for extra in range(N_EXTRA_PER_PATIENT)]
    for p in range(N_LABELLED, N_LABELLED + N_UNLABELLED_ONLY):
        plan += [(f"PAT{p:02d}", f"A{p:02d}U{extra}", "unlabelled") for extra in range(2)]
    return [*plan, ("PAT90", "A90W", "wrong_class"), ("PAT91", "A91C", "conflicting")]


def _write_folder(data: Path, make_dicom: Callable[..., Path]) -> None:
    """The DICOM files of :func:`_plan` (one image each) and labels.csv."""
    for number, (patient, accession, _) in enumerate(_plan()):
        make_dicom(data / patient / f"{accession}.dcm", _pixels(number), AccessionNumber=accession,
                   PatientID=patient, PixelSpacing=[0.5, 0.5])
    rows = [f"{acc},{kind}," for _, acc, kind in _plan() if kind in ("0", "1")]
    # A row with a split but no label: still unlabelled, and its split must be ignored.
    rows += ["A00U0,,test", "A90W,2,", "A91C,0,", "A91C,1,"]
    (data / "labels.csv").write_text("accession_number,label,split\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return kinds


def _run_stages(folder: Path, mode: str) -> None:
    """ingest -> deidentify -> validate -> split in ``folder``, as `dvc repro` runs them."""
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"].update(unlabelled=mode, workers=1, max_quarantine_fraction=0.9)
    params["deidentify"].update(workers=1)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        for name in (deid_secret.SECRET_FILE_ENV, deid_secret.TRACKING_URI_ENV):
            patch.delenv(name, raising=False)
        patch.setenv(deid_secret.SECRET_ENV, "unlabelled tests: a secret of at least 32 bytes")
        for stage in (ingest, deidentify, validate, split):
            stage.main()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_dicom) -> dict[str, Path]:
    """The same files (copies) through the four stages, with pretrain and with quarantine."""
    data = tmp_path_factory.mktemp("source") / "data"
    _write_folder(data, make_dicom)
    folders = {}
    for mode in ("pretrain", "quarantine"):
        folder = tmp_path_factory.mktemp(mode)
        shutil.copytree(data, folder / "data")
        _run_stages(folder, mode)
        folders[mode] = folder
    return folders


@pytest.fixture(scope="module")
def kinds() -> dict[str, str]:
    """Accession number -> kind."""
    return {accession: kind for _, accession, kind in _plan()}


def _index_and_split(folder: Path) -> pd.DataFrame:
    """The ingest index (accession numbers: PHI, read here only to know the files) beside the
    split manifest, row for row."""
    index = pd.read_parquet(folder / "outputs" / "ingest" / layout.INGEST_INDEX)
    manifest = pd.read_parquet(folder / "outputs" / "split" / layout.SPLIT_MANIFEST)
    assert len(index) == len(manifest)
    return pd.concat([index[["accession_number", "patient_id", "predefined_split"]],
                      manifest[["image_key", "patient_key", "label", "split"]]], axis=1)


@pytest.mark.slow
class TestPretrain:
    def test_unlabelled_images_are_kept_with_label_minus_one(self, runs, kinds):
        rows = _index_and_split(runs["pretrain"])
        expected = {acc: (layout.UNLABELLED_LABEL if kind == "unlabelled" else int(kind))
                    for acc, kind in kinds.items() if kind not in ("wrong_class", "conflicting")}
        assert dict(zip(rows["accession_number"], rows["label"])) == expected
        assert len(rows) == N_LABELLED_IMAGES + N_UNLABELLED == 66

    def test_label_errors_are_still_quarantined(self, runs):
        quarantine = pd.read_csv(runs["pretrain"] / "outputs" / "ingest" / layout.INGEST_QUARANTINE)
        assert dict(zip(quarantine["path"], quarantine["reason"])) == {
            "PAT90/A90W.dcm": "label_not_in_classes", "PAT91/A91C.dcm": "conflicting_label"}

    def test_a_predefined_split_on_an_unlabelled_image_is_ignored(self, runs):
        rows = _index_and_split(runs["pretrain"])
        assert rows.loc[rows["accession_number"] == "A00U0", "predefined_split"].tolist() == [""]

    def test_ingest_and_validate_count_the_unlabelled_images(self, runs):
        reports = runs["pretrain"] / "reports"
        ingested = json.loads((reports / "ingest.json").read_text())
        assert ingested["unlabelled"] == N_UNLABELLED and ingested["images"] == 66
        validated = json.loads((reports / "validation.json").read_text())
        assert validated["n_unlabelled"] == N_UNLABELLED and validated["success"] == 1
        assert "<th>n_unlabelled</th><td>46</td>" in (reports / "validation.html").read_text()

    def test_class_shares_are_of_the_labelled_rows(self, runs):
        # The precondition that makes the passing validate above mean something: over every
        # kept row, class 1 is below the minimum share.
        min_share = load_params("validate", runs["pretrain"] / "params.yaml").min_class_fraction
        assert len(CLASS_1) / 66 < min_share <= len(CLASS_1) / N_LABELLED_IMAGES
        profile = json.loads((runs["pretrain"] / "reports" / "data_profile.json").read_text())
        assert profile["shares"]["label"] == {"0": 0.7, "1": 0.3}

    def test_unlabelled_images_follow_their_patient(self, runs, kinds):
        rows = _index_and_split(runs["pretrain"])
        labelled = rows[rows["label"] != layout.UNLABELLED_LABEL]
        assert set(labelled["split"]) == {"train", "val", "test"}
        split_of_patient = dict(zip(labelled["patient_id"], labelled["split"]))
        unlabelled = rows[rows["label"] == layout.UNLABELLED_LABEL]
        expected = ["unlabelled" if split_of_patient.get(p, "train") == "train" else "unused"
                    for p in unlabelled["patient_id"]]
        assert unlabelled["split"].tolist() == expected
        # Each kind of patient is there: train, test (unused), and no labelled image at all.
        test_patients = {p for p, s in split_of_patient.items() if s == "test"}
        assert set(unlabelled.loc[unlabelled["patient_id"].isin(test_patients), "split"]) == {"unused"}
        only_unlabelled = unlabelled[~unlabelled["patient_id"].isin(split_of_patient)]
        assert len(only_unlabelled) == 2 * N_UNLABELLED_ONLY
        assert set(only_unlabelled["split"]) == {"unlabelled"}

    def test_split_counts_list_unlabelled_and_unused(self, runs):
        rows = _index_and_split(runs["pretrain"])
        counts = pd.read_csv(runs["pretrain"] / "reports" / "split_counts.csv")
        for name in ("unlabelled", "unused"):
            mine = rows[rows["split"] == name]
            assert counts[counts["split"] == name].to_dict("records") == [
                {"split": name, "label": -1, "images": len(mine), "patients": mine["patient_id"].nunique()}]
        assert counts["images"].sum() == 66

    def test_labelled_split_is_the_split_without_the_unlabelled_images(self, runs):
        with_unlabelled = _index_and_split(runs["pretrain"])
        with_unlabelled = with_unlabelled[with_unlabelled["label"] != layout.UNLABELLED_LABEL]
        without = _index_and_split(runs["quarantine"])
        assert len(without) == N_LABELLED_IMAGES
        assert (dict(zip(with_unlabelled["image_key"], with_unlabelled["split"]))
                == dict(zip(without["image_key"], without["split"])))


@pytest.mark.slow
class TestQuarantine:
    def test_unlabelled_images_are_quarantined_as_no_label(self, runs, kinds):
        folder = runs["quarantine"]
        quarantine = pd.read_csv(folder / "outputs" / "ingest" / layout.INGEST_QUARANTINE)
        no_label = quarantine.loc[quarantine["reason"] == "no_label", "path"]
        assert sorted(Path(p).stem for p in no_label) == sorted(
            acc for acc, kind in kinds.items() if kind == "unlabelled")
        ingested = json.loads((folder / "reports" / "ingest.json").read_text())
        assert "unlabelled" not in ingested and ingested["quarantined_no_label"] == N_UNLABELLED
        assert "n_unlabelled" not in json.loads((folder / "reports" / "validation.json").read_text())
        counts = pd.read_csv(folder / "reports" / "split_counts.csv")
        assert set(counts["split"]) == {"train", "val", "test"}

    def test_validate_refuses_label_minus_one_in_quarantine_mode(self, runs, tmp_path, monkeypatch):
        # The pretrain run's manifest, validated with ingest.unlabelled: quarantine.
        (tmp_path / "outputs").mkdir()
        manifest = pd.read_parquet(runs["pretrain"] / "outputs" / "deidentify" / layout.DEID_MANIFEST)
        (tmp_path / "outputs" / "deidentify").mkdir()
        manifest.to_parquet(tmp_path / "outputs" / "deidentify" / layout.DEID_MANIFEST)
        (tmp_path / "params.yaml").write_text((runs["quarantine"] / "params.yaml").read_text())
        monkeypatch.chdir(tmp_path)
        with pytest.raises(DataError, match=r"label_in_classes .*: 46 of 66 rows") as info:
            validate.main()
        assert "class_share_1" in str(info.value)  # 6 of 66: the shares are of every row here


def test_classes_may_not_hold_the_unlabelled_label_with_pretrain(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["ingest"].update(unlabelled="pretrain", classes=[-1, 0, 1])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    with pytest.raises(ParamsError, match=re.escape(
            "'ingest.classes' may not hold -1 with ingest.unlabelled: pretrain")):
        load_params("ingest", tmp_path / "params.yaml")
    params["ingest"]["unlabelled"] = "quarantine"  # control: today's behaviour, -1 is a class
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    assert load_params("ingest", tmp_path / "params.yaml").classes == [-1, 0, 1]


class TestPlaceUnlabelled:
    # patient, label; the labelled rows' split is given, the unlabelled rows' expected by hand.
    MANIFEST = pd.DataFrame({
        "patient_key": ["a", "a", "b", "b", "c", "c", "c", "d", "d"],
        "label": [1, -1, 0, -1, 0, -1, 1, -1, -1],
    }, index=[10, 11, 12, 13, 14, 15, 16, 17, 18])  # not a RangeIndex: alignment by label, not position
    LABELLED_SPLIT = pd.Series(["train", "val", "test", "test"], index=[10, 12, 14, 16])
    EXPECTED = ["train", "unlabelled", "val", "unused", "test", "unused", "test", "unlabelled", "unlabelled"]

    def test_by_hand(self):
        placed = place_unlabelled(self.MANIFEST, self.LABELLED_SPLIT)
        assert placed.tolist() == self.EXPECTED
        assert placed.index.equals(self.MANIFEST.index) and placed.name == "split"

    def test_a_split_not_of_the_labelled_rows_is_refused(self):
        with pytest.raises(ValueError, match="labelled_split must be indexed like the manifest's 4 labelled rows"):
            place_unlabelled(self.MANIFEST, self.LABELLED_SPLIT.reset_index(drop=True))


def test_a_predefined_split_with_one_patient_in_train_and_test_keeps_that_patients_unlabelled_images_out():
    """A labels file may put one patient's labelled images in train and in test: its choice. That
    patient's unlabelled images are then unused, and nothing refuses the split."""
    manifest = pd.DataFrame({"patient_key": ["p1", "p1", "p1", "p2"], "label": [0, 1, -1, -1]})
    labelled = pd.Series(["train", "test"], index=[0, 1])
    assert place_unlabelled(manifest, labelled).tolist() == ["train", "test", "unused", "unlabelled"]
