"""Simulated annotators: loose boxes drawn around an object, and corrective clicks on a mask's errors."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .geometry import Box


@dataclass(frozen=True)
class Click:
    """A click at pixel (x, y) of a slice: `positive` adds the object there, else removes it."""

    x: float
    y: float
    positive: bool


def loose_box(box: Box, pct: float, rng: np.random.Generator, height: int, width: int) -> Box:
    """`box` with each edge moved outwards only, by a random 0..`pct` % of the box's side along that
    axis (whole pixels, rounded up), clipped to the slice: never smaller than `box`."""
    if pct <= 0:
        return box
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    dx0, dx1 = (math.ceil(f * w) for f in rng.uniform(0, pct / 100, size=2))
    dy0, dy1 = (math.ceil(f * h) for f in rng.uniform(0, pct / 100, size=2))
    return (float(max(0, x0 - dx0)), float(max(0, y0 - dy0)),
            float(min(width - 1, x1 + dx1)), float(min(height - 1, y1 + dy1)))


def _largest_region(error: np.ndarray) -> np.ndarray | None:
    """The largest 8-connected region of a boolean error mask, or None when there is no error."""
    labels, count = ndimage.label(error, structure=np.ones((3, 3), dtype=bool))
    if count == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    return labels == int(np.argmax(sizes)) + 1


def next_click(pred: np.ndarray, gt: np.ndarray) -> Click | None:
    """The standard corrective click: at the centre (largest distance to the region's border, the
    slice's edge counting as border) of the largest connected error region; positive when that
    region is missed object, negative when it is false mask. None when the mask is exact."""
    pred, gt = pred.astype(bool), gt.astype(bool)
    regions = [(r, True) for r in [_largest_region(gt & ~pred)] if r is not None]
    regions += [(r, False) for r in [_largest_region(pred & ~gt)] if r is not None]
    if not regions:
        return None
    region, positive = max(regions, key=lambda rp: (int(rp[0].sum()), rp[1]))  # ties: the missed part
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return Click(float(x), float(y), positive)


def clicks_needed(curve: list[float], threshold: float) -> int:
    """NoC@threshold: clicks after the box until the DSC first reaches `threshold` (0: the box alone
    does); len(curve) - 1 (the cap) when it never does. curve[0] is the box's DSC."""
    return next((i for i, value in enumerate(curve) if value >= threshold), len(curve) - 1)
