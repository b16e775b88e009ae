"""Stage 3, validate: check the de-identified manifest with a Great Expectations suite.

Inputs: ``paths.deid_dir``/manifest.parquet.
Outputs: ``paths.validation_report`` (self-contained HTML, readable offline),
``paths.validation_metrics`` (flat JSON: n_rows, expectations, passed, failed_critical,
failed_warning, skipped, success) and ``paths.data_profile`` (label, modality and manufacturer
shares and intensity moments of the last *accepted* data set; kept between runs, so the next data
set's drift is measured against it).
Params: ``validate.*``, ``ingest.classes``.
Report and metrics are written first; then a failed ``critical`` expectation stops the stage with
one line per failure, while a failed ``warning`` (drift included) is only logged. The suite is in
``dicomflow.quality.expectations``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from dicomflow.config import layout
from dicomflow.config.params import load_params
from dicomflow.quality.expectations import (
    WARNING,
    build_checks,
    drift_results,
    find_text_columns,
    profile_manifest,
)
from dicomflow.quality.report import (
    format_failures,
    read_reference_profile,
    render_report,
    run_checks,
    summarise,
)
from dicomflow.runtime.outputs import write_json, write_text
from dicomflow.errors import DataError
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)


def main() -> None:
    paths, params = load_params("paths"), load_params("validate")
    manifest_path = Path(paths.deid_dir) / layout.DEID_MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} not found; run the deidentify stage first")
    manifest = pd.read_parquet(manifest_path)
    checks = build_checks(
        classes=load_params("ingest").classes, modalities=params.modalities,
        min_class_fraction=params.min_class_fraction, min_image_std=params.min_image_std,
        max_extreme_share=params.max_extreme_share, image_size_range=params.image_size_range,
        pixel_spacing_range=params.pixel_spacing_range, text_columns=find_text_columns(manifest),
    )
    profile_path = Path(paths.data_profile)
    profile = profile_manifest(manifest)
    results = run_checks(manifest, checks) + drift_results(
        profile, read_reference_profile(profile_path), max_label_change=params.drift_max_label_change,
        max_mix_change=params.drift_max_mix_change, max_intensity_shift=params.drift_max_intensity_shift,
    )
    summary = summarise(results, n_rows=len(manifest))

    write_text(Path(paths.validation_report),
               render_report(results, n_rows=len(manifest), source=str(manifest_path)))
    write_json(Path(paths.validation_metrics), summary)
    logger.info("validated %d rows of %s: %d of %d expectations passed, report in %s",
                len(manifest), manifest_path, summary["passed"], len(results), paths.validation_report)
    for line in format_failures(results, severity=WARNING).splitlines():
        logger.warning(line)
    if summary["failed_critical"]:
        raise DataError(
            f"{summary['failed_critical']} critical expectation(s) failed on {manifest_path} "
            f"(see {paths.validation_report}):\n" + format_failures(results)
        )
    # Only an accepted data set becomes the reference the next one's drift is measured against.
    write_json(profile_path, profile)


if __name__ == "__main__":
    run_stage(main)
