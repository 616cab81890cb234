"""Distillation in the engine's fine-tuning: extra boxes of a training slice's other labelled
objects (never trained on, never a gate object) are decoded by the student and by a frozen copy of
the starting decoder (the teacher), and the loss pulls the student towards the teacher's masks.
With the real LiteMedSAM on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_helpers import MR_LIVER as LIVER, mr_liver_split
from medsam_engine import Segmenter, load_model
from medsam_engine.dataset import DISTILL_BOXES, SliceDataset, distill_objects, index_slices, model_boxes
from medsam_engine.errors import EngineInputError
from medsam_engine.geometry import Fit
from medsam_engine.models import InputGeometry
from medsam_engine.training import Distilled, PromptedSam, TrainConfig, distill_loss, prepare_batch, train


def test_distilled_objects_are_other_objects_of_training_slices_never_skipped(mr_cases):
    fit = mr_liver_split(mr_cases)[0]
    every = {(s.case, s.slice): s.values for s in index_slices(mr_cases)}
    skip = {(fit[0].case, fit[0].slice, v) for v in every[(fit[0].case, fit[0].slice)] if v != LIVER}
    found = distill_objects(mr_cases, fit, skip)
    assert set(found) <= {(s.case, s.slice) for s in fit} and (fit[1].case, fit[1].slice) in found
    for key, values in found.items():
        assert LIVER not in values and set(values) <= set(every[key])
        assert not any((*key, v) in skip for v in values)
    assert set(found[(fit[1].case, fit[1].slice)]) == set(every[(fit[1].case, fit[1].slice)]) - {LIVER}


def test_distill_boxes_follow_the_zoomed_tile_and_are_padded():
    tile = Fit(64, 64, InputGeometry(256, letterbox=True))  # a 64 px tile at (y0, x0) = (100, 200): 4 model px a pixel
    boxes, valid = model_boxes([(210, 110, 230, 120), (190, 90, 300, 300), (0, 0, 50, 50)], tile, (100, 200, 164, 264))
    assert boxes.shape == (DISTILL_BOXES, 4) and valid.tolist() == [True, True, False, False]
    assert boxes[0].tolist() == [40, 40, 120, 80]  # shifted into the tile, scaled
    assert boxes[1].tolist() == [0, 0, 252, 252]  # clipped to the tile
    whole = Fit(128, 64, InputGeometry(256, letterbox=True))
    assert model_boxes([(10, 20, 30, 40)], whole)[0][0].tolist() == [20, 40, 60, 80]


def test_distill_term_is_zero_for_the_teacher_and_grows_as_the_student_drifts(mr_cases):
    torch.set_num_threads(2)
    fit = mr_liver_split(mr_cases)[0]
    model = load_model("medsam-lite", device="cpu")
    dataset = SliceDataset(mr_cases, fit, Segmenter(model), train=True, distill=distill_objects(mr_cases, fit))
    item = dataset[1]
    assert item["distill_box"].shape == (DISTILL_BOXES, 4) and item["distill_valid"].any()
    batch = {k: v[None] for k, v in item.items()}
    images, _, args, _ = prepare_batch(batch)
    net = Distilled(PromptedSam(model.net)).train()
    with torch.no_grad():
        logits, _, student, teacher = net(images, *args)
        assert student.shape[0] == int(item["distill_valid"].sum()) and student.shape[1:] == logits.shape[1:]
        assert float(distill_loss(student, teacher)) == pytest.approx(0.0, abs=1e-6)
        for p in net.student.parameters():  # what training moves drifts (the encoder too); the teacher is a copy
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
        _, _, drifted, same = net(images, *args)
    assert torch.equal(same, teacher) and float(distill_loss(drifted, teacher)) > 1e-3
    assert not any(p.requires_grad for p in [*net.teacher.parameters(), *net.teacher_encoder.parameters()])
    net.student.net.image_encoder.requires_grad_(False)  # a frozen encoder: the teacher decodes the student's embedding
    assert Distilled(net.student).teacher_encoder is None


def test_distill_option_is_validated(tmp_path: Path):
    with pytest.raises(EngineInputError, match="distill"):
        TrainConfig(output_dir=tmp_path, distill=-1)
    assert TrainConfig(output_dir=tmp_path).distill == 50  # the default measured with scripts/finetune_gain.py


def test_run_with_distill_trains_on_distilled_objects(mr_cases, tmp_path: Path):
    torch.set_num_threads(2)
    fit, val, others = mr_liver_split(mr_cases)
    cfg = TrainConfig(output_dir=tmp_path / "run", max_epochs=1, batch_size=2, device="cpu", early_stop_patience=0,
                      max_anchor_objects=2, publish_mode="never", replay=0)
    stats = train(cfg, mr_cases, fit, val, others)
    assert stats["distill_objects"] > 0 and stats["config"]["distill"] == 50
    assert stats["history"][0]["samples"] == len(fit) and stats["history"][0]["train_loss"] > 0
