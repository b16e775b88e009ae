"""Tests for the models of volumes and studies: resnet3d_small (dicomflow/model/architectures.py),
3-D augmentation (dicomflow/model/augment.py), attention MIL (architectures.py; its weights: explain.py) and the
fixed aggregations (dicomflow/model/aggregation.py). Real Keras, 16-voxel volumes, a few epochs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from dicomflow.config.params import AugmentParams, TrainParams
from dicomflow.evaluation import explain
from dicomflow.model import architectures
from dicomflow.model.aggregation import AGGREGATIONS, aggregate
from dicomflow.model.augment import (
    RandomAffine, RandomFlip, RandomIntensity, apply_policy, build_policy, write_preview,
)
from dicomflow.model.saving import save_model
from dicomflow.model.training import train_model, training_batches

SIDE = 16
SEED = tf.constant([7, 0], tf.int64)


def _train_params(architecture: str, **changes: object) -> TrainParams:
    values = dict(architecture=architecture, strategy="default", epochs=3, batch_size=8, lr=3e-3,
                  lr_schedule="constant", class_weight="none", early_stopping_patience=0, keep="last_epoch",
                  calibration="none", ensemble=1, seed=0)
    values.update(changes)
    return TrainParams(**values)


def _augment(**changes: object) -> AugmentParams:
    values = dict(seed=3, flip=True, rotation_deg=5.0, zoom=0.05, shift=0.05, brightness=0.05, contrast=0.1,
                  noise_std=0.01)
    values.update(changes)
    return AugmentParams(**values)


def _sphere_volumes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 (n, 16, 16, 16, 1) noisy lung-grey volumes, every second one with a bright ball of
    radius 2.5 voxels somewhere inside; labels 1 for those."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    volumes = rng.uniform(0.15, 0.35, (n, SIDE, SIDE, SIDE)).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(SIDE)] * 3, indexing="ij"), axis=-1)
    for volume, label in zip(volumes, labels):
        if label:
            centre = rng.uniform(4, SIDE - 5, 3)
            volume[np.linalg.norm(grid - centre, axis=-1) <= 2.5] = 0.9
    return volumes[..., None], labels


@pytest.fixture(scope="module")
def volumes() -> np.ndarray:
    return np.random.default_rng(0).random((4, 9, 11, 13, 1)).astype(np.float32)


class TestResnet3d:
    @pytest.mark.parametrize(("n_classes", "ordinal", "width"), [(2, False, 1), (3, False, 3), (4, True, 4)])
    def test_heads(self, n_classes, ordinal, width):
        model = architectures.ARCHITECTURES["resnet3d_small"]((SIDE, SIDE, SIDE, 1), n_classes, ordinal=ordinal)
        probabilities = model.predict(np.random.default_rng(0).random((3, SIDE, SIDE, SIDE, 1)), verbose=0)
        assert probabilities.shape == (3, width)
        assert architectures.task_of(model) == ("ordinal" if ordinal else "binary" if n_classes == 2 else "multiclass")
        if width > 1:
            np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)

    def test_contract_of_an_architecture(self):
        model = architectures.build_resnet3d_small((SIDE, SIDE, SIDE, 1))
        assert model.inputs[0].name == "image"
        assert model.get_layer(architectures.FEATURES).output.shape == (None, 64)
        assert architectures.encoder_of(model).output_shape == (None, 64)
        assert isinstance(model.get_layer("stem_conv"), keras.layers.Conv3D)
        assert model.get_layer("stage3_block1_out").output.shape == (None, 2, 2, 2, 64)  # 16 -> 8 -> 4 -> 2
        norms = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
        assert norms and all(layer.synchronized for layer in norms)
        assert model.count_params() < 300_000

    def test_group_normalised(self):
        model = architectures.build_resnet3d_small((SIDE, SIDE, SIDE, 1), groups=8)
        kinds = {type(layer) for layer in model.layers}
        assert keras.layers.GroupNormalization in kinds and keras.layers.BatchNormalization not in kinds

    def test_refuses_an_image_shape(self):
        with pytest.raises(ValueError, match="resnet_small for 2-D images"):
            architectures.build_resnet3d_small((SIDE, SIDE, 1))

    @pytest.mark.slow
    def test_learns_a_ball_and_survives_saving(self, tmp_path):
        train_x, train_y = _sphere_volumes(32, seed=1)
        val_x, val_y = _sphere_volumes(16, seed=2)
        model, history = train_model(train_x, train_y, val_x, val_y, params=_train_params("resnet3d_small"),
                                     checkpoint=tmp_path / "model.keras", augment=_augment())
        assert history["val_auc"].iloc[-1] >= 0.9, history
        probabilities = architectures.predict_probabilities(model, val_x)
        assert roc_auc_score(val_y, probabilities) >= 0.9
        save_model(model, tmp_path / "again.keras")
        loaded = keras.models.load_model(tmp_path / "again.keras")  # safe mode: built-in layers only
        np.testing.assert_array_equal(architectures.predict_probabilities(loaded, val_x), probabilities)


class TestAugment3d:
    def test_same_seed_same_volumes_different_seed_different(self, volumes):
        policy = build_policy(_augment())
        first, again = (apply_policy(volumes, policy, seed=[5, 1]).numpy() for _ in range(2))
        other = apply_policy(volumes, policy, seed=[5, 2]).numpy()
        assert first.shape == volumes.shape
        np.testing.assert_array_equal(first, again)
        assert not np.allclose(first, other)
        assert not np.allclose(first, volumes)

    def test_flip_mirrors_left_right_only(self):
        volume = np.zeros((1, 5, 6, 7, 1), np.float32)
        volume[0, 1, 2, 1, 0] = 1.0
        flipped = RandomFlip(prob=1.0)(volume, SEED).numpy()
        assert flipped[0, 1, 2, 7 - 1 - 1, 0] == 1.0 and flipped.sum() == 1.0
        np.testing.assert_array_equal(RandomFlip(prob=0.0)(volume, SEED).numpy(), volume)

    def test_flip_draws_per_volume(self, volumes):
        many = np.repeat(volumes[:1], 32, axis=0)
        flipped = RandomFlip()(many, SEED).numpy()
        mirrored = np.array([np.array_equal(v, many[0, :, :, ::-1]) for v in flipped])
        assert 0 < mirrored.sum() < 32
        assert all(np.array_equal(v, many[0]) for v in flipped[~mirrored])

    def test_rotation_keeps_the_centre_voxel_and_each_slice_turns_alike(self, volumes):
        odd = np.random.default_rng(3).random((3, 7, 15, 15, 1)).astype(np.float32)
        rotated = RandomAffine(degrees=10.0, zoom=0.0, shift=0.0)(odd, SEED).numpy()
        np.testing.assert_allclose(rotated[:, :, 7, 7], odd[:, :, 7, 7], atol=1e-6)
        assert not np.allclose(rotated, odd)
        # The same in-plane turn for every slice of a volume: a volume whose slices are copies of
        # one slice stays so.
        copies = np.repeat(odd[:, :1], 7, axis=1)
        turned = RandomAffine(degrees=10.0, zoom=0.0, shift=0.0)(copies, SEED).numpy()
        np.testing.assert_allclose(turned, np.repeat(turned[:, :1], 7, axis=1), atol=1e-6)

    def test_what_comes_in_from_outside_is_the_volumes_air_not_black(self):
        # Windowed CT: air (the darkest value, 0.25 here) fills the corners a rotation uncovers and
        # the slices a shift along z brings in, not 0, an edge no scan has.
        air = np.full((4, 9, 15, 15, 1), 0.25, np.float32)
        air[:, 2:7, 4:11, 4:11] = 0.8  # a body in the middle
        moved = RandomAffine(degrees=30.0, zoom=0.0, shift=0.3)(air, SEED).numpy()
        assert moved.min() == pytest.approx(0.25, abs=1e-6) and moved.max() <= 0.8 + 1e-6
        assert np.isclose(moved[:, :, 0, 0], 0.25).all()

    def test_zoom_is_isotropic(self):
        # A linear ramp stays linear under a linear resampling: its slopes along z and x, near the
        # centre, are the stored ones divided by the volume's scale, the same scale on both axes.
        z, _, x = np.meshgrid(*[np.arange(9.0) - 4] * 3, indexing="ij")
        ramp = np.repeat((0.5 + 0.04 * z + 0.02 * x)[None, ..., None], 16, axis=0).astype(np.float32)
        zoomed = RandomAffine(degrees=0.0, zoom=0.4, shift=0.0)(ramp, SEED).numpy()[..., 0]
        slope_z = (zoomed[:, 5, 4, 4] - zoomed[:, 3, 4, 4]) / 2
        slope_x = (zoomed[:, 4, 4, 5] - zoomed[:, 4, 4, 3]) / 2
        np.testing.assert_allclose(slope_z, 2 * slope_x, rtol=1e-4)
        scales = 0.04 / slope_z
        assert np.all((scales >= 0.6 - 1e-4) & (scales <= 1.4 + 1e-4)) and np.ptp(scales) > 0.3

    def test_identity_without_draws(self, volumes):
        np.testing.assert_allclose(RandomAffine(degrees=0.0, zoom=0.0, shift=0.0)(volumes, SEED).numpy(),
                                   volumes, atol=1e-6)

    def test_intensities_stay_in_unit_range(self, volumes):
        policy = build_policy(_augment(brightness=0.5, contrast=0.5, noise_std=0.2, rotation_deg=20.0, zoom=0.3))
        result = apply_policy(volumes, policy, seed=[1, 1]).numpy()
        assert result.min() >= 0.0 and result.max() <= 1.0
        changed = RandomIntensity(brightness=0.3, contrast=0.0)(volumes, SEED).numpy() - volumes
        # One offset per volume (where no voxel was clipped).
        inside = (volumes > 0.31) & (volumes < 0.69)
        for volume in range(len(volumes)):
            offsets = changed[volume][inside[volume]]
            np.testing.assert_allclose(offsets, offsets[0], atol=1e-6)

    @pytest.mark.slow
    def test_inside_tf_data_as_training_batches(self):
        train_x, train_y = _sphere_volumes(10, seed=4)
        epochs = [[x.numpy() for x, _ in training_batches(train_x, train_y, batch_size=4, epoch=1, seed=0,
                                                          augment=_augment())] for _ in range(2)]
        assert [batch.shape for batch in epochs[0]] == [(4, SIDE, SIDE, SIDE, 1)] * 2 + [(2, SIDE, SIDE, SIDE, 1)]
        for first, again in zip(*epochs):
            np.testing.assert_array_equal(first, again)
        second = [x.numpy() for x, _ in training_batches(train_x, train_y, batch_size=4, epoch=2, seed=0,
                                                         augment=_augment())]
        assert not np.allclose(np.sort(epochs[0][0].ravel()), np.sort(second[0].ravel()))


    def test_preview_of_volumes(self, tmp_path):
        volumes, _ = _sphere_volumes(3, seed=5)
        stored = np.round(volumes[..., 0] * 255).astype(np.uint8)  # as a volume is stored: (n, z, y, x)
        path = tmp_path / "preview.png"
        write_preview(stored, build_policy(_augment(rotation_deg=20.0)), path, seed=0, n_variants=3, volumes=True)
        import matplotlib.image

        picture = matplotlib.image.imread(path)
        assert picture.shape[0] > 3 * 100 and picture.shape[1] > 4 * 100  # 3 rows, 4 columns at dpi 100

def _bags(n: int, seed: int, *, slices: int = 6) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(n, slices, 16, 16, 1) bags of noisy slices, the last few of some bags padding (all 0);
    every second bag holds a bright square on one real slice. Returns bags, labels, the signal
    slice (-1: none) and each bag's count of real slices."""
    rng = np.random.default_rng(seed)
    bags = rng.uniform(0.15, 0.35, (n, slices, SIDE, SIDE, 1)).astype(np.float32)
    labels, signal, real = np.arange(n) % 2, np.full(n, -1), rng.integers(3, slices + 1, n)
    for bag in range(n):
        bags[bag, real[bag]:] = 0.0
        if labels[bag]:
            signal[bag] = rng.integers(real[bag])
            row, col = rng.integers(2, SIDE - 7, 2)
            bags[bag, signal[bag], row:row + 5, col:col + 5] = 0.95
    return bags, labels, signal, real


@pytest.mark.slow
class TestAttentionMil:
    @pytest.fixture(scope="class")
    def model(self):
        keras.utils.set_random_seed(0)
        return architectures.ARCHITECTURES["attention_mil"]((6, SIDE, SIDE, 1), 2)

    def test_permutation_invariant(self, model):
        bags, *_ = _bags(4, seed=0)
        order = np.random.default_rng(1).permutation(6)
        np.testing.assert_allclose(architectures.predict_probabilities(model, bags[:, order]),
                                   architectures.predict_probabilities(model, bags), atol=1e-6)
        np.testing.assert_allclose(explain.attention_weights(model, bags[:, order]),
                                   explain.attention_weights(model, bags)[:, order], atol=1e-6)

    def test_attention_sums_to_one_over_real_slices_and_padding_weighs_nothing(self, model):
        bags, _, _, real = _bags(8, seed=2)
        assert (real < 6).any()
        weights = explain.attention_weights(model, bags)
        for bag, count in enumerate(real):
            assert np.all(weights[bag, :count] > 0) and np.all(weights[bag, count:] == 0.0)
            assert weights[bag, :count].sum() == pytest.approx(1.0, abs=1e-6)
        # Padding changes nothing: the same bags padded to 9 slices score the same.
        longer = architectures.build_attention_mil((9, SIDE, SIDE, 1), 2)
        longer.set_weights(model.get_weights())
        np.testing.assert_allclose(
            architectures.predict_probabilities(longer, np.concatenate([bags, np.zeros_like(bags[:, :3])], axis=1)),
            architectures.predict_probabilities(model, bags), atol=1e-6)

    def test_refuses_volume_and_batch_normalised_encoders_and_a_model_without_attention(self, model):
        with pytest.raises(ValueError, match="2-D architectures"):
            architectures.build_attention_mil((6, SIDE, SIDE, 1), encoder="resnet3d_small")
        with pytest.raises(ValueError, match="batch normalisation"):
            architectures.build_attention_mil((6, SIDE, SIDE, 1), encoder="resnet_small")
        assert architectures.build_attention_mil((6, SIDE, SIDE, 1), encoder="seed_cnn").output_shape == (None, 1)
        with pytest.raises(ValueError, match="no 'attention' layer"):
            explain.attention_weights(architectures.build_seed_cnn((SIDE, SIDE, 1)), np.zeros((1, SIDE, SIDE, 1)))

    def test_finds_the_one_slice_with_the_signal(self, tmp_path):
        train_x, train_y, _, _ = _bags(32, seed=3)
        val_x, val_y, signal, _ = _bags(16, seed=4)
        model, history = train_model(train_x, train_y, val_x, val_y,
                                     params=_train_params("attention_mil", epochs=4, lr=1e-3),
                                     checkpoint=tmp_path / "model.keras")
        probabilities = architectures.predict_probabilities(model, val_x)
        assert roc_auc_score(val_y, probabilities) >= 0.9, history
        weights = explain.attention_weights(model, val_x)
        positive = val_y == 1
        # The attention rests on the slice that holds the signal.
        assert np.mean(weights[positive].argmax(axis=1) == signal[positive]) >= 0.75
        loaded = keras.models.load_model(tmp_path / "model.keras")
        np.testing.assert_array_equal(explain.attention_weights(loaded, val_x), weights)


class TestAggregate:
    PROBABILITIES = np.array([0.1, 0.9, 0.4, 0.7])

    @pytest.mark.parametrize(("method", "k", "expected"), [
        ("mean", 3, 0.525), ("max", 3, 0.9), ("topk_mean", 3, (0.9 + 0.7 + 0.4) / 3), ("topk_mean", 1, 0.9),
        ("topk_mean", 2, 0.8), ("topk_mean", 10, 0.525)])
    def test_hand_computed(self, method, k, expected):
        assert aggregate(self.PROBABILITIES, method, k=k) == pytest.approx(expected, abs=1e-12)

    def test_one_part(self):
        assert {aggregate(np.array([0.3]), method) for method in AGGREGATIONS} == {0.3}

    @pytest.mark.parametrize(("probabilities", "method", "k", "message"), [
        ([0.2], "median", 3, "one of mean, max, topk_mean"), ([0.2], "topk_mean", 0, "k .* int >= 1"),
        ([], "mean", 3, "non-empty 1-D"), ([[0.2, 0.3]], "mean", 3, "non-empty 1-D"),
        ([0.2, 1.5], "max", 3, "in \\[0, 1\\]"), ([0.2, np.nan], "mean", 3, "NaN: 1")])
    def test_refuses(self, probabilities, method, k, message):
        with pytest.raises(ValueError, match=message):
            aggregate(np.asarray(probabilities, float), method, k=k)


def test_architectures_keep_their_place():
    """The volume architectures are registered beside the 2-D ones."""
    assert {"resnet3d_small", "attention_mil"} <= set(architectures.ARCHITECTURES)
    assert set(architectures.VOLUME_ARCHITECTURES) <= set(architectures.ARCHITECTURES)
