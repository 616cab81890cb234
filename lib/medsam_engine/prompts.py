"""Prompt types: a box on one slice, a 3D box, or boxes on key slices."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass
class SlicePrompt:
    """A box [x0, y0, x1, y1] on slice `slice`, with optional clicks (x, y) to refine it."""

    box: Sequence[float]
    slice: int = 0
    label: int = 1
    foreground: list[tuple[float, float]] = field(default_factory=list)
    background: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Box3DPrompt:
    """A box [x0, y0, x1, y1] spanning slices first..last (inclusive): segmented on a seed slice,
    then propagated slice by slice (see propagation.PropagationRule)."""

    box: Sequence[float]
    first: int
    last: int
    label: int = 1


@dataclass
class KeySlicesPrompt:
    """Boxes drawn on a few key slices {slice: box}; boxes on the slices between are interpolated."""

    boxes: dict[int, Sequence[float]]
    label: int = 1


Prompt = SlicePrompt | Box3DPrompt | KeySlicesPrompt
