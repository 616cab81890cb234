"""Active learning through the real server: infer answers kept as drafts, which the `uncertainty`
strategy and the `draft_dice` scoring method then use; labels saved, `medsam` trained on the CPU
(tiny run), new weights published and served at once, a run that forgets refused by the publish
gate, a killed run leaving the served model intact, the `diversity` strategy.

One server for the module, on a copy of the sample images without their labels; the tests save
labels as a client does and run in file order (each builds on the datastore the previous left).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from app_helpers import SAMPLE_DIR, SERVER_CONF, bbox, dice, infer_json, organ_mask
from medsam_http.server import LabelServer

# A run small enough for two shared CPU cores: 2 training slices, 1 validation slice, 1 epoch.
TINY = {"max_epochs": 1, "train_batch_size": 2, "max_train_slices": 2, "max_val_slices": 1, "val_split": 0.3,
        "early_stop_patience": 0, "threads": 1}
LIVER_24 = {"boxes": [[*bbox(organ_mask("ct_3mm", "liver")[24]), 24]]}


@pytest.fixture(scope="module")
def train_server(tmp_path_factory: pytest.TempPathFactory):
    """The medsam app on the sample images with no labels, its model directory in tmp."""
    work = tmp_path_factory.mktemp("train-server")
    studies = work / "studies"
    shutil.copytree(SAMPLE_DIR, studies, ignore=shutil.ignore_patterns("labels"))
    srv = LabelServer(studies, work / "server.log", conf={**SERVER_CONF, "model_dir": str(work / "model")}).start()
    srv.model_dir = work / "model"
    yield srv
    srv.stop()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _label_bytes(image: str, organs: tuple[str, ...], top_half: bool = False) -> bytes:
    """A label of the sample's `organs` (value 1 each) on the image's grid, as NIfTI bytes; with
    `top_half`, only the rows above the middle (a draft an annotator would correct)."""
    reference = sitk.ReadImage(str(SAMPLE_DIR / f"{image}.nii.gz"))
    mask = np.zeros(sitk.GetArrayFromImage(reference).shape, dtype=np.uint8)
    for organ in organs:
        mask[organ_mask(image, organ)] = 1
    if top_half:
        mask[:, mask.shape[1] // 2:, :] = 0
    return _nifti_bytes(mask, reference)


def _nifti_bytes(array: np.ndarray, reference: sitk.Image) -> bytes:
    out = sitk.GetImageFromArray(array)
    out.CopyInformation(reference)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "label.nii.gz"
        sitk.WriteImage(out, str(path), useCompression=True)
        return path.read_bytes()


def _disc_label(image: str) -> np.ndarray:
    """A disc of value 1 in the middle of the volume's middle slices (a draft of an unlabelled image)."""
    shape = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / f"{image}.nii.gz"))).shape
    yy, xx = np.mgrid[:shape[1], :shape[2]]
    mask = np.zeros(shape, np.uint8)
    mask[shape[0] // 2 - 1:shape[0] // 2 + 2][:, (yy - shape[1] // 2) ** 2 + (xx - shape[2] // 2) ** 2 < 20 ** 2] = 1
    return mask


def _read_nifti_bytes(data: bytes) -> np.ndarray:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "label.nii.gz"
        path.write_bytes(data)
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _save_label(url: str, image: str, data: bytes, tag: str = "final") -> None:
    response = requests.put(f"{url}/datastore/label", params={"image": image, "tag": tag},
                            files={"label": (f"{image}.nii.gz", io.BytesIO(data))}, timeout=120)
    assert response.status_code == 200, response.text


def _wait_task(url: str, kind: str = "train", timeout: float = 900.0) -> dict:
    """Poll GET /train/ (or /scoring/) until MONAI Label's last task of that kind has ended."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = requests.get(f"{url}/{kind}/", timeout=30)
        task = response.json() if response.status_code == 200 else {}
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(2.0)
    raise AssertionError(f"{kind} did not finish in {timeout:.0f} s")


def _train_stats(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=30).json().get("train_stats", {}).get("medsam", {})


def test_info_lists_train_task_strategies_and_scoring(train_server):
    info = requests.get(f"{train_server.url}/info/", timeout=30).json()
    assert "medsam" in info["trainers"]
    config = info["trainers"]["medsam"]["config"]
    assert config["lr"] == 1e-4 and config["weight_decay"] == 0.01 and config["multi_gpu"] is True
    assert {"random", "diversity", "uncertainty"} <= set(info["strategies"])
    assert "draft_dice" in info["scoring"]


def _drafts_done(url: str, timeout: float = 120.0) -> dict:
    """Wait until the infer task has written every draft it queued (GET /info/)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/info/", timeout=30).json()["models"]["medsam"]["medsam"]["drafts"]
        if status["pending"] == 0:
            return status
        time.sleep(0.3)
    raise AssertionError(f"drafts not written in {timeout:.0f} s: {status}")


def _label_array(url: str, image: str, tag: str) -> np.ndarray | None:
    response = requests.get(f"{url}/datastore/label", params={"label": image, "tag": tag}, timeout=60)
    return _read_nifti_bytes(response.content) if response.status_code == 200 else None


def test_infer_answers_become_drafts_for_uncertainty_and_draft_scoring(train_server):
    """The loop as annotators run it, with no label saved by hand until the end: two boxes on an
    unlabelled image (two organs) are kept as its draft, merged by label value; `uncertainty`
    picks the drafted image; once a final label is saved, `draft_dice` scores the draft against
    it, and later answers leave the draft alone."""
    url = train_server.url
    assert requests.post(f"{url}/activelearning/uncertainty", json={}, timeout=600).json() == {}  # no draft yet
    image, (k1, k2) = "ct_512", (8, 12)
    liver, spleen = organ_mask(image, "liver"), organ_mask(image, "spleen")
    first = infer_json(url, image, {"boxes": [[*bbox(liver[k1]), k1]], "label": "liver"})
    assert first.status_code == 200, first.text
    assert first.json()["draft"] == {"queued": True, "image": image, "tag": "original", "value": 2}  # liver: 2nd label
    second = infer_json(url, image, {"boxes": [[*bbox(spleen[k2]), k2]], "label": "spleen"})
    assert second.json()["draft"]["queued"] and second.json()["draft"]["value"] == 3
    assert _drafts_done(url)["written"] == 2
    draft = _label_array(url, image, "original")
    assert draft is not None and set(np.unique(draft)) == {0, 2, 3}
    assert dice(draft[k1] == 2, liver[k1]) > 0.8 and dice(draft[k2] == 3, spleen[k2]) > 0.8  # both objects kept
    again = infer_json(url, image, {"boxes": [[*bbox(liver[k1]), k1]], "label": "liver"})
    assert again.json()["draft"]["queued"] and _drafts_done(url)["written"] == 3
    assert np.array_equal(_label_array(url, image, "original"), draft)  # the same answer replaces, not adds

    pick = requests.post(f"{url}/activelearning/uncertainty", json={"slices": 1, "boxes": 2}, timeout=600)
    assert pick.status_code == 200, pick.text
    assert pick.json()["id"] == image and set(pick.json()["scores"]) == {image}

    final = np.zeros(liver.shape, np.uint8)
    final[liver], final[spleen] = 1, 2
    reference = sitk.ReadImage(str(SAMPLE_DIR / f"{image}.nii.gz"))
    _save_label(url, image, _nifti_bytes(final, reference))
    scored = requests.post(f"{url}/scoring/draft_dice", params={"run_sync": "true"}, timeout=300)
    assert scored.status_code == 200, scored.text
    assert scored.json()["draft_dice"][image] == pytest.approx(dice(draft > 0, final > 0), abs=1e-6)

    late = infer_json(url, image, {"boxes": [[*bbox(liver[k2]), k2]], "label": "liver"}).json()["draft"]
    assert late["queued"] is False and "final" in late["reason"]  # never over an annotator's label
    assert np.array_equal(_label_array(url, image, "original"), draft)
    assert requests.post(f"{url}/activelearning/uncertainty", json={}, timeout=600).json() == {}


def test_train_publishes_new_weights_and_next_infer_uses_them(train_server):
    url = train_server.url
    before = infer_json(url, "ct_3mm", LIVER_24).json()["model"]
    assert before["version"].startswith("medsam-lite@")
    _save_label(url, "ct_3mm", _label_bytes("ct_3mm", ("liver", "spleen")))
    _save_label(url, "mr_3mm", _label_bytes("mr_3mm", ("liver",)))

    response = requests.post(f"{url}/train/medsam", json={**TINY, "publish": "best"}, timeout=60)
    assert response.status_code == 200, response.text
    task = _wait_task(url)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))

    stats = _train_stats(url)
    assert stats["status"] == "done" and stats["epoch"] == 1 and stats["total_epochs"] == 1
    assert stats["start_version"] == before["version"]
    assert len(stats["history"]) == 1 and stats["history"][0]["train_loss"] > 0
    assert 0 <= stats["baseline_val_dice"] <= 1 and 0 <= stats["best_metric"] <= 1
    assert stats["train_slices"] == 2 and stats["val_slices"] == 1
    assert stats["val_objects"] == len(stats["baseline_by_group"]) >= 1  # each label value of the slice scored

    published = train_server.model_dir / "medsam-lite.pt"
    version = f"medsam-lite@{_sha(published)[:12]}"
    assert stats["published"]["version"] == version != before["version"]
    assert (train_server.model_dir / "train_stats.png").stat().st_size > 1000
    manifest = json.loads((train_server.model_dir / "medsam-lite.json").read_text())
    assert manifest["current"]["version"] == version and Path(manifest["current"]["file"]).is_file()

    after = infer_json(url, "ct_3mm", LIVER_24)
    assert after.status_code == 200, after.text
    assert after.json()["model"]["version"] == version
    assert after.json()["volume_ml"] > 0


def test_training_that_forgets_is_refused_publication(train_server):
    """lr 0.01 wrecks the weights: `best` would publish the epoch, the gate refuses it, the served
    model stays, and the reason is in the train stats and the train task's log."""
    url = train_server.url
    published = train_server.model_dir / "medsam-lite.pt"
    digest = _sha(published)
    served = infer_json(url, "ct_3mm", LIVER_24).json()["model"]["version"]
    response = requests.post(f"{url}/train/medsam", json={**TINY, "lr": 0.01, "publish": "best"}, timeout=60)
    assert response.status_code == 200, response.text
    task = _wait_task(url)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    stats = _train_stats(url)
    assert stats["published"] is None and "not published" in stats["publish_refused"]
    assert "fell by more than 2 points" in stats["publish_refused"]
    assert any("not published" in line for line in task["details"])
    assert _sha(published) == digest
    assert infer_json(url, "ct_3mm", LIVER_24).json()["model"]["version"] == served


def test_killed_training_leaves_served_model_intact(train_server):
    url = train_server.url
    published = train_server.model_dir / "medsam-lite.pt"
    served = infer_json(url, "ct_3mm", LIVER_24).json()["model"]["version"]
    digest = _sha(published)
    old_run = _train_stats(url)["run_id"]

    response = requests.post(f"{url}/train/medsam", json={**TINY, "max_epochs": 3, "publish": "best"}, timeout=60)
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # mid-way: the new run has scored its starting weights
        stats = _train_stats(url)
        if stats.get("run_id") != old_run and stats.get("baseline_val_dice") is not None:
            break
        assert requests.get(f"{url}/train/", timeout=30).json()["status"] in ("SUBMITTED", "RUNNING")
        time.sleep(1.0)
    stats = _train_stats(url)
    assert stats["status"] == "running" and stats["start_version"] == served
    stopped = requests.delete(f"{url}/train/", timeout=60).json()
    assert stopped["status"] == "STOPPED"

    assert _sha(published) == digest
    stats = _train_stats(url)
    assert stats["published"] is None and stats["status"] == "stopped"  # this run published nothing
    again = infer_json(url, "ct_3mm", LIVER_24)
    assert again.status_code == 200 and again.json()["model"]["version"] == served
    assert train_server.alive()


def test_failed_training_leaves_served_model_intact(train_server):
    url = train_server.url
    published = train_server.model_dir / "medsam-lite.pt"
    digest = _sha(published)
    served = infer_json(url, "ct_3mm", LIVER_24).json()["model"]["version"]
    response = requests.post(f"{url}/train/medsam", json={**TINY, "max_epochs": "many"}, timeout=60)
    assert response.status_code == 200, response.text
    task = _wait_task(url)
    assert task["status"] == "ERROR" and any("max_epochs must be int" in line for line in task["details"])
    assert _sha(published) == digest
    assert infer_json(url, "ct_3mm", LIVER_24).json()["model"]["version"] == served


def test_strategies_return_valid_ids_with_scores(train_server):
    url = train_server.url
    # ct_chest and mr_brain have no final label; with a draft, mr_brain is the only uncertain one.
    _save_label(url, "mr_brain", _nifti_bytes(_disc_label("mr_brain"), sitk.ReadImage(str(SAMPLE_DIR / "mr_brain.nii.gz"))),
                tag="original")
    images = set(requests.get(f"{url}/datastore/?output=all", timeout=30).json()["objects"])

    diverse = requests.post(f"{url}/activelearning/diversity", json={"slices": 2}, timeout=600)
    assert diverse.status_code == 200, diverse.text
    pick = diverse.json()
    assert pick["id"] in {"ct_chest", "mr_brain"} and pick["id"] in images
    assert pick["score"] > 0 and set(pick["scores"]) == {"ct_chest", "mr_brain"} and "labelled" in pick["reason"]

    uncertain = requests.post(f"{url}/activelearning/uncertainty", json={"slices": 1, "boxes": 2}, timeout=600)
    assert uncertain.status_code == 200, uncertain.text
    pick = uncertain.json()
    assert pick["id"] == "mr_brain" and 0 <= pick["score"] <= 1 and "jittered" in pick["reason"]


def test_draft_dice_scoring_matches_hand_computed_dice(train_server):
    url = train_server.url
    draft = _label_bytes("ct_3mm", ("liver",), top_half=True)
    _save_label(url, "ct_3mm", draft, tag="original")
    _wait_task(url, "scoring")  # MONAI Label scores by itself after training and strategies
    response = requests.post(f"{url}/scoring/draft_dice", params={"run_sync": "true"}, timeout=300)
    assert response.status_code == 200, response.text
    scores = response.json()["draft_dice"]
    assert set(scores) == {"ct_3mm", "ct_512"}  # mr_brain has a draft but no final label; mr_3mm no draft

    final = organ_mask("ct_3mm", "liver") | organ_mask("ct_3mm", "spleen")
    drafted = _read_nifti_bytes(draft) > 0
    expected = 2 * np.logical_and(drafted, final).sum() / (drafted.sum() + final.sum())
    assert scores["ct_3mm"] == pytest.approx(expected, abs=1e-6)
    assert scores["ct_3mm"] == pytest.approx(dice(drafted, final), abs=1e-6) and 0.2 < expected < 0.95
