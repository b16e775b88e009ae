"""One source file de-identified, in a worker process: the per-file work of both passes.

Both functions take everything they need as arguments (the job, the settings and, for the second
pass, the identifying values of every source) and never raise: a file that cannot be done is
reported with its reason, so that one file never stops the others.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom

from dicomflow.config import layout
from dicomflow.config.params import DeidentifyParams
from dicomflow.deid.burned_in import TextFound, blank_regions, blank_text, burned_in_risk, read_burned_in_text
from dicomflow.deid.identifiers import Identifiers, collect_identifiers, describe_tag
from dicomflow.deid.leaks import leaks_in_file, leaks_in_pixels, leaks_in_values, summarise_leaks
from dicomflow.deid.manifest import dicom_file_name
from dicomflow.deid.profile import COUNT_KEYS, DeidOptions, ElementError, Profile, deidentify_dataset
from dicomflow.dicom.display import PixelSettings, read_image
from dicomflow.dicom.reading import Quarantined
from dicomflow.runtime.log_privacy import hidden_pydicom_messages
from dicomflow.runtime.outputs import out_of_space

# burned_in: the kinds of identifying value found in the pixels (or the header rule that applied
# to pixels that could not be read); text_*: the text regions read, blanked and kept.
AUDIT_COLUMNS = ("image_key", *COUNT_KEYS, "options", "text_regions", "text_blanked", "text_kept",
                 "burned_in", "burned_in_action")
# Manifest columns read from the header: the manifest takes them as written to the de-identified
# file (a value holding an identifier is replaced there), never from ingest's index.
WRITTEN_COLUMNS = {"modality": "Modality", "manufacturer": "Manufacturer",
                   "body_part": "BodyPartExamined", "view_position": "ViewPosition",
                   "photometric": "PhotometricInterpretation"}


class FileJob(NamedTuple):
    """One source file to de-identify: its path under ``data_dir`` (which holds an accession
    number: never shown), its first row in the ingest index (for a slice, its series' row) and
    its (0008,0018) SOP Instance UID. ``folder``: where under ``dicom_dir`` it is written, the
    series' key for a slice of a series (``ingest.unit: series``), "" for an image."""

    source: str
    first_row: int
    sop_uid: str
    folder: str = ""


@dataclass(frozen=True)
class FileSettings:
    """What de-identifying one file needs besides the file (pickled with each chunk of work)."""

    data_dir: Path
    dicom_dir: Path
    profile: Profile
    secret: bytes
    params: DeidentifyParams
    pixels: PixelSettings


@dataclass(frozen=True)
class FileOutcome:
    """One source file done: its audit row, whether it was left out, its images redone after
    blanking (frame index -> pixels), the pydicom warnings hidden and the values of
    :data:`WRITTEN_COLUMNS` as written (the manifest's, so the two never differ); or, for a file
    that could not be de-identified, ``failure``: (reason code, detail free of values)."""

    audit: dict | None
    excluded: bool = False
    frames: dict[int, np.ndarray] | None = None
    hidden_warnings: int = 0
    written: dict[str, str | None] | None = None
    failure: tuple[str, str] | None = None


def deid_options(params: DeidentifyParams) -> DeidOptions:
    """The profile options that ``deidentify.*`` params choose."""
    return DeidOptions(
        remove_private_tags=params.remove_private_tags,
        retain_patient_characteristics=params.retain_patient_characteristics,
        retain_longitudinal_dates=params.retain_longitudinal_dates,
        clean_descriptors=params.clean_descriptors,
        retain_device_identity=params.retain_device_identity,
        max_date_shift_days=params.max_date_shift_days)


def option_names(params: DeidentifyParams) -> str:
    """The audit's ``options`` cell: the profile and the options in use, by name."""
    options = deid_options(params)
    return ";".join(
        ["basic_profile"]
        + [name for name in ("retain_patient_characteristics", "retain_longitudinal_dates",
                             "clean_descriptors", "retain_device_identity") if getattr(options, name)]
        + ["remove_private_tags" if params.remove_private_tags else "keep_private_tags"])


def source_identifiers(job: FileJob, settings: FileSettings) -> Identifiers | tuple[str, str]:
    """The identifying values of one source file's header (the first of the two passes), or
    (reason, detail) when the file cannot be read again."""
    try:
        with hidden_pydicom_messages():
            return collect_identifiers(_read_source(job, settings, header_only=True),
                                       device_identity_kept=settings.params.retain_device_identity)
    except Quarantined as err:
        return err.reason, str(err)
    except RecursionError:
        return "too_deep", "sequences nest deeper than the header's values can be read (RecursionError)"
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  the message can quote a value: its type only
        return "unreadable_source", f"reading the header's values failed ({type(err).__name__})"


def deidentify_file(job: FileJob, identifiers: Identifiers, *, settings: FileSettings) -> FileOutcome:
    """De-identify one source file into ``dicom_dir/<key>.dcm`` (a slice of a series into
    ``dicom_dir/<series key>/<key>.dcm``), or leave it out for burned-in text; never raises.
    Kept text is checked against ``identifiers``, the identifying values of every source, so a
    manufacturer field typed with another patient's or the hospital's name is replaced here
    rather than found by the leak check.

    A file that cannot be read, de-identified or written gets ``failure`` (:func:`failure_of`),
    and nothing of it is left in ``dicom_dir``.

    A slice of a series (``job.folder``) meets the header rules (``BurnedInAnnotation`` YES, or a
    modality, image type or manufacturer listed in ``deidentify.burned_in_*``) even when the
    reader finds its pixels clean, since an acquired CT slice carries no annotation: it is left
    out, or has ``burned_in_regions`` blanked. Its series' volume is redone by the caller
    (:func:`~dicomflow.deid.passes.deidentify_sources`), not here.
    """
    output = settings.dicom_dir / job.folder / dicom_file_name(settings.secret, job.sop_uid)
    try:
        return _deidentify_file(job, settings, identifiers, output)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as err:  # noqa: BLE001  one file's failure is its own
        output.unlink(missing_ok=True)
        return FileOutcome(None, failure=failure_of(err))


def failure_of(err: BaseException) -> tuple[str, str]:
    """(reason, detail) of a file that could not be de-identified; the detail names the error
    type and the attribute, never a value."""
    if isinstance(err, Quarantined):
        return err.reason, str(err)
    if isinstance(err, ElementError):
        return ("too_deep" if err.error == "RecursionError" else "deid_failed"), str(err)
    if isinstance(err, WriteError):
        return "write_failed", str(err)
    if isinstance(err, LeakFound):
        return "leak_found", f"identifying values left after the profile (where, and what kind): {err}"
    if isinstance(err, RecursionError):
        return "too_deep", "sequences nest deeper than the profile can follow (RecursionError)"
    if cause := out_of_space(err):
        return "no_space", cause.strerror or type(cause).__name__
    return "deid_failed", f"{type(err).__name__} while de-identifying the file"


class LeakFound(Exception):
    """The written file (or its manifest values) still holds an identifying value of a source."""

    def __init__(self, leaks: list) -> None:
        super().__init__("; ".join(summarise_leaks(leaks)))


class WriteError(Exception):
    """The de-identified data set could not be encoded: the first attribute that fails, by tag."""


def _read_source(job: FileJob, settings: FileSettings, *, header_only: bool = False) -> pydicom.Dataset:
    """The source file of ``job``, read as ingest read it, or raise Quarantined (never quoting the
    path, which holds an accession number, or pydicom's message, which can quote values)."""
    try:
        ds = pydicom.dcmread(settings.data_dir / job.source, force=True, stop_before_pixels=header_only)
    except Exception as err:  # noqa: BLE001  pydicom raises many types
        raise Quarantined("unreadable_source", "the source file cannot be read again "
                          f"({type(err).__name__}); re-run ingest") from None
    if str(ds.get("SOPInstanceUID", "")) != job.sop_uid:
        raise Quarantined("source_changed", "the source file's (0008,0018) SOP Instance UID "
                          "differs from the index: it changed since ingest; re-run ingest")
    return ds


def _deidentify_file(job: FileJob, settings: FileSettings, identifiers: Identifiers,
                     output: Path) -> FileOutcome:
    params = settings.params
    with hidden_pydicom_messages() as hidden:
        ds = _read_source(job, settings)
        found, decision = _burned_in_text(ds, identifiers, params, slice_of_series=bool(job.folder))
        frames = None
        if decision == "blanked" and not job.folder:  # the images redone from the blanked pixels
            # (a series' volume is redone from all its slices once they are written: passes.py)
            frames = {frame.index: frame.pixels for frame in read_image(_as_file(ds), settings.pixels)[1]}
        counts, written = dict.fromkeys(COUNT_KEYS, 0), None
        excluded = decision.startswith("excluded")
        if not excluded:
            # The dataset was read for this alone: de-identified in place, not copied.
            ds, counts = deidentify_dataset(ds, profile=settings.profile, secret=settings.secret,
                                            options=deid_options(params), in_place=True,
                                            identifiers=identifiers)
            output.parent.mkdir(exist_ok=True)  # a series' folder (its first slice makes it)
            _write(ds, output)
            written = {column: str(ds.get(keyword, "") or "") for column, keyword in WRITTEN_COLUMNS.items()}
            written["manufacturer"] = written["manufacturer"] or None
            # The leak check of this file, read back (its pixels read for text again), and of
            # what the manifest takes from it.
            leaks = (leaks_in_file(identifiers, output, output=output.name)
                     + leaks_in_pixels(identifiers, output, output=output.name)
                     + leaks_in_values(identifiers, layout.DEID_MANIFEST, written))
            if leaks:
                raise LeakFound(leaks)
    blanked = len(found.blanked)
    # A slice's audit row names its file under the series' folder: <series key>/<slice key>.
    audit = {"image_key": f"{job.folder}/{output.stem}" if job.folder else output.stem, **counts,
             "options": option_names(params),
             "text_regions": len(found.judgements),
             "text_blanked": blanked, "text_kept": len(found.judgements) - blanked,
             "burned_in": found.unread or found.kinds(), "burned_in_action": decision}
    return FileOutcome(audit, excluded, frames, len(hidden), written)


def _burned_in_text(ds: pydicom.Dataset, identifiers: Identifiers, params: DeidentifyParams, *,
                    slice_of_series: bool = False) -> tuple[TextFound, str]:
    """Read ``ds``'s pixels for text and act on what is identifying (``burned_in_action``:
    blank it in ``ds``, or leave the file out); pixels the reader cannot handle fall back on the
    header rules. Returns what was found and the decision ("blanked", "excluded..." or "").

    A slice of a series (``slice_of_series``) meets the header rules even when the reader finds
    its pixels clean: an acquired CT slice carries no annotation, so a slice flagged (0028,0301)
    Burned In Annotation YES, or of a listed modality, image type or manufacturer, was made by
    a workstation, and the reader (built for text on radiographs and screen captures) reads each
    slice alone. Such a slice is left out (and with it its series), or has ``burned_in_regions``
    blanked (and any identifying text the reader found)."""
    found, frames = read_burned_in_text(ds, identifiers, params.burned_in_text)
    if slice_of_series and not found.unread and (rule := burned_in_risk(ds, params)):
        found = TextFound(found.judgements, unread=f"{found.kinds() or 'no identifying text read'}; "
                                                   f"header rule: {rule}")
        if not params.burned_in_regions or (found.blanked and params.burned_in_action == "exclude"):
            return found, "excluded"

        def blank_both() -> None:
            if found.blanked:
                blank_text(ds, frames, found)
            blank_regions(ds, params.burned_in_regions)
        return found, _blanked(blank_both)
    if found.unread:
        rule = burned_in_risk(ds, params)
        found = TextFound(unread=f"{found.unread}; header rule: {rule or 'none applies'}")
        if not rule:
            return found, ""
        if params.burned_in_regions:
            return found, _blanked(lambda: blank_regions(ds, params.burned_in_regions))
        return found, "excluded"
    if not found.blanked:
        return found, ""
    if params.burned_in_action == "exclude":
        return found, "excluded"
    return found, _blanked(lambda: blank_text(ds, frames, found))


def _blanked(blanking) -> str:
    """"blanked" once ``blanking()`` has rewritten the pixels, or why the file is left out."""
    try:
        blanking()
    except Exception as err:  # noqa: BLE001  a file whose pixels cannot be rewritten is left out
        return f"excluded: blanking failed ({type(err).__name__})"
    return "blanked"


def _write(ds: pydicom.Dataset, path: Path) -> None:
    """``ds.save_as(path)``, or WriteError naming the first top-level attribute pydicom cannot
    encode (found by encoding each alone, only once the file as a whole has failed)."""
    try:
        ds.save_as(path, enforce_file_format=True)
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001  pydicom's message can quote the value
        path.unlink(missing_ok=True)
        raise WriteError(f"{type(err).__name__} writing {_unwritable(ds) or 'the file'}") from None


def _unwritable(ds: pydicom.Dataset) -> str:
    """The first top-level element of ``ds`` that pydicom fails to encode, as a tag and name."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_data_element

    syntax = pydicom.uid.UID(ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ExplicitVRLittleEndian))
    for elem in ds:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = syntax.is_little_endian, syntax.is_implicit_VR
        try:
            write_data_element(buffer, elem)
        except Exception:  # noqa: BLE001  this is the one
            return describe_tag(elem.tag)
    return ""


def _as_file(ds: pydicom.Dataset) -> io.BytesIO:
    """``ds`` written to memory, to be read back as ingest reads a file."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer
