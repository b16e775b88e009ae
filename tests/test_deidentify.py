"""Tests of the deidentify stage: Basic Profile rules, keyed pseudonyms, leak check, main()."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.multival import MultiValue
from burned_in_pixels import draw, radiograph
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from dicomflow.deid import secret as deid_secret
from dicomflow.deid.worker import AUDIT_COLUMNS
from stages import deidentify
from dicomflow.config import layout
from dicomflow.errors import DataError, SettingsError
from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.config.params import load_params
from dicomflow.deid.leaks import Leak, find_leaks
from dicomflow.deid.profile import (
    OPTIONS_FILE, DeidOptions, action_for, deidentify_dataset, load_profile, shift_date, top_code_age,
)
from dicomflow.deid.identifiers import Identifiers, collect_identifiers

REPO = Path(__file__).resolve().parents[1]
# The demo secret, written out again: the code's constant must be this one.
DEMO = b"dicomflow demo secret: for the embedded sample data only, never for real data"
SECRET = b"test secret, not the demo one, 32 bytes or more"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

# Planted PHI: every value must be gone from the de-identified file.
NAME, PATIENT_ID, OTHER_ID = "Quixley^Bartholomew", "MRN-55501234", "HX-99887766"
ROOT = "1.2.826.0.1.3680043.99"
STUDY_UID, SERIES_UID, FRAME_UID = f"{ROOT}.1", f"{ROOT}.2", f"{ROOT}.3"
SOP_UID_A, SOP_UID_B = f"{ROOT}.10", f"{ROOT}.11"
PLANTED = [NAME, "Quixley", "Bartholomew", PATIENT_ID, OTHER_ID, "19270315", "42 Wisteria Lane",
           "ACC-70707070", "Saint Elsewhere Hospital", "9 Harbor Road", "Fennimore^Ada",
           "Grantham^Cyrus", "Osgood^Tilda", "20230405", "RP-31415926", "WS-CR-7", "SN-00042",
           "Private note", "Dr Hollis", STUDY_UID, SERIES_UID, FRAME_UID]

# One value per VR found in Table E.1-1, valid for that VR.
VALUE_BY_VR = {
    "AE": "PLANTEDAE", "AS": "045Y", "CS": "PLANTED", "DA": "20230405", "DT": "20230405101112",
    "TM": "101112", "DS": "1.5", "IS": "7", "LO": "Planted long", "LT": "Planted text",
    "PN": "Planted^Person", "SH": "Planted short", "ST": "Planted short text",
    "UC": "Planted unlimited", "UT": "Planted unlimited text", "UR": "http://example.org/planted",
    "US": 3, "OB": b"\x01\x02", "UN": b"\x01\x02",
}


# Oracles of the keyed values, written here with hmac and hashlib (not by calling the code):
# HMAC-SHA256 keyed by the secret over "<purpose>\0<value>", purposes "id", "date" and "uid".
def pseudonym(secret: bytes, value: str, length: int = 12) -> str:
    """A keyed pseudonym: the first ``length`` hex digits of the HMAC."""
    return hmac.new(secret, b"id\x00" + value.encode(), hashlib.sha256).hexdigest()[:length]


def date_shift(secret: bytes, patient_id: str, max_days: int = 3650) -> int:
    """A patient's date shift: 1 + (the HMAC's first 8 bytes, big-endian) mod ``max_days``."""
    digest = hmac.new(secret, b"date\x00" + patient_id.encode(), hashlib.sha256).digest()
    return 1 + int.from_bytes(digest[:8], "big") % max_days


def fingerprint(secret: bytes) -> str:
    """The secret's fingerprint: HMAC-SHA256 keyed by it over a fixed label, 16 hex digits."""
    return hmac.new(secret, b"dicomflow secret fingerprint v1", hashlib.sha256).hexdigest()[:16]


def keyed_uid_of(secret: bytes, uid: str) -> str:
    """A keyed UID: "2.25." + the HMAC's first 16 bytes as a version 8 UUID (RFC 9562 5.8)."""
    octets = bytearray(hmac.new(secret, b"uid\x00" + uid.encode(), hashlib.sha256).digest()[:16])
    octets[6] = (octets[6] & 0x0F) | 0x80  # version 8 in the high nibble of octet 6
    octets[8] = (octets[8] & 0x3F) | 0x80  # variant 0b10 in the top bits of octet 8
    return "2.25." + str(int.from_bytes(octets, "big"))


def test_keyed_values_are_pinned_to_values_checked_by_hand():
    """The code's keyed values equal the oracles' and literals checked once with openssl
    (``printf 'id\\0ABC' | openssl dgst -sha256 -hmac secret``): a change re-keys every export."""
    from dicomflow.deid.profile import date_shift_days, keyed_hex, keyed_uid

    assert keyed_hex(b"secret", "ABC") == pseudonym(b"secret", "ABC") == "8ca56db0f0f2"
    assert keyed_hex(b"secret", "ABC", 16) == pseudonym(b"secret", "ABC", 16) == "8ca56db0f0f2dff3"
    # printf 'date\0ABC' | openssl dgst -sha256 -hmac secret: e7813a153a438dcf..., and
    # 1 + 0xE7813A153A438DCF % 3650 == 2508, 1 + 0xE7813A153A438DCF % 7 == 5
    assert date_shift_days(b"secret", "ABC", 3650) == date_shift(b"secret", "ABC") == 2508
    assert date_shift_days(b"secret", "ABC", 7) == date_shift(b"secret", "ABC", 7) == 5
    assert (keyed_uid(b"secret", "1.2.3.4") == keyed_uid_of(b"secret", "1.2.3.4")
            == "2.25.20781661674455053869045580917724076764")  # UUID 0fa26707-0c51-82a0-8264-6cb5ee0edadc


def _code_item(meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = "P1", "99TEST", meaning
    return item


def make_dataset(*, sop_uid: str = SOP_UID_A, age: str = "095Y", referenced_uid: str | None = None,
                 rle: bool = False) -> FileDataset:
    """A CR image with PHI at the top, in nested sequences and a private block, plus overlays."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = CR_STORAGE, sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "WS-CR-7"
    ds = FileDataset("planted.dcm", Dataset(), file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR_STORAGE, sop_uid, "CR"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
    ds.FrameOfReferenceUID = FRAME_UID
    ds.PatientName, ds.PatientID, ds.OtherPatientIDs = NAME, PATIENT_ID, OTHER_ID
    ds.PatientBirthDate, ds.PatientAddress = "19270315", "42 Wisteria Lane"
    ds.PatientSex, ds.PatientAge, ds.PatientWeight, ds.PatientSize = "F", age, "61.5", "1.62"
    ds.AccessionNumber, ds.StudyID = "ACC-70707070", "ST-27182818"
    ds.InstitutionName, ds.InstitutionAddress = "Saint Elsewhere Hospital", "9 Harbor Road"
    ds.ReferringPhysicianName, ds.PerformingPhysicianName = "Fennimore^Ada", "Grantham^Cyrus"
    ds.OperatorsName, ds.StationName, ds.DeviceSerialNumber = "Osgood^Tilda", "WS-CR-7", "SN-00042"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20230405"
    ds.StudyTime = ds.ContentTime = "101112"
    ds.AcquisitionDateTime = "20230405101112"
    ds.StudyDescription, ds.Manufacturer, ds.BodyPartExamined = "CXR for Dr Hollis", "Acme", "CHEST"
    request = Dataset()
    request.AccessionNumber, request.RequestedProcedureID = "ACC-70707070", "RP-31415926"
    ds.RequestAttributesSequence = [request]
    referenced_study = Dataset()
    referenced_study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
    referenced_study.ReferencedSOPInstanceUID = STUDY_UID
    ds.ReferencedStudySequence = [referenced_study]
    other_id = Dataset()
    other_id.PatientID, other_id.TypeOfPatientID = OTHER_ID, "TEXT"
    ds.OtherPatientIDsSequence = [other_id]
    if referenced_uid is not None:  # X/Z/U*: kept, its UIDs replaced
        ref = Dataset()
        ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = CR_STORAGE, referenced_uid
        ds.ReferencedImageSequence = [ref]
    dose = Dataset()  # a sequence outside the table holding table attributes two levels down
    dose.RadiopharmaceuticalStartDateTime = "20230405101112"
    nested = Dataset()
    nested.ReferencedSOPClassUID, nested.ReferencedSOPInstanceUID = CR_STORAGE, SOP_UID_B
    nested.InstitutionName = "Saint Elsewhere Hospital"
    dose.ReferencedImageSequence = [nested]
    ds.RadiopharmaceuticalInformationSequence = [dose]
    observer = Dataset()  # D on a sequence: everything inside replaced
    observer.PersonName, observer.VerifyingOrganization = "Osgood^Tilda", "Saint Elsewhere Hospital"
    ds.ContentSequence = [_code_item("Dr Hollis"), observer]
    block = ds.private_block(0x0011, "ACME PHI", create=True)
    block.add_new(0x01, "LO", f"MRN {PATIENT_ID} {NAME}")
    inner = Dataset()
    inner.add_new(0x00111002, "LO", "Private note")
    block.add_new(0x02, "SQ", [inner])
    for element, vr, value in ((0x0010, "US", 16), (0x0011, "US", 16), (0x0040, "CS", "G"),
                               (0x0050, "SS", [1, 1]), (0x0100, "US", 1), (0x0102, "US", 0),
                               (0x3000, "OW", b"\xff" * 32), (0x4000, "LT", "Quixley overlay")):
        ds.add_new(0x60000000 | element, vr, value)
    ds.add_new(0x50000005, "US", 1)  # a retired curve
    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 4096, size=(16, 16), dtype=np.uint16)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 16, 16, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    if rle:
        ds.compress(RLELossless, pixels, generate_instance_uid=False)
    return ds


def deid(ds: Dataset, *, secret: bytes = SECRET, remove_private_tags: bool = True,
         retain_patient_characteristics: bool = True) -> tuple[Dataset, dict]:
    options = DeidOptions(remove_private_tags=remove_private_tags,
                          retain_patient_characteristics=retain_patient_characteristics)
    return deidentify_dataset(ds, profile=load_profile(), secret=secret, options=options)


def write_and_read(ds: Dataset, path: Path) -> FileDataset:
    ds.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path)


def all_elements(ds: Dataset, depth: int = 0):
    """(element, depth) for every element at any depth, file meta included."""
    if depth == 0 and getattr(ds, "file_meta", None) is not None:
        yield from ((elem, 0) for elem in ds.file_meta)
    for elem in ds:
        yield elem, depth
        if elem.VR == "SQ":
            for item in elem.value:
                yield from all_elements(item, depth + 1)


def all_text(ds: Dataset) -> str:
    """Every value except pixel data, as one case-folded text."""
    parts = []
    for elem, _ in all_elements(ds):
        if elem.VR == "SQ" or elem.tag.group == 0x7FE0 or elem.value is None:
            continue
        values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
        parts += [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]
    return "\n".join(parts).casefold()


def table_rows() -> list[dict]:
    """PS3.15 Table E.1-1 of DICOM 2026c as dicom-anonymizer 2.1.0 ships it (read here from the
    package, not through the code under test), with the option columns of the 2024e JSON."""
    from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector

    lists = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
             "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*"}
    options = {r["tag"]: r for r in json.loads(OPTIONS_FILE.read_text())}
    rows = []
    for name, tags in dicom_anonymization_database_selector("dicomfields_2026c").items():
        for tag in tags if name in lists else ():
            text = f"({tag[0]:04X},{tag[1]:04X})"
            if len(tag) == 4:  # a mask such as (50XX,XXXX)
                text = "(" + "".join("X" if m == "0" else d for d, m in zip(
                    f"{tag[0]:04X},{tag[1]:04X}", f"{tag[2]:04X},{tag[3]:04X}")) + ")"
            rows.append({**options.get(text, {"name": text}), "tag": text, "basicProfile": lists[name]})
    return rows


OPTION_COLUMNS = {"retain_patient_characteristics": "rtnPatCharsOpt",
                  "retain_device_identity": "rtnDevIdOpt",
                  "retain_longitudinal_dates": "rtnLongModifDatesOpt",
                  "clean_descriptors": "cleanDescOpt"}
OPTION_SETS = {
    "basic": DeidOptions(),
    "patient": DeidOptions(retain_patient_characteristics=True),
    "all": DeidOptions(**dict.fromkeys(OPTION_COLUMNS, True)),
}
# PS3.15 Table E.1-1 rows written out by hand from the standard's text: (keyword, tag, the Basic
# Profile code, the one action dicomflow applies under the Basic Profile alone, the option
# columns that name the row). Options: "patient" Retain Patient Characteristics, "device" Retain
# Device Identity, "dates" Retain Longitudinal Temporal Information with Modified Dates, "clean"
# Clean Descriptors (Retain Institution Identity, which keeps the institution rows, is not offered).
# A combined code lets the application choose by the attribute's Type (E.1.1); dicomflow takes
# its rightmost choice, valid for every Type, except X/Z on a (Type 3) sequence: removed.
ANNEX_E = [
    ("PatientName", 0x00100010, "Z", "Z", {}),
    ("PatientID", 0x00100020, "Z/D", "D", {}),
    ("PatientBirthDate", 0x00100030, "Z", "Z", {}),
    ("PatientSex", 0x00100040, "Z", "Z", {"patient": "K"}),
    ("PatientAge", 0x00101010, "X", "X", {"patient": "K"}),
    ("PatientSize", 0x00101020, "X", "X", {"patient": "K"}),
    ("PatientWeight", 0x00101030, "X", "X", {"patient": "K"}),
    ("EthnicGroup", 0x00102160, "X", "X", {"patient": "K"}),
    ("Allergies", 0x00102110, "X", "X", {"patient": "C", "clean": "C"}),
    ("PatientComments", 0x00104000, "X", "X", {"clean": "C"}),
    ("PatientAddress", 0x00101040, "X", "X", {}),
    ("OtherPatientIDs", 0x00101000, "X", "X", {}),
    ("StudyDate", 0x00080020, "Z", "Z", {"dates": "C"}),
    ("StudyTime", 0x00080030, "Z", "Z", {"dates": "C"}),
    ("SeriesDate", 0x00080021, "X/D", "D", {"dates": "C"}),
    ("AcquisitionDate", 0x00080022, "X/Z", "Z", {"dates": "C"}),
    ("ContentDate", 0x00080023, "Z/D", "D", {"dates": "C"}),
    ("AcquisitionDateTime", 0x0008002A, "X/Z/D", "D", {"dates": "C"}),
    ("AccessionNumber", 0x00080050, "Z", "Z", {}),
    ("StudyID", 0x00200010, "Z", "Z", {}),
    ("ReferringPhysicianName", 0x00080090, "Z", "Z", {}),
    ("PerformingPhysicianName", 0x00081050, "X", "X", {}),
    ("OperatorsName", 0x00081070, "X/Z/D", "D", {}),
    ("InstitutionName", 0x00080080, "X/Z/D", "D", {}),
    ("InstitutionAddress", 0x00080081, "X", "X", {}),
    ("InstitutionalDepartmentName", 0x00081040, "X", "X", {}),
    ("StationName", 0x00081010, "X/Z/D", "D", {"device": "K"}),
    ("DeviceSerialNumber", 0x00181000, "X/Z/D", "D", {"device": "K"}),
    ("DateOfLastCalibration", 0x00181200, "X", "X", {"device": "K", "dates": "C"}),
    ("StudyDescription", 0x00081030, "X", "X", {"clean": "C"}),
    ("SeriesDescription", 0x0008103E, "X", "X", {"clean": "C"}),
    ("ProtocolName", 0x00181030, "X/D", "D", {"clean": "C"}),
    ("ImageComments", 0x00204000, "X", "X", {"clean": "C"}),
    ("SOPInstanceUID", 0x00080018, "U", "U", {}),
    ("StudyInstanceUID", 0x0020000D, "U", "U", {}),
    ("SeriesInstanceUID", 0x0020000E, "U", "U", {}),
    ("FrameOfReferenceUID", 0x00200052, "U", "U", {}),
    ("ReferencedSOPInstanceUID", 0x00081155, "U", "U", {}),
    ("ReferencedStudySequence", 0x00081110, "X/Z", "X", {}),
    ("ReferencedImageSequence", 0x00081140, "X/Z/U*", "U", {}),
]
# With every option on, a row two columns name: C (kept only cleaned) over K, as action_for documents.
ALL_OPTIONS_BY_HAND = {"DateOfLastCalibration": "C", "Allergies": "C"}
HAND_OPTIONS = {"basic": DeidOptions(), "patient": DeidOptions(retain_patient_characteristics=True),
                "device": DeidOptions(retain_device_identity=True),
                "dates": DeidOptions(retain_longitudinal_dates=True),
                "clean": DeidOptions(clean_descriptors=True),
                "all": DeidOptions(retain_patient_characteristics=True, retain_device_identity=True,
                                   retain_longitudinal_dates=True, clean_descriptors=True)}
BY_HAND = {f"({tag >> 16:04X},{tag & 0xFFFF:04X})": code for _, tag, code, _, _ in ANNEX_E}


def allowed_actions(row: dict, options: DeidOptions) -> set[str]:
    """What PS3.15 allows for a row: the codes of the options in use that name it (E.3), else any
    code of the combined basic code (E.1.1: the choice depends on the attribute's Type). A C on
    text may also remove, as the basic code does (C is "clean", never "keep as is")."""
    named = {row[column] for option, column in OPTION_COLUMNS.items()
             if getattr(options, option) and row.get(column)}
    basic = set(row["basicProfile"].rstrip("*").split("/"))
    return named | basic if "C" in named else named or basic


def exact_table_rows() -> list[tuple[int, dict]]:
    """Rows with one tag; masks are tested with overlays, (0002,0003) with the file meta; tags
    pydicom 3.0 does not know (new in 2026c) cannot be planted with a VR."""
    return [(int(r["tag"][1:5] + r["tag"][6:10], 16), r) for r in table_rows()
            if "X" not in r["tag"][1:10] and r["tag"][1:5] != "0002"
            and dictionary_has_tag(int(r["tag"][1:5] + r["tag"][6:10], 16))]


def planted_value(tag: int, vr: str) -> object:
    """A value valid for ``vr`` and distinct for each tag (dates too), so that one attribute's
    value cannot pass for another's."""
    if vr == "UI":
        return f"1.2.826.0.1.3680043.77.{tag}"
    if vr == "SQ":
        return [_code_item(f"Planted meaning {tag:08X}")]
    if vr in ("DA", "DT"):
        day = datetime.date(1950, 1, 1) + datetime.timedelta(days=tag * 7919 % 20000)
        return day.strftime("%Y%m%d") + ("101112" if vr == "DT" else "")
    text = {"AE": f"AE{tag:08X}", "CS": f"P{tag:08X}", "SH": f"SH {tag:08X}",
            "PN": f"Fam{tag:08X}^Giv{tag:08X}", "UR": f"http://example.org/{tag:08X}"}
    if vr in text:
        return text[vr]
    if vr in ("LO", "LT", "ST", "UC", "UT"):
        return f"Planted {vr} {tag:08X}"
    return VALUE_BY_VR[vr]


IDENTIFYING_VRS = ("AE", "CS", "SH", "PN", "UR", "LO", "LT", "ST", "UC", "UT", "DA", "DT", "UI")


def every_table_attribute() -> FileDataset:
    """A file holding every exact-tag attribute of Table E.1-1 with a distinct planted value, at
    the top level and again inside an item of a sequence the table does not list, plus planted
    values in a private block."""
    ds = make_dataset()
    nested = Dataset()
    for tag, _ in exact_table_rows():
        vr = dictionary_VR(tag)
        ds.add_new(tag, vr, planted_value(tag, vr))
        nested.add_new(tag, vr, planted_value(tag, vr))
    ds.RadiopharmaceuticalInformationSequence.append(nested)
    block = ds.private_block(0x0013, "PLANTED PHI", create=True)
    block.add_new(0x01, "LO", f"{ds.PatientID} {ds.AccessionNumber}")
    block.add_new(0x02, "SQ", [nested])
    return ds


@pytest.fixture(scope="module")
def table_files(tmp_path_factory) -> dict[str, tuple[FileDataset, FileDataset]]:
    """Source and de-identified (written, read back) every-attribute files, by option set."""
    folder = tmp_path_factory.mktemp("table")
    source = every_table_attribute()
    files = {}
    for name, options in OPTION_SETS.items():
        out, _ = deidentify_dataset(source, profile=load_profile(), secret=SECRET, options=options)
        command = [out.pop(tag) for tag in list(out.keys()) if tag.group == 0x0000]
        (folder / name).mkdir()
        written = write_and_read(out, folder / name / "out.dcm")
        for elem in command:  # (0000,eeee) cannot go into a file (PS3.10): checked in memory
            written.add(elem)
        files[name] = (source, written)
    return files


def outcome_matches(code: str, before, after, out: Dataset, shift: int) -> bool:
    """Whether ``after`` (None: removed) is what action ``code`` makes of ``before``."""
    empty = after is not None and (len(after.value) == 0 if after.VR == "SQ"
                                   else after.value in ("", None, b""))
    if code == "X":
        return after is None
    if code == "Z":  # Z allows a dummy for Patient's Name: the Patient ID pseudonym
        return empty or (before.tag == 0x00100010 and str(after.value) == out.PatientID)
    if code == "K":
        return after is not None and after.value == (
            top_code_age(before.value) if before.VR == "AS" else before.value)
    if code == "C":
        if before.VR in ("DA", "DT"):  # moved by the patient's shift
            return after is not None and after.value == shift_date(before.value, shift) != before.value
        if before.VR == "UI":
            return after is not None and after.value.startswith("2.25.")
        if before.VR == "SQ":
            return after is not None and len(after.value) == len(before.value)
        # cleaned: words cut out, none added (or all removed)
        return after is None or empty or set(re.findall(r"\w+", str(after.value))) <= set(
            re.findall(r"\w+", str(before.value)))
    if before.VR == "SQ":  # D: items kept, text inside replaced; U: items kept
        meanings = [item.get("CodeMeaning") for item in after.value] if after is not None else []
        return len(meanings) == len(before.value) and (
            all(m != before.value[0].CodeMeaning for m in meanings) if code == "D" else True)
    replaced = after is not None and not empty and after.value != before.value
    if replaced and before.VR == "UI":
        return after.value.startswith("2.25.") and UID(after.value).is_valid
    return replaced


class TestTableActions:
    def test_the_table_is_2026c_with_its_option_columns(self):
        rows = {row["tag"]: row for row in table_rows()}
        assert len(rows) == 655
        assert {tag: rows[tag]["basicProfile"] for tag in BY_HAND} == BY_HAND
        columns = {"patient": "rtnPatCharsOpt", "device": "rtnDevIdOpt", "dates": "rtnLongModifDatesOpt",
                   "clean": "cleanDescOpt"}
        for keyword, tag, _, _, named in ANNEX_E:  # the option columns of the shipped 2024e JSON
            row = rows[f"({tag >> 16:04X},{tag & 0xFFFF:04X})"]
            assert {option: row[column] for option, column in columns.items() if row.get(column)} == named, keyword
        profile = load_profile()
        assert len(profile) == 655 and profile.revision == "2026c"
        assert profile.rule_for(0x60023000).basic == "X"  # (60XX,3000) Overlay Data mask
        assert profile.rule_for(0x50101234).basic == "X"  # (50XX,XXXX) Curve Data mask
        assert profile.rule_for(0x00080070) is None  # (0008,0070) Manufacturer is not listed

    @pytest.mark.parametrize("option_set", list(OPTION_SETS))
    def test_every_attribute_gets_its_action(self, table_files, option_set):
        source, out = table_files[option_set]
        options = OPTION_SETS[option_set]
        rows = exact_table_rows()
        assert len(rows) > 600
        shift = date_shift(SECRET, str(source.PatientID), options.max_date_shift_days)
        wrong = []
        for tag, row in rows:
            allowed = allowed_actions(row, options)
            if not any(outcome_matches(code, source[tag], out.get(tag), out, shift) for code in allowed):
                after = out.get(tag)
                wrong.append(f"{row['tag']} {row['name']} ({'/'.join(sorted(allowed))}): "
                             f"{source[tag].value!r} -> {after and after.value!r}")
        assert not wrong, f"{len(wrong)} attribute(s) without their action: " + "; ".join(wrong[:5])

    @pytest.mark.parametrize("option_set", list(OPTION_SETS))
    def test_no_planted_identifier_survives_at_any_depth(self, table_files, option_set):
        """Every value the profile removes or replaces, planted at the top, in a nested item and
        in a private block, is searched with the leak scanner in the written file: no hits."""
        source, out = table_files[option_set]
        planted = Identifiers()
        for tag, row in exact_table_rows():
            if (source[tag].VR in IDENTIFYING_VRS
                    and not allowed_actions(row, OPTION_SETS[option_set]) & {"K", "C"}):
                planted.add_text(str(source[tag].value), f"{row['tag']} {row['name']}",
                                 uid=source[tag].VR == "UI")
        assert len(planted) > 150
        folder = Path(out.filename).parent
        assert find_leaks(planted, dicom_dir=folder, tables={}) == []
        assert not any(elem.tag.is_private for elem, _ in all_elements(out))

    @pytest.mark.parametrize("option_set", list(HAND_OPTIONS))
    def test_hand_written_annex_e_rows_get_their_action(self, option_set):
        """Each hand-written Table E.1-1 row gets the action its Basic Profile code or the
        chosen option's column gives it (literals above, not derived from the code)."""
        for keyword, _, code, basic, _ in ANNEX_E:  # the literals themselves follow E.1.1
            assert basic in code.rstrip("*").split("/"), keyword
        profile = load_profile()
        got, wanted = {}, {}
        for keyword, tag, _, basic, named in ANNEX_E:
            got[keyword] = action_for(profile.rule_for(tag), HAND_OPTIONS[option_set], dictionary_VR(tag))
            if option_set == "all":
                wanted[keyword] = ALL_OPTIONS_BY_HAND.get(keyword) or next(iter(named.values()), basic)
            else:
                wanted[keyword] = named.get(option_set, basic)
        assert got == wanted

    def test_basic_profile_values_by_hand(self):
        """What the Basic Profile alone writes for a planted CR image, attribute by attribute."""
        out, _ = deidentify_dataset(make_dataset(), profile=load_profile(), secret=SECRET)
        for keyword in ("PatientAge", "PatientWeight", "PatientSize", "PatientAddress", "OtherPatientIDs",
                        "PerformingPhysicianName", "InstitutionAddress", "StudyDescription",
                        "ReferencedStudySequence", "OtherPatientIDsSequence"):
            assert keyword not in out, keyword  # X
        for keyword in ("PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                        "ReferringPhysicianName", "StudyDate", "StudyTime"):
            assert out[keyword].value in ("", None), keyword  # Z
        # Z/D and X/Z/D: D, a keyed pseudonym for text; Patient's Name (Z) the Patient ID's
        assert str(out.PatientName) == out.PatientID == pseudonym(SECRET, PATIENT_ID)
        assert str(out.OperatorsName) == pseudonym(SECRET, "Osgood^Tilda")
        assert out.InstitutionName == pseudonym(SECRET, "Saint Elsewhere Hospital")
        assert (out.StationName, out.DeviceSerialNumber) == (pseudonym(SECRET, "WS-CR-7"),
                                                             pseudonym(SECRET, "SN-00042"))
        # X/D, Z/D, X/Z/D on dates: D, a fixed dummy date
        assert (out.SeriesDate, out.ContentDate, out.AcquisitionDateTime) == (
            "19000101", "19000101", "19000101000000")
        # U: keyed UIDs
        assert (out.StudyInstanceUID, out.SeriesInstanceUID, out.FrameOfReferenceUID, out.SOPInstanceUID) == (
            keyed_uid_of(SECRET, STUDY_UID), keyed_uid_of(SECRET, SERIES_UID), keyed_uid_of(SECRET, FRAME_UID),
            keyed_uid_of(SECRET, SOP_UID_A))

    def test_every_option_values_by_hand(self):
        """What the four options together write: characteristics and device identity kept, dates
        moved back by the patient's keyed shift (times of day kept), the rest as in the Basic Profile."""
        out, _ = deidentify_dataset(make_dataset(), profile=load_profile(), secret=SECRET,
                                    options=HAND_OPTIONS["all"])
        assert (out.PatientSex, out.PatientAge, out.PatientWeight, out.PatientSize) == ("F", "090Y", 61.5, 1.62)
        assert (out.StationName, out.DeviceSerialNumber) == ("WS-CR-7", "SN-00042")
        moved = (datetime.date(2023, 4, 5) - datetime.timedelta(days=date_shift(SECRET, PATIENT_ID))).strftime("%Y%m%d")
        assert (out.StudyDate, out.SeriesDate, out.ContentDate) == (moved, moved, moved)
        assert (out.AcquisitionDateTime, out.StudyTime) == (moved + "101112", "101112")
        assert out.PatientBirthDate == "" and out.AccessionNumber == ""  # Z: no option names them
        assert out.InstitutionName == pseudonym(SECRET, "Saint Elsewhere Hospital")
        assert "PatientAddress" not in out and "ReferencedStudySequence" not in out

    def test_combined_actions_resolved_to_rightmost_option(self):
        profile = load_profile()
        ds = Dataset()
        ds.AcquisitionDate = "20230405"  # X/Z
        ds.InstitutionName = "Saint Elsewhere Hospital"  # X/Z/D
        ds.ContentCreatorName = "Osgood^Tilda"  # Z/D
        ds.ProtocolName = "Chest protocol of Dr Hollis"  # X/D
        referenced = Dataset()
        referenced.ReferencedSOPInstanceUID = STUDY_UID
        ds.ReferencedStudySequence = [referenced]  # X/Z on a Type 3 sequence: removed
        out, counts = deidentify_dataset(ds, profile=profile, secret=SECRET)
        assert out.AcquisitionDate == ""
        assert out.InstitutionName == pseudonym(SECRET, "Saint Elsewhere Hospital")
        assert str(out.ContentCreatorName) == pseudonym(SECRET, "Osgood^Tilda")
        assert out.ProtocolName == pseudonym(SECRET, "Chest protocol of Dr Hollis")
        assert "ReferencedStudySequence" not in out
        assert (counts["Z"], counts["D"], counts["X"]) == (1, 3, 1)


class TestDeidentifyDataset:
    @pytest.mark.parametrize("rle", [False, True])
    def test_planted_values_gone_at_every_depth(self, tmp_path, rle):
        out, _ = deid(make_dataset(rle=rle, referenced_uid=SOP_UID_B))
        out = write_and_read(out, tmp_path / "o.dcm")
        text = all_text(out)
        assert [value for value in PLANTED if value.casefold() in text] == []
        assert SOP_UID_A not in text and SOP_UID_B not in text

    def test_sequence_with_action_d_keeps_items_and_replaces_their_values(self):
        ds = Dataset()
        person, reference = Dataset(), Dataset()
        person.ValueType, person.PersonName = "PNAME", "Osgood^Tilda"
        person.ReferencedSOPClassUID = CR_STORAGE  # a well-known UID names no instance
        reference.ReferencedSOPClassUID = "1.2.826.0.1.3680043.99.77"
        ds.ContentSequence = [person, reference]  # (0040,A730) D
        out, _ = deidentify_dataset(ds, profile=load_profile(), secret=SECRET)
        first, second = out.ContentSequence
        assert first.ValueType == "PNAME" and first.ReferencedSOPClassUID == CR_STORAGE
        assert str(first.PersonName) == pseudonym(SECRET, "Osgood^Tilda")
        assert second.ReferencedSOPClassUID.startswith("2.25.")

    def test_source_dataset_not_modified(self):
        source = make_dataset()
        deid(source)
        assert source.PatientName == NAME and source.SOPInstanceUID == SOP_UID_A

    def test_private_overlay_and_curve_groups_removed(self, tmp_path):
        out, counts = deid(make_dataset())
        out = write_and_read(out, tmp_path / "o.dcm")
        groups = {elem.tag.group for elem, _ in all_elements(out)}
        assert not [g for g in groups if g % 2 == 1]
        assert not [g for g in groups if g & 0xFF00 in (0x5000, 0x6000)]
        assert counts["private_removed"] == 3  # creator, LO and SQ (its item goes with it)
        assert counts["overlay_removed"] == 9  # 8 overlay elements and 1 curve element

    def test_private_tags_kept_when_option_off(self):
        out, counts = deid(make_dataset(), remove_private_tags=False)
        assert counts["private_removed"] == 0
        assert PATIENT_ID in out[0x00111001].value

    @pytest.mark.parametrize("retain, codes", [(True, ["113100", "113108"]), (False, ["113100"])])
    def test_identity_removed_and_method_recorded(self, retain, codes):
        out, _ = deid(make_dataset(), retain_patient_characteristics=retain)
        assert out.PatientIdentityRemoved == "YES"
        assert out.DeidentificationMethod
        sequence = out.DeidentificationMethodCodeSequence
        assert [item.CodeValue for item in sequence] == codes
        assert {item.CodingSchemeDesignator for item in sequence} == {"DCM"}
        assert sequence[0].CodeMeaning == "Basic Application Confidentiality Profile"

    def test_media_storage_uid_is_new_sop_uid(self, tmp_path):
        out, _ = deid(make_dataset())
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != SOP_UID_A
        out = write_and_read(out, tmp_path / "o.dcm")
        assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID != SOP_UID_A
        assert "SourceApplicationEntityTitle" not in out.file_meta

    def test_same_uid_same_replacement_across_files_and_references(self):
        first, _ = deid(make_dataset(sop_uid=SOP_UID_A))
        second, _ = deid(make_dataset(sop_uid=SOP_UID_B, referenced_uid=SOP_UID_A))
        again, _ = deid(make_dataset(sop_uid=SOP_UID_A))  # a later run
        assert first.StudyInstanceUID == second.StudyInstanceUID != STUDY_UID
        assert second.ReferencedImageSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
        nested = first.RadiopharmaceuticalInformationSequence[0].ReferencedImageSequence[0]
        assert nested.ReferencedSOPInstanceUID == second.SOPInstanceUID
        assert again.SOPInstanceUID == first.SOPInstanceUID
        assert (first.StudyInstanceUID, first.SOPInstanceUID) == (keyed_uid_of(SECRET, STUDY_UID),
                                                                  keyed_uid_of(SECRET, SOP_UID_A))
        for uid in (first.SOPInstanceUID, second.SOPInstanceUID, first.StudyInstanceUID):
            assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid

    def test_different_secret_gives_different_pseudonyms(self):
        one, _ = deid(make_dataset(), secret=b"secret one")
        two, _ = deid(make_dataset(), secret=b"secret two")
        for keyword in ("PatientID", "PatientName", "SOPInstanceUID", "StudyInstanceUID"):
            assert str(one[keyword].value) != str(two[keyword].value), keyword

    def test_patient_name_is_the_patient_id_pseudonym(self):
        out, _ = deid(make_dataset())
        assert out.PatientID == pseudonym(SECRET, PATIENT_ID)
        assert str(out.PatientName) == out.PatientID

    @pytest.mark.parametrize("rle", [False, True])
    def test_pixel_data_and_transfer_syntax_unchanged(self, tmp_path, rle):
        source = write_and_read(make_dataset(rle=rle), tmp_path / "source.dcm")
        out = write_and_read(deid(source)[0], tmp_path / "out.dcm")
        assert out.file_meta.TransferSyntaxUID == (RLELossless if rle else ExplicitVRLittleEndian)
        np.testing.assert_array_equal(out.pixel_array, source.pixel_array)

    @pytest.mark.parametrize("age, expected", [("095Y", "090Y"), ("090Y", "090Y"), ("089Y", "089Y"),
                                               ("045Y", "045Y")])
    def test_age_top_coded_when_retained(self, age, expected):
        out, _ = deid(make_dataset(age=age))
        assert out.PatientAge == expected
        assert out.PatientSex == "F" and out.PatientWeight == 61.5

    def test_retain_option_off_removes_sex_age_and_size(self):
        out, _ = deid(make_dataset(), retain_patient_characteristics=False)
        assert not out.get("PatientSex")  # Z
        assert "PatientAge" not in out and "PatientWeight" not in out and "PatientSize" not in out

    @pytest.mark.parametrize("age, expected", [("100Y", "090Y"), ("006M", "006M"), ("1200M", ""),
                                               ("", "")])
    def test_top_code_age(self, age, expected):
        assert top_code_age(age) == expected


def test_the_manual_lists_exactly_the_text_kept_where_the_table_is_silent():
    from dicomflow.deid.profile import KEPT_TEXT

    manual = (REPO / "docs" / "deidentification.md").read_text()
    table = manual[manual.index("What de-identification keeps as text"):]
    table = table[:table.index("\n\n", table.index("|---|"))]
    listed = {int(group + element, 16) for group, element in re.findall(r"\(([0-9A-F]{4}),([0-9A-F]{4})\)", table)}
    assert listed == set(KEPT_TEXT)


class TestHostilePlacements:
    """Where a red team of our own hid a name the first default-deny let through."""

    def test_binary_values_are_removed_unless_they_render_the_pixels(self):
        ds = make_dataset()
        ds.add_new(0x00282000, "OB", "QUIXLEY Bartholomew 19270315".encode("utf-16-be"))  # ICC
        ds.add_new(0x7FE00001, "OV", b"QUIXLEY\x00")  # Extended Offset Table
        out, _ = deid(ds)
        assert "ICCProfile" not in out and 0x7FE00001 not in out
        assert out.PixelData == ds.PixelData

    def test_a_known_tag_under_another_vr_and_an_unknown_public_tag_are_removed(self):
        ds = make_dataset()
        ds.add_new(0x00540400, "OB", b"QUIXLEY^BARTHOLOMEW ")  # Image ID is SH
        ds.add_new(0x00421000, "CS", "QUIXLEY")  # not in the DICOM dictionary
        out, _ = deid(ds)
        assert 0x00540400 not in out and 0x00421000 not in out

    @pytest.mark.parametrize("typed", ["Quixley Bartholomew", "ＱＵＩＸＬＥＹ", "QUIX\u200bLEY",
                                       "QUIX\xadLEY", "Quixleý"])
    def test_kept_text_holding_the_files_own_name_is_replaced(self, typed):
        ds = make_dataset()
        ds.Manufacturer = typed
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = typed[:16], "99X", "x"
        ds.ProcedureCodeSequence = [code]
        out, _ = deid(ds)
        assert out.Manufacturer == pseudonym(SECRET, typed)
        assert out.ProcedureCodeSequence[0].CodeValue == pseudonym(SECRET, typed[:16])
        assert deid(make_dataset())[0].Manufacturer == "Acme"  # the file's own, harmless value

    def test_private_class_uids_are_keyed_and_file_meta_in_the_data_set_removed(self):
        ds = make_dataset()
        ds.SOPClassUID = "1.2.826.0.1.3680043.99.19270315"  # a private SOP class with a date
        ds.add_new(0x00020016, "AE", "QUIXLEY")
        out, _ = deid(ds)
        assert out.SOPClassUID.startswith("2.25.") and 0x00020016 not in out
        assert out.file_meta.MediaStorageSOPClassUID == out.SOPClassUID

    def test_the_scanner_sees_through_invisible_characters_utf16_and_into_coded_values(self, tmp_path):
        source = make_dataset()
        source.OtherPatientNames = "Perfusion^Ada"
        identifiers = collect_identifiers(source)
        out, _ = deid(source)
        out.SpecificCharacterSet = "ISO_IR 192"
        out.Manufacturer = "QUIX\u200bLEY"
        out.add_new(0x00282000, "OB", "Bartholomew".encode("utf-16-le"))
        # A defined term that is also this patient's name: found too, since a coded field typed
        # with a name (Patient Position ZEBULON) is a leak like any other.
        out.ImageType = ["DERIVED", "PERFUSION"]
        dicom_dir = write_outputs(tmp_path, [out])
        locations = {leak.location for leak in find_leaks(identifiers, dicom_dir=dicom_dir, tables={})}
        assert locations == {"(0008,0070) Manufacturer", "(0028,2000) ICC Profile", "(0008,0008) Image Type"}

    def test_a_name_in_a_coded_value_empties_that_value_only(self):
        source = make_dataset()
        source.PatientName = "Zebulon^Quartermaine"
        source.PatientPosition = "ZEBULON"
        source.ImageType = ["ORIGINAL", "PRIMARY", "QUARTERMAINE"]
        source.add_new(0x00200060, "CS", "L")  # Laterality, a code that is no one's name
        out, counts = deid(source)
        assert out.PatientPosition == ""
        assert list(out.ImageType) == ["ORIGINAL", "PRIMARY", ""]
        assert out.Laterality == "L"


class TestOptions:
    @staticmethod
    def run(ds: Dataset, **options: bool) -> Dataset:
        return deidentify_dataset(ds, profile=load_profile(), secret=SECRET,
                                  options=DeidOptions(**options))[0]

    def test_modified_dates_keep_each_patients_intervals(self):
        later = make_dataset(sop_uid=SOP_UID_B)
        later.StudyDate = "20230415"
        other = make_dataset()
        other.PatientID = "MRN-00000077"
        first, second, stranger = (self.run(ds, retain_longitudinal_dates=True)
                                   for ds in (make_dataset(), later, other))

        def day(value: str) -> datetime.date:
            return datetime.datetime.strptime(value[:8], "%Y%m%d").date()

        assert first.StudyDate != "20230405" and (day(second.StudyDate) - day(first.StudyDate)).days == 10
        moved = datetime.date(2023, 4, 5) - datetime.timedelta(days=date_shift(SECRET, PATIENT_ID))
        assert first.StudyDate == moved.strftime("%Y%m%d")  # back by this patient's keyed shift
        assert first.AcquisitionDateTime == first.StudyDate + "101112"  # DT: date moved, time kept
        assert first.StudyTime == "101112" and first.PatientBirthDate == ""  # birth date: Z
        assert stranger.StudyDate != first.StudyDate  # another patient, another shift
        assert self.run(make_dataset(), retain_longitudinal_dates=True).StudyDate == first.StudyDate
        assert self.run(make_dataset()).StudyDate == ""  # without the option: Z
        assert "113107" in {item.CodeValue for item in first.DeidentificationMethodCodeSequence}

    def test_clean_descriptors_cut_identifying_values_out_of_kept_text(self):
        ds = make_dataset()
        ds.StudyDescription = "Chest PA of QUIXLEY Bartholomew, MRN-55501234, 05/04/2023"
        ds.SeriesDescription = "2023-04-05 PA at Saint Elsewhere Hospital"
        out = self.run(ds, clean_descriptors=True)
        cleaned = f"{out.StudyDescription} {out.SeriesDescription}"
        assert out.StudyDescription.startswith("Chest PA of") and out.SeriesDescription == "PA at"
        for value in ("quixley", "bartholomew", "55501234", "2023-04-05", "05/04/2023", "elsewhere"):
            assert value not in cleaned.casefold()
        ds.StudyDescription = "Chest PA of Quixleys, Иванова"
        ds.OtherPatientNames = "Иванов^Пётр"
        assert self.run(ds, clean_descriptors=True).StudyDescription == "Chest PA of"  # inflected
        ds.StudyDescription = "胸部 王小东"
        assert self.run(ds, clean_descriptors=True).StudyDescription == ""  # no word boundaries
        assert "StudyDescription" not in self.run(ds)  # Basic Profile: X

    def test_retain_device_identity_keeps_device_attributes(self):
        kept = self.run(make_dataset(), retain_device_identity=True)
        assert (kept.DeviceSerialNumber, kept.StationName) == ("SN-00042", "WS-CR-7")
        basic = self.run(make_dataset())
        assert basic.get("DeviceSerialNumber") != "SN-00042" and basic.get("StationName") != "WS-CR-7"

    @pytest.mark.parametrize("option_set", list(OPTION_SETS))
    def test_in_place_gives_what_the_copy_gives(self, option_set):
        ds = make_dataset()
        ds.StudyDescription = "CXR of Quixley 2023-04-05"
        copied, copied_counts = deidentify_dataset(ds, profile=load_profile(), secret=SECRET,
                                                   options=OPTION_SETS[option_set])
        assert ds.PatientID == PATIENT_ID  # the source is untouched
        same, same_counts = deidentify_dataset(ds, profile=load_profile(), secret=SECRET,
                                               options=OPTION_SETS[option_set], in_place=True)
        assert same is ds and same == copied and same_counts == copied_counts

    def test_method_codes_name_every_option_used(self):
        out = self.run(make_dataset(), **dict.fromkeys(OPTION_COLUMNS, True))
        assert [item.CodeValue for item in out.DeidentificationMethodCodeSequence] == [
            "113100", "113105", "113107", "113108", "113109"]
        assert out.PatientIdentityRemoved == "YES"


def write_outputs(tmp_path: Path, datasets: list[Dataset]) -> Path:
    dicom_dir = tmp_path / "out" / "dicom"
    dicom_dir.mkdir(parents=True)
    for number, ds in enumerate(datasets):
        ds.save_as(dicom_dir / f"{number}.dcm", enforce_file_format=True)
    return dicom_dir


class TestLeakCheck:
    def test_identifiers_include_name_parts_and_normalised_forms(self):
        identifiers = collect_identifiers(make_dataset())
        for text in ("QUIXLEY^BARTHOLOMEW", "quixley", "Bartholomew", "Quixley, Bartholomew",
                     "bartholomew quixley", "quixleybartholomew", PATIENT_ID.casefold(), OTHER_ID,
                     STUDY_UID, "20230405", "2023-04-05", "05.04.2023", "5 April 2023",
                     "ACC-70707070", "70707070", "Osgood", "9 Harbor Road"):
            assert identifiers.first(f"seen: {text}.") is not None, text
        assert identifiers.first("quixley") == "(0010,0010) Patient's Name"

    def test_short_and_common_values_are_not_identifiers(self):
        ds = make_dataset()
        ds.PatientName, ds.OtherPatientIDs = "Lee^Chest", "M"
        identifiers = collect_identifiers(ds)
        assert identifiers.first("Lee Chest") is not None and identifiers.first("LEE") is not None
        for text in ("chest", "m", "fromarray", "quixleys"):  # common, too short or a part
            assert identifiers.first(text) is None, text

    def test_clean_outputs_have_no_leaks(self, tmp_path):
        sources = [make_dataset(sop_uid=SOP_UID_A), make_dataset(sop_uid=SOP_UID_B, rle=True)]
        identifiers = Identifiers()
        for ds in sources:
            identifiers.update(collect_identifiers(ds))
        dicom_dir = write_outputs(tmp_path, [deid(ds)[0] for ds in sources])
        assert find_leaks(identifiers, dicom_dir=dicom_dir, tables={}) == []

    def test_finds_planted_leak_in_element_nested_and_private(self, tmp_path):
        out, _ = deid(make_dataset())
        out.Manufacturer = "follow-up of bartholomew"  # a kept attribute, case differs
        item = Dataset()
        item.add_new(0x00991001, "UN", f"id {PATIENT_ID}".encode())
        out.add_new(0x00091010, "SQ", [item])
        out.file_meta.SourceApplicationEntityTitle = "QUIXLEY"
        dicom_dir = write_outputs(tmp_path, [out])
        leaks = find_leaks(collect_identifiers(make_dataset()), dicom_dir=dicom_dir, tables={})
        assert Leak("dicom/0.dcm", "(0008,0070) Manufacturer", "(0010,0010) Patient's Name") in leaks
        assert Leak("dicom/0.dcm", "(0009,1010) private > (0099,1001) private",
                    "(0010,0020) Patient ID") in leaks
        assert Leak("dicom/0.dcm", "(0002,0016) Source Application Entity Title",
                    "(0010,0010) Patient's Name") in leaks
        assert len(leaks) == 3
        assert not any("bartholomew" in str(leak).casefold() for leak in leaks)

    def test_reads_the_preamble_and_other_character_sets(self, tmp_path):
        source = make_dataset()
        source.SpecificCharacterSet = "GB18030"
        source.OtherPatientNames = "王^小东"
        identifiers = collect_identifiers(source)
        out, _ = deid(source)
        out.SpecificCharacterSet = "ISO_IR 192"  # declares UTF-8, holds GB18030 bytes
        out.add_new(0x00081090, "LO", "王小东".encode("gb18030"))
        dicom_dir = write_outputs(tmp_path, [out])
        path = dicom_dir / "0.dcm"
        raw = bytearray(path.read_bytes())
        raw[:128] = b"II*\x00 description: Quixley^Bartholomew".ljust(128, b"\x00")
        path.write_bytes(bytes(raw))
        locations = {leak.location for leak in find_leaks(identifiers, dicom_dir=dicom_dir, tables={})}
        assert locations == {"preamble", "(0008,1090) Manufacturer's Model Name"}

    def test_pixel_data_is_not_searched(self, tmp_path):
        out, _ = deid(make_dataset())
        out.PixelData = PATIENT_ID.encode().ljust(512, b"\0")  # 16 x 16 x 2 bytes that spell an ID
        dicom_dir = write_outputs(tmp_path, [out])
        assert find_leaks(collect_identifiers(make_dataset()), dicom_dir=dicom_dir, tables={}) == []

    def test_finds_planted_leak_in_table_cell(self, tmp_path):
        dicom_dir = write_outputs(tmp_path, [])
        table = pd.DataFrame({"image_key": ["ab12", "cd34"], "note": ["fine", f"see {STUDY_UID}"],
                              "rows": [1, 2]})
        leaks = find_leaks(collect_identifiers(make_dataset()), dicom_dir=dicom_dir,
                           tables={"manifest.parquet": table})
        assert [(leak.output, leak.location) for leak in leaks] == [
            ("manifest.parquet", "column 'note'")]
        assert leaks[0].source.endswith("Instance UID")  # the study UID is also a referenced UID

    def test_numeric_identifiers_need_alphanumeric_boundaries(self, tmp_path):
        dicom_dir = write_outputs(tmp_path, [])
        table = pd.DataFrame({"uid": ["2.25.99123456789", "ab123456cd"],
                              "text": ["x", "id 123456."]})
        identifiers = Identifiers()
        identifiers.add_text("123456", "(0010,0020) Patient ID")
        leaks = find_leaks(identifiers, dicom_dir=dicom_dir, tables={"t": table})
        assert leaks == [Leak("t", "column 'text'", "(0010,0020) Patient ID")]


def index_row(ds: Dataset, source_path: str, label: int) -> dict:
    return {
        "source_path": source_path, "sha256": "0" * 64, "sop_instance_uid": ds.SOPInstanceUID,
        "series_instance_uid": ds.SeriesInstanceUID, "study_instance_uid": ds.StudyInstanceUID,
        "accession_number": ds.AccessionNumber, "patient_id": ds.PatientID, "modality": "CR",
        "manufacturer": "Acme", "body_part": "CHEST", "view_position": "PA",
        "patient_sex": ds.PatientSex, "patient_age": ds.PatientAge, "rows": 16, "columns": 16,
        "pixel_spacing_mm": 0.5, "bits_stored": 12, "photometric": "MONOCHROME2",
        "transfer_syntax": str(ds.file_meta.TransferSyntaxUID), "label": label,
        "pixel_min": 0.0, "pixel_max": 1.0, "pixel_mean": 0.5, "pixel_std": 0.2,
    }


@pytest.fixture
def stage_dir(tmp_path, monkeypatch) -> Path:
    """A fake ingest output (3 images, one RLE) and the repo's params.yaml, as the working dir."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    for name in (deid_secret.SECRET_FILE_ENV, deid_secret.TRACKING_URI_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(deid_secret.SECRET_ENV, SECRET.decode())  # not the sample: a secret is needed
    data = tmp_path / "data" / "studies" / "ACC-70707070"
    data.mkdir(parents=True)
    sources = [make_dataset(sop_uid=SOP_UID_A),
               make_dataset(sop_uid=SOP_UID_B, age="045Y", rle=True),
               make_dataset(sop_uid=SOP_UID_A + "9", referenced_uid=SOP_UID_A)]
    rows = []
    for number, ds in enumerate(sources):
        ds.save_as(data / f"{number}.dcm", enforce_file_format=True)
        rows.append(index_row(ds, f"studies/ACC-70707070/{number}.dcm", label=number % 2))
    ingest = tmp_path / "outputs" / "ingest"
    ingest.mkdir(parents=True)
    pd.DataFrame(rows, columns=list(layout.INDEX_COLUMNS)).to_parquet(ingest / layout.INGEST_INDEX)
    images = np.random.default_rng(0).integers(0, 256, size=(3, 64, 64), dtype=np.uint8)
    np.save(ingest / layout.IMAGES, images)
    return tmp_path


def pose_as_sample(folder: Path, rows: list[int]) -> None:
    """Give these index rows the digests of embedded sample files (as ingest would have recorded
    them for those files): the stage's view of the data, as if the sample were in data/."""
    sample = (REPO / "dicomflow" / "deid" / "resources" / "embedded_sample.sha256").read_text().split()
    index_file = folder / "outputs" / "ingest" / layout.INGEST_INDEX
    index = pd.read_parquet(index_file)
    index.loc[rows, "sha256"] = sample[:len(rows)]
    index.to_parquet(index_file)


def set_deid_params(path: Path, **values: object) -> None:
    params = yaml.safe_load(path.read_text())
    params["deidentify"].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def rewrite_source(folder: Path, number: int, **attributes: object) -> Path:
    path = folder / "data" / "studies" / "ACC-70707070" / f"{number}.dcm"
    ds = pydicom.dcmread(path)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def set_params(path: Path, **deid_params: bool) -> None:
    params = path.read_text()
    for key, value in deid_params.items():
        params = params.replace(f"{key}: {str(not value).lower()}", f"{key}: {str(value).lower()}")
    path.write_text(params)


def write_pixels(path: Path, pixels: np.ndarray) -> None:
    """Replace a source file's pixels (12-bit gray), keeping its header."""
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.set_pixel_data(pixels, "MONOCHROME2", 12, generate_instance_uid=False)
    ds.save_as(path, enforce_file_format=True)


class TestBurnedIn:
    def test_identifying_text_is_blanked_where_it_stands_in_the_file_and_images(self, stage_dir):
        source = stage_dir / "data" / "studies" / "ACC-70707070" / "0.dcm"
        pixels = radiograph(rows=256, cols=320)
        name_box, = draw(pixels, [(12, 12, "QUIXLEY BARTHOLOMEW")], size=20)
        marker_box, = draw(pixels, [(200, 280, "R")], size=30)
        write_pixels(source, pixels)
        deidentify.main()
        out = stage_dir / "outputs" / "deidentify"
        manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
        written = pydicom.dcmread(out / manifest["dicom_file"][0]).pixel_array
        top, left, bottom, right = name_box
        assert (written[top:bottom, left:right] == pixels.min()).all()
        rows, cols = np.nonzero(written != pixels)  # the line where it stands, not a band
        margin = (bottom - top) // 2
        assert rows.min() >= top - margin and rows.max() < bottom + margin
        assert cols.min() >= left - margin and cols.max() < right + margin
        top, left, bottom, right = marker_box
        np.testing.assert_array_equal(written[top:bottom, left:right], pixels[top:bottom, left:right])
        images = np.load(out / layout.IMAGES)
        redone = read_image(out / manifest["dicom_file"][0],
                            PixelSettings.from_params(load_params("ingest")))[1][0].pixels
        np.testing.assert_array_equal(images[0], redone)
        ingested = np.load(stage_dir / "outputs" / "ingest" / layout.IMAGES)
        np.testing.assert_array_equal(images[1:], ingested[1:])
        audit = pd.read_csv(out / layout.DEID_AUDIT, keep_default_na=False)
        assert audit.loc[0, ["text_blanked", "burned_in", "burned_in_action"]].tolist() == [
            1, "(0010,0010) Patient's Name", "blanked"]
        assert audit.loc[0, "text_kept"] >= 1  # the marker
        assert audit["burned_in_action"].tolist()[1:] == ["", ""]
        metrics = json.loads((stage_dir / "reports" / "deidentify.json").read_text())
        assert (metrics["images_with_identifying_text"], metrics["burned_in_blanked"],
                metrics["burned_in_excluded"]) == (1, 1, 0)

    def test_exclude_leaves_the_file_out(self, stage_dir):
        pixels = radiograph(rows=256, cols=320)
        draw(pixels, [(12, 12, f"ID {PATIENT_ID}")], size=20)
        write_pixels(stage_dir / "data" / "studies" / "ACC-70707070" / "1.dcm", pixels)
        set_deid_params(stage_dir / "params.yaml", burned_in_action="exclude")
        deidentify.main()
        out = stage_dir / "outputs" / "deidentify"
        assert len(pd.read_parquet(out / layout.DEID_MANIFEST)) == 2
        audit = pd.read_csv(out / layout.DEID_AUDIT, keep_default_na=False)
        assert audit["burned_in_action"].tolist() == ["", "excluded", ""]
        # The ID itself, or (one digit misread) a number long enough to be one.
        assert audit.loc[1, "burned_in"] in ("(0010,0020) Patient ID", "long number")

    def test_a_flag_alone_excludes_nothing_the_reader_finds_clean(self, stage_dir):
        rewrite_source(stage_dir, 1, BurnedInAnnotation="YES", Modality="US")
        deidentify.main()
        audit = pd.read_csv(stage_dir / "outputs" / "deidentify" / layout.DEID_AUDIT, keep_default_na=False)
        assert audit["burned_in_action"].tolist() == ["", "", ""]

    @pytest.mark.parametrize("rule, attributes", [
        ({}, {"BurnedInAnnotation": "YES"}),
        ({"burned_in_modalities": ["US"]}, {"Modality": "US"}),
        ({"burned_in_image_types": ["SECONDARY"]}, {"ImageType": ["DERIVED", "SECONDARY"]}),
        ({"burned_in_manufacturers": ["Screen Grabber Inc"]}, {"Manufacturer": "Screen Grabber Inc"}),
    ])
    def test_header_rules_decide_for_pixels_that_cannot_be_read(self, stage_dir, rule, attributes):
        unreadable = rewrite_source(stage_dir, 0, **attributes)
        ds = pydicom.dcmread(unreadable)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
        ds.save_as(unreadable, enforce_file_format=False)
        set_deid_params(stage_dir / "params.yaml", **rule)
        deidentify.main()
        audit = pd.read_csv(stage_dir / "outputs" / "deidentify" / layout.DEID_AUDIT, keep_default_na=False)
        assert audit["burned_in_action"].tolist() == ["excluded", "", ""]
        reason = audit.loc[0, "burned_in"]
        assert reason.startswith("pixels not read (") and "; header rule: " in reason
        assert reason.split("header rule: ")[1].split()[0] in ("BurnedInAnnotation", "modality", "image",
                                                                "manufacturer")

    def test_unreadable_pixels_no_rule_matches_are_kept_and_say_so(self, stage_dir):
        unreadable = rewrite_source(stage_dir, 0)
        ds = pydicom.dcmread(unreadable)
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8 not a jpeg \xff\xd9"])
        ds.save_as(unreadable, enforce_file_format=False)
        deidentify.main()
        audit = pd.read_csv(stage_dir / "outputs" / "deidentify" / layout.DEID_AUDIT, keep_default_na=False)
        assert audit.loc[0, "burned_in"].endswith("header rule: none applies")
        assert audit["burned_in_action"].tolist() == ["", "", ""]


class TestMain:
    def test_outputs(self, stage_dir, caplog):
        with caplog.at_level(logging.INFO):
            deidentify.main()
        out = stage_dir / "outputs" / "deidentify"
        index = pd.read_parquet(stage_dir / "outputs" / "ingest" / layout.INGEST_INDEX)
        manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
        assert tuple(manifest.columns) == layout.MANIFEST_COLUMNS
        assert list(manifest["image_key"]) == [pseudonym(SECRET, uid, 16)
                                               for uid in index["sop_instance_uid"]]
        assert list(manifest["patient_key"]) == [pseudonym(SECRET, PATIENT_ID)] * 3
        assert list(manifest["patient_age_years"]) == [90, 45, 90]
        assert list(manifest["label"]) == [0, 1, 0]
        images = np.load(stage_dir / "outputs" / "ingest" / layout.IMAGES)
        np.testing.assert_array_equal(np.load(out / layout.IMAGES), images)
        assert manifest["pixel_sha256"][1] == hashlib.sha256(images[1].tobytes()).hexdigest()
        for key, relative in zip(manifest["image_key"], manifest["dicom_file"]):
            ds = pydicom.dcmread(out / relative)
            assert relative == f"dicom/{key}.dcm" and ds.PatientIdentityRemoved == "YES"
        audit = pd.read_csv(out / layout.DEID_AUDIT)
        assert list(audit.columns) == list(AUDIT_COLUMNS)
        assert (audit["private_removed"] == 3).all() and (audit["overlay_removed"] == 9).all()
        metrics = json.loads((stage_dir / "reports" / "deidentify.json").read_text())
        assert metrics["n_files"] == 3 and metrics["leak_hits"] == 0 and metrics["demo_secret"] == 0
        assert json.loads((out / layout.DEID_SECRET_FINGERPRINT).read_text()) == {
            "fingerprint": fingerprint(SECRET), "demo": False}
        outputs = [path for path in (stage_dir / "reports").rglob("*") if path.is_file()]
        outputs += [path for path in out.rglob("*") if path.is_file()]
        texts = [path.read_bytes() for path in outputs] + [caplog.text.encode()]
        for value in (PATIENT_ID, OTHER_ID, STUDY_UID, SOP_UID_B, "ACC-70707070", "Quixley",
                      SECRET.decode()):
            assert not [text for text in texts if value.encode() in text], value
        assert not (stage_dir / "outputs" / "deidentify.partial").exists()

    def test_one_or_two_worker_processes_write_the_same_bytes(self, stage_dir):
        written = []
        for workers in (1, 2):
            set_deid_params(stage_dir / "params.yaml", workers=workers)
            deidentify.main()
            out = stage_dir / "outputs" / "deidentify"
            written.append({path.relative_to(out): path.read_bytes()
                            for path in sorted(out.rglob("*")) if path.is_file()})
        # 3 DICOM files; the manifest, images, audit, quarantine, identifier digests, fingerprint
        assert len(written[0]) == 3 + 6 and written[0] == written[1]

    def test_retain_off_leaves_sex_and_age_null(self, stage_dir):
        set_params(stage_dir / "params.yaml", retain_patient_characteristics=False)
        deidentify.main()
        manifest = pd.read_parquet(stage_dir / "outputs" / "deidentify" / layout.DEID_MANIFEST)
        assert manifest["patient_sex"].isna().all() and manifest["patient_age_years"].isna().all()

    def test_without_a_secret_data_that_is_not_the_sample_is_refused(self, stage_dir, monkeypatch):
        monkeypatch.delenv(deid_secret.SECRET_ENV)
        with pytest.raises(SettingsError, match="no de-identification secret, and the data is not the "
                                                "embedded sample: .* set DICOMFLOW_SECRET"):
            deidentify.main()
        assert not (stage_dir / "outputs" / "deidentify").exists()

    def test_one_file_beside_the_sample_makes_it_real_data(self, stage_dir, monkeypatch):
        monkeypatch.delenv(deid_secret.SECRET_ENV)
        pose_as_sample(stage_dir, rows=[0, 1])  # row 2 keeps its own digest
        with pytest.raises(SettingsError, match="the data is not the embedded sample"):
            deidentify.main()

    def test_the_demo_secret_on_the_sample_warns_and_is_fingerprinted(self, stage_dir, monkeypatch, caplog):
        monkeypatch.delenv(deid_secret.SECRET_ENV)
        pose_as_sample(stage_dir, rows=[0, 1, 2])
        with caplog.at_level(logging.WARNING):
            deidentify.main()
        assert "demo secret is in use" in caplog.text
        metrics = json.loads((stage_dir / "reports" / "deidentify.json").read_text())
        assert metrics["demo_secret"] == 1
        written = stage_dir / "outputs" / "deidentify" / layout.DEID_SECRET_FINGERPRINT
        assert json.loads(written.read_text()) == {"fingerprint": fingerprint(DEMO), "demo": True}

    @pytest.mark.parametrize("uri", ["http://127.0.0.1:5000", "HTTPS://mlflow.example.org"])
    def test_the_demo_secret_is_refused_in_team_mode_even_on_the_sample(self, stage_dir, monkeypatch, uri):
        monkeypatch.delenv(deid_secret.SECRET_ENV)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        pose_as_sample(stage_dir, rows=[0, 1, 2])
        with pytest.raises(SettingsError, match="MLFLOW_TRACKING_URI names a team server: the demo "
                                                "secret is public and is refused in team mode"):
            deidentify.main()

    def test_a_real_secret_in_team_mode_runs(self, stage_dir, monkeypatch):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
        deidentify.main()
        assert (stage_dir / "outputs" / "deidentify" / layout.DEID_MANIFEST).is_file()

    def test_files_that_leak_are_quarantined_and_past_the_threshold_the_stage_fails(self, stage_dir):
        deidentify.main()  # an earlier, clean run: its outputs are replaced only by a clean one
        out = stage_dir / "outputs" / "deidentify"
        earlier = {path: path.read_bytes() for path in out.rglob("*") if path.is_file()}
        set_params(stage_dir / "params.yaml", remove_private_tags=False)  # private block has PHI
        message = r"3 of 3 files could not be de-identified .*: 3 leak_found; see outputs/deidentify/quarantine.csv"
        with pytest.raises(DataError, match=message) as err:
            deidentify.main()
        assert PATIENT_ID not in str(err.value) and "Quixley" not in str(err.value)
        assert not (stage_dir / "outputs" / "deidentify.partial").exists()
        assert earlier  # the clean run wrote files; of this run's, none is kept
        assert sorted(path.name for path in (out / layout.DEID_DICOM_DIR).iterdir()) == []

    def test_another_patients_name_in_kept_text_is_replaced_and_the_stage_completes(self, stage_dir):
        """Kept text is checked against every source's values, not only its own file's."""
        rewrite_source(stage_dir, 1, OtherPatientNames="Zanzibar^Octavia")
        rewrite_source(stage_dir, 2, Manufacturer="Zanzibar Imaging", ManufacturerModelName="Octavia")
        deidentify.main()
        written = [pydicom.dcmread(path) for path in
                   sorted((stage_dir / "outputs" / "deidentify" / layout.DEID_DICOM_DIR).glob("*.dcm"))]
        assert sorted(str(ds.Manufacturer) for ds in written) == sorted(
            ["Acme", "Acme", pseudonym(SECRET, "Zanzibar Imaging")])
        assert pseudonym(SECRET, "Octavia") in {str(ds.ManufacturerModelName)
                                                                for ds in written if "ManufacturerModelName" in ds}

    def test_a_failed_leak_check_lists_every_attribute_with_its_file_count(self, stage_dir):
        set_params(stage_dir / "params.yaml", remove_private_tags=False)  # private block has PHI
        path = stage_dir / "data" / "studies" / "ACC-70707070" / "1.dcm"
        ds = pydicom.dcmread(path)
        ds.private_block(0x0013, "OTHER PHI", create=True).add_new(0x01, "LO", "ACC-70707070")
        ds.save_as(path, enforce_file_format=True)
        set_deid_params(stage_dir / "params.yaml", max_quarantine_fraction=1.0)
        deidentify.main()
        quarantine = pd.read_csv(stage_dir / "outputs" / "deidentify" / layout.DEID_QUARANTINE)
        assert list(quarantine["reason"]) == ["leak_found"] * 3
        details = list(quarantine["detail"])
        assert all(re.search(r"\(0011,1001\) private: a \(00\w\w,\w{4}\) [^;]* value in 1 output\(s\)", d)
                   for d in details)
        assert sum("(0013,1001) private: a (0008,0050) Accession Number value in 1 output(s)" in d
                   for d in details) == 1
        text = " ".join(details)
        assert PATIENT_ID not in text and "Quixley" not in text and "Private note" not in text

    def test_a_manufacturer_holding_the_files_own_name_is_replaced_in_file_and_manifest(self, stage_dir):
        rewrite_source(stage_dir, 1, Manufacturer="Quixley Imaging")
        index_file = stage_dir / "outputs" / "ingest" / layout.INGEST_INDEX
        index = pd.read_parquet(index_file)
        index.loc[1, "manufacturer"] = "Quixley Imaging"  # as ingest reads it
        index.to_parquet(index_file)
        deidentify.main()  # completes: the per-file check replaced it before the net saw it
        manifest = pd.read_parquet(stage_dir / "outputs" / "deidentify" / layout.DEID_MANIFEST)
        assert manifest["manufacturer"].tolist() == ["Acme", pseudonym(SECRET, "Quixley Imaging"), "Acme"]
        written = pydicom.dcmread(stage_dir / "outputs" / "deidentify" / manifest["dicom_file"][1])
        assert written.Manufacturer == manifest["manufacturer"][1]

    def test_source_file_changed_since_ingest_is_quarantined(self, stage_dir):
        index_file = stage_dir / "outputs" / "ingest" / layout.INGEST_INDEX
        index = pd.read_parquet(index_file)
        index.loc[1, "sop_instance_uid"] = "1.2.3.4"
        index.to_parquet(index_file)
        with pytest.raises(DataError, match=r"1 of 3 files could not be de-identified .*: 1 source_changed"):
            deidentify.main()
        quarantine = pd.read_csv(stage_dir / "outputs" / "deidentify" / layout.DEID_QUARANTINE)
        assert quarantine.to_dict("records") == [{
            "index_row": 1, "reason": "source_changed",
            "detail": "the source file's (0008,0018) SOP Instance UID differs from the index: it changed "
                      "since ingest; re-run ingest"}]

    def test_unreadable_source_is_quarantined_by_its_row_not_its_path(self, stage_dir):
        (stage_dir / "data" / "studies" / "ACC-70707070" / "2.dcm").unlink()
        set_deid_params(stage_dir / "params.yaml", max_quarantine_fraction=0.5)
        deidentify.main()
        out = stage_dir / "outputs" / "deidentify"
        quarantine = pd.read_csv(out / layout.DEID_QUARANTINE)
        assert quarantine.to_dict("records") == [{
            "index_row": 2, "reason": "unreadable_source",
            "detail": "the source file cannot be read again (FileNotFoundError); re-run ingest"}]
        assert len(pd.read_parquet(out / layout.DEID_MANIFEST)) == 2

    def test_pydicom_messages_about_sources_are_not_shown(self, stage_dir, caplog):
        source = stage_dir / "data" / "studies" / "ACC-70707070" / "0.dcm"
        ds = pydicom.dcmread(source)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.PatientID = "Quixley" * 10  # too long for LO: pydicom warns when reading it
            ds.save_as(source)
        caplog.clear()
        with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            deidentify.main()
        assert "1 pydicom warnings about source headers not shown" in caplog.text
        assert "exceeds the maximum length" not in caplog.text
        assert not [w for w in caught if "exceeds the maximum length" in str(w.message)]

    def test_frames_of_one_object_get_their_own_keys_and_share_its_file(self, stage_dir):
        ingest_dir = stage_dir / "outputs" / "ingest"
        index = pd.read_parquet(ingest_dir / layout.INGEST_INDEX)
        index["number_of_frames"], index["frame_index"] = 1, 0
        frames = pd.concat([index.iloc[[0]]] * 2, ignore_index=True).assign(number_of_frames=2, frame_index=[0, 1])
        pd.concat([frames, index.iloc[1:]], ignore_index=True).to_parquet(ingest_dir / layout.INGEST_INDEX)
        images = np.load(ingest_dir / layout.IMAGES)
        np.save(ingest_dir / layout.IMAGES, np.concatenate([images[:1], images]))

        deidentify.main()

        out = stage_dir / "outputs" / "deidentify"
        manifest = pd.read_parquet(out / layout.DEID_MANIFEST)
        uid = index["sop_instance_uid"][0]
        assert list(manifest["image_key"][:2]) == [pseudonym(SECRET, f"{uid}#{i}", 16)
                                                  for i in (0, 1)]
        assert manifest["image_key"].is_unique
        assert manifest["dicom_file"][0] == manifest["dicom_file"][1] != manifest["dicom_file"][2]
        assert len(list((out / layout.DEID_DICOM_DIR).iterdir())) == 3
        assert len(pd.read_csv(out / layout.DEID_AUDIT)) == 3

    def test_image_count_mismatch_is_an_error(self, stage_dir):
        np.save(stage_dir / "outputs" / "ingest" / layout.IMAGES, np.zeros((2, 8, 8), np.uint8))
        message = r"images.npy: expected uint8 or float16 of shape \(3, size, size\[, 3\]\)"
        with pytest.raises(DataError, match=message):
            deidentify.main()


class TestReadSecret:
    LONG = "a" * 31 + "b"  # 32 bytes, the least allowed

    def test_environment_wins(self, tmp_path):
        (tmp_path / "s").write_text(self.LONG + "file\n")
        env = {deid_secret.SECRET_ENV: self.LONG, deid_secret.SECRET_FILE_ENV: str(tmp_path / "s")}
        assert deid_secret.read_secret(env) == (self.LONG.encode(), False)

    def test_file_content_stripped_then_counted(self, tmp_path):
        (tmp_path / "s").write_text(f"  {self.LONG}\n")
        assert deid_secret.read_secret({deid_secret.SECRET_FILE_ENV: str(tmp_path / "s")}) == (
            self.LONG.encode(), False)
        (tmp_path / "s").write_text(f"  {self.LONG[:31]}\n\n")  # 31 bytes once stripped
        with pytest.raises(SettingsError, match=r"DICOMFLOW_SECRET_FILE=.* is 31 bytes long; a secret needs at "
                                                r"least 32: set DICOMFLOW_SECRET or DICOMFLOW_SECRET_FILE"):
            deid_secret.read_secret({deid_secret.SECRET_FILE_ENV: str(tmp_path / "s")})

    def test_bytes_are_counted_not_characters(self):
        secret = "é" * 16  # 16 characters, 32 bytes in UTF-8
        assert deid_secret.read_secret({deid_secret.SECRET_ENV: secret}) == (secret.encode(), False)
        with pytest.raises(SettingsError, match="is 30 bytes long"):
            deid_secret.read_secret({deid_secret.SECRET_ENV: "é" * 15})

    def test_demo_when_unset(self):
        assert deid_secret.read_secret({}) == (DEMO, True)

    def test_the_demo_secret_is_no_real_secret(self, tmp_path):
        (tmp_path / "s").write_bytes(DEMO + b"\n")
        for env in ({deid_secret.SECRET_ENV: DEMO.decode()}, {deid_secret.SECRET_FILE_ENV: str(tmp_path / "s")}):
            with pytest.raises(SettingsError, match="holds the demo secret, which is public"):
                deid_secret.read_secret(env)

    @pytest.mark.parametrize("env, match", [
        ({"DICOMFLOW_SECRET": ""}, "DICOMFLOW_SECRET is set but empty"),
        ({"DICOMFLOW_SECRET": "short"}, "DICOMFLOW_SECRET is 5 bytes long; a secret needs at least 32"),
        ({"DICOMFLOW_SECRET_FILE": "/nonexistent/secret"}, "cannot read the file"),
    ])
    def test_bad_secret_settings(self, env, match):
        with pytest.raises(SettingsError, match=match):
            deid_secret.read_secret(env)


class TestSecretUse:
    @pytest.mark.parametrize("uri, team", [
        ("http://10.0.0.5:5000", True), ("https://mlflow.example.org", True), ("sqlite:///mlflow.db", False),
        ("file:///tmp/mlruns", False), ("", False), (None, False)])
    def test_team_mode_is_an_http_tracking_server(self, uri, team):
        assert deid_secret.is_team_mode({} if uri is None else {"MLFLOW_TRACKING_URI": uri}) is team

    def test_a_real_secret_is_allowed_everywhere(self):
        for sample in (True, False):
            for team_mode in (True, False):
                deid_secret.check_secret_use(False, sample=sample, team_mode=team_mode)

    def test_the_demo_secret_only_on_the_sample_outside_team_mode(self):
        deid_secret.check_secret_use(True, sample=True, team_mode=False)
        for sample, team_mode in ((False, False), (True, True), (False, True)):
            with pytest.raises(SettingsError, match="demo secret is public"):
                deid_secret.check_secret_use(True, sample=sample, team_mode=team_mode)

    def test_the_fingerprint_is_keyed_and_not_the_secret(self):
        assert deid_secret.secret_fingerprint(SECRET) == fingerprint(SECRET)
        assert deid_secret.secret_fingerprint(DEMO) == fingerprint(DEMO) != fingerprint(SECRET)
        assert re.fullmatch(r"[0-9a-f]{16}", fingerprint(SECRET))
        # not a plain hash of the secret that a table of common secrets would answer
        assert fingerprint(SECRET) not in hashlib.sha256(SECRET).hexdigest()

    def test_no_file_or_another_file_is_not_the_sample(self):
        assert not deid_secret.is_embedded_sample([])
        assert not deid_secret.is_embedded_sample([hashlib.sha256(b"a real export").hexdigest()])


class TestSecretStage:
    @pytest.fixture
    def project(self, tmp_path, monkeypatch) -> Path:
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        monkeypatch.chdir(tmp_path)
        for name in (deid_secret.SECRET_ENV, deid_secret.SECRET_FILE_ENV):
            monkeypatch.delenv(name, raising=False)
        return tmp_path

    def test_writes_only_the_fingerprint(self, project, monkeypatch, caplog):
        from stages import secret as secret_stage

        monkeypatch.setenv(deid_secret.SECRET_ENV, SECRET.decode())
        with caplog.at_level(logging.INFO):
            secret_stage.main()
        written = (project / "reports" / "secret_fingerprint.json").read_text()
        assert json.loads(written) == {"fingerprint": fingerprint(SECRET), "demo": False}
        assert SECRET.decode() not in written and SECRET.decode() not in caplog.text

    def test_the_demo_secret_is_recorded_as_such(self, project):
        from stages import secret as secret_stage

        secret_stage.main()
        assert json.loads((project / "reports" / "secret_fingerprint.json").read_text()) == {
            "fingerprint": fingerprint(DEMO), "demo": True}

    def test_a_short_secret_stops_it(self, project, monkeypatch):
        from stages import secret as secret_stage

        monkeypatch.setenv(deid_secret.SECRET_ENV, "0123456789abcdef")
        with pytest.raises(SettingsError, match="DICOMFLOW_SECRET is 16 bytes long; a secret needs at least 32"):
            secret_stage.main()
        assert not (project / "reports" / "secret_fingerprint.json").exists()


@pytest.mark.slow
def test_the_sample_digests_are_those_of_the_generated_sample(tmp_path):
    """The shipped list is the SHA-256 of every file `dicomflow sample-data` writes (labels.csv
    aside), computed here from a fresh sample; a sample file is the sample, one file more is not."""
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "dicomflow", "sample-data", str(tmp_path / "data")],
                   check=True, capture_output=True, cwd=REPO)
    digests = {hashlib.sha256(path.read_bytes()).hexdigest()
               for path in (tmp_path / "data").rglob("*") if path.is_file() and path.name != "labels.csv"}
    shipped = (REPO / "dicomflow" / "deid" / "resources" / "embedded_sample.sha256").read_text().split()
    assert sorted(digests) == shipped and len(shipped) == 721
    assert deid_secret.is_embedded_sample(digests)
    assert not deid_secret.is_embedded_sample(digests | {hashlib.sha256(b"one file more").hexdigest()})


@pytest.mark.slow
def test_a_new_secret_reruns_deidentify_under_dvc_repro_and_the_same_one_does_not(tmp_path):
    """A real `dvc repro` in a temporary repository: the secret is no file, yet a change of it
    reruns deidentify (through the `secret` stage's fingerprint) and the same secret skips it."""
    import subprocess
    import sys

    root = tmp_path / "repo"
    root.mkdir()
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, root)
    for package in ("stages", "dicomflow"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MLFLOW_", "DICOMFLOW_", "DVC_"))}
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(root),
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.org", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.org")

    def run(*args: str, secret: str | None = None) -> str:
        result = subprocess.run(args, cwd=root, capture_output=True, text=True, timeout=600,
                                env={**env, "DICOMFLOW_SECRET": secret} if secret else env)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout + result.stderr

    run("git", "init", "-q")
    run("dvc", "init", "-q")
    run(sys.executable, "-m", "dicomflow", "sample-data", "data", "--patients", "40")
    run("dvc", "add", "-q", "data")
    first, second = "first secret of the tests, 32 bytes+", "second secret of the tests, 32 bytes+"
    fingerprint_file = root / "reports" / "secret_fingerprint.json"

    log = run("dvc", "repro", "deidentify", secret=first)
    assert "Running stage 'ingest'" in log and "Running stage 'deidentify'" in log
    assert json.loads(fingerprint_file.read_text()) == {"fingerprint": fingerprint(first.encode()), "demo": False}
    manifest = pd.read_parquet(root / "outputs" / "deidentify" / layout.DEID_MANIFEST)

    log = run("dvc", "repro", "deidentify", secret=first)
    assert "Running stage 'secret'" in log and "Running stage 'deidentify'" not in log

    log = run("dvc", "repro", "deidentify", secret=second)
    assert "Running stage 'deidentify'" in log and "Running stage 'ingest'" not in log
    assert json.loads(fingerprint_file.read_text())["fingerprint"] == fingerprint(second.encode())
    again = pd.read_parquet(root / "outputs" / "deidentify" / layout.DEID_MANIFEST)
    assert not set(again["patient_key"]) & set(manifest["patient_key"])  # re-keyed
    assert json.loads((root / "outputs" / "deidentify" / layout.DEID_SECRET_FINGERPRINT).read_text()) == {
        "fingerprint": fingerprint(second.encode()), "demo": False}
