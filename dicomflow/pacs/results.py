"""Predictions as DICOM objects a PACS and its viewers can hold: for each image the model
answered, a Comprehensive 3D SR with the finding and its probability and a FRACTIONAL
Segmentation with the model's Grad-CAM map on the image's own pixel grid.

    dicomflow predict INPUT... --output predictions.csv --dicom-out DIR   (dicomflow/cli.py)

Inputs: the loaded pyfunc model (``dicomflow.serving.pyfunc.DicomClassifier``), the files it was
given and :func:`dicomflow.serving.predict.predict_files`' rows for them (same order), the
registered model's name and version.
Outputs: under ``DIR``, ``<SOP Instance UID>.dcm`` for each SR and each SEG, never named after
the source; per file the two paths, or the reason none were written (:class:`DicomResult`).
What the objects hold, and what is left out: docs/dicom-results.md.

Both objects belong to the source's patient and study (highdicom copies the Patient and General
Study modules from it) in new series with new UIDs. A source whose type 2 patient or study
attributes are absent gets none (``missing_patient_study``), as does a multi-frame source
(``multi_frame``: which frame a map belongs to is not recorded yet) and every file of a volume
model (``volume_model``). Log lines carry counts only: names, UIDs and paths of sources are PHI
(dicomflow/runtime/log_privacy.py), and highdicom's own log (which quotes the source's SOP
Instance UID) is silenced while the objects are made.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata as package_metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from PIL import Image

from dicomflow.dicom.display import PixelSettings, number_of_frames, pixel_spacing
from dicomflow.dicom.reading import Quarantined, failure_reason, quoted, read_dataset
from dicomflow.runtime.log_privacy import hidden_pydicom_messages

logger = logging.getLogger(__name__)

# The project's own classes have no standard code: a private coding scheme ("99" prefix, PS3.16
# 8.2), declared in each SR's Coding Scheme Identification Sequence.
PRIVATE_SCHEME = "99DICOMFLOW"
PRIVATE_SCHEME_NAME = "dicomflow model classes"
SR_SERIES_NUMBER = 9901   # high, as derived series usually are, so they sort after the acquisition
SEG_SERIES_NUMBER = 9902
MANUFACTURER = "dicomflow"
# Type 2 attributes highdicom reads from the source for the new objects' Patient and General
# Study modules: absent (not empty), it raises AttributeError.
PATIENT_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                          "StudyDate", "StudyTime", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class DicomResult:
    """What was written for one file: ``[sr_path, seg_path]``, or ``[]`` and ``reason``
    (``<code>: <detail>``, e.g. ``missing_patient_study: ...``)."""

    paths: list[Path] = field(default_factory=list)
    reason: str = ""

    def describe(self, out_dir: Path | None = None) -> str:
        """The CSV's ``dicom_results`` text: the files' names (relative to ``out_dir``), SR first,
        separated by a space, or the reason."""
        if not self.paths:
            return self.reason
        return " ".join(str(path.relative_to(out_dir)) if out_dir else path.name for path in self.paths)


@dataclass(frozen=True)
class Finding:
    """One file's answer as the SR states it.

    ``task``: binary, multiclass or ordinal; ``classes`` in output order; ``label`` the class
    called; ``probability`` the calibrated probability reported (binary: of ``classes[1]``; else
    of ``label``); ``threshold`` the operating threshold (binary; None otherwise);
    ``class_probabilities`` each class's probability (tasks with more than two outputs; empty
    for binary); ``referable_probability`` an ordinal model's P(grade >= referable grade) or None.
    """

    task: str
    classes: tuple[int, ...]
    label: int
    probability: float
    threshold: float | None = None
    class_probabilities: Mapping[int, float] = field(default_factory=dict)
    referable_probability: float | None = None

    @property
    def positive(self) -> bool:
        """Binary: whether the positive class is called (probability at or above the threshold)."""
        return self.label == self.classes[-1]


@dataclass(frozen=True)
class Placement:
    """Where a source image lies in the model's input (:func:`dicomflow.dicom.display.image_frames`).

    The source (``rows`` x ``columns``) is resized to ``scaled`` (rows, columns), then that image's
    window ``[top, top + height) x [left, left + width)`` is placed at ``(input_top, input_left)``
    of the model's ``size`` x ``size`` input (the rest of the input is padding; the rest of the
    scaled image, when it was cropped, the model never saw).
    """

    rows: int
    columns: int
    scaled: tuple[int, int]
    top: int
    left: int
    input_top: int
    input_left: int
    height: int
    width: int
    size: int


def placement(rows: int, columns: int, settings: PixelSettings,
              spacing: tuple[float, float] | None = None) -> Placement:
    """How :func:`dicomflow.dicom.display.image_frames` fits a ``rows`` x ``columns`` image into
    ``settings.size``: scaled with its aspect kept and centred (``resize_with_padding``), or with
    ``settings.target_spacing_mm`` resampled to that spacing and centred, padded or cropped
    (``pad_or_crop(resample_to_spacing(...))``), with the same roundings.

    Raises
    ------
    ValueError
        ``target_spacing_mm`` is set and ``spacing`` (row, column mm) is not given.
    """
    size = settings.size
    if settings.target_spacing_mm is None:
        scale = size / max(rows, columns)
        scaled = (max(1, round(rows * scale)), max(1, round(columns * scale)))
    else:
        if spacing is None:
            raise ValueError("settings.target_spacing_mm is set but no pixel spacing was given: the image's "
                             "(0028,0030) Pixel Spacing or (0018,1164) Imager Pixel Spacing is needed")
        target = settings.target_spacing_mm
        scaled = (max(1, round(rows * spacing[0] / target)), max(1, round(columns * spacing[1] / target)))
    # pad_or_crop's arithmetic, per axis
    top, left = max(0, (scaled[0] - size) // 2), max(0, (scaled[1] - size) // 2)
    input_top, input_left = max(0, (size - scaled[0]) // 2), max(0, (size - scaled[1]) // 2)
    return Placement(rows, columns, scaled, top, left, input_top, input_left,
                     min(scaled[0], size), min(scaled[1], size), size)


def source_grid_map(heatmap: np.ndarray, ds: pydicom.Dataset, settings: PixelSettings) -> np.ndarray:
    """A map on the model's input grid (``settings.size`` square, e.g. :func:`grad_cam`'s) brought
    back onto the source's pixel grid, (Rows, Columns) float32 in [0, 1].

    The inverse of :func:`placement`: the padding is dropped, the part of the scaled image the
    model saw is put back where it was (parts cropped away stay 0) and the result is resized
    bilinearly to Rows x Columns (pixel centres aligned, as the forward resize aligns them).

    Raises
    ------
    ValueError
        ``heatmap`` not ``settings.size`` square, or no pixel spacing while
        ``settings.target_spacing_mm`` is set.
    """
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.shape != (settings.size, settings.size):
        raise ValueError(f"heatmap must be ({settings.size}, {settings.size}), the model's input grid "
                         f"(ingest.image_size); got {heatmap.shape}")
    where = placement(int(ds.Rows), int(ds.Columns), settings, pixel_spacing(ds))
    scaled = np.zeros(where.scaled, np.float32)
    scaled[where.top:where.top + where.height, where.left:where.left + where.width] = \
        heatmap[where.input_top:where.input_top + where.height, where.input_left:where.input_left + where.width]
    if scaled.shape == (where.rows, where.columns):
        return np.clip(scaled, 0.0, 1.0)
    resized = Image.fromarray(scaled).resize((where.columns, where.rows), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def missing_patient_study(ds: pydicom.Dataset) -> list[str]:
    """The :data:`PATIENT_STUDY_KEYWORDS` absent from ``ds`` (keywords only, never values)."""
    return [keyword for keyword in PATIENT_STUDY_KEYWORDS if keyword not in ds]


def finding_of(row: Mapping, model_metadata: Mapping) -> Finding:
    """A predictions row (:func:`predict_files`, no error) and the model's metadata (``classes``,
    ``threshold``, ``task``) as a :class:`Finding`.

    Raises
    ------
    ValueError
        The metadata names no classes, or the row lacks the probability columns they imply.
    """
    classes = tuple(int(c) for c in model_metadata.get("classes") or ())
    if len(classes) < 2:
        raise ValueError(f"the model's metadata names classes {list(classes)}: at least two are needed to "
                         "report a finding (a model logged without dicomflow's metadata)")
    label = int(row["label"])
    if "probability" in row:
        task = "binary"
        threshold = model_metadata.get("threshold")
        return Finding(task, classes, label, float(row["probability"]),
                       None if threshold is None else float(threshold))
    missing = [f"probability_{c}" for c in classes if f"probability_{c}" not in row]
    if missing:
        raise ValueError(f"the predictions row lacks {', '.join(missing)} for the model's classes {list(classes)}")
    per_class = {c: float(row[f"probability_{c}"]) for c in classes}
    referable = row.get("referable_probability")
    return Finding(str(model_metadata.get("task") or "multiclass"), classes, label, per_class[label],
                   class_probabilities=per_class,
                   referable_probability=None if referable is None or pd.isna(referable) else float(referable))


def class_code(label: int):
    """The private code of class ``label`` (:data:`PRIVATE_SCHEME`)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=f"CLASS-{label}", scheme_designator=PRIVATE_SCHEME, meaning=f"class {label}")


def class_probability_code(label: int):
    """The private code of "probability of class ``label``" (:data:`PRIVATE_SCHEME`)."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value=f"P-CLASS-{label}", scheme_designator=PRIVATE_SCHEME,
                        meaning=f"probability of class {label}")


def referable_probability_code():
    from highdicom.sr import CodedConcept

    return CodedConcept(value="P-REFERABLE", scheme_designator=PRIVATE_SCHEME,
                        meaning="probability of a referable grade")


def algorithm_identification(model_name: str, model_version: str):
    """TID 4019 Algorithm Identification for the SR: the registered model's name and version,
    family Artificial Intelligence (DCM 123110)."""
    from highdicom.sr import AlgorithmIdentification
    from pydicom.sr.codedict import codes

    return AlgorithmIdentification(name=model_name, version=model_version, family=codes.DCM.ArtificialIntelligence)


def dicomflow_version() -> str:
    """The installed dicomflow's version, or ``unknown`` (a source checkout not installed)."""
    try:
        return package_metadata.version("dicomflow")
    except package_metadata.PackageNotFoundError:
        return "unknown"


def structured_report(source: pydicom.Dataset, finding: Finding, *, model_name: str, model_version: str,
                      software_version: str | None = None):
    """A Comprehensive 3D SR (TID 1500 Measurement Report) of ``finding`` for ``source``.

    Parameters
    ----------
    source : pydicom.Dataset
        The image predicted (single frame), with its patient and study attributes.
    finding : Finding
        The model's answer (:func:`finding_of`).
    model_name, model_version : str
        The registered model: the device observer's model name, the algorithm's name and version.
    software_version : str or None
        dicomflow's version (None: :func:`dicomflow_version`), in Software Versions.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        New series and SOP Instance UIDs; the observer device dicomflow; one image-level
        measurement group (TID 1501) referencing ``source``: the finding (binary: the positive
        class's code, value Present or Absent; otherwise Classification (SCT 278201002), value
        the class called), the
        probability (DCM 122157), the threshold (DCM 122411, binary), each class's probability
        and an ordinal model's referable probability (private codes), all unit UCUM ``1``.

    Raises
    ------
    ValueError, AttributeError
        highdicom's, for a source it cannot reference (see :func:`missing_patient_study`).
    """
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from highdicom.sr import (
        Comprehensive3DSR,
        DeviceObserverIdentifyingAttributes,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        SourceImageForMeasurementGroup,
        TrackingIdentifier,
    )
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    version = software_version or dicomflow_version()
    algorithm = algorithm_identification(model_name, model_version)
    # One UID per model version: the same device reports every file the version answers.
    device_uid = generate_uid(entropy_srcs=["dicomflow", model_name, model_version])
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid, name="dicomflow", manufacturer_name=MANUFACTURER, model_name=model_name))
    unit = codes.UCUM.NoUnits
    if finding.task == "binary":
        evaluations = [QualitativeEvaluation(class_code(finding.classes[-1]),
                                             codes.SCT.Present if finding.positive else codes.SCT.Absent)]
    else:
        # Not DCM 121071 Finding: TID 1501 keeps that concept name for the group's finding type.
        evaluations = [QualitativeEvaluation(codes.SCT.Classification, class_code(finding.label))]
    measurements = [Measurement(codes.DCM.Probability, finding.probability, unit, algorithm_id=algorithm)]
    if finding.threshold is not None:
        measurements.append(Measurement(codes.DCM.ThresholdValue, finding.threshold, unit))
    measurements += [Measurement(class_probability_code(c), p, unit, algorithm_id=algorithm)
                     for c, p in finding.class_probabilities.items()]
    if finding.referable_probability is not None:
        measurements.append(Measurement(referable_probability_code(), finding.referable_probability, unit,
                                        algorithm_id=algorithm))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier="dicomflow prediction"),
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=evaluations,
        source_images=[SourceImageForMeasurementGroup.from_source_image(source)],
    )
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=[group],
    )
    return Comprehensive3DSR(
        evidence=[source],
        content=report,
        series_instance_uid=hd.UID(),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"dicomflow {model_name} v{model_version} prediction"[:64],
        manufacturer_model_name=model_name[:64],
        software_versions=f"dicomflow {version}"[:64],
        coding_schemes=[CodingSchemeIdentificationItem(designator=PRIVATE_SCHEME, name=PRIVATE_SCHEME_NAME,
                                                       responsible_organization="dicomflow")],
    )


def probability_segmentation(source: pydicom.Dataset, probability_map: np.ndarray, *, model_name: str,
                             model_version: str, label: str, software_version: str | None = None):
    """A FRACTIONAL (PROBABILITY) Segmentation of ``probability_map`` over ``source``.

    Parameters
    ----------
    source : pydicom.Dataset
        The image predicted (single frame).
    probability_map : ndarray (Rows, Columns)
        Values in [0, 1] on the source's grid (:func:`source_grid_map`); stored as 0-255.
    model_name, model_version : str
        The segment's algorithm (AUTOMATIC, family Artificial Intelligence) and the equipment's model.
    label : str
        The segment's label (e.g. ``Grad-CAM class 1``).
    software_version : str or None
        dicomflow's version (None: :func:`dicomflow_version`).

    Returns
    -------
    highdicom.seg.Segmentation
        One segment, category Visual explanation (DCM 130401), type Gradient-weighted class
        activation (DCM 130403); new series and SOP Instance UIDs. A source with a patient
        coordinate system gives its frame of reference, plane and pixel measures; one without
        (a radiograph, a secondary capture) its Patient Orientation (:func:`segmentation_source`).

    Raises
    ------
    ValueError
        ``probability_map`` not (Rows, Columns) of the source, or highdicom's own checks.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    rows, columns = int(source.Rows), int(source.Columns)
    probability_map = np.asarray(probability_map, dtype=np.float32)
    if probability_map.shape != (rows, columns):
        raise ValueError(f"probability_map must be the source's grid ({rows}, {columns}); got "
                         f"{probability_map.shape}: bring a model-grid map back with source_grid_map")
    algorithm = hd.AlgorithmIdentificationSequence(name=model_name, family=codes.DCM.ArtificialIntelligence,
                                                   version=model_version)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label[:64],
        segmented_property_category=codes.DCM.VisualExplanation,
        segmented_property_type=codes.DCM.GradientWeightedClassActivation,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    version = software_version or dicomflow_version()
    segmentation = hd.seg.Segmentation(
        source_images=[segmentation_source(source)],
        pixel_array=np.clip(probability_map, 0.0, 1.0)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        segment_descriptions=[segment],
        series_instance_uid=hd.UID(),
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=model_name[:64],
        software_versions=f"dicomflow {version}"[:64],
        device_serial_number=model_version[:64],
        series_description=f"dicomflow {model_name} v{model_version} Grad-CAM"[:64],
        content_description="Grad-CAM map of the model's answer",
        omit_empty_frames=False,  # a map with no positive evidence is still the answer's map
    )
    if "ImageOrientationPatient" not in source and "PatientOrientation" not in segmentation:
        # A projection image (a radiograph, a photograph): the SEG's frame is the source's grid,
        # so the source's orientation is its own (General Image, type 2C; empty when unknown).
        segmentation.PatientOrientation = source.get("PatientOrientation", "")
    return segmentation


def utf8_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` with its text decoded and its Specific Character Set ``ISO_IR 192`` (UTF-8) when
    it declares several (ISO 2022 code extensions, e.g. ``\\ISO 2022 IR 87`` for Japanese names):
    highdicom refuses such a set, and the objects copy the patient's name, which must keep its
    characters. A single set (``ISO_IR 100``, ``ISO_IR 192``...) is kept as it is. The caller's
    dataset is not changed.

    Returns
    -------
    pydicom.Dataset
        ``source`` itself, or a copy in UTF-8.
    """
    declared = source.get("SpecificCharacterSet")
    if not isinstance(declared, pydicom.multival.MultiValue) or len(declared) < 2:
        return source
    copy = pydicom.Dataset(source)
    copy.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    copy.decode()  # every text value to str, read with the declared sets
    copy.SpecificCharacterSet = "ISO_IR 192"
    return copy


def write_new(target: Path, dataset: pydicom.Dataset) -> Path:
    """``dataset`` as a new file at ``target``: refused (FileExistsError) when anything is there, a
    symbolic link included, so that a link planted in the output folder under an object's name
    never sends the object elsewhere. Returns ``target``."""
    import io
    import os

    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(buffer.getvalue())
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    return target


def segmentation_source(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` as highdicom should see it to copy its geometry into a SEG of the same grid.

    A source with a patient coordinate system ((0020,0037) Image Orientation (Patient): CT, MR)
    as it is. Without one (a radiograph, a secondary capture) the SEG is placed by the source's
    pixel grid alone (it references the source, Rows x Columns the same), and its Frame of
    Reference UID and Pixel Spacing are left out: highdicom would write Pixel Measures without a
    Slice Thickness, which such files lack, and that dciodvfy refuses with a frame of reference
    and highdicom 0.28 cannot read back (``segread``) without one. A shallow copy: the caller's
    dataset is not changed.
    """
    copy = pydicom.Dataset(source)
    copy.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    if "ImageOrientationPatient" in source:
        return copy
    for keyword in ("FrameOfReferenceUID", "PositionReferenceIndicator", "PixelSpacing"):
        if keyword in copy:
            del copy[keyword]
    return copy


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """highdicom logs the source's SOP Instance UID at INFO (from ``highdicom.base`` and other
    children, which a disabled parent does not silence: a level above CRITICAL does); pydicom's
    warnings quote values."""
    highdicom_logger = logging.getLogger("highdicom")
    was_level = highdicom_logger.level
    highdicom_logger.setLevel(logging.CRITICAL + 1)
    try:
        with hidden_pydicom_messages():
            yield
    finally:
        highdicom_logger.setLevel(was_level)


def dicom_results(model, files: Sequence[Path], predictions: pd.DataFrame, out_dir: Path, *,
                  model_name: str, model_version: str) -> list[DicomResult]:
    """For each file, the SR and SEG written under ``out_dir`` (``<SOP Instance UID>.dcm``) or why not.

    Parameters
    ----------
    model : mlflow.pyfunc.PyFuncModel
        The loaded model (its python model a ``DicomClassifier``).
    files : sequence of Path
        The files predicted, in ``predictions``' order.
    predictions : pandas.DataFrame
        :func:`dicomflow.serving.predict.predict_files`' rows for ``files`` (one each, same order).
    out_dir : Path
        Made when missing.
    model_name, model_version : str
        The registered model's name and version (:func:`dicomflow.signing.resolve_version`).

    Returns
    -------
    list of DicomResult
        One per file: ``paths`` [sr, seg], or none and ``reason``: ``not_predicted`` (the row's
        error says why), ``volume_model``, ``multi_frame``, ``missing_patient_study``,
        ``no_grad_cam`` (the network has no feature map to explain), a reader's code (the file
        changed since it was predicted), or ``not_written`` (highdicom refused the source, or the
        model's metadata names no classes; the message).

    Raises
    ------
    ValueError
        ``predictions`` and ``files`` of different lengths.
    """
    if len(files) != len(predictions):
        raise ValueError(f"predictions has {len(predictions)} rows for {len(files)} files: give predict_files' "
                         "rows for exactly these files, in their order")
    from dicomflow.evaluation.explain import grad_cam

    classifier = model.unwrap_python_model()
    model_metadata = model.metadata.metadata or {}
    settings: PixelSettings = classifier.settings
    rows = predictions.to_dict("records")
    results: list[DicomResult] = []
    if model_metadata.get("volume"):
        reason = ("volume_model: DICOM objects are written for image models only; this model scores CT series "
                  "(see docs/dicom-results.md)")
        return [DicomResult(reason=not_predicted(row) or reason) for row in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    for path, row in zip(files, rows):
        refused = not_predicted(row)
        if refused:
            results.append(DicomResult(reason=refused))
            continue
        try:
            with _quiet_libraries():
                results.append(_one_file(Path(path), row, classifier, model_metadata, settings, out_dir,
                                         model_name=model_name, model_version=model_version, grad_cam=grad_cam))
        except Quarantined as err:
            results.append(DicomResult(reason=f"{err.reason}: {err}"))
    return results


def not_predicted(row: Mapping) -> str:
    """The reason a row gets no objects because it has no answer, or ""."""
    error = row.get("error")
    if isinstance(error, str) and error:
        return "not_predicted: the file has no prediction (its error column says why)"
    return ""


def _one_file(path: Path, row: Mapping, classifier, model_metadata: Mapping, settings: PixelSettings,
              out_dir: Path, *, model_name: str, model_version: str, grad_cam) -> DicomResult:
    try:
        source = read_dataset(path, max_bytes=settings.max_bytes)
    except Quarantined:
        raise
    except Exception as err:  # noqa: BLE001  predicted a moment ago: changed or gone since
        raise failure_reason(err, reading="the file") from None
    if number_of_frames(source) > 1:
        return DicomResult(reason=f"multi_frame: the file has {number_of_frames(source)} frames; objects are "
                           "written for single-frame images only (which frame a map shows is not recorded)")
    source = utf8_source(source)
    missing = missing_patient_study(source)
    if missing:
        return DicomResult(reason=f"missing_patient_study: the file lacks {', '.join(missing)} (type 2: present, "
                           "even empty): the objects copy the source's patient and study, so none were "
                           "written; keep these attributes in the exported files")
    try:
        finding = finding_of(row, model_metadata)
    except ValueError as err:
        return DicomResult(reason=f"not_written: {quoted(err)}")
    network = classifier._model
    images = classifier.read_pixels(path)
    # Binary: always the positive class's evidence (its map is the one a reader checks, called
    # or not); otherwise the class called.
    class_index = None if finding.task == "binary" else finding.classes.index(finding.label)
    try:
        heatmap = grad_cam(network, images, class_index=class_index)[0]
    except ValueError as err:
        return DicomResult(reason=f"no_grad_cam: {quoted(err)}")
    probability_map = source_grid_map(heatmap, source, settings)
    explained = finding.classes[-1] if class_index is None else finding.label
    try:
        report = structured_report(source, finding, model_name=model_name, model_version=model_version)
        segmentation = probability_segmentation(source, probability_map, model_name=model_name,
                                                model_version=model_version, label=f"Grad-CAM class {explained}")
    except (ValueError, TypeError, AttributeError, KeyError) as err:
        return DicomResult(reason=f"not_written: highdicom refused the source ({type(err).__name__}: "
                           f"{quoted(str(err).splitlines()[0] if str(err) else '')})")
    written = []
    try:
        for dataset in (report, segmentation):
            written.append(write_new(out_dir / f"{dataset.SOPInstanceUID}.dcm", dataset))
    except FileExistsError:
        for path in written:
            path.unlink(missing_ok=True)
        return DicomResult(reason="not_written: a file (or link) is already there under the new object's name; "
                           "give an empty --dicom-out folder")
    return DicomResult(paths=written)


def describe_results(results: Sequence[DicomResult]) -> str:
    """``wrote 3 SR and 3 SEG for 5 files; 2 files without (1 not_predicted, 1 multi_frame)``:
    counts and reason codes only."""
    written = sum(1 for result in results if result.paths)
    line = f"wrote {written} SR and {written} SEG for {len(results)} files"
    reasons = Counter(result.reason.split(":", 1)[0] for result in results if not result.paths)
    if reasons:
        line += f"; {sum(reasons.values())} files without ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})"
    return line


def write_dicom_results(model, files: Sequence[Path], predictions: pd.DataFrame, out_dir: Path, *,
                        model_name: str, model_version: str) -> list[list[Path]]:
    """For each file (``predictions``: :func:`predict_files`' rows in the same order):
    ``[sr_path, seg_path]`` written under ``out_dir``, or ``[]`` where the row has an error or
    the objects could not be made (the reasons, by code, in one log line; :func:`dicom_results`
    gives them per file).

    Raises
    ------
    ValueError
        ``predictions`` and ``files`` of different lengths.
    """
    results = dicom_results(model, files, predictions, out_dir, model_name=model_name, model_version=model_version)
    logger.info("%s", describe_results(results))
    return [list(result.paths) for result in results]
