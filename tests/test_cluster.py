"""Ingest and deidentify on a real Dask cluster: a ``dask scheduler`` and two ``dask worker``
processes on loopback, started in a folder of their own (so the workers find files only through
the absolute paths the stages send), against the same stages run on this machine's pool."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

from dicomflow.runtime import cluster
from dicomflow.runtime.parallel import WorkFailure, ordered_map

pytestmark = pytest.mark.slow  # a real scheduler and workers

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STAGE_OUTPUTS = ("outputs/ingest", "outputs/deidentify", "reports/ingest.json", "reports/deidentify.json")

def _start(args: list[str], cwd: Path, env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory) -> str:
    """The address of a scheduler with two single-thread workers; both ended afterwards."""
    home = tmp_path_factory.mktemp("dask")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           # one death is enough to call an item a killer: the tests need not kill four workers
           "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0",
           # workers hold PHI (headers, the identifiers to scrub): never spilled to their disk
           "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
           "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
           # the same code on every machine: this module's functions and the library's are sent by
           # reference, so the workers import this checkout's (not whatever the venv points at)
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    env.pop(cluster.SCHEDULER_ENV, None)
    scheduler_file = home / "scheduler.json"
    processes = [_start(["dask", "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                         "--scheduler-file", str(scheduler_file)], home, env, home / "scheduler.log")]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert scheduler_file.exists(), (home / "scheduler.log").read_text()
        for number in (1, 2):
            processes.append(_start(["dask", "worker", "--scheduler-file", str(scheduler_file),
                                     "--nthreads", "1", "--no-dashboard", "--local-directory",
                                     str(home / f"worker-{number}")], home, env,
                                    home / f"worker-{number}.log"))
        with Client(scheduler_file=str(scheduler_file), timeout="30s") as client:
            client.wait_for_workers(2, timeout=90)
            address = client.scheduler.address
        yield address
    finally:
        for process in reversed(processes):
            os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def _projects(local: Path, on_cluster: Path, env: dict[str, str]) -> tuple[Path, Path]:
    """Two project folders holding the same small sample."""
    local.mkdir()
    shutil.copy(REPO / "params.yaml", local)
    subprocess.run([sys.executable, "-m", "dicomflow", "sample-data", "data", "--patients", "40"],
                   cwd=local, env=env, check=True, capture_output=True)
    shutil.copytree(local, on_cluster)
    return local, on_cluster


def _run_stages(root: Path, env: dict[str, str]) -> str:
    output = ""
    for stage in ("ingest", "deidentify"):
        result = subprocess.run([sys.executable, "-m", f"stages.{stage}"], check=False, cwd=root, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-4000:]
        output += result.stderr
    return output


def _files(root: Path) -> dict[str, bytes]:
    found = {}
    for name in STAGE_OUTPUTS:
        path = root / name
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if file.is_file():
                found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


def test_stages_on_the_cluster_write_the_bytes_a_local_run_writes(scheduler, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DICOMFLOW_")}
    env.pop(cluster.SCHEDULER_ENV, None)
    env["PYTHONPATH"] = str(REPO)  # the stages and the library, as on the workers
    env["DICOMFLOW_SECRET"] = "cluster test: the tiny sample is not the embedded one"
    local, on_cluster = _projects(tmp_path / "local", tmp_path / "cluster", env)

    _run_stages(local, env)
    log = _run_stages(on_cluster, {**env, cluster.SCHEDULER_ENV: scheduler})

    assert f"on the Dask cluster at {scheduler} (2 worker(s), 2 thread(s))" in log
    assert log.count(f"items on the Dask cluster at {scheduler}") == 3  # ingest; deidentify's 2 passes
    assert f"files on the Dask cluster at {scheduler}\n" in log  # ingest's summary
    # Away from a terminal there are no bars (dicomflow/runtime/progress.py): the summaries tell
    # that each stage got to the end.
    assert "ingested " in log and "de-identified " in log
    assert "\r" not in log
    local_files, cluster_files = _files(local), _files(on_cluster)
    assert any(name.endswith(".dcm") for name in local_files)
    assert "outputs/ingest/quarantine.csv" in local_files
    assert sorted(cluster_files) == sorted(local_files)
    assert [name for name in local_files if cluster_files[name] != local_files[name]] == []


def _square_or_die(n: int) -> int:
    if n == 7:
        os._exit(3)  # a decoder that takes its process down with it
    if n == 11:
        time.sleep(3600)  # a decoder that never returns
    if n == 13:
        raise ValueError("an item's own error")
    return n * n


def test_a_killer_item_and_a_hanging_item_cost_only_themselves(scheduler, monkeypatch):
    monkeypatch.setenv(cluster.SCHEDULER_ENV, scheduler)

    results = list(ordered_map(_square_or_die, range(40), workers=1, timeout_s=2,
                               on_failure=lambda n, why: (n, why)))

    assert results[7] == (7, WorkFailure("worker_died", "killed every Dask worker that ran it (KilledWorker)"))
    assert results[11] == (11, WorkFailure("timeout", "still running after 2 s (the per-file time limit)"))
    assert results[13] == (13, WorkFailure("worker_error", "ValueError"))
    assert [r for n, r in enumerate(results) if n not in (7, 11, 13)] == [
        n * n for n in range(40) if n not in (7, 11, 13)]


def _add_offset(n: int, offset: int) -> int:
    return n + offset


def test_shared_arguments_reach_every_worker_and_runs_do_not_mix(scheduler, monkeypatch):
    monkeypatch.setenv(cluster.SCHEDULER_ENV, scheduler)
    for offset in (1000, 2000):
        results = list(ordered_map(_add_offset, range(64), workers=1, shared_args=(offset,),
                                   on_failure=lambda n, why: why))
        assert results == [n + offset for n in range(64)]


def test_a_scheduler_without_workers_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(cluster, "WORKERS_WAIT_S", 1.0)
    scheduler_file = tmp_path / "scheduler.json"
    lonely = _start([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                     "--scheduler-file", str(scheduler_file)], tmp_path, dict(os.environ), tmp_path / "log")
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        with pytest.raises(RuntimeError, match=f"the Dask scheduler at {address} .* has no worker"):
            list(cluster.cluster_map(abs, [1], address=address, on_failure=lambda n, why: why))
    finally:
        os.killpg(lonely.pid, signal.SIGTERM)
        lonely.wait(timeout=20)
