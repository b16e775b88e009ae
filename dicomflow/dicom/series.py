"""CT (or MR) series as units: headers read cheaply, files grouped into series, each series
diagnosed (gaps, duplicates, tilted slices), handled by a policy, and assembled with highdicom into
a volume in Hounsfield units, resampled, windowed and fitted to a fixed size.

The order of work, as ingest runs it: :func:`read_slice_header` on every file (in worker
processes), :func:`group_series` on all headers, :func:`diagnose` and :func:`apply_policy` per
group, then :func:`read_volume` per accepted group. Slices are ordered by geometry only (their
distance along the slice normal), never by file name, (0020,0013) Instance Number or
(0020,1041) Slice Location, which real archives get wrong.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut

from dicomflow.config.params import SERIES_POLICIES
from dicomflow.dicom.display import decode_frames, number_of_frames
from dicomflow.dicom.reading import Quarantined, failure_reason, read_dataset, read_file

if TYPE_CHECKING:
    import highdicom

logger = logging.getLogger(__name__)

# Reasons a series (or a file of one) is refused; "localizer" is a skip, not a failure.
SERIES_FAILURE_REASONS = ("series_gap", "series_duplicate_position", "series_mixed_orientation",
                          "series_too_few_slices")
SERIES_SKIP_REASONS = ("localizer",)
# Reasons group_series sets a single file aside for (failures): no geometry to place it by, or a
# multi-frame object, which is a volume of its own and not a slice of one.
NO_GEOMETRY, NO_SERIES_UID, MULTIFRAME = "no_geometry", "no_series_uid", "unsupported_multiframe"
# Largest rotation between a slice's orientation and its series' most common one still taken as
# the same orientation: (0020,0037) written with 6 decimals differs by ~1e-4 degrees, while a
# tilted slice or a gantry-tilt mix is a degree or more.
ORIENTATION_TOLERANCE_DEG = 0.1
# Slice positions may deviate this fraction of the slice spacing from the regular grid
# (highdicom's default, passed explicitly so that diagnosis and assembly agree).
SPACING_RTOL = 0.01
AIR_HU = -1000.0
_PLANES = ("sagittal", "coronal", "axial")  # the patient axis (LPS x, y, z) a slice normal is closest to


@dataclass(frozen=True)
class SliceHeader:
    """What grouping and diagnosis need of one file, from its header alone.

    Geometry fields are empty tuples when the file lacks them; :func:`group_series` sets such a
    file aside (``no_geometry``) unless it is a localizer.
    """

    relative_path: str
    sha256: str                          # of the file's bytes
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str
    modality: str
    sop_class_uid: str
    image_type: tuple[str, ...]
    rows: int
    columns: int
    pixel_spacing: tuple[float, ...]     # (row, column) mm, (0028,0030)
    orientation: tuple[float, ...]       # (0020,0037) Image Orientation (Patient), 6 cosines
    position: tuple[float, ...]          # (0020,0032) Image Position (Patient), mm
    frames: int = 1                      # (0028,0008) Number of Frames

    @property
    def is_localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def has_geometry(self) -> bool:
        return (len(self.orientation) == 6 and len(self.position) == 3 and len(self.pixel_spacing) == 2
                and bool(self.frame_of_reference_uid))


@dataclass(frozen=True)
class SeriesGroup:
    """Slices that can form one volume: one series, frame of reference, size, pixel spacing and
    orientation plane, in geometric order (ascending distance along the slice normal as highdicom
    orders a volume; files at the same position by path)."""

    key: str
    headers: tuple[SliceHeader, ...]

    @property
    def series_instance_uid(self) -> str:
        return self.headers[0].series_instance_uid


@dataclass(frozen=True)
class SeriesDiagnosis:
    """What is wrong with a series' geometry, if anything (:func:`diagnose`)."""

    files: int
    positions: int                 # distinct slice positions
    missing: int                   # positions missing from the regular grid
    duplicates_identical: int      # extra files at a position, byte-identical to another there
    duplicates_differing: int      # extra files at a position, with different content
    spacing_mm: float              # median distance between consecutive distinct positions
    spacing_deviation_mm: float    # largest distance of a position from the regular grid
    orientation_deviation: float   # degrees: largest rotation of a slice from the series' orientation
    reason: str = ""               # the first of problems, "" when fine
    problems: tuple[str, ...] = ()  # every failure reason that applies, most serious first
    detail: str = ""               # one line on the first problem, values only (no PHI)

    def as_metrics(self) -> dict[str, float]:
        """The numbers for the index and the stage's metrics (NaN where undefined)."""
        return {"series_files": self.files, "series_positions": self.positions,
                "series_missing": self.missing, "series_duplicates_identical": self.duplicates_identical,
                "series_duplicates_differing": self.duplicates_differing,
                "series_spacing_mm": self.spacing_mm,
                "series_spacing_deviation_mm": self.spacing_deviation_mm,
                "series_orientation_deviation_deg": self.orientation_deviation}


@dataclass(frozen=True)
class VolumeSettings:
    """How a series becomes the model's volume (the ``ingest`` params of the series unit)."""

    spacing_mm: tuple[float, float, float]   # (z, y, x) target spacing
    size: tuple[int, int, int]               # (d, h, w) output shape
    window: tuple[float, float]              # (center, width) in HU
    max_decoded_mib: int = 2048              # bound on the series' decoded float32 size

    def __post_init__(self) -> None:
        if len(self.spacing_mm) != 3 or not all(s > 0 for s in self.spacing_mm):
            raise ValueError(f"VolumeSettings.spacing_mm must be 3 positive numbers (z, y, x) in mm; "
                             f"got {self.spacing_mm!r}")
        if len(self.size) != 3 or not all(int(s) == s and s >= 1 for s in self.size):
            raise ValueError(f"VolumeSettings.size must be 3 positive integers (d, h, w); got {self.size!r}")
        if len(self.window) != 2 or not self.window[1] > 0:
            raise ValueError(f"VolumeSettings.window must be (center, width) with width > 0 HU; "
                             f"got {self.window!r}")

    @classmethod
    def from_params(cls, params) -> VolumeSettings:
        """The settings of an ``ingest`` params section (``IngestParams``: its ``series`` and
        ``max_decoded_mib``)."""
        series = params.series
        return cls(spacing_mm=tuple(series.spacing_mm), size=tuple(series.volume_size), window=series.window_hu,
                   max_decoded_mib=params.max_decoded_mib)

    @property
    def max_bytes(self) -> int:
        return self.max_decoded_mib << 20


@dataclass(frozen=True)
class Volume:
    """One assembled series (:func:`read_volume`)."""

    pixels: np.ndarray                       # uint8 (d, h, w), windowed HU
    hu_min: float                            # of the assembled HU volume, before resampling
    hu_max: float
    hu_mean: float
    hu_std: float
    source_shape: tuple[int, int, int]       # (slices, rows, columns) assembled, gaps filled
    source_spacing_mm: tuple[float, float, float]  # (z, y, x)
    resampled_shape: tuple[int, int, int]    # at spacing_mm, before cropping or padding
    slices: int                              # files used
    filled: int                              # slices interpolated into gaps
    affine: np.ndarray = field(repr=False)   # 4x4: output voxel (z, y, x) index to LPS mm


def read_slice_header(path: Path, *, data_dir: Path, max_bytes: int) -> SliceHeader:
    """The header of one file, without decoding its pixels.

    Parameters
    ----------
    path : Path
        The file, under ``data_dir``.
    data_dir : Path
        The folder ingest reads; ``relative_path`` is relative to it.
    max_bytes : int
        Files (or deflated data sets) larger than this are refused before parsing.

    Returns
    -------
    SliceHeader

    Raises
    ------
    Quarantined
        With the reader's reasons (``too_large``, ``not_dicom``, ``truncated_header``, ...),
        ``not_an_image`` for objects without pixels (SR, presentation states), ``dicomdir``; any
        other error as :func:`~dicomflow.dicom.reading.failure_reason` names it. Never anything else.
    """
    relative = path.relative_to(data_dir).as_posix()
    try:
        content = read_file(path, max_bytes=max_bytes)
        # defer_size: (7FE0,0010) Pixel Data is skipped, not copied; read_dataset still sees it.
        ds = read_dataset(io.BytesIO(content), max_bytes=max_bytes, defer_size=4096)
        spacing = _floats(_text(ds, "PixelSpacing") or _text(ds, "ImagerPixelSpacing"), 2)
        return SliceHeader(
            relative_path=relative, sha256=hashlib.sha256(content).hexdigest(),
            sop_instance_uid=_text(ds, "SOPInstanceUID"), series_instance_uid=_text(ds, "SeriesInstanceUID"),
            study_instance_uid=_text(ds, "StudyInstanceUID"),
            frame_of_reference_uid=_text(ds, "FrameOfReferenceUID"), modality=_text(ds, "Modality"),
            sop_class_uid=_text(ds, "SOPClassUID"),
            image_type=tuple(v.strip().upper() for v in _text(ds, "ImageType").split("\\") if v.strip()),
            rows=int(ds.get("Rows", 0) or 0), columns=int(ds.get("Columns", 0) or 0),
            pixel_spacing=spacing if spacing and min(spacing) > 0 else (),
            orientation=_floats(_text(ds, "ImageOrientationPatient"), 6),
            position=_floats(_text(ds, "ImagePositionPatient"), 3),
            frames=number_of_frames(ds))
    except Quarantined:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a damaged value must quarantine this file only
        raise failure_reason(err, reading="the header") from err


def _text(ds: pydicom.Dataset, keyword: str) -> str:
    """An element's value as text, "" when absent, multiple values joined by backslashes.

    Read from the raw bytes where pydicom has not converted them yet: the elements read here
    (UI, CS, DS) are ASCII by their VR, and pydicom's conversion with its validation costs about
    half of the time of reading a header (profiled: 2.7 ms a file, 1.3 ms of it converting).
    """
    element = ds.get_item(keyword)
    if element is None:
        return ""
    value = element.value
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip(" \x00")
    if value is None:
        return ""
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def _floats(text: str, count: int) -> tuple[float, ...]:
    """``count`` finite floats from a DS element's text, or () when absent or malformed."""
    try:
        numbers = tuple(float(v) for v in text.split("\\"))
    except ValueError:
        return ()
    return numbers if len(numbers) == count and all(math.isfinite(n) for n in numbers) else ()


def group_series(headers: Iterable[SliceHeader]) -> tuple[list[SeriesGroup], list[tuple[str, str, str]]]:
    """Group slice headers into volumes.

    Parameters
    ----------
    headers : iterable of SliceHeader
        From :func:`read_slice_header`, in any order.

    Returns
    -------
    groups : list of SeriesGroup
        By (0020,000E) Series Instance UID, split further by (0020,0052) Frame of Reference UID,
        (Rows, Columns), (0028,0030) Pixel Spacing and orientation plane; ordered by series UID,
        then key; slices in geometric order.
    set_aside : list of (relative_path, reason, detail)
        ``localizer`` ((0008,0008) Image Type contains LOCALIZER: a skip), ``no_series_uid``,
        ``no_geometry`` (no position, orientation, pixel spacing or frame of reference),
        ``unsupported_multiframe``; in path order.

    Notes
    -----
    The orientation enters the key only as its *plane* (the patient axis the slice normal is
    closest to: sagittal, coronal or axial), not as the exact cosines. A slice tilted a few
    degrees inside an axial series therefore stays in that series, and :func:`diagnose` refuses
    the series as ``series_mixed_orientation``; keyed by exact orientation it would become a
    one-slice series of its own and the rest would pass as if nothing were wrong. Genuinely
    different stacks in one series (an axial and a sagittal reformat) are different planes and
    are split.
    """
    buckets: dict[tuple, list[SliceHeader]] = defaultdict(list)
    set_aside: list[tuple[str, str, str]] = []
    for header in headers:
        if header.is_localizer:
            set_aside.append((header.relative_path, "localizer",
                              "(0008,0008) Image Type contains LOCALIZER: a scout, not a slice of the volume"))
        elif header.frames > 1:
            set_aside.append((header.relative_path, MULTIFRAME,
                              f"a multi-frame object ({header.frames} frames): series assembly takes "
                              "single-frame slices; use ingest.unit: image for it"))
        elif not header.series_instance_uid:
            set_aside.append((header.relative_path, NO_SERIES_UID,
                              "(0020,000E) Series Instance UID is absent: the file cannot be grouped"))
        elif not header.has_geometry:
            set_aside.append((header.relative_path, NO_GEOMETRY, _missing_geometry(header)))
        else:
            buckets[_group_key(header)].append(header)
    groups = [SeriesGroup(key=_format_key(key), headers=_geometric_order(members))
              for key, members in buckets.items()]
    groups.sort(key=lambda g: (g.series_instance_uid, g.key))
    set_aside.sort()
    return groups, set_aside


def _missing_geometry(header: SliceHeader) -> str:
    absent = [name for name, value in (
        ("(0020,0032) Image Position (Patient)", header.position),
        ("(0020,0037) Image Orientation (Patient)", header.orientation),
        ("(0028,0030) Pixel Spacing", header.pixel_spacing),
        ("(0020,0052) Frame of Reference UID", header.frame_of_reference_uid)) if not value]
    return f"{', '.join(absent)} absent or malformed: the slice cannot be placed in a volume"


@functools.lru_cache(maxsize=256)  # a series has one or a few orientations; np.cross is slow
def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    """Unit normal of a slice, signed as highdicom orders a volume's slices."""
    from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector  # heavy import, local

    normal = np.asarray(get_normal_vector(orientation, index_convention=VOLUME_INDEX_CONVENTION), dtype=np.float64)
    normal.flags.writeable = False  # shared by the cache
    return normal


@functools.lru_cache(maxsize=256)
def _plane(orientation: tuple[float, ...]) -> str:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    return _PLANES[int(np.argmax(np.abs(np.cross(row, col))))]


def _group_key(header: SliceHeader) -> tuple:
    spacing = tuple(round(s, 6) for s in header.pixel_spacing)
    return (header.series_instance_uid, header.frame_of_reference_uid, header.rows, header.columns,
            spacing, _plane(header.orientation))


def _format_key(key: tuple) -> str:
    series, frame, rows, cols, spacing, plane = key
    return f"{series}|{frame}|{rows}x{cols}|{spacing[0]:g}x{spacing[1]:g}mm|{plane}"


def _reference_orientation(headers: Iterable[SliceHeader]) -> tuple[float, ...]:
    """The most common orientation (ties: the smallest cosines), as highdicom chooses one."""
    counts = Counter(h.orientation for h in headers)
    return max(counts, key=lambda o: (counts[o], tuple(-v for v in o)))


def _distances(headers: Iterable[SliceHeader], orientation: tuple[float, ...]) -> np.ndarray:
    return np.array([h.position for h in headers], dtype=np.float64) @ _normal(orientation)


def _geometric_order(headers: list[SliceHeader]) -> tuple[SliceHeader, ...]:
    distances = _distances(headers, _reference_orientation(headers))
    order = sorted(range(len(headers)), key=lambda i: (round(float(distances[i]), 4), headers[i].relative_path))
    return tuple(headers[i] for i in order)


@functools.lru_cache(maxsize=256)
def _rotation_deg(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Angle of the rotation taking orientation ``a`` to ``b`` (degrees): for a slice tilted
    about an in-plane axis, the angle between the normals; it also sees in-plane rotations and
    flips, which leave the normal where it was."""
    frames = []
    for o in (a, b):
        row, col = np.asarray(o[:3], dtype=np.float64), np.asarray(o[3:], dtype=np.float64)
        row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
        frames.append(np.stack([row, col, np.cross(row, col)]))
    cosine = (np.trace(frames[0] @ frames[1].T) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, float(cosine)))))


def diagnose(group: SeriesGroup, *, min_slices: int = 1) -> SeriesDiagnosis:
    """The geometry of one series: positions, gaps, duplicates, spacing, orientation.

    Parameters
    ----------
    group : SeriesGroup
    min_slices : int, default=1
        Fewer distinct positions than this adds ``series_too_few_slices``.

    Returns
    -------
    SeriesDiagnosis
        ``reason`` is the most serious problem: ``series_mixed_orientation`` (a slice rotated
        more than :data:`ORIENTATION_TOLERANCE_DEG` from the series' most common orientation),
        ``series_duplicate_position`` (files at one position with different content),
        ``series_gap`` (positions missing from the regular grid, or positions off it by more
        than :data:`SPACING_RTOL` of the spacing or not stacked along the normal),
        ``series_duplicate_position`` (byte-identical copies only), ``series_too_few_slices``.

    Notes
    -----
    Positions are distances along the normal of the most common orientation (signed as
    highdicom orders slices); files within 0.01 mm are at the same position. The spacing is the
    median step between distinct positions, so one gap does not move it; the missing count and
    the regularity verdict come from :func:`highdicom.spatial.get_volume_positions` (what
    ``get_series_volume_positions`` calls, with the same ``allow_missing_positions`` and
    ``allow_duplicate_positions``), which is what assembly will accept.
    """
    from highdicom.spatial import get_volume_positions  # heavy import, local

    headers = group.headers
    reference = _reference_orientation(headers)
    deviation = max(_rotation_deg(reference, h.orientation) for h in headers)
    distances = _distances(headers, reference)
    clusters = _position_clusters(distances)
    identical = differing = 0
    for members in clusters:
        contents = Counter(headers[i].sha256 for i in members)
        differing += len(contents) - 1
        identical += len(members) - len(contents)
    centres = np.array([float(np.mean(distances[members])) for members in clusters])
    spacing = float(np.median(np.diff(centres))) if len(centres) > 1 else float("nan")
    missing, grid_deviation, regular = 0, 0.0, True
    if len(clusters) > 1:
        # highdicom's verdict on the distinct positions, as get_series_volume_positions gives it
        # for datasets (it is called with positions here: the headers are not datasets).
        _, indices = get_volume_positions([headers[members[0]].position for members in clusters], reference,
                                          rtol=SPACING_RTOL, allow_missing_positions=True,
                                          allow_duplicate_positions=True)
        regular = indices is not None
        missing = max(indices) + 1 - len(clusters) if regular else 0
        multiples = np.round((centres - centres[0]) / spacing)
        grid_deviation = float(np.max(np.abs(centres - centres[0] - multiples * spacing)))
    problems, detail = [], []
    if deviation > ORIENTATION_TOLERANCE_DEG:
        problems.append("series_mixed_orientation")
        detail.append(f"a slice is rotated {deviation:.2f} degrees from the series' orientation "
                      f"(tolerance {ORIENTATION_TOLERANCE_DEG})")
    if differing:
        problems.append("series_duplicate_position")
        detail.append(f"{differing} file(s) share a slice position with a file of different content")
    if not regular:
        problems.append("series_gap")
        detail.append(f"slice positions are off a regular {spacing:.3g} mm grid by up to "
                      f"{grid_deviation:.3g} mm, or not stacked along the slice normal")
    elif missing:
        problems.append("series_gap")
        detail.append(f"{missing} slice position(s) missing from a regular {spacing:.3g} mm grid "
                      "(ingest.series.policy: fill_gaps interpolates them)")
    if identical and not differing:
        problems.append("series_duplicate_position")
        detail.append(f"{identical} byte-identical duplicate file(s) (ingest.series.policy: dedupe drops them)")
    if len(clusters) < min_slices:
        problems.append("series_too_few_slices")
        detail.append(f"{len(clusters)} slice position(s), fewer than {min_slices}")
    return SeriesDiagnosis(files=len(headers), positions=len(clusters), missing=missing,
                           duplicates_identical=identical, duplicates_differing=differing,
                           spacing_mm=spacing, spacing_deviation_mm=grid_deviation,
                           orientation_deviation=deviation, reason=problems[0] if problems else "",
                           problems=tuple(problems), detail=detail[0] if detail else "")


def _position_clusters(distances: np.ndarray) -> list[list[int]]:
    """Indices of the slices at each position (within 0.01 mm along the normal), in geometric order."""
    clusters: list[list[int]] = []
    last = None
    for i in np.argsort(distances, kind="stable"):
        if last is None or distances[i] - last > 0.01:
            clusters.append([])
        clusters[-1].append(int(i))
        last = distances[i]
    return clusters


def apply_policy(group: SeriesGroup, diagnosis: SeriesDiagnosis, policy: str, *, min_slices: int) -> SeriesGroup:
    """The slices to assemble under ``policy``, or refuse the series.

    Parameters
    ----------
    group : SeriesGroup
    diagnosis : SeriesDiagnosis
        ``diagnose(group)``.
    policy : {'strict', 'dedupe', 'fill_gaps'}
        ``strict``: any problem refuses the series. ``dedupe``: byte-identical duplicates are
        dropped (the first in path order kept); anything else refuses. ``fill_gaps``: as dedupe,
        and gaps on a regular grid are accepted (:func:`read_volume` with ``fill_gaps=True``
        interpolates them).
    min_slices : int
        Fewer distinct positions refuse the series under every policy.

    Returns
    -------
    SeriesGroup
        ``group`` itself, or without the dropped duplicates.

    Raises
    ------
    Quarantined
        With the diagnosis' reason, or ``series_too_few_slices``.
    ValueError
        An unknown ``policy``.
    """
    if policy not in SERIES_POLICIES:
        raise ValueError(f"ingest.series.policy must be one of {', '.join(SERIES_POLICIES)}; got {policy!r}")
    if diagnosis.positions < min_slices:
        raise Quarantined("series_too_few_slices", f"{diagnosis.positions} slice position(s), fewer than "
                          f"ingest.min_slices {min_slices}")
    problems = [p for p in diagnosis.problems if p != "series_too_few_slices"]
    if policy == "strict" and problems:
        raise Quarantined(problems[0], diagnosis.detail or problems[0])
    if "series_mixed_orientation" in problems or diagnosis.duplicates_differing:
        raise Quarantined(problems[0], diagnosis.detail)
    if "series_gap" in problems and (policy != "fill_gaps" or diagnosis.missing == 0):
        # missing == 0 with series_gap: irregular positions, which no interpolation repairs.
        raise Quarantined("series_gap", diagnosis.detail)  # the first problem left here
    if not diagnosis.duplicates_identical:
        return group
    # Only identical copies are left at a shared position here: keep the first path of each.
    distances = _distances(group.headers, _reference_orientation(group.headers))
    keep = {min(group.headers[i].relative_path for i in members) for members in _position_clusters(distances)}
    return replace(group, headers=tuple(h for h in group.headers if h.relative_path in keep))


def read_volume(group: SeriesGroup, *, data_dir: Path, settings: VolumeSettings, fill_gaps: bool) -> Volume:
    """Assemble one series (geometry by highdicom) and fit it to ``settings``.

    Parameters
    ----------
    group : SeriesGroup
        Accepted by :func:`apply_policy` (one file per position).
    data_dir : Path
        The folder the headers' relative paths are relative to.
    settings : VolumeSettings
    fill_gaps : bool
        Fill positions missing from the regular grid with slices linearly interpolated in HU
        between their neighbours (by distance), before the volume is built; without it a gap
        is refused.

    Returns
    -------
    Volume
        ``pixels``: HU from the modality LUT ((0028,1052)/(0028,1053) or a Modality LUT
        Sequence, per slice), resampled along the volume's own axes (highdicom's affine: axis 0
        ascending along the slice normal, then rows, then columns) to ``settings.spacing_mm`` by
        linear interpolation (the output grid covers the input's extent, voxel centres aligned
        as in a resize), centre-cropped or padded with air (-1000 HU) to ``settings.size``, and
        windowed to 0-255: ``clip((HU - (center - width/2)) / width, 0, 1) x 255``, rounded.

    Raises
    ------
    Quarantined
        ``too_large``: the decoded series (Rows x Columns x slices x 4 bytes, gaps filled)
        passes ``settings.max_decoded_mib``; ``series_gap`` or ``series_mixed_orientation``
        when highdicom does not find one regularly spaced volume; a file's own reason when it
        cannot be read or decoded, or ``series_inconsistent`` when it does not match its header.

    Notes
    -----
    The slice order, spacing and refusal are highdicom's
    (:func:`highdicom.spatial.get_volume_positions`, which ``get_series_volume_positions`` and
    so ``highdicom.get_volume_from_series`` call, after the same orientation check, with the
    tolerances :func:`diagnose` uses), the affine is highdicom's (``VolumeGeometry`` from the
    first slice), so the volume is the one ``get_volume_from_series`` builds (a test compares
    them voxel for voxel). The pixels are decoded here
    instead, one file at a time, straight into the float32 volume: ``get_volume_from_series``
    keeps every parsed file, pydicom's cached decoded pixels of each, a float32 copy of each
    slice and the stacked volume, 3x the decoded size (measured). Here the peak is the volume
    (1x), one file and its slice, then during resampling one intermediate no larger than the
    volume when the target spacing is no finer than the source (the most shrinking axis goes
    first): at most 2x the series' decoded float32 size plus the output;
    ``tests/test_series.py`` checks it with tracemalloc on a 200-slice series.
    """
    headers = group.headers
    order, spacing_between = _volume_positions(group, fill_gaps=fill_gaps)
    depth = max(order) + 1
    rows, columns = headers[0].rows, headers[0].columns
    decoded = rows * columns * depth * 4
    if decoded > settings.max_bytes:
        raise Quarantined("too_large", f"the series decodes to {decoded >> 20} MiB ({depth} slices of "
                          f"{rows}x{columns} float32), more than ingest.max_decoded_mib {settings.max_decoded_mib}")
    hu = np.empty((depth, rows, columns), dtype=np.float32)
    present = np.zeros(depth, dtype=bool)
    for header, index in zip(headers, order):
        hu[index] = _slice_hu(data_dir / header.relative_path, header, max_bytes=settings.max_bytes)
        present[index] = True
    filled = _fill_missing(hu, present)
    first = headers[order.index(0)]
    geometry = _volume_geometry(first, depth, spacing_between, _reference_orientation(headers))
    stats = _hu_statistics(hu)
    spacing = tuple(float(s) for s in _axis_spacing(geometry.affine))
    resampled_shape = tuple(max(1, round(n * s / t)) for n, s, t in zip(hu.shape, spacing, settings.spacing_mm))
    out, out_affine = _resample(hu, geometry.affine, spacing, settings, resampled_shape)
    source_shape = hu.shape
    del hu
    return Volume(pixels=_window(out, settings.window), **stats, source_shape=tuple(source_shape),
                  source_spacing_mm=spacing, resampled_shape=resampled_shape, slices=len(headers),
                  filled=filled, affine=out_affine)


def _volume_positions(group: SeriesGroup, *, fill_gaps: bool) -> tuple[list[int], float]:
    """highdicom's index in the volume of each slice of ``group`` and the slice spacing, or
    raise Quarantined with the reason of the refusal."""
    from highdicom.spatial import get_volume_positions  # heavy import, local

    headers = group.headers
    if len(headers) == 1:
        return [0], 1.0
    # What highdicom.spatial.get_series_volume_positions does before it calls
    # get_volume_positions, with the tolerance diagnose uses; its own multi-frame check looks the
    # SOP class up in the standard's tables, 1.6 ms a file (group_series set multi-frame aside).
    reference = _reference_orientation(headers)
    rotation = max(_rotation_deg(reference, h.orientation) for h in headers)
    if rotation > ORIENTATION_TOLERANCE_DEG:
        raise Quarantined("series_mixed_orientation", f"a slice is rotated {rotation:.2f} degrees from the "
                          f"series' orientation (tolerance {ORIENTATION_TOLERANCE_DEG})")
    distinct = len(_position_clusters(_distances(headers, reference)))
    if distinct < len(headers):
        raise Quarantined("series_duplicate_position", f"{len(headers) - distinct} file(s) share a slice "
                          "position with another (apply_policy decides which to keep)")
    spacing, order = get_volume_positions([h.position for h in headers], reference, rtol=SPACING_RTOL,
                                          allow_missing_positions=fill_gaps)
    if order is None:
        raise Quarantined("series_gap", "highdicom found no regularly spaced volume in the slice positions"
                          + ("" if fill_gaps else " (ingest.series.policy: fill_gaps fills missing slices)"))
    return order, float(spacing)


def _slice_hu(path: Path, header: SliceHeader, *, max_bytes: int) -> np.ndarray:
    """One file's pixels through its modality LUT, float32, or raise Quarantined."""
    try:
        with io.BytesIO(read_file(path, max_bytes=max_bytes)) as stream:
            ds = read_dataset(stream, max_bytes=max_bytes)
            [(_, stored)] = decode_frames(ds, frames="first", max_bytes=max_bytes)
        if stored.shape != (header.rows, header.columns):
            raise Quarantined("series_inconsistent", f"pixels of shape {stored.shape}, "
                              f"expected {header.rows}x{header.columns} single-channel")
        return _modality_lut(stored, ds)
    except Quarantined:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # a decoder or LUT failing on one file refuses the series
        raise failure_reason(err, reading="the pixel data") from err


def _modality_lut(stored: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's ``apply_modality_lut`` as float32; for the usual (0028,1053) Rescale Slope and
    (0028,1052) Rescale Intercept computed here from their raw text (the same float64
    arithmetic, without pydicom's attribute conversions, which cost more than the slice)."""
    slope, intercept = _floats(_text(ds, "RescaleSlope"), 1), _floats(_text(ds, "RescaleIntercept"), 1)
    if "ModalityLUTSequence" in ds or not (slope and intercept):
        return apply_modality_lut(stored, ds).astype(np.float32, copy=False)
    return (stored * slope[0] + intercept[0]).astype(np.float32)


def _fill_missing(hu: np.ndarray, present: np.ndarray) -> int:
    """Fill the slices of ``hu`` not ``present`` in place, linearly between the nearest present
    slices on either side; return how many."""
    missing = np.flatnonzero(~present)
    have = np.flatnonzero(present)
    for k in missing:
        below, above = have[have < k].max(), have[have > k].min()
        weight = np.float32((k - below) / (above - below))
        np.multiply(hu[below], np.float32(1.0) - weight, out=hu[k])
        hu[k] += weight * hu[above]
    return len(missing)


def _volume_geometry(first: SliceHeader, depth: int, spacing: float,
                     orientation: tuple[float, ...]) -> highdicom.VolumeGeometry:
    """highdicom's geometry of the volume whose slice 0 is ``first``."""
    from highdicom import VolumeGeometry  # heavy import, local

    return VolumeGeometry.from_attributes(
        image_position=first.position, image_orientation=orientation, rows=first.rows,
        columns=first.columns, pixel_spacing=first.pixel_spacing, spacing_between_slices=spacing,
        number_of_frames=depth, coordinate_system="PATIENT", frame_of_reference_uid=first.frame_of_reference_uid)


def _hu_statistics(hu: np.ndarray) -> dict[str, float]:
    """Min, max, mean and standard deviation in float64, a slice at a time (no float64 copy)."""
    total = total_sq = 0.0
    for plane in hu:
        values = plane.astype(np.float64)
        total += float(values.sum())
        total_sq += float(np.square(values).sum())
    n = hu.size
    mean = total / n
    return {"hu_min": float(hu.min()), "hu_max": float(hu.max()), "hu_mean": mean,
            "hu_std": math.sqrt(max(0.0, total_sq / n - mean * mean))}


def _axis_spacing(affine: np.ndarray) -> np.ndarray:
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def _resample(hu: np.ndarray, affine: np.ndarray, spacing: tuple[float, ...], settings: VolumeSettings,
              resampled_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """``hu`` linearly resampled to ``settings.spacing_mm`` and cropped or padded (air) to
    ``settings.size`` in one pass per axis; returns it with the output grid's affine."""
    scale = np.eye(4)
    order = sorted(range(3), key=lambda a: settings.size[a] / hu.shape[a])  # most shrinking first
    out = hu
    for axis in order:
        factor = settings.spacing_mm[axis] / spacing[axis]
        out, offset = _resample_axis(out, axis, factor=factor, resampled=resampled_shape[axis],
                                     size=settings.size[axis])
        scale[axis, axis], scale[axis, 3] = factor, offset
    return out, np.asarray(affine) @ scale


def _resample_axis(values: np.ndarray, axis: int, *, factor: float, resampled: int,
                   size: int) -> tuple[np.ndarray, float]:
    """One axis: output index o is resampled index r = o + start (the centre crop or pad of
    :func:`~dicomflow.dicom.display.pad_or_crop`), at source index (r + 0.5) x factor - 0.5,
    clamped to the source's first and last slice; r outside the resampled grid is air. Returns
    the array and the source index of output index 0 (for the affine)."""
    n = values.shape[axis]
    start = (resampled - size) // 2 if resampled >= size else -((size - resampled) // 2)
    shape = list(values.shape)
    shape[axis] = size
    out = np.empty(shape, dtype=np.float32)
    source = np.moveaxis(values, axis, 0)
    target = np.moveaxis(out, axis, 0)
    for o in range(size):
        r = o + start
        if not 0 <= r < resampled:
            target[o] = AIR_HU
            continue
        s = min(max((r + 0.5) * factor - 0.5, 0.0), n - 1.0)
        low = int(math.floor(s))
        weight = s - low
        if weight < 1e-6 or low + 1 >= n:
            target[o] = source[low]
        else:
            np.multiply(source[low], np.float32(1.0 - weight), out=target[o])
            target[o] += np.float32(weight) * source[low + 1]
    return out, (start + 0.5) * factor - 0.5


def _window(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU to uint8 through a linear window (center, width)."""
    center, width = window
    scaled = (hu - np.float32(center - width / 2.0)) * np.float32(255.0 / width)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled).astype(np.uint8)


def diagnose_folder(data_dir: Path, *, max_bytes: int = 2048 << 20,
                    min_slices: int = 1) -> list[tuple[SeriesGroup, SeriesDiagnosis]]:
    """Every series under ``data_dir`` with its diagnosis, in one process (for a look at a
    folder; ingest reads the headers in workers). Files that are not slices are left out."""
    headers = []
    for path in sorted(p for p in Path(data_dir).rglob("*") if p.is_file()):
        try:
            headers.append(read_slice_header(path, data_dir=Path(data_dir), max_bytes=max_bytes))
        except Quarantined as err:
            logger.info("%s: %s", path.relative_to(data_dir).as_posix(), err.reason)
    groups, _ = group_series(headers)
    return [(group, diagnose(group, min_slices=min_slices)) for group in groups]
