"""What a stage writes to its log: one format, no TensorFlow banner, MLflow and warnings in the
stage's format, no terminal codes away from a terminal (dicomflow/runtime/stage.py, progress.py).

Each check runs a real Python process, as DVC runs a stage, with stderr and stdout sent to
pipes (not a terminal) and reads what came out.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicomflow.runtime.progress import progress

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [\w.]+ (INFO|WARNING|ERROR) ")


def run_python(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    # No MLflow setting of an earlier test in this worker (an experiment id) comes along.
    env = {name: value for name, value in os.environ.items()
           if name != "TF_CPP_MIN_LOG_LEVEL" and not name.startswith("MLFLOW_")}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(ROOT)})


# A stage's life in small: TensorFlow imported in main(), a Keras model logged to MLflow under op
# determinism (whose check of the input example calls predict with Keras's default progress bar),
# a library warning.
STAGE = """
import logging, warnings
from dicomflow.runtime.stage import run_stage

def main():
    import numpy as np, keras, mlflow, tensorflow as tf
    from dicomflow.tracking import log_keras_model
    tf.config.experimental.enable_op_determinism()  # as train: each predict logged an "E0000" line
    logging.getLogger("stage").info("milestone")
    mlflow.set_tracking_uri("sqlite:///mlflow.db")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1, activation="sigmoid")])
    with mlflow.start_run():
        log_keras_model(model, np.zeros((2, 4), np.float32))
    warnings.warn("a value read from a file", UserWarning)

run_stage(main)
"""


@pytest.mark.slow  # TensorFlow, Keras and a new MLflow store: about 30 s on 2 cores
def test_a_stage_log_is_one_format_with_no_banner_and_no_terminal_codes(tmp_path):
    ran = run_python(STAGE, tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == ""  # no progress bar: it wrote "\x1b[1m1/1\x1b[0m ..." here
    lines = ran.stderr.splitlines()
    assert lines, "the stage logged nothing"
    assert [line for line in lines if not STAGE_LINE.match(line)] == []
    assert not re.search(r"[\x1b\r\b]", ran.stderr)
    assert "absl::InitializeLog" not in ran.stderr and "oneDNN" not in ran.stderr
    assert any(" stage INFO milestone" in line for line in lines)
    assert any(" mlflow." in line for line in lines)  # MLflow's lines, in the stage's format
    assert not any(" alembic." in line for line in lines)  # its 60-odd migration lines
    assert any(" py.warnings WARNING UserWarning from " in line and "message withheld" in line for line in lines)


@pytest.mark.slow
def test_tensorflow_errors_still_show_and_the_import_is_a_plain_one(tmp_path):
    ran = run_python("""
import os, sys
import dicomflow.runtime.stage
import tensorflow as tf
assert tf.__spec__.loader.__class__.__name__ == "SourceFileLoader", tf.__spec__.loader
os.write(2, b"E0000 00:00:1.0 1 x.cc:1] a real error\\n")
""", tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert ran.stderr == "E0000 00:00:1.0 1 x.cc:1] a real error\n"


@pytest.mark.slow
def test_no_stage_imports_tensorflow_before_the_environment_is_set(tmp_path):
    modules = sorted(f"stages.{path.stem}" for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__")
    ran = run_python(f"""
import importlib, sys
for name in {modules!r} + ["dicomflow.cli"]:
    importlib.import_module(name)
    assert "tensorflow" not in sys.modules, name
""", tmp_path)
    assert ran.returncode == 0, ran.stderr


class TestProgress:
    def test_away_from_a_terminal_it_logs_counts_without_codes(self, caplog):
        stream = io.StringIO()  # not a terminal
        with caplog.at_level(logging.INFO, logger="dicomflow.runtime.progress"):
            assert list(progress(range(5), total=5, what="ingest", stream=stream, every_s=0.0)) == [0, 1, 2, 3, 4]
        assert stream.getvalue() == ""
        messages = [re.sub(r"(, [\d.]+ files/s| in \d+ s)$", "", record.getMessage()) for record in caplog.records]
        assert messages == ["ingest: 1 of 5 files (20%)", "ingest: 2 of 5 files (40%)",
                            "ingest: 3 of 5 files (60%)", "ingest: 4 of 5 files (80%)", "ingest: 5 of 5 files"]

    def test_a_short_step_logs_nothing(self, caplog):
        with caplog.at_level(logging.INFO, logger="dicomflow.runtime.progress"):
            list(progress(range(3), total=3, what="ingest", stream=io.StringIO()))
        assert caplog.records == []
