"""Stored values at a lower resolution, for images the model sees much smaller than they are stored.

A 2048 x 2500 radiograph ends as 64 x 64 pixels (``ingest.image_size``): decoding every pixel and
running the display steps on all of them is nearly all of ingest's time (``bench/ingest.py``).
``ingest.decode: reduced`` decodes at about :data:`OVERSAMPLING` times the fitted size instead,
and :func:`dicomflow.dicom.display.image_frames` fits that to the same output geometry as the full
path (the scale comes from the source's Rows x Columns, the reduced image is resized onto it):

- JPEG 2000: a coarse wavelet resolution level (:func:`decode_jpeg2000`), which skips the
  entropy decoding of the finer sub-bands, where the image has a window the low-pass image
  barely goes beyond;
- JPEG baseline (8-bit): libjpeg's DCT scaling, 1/2 to 1/8 (:func:`decode_jpeg`);
- everything else (native, RLE, JPEG Lossless, JPEG-LS, what the two above decline): decoded in
  full, clipped to the window, and each output pixel averaged from exactly the source pixels the
  full path's box filter averages (:func:`box_sums`), before the display steps, which then touch
  a few thousand pixels instead of millions.

Averaging commutes with the modality rescale and a linear window once the window's clip is done
(both affine), so the display of the averaged values is the average of the display: what the
fitting's box filter computes anyway. Non-linear steps (LUT sequences, SIGMOID) do not commute and
take the full path. ``tests/test_reduced_decode.py`` measures the difference against the full path
on pydicom's test files and the clinical-size corpus (at most 1 grey level of 255 on average per
image, 4 at the 99th percentile).

What the fast decoders cannot do for sure raises :class:`NotReduced`: the caller takes the full
path, or the full decode then averaging, counted by reason in ingest's metrics.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import JPEG2000, JPEG2000Lossless, JPEGBaseline8Bit

# Reduced pixels per output pixel, at least, on each side: the fitting then still averages two or
# more of them per output pixel, which keeps the result within a grey level of the full path
# (measured: tests/test_reduced_decode.py, bench/ingest.py).
OVERSAMPLING = 2
# Smaller sources take the full path: their display steps cost less than the reduced path's own
# bookkeeping (bench/ingest.py, the replicated sample of 192-320 pixel images: the stage at 0.54x
# the plain loop reduced against 0.78x full).
MIN_REDUCED_PIXELS = 1 << 20
# JPEG 2000: this many resolution levels finer than OVERSAMPLING allows, so that the low-pass
# image has at least 16 samples per output pixel on each side. A low-pass sample is a wavelet
# filter's output, not a block mean: it overshoots at sharp edges, by up to an eighth of the step
# at level 1 and more below. Measured (per image mean / p99 of |reduced - full|, grey levels):
# pydicom's MR2_J2KR (1024 x 1024, windowed), 1 spare level 0.95 / 8, 2: 0.70 / 7, 3: exact (level
# 0); US1_J2KR (colour) 2.0 / 25, then exact; the clinical corpus's windowed radiographs 0.66 / 4,
# 0.49 / 4, 0.43 / 4 (level 1: a 2x2 low-pass).
JPEG2000_SPARE_LEVELS = 3
# Mean distance of the low-pass samples beyond the window, in window widths, above which a codec's
# reduced image is not used (half a grey level: radiographs whose window spans their data measure
# ~0.0002, from the wavelet's overshoot at edges; CT slices with air around the body ~1).
LOWPASS_MAX_EXCURSION = 0.5 / 255
# HTJ2K is left to the full path: no test file here to prove Pillow's output against pydicom's.
JPEG2000_SYNTAXES = (JPEG2000Lossless, JPEG2000)
JPEG_SYNTAXES = (JPEGBaseline8Bit,)
_SOC, _SIZ, _COD, _EOC = b"\xff\x4f", 0xFF51, 0xFF52, b"\xff\xd9"


class NotReduced(Exception):
    """Reduced decoding does not apply to this file; ``reason`` (a short code) says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ReducedFrame:
    """Stored values of one frame at a lower resolution, and where they sit on the source.

    Reduced pixel ``j`` stands for source pixels ``[j * factor - shift, (j + 1) * factor - shift)``
    (clipped to the frame): a block average exactly (shift 0); a JPEG 2000 low-pass sample,
    centred on source pixel ``j * factor``, approximately (shift ``factor // 2``).
    """

    stored: np.ndarray      # float32 (rows', cols') or (rows', cols', 3)
    factor: int             # source pixels per reduced pixel, each side
    shift: int = 0
    stored_range: tuple[float, float] | None = None  # the full-resolution extremes, when known
    how: str = "area"       # jpeg2000 | jpeg | area: which decoder made it
    declined: str = ""      # area after the codec's reduced decoder declined: why

    fitted: bool = False    # stored is already the output's size (box_sums): nothing to resize

    def weights(self, source: int, out: int, reduced: int) -> np.ndarray:
        """(out, reduced) weights that resize one axis of the reduced image as PIL's box filter
        resizes the source's ``source`` pixels to ``out`` (:func:`box_weights`)."""
        if self.fitted:
            return np.eye(out)
        return box_weights(source, out, self.factor, self.shift, reduced)


@functools.lru_cache(maxsize=256)
def box_ranges(source: int, out: int) -> np.ndarray | None:
    """First source pixel of each output pixel of PIL's box filter along one axis (see
    :func:`box_weights`), and the end of the last; None where the ranges are not contiguous."""
    edges = []
    for i in range(out):
        xs = np.flatnonzero(box_weights(source, out, 1, 0, source)[i])
        if len(xs) == 0 or (edges and edges[-1] != xs[0]) or len(xs) != xs[-1] - xs[0] + 1:
            return None
        edges[-1:] = [xs[0], xs[-1] + 1]
    return np.array(edges)


def box_sums(values: np.ndarray, rows: tuple[int, int], cols: tuple[int, int]) -> np.ndarray | None:
    """The mean over each output pixel's source pixels, exactly as PIL's box filter takes them
    (``rows``, ``cols``: (source, out) of each axis), float32; None where a range is not contiguous.

    One sum over each output row's band of source rows (vectorised along the rows: ~2 ms for
    2500 x 2048, where ``np.add.reduceat`` along axis 0 takes 50), then the same along the
    columns of the small result.
    """
    row_edges, col_edges = box_ranges(*rows), box_ranges(*cols)
    if row_edges is None or col_edges is None:
        return None
    band = int(np.diff(row_edges).max())
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2 and band <= 1 << 16:
        accumulator = np.uint32  # a band of 16-bit values fits, and adds faster than int64
    else:
        accumulator = np.int64 if values.dtype.kind in "iu" else np.float64
    by_rows = np.empty((len(row_edges) - 1, *values.shape[1:]), dtype=accumulator)
    for i, (start, end) in enumerate(zip(row_edges[:-1], row_edges[1:])):
        np.sum(values[start:end], axis=0, dtype=accumulator, out=by_rows[i])
    wide = np.int64 if accumulator is np.uint32 else accumulator
    sums = np.stack([by_rows[:, start:end].sum(axis=1, dtype=wide)
                     for start, end in zip(col_edges[:-1], col_edges[1:])], axis=1)
    counts = np.multiply.outer(np.diff(row_edges), np.diff(col_edges)).astype(np.float64)
    return (sums / (counts[..., None] if sums.ndim == 3 else counts)).astype(np.float32)


@functools.lru_cache(maxsize=256)
def box_weights(source: int, out: int, factor: int, shift: int, reduced: int) -> np.ndarray:
    """Weights (out, reduced) of the reduced pixels in each output pixel of one axis, so that
    ``weights @ reduced_image`` is what PIL's box filter makes of the full-resolution axis.

    PIL's BOX resize (``Resample.c``, ``precompute_coeffs``) averages, for output ``i``, the source
    pixels ``x`` with ``i * scale - 0.5 < x <= (i + 1) * scale - 0.5`` (whole pixels, scale =
    source / out). Each of them is stood for by the reduced pixel whose block holds it, so a block
    the boundary cuts is counted by the share of its pixels on each side: a plain resize of the
    reduced image would count it whole on one side, tens of grey levels off at 2 reduced pixels
    per output pixel.
    """
    scale = source / out
    weights = np.zeros((out, reduced), dtype=np.float64)
    for i in range(out):
        centre = (i + 0.5) * scale
        low, high = max(0, int(centre - 0.5 * scale + 0.5)), min(source, int(centre + 0.5 * scale + 0.5))
        xs = np.arange(low, high)
        position = (xs - centre + 0.5) / scale
        xs = xs[(position > -0.5) & (position <= 0.5)]
        np.add.at(weights[i], np.clip((xs + shift) // factor, 0, reduced - 1), 1.0)
        weights[i] /= max(1, len(xs))
    weights.setflags(write=False)
    return weights


def reduction_factor(rows: int, cols: int, out_rows: int, out_cols: int) -> int:
    """The largest integer factor that leaves at least :data:`OVERSAMPLING` reduced pixels per
    output pixel on both sides; 1: no reduction (the output is not much smaller than the source)."""
    return max(1, min(rows // (OVERSAMPLING * max(1, out_rows)), cols // (OVERSAMPLING * max(1, out_cols))))


def area_mean(stored: np.ndarray, factor: int) -> np.ndarray:
    """Mean of ``stored`` over ``factor`` x ``factor`` blocks as float32, channels kept; the last
    block of a row or column averages the pixels it has.

    Integer sums along rows, then along columns: two passes, vectorised along the contiguous
    axis (about 2 ms for 2500 x 2048 uint16 where PIL's reduce on float32 takes 20 ms).
    """
    if factor == 1:
        return stored.astype(np.float32)
    accumulator = np.int64 if stored.dtype.kind in "iu" else np.float64
    rows, cols = stored.shape[:2]
    full_r, full_c = rows // factor, cols // factor
    # Rows: the whole blocks in one reshaped sum, the partial one apart.
    parts = [stored[:full_r * factor].reshape(full_r, factor, cols, *stored.shape[2:]).sum(axis=1, dtype=accumulator)]
    if rows % factor:
        parts.append(stored[full_r * factor:].sum(axis=0, keepdims=True, dtype=accumulator))
    by_rows = np.concatenate(parts) if len(parts) > 1 else parts[0]
    parts = [by_rows[:, :full_c * factor].reshape(len(by_rows), full_c, factor, *stored.shape[2:])
             .sum(axis=2, dtype=accumulator)]
    if cols % factor:
        parts.append(by_rows[:, full_c * factor:].sum(axis=1, keepdims=True, dtype=accumulator))
    sums = np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]
    counts_r = np.full(len(sums), factor, dtype=np.float64)
    counts_r[-1] = rows - (len(sums) - 1) * factor
    counts_c = np.full(sums.shape[1], factor, dtype=np.float64)
    counts_c[-1] = cols - (sums.shape[1] - 1) * factor
    counts = np.multiply.outer(counts_r, counts_c)
    if sums.ndim == 3:
        counts = counts[..., None]
    return (sums / counts).astype(np.float32)


def window_excursion(values: np.ndarray, clip: tuple[float, float]) -> float:
    """Mean distance of ``values`` beyond ``clip`` (low, high), in units of its width."""
    low, high = clip
    beyond = np.maximum(values - high, 0.0) + np.maximum(low - values, 0.0)
    return float(beyond.mean() / (high - low)) if high > low else float("inf")


def reduce_frame(ds: pydicom.Dataset, factor: int, decode_full: Callable[[], np.ndarray], *,
                 clip: tuple[float, float] | None = None, out: tuple[int, int] | None = None) -> ReducedFrame:
    """One single-frame image's stored values reduced by about ``factor`` (at least 2), or raise
    :class:`NotReduced` (or ``decode_full``'s Quarantined).

    Parameters
    ----------
    ds : pydicom.Dataset
        A parsed file whose header was checked (photometric, size) by the caller.
    factor : int
        The wanted reduction (:func:`reduction_factor`).
    decode_full : callable
        Returns the full-resolution stored values (the full path's decoder); used where no
        reduced decoder applies, before :func:`area_mean`.
    clip : (float, float), optional
        The stored values beyond which the display's window clips
        (:func:`dicomflow.dicom.display.window_bounds`). Averaging commutes with the affine
        display steps but not with that clip: full-resolution values are clipped before they
        are averaged, and a codec's reduced image with values beyond them is not used (its
        low-pass mixed clipped and unclipped values: at a body's outline in a CT window, tens of
        grey levels off). None for a grayscale image: no window, the frame's own range is
        stretched, whose extremes only the full resolution has.
    out : (int, int), optional
        The full path's fitted size (rows, columns): where the frame is decoded in full, the
        output's pixels are averaged from it directly (:func:`box_sums`).

    Returns
    -------
    ReducedFrame
        Stored values averaged over about ``factor`` x ``factor`` source pixels.

    Raises
    ------
    NotReduced
        Multi-frame, PALETTE COLOR (its lookup tables index integers), or a source the checks
        below do not vouch for.
    """
    photometric = ds.PhotometricInterpretation
    if photometric == "PALETTE COLOR":
        raise NotReduced("palette_color")
    syntax = ds.file_meta.get("TransferSyntaxUID")
    grayscale = int(ds.get("SamplesPerPixel", 1) or 1) == 1
    declined = ""
    if syntax in JPEG2000_SYNTAXES + JPEG_SYNTAXES:
        try:
            if grayscale and clip is None:
                raise NotReduced("no_window")
            values, done, offset, how = (decode_jpeg2000 if syntax in JPEG2000_SYNTAXES else decode_jpeg)(ds, factor)
            # A low-pass sample beyond the window may have mixed clipped and unclipped pixels,
            # which the clip after it gets wrong: where much of the image lies beyond the window
            # (the air around a CT body: tens of grey levels off at its outline), not used.
            if clip is not None and window_excursion(values, clip) > LOWPASS_MAX_EXCURSION:
                raise NotReduced("window_clips")
            rest = factor // done  # what the codec's own levels did not reach, as block averages
            return ReducedFrame(area_mean(values, rest), done * rest, offset, None, how)
        except NotReduced as err:
            declined = err.reason
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError):
            # The full decoder runs, and says in its own words what is wrong with a damaged file.
            declined = "codec_failed"
    stored = decode_full()
    if stored.ndim != (2 if grayscale else 3):
        raise NotReduced("frame_shape")
    # The extremes of the full frame: the display of a file without a window stretches them.
    stored_range = (float(stored.min()), float(stored.max())) if grayscale else None
    if clip is not None and stored_range is not None and clip[0] <= stored_range[0] and stored_range[1] <= clip[1]:
        clip = None  # nothing to clip: the window spans the frame's values
    if clip is not None:
        clipped = stored.astype(np.float32)
        np.clip(clipped, clip[0], clip[1], out=clipped)
        stored = clipped
    if out is not None:
        # Decoded in full anyway: the output's pixels straight away, each the mean of exactly the
        # source pixels the full path's box filter averages, so only the display steps differ
        # (their order: affine, which commutes with the mean once the clip is done).
        fitted = box_sums(stored, (stored.shape[0], out[0]), (stored.shape[1], out[1]))
        if fitted is not None:
            return ReducedFrame(fitted, 1, 0, stored_range, "area", declined, fitted=True)
    return ReducedFrame(area_mean(stored, factor), factor, 0, stored_range, "area", declined)


def _frame_bytes(ds: pydicom.Dataset) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def jpeg2000_header(codestream: bytes) -> dict:
    """The fields of a JPEG 2000 codestream's main header that reduced decoding depends on:
    ``precision`` and ``signed`` of the first component, ``components``, ``origin`` (XOsiz,
    YOsiz), ``levels`` (decomposition levels of the COD marker), ``complete`` (ends with EOC).

    Raises
    ------
    NotReduced
        Not a bare codestream (a JP2 wrapper) or a header without SIZ and COD.
    """
    if codestream[:2] != _SOC:
        raise NotReduced("jpeg2000_header")
    found, at = {}, 2
    while at + 4 <= len(codestream) and not {"precision", "levels"} <= found.keys():
        marker, length = int.from_bytes(codestream[at:at + 2], "big"), int.from_bytes(codestream[at + 2:at + 4], "big")
        body = codestream[at + 4:at + 2 + length]
        if marker == _SIZ and len(body) >= 39:
            found["origin"] = (int.from_bytes(body[10:14], "big"), int.from_bytes(body[14:18], "big"))
            found["components"] = int.from_bytes(body[34:36], "big")
            ssiz = body[36]
            found["precision"], found["signed"] = (ssiz & 0x7F) + 1, bool(ssiz & 0x80)
        elif marker == _COD and len(body) >= 6:
            found["levels"] = body[5]
        elif marker < 0xFF30 or marker == 0xFF90:  # not a marker segment, or the first tile: no COD
            break
        at += 2 + length
    if not {"precision", "levels"} <= found.keys():
        raise NotReduced("jpeg2000_header")
    # The end-of-codestream marker, before the byte an encoder may pad an odd length with.
    found["complete"] = _EOC in codestream[-4:]
    return found


def decode_jpeg2000(ds: pydicom.Dataset, factor: int, *, min_level: int = 1) -> tuple[np.ndarray, int, int, str]:
    """A JPEG 2000 frame at a resolution level :data:`JPEG2000_SPARE_LEVELS` finer than
    ``factor`` allows, at least ``min_level`` (0: full resolution).

    Pillow's OpenJPEG plugin, because it exposes OpenJPEG's ``reduce`` (decode up to a
    resolution level, skipping the finer sub-bands' entropy decoding); pylibjpeg-openjpeg, which
    pydicom uses for the full path, has no such option. Measured on a 2048 x 2500 12-bit lossless
    codestream: full 0.79 s, ``reduce = 3`` 0.011 s (issue 33). A codestream with fewer levels is
    decoded at its deepest and block-averaged for the rest.

    Returns
    -------
    tuple
        (stored values as integers, the factor reached, the low-pass shift, "jpeg2000").

    Raises
    ------
    NotReduced
        Below ``min_level``; where Pillow's output would need corrections pydicom makes (precision or sign differing
        from the header, an image offset, a codestream cut short, colour other than 8-bit RGB,
        YBR_ICT or YBR_RCT).
    OSError
        OpenJPEG cannot decode it (the caller then runs the full decoder).
    """
    codestream = _frame_bytes(ds)
    header = jpeg2000_header(codestream)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    signed = bool(int(ds.get("PixelRepresentation", 0) or 0))
    if not header["complete"]:  # the full decoder reports the truncation
        raise NotReduced("jpeg2000_truncated")
    if header["origin"] != (0, 0) or header["components"] != samples:
        raise NotReduced("jpeg2000_layout")
    if header["precision"] != int(ds.BitsStored) or header["signed"] != signed or header["precision"] > 16:
        raise NotReduced("jpeg2000_precision")
    if samples == 3 and (ds.PhotometricInterpretation not in ("RGB", "YBR_ICT", "YBR_RCT") or header["precision"] != 8):
        raise NotReduced("jpeg2000_colour")
    # JPEG2000_SPARE_LEVELS finer than the factor allows: see there.
    level = max(0, min(int(math.log2(factor)) - JPEG2000_SPARE_LEVELS, header["levels"]))
    if level < min_level:  # nothing to skip: the full decode and exact block sums do better
        raise NotReduced("jpeg2000_level_0")
    image = Image.open(io.BytesIO(codestream))
    image.reduce = level  # OpenJPEG's cp_reduce: decode up to this level
    image.load()
    values = np.asarray(image)
    if samples == 3:
        if image.mode != "RGB":
            raise NotReduced("jpeg2000_colour")
        return values, 1 << level, (1 << level) // 2, "jpeg2000"
    # Pillow scales samples to its mode's depth and offsets signed ones to unsigned (Jpeg2KDecode.c):
    # undone here, exactly (checked against pydicom's decoder at level 0 in the tests).
    depth = {"L": 8, "I;16": 16, "I;16L": 16}.get(image.mode)
    if depth is None or header["precision"] > depth:
        raise NotReduced("jpeg2000_mode")
    unscaled = values.astype(np.int32) >> (depth - header["precision"])
    if signed:
        unscaled -= 1 << (header["precision"] - 1)
    return unscaled, 1 << level, (1 << level) // 2, "jpeg2000"


def decode_jpeg(ds: pydicom.Dataset, factor: int) -> tuple[np.ndarray, int, int, str]:
    """An 8-bit JPEG baseline frame decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT
    scaling.

    Pillow, because its JPEG plugin wraps libjpeg-turbo and exposes the scaling as ``draft``
    (pylibjpeg-libjpeg, pydicom's decoder, has none). The scaled IDCT's output pixel is the mean
    of its block's pixels, up to the lossy codec's own error.

    Raises
    ------
    NotReduced
        Colour stored as RGB (pydicom decides whether libjpeg converts its colour from the
        markers and the header; Pillow decides otherwise), other than 8 bits, or a mode other
        than L or RGB.
    OSError
        libjpeg cannot decode it.
    """
    photometric, samples = ds.PhotometricInterpretation, int(ds.get("SamplesPerPixel", 1) or 1)
    if int(ds.BitsStored) != 8 or (samples == 3 and photometric not in ("YBR_FULL", "YBR_FULL_422")):
        raise NotReduced("jpeg_colour" if samples == 3 else "jpeg_precision")
    image = Image.open(io.BytesIO(_frame_bytes(ds)))
    mode = "L" if samples == 1 else "RGB"
    scale = min(8, 1 << int(math.log2(factor)))
    cols, rows = image.size
    image.draft(mode, (math.ceil(cols / scale), math.ceil(rows / scale)))
    if image.mode != mode:
        raise NotReduced("jpeg_mode")
    done = round(cols / image.size[0])
    if done not in (1, 2, 4, 8) or math.ceil(cols / done) != image.size[0] or math.ceil(rows / done) != image.size[1]:
        raise NotReduced("jpeg_scale")
    image.load()
    return np.asarray(image), done, 0, "jpeg"
