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

from dicomflow.config.layout import UNLABELLED_LABEL
from dicomflow.errors import SettingsError
from dicomflow.metrics import METRIC_NAMES, TASKS

PARAMS_FILE = Path("params.yaml")
PIPELINE_FILE = Path("dvc.yaml")
# The checkout this code belongs to: its dvc.yaml gives the layout where a working folder has none
# (a stage run by hand in a scratch folder with a copied params.yaml, as the tests do).
CHECKOUT = Path(__file__).resolve().parents[2]


class ParamsError(SettingsError):
    """A value in ``params.yaml`` is missing, unknown, of the wrong type or out of range."""


# Choices the library checks too (it is called without params): declared here, once.
LABEL_KEYS = ("accession_number", "study_instance_uid", "series_instance_uid", "sop_instance_uid", "path")
# ingest.unit: image (every frame an image) | series (CT: a series' files one volume, ingest.series)
UNITS = ("image", "series")
SERIES_POLICIES = ("strict", "dedupe", "fill_gaps")
# Named HU windows (center, width); ingest.series.window takes one of these or [center, width].
WINDOWS = {"lung": (-600.0, 1500.0), "mediastinum": (40.0, 400.0), "bone": (400.0, 1800.0)}
THRESHOLD_METHODS = ("youden", "fixed", "target_sensitivity")
# What evaluate scores: each image, or each study (its images' probabilities combined by one of
# AGGREGATIONS: dicomflow.model.aggregation, dicomflow.evaluation.studies).
EVALUATION_LEVELS = ("image", "study")
# mean: every part counts alike (a diffuse finding, or views that each show it); max: the single
# most suspicious part decides (a nodule on one slice), but one false-positive slice is enough to
# call the study; topk_mean: the mean of the k most suspicious parts, between the two.
AGGREGATIONS = ("mean", "max", "topk_mean")
INIT_KEYWORDS = ("scratch", "pretrain")
INIT_URI_SCHEMES = ("models:/", "runs:/")
PRIVACY_ACCOUNTANTS = ("pld", "rdp")
COLOR_MANAGEMENT = ("none", "srgb")
# binary: two classes, one sigmoid; multiclass: k > 2 classes, softmax; ordinal: k > 2 grades in
# the order of ingest.classes, whose predicted grade probabilities respect that order. Declared in
# the metrics registry (dicomflow.metrics.TASKS), which says what each task is scored on.
PRIVACY_UNITS = ("image", "patient")
# Architectures without batch normalisation: it mixes the examples of a batch (one image's
# gradient depends on the others') and its running statistics are a release no accountant counts.
PRIVATE_ARCHITECTURES = ("seed_cnn", "resnet_small_gn")
# train.architecture: networks of images (batch, h, w, c) and of volumes (batch, d, h, w, c), the
# latter for ingest.unit: series only (dicomflow.model.architectures builds them; declared here so
# that the params loader needs no model package).
IMAGE_ARCHITECTURES = ("seed_cnn", "resnet_small", "resnet_small_gn")
VOLUME_ARCHITECTURES = ("resnet3d_small", "attention_mil")


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
    pretrain_dir: str
    pretrain_history: str
    model_dir: str
    train_history: str
    train_curves: str
    eval_metrics: str
    eval_report: str
    eval_plots: str
    eval_subgroups: str


@dataclass(frozen=True)
class SeriesParams:
    """``ingest.series``: how a series of slices becomes a volume (read with ``ingest.unit: series``)."""

    # strict: a broken series is quarantined with its reason; dedupe: byte-identical duplicate
    # files dropped first; fill_gaps: dedupe, and missing slices interpolated (and counted).
    policy: str = field(default="strict", metadata=_choices(*SERIES_POLICIES))
    min_slices: int = field(default=8, metadata=_interval(2, None))
    # [z, y, x] of the resampled volume; the default is coarse for CPUs (1 mm is 125x the voxels)
    spacing_mm: list[float] = field(default_factory=lambda: [5.0, 5.0, 5.0])
    volume_size: list[int] = field(default_factory=lambda: [32, 64, 64])  # [d, h, w]: cropped or padded with air
    window: str | list[float] = "lung"  # a name of WINDOWS or [center, width] in HU

    def __post_init__(self) -> None:
        key = "params.yaml: 'ingest.series"
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0:
            raise ParamsError(f"{key}.spacing_mm' must be [z, y, x], three positive millimetres; "
                              f"got {self.spacing_mm}")
        if len(self.volume_size) != 3 or not all(4 <= v <= 1024 for v in self.volume_size):
            raise ParamsError(f"{key}.volume_size' must be [d, h, w], three sizes in [4, 1024]; "
                              f"got {self.volume_size}")
        if isinstance(self.window, str) and self.window not in WINDOWS:
            raise ParamsError(f"{key}.window' must be one of {', '.join(WINDOWS)} or [center, width] "
                              f"in HU; got {self.window!r}")
        if isinstance(self.window, list) and not (len(self.window) == 2 and self.window[1] > 0):
            raise ParamsError(f"{key}.window' must be [center, width] with a positive width in HU; "
                              f"got {self.window}")

    @property
    def window_hu(self) -> tuple[float, float]:
        """The window as (center, width) in HU."""
        return WINDOWS[self.window] if isinstance(self.window, str) else (float(self.window[0]),
                                                                           float(self.window[1]))


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
    # Images without a label: quarantined (no_label), or kept for self-supervised pretraining
    # (never in validation or test; dicomflow.config.layout.UNLABELLED).
    unlabelled: str = field(default="quarantine", metadata=_choices("quarantine", "pretrain"))
    # Colour photographs (channels: 3): none keeps the pixels as stored (decoded to RGB); srgb converts
    # them through the file's ICC profile (ICCProfile) to sRGB, so two cameras' colours compare.
    color_management: str = field(default="none", metadata=_choices(*COLOR_MANAGEMENT))
    # full: every source pixel decoded; reduced: images much larger than image_size decoded at about
    # twice its resolution (JPEG 2000 resolution levels, JPEG DCT scaling, block averages), fitted to
    # the same geometry (dicomflow.dicom.reduced).
    decode: str = field(default="reduced", metadata=_choices("full", "reduced"))
    # image: every frame of every file an image | series: the files of a series one volume.
    unit: str = field(default="image", metadata=_choices(*UNITS))
    series: SeriesParams = field(default_factory=SeriesParams)  # read with unit: series only

    def __post_init__(self) -> None:
        if self.unlabelled == "pretrain" and UNLABELLED_LABEL in self.classes:
            raise ParamsError(f"params.yaml: 'ingest.classes' may not hold {UNLABELLED_LABEL} with "
                              f"ingest.unlabelled: pretrain ({UNLABELLED_LABEL} marks an unlabelled image); "
                              f"got {self.classes}; renumber that class")


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
    # ingest.channels 3: below this mean channel range (pixels in [0, 1]) a colour image is grey.
    min_colour_spread: float = field(default=0.02, metadata=_interval(0.0, 1.0))
    # ingest.unit series: allowed distinct slice positions per series, slice spacing (mm) and
    # largest orientation deviation of a slice from its series' plane (degrees).
    slice_count_range: list[int] = field(default_factory=lambda: [8, 2000])
    slice_spacing_range: list[float] = field(default_factory=lambda: [0.3, 10.0])
    max_orientation_deviation_deg: float = field(default=0.0, metadata=_interval(0.0, 90.0))

    def __post_init__(self) -> None:
        for name in ("image_size_range", "pixel_spacing_range", "slice_count_range", "slice_spacing_range"):
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
class PrivacyParams:
    """``train.privacy``: DP-SGD (:mod:`dicomflow.model.privacy`; docs/privacy.md)."""

    enabled: bool = False
    # The budget the noise is calibrated to (null: noise_multiplier given instead).
    target_epsilon: float | None = field(default=8.0, metadata=_interval(0.0, None, closed="neither"))
    # null: 1 / (10 N), N the training images (patients with unit: patient); must stay below 1 / N.
    delta: float | None = field(default=None, metadata=_interval(0.0, 1.0, closed="neither"))
    max_grad_norm: float = field(default=1.0, metadata=_interval(0.0, None, closed="neither"))
    accountant: str = field(default="pld", metadata=_choices(*PRIVACY_ACCOUNTANTS))
    # null: calibrated to target_epsilon; given: epsilon is computed (and capped by target_epsilon if set).
    noise_multiplier: float | None = field(default=None, metadata=_interval(0.0, None, closed="neither"))
    # What one neighbouring data set differs by: one image, or all the images of one patient.
    unit: str = field(default="image", metadata=_choices(*PRIVACY_UNITS))

    def __post_init__(self) -> None:
        if self.enabled and self.target_epsilon is None and self.noise_multiplier is None:
            raise ParamsError("params.yaml: 'train.privacy' needs target_epsilon or noise_multiplier when enabled; "
                              "got both null: set target_epsilon (e.g. 8.0)")


@dataclass(frozen=True)
class TrainParams:
    architecture: str = field(metadata=_choices(*IMAGE_ARCHITECTURES, *VOLUME_ARCHITECTURES))
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
    # Where the weights start: scratch, the pretrain stage's encoder, or a registered model
    # (models:/NAME@ALIAS, models:/NAME/VERSION) or a run's model (runs:/RUN_ID/PATH).
    init: str = "scratch"
    # Epochs with the transferred encoder frozen (batch normalisation in inference mode) and only
    # the rebuilt head trained, before every layer trains.
    freeze_epochs: int = field(default=0, metadata=_interval(0, 10_000))
    # The transferred encoder's learning rate as a share of lr (1: the same as the head's).
    encoder_lr_factor: float = field(default=1.0, metadata=_interval(0.0, 1.0, closed="right"))
    # Differentially private training (DP-SGD); off by default.
    privacy: PrivacyParams = field(default_factory=PrivacyParams)
    # What the labels are: checked against ingest.classes by check_task.
    task: str = field(default="binary", metadata=_choices(*TASKS))

    def __post_init__(self) -> None:
        if not (self.init in INIT_KEYWORDS or self.init.startswith(INIT_URI_SCHEMES)):
            raise ParamsError(f"params.yaml: 'train.init' must be one of {', '.join(INIT_KEYWORDS)} or a "
                              f"model URI starting {' or '.join(INIT_URI_SCHEMES)} "
                              f"(models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/PATH); got {self.init!r}")
        if self.init == "scratch" and (self.freeze_epochs or self.encoder_lr_factor != 1.0):
            raise ParamsError("params.yaml: 'train.freeze_epochs' and 'train.encoder_lr_factor' act on transferred "
                              "weights, but 'train.init' is 'scratch': set train.init, or freeze_epochs: 0 and "
                              "encoder_lr_factor: 1.0")
        if self.privacy.enabled:
            _check_private_training(self)


def _check_private_training(params: TrainParams) -> None:
    """The train settings DP-SGD cannot honour: one line each saying what to change."""
    key = "params.yaml: 'train.privacy.enabled' is true but"
    if params.architecture not in PRIVATE_ARCHITECTURES:
        raise ParamsError(f"{key} 'train.architecture' is {params.architecture!r}, which uses batch normalisation "
                          f"(it mixes the images of a batch; its statistics are an unaccounted release): "
                          f"set architecture to one of {', '.join(PRIVATE_ARCHITECTURES)}")
    if params.init != "scratch":
        raise ParamsError(f"{key} 'train.init' is {params.init!r}: those weights were learnt from the same private "
                          "images without differential privacy, so no epsilon would hold; set init: scratch")
    if params.strategy == "multi_worker":
        raise ParamsError(f"{key} 'train.strategy' is 'multi_worker': each worker would draw its own secret "
                          "batches and noise (docs/privacy.md); set strategy to default or mirrored")
    if params.ensemble > 1:
        raise ParamsError(f"{key} 'train.ensemble' is {params.ensemble}: each member would spend a budget of its "
                          "own on the same images (their epsilons compose); set ensemble: 1")
    if params.class_weight != "none":
        raise ParamsError(f"{key} 'train.class_weight' is {params.class_weight!r}: balanced weights are computed "
                          "from the private labels' counts, a release no accountant counts; set class_weight: none")


@dataclass(frozen=True)
class PretrainParams:
    # none: the stage writes a one-line record and trains nothing; simclr: two augmented views of
    # each image, NT-Xent loss (Chen et al. 2020), on the training split's and unlabelled images.
    method: str = field(metadata=_choices("none", "simclr"))
    epochs: int = field(metadata=_interval(1, 10_000))
    batch_size: int = field(metadata=_interval(2, 65_536))
    lr: float = field(metadata=_interval(0.0, 1.0, closed="right"))
    temperature: float = field(metadata=_interval(0.0, None, closed="neither"))  # of the NT-Xent softmax
    projection_dim: int = field(metadata=_interval(1, 4096))
    # The views' augmentation: the augment policy with each strength multiplied by this.
    view_strength: float = field(metadata=_interval(0.0, 10.0))
    seed: int
    # The random resized crop's smallest box, as a share of the image's area. SimCLR's 0.08 is for
    # 224-pixel photographs; on 64-pixel radiographs such a box holds a few structures at most.
    crop_min_scale: float = field(default=0.3, metadata=_interval(0.0, 1.0, closed="right"))


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
    # The largest accounted ε (train's privacy.json, in its unit) a champion may have; a model above
    # it, or trained without differential privacy, is registered as challenger. None: no requirement.
    require_privacy: float | None = field(default=None, metadata=_interval(0.0, None, closed="neither"))
    # Ordinal tasks: the grade (a value of ingest.classes) from which an image counts as referable;
    # evaluate reports the derived "at least this grade" binary figures. None: not reported.
    referable_grade: int | None = None
    # image: every figure per image (each image carries its study's label); study: the images of a
    # study (the manifest's study_key) combined into one probability by study_aggregation, and every
    # figure, the threshold chosen on validation studies and the intervals computed on studies.
    level: str = field(default="image", metadata=_choices(*EVALUATION_LEVELS))
    study_aggregation: str = field(default="topk_mean", metadata=_choices(*AGGREGATIONS))
    # topk_mean: the largest probabilities of a study averaged (capped by its images).
    study_top_k: int = field(default=2, metadata=_interval(1, 1000))


def check_task(task: str, classes: list[int], *, referable_grade: int | None = None) -> None:
    """Refuse a ``train.task`` that does not fit ``ingest.classes``, or a referable grade outside them.

    Raises
    ------
    ParamsError
        binary without exactly two classes, multiclass or ordinal with fewer than three, or
        ``referable_grade`` not one of the classes after the first (or given for another task).
    """
    if task == "binary" and len(classes) != 2:
        raise ParamsError(f"params.yaml: 'train.task' is 'binary' but 'ingest.classes' has {len(classes)} classes "
                          f"({classes}): set task to multiclass, or to ordinal when the classes are ordered grades")
    if task != "binary" and len(classes) < 3:
        raise ParamsError(f"params.yaml: 'train.task' is {task!r} but 'ingest.classes' has {len(classes)} classes "
                          f"({classes}); {task} needs three or more: set task: binary")
    if referable_grade is None:
        return
    if task != "ordinal":
        raise ParamsError(f"params.yaml: 'evaluate.referable_grade' is {referable_grade} but 'train.task' is "
                          f"{task!r}; referable grades apply to ordinal tasks: set it to null")
    if referable_grade not in classes[1:]:
        raise ParamsError(f"params.yaml: 'evaluate.referable_grade' is {referable_grade}; expected one of the grades "
                          f"after the first in 'ingest.classes' {classes[1:]}")


def check_architecture(architecture: str, unit: str) -> None:
    """Refuse a ``train.architecture`` that does not take what ``ingest.unit`` makes.

    Raises
    ------
    ParamsError
        A volume network (:data:`VOLUME_ARCHITECTURES`) with ``unit: image``, or an image network
        with ``unit: series``.
    """
    if unit == "image" and architecture in VOLUME_ARCHITECTURES:
        raise ParamsError(f"params.yaml: 'train.architecture' is {architecture!r}, a network of volumes, but "
                          f"'ingest.unit' is 'image' (2-D images): set ingest.unit: series, or architecture to "
                          f"one of {', '.join(IMAGE_ARCHITECTURES)}")
    if unit == "series" and architecture not in VOLUME_ARCHITECTURES:
        raise ParamsError(f"params.yaml: 'train.architecture' is {architecture!r}, a network of 2-D images, but "
                          f"'ingest.unit' is 'series' (volumes): set architecture to one of "
                          f"{', '.join(VOLUME_ARCHITECTURES)}, or ingest.unit: image")


SECTIONS: dict[str, type] = {
    "ingest": IngestParams,
    "deidentify": DeidentifyParams,
    "validate": ValidateParams,
    "split": SplitParams,
    "augment": AugmentParams,
    "pretrain": PretrainParams,
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
def load_params(section: typing.Literal["pretrain"], path: Path = ...) -> PretrainParams: ...
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
        raise ParamsError(f"{source}: section {section!r} is missing or not a mapping; got {raw!r}")
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
        if dataclasses.is_dataclass(hints[name]):  # a nested section, e.g. train.privacy
            values[name] = build_section(hints[name], key, raw[name], source=source)
        else:
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
    if dataclasses.is_dataclass(hint):
        return f"a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}"
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
