"""Burned-in text in one file: its pixels read for text, and the header rules for what cannot be read.

Every image is read (:mod:`dicomflow.deid.pixel_text`): text that holds an identifying value is
blanked where it stands, or the file left out (``deidentify.burned_in_action``). The header rules
(PS3.15 E.3.1, Clean Pixel Data Option: the flag (0028,0301) Burned In Annotation, and the
modalities, image types and manufacturers that ``deidentify.burned_in_*`` lists) are the fallback
for pixels the reader cannot handle: such a file is left out, or has
``deidentify.burned_in_regions`` set to black. A slice of a CT series meets them whatever the
reader finds (:func:`~dicomflow.deid.worker.deidentify_file`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import pydicom

from dicomflow.config.params import DeidentifyParams
from dicomflow.deid.identifiers import Identifiers
from dicomflow.deid.pixel_text import Judgement, TextRegion, blank, frames_of, judge, read_frames



@dataclass(frozen=True)
class TextFound:
    """What reading one file's pixels found: a judgement per text region (:func:`judge`), or
    ``unread``: why the pixels could not be read (the error type, never its message)."""

    judgements: list[Judgement] = field(default_factory=list)
    unread: str = ""

    @property
    def blanked(self) -> list[Judgement]:
        return [judgement for judgement in self.judgements if judgement.blank]

    def kinds(self) -> str:
        """The kinds of identifying value found, for the audit ("" when none)."""
        return "; ".join(sorted({judgement.why for judgement in self.blanked}))


def read_text_regions(frames: np.ndarray) -> list[TextRegion]:
    """The text regions of an image's frames (:func:`read_frames`): of its one frame; of a
    multi-frame object, of its first frame and of what stays put through all its frames, read as
    one picture (regions found there have ``frame`` None: every frame).

    Why not each frame: every frame of a cine loop shows new speckle that reads as dozens of
    candidate regions (a 30-frame ultrasound loop of deid-data: 813 regions, 13 s), while the text
    that identifies a patient is drawn once and stays put, so it is all there in the still part;
    the first frame is read whole for what stays put only in part (a clock's date beside its
    running seconds is in both)."""
    if len(frames) == 1:
        return read_frames(frames)
    still = np.ones(frames.shape[1:3], dtype=bool)
    for frame in frames[1:]:  # frame by frame: a long loop's comparison at once is its size again
        same = frame == frames[0]
        still &= same.all(axis=-1) if same.ndim == 3 else same
    overlay = np.where(still[..., None] if frames.ndim == 4 else still, frames[0], frames.min())
    return read_frames(frames[:1]) + [replace(region, frame=None) for region in read_frames(overlay[None])]


def decoded_frames(ds: pydicom.Dataset) -> np.ndarray | None:
    """``ds``'s pixels decoded, as (frames, rows, columns[, samples]); None when it has none."""
    if not any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return None
    return frames_of(ds.pixel_array, n_frames=int(ds.get("NumberOfFrames", 1) or 1))


def read_burned_in_text(ds: pydicom.Dataset, identifiers: Identifiers,
                        mode: str) -> tuple[TextFound, np.ndarray | None]:
    """Read ``ds``'s pixels for text and judge each region (:func:`judge` in ``mode``).

    Returns
    -------
    (TextFound, frames)
        ``frames``: the decoded pixels as (frames, rows, columns[, samples]), for
        :func:`blank_text`; None when there are no pixels or they could not be read
        (``TextFound.unread`` says why).
    """
    try:
        frames = decoded_frames(ds)
        if frames is None:
            return TextFound(), None
        regions = read_text_regions(frames)
    except Exception as err:  # noqa: BLE001  pydicom's and the decoders' messages can quote values
        return TextFound(unread=f"pixels not read ({type(err).__name__})"), None
    return TextFound(judge(regions, identifiers, mode)), frames


def blank_text(ds: pydicom.Dataset, frames: np.ndarray, found: TextFound) -> None:
    """Blank every region ``found`` judged identifying, in every frame (text stays put through
    a cine loop), and store the pixels in ``ds`` uncompressed."""
    blank(frames, {judgement.region.box for judgement in found.blanked})
    _store(ds, frames)


def burned_in_risk(ds: pydicom.Dataset, params: DeidentifyParams) -> str:
    """Why ``ds`` may show identifying text in its pixels by its header alone ("" when no rule
    applies): the fallback for pixels the reader cannot handle.

    The reason names the rule (the flag, or the listed modality, image type or manufacturer that
    matched), never a value that could identify a patient.
    """
    if str(ds.get("BurnedInAnnotation", "")).strip().upper() == "YES":
        return "BurnedInAnnotation YES"
    modality = str(ds.get("Modality", "")).strip().upper()
    if modality and modality in {m.upper() for m in params.burned_in_modalities or []}:
        return f"modality {modality}"
    image_type = {str(v).strip().upper() for v in (ds.get("ImageType") or [])}
    for listed in params.burned_in_image_types or []:
        if listed.upper() in image_type:
            return f"image type {listed.upper()}"
    manufacturer = str(ds.get("Manufacturer", "")).strip().casefold()
    for listed in params.burned_in_manufacturers or []:
        if listed.casefold() == manufacturer:
            return f"manufacturer {listed}"
    return ""


def blank_regions(ds: pydicom.Dataset, regions: list[list[float]]) -> None:
    """Set each region ([top, left, bottom, right] as fractions of rows and columns) of every
    frame to the image's lowest stored value, in place; the pixel data is stored uncompressed."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames_of(ds.pixel_array.copy(), n_frames=n_frames)
    rows, cols = int(ds.Rows), int(ds.Columns)
    blank(frames, [(int(np.floor(top * rows)), int(np.floor(left * cols)),
                    int(np.ceil(bottom * rows)), int(np.ceil(right * cols)))
                   for top, left, bottom, right in regions])
    _store(ds, frames)


def _store(ds: pydicom.Dataset, pixels: np.ndarray) -> None:
    """``pixels`` as ``ds``'s pixel data, uncompressed, in the photometric interpretation they are
    in (pydicom's ``pixel_array`` converts YBR to RGB)."""
    photometric = ds.PhotometricInterpretation
    if photometric.startswith("YBR"):
        photometric = "RGB"
    if int(ds.get("NumberOfFrames", 1) or 1) <= 1:
        pixels = pixels[0]  # frames_of added the frame axis
    # The same instance: its UID is pseudonymised with the others, keyed on the source's value.
    ds.set_pixel_data(pixels, photometric, int(ds.BitsStored), generate_instance_uid=False)
