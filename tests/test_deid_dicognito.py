"""De-identification compared with dicognito's on the same real files.

Requirement: every attribute that dicognito changes, our stage (``dicomflow.deid.profile``, Basic
Profile with private tags removed) changes or removes too. Ours may be stricter: attributes it
changes and dicognito leaves alone are counted, not faulted.

Files: pydicom's own test files (``pydicom/data/test_files/*.dcm``, the local part of
``pydicom.data.get_testdata_files("*.dcm")``; calling that function itself would try to download
pydicom-data's files, and without a network that costs 15 s), pydicom-data's and deid-data's data
folders (located as tests/test_ingest_real_files.py does). Files that pydicom cannot read or that
have no SOP Instance UID are left out; of the rest at most ``MAX_FILES`` are taken, shared equally
between the sources and evenly spread over each source's sorted names. Headers only
(``stop_before_pixels=True``): neither tool touches pixel data.

Each file is read twice, dicognito anonymizes one copy in place, ours de-identifies the other, and
:func:`compare` walks the original (file meta and data set, inside every sequence item). Paths
look like ``(0008,1115)[0].(0020,000E)``. Values are never printed: they may identify someone.

The comparison table (keyword, tag, how often dicognito changed it, how often ours changed or
removed it, both, ours only) is printed, written to the terminal through pytest's terminal reporter,
and written to ``$DICOMFLOW_REPORT_DIR/deid_dicognito_comparison.txt`` when that variable is set.
Under pytest-xdist (``make test``) neither the print nor the workers' terminal is shown for a
passing test; to see the table:

    .venv/bin/python -m pytest tests/test_deid_dicognito.py -s

Two more tests put one original value back into our output (at the top level, and inside a
sequence item) and check that :func:`compare` reports exactly that path, so the main test cannot
pass by comparing nothing.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomflow.deid.profile import DeidOptions, deidentify_dataset, load_profile

import dicognito.anonymizer as dicognito_anonymizer

SECRET = b"test_deid_dicognito secret"
DICOGNITO_SEED = "test_deid_dicognito"
MAX_FILES = 60
PIXEL_DATA = 0x7FE00010
DATA_PACKAGES = {"pydicom-data": "data_store", "deid-data": "deid_data"}
REPORT_NAME = "deid_dicognito_comparison.txt"

# A path: ("meta" | "dataset", tag, item index, tag, item index, ..., tag)
ElementPath = tuple


# --------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------

@dataclass
class KeywordCounts:
    """How often one attribute (keyword) was changed, over all files and all depths."""

    tag: str
    dicognito: int = 0
    ours: int = 0
    both: int = 0


@dataclass
class Violation:
    """An attribute dicognito changes and ours keeps (value never stored)."""

    path: str
    keyword: str
    file: str = ""


@dataclass
class Comparison:
    """The comparison over all selected files (file names, paths and keywords only)."""

    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, KeywordCounts] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # file -> reason, values never shown
    errors: dict[str, str] = field(default_factory=dict)  # file -> our exception's type
    seconds: float = 0.0


def _walk(ds: Dataset, prefix: ElementPath):
    """(path, element) of every element of ``ds``, recursively; a sequence is yielded itself and
    then its items' elements."""
    for elem in ds:
        if elem.tag == PIXEL_DATA:
            continue
        path = (*prefix, int(elem.tag))
        yield path, elem
        if elem.VR == "SQ":
            for index, item in enumerate(elem.value or ()):
                yield from _walk(item, (*path, index))


def walk_all(ds: Dataset):
    """:func:`_walk` over the file meta (when there is one) and the data set."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        yield from _walk(meta, ("meta",))
    yield from _walk(ds, ("dataset",))


def resolve(ds: Dataset, path: ElementPath) -> DataElement | None:
    """The element at ``path`` in ``ds``, or None when it, its sequence or its item is absent."""
    current = getattr(ds, "file_meta", None) if path[0] == "meta" else ds
    steps = path[1:]
    for position in range(0, len(steps) - 1, 2):
        if current is None or steps[position] not in current:
            return None
        elem = current[steps[position]]
        index = steps[position + 1]
        if elem.VR != "SQ" or elem.value is None or index >= len(elem.value):
            return None
        current = elem.value[index]
    if current is None or steps[-1] not in current:
        return None
    return current[steps[-1]]


def format_path(path: ElementPath) -> str:
    """``(0008,1115)[0].(0020,000E)``; file meta paths read the same (their group is 0002)."""
    parts = []
    steps = path[1:]
    for position in range(0, len(steps), 2):
        tag = Tag(steps[position])
        text = f"({tag.group:04X},{tag.element:04X})"
        if position + 1 < len(steps):
            text += f"[{steps[position + 1]}]"
        parts.append(text)
    return ".".join(parts)


def _is_empty(elem: DataElement) -> bool:
    value = elem.value
    if value is None:
        return True
    if elem.VR == "SQ":
        return len(value) == 0
    if isinstance(value, (str, bytes, bytearray, list, tuple)) or hasattr(value, "__len__"):
        try:
            return len(value) == 0
        except TypeError:
            pass
    return str(value) == ""


def _changed(original: DataElement, other: DataElement | None) -> bool:
    """Absent, emptied, or (for a value, not a sequence) holding a different value."""
    if other is None or _is_empty(other):
        return True
    if original.VR == "SQ":  # its items' elements are compared one by one
        return False
    try:
        return bool(original.value != other.value)
    except Exception:  # noqa: BLE001 - incomparable values (e.g. another type) differ
        return True


def keyword_of(tag: int) -> tuple[str, str]:
    """(row key, tag text) for the table: private attributes share one row."""
    tag = Tag(tag)
    if tag.is_private:
        return "[private]", "(odd,xxxx)"
    text = f"({tag.group:04X},{tag.element:04X})"
    return keyword_for_tag(tag) or text, text


def compare(original: Dataset, theirs: Dataset, ours: Dataset
            ) -> tuple[list[Violation], dict[str, KeywordCounts]]:
    """Violations (dicognito changed it, ours kept it) and per-keyword change counts.

    Only elements of ``original`` with a non-empty value count. "Changed" means absent in the
    output (removed, or its sequence or item removed), emptied, or with a different value; a
    sequence counts as changed only when absent or emptied (its items' elements count by
    themselves). Elements the tools add are not looked at.
    """
    violations: list[Violation] = []
    counts: dict[str, KeywordCounts] = {}
    for path, elem in walk_all(original):
        if _is_empty(elem):
            continue
        theirs_changed = _changed(elem, resolve(theirs, path))
        ours_changed = _changed(elem, resolve(ours, path))
        if not (theirs_changed or ours_changed):
            continue
        key, tag_text = keyword_of(path[-1])
        row = counts.setdefault(key, KeywordCounts(tag_text))
        row.dicognito += theirs_changed
        row.ours += ours_changed
        row.both += theirs_changed and ours_changed
        if theirs_changed and not ours_changed:
            violations.append(Violation(format_path(path), key))
    return violations, counts


def format_table(comparison: Comparison) -> str:
    """The per-keyword table: rows dicognito changes first, most frequent first."""
    header = ("keyword", "tag", "dicognito changed", "ours changed or removed", "both", "ours only")
    rows = [(key, row.tag, row.dicognito, row.ours, row.both, row.ours - row.both)
            for key, row in comparison.counts.items()]
    rows.sort(key=lambda r: (r[2] == 0, -r[2], -r[3], r[0]))
    text_rows = [header, *[tuple(str(cell) for cell in row) for row in rows]]
    widths = [max(len(row[i]) for row in text_rows) for i in range(len(header))]
    lines = [" | ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(row, widths)))
             for row in text_rows]
    lines.insert(1, "-+-".join("-" * width for width in widths))
    total = Counter()
    for row in comparison.counts.values():
        total.update(dicognito=row.dicognito, ours=row.ours, both=row.both)
    summary = [
        f"dicognito vs stages.deid_profile (Basic Profile, private tags removed): "
        f"{len(comparison.files)} files, {comparison.seconds:.1f} s",
        f"attributes changed: dicognito {total['dicognito']}, ours {total['ours']}, both {total['both']}; "
        f"dicognito only (violations): {len(comparison.violations)}",
    ]
    if comparison.skipped:
        summary.append(f"files left out: {len(comparison.skipped)} "
                       f"({', '.join(f'{name}: {why}' for name, why in sorted(comparison.skipped.items()))})")
    if comparison.errors:
        summary.append(f"files ours failed on: {len(comparison.errors)} "
                       f"({', '.join(f'{name}: {why}' for name, why in sorted(comparison.errors.items()))})")
    if comparison.violations:
        by_key = Counter((v.keyword, v.path.rsplit(".", 1)[-1][:11]) for v in comparison.violations)
        summary.append("violations by attribute: " + ", ".join(
            f"{key} {tag} x{n}" for (key, tag), n in sorted(by_key.items())))
    return "\n".join([*summary, "", *lines])


# --------------------------------------------------------------------------------------------
# The files
# --------------------------------------------------------------------------------------------

@contextmanager
def quiet() -> Iterator[None]:
    """pydicom's warnings and log lines quote values ("Invalid value for VR UI: '...'"): silenced
    while files are read, de-identified and compared, so no value reaches the test output."""
    logger = logging.getLogger("pydicom")
    disabled = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = disabled


def _read(path: Path) -> Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


def _candidates() -> dict[str, list[tuple[str, Path]]]:
    """(id, path) of every file of each source, sorted by id."""
    pydicom_root = Path(pydicom.data.__file__).parent / "test_files"
    sources = {"pydicom": [(f"pydicom/{p.relative_to(pydicom_root).as_posix()}", p)
                           for p in pydicom_root.glob("*.dcm") if p.is_file()]}
    for distribution, module in DATA_PACKAGES.items():
        try:
            root = Path(str(importlib.resources.files(module) / "data"))
        except ModuleNotFoundError:
            sources[distribution] = []
            continue
        sources[distribution] = [(f"{distribution}/{p.relative_to(root).as_posix()}", p)
                                 for p in root.rglob("*")
                                 if p.is_file() and "__pycache__" not in p.parts]
    return {source: sorted(files) for source, files in sources.items()}


@lru_cache(maxsize=1)
def select_files() -> tuple[tuple[str, Path], ...]:
    """Readable files with a SOP Instance UID, at most MAX_FILES, evenly spread over each source's
    sorted names; the smallest source first takes what it has up to an equal share."""
    usable: dict[str, list[tuple[str, Path]]] = {}
    with quiet():
        for source, files in _candidates().items():
            usable[source] = []
            for file_id, path in files:
                try:
                    ds = _read(path)
                except Exception:  # noqa: BLE001 - not DICOM, truncated, ...: not for this test
                    continue
                if ds.get("SOPInstanceUID"):
                    usable[source].append((file_id, path))
    chosen: list[tuple[str, Path]] = []
    order = sorted(usable, key=lambda source: (len(usable[source]), source))
    for position, source in enumerate(order):
        files = usable[source]
        share = min(len(files), (MAX_FILES - len(chosen)) // (len(order) - position))
        chosen.extend(files[index * len(files) // share] for index in range(share))
    return tuple(sorted(chosen))


def _dicognito(ds: Dataset) -> None:
    dicognito_anonymizer.Anonymizer(seed=DICOGNITO_SEED).anonymize(ds)


def _ours(ds: Dataset) -> Dataset:
    out, _ = deidentify_dataset(ds, profile=PROFILE, secret=SECRET, options=DeidOptions())
    return out


def _three(path: Path) -> tuple[Dataset, Dataset, Dataset]:
    """The original, dicognito's output and ours, each from its own reading of ``path``."""
    original, theirs = _read(path), _read(path)
    _dicognito(theirs)
    return original, theirs, _ours(_read(path))


PROFILE = load_profile()


@pytest.fixture(scope="module")
def comparison() -> Comparison:
    started = time.perf_counter()
    result = Comparison()
    with quiet():
        for file_id, path in select_files():
            original, theirs, ours = _read(path), _read(path), _read(path)
            try:
                _dicognito(theirs)
            except Exception as error:  # noqa: BLE001 - dicognito's failure: nothing to compare with
                result.skipped[file_id] = f"dicognito raised {type(error).__name__}"
                continue
            # Caught so that pytest's traceback (which shows function arguments: whole data sets,
            # values included) is never printed; a failure of ours fails the test below.
            try:
                ours = _ours(ours)
            except Exception as error:  # noqa: BLE001
                result.errors[file_id] = f"{type(error).__name__} in deidentify_dataset"
                continue
            violations, counts = compare(original, theirs, ours)
            result.files.append(file_id)
            for violation in violations:
                violation.file = file_id
            result.violations.extend(violations)
            for key, row in counts.items():
                total = result.counts.setdefault(key, KeywordCounts(row.tag))
                total.dicognito += row.dicognito
                total.ours += row.ours
                total.both += row.both
    result.seconds = time.perf_counter() - started
    return result


def _report(request: pytest.FixtureRequest, text: str) -> None:
    """Print ``text`` (shown with -s, or on failure); write it to $DICOMFLOW_REPORT_DIR when set;
    and, when pytest captures output, also straight to the terminal with capture suspended (as
    ``capsys.disabled()`` does), so a passing run shows it too. Under pytest-xdist the workers'
    terminal is not shown: use -s or the report file."""
    print(text)
    report_dir = os.environ.get("DICOMFLOW_REPORT_DIR")
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / REPORT_NAME).write_text(text + "\n", encoding="utf-8")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or request.config.getoption("capture") == "no":
        return
    with capture.global_and_fixture_disabled() if capture is not None else nullcontext():
        reporter.ensure_newline()
        for line in text.splitlines():
            reporter.write_line(line)


# --------------------------------------------------------------------------------------------
# The tests
# --------------------------------------------------------------------------------------------

def test_every_attribute_dicognito_changes_is_changed_or_removed(comparison, request):
    _report(request, format_table(comparison))
    assert not comparison.errors
    sources = Counter(file_id.split("/", 1)[0] for file_id in comparison.files)
    assert sources["pydicom"] >= 10, sources
    for distribution, module in DATA_PACKAGES.items():
        if importlib.util.find_spec(module) is not None:
            assert sources[distribution] >= 5, sources
    assert sum(row.dicognito for row in comparison.counts.values()) > 100  # not vacuous
    assert not comparison.violations, "\n".join(
        f"{v.file}: {v.path} {v.keyword}" for v in comparison.violations)


def _put_back(original: Dataset, theirs: Dataset, ours: Dataset, path: ElementPath) -> list[Violation]:
    """The violations that putting the original value at ``path`` back into ``ours`` adds."""
    before, _ = compare(original, theirs, ours)
    resolve(ours, path).value = resolve(original, path).value
    after, _ = compare(original, theirs, ours)
    return [violation for violation in after if violation not in before]


def test_comparison_reports_a_value_put_back_at_the_top_level():
    """The main test is not vacuous: a Patient's Name left in our output is reported, by path."""
    path = ("dataset", 0x00100010)
    with quiet():
        for _, file in select_files():
            original, theirs, ours = _three(file)
            elem = resolve(original, path)
            if elem is not None and not _is_empty(elem) and resolve(ours, path) is not None:
                added = _put_back(original, theirs, ours, path)
                break
        else:
            pytest.fail("no selected file has a Patient's Name")
    assert [(v.path, v.keyword) for v in added] == [("(0010,0010)", "PatientName")]


def test_comparison_reports_a_value_put_back_inside_a_sequence():
    """Likewise for the first value inside a sequence item that both tools change."""
    with quiet():
        for _, file in select_files():
            original, theirs, ours = _three(file)
            for path, elem in walk_all(original):
                if (len(path) >= 4 and elem.VR != "SQ" and not _is_empty(elem)
                        and resolve(ours, path) is not None
                        and _changed(elem, resolve(theirs, path)) and _changed(elem, resolve(ours, path))):
                    added = _put_back(original, theirs, ours, path)
                    expected = [(format_path(path), keyword_of(path[-1])[0])]
                    break
            else:
                continue
            break
        else:
            pytest.fail("no nested attribute is changed by both tools in the selected files")
    assert [(v.path, v.keyword) for v in added] == expected
    assert "]." in added[0].path
