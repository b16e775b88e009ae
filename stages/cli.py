"""How every stage starts: logging set up once, and known failures reported as one line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from stages.log_privacy import withheld_summary, withhold_library_messages
from stages.params import ParamsError


class StageError(RuntimeError):
    """The input data cannot be used; the message says what and how many."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with logging on stderr; params and data errors exit 1 in one line.

    Library warnings and pydicom's log records are withheld (:mod:`stages.log_privacy`): they
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
    except (ParamsError, StageError) as err:
        sys.exit(f"error: {err}")
    finally:
        if summary := withheld_summary():
            logging.getLogger(main.__module__).warning("%s", summary)
