"""Benchmark: the listener's images/s from C-STORE received to SR stored, against predict on the same files.

Issue 31, item 7: ``dicomflow listen`` closes the loop a modality opens (images in by C-STORE,
results out by C-STORE), and it should cost little beyond the network: target at least 0.8x the
rate of ``dicomflow predict --dicom-out`` on the same files, with the model in memory, on 2 cores.

Both paths run the same model (the project's ``train.architecture`` at ``ingest.image_size``,
untrained weights: the work per image is the same, logged with ``log_classifier``) and write the
same objects per image (an SR and a Grad-CAM SEG, :mod:`dicomflow.pacs.results`):

* **predict**: ``predict_files`` then ``write_dicom_results`` on the files, in this process, the
  model loaded beforehand (what ``dicomflow predict --dicom-out`` does once it has started; its
  start, mostly importing TensorFlow, is left out, or the comparison would flatter the listener).
* **listen**: a :class:`dicomflow.pacs.listener.Listener` in this process (the model in memory);
  a modality in its own process sends every file on one association (C-STORE, as fast as the
  answers come); the destination, a pynetdicom storage SCP in a third process, notes when each SR
  arrives. The rate is files / (last SR stored - first C-STORE sent): receiving, spooling,
  scoring in batches, writing and sending included.

Runs alternate ``--repeat`` times; ranges are printed, and the target is judged on the median of
the ratios of each listen run to the predict run just before it.

    .venv/bin/python -m bench.pacs [--files 96] [--rows 1024] [--batch 16] [--repeat 2]
        [--json FILE] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Column, Report, add_output_args, bench_env, work_folder
from bench.serving import dicom_file, logged_model

TARGET_RATIO = 0.8

# The destination: a storage SCP that writes one line per instance it keeps, "<time> <SOP Class UID>".
DESTINATION = """
import sys, time
from pynetdicom import AE, evt, AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
log = open(sys.argv[2], "a", buffering=1)
def stored(event):
    log.write(f"{time.time()} {event.request.AffectedSOPClassUID}\\n")
    return 0x0000
ae = AE(ae_title="DESTINATION")
ae.supported_contexts = AllStoragePresentationContexts
ae.add_supported_context(Verification)
ae.start_server(("127.0.0.1", int(sys.argv[1])), block=True, evt_handlers=[(evt.EVT_C_STORE, stored)])
"""

# The modality: every file on one association, printing the time of its first C-STORE.
MODALITY = """
import sys, time
from pathlib import Path
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation
files = sorted(Path(sys.argv[2]).glob("*.dcm"))
ae = AE(ae_title="MODALITY")
ae.add_requested_context(DigitalXRayImageStorageForPresentation)
association = ae.associate("127.0.0.1", int(sys.argv[1]), ae_title="DICOMFLOW")
assert association.is_established, "the listener refused the association"
datasets = [dcmread(path) for path in files]
print(time.time(), flush=True)
for ds in datasets:
    status = association.send_c_store(ds)
    assert status and status.Status == 0, status
association.release()
"""


def study_file(rows: int, seed: int) -> bytes:
    """bench.serving's radiograph with the patient and study attributes a result object copies."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(dicom_file(rows, seed)))
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"BENCH^{seed}", f"B{seed:05d}", "", "O"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", f"A{seed:05d}"
    ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber, ds.PatientOrientation = "", 1, 1, ["L", "F"]
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def predict_rate(model, files: list[Path], out: Path) -> dict:
    """predict_files + write_dicom_results on ``files``, the model in memory: files/s."""
    from dicomflow.pacs.results import write_dicom_results
    from dicomflow.serving.predict import predict_files

    started = time.perf_counter()
    predictions = predict_files(model, files, names=[path.name for path in files])
    written = write_dicom_results(model, files, predictions, out, model_name="bench", model_version="1")
    seconds = time.perf_counter() - started
    return {"path": "predict --dicom-out", "files": len(files), "results": sum(len(w) == 2 for w in written),
            "seconds": seconds, "rate": len(files) / seconds}


def listen_rate(model, files_dir: Path, spool: Path, log: Path, *, batch: int, n_files: int) -> dict:
    """Files sent by a modality process to an in-process Listener, results to a destination process."""
    from dicomflow.pacs.connection import parse_address
    from dicomflow.pacs.listener import Listener

    destination_port, listener_port = free_port(), free_port()
    arrivals = log.with_suffix(".arrivals")
    arrivals.write_text("")
    env = bench_env()
    destination = subprocess.Popen([sys.executable, "-c", DESTINATION, str(destination_port), str(arrivals)],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.0)  # the destination's import of pynetdicom
        address = parse_address(f"dicom://DESTINATION@127.0.0.1:{destination_port}", {})
        listener = Listener(spool=spool, destination=address, model=model, model_name="bench", model_version="1",
                            allow=["MODALITY"], port=listener_port, batch=batch, queue=max(256, n_files))
        with listener:
            sender = subprocess.run([sys.executable, "-c", MODALITY, str(listener_port), str(files_dir)], env=env,
                                    capture_output=True, text=True, timeout=1800)
            if sender.returncode != 0:
                raise SystemExit(f"the modality failed: {sender.stderr[-2000:]}")
            first_sent = float(sender.stdout.split()[0])
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                reports = [line for line in arrivals.read_text().splitlines() if line.endswith(".88.34")]
                if len(reports) >= n_files:
                    break
                time.sleep(0.1)
            else:
                raise SystemExit(f"only {len(reports)} of {n_files} SRs arrived")
    finally:
        destination.terminate()
        destination.wait(timeout=30)
    last = max(float(line.split()[0]) for line in reports)
    seconds = last - first_sent
    return {"path": "listen (C-STORE in, SR + SEG out)", "files": n_files, "results": len(reports),
            "seconds": seconds, "rate": n_files / seconds}


def span(values: list[float], fmt: str = "{:.2f}") -> str:
    return fmt.format(min(values)) if len(values) == 1 else f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.pacs", description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=96, help="images sent (default 96)")
    parser.add_argument("--rows", type=int, default=1024, help="image size, rows = columns (default 1024)")
    parser.add_argument("--batch", type=int, default=16, help="the listener's --batch (default 16)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each path, alternating (default 2)")
    add_output_args(parser)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    report = Report("pacs", args)
    import mlflow

    with work_folder("pacs", workdir=args.workdir, keep=args.keep) as work:
        files_dir = work / "images"
        files_dir.mkdir(exist_ok=True)
        for seed in range(args.files):
            path = files_dir / f"{seed:05d}.dcm"
            if not path.exists():
                path.write_bytes(study_file(args.rows, seed))
        files = sorted(files_dir.glob("*.dcm"))[:args.files]
        model_folder = work / "model"
        model_folder.mkdir(exist_ok=True)
        model = mlflow.pyfunc.load_model(str(logged_model(model_folder)))
        predict_rate(model, files[:args.batch], work / "warm-up")  # TensorFlow's first traces, both paths
        runs: dict[str, list[dict]] = {"predict": [], "listen": []}
        for repeat in range(args.repeat):
            runs["predict"].append(predict_rate(model, files, work / f"predict-{repeat}"))
            runs["listen"].append(listen_rate(model, files_dir, work / f"spool-{repeat}", work / f"listen-{repeat}.log",
                                              batch=args.batch, n_files=len(files)))
    rows = []
    for key, measured in runs.items():
        rows.append({"path": measured[0]["path"], "files": measured[0]["files"],
                     "results": min(run["results"] for run in measured),
                     "seconds": span([run["seconds"] for run in measured], "{:.1f}"),
                     "rate": span([run["rate"] for run in measured]),
                     "rate_min": min(run["rate"] for run in measured),
                     "rate_max": max(run["rate"] for run in measured)})
    report.table("paths", [Column("path", "path"), Column("files", "files"), Column("results (SR+SEG)", "results"),
                           Column("seconds", "seconds"), Column("images/s", "rate")], rows,
                 title=f"{args.files} radiographs {args.rows}x{args.rows}, 12-bit, uncompressed; "
                       f"listener batch {args.batch}")
    # Each listen run beside the predict run just before it (the runs alternate): the machine's
    # load drifts over a run, and a pair sees the same load; the median pair is the figure.
    paired = [listen["rate"] / predict["rate"] for listen, predict in zip(runs["listen"], runs["predict"])]
    median = statistics.median(paired)
    report.figures.update(paired_ratios=paired, median_ratio=median, runs=runs)
    report.target(f"listen >= {TARGET_RATIO}x predict's images/s (median of {len(paired)} alternating pairs; "
                  f"pairs {min(paired):.2f}-{max(paired):.2f}x)", median >= TARGET_RATIO, median)
    report.print_targets()
    report.write(args.json)


if __name__ == "__main__":
    main()
