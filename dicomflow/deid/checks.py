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


def check_inputs(index: pd.DataFrame, images: np.ndarray, series_files: pd.DataFrame | None = None) -> None:
    """Raise DataError unless the index has its columns and one image per row; volumes
    ((n, d, h, w, 1) uint8, ``ingest.unit: series``) only with ``series_files``
    (``layout.SERIES_FILES``) listing every slice of every row and nothing else, and images only
    without slices listed."""
    missing = [c for c in layout.INDEX_COLUMNS if c not in index.columns]
    if missing:
        raise DataError(f"{layout.INGEST_INDEX}: missing column(s) {', '.join(missing)}")
    slices = 0 if series_files is None else len(series_files)
    if images.ndim == 5:  # (n, d, h, w, 1): ingest.unit series
        if images.dtype != np.uint8 or images.shape[-1] != 1 or len(images) != len(index):
            raise DataError(f"{layout.IMAGES}: expected uint8 volumes of shape ({len(index)}, d, h, w, 1) "
                            f"for {len(index)} index rows; got {images.dtype} {images.shape}; re-run ingest")
        check_series_files(index, series_files)
        return
    if slices:
        raise DataError(f"{layout.SERIES_FILES} lists {slices} slice file(s) but {layout.IMAGES} holds "
                        f"images, not volumes (shape {images.shape}): the ingest outputs are from two runs; "
                        "re-run ingest")
    if images.ndim not in (3, 4) or images.dtype not in (np.uint8, np.float16) or len(images) != len(index):
        raise DataError(f"{layout.IMAGES}: expected uint8 or float16 of shape ({len(index)}, size, size[, 3]) "
                        f"for {len(index)} index rows; got {images.dtype} {images.shape}")


def check_series_files(index: pd.DataFrame, series_files: pd.DataFrame | None) -> None:
    """Raise DataError unless ``series_files`` lists, for each index row (a series), as many slice
    files as its ``number_of_frames``, and no slice of any other row."""
    where = f"{layout.SERIES_FILES} beside the volumes of {layout.IMAGES}"
    if series_files is None:
        raise DataError(f"{where} is missing: without the slice files of each series nothing can be "
                        "de-identified; re-run ingest with ingest.unit: series")
    missing = [c for c in layout.SERIES_FILES_SCHEMA if c not in series_files.columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(missing)}; re-run ingest")
    counts = series_files.groupby("row_key").size()
    listed = counts.reindex(index["row_key"]).fillna(0).astype(int).to_numpy()
    expected = index["number_of_frames"].fillna(0).astype(int).to_numpy()
    wrong = np.flatnonzero(listed != expected)
    if len(wrong):
        raise DataError(f"{where}: index row(s) {', '.join(map(str, wrong[:10]))} have "
                        f"{', '.join(map(str, listed[wrong[:10]]))} slice file(s) listed, expected their "
                        f"number_of_frames ({', '.join(map(str, expected[wrong[:10]]))}); re-run ingest")
    strays = int((~series_files["row_key"].isin(index["row_key"])).sum())
    if strays:
        raise DataError(f"{where}: {strays} slice file(s) belong to no index row; re-run ingest")


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
