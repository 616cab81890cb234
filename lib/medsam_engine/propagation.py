"""3D from 2D: propagate a 3D box slice by slice, or interpolate boxes between key slices."""

from __future__ import annotations

from typing import Callable

import numpy as np

from .geometry import Box, mask_box

SliceSegmenter = Callable[[int, Box], tuple[np.ndarray, float]]


def _grow(box: Box, bound: Box, margin: float) -> Box:
    """Box enlarged by `margin` pixels on every side, kept inside `bound`."""
    return (max(box[0] - margin, bound[0]), max(box[1] - margin, bound[1]),
            min(box[2] + margin, bound[2]), min(box[3] + margin, bound[3]))


def propagate(segment: SliceSegmenter, box: Box, first: int, last: int,
              margin_fraction: float = 0.1) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Segment the middle slice of [first, last] with `box`, then walk up and down: each next
    slice's box is the previous mask's bounding box, grown by a margin (a fraction of the given
    box's size, at least 2 px) and kept inside `box`. A direction stops at an empty mask."""
    margin = max(2.0, margin_fraction * max(box[2] - box[0], box[3] - box[1]))
    middle = (first + last) // 2
    masks: dict[int, np.ndarray] = {}
    ious: dict[int, float] = {}
    masks[middle], ious[middle] = segment(middle, box)
    for step, end in ((1, last), (-1, first)):
        previous = masks[middle]
        for k in range(middle + step, end + step, step):
            found = mask_box(previous)
            if found is None:
                break
            next_box = _grow(found, box, margin)
            if next_box[2] - next_box[0] < 1 or next_box[3] - next_box[1] < 1:
                break
            masks[k], ious[k] = segment(k, next_box)
            previous = masks[k]
    return masks, ious


def interpolate_boxes(key_boxes: dict[int, Box]) -> dict[int, Box]:
    """Boxes on every slice from the first to the last key slice, linear between key slices."""
    keys = sorted(key_boxes)
    boxes: dict[int, Box] = {keys[0]: key_boxes[keys[0]]}
    for a, b in zip(keys, keys[1:]):
        box_a, box_b = np.asarray(key_boxes[a]), np.asarray(key_boxes[b])
        for k in range(a + 1, b + 1):
            t = (k - a) / (b - a)
            boxes[k] = tuple(float(v) for v in (1 - t) * box_a + t * box_b)  # type: ignore[assignment]
    return boxes
