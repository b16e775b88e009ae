"""Benchmark: what one file costs a reader process in memory, against the image's own size.

For each case below, two fresh processes import what ingest's workers import and read a 64 x 64 file
of the same kind (lazy imports and decoder set-up are paid once per worker, not per file); the
second then reads one file with ``ingest_file`` (what a worker does: read, parse, decode, display
steps, fit). The file's cost is the second process's peak RSS less the first's, each the kernel's
high-water mark of the process (VmHWM) as ``bench.common.run_measured`` reads it (the one way every
benchmark measures memory; see bench/common.py). It is printed beside the stored size of the decoded
frame (Rows x Columns x samples x bytes) and as a multiple of it. The cases are the large images of
clinical archives, written here: radiographs of 2,048 and 4,096 pixels a side (``--sides``) at 16
bits, native and RLE (JPEG 2000 and JPEG lossless cost the same after decoding), an RGB secondary
capture, and a deflated file. Target: every accepted file within 12x its decoded frame (the file's
bytes and pydicom's parsed copy, 1x each, the stored values, the float32 display frame, 2x, and
PIL's copy of it for the resize; the float64 modality and VOI steps run a megabyte at a time), and
files beyond ``ingest.max_decoded_mib`` refused before any allocation of their size.

    .venv/bin/python -m bench.ingest_memory [--sides 2048 4096] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from bench.common import (
    ROOT,
    Column,
    Report,
    add_output_args,
    run_measured,
    work_folder,
)

TARGET_MULTIPLE = 12.0
LIMIT_MIB = 2048  # ingest.max_decoded_mib of the readers measured
# A worker's life in short: the warm-up file, then (when named) the file measured.
READER = """
import sys
from pathlib import Path
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.ingestion import ingest_file
settings = PixelSettings(size=64, max_decoded_mib=int(sys.argv[1]))
for name in sys.argv[2:]:
    path = Path(name)
    result = ingest_file(path, data_dir=path.parent, settings=settings)
print(result.reason or "accepted")
"""


def radiograph(path: Path, side: int, *, samples: int = 1, syntax: str = ExplicitVRLittleEndian) -> int:
    """A synthetic radiograph (smooth gradient plus noise, 12 bits in 16, or 8-bit RGB); returns
    the decoded frame's size in bytes."""
    rng = np.random.default_rng(side)
    gradient = np.linspace(0, 1, side)[None, :] * np.linspace(0.3, 1, side)[:, None]
    if samples == 1:
        pixels = (gradient * 3000 + rng.normal(0, 40, (side, side))).clip(0, 4095).astype(np.uint16)
        photometric, bits = "MONOCHROME2", 12
    else:
        pixels = np.repeat((gradient * 255).astype(np.uint8)[..., None], 3, axis=2)
        photometric, bits = "RGB", 8
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    ds.Modality, ds.PatientID = "DX", "BENCH"
    ds.set_pixel_data(pixels, photometric, bits)
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return pixels.nbytes


def file_cost(path: Path, warm_up: Path, folder: Path) -> tuple[float, str]:
    """Peak RSS (MiB) a reader adds by reading ``path`` after ``warm_up``, and the outcome."""
    command = [sys.executable, "-c", READER, str(LIMIT_MIB), str(warm_up)]
    log = folder / "reader.log"
    warm = run_measured(command, cwd=ROOT, log=log).memory.root
    read = run_measured([*command, str(path)], cwd=ROOT, log=log).memory.root
    return read - warm, log.read_text(encoding="utf-8").split()[-1]


def memory_table(report: Report, sides: list[int], folder: Path) -> None:
    """Measure every case in ``folder``; print the table and record the target in ``report``."""
    cases = [(f"{side}^2 {kind}", side, samples, syntax) for side in sides
             for kind, samples, syntax in (("native 16-bit", 1, ExplicitVRLittleEndian),
                                           ("RLE 16-bit", 1, RLELossless),
                                           ("deflated 16-bit", 1, DeflatedExplicitVRLittleEndian),
                                           ("RGB 8-bit", 3, ExplicitVRLittleEndian))
             if side == min(sides) or syntax != DeflatedExplicitVRLittleEndian and samples == 1]
    rows = []
    for name, side, samples, syntax in cases:
        path, warm_up = folder / "case.dcm", folder / "warm_up.dcm"
        frame = radiograph(path, side, samples=samples, syntax=syntax)
        radiograph(warm_up, 64, samples=samples, syntax=syntax)
        added, outcome = file_cost(path, warm_up, folder)
        rows.append({"file": name, "frame_mib": frame / 2**20, "file_mib": path.stat().st_size / 2**20,
                     "outcome": outcome, "added_mib": added, "multiple": added / (frame / 2**20)})
    path = folder / "claim.dcm"
    radiograph(path, 256)
    claim = path.read_bytes().replace(b"\x28\x00\x10\x00US\x02\x00\x00\x01",
                                      b"\x28\x00\x10\x00US\x02\x00\xff\xff")  # Rows 256 -> 65535
    path.write_bytes(claim)
    added, outcome = file_cost(path, warm_up, folder)
    rows.append({"file": "header claims 65535 x 256", "frame_mib": 65535 * 256 * 2 / 2**20,
                 "file_mib": len(claim) / 2**20, "outcome": outcome, "added_mib": added})
    report.table("memory", [Column("file", "file"), Column("decoded frame (MiB)", "frame_mib", "{:.0f}"),
                            Column("file (MiB)", "file_mib", "{:.1f}"), Column("outcome", "outcome"),
                            Column("peak RSS added (MiB)", "added_mib", "{:.0f}"),
                            Column("multiple", "multiple", "{:.1f}x")], rows)
    worst = max(row["multiple"] for row in rows if row["outcome"] == "accepted")
    print("\n" + report.target(f"accepted files within {TARGET_MULTIPLE:.0f}x their decoded frame "
                                "(worst multiple)", worst <= TARGET_MULTIPLE, worst))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", type=int, nargs="+", default=[2048, 4096],
                        help="radiograph sides in pixels (the deflated and RGB cases: the smallest)")
    add_output_args(parser, folders=False)
    args = parser.parse_args()
    report = Report("ingest_memory", args)
    with work_folder("ingest-memory") as folder:
        memory_table(report, args.sides, folder)
    report.write(args.json)


if __name__ == "__main__":
    main()
