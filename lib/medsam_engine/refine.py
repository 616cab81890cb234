"""Correcting a box's mask with clicks, on one slice, with any box-prompted model.

Methods (`METHODS`):
- `points`: the box and every click so far go to the prompt encoder together (SAM's way; MedSAM and
  LiteMedSAM were fine-tuned with boxes only, so the points are out of their training).
- `rules` (default): box prompts only. A foreground click outside the mask adds the component around
  it of a small box prompt centred on it, kept inside the object's box (unless the click is outside
  it: the box was drawn too small). A background click removes
  the connected part of the mask it falls in when that part is not the mask's main body, else the
  disc around the click that reaches the mask's border.

Chosen by simulation (`main.py eval --clicks N --refine rules points`); re-prompting with the mask's
box shrunk past a background click lowered the DSC on average and was dropped.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from .clicks import Click
from .errors import EngineInputError
from .geometry import Box
from .imageio import Volume

METHODS = ("rules", "points")
_EIGHT = np.ones((3, 3), dtype=bool)


def _component_at(mask: np.ndarray, x: int, y: int) -> np.ndarray:
    """The 8-connected component of `mask` holding pixel (x, y) (empty when that pixel is off)."""
    if not mask[y, x]:
        return np.zeros_like(mask)
    labels, _ = ndimage.label(mask, structure=_EIGHT)
    return labels == labels[y, x]


def _inside(shape: tuple[int, int], box: Box) -> np.ndarray:
    inside = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    return inside


class Refinement:
    """One object's mask on slice `k` of `volume`, from its box, corrected click by click (`add`)."""

    def __init__(self, seg, volume: Volume, k: int, box: Box, modality: str | None = None,
                 window: object = None, method: str = "rules", grow: float = 0.25, tally=None) -> None:
        if method not in METHODS:
            raise EngineInputError(f"unknown refinement {method!r}; use one of {', '.join(METHODS)}")
        self.seg, self.volume, self.k, self.box = seg, volume, k, box
        self.method, self.grow, self.tally = method, grow, tally
        self.norm = seg.normaliser(volume, seg.modality_of(volume, modality), window, box, k)
        self.clicks: list[Click] = []
        self.base = self._decode(box, tight=True)  # the box's own SliceMasks (iou, zoomed, prior)
        self.mask = self.base.masks[0]

    def _decode(self, box: Box, tight: bool = False, clicks: Sequence[Click] = ()):
        points = [([(c.x, c.y) for c in clicks if c.positive], [(c.x, c.y) for c in clicks if not c.positive])]
        return self.seg.segment_boxes(self.volume, self.k, [box], self.norm, points if clicks else None,
                                      tally=self.tally, tight=tight)

    def _segment(self, box: Box, tight: bool = False, clicks: Sequence[Click] = ()) -> np.ndarray:
        return self._decode(box, tight, clicks).masks[0]

    def add(self, click: Click) -> np.ndarray:
        """Apply one click; returns the corrected mask (also kept as `self.mask`)."""
        self.clicks.append(click)
        x, y = int(round(click.x)), int(round(click.y))
        if self.method == "points":
            self.mask = self._segment(self.box, tight=True, clicks=self.clicks)
        elif click.positive == bool(self.mask[y, x]):
            pass  # the click agrees with the mask already
        elif click.positive:
            self.mask = self.mask | self._grown_part(x, y)
        else:
            self.mask = self._without(x, y)
        return self.mask

    def _grown_part(self, x: int, y: int) -> np.ndarray:
        """The object part around a foreground click: a box prompt centred on it (`grow` of the object
        box's sides each way, at least 4 px), the component holding the click, inside the object box
        unless the click is outside it."""
        height, width = self.mask.shape
        x0, y0, x1, y1 = self.box
        hx, hy = max(4.0, self.grow * (x1 - x0 + 1)), max(4.0, self.grow * (y1 - y0 + 1))
        local = (max(0.0, x - hx), max(0.0, y - hy), min(width - 1.0, x + hx), min(height - 1.0, y + hy))
        part = self._segment(local) & _inside(self.mask.shape, local)
        if x0 <= x <= x1 and y0 <= y <= y1:  # a click outside the box says the box was drawn too small
            part &= _inside(self.mask.shape, self.box)
        found = _component_at(part, x, y)
        if not found.any():  # the model found nothing at the click: take the click's 3 x 3 pixels
            found = np.zeros_like(self.mask)
            found[max(0, y - 1):y + 2, max(0, x - 1):x + 2] = True
        return found

    def _without(self, x: int, y: int) -> np.ndarray:
        """The mask without the false part a background click falls in: the whole connected part when
        it is not the mask's main body, else the disc around the click reaching the mask's border."""
        part = _component_at(self.mask, x, y)
        if part.sum() * 2 < self.mask.sum():
            return self.mask & ~part
        radius = ndimage.distance_transform_edt(np.pad(self.mask, 1))[1:-1, 1:-1][y, x]
        rows, cols = np.ogrid[:self.mask.shape[0], :self.mask.shape[1]]
        return self.mask & ((rows - y) ** 2 + (cols - x) ** 2 > radius ** 2)


def clicks_from(foreground: Iterable[Sequence[float]], background: Iterable[Sequence[float]]) -> list[Click]:
    """OHIF's and Slicer's click lists as Clicks: foreground first, then background (the order is lost)."""
    return [Click(float(p[0]), float(p[1]), True) for p in foreground] + \
        [Click(float(p[0]), float(p[1]), False) for p in background]


def refine(seg, volume: Volume, k: int, box: Box, clicks: Iterable[Click], modality: str | None = None,
           window: object = None, method: str = "rules", tally=None) -> Refinement:
    """`box`'s mask on slice `k`, corrected by `clicks` in order: the Refinement, whose `mask` is the
    result (boolean (H, W)) and `base` the box's own SliceMasks."""
    run = Refinement(seg, volume, k, box, modality, window, method, tally=tally)
    for click in clicks:
        run.add(click)
    return run
