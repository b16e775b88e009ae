"""Benchmark: CT series through the ingest stage (``ingest.unit: series``) against a plain
"read every file, sort by position, stack" loop, memory per series, and the 3D network's training
images/s.

Two corpora, one table each, the same files for both sides:
- ``CT sample``: the embedded chest CT sample (``dicomflow.devtools.ct_sample.generate_ct_sample``:
  24 patients, 32-40 slices of 64 x 64 pixels, RLE Lossless, plus 5 deliberately broken series)
  copied under ``copy-0001/``, ``copy-0002/``, ... until there are at least ``--sample-series``
  series, every copy with new Study, Series, SOP Instance and Frame of Reference UIDs (a copy
  with the same UIDs would be a duplicate of every slice): many small series, where per-file
  overhead and the per-series work (grouping, diagnosis, assembly) dominate;
- ``clinical-size CT``: ``--series`` series of 512 x 512 signed 16-bit slices
  (``bench.clinical_corpus.write_ct_series``, 1 mm apart, Explicit VR Little Endian and RLE
  Lossless by turns), with slice counts spread evenly over ``--slices MIN MAX``: decoding and the
  volume's memory dominate.

Each table times, side by side in one run (alternating, ``--repeat`` times, best time):
- ``plain loop``: one process, ``pydicom.dcmread(f)`` of every file, ``pixel_array`` through
  pydicom's ``apply_modality_lut`` to HU (float32), grouped by (0020,000E) Series Instance UID,
  sorted by (0020,0032) Image Position (Patient) projected on the slice normal (the cross product
  of (0020,0037) Image Orientation (Patient)), ``np.stack``: the least any reader does, no check.
  The files of a folder are read together and released after stacking (every corpus here holds
  one series per folder), so the loop holds one series at a time, as a stack-per-folder script
  does; a series whose slices do not stack (the sample's coronal localizer) is counted as raised;
- ``ingest stage``: ``python -m stages.ingest`` as its users run it, in a temporary project folder
  (``bench.common.write_project``) with ``ingest.unit: series``, ``ingest.series.policy: strict``
  and ``ingest.workers: 0`` (all cores), every check on: headers of every file, grouping,
  diagnosis, the policy, highdicom's geometry, HU, resampling, windowing, the index, the
  quarantine. ``ingest.max_quarantine_fraction`` is raised to 0.5: the sample's 4 refused series
  (of 29) are 14 % of its files, above the default 10 %, which would fail the stage by design.

Figures: series/s and files/s (over the corpus' series and files, the same for both sides), the
stage's rate over the plain loop's, peak RSS (summed over the process tree, sampled every 50 ms
by ``bench.common.run_measured``), the largest single process' peak (a worker of the stage; the
loop's own process), and memory per series: those peaks over the largest series' decoded size
in float32 HU (slices x rows x columns x 4 bytes, the size ``ingest.max_decoded_mib`` bounds).
Target (issue 30, 2 cores): the stage >= 1.5x the plain loop's series/s with all its checks on.

Then the 3D network: ``resnet3d_small`` (``dicomflow.model.architectures``) on synthetic volumes
of ``ingest.series.volume_size`` x 1 channel at batch size ``--batch-size`` (8), timed by
``bench.train``: the ``train stage`` (``train_model``: the project's train step, augmentation
on, the per-epoch validation pass and batch-normalisation statistics) and the ``bare train step``
(the same network, Adam and batch on one constant batch), each in a fresh process, one warm-up
epoch, then ``--train-epochs`` timed epochs of ``--train-volumes`` volumes.

    .venv/bin/python -m bench.series [--sample-series 290] [--series 16] [--slices 150 300]
        [--repeat 1] [--train-volumes 32] [--train-epochs 1] [--batch-size 8] [--no-train]
        [--workdir DIR] [--keep] [--json FILE]

With the defaults about 5 minutes on 2 cores shared with other work, plus about 5 minutes the first
time to write the corpora (kept and reused with ``--workdir``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

from bench import common
from bench.clinical_corpus import write_ct_series
from bench.common import Column, Report
from bench.ingest import Timing, hidden_entries

TARGET_RATIO = 1.5  # issue 30: the stage's series/s over the plain loop's, on 2 cores
PLAIN = "plain loop (pydicom, sort by position, `np.stack`; 1 process)"
STAGE = "ingest stage (`python -m stages.ingest`, unit series, strict)"
STAGE_PARAMS = {"unit": "series", "series": {"policy": "strict"}, "workers": 0,
                "max_quarantine_fraction": 0.5}
# Replaced in every copy of the CT sample, so that each copy is series of its own.
COPY_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
SAMPLE_PATIENTS, SAMPLE_SEED = 24, 2026  # generate_ct_sample's defaults: the embedded sample


def baseline_worker(list_file: Path) -> None:
    """The plain loop, run as its own process by the benchmark; prints its counts as JSON."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut

    paths = [Path(line) for line in list_file.read_text(encoding="utf-8").splitlines()]
    counts = {"series": 0, "stacked": 0, "raised": 0, "files_raised": 0, "largest_slices": 0}
    for _, folder in groupby(paths, key=lambda p: p.parent):  # the list is in path order
        series: dict[str, list] = {}
        for path in folder:
            try:
                ds = pydicom.dcmread(path)
                hu = apply_modality_lut(ds.pixel_array, ds).astype(np.float32)
                cosines = np.array(ds.ImageOrientationPatient, dtype=float)
                distance = float(np.dot(np.array(ds.ImagePositionPatient, dtype=float),
                                        np.cross(cosines[:3], cosines[3:])))
            except Exception:  # noqa: BLE001  a file without pixels or geometry
                counts["files_raised"] += 1
                continue
            series.setdefault(str(ds.SeriesInstanceUID), []).append((distance, hu))
        for slices in series.values():
            counts["series"] += 1
            slices.sort(key=lambda item: item[0])
            try:
                volume = np.stack([hu for _, hu in slices])
            except ValueError:  # slices of different shapes (the sample's localizer)
                counts["raised"] += 1
                continue
            counts["stacked"] += 1
            counts["largest_slices"] = max(counts["largest_slices"], len(volume))
            del volume
    print(json.dumps(counts))


def replicate_series(source: Path, target: Path, copies: int) -> list[Path]:
    """``copies`` copies of the CT sample under ``target/copy-NNNN/``, each file with its
    :data:`COPY_UIDS` replaced by UIDs derived from (the UID, the copy's number), and the sample's
    labels.csv (labels join by accession number, which the copies keep); return every data file.

    Complete copies from an earlier run are reused (``--workdir``); a copy is written under a
    ``.partial`` name and renamed when whole.
    """
    import shutil
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.partial"):
        shutil.rmtree(stale)
    missing = [n for n in range(1, copies + 1) if not (target / f"copy-{n:04d}").is_dir()]
    if missing:  # one process per core: a copy is a thousand files parsed and written
        with ProcessPoolExecutor(max_workers=min(len(missing), os.cpu_count() or 1)) as pool:
            list(pool.map(partial(_write_copy, source=source, target=target), missing))
    shutil.copyfile(source / "labels.csv", target / "labels.csv")
    return common.source_files(target)


def _write_copy(number: int, *, source: Path, target: Path) -> None:
    """Copy ``number`` of :func:`replicate_series`, written under ``.partial`` and renamed."""
    import pydicom
    from pydicom.uid import generate_uid

    partial = target / f"copy-{number:04d}.partial"
    for path in common.source_files(source):
        ds = pydicom.dcmread(path)
        for keyword in COPY_UIDS:
            if keyword in ds:
                setattr(ds, keyword, generate_uid(entropy_srcs=[str(ds[keyword].value), str(number)]))
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        dest = partial / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest)
    partial.rename(target / f"copy-{number:04d}")


def ct_sample_corpus(work: Path, min_series: int) -> tuple[Path, list[Path]]:
    """The CT sample (generated once into ``work/ct-sample``) replicated to at least ``min_series``
    series in ``work/ct-data``; returns that folder and its files."""
    from dicomflow.devtools.ct_sample import generate_ct_sample

    source = work / "ct-sample"
    if not (source / "labels.csv").is_file():
        generate_ct_sample(source, patients=SAMPLE_PATIENTS, seed=SAMPLE_SEED, force=True)
    with open(source / "labels.csv", encoding="utf-8") as stream:
        per_copy = sum(1 for _ in stream) - 1  # one row per study, one series each
    data = work / "ct-data"
    return data, replicate_series(source, data, math.ceil(min_series / per_copy))


@dataclass
class SeriesTiming(Timing):
    """:class:`bench.ingest.Timing` with the corpus' series and the largest process' peak."""

    series: int = 0
    process_mib: float = 0.0

    def add(self, run: common.Measured) -> None:
        super().add(run)
        # The stage's largest worker; the plain loop has no child, its own process then.
        self.process_mib = max(self.process_mib, run.memory.worker or run.memory.root)


def time_corpus(files: list[Path], data: Path, *, work: Path, repeat: int) -> tuple[dict[str, SeriesTiming], dict]:
    """Time the plain loop and the stage on ``data`` (``repeat`` times, alternating); return the
    timings by row name, with the loop's counts and the stage's report."""
    list_file = work / "files.txt"
    list_file.write_text("".join(f"{f}\n" for f in files), encoding="utf-8")
    project = work / "project"
    common.write_project(project, data, ingest=STAGE_PARAMS)
    plain = [sys.executable, "-m", "bench.series", "--baseline-worker", str(list_file)]
    stage = [sys.executable, "-m", "stages.ingest"]
    timings = {PLAIN: SeriesTiming(len(files)), STAGE: SeriesTiming(len(files))}
    for _ in range(repeat):
        # Alternating, so that drift in the machine's state hits both alike.
        for name, command, log in ((PLAIN, plain, "baseline.log"), (STAGE, stage, "stage.log")):
            timings[name].add(common.run_measured(command, cwd=project, log=work / log))
    report = common.stage_report(project)
    seen, expected = report["files"], len(files) + hidden_entries(data)
    if seen != expected:  # otherwise the two did not read the same set
        sys.exit(f"the stage saw {seen} files in {data}, the plain loop {len(files)}")
    plain_counts = json.loads((work / "baseline.log").read_text(encoding="utf-8").splitlines()[-1])
    for timing in timings.values():
        timing.series = plain_counts["series"]  # every series UID of the corpus, broken ones too
    return timings, {"plain": plain_counts, "stage": report}


def corpus_table(report: Report, key: str, title: str, timings: dict[str, SeriesTiming], counts: dict, *,
                 largest_mib: float, repeat: int) -> None:
    """Print one corpus's table and record it in ``report`` under ``key``."""
    plain, stage = counts["plain"], counts["stage"]
    print(f"\n{title}: {plain['series']:,} series in {timings[PLAIN].files:,} files, the largest "
          f"{largest_mib:,.0f} MiB as float32 HU. Plain loop: {plain['stacked']:,} series stacked, "
          f"{plain['raised']} raised, {plain['files_raised']} files raised. Ingest stage: "
          f"{stage['series']:,} series kept, {stage['quarantined']:,} files quarantined, "
          f"{stage['skipped_not_images']} skipped")
    report.figures[key] = {"series": plain["series"], "files": timings[PLAIN].files,
                           "largest_series_mib": largest_mib, "plain": plain,
                           "stage": {k: v for k, v in stage.items() if isinstance(v, (int, float))}}
    base = timings[PLAIN].series / timings[PLAIN].seconds
    rows = []
    for name, t in timings.items():
        rate = t.series / t.seconds
        rows.append({"implementation": name, "series": t.series, "files": t.files, "runs": repeat,
                     "seconds": t.seconds, "series_per_s": rate, "files_per_s": t.rate, "vs_plain": rate / base,
                     "peak_rss_mib": t.peak_mib, "process_peak_mib": t.process_mib,
                     "peak_per_series": t.peak_mib / largest_mib,
                     "process_peak_per_series": t.process_mib / largest_mib})
    report.table(key, [Column("implementation", "implementation"), Column("series", "series", "{:,}"),
                       Column("files", "files", "{:,}"), Column("wall s (best)", "seconds", "{:.2f}"),
                       Column("series/s", "series_per_s", "{:,.1f}"), Column("files/s", "files_per_s", "{:,.0f}"),
                       Column("vs plain loop", "vs_plain", "{:.2f}x"),
                       Column("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}"),
                       Column("largest process (MiB)", "process_peak_mib", "{:,.0f}"),
                       Column("peak RSS / largest series", "peak_per_series", "{:,.1f}x"),
                       Column("largest process / largest series", "process_peak_per_series", "{:,.1f}x")],
                 rows, title="")
    ratio = rows[1]["vs_plain"]
    report.target(f"{title.lower()}: stage >= {TARGET_RATIO}x the plain loop's series/s", ratio >= TARGET_RATIO,
                  ratio)


def largest_series_mib(files: list[Path]) -> float:
    """The largest folder's (series') float32 size in MiB, from its first file's Rows x Columns."""
    import pydicom

    largest = 0.0
    for _, folder in groupby(files, key=lambda p: p.parent):
        members = list(folder)
        first = pydicom.dcmread(members[0], stop_before_pixels=True)
        largest = max(largest, len(members) * int(first.Rows) * int(first.Columns) * 4 / common.MIB)
    return largest


def training_table(report: Report, work: Path, *, volumes: int, epochs: int, batch_size: int) -> None:
    """resnet3d_small's training images/s through the train stage and the bare step (bench.train)."""
    import numpy as np

    from bench.train import input_shape, measure, synthetic_images

    network = "resnet3d_small"
    shape = input_shape(network)
    train_x, train_y = synthetic_images(volumes, shape=shape, seed=0)
    val_x, val_y = synthetic_images(max(2, batch_size), shape=shape, seed=1)
    data_file = work / "train" / "data.npz"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    np.savez(data_file, train_x=train_x, train_y=train_y, val_x=val_x, val_y=val_y)
    rows = []
    for side, name in (("stage", "train stage (`train_model`)"), ("bound", "bare train step")):
        result = measure(side, network, epochs, data_file, batch_size)
        rows.append({"side": name, "network": network, "input": "x".join(map(str, shape)),
                     "batch_size": result["batch_size"], "images": volumes * epochs,
                     "images_per_s": result["images_per_s"], "cores_busy": result["cores_busy"],
                     "peak_rss_mib": result["peak_rss_mib"]})
    print(f"\n3D network: {volumes} synthetic training volumes, {epochs} timed epoch(s) after a warm-up "
          "epoch, each side in a fresh process")
    report.table("train3d", [Column("side", "side"), Column("network", "network"), Column("input", "input"),
                             Column("batch size", "batch_size"), Column("images timed", "images"),
                             Column("images/s", "images_per_s", "{:,.2f}"),
                             Column("CPU cores busy", "cores_busy", "{:.2f}"),
                             Column("peak RSS (MiB)", "peak_rss_mib", "{:,.0f}")], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample-series", type=int, default=290,
                        help="at least this many series of the replicated CT sample")
    parser.add_argument("--series", type=int, default=16, help="series of the clinical-size corpus")
    parser.add_argument("--slices", type=int, nargs=2, default=[150, 300], metavar=("MIN", "MAX"),
                        help="slices per clinical-size series, spread evenly from MIN to MAX")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each, alternating; best time")
    parser.add_argument("--train-volumes", type=int, default=32, help="synthetic training volumes")
    parser.add_argument("--train-epochs", type=int, default=1, help="timed epochs after the warm-up")
    parser.add_argument("--batch-size", type=int, default=8, help="the 3D network's batch size")
    parser.add_argument("--no-train", action="store_true", help="leave out the 3D network's table")
    common.add_output_args(parser)
    parser.add_argument("--baseline-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_worker:
        return baseline_worker(args.baseline_worker)
    low, high = args.slices
    if not 1 <= low <= high or args.series < 1 or args.repeat < 1:
        parser.error(f"need 1 <= MIN <= MAX slices, --series >= 1, --repeat >= 1; got {args.slices}, "
                     f"{args.series}, {args.repeat}")

    report = Report("series", args)
    print(f"{common.cpu_line()}; load average at start: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    start = time.perf_counter()
    with common.work_folder("series", workdir=args.workdir, keep=args.keep) as work:
        started = time.perf_counter()
        sample_data, sample = ct_sample_corpus(work, args.sample_series)
        print(f"CT sample: {len(sample):,} files in {sample_data} "
              f"(prepared in {time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
        counts = [round(low + (high - low) * i / max(1, args.series - 1)) for i in range(args.series)]
        clinical = write_ct_series(work / "clinical", counts)
        size = sum(f.stat().st_size for f in clinical) / common.MIB
        print(f"clinical-size CT: {len(clinical):,} files ({size:,.0f} MiB) in {work / 'clinical'} "
              f"(prepared in {time.perf_counter() - started:.1f} s)")
        for key, title, files, data in (("ct_sample", "CT sample", sample, sample_data),
                                        ("clinical_ct", "Clinical-size CT", clinical, work / "clinical")):
            timings, counted = time_corpus(files, data, work=work, repeat=args.repeat)
            corpus_table(report, key, title, timings, counted, largest_mib=largest_series_mib(files),
                         repeat=args.repeat)
        if not args.no_train:
            training_table(report, work, volumes=args.train_volumes, epochs=args.train_epochs,
                           batch_size=args.batch_size)
    report.print_targets("Targets (issue 30, 2 cores)")
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in os.getloadavg())}; "
          f"wall time {time.perf_counter() - start:.0f} s")
    report.write(args.json)


if __name__ == "__main__":
    main()
