"""Grad-CAM heatmaps for the evaluate stage: where in an image the model found its evidence.

Pure functions: pick the most telling test images (confident true positives, false positives,
false negatives), compute their Grad-CAM heatmaps (Selvaraju et al. 2017, "Grad-CAM: Visual
Explanations from Deep Networks via Gradient-based Localization") and draw them as one PNG grid.
Nothing here reads params or logs to MLflow; evaluate's ``main()`` does both.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dicomflow.evaluation.plots import pyplot, save_figure
from dicomflow.model.architectures import members_of

logger = logging.getLogger(__name__)

HEATMAP_COLOURS = "jet"
HEATMAP_ALPHA = 0.4  # the image must show through the map


def last_conv_layer(model) -> str:
    """Name of the layer whose output Grad-CAM explains by default: the last feature map.

    That is the last top-level layer with a 4-D (batch, height, width, channels) output that
    computes features: a convolution, a merge (``Add``, ``Concatenate``, ... closing a residual
    or inception block), an activation layer (the ReLU after such a block), or a nested model
    (a backbone such as ``keras.applications.ResNet50(include_top=False)`` used as a layer).

    Parameters
    ----------
    model : keras.Model
        A built functional or Sequential model.

    Returns
    -------
    str
        The layer's name, for :func:`grad_cam`'s ``layer_name`` or ``model.get_layer``.

    Raises
    ------
    ValueError
        No such layer: the model has no convolution at top level, or its convolutions sit
        inside a nested model whose output is not 4-D (a backbone with global pooling).

    Notes
    -----
    Pooling, normalisation, dropout and reshaping layers are passed over although their
    output may be 4-D: for the seed network this gives its second ``Conv2D`` rather than the
    max-pooling after it, the finer of the two maps (13x13 rather than 6x6 at 64x64 input).
    Layers inside a nested model are not searched: its output, as the outer model sees it, is
    the backbone's last feature map, which is what Grad-CAM wants.
    """
    import keras

    feature_kinds = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.SeparableConv2D,
                     keras.layers.Conv2DTranspose, keras.layers.Add, keras.layers.Subtract,
                     keras.layers.Multiply, keras.layers.Average, keras.layers.Maximum,
                     keras.layers.Minimum, keras.layers.Concatenate, keras.layers.Activation,
                     keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
                     keras.layers.PReLU, keras.Model)
    _model_input(model)
    for layer in reversed(model.layers):
        if isinstance(layer, feature_kinds) and len(_layer_output(model, layer).shape) == 4:
            return layer.name
    flat_nested = [f"{layer.name!r} (output {tuple(_layer_output(model, layer).shape)})"
                   for layer in model.layers if isinstance(layer, keras.Model)]
    hint = (f"; its nested model(s) {', '.join(flat_nested)} hide their feature maps: build them "
            "without global pooling (e.g. pooling=None) so that a 4-D map reaches the outer model"
            if flat_nested else "")
    raise ValueError(f"model {model.name!r} has no convolution, merge, activation or nested-model "
                     "layer with a 4-D (batch, height, width, channels) output to take Grad-CAM "
                     f"from{hint}; its layers: {', '.join(layer.name for layer in model.layers)}")


def grad_cam(model, images: np.ndarray, *, layer_name: str | None = None, class_index: int | None = None,
             batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps of ``images``, one per image, at the images' size.

    Parameters
    ----------
    model : keras.Model
        A built model with one output: ``(batch, 1)`` (a sigmoid, as the seed network has) or
        ``(batch, k)`` (a softmax over k classes).
    images : ndarray of shape (n, h, w, c)
        float32 in [0, 1], as :func:`dicomflow.config.layout.to_model_input` gives them.
    layer_name : str, default=None
        The top-level layer whose output is explained; :func:`last_conv_layer` when None.
    class_index : int, default=None
        The class to explain. A ``(batch, 1)`` output: None or 1 explains the score of class 1,
        0 explains class 0 (the negated score). A ``(batch, k)`` output: one class for every
        image, or each image's predicted class when None.
    batch_size : int, default=32
        Images per forward and backward pass.

    Returns
    -------
    ndarray of shape (n, h, w)
        float32 in [0, 1], each map divided by its own maximum (so maps compare within an image,
        not across images); a map with no positive evidence stays all zero.

    Raises
    ------
    ValueError
        ``images`` not 4-D or not the model's input size, ``layer_name`` not a top-level layer
        with a 4-D output, a model with several outputs, or ``class_index`` out of range.

    Notes
    -----
    The steps of the paper: the gradient of the class score with respect to the feature map
    A (h', w', k), averaged over h' and w' into one weight per channel; the ReLU of the
    channels' weighted sum; bilinear upsampling to (h, w) with ``tf.image.resize``. The score is
    taken before the output's sigmoid or softmax (the paper's "y^c before the softmax"): a
    confident sigmoid output rounds to exactly 1.0 in float32, its gradient to 0, and its map
    would come out empty although the image is the one most worth explaining. Per image the
    sigmoid's derivative is a positive factor, so otherwise the normalised map is the same.
    """
    import tensorflow as tf

    images = np.asarray(images)
    expected = tuple(_model_input(model).shape)
    if images.ndim != 4 or any(e not in (None, s) for e, s in zip(expected[1:], images.shape[1:])):
        raise ValueError(f"images must be (n, h, w, c) float32 in [0, 1] matching model {model.name!r}'s "
                         f"input {expected}; got shape {images.shape} (dicomflow.config.layout.to_model_input "
                         "converts stored images)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    layer_name = layer_name or last_conv_layer(model)
    explainer, n_classes = _explainer(model, layer_name)
    if class_index is not None and not (0 <= class_index < max(n_classes, 2)):
        raise ValueError(f"class_index must be in [0, {max(n_classes, 2) - 1}] for model {model.name!r} "
                         f"with {n_classes} output unit(s), or None; got {class_index!r}")

    height, width = images.shape[1:3]
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start:start + batch_size], tf.float32)
        with tf.GradientTape() as tape:
            # Watching the input records every op after it, also in a model with frozen weights.
            tape.watch(batch)
            features, logits = explainer(batch, training=False)
            logits = tf.cast(logits, tf.float32)
            if n_classes == 1:
                score = -logits[:, 0] if class_index == 0 else logits[:, 0]
            else:
                chosen = (tf.fill([tf.shape(logits)[0]], class_index) if class_index is not None
                          else tf.argmax(logits, axis=-1, output_type=tf.int32))
                score = tf.gather(logits, chosen, axis=1, batch_dims=1)
        # Images do not interact at inference, so d(sum of scores)/dA is each image's own gradient.
        gradients = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(gradients, axis=(1, 2))  # alpha_k^c: one weight per channel
        cam = tf.nn.relu(tf.einsum("bhwk,bk->bhw", features, weights))
        maps.append(tf.image.resize(cam[..., None], (height, width), method="bilinear")[..., 0].numpy())
    if not maps:
        return np.zeros((0, height, width), np.float32)
    heatmaps = np.concatenate(maps)
    peaks = heatmaps.max(axis=(1, 2), keepdims=True)
    # Bilinear interpolation stays within the map's range, so dividing by the peak gives [0, 1];
    # the clip only absorbs rounding.
    normalised = np.divide(heatmaps, peaks, out=np.zeros_like(heatmaps), where=peaks > 0)
    return np.clip(normalised, 0.0, 1.0).astype(np.float32)


def pick_examples(y_true: np.ndarray, y_score: np.ndarray, *, threshold: float,
                  per_group: int = 4) -> dict[str, np.ndarray]:
    """Indices of the images most worth explaining, per kind of outcome; binary labels only.

    Parameters
    ----------
    y_true, y_score : ndarray of shape (n,)
        Labels (0 or 1) and predicted probabilities of class 1.
    threshold : float
        The operating threshold; an image is called positive when ``y_score >= threshold``, as
        in :func:`dicomflow.evaluation.metrics.compute_metrics`.
    per_group : int, default=4
        At most this many indices per group.

    Returns
    -------
    dict of str to ndarray of int
        ``true_positives``: the highest scores among positives called positive;
        ``false_positives``: the highest scores among negatives called positive;
        ``false_negatives``: the lowest scores among positives called negative. A group is
        shorter, or empty, when the split has fewer such images; ties keep the images' order.

    Raises
    ------
    ValueError
        ``y_true`` and ``y_score`` of different lengths, labels other than 0 and 1, or a
        negative ``per_group``.

    Notes
    -----
    Binary only. For k classes, explain one class at a time, one-vs-rest: pass
    ``y_true == c`` and the probability of class c, and ``class_index=c`` to :func:`grad_cam`.
    """
    y_true, y_score = np.asarray(y_true).ravel(), np.asarray(y_score, float).ravel()
    if len(y_true) != len(y_score):
        raise ValueError(f"y_true and y_score must have the same length; got {len(y_true)} and "
                         f"{len(y_score)}")
    labels = np.unique(y_true)
    if not np.isin(labels, [0, 1]).all():
        raise ValueError(f"pick_examples is binary-only: y_true must hold 0 and 1 only; got labels "
                         f"{labels.tolist()} (for several classes pass y_true == c and class c's "
                         "probability, one class at a time)")
    if per_group < 0:
        raise ValueError(f"per_group must be an int >= 0; got {per_group!r}")
    positive, called = y_true == 1, y_score >= threshold
    # A stable sort on the negated score: highest first, ties in index order.
    by_score_down = np.argsort(-y_score, kind="stable")
    by_score_up = np.argsort(y_score, kind="stable")
    return {
        "true_positives": by_score_down[(positive & called)[by_score_down]][:per_group],
        "false_positives": by_score_down[(~positive & called)[by_score_down]][:per_group],
        "false_negatives": by_score_up[(positive & ~called)[by_score_up]][:per_group],
    }


def write_grad_cam_grid(images: np.ndarray, heatmaps: np.ndarray, groups: dict[str, np.ndarray],
                        scores: np.ndarray, path: Path) -> Path:
    """Draw each group's images with their heatmaps overlaid, one row per group, as a PNG.

    Parameters
    ----------
    images : ndarray of shape (n, h, w) or (n, h, w, c)
        Pixels in [0, 1]; several channels are shown as their mean (grey).
    heatmaps : ndarray of shape (n, h, w)
        In [0, 1], row i for image i (:func:`grad_cam`).
    groups : dict of str to ndarray of int
        Row label (underscores shown as spaces) to indices into ``images``, in drawing order,
        e.g. :func:`pick_examples`. An empty group gets a row that says "none".
    scores : ndarray of shape (n,)
        Each image's predicted probability of the positive class, shown as its title
        (``p(positive) = 0.97``, with "empty map" added where the heatmap is all zero).
    path : Path
        The PNG to write; its folder is created.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        No groups, arrays of mismatched sizes, or an index outside ``images``.

    Notes
    -----
    One colour bar on the right gives the heatmap's scale: each map is divided by its own
    peak (:func:`grad_cam`), so 1 is the image's strongest evidence, not a probability.
    """
    images, heatmaps, scores = np.asarray(images), np.asarray(heatmaps), np.asarray(scores).ravel()
    if images.ndim == 4:
        images = images.mean(axis=-1)
    if images.ndim != 3 or heatmaps.shape != images.shape or len(scores) != len(images):
        raise ValueError(f"images (n, h, w[, c]), heatmaps (n, h, w) and scores (n,) must agree; got "
                         f"images {images.shape}, heatmaps {heatmaps.shape}, scores {scores.shape}")
    if not groups:
        raise ValueError("groups must name at least one group of indices; got an empty dict")
    for name, indices in groups.items():
        if len(indices) and not (np.min(indices) >= 0 and np.max(indices) < len(images)):
            raise ValueError(f"group {name!r} holds indices outside 0..{len(images) - 1}: {list(indices)}")

    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(_grid_figure(images, heatmaps, groups, scores), path)
    return path


def _grid_figure(images: np.ndarray, heatmaps: np.ndarray, groups: dict[str, np.ndarray], scores: np.ndarray):
    """The grid of :func:`write_grad_cam_grid` as a matplotlib figure (checked arguments)."""
    plt = pyplot()
    columns = max(1, *(len(indices) for indices in groups.values()))
    # Constrained layout makes room for the colour bar beside the whole grid.
    fig, axes = plt.subplots(len(groups), columns, figsize=(2.2 * columns + 1.4, 2.3 * len(groups)),
                             squeeze=False, layout="constrained")
    for row, (name, indices) in zip(axes, groups.items()):
        # Ticks hidden rather than the axis switched off, so that the row label stays visible.
        row[0].set_ylabel(name.replace("_", " "))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        for ax in row[len(indices):]:
            ax.set_frame_on(False)
        if not len(indices):
            row[0].text(0.5, 0.5, "none", ha="center", va="center", transform=row[0].transAxes)
        for ax, index in zip(row, indices):
            ax.imshow(images[index], cmap="gray", vmin=0.0, vmax=1.0)
            ax.imshow(heatmaps[index], cmap=HEATMAP_COLOURS, alpha=HEATMAP_ALPHA, vmin=0.0, vmax=1.0)
            # An all-zero map means no positive evidence (or no gradient), not a rendering fault.
            empty = ", empty map" if not heatmaps[index].any() else ""
            ax.set_title(f"p(positive) = {scores[index]:.2f}{empty}", fontsize=9)
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap=HEATMAP_COLOURS)
    bar = fig.colorbar(scale, ax=axes, shrink=0.8, label="Grad-CAM, share of the image's peak")
    bar.set_alpha(HEATMAP_ALPHA)  # the colours as the overlay shows them
    return fig


def write_grad_cam_examples(model, images: np.ndarray, y_true: np.ndarray, y_score: np.ndarray, *,
                            threshold: float, path: Path, per_group: int = 4) -> Path:
    """Pick the examples, compute their Grad-CAM heatmaps and write the grid: the evaluate glue.

    ``images`` are the model's input for the whole split, (n, h, w, c) float32 in [0, 1];
    ``y_true``, ``y_score`` and ``threshold`` as for :func:`pick_examples`. Only the picked
    images go through :func:`grad_cam`. Returns ``path``.
    """
    groups = pick_examples(y_true, y_score, threshold=threshold, per_group=per_group)
    chosen = np.concatenate([indices for indices in groups.values()]).astype(int)
    logger.info("Grad-CAM of %s", ", ".join(f"{len(indices)} {name.replace('_', ' ')}"
                                             for name, indices in groups.items()))
    # An ensemble's map is the mean of its members' maps: each explains its share of the mean.
    heatmaps = np.mean([grad_cam(member, images[chosen]) for member in members_of(model)], axis=0)
    # The grid indexes the chosen images only: group g's entries sit after the groups before it.
    ends = np.cumsum([len(indices) for indices in groups.values()])
    positions = {name: np.arange(end - len(indices), end)
                 for (name, indices), end in zip(groups.items(), ends)}
    return write_grad_cam_grid(images[chosen], heatmaps, positions, np.asarray(y_score)[chosen], path)


def _model_input(model):
    """The model's one symbolic input; a ValueError naming the model when it has none or several."""
    try:
        inputs = model.inputs
    except AttributeError:  # a Sequential model never built raises rather than giving None
        inputs = None
    if not inputs or len(inputs) != 1:
        raise ValueError(f"Grad-CAM needs a model with one defined image input; model {model.name!r} has "
                         f"{len(inputs) if inputs else 'none'} (give it a keras.Input, or call it "
                         "once on data)")
    return inputs[0]


def _layer_output(model, layer):
    """``layer``'s output in ``model``'s graph."""
    import keras

    if isinstance(layer, keras.Model):
        # A nested model's public ``output`` is the tensor of its own inner graph, not connected
        # to the outer model's inputs; the node of its one call in the outer graph holds that one.
        nodes = layer._inbound_nodes
        if len(nodes) != 1:
            raise ValueError(f"nested model {layer.name!r} is called {len(nodes)} times in model "
                             f"{model.name!r}; Grad-CAM needs one feature map: pass layer_name of a "
                             "layer used once")
        return nodes[0].output_tensors[0]
    try:
        return layer.output
    except (AttributeError, ValueError) as error:
        raise ValueError(f"layer {layer.name!r} of model {model.name!r} has no single output (it is "
                         "shared between calls); pass layer_name of a layer used once") from error


def _explainer(model, layer_name: str):
    """A model from ``model``'s input to (feature map of ``layer_name``, pre-activation output),
    and the number of output units."""
    import keras

    if len(model.outputs) != 1 or len(model.outputs[0].shape) != 2:
        raise ValueError(f"grad_cam explains a model with one (batch, classes) output; model "
                         f"{model.name!r} has outputs {[tuple(t.shape) for t in model.outputs]}")
    try:
        layer = model.get_layer(layer_name)
    except ValueError as error:
        nested = [sub.name for sub in model.layers if isinstance(sub, keras.Model)]
        inside = (f"; layers inside nested models ({', '.join(nested)}) cannot be targeted, name the "
                  "nested model itself" if nested else "")
        raise ValueError(f"layer_name {layer_name!r} is not a top-level layer of model {model.name!r}"
                         f"{inside}; its layers: {', '.join(sub.name for sub in model.layers)}") from error
    features = _layer_output(model, layer)
    if len(features.shape) != 4:
        raise ValueError(f"layer {layer_name!r} of model {model.name!r} gives shape "
                         f"{tuple(features.shape)}; Grad-CAM needs a 4-D (batch, height, width, "
                         "channels) feature map, see last_conv_layer")
    output = model.outputs[0]
    logits = _pre_activation(model, output)
    # One input tensor, not the list: calling a model built on a list with a tensor warns.
    return keras.Model(_model_input(model), [features, logits]), int(output.shape[-1])


def _pre_activation(model, output):
    """The model's output before its final sigmoid or softmax, or the output itself."""
    import keras

    last = model.layers[-1]
    if _layer_output(model, last) is not output:
        return output  # the output comes from an op other than the last layer: explain it as is
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if activation not in ("sigmoid", "softmax"):
        return output
    if isinstance(last, keras.layers.Activation):
        return last.input
    # A copy of the output layer without its activation, fed the same input: the model is left
    # untouched (no swapping of its layer's activation, as some Grad-CAM recipes do).
    config = {**last.get_config(), "activation": "linear", "name": f"{last.name}_logits"}
    linear = type(last).from_config(config)
    logits = linear(last.input)
    linear.set_weights(last.get_weights())
    return logits
