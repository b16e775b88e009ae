"""Benchmark: the validate stage's suite on a large de-identified manifest.

Times, side by side in one run on the same synthetic manifests (``bench.common.synthetic_manifest``,
about three images a patient):
- ``suite``: ``dicomflow.quality.report.run_checks`` (every expectation through Great Expectations 1.x,
  plus the computed checks) and the drift comparison, as the stage runs them;
- ``pandas floor``: the same row-level conditions written directly in pandas, the least any
  implementation has to do, to show what GX's machinery costs on top.
The Great Expectations import is timed apart (the stage pays it once). Target (issue 6):
100,000 rows validated in under 30 s on 2 cores.

    .venv/bin/python -m bench.validate [--rows 10000 100000] [--repeat 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import re
import time

import pandas as pd

from bench.common import Column, Report, add_output_args, synthetic_manifest
from dicomflow.quality.expectations import (
    PHI_VALUE_PATTERNS,
    build_checks,
    drift_results,
    find_text_columns,
    profile_manifest,
)
from dicomflow.quality.report import run_checks

TARGET_SECONDS = 30.0
PARAMS = {"classes": [0, 1], "modalities": ["CR", "DX"], "min_class_fraction": 0.1,
          "min_image_std": 0.02, "max_extreme_share": 0.5, "image_size_range": [64, 4096],
          "pixel_spacing_range": [0.05, 5.0]}
DRIFT = {"max_label_change": 0.1, "max_mix_change": 0.2, "max_intensity_shift": 1.0}


def run_suite(manifest: pd.DataFrame, reference: dict) -> int:
    checks = build_checks(**PARAMS, text_columns=find_text_columns(manifest))
    results = run_checks(manifest, checks) + drift_results(profile_manifest(manifest), reference, **DRIFT)
    return sum(r.failed for r in results)


def run_pandas_floor(manifest: pd.DataFrame, reference: dict) -> int:
    """The row-level conditions of the suite, directly in pandas (no reporting, no examples)."""
    phi = re.compile("|".join(PHI_VALUE_PATTERNS))
    failed = [
        manifest[["image_key", "patient_key", "label"]].isna().any().any(),
        manifest["image_key"].duplicated().any(),
        (~manifest["label"].isin(PARAMS["classes"])).any(),
        (~manifest["modality"].isin(PARAMS["modalities"])).any(),
        (~manifest["rows"].between(*PARAMS["image_size_range"])).any(),
        (~manifest["columns"].between(*PARAMS["image_size_range"])).any(),
        (~manifest["pixel_spacing_mm"].between(*PARAMS["pixel_spacing_range"])).any(),
        (manifest["pixel_std"] < PARAMS["min_image_std"]).any(),
        (manifest["pixel_extreme_share"] > PARAMS["max_extreme_share"]).any(),
        manifest["pixel_sha256"].duplicated().any(),
        *(manifest[c].astype(str).str.contains(phi).any() for c in find_text_columns(manifest)),
    ]
    profile_manifest(manifest)
    return int(sum(bool(f) for f in failed))


def best_of(repeat: int, function, *args) -> tuple[float, int]:
    times, result = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeat", type=int, default=3)
    add_output_args(parser, folders=False)
    args = parser.parse_args()

    report = Report("validate", args)
    start = time.perf_counter()
    import great_expectations  # noqa: F401  (what the validate stage pays once)
    import_seconds = time.perf_counter() - start
    report.figures["gx_import_seconds"] = import_seconds
    print(f"great_expectations import: {import_seconds:.1f} s (once per stage run)\n")

    rows = []
    for n in args.rows:
        manifest = synthetic_manifest(n, n // 3 or 1)
        reference = profile_manifest(synthetic_manifest(n, n // 3 or 1, seed=1))
        for name, function in (("suite (GX + drift)", run_suite), ("pandas floor", run_pandas_floor)):
            seconds, failed = best_of(args.repeat, function, manifest, reference)
            target = report.target(f"{n:,} rows: suite < {TARGET_SECONDS:.0f} s", seconds < TARGET_SECONDS,
                                   seconds) if name.startswith("suite") and n >= 100_000 else ""
            rows.append({"rows": n, "implementation": name, "seconds": seconds, "rows_per_s": n / seconds,
                         "failed_checks": failed, "target": target})
    report.table("validate", [Column("rows", "rows", "{:,}"), Column("implementation", "implementation"),
                              Column(f"best of {args.repeat} (s)", "seconds", "{:.2f}"),
                              Column("rows/s", "rows_per_s", "{:,.0f}"),
                              Column("failed checks", "failed_checks"), Column("target", "target")], rows)
    report.write(args.json)


if __name__ == "__main__":
    main()
