"""``dicomflow listen`` (dicomflow/pacs/listener.py, dicomflow/pacs/spool.py): a real pynetdicom AE sends
images by C-STORE, a real Keras conv model registered and signed in a temporary MLflow store scores
them, and a real Orthanc receives the SR and SEG results.

What is checked: every good image's SR and SEG arrive and a bad one is listed with its reason; a
calling AE title not allowed (or a wrong called AE title) is refused at association; a destination
down mid-run gets everything once back; the queue bound answers with waits and Out of Resources
(0xA700) and never holds more than ``--queue``; a ``dicomflow listen`` process stopped by SIGTERM
after acknowledging images delivers them all when started again; the spool keeps compressed
instances as received.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import keras
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from pynetdicom import AE

from dicomflow.dicom.display import PixelSettings
from dicomflow.pacs.connection import parse_address
from dicomflow.pacs.listener import OUT_OF_RESOURCES, SUCCESS, TRANSFER_SYNTAXES, Listener
from dicomflow.serving import pyfunc as serving
from dicomflow.serving.domain import TrainingDomain
from signed_store import register_champion, signed_tracking_store

REPO = Path(__file__).resolve().parents[1]
SETTINGS = PixelSettings(size=32)
MODEL_NAME = "listener-test-classifier"
LISTENER_AET = "DICOMFLOW"
MODALITY_AET = "MODALITY"
DOMAIN = TrainingDomain(modalities={"CR", "DX"}, photometrics={"MONOCHROME2"}, channels={1},
                        rows=(40, 80), columns=(40, 80))
WINDOW = {"WindowCenter": 128, "WindowWidth": 256}
# The type 2 patient and study attributes the results copy (present, here empty, as exports have them).
PATIENT_STUDY = {"PatientName": "", "PatientBirthDate": "", "PatientSex": "", "StudyDate": "", "StudyTime": "",
                 "StudyID": "", "AccessionNumber": ""}
SR_MODALITY, SEG_MODALITY = "SR", "SEG"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _image(level: int, *, seed: int, shape: tuple[int, int] = (64, 64)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(level, 8, shape), 0, 255).astype(np.uint8)


def _conv_model():
    """A real Keras conv model: a 3x3 mean filter (ReLU), global average pooling, a sigmoid unit;
    bright images score high, dark ones low."""
    inputs = keras.Input(shape=(SETTINGS.size, SETTINGS.size, 1), name="image")
    x = keras.layers.Conv2D(2, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("conv").set_weights([np.full((3, 3, 1, 2), 1 / 9, np.float32), np.zeros(2, np.float32)])
    model.layers[-1].set_weights([np.array([[5.0], [5.0]], np.float32), np.array([-5.0], np.float32)])
    return model


@pytest.fixture(autouse=True)
def paths_readable_under_the_test_folders(tmp_path_factory, monkeypatch):
    """The model reads paths only under DICOMFLOW_SERVING_ROOT (predict_files sets it per call; the
    in-process listener's calls run in its own thread, so it is set here too, as tests/test_serving.py does)."""
    monkeypatch.setenv(serving.SERVING_ROOT_ENV, str(tmp_path_factory.getbasetemp()))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A temporary tracking store and signing key pair in the environment (tests/signed_store.py)."""
    with signed_tracking_store(tmp_path_factory, "listener") as made:
        yield made


@pytest.fixture(scope="module")
def registered(store, tmp_path_factory):
    """The conv classifier logged as evaluate logs it (domain, serving example), registered, signed,
    alias champion; its URI and version."""
    path = tmp_path_factory.mktemp("keras") / "conv.keras"
    _conv_model().save(path)
    version, _ = register_champion(store, path, MODEL_NAME, threshold=0.5, classes=[0, 1], settings=SETTINGS,
                                   domain=DOMAIN, input_example=serving.serving_example(DOMAIN))
    return {"uri": f"models:/{MODEL_NAME}@champion", "version": version}


@pytest.fixture(scope="module")
def model(registered, tmp_path_factory):
    """The champion as ``dicomflow listen`` loads it: verified, then loaded from the verified copy."""
    from dicomflow.serving.predict import load_verified_model
    from dicomflow.signing import verify_key_from_env

    return load_verified_model(registered["uri"], key=verify_key_from_env(os.environ),
                               workdir=tmp_path_factory.mktemp("verified"))


@pytest.fixture(scope="module")
def images(tmp_path_factory, make_dicom):
    """Four good DX images (three compressed, losslessly: JPEG 2000, JPEG-LS, RLE), a truncated one,
    an MR image (outside the model's domain) and a DX image without the patient and study
    attributes the results copy, each of its own study; by name."""
    folder = tmp_path_factory.mktemp("images")
    files = {f"good{n}": make_dicom(folder / f"good{n}.dcm", _image(level, seed=n), PatientID=f"LISTEN-P{n}",
                                    **WINDOW, **PATIENT_STUDY)
             for n, level in enumerate((200, 40, 150, 90))}
    files["bare"] = make_dicom(folder / "bare.dcm", _image(120, seed=9), PatientID="LISTEN-P9", **WINDOW)
    for name, syntax in (("good1", JPEG2000Lossless), ("good2", JPEGLSLossless), ("good3", RLELossless)):
        compressed = pydicom.dcmread(files[name])
        compressed.compress(syntax)
        compressed.save_as(files[name], enforce_file_format=True)
    content = files["good0"].read_bytes()
    truncated = folder / "truncated.dcm"
    source = pydicom.dcmread(files["good0"])
    source.SOPInstanceUID = pydicom.uid.generate_uid()
    source.StudyInstanceUID = pydicom.uid.generate_uid()
    source.save_as(truncated, enforce_file_format=True)
    truncated.write_bytes(truncated.read_bytes()[:len(content) - 1500])  # cut inside Pixel Data
    mr = Path(shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm"))
    return {**files, "truncated": truncated, "mr": mr}


GOOD = ("good0", "good1", "good2", "good3")
BAD = {"truncated": "truncated_pixel_data", "mr": "out_of_domain", "bare": "missing_patient_study"}


def send(port: int, files: list[Path], *, calling: str = MODALITY_AET, called: str = LISTENER_AET,
         ae: AE | None = None) -> list[int] | None:
    """C-STORE ``files`` in one association as a modality does; the statuses, or None when the
    association was refused."""
    if ae is None:
        ae = AE(ae_title=calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for path in files:
        meta = pydicom.dcmread(path, stop_before_pixels=True)
        ae.add_requested_context(meta.SOPClassUID, [meta.file_meta.TransferSyntaxUID, ExplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", port, ae_title=called)
    if not association.is_established:
        return None
    try:
        return [int(association.send_c_store(path).Status) for path in files]
    finally:
        association.release()


def orthanc_results(orthanc) -> dict[str, list[dict]]:
    """Orthanc's instances' main tags by modality."""
    found: dict[str, list[dict]] = {}
    for instance in orthanc.instances():
        tags = orthanc.tags(instance)
        found.setdefault(tags.get("Modality", ""), []).append(tags)
    return found


def outcomes(spool: Path) -> list[dict[str, str]]:
    with (spool / "outcomes.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


def wait_for(condition, *, timeout_s: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def make_listener(model, registered, spool: Path, destination: str, **settings) -> Listener:
    return Listener(spool=spool, destination=parse_address(destination, os.environ), model=model,
                    model_name=MODEL_NAME, model_version=registered["version"], allow=[MODALITY_AET, "PACS2"],
                    ae_title=LISTENER_AET, port=0, **{"retry_s": 0.2, "retry_cap_s": 1.0, **settings})


def orthanc_address(orthanc) -> str:
    return f"dicom://{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}"


@pytest.fixture(scope="module")
def orthanc(orthanc_factory):
    """A real Orthanc that accepts C-STORE from the listener's AE title."""
    return orthanc_factory(modalities={LISTENER_AET: ("127.0.0.1", _free_port())})


@pytest.mark.slow  # Orthanc, the model and a batch of images
def test_every_good_image_gets_its_sr_and_seg_and_a_bad_one_its_reason(model, registered, images, orthanc,
                                                                       tmp_path):
    orthanc.clear()
    spool = tmp_path / "spool"
    sent = [images[name] for name in (*GOOD, *BAD)]
    with make_listener(model, registered, spool, orthanc_address(orthanc), batch=16) as listener:
        assert send(listener.port, sent) == [SUCCESS] * len(sent)  # the bad ones too: they are on disk
        assert listener.wait_until_idle(180), listener.counts
    results = orthanc_results(orthanc)
    studies = {pydicom.dcmread(images[name], stop_before_pixels=True).StudyInstanceUID for name in GOOD}
    assert sorted(results) == [SEG_MODALITY, SR_MODALITY]
    for modality in (SR_MODALITY, SEG_MODALITY):
        assert sorted(tags["StudyInstanceUID"] for tags in results[modality]) == sorted(studies)
    rows = {row["status"]: [] for row in outcomes(spool)}
    for row in outcomes(spool):
        rows[row["status"]].append(row)
    assert len(rows["scored"]) == len(GOOD) and all(row["objects"] == "2" for row in rows["scored"])
    assert sorted(row["error"].split(":")[0] for row in rows["failed"]) == sorted(BAD.values())
    assert {row["calling_ae"] for row in outcomes(spool)} == {MODALITY_AET}
    assert len(list((spool / "failed").iterdir())) == len(BAD)  # kept for inspection
    assert list((spool / "received").iterdir()) == [] and list((spool / "outbox").iterdir()) == []


def test_an_ae_title_not_allowed_or_a_wrong_called_one_is_refused_at_association(model, registered, images,
                                                                                  tmp_path, caplog):
    spool = tmp_path / "spool"
    with make_listener(model, registered, spool, "dicom://NOBODY@127.0.0.1:9") as listener, \
            caplog.at_level("INFO", logger="dicomflow.listen"):
        assert send(listener.port, [images["good0"]], calling="INTRUDER") is None
        assert send(listener.port, [images["good0"]], called="SOMEONE") is None
        assert listener.counts["refused_associations"] == 2
        assert listener.counts["received"] == 0
    refusals = [record.getMessage() for record in caplog.records if "refused an association" in record.getMessage()]
    assert len(refusals) == 2
    assert "'INTRUDER'" in refusals[0] and "not allowed" in refusals[0]
    assert "'MODALITY'" in refusals[1] and "'SOMEONE'" in refusals[1]
    assert list((spool / "received").iterdir()) == []


@pytest.mark.slow  # Orthanc stopped and started again
def test_a_destination_down_mid_run_gets_everything_once_back(model, registered, images, orthanc, tmp_path):
    orthanc.clear()
    with make_listener(model, registered, tmp_path / "spool", orthanc_address(orthanc)) as listener:
        assert send(listener.port, [images["good0"], images["good1"]]) == [SUCCESS] * 2
        wait_for(lambda: len(orthanc.instances()) == 4, what="the first results stored")
        orthanc.stop()
        try:
            assert send(listener.port, [images["good2"], images["good3"]]) == [SUCCESS] * 2
            wait_for(lambda: listener.sender_failures >= 2 and listener.unscored() == 0,
                     what="the sender failing on the stopped destination")
            assert len(listener.spool.ready()) == 2  # both result sets wait on disk
        finally:
            orthanc.start()
        assert listener.wait_until_idle(120), listener.counts
    results = orthanc_results(orthanc)
    assert len(results[SR_MODALITY]) == 4 and len(results[SEG_MODALITY]) == 4


@pytest.mark.slow  # waits for room, on purpose
def test_a_full_queue_makes_senders_wait_then_answers_out_of_resources(model, registered, images, tmp_path):
    spool = tmp_path / "spool"
    listener = make_listener(model, registered, spool, "dicom://NOBODY@127.0.0.1:9", queue=2, wait_s=0.5)
    listener.pause_scoring()
    with listener:
        statuses = send(listener.port, [images[name] for name in GOOD])
        assert statuses == [SUCCESS, SUCCESS, OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        assert listener.counts["waited"] == 2 and listener.counts["out_of_resources"] == 2
        assert listener.unscored() == 2 and len(list((spool / "received").iterdir())) == 2  # the bound holds
        # Room made while a sender waits: its C-STORE waits, then succeeds.
        listener.wait_s = 60.0
        resume = threading.Timer(1.0, listener.resume_scoring)
        resume.start()
        assert send(listener.port, [images["good2"], images["good3"]]) == [SUCCESS, SUCCESS]
        resume.join()
        assert listener.counts["waited"] >= 3
        wait_for(lambda: listener.unscored() == 0, what="all four scored")
        assert listener.peak_unscored == 2  # never more than --queue held, on disk or in memory
    assert sorted(row["status"] for row in outcomes(spool)) == ["scored"] * 4


def test_instances_not_scored_at_stop_are_scored_and_sent_at_the_next_start(model, registered, images, orthanc,
                                                                            tmp_path):
    orthanc.clear()
    spool = tmp_path / "spool"
    sent = [images["good1"], images["good3"]]
    listener = make_listener(model, registered, spool, orthanc_address(orthanc))
    listener.pause_scoring()
    with listener:
        assert send(listener.port, sent) == [SUCCESS, SUCCESS]
    kept = sorted((spool / "received").iterdir())
    assert len(kept) == 2
    # Stored as received: the JPEG 2000 and RLE instances as they were sent, their pixel data byte for byte.
    by_uid = {pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for path in kept}
    for path in sent:
        original = pydicom.dcmread(path)
        received = pydicom.dcmread(by_uid[original.SOPInstanceUID])
        assert received.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert received.PixelData == original.PixelData
    (spool / "incoming" / "half-written.part").write_bytes(b"\0" * 100)  # a crash mid-write: never acknowledged
    with make_listener(model, registered, spool, orthanc_address(orthanc)) as listener:
        assert listener.wait_until_idle(120), listener.counts
    assert list((spool / "incoming").iterdir()) == []
    results = orthanc_results(orthanc)
    assert len(results[SR_MODALITY]) == 2 and len(results[SEG_MODALITY]) == 2


def test_the_accepted_transfer_syntaxes_include_the_compressed_ones():
    names = {str(uid.name) for uid in TRANSFER_SYNTAXES}
    for expected in ("JPEG Baseline (Process 1)", "JPEG Lossless, Non-Hierarchical, First-Order Prediction "
                     "(Process 14 [Selection Value 1])", "JPEG-LS Lossless Image Compression",
                     "JPEG 2000 Image Compression (Lossless Only)", "JPEG 2000 Image Compression", "RLE Lossless",
                     "Explicit VR Little Endian", "Implicit VR Little Endian"):
        assert expected in names


# --- the command, as a process ---------------------------------------------------------------------

def _listen(spool: Path, port: int, destination: str, store, cwd: Path) -> subprocess.Popen:
    env = {**{key: value for key, value in os.environ.items() if key != serving.SERVING_ROOT_ENV},
           "MLFLOW_TRACKING_URI": store["uri"], "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.Popen([sys.executable, "-m", "dicomflow", "listen", "--allow", MODALITY_AET, "--to",
                             destination, "--port", str(port), "--spool", str(spool), "--model",
                             f"models:/{MODEL_NAME}@champion", "--batch", "4"],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _echo(port: int) -> bool:
    ae = AE(ae_title=MODALITY_AET)
    ae.add_requested_context("1.2.840.10008.1.1")
    association = ae.associate("127.0.0.1", port, ae_title=LISTENER_AET)
    if not association.is_established:
        return False
    status = association.send_c_echo()
    association.release()
    return bool(status) and status.Status == SUCCESS


def _stop(process: subprocess.Popen) -> tuple[int, str]:
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


@pytest.mark.slow  # two dicomflow listen processes (TensorFlow and the model each time)
def test_sigterm_after_acknowledging_loses_nothing_and_a_restart_delivers_it_all(registered, store, images,
                                                                                  orthanc, tmp_path):
    orthanc.clear()
    orthanc.stop()  # down for the first run: what it acknowledges can only wait in the spool
    spool, port = tmp_path / "spool", _free_port()
    sent = [images[name] for name in GOOD]
    process = _listen(spool, port, orthanc_address(orthanc), store, tmp_path)
    try:
        wait_for(lambda: process.poll() is None and _echo(port), timeout_s=180, what="the listener answers C-ECHO")
        assert send(port, sent) == [SUCCESS] * len(sent)
    finally:
        code, first_log = _stop(process)
        orthanc.start()
    assert code == 0, first_log
    waiting = len(list((spool / "received").iterdir())) + len(list((spool / "outbox").iterdir()))
    assert waiting == len(sent), first_log  # acknowledged: to score or to send, none lost, none sent
    process = _listen(spool, port, orthanc_address(orthanc), store, tmp_path)
    try:
        wait_for(lambda: len(orthanc.instances()) == 2 * len(sent), timeout_s=180, what="every result stored")
    finally:
        code, second_log = _stop(process)
    assert code == 0, second_log
    results = orthanc_results(orthanc)
    assert len(results[SR_MODALITY]) == len(sent) and len(results[SEG_MODALITY]) == len(sent)
    log = first_log + second_log
    assert "SIGTERM: stopping" in first_log and "SIGTERM: stopping" in second_log
    # Counts, AE titles and statuses only: no UID, no patient ID, no path of the spool.
    uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in sent]
    assert not [uid for uid in uids if uid in log]
    assert "LISTEN-P" not in log and str(spool) not in log
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", log), log


def test_a_refusal_is_told_apart_from_a_destination_out_of_reach():
    from dicomflow.pacs.connection import dimse_status
    from dicomflow.pacs.listener import is_refusal

    assert is_refusal(f"DIMSE {dimse_status(0xA900)}")  # data set does not match the SOP class
    assert is_refusal("the PACS accepts no presentation context for SOP class 1.2.3 in transfer syntax 1.2.4")
    assert not is_refusal(f"DIMSE {dimse_status(0xA700)}")  # out of resources: later
    assert not is_refusal("could not associate with dicom://PACS@127.0.0.1:9 (connection refused, aborted or "
                          "timed out); check the host, port and AE title, and that the PACS is up")
    assert not is_refusal("HTTP 503 Service Unavailable")


def test_lossless_syntaxes_are_preferred_then_uncompressed_then_lossy(model, registered, images, tmp_path):
    """A sender offering an uncompressed image as JPEG baseline or as it is: the listener takes it as
    it is; offering an RLE image as RLE or uncompressed: RLE (its bytes as they are)."""
    with make_listener(model, registered, tmp_path / "spool", "dicom://NOBODY@127.0.0.1:9") as listener:
        ae = AE(ae_title=MODALITY_AET)
        sc = pydicom.dcmread(images["good0"], stop_before_pixels=True).SOPClassUID
        ae.add_requested_context(sc, [pydicom.uid.JPEGBaseline8Bit, ExplicitVRLittleEndian])
        ae.add_requested_context(sc, [ExplicitVRLittleEndian, RLELossless])
        association = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AET)
        try:
            chosen = [context.transfer_syntax[0] for context in association.accepted_contexts]
        finally:
            association.release()
    assert chosen == [ExplicitVRLittleEndian, RLELossless]


def _certificate(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key (PEM files), made with cryptography."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
                   .not_valid_after(now + dt.timedelta(days=1))
                   .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                                  critical=False)
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_behind_its_own_tls_it_takes_images_from_a_sender_with_a_certificate_only(model, registered, images,
                                                                                   tmp_path):
    import ssl

    from dicomflow.errors import SettingsError
    from dicomflow.pacs.listener import TLS_CERT_ENV, TLS_CLIENT_CA_ENV, TLS_KEY_ENV, server_ssl_context

    server_cert, server_key = _certificate(tmp_path, "listener")
    client_cert, client_key = _certificate(tmp_path, "modality")
    context = server_ssl_context({TLS_CERT_ENV: str(server_cert), TLS_KEY_ENV: str(server_key),
                                  TLS_CLIENT_CA_ENV: str(client_cert)})
    assert server_ssl_context({}) is None
    with pytest.raises(SettingsError, match=TLS_KEY_ENV):
        server_ssl_context({TLS_CERT_ENV: str(server_cert)})

    def sender_context(with_certificate: bool) -> ssl.SSLContext:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(server_cert))
        if with_certificate:
            client.load_cert_chain(str(client_cert), str(client_key))
        return client

    spool = tmp_path / "spool"
    listener = make_listener(model, registered, spool, "dicom://NOBODY@127.0.0.1:9", ssl_context=context)
    listener.pause_scoring()
    with listener:
        statuses = {}
        for with_certificate in (True, False):
            ae = AE(ae_title=MODALITY_AET)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
            meta = pydicom.dcmread(images["good1"], stop_before_pixels=True)
            ae.add_requested_context(meta.SOPClassUID, meta.file_meta.TransferSyntaxUID)
            association = ae.associate("127.0.0.1", listener.port, ae_title=LISTENER_AET,
                                       tls_args=(sender_context(with_certificate), "127.0.0.1"))
            if association.is_established:
                statuses[with_certificate] = int(association.send_c_store(images["good1"]).Status)
                association.release()
            else:
                statuses[with_certificate] = None
        assert send(listener.port, [images["good1"]]) is None  # no TLS at all: no association
    assert statuses == {True: SUCCESS, False: None}
    assert len(list((spool / "received").iterdir())) == 1


def test_the_spool_after_a_crash_between_steps_scores_nothing_twice(images, tmp_path):
    from dicomflow.pacs.spool import Outcome, Spool

    spool = Spool(tmp_path / "spool")
    content = images["good0"].read_bytes()
    names = [Spool.new_name(MODALITY_AET) for _ in range(4)]
    for name in names:
        spool.receive(name, content)
    published, sent, recorded, fresh = names
    # Results moved into the outbox, the process stopped before the outcome was recorded.
    objects = tmp_path / "objects"
    objects.mkdir()
    (objects / "sr.dcm").write_bytes(content)
    assert spool.publish(published, [objects / "sr.dcm"]) == 1
    # Results published and already sent, the process stopped before the instance was removed.
    spool.sent(sent, 2)
    # Outcome recorded (failed), stopped before the instance went to failed/.
    spool.record([Outcome(recorded, "failed", error="out_of_domain: MR")])
    (spool.outbox / f".{fresh}.part").mkdir()  # results being moved in: half made
    (spool.incoming / "x.part").write_bytes(content[:10])
    assert [path.name for path in spool.recover()] == [f"{fresh}.dcm"]
    assert [path.name for path in spool.received.iterdir()] == [f"{fresh}.dcm"]
    assert [path.name for path in spool.failed.iterdir()] == [f"{recorded}.dcm"]
    assert [name for name, _ in spool.ready()] == [published]
    assert list(spool.incoming.iterdir()) == [] and not (spool.outbox / f".{fresh}.part").exists()
    rows = {row["file"]: row for row in outcomes(spool.root)}
    assert rows[published]["status"] == "scored" and rows[sent]["status"] == "scored"
    assert rows[recorded]["calling_ae"] == MODALITY_AET
    assert oct(spool.received.stat().st_mode & 0o777) == "0o700"
    assert oct((spool.received / f"{fresh}.dcm").stat().st_mode & 0o777) == "0o600"
