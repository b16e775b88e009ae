"""The keyed digests of identifying values (dicomflow/deid/digests.py): what evaluate's leak scan
of its MLflow run reads instead of data/ and ingest's index."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomflow.deid.digests import read_digests, write_digests
from dicomflow.deid.identifiers import Identifiers, collect_identifiers
from dicomflow.deid.leaks import scan_paths

SECRET = b"test secret of the digests"


@pytest.fixture
def identifiers() -> Identifiers:
    found = Identifiers()
    for name in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm"):
        found.update(collect_identifiers(pydicom.dcmread(get_testdata_file(name))))
    found.add_name("Müller^Jürgen", "(0008,1070) Operators' Name")
    found.add_name("山田^太郎", "(0010,0010) Patient's Name")
    found.add_phone("+49 30 1234-5678", "(0010,2154) Patient's Telephone Numbers")
    return found


# Texts as they appear in logs, params and artifacts: values of the three test files' headers in
# other spellings, and texts that hold none of them.
CT = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
TEXTS = [
    f"patient {CT.PatientName.family_name.upper()} seen",
    f"id={CT.PatientID}",
    f"study uid {CT.StudyInstanceUID} copied",
    "operator MUELLER Juergen",
    "called 030 1234 5678 yesterday",
    "名前は山田太郎です",
    f"on {CT.StudyDate[6:8]}/{CT.StudyDate[4:6]}/{CT.StudyDate[:4]}",
    "an ordinary log line about epochs and losses",
    "loss 0.4312 auc 0.81 at 2026-12-01",
    "鈴木花子",
]


def test_digests_find_what_the_values_find(identifiers, tmp_path):
    write_digests(identifiers, SECRET, tmp_path / "digests.json")
    digested = read_digests(tmp_path / "digests.json", SECRET)
    expected = [identifiers.first(text) for text in TEXTS]
    assert [digested.first(text) for text in TEXTS] == expected
    assert all(expected[:7]) and not any(expected[7:])  # the texts are what they claim to be
    assert len(digested) == len(identifiers)


def test_the_file_holds_none_of_the_values(identifiers, tmp_path):
    write_digests(identifiers, SECRET, tmp_path / "digests.json")
    text = (tmp_path / "digests.json").read_text()
    assert CT.PatientID not in text and str(CT.StudyInstanceUID) not in text and CT.StudyDate not in text
    assert scan_paths(identifiers, [tmp_path / "digests.json"]) == []


def test_another_secret_is_refused_not_scanned_with(identifiers, tmp_path):
    write_digests(identifiers, SECRET, tmp_path / "digests.json")
    with pytest.raises(ValueError, match="another de-identification secret"):
        read_digests(tmp_path / "digests.json", b"another secret")


def test_evaluates_leak_check_finds_a_value_in_the_run_from_the_digests(identifiers, tmp_path, monkeypatch):
    import mlflow

    from dicomflow.evaluation.promotion import check_run
    from dicomflow.errors import DataError

    write_digests(identifiers, SECRET, tmp_path / "digests.json")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("digests")
    try:
        notes = tmp_path / "notes.txt"
        notes.write_text(f"study {CT.StudyInstanceUID} reviewed\n")
        with mlflow.start_run() as run:
            mlflow.log_params({"train.lr": 0.01, "cohort": f"{CT.PatientName.family_name} cohort"})
            with mlflow.start_run(nested=True):
                mlflow.log_artifact(str(notes), artifact_path="reports")
        with pytest.raises(DataError, match=r"leak check: 2 identifying value\(s\) in MLflow.*"
                                             r"a \(0010,0010\) Patient's Name value at MLflow run"):
            check_run(run.info.run_id, digests_file=tmp_path / "digests.json", secret=SECRET)
        with mlflow.start_run() as clean:
            mlflow.log_params({"train.lr": 0.01})
        check_run(clean.info.run_id, digests_file=tmp_path / "digests.json", secret=SECRET)
        with pytest.raises(DataError, match="another de-identification secret"):
            check_run(clean.info.run_id, digests_file=tmp_path / "digests.json", secret=b"other")
    finally:
        mlflow.set_tracking_uri(None)
