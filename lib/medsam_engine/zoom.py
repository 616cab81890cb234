"""Crop-and-zoom for small boxes.

A 10 px box in a 512 px slice is 5 px at LiteMedSAM's 256 px input: too few pixels for the mask
decoder's 4x-upsampled output. When a box is small in model pixels, the engine segments a square
crop around it instead, resized to the full model input, and pastes the result back.
"""

from __future__ import annotations

from dataclasses import dataclass

from .geometry import Box, Fit

Crop = tuple[int, int, int, int]  # (y0, x0, y1, x1), end exclusive


@dataclass(frozen=True)
class ZoomRule:
    """Zoom when the box's longest side is under `max_side` model pixels; the crop is a square of
    `context` times that side (at least `min_crop` slice pixels), kept inside the slice."""

    max_side: float = 40.0
    context: float = 3.0
    min_crop: int = 32

    def crop_for(self, box: Box, fit: Fit) -> Crop | None:
        """The crop to segment `box` in, or None to use the whole slice."""
        sy, sx = fit.scale
        width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
        if max(width * sx, height * sy) >= self.max_side:
            return None
        side = int(round(max(self.context * max(width, height), self.min_crop)))
        if side >= min(fit.height, fit.width):
            return None
        cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        x0 = int(round(min(max(cx - side / 2, 0), fit.width - side)))
        y0 = int(round(min(max(cy - side / 2, 0), fit.height - side)))
        return y0, x0, y0 + side, x0 + side
