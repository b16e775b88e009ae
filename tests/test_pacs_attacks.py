"""dicomflow's PACS edges attacked with real components (issue 31, items 4 and 6): a hostile DICOMweb server
(``http.server`` in a thread speaking just enough QIDO-RS and WADO-RS to lie), hostile pynetdicom peers against
``dicomflow listen``'s SCP, and credentials that must never show. Each test is an attack; it passes when the
attack fails."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomflow.pacs import connection
from dicomflow.pacs.connection import parse_address
from dicomflow.pacs.pull import instance_path, pull_studies, write_pull_report

ROOT = Path(__file__).resolve().parents[1]
SECRET = "hunter2-S3CRET-token"
PATIENT = "DOE^JOHN"
ACCESSION = "ACC123"


def dicom_bytes(*, study: str, series: str, sop: str, patient: str = "ANON", rows: int = 8) -> bytes:
    """A small, whole secondary-capture image (Part 10 bytes)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.7", sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID, ds.Modality = patient, "PID1", "OT"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((rows, rows), np.uint8).tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def multipart(part: bytes) -> tuple[bytes, str]:
    boundary = "hostileboundary"
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part
            + f"\r\n--{boundary}--\r\n".encode())
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def uid_item(study: str, *, accession: str = ACCESSION, series: str = "", sop: str = "") -> dict:
    item = {"0020000D": {"vr": "UI", "Value": [study]}, "00080050": {"vr": "SH", "Value": [accession]}}
    if series:
        item["0020000E"] = {"vr": "UI", "Value": [series]}
    if sop:
        item["00080018"] = {"vr": "UI", "Value": [sop]}
        item["00080016"] = {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.7"]}
    return item


class Hostile:
    """A DICOMweb server in a thread: ``answer(handler)`` writes each response; every request's path and
    Authorization header is kept in ``requests``."""

    def __init__(self, answer) -> None:
        self.requests: list[tuple[str, str | None]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests.append((self.path, self.headers.get("Authorization")))
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the client hung up
                    answer(self)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Hostile:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_json(handler, items: list) -> None:
    body = json.dumps(items).encode()
    handler.send_response(200)
    handler.send_header("Content-Type", "application/dicom+json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def send_bytes(handler, body: bytes, content_type: str, status: int = 200, reason: str | None = None) -> None:
    handler.send_response(status, reason)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Pacs:
    """One study; ``instances`` maps SOP Instance UID -> (series UID listed, the answer WADO-RS gives)."""

    def __init__(self, study: str, listed: list[dict], wado) -> None:
        self.study, self.listed, self.wado = study, listed, wado

    def __call__(self, handler) -> None:
        path = handler.path.split("?")[0]
        if path.endswith("/studies"):
            send_json(handler, [uid_item(self.study)])
        elif path.endswith("/instances") and "/series/" not in path:
            send_json(handler, self.listed)
        else:
            self.wado(handler, path)


def pull(url: str, out: Path, keys=(ACCESSION,), environ: dict | None = None):
    return pull_studies(parse_address(url, environ or {}), out=out, keys=list(keys), key="accession_number")


# --- pull: a hostile DICOMweb server -------------------------------------------------------------------


def test_qido_uids_with_slashes_or_dot_dot_never_reach_a_wado_path_or_a_file(tmp_path):
    study, series, good = generate_uid(), generate_uid(), generate_uid()
    listed = [uid_item(study, series=series, sop="../../../studies"), uid_item(study, series="1.2/../3", sop="1.2.3"),
              uid_item(study, series=series, sop="1.2\n3"), uid_item(study, series=series, sop=good)]

    def wado(handler, path):
        send_bytes(handler, *multipart(dicom_bytes(study=study, series=series, sop=good)))

    with Hostile(Pacs(study, listed, wado)) as server:
        result = pull(server.url, tmp_path)
    wado_paths = [path for path, _ in server.requests if "/series/" in path]
    assert wado_paths == [f"/dicom-web/studies/{study}/series/{series}/instances/{good}"]
    assert result.fetched == 1 and instance_path(tmp_path, study, good).exists()
    assert "malformed UID" in result.rows[0].reason
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [instance_path(tmp_path, study, good).name]


def test_qido_answering_other_studies_than_the_accession_asked_pulls_none_of_them(tmp_path):
    asked, other = generate_uid(), generate_uid()
    sop_of = {asked: generate_uid(), other: generate_uid()}

    def answer(handler):
        path = handler.path.split("?")[0]
        if path.endswith("/studies"):  # every study it has, whatever was asked
            send_json(handler, [uid_item(asked), uid_item(other, accession="SOMEONE-ELSE")])
        elif path.endswith("/instances"):
            study = path.split("/studies/")[1].split("/")[0]
            send_json(handler, [uid_item(study, series="1.2", sop=sop_of[study])])
        else:
            study = path.split("/studies/")[1].split("/")[0]
            send_bytes(handler, *multipart(dicom_bytes(study=study, series="1.2", sop=sop_of[study])))

    with Hostile(answer) as server:
        result = pull(server.url, tmp_path)
    assert [row.study_instance_uid for row in result.rows] == [asked]
    assert not any(other in path for path, _ in server.requests)
    assert result.fetched == 1


def test_qido_listing_an_instance_of_another_study_does_not_fetch_it(tmp_path):
    study, foreign = generate_uid(), generate_uid()
    listed = [uid_item(foreign, series="1.2", sop="1.2.3")]

    def wado(handler, path):  # pragma: no cover - must not be asked
        send_bytes(handler, *multipart(dicom_bytes(study=foreign, series="1.2", sop="1.2.3")))

    with Hostile(Pacs(study, listed, wado)) as server:
        result = pull(server.url, tmp_path)
    assert result.fetched == 0 and not any("/series/" in path for path, _ in server.requests)


def test_wado_answering_another_instance_than_asked_is_not_written(tmp_path):
    study, series, asked, good = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    listed = [uid_item(study, series=series, sop=asked), uid_item(study, series=series, sop=good)]

    def wado(handler, path):
        sop = path.rsplit("/", 1)[1]
        if sop == asked:  # someone else's image under the asked name
            send_bytes(handler, *multipart(dicom_bytes(study=generate_uid(), series=series, sop=generate_uid())))
        else:
            send_bytes(handler, *multipart(dicom_bytes(study=study, series=series, sop=good)))

    with Hostile(Pacs(study, listed, wado)) as server:
        result = pull(server.url, tmp_path)
    assert not instance_path(tmp_path, study, asked).exists() and instance_path(tmp_path, study, good).exists()
    assert result.rows[0].failed == 1 and "another instance" in result.rows[0].reason


def test_wado_answers_that_are_not_dicom_fail_only_their_instance(tmp_path):
    study, series = generate_uid(), generate_uid()
    sops = [generate_uid() for _ in range(4)]
    listed = [uid_item(study, series=series, sop=sop) for sop in sops]
    bad = {sops[0]: b"<html>not dicom</html>", sops[1]: dicom_bytes(study=study, series=series, sop=sops[1])[:300],
           sops[2]: b"\x00" * 128 + b"DICM" + b"\xff" * 50}

    def wado(handler, path):
        sop = path.rsplit("/", 1)[1]
        send_bytes(handler, *multipart(bad.get(sop) or dicom_bytes(study=study, series=series, sop=sop)))

    with Hostile(Pacs(study, listed, wado)) as server:
        result = pull(server.url, tmp_path)
    assert result.fetched == 1 and instance_path(tmp_path, study, sops[3]).exists()
    assert result.rows[0].failed == 3
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]


@pytest.mark.parametrize("declared", [True, False], ids=["declared-length", "endless"])
def test_a_huge_or_endless_wado_answer_is_cut_off(tmp_path, monkeypatch, declared):
    monkeypatch.setattr(connection, "MAX_ANSWER_BYTES", 1024 ** 2)
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    sent = []

    def wado(handler, path):
        handler.send_response(200)
        handler.send_header("Content-Type", 'multipart/related; type="application/dicom"; boundary=b')
        if declared:
            handler.send_header("Content-Length", str(50 * 1024 ** 3))
        handler.end_headers()
        chunk = b"\0" * 65536
        for _ in range(50 * 16):  # 50 MiB at most, far past the cap; a real attacker never stops
            handler.wfile.write(chunk)
            sent.append(len(chunk))

    with Hostile(Pacs(study, [uid_item(study, series=series, sop=sop)], wado)) as server:
        result = pull(server.url, tmp_path)
    assert result.rows[0].failed == 1 and "answer too large" in result.rows[0].reason
    assert sum(sent) < 50 * 1024 ** 2  # the client hung up


def test_a_reason_phrase_or_body_echoing_the_patient_reaches_neither_log_nor_report(tmp_path, caplog):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()

    def wado(handler, path):
        send_bytes(handler, f"no such image for {PATIENT} {ACCESSION}".encode(), "text/plain", 404,
                   f"Not Found: patient {PATIENT} accession {ACCESSION}")

    caplog.set_level(logging.DEBUG)
    with Hostile(Pacs(study, [uid_item(study, series=series, sop=sop)], wado)) as server:
        result = pull(server.url, tmp_path)
    report = write_pull_report(result, tmp_path / "report.csv")
    reason = result.rows[0].reason
    assert reason == "WADO-RS HTTP 404 Not Found"
    assert PATIENT not in report.read_text() and PATIENT not in caplog.text and result.summary().count(PATIENT) == 0


def test_a_redirect_to_another_host_does_not_carry_the_token(tmp_path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()

    def elsewhere(handler):
        send_bytes(handler, *multipart(dicom_bytes(study=study, series=series, sop=sop)))

    with Hostile(elsewhere) as thief:
        def wado(handler, path):
            handler.send_response(302)
            # another host name for this machine: requests treats it as another host
            handler.send_header("Location", f"http://localhost:{thief.port}{path}")
            handler.send_header("Content-Length", "0")
            handler.end_headers()

        with Hostile(Pacs(study, [uid_item(study, series=series, sop=sop)], wado)) as server:
            pull(server.url, tmp_path, environ={connection.TOKEN_ENV: SECRET})
    assert all(auth == f"Bearer {SECRET}" for _, auth in server.requests)
    assert thief.requests and all(auth is None for _, auth in thief.requests)


def test_a_broken_qido_json_item_does_not_end_the_pull(tmp_path):
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    listed = [{"00080018": "not an element"}, {"00080018": {"Value": [{"nested": 1}]}}, [1, 2],
              uid_item(study, series=series, sop=sop)]

    def wado(handler, path):
        send_bytes(handler, *multipart(dicom_bytes(study=study, series=series, sop=sop)))

    with Hostile(Pacs(study, listed, wado)) as server:
        result = pull(server.url, tmp_path)
    assert result.fetched == 1
