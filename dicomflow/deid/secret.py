"""The de-identification secret: the HMAC key of every pseudonym, keyed UID and date shift.

It comes from ``DICOMFLOW_SECRET`` or the file named by ``DICOMFLOW_SECRET_FILE``, never from
``params.yaml``; without either, the demo secret (a constant in this file) stands in.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from dicomflow.errors import DataError

SECRET_ENV = "DICOMFLOW_SECRET"
SECRET_FILE_ENV = "DICOMFLOW_SECRET_FILE"
DEMO_SECRET = b"dicomflow demo secret: for the embedded sample data only, never for real data"


def read_secret(environ: Mapping[str, str]) -> tuple[bytes, bool]:
    """The HMAC key and whether it is the demo one.

    ``DICOMFLOW_SECRET`` wins over ``DICOMFLOW_SECRET_FILE`` (whose content is stripped of
    surrounding whitespace). Raises DataError when either is set but empty or unreadable.
    """
    if SECRET_ENV in environ:
        if not environ[SECRET_ENV]:
            raise DataError(f"{SECRET_ENV} is set but empty; unset it or give a secret")
        return environ[SECRET_ENV].encode(), False
    if SECRET_FILE_ENV in environ:
        path = Path(environ[SECRET_FILE_ENV])
        try:
            secret = path.read_bytes().strip()
        except OSError as err:
            raise DataError(
                f"{SECRET_FILE_ENV}={path}: cannot read the file ({err.strerror})") from err
        if not secret:
            raise DataError(f"{SECRET_FILE_ENV}={path}: the file is empty")
        return secret, False
    return DEMO_SECRET, True
