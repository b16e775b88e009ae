"""A corpus of DICOM images with identifiers burned into their pixels, and where each was drawn.

For measuring the burned-in text reader (:mod:`dicomflow.deid.burned_in`) against ground truth
(``bench/burned_in.py``). Every image is a pydicom dataset whose header carries the values drawn
(PatientName, PatientID, PatientBirthDate, StudyDate, AccessionNumber), so the reader's
identifiers come from the header as in the pipeline. Deterministic from a seed: image ``i``
depends only on (seed, i), so a smaller corpus is the start of a larger one.

Kinds of image (:data:`KINDS`, in turn):

* ``CR``, ``DX``: radiographs, 12 bits, MONOCHROME2 or MONOCHROME1, 1024x1024 to 2500x2048
  (rows x columns), chest-like anatomy (the sample's phantom), a lead side marker "L" or "R"
  (not an identifier) and sometimes a view label ("PA", "PORTABLE", "SUPINE");
* ``US``: 8-bit gray or ``US-RGB`` colour, 640x480 or 800x600, a speckled sector and a top text
  band with the identifiers and settings labels ("5C1 12cm 30Hz"); ``US-cine``: a few frames
  whose speckle changes and whose text stays put;
* ``SC``: a secondary capture, a screen with a title bar, an image panel and side labels;
* each kind also ``clean``: no identifier drawn, some with non-identifying labels only.

Text varies in font (Pillow's default at each size, and the DejaVu and Liberation fonts found
in /usr/share/fonts/truetype), size (14-40 px, the font's em size), corner and position,
polarity (``light`` text on the image, ``light-boxed`` on a dark box, ``dark-boxed`` on a light
box), name format ("DOE^JOHN", "Doe, John", "JOHN DOE"), date format (1950-03-14, 14.03.1950,
03/14/1950, 19500314) and label ("MRN: ", "ID ", "DOB: ", none).

:func:`plant_on_real` draws a study's own identifiers onto a copy of a real image (the
ultrasound files of ``deid-data``) in a part of it that is blank.

Ground truth (:class:`Drawn`): per text item its kind, whether it identifies, its ink box (top,
left, bottom, right; bottom and right exclusive) and ink mask (pixels the glyphs cover by half or
more and change by a quarter of the display range or more: white text over the sample phantom's
bright lead marker block is not ink), font, size and polarity. The drawn text is kept for tests (``repr`` hides it);
the names are fake.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomflow.devtools.sample_data import render_chest_phantom

FONT_DIR = Path("/usr/share/fonts/truetype")
FONT_FILES = ("dejavu/DejaVuSans.ttf", "dejavu/DejaVuSerif.ttf", "dejavu/DejaVuSansMono.ttf",
              "dejavu/DejaVuSans-Bold.ttf", "dejavu/DejaVuSansCondensed.ttf",
              "liberation/LiberationSans-Regular.ttf", "liberation/LiberationSerif-Regular.ttf",
              "liberation/LiberationMono-Regular.ttf", "liberation/LiberationSansNarrow-Regular.ttf")
DEFAULT_FONT = "Pillow default"
SIZES = (14, 40)  # px, the em size, both included
KINDS = ("CR", "DX", "US", "US-RGB", "SC", "CR", "DX", "US-cine", "US", "SC")
CLEAN_EVERY = 7  # every seventh image is clean (no identifier drawn); 7 and len(KINDS) are coprime
RADIOGRAPH_SHAPES = ((1024, 1024), (1536, 1536), (2048, 2048), (2500, 2048), (2500, 2048))
US_SHAPES = ((480, 640), (600, 800))
SC_SHAPES = ((768, 1024), (1024, 1280))
POLARITIES = ("light", "light-boxed", "dark-boxed")
NAME_FORMATS = ("DOE^JOHN", "Doe, John", "JOHN DOE")
DATE_FORMATS = ("%Y-%m-%d", "%d.%m.%Y", "%m/%d/%Y", "%Y%m%d")
ID_LABELS = ("MRN: ", "ID ", "")
BIRTH_LABELS = ("DOB: ", "DOB ", "")
ACCESSION_LABELS = ("ACC ", "Acc#: ", "")
VIEW_LABELS = ("PA", "AP", "PORTABLE", "SUPINE", "ERECT")
US_SETTINGS = ("5C1 12cm 30Hz", "L12-5 4cm 36Hz", "C5-1 16cm 19fps", "TIS0.4 MI 1.1", "2D 60%")
SC_LABELS = ("PORTABLE", "SUPINE", "PA", "W 400 L 40", "Zoom 1.0")
FIELDS = ("name", "id", "birth_date", "study_date", "accession")
FAMILY = ("HALVORSEN", "OKONKWO", "VASQUEZ", "BRANDT", "KOWALCZYK", "LINDQVIST", "MARCHETTI",
          "ABERNATHY", "DUBROVSKY", "FAIRWEATHER", "NAKAMURA", "OYELARAN", "PETRAKIS", "QUINTANILLA",
          "RASMUSSEN", "SZABO", "THORNBURY", "UGARTE", "WAINWRIGHT", "YILMAZ", "ZIELINSKI", "LUND",
          "ODA", "BELLAMY", "CASTELLANO", "ACHTERBERG")
GIVEN = ("ASTRID", "BENEDIKT", "CORDELIA", "DMITRI", "EVANGELINE", "FARIDA", "GUNNAR", "HORTENSE",
         "IGNATIUS", "JOSEFINA", "KASIMIR", "LEOCADIA", "MATTHIAS", "NERISSA", "OSWIN", "PERPETUA",
         "QUENTIN", "ROSALIND", "SEVERIN", "THEODORA", "IDA", "KEN")
SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1",
               "US": "1.2.840.10008.5.1.4.1.1.6.1", "US-cine": "1.2.840.10008.5.1.4.1.1.3.1",
               "SC": "1.2.840.10008.5.1.4.1.1.7"}
INK_ALPHA = 128  # of 255: a pixel is ink where the glyph covers at least half of it
VISIBLE_CHANGE = 0.25  # ... and the ink differs from what is under it by a quarter of the range


@dataclass(frozen=True)
class Drawn:
    """One text item drawn into an image: ``kind`` (a field of :data:`FIELDS`, or ``marker``,
    ``view``, ``settings`` for non-identifying labels), whether it ``identifies``, its ink ``box``
    (top, left, bottom, right) and ``ink`` mask (box-sized, bool), ``font``, ``size`` (px),
    ``polarity`` and ``form`` (the name or date format, the label). ``text`` is what was drawn
    (hidden from ``repr``)."""

    kind: str
    identifies: bool
    box: tuple[int, int, int, int]
    ink: np.ndarray = field(repr=False, compare=False)
    text: str = field(repr=False)
    font: str = DEFAULT_FONT
    size: int = 0
    polarity: str = "light"
    form: str = ""  # how the value is written: "DOE^JOHN", "DD.MM.YYYY", "label MRN:", ...


@dataclass
class CorpusImage:
    """One image of the corpus: file ``name``, ``kind`` (:data:`KINDS`, or ``real`` for
    deid-data's), ``clean`` (no identifier drawn) and what was drawn."""

    name: str
    kind: str
    clean: bool
    drawn: list[Drawn]
    rows: int
    columns: int
    frames: int = 1
    source: str = ""  # the deid-data file a real image comes from

    @property
    def planted(self) -> list[Drawn]:
        return [item for item in self.drawn if item.identifies]

    @property
    def labels(self) -> list[Drawn]:
        return [item for item in self.drawn if not item.identifies]


def available_fonts() -> list[str]:
    """Pillow's default font and the files of :data:`FONT_FILES` present on this machine."""
    return [DEFAULT_FONT, *(name for name in FONT_FILES if (FONT_DIR / name).is_file())]


def load_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    """A font of :func:`available_fonts` at ``size`` px."""
    if name == DEFAULT_FONT:
        return ImageFont.load_default(size=size)
    return ImageFont.truetype(str(FONT_DIR / name), size)


def render_text(text: str, font_name: str, size: int) -> np.ndarray:
    """``text`` as a tight alpha mask (uint8, 0-255)."""
    font = load_font(font_name, size)
    left, top, right, bottom = font.getbbox(text)
    canvas = Image.new("L", (right - left + 4, bottom - top + 4), 0)
    ImageDraw.Draw(canvas).text((2 - left, 2 - top), text, font=font, fill=255)
    alpha = np.asarray(canvas)
    rows, cols = np.flatnonzero(alpha.any(axis=1)), np.flatnonzero(alpha.any(axis=0))
    return alpha[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


# --- identities ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """A fake patient and study as the header holds them (DICOM forms)."""

    family: str
    given: str
    patient_id: str
    birth: dt.date
    study: dt.date
    accession: str

    @property
    def person_name(self) -> str:
        return f"{self.family}^{self.given}"


def draw_identity(rng: np.random.Generator) -> Identity:
    """A fake patient: name, an MRN of 6-10 digits (some with a letter prefix), dates, accession."""
    digits = int(rng.integers(6, 11))
    mrn = "".join(str(d) for d in rng.integers(0, 10, digits))
    if rng.random() < 0.2:
        mrn = "ABCDEFGHKMNPRSTUVWXYZ"[int(rng.integers(0, 21))] + mrn
    accession = "".join(str(d) for d in rng.integers(0, 10, int(rng.integers(8, 11))))
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 80)))
    study = dt.date(2010, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 15)))
    return Identity(FAMILY[int(rng.integers(len(FAMILY)))], GIVEN[int(rng.integers(len(GIVEN)))],
                    mrn, birth, study, accession)


def field_text(identity: Identity, kind: str, rng: np.random.Generator) -> tuple[str, str]:
    """How one field of ``identity`` is written in the pixels, label included, and its form."""
    if kind == "name":
        form = NAME_FORMATS[int(rng.integers(len(NAME_FORMATS)))]
        family, given = identity.family, identity.given
        if form == "DOE^JOHN":
            return f"{family}^{given}", form
        if form == "Doe, John":
            return f"{family.title()}, {given.title()}", form
        return f"{given} {family}", form
    if kind in ("id", "accession"):
        labels = ID_LABELS if kind == "id" else ACCESSION_LABELS
        label = labels[int(rng.integers(len(labels)))]
        value = identity.patient_id if kind == "id" else identity.accession
        return label + value, _label_form(label)
    date_format = DATE_FORMATS[int(rng.integers(len(DATE_FORMATS)))]
    if kind == "birth_date":
        label = BIRTH_LABELS[int(rng.integers(len(BIRTH_LABELS)))]
        return label + identity.birth.strftime(date_format), _date_form(date_format)
    return identity.study.strftime(date_format), _date_form(date_format)


def _label_form(label: str) -> str:
    return f"label {label.strip()}" if label else "no label"


def _date_form(date_format: str) -> str:
    """``"%d.%m.%Y"`` as ``"DD.MM.YYYY"``."""
    return date_format.replace("%Y", "YYYY").replace("%m", "MM").replace("%d", "DD")


def _fields(rng: np.random.Generator) -> list[str]:
    """Which fields an image shows: always name and ID, often the birth date, sometimes more."""
    chosen = ["name", "id"]
    if rng.random() < 0.8:
        chosen.append("birth_date")
    if rng.random() < 0.5:
        chosen.append("study_date")
    if rng.random() < 0.4:
        chosen.append("accession")
    return chosen


# --- planning: every random draw happens here, so an image can be rendered with or without text ---


@dataclass(frozen=True)
class _Item:
    """A text item placed: where its ink's top left goes and how it looks."""

    kind: str
    identifies: bool
    text: str
    font: str
    size: int
    polarity: str
    top: int
    left: int
    colour: tuple[float, float, float] = (1.0, 1.0, 1.0)  # of light text on a colour image
    form: str = ""


def _draw_font(rng: np.random.Generator, fonts: list[str]) -> str:
    return fonts[int(rng.integers(len(fonts)))]


def _block(rng: np.random.Generator, texts: list[tuple[str, bool, str, str]], *, fonts: list[str],
           size: int, polarity: str, shape: tuple[int, int], corner: str, margin: int,
           font: str | None = None) -> list[_Item]:
    """Lines of text stacked in ``corner`` ("tl", "tr", "bl", "br", "tc", "bc") of an image."""
    font = font or _draw_font(rng, fonts)
    masks = [render_text(text, font, size) for _, _, text, _ in texts]
    step = int(size * 1.35)
    height = step * (len(texts) - 1) + masks[-1].shape[0]
    rows, cols = shape
    top = margin if corner[0] == "t" else rows - margin - height
    items = []
    for index, ((kind, identifies, text, form), mask) in enumerate(zip(texts, masks)):
        width = mask.shape[1]
        if corner[1] == "l":
            left = margin
        elif corner[1] == "r":
            left = cols - margin - width
        else:
            left = (cols - width) // 2
        items.append(_Item(kind, identifies, text, font, size, polarity, top + index * step,
                           max(0, left), form=form))
    return items


def _fits(items: list[_Item], shape: tuple[int, int]) -> bool:
    for item in items:
        mask = render_text(item.text, item.font, item.size)
        pad = max(3, item.size // 3)
        if (item.top - pad < 0 or item.left - pad < 0 or item.top + mask.shape[0] + pad > shape[0]
                or item.left + mask.shape[1] + pad > shape[1]):
            return False
    return True


# --- backgrounds ------------------------------------------------------------------------------------


def _chest(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A chest radiograph's display values in [0, 1] (bright = dense): the sample's phantom at a
    quarter of the size, interpolated, plus full-size noise."""
    small = render_chest_phantom(rng, max(64, rows // 4), max(64, cols // 4), nodule=None)
    image = np.asarray(Image.fromarray(small.astype(np.float32), mode="F").resize(
        (cols, rows), Image.Resampling.BILINEAR), dtype=np.float32)
    noise = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(rng.uniform(0.008, 0.02))
    return np.clip(image + noise, 0.0, 1.0)


def _sector(rng: np.random.Generator, rows: int, cols: int, *, frames: int) -> np.ndarray:
    """Ultrasound frames (frames, rows, cols) in [0, 1]: black, a speckled fan below a top band."""
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    apex_y, apex_x = rows * 0.12, cols * 0.5
    radius = np.hypot(y - apex_y, x - apex_x)
    angle = np.arctan2(x - apex_x, y - apex_y)
    half = np.float32(rng.uniform(0.5, 0.75))
    fan = (radius > rows * 0.04) & (radius < rows * 0.85) & (np.abs(angle) < half)
    depth = np.clip(1.0 - radius / (rows * 0.9), 0.2, 1.0)
    out = np.zeros((frames, rows, cols), dtype=np.float32)
    for index in range(frames):
        speckle = rng.rayleigh(0.25, (rows, cols)).astype(np.float32)
        out[index] = np.clip(speckle * depth * fan, 0.0, 0.85)
    return out


def _screen(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """A secondary capture's screen in [0, 1]: dark background, a title bar, an image panel."""
    screen = np.full((rows, cols), np.float32(rng.uniform(0.08, 0.2)), dtype=np.float32)
    bar = int(rows * 0.07)
    screen[:bar] = np.float32(rng.uniform(0.25, 0.4))
    top, left = int(rows * 0.15), int(cols * 0.22)
    height, width = int(rows * 0.7), int(cols * 0.56)
    screen[top:top + height, left:left + width] = _chest(rng, height, width)
    return screen


# --- rendering ----------------------------------------------------------------------------------


def _render(frames: np.ndarray, items: list[_Item], *, draw: bool, colour: bool,
            scale: float = 1.0) -> list[Drawn]:
    """Draw ``items`` into ``frames`` (frames, rows, cols[, 3]) in place when ``draw``; return
    their ground truth either way. ``frames`` hold display values times ``scale`` (1.0: floats in
    [0, 1]; 255.0: 8-bit pixels, rounded when written back)."""
    drawn = []
    for item in items:
        alpha = render_text(item.text, item.font, item.size).astype(np.float32) / 255.0
        height, width = alpha.shape
        top, left = item.top, item.left
        boxed = item.polarity in ("light-boxed", "dark-boxed")
        shade = 0.0 if item.polarity == "light-boxed" else 0.92
        ink = (0.03, 0.03, 0.03) if item.polarity == "dark-boxed" else item.colour
        gray_ink = np.float32(0.299 * ink[0] + 0.587 * ink[1] + 0.114 * ink[2])
        # What lies under the glyphs (the box, or the image), as luminance of the first frame.
        under = frames[0, top:top + height, left:left + width].astype(np.float32) / scale
        if under.ndim == 3:
            under = under @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        if boxed:
            under = np.full_like(under, shade)
        # Ink: covered by at least half and visibly changed (light text over a bright lead
        # marker is no more legible to a reader than to anyone).
        visible = (alpha >= INK_ALPHA / 255.0) & (np.abs(gray_ink - under) >= VISIBLE_CHANGE)
        if draw:
            if boxed:
                pad = max(3, item.size // 4)
                frames[:, max(0, top - pad):top + height + pad,
                       max(0, left - pad):left + width + pad] = np.round(shade * scale)
            region = frames[:, top:top + height, left:left + width].astype(np.float32) / scale
            if colour:
                value = np.array(ink, dtype=np.float32)
                mixed = region * (1 - alpha[None, :, :, None]) + value * alpha[None, :, :, None]
            else:
                mixed = region * (1 - alpha[None]) + gray_ink * alpha[None]
            frames[:, top:top + height, left:left + width] = (
                mixed if scale == 1.0 else np.round(mixed * scale))
        drawn.append(Drawn(item.kind, item.identifies, (top, left, top + height, left + width),
                           visible, item.text, item.font, item.size, item.polarity, item.form))
    return drawn


def _rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, index])


def _uid(seed: int, role: str, index: int) -> str:
    digest = hashlib.sha256(f"burned-in-corpus/{seed}/{role}/{index}".encode()).digest()
    return f"2.25.{int.from_bytes(digest[:15], 'big')}"


def make_image(index: int, *, seed: int = 0, draw: bool = True) -> tuple[FileDataset, CorpusImage]:
    """Image ``index`` of the corpus of ``seed``: its dataset and ground truth.

    ``draw=False`` renders the same image without its text (and without the boxes behind it),
    for checking the ground truth against the pixels; the truth returned is the same.
    """
    rng = _rng(seed, index)
    kind = KINDS[index % len(KINDS)]
    clean = index % CLEAN_EVERY == CLEAN_EVERY - 1
    identity = draw_identity(rng)
    fonts = available_fonts()
    colour = kind == "US-RGB" or (kind == "SC" and rng.random() < 0.5)
    n_frames = int(rng.integers(3, 6)) if kind == "US-cine" else 1

    if kind in ("CR", "DX"):
        shape = RADIOGRAPH_SHAPES[int(rng.integers(len(RADIOGRAPH_SHAPES)))]
        image = _chest(rng, *shape)[None]
        size_range = SIZES
    elif kind == "SC":
        shape = SC_SHAPES[int(rng.integers(len(SC_SHAPES)))]
        image = _screen(rng, *shape)[None]
        size_range = (14, 32)
    else:
        shape = US_SHAPES[int(rng.integers(len(US_SHAPES)))]
        image = _sector(rng, *shape, frames=n_frames)
        size_range = (14, 26) if shape[1] == 640 else (14, 30)

    items = _plan_items(rng, kind, clean, identity, fonts, shape, size_range, colour)
    frames = np.repeat(image[..., None], 3, axis=-1) if colour else image.copy()
    drawn = _render(frames, items, draw=draw, colour=colour)
    ds = _dataset(index, seed, kind, identity, frames, rng)
    truth = CorpusImage(f"{index:05d}-{kind}{'-clean' if clean else ''}.dcm", kind, clean, drawn,
                        shape[0], shape[1], n_frames)
    return ds, truth


def _plan_items(rng: np.random.Generator, kind: str, clean: bool, identity: Identity,
                fonts: list[str], shape: tuple[int, int], size_range: tuple[int, int],
                colour: bool) -> list[_Item]:
    """The text items of one image, placed (all random draws for its text)."""
    rows, cols = shape
    items: list[_Item] = []
    polarity = POLARITIES[int(rng.integers(len(POLARITIES)))]
    ink_colour = ((1.0, 1.0, 1.0), (1.0, 0.9, 0.2), (0.3, 1.0, 0.4), (0.3, 0.9, 1.0))[
        int(rng.integers(4))] if colour else (1.0, 1.0, 1.0)
    fields = [] if clean else _fields(rng)
    texts = [(kind_, True, *field_text(identity, kind_, rng)) for kind_ in fields]
    for _ in range(20):  # draw a size and a place until the block fits
        size = int(rng.integers(size_range[0], size_range[1] + 1))
        margin = int(rng.integers(4, max(6, min(rows, cols) // 25)))
        if kind in ("CR", "DX"):
            corner = ("tl", "tr", "bl", "br", "tc", "bc")[int(rng.integers(6))]
        elif kind == "SC":
            corner = ("tl", "tr", "bl")[int(rng.integers(3))]
        else:
            corner = "tl"
        if not texts:
            break
        if kind.startswith("US"):  # the band: fields side by side on one or two lines
            block = _us_band(rng, texts, fonts=fonts, size=size, polarity=polarity, shape=shape,
                             margin=margin)
        else:
            block = _block(rng, texts, fonts=fonts, size=size, polarity=polarity, shape=shape,
                           corner=corner, margin=margin)
        if _fits(block, shape):
            items += [_with_colour(item, ink_colour) for item in block]
            break
    else:
        raise RuntimeError("no place found for the text block")  # sizes are chosen to fit

    # Non-identifying labels, away from the identifiers.
    taken = [_extent(item) for item in items]
    labels: list[tuple[str, str, int]] = []  # (kind, text, size)
    if kind in ("CR", "DX"):
        labels.append(("marker", "LR"[int(rng.integers(2))], int(rng.integers(60, 121)) * min(rows, cols) // 2048 + 20))
        if rng.random() < 0.6:
            labels.append(("view", VIEW_LABELS[int(rng.integers(len(VIEW_LABELS)))], int(rng.integers(20, 41))))
    elif kind.startswith("US"):
        labels.append(("settings", US_SETTINGS[int(rng.integers(len(US_SETTINGS)))], int(rng.integers(14, 21))))
    elif rng.random() < 0.8:
        labels.append(("view", SC_LABELS[int(rng.integers(len(SC_LABELS)))], int(rng.integers(16, 29))))
    for label_kind, text, size in labels:
        font = "dejavu/DejaVuSans-Bold.ttf" if label_kind == "marker" and len(fonts) > 1 else _draw_font(rng, fonts)
        mask = render_text(text, font, size)
        for _ in range(50):
            top = int(rng.integers(8, rows - mask.shape[0] - 8))
            left = int(rng.integers(8, cols - mask.shape[1] - 8))
            if kind.startswith("US"):  # settings stay in the band, right of the identifiers
                top = int(rng.integers(6, max(7, int(rows * 0.1) - mask.shape[0])))
            label_polarity = "light" if label_kind == "marker" else POLARITIES[int(rng.integers(2))]
            extent = (top - 12, left - 30, top + mask.shape[0] + 12, left + mask.shape[1] + 30)
            if all(not _intersects(extent, other) for other in taken):
                item = _Item(label_kind, False, text, font, size, label_polarity, top, left)
                items.append(_with_colour(item, ink_colour))
                taken.append(_extent(item))
                break
    return items


def _with_colour(item: _Item, colour: tuple[float, float, float]) -> _Item:
    return _Item(item.kind, item.identifies, item.text, item.font, item.size, item.polarity,
                 item.top, item.left, colour, item.form)


def _extent(item: _Item) -> tuple[int, int, int, int]:
    mask = render_text(item.text, item.font, item.size)
    pad = max(3, item.size // 4)
    return (item.top - pad, item.left - pad, item.top + mask.shape[0] + pad, item.left + mask.shape[1] + pad)


def _intersects(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _us_band(rng: np.random.Generator, texts: list[tuple[str, bool, str, str]], *, fonts: list[str],
             size: int, polarity: str, shape: tuple[int, int], margin: int) -> list[_Item]:
    """Fields side by side along the top of an ultrasound image, wrapping to a second line; the
    right third left free for the settings label."""
    font = _draw_font(rng, fonts)
    gap = int(size * rng.uniform(1.2, 2.5))
    limit = int(shape[1] * 0.62)
    top, left, items = margin, margin, []
    for kind, identifies, text, form in texts:
        width = render_text(text, font, size).shape[1]
        if left > margin and left + width > limit:
            top, left = top + int(size * 1.35), margin
        items.append(_Item(kind, identifies, text, font, size, polarity, top, left, form=form))
        left += width + gap
    return items


def _dataset(index: int, seed: int, kind: str, identity: Identity, frames: np.ndarray,
             rng: np.random.Generator) -> FileDataset:
    """The DICOM dataset of one image: header with the identity, pixels from display values."""
    modality = "US" if kind.startswith("US") else ("OT" if kind == "SC" else kind)
    sop_class = SOP_CLASSES["US" if kind in ("US", "US-RGB") else kind]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(seed, "sop", index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, "study", index)
    ds.SeriesInstanceUID = _uid(seed, "series", index)
    ds.Modality = modality
    ds.PatientName = identity.person_name
    ds.PatientID = identity.patient_id
    ds.PatientBirthDate = identity.birth.strftime("%Y%m%d")
    ds.PatientSex = "FM"[int(rng.integers(2))]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = identity.study.strftime("%Y%m%d")
    ds.StudyTime = "101500"
    ds.AccessionNumber = identity.accession
    ds.StudyID = "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Manufacturer = "Dicomflow Burned-In Corpus"
    if kind == "SC":
        ds.ConversionType = "WSD"
        ds.ImageType = ["DERIVED", "SECONDARY"]
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
    colour = frames.ndim == 4
    if kind in ("CR", "DX"):
        photometric = ("MONOCHROME2", "MONOCHROME1")[int(rng.integers(2))]
        values = frames[0] if photometric == "MONOCHROME2" else 1.0 - frames[0]
        ds.set_pixel_data(np.round(values * 4095).astype(np.uint16), photometric, 12,
                          generate_instance_uid=False)
        ds.ViewPosition = "PA"
    else:
        pixels = np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8)
        if len(pixels) == 1:
            pixels = pixels[0]
        else:
            ds.FrameTime = 33.3
        ds.set_pixel_data(pixels, "RGB" if colour else "MONOCHROME2", 8, generate_instance_uid=False)
    return ds


def write_corpus(folder: Path, n_images: int, *, seed: int = 0) -> list[CorpusImage]:
    """Write images 0 to ``n_images - 1`` of the corpus of ``seed`` into ``folder`` (one file each,
    named as :attr:`CorpusImage.name`) and return their ground truth."""
    folder.mkdir(parents=True, exist_ok=True)
    truths = []
    for index in range(n_images):
        ds, truth = make_image(index, seed=seed)
        ds.save_as(folder / truth.name, enforce_file_format=True)
        truths.append(truth)
    return truths


# --- real images ------------------------------------------------------------------------------


def real_image_files() -> list[Path]:
    """The ultrasound files of the ``deid-data`` package (the CINE zips as they come)."""
    import deid_data

    folder = Path(deid_data.__file__).parent / "data" / "ultrasounds"
    return sorted(folder.iterdir())


def read_real(path: Path) -> FileDataset:
    """A deid-data file as a dataset (a ``.zip`` holds one DICOM file)."""
    if path.suffix == ".zip":
        import io
        import zipfile

        with zipfile.ZipFile(path) as archive:
            return pydicom.dcmread(io.BytesIO(archive.read(archive.namelist()[0])))
    return pydicom.dcmread(path)


def header_fields(ds: pydicom.Dataset) -> dict[str, str]:
    """The header values a real image's planted fields are drawn from (DICOM forms), those that
    are usable: a person name, an ID of four characters or more, real dates."""
    found = {}
    name = str(ds.get("PatientName", "") or "").strip("^ ")
    if name:
        found["name"] = name
    for kind, keyword in (("id", "PatientID"), ("accession", "AccessionNumber")):
        value = ds.get(keyword)
        if isinstance(value, str) and len(value.strip()) >= 4:
            found[kind] = value.strip()
    for kind, keyword in (("birth_date", "PatientBirthDate"), ("study_date", "StudyDate")):
        value = str(ds.get(keyword, "") or "")
        if len(value) == 8 and value.isdigit() and value != "19000101":
            found[kind] = value
    return found


def plant_on_real(ds: FileDataset, *, seed: int, index: int, draw: bool = True) -> CorpusImage:
    """Draw ``ds``'s own identifiers (:func:`header_fields`) into blank parts of its pixels
    (a window that is black in every frame), in place; return the ground truth.

    Each field is drawn light on the dark background, in one font and size, at the first blank
    spot found (top band first, then the bottom corners); a field with no blank spot is skipped.
    """
    rng = _rng(seed, 100_000 + index)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    pixels = ds.pixel_array
    frames = pixels if n_frames > 1 else pixels[None]
    colour = frames.ndim == 4
    gray = frames.max(axis=-1) if colour else frames
    busy = gray.max(axis=0) > 24  # lit in any frame
    rows, cols = busy.shape
    fonts = available_fonts()
    font = _draw_font(rng, fonts)
    size = int(rng.integers(16, 25))
    items, taken = [], busy.copy()
    for kind, value in header_fields(ds).items():
        text, form = _real_text(kind, value, rng)
        mask = render_text(text, font, size)
        spot = _free_spot(taken, mask.shape, rng, pad=max(6, size // 2))
        if spot is None:
            continue
        top, left = spot
        items.append(_Item(kind, True, text, font, size, "light", top, left, form=form))
        pad = max(6, size // 2)
        taken[max(0, top - pad):top + mask.shape[0] + pad, max(0, left - pad):left + mask.shape[1] + pad] = True
    out = frames.copy()
    drawn = _render(out, items, draw=draw, colour=colour, scale=255.0)
    photometric = "RGB" if colour else "MONOCHROME2"
    ds.set_pixel_data(out if n_frames > 1 else out[0], photometric, 8)
    return CorpusImage("", "real", False, drawn, rows, cols, n_frames)


def _real_text(kind: str, value: str, rng: np.random.Generator) -> tuple[str, str]:
    """A header value (DICOM form) as drawn onto a real image, and its form."""
    if kind == "name":
        parts = [part for part in value.split("^") if part]
        form = NAME_FORMATS[int(rng.integers(len(NAME_FORMATS)))]
        if form == "DOE^JOHN" or len(parts) < 2:
            return "^".join(parts), "DOE^JOHN"
        if form == "Doe, John":
            return f"{parts[0].title()}, {' '.join(parts[1:]).title()}", form
        return " ".join([*parts[1:], parts[0]]), form
    if kind in ("birth_date", "study_date"):
        date = dt.datetime.strptime(value, "%Y%m%d").date()
        date_format = DATE_FORMATS[int(rng.integers(len(DATE_FORMATS)))]
        text = date.strftime(date_format)
        if kind == "birth_date":
            text = BIRTH_LABELS[int(rng.integers(len(BIRTH_LABELS)))] + text
        return text, _date_form(date_format)
    labels = ID_LABELS if kind == "id" else ACCESSION_LABELS
    label = labels[int(rng.integers(len(labels)))]
    return label + value, _label_form(label)


def _free_spot(busy: np.ndarray, shape: tuple[int, int], rng: np.random.Generator, *,
               pad: int) -> tuple[int, int] | None:
    """The top left of a ``shape`` window (with ``pad`` around) where ``busy`` is all False: tried
    along the top band, then the bottom corners; None when there is none."""
    rows, cols = busy.shape
    height, width = shape[0] + 2 * pad, shape[1] + 2 * pad
    integral = np.pad(busy.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    starts = [(top, left) for top in range(0, max(1, rows // 6), 4) for left in range(0, cols - width, 8)]
    starts += [(top, left) for top in range(rows - height, rows * 2 // 3, -4)
               for left in (*range(0, cols // 4, 8), *range(cols - width, cols * 3 // 4, -8))]
    for top, left in starts:
        if top < 0 or left < 0 or top + height > rows or left + width > cols:
            continue
        total = (integral[top + height, left + width] - integral[top, left + width]
                 - integral[top + height, left] + integral[top, left])
        if total == 0:
            return top + pad, left + pad
    return None
