"""The Orthanc fixture itself: authenticated, loopback only, and back with its storage after a restart."""

from __future__ import annotations

import numpy as np
import requests


def test_it_refuses_anonymous_requests_and_keeps_what_it_stored_across_a_restart(orthanc_factory, make_dicom, tmp_path):
    server = orthanc_factory()
    assert requests.get(f"{server.url}/system", timeout=10).status_code == 401
    path = make_dicom(tmp_path / "a.dcm", np.arange(64, dtype=np.uint8).reshape(8, 8), PatientID="P1")
    server.upload(path)
    assert len(server.instances()) == 1
    server.stop()
    server.start()
    assert len(server.instances()) == 1
    studies = requests.get(f"{server.dicomweb_url}/studies", auth=server.auth, timeout=10).json()
    assert [study["00100020"]["Value"] for study in studies] == [["P1"]]
