"""Boxes and masks between a slice's pixel grid and the model's square input.

Boxes are [x0, y0, x1, y1] in pixel indices of the slice (x = column, y = row), both ends
inclusive, as MedSAM derives them from masks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EngineInputError
from .models import InputGeometry

Box = tuple[float, float, float, float]


def check_box(box: Sequence[object], height: int, width: int) -> tuple[Box, bool]:
    """Validate a box: numeric, finite, four values; corners sorted; clipped to the slice.

    Returns the box and whether clipping changed it. Raises EngineInputError for a box that is
    not four finite numbers, lies wholly outside the slice, or has zero area.
    """
    if isinstance(box, (str, bytes)) or not isinstance(box, Sequence) and not isinstance(box, np.ndarray):
        raise EngineInputError(f"box must be four numbers [x0, y0, x1, y1], got {box!r}")
    if len(box) != 4:
        raise EngineInputError(f"box must have four numbers [x0, y0, x1, y1], got {len(box)}")
    try:
        values = [float(v) for v in box]  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EngineInputError(f"box values must be numbers, got {list(box)!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise EngineInputError(f"box values must be finite, got {values}")
    x0, x1 = sorted(values[0::2])
    y0, y1 = sorted(values[1::2])
    if x1 < 0 or y1 < 0 or x0 > width - 1 or y0 > height - 1:
        raise EngineInputError(f"box {values} lies outside the {width}x{height} image")
    clipped = (max(x0, 0.0), max(y0, 0.0), min(x1, width - 1.0), min(y1, height - 1.0))
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        raise EngineInputError(f"box {values} has zero area")
    return clipped, clipped != (x0, y0, x1, y1)


@dataclass(frozen=True)
class Fit:
    """The mapping of one (H, W) slice onto a model's square input."""

    height: int
    width: int
    geometry: InputGeometry

    @property
    def scale(self) -> tuple[float, float]:
        """(sy, sx): model pixels per slice pixel."""
        size = self.geometry.size
        if self.geometry.letterbox:
            s = size / max(self.height, self.width)
            return s, s
        return size / self.height, size / self.width

    @property
    def resized(self) -> tuple[int, int]:
        """Size of the resized slice inside the model input (before padding)."""
        sy, sx = self.scale
        return int(round(self.height * sy)), int(round(self.width * sx))

    def box_side(self, box: Box) -> float:
        """The longest side of a slice box ([x0, y0, x1, y1], ends inclusive) at the model input, in model px."""
        sy, sx = self.scale
        return max((box[2] - box[0] + 1) * sx, (box[3] - box[1] + 1) * sy)

    def box_to_model(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) slice boxes -> model-input boxes."""
        sy, sx = self.scale
        return np.asarray(boxes, dtype=np.float64) * np.array([sx, sy, sx, sy])

    def box_from_model(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) model-input boxes -> slice boxes."""
        sy, sx = self.scale
        return np.asarray(boxes, dtype=np.float64) / np.array([sx, sy, sx, sy])

    def image_to_model(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) float image in [0, 1] -> (1, 3, S, S) model input (bilinear resize, zero pad)."""
        size = self.geometry.size
        tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]
        h, w = self.resized
        tensor = F.interpolate(tensor, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return F.pad(tensor, (0, size - w, 0, size - h))

    def logits_to_slice(self, logits: torch.Tensor) -> torch.Tensor:
        """(N, 1, L, L) low-resolution logits over the model input -> (N, H, W) logits on the slice."""
        low = logits.shape[-1]
        h, w = self.resized
        ratio = low / self.geometry.size
        cropped = logits[..., : max(1, round(h * ratio)), : max(1, round(w * ratio))]
        return F.interpolate(cropped, size=(self.height, self.width), mode="bilinear", align_corners=False)[:, 0]


def mask_box(mask: np.ndarray) -> Box | None:
    """Bounding box [x0, y0, x1, y1] of a 2D mask's foreground, or None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1])
