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
from dicomflow.model.architectures import ATTENTION, infer, members_of

logger = logging.getLogger(__name__)

HEATMAP_COLOURS = "jet"
HEATMAP_ALPHA = 0.4  # the image must show through the map


def last_conv_layer(model) -> str:
    """Name of the layer whose output Grad-CAM explains by default: the last feature map.

    That is the last top-level layer with a feature-map output of the input's rank (4-D
    (batch, height, width, channels) for images, 5-D (batch, depth, height, width, channels) for
    volumes) that computes features: a convolution, a merge (``Add``, ``Concatenate``, ... closing a residual
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
        inside a nested model whose output is not 4-D (a backbone with global pooling), or
        (attention MIL) its convolutions run per slice inside ``TimeDistributed``: explain such
        a model by its attention weights (:func:`attention_weights`).

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
                     keras.layers.Conv2DTranspose, keras.layers.Conv3D, keras.layers.Conv3DTranspose,
                     keras.layers.Add, keras.layers.Subtract,
                     keras.layers.Multiply, keras.layers.Average, keras.layers.Maximum,
                     keras.layers.Minimum, keras.layers.Concatenate, keras.layers.Activation,
                     keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
                     keras.layers.PReLU, keras.Model)
    rank = _map_rank(model)
    for layer in reversed(model.layers):
        if isinstance(layer, feature_kinds) and len(_layer_output(model, layer).shape) == rank:
            return layer.name
    flat_nested = [f"{layer.name!r} (output {tuple(_layer_output(model, layer).shape)})"
                   for layer in model.layers if isinstance(layer, keras.Model)]
    hint = (f"; its nested model(s) {', '.join(flat_nested)} hide their feature maps: build them "
            f"without global pooling (e.g. pooling=None) so that a {rank}-D map reaches the outer model"
            if flat_nested else "")
    if ATTENTION in {layer.name for layer in model.layers}:
        hint = "; it is an attention-MIL network: explain it by its slices' attention weights (attention_weights)"
    raise ValueError(f"model {model.name!r} has no convolution, merge, activation or nested-model "
                     f"layer with a {_MAP_SHAPES[rank]} output to take Grad-CAM "
                     f"from{hint}; its layers: {', '.join(layer.name for layer in model.layers)}")


def grad_cam(model, images: np.ndarray, *, layer_name: str | None = None,
             class_index: int | np.ndarray | None = None, batch_size: int = 32) -> np.ndarray:
    """Grad-CAM heatmaps of ``images`` (2-D images or 3-D volumes), one per image, at its size.

    Parameters
    ----------
    model : keras.Model
        A built model with one output: ``(batch, 1)`` (a sigmoid, as the seed network has) or
        ``(batch, k)`` (a softmax over k classes).
    images : ndarray of shape (n, h, w, c) or (n, d, h, w, c)
        float32 in [0, 1], as :func:`dicomflow.config.layout.to_model_input` gives them; volumes
        for a 3-D network (``resnet3d_small``).
    layer_name : str, default=None
        The top-level layer whose output is explained; :func:`last_conv_layer` when None.
    class_index : int or ndarray of shape (n,), default=None
        The class to explain. A ``(batch, 1)`` output: None or 1 explains the score of class 1,
        0 explains class 0 (the negated score). A ``(batch, k)`` output: one class for every
        image, one per image (an array: e.g. each image's called grade, the median of an ordinal
        model's grades), or each image's most probable class when None.
    batch_size : int, default=32
        Images per forward and backward pass.

    Returns
    -------
    ndarray of shape (n, h, w) or (n, d, h, w)
        float32 in [0, 1], each map divided by its own maximum (so maps compare within an image,
        not across images); a map with no positive evidence stays all zero.

    Raises
    ------
    ValueError
        ``images`` not of the model's input rank (4-D or 5-D) and size, ``layer_name`` not a
        top-level layer with a feature map of that rank, a model with several outputs, or ``class_index`` out of range.

    Notes
    -----
    The steps of the paper: the gradient of the class score with respect to the feature map
    A (h', w', k), averaged over h' and w' into one weight per channel; the ReLU of the
    channels' weighted sum; bilinear upsampling to (h, w) with ``tf.image.resize``. The score is
    taken before the output's sigmoid or softmax (the paper's "y^c before the softmax"): a
    confident sigmoid output rounds to exactly 1.0 in float32, its gradient to 0, and its map
    would come out empty although the image is the one most worth explaining. Per image the
    sigmoid's derivative is a positive factor, so otherwise the normalised map is the same.

    A volume's map A (d', h', w', k) is weighted the same way (gradients averaged over d', h'
    and w') and upsampled trilinearly to (d, h, w): bilinearly within each map slice, then
    linearly along the slices (separable, so exactly trilinear), with ``tf.image.resize``'s
    half-pixel centres on every axis. Trilinear rather than nearest: ``resnet3d_small``'s last map
    is 8 times coarser than the volume on each axis (2^3 at 16^3), and nearest would paint 8^3
    blocks whose edges say nothing about the model; like bilinear it stays within the map's range,
    so the peak normalisation still gives [0, 1].
    """
    import tensorflow as tf

    images = np.asarray(images)
    expected = tuple(_model_input(model).shape)
    if (images.ndim != len(expected) or images.ndim not in _MAP_SHAPES
            or any(e not in (None, s) for e, s in zip(expected[1:], images.shape[1:]))):
        raise ValueError(f"images must be (n, h, w, c) or, for volumes, (n, d, h, w, c) float32 in [0, 1] "
                         f"matching model {model.name!r}'s input {expected}; got shape {images.shape} "
                         "(dicomflow.config.layout.to_model_input converts stored images)")
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
    layer_name = layer_name or last_conv_layer(model)
    explainer, n_classes = _explainer(model, layer_name)
    per_image = class_index is not None and np.ndim(class_index) == 1
    if per_image:
        class_index = np.asarray(class_index)
        if n_classes == 1 or len(class_index) != len(images) or not np.isin(class_index, range(n_classes)).all():
            raise ValueError(f"class_index as an array must hold one class index in [0, {n_classes - 1}] per "
                             f"image for model {model.name!r} with {n_classes} output unit(s); got "
                             f"{class_index.shape[0]} indices {sorted(set(class_index.tolist()))[:10]} for "
                             f"{len(images)} images")
    elif class_index is not None and not (0 <= class_index < max(n_classes, 2)):
        raise ValueError(f"class_index must be in [0, {max(n_classes, 2) - 1}] for model {model.name!r} "
                         f"with {n_classes} output unit(s), or None; got {class_index!r}")

    size, spatial = images.shape[1:-1], tuple(range(1, images.ndim - 1))
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
                if per_image:
                    chosen = tf.constant(class_index[start:start + batch_size], tf.int32)
                elif class_index is not None:
                    chosen = tf.fill([tf.shape(logits)[0]], class_index)
                else:
                    chosen = tf.argmax(logits, axis=-1, output_type=tf.int32)
                score = tf.gather(logits, chosen, axis=1, batch_dims=1)
        # Images do not interact at inference, so d(sum of scores)/dA is each image's own gradient.
        gradients = tf.cast(tape.gradient(score, features), tf.float32)
        features = tf.cast(features, tf.float32)
        weights = tf.reduce_mean(gradients, axis=spatial)  # alpha_k^c: one weight per channel
        cam = tf.nn.relu(tf.einsum("b...k,bk->b...", features, weights))
        maps.append(_upsample(cam, size))
    if not maps:
        return np.zeros((0, *size), np.float32)
    heatmaps = np.concatenate(maps)
    peaks = heatmaps.max(axis=spatial, keepdims=True)
    # Bi- and trilinear interpolation stay within the map's range, so dividing by the peak gives
    # [0, 1]; the clip only absorbs rounding.
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


def pick_class_examples(y_true: np.ndarray, called: np.ndarray, confidence: np.ndarray, *, n_classes: int,
                        per_group: int = 4) -> list[np.ndarray]:
    """Indices of the images most worth explaining for k > 2 classes, one group per true class.

    Parameters
    ----------
    y_true, called : ndarray of shape (n,)
        True and called class indices (the most probable class, or an ordinal model's median grade).
    confidence : ndarray of shape (n,)
        Each image's probability of its called class.
    n_classes : int
        k: one group per class, empty for a class without images.
    per_group : int, default=4
        At most this many indices per class.

    Returns
    -------
    list of ndarray of int
        Group c (true class index c): its most confident right calls (half of ``per_group``,
        rounded up), then its most confident wrong calls (the mistakes a reader would most
        believe), each side filling in where the other has too few. Ties keep the images' order.

    Raises
    ------
    ValueError
        Arrays of different lengths, or a negative ``per_group``.
    """
    y_true, called = np.asarray(y_true, int).ravel(), np.asarray(called, int).ravel()
    confidence = np.asarray(confidence, float).ravel()
    if not len(y_true) == len(called) == len(confidence):
        raise ValueError(f"y_true, called and confidence must have the same length; got {len(y_true)}, "
                         f"{len(called)} and {len(confidence)}")
    if per_group < 0:
        raise ValueError(f"per_group must be an int >= 0; got {per_group!r}")
    by_confidence = np.argsort(-confidence, kind="stable")
    groups = []
    for k in range(n_classes):
        right = by_confidence[((y_true == k) & (called == k))[by_confidence]]
        wrong = by_confidence[((y_true == k) & (called != k))[by_confidence]]
        n_right = min(len(right), max(-(-per_group // 2), per_group - len(wrong)))
        groups.append(np.concatenate([right[:n_right], wrong[:per_group - n_right]]).astype(int))
    return groups


def write_grad_cam_grid(images: np.ndarray, heatmaps: np.ndarray, groups: dict[str, np.ndarray],
                        scores: np.ndarray, path: Path, *, titles: list[str] | None = None) -> Path:
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
    titles : list of str, default=None
        One title per image instead of ``p(positive) = ...`` (k > 2 classes: the called class
        and its probability); "empty map" is added all the same.

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
    images, heatmaps, scores = display_images(images), np.asarray(heatmaps), np.asarray(scores).ravel()
    if images.ndim not in (3, 4) or heatmaps.shape != images.shape[:3] or len(scores) != len(images):
        raise ValueError(f"images (n, h, w[, c]), heatmaps (n, h, w) and scores (n,) must agree; got "
                         f"images {images.shape}, heatmaps {heatmaps.shape}, scores {scores.shape}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"titles must give one title per image; got {len(titles)} for {len(images)} images")
    if not groups:
        raise ValueError("groups must name at least one group of indices; got an empty dict")
    for name, indices in groups.items():
        if len(indices) and not (np.min(indices) >= 0 and np.max(indices) < len(images)):
            raise ValueError(f"group {name!r} holds indices outside 0..{len(images) - 1}: {list(indices)}")

    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(_grid_figure(images, heatmaps, groups, scores, titles), path)
    return path


def display_images(images: np.ndarray) -> np.ndarray:
    """Images as the grid draws them: colour photographs (n, h, w, 3) as they are (a lesion's colour
    is part of what a reader checks); grayscale, one channel or repeated into three, as (n, h, w)."""
    images = np.asarray(images)
    if images.ndim == 4 and (images.shape[-1] != 3 or np.ptp(images, axis=-1).max(initial=0.0) == 0):
        return images.mean(axis=-1)
    return images


def _grid_figure(images: np.ndarray, heatmaps: np.ndarray, groups: dict[str, np.ndarray], scores: np.ndarray,
                 titles: list[str] | None = None):
    """The grid of :func:`write_grad_cam_grid` as a matplotlib figure (checked arguments)."""
    if titles is None:
        titles = [f"p(positive) = {score:.2f}" for score in scores]
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
            ax.imshow(np.clip(images[index], 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
            ax.imshow(heatmaps[index], cmap=HEATMAP_COLOURS, alpha=HEATMAP_ALPHA, vmin=0.0, vmax=1.0)
            # An all-zero map means no positive evidence (or no gradient), not a rendering fault.
            empty = ", empty map" if not heatmaps[index].any() else ""
            ax.set_title(f"{titles[index]}{empty}", fontsize=9)
    scale = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap=HEATMAP_COLOURS)
    bar = fig.colorbar(scale, ax=axes, shrink=0.8, label="Grad-CAM, share of the image's peak")
    bar.set_alpha(HEATMAP_ALPHA)  # the colours as the overlay shows them
    return fig


def slice_masses(heatmaps: np.ndarray) -> np.ndarray:
    """Each slice's share of its volume's Grad-CAM mass: how much of the map lies in that slice.

    Parameters
    ----------
    heatmaps : ndarray of shape (n, d, h, w)
        Volume maps in [0, 1] (:func:`grad_cam`).

    Returns
    -------
    ndarray of shape (n, d)
        float64, each row summing to 1; a volume whose map is all zero has all zeros.
    """
    heatmaps = np.asarray(heatmaps, float)
    if heatmaps.ndim != 4:
        raise ValueError(f"heatmaps must be volume maps (n, d, h, w); got shape {heatmaps.shape}")
    per_slice = heatmaps.sum(axis=(2, 3))
    total = per_slice.sum(axis=1, keepdims=True)
    return np.divide(per_slice, total, out=np.zeros_like(per_slice), where=total > 0)


def slice_positions_mm(depth: int, spacing_mm: float) -> np.ndarray:
    """Each stored slice's position in mm along the volume's axis, from its first slice: index x
    the z spacing the volume was resampled to (``ingest.series.spacing_mm[0]``). Positions of the
    stored (resampled, cropped or padded) volume, not of the source files; they identify no one."""
    if not spacing_mm > 0:
        raise ValueError(f"spacing_mm must be the volume's positive z spacing in mm "
                         f"(ingest.series.spacing_mm[0]); got {spacing_mm!r}")
    return np.arange(depth) * float(spacing_mm)


def write_slice_montage(volumes: np.ndarray, slice_scores: np.ndarray, groups: dict[str, np.ndarray],
                        scores: np.ndarray, path: Path, *, spacing_mm: float, heatmaps: np.ndarray | None = None,
                        slices: int = 4, titles: list[str] | None = None) -> Path:
    """Draw each picked volume's most telling slices as one PNG: one row per volume, its
    ``slices`` highest-scoring slices (highest first), each titled with its position in mm.

    The volume counterpart of :func:`write_grad_cam_grid`, with its conventions: rows grouped as
    ``groups`` gives them (an empty group gets a row that says "none"), each volume labelled with
    its group and ``p(positive) = ...`` (or its ``titles`` entry), the same colours and overlay
    and one colour bar.

    Parameters
    ----------
    volumes : ndarray of shape (n, d, h, w) or (n, d, h, w, c)
        Voxels in [0, 1]; several channels are shown as their mean.
    slice_scores : ndarray of shape (n, d)
        What ranks the slices: each slice's share of the Grad-CAM mass (:func:`slice_masses`,
        titled as a percentage) or, without ``heatmaps``, its attention weight
        (:func:`attention_weights`, titled ``w = 0.62``).
    groups : dict of str to ndarray of int
        Group label to indices into ``volumes``, e.g. :func:`pick_examples`.
    scores : ndarray of shape (n,)
        Each volume's predicted probability of the positive class.
    path : Path
        The PNG to write; its folder is created.
    spacing_mm : float
        The volumes' z spacing (:func:`slice_positions_mm`).
    heatmaps : ndarray of shape (n, d, h, w), default=None
        Grad-CAM maps to overlay; None for attention weights (a weight is per slice, no map).
    slices : int, default=4
        Slices per volume (fewer when a volume has fewer).
    titles : list of str, default=None
        One label per volume instead of ``p(positive) = ...``.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ValueError
        No groups, arrays of mismatched sizes, an index outside ``volumes``, ``slices`` below 1
        or a non-positive ``spacing_mm``.
    """
    volumes = np.asarray(volumes)
    volumes = volumes.mean(axis=-1) if volumes.ndim == 5 else volumes
    slice_scores, scores = np.asarray(slice_scores, float), np.asarray(scores, float).ravel()
    if (volumes.ndim != 4 or slice_scores.shape != volumes.shape[:2] or len(scores) != len(volumes)
            or (heatmaps is not None and np.shape(heatmaps) != volumes.shape)):
        raise ValueError(f"volumes (n, d, h, w[, c]), slice_scores (n, d), scores (n,) and heatmaps (n, d, h, w) "
                         f"must agree; got volumes {volumes.shape}, slice_scores {slice_scores.shape}, scores "
                         f"{scores.shape}, heatmaps {None if heatmaps is None else np.shape(heatmaps)}")
    if titles is not None and len(titles) != len(volumes):
        raise ValueError(f"titles must give one title per volume; got {len(titles)} for {len(volumes)} volumes")
    if slices < 1:
        raise ValueError(f"slices must be an int >= 1; got {slices!r}")
    if not groups:
        raise ValueError("groups must name at least one group of indices; got an empty dict")
    for name, indices in groups.items():
        if len(indices) and not (np.min(indices) >= 0 and np.max(indices) < len(volumes)):
            raise ValueError(f"group {name!r} holds indices outside 0..{len(volumes) - 1}: {list(indices)}")
    positions = slice_positions_mm(volumes.shape[1], spacing_mm)
    titles = titles or [f"p(positive) = {score:.2f}" for score in scores]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(_montage_figure(volumes, slice_scores, groups, titles, positions, heatmaps,
                                min(slices, volumes.shape[1])), path)
    return path


def _montage_figure(volumes, slice_scores, groups, titles, positions, heatmaps, slices: int):
    """The montage of :func:`write_slice_montage` as a matplotlib figure (checked arguments)."""
    plt = pyplot()
    rows = [(name, index) for name, indices in groups.items() for index in (indices if len(indices) else [None])]
    fig, axes = plt.subplots(len(rows), slices, figsize=(2.0 * slices + 1.6, 2.2 * len(rows)), squeeze=False,
                             layout="constrained")
    for row, (name, index) in zip(axes, rows):
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        if index is None:
            row[0].set_ylabel(name.replace("_", " "))
            row[0].text(0.5, 0.5, "none", ha="center", va="center", transform=row[0].transAxes)
            for ax in row:
                ax.set_frame_on(False)
            continue
        empty = ", empty map" if heatmaps is not None and not heatmaps[index].any() else ""
        row[0].set_ylabel(f"{name.replace('_', ' ')}\n{titles[index]}{empty}", fontsize=9)
        # Highest first; a stable sort keeps ties (an empty map) in slice order.
        for ax, z in zip(row, np.argsort(-slice_scores[index], kind="stable")[:slices]):
            ax.imshow(np.clip(volumes[index, z], 0.0, 1.0), cmap="gray", vmin=0.0, vmax=1.0)
            if heatmaps is None:
                share = f"w = {slice_scores[index, z]:.2f}"
            else:
                ax.imshow(heatmaps[index, z], cmap=HEATMAP_COLOURS, alpha=HEATMAP_ALPHA, vmin=0.0, vmax=1.0)
                share = f"{100 * slice_scores[index, z]:.0f}% of map"
            ax.set_title(f"z = {positions[z]:.1f} mm, {share}", fontsize=8)
    if heatmaps is not None:
        scale = plt.cm.ScalarMappable(norm=plt.Normalize(0.0, 1.0), cmap=HEATMAP_COLOURS)
        bar = fig.colorbar(scale, ax=axes, shrink=0.8, label="Grad-CAM, share of the volume's peak")
        bar.set_alpha(HEATMAP_ALPHA)
    else:
        fig.suptitle("slices with the highest attention weights (w: the slice's weight, summing to 1)", fontsize=9)
    return fig


def is_attention_model(model) -> bool:
    """Whether ``model`` (or every member of an ensemble) is an attention-MIL network, explained
    by its slices' attention weights rather than by Grad-CAM."""
    return all(ATTENTION in {layer.name for layer in member.layers} for member in members_of(model))


def _explain(model, images: np.ndarray, *, class_index: np.ndarray | None = None
             ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The picked images' explanation, an ensemble's averaged over its members: (heatmaps, None)
    for images, (heatmaps, slice shares) for volumes, (None, attention weights) for attention MIL."""
    members = members_of(model)
    if images.ndim == 5 and is_attention_model(model):
        # The weights do not depend on the class: they are what the bag's embedding is made of.
        return None, np.mean([attention_weights(member, images) for member in members], axis=0)
    if not len(images):
        heatmaps = np.zeros(images.shape[:-1], np.float32)
    else:
        heatmaps = np.mean([grad_cam(member, images, class_index=class_index) for member in members], axis=0)
    return heatmaps, (slice_masses(heatmaps) if images.ndim == 5 else None)


def _draw(images, groups, scores, path: Path, *, spacing_mm: float | None, slices: int,
          heatmaps, slice_scores, titles: list[str] | None = None) -> Path:
    """The grid of images, or the montage of volumes' slices, of the picked examples."""
    if images.ndim == 5:
        if spacing_mm is None:
            raise ValueError("spacing_mm (ingest.series.spacing_mm[0]) is needed to place a volume's slices in mm")
        return write_slice_montage(images, slice_scores, groups, scores, path, spacing_mm=spacing_mm,
                                   heatmaps=heatmaps, slices=slices, titles=titles)
    return write_grad_cam_grid(images, heatmaps, groups, scores, path, titles=titles)


def write_grad_cam_examples(model, images: np.ndarray, y_true: np.ndarray, y_score: np.ndarray, *,
                            threshold: float, path: Path, per_group: int = 4, spacing_mm: float | None = None,
                            slices: int = 4) -> Path:
    """Pick the examples, compute their Grad-CAM heatmaps and write the grid: the evaluate glue.

    ``images`` are the model's input for the whole split, (n, h, w, c) float32 in [0, 1];
    ``y_true``, ``y_score`` and ``threshold`` as for :func:`pick_examples`. Only the picked
    images go through :func:`grad_cam`. Returns ``path``.

    Volumes (n, d, h, w, c) are drawn as a montage (:func:`write_slice_montage`): each picked
    volume's ``slices`` slices with the most Grad-CAM mass, or, for an attention-MIL network,
    with the highest attention weights; ``spacing_mm`` is their z spacing.
    """
    images = np.asarray(images)
    groups = pick_examples(y_true, y_score, threshold=threshold, per_group=per_group)
    chosen = np.concatenate([indices for indices in groups.values()]).astype(int)
    logger.info("Grad-CAM of %s", ", ".join(f"{len(indices)} {name.replace('_', ' ')}"
                                             for name, indices in groups.items()))
    # An ensemble's map is the mean of its members' maps: each explains its share of the mean.
    heatmaps, slice_scores = _explain(model, images[chosen])
    # The grid indexes the chosen images only: group g's entries sit after the groups before it.
    ends = np.cumsum([len(indices) for indices in groups.values()])
    positions = {name: np.arange(end - len(indices), end)
                 for (name, indices), end in zip(groups.items(), ends)}
    return _draw(images[chosen], positions, np.asarray(y_score)[chosen], path, spacing_mm=spacing_mm,
                 slices=slices, heatmaps=heatmaps, slice_scores=slice_scores)


def write_class_grad_cam_examples(model, images: np.ndarray, y_true: np.ndarray, y_score: np.ndarray, *,
                                  called: np.ndarray, classes: list[int], path: Path, per_group: int = 4,
                                  noun: str = "class", spacing_mm: float | None = None, slices: int = 4) -> Path:
    """Grad-CAM for k > 2 classes: per true class, a row of images (:func:`pick_class_examples`),
    each with the heatmap of its called class, titled with that class and its probability.

    Parameters
    ----------
    model : keras.Model
        The model as evaluated (an ensemble's map is the mean of its members').
    images : ndarray of shape (n, h, w, c) or (n, d, h, w, c)
        The model's input for the whole split; volumes are drawn as :func:`write_grad_cam_examples`
        draws them.
    y_true : ndarray of shape (n,)
        True class indices.
    y_score : ndarray of shape (n, k)
        Class (grade) probabilities.
    called : ndarray of shape (n,)
        The class index each image is called: the most probable class, or an ordinal model's
        median grade. The heatmap explains that class's output.
    classes : list of int
        The label of each class index, as the titles and row labels name them.
    path : Path
        The PNG to write.
    per_group : int, default=4
        Images per class row.
    noun : str, default="class"
        "grade" for an ordinal task.
    spacing_mm : float, default=None
        Volumes: their z spacing in mm.
    slices : int, default=4
        Volumes: slices shown per volume.

    Returns
    -------
    Path
        ``path``.
    """
    images = np.asarray(images)
    y_score, called = np.asarray(y_score, float), np.asarray(called, int).ravel()
    confidence = y_score[np.arange(len(called)), called]
    picked = pick_class_examples(y_true, called, confidence, n_classes=len(classes), per_group=per_group)
    chosen = np.concatenate(picked).astype(int)
    logger.info("Grad-CAM of %d test images, up to %d per %s, each for its called %s", len(chosen), per_group,
                noun, noun)
    heatmaps, slice_scores = _explain(model, images[chosen], class_index=called[chosen])
    ends = np.cumsum([len(indices) for indices in picked])
    positions = {f"actual {noun} {classes[k]}": np.arange(end - len(indices), end)
                 for k, (indices, end) in enumerate(zip(picked, ends))}
    titles = [f"called {classes[called[i]]}, p = {confidence[i]:.2f}" for i in chosen]
    return _draw(images[chosen], positions, confidence[chosen], path, spacing_mm=spacing_mm, slices=slices,
                 heatmaps=heatmaps, slice_scores=slice_scores, titles=titles)


# The feature map Grad-CAM takes, by the rank of the model's input (images, volumes).
_MAP_SHAPES = {4: "4-D (batch, height, width, channels)", 5: "5-D (batch, depth, height, width, channels)"}


def _map_rank(model) -> int:
    """The rank of the feature map Grad-CAM takes from ``model``: its input's (4 or 5)."""
    rank = len(_model_input(model).shape)
    if rank not in _MAP_SHAPES:
        raise ValueError(f"Grad-CAM explains images (batch, height, width, channels) or volumes (batch, depth, "
                         f"height, width, channels); model {model.name!r} takes {tuple(_model_input(model).shape)}")
    return rank


def _upsample(cam, size: tuple[int, ...]) -> np.ndarray:
    """Maps (b, h', w') or (b, d', h', w') resized to ``size``, (h, w) or (d, h, w): bilinear, or
    trilinear as bilinear within each map slice then linear along the slices (separable)."""
    import tensorflow as tf

    if len(size) == 2:
        return tf.image.resize(cam[..., None], size, method="bilinear")[..., 0].numpy()
    batch, depth = tf.shape(cam)[0], tf.shape(cam)[1]
    depth_out, height, width = size
    planes = tf.image.resize(tf.reshape(cam, (-1, *cam.shape[2:], 1)), (height, width), method="bilinear")
    # Along z: each (depth, height * width) sheet resized to depth_out rows; the second axis keeps
    # its size, and half-pixel centres at scale 1 fall on the samples, so it is left as it is.
    sheets = tf.reshape(planes, (batch, depth, height * width, 1))
    volumes = tf.image.resize(sheets, (depth_out, height * width), method="bilinear")
    return tf.reshape(volumes, (batch, depth_out, height, width)).numpy()


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
    features, rank = _layer_output(model, layer), _map_rank(model)
    if len(features.shape) != rank:
        raise ValueError(f"layer {layer_name!r} of model {model.name!r} gives shape "
                         f"{tuple(features.shape)}; Grad-CAM of its input needs a {_MAP_SHAPES[rank]} "
                         "feature map, see last_conv_layer")
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


def attention_weights(model, bags: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Each slice's attention weight in an attention-MIL ``model``
    (:func:`dicomflow.model.architectures.build_attention_mil`), in inference mode: which slices
    the study's prediction rests on.

    Parameters
    ----------
    model : keras.Model
        An attention-MIL network (or one loaded from its ``.keras`` file).
    bags : ndarray of shape (n, slices, height, width, channels)
        float32 in [0, 1], padding slices all 0.
    batch_size : int, default=32
        Bags per forward pass.

    Returns
    -------
    ndarray of shape (n, slices)
        float64; each row sums to 1 over the bag's real slices, and padding slices have 0.

    Raises
    ------
    ValueError
        ``model`` has no ``attention`` layer.
    """
    import keras

    if ATTENTION not in {layer.name for layer in model.layers}:
        raise ValueError(f"model {model.name!r} has no {ATTENTION!r} layer: attention weights need an "
                         "attention_mil network (dicomflow.model.architectures.build_attention_mil)")
    probe = keras.Model(model.inputs[0], model.get_layer(ATTENTION).output)
    return infer(probe, np.asarray(bags, np.float32), batch_size=batch_size)[..., 0]
