"""Store DICOM objects in a PACS, each one's outcome reported, none lost silently.

Over DICOMweb the objects go by STOW-RS (dicomweb-client's ``store_instances``), a few per request;
over DIMSE by C-STORE, on associations proposing one presentation context per SOP class and
transfer syntax the files have (each file sent as it is stored, never transcoded). An object the
PACS did not take is tried again, with back-off, up to ``attempts`` times, then reported with the
PACS's last answer.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomflow.errors import SettingsError
from dicomflow.pacs.connection import (
    DICOMWEB,
    PacsAddress,
    PacsError,
    associate,
    credentials_hint,
    dicom_status_category,
    dicomweb_client,
    dimse_status,
    http_failure,
    http_session,
    new_ae,
    quiet_libraries,
)

logger = logging.getLogger(__name__)

MAX_CONTEXTS = 128          # presentation contexts one association may propose (PS3.8 9.3.2.2)
STOW_MAX_OBJECTS = 32       # objects per STOW-RS request
STOW_MAX_BYTES = 64 << 20   # and bytes (files' sizes) per request
REPORT_COLUMNS = ("path", "stored", "attempts", "detail")


@dataclass(frozen=True)
class StoreOutcome:
    """One object's fate: ``stored`` or not, the PACS's last answer in ``detail``, and how many
    tries it took (0: the file was never sent, e.g. not DICOM)."""

    path: Path
    stored: bool
    detail: str
    attempts: int


@dataclass
class _Item:
    path: Path
    sop_class: str = ""
    sop_instance: str = ""
    transfer_syntax: str = ""
    stored: bool = False
    detail: str = ""
    attempts: int = 0
    retry: bool = True   # False: trying again cannot help (unreadable file, refused credentials)


def _read_header(item: _Item) -> None:
    from pydicom import dcmread

    from dicomflow.runtime.log_privacy import hidden_pydicom_messages

    try:
        with hidden_pydicom_messages():
            ds = dcmread(item.path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            item.sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID") or "")
            item.sop_instance = str(ds.file_meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID") or "")
            item.transfer_syntax = str(ds.file_meta.get("TransferSyntaxUID") or "")
    except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user
        item.retry, item.detail = False, f"not read: not a DICOM file ({type(err).__name__})"
        return
    if not (item.sop_class and item.sop_instance and item.transfer_syntax):
        item.retry, item.detail = False, "not sent: the file lacks its SOP class, SOP instance or transfer syntax"


def store_objects(address: PacsAddress, paths: Sequence[Path], *, attempts: int = 3,
                  backoff_s: float = 1.0) -> list[StoreOutcome]:
    """Store each file in the PACS, trying a failed one again after ``backoff_s``, ``2 * backoff_s``...

    Parameters
    ----------
    address : PacsAddress
        The destination (:func:`dicomflow.pacs.connection.parse_address`).
    paths : sequence of Path
        DICOM files (Part 10).
    attempts : int, default=3
        Tries per object before it is reported as failed (at least 1).
    backoff_s : float, default=1.0
        Seconds before the second try; doubled before each further one.

    Returns
    -------
    list of StoreOutcome
        One per path, in order: stored or not, what the PACS answered, the tries made. Nothing is
        raised for an object the PACS refused or a PACS that cannot be reached: those are outcomes.

    Raises
    ------
    SettingsError
        ``attempts`` below 1 or a negative ``backoff_s``.
    """
    if attempts < 1:
        raise SettingsError(f"attempts must be at least 1; got {attempts}")
    if backoff_s < 0:
        raise SettingsError(f"backoff_s must be 0 or more; got {backoff_s}")
    items = [_Item(Path(path)) for path in paths]
    for item in items:
        _read_header(item)
    send = _store_dicomweb if address.kind == DICOMWEB else _store_dimse
    with quiet_libraries():
        for attempt in range(1, attempts + 1):
            pending = [item for item in items if not item.stored and item.retry]
            if not pending:
                break
            if attempt > 1:
                wait = backoff_s * 2 ** (attempt - 2)
                logger.info("push: %d object(s) not stored yet; trying again in %.1f s (attempt %d of %d)",
                            len(pending), wait, attempt, attempts)
                time.sleep(wait)
            for item in pending:
                item.attempts = attempt
            send(address, pending)
    return [StoreOutcome(item.path, item.stored, item.detail, item.attempts) for item in items]


def _batches(items: list[_Item], size: int, max_bytes: int) -> list[list[_Item]]:
    batches: list[list[_Item]] = []
    current: list[_Item] = []
    total = 0
    for item in items:
        length = item.path.stat().st_size if item.path.exists() else 0
        if current and (len(current) >= size or total + length > max_bytes):
            batches.append(current)
            current, total = [], 0
        current.append(item)
        total += length
    return batches + ([current] if current else [])


def _store_dicomweb(address: PacsAddress, items: list[_Item]) -> None:
    """STOW-RS, a few objects per request; each object's outcome from the response's sequences."""
    import requests
    from pydicom import dcmread

    from dicomflow.runtime.log_privacy import hidden_pydicom_messages

    session = http_session(address)
    statuses: list[int] = []  # dicomweb-client returns a 202's body as it does a 200's: the hook tells them apart
    session.hooks["response"].append(lambda response, *args, **kwargs: statuses.append(response.status_code))
    client = dicomweb_client(address, session=session)
    for batch in _batches(items, STOW_MAX_OBJECTS, STOW_MAX_BYTES):
        readable, datasets = [], []
        for item in batch:
            try:
                with hidden_pydicom_messages():
                    datasets.append(dcmread(item.path))
                readable.append(item)
            except Exception as err:  # noqa: BLE001 - any reader failure means the same to the user
                item.retry, item.detail = False, f"not read: not a whole DICOM file ({type(err).__name__})"
        if not readable:
            continue
        statuses.clear()
        try:
            answer = client.store_instances(datasets)
            status = statuses[-1] if statuses else 200
        except requests.RequestException as err:
            failure = http_failure(err)
            response = getattr(err, "response", None)
            answer = _stow_answer(response)
            if answer is None:  # no per-object answer: the request as a whole failed
                status = None if response is None else response.status_code
                if status in (401, 403):
                    failure += f": access refused; {credentials_hint(address)}"
                for item in readable:
                    item.detail = failure
                    # Refused credentials or a request the PACS will never take: trying again cannot help.
                    item.retry = status not in (400, 401, 403, 413)
                continue
            status = response.status_code
        finally:
            del datasets
        _read_stow_answer(answer, readable, status)


def _stow_answer(response):
    """The STOW-RS response body of a failed request (409: some objects failed), when it has one."""
    import pydicom

    import requests

    try:
        if response is None or not response.content:
            return None
        return pydicom.Dataset.from_json(response.json())
    except (ValueError, TypeError, AttributeError, requests.RequestException):  # a body too large, not JSON
        return None


def _read_stow_answer(answer, batch: list[_Item], status: int) -> None:
    stored = {str(entry.get("ReferencedSOPInstanceUID", "")): entry
              for entry in answer.get("ReferencedSOPSequence", [])}
    failed = {str(entry.get("ReferencedSOPInstanceUID", "")): entry for entry in answer.get("FailedSOPSequence", [])}
    for item in batch:
        if item.sop_instance in stored:
            warning = stored[item.sop_instance].get("WarningReason")
            item.stored = True
            item.detail = f"HTTP {status} stored" + (f", warning 0x{int(warning):04X}" if warning is not None else "")
        elif item.sop_instance in failed:
            reason = failed[item.sop_instance].get("FailureReason")
            item.detail = f"HTTP {status} failed" + (f": {dimse_status(int(reason))}" if reason is not None else "")
        else:
            item.detail = f"HTTP {status}, but the PACS's answer does not list this object"


def _store_dimse(address: PacsAddress, items: list[_Item]) -> None:
    """C-STORE on associations of at most :data:`MAX_CONTEXTS` (SOP class, transfer syntax) pairs."""
    groups: list[tuple[list[tuple[str, str]], list[_Item]]] = []
    index: dict[tuple[str, str], int] = {}
    for item in items:
        pair = (item.sop_class, item.transfer_syntax)
        if pair not in index:
            if not groups or len(groups[-1][0]) >= MAX_CONTEXTS:
                groups.append(([], []))
            groups[-1][0].append(pair)
            index[pair] = len(groups) - 1
        groups[index[pair]][1].append(item)
    for pairs, members in groups:
        ae = new_ae(address)
        for sop_class, syntax in pairs:
            ae.add_requested_context(sop_class, syntax)
        try:
            assoc = associate(ae, address)
        except PacsError as err:
            for item in members:
                item.detail = str(err)
            continue
        try:
            accepted = {(context.abstract_syntax, context.transfer_syntax[0]) for context in assoc.accepted_contexts}
            for item in members:
                if (item.sop_class, item.transfer_syntax) not in accepted:
                    item.retry = False
                    item.detail = (f"the PACS accepts no presentation context for SOP class {item.sop_class} "
                                   f"in transfer syntax {item.transfer_syntax}")
                    continue
                if not assoc.is_established:
                    item.detail = "association aborted before this object was sent"
                    continue
                try:
                    answer = assoc.send_c_store(item.path)
                except (OSError, ValueError, AttributeError) as err:  # the file changed since its header was read
                    item.retry, item.detail = False, f"not sent: the file could not be read ({type(err).__name__})"
                    continue
                if "Status" not in answer:
                    item.detail = "no answer to C-STORE (association aborted or timed out)"
                    continue
                code = int(answer.Status)
                item.detail = f"DIMSE {dimse_status(code)}"
                item.stored = dicom_status_category(code) in ("Success", "Warning")
        finally:
            if assoc.is_established:
                assoc.release()


def write_push_report(outcomes: Sequence[StoreOutcome], path: Path) -> Path:
    """The report CSV: one row per object (``path, stored, attempts, detail``); returns ``path``."""
    import io

    from dicomflow.runtime.outputs import write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for outcome in outcomes:
        writer.writerow([str(outcome.path), "yes" if outcome.stored else "no", outcome.attempts, outcome.detail])
    write_text(path, buffer.getvalue())
    return path


def dicom_files(folder: Path) -> list[Path]:
    """The regular files under ``folder`` (or ``folder`` itself when a file), sorted; hidden ones
    (a name starting with ".", as a pull's partial downloads) left out."""
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise SettingsError(f"{folder} is neither a file nor a folder; give the folder of objects to push")
    return sorted(path for path in folder.rglob("*") if path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(folder).parts))
