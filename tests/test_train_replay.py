"""Replay in the engine's fine-tuning: objects of other label values join the training set, never
the objects the publish gate validates on (the anchor set, the validation slices) nor the same
label value on a slice next to one. One tiny run with the real LiteMedSAM on the CPU."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from engine_helpers import MR_LIVER as LIVER, MR_OTHERS as OTHERS, mr_liver_split
from medsam_engine.dataset import per_object
from medsam_engine.training import TrainConfig, plan_samples, train


def test_replayed_objects_are_other_organs_and_never_gate_objects(mr_cases, tmp_path: Path):
    fit, val, others = mr_liver_split(mr_cases)
    cfg = TrainConfig(output_dir=tmp_path, max_anchor_objects=3, replay=3)
    train_samples, val_objects, anchors, replay = plan_samples(cfg, mr_cases, fit, val, others)
    assert train_samples == fit and len(anchors) == 3
    assert len(replay) == 3 * len(fit) == len(set(replay))
    candidates = set(per_object(others))
    assert all(len(s.values) == 1 for s in replay) and set(replay) <= candidates
    gate = [*val_objects, *anchors]
    for s in replay:  # not a gate object, nor the same organ on a neighbouring slice
        assert not any(g.case == s.case and g.values == s.values and abs(g.slice - s.slice) <= 1 for g in gate), s
    counts = Counter(s.values[0] for s in replay)
    assert set(counts) == OTHERS and max(counts.values()) - min(counts.values()) <= 1  # every organ, evenly
    assert plan_samples(TrainConfig(output_dir=tmp_path, replay=0), mr_cases, fit, val, others)[3] == []
    # all the candidates asked for: as many as there are, none twice
    everything = plan_samples(TrainConfig(output_dir=tmp_path, max_anchor_objects=0, replay=1000),
                              mr_cases, fit, val, others)[3]
    assert len(everything) == len(set(everything)) == len([s for s in candidates if not any(
        s.values == v.values and abs(s.slice - v.slice) <= 1 for v in val_objects)])


def test_default_run_trains_on_replayed_objects(mr_cases, tmp_path: Path):
    """At the defaults (the replay measured best with scripts/finetune_gain.py, 2 objects per
    training slice), each epoch draws the training slices and the replayed objects; the anchor set
    is still scored by the gate."""
    torch.set_num_threads(2)
    fit, val, others = mr_liver_split(mr_cases)
    cfg = TrainConfig(output_dir=tmp_path / "run", max_epochs=1, batch_size=2, device="cpu", early_stop_patience=0,
                      max_anchor_objects=2, publish_mode="never")
    assert cfg.replay == 2
    stats = train(cfg, mr_cases, fit, val, others)
    assert stats["replay_objects"] == 2 * len(fit) == 4 and stats["anchor_objects"] == 2
    assert stats["history"][0]["samples"] == len(fit) + 4 and stats["history"][0]["steps"] == 3
    assert set(stats["baseline_by_group"]) == {f"label {LIVER}", "anchor"}
    assert stats["config"]["replay"] == 2
