"""Hostile files, written deterministically for the tests: what ingest, deidentify and predict
must each turn into one quarantine row (or one error cell), never a hang, a crash or a leak.

Every file starts from pydicom's own test files; each damage is one a real archive or a red team
produces: a bit-flipped RLE stream that makes the Rust decoder panic, a header claiming an image
of 65535 x 65535, a deflated data set that inflates to far more than the file, a header cut
short, file system entries that are not files, and a name that is not UTF-8.
"""

from __future__ import annotations

import io
import os
import random
import signal
import time
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

PANIC_SEED = 7  # of the bit flips below: one that makes pylibjpeg-rle panic (index out of bounds)
HEADER_FLIP_SEED = 12  # of header_flipped: pydicom then reads no element, the pixel data is whole
NON_UTF8_NAME = b"caf\xe9.dcm"  # Latin-1 "café.dcm", as an old Windows export writes it


def pydicom_file(name: str) -> bytes:
    return Path(get_testdata_file(name)).read_bytes()


def panicking_rle(seed: int = PANIC_SEED, *, modality: str | None = None) -> bytes:
    """MR_small_RLE.dcm with 1 to 8 bits flipped in its pixel data, seeded; ``modality`` replaces
    its Modality (the pixel data, and the panic, stay)."""
    content = bytearray(pydicom_file("MR_small_RLE.dcm"))
    start = len(content) - len(pydicom.dcmread(io.BytesIO(bytes(content))).PixelData)
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 8)):
        position = rng.randrange(start, len(content))
        content[position] ^= 1 << rng.randrange(8)
    if modality is None:
        return bytes(content)
    ds = pydicom.dcmread(io.BytesIO(bytes(content)))
    ds.Modality = modality
    return _saved(ds)


def _saved(ds: pydicom.Dataset, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, **kwargs)
    return buffer.getvalue()


def huge_claim() -> bytes:
    """MR_small.dcm claiming 65535 x 65535 pixels: 16 GiB as float32, from a 9 KB file."""
    ds = pydicom.dcmread(io.BytesIO(pydicom_file("MR_small.dcm")))
    ds.Rows = ds.Columns = 65535
    return _saved(ds)


def deflate_bomb(inflated_mib: int) -> bytes:
    """CT_small.dcm in Deflated Explicit VR Little Endian with ``inflated_mib`` MiB of zeros
    added in a private element: a file of a few hundred KB that inflates to that much."""
    ds = pydicom.dcmread(io.BytesIO(pydicom_file("CT_small.dcm")))
    block = ds.private_block(0x0009, "DICOMFLOW TEST", create=True)
    block.add_new(0x10, "OB", bytes(inflated_mib << 20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    return _saved(ds, enforce_file_format=True)


def header_flipped(seed: int = HEADER_FLIP_SEED) -> bytes:
    """SC_rgb_rle.dcm with 1 to 8 bits flipped between the preamble and Pixel Data, seeded."""
    content = bytearray(pydicom_file("SC_rgb_rle.dcm"))
    pixel_data = content.find(b"\xe0\x7f\x10\x00", 132)
    rng = random.Random(seed)
    for _ in range(rng.randint(1, 8)):
        content[rng.randrange(132, pixel_data)] ^= 1 << rng.randrange(8)
    return bytes(content)


def truncated_header() -> bytes:
    """CT_small.dcm cut inside its header, long before Pixel Data."""
    return pydicom_file("CT_small.dcm")[:900]


def write_hostile_folder(folder: Path, *, inflated_mib: int) -> dict[str, str]:
    """Write every hostile entry under ``folder``; returns {relative path: the reason ingest must
    give}. The non-UTF-8 name is listed as its ``\\xNN`` text."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"panic.dcm": (panicking_rle(), "undecodable"),
             "huge_claim.dcm": (huge_claim(), "too_large"),
             "deflate_bomb.dcm": (deflate_bomb(inflated_mib), "too_large"),
             "cut_header.dcm": (truncated_header(), "truncated_header"),
             "flipped_header.dcm": (header_flipped(), "corrupt_header")}
    for name, (content, _) in files.items():
        (folder / name).write_bytes(content)
    expected = {name: reason for name, (_, reason) in files.items()}
    os.mkfifo(folder / "fifo")
    (folder / "broken_link").symlink_to(folder / "nowhere")
    (folder / "loop").symlink_to(folder / "loop")
    (folder / "up").mkdir()
    (folder / "up" / "again").symlink_to(folder)  # a folder link back up the tree
    (folder / "outside").symlink_to(folder.parent.parent)  # out of the input folder
    (folder / "empty").mkdir()
    with open(os.path.join(os.fsencode(folder), NON_UTF8_NAME), "wb") as stream:
        stream.write(pydicom_file("CT_small.dcm"))
    (folder / ".hidden.dcm").write_bytes(pydicom_file("CT_small.dcm"))
    expected.update({"fifo": "not_a_file", "broken_link": "broken_link", "loop": "link_loop",
                     "up/again": "link_loop", "caf\\xe9.dcm": "non_utf8_name", ".hidden.dcm": "hidden",
                     "outside": "link_outside", "empty": "empty_folder"})
    return expected


def kill_the_child_stalled_on_a_fifo(timeout: float = 60) -> None:
    """SIGKILL the process descended from this one that waits in open() for a FIFO's writer, as
    the OOM killer would kill a reader; AssertionError when none does within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                waiting = Path(f"/proc/{pid}/wchan").read_text() == "wait_for_partner"
            except OSError:
                continue
            if waiting and _descends_from_this_process(int(pid)):
                os.kill(int(pid), signal.SIGKILL)
                return
        time.sleep(0.05)
    raise AssertionError("no child process is waiting on the FIFO")


def _descends_from_this_process(pid: int) -> bool:
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
        if pid == os.getpid():
            return True
    return False
