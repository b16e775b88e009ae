"""Benchmark: the deidentify stage's throughput against dicognito's command-line tool.

Times, side by side in one run over the same files (the embedded sample in ``data/`` copied under
``copy-0001/``, ``copy-0002/``, ... until there are at least ``--files`` of them by
``bench.common.replicate``, as in ``bench.ingest``):
- ``deidentify stage``: ``python -m stages.deidentify`` as its users run it, in a temporary project
  folder whose ``params.yaml`` is the project's with ``paths`` pointed at the replicated set and the
  outputs kept inside that folder. ``python -m stages.ingest`` runs there once first, untimed, for
  the index and images.npy the stage reads. The timed run is all of the stage: reading and
  de-identifying every source file, writing ``dicom/``, the manifest, the audit and images.npy,
  and the leak check that reads its outputs back;
- ``dicognito``: ``python -m dicognito --output-directory OUT --seed SEED FILE ...`` (the
  ``.venv/bin/dicognito`` console script of dicognito 0.19.0 fails with ``TypeError: main() missing
  1 required positional argument``; ``-m`` runs the same ``main`` on the same arguments), run in
  the replicated folder with exactly the files the ingest index lists (its distinct
  ``source_path`` values, relative to ``paths.data``) named on its command line: no copies, so
  both tools read the same bytes from the same page cache and the files ingest quarantined are
  left out of both. It writes to a folder emptied (untimed) before each run, with a fixed seed.
Both are subprocesses, so their wall time includes interpreter start-up and imports; the runs
alternate, ``--repeat`` times each. Peak RSS is that of the whole process tree, summed and sampled
by ``bench.common.run_measured``. The copies repeat the sample's SOP Instance UIDs and both tools name their
outputs after (a function of) that UID, so each writes about as many distinct files as the sample
has, overwriting the rest: the same for both, but the stage's leak check reads back only those
distinct files.

The same comparison then runs on the clinical-size corpus of ``bench/clinical_corpus.py``
(``--clinical-files`` files: 2048 x 2048 and larger CR/DX radiographs, 512 x 512 CT slices, in
native, RLE, JPEG 2000 Lossless and JPEG Lossless SV1 files, full patient and study headers),
with its own ingest run and its own table. Targets (2 cores; files/s ratio ours/dicognito,
medians): at least 1.2x on the replicated sample, 1.8x on the clinical corpus.

    .venv/bin/python -m bench.deidentify [--files 5000] [--clinical-files 100] [--repeat 3]
        [--workdir DIR] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import pandas as pd

from bench import common
from bench.clinical_corpus import write_corpus
from bench.common import Column, Report

TARGET_RATIO_SAMPLE = 1.2  # issue 15: the leak check and default-deny must not cost the lead
TARGET_RATIO_CLINICAL = 1.8  # issue 19: on clinical-size files the per-file work is the pixels'
SEED = "dicomflow-bench"  # fixed, so every dicognito run draws the same replacement values
ARG_BYTES_LIMIT = 1_500_000  # below Linux's 2 MiB ARG_MAX for argv + environment
STAGE = "deidentify stage (`python -m stages.deidentify`)"
DICOGNITO = "dicognito (`python -m dicognito -o OUT --seed S FILES`)"


def code_state() -> dict[str, int]:
    """mtime (ns) of each source of stages/ and the library: edits made while the benchmark runs
    are reported, since each timed run imports whatever is on disk when it starts."""
    return {str(p.relative_to(common.ROOT)): p.stat().st_mtime_ns
            for folder in ("stages", "dicomflow") for p in sorted((common.ROOT / folder).rglob("*.py"))}


def compare(report: Report, key: str, title: str, data: Path, *, work: Path, repeat: int) -> float:
    """Ingest ``data`` once (untimed), then time the stage and dicognito on the files it accepted,
    alternating; print the table, record it under ``key`` and return the files/s ratio
    ours/dicognito (medians)."""
    start = time.perf_counter()
    project = work / "project"
    params = common.write_project(project, data)
    ingest = common.run_measured([sys.executable, "-m", "stages.ingest"], cwd=project,
                                 log=work / "ingest.log")
    index = pd.read_parquet(Path(params["paths"]["ingest_dir"]) / "index.parquet")
    # Distinct files: a multi-frame object has one index row per frame but is one file.
    sources = list(dict.fromkeys(index["source_path"].astype(str)))
    print(f"\n{title}: {data}; ingest accepted {len(sources):,} files ({len(index):,} images); "
          f"prepared in {time.perf_counter() - start:.1f} s, of which ingest {ingest.seconds:.1f} s")

    dicognito_out = work / "dicognito-out"
    dicognito = [sys.executable, "-m", "dicognito", "--output-directory", str(dicognito_out),
                 "--seed", SEED, *sources]
    if sum(len(a) + 1 for a in dicognito) > ARG_BYTES_LIMIT:
        sys.exit(f"{len(sources):,} paths are too long for one command line; use fewer --files")
    deid_dir = Path(params["paths"]["deid_dir"])
    commands = {  # name -> (command, working folder, log)
        STAGE: ([sys.executable, "-m", "stages.deidentify"], project, work / "deidentify.log"),
        # Relative paths from the data folder keep the command line short.
        DICOGNITO: (dicognito, data, work / "dicognito.log"),
    }
    code_before = code_state()
    seconds: dict[str, list[float]] = {name: [] for name in commands}
    peak = {name: 0.0 for name in commands}
    for _ in range(repeat):
        # Alternating, so that drift in the machine's state hits both alike.
        for name, (command, cwd, log) in commands.items():
            if name == DICOGNITO:  # it adds to its folder; the stage replaces its own
                shutil.rmtree(dicognito_out, ignore_errors=True)
            run = common.run_measured(command, cwd=cwd, log=log)
            seconds[name].append(run.seconds)
            peak[name] = max(peak[name], run.memory.rss)

    # Both must have written something; their distinct outputs should agree (see docstring).
    metrics = json.loads(Path(params["paths"]["deid_metrics"]).read_text(encoding="utf-8"))
    written = {"stage": len(list((deid_dir / "dicom").glob("*.dcm"))),
               "dicognito": len(list(dicognito_out.glob("*.dcm")))}
    print(f"dicognito: {sys.executable} -m dicognito --output-directory {dicognito_out} "
          f"--seed {SEED} {' '.join(sources[:2])} ... ({len(sources):,} paths, cwd {data})")
    excluded = metrics.get("burned_in_excluded", 0)
    audited = len(pd.read_csv(deid_dir / "audit.csv"))  # n_files counts distinct keys only
    print(f"stage: {audited:,} files ({excluded:,} excluded for burned-in text), "
          f"{written['stage']:,} distinct outputs, "
          f"{metrics['identifiers_checked']:,} identifiers leak-checked; dicognito: "
          f"{written['dicognito']:,} distinct outputs; {repeat} timed run(s) of each\n")
    report.figures[key] = {"files": len(sources), "images": len(index), "audited": audited,
                           "burned_in_excluded": excluded, "outputs": written,
                           "identifiers_checked": metrics["identifiers_checked"]}
    rows = []
    for name in commands:
        low, mid, high = min(seconds[name]), statistics.median(seconds[name]), max(seconds[name])
        rows.append({"tool": name, "files": len(sources), "seconds_min": low, "seconds_median": mid,
                     "seconds_max": high, "files_per_s": len(sources) / mid, "peak_rss_mib": peak[name]})
    report.table(key, [Column("tool", "tool"), Column("files", "files", "{:,}"),
                       Column("wall s min", "seconds_min", "{:.2f}"),
                       Column("wall s median", "seconds_median", "{:.2f}"),
                       Column("wall s max", "seconds_max", "{:.2f}"),
                       Column("files/s (median)", "files_per_s", "{:,.0f}"),
                       Column("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}")], rows)
    changed = sorted(set(code_before.items()) ^ set(code_state().items()))
    if changed:
        names = ", ".join(sorted({name for name, _ in changed}))
        print(f"\nWARNING: the code changed during the timed runs ({names}): they timed "
              "different code")
    return rows[0]["files_per_s"] / rows[1]["files_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000, help="at least this many sample files")
    parser.add_argument("--clinical-files", type=int, default=100, help="files of the clinical corpus")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, alternating")
    common.add_output_args(parser)
    args = parser.parse_args()
    # The clinical corpus is not the embedded sample: deidentify refuses it the demo secret.
    os.environ.setdefault("DICOMFLOW_SECRET", "bench: the clinical corpus is not the embedded sample")

    report = Report("deidentify", args)
    with common.work_folder("deid", workdir=args.workdir, keep=args.keep) as work:
        common.replicate(common.ensure_sample(work), work / "data", args.files)
        start = time.perf_counter()
        write_corpus(work / "clinical", args.clinical_files)  # kept between runs in --workdir
        print(f"clinical corpus written or found in {time.perf_counter() - start:.1f} s")
        print(common.cpu_line())
        for key, title, data, target in (
                ("replicated_sample", "Replicated sample", work / "data", TARGET_RATIO_SAMPLE),
                ("clinical_corpus", "Clinical-size corpus", work / "clinical", TARGET_RATIO_CLINICAL)):
            folder = work / title.split()[0].lower()
            folder.mkdir(exist_ok=True)
            ratio = compare(report, key, title, data, work=folder, repeat=args.repeat)
            report.target(f"{title.lower()}: files/s ours/dicognito >= {target:.1f}", ratio >= target,
                          ratio)
        report.print_targets("Targets (2 cores)")
    report.write(args.json)


if __name__ == "__main__":
    main()
