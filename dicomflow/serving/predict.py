"""Batch prediction: the registered model on DICOM files and folders, to one CSV; and the JSON body
that sends files to a served model.

    dicomflow predict INPUT... [--output predictions.csv] [--model models:/NAME@champion]  (dicomflow/cli.py)
    dicomflow request FILE... > request.json   (then curl ... -d @request.json; README, "Predicting")

Inputs: files and folders (folders searched recursively; hidden files skipped, as ingest skips
them) and an MLflow pyfunc model (``dicomflow.serving.pyfunc.DicomClassifier``), by default
``models:/<evaluate.registered_model_name>@champion`` in the project's tracking store
(``MLFLOW_TRACKING_URI`` or ``mlflow.db``).
Outputs: the CSV, one row per file (inputs in the order given, a folder's files in path order):
``path`` (relative to the folder when the one
input is a folder, else as the command line names it: ``folder/relative`` for a file found under a
folder), the probability column(s), ``label`` (the class called, or an ordinal model's grade), for
an ordinal model with a referable grade ``referable_probability`` and ``referable``, and ``error``
(empty, or the reason a file could not be used: ``not_dicom: ...``, ``truncated_pixel_data: ...``,
``out_of_domain: ...`` for a file unlike the model's training files). With ``--per-study`` every
row also has ``unit`` (``file``) and ``study`` (a number, -1 for a file in no study), and one row per
study follows (``unit`` ``study``, ``n_files``, the files' probabilities combined as the model was
evaluated per study, :func:`study_settings`): the files are grouped by their Study Instance UID,
which is never written (the numbers are this CSV's own).
Params: ``evaluate.registered_model_name`` (only when ``--model`` is not given); with ``--per-study``
``evaluate.study_aggregation`` and ``evaluate.study_top_k`` for a model evaluated per image.
Keys: the verify key (``DICOMFLOW_VERIFY_KEY_FILE`` or ``DICOMFLOW_VERIFY_KEY``; a local store's
own key otherwise, :mod:`dicomflow.signing`): the model's signature is checked before any of its
code is loaded, and an unsigned or altered version is refused with one line.

A bad file gets its reason in the CSV and never stops the run; the command fails (exit 1, one
line) only when an input does not exist, the model cannot be loaded or no file at all could be
predicted.
"""

from __future__ import annotations

import base64
import logging
import os
import stat
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow import tracking
from dicomflow.dicom.sources import SKIPPED_ENTRIES, display_path, list_sources
from dicomflow.errors import DataError, SettingsError
from dicomflow.metrics import at_least, median_grade
from dicomflow.model.aggregation import AGGREGATIONS, aggregate
from dicomflow.serving.pyfunc import common_folder, serving_root

logger = logging.getLogger(__name__)

BATCH_FILES = 256  # files per model call: bounds memory on large folders
# Files in a folder that are not images to predict: the labels table (``make predict`` reads
# ``data/``, where labels.csv lives) and the tables and documents study folders hold beside their
# images, and DICOMDIR (the media's index: DICOM, but no image). Skipped and counted by kind, never
# failures; a file named on the command line is always read. Not by content: a DICOM file without
# its preamble is still a file the user meant, and its failure is reported.
NOT_IMAGE_SUFFIXES = frozenset({".csv", ".tsv", ".txt", ".md", ".json", ".yaml", ".yml", ".xml", ".html",
                                ".pdf", ".xls", ".xlsx", ".parquet"})
NOT_IMAGE_NAMES = frozenset({"DICOMDIR"})


@dataclass
class Inputs:
    """The files to predict with the name each has in the CSV, and the entries not read
    (name, reason code, detail), as :func:`dicomflow.dicom.sources.list_sources` gives them."""

    files: list[Path] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    unread: list[tuple[str, str, str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # by kind: ".csv", "DICOMDIR", "hidden", ...


def skip_kind(path: Path) -> str | None:
    """Why a file found in a folder is not an image to predict (:data:`NOT_IMAGE_SUFFIXES`,
    :data:`NOT_IMAGE_NAMES`), as a kind that names no file: ``.csv``, ``DICOMDIR``; else None."""
    if path.name in NOT_IMAGE_NAMES:
        return path.name
    suffix = path.suffix.lower()
    return suffix if suffix in NOT_IMAGE_SUFFIXES else None


def describe_skipped(skipped: Counter[str]) -> str:
    """``skipped 2 files not meant for prediction (1 .csv, 1 hidden)``: kinds and counts only
    (a file's name can hold an accession number)."""
    total = sum(skipped.values())
    ordered = sorted(skipped.items(), key=lambda item: (-item[1], item[0]))
    kinds = ", ".join(f"{count} {kind}" for kind, count in ordered)
    return f"skipped {total} file{'s' if total != 1 else ''} not meant for prediction ({kinds})"


def list_inputs(inputs: list[Path], *, exclude: set[Path] = frozenset()) -> Inputs:
    """The files named by ``inputs`` (files, and folders walked by ``list_sources``), or DataError
    naming an input that does not exist. In a folder, tables, documents and DICOMDIR
    (:func:`skip_kind`) and hidden entries are counted in ``skipped``, not read. A file named on
    the command line is read even when hidden (the user named it); one that is not a regular file
    (a FIFO, a device) is listed as ``not_a_file``, never opened."""
    found = Inputs()
    one_folder = len(inputs) == 1 and inputs[0].is_dir()
    for given in inputs:
        if given.is_dir():
            listing = list_sources(given, exclude=exclude)
            # With one folder the CSV names files relative to it (as before); with several
            # inputs each name keeps its folder, so that rows from two folders stay apart.
            prefix = "" if one_folder else _as_given(given) + "/"
            kinds = [skip_kind(path) for path in listing.files]
            found.skipped.update(kind for kind in kinds if kind)
            found.files += [path for path, kind in zip(listing.files, kinds) if not kind]
            found.names += [prefix + display_path(path, given) for path, kind in zip(listing.files, kinds) if not kind]
            found.skipped.update(reason for _, reason, _ in listing.unread if reason in SKIPPED_ENTRIES)
            found.unread += [(prefix + name, reason, detail) for name, reason, detail in listing.unread
                             if reason not in SKIPPED_ENTRIES]
            continue
        try:
            mode = given.stat().st_mode
        except FileNotFoundError:
            raise DataError(f"input {given} not found: give DICOM files or folders of them") from None
        except OSError as err:
            raise DataError(f"input {given} cannot be opened ({err.strerror})") from None
        name = _as_given(given)
        if stat.S_ISREG(mode):
            found.files.append(given)
            found.names.append(name)
        else:
            found.unread.append((name, "not_a_file", "not a regular file (a FIFO, socket or device), not read"))
    return found


def _as_given(path: Path) -> str:
    """``path`` as the command line gave it, with ``/``, printable even when not UTF-8 (as
    :func:`dicomflow.dicom.sources.display_path` shows names)."""
    return os.fsencode(path.as_posix()).decode("utf-8", errors="backslashreplace")


def tracking_store(environ: Mapping[str, str], *, cwd: Path) -> str:
    """The tracking store ``dicomflow predict`` reads: ``MLFLOW_TRACKING_URI`` (``--tracking-uri``
    sets it), else the ``mlflow.db`` of the repository ``cwd`` is in; SettingsError (one line,
    saying how to name one) when neither exists: MLflow would create an empty store and find
    no model in it."""
    uri = environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        database = tracking.repository_root(cwd) / tracking.DEFAULT_TRACKING_DB
        if not database.is_file():
            raise SettingsError(f"no MLflow tracking store here ({database} does not exist): in the project, run "
                                "make repro first; elsewhere, name the project's store with --tracking-uri "
                                "sqlite:////path/to/project/mlflow.db (or MLFLOW_TRACKING_URI, e.g. a team server's "
                                "http://host:5000)")
        return f"sqlite:///{database}"
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        database = Path(uri.removeprefix("sqlite:///"))
        if not (cwd / database).is_file():
            raise SettingsError(f"tracking store {uri}: {database} does not exist; give the project's "
                                "store (its mlflow.db, e.g. --tracking-uri sqlite:////path/to/project/mlflow.db)")
    return uri


def model_uri(given: str | None, *, project_model: str | None, champions: Callable[[], list[str]],
              store: str) -> str:
    """The model ``dicomflow predict`` loads.

    Parameters
    ----------
    given : str or None
        ``--model``: a URI (``models:/NAME@champion``, ``models:/NAME/3``) as it is, or a
        registered model's NAME, taken as ``models:/NAME@champion``.
    project_model : str or None
        ``evaluate.registered_model_name`` of the project the command runs in; None outside one.
    champions : callable
        The names of the store's registered models that have a ``champion`` (asked only when
        neither of the above names one).
    store : str
        The tracking store, for the error.

    Raises
    ------
    SettingsError
        Nothing names the model and the store does not hold exactly one with a champion: one line
        saying how to name it.
    """
    if given:
        return given if ":/" in given else f"models:/{given}@champion"
    if project_model:
        return f"models:/{project_model}@champion"
    names = champions()
    if len(names) == 1:
        return f"models:/{names[0]}@champion"
    held = (f"it holds {len(names)} with a champion: {', '.join(sorted(names))}" if names
            else "it holds no registered model with a champion alias")
    raise SettingsError(f"which model? no params.yaml here and {store}: {held}; name one with --model NAME "
                        "(models:/NAME@champion) or --model models:/NAME/VERSION")


def champion_models(client) -> list[str]:
    """The names of the registered models of ``client``'s store that have a ``champion`` alias."""
    return [model.name for model in client.search_registered_models() if "champion" in (model.aliases or {})]


def load_model(uri: str, *, shown: str | None = None):
    """The pyfunc model at ``uri`` (loaded as is: its code runs), or DataError naming the URI (or
    ``shown``) and why not. Registered models are loaded through :func:`load_verified_model`."""
    import mlflow

    try:
        return mlflow.pyfunc.load_model(uri)
    except Exception as err:
        first_line = (str(err).strip().splitlines() or [""])[0]
        raise DataError(f"cannot load model {shown or uri} from {tracking.tracking_uri()}: "
                         f"{type(err).__name__}: {first_line}") from err


def load_verified_model(uri: str, *, key, workdir: Path):
    """The registered pyfunc model at ``uri`` after its signature was verified.

    The version (an alias resolved first) is downloaded into ``workdir``, verified over those
    files (:func:`dicomflow.signing.download_verified`) and loaded from that verified copy, never
    from the registry again: no code of an unsigned or altered model is unpickled or imported.
    Keep ``workdir`` until the model is no longer used.

    Raises
    ------
    SignatureError
        Unsigned, altered or signed with another key (one line: the URI and why).
    DataError
        No such version, or it cannot be loaded.
    """
    from dicomflow.signing import download_verified

    local = download_verified(uri, workdir, key=key)
    return load_model(str(local), shown=uri)


def predict_files(model, files: list[Path], *, names: list[str], batch_files: int = BATCH_FILES) -> pd.DataFrame:
    """The model's output for each file, with its name in ``names`` as the ``path`` column, in
    ``files`` order. A volume model (its metadata has ``volume``) answers each file with the
    score of its series, read whole in one call (:func:`series_batches`).

    A model loaded by MLflow reads paths only under ``DICOMFLOW_SERVING_ROOT``
    (``dicomflow.serving.pyfunc.PathRule``): here, the files are the ones this command was given,
    so the root is set, for these calls only, to the narrowest folder holding all of them, and the
    model is given their resolved paths. Models registered before that rule ignore it.
    """
    resolved = [str(Path(path).resolve()) for path in files]
    metadata = getattr(getattr(model, "metadata", None), "metadata", None) or {}
    if metadata.get("volume"):  # a CT model: each call holds whole series (series_batches)
        batches = series_batches(files, batch_files=batch_files)
    else:
        batches = [list(range(start, min(start + batch_files, len(files))))
                   for start in range(0, len(files), batch_files)]
    parts = []
    with serving_root(common_folder(resolved)):
        for batch in batches:
            predicted = model.predict(pd.DataFrame({"path": [resolved[i] for i in batch]}))
            predicted.index = batch
            predicted.insert(0, "path", [names[i] for i in batch])
            parts.append(predicted)
    return pd.concat(parts).sort_index().reset_index(drop=True)


def with_unread(predictions: pd.DataFrame, unread: list[tuple[str, str, str]]) -> pd.DataFrame:
    """``predictions`` and a row for each entry that was not read (a FIFO, a broken link, a name
    that is not UTF-8, ...) with its reason as the error, all in path order."""
    if not unread:
        return predictions
    rows = pd.DataFrame({"path": [path for path, _, _ in unread],
                         "label": -1, "error": [f"{reason}: {detail}" for _, reason, detail in unread]})
    rows = rows.assign(**{name: -1 for name in ("referable",) if name in predictions})  # an ordinal model's call
    both = pd.concat([predictions, rows], ignore_index=True)
    for name in ("label", "referable"):
        if name in both:
            both[name] = both[name].astype("int64")
    return both.sort_values("path", kind="stable", ignore_index=True)


def error_counts(predictions: pd.DataFrame) -> Counter[str]:
    """How many files failed, by reason code (the ``error`` text before its first colon)."""
    errors = predictions.loc[predictions["error"] != "", "error"]
    return Counter(error.split(":", 1)[0] for error in errors)


def request_body(files: Iterable[Path]) -> dict:
    """The JSON body of ``POST /invocations`` for ``files``: their bytes, base64, one row each in
    the ``dicom`` column of ``dataframe_split``, the form the README documents. As a file given to
    ``curl -d @request.json``, not a command-line argument: a DICOM file in base64 is longer than
    the system lets one argument be ("Argument list too long")."""
    rows = []
    for file in files:
        try:
            rows.append([base64.b64encode(file.read_bytes()).decode("ascii")])
        except FileNotFoundError:
            raise DataError(f"{file} not found: give the DICOM files to send") from None
        except IsADirectoryError:
            raise DataError(f"{file} is a folder: give the DICOM files to send "
                             f"(e.g. {os.path.join(str(file), '*.dcm')})") from None
        except OSError as err:
            raise DataError(f"{file} cannot be read ({err.strerror})") from None
    return {"dataframe_split": {"columns": ["dicom"], "data": rows}}


@dataclass(frozen=True)
class StudySettings:
    """How ``dicomflow predict --per-study`` answers a study: the aggregation of its files'
    probabilities (:func:`dicomflow.model.aggregation.aggregate`), the thresholds it is called at,
    and where they came from (for the log)."""

    aggregation: str
    top_k: int
    threshold: float | None
    referable_threshold: float | None
    source: str


def study_settings(model_metadata: Mapping | None, *, params_aggregation: tuple[str, int] | None) -> StudySettings:
    """The per-study answer of a model: what it was registered with when it was evaluated per study
    (its MLmodel metadata ``study``: aggregation and the thresholds chosen on validation studies),
    else ``params_aggregation`` (``evaluate.study_aggregation`` and ``evaluate.study_top_k``) at the
    model's per-file thresholds.

    Raises
    ------
    SettingsError
        Neither: the model was evaluated per image and no ``params.yaml`` is here.
    """
    metadata = model_metadata or {}
    registered = metadata.get("study")
    if isinstance(registered, Mapping) and registered.get("aggregation") in AGGREGATIONS:
        return StudySettings(str(registered["aggregation"]), int(registered.get("top_k") or 1),
                             registered.get("threshold"), registered.get("referable_threshold"),
                             "registered with the model (evaluated per study)")
    if params_aggregation is None:
        raise SettingsError("--per-study: the model was evaluated per image, so it carries no study aggregation, "
                            "and there is no params.yaml here to take evaluate.study_aggregation from: run in the "
                            "project, or use a model registered with evaluate.level: study")
    method, k = params_aggregation
    return StudySettings(method, k, metadata.get("threshold"), metadata.get("referable_threshold"),
                         "params.yaml's evaluate.study_aggregation, at the per-file thresholds (the model was "
                         "evaluated per image)")


def study_instance_uids(files: list[Path], keyword: str = "StudyInstanceUID") -> list[str | None]:
    """Each file's (0020,000D) *Study Instance UID* (or the UID ``keyword`` names, e.g.
    ``SeriesInstanceUID``), from its header only; None where the file cannot be read or has none.
    The UIDs identify a patient's study: group by them, never write them."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    uids: list[str | None] = []
    for file in files:
        try:
            header = pydicom.dcmread(file, stop_before_pixels=True, specific_tags=[keyword])
            uid = str(header.get(keyword, "") or "").strip()
        # A file pydicom cannot parse: its own row says why (the model read it); it joins no study.
        except (InvalidDicomError, OSError, ValueError, EOFError):
            uid = ""
        uids.append(uid or None)
    return uids


def series_batches(files: list[Path], *, batch_files: int = BATCH_FILES) -> list[list[int]]:
    """Positions of ``files`` in model calls for a volume model: a series (by its Series Instance
    UID) is never cut between two calls, whatever its size; calls hold whole series up to about
    ``batch_files`` files. A file without a readable Series UID goes with the next call."""
    by_series: dict[str | None, list[int]] = {}
    for position, uid in enumerate(study_instance_uids(files, "SeriesInstanceUID")):
        by_series.setdefault(uid if uid is not None else f"#{position}", []).append(position)
    batches: list[list[int]] = [[]]
    for positions in by_series.values():
        if batches[-1] and len(batches[-1]) + len(positions) > batch_files:
            batches.append([])
        batches[-1].extend(positions)
    return [batch for batch in batches if batch]


def with_studies(predictions: pd.DataFrame, uids: list[str | None], *, settings: StudySettings,
                 model_metadata: Mapping, unit: str = "study") -> pd.DataFrame:
    """``predictions`` (one row per file, in the order of ``uids``) with a ``unit`` column
    (``file``), a ``study`` column (1, 2, ... in order of first appearance; -1 for a file that
    failed or has no Study Instance UID), and one row per study appended: ``unit`` ``study``,
    ``path`` empty, ``n_files`` (the files it combines), the aggregated probability column(s)
    (more than two classes: each class's, renormalised to sum to 1), ``label`` called as the
    model calls a file (binary at ``settings.threshold``), an ordinal model's
    ``referable_probability`` and ``referable``, and ``error`` empty.

    The study numbers are this table's own: no UID, accession number or date reaches the output.
    ``unit`` names the unit (``series``: a volume model's series, by their Series Instance UIDs)
    in the ``unit`` column and as the number column's name.
    """
    classes = [int(c) for c in model_metadata.get("classes", [])]
    task = model_metadata.get("task") or ("binary" if len(classes) == 2 else "multiclass")
    columns = ["probability"] if "probability" in predictions else [f"probability_{c}" for c in classes]
    answered = (predictions["error"].fillna("") == "").to_numpy() & np.array([uid is not None for uid in uids])
    keys = pd.Series([uid if ok else None for uid, ok in zip(uids, answered)], dtype=object)
    order = list(dict.fromkeys(uid for uid in keys if uid is not None))
    number = {uid: n + 1 for n, uid in enumerate(order)}
    files = predictions.assign(unit="file", **{unit: [number.get(uid, -1) for uid in keys]})
    rows = []
    for uid in order:
        members = files.loc[(keys == uid).to_numpy(), columns].to_numpy(float)
        combined = np.array([aggregate(members[:, c], settings.aggregation, k=settings.top_k)
                             for c in range(members.shape[1])])
        if len(columns) > 1:
            combined = combined / combined.sum()
        row = {"path": "", "unit": unit, unit: number[uid], "n_files": len(members),
               **dict(zip(columns, combined)), "error": ""}
        row.update(_study_call(combined, task=task, classes=classes, settings=settings,
                               referable_grade=model_metadata.get("referable_grade")))
        rows.append(row)
    files["n_files"] = 1
    return pd.concat([files, pd.DataFrame(rows, columns=list(files.columns))], ignore_index=True).astype(
        {name: "int64" for name in ("label", "referable", unit, "n_files") if name in files})


def _study_call(probabilities: np.ndarray, *, task: str, classes: list[int], settings: StudySettings,
                referable_grade: int | None) -> dict:
    """A study's ``label`` (and an ordinal model's referable figures), called as a file is."""
    if task == "binary":
        threshold = 0.5 if settings.threshold is None else settings.threshold
        return {"label": classes[1] if probabilities[0] >= threshold else classes[0]}
    if task != "ordinal":
        return {"label": classes[int(np.argmax(probabilities))]}
    call = {"label": classes[int(median_grade(probabilities[None, :])[0])]}
    if referable_grade is not None:
        referable = float(at_least(probabilities[None, :], classes.index(referable_grade))[0])
        call["referable_probability"] = referable
        if settings.referable_threshold is not None:
            call["referable"] = int(referable >= settings.referable_threshold)
    return call
