"""Deciding a candidate's alias: the candidate and the registry's champion compared on the
validation split (never the test split), on the images neither trained on, with a minimum gain;
and the leak checks a version must pass before it is registered.

Nothing here writes to MLflow (that is :mod:`dicomflow.evaluation.registry`). The champion is
never loaded in this process: its files are downloaded and their signature verified
(:func:`dicomflow.signing.download_verified`), and only that verified copy runs, in a child
process whose environment is built from :data:`CHILD_ENVIRONMENT` (no secret, no key, no
credentials). A champion that is unsigned or altered, trained on the comparison's images, or
that cannot be scored makes the candidate ``challenger`` with the reason; evaluate goes on.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from dicomflow.config import layout
from dicomflow.config.layout import TRAINING_DATA_FILE
from dicomflow.deid.digests import read_digests
from dicomflow.deid.leaks import scan_mlflow_run, scan_paths
from dicomflow.errors import DataError
from dicomflow.metrics import ORDINAL, Scores, gain, metric_for, task_of
from dicomflow.model.architectures import class_indices

logger = logging.getLogger(__name__)


PROMOTION_SPLIT = "val"  # the images candidate and champion are compared on; never the test split


# Gains below this are the float rounding of two processes scoring the same model, not a better
# one (seen: a model re-registered unchanged "beat" itself on Brier by 1e-9).
ROUNDING = 1e-6


def should_promote(candidate: float, champion: float | None, *, metric: str = "roc_auc",
                   min_gain: float = 0.0) -> bool:
    """A candidate becomes champion when there is none, or it beats the champion on ``metric``
    by more than :data:`ROUNDING` and by at least ``min_gain``, in the metric's direction
    (:class:`dicomflow.metrics.Metric`: lower is better for the Brier score)."""
    if champion is None:
        return True
    better_by = gain(metric, candidate, champion)
    return better_by > ROUNDING and better_by >= min_gain - ROUNDING  # 0.82 - 0.80 is 0.01999... in floats


def promotion_score(metric: str, labels: np.ndarray, predictions: pd.DataFrame, classes: list[int], *,
                    task: str | None = None, referable_grade: int | None = None) -> float:
    """``metric`` of one model's answers (``dicomflow.serving.pyfunc`` output columns) against class indices.

    Threshold-dependent metrics use the model's own ``label`` column, so each model is judged at
    its own operating threshold, as it would be used (an ordinal model's label is its called
    grade). ``task`` is ``train.task`` (None: binary for two classes, multiclass for more);
    ``referable_grade`` (a label of ``classes``, ordinal only) is what the referable AUC needs.
    """
    task = task or task_of(len(classes))
    registered = metric_for(metric, task=task, referable=referable_grade is not None, promotion=True,
                            setting="evaluate.promotion_metric")
    called = class_indices(predictions["label"].to_numpy(), classes)
    columns = ["probability"] if "probability" in predictions else [f"probability_{c}" for c in classes]
    probabilities = predictions[columns].to_numpy(float)
    if task == ORDINAL:
        return registered.compute(Scores(np.asarray(labels, int), probabilities, called, ORDINAL,
                                         None if referable_grade is None else classes.index(referable_grade)))
    return registered.compute(Scores(np.asarray(labels, int), probabilities.ravel() if len(columns) == 1
                                     else probabilities, called))


# A comparison needs this many validation images that neither model trained on and both
# answered, with every class among them: below it one image moves an accuracy by 10 points or
# more and an AUC by as much, more than any gain evaluate.promotion_min_gain would sensibly ask
# for; above it, promotion_min_gain is the user's guard against noise.
MIN_COMPARED_IMAGES = 10
TRAINING_DATA_FORMAT = "dicomflow-training-data/1"

# What the champion's process may see of this one's environment: what Python, TensorFlow and the
# locale need, nothing else. Names, not prefixes, except the locale's LC_*: a new secret variable
# (DICOMFLOW_SECRET*, a signing key, MLFLOW_TRACKING_PASSWORD/TOKEN, AWS_*, a cloud's key) stays out
# without anyone having to remember it here.
CHILD_ENVIRONMENT = ("PATH", "HOME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "SYSTEMROOT",
                     "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS",
                     "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "KERAS_BACKEND", "CUDA_VISIBLE_DEVICES")
SERVING_ROOT_ENV = "DICOMFLOW_SERVING_ROOT"  # dicomflow.serving.pyfunc's: the folder a model may read
BATCH_FILES = 64  # files per predict call in the champion's process

# The champion's process: a verified model folder, a folder of inputs, an output CSV. It imports
# no dicomflow itself: the model brings its own code (its code_paths), as it was registered.
_SCORING_SCRIPT = """
import os, sys
import pandas as pd
import mlflow.pyfunc
folder, inputs, output, batch = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
model = mlflow.pyfunc.load_model(folder)
names = sorted(os.listdir(inputs))
parts = []
for start in range(0, len(names), batch):
    chunk = names[start:start + batch]
    answers = model.predict(pd.DataFrame({"path": [os.path.join(inputs, n) for n in chunk]}))
    answers = answers.reset_index(drop=True)
    answers.insert(0, "path", chunk)
    parts.append(answers)
pd.concat(parts, ignore_index=True).to_csv(output, index=False)
"""


@dataclass(frozen=True)
class Comparison:
    """The candidate and the current champion, scored on the same images in the same run.

    ``champion`` is None when there is no champion or it could not be compared (``reason`` says
    why); ``images`` counts the files both models answered (the candidate's own when there is no
    comparison); ``excluded`` the validation files left out because the champion trained on them.
    """

    metric: str
    candidate: float
    champion: float | None
    champion_version: str | None
    images: int
    data_version: str
    reason: str = ""
    excluded: int = 0

    def decide(self, *, min_gain: float) -> tuple[str, str]:
        """The alias the candidate gets (champion or challenger) and the decision in words."""
        left_out = f" ({self.excluded} left out: the champion trained on them)" if self.excluded else ""
        on = f"{self.metric} on {self.images} {PROMOTION_SPLIT} images{left_out} of data {self.data_version[:12]}"
        if self.champion_version is None:
            return "champion", f"champion: no champion before ({on}: {self.candidate:.4f})"
        if self.champion is None:
            return "challenger", (f"challenger: champion version {self.champion_version} could not be "
                                  f"compared ({self.reason}); compare them and move the alias by hand")
        promote = should_promote(self.candidate, self.champion, metric=self.metric, min_gain=min_gain)
        verdict = "champion" if promote else "challenger"
        return verdict, (f"{verdict}: {on}, candidate {self.candidate:.4f} vs champion version "
                         f"{self.champion_version} {self.champion:.4f} (minimum gain {min_gain:g})")


def require_privacy(alias: str, decision: str, privacy: Mapping | None, *, cap: float | None) -> tuple[str, str]:
    """The alias and decision of :meth:`Comparison.decide` under ``evaluate.require_privacy``
    (``cap``: the largest accounted ε a champion may have; None: no requirement).

    A model trained without differential privacy (``privacy`` None: no ``privacy.json``) or with
    an ε above ``cap`` is never ``champion``: a would-be champion becomes ``challenger``, the reason
    before the comparison's decision; a challenger stays one, the reason after it. Otherwise both
    are returned unchanged. ``privacy``'s ``epsilon`` is compared, in its own unit (``unit``: an
    image or a patient).
    """
    if cap is None:
        return alias, decision
    if privacy is None:
        why = "the model was trained without differential privacy (no privacy.json)"
    elif float(privacy["epsilon"]) > cap:
        why = f"its accounted ε {float(privacy['epsilon']):.3g} per {privacy.get('unit', 'image')} is above it"
    else:
        return alias, decision
    requirement = f"evaluate.require_privacy is ε <= {cap:g} and {why}"
    if alias != "champion":
        return alias, f"{decision}; {requirement}"
    return "challenger", f"challenger: {requirement}; else {decision}"


def training_data_record(manifest: pd.DataFrame, *, data_version: str, pixel_settings: Mapping) -> dict:
    """What a model trained on, as its :data:`TRAINING_DATA_FILE` records it: the data version,
    the pixel settings, and the sorted digests of its training images (the split manifest's
    ``pixel_sha256``: SHA-256 of each image as the model saw it, after de-identification; it does
    not depend on the de-identification secret, but it does on the pixel settings)."""
    train = manifest.iloc[layout.split_rows(manifest, "train")]
    return {"format": TRAINING_DATA_FORMAT, "data_version": data_version, "pixel_settings": _plain(pixel_settings),
            "images": len(train), "pixel_sha256": sorted(set(train["pixel_sha256"].astype(str)))}


def inherit_training_data(record: dict, inherited: Mapping | None) -> tuple[dict, str]:
    """``record`` (:func:`training_data_record`) with the images its starting weights were trained
    on (``inherited``: the source's record, as train wrote it beside the model from a registered
    source; None when the weights did not come from one), and why those cannot be known ("" when
    they can). A model fine-tuned from another has seen what that one saw: the promotion
    comparison leaves those images out as it leaves out the champion's."""
    if inherited is None:
        return record, ""
    source = str(inherited.get("source", "the source model"))
    if not isinstance(inherited.get("pixel_sha256"), list):
        return record, f"its starting weights ({source}) record no training images"
    if inherited.get("pixel_settings") != record["pixel_settings"]:
        return record, f"its starting weights ({source}) record their training images at other pixel settings"
    images = sorted(set(record["pixel_sha256"]) | set(map(str, inherited["pixel_sha256"])))
    return {**record, "pixel_sha256": images, "inherited_from": source}, ""


def training_data_digest(record: Mapping) -> str:
    """A short digest of a record's training images, for the version's tag."""
    import hashlib

    return hashlib.sha256("\n".join(record["pixel_sha256"]).encode()).hexdigest()[:16]


def promotion_files(manifest: pd.DataFrame, deid_dir: Path, *, classes: list[int]) -> dict:
    """The de-identified files of the promotion split, their class indices (one per file: every
    frame of a file carries its label) and each file's image digests (one per frame)."""
    rows = manifest.iloc[layout.split_rows(manifest, PROMOTION_SPLIT)]
    first = rows.drop_duplicates("dicom_file")
    digests = rows.groupby("dicom_file", sort=False)["pixel_sha256"].agg(lambda d: frozenset(d.astype(str)))
    return {"files": [deid_dir / name for name in first["dicom_file"]],
            "labels": class_indices(first["label"].to_numpy(), classes), "classes": classes,
            "digests": [digests[name] for name in first["dicom_file"]]}


def child_environment(environ: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The champion's process environment: the names of :data:`CHILD_ENVIRONMENT` and ``LC_*``
    found in ``environ``, MLflow's telemetry off, and ``extra``."""
    kept = {name: value for name, value in environ.items() if name in CHILD_ENVIRONMENT or name.startswith("LC_")}
    return {**kept, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONDONTWRITEBYTECODE": "1", **extra}


def score_model_folder(folder: Path, files: list[Path], *, environ: Mapping[str, str] | None = None) -> pd.DataFrame:
    """A verified local model folder's answers for ``files``, from a child process.

    The child runs ``python -I`` (no PYTHONPATH, no user site, not the working folder) in a
    fresh folder, with :func:`child_environment`; the model may read only the copied inputs
    (its serving root). Returns the CSV (a ``path`` column of file names), or raises DataError
    with the child's last line.
    """
    with tempfile.TemporaryDirectory(prefix="dicomflow-champion-") as work:
        inputs = Path(work) / "inputs"
        inputs.mkdir()
        for file in files:
            try:  # a hard link costs nothing; a copy where the file system has none
                os.link(file, inputs / file.name)
            except OSError:
                shutil.copyfile(file, inputs / file.name)
        output = Path(work) / "predictions.csv"
        env = child_environment(os.environ if environ is None else environ, **{SERVING_ROOT_ENV: str(inputs)})
        result = subprocess.run([sys.executable, "-I", "-c", _SCORING_SCRIPT, str(folder), str(inputs),
                                 str(output), str(BATCH_FILES)], cwd=work, env=env, capture_output=True, text=True)
        if result.returncode != 0 or not output.is_file():
            raise DataError(f"scoring it failed: {_exception_line(result.stderr)[:300]}")
        return pd.read_csv(output, keep_default_na=False, na_values=[""], dtype={"error": str})


def score_registered(model_uri: str, files: list[Path]) -> pd.DataFrame:
    """A registered pyfunc's answers for ``files``, from a fresh ``dicomflow predict`` (which
    verifies it). Not what evaluate uses for the champion (:func:`compare_with_champion`)."""
    with tempfile.TemporaryDirectory() as folder:
        inputs = Path(folder) / "inputs"
        inputs.mkdir()
        for file in files:
            try:
                os.link(file, inputs / file.name)
            except OSError:
                shutil.copyfile(file, inputs / file.name)
        output = Path(folder) / "predictions.csv"
        result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", str(inputs), "--model", model_uri,
                                 "--output", str(output)], capture_output=True, text=True)
        if result.returncode != 0 and not output.is_file():
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"scoring {model_uri} failed: {last}")
        return pd.read_csv(output, keep_default_na=False, na_values=[""], dtype={"error": str})


def score_candidate(keras_model_path: Path, files: list[Path], **registered) -> pd.DataFrame:
    """The candidate's answers for ``files``, as the registered pyfunc gives them
    (:class:`dicomflow.serving.pyfunc.DicomClassifier` with ``registered``, the arguments it is
    logged with), in this process: it is this run's own model; a ``path`` column of file names."""
    from dicomflow.serving.pyfunc import DicomClassifier

    local = DicomClassifier(**registered).load(keras_model_path)
    answers = local.predict(None, pd.DataFrame({"path": [str(file) for file in files]}))
    answers = answers.reset_index(drop=True)
    answers.insert(0, "path", [file.name for file in files])
    return answers


def score_candidate_volumes(keras_model_path: Path, volumes: np.ndarray, files: list[Path],
                            **registered) -> pd.DataFrame:
    """A volume model's answers (``ingest.unit: series``), as the registered pyfunc gives them for
    the de-identified volumes (n, d, h, w, 1) of ``files`` (their series folders, in
    :func:`promotion_files`' order), in this process; a ``path`` column of folder names: the
    stored volumes, which the pyfunc would assemble again from the folders' files."""
    from dicomflow.serving.pyfunc import DicomClassifier

    if len(volumes) != len(files):
        raise ValueError(f"volumes and files must be the same series, one volume each; got {len(volumes)} "
                         f"volumes for {len(files)} series folders")
    local = DicomClassifier(**registered).load(keras_model_path)
    answers = local.predict(None, np.asarray(volumes)).reset_index(drop=True)
    answers.insert(0, "path", [file.name for file in files])
    return answers


def compare_volume_model(candidate: pd.DataFrame, *, champion_version: str | None, **comparison) -> Comparison:
    """:func:`compare_with_champion` for a volume model: its own figure, and, when there is a
    champion, no comparison: the champion comparison scores one file per row, and a volume model
    answers series (not built for them yet). The candidate is then ``challenger`` with that reason
    (:meth:`Comparison.decide`), the alias to be moved by hand."""
    own = compare_with_champion(candidate, champion_version=None, **comparison)
    if champion_version is None:
        return own
    return replace(own, champion_version=champion_version, reason=(
        "a volume model is scored on series, and the comparison with the champion scores one file per row: "
        "compare the two on the validation series and move the alias by hand"))


def _exception_line(stderr: str) -> str:
    """The exception's own line of a traceback (``SomeError: ...``), else the last line."""
    lines = stderr.strip().splitlines() or ["no output"]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head and " " not in head and head.endswith(("Error", "Exception", "Exit")):
            return line.strip()
    return lines[-1].strip()


def _answered(predictions: pd.DataFrame) -> np.ndarray:
    errors = predictions["error"]
    return (errors.isna() | (errors.astype(str) == "")).to_numpy()


def _enough(labels: np.ndarray, classes: list[int]) -> bool:
    return len(labels) >= MIN_COMPARED_IMAGES and set(range(len(classes))) <= set(labels.tolist())


def _too_few(kept: int, labels: np.ndarray, classes: list[int], *, after: str) -> str:
    present = sorted({classes[i] for i in labels.tolist()})
    return (f"{kept} {PROMOTION_SPLIT} images {after} (classes {present}); a fair comparison needs at "
            f"least {MIN_COMPARED_IMAGES} with every class")


def compare_with_champion(candidate: pd.DataFrame, *, champion_version: str | None, champion_uri: str,
                          verify_key, metric: str, files: list[Path], labels: np.ndarray, classes: list[int],
                          digests: list[frozenset], data_version: str,
                          pixel_settings: Mapping, candidate_seen: frozenset[str] = frozenset(),
                          candidate_unknown: str = "", task: str | None = None,
                          referable_grade: int | None = None) -> Comparison:
    """Compare the candidate's answers (``candidate``, a ``path`` column of file names, in
    ``files`` order) with the champion's, on the files neither model trained on.

    Parameters
    ----------
    champion_version, champion_uri : str or None, str
        The registry's current champion (None: there is none) and its URI.
    verify_key
        :func:`dicomflow.signing.verify_key_from_env`.
    files, labels, classes, digests
        :func:`promotion_files`.
    data_version, pixel_settings
        The candidate's data version and pixel settings (:func:`training_data_record`).
    candidate_seen, candidate_unknown
        The digests of images the candidate's starting weights were trained on, left out like the
        champion's, and why they cannot be known ("" when they can;
        :func:`inherit_training_data`).
    task, referable_grade
        ``train.task`` and ``evaluate.referable_grade``, as for :func:`promotion_score`.

    Returns
    -------
    Comparison
        ``champion`` None with ``reason`` when the champion cannot be compared: its signature does
        not verify, it records no training images or records them at other pixel settings, fewer
        than :data:`MIN_COMPARED_IMAGES` images (or not every class) remain without its training
        images or among the files it answered, it cannot be loaded or scored, or its outputs are
        not the candidate's.
    """
    from dicomflow.signing import SignatureError, download_verified

    unseen = np.array([not (digest & candidate_seen) for digest in digests], dtype=bool)
    answered = _answered(candidate) & unseen
    if not _answered(candidate).any():
        raise DataError(f"the candidate answered none of the {len(files)} {PROMOTION_SPLIT} files (first error: "
                        f"{str(candidate['error'].iloc[0])[:200]}); it is not registered")
    every_class = set(range(len(classes))) <= set(labels[answered].tolist())
    score = functools.partial(promotion_score, metric, classes=classes, task=task, referable_grade=referable_grade)
    own = score(labels[answered], candidate[answered]) if every_class else float("nan")
    if champion_version is None:
        return Comparison(metric, own, None, None, int(answered.sum()), data_version)

    def unfair(reason: str, excluded: int = 0) -> Comparison:
        return Comparison(metric, own, None, champion_version, int(answered.sum()), data_version, reason, excluded)

    if candidate_unknown:
        return unfair(candidate_unknown + ", so a comparison cannot leave them out")

    with tempfile.TemporaryDirectory(prefix="dicomflow-verified-") as work:
        try:
            folder = download_verified(champion_uri, Path(work), key=verify_key)
        except SignatureError as err:
            return unfair(f"its signature does not verify: {err}")
        except DataError as err:
            return unfair(f"it cannot be downloaded: {err}")
        record = layout.read_training_record(Path(folder))
        if record is None:
            return unfair(f"it records no training images ({TRAINING_DATA_FILE}), so a comparison "
                          "cannot leave them out")
        if record.get("pixel_settings") != _plain(pixel_settings):
            return unfair("it records its training images at other pixel settings, so they cannot be "
                          "recognised among the comparison's")
        seen = set(record["pixel_sha256"]) | candidate_seen
        fair = np.array([not (digest & seen) for digest in digests], dtype=bool)
        excluded = int((~fair).sum())
        if not _enough(labels[fair], classes):
            return unfair(_too_few(int(fair.sum()), labels[fair], classes,
                                   after="remain that it did not train on"), excluded)
        kept = [file for file, keep in zip(files, fair) if keep]
        try:
            theirs = score_model_folder(Path(folder), kept)
        except DataError as err:
            return unfair(str(err), excluded)
    if set(candidate.columns) != set(theirs.columns):
        return unfair(f"its outputs {[c for c in theirs.columns if c != 'path']} are not the "
                      f"candidate's {[c for c in candidate.columns if c != 'path']}", excluded)
    mine = candidate[fair].reset_index(drop=True)
    theirs = theirs.set_index("path").reindex(mine["path"]).reset_index()
    both = _answered(mine) & _answered(theirs)
    if not _enough(labels[fair][both], classes):
        return unfair(_too_few(int(both.sum()), labels[fair][both], classes,
                               after="answered by both (it answered " + str(int(_answered(theirs).sum())) + ")"),
                      excluded)
    compared = labels[fair][both]
    return Comparison(metric, score(compared, mine[both]), score(compared, theirs[both]), champion_version,
                      int(both.sum()), data_version, excluded=excluded)


def _plain(settings: Mapping) -> dict:
    """The pixel settings that shape an image (not the decoder's memory bound), as their JSON
    reads back (tuples as lists), so two records compare equal. ``color_management: none`` is
    left out too: it is what every record written before the option meant, so a champion
    registered then still compares with a model trained now on the same pixels."""
    return json.loads(json.dumps({k: v for k, v in dict(settings).items() if k != "max_decoded_mib"
                                  and not (k == "color_management" and v == "none")}))


def check_run(run_id: str, *, digests_file: Path, secret: bytes) -> None:
    """Leak scan of the MLflow run and its children against the identifying values' digests that
    deidentify wrote (:mod:`dicomflow.deid.digests`); DataError (one line, no value) on any hit."""
    try:
        identifiers = read_digests(digests_file, secret)
    except ValueError as err:
        raise DataError(f"leak check: {err}; the model is not registered") from err
    leaks = scan_mlflow_run(identifiers, run_id)
    if leaks:
        raise DataError(f"leak check: {len(leaks)} identifying value(s) in MLflow, where and what "
                         "kind (never the value): "
                         + "; ".join(f"a {leak.source} value at {leak.output} {leak.location}"
                                     for leak in leaks[:20]) + "; the model is not registered")
    logger.info("leak check: none of %s identifying values found in MLflow run %s",
                f"{len(identifiers):,}", run_id)


def check_card(card: str, *, digests_file: Path, secret: bytes, name: str) -> None:
    """Leak scan of a model card as the scanner reads the logged artifact (a file ``name``);
    DataError (one line, where and what kind, never the value) on any hit."""
    with tempfile.TemporaryDirectory() as folder:
        draft = Path(folder) / name
        draft.write_text(card, encoding="utf-8")
        leaks = scan_paths(read_digests(digests_file, secret), [draft])
    if leaks:
        raise DataError(f"leak check: {len(leaks)} identifying value(s) in the model card, where and what "
                         "kind (never the value): " + "; ".join(
                             f"a {leak.source} value at {leak.location}" for leak in leaks[:20])
                         + "; the model is not registered")


def read_secret_fingerprint(path: Path) -> dict[str, str]:
    """``{"deid_secret_fingerprint": ..., "deid_demo_secret": "true"|"false"}`` from deidentify's
    ``secret_fingerprint.json`` (:data:`dicomflow.config.layout.DEID_SECRET_FINGERPRINT`), both
    "not recorded" when the file is absent (outputs of an older deidentify)."""
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"deid_secret_fingerprint": "not recorded", "deid_demo_secret": "not recorded"}
    except (OSError, ValueError) as err:
        raise DataError(f"{path} is not the JSON deidentify writes ({type(err).__name__}); rerun "
                        "deidentify (dvc repro deidentify)") from None
    fingerprint = str(content.get("fingerprint", ""))
    if len(fingerprint) != 16 or any(c not in "0123456789abcdef" for c in fingerprint) \
            or not isinstance(content.get("demo"), bool):
        raise DataError(f"{path} holds no 16-hex fingerprint and demo flag; rerun deidentify (dvc repro deidentify)")
    return {"deid_secret_fingerprint": fingerprint, "deid_demo_secret": "true" if content["demo"] else "false"}
