"""``dicomflow pacs push`` and :func:`dicomflow.pacs.push.store_objects` against a real Orthanc (tests/orthanc.py):
STOW-RS and C-STORE land, compressed objects stay as they were, a PACS that is down fails every object
after the given attempts (listed, none lost) and a second push after it is back stores them; and the
addresses and credentials of :mod:`dicomflow.pacs.connection`."""

from __future__ import annotations

import csv
import datetime
import io
import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from orthanc import COMPRESSED, compressed_copy, free_port

from dicomflow.errors import SettingsError
from dicomflow.pacs.connection import DICOMWEB, DIMSE, parse_address
from dicomflow.pacs.push import StoreOutcome, store_objects

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def server(orthanc_factory):
    """One Orthanc that accepts DIMSE associations from dicomflow's default AE title."""
    return orthanc_factory(modalities={"DICOMFLOW": ("127.0.0.1", free_port())})


@pytest.fixture
def objects(tmp_path, make_dicom) -> list[Path]:
    """Two uncompressed objects of one study and three compressed test files, in a folder."""
    folder = tmp_path / "results"
    study = pydicom.uid.generate_uid()
    paths = [make_dicom(folder / f"sr{i}.dcm", np.full((8, 8), i, np.uint8), StudyInstanceUID=study)
             for i in range(2)]
    for name in COMPRESSED:
        paths.append(compressed_copy(name, folder / name))
    return paths


def credentials(server) -> dict[str, str]:
    return {"DICOMFLOW_PACS_USERNAME": server.user, "DICOMFLOW_PACS_PASSWORD": server.password}


def stored_files(server) -> dict[str, pydicom.Dataset]:
    """What Orthanc holds, by SOP Instance UID, read back from its own REST API."""
    stored = {}
    for instance in server.instances():
        answer = requests.get(f"{server.url}/instances/{instance}/file", auth=server.auth, timeout=30)
        answer.raise_for_status()
        ds = pydicom.dcmread(io.BytesIO(answer.content))
        stored[ds.SOPInstanceUID] = ds
    return stored


def assert_landed(server, paths: list[Path]) -> None:
    stored = stored_files(server)
    for path in paths:
        sent = pydicom.dcmread(path)
        kept = stored[sent.SOPInstanceUID]
        assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert kept.PixelData == sent.PixelData
    assert len(stored) == len(paths)


def run_cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)


def read_report(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_stow_rs_and_c_store_store_every_object_as_it_is(server, objects):
    server.clear()
    web = parse_address(server.dicomweb_url, credentials(server))
    outcomes = store_objects(web, objects)
    assert [outcome.stored for outcome in outcomes] == [True] * len(objects)
    assert {outcome.detail for outcome in outcomes} == {"HTTP 200 stored"}
    assert_landed(server, objects)

    server.clear()
    dimse = parse_address(f"dicom://{server.aet}@127.0.0.1:{server.dicom_port}", {})
    outcomes = store_objects(dimse, objects)
    assert [(outcome.stored, outcome.attempts) for outcome in outcomes] == [(True, 1)] * len(objects)
    assert {outcome.detail for outcome in outcomes} == {"DIMSE 0x0000 Success"}
    assert_landed(server, objects)


@pytest.mark.slow
def test_a_file_that_is_not_dicom_is_listed_and_never_sent(server, objects, tmp_path):
    server.clear()
    note = tmp_path / "results" / "notes.txt"
    note.write_text("not an object")
    dimse = parse_address(f"dicom://{server.aet}@127.0.0.1:{server.dicom_port}", {})
    outcomes = store_objects(dimse, [note, objects[0]])
    assert outcomes[0] == StoreOutcome(note, False, "not read: not a DICOM file (InvalidDicomError)", 0)
    assert outcomes[1].stored
    assert len(server.instances()) == 1


@pytest.mark.slow
def test_an_unknown_calling_ae_title_is_refused_by_the_pacs_and_every_object_listed(server, objects):
    server.clear()
    dimse = parse_address(f"dicom://{server.aet}@127.0.0.1:{server.dicom_port}",
                          {"DICOMFLOW_AE_TITLE": "STRANGER"})
    outcomes = store_objects(dimse, objects[:2], attempts=2, backoff_s=0)
    assert [outcome.stored for outcome in outcomes] == [False, False]
    # Orthanc answers an unknown AE title with A-ASSOCIATE-RJ; once in a full suite on loaded cores
    # (2026-12-07) the reason read otherwise, not captured: the details are shown if it recurs.
    details = [outcome.detail for outcome in outcomes]
    assert all("rejected the association from AE title STRANGER" in detail for detail in details), details
    assert [outcome.attempts for outcome in outcomes] == [2, 2]
    assert server.instances() == []


@pytest.mark.slow
def test_push_while_the_pacs_is_down_fails_every_object_after_its_attempts_then_stores_them(server, objects,
                                                                                         tmp_path):
    server.clear()
    dimse = parse_address(f"dicom://{server.aet}@127.0.0.1:{server.dicom_port}", {})
    folder = objects[0].parent
    report = tmp_path / "push_report.csv"
    server.stop()
    try:
        outcomes = store_objects(dimse, objects, attempts=3, backoff_s=0)
        assert [(outcome.stored, outcome.attempts) for outcome in outcomes] == [(False, 3)] * len(objects)
        assert all("could not associate" in outcome.detail for outcome in outcomes)

        down = run_cli("pacs", "push", str(folder), "--to", server.dicomweb_url, "--attempts", "2",
                       "--report", str(report), env=credentials(server), cwd=tmp_path)
    finally:
        server.start()
    assert down.returncode == 1
    assert f"{len(objects)} of {len(objects)} object(s) NOT stored" in down.stderr
    assert server.password not in down.stdout + down.stderr
    rows = read_report(report)
    assert sorted(Path(row["path"]).name for row in rows) == sorted(path.name for path in objects)
    assert {(row["stored"], row["attempts"], row["detail"]) for row in rows} == {
        ("no", "2", "connection failed (refused, reset or unreachable)")}

    again = run_cli("pacs", "push", str(folder), "--to", server.dicomweb_url, "--report", str(report),
                    env=credentials(server), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert {(row["stored"], row["attempts"]) for row in read_report(report)} == {("yes", "1")}
    assert_landed(server, objects)


@pytest.mark.slow
def test_refused_credentials_fail_at_once_and_the_password_is_shown_nowhere(server, objects, tmp_path):
    server.clear()
    wrong = "not-the-password-6e1f"
    env = {**credentials(server), "DICOMFLOW_PACS_PASSWORD": wrong}
    report = tmp_path / "push_report.csv"
    result = run_cli("pacs", "push", str(objects[0].parent), "--to", server.dicomweb_url, "--report", str(report),
                     env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert ("HTTP 401 Unauthorized: access refused; check DICOMFLOW_PACS_USERNAME and DICOMFLOW_PACS_PASSWORD"
            in result.stderr)
    assert wrong not in result.stdout + result.stderr + report.read_text()
    # Refused credentials are not tried again: every object after one attempt.
    assert {(row["stored"], row["attempts"]) for row in read_report(report)} == {("no", "1")}
    assert server.instances() == []


# TLS (dicoms://) against a real pynetdicom storage SCP that wants our certificate


def write_tls_files(folder: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate it signed (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(name, key, issuer_name, issuer_key, *, ca=False, san=None):
        builder = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                   .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    files = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dicomflow test CA")])
    ca = certificate("dicomflow test CA", ca_key, ca_name, ca_key, ca=True)
    files["ca"] = folder / "ca.pem"
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for role, san in (("server", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                      ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = certificate(f"dicomflow test {role}", key, ca_name, ca_key, san=san)
        files[f"{role}_cert"] = folder / f"{role}.pem"
        files[f"{role}_cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{role}_key"] = folder / f"{role}.key"
        files[f"{role}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return files


@pytest.mark.slow
def test_dicoms_stores_over_mutual_tls_with_the_user_identity(tmp_path, objects):
    import ssl

    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage
    from pynetdicom import AE, evt

    tls = write_tls_files(tmp_path)
    received, identities = [], []

    def on_store(event):
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    def on_user_identity(event):
        identities.append((event.user_id_type, event.primary_field, event.secondary_field))
        return True, None

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls["ca"]))
    context.load_cert_chain(str(tls["server_cert"]), str(tls["server_key"]))
    context.verify_mode = ssl.CERT_REQUIRED  # mutual: no client certificate, no association
    scp = AE(ae_title="TLS_SCP")
    scp.add_supported_context(SecondaryCaptureImageStorage, ExplicitVRLittleEndian)
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, ssl_context=context,
                              evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_USER_ID, on_user_identity)])
    try:
        environ = {"DICOMFLOW_PACS_CA_BUNDLE": str(tls["ca"]), "DICOMFLOW_PACS_CLIENT_CERT": str(tls["client_cert"]),
                   "DICOMFLOW_PACS_CLIENT_KEY": str(tls["client_key"]), "DICOMFLOW_PACS_USERNAME": "ai",
                   "DICOMFLOW_PACS_PASSWORD": "tls-only-secret"}
        address = parse_address(f"dicoms://TLS_SCP@localhost:{port}", environ)
        outcomes = store_objects(address, objects[:2])
        assert [(outcome.stored, outcome.detail) for outcome in outcomes] == [(True, "DIMSE 0x0000 Success")] * 2
        assert received == [pydicom.dcmread(path).SOPInstanceUID for path in objects[:2]]
        assert identities == [(2, b"ai", b"tls-only-secret")] * len(identities) and identities

        without_certificate = {key: value for key, value in environ.items() if "CLIENT" not in key}
        outcomes = store_objects(parse_address(f"dicoms://TLS_SCP@localhost:{port}", without_certificate),
                                 objects[:1], attempts=1)
        assert not outcomes[0].stored and "could not associate" in outcomes[0].detail
        assert len(received) == 2
    finally:
        server.shutdown()


# Addresses and credentials (fast: no PACS)


def test_addresses_are_read_with_their_defaults():
    web = parse_address("https://pacs.example.org/dicom-web/", {})
    assert (web.kind, web.url, web.host, web.port, web.tls) == (DICOMWEB, "https://pacs.example.org/dicom-web",
                                                                "pacs.example.org", 443, True)
    peer = parse_address("dicoms://PACS_1@pacs.example.org:2762", {"DICOMFLOW_AE_TITLE": "DF_AI"})
    assert (peer.kind, peer.called_aet, peer.calling_aet, peer.host, peer.port, peer.tls) == (
        DIMSE, "PACS_1", "DF_AI", "pacs.example.org", 2762, True)
    assert str(peer) == "dicoms://PACS_1@pacs.example.org:2762"
    assert parse_address("dicom://PACS@10.0.0.5", {}).port == 104
    assert parse_address("dicom://PACS@10.0.0.5", {}).calling_aet == "DICOMFLOW"


def test_credentials_come_from_the_environment_and_never_show(tmp_path):
    secret = tmp_path / "password"
    secret.write_text("s3cret-from-file\n")
    secret.chmod(0o600)  # a secret's file open to others is refused (tests/test_pacs_attacks.py)
    address = parse_address("https://pacs.example.org/dicom-web",
                            {"DICOMFLOW_PACS_USERNAME": "ai", "DICOMFLOW_PACS_PASSWORD_FILE": str(secret)})
    assert address.password == "s3cret-from-file"
    assert "s3cret" not in repr(address) + str(address)
    token = parse_address("https://pacs.example.org/dicom-web", {"DICOMFLOW_PACS_TOKEN": "tok-123"})
    assert token.token == "tok-123" and "tok-123" not in repr(token)


@pytest.mark.parametrize("address, environ, expected", [
    ("http://pacs.example.org/dicom-web", {"DICOMFLOW_PACS_TOKEN": "t0ken"}, "use https://"),
    ("dicom://PACS@pacs.example.org:104", {"DICOMFLOW_PACS_USERNAME": "u", "DICOMFLOW_PACS_PASSWORD": "pw"},
     "use dicoms://"),
    ("https://u:hunter2@pacs.example.org/dicom-web", {}, "the PACS address carries credentials"),
    ("dicom://pacs.example.org:104", {}, "names no AE title"),
    ("dicom://A_TITLE_LONGER_THAN_16@pacs:104", {}, "is not an AE title"),
    ("ftp://pacs.example.org", {}, "neither a DICOMweb URL"),
    ("https://pacs.example.org/dicom-web", {"DICOMFLOW_PACS_USERNAME": "u"}, "without DICOMFLOW_PACS_PASSWORD"),
    ("https://pacs.example.org/dicom-web", {"DICOMFLOW_PACS_CA_BUNDLE": "/nonexistent/ca.pem"}, "is not a file"),
])
def test_unsafe_or_malformed_settings_are_refused_in_one_line(address, environ, expected):
    with pytest.raises(SettingsError, match=expected) as raised:
        parse_address(address, environ)
    message = str(raised.value)
    assert "\n" not in message
    assert not any(secret in message for secret in ("t0ken", "pw", "hunter2"))


def test_credentials_over_plain_http_are_allowed_to_loopback_only():
    environ = {"DICOMFLOW_PACS_USERNAME": "u", "DICOMFLOW_PACS_PASSWORD": "pw"}
    assert parse_address("http://127.0.0.1:8042/dicom-web", environ).username == "u"
    assert parse_address("http://localhost:8042/dicom-web", environ).username == "u"
    assert parse_address("http://[::1]:8042/dicom-web", environ).host == "::1"
