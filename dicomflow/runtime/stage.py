"""How every stage starts: logging set up once, and known failures reported as one line."""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable

from dicomflow.errors import DicomflowError
from dicomflow.runtime.log_privacy import withheld_summary, withhold_library_messages

SHOW_TRACEBACKS_ENV = "DICOMFLOW_SHOW_TRACEBACKS"  # set it to see messages, on data you may log


def value_free_traceback(err: BaseException) -> str:
    """An unexpected error as its type and where it was raised, without its message: messages of
    pydicom, numpy and pandas errors quote the values they choked on, and CI keeps stage logs."""
    frames = "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))
    causes, cause = [], err.__cause__ or err.__context__
    while cause is not None:
        causes.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    caused_by = f" (raised while handling {', '.join(causes)})" if causes else ""
    return (f"Traceback (most recent call last), message withheld:\n{frames}"
            f"error: unexpected {type(err).__name__}{caused_by}; its message may quote a value read "
            f"from a file, so it is not shown (set {SHOW_TRACEBACKS_ENV}=1 to see it)")


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with logging on stderr; the library's errors
    (:class:`dicomflow.errors.DicomflowError`: bad data, bad settings) exit 1 in one line,
    any other error with its traceback but not its message (:func:`value_free_traceback`).

    Library warnings and pydicom's log records are withheld (:mod:`dicomflow.runtime.log_privacy`): they
    quote values read from source files, and CI keeps these logs.
    """
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    withhold_library_messages()
    # TensorFlow's INFO lines (one per collective all-reduce it traces: hundreds per multi-worker
    # run) bury the stage's own; its warnings still show.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    try:
        main()
    except DicomflowError as err:
        sys.exit(f"error: {err}")
    except Exception as err:
        if os.environ.get(SHOW_TRACEBACKS_ENV):
            raise
        sys.exit(value_free_traceback(err))
    finally:
        if summary := withheld_summary():
            logging.getLogger(main.__module__).warning("%s", summary)
