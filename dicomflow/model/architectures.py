"""The networks: how they are built, calibrated and combined, and what they take as input.

Every network is an encoder ending in a layer named ``features`` (:data:`FEATURES`,
:func:`encoder_of`), then the same head: ``logits`` (a Dense layer without activation), then
``calibration`` (a ``Rescaling`` by 1 / temperature, identity until :func:`set_temperature`), then
``probability`` (sigmoid for two classes, softmax for more). The calibration is part of the saved
``.keras`` file, so evaluate, Grad-CAM, the registered pyfunc and a served model all see the same
calibrated probability, and it is a built-in layer, so the file loads without custom objects.

An ordinal network (``train.task: ordinal``, k grades in the order of ``ingest.classes``) has the
continuation-ratio head of CORN (Shi, Cao and Raschka, 2023): k - 1 ``logits``, l_j = logit P(grade >
j | grade >= j), calibrated by the same ``calibration`` layer, then fixed built-in layers
(:func:`_ordinal_link`) that give the grade log-probabilities ``grade_log_probability``,
log P(grade = j) = sum_{i<j} log sigmoid(l_i) + log sigmoid(-l_j) (the last grade: the sum alone),
and ``probability``, their softmax. Why this form: each probability is a product of conditional
probabilities, so it is non-negative and P(grade >= j) = prod_{i<j} sigmoid(l_i) falls with j for
any logits, without the ordering constraints cumulative-link (CORAL) heads impose on their biases;
the log-probabilities come out of log-sigmoids, so the maximum-likelihood loss (categorical
cross-entropy from those log-probabilities: CORN's conditional binary losses summed) is stable; and
every layer is a Keras built-in, so the file loads in safe mode. The softmax renormalises what
float rounding leaves (the log-probabilities already sum to 1 exactly in arithmetic).

An ensemble (:func:`ensemble_of`) is one Keras model that averages its members' calibrated
probabilities; :func:`members_of` gives them back.

Used by train, evaluate and explain; imports Keras inside functions (TensorFlow costs seconds).
"""

from __future__ import annotations

import numpy as np

from dicomflow.config.layout import to_model_input  # noqa: F401  the model's input, defined with the images' layout
from dicomflow.config.params import VOLUME_ARCHITECTURES

LOGITS, CALIBRATION, PROBABILITY = "logits", "calibration", "probability"
# The ordinal head's fixed linear map from the conditional log-probabilities to the grades' (see
# _ordinal_link); not trained, and never unfrozen with the encoder (dicomflow.model.transfer).
GRADE_LOG_PROBABILITY = "grade_log_probability"
BINARY, MULTICLASS, ORDINAL = "binary", "multiclass", "ordinal"
# The encoder's last layer: everything up to it is what pretraining learns and transfer carries
# over; the head after it is rebuilt when the classes differ. Every layer has a fixed name, so a
# network's weights can be matched by layer name in another process (Keras numbers unnamed layers
# by how many came before in the process).
FEATURES = "features"


def build_seed_cnn(input_shape: tuple[int, int, int], n_classes: int = 2, *, ordinal: bool = False):
    """The seed's network: two conv/pool blocks, a dense layer, a sigmoid output (a softmax over
    the classes when there are more than two; with ``ordinal`` the continuation-ratio head). The
    seed's sigmoid Dense is split into ``logits`` and ``probability`` with the identity
    ``calibration`` between: the same function."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")

    # Feature extractor
    x = layers.Conv2D(32, (3, 3), activation="relu", name="conv1")(inputs)
    x = layers.MaxPooling2D((2, 2), name="pool1")(x)
    x = layers.Conv2D(64, (3, 3), activation="relu", name="conv2")(x)
    x = layers.MaxPooling2D((2, 2), name="pool2")(x)

    # Classifier head
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(64, activation="relu", name=FEATURES)(x)
    return keras.Model(inputs, _head(x, n_classes, ordinal=ordinal), name="seed_cnn")


def build_resnet_small(input_shape: tuple[int, int, int], n_classes: int = 2, *,
                       widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 2, groups: int | None = None,
                       ordinal: bool = False):
    """A small residual network for 28-128 pixel images, trained from scratch.

    The CIFAR layout of He et al. (2016): a 3x3 stem, then stages of basic residual blocks
    (two 3x3 convolutions with batch normalisation), each stage after the first halving the
    resolution and doubling the width, then global average pooling. About 0.17 M weights with
    the defaults: small enough for 2 CPU cores and a few hundred images, where ImageNet-sized
    networks (``keras.applications``) overfit and there are no pretrained weights to start from.
    Its batch-normalisation statistics are re-estimated by the train stage after every epoch
    (``dicomflow.model.training.BatchNormStatistics``).

    With ``groups`` the network normalises by group normalisation over ``groups`` channel groups
    (Wu and He, 2018) instead (:func:`build_resnet_small_gn`). With ``ordinal`` (and three or more
    classes) its head is the continuation-ratio head of the module docstring.
    """
    import keras

    inputs = keras.Input(shape=input_shape, name="image")
    features = _residual_encoder(inputs, widths=widths, blocks_per_stage=blocks_per_stage, groups=groups)
    return keras.Model(inputs, _head(features, n_classes, ordinal=ordinal),
                       name="resnet_small" if groups is None else "resnet_small_gn")


def _residual_encoder(inputs, *, widths: tuple[int, ...], blocks_per_stage: int, groups: int | None,
                      stem_strides: int = 1):
    """The residual encoder of :func:`build_resnet_small` (2-D images) and
    :func:`build_resnet3d_small` (volumes), from ``inputs`` to the ``features`` layer: a stem,
    stages of basic blocks (each stage after the first halving the resolution and doubling the
    width), global average pooling. Convolutions and pooling are 2-D or 3-D as ``inputs`` has
    2 or 3 spatial axes; the layers' names are the same either way."""
    from keras import layers

    convolution, pooling = ((layers.Conv2D, layers.GlobalAveragePooling2D) if len(inputs.shape) == 4
                            else (layers.Conv3D, layers.GlobalAveragePooling3D))

    # Synchronised: under a multi-worker or mirrored strategy the batch statistics are those of
    # the global batch, so several workers train what one process trains (local statistics of
    # half a batch did not: the two-worker test drifted by 7e-3 in loss).
    def conv_bn(x, filters: int, name: str, strides: int = 1, size: int = 3, initializer: str = "he_normal"):
        x = convolution(filters, size, strides=strides, padding="same", use_bias=False,
                        kernel_initializer=initializer, name=f"{name}_conv")(x)
        if groups is not None:  # per image: no statistics across the batch, none stored
            return layers.GroupNormalization(min(groups, filters), name=f"{name}_gn")(x)
        return layers.BatchNormalization(synchronized=True, name=f"{name}_bn")(x)

    def residual_block(x, filters: int, strides: int, name: str):
        shortcut = x
        if strides != 1 or x.shape[-1] != filters:  # project the shortcut to the new shape
            shortcut = conv_bn(x, filters, f"{name}_shortcut", strides, size=1, initializer="glorot_uniform")
        y = layers.ReLU(name=f"{name}_relu1")(conv_bn(x, filters, f"{name}_1", strides))
        y = conv_bn(y, filters, f"{name}_2")
        return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))

    x = layers.ReLU(name="stem_relu")(conv_bn(inputs, widths[0], "stem", stem_strides))
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            x = residual_block(x, filters, strides=2 if stage and not block else 1,
                               name=f"stage{stage + 1}_block{block + 1}")
    return pooling(name=FEATURES)(x)


def build_resnet_small_gn(input_shape: tuple[int, int, int], n_classes: int = 2, *, groups: int = 8,
                          ordinal: bool = False):
    """:func:`build_resnet_small` with group normalisation (``groups`` channel groups) in place of
    batch normalisation, for differentially private training (``train.privacy``).

    Why: batch normalisation mixes the images of a batch, so one image's gradient depends on the
    others' and cannot be clipped alone, and its moving statistics are a release of the training
    images that no accountant counts; Opacus refuses it and swaps in group normalisation too.
    Group normalisation computes its statistics per image and stores none. The convolutions and
    the head keep their names and shapes (``stem_conv``, ``stage1_block1_1_conv``, ...); the
    normalisation layers are named ``*_gn`` (a scale and an offset, no moving statistics).
    """
    return build_resnet_small(input_shape, n_classes, groups=groups, ordinal=ordinal)


def build_resnet3d_small(input_shape: tuple[int, int, int, int], n_classes: int = 2, *,
                         widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 1, stem_strides: int = 2,
                         groups: int | None = None, ordinal: bool = False):
    """A small 3-D residual network for volumes (depth, height, width, channels) = (z, y, x, c),
    trained from scratch: :func:`build_resnet_small` with 3x3x3 convolutions.

    The same layout, layer names, synchronised batch normalisation (re-estimated after every
    epoch by the train stage), ``features`` layer (global average pooling over the volume) and
    head, so binary, multi-class and ordinal tasks, calibration, ensembles and transfer work as
    they do in 2-D. About 0.22 M weights with the defaults. Two choices differ, both for the
    cost on CPU: one block per stage (a 3x3x3 convolution has three times the weights of a 3x3
    one), and a stem of stride 2 (``stem_strides``): at 32x64x64 a stage at full resolution
    costs eight times the same stage after it, and most of the network's time; a stride-2
    3x3x3 stem still reads every voxel, so a lesion of one 5 mm voxel is not skipped.

    Parameters
    ----------
    input_shape : tuple of int
        (depth, height, width, channels), e.g. (32, 64, 64, 1) for ``ingest.volume_size``
        [32, 64, 64]; each spatial side at least 8 (three halvings).
    n_classes : int, default=2
        Two: one sigmoid output; more: a softmax, or the continuation-ratio head with ``ordinal``.
    widths, blocks_per_stage, groups
        As for :func:`build_resnet_small` (``groups``: group normalisation instead of batch
        normalisation, as :func:`build_resnet_small_gn`).
    stem_strides : int, default=2
        The stem convolution's stride; 1 keeps the input's resolution in the first stage.
    ordinal : bool, default=False
        The continuation-ratio head of the module docstring (three or more classes).

    Returns
    -------
    keras.Model
        Input ``image`` (batch, depth, height, width, channels), output ``probability``.

    Raises
    ------
    ValueError
        ``input_shape`` not four values (a 2-D image's shape: use ``resnet_small``).
    """
    import keras

    if len(input_shape) != 4:
        raise ValueError(f"resnet3d_small takes volumes (depth, height, width, channels); got input_shape "
                         f"{tuple(input_shape)}: use resnet_small for 2-D images")
    inputs = keras.Input(shape=input_shape, name="image")
    features = _residual_encoder(inputs, widths=widths, blocks_per_stage=blocks_per_stage, groups=groups,
                                 stem_strides=stem_strides)
    return keras.Model(inputs, _head(features, n_classes, ordinal=ordinal),
                       name="resnet3d_small" if groups is None else "resnet3d_small_gn")


# ---- attention-based multiple-instance learning ----------------------------------------------
# Ilse, Tomczak and Welling, "Attention-based deep multiple instance learning", ICML 2018, gated
# attention (their section 2.4). A study is a bag of slices (or views) with one label: a 2-D
# encoder (one of ARCHITECTURES up to ``features``) embeds every slice, h_k; gated attention
# weighs them, a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))), and the study's embedding
# sum_k a_k h_k goes through the same head as every other network, so calibration, ensembles,
# transfer and the training loop treat it like any other. Bags are padded: the model takes
# (batch, slices, height, width, channels), the shape of a volume, and a slice whose pixels are
# all exactly 0 is padding (weight exactly 0, no effect on the output; windowed CT air is about
# 0.23, never 0). The pooling is a weighted sum: the output does not depend on the slices' order.
# Every layer is a Keras built-in, so the saved .keras file loads in safe mode.

ATTENTION = "attention"          # (batch, slices, 1): each slice's weight, summing to 1 per bag
SLICE_ENCODER = "slice_encoder"  # the 2-D encoder, applied to every slice
SLICE_EMBEDDINGS = "slice_embeddings"
# Added to a padding slice's attention score: exp(-1e9 - score) is exactly 0 in float32.
PADDING_SCORE = -1e9


def build_attention_mil(input_shape: tuple[int, int, int, int], n_classes: int = 2, *,
                        encoder: str = "resnet_small_gn", attention_units: int = 64, ordinal: bool = False):
    """A gated-attention MIL network over bags of slices.

    Parameters
    ----------
    input_shape : tuple of int
        (slices, height, width, channels): a bag of at most ``slices`` slices, padded with
        all-zero slices (a volume of ``ingest.volume_size`` is such a bag).
    n_classes : int, default=2
        As for :func:`build_resnet_small`.
    encoder : str, default="resnet_small_gn"
        The 2-D architecture whose layers up to ``features`` embed each slice: one without batch
        normalisation (``resnet_small_gn``, ``seed_cnn``). Batch normalisation inside the
        per-slice encoder would pool its statistics over the padding slices too, and the train
        stage cannot re-estimate them (``BatchNormStatistics`` probes the layers of the network
        itself, not those of a nested encoder).
    attention_units : int, default=64
        The width L of the attention's V and U.
    ordinal : bool, default=False
        The continuation-ratio head (three or more grades).

    Returns
    -------
    keras.Model
        Input ``image`` (batch, slices, height, width, channels), output ``probability``; the
        layer ``attention`` gives each slice's weight (:func:`dicomflow.evaluation.explain.attention_weights`).

    Raises
    ------
    ValueError
        ``input_shape`` not four values, ``encoder`` not a 2-D architecture or one with batch
        normalisation, or ``attention_units`` below 1.
    """
    import keras
    from keras import layers

    if len(input_shape) != 4:
        raise ValueError(f"attention_mil takes bags of slices (slices, height, width, channels); got "
                         f"input_shape {tuple(input_shape)}")
    if encoder not in ARCHITECTURES or encoder in VOLUME_ARCHITECTURES:
        two_d = [name for name in ARCHITECTURES if name not in VOLUME_ARCHITECTURES]
        raise ValueError(f"encoder must be one of the 2-D architectures {', '.join(two_d)}; got {encoder!r}")
    if attention_units < 1:
        raise ValueError(f"attention_units must be an int >= 1; got {attention_units!r}")
    slice_shape = tuple(input_shape[1:])
    # The 2-D network is built only for its encoder; its head is dropped.
    slice_network = ARCHITECTURES[encoder](slice_shape, 2)
    if any(isinstance(layer, layers.BatchNormalization) for layer in slice_network.layers):
        raise ValueError(f"encoder {encoder!r} uses batch normalisation, whose statistics the train stage cannot "
                         "re-estimate inside the per-slice encoder (and would pool over padding slices); use "
                         "resnet_small_gn or seed_cnn")
    slice_encoder = keras.Model(slice_network.inputs, slice_network.get_layer(FEATURES).output,
                                name=SLICE_ENCODER)

    bags = keras.Input(shape=input_shape, name="image")
    embeddings = layers.TimeDistributed(slice_encoder, name=SLICE_EMBEDDINGS)(bags)  # (batch, slices, K)

    # Gated attention (Ilse et al., eq. 9): a score per slice.
    content = layers.Dense(attention_units, activation="tanh", name="attention_v")(embeddings)
    gate = layers.Dense(attention_units, activation="sigmoid", name="attention_u")(embeddings)
    scores = layers.Dense(1, name="attention_w")(layers.Multiply(name="attention_gated")([content, gate]))

    # Padding: a slice whose largest pixel is 0. Its maximum, scaled up and clipped at 1, is 1 for
    # any real slice (pixels are multiples of 1/255 or float16 steps, far above 1e-6) and 0 for
    # padding; the channels' maxima are summed by a frozen Dense of ones.
    peaks = layers.TimeDistributed(layers.GlobalMaxPooling2D(), name="slice_peak")(bags)  # (batch, slices, c)
    channel_sum = layers.Dense(1, use_bias=False, trainable=False, name="slice_peak_sum")
    present = layers.ReLU(max_value=1.0, name="slice_present")(
        layers.Rescaling(1e6, name="slice_peak_scaled")(channel_sum(peaks)))
    penalty = layers.Rescaling(-PADDING_SCORE, offset=PADDING_SCORE, name="padding_penalty")(present)
    weights = layers.Softmax(axis=1, name=ATTENTION)(layers.Add(name="attention_masked")([scores, penalty]))

    pooled = layers.Dot(axes=1, name="attention_pooled")([weights, embeddings])  # (batch, 1, K)
    features = layers.Flatten(name=FEATURES)(pooled)
    channel_sum.set_weights([np.ones((input_shape[-1], 1), np.float32)])
    return keras.Model(bags, _head(features, n_classes, ordinal=ordinal), name="attention_mil")


def encoder_of(model):
    """The network's encoder: a model from its input to its ``features`` layer, sharing weights."""
    import keras

    return keras.Model(model.inputs, model.get_layer(FEATURES).output, name=f"{model.name}_encoder")


def _head(features, n_classes: int, *, ordinal: bool = False):
    """logits -> calibration (identity) -> probability; ordinal: the link between the last two."""
    from keras import layers

    if ordinal and n_classes < 3:
        raise ValueError(f"an ordinal head needs three or more grades; got n_classes={n_classes}")
    width = 1 if n_classes == 2 else n_classes - 1 if ordinal else n_classes
    logits = layers.Dense(width, name=LOGITS)(features)
    calibrated = layers.Rescaling(1.0, name=CALIBRATION)(logits)
    if ordinal:
        return layers.Activation("softmax", name=PROBABILITY)(_ordinal_link(calibrated, n_classes))
    return layers.Activation("sigmoid" if n_classes == 2 else "softmax", name=PROBABILITY)(calibrated)


def ordinal_link_matrix(n_grades: int) -> np.ndarray:
    """The fixed (2 (k - 1), k) matrix taking [log sigmoid(l), log sigmoid(-l)] to the k grades'
    log-probabilities: log P(grade = j) = sum_{i<j} log sigmoid(l_i) + log sigmoid(-l_j), and for
    the last grade the sum alone (continuation ratios: the grade passes j with probability
    sigmoid(l_j) once it has reached j)."""
    steps = n_grades - 1
    matrix = np.zeros((2 * steps, n_grades), np.float32)
    for grade in range(n_grades):
        matrix[:grade, grade] = 1.0  # passed every earlier step
        if grade < steps:
            matrix[steps + grade, grade] = 1.0  # and stopped at this one
    return matrix


def _ordinal_link(calibrated, n_grades: int):
    """The conditional logits (n, k - 1) -> the grade log-probabilities (n, k), in built-in layers
    (a frozen Dense holds :func:`ordinal_link_matrix`), so the saved file loads in safe mode."""
    from keras import layers

    passed = layers.Activation("log_sigmoid", name="log_passed")(calibrated)
    stopped = layers.Activation("log_sigmoid", name="log_stopped")(layers.Rescaling(-1.0, name="negated")(calibrated))
    link = layers.Dense(n_grades, use_bias=False, trainable=False, name=GRADE_LOG_PROBABILITY)
    log_probabilities = link(layers.Concatenate(name="log_conditional")([passed, stopped]))
    link.set_weights([ordinal_link_matrix(n_grades)])
    return log_probabilities


def is_ordinal(model) -> bool:
    """Whether ``model`` (one network, or an ensemble of them) has the ordinal head."""
    return all(GRADE_LOG_PROBABILITY in {layer.name for layer in member.layers} for member in members_of(model))


def task_of(model) -> str:
    """``binary`` (one sigmoid output), ``ordinal`` (the continuation-ratio head) or ``multiclass``."""
    if model.output_shape[-1] == 1:
        return BINARY
    return ORDINAL if is_ordinal(model) else MULTICLASS


def training_view(model):
    """What a train step calls and the per-image loss of its output: (network, loss(labels, output)).

    Binary and multi-class: the model itself and the cross-entropy of its probabilities (as Keras
    computes it, clipped). Ordinal: a model sharing the weights up to ``grade_log_probability``
    and the categorical cross-entropy from those log-probabilities (``from_logits``: a
    log-sum-exp, no log of a probability that rounded to 0), which is the continuation-ratio
    likelihood, CORN's loss; the probabilities are its softmax.
    """
    import functools

    import keras

    if is_ordinal(model):
        return (keras.Model(model.inputs, model.get_layer(GRADE_LOG_PROBABILITY).output),
                functools.partial(keras.losses.sparse_categorical_crossentropy, from_logits=True))
    return model, (keras.losses.binary_crossentropy if model.output_shape[-1] == 1
                   else keras.losses.sparse_categorical_crossentropy)


ARCHITECTURES = {"seed_cnn": build_seed_cnn, "resnet_small": build_resnet_small,
                 "resnet_small_gn": build_resnet_small_gn, "resnet3d_small": build_resnet3d_small,
                 "attention_mil": build_attention_mil}
# The architectures whose input is a volume or a bag of slices (batch, depth, height, width,
# channels) rather than an image (batch, height, width, channels): VOLUME_ARCHITECTURES, declared
# with the params (train.architecture's choices).


def class_indices(labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Labels as the model's class indices: the position of each label in ``ingest.classes``."""
    order = np.argsort(classes)
    positions = np.searchsorted(np.asarray(classes)[order], labels)
    return order[np.clip(positions, 0, len(classes) - 1)]


def members_of(model) -> list:
    """The networks of an ensemble (:func:`ensemble_of`), or ``[model]`` for a single network."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    return nested if model.name == "ensemble" else [model]


def temperature_of(model) -> float:
    """The temperature a network's ``calibration`` layer divides its logits by (1: uncalibrated)."""
    return 1.0 / float(model.get_layer(CALIBRATION).scale)


def set_temperature(model, temperature: float):
    """A copy of ``model`` (one network) whose probabilities are ``activation(logits / temperature)``.

    A copy, not the model changed in place: a Keras model's compiled predict functions keep the
    scale they were traced with.
    """
    import keras

    if not temperature > 0:
        raise ValueError(f"temperature must be a float > 0; got {temperature!r}")
    config = model.get_config()
    for layer in config["layers"]:
        if layer["name"] == CALIBRATION:
            layer["config"]["scale"] = 1.0 / float(temperature)
    calibrated = keras.Model.from_config(config)
    calibrated.set_weights(model.get_weights())
    return calibrated


def logit_model(model):
    """A model giving one network's logits (before calibration), sharing its weights."""
    import keras

    return keras.Model(model.inputs, model.get_layer(LOGITS).output)


def ensemble_of(members: list):
    """One Keras model averaging the members' (calibrated) probabilities; a single member as is."""
    import keras
    from keras import layers

    if len(members) == 1:
        return members[0]
    inputs = keras.Input(shape=members[0].input_shape[1:], name="image")
    named = [keras.Model(member.inputs[0], member.outputs[0], name=f"member_{i}")
             for i, member in enumerate(members)]
    outputs = layers.Average(name=PROBABILITY)([member(inputs) for member in named])
    return keras.Model(inputs, outputs, name="ensemble")


def infer(model, images: np.ndarray, *, batch_size: int = 256) -> np.ndarray:
    """``model`` in inference mode on ``images``, batch by batch, as float64. A plain call rather
    than ``model.predict``: Keras traces a new predict function for every model it is given, and
    warns about retracing, for the throw-away logit models below."""
    if not len(images):
        return np.empty((0, *model.output_shape[1:]))
    return np.concatenate([np.asarray(model(images[start:start + batch_size], training=False), float)
                           for start in range(0, len(images), batch_size)])


def predict_probabilities(model, images: np.ndarray, *, calibrated: bool = True,
                          batch_size: int = 256) -> np.ndarray:
    """The model's probabilities (n,) for one sigmoid output, (n, k) for a softmax or an ordinal
    head; with ``calibrated=False`` those of its uncalibrated logits (an ensemble's members averaged)."""
    from dicomflow.model.scoring import probabilities_from_logits

    def squeeze(values: np.ndarray) -> np.ndarray:
        return values.ravel() if values.shape[-1] == 1 else values

    if calibrated:
        return squeeze(infer(model, images, batch_size=batch_size))
    return squeeze(np.mean([probabilities_from_logits(infer(logit_model(member), images, batch_size=batch_size),
                                                      ordinal=is_ordinal(member))
                            for member in members_of(model)], axis=0))


def complement_probabilities(model, images: np.ndarray) -> np.ndarray | None:
    """1 - p for a model with one sigmoid output, from its members' logits in float64: exact where
    p itself rounds to 1 (a calibrated logit beyond ~17 in float32, beyond ~37 in float64). None
    for a model without this module's head (no ``logits`` layer)."""
    from dicomflow.model.scoring import probabilities_from_logits

    members = members_of(model)
    if not all(LOGITS in {layer.name for layer in member.layers} for member in members):
        return None
    return np.mean([probabilities_from_logits(-infer(logit_model(member), images),
                                              temperature=temperature_of(member)).ravel()
                    for member in members], axis=0)
