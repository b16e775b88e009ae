"""Series as units (dicomflow.dicom.series): headers, grouping, diagnosis, policy, assembly.

Every series here is written by the test itself with pydicom: CT Image Storage slices of a body of
BODY_HU holding an ellipsoid of ELLIPSOID_HU at a known place in patient coordinates, stored as
HU + 1024 with (0028,1052) Rescale Intercept -1024, under shuffled random names with (0020,0013)
Instance Number running against the geometry. Expected values come from that construction.
"""

from __future__ import annotations

import math
import shutil
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import BasicTextSRStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicomflow.config.params import SERIES_POLICIES
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.series import (
    SeriesGroup,
    VolumeSettings,
    apply_policy,
    diagnose,
    diagnose_folder,
    group_series,
    read_slice_header,
    read_volume,
)

BODY_HU, ELLIPSOID_HU, AIR_HU = -700, 300, -1000
WINDOW = (0.0, 2000.0)  # center, width: BODY_HU -> 38.25, ELLIPSOID_HU -> 165.75 of 255
MAX_BYTES = 64 << 20
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def windowed(hu: float) -> int:
    """The uint8 a linear window (WINDOW) gives ``hu``, written out again here."""
    center, width = WINDOW
    return int(np.rint(np.clip((hu - (center - width / 2)) / width, 0, 1) * 255))


def tilted(degrees: float) -> tuple[float, ...]:
    """AXIAL rotated about the patient x axis (the row direction) by ``degrees``."""
    a = math.radians(degrees)
    return (1.0, 0.0, 0.0, 0.0, math.cos(a), math.sin(a))


class Series:
    """A synthetic series: ``n`` slices, ``spacing`` mm apart along the slice normal, pixels
    ``pixel`` mm, ``size`` square; slice i of file order at origin + i * spacing * step where step
    is the normal times ``direction`` (-1 for axial head-first: z decreasing)."""

    def __init__(self, *, n: int = 20, size: int = 24, spacing: float = 2.5, pixel: float = 2.0,
                 orientation: tuple[float, ...] = AXIAL, direction: float = -1.0,
                 centre: tuple[float, float, float] = (0.0, 0.0, 15.0),
                 radii: tuple[float, float, float] = (12.0, 12.0, 10.0)) -> None:
        self.n, self.size, self.spacing, self.pixel = n, size, spacing, pixel
        self.orientation, self.centre, self.radii = orientation, np.array(centre), np.array(radii)
        row, col = np.array(orientation[:3]), np.array(orientation[3:])
        self.normal = np.cross(row, col)
        half = (size - 1) / 2 * pixel
        # Centred on the patient origin in plane; along the normal, the middle slice at 0.
        self.origin = -half * row - half * col + direction * self.normal * (-(n - 1) / 2 * spacing)
        self.step = direction * spacing * self.normal
        self.series_uid, self.study_uid, self.frame_uid = generate_uid(), generate_uid(), generate_uid()

    def position(self, i: float) -> np.ndarray:
        return self.origin + i * self.step

    def hu(self, position: np.ndarray, orientation: tuple[float, ...] | None = None) -> np.ndarray:
        """HU of the slice at ``position``: BODY_HU, ELLIPSOID_HU inside the ellipsoid."""
        orientation = orientation or self.orientation
        row, col = np.array(orientation[:3]), np.array(orientation[3:])
        r, c = np.mgrid[0:self.size, 0:self.size] * self.pixel
        points = position + c[..., None] * row + r[..., None] * col
        inside = (((points - self.centre) / self.radii) ** 2).sum(axis=-1) <= 1.0
        return np.where(inside, ELLIPSOID_HU, BODY_HU).astype(np.int32)

    def dataset(self, i: float, *, orientation: tuple[float, ...] | None = None,
                hu: np.ndarray | None = None, **attributes: object) -> Dataset:
        position = self.position(i)
        orientation = orientation or self.orientation
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = self.study_uid, self.series_uid
        ds.FrameOfReferenceUID = self.frame_uid
        ds.PatientID, ds.Modality = "P0", "CT"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = self.n - int(i)  # against the geometry on purpose
        ds.ImagePositionPatient = [f"{v:.4f}" for v in position]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in orientation]
        ds.PixelSpacing = [self.pixel, self.pixel]
        ds.SliceThickness = self.spacing
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        values = self.hu(position, orientation) if hu is None else hu
        ds.set_pixel_data((values + 1024).astype(np.uint16), "MONOCHROME2", 12)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        return ds

    def write(self, folder: Path, *, skip: tuple[int, ...] = (), rng: np.random.Generator | None = None) -> list[Path]:
        """Every slice but ``skip`` under a random name; the paths in slice order."""
        rng = rng or np.random.default_rng(0)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for i in range(self.n):
            if i in skip:
                continue
            path = folder / f"{rng.integers(1 << 40):x}.dcm"
            self.dataset(i).save_as(path, enforce_file_format=True)
            paths.append(path)
        return paths


def headers_of(data_dir: Path) -> list:
    return [read_slice_header(p, data_dir=data_dir, max_bytes=MAX_BYTES)
            for p in sorted(data_dir.rglob("*")) if p.is_file()]


def only_group(data_dir: Path) -> SeriesGroup:
    groups, set_aside = group_series(headers_of(data_dir))
    assert len(groups) == 1, [g.key for g in groups]
    return groups[0]


def settings(spacing: tuple[float, float, float] = (5.0, 4.0, 4.0),
             size: tuple[int, int, int] = (12, 16, 16), max_mib: int = 64) -> VolumeSettings:
    return VolumeSettings(spacing_mm=spacing, size=size, window=WINDOW, max_decoded_mib=max_mib)


def voxel_of(affine: np.ndarray, point: np.ndarray) -> tuple[int, int, int]:
    index = np.linalg.solve(affine, np.append(point, 1.0))[:3]
    return tuple(int(round(v)) for v in index)


class TestReadSliceHeader:
    def test_synthetic_slice(self, tmp_path: Path) -> None:
        series = Series()
        path = series.write(tmp_path)[3]
        header = read_slice_header(path, data_dir=tmp_path, max_bytes=MAX_BYTES)
        assert header.relative_path == path.name
        assert header.series_instance_uid == series.series_uid
        assert header.frame_of_reference_uid == series.frame_uid
        assert header.modality == "CT" and header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
        assert (header.rows, header.columns, header.pixel_spacing) == (24, 24, (2.0, 2.0))
        np.testing.assert_allclose(header.position, series.position(3), atol=1e-4)
        import hashlib
        assert header.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    def test_real_ct_from_pydicom(self, tmp_path: Path) -> None:
        source = Path(pydicom.data.get_testdata_file("CT_small.dcm"))
        shutil.copy(source, tmp_path / "ct.dcm")
        header = read_slice_header(tmp_path / "ct.dcm", data_dir=tmp_path, max_bytes=MAX_BYTES)
        ds = pydicom.dcmread(source)
        assert header.modality == "CT" and (header.rows, header.columns) == (128, 128)
        assert header.series_instance_uid == ds.SeriesInstanceUID
        assert header.position == tuple(float(v) for v in ds.ImagePositionPatient)
        assert header.orientation == tuple(float(v) for v in ds.ImageOrientationPatient)
        assert header.has_geometry

    def test_structured_report_is_not_an_image(self, tmp_path: Path) -> None:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, generate_uid()
        ds.SeriesInstanceUID, ds.Modality = generate_uid(), "SR"
        ds.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
        with pytest.raises(Quarantined, match="not an image") as caught:
            read_slice_header(tmp_path / "sr.dcm", data_dir=tmp_path, max_bytes=MAX_BYTES)
        assert caught.value.reason == "not_an_image"

    def test_truncated_file_is_quarantined(self, tmp_path: Path) -> None:
        path = Series().write(tmp_path)[0]
        path.write_bytes(path.read_bytes()[:400])  # cut inside the header
        with pytest.raises(Quarantined) as caught:
            read_slice_header(path, data_dir=tmp_path, max_bytes=MAX_BYTES)
        assert caught.value.reason in ("truncated_header", "corrupt_header")

    def test_text_file_is_quarantined(self, tmp_path: Path) -> None:
        (tmp_path / "notes.txt").write_text("not dicom\n" * 20)
        with pytest.raises(Quarantined) as caught:
            read_slice_header(tmp_path / "notes.txt", data_dir=tmp_path, max_bytes=MAX_BYTES)
        assert caught.value.reason == "not_dicom"


class TestGroupSeries:
    def test_slices_in_geometric_order_whatever_names_and_instance_numbers(self, tmp_path: Path) -> None:
        series = Series()
        series.write(tmp_path)
        group = only_group(tmp_path)
        z = [h.position[2] for h in group.headers]
        # Axial head-first: highdicom's order puts the most superior (largest z) slice first.
        assert z == sorted(z, reverse=True)
        assert [h.relative_path for h in group.headers] != sorted(h.relative_path for h in group.headers)

    def test_two_series_in_one_folder(self, tmp_path: Path) -> None:
        first, second = Series(n=16), Series(n=18, orientation=SAGITTAL)
        first.write(tmp_path, rng=np.random.default_rng(1))
        second.write(tmp_path, rng=np.random.default_rng(2))
        groups, set_aside = group_series(headers_of(tmp_path))
        assert set_aside == []
        assert [g.series_instance_uid for g in groups] == sorted([first.series_uid, second.series_uid])
        sizes = {g.series_instance_uid: len(g.headers) for g in groups}
        assert sizes == {first.series_uid: 16, second.series_uid: 18}
        assert groups == group_series(reversed(headers_of(tmp_path)))[0]  # input order does not matter

    def test_localizer_set_aside(self, tmp_path: Path) -> None:
        series = Series()
        series.write(tmp_path)
        scout = series.dataset(0, orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
                               ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
        scout.save_as(tmp_path / "scout.dcm", enforce_file_format=True)
        groups, set_aside = group_series(headers_of(tmp_path))
        assert [(path, reason) for path, reason, _ in set_aside] == [("scout.dcm", "localizer")]
        assert len(groups) == 1 and len(groups[0].headers) == 20
        assert diagnose(groups[0]).reason == ""
        volume = read_volume(groups[0], data_dir=tmp_path, settings=settings(), fill_gaps=False)
        assert volume.slices == 20

    def test_slice_without_position_set_aside(self, tmp_path: Path) -> None:
        series = Series()
        series.write(tmp_path)
        ds = series.dataset(3)
        del ds.ImagePositionPatient
        ds.save_as(tmp_path / "lost.dcm", enforce_file_format=True)
        groups, set_aside = group_series(headers_of(tmp_path))
        assert [(p, r) for p, r, _ in set_aside] == [("lost.dcm", "no_geometry")]
        assert "(0020,0032)" in set_aside[0][2]


    def test_multiframe_set_aside(self, tmp_path: Path) -> None:
        series = Series()
        series.write(tmp_path)
        ds = series.dataset(0)
        ds.set_pixel_data(np.zeros((3, 24, 24), dtype=np.uint16), "MONOCHROME2", 12)
        ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
        groups, set_aside = group_series(headers_of(tmp_path))
        assert [(p, r) for p, r, _ in set_aside] == [("multi.dcm", "unsupported_multiframe")]
        assert len(groups[0].headers) == 20


class TestDiagnoseAndPolicy:
    def test_clean_series(self, tmp_path: Path) -> None:
        Series().write(tmp_path)
        group = only_group(tmp_path)
        diagnosis = diagnose(group)
        assert diagnosis.reason == "" and diagnosis.problems == ()
        assert (diagnosis.files, diagnosis.positions, diagnosis.missing) == (20, 20, 0)
        assert diagnosis.spacing_mm == pytest.approx(2.5, abs=1e-3)
        assert diagnosis.spacing_deviation_mm < 1e-3 and diagnosis.orientation_deviation < 1e-3
        metrics = diagnosis.as_metrics()
        assert metrics["series_files"] == 20 and metrics["series_spacing_mm"] == pytest.approx(2.5, abs=1e-3)
        for policy in SERIES_POLICIES:
            assert apply_policy(group, diagnosis, policy, min_slices=8) == group

    def test_missing_slice(self, tmp_path: Path) -> None:
        Series().write(tmp_path, skip=(7,))
        group = only_group(tmp_path)
        diagnosis = diagnose(group)
        assert diagnosis.reason == "series_gap" and diagnosis.missing == 1
        assert (diagnosis.files, diagnosis.positions) == (19, 19)
        assert diagnosis.spacing_mm == pytest.approx(2.5, abs=1e-3)
        for policy in ("strict", "dedupe"):
            with pytest.raises(Quarantined, match="1 slice position") as caught:
                apply_policy(group, diagnosis, policy, min_slices=8)
            assert caught.value.reason == "series_gap"
        accepted = apply_policy(group, diagnosis, "fill_gaps", min_slices=8)
        volume = read_volume(accepted, data_dir=tmp_path, settings=settings(), fill_gaps=True)
        assert volume.filled == 1 and volume.slices == 19 and volume.source_shape == (20, 24, 24)
        with pytest.raises(Quarantined) as caught:
            read_volume(accepted, data_dir=tmp_path, settings=settings(), fill_gaps=False)
        assert caught.value.reason == "series_gap"

    def test_filled_slice_interpolates_its_neighbours(self, tmp_path: Path) -> None:
        # The ellipsoid's edge moves between slices 6 and 8: the filled slice 7 is their mean.
        series = Series(centre=(0.0, 0.0, 6.0), radii=(14.0, 14.0, 12.0))
        series.write(tmp_path, skip=(7,))
        group = only_group(tmp_path)
        # Output = the source grid (same spacing, same size): voxels are the source's.
        volume = read_volume(group, data_dir=tmp_path, fill_gaps=True,
                             settings=settings(spacing=(2.5, 2.0, 2.0), size=(20, 24, 24)))
        k = voxel_of(volume.affine, series.position(7))[0]
        expected = (series.hu(series.position(6)) + series.hu(series.position(8))) / 2
        window = np.clip((expected - (WINDOW[0] - WINDOW[1] / 2)) / WINDOW[1], 0, 1) * 255
        np.testing.assert_array_equal(volume.pixels[k], np.rint(window).astype(np.uint8))

    def test_irregular_spacing_is_refused_even_with_fill_gaps(self, tmp_path: Path) -> None:
        series = Series()
        paths = series.write(tmp_path)
        paths[9].unlink()
        series.dataset(9.32).save_as(tmp_path / "shifted.dcm", enforce_file_format=True)  # 0.8 mm off
        group = only_group(tmp_path)
        diagnosis = diagnose(group)
        assert diagnosis.reason == "series_gap" and diagnosis.missing == 0
        assert diagnosis.spacing_deviation_mm == pytest.approx(0.8, abs=1e-3)
        for policy in SERIES_POLICIES:
            with pytest.raises(Quarantined, match="off a regular 2.5 mm grid by up to 0.8 mm") as caught:
                apply_policy(group, diagnosis, policy, min_slices=8)
            assert caught.value.reason == "series_gap"

    def test_duplicate_position_with_different_content(self, tmp_path: Path) -> None:
        series = Series()
        series.write(tmp_path)
        series.dataset(5, hu=np.full((24, 24), 50)).save_as(tmp_path / "again.dcm", enforce_file_format=True)
        group = only_group(tmp_path)
        diagnosis = diagnose(group)
        assert diagnosis.reason == "series_duplicate_position"
        assert (diagnosis.duplicates_differing, diagnosis.duplicates_identical) == (1, 0)
        assert (diagnosis.files, diagnosis.positions) == (21, 20)
        for policy in SERIES_POLICIES:
            with pytest.raises(Quarantined) as caught:
                apply_policy(group, diagnosis, policy, min_slices=8)
            assert caught.value.reason == "series_duplicate_position"

    def test_byte_identical_duplicate(self, tmp_path: Path) -> None:
        paths = Series().write(tmp_path)
        shutil.copy(paths[5], tmp_path / "0-copy.dcm")  # sorts first by path: the one kept
        group = only_group(tmp_path)
        diagnosis = diagnose(group)
        assert diagnosis.reason == "series_duplicate_position"
        assert (diagnosis.duplicates_identical, diagnosis.duplicates_differing) == (1, 0)
        with pytest.raises(Quarantined) as caught:
            apply_policy(group, diagnosis, "strict", min_slices=8)
        assert caught.value.reason == "series_duplicate_position"
        for policy in ("dedupe", "fill_gaps"):
            kept = apply_policy(group, diagnosis, policy, min_slices=8)
            names = [h.relative_path for h in kept.headers]
            assert len(names) == 20 and "0-copy.dcm" in names and paths[5].name not in names
            assert diagnose(kept).reason == ""

    def test_tilted_slice_is_mixed_orientation_not_a_new_series(self, tmp_path: Path) -> None:
        series = Series()
        paths = series.write(tmp_path)
        paths[9].unlink()
        series.dataset(9, orientation=tilted(3.0)).save_as(tmp_path / "tilted.dcm", enforce_file_format=True)
        group = only_group(tmp_path)  # one group of 20, not 19 + 1
        assert len(group.headers) == 20
        diagnosis = diagnose(group)
        assert diagnosis.reason == "series_mixed_orientation"
        assert diagnosis.orientation_deviation == pytest.approx(3.0, abs=1e-3)
        for policy in SERIES_POLICIES:
            with pytest.raises(Quarantined) as caught:
                apply_policy(group, diagnosis, policy, min_slices=8)
            assert caught.value.reason == "series_mixed_orientation"
        with pytest.raises(Quarantined) as caught:  # highdicom refuses it too
            read_volume(group, data_dir=tmp_path, settings=settings(), fill_gaps=False)
        assert caught.value.reason == "series_mixed_orientation"

    def test_too_few_slices_refused_under_every_policy(self, tmp_path: Path) -> None:
        Series(n=4).write(tmp_path)
        group = only_group(tmp_path)
        assert diagnose(group, min_slices=8).reason == "series_too_few_slices"
        assert diagnose(group).reason == ""
        for policy in SERIES_POLICIES:
            with pytest.raises(Quarantined, match="fewer than ingest.min_slices 8") as caught:
                apply_policy(group, diagnose(group), policy, min_slices=8)
            assert caught.value.reason == "series_too_few_slices"

    def test_unknown_policy(self, tmp_path: Path) -> None:
        Series(n=4).write(tmp_path)
        group = only_group(tmp_path)
        message = "ingest.series.policy must be one of strict, dedupe, fill_gaps; got 'lenient'"
        with pytest.raises(ValueError, match=message):
            apply_policy(group, diagnose(group), "lenient", min_slices=1)

    def test_diagnose_folder(self, tmp_path: Path) -> None:
        Series().write(tmp_path / "a")
        Series(n=12).write(tmp_path / "b", skip=(3,))
        results = diagnose_folder(tmp_path)
        assert sorted((d.files, d.reason) for _, d in results) == [(11, "series_gap"), (20, "")]


class TestReadVolume:
    def test_axial_hu_and_z_order_follow_the_affine(self, tmp_path: Path) -> None:
        # The ellipsoid sits superior (z = +15 mm of a -23.75..+23.75 mm stack).
        series = Series()
        series.write(tmp_path)
        volume = read_volume(only_group(tmp_path), data_dir=tmp_path, settings=settings(), fill_gaps=False)
        assert volume.pixels.dtype == np.uint8 and volume.pixels.shape == (12, 16, 16)
        assert volume.source_shape == (20, 24, 24) and volume.slices == 20 and volume.filled == 0
        assert volume.source_spacing_mm == pytest.approx((2.5, 2.0, 2.0))
        assert volume.resampled_shape == (10, 12, 12)
        assert (volume.hu_min, volume.hu_max) == (BODY_HU, ELLIPSOID_HU)
        truth = np.stack([series.hu(series.position(i)) for i in range(series.n)]).astype(np.float64)
        assert volume.hu_mean == pytest.approx(truth.mean()) and volume.hu_std == pytest.approx(truth.std())
        # Slice 0 of highdicom's order is the most superior: the affine's z axis points down.
        assert volume.affine[2, 0] < 0
        # Axis 0 along -z (superior to inferior), 1 down the rows (+y), 2 along them (+x).
        np.testing.assert_allclose(volume.affine[:3, :3], [[0, 0, 4], [0, 4, 0], [-5, 0, 0]], atol=1e-9)
        centre = voxel_of(volume.affine, series.centre)
        assert volume.pixels[centre] == windowed(ELLIPSOID_HU)
        assert centre[0] < 6  # the superior end
        bright = np.argwhere(volume.pixels == windowed(ELLIPSOID_HU))
        assert bright[:, 0].mean() < volume.pixels.shape[0] / 2
        inferior = voxel_of(volume.affine, np.array([0.0, 0.0, -15.0]))
        assert volume.pixels[inferior] == windowed(BODY_HU)
        # Padding (the resampled grid is 10 x 12 x 12 in 12 x 16 x 16) is air.
        assert volume.pixels[0, 0, 0] == volume.pixels[-1, -1, -1] == windowed(AIR_HU)
        assert (volume.pixels[:, :2] == windowed(AIR_HU)).all()

    def test_same_volume_as_highdicom_get_volume_from_series(self, tmp_path: Path) -> None:
        # At the source's own spacing and size nothing is resampled: the voxels and the affine
        # must be those of highdicom's own assembly of the same files.
        import highdicom

        paths = Series(centre=(3.0, -5.0, -8.0)).write(tmp_path)
        group = only_group(tmp_path)
        volume = read_volume(group, data_dir=tmp_path, fill_gaps=False,
                             settings=settings(spacing=(2.5, 2.0, 2.0), size=(20, 24, 24)))
        reference = highdicom.get_volume_from_series([pydicom.dcmread(p) for p in paths], dtype=np.float32)
        np.testing.assert_allclose(volume.affine, reference.affine, atol=1e-9)
        expected = np.rint(np.clip((reference.array - (WINDOW[0] - WINDOW[1] / 2)) / WINDOW[1], 0, 1) * 255)
        np.testing.assert_array_equal(volume.pixels, expected.astype(np.uint8))

    def test_sagittal(self, tmp_path: Path) -> None:
        series = Series(n=18, orientation=SAGITTAL, direction=1.0, centre=(8.0, -4.0, 2.0),
                        radii=(10.0, 12.0, 12.0))
        series.write(tmp_path)
        group = only_group(tmp_path)
        assert group.key.endswith("|sagittal")
        volume = read_volume(group, data_dir=tmp_path, settings=settings(size=(10, 16, 16)), fill_gaps=False)
        # Axis 0 runs along patient x (left-right), as highdicom's affine says.
        np.testing.assert_allclose(np.abs(volume.affine[:3, 0]), (5.0, 0.0, 0.0), atol=1e-6)
        assert volume.pixels[voxel_of(volume.affine, series.centre)] == windowed(ELLIPSOID_HU)
        assert volume.pixels[voxel_of(volume.affine, np.array([-12.0, -4.0, 2.0]))] == windowed(BODY_HU)

    def test_resampling_halves_the_slice_count(self, tmp_path: Path) -> None:
        Series(n=24, spacing=2.5).write(tmp_path)
        group = only_group(tmp_path)
        volume = read_volume(group, data_dir=tmp_path, fill_gaps=False,
                             settings=settings(spacing=(5.0, 2.0, 2.0), size=(8, 24, 24)))
        assert volume.resampled_shape == (12, 24, 24)
        assert volume.pixels.shape == (8, 24, 24)  # centre-cropped from 12
        np.testing.assert_allclose(np.linalg.norm(volume.affine[:3, :3], axis=0), (5.0, 2.0, 2.0))

    def test_too_large(self, tmp_path: Path) -> None:
        Series(n=20, size=256).write(tmp_path)  # 20 x 256 x 256 float32 = 5 MiB
        with pytest.raises(Quarantined, match="more than ingest.max_decoded_mib 4") as caught:
            read_volume(only_group(tmp_path), data_dir=tmp_path, settings=settings(max_mib=4), fill_gaps=False)
        assert caught.value.reason == "too_large"

    @pytest.mark.slow  # 200 files written and read: about 3 s on 2 cores
    def test_memory_bounded_on_200_slices(self, tmp_path: Path) -> None:
        series = Series(n=200, size=96, spacing=1.0, pixel=1.0, centre=(0.0, 0.0, 0.0),
                        radii=(30.0, 30.0, 60.0))
        series.write(tmp_path / "series")
        group = only_group(tmp_path / "series")
        target = settings(spacing=(2.0, 2.0, 2.0), size=(64, 48, 48))
        decoded = 200 * 96 * 96 * 4  # float32
        # Once untraced on a small series: the first call loads pydicom's decoders and highdicom.
        Series(n=3, size=16).write(tmp_path / "warm")
        read_volume(only_group(tmp_path / "warm"), data_dir=tmp_path / "warm", settings=target, fill_gaps=False)
        tracemalloc.start()
        try:
            volume = read_volume(group, data_dir=tmp_path / "series", settings=target, fill_gaps=False)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert volume.pixels.shape == (64, 48, 48) and volume.slices == 200
        assert peak < 2.0 * decoded, f"peak {peak / decoded:.2f} x the decoded series"


class TestReadAllSeries:
    """The ingest stage's two passes over worker processes (dicomflow.dicom.ingestion)."""

    def test_refused_files_then_volumes_in_order(self, tmp_path: Path) -> None:
        from dicomflow.dicom.ingestion import read_all_series

        for name in ("a", "c"):
            Series(n=10, size=16).write(tmp_path / name)
        Series(n=10, size=16).write(tmp_path / "b", skip=(4,))  # a gap: refused under strict
        files = sorted(p for p in tmp_path.rglob("*.dcm"))
        target = settings(size=(6, 8, 8))
        results = list(read_all_series(files, data_dir=tmp_path, volume=target, policy="strict",
                                       min_slices=8, workers=2))
        refused, kept = results[:9], results[9:]
        assert {r.reason for r in refused} == {"series_gap"}
        assert sorted(r.relative_path for r in refused) == sorted(
            p.relative_to(tmp_path).as_posix() for p in files if p.parent.name == "b")
        # Kept series come back in group order (by Series Instance UID), each from its own folder.
        assert sorted(r.relative_path for r in kept) == ["a", "c"] and all(not r.reason for r in kept)
        for result in kept:
            [(pixels, row)] = result.images
            assert pixels.shape == (6, 8, 8, 1) and pixels.dtype == np.uint8
            assert row["number_of_frames"] == 10 and row["source_path"] == result.relative_path
