"""A small corpus of DICOM files shaped like real hospital exports, with its planted identifiers.

Real exports from European and Asian sites break de-identifiers in ways the embedded sample never
does: names in GB18030, ISO 2022 (Japanese, Korean), Latin-1, Cyrillic; free text that spells the
patient's name another way ("MUELLER Juergen", "王小东", "IVANOVA A."), names a relative, gives a
phone number or a ward and bed; names inside the Code Meaning of procedure codes; site OIDs and
PACS names in the file meta and issuer sequences; sequences the PS3.15 table does not list; private
blocks; a TIFF header with the patient's name in the preamble (dual-personality files); legacy
"UIDs" built from a record number and a date, which pydicom quotes in its warnings.

:func:`write_hospital_exports` writes 12 such files (64x64 MONOCHROME2 CR/DX, 12 bits stored in
16, some RLE Lossless, one implicit VR) and ``labels.csv`` (keyed by accession number, as
``ingest.label_key`` expects), and returns :class:`Planted`: every identifying value it wrote, with
a short description. The values are the generator's own literals, never computed by project code,
so that a test can search for them independently of the project's own scanner.
"""

from __future__ import annotations

import csv
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
# The coding scheme of the sites' local procedure codes. Real ones often name the site ("99KFB"):
# not planted here, as the issue is about free text, file meta and issuers.
LOCAL_SCHEME = "99LOCAL"


@dataclass(frozen=True)
class SiteIdentity:
    """What a site's PACS writes into the file meta of every file it exports."""

    implementation_class_uid: str
    implementation_version_name: str
    source_ae_title: str


@dataclass
class Planted:
    """Ground truth of :func:`write_hospital_exports`.

    ``identifiers``: (description, value) for every identifying value written somewhere in the
    corpus (headers, free text, code meanings, sequences, private blocks, preambles, file meta).
    ``character_sets``: the (0008,0005) Specific Character Set values used, for a search that
    encodes each value as the files do. ``sites``: the file meta identities of the exporting PACS.
    ``files``: the DICOM files written; ``labels``: the labels file.
    """

    identifiers: list[tuple[str, str]] = field(default_factory=list)
    character_sets: list[tuple[str, ...]] = field(default_factory=list)
    sites: list[SiteIdentity] = field(default_factory=list)
    files: list[Path] = field(default_factory=list)
    labels: Path | None = None

    def add(self, description: str, value: str) -> None:
        """Record one planted value (once); it must be long enough to be searched for."""
        assert _long_enough(value), (description, value)
        if (description, value) not in self.identifiers:
            self.identifiers.append((description, value))


@dataclass(frozen=True)
class Site:
    """One exporting hospital: its identity in headers and in its PACS's file meta."""

    key: str
    institution: str
    address: str
    department: str
    character_set: tuple[str, ...]
    oid: str                  # the hospital's OID: issuer Universal Entity ID, root of its UIDs
    version_name: str         # (0002,0013) Implementation Version Name
    ae_title: str             # (0002,0016) Source Application Entity Title
    issuer: str               # (0010,0021) Issuer of Patient ID
    ris_namespace: str        # Issuer of Accession Number Local Namespace Entity ID
    station: str
    serial: str
    manufacturer: str
    referring: str            # (0008,0090) Referring Physician's Name (PN)
    operator: str             # (0008,1070) Operators' Name (PN)
    modality: str = "CR"

    @property
    def implementation_class_uid(self) -> str:
        return f"{self.oid}.1"

    @property
    def identity(self) -> SiteIdentity:
        return SiteIdentity(self.implementation_class_uid, self.version_name, self.ae_title)


@dataclass(frozen=True)
class Patient:
    """One patient and what the site wrote about them.

    ``texts``: free-text attribute keyword -> value. ``code_meaning``: the Code Meaning of the
    Procedure Code Sequence item; ``request_meaning``: the Requested Procedure Code Sequence
    item's, inside the Referenced Request Sequence. ``spellings``: (description, substring) of
    the identifying values those texts hold, each checked to be in one of them.
    """

    site: Site
    name: str
    patient_id: str
    other_id: str
    birth_date: str
    sex: str
    age: str
    address: str
    phone: str
    study_date: str
    texts: dict[str, str]
    code_meaning: str
    request_meaning: str
    spellings: tuple[tuple[str, str], ...]
    mother: str = ""          # (0010,1060) Patient's Mother's Birth Name (PN), when exported
    folder: str = ""          # export folder; some PACS name it after the patient


BERLIN = Site(
    key="berlin", institution="Klinikum Friedrichshain Berlin",
    address="Landsberger Allee 49, 10249 Berlin", department="Institut für Radiologie",
    character_set=("ISO_IR 100",), oid="1.2.826.0.1.3680043.9.7777.2",
    version_name="KFB_PACS_3.4", ae_title="KFB_PACS01", issuer="KFB-PID",
    ris_namespace="KFB_RIS", station="KFB-CR-02", serial="SN-KF-88123",
    manufacturer="Fujifilm", referring="Albers^Hanna^^Dr. med.", operator="Wagner^Lena")
BEIJING = Site(
    key="beijing", institution="北京东城人民医院", address="北京市东城区东单北大街1号",
    department="放射科", character_set=("GB18030",), oid="1.2.826.0.1.3680043.9.7777.3",
    version_name="DCRMYY_PACS_5.0", ae_title="DCRMYY_PACS", issuer="DCRMYY",
    ris_namespace="DCRMYY_RIS", station="DCRM-DR-1", serial="SN-BJ-20170331",
    manufacturer="Carestream", referring="张^伟明", operator="刘^海燕", modality="DX")
TOKYO = Site(
    key="tokyo", institution="東京中央病院", address="東京都中央区築地三丁目5番1号",
    department="放射線科", character_set=("", "ISO 2022 IR 87"),
    oid="1.2.826.0.1.3680043.9.7777.4", version_name="TCH_PACS_7.2", ae_title="TCHPACS",
    issuer="TCH-ID", ris_namespace="TCH_RIS", station="TCH-CR-3", serial="SN-TK-0098812",
    manufacturer="Canon", referring="Suzuki^Ichirou=鈴木^一郎=すずき^いちろう",
    operator="Tanaka^Hanako=田中^花子=たなか^はなこ")
MOSCOW = Site(
    key="moscow", institution="Городская клиническая больница № 52",
    address="ул. Пехотная, 3, Москва", department="Отделение лучевой диагностики",
    character_set=("ISO_IR 144",), oid="1.2.826.0.1.3680043.9.7777.5",
    version_name="GKB52_PACS_1.9", ae_title="GKB52_ARCH", issuer="GKB52",
    ris_namespace="GKB52_RIS", station="GKB52-RG-4", serial="SN-MSK-441907",
    manufacturer="Philips", referring="Смирнов^Олег^Петрович", operator="Кузнецова^Ольга")
SEOUL = Site(
    key="seoul", institution="한빛대학교병원", address="서울특별시 종로구 대학로 101",
    department="영상의학과", character_set=("", "ISO 2022 IR 149"),
    oid="1.2.826.0.1.3680043.9.7777.6", version_name="HANBIT_PACS_4.1", ae_title="HANBITPACS",
    issuer="HANBIT", ris_namespace="HANBIT_RIS", station="HB-DR-07", serial="SN-SEL-30917",
    manufacturer="Samsung", referring="Lee^Sunghoon=李^成勳=이^성훈",
    operator="Choi^Yuna=崔^有娜=최^유나", modality="DX")
NAIROBI = Site(
    key="nairobi", institution="Kenyatta National Hospital",
    address="Hospital Road, Upper Hill, Nairobi", department="Radiology Department",
    character_set=("ISO_IR 192",), oid="1.2.826.0.1.3680043.9.7777.1",
    version_name="KNH_PACS_2.1", ae_title="KNH_PACS01", issuer="KNH-MRN",
    ris_namespace="KENYATTA_RIS", station="KNH-CR-11", serial="SN-KNH-551020",
    manufacturer="Agfa", referring="Otieno^Brian", operator="Achieng^Mercy")
WARSAW = Site(
    key="warsaw", institution="Szpital Bielański w Warszawie",
    address="ul. Cegłowska 80, 01-809 Warszawa", department="Zakład Radiologii",
    character_set=("ISO_IR 192",), oid="1.2.826.0.1.3680043.9.7777.7",
    version_name="SZB_PACS_6.0", ae_title="SZB_PACS", issuer="SZB-PID",
    ris_namespace="SZB_RIS", station="SZB-DX-2", serial="SN-WAW-710244",
    manufacturer="Siemens", referring="Nowak^Tomasz", operator="Kowalczyk^Ewa", modality="DX")
SITES = (BERLIN, BEIJING, TOKYO, MOSCOW, SEOUL, NAIROBI, WARSAW)

MUELLER = Patient(
    site=BERLIN, name="Müller^Jürgen", patient_id="4471123", other_id="KV-A123456789",
    birth_date="19570314", sex="M", age="061Y", address="Boxhagener Str. 17, 10245 Berlin",
    phone="+49 30 1234567", study_date="20181102",
    texts={
        "Allergies": "Penicillin (Pat. MUELLER Juergen, Rückfragen 030-1234567)",
        "SpecialNeeds": "Rollstuhl; Tochter Käthe Schröder begleitet",
        "PatientState": "stabil, ward 7B bed 12",
        "PreMedication": "keine lt. MÜLLER, Jürgen am 02.11.2018",
        "MedicalAlerts": "MRSA positiv seit 05/09/2017",
        "AdditionalPatientHistory": "Z.n. Pneumonie 2018-11-02, MRN 4471123",
        "PatientComments": "Müller Jürgen, geb. 14.03.1957, Tel. +49 30 1234567",
        "ImageComments": "MUELLER JUERGEN 4471123 Station 7B",
    },
    code_meaning="Dr A. Mensah ward 7B",
    request_meaning="Thorax 2 Ebenen Pat. Mueller J.",
    spellings=(("name, transliterated", "MUELLER Juergen"),
               ("phone number, local format", "030-1234567"),
               ("relative's name (daughter)", "Käthe Schröder"),
               ("ward and bed", "ward 7B bed 12"),
               ("name, FAMILY, Given", "MÜLLER, Jürgen"),
               ("date in free text, dd.mm.yyyy", "02.11.2018"),
               ("earlier admission date, mm/dd/yyyy", "05/09/2017"),
               ("date in free text, ISO", "2018-11-02"),
               ("record number in free text", "MRN 4471123"),
               ("birth date in free text", "14.03.1957"),
               ("ward physician in a Code Meaning", "Mensah"),
               ("ward in a Code Meaning", "ward 7B"),
               ("name in a requested procedure Code Meaning", "Mueller J."),
               ("name, upper-case transliteration", "MUELLER JUERGEN")),
    folder="MUELLER_JUERGEN_4471123")
WANG = Patient(
    site=BEIJING, name="王^小东", patient_id="BJ20180456", other_id="110101195803124519",
    birth_date="19580312", sex="M", age="060Y", address="北京市朝阳区建国路88号",
    phone="13812345678", study_date="20181102",
    texts={
        "Allergies": "青霉素过敏（王小东本人告知）",
        "SpecialNeeds": "家属李秀英陪同，电话13912345678",
        "PatientState": "7B病区12床",
        "PreMedication": "2018-11-02 口服",
        "PatientComments": "住院号 ZY2018110245 王小东",
    },
    code_meaning="胸部正位 王小东",
    request_meaning="胸部DR 王小东 住院号ZY2018110245",
    spellings=(("name without separator", "王小东"),
               ("relative's name", "李秀英"),
               ("relative's phone number", "13912345678"),
               ("ward and bed", "7B病区12床"),
               ("record (inpatient) number", "ZY2018110245")))
OUYANG = Patient(
    site=BEIJING, name="欧阳^娜娜", patient_id="BJ20170913", other_id="110105198807214228",
    birth_date="19880721", sex="F", age="030Y", address="北京市海淀区中关村大街27号",
    phone="+86 10 6512 3456", study_date="20181105",
    texts={
        "Allergies": "碘造影剂过敏 欧阳娜娜",
        "PatientState": "孕 12 周，欧阳娜娜本人签字",
        "PreMedication": "无",
        "ImageComments": "OUYANG NANA 05/11/2018",
    },
    code_meaning="胸部正位 欧阳娜娜",
    request_meaning="胸部DR",
    spellings=(("name without separator", "欧阳娜娜"),
               ("name in pinyin", "OUYANG NANA"),
               ("date in free text, dd/mm/yyyy", "05/11/2018")))
YAMADA = Patient(
    site=TOKYO, name="Yamada^Tarou=山田^太郎=やまだ^たろう", patient_id="00123456",
    other_id="TK-HOKEN-7781", birth_date="19650420", sex="M", age="053Y",
    address="東京都港区芝公園4丁目2番8号", phone="03-3433-5111", study_date="20181102",
    texts={
        "Allergies": "山田太郎様 造影剤アレルギー",
        "SpecialNeeds": "車椅子 病棟7B ベッド12 妻 山田花子 付添",
        "PatientState": "YAMADA TAROU 2018/11/02 入院",
        "PreMedication": "なし",
        "PatientComments": "カルテ番号 K-00123456",
    },
    code_meaning="胸部単純 山田太郎",
    request_meaning="胸部X線 やまだ たろう",
    spellings=(("name without separator", "山田太郎"),
               ("relative's name (wife)", "山田花子"),
               ("name, upper-case romaji", "YAMADA TAROU"),
               ("date in free text, yyyy/mm/dd", "2018/11/02"),
               ("phonetic name with a space", "やまだ たろう"),
               ("chart number", "K-00123456"),
               ("ward and bed", "病棟7B ベッド12")))
IVANOVA = Patient(
    site=MOSCOW, name="Иванова^Анна^Сергеевна", patient_id="77881234",
    other_id="СНИЛС 112-233-445 95", birth_date="19700905", sex="F", age="048Y",
    address="ул. Академика Королёва, 12, кв. 45, Москва", phone="+7 495 123-45-67",
    study_date="20181110",
    texts={
        "Allergies": "ИВАНОВА А.С.: пенициллин",
        "SpecialNeeds": "сопровождает муж Иванов Пётр, тел. 8-916-555-12-34",
        "PatientState": "IVANOVA A. палата 7Б койка 12",
        "PreMedication": "с 05.09.2017 варфарин",
        "MedicalAlerts": "Анна Сергеевна, история болезни 2018/4471",
    },
    code_meaning="Рентгенография ОГК, Иванова А.С.",
    request_meaning="ОГК 2 проекции IVANOVA ANNA",
    spellings=(("name, initials", "ИВАНОВА А.С."),
               ("relative's name (husband)", "Иванов Пётр"),
               ("relative's phone number", "8-916-555-12-34"),
               ("name, Latin initial", "IVANOVA A."),
               ("ward and bed", "палата 7Б койка 12"),
               ("date in free text, dd.mm.yyyy", "05.09.2017"),
               ("given name and patronymic", "Анна Сергеевна"),
               ("record (case history) number", "2018/4471"),
               ("name, Latin", "IVANOVA ANNA")))
PARK = Patient(
    site=SEOUL, name="Park^Jiwoo=朴^智宇=박^지우", patient_id="SNH10448213",
    other_id="850612-2345678", birth_date="19850612", sex="F", age="033Y",
    address="서울특별시 마포구 월드컵로 240", phone="010-9876-5432", study_date="20181102",
    texts={
        "Allergies": "박지우 환자 페니실린 알레르기",
        "SpecialNeeds": "보호자 박서연 010-1234-5678",
        "PatientState": "7B병동 12번 침대",
        "PreMedication": "없음",
    },
    code_meaning="흉부 PA 박지우",
    request_meaning="Chest PA PARK JIWOO",
    spellings=(("name without separator", "박지우"),
               ("relative's name (guardian)", "박서연"),
               ("guardian's phone number", "010-1234-5678"),
               ("ward and bed", "7B병동 12번 침대"),
               ("name, upper-case romanisation", "PARK JIWOO")))
CHEN = Patient(
    site=NAIROBI, name="Chen^Jianguo=陈^建国", patient_id="KNH-2018-009931",
    other_id="KE-ID-24580113", birth_date="19620130", sex="M", age="056Y",
    address="Ngong Road, Kilimani, Nairobi", phone="+254 722 123456", study_date="20181102",
    texts={
        "Allergies": "Sulfa; interpreter for 陈建国: son Chen Wei +254 733 998877",
        "PatientState": "Ward 7B, bed 12, stable",
        "PreMedication": "none since 2018-11-02",
        "AdditionalPatientHistory": "CHEN, Jianguo: TB contact 2017, file KNH-2018-009931",
    },
    code_meaning="Dr A. Mensah ward 7B",
    request_meaning="Chest PA, Mr CHEN Jianguo",
    spellings=(("name without separator", "陈建国"),
               ("relative's name (son)", "Chen Wei"),
               ("relative's phone number", "+254 733 998877"),
               ("ward and bed, capitalised", "Ward 7B, bed 12"),
               ("name, FAMILY, Given", "CHEN, Jianguo"),
               ("name, FAMILY Given", "CHEN Jianguo"),
               ("ward physician in a Code Meaning", "Mensah")))
WANJIRU = Patient(
    site=NAIROBI, name="Wanjiru^Grace^Njeri", patient_id="KNH-2018-010457",
    other_id="KE-ID-30117725", birth_date="19900217", sex="F", age="028Y",
    address="Kibera Drive, Nairobi", phone="+254 711 445566", study_date="20181103",
    texts={
        "Allergies": "NKDA (Grace Njeri Wanjiru)",
        "SpecialNeeds": "mother Mary Wambui accompanies, 0722 334455",
        "PatientState": "Ward 4A bed 3",
        "PreMedication": "none",
    },
    code_meaning="Chest PA",
    request_meaning="Chest PA WANJIRU G.",
    spellings=(("name, given names first", "Grace Njeri Wanjiru"),
               ("relative's name (mother)", "Mary Wambui"),
               ("relative's phone number", "0722 334455"),
               ("ward and bed", "Ward 4A bed 3"),
               ("name, initial", "WANJIRU G.")),
    mother="Wambui^Mary")
WISNIEWSKA = Patient(
    site=WARSAW, name="Wiśniewska^Zofia", patient_id="SZB0078812", other_id="PESEL 79031512345",
    birth_date="19790315", sex="F", age="039Y", address="ul. Żelazna 41 m. 7, 00-836 Warszawa",
    phone="+48 22 456 78 90", study_date="20181102",
    texts={
        "Allergies": "jod; WISNIEWSKA Zofia, tel. 601 234 567",
        "SpecialNeeds": "córka Anna Wiśniewska-Kowal",
        "PatientState": "oddział 7B łóżko 12",
        "PreMedication": "od 02.11.2018",
    },
    code_meaning="RTG klatki piersiowej PA",
    request_meaning="RTG kl. p. Wiśniewska Z.",
    spellings=(("name, without diacritics", "WISNIEWSKA Zofia"),
               ("phone number, mobile", "601 234 567"),
               ("relative's name (daughter)", "Anna Wiśniewska-Kowal"),
               ("ward and bed", "oddział 7B łóżko 12"),
               ("name, initial", "Wiśniewska Z.")))


@dataclass(frozen=True)
class Export:
    """One exported file: the patient, its image and the oddities of that export."""

    patient: Patient
    number: int               # the image's number in the study (1, 2, ...)
    accession: str
    label: int
    view: str = "PA"
    rle: bool = False
    implicit: bool = False
    uid_root: str = ""        # legacy "UIDs" under this prefix (record number, date), invalid
    tiff_text: str = ""       # a TIFF ImageDescription in the preamble (dual-personality file)
    unlisted_sequence: bool = False
    private_text: str = ""    # a private block holding this


EXPORTS = (
    Export(MUELLER, 1, "KFB18110201", 1, tiff_text="Müller, Jürgen; MRN 4471123; geb. 14.03.1957",
           uid_root="1.2.3.MRN4471123.20181102"),
    Export(MUELLER, 2, "KFB18110201", 1, view="LL", rle=True, uid_root="1.2.3.MRN4471123.20181102",
           unlisted_sequence=True, private_text="Müller^Jürgen 4471123 KFB"),
    Export(WANG, 1, "DC201811020017", 0, private_text="王小东 住院号 ZY2018110245"),
    Export(OUYANG, 1, "DC201811050042", 1, rle=True),
    Export(YAMADA, 1, "TCHR181102-0088", 0),
    Export(YAMADA, 2, "TCHR181102-0088", 0, view="LL", implicit=True, unlisted_sequence=True),
    Export(IVANOVA, 1, "GKB52-181110-311", 1, rle=True, uid_root="1.2.643.5.ID77881234.181110"),
    Export(IVANOVA, 2, "GKB52-181110-312", 1, view="LL", unlisted_sequence=True),
    Export(PARK, 1, "HB2018110200731", 0, private_text="박지우 SNH10448213"),
    Export(CHEN, 1, "KNHR2018-55120", 1, private_text="CHEN Jianguo KNH-2018-009931"),
    Export(WANJIRU, 1, "KNHR2018-55187", 0, view="AP", rle=True),
    Export(WISNIEWSKA, 1, "SZB-RTG-18-90211", 0,
           tiff_text="Zofia Wisniewska | PESEL 79031512345 | ur. 1979-03-15"),
)


def write_hospital_exports(folder: Path) -> Planted:
    """Write the corpus under ``folder`` and ``folder/labels.csv``; return what was planted.

    Files lie in ``<site>/<accession or patient folder>/IM<number>`` (no extension, as PACS
    exports name them). Every accession number is labelled, both classes occur.
    """
    planted = Planted()
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    with warnings.catch_warnings():
        # pydicom warns about the legacy UIDs as they are set, quoting them: not for test logs.
        warnings.simplefilter("ignore")
        for number, export in enumerate(EXPORTS):
            path = folder / export.patient.site.key / (
                export.patient.folder or export.accession) / f"IM{export.number:06d}"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds = _dataset(export, number)
            ds.save_as(path, enforce_file_format=True)
            planted.files.append(path)
            _record(planted, export)
            rows.append((export.accession, export.label))
    planted.labels = folder / "labels.csv"
    with open(planted.labels, "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(("accession_number", "label"))
        writer.writerows(dict.fromkeys(rows))
    for site in SITES:
        planted.sites.append(site.identity)
        if site.character_set not in planted.character_sets:
            planted.character_sets.append(site.character_set)
    return planted


def _record(planted: Planted, export: Export) -> None:
    """Add the identifying values of one export to ``planted`` (literals written by _dataset)."""
    patient, site = export.patient, export.patient.site
    add = planted.add
    add("patient's name (PN, as exported)", patient.name)
    for group in patient.name.split("="):
        add("patient's name, one component group", group)
        for part in group.split("^"):
            if _long_enough(part):
                add("patient's name, one component", part)
    add("patient ID", patient.patient_id)
    add("other patient ID", patient.other_id)
    add("birth date (DA)", patient.birth_date)
    add("patient's address", patient.address)
    add("patient's telephone number", patient.phone)
    add("study date (DA)", patient.study_date)
    add("accession number", export.accession)
    for description, value in patient.spellings:
        texts = [*patient.texts.values(), patient.code_meaning, patient.request_meaning]
        assert any(value in text for text in texts), (description, value)
        add(description, value)
    if patient.mother:
        add("mother's birth name (PN)", patient.mother)
    for description, value in (
            ("institution name", site.institution), ("institution address", site.address),
            ("issuer of patient ID", site.issuer), ("hospital OID (Universal Entity ID)", site.oid),
            ("RIS namespace (Issuer of Accession Number)", site.ris_namespace),
            ("station name", site.station), ("device serial number", site.serial),
            ("Implementation Class UID (site OID)", site.implementation_class_uid),
            ("Implementation Version Name", site.version_name),
            ("Source Application Entity Title", site.ae_title),
            ("referring physician (PN)", site.referring), ("operator (PN)", site.operator)):
        add(description, value)
    for person in (site.referring, site.operator):
        for group in person.split("="):
            parts = [part for part in group.split("^") if part]
            if _long_enough(parts[0]):
                add("physician or operator, family name", parts[0])
    if export.uid_root:
        add("legacy UID built from a record number and a date", _uid(export, "sop"))
        add("legacy study UID built from a record number and a date", _uid(export, "study"))
        add("record number inside a legacy UID", export.uid_root.split(".")[-2])
    else:
        add("SOP Instance UID (site root)", _uid(export, "sop"))
        add("Study Instance UID (site root)", _uid(export, "study"))
    add("Series Instance UID", _uid(export, "series"))
    if export.tiff_text:
        for part in export.tiff_text.replace(";", "|").split("|"):
            add("TIFF ImageDescription in the preamble", part.strip())
    if export.private_text:
        add("private element text", export.private_text)
    if export.unlisted_sequence:
        add("name in an unlisted nested sequence (PN)", _UNLISTED_PERSON[site.key])
        add("name in an unlisted nested sequence (Code Meaning)", _UNLISTED_MEANING[site.key])


def _long_enough(text: str) -> bool:
    """Whether a value is worth searching: 4 characters, or 2 ideographs, kana or hangul (one
    ideograph or 3 letters turn up by chance in any binary file)."""
    wide = sum(1 for c in text if ord(c) > 0x2E7F)
    return len(text) >= 4 or (wide >= 2 and wide == len(text))


# Names in the two-level unlisted sequence: a radiographer's (PN) and a companion's (Code Meaning).
_UNLISTED_PERSON = {"berlin": "Lindqvist^Petra", "tokyo": "Kobayashi^Yui=小林^結衣=こばやし^ゆい",
                    "moscow": "Соколова^Дарья"}
_UNLISTED_MEANING = {"berlin": "Begleitperson Käthe Schröder", "tokyo": "付添 山田花子",
                     "moscow": "сопровождает Иванов Пётр"}


def _uid(export: Export, kind: str) -> str:
    """The instance UIDs of an export: legacy ones (record number and date, invalid characters)
    or ones under the hospital's OID."""
    patient_number = next(i for i, e in enumerate(EXPORTS) if e.patient == export.patient) + 1
    if export.uid_root:
        return {"study": export.uid_root, "series": f"{export.uid_root}.{export.view}",
                "sop": f"{export.uid_root}.{export.number}"}[kind]
    root = f"{export.patient.site.oid}.2.{patient_number}.{export.patient.study_date}"
    return {"study": root, "series": f"{root}.{export.number}00",
            "sop": f"{root}.{export.number}00.{export.number}"}[kind]


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _issuer(site: Site) -> Dataset:
    """An Issuer of Patient ID Qualifiers item: the hospital's OID and its assigning facility."""
    facility = Dataset()
    facility.LocalNamespaceEntityID = site.institution
    facility.UniversalEntityID, facility.UniversalEntityIDType = site.oid, "ISO"
    item = Dataset()
    item.UniversalEntityID, item.UniversalEntityIDType = site.oid, "ISO"
    item.IdentifierTypeCode = "MR"
    item.AssigningFacilitySequence = Sequence([facility])
    return item


def _unlisted_sequence(site: Site) -> Sequence:
    """(0040,0260) Performed Protocol Code Sequence, which PS3.15 Table E.1-1 does not list, with
    a (0040,0440) Protocol Context Sequence (not listed either) holding a person's name (PN) and,
    one level further down, a Code Meaning naming the patient's companion."""
    concept = _code("99COMP", LOCAL_SCHEME, _UNLISTED_MEANING[site.key])
    context = Dataset()
    context.ValueType = "PNAME"
    context.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    context.PersonName = _UNLISTED_PERSON[site.key]
    context.ConceptCodeSequence = Sequence([concept])
    protocol = _code("RPX-CHEST", LOCAL_SCHEME, "Chest routine")
    protocol.ProtocolContextSequence = Sequence([context])
    return Sequence([protocol])


def _tiff_preamble(text: str) -> bytes:
    """A 128-byte preamble that is also a little-endian TIFF header whose one IFD entry, (010E)
    ImageDescription, points at ``text`` (UTF-8) within the preamble."""
    description = text.encode("utf-8") + b"\0"
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 270, 2, len(description), 26) + b"\0" * 4
    preamble = b"II*\x00" + struct.pack("<I", 8) + ifd + description
    assert len(preamble) <= 128, len(preamble)
    return preamble.ljust(128, b"\0")


def _pixels(seed: int) -> np.ndarray:
    """A 64x64 chest-like 12-bit image: body, two darker lungs, a brighter spine, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:64, 0:64].astype(np.float64)
    image = 900.0 + 1400 * (((x - 32) / 30) ** 2 + ((y - 34) / 34) ** 2 < 1)
    for centre in (20, 44):
        image -= 900 * (((x - centre) / 9) ** 2 + ((y - 30) / 18) ** 2 < 1)
    image += 800 * (np.abs(x - 32) < 3)
    image += rng.normal(0, 60, size=image.shape)
    return np.clip(image, 0, 4095).astype(np.uint16)


def _dataset(export: Export, seed: int) -> FileDataset:
    """The export as a dataset with its file meta and preamble, ready to save."""
    patient, site = export.patient, export.patient.site
    sop_class = DX_STORAGE if site.modality == "DX" else CR_STORAGE
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, _uid(export, "sop")
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if export.implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = site.implementation_class_uid
    meta.ImplementationVersionName = site.version_name
    meta.SourceApplicationEntityTitle = site.ae_title
    preamble = _tiff_preamble(export.tiff_text) if export.tiff_text else b"\0" * 128
    ds = FileDataset(str(export.accession), Dataset(), file_meta=meta, preamble=preamble)
    charset = list(site.character_set)
    ds.SpecificCharacterSet = charset if len(charset) > 1 else charset[0]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, _uid(export, "sop")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = patient.study_date
    ds.StudyTime, ds.ContentTime = "101530", "101544"
    ds.AccessionNumber = export.accession
    ds.IssuerOfAccessionNumberSequence = Sequence([Dataset()])
    ds.IssuerOfAccessionNumberSequence[0].LocalNamespaceEntityID = site.ris_namespace
    ds.Modality, ds.Manufacturer = site.modality, site.manufacturer
    ds.InstitutionName, ds.InstitutionAddress = site.institution, site.address
    ds.ReferringPhysicianName = site.referring
    ds.StationName, ds.InstitutionalDepartmentName = site.station, site.department
    ds.OperatorsName = site.operator
    ds.ProcedureCodeSequence = Sequence([_code("RPT-CXR", LOCAL_SCHEME,
                                               patient.code_meaning)])
    ds.PatientName, ds.PatientID = patient.name, patient.patient_id
    ds.IssuerOfPatientID = site.issuer
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([_issuer(site)])
    ds.PatientBirthDate, ds.PatientSex, ds.PatientAge = patient.birth_date, patient.sex, patient.age
    ds.OtherPatientIDs, ds.PatientAddress = patient.other_id, patient.address
    ds.PatientTelephoneNumbers = patient.phone
    if patient.mother:
        ds.PatientMotherBirthName = patient.mother
    for keyword, text in patient.texts.items():
        setattr(ds, keyword, text)
    ds.BodyPartExamined, ds.ViewPosition = "CHEST", export.view
    ds.AnatomicRegionSequence = Sequence([_code("51185008", "SCT", "Chest")])
    ds.DeviceSerialNumber = site.serial
    ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(export, "study"), _uid(export, "series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = export.accession[-6:], 1, export.number
    request = Dataset()
    request.AccessionNumber, request.StudyInstanceUID = export.accession, _uid(export, "study")
    request.RequestedProcedureID = f"RP{export.accession[-6:]}"
    request.RequestedProcedureDescription = patient.request_meaning
    request.RequestedProcedureCodeSequence = Sequence([
        _code("RPT-CXR2", LOCAL_SCHEME, patient.request_meaning)])
    ds.ReferencedRequestSequence = Sequence([request])
    if export.unlisted_sequence:
        ds.PerformedProtocolCodeSequence = _unlisted_sequence(site)
    if export.private_text:
        block = ds.private_block(0x0029, f"{site.version_name} PRIVATE", create=True)
        block.add_new(0x10, "LO", export.private_text)
        block.add_new(0x11, "DA", patient.birth_date)
    ds.BurnedInAnnotation = "NO"
    pixels = _pixels(seed)
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = ds.ImagerPixelSpacing = [0.4, 0.4]
    ds.WindowCenter, ds.WindowWidth = 1500, 3000
    ds.PixelData = pixels.tobytes()
    if export.rle:
        ds.compress(RLELossless, pixels, encoding_plugin="pydicom", generate_instance_uid=False)
    return ds
