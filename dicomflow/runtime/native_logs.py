"""Lines TensorFlow's C++ side writes straight to file descriptor 2 that are no news to a user,
and a way to drop exactly those around the calls that write them.

Python's logging never sees them, and TF_CPP_MIN_LOG_LEVEL does not stop them all in
TensorFlow 2.21: absl logs to stderr until it is initialised, and TensorFlow never initialises
it. Only the lines matched here are dropped, and only while the wrapped call runs; everything
else written then is written back, in order, when it returns.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator

# While ``import tensorflow`` runs: absl's preamble, INFO lines (the oneDNN notice, once for
# each of two libraries that print it) and the CPU-instruction notice.
IMPORT_BANNER = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called"
                           r"|I\d{4} [\d:.]+ +\d+ \S+:\d+\] "
                           r"|To enable the following instructions: ")

# Keras's predict under tf.config.experimental.enable_op_determinism() (the train stage's): the
# determinism rewrite turns the input pipeline's parallel map into a plain MapDataset and copies
# an attribute that op does not have. TensorFlow logs it at ERROR and goes on with the right
# result: it is no error of the model or the data.
DETERMINISTIC_MAP_ATTRIBUTE = re.compile(
    r"E\d{4} [\d:.]+ +\d+ node_def_util\.cc:\d+\] NodeDef mentions attribute use_unbounded_threadpool "
    r"which is not in the op definition: Op<name=MapDataset;")


# absl's preamble, written once before its first line, whichever call writes that line: at the
# import on some CPUs, at the first deterministic predict on others (seen on AMD EPYC).
ABSL_PREAMBLE = re.compile(r"WARNING: All log messages before absl::InitializeLog\(\) is called")


@contextlib.contextmanager
def stderr_lines_dropped(pattern: re.Pattern) -> Iterator[None]:
    """Capture file descriptor 2 while the block runs (native libraries write there directly),
    then write back every line that matches neither ``pattern`` nor :data:`ABSL_PREAMBLE`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
                    if not (pattern.match(line) or ABSL_PREAMBLE.match(line))]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()
