"""The checks at the edges of de-identification: the ingest outputs it reads, and the leak check
of everything it wrote before the outputs are moved into place."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.deid.identifiers import Identifiers
from dicomflow.deid.leaks import find_leaks, summarise_leaks
from dicomflow.errors import DataError

logger = logging.getLogger(__name__)


def check_inputs(index: pd.DataFrame, images: np.ndarray) -> None:
    """Raise DataError unless the index has its columns and one image per row."""
    missing = [c for c in layout.INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{layout.INGEST_INDEX}: missing column(s) {', '.join(missing)}")
    if images.ndim not in (3, 4) or images.dtype not in (np.uint8, np.float16) or len(images) != len(index):
        raise DataError(f"{layout.IMAGES}: expected uint8 or float16 of shape ({len(index)}, size, size[, 3]) "
                        f"for {len(index)} index rows; got {images.dtype} {images.shape}")


def check_outputs(identifiers: Identifiers, *, out_dir: Path) -> None:
    """Leak check of the output tables (each DICOM file was searched as it was written, and
    quarantined on a hit: :func:`~dicomflow.deid.worker.deidentify_file`); on any hit delete the
    outputs and raise DataError naming every column involved and in how many tables (never a
    value)."""
    tables = {layout.DEID_MANIFEST: pd.read_parquet(out_dir / layout.DEID_MANIFEST),
              layout.DEID_AUDIT: pd.read_csv(out_dir / layout.DEID_AUDIT, dtype=str),
              layout.DEID_QUARANTINE: pd.read_csv(out_dir / layout.DEID_QUARANTINE, dtype=str)}
    leaks = find_leaks(identifiers, dicom_dir=None, tables=tables)
    if leaks:
        shutil.rmtree(out_dir, ignore_errors=True)
        raise DataError(
            f"leak check: {len(leaks)} identifying value(s) found in the outputs, outputs deleted. "
            "Where, and what kind of value (never the value): " + "; ".join(summarise_leaks(leaks))
            + ". A kept attribute held a value that identifies someone: see the README, "
            "'When the leak check fails'")
    logger.info("leak check: none of %s identifying values found in the DICOM files and %d tables",
                f"{len(identifiers):,}", len(tables))
