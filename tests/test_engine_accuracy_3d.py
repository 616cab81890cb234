"""The real LiteMedSAM on the sample data in 3D: one 3D box per organ, as `main.py eval --mode 3d`
draws it (the union of the organ's slice boxes over its slice range), DSC floors per organ.

Measured with the bundled checkpoint and the CPU default encoder (model DSC / filled-box DSC over
the range; README "3D"): ct_3mm liver 0.905/0.484, spleen 0.851/0.409, kidney_left 0.875/0.480,
kidney_right 0.906/0.564, aorta 0.842/0.395; ct_512 liver 0.976/0.715, spleen 0.966/0.650;
mr_3mm spleen 0.833/0.448, inferior_vena_cava 0.816/0.714. Ribs, whose 3D box gets the bone window
and is decoded with the rib's own box on each slice (the lower of OpenVINO fp32's and `ov-mixed`'s
figures; propagated in the soft-tissue window they were 0.05-0.60): ct_512 rib_left_8 0.753/0.315,
rib_left_9 0.768/0.204, rib_right_8 0.768/0.226; ct_3mm rib_right_8 0.853/0.160, rib_right_10
0.774/0.057. Floors are those minus 0.05; each must also beat the filled box by `gap`.

Key-slice boxes, as `main.py eval --mode 3d-keys` draws them (each organ's exact boxes on its ends and
middle), with the rounded boxes between them (README "3d-keys"; with linear boxes in brackets): ct_3mm
spleen 0.938 (0.764), gallbladder 0.834 (0.669), vertebrae_L1 0.666 (0.456). Floors are the lower of
the default's and OpenVINO fp32's figures minus 0.05, each above the linear boxes' figure.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import dice, label_value
from medsam_engine import Box3DPrompt, KeySlicesPrompt
from medsam_engine.evaluate import key_slices
from medsam_engine.geometry import mask_box

# image, organ, volume DSC floor, required gap above the filled box
CASES = [
    ("ct_3mm", "liver", 0.85, 0.3),
    ("ct_3mm", "spleen", 0.80, 0.3),
    ("ct_3mm", "kidney_left", 0.82, 0.3),
    ("ct_3mm", "kidney_right", 0.85, 0.3),
    ("ct_3mm", "aorta", 0.79, 0.3),
    ("ct_512", "liver", 0.92, 0.2),
    ("ct_512", "spleen", 0.91, 0.2),
    ("mr_3mm", "spleen", 0.78, 0.3),
    ("mr_3mm", "inferior_vena_cava", 0.76, 0.05),
    ("ct_512", "rib_left_8", 0.70, 0.3),
    ("ct_512", "rib_left_9", 0.71, 0.4),
    ("ct_512", "rib_right_8", 0.71, 0.4),
    ("ct_3mm", "rib_right_8", 0.80, 0.5),
    ("ct_3mm", "rib_right_10", 0.72, 0.6),
]


@pytest.mark.parametrize("image, organ, floor, gap", CASES, ids=[f"{i}-{o}" for i, o, _, _ in CASES])
def test_lite_3d_box_dsc_floor_per_organ(sample_volume, lite_segmenter, image: str, organ: str,
                                         floor: float, gap: float) -> None:
    volume, label = sample_volume(image)
    truth = label.array == label_value(image, organ)
    slices = np.flatnonzero(truth.any(axis=(1, 2)))
    first, last = int(slices[0]), int(slices[-1])
    box = mask_box(truth.any(axis=0))
    filled = np.zeros_like(truth)
    x0, y0, x1, y1 = (int(v) for v in box)
    filled[first:last + 1, y0:y1 + 1, x0:x1 + 1] = True

    result = lite_segmenter.segment(volume, [Box3DPrompt(box=box, first=first, last=last)])
    mask = result.label == 1
    assert not mask[:first].any() and not mask[last + 1:].any()  # nothing outside the box's range
    assert not (mask & ~filled).any()  # nor outside the box
    model_dsc, box_dsc = dice(mask, truth), dice(filled, truth)
    assert model_dsc >= floor, f"{image} {organ}: 3D DSC {model_dsc:.3f} < {floor}"
    assert model_dsc >= box_dsc + gap, f"{image} {organ}: 3D DSC {model_dsc:.3f} vs filled box {box_dsc:.3f}"
    obj = result.objects[0]
    assert result.cache_misses <= last - first + 1 + obj.zoomed_slices  # each slice encoded once at most
    if obj.preprocessing == "window:bone:1800/400":  # decoded once per slice of the bone's own boxes
        assert obj.decoded_boxes == len(obj.slices)
    else:  # the given box on every slice of the range, then the walk
        assert obj.decoded_boxes >= last - first + 1


KEY_CASES = [
    ("ct_3mm", "spleen", 0.88),
    ("ct_3mm", "gallbladder", 0.78),
    ("ct_3mm", "vertebrae_L1", 0.61),
]


@pytest.mark.parametrize("image, organ, floor", KEY_CASES, ids=[f"{i}-{o}" for i, o, _ in KEY_CASES])
def test_lite_key_slices_dsc_floor_per_organ(sample_volume, lite_segmenter, image: str, organ: str,
                                             floor: float) -> None:
    volume, label = sample_volume(image)
    truth = label.array == label_value(image, organ)
    keys = key_slices(np.flatnonzero(truth.any(axis=(1, 2))), truth, 3)
    result = lite_segmenter.segment(volume, [KeySlicesPrompt(boxes={k: mask_box(truth[k]) for k in keys})])
    mask = result.label == 1
    assert result.objects[0].slices == list(range(keys[0], keys[-1] + 1))
    model_dsc = dice(mask, truth)
    assert model_dsc >= floor, f"{image} {organ}: key-slice DSC {model_dsc:.3f} < {floor}"
