"""Burned-in text: which images may show identifying text in their pixels, and blanking it.

The header cannot say what is drawn in the pixels, so the rules here are about the kind of image
(PS3.15 E.3.1, Clean Pixel Data Option: the flag (0028,0301) Burned In Annotation, and the
modalities, image types and manufacturers that ``deidentify.burned_in_*`` lists). An image at
risk is left out, or has ``deidentify.burned_in_regions`` set to black.
"""

from __future__ import annotations

import numpy as np
import pydicom

from dicomflow.config.params import DeidentifyParams


def burned_in_risk(ds: pydicom.Dataset, params: DeidentifyParams) -> str:
    """Why ``ds`` may show identifying text in its pixels ("" when no rule applies).

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
    pixels = ds.pixel_array.copy()
    rows, cols = int(ds.Rows), int(ds.Columns)
    frames = pixels if int(ds.get("NumberOfFrames", 1) or 1) > 1 else pixels[None]
    for top, left, bottom, right in regions:
        r0, r1 = int(np.floor(top * rows)), int(np.ceil(bottom * rows))
        c0, c1 = int(np.floor(left * cols)), int(np.ceil(right * cols))
        frames[:, r0:r1, c0:c1] = pixels.min()
    photometric = ds.PhotometricInterpretation
    if photometric.startswith("YBR"):  # pixel_array converted it to RGB
        photometric = "RGB"
    ds.set_pixel_data(pixels, photometric, int(ds.BitsStored))
