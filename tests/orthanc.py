"""A real Orthanc PACS for the tests: DIMSE and DICOMweb on loopback ports, basic auth, its own folder.

``orthanc`` (module scope) starts one from Debian's package (``tools/system-deps test`` installs
``orthanc`` and ``orthanc-dicomweb``); ``Orthanc.stop()`` and ``Orthanc.start()`` take it down and
bring it back on the same ports and storage (a destination that is down mid-run). Nothing here
listens beyond 127.0.0.1, and the configuration lives in the test's temporary folder.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# pydicom's test files in JPEG 2000, RLE, JPEG lossless and JPEG-LS: what the PACS tests send compressed
COMPRESSED = ("JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jpeg_ls_lossless.dcm")
USER, PASSWORD = "dicomflow-test", "orthanc-test-password"
ORTHANC_AET = "ORTHANC"


def free_port() -> int:
    """A TCP port nothing on loopback listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Orthanc:
    """One Orthanc process and its configuration.

    ``modalities`` maps an AE title to its (host, port): the peers Orthanc accepts associations
    from and sends C-MOVE results to (dicomflow's own AE title for C-GET and C-MOVE).
    """

    folder: Path
    modalities: dict[str, tuple[str, int]] = field(default_factory=dict)
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    aet: str = ORTHANC_AET
    user: str = USER
    password: str = PASSWORD
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def write_configuration(self) -> Path:
        configuration = {
            "Name": "dicomflow-test",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "Plugins": [str(DICOMWEB_PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            # Only the declared modalities may associate (store, find, get, move).
            "DicomAlwaysAllowEcho": False,
            "DicomAlwaysAllowStore": False,
            "DicomCheckModalityHost": True,
            "DicomModalities": {name.lower(): [name, host, port] for name, (host, port) in self.modalities.items()},
            "StableAge": 1,
            "HttpTimeout": 30,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(configuration, indent=1))
        return path

    def start(self, *, timeout_s: float = 30.0) -> Orthanc:
        """Start Orthanc (same ports and storage as before) and wait until its REST API answers."""
        if self.process is not None:
            raise RuntimeError("this Orthanc is already running")
        self.folder.mkdir(parents=True, exist_ok=True)
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(["Orthanc", str(self.write_configuration())], stdout=log,
                                        stderr=subprocess.STDOUT, cwd=self.folder)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.folder / 'orthanc.log'}")
            try:
                if requests.get(f"{self.url}/system", auth=self.auth, timeout=2).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer within {timeout_s} s; see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 10 s); its storage stays."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def instances(self) -> list[str]:
        """Orthanc's identifiers of every instance it stores."""
        return requests.get(f"{self.url}/instances", auth=self.auth, timeout=30).json()

    def tags(self, instance: str) -> dict:
        """One instance's main tags, by keyword (Orthanc's ``simplified-tags``)."""
        return requests.get(f"{self.url}/instances/{instance}/simplified-tags", auth=self.auth, timeout=30).json()

    def upload(self, path: Path) -> dict:
        """Store one file through the REST API (not through dicomflow): the test's own seeding."""
        answer = requests.post(f"{self.url}/instances", data=path.read_bytes(), auth=self.auth, timeout=60)
        answer.raise_for_status()
        return answer.json()

    def clear(self) -> None:
        """Delete every patient (and so every study and instance) it stores."""
        for patient in requests.get(f"{self.url}/patients", auth=self.auth, timeout=30).json():
            requests.delete(f"{self.url}/patients/{patient}", auth=self.auth, timeout=30).raise_for_status()


def compressed_copy(name: str, path: Path, **attributes: object) -> Path:
    """pydicom's test file ``name`` saved at ``path`` as it is encoded (its pixel data untouched), with
    a new SOP Instance UID (two of them share one) and ``attributes`` set."""
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def require_orthanc() -> None:
    """Fail (never skip) when the Debian packages are missing: `make test` installs them."""
    if shutil.which("Orthanc") is None or not DICOMWEB_PLUGIN.exists():
        pytest.fail("Orthanc or its DICOMweb plugin is missing: run tools/system-deps test "
                    "(apt-get install orthanc orthanc-dicomweb)")


@pytest.fixture(scope="module")
def orthanc_factory(tmp_path_factory):
    """``make(modalities={AET: (host, port)})`` -> a started :class:`Orthanc`; all stopped at the end."""
    require_orthanc()
    started: list[Orthanc] = []

    def make(modalities: dict[str, tuple[str, int]] | None = None) -> Orthanc:
        server = Orthanc(tmp_path_factory.mktemp("orthanc"), modalities=dict(modalities or {}))
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()
