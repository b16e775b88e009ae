"""Burned-in text: regions found and read with the real Tesseract, judged against real identifiers,
blanked where they stand; the leak check and scan-leaks read the pixels again."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from burned_in_pixels import draw, radiograph
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dicomflow.deid.burned_in import blank_text, read_burned_in_text
from dicomflow.deid.identifiers import Identifiers, collect_identifiers
from dicomflow.deid.leaks import leaks_in_pixels, scan_paths
from dicomflow.deid.pixel_text import candidate_boxes, display_gray, identifying_kind, tessdata_dir
from dicomflow.errors import SettingsError

NAME, MRN, BIRTH = "Quixley^Bartholomew", "55501234", "19500314"


def dataset(pixels: np.ndarray, **attributes: object) -> pydicom.FileDataset:
    """A CR dataset of ``pixels`` (12-bit gray, or 8-bit RGB) with the test patient's header."""
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = pydicom.FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.Modality = NAME, MRN, BIRTH, "CR"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    if pixels.ndim == 3 and pixels.shape[-1] == 3:
        ds.set_pixel_data(pixels.astype(np.uint8), "RGB", 8)
    else:
        ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    return ds


def test_the_model_is_found():
    assert (tessdata_dir() / "eng.traineddata").is_file()


def test_a_missing_model_is_one_line_saying_how_to_install(monkeypatch):
    monkeypatch.setenv("TESSDATA_PREFIX", "/nonexistent")
    monkeypatch.setattr("dicomflow.deid.pixel_text.TESSDATA_DIRS", ())
    with pytest.raises(SettingsError, match="install Debian's tesseract-ocr") as raised:
        tessdata_dir()
    assert "\n" not in str(raised.value)


class TestReadAndJudge:
    def test_identifiers_are_blanked_where_they_stand_and_labels_kept(self):
        pixels = radiograph()
        name_box, mrn_box, birth_box = draw(pixels, [(20, 20, "QUIXLEY, BARTHOLOMEW"), (52, 20, f"MRN {MRN}"),
                                                     (84, 20, "DOB 14.03.1950")])
        marker_box, = draw(pixels, [(700, 560, "L")], size=36)
        view_box, = draw(pixels, [(700, 40, "PA PORTABLE")], size=20)
        original = pixels.copy()
        ds = dataset(pixels)
        found, frames = read_burned_in_text(ds, collect_identifiers(ds), "identifying")
        assert sorted(judgement.why for judgement in found.blanked) == [
            "(0010,0010) Patient's Name", "(0010,0020) Patient ID", "(0010,0030) Patient's Birth Date"]
        blank_text(ds, frames, found)
        after = ds.pixel_array
        for top, left, bottom, right in (name_box, mrn_box, birth_box):
            assert (after[top:bottom, left:right] == original.min()).all()
        for top, left, bottom, right in (marker_box, view_box):
            np.testing.assert_array_equal(after[top:bottom, left:right], original[top:bottom, left:right])
        untouched = np.ones(after.shape, dtype=bool)
        for judgement in found.blanked:
            top, left, bottom, right = judgement.region.box
            untouched[top:bottom, left:right] = False
        np.testing.assert_array_equal(after[untouched], original[untouched])
        assert untouched.mean() > 0.9  # blanked where the text stands, not in bands

    def test_dark_text_on_a_light_panel_in_another_corner(self):
        pixels = radiograph(seed=1)
        box, = draw(pixels, [(700, 330, "Bartholomew Quixley")], size=18, ink=150, box=3900)
        ds = dataset(pixels)
        found, frames = read_burned_in_text(ds, collect_identifiers(ds), "identifying")
        assert [judgement.why for judgement in found.blanked] == ["(0010,0010) Patient's Name"]
        blank_text(ds, frames, found)
        top, left, bottom, right = box
        assert (ds.pixel_array[top:bottom, left:right] == pixels.min()).all()

    def test_any_mode_blanks_every_text_region(self):
        pixels = radiograph(seed=2)
        boxes = draw(pixels, [(20, 20, "PORTABLE"), (60, 20, "SUPINE 120 kVp")], size=28)
        ds = dataset(pixels)
        kept, _ = read_burned_in_text(ds, collect_identifiers(ds), "identifying")
        assert kept.blanked == [] and len(kept.judgements) == 2
        found, frames = read_burned_in_text(ds, collect_identifiers(ds), "any")
        assert {judgement.why for judgement in found.blanked} == {"text"}
        blank_text(ds, frames, found)
        for top, left, bottom, right in boxes:
            assert (ds.pixel_array[top:bottom, left:right] == pixels.min()).all()

    def test_a_clean_radiograph_has_nothing_blanked(self):
        ds = dataset(radiograph(seed=3))
        found, _ = read_burned_in_text(ds, collect_identifiers(ds), "any")
        assert found.blanked == [] and found.unread == ""

    def test_colour_and_every_frame_of_a_cine_loop(self):
        rng = np.random.default_rng(4)
        frames = rng.integers(0, 60, size=(3, 300, 400, 3), dtype=np.uint8)
        for index in range(3):
            draw_rgb = frames[index]
            gray = draw_rgb[..., 0].astype(np.uint16)
            box, = draw(gray, [(12, 16, "QUIXLEY BARTHOLOMEW")], size=20, ink=255)
            draw_rgb[gray == 255] = (255, 255, 0)  # yellow text, as ultrasound units write it
        ds = dataset(frames[0])
        ds.set_pixel_data(frames, "RGB", 8)
        ds.NumberOfFrames, ds.Modality = 3, "US"
        found, decoded = read_burned_in_text(ds, collect_identifiers(ds), "identifying")
        # Read in the first frame and in what stays put through the loop (every frame).
        assert {j.region.frame for j in found.blanked} == {0, None}
        blank_text(ds, decoded, found)
        top, left, bottom, right = box
        assert (ds.pixel_array[:, top:bottom, left:right] == 0).all()

    def test_undecodable_pixels_are_unread_and_say_why(self):
        ds = dataset(radiograph(rows=64, cols=64))
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
        found, frames = read_burned_in_text(ds, Identifiers(), "identifying")
        assert frames is None and found.unread.startswith("pixels not read (")


@pytest.mark.parametrize("line, kind", [
    ("D0B: I4/03/I95O", "(0010,0030) Patient's Birth Date"),   # OCR's O/0 and I/1 undone
    ("QUIXLEV BARTHOLOMEW", "(0010,0010) Patient's Name"),      # a name one letter off
    ("QUIXLEYABARTHOLOMEW", "(0010,0010) Patient's Name"),      # the caret read as a letter
    ("Name: ------", "field label"),
    ("2019-07-21 10:31", "date"),
    ("ACC 7781234421", "long number"),
    ("L", ""), ("PA PORTABLE", ""), ("5C1 12cm 30Hz", ""), ("SUPINE", ""),
])
def test_identifying_kind_of_a_line(line, kind):
    ds = dataset(radiograph(rows=8, cols=8))
    assert identifying_kind(tuple(line.split()), collect_identifiers(ds)) == kind


def test_candidates_come_from_strokes_not_anatomy():
    pixels = radiograph(seed=5)
    assert candidate_boxes(display_gray(pixels)) == []
    draw(pixels, [(300, 200, "WORDS HERE")], size=30)
    ((top, left, bottom, right), light_text), = candidate_boxes(display_gray(pixels))
    assert light_text
    assert top <= 305 and left <= 202 and bottom >= 325 and right >= 330


class TestSecondNet:
    def test_text_still_readable_in_a_written_file_is_a_leak_naming_kind_and_region(self, tmp_path):
        pixels = radiograph()
        draw(pixels, [(20, 20, "QUIXLEY, BARTHOLOMEW")])
        ds = dataset(pixels)
        identifiers = collect_identifiers(ds)
        ds.PatientName, ds.PatientID = "ANON", "X"  # the header de-identified, the pixels not
        ds.save_as(tmp_path / "out.dcm", enforce_file_format=True)
        leak, = leaks_in_pixels(identifiers, tmp_path / "out.dcm", output="out.dcm")
        assert leak.source == "(0010,0010) Patient's Name"
        assert leak.location.startswith("pixel data frame 0 rows ")
        assert "QUIXLEY" not in str(leak).upper()

    def test_scan_leaks_reads_pictures_and_dicom_pixels(self, tmp_path):
        pixels = radiograph()
        draw(pixels, [(400, 60, f"ID {MRN}")], size=30)
        identifiers = collect_identifiers(dataset(pixels))
        Image.fromarray((pixels >> 4).astype(np.uint8)).save(tmp_path / "preview.png")
        clean = radiograph(seed=9)
        Image.fromarray((clean >> 4).astype(np.uint8)).save(tmp_path / "clean.png")
        leaks = scan_paths(identifiers, [tmp_path])
        assert [(leak.output.rsplit("/", 1)[-1], leak.source) for leak in leaks] == [
            ("preview.png", "(0010,0020) Patient ID")]


@pytest.mark.slow
def test_an_attacker_reading_whole_blanked_images_finds_no_identifier(tmp_path):
    """The issue's hospital case: 12 CR/DX radiographs, 1024x1024, 12 bits, no Burned In
    Annotation, name, MRN and birth date in different corners, sizes and polarities. After
    blanking, the Tesseract command line reads each whole image (sparse text, both polarities),
    as someone looking for names would, and finds none of them."""
    import shutil
    import subprocess

    tesseract = shutil.which("tesseract")
    assert tesseract, "Debian's tesseract-ocr is installed by make and .ci/run"
    corners = [(30, 30), (30, 560), (900, 30), (900, 560)]
    names = ["Quixley^Bartholomew", "Nakamura^Hiroshi", "Oyelaran^Funmilayo", "Vasquez^Carmen"]
    found_before = 0
    for index in range(12):
        pixels = radiograph(rows=1024, cols=1024, seed=20 + index)
        family, given = names[index % 4].split("^")
        mrn, birth = f"{71_000_000 + 7919 * index}", f"19{40 + index}0{1 + index % 9}1{index % 9}"
        top, left = corners[index % 4]
        size = (22, 28, 36)[index % 3]
        lines = [(top, left, f"{family.upper()}, {given.upper()}"), (top + size + 10, left, f"MRN {mrn}"),
                 (top + 2 * (size + 10), left, f"DOB {birth[6:]}.{birth[4:6]}.{birth[:4]}")]
        if index % 2:
            draw(pixels, lines, size=size, ink=300, box=3900)
        else:
            draw(pixels, lines, size=size)
        ds = dataset(pixels, PatientName=names[index % 4], PatientID=mrn, PatientBirthDate=birth,
                     Modality=("CR", "DX")[index % 2], ImageType=["ORIGINAL", "PRIMARY"])
        identifiers = collect_identifiers(ds)
        found, frames = read_burned_in_text(ds, identifiers, "identifying")
        found_before += len(found.blanked)
        blank_text(ds, frames, found)
        written = ds.pixel_array.astype(np.float32)
        picture = ((written - written.min()) * (255 / (written.max() - written.min()))).astype(np.uint8)
        for polarity, image in (("as shown", picture), ("inverted", 255 - picture)):
            path = tmp_path / f"{index}-{polarity.replace(' ', '_')}.png"
            Image.fromarray(image).save(path)
            read = subprocess.run([tesseract, str(path), "-", "--psm", "11"], capture_output=True,
                                  text=True, check=True).stdout
            assert identifiers.first(read) is None, f"image {index} {polarity}: an identifier is readable"
    assert found_before >= 36  # three lines in each of the 12 images


def test_a_plots_own_dates_and_numbers_are_no_leak_but_in_a_dicom_image_they_are(tmp_path):
    pixels = radiograph(seed=11)
    draw(pixels, [(60, 40, "run 2026-12-06  ID 12345678")], size=26)
    Image.fromarray((pixels >> 4).astype(np.uint8)).save(tmp_path / "plot.png")
    dataset(pixels, PatientName="Anonymous", PatientID="X1").save_as(tmp_path / "image.dcm", enforce_file_format=True)
    someone_else = Identifiers()
    someone_else.add_name("Quixley^Bartholomew", "(0010,0010) Patient's Name")
    leaks = scan_paths(someone_else, [tmp_path])
    assert [(leak.output.rsplit("/", 1)[-1], leak.source) for leak in leaks] == [("image.dcm", "date")]


def test_keyed_digests_find_what_the_values_find(tmp_path):
    """evaluate's scan holds the identifiers as keyed digests, which answer lookups only."""
    from dicomflow.deid.digests import read_digests, write_digests

    ds = dataset(radiograph(rows=8, cols=8))
    identifiers = collect_identifiers(ds)
    write_digests(identifiers, b"k" * 32, tmp_path / "digests.json")
    digested = read_digests(tmp_path / "digests.json", b"k" * 32)
    for line in ("QUIXLEV BARTHOLOMEW", "QUIXLEYABARTHOLOMEW", f"MRN {MRN}", "PA PORTABLE"):
        assert identifying_kind(tuple(line.split()), digested) == identifying_kind(tuple(line.split()), identifiers)
    assert identifying_kind(("QUIXLEV",), digested) == "(0010,0010) Patient's Name"
