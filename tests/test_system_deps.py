"""tools/system-deps: what `make repro` and `make test` need outside Python, named in one line when missing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "system-deps"


def _run_with_only(tmp_path: Path, purpose: str) -> subprocess.CompletedProcess:
    """The script on a PATH holding only what it runs itself (bash, id, cut): no tool, no apt-get, no sudo."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for program in ("bash", "id", "cut"):
        (bin_dir / program).symlink_to(shutil.which(program))
    return subprocess.run([str(bin_dir / "bash"), str(SCRIPT), purpose], capture_output=True, text=True,
                          env={"PATH": str(bin_dir)}, timeout=60)


def _present(pattern: str) -> bool:
    return any(Path("/").glob(pattern))


@pytest.mark.parametrize("purpose", ["repro", "test"])
def test_without_the_tools_or_a_way_to_install_them_it_names_them_in_one_line(tmp_path, purpose):
    result = _run_with_only(tmp_path, purpose)
    # Two are found by their files, not on PATH: Tesseract's English model and PostgreSQL's initdb.
    missing = [] if _present("usr/share/tesseract-ocr/*/tessdata/eng.traineddata") else [
        ("tesseract-ocr", "eng.traineddata")]
    if purpose == "test":
        missing.append(("dicom3tools", "dciodvfy"))
        if not _present("usr/lib/postgresql/*/bin/initdb"):
            missing.append(("postgresql", "initdb"))
        missing += [("nodejs npm", "node, npm"), ("chromium", "chromium"),
                    ("orthanc orthanc-dicomweb", "Orthanc with DICOMweb")]
    if not missing:  # `repro` where the model is installed: nothing to say
        assert (result.returncode, result.stderr, result.stdout) == (0, "", "")
        return
    named = ", ".join(f"{package} ({provides})" for package, provides in missing)
    assert result.stderr.splitlines() == [
        f"missing: {named}: sudo apt-get install {' '.join(package for package, _ in missing)}"]
    assert result.returncode == 1 and result.stdout == ""


def test_it_refuses_an_unknown_purpose():
    result = subprocess.run([str(SCRIPT), "everything"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == "usage: tools/system-deps repro|test\n"


@pytest.mark.parametrize("target, purpose", [("repro", "repro"), ("test", "test"), ("check", "test")])
def test_make_checks_the_packages_before_anything_else(target, purpose):
    """The Makefile runs the script first (.ci/run only calls make): one place lists the packages."""
    # Under `make test` the environment says so (MAKELEVEL, MAKEFLAGS): this make would print
    # "Entering directory" first.
    environ = {key: value for key, value in os.environ.items() if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    dry_run = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=SCRIPT.parents[1],
                             capture_output=True, text=True, timeout=60, check=True, env=environ)
    assert dry_run.stdout.splitlines()[0] == f"tools/system-deps {purpose}"
