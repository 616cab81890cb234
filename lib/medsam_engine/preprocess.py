"""Intensity preprocessing as in the MedSAM paper: CT windows, percentile clipping, RGB kept.

Every normaliser maps raw intensities to 0-255 (float); the model input is that divided by 255.
Each has an `id` that enters the embedding cache key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import EngineInputError
from .geometry import Box, mask_box

CT_WINDOWS: dict[str, tuple[float, float]] = {  # name -> (width, level), HU
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -160.0),
    "brain": (80.0, 40.0),
    "bone": (1800.0, 400.0),
}
MODALITIES = ("CT", "MR", "XR", "US", "RGB", "OTHER")


@dataclass(frozen=True)
class Window:
    """CT window: clip to [level - width/2, level + width/2], then 0-255."""

    name: str
    width: float
    level: float

    @property
    def id(self) -> str:
        return f"window:{self.name}:{self.width:g}/{self.level:g}"

    def apply(self, values: np.ndarray) -> np.ndarray:
        low = self.level - self.width / 2
        return (np.clip(values, low, low + self.width) - low) * (255.0 / self.width)


@dataclass(frozen=True)
class PercentileClip:
    """Clip to bounds taken from the whole volume's 0.5 and 99.5 percentiles, then 0-255."""

    low: float
    high: float

    @property
    def id(self) -> str:
        return f"clip:{self.low:.6g}:{self.high:.6g}"

    def apply(self, values: np.ndarray) -> np.ndarray:
        span = max(self.high - self.low, 1e-8)
        return (np.clip(values, self.low, self.high) - self.low) * (255.0 / span)


@dataclass(frozen=True)
class KeepRGB:
    """RGB images are kept as they are (8-bit)."""

    id: str = "rgb"

    def apply(self, values: np.ndarray) -> np.ndarray:
        return np.clip(values, 0, 255).astype(np.float32)


Normaliser = Window | PercentileClip | KeepRGB


def parse_window(spec: str | dict | tuple | None) -> Window | None:
    """A preset name ("lung"), "W/L" text ("400/40"), {"width", "level"}, or (width, level)."""
    if spec is None or spec == "" or spec == "auto":
        return None
    if isinstance(spec, str):
        key = spec.strip().lower().replace(" ", "_").replace("-", "_")
        if key in ("soft", "abdomen", "soft_tissue"):
            key = "soft_tissue"
        if key in CT_WINDOWS:
            return Window(key, *CT_WINDOWS[key])
        if "/" in spec:  # split the caller's text: the preset key above has "-" turned into "_"
            width, level = spec.split("/", 1)
            return _custom_window(width.strip(), level.strip())
        raise EngineInputError(f"unknown CT window {spec!r}; presets: {', '.join(CT_WINDOWS)} or 'W/L'")
    if isinstance(spec, dict):
        return _custom_window(spec.get("width"), spec.get("level"))
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return _custom_window(*spec)
    raise EngineInputError(f"cannot read CT window {spec!r}")


def _custom_window(width: object, level: object) -> Window:
    try:
        w, lv = float(width), float(level)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise EngineInputError(f"CT window needs numeric width and level, got {width!r}/{level!r}") from None
    if not (np.isfinite(w) and np.isfinite(lv)) or w <= 0:
        raise EngineInputError(f"CT window width must be a positive number, got {width!r}")
    return Window("custom", w, lv)


def infer_modality(volume: np.ndarray) -> str:
    """CT when intensities go well below -500 (air in HU); RGB for 3-channel images; else MR-like."""
    if volume.ndim == 4 and volume.shape[-1] == 3:
        return "RGB"
    sample = volume[:: max(1, volume.shape[0] // 8)]
    return "CT" if float(np.percentile(sample, 1)) < -500 else "OTHER"


def normalise_modality(modality: str | None) -> str | None:
    """Upper-case and check a caller's modality (DICOM names such as "MR", "CT", "CR", "DX" allowed)."""
    if modality is None or modality == "":
        return None
    text = str(modality).strip().upper()
    aliases = {"MRI": "MR", "CR": "XR", "DX": "XR", "DR": "XR", "XRAY": "XR", "X-RAY": "XR", "MG": "XR",
               "ULTRASOUND": "US", "PT": "OTHER", "NM": "OTHER", "OT": "OTHER"}
    text = aliases.get(text, text)
    if text not in MODALITIES:
        raise EngineInputError(f"unknown modality {modality!r}; use one of {', '.join(MODALITIES)}")
    return text


LUNG_HU = (-980.0, -400.0)  # lung parenchyma: below soft tissue, above the air outside the body


def auto_window(region_hu: np.ndarray, context_hu: np.ndarray | None = None,
                lung_context: float = 0.5) -> Window:
    """Pick a CT window from the intensities inside the prompt's box and around it.

    Air-dominated boxes (median below -400 HU) get the lung window, bone-dominated ones (median
    above 300 HU) the bone window. A soft-tissue box whose surroundings (`context_hu`, a ring
    around the box) are at least `lung_context` lung parenchyma is a lesion in the lung: lung
    window. Everything else gets soft tissue (the paper's default for organs).
    """
    median = float(np.median(region_hu)) if region_hu.size else 0.0
    if median < -400:
        name = "lung"
    elif median > 300:
        name = "bone"
    elif context_hu is not None and context_hu.size and \
            float(((context_hu > LUNG_HU[0]) & (context_hu < LUNG_HU[1])).mean()) >= lung_context:
        name = "lung"
    else:
        name = "soft_tissue"
    return Window(name, *CT_WINDOWS[name])


BONE_HU = 200.0  # cortical and trabecular bone; partial-volume ribs on 3 mm slices reach it too
BONE_SHARE = 0.1  # of the box's middle (its central three fifths each way)
BONE_CONCENTRATION = 2.0  # times the bone share of the ring around the box


def drawn_around_bone(plane: np.ndarray, box: tuple[float, float, float, float]) -> bool:
    """Whether a box was drawn around a bone, from a plane of HU (for a 3D box, the maximum over its
    slices): bone over at least `BONE_SHARE` of the box's middle and `BONE_CONCENTRATION` times the
    share of the ring around the box (`box_context`). A rib's 3D box holds mostly soft tissue and fat
    on each slice, so its median picks the soft-tissue window, but over its slices the rib is a band
    through the box. Ribs along an organ's side lie at the edge of its box, not in its middle; bone
    around a box (the spinal canal) or beside it (back muscles) fails the ring test."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = (x1 - x0) / 5, (y1 - y0) / 5
    _, ring = box_context(plane, box)
    middle = plane[int(round(y0 + dy)):int(round(y1 - dy)) + 1, int(round(x0 + dx)):int(round(x1 - dx)) + 1]
    if not middle.size:
        return False
    share = float((middle > BONE_HU).mean())
    around = float((ring > BONE_HU).mean()) if ring.size else 0.0
    return share >= BONE_SHARE and share >= BONE_CONCENTRATION * around


def bone_boxes(volume: np.ndarray, box: Box, first: int, last: int) -> dict[int, Box]:
    """Slice -> the box of the bone a 3D box was drawn around, on each slice where it is: the bounding
    box of the largest 26-connected piece of HU > `BONE_HU` inside the 3D box (at least 1 px each way,
    inside the box); empty when the box holds no bone. A rib or a vertebra is one piece of bone, so
    its own boxes are tight on every slice where the drawn box is loose."""
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    bone = volume[first:last + 1, y0:y1 + 1, x0:x1 + 1] > BONE_HU
    pieces, count = ndimage.label(bone, structure=np.ones((3, 3, 3)))
    if not count:
        return {}
    largest = pieces == 1 + int(np.argmax(ndimage.sum_labels(bone, pieces, range(1, count + 1))))
    boxes = {}
    for k, plane in enumerate(largest, start=first):
        found = mask_box(plane)
        if found is not None:
            left, right = _widened(x0 + int(found[0]), x0 + int(found[2]), x0, x1)
            top, bottom = _widened(y0 + int(found[1]), y0 + int(found[3]), y0, y1)
            boxes[k] = (left, top, right, bottom)
    return boxes


def _widened(low: int, high: int, bound_low: int, bound_high: int) -> tuple[float, float]:
    """A pixel range [low, high] at least 1 px long, kept inside [bound_low, bound_high]."""
    high = min(max(high, low + 1), bound_high)
    return float(max(min(low, high - 1), bound_low)), float(high)


def box_context(plane: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(inside, ring): the values of a 2D plane inside a box and in a ring around it, half the box's
    size wide on each side (at least 2 px), clipped to the plane."""
    height, width = plane.shape[:2]
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    gx, gy = max(2, (x1 - x0 + 1) // 2), max(2, (y1 - y0 + 1) // 2)
    ox0, oy0, ox1, oy1 = max(0, x0 - gx), max(0, y0 - gy), min(width - 1, x1 + gx), min(height - 1, y1 + gy)
    outer = plane[oy0:oy1 + 1, ox0:ox1 + 1]
    ring = np.ones(outer.shape, dtype=bool)
    ring[y0 - oy0:y1 - oy0 + 1, x0 - ox0:x1 - ox0 + 1] = False
    return plane[y0:y1 + 1, x0:x1 + 1], outer[ring]


def percentile_clip(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> PercentileClip:
    """Bounds from the non-zero voxels of the whole volume (as MedSAM's MR preprocessing)."""
    values = volume[volume != 0] if np.any(volume != 0) else volume
    if values.size > 2_000_000:  # percentiles of a strided sample are within rounding of the full ones
        values = values.ravel()[:: values.size // 2_000_000 + 1]
    lo, hi = np.percentile(values, [low, high])
    return PercentileClip(float(lo), float(hi))
