"""Benchmark: the ingest stage's throughput and peak memory on a replicated sample.

Times, side by side in one run over the same files (the embedded sample in ``data/`` copied under
``copy-0001/``, ``copy-0002/``, ... until there are at least ``--files`` of them):
- ``plain loop``: ``pydicom.dcmread(f).pixel_array`` for every file in one process, broken files
  caught and counted, the least any reader has to do;
- ``ingest stage``: ``python -m stages.ingest`` as its users run it, in a temporary project folder
  whose ``params.yaml`` is the project's with ``paths`` pointed at the replicated set and the
  outputs kept inside that folder (``ingest.workers``, where present, is set to 0 = all cores).
Both are subprocesses, so their wall time includes interpreter start-up and imports. Peak memory
is the summed RSS of the process and all its children, sampled every 50 ms (shared pages count
once per process, so worker pools are over- rather than under-counted). The copies are real
files, not hard links, just written, so both read from a warm page cache: this measures decoding,
not the disk. Target (2 cores): the stage at least 1.6x the plain loop's files/s, doing all its
work, with peak RSS under 1 GiB.

    .venv/bin/python bench/ingest.py [--files 5000] [--repeat 3] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml
from ingest_memory import main as memory_table  # bench/ is on sys.path when this file runs

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.6
TARGET_RSS_MIB = 1024.0
SAMPLE_SECONDS = 0.05


def source_files(source: Path) -> list[Path]:
    """The sample's files other than labels.csv, skipping hidden ones as the stage does."""
    return sorted(p for p in source.rglob("*") if p.is_file() and p.name != "labels.csv"
                  and not any(part.startswith(".") for part in p.relative_to(source).parts))


def replicate(source: Path, target: Path, min_files: int) -> list[Path]:
    """Copy the sample into ``target`` often enough for ``min_files``; return every data file.

    Complete copies from an earlier run are reused (``--workdir``); a copy is written under a
    ``.partial`` name and renamed at the end, so an interrupted run never leaves half a copy.
    """
    originals = source_files(source)
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.partial"):
        shutil.rmtree(stale)
    for number in range(1, math.ceil(min_files / len(originals)) + 1):
        final = target / f"copy-{number:04d}"
        if final.is_dir():
            continue
        partial = target / f"copy-{number:04d}.partial"
        for path in originals:
            dest = partial / path.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            # Real copies, not os.link: hard links would let every copy share one inode and
            # one set of cached pages, flattering whichever reader touched them second.
            shutil.copyfile(path, dest)
        partial.rename(final)
    # One labels row per copied image, so that every ingest.label_key joins (``path`` included).
    with open(source / "labels.csv", newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        fields, rows = reader.fieldnames or [], list(reader)
    with open(target / "labels.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=fields)
        writer.writeheader()
        for copy in sorted(target.glob("copy-*")):
            writer.writerows({**row, "path": f"{copy.name}/{row['path']}"} if "path" in row else row
                             for row in rows)
    return source_files(target)


def write_project(project: Path, data: Path) -> None:
    """A project folder whose params.yaml reads ``data`` and writes only inside ``project``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    paths = params["paths"]
    for key, value in paths.items():
        paths[key] = str(project / value)
    paths["data"], paths["labels"] = str(data), str(data / "labels.csv")
    if "workers" in params.get("ingest", {}):
        params["ingest"]["workers"] = 0
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def tree_rss(root: psutil.Process) -> int:
    """Summed RSS in bytes of ``root`` and its descendants; processes may vanish mid-walk."""
    total = 0
    try:
        for process in [root, *root.children(recursive=True)]:
            try:
                total += process.memory_info().rss
            except psutil.Error:
                pass
    except psutil.Error:
        pass
    return total


def measure(command: list[str], *, cwd: Path, log: Path) -> tuple[float, float]:
    """Run ``command``; return its wall seconds and the peak RSS (MiB) of its process tree."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # so that `-m stages.ingest` imports
    with open(log, "w", encoding="utf-8") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(process.pid), 0
        while True:
            peak = max(peak, tree_rss(root))
            try:
                # Waiting instead of sleeping stops the clock as soon as the command ends.
                process.wait(timeout=SAMPLE_SECONDS)
                break
            except subprocess.TimeoutExpired:
                pass
        seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8").splitlines(keepends=True)[-15:])
        sys.exit(f"{' '.join(command)} failed (exit {process.returncode}):\n{tail}")
    return seconds, peak / 2**20


def baseline_worker(list_file: Path) -> None:
    """The plain loop, run as its own process by the benchmark."""
    import pydicom

    failed = 0
    for line in list_file.read_text(encoding="utf-8").splitlines():
        try:
            pydicom.dcmread(line).pixel_array
        except Exception:  # the sample's deliberately broken files
            failed += 1
    print(json.dumps({"failed": failed}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000, help="at least this many files")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating; best time")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the replicated set here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)

    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        source = ROOT / "data"
        if not (source / "labels.csv").is_file():
            source = work / "sample"
            if not (source / "labels.csv").is_file():
                subprocess.run([sys.executable, "-m", "dicomflow", "sample-data", str(source)],
                               cwd=ROOT, check=True)
        start = time.perf_counter()
        files = replicate(source, work / "data", args.files)
        print(f"replicated set: {len(files):,} files in {work / 'data'} "
              f"(prepared in {time.perf_counter() - start:.1f} s)")
        list_file = work / "files.txt"
        list_file.write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
        project = work / "project"
        shutil.rmtree(project, ignore_errors=True)
        write_project(project, work / "data")

        commands = {
            "plain loop (`pydicom.dcmread(f).pixel_array`, 1 process)":
                [sys.executable, str(Path(__file__).resolve()), "--baseline-worker", str(list_file)],
            "ingest stage (`python -m stages.ingest`)": [sys.executable, "-m", "stages.ingest"],
        }
        best = {name: math.inf for name in commands}
        peak = {name: 0.0 for name in commands}
        for _ in range(args.repeat):
            # Alternating, so that drift in the machine's state hits both alike.
            for (name, command), log in zip(commands.items(), ("baseline.log", "stage.log")):
                seconds, mib = measure(command, cwd=project, log=work / log)
                best[name], peak[name] = min(best[name], seconds), max(peak[name], mib)

        failed = json.loads((work / "baseline.log").read_text().splitlines()[-1])["failed"]
        report = json.loads((project / yaml.safe_load((project / "params.yaml").read_text())
                             ["paths"]["ingest_metrics"]).read_text())
        if report["files"] != len(files):  # otherwise the two did not read the same set
            sys.exit(f"the stage saw {report['files']} files, the plain loop {len(files)}")

        print(f"CPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})")
        print(f"plain loop: {failed} files raised; ingest stage: {report['images']:,} images, "
              f"{report['quarantined']} quarantined\n")
        baseline_rate = len(files) / best[next(iter(commands))]
        print(f"| implementation | files | wall s (best of {args.repeat}) | files/s | "
              f"peak RSS (MiB) | vs plain loop |")
        print("|---|---:|---:|---:|---:|---:|")
        for name in commands:
            rate = len(files) / best[name]
            print(f"| {name} | {len(files):,} | {best[name]:.2f} | {rate:,.0f} | {peak[name]:,.0f} | "
                  f"{rate / baseline_rate:.2f}x |")
        stage = list(commands)[1]
        ratio = len(files) / best[stage] / baseline_rate
        print(f"\nTargets (2 cores): stage >= {TARGET_RATIO}x the plain loop: "
              f"{'met' if ratio >= TARGET_RATIO else 'MISSED'} ({ratio:.2f}x); stage peak RSS < "
              f"{TARGET_RSS_MIB:.0f} MiB: {'met' if peak[stage] < TARGET_RSS_MIB else 'MISSED'} "
              f"({peak[stage]:,.0f} MiB)")
        print("\nWhat one large file costs a reader process (bench/ingest_memory.py):\n")
        memory_table()
    finally:
        if args.keep or args.workdir:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
