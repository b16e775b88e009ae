"""Identifying values of source files, and how to find them in any text the way an attacker reads it.

:func:`collect_identifiers` gathers, from a source dataset at any depth (file meta included):

* every person name (PN), by each component group (alphabetic, ideographic, phonetic), each
  component, the family and given names in both orders and joined without a separator;
* IDs, accession and request numbers, issuers, addresses, institutions, stations and AE titles;
* instance UIDs; dates (every DA and DT value); telephone numbers (by their last digits).

:class:`Identifiers` finds them in a text after :func:`fold` has put both in one spelling (case
folded, accents stripped, ``ue``/``oe``/``ae`` as ``u``/``o``/``a``, Cyrillic transliterated,
full-width forms narrowed), so "MUELLER Juergen" and "Müller^Jürgen" match, and "Иванова" matches
"IVANOVA". Words must match whole words (so "Omar" is not found in "fromarray"); names in scripts
written without spaces (Han, kana, Hangul, Thai) match anywhere from two characters; dates match in
the common written forms (``2018-11-02``, ``02.11.2018``, ``11/02/2018``, ``2 Nov 2018``);
telephone numbers by their last :data:`PHONE_DIGITS` digits, whatever the separators.

Why not a library: the de-identification libraries (dicognito, deid, dicom-anonymizer) replace
attributes but none searches their outputs for the values they removed; a leak check is the only
way to know that nothing identifying got through an attribute no table lists.
"""

from __future__ import annotations

import ast
import functools
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import __version_info__ as pydicom_version_info
from pydicom.charset import convert_encodings
from pydicom.datadict import (
    dictionary_description,
    dictionary_has_tag,
    dictionary_VR,
    tag_for_keyword,
)
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

MIN_WORD = 3  # letters of a name component found alone ("Li" alone would be everywhere)
MIN_ID = 4  # characters of an ID with digits; numbers alone need MIN_NUMBER digits
MIN_ID_LETTERS = 5  # an institution or station of one word ("Here" is a word of English)
MIN_NUMBER = 6  # digits: counts, sizes and years in logs have fewer
MIN_UNSEGMENTED = 2  # characters of a name in a script without spaces (王小东: 小东)
PHONE_DIGITS = 7  # a telephone number is matched by its last 7 digits, with or without a prefix
DUMMY_DATES = frozenset({"19000101"})

# Words that are names of no one, or common in outputs ("chest"), and name particles.
NOT_IDENTIFYING = frozenset({
    "anonymous", "anonymized", "anonymised", "unknown", "none", "null", "test", "patient",
    "male", "female", "other", "dummy", "chest", "the", "and", "van", "von", "der", "den", "del",
    "della", "des", "les", "bin", "ben", "ibn", "dos", "das", "mr", "mrs", "ms", "dr", "prof",
})
# Attributes whose values identify a patient, a site or a request (besides every PN and date).
ID_KEYWORDS = frozenset({
    "PatientID", "OtherPatientIDs", "IssuerOfPatientID", "MedicalRecordLocator",
    "AccessionNumber", "StudyID", "RequestedProcedureID", "ScheduledProcedureStepID",
    "PerformedProcedureStepID", "PlacerOrderNumberImagingServiceRequest",
    "FillerOrderNumberImagingServiceRequest", "AdmissionID", "IssuerOfAdmissionID",
    "ServiceEpisodeID", "UniversalEntityID", "LocalNamespaceEntityID", "StationName",
    "StationAETitle", "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle", "ImplementationVersionName", "DeviceSerialNumber",
    "InstitutionName", "InstitutionalDepartmentName", "PatientInsurancePlanCodeSequence",
    "MilitaryRank", "BranchOfService", "RegionOfResidence", "CurrentPatientLocation",
    "PatientBirthName", "PatientMotherBirthName",
})
ADDRESS_KEYWORDS = frozenset({"PatientAddress", "InstitutionAddress", "PersonAddress",
                              "ReferringPhysicianAddress"})
PHONE_KEYWORDS = frozenset({"PatientTelephoneNumbers", "PersonTelephoneNumbers",
                            "ReferringPhysicianTelephoneNumbers", "PatientTelecomInformation",
                            "PersonTelecomInformation"})
UID_KEYWORDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                          "MediaStorageSOPInstanceUID", "FrameOfReferenceUID",
                          "ReferencedSOPInstanceUID", "ImplementationClassUID"})
# Attributes that retain_device_identity keeps: not identifiers when that option is on.
DEVICE_KEYWORDS = frozenset({"StationName", "StationAETitle", "SourceApplicationEntityTitle",
                             "DeviceSerialNumber"})

_WORD = re.compile(r"\w+")
_LETTER_RUN = re.compile(r"[^\W\d_]+")
# Han, kana, Hangul and Thai: written without spaces between words, so matched anywhere.
_UNSEGMENTED = re.compile("[\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff"
                          "\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f]")
_DIGRAPHS = re.compile(r"(?<=[aou])e")  # ü written ue, ö oe, ä ae
_CYRILLIC = str.maketrans({
    "а": "a", "б": "b", "в": "v", "г": "g", "д": "d", "е": "e", "ё": "e", "ж": "zh", "з": "z",
    "и": "i", "й": "i", "к": "k", "л": "l", "м": "m", "н": "n", "о": "o", "п": "p", "р": "r",
    "с": "s", "т": "t", "у": "u", "ф": "f", "х": "kh", "ц": "ts", "ч": "ch", "ш": "sh",
    "щ": "shch", "ъ": "", "ы": "y", "ь": "", "э": "e", "ю": "yu", "я": "ya", "і": "i", "ї": "i",
    "є": "e", "ґ": "g",
})
_MONTHS = {"jan": 1, "feb": 2, "mar": 3, "apr": 4, "may": 5, "mai": 5, "jun": 6, "jul": 7,
           "aug": 8, "sep": 9, "oct": 10, "okt": 10, "nov": 11, "dec": 12, "dez": 12}
_MONTH = "(" + "|".join(_MONTHS) + r")[a-z]*\.?"  # the group is the three letters
_DATE_FORMS = (  # (pattern, group order) on folded text
    (re.compile(r"(?<!\d)(\d{4})[-/.](\d{1,2})[-/.](\d{1,2})(?!\d)"), "ymd"),
    (re.compile(r"(?<!\d)(\d{1,2})[-/.](\d{1,2})[-/.](\d{4})(?!\d)"), "dmy mdy"),
    (re.compile(r"(?<!\d)(\d{4})(\d{2})(\d{2})(?!\d)"), "ymd"),
    (re.compile(r"(?<!\d)(\d{1,2})[ .\-]*" + _MONTH + r"[ ,.\-]*(\d{4})(?!\d)"), "dby"),
    (re.compile(_MONTH + r"[ .\-]*(\d{1,2})(?:st|nd|rd|th)?,?[ .\-]*(\d{4})(?!\d)"), "bdy"),
)
# The same forms on original text, for cutting dates out of it.
DATE_PATTERNS = tuple(re.compile(pattern.pattern, re.IGNORECASE) for pattern, _ in _DATE_FORMS)
# A run of digits with single separators between groups, as numbers are written by hand.
_DIGIT_RUN = re.compile(r"(?<![\w+])\+?\(?\d[\d()]*(?:[ \-./]\(?\d[\d()]*)*")


@functools.cache
def project_words() -> frozenset[str]:
    """The words of dicomflow's own code (folded): names in the code and its message strings,
    docstrings and the sample generator left out. Logs, reports and the code shipped with a model
    are written in them, so a name that is also one of them ("Max" of ``max()``, "May" of "may
    quote") alone is no evidence of a leak; such a name is still found with its other components,
    and the profile removes the text it could hide in whatever the scanner sees."""
    texts: set[str] = set()  # folded once each below: names repeat across nodes and files
    package = Path(__file__).resolve().parents[1]
    stages = package.parent / "stages"  # the pipeline's entry points, beside the package in the repository
    for path in [*package.rglob("*.py"), *(stages.glob("*.py") if stages.is_dir() else [])]:
        if "devtools" in path.relative_to(package.parent).parts:  # the sample generator's names are
            continue                                                # fake patients', meant to be found
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings: set[int] = set()  # one walk: it visits an expression statement before its value
        for node in ast.walk(tree):
            if isinstance(node, ast.Expr):
                docstrings.add(id(node.value))
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = "" if id(node) in docstrings else node.value
            else:
                text = " ".join(str(getattr(node, field)) for field in ("id", "attr", "arg", "name")
                                if isinstance(getattr(node, field, None), str))
            if text:
                texts.add(text)
    return frozenset(word for text in texts for word in _WORD.findall(fold(text.replace("_", " "))))


def fold(text: str) -> str:
    """``text`` in the one spelling that identifiers are compared in (see the module docstring);
    invisible format characters (zero-width spaces, soft hyphens) are dropped."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = unicodedata.normalize("NFC", "".join(
        c for c in text if not unicodedata.combining(c) and unicodedata.category(c) != "Cf"))
    return _DIGRAPHS.sub("", text.translate(_CYRILLIC))


def is_unsegmented(text: str) -> bool:
    """Whether ``text`` has characters of a script written without spaces between words."""
    return _UNSEGMENTED.search(text) is not None


def words(text: str) -> list[str]:
    """The folded words of ``text``."""
    return _WORD.findall(fold(text))


def dates_in(folded: str) -> Iterator[str]:
    """Every date written in ``folded`` text, as ``YYYYMMDD`` (both readings of ``01/02/2020``)."""
    for pattern, orders in _DATE_FORMS:
        for match in pattern.finditer(folded):
            yield from _readings(match, orders)


def cut_dates(text: str, replacement: str = " ") -> str:
    """``text`` with every date in a written form (as :func:`dates_in` finds them) replaced."""
    for (pattern, orders), cutter in zip(_DATE_FORMS, DATE_PATTERNS):
        text = cutter.sub(lambda match: replacement if any(_readings(match, orders)) else match[0],
                          text)
    return text


def _readings(match: re.Match, orders: str) -> Iterator[str]:
    """The valid dates (``YYYYMMDD``, years 1800-2199) that a date pattern's match can be read as."""
    for order in orders.split():
        parts = dict(zip(order, match.groups()))
        month = int(parts["m"]) if "m" in parts else _MONTHS[parts["b"].lower()[:3]]
        if 1 <= month <= 12 and 1 <= int(parts["d"]) <= 31 and 1800 <= int(parts["y"]) < 2200:
            yield f"{parts['y']}{month:02d}{int(parts['d']):02d}"


def digit_runs(folded: str) -> Iterator[str]:
    """The digits of every number written with separators (``+49 30 123-4567``) in ``folded``."""
    for match in _DIGIT_RUN.finditer(folded):
        digits = re.sub(r"\D", "", match[0])
        if len(digits) >= PHONE_DIGITS:
            yield digits


_KINDS_OF_VALUE = ("names", "words", "phrases", "unsegmented", "dates", "phones")


@dataclass
class Identifiers:
    """Identifying values by how they are found, each mapped to the attribute it came from
    (``"(0010,0010) Patient's Name"``), and the character sets of the sources they were read from.
    Picklable and mergeable (:meth:`update`), so workers can collect and the stage can merge."""

    names: dict[str, str] = field(default_factory=dict)
    words: dict[str, str] = field(default_factory=dict)
    phrases: dict[tuple[str, ...], str] = field(default_factory=dict)
    unsegmented: dict[str, str] = field(default_factory=dict)
    dates: dict[str, str] = field(default_factory=dict)
    phones: dict[str, str] = field(default_factory=dict)
    encodings: set[str] = field(default_factory=set)

    def __len__(self) -> int:
        return sum(len(getattr(self, kind)) for kind in _KINDS_OF_VALUE)

    def update(self, other: Identifiers) -> None:
        """Add ``other``'s values (the first source of a value is kept)."""
        for kind in _KINDS_OF_VALUE:
            mine = getattr(self, kind)
            for value, source in getattr(other, kind).items():
                mine.setdefault(value, source)
        self.encodings |= other.encodings

    def add_name(self, name: str, source: str) -> None:
        """A PN value: each component group, its components, both orders, joined."""
        for group in name.split("="):
            components = [c.strip() for c in group.split("^")[:3] if c.strip()]
            if not components:
                continue
            if any(is_unsegmented(c) for c in components):
                family_given = [fold(c).replace(" ", "") for c in components[:2]]
                for value in (*family_given, "".join(family_given), "".join(family_given[::-1])):
                    if len(value) >= MIN_UNSEGMENTED:
                        self.unsegmented.setdefault(value, source)
                continue
            tokens = [words(c) for c in components]
            for token in (t for each in tokens for t in each):
                self._add_name(token, source)
            family, given = tokens[0], [t for each in tokens[1:] for t in each]
            if given:
                for phrase in (family + given, given + family):
                    self.phrases.setdefault(tuple(phrase), source)
                    self._add_name("".join(phrase), source)

    def add_text(self, value: str, source: str, *, uid: bool = False) -> None:
        """An ID, UID, institution or address: the whole value, and an address's parts."""
        if uid:  # digits and dots: no spelling to fold
            parts = tuple(part for part in value.strip().casefold().split(".") if part)
            if len(parts) > 1:
                self.phrases.setdefault(parts, source)
            return
        parts = [value, *re.split(r"[\^,;\n]", value)] if value.count("^") + value.count(",") else [value]
        for part in parts:
            if is_unsegmented(part):
                folded = fold(part).replace(" ", "")
                if len(folded) >= MIN_UNSEGMENTED:
                    self.unsegmented.setdefault(folded, source)
                continue
            tokens = words(part)
            if len(tokens) == 1:
                self._add_word(tokens[0], source)
            elif len(tokens) > 1 and len("".join(tokens)) >= MIN_ID:
                self.phrases.setdefault(tuple(tokens), source)
            # "ACC-70707070" is also written "ACC70707070" and "70707070"
            self._add_word("".join(tokens), source)
            for digits in re.findall(r"\d+", "".join(tokens)):
                self._add_word(digits, source)

    def add_date(self, value: str, source: str) -> None:
        """A DA value, or the date of a DT value."""
        if re.fullmatch(r"\d{8}", value[:8]) and value[:8] not in DUMMY_DATES:
            self.dates.setdefault(value[:8], source)

    def add_phone(self, value: str, source: str) -> None:
        """A telephone number (or several, one per line or value)."""
        for digits in digit_runs(fold(value)):
            self.phones.setdefault(digits[-PHONE_DIGITS:], source)

    def _add_name(self, token: str, source: str) -> None:
        if token not in NOT_IDENTIFYING and len(token) >= MIN_WORD and not token.isdigit():
            self.names.setdefault(token, source)

    def _add_word(self, token: str, source: str) -> None:
        shortest = (MIN_NUMBER if token.isdigit() else MIN_ID_LETTERS if token.isalpha()
                    else MIN_ID)
        if token not in NOT_IDENTIFYING and len(token) >= shortest:
            self.words.setdefault(token, source)

    def first(self, text: str, *, dates_and_numbers: bool = True, names: bool = True) -> str | None:
        """The source of the first identifier found in ``text``, or None.

        ``dates_and_numbers`` False skips dates and telephone numbers (for DICOM date, time and
        number elements, whose values the profile has already replaced); ``names`` False skips
        single name words (for coded values: "PERFUSION" is an image type and a surname)."""
        folded = fold(text)
        tokens = _WORD.findall(folded)
        for position, token in enumerate(tokens):
            if token in self.words:
                return self.words[token]
            if names and token in self.names and token not in project_words():
                return self.names[token]
            if length := self.phrase_at(tokens, position):
                return self.phrases[tuple(tokens[position:position + length])]
        # Names of 4 letters or more also where digits or underscores touch them
        # ("quixley_chest.dcm", "Quixley2"); IDs only as whole words, so that a number is never
        # found inside the hex keys and UIDs the outputs are full of.
        for run in _LETTER_RUN.findall(folded) if names else ():
            if len(run) >= 4 and run in self.names and run not in project_words():
                return self.names[run]
        if self.unsegmented and is_unsegmented(folded):
            compact = folded.replace(" ", "")
            for value, source in self.unsegmented.items():
                if value in compact:
                    return source
        if dates_and_numbers:
            for date in dates_in(folded) if self.dates else ():
                if date in self.dates:
                    return self.dates[date]
            for digits in digit_runs(folded) if self.phones else ():
                if digits[-PHONE_DIGITS:] in self.phones:
                    return self.phones[digits[-PHONE_DIGITS:]]
        return None

    def phrase_at(self, tokens: list[str], position: int) -> int:
        """The length of the longest phrase starting at ``tokens[position]`` (0 when none)."""
        firsts, lengths = self._phrase_index
        if tokens[position] not in firsts:
            return 0
        return max((length for length in lengths
                    if tuple(tokens[position:position + length]) in self.phrases), default=0)

    @property
    def _phrase_index(self) -> tuple[frozenset[str], list[int]]:
        """The first words of the phrases and their lengths, rebuilt when phrases were added: a
        text's words are looked up, not compared with thousands of UIDs that start with "1"."""
        if getattr(self, "_indexed", None) != len(self.phrases):
            self._firsts = frozenset(phrase[0] for phrase in self.phrases)
            self._lengths = sorted({len(phrase) for phrase in self.phrases})
            self._indexed = len(self.phrases)
        return self._firsts, self._lengths


def describe_tag(tag: BaseTag) -> str:
    """``"(0010,0020) Patient ID"``: the tag and its name, as messages write attributes; private
    and unknown tags by number."""
    name = (dictionary_description(tag) if dictionary_has_tag(tag) else
            "private" if tag.group % 2 else "unknown")
    return f"({tag.group:04X},{tag.element:04X}) {name}"


def collect_identifiers(ds: Dataset, *, device_identity_kept: bool = False) -> Identifiers:
    """The identifying values of a source dataset, at any depth, with its file meta.

    ``device_identity_kept``: station names and serial numbers are kept by the Retain Device
    Identity option, so they are not searched for. Only the elements that can hold an
    identifier are converted from their raw bytes (that conversion is most of the cost).
    """
    found = Identifiers(encodings=source_encodings(ds))
    kinds = _DEVICE_KEPT_KINDS if device_identity_kept else _KINDS
    for _, parent, tag, vr in every_element(ds):
        # By the dictionary's VR too: a name written under another VR is still a name.
        meant = dictionary_VR(tag) if dictionary_has_tag(tag) else ""
        kind = ("name" if "PN" in (vr, meant) else "date" if {vr, meant} & {"DA", "DT"}
                else kinds.get(tag))
        if kind is None:
            continue
        source = describe_tag(BaseTag(tag))
        for value in _element_texts(parent, tag):
            if tag in _IMPLEMENTATION_TAGS and value.strip() in PUBLIC_IMPLEMENTATIONS:
                continue
            if kind == "name":
                found.add_name(value, source)
            elif kind == "date":
                found.add_date(value, source)
            elif kind == "phone":
                found.add_phone(value, source)
            else:
                found.add_text(value, source, uid=kind == "uid")
    return found


def _tags(keywords: Iterable[str]) -> frozenset[int]:
    return frozenset(tag for keyword in keywords if (tag := tag_for_keyword(keyword)) is not None)


# A file's (0002,0012) Implementation Class UID and (0002,0013) Implementation Version Name can
# name a site's own software, so they are searched for; but not when they are a public toolkit's
# defaults, which every file that toolkit writes carries and which identify no one: pydicom's
# (what `dicomflow import-photos` and many research scripts write; its version also stands in
# the requirements of every model MLflow logs, where the search would find it).
PUBLIC_IMPLEMENTATIONS = frozenset({PYDICOM_IMPLEMENTATION_UID, f"PYDICOM {'.'.join(pydicom_version_info)}"})
_IMPLEMENTATION_TAGS = frozenset(_tags({"ImplementationClassUID", "ImplementationVersionName"}))
_KINDS = {**dict.fromkeys(_tags(PHONE_KEYWORDS), "phone"), **dict.fromkeys(_tags(UID_KEYWORDS), "uid"),
          **dict.fromkeys(_tags(ID_KEYWORDS | ADDRESS_KEYWORDS), "text")}
_DEVICE_KEPT_KINDS = {tag: kind for tag, kind in _KINDS.items() if tag not in _tags(DEVICE_KEYWORDS)}


def vr_of(ds: Dataset, tag: int) -> str:
    """The VR an element will have once converted, read without converting it: the file's, or the
    dictionary's for an implicit or UN element of a known tag (pydicom's own rule), the first of
    an ambiguous dictionary VR ("OB or OW": OB)."""
    vr = ds.get_item(tag).VR
    if vr in (None, "UN") and dictionary_has_tag(tag):
        vr = dictionary_VR(tag)
    return vr.split(" or ")[0] if vr else "UN"


def every_element(ds: Dataset, read_vr: Callable[[Dataset, int], str] = vr_of,
                  ) -> Iterator[tuple[tuple[BaseTag, ...], Dataset, BaseTag, str]]:
    """Every element of ``ds``'s file meta, then of ``ds``, that is not a sequence, and those of
    every sequence item at any depth, in file order, as (the tags of the sequences it lies in,
    outermost first; the dataset or item holding it; its tag; its VR by ``read_vr``).

    Both the identifier collection and the leak scanner walk a dataset this way; they differ only
    in which VR they trust (``read_vr``) and in what they read. Only sequences are converted from
    their raw bytes here (to reach their items): the caller converts what it needs, if anything."""
    meta = getattr(ds, "file_meta", None)
    for part in (meta, ds) if meta is not None else (ds,):
        yield from _elements_of(part, read_vr, ())


def _elements_of(ds: Dataset, read_vr: Callable[[Dataset, int], str], sequences: tuple[BaseTag, ...],
                 ) -> Iterator[tuple[tuple[BaseTag, ...], Dataset, BaseTag, str]]:
    for tag in list(ds.keys()):
        vr = read_vr(ds, tag)
        if vr == "SQ":
            for item in ds[tag].value or ():
                yield from _elements_of(item, read_vr, (*sequences, tag))
        else:
            yield sequences, ds, tag, vr


def source_encodings(ds: Dataset) -> set[str]:
    """The Python codecs of ``ds``'s (0008,0005) Specific Character Set."""
    charset = ds.get("SpecificCharacterSet") or "ISO_IR 6"
    values = list(charset) if isinstance(charset, (list, MultiValue)) else [charset]
    try:
        return set(convert_encodings([str(v).strip() for v in values]))
    except Exception:  # noqa: BLE001  an unknown character set: the text is read as Latin-1 and UTF-8 anyway
        return set()


def _element_texts(ds: Dataset, tag: int) -> list[str]:
    """The values of ``ds[tag]`` as text; for an element its VR cannot read (a name written as
    FD), its raw bytes as Latin-1, split at backslashes."""
    try:
        return _texts(ds[tag])
    except Exception:  # noqa: BLE001  pydicom raises many types for values that do not fit the VR
        raw = ds.get_item(tag).value
        return [part for part in raw.decode("latin-1").split("\\") if part.strip("\x00 ")] \
            if isinstance(raw, bytes) else []


def _texts(elem) -> list[str]:
    """The element's values as text (bytes as Latin-1)."""
    value = elem.value
    if value is None or value == "":
        return []
    values = value if isinstance(value, (list, MultiValue)) else [value]
    return [v.decode("latin-1") if isinstance(v, bytes) else str(v) for v in values]
