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

Serving: ``dicomflow serve`` (``dicomflow/serving/server.py``: the signature verified first, each
request bounded) answers ``POST /invocations`` with
``{"dataframe_split": {"columns": ["dicom"], "data": [[<base64>]]}}`` (``dicomflow request
FILE...`` writes it), as MLflow's scoring server would. Under MLflow's own server the signature's
binary ``dicom`` column makes it base64-decode ``dataframe_split`` and ``dataframe_records``, while
for ``inputs`` and ``instances`` it hands over the base64 *text* as bytes (mlflow/mlflow#11170):
:func:`dicom_content` recognises and decodes base64 text whatever the form. A request without a
``dicom`` or ``path`` column is answered 400 with one line (:class:`BadRequest`); a file that could
not be read gets ``null`` as its probability in the served JSON (``NaN`` in the DataFrame
elsewhere, :func:`_in_mlflow_serving`).

``path`` names a file on the disk of the machine that runs the model, so a model loaded by MLflow
(served, or ``mlflow.pyfunc.load_model``) reads none unless :data:`SERVING_ROOT_ENV` names the
folder it may read, and then only files inside it (:class:`PathRule`); the project's own code,
which can read any file itself, uses :meth:`DicomClassifier.load` or :func:`serving_root`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import queue
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import BAD_REQUEST

from dicomflow.config import layout
from dicomflow.config.params import TASKS, check_task
from dicomflow.dicom.display import PixelSettings, read_model_frames
from dicomflow.dicom.reading import Quarantined
from dicomflow.metrics import at_least, median_grade
from dicomflow.runtime.parallel import WorkerPool, WorkFailure
from dicomflow.serving.domain import TrainingDomain

logger = logging.getLogger(__name__)

KERAS_ARTIFACT = "keras_model"
# What of the package a logged model carries: prediction and what it imports (a test checks that
# their imports stay inside this list). Never the developer tools: the sample generator holds the
# sample's fake identifying values, and the leak scanner reads the models' files. Nor the stage
# runner (runtime/stage.py): a model is called by its server or by predict, never as a stage.
# Of the model package only the study aggregation (predict's answer per study).
SHIPPED = ("__init__.py", "errors.py", "metrics.py", "signing.py", "config", "dicom", "runtime", "serving",
           "tracking.py", "model/__init__.py", "model/aggregation.py")
NOT_SHIPPED = ("__pycache__", "stage.py")
# What prediction needs installed (dicomflow.dicom's imports included), pinned to what is installed.
REQUIREMENTS = ("keras", "pydicom", "highdicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg",
                "pylibjpeg-rle", "numpy", "pandas", "pyarrow", "pillow", "pyyaml", "tqdm")
PREDICT_BATCH = 64  # images per Keras call
DECODER_PROCESSES = 2  # files decoded at once, each in its own process (dicomflow serve: --decoders)
# A file still decoding after this long is answered with "timeout": below the 60 s after which
# MLflow's scoring server answers 504, so a slow file costs its row, never the whole answer.
DECODE_TIMEOUT_S = 30.0
# What the decoders' forkserver imports once, for every decoder it forks: the third-party reading
# stack, never dicomflow. CPython 3.11's forkserver imports its preload before it applies the
# parent's sys.path (multiprocessing/forkserver.py, main() ignores sys_path), so a dicomflow
# preloaded there would be whichever is installed, not the code the model ships, and every decoder
# would run it. Each decoder imports dicomflow itself, from the parent's sys.path.
DECODER_PRELOAD = ("numpy", "pydicom", "pydicom.pixels", "PIL.Image")
# A series is read in one task: its time limit is the per-file limit times this many files.
SERIES_TIMEOUT_FILES = 20
FILES_PER_TASK = 4  # a request's files are decoded in tasks of at most this many, interleaved with other requests'
# The example file of the registered model's input example (serving_example): a made-up image,
# no patient, fixed UIDs under 2.25 (a UUID-derived root) so that its bytes never change.
EXAMPLE_UIDS = {"SOPInstanceUID": "2.25.1", "StudyInstanceUID": "2.25.2", "SeriesInstanceUID": "2.25.3"}
# The folder a model loaded by MLflow may read ``path`` values under; unset: it reads no path.
SERVING_ROOT_ENV = "DICOMFLOW_SERVING_ROOT"
# What a request must hold, in the words of the 400 answer and of the errors that point to it.
EXPECTED_COLUMNS = (f"a 'dicom' column (the DICOM file's bytes, base64 in JSON) or a 'path' column "
                    f"(a file under {SERVING_ROOT_ENV} on the machine that runs the model)")
# MLflow's scoring server sets this before it answers (mlflow/pyfunc/scoring_server/__init__.py,
# init()); ``mlflow models predict`` sets it too. Private to MLflow: if it ever goes, served JSON
# carries NaN again and tests/test_serving.py's strict JSON client fails.
MLFLOW_SERVING_FLAG = "_MLFLOW_IS_IN_SERVING_ENVIRONMENT"
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]*")
_STARTING = threading.Lock()  # two requests arriving first start one decoder set and one scorer
# The ordinal head's fixed link layer (dicomflow.model.architectures.GRADE_LOG_PROBABILITY; the
# model package is not shipped with a registered model): how a loaded network shows its task.
ORDINAL_LAYER = "grade_log_probability"


class BadRequest(MlflowException, ValueError):
    """A request the model cannot answer at all (no input column): HTTP 400 with this one line.

    The scoring server prefixes the message of an MlflowException raised by a model with the
    repr of the whole request (``Failed to predict data '<DataFrame>'``: many lines, base64
    included); :meth:`serialize_as_json` is what it sends, so it answers the line written here.
    A ValueError too, for callers of :meth:`DicomClassifier.predict` outside MLflow.
    """

    def __init__(self, line: str) -> None:
        super().__init__(line, error_code=BAD_REQUEST)
        self.line = line

    def serialize_as_json(self) -> str:
        return json.dumps({"error_code": self.error_code, "message": self.line})


@dataclasses.dataclass(frozen=True)
class PathRule:
    """Which files the ``path`` values of a request may name.

    ``anywhere``: any file (the project's own code in its own process, which could read the file
    itself). Else only files inside ``root`` once ``..`` and links are resolved (a relative path
    is taken under ``root``), and none when ``root`` is None: a served model would otherwise
    read, or probe the existence of, any file its process can open for any client.
    """

    root: Path | None = None
    anywhere: bool = False

    @classmethod
    def from_environment(cls) -> PathRule:
        """The rule of a model loaded by MLflow: :data:`SERVING_ROOT_ENV` when set, else no path."""
        root = os.environ.get(SERVING_ROOT_ENV, "")
        return cls(root=Path(root) if root else None)

    def check(self, value: str) -> str | Quarantined:
        """The file to read for ``value``, or why it is not read (``path_refused``); never reads it."""
        if self.anywhere:
            return value
        # Messages name neither the value nor a folder: the row's position says which path it
        # was, and a path (the client's or the server's) can carry a name or describe the disk.
        if self.root is None:
            return Quarantined("path_refused", "not read: this model reads files by path only when "
                               f"{SERVING_ROOT_ENV} names the folder it may read on the machine that runs it; "
                               "send the file's content in the 'dicom' column instead")
        try:
            root = self.root.resolve(strict=True)
            if not root.is_dir():
                raise NotADirectoryError(str(self.root))
        except (OSError, RuntimeError):
            return Quarantined("path_refused", f"not read: {SERVING_ROOT_ENV} is not a folder on the machine "
                               "that runs the model; set it to the folder the files are in")
        try:
            # resolve() follows every link and removes "..": what is checked is what is read.
            target = (root / value).resolve()
        except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte
            target = None
        if target is None or not target.is_relative_to(root):
            # Where a link points is not said: that would describe the disk outside the root.
            return Quarantined("path_refused", f"not read: it is not a file under {SERVING_ROOT_ENV} once links "
                               "and '..' are resolved; send a path inside it, or the file's content in the "
                               "'dicom' column")
        try:
            mode = target.stat().st_mode
        except FileNotFoundError:
            return str(target)  # the reader answers not_found
        except OSError as err:
            return Quarantined("unreadable", f"cannot read the file ({err.strerror})")
        if not stat.S_ISREG(mode):
            # Refused before any open: a FIFO would hold a decoder until its time limit, a device
            # could be read without end. (A file swapped for a FIFO after this check holds one
            # decoder until DECODE_TIMEOUT_S: the other decoders and requests go on.)
            return Quarantined("not_a_file", "not a regular file (a folder, FIFO, device or socket): not read")
        return str(target)


@contextlib.contextmanager
def serving_root(folder: str | Path) -> Iterator[None]:
    """:data:`SERVING_ROOT_ENV` set to ``folder`` for the block (restored after): how the
    project's own commands let a model loaded by MLflow read the files they name."""
    before = os.environ.get(SERVING_ROOT_ENV)
    os.environ[SERVING_ROOT_ENV] = str(folder)
    try:
        yield
    finally:
        if before is None:
            del os.environ[SERVING_ROOT_ENV]
        else:
            os.environ[SERVING_ROOT_ENV] = before


def common_folder(files: Iterable[str | Path]) -> Path:
    """The narrowest folder that holds every one of ``files`` once links are resolved."""
    return Path(os.path.commonpath([str(Path(file).resolve().parent) for file in files]))


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
    task : {"binary", "multiclass", "ordinal"} or None, default None
        ``train.task``, checked against the model when it is loaded (binary: one sigmoid output;
        ordinal: the continuation-ratio head). None: the model's own (:func:`task_of_network`).
        An ordinal model's ``label`` is the median grade (:func:`dicomflow.metrics.median_grade`),
        a multi-class model's the most probable class.
    referable_grade : int or None, default None
        Ordinal only: the grade (one of ``classes`` after the first) from which an image is
        referable (``evaluate.referable_grade``); the output then has ``referable_probability``,
        P(grade >= referable_grade).
    referable_threshold : float in [0, 1] or None, default None
        With ``referable_grade``: the threshold evaluate chose on validation; the output then has
        ``referable``, 1 when ``referable_probability`` is at least it, else 0.
    volume : mapping or None, default None
        A volume model's (CT series, ``ingest.unit: series``) volume settings
        (:class:`dicomflow.dicom.series.VolumeSettings` as a dict: ``spacing_mm``, ``size``,
        ``window``), stated in the refusal of single files; None for an image model.

    Notes
    -----
    A volume model (a 5-D input: ``resnet3d_small``, ``attention_mil``) answers preprocessed
    volumes (a numpy array), or a request's files grouped into series and assembled as ingest
    assembles them (:func:`read_request_series`): each file's row gets its series' score.

    Multi-frame files give the frame(s) ``settings.frames`` picks, as in ingest: the first or
    middle frame, or with ``all`` every frame, each scored and the probabilities averaged (ingest
    labels every frame with its file's label, so the mean is the model's estimate for the file).
    """

    def __init__(self, *, settings: PixelSettings, threshold: float | None, classes: list[int],
                 domain: TrainingDomain | None = None, task: str | None = None, referable_grade: int | None = None,
                 referable_threshold: float | None = None, volume: Mapping[str, Any] | None = None) -> None:
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a float in [0, 1] or None; got {threshold!r}")
        if len(classes) < 2 or len(set(classes)) != len(classes):
            raise ValueError(f"classes must list at least two distinct labels; got {classes!r}")
        check_referable(task, classes, referable_grade=referable_grade, referable_threshold=referable_threshold)
        self.settings = settings
        self.threshold = None if threshold is None else float(threshold)
        self.classes = [int(c) for c in classes]
        self.domain = domain
        self.declared_task = task
        self.referable_grade = None if referable_grade is None else int(referable_grade)
        self.referable_threshold = None if referable_threshold is None else float(referable_threshold)
        self.volume = None if volume is None else dict(volume)
        self._model = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Load the Keras model from the model's artifacts and check it against classes and
        threshold. Loaded this way (served, ``mlflow.pyfunc.load_model``) the model reads ``path``
        values only under :data:`SERVING_ROOT_ENV`, as it is when each prediction starts."""
        self.load(context.artifacts[KERAS_ARTIFACT], read_any_path=False)

    def load(self, keras_model_path: str | Path, *, read_any_path: bool = True) -> DicomClassifier:
        """Load the Keras model at ``keras_model_path`` (what MLflow does from the artifacts), check
        it against classes and threshold, and return self: the classifier without MLflow.

        ``read_any_path`` (default True): ``path`` values may name any file, for this process's
        own code (evaluate scores the candidate so), which can read any file itself. False: only
        under :data:`SERVING_ROOT_ENV` (:class:`PathRule`), as when MLflow loads it.
        """
        import keras

        self._model = keras.models.load_model(keras_model_path, compile=False)
        check_output_width(self._width(), self.classes, threshold=self.threshold)
        check_model_task(self._model, getattr(self, "declared_task", None))
        self._read_any_path = read_any_path
        return self

    def __getstate__(self) -> dict:
        # The Keras model travels as an artifact; decoder processes and their lock are this
        # process's own, and so is the right to read any path (load() grants it, never a pickle).
        return {**self.__dict__, "_model": None, "_decoder_set": None, "_series_reader": None, "_scorer": None,
                "_read_any_path": False, "_limits": None}

    def path_rule(self) -> PathRule:
        """Which files ``path`` values may name now (:meth:`load`, :data:`SERVING_ROOT_ENV`)."""
        if getattr(self, "_read_any_path", False):
            return PathRule(anywhere=True)
        return PathRule.from_environment()

    @property
    def binary(self) -> bool:
        return self._width() == 1

    @property
    def takes_volumes(self) -> bool:
        """Whether the loaded network takes volumes (batch, depth, height, width, channels)."""
        return len(self._model.input_shape) == 5

    @property
    def task(self) -> str:
        """``binary``, ``multiclass`` or ``ordinal``: as declared, else the loaded model's own."""
        # getattr: models pickled before the task was declared carry no such attribute.
        return getattr(self, "declared_task", None) or task_of_network(self._model)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Class probabilities, label and error per input row.

        Parameters
        ----------
        context : PythonModelContext
            Unused (the model is loaded by :meth:`load_context`).
        model_input : pandas.DataFrame or numpy.ndarray
            A DataFrame with a ``dicom`` column (file content as bytes, or base64 text) and/or a
            ``path`` column (file paths, read as :meth:`path_rule` allows); a row uses its
            ``dicom`` value when it has one. Or
            preprocessed images (n, h, w) or (n, h, w, c) of ``settings.image_shape``: uint8
            0-255 or float in [0, 1]. (Annotated DataFrame, the form MLflow passes: its
            signature describes the DataFrame, and a union would make MLflow warn at import.)
        params : dict, optional
            Unused.

        Returns
        -------
        pandas.DataFrame
            :func:`output_columns`, one row per input row (a DataFrame's index kept): the
            probability of each class (``probability_<class>``; ``probability`` alone, that of the
            second class, for a binary model), ``label`` (the class called: binary at the
            threshold, multi-class the most probable, ordinal the median grade), for an ordinal
            model with a referable grade ``referable_probability`` (and with its threshold
            ``referable``, 1 or 0), and ``error``. A file that
            cannot be used gets probability NaN (None in MLflow's scoring server, so that its
            JSON says ``null``), label -1 and ``error`` "<reason>: <detail>" (ingest's
            quarantine reason codes, e.g. ``not_dicom``, ``truncated``, ``out_of_domain`` for a
            file outside :attr:`domain`, ``path_refused`` for a path :meth:`path_rule` does not
            allow); the other rows are predicted. ``error`` is empty when fine.

        Raises
        ------
        BadRequest
            A DataFrame without a ``path`` or ``dicom`` column, or files for a volume model (a
            ValueError; 400 when served).
        ValueError
            Images of the wrong shape or range.
        """
        if isinstance(model_input, np.ndarray):
            scores = self._score(self.prepare_images(model_input))
            return self._frame(scores, [""] * len(model_input), index=pd.RangeIndex(len(model_input)))
        if not isinstance(model_input, pd.DataFrame):
            raise ValueError("model_input must be a pandas DataFrame (path or dicom column) or a numpy "
                             f"array of images; got {type(model_input).__name__}")
        if not {"path", "dicom"} & set(model_input.columns):
            # Served, MLflow has already dropped the columns the signature does not name.
            got = f"columns {list(model_input.columns)}" if len(model_input.columns) else "neither"
            raise BadRequest(f"the model needs {EXPECTED_COLUMNS}; got {got} (columns of other names are "
                             'ignored), e.g. {"dataframe_split": {"columns": ["dicom"], "data": '
                             '[["<the file in base64>"]]}} as `dicomflow request FILE > request.json` writes it')
        sources = _sources(model_input, self.path_rule())
        if self.takes_volumes:  # the request's files as series: each row gets its series' score
            volumes, owners, errors = self._read_series(sources)
            scores = _mean_by_row(self._score(volumes), owners, rows=len(model_input))
            return self._frame(scores, errors, index=model_input.index)
        images, owners, errors = self._read_all(sources)
        scores = _mean_by_row(self._score(images), owners, rows=len(model_input))
        return self._frame(scores, errors, index=model_input.index)

    def _read_series(self, sources: list[bytes | str | Quarantined]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """A volume model's input from a request's files: the files grouped into series and each
        series assembled as ingest assembles it (:func:`read_request_series`), in a decoder
        process of its own (a file that crashes it costs the request, never the server).

        Returns the volumes, for each of a series' files the series' volume (each file's row
        gets its series' score), and one error per row: the file's own, or its series' reason
        (``series_gap``, ...), or ``localizer`` for a scout image set aside.
        """
        if getattr(self, "volume", None) is None:
            raise BadRequest(volume_refusal(self._model.input_shape[1:-1], None))
        with _STARTING:
            if getattr(self, "_series_reader", None) is None:
                limits = getattr(self, "_limits", None) or {"timeout_s": DECODE_TIMEOUT_S}
                self._series_reader = DecoderSet(partial(read_request_series, volume=self.volume,
                                                         size=tuple(self._model.input_shape[1:-1])),
                                                 processes=1, timeout_s=limits["timeout_s"] * SERIES_TIMEOUT_FILES)
        result = self._series_reader.map([sources])[0]
        if isinstance(result[0], str):  # the process died or overran: every row says so
            reason, detail = result
            return np.empty((0, *self._model.input_shape[1:]), np.float32), np.empty(0, int), \
                [f"{reason}: the series reader {detail}"] * len(sources)
        errors, series = result
        if not series:
            return np.empty((0, *self._model.input_shape[1:]), np.float32), np.empty(0, int), errors
        volumes = self.prepare_images(np.stack([volume for _, volume in series]))
        owners = [(index, row) for index, (rows, _) in enumerate(series) for row in rows]
        return volumes[[index for index, _ in owners]], np.array([row for _, row in owners]), errors

    def _read_all(self, sources: list[bytes | str | Quarantined]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Model input of every usable source, the row each image came from, and one error per row.

        Files are decoded in separate processes (:meth:`_decoders`): a file that crashes a decoder
        (a panic, an abort, a segfault) or runs past :data:`DECODE_TIMEOUT_S` costs only its row
        (``worker_died``, ``timeout``), never the server or the other rows. Concurrent calls (a
        server's request threads) share the processes without a lock (:class:`DecoderSet`).
        """
        readable = [row for row, source in enumerate(sources) if not isinstance(source, Quarantined)]
        errors = [f"{source.reason}: {source}" if isinstance(source, Quarantined) else ""
                  for source in sources]
        images, owners = [], []
        decoded = []
        if readable:  # a request of refused rows only starts no decoder process
            decoded = self._decoders().map([sources[row] for row in readable])
        for row, result in zip(readable, decoded):
            if isinstance(result, tuple):
                errors[row] = f"{result[0]}: {self._limits_said(result[1])}"
                continue
            images.append(self.prepare_images(result))
            owners.append(np.full(len(result), row))
        if not images:
            return np.empty((0, *self.settings.image_shape[:2], self.settings.channels), np.float32), \
                np.empty(0, int), errors
        return np.concatenate(images), np.concatenate(owners), errors

    def limit_decoding(self, *, max_decoded_mib: int | None = None, timeout_s: float = DECODE_TIMEOUT_S,
                       processes: int = DECODER_PROCESSES, setting: str = "the server's decoding limit") -> None:
        """Bound what one file may cost this model (``dicomflow serve`` sets it before serving).

        ``max_decoded_mib``: a file larger, inflating larger or decoding to more than this is
        answered ``too_large`` (None: ``ingest.max_decoded_mib`` as trained); ``timeout_s``: per
        file; ``processes``: decoder processes; ``setting``: how messages name the bound.
        Decoders already started are ended and start again under the new bounds.
        """
        if max_decoded_mib is not None and max_decoded_mib < 1:
            raise ValueError(f"max_decoded_mib must be at least 1; got {max_decoded_mib}")
        for name in ("_decoder_set", "_series_reader"):
            if getattr(self, name, None) is not None:
                getattr(self, name).close()
                setattr(self, name, None)
        self._limits = {"max_decoded_mib": max_decoded_mib, "timeout_s": float(timeout_s),
                        "processes": int(processes), "setting": setting}

    def _limits_said(self, detail: str) -> str:
        """A reader's ``too_large`` detail naming the served bound instead of ingest's param."""
        limits = getattr(self, "_limits", None)
        if limits and limits["max_decoded_mib"] is not None:
            return detail.replace("ingest.max_decoded_mib", limits["setting"])
        return detail

    def _decoders(self) -> DecoderSet:
        """The decoder processes, started on first use and kept for the model's life (each
        request's files go to whichever are free: :class:`DecoderSet`). Forked from a fork
        server, not from this process: it runs TensorFlow's threads, which a fork would copy
        mid-use, and a spawned process would import this process's main module (TensorFlow too)."""
        with _STARTING:
            if getattr(self, "_decoder_set", None) is None:
                self._decoder_set = self._start_decoders()
        return self._decoder_set

    def _start_decoders(self) -> DecoderSet:
        """A new :class:`DecoderSet` under :meth:`limit_decoding`'s bounds (or the defaults)."""
        limits = getattr(self, "_limits", None) or {"max_decoded_mib": None, "timeout_s": DECODE_TIMEOUT_S,
                                                    "processes": DECODER_PROCESSES}
        settings = self.settings
        if limits["max_decoded_mib"] is not None:
            settings = dataclasses.replace(settings, max_decoded_mib=min(settings.max_decoded_mib,
                                                                         limits["max_decoded_mib"]))
        domain = getattr(self, "domain", None)  # absent from models pickled before it existed
        return DecoderSet(
            partial(read_model_frames, settings=settings, check=None if domain is None else domain.check),
            processes=limits["processes"], timeout_s=limits["timeout_s"])

    def warm_up(self) -> None:
        """Start the decoder processes and trace the Keras call now, not on the first request."""
        if self.takes_volumes:  # no file is decoded for a volume model
            self._score(np.zeros((1, *self._model.input_shape[1:]), np.float32))
            return
        self._decoders().start()
        self._score(np.zeros((1, *self.settings.image_shape[:2], self.settings.channels), np.float32))

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
        if self.takes_volumes:
            return _prepare_volumes(images, tuple(self._model.input_shape[1:]))
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
        with _STARTING:
            if getattr(self, "_scorer", None) is None:
                self._scorer = BatchScorer(self._model)
        return self._scorer.score(images)

    def _frame(self, scores: np.ndarray, errors: list[str], *, index: pd.Index) -> pd.DataFrame:
        """Probabilities (n, width) with NaN rows for errors -> the output DataFrame."""
        ok = ~np.isnan(scores).any(axis=1)
        task = self.task
        if self.binary:
            labels = np.where(scores[:, 0] >= self.threshold, self.classes[1], self.classes[0])
            columns = {"probability": scores[:, 0]}
        elif task == "ordinal":
            labels = np.asarray(self.classes)[median_grade(np.nan_to_num(scores, nan=0.0))]
            columns = {f"probability_{c}": scores[:, i] for i, c in enumerate(self.classes)}
        else:
            labels = np.asarray(self.classes)[np.argmax(np.nan_to_num(scores, nan=-1.0), axis=1)]
            columns = {f"probability_{c}": scores[:, i] for i, c in enumerate(self.classes)}
        columns["label"] = np.where(ok, labels, -1).astype(np.int64)
        referable_grade = getattr(self, "referable_grade", None)
        if task == "ordinal" and referable_grade is not None:
            referable = at_least(np.nan_to_num(scores, nan=0.0), self.classes.index(referable_grade))
            columns["referable_probability"] = np.where(ok, referable, np.nan)
            if self.referable_threshold is not None:
                columns["referable"] = np.where(ok, referable >= self.referable_threshold, -1).astype(np.int64)
        columns["error"] = errors
        frame = pd.DataFrame(columns, index=index)
        if _in_mlflow_serving():
            # The scoring server writes the frame with json.dump, which writes NaN as a bare NaN
            # token that strict JSON parsers refuse; None is written null. Only there: callers
            # in Python (evaluate, predict) keep float columns.
            for name in frame.columns:
                if frame[name].dtype.kind == "f":
                    frame[name] = frame[name].astype(object).where(frame[name].notna(), None)
        return frame


class DecoderSet:
    """Decoder processes shared by concurrent requests, without a lock around them.

    Each process is a one-worker :class:`WorkerPool` (a file that kills it or overruns
    ``timeout_s`` costs its own row, and the process is replaced). A request's files are cut into
    tasks of at most :data:`FILES_PER_TASK`, queued first come, first served; a task takes
    whichever process is free. So several requests decode at once, a large request cannot hold
    every process while small ones wait, and a slow file holds one process, not the server.
    """

    def __init__(self, function: Callable[[Any], Any], *, processes: int, timeout_s: float) -> None:
        if processes < 1:
            raise ValueError(f"processes must be at least 1; got {processes}")
        self._idle: queue.SimpleQueue[WorkerPool] = queue.SimpleQueue()
        self._pools = [WorkerPool(function, workers=1, context="forkserver", preload=DECODER_PRELOAD,
                                  timeout_s=timeout_s) for _ in range(processes)]
        for pool in self._pools:
            self._idle.put(pool)
        # As many threads as processes: a task that starts always finds a free process.
        self._tasks = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="dicomflow-decode")

    def start(self) -> None:
        """Start every process now (each starts on its first task otherwise)."""
        for future in [self._tasks.submit(self._run, []) for _ in self._pools]:
            future.result()

    def map(self, sources: list[Any]) -> list[Any]:
        """The decoder's result for each source, in order (``on_failure``'s for a lost one)."""
        size = max(1, min(FILES_PER_TASK, -(-len(sources) // len(self._pools))))
        tasks = [self._tasks.submit(self._run, sources[start:start + size]) for start in range(0, len(sources), size)]
        return [result for task in tasks for result in task.result()]

    def _run(self, sources: list[Any]) -> list[Any]:
        pool = self._idle.get()
        try:
            return list(pool.map(sources, on_failure=_decoder_failure))
        finally:
            self._idle.put(pool)

    def close(self) -> None:
        self._tasks.shutdown(wait=True)
        for pool in self._pools:
            pool.close()


class BatchScorer:
    """The Keras model called from one thread, on the images of every request waiting at once.

    Concurrent requests hand their images over and wait; the scoring thread takes all that are
    waiting (up to :data:`PREDICT_BATCH` images a call) and scores them in one call, so a call's
    fixed cost is shared by the requests that arrived together instead of paid by each. One
    thread only: Keras models are not meant to be called from several threads at once.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self._waiting: queue.SimpleQueue[tuple[np.ndarray, Future]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="dicomflow-score", daemon=True)
        self._thread.start()

    def score(self, images: np.ndarray) -> np.ndarray:
        """The model's outputs (n, width) as float64 for ``images`` (n, h, w, c)."""
        answer: Future = Future()
        self._waiting.put((images, answer))
        return answer.result()

    def _serve(self) -> None:
        while True:
            jobs = [self._waiting.get()]
            count = len(jobs[0][0])
            while count < PREDICT_BATCH:
                try:
                    jobs.append(self._waiting.get_nowait())
                except queue.Empty:
                    break
                count += len(jobs[-1][0])
            try:
                images = np.concatenate([job[0] for job in jobs]) if len(jobs) > 1 else jobs[0][0]
                scores = np.concatenate([np.asarray(self._model.predict_on_batch(images[start:start + PREDICT_BATCH]),
                                                    dtype=np.float64)
                                         for start in range(0, len(images), PREDICT_BATCH)])
            except BaseException as err:  # noqa: BLE001  every waiting request gets the error
                for _, answer in jobs:
                    answer.set_exception(err)
                continue
            start = 0
            for job_images, answer in jobs:
                answer.set_result(scores[start:start + len(job_images)])
                start += len(job_images)


def volume_refusal(shape: tuple[int, ...], volume: Mapping[str, Any] | None) -> str:
    """The one line a volume model without its volume settings (logged before they were
    recorded) answers a request of DICOM files with."""
    return (f"this model scores whole CT series as volumes of {tuple(shape)} voxels (d, h, w) but was "
            "registered without its volume settings (spacing, window): it cannot assemble a series of "
            "files; give it volumes as ingest makes them (a numpy array (n, d, h, w)), or register it "
            "again with evaluate")


def read_request_series(sources: list[bytes | str | Quarantined], *, volume: Mapping[str, Any],
                        size: tuple[int, int, int]) -> tuple[list[str], list[tuple[list[int], np.ndarray]]]:
    """A request's files as series, assembled as ingest assembles them (``ingest.unit: series``).

    Parameters
    ----------
    sources : list
        Per request row: the file's bytes, its (allowed) path, or why the row has no file.
    volume : mapping
        The registered volume settings: ``spacing_mm``, ``window``, ``max_decoded_mib``, and
        ``policy`` and ``min_slices`` (strict and 8 for a model registered without them).
    size : tuple of int
        The network's (d, h, w).

    Returns
    -------
    errors, series
        One error per row ("" for a row whose series was assembled); per assembled series, its
        rows (every file of the series, a dropped duplicate copy included) and its uint8 volume.
    """
    from dicomflow.dicom.series import (VolumeSettings, apply_policy, diagnose, group_series,
                                        read_slice_header, read_volume)

    settings = VolumeSettings(spacing_mm=tuple(volume["spacing_mm"]), size=size, window=tuple(volume["window"]),
                              max_decoded_mib=int(volume.get("max_decoded_mib", 2048)))
    policy, min_slices = volume.get("policy", "strict"), int(volume.get("min_slices", 8))
    errors = [f"{source.reason}: {source}" if isinstance(source, Quarantined) else "" for source in sources]
    series: list[tuple[list[int], np.ndarray]] = []
    with tempfile.TemporaryDirectory(prefix="dicomflow-series-") as folder:
        folder = Path(folder)
        headers = []
        for row, source in enumerate(sources):
            if isinstance(source, Quarantined):
                continue
            path = folder / f"{row:06d}.dcm"  # the row number: nothing of the sender's names
            if isinstance(source, bytes):
                path.write_bytes(source)
            else:
                path.symlink_to(Path(source).resolve())
            try:
                headers.append(read_slice_header(path, data_dir=folder, max_bytes=settings.max_bytes))
            except Quarantined as err:
                errors[row] = f"{err.reason}: {err}"
        groups, set_aside = group_series(headers)
        for name, reason, detail in set_aside:
            errors[int(Path(name).stem)] = f"{reason}: {detail}"
        for group in groups:
            rows = [int(Path(header.relative_path).stem) for header in group.headers]
            try:
                kept = apply_policy(group, diagnose(group), policy, min_slices=min_slices)
                built = read_volume(kept, data_dir=folder, settings=settings, fill_gaps=policy == "fill_gaps")
            except Quarantined as err:
                for row in rows:
                    errors[row] = f"{err.reason}: {err} (one of the {len(rows)} files of its series)"
                continue
            series.append((rows, built.pixels))
    return errors, series


def _prepare_volumes(volumes: np.ndarray, expected: tuple[int, ...]) -> np.ndarray:
    """Stored or unit-range volumes (n, d, h, w[, c]) -> float32 (n, d, h, w, c) in [0, 1]."""
    if expected[-1] == 1 and volumes.ndim == 4:
        volumes = volumes[..., None]
    if volumes.shape[1:] != expected:
        raise ValueError(f"volumes must be (n, {', '.join(map(str, expected[:-1]))}) as ingest makes them "
                         f"(ingest.series.volume_size); got {volumes.shape}")
    if volumes.dtype != np.uint8 and not (np.issubdtype(volumes.dtype, np.floating) and np.isfinite(volumes).all()
                                          and volumes.min(initial=0.0) >= 0 and volumes.max(initial=0.0) <= 1):
        raise ValueError(f"volumes must be uint8 (0-255) or float in [0, 1]; got {volumes.dtype} from "
                         f"{np.nanmin(volumes) if volumes.size else 0:.3g} to "
                         f"{np.nanmax(volumes) if volumes.size else 0:.3g}")
    return layout.to_model_input(volumes)


def _in_mlflow_serving() -> bool:
    """Whether MLflow's scoring server (or ``mlflow models predict``) runs this model."""
    return os.environ.get(MLFLOW_SERVING_FLAG, "").strip().lower() in ("true", "1")


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


def _sources(frame: pd.DataFrame, rule: PathRule) -> list[bytes | str | Quarantined]:
    """Per row: its ``dicom`` content (:func:`dicom_content`) when it has one, else its ``path``
    as ``rule`` allows it; a Quarantined error for a row with neither or a path refused."""
    sources: list[bytes | str | Quarantined] = []
    for row in range(len(frame)):
        content = frame["dicom"].iloc[row] if "dicom" in frame else None
        path = frame["path"].iloc[row] if "path" in frame else None
        if isinstance(content, (str, bytes, bytearray, memoryview)):
            sources.append(dicom_content(content))
        elif isinstance(path, (str, Path)) and str(path):
            sources.append(rule.check(str(path)))
        else:
            sources.append(Quarantined("no_input", "the row has neither a dicom value nor a path; "
                                       f"send {EXPECTED_COLUMNS}"))
    return sources


def dicom_content(value: str | bytes | bytearray | memoryview) -> bytes:
    """The file a ``dicom`` value holds: its bytes, or base64 text of them decoded.

    JSON cannot hold bytes, so clients send base64 text; the scoring server decodes it for
    ``dataframe_split`` and ``dataframe_records`` but passes ``inputs`` and ``instances`` on as the
    text's own bytes (mlflow/mlflow#11170). A DICOM file is never base64 text (its preamble or
    first tag is binary), so text that decodes strictly (base64 alphabet, line breaks allowed, as
    ``base64`` writes them) is decoded; anything else is kept as it is, and the reader answers
    ``not_dicom`` for it like for any other file that is not DICOM.
    """
    raw = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    if raw[128:132] == b"DICM":
        return raw
    try:  # base64 on one line, what clients send: decoded in one pass (the checks below cost 3x more)
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        pass
    if not _BASE64_TEXT.fullmatch(raw):
        return raw
    try:
        return base64.b64decode(re.sub(rb"\s", b"", raw), validate=True)
    except (binascii.Error, ValueError):
        return raw


def check_output_width(width: int, classes: list[int], *, threshold: float | None) -> None:
    """A sigmoid output needs two classes and a threshold, a softmax output one class per unit;
    else ValueError."""
    expected = 2 if width == 1 else width
    kind = "a single sigmoid output" if width == 1 else f"{width} softmax outputs"
    if len(classes) != expected:
        raise ValueError(f"the model has {kind}, so classes must list {expected} labels; got {classes!r}")
    if width == 1 and threshold is None:
        raise ValueError(f"the model has {kind}, so threshold must be a float in [0, 1]; got None")


def check_referable(task: str | None, classes: list[int], *, referable_grade: int | None,
                     referable_threshold: float | None) -> None:
    """A declared task that fits ``classes``, and a referable grade and threshold that fit the task
    (:func:`dicomflow.config.params.check_task`); else ValueError."""
    if task is not None and task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} or None; got {task!r}")
    if referable_threshold is not None and (referable_grade is None or not 0.0 <= referable_threshold <= 1.0):
        raise ValueError(f"referable_threshold must be a float in [0, 1] given with a referable_grade; got "
                         f"{referable_threshold!r} with referable_grade {referable_grade!r}")
    if task is not None:
        check_task(task, [int(c) for c in classes], referable_grade=referable_grade)
    elif referable_grade is not None:
        raise ValueError(f"referable_grade {referable_grade!r} needs task='ordinal'; got task None")


def task_of_network(model) -> str:
    """A loaded Keras model's task: ``binary`` (one output), ``ordinal`` (its networks have the
    continuation-ratio head's :data:`ORDINAL_LAYER`) or ``multiclass``."""
    if model.output_shape[-1] == 1:
        return "binary"
    names = {layer.name for layer in model._flatten_layers(include_self=False)}
    return "ordinal" if ORDINAL_LAYER in names else "multiclass"


def check_model_task(model, task: str | None) -> None:
    """The loaded ``model`` is a network of ``task`` (None: anything); else ValueError."""
    found = task_of_network(model)
    if task is not None and found != task:
        raise ValueError(f"the model is a {found} network but task is {task!r}: register it with task={found!r}, "
                         "or train it with train.task: " + task)


def output_columns(classes: list[int], *, binary: bool, referable: bool = False,
                   referable_call: bool = False) -> list[str]:
    """The prediction columns: ``probability`` or ``probability_<class>`` each, ``label``, with
    ``referable`` ``referable_probability`` (and with ``referable_call`` ``referable``), ``error``."""
    probabilities = ["probability"] if binary else [f"probability_{c}" for c in classes]
    return [*probabilities, "label", *(["referable_probability"] if referable else []),
            *(["referable"] if referable_call else []), "error"]


def build_signature(classes: list[int], *, binary: bool, referable: bool = False,
                    referable_call: bool = False) -> mlflow.models.ModelSignature:
    """Input: optional ``path`` (string) and ``dicom`` (binary, base64 in JSON) columns; the output columns."""
    from mlflow.types import ColSpec, Schema

    types = {"label": "long", "referable": "long", "error": "string"}
    inputs = Schema([ColSpec("string", "path", required=False), ColSpec("binary", "dicom", required=False)])
    outputs = Schema([ColSpec(types.get(name, "double"), name)
                      for name in output_columns(classes, binary=binary, referable=referable,
                                                 referable_call=referable_call)])
    return mlflow.models.ModelSignature(inputs=inputs, outputs=outputs)


def write_code_package(folder: Path) -> Path:
    """Copy the :data:`SHIPPED` parts of the ``dicomflow`` package into ``folder/dicomflow``; returns it."""
    package = Path(__file__).resolve().parents[1]
    target = folder / package.name
    target.mkdir(parents=True)
    for name in SHIPPED:
        if (package / name).is_dir():
            shutil.copytree(package / name, target / name, ignore=shutil.ignore_patterns(*NOT_SHIPPED))
        else:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
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


def serving_example(domain: TrainingDomain | None) -> pd.DataFrame:
    """The registered model's input example: one row whose ``dicom`` column holds a small made-up
    DICOM file inside ``domain``, so that ``serving_input_example.json`` is a request the server
    answers with a probability (a ``path`` names a file on the server's disk, which a server
    refuses unless it was given DICOMFLOW_SERVING_ROOT, and a real file's name or bytes could
    carry identifiers).

    The image is two flat halves (dark and light), RLE Lossless so that it stays a few KiB at any
    size: the smallest size, the first modality and spacing of the domain, grayscale unless the
    domain is colour only; no patient, study or device attribute; fixed UIDs
    (:data:`EXAMPLE_UIDS`), so the same domain always gives the same bytes. Without a domain, a
    64 x 64 DX image.
    """
    from io import BytesIO

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage

    modality, rows, columns, spacing, colour = "DX", 64, 64, None, False
    if domain is not None:
        modality = sorted(domain.modalities)[0] if domain.modalities else modality
        rows, columns = domain.rows[0], domain.columns[0]
        spacing = domain.pixel_spacing_mm[0] if domain.pixel_spacing_mm else None
        colour = domain.channels == {3}
    pixels = np.full((rows, columns, 3) if colour else (rows, columns), 64, np.uint8)
    pixels[:, columns // 2:] = 192
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    for keyword, uid in EXAMPLE_UIDS.items():
        setattr(ds, keyword, uid)
    ds.Modality = modality
    ds.set_pixel_data(pixels, "RGB" if colour else "MONOCHROME2", 8, generate_instance_uid=False)
    if spacing is not None:
        ds.PixelSpacing = [f"{spacing:.6g}", f"{spacing:.6g}"]
    ds.compress(RLELossless, generate_instance_uid=False)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pd.DataFrame({"dicom": [buffer.getvalue()]})


def _plain_dict(mapping: Mapping[str, Any]) -> dict[str, Any]:
    """A mapping as its JSON reads back (tuples as lists), for the MLmodel metadata."""
    return json.loads(json.dumps(dict(mapping)))


def describe_privacy(model_metadata: Mapping[str, Any] | None) -> str:
    """A model's privacy guarantee in one line, from its MLmodel metadata (key ``privacy``):
    ``differential privacy: ε 1 (patient ε 2.5), δ 0.001 per image (pld accountant)``, or that
    there is none (also for a model registered before the key existed)."""
    privacy = (model_metadata or {}).get("privacy")
    if not isinstance(privacy, Mapping):
        return ("no formal privacy guarantee (trained without differential privacy)" if privacy == "none"
                else "privacy guarantee not recorded (registered before dicomflow recorded it)")
    patient = privacy.get("patient_epsilon")
    patient_text = "" if not isinstance(patient, (int, float)) else (
        f" (patient ε {patient:g})" if math.isfinite(patient) else " (no bound per patient)")
    return (f"differential privacy: ε {privacy.get('epsilon'):g}{patient_text}, δ {privacy.get('delta'):g} per "
            f"{privacy.get('unit', 'image')} ({privacy.get('accountant', '?')} accountant)")


def describe_task(model_metadata: Mapping[str, Any] | None) -> str:
    """A model's task in one line, from its MLmodel metadata (keys ``task``, ``classes``,
    ``threshold``, ``referable_grade``, ``referable_threshold``): ``ordinal task, grades 0 < 1 < 2;
    label: the median grade; referable from grade 1 at 0.4``; a model registered before the task
    was recorded: from its classes."""
    metadata = model_metadata or {}
    classes = [str(c) for c in metadata.get("classes", [])]
    if not classes and not metadata.get("task"):
        return "task not recorded (a model logged without dicomflow's metadata); its answers as it gives them"
    task = metadata.get("task") or ("binary" if len(classes) == 2 else "multiclass")
    if task == "binary":
        return f"binary task, classes {', '.join(classes)}; label: class {classes[-1] if classes else '?'} " \
               f"at probability {metadata.get('threshold')} or more"
    if task == "multiclass":
        return f"multiclass task, classes {', '.join(classes)}; label: the most probable class"
    line = f"ordinal task, grades {' < '.join(classes)}; label: the median grade"
    grade = metadata.get("referable_grade")
    if grade is None:
        return line
    called = metadata.get("referable_threshold")
    return line + f"; referable_probability: P(grade >= {grade})" + (
        f", referable at {called:g} or more" if isinstance(called, (int, float)) else ", no referable threshold")


def log_classifier(keras_model_path: Path, *, threshold: float | None, classes: list[int], settings: PixelSettings,
                   domain: TrainingDomain | None = None, name: str = "classifier",
                   input_example=None, privacy: Mapping[str, Any] | None = None, task: str | None = None,
                   referable_grade: int | None = None, referable_threshold: float | None = None,
                   study: Mapping[str, Any] | None = None,
                   volume: Mapping[str, Any] | None = None) -> mlflow.models.model.ModelInfo:
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
        The pipeline gives :func:`serving_example` of the domain: a made-up file the server
        answers, never a real file (its name or bytes could hold identifiers).
    privacy : mapping or None, default None
        The differential-privacy guarantee train wrote beside the model (``privacy.json``:
        :func:`dicomflow.config.layout.read_privacy_record`); None: trained without DP.
    task, referable_grade, referable_threshold : optional
        ``train.task`` (None: the network's own, :func:`task_of_network`), and for an ordinal
        task ``evaluate.referable_grade`` and the referable threshold evaluate chose on
        validation (:class:`DicomClassifier`).
    study : mapping or None, default None
        Evaluated per study (``evaluate.level: study``): how a study's files are combined and the
        thresholds chosen on validation studies
        (:meth:`dicomflow.evaluation.studies.Aggregation.as_metadata`), what ``dicomflow predict
        --per-study`` answers a study with. None: evaluated per image.
    volume : mapping or None, default None
        A volume model's :class:`dicomflow.dicom.series.VolumeSettings` as a dict (spacing,
        size, window), in the metadata (key ``volume``). A volume model is logged without
        ``input_example``: a DICOM file is a slice, which it refuses (:class:`DicomClassifier`).

    Returns
    -------
    mlflow.models.model.ModelInfo
        ``model_uri`` is what ``mlflow.register_model`` takes.

    Notes
    -----
    The model carries its code (``code/dicomflow/``, :func:`write_code_package`) and pins
    :func:`pinned_requirements`; its MLmodel metadata repeats the settings, threshold, classes and
    (key ``training_domain``, :meth:`TrainingDomain.to_dict`) the domain for people reading the
    registry, (key ``privacy``) the DP guarantee or ``"none"`` (:func:`describe_privacy`), and the
    task (keys ``task``, ``referable_grade``, ``referable_threshold``: :func:`describe_task`), and
    (key ``study``) the study aggregation when evaluated per study.
    """
    import keras

    network = keras.models.load_model(keras_model_path, compile=False)
    width = network.output_shape[-1]
    check_output_width(width, classes, threshold=threshold)
    check_model_task(network, task)
    task = task or task_of_network(network)
    classifier = DicomClassifier(settings=settings, threshold=threshold, classes=classes, domain=domain, task=task,
                                 referable_grade=referable_grade, referable_threshold=referable_threshold,
                                 volume=volume)
    metadata = {"pixel_settings": dataclasses.asdict(settings), "threshold": classifier.threshold,
                "classes": [int(c) for c in classes], "task": task,
                "referable_grade": classifier.referable_grade, "referable_threshold": classifier.referable_threshold}
    if domain is not None:
        metadata["training_domain"] = domain.to_dict()
    metadata["privacy"] = dict(privacy) if privacy is not None else "none"
    if study is not None:
        metadata["study"] = dict(study)
    volumes = len(network.input_shape) == 5
    if volumes:
        metadata["volume"] = {"input_shape": list(network.input_shape[1:]), **_plain_dict(volume or {})}
        input_example = None  # a file example would be answered with the refusal of single files
    with tempfile.TemporaryDirectory() as folder:
        code = write_code_package(Path(folder))
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=classifier,
            artifacts={KERAS_ARTIFACT: str(keras_model_path)},
            code_paths=[str(code)],
            signature=build_signature(classes, binary=width == 1, referable=referable_grade is not None,
                                      referable_call=referable_threshold is not None),
            input_example=input_example,
            pip_requirements=pinned_requirements(),
            metadata=metadata,
        )
    logger.info("logged %s: %s, %s, %s %s, training domain: %s", name, info.model_uri, describe_task(metadata),
                "volumes" if volumes else "images", network.input_shape[1:-1] if volumes else settings.image_shape,
                "not checked" if domain is None else domain.describe())
    return info
