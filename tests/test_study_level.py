"""Study-level evaluation (``evaluate.level: study``): aggregation, study metrics against hand
figures, the threshold chosen on validation studies, a bootstrap whose unit keeps a study's images
together, the params, and ``dicomflow predict --per-study``'s rows."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import yaml
from sklearn.metrics import roc_auc_score, roc_curve

from dicomflow import metrics as registry
from dicomflow.config.params import ParamsError, load_params
from dicomflow.errors import DataError, SettingsError
from dicomflow.evaluation.intervals import patient_bootstrap
from dicomflow.evaluation.metrics import choose_operating_points, compute_metrics
from dicomflow.evaluation.studies import (
    Aggregation,
    at_level,
    predictions_table,
    served_thresholds,
    study_aggregation,
    study_scores,
)
from dicomflow.model.aggregation import AGGREGATIONS, aggregate
from dicomflow.serving.predict import StudySettings, study_instance_uids, study_settings, with_studies


class TestAggregate:
    def test_each_method_by_hand(self):
        p = np.array([0.2, 0.9, 0.5, 0.4])
        assert aggregate(p, "mean") == pytest.approx(0.5)
        assert aggregate(p, "max") == pytest.approx(0.9)
        assert aggregate(p, "topk_mean", k=2) == pytest.approx((0.9 + 0.5) / 2)
        assert aggregate(p, "topk_mean", k=1) == pytest.approx(0.9)

    def test_k_is_capped_by_the_images(self):
        assert aggregate(np.array([0.3, 0.6]), "topk_mean", k=5) == pytest.approx(0.45)

    @pytest.mark.parametrize(("probabilities", "method", "k", "message"), [
        ([0.5], "median", 3, "aggregation method must be one of mean, max, topk_mean; got 'median'"),
        ([0.5], "topk_mean", 0, "k (the parts topk_mean averages) must be an int >= 1; got 0"),
        ([], "max", 3, "probabilities must be a non-empty 1-D array"),
        ([0.5, float("nan")], "mean", 3, "probabilities must be finite and in [0, 1]"),
    ])
    def test_refuses(self, probabilities, method, k, message):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")
                           .replace("]", r"\]")):
            aggregate(np.array(probabilities), method, k=k)

    def test_the_choices_the_params_offer(self):
        assert AGGREGATIONS == ("mean", "max", "topk_mean")


# Six studies of one to three images. Study s1 is the case: a nodule seen on the PA view
# (0.9) and not on the lateral one (0.2), so per image it holds a false negative.
STUDIES = pd.DataFrame({
    "study_key": ["s1", "s1", "s2", "s2", "s2", "s3", "s3", "s4", "s5", "s6", "s6"],
    "patient_key": ["p1", "p1", "p2", "p2", "p2", "p3", "p3", "p4", "p1", "p6", "p6"],
    "label": [1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0],
    "probability": [0.9, 0.2, 0.3, 0.45, 0.35, 0.1, 0.6, 0.05, 0.7, 0.2, 0.25],
    "view_position": ["PA", "LL", "PA", "LL", "PA", "PA", "LL", "AP", "PA", "PA", "PA"],
    "patient_sex": ["F", "F", "M", "M", "M", "F", "F", "M", "F", "M", "M"],
    "patient_age_years": [50, 50, 61, 61, 61, 44, 44, 70, 51, 33, 33],
    "manufacturer": "A",
    "image_key": [f"i{n:02d}" for n in range(11)],
})


def by_hand(table: pd.DataFrame, how) -> pd.DataFrame:
    """One row per study (first-appearance order), its label and ``how`` of its probabilities,
    written with pandas, apart from the code under test."""
    grouped = table.groupby("study_key", sort=False)
    return pd.DataFrame({"label": grouped["label"].first(), "probability": grouped["probability"].agg(how),
                         "patient_key": grouped["patient_key"].first()}).reset_index()


class TestStudyScores:
    @pytest.mark.parametrize(("method", "how"), [
        ("mean", "mean"), ("max", "max"), ("topk_mean", lambda p: np.sort(p.to_numpy())[-2:].mean())])
    def test_probabilities_and_labels_by_hand(self, method, how):
        grouped = study_scores(STUDIES["label"], STUDIES["probability"], STUDIES, aggregation=Aggregation(method, 2))
        expected = by_hand(STUDIES, how)
        assert grouped.rows["study_key"].tolist() == ["s1", "s2", "s3", "s4", "s5", "s6"]
        assert grouped.labels.tolist() == expected["label"].tolist()
        np.testing.assert_allclose(grouped.probabilities, expected["probability"])
        assert grouped.rows["n_images"].tolist() == [2, 3, 2, 1, 1, 2]

    def test_study_metrics_against_sklearn(self):
        grouped = study_scores(STUDIES["label"], STUDIES["probability"], STUDIES, aggregation=Aggregation("max"))
        expected = by_hand(STUDIES, "max")
        report = compute_metrics(grouped.labels, grouped.probabilities, threshold=0.5,
                                 patients=grouped.rows["patient_key"].to_numpy())
        assert report["roc_auc"] == pytest.approx(roc_auc_score(expected["label"], expected["probability"]))
        # At 0.5 the studies s1 (0.9), s5 (0.7) are found and s2 (0.45) missed; s3 (0.6) is a false alarm.
        assert report["sensitivity"] == pytest.approx(2 / 3) and report["specificity"] == pytest.approx(2 / 3)
        assert report["n_test"] == 6 and report["n_test_positive"] == 3 and report["n_test_patients"] == 5
        # Per image at the same threshold the lateral view of s1 is one more false negative.
        per_image = compute_metrics(STUDIES["label"].to_numpy(), STUDIES["probability"].to_numpy(), threshold=0.5,
                                    patients=STUDIES["patient_key"].to_numpy())
        assert per_image["sensitivity"] == pytest.approx(2 / 6)

    def test_more_classes_are_aggregated_per_class_and_renormalised(self):
        probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
        rows = pd.DataFrame({"study_key": ["a", "a", "b"], "patient_key": ["p", "p", "q"]})
        grouped = study_scores(np.array([2, 2, 1]), probabilities, rows, aggregation=Aggregation("max"))
        np.testing.assert_allclose(grouped.probabilities[0], np.array([0.7, 0.3, 0.6]) / 1.6)
        np.testing.assert_allclose(grouped.probabilities[1], [0.2, 0.5, 0.3])
        assert grouped.labels.tolist() == [2, 1]

    def test_subgroup_values_of_a_study(self):
        grouped = study_scores(STUDIES["label"], STUDIES["probability"], STUDIES, aggregation=Aggregation("mean"))
        assert grouped.rows["view_position"].tolist() == ["LL+PA", "LL+PA", "LL+PA", "AP", "PA", "PA"]
        assert grouped.rows["patient_age_years"].tolist() == [50, 61, 44, 70, 51, 33]

    def test_a_study_of_two_labels_is_refused(self):
        labels = STUDIES["label"].to_numpy().copy()
        labels[1] = 0
        with pytest.raises(DataError, match=r"1 study holds images of different labels \(the first: study_key s1\); "
                                            "a study-level score needs one label per study"):
            study_scores(labels, STUDIES["probability"], STUDIES, aggregation=Aggregation("max"))

    def test_missing_study_keys_are_refused(self):
        rows = STUDIES.assign(study_key=STUDIES["study_key"].where(STUDIES.index != 3, ""))
        with pytest.raises(DataError, match="study_key is missing for 1 of 11 images"):
            study_scores(STUDIES["label"], STUDIES["probability"], rows, aggregation=Aggregation("max"))
        with pytest.raises(DataError, match="the manifest has no study_key column"):
            study_scores(STUDIES["label"], STUDIES["probability"], STUDIES.drop(columns="study_key"),
                         aggregation=Aggregation("max"))

    def test_the_predictions_table_keeps_every_image(self):
        grouped = study_scores(STUDIES["label"], STUDIES["probability"], STUDIES, aggregation=Aggregation("max"))
        table = predictions_table(STUDIES, STUDIES["label"], STUDIES["probability"].to_numpy(), grouped,
                                  classes=[0, 1])
        assert table.columns.tolist() == ["image_key", "study_key", "label", "probability", "study_probability"]
        assert table["probability"].tolist() == STUDIES["probability"].tolist()
        assert table.loc[1, "study_key"] == "s1" and table.loc[1, "study_probability"] == pytest.approx(0.9)


class TestThresholdOnValidationStudies:
    def test_youden_is_chosen_on_the_studies(self):
        options = dict(task="binary", classes=[0, 1], referable_grade=None, method="youden")
        study = study_aggregation("study", "max", k=2)
        labels, scores = at_level(STUDIES["label"].to_numpy(), STUDIES["probability"].to_numpy(), STUDIES,
                                  study=study)
        threshold, referable = choose_operating_points(labels, scores, **options)
        # Youden on the hand-made study table: every cut between two distinct study scores, written out.
        expected = by_hand(STUDIES, "max")
        fpr, tpr, cuts = roc_curve(expected["label"], expected["probability"], drop_intermediate=False)
        best = int(np.argmax(tpr - fpr))
        assert threshold == pytest.approx((min(cuts[best], 1.0) + cuts[best + 1]) / 2)
        assert referable is None
        # Studies 0.9, 0.7, 0.45 positive against 0.6, 0.25, 0.05: the best cut keeps all three
        # positives, between 0.45 and the next lower score 0.25.
        assert threshold == pytest.approx((0.45 + 0.25) / 2)
        image_threshold, _ = choose_operating_points(STUDIES["label"].to_numpy(), STUDIES["probability"].to_numpy(),
                                                     **options)
        assert image_threshold != pytest.approx(threshold)

    def test_image_level_passes_the_images_through(self):
        labels, scores = at_level(np.array([0, 1]), np.array([0.2, 0.8]), STUDIES.iloc[:2], study=None)
        assert labels.tolist() == [0, 1] and scores.tolist() == [0.2, 0.8]
        assert study_aggregation("image", "max", k=2) is None
        assert served_thresholds(None, threshold=0.3, referable_threshold=None) == {}
        assert served_thresholds(Aggregation("max"), threshold=0.3, referable_threshold=None) == {
            "image_threshold": 0.3}


class TestStudyBootstrap:
    def test_intervals_resample_patients_of_studies_whatever_their_images(self):
        """A study is one row: its images move together. Duplicating a study's images changes the
        image-level interval but not the study-level one, which equals the bootstrap of the
        hand-made study table."""
        rng = np.random.default_rng(3)
        n_studies = 40
        study_label = rng.integers(0, 2, n_studies)
        per_study = rng.integers(1, 4, n_studies)
        rows = pd.DataFrame({"study_key": np.repeat([f"s{i}" for i in range(n_studies)], per_study),
                             "patient_key": np.repeat([f"p{i // 2}" for i in range(n_studies)], per_study)})
        labels = np.repeat(study_label, per_study)
        scores = np.clip(labels * 0.3 + rng.normal(0.35, 0.2, len(labels)), 0, 1)
        grouped = study_scores(labels, scores, rows, aggregation=Aggregation("max"))
        expected = by_hand(rows.assign(label=labels, probability=scores), "max")
        names = ["roc_auc", "sensitivity"]
        on_studies = patient_bootstrap(registry.Scores.at_threshold(grouped.labels, grouped.probabilities), 
                                       grouped.rows["patient_key"].to_numpy(), names)
        by_hand_table = patient_bootstrap(registry.Scores.at_threshold(expected["label"], expected["probability"]),
                                          expected["patient_key"].to_numpy(), names)
        assert on_studies == by_hand_table and on_studies["roc_auc"].estimated
        # Every image of study s0 three times more: the image-level interval moves, the study one cannot.
        extra = np.flatnonzero(rows["study_key"] == "s0")
        more_rows = pd.concat([rows, rows.iloc[np.tile(extra, 3)]], ignore_index=True)
        more_labels, more_scores = np.r_[labels, np.tile(labels[extra], 3)], np.r_[scores, np.tile(scores[extra], 3)]
        regrouped = study_scores(more_labels, more_scores, more_rows, aggregation=Aggregation("max"))
        again = patient_bootstrap(registry.Scores.at_threshold(regrouped.labels, regrouped.probabilities),
                                  regrouped.rows["patient_key"].to_numpy(), names)
        assert again == on_studies
        per_image = [patient_bootstrap(registry.Scores.at_threshold(y, p), r["patient_key"].to_numpy(), names)
                     for y, p, r in ((labels, scores, rows), (more_labels, more_scores, more_rows))]
        assert per_image[0] != per_image[1]


class TestParams:
    def write(self, tmp_path, repo_params_file, **evaluate):
        raw = yaml.safe_load(repo_params_file.read_text())
        raw["evaluate"].update(evaluate)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def test_the_repository_default_is_image(self, repo_params_file):
        params = load_params("evaluate", path=repo_params_file)
        assert (params.level, params.study_aggregation, params.study_top_k) == ("image", "topk_mean", 2)

    def test_a_study_level(self, tmp_path, repo_params_file):
        params = load_params("evaluate", path=self.write(tmp_path, repo_params_file, level="study",
                                                         study_aggregation="topk_mean", study_top_k=3))
        assert study_aggregation(params.level, params.study_aggregation, k=params.study_top_k) == \
            Aggregation("topk_mean", 3)

    @pytest.mark.parametrize(("change", "message"), [
        (dict(level="series"), "'evaluate.level' must be one of 'image', 'study'; got 'series'"),
        (dict(study_aggregation="median"),
         "'evaluate.study_aggregation' must be one of 'mean', 'max', 'topk_mean'; got 'median'"),
        (dict(study_top_k=0), "'evaluate.study_top_k' must be an int in [1, 1000]; got 0"),
        (dict(study_top_k=2.5), "'evaluate.study_top_k' must be an int in [1, 1000]; got 2.5"),
    ])
    def test_refused_values(self, tmp_path, repo_params_file, change, message):
        with pytest.raises(ParamsError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_params("evaluate", path=self.write(tmp_path, repo_params_file, **change))

    def test_a_missing_key_is_named(self, tmp_path, repo_params_file):
        raw = yaml.safe_load(repo_params_file.read_text())
        del raw["evaluate"]["study_top_k"]
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ParamsError, match="missing key 'evaluate.study_top_k'"):
            load_params("evaluate", path=tmp_path / "params.yaml")


@pytest.mark.slow
def test_the_test_split_report_per_study_of_a_keras_model(tmp_path):
    """report_test_split at level study on a real (untrained) sigmoid network: figures on the
    hand-aggregated study probabilities, the level stated, each image kept in the predictions."""
    import keras

    from dicomflow.evaluation.reporting import report_test_split
    from dicomflow.model.architectures import build_seed_cnn, predict_probabilities

    keras.utils.set_random_seed(0)
    model = build_seed_cnn((16, 16, 1), 2)
    rng = np.random.default_rng(1)
    n_studies = 24
    per_study = np.tile([2, 3, 1], n_studies // 3)
    study_label = np.arange(n_studies) % 2
    labels = np.repeat(study_label, per_study)
    images = (rng.uniform(0, 0.5, (len(labels), 16, 16, 1)) + labels[:, None, None, None] / 4).astype(np.float32)
    rows = pd.DataFrame({"study_key": np.repeat([f"s{i:02d}" for i in range(n_studies)], per_study),
                         "patient_key": np.repeat([f"p{i:02d}" for i in range(n_studies)], per_study),
                         "image_key": [f"i{i:03d}" for i in range(len(labels))], "patient_sex": "F",
                         "patient_age_years": 50, "manufacturer": "A",
                         "view_position": np.where(np.arange(len(labels)) % 2, "LL", "PA")})
    metrics, files, subgroups = report_test_split(model, labels, images, rows, threshold=0.5, classes=[0, 1],
                                                  plots_dir=tmp_path, task="binary",
                                                  study=Aggregation("topk_mean", 2))
    image_p = predict_probabilities(model, images)
    expected = by_hand(rows.assign(label=labels, probability=image_p),
                       lambda p: np.sort(p.to_numpy())[-2:].mean())
    assert metrics["level"] == "study" and metrics["study_aggregation"] == "topk_mean" and metrics["study_top_k"] == 2
    assert metrics["n_test"] == n_studies and metrics["n_test_images"] == len(labels)
    assert metrics["roc_auc"] == pytest.approx(roc_auc_score(expected["label"], expected["probability"]))
    assert metrics["accuracy"] == pytest.approx(np.mean((expected["probability"] >= 0.5) == expected["label"]))
    predictions = pd.read_csv(tmp_path / "test_predictions.csv")
    assert len(predictions) == len(labels) and set(predictions["study_key"]) == set(rows["study_key"])
    np.testing.assert_allclose(predictions["probability"], image_p, atol=1e-6)
    assert pd.read_csv(tmp_path / "confusion.csv").shape[0] == n_studies
    assert subgroups.set_index(["attribute", "group"]).loc[("view_position", "LL+PA"), "n"] == 16
    assert tmp_path / "test_predictions.csv" in files


@pytest.mark.slow
def test_the_image_report_says_its_level(tmp_path):
    import keras

    from dicomflow.evaluation.reporting import report_test_split
    from dicomflow.model.architectures import build_seed_cnn

    keras.utils.set_random_seed(0)
    labels = np.arange(20) % 2
    images = np.random.default_rng(0).uniform(0, 1, (20, 16, 16, 1)).astype(np.float32)
    rows = pd.DataFrame({"patient_key": [f"p{i}" for i in range(20)], "patient_sex": "F", "patient_age_years": 50,
                         "manufacturer": "A", "view_position": "PA"})
    metrics, files, _ = report_test_split(build_seed_cnn((16, 16, 1), 2), labels, images, rows, threshold=0.5,
                                          classes=[0, 1], plots_dir=tmp_path)
    assert metrics["level"] == "image" and metrics["n_test"] == 20 and "n_test_images" not in metrics
    assert not (tmp_path / "test_predictions.csv").exists()


class TestPredictPerStudy:
    METADATA = {"classes": [0, 1], "task": "binary", "threshold": 0.4,
                "study": {"aggregation": "topk_mean", "top_k": 2, "threshold": 0.55, "referable_threshold": None}}

    def test_the_registered_aggregation_comes_first(self):
        settings = study_settings(self.METADATA, params_aggregation=("mean", 3))
        assert (settings.aggregation, settings.top_k, settings.threshold) == ("topk_mean", 2, 0.55)
        image_level = {key: value for key, value in self.METADATA.items() if key != "study"}
        settings = study_settings(image_level, params_aggregation=("mean", 3))
        assert (settings.aggregation, settings.top_k, settings.threshold) == ("mean", 3, 0.4)
        with pytest.raises(SettingsError, match="--per-study: the model was evaluated per image"):
            study_settings(image_level, params_aggregation=None)

    def test_rows_per_study_without_the_uids(self, tmp_path, make_dicom):
        uid_a, uid_b = "1.2.826.0.1.3680043.8.498.111", "1.2.826.0.1.3680043.8.498.222"
        files = []
        for n, uid in enumerate([uid_a, uid_b, uid_a, uid_a]):
            files.append(make_dicom(tmp_path / f"{n}.dcm", np.full((8, 8), 10 * n, np.uint16), StudyInstanceUID=uid))
        (tmp_path / "broken.dcm").write_bytes(b"not dicom")
        files.append(tmp_path / "broken.dcm")
        uids = study_instance_uids(files)
        assert uids == [uid_a, uid_b, uid_a, uid_a, None]
        predictions = pd.DataFrame({"path": [f.name for f in files], "probability": [0.9, 0.3, 0.2, 0.6, np.nan],
                                    "label": [1, 0, 0, 1, -1], "error": ["", "", "", "", "not_dicom: x"]})
        settings = StudySettings("topk_mean", 2, 0.55, None, "test")
        table = with_studies(predictions, uids, settings=settings, model_metadata=self.METADATA)
        files_part, studies = table[table["unit"] == "file"], table[table["unit"] == "study"]
        assert files_part["study"].tolist() == [1, 2, 1, 1, -1]
        assert studies["study"].tolist() == [1, 2] and studies["n_files"].tolist() == [3, 1]
        assert studies["probability"].tolist() == pytest.approx([(0.9 + 0.6) / 2, 0.3])
        assert studies["label"].tolist() == [1, 0] and (studies["path"] == "").all()
        written = table.to_csv(index=False)
        assert uid_a not in written and uid_b not in written

    def test_an_ordinal_study_is_renormalised_and_called_its_median_grade(self):
        metadata = {"classes": [0, 1, 2], "task": "ordinal", "referable_grade": 2, "referable_threshold": 0.5}
        predictions = pd.DataFrame({"path": ["a", "b"], "probability_0": [0.6, 0.1], "probability_1": [0.3, 0.3],
                                    "probability_2": [0.1, 0.6], "label": [0, 2], "referable_probability": [0.1, 0.6],
                                    "referable": [0, 1], "error": ["", ""]})
        settings = StudySettings("max", 2, None, 0.5, "test")
        study = with_studies(predictions, ["u", "u"], settings=settings, model_metadata=metadata).iloc[-1]
        expected = np.array([0.6, 0.3, 0.6]) / 1.5
        assert [study[f"probability_{c}"] for c in range(3)] == pytest.approx(expected.tolist())
        # Cumulative 0.4, 0.6, 1.0: the median grade is 1; P(grade >= 2) = 0.4 is below 0.5.
        assert study["label"] == 1 and study["referable_probability"] == pytest.approx(0.4)
        assert study["referable"] == 0


def test_the_aggregation_is_frozen_and_checked():
    with pytest.raises(ValueError, match="method must be one of"):
        Aggregation("median")
    with pytest.raises(dataclasses.FrozenInstanceError):
        Aggregation("max").k = 3  # type: ignore[misc]
    assert Aggregation("topk_mean", 3).describe() == "top-3 mean"


@pytest.fixture(scope="module")
def study_repo(tmp_path_factory):
    """The tiny sample through `dvc repro` with evaluate.level: study (max of a study's views)."""
    from pipeline_repo import build_pipeline_repo

    return build_pipeline_repo(tmp_path_factory.mktemp("dicomflow-study"),
                               evaluate=dict(level="study", study_aggregation="max"))


@pytest.mark.slow
def test_the_pipeline_evaluates_per_study_and_predict_answers_per_study(study_repo):
    import subprocess
    import sys

    import mlflow

    root, env = study_repo
    report = yaml.safe_load((root / "reports" / "test_metrics.json").read_text())
    manifest = pd.read_parquet(root / "outputs" / "split" / "manifest.parquet")
    test = manifest[manifest["split"] == "test"]
    assert report["level"] == "study" and report["study_aggregation"] == "max"
    assert report["n_test"] == report["n_test_studies"] == test["study_key"].nunique()
    assert report["n_test_images"] == len(test)
    predictions = pd.read_csv(root / "reports" / "plots" / "test_predictions.csv")
    assert sorted(predictions["study_key"].unique()) == sorted(test["study_key"].unique())
    # The report's AUC, written again from the kept image probabilities: the max per study.
    studies = predictions.groupby("study_key").agg(label=("label", "first"), probability=("probability", "max"))
    assert report["roc_auc"] == pytest.approx(roc_auc_score(studies["label"], studies["probability"]), abs=1e-5)
    subgroups = pd.read_csv(root / "reports" / "subgroups.csv")
    assert (subgroups.groupby("attribute")["n"].sum() == report["n_test"]).all()

    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    try:
        client = mlflow.MlflowClient()
        version = client.get_model_version_by_alias("dicomflow-classifier", "champion")
        # The whole card is the evaluation run's artifact (the registry's description may be shortened).
        card = mlflow.artifacts.load_text(f"runs:/{version.run_id}/model_card.md")
        model_info = mlflow.models.get_model_info(f"models:/dicomflow-classifier/{version.version}")
    finally:
        mlflow.set_tracking_uri(None)
    assert "Evaluated per study (`evaluate.level: study`)" in card and "studies (of" in card
    study = model_info.metadata["study"]
    assert study["aggregation"] == "max" and study["threshold"] == pytest.approx(report["threshold"])

    result = subprocess.run([sys.executable, "-m", "dicomflow", "predict", "data", "--per-study", "--output",
                             "per_study.csv"], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    answers = pd.read_csv(root / "per_study.csv", keep_default_na=False)
    files, per_study = answers[answers["unit"] == "file"], answers[answers["unit"] == "study"]
    answered = files[files["error"] == ""]
    assert len(per_study) == answered["study"].nunique() and (answered["study"] > 0).all()
    first = per_study.iloc[0]
    members = answered[answered["study"] == first["study"]]
    assert first["n_files"] == len(members)
    assert float(first["probability"]) == pytest.approx(members["probability"].astype(float).max())
    assert int(first["label"]) == int(float(first["probability"]) >= study["threshold"])
    # No Study Instance UID of the data reaches the output (nor the log).
    import pydicom

    uids = {str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
            for path in sorted((root / "data").rglob("*.dcm"))[:40]}
    written = (root / "per_study.csv").read_text() + result.stderr + result.stdout
    assert not [uid for uid in uids if uid in written]


def test_the_model_card_states_the_study_level():
    """The card of a model evaluated per study (test_model_card's hand-made card, at level study)."""
    from test_model_card import BINARY_METRICS, EVALUATE, binary_card, section

    metrics = {**BINARY_METRICS, "level": "study", "study_aggregation": "topk_mean", "study_top_k": 2,
               "n_test_images": 95, "image_threshold": 0.31}
    card = binary_card(metrics=metrics, evaluate=dataclasses.replace(EVALUATE, level="study"))
    model = section(card, "Model")
    assert "Evaluated per study (`evaluate.level: study`): a study's probability is the mean of its 2 most " \
           "probable images" in model
    assert "A single file is served at the threshold chosen on validation images, 0.3100" in model
    assert "Youden's J on the validation split's studies); class 1 when the study probability" in model
    assert f"Test split: {BINARY_METRICS['n_test']} studies (of 95 images)" in section(card, "Performance")
    assert "Threshold chosen on validation (" in card and " studies, " in section(card, "Known limitations")
    image_card = binary_card()
    assert "Evaluated per study" not in image_card and "studies" not in section(image_card, "Performance")
