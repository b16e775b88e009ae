"""The embedded chest CT sample (``dicomflow.devtools.ct_sample``, ``sample-data --kind ct``).

Everything is read back with pydicom (and assembled with highdicom) from a small generated set, so
the tests check what the files contain, not what the generator meant to write. Expected values are
written out here: HU of the tissues, 5 mm geometry, the angle of the tilted slice.
"""

from __future__ import annotations

import csv
import hashlib
import re
import shutil
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import highdicom
import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from dicomflow import cli
from dicomflow.devtools.ct_sample import DEFECTS, SERIES_POLICIES, generate_ct_sample, plan_ct_sample
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.series import apply_policy, diagnose, group_series, read_slice_header

pytestmark = pytest.mark.slow  # its fixtures take seconds: make test runs it, make check does not

PATIENTS = 2  # the smallest sample: one study of each label, and the five broken ones
SEED = 7
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
INSTALL_HINT = "dciodvfy is not installed: apt-get install dicom3tools (make test installs it: tools/system-deps)"


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("ct") / "data"
    return out, generate_ct_sample(out, patients=PATIENTS, seed=SEED)


@pytest.fixture(scope="module")
def series(sample) -> dict[str, list[tuple[str, pydicom.Dataset]]]:
    """Every file read back, grouped by folder: folder -> [(relative path, data set)]."""
    root, _ = sample
    grouped = defaultdict(list)
    for path in sorted(root.rglob("*.dcm")):
        rel = path.relative_to(root).as_posix()
        grouped[rel.rsplit("/", 1)[0]].append((rel, pydicom.dcmread(path)))
    return dict(grouped)


@pytest.fixture(scope="module")
def plans():
    return {plan.folder: plan for plan in plan_ct_sample(PATIENTS, SEED)}


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _hu(ds: pydicom.Dataset) -> np.ndarray:
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _along_normal(files: list[tuple[str, pydicom.Dataset]]) -> list[float]:
    """Each axial file's position along the axial normal (z), sorted."""
    return sorted(float(np.dot([float(v) for v in ds.ImagePositionPatient], [0, 0, 1])) for _, ds in files)


def _axial(files):
    return [(rel, ds) for rel, ds in files if "LOCALIZER" not in ds.ImageType]


@pytest.mark.slow
def test_the_cli_writes_the_same_bytes_again(sample, tmp_path):
    root, _ = sample
    again = tmp_path / "again"
    assert cli.main(["sample-data", str(again), "--kind", "ct", "--patients", str(PATIENTS), "--seed", str(SEED)]) == 0

    assert _tree_digest(again) == _tree_digest(root)
    assert cli.main(["sample-data", str(again), "--kind", "ct", "--patients", "2"]) == 1  # not empty, no --force


def test_the_cli_knows_the_ct_kind_and_refuses_one_patient(tmp_path):
    assert cli.main(["sample-data", str(tmp_path / "one"), "--kind", "ct", "--patients", "1"]) == 1
    with pytest.raises(ValueError, match="patients must be at least 2 so that both labels occur; got 1"):
        generate_ct_sample(tmp_path / "one", patients=1)
    assert not (tmp_path / "one").exists()
    assert cli.parser().parse_args(["sample-data", str(tmp_path), "--kind", "ct"]).patients is None
    assert cli.SAMPLE_PATIENTS["ct"] == 24


def test_the_sample_is_small_and_every_file_is_a_ct_slice(sample, series):
    root, summary = sample
    files = [ds for group in series.values() for _, ds in group]
    sizes = [p.stat().st_size for p in root.rglob("*.dcm")]

    assert len(series) == summary.n_studies == PATIENTS + len(DEFECTS)
    assert len(files) == len(sizes) == summary.n_files
    assert sum(sizes) < 2_000_000 and max(sizes) < 12_000  # RLE: about 5 KB a slice
    for ds in files:
        assert ds.SOPClassUID == CT_IMAGE_STORAGE and ds.Modality == "CT"
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        assert ds.BodyPartExamined == "CHEST" and ds.PatientPosition == "HFS"
        assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (16, 16, 1)
        assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
        assert ds.pixel_array.dtype == np.int16
        assert ds.PatientName and ds.PatientBirthDate and ds.AccessionNumber  # fake PHI, as in the chest sample
        assert ds[0x0011, 0x1001].value.startswith("MRN ")
        if "LOCALIZER" not in ds.ImageType:
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.RescaleType == "HU"
            assert ds.pixel_array.shape == (64, 64)
            assert [float(v) for v in ds.PixelSpacing] == [5.0, 5.0] and float(ds.SliceThickness) == 5.0
            assert float(ds.SliceLocation) == float(ds.ImagePositionPatient[2])
            assert float(ds.WindowCenter[0]) == -600 and float(ds.WindowWidth[0]) == 1500


def test_the_pixels_hold_the_planned_hu(series, plans):
    """Nodule centre ~40 HU (solid), lung ~-850 HU, air -1000 HU, at the plan's positions in mm, in
    every series (broken ones too, where the slice is there and axial)."""
    nodules = 0
    for folder, plan in plans.items():
        files = [(rel, ds) for rel, ds in series[folder] if [float(v) for v in ds.ImageOrientationPatient] == AXIAL]
        x0, y0 = (float(v) for v in files[0][1].ImagePositionPatient[:2])

        def voxel(x: float, y: float, z: float) -> tuple[pydicom.Dataset, int, int] | None:
            near = [ds for _, ds in files if abs(float(ds.ImagePositionPatient[2]) - z) <= 2.5]
            if not near:  # the gap or the tilted slice is there
                assert plan.defect in ("gap", "tilted")
                return None
            return near[0], round((y - y0) / 5.0), round((x - x0) / 5.0)

        for _, ds in files:
            assert _hu(ds)[0, 0] == -1000.0  # the corner is air, with no noise
        a = plan.anatomy
        # The right lung under its widest level, inside 70 % of its planned outline: vessels and
        # a nodule cover a minority of it, so the median is the parenchyma.
        ds, _, _ = voxel(a.lung_x[0], a.lung_y, a.widest_z - 20.0) or voxel(a.lung_x[0], a.lung_y, a.widest_z - 25.0)
        y, x = np.mgrid[0:64, 0:64] * 5.0 + np.array([y0, x0])[:, None, None]
        inside = ((x - a.lung_x[0]) / a.lung_axes[0]) ** 2 + ((y - a.lung_y) / a.lung_axes[1]) ** 2 < 0.7 ** 2
        assert -900 < np.median(_hu(ds)[inside]) < -800
        if plan.nodule is not None and voxel(*plan.nodule.centre) is not None:
            nodules += 1
            ds, row, col = voxel(*plan.nodule.centre)
            # The voxel holding the centre is at worst (centre on its corner, 12 mm ball) about
            # half nodule, half lung: -350 HU; from 20 mm on, all nodule: 40 HU. Noise: SD <= 18 HU.
            centre = _hu(ds)[row, col]
            assert -450 < centre < 40 + 80, (plan.nodule, centre)
            if plan.nodule.diameter >= 20:
                assert centre > 40 - 80, (plan.nodule, centre)
    assert nodules >= sum(p.label for p in plans.values() if p.defect is None) > 0


def test_intact_series_are_regular_head_first_and_named_out_of_order(series, plans):
    for folder, plan in plans.items():
        if plan.defect is not None:
            continue
        files = series[folder]
        assert 32 <= len(files) <= 40 and len(files) == plan.n_slices
        assert all([float(v) for v in ds.ImageOrientationPatient] == AXIAL for _, ds in files)
        assert len({(ds.ImagePositionPatient[0], ds.ImagePositionPatient[1]) for _, ds in files}) == 1
        assert len({ds.SeriesInstanceUID for _, ds in files}) == len({ds.FrameOfReferenceUID for _, ds in files}) == 1
        z = _along_normal(files)
        assert np.allclose(np.diff(z), 5.0, atol=1e-6)
        by_instance = sorted(files, key=lambda item: item[1].InstanceNumber)
        assert [ds.InstanceNumber for _, ds in by_instance] == list(range(1, len(files) + 1))
        assert float(by_instance[0][1].ImagePositionPatient[2]) == z[-1]  # slice 1 is the most superior
        names_in_z_order = [rel for rel, _ in sorted(files, key=lambda item: float(item[1].ImagePositionPatient[2]))]
        assert names_in_z_order != sorted(names_in_z_order) and names_in_z_order[::-1] != sorted(names_in_z_order)


def test_highdicom_assembles_the_intact_series_and_refuses_the_broken(series, plans, sample):
    _, summary = sample
    for folder, plan in plans.items():
        datasets = [ds for _, ds in series[folder]]
        if plan.defect in (None, "localizer"):
            volume = highdicom.get_volume_from_series(
                [ds for ds in datasets if "LOCALIZER" not in ds.ImageType], dtype=np.float32)
            assert volume.spatial_shape == (plan.n_slices, 64, 64)
            assert np.allclose(volume.spacing, (5.0, 5.0, 5.0))
            assert volume.array.min() == -1000.0
        if plan.defect is not None:  # the localizer too, unless it is set aside
            refusal = "same orientation" if plan.defect in ("tilted", "localizer") else "regularly-spaced"
            with pytest.raises(ValueError, match=refusal):
                highdicom.get_volume_from_series(datasets, dtype=np.float32)
    assert {b.defect for b in summary.broken} == set(DEFECTS)


def test_each_broken_series_has_exactly_its_problem(sample, series):
    root, summary = sample
    for broken in summary.broken:
        files = series[broken.files[0].rsplit("/", 1)[0]]
        assert {ds.SeriesInstanceUID for _, ds in files} == {broken.series_uid}
        assert {ds.AccessionNumber for _, ds in files} == {broken.accession}
        assert all((root / rel).is_file() for rel in broken.files)
        axial = _axial(files)
        steps = Counter(np.round(np.diff(_along_normal(axial)), 6).tolist())
        orientations = Counter(tuple(float(v) for v in ds.ImageOrientationPatient) for _, ds in files)
        digests = Counter(hashlib.sha256((root / rel).read_bytes()).hexdigest() for rel, _ in files)
        if broken.defect == "gap":
            assert broken.reason == "series_gap" and steps == {5.0: len(files) - 2, 10.0: 1}
            numbers = sorted(ds.InstanceNumber for _, ds in files)
            assert len(set(range(1, numbers[-1] + 1)) - set(numbers)) == 1
        elif broken.defect == "duplicate_differs":
            assert broken.reason == "series_duplicate_position" and steps == {5.0: len(files) - 2, 0.0: 1}
            first, second = (pydicom.dcmread(root / rel) for rel in broken.files)
            assert first.ImagePositionPatient == second.ImagePositionPatient
            assert first.SOPInstanceUID != second.SOPInstanceUID
            body = _hu(first) > -1000  # the air around the patient carries no noise
            assert (first.pixel_array != second.pixel_array)[body].mean() > 0.8
            assert max(digests.values()) == 1
        elif broken.defect == "duplicate_copy":
            assert broken.reason == "series_duplicate_position" and steps == {5.0: len(files) - 2, 0.0: 1}
            assert sorted(digests.values()) == [1] * (len(files) - 2) + [2]
            assert (root / broken.files[0]).read_bytes() == (root / broken.files[1]).read_bytes()
        elif broken.defect == "localizer":
            assert broken.reason == "localizer" and steps == {5.0: len(axial) - 1}
            (rel, scout), = [(rel, ds) for rel, ds in files if "LOCALIZER" in ds.ImageType]
            assert (rel,) == broken.files and len(files) == len(axial) + 1
            assert list(scout.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            assert [float(v) for v in scout.ImageOrientationPatient] == [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
            assert scout.FrameOfReferenceUID == axial[0][1].FrameOfReferenceUID
        elif broken.defect == "tilted":
            assert broken.reason == "series_mixed_orientation" and steps == {5.0: len(files) - 1}
            assert orientations[tuple(AXIAL)] == len(files) - 1 and len(orientations) == 2
            tilted = pydicom.dcmread(root / broken.files[0])
            iop = np.array([float(v) for v in tilted.ImageOrientationPatient])
            angle = np.degrees(np.arccos(np.dot(np.cross(iop[:3], iop[3:]), [0.0, 0.0, 1.0])))
            assert abs(angle - 5.0) < 0.01
        if broken.defect != "tilted":
            assert set(orientations) <= {tuple(AXIAL), (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)}
        if broken.defect not in ("duplicate_copy",):
            assert max(digests.values()) == 1


def test_the_series_module_finds_in_each_series_what_the_summary_says(sample, plans):
    """dicomflow.dicom.series (what ingest uses) reads the sample as the summary describes it: the
    intact series clean, each broken one with its reason and its outcome under every policy, the
    localizer set aside."""
    root, summary = sample
    headers = [read_slice_header(path, data_dir=root, max_bytes=1 << 20) for path in sorted(root.rglob("*.dcm"))]
    groups, set_aside = group_series(headers)

    def outcome(group, policy: str) -> str:
        try:
            apply_policy(group, diagnose(group, min_slices=8), policy, min_slices=8)
        except Quarantined as err:
            return err.reason
        return ""

    found = {g.series_instance_uid: tuple(outcome(g, policy) for policy in SERIES_POLICIES) for g in groups}
    broken = {b.series_uid: tuple(b.outcome(policy) for policy in SERIES_POLICIES) for b in summary.broken}
    assert len(groups) == len(plans)
    assert found == {plan.series_uid: broken.get(plan.series_uid, ("", "", "")) for plan in plans.values()}
    assert {b.defect: b.outcome("strict") or "localizer" for b in summary.broken} == {
        b.defect: b.reason for b in summary.broken}
    assert [(path, reason) for path, reason, _ in set_aside] == [(summary.by_defect("localizer").files[0], "localizer")]


def test_labels_join_every_study_once(sample, series):
    root, summary = sample
    with open(root / "labels.csv", encoding="ascii", newline="") as handle:
        assert handle.readline().strip() == "accession_number,study_instance_uid,series_instance_uid,label"
        handle.seek(0)
        rows = list(csv.DictReader(handle))
    in_files = {(ds.AccessionNumber, ds.StudyInstanceUID, ds.SeriesInstanceUID)
                for group in series.values() for _, ds in group}

    assert {(r["accession_number"], r["study_instance_uid"], r["series_instance_uid"]) for r in rows} == in_files
    assert len(rows) == len(in_files) == summary.n_studies
    assert {r["label"] for r in rows} == {"0", "1"}
    assert sum(r["label"] == "1" for r in rows) == summary.n_positive
    assert {b.accession for b in summary.broken} <= {r["accession_number"] for r in rows}


def test_no_identifier_is_in_a_file_or_folder_name(sample, series):
    root, _ = sample
    for folder, files in series.items():
        _, accession, series_folder = folder.split("/")
        assert re.fullmatch(r"[0-9a-f]{10}", series_folder)
        for rel, ds in files:
            name = rel.rsplit("/", 1)[1]
            assert re.fullmatch(r"[0-9a-f]{20}\.dcm", name), rel
            identifiers = [*str(ds.PatientName).split("^"), ds.PatientID, ds.OtherPatientIDs,
                           ds.PatientBirthDate, ds.StudyInstanceUID, ds.SOPInstanceUID]
            assert not [value for value in identifiers if value in rel], rel
            assert accession == ds.AccessionNumber  # the study folder, as in the chest sample


def test_dciodvfy_finds_no_error_in_a_slice_the_localizer_or_the_tilted_slice(sample, series):
    root, summary = sample
    if shutil.which("dciodvfy") is None:
        pytest.fail(INSTALL_HINT)
    intact = next(group for group in series.values() if len(_axial(group)) == len(group) >= 32)
    for rel in (intact[0][0], summary.by_defect("localizer").files[0], summary.by_defect("tilted").files[0]):
        result = subprocess.run(["dciodvfy", str(root / rel)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]
        assert errors == [], rel


@pytest.mark.slow
def test_the_default_sample_is_a_few_mb_and_its_labels_not_given_away_by_count_or_mean(tmp_path):
    start = time.perf_counter()
    summary = generate_ct_sample(tmp_path, seed=2026)
    seconds = time.perf_counter() - start
    size = sum(p.stat().st_size for p in tmp_path.rglob("*.dcm"))

    assert summary.n_studies == 29 and 900 < summary.n_files < 1200 and size < 8_000_000, (summary, size)
    assert seconds < 120, seconds
    counts, means = {0: [], 1: []}, {0: [], 1: []}
    for plan in plan_ct_sample(24, 2026):
        if plan.defect is None:
            volume = np.stack([_hu(pydicom.dcmread(p)) for p in (tmp_path / plan.folder).iterdir()])
            counts[plan.label].append(len(volume))
            means[plan.label].append(volume.mean())
    for values in (counts, means):  # the ranges of the two labels overlap
        assert max(values[0]) > min(values[1]) and max(values[1]) > min(values[0]), values
