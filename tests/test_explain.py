"""Grad-CAM for evaluate: the maps of a trained model point at the evidence, the maths against
NumPy, the layer choice, the example picking and the PNG grid."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from dicomflow.evaluation.explain import (
    grad_cam,
    last_conv_layer,
    pick_class_examples,
    pick_examples,
    write_class_grad_cam_examples,
    write_grad_cam_examples,
    write_grad_cam_grid,
)
from dicomflow.model.architectures import build_seed_cnn

import keras
layers = keras.layers

SIDE, SQUARE = 32, 6


def _square_images(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Noise images, every other one (label 1) with a bright 6x6 square in the top-left quadrant.

    Returns the images (n, 32, 32, 1), the labels and each square's top-left corner (row, col);
    label 0 images get a corner too, unused.
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.uniform(0.0, 0.4, (n, SIDE, SIDE)).astype(np.float32)
    corners = rng.integers(0, SIDE // 2 - SQUARE + 1, (n, 2))
    for image, label, (row, col) in zip(images, labels, corners):
        if label:
            image[row:row + SQUARE, col:col + SQUARE] = 1.0
    return images[..., None], labels, corners


def _build_gap_cnn(side: int = SIDE):
    """Two convolutions, global average pooling, a sigmoid: the head Grad-CAM was made for."""
    inputs = keras.Input((side, side, 1))
    x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(16, 3, padding="same", activation="relu", name="features")(x)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x), name="gap_cnn")


@pytest.fixture(scope="module")
def trained():
    """A GAP CNN trained to find the square (a few seconds on two CPU cores), and test images."""
    keras.utils.set_random_seed(0)
    train_x, train_y, _ = _square_images(512, seed=0)
    model = _build_gap_cnn()
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="binary_crossentropy")
    model.fit(train_x, train_y, epochs=6, batch_size=32, verbose=0)
    test_x, test_y, corners = _square_images(32, seed=100)
    return model, test_x, test_y, corners


@pytest.mark.slow  # trains a network (the module's trained fixture)
class TestGradCamOnATrainedModel:
    def test_heat_concentrates_on_the_evidence(self, trained):
        model, images, labels, corners = trained
        scores = model.predict(images, verbose=0).ravel()
        # Only a model that learned the task says anything about where its evidence lies.
        assert np.mean((scores >= 0.5) == labels) >= 0.95
        positives = labels == 1
        heatmaps = grad_cam(model, images[positives])
        for heatmap, (row, col) in zip(heatmaps, corners[positives]):
            inside = np.zeros((SIDE, SIDE), bool)
            inside[row:row + SQUARE, col:col + SQUARE] = True
            # Seeds 0-5 gave 24-30x, an untrained network 3-9x (bright pixels light up any conv).
            assert heatmap[inside].mean() > 10 * heatmap[~inside].mean()
            # The square is 9 % of the top-left quadrant, 3.5 % of the image.
            assert heatmap[:SIDE // 2, :SIDE // 2].sum() > 0.5 * heatmap.sum()

    def test_shape_range_and_batching(self, trained):
        model, images, labels, _ = trained
        heatmaps = grad_cam(model, images)
        assert heatmaps.shape == (len(images), SIDE, SIDE) and heatmaps.dtype == np.float32
        assert heatmaps.min() >= 0.0 and np.isfinite(heatmaps).all()
        # Each map is scaled to peak at 1; noise alone holds no evidence of the square, its map is 0.
        peaks = heatmaps.max(axis=(1, 2))
        np.testing.assert_allclose(peaks[labels == 1], 1.0, atol=1e-6)
        assert set(np.round(peaks, 6)) <= {0.0, 1.0}
        np.testing.assert_allclose(grad_cam(model, images, batch_size=5), heatmaps, atol=1e-5)
        assert grad_cam(model, images[:0]).shape == (0, SIDE, SIDE)

    def test_writes_the_examples_grid(self, trained, tmp_path):
        model, images, labels, _ = trained
        scores = model.predict(images, verbose=0).ravel()
        path = write_grad_cam_examples(model, images, labels, scores, threshold=0.5,
                                       path=tmp_path / "plots" / "grad_cam.png", per_group=3)
        assert path.is_file() and matplotlib.image.imread(path).ndim == 3


def _linear_gap_model(n_units: int, activation: str | None, *, seed: int = 1):
    """Conv (same size as the input) -> global average -> Dense: Grad-CAM is the class
    activation map there, relu(sum_k W[k, c] A_k), up to a positive factor."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1))
    features = layers.Conv2D(4, 3, padding="same", activation="relu", name="features")(inputs)
    pooled = layers.GlobalAveragePooling2D()(features)
    outputs = layers.Dense(n_units, activation=activation, name="head")(pooled)
    return keras.Model(inputs, outputs), keras.Model(inputs, features)


def _cam(features: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The class activation map in NumPy, normalised per image."""
    cam = np.maximum(np.einsum("bhwk,bk->bhw", features, weights), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.where(peak > 0, peak, 1.0), 0.0)


class TestGradCamMaths:
    images = np.random.default_rng(3).uniform(0, 1, (6, 8, 8, 1)).astype(np.float32)

    @pytest.mark.parametrize("activation", [None, "sigmoid"])
    @pytest.mark.parametrize("class_index, sign", [(None, 1.0), (1, 1.0), (0, -1.0)])
    def test_one_unit_output_is_the_class_activation_map(self, activation, class_index, sign):
        model, feature_model = _linear_gap_model(1, activation)
        kernel = model.get_layer("head").get_weights()[0][:, 0]
        features = feature_model.predict(self.images, verbose=0)
        expected = _cam(features, np.tile(sign * kernel, (len(self.images), 1)))
        result = grad_cam(model, self.images, layer_name="features", class_index=class_index)
        np.testing.assert_allclose(result, expected, atol=1e-5)

    def test_a_separate_sigmoid_layer_is_seen_through(self):
        model, feature_model = _linear_gap_model(1, None)
        with_sigmoid = keras.Model(model.inputs, layers.Activation("sigmoid")(model.outputs[0]))
        np.testing.assert_allclose(grad_cam(with_sigmoid, self.images), grad_cam(model, self.images),
                                   atol=1e-5)

    @pytest.mark.parametrize("class_index", [None, 2])
    def test_softmax_explains_the_given_or_predicted_class(self, class_index):
        model, feature_model = _linear_gap_model(3, "softmax")
        kernel = model.get_layer("head").get_weights()[0]
        predicted = model.predict(self.images, verbose=0).argmax(axis=1)
        classes = predicted if class_index is None else np.full(len(self.images), class_index)
        expected = _cam(feature_model.predict(self.images, verbose=0), kernel[:, classes].T)
        result = grad_cam(model, self.images, class_index=class_index)
        np.testing.assert_allclose(result, expected, atol=1e-5)

    def test_softmax_explains_a_class_per_image(self):
        model, feature_model = _linear_gap_model(3, "softmax")
        kernel = model.get_layer("head").get_weights()[0]
        classes = np.array([2, 0, 1, 1, 2, 0])  # e.g. each image's called grade, not its most probable
        expected = _cam(feature_model.predict(self.images, verbose=0), kernel[:, classes].T)
        np.testing.assert_allclose(grad_cam(model, self.images, class_index=classes, batch_size=4), expected,
                                   atol=1e-5)
        with pytest.raises(ValueError, match=r"one class index in \[0, 2\] per image.*got 6 indices \[0, 3\]"):
            grad_cam(model, self.images, class_index=np.array([0, 3, 0, 0, 0, 0]))
        with pytest.raises(ValueError, match="got 2 indices"):
            grad_cam(model, self.images, class_index=np.array([0, 1]))

    def test_a_saturated_sigmoid_still_gives_a_map(self):
        model, feature_model = _linear_gap_model(1, "sigmoid")
        kernel, bias = model.get_layer("head").get_weights()
        model.get_layer("head").set_weights([np.abs(kernel) * 1e4, bias])  # p == 1.0 in float32
        assert (model.predict(self.images, verbose=0) == 1.0).all()
        result = grad_cam(model, self.images)
        assert (result.max(axis=(1, 2)) == 1.0).all()

    def test_no_evidence_stays_zero(self):
        model, _ = _linear_gap_model(1, "sigmoid")
        conv = model.get_layer("features")
        conv.set_weights([np.zeros_like(weight) for weight in conv.get_weights()])
        result = grad_cam(model, self.images)
        assert np.isfinite(result).all() and not result.any()

    def test_upsamples_a_coarse_map_to_the_input_size(self):
        keras.utils.set_random_seed(0)
        model = build_seed_cnn((20, 20, 1))  # its second conv's map is 6x6
        images = np.random.default_rng(0).uniform(0, 1, (2, 20, 20, 1)).astype(np.float32)
        result = grad_cam(model, images)
        assert result.shape == (2, 20, 20) and result.dtype == np.float32
        assert result.min() >= 0.0 and result.max() <= 1.0

    def test_rejects_bad_arguments(self):
        model, _ = _linear_gap_model(1, "sigmoid")
        with pytest.raises(ValueError, match=r"images must be \(n, h, w, c\).*got shape \(6, 8, 8\)"):
            grad_cam(model, self.images[..., 0])
        with pytest.raises(ValueError, match=r"got shape \(6, 9, 8, 1\)"):
            grad_cam(model, np.zeros((6, 9, 8, 1), np.float32))
        with pytest.raises(ValueError, match="'nowhere' is not a top-level layer.*features"):
            grad_cam(model, self.images, layer_name="nowhere")
        with pytest.raises(ValueError, match="'head'.*needs a 4-D"):
            grad_cam(model, self.images, layer_name="head")
        with pytest.raises(ValueError, match=r"class_index must be in \[0, 1\].*got 2"):
            grad_cam(model, self.images, class_index=2)
        with pytest.raises(ValueError, match="batch_size must be a positive int; got 0"):
            grad_cam(model, self.images, batch_size=0)


class TestLastConvLayer:
    def test_seed_cnn_gives_its_second_conv(self):
        model = build_seed_cnn((64, 64, 1))
        assert last_conv_layer(model) == model.layers[3].name
        assert type(model.get_layer(last_conv_layer(model))).__name__ == "Conv2D"

    def test_residual_model_gives_the_last_block_output(self):
        inputs = keras.Input((16, 16, 1))
        x = layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
        shortcut = x
        x = layers.Conv2D(8, 3, padding="same")(x)
        x = layers.BatchNormalization()(x)
        x = layers.Add()([x, shortcut])
        x = layers.Activation("relu", name="block_out")(x)
        x = layers.GlobalAveragePooling2D()(x)
        model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
        assert last_conv_layer(model) == "block_out"
        assert grad_cam(model, np.ones((2, 16, 16, 1), np.float32)).shape == (2, 16, 16)

    def test_nested_backbone_is_the_feature_map(self):
        backbone_in = keras.Input((16, 16, 1))
        backbone_out = layers.Conv2D(4, 3, activation="relu")(layers.Conv2D(4, 3)(backbone_in))
        backbone = keras.Model(backbone_in, backbone_out, name="backbone")
        inputs = keras.Input((16, 16, 1))
        x = layers.GlobalAveragePooling2D()(backbone(inputs))
        model = keras.Model(inputs, layers.Dense(1, activation="sigmoid")(x))
        assert last_conv_layer(model) == "backbone"
        images = np.random.default_rng(0).uniform(0, 1, (3, 16, 16, 1)).astype(np.float32)
        assert grad_cam(model, images).shape == (3, 16, 16)

    def test_pooled_backbone_is_a_clear_error(self):
        backbone_in = keras.Input((16, 16, 1))
        pooled = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3)(backbone_in))
        backbone = keras.Model(backbone_in, pooled, name="pooled_backbone")
        inputs = keras.Input((16, 16, 1))
        model = keras.Model(inputs, layers.Dense(1)(backbone(inputs)))
        with pytest.raises(ValueError, match="'pooled_backbone'.*without global pooling"):
            last_conv_layer(model)

    def test_sequential_model(self):
        model = keras.Sequential([keras.Input((10, 10, 1)), layers.Conv2D(2, 3, name="only_conv"),
                                  layers.Flatten(), layers.Dense(1, activation="sigmoid")])
        assert last_conv_layer(model) == "only_conv"
        assert grad_cam(model, np.ones((1, 10, 10, 1), np.float32)).shape == (1, 10, 10)

    def test_no_conv_layer_is_a_clear_error(self):
        inputs = keras.Input((8, 8, 1))
        x = layers.MaxPooling2D(2)(inputs)  # 4-D, but no features of its own
        model = keras.Model(inputs, layers.Dense(1)(layers.Flatten()(x)), name="dense_only")
        with pytest.raises(ValueError, match="model 'dense_only' has no convolution"):
            last_conv_layer(model)

    def test_unbuilt_model_is_a_clear_error(self):
        model = keras.Sequential([layers.Conv2D(2, 3), layers.Flatten(), layers.Dense(1)], name="unbuilt")
        with pytest.raises(ValueError, match="model 'unbuilt' has none"):
            last_conv_layer(model)


class TestPickExamples:
    # At threshold 0.5 (score >= 0.5 is positive):
    #   TP: 0 (0.9), 2 (0.7), 5 (0.7), 7 (0.55)   FP: 3 (0.8), 8 (0.5)
    #   FN: 1 (0.1), 4 (0.3), 9 (0.45)            TN: 6 (0.2)
    y_true = np.array([1, 1, 1, 0, 1, 1, 0, 1, 0, 1])
    y_score = np.array([0.9, 0.1, 0.7, 0.8, 0.3, 0.7, 0.2, 0.55, 0.5, 0.45])

    def test_most_confident_first_ties_in_index_order(self):
        groups = pick_examples(self.y_true, self.y_score, threshold=0.5, per_group=3)
        assert list(groups) == ["true_positives", "false_positives", "false_negatives"]
        assert groups["true_positives"].tolist() == [0, 2, 5]
        assert groups["false_positives"].tolist() == [3, 8]
        assert groups["false_negatives"].tolist() == [1, 4, 9]

    def test_groups_can_be_short_or_empty(self):
        groups = pick_examples(self.y_true, self.y_score, threshold=0.95)
        assert groups["true_positives"].tolist() == [] and groups["false_positives"].tolist() == []
        assert groups["false_negatives"].tolist() == [1, 4, 9, 7]  # every positive is missed
        assert all(len(g) == 0 for g in pick_examples(self.y_true, self.y_score, threshold=0.5,
                                                      per_group=0).values())

    def test_rejects_multi_class_and_mismatched_lengths(self):
        with pytest.raises(ValueError, match=r"binary-only.*got labels \[0, 1, 2\]"):
            pick_examples(np.array([0, 1, 2]), np.array([0.1, 0.5, 0.9]), threshold=0.5)
        with pytest.raises(ValueError, match="same length; got 3 and 2"):
            pick_examples(np.array([0, 1, 1]), np.array([0.1, 0.5]), threshold=0.5)
        with pytest.raises(ValueError, match="per_group must be an int >= 0; got -1"):
            pick_examples(self.y_true, self.y_score, threshold=0.5, per_group=-1)


class TestPickClassExamples:
    # Three classes; (true, called, confidence) per image:
    #   0: (0, 0, .9)  1: (0, 0, .6)  2: (0, 1, .8)  3: (0, 2, .7)  4: (1, 1, .5)  5: (1, 1, .95)
    #   6: (2, 0, .99) 7: (2, 0, .4)
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    called = np.array([0, 0, 1, 2, 1, 1, 0, 0])
    confidence = np.array([0.9, 0.6, 0.8, 0.7, 0.5, 0.95, 0.99, 0.4])

    def test_right_then_wrong_per_true_class_most_confident_first(self):
        groups = pick_class_examples(self.y_true, self.called, self.confidence, n_classes=4, per_group=4)
        assert [g.tolist() for g in groups] == [
            [0, 1, 2, 3],  # two right (0.9, 0.6), two wrong (0.8, 0.7)
            [5, 4],        # no mistakes: the right ones fill in
            [6, 7],        # no right call: the mistakes fill in
            [],            # a class without images
        ]
        assert [g.tolist() for g in pick_class_examples(self.y_true, self.called, self.confidence, n_classes=3,
                                                        per_group=3)] == [[0, 1, 2], [5, 4], [6, 7]]

    def test_rejects_mismatched_lengths(self):
        with pytest.raises(ValueError, match="same length; got 8, 8 and 2"):
            pick_class_examples(self.y_true, self.called, self.confidence[:2], n_classes=3)


def _corner_squares(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """16x16 noise images with a bright 4x4 square top left (class 0), top right (1) or at the bottom (2)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    images = rng.uniform(0.0, 0.3, (n, 16, 16)).astype(np.float32)
    for image, label in zip(images, labels):
        row, col = ((1, 1), (1, 11), (11, 6))[label]
        image[row:row + 4, col:col + 4] = 1.0
    return images[..., None], labels


@pytest.mark.slow
class TestClassGradCam:
    """Grad-CAM of a real three-class Keras model: the heatmap of each image's called class, labelled."""

    @pytest.fixture(scope="class")
    def model(self):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((16, 16, 1))
        x = layers.Conv2D(8, 3, padding="same", activation="relu", name="features")(inputs)
        x = layers.GlobalMaxPooling2D()(x)
        model = keras.Model(inputs, layers.Dense(3, activation="softmax")(x), name="three_corners")
        model.compile(optimizer=keras.optimizers.Adam(0.03), loss="sparse_categorical_crossentropy")
        model.fit(*_corner_squares(96, seed=0), epochs=15, batch_size=16, verbose=0)
        return model

    def test_the_called_class_map_and_a_labelled_png(self, model, tmp_path):
        import matplotlib.pyplot as plt
        from dicomflow.evaluation.explain import _grid_figure

        images, labels = _corner_squares(12, seed=1)
        probabilities = model.predict(images, verbose=0)
        called = probabilities.argmax(axis=1)
        assert np.mean(called == labels) >= 0.9  # it learnt where each class's square is
        path = write_class_grad_cam_examples(model, images, labels, probabilities, called=called,
                                             classes=[10, 20, 30], path=tmp_path / "grad_cam.png",
                                             per_group=2, noun="grade")
        png = matplotlib.image.imread(path)
        assert png.ndim == 3 and png[..., :3].std() > 0.05
        # Each called class's heat sits on its square's side of the image.
        maps = grad_cam(model, images, class_index=called)
        for heatmap, label, call in zip(maps, labels, called):
            if label == call == 0:
                assert heatmap[:8, :8].sum() > heatmap[:8, 8:].sum()
            elif label == call == 1:
                assert heatmap[:8, 8:].sum() > heatmap[:8, :8].sum()
        # The tiles say the called grade and its probability; the rows the true grade.
        picked = pick_class_examples(labels, called, probabilities.max(axis=1), n_classes=3, per_group=2)
        chosen = np.concatenate(picked)
        titles = [f"called {[10, 20, 30][called[i]]}, p = {probabilities[i, called[i]]:.2f}" for i in chosen]
        fig = _grid_figure(images[chosen, ..., 0], maps[chosen], {f"actual grade {g}": np.arange(2 * k, 2 * k + 2)
                                                                  for k, g in enumerate([10, 20, 30])},
                           probabilities.max(axis=1)[chosen], titles)
        shown = [ax.get_title() for ax in fig.axes if ax.get_title()]
        assert shown[0].startswith(f"called {[10, 20, 30][called[chosen[0]]]}, p = ")
        assert [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel().startswith("actual")] == [
            "actual grade 10", "actual grade 20", "actual grade 30"]
        plt.close(fig)


class TestWriteGradCamGrid:
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (5, 12, 12, 1)).astype(np.float32)
    heatmaps = rng.uniform(0, 1, (5, 12, 12)).astype(np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1])

    def test_one_row_per_group_an_empty_one_included(self, tmp_path):
        groups = {"true_positives": np.array([0, 1]), "false_positives": np.array([], int),
                  "false_negatives": np.array([3])}
        heatmaps = self.heatmaps.copy()
        heatmaps[3] = 0.0  # drawn with an "empty map" note
        path = write_grad_cam_grid(self.images, heatmaps, groups, self.scores, tmp_path / "new" / "grid.png")
        png = matplotlib.image.imread(path)
        # 2.2 in a column plus 1.4 for the row labels and the colour bar, 2.3 in a row, at 100 dpi
        assert png.shape == (690, 580, 4)
        assert png[..., :3].std() > 0.05  # something was drawn

    def test_all_groups_empty_and_colour_images(self, tmp_path):
        groups = {"true_positives": np.array([], int), "false_negatives": np.array([], int)}
        colour = self.images.repeat(3, axis=-1)
        png = matplotlib.image.imread(write_grad_cam_grid(colour, self.heatmaps, groups, self.scores,
                                                          tmp_path / "grid.png"))
        assert png.shape == (460, 360, 4)

    def test_rejects_inconsistent_input(self, tmp_path):
        path = tmp_path / "grid.png"
        with pytest.raises(ValueError, match=r"got images \(5, 12, 12\), heatmaps \(4, 12, 12\)"):
            write_grad_cam_grid(self.images, self.heatmaps[:4], {"tp": np.array([0])}, self.scores, path)
        with pytest.raises(ValueError, match=r"group 'tp' holds indices outside 0\.\.4"):
            write_grad_cam_grid(self.images, self.heatmaps, {"tp": np.array([5])}, self.scores, path)
        with pytest.raises(ValueError, match="at least one group"):
            write_grad_cam_grid(self.images, self.heatmaps, {}, self.scores, path)
        assert not path.exists()


def test_tiles_are_titled_with_the_probability_and_the_grid_has_a_colour_bar():
    import matplotlib.pyplot as plt
    from dicomflow.evaluation.explain import _grid_figure

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 1, (2, 12, 12)).astype(np.float32)
    heatmaps = rng.uniform(0, 1, (2, 12, 12)).astype(np.float32)
    heatmaps[1] = 0.0
    fig = _grid_figure(images, heatmaps, {"true_positives": np.array([0, 1])}, np.array([1 - 2.1e-08, 0.734]))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["p(positive) = 1.00", "p(positive) = 0.73, empty map"]
    colour_bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(colour_bars) == 1
    assert colour_bars[0].get_ylabel() == "Grad-CAM, share of the image's peak"
    assert colour_bars[0].get_ylim() == (0.0, 1.0)
    plt.close(fig)


def test_a_colour_photograph_is_drawn_in_colour_and_grey_repeated_in_grey():
    from dicomflow.evaluation.explain import display_images

    photo = np.zeros((1, 12, 12, 3), np.float32)
    photo[..., 0] = 0.8  # red, as a fundus is
    np.testing.assert_array_equal(display_images(photo), photo)
    grey = np.full((2, 12, 12, 3), 0.4, np.float32)
    np.testing.assert_allclose(display_images(grey), np.full((2, 12, 12), 0.4))
    np.testing.assert_allclose(display_images(grey[..., :1]), np.full((2, 12, 12), 0.4))
