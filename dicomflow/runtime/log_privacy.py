"""Logs that never quote a source file: library warnings withheld, pydicom's messages hidden.

pydicom's warnings and log records quote the values they read ("Invalid value for VR UI:
'<the value>'": a legacy UID built from a record number and a date), and so may any library
that decodes a file. CI keeps stage logs,
so no stage, ``predict`` or served model may let them through:

* :func:`withhold_library_messages` (called by every stage's ``run_stage``): a warning is shown as
  its category and origin only, never its text, once per origin, and counted; pydicom's own log
  records likewise. :func:`withheld_summary` gives the count for the stage's last line.
* :func:`hidden_pydicom_messages`: a context that silences pydicom while a source is read (the
  served model and the deidentify workers use it), yielding the warnings it caught.

Warnings about code (DeprecationWarning, FutureWarning) quote no data and are shown as usual.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CODE_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning, ImportWarning)
WITHHELD = "message withheld: library messages may quote values read from files"
_counts: Counter = Counter()
_show_original = warnings.showwarning


@contextmanager
def hidden_pydicom_messages() -> Iterator[list[warnings.WarningMessage]]:
    """Silence pydicom's warnings and log records while sources are read: they quote header values
    ("Invalid value for VR DA: '...'"), i.e. PHI. Yields the list the warnings are caught in."""
    pydicom_logger = logging.getLogger("pydicom")
    was_disabled, pydicom_logger.disabled = pydicom_logger.disabled, True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        pydicom_logger.disabled = was_disabled


def _show_withheld(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` that prints a data warning's origin, never its text."""
    if issubclass(category, CODE_WARNINGS):
        _show_original(message, category, filename, lineno, file, line)
        return
    origin = f"{category.__name__} from {_short(filename)}:{lineno}"
    _counts[origin] += 1
    if _counts[origin] == 1:
        if file is None and logging.getLogger().handlers:  # in the stage's log format
            logging.getLogger("py.warnings").warning("%s (%s; further ones counted)", origin, WITHHELD)
        else:
            print(f"warning: {origin} ({WITHHELD}; further ones counted)", file=file or sys.stderr)


class _WithholdPydicomRecords(logging.Filter):
    """Replaces the text of pydicom's log records (they quote values) by its origin."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "pydicom" or record.name.startswith("pydicom."):
            origin = f"pydicom log record from {record.module}:{record.lineno}"
            _counts[origin] += 1
            if _counts[origin] > 1:
                return False
            record.msg, record.args = f"{origin} ({WITHHELD}; further ones counted)", ()
            # LOGGER.exception attaches the exception, whose text quotes values too.
            record.exc_info, record.exc_text, record.stack_info = None, None, None
        return True


def withhold_library_messages() -> None:
    """Route warnings through :func:`_show_withheld` and filter pydicom's records on every root
    handler (call after logging is configured)."""
    warnings.showwarning = _show_withheld
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _WithholdPydicomRecords) for f in handler.filters):
            handler.addFilter(_WithholdPydicomRecords())


def withheld_summary() -> str:
    """One line counting the withheld messages by origin ("" when there were none)."""
    if not _counts:
        return ""
    return "withheld library messages (they may quote values read from files): " + ", ".join(
        f"{count} {origin}" for origin, count in _counts.most_common())


def _short(filename: str) -> str:
    """``pydicom/valuerep.py`` for a path inside site-packages; the file name otherwise."""
    parts = Path(filename).parts
    for anchor in ("site-packages", "dicomflow", "stages"):
        if anchor in parts:
            return "/".join(parts[parts.index(anchor) + (anchor == "site-packages"):])
    return Path(filename).name
