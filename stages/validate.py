"""Stage 3, validate: check the de-identified manifest with a Great Expectations suite.

Inputs: ``paths.deid_dir``/manifest.parquet.
Outputs: ``paths.validation_report`` (self-contained HTML, readable offline),
``paths.validation_metrics`` (flat JSON: n_rows, expectations, passed, failed_critical,
failed_warning, skipped, success) and ``paths.data_profile`` (label, modality and manufacturer
shares and intensity moments of the last *accepted* data set; kept between runs, so the next data
set's drift is measured against it).
Params: ``validate.*``, ``ingest.classes``, ``ingest.unlabelled`` (with ``pretrain`` a label may
also be -1, an image kept without a label: the class shares and the label drift are then of the
labelled rows, and the report and metrics count the unlabelled ones as ``n_unlabelled``),
``ingest.channels`` (with 3 the colour checks run: grayscale sources and grey colour images are
warnings), ``ingest.unit`` (with ``series`` the rows are series: their slice count, slice spacing
and orientation deviation are checked against ``validate.slice_count_range``,
``validate.slice_spacing_range`` and ``validate.max_orientation_deviation_deg``; rows, columns
and pixel spacing are the source slices').
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
    paths, params, ingest = load_params("paths"), load_params("validate"), load_params("ingest")
    allow_unlabelled = ingest.unlabelled == "pretrain"
    manifest_path = Path(paths.deid_dir) / layout.DEID_MANIFEST
    if not manifest_path.is_file():
        raise DataError(f"{manifest_path} not found; run the deidentify stage first")
    manifest = pd.read_parquet(manifest_path)
    # Counted only where they may be: in quarantine mode a -1 fails label_in_classes instead (and
    # a missing label column fails columns_present).
    n_unlabelled = (int((manifest["label"] == layout.UNLABELLED_LABEL).sum())
                    if allow_unlabelled and "label" in manifest else None)
    checks = build_checks(
        classes=ingest.classes, allow_unlabelled=allow_unlabelled, modalities=params.modalities,
        min_class_fraction=params.min_class_fraction, min_image_std=params.min_image_std,
        max_extreme_share=params.max_extreme_share, image_size_range=params.image_size_range,
        pixel_spacing_range=params.pixel_spacing_range, text_columns=find_text_columns(manifest),
        channels=ingest.channels, min_colour_spread=params.min_colour_spread,
        volumes=ingest.unit == "series", slice_count_range=params.slice_count_range,
        slice_spacing_range=params.slice_spacing_range,
        max_orientation_deviation_deg=params.max_orientation_deviation_deg,
    )
    profile_path = Path(paths.data_profile)
    profile = profile_manifest(manifest)
    results = run_checks(manifest, checks) + drift_results(
        profile, read_reference_profile(profile_path), max_label_change=params.drift_max_label_change,
        max_mix_change=params.drift_max_mix_change, max_intensity_shift=params.drift_max_intensity_shift,
    )
    summary = summarise(results, n_rows=len(manifest), n_unlabelled=n_unlabelled)

    write_text(Path(paths.validation_report), render_report(
        results, n_rows=len(manifest), source=str(manifest_path), n_unlabelled=n_unlabelled))
    write_json(Path(paths.validation_metrics), summary)
    logger.info("validated %d rows of %s: %d of %d expectations passed, report in %s",
                len(manifest), manifest_path, summary["passed"], len(results), paths.validation_report)
    if n_unlabelled is not None:
        logger.info("%d of the %d rows are unlabelled (label %d), kept for pretraining",
                    n_unlabelled, len(manifest), layout.UNLABELLED_LABEL)
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
