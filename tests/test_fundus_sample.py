"""The second embedded sample: synthetic graded fundus photos with planted EXIF, and their table."""

from __future__ import annotations

import csv
import dataclasses
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from dicomflow import cli
from dicomflow.devtools.fundus_sample import (
    ADOBE_RGB_PROFILE,
    CAMERAS,
    FAKE_IDENTIFIERS,
    FAKE_STRINGS,
    GRADE_SHARES,
    TABLE_COLUMNS,
    generate_fundus_sample,
    plan_photos,
    render_fundus,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fundus")
    generate_fundus_sample(out, patients=12, seed=7, size=64)
    return out


def read_table(folder: Path) -> list[dict[str, str]]:
    with open(folder / "photos.csv", encoding="ascii", newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_second_run_writes_the_same_bytes(sample, tmp_path):
    generate_fundus_sample(tmp_path, patients=12, seed=7, size=64)

    written = sorted(p.relative_to(sample) for p in sample.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for relative in written:
        assert (sample / relative).read_bytes() == (tmp_path / relative).read_bytes(), relative


def test_another_seed_draws_other_photos(sample, tmp_path):
    generate_fundus_sample(tmp_path, patients=12, seed=8, size=64)

    assert (sample / "photos/0001.jpg").read_bytes() != (tmp_path / "photos/0001.jpg").read_bytes()


def test_the_table_and_the_files_agree(sample):
    rows = read_table(sample)

    with open(sample / "photos.csv", encoding="ascii") as handle:
        assert handle.readline().strip() == ",".join(TABLE_COLUMNS)
    assert sorted(r["file"] for r in rows) == sorted(p.relative_to(sample).as_posix()
                                                     for p in (sample / "photos").iterdir())
    for row in rows:
        with Image.open(sample / row["file"]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))
        assert row["label"] in {"0", "1", "2", "3", "4"} and row["laterality"] in {"L", "R"}
        assert len(row["study_date"]) == 10 and row["study_date"][4] == row["study_date"][7] == "-"
    visits = Counter((r["patient_id"], r["study_date"]) for r in rows)
    assert set(visits.values()) == {2}  # both eyes at every visit
    assert {(r["patient_id"], r["study_date"], r["laterality"]) for r in rows} == \
        {(p, d, eye) for p, d in visits for eye in "LR"}
    per_patient = Counter(patient for patient, _ in visits)
    assert len(per_patient) == 12 and max(per_patient.values()) == 2 and min(per_patient.values()) == 1


def test_grades_come_in_the_shares_of_a_screening_population():
    plans = plan_photos(80, 2026)

    counts = Counter(p.grade for p in plans)
    # 242 photos split 45/12/19/18/6 % by largest remainder, worked out by hand:
    # 108.9, 29.04, 45.98, 43.56, 14.52 -> 108, 29, 45, 43, 14 (239) and three more to the
    # largest remainders (.98, .9, .56).
    assert len(plans) == 242
    assert [counts[g] for g in range(5)] == [109, 29, 46, 44, 14]
    assert GRADE_SHARES == (0.45, 0.12, 0.19, 0.18, 0.06)


def test_both_eyes_of_a_patient_have_close_grades():
    plans = plan_photos(80, 2026)
    by_visit: dict[tuple, dict[str, int]] = {}
    for p in plans:
        by_visit.setdefault((p.patient_id, p.study_date), {})[p.laterality] = p.grade

    gaps = [abs(eyes["L"] - eyes["R"]) for eyes in by_visit.values()]
    assert np.mean(gaps) < 0.6 and max(gaps) <= 2


def test_every_photo_carries_the_planted_identifying_metadata(sample):
    for path in sorted((sample / "photos").iterdir())[:6]:
        content = path.read_bytes()
        with Image.open(path) as image:
            exif = image.getexif()
            details, gps = exif.get_ifd(ExifTags.IFD.Exif), exif.get_ifd(ExifTags.IFD.GPSInfo)
            assert exif[ExifTags.Base.Artist] == FAKE_IDENTIFIERS["patient_name"]
            assert exif[ExifTags.Base.ImageDescription] == FAKE_IDENTIFIERS["description"]
            assert details[ExifTags.Base.BodySerialNumber] == FAKE_IDENTIFIERS["camera_serial"]
            assert details[ExifTags.Base.DateTimeOriginal] == FAKE_IDENTIFIERS["capture_time"]
            assert details[ExifTags.Base.CameraOwnerName] == FAKE_IDENTIFIERS["owner"]
            assert tuple(map(float, gps[ExifTags.GPS.GPSLatitude])) == FAKE_IDENTIFIERS["gps_latitude"]
            assert tuple(map(float, gps[ExifTags.GPS.GPSLongitude])) == FAKE_IDENTIFIERS["gps_longitude"]
            assert image.info["comment"].decode("ascii") == FAKE_IDENTIFIERS["comment"]
            assert FAKE_IDENTIFIERS["xmp_creator"].encode() in image.info["xmp"]
        for text in FAKE_STRINGS:  # what a leak scanner finds in the raw bytes
            assert text.encode("ascii") in content, text
    assert all("FAKE" in text or text.startswith("1901") for text in FAKE_STRINGS)


def test_the_wide_gamut_camera_embeds_its_profile(sample):
    rows = read_table(sample)
    profiles = set()
    for row in rows:
        with Image.open(sample / row["file"]) as image:
            profiles.add(image.info.get("icc_profile"))

    assert profiles == {None, ADOBE_RGB_PROFILE}
    described = ImageCms.ImageCmsProfile(io.BytesIO(ADOBE_RGB_PROFILE))
    assert described.profile.xcolor_space.strip() == "RGB"


class TestRenderFundus:
    # A camera without noise or exposure changes: two renders of one seed differ only in lesions.
    STILL = dataclasses.replace(CAMERAS[0], noise=0.0, exposure=(1.0, 1.0))

    def lesion_area(self, grade: int, seed: int) -> float:
        """Share of the picture that differs from the same seed's grade-0 render."""
        healthy = render_fundus(np.random.default_rng(seed), 64, grade=0, camera=self.STILL)
        graded = render_fundus(np.random.default_rng(seed), 64, grade=grade, camera=self.STILL)
        return float(np.mean(np.abs(graded - healthy).max(axis=-1) > 0.05))

    def test_lesions_grow_with_the_grade(self):
        areas = [np.mean([self.lesion_area(grade, seed) for seed in range(6)]) for grade in range(5)]

        assert areas[0] < 0.002  # at most a microaneurysm or so
        assert areas[0] < areas[1] < areas[2] < areas[3]
        assert areas[4] > areas[2]

    def test_a_fundus_on_black_with_a_bright_disc_on_the_nasal_side(self):
        image = render_fundus(np.random.default_rng(3), 128, grade=0, camera=self.STILL)

        assert image.dtype == np.float32 and image.shape == (128, 128, 3)
        assert image[:4, :4].max() == 0.0 and image[-4:, -4:].max() == 0.0  # corners are black
        centre = image[32:96, 32:96]
        assert (centre[..., 0] > centre[..., 1]).mean() > 0.95 and (centre[..., 1] > centre[..., 2]).mean() > 0.9
        brightness = image.sum(axis=-1)
        row, col = np.unravel_index(np.argmax(brightness), brightness.shape)
        assert col > 64  # a right eye's disc is right of centre


def test_the_left_eye_is_the_right_one_mirrored(sample):
    rows = read_table(sample)
    for row in rows[:8]:
        with Image.open(sample / row["file"]) as image:
            brightness = np.asarray(image.convert("L"), np.float32)
        col = np.unravel_index(np.argmax(brightness), brightness.shape)[1]
        assert (col > 32) == (row["laterality"] == "R"), row


def test_the_cli_writes_the_fundus_sample_and_keeps_chest_the_default(tmp_path, capsys):
    assert cli.main(["sample-data", str(tmp_path / "fundus"), "--kind", "fundus", "--patients", "10"]) == 0
    assert cli.main(["sample-data", str(tmp_path / "fundus"), "--kind", "fundus", "--patients", "10"]) == 1
    assert (tmp_path / "fundus" / "photos.csv").is_file()

    with pytest.raises(ValueError, match="patients must be at least 10 so that every grade has photos; got 9"):
        generate_fundus_sample(tmp_path / "small", patients=9)
    with pytest.raises(ValueError, match="size must be at least 32 pixels"):
        generate_fundus_sample(tmp_path / "tiny", size=16)
    parser_default = cli.parser().parse_args(["sample-data", str(tmp_path / "x")])
    assert parser_default.kind == "chest" and parser_default.patients is None
