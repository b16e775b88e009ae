"""Text burned into the pixels: found cheaply, read with Tesseract, judged against the study's identifiers.

The header cannot say what is drawn in an image (older CR/DX units and secondary captures burn the
patient's name into a corner without setting Burned In Annotation), so every frame is read:

1. :func:`candidate_boxes` finds text-like regions in a few cheap passes over the whole frame:
   a morphological top-hat and black-hat (structures thinner than :data:`STROKE_KERNEL`, brighter
   or darker than their surroundings by :data:`MIN_CONTRAST` of the frame's range: strokes, not
   anatomy), letters joined into lines on a reduced mask, lines kept by height and shape.
2. :class:`TextReader` reads only those regions with Tesseract (through ``tesserocr``, which keeps
   one engine loaded per process: a crop costs milliseconds, a whole-image pass seconds), each
   crop turned dark-on-light and scaled so that its letters are :data:`READ_HEIGHT` pixels tall.
3. :func:`judge` decides per region: a region whose words match an identifying value of the
   sources (the leak scanner's folding and matching, :class:`~dicomflow.deid.identifiers.Identifiers`,
   with the letters OCR confuses read both ways), a date, a long number or a labelled field
   ("NAME:", "DOB", "MRN") is blanked; with ``any`` every region that reads as text is. Laterality
   and view labels ("L", "PA", "PORTABLE") match none of these and are kept.

The words read are PHI: a :class:`TextRegion` never shows them (``repr``), and a judgement names the
kind of value that matched ("(0010,0010) Patient's Name"), never the value.

Why not a library: Presidio's image redactor runs OCR over the whole image (seconds per
radiograph) and recognises identifiers by generic patterns, not the study's own values; RSNA CTP's
pixel anonymizer blanks fixed regions per scanner model; text detectors that do better than
morphology (EAST, DBNet, CRAFT) need downloaded weights.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dicomflow.deid.identifiers import Identifiers, dates_in, fold
from dicomflow.errors import SettingsError

STROKE_KERNEL = 17  # px: wider than the strokes of 40-px text, narrower than most anatomy
MIN_CONTRAST = 60  # of 255 (the frame's range): burned-in text is drawn to stand out
TEXT_HEIGHT = (7, 96)  # px: a line's height, from 14-px type's lower case to 64-px capitals
LONGEST_RUN = 160  # px: an unbroken horizontal run of stroke longer than this is not text
PANEL_TOLERANCE = 12  # of 255: a text panel's fill is this close to the frame's lightest or darkest value
JOIN_WIDTH = 40  # px: strokes this close along a line are one line
READ_HEIGHT = 40  # px: Tesseract reads best with letters about this tall
MAX_REGIONS_PER_FRAME = 60  # beyond this a frame is texture, not text: read the most text-like
SURE_CONFIDENCE = 60  # of 100: a reading less sure than this is tried in the other polarity
CLEARLY_SURER = 15  # of 100: what the other polarity's reading must add to be taken
MIN_WORD_CONFIDENCE = 50  # of 100: below it a "word" of ``any`` mode is noise read as letters
TESSDATA_DIRS = ("/usr/share/tesseract-ocr/5/tessdata", "/usr/share/tesseract-ocr/4.00/tessdata",
                 "/usr/share/tessdata", "/usr/local/share/tessdata")

# Words that label an identifying field: a region holding one is identifying whatever follows.
FIELD_LABELS = frozenset({"name", "patient", "pat", "dob", "birth", "born", "mrn", "id", "accession",
                          "acc", "ssn", "nhs", "address", "phone", "tel"})
MIN_ID_DIGITS = 6  # a number this long, unlabelled, is an ID (doses, sizes and times are shorter)
# Letters and digits OCR takes for one another: words are matched as read and with these undone.
_AS_DIGIT = str.maketrans({"o": "0", "q": "0", "d": "0", "i": "1", "l": "1", "|": "1", "z": "2",
                           "s": "5", "b": "8", "g": "9", "t": "7"})
_AS_LETTER = str.maketrans({"0": "o", "1": "l", "2": "z", "5": "s", "8": "b", "6": "g", "|": "l"})
_TOKEN = re.compile(r"[^\s,;:]+")


@dataclass(frozen=True)
class TextRegion:
    """A region read as text: ``frame`` (None: every frame), ``box`` (top, left, bottom, right;
    bottom and right exclusive) in pixels, the ``words`` read (PHI: never shown) with their mean
    ``confidence``."""

    frame: int | None
    box: tuple[int, int, int, int]
    words: tuple[str, ...] = field(repr=False)
    confidence: float = 0.0

    def where(self) -> str:
        """``"frame 0 rows 60-98 columns 40-260"``: the region, for audits and errors."""
        top, left, bottom, right = self.box
        frame = "every frame" if self.frame is None else f"frame {self.frame}"
        return f"{frame} rows {top}-{bottom} columns {left}-{right}"


@dataclass(frozen=True)
class Judgement:
    """What :func:`judge` decided for one region: ``blank`` or not, and ``why``: the kind of
    value that matched ("(0010,0020) Patient ID", "date", "text": "a {why} value" reads as a
    sentence), never the value."""

    region: TextRegion
    blank: bool
    why: str = ""


def frames_of(pixels: np.ndarray, *, n_frames: int) -> np.ndarray:
    """``pixels`` (as pydicom's ``pixel_array`` returns them) as (frames, rows, columns[, samples])."""
    return pixels if n_frames > 1 else pixels[None]


def read_frames(frames: np.ndarray, reader: TextReader | None = None) -> list[TextRegion]:
    """Every text region of every frame: candidates found (:func:`candidate_boxes`) and read
    (:class:`TextReader`); a region that reads as nothing is left out."""
    reader = reader or text_reader()
    regions = []
    for index, frame in enumerate(frames):
        gray = display_gray(frame)
        for box, light_text in candidate_boxes(gray) if gray is not None else ():
            words, confidence = reader.read(gray, box, light_text=light_text)
            if words:
                regions.append(TextRegion(index, box, words, confidence))
    return regions


def display_gray(frame: np.ndarray) -> np.ndarray | None:
    """One frame as 8-bit gray over its own range (colour as luminance), or None when flat.

    The stored values are scaled linearly from their minimum to their maximum, with no window:
    burned-in text is written at or near the extreme values, which a window would clip together
    with the bright anatomy around it."""
    values = frame.astype(np.float32)
    if values.ndim == 3:
        values = values[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return None
    return ((values - low) * (255.0 / (high - low))).astype(np.uint8)


def candidate_boxes(gray: np.ndarray) -> list[tuple[tuple[int, int, int, int], bool]]:
    """Text-like regions of an 8-bit frame, as ((top, left, bottom, right), light_text), most
    text-like first, at most :data:`MAX_REGIONS_PER_FRAME`.

    Strokes are what a top-hat (light text) or black-hat (dark text) with a
    :data:`STROKE_KERNEL`-pixel square leaves at :data:`MIN_CONTRAST` or more; letters are joined
    into lines on a mask reduced so that its side is about 512 px (the joining is most of the cost
    at full size), then each line's box is taken from the full-size mask again."""
    import cv2

    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (STROKE_KERNEL, STROKE_KERNEL))
    scale = max(1, min(gray.shape) // 512)
    tall = cv2.getStructuringElement(cv2.MORPH_RECT, (1, TEXT_HEIGHT[1] // scale + 1))
    long = cv2.getStructuringElement(cv2.MORPH_RECT, (LONGEST_RUN // scale + 1, 1))
    found: list[tuple[float, tuple[int, int, int, int], bool]] = []
    for light_text, operation in ((True, cv2.MORPH_TOPHAT), (False, cv2.MORPH_BLACKHAT)):
        _, strokes = cv2.threshold(cv2.morphologyEx(gray, operation, kernel), MIN_CONTRAST - 1, 255,
                                   cv2.THRESH_BINARY)
        reduced = strokes
        if scale > 1:  # any stroke pixel in a cell marks the cell (255 / scale² averages above 0)
            reduced = cv2.resize(strokes, (gray.shape[1] // scale, gray.shape[0] // scale),
                                 interpolation=cv2.INTER_AREA)
            _, reduced = cv2.threshold(reduced, 0, 255, cv2.THRESH_BINARY)
        # A thin structure taller than any line (a spine, a tube, a collimator's edge) or much
        # longer than any word (the strip between two rows of text panels, a rule) is no
        # stroke, and would join every line beside it into one region: found on the reduced
        # mask (a long kernel costs its length per pixel), taken out of both.
        other = cv2.morphologyEx(reduced, cv2.MORPH_OPEN, tall) | cv2.morphologyEx(reduced, cv2.MORPH_OPEN, long)
        reduced = reduced - other
        if scale > 1 and other.any():
            strokes[cv2.resize(other, (reduced.shape[1] * scale, reduced.shape[0] * scale),
                               interpolation=cv2.INTER_NEAREST) > 0] = 0
        elif scale == 1:
            strokes = reduced
        # Letters and words of one line joined (a monospaced 40-px type's space is 24 px), lines
        # never: the joining runs along the line only.
        join = max(3, JOIN_WIDTH // scale)
        lines = cv2.morphologyEx(reduced, cv2.MORPH_CLOSE,
                                 cv2.getStructuringElement(cv2.MORPH_RECT, (join, 1)))
        count, _, stats, _ = cv2.connectedComponentsWithStats(lines, connectivity=8)
        for x, y, w, h, _ in stats[1:count]:
            if h * scale < TEXT_HEIGHT[0]:
                continue
            for box in _lines(strokes, y * scale, x * scale, (y + h) * scale, (x + w) * scale):
                if text_like := _text_like(gray, strokes, box, light_text=light_text):
                    found.append((text_like, box, light_text))
    found += _panels(gray, scale)
    found.sort(key=lambda item: -item[0])
    kept: list[tuple[tuple[int, int, int, int], bool]] = []
    for _, box, light_text in found:
        if len(kept) < MAX_REGIONS_PER_FRAME and all(_overlap(box, other) < 0.5 for other, _ in kept):
            kept.append((box, light_text))
    return [(_padded(box, gray.shape), light_text) for box, light_text in kept]


def _panels(gray: np.ndarray, scale: int) -> list[tuple[float, tuple[int, int, int, int], bool]]:
    """Text panels: rectangles at the frame's lightest (darkest) value, a line or a few tall,
    holding the darker (lighter) strokes of their text, as (how text-like, box, light_text).
    Ultrasound units write each field on a panel of its own drawn tight around it; panels side
    by side and row above row leave strips too thin between them for the strokes of one line
    to stand apart from the next."""
    import cv2

    small = gray if scale == 1 else cv2.resize(gray, (gray.shape[1] // scale, gray.shape[0] // scale),
                                               interpolation=cv2.INTER_AREA)
    panels = []
    for light_text, flat in ((False, small >= 255 - PANEL_TOLERANCE), (True, small <= PANEL_TOLERANCE)):
        count, _, stats, _ = cv2.connectedComponentsWithStats(flat.astype(np.uint8), connectivity=4)
        for x, y, w, h, area in stats[1:count]:
            height, width = h * scale, w * scale
            # Letters cut holes in a panel: it fills most of its box, not all of it.
            if not (TEXT_HEIGHT[0] + 4 <= height <= 2 * TEXT_HEIGHT[1] and width >= 2 * height
                    and 0.5 <= area / (w * h) <= 0.97):
                continue
            panels.append((min(width / height, 12.0) * 0.3,
                           (y * scale, x * scale, (y + h) * scale, (x + w) * scale), light_text))
    return panels


def _lines(strokes: np.ndarray, top: int, left: int, bottom: int, right: int) -> list[tuple[int, int, int, int]]:
    """The lines of a joined region: its stroke rows split where a row has no stroke (lines
    written close together, or a line touching an edge of the anatomy, join into one region),
    each line's box tight around its strokes."""
    rows = np.flatnonzero(strokes[top:bottom, left:right].any(axis=1))
    if rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) > 1)
    starts, ends = np.r_[rows[0], rows[breaks + 1]], np.r_[rows[breaks], rows[-1]]
    boxes = (_tight_box(strokes, top + start, left, top + end + 1, right) for start, end in zip(starts, ends))
    return [box for box in boxes if box is not None]


def _text_like(gray: np.ndarray, strokes: np.ndarray, box: tuple[int, int, int, int], *,
               light_text: bool) -> float:
    """How much ``box`` looks like a line of text (its width-to-height ratio, capped, times the
    share of its pixels in strokes), or 0 when it cannot be one."""
    top, left, bottom, right = box
    height, width = bottom - top, right - left
    if not TEXT_HEIGHT[0] <= height <= TEXT_HEIGHT[1] or width < 0.4 * height:
        return 0.0
    fill = strokes[top:bottom, left:right].mean() / 255
    if not 0.06 <= fill <= 0.75:  # a solid bar or a sparse scatter is not a line of text
        return 0.0
    # Strokes differ from the background around the line: light text's top-hat is its letters,
    # brighter than the ring around it, while its black-hat is the gaps between the letters, as
    # dark as the ring (and so for dark text the other way).
    outer = _padded(box, gray.shape)
    ring = np.ones((outer[2] - outer[0], outer[3] - outer[1]), dtype=bool)
    ring[top - outer[0]:bottom - outer[0], left - outer[1]:right - outer[1]] = False
    # The background is the ring's lighter (darker) side: a panel drawn tight around dark text
    # leaves only part of the ring on the panel.
    around = gray[outer[0]:outer[2], outer[1]:outer[3]][ring]
    background = float(np.percentile(around, 25 if light_text else 75)) if around.size else 0.0
    ink = float(gray[top:bottom, left:right][strokes[top:bottom, left:right] > 0].mean())
    if (ink - background if light_text else background - ink) < MIN_CONTRAST / 2:
        return 0.0
    return min(width / height, 12.0) * fill


def _tight_box(mask: np.ndarray, top: int, left: int, bottom: int, right: int):
    """The bounding box of the mask's pixels inside (top, left, bottom, right), or None."""
    window = mask[top:bottom, left:right]
    rows, cols = np.flatnonzero(window.any(axis=1)), np.flatnonzero(window.any(axis=0))
    if rows.size == 0:
        return None
    return top + int(rows[0]), left + int(cols[0]), top + int(rows[-1]) + 1, left + int(cols[-1]) + 1


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two boxes: a line found in both polarities is one region, while
    a line inside a taller region (lines read together) stays a region of its own."""
    height = min(a[2], b[2]) - max(a[0], b[0])
    width = min(a[3], b[3]) - max(a[1], b[1])
    if height <= 0 or width <= 0:
        return 0.0
    shared = height * width
    return shared / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - shared)


def _padded(box: tuple[int, int, int, int], shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """``box`` grown by a quarter of its height on every side (anti-aliased edges, accents and
    descenders the stroke mask missed), within the frame."""
    top, left, bottom, right = box
    pad = max(2, (bottom - top) // 4)
    return (max(0, top - pad), max(0, left - pad), min(shape[0], bottom + pad), min(shape[1], right + pad))


class TextReader:
    """Tesseract's LSTM engine, loaded once (about 0.1 s) and kept for every crop of the process."""

    def __init__(self, tessdata: Path) -> None:
        import tesserocr

        self._api = tesserocr.PyTessBaseAPI(path=str(tessdata), lang="eng",
                                            psm=tesserocr.PSM.SINGLE_BLOCK,
                                            oem=tesserocr.OEM.LSTM_ONLY)
        # The crops come in the right polarity: Tesseract's own trial of the inverse doubles
        # the cost of every line it is unsure of.
        self._api.SetVariable("tessedit_do_invert", "0")

    def read(self, gray: np.ndarray, box: tuple[int, int, int, int], *,
             light_text: bool) -> tuple[tuple[str, ...], float]:
        """The words in ``box`` of the 8-bit frame ``gray`` and their mean confidence (0-100),
        read as light text on a darker background or the other way (``light_text``); a reading
        below :data:`SURE_CONFIDENCE` is tried in the other polarity too."""
        words, confidence = self._read(gray, box, light_text=light_text)
        if confidence < SURE_CONFIDENCE:
            # The polarity found is right more often than Tesseract's confidence says (a caret
            # or a quote brings a good reading down to 0): the other reading replaces it only
            # when it is clearly surer.
            other = self._read(gray, box, light_text=not light_text)
            if other[1] >= confidence + CLEARLY_SURER:
                words, confidence = other
        return words, confidence

    def _read(self, gray: np.ndarray, box: tuple[int, int, int, int], *,
              light_text: bool) -> tuple[tuple[str, ...], float]:
        import cv2
        from PIL import Image

        # What Tesseract is shown: the strokes alone, dark on white. Its own binarisation (one
        # threshold per crop) fails on text over anatomy, whose background runs from dark to
        # light along a line; the top-hat (black-hat) takes each stroke against its own
        # surroundings, over a window wide enough for the kernel to see the background.
        top, left, bottom, right = box
        margin = STROKE_KERNEL
        window_top, window_left = max(0, top - margin), max(0, left - margin)
        window = gray[window_top:bottom + margin, window_left:right + margin]
        hat = cv2.morphologyEx(window, cv2.MORPH_TOPHAT if light_text else cv2.MORPH_BLACKHAT,
                               cv2.getStructuringElement(cv2.MORPH_RECT, (STROKE_KERNEL, STROKE_KERNEL)))
        hat = hat[top - window_top:bottom - window_top, left - window_left:right - window_left]
        strongest = int(hat.max())
        if strongest < MIN_CONTRAST:
            return (), 0.0
        ink = (255 - hat.astype(np.float32) * (255.0 / strongest)).astype(np.uint8)
        # Letters about READ_HEIGHT px tall (the box's height is a line's and a half, padding).
        factor = min(4.0, READ_HEIGHT / max(1, (bottom - top) * 2 / 3))
        if factor > 1.2 or factor < 0.5:
            ink = cv2.resize(ink, None, fx=factor, fy=factor, interpolation=cv2.INTER_LINEAR)
        self._api.SetImage(Image.fromarray(cv2.copyMakeBorder(ink, 8, 8, 8, 8, cv2.BORDER_CONSTANT, value=255)))
        text = self._api.GetUTF8Text()
        confidences = self._api.AllWordConfidences()
        return tuple(text.split()), (float(np.mean(confidences)) if confidences else 0.0)


def tessdata_dir() -> Path:
    """The folder of Tesseract's English model: ``TESSDATA_PREFIX``, else Debian's folders; a
    SettingsError saying how to install it when there is none."""
    candidates = [os.environ["TESSDATA_PREFIX"]] if os.environ.get("TESSDATA_PREFIX") else []
    for folder in (*candidates, *TESSDATA_DIRS):
        if (Path(folder) / "eng.traineddata").is_file():
            return Path(folder)
    raise SettingsError("reading burned-in text needs Tesseract's English model (eng.traineddata), "
                        f"found in none of {', '.join(candidates + list(TESSDATA_DIRS))}: install "
                        "Debian's tesseract-ocr (`make` does: apt-get install tesseract-ocr) or set "
                        "TESSDATA_PREFIX to the folder holding eng.traineddata")


@functools.cache
def text_reader() -> TextReader:
    """This process's :class:`TextReader` (created on first use). OpenCV is held to one thread:
    files are read a process per core, and its own threads would only compete with them."""
    import cv2

    cv2.setNumThreads(1)
    return TextReader(tessdata_dir())


def judge(regions: Iterable[TextRegion], identifiers: Identifiers, mode: str, *,
          patterns: bool = True) -> list[Judgement]:
    """Blank or keep each region.

    Parameters
    ----------
    regions : iterable of TextRegion
        From :func:`read_frames`.
    identifiers : Identifiers
        The identifying values of the sources (every source's, so another patient's name is
        found too).
    mode : {"identifying", "any"}
        ``identifying``: blank the regions that hold an identifier (:func:`identifying_kind`).
        ``any``: blank every region with a word read at :data:`MIN_WORD_CONFIDENCE` or more.
    patterns : bool
        Whether a date, a long number or a field label is identifying without a source's value
        (:func:`identifying_kind`): so for medical images; not for the project's own plots,
        whose axes and titles are text of that kind.

    Returns
    -------
    list of Judgement
        One per region, in order.
    """
    judged = []
    for region in regions:
        why = identifying_kind(region.words, identifiers, patterns=patterns)
        if not why and mode == "any" and region.confidence >= MIN_WORD_CONFIDENCE:
            why = "text"
        judged.append(Judgement(region, bool(why), why))
    return judged


def identifying_kind(words: tuple[str, ...], identifiers: Identifiers, *, patterns: bool = True) -> str:
    """The kind of identifying value in a line of words read from pixels, or "".

    The words are matched as read and with the letters OCR confuses read as digits (in words
    mostly of digits) or as letters (in the others), so "D0E" is found as "Doe" and "I95O-O3-I4"
    as a date; names of five letters or more also one letter off. Besides the study's own values,
    any date, any number of :data:`MIN_ID_DIGITS` digits or more and any field label
    (:data:`FIELD_LABELS`) is identifying: a header emptied before the file reached us, or another
    patient's name on a reused template, still shows the field (``patterns`` False: the
    study's values only)."""
    text = " ".join(words)
    for reading in _readings(text):
        if source := identifiers.first(reading):
            return source
    folded = fold(text)
    tokens = [token.strip(".-_/'\"()[]") for token in _TOKEN.findall(folded)]
    for token in tokens:
        if len(token) >= 5 and token.isalpha() and (source := _one_letter_off(token, identifiers)):
            return source
        if len(token) >= 6 and token.isalpha() and (source := _two_names_joined(token, identifiers)):
            return source
    if not patterns:
        return ""
    for reading in _readings(text):
        if any(dates_in(fold(reading))):
            return "date"
        if re.search(rf"\d{{{MIN_ID_DIGITS},}}", re.sub(r"[\s\-./]", "", fold(reading))):
            return "long number"
    if any(token in FIELD_LABELS for token in re.findall(r"[a-z]+", folded)):
        return "field label"
    return ""


def _readings(text: str) -> list[str]:
    """``text`` as read, and with OCR's confusions undone word by word: a word of mostly digits
    read as digits, one of mostly letters as letters."""
    folded = fold(text)
    fixed = []
    for token in folded.split():
        digits = sum(c.isdigit() for c in token)
        letters = sum(c.isalpha() for c in token)
        fixed.append(token.translate(_AS_DIGIT) if digits > letters else token.translate(_AS_LETTER))
    return list(dict.fromkeys((text, " ".join(fixed))))


def _one_letter_off(token: str, identifiers: Identifiers) -> str:
    """The source of a name or word of ``identifiers`` one substitution, insertion or deletion
    away from ``token`` (five letters or more), or "".

    Each spelling one edit away is looked up, never the values listed: the identifiers can be
    keyed digests (evaluate's), which answer a lookup and cannot be listed."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    cuts = [(token[:i], token[i:]) for i in range(len(token) + 1)]
    spellings = {head + tail[1:] for head, tail in cuts if tail}
    spellings |= {head + letter + tail[1:] for head, tail in cuts if tail for letter in letters}
    spellings |= {head + letter + tail for head, tail in cuts for letter in letters}
    for spelling in sorted(spellings):
        if len(spelling) >= 5:
            for found in (identifiers.names, identifiers.words):
                if spelling in found:
                    return found[spelling]
    return ""


def _two_names_joined(token: str, identifiers: Identifiers) -> str:
    """The source of two names of ``identifiers`` that ``token`` holds one after the other, with
    or without one character between them: "DOE^JOHN" read as "DOEAJOHN" (OCR takes the caret for
    a letter), or "DOEJOHN"; or ""."""
    for cut in range(3, len(token) - 2):
        first = token[:cut]
        if first in identifiers.names:
            for rest in (token[cut:], token[cut + 1:]):
                if rest in identifiers.names:
                    return identifiers.names[first]
    return ""


def blank(frames: np.ndarray, boxes: Iterable[tuple[int, int, int, int]]) -> None:
    """Set each box (top, left, bottom, right) of every frame to the lowest value of the frames
    (every sample of a colour pixel), in place."""
    low = frames.min()
    for top, left, bottom, right in boxes:
        frames[:, top:bottom, left:right] = low
