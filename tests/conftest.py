"""Small, generic fixtures shared by the stage tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

# The end-to-end tests' shared repository fixtures (``repo``, ``registry``), for every module that
# asks for them by name: a module need not import them (an import that pyflakes reads as unused).
pytest_plugins = ["pipeline_repo", "orthanc"]

REPO_ROOT = Path(__file__).resolve().parents[1]

# The modules that take longest under `make test` (each several minutes, from pytest's
# --durations of two full runs, 2026-12-06: registry's kill test 283-301 s plus a 53-61 s fixture;
# the queued-experiment module 77-108 s of set-up plus 114-129 s and 93-106 s; the pipeline
# module's 87-93 s set-up and three tests of 73-101 s each). Collected first, with the Makefile's
# --no-loadscope-reorder, they start on the two xdist workers at once instead of where xdist's
# default order (by test count) put them: the queued-experiment module, with 2 tests, last of all,
# running alone on one core at the end of the run.
LONG_MODULES = ("test_pipeline.py", "test_registry.py", "test_pipeline_queues.py", "test_fundus_pipeline.py",
                "test_ct_pipeline.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Put the tests of LONG_MODULES first, in that order; every module keeps its own order."""
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONG_MODULES.index(name) if name in LONG_MODULES else len(LONG_MODULES)

    items.sort(key=rank)  # stable: the file order of the rest, and of each module's tests, stays


@pytest.fixture
def repo_params_file() -> Path:
    """The repository's own ``params.yaml`` (read it, never write it)."""
    return REPO_ROOT / "params.yaml"


@pytest.fixture(scope="session")  # a stateless factory: module-scoped fixtures may use it too
def make_dicom() -> Callable[..., Path]:
    """Factory writing a minimal valid DICOM file (Explicit VR Little Endian) with pydicom.

    ``make_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=None, **attributes)``
    stores ``pixels`` (uint8, uint16 or int16; 2-D, or 3-D for a multi-frame image) and sets each
    keyword in ``attributes`` (e.g. ``AccessionNumber="A1"``); returns ``path``.
    """

    def _make(path: Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
              bits_stored: int | None = None, **attributes: object) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientID = "P0"
        ds.Modality = "DX"
        ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
        for keyword, value in attributes.items():
            setattr(ds, keyword, value)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        return path

    return _make
