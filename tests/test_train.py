"""Train stage: the seed network as specified, real (tiny) Keras training, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from stages.params import TrainParams
from stages.train import build_seed_cnn, to_model_input, train_model

keras = pytest.importorskip("keras")
REPO = Path(__file__).resolve().parents[1]


def _bright_square_images(n: int, *, seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; label 1 ones carry a faint 4x4 square at a random place."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.normal(0.4, 0.05, (n, size, size))
    for image, label in zip(images, labels):
        if label:
            row, col = rng.integers(2, size - 6, 2)
            image[row : row + 4, col : col + 4] += 0.3
    return np.clip(images, 0, 1).astype(np.float32)[..., None], labels


class TestBuildSeedCnn:
    def test_layers_are_the_seeds(self):
        model = build_seed_cnn((64, 64, 1))
        kinds = [type(layer).__name__ for layer in model.layers]
        assert kinds == ["InputLayer", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D",
                         "Flatten", "Dense", "Dense"]
        conv1, conv2 = model.layers[1], model.layers[3]
        assert (conv1.filters, conv1.kernel_size, conv1.activation.__name__) == (32, (3, 3), "relu")
        assert (conv2.filters, conv2.kernel_size, conv2.activation.__name__) == (64, (3, 3), "relu")
        assert model.layers[6].units == 64 and model.layers[7].activation.__name__ == "sigmoid"

    def test_parameter_count_matches_the_architecture(self):
        side = 64
        conv1 = (3 * 3 * 1 + 1) * 32
        conv2 = (3 * 3 * 32 + 1) * 64
        after = ((side - 2) // 2 - 2) // 2  # valid 3x3 conv, 2x2 pool, twice
        dense = after * after * 64 * 64 + 64
        assert build_seed_cnn((side, side, 1)).count_params() == conv1 + conv2 + dense + 65


def test_to_model_input_scales_and_adds_a_channel():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    result = to_model_input(images)
    assert result.shape == (1, 2, 2, 1) and result.dtype == np.float32
    np.testing.assert_allclose(result[0, :, :, 0], [[0, 1], [0.2, 0.4]], atol=1e-6)


class TestTrainModel:
    params = TrainParams(architecture="seed_cnn", strategy="default", epochs=6, batch_size=16, lr=0.003,
                         lr_schedule="constant", class_weight="none", early_stopping_patience=0, seed=3)

    def test_learns_a_visible_finding_and_keeps_the_best_epoch(self, tmp_path):
        train_x, train_y = _bright_square_images(192, seed=0)
        val_x, val_y = _bright_square_images(64, seed=1)
        model, history = train_model(train_x, train_y, val_x, val_y, params=self.params,
                                     checkpoint=tmp_path / "model.keras")
        assert list(history["epoch"]) == list(range(1, 7))
        assert (tmp_path / "model.keras").is_file()
        from sklearn.metrics import roc_auc_score

        val_auc = roc_auc_score(val_y, model.predict(val_x, verbose=0).ravel())
        assert val_auc == pytest.approx(history["val_auc"].max(), abs=0.02)  # the best epoch came back
        assert val_auc > 0.9

    def test_same_seed_gives_the_same_model(self, tmp_path):
        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        params = TrainParams(architecture="seed_cnn", strategy="default", epochs=2, batch_size=16, lr=0.003,
                             lr_schedule="constant", class_weight="none", early_stopping_patience=0, seed=5)
        runs = [train_model(train_x, train_y, val_x, val_y, params=params,
                            checkpoint=tmp_path / f"m{i}.keras")[1] for i in range(2)]
        np.testing.assert_allclose(runs[0]["val_loss"], runs[1]["val_loss"], atol=1e-6)


def test_model_input_from_every_stored_layout():
    from stages.train import to_model_input

    gray = np.array([[[0, 255]]], dtype=np.uint8)
    rgb = np.full((1, 1, 2, 3), 0.5, dtype=np.float16)

    np.testing.assert_allclose(to_model_input(gray), [[[[0.0], [1.0]]]])
    assert to_model_input(rgb).shape == (1, 1, 2, 3) and to_model_input(rgb).dtype == np.float32


class TestStrategies:
    params = TrainParams(architecture="seed_cnn", strategy="default", epochs=2, batch_size=16,
                         lr=0.003, lr_schedule="cosine", class_weight="balanced",
                         early_stopping_patience=0, seed=5)

    def test_mirrored_trains_what_the_default_strategy_trains(self, tmp_path):
        from stages.train import make_strategy

        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        default = train_model(train_x, train_y, val_x, val_y, params=self.params, checkpoint=None)[1]
        mirrored = make_strategy("mirrored")
        assert mirrored.num_replicas_in_sync >= 1
        history = train_model(train_x, train_y, val_x, val_y, params=self.params, checkpoint=None,
                              strategy=mirrored)[1]
        np.testing.assert_allclose(history["loss"], default["loss"], atol=1e-5)
        np.testing.assert_allclose(history["val_auc"], default["val_auc"], atol=1e-5)

    def test_multi_worker_without_tf_config_is_a_clear_error(self, monkeypatch):
        from stages.train import make_strategy

        monkeypatch.delenv("TF_CONFIG", raising=False)
        with pytest.raises(ValueError, match="'multi_worker' but TF_CONFIG is not set"):
            make_strategy("multi_worker")

    @pytest.mark.parametrize("cluster, task, chief", [
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 0}, True),
        ({"worker": ["a:1", "b:1"]}, {"type": "worker", "index": 1}, False),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "chief", "index": 0}, True),
        ({"chief": ["c:1"], "worker": ["a:1"]}, {"type": "worker", "index": 0}, False),
    ])
    def test_only_the_chief_writes(self, monkeypatch, cluster, task, chief):
        import json
        from types import SimpleNamespace

        import tensorflow as tf

        from stages.train import is_chief

        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": cluster, "task": task}))
        resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
        assert is_chief(SimpleNamespace(cluster_resolver=resolver)) is chief
        assert is_chief(tf.distribute.get_strategy())


class TestTrainingControls:
    @staticmethod
    def params(**changes) -> TrainParams:
        base = dict(architecture="seed_cnn", strategy="default", epochs=4, batch_size=16, lr=0.003,
                    lr_schedule="cosine", class_weight="balanced", early_stopping_patience=0, seed=5)
        return TrainParams(**{**base, **changes})

    def test_balanced_class_weights_give_each_class_half_the_loss(self):
        from stages.train import class_weights_for

        labels = np.array([0, 0, 0, 1])
        weights = class_weights_for(labels, "balanced")
        assert weights == pytest.approx([4 / 6, 2.0])
        assert weights[0] * 3 == pytest.approx(weights[1] * 1)  # both classes weigh the same
        assert class_weights_for(labels, "none") == [1.0, 1.0]

    def test_early_stopping_ends_after_patience_epochs_without_improvement(self):
        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        history = train_model(train_x, train_y, val_x, val_y, checkpoint=None,
                              params=self.params(epochs=10, early_stopping_patience=2, lr=1e-7))[1]
        # At this learning rate the model barely moves: validation AUC soon stops improving.
        best = int(history.loc[history["val_auc"].idxmax(), "epoch"])
        assert len(history) == best + 2 < 10

    def test_a_killed_run_resumes_and_ends_where_an_uninterrupted_one_ends(self, tmp_path):
        """A child process trains with a resume folder and is SIGKILLed after its second epoch's
        state is saved; the stage run again goes on from epoch 3 and matches a clean run."""
        import json
        import os
        import signal
        import subprocess
        import sys
        import time

        script = tmp_path / "train.py"
        script.write_text(f"""
import sys, time
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
from pathlib import Path
from test_train import TestTrainingControls, _bright_square_images
from stages.train import train_model
train_x, train_y = _bright_square_images(64, seed=0)
val_x, val_y = _bright_square_images(32, seed=1)
slow = lambda epoch, row: time.sleep(60 if epoch == 2 else 0)  # killed while it waits here
train_model(train_x, train_y, val_x, val_y, checkpoint=None, resume_dir=Path(sys.argv[1]),
            params=TestTrainingControls.params(), on_epoch_end=slow)
""")
        resume = tmp_path / "resume"
        child = subprocess.Popen([sys.executable, str(script), str(resume)])
        deadline = time.monotonic() + 300
        while not ((resume / "state.json").is_file()
                   and json.loads((resume / "state.json").read_text())["epoch"] == 2):
            assert child.poll() is None and time.monotonic() < deadline, "no state after epoch 2"
            time.sleep(0.2)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()

        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        epochs_run = []
        resumed = train_model(train_x, train_y, val_x, val_y, checkpoint=None, resume_dir=resume,
                              params=self.params(),
                              on_epoch_end=lambda epoch, row: epochs_run.append(epoch))[1]
        clean = train_model(train_x, train_y, val_x, val_y, checkpoint=None, params=self.params())[1]
        assert epochs_run == [3, 4] and list(resumed["epoch"]) == [1, 2, 3, 4]
        np.testing.assert_allclose(resumed.drop(columns="epoch"), clean.drop(columns="epoch"),
                                   atol=1e-6)
        assert not resume.exists()  # finished: nothing left to resume from

    def test_state_of_other_params_is_not_resumed(self, tmp_path):
        from stages.train import TrainingState, fingerprint

        train_x, train_y = _bright_square_images(32, seed=0)
        state = TrainingState(fingerprint(self.params(), train_x, train_y)).after_epoch(
            {"epoch": 1, "val_auc": 0.5}, [np.zeros(2)], [np.ones(1)])
        state.save(tmp_path / "resume")
        assert TrainingState.load(tmp_path / "resume", state.fingerprint).epoch == 1
        other = fingerprint(self.params(lr=0.01), train_x, train_y)
        assert TrainingState.load(tmp_path / "resume", other).epoch == 0
