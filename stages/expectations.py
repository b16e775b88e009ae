"""The validate stage's expectation suite, written as code (no Great Expectations import here).

Each :class:`Check` names a Great Expectations 1.x expectation class and its keyword arguments;
``stages.validate.run_checks`` turns them into GX expectations. The one check GX cannot express,
identifying column *names*, is computed in pandas by :func:`find_phi_columns` and reported in the
same shape. Severity follows GX's ``FailureSeverity``: ``critical`` stops the stage, ``warning``
is logged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from stages import layout

CRITICAL, WARNING = "critical", "warning"

# An image whose mean normalised pixel is this close to 0 or 1 counts as saturated.
SATURATION_MARGIN = 0.02

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
    (missing or identifying column names), ``table`` (nothing: the row count is the detail).
    """

    name: str
    expectation: str | None
    severity: str
    column: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = "rows"
    description: str = ""


def build_checks(
    *,
    classes: Sequence[int],
    modalities: Sequence[str],
    min_class_fraction: float,
    min_image_std: float,
    image_size_range: Sequence[int],
    text_columns: Iterable[str] = (),
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
    image_size_range : sequence of two int
        Allowed original (0028,0010) Rows and (0028,0011) Columns (``validate.image_size_range``).
    text_columns : iterable of str
        Columns whose values are searched for UIDs, dates and person names.

    Returns
    -------
    list of Check, critical checks first within each topic.
    """
    if len(image_size_range) != 2 or image_size_range[0] > image_size_range[1]:
        raise ValueError(f"image_size_range must be [low, high] with low <= high; got {image_size_range}")
    low, high = image_size_range
    checks = [
        Check("manifest_not_empty", "ExpectTableRowCountToBeBetween", CRITICAL,
              kwargs={"min_value": 1}, kind="table", description="at least one row"),
        Check("columns_present", "ExpectTableColumnsToMatchSet", CRITICAL,
              kwargs={"column_set": list(layout.MANIFEST_COLUMNS), "exact_match": False},
              kind="columns", description="every manifest column is present"),
        *(Check(f"{col}_not_null", "ExpectColumnValuesToNotBeNull", CRITICAL, col,
                description=f"{col} is never empty") for col in ("image_key", "patient_key", "label")),
        Check("image_key_unique", "ExpectColumnValuesToBeUnique", CRITICAL, "image_key",
              description="one row per image"),
        Check("label_in_classes", "ExpectColumnValuesToBeInSet", CRITICAL, "label",
              {"value_set": list(classes)}, description=f"label is one of {list(classes)}"),
        Check("modality_allowed", "ExpectColumnValuesToBeInSet", CRITICAL, "modality",
              {"value_set": list(modalities)}, description=f"modality is one of {list(modalities)}"),
        *(Check(f"{col}_in_range", "ExpectColumnValuesToBeBetween", CRITICAL, col,
                {"min_value": low, "max_value": high}, description=f"{col} in [{low}, {high}]")
          for col in ("rows", "columns")),
        Check("pixel_spacing_positive", "ExpectColumnValuesToBeBetween", CRITICAL, "pixel_spacing_mm",
              {"min_value": 0, "strict_min": True}, description="pixel spacing > 0 mm"),
        Check("image_not_blank", "ExpectColumnValuesToBeBetween", WARNING, "pixel_std",
              {"min_value": min_image_std}, description=f"pixel std >= {min_image_std}"),
        Check("image_not_saturated", "ExpectColumnValuesToBeBetween", WARNING, "pixel_mean",
              {"min_value": SATURATION_MARGIN, "max_value": 1 - SATURATION_MARGIN,
               "strict_min": True, "strict_max": True},
              description=f"pixel mean in ({SATURATION_MARGIN}, {1 - SATURATION_MARGIN})"),
        Check("pixel_hash_unique", "ExpectColumnValuesToBeUnique", WARNING, "pixel_sha256",
              description="no two images with identical pixels"),
        # "At least a share f of the labels equal c" is exactly GX's `mostly` on a one-value set.
        *(Check(f"class_share_{c}", "ExpectColumnValuesToBeInSet", CRITICAL, "label",
                {"value_set": [c], "mostly": min_class_fraction}, kind="class_share",
                description=f"class {c} is at least {min_class_fraction:.0%} of labelled rows")
          for c in classes),
        Check("no_phi_columns", None, CRITICAL, kind="columns",
              description="no column named like an identifying DICOM attribute, none of date type"),
        *(Check(f"no_phi_values_{col}", "ExpectColumnValuesToNotMatchRegexList", CRITICAL, col,
                {"regex_list": list(PHI_VALUE_PATTERNS)},
                description=f"no UID, date or Last^First name in {col}")
          for col in text_columns),
    ]
    return checks


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
