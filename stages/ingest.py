"""Stage 1, ingest: every DICOM file under ``data/`` to display-ready pixels, an index and a quarantine.

Inputs: the raw files under ``paths.data`` and the labels file ``paths.labels``.
Outputs (``paths.ingest_dir``): ``images.npy`` (uint8, n × size × size), ``index.parquet`` (one
row per usable image, PHI included: only ``deidentify`` reads it) and ``quarantine.csv`` (every file
that could not be used, with a reason code); counts go to ``paths.ingest_metrics``.
Params: ``ingest.label_key``, ``ingest.classes``, ``ingest.image_size``,
``ingest.max_quarantine_fraction``.

A bad file never stops the run: it lands in the quarantine with its reason. The stage fails only
when the quarantined share of files passes ``ingest.max_quarantine_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from stages import layout
from stages.cli import StageError, run_stage
from stages.params import load_params

logger = logging.getLogger(__name__)

LABEL_KEYS = ("accession_number", "study_instance_uid", "sop_instance_uid", "path")
_KEY_TAGS = {
    "accession_number": "AccessionNumber",
    "study_instance_uid": "StudyInstanceUID",
    "sop_instance_uid": "SOPInstanceUID",
}
_SUPPORTED_PHOTOMETRIC = ("MONOCHROME1", "MONOCHROME2")


class Quarantined(Exception):
    """A file that cannot be used; ``reason`` is a short code, the message the detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class IngestedImage:
    """One usable image: its display pixels and the index row describing it."""

    pixels: np.ndarray
    record: dict


def find_candidate_files(data_dir: Path, *, exclude: set[Path]) -> list[Path]:
    """Every regular, non-hidden file under ``data_dir`` (DICOM files often have no extension)."""
    return sorted(
        path
        for path in data_dir.rglob("*")
        if path.is_file()
        and path.resolve() not in exclude
        and not any(part.startswith(".") for part in path.relative_to(data_dir).parts)
    )


def to_display_pixels(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    """Stored values to float32 in [0, 1] as a viewer shows them.

    Modality LUT ((0028,1052) Rescale Intercept, (0028,1053) Rescale Slope or a Modality LUT
    Sequence), then the first VOI LUT or window ((0028,1050) Window Center), then MONOCHROME1
    inverted so that 1 is always bright. Without any VOI information the image's own range is used.
    """
    values = apply_modality_lut(stored, ds).astype(np.float64)
    # Present but empty elements mean "no VOI", as pydicom's apply_voi_lut decides.
    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData"))
    has_window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
    if has_lut or has_window:
        values = apply_voi_lut(values, ds, index=0)
        low, high = _voi_output_range(ds, lut=has_lut)
    else:
        low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    scaled = np.clip(scaled, 0.0, 1.0)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def _voi_output_range(ds: pydicom.Dataset, *, lut: bool) -> tuple[float, float]:
    """Output range of pydicom's ``apply_voi_lut`` (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    if lut:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    if ds.get("ModalityLUTSequence"):
        bits = int(ds.ModalityLUTSequence[0].LUTDescriptor[2])
        return 0.0, float(2**bits - 1)
    bits = int(ds.BitsStored)
    if ds.get("PixelRepresentation", 0) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        low, high = low * float(slope) + float(intercept), high * float(slope) + float(intercept)
    return low, high


def resize_with_padding(image: np.ndarray, size: int) -> np.ndarray:
    """Fit ``image`` into ``size`` × ``size`` keeping its aspect ratio, centred, zero padded.

    Area averaging (PIL's box filter) avoids the aliasing of plain subsampling, which would
    drop small findings such as nodules.
    """
    rows, cols = image.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    resized = np.asarray(
        Image.fromarray(image.astype(np.float32), mode="F").resize(
            (new_cols, new_rows), Image.Resampling.BOX
        )
    )
    out = np.zeros((size, size), dtype=np.float32)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = resized
    return out


def read_display(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """Read one file: its dataset and full-resolution display pixels in [0, 1], or raise Quarantined."""
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise Quarantined("not_dicom", str(err)) from err
    except Exception as err:  # pydicom raises many types for damaged headers
        raise Quarantined("truncated", f"header unreadable: {err}") from err
    if "PixelData" not in ds:
        raise Quarantined("no_pixel_data", "(7FE0,0010) Pixel Data is absent")
    photometric = ds.get("PhotometricInterpretation", "")
    if photometric not in _SUPPORTED_PHOTOMETRIC:
        raise Quarantined(
            "unsupported_photometric",
            f"(0028,0004) Photometric Interpretation {photometric!r} is not one of "
            f"{', '.join(_SUPPORTED_PHOTOMETRIC)}",
        )
    try:
        stored = ds.pixel_array
    except (ValueError, EOFError) as err:
        reason = "truncated" if "less than expected" in str(err) or isinstance(err, EOFError) else "undecodable"
        raise Quarantined(reason, str(err)) from err
    except Exception as err:  # a decoder plugin missing or failing
        raise Quarantined("undecodable", f"{type(err).__name__}: {err}") from err
    if stored.ndim == 3:  # multi-frame: the first frame stands for the object
        stored = stored[0]
    try:
        return ds, to_display_pixels(ds, stored)
    except ValueError as err:  # pydicom rejects e.g. (0028,1051) Window Width < 1
        raise Quarantined("invalid_voi", str(err)) from err


def to_uint8(display: np.ndarray, size: int) -> np.ndarray:
    """Display pixels in [0, 1] to the stored uint8 ``size`` x ``size`` image."""
    return np.round(resize_with_padding(display, size) * 255).astype(np.uint8)


def read_image(path: Path, *, size: int) -> tuple[pydicom.Dataset, np.ndarray]:
    """Read one file and return its dataset and uint8 display pixels, or raise Quarantined."""
    ds, display = read_display(path)
    return ds, to_uint8(display, size)


def extreme_share(display: np.ndarray) -> float:
    """Share of pixels at the ends of the display range (0 or 1): high means saturated."""
    return float(np.mean((display <= 0.0) | (display >= 1.0)))


def describe_image(ds: pydicom.Dataset, pixels: np.ndarray, *, source_path: str, sha256: str) -> dict:
    """The index row for one image (columns in ``layout.INDEX_COLUMNS``, label added later)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    scaled = pixels.astype(np.float32) / 255.0
    return {
        "source_path": source_path,
        "sha256": sha256,
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "accession_number": str(ds.get("AccessionNumber", "")),
        "patient_id": str(ds.get("PatientID", "")),
        "modality": str(ds.get("Modality", "")),
        "manufacturer": str(ds.get("Manufacturer", "")),
        "body_part": str(ds.get("BodyPartExamined", "")),
        "view_position": str(ds.get("ViewPosition", "")),
        "patient_sex": str(ds.get("PatientSex", "")),
        "patient_age": str(ds.get("PatientAge", "")),
        "rows": int(ds.Rows),
        "columns": int(ds.Columns),
        "pixel_spacing_mm": float(spacing[0]) if spacing else float("nan"),
        "bits_stored": int(ds.BitsStored),
        "photometric": str(ds.PhotometricInterpretation),
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID),
        "pixel_min": float(scaled.min()),
        "pixel_max": float(scaled.max()),
        "pixel_mean": float(scaled.mean()),
        "pixel_std": float(scaled.std()),
    }


def read_labels(labels_file: Path, *, key: str, column: str = "label") -> tuple[dict[str, str], set[str]]:
    """Map each key value to its ``column`` value; keys whose rows contradict are returned apart.

    Several rows may share a key (e.g. one accession number for all images of a study); they
    must agree. ``column="split"`` reads the optional predefined split the same way.
    """
    if key not in LABEL_KEYS:
        raise ValueError(f"label key must be one of {', '.join(LABEL_KEYS)}; got {key!r}")
    labels = pd.read_csv(labels_file, dtype=str, keep_default_na=False)
    missing = {key, column} - set(labels.columns)
    if missing:
        raise StageError(
            f"{labels_file}: missing column(s) {', '.join(sorted(missing))}; "
            f"found {', '.join(labels.columns)}"
        )
    labels = labels[(labels[key] != "") & (labels[column] != "")]
    per_key = labels.groupby(key)[column].unique()
    conflicting = {k for k, values in per_key.items() if len(values) > 1}
    mapping = {k: values[0] for k, values in per_key.items() if k not in conflicting}
    return mapping, conflicting


def has_column(labels_file: Path, column: str) -> bool:
    """Whether the labels file's header names ``column``."""
    return column in pd.read_csv(labels_file, dtype=str, nrows=0).columns


def _key_value(record: dict, key: str) -> str:
    return record["source_path"] if key == "path" else record[key]


def assign_label(record: dict, *, key: str, labels: dict[str, str], conflicting: set[str], classes: list[int]) -> int:
    """The image's class from the labels table, or raise Quarantined (no_label, ...)."""
    value = _key_value(record, key)
    if value in conflicting:
        raise Quarantined("conflicting_label", f"rows for this {key} disagree on the label")
    if value not in labels:
        raise Quarantined("no_label", f"no row in the labels file for this {key}")
    by_text = {str(c): c for c in classes}
    if labels[value] not in by_text:
        raise Quarantined(
            "label_not_in_classes",
            f"label {labels[value]!r} is not one of ingest.classes {classes}",
        )
    return by_text[labels[value]]


def ingest_files(files: list[Path], *, data_dir: Path, key: str, labels: dict[str, str],
                 conflicting: set[str], classes: list[int], size: int,
                 splits: dict[str, str] | None = None,
                 ) -> tuple[list[IngestedImage], list[dict]]:
    """Read, normalise and label every file; unusable ones become quarantine rows.

    ``splits`` maps key values to a predefined split (the labels file's optional ``split``
    column); images without one get an empty ``predefined_split``.
    """
    images, quarantine = [], []
    for number, path in enumerate(files, start=1):
        relative = path.relative_to(data_dir).as_posix()
        try:
            ds, display = read_display(path)
            pixels = to_uint8(display, size)
            sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
            record = describe_image(ds, pixels, source_path=relative, sha256=sha256)
            record["pixel_extreme_share"] = extreme_share(display)
            record["label"] = assign_label(
                record, key=key, labels=labels, conflicting=conflicting, classes=classes
            )
            record["predefined_split"] = (splits or {}).get(_key_value(record, key), "")
        except Quarantined as err:
            # Paths and reader messages can carry PHI (accession numbers in folder names), so
            # they go to the quarantine table, not to logs that CI systems keep.
            logger.debug("quarantined file %d: %s", number, err.reason)
            quarantine.append({"path": relative, "reason": err.reason, "detail": str(err)})
            continue
        images.append(IngestedImage(pixels, record))
        if number % 200 == 0:
            logger.info("read %d/%d files", number, len(files))
    return images, quarantine


def main() -> None:
    paths, params = load_params("paths"), load_params("ingest")
    data_dir, labels_file = Path(paths.data), Path(paths.labels)
    out_dir = Path(paths.ingest_dir)
    if not labels_file.is_file():
        raise StageError(f"labels file {labels_file} not found (see README: bring your own data)")

    files = find_candidate_files(data_dir, exclude={labels_file.resolve()})
    if not files:
        raise StageError(f"no files found under {data_dir}/")
    labels, conflicting = read_labels(labels_file, key=params.label_key)
    splits = {}
    if has_column(labels_file, "split"):
        splits, _ = read_labels(labels_file, key=params.label_key, column="split")
    images, quarantine = ingest_files(
        files, data_dir=data_dir, key=params.label_key, labels=labels, conflicting=conflicting,
        classes=params.classes, size=params.image_size, splits=splits,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    pixels = np.stack([image.pixels for image in images]) if images else np.zeros(
        (0, params.image_size, params.image_size), np.uint8)
    np.save(out_dir / layout.IMAGES, pixels)
    index = pd.DataFrame([image.record for image in images], columns=list(layout.INDEX_COLUMNS))
    index.to_parquet(out_dir / layout.INGEST_INDEX, index=False)
    pd.DataFrame(quarantine, columns=["path", "reason", "detail"]).to_csv(
        out_dir / layout.INGEST_QUARANTINE, index=False)

    reasons = Counter(row["reason"] for row in quarantine)
    metrics = {"files": len(files), "images": len(images), "quarantined": len(quarantine),
               **{f"quarantined_{reason}": count for reason, count in sorted(reasons.items())}}
    Path(paths.ingest_metrics).parent.mkdir(parents=True, exist_ok=True)
    Path(paths.ingest_metrics).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info("ingested %d images of shape %s from %d files", len(images), pixels.shape[1:], len(files))
    if quarantine:
        logger.warning("%d files quarantined (%s): see %s", len(quarantine),
                       ", ".join(f"{count} {reason}" for reason, count in reasons.most_common()),
                       out_dir / layout.INGEST_QUARANTINE)

    share = len(quarantine) / len(files)
    if share > params.max_quarantine_fraction:
        raise StageError(
            f"{len(quarantine)} of {len(files)} files quarantined ({share:.1%} > "
            f"ingest.max_quarantine_fraction {params.max_quarantine_fraction:.1%}): "
            + ", ".join(f"{count} {reason}" for reason, count in reasons.most_common())
            + f"; see {out_dir / layout.INGEST_QUARANTINE}"
        )


if __name__ == "__main__":
    run_stage(main)
