"""Where a network's weights start (``train.init``): from scratch, from the pretrain stage's
encoder, or from a model the team registered earlier, and the record of where they came from.

Weights are carried over layer by layer, matched by name and shape (every layer of
:mod:`dicomflow.model.architectures` has a fixed name). Everything up to the ``features`` layer
must match; the head after it (``logits``) is carried over when its shape fits and rebuilt when
the classes differ. Anything else stops the stage before it trains, naming the first layer that
does not fit.

Nothing from a registry is read before it is verified: ``models:/`` sources are downloaded and
their signature checked (:func:`dicomflow.signing.download_verified`, the check ``predict`` and
``serve`` make); a ``runs:/`` source is taken through the signed registered version of that run,
since a run's own files carry no signature. The ``.keras`` file is then loaded in Keras's safe
mode (no deserialised Python code) and only its weights are used.

The record (:attr:`InitialWeights.lineage`) is a set of MLflow tags under :data:`LINEAGE_PREFIX`,
which train sets on its run and evaluate copies onto the registered version and its model card.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dicomflow.config import layout
from dicomflow.errors import DataError, SettingsError
from dicomflow.model import architectures as models

logger = logging.getLogger(__name__)

LINEAGE_PREFIX = "dicomflow.init"  # MLflow tags: dicomflow.init, dicomflow.init.<detail>
# The layers after the encoder: rebuilt when their shape differs (other classes), never an error.
# The ordinal head's fixed link is one too: built with its values, absent from another task's
# network, and left frozen when the encoder is unfrozen (set_encoder_trainable).
HEAD_LAYERS = (models.LOGITS, models.GRADE_LOG_PROBABILITY)


@dataclass(frozen=True)
class InitialWeights:
    """The weights a network starts from, by layer name, and where they came from.

    Attributes
    ----------
    weights : dict[str, list[ndarray]]
        Each layer's weights in Keras's order (``layer.get_weights()``), batch-normalisation
        statistics included.
    lineage : dict[str, str]
        MLflow tags saying where the weights came from: ``dicomflow.init`` (the ``train.init``
        value) and details such as the pretrain run and data version, or the source model's name,
        version and data version.
    source_training_data : dict or None
        A registered source's training-data record (its signed ``training_data.json``: the
        digests of the images it trained on), ``{}`` when it has none; None for other sources.
        Evaluate leaves those images out of the promotion comparison.
    """

    weights: dict[str, list[np.ndarray]]
    lineage: dict[str, str]
    source_training_data: dict | None = None

    @classmethod
    def from_model(cls, model, lineage: dict[str, str]) -> InitialWeights:
        """The weights of ``model``'s layers (of its first member when it is an ensemble)."""
        network = models.members_of(model)[0]
        weights = {layer.name: [np.asarray(w) for w in layer.get_weights()]
                   for layer in network.layers if layer.weights}
        return cls(weights, dict(lineage))

    def digest(self) -> str:
        """SHA-256 over the names and values: what a resumed run checks it starts from."""
        digest = hashlib.sha256()
        for name in sorted(self.weights):
            digest.update(name.encode())
            for array in self.weights[name]:
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def load_initial_weights(init: str, *, input_shape: tuple[int, ...], pretrain_dir: Path,
                         scratch: Path | None = None) -> InitialWeights | None:
    """The weights ``train.init`` names, checked against the input, or None for ``scratch``.

    Parameters
    ----------
    init : str
        ``scratch``, ``pretrain`` (``pretrain_dir``'s encoder), ``models:/NAME@ALIAS``,
        ``models:/NAME/VERSION`` or ``runs:/RUN_ID/PATH``.
    input_shape : tuple of int
        The images' (height, width, channels): the source must take the same.
    pretrain_dir : Path
        The pretrain stage's output folder.
    scratch : Path, optional
        Where a registered model is downloaded to (a temporary folder when None).

    Raises
    ------
    SettingsError
        ``pretrain`` while the pretrain stage trained nothing (``pretrain.method: none``).
    DataError, dicomflow.signing.SignatureError
        A source that cannot be read or verified, or that takes another input shape.
    """
    if init == "scratch":
        return None
    trained_on = None
    if init == "pretrain":
        model, lineage = _pretrained_encoder(pretrain_dir)
    else:
        with tempfile.TemporaryDirectory(dir=scratch) as folder:
            model, lineage, trained_on = _registered_model(init, Path(folder))
    got = tuple(model.input_shape[1:])
    if got != tuple(input_shape):
        raise DataError(f"train.init {init}: its network takes {'x'.join(map(str, got))} images, these are "
                        f"{'x'.join(map(str, input_shape))} (ingest.image_size, ingest.channels): transfer needs "
                        "the same input; choose another source or train.init: scratch")
    initial = InitialWeights.from_model(model, {LINEAGE_PREFIX: init, **lineage})
    return dataclasses.replace(initial, source_training_data=trained_on)


def lineage_of(tags: dict[str, str]) -> dict[str, str]:
    """The ``dicomflow.init*`` tags among a training run's ``tags``; ``dicomflow.init: scratch``
    when it has none (trained from scratch, or before train.init existed)."""
    found = {k: v for k, v in tags.items() if k == LINEAGE_PREFIX or k.startswith(LINEAGE_PREFIX + ".")}
    return found or {LINEAGE_PREFIX: "scratch"}


def transfer_weights(model, initial: InitialWeights) -> list[str]:
    """Copy ``initial``'s weights into ``model``'s layers of the same name; the names copied.

    Every layer of ``model`` up to its ``features`` layer must find a layer of the same name and
    weight shapes in ``initial``; a head layer (``logits``) whose shapes differ (other classes)
    or that ``initial`` lacks (an encoder) keeps its fresh weights.

    Raises
    ------
    DataError
        The first encoder layer that is missing from ``initial`` or differs in shape.
    """
    copied = []
    for layer in model.layers:
        if not layer.weights:
            continue
        wanted = [tuple(w.shape) for w in layer.weights]
        source = initial.weights.get(layer.name)
        found = None if source is None else [tuple(w.shape) for w in source]
        if found == wanted:
            layer.set_weights(source)
            copied.append(layer.name)
        elif layer.name not in HEAD_LAYERS:
            what = "has no such layer" if source is None else f"has weights of shapes {found}, this network {wanted}"
            raise DataError(f"train.init {initial.lineage.get(LINEAGE_PREFIX, '?')}: layer {layer.name!r}: the source "
                            f"{what}; transfer needs the same train.architecture (layers matched by name and shape)")
    rebuilt = [layer.name for layer in model.layers if layer.name in HEAD_LAYERS and layer.name not in copied]
    logger.info("weights from %s: %d layers copied%s", initial.lineage.get(LINEAGE_PREFIX), len(copied),
                f", head rebuilt ({', '.join(rebuilt)})" if rebuilt else "")
    return copied


def encoder_variables(model) -> tuple[list, list]:
    """``model``'s trainable variables split into (encoder, head): the head is the layers after
    ``features``, the ones that transfer may rebuild."""
    head_names = {layer.name for layer in model.layers} & set(HEAD_LAYERS)
    head = [v for name in head_names for v in model.get_layer(name).trainable_variables]
    head_ids = {id(v) for v in head}
    return [v for v in model.trainable_variables if id(v) not in head_ids], head


def set_encoder_trainable(model, trainable: bool) -> None:
    """Freeze or unfreeze every layer before the head; a frozen batch normalisation runs in
    inference mode (its moving statistics), as Keras defines ``trainable = False`` for it."""
    for layer in model.layers:
        if layer.name not in HEAD_LAYERS:
            layer.trainable = trainable


def _pretrained_encoder(pretrain_dir: Path):
    """The pretrain stage's encoder and its lineage tags."""
    import keras

    record_file = Path(pretrain_dir) / layout.PRETRAIN_RECORD
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"train.init is 'pretrain' but {record_file} cannot be read ({type(err).__name__}): "
                        "run the pretrain stage (dvc repro)") from None
    if record.get("method", "none") == "none":
        raise SettingsError("train.init is 'pretrain' but pretrain.method is 'none', so no encoder was trained: "
                            "set pretrain.method (e.g. simclr) or train.init: scratch")
    encoder_file = Path(pretrain_dir) / layout.ENCODER_FILE
    try:
        encoder = keras.models.load_model(encoder_file, compile=False, safe_mode=True)
    except (OSError, ValueError) as err:
        raise DataError(f"train.init is 'pretrain' but {encoder_file} cannot be loaded ({type(err).__name__}): "
                        "run the pretrain stage again (dvc repro -f pretrain)") from None
    lineage = {f"{LINEAGE_PREFIX}.pretrain_method": str(record["method"]),
               f"{LINEAGE_PREFIX}.pretrain_data_version": str(record.get("data_version", "")),
               f"{LINEAGE_PREFIX}.pretrain_images": str(record.get("images", "")),
               f"{LINEAGE_PREFIX}.encoder_sha256": str(record.get("encoder_sha256", ""))}
    run_id = _pretraining_run(str(record.get("encoder_sha256", "")))
    if run_id:
        lineage[f"{LINEAGE_PREFIX}.pretrain_run"] = run_id
    return encoder, lineage


def _pretraining_run(encoder_sha256: str) -> str | None:
    """The MLflow run that logged the encoder of this sha256, when the tracking store has one."""
    if not encoder_sha256:
        return None
    try:
        import mlflow

        from dicomflow import tracking

        finder = getattr(tracking, "pretraining_run_for", None)
        run = finder(encoder_sha256, mlflow.MlflowClient()) if finder else None
    except Exception as err:  # noqa: BLE001  lineage is a record, not a reason to stop training
        logger.warning("the pretraining run could not be looked up (%s): lineage without its run id",
                       type(err).__name__)
        return None
    return None if run is None else run.info.run_id


def _registered_model(init: str, folder: Path):
    """A registered model's network, downloaded and verified, and its lineage tags."""
    import keras
    from mlflow import MlflowClient

    from dicomflow import signing

    model_uri = _registered_uri(init) if init.startswith("runs:/") else init
    name, version = signing.resolve_version(model_uri)
    local = signing.download_verified(f"models:/{name}/{version}", folder,
                                      key=signing.verify_key_from_env(os.environ))
    trained_on = layout.read_training_record(local) or {}
    keras_files = sorted(local.rglob("*.keras"))
    if len(keras_files) != 1:
        raise DataError(f"train.init {init}: version {version} of {name} holds {len(keras_files)} .keras files, "
                        "expected one: it is not a model dicomflow registered")
    try:
        model = keras.models.load_model(keras_files[0], compile=False, safe_mode=True)
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"train.init {init}: the network of version {version} of {name} cannot be loaded "
                        f"({type(err).__name__}); choose another source") from None
    tags = MlflowClient().get_model_version(name, version).tags
    lineage = {f"{LINEAGE_PREFIX}.source_model": name, f"{LINEAGE_PREFIX}.source_version": str(version),
               f"{LINEAGE_PREFIX}.source_data_version": tags.get("training_data_version", "unknown")}
    return model, lineage, trained_on


def _registered_uri(init: str) -> str:
    """``models:/NAME/VERSION`` of the latest signed registered version of the run ``runs:/RUN_ID/...``
    names (the training run or its evaluation): a run's artifacts carry no signature of their own."""
    from mlflow import MlflowClient

    from dicomflow import signing

    run_id = init[len("runs:/"):].split("/", 1)[0]
    if not run_id.isalnum():
        raise SettingsError(f"train.init {init!r}: expected runs:/RUN_ID/PATH with a run id of letters and digits")
    client = MlflowClient()
    # The version's run is evaluate's; its training run is a tag (dicomflow.evaluation.registry).
    versions = [*client.search_model_versions(f"run_id = '{run_id}'"),
                *client.search_model_versions(f"tags.training_run_id = '{run_id}'")]
    signed = sorted((v for v in versions if v.tags.get(signing.SIGNATURE_TAG)), key=lambda v: int(v.version))
    if not signed:
        raise signing.SignatureError(f"train.init {init}: no signed registered version comes from run {run_id}, and "
                                     "a run's own files carry no signature: register the model (evaluate does) "
                                     "and give models:/NAME/VERSION")
    return f"models:/{signed[-1].name}/{signed[-1].version}"
