"""How every stage starts: logging set up once, and known failures reported as one line.

Importing this module also sets the environment of the native libraries' logging
(:data:`QUIET_LIBRARY_ENV`), once for every stage and ``dicomflow`` command: TensorFlow reads it
when it is first imported, which every stage does later, inside its ``main()``.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import os
import sys
import traceback
from collections.abc import Callable

from dicomflow.errors import DicomflowError
from dicomflow.runtime.log_privacy import withheld_summary, withhold_library_messages
from dicomflow.runtime.native_logs import IMPORT_BANNER, stderr_lines_dropped

SHOW_TRACEBACKS_ENV = "DICOMFLOW_SHOW_TRACEBACKS"  # set it to see messages, on data you may log

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"

# Read by the libraries when they are imported; a value the user set wins (setdefault).
QUIET_LIBRARY_ENV = {
    # TensorFlow's C++ INFO and WARNING lines: the oneDNN and CPU-instruction banner that every
    # process importing TensorFlow printed (twice: two of its libraries log), and absl's "All log
    # messages before absl::InitializeLog()" preamble. Its C++ errors still show.
    "TF_CPP_MIN_LOG_LEVEL": "2",
    # MLflow's own handler and format on its loggers ("2026/12/06 22:40:23 INFO mlflow...: ..."):
    # without it, its records go through the stage's one format (run_stage).
    "MLFLOW_CONFIGURE_LOGGING": "false",
}
for _name, _value in QUIET_LIBRARY_ENV.items():
    os.environ.setdefault(_name, _value)

class _QuietTensorFlowImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``tensorflow`` as the path finder does, and executes it with its banner dropped."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)  # once: later imports find the module in sys.modules
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            self._loader, spec.loader = spec.loader, self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # as if imported plainly
        with stderr_lines_dropped(IMPORT_BANNER):
            self._loader.exec_module(module)


if "tensorflow" not in sys.modules and not any(isinstance(f, _QuietTensorFlowImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _QuietTensorFlowImport())

# Loggers that talk too much at INFO: the SQLite store's schema migrations (a line per revision
# on a new mlflow.db), SQLAlchemy's engine, and TensorFlow's Python side (one INFO line per
# collective all-reduce it traces: hundreds per multi-worker run). Their warnings still show.
QUIET_LOGGERS = ("alembic", "sqlalchemy.engine", "huey", "tensorflow")
# Loggers a library gives a handler of its own (MLflow, when it was imported before run_stage or
# the user turned MLFLOW_CONFIGURE_LOGGING back on): emptied, so each record is written once,
# in the stage's format.
OWN_HANDLER_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")


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


def configure_logging() -> None:
    """One format for every record on stderr (:data:`LOG_FORMAT`), library messages withheld
    (:mod:`dicomflow.runtime.log_privacy`), chatty libraries at WARNING (:data:`QUIET_LOGGERS`)."""
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    for name in OWN_HANDLER_LOGGERS:
        own = logging.getLogger(name)
        own.handlers, own.propagate = [], True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    withhold_library_messages()


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's ``main`` with logging on stderr; the library's errors
    (:class:`dicomflow.errors.DicomflowError`: bad data, bad settings) exit 1 in one line,
    any other error with its traceback but not its message (:func:`value_free_traceback`).

    Library warnings and pydicom's log records are withheld (:mod:`dicomflow.runtime.log_privacy`): they
    quote values read from source files, and CI keeps these logs.
    """
    configure_logging()
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
