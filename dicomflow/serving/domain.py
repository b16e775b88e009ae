"""The training domain of a model: which DICOM files it was trained on, and a check against it.

A CNN answers something for any image it is given: an MR slice, an ultrasound frame or a photo
sent to a chest radiograph classifier still gets a probability, one that no validation backs.
:class:`TrainingDomain` records, from the de-identified manifest rows of the training images,
what those files were (modality, photometric interpretation and so channels, matrix size, pixel
spacing, body part), and :meth:`TrainingDomain.check` refuses a file outside it from its header
alone, before any pixel is decoded. ``dicomflow.serving.pyfunc`` logs it with the registered model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pydicom

from dicomflow.dicom.display import COLOUR, GRAYSCALE, pixel_spacing
from dicomflow.dicom.reading import Quarantined

OUT_OF_DOMAIN = "out_of_domain"  # the Quarantined reason code
# Sizes and spacings vary continuously between detectors, protocols and sites, and ingest fits
# every image to ingest.image_size anyway: a model is not invalid one pixel past its largest
# training image, only on images clearly unlike the training set (a 4000-pixel mammogram sent to
# a chest model trained up to 2500). So each trained range [low, high] accepts
# [low * (1 - margin), high * (1 + margin)].
RANGE_MARGIN = 0.2
ADVICE = ("not predicted: the model's scores are not validated outside its training domain (the "
          "model's training_domain metadata); send files like its training data, or train a model on such files")


def channels_of(photometric: str) -> int | None:
    """1 for MONOCHROME1/2, 3 for RGB, YBR_* and PALETTE COLOR (a colour image), None for others."""
    if photometric in GRAYSCALE:
        return 1
    if photometric in COLOUR:
        return 3
    return None


@dataclass(frozen=True)
class TrainingDomain:
    """What the training files were; an empty set or a None range means "not recorded, not checked".

    Parameters
    ----------
    modalities : frozenset of str
        (0008,0060) Modality values, e.g. ``{"CR", "DX"}``.
    photometrics : frozenset of str
        (0028,0004) Photometric Interpretation values, e.g. ``{"MONOCHROME2"}``.
    channels : frozenset of int
        1 (grayscale) and/or 3 (colour) as :func:`channels_of` counts them.
    rows, columns : tuple of (int, int)
        Smallest and largest (0028,0010) Rows and (0028,0011) Columns, as stored in the files
        (before ingest resizes them).
    pixel_spacing_mm : tuple of (float, float) or None
        Smallest and largest row spacing in mm ((0028,0030) Pixel Spacing, else (0018,1164)
        Imager Pixel Spacing, as ingest reads it); None when no training image had one.
    body_parts : frozenset of str, default empty
        (0018,0015) Body Part Examined values, upper case; empty when none was recorded.
    margin : float, default RANGE_MARGIN
        Relative widening of each numeric range on each side (see :data:`RANGE_MARGIN`).

    Notes
    -----
    Photometric interpretations are compared by channel count: ingest inverts MONOCHROME1 and
    converts YBR to RGB, so a MONOCHROME1 file shows the model the same kind of image as a
    MONOCHROME2 one, while a colour image reduced to luminance (or grayscale repeated to RGB) does
    not. Modality and body part already say which kind of study it is.
    """

    modalities: frozenset[str]
    photometrics: frozenset[str]
    channels: frozenset[int]
    rows: tuple[int, int]
    columns: tuple[int, int]
    pixel_spacing_mm: tuple[float, float] | None = None
    body_parts: frozenset[str] = field(default_factory=frozenset)
    margin: float = RANGE_MARGIN

    def __post_init__(self) -> None:
        # Normalised here so that a domain built by hand, from a manifest or from JSON compares
        # equal (a frozen dataclass sets its own fields through object.__setattr__).
        normalised = {
            "modalities": frozenset(filter(None, map(_text, self.modalities))),
            "photometrics": frozenset(filter(None, map(_text, self.photometrics))),
            "channels": frozenset(int(c) for c in self.channels),
            "body_parts": frozenset(filter(None, (_text(b).upper() for b in self.body_parts))),
            "rows": _range("rows", self.rows, int),
            "columns": _range("columns", self.columns, int),
            "pixel_spacing_mm": None if self.pixel_spacing_mm is None else
            _range("pixel_spacing_mm", self.pixel_spacing_mm, float),
            "margin": float(self.margin),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)
        if not self.channels <= {1, 3}:
            raise ValueError(f"channels must be 1 (grayscale) and/or 3 (colour); got {sorted(self.channels)}")
        if not 0 <= self.margin < 1:
            raise ValueError(f"margin must be a fraction in [0, 1); got {self.margin!r}")

    @classmethod
    def from_manifest(cls, rows: pd.DataFrame, *, margin: float = RANGE_MARGIN) -> TrainingDomain:
        """The domain of the images in ``rows``: de-identified manifest rows, usually the train split's.

        Parameters
        ----------
        rows : pandas.DataFrame
            With columns ``modality``, ``photometric``, ``rows``, ``columns``,
            ``pixel_spacing_mm`` and ``body_part`` (``layout.MANIFEST_SCHEMA``); missing (NA,
            NaN) and empty values are ignored.
        margin : float, default RANGE_MARGIN
            See :data:`RANGE_MARGIN`.

        Raises
        ------
        ValueError
            A column is missing, or no row has a number of rows and columns (no image at all).
        """
        needed = ["modality", "photometric", "rows", "columns", "pixel_spacing_mm", "body_part"]
        missing = [name for name in needed if name not in rows.columns]
        if missing:
            raise ValueError(f"manifest rows lack column(s) {', '.join(missing)} (layout.MANIFEST_SCHEMA); "
                             f"got {', '.join(map(str, rows.columns))}")
        photometrics = _texts(rows["photometric"])
        sizes = {name: _numbers(rows[name]) for name in ("rows", "columns", "pixel_spacing_mm")}
        for name in ("rows", "columns"):
            if sizes[name].empty:
                raise ValueError(f"no manifest row has a value in {name!r}: a training domain needs at "
                                 f"least one image (got {len(rows)} rows)")
        spacing = sizes["pixel_spacing_mm"][sizes["pixel_spacing_mm"] > 0]
        return cls(
            modalities=_texts(rows["modality"]),
            photometrics=photometrics,
            channels=frozenset(c for c in map(channels_of, photometrics) if c is not None),
            rows=(int(sizes["rows"].min()), int(sizes["rows"].max())),
            columns=(int(sizes["columns"].min()), int(sizes["columns"].max())),
            pixel_spacing_mm=None if spacing.empty else (float(spacing.min()), float(spacing.max())),
            body_parts=_texts(rows["body_part"]),
            margin=margin,
        )

    def accepted(self, trained: tuple[float, float]) -> tuple[float, float]:
        """A trained (min, max) widened by :attr:`margin` on each side; a pixel count stays whole."""
        low, high = trained[0] * (1 - self.margin), trained[1] * (1 + self.margin)
        if all(isinstance(value, int) for value in trained):
            return math.ceil(low - 1e-9), math.floor(high + 1e-9)
        # To the 6 digits the error shows: 0.1 * 0.8 is 0.08000000000000002, and a file at the
        # 0.08 the message states must pass.
        return float(f"{low:.6g}"), float(f"{high:.6g}")

    def problems(self, ds: pydicom.Dataset) -> list[str]:
        """Why the file's header is outside the domain, one sentence per attribute; empty when inside.

        An attribute the file lacks, or the domain did not record, is not checked.
        """
        found = []
        modality = _text(ds.get("Modality"))
        if modality and self.modalities and modality not in self.modalities:
            found.append(f"Modality {modality!r} is not one the model was trained on ({_listed(self.modalities)})")
        photometric = _text(ds.get("PhotometricInterpretation"))
        channels = channels_of(photometric)
        if channels is not None and self.channels and channels not in self.channels:
            found.append(f"PhotometricInterpretation {photometric!r} is {_kind(channels)}; the model was trained "
                         f"on {' and '.join(_kind(c) for c in sorted(self.channels))} images "
                         f"({_listed(self.photometrics)})")
        for keyword, trained in (("Rows", self.rows), ("Columns", self.columns)):
            value = _number(ds.get(keyword))
            if value is not None:
                found += self._outside(keyword, value, trained, unit="")
        spacing = pixel_spacing(ds)
        if spacing is not None and self.pixel_spacing_mm is not None:
            keyword = "PixelSpacing" if ds.get("PixelSpacing") else "ImagerPixelSpacing"
            found += self._outside(keyword, spacing[0], self.pixel_spacing_mm, unit=" mm")
        body_part = _text(ds.get("BodyPartExamined")).upper()
        if body_part and self.body_parts and body_part not in self.body_parts:
            found.append(f"BodyPartExamined {body_part!r} is not one the model was trained on "
                         f"({_listed(self.body_parts)})")
        return found

    def check(self, ds: pydicom.Dataset) -> None:
        """Raise ``Quarantined("out_of_domain", detail)`` when the file's header is outside the domain.

        Reads the header only (no pixel is decoded). The detail names every attribute outside,
        its value and what the model was trained on, e.g. ``Modality 'MR' is not one the model
        was trained on (CR, DX)``, then what to do.

        Raises
        ------
        Quarantined
            Reason ``out_of_domain``.
        """
        found = self.problems(ds)
        if found:
            raise Quarantined(OUT_OF_DOMAIN, f"{'; '.join(found)}; {ADVICE}")

    def _outside(self, keyword: str, value: float, trained: tuple[float, float], *, unit: str) -> list[str]:
        low, high = self.accepted(trained)
        if low <= value <= high:
            return []
        return [f"{keyword} {value:g}{unit} is outside the trained range {trained[0]:g}-{trained[1]:g}{unit} "
                f"(accepted {low:g}-{high:g}{unit} with the {self.margin:.0%} margin)"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: sets as sorted lists, ranges as [min, max] (spacing None when not recorded)."""
        return {
            "modalities": sorted(self.modalities),
            "photometric_interpretations": sorted(self.photometrics),
            "channels": sorted(self.channels),
            "rows": list(self.rows),
            "columns": list(self.columns),
            "pixel_spacing_mm": None if self.pixel_spacing_mm is None else list(self.pixel_spacing_mm),
            "body_parts": sorted(self.body_parts),
            "margin": self.margin,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingDomain:
        """The inverse of :meth:`to_dict`; ValueError naming the missing keys."""
        keys = ("modalities", "photometric_interpretations", "channels", "rows", "columns")
        missing = [key for key in keys if key not in data]
        if missing:
            raise ValueError(f"a training domain needs key(s) {', '.join(missing)} (TrainingDomain.to_dict "
                             f"writes them); got {', '.join(map(str, data)) or 'none'}")
        spacing = data.get("pixel_spacing_mm")
        return cls(modalities=frozenset(data["modalities"]),
                   photometrics=frozenset(data["photometric_interpretations"]),
                   channels=frozenset(data["channels"]), rows=tuple(data["rows"]), columns=tuple(data["columns"]),
                   pixel_spacing_mm=None if spacing is None else tuple(spacing),
                   body_parts=frozenset(data.get("body_parts", ())), margin=data.get("margin", RANGE_MARGIN))

    def describe(self) -> str:
        """One line for logs and a model card, e.g. ``CR, DX; MONOCHROME2 (grayscale); rows 256-2500; ...``."""
        parts = [
            _listed(self.modalities) or "any modality",
            f"{_listed(self.photometrics) or 'any photometric'} "
            f"({' and '.join(_kind(c, short=True) for c in sorted(self.channels)) or 'any channels'})",
            f"rows {self.rows[0]}-{self.rows[1]}",
            f"columns {self.columns[0]}-{self.columns[1]}",
            "pixel spacing not recorded" if self.pixel_spacing_mm is None else
            f"pixel spacing {self.pixel_spacing_mm[0]:g}-{self.pixel_spacing_mm[1]:g} mm",
            f"body part {_listed(self.body_parts)}" if self.body_parts else "body part not recorded",
        ]
        return f"{'; '.join(parts)} (ranges accepted with a {self.margin:.0%} margin)"


def _range(name: str, value: object, kind: type) -> tuple:
    """``value`` as a (min, max) pair of ``kind`` with 0 < min <= max, or ValueError naming ``name``."""
    try:
        low, high = (kind(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a (min, max) pair of numbers; got {value!r}") from err
    if not 0 < low <= high:
        raise ValueError(f"{name} must be a (min, max) pair with 0 < min <= max; got {value!r}")
    return low, high


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _number(value: object) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):  # absent or malformed: decoding reports a malformed one
        return None


def _texts(column: pd.Series) -> frozenset[str]:
    return frozenset(text for text in (str(v).strip() for v in column.dropna()) if text)


def _numbers(column: pd.Series) -> pd.Series:
    return pd.to_numeric(column, errors="coerce").dropna()


def _listed(values: Iterable[str]) -> str:
    return ", ".join(sorted(values))


def _kind(channels: int, *, short: bool = False) -> str:
    if short:
        return "grayscale" if channels == 1 else "colour"
    return "grayscale (1 channel)" if channels == 1 else "colour (3 channels)"
