"""3D from 2D: a 3D box propagated slice by slice, or boxes interpolated between key slices."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from .geometry import Box, mask_box
from .metrics import dsc

# masks (H, W) and predicted IoUs of boxes on slice k, decoded together; `tight` marks boxes drawn
# around the object (not derived from a neighbour's mask)
SliceDecoder = Callable[[int, Sequence[Box], bool], list[tuple[np.ndarray, float]]]
Masks = dict[int, np.ndarray]
Ious = dict[int, float]


def grow_box(box: Box, bound: Box, margin: float) -> Box:
    """Box enlarged by `margin` pixels on every side, kept inside `bound`."""
    return (max(box[0] - margin, bound[0]), max(box[1] - margin, bound[1]),
            min(box[2] + margin, bound[2]), min(box[3] + margin, bound[3]))


def inside(mask: np.ndarray, box: Box) -> np.ndarray:
    """The mask with everything outside `box` (inclusive pixel bounds) removed."""
    kept = np.zeros_like(mask)
    x0, y0 = max(0, int(np.floor(box[0]))), max(0, int(np.floor(box[1])))
    x1, y1 = int(np.ceil(box[2])), int(np.ceil(box[3]))
    kept[y0:y1 + 1, x0:x1 + 1] = mask[y0:y1 + 1, x0:x1 + 1]
    return kept


def _box_iou(a: Box, b: Box) -> float:
    def area(x: Box) -> float:
        return (x[2] - x[0] + 1) * (x[3] - x[1] + 1)
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + 1) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + 1)
    return inter / (area(a) + area(b) - inter)


@dataclass(frozen=True)
class PropagationRule:
    """How masks travel from slice to slice.

    Each next slice's box is the previous mask's box grown by `margin_fraction` of the bounding
    box's longest side (at least 2 px), kept inside the bounding box. With `given_box_proposal`, the
    given box's own mask on that slice competes with it, and the one that agrees best (Dice) with
    the previous slice's mask is kept. `seed` picks where one-box propagation starts: "middle" of
    the slice range, or "fill", the slice whose given-box mask fills the box best (box IoU of the
    mask's bounding box with the given box, times the predicted IoU) among those at least
    `seed_edge` of the range's length from its ends (near the ends the object is smallest in the
    box, and a mask that spreads over the loose box fills it best). A direction stops at an empty
    mask or at the range's end. With `bone_boxes`, a 3D box in the bone window is not propagated: each
    slice is decoded with the box of the bone it was drawn around (`preprocess.bone_boxes`).
    `rounded_keys`: boxes between key slices grow as a rounded object's sections do
    (`interpolate_boxes`), not linearly."""

    margin_fraction: float = 0.1
    given_box_proposal: bool = True
    seed: str = "fill"
    seed_edge: float = 0.2
    bone_boxes: bool = True
    rounded_keys: bool = True

    @property
    def decodes_given_box_everywhere(self) -> bool:
        """Whether the given box is decoded on every slice of the range (so all of them are encoded)."""
        return self.seed == "fill"

    def margin(self, bound: Box) -> float:
        return max(2.0, self.margin_fraction * max(bound[2] - bound[0], bound[3] - bound[1]))


def _walk(decode: SliceDecoder, start_mask: np.ndarray, slices: range, bound: Box, rule: PropagationRule,
          given: Box | None, masks: Masks, ious: Ious, known: dict[int, tuple[np.ndarray, float]]) -> None:
    """Propagate from `start_mask` over `slices` in order, writing into masks/ious. `known` holds
    given-box decodes already made (slice -> (mask, iou)); new ones are added to it."""
    margin = rule.margin(bound)
    previous = start_mask
    for k in slices:
        found = mask_box(previous)
        if found is None:
            return
        box = grow_box(found, bound, margin)
        if box[2] - box[0] < 1 or box[3] - box[1] < 1:
            return
        boxes = [box]
        if given is not None and k not in known:
            boxes.append(given)
        decoded = decode(k, boxes, False)
        if given is not None and k not in known:
            known[k] = decoded[1]
        proposals = [decoded[0]] + ([known[k]] if given is not None else [])
        scores = [dsc(inside(m, bound), previous) for m, _ in proposals]
        best = int(np.argmax(scores))
        masks[k], ious[k] = inside(proposals[best][0], bound), proposals[best][1]
        previous = masks[k]


def fill_score(mask: np.ndarray, iou: float, box: Box) -> float:
    """How well a given-box mask fills its box: box IoU of the mask's bounding box with `box`, times
    the predicted IoU (0 for an empty mask)."""
    found = mask_box(mask)
    return 0.0 if found is None else _box_iou(found, box) * iou


def seed_order(given: dict[int, tuple[np.ndarray, float]], box: Box, first: int, last: int,
               edge: float = 0.0) -> list[int]:
    """Slices first..last as seeds, best first: the slices within `edge` of the range's length from
    its ends after all others, then by the `fill_score` of their given-box decodes (`given`: slice
    -> (mask, iou)), then by nearness to the middle slice."""
    middle, margin = (first + last) // 2, int(edge * (last - first + 1))

    def near_end(k: int) -> bool:
        return k < first + margin or k > last - margin

    return sorted(range(first, last + 1), key=lambda k: (near_end(k), -fill_score(*given[k], box), abs(k - middle)))


def propagate(decode: SliceDecoder, box: Box, first: int, last: int,
              rule: PropagationRule = PropagationRule(), seed: int | None = None) -> tuple[Masks, Ious]:
    """Segment a seed slice of [first, last] with `box` (the rule's choice, or `seed`), then walk up
    and down (see PropagationRule). Masks never leave `box`."""
    known: dict[int, tuple[np.ndarray, float]] = {}
    middle = (first + last) // 2
    if rule.seed == "fill":
        for k in range(first, last + 1):
            known[k] = decode(k, [box], False)[0]
        if seed is None:
            seed = seed_order(known, box, first, last, rule.seed_edge)[0]
    elif rule.seed == "middle":
        seed = middle if seed is None else seed
        known[seed] = decode(seed, [box], False)[0]
    else:
        raise ValueError(f"unknown seed rule {rule.seed!r}")
    if not first <= seed <= last:
        raise ValueError(f"seed slice {seed} is outside {first}..{last}")
    masks: Masks = {seed: inside(known[seed][0], box)}
    ious: Ious = {seed: known[seed][1]}
    given = box if rule.given_box_proposal else None
    _walk(decode, masks[seed], range(seed + 1, last + 1), box, rule, given, masks, ious, known)
    _walk(decode, masks[seed], range(seed - 1, first - 1, -1), box, rule, given, masks, ious, known)
    return masks, ious


def interpolate_boxes(key_boxes: dict[int, Box], rounded: bool = True,
                      bound: Box = (-np.inf, -np.inf, np.inf, np.inf)) -> dict[int, Box]:
    """Boxes on every slice from the first to the last key slice, piecewise between key slices: the
    centre moves linearly, and so does each side's length unless `rounded`, where it follows an
    ellipse's chord from the smaller key box to the larger (fast near the smaller, flat near the
    larger, as a rounded object's section grows from its tip). Kept inside `bound` (the slice)."""
    keys = sorted(key_boxes)
    boxes: dict[int, Box] = {keys[0]: key_boxes[keys[0]]}
    low, high = np.asarray(bound[:2]), np.asarray(bound[2:])
    for a, b in zip(keys, keys[1:]):
        box_a, box_b = np.asarray(key_boxes[a], dtype=float), np.asarray(key_boxes[b], dtype=float)
        centre_a, centre_b = (box_a[:2] + box_a[2:]) / 2, (box_b[:2] + box_b[2:]) / 2
        size_a, size_b = box_a[2:] - box_a[:2], box_b[2:] - box_b[:2]
        for k in range(a + 1, b):
            t = (k - a) / (b - a)
            share = np.where(size_b >= size_a, np.sqrt(1 - (1 - t) ** 2), 1 - np.sqrt(1 - t ** 2)) if rounded else t
            centre, half = (1 - t) * centre_a + t * centre_b, (size_a + share * (size_b - size_a)) / 2
            corners = np.concatenate([np.maximum(centre - half, low), np.minimum(centre + half, high)])
            boxes[k] = tuple(float(v) for v in corners)  # type: ignore[assignment]
        boxes[b] = key_boxes[b]
    return boxes
