"""The committed dvc.lock is the one the committed code and params produce.

A stale dvc.lock means the committed reports/ and README figures came from other code: `dvc
status` on a fresh clone shows the stage `modified`. Fix a failure by running `make repro` and
committing dvc.lock and reports/ together with the code.

Everything is read from the last commit (``git archive HEAD``), never from the working tree: the
question is whether what a clone gets agrees with itself, so an edit not yet committed (the normal
state while working) cannot fail it, and an edit committed without `make repro` always does. The
module is marked ``slow``: `make check` leaves it out (it fails by design between a code commit and
the `make repro` that follows), `make test` and CI run it.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
# What DVC needs to hash the code deps and read the params: the pipeline, its lock, its params,
# the ignore rules and the code folders dvc.yaml lists.
COMMITTED = ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".dvc/config", "stages", "dicomflow")


def _show(path: str) -> str:
    return subprocess.run(["git", "show", f"HEAD:{path}"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout


LOCK = yaml.safe_load(_show("dvc.lock"))
PARAMS = yaml.safe_load(_show("params.yaml"))
PIPELINE = yaml.safe_load(_show("dvc.yaml"))

CODE_DEPS = [(stage, dep["path"]) for stage, entry in LOCK["stages"].items() for dep in entry.get("deps", [])
             if dep["path"].split("/")[0] in ("stages", "dicomflow")]


def test_every_stage_of_dvc_yaml_is_locked():
    assert set(LOCK["stages"]) == set(PIPELINE["stages"])
    assert {stage for stage, path in CODE_DEPS if path == f"stages/{stage}.py"} == set(PIPELINE["stages"])


@pytest.fixture(scope="module")
def changed_deps(tmp_path_factory) -> dict[str, set[str]]:
    """Per stage, the deps DVC itself finds changed against dvc.lock, in a copy of the last
    commit (DVC hashes the code folders; the data deps are not in it and are left out here)."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("committed")
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD", *COMMITTED], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    subprocess.run(["git", "init", "--quiet"], cwd=root, check=True)  # DVC wants a Git repository
    with Repo(str(root)) as repo:
        status = repo.status()
    changed: dict[str, set[str]] = {}
    for stage, entries in status.items():
        for entry in entries:
            if isinstance(entry, dict):
                for path, state in entry.get("changed deps", {}).items():
                    if state == "modified":
                        changed.setdefault(stage.split(":")[-1], set()).add(path)
    return changed


@pytest.mark.parametrize(("stage", "path"), CODE_DEPS, ids=[f"{s}:{p}" for s, p in CODE_DEPS])
def test_locked_code_is_the_committed_code(stage, path, changed_deps):
    assert path not in changed_deps.get(stage, set()), (
        f"dvc.lock records another {path} for stage {stage!r} than the last commit's: "
        "run `make repro` and commit dvc.lock and reports/ with the code")


def _locked_params():
    for stage, entry in LOCK["stages"].items():
        for values in entry.get("params", {}).values():
            for key, value in values.items():
                yield stage, key, value


@pytest.mark.parametrize(("stage", "key", "locked"), list(_locked_params()),
                         ids=[f"{s}:{k}" for s, k, _ in _locked_params()])
def test_locked_params_are_the_committed_params(stage, key, locked):
    section, _, name = key.partition(".")
    actual = PARAMS[section] if not name else PARAMS[section][name]
    assert actual == locked, (f"dvc.lock ran stage {stage!r} with {key} = {locked!r}, the committed "
                              f"params.yaml says {actual!r}: run `make repro` and commit dvc.lock with params.yaml")
