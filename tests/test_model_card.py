"""The model card: each section and its figures for a small hand-made evaluation, no identifying
value however the manifest's rows are keyed, and the description the registry can store."""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicomflow.config.params import AugmentParams, EvaluateParams, IngestParams, TrainParams
from dicomflow.deid.identifiers import collect_identifiers
from dicomflow.evaluation.model_card import (
    DESCRIPTION_LIMIT,
    card_title,
    model_card,
    registry_description,
)
from dicomflow.serving.domain import TrainingDomain

SOURCE = pydicom.dcmread(get_testdata_file("CT_small.dcm"), stop_before_pixels=True)

# Ten images: train 6 (patients pA x2 and pB of class 0, pC x2 and pD of class 1), val 2, test 2.
# Every row value that must never reach the card holds the source file's identifying values.
SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
LABELS = [0, 0, 0, 1, 1, 1, 0, 1, 0, 1]
PATIENTS = ["pA", "pA", "pB", "pC", "pC", "pD", "pE", "pF", "pG", "pH"]
MODALITIES = ["CR", "CR", "CR", "CR", "DX", "DX", "CR", "DX", "CR", "DX"]
MANUFACTURERS = ["Orion Systems", "Orion Systems", "Kestrel Imaging", "Orion Systems", "Kestrel Imaging", None,
                 "Orion Systems", "Orion Systems", "Kestrel Imaging", "Kestrel Imaging"]
VIEWS = ["PA", "PA", "AP", "PA", "AP", "LL", "PA", "PA", "AP", "AP"]


def hand_manifest() -> pd.DataFrame:
    name, patient_id = str(SOURCE.PatientName), str(SOURCE.PatientID)
    return pd.DataFrame({
        "image_key": [f"{patient_id}-{i}" for i in range(10)],
        "patient_key": [f"{name} {p}" for p in PATIENTS],
        "study_key": [f"{SOURCE.StudyInstanceUID}.{i}" for i in range(10)],
        "label": LABELS,
        "modality": MODALITIES,
        "manufacturer": pd.array(MANUFACTURERS, dtype="string"),
        "body_part": "CHEST",
        "view_position": VIEWS,
        "patient_sex": "F",
        "patient_age_years": pd.array([71, 72, 73, 74, 75, 76, 77, 78, 79, 80], dtype="Int64"),
        "rows": 256, "columns": 256, "pixel_spacing_mm": 0.15, "bits_stored": 12,
        "photometric": "MONOCHROME2", "predefined_split": "",
        "pixel_sha256": [f"{SOURCE.SOPInstanceUID}{i}" for i in range(10)],
        "dicom_file": [f"dicom/{name}_{i}.dcm" for i in range(10)],
        "split": SPLITS,
    })


# Test figures as compute_metrics and calibration_metrics name them: 20 images of 14 patients, 8
# positive; at the threshold TP 6, FN 2, TN 10, FP 2. PPV's interval is not estimable.
PPV_NOTE = "not estimable: no image is called positive in 120 of 1000 resamples of 14 patients"
BINARY_METRICS = {
    "roc_auc": 0.85, "roc_auc_ci_low": 0.7, "roc_auc_ci_high": 0.95, "roc_auc_ci_note": "",
    "average_precision": 0.8, "brier": 0.15,
    "accuracy": 0.8, "accuracy_ci_low": 0.6, "accuracy_ci_high": 0.95, "accuracy_ci_note": "",
    "sensitivity": 0.75, "sensitivity_ci_low": 0.5, "sensitivity_ci_high": 1.0, "sensitivity_ci_note": "",
    "specificity": 10 / 12, "specificity_ci_low": 0.6, "specificity_ci_high": 1.0, "specificity_ci_note": "",
    "ppv": 0.75, "ppv_ci_low": None, "ppv_ci_high": None, "ppv_ci_note": PPV_NOTE,
    "npv": 10 / 12, "npv_ci_low": 0.65, "npv_ci_high": 0.95, "npv_ci_note": "",
    "f1": 0.75, "threshold": 0.42, "n_test": 20, "n_test_positive": 8, "n_test_patients": 14,
    "ece": 0.05, "brier_uncalibrated": 0.17, "ece_uncalibrated": 0.09, "temperature": 1.5,
}
VALIDATION = {"loss": 0.4321, "auc": 0.91, "accuracy": 0.85, "brier": 0.12, "ece": 0.04,
              "ece_uncalibrated": 0.08, "brier_uncalibrated": 0.13}
NAN = float("nan")
# As the stage reads reports/subgroups.csv back: an empty note is NaN.
ORION_NOTE = "not estimable: only 850 of 1000 resamples of 20 patients hold every class"
SUBGROUPS = pd.DataFrame([
    {"attribute": "patient_sex", "group": "F", "n": 12, "n_patients": 11, "roc_auc": 0.9, "roc_auc_ci_low": 0.75,
     "roc_auc_ci_high": 0.98, "roc_auc_ci_note": NAN, "accuracy": 0.8333, "n_positive": 5,
     "sensitivity": 0.8, "specificity": 0.8571},
    {"attribute": "patient_sex", "group": "M", "n": 8, "n_patients": 6, "roc_auc": NAN, "roc_auc_ci_low": NAN,
     "roc_auc_ci_high": NAN, "roc_auc_ci_note": "not estimable: no AUC, the group lacks a class", "accuracy": 0.75,
     "n_positive": 0, "sensitivity": NAN, "specificity": 0.75},
    {"attribute": "manufacturer", "group": "Orion Systems", "n": 40, "n_patients": 20, "roc_auc": 0.8,
     "roc_auc_ci_low": NAN, "roc_auc_ci_high": NAN, "roc_auc_ci_note": ORION_NOTE, "accuracy": 0.775,
     "n_positive": 16, "sensitivity": 0.75, "specificity": 0.7917},
])
DOMAIN = TrainingDomain(modalities=frozenset({"CR", "DX"}), photometrics=frozenset({"MONOCHROME2"}),
                        channels=frozenset({1}), rows=(256, 512), columns=(256, 512), pixel_spacing_mm=(0.1, 0.2),
                        body_parts=frozenset({"CHEST"}))
INGEST = IngestParams(label_key="accession_number", classes=[0, 1], image_size=64, channels=1, pixel_dtype="uint8",
                      frames="first", voi_index=0, target_spacing_mm=None, workers=0, file_timeout_s=120.0,
                      max_decoded_mib=2048, max_quarantine_fraction=0.1)
EVALUATE = EvaluateParams(threshold_method="youden", fixed_threshold=0.5, target_sensitivity=0.9,
                          registered_model_name="dicomflow-classifier", promotion_metric="roc_auc",
                          promotion_min_gain=0.01, min_validation_auc=0.6)
TRAIN = TrainParams(architecture="seed_cnn", strategy="default", epochs=12, batch_size=16, lr=0.0005,
                    lr_schedule="cosine", class_weight="balanced", early_stopping_patience=4, keep="best_val_auc",
                    calibration="temperature", ensemble=3, seed=7)
AUGMENT = AugmentParams(seed=7, flip=True, rotation_deg=8.0, zoom=0.0, shift=0.05, brightness=0.05, contrast=0.1,
                        noise_std=0.0)
DECISION = ("champion: roc_auc on 2 val images of data 6fae9174604f, candidate 0.9100 vs champion version 2 "
            "0.8800 (minimum gain 0.01)")


def binary_card(**changes) -> str:
    arguments = dict(name="dicomflow-classifier", version="3", alias="champion", decision=DECISION,
                     manifest=hand_manifest(), data_version="6fae9174604f8407817ccd77b4d5ebae.dir",
                     metrics=BINARY_METRICS, subgroups=SUBGROUPS, domain=DOMAIN, threshold=0.42, ingest=INGEST,
                     evaluate=EVALUATE, train=TRAIN, augment=AUGMENT, validation=VALIDATION)
    return model_card(**{**arguments, **changes})


def section(card: str, title: str) -> str:
    """The text of ``## title`` up to the next section."""
    start = card.index(f"\n## {title}\n")
    end = card.find("\n## ", start + 1)
    return card[start:end if end != -1 else len(card)]


def test_the_card_has_every_section_in_order():
    card = binary_card()
    assert card.startswith(card_title("dicomflow-classifier", "3") + "\n")
    assert card_title("dicomflow-classifier", "3") == "# Model card: dicomflow-classifier version 3"
    titles = [line[3:] for line in card.splitlines() if line.startswith("## ")]
    assert titles == ["Intended use", "Training data", "Model", "Performance", "Privacy", "Subgroups", "Domain",
                      "Known limitations", "Promotion"]


def test_intended_use_says_not_for_diagnostic_use():
    use = section(binary_card(), "Intended use")
    assert "**Not for diagnostic use.**" in use and "A human reads every image." in use
    assert "Research and pipeline demonstration" in use
    assert "chest CR/DX images" in use and "(0, 1)" in use


def test_training_data_counts_images_and_patients_per_split_and_class():
    data = section(binary_card(), "Training data")
    assert "Data version `6fae9174604f8407817ccd77b4d5ebae.dir`" in data
    assert "| Split | Images | Patients | Class 0: images (patients) | Class 1: images (patients) |" in data
    assert "| train | 6 (60.0%) | 4 | 3 (2) | 3 (2) |" in data
    assert "| val | 2 (20.0%) | 2 | 1 (1) | 1 (1) |" in data
    assert "| test | 2 (20.0%) | 2 | 1 (1) | 1 (1) |" in data
    assert "| all | 10 (100.0%) | 8 | 5 (4) | 5 (4) |" in data
    assert "The 6 training images by header attribute:" in data
    assert "- Modality: CR 4, DX 2" in data
    assert "- Manufacturer: Orion Systems 3, Kestrel Imaging 2, not recorded 1" in data
    assert "- View position: PA 3, AP 2, LL 1" in data


def test_model_section_has_the_params_that_matter():
    model = section(binary_card(), "Model")
    assert "- Input: 64 x 64 x 1 (uint8, scaled to [0, 1]); output: probability of class 1 (sigmoid)." in model
    assert "- Architecture: `seed_cnn`, 3 networks (seeds 7-9) averaged." in model
    assert ("- Training: up to 12 epochs, batch size 16, learning rate 0.0005 (cosine schedule), class weights "
            "balanced, early stopping patience 4, weights kept: `best_val_auc`.") in model
    assert "- Calibration: `temperature` (fitted on validation), temperature 1.500." in model
    assert ("- Augmentation (training batches): left-right flip, rotation up to ±8°, shift up to 5% of the side, "
            "brightness ±0.05, contrast ±10%.") in model  # zoom and noise are 0: not listed
    assert "- Operating point: threshold 0.4200, `youden` (Youden's J on the validation split)" in model


def test_model_section_without_train_params_says_so():
    model = section(binary_card(train=None, augment=None), "Model")
    assert "- Architecture and training: not recorded." in model
    assert "- Augmentation (training batches): not recorded." in model


@pytest.mark.parametrize(("method", "words"), [
    ("fixed", "fixed at 0.5 (`evaluate.fixed_threshold`)"),
    ("target_sensitivity", "the highest threshold reaching sensitivity 0.9 on the validation split"),
])
def test_operating_point_names_the_method(method, words):
    evaluate = EvaluateParams(**{**EVALUATE.__dict__, "threshold_method": method})
    assert words in section(binary_card(evaluate=evaluate), "Model")


def test_performance_has_test_figures_with_intervals_and_validation():
    performance = section(binary_card(), "Performance")
    assert ("Test split: 20 images, 8 of class 1 (prevalence 40.0%), used for this report only; rates at "
            "threshold 0.4200. 95% intervals: bootstrap of the 14 test patients (1000 resamples, each patient "
            "with all its images); where none can be estimated, the reason.") in performance
    for row in ("| ROC AUC | 0.850 (0.700-0.950) |", "| Average precision | 0.800 |",
                "| Sensitivity | 0.750 (0.500-1.000; 6/8) |", "| Specificity | 0.833 (0.600-1.000; 10/12) |",
                f"| PPV | 0.750 ({PPV_NOTE}; 6/8) |", "| NPV | 0.833 (0.650-0.950; 10/12) |",
                "| F1 | 0.750 |", "| Accuracy | 0.800 (0.600-0.950; 16/20) |",
                "| as registered (calibrated) | 0.1500 | 0.0500 |", "| without the calibration | 0.1700 | 0.0900 |"):
        assert row in performance, row
    assert ("Validation (the saved model, from train): ROC AUC 0.910, loss 0.4321, accuracy (at 0.5) 0.850, "
            "Brier 0.1200 (uncalibrated 0.1300), ECE 0.0400 (uncalibrated 0.0800).") in performance
    assert "Validation split: not recorded" in section(binary_card(validation={}), "Performance")


def test_an_interval_that_is_not_estimable_says_why_not_one_to_one():
    note = "not estimable: 1.000 in every one of 1000 resamples of 46 patients"
    perfect = {**BINARY_METRICS, "roc_auc": 1.0, "roc_auc_ci_low": None, "roc_auc_ci_high": None,
               "roc_auc_ci_note": note}
    card = binary_card(metrics=perfect)
    assert f"| ROC AUC | 1.000 ({note}) |" in section(card, "Performance")
    assert "1.000-1.000" not in card


def test_a_report_without_intervals_shows_the_figures_and_counts():
    older = {name: value for name, value in BINARY_METRICS.items() if "_ci_" not in name and name != "n_test_patients"}
    performance = section(binary_card(metrics=older), "Performance")
    assert "| ROC AUC | 0.850 |" in performance and "| Sensitivity | 0.750 (6/8) |" in performance
    assert "No intervals recorded (a report of an older version)." in performance


def test_subgroup_table_is_the_evaluated_table_in_markdown():
    subgroups = section(binary_card(), "Subgroups")
    assert "| attribute | group | n | patients | n positive | AUC | AUC 95% CI | sens. | spec. | acc. |" in subgroups
    assert "| patient sex | F | 12 | 11 | 5 | 0.900 | 0.750-0.980 | 0.800 | 0.857 | 0.833 |" in subgroups
    # no positive: no AUC, no sensitivity
    assert ("|  | M | 8 | 6 | 0 | – | not estimable: no AUC, the group lacks a class | – | 0.750 | 0.750 |"
            in subgroups)
    assert (f"| manufacturer | Orion Systems | 40 | 20 | 16 | 0.800 | {ORION_NOTE} | 0.750 | 0.792 | 0.775 |"
            in subgroups)
    assert "No subgroup table" in section(binary_card(subgroups=None), "Subgroups")


def test_domain_is_what_the_model_accepts():
    domain = section(binary_card(), "Domain")
    assert DOMAIN.describe() in domain and "`out_of_domain`" in domain


def test_limitations_name_the_small_subgroups_and_the_validation_threshold():
    limitations = section(binary_card(), "Known limitations")
    assert "Small data: 6 training images of 4 patients; by default a small synthetic sample" in limitations
    assert "Single site:" in limitations and "The domain check reads headers only" in limitations
    assert "Noisy figures, under 30 test images: patient sex F (n 12), patient sex M (n 8)." in limitations
    assert "No ROC AUC where a subgroup lacks a class: patient sex M." in limitations
    assert "Threshold chosen on validation (2 images, 1 of class 1)" in limitations
    assert "PPV and NPV hold at the test prevalence (40.0%) only." in limitations
    big = SUBGROUPS.assign(n=[30, 31, 40], roc_auc=[0.9, 0.7, 0.8])
    assert "Every subgroup has at least 30 test images" in section(binary_card(subgroups=big), "Known limitations")


def test_promotion_has_the_decision_alias_and_version():
    promotion = section(binary_card(), "Promotion")
    assert "Version 3, alias `champion`" in promotion
    assert ("Decision: champion: roc\\_auc on 2 val images of data 6fae9174604f, candidate 0.9100 vs champion "
            "version 2 0.8800 (minimum gain 0.01)") in promotion
    draft = binary_card(version=None, alias="challenger")
    assert draft.startswith("# Model card: dicomflow-classifier (not yet registered)")
    assert "The version to be registered, alias `challenger`" in section(draft, "Promotion")


def test_more_than_two_classes_report_macro_and_per_class_figures():
    three = IngestParams(**{**INGEST.__dict__, "classes": [0, 1, 2]})
    manifest = hand_manifest().assign(label=[0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    few = "not estimable: 8 patients, fewer than the 10 an interval needs"
    absent = {"ci_low": None, "ci_high": None, "ci_note": few}
    metrics = {"roc_auc": 0.8, "roc_auc_ci_low": 0.6, "roc_auc_ci_high": 0.9, "roc_auc_ci_note": "",
               "accuracy": 0.7, **{f"accuracy_{k}": v for k, v in absent.items()}, "macro_f1": 0.65,
               "n_test": 10, "n_test_patients": 8, "brier": 0.3, "ece": 0.1, "brier_uncalibrated": 0.35,
               "ece_uncalibrated": 0.2, "temperature": 1.0}
    for label, n, sensitivity, specificity in ((0, 4, 0.75, 5 / 6), (1, 3, 2 / 3, 6 / 7), (2, 3, 2 / 3, 1.0)):
        metrics.update({f"roc_auc_{label}": 0.8, f"sensitivity_{label}": sensitivity,
                        f"specificity_{label}": specificity, f"ppv_{label}": 0.7, f"f1_{label}": 0.6,
                        f"n_test_{label}": n, f"sensitivity_{label}_ci_low": 0.4, f"sensitivity_{label}_ci_high": 0.9,
                        f"sensitivity_{label}_ci_note": "",
                        **{f"specificity_{label}_{k}": v for k, v in absent.items()}})
    card = model_card(name="three", version="1", alias="champion", decision="champion: no champion before",
                      manifest=manifest, data_version="v", metrics=metrics, subgroups=SUBGROUPS.drop(
                          columns=["n_positive", "sensitivity", "specificity"]), domain=DOMAIN, threshold=None,
                      ingest=three, evaluate=EVALUATE, train=dataclasses.replace(TRAIN, task="multiclass"),
                      augment=AUGMENT, validation=VALIDATION)
    performance = section(card, "Performance")
    assert "| Macro ROC AUC | 0.800 (0.600-0.900) |" in performance
    assert f"| Accuracy (most probable class) | 0.700 ({few}; 7/10) |" in performance
    assert f"| 0 | 4 | 0.800 | 0.750 (0.400-0.900; 3/4) | 0.833 ({few}; 5/6) | 0.700 | 0.600 |" in performance
    assert "\n| Sensitivity |" not in performance and "accuracy (most probable class) 0.850" in performance
    assert "probability for each of the 3 classes (softmax)" in section(card, "Model")
    assert "most probable class (no threshold)" in section(card, "Model")
    assert "| train | 6 (60.0%) | 4 | 2 (2) | 2 (2) | 2 (2) |" in section(card, "Training data")
    assert "| attribute | group | n | patients | AUC | AUC 95% CI | acc. |" in section(card, "Subgroups")
    assert "No threshold" in section(card, "Known limitations")
    assert "- Task: multi-class (`train.task: multiclass`), classes 0, 1, 2 without order." in section(card, "Model")


@pytest.mark.parametrize(("referable_grade", "referable_threshold", "words"), [
    (None, None, "the call with the least expected grade error)."),
    (2, None, "; referable: P(grade >= 2) (`evaluate.referable_grade`), reported as a probability, no threshold "
              "chosen."),
    (2, 0.3125, "; referable: P(grade >= 2) (`evaluate.referable_grade`), called referable at 0.3125 or more "
                "(chosen on the validation split)."),
])
def test_an_ordinal_card_states_the_task_the_grades_and_how_a_grade_is_called(referable_grade, referable_threshold,
                                                                             words):
    grades = IngestParams(**{**INGEST.__dict__, "classes": [0, 1, 2, 3]})
    evaluate = dataclasses.replace(EVALUATE, referable_grade=referable_grade)
    card = binary_card(ingest=grades, manifest=hand_manifest().assign(label=[0, 1, 2, 3, 0, 1, 2, 3, 0, 1]),
                       threshold=None, evaluate=evaluate, train=dataclasses.replace(TRAIN, task="ordinal"),
                       referable_threshold=referable_threshold)
    model = section(card, "Model")
    assert "- Task: ordinal (`train.task: ordinal`), grades 0 < 1 < 2 < 3 in this order." in model
    assert ("output: a probability for each of the 4 grades, from 3 continuation-ratio logits "
            "(P(grade > j | grade >= j)), so that P(grade >= j) never rises with j.") in model
    assert ("- Operating point: each image is called the median of its grade distribution (the smallest grade "
            "whose cumulative probability reaches 0.5: the call with the least expected grade error)") in model
    assert model.rstrip().endswith(words)


def test_no_identifying_value_of_the_source_reaches_the_card():
    identifiers = collect_identifiers(SOURCE)
    manifest = hand_manifest()
    # The manifest's row values do carry the source's name, ID and UIDs: the scanner finds them there.
    assert identifiers.first(manifest.to_csv()) is not None
    for card in (binary_card(), binary_card(version=None), binary_card(metrics={**BINARY_METRICS, "n_test": 0})):
        assert identifiers.first(card) is None
        for line in card.splitlines():
            assert identifiers.first(line) is None, line
    card = binary_card()
    for value in (*manifest["image_key"], *manifest["patient_key"], *manifest["dicom_file"], *manifest["study_key"]):
        assert value not in card


def test_category_names_cannot_break_the_markdown():
    manifest = hand_manifest()
    manifest.loc[0, "manufacturer"] = "A|B_*C*"
    subgroups = SUBGROUPS.assign(group=["F", "M", "A|B_*C*"])
    card = binary_card(manifest=manifest, subgroups=subgroups)
    assert ("- Manufacturer: Kestrel Imaging 2, Orion Systems 2, A\\|B\\_\\*C\\* 1, not recorded 1"
            in section(card, "Training data"))
    table = section(card, "Subgroups").split("\n\n")[2]
    assert "| manufacturer | A\\|B\\_\\*C\\* | 40 |" in table
    assert all(line.count("|") - line.count("\\|") == 11 for line in table.splitlines())


def test_the_description_is_the_card_when_it_fits_and_shortened_else():
    card = binary_card(subgroups=None)  # the hand card with its table is just over the limit
    assert len(card) < DESCRIPTION_LIMIT and registry_description(card, where="x") == card
    where = "the model_card.md artifact of run abc"
    many = pd.concat([SUBGROUPS] * 60, ignore_index=True)  # a table far over the registry's limit
    long = binary_card(subgroups=many)
    assert "patient sex M (n 8) and 112 more." in section(long, "Known limitations")  # not the 120 groups
    assert len(long) > DESCRIPTION_LIMIT
    short = registry_description(long, where=where)
    assert len(short) <= DESCRIPTION_LIMIT and short.startswith(card_title("dicomflow-classifier", "3"))
    assert short.rstrip().endswith(f"the whole card is {where}.*")
    assert "## Subgroups\n\nIn the whole card." in short
    for title in ("Intended use", "Training data", "Model", "Performance", "Privacy", "Domain", "Known limitations",
                  "Promotion"):
        # only the subgroup table left out (the note follows the last section)
        assert section(short, title).startswith(section(long, title).rstrip("\n")), title
    tiny = registry_description(long, where=where, limit=1200)
    assert len(tiny) <= 1200 and "**Not for diagnostic use.**" in tiny


def test_figures_missing_from_the_metrics_show_as_a_dash():
    metrics = {key: value for key, value in BINARY_METRICS.items() if key not in ("average_precision", "ppv")}
    performance = section(binary_card(metrics={**metrics, "ece_uncalibrated": math.nan}), "Performance")
    assert "| Average precision | – |" in performance and "| PPV | – |" in performance
    assert "| without the calibration | 0.1700 | – |" in performance


class TestSecretFingerprint:
    """The card says which de-identification secret made the data, and warns when it was the demo one."""

    def test_a_site_secret_is_named_by_its_fingerprint(self):
        card = binary_card(secret={"deid_secret_fingerprint": "0123456789abcdef", "deid_demo_secret": "false"})
        assert "De-identification secret: a site secret, fingerprint `0123456789abcdef`." in section(card,
                                                                                                   "Training data")
        assert "demo secret" not in card and "Warning" not in card

    def test_the_demo_secret_is_warned_about_first_and_in_the_limitations(self):
        card = binary_card(secret={"deid_secret_fingerprint": "fedcba9876543210", "deid_demo_secret": "true"})
        title, warning = card.split("\n\n")[:2]
        assert title == "# Model card: dicomflow-classifier version 3"
        assert warning.startswith("> **Warning: the demo de-identification secret made this data.**")
        assert "never for real patients' data" in warning
        assert "the **demo secret** (public: for the embedded sample only), fingerprint `fedcba9876543210`" in card
        assert "- Made with the demo de-identification secret: its pseudonyms are reversible" in section(
            card, "Known limitations")
        # The registry's shortened description keeps the warning: it is never a section that goes.
        short = registry_description(card + "x" * 6000, where="the run", limit=5000)
        assert "> **Warning: the demo de-identification secret made this data.**" in short

    @pytest.mark.parametrize("secret", [None, {"deid_secret_fingerprint": "not recorded",
                                               "deid_demo_secret": "not recorded"}])
    def test_an_older_deidentify_is_not_recorded(self, secret):
        card = binary_card(secret=secret)
        assert "De-identification secret: not recorded (outputs of an older deidentify)." in section(
            card, "Training data")
        assert "Warning" not in card


def test_promotion_says_how_many_images_were_left_out():
    promotion = section(binary_card(excluded=7), "Promotion")
    assert "7 of them were left out because the champion trained on them." in promotion
    assert "left out" not in section(binary_card(), "Promotion")


ATTACK = {"membership_auc": 0.5312, "membership_auc_ci_low": 0.4701, "membership_auc_ci_high": 0.5903,
          "membership_auc_ci_note": "", "membership_tpr_at_fpr": 0.0133, "membership_tpr_at_fpr_ci_low": 0.0,
          "membership_tpr_at_fpr_ci_high": 0.04, "membership_tpr_at_fpr_ci_note": "", "membership_fpr": 0.01,
          "membership_epsilon_lower_bound": 0.0, "membership_alpha": 0.05, "membership_delta": 0.001,
          "membership_n_members": 150, "membership_n_nonmembers": 150}
DP = {"epsilon": 3.0, "delta": 0.001, "noise_multiplier": 2.1, "max_grad_norm": 1.0, "sampling_probability": 0.1172,
      "steps": 256, "accountant": "pld", "sampling": "poisson", "neighbouring": "add_or_remove_one", "unit": "image",
      "patient_epsilon": 6.0}


class TestPrivacySection:
    def test_with_dp_the_guarantee_what_it_means_and_the_attack(self):
        privacy = section(binary_card(metrics={**BINARY_METRICS, **ATTACK}, privacy=DP), "Privacy")
        assert "**ε = 3.00, δ = 0.001 per image** (add or remove one; `pld` accountant, poisson sampling q 0.1172, " \
               "256 steps, noise multiplier 2.10, clipping norm 1.00)." in privacy
        assert "A whole patient's images: ε = 6.00." in privacy
        assert "whether or not any one image was trained on, everything the model outputs is almost" in privacy
        assert "It does not hide what the data as a whole show" in privacy
        assert "nor protect the de-identified files" in privacy
        assert ("Membership attack (loss threshold, 150 training against 150 test images): AUC 0.531 "
                "(0.470-0.590) (0.5: chance), TPR 0.013 (0.000-0.040) at 1% FPR; ε proven >= 0.00 (95% "
                "confidence, within the accounted ε).") in privacy

    def test_a_patient_without_bound_is_said_so(self):
        privacy = section(binary_card(privacy={**DP, "patient_epsilon": math.inf}), "Privacy")
        assert "A whole patient's images: no bound (group privacy over them gives none at this δ)." in privacy

    def test_without_dp_no_formal_guarantee_and_the_attack(self):
        privacy = section(binary_card(metrics={**BINARY_METRICS, **ATTACK, "membership_epsilon_lower_bound": 1.2}),
                          "Privacy")
        assert "**No formal privacy guarantee**: trained without differential privacy." in privacy
        assert "AUC 0.531 (0.470-0.590)" in privacy and "ε proven >= 1.20 (95% confidence). A weak" in privacy

    def test_a_report_without_the_attack_says_so(self):
        assert "Membership attack: not run" in section(binary_card(), "Privacy")


def test_a_volume_model_states_its_input_volume_and_counts_series():
    import dataclasses

    from dicomflow.config.params import SeriesParams

    ingest = dataclasses.replace(INGEST, unit="series", series=SeriesParams(spacing_mm=[5.0, 2.5, 2.5],
                                                                            volume_size=[32, 64, 64]))
    card = binary_card(ingest=ingest, metrics={**BINARY_METRICS, "level": "series"})
    assert ("- Input: one CT series as a volume of 32 x 64 x 64 voxels (d x h x w, one channel), resampled to "
            "5 x 2.5 x 2.5 mm (z, y, x), lung window -600/1500 HU (center/width), cropped or padded with air; the "
            "registered model refuses single DICOM files (serving a series of files comes later) (uint8, scaled to "
            "[0, 1]); output: probability of class 1 (sigmoid).") in section(card, "Model")
    assert f"Test split: {int(BINARY_METRICS['n_test'])} series, " in card
