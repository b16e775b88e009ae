"""Pretrain stage: the NT-Xent loss, the views, deterministic and resumable SimCLR on tiny data,
and the stage with method none (no TensorFlow) and simclr (encoder, record, MLflow run)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dicomflow.config.params import AugmentParams, PretrainParams

REPO = Path(__file__).resolve().parents[1]

AUGMENT = AugmentParams(seed=7, flip=False, rotation_deg=8.0, zoom=0.08, shift=0.05, brightness=0.05,
                        contrast=0.1, noise_std=0.01)


def _params(**changes) -> PretrainParams:
    return dataclasses.replace(PretrainParams(method="simclr", epochs=3, batch_size=16, lr=0.002, temperature=0.2,
                                              projection_dim=16, view_strength=2.0, seed=3), **changes)


def _blob_images(n: int, *, seed: int, size: int = 16) -> np.ndarray:
    """Noise images, each with a bright 4x4 square at a random place."""
    rng = np.random.default_rng(seed)
    images = rng.normal(0.3, 0.05, (n, size, size))
    for image in images:
        row, col = rng.integers(0, size - 4, 2)
        image[row:row + 4, col:col + 4] += 0.4
    return np.clip(images, 0, 1).astype(np.float32)[..., None]


class TestNtXent:
    def test_two_pairs_against_the_formula_in_numpy(self):
        from dicomflow.model.pretraining import nt_xent

        z1 = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 1.0]], np.float32)
        z2 = np.array([[0.8, 0.6, 0.0], [0.0, -1.0, 3.0]], np.float32)
        temperature = 0.5
        # Written out: views 0, 1 (first views of images 0, 1), 2, 3 (second views); the positive
        # of view k is k + 2 mod 4; the denominator sums over the three other views.
        z = np.concatenate([z1, z2]).astype(np.float64)
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        similarity = z @ z.T / temperature
        expected = []
        for k in range(4):
            others = [j for j in range(4) if j != k]
            expected.append(-similarity[k, (k + 2) % 4] + np.log(np.exp(similarity[k, others]).sum()))
        losses, correct = nt_xent(z1, z2, temperature)
        np.testing.assert_allclose(losses.numpy(), expected, rtol=1e-5)
        # Cosines: view 1's positive (view 3, 0.14) loses to view 2 (0.54); the others win.
        np.testing.assert_array_equal(correct.numpy(), [1, 0, 1, 1])

    def test_a_positive_that_is_not_the_nearest_counts_as_a_miss(self):
        from dicomflow.model.pretraining import nt_xent

        z1 = np.array([[1.0, 0.0], [1.0, 0.1]], np.float32)
        z2 = np.array([[0.0, 1.0], [0.0, -1.0]], np.float32)
        # View 0's positive (0, 1) has cosine 0, view 1 (1, 0.1) ~0.995: a miss.
        _, correct = nt_xent(z1, z2, 0.1)
        assert correct.numpy()[0] == 0

    def test_the_loss_of_identical_views_far_apart_is_near_zero(self):
        from dicomflow.model.pretraining import nt_xent

        z = np.eye(4, dtype=np.float32)
        losses, _ = nt_xent(z, z, 0.05)
        # Each view: its positive at cosine 1, six negatives at 0: log(1 + 6 exp(-1 / 0.05)).
        np.testing.assert_allclose(losses.numpy(), np.log1p(6 * np.exp(-20.0)), atol=1e-7)


class TestViews:
    def test_the_crop_resamples_its_box_as_crop_and_resize_does(self):
        import tensorflow as tf

        from dicomflow.model.pretraining import RandomResizedCrop

        images = np.random.default_rng(0).uniform(0, 1, (6, 16, 16, 1)).astype(np.float32)
        seed = tf.constant([3, 4], tf.int64)
        cropped = RandomResizedCrop(0.3)(tf.constant(images), seed).numpy()
        # The same draws, as the class documents them, handed to TensorFlow's own crop.
        seeds = tf.random.experimental.stateless_split(seed, 4)
        area = tf.random.stateless_uniform([6], seeds[0], 0.3, 1.0).numpy()
        ratio = np.exp(tf.random.stateless_uniform([6], seeds[1], np.log(3 / 4), np.log(4 / 3)).numpy())
        height, width = np.minimum(np.sqrt(area / ratio), 1), np.minimum(np.sqrt(area * ratio), 1)
        top = tf.random.stateless_uniform([6], seeds[2]).numpy() * (1 - height)
        left = tf.random.stateless_uniform([6], seeds[3]).numpy() * (1 - width)
        boxes = np.stack([top, left, top + height, left + width], axis=1)
        assert np.all(height * width >= 0.3 - 1e-6) and np.all(height * width <= 1)
        expected = tf.image.crop_and_resize(images, boxes, np.arange(6), [16, 16]).numpy()
        np.testing.assert_allclose(cropped, expected, atol=1e-5)

    def test_views_scale_the_augment_policy_within_its_limits(self):
        from dicomflow.model.pretraining import view_augment

        views = view_augment(AUGMENT, 2.0)
        assert (views.rotation_deg, views.zoom, views.shift, views.contrast) == (16.0, 0.16, 0.1, 0.2)
        assert (views.flip, views.seed) == (AUGMENT.flip, AUGMENT.seed)
        strong = view_augment(dataclasses.replace(AUGMENT, zoom=0.4, contrast=0.6), 10.0)
        assert (strong.zoom, strong.contrast, strong.rotation_deg) == (0.5, 0.9, 80.0)

    @pytest.mark.slow
    def test_the_two_views_differ_and_are_the_same_again_for_the_same_batch(self):
        from dicomflow.model.pretraining import view_batches

        images = _blob_images(20, seed=0)
        first = [(a.numpy(), b.numpy()) for a, b in view_batches(images, batch_size=8, epoch=2, params=_params(),
                                                                  augment=AUGMENT)]
        again = [(a.numpy(), b.numpy()) for a, b in view_batches(images, batch_size=8, epoch=2, params=_params(),
                                                                  augment=AUGMENT)]
        assert len(first) == 2 and first[0][0].shape == (8, 16, 16, 1)  # 20 // 8 whole batches
        for (a, b), (c, d) in zip(first, again):
            np.testing.assert_array_equal(a, c)
            np.testing.assert_array_equal(b, d)
            assert np.abs(a - b).mean() > 0.01


def _pretrain(images, **kwargs):
    from dicomflow.model.pretraining import pretrain_encoder

    return pretrain_encoder(images, **{"params": _params(), "architecture": "resnet_small", "augment": AUGMENT,
                                       **kwargs})


class TestPretrainEncoder:
    @pytest.mark.slow
    def test_same_params_and_images_give_the_same_encoder(self):
        import keras

        from dicomflow.model.architectures import build_resnet_small

        images = _blob_images(32, seed=1)
        encoder, history = _pretrain(images)
        again, _ = _pretrain(images)
        assert list(history.columns) == ["epoch", "loss", "positive_top1", "seconds"]
        assert list(history["epoch"]) == [1, 2, 3] and np.isfinite(history["loss"]).all()
        for a, b in zip(encoder.get_weights(), again.get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)
        # The encoder is the classifier's layers up to `features`, by name and shape; no projection.
        classifier = build_resnet_small((16, 16, 1), 2)
        expected = {layer.name: [w.shape for w in layer.weights] for layer in classifier.layers
                    if layer.name not in ("logits", "calibration", "probability")}
        assert {layer.name: [w.shape for w in layer.weights] for layer in encoder.layers} == expected
        assert encoder.output.shape[-1] == 64 and isinstance(encoder, keras.Model)

    @pytest.mark.slow  # three pretrainings (~22 s on 2 cores)
    def test_an_interrupted_run_resumes_and_ends_where_an_uninterrupted_one_ends(self, tmp_path):
        images = _blob_images(32, seed=2)
        resume = tmp_path / "pretrain.resume"

        def stop_after_epoch_2(epoch, row):
            if epoch == 2:  # the state of epoch 2 is saved before this is called
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            _pretrain(images, params=_params(epochs=4), resume_dir=resume, on_epoch_end=stop_after_epoch_2)
        assert json.loads((resume / "state.json").read_text())["epoch"] == 2
        epochs_run = []
        resumed, resumed_history = _pretrain(images, params=_params(epochs=4), resume_dir=resume,
                                             on_epoch_end=lambda epoch, row: epochs_run.append(epoch))
        straight, straight_history = _pretrain(images, params=_params(epochs=4))
        assert epochs_run == [3, 4] and list(resumed_history["epoch"]) == [1, 2, 3, 4]
        np.testing.assert_allclose(resumed_history["loss"], straight_history["loss"], atol=1e-6)
        for a, b in zip(resumed.get_weights(), straight.get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-6)
        assert not resume.exists()

    def test_state_of_other_params_is_not_resumed(self, tmp_path):
        from dicomflow.model.pretraining import pretrain_fingerprint

        images = _blob_images(8, seed=0)
        base = pretrain_fingerprint(_params(), "resnet_small", AUGMENT, images)
        assert base == pretrain_fingerprint(_params(), "resnet_small", AUGMENT, images.copy())
        assert base != pretrain_fingerprint(_params(temperature=0.1), "resnet_small", AUGMENT, images)
        assert base != pretrain_fingerprint(_params(), "seed_cnn", AUGMENT, images)
        assert base != pretrain_fingerprint(_params(), "resnet_small", dataclasses.replace(AUGMENT, zoom=0.1), images)
        assert base != pretrain_fingerprint(_params(), "resnet_small", AUGMENT, images[::-1])

    @pytest.mark.slow
    def test_batch_norm_statistics_describe_the_unaugmented_images(self):
        import keras

        images = _blob_images(32, seed=3)
        encoder, _ = _pretrain(images, params=_params(epochs=1))
        stem = keras.Model(encoder.inputs[0], encoder.get_layer("stem_conv").output)
        features = np.asarray(stem(images, training=False), np.float64)
        np.testing.assert_allclose(encoder.get_layer("stem_bn").moving_mean.numpy(),
                                   features.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(encoder.get_layer("stem_bn").moving_variance.numpy(),
                                   features.var(axis=(0, 1, 2)), rtol=1e-3, atol=1e-6)

    @pytest.mark.slow
    def test_a_mirrored_strategy_of_one_replica_learns_what_the_default_strategy_learns(self):
        import tensorflow as tf

        images = _blob_images(32, seed=4)
        params = _params(epochs=2)
        default, default_history = _pretrain(images, params=params, architecture="seed_cnn")
        mirrored, history = _pretrain(images, params=params, architecture="seed_cnn",
                                      strategy=tf.distribute.MirroredStrategy(["/cpu:0"]))
        np.testing.assert_allclose(history["loss"], default_history["loss"], atol=1e-5)
        for a, b in zip(mirrored.get_weights(), default.get_weights()):
            np.testing.assert_allclose(a, b, atol=1e-5)


    def test_fewer_than_two_images_is_a_clear_error(self):
        from dicomflow.errors import DataError

        with pytest.raises(DataError, match="pretraining needs at least 2 images .*; got 1: check the split"):
            _pretrain(_blob_images(1, seed=0))

    @pytest.mark.slow  # a subprocess with two logical CPUs (~35 s on 2 shared cores)
    def test_two_replicas_each_take_the_loss_over_their_slice(self, tmp_path):
        """A MirroredStrategy of two replicas (the CPU split in two logical devices) trains: each
        replica's NT-Xent over its 8 images' 16 views, the global batch's statistics in BN."""
        script = tmp_path / "two_replicas.py"
        script.write_text(f"""
import json, sys
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from test_pretrain import _blob_images, _params, _pretrain
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
encoder, history = _pretrain(_blob_images(40, seed=4), params=_params(epochs=2), strategy=strategy)
print(json.dumps([strategy.num_replicas_in_sync, history["loss"].tolist()]))
""")
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        replicas, losses = json.loads(done.stdout.strip().splitlines()[-1])
        assert replicas == 2 and len(losses) == 2 and np.isfinite(losses).all()


def _bars_and_squares(n: int, *, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Two classes by shape, a 2x8 bar (1) or a 4x4 square (0) at a random place, on a background
    whose level (0.1 to 0.6) varies far more than the shapes differ: a nuisance the views' strong
    brightness changes teach the encoder to ignore."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.normal(0, 0.03, (n, size, size)) + rng.uniform(0.1, 0.6, n)[:, None, None]
    for image, label in zip(images, labels):
        row, col = rng.integers(2, size - 8, 2)
        if label:
            image[row + 2:row + 4, col:col + 8] += 0.35
        else:
            image[row:row + 4, col + 2:col + 6] += 0.35
    return np.clip(images, 0, 1).astype(np.float32)[..., None], labels


def _knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int = 5) -> float:
    """Leave-one-out accuracy of a k-nearest-neighbour vote by cosine similarity."""
    unit = features / (np.linalg.norm(features, axis=1, keepdims=True) + 1e-12)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = np.argsort(-similarity, axis=1)[:, :k]
    return float(np.mean((labels[nearest].mean(axis=1) > 0.5) == labels))


@pytest.mark.slow  # 30 epochs (~20-45 s on 2 shared cores)
def test_the_pretrained_features_separate_classes_a_random_encoder_does_not():
    """No label is seen in pretraining; a kNN probe on its features then tells bars from squares
    (1.0 for data seeds 0, 1, 2 when written), where a random encoder's features, dominated by
    the background level, reach 0.65-0.73."""
    import keras

    from dicomflow.model import architectures as models
    from dicomflow.model.training import BatchNormStatistics

    images, labels = _bars_and_squares(96, seed=1)
    augment = AugmentParams(seed=7, flip=False, rotation_deg=0.0, zoom=0.0, shift=0.1, brightness=0.3,
                            contrast=0.3, noise_std=0.02)
    params = _params(epochs=30, batch_size=32, lr=0.003, projection_dim=32, view_strength=1.0, seed=1)
    encoder, history = _pretrain(images, params=params, augment=augment)
    keras.utils.set_random_seed(1)
    random_encoder = models.encoder_of(models.build_resnet_small(images.shape[1:], 2))
    BatchNormStatistics(random_encoder, batch_size=32)(images)  # fair: statistics of the same images
    pretrained = _knn_accuracy(np.asarray(encoder(images, training=False)), labels)
    random = _knn_accuracy(np.asarray(random_encoder(images, training=False)), labels)
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert pretrained >= 0.9 and pretrained >= random + 0.15, (pretrained, random)


def _stage_project(tmp_path: Path, *, method: str) -> tuple[Path, pd.DataFrame]:
    """A scratch project: params.yaml (16-pixel images, the pretrain section as asked), the
    de-identified images and a split manifest with train, val, test and unlabelled rows."""
    from dicomflow.config.params import load_paths

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["ingest"]["image_size"] = 16
    params["train"]["architecture"] = "seed_cnn"
    params["pretrain"].update(method=method, epochs=2, batch_size=16, projection_dim=16)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    paths = load_paths(REPO / "dvc.yaml")
    for folder in (paths.deid_dir, paths.split_dir):
        (tmp_path / folder).mkdir(parents=True)
    images = np.round(_blob_images(44, seed=5)[..., 0] * 255).astype(np.uint8)
    np.save(tmp_path / paths.deid_dir / "images.npy", images)
    splits = ["train"] * 24 + ["val"] * 6 + ["unlabelled"] * 8 + ["test"] * 6
    manifest = pd.DataFrame({
        "split": splits, "label": [-1 if s == "unlabelled" else i % 2 for i, s in enumerate(splits)],
        "image_key": [f"{i:016x}" for i in range(44)], "patient_key": [f"p{i // 2}" for i in range(44)],
        "pixel_sha256": [hashlib.sha256(image.tobytes()).hexdigest() for image in images]})
    manifest.to_parquet(tmp_path / paths.split_dir / "manifest.parquet")
    return tmp_path, manifest


def _stage_env(tmp_path: Path) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")},
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "PYTHONPATH": str(REPO)}


def test_the_stage_with_method_none_writes_its_record_without_tensorflow(tmp_path):
    from stages.pretrain import HISTORY_HEADER

    from dicomflow.model.pretraining import REPORT_COLUMNS

    assert ",".join(REPORT_COLUMNS) + "\n" == HISTORY_HEADER
    project, _ = _stage_project(tmp_path, method="none")
    (project / "outputs" / "pretrain").mkdir(parents=True)
    (project / "outputs" / "pretrain" / "encoder.keras").write_text("a stale encoder")
    script = ("import sys; from dicomflow.runtime.stage import run_stage; from stages.pretrain import main; "
              "run_stage(main); print(sorted(m for m in ('tensorflow', 'keras', 'mlflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], cwd=project, env=_stage_env(tmp_path),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"  # what costs seconds (no timing here: shared machines are noisy)
    assert json.loads((project / "outputs/pretrain/pretrain.json").read_text()) == {"method": "none"}
    assert sorted(p.name for p in (project / "outputs/pretrain").iterdir()) == ["pretrain.json"]
    assert (project / "reports/pretrain_history.csv").read_text() == "epoch,loss,positive_top1\n"


@pytest.mark.slow  # runs the stage: TensorFlow and MLflow start-up, two epochs
def test_the_stage_with_simclr_writes_the_encoder_its_record_and_a_tagged_run(tmp_path):
    import keras
    import mlflow

    from dicomflow import tracking
    from dicomflow.model.architectures import build_seed_cnn

    project, manifest = _stage_project(tmp_path, method="simclr")
    done = subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=project, env=_stage_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "pretrain epoch 2/2: loss" in done.stderr
    encoder_file = project / "outputs/pretrain/encoder.keras"
    record = json.loads((project / "outputs/pretrain/pretrain.json").read_text())
    used = manifest[manifest["split"].isin(["train", "unlabelled"])]
    assert record["method"] == "simclr" and record["images"] == len(used) == 32
    listed = "".join(f"{digest}\n" for digest in used["pixel_sha256"])
    assert record["data_version"] == hashlib.sha256(listed.encode()).hexdigest()
    assert record["params"]["epochs"] == 2 and record["architecture"] == "seed_cnn"
    assert record["encoder_sha256"] == hashlib.sha256(encoder_file.read_bytes()).hexdigest()
    history = pd.read_csv(project / "reports/pretrain_history.csv")
    assert list(history.columns) == ["epoch", "loss", "positive_top1"]  # no seconds: the same bytes again
    assert list(history["epoch"]) == [1, 2]
    assert not (project / "outputs/pretrain.resume").exists()

    encoder = keras.models.load_model(encoder_file)
    classifier_layers = [layer.name for layer in build_seed_cnn((16, 16, 1), 2).layers]
    assert [layer.name for layer in encoder.layers] == classifier_layers[:classifier_layers.index("features") + 1]

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tracking.pretraining_run_for(record["encoder_sha256"], client)
    assert run.info.status == "FINISHED" and run.data.params["pretrain.method"] == "simclr"
    assert run.data.params["train.architecture"] == "seed_cnn"
    losses = client.get_metric_history(run.info.run_id, "loss")
    np.testing.assert_allclose([m.value for m in sorted(losses, key=lambda m: m.step)], history["loss"], rtol=1e-6)
    assert {a.path for a in client.list_artifacts(run.info.run_id, "encoder")} == {
        "encoder/encoder.keras", "encoder/pretrain.json"}
    from dicomflow.errors import DataError

    with pytest.raises(DataError, match="no pretraining run of the tracking store saved the encoder"):
        tracking.pretraining_run_for("0" * 64, client)

    # Run again (as `dvc repro --force` would): the same bytes in both outputs, for DVC's hashes.
    report = (project / "reports/pretrain_history.csv").read_bytes()
    again = subprocess.run([sys.executable, "-m", "stages.pretrain"], cwd=project, env=_stage_env(tmp_path),
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert hashlib.sha256(encoder_file.read_bytes()).hexdigest() == record["encoder_sha256"]
    assert (project / "reports/pretrain_history.csv").read_bytes() == report
