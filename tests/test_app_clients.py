"""The medsam app through its real clients: 3D Slicer's client library and OHIF-style requests.

Every test talks to the real MONAI Label server (fixture `server`) running LiteMedSAM on a copy of
the sample data, and scores the returned label against the sample's reference masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from app_helpers import SAMPLE_DIR, bbox, dice, ohif_infer, organ_mask, read_label, slicer_client_module

SLICER_CONFIG = {"window": "auto", "modality": "", "model": "medsam-lite"}  # what Slicer echoes from /info


@pytest.fixture(scope="module")
def slicer(server, tmp_path_factory):
    client = slicer_client_module().MONAILabelClient(server.url, tmpdir=str(tmp_path_factory.mktemp("slicer")))
    return client


def test_slicer_sees_one_deepgrow_task(slicer):
    info = slicer.info()
    assert list(info["models"]) == ["medsam"]
    model = info["models"]["medsam"]
    assert model["type"] == "deepgrow" and model["dimension"] == 3
    assert "liver" in model["labels"]


def test_slicer_2d_box_from_unsorted_roi(slicer):
    liver = organ_mask("ct_3mm", "liver")
    x0, y0, x1, y1 = bbox(liver[24])
    params = {"label": "liver", "foreground": [], "background": [], "roi": [x1, x0, y1, y0, 24, 24], **SLICER_CONFIG}
    result_file, reply = slicer.infer("medsam", "ct_3mm", params)
    label = read_label(Path(result_file))
    assert label.shape == liver.shape
    assert reply["mode"] == "2d" and list(reply["iou"]) == ["24"]
    assert reply["label_names"] == {"liver": 1}
    assert np.count_nonzero(np.delete(label, 24, axis=0)) == 0, "a 2D box must only label its slice"
    assert dice(label[24] == 1, liver[24]) > 0.85
    assert reply["model"]["name"] == "medsam-lite" and reply["model"]["version"].startswith("medsam-lite@")
    assert reply["model"]["encoder"] in ("fp32-traced", "fp32-eager", "bf16-eager", "ov-fp32", "ov-bf16", "ov-mixed")
    assert reply["window"].startswith("window:soft_tissue")
    assert reply["volume_ml"] == pytest.approx(np.count_nonzero(label) * 27 / 1000, rel=1e-3)
    assert set(reply["latency_ms"]) == {"load", "encode", "decode", "write", "total"}


def test_slicer_3d_box_from_unsorted_roi(slicer):
    spleen = organ_mask("ct_3mm", "spleen")
    first, last = 20, 24
    x0, y0, x1, y1 = bbox(spleen[first:last + 1].any(axis=0))
    params = {"label": "spleen", "foreground": [], "background": [], "roi": [x1, x0, y0, y1, last, first], **SLICER_CONFIG}
    result_file, reply = slicer.infer("medsam", "ct_3mm", params)
    label = read_label(Path(result_file))
    assert reply["mode"] == "3d-box"
    assert reply["objects"][0]["slices"] == [first, last]
    # every slice of the range decoded with the given box, then one or two boxes per walked slice
    assert reply["objects"][0]["decoded_boxes"] >= (last - first + 1) + (last - first)
    assert np.count_nonzero(label[:first]) == 0 and np.count_nonzero(label[last + 1:]) == 0
    assert dice(label[first:last + 1] == 1, spleen[first:last + 1]) > 0.8


def _nrrd(response: requests.Response, tmp_path: Path) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.content.startswith(b"NRRD"), "OHIF reads NRRD only"
    header = response.content[:400].split(b"\n\n")[0].decode()
    assert "type: unsigned char" in header and "encoding: raw" in header  # result_dtype uint8, no compression
    return read_label(response.content, ".nrrd", tmp_path)


def test_ohif_two_clicks_make_a_box(server, tmp_path):
    spleen = organ_mask("ct_3mm", "spleen")
    x0, y0, x1, y1 = bbox(spleen[22])
    response = ohif_infer(server.url, "ct_3mm", {"foreground": [[x0, y0, 22], [x1, y1, 22]], "background": []})
    label = _nrrd(response, tmp_path)
    assert np.count_nonzero(np.delete(label, 22, axis=0)) == 0
    assert dice(label[22] > 0, spleen[22]) > 0.8


def test_ohif_four_clicks_on_the_axes_ends(server, tmp_path):
    """The ends of the long and short axes (extreme points): their bounding rectangle is the box."""
    liver = organ_mask("ct_3mm", "liver")[20]
    ys, xs = np.nonzero(liver)
    ends = [(xs.min(), ys[xs.argmin()]), (xs.max(), ys[xs.argmax()]), (xs[ys.argmin()], ys.min()), (xs[ys.argmax()], ys.max())]
    clicks = [[int(x), int(y), 20] for x, y in ends]
    label = _nrrd(ohif_infer(server.url, "ct_3mm", {"foreground": clicks, "background": []}), tmp_path)
    assert dice(label[20] > 0, liver) > 0.85


def test_ohif_clicks_on_three_key_slices(server, tmp_path):
    liver = organ_mask("ct_3mm", "liver")
    clicks = []
    for k in (22, 24, 26):
        x0, y0, x1, y1 = bbox(liver[k])
        clicks += [[x0, y0, k], [x1, y1, k]]
    label = _nrrd(ohif_infer(server.url, "ct_3mm", {"foreground": clicks, "background": []}), tmp_path)
    assert np.count_nonzero(label[:22]) == 0 and np.count_nonzero(label[27:]) == 0
    assert dice(label[22:27] > 0, liver[22:27]) > 0.85


def test_ohif_oblique_clicks_on_neighbouring_slices_make_one_box(server, tmp_path):
    """On an oblique series OHIF's two clicks on one displayed plane can carry different k."""
    liver = organ_mask("ct_3mm", "liver")
    x0, y0, x1, y1 = bbox(liver[24])
    label = _nrrd(ohif_infer(server.url, "ct_3mm", {"foreground": [[x0, y0, 23], [x1, y1, 25]]}), tmp_path)
    assert np.count_nonzero(np.delete(label, 24, axis=0)) == 0
    assert dice(label[24] > 0, liver[24]) > 0.85


def test_2d_image_upload_with_boxes(server, tmp_path):
    """A 2D PNG sent as a file (no datastore id), box given as `boxes`, NIfTI reply by default."""
    image = sitk.ReadImage(str(SAMPLE_DIR / "ct_3mm.nii.gz"))
    plane = np.clip((sitk.GetArrayFromImage(image)[24].astype(np.float32) + 160) / 400 * 255, 0, 255).astype(np.uint8)
    png = tmp_path / "slice.png"
    sitk.WriteImage(sitk.GetImageFromArray(plane), str(png))
    liver = organ_mask("ct_3mm", "liver")[24]
    with open(png, "rb") as handle:
        response = requests.post(f"{server.url}/infer/medsam", params={"output": "image"}, timeout=300,
                                 files={"params": (None, json.dumps({"boxes": [list(bbox(liver))]})),
                                        "file": ("slice.png", handle)})
    assert response.status_code == 200, response.text
    assert response.content[:2] == b"\x1f\x8b", "default reply is gzip-compressed NIfTI"
    label = read_label(response.content, ".nii.gz", tmp_path)
    assert label.shape == liver.shape
    assert dice(label > 0, liver) > 0.85
