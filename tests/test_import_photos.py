"""``dicomflow import-photos``: JPEG and PNG photos with a table become VL Photographic and
Ophthalmic Photography objects, bit-exact or lossless, with nothing of EXIF, XMP or comments in
any output; the pipeline's ingest reads them as colour with their labels, de-identification
takes them, dciodvfy finds no error in them, and a rerun writes nothing.

The photos are made here with Pillow (EXIF through its Exif API, ICC profiles from ImageCms);
expected pixels come from Pillow decoding the source file, independently of the importer.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image, ImageCms, ImageOps
from PIL.TiffImagePlugin import IFDRational
from pydicom.encaps import generate_frames
from pydicom.uid import (
    JPEGBaseline8Bit,
    OphthalmicPhotography8BitImageStorage,
    RLELossless,
    VLPhotographicImageStorage,
)
from test_dicom_validity import INSTALL_HINT, dciodvfy_errors

from dicomflow.cli import main
from dicomflow.config.params import load_params
from dicomflow.deid.identifiers import Identifiers
from dicomflow.deid.leaks import scan_paths
from dicomflow.deid.profile import deidentify_dataset, load_profile
from dicomflow.deid.worker import deid_options
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.ingestion import ingest_file
from dicomflow.dicom.labels import assign_label, read_labels
from dicomflow.errors import DataError, SettingsError
from dicomflow.dicom.photos import (
    LABELS_FILE,
    PhotoRejected,
    import_photos,
    parse_jpeg,
    read_photo,
    report_path,
    srgb_profile,
)

REPO = Path(__file__).resolve().parents[1]
CLASSES = [0, 1, 2, 3, 4]
NAME = "Jolanda Quarterfield"          # planted in EXIF Artist, XMP and the JPEG comment
SERIAL = "SN4711QX90210"               # EXIF BodySerialNumber
GPS = (IFDRational(51, 1), IFDRational(30, 1), IFDRational(2633, 100))  # EXIF GPSLatitude
COLUMNS = ["file", "patient_id", "study_date", "label", "study_id", "laterality", "body_site", "split"]
SECRET = b"import-photos test secret, 32 bytes or more"


def _pixels(seed: int, shape=(36, 44)) -> np.ndarray:
    """A smooth colour photo (gradients and a disc): JPEG keeps it close, text OCR finds nothing."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    disc = ((rows - shape[0] / 2) ** 2 + (cols - shape[1] / 2) ** 2) < (min(shape) / 3) ** 2
    image = np.clip(np.stack([120 + 100 * disc, 40 + 3 * rows, 60 + 2 * cols + seed % 50], axis=-1), 0, 255)
    image[-2:, -2:] = [seed % 256, seed // 256, 0]  # every seed its own photo
    return image.astype(np.uint8)


def _exif(orientation: int = 1) -> Image.Exif:
    exif = Image.Exif()
    exif[0x013B] = NAME                 # Artist
    exif[0x0112] = orientation          # Orientation
    exif[0x0110] = "Retinocam 9000"     # Model
    exif.get_ifd(0x8769)[0xA431] = SERIAL            # Exif IFD: BodySerialNumber
    exif.get_ifd(0x8769)[0x9003] = "2024:03:01 10:11:12"  # DateTimeOriginal
    longitude = (IFDRational(7, 1), IFDRational(0, 1), IFDRational(39, 1))
    exif.get_ifd(0x8825).update({1: "N", 2: GPS, 3: "W", 4: longitude})  # GPS IFD
    return exif


def _xmp() -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
            b'<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:creator>'
            + NAME.encode() + b"</dc:creator></rdf:Description></rdf:RDF></x:xmpmeta>")


def _srgb() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _jpeg(path: Path, pixels: np.ndarray, *, orientation: int = 1, **options) -> Path:
    Image.fromarray(pixels).save(path, "JPEG", exif=_exif(orientation), xmp=_xmp(),
                                 comment=f"patient {NAME}".encode(), icc_profile=_srgb(), quality=92, **options)
    return path


def _png(path: Path, pixels: np.ndarray, **options) -> Path:
    Image.fromarray(pixels).save(path, "PNG", icc_profile=_srgb(), exif=_exif(), **options)
    return path


def _table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({key: row.get(key, "") for key in COLUMNS} for row in rows)
    return path


def _row(file: str, number: int, label: int | str = 1, **extra) -> dict:
    return {"file": file, "patient_id": f"PAT{number:03d}", "study_date": "2024-03-01", "label": label,
            "laterality": "LR"[number % 2], **extra}


def _report(table: Path) -> dict[str, dict]:
    with open(report_path(table), newline="", encoding="utf-8") as stream:
        return {row["file"]: row for row in csv.DictReader(stream)}


def _object(out: Path, table: Path, file: str) -> pydicom.Dataset:
    return pydicom.dcmread(out / _report(table)[file]["path"])


def _pillow_rgb(path_or_bytes) -> np.ndarray:
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    with Image.open(source) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """One import per kind of the same good photos, with EXIF, XMP, comments and ICC in them."""
    root = tmp_path_factory.mktemp("photos")
    photos = root / "camera export"  # a folder name with a space, as exports have
    photos.mkdir()
    (photos / "sub").mkdir()
    _jpeg(photos / f"{NAME} left eye.jpg", _pixels(0))           # a name in the file name
    _jpeg(photos / "sub" / "444.jpg", _pixels(1), subsampling=0)  # 4:4:4
    _jpeg(photos / "keeprgb.jpg", _pixels(2), keep_rgb=True)      # Adobe APP14, no transform
    _png(photos / "lesion.png", _pixels(3))
    Image.fromarray(_pixels(4)[..., 0]).save(photos / "grey.jpg", "JPEG", exif=_exif())
    rows = [_row(f"{NAME} left eye.jpg", 1, label=4, study_id="ACC001", body_site="eye"),
            _row("sub/444.jpg", 2, label=0), _row("keeprgb.jpg", 3, label=2),
            _row("lesion.png", 4, label=3, study_id="ACC004", body_site="left forearm"),
            _row("grey.jpg", 5, label=1)]
    outs = {}
    for kind in ("dermoscopy", "fundus"):
        outs[kind] = root / f"data_{kind}"
        outs[f"{kind} table"] = table = _table(root / f"{kind}.csv", rows)
        assert main(["import-photos", str(photos), "--table", str(table), "--kind", kind,
                     "--out", str(outs[kind]), "--classes", *map(str, CLASSES), "--workers", "2"]) == 0
    outs["photos"] = photos
    return outs


def _imported(imported: dict[str, Path], kind: str, file: str) -> pydicom.Dataset:
    return pydicom.dcmread(imported[kind] / _report(imported[f"{kind} table"])[file]["path"])


class TestObjects:
    def test_sop_classes_and_modalities(self, imported):
        for kind, sop_class, modality in (("dermoscopy", VLPhotographicImageStorage, "XC"),
                                          ("fundus", OphthalmicPhotography8BitImageStorage, "OP")):
            files = sorted((imported[kind] / "photos").glob("*.dcm"))
            assert len(files) == 5
            for path in files:
                ds = pydicom.dcmread(path)
                assert (ds.SOPClassUID, ds.Modality) == (sop_class, modality)
                assert path.name == f"{ds.SOPInstanceUID}.dcm"

    def test_patient_study_and_laterality_from_the_table(self, imported):
        ds = _imported(imported, "dermoscopy", f"{NAME} left eye.jpg")
        assert (ds.PatientID, ds.StudyDate) == ("PAT001", "20240301")
        assert (ds.AccessionNumber, ds.StudyID) == ("ACC001", "ACC001")
        assert (ds.ImageLaterality, ds.BodyPartExamined) == ("R", "EYE")
        assert _imported(imported, "dermoscopy", "lesion.png").BodyPartExamined == "LEFT FOREARM"
        fundus = _imported(imported, "fundus", "sub/444.jpg")
        assert fundus.ImageLaterality == "L"

    def test_output_names_do_not_hold_source_names(self, imported):
        for kind in ("dermoscopy", "fundus"):
            for path in imported[kind].rglob("*"):
                assert "Jolanda" not in str(path.relative_to(imported[kind]))

    def test_jpeg_is_encapsulated_bit_exact(self, imported):
        for file, photometric in ((f"{NAME} left eye.jpg", "YBR_FULL_422"), ("sub/444.jpg", "YBR_FULL_422"),
                                  ("grey.jpg", "MONOCHROME2")):
            source = (imported["photos"] / file).read_bytes()
            ds = _imported(imported, "dermoscopy", file)
            assert ds.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
            assert ds.PhotometricInterpretation == photometric, file
            stream = next(generate_frames(ds.PixelData, number_of_frames=1)).rstrip(b"\x00")
            # The scan (SOS to EOI) and every table segment, byte for byte.
            assert stream[stream.rfind(b"\xff\xda"):] == source[source.rfind(b"\xff\xda"):source.rfind(b"\xff\xd9") + 2]
            for marker in (b"\xff\xdb", b"\xff\xc4", b"\xff\xc0"):
                at = source.find(marker)
                length = struct.unpack(">H", source[at + 2:at + 4])[0]
                assert source[at:at + 2 + length] in stream
            # Decoded by the same decoder, the stored stream and the photo give the same pixels.
            assert np.array_equal(_pillow_rgb(stream), _pillow_rgb(imported["photos"] / file))
            ds.pixel_array_options(decoding_plugin="pillow")
            expected = _pillow_rgb(imported["photos"] / file)
            assert np.array_equal(ds.pixel_array, expected[..., 0] if photometric == "MONOCHROME2" else expected)
            assert ds.LossyImageCompression == "01" and ds.LossyImageCompressionMethod == "ISO_10918_1"

    def test_rgb_jpeg_is_stored_decoded(self, imported):
        ds = _imported(imported, "dermoscopy", "keeprgb.jpg")  # Adobe APP14 "no transform": no YCbCr
        assert ds.file_meta.TransferSyntaxUID == RLELossless and ds.PhotometricInterpretation == "RGB"
        assert ds.LossyImageCompression == "01"
        assert np.array_equal(ds.pixel_array, _pillow_rgb(imported["photos"] / "keeprgb.jpg"))

    def test_png_is_lossless(self, imported):
        ds = _imported(imported, "fundus", "lesion.png")
        assert ds.file_meta.TransferSyntaxUID == RLELossless
        assert ds.PhotometricInterpretation == "RGB" and ds.LossyImageCompression == "00"
        assert np.array_equal(ds.pixel_array, np.asarray(Image.open(imported["photos"] / "lesion.png")))

    def test_icc_profile_carried(self, imported):
        for file in ("lesion.png", "keeprgb.jpg", f"{NAME} left eye.jpg"):
            ds = _imported(imported, "dermoscopy", file)
            with Image.open(imported["photos"] / file) as image:
                assert ds.ICCProfile == image.info["icc_profile"] and ds.ColorSpace == "SRGB"
        assert "ICCProfile" not in _imported(imported, "dermoscopy", "grey.jpg")

    def test_colour_photo_without_profile_is_declared_srgb(self, tmp_path):
        photos = tmp_path / "in"
        photos.mkdir()
        Image.fromarray(_pixels(1)).save(photos / "plain.png")
        table = _table(tmp_path / "t.csv", [_row("plain.png", 1)])
        import_photos(photos, table, kind="photo", out=tmp_path / "out", classes=CLASSES, workers=1)
        ds = _object(tmp_path / "out", table, "plain.png")
        assert ds.ICCProfile == srgb_profile() and ds.ColorSpace == "SRGB"
        assert ImageCms.ImageCmsProfile(io.BytesIO(ds.ICCProfile)).profile.profile_description == "sRGB built-in"

    @pytest.mark.parametrize("kind", ["dermoscopy", "fundus"])
    def test_dciodvfy_finds_no_error(self, imported, kind):
        if shutil.which("dciodvfy") is None:
            pytest.fail(INSTALL_HINT)
        files = sorted((imported[kind] / "photos").glob("*.dcm"))
        assert {path.name: dciodvfy_errors(path) for path in files} == {path.name: set() for path in files}


class TestNothingLeaks:
    def test_planted_values_are_in_the_sources(self, imported):
        """The control: the photos do carry the name, serial and GPS the outputs must not."""
        source = (imported["photos"] / f"{NAME} left eye.jpg").read_bytes()
        assert NAME.encode() in source and SERIAL.encode() in source and b"http://ns.adobe.com/xap" in source
        assert b"patient " + NAME.encode() in source  # the COM segment
        png = (imported["photos"] / "lesion.png").read_bytes()
        assert b"eXIf" in png and NAME.encode() in png and b"iCCP" in png
        with Image.open(imported["photos"] / f"{NAME} left eye.jpg") as image:
            assert image.getexif().get_ifd(0x8825)[2] == (51.0, 30.0, 26.33)

    def test_no_exif_xmp_or_comment_bytes_in_any_output(self, imported):
        gps = [struct.pack(order + "IIIIII", 51, 1, 30, 1, 2633, 100) for order in "<>"]
        for kind in ("dermoscopy", "fundus"):
            for path in imported[kind].rglob("*"):
                if path.is_file():
                    content = path.read_bytes()
                    for planted in (NAME.encode(), NAME.encode("utf-16-le"), SERIAL.encode(), b"Exif\x00\x00",
                                    b"http://ns.adobe.com/xap", b"Retinocam", b"2024:03:01 10:11:12", *gps):
                        assert planted not in content, (path.name, planted)

    def test_leak_scanner_finds_nothing(self, imported, tmp_path):
        identifiers = Identifiers()
        identifiers.add_name(NAME, "EXIF Artist")
        identifiers.add_text(SERIAL, "EXIF BodySerialNumber")
        identifiers.add_text("Retinocam 9000", "EXIF Model")
        outputs = [imported["dermoscopy"], imported["fundus"]]
        assert scan_paths(identifiers, outputs) == []
        # The scanner does see such a value in an object when it is there.
        planted = pydicom.dcmread(next((imported["fundus"] / "photos").glob("*.dcm")))
        planted.ImageComments = f"seen by {NAME}"
        planted.save_as(tmp_path / "planted.dcm")
        assert scan_paths(identifiers, [tmp_path]) != []

    def test_cli_output_names_no_value(self, imported, tmp_path):
        result = subprocess.run([sys.executable, "-m", "dicomflow", "import-photos", str(imported["photos"]),
                                 "--table", str(imported["dermoscopy table"]), "--report", str(tmp_path / "r.csv"),
                                 "--kind", "photo", "--out", str(tmp_path), "--classes", *map(str, CLASSES)],
                                capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert result.returncode == 0, result.stderr
        assert "5 written, 0 already there" in result.stderr
        for planted in (NAME, "Jolanda", SERIAL, "PAT00"):
            assert planted not in result.stdout + result.stderr


class TestPipeline:
    def test_ingest_reads_colour_and_labels(self, imported):
        out = imported["dermoscopy"]
        settings = dataclasses.replace(PixelSettings.from_params(load_params("ingest", REPO / "params.yaml")),
                                       channels=3, size=32)
        labels, conflicting = read_labels(out / LABELS_FILE, key="sop_instance_uid")
        expected = {"lesion.png": 3, f"{NAME} left eye.jpg": 4, "keeprgb.jpg": 2}
        for file, label in expected.items():
            path = out / _report(imported["dermoscopy table"])[file]["path"]
            result = ingest_file(path, data_dir=out, settings=settings)
            assert result.reason == "", result.detail
            (image, record), = result.images
            assert image.shape == (32, 32, 3)
            # The disc is red: red clearly above green and blue in the centre, as in the photo.
            red, green, blue = image[14:18, 14:18].reshape(-1, 3).astype(float).mean(axis=0)
            assert red > green + 40 and red > blue + 40, (file, red, green, blue)
            assert assign_label(record, key="sop_instance_uid", labels=labels, conflicting=conflicting,
                                classes=CLASSES) == label
        accession_labels, _ = read_labels(out / LABELS_FILE, key="accession_number")
        assert accession_labels == {"ACC001": "4", "ACC004": "3"}

    @pytest.mark.parametrize("kind", ["dermoscopy", "fundus"])
    def test_deidentification_takes_them(self, imported, kind, tmp_path):
        params = load_params("deidentify", REPO / "params.yaml")
        for number, path in enumerate(sorted((imported[kind] / "photos").glob("*.dcm"))):
            ds, _ = deidentify_dataset(pydicom.dcmread(path), profile=load_profile(), secret=SECRET,
                                       options=deid_options(params))
            target = tmp_path / f"{number}.dcm"
            ds.save_as(target, enforce_file_format=True)
            written = pydicom.dcmread(target)
            assert not written.PatientID.startswith("PAT") and written.StudyDate != "20240301"
            assert written.pixel_array.shape[:2] == (36, 44)
            assert dciodvfy_errors(target) == set()


class TestOrientation:
    def test_apply_turns_the_photo_upright(self, tmp_path):
        path = _jpeg(tmp_path / "turned.jpg", _pixels(5), orientation=6)
        photo = read_photo(path.read_bytes(), orientation="apply")
        with Image.open(path) as image:
            upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
        assert photo.jpeg is None and photo.turned_upright and photo.orientation == 6
        assert np.array_equal(photo.pixels, upright) and upright.shape[:2] == (44, 36)

    def test_keep_keeps_the_bitstream(self, tmp_path):
        path = _jpeg(tmp_path / "turned.jpg", _pixels(5), orientation=6)
        photo = read_photo(path.read_bytes(), orientation="keep")
        assert photo.jpeg is not None and (photo.rows, photo.columns) == (36, 44)

    def test_upright_object_is_derived(self, tmp_path):
        photos = tmp_path / "in"
        photos.mkdir()
        _jpeg(photos / "turned.jpg", _pixels(5), orientation=8)
        table = _table(tmp_path / "t.csv", [_row("turned.jpg", 1)])
        import_photos(photos, table, kind="photo", out=tmp_path / "out", classes=CLASSES, workers=1)
        ds = _object(tmp_path / "out", table, "turned.jpg")
        assert list(ds.ImageType) == ["DERIVED", "PRIMARY"] and ds.LossyImageCompression == "01"
        assert (ds.Rows, ds.Columns) == (44, 36) and ds.file_meta.TransferSyntaxUID == RLELossless


class TestBadInput:
    @pytest.fixture(scope="class")
    def bad(self, tmp_path_factory) -> tuple[dict[str, dict], Path]:
        root = tmp_path_factory.mktemp("bad")
        photos = root / "in"
        photos.mkdir()
        good = _jpeg(photos / "good.jpg", _pixels(6))
        shutil.copy(good, photos / "copy of good.jpg")
        _jpeg(photos / "no row.jpg", _pixels(7))
        Image.fromarray(_pixels(8)).convert("CMYK").save(photos / "cmyk.jpg", "JPEG")
        cut = _jpeg(photos / "cut.jpg", _pixels(9, (200, 200))).read_bytes()
        (photos / "cut.jpg").write_bytes(cut[:len(cut) // 2])
        Image.fromarray((_pixels(10)[..., 0].astype(np.uint16) * 257)).save(photos / "deep.png")
        _png(photos / "grade9.png", _pixels(11))
        rgba = np.dstack([_pixels(12), np.full((36, 44), 128, np.uint8)])
        Image.fromarray(rgba).save(photos / "transparent.png")
        (photos / "notes.txt").write_text("not a photo")
        Image.fromarray(_pixels(13)).save(photos / "scan.tif")
        _jpeg(photos / "baddate.jpg", _pixels(14))
        _jpeg(photos / "progressive.jpg", _pixels(15), progressive=True)
        rows = [_row("good.jpg", 1), _row("copy of good.jpg", 2), _row("cmyk.jpg", 3), _row("cut.jpg", 4),
                _row("deep.png", 5), _row("grade9.png", 6, label=9), _row("transparent.png", 7),
                _row("notes.txt", 8), _row("scan.tif", 9), _row("missing.jpg", 10),
                _row("baddate.jpg", 11, study_date="2024-02-30"), _row("progressive.jpg", 12),
                _row("good.jpg", 13)]
        table = _table(root / "t.csv", rows)
        result = import_photos(photos, table, kind="dermoscopy", out=root / "out", classes=CLASSES, workers=1)
        assert result.written == 2 and result.present == 0
        return _report(table), root

    @pytest.mark.parametrize("file, reason", [
        ("copy of good.jpg", "duplicate_photo"), ("no row.jpg", "no_table_row"), ("cmyk.jpg", "cmyk_jpeg"),
        ("cut.jpg", "truncated_jpeg"), ("deep.png", "png_16bit"), ("grade9.png", "label_not_in_classes"),
        ("transparent.png", "unsupported_png"), ("notes.txt", "not_an_image"), ("scan.tif", "unsupported_format"),
        ("missing.jpg", "missing_photo"), ("baddate.jpg", "bad_row")])
    def test_listed_with_reason(self, bad, file, reason):
        report, _ = bad
        assert (report[file]["status"], report[file]["reason"]) == ("failed", reason)
        assert report[file]["detail"]

    def test_the_rest_go_on(self, bad):
        report, root = bad
        assert report["good.jpg"]["status"] == "imported"
        # Progressive JPEG has no DICOM transfer syntax: stored decoded, losslessly.
        progressive = pydicom.dcmread(root / "out" / report["progressive.jpg"]["path"])
        assert progressive.file_meta.TransferSyntaxUID == RLELossless
        assert np.array_equal(progressive.pixel_array, _pillow_rgb(root / "in" / "progressive.jpg"))

    def test_second_row_for_a_file_is_listed(self, tmp_path):
        photos = tmp_path / "in"
        photos.mkdir()
        _jpeg(photos / "a.jpg", _pixels(1))
        table = _table(tmp_path / "t.csv", [_row("a.jpg", 1), _row("a.jpg", 2, label=3)])
        result = import_photos(photos, table, kind="photo", out=tmp_path / "out", classes=CLASSES, workers=1)
        assert result.failed == {"duplicate_row": 1} and result.written == 1

    def test_fundus_without_laterality(self, tmp_path):
        photos = tmp_path / "in"
        photos.mkdir()
        _jpeg(photos / "a.jpg", _pixels(1))
        table = _table(tmp_path / "t.csv", [_row("a.jpg", 1, laterality="")])
        result = import_photos(photos, table, kind="fundus", out=tmp_path / "out", classes=CLASSES, workers=1)
        assert result.failed == {"no_laterality": 1}
        result = import_photos(photos, table, kind="fundus", out=tmp_path / "out", classes=CLASSES, workers=1,
                               allow_unknown_laterality=True)
        assert result.written == 1
        assert _object(tmp_path / "out", table, "a.jpg").ImageLaterality == "U"

    def test_table_without_a_column_is_one_line(self, tmp_path):
        (tmp_path / "in").mkdir()
        (tmp_path / "t.csv").write_text("file,patient_id,label\na.jpg,P1,1\n")
        with pytest.raises(SystemExit) as stopped:
            main(["import-photos", str(tmp_path / "in"), "--table", str(tmp_path / "t.csv"), "--kind", "photo",
                  "--out", str(tmp_path / "out"), "--classes", "0", "1"])
        message = str(stopped.value)
        assert "\n" not in message and "missing column(s) study_date" in message

    def test_missing_folder_and_unreadable_table_are_one_line(self, tmp_path):
        table = _table(tmp_path / "t.csv", [_row("a.jpg", 1)])
        with pytest.raises(SettingsError, match="is not a folder: give the folder that holds the photos"):
            import_photos(tmp_path / "nowhere", table, kind="photo", out=tmp_path / "out", classes=CLASSES)
        latin1 = "file,patient_id,study_date,label\nä.jpg,P1,2024-01-01,1\n".encode("latin-1")
        (tmp_path / "latin1.csv").write_bytes(latin1)
        with pytest.raises(DataError, match="cannot be read as a UTF-8 CSV table"):
            import_photos(tmp_path, tmp_path / "latin1.csv", kind="photo", out=tmp_path / "out", classes=CLASSES)
        with pytest.raises(SettingsError, match="kind must be one of dermoscopy, fundus, photo; got 'xray'"):
            import_photos(tmp_path, table, kind="xray", out=tmp_path / "out", classes=CLASSES)

    def test_parse_jpeg_refuses_cut_headers(self):
        with pytest.raises(PhotoRejected, match="ends inside a marker segment") as caught:
            parse_jpeg(b"\xff\xd8\xff\xdb\x00\x43\x00")
        assert caught.value.reason == "truncated_jpeg"


class TestRerun:
    def _photos(self, root: Path, count: int) -> tuple[Path, Path]:
        photos = root / "in"
        photos.mkdir()
        rows = []
        for number in range(count):
            _jpeg(photos / f"p{number:03d}.jpg", _pixels(number))
            rows.append(_row(f"p{number:03d}.jpg", number, label=number % 5))
        return photos, _table(root / "t.csv", rows)

    def test_second_run_writes_nothing(self, tmp_path):
        photos, table = self._photos(tmp_path, 6)
        out = tmp_path / "out"
        first = import_photos(photos, table, kind="fundus", out=out, classes=CLASSES, workers=1)
        before = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.rglob("*")}
        second = import_photos(photos, table, kind="fundus", out=out, classes=CLASSES, workers=1)
        after = {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in out.rglob("*")}
        assert (first.written, second.written, second.present) == (6, 0, 6)
        assert after == before

    @pytest.mark.slow
    def test_killed_run_completes_on_rerun(self, tmp_path):
        photos, table = self._photos(tmp_path, 200)
        out, fresh = tmp_path / "out", tmp_path / "fresh"
        command = [sys.executable, "-m", "dicomflow", "import-photos", str(photos), "--table", str(table),
                   "--kind", "dermoscopy", "--classes", *map(str, CLASSES), "--workers", "1"]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        process = subprocess.Popen([*command, "--out", str(out)], cwd=REPO, env=env, start_new_session=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while len(list((out / "photos").glob("*.dcm"))) < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        partway = len(list((out / "photos").glob("*.dcm")))
        assert 5 <= partway < 200
        assert subprocess.run([*command, "--out", str(out)], cwd=REPO, env=env).returncode == 0
        assert subprocess.run([*command, "--out", str(fresh)], cwd=REPO, env=env).returncode == 0
        resumed = {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}
        clean = {path.relative_to(fresh): path.read_bytes() for path in fresh.rglob("*") if path.is_file()}
        assert resumed == clean and len(resumed) == 201  # 200 objects and labels.csv

    def test_labels_of_an_earlier_import_are_kept(self, tmp_path):
        photos, table = self._photos(tmp_path, 3)
        out = tmp_path / "out"
        import_photos(photos, table, kind="fundus", out=out, classes=CLASSES, workers=1)
        import_photos(photos, table, kind="photo", out=out, classes=CLASSES, workers=1)
        labels, _ = read_labels(out / LABELS_FILE, key="sop_instance_uid")
        assert len(labels) == 6 and len(list((out / "photos").glob("*.dcm"))) == 6

    def test_prune_removes_what_the_table_no_longer_gives(self, tmp_path):
        photos, table = self._photos(tmp_path, 3)
        out = tmp_path / "out"
        import_photos(photos, table, kind="photo", out=out, classes=CLASSES, workers=1)
        rows = [_row("p000.jpg", 0, label=0), _row("p001.jpg", 1, label=1, patient_id="NEW001")]
        _table(table, rows)  # p001 moved to another patient, p002 dropped
        kept = import_photos(photos, table, kind="photo", out=out, classes=CLASSES, workers=1)
        assert (kept.written, kept.present, kept.pruned) == (1, 1, 0)
        assert len(list((out / "photos").glob("*.dcm"))) == 4
        pruned = import_photos(photos, table, kind="photo", out=out, classes=CLASSES, workers=1, prune=True)
        assert (pruned.written, pruned.present, pruned.pruned) == (0, 2, 2)
        labels, _ = read_labels(out / LABELS_FILE, key="sop_instance_uid")
        assert sorted(path.stem for path in (out / "photos").glob("*.dcm")) == sorted(labels)
        assert sorted(labels.values()) == ["0", "1"]

    def test_a_split_column_reaches_the_labels_file_and_a_bad_one_is_listed(self, tmp_path):
        photos = tmp_path / "in"
        photos.mkdir()
        for number in range(3):
            _jpeg(photos / f"p{number}.jpg", _pixels(number))
        table = _table(tmp_path / "t.csv", [_row("p0.jpg", 0, split="train"), _row("p1.jpg", 1, split="TEST"),
                                            _row("p2.jpg", 2, split="holdout")])
        import_photos(photos, table, kind="fundus", out=tmp_path / "out", classes=CLASSES, workers=1)
        splits, _ = read_labels(tmp_path / "out" / LABELS_FILE, key="path", column="split")
        assert sorted(splits.values()) == ["test", "train"]
        assert _report(table)["p2.jpg"]["reason"] == "bad_row"

    def test_foreign_labels_file_is_refused(self, tmp_path):
        photos, table = self._photos(tmp_path, 1)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / LABELS_FILE).write_text("accession_number,label\nA1,1\n")
        with pytest.raises(Exception, match="without a sop_instance_uid column"):
            import_photos(photos, table, kind="photo", out=tmp_path / "out", classes=CLASSES, workers=1)


class TestParseJpeg:
    def _marked(self, tmp_path: Path) -> tuple[bytes, bytes]:
        """A JPEG with restart markers, a JFIF thumbnail, an APP13 (IPTC) and bytes after EOI,
        each holding or hiding something; and the same photo as Pillow wrote it."""
        path = _jpeg(tmp_path / "marked.jpg", _pixels(3, (40, 56)), restart_marker_blocks=1)
        plain = path.read_bytes()
        assert plain[2:4] == b"\xff\xe0" and plain[6:11] == b"JFIF\x00"
        app0_end = 4 + struct.unpack(">H", plain[4:6])[0]
        jfif = plain[6:18] + b"\x01\x01" + b"\x7f\x7f\x7f"  # a 1x1 thumbnail
        iptc = b"Photoshop 3.0\x00" + NAME.encode()
        marked = (plain[:2] + b"\xff\xe0" + struct.pack(">H", len(jfif) + 2) + jfif
                  + b"\xff\xed" + struct.pack(">H", len(iptc) + 2) + iptc + plain[app0_end:] + NAME.encode())
        return marked, plain

    def test_keeps_what_decoding_needs_byte_for_byte(self, tmp_path):
        marked, plain = self._marked(tmp_path)
        jpeg = parse_jpeg(marked)
        scan = plain.rfind(b"\xff\xda")
        assert plain.count(b"\xff\xd0") >= 1 and b"\xff\xdd" in plain  # restart interval and markers
        assert jpeg.stream.endswith(plain[scan:])  # every scan byte, restart markers included
        assert np.array_equal(_pillow_rgb(jpeg.stream), _pillow_rgb(plain))

    def test_leaves_out_thumbnail_maker_data_and_trailing_bytes(self, tmp_path):
        marked, _ = self._marked(tmp_path)
        jpeg = parse_jpeg(marked)
        assert NAME.encode() not in jpeg.stream and b"Photoshop" not in jpeg.stream
        assert b"Exif" not in jpeg.stream and b"\xff\xfe" not in jpeg.stream and b"\xff\xe2" not in jpeg.stream
        assert jpeg.stream[2:20] == b"\xff\xe0\x00\x10" + marked[6:18] + b"\x00\x00"  # JFIF, no thumbnail
        assert jpeg.stream.endswith(b"\xff\xd9")
        assert {"JFIF thumbnail", "APP13", "APP1", "APP2 ICC profile", "COM"} <= set(jpeg.removed)

    def test_icc_profile_from_its_chunks(self, tmp_path):
        path = _jpeg(tmp_path / "a.jpg", _pixels(1))
        with Image.open(path) as image:
            assert parse_jpeg(path.read_bytes()).icc_profile == image.info["icc_profile"]
