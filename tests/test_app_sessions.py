"""Images that are not in the datastore: Slicer's session upload, and a DICOM series session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import requests

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
