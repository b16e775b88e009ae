"""``dicomflow pacs pull`` and :func:`dicomflow.pacs.pull.pull_studies` against a real Orthanc (tests/orthanc.py),
seeded through its REST API: by a labels table (accession numbers, Study Instance UIDs) and by a modality and
date query, over DICOMweb (QIDO-RS, WADO-RS) and DIMSE (C-FIND with C-GET or C-MOVE). The pulled files are the
stored ones (SOP Instance UIDs, pixel data bytes, compressed transfer syntaxes kept), a second pull fetches only
what is missing, a study the PACS lacks is listed with its reason, and refused credentials end in one line."""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from orthanc import COMPRESSED, compressed_copy, free_port

from dicomflow.errors import DataError, SettingsError
from dicomflow.pacs.connection import PacsError, parse_address
from dicomflow.pacs.pull import (
    PULL_FOLDER,
    StudyQuery,
    instance_path,
    keys_from_labels,
    partial_path,
    pull_studies,
)

ROOT = Path(__file__).resolve().parents[1]
MOVE_PORT = free_port()


class Seeded:
    """The studies put into Orthanc, by accession number: their UIDs and source files."""

    def __init__(self) -> None:
        self.files: dict[str, list[Path]] = {}
        self.study_uid: dict[str, str] = {}

    def sop_uids(self, *accessions: str) -> set[str]:
        return {pydicom.dcmread(path).SOPInstanceUID for accession in accessions for path in self.files[accession]}


@pytest.fixture(scope="module")
def seeded(orthanc_factory, make_dicom, tmp_path_factory):
    """Orthanc (knowing AE title DICOMFLOW, C-MOVE to MOVE_PORT) with three studies:
    ACC-A: two DX images of 2024-01-10, uncompressed; ACC-B: four compressed MR/NM/OT images of 2024-02-20;
    ACC-C: one CT image of 2023-05-05."""
    server = orthanc_factory(modalities={"DICOMFLOW": ("127.0.0.1", MOVE_PORT)})
    folder = tmp_path_factory.mktemp("seed")
    seeds = Seeded()
    for accession, modality, date in (("ACC-A", "DX", "20240110"), ("ACC-C", "CT", "20230505")):
        study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        count = 2 if accession == "ACC-A" else 1
        seeds.study_uid[accession] = study
        seeds.files[accession] = [
            make_dicom(folder / f"{accession}-{i}.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * (i + 1),
                       StudyInstanceUID=study, SeriesInstanceUID=series, AccessionNumber=accession,
                       Modality=modality, StudyDate=date, PatientID=f"P-{accession}")
            for i in range(count)]
    # One series of four SOP classes: fetched whole by one C-GET (or C-MOVE) request at series level.
    study, series = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    seeds.study_uid["ACC-B"] = study
    seeds.files["ACC-B"] = [compressed_copy(name, folder / f"ACC-B-{name}", StudyInstanceUID=study,
                                            SeriesInstanceUID=series, AccessionNumber="ACC-B",
                                            StudyDate="20240220", PatientID="P-ACC-B", PatientName="B^B")
                            for name in COMPRESSED]
    for paths in seeds.files.values():
        for path in paths:
            server.upload(path)
    seeds.server = server
    return seeds


def web(server, **environ: str):
    return parse_address(server.dicomweb_url, {"DICOMFLOW_PACS_USERNAME": server.user,
                                               "DICOMFLOW_PACS_PASSWORD": server.password, **environ})


def dimse(server, **environ: str):
    return parse_address(f"dicom://{server.aet}@127.0.0.1:{server.dicom_port}", environ)


def pulled(out: Path) -> dict[str, pydicom.Dataset]:
    """The pulled files, by SOP Instance UID (every one under its hashed name)."""
    found = {}
    for path in sorted((out / PULL_FOLDER).rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        assert path == instance_path(out, ds.StudyInstanceUID, ds.SOPInstanceUID)
        found[ds.SOPInstanceUID] = ds
    return found


def assert_same_as_stored(out: Path, seeds: Seeded, *accessions: str) -> None:
    got = pulled(out)
    assert set(got) == seeds.sop_uids(*accessions)
    for accession in accessions:
        for path in seeds.files[accession]:
            source = pydicom.dcmread(path)
            copy = got[source.SOPInstanceUID]
            assert copy.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
            assert copy.PixelData == source.PixelData


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


def read_report(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["value"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_cli_pulls_a_labels_tables_studies_over_dicomweb_lists_the_missing_one_and_resumes(seeded, tmp_path):
    server = seeded.server
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,label\nACC-A,0\nACC-A,0\nACC-B,1\nACC-MISSING,1\n")
    env = {"DICOMFLOW_PACS_USERNAME": server.user, "DICOMFLOW_PACS_PASSWORD": server.password}
    args = ("pacs", "pull", "--from", server.dicomweb_url, "--labels", str(labels), "--key", "accession_number",
            "--out", str(tmp_path / "data"), "--report", str(tmp_path / "pull_report.csv"))
    first = run_cli(*args, env=env, cwd=tmp_path)
    assert first.returncode == 1  # ACC-MISSING
    assert "2 study(ies), 6 instance(s) fetched, 0 already there, 1 key(s) the PACS has no study for" in first.stderr
    for secret_or_key in (server.password, "ACC-", seeded.study_uid["ACC-A"]):
        assert secret_or_key not in first.stdout + first.stderr
    assert_same_as_stored(tmp_path / "data", seeded, "ACC-A", "ACC-B")
    report = read_report(tmp_path / "pull_report.csv")
    assert report["ACC-MISSING"]["reason"] == "not found: the PACS has no study with this accession_number"
    assert (report["ACC-B"]["study_instance_uid"], report["ACC-B"]["instances"], report["ACC-B"]["fetched"]) == (
        seeded.study_uid["ACC-B"], "4", "4")

    # Interrupted: two files gone, one of them half-written under its temporary name.
    files = sorted((tmp_path / "data" / PULL_FOLDER).rglob("*.dcm"))
    half = partial_path(files[0])
    half.write_bytes(files[0].read_bytes()[:100])
    files[0].unlink()
    files[3].unlink()
    result = pull_studies(web(server), out=tmp_path / "data", keys=["ACC-A", "ACC-B"])
    assert (result.fetched, result.already_present, result.failed_instances) == (2, 4, 0)
    assert not result.incomplete
    assert not half.exists()
    assert_same_as_stored(tmp_path / "data", seeded, "ACC-A", "ACC-B")


def count_requests(monkeypatch) -> Counter:
    """Count the C-GET/C-MOVE identifiers the DIMSE backend builds: per series and per instance."""
    from dicomflow.pacs.pull import _Dimse

    counts: Counter = Counter()
    for level, name in (("series", "_series_identifier"), ("instance", "_identifier")):
        original = getattr(_Dimse, name)

        def counted(*args, _original=original, _level=level):
            counts[_level] += 1
            return _original(*args)

        monkeypatch.setattr(_Dimse, name, staticmethod(counted))
    return counts


@pytest.mark.slow
def test_c_get_by_study_uid_keeps_the_compressed_syntaxes_and_fetches_only_what_is_missing(seeded, tmp_path,
                                                                                             monkeypatch):
    server = seeded.server
    requests = count_requests(monkeypatch)
    keys = [seeded.study_uid["ACC-B"], seeded.study_uid["ACC-C"], "1.2.826.0.1.3680043.10.999"]
    result = pull_studies(dimse(server), out=tmp_path, keys=keys, key="study_instance_uid", retrieve="get")
    assert (result.fetched, result.already_present, result.failed_instances) == (5, 0, 0)
    assert requests == {"series": 1, "instance": 1}  # ACC-B's series whole, ACC-C's one instance
    assert [row.value for row in result.incomplete] == ["1.2.826.0.1.3680043.10.999"]
    assert result.incomplete[0].reason == "not found: the PACS has no study with this study_instance_uid"
    assert_same_as_stored(tmp_path, seeded, "ACC-B", "ACC-C")
    compressed = {pydicom.dcmread(path).file_meta.TransferSyntaxUID for path in seeded.files["ACC-B"]}
    assert len(compressed) == 4  # JPEG 2000, RLE, JPEG lossless, JPEG-LS: each came as stored
    assert compressed <= {ds.file_meta.TransferSyntaxUID for ds in pulled(tmp_path).values()}

    gone = instance_path(tmp_path, seeded.study_uid["ACC-B"], pydicom.dcmread(seeded.files["ACC-B"][1]).SOPInstanceUID)
    gone.unlink()
    requests.clear()
    again = pull_studies(dimse(server), out=tmp_path, keys=keys[:2], key="study_instance_uid", retrieve="get")
    assert (again.fetched, again.already_present, again.failed_instances) == (1, 4, 0)
    assert requests == {"instance": 1}  # only the missing one
    assert_same_as_stored(tmp_path, seeded, "ACC-B", "ACC-C")


@pytest.mark.slow
def test_c_get_of_more_sop_classes_than_one_association_can_propose(seeded, make_dicom, tmp_path):
    from pynetdicom import AllStoragePresentationContexts

    from dicomflow.pacs.pull import SOP_CLASSES_PER_ASSOCIATION, Instance, _Dimse

    # 13 SOP classes at 10 presentation contexts each: over the 128 of one association.
    server = seeded.server
    classes = [context.abstract_syntax for context in AllStoragePresentationContexts][:SOP_CLASSES_PER_ASSOCIATION + 1]
    study = pydicom.uid.generate_uid()
    for number, sop_class in enumerate(classes):
        path = make_dicom(tmp_path / "seed" / f"{number}.dcm", np.full((4, 4), number, np.uint8),
                          SOPClassUID=sop_class, StudyInstanceUID=study, AccessionNumber="ACC-D", Modality="OT",
                          StudyDate="19990101", PatientID="P-ACC-D")
        assert pydicom.dcmread(path).file_meta.MediaStorageSOPClassUID == sop_class
        server.upload(path)
    result = pull_studies(dimse(server), out=tmp_path / "data", keys=["ACC-D"], retrieve="get")
    assert (result.fetched, result.failed_instances) == (len(classes), 0)
    assert {ds.SOPClassUID for ds in pulled(tmp_path / "data").values()} == set(classes)

    # A PACS whose C-FIND leaves the SOP class out: C-GET proposes the common image classes.
    backend = _Dimse(dimse(server), retrieve="get", move_port=0, move_host=None)
    series, sop, sop_class = next(found for found in backend.find_instances(seeded.study_uid["ACC-A"]))
    target = tmp_path / "unknown" / "one.dcm"
    outcome = list(backend.retrieve([Instance(seeded.study_uid["ACC-A"], series, sop, "", target)], {}))
    backend.close()
    assert [failure for _, failure in outcome] == [None]
    assert pydicom.dcmread(target).SOPInstanceUID == sop


@pytest.mark.slow
def test_a_modality_and_date_query_over_c_move_and_over_dicomweb(seeded, tmp_path, monkeypatch):
    server = seeded.server
    requests = count_requests(monkeypatch)
    result = pull_studies(dimse(server), out=tmp_path / "move", query=StudyQuery("DX", "20240101", "20241231"),
                          retrieve="move", move_port=MOVE_PORT)
    assert (result.fetched, result.failed_instances, len(result.rows)) == (2, 0, 1)
    assert requests == {"series": 1}  # ACC-A's series in one C-MOVE
    assert_same_as_stored(tmp_path / "move", seeded, "ACC-A")

    result = pull_studies(web(server), out=tmp_path / "web", query=StudyQuery("CT", date_to="20231231"))
    assert result.fetched == 1
    assert_same_as_stored(tmp_path / "web", seeded, "ACC-C")
    none = pull_studies(web(server), out=tmp_path / "none", query=StudyQuery("CT", date_from="20250101"))
    assert [(row.key, row.reason) for row in none.incomplete] == [
        ("query", "not found: no study matches the query")]


@pytest.mark.slow
def test_refused_credentials_end_in_one_line_without_the_password(seeded, tmp_path):
    server = seeded.server
    wrong = "wrong-password-5d2c"
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,label\nACC-A,0\n")
    result = run_cli("pacs", "pull", "--from", server.dicomweb_url, "--labels", str(labels), "--out",
                     str(tmp_path / "data"), env={"DICOMFLOW_PACS_USERNAME": server.user,
                                                  "DICOMFLOW_PACS_PASSWORD": wrong}, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {server.dicomweb_url} refused the credentials (HTTP 401); check DICOMFLOW_PACS_USERNAME and "
        "DICOMFLOW_PACS_PASSWORD"]
    assert wrong not in result.stdout + result.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_no_credentials_are_taken_from_a_netrc(seeded, tmp_path, monkeypatch):
    server = seeded.server
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login {server.user} password {server.password}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(PacsError, match=r"refused the credentials \(HTTP 401\); no credentials were given"):
        pull_studies(parse_address(server.dicomweb_url, {}), out=tmp_path / "data", keys=["ACC-A"])


@pytest.mark.slow
def test_an_ae_title_the_pacs_does_not_know_is_refused(seeded, tmp_path):
    with pytest.raises(PacsError, match="rejected the association from AE title STRANGER"):
        pull_studies(dimse(seeded.server, DICOMFLOW_AE_TITLE="STRANGER"), out=tmp_path, keys=["ACC-A"])


class TlsFront:
    """TLS (Python's ssl) in front of Orthanc's HTTP port: https:// to the real PACS behind it."""

    def __init__(self, backend_port: int, certificate: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(certificate), str(key))
        self.backend_port = backend_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()

    def serve(self, client: socket.socket) -> None:
        try:
            secure = self.context.wrap_socket(client, server_side=True)
        except (ssl.SSLError, OSError):  # a client that does not trust us hangs up
            client.close()
            return
        backend = socket.create_connection(("127.0.0.1", self.backend_port))

        def pump(source: socket.socket, sink: socket.socket) -> None:
            try:
                while data := source.recv(65536):
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for end in (source, sink):
                    with contextlib.suppress(OSError):
                        end.shutdown(socket.SHUT_RDWR)

        threading.Thread(target=pump, args=(backend, secure), daemon=True).start()
        pump(secure, backend)

    def close(self) -> None:
        self.listener.close()


@pytest.mark.slow
def test_https_with_the_ca_bundle_from_the_environment(seeded, tmp_path):
    from test_pacs_push import write_tls_files

    server = seeded.server
    tls = write_tls_files(tmp_path)
    front = TlsFront(server.http_port, tls["server_cert"], tls["server_key"])
    try:
        url = f"https://localhost:{front.port}/dicom-web"
        trusted = parse_address(url, {"DICOMFLOW_PACS_USERNAME": server.user,
                                      "DICOMFLOW_PACS_PASSWORD": server.password,
                                      "DICOMFLOW_PACS_CA_BUNDLE": str(tls["ca"])})
        result = pull_studies(trusted, out=tmp_path / "data", keys=["ACC-C"])
        assert (result.fetched, result.failed_instances) == (1, 0)
        assert_same_as_stored(tmp_path / "data", seeded, "ACC-C")

        untrusted = parse_address(url, {"DICOMFLOW_PACS_USERNAME": server.user,
                                        "DICOMFLOW_PACS_PASSWORD": server.password})
        with pytest.raises(PacsError, match="TLS handshake failed") as raised:
            pull_studies(untrusted, out=tmp_path / "other", keys=["ACC-C"])
        assert server.password not in str(raised.value)
    finally:
        front.close()


# Without a PACS


def test_the_labels_tables_keys_once_each_in_order(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,label\nA2,1\n A1 ,0\nA2,1\n,0\n")
    assert keys_from_labels(labels, "accession_number") == ["A2", "A1"]
    with pytest.raises(DataError, match="no column study_instance_uid"):
        keys_from_labels(labels, "study_instance_uid")
    with pytest.raises(SettingsError, match="--key must be one of"):
        keys_from_labels(labels, "path")


def test_keys_with_wildcards_are_never_sent_to_the_pacs(tmp_path):
    # Nothing listens on port 1: a key sent would fail the search.
    result = pull_studies(parse_address("dicom://PACS@127.0.0.1:1", {}), out=tmp_path, keys=["A*", "B?1"])
    assert [(row.value, row.reason) for row in result.incomplete] == [
        ("A*", "not searched: the key holds * ? or \\"), ("B?1", "not searched: the key holds * ? or \\")]
    assert "2 key(s) not searched" in result.summary()


def test_queries_are_checked():
    assert StudyQuery("DX", "20240101").date_range == "20240101-"
    assert StudyQuery("CT").date_range is None
    with pytest.raises(SettingsError, match="YYYYMMDD"):
        StudyQuery("DX", "2024-01-01")
    with pytest.raises(SettingsError, match="is after"):
        StudyQuery("DX", "20240201", "20240101")


def test_file_names_carry_no_identifier(tmp_path):
    path = instance_path(tmp_path, "1.2.3.4", "1.2.3.4.5")
    assert "1.2.3" not in str(path.relative_to(tmp_path))
    assert partial_path(path).name.startswith(".")  # ingest skips hidden entries


@pytest.mark.slow  # four interpreters
def test_the_cli_wants_a_table_or_a_query_and_c_move_a_port(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("accession_number,label\nA1,0\n")
    for args, expected in (
            (["--labels", str(labels), "--modality", "DX"], "either --labels CSV"),
            ([], "either --labels CSV"),
            (["--modality", "DX", "--key", "accession_number"], "--key goes with --labels"),
            (["--labels", str(labels), "--retrieve", "move"], "--retrieve move needs --move-port")):
        result = run_cli("pacs", "pull", "--from", "dicom://PACS@127.0.0.1:1", *args, env={}, cwd=tmp_path)
        assert result.returncode == 1
        assert expected in result.stderr
