"""Leak scanner: identifiers found in every kind of file and in MLflow runs, and the command."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicomflow import cli
from dicomflow.config import layout
from dicomflow.deid.leaks import Leak, scan_mlflow_run, scan_paths, summarise_leaks
from dicomflow.deid.identifiers import Identifiers, collect_identifiers

NAME, PATIENT_ID, BIRTH_DATE = "Quixley^Bartholomew", "MRN-55501234", "19270315"


def source_dataset() -> Dataset:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = NAME, PATIENT_ID, BIRTH_DATE
    ds.InstitutionName = "Saint Elsewhere Hospital"
    return ds


@pytest.fixture
def identifiers() -> Identifiers:
    return collect_identifiers(source_dataset())


def test_identifiers_are_normalised_names_and_dates(identifiers):
    for text in ("quixley", "BARTHOLOMEW", "Quixley Bartholomew", "bartholomew quixley",
                 "QUIXLEY, Bartholomew", "QuixleyBartholomew", "19270315", "1927-03-15",
                 "15/03/1927", "03/15/1927", "15.03.1927", "15 March 1927", "Mar 15, 1927"):
        assert identifiers.first(f"note: {text}") is not None, text
    assert identifiers.first("born 1927-03-15") == "(0010,0030) Patient's Birth Date"


def hospital_source() -> Dataset:
    """Names as European and Asian exports write them (three component groups, two-character
    CJK names), a telephone number."""
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.OtherPatientNames = ["Müller^Jürgen", "王^小东", "Иванова^Анна"]
    ds.PatientTelephoneNumbers = "+49 30 1234567"
    ds.PatientID = "KNH4471123"
    return ds


def test_a_sites_implementation_name_is_searched_but_pydicoms_default_is_not():
    """A model's requirements.txt says pydicom==3.0.2: a file written by pydicom (as import-photos
    writes them) must not make that line a leak, while a site's own software name stays searched."""
    written = Dataset()
    written.file_meta = pydicom.dataset.FileMetaDataset()
    written.file_meta.ImplementationVersionName = "PYDICOM " + ".".join(pydicom.__version_info__)
    written.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    assert collect_identifiers(written).first("pydicom==" + ".".join(pydicom.__version_info__)) is None
    assert collect_identifiers(written).first(pydicom.uid.PYDICOM_IMPLEMENTATION_UID) is None
    written.file_meta.ImplementationVersionName = "STMARYS_PACS7"
    assert collect_identifiers(written).first("exported by STMARYS_PACS7") == "(0002,0013) Implementation Version Name"


@pytest.mark.parametrize("text", [
    "allergic, told MUELLER Juergen", "Muller, Jurgen", "IVANOVA A.", "Иванова", "王小东 病人",
    "小东", "山田太郎", "たろう", "tarou yamada", "call 030-1234567", "tel (030) 123 45 67",
    "0049301234567", "record KNH4471123",
])
def test_scanner_reads_like_an_attacker(text):
    assert collect_identifiers(hospital_source()).first(text) is not None


@pytest.mark.parametrize("text", ["CHEST PA", "王", "Anne", "1234567890123456789012", "knh"])
def test_scanner_ignores_what_identifies_no_one(text):
    assert collect_identifiers(hospital_source()).first(text) is None


@pytest.mark.parametrize("encoding, name, attribute", [
    ("utf-8", "王小东", "(0010,1001) Other Patient Names"),
    ("gb18030", "王小东", "(0010,1001) Other Patient Names"),
    ("iso2022_jp", "山田太郎", "(0010,0010) Patient's Name"),
    ("utf-16-le", "王小东", "(0010,1001) Other Patient Names"),
    ("json", "王小东", "(0010,1001) Other Patient Names"),
])
def test_text_files_are_read_in_every_encoding_of_the_sources(tmp_path, encoding, name, attribute):
    source = hospital_source()
    source.SpecificCharacterSet = "GB18030"
    identifiers = collect_identifiers(source)
    identifiers.encodings |= {"iso2022_jp", "utf-16-le"}  # as if other sources declared them
    line = f"WARNING {name} skipped\n"
    content = (json.dumps({"note": line}).encode() if encoding == "json"
               else line.encode(encoding))
    (tmp_path / "stage.log").write_bytes(b"INFO ok\n" + content)
    (leak,) = scan_paths(identifiers, [tmp_path])
    assert leak.location.endswith("line 2") and leak.source == attribute


def test_hits_are_summarised_by_attribute_and_file_count_without_values():
    leaks = [Leak(f"dicom/{n}.dcm", "(0008,0070) Manufacturer", "(0010,0010) Patient's Name")
             for n in range(3)] + [Leak("audit.csv", "column 'note'", "(0010,0020) Patient ID")]
    assert summarise_leaks(leaks) == [
        "(0008,0070) Manufacturer: a (0010,0010) Patient's Name value in 3 output(s)",
        "column 'note': a (0010,0020) Patient ID value in 1 output(s)"]


@pytest.mark.parametrize("name, content, location", [
    ("report.csv", "key,note\nabc,seen BARTHOLOMEW quixley\n", "line 2"),
    ("metrics.json", json.dumps({"born": "1927-03-15"}), "line 1"),
    ("stage.log", "INFO ok\nINFO ok\nWARNING patient MRN-55501234 skipped\n", "line 3"),
    ("page.html", "<td>Saint Elsewhere Hospital</td>", "line 1"),
])
def test_text_files_are_searched_line_by_line(tmp_path, identifiers, name, content, location):
    (tmp_path / name).write_text(content)
    (leak,) = scan_paths(identifiers, [tmp_path])
    assert (leak.output, leak.location) == ((tmp_path / name).as_posix(), location)
    assert NAME not in repr(leak) and PATIENT_ID not in repr(leak)  # a hit never quotes the value


def test_parquet_cells_and_column_names_dicom_elements_and_model_zips(tmp_path, identifiers):
    pd.DataFrame({"key": ["a"], "MRN-55501234": [1]}).to_parquet(tmp_path / "t.parquet")
    pd.DataFrame({"note": ["by 15.03.1927"]}).to_parquet(tmp_path / "u.parquet")
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", "1.2.3.4"
    item = Dataset()
    item.PersonName = "Bartholomew^Quixley"
    ds.ContentSequence = [item]
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    with zipfile.ZipFile(tmp_path / "model.keras", "w") as archive:
        archive.writestr("config.json", json.dumps({"name": "saint elsewhere hospital model"}))
        archive.writestr("model.weights.h5", b"\x00" * 64)
    leaks = {(Path(leak.output).name, leak.location) for leak in scan_paths(identifiers, [tmp_path])}
    assert leaks == {("t.parquet", "column names"), ("u.parquet", "column 'note'"),
                     ("x.dcm", "(0040,A730) Content Sequence > (0040,A123) Person Name"),
                     ("model.keras", "config.json line 1")}


def test_clean_files_and_numeric_arrays_give_no_hits(tmp_path, identifiers):
    (tmp_path / "ok.csv").write_text("key,label\n2.25.19270315000,1\nmrn,0\n")
    np.save(tmp_path / "images.npy", np.frombuffer(PATIENT_ID.encode() * 4, dtype=np.uint8))
    assert scan_paths(identifiers, [tmp_path]) == []


@pytest.mark.parametrize("text, hit", [
    ("quixley_chest.dcm", True),        # a name next to digits, underscores, punctuation counts
    ("by Quixley2", True),
    ("image.quixley", True),
    ("Quixleyfied code words", False),  # inside a longer word of letters it is another word
    ("unquixley", False),
])
def test_a_name_counts_as_a_word_not_inside_a_longer_one(tmp_path, identifiers, text, hit):
    (tmp_path / "notes.txt").write_text(text)
    assert bool(scan_paths(identifiers, [tmp_path])) is hit


def test_a_missing_path_is_an_error(tmp_path, identifiers):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        scan_paths(identifiers, [tmp_path / "absent"])


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    """A real MLflow SQLite store in a temporary folder."""
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    mlflow.set_experiment("leaks")
    yield mlflow
    mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_mlflow_run_params_tags_children_and_artifacts_are_searched(tmp_path, tracking, identifiers):
    mlflow = tracking
    report = tmp_path / "notes.txt"
    report.write_text("reviewed for 1927-03-15\n")
    with mlflow.start_run() as run:
        mlflow.log_params({"train.lr": 0.01, "cohort": "Quixley"})
        mlflow.log_metric("auc", 0.9)
        with mlflow.start_run(nested=True):
            mlflow.set_tag("operator", "saint elsewhere hospital")
            mlflow.log_artifact(str(report), artifact_path="reports")
    leaks = scan_mlflow_run(identifiers, run.info.run_id)
    found = {(leak.output.split()[-1], leak.location, leak.source) for leak in leaks}
    assert ("param 'cohort'", "(0010,0010) Patient's Name") in {(loc, src) for _, loc, src in found}
    assert any(loc == "tag 'operator'" for _, loc, _ in found)
    assert any(out == "reports/notes.txt" and loc == "line 1" for out, loc, _ in found)
    assert len(leaks) == 3

    with mlflow.start_run() as clean:
        mlflow.log_params({"train.lr": 0.01})
    assert scan_mlflow_run(identifiers, clean.info.run_id) == []


@pytest.fixture
def ingested(tmp_path, monkeypatch) -> Path:
    """A project folder with one source file under data/ and its ingest index, as the working dir."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    ds = source_dataset()
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.99.10"
    (tmp_path / "data").mkdir()
    ds.save_as(tmp_path / "data" / "a.dcm", implicit_vr=False, little_endian=True)
    (tmp_path / "outputs" / "ingest").mkdir(parents=True)
    index = pd.DataFrame([{"source_path": "a.dcm", "patient_id": PATIENT_ID,
                           "accession_number": None, "study_instance_uid": None,
                           "series_instance_uid": None, "sop_instance_uid": ds.SOPInstanceUID}])
    index.to_parquet(tmp_path / "outputs" / "ingest" / layout.INGEST_INDEX)
    return tmp_path


def test_command_reads_identifiers_at_ingest_and_exits_1_on_a_hit(ingested, capsys):
    clean, dirty = ingested / "clean.csv", ingested / "dirty.log"
    clean.write_text("image_key,label\nab12,1\n")
    dirty.write_text("opened file of bartholomew\n")

    assert cli.main(["scan-leaks", str(clean)]) == 0
    assert cli.main(["scan-leaks", str(clean), str(dirty)]) == 1
    printed = capsys.readouterr().out
    assert "LEAK" in printed and "(0010,0010) Patient's Name" in printed
    assert "bartholomew" not in printed.casefold()


def _decompression_bomb_png(path):
    """A valid PNG of 20,000 x 20,000 black pixels in a few hundred kilobytes: Pillow refuses to
    decode it (DecompressionBombError), so its pixels cannot be searched."""
    import struct
    import zlib

    side = 20_000
    row = b"\x00" + b"\x00" * side  # filter byte + one grey byte per pixel
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.mark.slow
def test_pixels_that_cannot_be_decoded_fail_the_scan_without_quoting_them(ingested, capsys):
    from pydicom.data import get_testdata_file

    bomb = ingested / "bomb.png"
    _decompression_bomb_png(bomb)
    truncated = ingested / "truncated.dcm"
    # pydicom's own broken file: its pixel data is shorter than rows x columns says
    truncated.write_bytes(Path(get_testdata_file("MR_truncated.dcm")).read_bytes())
    clean = ingested / "clean.csv"
    clean.write_text("image_key,label\nab12,1\n")

    assert cli.main(["scan-leaks", str(clean)]) == 0
    capsys.readouterr()
    assert cli.main(["scan-leaks", str(clean), str(bomb), str(truncated)]) == 1
    printed = capsys.readouterr().out
    assert f"NOT READ {bomb.as_posix()}: pixel data" in printed
    assert f"NOT READ {truncated.as_posix()}: pixel data" in printed
    assert "LEAK" not in printed
    assert "0 hit(s)" in printed and "2 file(s) whose pixels could not be read" in printed


@pytest.mark.slow
def test_evaluate_refuses_a_run_holding_an_identifier(ingested, tracking):
    """Through the digests deidentify writes of what ingest read: evaluate sees no value."""
    from dicomflow.deid.digests import write_digests
    from dicomflow.deid.leaks import identifiers_at_ingest
    from dicomflow.evaluation.promotion import check_run
    from dicomflow.errors import DataError

    secret = b"a secret of the test"
    digests = ingested / "identifier_digests.json"
    write_digests(identifiers_at_ingest(ingested / "outputs" / "ingest", ingested / "data"), secret, digests)
    mlflow = tracking
    with mlflow.start_run() as clean:
        mlflow.log_param("train.lr", 0.01)
    check_run(clean.info.run_id, digests_file=digests, secret=secret)
    with mlflow.start_run() as dirty:
        mlflow.set_tag("note", "from saint elsewhere hospital")
    with pytest.raises(DataError, match=r"\(0008,0080\) Institution Name value .* not registered"):
        check_run(dirty.info.run_id, digests_file=digests, secret=secret)


def test_a_name_that_is_a_word_of_the_projects_code_counts_only_with_its_other_parts():
    """"Max" is a given name and ``max()``: logs and shipped code say it without leaking anyone."""
    ds = Dataset()
    ds.PatientName = "Long^Max"
    identifiers = collect_identifiers(ds)
    assert identifiers.first("pixel_max = max(values) for long runs") is None
    assert identifiers.first("seen: LONG Max") is not None and identifiers.first("Max Long") is not None


def test_names_in_the_projects_docstrings_and_sample_generator_stay_searchable():
    from dicomflow.deid.identifiers import project_words

    assert {"max", "low"} <= project_words()
    assert not {"muller", "ivanova", "quixley", "patel", "olga"} & project_words()
