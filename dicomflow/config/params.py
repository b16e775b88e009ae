"""The one typed loader for ``params.yaml`` (and for the file locations declared in ``dvc.yaml``).

Every stage reads its section through :func:`load_params`; a missing, unknown, mistyped or
out-of-range key stops the stage with one line that names the key, the value and what is allowed.
File locations are not params: they are declared once, as the ``paths`` variables of
``dvc.yaml`` (``vars:``), and ``load_params("paths")`` reads them from there.

Constraints live beside each field (``metadata``), so the allowed values are written once and the
error messages are generated from them, in the spirit of scikit-learn's parameter validation.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from dicomflow.errors import SettingsError
from dicomflow.metrics import METRIC_NAMES

PARAMS_FILE = Path("params.yaml")
PIPELINE_FILE = Path("dvc.yaml")
# The checkout this code belongs to: its dvc.yaml gives the layout where a working folder has none
# (a stage run by hand in a scratch folder with a copied params.yaml, as the tests do).
CHECKOUT = Path(__file__).resolve().parents[2]


class ParamsError(SettingsError):
    """A value in ``params.yaml`` is missing, unknown, of the wrong type or out of range."""


# Choices the library checks too (it is called without params): declared here, once.
LABEL_KEYS = ("accession_number", "study_instance_uid", "sop_instance_uid", "path")
THRESHOLD_METHODS = ("youden", "fixed", "target_sensitivity")


def _choices(*allowed: str | int) -> dict[str, Any]:
    return {"choices": allowed}


def _interval(low: float | None, high: float | None, *, closed: str = "both") -> dict[str, Any]:
    """Allowed range; ``closed`` is one of both, left, right, neither."""
    return {"interval": (low, high, closed)}


@dataclass(frozen=True)
class PathsParams:
    """Where the pipeline's files are (``dvc.yaml``'s ``vars:``), relative to the project root."""

    data: str
    labels: str
    secret_fingerprint: str
    ingest_dir: str
    ingest_metrics: str
    deid_dir: str
    deid_metrics: str
    validation_report: str
    validation_metrics: str
    data_profile: str
    split_dir: str
    split_counts: str
    augment_preview: str
    model_dir: str
    train_history: str
    train_curves: str
    eval_metrics: str
    eval_report: str
    eval_plots: str
    eval_subgroups: str


@dataclass(frozen=True)
class IngestParams:
    label_key: str = field(metadata=_choices(*LABEL_KEYS))
    classes: list[int]
    image_size: int = field(metadata=_interval(16, 1024))
    channels: int = field(metadata=_choices(1, 3))
    pixel_dtype: str = field(metadata=_choices("uint8", "float16"))
    frames: str = field(metadata=_choices("first", "middle", "all"))
    voi_index: int = field(metadata=_interval(0, None))
    target_spacing_mm: float | None = field(metadata=_interval(0.0, None, closed="neither"))
    workers: int = field(metadata=_interval(0, 1024))
    file_timeout_s: float = field(metadata=_interval(0.0, None, closed="neither"))
    max_decoded_mib: int = field(metadata=_interval(1, None))
    max_quarantine_fraction: float = field(metadata=_interval(0.0, 1.0))


@dataclass(frozen=True)
class DeidentifyParams:
    remove_private_tags: bool
    retain_patient_characteristics: bool
    retain_longitudinal_dates: bool
    max_date_shift_days: int = field(metadata=_interval(1, 36_500))
    clean_descriptors: bool
    retain_device_identity: bool
    burned_in_text: str = field(metadata=_choices("identifying", "any"))
    burned_in_action: str = field(metadata=_choices("blank", "exclude"))
    burned_in_modalities: list[str] | None
    burned_in_image_types: list[str] | None
    burned_in_manufacturers: list[str] | None
    burned_in_regions: list[list[float]] | None
    workers: int = field(metadata=_interval(0, 1024))
    file_timeout_s: float = field(metadata=_interval(0.0, None, closed="neither"))
    max_quarantine_fraction: float = field(metadata=_interval(0.0, 1.0))

    def __post_init__(self) -> None:
        key = "params.yaml: 'deidentify.burned_in_regions'"
        for region in self.burned_in_regions or []:
            if not (len(region) == 4 and all(0 <= v <= 1 for v in region)
                    and region[0] < region[2] and region[1] < region[3]):
                raise ParamsError(f"{key} must hold [top, left, bottom, right] fractions in [0, 1] "
                                  f"with top < bottom and left < right; got {region}")


@dataclass(frozen=True)
class ValidateParams:
    modalities: list[str]
    min_class_fraction: float = field(metadata=_interval(0.0, 0.5))
    min_image_std: float = field(metadata=_interval(0.0, 1.0))
    max_extreme_share: float = field(metadata=_interval(0.0, 1.0))
    image_size_range: list[int]
    pixel_spacing_range: list[float]
    drift_max_label_change: float = field(metadata=_interval(0.0, 1.0))
    drift_max_mix_change: float = field(metadata=_interval(0.0, 1.0))
    drift_max_intensity_shift: float = field(metadata=_interval(0.0, None))

    def __post_init__(self) -> None:
        for name in ("image_size_range", "pixel_spacing_range"):
            bounds = getattr(self, name)
            if len(bounds) != 2 or bounds[0] > bounds[1]:
                raise ParamsError(
                    f"params.yaml: 'validate.{name}' must be [low, high] with low <= high; got {bounds}"
                )


@dataclass(frozen=True)
class SplitParams:
    method: str = field(metadata=_choices("patient_stratified", "predefined"))
    val_size: float = field(metadata=_interval(0.0, 1.0, closed="neither"))
    test_size: float = field(metadata=_interval(0.0, 1.0, closed="neither"))
    seed: int

    def __post_init__(self) -> None:
        if self.val_size + self.test_size >= 1:
            raise ParamsError(
                f"params.yaml: 'split.val_size' + 'split.test_size' must be below 1 to leave a "
                f"training set; got {self.val_size} + {self.test_size}"
            )


@dataclass(frozen=True)
class AugmentParams:
    seed: int
    flip: bool
    rotation_deg: float = field(metadata=_interval(0.0, 180.0))
    zoom: float = field(metadata=_interval(0.0, 0.5))
    shift: float = field(metadata=_interval(0.0, 0.5))
    brightness: float = field(metadata=_interval(0.0, 1.0))
    contrast: float = field(metadata=_interval(0.0, 1.0, closed="left"))
    noise_std: float = field(metadata=_interval(0.0, 1.0))


@dataclass(frozen=True)
class TrainParams:
    architecture: str = field(metadata=_choices("seed_cnn", "resnet_small"))
    # tf.distribute strategy: default (one device), mirrored (every local GPU), multi_worker
    # (MultiWorkerMirroredStrategy over the cluster in TF_CONFIG).
    strategy: str = field(metadata=_choices("default", "mirrored", "multi_worker"))
    epochs: int = field(metadata=_interval(1, 10_000))
    batch_size: int = field(metadata=_interval(1, 65_536))
    lr: float = field(metadata=_interval(0.0, 1.0, closed="right"))
    lr_schedule: str = field(metadata=_choices("constant", "cosine"))
    class_weight: str = field(metadata=_choices("none", "balanced"))
    early_stopping_patience: int = field(metadata=_interval(0, 10_000))
    # Which weights the stage keeps: the epoch of lowest validation loss (a proper score: AUC
    # saturates at 1.0 on an easy split and then keeps the first epoch that reaches it), of best
    # validation AUC, or the last one. Early stopping watches the same figure (the loss for last).
    keep: str = field(metadata=_choices("best_val_loss", "best_val_auc", "last_epoch"))
    # temperature: one temperature fitted on the validation split, folded into the saved model.
    calibration: str = field(metadata=_choices("none", "temperature"))
    # Networks trained with seeds seed, seed + 1, ...; the model averages their probabilities.
    ensemble: int = field(metadata=_interval(1, 100))
    seed: int


@dataclass(frozen=True)
class EvaluateParams:
    threshold_method: str = field(metadata=_choices(*THRESHOLD_METHODS))
    fixed_threshold: float = field(metadata=_interval(0.0, 1.0))
    target_sensitivity: float = field(metadata=_interval(0.0, 1.0, closed="right"))
    registered_model_name: str
    # Any registered metric; evaluate checks that it applies to the task (dicomflow.metrics.metric_for).
    promotion_metric: str = field(metadata=_choices(*METRIC_NAMES))
    promotion_min_gain: float = field(metadata=_interval(0.0, 1.0))
    # The floor a model's validation ROC AUC (macro one-vs-rest with more than two classes) must
    # reach before any version is registered; 0.5 is chance.
    min_validation_auc: float = field(metadata=_interval(0.0, 1.0))


SECTIONS: dict[str, type] = {
    "ingest": IngestParams,
    "deidentify": DeidentifyParams,
    "validate": ValidateParams,
    "split": SplitParams,
    "augment": AugmentParams,
    "train": TrainParams,
    "evaluate": EvaluateParams,
}

T = TypeVar("T")


def read_params_file(path: Path = PARAMS_FILE) -> dict[str, Any]:
    """Read ``params.yaml`` as a plain dict (used for logging every param to MLflow)."""
    with open(path, encoding="utf-8") as stream:
        raw = yaml.safe_load(stream)
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if "paths" in raw:
        raise ParamsError(f"{path}: file locations are no params: move the 'paths' section to the 'vars' "
                          f"of {PIPELINE_FILE} (as the repository's own {PIPELINE_FILE} declares them)")
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ParamsError(
            f"{path}: unknown section {unknown[0]!r}; allowed sections: {', '.join(SECTIONS)}"
        )
    return raw


@typing.overload
def load_params(section: typing.Literal["paths"], path: Path = ...) -> PathsParams: ...
@typing.overload
def load_params(section: typing.Literal["ingest"], path: Path = ...) -> IngestParams: ...
@typing.overload
def load_params(section: typing.Literal["deidentify"], path: Path = ...) -> DeidentifyParams: ...
@typing.overload
def load_params(section: typing.Literal["validate"], path: Path = ...) -> ValidateParams: ...
@typing.overload
def load_params(section: typing.Literal["split"], path: Path = ...) -> SplitParams: ...
@typing.overload
def load_params(section: typing.Literal["augment"], path: Path = ...) -> AugmentParams: ...
@typing.overload
def load_params(section: typing.Literal["train"], path: Path = ...) -> TrainParams: ...
@typing.overload
def load_params(section: typing.Literal["evaluate"], path: Path = ...) -> EvaluateParams: ...


def load_params(section: str, path: Path = PARAMS_FILE) -> Any:
    """Load and check one section of ``params.yaml``.

    Parameters
    ----------
    section : str
        Section name, one of :data:`SECTIONS` (``"train"``, ...), or ``"paths"``: the file
        locations, read by :func:`load_paths` from the ``dvc.yaml`` beside ``path``.
    path : Path, default=params.yaml
        The parameters file.

    Returns
    -------
    A frozen dataclass instance of the section's type (e.g. :class:`TrainParams`).

    Raises
    ------
    ParamsError
        One line naming the key, the value found and what is allowed.
    """
    if section == "paths":
        return load_paths(path.parent / PIPELINE_FILE)
    if section not in SECTIONS:
        raise ParamsError(f"unknown params section {section!r}; allowed: paths, {', '.join(SECTIONS)}")
    raw = read_params_file(path)
    # Every section, not only the one asked for: DVC reruns a stage only for the keys it declares,
    # so a typo in another section ("split.sed") would otherwise never be reported.
    built = {name: build_section(cls, name, raw.get(name)) for name, cls in SECTIONS.items()}
    return built[section]


def load_paths(path: Path = PIPELINE_FILE) -> PathsParams:
    """The file locations: the ``paths`` variables of ``dvc.yaml`` (an entry of its ``vars:``
    list), checked like a params section.

    Parameters
    ----------
    path : Path, default=dvc.yaml
        The pipeline file; when it does not exist, the ``dvc.yaml`` of the checkout this code
        comes from (the same relative locations, taken from the working folder).

    Raises
    ------
    ParamsError
        Neither file exists, it declares no ``paths`` variables, or a location is missing,
        unknown or not a string.

    Notes
    -----
    Written in ``dvc.yaml`` itself, not in ``params.yaml`` or a file that ``vars:`` names: DVC
    lists both as params (a column each in ``dvc exp show``), but not variables declared inline.
    """
    if not path.is_file() and (CHECKOUT / PIPELINE_FILE).is_file():
        path = CHECKOUT / PIPELINE_FILE
    try:
        with open(path, encoding="utf-8") as stream:
            raw = yaml.safe_load(stream)
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such file; its 'vars' declare where the pipeline's files are") from None
    declared = [item["paths"] for item in (raw or {}).get("vars") or [] if isinstance(item, dict) and "paths" in item]
    if len(declared) != 1:
        raise ParamsError(f"{path}: expected one 'paths' mapping among its 'vars' (the file locations), "
                          f"found {len(declared)}")
    return build_section(PathsParams, "paths", declared[0], source=path.name)


def build_section(cls: type[T], section: str, raw: Any, *, source: str = "params.yaml") -> T:
    """Check ``raw`` (a mapping from YAML) against the dataclass ``cls`` and build it; ``source``
    names the file in messages."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: section {section!r} is missing or not a mapping")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"{source}: unknown key '{section}.{unknown[0]}'; allowed keys: {', '.join(fields)}"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, fld in fields.items():
        key = f"{section}.{name}"
        if name not in raw:
            raise ParamsError(f"{source}: missing key '{key}' ({_describe(hints[name], fld)})")
        values[name] = _check_value(key, raw[name], hints[name], fld, source=source)
    return cls(**values)


def _check_value(key: str, value: Any, hint: Any, fld: dataclasses.Field, *, source: str) -> Any:
    """Return ``value`` converted to ``hint`` or raise a one-line ParamsError."""
    if not _matches(value, hint):
        raise ParamsError(f"{source}: '{key}' must be {_describe(hint, fld)}; got {value!r}")
    if value is None:  # only an optional field gets here: nothing to range-check
        return value
    if hint is float:
        value = float(value)
    choices = fld.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ParamsError(f"{source}: '{key}' must be {_describe(hint, fld)}; got {value!r}")
    interval = fld.metadata.get("interval")
    if interval is not None and not _in_interval(value, *interval):
        raise ParamsError(f"{source}: '{key}' must be {_describe(hint, fld)}; got {value!r}")
    return value


def _matches(value: Any, hint: Any) -> bool:
    """Type check for the few YAML shapes params use (bool is not an int here)."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and len(value) > 0 and all(_matches(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _in_interval(value: float, low: float | None, high: float | None, closed: str) -> bool:
    low_ok = low is None or (value >= low if closed in ("both", "left") else value > low)
    high_ok = high is None or (value <= high if closed in ("both", "right") else value < high)
    return low_ok and high_ok


def _describe(hint: Any, fld: dataclasses.Field) -> str:
    """Say in words what a field accepts, e.g. 'a float in (0.0, 1.0)'."""
    origin = typing.get_origin(hint)
    if origin is list:
        text = f"a non-empty list of {typing.get_args(hint)[0].__name__}"
    else:
        args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        name = getattr(args[0], "__name__", str(args[0]))
        text = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
        if len(args) < len(typing.get_args(hint)):
            text = f"null or {text}"
    choices = fld.metadata.get("choices")
    if choices is not None:
        text = "one of " + ", ".join(repr(c) for c in choices)
    interval = fld.metadata.get("interval")
    if interval is not None:
        low, high, closed = interval
        if high is None:
            text += f" {'>=' if closed in ('both', 'left') else '>'} {low}"
        else:
            left = "[" if closed in ("both", "left") else "("
            right = "]" if closed in ("both", "right") else ")"
            text += f" in {left}{low}, {high}{right}"
    return text
