"""The medsam app's server behaviour: /info, OHIF's page, 4xx errors that leave it serving, caching."""

from __future__ import annotations

import hashlib
import json

import pytest
import requests

from app_helpers import SAMPLE_DIR, bbox, infer_json, organ_mask, wait_for_background

LIVER_24 = bbox(organ_mask("ct_3mm", "liver")[24])
GOOD = {"boxes": [[*LIVER_24, 24]]}


def test_info_describes_model_labels_and_config(server):
    info = requests.get(f"{server.url}/info/", timeout=30).json()
    task = info["models"]["medsam"]
    assert task["type"] == "deepgrow" and task["dimension"] == 3
    assert "liver" in task["labels"] and "liver" in info["labels"]
    models = task["medsam"]["models"]
    assert models["default"] == "medsam-lite"
    assert models["loaded"]["medsam-lite"]["version"].startswith("medsam-lite@")
    assert models["cache"]["max_encodes"] == 2  # --conf max_encodes 2 (app_helpers.SERVER_CONF)
    assert info["medsam"]["model"] == "medsam-lite" and info["medsam"]["prefetch_slices"] == 3
    assert info["datastore"]["total"] == 5  # three labelled images, two to annotate


def test_ohif_page_is_served(server):
    response = requests.get(f"{server.url}/ohif/", timeout=30)
    assert response.status_code == 200
    assert "text/html" in response.headers["content-type"]
    assert "OHIF Viewer" in response.text


BAD_REQUESTS = [
    ("unknown image id", "no_such_image", GOOD, 404, "unknown image id"),
    ("server path as image id", str(SAMPLE_DIR / "ct_3mm.nii.gz"), GOOD, 400, "not a valid id"),
    ("system file as image id", "/etc/hostname", GOOD, 400, "not a valid id"),
    ("box outside the image", "ct_3mm", {"roi": [500, 600, 10, 20, 3, 3]}, 400, "outside"),
    ("zero-area box", "ct_3mm", {"roi": [10, 10, 20, 30, 3, 3]}, 400, "zero area"),
    ("single click", "ct_3mm", {"foreground": [[50, 50, 3]], "background": []}, 400, "single click"),
    ("a pair and a lone click", "ct_3mm", {"foreground": [[40, 30, 3], [90, 80, 3], [60, 50, 6]]}, 400,
     "slice(s) [6] have a single click"),
    ("click without a slice index", "ct_3mm", {"foreground": [[40, 30], [90, 80]]}, 400, "needs a slice index"),
    ("malformed JSON", "ct_3mm", '{"roi": [1, 2', 400, "not valid JSON"),
    ("params not an object", "ct_3mm", "[1, 2]", 400, "JSON object"),
    ("slice out of range", "ct_3mm", {"boxes": [[*LIVER_24, 99]]}, 400, "out of range"),
    ("non-numeric roi", "ct_3mm", {"roi": ["a", 1, 2, 3, 4, 4]}, 400, "numbers"),
    ("no prompt", "ct_3mm", {"foreground": [], "background": []}, 400, "no box"),
    ("unknown engine model", "ct_3mm", {**GOOD, "model": "sam-xl"}, 400, "unknown model"),
    ("engine model without weights", "ct_3mm", {**GOOD, "model": "medsam-vit-b"}, 400, "not available"),
    ("unknown CT window", "ct_3mm", {**GOOD, "window": "liverish"}, 400, "unknown CT window"),
    ("unreadable result format", "ct_3mm", {**GOOD, "result_extension": ".png"}, 400, "result_extension"),
    ("image path smuggled in params", "ct_3mm", {**GOOD, "image": "/etc/hostname"}, 400, "image"),
    # Types, per parameter (lib/endpoints/params.py): the app took these and named a label "{'x': 1}".
    ("label name that is an object", "ct_3mm", {**GOOD, "label": {"x": 1}}, 400, "params.label"),
    ("label name that is a number", "ct_3mm", {**GOOD, "label": 3}, 400, "params.label"),
    ("boxes that are no list", "ct_3mm", {"boxes": "1,2,3,4,5"}, 400, "params.boxes"),
    ("window that is a list", "ct_3mm", {**GOOD, "window": ["lung"]}, 400, "params.window"),
    ("result_compress that is no boolean", "ct_3mm", {**GOOD, "result_compress": "maybe"}, 400, "params.result_compress"),
]


@pytest.mark.parametrize("image,params,status,message", [r[1:] for r in BAD_REQUESTS],
                         ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_gets_4xx_and_server_keeps_serving(server, image, params, status, message):
    response = infer_json(server.url, image, params)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert server.alive()
    assert requests.get(f"{server.url}/info/", timeout=30).status_code == 200


def test_script_example_json_body(server):
    """The README's script example as users try it first: the parameters as a JSON body (MONAI
    Label's route reads only the multipart field, and answered 400 "no box given")."""
    response = requests.post(f"{server.url}/infer/medsam", params={"image": "ct_3mm", "output": "json"},
                             json={**GOOD, "label": "liver"}, timeout=300)
    assert response.status_code == 200, response.text
    assert response.json()["label_names"] == {"liver": 1} and response.json()["volume_ml"] > 0
    response = requests.post(f"{server.url}/infer/medsam", params={"image": "ct_3mm", "output": "json"},
                             json={"label": {"x": 1}, **GOOD}, timeout=300)
    assert response.status_code == 400 and "params.label" in response.json()["detail"]


def test_stock_routes_left_behind_are_refused(server):
    """POST /reload (MONAI Label: no role check, a second app and model beside the first) and model
    upload answer 501 (not 405, which is for a wrong method: PATCH /datastore/image is one)."""
    assert requests.post(f"{server.url}/reload", timeout=30).status_code == 501
    assert requests.put(f"{server.url}/model/medsam", files={"file": ("m.pt", b"x")}, timeout=30).status_code == 501
    assert requests.patch(f"{server.url}/datastore/image", timeout=30).status_code == 405


def test_dicom_seg_output_is_refused_before_inference(server):
    """MONAI Label's send_response answers 500 to output=dicom_seg after the inference (no task makes
    a SEG result) and leaves the result file in the temporary folder; here it is a 400 up front."""
    response = requests.post(f"{server.url}/infer/medsam", params={"image": "ct_3mm", "output": "dicom_seg"},
                             files={"params": (None, json.dumps(GOOD))}, timeout=300)
    assert response.status_code == 400 and "dicom_seg" in response.json()["detail"]


def test_image_checksum_check(server):
    """HEAD /datastore/image?check_sum=...: 200 when the stored image has that checksum ("ALGO:hex" as
    MONAI Label's file_checksum writes it, or a bare SHA256 hex), 404 when not; stock MONAI Label 0.8.5
    answered 404 to every checksum."""
    data = (SAMPLE_DIR / "ct_3mm.nii.gz").read_bytes()  # the server's datastore is a copy of the samples
    sha256, md5 = hashlib.sha256(data).hexdigest(), hashlib.md5(data).hexdigest()

    def check(check_sum: str) -> int:
        return requests.head(f"{server.url}/datastore/image", params={"image": "ct_3mm", "check_sum": check_sum},
                             timeout=60).status_code

    assert [check(c) for c in (f"SHA256:{sha256}", sha256, sha256.upper(), f"MD5:{md5}")] == [200] * 4
    assert [check(c) for c in (f"SHA256:{md5}", "0" * 64, f"MD5:{sha256}")] == [404] * 3
    assert check(f"CRC32:{md5}") == 400


def test_unknown_task_gets_404(server):
    response = infer_json(server.url, "ct_3mm", GOOD, model="deepedit")
    assert response.status_code == 404 and "deepedit" in response.json()["detail"]


def test_good_request_after_bad_ones(server):
    response = infer_json(server.url, "ct_3mm", GOOD)
    assert response.status_code == 200, response.text
    assert response.json()["volume_ml"] > 0


def test_same_request_twice_hits_the_cache(server):
    liver = organ_mask("ct_512", "liver")
    params = {"boxes": [[*bbox(liver[10]), 10]]}
    first = infer_json(server.url, "ct_512", params).json()
    second = infer_json(server.url, "ct_512", params).json()
    assert first["cache"]["image_was_open"] is False and first["cache"]["misses"] >= 1
    assert first["latency_ms"]["encode"] > 0
    assert second["cache"]["image_was_open"] is True
    assert second["cache"]["hits"] >= 1 and second["cache"]["misses"] == 0
    assert second["latency_ms"]["encode"] == 0
    assert second["objects"] == first["objects"]


def test_background_encoding_prepares_neighbouring_slices(server):
    """After the first box on an image, the next slices are encoded in the background: the first
    box on one of them finds its embedding in the cache."""
    liver = organ_mask("mr_3mm", "liver")
    first = infer_json(server.url, "mr_3mm", {"boxes": [[*bbox(liver[10]), 10]]}).json()
    assert first["cache"]["misses"] >= 1
    status = wait_for_background(server.url, "mr_3mm")
    assert status["planned"] == 3
    nxt = infer_json(server.url, "mr_3mm", {"boxes": [[*bbox(liver[11]), 11]]}).json()
    assert nxt["cache"]["hits"] >= 1 and nxt["cache"]["misses"] == 0 and nxt["latency_ms"]["encode"] == 0
