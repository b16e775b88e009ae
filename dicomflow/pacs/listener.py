"""``dicomflow listen``: a DICOM storage SCP that answers the images it receives with results.

    dicomflow listen --allow AET [--allow AET ...] --to ADDRESS [--ae-title DICOMFLOW] [--host 127.0.0.1]
                     [--port 11112] [--spool .dicomflow/spool] [--model URI] [--batch 16] [--queue 256]
                     [--max-instance-mib 1024]

A modality or a PACS sends images (C-STORE) to this AE title; each instance is written whole to the
spool (:mod:`dicomflow.pacs.spool`) before its success status goes back, scored in batches by the
registered model (verified before it is loaded), its result objects (an SR with the model's answer
and a SEG, :func:`dicomflow.pacs.results.write_dicom_results`) queued in the spool's outbox
and stored at ``--to`` (:func:`dicomflow.pacs.push.store_objects`). Three kinds of threads share
the work (:class:`Listener`):

* the association threads (pynetdicom's, one per association) write the instances to the spool
  and enqueue them; when ``queue`` instances wait to be scored they wait for room (back-pressure),
  and past ``wait_s`` answer *Out of Resources* (0xA700) so that the sender tries again later;
* one scoring thread takes up to ``batch`` instances at a time (waiting ``fill_s`` to fill a batch)
  and records each instance's outcome in ``outcomes.csv`` (a bad file: its reason; the rest go on);
* one sending thread stores the outbox at the destination; one that is down is tried again with
  exponential back-off (``retry_s`` doubled up to ``retry_cap_s``), the objects staying on disk.

Refused: associations from a calling AE title not in ``allow``, or to another called AE title than
``ae_title`` (logged with the AE titles); presentation contexts other than image storage. Accepted
transfer syntaxes: the uncompressed ones and JPEG, JPEG-LS, JPEG 2000 and RLE; instances are stored
as received (never decoded or re-encoded before scoring).

:meth:`Listener.stop` (``SIGTERM``/``SIGINT`` in the command) stops accepting, lets the batch being
scored finish and keeps the rest on disk; :meth:`Listener.start` picks up what a previous run left
(instances not scored, results not sent). Logs give counts, AE titles and statuses, never a value
read from an instance, a UID or a path of the spool's files.
"""

from __future__ import annotations

import io
import logging
import re
import signal
import ssl
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset
from pydicom import uid as uids

from dicomflow.errors import SettingsError
from dicomflow.pacs.spool import Outcome, Spool

logger = logging.getLogger("dicomflow.listen")

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # C-STORE "Refused: Out of Resources": the sender keeps the instance and retries
# An instance larger than max_instance_mib: a failure (the Cxxx "cannot understand" range PS3.7
# leaves to the SCP), not "Out of Resources" (A7xx): a sender retries those, and this instance
# would be sent, dropped and refused again for ever. A failure stops it in the sender's queue,
# where the technologist sees it, with the reason in the response's Error Comment.
TOO_LARGE = 0xC001
DEFAULT_MAX_INSTANCE_MIB = 1024.0
PROCESSING_FAILURE = 0xC000
MAX_PDU_BYTES = 1 << 20  # the largest PDU we accept (see Listener.start)
# The transfer syntaxes accepted, in the order the listener prefers them when a sender offers several
# for one presentation context (pynetdicom takes the acceptor's first that the sender offers):
# lossless compressed (the sender's bytes as they are), uncompressed, then lossy compressed (a
# sender that holds a lossy image keeps it so; one that holds an uncompressed image is never asked
# to compress it lossily). Instances are stored as received, never decoded or re-encoded.
LOSSLESS_COMPRESSED = (uids.JPEGLossless, uids.JPEGLosslessSV1, uids.JPEGLSLossless, uids.JPEG2000Lossless,
                       uids.JPEG2000MCLossless, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL, uids.RLELossless)
UNCOMPRESSED = (uids.ExplicitVRLittleEndian, uids.ImplicitVRLittleEndian, uids.DeflatedExplicitVRLittleEndian,
                uids.ExplicitVRBigEndian)
LOSSY_COMPRESSED = (uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLSNearLossless, uids.JPEG2000,
                    uids.JPEG2000MC, uids.HTJ2K)
TRANSFER_SYNTAXES = (*LOSSLESS_COMPRESSED, *UNCOMPRESSED, *LOSSY_COMPRESSED)
SEND_OBJECTS = 64  # result objects per call to store_objects: one association carries many


def image_storage_classes() -> list[str]:
    """The storage SOP classes of images (pynetdicom's storage classes named ``...ImageStorage...``,
    videos left out: they are scored by no model here): what the listener accepts."""
    from pynetdicom import sop_class

    return [str(uid) for name, uid in sop_class._STORAGE_CLASSES.items()
            if "ImageStorage" in name and not name.startswith("Video")]


@dataclass(frozen=True)
class Scored:
    """One instance's answer: its result objects (empty when it failed), the model's label, and
    the reason it failed (``""`` when it did not)."""

    objects: list[Path]
    label: str = ""
    error: str = ""


def score_files(model, files: list[Path], out_dir: Path, *, model_name: str, model_version: str) -> list[Scored]:
    """The model on ``files`` (:func:`dicomflow.serving.predict.predict_files`) and their result
    objects, an SR and a SEG each, written under ``out_dir``
    (:func:`dicomflow.pacs.results.dicom_results`); one :class:`Scored` per file, in order.

    A file the model refuses (not DICOM, truncated, out of domain) gets its reason as ``dicomflow
    predict`` writes it; one it answered but could not get objects for, that reason
    (``missing_patient_study: ...``, ``multi_frame: ...``). When making the objects of a batch
    fails otherwise, each file is tried alone, so that one file costs only its own results
    (``results_failed: <error type>``: the message may quote a value read from the file).
    """
    from dicomflow.pacs.results import describe_results, dicom_results
    from dicomflow.serving.predict import predict_files

    predictions = predict_files(model, files, names=[path.name for path in files])
    errors = predictions["error"].fillna("").astype(str).tolist()
    labels = [str(label) for label in predictions["label"]]
    try:
        results = dicom_results(model, files, predictions, out_dir, model_name=model_name,
                                model_version=model_version)
    except Exception:  # noqa: BLE001  one file spoils the batch's call: each alone, below
        results = []
        for position, file in enumerate(files):
            try:
                results += dicom_results(model, [file], predictions.iloc[[position]].reset_index(drop=True),
                                         out_dir, model_name=model_name, model_version=model_version)
            except Exception as err:  # noqa: BLE001  this file's results only
                results.append(DicomResultFailed(f"results_failed: {type(err).__name__}"))
    logger.debug("%s", describe_results(results))
    scored = []
    for result, label, error in zip(results, labels, errors):
        if error or not result.paths:
            scored.append(Scored([], "", error or result.reason))
        else:
            scored.append(Scored([Path(path) for path in result.paths], label, ""))
    return scored


@dataclass(frozen=True)
class DicomResultFailed:
    """A file whose objects could not be made at all (as :class:`dicomflow.pacs.results.DicomResult`
    with no paths)."""

    reason: str
    paths: tuple = ()


class Listener:
    """The storage SCP, its scoring and sending threads, over one spool.

    Parameters
    ----------
    spool : Path
        The spool folder (:class:`dicomflow.pacs.spool.Spool`), kept across restarts.
    destination : object
        Where results go: what :func:`dicomflow.pacs.connection.parse_address` returns.
    model : object
        The pyfunc model (:func:`dicomflow.serving.predict.load_verified_model`); a model that
        scores CT series is refused (the listener answers instances one by one).
    model_name, model_version : str
        The registered model's name and version, written into the results.
    allow : list of str
        The calling AE titles accepted; every other is refused at association.
    ae_title : str
        This listener's AE title; an association to another called AE title is refused.
    host, port : str, int
        Where to listen; port 0 takes a free port (:attr:`port` says which, once started).
    batch : int
        Instances scored in one model call, at most.
    queue : int
        Instances received and not yet scored, at most; more wait for room.
    wait_s : float
        How long a C-STORE waits for room before it is answered Out of Resources (0xA700). Keep it
        below the senders' DIMSE timeout (often 30 s or more).
    fill_s : float
        How long the scorer waits for a batch to fill once one instance is there.
    retry_s, retry_cap_s : float
        The sender's first wait after a destination failed to store, doubled after each failure
        in a row, capped.
    max_instance_mib : float, default=1024
        The largest instance taken (its data set, in MiB). A larger one is answered with the
        failure 0xC001 (not retried by the sender) and never written; while it arrives, what is
        past the limit is dropped, so that neither memory nor the spool grows with what a sender
        sends.
    max_associations : int, default=10
        Associations open at once, at most; one more is rejected (transient: the sender tries again).
    ssl_context : ssl.SSLContext, optional
        TLS on the listening socket (pynetdicom's ``ssl_context``): see docs/listener.md.
    store : callable, optional
        ``store(destination, paths, attempts=, backoff_s=) -> list[StoreOutcome]``; default
        :func:`dicomflow.pacs.push.store_objects`.

    Raises
    ------
    SettingsError
        An empty ``allow``, a ``batch`` or ``queue`` below 1, a ``max_instance_mib`` not above 0,
        an AE title that is not one, or a volume model.
    """

    def __init__(self, *, spool: Path, destination: Any, model, model_name: str, model_version: str,
                 allow: list[str], ae_title: str = "DICOMFLOW", host: str = "127.0.0.1", port: int = 11112,
                 batch: int = 16, queue: int = 256, wait_s: float = 10.0, fill_s: float = 0.2,
                 retry_s: float = 1.0, retry_cap_s: float = 60.0, ssl_context: ssl.SSLContext | None = None,
                 store: Callable[..., list] | None = None,
                 max_instance_mib: float = DEFAULT_MAX_INSTANCE_MIB, max_associations: int = 10) -> None:
        allowed = [title.strip() for title in allow if title.strip()]
        if not allowed:
            raise SettingsError("listen: no calling AE title allowed; give --allow AET for each modality or PACS "
                                "that sends images")
        if batch < 1 or queue < 1:
            raise SettingsError(f"listen: --batch {batch} and --queue {queue} must be at least 1")
        metadata = getattr(getattr(model, "metadata", None), "metadata", None) or {}
        if metadata.get("volume"):
            raise SettingsError(f"listen: {model_name} version {model_version} scores CT series, and the listener "
                                "answers images one by one; give an image model with --model")
        if max_associations < 1:
            raise SettingsError(f"listen: --max-associations {max_associations} must be at least 1")
        if not max_instance_mib > 0:
            raise SettingsError(f"listen: --max-instance-mib {max_instance_mib} must be above 0")
        for title in (*allowed, ae_title):
            if len(title) > 16:
                raise SettingsError(f"listen: AE title {title!r} has {len(title)} characters; DICOM allows 16")
            if "\\" in title or not title.isprintable() or not title.isascii():
                raise SettingsError(f"listen: AE title {title!r} is not one: printable ASCII characters, no "
                                    "backslash")
        self.spool = Spool(spool)
        self.destination = destination
        self.model, self.model_name, self.model_version = model, model_name, model_version
        self.allow, self.ae_title, self.host, self.port = allowed, ae_title.strip(), host, port
        self.batch, self.queue, self.wait_s, self.fill_s = batch, queue, wait_s, fill_s
        self.retry_s, self.retry_cap_s = retry_s, retry_cap_s
        self.ssl_context = ssl_context
        self._store = store
        self.max_instance_bytes = int(max_instance_mib * 1024 ** 2)
        self.max_associations = max_associations
        self._too_large: set[tuple[int, int | None]] = set()  # (association, message ID) cut off while arriving
        self.counts: Counter[str] = Counter()  # received, scored, failed, out_of_resources, waited, sent, ...
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # the queue and the count of instances not yet scored
        self._waiting: deque[Path] = deque()
        self._unscored = 0  # received and acknowledged (or being written), not yet scored
        self._writing = 0  # C-STORE handlers between their reservation and their answer
        self._closing = threading.Event()  # no more waiting for room: stop() began
        self._stopping = threading.Event()  # the scoring and sending threads end
        self._scoring_allowed = threading.Event()
        self._scoring_allowed.set()
        self._outbox_changed = threading.Event()
        self._per_association: dict[int, Counter[str]] = {}
        self._server = None
        self._ae = None
        self._threads: list[threading.Thread] = []
        self.sender_failures = 0  # failed store calls in a row (0: the destination took the last one)
        self.peak_unscored = 0  # the most instances received and not yet scored at once (at most queue, or
        # what a previous run left in the spool)

    # --- life cycle ----------------------------------------------------------------------------

    def start(self) -> Listener:
        """Recover the spool (:meth:`dicomflow.pacs.spool.Spool.recover`: what a previous run left
        is scored and sent), start the scoring and sending threads and the SCP; ``self``."""
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        waiting = self.spool.recover()
        with self._lock:  # a Listener started again: the spool, not memory, says what is left
            self._waiting = deque(waiting)
            self._unscored = len(waiting)
        left = self.spool.counts()
        if waiting or left["outbox"]:
            logger.info("from the spool: %d received instances to score, %d result sets to send", len(waiting),
                        left["outbox"])
        self._stopping.clear()
        self._closing.clear()
        self._threads = [threading.Thread(target=self._score_loop, name="dicomflow-listen-score", daemon=True),
                         threading.Thread(target=self._send_loop, name="dicomflow-listen-send", daemon=True)]
        for thread in self._threads:
            thread.start()
        # pynetdicom's INFO records narrate each association and message, and its WARNING and ERROR
        # ones quote what a peer sent as it sent it (a non-conformant SOP Instance UID, an AE title
        # with control characters): ours give the counts, AE titles in repr.
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
        ae = AE(ae_title=self.ae_title)
        # Senders cut each instance into PDUs no larger than what we announce; pynetdicom's default
        # (16 KiB) makes a 2 MiB radiograph 128 PDUs, each handled in Python: receiving was most of
        # the listener's cost beyond predict's (bench.pacs). 1 MiB keeps one PDU's buffer bounded.
        ae.maximum_pdu_size = MAX_PDU_BYTES
        ae.require_calling_aet = self.allow
        ae.require_called_aet = True
        ae.maximum_associations = self.max_associations
        for sop_class in image_storage_classes():
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)  # C-ECHO: a modality's connection test
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed),
                    (evt.EVT_DATA_RECV, self._on_data)]
        self._ae = ae
        try:
            self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        except OSError as err:
            self.stop()
            why = err.strerror or _error_kind(err)
            raise SettingsError(f"listen: cannot listen on {self.host}:{self.port} ({why}); choose another --port "
                                "or --host, or stop what listens there") from None
        self.port = self._server.server_address[1]
        logger.info("listening as %s on %s:%d%s for %s; scoring batches of up to %d, at most %d waiting; "
                    "results to %s", self.ae_title, self.host, self.port, " (TLS)" if self.ssl_context else "",
                    ", ".join(self.allow), self.batch, self.queue, self.destination)
        return self

    def stop(self, *, grace_s: float = 10.0) -> None:
        """Stop accepting associations, give open ones ``grace_s`` to end (then abort them), let
        the C-STOREs being written and the batch being scored finish, and end the threads. What
        was acknowledged is on disk: :meth:`start` (here or in a new process) goes on with it."""
        self._closing.set()
        with self._room:
            self._room.notify_all()  # handlers waiting for room answer Out of Resources now
        if self._server is not None:
            self._server.shutdown()
            deadline = time.monotonic() + grace_s
            while self._server.active_associations and time.monotonic() < deadline:
                time.sleep(0.05)
            for association in self._server.active_associations:
                association.abort()
            self._server = None
        deadline = time.monotonic() + grace_s
        with self._room:
            while self._writing and time.monotonic() < deadline:
                self._room.wait(0.05)
        self._stopping.set()
        self._scoring_allowed.set()
        self._outbox_changed.set()
        with self._room:
            self._room.notify_all()
        for thread in self._threads:
            thread.join(timeout=max(grace_s, 60.0))
        left = self.spool.counts()
        logger.info("stopped: %d received, %d scored, %d failed, %d result objects stored; kept for the next start: "
                    "%d instances to score, %d result sets to send", self.counts["received"], self.counts["scored"],
                    self.counts["failed"], self.counts["sent_objects"], left["received"], left["outbox"])

    def __enter__(self) -> Listener:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def pause_scoring(self) -> None:
        """Hold the scorer after its current batch (instances keep arriving until ``queue`` wait)."""
        self._scoring_allowed.clear()

    def resume_scoring(self) -> None:
        """Let the scorer go on after :meth:`pause_scoring`."""
        self._scoring_allowed.set()

    def unscored(self) -> int:
        """Instances received (or being written) and not yet scored."""
        with self._lock:
            return self._unscored

    def wait_until_idle(self, timeout_s: float) -> bool:
        """Wait until every received instance is scored and the outbox is empty; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.unscored() == 0 and not self.spool.ready():
                return True
            time.sleep(0.05)
        return False

    # --- receiving (association threads) ----------------------------------------------------------

    def _on_data(self, event) -> None:
        """Each PDU as it arrives (pynetdicom's reading thread, the one that then decodes it into
        the message): a C-STORE whose data set has passed :attr:`max_instance_bytes` is marked too
        large and its bytes so far dropped, so that memory holds at most the limit and one PDU."""
        message = getattr(getattr(event.assoc, "dimse", None), "message", None)
        data_set = getattr(message, "data_set", None)
        if not isinstance(data_set, io.BytesIO) or data_set.tell() <= self.max_instance_bytes:
            return
        command = getattr(message, "command_set", None)
        key = (id(event.assoc), getattr(command, "MessageID", None))
        with self._lock:
            if key not in self._too_large:
                self._too_large.add(key)
                self.counts["cut_off"] += 1  # instances whose bytes were dropped as they came
        data_set.seek(0)
        data_set.truncate()

    def _refuse_too_large(self, event, tally: Counter) -> Dataset:
        with self._lock:
            self.counts["too_large"] += 1
        tally["too_large"] += 1
        limit = self.max_instance_bytes / 1024 ** 2
        logger.warning("refused an instance from AE title %r: larger than --max-instance-mib %g (answered 0x%04X)",
                       str(event.assoc.requestor.ae_title).strip(), limit, TOO_LARGE)
        answer = Dataset()
        answer.Status = TOO_LARGE
        answer.ErrorComment = f"instance larger than this SCP's limit of {limit:g} MiB"[:64]
        return answer

    def _on_store(self, event) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        tally = self._per_association.setdefault(id(event.assoc), Counter())
        with self._lock:
            cut_off = (id(event.assoc), getattr(event.request, "MessageID", None)) in self._too_large
            self._too_large.discard((id(event.assoc), getattr(event.request, "MessageID", None)))
        if cut_off:
            return self._refuse_too_large(event, tally)
        with self._room:
            self._writing += 1
            if self._unscored >= self.queue:
                self.counts["waited"] += 1
                deadline = time.monotonic() + self.wait_s
                while self._unscored >= self.queue and not self._closing.is_set():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._room.wait(remaining)
            if self._unscored >= self.queue:
                self.counts["out_of_resources"] += 1
                tally["out_of_resources"] += 1
                self._writing -= 1
                self._room.notify_all()
                return OUT_OF_RESOURCES
            self._unscored += 1  # the room is taken before the write, so that the bound holds
            self.peak_unscored = max(self.peak_unscored, self._unscored)
        try:
            encoded = event.encoded_dataset()
            if len(encoded) > self.max_instance_bytes:
                with self._room:
                    self._unscored -= 1
                    self._writing -= 1
                    self._room.notify_all()
                return self._refuse_too_large(event, tally)
            path = self.spool.receive(Spool.new_name(calling), encoded)
        except Exception as err:  # noqa: BLE001  a full disk or a bug: the sender keeps it, tries later
            with self._room:
                self._unscored -= 1
                self._writing -= 1
                self.counts["out_of_resources"] += 1
                tally["out_of_resources"] += 1
                self._room.notify_all()
            logger.error("could not write a received instance to the spool (%s): answered Out of Resources",
                         _error_kind(err))
            return OUT_OF_RESOURCES
        with self._room:
            self._waiting.append(path)
            self._writing -= 1
            self.counts["received"] += 1
            tally["received"] += 1
            self._room.notify_all()
        return SUCCESS

    def _on_rejected(self, event) -> None:
        requestor = event.assoc.requestor
        calling = str(requestor.ae_title).strip()
        called = str(getattr(requestor.primitive, "called_ae_title", "") or "").strip()
        if calling not in self.allow:
            why = "its calling AE title is not allowed (--allow)"
        elif called != self.ae_title:
            why = f"it called AE title {called!r}, not {self.ae_title!r}"
        else:
            why = "too many associations at once"
        with self._lock:
            self.counts["refused_associations"] += 1
            refused = self.counts["refused_associations"]
        logger.warning("refused an association from AE title %r: %s (%d refused so far)", calling, why, refused)

    def _on_closed(self, event) -> None:
        with self._lock:
            self._too_large = {key for key in self._too_large if key[0] != id(event.assoc)}
        tally = self._per_association.pop(id(event.assoc), None)
        if tally:
            logger.info("association from %s %s: %d instances received, %d answered Out of Resources",
                        str(event.assoc.requestor.ae_title).strip(), event.event.name.removeprefix("EVT_").lower(),
                        tally["received"], tally["out_of_resources"])

    # --- scoring (one thread) -------------------------------------------------------------------

    def _take_batch(self) -> list[Path]:
        with self._room:
            if not self._waiting:
                self._room.wait(0.5)
            if not self._waiting or self._stopping.is_set() or not self._scoring_allowed.is_set():
                return []
            deadline = time.monotonic() + self.fill_s
            while len(self._waiting) < self.batch and not self._stopping.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._room.wait(remaining)
            if not self._scoring_allowed.is_set():  # paused while the batch filled
                return []
            return [self._waiting.popleft() for _ in range(min(self.batch, len(self._waiting)))]

    def _score_loop(self) -> None:
        while not self._stopping.is_set():
            if not self._scoring_allowed.wait(0.5) or self._stopping.is_set():
                continue
            batch = self._take_batch()
            if not batch:
                continue
            try:
                self._score(batch)
            except Exception as err:  # noqa: BLE001  a bug or a full disk: they stay in received/
                logger.error("scoring a batch of %d instances failed (%s); they stay in the spool and are scored "
                             "at the next start", len(batch), _error_kind(err))
                with self._room:
                    self._unscored -= len(batch)
                    self._room.notify_all()

    def _score(self, batch: list[Path]) -> None:
        work = self.spool.batch_folder()
        try:
            answers = score_files(self.model, batch, work, model_name=self.model_name,
                                  model_version=self.model_version)
        except Exception as err:  # noqa: BLE001  the model failed: each instance gets the reason
            answers = [Scored([], "", f"scoring_failed: {type(err).__name__}") for _ in batch]
        outcomes = []
        for path, answer in zip(batch, answers):
            name = path.name.removesuffix(".dcm")
            if answer.error:
                outcomes.append(Outcome(name, "failed", error=answer.error))
            else:
                outcomes.append(Outcome(name, "scored", label=answer.label,
                                        objects=self.spool.publish(name, answer.objects)))
        if any(outcome.objects for outcome in outcomes):
            self._outbox_changed.set()
        self.spool.record(outcomes)
        for outcome in outcomes:
            self.spool.finish(outcome.name, failed=outcome.status == "failed")
        _remove_tree(work)
        failed = Counter(outcome.error.split(":", 1)[0] for outcome in outcomes if outcome.status == "failed")
        with self._room:
            self._unscored -= len(batch)
            self.counts["scored"] += len(batch) - sum(failed.values())
            self.counts["failed"] += sum(failed.values())
            self._room.notify_all()
        logger.info("scored %d instances: %d answered, %d not%s", len(batch), len(batch) - sum(failed.values()),
                    sum(failed.values()),
                    f" ({', '.join(f'{n} {reason}' for reason, n in failed.most_common())}; see outcomes.csv)"
                    if failed else "")

    # --- sending (one thread) ---------------------------------------------------------------------

    def _send_loop(self) -> None:
        stored_of: Counter[str] = Counter()  # objects of a result set stored so far
        refusals: Counter[str] = Counter()  # answered refusals in a row, by object
        while not self._stopping.is_set():
            ready = self.spool.ready()
            if not ready:
                self._outbox_changed.wait(1.0)
                self._outbox_changed.clear()
                continue
            chosen, paths = [], []
            for name, objects in ready:
                chosen.append((name, objects))
                paths += objects
                if len(paths) >= SEND_OBJECTS:
                    break
            answers = self._store_now(paths)
            stored = {path for path, (ok, _) in answers.items() if ok}
            for name, objects in chosen:
                done = [path for path in objects if str(path) in stored]
                for path in done:
                    path.unlink(missing_ok=True)
                    refusals.pop(str(path), None)
                stored_of[name] += len(done)
                refused = [str(path) for path in objects if is_refusal(answers.get(str(path), (True, ""))[1])]
                for path in refused:
                    refusals[path] += 1
                if len(done) == len(objects):
                    self.spool.sent(name, stored_of.pop(name))
                elif any(refusals[path] >= REFUSALS_KEPT for path in refused):
                    self.spool.reject(name)
                    for path in objects:
                        refusals.pop(str(path), None)
                    stored_of.pop(name, None)
                    with self._lock:
                        self.counts["rejected_sets"] += 1
                    logger.error("the destination refused a result set %d times (%s): moved to the spool's "
                                 "rejected/ folder, not tried again", REFUSALS_KEPT,
                                 "; ".join(sorted({answers[path][1] for path in refused})))
            with self._lock:
                self.counts["sent_objects"] += len(stored)
            if len(stored) == len(paths):
                if self.sender_failures:
                    logger.info("the destination is back: stored %d objects", len(stored))
                self.sender_failures = 0
                continue
            self.sender_failures += 1
            delay = min(self.retry_cap_s, self.retry_s * 2 ** (self.sender_failures - 1))
            details = Counter(detail for ok, detail in answers.values() if not ok)
            logger.warning("the destination stored %d of %d result objects (%s); the rest stay in the outbox "
                           "(%d result sets), next try in %.1f s (failure %d in a row)", len(stored), len(paths),
                           "; ".join(f"{n} {detail}" for detail, n in details.most_common(2)) or "no answer",
                           len(self.spool.ready()), delay, self.sender_failures)
            self._stopping.wait(delay)

    def _store_now(self, paths: list[Path]) -> dict[str, tuple[bool, str]]:
        """Each path's (stored, the destination's answer), by path as str: one try each (the
        back-off is this thread's, across calls)."""
        store = self._store
        if store is None:
            from dicomflow.pacs.push import store_objects as store
        try:
            outcomes = store(self.destination, paths, attempts=1, backoff_s=0.0)
        except Exception as err:  # noqa: BLE001  the destination's failure, whatever it is: retried
            return {str(path): (False, f"store failed: {_error_kind(err)}") for path in paths}
        return {str(outcome.path): (bool(outcome.stored), str(outcome.detail)) for outcome in outcomes}


# An answer that says the destination will not take this object (a file it cannot read, a SOP class
# or transfer syntax it does not accept, a failure status other than Out of Resources), as opposed
# to one that says it cannot be reached now: a result set refused REFUSALS_KEPT times in a row goes
# to the spool's rejected/ folder instead of holding the sender's back-off up forever.
REFUSALS_KEPT = 5
_REFUSAL = re.compile(r"^(not read|not sent|the PACS accepts no presentation context|DIMSE 0x(?!A7)[0-9A-F]{4} "
                      r"Failure|HTTP \d+ failed(?!: 0xA7))")


def is_refusal(detail: str) -> bool:
    """Whether a :class:`dicomflow.pacs.push.StoreOutcome` ``detail`` is the destination refusing
    the object (trying again will not help) rather than not being reachable."""
    return bool(_REFUSAL.match(detail))


def _error_kind(err: BaseException) -> str:
    """An exception as its type (and errno name): never its message, which may quote a path."""
    import errno

    code = getattr(err, "errno", None)
    return f"{type(err).__name__}{f' {errno.errorcode.get(code, code)}' if code else ''}"


def _remove_tree(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


# --- the command's glue ---------------------------------------------------------------------------

TLS_CERT_ENV = "DICOMFLOW_LISTEN_TLS_CERT"  # the listener's certificate chain (PEM)
TLS_KEY_ENV = "DICOMFLOW_LISTEN_TLS_KEY"  # its private key (PEM)
TLS_CLIENT_CA_ENV = "DICOMFLOW_LISTEN_TLS_CLIENT_CA"  # when set: senders must show a certificate it signed


def server_ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext | None:
    """The listener's TLS context from the environment: ``DICOMFLOW_LISTEN_TLS_CERT`` and
    ``DICOMFLOW_LISTEN_TLS_KEY`` (PEM files) turn TLS on (TLS 1.2 at least);
    ``DICOMFLOW_LISTEN_TLS_CLIENT_CA`` also asks each sender for a certificate signed by that CA.
    None when neither certificate nor key is set.

    Raises
    ------
    SettingsError
        One of certificate and key without the other, or a file that cannot be loaded.
    """
    cert, key, client_ca = (environ.get(name, "") for name in (TLS_CERT_ENV, TLS_KEY_ENV, TLS_CLIENT_CA_ENV))
    if not cert and not key:
        if client_ca:
            raise SettingsError(f"{TLS_CLIENT_CA_ENV} is set without {TLS_CERT_ENV} and {TLS_KEY_ENV}: set the "
                                "listener's certificate and key too, or unset it")
        return None
    if not (cert and key):
        raise SettingsError(f"listen: TLS needs both {TLS_CERT_ENV} and {TLS_KEY_ENV} (PEM files); one is missing")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
        if client_ca:
            context.load_verify_locations(cafile=client_ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as err:
        raise SettingsError(f"listen: the TLS files of {TLS_CERT_ENV}, {TLS_KEY_ENV} or {TLS_CLIENT_CA_ENV} cannot be "
                            f"loaded ({_error_kind(err)}): give PEM files this user can read") from None
    return context


def run_until_signalled(listener: Listener, *, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> None:
    """Start ``listener`` and run until one of ``signals`` arrives, then stop it (call from the
    main thread: only it may set signal handlers). Nothing acknowledged is lost: see
    :meth:`Listener.stop`."""
    caught: list[int] = []
    received = threading.Event()

    def on_signal(number: int, frame) -> None:
        caught.append(number)
        received.set()

    previous = {number: signal.signal(number, on_signal) for number in signals}
    try:
        listener.start()
        while not received.wait(1.0):
            pass
        logger.info("%s: stopping; what was acknowledged is on disk", signal.Signals(caught[0]).name)
    finally:
        listener.stop()
        for number, handler in previous.items():
            signal.signal(number, handler)
