"""Writing a stage's outputs so that a kill or a full disk never leaves half a file.

Outputs are written under temporary names beside their final ones and renamed into place
(``os.replace``, atomic on one filesystem) only when complete; on failure the temporary ones are
removed, so what is there is the previous output or nothing. A full disk (or quota, or file size
limit) becomes one line naming what was being written where, instead of a traceback.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dicomflow.errors import DataError

STAGING_SUFFIX = ".partial"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def out_of_space(err: BaseException) -> OSError | None:
    """The OSError saying there is no space, in ``err`` or what caused it (pydicom re-raises a
    write error as a new OSError without its errno, naming the tag), else None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err
        err = err.__cause__ or err.__context__
    return None


HALF_WRITTEN_REMOVED = "nothing half-written is left; free some space (or raise the limit) and re-run"


def disk_of(path: Path | str) -> str:
    """The disk ``path`` is on, in words: its mount point and the space left there
    ("the disk mounted at /srv (1.2 GiB free)"); "an unknown disk" when it cannot be found."""
    folder = Path(os.path.abspath(path))
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        mount = folder
        while not os.path.ismount(mount) and mount != mount.parent:
            mount = mount.parent
        free = shutil.disk_usage(mount).free
    except OSError:
        return "an unknown disk"
    return f"the disk mounted at {mount} ({free / 2**30:.1f} GiB free)"


def no_space_error(err: OSError, *, what: str, where: Path | str,
                   remedy: str = HALF_WRITTEN_REMOVED) -> DataError:
    """The one-line error for a write that ran out of space (``err.errno`` in :data:`NO_SPACE`):
    what was being written, to which file, on which disk, and ``remedy``."""
    target = err.filename or where
    return DataError(f"{err.strerror} while writing {what} to {target}, on {disk_of(target)}: {remedy}")


@contextmanager
def staged_folder(final: Path, *, what: str) -> Iterator[Path]:
    """A fresh folder beside ``final`` to write its new content into; it replaces ``final`` when
    the block ends, and is removed if the block raises. A write that finds no space raises
    DataError (:func:`no_space_error`)."""
    staging = final.with_name(final.name + STAGING_SUFFIX)
    shutil.rmtree(staging, ignore_errors=True)  # a killed run's leftovers
    staging.mkdir(parents=True)
    try:
        yield staging
    except OSError as err:
        shutil.rmtree(staging, ignore_errors=True)
        if cause := out_of_space(err):
            raise no_space_error(cause, what=what, where=staging) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)


def write_text(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all (through a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + STAGING_SUFFIX)
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    except OSError as err:
        temporary.unlink(missing_ok=True)
        if err.errno in NO_SPACE:
            raise no_space_error(err, what=path.name, where=path) from None
        raise


def write_json(path: Path, content: dict) -> None:
    """A metrics or report file, indented, written whole or not at all."""
    write_text(path, json.dumps(content, indent=2) + "\n")
