"""The committed dvc.lock is the one the committed code and params produce.

A stale dvc.lock means the committed reports/ and README figures came from other code: `dvc
status` on a fresh clone shows the stage `modified`. Fix a failure by running `make repro` and
committing dvc.lock and reports/ together with the code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LOCK = yaml.safe_load((REPO / "dvc.lock").read_text())
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())
PIPELINE = yaml.safe_load((REPO / "dvc.yaml").read_text())

CODE_DEPS = [(stage, dep["path"], dep["md5"]) for stage, entry in LOCK["stages"].items()
             for dep in entry.get("deps", []) if (REPO / dep["path"]).is_file()
             and dep["path"].startswith("stages/")]


def test_every_stage_of_dvc_yaml_is_locked():
    assert set(LOCK["stages"]) == set(PIPELINE["stages"])
    assert len(CODE_DEPS) >= len(PIPELINE["stages"])  # every stage has its own module at least


@pytest.mark.parametrize(("stage", "path", "locked"), CODE_DEPS, ids=[f"{s}:{p}" for s, p, _ in CODE_DEPS])
def test_locked_code_is_the_committed_code(stage, path, locked):
    actual = hashlib.md5((REPO / path).read_bytes()).hexdigest()
    assert actual == locked, (f"dvc.lock records another {path} for stage {stage!r} than the repository's: "
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
