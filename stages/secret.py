"""Stage 0, secret: which de-identification secret is in use, as a keyed fingerprint.

Inputs: ``DICOMFLOW_SECRET``, or the file named by ``DICOMFLOW_SECRET_FILE`` (neither: the demo
secret, which deidentify allows on the embedded sample only).
Outputs: ``paths.secret_fingerprint``: ``{"fingerprint": "<16 hex>", "demo": true|false}``.
Params: none.

The secret is no file and no param, so DVC cannot see it change. This stage runs on every
``dvc repro`` (``always_changed``) and writes only the fingerprint; deidentify depends on that
file, so a new secret reruns deidentify and everything after it, and the same secret leaves them
cached. The fingerprint is keyed (:func:`~dicomflow.deid.secret.secret_fingerprint`): it tells
secrets apart and reveals nothing of them.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dicomflow.config.params import load_params
from dicomflow.deid.secret import fingerprint_record, read_secret
from dicomflow.runtime.outputs import write_json
from dicomflow.runtime.stage import run_stage

logger = logging.getLogger(__name__)


def main() -> None:
    paths = load_params("paths")
    secret, is_demo = read_secret(os.environ)
    record = fingerprint_record(secret, is_demo)
    write_json(Path(paths.secret_fingerprint), record)
    logger.info("secret fingerprint %s (%s)", record["fingerprint"],
                "the demo secret" if is_demo else "a secret of the environment")


if __name__ == "__main__":
    run_stage(main)
