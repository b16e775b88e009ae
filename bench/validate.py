"""Benchmark: the validate stage's suite on a large de-identified manifest.

Times, side by side in one run on the same synthetic manifests:
- ``suite``: ``dicomflow.quality.report.run_checks`` (every expectation through Great Expectations 1.x,
  plus the computed checks) and the drift comparison, as the stage runs them;
- ``pandas floor``: the same row-level conditions written directly in pandas, the least any
  implementation has to do, to show what GX's machinery costs on top.
The Great Expectations import is timed apart (the stage pays it once). Target (issue 6):
100,000 rows validated in under 30 s on 2 cores.

    .venv/bin/python bench/validate.py [--rows 10000 100000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomflow.quality.expectations import (PHI_VALUE_PATTERNS, build_checks, drift_results, find_text_columns, profile_manifest)
from dicomflow.quality.report import run_checks

TARGET_SECONDS = 30.0
PARAMS = {"classes": [0, 1], "modalities": ["CR", "DX"], "min_class_fraction": 0.1,
          "min_image_std": 0.02, "max_extreme_share": 0.5, "image_size_range": [64, 4096],
          "pixel_spacing_range": [0.05, 5.0]}
DRIFT = {"max_label_change": 0.1, "max_mix_change": 0.2, "max_intensity_shift": 1.0}


def synthetic_manifest(n: int, seed: int = 0) -> pd.DataFrame:
    """A clean manifest of ``n`` rows shaped like the deidentify stage's output."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "image_key": [f"{i:032x}" for i in range(n)],
        "patient_key": [f"{i // 3:032x}" for i in range(n)],
        "study_key": [f"{i // 2:032x}" for i in range(n)],
        "label": rng.integers(0, 2, n),
        "modality": rng.choice(["CR", "DX"], n),
        "manufacturer": rng.choice(["ACME", "RADCO", "XRAY INC"], n),
        "body_part": "CHEST", "view_position": rng.choice(["PA", "AP"], n),
        "patient_sex": rng.choice(["F", "M"], n),
        "patient_age_years": pd.array(rng.integers(18, 90, n), dtype="Int64"),
        "rows": rng.integers(192, 3000, n), "columns": rng.integers(192, 3000, n),
        "pixel_spacing_mm": rng.uniform(0.1, 2.5, n), "bits_stored": rng.choice([8, 12, 16], n),
        "photometric": rng.choice(["MONOCHROME1", "MONOCHROME2"], n), "predefined_split": "",
        "pixel_min": 0.0, "pixel_max": 1.0, "pixel_mean": rng.uniform(0.2, 0.5, n),
        "pixel_std": rng.uniform(0.1, 0.3, n), "pixel_extreme_share": rng.uniform(0, 0.2, n),
        "pixel_sha256": [f"{i:064x}" for i in range(n)],
        "dicom_file": [f"dicom/{i:032x}.dcm" for i in range(n)],
    })


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
    args = parser.parse_args()

    start = time.perf_counter()
    import great_expectations  # noqa: F401  (what the validate stage pays once)
    import_seconds = time.perf_counter() - start

    print(f"great_expectations import: {import_seconds:.1f} s (once per stage run)\n")
    print(f"| rows | implementation | best of {args.repeat} (s) | rows/s | failed checks | target |")
    print("|---:|---|---:|---:|---:|---|")
    for n in args.rows:
        manifest = synthetic_manifest(n)
        reference = profile_manifest(synthetic_manifest(n, seed=1))
        for name, function in (("suite (GX + drift)", run_suite), ("pandas floor", run_pandas_floor)):
            seconds, failed = best_of(args.repeat, function, manifest, reference)
            target = f"< {TARGET_SECONDS:.0f} s: {'met' if seconds < TARGET_SECONDS else 'MISSED'}" \
                if name.startswith("suite") and n >= 100_000 else ""
            print(f"| {n:,} | {name} | {seconds:.2f} | {n / seconds:,.0f} | {failed} | {target} |")


if __name__ == "__main__":
    main()
