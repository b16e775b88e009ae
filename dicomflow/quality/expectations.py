"""The validate stage's expectation suite, written as code (no Great Expectations import here).

Each :class:`Check` names a Great Expectations 1.x expectation class and its keyword arguments;
``dicomflow.quality.report.run_checks`` turns them into GX expectations. The checks GX cannot express
(column kinds, identifying column *names*) are computed in pandas (:data:`COMPUTED_CHECKS`), and
drift against the last accepted data set compares two profiles (:func:`profile_manifest`,
:func:`drift_results`); all are reported in the same shape, a :class:`CheckResult`. Severity
follows GX's ``FailureSeverity``: ``critical`` stops the stage, ``warning`` is logged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from dicomflow.config import layout

CRITICAL, WARNING = "critical", "warning"

# Values a de-identified manifest must not hold (PS3.15 Annex E removes or replaces all of them).
# GX searches with pandas ``str.contains``, so each pattern is anchored where it needs to be.
_DATE = r"(?:19|20)\d\d(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
# Non-capturing groups only: pandas warns once per call about capturing groups in str.contains.
PHI_VALUE_PATTERNS = (
    r"^\d+(?:\.\d+){3,}$",                                       # a DICOM UID, 1.2.840.113619.2.55
    rf"^{_DATE}(?:\d{{2,6}}(?:\.\d+)?)?$",                       # DA or DT, 20240131, 20240131101500
    r"^(?:19|20)\d\d-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])",  # ISO date, 2024-01-31
    r"^[A-Za-z][A-Za-z' -]*\^",                                    # PN Last^First, DOE^JANE
)

# Column names (snake_case, after splitting CamelCase DICOM keywords) of identifying attributes:
# (0010,0010) Patient's Name, (0010,0020) Patient ID, (0010,0030) Patient's Birth Date,
# (0008,0050) Accession Number, any *Instance UID, (0008,0080) Institution Name, physicians,
# operators, addresses and telephone numbers, dates and times of the study, and file paths.
PHI_COLUMN_PATTERN = re.compile(
    r"(^|_)patients?_(id|name)s?($|_)"
    r"|birth|accession|(^|_)uids?($|_)|institution|physician|operator|address|telephone"
    r"|phone|e_?mail|(^|_)(mrn|ssn)($|_)|station_name|serial_number|other_patient"
    r"|(^|_)(date|time)($|_)|source_path"
)


@dataclass(frozen=True)
class Check:
    """One expectation of the suite.

    ``expectation`` is a GX class name in ``great_expectations.expectations`` or ``None`` for a
    check computed in pandas. ``kind`` says what a failure counts: ``rows`` (failing rows),
    ``class_share`` (the rows of a class below its minimum share; 0 when it passes), ``columns``
    (missing, mistyped or identifying column names), ``table`` (nothing: the row count is the
    detail), ``drift`` (categories or statistics beyond their threshold). ``labelled_only`` runs
    the check on the rows whose label is not ``layout.UNLABELLED_LABEL``.
    """

    name: str
    expectation: str | None
    severity: str
    column: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "rows"
    description: str = ""
    labelled_only: bool = False


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check; ``status`` is passed, failed or skipped (its input is missing)."""

    check: Check
    status: str
    unexpected_count: int = 0
    examples: tuple[str, ...] = ()  # image_keys of failing rows, at most a few
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def build_checks(
    *,
    classes: Sequence[int],
    modalities: Sequence[str],
    min_class_fraction: float,
    min_image_std: float,
    max_extreme_share: float,
    image_size_range: Sequence[int],
    pixel_spacing_range: Sequence[float],
    text_columns: Iterable[str] = (),
    allow_unlabelled: bool = False,
    channels: int = 1,
    min_colour_spread: float = 0.02,
    volumes: bool = False,
    slice_count_range: Sequence[int] = (8, 2000),
    slice_spacing_range: Sequence[float] = (0.3, 10.0),
    max_orientation_deviation_deg: float = 0.0,
) -> list[Check]:
    """The validate suite for ``params.yaml`` values.

    Parameters
    ----------
    classes : sequence of int
        Allowed labels (``ingest.classes``); each must reach ``min_class_fraction``.
    modalities : sequence of str
        Allowed (0008,0060) Modality values (``validate.modalities``).
    min_class_fraction : float
        Least share of rows per class (``validate.min_class_fraction``).
    min_image_std : float
        Below this pixel standard deviation an image is blank (``validate.min_image_std``).
    max_extreme_share : float
        Above this share of pixels at the ends of the display range an image is saturated
        (``validate.max_extreme_share``).
    image_size_range : sequence of two int
        Allowed (checked by the params loader: low <= high) original (0028,0010) Rows and
        (0028,0011) Columns (``validate.image_size_range``).
    pixel_spacing_range : sequence of two float
        Allowed (0028,0030) Pixel Spacing in mm (``validate.pixel_spacing_range``).
    text_columns : iterable of str
        Columns whose values are searched for UIDs, dates and person names.
    allow_unlabelled : bool, default=False
        ``ingest.unlabelled`` is ``pretrain``: a label may also be ``layout.UNLABELLED_LABEL``,
        and the class shares are taken over the labelled rows only.
    channels : int, default=1
        ``ingest.channels``; with 3 the colour checks are added: each source image is colour
        (``source_channels``) and no colour image is grey (``pixel_colour_spread``).
    min_colour_spread : float, default=0.02
        Below this mean channel range (pixels in [0, 1]) a colour image is grey
        (``validate.min_colour_spread``).
    volumes : bool, default=False
        The rows are series (``ingest.unit: series``): their diagnosis columns
        (``layout.SERIES_SCHEMA``) are required and the series checks are added. ``rows``,
        ``columns`` and ``pixel_spacing_mm`` then describe the source slices, in-plane, and are
        checked as for images.
    slice_count_range : sequence of two int, default=(8, 2000)
        Allowed distinct slice positions of a series (``validate.slice_count_range``).
    slice_spacing_range : sequence of two float, default=(0.3, 10.0)
        Allowed spacing between slices in mm (``validate.slice_spacing_range``).
    max_orientation_deviation_deg : float, default=0.0
        Largest angle between a slice's plane and its series' (``validate.max_orientation_deviation_deg``).

    Returns
    -------
    list of Check, critical checks first within each topic.

    Notes
    -----
    The colour checks are warnings, as the other image-content checks are: a grayscale source
    with ``channels: 3`` (repeated into three equal channels) is a legitimate set-up for an
    ImageNet-pretrained network on radiographs, and a grey picture among colour photographs can be
    a real one (a red-free fundus photograph); validate cannot tell a mistake from a choice, so it
    names the images and lets the stage finish.
    """
    low, high = image_size_range
    spacing_low, spacing_high = pixel_spacing_range
    allowed_labels = [*classes, layout.UNLABELLED_LABEL] if allow_unlabelled else list(classes)
    unlabelled_note = f" or {layout.UNLABELLED_LABEL} (unlabelled)" if allow_unlabelled else ""
    required = [c for c in layout.MANIFEST_COLUMNS if volumes or c not in layout.SERIES_SCHEMA]
    checks = [
        Check("manifest_not_empty", "ExpectTableRowCountToBeBetween", CRITICAL,
              kwargs={"min_value": 1}, kind="table", description="at least one row"),
        Check("columns_present", "ExpectTableColumnsToMatchSet", CRITICAL,
              kwargs={"column_set": required, "exact_match": False},
              kind="columns", description="every manifest column is present"),
        Check("column_types", None, CRITICAL, kind="columns",
              description="every manifest column holds its kind (string, integer, float)"),
        *(Check(f"{col}_not_null", "ExpectColumnValuesToNotBeNull", CRITICAL, col,
                description=f"{col} is never empty") for col in ("image_key", "patient_key", "label")),
        Check("image_key_unique", "ExpectColumnValuesToBeUnique", CRITICAL, "image_key",
              description="one row per image"),
        Check("label_in_classes", "ExpectColumnValuesToBeInSet", CRITICAL, "label",
              {"value_set": allowed_labels}, description=f"label is one of {list(classes)}{unlabelled_note}"),
        Check("modality_allowed", "ExpectColumnValuesToBeInSet", CRITICAL, "modality",
              {"value_set": list(modalities)}, description=f"modality is one of {list(modalities)}"),
        *(Check(f"{col}_in_range", "ExpectColumnValuesToBeBetween", CRITICAL, col,
                {"min_value": low, "max_value": high}, description=f"{col} in [{low}, {high}]")
          for col in ("rows", "columns")),
        Check("pixel_spacing_in_range", "ExpectColumnValuesToBeBetween", CRITICAL, "pixel_spacing_mm",
              {"min_value": spacing_low, "max_value": spacing_high},
              description=f"pixel spacing in [{spacing_low}, {spacing_high}] mm"),
        Check("image_not_blank", "ExpectColumnValuesToBeBetween", WARNING, "pixel_std",
              {"min_value": min_image_std}, description=f"pixel std >= {min_image_std}"),
        Check("image_not_saturated", "ExpectColumnValuesToBeBetween", WARNING, "pixel_extreme_share",
              {"max_value": max_extreme_share},
              description=f"at most {max_extreme_share:.0%} of pixels at the ends of the display range"),
        Check("pixel_hash_unique", "ExpectColumnValuesToBeUnique", WARNING, "pixel_sha256",
              description="no two images with identical pixels"),
        *(_colour_checks(min_colour_spread) if channels == 3 else ()),
        *(_series_checks(slice_count_range, slice_spacing_range, max_orientation_deviation_deg) if volumes else ()),
        # "At least a share f of the labels equal c" is exactly GX's `mostly` on a one-value set.
        *(Check(f"class_share_{c}", "ExpectColumnValuesToBeInSet", CRITICAL, "label",
                {"value_set": [c], "mostly": min_class_fraction}, kind="class_share",
                description=f"class {c} is at least {min_class_fraction:.0%} of labelled rows",
                labelled_only=allow_unlabelled)
          for c in classes),
        Check("no_phi_columns", None, CRITICAL, kind="columns",
              description="no column named like an identifying DICOM attribute, none of date type"),
        *(Check(f"no_phi_values_{col}", "ExpectColumnValuesToNotMatchRegexList", CRITICAL, col,
                {"regex_list": list(PHI_VALUE_PATTERNS)},
                description=f"no UID, date or Last^First name in {col}")
          for col in text_columns),
    ]
    return checks


def _colour_checks(min_colour_spread: float) -> tuple[Check, ...]:
    """The checks of a colour set (``ingest.channels: 3``); see :func:`build_checks`'s Notes."""
    return (
        Check("image_is_colour", "ExpectColumnValuesToBeInSet", WARNING, "source_channels",
              {"value_set": [3]}, description="the source image is colour (RGB, YBR or PALETTE COLOR), "
                                              "not grayscale repeated into three equal channels"),
        # pixel_colour_spread is null for grayscale sources: GX leaves nulls out of the check, so
        # a grayscale image fails image_is_colour only.
        Check("colour_not_grey", "ExpectColumnValuesToBeBetween", WARNING, "pixel_colour_spread",
              {"min_value": min_colour_spread},
              description=f"a colour image's mean channel range is at least {min_colour_spread} "
                          "(below: a grey picture stored as colour)"),
    )


def _series_checks(slice_count_range: Sequence[int], slice_spacing_range: Sequence[float],
                   max_orientation_deviation_deg: float) -> tuple[Check, ...]:
    """The checks of a set of series (``ingest.unit: series``); see :func:`build_checks`. Critical:
    a series outside them is not the acquisition the model is meant for (a scout-length series, a
    5 mm set mixed into a 1 mm study, slices not parallel)."""
    (count_low, count_high), (spacing_low, spacing_high) = slice_count_range, slice_spacing_range
    return (
        Check("slice_count_in_range", "ExpectColumnValuesToBeBetween", CRITICAL, "series_positions",
              {"min_value": count_low, "max_value": count_high},
              description=f"a series' distinct slice positions in [{count_low}, {count_high}]"),
        Check("slice_spacing_in_range", "ExpectColumnValuesToBeBetween", CRITICAL, "series_spacing_mm",
              {"min_value": spacing_low, "max_value": spacing_high},
              description=f"spacing between slices in [{spacing_low}, {spacing_high}] mm"),
        Check("orientation_consistent", "ExpectColumnValuesToBeBetween", CRITICAL,
              "series_orientation_deviation_deg", {"max_value": max_orientation_deviation_deg},
              description=f"no slice's plane more than {max_orientation_deviation_deg} degrees from its series'"),
        *(Check(f"{col}_not_null", "ExpectColumnValuesToNotBeNull", CRITICAL, col,
                description=f"{col} is known for every series")
          for col in ("series_positions", "series_spacing_mm", "series_orientation_deviation_deg")),
    )


def find_text_columns(df: pd.DataFrame) -> list[str]:
    """Columns holding strings (object or string dtype)."""
    return df.select_dtypes(include=["object", "string"]).columns.tolist()


def find_phi_columns(df: pd.DataFrame) -> list[str]:
    """Columns named like an identifying DICOM attribute, or holding dates/times.

    Names are compared in snake_case, so ``PatientBirthDate`` and ``patient_birth_date`` both match.
    """
    found = []
    for name in df.columns:
        snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|[^A-Za-z0-9]+", "_", str(name)).lower()
        is_temporal = pd.api.types.is_datetime64_any_dtype(df[name]) or isinstance(
            df[name].dtype, pd.PeriodDtype
        )
        if PHI_COLUMN_PATTERN.search(snake) or is_temporal:
            found.append(str(name))
    return found


def _holds_kind(series: pd.Series, kind: str) -> bool:
    """Whether the non-null values of ``series`` are all of ``kind`` (string, integer or float).

    Judged on values as well as dtype, because a column of integers with a gap arrives as float
    or object from Parquet and pandas, and is still a column of integers.
    """
    values = series.dropna()
    if kind == "string":
        return isinstance(series.dtype, pd.StringDtype) or all(isinstance(v, str) for v in values)
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return False
    numeric = pd.api.types.is_numeric_dtype(dtype) or all(
        isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        for v in values
    )
    if kind == "float" or not numeric:
        return numeric
    return pd.api.types.is_integer_dtype(dtype) or bool((values.astype(float) % 1 == 0).all())


def find_mistyped_columns(df: pd.DataFrame) -> list[str]:
    """Manifest columns whose values are not of the kind ``layout.MANIFEST_SCHEMA`` declares."""
    return [
        f"{name} ({df[name].dtype}, expected {kind})"
        for name, kind in layout.MANIFEST_SCHEMA.items()
        if name in df and not _holds_kind(df[name], kind)
    ]


# Checks computed in pandas: name -> function returning the offending columns, described.
COMPUTED_CHECKS: dict[str, Callable[[pd.DataFrame], list[str]]] = {
    "column_types": find_mistyped_columns,
    "no_phi_columns": find_phi_columns,
}


# What drift is measured on: shares of these categories, and mean/std of these per-image statistics.
DRIFT_CATEGORIES = ("label", "modality", "manufacturer")
DRIFT_INTENSITIES = ("pixel_mean", "pixel_std")
N_DRIFT_DETAILS = 3  # largest changes named in a drift warning


def profile_manifest(manifest: pd.DataFrame) -> dict[str, Any]:
    """The statistics of an accepted data set that the next one is compared with (JSON-ready).

    Only category shares and intensity moments: no row-level value, so nothing identifying. Label
    shares are of the labelled rows (unlabelled images, label ``layout.UNLABELLED_LABEL``, left
    out), so keeping unlabelled images moves no class's share.
    """
    labelled = manifest["label"] != layout.UNLABELLED_LABEL if "label" in manifest else None
    return {
        "n_rows": len(manifest),
        "shares": {
            column: {str(value): round(float(share), 6) for value, share in
                     (manifest.loc[labelled, column] if column == "label" else manifest[column])
                     .astype(str).value_counts(normalize=True).sort_index().items()}
            for column in DRIFT_CATEGORIES if column in manifest
        },
        "intensity": {
            column: {"mean": round(float(manifest[column].mean()), 6),
                     "std": round(float(manifest[column].std(ddof=0)), 6)}
            for column in DRIFT_INTENSITIES if column in manifest
        },
    }


def drift_results(
    current: Mapping[str, Any],
    reference: Mapping[str, Any] | None,
    *,
    max_label_change: float,
    max_mix_change: float,
    max_intensity_shift: float,
) -> list[CheckResult]:
    """Warnings where ``current`` moved from ``reference`` (both from :func:`profile_manifest`).

    Parameters
    ----------
    current, reference : mapping
        Profiles of this data set and of the last accepted one (``None``: there is none yet, and
        every drift check is skipped).
    max_label_change, max_mix_change : float
        Largest allowed change, in share points (0.1 = 10 points), of any label's share and of any
        modality's or manufacturer's share.
    max_intensity_shift : float
        Largest allowed move of the mean of a per-image statistic, in standard deviations of that
        statistic in the reference.

    Returns
    -------
    list of CheckResult, all of severity ``warning``; ``unexpected_count`` is the number of
    categories or statistics beyond their threshold.
    """
    checks = [
        (Check("drift_label_share", None, WARNING, "label", kind="drift",
               description=f"each label's share within {max_label_change:.0%} points of the last accepted set"),
         max_label_change),
        *((Check(f"drift_{column}_mix", None, WARNING, column, kind="drift",
                 description=f"each {column}'s share within {max_mix_change:.0%} points of the last accepted set"),
           max_mix_change) for column in DRIFT_CATEGORIES[1:]),
        (Check("drift_intensity", None, WARNING, ", ".join(DRIFT_INTENSITIES), kind="drift",
               description=f"mean of each per-image statistic within {max_intensity_shift} "
                           "reference SD of the last accepted set"),
         max_intensity_shift),
    ]
    if reference is None:
        return [CheckResult(check, "skipped", detail="no accepted data set to compare with yet")
                for check, _ in checks]
    results = []
    for check, threshold in checks:
        if check.name == "drift_intensity":
            moved = _intensity_shifts(current["intensity"], reference["intensity"])
            beyond = [f"{name}: mean {ref:.3f} -> {cur:.3f} ({shift:.1f} SD)"
                      for name, ref, cur, shift in moved if shift > threshold]
        else:
            changes = _share_changes(current["shares"].get(check.column, {}),
                                     reference["shares"].get(check.column, {}))
            beyond = [f"{value}: {ref:.1%} -> {cur:.1%}" for value, ref, cur in changes
                      if abs(cur - ref) > threshold]
        results.append(CheckResult(check, "failed" if beyond else "passed", len(beyond),
                                   detail="; ".join(beyond[:N_DRIFT_DETAILS])))
    return results


def _share_changes(current: Mapping[str, float], reference: Mapping[str, float]) -> list[tuple[str, float, float]]:
    """(value, reference share, current share) for every value of either, largest change first."""
    values = set(current) | set(reference)
    changes = [(v, reference.get(v, 0.0), current.get(v, 0.0)) for v in values]
    return sorted(changes, key=lambda c: (-abs(c[2] - c[1]), c[0]))


def _intensity_shifts(current: Mapping[str, Mapping[str, float]], reference: Mapping[str, Mapping[str, float]]
                      ) -> list[tuple[str, float, float, float]]:
    """(statistic, reference mean, current mean, shift in reference SDs) for shared statistics."""
    shifts = []
    for name in sorted(set(current) & set(reference)):
        ref, cur = reference[name], current[name]
        spread = max(ref["std"], 1e-6)
        shifts.append((name, ref["mean"], cur["mean"], abs(cur["mean"] - ref["mean"]) / spread))
    return shifts
