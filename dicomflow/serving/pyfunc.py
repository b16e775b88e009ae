"""The registered model: an MLflow pyfunc that reads DICOM the way ingest does, then classifies.

:class:`DicomClassifier` wraps the trained Keras model with everything prediction needs: the
ingest pixel settings (``dicomflow.dicom.display.PixelSettings``), the operating threshold chosen by
evaluate, the class labels and optionally the training domain. Given DICOM files (paths or raw
bytes) it makes the pixels with ``dicomflow.dicom`` (``read_dataset`` then ``image_frames``, what
``read_image`` does), exactly as the training images were made, so a served model and the
pipeline cannot drift apart; given images already preprocessed it scales them as train does.
With a :class:`dicomflow.serving.domain.TrainingDomain` it refuses, from the header and before decoding, a
file unlike those it was trained on (``out_of_domain``: an MR sent to a radiograph model).

:func:`log_classifier` logs it into the active MLflow run with a signature, pinned requirements
and, as ``code_paths``, a copy of the parts of the ``dicomflow`` package that prediction needs
(:data:`SHIPPED`, :func:`write_code_package`): the model's files are searched by the leak scanner, and
``dicomflow/devtools/sample_data.py`` holds the fake names of the sample data set.

Serving: ``mlflow models serve -m models:/<name>@champion --env-manager local`` answers
``POST /invocations`` with ``{"dataframe_split": {"columns": ["dicom"], "data": [[<base64>]]}}``:
the signature declares ``dicom`` as a binary column, which is what makes the scoring server
base64-decode it (``path``, a string column, names files on the server's own disk).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import shutil
import tempfile
import threading
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.dicom.display import PixelSettings, read_model_frames
from dicomflow.dicom.reading import Quarantined
from dicomflow.runtime.parallel import WorkerPool, WorkFailure
from dicomflow.serving.domain import TrainingDomain

logger = logging.getLogger(__name__)

KERAS_ARTIFACT = "keras_model"
# What of the package a logged model carries: prediction and what it imports (a test checks that
# their imports stay inside this list). Never the developer tools: the sample generator holds the
# sample's fake identifying values, and the leak scanner reads the models' files.
SHIPPED = ("__init__.py", "config", "dicom", "runtime", "serving", "tracking.py")
# What prediction needs installed (dicomflow.dicom's imports included), pinned to what is installed.
REQUIREMENTS = ("keras", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                "pylibjpeg-rle", "numpy", "pandas", "pyarrow", "pillow", "pyyaml", "tqdm")
PREDICT_BATCH = 64  # images per Keras call
DECODER_PROCESSES = 2  # files decoded at once, each in its own process
DECODE_TIMEOUT_S = 120.0  # a file still decoding after this long is answered with "timeout"


class DicomClassifier(mlflow.pyfunc.PythonModel):
    """A Keras image classifier behind ingest's DICOM reader; one output row per input row.

    Parameters
    ----------
    settings : PixelSettings
        The ``ingest`` params the model was trained with (size, channels, frames, VOI, spacing,
        stored dtype).
    threshold : float in [0, 1] or None
        Operating threshold of a binary (single sigmoid output) model, required there: ``label``
        is the second class when ``probability >= threshold``. A softmax model ignores it (None).
    classes : list of int
        Class labels in output order: two for a sigmoid output (its probability is that of
        ``classes[1]``), one per output unit for a softmax output.
    domain : TrainingDomain or None, default None
        What the training files were. When set, every DICOM file (path or bytes) is checked
        against it once its header is read, before its pixels are decoded: one outside gets the
        error ``out_of_domain: <detail>`` and no probability. Preprocessed arrays carry no
        header and are not checked.

    Notes
    -----
    Multi-frame files give the frame(s) ``settings.frames`` picks, as in ingest: the first or
    middle frame, or with ``all`` every frame, each scored and the probabilities averaged (ingest
    labels every frame with its file's label, so the mean is the model's estimate for the file).
    """

    def __init__(self, *, settings: PixelSettings, threshold: float | None, classes: list[int],
                 domain: TrainingDomain | None = None) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a float in [0, 1] or None; got {threshold!r}")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes must list at least two distinct labels; got {classes!r}")
        self.settings = settings
        self.threshold = None if threshold is None else float(threshold)
        self.classes = [int(c) for c in classes]
        self.domain = domain
        self._model = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the Keras model from the model's artifacts and check it against classes and threshold."""
        self.load(context.artifacts[KERAS_ARTIFACT])

    def load(self, keras_model_path: str | Path) -> DicomClassifier:
        """Load the Keras model at ``keras_model_path`` (what MLflow does from the artifacts), check
        it against classes and threshold, and return self: the classifier without MLflow."""
        import keras

        self._model = keras.models.load_model(keras_model_path, compile=False)
        check_output_width(self._width(), self.classes, threshold=self.threshold)
        return self

    def __getstate__(self) -> dict:
        # The Keras model travels as an artifact; decoder processes and their lock are this
        # process's own.
        return {**self.__dict__, "_model": None, "_pool": None, "_lock": None}

    @property
    def binary(self) -> bool:
        return self._width() == 1

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Class probabilities, label and error per input row.

        Parameters
        ----------
        context : PythonModelContext
            Unused (the model is loaded by :meth:`load_context`).
        model_input : pandas.DataFrame or numpy.ndarray
            A DataFrame with a ``dicom`` column (file content as bytes, or base64 text) and/or a
            ``path`` column (file paths); a row uses its ``dicom`` value when it has one. Or
            preprocessed images (n, h, w) or (n, h, w, c) of ``settings.image_shape``: uint8
            0-255 or float in [0, 1]. (Annotated DataFrame, the form MLflow passes: its
            signature describes the DataFrame, and a union would make MLflow warn at import.)
        params : dict, optional
            Unused.

        Returns
        -------
        pandas.DataFrame
            :func:`output_columns`, one row per input row (a DataFrame's index kept). A file that
            cannot be used gets probability NaN, label -1 and ``error`` "<reason>: <detail>"
            (ingest's quarantine reason codes, e.g. ``not_dicom``, ``truncated``, or
            ``out_of_domain`` for a file outside :attr:`domain`); the other rows are predicted.
            ``error`` is empty when fine.

        Raises
        ------
        ValueError
            A DataFrame without a ``path`` or ``dicom`` column; images of the wrong shape or range.
        """
        if isinstance(model_input, np.ndarray):
            scores = self._score(self.prepare_images(model_input))
            return self._frame(scores, [""] * len(model_input), index=pd.RangeIndex(len(model_input)))
        if not isinstance(model_input, pd.DataFrame):
            raise ValueError("model_input must be a pandas DataFrame (path or dicom column) or a numpy "
                             f"array of images; got {type(model_input).__name__}")
        if not {"path", "dicom"} & set(model_input.columns):
            raise ValueError("model_input needs a 'path' column (DICOM file paths) or a 'dicom' column "
                             f"(DICOM file bytes); got columns {list(model_input.columns)}")
        images, owners, errors = self._read_all(_sources(model_input))
        scores = _mean_by_row(self._score(images), owners, rows=len(model_input))
        return self._frame(scores, errors, index=model_input.index)

    def _read_all(self, sources: list[bytes | str | Quarantined]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Model input of every usable source, the row each image came from, and one error per row.

        Files are decoded in separate processes (:meth:`_decoders`): a file that crashes a decoder
        (a panic, an abort, a segfault) or runs past :data:`DECODE_TIMEOUT_S` costs only its row
        (``worker_died``, ``timeout``), never the server or the other rows.
        """
        readable = [row for row, source in enumerate(sources) if not isinstance(source, Quarantined)]
        errors = [f"{source.reason}: {source}" if isinstance(source, Quarantined) else ""
                  for source in sources]
        images, owners = [], []
        with self._decoding_lock():
            decoded = list(self._decoders().map([sources[row] for row in readable],
                                                on_failure=_decoder_failure))
        for row, result in zip(readable, decoded):
            if isinstance(result, tuple):
                errors[row] = f"{result[0]}: {result[1]}"
                continue
            images.append(self.prepare_images(result))
            owners.append(np.full(len(result), row))
        if not images:
            return np.empty((0, *self.settings.image_shape[:2], self.settings.channels), np.float32), \
                np.empty(0, int), errors
        return np.concatenate(images), np.concatenate(owners), errors

    def _decoders(self) -> WorkerPool:
        """The decoder processes, started on first use and kept for the model's life. Forked from a
        fork server, not from this process: it runs TensorFlow's threads, which a fork would copy
        mid-use, and a spawned process would import this process's main module (TensorFlow too)."""
        if getattr(self, "_pool", None) is None:
            domain = getattr(self, "domain", None)  # absent from models pickled before it existed
            self._pool = WorkerPool(
                partial(read_model_frames, settings=self.settings,
                        check=None if domain is None else domain.check),
                workers=DECODER_PROCESSES, context="forkserver", preload=("dicomflow.dicom.display",),
                timeout_s=DECODE_TIMEOUT_S)
        return self._pool

    def _decoding_lock(self) -> threading.Lock:
        if getattr(self, "_lock", None) is None:
            self._lock = threading.Lock()
        return self._lock

    def read_pixels(self, source: bytes | str | Path) -> np.ndarray:
        """One DICOM file (its bytes or path) to model input (frames, h, w, c), in this process,
        or raise Quarantined (``out_of_domain`` included, before any pixel is decoded)."""
        domain = getattr(self, "domain", None)
        result = read_model_frames(source, settings=self.settings,
                                   check=None if domain is None else domain.check)
        if isinstance(result, tuple):
            raise Quarantined(*result)
        return self.prepare_images(result)

    def prepare_images(self, images: np.ndarray) -> np.ndarray:
        """Stored or unit-range images -> float32 (n, h, w, c) in [0, 1], as train feeds the model."""
        images = np.asarray(images)
        expected = self.settings.image_shape
        if self.settings.channels == 1 and images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        if images.shape[1:] != expected:
            raise ValueError(f"images must be (n, {', '.join(map(str, expected))}) as ingest makes them "
                             f"(ingest.image_size {self.settings.size}, ingest.channels "
                             f"{self.settings.channels}); got {images.shape}")
        if images.dtype != np.uint8:
            if not np.issubdtype(images.dtype, np.floating):
                raise ValueError(f"images must be uint8 (0-255) or float in [0, 1]; got {images.dtype}")
            if images.size and not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
                raise ValueError("float images must hold values in [0, 1]; got "
                                 f"{np.nanmin(images):.3g} to {np.nanmax(images):.3g}")
        return layout.to_model_input(images)

    def _width(self) -> int:
        return self._model.output_shape[-1]

    def _score(self, images: np.ndarray) -> np.ndarray:
        if not len(images):
            return np.empty((0, self._width()))
        return np.asarray(self._model.predict(images, batch_size=PREDICT_BATCH, verbose=0), dtype=np.float64)

    def _frame(self, scores: np.ndarray, errors: list[str], *, index: pd.Index) -> pd.DataFrame:
        """Probabilities (n, width) with NaN rows for errors -> the output DataFrame."""
        ok = ~np.isnan(scores).any(axis=1)
        if self.binary:
            labels = np.where(scores[:, 0] >= self.threshold, self.classes[1], self.classes[0])
            columns = {"probability": scores[:, 0]}
        else:
            labels = np.asarray(self.classes)[np.argmax(np.nan_to_num(scores, nan=-1.0), axis=1)]
            columns = {f"probability_{c}": scores[:, i] for i, c in enumerate(self.classes)}
        columns["label"] = np.where(ok, labels, -1).astype(np.int64)
        columns["error"] = errors
        return pd.DataFrame(columns, index=index)


def _decoder_failure(_source: object, failure: WorkFailure) -> tuple[str, str]:
    """The error of a row whose decoder process died or ran out of time on it."""
    if failure.reason == "worker_died":
        return failure.reason, f"the decoder process {failure.detail} on this file"
    return failure.reason, failure.detail


def _mean_by_row(scores: np.ndarray, owners: np.ndarray, *, rows: int) -> np.ndarray:
    """Per input row, the mean of its images' scores (one image unless settings.frames is "all");
    NaN for a row without images."""
    sums = np.zeros((rows, scores.shape[1]))
    np.add.at(sums, owners, scores)
    counts = np.bincount(owners, minlength=rows)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _sources(frame: pd.DataFrame) -> list[bytes | str | Quarantined]:
    """Per row: its ``dicom`` bytes (base64 text decoded) when it has them, else its ``path``;
    a Quarantined error for a row with neither."""
    sources: list[bytes | str | Quarantined] = []
    for row in range(len(frame)):
        content = frame["dicom"].iloc[row] if "dicom" in frame else None
        path = frame["path"].iloc[row] if "path" in frame else None
        if isinstance(content, str):  # JSON text that no signature decoded
            try:
                content = base64.b64decode(content)
            except (binascii.Error, ValueError) as err:
                sources.append(Quarantined("not_base64", f"the dicom value is text but not base64: {err}"))
                continue
        if isinstance(content, (bytes, bytearray, memoryview)):
            sources.append(bytes(content))
        elif isinstance(path, (str, Path)) and str(path):
            sources.append(str(path))
        else:
            sources.append(Quarantined("no_input", "the row has neither a dicom value nor a path"))
    return sources


def check_output_width(width: int, classes: list[int], *, threshold: float | None) -> None:
    """A sigmoid output needs two classes and a threshold, a softmax output one class per unit;
    else ValueError."""
    expected = 2 if width == 1 else width
    kind = "a single sigmoid output" if width == 1 else f"{width} softmax outputs"
    if len(classes) != expected:
        raise ValueError(f"the model has {kind}, so classes must list {expected} labels; got {classes!r}")
    if width == 1 and threshold is None:
        raise ValueError(f"the model has {kind}, so threshold must be a float in [0, 1]; got None")


def output_columns(classes: list[int], *, binary: bool) -> list[str]:
    """The prediction columns: ``probability`` or ``probability_<class>`` each, ``label``, ``error``."""
    probabilities = ["probability"] if binary else [f"probability_{c}" for c in classes]
    return [*probabilities, "label", "error"]


def build_signature(classes: list[int], *, binary: bool) -> mlflow.models.ModelSignature:
    """Input: optional ``path`` (string) and ``dicom`` (binary, base64 in JSON) columns; the output columns."""
    from mlflow.types import ColSpec, Schema

    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "dicom", required=False)])
    outputs = Schema([ColSpec("double", name) for name in output_columns(classes, binary=binary)
                      if name.startswith("probability")]
                     + [ColSpec("long", "label"), ColSpec("string", "error")])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs)


def write_code_package(folder: Path) -> Path:
    """Copy the :data:`SHIPPED` parts of the ``dicomflow`` package into ``folder/dicomflow``; returns it."""
    package = Path(__file__).resolve().parents[1]
    target = folder / package.name
    target.mkdir(parents=True)
    for name in SHIPPED:
        if (package / name).is_dir():
            shutil.copytree(package / name, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(package / name, target / name)
    return target


def pinned_requirements() -> list[str]:
    """:data:`REQUIREMENTS` and TensorFlow pinned to the installed versions (as train pins them)."""
    tensorflow = "tensorflow-cpu" if _installed("tensorflow-cpu") else "tensorflow"
    return [f"{name}=={metadata.version(name)}" for name in (*REQUIREMENTS[:1], tensorflow, *REQUIREMENTS[1:])]


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
    except metadata.PackageNotFoundError:
        return False
    return True


def log_classifier(keras_model_path: Path, *, threshold: float | None, classes: list[int], settings: PixelSettings,
                   domain: TrainingDomain | None = None, name: str = "classifier",
                   input_example=None) -> mlflow.models.model.ModelInfo:
    """Log ``keras_model_path`` as a :class:`DicomClassifier` pyfunc into the active MLflow run.

    Parameters
    ----------
    keras_model_path : Path
        The trained ``.keras`` model (sigmoid output (n, 1) or softmax (n, k)).
    threshold : float or None
        The operating threshold: required for a sigmoid model, None for a softmax one.
    classes : list of int
        Class labels in output order (``ingest.classes``).
    settings : PixelSettings
        ``PixelSettings.from_params(load_params("ingest"))``: how training images were made.
    domain : TrainingDomain or None, default None
        ``TrainingDomain.from_manifest(<the train split's manifest rows>)``: the model then
        answers ``out_of_domain`` for files unlike its training files. None: no check.
    name : str, default="classifier"
        The model's name in the run.
    input_example : optional
        Saved with the model and run through it by MLflow; a DataFrame of the signature's form.
        Best left out in the pipeline: a DICOM file in base64 is random text that the leak
        scanner may match against names by chance.

    Returns
    -------
    mlflow.models.model.ModelInfo
        ``model_uri`` is what ``mlflow.register_model`` takes.

    Notes
    -----
    The model carries its code (``code/dicomflow/``, :func:`write_code_package`) and pins
    :func:`pinned_requirements`; its MLmodel metadata repeats the settings, threshold, classes and
    (key ``training_domain``, :meth:`TrainingDomain.to_dict`) the domain for people reading the
    registry.
    """
    import keras

    width = keras.models.load_model(keras_model_path, compile=False).output_shape[-1]
    check_output_width(width, classes, threshold=threshold)
    classifier = DicomClassifier(settings=settings, threshold=threshold, classes=classes, domain=domain)
    metadata = {"pixel_settings": dataclasses.asdict(settings), "threshold": classifier.threshold,
                "classes": [int(c) for c in classes]}
    if domain is not None:
        metadata["training_domain"] = domain.to_dict()
    with tempfile.TemporaryDirectory() as folder:
        code = write_code_package(Path(folder))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=classifier,
            artifacts={KERAS_ARTIFACT: str(keras_model_path)},
            code_paths=[str(code)],
            signature=build_signature(classes, binary=width == 1),
            input_example=input_example,
            pip_requirements=pinned_requirements(),
            metadata=metadata,
        )
    logger.info("logged %s: %s, classes %s, threshold %s, images %s, training domain: %s", name, info.model_uri,
                classes, threshold, settings.image_shape, "not checked" if domain is None else domain.describe())
    return info
