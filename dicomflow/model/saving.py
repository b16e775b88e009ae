"""Saving a Keras model as a ``.keras`` file whose bytes depend on the model only.

Keras 3 writes the save time twice into a ``.keras`` archive: ``"date_saved"`` in its
``metadata.json`` and the zip timestamp of ``model.weights.h5``. Two trainings that end in the same
weights then give files of different hashes, so DVC sees a new ``outputs/model`` on every run, a
fresh clone never reproduces the committed ``dvc.lock`` and going back to a committed result finds
nothing in the cache. :func:`save_model` rewrites the archive Keras wrote with the time left out.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
from pathlib import Path

METADATA = "metadata.json"
VOLATILE_METADATA = ("date_saved",)
# The earliest time a zip entry can hold; Keras already stamps two of its three members with it.
FIXED_DATE_TIME = (1980, 1, 1, 0, 0, 0)
FILE_MODE = 0o644


def save_model(model, path: Path) -> Path:
    """Save ``model`` to ``path`` (a ``.keras`` file) with no save time in it.

    Parameters
    ----------
    model : keras.Model
        The model to save.
    path : Path
        Destination; its folder is created. Written in full, then moved into place, so a killed
        run never leaves half a file under the final name.

    Returns
    -------
    Path
        ``path``.

    Notes
    -----
    Same weights, config and Keras version give the same bytes: the members keep Keras's order
    and compression, each gets the time :data:`FIXED_DATE_TIME` and mode 0644, and
    ``metadata.json`` loses :data:`VOLATILE_METADATA` (``keras_version`` stays; Keras's loader
    reads nothing else of it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        written = Path(scratch) / "model.keras"  # Keras insists on the .keras suffix
        model.save(written)
        partial = Path(scratch) / "normalised.keras"
        normalise_archive(written, partial)
        os.replace(partial, path)
    return path


def normalise_archive(source: Path, destination: Path) -> None:
    """Copy the ``.keras`` archive ``source`` to ``destination`` without its save times."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(destination, "w") as out:
        for member in archive.infolist():
            data = archive.read(member)
            if member.filename == METADATA:
                metadata = {key: value for key, value in json.loads(data).items() if key not in VOLATILE_METADATA}
                data = json.dumps(metadata, sort_keys=True).encode("utf-8")
            info = zipfile.ZipInfo(member.filename, date_time=FIXED_DATE_TIME)
            info.compress_type = member.compress_type
            info.create_system = 3  # Unix, on every platform: the mode bits below mean the same
            info.external_attr = FILE_MODE << 16
            out.writestr(info, data)
