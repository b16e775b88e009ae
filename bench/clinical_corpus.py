"""A clinical-size DICOM corpus for the ingest and deidentify benchmarks.

The embedded sample's images are 192 to 320 pixels a side, so per-file overhead (parsing, the
index) dominates what the benchmarks measure there. Archives hold much larger images; this writes
a corpus of them, deterministically from a seed:

- CR and DX radiographs of 2048 x 2048 to 2500 x 2048 pixels, (0028,0101) Bits Stored 12 or 16,
  MONOCHROME1 or MONOCHROME2, a chest-like density map (the embedded sample's phantom, rendered
  at a quarter of the size and interpolated, so that it stays smooth) plus full-resolution
  quantum noise; most with a window, some without (the frame's range is used then);
- 512 x 512 CT slices, 16-bit signed (Pixel Representation 1) with (0028,1052) Rescale Intercept
  and (0028,1053) Rescale Slope, two windows (soft tissue, lung): a body outline, lungs, a spine
  and noise in Hounsfield units;

each study in one of the transfer syntaxes Explicit VR Little Endian, RLE Lossless, JPEG 2000
Lossless and JPEG Lossless Process 14 SV1 (in turn), with full patient and study headers (names,
IDs, birth dates, addresses, institution, physicians, accession, UIDs, a private tag quoting the
MRN) so that de-identification has work, and a ``labels.csv`` in the embedded sample's columns
(``accession_number``, ``study_instance_uid``, ``sop_instance_uid``, ``path``, ``label``), so every
``ingest.label_key`` joins.

pydicom encodes RLE and JPEG 2000 (pylibjpeg-rle, pylibjpeg-openjpeg) but no installed library
encodes JPEG Lossless (1.2.840.10008.1.2.4.70): :func:`encode_jpeg_lossless` is a small encoder of
it (ITU-T T.81 Annex H, predictor 1, optimal Huffman table), checked against pydicom's decoder
(pylibjpeg-libjpeg) for every file it writes.

:func:`write_ct_series` writes CT series only (``bench.series``): series of hundreds of such
slices, 1 mm apart, one series per folder, native or RLE Lossless by series.

File ``i`` depends only on the seed and ``i``, so a larger corpus starts with the files of a
smaller one; files already present (from an earlier run with the same seed and code version) are
kept, which makes a second run in the same ``--workdir`` cost only the listing.

    .venv/bin/python -m bench.clinical_corpus OUT_DIR [--files 100] [--seed 0]
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import heapq
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)

from dicomflow.devtools.sample_data import make_uid, render_chest_phantom

# Bump when the files change, so that a corpus cached in a --workdir is written again.
CORPUS_VERSION = 1
MARKER = ".corpus.json"  # hidden: the ingest stage skips it (listed as hidden), the plain loop too
LABEL_COLUMNS = ("accession_number", "study_instance_uid", "sop_instance_uid", "path", "label")
SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGLosslessSV1)
# CT series (write_ct_series): encoding a 512 x 512 slice in JPEG 2000 takes ~10x longer than RLE,
# too long for series of hundreds of slices; native and RLE are what CT archives mostly hold.
SERIES_SYNTAXES = (ExplicitVRLittleEndian, RLELossless)
CR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1")
DX_STORAGE = UID("1.2.840.10008.5.1.4.1.1.1.1")  # Digital X-Ray Image Storage - For Presentation
CT_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
RADIOGRAPH_SHAPES = ((2500, 2048), (2048, 2500), (2048, 2048), (2336, 2836))  # (rows, columns)
CT_SLICES_PER_STUDY = 3
RADIOGRAPHS_PER_STUDY = 2
IMPLEMENTATION_CLASS_UID = "2.25.160358934839715468390247302541268270154"
LAST = ("Moreau", "Schneider", "Ivanova", "Brennan", "Achterberg", "Mwangi", "Sørensen", "Yilmaz")
FIRST = ("Amelie", "Jonas", "Katarina", "Declan", "Femke", "Wanjiru", "Mette", "Emre")
INSTITUTIONS = (("Northgate University Hospital", "12 Infirmary Rd, Northgate NG1 5AB", "NUH"),
                ("Clinique du Parc", "3 Rue des Tilleuls, 69006 Lyon", "CDP"))
VENDORS = {"CR": ("Fujifilm", "FCR Capsula XLII", "A07-02"),
           "DX": ("Carestream Health", "DRX-Evolution", "5.7.412"),
           "CT": ("Siemens Healthineers", "SOMATOM go.Up", "syngo CT VA30A")}


@dataclass(frozen=True)
class FilePlan:
    """One file of the corpus: its study, its place in it and how it is encoded."""

    index: int    # global, seeds the pixels and names the UIDs
    study: int
    number: int   # 1-based within the study
    modality: str
    syntax: UID

    @property
    def path(self) -> str:
        return f"{self.modality.lower()}/{self.study:05d}/{self.number}.dcm"


def plan_corpus(n_files: int) -> list[FilePlan]:
    """Studies in turn radiographs (2 views) and CT (3 slices); each study's transfer syntax
    cycles through :data:`SYNTAXES` per kind, so every kind meets every syntax."""
    plans: list[FilePlan] = []
    study = 0
    while len(plans) < n_files:
        radiograph = study % 2 == 0
        modality = ("CR" if study % 4 == 0 else "DX") if radiograph else "CT"
        syntax = SYNTAXES[(study // 2) % len(SYNTAXES)]
        for number in range(1, (RADIOGRAPHS_PER_STUDY if radiograph else CT_SLICES_PER_STUDY) + 1):
            if len(plans) < n_files:
                plans.append(FilePlan(len(plans), study, number, modality, syntax))
        study += 1
    return plans


# --- pixels -------------------------------------------------------------------------------------

def radiograph_pixels(rng: np.random.Generator, rows: int, cols: int, *, bits: int,
                      photometric: str, lateral: bool) -> np.ndarray:
    """Stored values (uint16) of a chest radiograph: smooth anatomy plus quantum noise."""
    # The phantom at a quarter of the size, interpolated: smooth like anatomy, and 16x cheaper
    # than rendering it at full size.
    coarse = render_chest_phantom(rng, rows // 4, cols // 4, nodule=None,
                                   lateral=lateral).astype(np.float32)
    density = np.asarray(Image.fromarray(coarse, mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
    # Quantum noise of 0.4 % of the range, about what a detector shows at a chest exposure.
    density = density + rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.004)
    top = 2**bits - 1
    low, high = top * rng.uniform(0.02, 0.08), top * rng.uniform(0.8, 0.97)
    values = np.rint(low + np.clip(density, 0.0, 1.0) * (high - low)).astype(np.int32)
    if photometric == "MONOCHROME1":  # stored inverted: high values are dark
        values = top - values
    return values.astype("<u2")


def ct_hounsfield(rng: np.random.Generator, side: int, position: float) -> np.ndarray:
    """A chest CT slice in Hounsfield units (float32): air, soft tissue, lungs, spine, noise."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    y, x = (y - side / 2) / (side / 2), (x - side / 2) / (side / 2)
    body = (x / 0.85) ** 2 + (y / 0.62) ** 2 < 1.0
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    fat = body & ((x / 0.8) ** 2 + (y / 0.57) ** 2 > 1.0)
    hu[fat] = -90.0
    lung_size = 0.28 + 0.04 * np.sin(position)
    for cx in (-0.38, 0.38):
        hu[((x - cx) / lung_size) ** 2 + ((y + 0.05) / (lung_size * 1.4)) ** 2 < 1.0] = -850.0
    hu[(x / 0.09) ** 2 + ((y - 0.42) / 0.09) ** 2 < 1.0] = 700.0  # vertebral body
    hu[((x + 0.08) / 0.12) ** 2 + ((y + 0.05) / 0.14) ** 2 < 1.0] = 45.0  # heart
    hu += rng.standard_normal((side, side), dtype=np.float32) * np.float32(12.0)
    return hu


# --- JPEG Lossless (ITU-T T.81 Annex H), Process 14, selection value 1 ---------------------------

def _huffman_table(counts: np.ndarray) -> tuple[list[int], list[int]]:
    """BITS (codes per length 1..16) and HUFFVAL of an optimal table for ``counts`` of the
    difference categories 0..16, as T.81 Annex K.2 builds it (libjpeg's jpeg_gen_optimal_table):
    a reserved symbol keeps the all-ones code unused, lengths above 16 are folded back."""
    freq = [int(c) for c in counts] + [1]  # the last one is the reserved symbol
    size = [0] * len(freq)
    heap = [(f, s, [s]) for s, f in enumerate(freq) if f > 0]
    heapq.heapify(heap)
    while len(heap) > 1:  # Huffman's merge; a symbol's code length is how often it was merged
        f1, s1, members1 = heapq.heappop(heap)
        f2, s2, members2 = heapq.heappop(heap)
        for symbol in members1 + members2:
            size[symbol] += 1
        heapq.heappush(heap, (f1 + f2, min(s1, s2), members1 + members2))
    bits = [0] * 33
    for symbol, length in enumerate(size):
        if freq[symbol] > 0:
            bits[max(length, 1)] += 1
    for i in range(32, 16, -1):  # K.3 Adjust_BITS: no code longer than 16 bits
        while bits[i] > 0:
            j = i - 2
            while bits[j] == 0:
                j -= 1
            bits[i] -= 2
            bits[i - 1] += 1
            bits[j + 1] += 2
            bits[j] -= 1
    i = 16
    while bits[i] == 0:
        i -= 1
    bits[i] -= 1  # drop the reserved symbol's code (the longest, all ones)
    order = sorted((s for s in range(17) if freq[s] > 0), key=lambda s: (size[s], s))
    return bits[1:17], order


def encode_jpeg_lossless(pixels: np.ndarray, precision: int) -> bytes:
    """A JPEG Lossless, non-hierarchical, first-order prediction (Process 14 SV1) code stream of
    one grayscale frame (T.81 Annex H): predictor 1 (the left neighbour; the one above at the
    start of a row, 2**(P-1) for the first sample), no point transform, one optimal Huffman table.

    ``pixels`` holds unsigned ``precision``-bit samples (signed data as its two's complement bits,
    as DICOM encapsulates it).
    """
    rows, cols = pixels.shape
    x = pixels.astype(np.int32)
    prediction = np.empty_like(x)
    prediction[:, 1:] = x[:, :-1]
    prediction[1:, 0] = x[:-1, 0]
    prediction[0, 0] = 1 << (precision - 1)
    # H.1.2.1: the difference modulo 2**16, read in the range -32767..32768.
    diff = (x - prediction) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff).ravel()
    del x, prediction
    magnitude = np.abs(diff)
    category = np.zeros(diff.size, dtype=np.int64)  # SSSS: the bit length of |diff|
    nonzero = magnitude > 0
    category[nonzero] = np.floor(np.log2(magnitude[nonzero])).astype(np.int64) + 1
    # Additional bits: the low SSSS bits of diff, or of diff - 1 when negative; none for 32768.
    extra = np.where(diff < 0, diff + (1 << category) - 1, diff).astype(np.uint64)
    extra_length = np.where(category == 16, 0, category)

    bits, values = _huffman_table(np.bincount(category, minlength=17))
    code_of, length_of = np.zeros(17, dtype=np.uint64), np.zeros(17, dtype=np.int64)
    code, k = 0, 0
    for length in range(1, 17):  # Annex C: canonical codes in HUFFVAL order
        for _ in range(bits[length - 1]):
            code_of[values[k]], length_of[values[k]] = code, length
            code, k = code + 1, k + 1
        code <<= 1
    lengths = length_of[category] + extra_length
    words = (code_of[category] << extra_length.astype(np.uint64)) | (
        extra & ((np.uint64(1) << extra_length.astype(np.uint64)) - np.uint64(1)))
    del diff, magnitude, category, extra

    # Bit packing: word i goes to bit offset starts[i]. A word is at most 31 bits, so with its
    # offset inside its first byte it spans at most 5 bytes: shifted into a 40-bit window, its
    # 5 byte-slices are added to the bytes they fall on. Words share no bit, so the sums never
    # carry: adding is OR-ing, and bincount adds them for all words at once.
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    total = int(starts[-1] + lengths[-1])
    window = words << (40 - lengths - (starts & 7)).astype(np.uint64)
    first_byte = starts >> 3
    n_bytes = (total + 7) // 8
    packed = np.zeros(n_bytes + 5, dtype=np.float64)
    for k in range(5):
        piece = ((window >> np.uint64(32 - 8 * k)) & np.uint64(0xFF)).astype(np.float64)
        packed += np.bincount(first_byte + k, weights=piece, minlength=n_bytes + 5)
    data = packed[:n_bytes].astype(np.uint8)
    if total % 8:  # F.1.2.3: the last byte is padded with 1 bits
        data[-1] |= (1 << (8 - total % 8)) - 1
    data = np.insert(data, np.flatnonzero(data == 0xFF) + 1, 0)  # byte stuffing (F.1.2.3)

    def segment(marker: int, body: bytes) -> bytes:
        return bytes((0xFF, marker)) + (len(body) + 2).to_bytes(2, "big") + body

    frame = segment(0xC3, bytes((precision,)) + rows.to_bytes(2, "big") + cols.to_bytes(2, "big")
                    + bytes((1, 1, 0x11, 0)))  # SOF3: one component, 1x1 sampling
    table = segment(0xC4, bytes((0x00,)) + bytes(bits) + bytes(values))  # DHT: class 0, id 0
    scan = segment(0xDA, bytes((1, 1, 0x00, 1, 0, 0)))  # SOS: predictor 1, Pt 0
    return b"\xff\xd8" + frame + table + scan + data.tobytes() + b"\xff\xd9"


# --- headers ------------------------------------------------------------------------------------

def _digits(seed: int, role: str, index: int, n: int) -> str:
    """A decimal identifier of ``n`` digits derived from (seed, role, index)."""
    value = int.from_bytes(hashlib.sha256(f"{seed}|{role}|{index}".encode()).digest()[:8], "big")
    return str(value % 10**n).zfill(n)


def build_dataset(plan: FilePlan, seed: int, rng: np.random.Generator) -> Dataset:
    """The data set (file meta included) of one file, pixels encoded in ``plan.syntax``."""
    patient = plan.study // 2  # a radiograph study and a CT study per patient
    study_uid = make_uid(seed, "clinical-study", plan.study)
    sop_uid = make_uid(seed, "clinical-sop", plan.index)
    sop_class = {"CR": CR_STORAGE, "DX": DX_STORAGE, "CT": CT_STORAGE}[plan.modality]
    when = dt.datetime(2024, 1, 8, 8, 0) + dt.timedelta(days=3 * plan.study, minutes=37 * plan.study)
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(_digits(seed, "birth", patient, 5)) % 25000)
    last, first = LAST[patient % len(LAST)], FIRST[(patient // len(LAST)) % len(FIRST)]
    institution, address, code = INSTITUTIONS[patient % len(INSTITUTIONS)]
    mrn, accession = f"{code}{_digits(seed, 'mrn', patient, 7)}", f"A{_digits(seed, 'acc', plan.study, 9)}"
    manufacturer, model, software = VENDORS[plan.modality]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian  # compress() sets the final one
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = "DICOMFLOW_BENCH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: the names have accents
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if plan.modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    acquired = when + dt.timedelta(minutes=plan.number)
    ds.StudyDate, ds.StudyTime = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    ds.SeriesDate, ds.SeriesTime = acquired.strftime("%Y%m%d"), acquired.strftime("%H%M%S")
    ds.AcquisitionDate, ds.AcquisitionTime = ds.SeriesDate, ds.SeriesTime
    ds.ContentDate, ds.ContentTime = ds.SeriesDate, ds.SeriesTime
    ds.AccessionNumber, ds.Modality = accession, plan.modality
    ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = manufacturer, model, software
    ds.InstitutionName, ds.InstitutionAddress = institution, address
    ds.InstitutionalDepartmentName = "Radiology"
    ds.StationName, ds.DeviceSerialNumber = f"{code}-{plan.modality}01", _digits(seed, "serial", plan.study % 3, 8)
    ds.ReferringPhysicianName = f"{LAST[(patient + 3) % len(LAST)]}^{FIRST[(patient + 1) % len(FIRST)]}^^Dr"
    ds.PerformingPhysicianName = f"{LAST[(patient + 5) % len(LAST)]}^{FIRST[(patient + 2) % len(FIRST)]}"
    ds.OperatorsName = f"{LAST[(patient + 6) % len(LAST)]}^{FIRST[(patient + 4) % len(FIRST)]}"
    ds.StudyDescription = "CT THORAX" if plan.modality == "CT" else "XR CHEST 2 VIEWS"
    ds.SeriesDescription = "THORAX 1.0 BR40" if plan.modality == "CT" else f"CHEST {('PA', 'LL')[plan.number - 1]}"
    ds.PatientName = f"{last}^{first}"
    ds.PatientID, ds.IssuerOfPatientID = mrn, code
    ds.PatientBirthDate, ds.PatientSex = birth.strftime("%Y%m%d"), "FM"[patient % 2]
    ds.PatientAge = f"{(when.date() - birth).days // 365:03d}Y"
    ds.PatientAddress = f"{10 + patient % 80} {('Mill Lane', 'Rue Verte', 'Harbour St')[patient % 3]}"
    ds.PatientTelephoneNumbers = f"+44 20 7946 {_digits(seed, 'tel', patient, 4)}"
    ds.OtherPatientIDs = f"NHS{_digits(seed, 'nhs', patient, 9)}"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = make_uid(seed, "clinical-series", plan.study)
    ds.FrameOfReferenceUID = make_uid(seed, "clinical-frame", plan.study)
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(5000 + plan.study), 1, plan.number
    request = Dataset()
    request.AccessionNumber = accession
    request.RequestedProcedureID = f"RP{accession[1:]}"
    request.RequestedProcedureDescription = ds.StudyDescription
    ds.RequestAttributesSequence = Sequence([request])
    ds.BodyPartExamined = "CHEST"
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    pixels = _ct_image(ds, plan, rng) if plan.modality == "CT" else _radiograph_image(ds, plan, rng)
    ds.LossyImageCompression = "00"
    block = ds.private_block(0x0019, "DICOMFLOW CLINICAL BENCH", create=True)
    block.add_new(0x01, "LO", f"{mrn} {last} {first}")  # private tags with PHI, as exports have
    _encode(ds, pixels, plan.syntax)
    return ds


def _radiograph_image(ds: Dataset, plan: FilePlan, rng: np.random.Generator) -> np.ndarray:
    """Fill the radiograph's image attributes; return its stored values."""
    rows, cols = RADIOGRAPH_SHAPES[plan.index % len(RADIOGRAPH_SHAPES)]
    bits = (12, 16)[(plan.index // 2) % 2]
    photometric = ("MONOCHROME2", "MONOCHROME1")[(plan.index // 4) % 2]
    pixels = radiograph_pixels(rng, rows, cols, bits=bits, photometric=photometric,
                               lateral=plan.number == 2)
    ds.ViewPosition = ("PA", "LL")[plan.number - 1]
    ds.PatientOrientation = ["A", "F"] if ds.ViewPosition == "LL" else ["L", "F"]
    ds.ImagerPixelSpacing = ds.PixelSpacing = ["0.139", "0.139"]
    ds.KVP, ds.ExposureInuAs = "120", 2500
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits - 1, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = "0", "1", "US"
    if (plan.study // 2) % 3 != 2:  # every third study without a window: the frame's range is used
        low, high = np.percentile(pixels[::8, ::8], (1, 99))
        ds.WindowCenter, ds.WindowWidth = f"{(low + high) / 2:.1f}", f"{max(high - low, 2):.1f}"
        ds.VOILUTFunction = "LINEAR"
    if plan.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    return pixels


def _ct_image(ds: Dataset, plan: FilePlan, rng: np.random.Generator) -> np.ndarray:
    """Fill the CT slice's image attributes; return its stored values (int16)."""
    intercept = (-1024.0, 0.0, -1000.0)[plan.study % 3]
    slope = 1.0 if plan.study % 2 else 0.5  # a slope of 0.5 halves HU steps (finer stored values)
    hounsfield = ct_hounsfield(rng, 512, position=plan.number + plan.study)
    pixels = np.rint((hounsfield - intercept) / slope).clip(-32768, 32767).astype("<i2")
    z = -150.0 + 1.0 * plan.number
    ds.SliceThickness, ds.KVP, ds.ConvolutionKernel = "1.0", "120", "Br40"
    ds.ImagePositionPatient = ["-180.0", "-180.0", f"{z:.1f}"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.SliceLocation = f"{z:.1f}"
    ds.PixelSpacing = ["0.703125", "0.703125"]
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = 512
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = f"{intercept:g}", f"{slope:g}", "HU"
    ds.WindowCenter, ds.WindowWidth = ["40", "-600"], ["400", "1500"]  # soft tissue, lung
    ds.WindowCenterWidthExplanation = ["MEDIASTINUM", "LUNG"]
    return pixels


def _encode(ds: Dataset, pixels: np.ndarray, syntax: UID) -> None:
    """Set (7FE0,0010) Pixel Data in ``syntax``; compressed frames are checked to decode exactly."""
    if syntax == ExplicitVRLittleEndian:
        ds.add_new(0x7FE00010, "OW", pixels.tobytes())
        return
    if syntax == JPEGLosslessSV1:
        # DICOM encapsulates signed samples as their two's complement bits (PS3.5 8.2.1).
        frame = encode_jpeg_lossless(pixels.view("<u2"), int(ds.BitsStored))
        ds.add_new(0x7FE00010, "OB", encapsulate([frame]))
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    else:
        # Never a new SOP Instance UID: the corpus must be the same bytes on every run.
        ds.compress(syntax, pixels, generate_instance_uid=False)
    decoded = ds.pixel_array
    if not np.array_equal(decoded, pixels):
        raise AssertionError(f"{syntax.name} frame does not decode to the pixels it encodes")
    ds._pixel_array, ds._pixel_id = None, {}  # not kept in memory with the data set


# --- the corpus ---------------------------------------------------------------------------------

def _label(seed: int, study: int) -> int:
    """A study's label (0 or 1), balanced in pairs of studies of each kind."""
    flip = int(_digits(seed, "label", study // 4, 2)) % 2
    return ((study // 2) % 2) ^ flip


def _write_file(plan: FilePlan, *, folder: Path, seed: int) -> None:
    """Write one file of the corpus; its pixels are drawn from (seed, file index) alone."""
    ds = build_dataset(plan, seed, np.random.default_rng([seed, plan.index]))
    path = folder / plan.path
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_suffix(".partial")  # renamed when whole: an interrupted run leaves no file
    ds.save_as(part, enforce_file_format=True)
    part.rename(path)


def plan_ct_series(slices: list[int]) -> list[FilePlan]:
    """CT series only, one study each, with ``slices[i]`` slices in series ``i`` (1 mm apart,
    :func:`_ct_image`); each series' transfer syntax alternates between :data:`SERIES_SYNTAXES`."""
    plans: list[FilePlan] = []
    for i, count in enumerate(slices):
        study = 2 * i + 1  # odd, as CT studies are in plan_corpus: the same headers and intercepts
        plans.extend(FilePlan(len(plans) + k, study, k + 1, "CT", SERIES_SYNTAXES[i % len(SERIES_SYNTAXES)])
                     for k in range(count))
    return plans


def write_ct_series(folder: Path, slices: list[int], seed: int = 0) -> list[Path]:
    """Write (or complete) CT series of 512 x 512 signed slices under ``folder``, one series per
    ``ct/<study>/`` folder, ``slices[i]`` slices in series ``i``; return their paths in series and
    slice order (see :func:`write_corpus` for ``seed`` and the reuse of files already there).

    Raises
    ------
    ValueError
        No series, or a series of fewer than 1 slice.
    """
    if not slices or min(slices) < 1:
        raise ValueError(f"slices must hold at least one series of at least 1 slice; got {slices}")
    return _write_plans(folder, plan_ct_series(slices), seed, kind="ct-series")


def write_corpus(folder: Path, n_files: int, seed: int = 0, *, reuse: Path | None = None) -> list[Path]:
    """Write (or complete) the corpus of ``n_files`` files under ``folder``; return their paths.

    Parameters
    ----------
    folder : Path
        Where the files and ``labels.csv`` go; created when missing. A corpus of another seed or
        code version found there is removed first; files already written are kept.
    n_files : int
        How many DICOM files (at least 1).
    seed : int, default=0
        Seeds every identifier and pixel: the same seed gives the same bytes.
    reuse : Path, optional
        Another corpus folder of the same seed and version (a smaller one, say): its files are
        hard-linked here instead of written again (file ``i`` is the same in every corpus).

    Returns
    -------
    list of Path
        The DICOM files in corpus order (not ``labels.csv``).
    """
    if n_files < 1:
        raise ValueError(f"n_files must be at least 1; got {n_files}")
    return _write_plans(folder, plan_corpus(n_files), seed, reuse=reuse)


def _write_plans(folder: Path, plans: list[FilePlan], seed: int, *, reuse: Path | None = None,
                 kind: str = "") -> list[Path]:
    """Write the files of ``plans`` not yet in ``folder`` and its labels.csv (:func:`write_corpus`);
    ``kind`` tells corpora of other plans apart in the marker (an earlier one is removed)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / MARKER
    stamp = {"version": CORPUS_VERSION, "seed": seed, **({"kind": kind} if kind else {})}
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) != stamp:
        shutil.rmtree(folder)
        folder.mkdir(parents=True)
    marker.write_text(json.dumps(stamp), encoding="utf-8")
    wanted = {folder / plan.path for plan in plans}
    for stale in [p for p in folder.rglob("*") if p.is_file() and p.suffix in (".dcm", ".partial")]:
        if stale not in wanted:  # from a larger corpus, or half written: the stage would read it
            stale.unlink()
    for empty in sorted((p for p in folder.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(empty.iterdir()):  # the stage lists empty folders too
            empty.rmdir()
    if reuse is not None and (reuse / MARKER).is_file() and \
            json.loads((reuse / MARKER).read_text(encoding="utf-8")) == stamp:
        for plan in plans:
            source, target = reuse / plan.path, folder / plan.path
            if source.is_file() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                os.link(source, target)
    missing = [plan for plan in plans if not (folder / plan.path).is_file()]
    if missing:  # one process per core: encoding JPEG 2000 and JPEG Lossless takes seconds a file
        with ProcessPoolExecutor(max_workers=min(len(missing), os.cpu_count() or 1)) as pool:
            list(pool.map(partial(_write_file, folder=folder, seed=seed), missing))
    rows = []
    for plan in plans:
        rows.append((f"A{_digits(seed, 'acc', plan.study, 9)}", make_uid(seed, "clinical-study", plan.study),
                     make_uid(seed, "clinical-sop", plan.index), plan.path, _label(seed, plan.study)))
    with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(LABEL_COLUMNS)
        writer.writerows(rows)
    return [folder / plan.path for plan in plans]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    files = write_corpus(args.folder, args.files, args.seed)
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} files, {size / 2**20:,.0f} MiB, in {args.folder} ({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main()
