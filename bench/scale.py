"""Benchmark: how the pipeline scales, in two tables printed by one run.

1. Ingest of many small files, with its peak-RSS curve: the embedded sample copied under
   ``copy-0001/``, ``copy-0002/``, ... (``replicate`` of bench/ingest.py) until there are at least
   the largest of ``--sizes`` files, and the ingest stage (``python -m stages.ingest``, every core,
   in a temporary project as bench/ingest.py runs it) timed on each size. The smaller sizes read
   hard links to the first copies of the largest set, so the disk holds one set only. Peak RSS is
   sampled every 50 ms and given for the whole process tree (shared pages once per process, as in
   bench/ingest.py), for the stage's own process and for its largest worker, and the stage
   process's RSS at each quarter of the run shows whether it grows with the files read. Target:
   peak RSS flat as the files grow, and under 1 GiB.
2. Validate and split of a synthetic de-identified manifest of ``--rows`` rows and about
   ``--patients`` patients, with the columns and dtypes the deidentify stage writes (read back
   from Parquet, as the stages read it): the library calls the validate stage makes (the suite
   through Great Expectations, the computed and drift checks, the summary, the HTML report and
   the failure lines) and the split stage's (``split_by_patient``, ``count_by_split``), each
   timed once in this process. Target: under 60 s together on 2 cores for 1,000,000 rows.

    .venv/bin/python bench/scale.py [--sizes 10000 50000 100000] [--rows 1000000]
        [--patients 100000] [--tables ingest validate] [--workdir DIR] [--keep]

100,000 copies of the sample take about 11.5 GB (``df -h`` the work folder's disk first).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import yaml

# bench/ is not a package; this script's folder is sys.path[0] when it is run as a file.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest import ROOT, replicate, run_sampled, source_files, write_project

sys.path.insert(0, str(ROOT))
from dicomflow.config import layout
from dicomflow.config.params import load_params

TARGET_RSS_MIB = 1024.0
TARGET_VALIDATE_SPLIT_S = 60.0
MIB = 2**20


# --- table 1: ingest --------------------------------------------------------------------------

@dataclass
class TreeMemory:
    """Memory samples of a process tree: peaks in MiB, and the root's RSS over time."""

    total: float = 0.0        # RSS summed over the tree, as bench/ingest.py counts it
    pss: float = 0.0          # PSS summed over the tree: a page shared by n processes counts 1/n
    root: float = 0.0         # RSS of the stage's own process
    worker: float = 0.0       # RSS of the largest single child
    root_curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds, MiB)

    def sample(self, root: psutil.Process, seconds: float) -> None:
        try:
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        rss, pss = [], []
        for process in processes:
            try:
                # PSS as well as RSS: forked workers share the parent's pages, which the summed
                # RSS counts once per process; PSS (from smaps_rollup, about 0.2 ms) splits them.
                info = process.memory_full_info()
                rss.append(info.rss / MIB)
                pss.append(info.pss / MIB)
            except psutil.Error:  # a worker that ended between the walk and the read
                rss.append(0.0)
                pss.append(0.0)
        self.total = max(self.total, sum(rss))
        self.pss = max(self.pss, sum(pss))
        self.root = max(self.root, rss[0])
        self.worker = max([self.worker, *rss[1:]])
        self.root_curve.append((seconds, rss[0]))

    def root_at(self, fraction: float) -> float:
        """The root's largest RSS up to ``fraction`` of the run (0.25: its first quarter)."""
        end = self.root_curve[-1][0] * fraction
        return max((mib for t, mib in self.root_curve if t <= end), default=0.0)


def measure_tree(command: list[str], *, cwd: Path, log: Path) -> tuple[float, TreeMemory]:
    """Run ``command``; return its wall seconds and the RSS samples of its process tree."""
    memory = TreeMemory()
    return run_sampled(command, cwd=cwd, log=log, sample=memory.sample), memory


def ensure_sample(work: Path) -> Path:
    """The embedded sample: ``data/`` when present, else generated into ``work``."""
    source = ROOT / "data"
    if not (source / "labels.csv").is_file():
        source = work / "sample"
        if not (source / "labels.csv").is_file():
            subprocess.run([sys.executable, "-m", "dicomflow", "sample-data", str(source)],
                           cwd=ROOT, check=True)
    return source


def linked_subset(source: Path, full: Path, target: Path, min_files: int) -> list[Path]:
    """A set of at least ``min_files`` files in ``target`` made of hard links to the first copies
    in ``full`` (no second copy on disk); ``replicate`` then writes its labels file.

    Within one run every file is still a distinct inode read once, so links do not flatter the
    stage the way they would inside one set (see ``replicate``).
    """
    copies = math.ceil(min_files / len(source_files(source)))
    for number in range(1, copies + 1):
        name = f"copy-{number:04d}"
        if not (target / name).is_dir():
            partial = target / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(full / name, partial, copy_function=os.link)
            partial.rename(target / name)
    return replicate(source, target, min_files)  # finds every copy present: only labels.csv


def ingest_table(sizes: list[int], work: Path) -> None:
    """Table 1: the ingest stage on each size, with its peak RSS."""
    source = ensure_sample(work)
    start = time.perf_counter()
    full = work / "data"
    replicate(source, full, max(sizes))
    print(f"replicated set: {len(source_files(full)):,} files in {full} "
          f"(prepared in {time.perf_counter() - start:.0f} s)")
    rows = []
    for size in sorted(sizes):
        data = full if size == max(sizes) else work / f"data-{size}"
        files = replicate(source, full, size) if data == full else linked_subset(source, full, data, size)
        project = work / f"project-{size}"
        shutil.rmtree(project, ignore_errors=True)
        write_project(project, data)
        seconds, memory = measure_tree([sys.executable, "-m", "stages.ingest"], cwd=project,
                                       log=work / f"ingest-{size}.log")
        paths = yaml.safe_load((project / "params.yaml").read_text(encoding="utf-8"))["paths"]
        report = json.loads(Path(paths["ingest_metrics"]).read_text(encoding="utf-8"))
        if report["files"] != len(files):
            sys.exit(f"the stage saw {report['files']} files of {len(files)} in {data}")
        rows.append((len(files), report["images"], seconds, memory))
        print(f"  {len(files):,} files: {seconds:.0f} s, peak tree RSS {memory.total:,.0f} MiB",
              flush=True)
        shutil.rmtree(project / "outputs", ignore_errors=True)  # images.npy and index: not needed

    print(f"\nCPUs: {os.cpu_count()} (usable by this process: {len(os.sched_getaffinity(0))})\n")
    print("| files | images | wall s | files/s | peak RSS tree (MiB) | peak PSS tree (MiB) | "
          "stage process RSS (MiB) | largest worker RSS (MiB) | "
          "stage process RSS at 25 / 50 / 75 / 100 % of the run (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for files, images, seconds, memory in rows:
        curve = " / ".join(f"{memory.root_at(f):,.0f}" for f in (0.25, 0.5, 0.75, 1.0))
        print(f"| {files:,} | {images:,} | {seconds:.1f} | {files / seconds:,.0f} | "
              f"{memory.total:,.0f} | {memory.pss:,.0f} | {memory.root:,.0f} | "
              f"{memory.worker:,.0f} | {curve} |")
    (first, *_, first_memory), (last, *_, last_memory) = rows[0], rows[-1]
    more_files = max(1, last - first)
    print(f"\nGrowth from {first:,} to {last:,} files (bytes per added file):")
    for name, before, after in (("tree RSS", first_memory.total, last_memory.total),
                                ("tree PSS", first_memory.pss, last_memory.pss),
                                ("stage process RSS", first_memory.root, last_memory.root),
                                ("largest worker RSS", first_memory.worker, last_memory.worker)):
        print(f"- {name}: {after - before:+,.0f} MiB ({(after - before) * MIB / more_files:+,.0f} B/file)")
    peak = max(memory.total for *_, memory in rows)
    print(f"Target peak tree RSS < {TARGET_RSS_MIB:.0f} MiB: "
          f"{'met' if peak < TARGET_RSS_MIB else 'MISSED'} ({peak:,.0f} MiB)")


# --- table 2: validate + split ----------------------------------------------------------------

# Dtypes of the deidentify stage's manifest as the validate and split stages read it back with
# pd.read_parquet (pandas 3): keys and hashes as "str", the columns copied from the ingest index
# as "string", the age as nullable "Int64" (see dicomflow/deid/manifest.py, build_manifest).
STR, STRING = pd.StringDtype(na_value=np.nan), pd.StringDtype()


def _hex_keys(rng: np.random.Generator, n: int, digits: int) -> list[str]:
    """``n`` distinct random lowercase hex strings of ``digits`` characters (keyed-hash lookalikes)."""
    width = (digits + 1) // 2
    keys: dict[str, None] = {}
    while len(keys) < n:  # a second round only for the rare duplicate
        raw = rng.bytes((n - len(keys)) * width)
        keys.update(dict.fromkeys(raw[i:i + width].hex()[:digits] for i in range(0, len(raw), width)))
    return list(keys)


def synthetic_manifest(n_rows: int, n_patients: int, *, seed: int = 0) -> pd.DataFrame:
    """A clean de-identified manifest of ``n_rows`` images of about ``n_patients`` patients.

    Patients have a Poisson-distributed number of images (rows of one patient are adjacent, as
    deidentify writes them in file order); each patient has 1-3 studies. Keys are random hex of
    the lengths deidentify's keyed hashes have, so, as in a real archive of this size, a few may
    be all digits: with seed 0 one 12-digit patient key reads as a DICOM DT (a date and time) and
    fails ``no_phi_values_patient_key``; every other value passes the suite.
    """
    rng = np.random.default_rng(seed)
    patient_of_row = np.sort(rng.integers(0, n_patients, n_rows))
    patient_keys = np.array(_hex_keys(rng, n_patients, 12), dtype=object)
    study_keys = np.array(_hex_keys(rng, n_patients * 3, 12), dtype=object)
    image_keys = _hex_keys(rng, n_rows, 16)
    # A patient's prevalence drawn once, so that labels cluster within patients as in real data.
    positive = rng.random(n_patients) < 0.35
    label = np.where(positive[patient_of_row], rng.random(n_rows) < 0.8, rng.random(n_rows) < 0.1)

    def choice(values: list[str], p: list[float] | None = None) -> pd.array:
        return pd.array(rng.choice(values, n_rows, p=p), dtype=STRING)

    return pd.DataFrame({
        "image_key": pd.array(image_keys, dtype=STR),
        "patient_key": pd.array(patient_keys[patient_of_row], dtype=STR),
        "study_key": pd.array(study_keys[patient_of_row * 3 + rng.integers(0, 3, n_rows)], dtype=STR),
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
        "predefined_split": pd.array([""] * n_rows, dtype=STR),
        "pixel_min": rng.uniform(0, 0.05, n_rows), "pixel_max": rng.uniform(0.7, 1.0, n_rows),
        "pixel_mean": rng.uniform(0.2, 0.5, n_rows), "pixel_std": rng.uniform(0.1, 0.3, n_rows),
        "pixel_extreme_share": rng.uniform(0, 0.2, n_rows),
        "pixel_sha256": pd.array(_hex_keys(rng, n_rows, 64), dtype=STR),
        "dicom_file": pd.array([f"{layout.DEID_DICOM_DIR}/{k}.dcm" for k in image_keys], dtype=STR),
    })


def timed(steps: list[tuple[str, float]], name: str, function: Callable[..., Any], *args: Any,
          **kwargs: Any) -> Any:
    """Call ``function``, append (name, seconds) to ``steps``, return its result."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    steps.append((name, time.perf_counter() - start))
    print(f"  {name}: {steps[-1][1]:.2f} s", flush=True)
    return result


def validate_split_table(n_rows: int, n_patients: int, work: Path) -> None:
    """Table 2: the validate and split stages' library calls on a synthetic manifest."""
    from dicomflow.quality.expectations import (
        WARNING,
        build_checks,
        drift_results,
        find_text_columns,
        profile_manifest,
    )
    from dicomflow.quality.report import (
        format_failures,
        render_report,
        run_checks,
        summarise,
    )
    from dicomflow.splitting import count_by_split, split_by_patient

    start = time.perf_counter()
    path = work / "manifest.parquet"
    synthetic_manifest(n_rows, n_patients).to_parquet(path, index=False)
    reference = profile_manifest(synthetic_manifest(min(n_rows, 100_000), n_patients // 10 or 1,
                                                    seed=1))
    print(f"synthetic manifest: {n_rows:,} rows written to {path} in "
          f"{time.perf_counter() - start:.0f} s")
    # The project's own params (read from its root, wherever this script is started).
    params_file = ROOT / "params.yaml"
    validate, split = load_params("validate", params_file), load_params("split", params_file)
    classes = load_params("ingest", params_file).classes

    start = time.perf_counter()
    import great_expectations  # noqa: F401  (paid once per validate run; timed apart)
    import_seconds = time.perf_counter() - start

    steps: list[tuple[str, float]] = []
    manifest = timed(steps, "read manifest (pd.read_parquet)", pd.read_parquet, path)
    print(f"  {manifest['patient_key'].nunique():,} patients, labels "
          f"{manifest['label'].value_counts().sort_index().to_dict()}")
    checks = timed(steps, "validate: build_checks + find_text_columns", lambda: build_checks(
        classes=classes, modalities=validate.modalities,
        min_class_fraction=validate.min_class_fraction, min_image_std=validate.min_image_std,
        max_extreme_share=validate.max_extreme_share, image_size_range=validate.image_size_range,
        pixel_spacing_range=validate.pixel_spacing_range,
        text_columns=find_text_columns(manifest)))
    results = timed(steps, "validate: run_checks (GX suite + computed checks)", run_checks,
                    manifest, checks)
    results += timed(steps, "validate: profile_manifest + drift_results", lambda: drift_results(
        profile_manifest(manifest), reference, max_label_change=validate.drift_max_label_change,
        max_mix_change=validate.drift_max_mix_change,
        max_intensity_shift=validate.drift_max_intensity_shift))
    timed(steps, "validate: summarise + render_report + format_failures", lambda: (
        summarise(results, n_rows=len(manifest)),
        render_report(results, n_rows=len(manifest), source=str(path)),
        format_failures(results), format_failures(results, severity=WARNING)))
    assignment = timed(steps, "split: split_by_patient", split_by_patient, manifest,
                       val_size=split.val_size, test_size=split.test_size, seed=split.seed)
    timed(steps, "split: count_by_split", count_by_split, manifest.assign(split=assignment))

    failed = [r.check.name for r in results if r.failed]
    shares = assignment.value_counts(normalize=True)
    print(f"\n{len(results)} expectations, failed: {', '.join(failed) or 'none'}; split "
          + ", ".join(f"{s} {shares.get(s, 0):.1%}" for s in ("train", "val", "test")))
    print(f"great_expectations import: {import_seconds:.1f} s (once per validate run, not counted)\n")
    print(f"| step ({n_rows:,} rows, {manifest['patient_key'].nunique():,} patients) | seconds |")
    print("|---|---:|")
    for name, seconds in steps:
        print(f"| {name} | {seconds:.2f} |")
    library = sum(s for name, s in steps if not name.startswith("read"))
    print(f"| **total of the validate and split library calls** | **{library:.2f}** |")
    print(f"| total with the read | {sum(s for _, s in steps):.2f} |")
    print(f"\nTarget: validate + split < {TARGET_VALIDATE_SPLIT_S:.0f} s: "
          f"{'met' if library < TARGET_VALIDATE_SPLIT_S else 'MISSED'} ({library:.1f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000],
                        help="ingest: at least this many files, one run each")
    parser.add_argument("--rows", type=int, default=1_000_000, help="validate + split: manifest rows")
    parser.add_argument("--patients", type=int, default=100_000, help="validate + split: patients")
    parser.add_argument("--tables", nargs="+", choices=("ingest", "validate"),
                        default=["ingest", "validate"], help="which tables to print")
    parser.add_argument("--workdir", type=Path, help="keep (and reuse) the replicated set here")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()

    work = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        free = shutil.disk_usage(work).free / 2**30
        print(f"work folder {work}: {free:,.0f} GiB free; the machine may be shared, "
              "so timings are noisy\n")
        if "ingest" in args.tables:
            print("## Ingest of small files\n")
            ingest_table(args.sizes, work)
        if "validate" in args.tables:
            print("\n## Validate + split of a synthetic manifest\n")
            validate_split_table(args.rows, args.patients, work)
    finally:
        if args.keep or args.workdir:
            print(f"kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
