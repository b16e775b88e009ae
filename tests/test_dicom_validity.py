"""De-identified files are still valid DICOM: ``dciodvfy`` finds no error in them that it does
not find in their source.

Sources: the embedded sample (the smallest set :func:`dicomflow.devtools.sample_data.generate_sample` makes,
which has every modality, transfer syntax, photometric and bit depth variant) and the files of
``pydicom.data.get_testdata_files()`` (pydicom's and pydicom-data's), each only if ingest accepts
it with the repository's ``ingest`` params, i.e. if it can reach the deidentify stage. Each is
de-identified as :func:`dicomflow.deid.worker.deidentify_file` does it; files the stage leaves out
for burned-in text (the params' rules) are not written by it, so not checked here.

``dciodvfy`` (Debian's ``dicom3tools``; ``.ci/run`` installs it) checks each source and its output;
its ``Error`` lines are compared once the values in them are stripped (:func:`normalise`), since
de-identification changes values on purpose (UIDs, names, dates): an error about the same
attribute, module and kind of problem counts as the same. Warnings are not compared.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pydicom.data
import pytest
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicomflow.deid.profile import deidentify_dataset, load_profile
from dicomflow.deid.burned_in import burned_in_risk
from dicomflow.deid.worker import deid_options
from dicomflow.runtime.log_privacy import hidden_pydicom_messages
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.ingestion import ingest_file
from dicomflow.config.params import load_params
from dicomflow.devtools.sample_data import generate_sample

pytestmark = pytest.mark.slow  # its fixtures take seconds: make test runs it, make check does not

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
SECRET = b"dicom validity test secret"
SAMPLE_PATIENTS = 20  # generate_sample's minimum: every variant and defect is in it
MIN_PYDICOM_SOURCES = 30  # about 70 reach the stage; far fewer means the selection broke
DCIODVFY_TIMEOUT_S = 60
INSTALL_HINT = "dciodvfy is not installed: apt-get install dicom3tools (make test installs it: tools/system-deps)"

# Values inside an Error line, replaced so that only the attribute, module and kind remain.
# Attribute and module names are also in <...> (Element=<X>, Module=<X>, attribute <X>): kept.
VALUE_PATTERNS = (
    (re.compile(r"(?<!Element=)(?<!Module=)(?<!attribute )<[^<>]*>"), "<…>"),  # UI [1] = <value>
    (re.compile(r'"[^"]*"'), '"…"'),                       # Illegal root for UID - "value"
    (re.compile(r"= '.*?' \(0x[0-9A-Fa-f]+\)"), "= '…'"),  # Character invalid ... = 'f' (0x66)
    (re.compile(r"(for this VR =) \d+"), r"\1 #"),         # Length invalid for this VR = 64
    (re.compile(r"(values are) .*$"), r"\1 …"),            # ... vector ... - values are 0\0\0
    (re.compile(r"\b\d+(?:\.\d+){3,}\b"), "…"),            # any other UID
    (re.compile(r"\s+"), " "),
)


def normalise(line: str) -> str:
    """An Error line of dciodvfy without the values that de-identification may change."""
    for pattern, replacement in VALUE_PATTERNS:
        line = pattern.sub(replacement, line)
    return line.strip()


def dciodvfy_errors(path: Path) -> set[str]:
    """The normalised Error lines of ``dciodvfy path`` (one entry too when dciodvfy aborts)."""
    result = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace",
                            timeout=DCIODVFY_TIMEOUT_S)
    output = (result.stderr + "\n" + result.stdout).splitlines()
    errors = {normalise(line) for line in output if line.startswith("Error")}
    if result.returncode < 0:  # e.g. an assertion on 32-bit RT Dose pixels: same on both sides
        last = next((line for line in reversed(output) if line.strip()), "")
        errors.add(normalise(f"dciodvfy aborted (signal {-result.returncode}): {last}"))
    return errors


@dataclass(frozen=True)
class Source:
    id: str
    path: Path
    root: Path  # ingest_file's data_dir


@dataclass(frozen=True)
class Checked:
    source: Source
    modality: str
    transfer_syntax: str
    new_errors: tuple[str, ...]  # in the output, not in the source; or why there is no output


def _sources(sample_dir: Path) -> list[Source]:
    sources = [Source(f"sample/{path.relative_to(sample_dir).as_posix()}", path, sample_dir)
               for path in sorted(sample_dir.rglob("*")) if path.is_file() and path.name != "labels.csv"]
    roots = {Path(pydicom.data.__file__).parent: "pydicom"}
    for name in sorted(pydicom.data.get_testdata_files()):
        path = Path(name)
        root, label = next(((r, lbl) for r, lbl in roots.items() if path.is_relative_to(r)),
                           (path.parent, "pydicom-data"))
        sources.append(Source(f"{label}/{path.relative_to(root).as_posix()}", path, root))
    return sources


def _deidentify(source: Source, out: Path, *, settings: PixelSettings, params, profile) -> Checked | None:
    """De-identify as the stage does into ``out``; None for a file the stage would not write."""
    with hidden_pydicom_messages():  # as the stages do: pydicom's warnings about odd test files
        result = ingest_file(source.path, data_dir=source.root, settings=settings)
        if result.reason or not result.images:
            return None  # quarantined by ingest: never reaches the deidentify stage
        try:
            ds = pydicom.dcmread(source.path)
        except Exception:  # noqa: BLE001  the stage stops with "source file unreadable": no output
            return None
        modality = str(ds.get("Modality", ""))
        syntax = str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))
        if burned_in_risk(ds, params):
            return None  # excluded (burned_in_action: exclude): the stage writes no file
        try:
            ds, _ = deidentify_dataset(ds, profile=profile, secret=SECRET, options=deid_options(params),
                                       in_place=True)
            ds.save_as(out, enforce_file_format=True)
        except Exception as err:  # noqa: BLE001  reported: the stage would crash on this file
            return Checked(source, modality, syntax, (f"no output: {type(err).__name__}: {err}",))
    return Checked(source, modality, syntax, ())


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> list[Checked]:
    if shutil.which("dciodvfy") is None:
        pytest.fail(INSTALL_HINT)
    work = tmp_path_factory.mktemp("dicom_validity")
    generate_sample(work / "sample", patients=SAMPLE_PATIENTS)
    (work / "out").mkdir()
    settings = PixelSettings.from_params(load_params("ingest", PARAMS))
    params, profile = load_params("deidentify", PARAMS), load_profile()
    done: list[tuple[Checked, Path]] = []
    for number, source in enumerate(_sources(work / "sample")):
        out = work / "out" / f"{number:04d}.dcm"
        outcome = _deidentify(source, out, settings=settings, params=params, profile=profile)
        if outcome is not None:
            done.append((outcome, out))
    written = [(outcome, out) for outcome, out in done if not outcome.new_errors]
    with ThreadPoolExecutor(max_workers=2) as pool:
        before = pool.map(dciodvfy_errors, [outcome.source.path for outcome, _ in written])
        after = pool.map(dciodvfy_errors, [out for _, out in written])
        new = {outcome.source.id: tuple(sorted(errors_out - errors_in))
               for (outcome, _), errors_in, errors_out in zip(written, before, after)}
    results = [Checked(outcome.source, outcome.modality, outcome.transfer_syntax,
                       outcome.new_errors + new.get(outcome.source.id, ()))
               for outcome, _ in done]
    return results


def describe(problems: list[Checked], total: int) -> str:
    """Failure text: files with the same new errors grouped, each group's errors listed."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for item in problems:
        groups.setdefault(item.new_errors, []).append(item.source.id)
    lines = [f"{len(problems)} of {total} de-identified files have dciodvfy errors their source "
             "has not (values stripped):"]
    for errors, ids in sorted(groups.items(), key=lambda group: (-len(group[1]), group[0])):
        shown = ", ".join(ids[:6]) + (f" and {len(ids) - 6} more" if len(ids) > 6 else "")
        lines.append(f"* {len(ids)} file(s): {shown}")
        lines.extend(f"    {error}" for error in errors)
    return "\n".join(lines)


def test_dciodvfy_is_installed():
    assert shutil.which("dciodvfy"), INSTALL_HINT


def test_enough_sources_are_checked(checked):
    sample = {(c.modality, c.transfer_syntax) for c in checked if c.source.id.startswith("sample/")}
    assert sample == {(m, ts) for m in ("CR", "DX") for ts in (ExplicitVRLittleEndian, RLELossless)}
    others = [c for c in checked if not c.source.id.startswith("sample/")]
    assert len(others) >= MIN_PYDICOM_SOURCES, f"only {len(others)} pydicom test files were checked"


def test_deidentified_files_add_no_dciodvfy_errors(checked):
    problems = [c for c in checked if c.new_errors]
    if problems:
        pytest.fail(describe(problems, len(checked)), pytrace=False)


def test_normalise_keeps_names_and_strips_values():
    line = ("Error - Value invalid for this VR - (0x0020,0x000d) UI Study Instance UID  UI [1] = "
            "<05fa52f0e5> - Character invalid for this VR = 'f' (0x66)")
    assert normalise(line) == ("Error - Value invalid for this VR - (0x0020,0x000d) UI Study Instance UID "
                               "UI [1] = <…> - Character invalid for this VR = '…'")
    kept = "Error - Missing attribute Type 1 Required Element=<BurnedInAnnotation> Module=<DXImage>"
    assert normalise(kept) == kept
    assert normalise("Error - Unrecognized enumerated value <US> for value 1 of attribute <Rescale Type>") \
        == "Error - Unrecognized enumerated value <…> for value 1 of attribute <Rescale Type>"
    assert normalise('Error - Illegal root for UID - "1.2.3.4.5" in (0x0008,0x0018) SOP Instance UID') \
        == 'Error - Illegal root for UID - "…" in (0x0008,0x0018) SOP Instance UID'
    assert normalise("Error - Value invalid for this VR - (0x0020,0x0010) SH Study ID  SH [1] = <x> - "
                     "Length invalid for this VR = 64, expected <= 16").endswith("VR = #, expected <= 16")
