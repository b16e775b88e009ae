"""Leak check: the identifying values of the source files, searched in every de-identified output.

:func:`collect_identifiers` takes the values from a source dataset (names also split at ``^`` and
normalised, IDs, birth date, addresses, accession number, institution, physicians and operators,
study date, instance UIDs); :func:`identifiers_from_index` adds the ingest index's.
:func:`find_leaks` then looks for them, case-insensitively, in every element (nested, private and
file meta included) of every output DICOM file and in every non-numeric cell of the output tables.
A hit names the output, the tag or column and the kind of value, never the value itself.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from stages.deid_profile import DUMMY_AGE, DUMMY_DATE, DUMMY_TEXT, DUMMY_TIME

MIN_LENGTH = 4  # shorter values ("M", "CR", initials) would match everywhere by chance
NOT_IDENTIFYING = frozenset({
    "chest", "anonymous", "anonymized", "unknown", "none", "null", "test", "patient", "male",
    "female", "other", "dummy", DUMMY_DATE, DUMMY_TIME, DUMMY_DATE + DUMMY_TIME,
    DUMMY_AGE.casefold(), DUMMY_TEXT.casefold(),
})
IDENTIFYING_KEYWORDS = frozenset({
    "PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName", "PatientID",
    "OtherPatientIDs", "PatientBirthDate", "PatientAddress", "PatientTelephoneNumbers",
    "AccessionNumber", "InstitutionName", "InstitutionAddress", "ReferringPhysicianName",
    "PerformingPhysicianName", "PhysiciansOfRecord", "OperatorsName", "StudyDate",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "ReferencedSOPInstanceUID",
})
INDEX_IDENTIFIERS = {  # ingest index column -> the attribute it holds
    "patient_id": "(0010,0020) Patient ID",
    "accession_number": "(0008,0050) Accession Number",
    "study_instance_uid": "(0020,000D) Study Instance UID",
    "series_instance_uid": "(0020,000E) Series Instance UID",
    "sop_instance_uid": "(0008,0018) SOP Instance UID",
}
# Values made of digits, hex letters and punctuation (numeric IDs, dates, UIDs) only count when not
# inside a longer alphanumeric run: the outputs are full of hex keys and decimal 2.25 UIDs where a
# short number would otherwise turn up by chance.
_HEX_LIKE = re.compile(r"[0-9a-f.\-/:_ ]+")
_BULK_GROUPS = (0x7FE0, 0x7FDF)  # pixel data and its variants: image bytes, not text


@dataclass(frozen=True)
class Leak:
    """One hit: ``output`` (file or table), ``location`` (tag path or column), ``source`` (the kind
    of identifying value found, e.g. "(0010,0020) Patient ID"). Never the value itself."""

    output: str
    location: str
    source: str


def describe_tag(elem: DataElement) -> str:
    """``"(0010,0020) Patient ID"``: the tag and its name, as messages write attributes."""
    return f"({elem.tag.group:04X},{elem.tag.element:04X}) {elem.name}"


def name_variants(name: str) -> list[str]:
    """A PN value, its components and a normalised form: ``"Doe^John"`` -> ``Doe^John``, ``Doe``,
    ``John``, ``Doe John``, ``John Doe``."""
    parts = [part.strip() for part in re.split(r"[\^=]", name) if part.strip()]
    return [name, *parts, " ".join(parts), " ".join(parts[1:2] + parts[:1])]


def collect_identifiers(ds: Dataset) -> dict[str, str]:
    """Identifying values of a source dataset, at any depth.

    Parameters
    ----------
    ds : Dataset
        A source (not yet de-identified) dataset.

    Returns
    -------
    dict of str to str
        Case-folded value -> the attribute it came from ("(0010,0010) Patient's Name"). Values
        shorter than :data:`MIN_LENGTH` or in :data:`NOT_IDENTIFYING` are left out.
    """
    found: dict[str, str] = {}
    for elem in ds.iterall():
        if elem.keyword not in IDENTIFYING_KEYWORDS or elem.VR == "SQ":
            continue
        for value in _texts(elem):
            for variant in name_variants(value) if elem.VR == "PN" else [value]:
                _add(found, variant, describe_tag(elem))
    return found


def identifiers_from_index(index: pd.DataFrame) -> dict[str, str]:
    """Identifying values of the ingest index's ID and UID columns (:data:`INDEX_IDENTIFIERS`)."""
    found: dict[str, str] = {}
    for column, source in INDEX_IDENTIFIERS.items():
        for value in index[column].dropna().astype(str):
            _add(found, value, source)
    return found


def _add(found: dict[str, str], value: str, source: str) -> None:
    """Record ``value`` (case-folded) unless it is too short or too common to identify anyone."""
    folded = value.strip().casefold()
    if len(folded) >= MIN_LENGTH and folded not in NOT_IDENTIFYING:
        found.setdefault(folded, source)


class _Matcher:
    """Finds any of many identifiers in a text; they are keyed by their last 4 characters."""

    def __init__(self, identifiers: Mapping[str, str]) -> None:
        self._by_suffix: dict[str, list[tuple[str, str, bool]]] = defaultdict(list)
        for value, source in identifiers.items():
            entry = (value, source, _HEX_LIKE.fullmatch(value) is not None)
            self._by_suffix[value[-MIN_LENGTH:]].append(entry)

    def first(self, text: str) -> str | None:
        """The source of the first identifier found in ``text``, or None."""
        folded = text.casefold()
        for end in range(MIN_LENGTH, len(folded) + 1):
            for value, source, bounded in self._by_suffix.get(folded[end - MIN_LENGTH:end], ()):
                start = end - len(value)
                if start < 0 or not folded.startswith(value, start):
                    continue
                if bounded and ((start > 0 and folded[start - 1].isalnum())
                                or (end < len(folded) and folded[end].isalnum())):
                    continue
                return source
        return None


def find_leaks(identifiers: Mapping[str, str], *, dicom_dir: Path,
               tables: Mapping[str, pd.DataFrame]) -> list[Leak]:
    """Search every identifying value in every output.

    Parameters
    ----------
    identifiers : mapping of str to str
        Case-folded value -> its source attribute, from :func:`collect_identifiers` and
        :func:`identifiers_from_index`.
    dicom_dir : Path
        Folder of de-identified ``*.dcm`` files (searched recursively), read back from disk.
    tables : mapping of str to DataFrame
        Output tables by file name; every string cell is searched.

    Returns
    -------
    list of Leak
        One per element or cell holding an identifying value; empty when the outputs are clean.
    """
    matcher = _Matcher(identifiers)
    leaks: list[Leak] = []
    for path in sorted(dicom_dir.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        output = path.relative_to(dicom_dir.parent).as_posix()
        meta = getattr(ds, "file_meta", None) or Dataset()
        for location, text in [*_element_texts(meta, ""), *_element_texts(ds, "")]:
            source = matcher.first(text)
            if source is not None:
                leaks.append(Leak(output, location, source))
    for name, table in tables.items():
        for column in table.columns:
            if pd.api.types.is_numeric_dtype(table[column]):  # bools included
                continue
            for cell in table[column].dropna():
                source = matcher.first(str(cell))
                if source is not None:
                    leaks.append(Leak(name, f"column {column!r}", source))
    return leaks


def _element_texts(ds: Dataset, prefix: str) -> Iterator[tuple[str, str]]:
    """(tag path, text) for every element at any depth; binary values decoded as Latin-1."""
    for elem in ds:
        location = prefix + describe_tag(elem)
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _element_texts(item, location + " > ")
        elif elem.tag.group not in _BULK_GROUPS:
            yield location, "\\".join(_texts(elem))


def _texts(elem: DataElement) -> list[str]:
    """The element's values as text (Latin-1 for bytes)."""
    value = elem.value
    if value is None:
        return []
    values = value if isinstance(value, (list, MultiValue)) else [value]
    return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]
