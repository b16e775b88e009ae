"""The library's own errors: what a caller can fix, said in one line.

Library code raises these and nothing knows who called it: a stage's runner
(:func:`dicomflow.runtime.stage.run_stage`) and the command line turn them into their one-line
``error: ...`` and exit status 1; a test or a notebook catches them like any other exception.
Every other exception is a bug, shown with its traceback but without its message, which may
quote a value read from a file.
"""

from __future__ import annotations


class DicomflowError(Exception):
    """Base of the errors a user can act on: the message says what is wrong and what to do."""


class DataError(DicomflowError):
    """The input data cannot be used (a file, a table, an image array, a model); the message says
    what and how many, never a value read from the data."""


class SettingsError(DicomflowError, ValueError):
    """A setting (``params.yaml``, an environment variable, a command-line option) is missing or
    out of range; the message names it, says what came and what is allowed."""
