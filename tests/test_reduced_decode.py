"""ingest.decode: reduced against the full path, on real files: pydicom's test files of every
transfer syntax that decodes, and the clinical-size corpus (bench/clinical_corpus.py)."""

from __future__ import annotations

import dataclasses
import io
import pickle
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless

from bench.clinical_corpus import write_corpus
from dicomflow.dicom import display
from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.dicom.ingestion import decode_counts, ingest_file
from dicomflow.dicom.reading import Quarantined
from dicomflow.dicom.reduced import (
    LOWPASS_MAX_EXCURSION,
    area_mean,
    box_sums,
    decode_jpeg2000,
    window_excursion,
)

FULL = PixelSettings(size=64)
REDUCED = dataclasses.replace(FULL, decode="reduced")
MAX_MEAN, MAX_P99 = 1.0, 4.0  # grey levels of 255, per image (issue 33)


@pytest.fixture
def every_size(monkeypatch):
    """Reduced decoding for images under a megapixel too (ingest leaves them to the full path,
    where it is as fast), so that pydicom's small test files and CT slices exercise it."""
    monkeypatch.setattr(display, "MIN_REDUCED_PIXELS", 0)


def closeness(path: Path | str) -> tuple[float, float, bool, str, str] | None:
    """(mean, p99 absolute difference, decoded reduced, why not by the codec, which decoder
    reduced it) of the uint8 pixels of both modes; None
    where the full path refuses the file or it has several frames."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds, full = read_image(io.BytesIO(Path(path).read_bytes()), FULL)
        except Quarantined:
            return None
        if len(full) != 1 or int(ds.get("NumberOfFrames", 1) or 1) > 1:
            return None
        _, reduced = read_image(io.BytesIO(Path(path).read_bytes()), REDUCED)
    difference = np.abs(full[0].pixels.astype(np.int16) - reduced[0].pixels.astype(np.int16))
    frame = reduced[0]
    return (float(difference.mean()), float(np.percentile(difference, 99)), frame.reduced, frame.full_because,
            frame.reduced_by)


@pytest.mark.slow
def test_pydicom_test_files_are_close_to_the_full_path(every_size):
    checked, reduced, far = 0, 0, []
    for path in get_testdata_files("*.dcm"):
        found = closeness(path)
        if found is None:
            continue
        checked += 1
        reduced += found[2]
        if found[0] > MAX_MEAN or found[1] > MAX_P99:
            far.append((Path(path).name, found))
    assert far == []
    assert checked > 60 and reduced > 20  # the larger images of every syntax were reduced


@pytest.mark.slow
def test_clinical_corpus_is_close_to_the_full_path(tmp_path, every_size):
    # 32: radiographs and CT slices in each of the 4 syntaxes, JPEG 2000 radiographs with and
    # without a window (study 12: the codec's reduced levels; study 4: decoded in full, averaged).
    files = write_corpus(tmp_path / "corpus", 32)
    by_syntax: Counter[str] = Counter()
    declined: Counter[str] = Counter()
    for path in files:
        mean, p99, reduced, why, _ = closeness(path)
        assert mean <= MAX_MEAN and p99 <= MAX_P99, (path.name, mean, p99)
        assert reduced
        syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        by_syntax[syntax.name] += 1
        if syntax == JPEG2000Lossless:
            declined[why] += 1
    assert len(by_syntax) == 4
    # JPEG 2000: radiographs with a window at a reduced level (why ""); without one decoded in
    # full and averaged, as are the CT slices (512 x 512 to 64: no level to skip).
    assert declined[""] >= 1 and declined["no_window"] >= 1 and declined["jpeg2000_level_0"] >= 1


def test_a_window_that_clips_much_of_the_low_pass_image_is_measured():
    """window_excursion: CT air far below a soft-tissue window against a radiograph's overshoot."""
    hounsfield = np.where(np.arange(100) < 40, -1000.0, 40.0)  # 40 % air, window [-160, 240]
    assert window_excursion(hounsfield, (-160.0, 240.0)) == pytest.approx(0.4 * 840 / 400)
    overshoot = np.r_[np.full(99, 2000.0), 900.0]  # one edge sample 100 below a [1000, 5000] window
    assert window_excursion(overshoot, (1000.0, 5000.0)) == pytest.approx(0.01 * 100 / 4000)
    assert window_excursion(hounsfield, (-160.0, 240.0)) > LOWPASS_MAX_EXCURSION > window_excursion(
        overshoot, (1000.0, 5000.0))


def test_block_means_of_the_fitting_are_the_box_filters():
    """box_sums averages exactly the pixels PIL's box filter does (the full path's _resize)."""
    from dicomflow.dicom.display import _resize

    image = np.random.default_rng(0).random((250, 197)).astype(np.float32)
    assert np.allclose(box_sums(image, (250, 64), (197, 50)), _resize(image, 64, 50), atol=1e-6)
    whole = area_mean(image, 5)  # 197 = 39 x 5 + 2: the last column of blocks averages 2 columns
    assert np.allclose(whole[:, :39], image[:, :195].reshape(50, 5, 39, 5).mean(axis=(1, 3)), atol=1e-6)
    assert np.allclose(whole[:, 39], image[:, 195:].reshape(50, 5, 2).mean(axis=(1, 2)), atol=1e-6)
    blocks = area_mean(np.arange(12, dtype=np.uint16).reshape(3, 4), 2)
    assert blocks.tolist() == [[2.5, 4.5], [8.5, 10.5]]


def test_pillow_jpeg2000_at_level_0_is_pydicoms_decoding():
    """The precision and sign corrections undo exactly what Pillow's plugin does to samples."""
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    values, factor, _, _ = decode_jpeg2000(ds, 1, min_level=0)
    assert factor == 1
    assert np.array_equal(values, ds.pixel_array.astype(np.int32))


def test_a_corrupt_codestream_still_quarantines_with_its_reason(tmp_path):
    ds = pydicom.dcmread(get_testdata_file("RG3_J2KR.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[:len(frame) // 3]])  # cut short: no EOC, tiles missing
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    reasons = []
    for settings in (FULL, REDUCED):
        with pytest.raises(Quarantined) as caught:
            read_image(io.BytesIO(broken.read_bytes()), settings)
        reasons.append((caught.value.reason, str(caught.value)))
    assert reasons[0] == reasons[1]


def test_a_fallback_is_counted(every_size):
    """A multi-frame file takes the full path in reduced mode, and ingest counts why."""
    source = Path(get_testdata_file("emri_small.dcm"))  # 64 x 64, 10 frames
    result = ingest_file(source, data_dir=source.parent, settings=dataclasses.replace(REDUCED, size=16))
    assert result.reason == "" and result.decode == ("full:multi_frame",)
    counts = decode_counts(Counter(result.decode))
    assert counts == {"decode_reduced": 0, "decode_full": 1, "decode_fallback_multi_frame": 1}
    plain = Path(get_testdata_file("CT_small.dcm"))  # 128 x 128 to 16: averaged before the display
    assert ingest_file(plain, data_dir=plain.parent, settings=dataclasses.replace(REDUCED, size=16)).decode \
        == ("reduced",)


def test_small_images_take_the_full_path_uncounted():
    path = Path(get_testdata_file("CT_small.dcm"))
    result = ingest_file(path, data_dir=path.parent, settings=dataclasses.replace(REDUCED, size=16))
    assert result.decode == ("full:small",)
    assert decode_counts(Counter(result.decode)) == {"decode_reduced": 0, "decode_full": 1}


def test_models_registered_before_the_option_decode_in_full():
    settings = PixelSettings(size=64, decode="reduced")
    state = pickle.dumps(settings)
    old = pickle.loads(state.replace(b"decode", b"decodX"))  # a pickle without the field
    assert PixelSettings(size=64).decode == "full"
    assert getattr(old, "decode") == "full"


def test_the_served_model_decodes_as_ingest_did():
    """read_model_frames (the served model) goes through image_frames with the model's settings."""
    from dicomflow.dicom.display import read_model_frames

    path = Path(get_testdata_file("RG1_J2KR.dcm"))  # 1955 x 1841: reduced
    _, frames = read_image(io.BytesIO(path.read_bytes()), REDUCED)
    assert frames[0].reduced
    assert np.array_equal(read_model_frames(path.read_bytes(), settings=REDUCED), frames[0].pixels[None])


def jpeg_baseline_file(folder: Path, *, colour: bool) -> Path:
    """A 1536 x 1280 JPEG baseline file (Pillow's libjpeg encoder): 8-bit MONOCHROME2 with a
    window, or YBR_FULL_422 colour; smooth shading, a sharp-edged disc and noise."""
    from PIL import Image
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    rng = np.random.default_rng(3)
    y, x = np.mgrid[0:1536, 0:1280]
    shade = 40 + 150 * (x / 1280) + 30 * ((x - 700) ** 2 + (y - 600) ** 2 < 300 ** 2)
    gray = np.clip(shade + rng.normal(0, 6, shade.shape), 0, 255).astype(np.uint8)
    pixels = np.stack([gray, np.flipud(gray), np.fliplr(gray)], axis=-1) if colour else gray
    stream = io.BytesIO()
    Image.fromarray(pixels).save(stream, format="JPEG", quality=92, subsampling=1)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.Modality, ds.Rows, ds.Columns = "OT", 1536, 1280
    ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.HighBit = (3 if colour else 1), 8, 8, 7
    ds.PixelRepresentation = 0
    ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    else:
        ds.WindowCenter, ds.WindowWidth = "120", "200"
    ds.PixelData = encapsulate([stream.getvalue()])
    path = folder / ("colour.dcm" if colour else "gray.dcm")
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("colour", [False, True], ids=["grayscale", "ybr"])
def test_jpeg_baseline_with_dct_scaling_is_close_to_the_full_path(tmp_path, colour):
    path = jpeg_baseline_file(tmp_path, colour=colour)
    mean, p99, reduced, why, decoder = closeness(path)
    assert reduced and why == "" and decoder == "jpeg"  # libjpeg's scaled decode, not the full one
    assert mean <= MAX_MEAN and p99 <= MAX_P99, (mean, p99)
