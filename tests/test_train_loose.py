"""Training draws for 3D propagation (loose boxes) and the frozen encoder's reused embeddings."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from medsam_engine import Segmenter, load_model
from medsam_engine.datastore import list_cases
from medsam_engine.dataset import LOOSE_3D_SHARE, SliceDataset, index_slices, loose_box
from medsam_engine.geometry import Fit, mask_box
from medsam_engine.propagation import PropagationRule, grow_box
from medsam_engine.training import PromptedSam, TrainConfig, train


def _diagonal_square() -> np.ndarray:
    """A 12 px square moving 4 px down and right per slice over slices 1-6 of 8 (64 x 64)."""
    obj = np.zeros((8, 64, 64), bool)
    for k in range(1, 7):
        obj[k, 4 * k:4 * k + 12, 4 * k:4 * k + 12] = True
    return obj


def test_loose_boxes_are_the_3d_box_or_a_grown_neighbour_box():
    obj = _diagonal_square()
    box3d = mask_box(obj.any(axis=0))
    margin = PropagationRule().margin(box3d)
    rng = random.Random(0)
    for k in (1, 3, 6):
        neighbours = {grow_box(mask_box(obj[j]), box3d, margin) for j in (k - 1, k + 1) if obj[j].any()}
        drawn = [loose_box(obj, k, rng) for _ in range(300)]
        assert set(drawn) <= neighbours | {box3d}
        assert set(drawn) == neighbours | {box3d}  # every kind is drawn
        share = drawn.count(box3d) / len(drawn)
        assert abs(share - LOOSE_3D_SHARE) < 0.1
        for x0, y0, x1, y1 in drawn:  # never outside the 3D box
            assert x0 >= box3d[0] and y0 >= box3d[1] and x1 <= box3d[2] and y1 <= box3d[3]
    lone = np.zeros_like(obj)
    lone[4] = obj[4]
    assert {loose_box(lone, 4, rng) for _ in range(20)} == {mask_box(obj[4])}  # no neighbour: the 3D box


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 3.0))
    sitk.WriteImage(image, str(path))


@pytest.fixture()
def square_store(tmp_path: Path) -> Path:
    obj = _diagonal_square()
    rng = np.random.default_rng(0)
    image = rng.normal(100, 5, obj.shape).astype(np.float32) + 200 * obj
    (tmp_path / "labels" / "final").mkdir(parents=True)
    _write(image, tmp_path / "square.nii.gz")
    _write(obj.astype(np.uint8) * 2, tmp_path / "labels" / "final" / "square.nii.gz")
    return tmp_path


def test_loose_training_draws_prompt_with_propagation_boxes(square_store: Path, lite_segmenter):
    """With loose=1 every draw's box (in model pixels) is one loose_box could give; with loose=0 it
    is the slice's own box, jittered."""
    cases = list_cases(square_store)
    samples = index_slices(cases)
    obj = _diagonal_square()
    box3d = mask_box(obj.any(axis=0))
    margin = PropagationRule().margin(box3d)
    i = next(i for i, s in enumerate(samples) if s.slice == 3)
    fit = Fit(64, 64, lite_segmenter.model.geometry)
    allowed = fit.box_to_model(np.array([box3d, *(grow_box(mask_box(obj[j]), box3d, margin) for j in (2, 4))]))
    loose = SliceDataset(cases, samples, lite_segmenter, train=True, loose=1.0)
    def key(box) -> tuple[float, ...]:
        return tuple(round(float(v), 2) for v in box)

    drawn = {key(loose[i]["box"]) for _ in range(30)}
    assert drawn == {key(b) for b in allowed}
    own = fit.box_to_model(np.array([mask_box(obj[3])]))[0]
    tight = SliceDataset(cases, samples, lite_segmenter, train=True, loose=0.0)
    for _ in range(10):
        assert np.all(np.abs(tight[i]["box"].numpy() - own) <= 5 + 1e-4)


def test_frozen_encoder_embeddings_match_and_are_encoded_once(square_store: Path):
    model = load_model("medsam-lite", device="cpu")
    model.set_encoder("fp32-eager")
    calls = []
    model.net.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    segmenter = Segmenter(model)
    cases = list_cases(square_store)
    images = SliceDataset(cases, index_slices(cases), segmenter, train=False)
    embedded = SliceDataset(cases, index_slices(cases), segmenter, train=False, embed=True)
    first = embedded[2]
    assert first["image"].shape == (256, 64, 64) and len(calls) == 1
    for _ in range(3):
        assert torch.equal(embedded[2]["image"], first["image"])
    assert len(calls) == 1  # reused, not encoded again
    plain = images[2]
    net = PromptedSam(model.net).eval()
    with torch.no_grad():
        from_images = net(plain["image"][None], plain["box"][None])
        from_embeddings = PromptedSam(model.net, embedded=True).eval()(first["image"][None], first["box"][None])
    assert torch.allclose(from_images[0], from_embeddings[0], atol=1e-4)
    assert torch.allclose(from_images[1], from_embeddings[1], atol=1e-5)


def test_a_run_with_loose_boxes_and_reused_embeddings(square_store: Path, tmp_path: Path):
    cfg = TrainConfig(output_dir=tmp_path / "run", max_epochs=1, batch_size=2, device="cpu", loose_boxes=0.5,
                      max_anchor_objects=0, replay=0, distill=0, val_split=0.3, val_block=1)
    stats = train(cfg, list_cases(square_store))
    assert stats["status"] == "done" and stats["embeddings_reused"] is True
    with pytest.raises(Exception, match="loose_boxes"):
        TrainConfig(output_dir=tmp_path, loose_boxes=1.5)
