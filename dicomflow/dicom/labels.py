"""The labels file: one row per key (accession number, study, instance UID or path) with its class."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pyarrow

from dicomflow.config import layout
from dicomflow.config.params import LABEL_KEYS
from dicomflow.dicom.reading import Quarantined
from dicomflow.errors import DataError, SettingsError

logger = logging.getLogger(__name__)


def read_labels(labels_file: Path, *, key: str, column: str = "label") -> tuple[dict[str, str], set[str]]:
    """Map each key value to its ``column`` value; keys whose rows contradict are returned apart.

    Several rows may share a key (e.g. one accession number for all images of a study); they
    must agree. ``column="split"`` reads the optional predefined split the same way.
    """
    if key not in LABEL_KEYS:
        raise SettingsError(f"label key must be one of {', '.join(LABEL_KEYS)}; got {key!r}")
    header = pd.read_csv(labels_file, dtype=str, nrows=0).columns
    missing = {key, column} - set(header)
    if missing:
        raise DataError(
            f"{labels_file}: missing column(s) {', '.join(sorted(missing))}; "
            f"found {', '.join(header)}"
        )
    # Only the two columns: a labels file may have one row per image and columns of the user's own.
    labels = pd.read_csv(labels_file, dtype=str, keep_default_na=False, usecols=[key, column])
    labels = labels[(labels[key] != "") & (labels[column] != "")]
    per_key = labels.groupby(key)[column].unique()
    conflicting = {k for k, values in per_key.items() if len(values) > 1}
    mapping = {k: values[0] for k, values in per_key.items() if k not in conflicting}
    del labels, per_key
    # Arrow keeps the pages of the freed columns for reuse; the stage then forks its readers,
    # which would each count them again (about 45 MiB per 100,000 rows).
    pyarrow.default_memory_pool().release_unused()
    return mapping, conflicting


def has_column(labels_file: Path, column: str) -> bool:
    """Whether the labels file's header names ``column``."""
    return column in pd.read_csv(labels_file, dtype=str, nrows=0).columns


def _key_value(record: dict, key: str) -> str:
    return record["source_path"] if key == "path" else record[key]


def assign_label(record: dict, *, key: str, labels: dict[str, str], conflicting: set[str], classes: list[int],
                 keep_unlabelled: bool = False) -> int:
    """The image's class from the labels table, or raise Quarantined (no_label, ...).

    With ``keep_unlabelled`` (``ingest.unlabelled: pretrain``) an image with no row in the labels
    file (or only rows with an empty label) gets ``layout.UNLABELLED_LABEL`` instead of no_label;
    contradicting rows and labels outside ``classes`` are quarantined all the same: those are
    errors in the labels file, not missing labels.
    """
    value = _key_value(record, key)
    if value in conflicting:
        raise Quarantined("conflicting_label", f"rows for this {key} disagree on the label")
    if value not in labels:
        if keep_unlabelled:
            return layout.UNLABELLED_LABEL
        raise Quarantined("no_label", f"no row in the labels file for this {key}")
    by_text = {str(c): c for c in classes}
    if labels[value] not in by_text:
        raise Quarantined(
            "label_not_in_classes",
            f"label {labels[value]!r} is not one of ingest.classes {classes}",
        )
    return by_text[labels[value]]


def labelled(record: dict, *, key: str, labels: dict[str, str], conflicting: set[str],
             classes: list[int], splits: dict[str, str], keep_unlabelled: bool = False) -> dict:
    """``record`` with its label and predefined split (empty when none), or raise Quarantined.

    An unlabelled image (``keep_unlabelled``) gets no predefined split whatever the labels file
    says: the split stage places it by its patient (``dicomflow.splitting.place_unlabelled``).
    """
    label = assign_label(record, key=key, labels=labels, conflicting=conflicting, classes=classes,
                         keep_unlabelled=keep_unlabelled)
    value = _key_value(record, key)
    split = splits.get(value, "") if value in labels else ""  # no label row: unlabelled, no split
    return {**record, "label": label, "predefined_split": split}
