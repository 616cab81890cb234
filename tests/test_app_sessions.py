"""Images that are not in the datastore: Slicer's session upload, a DICOM series session, and
uploads the server must refuse or rename."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import requests
import SimpleITK as sitk

from app_helpers import SAMPLE_DIR, bbox, dice, infer_json, organ_mask, read_label, slicer_client_module, write_dicom_series


def test_slicer_session_upload(server, tmp_path):
    client = slicer_client_module().MONAILabelClient(server.url, tmpdir=str(tmp_path))
    session_id = client.create_session(str(SAMPLE_DIR / "mr_3mm.nii.gz"))["session_id"]
    liver = organ_mask("mr_3mm", "liver")
    x0, y0, x1, y1 = bbox(liver[14])
    result_file, reply = client.infer("medsam", "", {"roi": [x0, x1, y1, y0, 14, 14], "label": "liver"},
                                      session_id=session_id)
    label = read_label(Path(result_file))
    assert reply["mode"] == "2d"
    assert dice(label[14] == 1, liver[14]) > 0.8


def test_dicom_series_session(server, tmp_path):
    files = write_dicom_series(SAMPLE_DIR / "mr_3mm.nii.gz", tmp_path / "dicom")
    handles = [open(f, "rb") for f in files]
    try:
        response = requests.put(f"{server.url}/session/", timeout=120,
                                 files=[("files", (f.name, h, "application/dicom")) for f, h in zip(files, handles)])
    finally:
        for h in handles:
            h.close()
    assert response.status_code == 200, response.text
    session_id = response.json()["session_id"]
    liver = organ_mask("mr_3mm", "liver")
    x0, y0, x1, y1 = bbox(liver[14])
    response = requests.post(f"{server.url}/infer/medsam", params={"session_id": session_id, "output": "image"},
                             files={"params": (None, '{"boxes": [[%d, %d, %d, %d, 14]], "modality": "MR"}' % (x0, y0, x1, y1))},
                             timeout=300)
    assert response.status_code == 200, response.text
    label = read_label(response.content, ".nii.gz", tmp_path)
    assert label.shape == liver.shape
    assert np.count_nonzero(np.delete(label, 14, axis=0)) == 0
    assert dice(label[14] > 0, liver[14]) > 0.8


def test_unknown_session_gets_404(server):
    response = requests.post(f"{server.url}/infer/medsam", params={"session_id": "no-such-session", "output": "json"},
                             files={"params": (None, "{}")}, timeout=60)
    assert response.status_code == 404 and "unknown session" in response.json()["detail"]


def test_no_image_at_all_gets_400(server):
    response = infer_json(server.url, "", {"boxes": [[1, 1, 5, 5, 0]]})
    assert response.status_code == 400 and "no image" in response.json()["detail"]


def _put_session(url: str, files: list[Path], names: list[str] | None = None) -> requests.Response:
    """PUT /session/ with the files, sent under `names` (default: their own)."""
    return requests.put(f"{url}/session/", timeout=120,
                        files=[("files", (name, f.read_bytes(), "application/dicom"))
                               for f, name in zip(files, names or [f.name for f in files])])


def test_dicom_series_declaring_too_many_voxels_is_refused(server, tmp_path):
    """A series of 40 slices whose headers declare 4096 x 4096 (the files hold 8 x 8): one slice's
    size times the slice count is more than MAX_VOXELS (2^29), a 400 before any voxel is read."""
    volume = sitk.GetImageFromArray(np.zeros((40, 8, 8), np.int16))
    sitk.WriteImage(volume, str(tmp_path / "small.nii.gz"))
    files = write_dicom_series(tmp_path / "small.nii.gz", tmp_path / "dicom")
    for f in files:
        ds = pydicom.dcmread(f)
        ds.Rows = ds.Columns = 4096
        ds.save_as(f)
    response = _put_session(server.url, files)
    assert response.status_code == 400, response.text
    assert "4096x4096x1x40" in response.json()["detail"] and "more than this server reads" in response.json()["detail"]


def test_file_names_no_file_can_have_fall_back_to_the_default(server, tmp_path):
    """Client file names over 255 bytes or holding a NUL (MONAI Label's and the app's spooling gave
    a 500: no file can be named so) are replaced by the default name: the upload still works."""
    liver = organ_mask("ct_3mm", "liver")
    params = {"params": (None, '{"boxes": [[%d, %d, %d, %d, 24]]}' % bbox(liver[24]))}
    for name in ("a" * 300 + ".nii.gz", "ct\0.nii.gz"):
        response = requests.post(f"{server.url}/infer/medsam", params={"output": "json"}, timeout=300,
                                 files={"file": (name, (SAMPLE_DIR / "ct_3mm.nii.gz").read_bytes()), **params})
        assert response.status_code == 200, (name[:20], response.text)
        assert response.json()["volume_ml"] > 0
    files = write_dicom_series(SAMPLE_DIR / "mr_3mm.nii.gz", tmp_path / "dicom")
    response = _put_session(server.url, files, [f"{'s' * 300}{i}.dcm" for i in range(len(files))])
    assert response.status_code == 200, response.text
    assert requests.delete(f"{server.url}/session/{response.json()['session_id']}", timeout=30).status_code == 200
