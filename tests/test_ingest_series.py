"""The ingest stage with ``ingest.unit: series`` on the embedded CT sample
(dicomflow/devtools/ct_sample.py): one row per series, each broken series handled as its policy
says, every file accounted for once. What each broken series must give comes from the sample's
own plan (its summary: which files carry which defect), not from the reader under test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from dicomflow.config import layout
from dicomflow.config.params import SERIES_POLICIES, ParamsError, load_params
from dicomflow.devtools.ct_sample import generate_ct_sample
from stages import ingest

PATIENTS = 3  # 3 intact series and the 5 broken ones


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    data = tmp_path_factory.mktemp("ct") / "data"
    return data, generate_ct_sample(data, patients=PATIENTS)


@pytest.fixture
def workdir(tmp_path, monkeypatch, repo_params_file, sample):
    data, _ = sample
    (tmp_path / "data").symlink_to(data, target_is_directory=True)
    params = yaml.safe_load(repo_params_file.read_text(encoding="utf-8"))
    params["ingest"].update(unit="series", max_quarantine_fraction=1.0, workers=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set(workdir: Path, **series: object) -> None:
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["ingest"]["series"].update(series)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def _outputs(workdir: Path) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame, pd.DataFrame, dict]:
    out = workdir / "outputs" / "ingest"
    return (np.load(out / layout.IMAGES), pd.read_parquet(out / layout.INGEST_INDEX),
            pd.read_csv(out / layout.INGEST_QUARANTINE, dtype=str),
            pd.read_parquet(out / layout.SERIES_FILES),
            json.loads((workdir / "reports" / "ingest.json").read_text(encoding="utf-8")))


def _labels(data: Path) -> dict[str, int]:
    with open(data / "labels.csv", newline="", encoding="utf-8") as stream:
        return {row["series_instance_uid"]: int(row["label"]) for row in csv.DictReader(stream)}


@pytest.mark.slow
@pytest.mark.parametrize("policy", SERIES_POLICIES)
def test_each_broken_series_goes_where_its_policy_says_and_every_file_once(workdir, sample, policy):
    data, summary = sample
    _set(workdir, policy=policy)

    ingest.main()

    volumes, index, quarantine, slice_files, metrics = _outputs(workdir)
    refused = {b.series_uid: b for b in summary.broken if b.outcome(policy)}
    kept = set(_labels(data)) - set(refused)
    assert set(index["series_instance_uid"]) == kept
    assert volumes.shape == (len(kept), 32, 64, 64, 1) and volumes.dtype == np.uint8
    # Each file of a refused series is in the quarantine with that series' reason; the localizer
    # is set aside (a skip) whatever the policy; nothing else is quarantined.
    localizer = summary.by_defect("localizer")
    expected = {path: "localizer" for path in localizer.files}
    files = {p.relative_to(data).as_posix() for p in data.rglob("*.dcm")}
    for uid, broken in refused.items():
        folder = str(Path(broken.files[0]).parent)
        expected.update({path: broken.outcome(policy) for path in files if path.startswith(folder + "/")})
    assert dict(zip(quarantine["path"], quarantine["reason"])) == expected
    # Every .dcm file is a slice of a kept volume or in the quarantine, once.
    listed = [*slice_files["source_path"], *quarantine["path"]]
    copy = summary.by_defect("duplicate_copy")
    dropped = 1 if policy != "strict" else 0  # the byte-identical copy, dropped by dedupe
    assert len(listed) == len(set(listed)) == len(files) - dropped
    assert set(slice_files["row_key"]) == set(index["row_key"])
    assert metrics["series"] == len(kept) and metrics["series_duplicates_dropped"] == dropped
    assert metrics["series_filled_slices"] == (1 if policy == "fill_gaps" else 0)
    if policy != "strict":
        row = index[index["series_instance_uid"] == copy.series_uid].iloc[0]
        assert row["series_duplicates_identical"] == 1 and row["series_files"] == row["number_of_frames"] + 1


@pytest.mark.slow
def test_labels_belong_to_the_series_and_the_diagnosis_is_in_the_index(workdir, sample):
    data, summary = sample
    _set(workdir, policy="fill_gaps")

    ingest.main()

    _, index, _, slice_files, _ = _outputs(workdir)
    labels = _labels(data)
    assert {uid: label for uid, label in zip(index["series_instance_uid"], index["label"])} == \
        {uid: labels[uid] for uid in index["series_instance_uid"]}
    gap = index[index["series_instance_uid"] == summary.by_defect("gap").series_uid].iloc[0]
    assert gap["series_missing"] == 1 and gap["series_filled"] == 1
    assert (index["series_spacing_mm"] == 5.0).all() and (index["series_orientation_deviation_deg"] == 0).all()
    assert (index["sop_instance_uid"] == "").all() and (index["modality"] == "CT").all()
    # Slices listed in geometric order: their count is each row's number of frames.
    counts = slice_files.groupby("row_key").size()
    assert dict(counts) == dict(zip(index["row_key"], index["number_of_frames"]))


@pytest.mark.slow
def test_the_series_uid_is_a_label_key(workdir, sample):
    data, _ = sample
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["ingest"]["label_key"] = "series_instance_uid"
    params["ingest"]["series"]["policy"] = "fill_gaps"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    ingest.main()

    _, index, quarantine, _, _ = _outputs(workdir)
    labels = _labels(data)
    pairs = zip(index["series_instance_uid"], index["label"])
    assert len(index) > 0 and all(labels[uid] == label for uid, label in pairs)
    assert "no_label" not in set(quarantine["reason"])


@pytest.mark.slow
def test_one_worker_writes_what_two_write(workdir):
    ingest.main()
    two = _outputs(workdir)
    path = workdir / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["ingest"]["workers"] = 1
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    ingest.main()
    one = _outputs(workdir)

    np.testing.assert_array_equal(one[0], two[0])
    for a, b in zip(one[1:4], two[1:4]):
        pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize(("series", "message"), [
    ({"window": "brain"}, r"'ingest\.series\.window' must be one of lung, mediastinum, bone or \[center, width\]"),
    ({"window": [40, 0]}, r"'ingest\.series\.window' must be \[center, width\] with a positive width"),
    ({"volume_size": [32, 64]}, r"'ingest\.series\.volume_size' must be \[d, h, w\]"),
    ({"spacing_mm": [5, 0, 5]}, r"'ingest\.series\.spacing_mm' must be \[z, y, x\], three positive"),
    ({"policy": "lenient"}, r"'ingest\.series\.policy' must be one of 'strict', 'dedupe', 'fill_gaps'"),
])
def test_a_bad_series_setting_is_one_line_naming_it(tmp_path, repo_params_file, series, message):
    params = yaml.safe_load(repo_params_file.read_text(encoding="utf-8"))
    params["ingest"]["series"].update(series)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    with pytest.raises(ParamsError, match=message):
        load_params("ingest", path)
