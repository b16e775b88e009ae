"""Tests of the embedded sample data set generator (``dicomflow.devtools.sample_data``).

Everything is read back with pydicom from a small generated set, so the tests
check what the files really contain, not what the generator meant to write.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicomflow import cli
from dicomflow.devtools import sample_data
from dicomflow.devtools.sample_data import LABEL_COLUMNS, Nodule, generate_sample, render_chest_phantom

PATIENTS = 30
SEED = 2026


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` keyed by its '/'-separated relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, sample_data.SampleSummary]:
    out = tmp_path_factory.mktemp("sample") / "data"
    return out, generate_sample(out, patients=PATIENTS, seed=SEED)


@pytest.fixture(scope="module")
def datasets(sample) -> dict[str, pydicom.Dataset]:
    """Every intact image, read back (pixels decoded lazily)."""
    root, summary = sample
    broken = set(summary.broken)
    return {rel: pydicom.dcmread(root / rel) for rel in _files(root)
            if rel.startswith("studies/") and rel not in broken}


@pytest.fixture(scope="module")
def label_rows(sample) -> list[dict[str, str]]:
    root, _ = sample
    with open(root / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_same_arguments_give_identical_bytes(sample, tmp_path: Path) -> None:
    root, _ = sample
    again = tmp_path / "again"
    generate_sample(again, patients=PATIENTS, seed=SEED)
    first, second = _files(root), _files(again)
    assert list(first) == list(second)
    differing = [rel for rel in first if first[rel] != second[rel]]
    assert differing == []


@pytest.mark.slow
def test_different_seed_gives_different_files(sample, tmp_path: Path) -> None:
    root, _ = sample
    other = tmp_path / "other"
    generate_sample(other, patients=PATIENTS, seed=SEED + 1)
    digests = {hashlib.sha256(b).hexdigest() for b in _files(root / "studies").values()}
    other_digests = {hashlib.sha256(b).hexdigest() for b in _files(other / "studies").values()}
    assert digests.isdisjoint(other_digests)
    assert (root / "labels.csv").read_bytes() != (other / "labels.csv").read_bytes()


def test_summary_matches_the_files(sample, datasets, label_rows) -> None:
    root, summary = sample
    assert summary.n_files == len(_files(root / "studies"))
    assert summary.n_images == len(datasets) == summary.n_files - 3
    assert summary.n_labelled == len(label_rows)
    assert summary.n_positive == sum(row["label"] == "1" for row in label_rows)
    assert summary.n_patients == PATIENTS == len({ds.PatientID for ds in datasets.values()})
    assert summary.n_images >= 2 * PATIENTS  # 1-5 images per patient, ~3 on average


def test_default_size_plan_is_large_enough() -> None:
    images = sample_data.plan_sample(240, 2026)
    labels = [im.study.label for im in images]
    assert len(images) >= 600
    assert 0.33 <= sum(labels) / len(labels) <= 0.42


def test_labels_csv_format_and_consistency(sample, datasets, label_rows) -> None:
    root, _ = sample
    raw = (root / "labels.csv").read_bytes()
    assert b"\r" not in raw
    assert raw.split(b"\n", 1)[0].decode() == ",".join(LABEL_COLUMNS)
    paths = [row["path"] for row in label_rows]
    assert paths == sorted(paths) and len(set(paths)) == len(paths)
    assert {row["label"] for row in label_rows} == {"0", "1"}
    by_accession: dict[str, set[str]] = defaultdict(set)
    for row in label_rows:
        assert (root / row["path"]).is_file(), row["path"]
        by_accession[row["accession_number"]].add(row["label"])
        ds = datasets.get(row["path"])
        if ds is not None:  # the truncated and header-only files are checked elsewhere
            assert ds.AccessionNumber == row["accession_number"]
            assert ds.StudyInstanceUID == row["study_instance_uid"]
            assert ds.SOPInstanceUID == row["sop_instance_uid"]
    assert all(len(labels) == 1 for labels in by_accession.values())  # label is per study


def test_unlabelled_images_are_valid_and_absent_from_labels(sample, datasets, label_rows) -> None:
    _, summary = sample
    assert summary.n_unlabelled >= 3
    labelled_paths = {row["path"] for row in label_rows}
    labelled_keys = {row["accession_number"] for row in label_rows} | {
        row["study_instance_uid"] for row in label_rows}
    for rel in summary.unlabelled:
        ds = datasets[rel]
        assert rel not in labelled_paths
        assert ds.AccessionNumber not in labelled_keys and ds.StudyInstanceUID not in labelled_keys
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_broken_files_are_broken(sample, label_rows) -> None:
    root, summary = sample
    labelled_paths = {row["path"] for row in label_rows}
    with pytest.raises((ValueError, EOFError)):  # pydicom: "less than expected" or EOF
        _ = pydicom.dcmread(root / summary.truncated).pixel_array
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(root / summary.non_dicom)
    header_only = pydicom.dcmread(root / summary.header_only)
    assert "PixelData" not in header_only and header_only.Rows > 0
    assert summary.truncated in labelled_paths and summary.header_only in labelled_paths
    assert summary.non_dicom not in labelled_paths
    intact = root / summary.unlabelled[0]  # control: the same reads work on a good file
    assert pydicom.dcmread(intact).pixel_array.size > 0


def test_header_variety(datasets) -> None:
    values = list(datasets.values())
    assert {ds.Modality for ds in values} == {"CR", "DX"}
    assert {ds.PhotometricInterpretation for ds in values} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(ds.BitsStored) for ds in values} == {8, 12, 16}
    assert len({(ds.Rows, ds.Columns) for ds in values}) >= 2
    assert len({ds.Manufacturer for ds in values}) >= 3
    assert {ds.ViewPosition for ds in values} >= {"PA", "LL"}
    assert any(float(ds.RescaleSlope) != 1 or float(ds.RescaleIntercept) != 0 for ds in values)
    for ds in values:
        assert ds.BitsAllocated == (8 if ds.BitsStored == 8 else 16)
        assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation == 0
        expected_class = "1.2.840.10008.5.1.4.1.1.1" if ds.Modality == "CR" else "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.SOPClassUID == ds.file_meta.MediaStorageSOPClassUID == expected_class
        assert ds.BodyPartExamined == "CHEST" and "WindowCenter" in ds and "WindowWidth" in ds


def test_rle_files_decode_and_window_matches_range(datasets) -> None:
    syntaxes = [ds.file_meta.TransferSyntaxUID for ds in datasets.values()]
    assert set(syntaxes) == {ExplicitVRLittleEndian, RLELossless}
    assert 0.1 <= syntaxes.count(RLELossless) / len(syntaxes) <= 0.3
    for ds in datasets.values():
        stored = ds.pixel_array
        assert stored.shape == (ds.Rows, ds.Columns)
        assert int(stored.max()) < 2 ** ds.BitsStored and stored.std() > 0
        slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        low, high = stored.min() * slope + intercept, stored.max() * slope + intercept
        assert float(ds.WindowCenter) == pytest.approx((low + high) / 2, abs=1e-3)
        assert float(ds.WindowWidth) == pytest.approx(high - low, abs=1e-3)


def test_monochrome1_is_stored_inverted(datasets) -> None:
    # The top-left corner is air outside the body: dark on screen, so low
    # stored values in MONOCHROME2 and high ones in MONOCHROME1.
    for ds in datasets.values():
        stored = ds.pixel_array.astype(float)
        corner_is_high = stored[:4, :4].mean() > np.median(stored)
        assert corner_is_high == (ds.PhotometricInterpretation == "MONOCHROME1"), ds.filename


def test_phi_is_present_everywhere_a_deidentifier_must_look(datasets) -> None:
    ages = []
    for ds in datasets.values():
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientAddress",
                        "OtherPatientIDs", "InstitutionName", "InstitutionAddress",
                        "ReferringPhysicianName", "OperatorsName", "StudyDate", "StudyTime"):
            assert str(ds.get(keyword, "")).strip(), keyword
        assert "^" in str(ds.PatientName)
        assert ds.RequestAttributesSequence[0].AccessionNumber == ds.AccessionNumber
        assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == ds.StudyInstanceUID
        assert ds.OtherPatientIDsSequence[0].PatientID == ds.OtherPatientIDs
        private = ds.private_block(0x0011, "DICOMFLOW SAMPLE")[0x01].value
        assert ds.PatientID in private and str(ds.PatientName) in private
        birth = dt.datetime.strptime(ds.PatientBirthDate, "%Y%m%d").date()
        study = dt.datetime.strptime(ds.StudyDate, "%Y%m%d").date()
        years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
        assert ds.PatientAge == f"{years:03d}Y"
        ages.append(years)
    assert max(ages) > 89 and min(ages) >= 18


def test_uids_are_deterministic_and_valid(datasets) -> None:
    sop_uids = [ds.SOPInstanceUID for ds in datasets.values()]
    assert len(set(sop_uids)) == len(sop_uids)
    for ds in datasets.values():
        for uid in (ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID):
            assert uid.startswith("2.25.") and len(uid) <= 64 and uid.is_valid
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.ImplementationClassUID == sample_data.IMPLEMENTATION_CLASS_UID
    assert sample_data.make_uid(1, "sop", 3) == sample_data.make_uid(1, "sop", 3)
    assert sample_data.make_uid(1, "sop", 3) != sample_data.make_uid(2, "sop", 3)
    assert sample_data.make_uid(1, "sop", 3) != sample_data.make_uid(1, "study", 3)


def test_layout_and_repeat_visits(sample, datasets) -> None:
    _, summary = sample
    images_per_patient: dict[str, int] = defaultdict(int)
    studies_per_patient: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for rel, ds in datasets.items():
        _studies, folder, _name = rel.split("/")
        assert folder == ds.AccessionNumber
        images_per_patient[ds.PatientID] += 1
        studies_per_patient[ds.PatientID].add((ds.AccessionNumber, ds.StudyDate))
    assert any(not rel.endswith(".dcm") for rel in datasets)
    assert sum(rel.endswith(".dcm") for rel in datasets) > 0.7 * len(datasets)
    assert max(images_per_patient.values()) >= 3
    repeat = [s for s in studies_per_patient.values() if len(s) >= 2]
    assert repeat and all(len({date for _, date in s}) == len(s) for s in repeat)
    assert summary.non_dicom.startswith("studies/")


@pytest.mark.slow
def test_refuses_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(FileExistsError):
        generate_sample(out, patients=20, seed=1)
    assert cli.main(["sample-data", str(out), "--patients", "20", "--seed", "1"]) == 1
    assert (out / "stale.txt").exists() and not (out / "labels.csv").exists()
    assert cli.main(["sample-data", str(out), "--patients", "20", "--seed", "1", "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "labels.csv").exists()


def test_phantom_nodule_is_a_local_bright_blob() -> None:
    nodule = Nodule(side=0, u=0.0, v=0.0, radius=0.06, contrast=0.3)
    plain = render_chest_phantom(np.random.default_rng(5), 256, 256, nodule=None)
    with_nodule = render_chest_phantom(np.random.default_rng(5), 256, 256, nodule=nodule)
    assert np.array_equal(plain, render_chest_phantom(np.random.default_rng(5), 256, 256, nodule=None))
    diff = with_nodule - plain
    assert diff.min() >= -1e-12 and diff.max() > 0.2
    changed = diff > 1e-9
    assert 0.002 < changed.mean() < 0.05  # a small blob, not a global shift
    cols = np.nonzero(changed.any(axis=0))[0]
    assert cols.max() < 128  # side 0 is the lung on the image left
    assert plain.min() >= 0.0 and plain.max() <= 1.0


@pytest.mark.slow
def test_default_sample_regenerates_to_the_hash_committed_in_data_dvc(tmp_path):
    """The embedded default: `make data` on any machine must give exactly what data.dvc pins."""
    import subprocess
    import sys

    import yaml

    repo = Path(__file__).resolve().parents[1]
    committed = yaml.safe_load((repo / "data.dvc").read_text())["outs"][0]
    generate_sample(tmp_path / "data")
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "data"], cwd=tmp_path, check=True)
    regenerated = yaml.safe_load((tmp_path / "data.dvc").read_text())["outs"][0]
    assert (regenerated["md5"], regenerated["nfiles"]) == (committed["md5"], committed["nfiles"])


def test_a_tenth_of_the_studies_burn_the_patients_identity_into_the_pixels(sample):
    root, summary = sample
    studies = {path.split("/")[1] for path in summary.burned_in}
    all_studies = {path.parent.name for path in (root / "studies").rglob("*") if path.is_file()}
    assert len(studies) == round(sample_data.BURNED_IN_SHARE * len(all_studies))
    ds = pydicom.dcmread(root / summary.burned_in[0])
    assert "BurnedInAnnotation" not in ds  # as older units send them: the header does not say
    # Readable as text, and the patient's own: what de-identification has to find.
    from dicomflow.deid.burned_in import read_burned_in_text
    from dicomflow.deid.identifiers import collect_identifiers

    for path in summary.burned_in[:3]:
        ds = pydicom.dcmread(root / path)
        found, _ = read_burned_in_text(ds, collect_identifiers(ds), "identifying")
        assert len(found.blanked) >= 3  # name, MRN, birth date
        assert "(0010,0010) Patient's Name" in {judgement.why for judgement in found.blanked}
