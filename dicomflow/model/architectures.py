"""The networks: how they are built, calibrated and combined, and what they take as input.

Every network ends in the same head: ``logits`` (a Dense layer without activation), then
``calibration`` (a ``Rescaling`` by 1 / temperature, identity until :func:`set_temperature`), then
``probability`` (sigmoid for two classes, softmax for more). The calibration is part of the saved
``.keras`` file, so evaluate, Grad-CAM, the registered pyfunc and a served model all see the same
calibrated probability, and it is a built-in layer, so the file loads without custom objects.

An ensemble (:func:`ensemble_of`) is one Keras model that averages its members' calibrated
probabilities; :func:`members_of` gives them back.

Used by train, evaluate and explain; imports Keras inside functions (TensorFlow costs seconds).
"""

from __future__ import annotations

import numpy as np

from dicomflow.config.layout import to_model_input  # noqa: F401  the model's input, defined with the images' layout

LOGITS, CALIBRATION, PROBABILITY = "logits", "calibration", "probability"


def build_seed_cnn(input_shape: tuple[int, int, int], n_classes: int = 2):
    """The seed's network: two conv/pool blocks, a dense layer, a sigmoid output (a softmax over
    the classes when there are more than two). The seed's sigmoid Dense is split into ``logits``
    and ``probability`` with the identity ``calibration`` between: the same function."""
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="image")

    # Feature extractor
    x = layers.Conv2D(32, (3, 3), activation="relu")(inputs)
    x = layers.MaxPooling2D((2, 2))(x)
    x = layers.Conv2D(64, (3, 3), activation="relu")(x)
    x = layers.MaxPooling2D((2, 2))(x)

    # Classifier head
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, _head(x, n_classes), name="seed_cnn")


def build_resnet_small(input_shape: tuple[int, int, int], n_classes: int = 2, *,
                       widths: tuple[int, ...] = (16, 32, 64), blocks_per_stage: int = 2):
    """A small residual network for 28-128 pixel images, trained from scratch.

    The CIFAR layout of He et al. (2016): a 3x3 stem, then stages of basic residual blocks
    (two 3x3 convolutions with batch normalisation), each stage after the first halving the
    resolution and doubling the width, then global average pooling. About 0.17 M weights with
    the defaults: small enough for 2 CPU cores and a few hundred images, where ImageNet-sized
    networks (``keras.applications``) overfit and there are no pretrained weights to start from.
    Its batch-normalisation statistics are re-estimated by the train stage after every epoch
    (``dicomflow.model.training.BatchNormStatistics``).
    """
    import keras
    from keras import layers

    # Synchronised: under a multi-worker or mirrored strategy the batch statistics are those of
    # the global batch, so several workers train what one process trains (local statistics of
    # half a batch did not: the two-worker test drifted by 7e-3 in loss).
    def batch_norm(x):
        return layers.BatchNormalization(synchronized=True)(x)

    def conv_bn(x, filters: int, strides: int = 1):
        x = layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False,
                          kernel_initializer="he_normal")(x)
        return batch_norm(x)

    def residual_block(x, filters: int, strides: int):
        shortcut = x
        if strides != 1 or x.shape[-1] != filters:  # project the shortcut to the new shape
            shortcut = batch_norm(layers.Conv2D(filters, 1, strides=strides, use_bias=False)(x))
        y = layers.ReLU()(conv_bn(x, filters, strides))
        y = conv_bn(y, filters)
        return layers.ReLU()(layers.Add()([shortcut, y]))

    inputs = keras.Input(shape=input_shape, name="image")
    x = layers.ReLU()(conv_bn(inputs, widths[0]))
    for stage, filters in enumerate(widths):
        for block in range(blocks_per_stage):
            x = residual_block(x, filters, strides=2 if stage and not block else 1)
    x = layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, _head(x, n_classes), name="resnet_small")


def _head(features, n_classes: int):
    """logits -> calibration (identity) -> probability."""
    from keras import layers

    logits = layers.Dense(1 if n_classes == 2 else n_classes, name=LOGITS)(features)
    calibrated = layers.Rescaling(1.0, name=CALIBRATION)(logits)
    return layers.Activation("sigmoid" if n_classes == 2 else "softmax", name=PROBABILITY)(calibrated)


ARCHITECTURES = {"seed_cnn": build_seed_cnn, "resnet_small": build_resnet_small}


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
    """The model's probabilities (n,) for one sigmoid output, (n, k) for a softmax; with
    ``calibrated=False`` those of its uncalibrated logits (an ensemble's members averaged)."""
    from dicomflow.model.scoring import probabilities_from_logits

    def squeeze(values: np.ndarray) -> np.ndarray:
        return values.ravel() if values.shape[-1] == 1 else values

    if calibrated:
        return squeeze(infer(model, images, batch_size=batch_size))
    return squeeze(np.mean([probabilities_from_logits(infer(logit_model(member), images, batch_size=batch_size))
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
