"""The engine's fine-tuning, active-learning and scoring pieces, without the server.

Training runs are tiny (a couple of slices, one epoch, the real LiteMedSAM on the CPU); the DDP run
goes through `main.py train` under torchrun with two gloo processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from engine_helpers import REPO_ROOT, SAMPLE_DIR, dice, make_volume
from medsam_engine.checkpoints import manifest_path, publish, save_checkpoint
from medsam_engine.datastore import Case, list_cases
from medsam_engine.dataset import SliceDataset, expand_box, index_slices, split_samples, spread
from medsam_engine.geometry import mask_box
from medsam_engine.models import file_sha256, load_state_dict
from medsam_engine.scoring import draft_dice
from medsam_engine.strategies import (
    FeatureCache, box_uncertainty, image_features, k_center_pick, mask_disagreement, pick_diverse,
)
from medsam_engine.training import TrainConfig, train, weights_checksum


def _write(array: np.ndarray, path: Path, spacing=(1.0, 1.0, 3.0)) -> Path:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture()
def synthetic_store(tmp_path: Path) -> Path:
    """A datastore with one 8-slice MR-like volume: a bright disc on slices 2 and 5 only (label 3),
    plus a speck of 4 pixels on slice 6 (too small to train on)."""
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, (8, 64, 64)).astype(np.float32)
    label = np.zeros((8, 64, 64), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 30) ** 2 + (xx - 34) ** 2 < 12 ** 2
    for k in (2, 5):
        image[k][disc] += 200
        label[k][disc] = 3
    label[6, 10:12, 10:12] = 3
    (tmp_path / "labels" / "final").mkdir(parents=True)
    _write(image, tmp_path / "disc.nii.gz")
    _write(label, tmp_path / "labels" / "final" / "disc.nii.gz")
    return tmp_path


def test_index_skips_empty_slices_and_specks(synthetic_store: Path):
    samples = index_slices(list_cases(synthetic_store))
    assert [(s.slice, s.values) for s in samples] == [(2, (3,)), (5, (3,))]


def test_split_and_spread_hold_back_slices():
    from medsam_engine.dataset import SliceSample

    samples = [SliceSample(0, k, (1,)) for k in range(10)]
    train_part, val_part = split_samples(samples, 0.2, seed=1)
    assert len(val_part) == 2 and len(train_part) == 8 and not set(train_part) & set(val_part)
    assert split_samples(samples, 0.2, seed=1) == (train_part, val_part)
    assert split_samples(samples[:2], 0.01)[1]  # two or more slices: at least one is held back
    assert [s.slice for s in spread(samples, 3)] == [0, 4, 9] and spread(samples, 0) == samples


def test_expanded_box_grows_by_at_most_the_jitter_and_stays_inside():
    import random

    rng = random.Random(0)
    for _ in range(200):
        x0, y0, x1, y1 = expand_box((10.0, 20.0, 30.0, 40.0), 20, rng, height=50, width=60)
        assert 0 <= x0 <= 10 and 0 <= y0 <= 20 and 30 <= x1 <= 50 and 40 <= y1 <= 49
        assert 10 - x0 <= 20 and x1 - 30 <= 20


def test_samples_are_model_tensors_aligned_with_their_box(synthetic_store: Path, lite_segmenter):
    cases = list_cases(synthetic_store)
    ds = SliceDataset(cases, index_slices(cases), lite_segmenter, train=False)
    sample = ds[0]
    assert sample["image"].shape == (3, 256, 256) and sample["label"].shape == (1, 256, 256)
    assert 0 <= float(sample["image"].min()) and float(sample["image"].max()) <= 1
    target_box = mask_box(sample["label"][0].numpy() > 0)
    scale = 256 / 64  # letterboxed 64x64 slice
    assert np.allclose(target_box, np.array(mask_box(np.asarray(ds._load(0)[1][2] == 3))) * scale, atol=scale)
    assert np.allclose(sample["box"].numpy(), np.array(target_box), atol=scale + 1)
    jittered = SliceDataset(cases, index_slices(cases), lite_segmenter, train=True, jitter=20)
    boxes = np.array([jittered[0]["box"].numpy() for _ in range(8)])
    assert (boxes[:, :2] <= sample["box"].numpy()[:2] + 1e-4).all() and len({tuple(b) for b in boxes}) > 1


def test_small_objects_are_trained_in_the_zoomed_tile_inference_uses(tmp_path: Path, lite_segmenter):
    """A 10 px disc in a 256 px slice is under the zoom rule's 16 model px: the sample is the tile
    the server would segment it in, so box and target are magnified alike."""
    image = np.zeros((3, 256, 256), np.float32)
    label = np.zeros((3, 256, 256), np.uint8)
    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 100) ** 2 + (xx - 150) ** 2 < 5 ** 2
    image[1][disc], label[1][disc] = 300, 1
    (tmp_path / "labels" / "final").mkdir(parents=True)
    _write(image, tmp_path / "small.nii.gz")
    _write(label, tmp_path / "labels" / "final" / "small.nii.gz")
    cases = list_cases(tmp_path)
    sample = SliceDataset(cases, index_slices(cases), lite_segmenter, train=False)[0]
    box = sample["box"].numpy()
    assert box[2] - box[0] > 2 * 9  # the 9 px wide box, magnified by the tile's zoom
    target = mask_box(sample["label"][0].numpy() > 0)
    assert np.allclose(target, box, atol=4)


def test_publish_is_atomic_numbered_and_recorded(tmp_path: Path):
    served = tmp_path / "model" / "medsam-lite.pt"
    state = {"w": torch.zeros(3)}
    first = publish(served, state, "medsam-lite", {"epoch": 1})
    assert first["number"] == 1 and first["version"] == f"medsam-lite@{file_sha256(served)[:12]}"
    second = publish(served, {"w": torch.ones(3)}, "medsam-lite", {"epoch": 2})
    assert second["number"] == 2 and second["version"] != first["version"]
    assert torch.equal(load_state_dict(served)["w"], torch.ones(3))
    assert torch.equal(load_state_dict(first["file"])["w"], torch.zeros(3))  # the older version is kept
    manifest = json.loads(manifest_path(served).read_text())
    assert manifest["current"]["number"] == 2 and [e["number"] for e in manifest["history"]] == [1, 2]

    digest = file_sha256(served)
    with pytest.raises(Exception):  # a write that fails half-way (unpicklable meta) ...
        save_checkpoint(served, state, {"bad": lambda: None})
    assert file_sha256(served) == digest  # ... leaves the served file as it was, and no temporary file
    assert sorted(p.name for p in served.parent.iterdir()) == ["medsam-lite.json", "medsam-lite.pt", "versions"]


def test_training_that_does_not_improve_publishes_nothing_and_stops_early(sample_volume, tmp_path: Path):
    """lr 0: the weights stay, validation Dice equals the starting one, so 'improved' publishes
    nothing and early stopping (patience 1) ends the run after its first epoch of 3."""
    torch.set_num_threads(2)
    cases = [c for c in list_cases(SAMPLE_DIR) if c.image_id == "mr_3mm"]
    samples = index_slices(cases, {"mr_3mm": {5}})  # liver
    cfg = TrainConfig(output_dir=tmp_path / "run", publish_path=tmp_path / "model" / "medsam-lite.pt", lr=0.0,
                      max_epochs=3, batch_size=1, device="cpu", early_stop_patience=1)
    third = len(samples) // 3
    stats = train(cfg, cases, [samples[third]], [samples[2 * third]])
    assert stats["status"] == "stopped_early" and stats["epoch"] == 1 and len(stats["history"]) == 1
    assert stats["history"][0]["val_dice"] == pytest.approx(stats["baseline_val_dice"])
    assert stats["published"] is None and not cfg.publish_path.exists()
    assert (tmp_path / "run" / "checkpoint_last.pt").is_file() and (tmp_path / "run" / "train_stats.png").is_file()


def test_torchrun_two_cpu_processes_agree_on_the_weights(tmp_path: Path):
    out, served = tmp_path / "run", tmp_path / "model" / "medsam-lite.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO_ROOT / "main.py"), "train", str(SAMPLE_DIR), "--out", str(out), "--publish", str(served),
               "--publish-mode", "best", "--organ", "liver", "--max-epochs", "1", "--batch-size", "1",
               "--max-train-slices", "2", "--max-val-slices", "2", "--device", "cpu", "--threads", "1"]
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    stats = json.loads((out / "train_stats.json").read_text())
    assert stats["world_size"] == 2 and stats["status"] == "done"
    checksums = stats["rank_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    from medsam_engine import load_model

    start = load_model("medsam-lite", device="cpu").net
    assert weights_checksum(start) != checksums[0]  # the ranks trained, and in step
    trained = load_model("medsam-lite", str(served), device="cpu").net
    assert weights_checksum(trained) == checksums[0]  # the published file holds those weights
    assert stats["published"]["version"] == f"medsam-lite@{file_sha256(served)[:12]}"


def test_k_center_pick_takes_the_farthest_candidate():
    labelled = np.array([[0.0, 0.0], [1.0, 0.0]])
    candidates = np.array([[0.5, 0.1], [5.0, 5.0], [1.0, 1.0]])
    index, distances = k_center_pick(labelled, candidates)
    assert index == 1 and distances[1] == pytest.approx(np.hypot(4, 5))
    assert k_center_pick(np.zeros((0, 2)), candidates)[0] == 1  # nothing labelled: the least typical


def test_diversity_picks_the_image_unlike_the_labelled_one(sample_volume, lite_segmenter, tmp_path: Path):
    """Labelled: the sample CT. Candidates: the same CT with mild noise, and the MR: the MR is picked."""
    ct, _ = sample_volume("ct_3mm")
    mr, _ = sample_volume("mr_3mm")
    noisy = make_volume(ct.array + np.random.default_rng(0).normal(0, 10, ct.array.shape).astype(ct.array.dtype),
                        "ct-noisy", ct.spacing)
    cache = FeatureCache(tmp_path / "features")

    def feature(volume):
        return lambda: cache.get(volume.key, lambda: image_features(lite_segmenter, volume, slices=2))

    pick = pick_diverse({"ct_3mm": feature(ct)}, {"ct_noisy": feature(noisy), "mr_3mm": feature(mr)})
    assert pick.image_id == "mr_3mm" and pick.scores["mr_3mm"] > 2 * pick.scores["ct_noisy"]
    assert len(list((tmp_path / "features").glob("*.npy"))) == 3
    again = FeatureCache(tmp_path / "features").get(mr.key, lambda: pytest.fail("features not cached on disk"))
    assert np.allclose(again, feature(mr)())


def test_mask_disagreement():
    a = np.zeros((10, 10), bool)
    a[2:6, 2:6] = True
    b = np.zeros_like(a)
    b[4:8, 4:8] = True
    assert mask_disagreement([a, a, a]) == 0.0
    assert mask_disagreement([a, b]) == pytest.approx(1 - dice(a, b))
    assert mask_disagreement([a, ~a]) == 1.0


def test_box_uncertainty_is_higher_for_a_vague_draft(sample_volume, lite_segmenter):
    """The liver (clear edges) against a draft square inside the liver, whose jittered boxes hold
    nothing but liver texture: the model's masks agree on the first and not on the second."""
    volume, label = sample_volume("ct_3mm")
    names = json.loads((SAMPLE_DIR / "labels.json").read_text())["ct_3mm"]
    liver = label.array == next(int(v) for v, n in names.items() if n == "liver")
    clear = box_uncertainty(lite_segmenter, volume, liver.astype(np.uint8), slices=1, boxes=3)
    k = int(np.argmax(liver.reshape(liver.shape[0], -1).sum(axis=1)))
    ys, xs = np.nonzero(liver[k])
    cy, cx = int(np.median(ys)), int(np.median(xs))
    vague = np.zeros_like(liver, dtype=np.uint8)
    vague[k, cy - 6:cy + 6, cx - 6:cx + 6] = 1
    unsure = box_uncertainty(lite_segmenter, volume, vague, slices=1, boxes=3)
    # measured: liver 0.23 (edges cut by inward jitter), square 0.99
    assert 0 <= clear < 0.4 and unsure > clear + 0.3 and unsure <= 1


def test_draft_dice_matches_hand_computed():
    draft = np.zeros((2, 4, 4), np.uint8)
    final = np.zeros_like(draft)
    draft[0, :2, :2] = 1  # 4 voxels
    final[0, :2, :3] = 2  # 6 voxels, 4 shared; any label value is foreground
    assert draft_dice(draft, final) == pytest.approx(2 * 4 / (4 + 6))
    assert draft_dice(final, final) == 1.0
