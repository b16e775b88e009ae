"""Train stage: the seed network as specified, real (tiny) Keras training, reproducibility."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import dataclasses
from pathlib import Path

import keras
import numpy as np
import pytest

from dicomflow.model.architectures import build_resnet_small, build_seed_cnn, to_model_input
from dicomflow.config.params import AugmentParams, IngestParams, TrainParams
from dicomflow.model.training import train_model
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
                         "Flatten", "Dense", "Dense", "Rescaling", "Activation"]
        conv1, conv2 = model.layers[1], model.layers[3]
        assert (conv1.filters, conv1.kernel_size, conv1.activation.__name__) == (32, (3, 3), "relu")
        assert (conv2.filters, conv2.kernel_size, conv2.activation.__name__) == (64, (3, 3), "relu")
        assert model.layers[6].units == 64 and model.layers[7].units == 1
        # The seed's sigmoid Dense as logits, identity calibration, sigmoid: the same function.
        assert model.layers[7].activation.__name__ == "linear" and model.layers[8].scale == 1.0
        assert model.layers[9].activation.__name__ == "sigmoid"

    def test_parameter_count_matches_the_architecture(self):
        side = 64
        conv1 = (3 * 3 * 1 + 1) * 32
        conv2 = (3 * 3 * 32 + 1) * 64
        after = ((side - 2) // 2 - 2) // 2  # valid 3x3 conv, 2x2 pool, twice
        dense = after * after * 64 * 64 + 64
        assert build_seed_cnn((side, side, 1)).count_params() == conv1 + conv2 + dense + 65


AUGMENT = AugmentParams(seed=7, flip=True, rotation_deg=8.0, zoom=0.08, shift=0.05, brightness=0.05,
                        contrast=0.1, noise_std=0.01)


def _three_class_images(n: int, *, seed: int, size: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """Noise images; class k carries a bright bar in row band k (0 top, 1 middle, 2 bottom)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    images = rng.normal(0.4, 0.05, (n, size, size))
    band = size // 3
    for image, label in zip(images, labels):
        row = label * band + rng.integers(1, band - 3)
        image[row:row + 3, 3:-3] += 0.4
    return np.clip(images, 0, 1).astype(np.float32)[..., None], labels


class TestBuildResnetSmall:
    @pytest.mark.parametrize("shape", [(28, 28, 1), (64, 64, 3)])
    def test_residual_blocks_halve_the_size_twice_and_end_in_one_sigmoid(self, shape):
        model = build_resnet_small(shape)
        kinds = [type(layer).__name__ for layer in model.layers]
        assert kinds.count("Add") == 6
        assert kinds[-4:] == ["GlobalAveragePooling2D", "Dense", "Rescaling", "Activation"]
        last_feature_map = model.get_layer(index=-5).output.shape
        assert tuple(last_feature_map[1:]) == (-(-shape[0] // 4), -(-shape[1] // 4), 64)
        assert model.output_shape == (None, 1) and model.layers[-1].activation.__name__ == "sigmoid"
        assert 150_000 < model.count_params() < 200_000

    @pytest.mark.parametrize("build", [build_seed_cnn, build_resnet_small])
    def test_more_than_two_classes_give_a_softmax(self, build):
        model = build((32, 32, 1), 4)
        assert model.output_shape == (None, 4) and model.layers[-1].activation.__name__ == "softmax"


def test_to_model_input_scales_and_adds_a_channel():
    images = np.array([[[0, 255], [51, 102]]], dtype=np.uint8)
    result = to_model_input(images)
    assert result.shape == (1, 2, 2, 1) and result.dtype == np.float32
    np.testing.assert_allclose(result[0, :, :, 0], [[0, 1], [0.2, 0.4]], atol=1e-6)


@pytest.mark.slow  # trains networks
class TestTrainModel:
    params = TrainParams(architecture="seed_cnn", strategy="default", epochs=6, batch_size=16, lr=0.003,
                         lr_schedule="constant", class_weight="none", early_stopping_patience=0, keep="best_val_auc",
                         calibration="none", ensemble=1, seed=3)

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

    @pytest.mark.parametrize("architecture", ["seed_cnn", "resnet_small"])
    def test_same_seed_gives_the_same_model_with_augmentation_on(self, tmp_path, architecture):
        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        params = TrainParams(architecture=architecture, strategy="default", epochs=2, batch_size=16,
                             lr=0.003, lr_schedule="constant", class_weight="none",
                             early_stopping_patience=0, keep="best_val_auc", calibration="none",
                             ensemble=1, seed=5)
        runs = [train_model(train_x, train_y, val_x, val_y, params=params, augment=AUGMENT,
                            checkpoint=tmp_path / f"m{i}.keras")[1] for i in range(2)]
        np.testing.assert_allclose(runs[0].drop(columns="epoch").astype(float),
                                   runs[1].drop(columns="epoch").astype(float), atol=1e-6)
        other_seed = train_model(train_x, train_y, val_x, val_y, params=params, checkpoint=None,
                                 augment=AugmentParams(**{**AUGMENT.__dict__, "seed": 8}))[1]
        assert not np.allclose(other_seed["loss"], runs[0]["loss"], atol=1e-6)  # augmentation is on

    def test_three_classes_train_a_softmax_scored_by_macro_auc(self):
        from sklearn.metrics import roc_auc_score

        train_x, train_y = _three_class_images(240, seed=0)
        val_x, val_y = _three_class_images(90, seed=1)
        model, history = train_model(train_x, train_y, val_x, val_y, n_classes=3, checkpoint=None,
                                     params=dataclasses.replace(self.params, task="multiclass"))
        probabilities = model.predict(val_x, verbose=0)
        assert probabilities.shape == (90, 3)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        macro = roc_auc_score(val_y, probabilities, multi_class="ovr", average="macro")
        assert history["val_auc"].max() == pytest.approx(macro, abs=1e-6)
        assert macro > 0.9 and np.mean(probabilities.argmax(axis=1) == val_y) > 0.7


class TestTrainingBatches:
    @pytest.mark.slow
    def test_an_epoch_is_a_permutation_of_the_training_set_augmented_by_batch(self):
        from dicomflow.model.training import training_batches

        images, labels = _bright_square_images(40, seed=0)
        plain = list(training_batches(images, labels, batch_size=16, epoch=1, seed=3))
        augmented = list(training_batches(images, labels, batch_size=16, epoch=1, seed=3, augment=AUGMENT))
        assert [len(x) for x, _ in plain] == [16, 16, 8]
        order = [np.flatnonzero((images == x).all(axis=(1, 2, 3)))[0] for batch, _ in plain for x in batch.numpy()]
        assert sorted(order) == list(range(40)) and order != list(range(40))  # shuffled, none lost
        for (x, y), (ax, ay) in zip(plain, augmented):
            np.testing.assert_array_equal(y, ay)  # same images in the same order...
            assert not np.allclose(x, ax)         # ...transformed
        again = list(training_batches(images, labels, batch_size=16, epoch=1, seed=3, augment=AUGMENT))
        np.testing.assert_array_equal(np.concatenate([x for x, _ in again]),
                                      np.concatenate([x for x, _ in augmented]))
        next_epoch = list(training_batches(images, labels, batch_size=16, epoch=2, seed=3, augment=AUGMENT))
        assert not np.array_equal(next_epoch[0][1], augmented[0][1]) or not np.allclose(
            next_epoch[0][0], augmented[0][0])


def test_batches_are_drawn_a_chunk_ahead_and_come_out_unchanged_in_order():
    from dicomflow.model.training import drawn_ahead

    drawn: list[int] = []

    def source():
        for batch in range(7):
            drawn.append(batch)
            yield batch

    seen = []
    for batch in drawn_ahead(source(), 3):
        seen.append((batch, len(drawn)))
    # Each chunk of 3 is drawn before its first batch is handed out; the last chunk is short.
    assert seen == [(0, 3), (1, 3), (2, 3), (3, 6), (4, 6), (5, 6), (6, 7)]


def test_classification_scores_for_two_and_three_classes():
    from sklearn.metrics import log_loss, roc_auc_score

    from dicomflow.model.scoring import classification_scores

    labels = np.array([0, 1, 1, 0, 1])
    binary = np.array([0.2, 0.7, 0.4, 0.6, 0.9])
    scores = classification_scores(labels, binary[:, None])
    assert scores["auc"] == pytest.approx(roc_auc_score(labels, binary))
    assert scores["loss"] == pytest.approx(log_loss(labels, binary))
    assert scores["accuracy"] == pytest.approx(3 / 5)
    three = np.array([0, 2, 1, 2])
    probabilities = np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    scores = classification_scores(three, probabilities)
    assert scores["auc"] == pytest.approx(roc_auc_score(three, probabilities, multi_class="ovr"))
    assert scores["loss"] == pytest.approx(log_loss(three, probabilities))
    assert scores["accuracy"] == pytest.approx(3 / 4)


def test_labels_become_class_indices_in_the_order_of_ingest_classes():
    from dicomflow.model.architectures import class_indices

    np.testing.assert_array_equal(class_indices(np.array([0, 1, 1, 0]), [0, 1]), [0, 1, 1, 0])
    np.testing.assert_array_equal(class_indices(np.array([9, 3, 5, 9]), [3, 5, 9]), [2, 0, 1, 2])
    np.testing.assert_array_equal(class_indices(np.array([2, 1]), [2, 1]), [0, 1])


def test_images_of_another_size_than_the_params_are_a_clear_error():
    from dicomflow.errors import DataError
    from dicomflow.model.training import check_input_shape

    ingest = IngestParams(label_key="path", classes=[0, 1], image_size=64, channels=1, pixel_dtype="uint8",
                          frames="first", voi_index=0, target_spacing_mm=None, workers=0,
                          file_timeout_s=120, max_decoded_mib=2048, max_quarantine_fraction=0.1)
    check_input_shape(np.zeros((2, 64, 64, 1), np.float32), ingest)
    with pytest.raises(DataError, match="images are 32x32x1 but ingest.image_size and ingest.channels "
                                         "ask for 64x64x1"):
        check_input_shape(np.zeros((2, 32, 32, 1), np.float32), ingest)


def test_volumes_of_another_shape_than_ingest_series_are_a_clear_error():
    from dicomflow.config.params import SeriesParams
    from dicomflow.errors import DataError
    from dicomflow.model.training import check_input_shape

    ingest = IngestParams(label_key="accession_number", classes=[0, 1], image_size=64, channels=1,
                          pixel_dtype="uint8", frames="first", voi_index=0, target_spacing_mm=None, workers=0,
                          file_timeout_s=120, max_decoded_mib=2048, max_quarantine_fraction=0.1, unit="series",
                          series=SeriesParams(volume_size=[16, 32, 32]))
    check_input_shape(np.zeros((2, 16, 32, 32, 1), np.float32), ingest)
    with pytest.raises(DataError, match=r"images are 64x64x1 but ingest.series.volume_size ask for 16x32x32x1: "
                                        r"run the pipeline from ingest"):
        check_input_shape(np.zeros((2, 64, 64, 1), np.float32), ingest)


def test_model_input_from_every_stored_layout():

    gray = np.array([[[0, 255]]], dtype=np.uint8)
    rgb = np.full((1, 1, 2, 3), 0.5, dtype=np.float16)

    np.testing.assert_allclose(to_model_input(gray), [[[[0.0], [1.0]]]])
    assert to_model_input(rgb).shape == (1, 1, 2, 3) and to_model_input(rgb).dtype == np.float32


def _one_process_and_two_workers(script: Path, tmp_path: Path) -> tuple[object, list[object]]:
    """Run ``script STRATEGY OUT.json`` once alone (``default``) and as a TensorFlow cluster of two
    loopback workers (``multi_worker``); the JSON each wrote, the lone run's first."""
    ports = []
    for _ in range(2):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    subprocess.run([sys.executable, str(script), "default", str(tmp_path / "one.json")], env=env,
                   check=True, capture_output=True, timeout=300)
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    with contextlib.ExitStack() as files:
        workers = [subprocess.Popen(
            [sys.executable, str(script), "multi_worker", str(tmp_path / f"worker{i}.json")],
            stdout=files.enter_context(open(logs[i], "w")), stderr=subprocess.STDOUT,
            env={**env, "TF_CONFIG": json.dumps({"cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
                                                 "task": {"type": "worker", "index": i}})}) for i in range(2)]
        codes = [worker.wait(timeout=300) for worker in workers]
    assert codes == [0, 0], logs[0].read_text()[-2000:] + logs[1].read_text()[-2000:]
    return (json.loads((tmp_path / "one.json").read_text()),
            [json.loads((tmp_path / f"worker{i}.json").read_text()) for i in range(2)])


class TestStrategies:
    params = TrainParams(architecture="seed_cnn", strategy="default", epochs=2, batch_size=16,
                         lr=0.003, lr_schedule="cosine", class_weight="balanced",
                         early_stopping_patience=0, keep="best_val_auc", calibration="none",
                         ensemble=1, seed=5)

    @pytest.mark.slow  # trains a network
    def test_mirrored_trains_what_the_default_strategy_trains(self, tmp_path):
        """"mirrored" is a MirroredStrategy with one replica per GPU TensorFlow sees (the one CPU
        when it sees none), and training under it gives the default strategy's history."""
        import tensorflow as tf

        from dicomflow.model.training import make_strategy

        gpus = tf.config.list_logical_devices("GPU")
        mirrored = make_strategy("mirrored")
        assert isinstance(mirrored, tf.distribute.MirroredStrategy)
        replica_devices = [tf.DeviceSpec.from_string(name).device_type
                           for name in mirrored.extended.worker_devices]
        assert replica_devices == (["GPU"] * len(gpus) or ["CPU"])
        assert mirrored.num_replicas_in_sync == len(replica_devices)
        plain = make_strategy("default")
        assert plain is tf.distribute.get_strategy() and not isinstance(plain, tf.distribute.MirroredStrategy)

        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        default = train_model(train_x, train_y, val_x, val_y, params=self.params, checkpoint=None)[1]
        history = train_model(train_x, train_y, val_x, val_y, params=self.params, checkpoint=None,
                              strategy=mirrored)[1]
        np.testing.assert_allclose(history["loss"], default["loss"], atol=1e-5)
        np.testing.assert_allclose(history["val_auc"], default["val_auc"], atol=1e-5)

    @pytest.mark.slow  # a TensorFlow cluster of two workers
    def test_two_workers_estimate_the_statistics_one_process_estimates(self, tmp_path):
        """The statistics pass of two loopback workers (each half of every batch, synchronised
        layers) stores what one process stores, on the same weights and images, a last batch of
        one image (one worker's slice empty) included."""
        script = tmp_path / "statistics.py"
        script.write_text(f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
import keras, numpy as np
from dicomflow.model.architectures import build_resnet_small
from dicomflow.model.training import BatchNormStatistics, make_strategy
strategy = make_strategy(sys.argv[1])
keras.utils.set_random_seed(3)
images = np.random.default_rng(0).random((41, 24, 24, 1)).astype(np.float32)  # 5 batches of 8, 1 of 1
with strategy.scope():
    model = build_resnet_small(images.shape[1:])
BatchNormStatistics(model, batch_size=8, strategy=strategy)(images)
norms = [layer for layer in model._flatten_layers(include_self=False)
         if isinstance(layer, keras.layers.BatchNormalization)]
json.dump([[n.moving_mean.numpy().tolist(), n.moving_variance.numpy().tolist()] for n in norms],
          open(sys.argv[2], "w"))
""")
        one, on_workers = _one_process_and_two_workers(script, tmp_path)
        for statistics in on_workers:
            for (mean, variance), (mean_1, variance_1) in zip(statistics, one):
                np.testing.assert_allclose(mean, mean_1, atol=1e-5)
                np.testing.assert_allclose(variance, variance_1, atol=1e-5)

    @pytest.mark.slow  # a TensorFlow cluster of two workers trains a network
    @pytest.mark.parametrize("n_train", [32, 33, 37])  # last batch of 1 (one slice empty), of 5 (3 + 2)
    def test_two_workers_train_what_one_process_trains_whatever_the_last_batch(self, tmp_path, n_train):
        """Two loopback workers take the same steps as one process on global batches that do not
        split evenly (synchronised batch normalisation, loss averaged over the global batch)."""
        script = tmp_path / "train.py"
        script.write_text(f"""
import dataclasses, json, sys
sys.path.insert(0, {str(REPO)!r})
sys.path.insert(0, {str(REPO / "tests")!r})
from test_train import TestStrategies, _bright_square_images
from dicomflow.model.training import make_strategy, train_model
params = dataclasses.replace(TestStrategies.params, architecture="resnet_small", batch_size=8,
                             strategy=sys.argv[1])
train_x, train_y = _bright_square_images({n_train}, seed=0)
val_x, val_y = _bright_square_images(16, seed=1)
history = train_model(train_x, train_y, val_x, val_y, params=params, checkpoint=None,
                      strategy=make_strategy(sys.argv[1]))[1]
json.dump(history[["loss", "val_loss"]].to_dict("list"), open(sys.argv[2], "w"))
""")
        one, on_workers = _one_process_and_two_workers(script, tmp_path)
        for history in on_workers:
            # All-reduces sum in another order, and Adam's first steps amplify the rounding: 1.2e-4
            # in the epoch-1 loss on even batches (32 images, main's code as well), 1.4e-4 with a
            # last batch of 1 (33). A skipped image moves the mean of ~35 by about 1e-2.
            np.testing.assert_allclose(history["loss"][0], one["loss"][0], atol=1e-3)
            np.testing.assert_allclose(history["loss"], one["loss"], atol=1e-2)
            np.testing.assert_allclose(history["val_loss"], one["val_loss"], atol=1e-2)

    def test_multi_worker_without_tf_config_is_a_clear_error(self, monkeypatch):
        from dicomflow.errors import SettingsError
        from dicomflow.model.training import make_strategy

        monkeypatch.delenv("TF_CONFIG", raising=False)
        with pytest.raises(SettingsError, match="'multi_worker' but TF_CONFIG is not set"):
            make_strategy("multi_worker")

    def test_a_single_process_strategy_is_the_chief(self, monkeypatch):
        """Without a cluster (default or mirrored strategy) the one process writes, even with a
        stray TF_CONFIG naming another task: only a multi-worker strategy reads it."""
        import json

        import tensorflow as tf

        from dicomflow.model.training import is_chief, make_strategy

        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a:1", "b:1"]},
                                                    "task": {"type": "worker", "index": 1}}))
        for name in ("default", "mirrored"):
            strategy = make_strategy(name)
            assert strategy.cluster_resolver is None and is_chief(strategy), name
        assert make_strategy("default") is tf.distribute.get_strategy()

    @pytest.mark.parametrize("cluster, chief", [
        ({"worker": 2}, "worker-0"),             # no chief task: worker 0 writes
        ({"chief": 1, "worker": 1}, "chief-0"),  # a chief task: it writes, worker 0 does not
    ], ids=["two-workers", "chief-and-worker"])
    @pytest.mark.slow  # a TensorFlow cluster
    def test_only_the_chief_task_of_a_real_cluster_writes(self, tmp_path, cluster, chief):
        """Every task of a real MultiWorkerMirroredStrategy cluster on loopback (TF_CONFIG as the
        README gives it) writes its file only when is_chief says so: the chief's file alone exists."""
        import json
        import os
        import socket
        import subprocess
        import sys

        script = tmp_path / "task.py"
        script.write_text(f"""
import sys
from pathlib import Path
sys.path.insert(0, {str(REPO)!r})
from dicomflow.model.training import is_chief, make_strategy
strategy = make_strategy("multi_worker")
assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync  # the cluster formed
if is_chief(strategy):
    Path(sys.argv[1]).write_text("written by the chief")
""")
        tasks = [(kind, index) for kind, count in cluster.items() for index in range(count)]
        addresses = {}
        for kind, count in cluster.items():
            for _ in range(count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    addresses.setdefault(kind, []).append(f"127.0.0.1:{probe.getsockname()[1]}")
        outputs = tmp_path / "outputs"
        outputs.mkdir()
        env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
        processes = [subprocess.Popen(
            [sys.executable, str(script), str(outputs / f"{kind}-{index}")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**env, "TF_CONFIG": json.dumps({"cluster": addresses, "task": {"type": kind, "index": index}})})
            for kind, index in tasks]
        try:
            errors = [process.communicate(timeout=300)[1].decode()[-2000:] for process in processes]
        finally:
            for process in processes:  # a task that failed leaves its peer waiting for it
                if process.poll() is None:
                    process.kill()
                    process.wait()
        assert [process.returncode for process in processes] == [0] * len(tasks), errors
        assert sorted(path.name for path in outputs.iterdir()) == [chief]


class TestTrainingControls:
    @staticmethod
    def params(**changes) -> TrainParams:
        base = dict(architecture="seed_cnn", strategy="default", epochs=4, batch_size=16, lr=0.003,
                    lr_schedule="cosine", class_weight="balanced", early_stopping_patience=0,
                    keep="best_val_auc", calibration="none", ensemble=1, seed=5)
        return TrainParams(**{**base, **changes})

    def test_balanced_class_weights_give_each_class_half_the_loss(self):
        from dicomflow.model.training import class_weights_for

        labels = np.array([0, 0, 0, 1])
        weights = class_weights_for(labels, "balanced")
        assert weights == pytest.approx([4 / 6, 2.0])
        assert weights[0] * 3 == pytest.approx(weights[1] * 1)  # both classes weigh the same
        assert class_weights_for(labels, "none") == [1.0, 1.0]
        three = class_weights_for(np.array([0, 0, 1, 2, 2, 2]), "balanced", n_classes=3)
        assert three == pytest.approx([1.0, 2.0, 2 / 3])  # n / (3 n_class): each class weighs n / 3

    @pytest.mark.slow  # trains a network
    def test_early_stopping_ends_after_patience_epochs_without_improvement(self):
        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        history = train_model(train_x, train_y, val_x, val_y, checkpoint=None,
                              params=self.params(epochs=10, early_stopping_patience=2, lr=1e-7))[1]
        # At this learning rate the model barely moves: validation AUC soon stops improving.
        best = int(history.loc[history["val_auc"].idxmax(), "epoch"])
        assert len(history) == best + 2 < 10

    @pytest.mark.slow  # trains a network
    @pytest.mark.parametrize("keep", ["best_val_auc", "last_epoch"])
    def test_the_kept_weights_are_those_of_the_best_or_the_last_epoch(self, keep):
        from sklearn.metrics import roc_auc_score

        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        # A learning rate this high makes validation AUC jump about: the best epoch is not the last.
        model, history = train_model(train_x, train_y, val_x, val_y, checkpoint=None,
                                     params=self.params(epochs=4, lr=0.03, keep=keep))
        assert history["val_auc"].idxmax() != len(history) - 1
        kept = history["val_auc"].max() if keep == "best_val_auc" else history["val_auc"].iloc[-1]
        assert roc_auc_score(val_y, model.predict(val_x, verbose=0).ravel()) == pytest.approx(kept, abs=1e-6)

    @pytest.mark.slow  # trains a network
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
import dataclasses
from pathlib import Path
from test_train import TestTrainingControls, _bright_square_images
from dicomflow.model.training import train_model
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
        np.testing.assert_allclose(resumed.drop(columns="epoch").astype(float),
                                   clean.drop(columns="epoch").astype(float),
                                   atol=1e-6)
        assert not resume.exists()  # finished: nothing left to resume from

    def test_state_of_other_params_is_not_resumed(self, tmp_path):
        from dicomflow.model.training import TrainingState, fingerprint

        train_x, train_y = _bright_square_images(32, seed=0)
        state = TrainingState(fingerprint(self.params(), None, train_x, train_y)).after_epoch(
            {"epoch": 1, "val_auc": 0.5}, [np.zeros(2)], [np.ones(1)])
        state.save(tmp_path / "resume")
        assert TrainingState.load(tmp_path / "resume", state.fingerprint).epoch == 1
        other = fingerprint(self.params(lr=0.01), None, train_x, train_y)
        assert TrainingState.load(tmp_path / "resume", other).epoch == 0


class TestInferenceModeMatchesTraining:
    """The batch-normalisation statistics saved with the model are those of its training images."""

    @staticmethod
    def params(**changes) -> TrainParams:
        return TestTrainingControls.params(**{
            "architecture": "resnet_small", "epochs": 3, "lr_schedule": "constant", "class_weight": "none",
            "keep": "last_epoch", **changes})

    @pytest.mark.slow
    def test_first_layer_statistics_are_those_of_its_input_over_the_training_images(self):
        from dicomflow.model.training import BatchNormStatistics

        images, _ = _bright_square_images(40, seed=0)
        model = build_resnet_small(images.shape[1:])
        norm = next(layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization))
        # The stem's convolution comes before any normalisation: its output over the 40 images,
        # whatever the batches, is what the first layer must store.
        stem = keras.Model(model.inputs, norm.input).predict(images, verbose=0).astype(np.float64)
        BatchNormStatistics(model, batch_size=16)(images)
        np.testing.assert_allclose(norm.moving_mean.numpy(), stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(norm.moving_variance.numpy(), stem.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6)

    @pytest.mark.slow  # trains a network
    def test_inference_outputs_match_batch_statistics_on_the_training_images(self):
        train_x, train_y = _bright_square_images(96, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        model, history = train_model(train_x, train_y, val_x, val_y, params=self.params(), checkpoint=None)
        inference = model(train_x, training=False).numpy().ravel()
        batch_statistics = model(train_x, training=True).numpy().ravel()  # one batch of all 96
        # Keras' moving averages after 18 steps at momentum 0.99 would still be close to their
        # initial 0 / 1: far from these.
        assert np.max(np.abs(inference - batch_statistics)) < 0.02
        assert {"val_loss", "val_auc", "val_accuracy", "val_brier", "val_ece"} <= set(history.columns)

    @pytest.mark.slow  # trains a network
    def test_kept_epoch_has_the_lowest_validation_loss(self):
        from dicomflow.model.scoring import classification_scores

        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        model, history = train_model(train_x, train_y, val_x, val_y, checkpoint=None,
                                     params=self.params(architecture="seed_cnn", epochs=5, lr=0.03,
                                                        keep="best_val_loss"))
        assert history["val_loss"].idxmin() != len(history) - 1  # the lowest is not the last
        assert history["kept"].tolist() == [i == history["val_loss"].idxmin() for i in range(len(history))]
        kept = classification_scores(val_y, model.predict(val_x, verbose=0))
        assert kept["loss"] == pytest.approx(history["val_loss"].min(), abs=1e-5)

    @pytest.mark.slow  # trains a network
    def test_temperature_is_fitted_on_validation_and_saved_in_the_model(self, tmp_path):
        from dicomflow.model.architectures import logit_model, temperature_of
        from dicomflow.model.scoring import classification_scores

        train_x, train_y = _bright_square_images(96, seed=0)
        val_x, val_y = _bright_square_images(48, seed=1)
        params = self.params(architecture="seed_cnn", epochs=6, lr=0.01)
        plain, _ = train_model(train_x, train_y, val_x, val_y, params=params, checkpoint=None)
        calibrated, _ = train_model(train_x, train_y, val_x, val_y, checkpoint=tmp_path / "m.keras",
                                    params=dataclasses.replace(params, calibration="temperature"))
        temperature = temperature_of(calibrated)
        assert temperature != pytest.approx(1.0, abs=0.05) and temperature_of(plain) == 1.0
        logits = logit_model(plain).predict(val_x, verbose=0).ravel()
        # The saved model's probabilities are the sigmoid of the plain network's logits over T.
        reloaded = keras.models.load_model(tmp_path / "m.keras")
        np.testing.assert_allclose(reloaded.predict(val_x, verbose=0).ravel(),
                                   1 / (1 + np.exp(-logits / temperature)), atol=1e-5)
        assert (classification_scores(val_y, reloaded.predict(val_x, verbose=0))["loss"]
                < classification_scores(val_y, plain.predict(val_x, verbose=0))["loss"])

    @pytest.mark.slow  # trains networks
    def test_an_ensemble_averages_members_of_different_seeds(self, tmp_path):
        from dicomflow.model.architectures import members_of
        from dicomflow.model.training import train_ensemble

        train_x, train_y = _bright_square_images(64, seed=0)
        val_x, val_y = _bright_square_images(32, seed=1)
        params = self.params(architecture="seed_cnn", epochs=2, ensemble=2, seed=11)
        model, history = train_ensemble(train_x, train_y, val_x, val_y, params=params,
                                        checkpoint=tmp_path / "ensemble.keras")
        single, _ = train_model(train_x, train_y, val_x, val_y, checkpoint=None,
                                params=dataclasses.replace(params, seed=12))
        members = members_of(keras.models.load_model(tmp_path / "ensemble.keras"))
        outputs = [member.predict(val_x, verbose=0).ravel() for member in members]
        assert len(members) == 2 and not np.allclose(outputs[0], outputs[1], atol=1e-3)
        np.testing.assert_allclose(outputs[1], single.predict(val_x, verbose=0).ravel(), atol=1e-5)
        np.testing.assert_allclose(model.predict(val_x, verbose=0).ravel(), np.mean(outputs, axis=0), atol=1e-6)
        assert list(history["member"]) == [0, 0, 1, 1] and list(history["epoch"]) == [1, 2, 1, 2]


@pytest.mark.slow  # runs the train stage
def test_a_degenerate_model_fails_the_stage_and_its_run(tmp_path):
    """The stage on images that are all the same: every validation image gets one score."""
    import subprocess
    import sys

    import mlflow
    import pandas as pd
    import yaml

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["image_size"] = 16
    params["train"].update(architecture="seed_cnn", epochs=1, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    from dicomflow.config.params import load_paths

    paths = dataclasses.asdict(load_paths(REPO / "dvc.yaml"))
    for folder in (paths["deid_dir"], paths["split_dir"], "reports"):
        (tmp_path / folder).mkdir(parents=True, exist_ok=True)
    np.save(tmp_path / paths["deid_dir"] / "images.npy", np.full((40, 16, 16), 128, np.uint8))
    pd.DataFrame({"split": ["train"] * 30 + ["val"] * 10, "label": [0, 1] * 20,
                  "image_key": [f"{i:016x}" for i in range(40)], "patient_key": [f"p{i // 2}" for i in range(40)],
                  }).to_parquet(tmp_path / paths["split_dir"] / "manifest.parquet")
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("MLFLOW_")},
           "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "stages.train"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "the trained model is degenerate on the validation split: constant predictions" in done.stderr
    from dicomflow import tracking

    client = mlflow.MlflowClient(tracking_uri=store)
    run = tracking.training_run_for(tmp_path / paths["model_dir"] / "model.keras", client)
    assert run.info.status == "FAILED"
    assert run.data.tags["dicomflow.degenerate"].startswith("constant predictions: every image scores")


@pytest.mark.slow
def test_training_curves_are_drawn_for_every_member(tmp_path):
    """The PNG that stands in for DVC's Vega plots offline: one validation line per member."""
    import matplotlib.image
    import pandas as pd

    from dicomflow.model.curves import write_training_curves

    rows = [{"epoch": epoch, "member": member, "kept": epoch == 2, **{f"{prefix}{name}": 0.5 / epoch
                                                                     for prefix in ("", "val_")
                                                                     for name in ("loss", "auc", "brier")}}
            for member in (0, 1) for epoch in (1, 2, 3)]
    write_training_curves(pd.DataFrame(rows), tmp_path / "curves.png")
    picture = matplotlib.image.imread(tmp_path / "curves.png")
    assert picture.shape[:2] == (340, 1260)
    assert (picture[..., :3] < 0.9).any(axis=-1).mean() > 0.02  # something is drawn on the white
