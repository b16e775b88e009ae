"""De-identifying series (``ingest.unit: series``): the real ingest stage, then the real deidentify stage.

The series are written here with pydicom (``test_series.Series``: CT slices of a body holding an
ellipsoid), with PHI planted in names, IDs, dates, a description and a private block: two series
of one patient's study and one series of another patient. Expected values come from that
construction and from the keyed-value oracles of ``test_deidentify`` (written with hmac).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.dataset import Dataset
from test_deidentify import SECRET, date_shift, keyed_uid_of, pseudonym
from test_series import Series

from dicomflow.config import layout
from dicomflow.deid import secret as deid_secret
from dicomflow.deid.checks import check_inputs
from dicomflow.deid.identifiers import Identifiers, collect_identifiers
from dicomflow.deid.leaks import scan_paths
from dicomflow.errors import DataError
from stages import deidentify, ingest

pytestmark = pytest.mark.slow  # its fixtures take seconds: make test runs it, make check does not

REPO = Path(__file__).resolve().parents[1]
SLICES = 9
STUDY_DATE, BIRTH_DATE = "20230405", "19270315"
PATIENTS = {"P1": ("Quixley^Bartholomew", "MRN-55501234", "ACC-70707070"),
            "P2": ("Osgood^Tilda", "MRN-66602345", "ACC-80808080")}
# Series folder -> patient; the two series of P1 belong to one study.
SERIES = {"lung": "P1", "mediastinum": "P1", "other": "P2"}
PRIVATE_NOTE = "Quixley note RP-31415926"
PLANTED = ["Quixley", "Bartholomew", "Osgood", "Tilda", "MRN-55501234", "MRN-66602345",
           "ACC-70707070", "ACC-80808080", "Saint Elsewhere Hospital", "Fennimore^Ada", "Fennimore",
           "RP-31415926", "HX-99887766", STUDY_DATE, BIRTH_DATE, "SN-00042"]


def write_series(data: Path, *, leaking_slice: str | None = None,
                 flagged_slice: str | None = None) -> dict[str, tuple[Series, list[Path]]]:
    """The three series under ``data/<accession>/<folder>/``; every slice carries the planted
    PHI and a private block. ``leaking_slice`` (a folder): its slice 3 holds the patient's name in a
    private element that is not removed when ``remove_private_tags`` is off (the others have none).
    ``flagged_slice`` (a folder): its slice 1 (through the ellipsoid) says (0028,0301) Burned In Annotation YES."""
    written, studies = {}, {}
    for number, (folder, patient) in enumerate(SERIES.items()):
        name, patient_id, accession = PATIENTS[patient]
        series = Series(n=SLICES, centre=(0.0, 0.0, 5.0 * number))
        series.study_uid = studies.setdefault(patient, series.study_uid)
        where = data / accession / folder
        where.mkdir(parents=True)
        paths = []
        for i in range(SLICES):
            ds = series.dataset(i, PatientName=name, PatientID=patient_id, AccessionNumber=accession,
                                OtherPatientIDs="HX-99887766", PatientBirthDate=BIRTH_DATE,
                                StudyDate=STUDY_DATE, SeriesDate=STUDY_DATE, AcquisitionDate=STUDY_DATE,
                                InstitutionName="Saint Elsewhere Hospital", ReferringPhysicianName="Fennimore^Ada",
                                StudyID="RP-31415926", DeviceSerialNumber="SN-00042", PatientSex="F",
                                PatientAge="095Y", Manufacturer="Acme", SeriesDescription=f"Chest {folder}")
            if leaking_slice is None or (folder == leaking_slice and i == 3):
                block = ds.private_block(0x0011, "DICOMFLOW TEST", create=True)
                block.add_new(0x01, "LO", PRIVATE_NOTE if leaking_slice is None else name)
            if folder == flagged_slice and i == 1:
                ds.BurnedInAnnotation = "YES"
            path = where / f"{number}{i:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
        written[folder] = (series, paths)
    (data / "labels.csv").write_text("accession_number,label\nACC-70707070,1\nACC-80808080,0\n",
                                     encoding="utf-8")
    return written


def set_params(workdir: Path, section: str, **values: object) -> None:
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def project(workdir: Path, monkeypatch: pytest.MonkeyPatch, **written: object) -> dict:
    """The repository's params.yaml (ingest.unit series, one worker, dates kept shifted), the
    series under data/ and a real secret; the working folder."""
    (workdir / "params.yaml").write_text((REPO / "params.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    set_params(workdir, "ingest", unit="series", workers=1)
    set_params(workdir, "deidentify", workers=1, retain_longitudinal_dates=True)
    monkeypatch.chdir(workdir)
    for name in (deid_secret.SECRET_FILE_ENV, deid_secret.TRACKING_URI_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(deid_secret.SECRET_ENV, SECRET.decode())
    return write_series(workdir / "data", **written)


def every_value(ds: Dataset) -> list[str]:
    """Every element's value at every depth (file meta and private elements included), as text;
    the pixel data left out (it holds no text, and was read for burned-in text by the stage)."""
    values = []
    for elem in [*(ds.file_meta if hasattr(ds, "file_meta") else ()), *ds]:
        if elem.VR == "SQ":
            values += [value for item in elem.value for value in every_value(item)]
        elif elem.tag != 0x7FE00010:
            values.append(repr(elem.value) if isinstance(elem.value, bytes) else str(elem.value))
    return values


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict:
    """One real ingest and one real deidentify run of the three series."""
    workdir = tmp_path_factory.mktemp("series")
    records, root = RecordsKept(), logging.getLogger()
    level = root.level
    root.addHandler(records)
    root.setLevel(logging.DEBUG)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            written = project(workdir, monkeypatch)
            ingest.main()
            records.records.clear()  # the deidentify stage's own log from here
            deidentify.main()
    finally:
        root.removeHandler(records)
        root.setLevel(level)
    return {"dir": workdir, "written": written, "out": workdir / "outputs" / "deidentify",
            "ingest": workdir / "outputs" / "ingest", "log": "\n".join(r.getMessage() for r in records.records)}


class RecordsKept(logging.Handler):
    """Every log record, at every level."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_ingest_made_three_series_of_nine_slices(run):
    index = pd.read_parquet(run["ingest"] / layout.INGEST_INDEX)
    assert list(index["number_of_frames"]) == [SLICES] * 3
    assert np.load(run["ingest"] / layout.IMAGES).shape[:2] == (3, 32)


def test_every_slice_written_under_its_series_folder_one_row_per_series(run):
    out, index = run["out"], pd.read_parquet(run["ingest"] / layout.INGEST_INDEX)
    manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
    slices = pd.read_parquet(run["ingest"] / layout.SERIES_FILES)
    assert tuple(manifest.columns) == layout.MANIFEST_COLUMNS and len(manifest) == 3
    assert manifest["image_key"].is_unique
    for row, (key, folder) in enumerate(zip(manifest["image_key"], manifest["dicom_file"])):
        assert folder == f"dicom/{key}"
        uids = slices.loc[slices["row_key"] == index["row_key"][row], "sop_instance_uid"]
        # the key of the series: "series:<Series UID>#<first slice's SOP UID>", keyed
        expected = pseudonym(SECRET, f"series:{index['series_instance_uid'][row]}#{uids.iloc[0]}", 16)
        assert key == expected and key not in {pseudonym(SECRET, uid, 16) for uid in uids}
        files = sorted(path.name for path in (out / folder).iterdir())
        assert files == sorted(f"{pseudonym(SECRET, uid, 16)}.dcm" for uid in uids)
    assert sorted(path.name for path in (out / "dicom").iterdir()) == sorted(manifest["image_key"])
    folders = index["source_path"].str.split("/").str[-1]
    assert list(manifest["patient_key"]) == [pseudonym(SECRET, PATIENTS[SERIES[f]][1]) for f in folders]
    assert list(manifest["label"]) == [int(SERIES[f] == "P1") for f in folders]
    images = np.load(out / layout.IMAGES)
    np.testing.assert_array_equal(images, np.load(run["ingest"] / layout.IMAGES))
    assert list(manifest["pixel_sha256"]) == [hashlib.sha256(v.tobytes()).hexdigest() for v in images]
    assert manifest["study_key"].nunique() == 2


def test_one_new_series_and_frame_uid_per_series_geometry_kept_dates_shifted(run):
    out = run["out"]
    manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
    folders = dict(zip(pd.read_parquet(run["ingest"] / layout.INGEST_INDEX)["source_path"].str.split("/").str[-1],
                       manifest["dicom_file"]))
    news = set()
    for folder, (series, paths) in run["written"].items():
        patient_id = PATIENTS[SERIES[folder]][1]
        sources = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p) for p in paths}
        outputs = [pydicom.dcmread(p) for p in sorted((out / folders[folder]).iterdir())]
        assert len(outputs) == SLICES
        assert {ds.SeriesInstanceUID for ds in outputs} == {keyed_uid_of(SECRET, series.series_uid)}
        assert {ds.FrameOfReferenceUID for ds in outputs} == {keyed_uid_of(SECRET, series.frame_uid)}
        assert {ds.StudyInstanceUID for ds in outputs} == {keyed_uid_of(SECRET, series.study_uid)}
        assert outputs[0].SeriesInstanceUID != series.series_uid
        moved = (datetime.date(2023, 4, 5) - datetime.timedelta(days=date_shift(SECRET, patient_id)))
        by_new_uid = {keyed_uid_of(SECRET, uid): ds for uid, ds in sources.items()}
        for ds in outputs:
            source = by_new_uid[ds.SOPInstanceUID]
            assert list(ds.ImagePositionPatient) == list(source.ImagePositionPatient)
            assert list(ds.ImageOrientationPatient) == list(source.ImageOrientationPatient)
            assert ds.PixelData == source.PixelData and ds.PatientIdentityRemoved == "YES"
            assert ds.StudyDate == ds.SeriesDate == ds.AcquisitionDate == moved.strftime("%Y%m%d")
            assert ds.PatientID == ds.PatientName == pseudonym(SECRET, patient_id)
        news.add(outputs[0].SeriesInstanceUID)
    assert len(news) == 3


def test_no_planted_value_in_any_element_of_any_output(run):
    out, found = run["out"], []
    files = [path for path in out.rglob("*") if path.is_file()]
    sources = [path for _, paths in run["written"].values() for path in paths]
    source_uids = set()
    for path in sources:
        ds = pydicom.dcmread(path)
        source_uids |= {ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID}
    dicoms = [path for path in files if path.suffix == ".dcm"]
    assert len(dicoms) == 3 * SLICES
    for path in dicoms:
        ds = pydicom.dcmread(path)
        assert not [e for e in ds if e.tag.is_private]
        text = "\n".join(every_value(ds))
        found += [value for value in [*PLANTED, *source_uids] if value in text]
    tables = [pd.read_parquet(out / layout.DEID_MANIFEST), pd.read_csv(out / layout.DEID_AUDIT, dtype=str),
              pd.read_csv(out / layout.DEID_QUARANTINE, dtype=str)]
    texts = [table.to_csv() for table in tables]
    texts += [path.read_text() for path in files if path.suffix == ".json"]
    texts.append((run["dir"] / "reports" / "deidentify.json").read_text())
    assert "series: 3 of 3 de-identified (27 of 27 slice files)" in run["log"]
    texts.append(run["log"])
    found += [value for text in texts for value in [*PLANTED, *source_uids] if value in text]
    assert found == []
    # The project's own search, second: every identifying value of every source header.
    identifiers = Identifiers()
    for path in sources:
        identifiers.update(collect_identifiers(pydicom.dcmread(path, stop_before_pixels=True)))
    assert scan_paths(identifiers, [out]) == []


def test_audit_and_metrics_count_series_and_slices(run):
    audit = pd.read_csv(run["out"] / layout.DEID_AUDIT)
    manifest = pd.read_parquet(run["out"] / layout.DEID_MANIFEST)
    assert len(audit) == 3 * SLICES
    assert sorted(set(audit["image_key"].str.split("/").str[0])) == sorted(manifest["image_key"])
    assert (audit["private_removed"] == 2).all()  # the creator and the note
    metrics = json.loads((run["dir"] / "reports" / "deidentify.json").read_text())
    assert metrics["n_files"] == 3 * SLICES and metrics["quarantined"] == 0
    assert {key: metrics[key] for key in ("series", "series_slices", "series_deidentified",
                                          "series_deidentified_slices", "series_burned_in_excluded",
                                          "series_quarantined")} == {
        "series": 3, "series_slices": 27, "series_deidentified": 3, "series_deidentified_slices": 27,
        "series_burned_in_excluded": 0, "series_quarantined": 0}


def test_one_leaking_slice_quarantines_its_whole_series(tmp_path, monkeypatch):
    written = project(tmp_path, monkeypatch, leaking_slice="mediastinum")
    set_params(tmp_path, "deidentify", remove_private_tags=False, max_quarantine_fraction=0.5)
    ingest.main()
    deidentify.main()
    out = tmp_path / "outputs" / "deidentify"
    index = pd.read_parquet(tmp_path / "outputs" / "ingest" / layout.INGEST_INDEX)
    row = list(index["source_path"]).index("ACC-70707070/mediastinum")
    quarantine = pd.read_csv(out / layout.DEID_QUARANTINE)
    assert list(quarantine["index_row"]) == [row] and list(quarantine["reason"]) == ["leak_found"]
    assert quarantine["detail"][0].startswith(f"one of the {SLICES} slices of the series: identifying values")
    manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
    assert len(manifest) == 2 and len(np.load(out / layout.IMAGES)) == 2
    # Nothing of the quarantined series is left: 18 slices in two folders, the manifest's.
    assert sorted(path.name for path in (out / "dicom").iterdir()) == sorted(manifest["image_key"])
    assert len(list((out / "dicom").rglob("*.dcm"))) == 2 * SLICES
    mediastinum_uids = {keyed_uid_of(SECRET, str(pydicom.dcmread(p).SOPInstanceUID))
                        for p in written["mediastinum"][1]}
    assert not {str(pydicom.dcmread(p).SOPInstanceUID) for p in (out / "dicom").rglob("*.dcm")} & mediastinum_uids
    assert len(pd.read_csv(out / layout.DEID_AUDIT)) == 2 * SLICES
    metrics = json.loads((tmp_path / "reports" / "deidentify.json").read_text())
    assert (metrics["series_quarantined"], metrics["series_deidentified"],
            metrics["quarantined_leak_found"]) == (1, 2, 1)


def test_a_flagged_slice_leaves_its_series_out_or_has_its_regions_blanked(tmp_path, monkeypatch):
    """A slice flagged Burned In Annotation YES (its pixels clean to the reader): without
    burned_in_regions its whole series is left out; with them that slice is blanked there and
    its series' volume redone from the de-identified slices."""
    written = project(tmp_path, monkeypatch, flagged_slice="other")
    set_params(tmp_path, "deidentify", max_quarantine_fraction=0.5)
    ingest.main()
    deidentify.main()
    out, ingested = tmp_path / "outputs" / "deidentify", tmp_path / "outputs" / "ingest"
    index = pd.read_parquet(ingested / layout.INGEST_INDEX)
    other = list(index["source_path"]).index("ACC-80808080/other")
    manifest, audit = pd.read_parquet(out / layout.DEID_MANIFEST), pd.read_csv(out / layout.DEID_AUDIT)
    assert len(manifest) == 2 and sorted(p.name for p in (out / "dicom").iterdir()) == sorted(manifest["image_key"])
    np.testing.assert_array_equal(np.load(out / layout.IMAGES), np.delete(np.load(ingested / layout.IMAGES), other, 0))
    actions = audit["burned_in_action"].fillna("").value_counts().to_dict()
    assert actions == {"": 2 * SLICES, "excluded": 1, "excluded: with its series": SLICES - 1}
    assert audit["burned_in"].dropna().tolist() == ["no identifying text read; header rule: BurnedInAnnotation YES"]
    metrics = json.loads((tmp_path / "reports" / "deidentify.json").read_text())
    assert (metrics["series_burned_in_excluded"], metrics["series_quarantined"]) == (1, 0)

    set_params(tmp_path, "deidentify", burned_in_regions=[[0.0, 0.0, 0.5, 1.0]])  # the top half
    deidentify.main()
    manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
    assert len(manifest) == 3
    sources = {keyed_uid_of(SECRET, str(ds.SOPInstanceUID)): ds.pixel_array
               for ds in map(pydicom.dcmread, written["other"][1])}
    changed = []
    for path in (out / manifest["dicom_file"][other]).iterdir():
        ds = pydicom.dcmread(path)
        source = sources[ds.SOPInstanceUID]
        if not np.array_equal(ds.pixel_array, source):
            changed.append(ds.SOPInstanceUID)
            assert (ds.pixel_array[:12] == source.min()).all()  # the top half, at the lowest value
            np.testing.assert_array_equal(ds.pixel_array[12:], source[12:])
            assert (source[:12] != source.min()).any()  # the ellipsoid was there
    assert len(changed) == 1 and len(sources) == SLICES
    volumes, before = np.load(out / layout.IMAGES), np.load(ingested / layout.IMAGES)
    np.testing.assert_array_equal(np.delete(volumes, other, 0), np.delete(before, other, 0))
    changed = np.flatnonzero((volumes[other] != before[other]).any(axis=(1, 2, 3)))
    assert 0 < len(changed) < volumes.shape[1]  # the planes near the blanked slice, not the volume


def test_volumes_without_their_slice_files_are_refused():
    index = pd.DataFrame({column: [None] for column in layout.INDEX_COLUMNS})
    index["row_key"], index["number_of_frames"] = "r1", 3
    volumes = np.zeros((1, 4, 8, 8, 1), dtype=np.uint8)
    with pytest.raises(DataError, match="series_files.parquet beside the volumes of images.npy is missing"):
        check_inputs(index, volumes, None)
    two = pd.DataFrame({"row_key": ["r1", "r1"], "source_path": ["a", "b"], "sha256": ["0", "1"],
                        "sop_instance_uid": ["1.2", "1.3"]})
    with pytest.raises(DataError, match=r"index row\(s\) 0 have 2 slice file\(s\) listed, expected .* \(3\)"):
        check_inputs(index, volumes, two)
    with pytest.raises(DataError, match="lists 2 slice file"):
        check_inputs(index, np.zeros((1, 8, 8), dtype=np.uint8), two)
    check_inputs(index, volumes, pd.concat([two, two.iloc[:1].assign(sop_instance_uid="1.4")]))
