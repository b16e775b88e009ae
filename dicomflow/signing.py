"""Signed models: every version dicomflow registers is signed, and nothing loads one unverified.

STUB: the interface the other parts code against; the signing helper implements it (branch
``signing``). Loading an MLflow pyfunc runs its code, so a registry anyone could write to would be
code execution: evaluate (the champion it compares with), ``dicomflow predict`` and ``dicomflow
serve`` download a version, verify its signature over the downloaded files, and load only that
verified local copy. The keys come from a file or the environment, never from MLflow.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicomflow.errors import DataError

SIGNATURE_TAG = "dicomflow.signature"  # model version tag holding the signature (not a secret)


class SignatureError(DataError):
    """A model is unsigned, altered, or signed with another key: it is not loaded."""


def signing_key_from_env(environ: Mapping[str, str]) -> Any:
    """The key that signs new versions (evaluate); SettingsError naming the variables when none."""
    raise NotImplementedError


def verify_key_from_env(environ: Mapping[str, str]) -> Any:
    """The key that verifies versions (evaluate, predict, serve); SettingsError when none."""
    raise NotImplementedError


def sign_model_version(name: str, version: str, *, key: Any) -> None:
    """Sign registered model ``name`` version ``version`` (its files as stored) and record the
    signature as its :data:`SIGNATURE_TAG` tag."""
    raise NotImplementedError


def download_verified(model_uri: str, destination: Path, *, key: Any) -> Path:
    """Download ``model_uri`` (``models:/NAME/VERSION``, ``models:/NAME@ALIAS``) into
    ``destination``, verify its signature over exactly the downloaded files, and return the local
    folder to load from; SignatureError (one line, the URI and why) when unsigned or altered."""
    raise NotImplementedError
