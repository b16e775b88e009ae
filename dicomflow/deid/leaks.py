"""Leak scanner: the identifying values of the source files, searched in everything downstream.

The values come from :func:`dicomflow.deid.identifiers.collect_identifiers` (each source header, file meta
included) and :func:`identifiers_from_index` (the ingest index); :func:`identifiers_at_ingest`
gathers both for an ingested data set. The search reads like an attacker (see
:mod:`dicomflow.deid.identifiers` for how values are matched: folded spellings, names by component and in
any order, CJK names from two characters, written dates, telephone numbers by their digits), and
reads every byte that could carry text, in UTF-8, Latin-1 and every character set of the sources,
with JSON ``\\uXXXX`` escapes undone:

* :func:`find_leaks`: the de-identified DICOM files (preamble, file meta, every element at any
  depth, private ones included, read from their raw bytes; pixel data excepted) and every
  non-numeric cell of tables (the deidentify stage, on its own outputs);
* :func:`leaks_in_pixels`: text burned into the pixels of a DICOM file or a picture, read as
  de-identification reads it (:mod:`dicomflow.deid.pixel_text`; the deidentify stage, on each file
  it writes);
* :func:`scan_paths`: any files and folders: DICOM (elements and pixels), pictures (PNG, JPEG),
  Parquet, text (CSV, JSON, YAML, HTML, logs), and the text members of zip containers such as
  ``.keras`` models;
* :func:`scan_mlflow_run`: an MLflow run and its child runs: run names, params, tags, metric
  names and every artifact (the evaluate stage, before it registers a model).

A hit names the output, the location and the kind of value, never the value itself;
:func:`summarise_leaks` counts them by attribute and kind. As a command:

    dicomflow scan-leaks [--run RUN_ID] [PATH ...]

reads the identifiers from ``paths.ingest_dir`` and the sources under ``paths.data`` and exits 1
on any hit.
"""

from __future__ import annotations

import codecs
import re
import tempfile
import zipfile
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset

from dicomflow.deid.identifiers import (
    Identifiers,
    collect_identifiers,
    describe_tag,
    every_element,
    source_encodings,
)
from dicomflow.runtime.log_privacy import hidden_pydicom_messages

INDEX_IDENTIFIERS = {  # ingest index column -> the attribute it holds
    "patient_id": "(0010,0020) Patient ID",
    "accession_number": "(0008,0050) Accession Number",
    "study_instance_uid": "(0020,000D) Study Instance UID",
    "series_instance_uid": "(0020,000E) Series Instance UID",
    "sop_instance_uid": "(0008,0018) SOP Instance UID",
}
# The source of a Leak for pixels a scan could not decode, hence not search.
UNREAD = "pixels that could not be decoded, so not searched"
ALWAYS_READ = ("utf-8", "latin-1")  # besides the sources' own character sets
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # image bytes, not text
# Binary numbers: no text can hide in them. OB, OW and UN are read: they can.
_NUMBER_VRS = frozenset({"US", "UL", "SS", "SL", "SV", "UV", "FL", "FD", "OF", "OD", "OL", "OV", "AT"})
# Values the profile has replaced by construction: searched for names and IDs, not for dates
# and telephone numbers (a shifted date may be another patient's real one by chance).
_STRUCTURED_VRS = frozenset({"DA", "DT", "TM", "DS", "IS", "UI", "AS"})
_BINARY_VRS = frozenset({"OB", "OW", "UN"})
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


@dataclass(frozen=True)
class Leak:
    """One hit: ``output`` (file or table), ``location`` (tag path or column), ``source`` (the kind
    of identifying value found, e.g. "(0010,0020) Patient ID"). Never the value itself."""

    output: str
    location: str
    source: str


def identifiers_from_index(index: pd.DataFrame) -> Identifiers:
    """Identifying values of the ingest index's ID and UID columns (:data:`INDEX_IDENTIFIERS`)."""
    found = Identifiers()
    for column, source in INDEX_IDENTIFIERS.items():
        for value in index[column].dropna().astype(str).unique():
            found.add_text(value, source, uid=column.endswith("_uid"))
    return found


def identifiers_at_ingest(ingest_dir: Path, data_dir: Path) -> Identifiers:
    """The identifying values of an ingested data set: the ingest index's, and every identifying
    attribute of the indexed source files' headers (:func:`collect_identifiers`)."""
    index = pd.read_parquet(ingest_dir / "index.parquet")
    found = identifiers_from_index(index)
    with hidden_pydicom_messages():  # source headers: pydicom's warnings quote their values
        for source in index["source_path"].dropna().unique():
            try:
                ds = pydicom.dcmread(data_dir / source, stop_before_pixels=True, force=True)
                found.update(collect_identifiers(ds))
            except Exception:  # noqa: BLE001  a source gone since ingest: its index values are still searched
                continue
    return found


def summarise_leaks(leaks: Iterable[Leak]) -> list[str]:
    """One line per (location, kind of value): ``"(0008,0070) Manufacturer: a (0010,0010)
    Patient's Name value in 3 output(s)"``, most outputs first. Never a value."""
    outputs: dict[tuple[str, str], set[str]] = defaultdict(set)
    for leak in leaks:
        outputs[(leak.location, leak.source)].add(leak.output)
    return [f"{location}: a {source} value in {len(found)} output(s)" for (location, source), found
            in sorted(outputs.items(), key=lambda item: (-len(item[1]), item[0]))]


def leaks_in_file(identifiers: Identifiers, path: Path, *, output: str) -> list[Leak]:
    """The leaks in one de-identified DICOM file, read back from disk (named ``output``)."""
    return _hits(identifiers, output, dicom_texts(path, identifiers.encodings))


def leaks_in_pixels(identifiers: Identifiers, path: Path, *, output: str,
                    report_unread: bool = False) -> list[Leak]:
    """The identifying text still readable in the pixels of a DICOM file or a picture (PNG, JPEG)
    (named ``output``), one Leak per region, located by frame, rows and columns.

    A DICOM file's pixels are judged as de-identification judges them (any date, long number or
    field label too); a picture's by the sources' values only (plots have dates and numbers of
    their own). Frames are read as de-identification reads them
    (:func:`~dicomflow.deid.burned_in.read_text_regions`).

    Pixels that cannot be decoded (a broken or unsupported bitstream, a decompression bomb) could
    hold anything: with ``report_unread`` they are one Leak whose source is :data:`UNREAD`, so a
    scan fails closed on what it could not read; without it (the deidentify worker, whose header
    rules decided on such files before) they give none.
    """
    from dicomflow.deid.burned_in import decoded_frames, read_text_regions
    from dicomflow.deid.pixel_text import judge

    dicom = _is_dicom(path)
    try:
        if dicom:
            with hidden_pydicom_messages():
                frames = decoded_frames(pydicom.dcmread(path, force=True))
        else:
            from PIL import Image

            with Image.open(path) as picture:
                frames = np.asarray(picture if picture.mode in ("L", "I;16", "I") else picture.convert("RGB"))[None]
    except Exception as err:  # noqa: BLE001  the decoders' messages can quote values: the class only
        return [Leak(output, "pixel data", f"{UNREAD} ({type(err).__name__})")] if report_unread else []
    regions = read_text_regions(frames) if frames is not None else []
    return [Leak(output, f"pixel data {judgement.region.where()}", judgement.why)
            for judgement in judge(regions, identifiers, "identifying", patterns=dicom) if judgement.blank]


def leaks_in_values(identifiers: Identifiers, output: str, values: dict[str, str | None]) -> list[Leak]:
    """The leaks in the table cells ``values`` (column -> text) of ``output``, searched as
    :func:`find_leaks` searches a table."""
    return _hits(identifiers, output, [(f"column {column!r}", text) for column, text in values.items() if text])


def find_leaks(identifiers: Identifiers, *, dicom_dir: Path | None,
               tables: dict[str, pd.DataFrame]) -> list[Leak]:
    """Search every identifying value in every output.

    Parameters
    ----------
    identifiers : Identifiers
        From :func:`collect_identifiers` and :func:`identifiers_from_index`.
    dicom_dir : Path or None
        Folder of de-identified ``*.dcm`` files (searched recursively), read back from disk;
        None when each file was searched as it was written (:func:`leaks_in_file`).
    tables : mapping of str to DataFrame
        Output tables by file name; every string cell is searched.

    Returns
    -------
    list of Leak
        One per element or cell holding an identifying value; empty when the outputs are clean.
    """
    leaks: list[Leak] = []
    for path in sorted(dicom_dir.rglob("*.dcm")) if dicom_dir is not None else ():
        output = path.relative_to(dicom_dir.parent).as_posix()
        leaks += _hits(identifiers, output, dicom_texts(path, identifiers.encodings))
    for name, table in tables.items():
        leaks += _hits(identifiers, name, _table_texts(table))
    return leaks


def _hits(identifiers: Identifiers, output: str, texts: Iterable[tuple]) -> list[Leak]:
    """A Leak for each (location, text[, vr]) whose text holds an identifier; a DICOM value's VR
    says what to look for (no dates or numbers in DA values, which the profile rewrote, nor in
    codes)."""
    leaks = []
    for location, text, *vr in texts:
        vr = vr[0] if vr else None
        source = identifiers.first(text, dates_and_numbers=vr not in _STRUCTURED_VRS | {"CS"})
        if source is not None:
            leaks.append(Leak(output, location, source))
    return leaks


def decodings(raw: bytes, encodings: Iterable[str], *, binary: bool = False) -> list[str]:
    """``raw`` read in each of ``encodings`` and :data:`ALWAYS_READ` (one text when it is ASCII),
    plus each reading with JSON ``\\uXXXX`` escapes undone; ``binary`` values (OB, OW, UN, the
    preamble) also as UTF-16 both ways, as ICC profiles and waveforms store text."""
    if raw.isascii() and b"\x1b" not in raw and b"\x00" not in raw:  # ISO 2022 is 7-bit
        texts = [raw.decode("ascii")]
    else:
        extra = ("utf-16-le", "utf-16-be") if binary else ()
        texts = list(dict.fromkeys(raw.decode(encoding, errors="replace")
                                   for encoding in _codecs((*ALWAYS_READ, *encodings, *extra))))
    return texts + [_unescape_json(text) for text in texts if "\\u" in text]


def dicom_texts(path: Path, encodings: Iterable[str] = ()) -> Iterator[tuple[str, str, str]]:
    """(location, text, VR) for everything in a DICOM file that could carry text: the
    preamble, the file meta and every element at any depth, read from their raw bytes in every
    character set (the file's own, ``encodings``, :data:`ALWAYS_READ`), so an element whose bytes
    are in another character set than the file declares is read too. Pixel data is skipped."""
    ds = pydicom.dcmread(path, force=True)
    encodings = {*encodings, *source_encodings(ds)}
    for text in decodings(ds.preamble or b"", encodings, binary=True):
        yield "preamble", text, "OB"
    for sequences, parent, tag, vr in every_element(ds, _written_vr):
        if tag in PIXEL_TAGS or vr in _NUMBER_VRS:
            continue
        location = " > ".join(describe_tag(each) for each in (*sequences, tag))
        value = parent.get_item(tag).value
        if isinstance(value, bytes):
            texts = decodings(value, encodings, binary=vr in _BINARY_VRS)
        else:  # an element already converted (file meta): its text
            values = value if isinstance(value, (list, tuple)) else [value]
            texts = ["\\".join(v.decode("latin-1") if isinstance(v, bytes) else str(v)
                                for v in values if v is not None)]
        for text in texts:
            yield location, text, vr


def _written_vr(ds: Dataset, tag: int) -> str:
    """The VR as the file wrote it (the dictionary's, unresolved, only where the file wrote none):
    unlike :func:`dicomflow.deid.identifiers.vr_of`, UN stays UN, so an element is searched in
    its raw bytes, UTF-16 readings included, whatever the dictionary says it should hold."""
    return ds.get_item(tag).VR or (dictionary_VR(tag) if dictionary_has_tag(tag) else "UN")


def _codecs(encodings: Iterable[str]) -> list[str]:
    """Python codec names, each once (``iso8859`` and ``latin-1`` are one)."""
    found: dict[str, str] = {}
    for encoding in encodings:
        try:
            found.setdefault(codecs.lookup(encoding).name, encoding)
        except LookupError:
            continue
    return list(found.values())


def _unescape_json(text: str) -> str:
    """``text`` with JSON ``\\uXXXX`` escapes (surrogate pairs included) undone."""
    unescaped = _JSON_ESCAPE.sub(lambda match: chr(int(match[1], 16)), text)
    return unescaped.encode("utf-16", "surrogatepass").decode("utf-16", errors="replace")


# Files that hold numbers only (pixel arrays, weights): searched for text they would match by chance.
NUMERIC_SUFFIXES = frozenset({".npy", ".npz", ".h5", ".hdf5", ".pb"})
PICTURE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})  # read for text in their pixels
ZIP_SUFFIXES = frozenset({".keras", ".zip"})
TEXT_MEMBER_SUFFIXES = frozenset({".json", ".txt", ".yaml", ".yml", ".csv", ".md", ".html", ".py"})


def scan_paths(identifiers: Identifiers, paths: Iterable[Path]) -> list[Leak]:
    """Search every file under ``paths`` (files or folders, recursively).

    DICOM files (by their ``DICM`` marker) are searched as :func:`dicom_texts` reads them and
    their pixels as :func:`leaks_in_pixels` reads them, pictures (:data:`PICTURE_SUFFIXES`) for
    text in their pixels (pixels that cannot be decoded are a hit: :data:`UNREAD`), Parquet tables
    cell by cell with their column names, zip containers (``.keras`` models) member by member for
    their text members, :data:`NUMERIC_SUFFIXES` files
    not at all, anything else (logs included) line by line in every character set
    (:func:`decodings`).
    """
    leaks: list[Leak] = []
    for path in _files(paths):
        name = path.as_posix()
        if path.suffix.lower() in NUMERIC_SUFFIXES:
            continue
        if path.suffix.lower() in PICTURE_SUFFIXES:
            leaks += leaks_in_pixels(identifiers, path, output=name, report_unread=True)
            continue
        if _is_dicom(path):
            leaks += leaks_in_pixels(identifiers, path, output=name, report_unread=True)
            texts = dicom_texts(path, identifiers.encodings)
        elif path.suffix.lower() == ".parquet":
            texts = _table_texts(pd.read_parquet(path))
        elif path.suffix.lower() in ZIP_SUFFIXES and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                texts = [(f"{member} {location}", text)
                         for member in archive.namelist()
                         if Path(member).suffix.lower() in TEXT_MEMBER_SUFFIXES
                         for location, text in _lines(archive.read(member), identifiers.encodings)]
        else:
            texts = _lines(path.read_bytes(), identifiers.encodings)
        leaks += _hits(identifiers, name, texts)
    return leaks


def scan_mlflow_run(identifiers: Identifiers, run_id: str, client=None) -> list[Leak]:
    """Search an MLflow run and its child runs: names, params (keys and values), tags, metric
    names, every artifact and the files of every model they logged (downloaded to a temporary
    folder and searched with :func:`scan_paths`)."""
    import mlflow

    client = client or mlflow.MlflowClient()
    run = client.get_run(run_id)
    children = client.search_runs([run.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    leaks: list[Leak] = []
    for each in (run, *children):
        output = f"MLflow run {each.info.run_id}"
        texts = [("run name", each.info.run_name or "")]
        texts += [(f"param {key!r}", f"{key} {value}") for key, value in each.data.params.items()]
        texts += [(f"tag {key!r}", f"{key} {value}") for key, value in each.data.tags.items()
                  if key != "mlflow.log-model.history"]  # MLflow's own JSON of model metadata
        texts += [("metric names", " ".join(each.data.metrics))]
        leaks += _hits(identifiers, output, texts)
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


def _lines(content: bytes, encodings: Iterable[str]) -> Iterator[tuple[str, str]]:
    """("line N", text) for every line of ``content`` in every reading (:func:`decodings`)."""
    for number, line in enumerate(content.splitlines(), start=1):
        for text in decodings(line, encodings):
            yield f"line {number}", text


def _table_texts(table: pd.DataFrame) -> Iterator[tuple[str, str]]:
    yield "column names", " ".join(map(str, table.columns))
    for column in table.columns:
        if pd.api.types.is_numeric_dtype(table[column]):  # bools included
            continue
        for cell in table[column].dropna():
            yield f"column {column!r}", str(cell)
