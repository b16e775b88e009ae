"""The model card of a registered version: what the model is for, what it was trained and tested
on, how well it does, where it may be used and why it was promoted, in Markdown.

:func:`model_card` builds it from what the evaluate stage already has (the split manifest, the
test metrics, the subgroup table, the training domain, the params, the promotion decision), with
no MLflow inside; ``stages/evaluate.py`` logs it as the evaluation run's ``model_card.md`` and sets it as the
version's description
(:func:`registry_description` where the registry's limit is shorter than the card).

The card prints counts and category names only (modalities, manufacturers, view positions, the
subgroups' groups), never a row's value (keys, file names, ages), and the category names come
from the de-identified manifest; the leak scanner still reads the card before the version is
registered.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import pandas as pd

from dicomflow.evaluation.intervals import N_RESAMPLES, interval_from_report

if TYPE_CHECKING:  # annotations only: the card takes plain values
    from dicomflow.config.params import AugmentParams, EvaluateParams, IngestParams, TrainParams
    from dicomflow.serving.domain import TrainingDomain

CARD_FILE = "model_card.md"  # the artifact's name in the evaluation run
# A model version's description is a VARCHAR(5000) in MLflow's SQL stores (PostgreSQL and MySQL
# refuse a longer one; SQLite does not check).
DESCRIPTION_LIMIT = 5000
# Subgroups of fewer test images than this give figures too noisy to compare (an AUC on 10
# images moves by 0.1 with one image); the card names them under the limitations.
FEW_IMAGES = 30
LISTED = 8  # subgroups named in a limitation; the table has them all
# The card's sections in the order a description too long for the registry leaves them out.
# Intended use ("not for diagnostic use") is never left out.
SHORTENED_FIRST = ("Subgroups", "Domain", "Model", "Training data", "Performance", "Known limitations",
                   "Promotion")
SPLIT_ORDER = ("train", "val", "test")
# The training split's composition on the card: manifest column -> its name in words.
COMPOSITION = {"modality": "Modality", "manufacturer": "Manufacturer", "view_position": "View position"}
NOT_AVAILABLE = "–"
DECISION_LIMIT = 400  # characters of the promotion decision on the card (the version's tag has it whole)
COUNT_COLUMNS = ("n", "n_patients", "n_positive")  # the subgroup table's counts
NOT_RECORDED = "not recorded"
DEMO_WARNING = ("> **Warning: the demo de-identification secret made this data.** Its pseudonyms can be "
                "reversed by anyone with dicomflow's source (the demo secret is public): this model and its "
                "data are for the embedded sample only, never for real patients' data.")
SUBGROUP_HEADERS = {"n_patients": "patients", "n_positive": "n positive", "roc_auc": "AUC",
                    "roc_auc_ci": "AUC 95% CI", "sensitivity": "sens.", "specificity": "spec.", "accuracy": "acc."}
INTERVAL_COLUMNS = ("roc_auc_ci_low", "roc_auc_ci_high", "roc_auc_ci_note")  # shown as one column, roc_auc_ci


def card_title(name: str, version: str | None) -> str:
    """The card's first line: ``# Model card: <name> version <version>``."""
    return f"# Model card: {name} " + (f"version {version}" if version is not None else "(not yet registered)")


def model_card(*, name: str, version: str | None, alias: str, decision: str, manifest: pd.DataFrame,
               data_version: str, metrics: Mapping[str, float], subgroups: pd.DataFrame | None,
               domain: TrainingDomain, threshold: float | None, ingest: IngestParams,
               evaluate: EvaluateParams, train: TrainParams | None = None, augment: AugmentParams | None = None,
               validation: Mapping[str, float] | None = None, secret: Mapping[str, str] | None = None,
               excluded: int = 0, lineage: Mapping[str, str] | None = None,
               privacy: Mapping[str, object] | None = None, referable_threshold: float | None = None) -> str:
    """The model card of one registered version, in Markdown.

    Parameters
    ----------
    name, version : str
        The registered model's name and the version (None before it is registered).
    alias, decision : str
        The alias the version got (champion or challenger) and the promotion decision in words
        (:meth:`dicomflow.evaluation.promotion.Comparison.decide`).
    manifest : DataFrame
        The split manifest (``layout.MANIFEST_SCHEMA`` with ``split``): counted only.
    data_version : str
        :func:`dicomflow.tracking.data_version`.
    metrics : mapping
        The test metrics evaluate computed (:func:`~dicomflow.evaluation.metrics.compute_metrics`
        or :func:`~dicomflow.evaluation.metrics.compute_multiclass_metrics`, with
        :func:`~dicomflow.evaluation.metrics.calibration_metrics`).
    subgroups : DataFrame or None
        :func:`~dicomflow.evaluation.metrics.subgroup_metrics` (``paths.eval_subgroups``).
    domain : TrainingDomain
        What the registered model accepts.
    threshold : float or None
        The operating threshold (None for more than two classes).
    ingest, evaluate, train, augment : params dataclasses
        ``ingest.classes``, the input settings, the threshold method and promotion settings; the
        training and augmentation settings (None: "not recorded").
    validation : mapping or None
        The saved model's figures on the validation split, as train logged them without the
        ``model_val_`` prefix (``auc``, ``loss``, ``accuracy``, ``brier``, ``ece``,
        ``brier_uncalibrated``, ``ece_uncalibrated``); None or empty: not recorded.
    secret : mapping or None
        Which de-identification secret made the data: ``deid_secret_fingerprint`` and
        ``deid_demo_secret`` ("true", "false" or "not recorded";
        :func:`dicomflow.evaluation.promotion.read_secret_fingerprint`). None: not recorded.
    excluded : int
        Validation images left out of the promotion comparison because the champion trained on
        them.
    lineage : mapping or None
        Where the weights started: the training run's ``dicomflow.init*`` tags
        (:attr:`dicomflow.model.transfer.InitialWeights.lineage`); None or empty: from scratch.
    privacy : mapping or None
        The differential-privacy guarantee train wrote beside the model (``privacy.json``:
        :func:`dicomflow.config.layout.read_privacy_record`); None: trained without DP. The
        membership attack's figures are read from ``metrics`` (``membership_*``).

    referable_threshold : float or None
        Ordinal tasks with ``evaluate.referable_grade``: the threshold on P(grade >= referable
        grade) chosen on validation, stated as the referable operating point; None: not chosen.

    Returns
    -------
    str
        Markdown, starting with :func:`card_title` (and a warning when the demo secret made the
        data); sections Intended use, Training data, Model, Performance, Privacy, Subgroups, Domain,
        Known limitations, Promotion.
    """
    classes = list(ingest.classes)
    binary = len(classes) == 2
    secret = dict(secret or {})
    demo = secret.get("deid_demo_secret") == "true"
    sections = [
        card_title(name, version),
        *([DEMO_WARNING] if demo else []),
        _intended_use(domain, classes),
        _training_data(manifest, classes, data_version, secret),
        _model(ingest, evaluate, train, augment, metrics, threshold, binary, classes, lineage or {},
               referable_threshold),
        _performance(metrics, validation, classes, binary, threshold),
        _privacy(privacy, metrics),
        _subgroup_section(subgroups),
        _domain(domain),
        _limitations(manifest, metrics, subgroups, threshold, evaluate, classes, binary, demo),
        _promotion(name, version, alias, decision, evaluate, excluded),
    ]
    return "\n\n".join(sections) + "\n"


def registry_description(card: str, *, where: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """``card`` as a model version's description: whole when it fits in ``limit`` characters; else
    with the bodies of its sections replaced by a pointer to ``where`` (the whole card), in the
    order of :data:`SHORTENED_FIRST` (the subgroup table first: it grows with the data), until it
    fits, and a last line saying so."""
    if len(card) <= limit:
        return card
    note = f"\n\n*Shortened to the registry's {limit} characters: the whole card is {where}.*\n"
    head, *sections = card.rstrip("\n").split("\n\n## ")
    titles = [section.split("\n", 1)[0] for section in sections]
    for title in SHORTENED_FIRST:
        if title in titles:
            sections[titles.index(title)] = f"{title}\n\nIn the whole card."
        text = "\n\n## ".join([head, *sections]) + note
        if len(text) <= limit:
            return text
    return text[:limit - len(note)].rstrip() + note


# --- sections ---------------------------------------------------------------------------------

def _intended_use(domain: TrainingDomain, classes: list[int]) -> str:
    kind = " ".join(part for part in (_text(_listed(sorted(domain.body_parts))).lower(),
                                      _text("/".join(sorted(domain.modalities)))) if part) or "DICOM"
    return ("## Intended use\n\n"
            f"Research and pipeline demonstration: it calls {kind} images one of its training classes "
            f"({_listed(classes)}), to compare models and settings.\n\n"
            "**Not for diagnostic use.** It is not a medical device and is not clinically validated; "
            "its output must not inform anyone's diagnosis or treatment. A human reads every image.")


def _training_data(manifest: pd.DataFrame, classes: list[int], data_version: str, secret: Mapping[str, str]) -> str:
    splits = [s for s in SPLIT_ORDER if (manifest["split"] == s).any()]
    splits += sorted(set(manifest["split"].dropna().astype(str)) - set(splits))
    total = len(manifest)
    header = ["Split", "Images", "Patients", *(f"Class {c}: images (patients)" for c in classes)]
    rows = []
    for split, rows_of in [*((s, manifest[manifest["split"] == s]) for s in splits), ("all", manifest)]:
        cells = [split, f"{len(rows_of)} ({_share(len(rows_of), total)})", str(_patients(rows_of))]
        for c in classes:
            members = rows_of[rows_of["label"] == c]
            cells.append(f"{len(members)} ({_patients(members)})")
        rows.append(cells)
    train = manifest[manifest["split"] == "train"]
    composition = [f"- {title}: {_counts(train[column]) if column in train else 'not recorded'}"
                   for column, title in COMPOSITION.items()]
    return ("## Training data\n\n"
            f"Data version `{data_version}` (DVC's hash of `data/`), split by patient; images (one per "
            "frame kept) and distinct patients. " + _secret_line(secret) + "\n\n"
            + _table(header, rows)
            + f"\n\nThe {len(train)} training images by header attribute:\n\n"
            + "\n".join(composition))


def _secret_line(secret: Mapping[str, str]) -> str:
    fingerprint = secret.get("deid_secret_fingerprint", NOT_RECORDED)
    if fingerprint == NOT_RECORDED:
        return "De-identification secret: not recorded (outputs of an older deidentify)."
    kind = {"true": "the **demo secret** (public: for the embedded sample only)",
            "false": "a site secret"}.get(secret.get("deid_demo_secret", ""), "a secret of unrecorded kind")
    return f"De-identification secret: {kind}, fingerprint `{_text(fingerprint)}`."


def _model(ingest: IngestParams, evaluate: EvaluateParams, train: TrainParams | None,
           augment: AugmentParams | None, metrics: Mapping[str, float], threshold: float | None,
           binary: bool, classes: list[int], lineage: Mapping[str, str],
           referable_threshold: float | None = None) -> str:
    size = f"{ingest.image_size} x {ingest.image_size} x {ingest.channels}"
    task = train.task if train is not None else None
    if task is None or (task == "binary") != binary:  # not recorded, or params that check_task refuses
        task = "binary" if binary else "multiclass"
    output = {"binary": f"probability of class {classes[1]} (sigmoid)",
              "multiclass": f"a probability for each of the {len(classes)} classes (softmax)",
              "ordinal": f"a probability for each of the {len(classes)} grades, from {len(classes) - 1} "
                         "continuation-ratio logits (P(grade > j | grade >= j)), so that P(grade >= j) "
                         "never rises with j"}[task]
    lines = [f"- Task: {_task(task, classes)}.",
             f"- Input: {_input(ingest) if ingest.unit == 'series' else size} ({ingest.pixel_dtype}, scaled to "
             f"[0, 1]); output: {output}."]
    if train is None:
        lines.append("- Architecture and training: not recorded.")
    else:
        lines += [
            f"- Architecture: `{train.architecture}`, "
            + (f"{train.ensemble} networks (seeds {train.seed}-{train.seed + train.ensemble - 1}) averaged."
               if train.ensemble > 1 else f"one network (seed {train.seed})."),
            f"- Training: up to {train.epochs} epochs, batch size {train.batch_size}, learning rate "
            f"{train.lr:g} ({train.lr_schedule} schedule), class weights {train.class_weight}, early "
            f"stopping patience {train.early_stopping_patience}, weights kept: `{train.keep}`.",
            f"- Initial weights: {_initial_weights(lineage, train)}",
            f"- Calibration: `{train.calibration}`"
            + (" (fitted on validation)" if train.calibration == "temperature" else "")
            + f", temperature {_f(metrics.get('temperature'))}.",
        ]
    lines.append(f"- Augmentation (training batches): {_augmentation(augment)}.")
    if metrics.get("level") == "study":
        lines.append(f"- {_study_level(metrics)}")
    if task == "ordinal":
        lines.append(f"- Operating point: {_ordinal_operating_point(evaluate, referable_threshold)}.")
    else:
        lines.append(f"- Operating point: {_operating_point(evaluate, threshold, binary, classes)}.")
    return "## Model\n\n" + "\n".join(lines)


def _input(ingest: IngestParams) -> str:
    """A volume model's input in words (``ingest.unit: series``): the volume's shape, spacing and
    window, and that a single DICOM file is refused."""
    series = ingest.series
    window = series.window if isinstance(series.window, str) else "custom"
    center, width = series.window_hu
    return (f"one CT series as a volume of {' x '.join(map(str, series.volume_size))} voxels (d x h x w, one "
            f"channel), resampled to {' x '.join(f'{s:g}' for s in series.spacing_mm)} mm (z, y, x), {window} "
            f"window {center:g}/{width:g} HU (center/width), cropped or padded with air; the registered model "
            "refuses single DICOM files (serving a series of files comes later)")


def _unit(metrics: Mapping[str, object]) -> str:
    """What the test figures count: ``images``, ``series`` (volumes), or ``studies (of N images)``
    at level study."""
    if metrics.get("level") == "series":
        return "series"
    if metrics.get("level") != "study":
        return "images"
    return f"studies (of {int(metrics.get('n_test_images', 0))} images)"


def _study_level(metrics: Mapping[str, object]) -> str:
    """The evaluation level in words, for a model evaluated per study (``evaluate.level: study``)."""
    method, k = metrics.get("study_aggregation"), metrics.get("study_top_k")
    how = f"the mean of its {k} most probable images" if method == "topk_mean" else f"the {method} over its images"
    served = metrics.get("image_threshold")
    return ("Evaluated per study (`evaluate.level: study`): a study's probability is " + how + " (calibrated "
            "probabilities); every test figure, the operating threshold (chosen on validation studies) and the "
            "intervals are per study. A single file is served at the threshold chosen on validation images"
            + (f", {_f(served, 4)}" if isinstance(served, (int, float)) else "")
            + "; `dicomflow predict --per-study` answers per study.")


def _task(task: str, classes: list[int]) -> str:
    """The task and its classes or grades, in words (``train.task``)."""
    if task == "ordinal":
        return f"ordinal (`train.task: ordinal`), grades {' < '.join(map(str, classes))} in this order"
    if task == "multiclass":
        return f"multi-class (`train.task: multiclass`), classes {_listed(classes)} without order"
    return f"binary (`train.task: binary`), classes {_listed(classes)}"


def _ordinal_operating_point(evaluate: EvaluateParams, referable_threshold: float | None) -> str:
    """How an ordinal model calls an image: the median grade, and the referable call when set."""
    text = ("each image is called the median of its grade distribution (the smallest grade whose cumulative "
            "probability reaches 0.5: the call with the least expected grade error)")
    if evaluate.referable_grade is None:
        return text
    text += f"; referable: P(grade >= {evaluate.referable_grade}) (`evaluate.referable_grade`)"
    if referable_threshold is None:
        return text + ", reported as a probability, no threshold chosen"
    return text + f", called referable at {_f(referable_threshold, 4)} or more (chosen on the validation split)"


def _initial_weights(lineage: Mapping[str, str], train: TrainParams) -> str:
    """Where the weights started, in words (the training run's ``dicomflow.init*`` tags)."""
    init = lineage.get("dicomflow.init", "scratch")
    if init == "scratch":
        return "random (`train.init: scratch`)."
    detail = {key.removeprefix("dicomflow.init."): _text(value) for key, value in lineage.items()}
    if init == "pretrain":
        source = (f"the pretrain stage's encoder (`{detail.get('pretrain_method', '?')}`, self-supervised on "
                  f"{detail.get('pretrain_images', '?')} training and unlabelled images of data version "
                  f"`{detail.get('pretrain_data_version', '?')}`"
                  + (f", MLflow run `{detail['pretrain_run']}`" if "pretrain_run" in detail else "") + ")")
    else:
        source = (f"registered model `{detail.get('source_model', '?')}` version {detail.get('source_version', '?')} "
                  f"(`{_text(init)}`, signature verified; trained on data version "
                  f"`{detail.get('source_data_version', '?')}`; its training images are left out of the "
                  "promotion comparison)")
    return (f"{source}, layers matched by name; the encoder frozen for the first {train.freeze_epochs} epochs, "
            f"then trained at {train.encoder_lr_factor:g} x the learning rate.")


def _performance(metrics: Mapping[str, float], validation: Mapping[str, float] | None, classes: list[int],
                 binary: bool, threshold: float | None) -> str:
    n_test = int(metrics.get("n_test", 0))
    unit = _unit(metrics)
    parts = ["## Performance",
             f"Test split: {n_test} {unit}, used for this report only."]
    auc = ("ROC AUC", _with_interval(metrics, "roc_auc"))
    if binary:
        positives = int(metrics.get("n_test_positive", 0))
        negatives = max(n_test - positives, 0)
        tp = _count(metrics.get("sensitivity"), positives)
        tn = _count(metrics.get("specificity"), negatives)
        fp, fn = negatives - tn, positives - tp
        rows = [auc,
                ("Average precision", _f(metrics.get("average_precision"))),
                ("Sensitivity", _proportion(metrics, "sensitivity", tp, positives)),
                ("Specificity", _proportion(metrics, "specificity", tn, negatives)),
                ("PPV", _proportion(metrics, "ppv", tp, tp + fp)),
                ("NPV", _proportion(metrics, "npv", tn, tn + fn)),
                ("F1", _f(metrics.get("f1"))),
                ("Accuracy", _proportion(metrics, "accuracy", tp + tn, n_test))]
        parts[1] = (f"Test split: {n_test} {unit}, {positives} of class {classes[1]} (prevalence "
                    f"{_share(positives, n_test)}), used for this report only; rates at threshold "
                    f"{_f(threshold, 4)}.")
    else:
        correct = _count(metrics.get("accuracy"), n_test)
        rows = [("Macro " + auc[0], auc[1]),
                ("Accuracy (most probable class)", _proportion(metrics, "accuracy", correct, n_test)),
                ("Macro F1", _f(metrics.get("macro_f1")))]
    parts[1] += " " + _interval_method(metrics)
    parts.append(_table(["Test metric", "Value"], rows))
    if not binary:
        per_class = []
        for c in classes:
            n_c = int(metrics.get(f"n_test_{c}", 0))
            sensitivity, specificity = metrics.get(f"sensitivity_{c}"), metrics.get(f"specificity_{c}")
            per_class.append([str(c), str(n_c), _f(metrics.get(f"roc_auc_{c}")),
                              _proportion(metrics, f"sensitivity_{c}", _count(sensitivity, n_c), n_c),
                              _proportion(metrics, f"specificity_{c}", _count(specificity, n_test - n_c),
                                          n_test - n_c),
                              _f(metrics.get(f"ppv_{c}")), _f(metrics.get(f"f1_{c}"))])
        parts.append("Each class against the others:\n\n"
                     + _table(["Class", "Images", "ROC AUC", "Sensitivity", "Specificity", "PPV", "F1"],
                              per_class))
    parts.append("Test calibration (ECE in 10 bins):\n\n"
                 + _table(["Probabilities", "Brier", "ECE"],
                          [("as registered (calibrated)", _f(metrics.get("brier"), 4), _f(metrics.get("ece"), 4)),
                           ("without the calibration", _f(metrics.get("brier_uncalibrated"), 4),
                            _f(metrics.get("ece_uncalibrated"), 4))]))
    if validation:
        at_half = "at 0.5" if binary else "most probable class"
        parts.append(
            "Validation (the saved model, from train): "
            f"ROC AUC {_f(validation.get('auc'))}, loss {_f(validation.get('loss'), 4)}, accuracy "
            f"({at_half}) {_f(validation.get('accuracy'))}, Brier {_f(validation.get('brier'), 4)} "
            f"(uncalibrated {_f(validation.get('brier_uncalibrated'), 4)}), ECE "
            f"{_f(validation.get('ece'), 4)} (uncalibrated {_f(validation.get('ece_uncalibrated'), 4)}).")
    else:
        parts.append("Validation split: not recorded in the training run.")
    return "\n\n".join(parts)


def _privacy(privacy: Mapping[str, object] | None, metrics: Mapping[str, object]) -> str:
    """The guarantee (or that there is none), what it means in plain words, and the attack."""
    if privacy is None:
        head = ("**No formal privacy guarantee**: trained without differential privacy. De-identification "
                "protects the files, not the patients from the model, which may have memorised its training images.")
    else:
        unit = _text(privacy.get("unit", "image"))
        patient = privacy.get("patient_epsilon")
        group = ""
        if isinstance(patient, (int, float)) and unit != "patient":  # group privacy over a patient's images
            group = (f" A whole patient's images: ε = {_f(patient, 2)}." if math.isfinite(patient) else
                     " A whole patient's images: no bound (group privacy over them gives none at this δ).")
        words = {key: _text(str(privacy.get(key, "?")).replace("_", " "))
                 for key in ("neighbouring", "accountant", "sampling")}
        head = (f"Trained with differential privacy (DP-SGD): **ε = {_f(privacy['epsilon'], 2)}, δ = "
                f"{float(privacy['delta']):g} per {unit}** ({words['neighbouring']}; `{words['accountant']}` "
                f"accountant, {words['sampling']} sampling q {_f(privacy.get('sampling_probability'), 4)}, "
                f"{_n(privacy.get('steps'))} steps, noise multiplier {_f(privacy.get('noise_multiplier'), 2)}, "
                f"clipping norm {_f(privacy.get('max_grad_norm'), 2)}).{group} "
                f"It means: whether or not any one {unit} was trained on, everything the model outputs is almost "
                "equally likely (at most e^ε times, but for a chance δ), so no one can tell from the model whether "
                f"it was. It does not hide what the data as a whole show (a pattern common to many patients is "
                "learnt, as intended), nor protect the de-identified files, nor the validation images (they chose "
                "the epoch and the threshold).")
    return "## Privacy\n\n" + head + "\n\n" + _attack(metrics, dp=privacy is not None)


def _attack(metrics: Mapping[str, object], *, dp: bool) -> str:
    """The membership attack's figures, in one paragraph (or that it was not run)."""
    if metrics.get("membership_auc") is None:
        return "Membership attack: not run."
    bound = metrics.get("membership_epsilon_lower_bound")
    confidence = 1 - float(metrics.get("membership_alpha", 0.05))
    within = ", within the accounted ε" if dp else ""
    auc = _with_interval(metrics, "membership_auc")
    return (f"Membership attack (loss threshold, {_n(metrics.get('membership_n_members'))} training against "
            f"{_n(metrics.get('membership_n_nonmembers'))} test images): AUC {auc} (0.5: chance), TPR "
            f"{_with_interval(metrics, 'membership_tpr_at_fpr')} at "
            f"{float(metrics.get('membership_fpr', 0.01)):.0%} FPR; ε proven >= {_f(bound, 2)} ({confidence:.0%} "
            f"confidence{within}). A weak attack: a small figure proves no privacy.")


def _subgroup_section(subgroups: pd.DataFrame | None) -> str:
    if subgroups is None or subgroups.empty:
        return "## Subgroups\n\nNo subgroup table was computed."
    table = subgroups.copy()
    if set(INTERVAL_COLUMNS) & set(table):  # the three interval columns as one: ends, or why not
        table["roc_auc_ci"] = [_subgroup_interval(row) for row in table.to_dict("records")]
        table = table.drop(columns=[c for c in INTERVAL_COLUMNS if c in table])
    first = ["attribute", "group", "n", "n_patients", "n_positive", "roc_auc", "roc_auc_ci", "sensitivity",
             "specificity", "accuracy"]
    columns = [c for c in first if c in table] + [c for c in table if c not in first]
    header = [SUBGROUP_HEADERS.get(c, c) for c in columns]
    rows, previous = [], None
    for row in table[columns].itertuples(index=False):
        cells = [_cell(c, value) for c, value in zip(columns, row)]
        attribute = str(row[0])
        cells[0] = "" if attribute == previous else _attribute(attribute)
        rows.append(cells)
        previous = attribute
    return ("## Subgroups\n\n"
            f"Test images by group (\"unknown\": not recorded; {NOT_AVAILABLE}: a class missing; sens. and "
            "spec. at the threshold; the AUC's 95% interval resamples the group's patients, or says why it "
            "is not estimable); read each figure with its n.\n\n"
            + _table(header, rows))


def _subgroup_interval(row: Mapping[str, object]) -> str:
    """A subgroup's AUC interval cell: ``0.912-0.987``, why there is none, or a dash."""
    interval = interval_from_report(dict(row), "roc_auc")
    return NOT_AVAILABLE if interval is None else interval.describe()


def _domain(domain: TrainingDomain) -> str:
    return ("## Domain\n\n"
            f"{domain.describe()}. A file whose header is outside it gets `out_of_domain`, no score (an "
            "attribute a file lacks is not checked).")


def _limitations(manifest: pd.DataFrame, metrics: Mapping[str, float], subgroups: pd.DataFrame | None,
                 threshold: float | None, evaluate: EvaluateParams, classes: list[int], binary: bool,
                 demo: bool = False) -> str:
    train = manifest[manifest["split"] == "train"]
    val = manifest[manifest["split"] == "val"]
    items = ["Made with the demo de-identification secret: its pseudonyms are reversible; never use "
             "this model or its data with real patients' data."] if demo else []
    items += [
        f"Small data: {len(train)} training images of {_patients(train)} patients; by default a small "
        "synthetic sample (`dicomflow sample-data`) that says nothing about real images.",
        "Single site: validation and test come from the training data's source, so every figure is "
        "internal; other sites, detectors and populations are untested.",
        "The domain check reads headers only: a file inside the domain can still be unlike the "
        "training images, and its score is then unvalidated.",
    ]
    if subgroups is not None and not subgroups.empty:
        few = subgroups[subgroups["n"] < FEW_IMAGES]
        no_auc = subgroups[subgroups["roc_auc"].isna()] if "roc_auc" in subgroups else subgroups.iloc[:0]
        if few.empty:
            items.append(f"Every subgroup has at least {FEW_IMAGES} test images; their figures are still "
                         "less certain than the whole split's.")
        else:
            items.append(f"Noisy figures, under {FEW_IMAGES} test images: "
                         + _some([f"{_attribute(r.attribute)} {_text(r.group)} (n {int(r.n)})"
                                  for r in few.itertuples()]) + ".")
        if not no_auc.empty:
            items.append("No ROC AUC where a subgroup lacks a class: "
                         + _some([f"{_attribute(r.attribute)} {_text(r.group)}" for r in no_auc.itertuples()]) + ".")
    if binary:
        if metrics.get("level") == "study" and "study_key" in val:  # the threshold was chosen on studies
            studies = val.groupby("study_key")["label"].first()
            chosen_on = f"{len(studies)} studies, {int((studies == classes[1]).sum())} of class {classes[1]}"
        else:
            chosen_on = f"{len(val)} images, {int((val['label'] == classes[1]).sum())} of class {classes[1]}"
        items.append(f"Threshold chosen on validation ({chosen_on}): "
                     "sensitivity and specificity on new data can differ.")
        items.append("PPV and NPV hold at the test prevalence "
                     f"({_share(int(metrics.get('n_test_positive', 0)), int(metrics.get('n_test', 0)))}) only.")
    else:
        items.append("No threshold: each image is called its most probable class, which favours "
                     "the classes frequent in training.")
    items.append("Calibration was fitted on validation: its probabilities hold at this data set's class mix.")
    return "## Known limitations\n\n" + "\n".join(f"- {item}" for item in items)


def _promotion(name: str, version: str | None, alias: str, decision: str, evaluate: EvaluateParams,
               excluded: int = 0) -> str:
    registered = f"version {version}" if version is not None else "the version to be registered"
    left_out = (f" {excluded} of them were left out because the champion trained on them." if excluded else "")
    return ("## Promotion\n\n"
            f"{registered.capitalize()}, alias `{alias}`; compared with the champion, both as registered (the "
            "champion only from a copy whose signature verified), on the validation files that neither trained "
            f"on (never test).{left_out} Decision: {_text(_clipped(decision))}")


# --- pieces -----------------------------------------------------------------------------------

def _augmentation(augment: AugmentParams | None) -> str:
    if augment is None:
        return "not recorded"
    steps = [text for on, text in (
        (augment.flip, "left-right flip"),
        (augment.rotation_deg > 0, f"rotation up to ±{augment.rotation_deg:g}°"),
        (augment.zoom > 0, f"zoom ±{augment.zoom:.0%}"),
        (augment.shift > 0, f"shift up to {augment.shift:.0%} of the side"),
        (augment.brightness > 0, f"brightness ±{augment.brightness:g}"),
        (augment.contrast > 0, f"contrast ±{augment.contrast:.0%}"),
        (augment.noise_std > 0, f"Gaussian noise SD {augment.noise_std:g}"),
    ) if on]
    return ", ".join(steps) if steps else "none"


def _operating_point(evaluate: EvaluateParams, threshold: float | None, binary: bool, classes: list[int]) -> str:
    if not binary or threshold is None:
        return "each image is called its most probable class (no threshold)"
    how = {"youden": "Youden's J on the validation split",
           "fixed": f"fixed at {evaluate.fixed_threshold:g} (`evaluate.fixed_threshold`)",
           "target_sensitivity": f"the highest threshold reaching sensitivity {evaluate.target_sensitivity:g} "
                                 "on the validation split"}.get(evaluate.threshold_method, evaluate.threshold_method)
    per_study = evaluate.level == "study"  # the threshold was chosen on, and calls, studies
    if per_study:
        how = how.replace("the validation split", "the validation split's studies")
    return (f"threshold {_f(threshold, 4)}, `{evaluate.threshold_method}` ({how}); class {classes[1]} "
            f"when the {'study probability' if per_study else 'probability'} is at least the threshold")


def _some(items: list[str], *, limit: int = LISTED) -> str:
    """The first ``limit`` of ``items`` joined, and how many more there are."""
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _patients(rows: pd.DataFrame) -> int:
    return int(rows["patient_key"].nunique()) if "patient_key" in rows else 0


def _counts(column: pd.Series) -> str:
    """``CR 231, DX 225``: each category's count, most frequent first (missing: "not recorded")."""
    values = column.astype("object").where(column.notna(), None)
    values = values.map(lambda v: "not recorded" if v is None or not str(v).strip() else str(v).strip())
    counts = values.value_counts()
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{_text(value)} {count}" for value, count in ordered) or "none"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def _cell(column: str, value: object) -> str:
    """A subgroup table cell: counts whole, figures to 3 decimals, a missing figure as a dash."""
    if isinstance(value, str):
        return _text(value)
    try:
        missing = bool(pd.isna(value))
    except (TypeError, ValueError):
        missing = False
    if missing:
        return NOT_AVAILABLE
    if column in COUNT_COLUMNS:
        return str(int(value))
    if isinstance(value, (int, float)) or hasattr(value, "dtype"):
        return _f(float(value))
    return _text(value)


def _attribute(name: object) -> str:
    """A subgroup attribute in words: ``view_position`` -> ``view position``."""
    return _text(str(name).replace("_", " "))


def _clipped(text: str, limit: int = DECISION_LIMIT) -> str:
    """``text`` cut to ``limit`` characters (a champion's scoring error can be long)."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def _text(value: object) -> str:
    """A category name as Markdown text: one line, Markdown's special characters escaped."""
    text = " ".join(str(value).split())
    return "".join(f"\\{c}" if c in "\\`*_{}[]<>|#" else c for c in text)


def _f(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NOT_AVAILABLE
    return f"{value:.{digits}f}"


def _n(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else str(int(value))


def _with_interval(metrics: Mapping[str, object], name: str) -> str:
    """``0.850 (0.700-0.950)``, ``1.000 (not estimable: ...)``, or the figure alone (no interval stored)."""
    value, interval = metrics.get(name), interval_from_report(dict(metrics), name)
    return _f(value) if interval is None else f"{_f(value)} ({_text(interval.describe())})"


def _count(fraction: float | None, n: int) -> int:
    return 0 if fraction is None or n == 0 or math.isnan(fraction) else round(fraction * n)


def _proportion(metrics: Mapping[str, object], name: str, successes: int, n: int) -> str:
    """``0.963 (0.874-1.000; 52/54)``: the figure, its patient-bootstrap interval (or why there is
    none) and the image counts behind it."""
    value, interval = metrics.get(name), interval_from_report(dict(metrics), name)
    if value is None or not 0 <= successes <= n or n == 0:
        return _f(value)
    inside = f"{_text(interval.describe())}; " if interval is not None else ""
    return f"{_f(value)} ({inside}{successes}/{n})"


def _interval_method(metrics: Mapping[str, object]) -> str:
    """How the card's intervals were made, in one sentence."""
    patients = metrics.get("n_test_patients")
    if patients is None:
        return "No intervals recorded (a report of an older version)."
    # Why patients: one patient's images are not independent (dicomflow.evaluation.intervals).
    return (f"95% intervals: bootstrap of the {int(patients)} test patients ({N_RESAMPLES} resamples, each "
            "patient with all its images); where none can be estimated, the reason.")


def _share(part: int, whole: int) -> str:
    return f"{part / whole:.1%}" if whole else NOT_AVAILABLE


def _listed(values: Sequence) -> str:
    return ", ".join(map(str, values))
