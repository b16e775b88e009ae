"""The committed dvc.lock is the one the committed code and params produce.

A stale dvc.lock means the committed reports/ and README figures came from other code: `dvc
status` on a fresh clone shows the stage `modified`. Fix a failure by running `make repro` and
committing dvc.lock and reports/ together with the code.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCK = yaml.safe_load((REPO / "dvc.lock").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())

CODE_DEPS = [(stage, dep["path"]) for stage, entry in LOCK["stages"].items() for dep in entry.get("deps", [])
             if dep["path"].split("/")[0] in ("stages", "dicomflow")]


def test_every_stage_of_dvc_yaml_is_locked():
    assert set(LOCK["stages"]) == set(PIPELINE["stages"])
    assert {stage for stage, path in CODE_DEPS if path == f"stages/{stage}.py"} == set(PIPELINE["stages"])


@pytest.fixture(scope="module")
def changed_deps() -> dict[str, set[str]]:
    """Per stage, the deps DVC itself finds changed against dvc.lock (DVC hashes the code
    folders; on a fresh clone the data deps are missing and are left out here)."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
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
        f"dvc.lock records another {path} for stage {stage!r} than the repository's: "
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
    assert actual == locked, (f"dvc.lock ran stage {stage!r} with {key} = {locked!r}, params.yaml says "
                              f"{actual!r}: run `make repro` and commit dvc.lock with params.yaml")
