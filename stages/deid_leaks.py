"""Leak scanner: the identifying values of the source files, searched in everything downstream.

:func:`collect_identifiers` takes the values from a source dataset (names also split at ``^`` and
normalised, IDs, birth date, addresses, accession number, institution, physicians and operators,
study date, instance UIDs; dates also as ISO, US and European dates); :func:`identifiers_from_index`
adds the ingest index's, and :func:`identifiers_at_ingest` gathers both for an ingested data set.
The search is case-insensitive and runs over:

* :func:`find_leaks`: every element (nested, private and file meta included) of de-identified DICOM
  files and every non-numeric cell of tables (the deidentify stage, on its own outputs);
* :func:`scan_paths`: any files and folders: DICOM, Parquet, text (CSV, JSON, YAML, HTML, logs),
  and the text members of zip containers such as ``.keras`` models;
* :func:`scan_mlflow_run`: an MLflow run and its child runs: run names, params, tags, metric
  names and every artifact (the evaluate stage, before it registers a model).

A hit names the output, the location and the kind of value, never the value itself. As a command:

    python -m stages.deid_leaks [--run RUN_ID] [PATH ...]

reads the identifiers from ``paths.ingest_dir`` and the sources under ``paths.data`` and exits 1
on any hit.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from stages.deid_profile import (DUMMY_AGE, DUMMY_DATE, DUMMY_TEXT, DUMMY_TIME, date_variants,
                                 name_variants)

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
# Likewise a value of letters only (a name component) counts as a word, not inside a longer run of
# letters: "Omar" is in a file named omar_chest.dcm, not in the code word "fromarray".
_LETTERS = re.compile(r"[^\W\d_]+")
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
            variants = {"PN": name_variants, "DA": date_variants, "DT": date_variants}.get(
                elem.VR, lambda v: [v])(value)
            for variant in variants:
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
        self._by_suffix: dict[str, list[tuple[str, str, Callable[[str], bool] | None]]] = defaultdict(list)
        for value, source in identifiers.items():
            # What may not touch the value for it to count: None, anything may.
            joins = (str.isalnum if _HEX_LIKE.fullmatch(value) else
                     str.isalpha if _LETTERS.fullmatch(value) else None)
            self._by_suffix[value[-MIN_LENGTH:]].append((value, source, joins))

    def first(self, text: str) -> str | None:
        """The source of the first identifier found in ``text``, or None."""
        folded = text.casefold()
        for end in range(MIN_LENGTH, len(folded) + 1):
            for value, source, joins in self._by_suffix.get(folded[end - MIN_LENGTH:end], ()):
                start = end - len(value)
                if start < 0 or not folded.startswith(value, start):
                    continue
                if joins and ((start > 0 and joins(folded[start - 1]))
                              or (end < len(folded) and joins(folded[end]))):
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
        leaks += [Leak(name, location, source) for location, text in _table_texts(table)
                  if (source := matcher.first(text)) is not None]
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


# Files that hold numbers only (pixel arrays, weights): searched for text they would match by chance.
NUMERIC_SUFFIXES = frozenset({".npy", ".npz", ".h5", ".hdf5", ".png", ".jpg", ".jpeg", ".pb"})
ZIP_SUFFIXES = frozenset({".keras", ".zip"})
TEXT_MEMBER_SUFFIXES = frozenset({".json", ".txt", ".yaml", ".yml", ".csv", ".md", ".html", ".py"})


def identifiers_at_ingest(ingest_dir: Path, data_dir: Path) -> dict[str, str]:
    """The identifying values of an ingested data set: the ingest index's, and every identifying
    attribute of the indexed source files' headers (:func:`collect_identifiers`)."""
    index = pd.read_parquet(ingest_dir / "index.parquet")
    found = identifiers_from_index(index)
    for source in index["source_path"].dropna().unique():
        try:
            ds = pydicom.dcmread(data_dir / source, stop_before_pixels=True, force=True)
        except Exception:  # a source gone since ingest: its index values are still searched
            continue
        found.update(collect_identifiers(ds))
    return found


def scan_paths(identifiers: Mapping[str, str], paths: Iterable[Path]) -> list[Leak]:
    """Search every file under ``paths`` (files or folders, recursively).

    DICOM files (by their ``DICM`` marker) are searched element by element, Parquet tables cell by
    cell with their column names, zip containers (``.keras`` models) member by member for their
    text members, :data:`NUMERIC_SUFFIXES` files not at all, anything else line by line as text.
    """
    matcher = _Matcher(identifiers)
    leaks: list[Leak] = []
    for path in _files(paths):
        name = path.as_posix()
        if path.suffix.lower() in NUMERIC_SUFFIXES:
            continue
        if _is_dicom(path):
            ds = pydicom.dcmread(path, force=True)
            meta = getattr(ds, "file_meta", None) or Dataset()
            texts = [*_element_texts(meta, ""), *_element_texts(ds, "")]
        elif path.suffix.lower() == ".parquet":
            texts = list(_table_texts(pd.read_parquet(path)))
        elif path.suffix.lower() in ZIP_SUFFIXES and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                texts = [(f"{member} line {number}", line)
                         for member in archive.namelist()
                         if Path(member).suffix.lower() in TEXT_MEMBER_SUFFIXES
                         for number, line in _lines(archive.read(member))]
        else:
            texts = [(f"line {number}", line) for number, line in _lines(path.read_bytes())]
        leaks += [Leak(name, location, source) for location, text in texts
                  if (source := matcher.first(text)) is not None]
    return leaks


def scan_mlflow_run(identifiers: Mapping[str, str], run_id: str, client=None) -> list[Leak]:
    """Search an MLflow run and its child runs: names, params (keys and values), tags, metric
    names, every artifact and the files of every model they logged (downloaded to a temporary
    folder and searched with :func:`scan_paths`)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    matcher = _Matcher(identifiers)
    leaks: list[Leak] = []
    for each in (run, *children):
        output = f"MLflow run {each.info.run_id}"
        texts = [("run name", each.info.run_name or "")]
        texts += [(f"param {key!r}", f"{key} {value}") for key, value in each.data.params.items()]
        texts += [(f"tag {key!r}", f"{key} {value}") for key, value in each.data.tags.items()
                  if key != "mlflow.log-model.history"]  # MLflow's own JSON of model metadata
        texts += [("metric names", " ".join(each.data.metrics))]
        leaks += [Leak(output, location, source) for location, text in texts
                  if (source := matcher.first(text)) is not None]
        downloads = [("artifact", {"run_id": each.info.run_id})]
        downloads += [(f"model {logged.model_id}", {"artifact_uri": f"models:/{logged.model_id}"})
                      for logged in (each.outputs.model_outputs if each.outputs else [])]
        for kind, where in downloads:
            with tempfile.TemporaryDirectory() as folder:
                local = Path(mlflow.artifacts.download_artifacts(**where, dst_path=folder))
                leaks += [Leak(f"{output} {kind} {Path(leak.output).relative_to(local).as_posix()}",
                               leak.location, leak.source) for leak in scan_paths(identifiers, [local])]
    return leaks


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        path = Path(path)
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as stream:
        return stream.read(132)[128:] == b"DICM"


def _lines(content: bytes) -> Iterator[tuple[int, str]]:
    """Numbered lines of a text (UTF-8, undecodable bytes replaced)."""
    yield from enumerate(content.decode("utf-8", errors="replace").splitlines(), start=1)


def _table_texts(table: pd.DataFrame) -> Iterator[tuple[str, str]]:
    yield "column names", " ".join(map(str, table.columns))
    for column in table.columns:
        if pd.api.types.is_numeric_dtype(table[column]):  # bools included
            continue
        for cell in table[column].dropna():
            yield f"column {column!r}", str(cell)


def main(argv: list[str] | None = None) -> int:
    """The leak scanner as a command; returns 1 on any hit, 0 when everything is clean."""
    from stages.params import load_params
    from stages.tracking import configure_mlflow

    parser = argparse.ArgumentParser(
        prog="python -m stages.deid_leaks",
        description="Search the identifying values of the ingested sources in files, folders and "
                    "MLflow runs. Hits name the place and the kind of value, never the value.")
    parser.add_argument("paths", nargs="*", type=Path, help="files or folders to search")
    parser.add_argument("--run", action="append", default=[], metavar="RUN_ID",
                        help="an MLflow run to search, with its child runs (repeatable)")
    args = parser.parse_args(argv)
    if not args.paths and not args.run:
        parser.error("give at least one path or --run")
    paths = load_params("paths")
    identifiers = identifiers_at_ingest(Path(paths.ingest_dir), Path(paths.data))
    leaks = scan_paths(identifiers, args.paths)
    if args.run:
        configure_mlflow(experiment=None)
        for run_id in args.run:
            leaks += scan_mlflow_run(identifiers, run_id)
    for leak in leaks:
        print(f"LEAK {leak.output}: {leak.location}: a {leak.source} value")
    print(f"{len(leaks)} hit(s) for {len(identifiers):,} identifying values")
    return 1 if leaks else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
