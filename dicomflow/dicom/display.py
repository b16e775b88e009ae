"""Pixels as a radiologist's viewer shows them, fitted to the model's input size.

Modality LUT, then the chosen VOI LUT or window, MONOCHROME1 inverted, colour (RGB, YBR,
PALETTE COLOR) optionally converted through its ICC profile to sRGB, then to the configured
channels, then optionally resampled to a common pixel spacing, then fitted to the output size
(:class:`PixelSettings`). Used by ingest and by the registered model, so training and serving make
the same pixels.
"""

from __future__ import annotations

import functools
import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from PIL import Image, ImageCms
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomflow.config import layout
from dicomflow.config.params import IngestParams
from dicomflow.dicom.reduced import MIN_REDUCED_PIXELS, NotReduced, ReducedFrame, reduce_frame, reduction_factor
from dicomflow.dicom.reading import (
    Quarantined,
    failure_reason,
    quoted,
    read_dataset,
    read_file,
    working_bytes,
)
from dicomflow.runtime.log_privacy import hidden_pydicom_messages

logger = logging.getLogger(__name__)

GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")
EXTREME_MARGIN = 0.5 / 255  # see extreme_share
_canvas = threading.local()  # _resize's PIL image, one per thread (served models decode in threads)
_STEP_BLOCK_VALUES = 1 << 17  # values per block of _float64_steps: 1 MiB of float64, cache-sized
# What Frame.colour_profile says a colour image went through with ingest.color_management: srgb
# (grayscale images and color_management none leave it empty).
PROFILE_CONVERTED, PROFILE_ASSUMED_SRGB = "icc_to_srgb", "assumed_srgb"


@dataclass(frozen=True)
class PixelSettings:
    """The ``ingest`` params that shape the pixels (what a worker process needs)."""

    size: int
    channels: int = 1               # 1: grayscale (colour to luminance); 3: RGB (grayscale repeated)
    frames: str = "first"           # first | middle | all (one image per frame)
    voi_index: int = 0              # which VOI LUT or window when a file has several
    target_spacing_mm: float | None = None  # resample to this spacing, then pad or crop to size
    dtype: str = "uint8"            # uint8 (0-255) or float16 ([0, 1])
    # Bound on what one file may cost: its size, its inflated size, its decoded frames. A default
    # here also serves models pickled before the bound existed.
    max_decoded_mib: int = 2048
    # none: colour as stored; srgb: through (0028,2000) ICC Profile to sRGB. A default here also
    # serves models pickled before the option existed.
    color_management: str = "none"
    # full: every source pixel decoded; reduced: at about the output's resolution
    # (dicomflow.dicom.reduced). Full here, so that models pickled before the option serve as trained.
    decode: str = "full"

    @classmethod
    def from_params(cls, params: IngestParams) -> PixelSettings:
        return cls(size=params.image_size, channels=params.channels, frames=params.frames,
                   voi_index=params.voi_index, target_spacing_mm=params.target_spacing_mm,
                   dtype=params.pixel_dtype, max_decoded_mib=params.max_decoded_mib,
                   color_management=params.color_management, decode=params.decode)

    @property
    def max_bytes(self) -> int:
        return self.max_decoded_mib << 20

    @property
    def image_shape(self) -> tuple[int, ...]:
        return (self.size, self.size) if self.channels == 1 else (self.size, self.size, 3)


@dataclass(frozen=True)
class Frame:
    """One image of a file: its frame number, display pixels and output pixels, for a colour
    image with ``color_management: srgb`` which way it reached sRGB, and with ``decode: reduced``
    how it was decoded."""

    index: int
    # float32 in [0, 1], (rows, cols) or (rows, cols, 3): full resolution, or with decode: reduced
    # the reduced image (about twice the output's size) when ``reduced``.
    display: np.ndarray
    pixels: np.ndarray   # PixelSettings.image_shape in PixelSettings.dtype
    colour_profile: str = ""  # "", PROFILE_CONVERTED or PROFILE_ASSUMED_SRGB
    reduced: bool = False  # decoded at a lower resolution (decode: reduced)
    # decode: reduced but decoded in full: why (dicomflow.dicom.reduced.NotReduced's reasons,
    # small where the source is too small to gain from it); "" otherwise.
    full_because: str = ""
    reduced_by: str = ""  # when reduced: jpeg2000 | jpeg (a codec's own scaling) | area (averaged)


def decode_frames(ds: pydicom.Dataset, *, frames: str,
                  max_bytes: int | None = None) -> list[tuple[int, np.ndarray]]:
    """Stored values of the chosen frame(s) as (frame number, array), or raise Quarantined.

    With ``max_bytes``, frames whose decoded size (:func:`working_bytes`, from the header) is
    larger are refused before any decoder allocates them.
    """
    n_frames, wanted = check_frames(ds, frames=frames, max_bytes=max_bytes)
    return _decode_checked(ds, n_frames, wanted)


def check_frames(ds: pydicom.Dataset, *, frames: str, max_bytes: int | None = None) -> tuple[int, int | None]:
    """The header checks of :func:`decode_frames` (photometric, decoded size): the number of
    frames and the one wanted (None: all), or raise Quarantined."""
    photometric = ds.get("PhotometricInterpretation")
    if photometric not in GRAYSCALE + COLOUR:
        found = "is absent" if photometric is None else f"is {photometric!r}"
        raise Quarantined("unsupported_photometric", f"(0028,0004) Photometric Interpretation {found}, "
                          f"not one of {', '.join(GRAYSCALE + COLOUR)}")
    if photometric == "PALETTE COLOR" and ds.file_meta.get("TransferSyntaxUID") == ExplicitVRBigEndian:
        # pydicom's apply_color_lut reads the OW lookup tables as little endian: colours would be wrong.
        raise Quarantined("unsupported_photometric", "PALETTE COLOR in a big-endian file: its lookup "
                          "tables would be read with the wrong byte order")
    n_frames = number_of_frames(ds)
    wanted = {"first": 0, "middle": n_frames // 2}.get(frames)
    needed = working_bytes(ds, n_frames if wanted is None else 1)
    if max_bytes is not None and needed is not None and needed > max_bytes:
        raise Quarantined("too_large", f"decoding would take {needed >> 20} MiB (Rows x Columns x "
                          f"samples x frames), more than ingest.max_decoded_mib {max_bytes >> 20}")
    return n_frames, wanted


def _decode_checked(ds: pydicom.Dataset, n_frames: int, wanted: int | None) -> list[tuple[int, np.ndarray]]:
    try:
        native = native_pixels(ds)
        if native is not None:
            return [(0, native)]
        if wanted is not None and n_frames > 1:
            ds.pixel_array_options(index=wanted)  # decode only that frame
        stored = ds.pixel_array
    except (ValueError, EOFError) as err:
        text = str(err)
        truncated = isinstance(err, EOFError) or "less than expected" in text or "truncat" in text.lower()
        raise Quarantined("truncated_pixel_data" if truncated else "undecodable", quoted(text)) from err
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a decoder plugin missing, failing or panicking
        raise failure_reason(err, reading="the pixel data") from err
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if n_frames > 1 and wanted is None:  # every frame: (frames, rows, cols[, samples])
        return list(enumerate(stored))
    if stored.ndim == (3 if samples == 1 else 4):  # a decoder that ignored the frame index
        stored = stored[wanted or 0]
    return [(wanted or 0, stored)]


def native_pixels(ds: pydicom.Dataset) -> np.ndarray | None:
    """Stored values of an uncompressed little-endian single-frame grayscale image, else None.

    The most common archive export. pydicom's ``pixel_array`` gets there through a decoder
    framework that validates dozens of attributes per call, which for small images costs more
    than reading the file (``bench/ingest.py``); this reads the bytes directly, with pydicom's
    semantics: bits above (0028,0101) Bits Stored masked, signed values sign-extended. Anything
    else (compressed, big endian, colour, multi-frame, short data) returns None and goes to pydicom.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None or meta.get("TransferSyntaxUID") not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        allocated, bits, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
        samples = int(ds.get("SamplesPerPixel", 1))
    except (AttributeError, TypeError, ValueError):
        return None
    if samples != 1 or allocated not in (8, 16) or not 1 <= bits <= allocated or number_of_frames(ds) != 1:
        return None
    data = ds.PixelData
    if len(data) < rows * cols * allocated // 8:
        return None  # pydicom says how it is truncated
    values = np.frombuffer(data, dtype=f"<u{allocated // 8}", count=rows * cols).reshape(rows, cols)
    if bits < allocated:
        values = values & np.array((1 << bits) - 1, dtype=values.dtype)
    if not signed:
        return values
    signed_values = values.astype(f"<i{allocated // 8}")
    if bits < allocated:  # two's complement in `bits` bits
        signed_values = np.where(values >= 1 << (bits - 1),
                                 values.astype(np.int32) - (1 << bits), values).astype(signed_values.dtype)
    return signed_values


def number_of_frames(ds: pydicom.Dataset) -> int:
    """(0028,0008) Number of Frames, 1 when absent or empty."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def to_display_pixels(ds: pydicom.Dataset, stored: np.ndarray, *, voi_index: int = 0,
                      channels: int = 1, color_management: str = "none",
                      stored_range: tuple[float, float] | None = None) -> np.ndarray:
    """Stored values of one frame to float32 in [0, 1] as a viewer shows them.

    Grayscale: modality LUT ((0028,1052) Rescale Intercept, (0028,1053) Rescale Slope or a
    Modality LUT Sequence), then the VOI LUT or window number ``voi_index`` (the last one when the
    file has fewer), then MONOCHROME1 inverted so that 1 is always bright; without any VOI
    information the frame's own range is used. Colour: PALETTE COLOR through its lookup tables,
    YBR already converted to RGB by pydicom's decoders, scaled by the stored bit depth.
    With ``color_management`` ``srgb`` colour then goes through the file's (0028,2000) ICC
    Profile to sRGB (:func:`convert_to_srgb`; a file without one is taken as sRGB already).
    ``channels`` 1 gives (rows, cols), colour reduced to luminance (ITU-R BT.601 weights);
    3 gives (rows, cols, 3), grayscale repeated. ``stored_range``: the extremes of the stored
    values to stretch when there is no window, where ``stored`` is a reduced image of a frame
    whose own extremes are known (averaging narrows them).
    """
    if ds.PhotometricInterpretation in GRAYSCALE:
        gray = _grayscale_display(ds, stored, voi_index=voi_index, stored_range=stored_range)
        return gray if channels == 1 else np.repeat(gray[..., None], 3, axis=-1)
    rgb = _colour_display(ds, stored)
    if color_management == "srgb":
        rgb = convert_to_srgb(rgb, ds.get("ICCProfile"))
    if channels == 3:
        return rgb
    return (rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)


def _grayscale_display(ds: pydicom.Dataset, stored: np.ndarray, *, voi_index: int,
                       stored_range: tuple[float, float] | None = None) -> np.ndarray:
    fast = _linear_display(ds, stored, voi_index=voi_index, stored_range=stored_range)
    if fast is not None:
        return fast
    values = apply_modality_lut(stored, ds)
    # Present but empty elements mean "no VOI", as pydicom's apply_voi_lut decides.
    lut = ds.get("VOILUTSequence")
    has_lut = bool(lut) and None not in (lut[0].get("LUTDescriptor"), lut[0].get("LUTData"))
    has_window = None not in (ds.get("WindowCenter"), ds.get("WindowWidth"))
    if not (has_lut or has_window):
        return _min_max(values.astype(np.float64), ds)
    if not has_lut:  # a VOI LUT indexes by the integer values; a window computes in floats
        values = values.astype(np.float64)
    index = min(voi_index, (len(lut) if has_lut else _multiplicity(ds.WindowCenter)) - 1)
    values = apply_voi_lut(values, ds, index=index)
    low, high = _voi_output_range(ds, lut=has_lut, index=index)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return _orient(np.clip(scaled, 0.0, 1.0), ds)


def _linear_display(ds: pydicom.Dataset, stored: np.ndarray, *, voi_index: int,
                    stored_range: tuple[float, float] | None = None) -> np.ndarray | None:
    """The common case in closed form: rescale slope/intercept and a LINEAR window, else None.

    pydicom's apply_modality_lut and apply_windowing produce values in the window's output range
    that the caller scales back to [0, 1]; the composition is clip((x - c) / w + 0.5, 0, 1) with
    x the rescaled value and, for LINEAR, c = centre - 0.5 and w = width - 1 (PS3.3 C.11.2.1.2.1).
    Computing that directly halves the time per image (``bench/ingest.py``). LUT sequences, SIGMOID
    and a LINEAR width of 1 or less (pydicom's errors and edge cases) go to pydicom.
    """
    linear = linear_window(ds, voi_index=voi_index)
    if linear is None:
        return None
    if linear[0] == "no_window":
        return _rescaled_min_max(stored, *linear[1:], ds, stored_range=stored_range)
    _, gain, offset = linear

    def window(block: np.ndarray) -> None:
        np.multiply(block, gain, out=block)
        np.add(block, offset, out=block)
        np.clip(block, 0.0, 1.0, out=block)

    return _float64_steps(stored, window)


def linear_window(ds: pydicom.Dataset, *, voi_index: int) -> tuple[str, float, float] | None:
    """The grayscale display of ``ds`` as an affine map of the stored values, when it is one:
    ("window", gain, offset) for clip(x * gain + offset, 0, 1) (rescale and a LINEAR window,
    MONOCHROME1 inverted); ("no_window", slope, intercept) for the frame's own range after the
    rescale; None for LUT sequences, SIGMOID, a LINEAR width of 1 or less (pydicom's way).
    """
    if ds.get("ModalityLUTSequence") or ds.get("VOILUTSequence"):
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    has_window = centre is not None and width is not None
    if function not in ("LINEAR", "LINEAR_EXACT") and has_window:
        return None
    try:
        slope, intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope, intercept = (1.0, 0.0) if slope is None or intercept is None else (float(slope), float(intercept))
        if not has_window:
            return "no_window", slope, intercept
        index = min(voi_index, _multiplicity(centre) - 1, _multiplicity(width) - 1)
        c = float(centre[index] if _multiplicity(centre) > 1 else centre)
        w = float(width[index] if _multiplicity(width) > 1 else width)
    except (TypeError, ValueError):
        return None
    if function == "LINEAR":
        c, w = c - 0.5, w - 1
    if w <= 0:
        return None
    # One multiply-add and one clip: (x * slope + intercept - c) / w + 0.5, inverted for MONOCHROME1.
    gain, offset = slope / w, (intercept - c) / w + 0.5
    if ds.PhotometricInterpretation == "MONOCHROME1":
        gain, offset = -gain, 1.0 - offset
    return "window", gain, offset


def window_bounds(ds: pydicom.Dataset, *, voi_index: int) -> tuple[float, float] | None | str:
    """The stored values beyond which a grayscale display clips, (low, high), for
    :func:`dicomflow.dicom.reduced.reduce_frame`: averaging commutes with the affine display
    steps but not with the window's clip, so values are clipped to these before being averaged.
    None: no window (the frame's range; nothing clips); "not_linear": a display that is not
    clipped-affine (LUT sequences, SIGMOID), where averaging first would change the result.
    """
    linear = linear_window(ds, voi_index=voi_index)
    if linear is None:
        return "not_linear"
    kind, gain, offset = linear
    if kind == "no_window":
        return None
    if gain == 0 or not (np.isfinite(gain) and np.isfinite(offset)):
        return "not_linear"
    ends = sorted(((0.0 - offset) / gain, (1.0 - offset) / gain))
    return ends[0], ends[1]


def _float64_steps(stored: np.ndarray, steps: Callable[[np.ndarray], None]) -> np.ndarray:
    """``steps`` (in-place float64 arithmetic) applied to ``stored`` as float64, as float32.

    The same operations on the same float64 values as converting the whole frame first, so the
    same float32 results bit for bit; but a few rows at a time, in one reused float64 buffer of
    about a megabyte, instead of two frame-sized float64 arrays (8 bytes a pixel each, which for
    a 2048 x 2500 radiograph are 40 MB each, fresh pages from the kernel on every file).
    """
    out = np.empty(stored.shape, dtype=np.float32)
    if stored.size == 0:
        return out
    rows = max(1, _STEP_BLOCK_VALUES // max(1, stored[0].size))
    buffer = np.empty((min(rows, len(stored)), *stored.shape[1:]), dtype=np.float64)
    for start in range(0, len(stored), rows):
        block = buffer[:len(stored[start:start + rows])]
        block[...] = stored[start:start + rows]  # exact: stored values are integers (or floats)
        steps(block)
        out[start:start + rows] = block  # float64 to float32, rounded as astype rounds
    return out


def _rescaled_min_max(stored: np.ndarray, slope: float, intercept: float,
                      ds: pydicom.Dataset, *, stored_range: tuple[float, float] | None = None) -> np.ndarray:
    """:func:`_min_max` of ``stored * slope + intercept``, bit for bit, without the float64 frame.

    x * slope + intercept is monotonic in x (each rounding is), so its extremes are those of the
    stored extremes (``stored_range`` where given: a reduced frame's full-resolution ones, the
    result then clipped to [0, 1]); a zero or non-finite slope or intercept goes the long way.
    """
    if not (slope != 0.0 and np.isfinite(slope) and np.isfinite(intercept)) or stored.size == 0:
        return _min_max(stored * slope + intercept, ds)
    extremes = stored_range if stored_range is not None else (stored.min(), stored.max())
    ends = np.array(extremes, dtype=np.float64) * slope + intercept
    low, high = float(ends.min()), float(ends.max())
    if not high > low:
        return _min_max(stored * slope + intercept, ds)
    span, invert = high - low, ds.PhotometricInterpretation == "MONOCHROME1"

    def scale(block: np.ndarray) -> None:
        np.multiply(block, slope, out=block)
        np.add(block, intercept, out=block)
        np.subtract(block, low, out=block)
        np.divide(block, span, out=block)
        if invert:
            np.subtract(1.0, block, out=block)
        if stored_range is not None:
            np.clip(block, 0.0, 1.0, out=block)

    return _float64_steps(stored, scale)


def _min_max(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """No VOI information: the frame's own range to [0, 1] (a constant frame to 0)."""
    low, high = float(values.min()), float(values.max())
    return _orient((values - low) / (high - low) if high > low else np.zeros_like(values), ds)


def _orient(scaled: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """MONOCHROME1 inverted so that 1 is always bright; float32."""
    if ds.PhotometricInterpretation == "MONOCHROME1":
        scaled = 1.0 - scaled
    return scaled.astype(np.float32)


def _multiplicity(value: object) -> int:
    return len(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else 1


def _colour_display(ds: pydicom.Dataset, stored: np.ndarray) -> np.ndarray:
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        rgb = apply_color_lut(stored, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    else:
        rgb, bits = stored, int(ds.BitsStored)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise Quarantined("unsupported_photometric", f"colour pixels of shape {rgb.shape}, expected rows x cols x 3")
    return np.clip(rgb.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def colour_profile_of(ds: pydicom.Dataset, settings: PixelSettings) -> str:
    """How a file's colour reaches sRGB under ``settings``: :data:`PROFILE_CONVERTED` (through its
    (0028,2000) ICC Profile), :data:`PROFILE_ASSUMED_SRGB` (it has none), or "" (grayscale, or
    ``color_management`` none)."""
    if settings.color_management != "srgb" or ds.get("PhotometricInterpretation") not in COLOUR:
        return ""
    return PROFILE_CONVERTED if ds.get("ICCProfile") else PROFILE_ASSUMED_SRGB


def convert_to_srgb(rgb: np.ndarray, profile: bytes | None) -> np.ndarray:
    """Colour pixels described by the ICC ``profile`` converted to sRGB with littleCMS.

    Parameters
    ----------
    rgb : numpy.ndarray
        float32 (rows, cols, 3) in [0, 1], the values (0028,2000) ICC Profile describes.
    profile : bytes or None
        The profile's bytes; None or empty: the pixels are taken as sRGB already and returned
        unchanged (what viewers assume of colour without a profile).

    Returns
    -------
    numpy.ndarray
        float32 (rows, cols, 3) in [0, 1].

    Raises
    ------
    Quarantined
        ``invalid_icc_profile``: littleCMS cannot read the profile, or it is not an RGB profile.

    Notes
    -----
    Relative colorimetric intent: colours inside the sRGB gamut keep their measured values (a
    lesion's colour is a finding, not something to make pleasing) and the rest are clipped to it.
    littleCMS works on 8-bit RGB here (Pillow has no deeper RGB mode), so deeper colour images are
    quantised to 8 bits on the way, no coarser than the uint8 images ingest stores.
    """
    if not profile:
        return rgb
    transform = _srgb_transform(bytes(profile))
    image = Image.fromarray(np.round(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8), mode="RGB")
    return np.asarray(ImageCms.applyTransform(image, transform), dtype=np.float32) / np.float32(255.0)


@functools.lru_cache(maxsize=16)
def _srgb_transform(profile: bytes) -> ImageCms.ImageCmsTransform:
    """The littleCMS transform from ``profile`` to sRGB, built once per profile (the profiles of
    one camera are the same bytes), or raise Quarantined (invalid_icc_profile)."""
    try:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
        space = source.profile.xcolor_space.strip()
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError) as err:
        raise Quarantined("invalid_icc_profile", quoted(
            f"(0028,2000) ICC Profile cannot be read as an ICC profile ({err}); remove it to take "
            "the colours as sRGB, or set ingest.color_management: none")) from err
    if space != "RGB":
        raise Quarantined("invalid_icc_profile", f"(0028,2000) ICC Profile describes {space or 'no'} colour "
                          "space, not RGB: it cannot describe these RGB pixels")
    try:
        # NOCACHE: littleCMS's one-pixel cache belongs to the transform, and the served model's
        # decoder threads share the transforms of this cache.
        return ImageCms.buildTransform(source, ImageCms.createProfile("sRGB"), "RGB", "RGB",
                                       renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                       flags=ImageCms.Flags.NOCACHE)
    except (OSError, ValueError, ImageCms.PyCMSError) as err:
        raise Quarantined("invalid_icc_profile", quoted(
            f"(0028,2000) ICC Profile cannot convert to sRGB ({err})")) from err


def _voi_output_range(ds: pydicom.Dataset, *, lut: bool, index: int = 0) -> tuple[float, float]:
    """Output range of pydicom's ``apply_voi_lut`` (PS3.3 C.11.2.1.2 and C.11.2.1.3)."""
    if lut:
        bits = int(ds.VOILUTSequence[index].LUTDescriptor[2])
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


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Area-averaging resize of a 2-D float image, or of each channel of a 3-D one.

    PIL's box filter averages when shrinking, avoiding the aliasing of plain subsampling, which
    would drop small findings such as nodules; when enlarging it repeats pixels.
    """
    if image.ndim == 3:
        return np.stack([_resize(image[..., c], rows, cols) for c in range(image.shape[-1])], axis=-1)
    # What Image.fromarray(image, mode="F") does (a raw "F" decode into a new image), but into an
    # image of this size kept from the last call: a new one is zero-filled first, which for a
    # full radiograph costs as much again as the resize. No copy of the (float32) display either.
    pixels = np.ascontiguousarray(image, dtype=np.float32)
    canvas = getattr(_canvas, "image", None)
    if canvas is None or canvas.size != (pixels.shape[1], pixels.shape[0]):
        canvas = _canvas.image = Image.new("F", (pixels.shape[1], pixels.shape[0]), None)  # not filled
    canvas.frombytes(pixels, "raw", "F", 0, 1)
    return np.asarray(canvas.resize((cols, rows), Image.Resampling.BOX))


def resize_with_padding(image: np.ndarray, size: int) -> np.ndarray:
    """Fit ``image`` into ``size`` × ``size`` keeping its aspect ratio, centred, zero padded."""
    rows, cols = image.shape[:2]
    return pad_or_crop(_resize(image, *fitted_shape(rows, cols, size=size)), size)


def fitted_shape(rows: int, cols: int, *, size: int, spacing: tuple[float, float] | None = None,
                 target_mm: float | None = None) -> tuple[int, int]:
    """(rows, columns) a ``rows`` x ``cols`` frame is resized to before :func:`pad_or_crop`: to
    fit ``size`` keeping its aspect ratio (:func:`resize_with_padding`), or with ``target_mm``
    to that spacing from ``spacing`` (:func:`resample_to_spacing`)."""
    if target_mm is None:
        scale = size / max(rows, cols)
        return max(1, round(rows * scale)), max(1, round(cols * scale))
    return max(1, round(rows * spacing[0] / target_mm)), max(1, round(cols * spacing[1] / target_mm))


def fit_reduced(display: np.ndarray, reduced: ReducedFrame, *, rows: int, cols: int,
                out_rows: int, out_cols: int, size: int) -> np.ndarray:
    """The reduced ``display`` of a ``rows`` x ``cols`` frame fitted as the full frame would be:
    resized to the full path's ``out_rows`` x ``out_cols`` (:func:`fitted_shape`, from the
    source's size) with the full path's box filter's pixel choice (:meth:`ReducedFrame.weights`),
    then :func:`pad_or_crop`. So the image sits at the same place in the model's input whichever
    way it was decoded."""
    along_rows = reduced.weights(rows, out_rows, display.shape[0])
    along_cols = reduced.weights(cols, out_cols, display.shape[1])
    fitted = np.einsum("ir,rc...,jc->ij...", along_rows, display.astype(np.float64), along_cols, optimize=True)
    return pad_or_crop(fitted.astype(np.float32), size)


def pad_or_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre ``image`` in ``size`` × ``size``: zero padding where smaller, cropping where larger."""
    out = np.zeros((size, size, *image.shape[2:]), dtype=np.float32)
    rows, cols = image.shape[:2]
    src_top, src_left = max(0, (rows - size) // 2), max(0, (cols - size) // 2)
    dst_top, dst_left = max(0, (size - rows) // 2), max(0, (size - cols) // 2)
    n_rows, n_cols = min(rows, size), min(cols, size)
    out[dst_top:dst_top + n_rows, dst_left:dst_left + n_cols] = \
        image[src_top:src_top + n_rows, src_left:src_left + n_cols]
    return out


def pixel_spacing(ds: pydicom.Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from (0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        row, col = float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError, IndexError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def resample_to_spacing(image: np.ndarray, spacing: tuple[float, float], target_mm: float) -> np.ndarray:
    """Resample so that one pixel covers ``target_mm`` in both directions."""
    rows, cols = image.shape[:2]
    return _resize(image, *fitted_shape(rows, cols, size=0, spacing=spacing, target_mm=target_mm))


def read_image(source: Path | BinaryIO, settings: PixelSettings) -> tuple[pydicom.Dataset, list[Frame]]:
    """Read one file: its dataset and the chosen frames, ready to store, or raise Quarantined."""
    ds = read_dataset(source, max_bytes=settings.max_bytes)
    return ds, image_frames(ds, settings)


def image_frames(ds: pydicom.Dataset, settings: PixelSettings) -> list[Frame]:
    """The chosen frames of a parsed file (:func:`read_dataset`), decoded and ready to store, or
    raise Quarantined. Apart from read_image so that a header can be checked before decoding.

    With ``settings.decode`` reduced, a frame much larger than the output is decoded at a lower
    resolution (:mod:`dicomflow.dicom.reduced`) and fitted to the same geometry (:func:`fit_reduced`);
    what that path cannot vouch for takes the full one, its reason in :attr:`Frame.full_because`.
    """
    spacing = pixel_spacing(ds)
    if settings.target_spacing_mm is not None and spacing is None:
        raise Quarantined("no_pixel_spacing", "ingest.target_spacing_mm is set but the file has no "
                          "(0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing")
    n_frames, wanted = check_frames(ds, frames=settings.frames, max_bytes=settings.max_bytes)
    full_because = ""
    if settings.decode == "reduced":
        attempt = _reduced_frame(ds, settings, spacing, n_frames)
        if isinstance(attempt, Frame):
            return [attempt]
        full_because = attempt
    frames = []
    for index, stored in _decode_checked(ds, n_frames, wanted):
        display = _display(ds, stored, settings, index=index)
        if settings.target_spacing_mm is None:
            fitted = resize_with_padding(display, settings.size)
        else:
            fitted = pad_or_crop(resample_to_spacing(display, spacing, settings.target_spacing_mm),
                                 settings.size)
        frames.append(Frame(index, display, layout.stored_pixels(fitted, settings.dtype),
                            colour_profile_of(ds, settings), full_because=full_because))
    return frames


def _display(ds: pydicom.Dataset, stored: np.ndarray, settings: PixelSettings, *, index: int,
             stored_range: tuple[float, float] | None = None) -> np.ndarray:
    """:func:`to_display_pixels` of one frame, checked finite and not blank, or raise Quarantined."""
    try:
        display = to_display_pixels(ds, stored, voi_index=settings.voi_index, channels=settings.channels,
                                    color_management=settings.color_management, stored_range=stored_range)
    except ValueError as err:  # pydicom rejects e.g. (0028,1051) Window Width < 1
        raise Quarantined("invalid_voi", quoted(err)) from err
    # NaN propagates through min and max and an infinity is one of them: two passes over
    # the frame check both finiteness and blankness.
    lowest, highest = display.min(), display.max()
    if not (np.isfinite(lowest) and np.isfinite(highest)):
        raise Quarantined("invalid_pixels", f"frame {index}: pixels are not finite numbers")
    if highest == lowest:
        raise Quarantined("blank", f"frame {index}: every pixel shows the same value once the "
                          "modality and VOI steps are applied")
    return display


def _reduced_frame(ds: pydicom.Dataset, settings: PixelSettings, spacing: tuple[float, float] | None,
                   n_frames: int) -> Frame | str:
    """The one frame of ``ds`` decoded reduced and fitted, or why the full path must take it."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except (AttributeError, TypeError, ValueError):
        return "header"  # the full decoder says what is wrong
    out_rows, out_cols = fitted_shape(rows, cols, size=settings.size, spacing=spacing,
                                      target_mm=settings.target_spacing_mm)
    factor = reduction_factor(rows, cols, out_rows, out_cols)
    if factor < 2 or rows * cols < MIN_REDUCED_PIXELS:
        return "small"
    if n_frames > 1:
        return "multi_frame"  # frames: first / middle / all each decode differently
    if settings.color_management == "srgb" and ds.PhotometricInterpretation in COLOUR:
        return "colour_management"  # the ICC transform is not linear: convert the full image
    clip = window_bounds(ds, voi_index=settings.voi_index) if ds.PhotometricInterpretation in GRAYSCALE else None
    if clip == "not_linear":
        return "not_linear_voi"  # LUT sequences, SIGMOID: averaging first would change the result
    try:
        reduced = reduce_frame(ds, factor, lambda: _decode_checked(ds, n_frames, 0)[0][1], clip=clip,
                               out=(out_rows, out_cols))
    except NotReduced as err:
        return err.reason
    display = _display(ds, reduced.stored, settings, index=0, stored_range=reduced.stored_range)
    fitted = fit_reduced(display, reduced, rows=rows, cols=cols, out_rows=out_rows, out_cols=out_cols,
                         size=settings.size)
    return Frame(0, display, layout.stored_pixels(fitted, settings.dtype), colour_profile_of(ds, settings),
                 reduced=True, full_because=reduced.declined, reduced_by=reduced.how)


def extreme_share(display: np.ndarray) -> float:
    """Share of pixels at the ends of the display range: high means saturated.

    "At an end" is within half an 8-bit display step of 0 or 1, so that pixels a window clips
    count the same whichever arithmetic computed them.
    """
    # Counted, not np.mean of a mask: the same value (an exact count over the size, rounded
    # once) without a float64 pass; the two ends are disjoint, so their counts add.
    extreme = np.count_nonzero(display < EXTREME_MARGIN) + np.count_nonzero(display > 1.0 - EXTREME_MARGIN)
    return float(np.float64(extreme) / np.float64(display.size)) if display.size else float("nan")


def colour_spread(display: np.ndarray) -> float:
    """Mean over pixels of the largest minus the smallest channel: 0 for a grey image, NaN for
    a one-channel display (``ingest.channels: 1``, where colour is already luminance).

    The mean, not the maximum: a JPEG of a grey scene carries a few off-grey pixels from chroma
    rounding, while a real colour photograph (skin, a fundus) is coloured over much of its area.
    """
    if display.ndim != 3 or display.size == 0:
        return float("nan")
    return float(np.mean(display.max(axis=-1) - display.min(axis=-1), dtype=np.float64))


def read_model_frames(source: bytes | str | Path, *, settings: PixelSettings,
                      check: Callable[[pydicom.Dataset], None] | None = None) -> np.ndarray | tuple[str, str]:
    """One file (its bytes or path) to its images as ingest stores them, stacked (frames, ...);
    or, for a file that cannot be used, (reason, detail): never raises, never logs a value.

    What the served model runs in its decoder processes. ``check(ds)`` may refuse the header
    (raising Quarantined) before any pixel is decoded.
    """
    with hidden_pydicom_messages():
        try:
            content = (bytes(source) if isinstance(source, (bytes, bytearray, memoryview))
                       else read_file(Path(source), max_bytes=settings.max_bytes))
            ds = read_dataset(io.BytesIO(content), max_bytes=settings.max_bytes)
            if check is not None:
                check(ds)
            return np.stack([frame.pixels for frame in image_frames(ds, settings)])
        except Quarantined as err:
            return err.reason, str(err)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as err:  # noqa: BLE001  one odd file must not fail the others
            failure = failure_reason(err, reading="the file")
            return failure.reason, str(failure)
