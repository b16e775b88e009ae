"""Benchmark: what one file costs a reader process in memory, against the image's own size.

For each case below, a fresh process imports ``stages.ingest``, reads a 64 x 64 file of the same
kind (lazy imports and decoder set-up are paid once per worker, not per file), notes its peak RSS, reads one
file with ``ingest_file`` (what a worker does: read, parse, decode, display steps, fit) and notes
its peak RSS again; the difference is the file's cost. It is printed beside the stored size of
the decoded frame (Rows x Columns x samples x bytes) and as a multiple of it. The cases are the
large images of clinical archives, written here: radiographs of 2,048 and 4,096 pixels a side at
16 bits, native and RLE (JPEG 2000 and JPEG lossless cost the same after decoding), an RGB
secondary capture, and a deflated file. Target: every accepted file within 12x its decoded frame
(the file's bytes and pydicom's parsed copy, 1x each, the stored values, the float32 display
frame, 2x, and PIL's copy of it for the resize; the float64 modality and VOI steps run a
megabyte at a time), and files beyond ``ingest.max_decoded_mib`` refused before any allocation
of their size. Peaks are read from VmHWM (see ``MEASURE``).

    .venv/bin/python bench/ingest_memory.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
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

ROOT = Path(__file__).resolve().parents[1]
TARGET_MULTIPLE = 12.0
# The peak is VmHWM of /proc/self/status, not getrusage's ru_maxrss: Linux carries ru_maxrss over
# from the parent across fork and exec, so a child of a parent holding a 4096^2 image would start
# with the parent's peak and hide any file that costs less than that.
MEASURE = """
import sys
from pathlib import Path
from dicomflow.dicom.display import PixelSettings
from dicomflow.dicom.ingestion import ingest_file
def peak_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
path, warm_up = Path(sys.argv[1]), Path(sys.argv[3])
settings = PixelSettings(size=64, max_decoded_mib=int(sys.argv[2]))
ingest_file(warm_up, data_dir=warm_up.parent, settings=settings)  # lazy imports, decoder set-up
before = peak_kib()
result = ingest_file(path, data_dir=path.parent, settings=settings)
after = peak_kib()
print(after - before, result.reason or "accepted")
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


def main() -> None:
    cases = [("2048^2 native 16-bit", 2048, 1, ExplicitVRLittleEndian),
             ("2048^2 RLE 16-bit", 2048, 1, RLELossless),
             ("2048^2 deflated 16-bit", 2048, 1, DeflatedExplicitVRLittleEndian),
             ("2048^2 RGB 8-bit", 2048, 3, ExplicitVRLittleEndian),
             ("4096^2 native 16-bit", 4096, 1, ExplicitVRLittleEndian),
             ("4096^2 RLE 16-bit", 4096, 1, RLELossless)]
    limit_mib = 2048
    print("| file | decoded frame (MiB) | file (MiB) | outcome | peak RSS added (MiB) | multiple |")
    print("|---|---:|---:|---|---:|---:|")
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for name, side, samples, syntax in cases:
            path, warm_up = Path(folder) / "case.dcm", Path(folder) / "warm_up.dcm"
            frame = radiograph(path, side, samples=samples, syntax=syntax)
            radiograph(warm_up, 64, samples=samples, syntax=syntax)
            output = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(limit_mib), str(warm_up)], cwd=ROOT,
                                    capture_output=True, text=True, check=True).stdout.split()
            added_mib, outcome = int(output[0]) / 1024, output[1]
            multiple = added_mib / (frame / 2**20)
            worst = max(worst, multiple)
            print(f"| {name} | {frame / 2**20:.0f} | {path.stat().st_size / 2**20:.1f} | {outcome} | "
                  f"{added_mib:.0f} | {multiple:.1f}x |")
        path = Path(folder) / "claim.dcm"
        radiograph(path, 256)
        claim = path.read_bytes().replace(b"\x28\x00\x10\x00US\x02\x00\x00\x01",
                                          b"\x28\x00\x10\x00US\x02\x00\xff\xff")  # Rows 256 -> 65535
        path.write_bytes(claim)
        output = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(limit_mib), str(warm_up)], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split()
        print(f"| header claims 65535 x 256 | (claimed 64) | {len(claim) / 2**20:.1f} | {output[1]} | "
              f"{int(output[0]) / 1024:.0f} | - |")
    print(f"\nTarget: accepted files within {TARGET_MULTIPLE:.0f}x their decoded frame: "
          f"{'met' if worst <= TARGET_MULTIPLE else 'MISSED'} (worst {worst:.1f}x)")


if __name__ == "__main__":
    main()
