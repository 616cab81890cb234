"""The sample DICOM series: valid, deterministic UIDs; a second upload to Orthanc changes nothing."""

from __future__ import annotations

import pytest
import requests
from pydicom.uid import UID

from medsam_http.dicom_samples import SAMPLES, load_samples, prepare_series
from medsam_http.orthanc import OrthancServer, is_installed


def test_blank_uids_get_valid_deterministic_ones():
    ct = next(s for s in SAMPLES if s.name == "ct")
    first, second = prepare_series(ct), prepare_series(ct)
    assert len(first) == 20
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        assert all(UID(str(ds.get(attr))).is_valid for ds in first), attr
        assert [ds.get(attr) for ds in first] == [ds.get(attr) for ds in second], attr
    assert len({ds.SOPInstanceUID for ds in first}) == 20 and len({ds.SeriesInstanceUID for ds in first}) == 1
    assert all(not ds.file_meta.TransferSyntaxUID.is_compressed for ds in first)
    assert int(first[0].pixel_array.max()) > 1000


def test_loading_twice_into_orthanc_stores_each_instance_once(tmp_path):
    if not is_installed():
        pytest.skip("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (scripts/setup.sh does)")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        assert load_samples(orthanc.dicomweb_url) == load_samples(orthanc.dicomweb_url)
        counts = requests.get(f"{orthanc.url}/statistics", timeout=30).json()
        assert (counts["CountSeries"], counts["CountInstances"]) == (2, 40)
