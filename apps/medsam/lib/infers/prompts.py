"""Translate MONAI Label infer requests (Slicer, OHIF, scripts) into engine prompts.

Coordinates arrive as voxel indices [i, j, k] of the image; the engine's volume array is
(Z, Y, X), so a point [i, j, k] is x = i, y = j on slice k.

- `boxes`: [[x0, y0, x1, y1, k], ...] (k may be left out for 2D images): one 2D box each.
- `roi` (Slicer): [i0, i1, j0, j1, k0, k1], ends in any order; one slice (or `slice` given)
  is a 2D box, more slices a 3D box.
- `foreground` clicks (OHIF): two or more on a slice make a box, their bounding rectangle;
  boxes on several slices are key slices. Single clicks on different slices (an oblique series
  shown as one plane) make one box on their median slice.
- `background` clicks refine a 2D box on the same slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from medsam_engine import Box3DPrompt, EngineInputError, KeySlicesPrompt, SlicePrompt
from medsam_engine.prompts import Prompt

LABEL_VALUE = 1  # Slicer and OHIF deepgrow clients map the mask's value 1 to the chosen segment


@dataclass
class Translation:
    """The engine prompts of one request, and where the user looked (for background encoding)."""

    prompts: list[Prompt]
    mode: str  # "2d", "3d-box" or "key-slices"
    focus: tuple[Sequence[float], int]  # (box, slice) the user drew on


def _numbers(value: Any, what: str, lengths: tuple[int, ...]) -> list[float]:
    """A list of finite numbers with one of the allowed lengths, else an input error."""
    if not isinstance(value, (list, tuple)):
        raise EngineInputError(f"{what} must be a list of numbers, got {value!r}")
    if len(value) not in lengths:
        raise EngineInputError(f"{what} must have {' or '.join(map(str, lengths))} numbers, got {value!r}")
    try:
        numbers = [float(v) for v in value if not isinstance(v, (bool, str))]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != len(value):
        raise EngineInputError(f"{what} must hold numbers, got {value!r}")
    if not all(np.isfinite(numbers)):
        raise EngineInputError(f"{what} must hold finite numbers, got {value!r}")
    return numbers


def _slice_index(value: float, what: str) -> int:
    if not float(value).is_integer():
        raise EngineInputError(f"{what}: slice index must be an integer, got {value}")
    return int(value)


def _points(raw: Any, what: str, default_k: int | None) -> list[tuple[float, float, int]]:
    """Clicks [i, j, k] (or [i, j] when the slice is known) as (x, y, k)."""
    if raw is None or raw == "":
        return []
    if not isinstance(raw, (list, tuple)):
        raise EngineInputError(f"{what} must be a list of [i, j, k] points, got {raw!r}")
    points = []
    for point in raw:
        values = _numbers(point, f"{what} point", (2, 3))
        if len(values) == 2:
            if default_k is None:
                raise EngineInputError(f"{what} point {point!r} needs a slice index: [i, j, k]")
            values.append(default_k)
        points.append((values[0], values[1], _slice_index(values[2], f"{what} point {point!r}")))
    return points


def _rectangle(points: Sequence[tuple[float, float, int]]) -> list[float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return [min(xs), min(ys), max(xs), max(ys)]


def _slice_param(params: dict, num_slices: int) -> int | None:
    """Slicer's `slice` (its 2D mode); 2D images have only slice 0."""
    value = params.get("slice")
    if value is None or value == "":
        return 0 if num_slices == 1 else None
    return _slice_index(_numbers([value], "slice", (1,))[0], "slice")


def translate(params: dict, num_slices: int) -> Translation:
    """The engine prompts for one request's parameters (see the module docstring)."""
    the_slice = _slice_param(params, num_slices)
    background = _points(params.get("background"), "background", the_slice)
    if params.get("boxes"):
        return _from_boxes(params["boxes"], the_slice)
    if params.get("roi"):
        return _from_roi(params["roi"], the_slice, _points(params.get("foreground"), "foreground", the_slice),
                         background)
    foreground = _points(params.get("foreground"), "foreground", the_slice)
    if the_slice is not None:
        foreground = [p for p in foreground if p[2] == the_slice]
    if not foreground:
        raise EngineInputError("no box given: send `roi`, `boxes`, or two or more `foreground` clicks "
                               "(opposite corners of the box)")
    return _from_clicks(foreground, background)


def _from_boxes(raw: Any, the_slice: int | None) -> Translation:
    if not isinstance(raw, (list, tuple)):
        raise EngineInputError(f"boxes must be a list of [x0, y0, x1, y1, k], got {raw!r}")
    prompts: list[Prompt] = []
    for entry in raw:
        values = _numbers(entry, "box", (4, 5) if the_slice is not None else (5,))
        k = the_slice if len(values) == 4 else _slice_index(values[4], f"box {entry!r}")
        prompts.append(SlicePrompt(box=values[:4], slice=k, label=LABEL_VALUE))  # type: ignore[arg-type]
    if not prompts:
        raise EngineInputError("boxes is empty")
    first = prompts[0]
    return Translation(prompts, "2d", (first.box, first.slice))  # type: ignore[union-attr]


def _from_roi(raw: Any, the_slice: int | None, foreground: list, background: list) -> Translation:
    values = _numbers(raw, "roi", (4, 6))
    box = [min(values[0], values[1]), min(values[2], values[3]), max(values[0], values[1]), max(values[2], values[3])]
    if len(values) == 4:
        if the_slice is None:
            raise EngineInputError("roi [i0, i1, j0, j1] needs `slice`, or give [i0, i1, j0, j1, k0, k1]")
        first = last = the_slice
    else:
        first, last = sorted(_slice_index(v, "roi") for v in values[4:6])
    if the_slice is not None:
        first = last = the_slice
    if first == last:
        fg = [(x, y) for x, y, k in foreground if k == first]
        bg = [(x, y) for x, y, k in background if k == first]
        return Translation([SlicePrompt(box=box, slice=first, label=LABEL_VALUE, foreground=fg, background=bg)],
                           "2d", (box, first))
    return Translation([Box3DPrompt(box=box, first=first, last=last, label=LABEL_VALUE)], "3d-box",
                       (box, (first + last) // 2))


def _from_clicks(foreground: list[tuple[float, float, int]], background: list) -> Translation:
    if len(foreground) == 1:
        raise EngineInputError("a single click does not make a box: click two opposite corners of the object "
                               "(or the ends of its long and short axes) on one slice")
    by_slice: dict[int, list[tuple[float, float, int]]] = {}
    for point in foreground:
        by_slice.setdefault(point[2], []).append(point)
    if all(len(points) == 1 for points in by_slice.values()):
        # Oblique series: clicks made on one displayed plane can land on neighbouring k indices.
        by_slice = {int(np.median([p[2] for p in foreground])): foreground}
    lonely = sorted(k for k, points in by_slice.items() if len(points) == 1)
    if lonely:
        raise EngineInputError(f"slice(s) {lonely} have a single click: a box needs two clicks on a slice")
    if len(by_slice) == 1:
        (k, points), = by_slice.items()
        box = _rectangle(points)
        bg = [(x, y) for x, y, kb in background if kb == k]
        return Translation([SlicePrompt(box=box, slice=k, label=LABEL_VALUE, background=bg)], "2d", (box, k))
    boxes = {k: _rectangle(points) for k, points in sorted(by_slice.items())}
    middle = sorted(boxes)[len(boxes) // 2]
    return Translation([KeySlicesPrompt(boxes=boxes, label=LABEL_VALUE)], "key-slices",  # type: ignore[arg-type]
                       (boxes[middle], middle))
