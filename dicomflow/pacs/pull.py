"""Pull studies from a PACS into a folder: the ones a labels table names, or a query's.

Studies are found by QIDO-RS (DICOMweb) or C-FIND at study, then series and image level (DIMSE),
and their instances retrieved one by one by WADO-RS, C-GET (this side taking the storage SCP role,
compressed transfer syntaxes proposed so that objects arrive as the PACS stores them) or C-MOVE (to
a storage SCP this command runs for the time of the pull).

Each instance lands at ``OUT/pacs/<hash of its study UID>/<hash of its SOP Instance UID>.dcm``:
names carry no identifier (file paths travel into ingest's index). A file is written under a hidden
temporary name (``.NAME.partial``, which ingest skips) and renamed when complete, so a pull that
was interrupted leaves no file that looks whole, and the next pull fetches only the instances whose
file is not there yet.

Nothing here logs an accession number or a UID: counts only. What could not be got is in the
:class:`PullResult`'s rows (:func:`write_pull_report` writes them), with the PACS's reason.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomflow.errors import DataError, SettingsError
from dicomflow.pacs.connection import (
    DICOMWEB,
    PacsAddress,
    PacsError,
    associate,
    dicom_status_category,
    dicomweb_client,
    dimse_status,
    http_failure,
    is_loopback,
    new_ae,
    quiet_libraries,
    refused_credentials,
)
from dicomflow.runtime.progress import progress

logger = logging.getLogger(__name__)

PULL_FOLDER = "pacs"            # under --out
PARTIAL_SUFFIX = ".partial"     # a download in progress: .<name>.partial
STUDY_KEYS = ("accession_number", "study_instance_uid")
QUERY_KEY = "query"
REPORT_COLUMNS = ("key", "value", "study_instance_uid", "instances", "fetched", "already_present", "failed",
                  "reason")
# C-GET: proposed for each SOP class, one presentation context per compressed syntax (so each object
# comes as the PACS stores it, never transcoded) and one for the uncompressed ones.
COMPRESSED_SYNTAXES = (
    "1.2.840.10008.1.2.4.50",   # JPEG baseline
    "1.2.840.10008.1.2.4.51",   # JPEG extended
    "1.2.840.10008.1.2.4.57",   # JPEG lossless
    "1.2.840.10008.1.2.4.70",   # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.80",   # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",   # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",   # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",   # JPEG 2000
    "1.2.840.10008.1.2.5",      # RLE lossless
)
UNCOMPRESSED_SYNTAXES = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # explicit, implicit VR little endian
MAX_CONTEXTS = 128
# C-GET of instances whose SOP class C-FIND did not give: proposed for these (at most
# SOP_CLASSES_PER_ASSOCIATION of them).
COMMON_IMAGE_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.1",      # CR
    "1.2.840.10008.5.1.4.1.1.1.1",    # DX, for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX, for processing
    "1.2.840.10008.5.1.4.1.1.1.2",    # MG, for presentation
    "1.2.840.10008.5.1.4.1.1.2",      # CT
    "1.2.840.10008.5.1.4.1.1.2.1",    # enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",      # MR
    "1.2.840.10008.5.1.4.1.1.4.1",    # enhanced MR
    "1.2.840.10008.5.1.4.1.1.6.1",    # US
    "1.2.840.10008.5.1.4.1.1.7",      # secondary capture
    "1.2.840.10008.5.1.4.1.1.20",     # NM
    "1.2.840.10008.5.1.4.1.1.128",    # PET
)
CONTEXTS_PER_SOP_CLASS = len(COMPRESSED_SYNTAXES) + 1
SOP_CLASSES_PER_ASSOCIATION = (MAX_CONTEXTS - 1) // CONTEXTS_PER_SOP_CLASS  # one context is C-GET's own
WILDCARDS = ("*", "?", "\\")  # matching characters of C-FIND and QIDO-RS
QIDO_PAGE = 500  # results asked for per QIDO-RS request
DATE = re.compile(r"^\d{8}$")
# A UID as a PACS may give it (leading zeros tolerated, as permissive_uid does): digits and single
# dots, 64 characters at most. Anything else (a "/", "..", a newline) is refused before it goes
# into a WADO-RS path, a C-GET identifier or the report.
UID = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")


def is_uid(value: str) -> bool:
    """Whether ``value`` is shaped like a DICOM UID (see :data:`UID`)."""
    return len(value) <= 64 and bool(UID.match(value))


@dataclass(frozen=True)
class StudyQuery:
    """Studies by modality and study date (inclusive, ``YYYYMMDD``; either end open)."""

    modality: str
    date_from: str | None = None
    date_to: str | None = None

    def __post_init__(self) -> None:
        if not self.modality or not self.modality.replace("_", "").isalnum() or len(self.modality) > 16:
            raise SettingsError(f"modality must be a DICOM modality code such as DX, CT or MR; got {self.modality!r}")
        for name, value in (("date-from", self.date_from), ("date-to", self.date_to)):
            if value is not None and not DATE.match(value):
                raise SettingsError(f"--{name} must be a date as YYYYMMDD; got {value!r}")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise SettingsError(f"--date-from {self.date_from} is after --date-to {self.date_to}; swap them")

    @property
    def date_range(self) -> str | None:
        """The DICOM range matching value (``D1-D2``, ``D1-``, ``-D2``), None when unbounded."""
        if not (self.date_from or self.date_to):
            return None
        return f"{self.date_from or ''}-{self.date_to or ''}"

    def describe(self) -> str:
        return f"modality={self.modality}" + (f" study_date={self.date_range}" if self.date_range else "")


@dataclass
class PullRow:
    """One study of the pull (or one key the PACS had no study for): a row of the report."""

    key: str
    value: str
    study_instance_uid: str = ""
    instances: int = 0
    fetched: int = 0
    already_present: int = 0
    failed: int = 0
    reasons: Counter = field(default_factory=Counter)

    @property
    def complete(self) -> bool:
        return bool(self.study_instance_uid) and not self.failed and not self.reasons

    @property
    def reason(self) -> str:
        return "; ".join(f"{n} x {text}" if n > 1 else text for text, n in self.reasons.most_common())


@dataclass(frozen=True)
class PullResult:
    """Every study of a pull, and where its files went."""

    rows: list[PullRow]
    folder: Path

    @property
    def fetched(self) -> int:
        return sum(row.fetched for row in self.rows)

    @property
    def already_present(self) -> int:
        return sum(row.already_present for row in self.rows)

    @property
    def failed_instances(self) -> int:
        return sum(row.failed for row in self.rows)

    @property
    def incomplete(self) -> list[PullRow]:
        """The rows with something missing: a key without a study, a study without every instance."""
        return [row for row in self.rows if not row.complete]

    def summary(self) -> str:
        """One line of counts (no key, no UID)."""
        studies = sum(1 for row in self.rows if row.study_instance_uid)
        unmatched = [row for row in self.rows if not row.study_instance_uid]
        not_found = sum(1 for row in unmatched if row.reason.startswith("not found"))
        text = (f"pull: {studies} study(ies), {self.fetched} instance(s) fetched, {self.already_present} already "
                f"there")
        if not_found:
            text += f", {not_found} key(s) the PACS has no study for"
        if len(unmatched) > not_found:
            text += f", {len(unmatched) - not_found} key(s) not searched (* ? or \\ in them)"
        if self.failed_instances:
            reasons = Counter()
            for row in self.rows:
                reasons.update(row.reasons)
            text += (f", {self.failed_instances} instance(s) NOT fetched ("
                     + "; ".join(f"{n}: {text}" for text, n in reasons.most_common()) + ")")
        elif any(row.reasons for row in self.rows if row.study_instance_uid):
            text += ", some studies not searched completely"
        return text


@dataclass(frozen=True)
class Instance:
    """One object to fetch, and the file it goes to."""

    study: str
    series: str
    sop_instance: str
    sop_class: str
    target: Path


def _digest(uid: str, length: int) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:length]


def instance_path(out: Path, study_instance_uid: str, sop_instance_uid: str) -> Path:
    """Where a pulled instance is written: ``OUT/pacs/<16 hex>/<32 hex>.dcm`` (hashes of the UIDs)."""
    return out / PULL_FOLDER / _digest(study_instance_uid, 16) / f"{_digest(sop_instance_uid, 32)}.dcm"


def partial_path(target: Path) -> Path:
    """The hidden temporary name ``target`` is written under before it is renamed."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def write_atomically(target: Path, data: bytes) -> None:
    """``data`` to ``target`` through :func:`partial_path` (synced, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(target)
    try:
        with partial.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def keys_from_labels(labels: Path, key: str) -> list[str]:
    """The distinct non-empty values of the labels table's ``key`` column, in the table's order.

    Raises
    ------
    SettingsError
        ``key`` is not accession_number or study_instance_uid.
    DataError
        The table cannot be read, lacks the column, or names no study.
    """
    import pandas as pd

    if key not in STUDY_KEYS:
        raise SettingsError(f"--key must be one of {', '.join(STUDY_KEYS)}; got {key!r}")
    try:
        header = pd.read_csv(labels, dtype=str, nrows=0).columns
    except (OSError, ValueError) as err:
        raise DataError(f"{labels}: not a readable CSV table ({type(err).__name__}); give the labels table") from None
    if key not in header:
        raise DataError(f"{labels}: no column {key}; found {', '.join(header)} (choose the column with --key)")
    values = pd.read_csv(labels, dtype=str, keep_default_na=False, usecols=[key])[key].str.strip()
    keys = list(dict.fromkeys(value for value in values if value))
    if not keys:
        raise DataError(f"{labels}: the {key} column is empty; nothing to pull")
    return keys


def pull_studies(address: PacsAddress, *, out: Path, keys: Sequence[str] = (), key: str = "accession_number",
                 query: StudyQuery | None = None, retrieve: str = "get", move_port: int = 0,
                 move_host: str | None = None) -> PullResult:
    """Find the studies and fetch every instance not already under ``out``.

    Parameters
    ----------
    address : PacsAddress
        The PACS (:func:`dicomflow.pacs.connection.parse_address`).
    out : Path
        The data folder; files go to ``out/pacs/`` (:func:`instance_path`).
    keys : sequence of str
        Accession numbers or Study Instance UIDs (``key`` says which); empty with ``query``.
    key : str, default="accession_number"
        ``accession_number`` or ``study_instance_uid``.
    query : StudyQuery, optional
        Instead of ``keys``: the studies of a modality, between two dates.
    retrieve : str, default="get"
        DIMSE only: ``get`` (C-GET) or ``move`` (C-MOVE to a storage SCP started here).
    move_port : int, default=0
        C-MOVE: the port of that storage SCP, as the PACS knows it for our AE title.
    move_host : str, optional
        C-MOVE: the address it binds (default: 127.0.0.1 for a PACS on loopback, else every interface).

    Returns
    -------
    PullResult
        One row per study (and per key the PACS had no study for): instances found, fetched, already
        there, failed, and the PACS's reasons.

    Raises
    ------
    PacsError
        The PACS cannot be reached or refused us (credentials, AE title) while searching.
    SettingsError
        Neither or both of ``keys`` and ``query``; C-MOVE without ``move_port``.
    """
    if bool(keys) == (query is not None):
        raise SettingsError("give either study keys (a labels table) or a query (--modality), not both or neither")
    if retrieve not in ("get", "move"):
        raise SettingsError(f"retrieve must be get or move; got {retrieve!r}")
    if query is None and key not in STUDY_KEYS:
        raise SettingsError(f"key must be one of {', '.join(STUDY_KEYS)}; got {key!r}")
    if address.kind == DICOMWEB and retrieve == "move":
        raise SettingsError(f"--retrieve move is DIMSE's C-MOVE; {address} is a DICOMweb address (WADO-RS)")
    if address.kind != DICOMWEB and retrieve == "move" and not move_port:
        raise SettingsError("--retrieve move needs --move-port: the port the PACS sends to for AE title "
                            f"{address.calling_aet}")
    with quiet_libraries():
        backend: _Backend = _DicomWeb(address) if address.kind == DICOMWEB else _Dimse(
            address, retrieve=retrieve, move_port=move_port, move_host=move_host)
        try:
            rows, instances = _find(backend, out, keys=keys, key=key, query=query)
            todo = []
            for row, instance in instances:
                row.instances += 1
                if instance.target.exists():
                    row.already_present += 1
                else:
                    todo.append((row, instance))
            _clear_partials({instance.target.parent for _, instance in instances})
            logger.info("pull: %d instance(s) in %d study(ies), %d already there, %d to fetch", len(instances),
                        sum(1 for row in rows if row.study_instance_uid), len(instances) - len(todo), len(todo))
            by_instance = {id(instance): row for row, instance in todo}
            per_series = Counter((instance.study, instance.series) for _, instance in instances)
            missing = Counter((instance.study, instance.series) for _, instance in todo)
            whole_series = {series: n for series, n in missing.items() if per_series[series] == n}
            fetched = backend.retrieve([instance for _, instance in todo], whole_series)
            for instance, failure in progress(fetched, total=len(todo), what="pacs pull", unit="instance"):
                row = by_instance[id(instance)]
                if failure is None:
                    row.fetched += 1
                else:
                    row.failed += 1
                    row.reasons[failure] += 1
        finally:
            backend.close()
    return PullResult(rows, out / PULL_FOLDER)


def _clear_partials(folders: set[Path]) -> None:
    """Remove what an interrupted pull left half-written (it is fetched again)."""
    for folder in folders:
        for partial in folder.glob(f".*{PARTIAL_SUFFIX}"):
            partial.unlink(missing_ok=True)


def _find(backend: _Backend, out: Path, *, keys: Sequence[str], key: str,
          query: StudyQuery | None) -> tuple[list[PullRow], list[tuple[PullRow, Instance]]]:
    rows: list[PullRow] = []
    instances: list[tuple[PullRow, Instance]] = []
    seen: set[str] = set()
    seen_instances: set[str] = set()
    requests = [(key, value) for value in keys] if query is None else [(QUERY_KEY, query.describe())]
    for kind, value in progress(requests, total=len(requests), what="pacs find", unit="key"):
        if kind != QUERY_KEY and any(char in value for char in WILDCARDS):
            # A PACS reads these as patterns: one row of the table would pull other patients' studies.
            rows.append(PullRow(kind, value, reasons=Counter({"not searched: the key holds * ? or \\": 1})))
            continue
        studies = backend.find_studies(kind, value, query)
        malformed = [study for study in studies if not is_uid(study)]
        studies = [study for study in studies if is_uid(study)]
        if malformed:
            rows.append(PullRow(kind, value, reasons=Counter(
                {"the PACS answered a malformed Study Instance UID (not fetched)": len(malformed)})))
        if not studies and malformed:
            continue
        if not studies:
            what = "no study matches the query" if kind == QUERY_KEY else f"the PACS has no study with this {kind}"
            rows.append(PullRow(kind, value, reasons=Counter({f"not found: {what}": 1})))
            continue
        for study in studies:
            if study in seen:  # two keys naming one study: fetched once, each key in the report
                rows.append(PullRow(kind, value, study_instance_uid=study))
                continue
            seen.add(study)
            row = PullRow(kind, value, study_instance_uid=study)
            rows.append(row)
            try:
                found = backend.find_instances(study)
            except _InstanceSearchFailed as err:
                row.reasons[str(err)] += 1
                continue
            if not found:
                row.reasons["the PACS lists no instance in this study"] += 1
            for series, sop_instance, sop_class in found:
                if not (is_uid(series) and is_uid(sop_instance) and (not sop_class or is_uid(sop_class))):
                    row.reasons["the PACS listed an instance with a malformed UID (not fetched)"] += 1
                    continue
                if sop_instance in seen_instances:  # listed twice (two series, or a PACS repeating itself)
                    continue
                seen_instances.add(sop_instance)
                instances.append((row, Instance(study, series, sop_instance, sop_class,
                                                instance_path(out, study, sop_instance))))
    return rows, instances


class _InstanceSearchFailed(Exception):
    """One study's instances could not be listed; the message is the PACS's reason (no UID)."""


class _Backend:
    def find_studies(self, kind: str, value: str, query: StudyQuery | None) -> list[str]:
        raise NotImplementedError

    def find_instances(self, study: str) -> list[tuple[str, str, str]]:
        """(series UID, SOP Instance UID, SOP Class UID) of each instance of the study."""
        raise NotImplementedError

    def retrieve(self, instances: list[Instance],
                 whole_series: Mapping[tuple[str, str], int]) -> Iterator[tuple[Instance, str | None]]:
        """Write each instance to its target; yield it with None, or with why it could not be got.
        ``whole_series``: (study, series) of which every instance is to be fetched -> how many."""
        raise NotImplementedError

    def close(self) -> None:
        pass


# DICOMweb: QIDO-RS and WADO-RS

def _json_value(item: dict, tag: str) -> str:
    """The first value of ``tag`` in a DICOM JSON item, "" when absent or not shaped as the standard
    says (a broken or hostile PACS): one odd item never ends the search."""
    element = item.get(tag) if isinstance(item, dict) else None
    values = element.get("Value") if isinstance(element, dict) else None
    if not isinstance(values, list) or not values or not isinstance(values[0], (str, int, float)):
        return ""
    return str(values[0])


class _DicomWeb(_Backend):
    def __init__(self, address: PacsAddress) -> None:
        self.address = address
        self.client = dicomweb_client(address)

    def _search(self, call: Callable[[], list[dict]], *, study_level: bool) -> list[dict]:
        import requests

        try:
            return call()
        except requests.RequestException as err:
            response = getattr(err, "response", None)
            if response is not None and response.status_code in (401, 403):
                raise refused_credentials(self.address, response.status_code) from None
            if study_level:
                raise PacsError(f"searching {self.address} failed: {http_failure(err)}; check the address and that "
                                "the PACS is up") from None
            raise _InstanceSearchFailed(f"instance search failed: {http_failure(err)}") from None

    def _paged(self, call: Callable[[int, int], list[dict]], *, study_level: bool) -> list[dict]:
        """Every page of a QIDO-RS search. Paged by hand: dicomweb-client's get_remaining asks until
        an empty page, and a PACS that ignores ``offset`` without ``limit`` (Orthanc) never sends one."""
        results: list[dict] = []
        seen: set[str] = set()
        offset = 0
        while True:
            page = self._search(lambda: call(QIDO_PAGE, offset), study_level=study_level)
            fresh = [item for item in page if json.dumps(item, sort_keys=True) not in seen]
            seen.update(json.dumps(item, sort_keys=True) for item in fresh)
            results.extend(fresh)
            if len(page) < QIDO_PAGE or not fresh:  # the last page, or a PACS repeating itself
                return results
            offset += len(page)

    def find_studies(self, kind: str, value: str, query: StudyQuery | None) -> list[str]:
        if query is not None:
            filters = {"ModalitiesInStudy": query.modality}
            if query.date_range:
                filters["StudyDate"] = query.date_range
        else:
            filters = {"AccessionNumber" if kind == "accession_number" else "StudyInstanceUID": value}
        found = self._paged(lambda limit, offset: self.client.search_for_studies(
            search_filters=filters, fields=["StudyInstanceUID", "AccessionNumber"], limit=limit, offset=offset),
            study_level=True)
        if kind == "accession_number":  # a PACS may match loosely, or answer other studies: keep the exact ones
            found = [item for item in found if _json_value(item, "00080050") == value]
        studies = [_json_value(item, "0020000D") for item in found]
        if kind == "study_instance_uid":  # a PACS may match loosely (wildcards); keep the exact one
            studies = [study for study in studies if study == value]
        return list(dict.fromkeys(study for study in studies if study))

    def find_instances(self, study: str) -> list[tuple[str, str, str]]:
        found = self._paged(lambda limit, offset: self.client.search_for_instances(
            study_instance_uid=study, fields=["SOPClassUID"], limit=limit, offset=offset), study_level=False)
        # An instance of another study than asked is left out (its file would be named after this one).
        return [(_json_value(item, "0020000E"), _json_value(item, "00080018"), _json_value(item, "00080016"))
                for item in found if _json_value(item, "00080018")
                and _json_value(item, "0020000D") in ("", study)]

    def retrieve(self, instances: list[Instance],
                 whole_series: Mapping[tuple[str, str], int]) -> Iterator[tuple[Instance, str | None]]:
        import requests

        from dicomflow.runtime.log_privacy import hidden_pydicom_messages

        for instance in instances:
            try:
                with hidden_pydicom_messages():
                    ds = self.client.retrieve_instance(instance.study, instance.series, instance.sop_instance,
                                                       media_types=(("application/dicom", "*"),))
                    if (str(ds.get("SOPInstanceUID", "")) != instance.sop_instance
                            or str(ds.get("StudyInstanceUID", "")) != instance.study):
                        # Written, it would stand under the asked instance's name for another object.
                        yield instance, "WADO-RS answered another instance than the one asked for (not written)"
                        continue
                    buffer = io.BytesIO()
                    ds.save_as(buffer, enforce_file_format=True)
            except requests.RequestException as err:
                yield instance, f"WADO-RS {http_failure(err)}"
                continue
            except Exception as err:  # noqa: BLE001  an answer that is not one DICOM object, whatever the reader says
                yield instance, f"WADO-RS answer not readable ({type(err).__name__})"
                continue
            write_atomically(instance.target, buffer.getvalue())
            yield instance, None


# DIMSE: C-FIND, then C-GET or C-MOVE

class _Dimse(_Backend):
    def __init__(self, address: PacsAddress, *, retrieve: str, move_port: int, move_host: str | None) -> None:
        self.address = address
        self.retrieve_by = retrieve
        self.move_port = move_port
        self.move_host = move_host
        self.whole_series: dict[tuple[str, str], int] = {}
        self._find_assoc = None

    def _finder(self):
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        if self._find_assoc is None or not self._find_assoc.is_established:
            ae = new_ae(self.address)
            ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
            self._find_assoc = associate(ae, self.address)
        return self._find_assoc

    def _c_find(self, identifier, *, study_level: bool) -> list:
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

        answers = []
        for status, found in self._finder().send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind):
            if "Status" not in status:
                failure = "C-FIND got no answer (association aborted or timed out)"
                self._find_assoc = None
                break
            code = int(status.Status)
            category = dicom_status_category(code)
            if category == "Pending":
                if found is not None:
                    answers.append(found)
                continue
            if category in ("Success", "Warning"):
                return answers
            failure = f"C-FIND {dimse_status(code, 'find')}"
            break
        else:
            failure = "C-FIND ended without a final status"
        if study_level:
            raise PacsError(f"searching {self.address} failed: {failure}")
        raise _InstanceSearchFailed(failure)

    def find_studies(self, kind: str, value: str, query: StudyQuery | None) -> list[str]:
        from pydicom import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "STUDY"
        identifier.StudyInstanceUID = value if kind == "study_instance_uid" else ""
        identifier.AccessionNumber = value if kind == "accession_number" else ""
        if query is not None:
            identifier.ModalitiesInStudy = query.modality
            identifier.StudyDate = query.date_range or ""
        answers = self._c_find(identifier, study_level=True)
        if kind == "accession_number":  # a PACS may match loosely, or answer other studies: keep the exact ones
            answers = [found for found in answers if str(found.get("AccessionNumber", "")) == value]
        studies = [str(found.get("StudyInstanceUID", "")) for found in answers]
        if kind == "study_instance_uid":
            studies = [study for study in studies if study == value]
        return list(dict.fromkeys(study for study in studies if study))

    def find_instances(self, study: str) -> list[tuple[str, str, str]]:
        from pydicom import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study
        identifier.SeriesInstanceUID = ""
        series_uids = [str(found.get("SeriesInstanceUID", ""))
                       for found in self._c_find(identifier, study_level=False)]
        instances = []
        for series in dict.fromkeys(uid for uid in series_uids if uid):
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "IMAGE"
            identifier.StudyInstanceUID = study
            identifier.SeriesInstanceUID = series
            identifier.SOPInstanceUID = ""
            identifier.SOPClassUID = ""
            for found in self._c_find(identifier, study_level=False):
                if sop := str(found.get("SOPInstanceUID", "")):
                    instances.append((series, sop, str(found.get("SOPClassUID", ""))))
        return instances

    def close(self) -> None:
        if self._find_assoc is not None and self._find_assoc.is_established:
            self._find_assoc.release()
        self._find_assoc = None

    @staticmethod
    def _identifier(instance: Instance):
        from pydicom import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "IMAGE"
        identifier.StudyInstanceUID = instance.study
        identifier.SeriesInstanceUID = instance.series
        identifier.SOPInstanceUID = instance.sop_instance
        return identifier

    def retrieve(self, instances: list[Instance],
                 whole_series: Mapping[tuple[str, str], int]) -> Iterator[tuple[Instance, str | None]]:
        self.close()  # the searches are over: one association at a time
        self.whole_series = dict(whole_series)
        if not instances:
            return
        receiver = _Receiver({instance.sop_instance: instance.target for instance in instances})
        if self.retrieve_by == "move":
            yield from self._retrieve_move(instances, receiver)
        else:
            yield from self._retrieve_get(instances, receiver)

    def _retrieve_get(self, instances: list[Instance], receiver: _Receiver) -> Iterator[tuple[Instance, str | None]]:
        from pynetdicom import build_role, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

        by_class: dict[str, list[Instance]] = {}
        for instance in instances:
            by_class.setdefault(instance.sop_class, []).append(instance)
        unknown = by_class.pop("", [])
        classes = sorted(by_class)
        groups = [(classes[start:start + SOP_CLASSES_PER_ASSOCIATION],
                   [instance for sop_class in classes[start:start + SOP_CLASSES_PER_ASSOCIATION]
                    for instance in by_class[sop_class]])
                  for start in range(0, len(classes), SOP_CLASSES_PER_ASSOCIATION)]
        if unknown:  # C-FIND did not give their SOP class (optional there): the common image classes
            groups.append((list(COMMON_IMAGE_SOP_CLASSES), unknown))
        for group, members in groups:

            def connect():
                ae = new_ae(self.address)
                ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
                for sop_class in group:
                    for syntax in COMPRESSED_SYNTAXES:
                        ae.add_requested_context(sop_class, syntax)
                    ae.add_requested_context(sop_class, list(UNCOMPRESSED_SYNTAXES))
                roles = [build_role(sop_class, scp_role=True) for sop_class in group]
                return associate(ae, self.address, ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, receiver.handle)])

            yield from self._per_instance(members, receiver, connect, lambda assoc, identifier: assoc.send_c_get(
                identifier, StudyRootQueryRetrieveInformationModelGet), "get")

    def _retrieve_move(self, instances: list[Instance], receiver: _Receiver) -> Iterator[tuple[Instance, str | None]]:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

        scp = AE(ae_title=self.address.calling_aet)
        for context in AllStoragePresentationContexts:
            scp.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        scp.require_calling_aet = [self.address.called_aet]  # only the PACS may store here
        host = self.move_host or ("127.0.0.1" if is_loopback(self.address.host) else "")
        try:
            server = scp.start_server((host, self.move_port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, receiver.handle)])
        except OSError as err:
            raise PacsError(f"cannot listen on port {self.move_port} for C-MOVE ({err.strerror}); choose a free "
                            "port the PACS knows for this AE title") from None
        try:
            def connect():
                ae = new_ae(self.address)
                ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
                return associate(ae, self.address)

            yield from self._per_instance(instances, receiver, connect, lambda assoc, identifier: assoc.send_c_move(
                identifier, self.address.calling_aet, StudyRootQueryRetrieveInformationModelMove), "move")
        finally:
            server.shutdown()

    def _per_instance(self, members: list[Instance], receiver: _Receiver, connect, send,
                      service: str) -> Iterator[tuple[Instance, str | None]]:
        """Retrieve the instances on an association (made again when it dropped): a series none of
        whose instances is here yet in one request (a PACS opens one association per C-MOVE
        request), any other instance by itself."""
        by_series: dict[tuple[str, str], list[Instance]] = {}
        for instance in members:
            by_series.setdefault((instance.study, instance.series), []).append(instance)
        requests = []
        for (study, series), group in by_series.items():
            if len(group) > 1 and self.whole_series.get((study, series)) == len(group):
                requests.append((self._series_identifier(study, series), group))
            else:
                requests.extend((self._identifier(instance), [instance]) for instance in group)
        assoc = None
        try:
            for number, (identifier, group) in enumerate(requests):
                if assoc is None or not assoc.is_established:
                    try:
                        assoc = connect()
                    except PacsError as err:
                        for _, rest in requests[number:]:
                            for instance in rest:
                                yield instance, str(err)
                        return
                yield from self._request(assoc, identifier, group, receiver, send, service)
        finally:
            if assoc is not None and assoc.is_established:
                assoc.release()

    @staticmethod
    def _series_identifier(study: str, series: str):
        from pydicom import Dataset

        identifier = Dataset()
        identifier.QueryRetrieveLevel = "SERIES"
        identifier.StudyInstanceUID = study
        identifier.SeriesInstanceUID = series
        return identifier

    @staticmethod
    def _request(assoc, identifier, group: list[Instance], receiver: _Receiver, send,
                 service: str) -> Iterator[tuple[Instance, str | None]]:
        final = None
        for status, _ in send(assoc, identifier):
            if "Status" not in status:
                break
            code = int(status.Status)
            if dicom_status_category(code) != "Pending":
                final = code
        for instance in group:
            failure = receiver.failures.pop(instance.sop_instance, None)
            if instance.target.exists():
                yield instance, None
            elif failure:
                yield instance, failure
            elif final is None:
                yield instance, f"C-{service.upper()} got no final answer (association aborted or timed out)"
            elif dicom_status_category(final) in ("Success", "Warning"):
                yield instance, f"C-{service.upper()} {dimse_status(final, service)}, but no object arrived"
            else:
                yield instance, f"C-{service.upper()} {dimse_status(final, service)}"


class _Receiver:
    """The storage SCP's C-STORE handler: each expected object written whole to its target."""

    def __init__(self, targets: dict[str, Path]) -> None:
        self.targets = targets
        self.failures: dict[str, str] = {}
        self.lock = threading.Lock()

    def handle(self, event) -> int:
        sop_instance = str(event.request.AffectedSOPInstanceUID)
        target = self.targets.get(sop_instance)
        if target is None:
            return 0xA900  # not asked for: refused (Data Set does not match SOP Class)
        try:
            if str(event.dataset.get("SOPInstanceUID", "")) != sop_instance:
                return 0xA900  # the object is not the one its command names: refused, not written
        except Exception:  # noqa: BLE001  not decodable: refused
            return 0xC000
        try:
            data = event.encoded_dataset(include_meta=True)
            write_atomically(target, data)
        except OSError as err:
            with self.lock:
                self.failures[sop_instance] = f"not written here: {err.strerror or type(err).__name__}"
            return 0xA700  # out of resources
        return 0x0000


def write_pull_report(result: PullResult, path: Path) -> Path:
    """The report CSV: one row per study and per key without a study (:data:`REPORT_COLUMNS`); it
    names the keys and Study Instance UIDs, as the labels table does. Returns ``path``."""
    from dicomflow.runtime.outputs import write_text

    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(REPORT_COLUMNS)
    for row in result.rows:
        writer.writerow([row.key, row.value, row.study_instance_uid, row.instances, row.fetched, row.already_present,
                         row.failed, row.reason])
    write_text(path, buffer.getvalue())
    return path
