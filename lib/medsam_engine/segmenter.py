"""The stateful predictor: prepares slices, caches their embeddings, decodes boxes into labels."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from .cache import EmbeddingCache
from .errors import EngineInputError
from .geometry import Box, Fit, check_box
from .imageio import Volume
from .models import SamModel
from .preprocess import (CT_WINDOWS, KeepRGB, Normaliser, PercentileClip, Window, auto_window, bone_boxes,
                         box_context, drawn_around_bone, infer_modality, normalise_modality, parse_window, percentile_clip)
from .prompts import Box3DPrompt, KeySlicesPrompt, Prompt, SlicePrompt
from .prior import BoxPrior
from .refine import clicks_from, refine
from .propagation import PropagationRule, SliceDecoder, inside, interpolate_boxes, propagate
from .zoom import Crop, ZoomRule


@dataclass
class ObjectResult:
    """One prompted object: its label value, size and how it was segmented."""

    label: int
    voxels: int
    volume_ml: float
    slices: list[int]
    iou: dict[int, float]
    preprocessing: str
    clipped: bool
    zoomed_slices: int = 0
    prior_slices: int = 0
    decoded_boxes: int = 1


@dataclass
class SegmentationResult:
    label: np.ndarray  # (Z, Y, X) on the image's grid
    objects: list[ObjectResult]
    model: str
    modality: str
    timings_ms: dict[str, float] = field(default_factory=dict)
    cache_hits: int = 0
    cache_misses: int = 0

    @property
    def volume_ml(self) -> float:
        return sum(o.volume_ml for o in self.objects)


@dataclass
class SliceMasks:
    """Masks of N boxes on one slice."""

    logits: torch.Tensor  # (N, H, W)
    iou: list[float]
    zoomed: int
    prior: int = 0  # boxes whose logits the small-box prior shifted (see BoxPrior)

    @property
    def masks(self) -> np.ndarray:
        return (self.logits > 0).numpy()


class _Tally:
    """Per-call counters (the cache's own stats are global across calls and threads)."""

    def __init__(self) -> None:
        self.hits = self.misses = 0
        self.encode_ms = self.decode_ms = 0.0


class Segmenter:
    """Box-prompted segmentation of volumes and 2D images with a cached-embedding predictor.

    Thread-safe: the model only runs forward passes, and the cache serialises per key.
    """

    def __init__(self, model: SamModel, cache: EmbeddingCache | None = None,
                 zoom: ZoomRule | None = ZoomRule(), prior: BoxPrior | None = BoxPrior(),
                 propagation: PropagationRule = PropagationRule()) -> None:
        self.model = model
        self.propagation = propagation
        self.cache = cache if cache is not None else EmbeddingCache()  # an empty cache is falsy
        self.zoom = zoom
        self.prior = prior
        self._modalities: dict[str, str] = {}  # inferred modality per image key
        self._clips: dict[str, PercentileClip] = {}  # percentile bounds per image key
        self._memo_lock = threading.Lock()

    # ---- preprocessing -------------------------------------------------------------------
    def modality_of(self, volume: Volume, modality: str | None = None) -> str:
        """The caller's modality, else the one inferred from the intensities (cached per image)."""
        given = normalise_modality(modality)
        if volume.is_rgb:
            return "RGB"
        if given:
            return given
        return self._memo(self._modalities, volume.key, lambda: infer_modality(volume.array))

    def _memo(self, store: dict, key: str, compute: Callable[[], Any]) -> Any:
        """A per-image value computed once (outside the lock: a race only computes it twice)."""
        with self._memo_lock:
            value = store.get(key)
        if value is None:
            value = compute()
            with self._memo_lock:
                store[key] = value
        return value

    def normaliser(self, volume: Volume, modality: str, window: object, box: Box, k: int) -> Normaliser:
        """CT: the given window, else one chosen from the HU inside and around the box on slice k;
        other grey images: the volume's 0.5-99.5 percentile clip; RGB: kept."""
        return self.normaliser_over(volume, modality, window, [(k, box)])

    def normaliser_3d(self, volume: Volume, modality: str, window: object, box: Box, first: int,
                      last: int) -> Normaliser:
        """As `normaliser` on the middle slice, except that a CT box drawn around a bone (its
        projection over slices first..last, `drawn_around_bone`) gets the bone window."""
        if modality == "CT" and parse_window(window) is None:
            if drawn_around_bone(volume.array[first:last + 1].max(axis=0), box):
                return Window("bone", *CT_WINDOWS["bone"])
        return self.normaliser(volume, modality, window, box, (first + last) // 2)

    def normaliser_over(self, volume: Volume, modality: str, window: object,
                        regions: Sequence[tuple[int, Box]]) -> Normaliser:
        """As `normaliser`, with the CT window chosen from the HU inside and around all the (slice,
        box) regions together: one window for all of an object's key-slice boxes, which a further box
        rarely changes (each change re-encodes every slice)."""
        if modality == "RGB":
            return KeepRGB()
        if modality == "CT":
            chosen = parse_window(window)
            if chosen is None:
                contexts = [box_context(volume.array[k], box) for k, box in regions]
                chosen = auto_window(np.concatenate([inside.ravel() for inside, _ in contexts]),
                                     np.concatenate([ring.ravel() for _, ring in contexts]))
            return chosen
        return self._memo(self._clips, volume.key, lambda: percentile_clip(volume.array))

    def slice_input(self, volume: Volume, k: int, normaliser: Normaliser, crop: Crop | None = None) -> np.ndarray:
        """Slice k (or a crop of it) as (h, w, 3) float32 in [0, 1]."""
        plane = volume.array[k]
        if crop is not None:
            plane = plane[crop[0]:crop[2], crop[1]:crop[3]]
        values = normaliser.apply(plane.astype(np.float32)) / np.float32(255.0)
        if values.ndim == 2:
            values = np.repeat(values[..., None], 3, axis=2)
        return values.astype(np.float32, copy=False)

    def model_input(self, volume: Volume, k: int, crop: Crop | None, normaliser: Normaliser) -> torch.Tensor:
        """Slice k (or a crop of it) as the encoder's input (1, 3, S, S)."""
        height, width = volume.slice_shape if crop is None else (crop[2] - crop[0], crop[3] - crop[1])
        return Fit(height, width, self.model.geometry).image_to_model(self.slice_input(volume, k, normaliser, crop))

    # ---- embeddings ----------------------------------------------------------------------
    def _key(self, volume: Volume, k: int, normaliser: Normaliser, crop: Crop | None) -> tuple:
        """The cache key of an embedding: image, slice, preprocessing, crop, weights and encoder."""
        return (volume.key, k, normaliser.id, crop, self.model.cache_id)

    def embedding(self, volume: Volume, k: int, normaliser: Normaliser, crop: Crop | None = None,
                  tally: _Tally | None = None) -> torch.Tensor:
        """The embedding of slice k (or a crop), from the cache when there."""
        key = self._key(volume, k, normaliser, crop)

        def compute() -> torch.Tensor:
            start = time.perf_counter()
            value = self.model.encode(self.model_input(volume, k, crop, normaliser))
            if tally:
                tally.encode_ms += (time.perf_counter() - start) * 1000
            return value

        value, hit = self.cache.get_or_compute(key, compute)
        if tally:
            tally.hits += hit
            tally.misses += not hit
        return value

    def encode_ahead(self, volume: Volume, regions: Iterable[tuple[int, Crop | None]], normaliser: Normaliser,
                     tally: _Tally | None = None) -> int:
        """Encode the (slice, crop) regions not yet cached, all in one call of the encoder (which may
        run them concurrently, see encoders.py); returns how many were encoded."""
        keys = {self._key(volume, k, normaliser, crop): (k, crop) for k, crop in regions}

        def compute(missing: list) -> list[torch.Tensor]:
            start = time.perf_counter()
            values = self.model.encode_many([self.model_input(volume, *keys[key], normaliser) for key in missing])
            if tally:
                tally.encode_ms += (time.perf_counter() - start) * 1000
                tally.misses += len(missing)
            return values

        return self.cache.compute_missing(list(keys), compute)

    def crop_for(self, box: Box, height: int, width: int) -> Crop | None:
        """The zoomed region a box on an (height, width) slice is decoded in (None: the whole slice)."""
        return self.zoom.crop_for(box, Fit(height, width, self.model.geometry)) if self.zoom else None

    def is_cached(self, volume: Volume, k: int, normaliser: Normaliser) -> bool:
        return self._key(volume, k, normaliser, None) in self.cache

    # ---- decoding ------------------------------------------------------------------------
    def segment_boxes(self, volume: Volume, k: int, boxes: Sequence[Box], normaliser: Normaliser,
                      clicks: Sequence[tuple[list, list]] | None = None, tally: _Tally | None = None,
                      tight: bool = False) -> SliceMasks:
        """Segment N checked boxes on slice k; small boxes are zoomed into (see ZoomRule) and, when
        the boxes are `tight` (drawn around the object, not derived from a neighbour slice), given
        the small-box prior (see BoxPrior)."""
        height, width = volume.slice_shape
        full_fit = Fit(height, width, self.model.geometry)
        logits = torch.full((len(boxes), height, width), -20.0)
        ious = [0.0] * len(boxes)
        clicks = clicks or [([], [])] * len(boxes)
        groups: dict[Crop | None, list[int]] = {}
        for i, box in enumerate(boxes):
            groups.setdefault(self.crop_for(box, height, width), []).append(i)
        for crop, members in groups.items():
            oy, ox = (crop[0], crop[1]) if crop else (0, 0)
            fit = full_fit if crop is None else Fit(crop[2] - crop[0], crop[3] - crop[1], self.model.geometry)
            embedding = self.embedding(volume, k, normaliser, crop, tally)
            start = time.perf_counter()
            local = np.array([boxes[i] for i in members]) - np.array([ox, oy, ox, oy])
            model_boxes = torch.from_numpy(fit.box_to_model(local)).float()
            points = _points([clicks[i] for i in members], (ox, oy), fit)
            low, iou = self.model.decode(embedding, model_boxes, points)
            sliced = fit.logits_to_slice(low.cpu())
            for j, i in enumerate(members):
                if crop is None:
                    logits[i] = sliced[j]
                else:
                    logits[i, crop[0]:crop[2], crop[1]:crop[3]] = sliced[j]
                ious[i] = float(iou[j])
            if tally:
                tally.decode_ms += (time.perf_counter() - start) * 1000
        prior = 0
        if tight and self.prior:
            for i, box in enumerate(boxes):
                if self.prior.applies(full_fit.box_side(box)):
                    logits[i], shifted = self.prior.apply(logits[i], box)
                    prior += shifted
        return SliceMasks(logits, ious, sum(len(m) for c, m in groups.items() if c is not None), prior)

    # ---- whole requests ------------------------------------------------------------------
    def segment(self, volume: Volume, prompts: Iterable[Prompt], modality: str | None = None,
                window: object = None) -> SegmentationResult:
        """Segment every prompt into one label volume (later prompts win where objects overlap)."""
        start = time.perf_counter()
        prompts = list(prompts)
        if not prompts:
            raise EngineInputError("no prompt given: draw a box")
        modality = self.modality_of(volume, modality)
        parse_window(window)  # a bad window is an input error even for non-CT images
        tally = _Tally()
        try:
            labels = [int(p.label) for p in prompts]
        except (TypeError, ValueError):
            raise EngineInputError(f"label values must be integers, got {[p.label for p in prompts]!r}") from None
        label_max = max(labels)
        if min(labels) < 1 or label_max > 65535:
            raise EngineInputError("label values must be between 1 and 65535")
        out = np.zeros(volume.array.shape[:3], dtype=np.uint8 if label_max < 256 else np.uint16)
        objects = [self._segment_prompt(volume, p, modality, window, out, tally) for p in prompts]
        for obj in objects:
            obj.voxels = int(np.count_nonzero(out == obj.label))
            obj.volume_ml = obj.voxels * volume.voxel_ml
        tally_ms = {"encode": tally.encode_ms, "decode": tally.decode_ms,
                    "total": (time.perf_counter() - start) * 1000}
        return SegmentationResult(out, objects, self.model.version, modality, tally_ms, tally.hits, tally.misses)

    def _segment_prompt(self, volume: Volume, prompt: Prompt, modality: str, window: object,
                        out: np.ndarray, tally: _Tally) -> ObjectResult:
        height, width = volume.slice_shape
        if isinstance(prompt, SlicePrompt):
            k = _check_slice(prompt.slice, volume)
            box, clipped = check_box(prompt.box, height, width)
            clicks = clicks_from(_check_clicks(prompt.foreground, height, width),
                                 _check_clicks(prompt.background, height, width))
            run = refine(self, volume, k, box, clicks, modality, window, tally=tally)
            out[k][run.mask] = prompt.label
            res = run.base
            return ObjectResult(prompt.label, 0, 0.0, [k], {k: res.iou[0]}, run.norm.id, clipped, res.zoomed, res.prior)
        if isinstance(prompt, Box3DPrompt):
            first, last = sorted((_check_slice(prompt.first, volume), _check_slice(prompt.last, volume)))
            box, clipped = check_box(prompt.box, height, width)
            norm = self.normaliser_3d(volume, modality, window, box, first, last)
            decode, state = self.slice_decoder(volume, norm, tally)
            bone = bone_boxes(volume.array, box, first, last) if self._uses_bone_boxes(norm) else {}
            if bone:
                masks, ious = self._decode_each(volume, bone, norm, decode, tally)
                masks = {k: inside(mask, box) for k, mask in masks.items()}
            else:
                if self.propagation.decodes_given_box_everywhere:
                    crop = self.crop_for(box, height, width)
                    self.encode_ahead(volume, [(k, crop) for k in range(first, last + 1)], norm, tally)
                masks, ious = propagate(decode, box, first, last, self.propagation)
        elif isinstance(prompt, KeySlicesPrompt):
            if not prompt.boxes:
                raise EngineInputError("key-slice prompt has no boxes")
            checked = {}
            clipped = False
            for k, b in prompt.boxes.items():
                checked[_check_slice(k, volume)], was_clipped = check_box(b, height, width)
                clipped |= was_clipped
            norm = self.normaliser_over(volume, modality, window, sorted(checked.items()))
            decode, state = self.slice_decoder(volume, norm, tally)
            masks, ious = self._decode_each(volume, self.boxes_between_keys(volume, checked), norm, decode, tally)
        else:
            raise EngineInputError(f"unknown prompt type {type(prompt).__name__}")
        for k, mask in masks.items():
            out[k][mask] = prompt.label
        return ObjectResult(prompt.label, 0, 0.0, sorted(masks), ious, norm.id, clipped, state["zoomed"],
                            state["prior"], state["decoded"])

    def boxes_between_keys(self, volume: Volume, key_boxes: dict[int, Box]) -> dict[int, Box]:
        """The box a key-slice prompt decodes on each slice from its first to its last key slice
        (`interpolate_boxes` under this segmenter's PropagationRule, inside the slice)."""
        height, width = volume.slice_shape
        return interpolate_boxes(key_boxes, self.propagation.rounded_keys, (0, 0, width - 1, height - 1))

    def _uses_bone_boxes(self, norm: Normaliser) -> bool:
        """Whether a 3D box in this normaliser (a CT window) is decoded with its bone's own boxes
        (PropagationRule)."""
        return self.propagation.bone_boxes and isinstance(norm, Window) and norm.name == "bone"

    def _decode_each(self, volume: Volume, boxes: dict[int, Box], norm: Normaliser, decode: SliceDecoder,
                     tally: _Tally) -> tuple[dict[int, np.ndarray], dict[int, float]]:
        """Every slice's own tight box decoded (its slices encoded ahead): masks and predicted IoUs."""
        height, width = volume.slice_shape
        self.encode_ahead(volume, [(k, self.crop_for(b, height, width)) for k, b in boxes.items()], norm, tally)
        masks, ious = {}, {}
        for k, b in boxes.items():
            masks[k], ious[k] = decode(k, [b], True)[0]
        return masks, ious

    def slice_decoder(self, volume: Volume, norm: Normaliser, tally: _Tally | None = None) -> tuple[SliceDecoder, dict[str, int]]:
        """The per-slice decoder that 3D propagation calls, and its counts."""
        state = {"zoomed": 0, "prior": 0, "decoded": 0}

        def decode(k: int, boxes: Sequence[Box], tight: bool) -> list[tuple[np.ndarray, float]]:
            res = self.segment_boxes(volume, k, list(boxes), norm, None, tally, tight=tight)
            state["zoomed"] += res.zoomed
            state["prior"] += res.prior
            state["decoded"] += len(boxes)
            masks = res.masks
            return [(masks[i], res.iou[i]) for i in range(len(boxes))]

        return decode, state


def _check_slice(k: object, volume: Volume) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer, float, str)):
        raise EngineInputError(f"slice index must be an integer, got {k!r}")
    try:
        value = float(k)
    except ValueError:
        raise EngineInputError(f"slice index must be an integer, got {k!r}") from None
    if not value.is_integer():
        raise EngineInputError(f"slice index must be an integer, got {k!r}")
    index = int(value)
    if not 0 <= index < volume.num_slices:
        raise EngineInputError(f"slice {index} is out of range: the image has {volume.num_slices} slices")
    return index


def _check_clicks(clicks: Iterable[Sequence[object]], height: int, width: int) -> list[tuple[float, float]]:
    """Clicks as (x, y) floats; each must be two finite numbers inside the slice."""
    checked = []
    for point in clicks:
        try:
            x, y = (float(v) for v in point[:2])  # type: ignore[index]
        except (TypeError, ValueError, IndexError):
            raise EngineInputError(f"a click must be [x, y] numbers, got {point!r}") from None
        if not (np.isfinite(x) and np.isfinite(y)) or not (0 <= x <= width - 1 and 0 <= y <= height - 1):
            raise EngineInputError(f"click {list(point)!r} is outside the {width}x{height} image")
        checked.append((x, y))
    return checked


def _points(clicks: list[tuple[list, list]], offset: tuple[int, int], fit: Fit
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Foreground/background clicks as SAM point prompts, padded with label -1 to a common count."""
    count = max(len(fg) + len(bg) for fg, bg in clicks)
    if count == 0:
        return None
    sy, sx = fit.scale
    coords = np.zeros((len(clicks), count, 2), dtype=np.float32)
    labels = -np.ones((len(clicks), count), dtype=np.int64)
    for i, (fg, bg) in enumerate(clicks):
        for j, (point, value) in enumerate([(p, 1) for p in fg] + [(p, 0) for p in bg]):
            x, y = point
            coords[i, j] = ((x - offset[0]) * sx, (y - offset[1]) * sy)
            labels[i, j] = value
    return torch.from_numpy(coords), torch.from_numpy(labels)
