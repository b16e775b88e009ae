"""The de-identification secret: the HMAC key of every pseudonym, keyed UID and date shift.

It comes from ``DICOMFLOW_SECRET`` or the file named by ``DICOMFLOW_SECRET_FILE``, never from
``params.yaml``. Without either, the demo secret (a constant in this file, so public) stands in,
and only where nothing real can be exposed by it (:func:`check_secret_use`): on the embedded
sample (:func:`is_embedded_sample`) and outside team mode. Which secret made the data is recorded
as a keyed fingerprint (:func:`secret_fingerprint`), never the secret.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from functools import lru_cache
from importlib.resources import files
from pathlib import Path

from dicomflow.errors import SettingsError

SECRET_ENV = "DICOMFLOW_SECRET"
SECRET_FILE_ENV = "DICOMFLOW_SECRET_FILE"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
DEMO_SECRET = b"dicomflow demo secret: for the embedded sample data only, never for real data"
# 32 bytes: a secret typed from the keyboard this long and drawn at random carries at least 128
# bits (32 hex digits: 4 bits each; base64: 6), out of reach of an offline search of the keyed
# pseudonyms. A shorter one can be a password, which a search of known Patient IDs finds.
MIN_SECRET_BYTES = 32
FINGERPRINT_HEX = 16  # 64 bits: tells secrets apart, says nothing of the secret
_FINGERPRINT_LABEL = b"dicomflow secret fingerprint v1"
# SHA-256 of every file of the embedded sample (`dicomflow sample-data data`, as data.dvc pins it).
_SAMPLE_DIGESTS = "resources/embedded_sample.sha256"
HOW_TO_SET = (f"set {SECRET_ENV} or {SECRET_FILE_ENV} to a random secret of at least "
              f"{MIN_SECRET_BYTES} bytes (e.g. `openssl rand -hex 32`); see docs/security/secret.md")


def read_secret(environ: Mapping[str, str]) -> tuple[bytes, bool]:
    """The HMAC key and whether it is the demo one.

    ``DICOMFLOW_SECRET`` wins over ``DICOMFLOW_SECRET_FILE`` (whose content is stripped of
    surrounding whitespace, then counted in bytes). Neither set: the demo secret, which the caller
    may use only where :func:`check_secret_use` allows it.

    Raises
    ------
    SettingsError
        When the one set is empty, unreadable, shorter than :data:`MIN_SECRET_BYTES` bytes or the
        demo secret itself (public, so no secret at all).
    """
    if SECRET_ENV in environ:
        where, secret = SECRET_ENV, environ[SECRET_ENV].encode()
        if not secret:
            raise SettingsError(f"{SECRET_ENV} is set but empty; unset it or give a secret")
    elif SECRET_FILE_ENV in environ:
        path = Path(environ[SECRET_FILE_ENV])
        where = f"{SECRET_FILE_ENV}={path}"
        try:
            secret = path.read_bytes().strip()
        except OSError as err:
            raise SettingsError(f"{where}: cannot read the file ({err.strerror})") from err
        if not secret:
            raise SettingsError(f"{where}: the file is empty")
    else:
        return DEMO_SECRET, True
    if secret == DEMO_SECRET:
        raise SettingsError(f"{where} holds the demo secret, which is public: {HOW_TO_SET}")
    if len(secret) < MIN_SECRET_BYTES:
        raise SettingsError(f"{where} is {len(secret)} bytes long; a secret needs at least "
                            f"{MIN_SECRET_BYTES}: {HOW_TO_SET}")
    return secret, False


def secret_fingerprint(secret: bytes) -> str:
    """A keyed fingerprint of ``secret``: HMAC-SHA256(secret, a fixed label), 16 hex digits.

    The same secret always gives the same fingerprint and another secret another one (odds of a
    clash 2**-64), so it says which secret made a data set. It is the output of a pseudorandom
    function keyed by the secret: knowing it helps no more in finding the secret than guessing
    secrets one by one, which :data:`MIN_SECRET_BYTES` puts out of reach.
    """
    return hmac.new(secret, _FINGERPRINT_LABEL, hashlib.sha256).hexdigest()[:FINGERPRINT_HEX]


def fingerprint_record(secret: bytes, is_demo: bool) -> dict[str, str | bool]:
    """The content of ``layout.DEID_SECRET_FINGERPRINT``: ``{"fingerprint": ..., "demo": ...}``."""
    return {"fingerprint": secret_fingerprint(secret), "demo": is_demo}


@lru_cache(maxsize=1)
def _sample_digests() -> frozenset[str]:
    text = files("dicomflow.deid").joinpath(_SAMPLE_DIGESTS).read_text(encoding="ascii")
    return frozenset(text.split())


def is_embedded_sample(file_digests: Iterable[str]) -> bool:
    """Whether every file is one of the embedded sample's (by the SHA-256 of its bytes, as ingest
    records it in ``sha256``); False for no file at all.

    Notes
    -----
    Real data cannot pass by accident: each of its files would have to be byte for byte one of
    the sample's 721 generated files (synthetic patients, no real person), and one file that is
    not makes the whole set real data. Finding a different file with one of these SHA-256
    digests is a second-preimage attack on SHA-256.
    """
    digests = set(file_digests)
    return bool(digests) and digests <= _sample_digests()


def is_team_mode(environ: Mapping[str, str]) -> bool:
    """Whether runs go to a team's tracking server (``MLFLOW_TRACKING_URI`` an http(s) URL)."""
    return environ.get(TRACKING_URI_ENV, "").strip().lower().startswith(("http://", "https://"))


def check_secret_use(is_demo: bool, *, sample: bool, team_mode: bool) -> None:
    """Raise SettingsError where the demo secret would protect real data or a team's runs.

    The demo secret is public: pseudonyms made with it are reversed by hashing candidate Patient
    IDs. It is allowed only on the embedded sample (``sample``, :func:`is_embedded_sample`) and
    outside team mode (``team_mode``, :func:`is_team_mode`), whose runs others see.
    """
    if not is_demo:
        return
    if team_mode:
        raise SettingsError(f"no de-identification secret while {TRACKING_URI_ENV} names a team "
                            f"server: the demo secret is public and is refused in team mode; {HOW_TO_SET}")
    if not sample:
        raise SettingsError("no de-identification secret, and the data is not the embedded sample: "
                            f"the demo secret is public and never de-identifies real data; {HOW_TO_SET}")
