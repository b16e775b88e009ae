"""Every benchmark's main path on tiny data, run as its users run it (``python -m bench.NAME``).

Each run must exit 0, print a Markdown table for every table it records, and write the same rows
to its ``--json`` file with the machine, the date and the commit. The figures themselves are
timings and are not checked (speed targets belong to the benchmarks, not to tests); what is
checked is that each benchmark measured what it says, on the data it was given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.common import (
    Column,
    Report,
    TreeMemory,
    run_measured,
    source_files,
    work_folder,
)

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "medmnist" / "breastmnist.npz"
PER_SPLIT = 6  # BreastMNIST images of each split the tiny medmnist run keeps


def _check_validate(document: dict) -> None:
    rows = document["tables"]["validate"]["rows"]
    assert [(r["rows"], r["implementation"]) for r in rows] == [
        (600, "suite (GX + drift)"), (600, "pandas floor")]
    assert all(r["failed_checks"] == 0 for r in rows)  # the synthetic manifest is clean


def _check_ingest_memory(document: dict) -> None:
    rows = {r["file"]: r for r in document["tables"]["memory"]["rows"]}
    assert set(rows) == {"128^2 native 16-bit", "128^2 RLE 16-bit", "128^2 deflated 16-bit",
                         "128^2 RGB 8-bit", "header claims 65535 x 256"}
    assert rows["128^2 RGB 8-bit"]["frame_mib"] == 128 * 128 * 3 / 2**20
    assert rows["header claims 65535 x 256"]["outcome"] != "accepted"


def _check_scale(document: dict) -> None:
    sample_files = len(source_files(ROOT / "data")) if (ROOT / "data" / "labels.csv").is_file() else None
    (row,) = document["tables"]["ingest"]["rows"]
    if sample_files is not None:
        assert row["files"] == sample_files  # one copy of the sample holds at least 10 files
    assert row["peak_rss_mib"] >= row["peak_worker_mib"] > 0
    assert [r["step"] for r in document["tables"]["validate_split"]["rows"]][-1] == "total with the read"
    assert document["figures"]["rows"] == 600


def _check_ingest(document: dict) -> None:
    for key in ("replicated_sample", "clinical_corpus"):
        rows = document["tables"][key]["rows"]
        assert [r["implementation"].split(" (")[0] for r in rows] == [
            "plain loop", "ingest stage, decode: full", "ingest stage, decode: reduced",
            "ingest stage, decode: reduced, 3x the files"]
    clinical = document["tables"]["clinical_corpus"]["rows"]
    assert [r["files"] for r in clinical] == [1, 1, 1, 3]  # --clinical-files 1, and 3x
    assert document["figures"]["clinical_corpus"]["images"] == 1
    assert document["figures"]["clinical_corpus"]["decode_reduced"] == 1  # a 2500 x 2048 radiograph
    (syntax,) = document["tables"]["clinical_by_syntax"]["rows"]
    assert syntax["files"] == 1 and syntax["worst_p99"] <= 4
    assert len(document["tables"]["memory"]["rows"]) == 5


def _check_deidentify(document: dict) -> None:
    clinical = document["tables"]["clinical_corpus"]["rows"]
    assert [r["files"] for r in clinical] == [1, 1]
    assert document["figures"]["clinical_corpus"]["outputs"] == {"stage": 1, "dicognito": 1}


def _check_train(document: dict) -> None:
    rows = document["tables"]["train"]["rows"]
    assert [(r["side"], r["network"]) for r in rows] == [
        ("seed model.fit", "seed_cnn"), ("train stage", "seed_cnn"), ("bare train step", "seed_cnn")]
    assert rows[0]["speed_up"] == 1.0 and all(r["peak_rss_mib"] > 100 for r in rows)  # TensorFlow


def _check_series(document: dict) -> None:
    for key in ("ct_sample", "clinical_ct"):
        rows = document["tables"][key]["rows"]
        assert [r["implementation"].split(" (")[0] for r in rows] == ["plain loop", "ingest stage"]
        assert rows[0]["vs_plain"] == 1.0 and all(r["peak_per_series"] > 0 for r in rows)
    sample, clinical = document["figures"]["ct_sample"], document["figures"]["clinical_ct"]
    # One copy of the CT sample: 24 intact series and 5 broken ones (ct_sample.DEFECTS). The plain
    # loop stacks all but the one whose coronal localizer has another shape; the stage, strict,
    # keeps the 24 and the localizer's (the localizer set aside) and refuses the other 4.
    assert sample["series"] == 29 and sample["plain"]["stacked"] == 28 and sample["plain"]["raised"] == 1
    assert sample["stage"]["series"] == 25 and sample["stage"]["skipped_not_images"] == 1
    # --series 2 --slices 8 10: 18 slices of 512 x 512, the largest series 10 x 1 MiB in float32.
    assert clinical["files"] == 18 and clinical["stage"]["series"] == clinical["plain"]["stacked"] == 2
    assert clinical["stage"]["series_slices"] == 18 and clinical["largest_series_mib"] == 10.0
    train = document["tables"]["train3d"]["rows"]
    assert [(r["side"].split(" (")[0], r["network"]) for r in train] == [
        ("train stage", "resnet3d_small"), ("bare train step", "resnet3d_small")]
    assert all(r["input"] == "32x64x64x1" and r["batch_size"] == 2 and r["images_per_s"] > 0 for r in train)


def _check_medmnist(document: dict) -> None:
    assert document["figures"]["images"] == 3 * PER_SPLIT
    assert document["figures"]["images_lost"] == []
    assert document["figures"]["leak_scanner_exit"] == 0 and document["figures"]["fake_phi_found"] == {}
    assert document["figures"]["test_metrics"]["n_test"] == PER_SPLIT
    assert [t["name"] for t in document["targets"]][:2] == ["test AUC >= 0.92", "test ACC >= 0.87"]


def _check_serving(document: dict) -> None:
    rows = document["tables"]["serving"]["rows"]
    assert [r["clients"] for r in rows] == [1, 8]
    assert all(r["failures"] == 0 and r["throughput_rps_min"] > 0 for r in rows)
    runs = document["figures"]["runs"]
    assert [(r["repeat"], r["clients"]) for r in runs] == [(0, 1), (0, 8)]
    assert all(r["requests"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0 for r in runs)
    assert [t["name"] for t in document["targets"]] == [
        "8 clients >= 3x the throughput of 1", "p99 latency under 8 clients reported"]
    assert document["targets"][1]["met"]


def _check_burned_in(document: dict) -> None:
    from dicomflow.devtools.burned_in_corpus import make_image

    truths = [make_image(index, seed=0)[1] for index in range(BURNED_IN_IMAGES)]
    figures = document["figures"]
    assert figures["images"] == BURNED_IN_IMAGES and figures["real_originals"] == {}
    assert figures["planted_fields"] + figures["invisible_fields"] == sum(len(t.planted) for t in truths)
    assert figures["clean_images"] == sum(t.clean for t in truths) >= 1
    assert 0 <= figures["found"] <= figures["planted_fields"]
    rows = document["tables"]["images"]["rows"]
    assert sum(r["images"] for r in rows) == BURNED_IN_IMAGES
    assert sum(r["labels"] for r in rows) + figures["invisible_labels"] == sum(len(t.labels) for t in truths)
    assert sum(r["fields"] for r in document["tables"]["recall_by_size"]["rows"]) == figures["planted_fields"]
    assert [t["name"] for t in document["targets"]][0] == "recall of planted fields >= 99%"


def _check_pacs(document: dict) -> None:
    rows = document["tables"]["paths"]["rows"]
    assert [row["path"] for row in rows] == ["predict --dicom-out", "listen (C-STORE in, SR + SEG out)"]
    assert all(row["files"] == row["results"] == 4 for row in rows)  # every image answered both ways
    assert all(row["rate_min"] > 0 for row in rows)
    assert document["targets"][0]["name"].startswith("listen >= 0.8x predict's images/s (median of 1")
    assert document["figures"]["median_ratio"] == document["figures"]["paired_ratios"][0] > 0


BURNED_IN_IMAGES = 8  # one clean image among them (every seventh), no 2048x2500 radiograph needed
slow = pytest.mark.slow
CASES = [  # benchmark, tiny options, tables it records, what else must hold
    pytest.param("validate", ["--rows", "600", "--repeat", "1"], ["validate"], _check_validate,
                 id="validate", marks=slow),
    pytest.param("ingest_memory", ["--sides", "128"], ["memory"], _check_ingest_memory,
                 id="ingest_memory", marks=slow),
    pytest.param("scale", ["--sizes", "10", "--rows", "600", "--patients", "100"],
                 ["ingest", "validate_split"], _check_scale, id="scale", marks=slow),
    pytest.param("ingest", ["--files", "10", "--clinical-files", "1", "--memory-sides", "128"],
                 ["replicated_sample", "clinical_corpus", "clinical_by_syntax", "memory"], _check_ingest, id="ingest",
                 marks=slow),
    pytest.param("deidentify", ["--files", "10", "--clinical-files", "1", "--repeat", "1"],
                 ["replicated_sample", "clinical_corpus"], _check_deidentify, id="deidentify",
                 marks=slow),
    pytest.param("train", ["--networks", "seed_cnn", "--epochs", "1", "--repeat", "1",
                           "--train-images", "32", "--val-images", "16"], ["train"], _check_train,
                 id="train", marks=slow),
    pytest.param("series", ["--sample-series", "1", "--series", "2", "--slices", "8", "10",
                            "--train-volumes", "4", "--batch-size", "2"],
                 ["ct_sample", "clinical_ct", "train3d"], _check_series, id="series", marks=slow),
    pytest.param("burned_in", ["--images", str(BURNED_IN_IMAGES), "--no-real"],
                 ["recall_by_kind", "recall_by_size", "recall_by_polarity", "recall_by_font",
                  "recall_by_field", "recall_by_form", "images", "baseline", "cost", "misses"],
                 _check_burned_in, id="burned_in"),
    pytest.param("pacs", ["--files", "4", "--rows", "128", "--batch", "2", "--repeat", "1"], ["paths"], _check_pacs,
                 id="pacs", marks=slow),
    pytest.param("serving", ["--seconds", "3", "--repeat", "1", "--rows", "128"], ["serving"],
                 _check_serving, id="serving", marks=slow),
    pytest.param("medmnist", ["--npz", str(NPZ), "--per-split", str(PER_SPLIT),
                              "--set", "ingest.image_size=16", "--set", "train.architecture=seed_cnn",
                              "--set", "train.epochs=1", "--set", "train.ensemble=1",
                              "--set", "train.batch_size=8",
                              # A one-epoch model on 6 images calls them all one class at 0.5,
                              # which evaluate refuses as degenerate; Youden's J on val does not.
                              "--set", "evaluate.threshold_method=youden"],
                 ["results", "stages"], _check_medmnist, id="medmnist",
                 marks=[slow, pytest.mark.skipif(not NPZ.is_file(), reason=f"{NPZ} not found")]),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "options", "tables", "check"), CASES)
def test_benchmark_runs_on_tiny_data(name: str, options: list[str], tables: list[str],
                                     check: Callable[[dict], None], tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, "-m", f"bench.{name}", *options, "--json", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    document = json.loads(out.read_text(encoding="utf-8"))
    assert document["benchmark"] == name
    assert document["machine"]["cpus"] == os.cpu_count() and document["commit"]
    assert list(document["tables"]) == tables
    # Printed: each table as a header, a rule and one line per row, and nothing else in that shape.
    lines = done.stdout.splitlines()
    assert sum(line.startswith("|---") for line in lines) == len(tables)
    assert sum(line.startswith("| ") for line in lines) == sum(
        len(document["tables"][key]["rows"]) + 1 for key in tables)
    for key in tables:
        numbers = [v for row in document["tables"][key]["rows"] for v in row.values()
                   if isinstance(v, float)]
        assert all(math.isfinite(v) for v in numbers), f"table {key}: {numbers}"
    check(document)


class TestRunMeasured:
    """The one way the benchmarks measure memory, against what a child allocates."""

    def test_peak_of_a_child_that_holds_memory(self, tmp_path: Path) -> None:
        script = "import time, numpy as np; a = np.ones(64 * 2**20 // 8); time.sleep(0.3)"
        base = run_measured([sys.executable, "-c", "import time, numpy; time.sleep(0.3)"],
                            cwd=tmp_path, log=tmp_path / "base.log").memory
        held = run_measured([sys.executable, "-c", script], cwd=tmp_path, log=tmp_path / "held.log").memory
        assert 60 <= held.rss - base.rss <= 72  # 64 MiB of ones, touched
        assert 60 <= held.root - base.root <= 72

    def test_a_short_peak_is_seen_by_the_kernel_high_water_mark(self, tmp_path: Path) -> None:
        # 128 MiB held for about 1 ms, then freed: the sampled RSS misses it, VmHWM does not.
        script = ("import time, numpy as np; a = np.ones(128 * 2**20 // 8); del a; "
                  "time.sleep(0.3)")
        memory = run_measured([sys.executable, "-c", script], cwd=tmp_path, log=tmp_path / "log").memory
        assert memory.root >= 128

    def test_workers_are_summed(self, tmp_path: Path) -> None:
        child = "import time, numpy as np; a = np.ones(48 * 2**20 // 8); time.sleep(1.0)"
        parent = (f"import subprocess, sys; ps = [subprocess.Popen([sys.executable, '-c', {child!r}]) "
                  "for _ in range(2)]; [p.wait() for p in ps]")
        memory = run_measured([sys.executable, "-c", parent], cwd=tmp_path, log=tmp_path / "log").memory
        assert memory.worker >= 48 and memory.rss >= 2 * 48

    def test_a_failed_command_ends_the_benchmark_with_its_output(self, tmp_path: Path) -> None:
        with pytest.raises(SystemExit, match="exit 3"):
            run_measured([sys.executable, "-c", "print('why'); raise SystemExit(3)"], cwd=tmp_path,
                         log=tmp_path / "log")
        assert (tmp_path / "log").read_text() == "why\n"

    def test_quarters_of_the_root_curve(self) -> None:
        memory = TreeMemory(root_curve=[(0.0, 10.0), (1.0, 30.0), (2.0, 20.0), (4.0, 50.0)])
        assert [memory.root_at(f) for f in (0.25, 0.5, 0.75, 1.0)] == [30.0, 30.0, 30.0, 50.0]
        assert TreeMemory().root_at(0.5) == 0.0


class TestReport:
    def test_table_printed_and_written_as_numbers(self, tmp_path: Path, capsys) -> None:
        report = Report("demo", argparse.Namespace(files=3, workdir=tmp_path))
        rows = [{"name": "a", "mib": 1.75}, {"name": "b", "mib": "n/a"}]
        report.table("t", [Column("name", "name"), Column("MiB", "mib", "{:.1f}")], rows, title="## T")
        line = report.target("x < 2", True, 1.75)
        report.write(tmp_path / "out.json")
        printed = capsys.readouterr().out.splitlines()
        assert printed == ["", "## T", "", "| name | MiB |", "|---|---:|", "| a | 1.8 |", "| b | n/a |"]
        document = json.loads((tmp_path / "out.json").read_text())
        assert document["tables"]["t"] == {"title": "## T", "rows": rows}
        assert document["args"] == {"files": 3, "workdir": str(tmp_path)}
        assert line == "x < 2: met (1.75)"
        assert document["targets"] == [{"name": "x < 2", "met": True, "value": 1.75, "line": line}]


def test_work_folder_removed_unless_kept(tmp_path: Path) -> None:
    with work_folder("demo") as work:
        (work / "file").write_text("x")
    assert not work.exists()
    with work_folder("demo", workdir=tmp_path / "kept") as work:
        (work / "file").write_text("x")
    assert (tmp_path / "kept" / "file").read_text() == "x"
