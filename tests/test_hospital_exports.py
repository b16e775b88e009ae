"""End to end on exports shaped like real hospitals' (``hospital_exports``): ingest, deidentify.

The stages run as users and CI run them, ``python -m stages.<stage>`` in a project folder with the
repository's params.yaml, and their stdout and stderr are kept, as CI keeps them. The planted
identifiers are then searched in every byte the de-identified outputs hold (preambles, file meta,
pixel data, tables) and in those logs, by a search written here and not by the project's scanner
(``dicomflow.deid.leaks``): a scanner that shares the de-identifier's idea of what a name looks like
would miss what the de-identifier misses. Each value is searched as UTF-8, UTF-16-LE, in every
character set the exports use (also as pydicom encodes ISO 2022 values and names), as JSON and
Python escapes, case-insensitively where it is ASCII, with accents and umlauts folded, Cyrillic
romanised, and CJK names joined without their separator.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import unicodedata
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.charset import convert_encodings, decode_bytes, encode_string
from pydicom.valuerep import PersonName

from hospital_exports import EXPORTS, Planted, write_hospital_exports

pytestmark = pytest.mark.slow  # its fixtures take seconds: make test runs it, make check does not

REPO = Path(__file__).resolve().parents[1]
SECRET = "hospital exports test secret, not the demo one"
STAGE_TIMEOUT_S = 300
# Python codecs of the exports' character sets, and the Unicode forms any program may write.
CODECS = ("utf-8", "utf-16-le", "latin-1", "iso8859_5", "gb18030", "euc_kr", "iso2022_jp")
GERMAN = str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe", "Ü": "Ue",
                        "ß": "ss"})
NOT_DECOMPOSED = str.maketrans({"ł": "l", "Ł": "L", "ø": "o", "Ø": "O", "đ": "d", "Đ": "D"})
CYRILLIC = str.maketrans({
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z",
    "и": "i", "й": "y", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r",
    "с": "s", "т": "t", "у": "u", "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh",
    "щ": "shch", "ъ": "", "ы": "y", "ь": "", "э": "e", "ю": "yu", "я": "ya"})
NUMERIC = re.compile(r"[\d\s.+\-/:]+")  # phone numbers, IDs, dates, UIDs
MIN_BINARY_NEEDLE = 6  # bytes; shorter needles are not searched in pixel data and arrays
JIS_IN, JIS_OUT = b"\x1b$B", b"\x1b(B"


@dataclass(frozen=True)
class StageRun:
    """One stage run as a subprocess: its exit status and everything it printed."""

    returncode: int
    stdout: bytes
    stderr: bytes

    def tail(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")[-3000:]


@dataclass(frozen=True)
class Pipeline:
    """The project folder, the corpus's ground truth and the two stage runs."""

    project: Path
    planted: Planted
    ingest: StageRun
    deidentify: StageRun | None  # None when ingest failed

    @property
    def deid_dir(self) -> Path:
        return self.project / "outputs" / "deidentify"


def _run_stage(stage: str, project: Path, env: dict[str, str]) -> StageRun:
    result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], cwd=project, env=env,
                            capture_output=True, timeout=STAGE_TIMEOUT_S)
    return StageRun(result.returncode, result.stdout, result.stderr)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """The exports in a fresh project with the repository's params.yaml (defaults: a user's first
    run), ingested then de-identified once for every test of the module."""
    project = tmp_path_factory.mktemp("hospital_exports")
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    planted = write_hospital_exports(project / "data")
    # No inherited secret, and Python's default warning filters (a PYTHONWARNINGS=ignore in the
    # environment would hide exactly the pydicom warnings the log test looks for).
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("DICOMFLOW_") and key != "PYTHONWARNINGS"}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
               DICOMFLOW_SECRET=SECRET)
    ingest = _run_stage("ingest", project, env)
    deidentify = _run_stage("deidentify", project, env) if ingest.returncode == 0 else None
    return Pipeline(project, planted, ingest, deidentify)


# --- the search -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Needle:
    """One byte form of a planted value. ``fold_case``: ASCII bytes, searched case-insensitively.
    ``numeric``: a value of digits and punctuation, which does not count inside a keyed
    ``2.25.`` UID (a 7-digit ID among its 39 digits is chance). ``literal``: the value as planted,
    not a folded spelling of it."""

    data: bytes
    fold_case: bool
    numeric: bool
    literal: bool
    form: str          # how the value was spelled and encoded, for the failure message
    description: str
    value: str


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFKD", text.translate(NOT_DECOMPOSED))
    return "".join(c for c in decomposed if not unicodedata.combining(c))


def _is_wide(char: str) -> bool:
    """CJK ideographs, kana, hangul (and their punctuation)."""
    return ord(char) > 0x2E7F


def spellings(value: str) -> dict[str, str]:
    """How else ``value`` may be written: upper and lower case, accents stripped, umlauts as
    ``ue``, Cyrillic romanised, a PN's ``^`` as a space, CJK groups without separator."""
    forms = {value: "as planted"}
    forms.setdefault(value.upper(), "upper-case")
    forms.setdefault(value.lower(), "lower-case")
    if "^" in value:
        forms.setdefault(" ".join(part for part in re.split(r"[\^]+", value) if part), "^ as space")
    for group in value.split("="):
        if any(_is_wide(c) for c in group):
            forms.setdefault(re.sub(r"[\^\s]", "", group), "joined without separator")
    for form in list(forms):
        forms.setdefault(form.translate(GERMAN), "umlauts as ae/oe/ue")
        forms.setdefault(_strip_accents(form), "accents stripped")
        forms.setdefault(_strip_accents(form.lower().translate(CYRILLIC)), "romanised")
    return {form: how for form, how in forms.items() if _searchable(form)}


def _searchable(form: str) -> bool:
    """Long enough not to turn up by chance: 4 characters, or 2 CJK ones."""
    stripped = form.strip()
    return len(stripped) >= 4 or (len(stripped) >= 2 and all(_is_wide(c) for c in stripped))


def _encodings(form: str, character_sets: Iterable[tuple[str, ...]]) -> Iterator[tuple[bytes, str]]:
    """(bytes, codec) for every encoding that can write ``form``."""
    for codec in CODECS:
        try:
            data = form.encode(codec)
        except UnicodeEncodeError:
            continue
        if codec == "iso2022_jp" and data.startswith(JIS_IN):
            data = data.removesuffix(JIS_OUT)  # the text may go on in JIS after the value
            yield data, codec
            body = data[len(JIS_IN):]
            if JIS_IN not in body and JIS_OUT not in body and len(body) >= 6:
                yield body, "iso2022_jp without escapes"  # inside a longer kanji run
        else:
            yield data, codec
    for character_set in character_sets:  # pydicom's own ISO 2022 forms (escapes per PN group)
        if not any(term.startswith("ISO 2022") for term in character_set):
            continue
        encodings = convert_encodings(list(character_set))
        with _quiet_pydicom():  # a form the set cannot write is replaced, with a warning
            candidates = [encode_string(form, encodings)]
            if "^" in form or "=" in form:
                candidates.append(PersonName(form).encode(encodings))
            candidates = [data for data in candidates  # not a lossy replacement
                          if decode_bytes(data, encodings, set()) == form]
        for data in candidates:
            yield data, "\\".join(character_set)


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log records off (it does both) while needles are encoded."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled, pydicom_logger.disabled = pydicom_logger.disabled, True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled = was_disabled


def needles(planted: Planted) -> list[Needle]:
    """Every byte form of every planted value (see the module docstring), without duplicates."""
    found: dict[tuple[bytes, bool, str], Needle] = {}
    for description, value in planted.identifiers:
        for form, how in spellings(value).items():
            numeric = bool(NUMERIC.fullmatch(form))
            encoded = list(_encodings(form, planted.character_sets))
            escapes = [(json.dumps(form)[1:-1].encode(), "JSON escapes"),
                       (form.encode("ascii", "backslashreplace"), "Python escapes")]
            escapes += [(repr(data)[2:-1].encode(), f"repr of {codec} bytes")
                        for data, codec in encoded if max(data) > 0x7F]
            for data, codec in [*encoded, *escapes]:
                fold_case = max(data) < 0x80 and "without escapes" not in codec
                key = (data.lower() if fold_case else data, fold_case, value)
                found.setdefault(key, Needle(key[0], fold_case, numeric, how == "as planted",
                                             f"{how}, {codec}", description, value))
    return list(found.values())


def _inside_keyed_uid(text: bytes, start: int) -> bool:
    """Whether a match at ``start`` lies inside a ``2.25.`` UID (the keyed UIDs of outputs)."""
    numeral = b"0123456789."
    while start > 0 and text[start - 1] in numeral:
        start -= 1
    return text.startswith(b"2.25.", start)


def find_in(content: bytes, all_needles: list[Needle], *,
            binary_from: int | None = None) -> list[Needle]:
    """The needles found in ``content``. From ``binary_from`` on (pixel data, arrays, compressed
    tables) only needles of :data:`MIN_BINARY_NEEDLE` bytes or more are searched: shorter byte
    strings (two ideographs in GB18030 are 4 bytes) turn up in images by chance."""
    lowered = content.lower()
    binary_from = len(content) if binary_from is None else binary_from
    texts = {(False, False): content, (True, False): lowered,  # (fold_case, short)
             (False, True): content[:binary_from], (True, True): lowered[:binary_from]}
    hits = []
    for needle in all_needles:
        text = texts[needle.fold_case, len(needle.data) < MIN_BINARY_NEEDLE]
        start = text.find(needle.data)
        while start != -1:
            if not (needle.numeric and not needle.value.startswith("2.25.")
                    and _inside_keyed_uid(text, start)):
                hits.append(needle)
                break
            start = text.find(needle.data, start + 1)
    return hits


def binary_start(name: str, content: bytes) -> int | None:
    """Where the numbers begin: a DICOM file's (7FE0,0010) Pixel Data element, an .npy file's
    array after its header, a Parquet file's first byte (its CSV rendering is searched as text)."""
    if name.endswith(".parquet"):
        return 0
    if name.endswith(".npy"):
        stream = io.BytesIO(content)
        np.lib.format.read_magic(stream)
        np.lib.format.read_array_header_1_0(stream)
        return stream.tell()
    if content[128:132] == b"DICM":
        position = content.rfind(b"\xe0\x7f\x10\x00")
        return None if position == -1 else position
    return None


def describe(hits: Iterable[tuple[str, Needle]]) -> str:
    """A failure message: where, which planted value, in which form (the first 60)."""
    lines = sorted({f"{where}: {n.description} {n.value!r} ({n.form})" for where, n in hits})
    return f"{len(lines)} planted value form(s) found:\n" + "\n".join(lines[:60])


def output_contents(pipeline: Pipeline) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file under outputs/deidentify and of reports/deidentify.json, and
    of each Parquet table also as CSV (a compressed column could hide a value from the bytes)."""
    files = sorted(path for path in pipeline.deid_dir.rglob("*") if path.is_file())
    files.append(pipeline.project / "reports" / "deidentify.json")
    for path in files:
        name = path.relative_to(pipeline.project).as_posix()
        yield name, path.read_bytes()
        if path.suffix == ".parquet":
            yield f"{name} (as CSV)", pd.read_parquet(path).to_csv(index=False).encode("utf-8")


def _require_outputs(pipeline: Pipeline) -> list[Path]:
    """The de-identified DICOM files; fails when the stages did not get that far (nothing to
    search is not a clean result)."""
    assert pipeline.deidentify is not None, f"ingest failed:\n{pipeline.ingest.tail()}"
    assert pipeline.deidentify.returncode == 0, f"deidentify failed:\n{pipeline.deidentify.tail()}"
    dicoms = sorted((pipeline.deid_dir / "dicom").glob("*.dcm"))
    assert len(dicoms) == len(EXPORTS), f"{len(dicoms)} de-identified files, {len(EXPORTS)} exports"
    return dicoms


# --- the tests --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def planted_needles(pipeline: Pipeline) -> list[Needle]:
    """:func:`needles` of the corpus, built once for the module."""
    return needles(pipeline.planted)


def test_the_search_finds_every_planted_value_in_the_exports(
        pipeline: Pipeline, planted_needles: list[Needle]) -> None:
    """The ground truth is what the files hold and the search can see it: otherwise finding
    nothing in the outputs would prove nothing."""
    literal = [needle for needle in planted_needles if needle.literal]
    seen = set()
    for path in pipeline.planted.files:
        content = path.read_bytes()
        seen |= {needle.value for needle in
                 find_in(content, literal, binary_from=binary_start(path.name, content))}
    missing = [(d, v) for d, v in pipeline.planted.identifiers if v not in seen]
    assert not missing, f"planted but not found in the exports: {missing}"
    assert len(pipeline.planted.files) == len(EXPORTS) == 12


def test_ingest_exits_0_and_keeps_every_export(pipeline: Pipeline) -> None:
    """Real exports (ISO 2022, GB18030, TIFF preambles, invalid legacy UIDs, RLE, implicit VR)
    are valid images: the stage must take every one with default params."""
    assert pipeline.ingest.returncode == 0, pipeline.ingest.tail()
    metrics = json.loads((pipeline.project / "reports" / "ingest.json").read_text())
    assert metrics["images"] == len(EXPORTS) and metrics["quarantined"] == 0, metrics


def test_deidentify_exits_0_and_writes_every_export(pipeline: Pipeline) -> None:
    """The de-identifier must complete on such data with default params, every file written."""
    _require_outputs(pipeline)
    metrics = json.loads((pipeline.project / "reports" / "deidentify.json").read_text())
    assert metrics["n_files"] == len(EXPORTS), metrics


def test_no_planted_value_in_any_output_byte(pipeline: Pipeline,
                                             planted_needles: list[Needle]) -> None:
    """Nothing downstream may hold a planted value in any form, anywhere in any output byte:
    preamble, file meta, any element at any depth, pixel data, manifest, audit, metrics."""
    _require_outputs(pipeline)
    hits = [(name, needle) for name, content in output_contents(pipeline)
            for needle in find_in(content, planted_needles,
                                  binary_from=binary_start(name, content))]
    assert not hits, describe(hits)


@pytest.mark.parametrize("stage", ["ingest", "deidentify"])
def test_no_planted_value_in_the_logs(pipeline: Pipeline, planted_needles: list[Needle],
                                      stage: str) -> None:
    """CI keeps the stages' stdout and stderr; pydicom's warnings quote header values ("Invalid
    value for VR UI: '1.2.3.MRN...'"), so neither stage may let one through."""
    run = pipeline.ingest if stage == "ingest" else pipeline.deidentify
    assert run is not None, f"ingest failed:\n{pipeline.ingest.tail()}"
    hits = [(f"{stage} {stream}", needle) for stream, content in
            (("stdout", run.stdout), ("stderr", run.stderr))
            for needle in find_in(content, planted_needles)]
    assert not hits, describe(hits)


def test_preamble_and_file_meta_name_no_site(pipeline: Pipeline) -> None:
    """A dual-personality preamble carries a TIFF description of the patient, and the file meta
    names the exporting PACS (its OID, version, AE title): both must be the writer's own."""
    site_uids = {site.implementation_class_uid for site in pipeline.planted.sites}
    site_names = {site.implementation_version_name for site in pipeline.planted.sites}
    problems = []
    for path in _require_outputs(pipeline):
        if path.read_bytes()[:128] != b"\0" * 128:
            problems.append(f"{path.name}: preamble is not 128 zero bytes")
        meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
        if 0x00020016 in meta:
            problems.append(f"{path.name}: (0002,0016) Source AE Title kept")
        if str(meta.get("ImplementationClassUID", "")) in site_uids:
            problems.append(f"{path.name}: (0002,0012) the site's Implementation Class UID")
        if str(meta.get("ImplementationVersionName", "")) in site_names:
            problems.append(f"{path.name}: (0002,0013) the site's Implementation Version Name")
    assert not problems, "\n".join(problems)


def test_standard_codes_survive(pipeline: Pipeline) -> None:
    """Cleaning free text out of code sequences must not take the coded content a model or a
    reader needs: the SNOMED CT Anatomic Region code of every image stays, with a meaning (the
    exported "Chest" or the code's own "Thoracic structure")."""
    for path in _require_outputs(pipeline):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        region = ds.get("AnatomicRegionSequence") or [pydicom.Dataset()]
        coded = (region[0].get("CodeValue"), region[0].get("CodingSchemeDesignator"))
        assert coded == ("51185008", "SCT") and region[0].get("CodeMeaning"), \
            f"{path.name}: {coded} {region[0].get('CodeMeaning')!r}"
