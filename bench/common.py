"""What every benchmark shares: work folders, the sample, peak memory, and the table + JSON output.

Work folders
    :func:`work_folder` (a temporary folder, or ``--workdir`` kept and reused), :func:`ensure_sample`
    (the embedded sample), :func:`replicate` (the sample copied until there are enough files),
    :func:`write_project` (a project folder whose ``params.yaml`` reads a given data folder) and
    :func:`stage_report` (a metrics file a stage wrote there).

Peak memory, one way
    :func:`run_measured` runs a command and reads the resident memory of its whole process tree
    from outside every 50 ms (:class:`TreeMemory`): RSS summed over the tree (the figure the tables
    give), PSS summed over the tree (a page shared by n processes counted 1/n, from the kernel's
    ``/proc/PID/smaps_rollup``), the largest child's RSS, and the command's own process's peak
    from the kernel's high-water mark (``VmHWM`` in ``/proc/PID/status``, exact however short the
    peak, as long as the process lives one interval past it). Why this way: the stages run a pool
    of worker processes, and only a walk of the tree sees them all; it needs nothing inside the
    measured code, so a stage is measured as its users run it. Not ``getrusage``'s
    ``ru_maxrss``: Linux carries it over from the parent across fork and exec, so a child of a
    parent that once held a large image starts at the parent's peak (VmHWM belongs to the
    process's own address space, new at exec). Not the cgroup ``memory.peak``: it counts the page
    cache of every file read or written, which a benchmark on files it has just written would
    mostly measure, and it needs a cgroup of one's own (this machine has cgroup v1). What the
    summed figures can miss is a peak shorter than the interval.

Output
    :func:`add_output_args` gives a benchmark ``--json FILE`` (and ``--workdir``, ``--keep``);
    :class:`Report` prints each table as Markdown on stdout and writes the same figures (raw
    numbers, not the printed text), the targets, the machine, the date and the commit to the
    ``--json`` file.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SAMPLE_SECONDS = 0.05


# --- work folders and the sample ----------------------------------------------------------------


@contextmanager
def work_folder(name: str, *, workdir: Path | None = None, keep: bool = False) -> Iterator[Path]:
    """A work folder for one benchmark run, removed at the end unless kept.

    Parameters
    ----------
    name : str
        The benchmark's name, in the temporary folder's name (``bench-NAME-...``).
    workdir : Path, optional
        Use (and keep) this folder instead, created when missing: corpora written there are
        reused by the next run.
    keep : bool, default=False
        Keep the temporary folder; its path is printed on stderr at the end.
    """
    work = workdir.resolve() if workdir else Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        yield work
    finally:
        if keep or workdir:
            print(f"kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


def ensure_sample(work: Path) -> Path:
    """The embedded sample: ``data/`` when present, else generated into ``work/sample`` (so that
    a benchmark never writes into the project's DVC data)."""
    source = ROOT / "data"
    if not (source / "labels.csv").is_file():
        source = work / "sample"
        if not (source / "labels.csv").is_file():
            subprocess.run([sys.executable, "-m", "dicomflow", "sample-data", str(source)],
                           cwd=ROOT, env=bench_env(), check=True, stdout=subprocess.DEVNULL)
    return source


def source_files(source: Path) -> list[Path]:
    """The files under ``source`` other than labels.csv, skipping hidden ones as the stage does."""
    return sorted(p for p in source.rglob("*") if p.is_file() and p.name != "labels.csv"
                  and not any(part.startswith(".") for part in p.relative_to(source).parts))


def replicate(source: Path, target: Path, min_files: int) -> list[Path]:
    """Copy the sample into ``target`` as ``copy-0001/``, ... often enough for ``min_files``, write
    one labels row per copied image; return every data file.

    Complete copies from an earlier run are reused (``--workdir``); a copy is written under a
    ``.partial`` name and renamed at the end, so an interrupted run never leaves half a copy.
    Copies already in ``target`` beyond ``min_files`` (hard links, say) are listed too.
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


def write_project(project: Path, data: Path, *, ingest: dict[str, Any] | None = None) -> dict[str, Any]:
    """A fresh project folder whose dvc.yaml locations read ``data`` and write only inside ``project``
    (``ingest.workers``, where present, 0 = all cores; ``ingest``: keys set in the ``ingest``
    section, a dict value merged into the section's dict of that name); returns its params with
    its ``paths``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    for key, value in (ingest or {}).items():
        params["ingest"][key] = ({**params["ingest"][key], **value} if isinstance(value, dict)
                                 else value)
    from dicomflow.config.params import load_paths

    paths = asdict(load_paths(ROOT / "dvc.yaml"))
    for key, value in paths.items():
        paths[key] = str(project / value)
    paths["data"], paths["labels"] = str(data), str(data / "labels.csv")
    if "workers" in params.get("ingest", {}):
        params["ingest"]["workers"] = 0
    shutil.rmtree(project, ignore_errors=True)
    project.mkdir(parents=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    # Only the locations: the stages are run here by hand, not by DVC.
    (project / "dvc.yaml").write_text(yaml.safe_dump({"vars": [{"paths": paths}], "stages": {}}, sort_keys=False),
                                      encoding="utf-8")
    return {**params, "paths": paths}


def stage_report(project: Path, key: str = "ingest_metrics") -> dict[str, Any]:
    """The metrics file ``paths.<key>`` that a stage wrote in ``project`` (see write_project)."""
    from dicomflow.config.params import load_paths

    paths = asdict(load_paths(project / "dvc.yaml"))
    return json.loads(Path(paths[key]).read_text(encoding="utf-8"))


def bench_env(**extra: str) -> dict[str, str]:
    """This environment with the project root on PYTHONPATH, so that ``-m stages.X``,
    ``-m bench.X`` and ``-m dicomflow`` import this tree wherever they run."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


# --- peak memory ----------------------------------------------------------------------------------


@dataclass
class TreeMemory:
    """Peaks of a process tree's resident memory in MiB, and the root's RSS over time."""

    rss: float = 0.0        # RSS summed over the tree: the figure the tables give
    pss: float = 0.0        # PSS summed over the tree: a page shared by n processes counts 1/n
    root: float = 0.0       # peak RSS of the command's own process: the kernel's VmHWM
    worker: float = 0.0     # RSS of the largest single child
    root_curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)

    def sample(self, root: psutil.Process, seconds: float) -> None:
        """Read the tree once; processes may start or end during the walk."""
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss, pss = [], []
        for process in processes:
            try:
                # PSS as well as RSS: forked workers share the parent's pages, which the summed
                # RSS counts once per process; PSS (smaps_rollup, about 0.2 ms) splits them.
                info = process.memory_full_info()
                rss.append(info.rss / MIB)
                pss.append(info.pss / MIB)
            except psutil.Error:  # a worker that ended between the walk and the read
                rss.append(0.0)
                pss.append(0.0)
        self.rss = max(self.rss, sum(rss))
        self.pss = max(self.pss, sum(pss))
        self.root = max(self.root, rss[0], _high_water_mib(root.pid))
        self.worker = max([self.worker, *rss[1:]])
        self.root_curve.append((seconds, rss[0]))

    def root_at(self, fraction: float) -> float:
        """The root's largest RSS up to ``fraction`` of the run (0.25: its first quarter)."""
        end = self.root_curve[-1][0] * fraction if self.root_curve else 0.0
        return max((mib for t, mib in self.root_curve if t <= end), default=0.0)

    def figures(self) -> dict[str, float]:
        """The peaks (MiB), without the curve: what a JSON row holds."""
        return {f"peak_{name}_mib": value for name, value in asdict(self).items()
                if name != "root_curve"}


def _high_water_mib(pid: int) -> float:
    """The kernel's peak RSS of process ``pid`` so far (VmHWM), 0 when it has ended."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return next((int(line.split()[1]) / 1024 for line in status
                         if line.startswith("VmHWM:")), 0.0)
    except OSError:
        return 0.0


@dataclass
class Measured:
    """One run of a command: its wall seconds and the memory of its process tree."""

    seconds: float
    memory: TreeMemory


def run_measured(command: Sequence[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None,
                 interval: float = SAMPLE_SECONDS) -> Measured:
    """Run ``command`` (stdout and stderr to ``log``), sampling its process tree's memory every
    ``interval`` seconds; a failed command ends the benchmark with the log's last lines.

    Parameters
    ----------
    command : sequence of str
        Run as is (no shell), with ``env`` (default: :func:`bench_env`).
    cwd, log : Path
        Its working folder; the file its output goes to (overwritten).
    interval : float, default=0.05
        Seconds between samples (each costs about a millisecond per process).

    Returns
    -------
    Measured
        Wall seconds from start to exit (interpreter start-up and imports included) and the
        :class:`TreeMemory` of the run.
    """
    memory = TreeMemory()
    with open(log, "w", encoding="utf-8") as out:
        start = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=cwd, env=env or bench_env(), stdout=out,
                                   stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid)
        while True:
            memory.sample(root, time.perf_counter() - start)
            try:
                # Waiting instead of sleeping stops the clock as soon as the command ends.
                process.wait(timeout=interval)
                break
            except subprocess.TimeoutExpired:
                pass
        seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = "".join(log.read_text(encoding="utf-8", errors="replace").splitlines(keepends=True)[-15:])
        sys.exit(f"{' '.join(command)} failed (exit {process.returncode}):\n{tail}")
    return Measured(seconds, memory)


# --- output -----------------------------------------------------------------------------------


def add_output_args(parser: argparse.ArgumentParser, *, folders: bool = True) -> None:
    """``--json FILE`` and, with ``folders``, ``--workdir DIR`` and ``--keep``."""
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the figures (raw numbers), targets, machine and commit here")
    if folders:
        parser.add_argument("--workdir", type=Path, help="keep (and reuse) the corpora here")
        parser.add_argument("--keep", action="store_true", help="keep the temporary folder")


@dataclass(frozen=True)
class Column:
    """One column of a table: its header, the row key it shows and the format of the value."""

    header: str
    key: str
    fmt: str = "{}"

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return "-"
        return value if isinstance(value, str) else self.fmt.format(value)  # text as it stands


def cpu_line() -> str:
    """CPUs of the machine and those this process may use."""
    return f"CPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})"


def code_version() -> str:
    """The project's commit and whether its files differ from it (read-only git)."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return f"{head}{' with uncommitted changes' if dirty else ''}"


class Report:
    """A benchmark's tables and targets: printed as Markdown, written as JSON by :meth:`write`.

    Parameters
    ----------
    benchmark : str
        The module's name (``ingest``, ...), the JSON file's ``benchmark``.
    args : argparse.Namespace
        The command line, recorded in the JSON file (paths as text).
    """

    def __init__(self, benchmark: str, args: argparse.Namespace) -> None:
        self.benchmark = benchmark
        self.args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        self.started = dt.datetime.now(dt.UTC)
        self.commit = code_version()  # the code that runs, not what is checked out when it ends
        self.tables: dict[str, dict[str, Any]] = {}
        self.targets: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}

    def table(self, key: str, columns: Sequence[Column], rows: Sequence[dict[str, Any]], *,
              title: str = "") -> None:
        """Print ``rows`` as a Markdown table (numbers right-aligned) and keep them under ``key``."""
        print(f"\n{title}\n" if title else "")
        print("| " + " | ".join(c.header for c in columns) + " |")
        print("|" + "|".join("---:" if any(isinstance(r.get(c.key), (int, float)) for r in rows)
                             else "---" for c in columns) + "|")
        for row in rows:
            print("| " + " | ".join(c.cell(row) for c in columns) + " |")
        self.tables[key] = {"title": title, "rows": [dict(row) for row in rows]}

    def target(self, name: str, met: bool, value: float | str) -> str:
        """Record a target and its figure; return its line, ``name: met (value)`` or MISSED."""
        shown = f"{value:,.2f}" if isinstance(value, float) else str(value)
        line = f"{name}: {'met' if met else 'MISSED'} ({shown})"
        self.targets.append({"name": name, "met": bool(met), "value": value, "line": line})
        return line

    def print_targets(self, heading: str = "Targets") -> None:
        """The targets recorded so far, one line each."""
        print(f"\n{heading}:\n" + "\n".join(f"- {t['line']}" for t in self.targets))

    def write(self, path: Path | None) -> None:
        """Write everything recorded to ``path`` as JSON (nothing when ``path`` is None)."""
        if path is None:
            return
        document = {
            "benchmark": self.benchmark, "started": self.started.isoformat(timespec="seconds"),
            "machine": {"host": platform.node(), "cpus": os.cpu_count(),
                        "usable_cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
                        "load_average": list(os.getloadavg())},
            "commit": self.commit, "args": self.args, "tables": self.tables,
            "targets": self.targets, "figures": self.figures,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")


# --- a synthetic de-identified manifest -------------------------------------------------------------


def _hex_keys(rng: Any, n: int, digits: int) -> list[str]:
    """``n`` distinct random lowercase hex strings of ``digits`` characters (keyed-hash lookalikes)."""
    width = (digits + 1) // 2
    keys: dict[str, None] = {}
    while len(keys) < n:  # a second round only for the rare duplicate
        raw = rng.bytes((n - len(keys)) * width)
        keys.update(dict.fromkeys(raw[i:i + width].hex()[:digits] for i in range(0, len(raw), width)))
    return list(keys)


def synthetic_manifest(n_rows: int, n_patients: int, *, seed: int = 0) -> Any:
    """A clean de-identified manifest (a DataFrame) of ``n_rows`` images of about ``n_patients``
    patients, with the columns and dtypes the validate and split stages read back from the
    deidentify stage's Parquet file (pandas 3: keys and hashes "str", the columns copied from the
    ingest index "string", the age nullable "Int64"; see dicomflow/deid).

    Patients have a Poisson-distributed number of images (rows of one patient are adjacent, as
    deidentify writes them in file order); each patient has 1-3 studies. Keys are random hex of
    the lengths deidentify's keyed hashes have, so, as in a real archive of this size, a few may
    be all digits: with seed 0 and a million rows one 12-digit patient key reads as a DICOM DT (a
    date and time) and fails ``no_phi_values_patient_key``; every other value passes the suite.
    """
    import numpy as np  # heavy imports here: the plain-loop worker of bench.ingest imports this module
    import pandas as pd

    from dicomflow.config import layout

    text, string = pd.StringDtype(na_value=np.nan), pd.StringDtype()
    rng = np.random.default_rng(seed)
    patient_of_row = np.sort(rng.integers(0, n_patients, n_rows))
    patient_keys = np.array(_hex_keys(rng, n_patients, 12), dtype=object)
    study_keys = np.array(_hex_keys(rng, n_patients * 3, 12), dtype=object)
    image_keys = _hex_keys(rng, n_rows, 16)
    # A patient's prevalence drawn once, so that labels cluster within patients as in real data.
    positive = rng.random(n_patients) < 0.35
    label = np.where(positive[patient_of_row], rng.random(n_rows) < 0.8, rng.random(n_rows) < 0.1)

    def choice(values: list[str], p: list[float] | None = None) -> Any:
        return pd.array(rng.choice(values, n_rows, p=p), dtype=string)

    return pd.DataFrame({
        "image_key": pd.array(image_keys, dtype=text),
        "patient_key": pd.array(patient_keys[patient_of_row], dtype=text),
        "study_key": pd.array(study_keys[patient_of_row * 3 + rng.integers(0, 3, n_rows)], dtype=text),
        "label": label.astype(np.int64),
        "modality": choice(["DX", "CR"], [0.7, 0.3]),
        "manufacturer": choice(["Orion Systems", "Northwind Medical", "Helix Radiography",
                                "Kestrel Imaging"]),
        "body_part": choice(["CHEST"]),
        "view_position": choice(["PA", "AP", "LL"]),
        "patient_sex": choice(["F", "M", "O"], [0.49, 0.49, 0.02]),
        "patient_age_years": pd.array(rng.integers(18, 91, n_patients)[patient_of_row], dtype="Int64"),
        "rows": rng.integers(192, 3000, n_rows), "columns": rng.integers(192, 3000, n_rows),
        "pixel_spacing_mm": rng.uniform(0.1, 2.5, n_rows),
        "bits_stored": rng.choice(np.array([8, 12, 16], dtype=np.int64), n_rows),
        "photometric": choice(["MONOCHROME1", "MONOCHROME2"]),
        "predefined_split": pd.array([""] * n_rows, dtype=text),
        "pixel_min": rng.uniform(0, 0.05, n_rows), "pixel_max": rng.uniform(0.7, 1.0, n_rows),
        "pixel_mean": rng.uniform(0.2, 0.5, n_rows), "pixel_std": rng.uniform(0.1, 0.3, n_rows),
        "pixel_extreme_share": rng.uniform(0, 0.2, n_rows),
        # Grayscale radiographs: one channel, no colour spread, no colour profile.
        "source_channels": np.ones(n_rows, np.int64), "pixel_colour_spread": np.full(n_rows, np.nan),
        "colour_profile": pd.array([""] * n_rows, dtype=text),
        "pixel_sha256": pd.array(_hex_keys(rng, n_rows, 64), dtype=text),
        "dicom_file": pd.array([f"{layout.DEID_DICOM_DIR}/{k}.dcm" for k in image_keys], dtype=text),
    })
