"""The loop a hospital runs, end to end with a real Orthanc (issue 31, item 5).

The tiny sample is stored in Orthanc (as a modality would have), pulled back by its labels table
over DICOMweb into a fresh project, versioned with ``dvc add data``, run through ``dvc repro``;
the champion then predicts on the pulled files with ``--dicom-out``, the SR and SEG objects are
pushed to Orthanc by STOW-RS, found again by a QIDO-RS query and read back: the probability the
PACS holds is the one in predictions.csv.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pandas as pd
import pydicom
import pytest
import requests
import yaml
from pydicom.sr.codedict import codes
from pipeline_repo import clean_env, copy_pipeline, run

pytestmark = pytest.mark.slow  # a whole dvc repro on what was pulled (about 2 minutes on 2 cores)

MODEL = "dicomflow-classifier"


def _dicomflow(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dicomflow", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(scope="module")
def loop(orthanc_factory, tmp_path_factory):
    """Orthanc seeded with the tiny sample; a project that pulled it, ran the pipeline, predicted
    with --dicom-out and pushed the results. Returns what the tests read."""
    orthanc = orthanc_factory()
    env = clean_env("the PACS round trip: the tiny sample is not the embedded one")
    env.update(DICOMFLOW_PACS_USERNAME=orthanc.user, DICOMFLOW_PACS_PASSWORD=orthanc.password)

    sample = tmp_path_factory.mktemp("modality") / "sample"
    run([sys.executable, "-m", "dicomflow", "sample-data", str(sample), "--patients", "40"], sample.parent, env)
    # The sample holds broken files on purpose (ingest's quarantine has work to do); a PACS refuses
    # some of them at the door. What it took is what a pull can bring back.
    sent = []
    for path in sorted(sample.rglob("*.dcm")):
        answer = requests.post(f"{orthanc.url}/instances", data=path.read_bytes(), auth=orthanc.auth, timeout=60)
        if answer.ok:
            sent.append(path)
    assert len(sent) > 50

    root = tmp_path_factory.mktemp("project")
    params = copy_pipeline(root)
    params["train"].update(epochs=10, batch_size=8)  # as tests/pipeline_repo.py: a model that registers
    params["evaluate"]["min_validation_auc"] = 0.5
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/outputs/\n/mlflow.db\n/mlartifacts/\n__pycache__/\n/results/\n")
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)

    pulled = _dicomflow(["pacs", "pull", "--from", orthanc.dicomweb_url, "--labels", str(sample / "labels.csv"),
                         "--out", "data"], root, env)
    # The labels name studies whose only files the PACS refused: the pull lists exactly those, with
    # the PACS's reason, exits 1, and keeps everything else.
    refused_keys = set(pd.read_csv(sample / "labels.csv", dtype=str)["accession_number"]) - {
        pydicom.dcmread(path, stop_before_pixels=True).AccessionNumber for path in sent}
    report = pd.read_csv(root / "pull_report.csv", dtype=str, keep_default_na=False)
    assert pulled.returncode == (1 if refused_keys else 0), pulled.stderr[-3000:]
    assert set(report.loc[report["reason"] != "", "value"]) == refused_keys
    (root / "data" / "labels.csv").write_bytes((sample / "labels.csv").read_bytes())
    run(["dvc", "add", "-q", "data"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "pulled from the PACS"], root, env)
    run(["dvc", "repro"], root, env)

    predicted = _dicomflow(["predict", "data", "--output", "predictions.csv", "--dicom-out", "results"], root, env)
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    pushed = _dicomflow(["pacs", "push", "results", "--to", orthanc.dicomweb_url, "--report", "push.csv"],
                        root, env)
    assert pushed.returncode == 0, pushed.stderr[-3000:]
    return {"orthanc": orthanc, "root": root, "sent": sent, "sample": sample,
            "logs": pulled.stderr + predicted.stderr + pushed.stderr}


def test_the_pull_brought_back_every_stored_image_of_a_labelled_study_bit_for_bit(loop):
    labelled = set(pd.read_csv(loop["sample"] / "labels.csv", dtype=str)["accession_number"])
    stored: dict[str, bytes] = {}  # Orthanc keeps the first of two files with one SOP Instance UID
    for path in loop["sent"]:
        ds = pydicom.dcmread(path)
        if ds.get("AccessionNumber") in labelled:
            stored.setdefault(ds.SOPInstanceUID, ds.get("PixelData"))
    pulled = [pydicom.dcmread(path) for path in sorted((loop["root"] / "data").rglob("*.dcm"))]
    assert sorted(ds.SOPInstanceUID for ds in pulled) == sorted(stored)
    for ds in pulled:
        assert ds.get("PixelData") == stored[ds.SOPInstanceUID]


def test_the_pacs_holds_each_images_result_with_the_probability_predict_wrote(loop):
    orthanc = loop["orthanc"]
    predictions = pd.read_csv(loop["root"] / "predictions.csv", keep_default_na=False)
    scored = predictions[predictions["dicom_results"].str.endswith(".dcm")]  # an SR and a SEG written
    assert len(scored) > 40
    assert (predictions.loc[predictions["error"] != "", "dicom_results"] != "").all()  # refused: a reason
    found = requests.get(f"{orthanc.dicomweb_url}/instances", params={"Modality": "SR"}, auth=orthanc.auth,
                         timeout=60).json()
    assert len(found) == len(scored)
    probability_of = {}
    for entry in found:
        study, series, instance = (entry[tag]["Value"][0] for tag in ("0020000D", "0020000E", "00080018"))
        body = requests.get(f"{orthanc.dicomweb_url}/studies/{study}/series/{series}/instances/{instance}",
                            headers={"Accept": 'multipart/related; type="application/dicom"'},
                            auth=orthanc.auth, timeout=60)
        report = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(io.BytesIO(_first_part(body))))
        source = report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        probability_of[source] = _probability(report)
    data = loop["root"] / "data"  # predict was given one folder: its CSV names files relative to it
    uid_of = {path.relative_to(data).as_posix(): pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
              for path in data.rglob("*.dcm")}
    for row in scored.itertuples():
        assert probability_of[uid_of[row.path]] == pytest.approx(float(row.probability), abs=1e-6)
    segmentations = requests.get(f"{orthanc.dicomweb_url}/instances", params={"Modality": "SEG"},
                                 auth=orthanc.auth, timeout=60).json()
    assert len(segmentations) == len(scored)


def test_no_log_line_of_the_loop_names_a_patient(loop):
    sample_ids = {pydicom.dcmread(path, stop_before_pixels=True).PatientID for path in loop["sent"]}
    accessions = set(pd.read_csv(loop["sample"] / "labels.csv", dtype=str)["accession_number"])
    for value in sample_ids | accessions:
        assert value not in loop["logs"]
    assert loop["orthanc"].password not in loop["logs"]


def _first_part(response: requests.Response) -> bytes:
    """The first DICOM part of a multipart/related WADO-RS answer."""
    response.raise_for_status()
    boundary = response.headers["Content-Type"].split("boundary=")[1].split(";")[0].strip('"')
    part = response.content.split(f"--{boundary}".encode())[1]
    return part.split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


def _probability(report: hd.sr.Comprehensive3DSR) -> float:
    """The Probability (DCM 122157) of the report's one image-level measurement group."""
    group, = report.content.get_image_measurement_groups()
    probability, = group.get_measurements(name=codes.DCM.Probability)
    return float(probability.value)
