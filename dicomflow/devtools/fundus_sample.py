"""Generate the second embedded sample: synthetic colour fundus photographs graded for diabetic
retinopathy, as JPEG files and the table ``dicomflow import-photos`` reads.

::

    dicomflow sample-data OUT_DIR --kind fundus [--patients 80] [--seed 2026] [--force]

Contents (default arguments: 80 patients, about 240 photos of 128 x 128 pixels):

* ``photos/<n>.jpg``: one photograph per eye and visit; both eyes at every visit, about half the
  patients seen twice (a year or so apart, their grade as likely to have moved up one).
* ``photos.csv``: columns ``file, patient_id, study_date, label, laterality`` (:data:`TABLE_COLUMNS`),
  one row per photo, ``file`` relative to ``OUT_DIR``; ``label`` is the DR grade 0-4 (none, mild,
  moderate, severe non-proliferative, proliferative), in the shares of a screening population
  (:data:`GRADE_SHARES`, exact to rounding).

What the picture shows (a right eye; a left one is its mirror image): an orange-red disc on black,
darker towards its rim, a bright optic disc on the nasal side with vessels arching out of it, a
darker macula. Lesions grow with the grade (:data:`LESIONS`): microaneurysms (small red dots)
from grade 1; blot haemorrhages and yellow hard exudates from 2; more and larger of them and
cotton-wool spots at 3; new vessels at the disc and, in some, a large preretinal haemorrhage at 4.
Counts overlap between neighbouring grades and three fake cameras (:data:`CAMERAS`) differ in
white balance, exposure, noise, chroma subsampling and JPEG quality, so a small CNN at 64 x 64 can
learn the grade but not from one pixel. One camera writes Adobe RGB (1998) and embeds that ICC
profile (its pixels converted from the rendered sRGB by littleCMS), as wide-gamut cameras do: with
``ingest.color_management: srgb`` they are converted back.

Every JPEG carries fake identifying metadata a photo import must drop (:data:`FAKE_IDENTIFIERS`):
the patient's name in EXIF Artist, ImageDescription and CameraOwnerName, the camera's serial
number, GPS coordinates, DateTimeOriginal, an XMP packet and a JPEG comment. Every value is
obviously fake and listed there, so tests can search every output for them.

Determinism: each photo is drawn by a NumPy generator seeded from (seed, photo number) and encoded
by the pinned Pillow, so the same arguments give byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageCms, ImageDraw, ExifTags

from dicomflow.devtools.icc import ADOBE_RGB_CURVE, ADOBE_RGB_PRIMARIES, matrix_profile
from dicomflow.devtools.sample_data import prepare_output_dir

LOG = logging.getLogger(__name__)

TABLE_FILE = "photos.csv"
PHOTO_DIR = "photos"
TABLE_COLUMNS = ("file", "patient_id", "study_date", "label", "laterality")
GRADES = (0, 1, 2, 3, 4)
# Shares of DR grades 0-4 in a screening population (roughly those of the EyePACS/Kaggle set).
GRADE_SHARES = (0.45, 0.12, 0.19, 0.18, 0.06)
SUPERSAMPLE = 2  # lesions and vessels are drawn at twice the size, then averaged down: smooth edges

# Planted in every JPEG (EXIF, XMP, comment): none of them may reach any output of an import.
FAKE_PATIENT_NAME = "FAKEPATIENT^Zebulon^Quixby"
FAKE_IDENTIFIERS = {
    "patient_name": FAKE_PATIENT_NAME,
    "description": f"Fundus photo of {FAKE_PATIENT_NAME}, MRN FAKE-MRN-0042424",
    "mrn": "FAKE-MRN-0042424",
    "owner": "FAKE OWNER Dr. Quentin Zzyzx",
    "camera_serial": "FAKE-SERIAL-9Z9Z9Z",
    "capture_time": "1901:02:03 04:05:06",  # EXIF DateTimeOriginal; no study is that old
    "gps_latitude": (89.0, 59.0, 58.0),     # next to the North Pole
    "gps_longitude": (179.0, 59.0, 58.0),
    "xmp_creator": "FAKE XMP Creator Yolanda Qwerty",
    "comment": "FAKE COMMENT patient FAKEPATIENT Zebulon Quixby",
}
# The identifying strings among them, as a scanner searches outputs for them.
FAKE_STRINGS = tuple(value for value in FAKE_IDENTIFIERS.values() if isinstance(value, str))


@dataclass(frozen=True)
class Camera:
    """A fake fundus camera: how its photos differ from another's."""

    make: str
    model: str
    white_balance: tuple[float, float, float]  # multiplies R, G, B
    exposure: tuple[float, float]  # range of the overall brightness factor
    noise: float  # sensor noise SD, pixels in [0, 1]
    quality: int  # JPEG quality
    subsampling: int  # Pillow's: 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0
    adobe_rgb: bool = False  # writes Adobe RGB (1998) with its ICC profile embedded


CAMERAS = (
    Camera("FAKECAM Optics", "Retina-1 (fake)", (1.0, 1.0, 1.0), (0.85, 1.1), 0.015, 92, 2),
    Camera("FAKECAM Optics", "Retina-2 (fake)", (1.06, 0.92, 0.86), (0.75, 1.0), 0.025, 85, 1),
    Camera("NOTREAL Imaging", "WideField (fake)", (0.93, 1.04, 1.1), (0.9, 1.2), 0.02, 95, 0, adobe_rgb=True),
)

# The wide-gamut camera's embedded profile (bytes fixed: littleCMS would stamp the time in its own).
ADOBE_RGB_PROFILE = matrix_profile(*ADOBE_RGB_PRIMARIES, curve=ADOBE_RGB_CURVE, description="Adobe RGB (1998)-like")

# Lesions per grade, (low, high) counts drawn uniformly so that neighbouring grades overlap, in the
# order of LESION_KINDS: microaneurysms, blot haemorrhages, hard exudates (clusters), cotton-wool
# spots, new-vessel tufts at the disc.
LESION_KINDS = ("microaneurysms", "haemorrhages", "exudates", "cotton_wool", "new_vessels")
LESIONS = {grade: dict(zip(LESION_KINDS, counts)) for grade, counts in (
    (0, ((0, 1), (0, 0), (0, 0), (0, 0), (0, 0))),
    (1, ((2, 7), (0, 0), (0, 1), (0, 0), (0, 0))),
    (2, ((4, 12), (1, 5), (2, 8), (0, 1), (0, 0))),
    (3, ((8, 18), (5, 12), (5, 14), (1, 3), (0, 0))),
    (4, ((8, 18), (4, 12), (3, 12), (0, 3), (1, 3))),
)}
LARGE_HAEMORRHAGE_SHARE = 0.5  # of grade-4 photos: a large preretinal (boat-shaped) haemorrhage

# Colours, RGB in [0, 1], before the camera's white balance and exposure.
RETINA, VESSEL, DISC = (0.86, 0.38, 0.16), (0.55, 0.10, 0.06), (1.0, 0.88, 0.62)
HAEMORRHAGE, EXUDATE, COTTON_WOOL = (0.45, 0.06, 0.04), (0.98, 0.86, 0.30), (0.95, 0.86, 0.74)


@dataclass(frozen=True)
class PhotoPlan:
    """One photograph to draw: who, when, which eye, what grade, which camera."""

    number: int
    patient_id: str
    study_date: dt.date
    laterality: str  # R or L
    grade: int
    camera: int

    @property
    def file(self) -> str:
        return f"{PHOTO_DIR}/{self.number:04d}.jpg"


@dataclass(frozen=True)
class FundusSummary:
    """What :func:`generate_fundus_sample` wrote."""

    n_photos: int
    n_patients: int
    n_visits: int
    grade_counts: tuple[int, ...]  # photos per grade 0-4
    table: str  # the table's path relative to OUT_DIR


def exact_counts(n: int, shares: tuple[float, ...]) -> list[int]:
    """``n`` split in ``shares`` by the largest remainder method: the counts sum to ``n``."""
    raw = [n * share for share in shares]
    counts = [int(value) for value in raw]
    by_remainder = sorted(range(len(shares)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts


def plan_photos(patients: int, seed: int) -> list[PhotoPlan]:
    """Every photo of the sample, in file order.

    Grades follow a latent severity per patient (both eyes alike, a second visit a little worse),
    ranked and cut at :data:`GRADE_SHARES`: the shares are exact and a patient's photos agree.
    """
    rng = np.random.default_rng([seed, 0])
    slots = []  # (patient, visit date, eye, camera, latent severity)
    for p in range(patients):
        severity = rng.normal()
        first = dt.date(2021, 1, 4) + dt.timedelta(days=int(rng.integers(0, 700)))
        visits = [first] + ([first + dt.timedelta(days=int(rng.integers(300, 500)))] if rng.random() < 0.5 else [])
        camera = int(rng.integers(len(CAMERAS)))
        for v, date in enumerate(visits):
            for eye in ("R", "L"):
                slots.append((p, date, eye, camera, severity + 0.35 * rng.normal() + 0.4 * v))
    counts = exact_counts(len(slots), GRADE_SHARES)
    cut = np.repeat(np.array(GRADES), counts)  # grades in rank order of the latent severity
    grade_of = dict(zip(np.argsort([slot[4] for slot in slots], kind="stable").tolist(), cut.tolist()))
    return [PhotoPlan(i + 1, f"FUNDUS-{p + 1:04d}", date, eye, int(grade_of[i]), camera)
            for i, (p, date, eye, camera, _) in enumerate(slots)]


def render_fundus(rng: np.random.Generator, size: int, *, grade: int, camera: Camera) -> np.ndarray:
    """A right eye's fundus photograph, float32 (size, size, 3) in [0, 1], sRGB.

    Parameters
    ----------
    rng : numpy.random.Generator
        The photo's own generator: every random choice comes from it.
    size : int
        Side in pixels.
    grade : int
        DR grade 0-4: which lesions and how many (:data:`LESIONS`).
    camera : Camera
        White balance, exposure and noise.

    Returns
    -------
    numpy.ndarray
        float32 (size, size, 3).
    """
    big = size * SUPERSAMPLE
    centre = np.array([big / 2, big / 2]) + rng.normal(0, 0.015 * big, 2)
    radius = big * rng.uniform(0.44, 0.48)
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32)
    dx, dy = (xx - np.float32(centre[0])) / np.float32(radius), (yy - np.float32(centre[1])) / np.float32(radius)
    dist = np.hypot(dx, dy)
    inside = np.clip((1.0 - dist) * np.float32(radius / 1.5), 0.0, 1.0)  # a soft edge of about 1.5 pixels

    # Retina: darker towards the rim (vignetting) and along a random direction (uneven light).
    tilt = rng.normal(0, 0.12, 2).astype(np.float32)
    light = 1.0 - 0.38 * dist**2 + tilt[0] * dx + tilt[1] * dy
    # Optic disc on the nasal side (right of a right eye's picture), macula on the temporal side.
    disc = centre + np.array([0.5, rng.normal(0, 0.04)]) * radius
    macula = np.array([-0.22, rng.normal(0, 0.03)], np.float32)
    shade = light * (1.0 - 0.35 * np.exp(-((dx - macula[0]) ** 2 + (dy - macula[1]) ** 2) / np.float32(0.12**2)))
    retina = (np.asarray(RETINA) * rng.uniform(0.9, 1.1, 3)).astype(np.float32)
    image = shade[..., None] * retina

    layers = {name: Image.new("L", (big, big), 0) for name in ("vessel", "haemorrhage", "exudate", "cotton")}
    pens = {name: ImageDraw.Draw(layer) for name, layer in layers.items()}
    disc_radius = radius * rng.uniform(0.13, 0.16)
    _draw_vessels(rng, pens["vessel"], disc, radius, big)
    _draw_lesions(rng, pens, grade=grade, centre=centre, radius=radius, disc=disc, disc_radius=disc_radius)
    for name, colour in (("vessel", VESSEL), ("haemorrhage", HAEMORRHAGE), ("exudate", EXUDATE),
                         ("cotton", COTTON_WOOL)):
        alpha = np.asarray(layers[name], np.float32)[..., None] / np.float32(255.0)
        tint = np.asarray(colour, np.float32) * (light[..., None] if name != "exudate" else np.float32(1.0))
        image += alpha * (tint - image)

    # The disc over the vessels' roots, brighter at its cup.
    d_disc = np.hypot(xx - np.float32(disc[0]), yy - np.float32(disc[1])) / np.float32(disc_radius)
    glow = np.clip(1.25 - d_disc, 0.0, 1.0)[..., None]
    image += glow * (np.asarray(DISC, np.float32) - image)
    image += 0.12 * np.clip(1.0 - d_disc / 0.45, 0.0, 1.0)[..., None]

    image *= inside[..., None]
    small = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3), dtype=np.float32)
    small *= (np.asarray(camera.white_balance) * rng.uniform(*camera.exposure)).astype(np.float32)
    small += rng.normal(0.0, camera.noise, small.shape).astype(np.float32)
    return np.clip(small, 0.0, 1.0)


def _draw_vessels(rng: np.random.Generator, pen: ImageDraw.ImageDraw, disc: np.ndarray, radius: float,
                  big: int) -> None:
    """Four arcades out of the disc (two arching over and under the macula, two nasal), each
    branching once or twice, thinning as they go."""
    for start_angle, bend in ((200, -1.0), (160, 1.0), (-25, 0.4), (25, -0.4)):
        _vessel(rng, pen, disc, np.radians(start_angle + rng.normal(0, 8)), bend, radius,
                width=big / 64, length=radius * rng.uniform(0.9, 1.3), depth=0)


def _vessel(rng: np.random.Generator, pen: ImageDraw.ImageDraw, start: np.ndarray, angle: float, bend: float,
            radius: float, *, width: float, length: float, depth: int) -> None:
    """One vessel as a curving polyline, with branches."""
    steps = 14
    point, points = start.copy(), [tuple(start)]
    for step in range(steps):
        angle += bend * 0.11 + rng.normal(0, 0.08)
        point = point + length / steps * np.array([np.cos(angle), np.sin(angle)])
        points.append(tuple(point))
        if depth < 2 and step in (4, 9) and rng.random() < 0.6:
            _vessel(rng, pen, point, angle + rng.choice([-0.7, 0.7]), bend * 0.5, radius,
                    width=width * 0.65, length=length * 0.45, depth=depth + 1)
    pen.line(points, fill=235, width=max(1, round(width)), joint="curve")


def _draw_lesions(rng: np.random.Generator, pens: dict[str, ImageDraw.ImageDraw], *, grade: int,
                  centre: np.ndarray, radius: float, disc: np.ndarray, disc_radius: float) -> None:
    """The grade's lesions, scattered over the retina (not on the disc)."""
    counts = {name: int(rng.integers(low, high + 1)) for name, (low, high) in LESIONS[grade].items()}
    unit = radius / 60  # about a pixel at the default size

    def spot() -> np.ndarray:
        while True:
            r, theta = radius * 0.85 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            where = centre + r * np.array([np.cos(theta), np.sin(theta)])
            if np.hypot(*(where - disc)) > disc_radius * 1.4:
                return where

    def dot(name: str, where: np.ndarray, size: float, fill: int = 255) -> None:
        pens[name].ellipse([where[0] - size, where[1] - size, where[0] + size, where[1] + size], fill=fill)

    larger = 1.4 if grade >= 3 else 1.0
    for _ in range(counts["microaneurysms"]):
        dot("haemorrhage", spot(), unit * rng.uniform(0.9, 1.4), 230)
    for _ in range(counts["haemorrhages"]):
        dot("haemorrhage", spot(), unit * larger * rng.uniform(2.0, 3.8), 220)
    for _ in range(counts["exudates"]):  # in small clusters
        around = spot()
        for _ in range(int(rng.integers(2, 5))):
            dot("exudate", around + rng.normal(0, 3 * unit, 2), unit * larger * rng.uniform(0.8, 1.6), 240)
    for _ in range(counts["cotton_wool"]):
        dot("cotton", spot(), unit * rng.uniform(3.0, 5.0), 150)
    for _ in range(counts["new_vessels"]):  # a tuft of fine tortuous vessels at the disc
        base = disc + rng.normal(0, disc_radius, 2)
        for _ in range(8):
            points, point = [tuple(base)], base.copy()
            for _ in range(6):
                point = point + rng.normal(0, 2.5 * unit, 2)
                points.append(tuple(point))
            pens["vessel"].line(points, fill=200, width=max(1, round(unit)))
    if grade == 4 and rng.random() < LARGE_HAEMORRHAGE_SHARE:  # preretinal: flat top, round bottom
        where, size = spot(), unit * rng.uniform(7, 11)
        pens["haemorrhage"].chord([where[0] - size, where[1] - size, where[0] + size, where[1] + size],
                                  0, 180, fill=235)


def _metadata(camera: Camera) -> dict:
    """The JPEG's planted metadata (EXIF, XMP, comment) and its ICC profile."""
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = camera.make, camera.model
    exif[ExifTags.Base.Artist] = FAKE_IDENTIFIERS["patient_name"]
    exif[ExifTags.Base.ImageDescription] = FAKE_IDENTIFIERS["description"]
    details = exif.get_ifd(ExifTags.IFD.Exif)
    details[ExifTags.Base.DateTimeOriginal] = FAKE_IDENTIFIERS["capture_time"]
    details[ExifTags.Base.BodySerialNumber] = FAKE_IDENTIFIERS["camera_serial"]
    details[ExifTags.Base.CameraOwnerName] = FAKE_IDENTIFIERS["owner"]
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef], gps[ExifTags.GPS.GPSLatitude] = "N", FAKE_IDENTIFIERS["gps_latitude"]
    gps[ExifTags.GPS.GPSLongitudeRef], gps[ExifTags.GPS.GPSLongitude] = "E", FAKE_IDENTIFIERS["gps_longitude"]
    xmp = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>'
           f'{FAKE_IDENTIFIERS["xmp_creator"]}</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>')
    return {"exif": exif, "xmp": xmp.encode("utf-8"), "comment": FAKE_IDENTIFIERS["comment"],
            **({"icc_profile": ADOBE_RGB_PROFILE} if camera.adobe_rgb else {})}


def encode_photo(pixels: np.ndarray, camera: Camera) -> bytes:
    """float32 sRGB pixels to the camera's JPEG bytes, metadata planted (Adobe RGB converted)."""
    image = Image.fromarray(np.round(pixels * 255.0).astype(np.uint8), mode="RGB")
    if camera.adobe_rgb:
        image = ImageCms.profileToProfile(image, ImageCms.createProfile("sRGB"), ImageCms.ImageCmsProfile(
            io.BytesIO(ADOBE_RGB_PROFILE)), renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=camera.quality, subsampling=camera.subsampling, **_metadata(camera))
    return buffer.getvalue()


def generate_fundus_sample(out_dir: Path, *, patients: int = 80, seed: int = 2026, size: int = 128,
                           force: bool = False) -> FundusSummary:
    """Write the fundus sample (``photos/`` and ``photos.csv``) into ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Target directory; created if missing, must be empty unless ``force``.
    patients : int, default=80
        Number of patients, at least 10 so that every grade has photos.
    seed : int, default=2026
        Seed; the same arguments give byte-identical files.
    size : int, default=128
        Side of the square photos in pixels, at least 32.
    force : bool, default=False
        Remove the previous content of a non-empty ``out_dir`` first.

    Returns
    -------
    FundusSummary
        Counts of photos, patients, visits and grades.

    Raises
    ------
    ValueError
        ``patients`` below 10 or ``size`` below 32.
    FileExistsError
        ``out_dir`` is not empty and ``force`` is not set.
    """
    if patients < 10:
        raise ValueError(f"patients must be at least 10 so that every grade has photos; got {patients}")
    if size < 32:
        raise ValueError(f"size must be at least 32 pixels for the lesions to show; got {size}")
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, force)
    (out_dir / PHOTO_DIR).mkdir()
    plans = plan_photos(patients, seed)
    for plan in plans:
        camera = CAMERAS[plan.camera]
        pixels = render_fundus(np.random.default_rng([seed, plan.number]), size, grade=plan.grade, camera=camera)
        if plan.laterality == "L":
            pixels = pixels[:, ::-1]  # a left eye is a right one mirrored: its disc on the left
        (out_dir / plan.file).write_bytes(encode_photo(pixels, camera))
    with open(out_dir / TABLE_FILE, "w", encoding="ascii", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(TABLE_COLUMNS)
        writer.writerows((p.file, p.patient_id, p.study_date.isoformat(), p.grade, p.laterality) for p in plans)
    summary = FundusSummary(
        n_photos=len(plans), n_patients=patients, n_visits=len({(p.patient_id, p.study_date) for p in plans}),
        grade_counts=tuple(sum(p.grade == g for p in plans) for g in GRADES), table=TABLE_FILE)
    LOG.info("wrote %d fundus photos of %d patients (%d visits; grades 0-4: %s) to %s", summary.n_photos,
             patients, summary.n_visits, ", ".join(map(str, summary.grade_counts)), out_dir)
    return summary
