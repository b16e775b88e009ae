"""Benchmark: how the pipeline scales, in two tables printed by one run.

1. Ingest of many small files, with its peak-RSS curve: the embedded sample copied under
   ``copy-0001/``, ``copy-0002/``, ... (``bench.common.replicate``) until there are at least
   the largest of ``--sizes`` files, and the ingest stage (``python -m stages.ingest``, every core,
   in a temporary project as bench.ingest runs it) timed on each size. The smaller sizes read
   hard links to the first copies of the largest set, so the disk holds one set only. Peak memory
   (``bench.common.run_measured``: the process tree sampled every 50 ms) is given summed over the
   whole tree as RSS (shared pages once per process, as in bench.ingest) and PSS, for the stage's
   own process (its kernel high-water mark) and for its largest worker, and the stage process's
   RSS at each quarter of the run shows whether it grows with the files read. Target:
   peak RSS flat as the files grow, and under 1 GiB.
2. Validate and split of a synthetic de-identified manifest of ``--rows`` rows and about
   ``--patients`` patients, with the columns and dtypes the deidentify stage writes (read back
   from Parquet, as the stages read it): the library calls the validate stage makes (the suite
   through Great Expectations, the computed and drift checks, the summary, the HTML report and
   the failure lines) and the split stage's (``split_by_patient``, ``count_by_split``), each
   timed once in this process. Target: under 60 s together on 2 cores for 1,000,000 rows.

    .venv/bin/python -m bench.scale [--sizes 10000 50000 100000] [--rows 1000000]
        [--patients 100000] [--tables ingest validate] [--workdir DIR] [--keep] [--json FILE]

100,000 copies of the sample take about 11.5 GB (``df -h`` the work folder's disk first).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from bench import common
from bench.common import Column, Report
from dicomflow.config.params import load_params

TARGET_RSS_MIB = 1024.0
TARGET_VALIDATE_SPLIT_S = 60.0
MIB = 2**20


# --- table 1: ingest --------------------------------------------------------------------------

def linked_subset(source: Path, full: Path, target: Path, min_files: int) -> list[Path]:
    """A set of at least ``min_files`` files in ``target`` made of hard links to the first copies
    in ``full`` (no second copy on disk); ``common.replicate`` then writes its labels file.

    Within one run every file is still a distinct inode read once, so links do not flatter the
    stage the way they would inside one set (see ``common.replicate``).
    """
    copies = math.ceil(min_files / len(common.source_files(source)))
    for number in range(1, copies + 1):
        name = f"copy-{number:04d}"
        if not (target / name).is_dir():
            partial = target / f"{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(full / name, partial, copy_function=os.link)
            partial.rename(target / name)
    return common.replicate(source, target, min_files)  # finds every copy present: only labels.csv


def ingest_table(report: Report, sizes: list[int], work: Path) -> None:
    """Table 1: the ingest stage on each size, with its peak memory."""
    source = common.ensure_sample(work)
    start = time.perf_counter()
    full = work / "data"
    common.replicate(source, full, max(sizes))
    print(f"replicated set: {len(common.source_files(full)):,} files in {full} "
          f"(prepared in {time.perf_counter() - start:.0f} s)")
    rows, curves = [], []
    for size in sorted(sizes):
        data = full if size == max(sizes) else work / f"data-{size}"
        files = (common.replicate(source, full, size) if data == full
                 else linked_subset(source, full, data, size))
        project = work / f"project-{size}"
        common.write_project(project, data)
        run = common.run_measured([sys.executable, "-m", "stages.ingest"], cwd=project,
                           log=work / f"ingest-{size}.log")
        stage = common.stage_report(project)
        if stage["files"] != len(files):
            sys.exit(f"the stage saw {stage['files']} files of {len(files)} in {data}")
        memory = run.memory
        rows.append({"files": len(files), "images": stage["images"], "seconds": run.seconds,
                     "files_per_s": len(files) / run.seconds, **memory.figures(),
                     "root_rss_by_quarter_mib": [memory.root_at(f) for f in (0.25, 0.5, 0.75, 1.0)]})
        curves.append(" / ".join(f"{mib:,.0f}" for mib in rows[-1]["root_rss_by_quarter_mib"]))
        print(f"  {len(files):,} files: {run.seconds:.0f} s, peak tree RSS {memory.rss:,.0f} MiB",
              flush=True)
        shutil.rmtree(project / "outputs", ignore_errors=True)  # images.npy and index: not needed

    print(f"\n{common.cpu_line()}\n")
    for row, curve in zip(rows, curves):
        row["curve"] = curve
    report.table("ingest", [
        Column("files", "files", "{:,}"), Column("images", "images", "{:,}"),
        Column("wall s", "seconds", "{:.1f}"), Column("files/s", "files_per_s", "{:,.0f}"),
        Column("peak RSS tree (MiB)", "peak_rss_mib", "{:,.0f}"),
        Column("peak PSS tree (MiB)", "peak_pss_mib", "{:,.0f}"),
        Column("stage process peak RSS (MiB)", "peak_root_mib", "{:,.0f}"),
        Column("largest worker RSS (MiB)", "peak_worker_mib", "{:,.0f}"),
        Column("stage process RSS at 25 / 50 / 75 / 100 % of the run (MiB)", "curve")], rows)
    first, last = rows[0], rows[-1]
    more_files = max(1, last["files"] - first["files"])
    print(f"\nGrowth from {first['files']:,} to {last['files']:,} files (bytes per added file):")
    for name, key in (("tree RSS", "peak_rss_mib"), ("tree PSS", "peak_pss_mib"),
                      ("stage process RSS", "peak_root_mib"), ("largest worker RSS", "peak_worker_mib")):
        grown = last[key] - first[key]
        report.figures[f"growth_{key[5:-4]}_bytes_per_file"] = grown * MIB / more_files
        print(f"- {name}: {grown:+,.0f} MiB ({grown * MIB / more_files:+,.0f} B/file)")
    peak = max(row["peak_rss_mib"] for row in rows)
    print(report.target(f"peak tree RSS < {TARGET_RSS_MIB:.0f} MiB", peak < TARGET_RSS_MIB, peak))


# --- table 2: validate + split ----------------------------------------------------------------

def timed(steps: list[tuple[str, float]], name: str, function: Callable[..., Any], *args: Any,
          **kwargs: Any) -> Any:
    """Call ``function``, append (name, seconds) to ``steps``, return its result."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    steps.append((name, time.perf_counter() - start))
    print(f"  {name}: {steps[-1][1]:.2f} s", flush=True)
    return result


def validate_split_table(report: Report, n_rows: int, n_patients: int, work: Path) -> None:
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
    common.synthetic_manifest(n_rows, n_patients).to_parquet(path, index=False)
    reference = profile_manifest(common.synthetic_manifest(min(n_rows, 100_000), n_patients // 10 or 1,
                                                    seed=1))
    print(f"synthetic manifest: {n_rows:,} rows written to {path} in "
          f"{time.perf_counter() - start:.0f} s")
    # The project's own params (read from its root, wherever this script is started).
    params_file = common.ROOT / "params.yaml"
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
    library = sum(s for name, s in steps if not name.startswith("read"))
    patients = manifest["patient_key"].nunique()
    report.figures.update(rows=n_rows, patients=patients, expectations=len(results), failed=failed,
                          gx_import_seconds=import_seconds, validate_split_seconds=library)
    rows = [{"step": name, "seconds": seconds} for name, seconds in steps]
    rows += [{"step": "**total of the validate and split library calls**", "seconds": library},
             {"step": "total with the read", "seconds": sum(s for _, s in steps)}]
    report.table("validate_split", [Column(f"step ({n_rows:,} rows, {patients:,} patients)", "step"),
                                    Column("seconds", "seconds", "{:.2f}")], rows)
    print("\n" + report.target(f"validate + split < {TARGET_VALIDATE_SPLIT_S:.0f} s",
                               library < TARGET_VALIDATE_SPLIT_S, library))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000],
                        help="ingest: at least this many files, one run each")
    parser.add_argument("--rows", type=int, default=1_000_000, help="validate + split: manifest rows")
    parser.add_argument("--patients", type=int, default=100_000, help="validate + split: patients")
    parser.add_argument("--tables", nargs="+", choices=("ingest", "validate"),
                        default=["ingest", "validate"], help="which tables to print")
    common.add_output_args(parser)
    args = parser.parse_args()

    report = Report("scale", args)
    with common.work_folder("scale", workdir=args.workdir, keep=args.keep) as work:
        free = shutil.disk_usage(work).free / 2**30
        print(f"work folder {work}: {free:,.0f} GiB free; the machine may be shared, "
              "so timings are noisy\n")
        if "ingest" in args.tables:
            print("## Ingest of small files\n")
            ingest_table(report, args.sizes, work)
        if "validate" in args.tables:
            print("\n## Validate + split of a synthetic manifest\n")
            validate_split_table(report, args.rows, args.patients, work)
    report.write(args.json)


if __name__ == "__main__":
    main()
