"""Generate the embedded chest CT sample: synthetic axial CT series with and without a lung nodule,
plus deliberately broken series, byte-for-byte deterministic.

::

    dicomflow sample-data OUT_DIR --kind ct [--patients 24] [--seed 2026] [--force]

Contents (default arguments: 24 patients + 5 broken studies, 1,037 files, 5.6 MB):

* ``studies/<accession number>/<series folder>/<hash>.dcm``: one study per patient holding one
  axial chest CT series of 32-40 single-frame CT Image Storage slices, 64 x 64 pixels at 5 mm
  (a 320 mm field of view), 5 mm apart and 5 mm thick, RLE Lossless. File and folder names are
  hashes, so nothing in a name gives the slice order (or anyone's identity).
* ``labels.csv``: columns ``accession_number, study_instance_uid, series_instance_uid, label``
  (:data:`LABEL_COLUMNS`), one row per study, the broken ones included, sorted by accession.
  Label 1 (half the studies): a spherical solid nodule of 12-30 mm in one lung.

Pixels: signed 16-bit, (0028,1052) Rescale Intercept -1024 and (0028,1053) Rescale Slope 1, so a
stored value is HU + 1024 (air 24, never negative), as most scanners write it. Signed ((0028,0103)
Pixel Representation 1, pydicom returns int16) as GE and others write CT; as no stored value is
negative, a reader that ignores Pixel Representation still reads the right numbers, while one that
skips the modality LUT is off by 1024 HU, visibly. The phantom (:func:`chest_hu`), in HU (:data:`HU`): air outside,
subcutaneous fat, soft tissue, two lungs denser towards the back (gravity), vessels branching from
each hilum, heart and descending aorta, trachea, ribs, sternum, vertebrae with their discs, a
carbon table under the back; noise of 10-18 HU SD inside the body. Every voxel is the mean of
2 x 2 x 2 points inside it (partial volume, slice thickness included). The geometry is a
head-first supine scan (Patient Position HFS): (0020,0037) Image Orientation (Patient)
``1\\0\\0\\0\\1\\0``, Instance Number 1 the most superior slice, z decreasing by 5 mm per instance.

Fake PHI as in the chest radiograph sample (:func:`dicomflow.devtools.sample_data.add_fake_identity`):
name, MRN, other IDs, birth date, address, institution, physicians, the private block.

Broken series (:data:`DEFECTS`), each in its own extra study with a labels.csv row, listed with
what a correct reader does under each ``ingest.series_policy`` in :attr:`CtSampleSummary.broken`:

* ``gap``: one slice in the middle missing (its file never written);
* ``duplicate_differs``: a second file at one slice's position, other pixels (another noise draw);
* ``duplicate_copy``: one file copied byte for byte under another name;
* ``localizer``: a coronal scout (Image Type ``ORIGINAL\\PRIMARY\\LOCALIZER``) inside the series,
  same Series Instance UID: set aside, the axial slices assemble;
* ``tilted``: one slice's orientation turned by 5.0 degrees about the x axis (position kept).

Determinism: every random draw comes from NumPy generators seeded from ``--seed``; UIDs and names
are hashes of (seed, role, index); pixel maths uses only IEEE-exact operations (+, -, *, /, sqrt,
floor, comparisons: the 5 degree tilt's cosine and sine come from a rational formula), so no
libm or SIMD difference between machines can change a stored value.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicomflow.config.params import SERIES_POLICIES  # ingest.series.policy's values
from dicomflow.devtools.sample_data import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION,
    OPERATORS,
    PHYSICIANS,
    PatientPlan,
    _balanced,
    _ds,
    _pick,
    _plan_patient,
    _to_bytes,
    add_fake_identity,
    make_uid,
    prepare_output_dir,
    unique_number,
)

LOG = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LABEL_COLUMNS = ("accession_number", "study_instance_uid", "series_instance_uid", "label")
MATRIX = 64  # rows and columns of an axial slice
PIXEL_MM = 5.0  # in-plane spacing: a 320 mm field of view
SLICE_MM = 5.0  # slice spacing and thickness
SLICES = (32, 40)  # slices per series, both ends included; drawn independently of the label
RESCALE_INTERCEPT = -1024  # stored = HU + 1024
ORIGIN_XY = -(MATRIX - 1) * PIXEL_MM / 2  # the first pixel's centre: the isocentre is mid-image
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
# Tissue values in HU (lung: at mid-depth; it runs from -880 in front to -820 at the back).
HU = {"air": -1000.0, "fat": -100.0, "soft_tissue": 40.0, "blood": 45.0, "lung": -850.0,
      "bone": 700.0, "rib": 600.0, "disc": 80.0, "csf": 15.0, "table": 150.0, "nodule": 40.0}
NODULE_DIAMETER_MM = (12.0, 30.0)
NODULE_EDGE_MM = 2.0  # the nodule's rim rises from lung to solid over this width
VESSELS_PER_LUNG = 6
# At the hilum, tapering to 35 % at the tip. Vessels are as dense as a nodule: at 5 mm voxels only
# their shape (a tube, not a ball) tells them apart, so these two set how hard the task is.
VESSEL_RADIUS_MM = (1.5, 3.0)
NOISE_HU = (10.0, 18.0)  # range of the per-series noise SD inside the body
WINDOWS = (("LUNG", -600, 1500), ("MEDIASTINUM", 40, 400))  # (0028,1055), (0028,1050), (0028,1051)
# Tan of half the tilt: cos and sin follow exactly as (1 - t^2) / (1 + t^2) and 2t / (1 + t^2).
TILT_TAN_HALF = 0.04366094  # tan(2.5 degrees)
VENDORS = (("Northwind Medical", "NW-CT Helix 64", "VB10A"), ("Orion Systems", "OrionCT 128", "5.4.2"))
KERNELS = ("B30f", "STANDARD")  # per vendor
PATIENT_NUMBERS_FROM = 1_000_000  # MRNs hash the patient number: none equal the chest sample's
DEFECTS = ("gap", "duplicate_differs", "duplicate_copy", "localizer", "tilted")
# defect -> what a correct reader does under each of SERIES_POLICIES: the quarantine reason, or ""
# when the series is kept (the localizer set aside, the copy dropped, the gap interpolated)
OUTCOMES = {
    "gap": ("series_gap", "series_gap", ""),
    "duplicate_differs": ("series_duplicate_position",) * 3,
    "duplicate_copy": ("series_duplicate_position", "", ""),
    "localizer": ("", "", ""),
    "tilted": ("series_mixed_orientation",) * 3,
}
# defect -> (its reason: the quarantine reason under strict, or "localizer" for the skip; in words)
EXPECTED = {
    "gap": ("series_gap", "strict and dedupe: quarantine the series (series_gap); fill_gaps: "
            "interpolate the one missing slice and keep the series"),
    "duplicate_differs": ("series_duplicate_position", "quarantine the series under every policy "
                          "(series_duplicate_position): the two files at one position differ in pixels"),
    "duplicate_copy": ("series_duplicate_position", "strict: quarantine the series "
                       "(series_duplicate_position); dedupe and fill_gaps: drop the byte-identical copy, "
                       "keep the series"),
    "localizer": ("localizer", "set the localizer aside (a skip, not a failure) and assemble the axial "
                  "slices: the series is kept under every policy"),
    "tilted": ("series_mixed_orientation", "quarantine the series under every policy "
               "(series_mixed_orientation): one slice is tilted by 5 degrees"),
}


@dataclass(frozen=True)
class Anatomy:
    """One patient's chest, in patient coordinates (LPS, mm): x to the patient's left, y to the
    back, z to the head."""

    centre: tuple[float, float]  # body ellipse centre (x, y)
    body: tuple[float, float]  # body semi-axes (x, y)
    fat: float  # subcutaneous fat thickness
    lung_x: tuple[float, float]  # lung centres' x: right lung (negative x), left lung
    lung_y: float
    lung_axes: tuple[float, float]  # lung semi-axes (x, y) at their widest level
    apex_z: float  # top of the lungs
    widest_z: float  # lungs are full width from here down
    base_z: tuple[float, float]  # lowest point of each lung (the costophrenic rim), right, left
    dome: tuple[float, float]  # height of each diaphragm dome above its rim
    heart: tuple[float, float, float, float, float, float]  # centre (x, y, z), semi-axes (x, y, z)
    aorta: tuple[float, float, float]  # descending aorta: x, y, radius
    trachea: tuple[float, float, float, float]  # x, y, radius, lowest z (the carina)
    spine_y: float  # vertebral body centre (x is the body's)
    disc_phase: float  # z of an intervertebral disc, mm
    rib_phase: float  # fraction of a rib period
    vessels: tuple[tuple[float, ...], ...]  # (x0, y0, z0, x1, y1, z1, radius at the hilum)


@dataclass(frozen=True)
class CtNodule:
    """A solid spherical nodule: its centre in patient coordinates (mm) and its diameter (mm)."""

    centre: tuple[float, float, float]
    diameter: float
    side: str  # "right" or "left" lung


@dataclass(frozen=True)
class CtSeriesPlan:
    """One study with its one axial series: identity, geometry, anatomy, label and defect."""

    index: int
    patient: PatientPlan
    accession: str
    study_uid: str
    series_uid: str
    frame_uid: str
    when: dt.datetime
    label: int
    nodule: CtNodule | None
    anatomy: Anatomy
    z_top: float  # z of slice 1 (Instance Number 1, the most superior)
    n_slices: int  # slices of the intact series, before any defect
    vendor: int  # index into VENDORS
    staff: tuple[str, str, str]
    noise: float  # HU SD
    defect: str | None  # None or one of DEFECTS

    @property
    def folder(self) -> str:
        """``studies/<accession>/<series folder>``; the series folder is a hash of its UID."""
        return f"studies/{self.accession}/{hashlib.sha256(self.series_uid.encode()).hexdigest()[:10]}"

    def slice_z(self, k: int) -> float:
        """z (mm) of the 0-based slice ``k`` in acquisition order (Instance Number ``k + 1``)."""
        return self.z_top - SLICE_MM * k


@dataclass(frozen=True)
class BrokenSeries:
    """A deliberately broken series and what a correct reader does with it."""

    defect: str  # one of DEFECTS
    accession: str
    study_uid: str
    series_uid: str
    reason: str  # the quarantine reason under the strict policy, or "localizer" (a skip)
    files: tuple[str, ...]  # the files that carry the problem (relative, '/'-separated)
    detail: str  # where the problem is, in words
    expected: str  # what a correct reader does, in words
    outcomes: tuple[tuple[str, str], ...]  # (policy, quarantine reason or "" for kept) per SERIES_POLICIES

    def outcome(self, policy: str) -> str:
        """The quarantine reason under ``policy`` (one of :data:`SERIES_POLICIES`), "" when the
        series is kept."""
        return dict(self.outcomes)[policy]


@dataclass(frozen=True)
class CtSampleSummary:
    """What :func:`generate_ct_sample` wrote."""

    n_patients: int  # every patient, those of the broken studies included
    n_studies: int  # one series per study
    n_files: int
    n_positive: int  # studies labelled 1
    broken: tuple[BrokenSeries, ...]

    def by_defect(self, defect: str) -> BrokenSeries:
        """The broken series with ``defect`` (one of :data:`DEFECTS`)."""
        return next(b for b in self.broken if b.defect == defect)


def _file_name(seed: int, sop_uid: str, copy: int = 0) -> str:
    """A random-looking file name: a hash of the instance (and of the copy number, for a copy)."""
    return hashlib.sha256(f"{seed}|ct-file|{sop_uid}|{copy}".encode()).hexdigest()[:20] + ".dcm"


def _in_order_sum(values: np.ndarray) -> np.ndarray:
    """Sum over the last axis, one term after another: NumPy's reductions (and BLAS dot products)
    may group the additions differently on another CPU, and a rounded pixel with them."""
    total = values[..., 0].copy()
    for i in range(1, values.shape[-1]):
        total += values[..., i]
    return total


def _lungs(a: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Boolean mask of the two lungs (heart and aorta excluded) at points (x, y, z)."""
    inside = np.zeros(x.shape, bool)
    ax, ay = a.lung_axes
    # Above the widest level the cross-section shrinks like an ellipsoid's towards the apex.
    height = np.clip((z - a.widest_z) / (a.apex_z - a.widest_z), 0.0, 1.0)
    scale2 = 1.0 - height * height
    for cx, base, dome in zip(a.lung_x, a.base_z, a.dome):
        q = ((x - cx) / ax) ** 2 + ((y - a.lung_y) / ay) ** 2
        floor = base + dome * np.clip(1.0 - q, 0.0, 1.0)  # the diaphragm's dome under the lung
        inside |= (q < scale2) & (z > floor) & (z < a.apex_z)
    hx, hy, hz, hax, hay, haz = a.heart
    heart = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2 < 1.0
    aorta = (x - a.aorta[0]) ** 2 + (y - a.aorta[1]) ** 2 < (a.aorta[2] + 3.0) ** 2
    return inside & ~heart & ~aorta


def chest_hu(a: Anatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray,
             nodule: CtNodule | None = None) -> np.ndarray:
    """The phantom's HU at points (x, y, z), without noise.

    Parameters
    ----------
    a : Anatomy
        The patient's chest.
    x, y, z : numpy.ndarray
        Patient coordinates (mm), arrays of one shape.
    nodule : CtNodule or None
        A nodule to add (solid, :data:`NODULE_EDGE_MM` soft rim), or None.

    Returns
    -------
    numpy.ndarray
        float64 HU, the shape of ``x``.
    """
    hu = np.full(x.shape, HU["air"])
    cx, cy = a.centre
    bx, by = a.body
    hu[(y > cy + by + 1.0) & (y < cy + by + 9.0) & (np.abs(x) < 200.0)] = HU["table"]
    hu[((x - cx) / bx) ** 2 + ((y - cy) / by) ** 2 < 1.0] = HU["fat"]
    wall2 = ((x - cx) / (bx - a.fat)) ** 2 + ((y - cy) / (by - a.fat)) ** 2
    hu[wall2 < 1.0] = HU["soft_tissue"]

    hx, hy, hz, hax, hay, haz = a.heart
    hu[((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2 + ((z - hz) / haz) ** 2 < 1.0] = HU["blood"]
    hu[(x - a.aorta[0]) ** 2 + (y - a.aorta[1]) ** 2 < a.aorta[2] ** 2] = HU["blood"]

    lungs = _lungs(a, x, y, z)
    hu[lungs] = HU["lung"] + 30.0 * (y[lungs] - a.lung_y) / a.lung_axes[1]  # denser at the back
    px, py, pz = x[lungs], y[lungs], z[lungs]
    vessel = np.zeros(px.shape, bool)
    low, high = (float(pz.min()), float(pz.max())) if pz.size else (0.0, -1.0)
    for x0, y0, z0, x1, y1, z1, radius in a.vessels:
        if min(z0, z1) - radius > high or max(z0, z1) + radius < low:
            continue  # out of reach of these points: skip the arithmetic
        dx, dy, dz = x1 - x0, y1 - y0, z1 - z0
        t = np.clip(((px - x0) * dx + (py - y0) * dy + (pz - z0) * dz) / (dx * dx + dy * dy + dz * dz), 0.0, 1.0)
        d2 = (px - x0 - t * dx) ** 2 + (py - y0 - t * dy) ** 2 + (pz - z0 - t * dz) ** 2
        r = radius * (1.0 - 0.65 * t)  # tapering towards the periphery
        vessel |= d2 < r * r
    values = hu[lungs]
    values[vessel] = HU["blood"]
    hu[lungs] = values

    # Ribs: slanted bands (lower at the front) just inside the chest wall; sternum; vertebra.
    radial = np.sqrt(wall2)
    phase = (z - 0.5 * (y - cy)) / 32.0 + a.rib_phase
    ribs = (radial > 0.84) & (radial < 0.92) & (phase - np.floor(phase) < 0.3) & (np.abs(x - cx) > 22.0)
    hu[ribs] = HU["rib"]
    front = cy - (by - a.fat)
    hu[((x - cx) / 13.0) ** 2 + ((y - front - 7.0) / 5.0) ** 2 < 1.0] = HU["rib"]  # sternum
    disc = (z - a.disc_phase) / 28.0
    body_of_vertebra = (x - cx) ** 2 + (y - a.spine_y) ** 2 < 16.0 ** 2
    hu[body_of_vertebra] = np.where(disc[body_of_vertebra] - np.floor(disc[body_of_vertebra]) < 0.2,
                                    HU["disc"], HU["bone"])
    canal2 = (x - cx) ** 2 + (y - a.spine_y - 26.0) ** 2
    hu[(canal2 < 12.0 ** 2) | ((np.abs(x - cx) < 4.0) & (y > a.spine_y + 36.0) & (y < a.spine_y + 52.0))] = HU["rib"]
    hu[canal2 < 7.0 ** 2] = HU["csf"]
    tx, ty, tr, carina = a.trachea
    hu[((x - tx) ** 2 + (y - ty) ** 2 < tr * tr) & (z > carina)] = HU["air"]

    if nodule is not None:
        nx, ny, nz = nodule.centre
        r = nodule.diameter / 2
        if float(z.min()) < nz + r and float(z.max()) > nz - r:  # else it reaches none of these points
            dist = np.sqrt((x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2)
            t = np.clip((r - dist) / NODULE_EDGE_MM, 0.0, 1.0)
            hu = hu + (HU["nodule"] - hu) * (t * t * (3.0 - 2.0 * t))  # smoothstep rim
    return hu


def _plan_anatomy(rng: np.random.Generator, z_top: float, n_slices: int) -> Anatomy:
    """Draw one chest that fills a scan from ``z_top`` down ``n_slices`` slices."""
    length = SLICE_MM * (n_slices - 1)
    z_bottom = z_top - length
    cx, cy = rng.uniform(-6.0, 6.0), rng.uniform(-5.0, 18.0)
    bx, by = rng.uniform(128.0, 148.0), rng.uniform(92.0, 108.0)
    fat = rng.uniform(8.0, 22.0)
    wx, wy = bx - fat, by - fat  # inside the chest wall
    offset = rng.uniform(0.44, 0.5) * wx
    lung_axes = (rng.uniform(0.28, 0.33) * wx, rng.uniform(0.62, 0.72) * wy)  # inside the ribs
    lung_y = cy - rng.uniform(0.0, 6.0)
    apex = z_top - rng.uniform(5.0, 15.0)
    widest = apex - rng.uniform(0.35, 0.45) * length
    left_base = z_bottom + rng.uniform(0.0, 12.0)
    dome = rng.uniform(25.0, 40.0)
    heart = (cx + rng.uniform(15.0, 30.0), lung_y - rng.uniform(15.0, 25.0),
             z_bottom + rng.uniform(0.25, 0.35) * length,
             rng.uniform(45.0, 60.0), rng.uniform(38.0, 48.0), rng.uniform(40.0, 55.0))
    spine_y = cy + wy - 62.0
    hilum_z = widest - rng.uniform(0.0, 15.0)
    vessels = []
    for side, lung_x in ((-1.0, cx - offset), (1.0, cx + offset)):
        for _ in range(VESSELS_PER_LUNG):
            direction = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.9, 0.9)])
            direction = direction / np.sqrt(_in_order_sum(direction * direction))
            # Spread over the hilum, not from one point: twelve tubes from one point make a mass.
            start = np.array([lung_x - side * 0.5 * lung_axes[0], lung_y + rng.uniform(-12.0, 12.0),
                              hilum_z + rng.uniform(-12.0, 12.0)])
            end = start + rng.uniform(50.0, 110.0) * direction
            vessels.append((*map(float, start), *map(float, end), float(rng.uniform(*VESSEL_RADIUS_MM))))
    return Anatomy(
        centre=(float(cx), float(cy)), body=(float(bx), float(by)), fat=float(fat),
        lung_x=(float(cx - offset), float(cx + offset)), lung_y=float(lung_y),
        lung_axes=(float(lung_axes[0]), float(lung_axes[1])), apex_z=float(apex), widest_z=float(widest),
        base_z=(float(left_base + rng.uniform(5.0, 15.0)), float(left_base)),  # the right dome sits higher
        dome=(float(dome), float(dome)), heart=tuple(float(v) for v in heart),
        aorta=(float(cx + 22.0), float(spine_y - 22.0), float(rng.uniform(10.0, 13.0))),
        trachea=(float(cx), float(lung_y - 10.0), float(rng.uniform(7.0, 9.0)), float(hilum_z + 10.0)),
        spine_y=float(spine_y), disc_phase=float(rng.uniform(0.0, 28.0)), rib_phase=float(rng.uniform()),
        vessels=tuple(vessels))


def _place_nodule(rng: np.random.Generator, a: Anatomy, z_mid: float) -> CtNodule:
    """A nodule wholly inside one lung, within 72.5 mm of the scan's middle along z, so that a
    centred crop to 32 slices keeps it all."""
    diameter = float(rng.uniform(*NODULE_DIAMETER_MM))
    r = diameter / 2
    reach = r + 3.0  # lung all around, 3 mm beyond the rim
    ax, ay = a.lung_axes
    offsets = np.array([(0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1),
                        (0.7, 0.7, 0), (-0.7, 0.7, 0), (0.7, -0.7, 0), (-0.7, -0.7, 0)]) * reach
    for _ in range(10_000):
        side = int(rng.integers(2))
        centre = np.array([a.lung_x[side] + rng.uniform(-ax, ax), a.lung_y + rng.uniform(-ay, ay),
                           z_mid + rng.uniform(-(72.5 - r), 72.5 - r)])
        points = centre + offsets
        if _lungs(a, points[:, 0], points[:, 1], points[:, 2]).all():
            return CtNodule(tuple(float(v) for v in centre), diameter, ("right", "left")[side])
    raise RuntimeError("no place for a nodule inside the lungs after 10,000 draws; the anatomy's ranges are wrong")


def plan_ct_sample(patients: int, seed: int) -> list[CtSeriesPlan]:
    """Decide every study of the sample: identity, geometry, anatomy, label, nodule, defect.

    Parameters
    ----------
    patients : int
        Intact studies (one patient each); the :data:`DEFECTS` add one study (and patient) each.
    seed : int
        Seed of every random choice.

    Returns
    -------
    list of CtSeriesPlan
        The intact studies, then one per defect in the order of :data:`DEFECTS`.
    """
    rng = np.random.default_rng([seed, 30])
    total = patients + len(DEFECTS)
    elderly = _balanced(rng, (True,) + (False,) * 19, total)
    # Balanced within the intact and within the broken studies: about half positive in each.
    labels = _balanced(rng, (1, 0), patients) + _balanced(rng, (1, 0), len(DEFECTS))
    identifiers: set[str] = set()
    accessions: set[str] = set()
    plans = []
    for i in range(total):
        patient, when = _plan_patient(rng, seed, PATIENT_NUMBERS_FROM + i, elderly[i], identifiers)
        n_slices = int(rng.integers(SLICES[0], SLICES[1] + 1))
        z_top = round(float(rng.uniform(-60.0, -10.0)) * 2) / 2  # half-mm table positions
        anatomy = _plan_anatomy(rng, z_top, n_slices)
        z_mid = z_top - SLICE_MM * (n_slices - 1) / 2
        nodule = _place_nodule(rng, anatomy, z_mid) if labels[i] else None
        plans.append(CtSeriesPlan(
            index=i, patient=patient, accession="CT" + unique_number(seed, "ct-acc", i, 8, accessions),
            study_uid=make_uid(seed, "ct-study", i), series_uid=make_uid(seed, "ct-series", i),
            frame_uid=make_uid(seed, "ct-frame", i), when=when, label=labels[i], nodule=nodule,
            anatomy=anatomy, z_top=z_top, n_slices=n_slices, vendor=int(rng.integers(len(VENDORS))),
            staff=(_pick(rng, PHYSICIANS), _pick(rng, PHYSICIANS), _pick(rng, OPERATORS)),
            noise=float(rng.uniform(*NOISE_HU)), defect=DEFECTS[i - patients] if i >= patients else None))
    return plans


def tilted_orientation() -> tuple[float, ...]:
    """(0020,0037) of the tilted slice: the column direction turned by 5.0 degrees towards the head
    (about the x axis), cosine and sine from the tangent of the half angle."""
    t2 = TILT_TAN_HALF * TILT_TAN_HALF
    return (1.0, 0.0, 0.0, 0.0, (1.0 - t2) / (1.0 + t2), 2.0 * TILT_TAN_HALF / (1.0 + t2))


def render_slices(plan: CtSeriesPlan, origins: np.ndarray, orientation: tuple[float, ...],
                  rng: np.random.Generator) -> np.ndarray:
    """Stored values of the slices whose first pixels' centres are ``origins``.

    Parameters
    ----------
    plan : CtSeriesPlan
        Anatomy, nodule and noise level.
    origins : numpy.ndarray
        (n, 3) Image Position (Patient) of each slice, mm.
    orientation : tuple of float
        Image Orientation (Patient): row direction, then column direction.
    rng : numpy.random.Generator
        Draws the noise.

    Returns
    -------
    numpy.ndarray
        int16 (n, MATRIX, MATRIX): HU + 1024, each voxel the mean of 2 x 2 x 2 points inside it.
    """
    row, col = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, col)
    sub = np.array([-0.25, 0.25]) * PIXEL_MM  # sub-voxel centres, in-plane and across the slab
    steps = np.arange(MATRIX) * PIXEL_MM
    i = (steps[:, None, None, None, None] + sub[None, None, :, None, None])  # along the columns' direction
    j = (steps[None, :, None, None, None] + sub[None, None, None, :, None])  # along the rows' direction
    k = sub[None, None, None, None, :] * (SLICE_MM / PIXEL_MM)
    offset = [j * row[d] + i * col[d] + k * normal[d] for d in range(3)]  # (rows, cols, 2, 2, 2)
    out = np.empty((len(origins), MATRIX, MATRIX), np.int16)
    for n, origin in enumerate(origins):
        x, y, z = (origin[d] + offset[d] for d in range(3))
        hu = _in_order_sum(chest_hu(plan.anatomy, x, y, z, plan.nodule).reshape(MATRIX, MATRIX, 8)) / 8.0
        u = rng.random((4, MATRIX, MATRIX))
        noise = (u[0] + u[1] + u[2] + u[3] - 2.0) * 1.7320508 * plan.noise  # near-Gaussian, SD 1 x noise
        hu = hu + noise * (hu > HU["air"] + 5.0)  # no noise in the air around the patient
        out[n] = np.clip(np.rint(hu) - RESCALE_INTERCEPT, -32768, 32767).astype(np.int16)
    return out


def render_localizer(plan: CtSeriesPlan) -> tuple[np.ndarray, tuple[float, float, float]]:
    """A coronal scout over the scanned range and 20 mm beyond: the mean HU along y of each (z, x),
    as stored values; with the position of its first pixel."""
    rows = plan.n_slices + 8
    origin = (ORIGIN_XY, 0.0, plan.z_top + 20.0)
    z = origin[2] - np.arange(rows)[:, None, None] * PIXEL_MM
    x = ORIGIN_XY + np.arange(MATRIX)[None, :, None] * PIXEL_MM
    y = ORIGIN_XY + np.arange(MATRIX)[None, None, :] * PIXEL_MM
    x, y, z = np.broadcast_arrays(x, y, z)
    hu = _in_order_sum(chest_hu(plan.anatomy, x, y, z, plan.nodule)) / MATRIX
    return np.clip(np.rint(hu) - RESCALE_INTERCEPT, -32768, 32767).astype(np.int16), origin


def series_header(plan: CtSeriesPlan) -> Dataset:
    """The attributes every file of ``plan``'s series shares: patient and study (fake PHI), series,
    frame of reference, equipment, acquisition, pixel description, rescale and windows.

    Parameters
    ----------
    plan : CtSeriesPlan
        Patient, study, series and device.

    Returns
    -------
    pydicom.Dataset
        Without file meta, Image Type, Rescale Type, SOP Instance UID, Instance Number, Rows, Columns, the
        image plane's attributes and Pixel Data: :func:`build_ct_dataset` adds them per file.
    """
    pt = plan.patient
    series_at = plan.when + dt.timedelta(minutes=3)
    content_at = series_at + dt.timedelta(seconds=20)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    add_fake_identity(ds, pt, accession=plan.accession, study_uid=plan.study_uid,
                      study_id=str(5000 + plan.index), when=plan.when, staff=plan.staff,
                      vendor=VENDORS[plan.vendor], station=f"{pt.institution[2]}-CT{1 + plan.index % 2}",
                      description="CT CHEST WITHOUT CONTRAST", step=1)
    ds.SeriesDate, ds.SeriesTime = series_at.strftime("%Y%m%d"), series_at.strftime("%H%M%S")
    ds.AcquisitionDate, ds.AcquisitionTime = series_at.strftime("%Y%m%d"), series_at.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = content_at.strftime("%Y%m%d"), content_at.strftime("%H%M%S")
    ds.Modality = "CT"
    ds.SeriesDescription, ds.ProtocolName = "CHEST AXIAL 5.0 MM", "ROUTINE CHEST"
    ds.BodyPartExamined, ds.PatientPosition = "CHEST", "HFS"
    ds.SeriesInstanceUID, ds.SeriesNumber = plan.series_uid, 2
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = plan.frame_uid, ""
    ds.AcquisitionNumber = 1
    ds.PixelSpacing = [_ds(PIXEL_MM), _ds(PIXEL_MM)]
    ds.KVP, ds.XRayTubeCurrent, ds.ExposureTime, ds.Exposure = "120", 180, 500, 90
    ds.ConvolutionKernel, ds.FilterType = KERNELS[plan.vendor], "BODY"
    ds.DataCollectionDiameter, ds.ReconstructionDiameter = "500", _ds(MATRIX * PIXEL_MM)
    ds.GantryDetectorTilt, ds.TableHeight, ds.RotationDirection = "0", "160", "CW"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = str(RESCALE_INTERCEPT), "1"
    ds.WindowCenter = [str(centre) for _, centre, _ in WINDOWS]
    ds.WindowWidth = [str(width) for _, _, width in WINDOWS]
    ds.WindowCenterWidthExplanation = [name for name, _, _ in WINDOWS]
    ds.LossyImageCompression = "00"
    return ds


def build_ct_dataset(header: Dataset, pixels: np.ndarray, *, sop_uid: str, instance: int,
                     position: tuple[float, float, float], orientation: tuple[float, ...],
                     localizer: bool = False) -> Dataset:
    """The full CT Image Storage data set (file meta included, RLE Lossless) of one file.

    Parameters
    ----------
    header : pydicom.Dataset
        The series' shared attributes from :func:`series_header`; not modified (the new data set
        holds its elements too, so neither may change them afterwards).
    pixels : numpy.ndarray
        int16 stored values (HU + 1024), (rows, columns).
    sop_uid : str
        (0008,0018) SOP Instance UID.
    instance : int
        (0020,0013) Instance Number.
    position, orientation : tuple of float
        (0020,0032) Image Position (Patient) and (0020,0037) Image Orientation (Patient).
    localizer : bool, default=False
        A scout: Image Type ``ORIGINAL\\PRIMARY\\LOCALIZER``, no Slice Location, empty Slice Thickness,
        Rescale Type ``US``.

    Returns
    -------
    pydicom.Dataset
    """
    ds = Dataset(header)  # shallow: only attributes the header lacks are set below
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CT_IMAGE_STORAGE, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds.file_meta = meta
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER" if localizer else "AXIAL"]
    ds.SOPInstanceUID, ds.InstanceNumber = sop_uid, instance
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    if localizer:  # a projection: its values are not HU (PS3.3 C.8.2.1.1.8), its plane no slab
        ds.SliceThickness, ds.RescaleType = None, "US"
    else:
        ds.SliceThickness, ds.SliceLocation, ds.RescaleType = _ds(SLICE_MM), _ds(position[2]), "HU"
    ds.Rows, ds.Columns = pixels.shape
    # Pinned plugin and no new UID: the bytes must not depend on what is installed.
    ds.compress(RLELossless, pixels, encoding_plugin="pydicom", generate_instance_uid=False)
    return ds


def _series_files(plan: CtSeriesPlan, seed: int) -> tuple[list[tuple[str, bytes]], tuple[str, ...], str]:
    """Every file of one series as (relative path, bytes), the paths that carry its defect, and
    where the defect is in words."""
    rng = np.random.default_rng([seed, 31, plan.index])
    positions = np.array([(ORIGIN_XY, ORIGIN_XY, plan.slice_z(k)) for k in range(plan.n_slices)])
    orientations = [AXIAL] * plan.n_slices
    middle = plan.n_slices // 2
    if plan.defect == "tilted":
        orientations[middle] = tilted_orientation()  # turned about the slice's first row: position kept
    pixels = render_slices(plan, positions, AXIAL, rng)
    if plan.defect == "tilted":
        pixels[middle] = render_slices(plan, positions[middle:middle + 1], orientations[middle], rng)[0]
    header = series_header(plan)
    files: list[tuple[str, bytes]] = []
    marked: list[str] = []

    def add(pixels_k: np.ndarray, sop_uid: str, instance: int, position, orientation, *,
            localizer: bool = False, copy: int = 0) -> str:
        ds = build_ct_dataset(header, pixels_k, sop_uid=sop_uid, instance=instance,
                              position=tuple(float(v) for v in position), orientation=orientation,
                              localizer=localizer)
        path = f"{plan.folder}/{_file_name(seed, sop_uid, copy)}"
        files.append((path, _to_bytes(ds)))
        return path

    for k in range(plan.n_slices):
        if plan.defect == "gap" and k == middle:
            continue  # the missing slice: its Instance Number is missing too, as in a lost file
        path = add(pixels[k], make_uid(seed, "ct-sop", plan.index, k), k + 1, positions[k], orientations[k])
        if plan.defect == "tilted" and k == middle:
            marked.append(path)
    where = f"Instance Number {middle + 1}, z = {_ds(plan.slice_z(middle))} mm"
    if plan.defect == "gap":  # the two slices either side of the hole
        marked.extend((files[middle - 1][0], files[middle][0]))
        where = f"no slice at z = {_ds(plan.slice_z(middle))} mm (Instance Number {middle + 1})"
    elif plan.defect == "duplicate_differs":  # a second reconstruction of one position, other noise
        other = render_slices(plan, positions[middle:middle + 1], AXIAL, rng)[0]
        marked.append(files[middle][0])
        marked.append(add(other, make_uid(seed, "ct-sop-duplicate", plan.index), plan.n_slices + 1,
                          positions[middle], AXIAL))
    elif plan.defect == "duplicate_copy":  # the same file exported twice
        path, data = files[middle]
        copy = f"{plan.folder}/{_file_name(seed, make_uid(seed, 'ct-sop', plan.index, middle), copy=1)}"
        files.append((copy, data))
        marked.extend((path, copy))
    elif plan.defect == "localizer":
        scout, origin = render_localizer(plan)
        marked.append(add(scout, make_uid(seed, "ct-sop-localizer", plan.index), plan.n_slices + 1, origin,
                          CORONAL, localizer=True))
        where = f"a coronal localizer, Instance Number {plan.n_slices + 1}"
    return files, tuple(marked), where


def generate_ct_sample(out_dir: Path, *, patients: int = 24, seed: int = 2026,
                       force: bool = False) -> CtSampleSummary:
    """Write the chest CT sample (``studies/`` and ``labels.csv``) into ``out_dir``.

    Parameters
    ----------
    out_dir : pathlib.Path
        Target directory; created if missing, must be empty unless ``force``.
    patients : int, default=24
        Intact studies (one patient, one series each), at least 2 so that both labels occur; the
        :data:`DEFECTS` add one study each.
    seed : int, default=2026
        Seed; the same arguments give byte-identical files.
    force : bool, default=False
        Remove the previous content of a non-empty ``out_dir`` first.

    Returns
    -------
    CtSampleSummary
        Counts and the broken series with what a reader should do with each.

    Raises
    ------
    ValueError
        ``patients`` below 2.
    FileExistsError
        ``out_dir`` is not empty and ``force`` is not set.
    """
    if patients < 2:
        raise ValueError(f"patients must be at least 2 so that both labels occur; got {patients}")
    out_dir = Path(out_dir)
    prepare_output_dir(out_dir, force)
    plans = plan_ct_sample(patients, seed)
    n_files = 0
    broken = []
    for plan in plans:
        files, marked, where = _series_files(plan, seed)
        for path, data in files:
            target = out_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        n_files += len(files)
        if plan.defect is not None:
            reason, expected = EXPECTED[plan.defect]
            broken.append(BrokenSeries(plan.defect, plan.accession, plan.study_uid, plan.series_uid, reason,
                                       marked, where, expected,
                                       tuple(zip(SERIES_POLICIES, OUTCOMES[plan.defect]))))
    rows = sorted((p.accession, p.study_uid, p.series_uid, p.label) for p in plans)
    with open(out_dir / "labels.csv", "w", encoding="ascii", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    summary = CtSampleSummary(n_patients=len(plans), n_studies=len(plans), n_files=n_files,
                              n_positive=sum(p.label for p in plans), broken=tuple(broken))
    LOG.info("wrote %d CT files: %d studies (%d positive, %d with a broken series) to %s", n_files,
             summary.n_studies, summary.n_positive, len(broken), out_dir)
    return summary
