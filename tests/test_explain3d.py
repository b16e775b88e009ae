"""Tests for Grad-CAM of volumes and the slice montages (dicomflow/evaluation/explain.py): hand-built
Conv3D networks whose map is known, and real resnet3d_small / attention-MIL networks trained a few
epochs on the 16-voxel fixtures of tests/test_model3d.py."""

from __future__ import annotations

import keras
import matplotlib.image
import numpy as np
import pytest
from test_model3d import SIDE, _bags, _sphere_volumes, _train_params

from dicomflow.evaluation import explain
from dicomflow.model import architectures
from dicomflow.model.training import train_model

BALL = 0.9  # the fixture's ball voxels; its noise is in [0.15, 0.35]


def _identity_conv3d(shape: tuple[int, int, int, int], *, strides: int = 1):
    """input -> Conv3D(1 filter, 1x1x1, weight 1, no bias) -> ReLU -> mean -> Dense(weight 1) -> sigmoid:
    the class score's gradient is the same positive number at every map voxel, so the Grad-CAM map is
    the (strided) input itself."""
    inputs = keras.Input(shape=shape, name="image")
    conv = keras.layers.Conv3D(1, 1, strides=strides, use_bias=False, name="conv")
    features = keras.layers.ReLU(name="conv_relu")(conv(inputs))
    pooled = keras.layers.GlobalAveragePooling3D()(features)
    dense = keras.layers.Dense(1, activation="sigmoid", name="probability")
    model = keras.Model(inputs, dense(pooled))
    conv.set_weights([np.ones((1, 1, 1, shape[-1], 1), np.float32)])
    dense.set_weights([np.ones((1, 1), np.float32), np.zeros(1, np.float32)])
    return model


class TestGradCamOfVolumes:
    def test_last_conv_layer_of_a_3d_network_is_its_last_3d_map(self):
        model = architectures.build_resnet3d_small((SIDE, SIDE, SIDE, 1))
        assert explain.last_conv_layer(model) == "stage3_block1_out"
        assert explain.last_conv_layer(_identity_conv3d((6, 8, 8, 1))) == "conv_relu"

    def test_the_map_of_a_known_network_is_its_input(self):
        volume = np.full((1, 6, 8, 10, 1), 0.1, np.float32)
        volume[0, 4, 2:5, 3:7] = 0.8  # a bright patch on slice 4
        heatmaps = explain.grad_cam(_identity_conv3d((6, 8, 10, 1)), volume)
        assert heatmaps.shape == (1, 6, 8, 10)
        np.testing.assert_allclose(heatmaps[0], volume[0, ..., 0] / 0.8, rtol=1e-5)
        shares = explain.slice_masses(heatmaps)
        assert shares.shape == (1, 6) and shares[0].sum() == pytest.approx(1.0)
        # Slice 4: 12 voxels at 1 plus 68 at 1/8; the other five: 80 at 1/8 each.
        assert shares[0, 4] == pytest.approx((12 + 68 / 8) / (12 + 68 / 8 + 5 * 80 / 8))

    def test_coarse_maps_are_upsampled_trilinearly_to_the_volume(self):
        # Stride 2: the map is (2, 2, 2), one bright map voxel at z 1, upsampled to 4 slices.
        volume = np.zeros((1, 4, 4, 4, 1), np.float32)
        volume[0, 2, 0, 0] = 1.0
        heatmaps = explain.grad_cam(_identity_conv3d((4, 4, 4, 1), strides=2), volume)
        assert heatmaps.shape == (1, 4, 4, 4)
        # Half-pixel centres: output slices 0..3 sit at map z -0.25, 0.25, 0.75, 1.25 (clamped).
        np.testing.assert_allclose(heatmaps[0, :, 0, 0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
        np.testing.assert_allclose(heatmaps[0, 3, :, 0], [1.0, 0.75, 0.25, 0.0], atol=1e-6)

    def test_refuses_a_volume_for_an_image_model_and_names_attention_for_mil(self):
        with pytest.raises(ValueError, match=r"\(n, d, h, w, c\)"):
            explain.grad_cam(architectures.build_seed_cnn((SIDE, SIDE, 1)), np.zeros((1, 4, SIDE, SIDE, 1)))
        mil = architectures.build_attention_mil((4, SIDE, SIDE, 1), encoder="seed_cnn")
        with pytest.raises(ValueError, match="attention_weights"):
            explain.last_conv_layer(mil)


@pytest.mark.slow
class TestTrainedNetworks:
    @pytest.fixture(scope="class")
    def resnet(self, tmp_path_factory):
        train_x, train_y = _sphere_volumes(32, seed=1)
        val_x, val_y = _sphere_volumes(16, seed=2)
        model, _ = train_model(train_x, train_y, val_x, val_y, params=_train_params("resnet3d_small"),
                               checkpoint=tmp_path_factory.mktemp("resnet") / "model.keras")
        return model, val_x, val_y

    def test_grad_cam_mass_sits_on_the_balls_slices(self, resnet):
        model, val_x, val_y = resnet
        positive = np.flatnonzero(val_y == 1)
        # The ball's slices, by the fixture's construction: its voxels alone are exactly BALL.
        balls = [np.flatnonzero((volume[..., 0] == BALL).any(axis=(1, 2))) for volume in val_x[positive]]
        # The last map (2x2x2 at 16^3: each cell spans 8 slices) and the finer 4x4x4 one before it.
        for layer, excess in ((None, 0.0), ("stage2_block1_out", 0.1)):
            shares = explain.slice_masses(explain.grad_cam(model, val_x[positive], layer_name=layer))
            for ball, share in zip(balls, shares):
                # More of the map's mass on the ball's slices than their share of the volume's slices.
                assert share[ball].sum() > len(ball) / SIDE + excess, (layer, ball, np.round(share, 3))
            centres = [np.average(np.arange(SIDE), weights=share) for share in shares]
            assert np.corrcoef(centres, [ball.mean() for ball in balls])[0, 1] > 0.8, (layer, centres)
        # On the finer map the most activated slice is one of the ball's, or next to it.
        assert all(ball.min() - 1 <= share.argmax() <= ball.max() + 1 for ball, share in zip(balls, shares))

    def test_montage_written_and_labelled(self, resnet, tmp_path):
        model, val_x, val_y = resnet
        scores = architectures.predict_probabilities(model, val_x)
        path = explain.write_grad_cam_examples(model, val_x, val_y, scores, threshold=0.5, per_group=2,
                                               path=tmp_path / "grad_cam.png", spacing_mm=5.0, slices=3)
        picture = matplotlib.image.imread(path)
        groups = explain.pick_examples(val_y, scores, threshold=0.5, per_group=2)
        rows = sum(max(len(indices), 1) for indices in groups.values())
        assert picture.shape[0] >= rows * 200 and picture.shape[1] >= 3 * 190  # 2.2 in per row, 2 in per slice
        with pytest.raises(ValueError, match="spacing_mm"):
            explain.write_grad_cam_examples(model, val_x, val_y, scores, threshold=0.5, path=tmp_path / "x.png")

    def test_attention_montage_of_mil(self, tmp_path):
        train_x, train_y, _, _ = _bags(32, seed=3)
        val_x, val_y, signal, _ = _bags(16, seed=4)
        model, _ = train_model(train_x, train_y, val_x, val_y,
                               params=_train_params("attention_mil", epochs=4, lr=1e-3),
                               checkpoint=tmp_path / "model.keras")
        assert explain.is_attention_model(model)
        scores = architectures.predict_probabilities(model, val_x)
        path = explain.write_grad_cam_examples(model, val_x, val_y, scores, threshold=0.5, path=tmp_path / "mil.png",
                                               spacing_mm=2.5, slices=2)
        assert matplotlib.image.imread(path).shape[0] > 400


class TestSliceMontage:
    def test_slices_ranked_by_score_with_positions(self, tmp_path):
        rng = np.random.default_rng(0)
        volumes = rng.random((3, 5, SIDE, SIDE)).astype(np.float32)
        heatmaps = np.zeros_like(volumes)
        heatmaps[0, 3] = 1.0
        shares = explain.slice_masses(heatmaps)
        np.testing.assert_array_equal(shares[0], [0, 0, 0, 1, 0])
        np.testing.assert_array_equal(shares[1], np.zeros(5))  # an empty map has no share anywhere
        np.testing.assert_allclose(explain.slice_positions_mm(4, 2.5), [0.0, 2.5, 5.0, 7.5])
        path = explain.write_slice_montage(volumes, shares, {"true_positives": np.array([0, 1]),
                                                             "false_positives": np.array([], int)},
                                           np.array([0.9, 0.8, 0.1]), tmp_path / "m.png", spacing_mm=5.0,
                                           heatmaps=heatmaps, slices=2)
        assert matplotlib.image.imread(path).shape[0] >= 3 * 200

    @pytest.mark.parametrize(("changes", "message"), [
        ({"spacing_mm": 0.0}, "positive z spacing"), ({"slices": 0}, "slices must"),
        ({"groups": {}}, "at least one group"), ({"groups": {"a": np.array([7])}}, "outside 0..1"),
        ({"slice_scores": np.zeros((2, 3))}, "must agree")])
    def test_refuses(self, tmp_path, changes, message):
        arguments = dict(volumes=np.zeros((2, 4, 6, 6)), slice_scores=np.zeros((2, 4)), groups={"a": np.array([0])},
                         scores=np.zeros(2), path=tmp_path / "m.png", spacing_mm=5.0)
        arguments.update(changes)
        with pytest.raises(ValueError, match=message):
            explain.write_slice_montage(**arguments)
