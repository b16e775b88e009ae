"""dicomflow's PACS edges attacked with real components (issue 31, items 4 and 6): a hostile DICOMweb server
(``http.server`` in a thread speaking just enough QIDO-RS and WADO-RS to lie), hostile pynetdicom peers against
``dicomflow listen``'s SCP, and credentials that must never show. Each test is an attack; it passes when the
attack fails."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import csv
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pynetdicom import AE
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomflow.errors import SettingsError
from dicomflow.pacs import connection
from dicomflow.pacs.connection import parse_address
from dicomflow.pacs.listener import Listener
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


# --- listen: hostile DICOM peers ------------------------------------------------------------------------

LISTENER_AET, MODALITY_AET = "DICOMFLOW", "MODALITY"
SC = "1.2.840.10008.5.1.4.1.1.7"


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(body)) + body


def raw_associate(port: int, calling: bytes, called: bytes) -> int:
    """An A-ASSOCIATE-RQ written byte by byte (so that any AE title, padding or control characters
    included, can be sent); the PDU type answered: 2 accepted, 3 rejected."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, b"1.2.840.10008.1.1") + _item(0x40, b"1.2.840.10008.1.2"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16)[:16] + calling.ljust(16)[:16] + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context
            + _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4")))
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(struct.pack(">BBI", 1, 0, len(body)) + body)
        answer = connection.recv(1)
        with contextlib.suppress(OSError):  # abort politely: A-ABORT
            connection.sendall(struct.pack(">BBI", 7, 0, 4) + bytes(4))
    return answer[0]


@pytest.fixture
def listener(tmp_path):
    """A listener with no model (what it receives is scored as failed) and nowhere reachable to send:
    these attacks are on what it takes in."""
    made = []

    def make(**settings) -> Listener:
        created = Listener(spool=tmp_path / "spool", destination=parse_address("dicom://DEST@127.0.0.1:9", {}),
                           model=None, model_name="m", model_version="1", allow=[MODALITY_AET],
                           ae_title=LISTENER_AET, port=0, **settings).start()
        made.append(created)
        return created

    yield make
    for each in made:
        each.stop(grace_s=0.5)


def image(path: Path, **attributes) -> Path:
    study, series, sop = generate_uid(), generate_uid(), generate_uid()
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(study=study, series=series, sop=sop, rows=attributes.pop("rows", 8))))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def c_store(port: int, datasets: list, *, calling: str = MODALITY_AET, called: str = LISTENER_AET) -> list[int] | None:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return None
    try:
        return [int(association.send_c_store(each).Status) for each in datasets]
    finally:
        association.release()


@pytest.mark.parametrize("calling, called, accepted", [
    (b"MODALITY", b"DICOMFLOW", True),
    (b"MODALITY  ", b"DICOMFLOW ", True),  # trailing spaces are padding (PS3.5 6.2)
    (b"INTRUDER", b"DICOMFLOW", False),
    (b"MODALITY", b"SOMEONEELSE", False),
    (b"MODALITY\x1b[2J", b"DICOMFLOW", False),
    (b"MODALIT\nY", b"DICOMFLOW", False),
    (b"\\MODALITY", b"DICOMFLOW", False),
    (b"MODALITY", b"DICOMFLOW\x1b]0;", False),
], ids=["allowed", "padded", "not-allowed", "wrong-called", "ansi", "newline", "backslash", "ansi-called"])
def test_association_is_refused_unless_both_ae_titles_match_and_logs_hold_no_control_characters(
        listener, calling, called, accepted, caplog):
    caplog.set_level(logging.INFO)
    server = listener()
    answer = raw_associate(server.port, calling, called)
    # 2: accepted; 3: rejected (an AE title not allowed); 7: aborted (one DICOM forbids: control characters)
    assert answer == 2 if accepted else answer in (3, 7)
    logged = caplog.text
    assert "\x1b" not in logged and "\nY" not in logged
    if answer == 3:
        assert server.counts["refused_associations"] == 1
    assert not list((server.spool.root / "received").iterdir())


def test_odd_ae_titles_are_refused_when_the_listener_is_set_up():
    for title in ("MOD\x1bX", "MOD\nX", "MOD\\X", "MÖD"):
        with pytest.raises(SettingsError, match="AE title"):
            Listener(spool=Path("unused"), destination=None, model=None, model_name="m", model_version="1",
                     allow=[title], ae_title=LISTENER_AET)


def test_an_instance_larger_than_the_limit_is_refused_with_a_failure_status_and_never_spooled(listener, tmp_path):
    server = listener(max_instance_mib=1)
    big = pydicom.dcmread(image(tmp_path / "big.dcm", rows=2048))  # 4 MiB of pixels
    small = pydicom.dcmread(image(tmp_path / "small.dcm"))
    assert c_store(server.port, [big, small, big]) == [0xC001, 0x0000, 0xC001]  # a failure: not retried
    assert server.counts["too_large"] == 2 and server.counts["received"] == 1
    assert server.counts["cut_off"] == 2  # dropped while arriving: memory held no more than the limit
    spooled = [path for path in server.spool.root.rglob("*") if path.is_file() and path.suffix == ".dcm"]
    assert all(path.stat().st_size < 1024 ** 2 for path in spooled)
    assert not server._too_large  # nothing left marked


def test_a_limit_not_above_zero_is_refused():
    with pytest.raises(SettingsError, match="max-instance-mib"):
        Listener(spool=Path("unused"), destination=None, model=None, model_name="m", model_version="1",
                 allow=[MODALITY_AET], max_instance_mib=0)


def test_values_shaped_like_paths_or_escapes_reach_no_file_name_csv_cell_or_log(listener, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    server = listener()
    hostile = pydicom.dcmread(image(tmp_path / "hostile.dcm"))
    evil = "../../../../tmp/x\n\x1b[31m"
    hostile.SOPInstanceUID = hostile.file_meta.MediaStorageSOPInstanceUID = evil
    hostile.PatientName, hostile.PatientID, hostile.AccessionNumber = "EVIL\n\x1b[2J^X", "../../etc", "A\r\nB"
    assert c_store(server.port, [hostile]) == [0x0000]
    assert server.wait_until_idle(60)
    names = [path.name for path in server.spool.root.rglob("*")]
    assert all(re.fullmatch(r"[A-Za-z0-9_.\-]+", name) for name in names), names
    assert not (tmp_path / "x").exists() and not Path("/tmp/x\n\x1b[31m").exists()
    with (server.spool.root / "outcomes.csv").open(newline="") as handle:
        cells = [cell for row in csv.reader(handle) for cell in row]
    assert not any(char in cell for cell in cells for char in "\n\r\x1b") and not any("../" in c for c in cells)
    # pydicom's records (of both ends here) are withheld by dicomflow.runtime.log_privacy in the command.
    logged = "\n".join(record.getMessage() for record in caplog.records if not record.name.startswith("pydicom"))
    assert "\x1b" not in logged and "../" not in logged and "EVIL" not in logged


def test_a_non_image_sop_class_gets_no_presentation_context(listener):
    server = listener()
    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.88.11", ExplicitVRLittleEndian)  # Basic Text SR
    ae.add_requested_context(SC, ExplicitVRLittleEndian)
    association = ae.associate("127.0.0.1", server.port, ae_title=LISTENER_AET)
    try:
        assert [str(cx.abstract_syntax) for cx in association.accepted_contexts] == [SC]
    finally:
        association.release()


def test_a_truncated_data_set_is_taken_and_the_next_one_still_is(listener, tmp_path):
    server = listener()
    good = pydicom.dcmread(image(tmp_path / "good.dcm"))
    broken = pydicom.dcmread(image(tmp_path / "broken.dcm"))
    broken.PixelData = broken.PixelData[:10]  # shorter than Rows x Columns says
    assert c_store(server.port, [broken, good]) == [0x0000, 0x0000]
    assert server.wait_until_idle(60) and server.counts["failed"] == 2  # no model: both fail, neither sinks it


def test_more_associations_than_the_limit_at_once_are_refused(listener):
    server = listener()
    held = []
    try:
        for _ in range(server.max_associations):
            ae = AE(ae_title=MODALITY_AET)
            ae.add_requested_context(SC, ExplicitVRLittleEndian)
            held.append(ae.associate("127.0.0.1", server.port, ae_title=LISTENER_AET))
        assert all(each.is_established for each in held)
        assert raw_associate(server.port, b"MODALITY", b"DICOMFLOW") == 3
    finally:
        for each in held:
            each.release()


# --- credentials --------------------------------------------------------------------------------------


def test_a_secret_file_open_to_others_is_refused_and_a_private_one_read(tmp_path):
    token = tmp_path / "token"
    token.write_text(SECRET + "\n")
    token.chmod(0o644)
    with pytest.raises(SettingsError, match="open to group or others") as raised:
        parse_address("https://pacs.example.org/dicom-web", {connection.TOKEN_FILE_ENV: str(token)})
    assert SECRET not in str(raised.value) and "\n" not in str(raised.value)
    token.chmod(0o600)
    assert parse_address("https://pacs.example.org/dicom-web", {connection.TOKEN_FILE_ENV: str(token)}).token == SECRET


@pytest.mark.parametrize("address", ["http://10.1.2.3/dicom-web", "http://pacs.example.org:8042/dicom-web",
                                     "dicom://PACS@192.168.0.9:104"])
def test_credentials_over_plain_http_or_dicom_beyond_loopback_are_refused(address):
    with pytest.raises(SettingsError, match="refusing to send PACS credentials") as raised:
        parse_address(address, {connection.USERNAME_ENV: "ai", connection.PASSWORD_ENV: SECRET})
    assert SECRET not in str(raised.value)


def echo_credentials(handler) -> None:
    """A PACS that answers 401 and quotes the request's Authorization header back, in its reason phrase
    and its body (as some debugging proxies do)."""
    echoed = handler.headers.get("Authorization", "")
    length = int(handler.headers.get("Content-Length") or 0)
    if length:
        handler.rfile.read(length)
    send_bytes(handler, f"denied for {echoed}".encode(), "text/plain", 401, f"Unauthorized {echoed}")


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    environ = {key: value for key, value in os.environ.items()
               if not key.startswith("DICOMFLOW_") and key not in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy",
                                                                  "https_proxy")}
    environ.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], capture_output=True, text=True, cwd=cwd,
                          env=environ, timeout=300)


def secrets_in(text: str) -> list[str]:
    encoded = base64.b64encode(f"ai:{SECRET}".encode()).decode()
    return [secret for secret in (SECRET, encoded) if secret in text]


@pytest.mark.slow
def test_no_password_or_token_shows_on_refused_connections_tls_failures_or_echoing_peers(tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text(f"accession_number,label\n{ACCESSION},1\n")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    basic = {connection.USERNAME_ENV: "ai", connection.PASSWORD_ENV: SECRET}
    token = {connection.TOKEN_ENV: SECRET}
    objects = tmp_path / "objects"
    objects.mkdir()
    image(objects / "a.dcm")

    class Echo(Hostile):
        def __init__(self) -> None:
            super().__init__(echo_credentials)
            self.server.RequestHandlerClass.do_POST = self.server.RequestHandlerClass.do_GET

    with Echo() as echo:
        runs = {
            "refused": run_cli("pacs", "pull", "--from", f"http://127.0.0.1:{closed}/dicom-web", "--labels",
                               str(labels), "--out", "out", "--report", "r1.csv", env=basic, cwd=tmp_path),
            "tls": run_cli("pacs", "pull", "--from", f"https://127.0.0.1:{echo.port}/dicom-web", "--labels",
                           str(labels), "--out", "out", "--report", "r2.csv", env=token, cwd=tmp_path),
            "echo-pull": run_cli("pacs", "pull", "--from", echo.url, "--labels", str(labels), "--out", "out",
                                 "--report", "r3.csv", env=basic, cwd=tmp_path),
            "echo-push": run_cli("pacs", "push", str(objects), "--to", echo.url, "--attempts", "1", "--report",
                                 "r4.csv", env=token, cwd=tmp_path),
            "dimse-refused": run_cli("pacs", "push", str(objects), "--to", f"dicom://PACS@127.0.0.1:{closed}",
                                     "--attempts", "1", "--report", "r5.csv", env=basic, cwd=tmp_path),
        }
        assert any(auth for _, auth in echo.requests)  # the peer did get them, and echoed them
    for name, run in runs.items():
        assert run.returncode != 0, name
        assert not secrets_in(run.stdout + run.stderr), (name, run.stderr)
        assert "Traceback" not in run.stderr, (name, run.stderr)
    for report in tmp_path.glob("r*.csv"):
        assert not secrets_in(report.read_text()), report.name


# --- predict --dicom-out: odd sources, a planted link ------------------------------------------------------


def charset_source(charset, name: str) -> pydicom.Dataset:
    """A single-frame source, read back from its bytes, with ``name`` in ``charset``."""
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(study=generate_uid(), series=generate_uid(), sop=generate_uid())))
    ds.SpecificCharacterSet = charset
    ds.PatientName, ds.PatientID, ds.AccessionNumber = name, "ID\u00fc-1", "A1"
    ds.PatientBirthDate, ds.PatientSex, ds.StudyDate, ds.StudyTime, ds.StudyID = "", "O", "20200101", "120000", "1"
    ds.ReferringPhysicianName = ""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


@pytest.mark.parametrize("charset, name", [
    ("ISO_IR 100", "M\u00fcller^J\u00fcrgen"),
    ("ISO_IR 192", "\u5c71\u7530^\u592a\u90ce"),
    (["", "ISO 2022 IR 87"], "Yamada^Tarou=\u5c71\u7530^\u592a\u90ce"),
    (["ISO 2022 IR 6", "ISO 2022 IR 100"], "M\u00fcller^J\u00fcrgen\n\x1b[2J"),
], ids=["latin1", "utf8", "iso2022-japanese", "iso2022-latin1-escapes"])
def test_the_results_keep_the_patients_name_whatever_its_character_set(charset, name):
    from dicomflow.pacs.results import Finding, probability_segmentation, structured_report, utf8_source

    source = utf8_source(charset_source(charset, name))
    report = structured_report(source, Finding("binary", (0, 1), 1, 0.9, 0.5), model_name="m", model_version="1")
    segmentation = probability_segmentation(source, np.zeros((8, 8), np.float32), model_name="m", model_version="1",
                                            label="Grad-CAM class 1")
    for dataset in (report, segmentation):
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        back = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
        assert str(back.PatientName) == name
        assert str(back.PatientID) == "ID\u00fc-1"


def test_a_link_planted_under_an_objects_name_is_not_followed(tmp_path):
    from dicomflow.pacs.results import write_new

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    dataset = pydicom.dcmread(io.BytesIO(dicom_bytes(study=generate_uid(), series=generate_uid(), sop=generate_uid())))
    planted = out / f"{dataset.SOPInstanceUID}.dcm"
    planted.symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_new(planted, dataset)
    assert victim.read_text() == "keep me" and planted.is_symlink()
    fresh = write_new(out / "fresh.dcm", dataset)
    assert pydicom.dcmread(fresh).SOPInstanceUID == dataset.SOPInstanceUID


def test_a_c_find_peer_answering_other_or_malformed_studies_gets_none_of_them_fetched(tmp_path):
    from pynetdicom import evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    asked, other = generate_uid(), generate_uid()
    asked_levels = []

    def on_find(event):
        identifier = event.identifier
        asked_levels.append((str(identifier.QueryRetrieveLevel), str(identifier.get("StudyInstanceUID", ""))))
        if identifier.QueryRetrieveLevel != "STUDY":
            yield 0x0000, None  # no series: the study row says so
            return
        for study, accession in ((asked, ACCESSION), (other, "SOMEONE-ELSE"), ("../../1.2", ACCESSION),
                                 ("1.2.3\n\x1b[2J", ACCESSION)):
            answer = pydicom.Dataset()
            answer.QueryRetrieveLevel, answer.StudyInstanceUID, answer.AccessionNumber = "STUDY", study, accession
            yield 0xFF00, answer

    scp = AE(ae_title="PACS")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        result = pull(f"dicom://PACS@127.0.0.1:{server.server_address[1]}", tmp_path)
    finally:
        server.shutdown()
    assert [row.study_instance_uid for row in result.rows if row.study_instance_uid] == [asked]
    assert [study for level, study in asked_levels if level != "STUDY"] == [asked]
    assert any("malformed Study Instance UID" in row.reason for row in result.rows)
    assert "\x1b" not in result.summary() and all("\x1b" not in row.reason for row in result.rows)


@pytest.mark.parametrize("status", [200, 409])
def test_a_stow_answer_that_never_ends_fails_the_push_in_one_line(tmp_path, monkeypatch, status):
    from dicomflow.pacs.push import store_objects

    monkeypatch.setattr(connection, "MAX_ANSWER_BYTES", 1024 ** 2)
    objects = [image(tmp_path / f"{n}.dcm") for n in range(2)]

    def endless(handler):
        handler.rfile.read(int(handler.headers.get("Content-Length") or 0))
        handler.send_response(status)
        handler.send_header("Content-Type", "application/dicom+json")
        handler.end_headers()
        handler.wfile.write(b'{"00081199": {"vr": "SQ", "Value": [')
        for _ in range(50 * 16):
            handler.wfile.write(b" " * 65536)

    with Hostile(endless) as server:
        server.server.RequestHandlerClass.do_POST = server.server.RequestHandlerClass.do_GET
        outcomes = store_objects(parse_address(server.url, {}), objects, attempts=1, backoff_s=0.0)
    assert [outcome.stored for outcome in outcomes] == [False, False]
    assert all("answer too large" in outcome.detail for outcome in outcomes), [o.detail for o in outcomes]
