"""train.task: binary, multiclass and ordinal networks; the ordinal head's consistency, likelihood,
learning and calibration; the refusals of the train stage; an ordinal model served."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from dicomflow.config.params import TrainParams, load_paths
from dicomflow.dicom.display import PixelSettings
from dicomflow.model import architectures as models
from dicomflow.model import scoring
from dicomflow.model.training import train_model
from dicomflow.serving import pyfunc as serving

REPO = Path(__file__).resolve().parents[1]
GRADES = [0, 1, 2, 3]  # ingest.classes of the toy ordinal task: grade g is brightness level g
SIZE = 16
PARAMS = TrainParams(architecture="seed_cnn", strategy="default", epochs=3, batch_size=8, lr=0.005,
                     lr_schedule="constant", class_weight="balanced", early_stopping_patience=0,
                     keep="best_val_auc", calibration="none", ensemble=1, seed=4, task="ordinal")


def _brightness_grades(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise images whose brightness rises with the grade (0.2, 0.35, 0.5, 0.65 on average, each
    image off by 0.05 SD, so neighbouring grades overlap), grades drawn unevenly (the last rare)."""
    rng = np.random.default_rng(seed)
    grades = rng.choice(len(GRADES), n, p=[0.4, 0.3, 0.2, 0.1])
    levels = 0.2 + 0.15 * grades + rng.normal(0, 0.05, n)
    images = rng.normal(levels[:, None, None], 0.06, (n, SIZE, SIZE))
    return np.clip(images, 0, 1).astype(np.float32)[..., None], grades


def _hand_nll(logits: np.ndarray, grades: np.ndarray) -> np.ndarray:
    """CORN's loss written out: for each step j the image reached (grade >= j), the binary
    cross-entropy of 'it went past j' (grade > j) against sigmoid(l_j)."""
    losses = np.zeros(len(grades))
    for i, (row, grade) in enumerate(zip(np.asarray(logits, float), grades)):
        for j, logit in enumerate(row):
            if grade < j:
                break
            passed = 1.0 / (1.0 + np.exp(-logit))
            losses[i] -= np.log(passed) if grade > j else np.log(1.0 - passed)
    return losses


def _consistent(probabilities: np.ndarray) -> None:
    """Non-negative, summing to 1, and P(grade >= j) never rising with j."""
    assert (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    at_least = probabilities[:, ::-1].cumsum(axis=1)[:, ::-1]  # column j: P(grade >= j)
    assert (np.diff(at_least, axis=1) <= 1e-6).all()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The seed network trained 3 epochs as an ordinal task on brightness grades, class-weighted,
    saved; its validation images."""
    train_x, train_y = _brightness_grades(160, seed=0)
    val_x, val_y = _brightness_grades(64, seed=1)
    path = tmp_path_factory.mktemp("ordinal") / "model.keras"
    model, history = train_model(train_x, train_y, val_x, val_y, params=PARAMS, n_classes=len(GRADES),
                                 checkpoint=path)
    return {"model": model, "history": history, "path": path, "val_x": val_x, "val_y": val_y}


class TestOrdinalHead:
    def test_its_probabilities_are_consistent_for_any_logits_and_after_a_safe_mode_load(self, tmp_path):
        model = models.build_seed_cnn((SIZE, SIZE, 1), 5, ordinal=True)
        logits = model.get_layer(models.LOGITS)
        kernel, bias = logits.get_weights()
        rng = np.random.default_rng(0)
        logits.set_weights([rng.normal(0, 2.0, kernel.shape), rng.normal(0, 20.0, bias.shape)])  # logits of ±40
        images = rng.random((64, SIZE, SIZE, 1)).astype(np.float32)
        probabilities = models.infer(model, images)
        assert probabilities.shape == (64, 5) and model.get_layer(models.LOGITS).units == 4
        _consistent(probabilities)
        assert (probabilities.max(axis=1) > 0.99).mean() > 0.5  # extreme logits: still consistent

        model.save(tmp_path / "ordinal.keras")
        loaded = keras.models.load_model(tmp_path / "ordinal.keras", safe_mode=True)
        np.testing.assert_allclose(models.infer(loaded, images), probabilities, atol=1e-7)
        assert models.task_of(loaded) == "ordinal" and serving.task_of_network(loaded) == "ordinal"
        assert not loaded.get_layer(models.GRADE_LOG_PROBABILITY).trainable
        assert {id(v) for v in loaded.trainable_variables}.isdisjoint(
            id(v) for v in loaded.get_layer(models.GRADE_LOG_PROBABILITY).weights)

    def test_its_loss_is_the_continuation_ratio_likelihood_by_hand(self):
        model = models.build_seed_cnn((SIZE, SIZE, 1), 4, ordinal=True)
        rng = np.random.default_rng(1)
        kernel, bias = model.get_layer(models.LOGITS).get_weights()
        model.get_layer(models.LOGITS).set_weights([rng.normal(0, 1.0, kernel.shape), rng.normal(0, 3.0, bias.shape)])
        images = rng.random((12, SIZE, SIZE, 1)).astype(np.float32)
        grades = np.arange(12) % 4
        network, loss = models.training_view(model)
        per_image = np.asarray(loss(grades[:, None].astype(np.float32), network(images, training=False)), float)
        logits = models.infer(models.logit_model(model), images)
        np.testing.assert_allclose(per_image, _hand_nll(logits, grades), rtol=1e-5, atol=1e-6)
        # The NumPy twin (temperature fitting, uncalibrated figures) gives the same likelihood.
        log_p = scoring.ordinal_log_probabilities(logits)
        np.testing.assert_allclose(-log_p[np.arange(12), grades], _hand_nll(logits, grades), rtol=1e-9)

    def test_the_ensemble_of_ordinal_networks_is_ordinal_and_consistent(self):
        members = [models.build_seed_cnn((SIZE, SIZE, 1), 3, ordinal=True) for _ in range(2)]
        ensemble = models.ensemble_of(members)
        assert models.task_of(ensemble) == "ordinal" and serving.task_of_network(ensemble) == "ordinal"
        images = np.random.default_rng(2).random((8, SIZE, SIZE, 1)).astype(np.float32)
        _consistent(models.predict_probabilities(ensemble, images))
        _consistent(models.predict_probabilities(ensemble, images, calibrated=False))

    def test_an_ordinal_head_needs_three_grades(self):
        with pytest.raises(ValueError, match="three or more grades; got n_classes=2"):
            models.build_seed_cnn((SIZE, SIZE, 1), 2, ordinal=True)


@pytest.mark.slow  # trains a network
class TestOrdinalTraining:
    def test_it_learns_brightness_grades_far_better_than_chance(self, toy):
        from sklearn.metrics import cohen_kappa_score

        from dicomflow.metrics import median_grade

        probabilities = models.infer(toy["model"], toy["val_x"])
        _consistent(probabilities)
        called = median_grade(probabilities)
        val_y = toy["val_y"]
        qwk = cohen_kappa_score(val_y, called, weights="quadratic")
        chance_mae = np.mean(np.abs(val_y[:, None] - val_y[None, :]))  # a grade drawn from the labels' own mix
        assert qwk > 0.6, qwk
        assert np.mean(np.abs(called - val_y)) < 0.5 * chance_mae
        assert set(toy["history"].columns) >= {"val_auc", "val_loss", "val_accuracy"}
        assert toy["history"]["val_auc"].max() > 0.8  # macro AUC over the grades, what keep: best_val_auc reads
        saved = keras.models.load_model(toy["path"], safe_mode=True)
        assert saved.get_layer(models.LOGITS).units == 3
        # The link is fixed: training (which unfreezes the encoder each epoch) left it as built.
        np.testing.assert_array_equal(saved.get_layer(models.GRADE_LOG_PROBABILITY).get_weights()[0],
                                      models.ordinal_link_matrix(len(GRADES)))

    def test_temperature_lowers_the_validation_nll_of_an_overconfident_ordinal_model(self, toy):
        model = keras.models.load_model(toy["path"], safe_mode=True)
        logits = model.get_layer(models.LOGITS)
        logits.set_weights([weight * 8.0 for weight in logits.get_weights()])  # 8 x the logits: over-confident
        val_x, val_y = toy["val_x"], toy["val_y"]
        raw = models.infer(models.logit_model(model), val_x)

        def nll(probabilities: np.ndarray) -> float:
            return float(-np.mean(np.log(np.clip(probabilities[np.arange(len(val_y)), val_y], 1e-12, 1))))

        temperature = scoring.fit_temperature(val_y, raw, ordinal=True)
        calibrated = models.set_temperature(model, temperature)
        assert temperature > 2.0
        assert nll(models.infer(calibrated, val_x)) < 0.8 * nll(models.infer(model, val_x))
        assert models.temperature_of(calibrated) == pytest.approx(temperature)
        # The calibration divides the conditional logits: the Keras head and the NumPy twin agree.
        np.testing.assert_allclose(models.infer(calibrated, val_x),
                                   scoring.probabilities_from_logits(raw, temperature=temperature, ordinal=True),
                                   atol=1e-5)

    def test_the_train_loop_fits_the_temperature_of_an_ordinal_model(self, toy):
        params = dataclasses.replace(PARAMS, epochs=1, calibration="temperature")
        train_x, train_y = _brightness_grades(48, seed=2)
        model, _ = train_model(train_x, train_y, toy["val_x"], toy["val_y"], params=params,
                               n_classes=len(GRADES), checkpoint=None)
        assert models.task_of(model) == "ordinal" and models.temperature_of(model) != 1.0
        _consistent(models.infer(model, toy["val_x"]))


@pytest.mark.slow  # a tiny DP-SGD run (its vectorised step is traced: ~10 s on 2 cores)
def test_differentially_private_training_trains_the_ordinal_head_on_its_likelihood():
    from dicomflow.config.params import PrivacyParams
    from dicomflow.model.privacy import train_private

    train_x, train_y = _brightness_grades(48, seed=5)
    val_x, val_y = _brightness_grades(32, seed=6)
    private = PrivacyParams(enabled=True, target_epsilon=8.0, delta=None, max_grad_norm=1.0, accountant="pld",
                            noise_multiplier=None, unit="image")
    params = dataclasses.replace(PARAMS, epochs=1, calibration="temperature", class_weight="none", privacy=private)
    model, history = train_private(train_x, train_y, val_x, val_y, params=params, n_classes=len(GRADES),
                                   checkpoint=None, secret_seed=1)
    assert models.task_of(model) == "ordinal" and models.temperature_of(model) != 1.0
    _consistent(models.infer(model, val_x))
    assert np.isfinite(history["val_loss"]).all()
    # The fixed link stayed as built: only the logits and the encoder were trained.
    np.testing.assert_array_equal(model.get_layer(models.GRADE_LOG_PROBABILITY).get_weights()[0],
                                  models.ordinal_link_matrix(len(GRADES)))


class TestServing:
    @pytest.mark.slow
    def test_an_ordinal_model_answers_probabilities_the_median_grade_and_the_referable_call(self, tmp_path,
                                                                                            make_dicom):
        model = models.build_seed_cnn((32, 32, 1), 4, ordinal=True)
        model.get_layer(models.LOGITS).set_weights(
            [np.zeros((64, 3), np.float32), np.array([1.5, -0.5, -2.0], np.float32)])  # the same for any image
        model.save(tmp_path / "ordinal.keras")
        rng = np.random.default_rng(3)
        files = [make_dicom(tmp_path / f"{i}.dcm", rng.integers(40 * i, 40 * i + 80, (40, 40), dtype=np.uint8))
                 for i in range(3)]
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        try:
            experiment = mlflow.create_experiment("tasks", artifact_location=(tmp_path / "artifacts").as_uri())
            with mlflow.start_run(experiment_id=experiment):
                info = serving.log_classifier(tmp_path / "ordinal.keras", threshold=None, classes=[0, 1, 2, 3],
                                              settings=PixelSettings(size=32), task="ordinal", referable_grade=2,
                                              referable_threshold=0.1)
            loaded = mlflow.pyfunc.load_model(info.model_uri)
            with serving.serving_root(tmp_path):
                answers = loaded.predict(pd.DataFrame({"path": [str(f) for f in files] + [str(tmp_path / "gone")]}))
        finally:
            mlflow.set_tracking_uri(None)
        assert list(answers.columns) == ["probability_0", "probability_1", "probability_2", "probability_3",
                                         "label", "referable_probability", "referable", "error"]
        # By hand: P(pass 0) = s(1.5) = 0.8176, P(pass 1 | 1) = s(-0.5) = 0.3775, P(pass 2 | 2) = s(-2) = 0.1192.
        s = 1 / (1 + np.exp(-np.array([1.5, -0.5, -2.0])))
        expected = [1 - s[0], s[0] * (1 - s[1]), s[0] * s[1] * (1 - s[2]), s[0] * s[1] * s[2]]
        probabilities = answers.filter(like="probability_").to_numpy()
        np.testing.assert_allclose(probabilities[:3], np.tile(expected, (3, 1)), atol=1e-6)
        # Cumulative 0.18, 0.69: the median grade is 1 (argmax too here); P(grade >= 2) = 0.309 >= 0.1.
        assert list(answers["label"]) == [1, 1, 1, -1]
        np.testing.assert_allclose(answers["referable_probability"][:3], expected[2] + expected[3], atol=1e-6)
        assert list(answers["referable"]) == [1, 1, 1, -1] and np.isnan(answers["referable_probability"][3])
        assert answers["error"][3].startswith("not_found")
        metadata = loaded.metadata.metadata
        assert (metadata["task"], metadata["referable_grade"], metadata["referable_threshold"]) == ("ordinal", 2, 0.1)
        assert serving.describe_task(metadata) == ("ordinal task, grades 0 < 1 < 2 < 3; label: the median grade; "
                                                   "referable_probability: P(grade >= 2), referable at 0.1 or more")
        outputs = [spec.name for spec in loaded.metadata.get_output_schema().inputs]
        assert outputs == list(answers.columns)

    def test_the_median_grade_is_not_the_most_probable_grade(self, tmp_path):
        """P = (0.4, 0.05, 0.15, 0.4): argmax says 0, the median (cumulative 0.4, 0.45, 0.6) says 2."""
        model = models.build_seed_cnn((32, 32, 1), 4, ordinal=True)
        # l_0 = logit(0.6), l_1 = logit(0.55 / 0.6), l_2 = logit(0.4 / 0.55)
        bias = np.log([0.6 / 0.4, 0.55 / 0.05, 0.4 / 0.15]).astype(np.float32)
        model.get_layer(models.LOGITS).set_weights([np.zeros((64, 3), np.float32), bias])
        model.save(tmp_path / "ordinal.keras")
        classifier = serving.DicomClassifier(settings=PixelSettings(size=32), threshold=None, classes=[1, 3, 5, 7],
                                             task="ordinal", referable_grade=5).load(tmp_path / "ordinal.keras")
        answers = classifier.predict(None, np.zeros((2, 32, 32), np.uint8))
        np.testing.assert_allclose(answers.filter(like="probability_").to_numpy()[0], [0.4, 0.05, 0.15, 0.4],
                                   atol=1e-6)
        assert list(answers["label"]) == [5, 5]
        assert "referable" not in answers  # no threshold chosen: the probability alone
        np.testing.assert_allclose(answers["referable_probability"], 0.55, atol=1e-6)

    def test_a_task_that_does_not_fit_is_refused_in_one_line(self, tmp_path):
        softmax = models.build_seed_cnn((32, 32, 1), 3)
        softmax.save(tmp_path / "softmax.keras")
        with pytest.raises(ValueError, match="the model is a multiclass network but task is 'ordinal'"):
            serving.DicomClassifier(settings=PixelSettings(size=32), threshold=None, classes=[0, 1, 2],
                                    task="ordinal").load(tmp_path / "softmax.keras")
        with pytest.raises(ValueError, match="referable grades apply to ordinal tasks"):
            serving.DicomClassifier(settings=PixelSettings(size=32), threshold=None, classes=[0, 1, 2],
                                    task="multiclass", referable_grade=2)
        with pytest.raises(ValueError, match="expected one of the grades after the first"):
            serving.DicomClassifier(settings=PixelSettings(size=32), threshold=None, classes=[0, 1, 2],
                                    task="ordinal", referable_grade=0)
        # Without a declared task (a model registered before it was recorded): the network's own.
        old = serving.DicomClassifier(settings=PixelSettings(size=32), threshold=None, classes=[0, 1, 2])
        assert old.load(tmp_path / "softmax.keras").task == "multiclass"


def test_predict_gives_an_unread_entry_no_grade_and_no_referable_call():
    from dicomflow.serving.predict import with_unread

    answered = pd.DataFrame({"path": ["a.dcm"], "probability_0": [0.2], "probability_1": [0.8], "probability_2": [0.0],
                             "label": [1], "referable_probability": [0.8], "referable": [1], "error": [""]})
    both = with_unread(answered, [("0.fifo", "not_a_file", "a FIFO")])
    assert both["label"].tolist() == [-1, 1] and both["referable"].tolist() == [-1, 1]
    assert both["referable"].dtype == np.int64 and np.isnan(both["referable_probability"][0])


def _stage_dir(tmp_path: Path, **changes) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for name, value in changes.items():
        section, key = name.split("__")
        params[section][key] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return tmp_path


@pytest.mark.parametrize(("changes", "line"), [
    ({"ingest__classes": [0, 1, 2]}, "params.yaml: 'train.task' is 'binary' but 'ingest.classes' has 3 classes "
                                     "([0, 1, 2]): set task to multiclass, or to ordinal"),
    ({"train__task": "ordinal"}, "params.yaml: 'train.task' is 'ordinal' but 'ingest.classes' has 2 classes "
                                 "([0, 1]); ordinal needs three or more: set task: binary"),
])
@pytest.mark.slow
def test_the_train_stage_refuses_a_task_that_does_not_fit_the_classes_in_one_line(tmp_path, changes, line):
    """Before it reads any data (there is none here)."""
    folder = _stage_dir(tmp_path, **changes)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}, "PYTHONPATH": str(REPO),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    errors = [row for row in done.stderr.splitlines() if "Error" in row or "error" in row]
    assert len(errors) == 1 and line in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / load_paths(REPO / "dvc.yaml").model_dir).exists()


def test_the_task_is_a_logged_training_param():
    from dicomflow import tracking

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["task"] = "ordinal"
    assert tracking.training_params(params)["train.task"] == "ordinal"
