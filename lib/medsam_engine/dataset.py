"""2D training samples from 3D labels, sliced lazily: one sample per labelled slice.

The index holds only (case, slice, label values); images are read when a sample is drawn (a small
per-process LRU keeps the last volumes, so neighbouring draws do not re-read a file). Each sample is
prepared by the inference code path: the Segmenter's normaliser and slice input, and the model's Fit.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .datastore import Case
from .errors import EngineInputError
from .geometry import Box, Fit, mask_box
from .imageio import Volume, read_image
from .propagation import PropagationRule, grow_box
from .segmenter import Segmenter
from .zoom import Crop

DISTILL_BOXES = 4  # other objects of a training slice distilled on per draw (see SliceDataset)
LOOSE_3D_SHARE = 1 / 3  # loose draws prompted with the object's 3D box; the others with a neighbour's grown mask box


@dataclass(frozen=True)
class SliceSample:
    """A slice of a case with the label values (objects) it shows."""

    case: int
    slice: int
    values: tuple[int, ...]


def _has_area(mask: np.ndarray) -> bool:
    box = mask_box(mask)
    return box is not None and box[2] - box[0] >= 1 and box[3] - box[1] >= 1


def index_slices(cases: Sequence[Case], values: dict[str, set[int]] | None = None,
                 min_pixels: int = 10) -> list[SliceSample]:
    """Every slice with at least one object of `min_pixels` or more whose box has area.

    `values` restricts the objects per image id (e.g. one organ); images it does not name are left
    out. Only label files are read here (one at a time; their arrays are not kept).
    """
    samples = []
    for i, case in enumerate(cases):
        if case.label is None or (values is not None and case.image_id not in values):
            continue
        label = read_image(case.label).array
        if label.ndim != 3:
            raise EngineInputError(f"{case.label.name}: a label must be one channel, got shape {label.shape}")
        wanted = values[case.image_id] if values is not None else None
        for k in np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1)):
            plane = label[k]
            found, counts = np.unique(plane[plane > 0], return_counts=True)
            objects = tuple(int(v) for v, n in zip(found, counts)
                            if n >= min_pixels and (wanted is None or int(v) in wanted) and _has_area(plane == v))
            if objects:
                samples.append(SliceSample(i, int(k), objects))
    return samples


def split_samples(samples: Sequence[SliceSample], val_fraction: float, seed: int = 0, block: int = 4
                  ) -> tuple[list[SliceSample], list[SliceSample]]:
    """Hold back about `val_fraction` of the slices as whole blocks of `block` neighbouring slices
    (seeded), never a slice next to a training one: neighbours 3 mm apart look alike, so a random
    share of slices would score the training set. Each block held back is separated from the
    training slices by one slice left out of both. Every label value that spans two or more
    blocks gets at least one block held back.
    """
    if val_fraction <= 0 or len(samples) < 2:
        return sorted(samples, key=lambda s: (s.case, s.slice)), []
    blocks: list[list[SliceSample]] = []
    for case in sorted({s.case for s in samples}):
        ordered = sorted((s for s in samples if s.case == case), key=lambda s: s.slice)
        for start in range(0, len(ordered), block):
            blocks.append(ordered[start:start + block])
    order = list(range(len(blocks)))
    random.Random(seed).shuffle(order)
    target = max(1, int(round(len(samples) * val_fraction)))
    held: list[int] = []
    for i in order:
        if sum(len(blocks[j]) for j in held) >= target:
            break
        held.append(i)
    for value in sorted({v for s in samples for v in s.values}):
        having = [i for i in order if any(value in s.values for s in blocks[i])]
        if len(having) >= 2 and not any(i in held for i in having):
            held.append(having[0])
    if len(held) == len(blocks):  # keep something to train on
        held = held[:-1] if len(held) > 1 else held
    val = [s for i in held for s in blocks[i]]
    near = {(s.case, s.slice + d) for s in val for d in (-1, 0, 1)}
    train = [s for s in samples if (s.case, s.slice) not in near]
    if not train and len(blocks) == 1:  # one block only: its first half trains, the rest after a gap validates
        ordered = blocks[0]
        half = max(1, len(ordered) // 2)
        train, val = ordered[:half], [s for s in ordered[half:] if s.slice > ordered[half - 1].slice + 1]
    return sorted(train, key=lambda s: (s.case, s.slice)), sorted(val, key=lambda s: (s.case, s.slice))


def per_object(samples: Sequence[SliceSample]) -> list[SliceSample]:
    """One sample per object (label value) of each slice: validation scores every label value."""
    return [SliceSample(s.case, s.slice, (v,)) for s in samples for v in s.values]


def spread(samples: Sequence[SliceSample], limit: int | None) -> list[SliceSample]:
    """At most `limit` samples, evenly spaced through the list (all when `limit` is falsy)."""
    if not limit or len(samples) <= limit:
        return list(samples)
    picks = np.linspace(0, len(samples) - 1, limit).round().astype(int)
    return [samples[i] for i in picks]


def distill_objects(cases: Sequence[Case], samples: Sequence[SliceSample],
                    skip: set[tuple[int, int, int]] = frozenset()) -> dict[tuple[int, int], tuple[int, ...]]:
    """For each slice of `samples`, (case, slice) -> the label values of its other labelled objects:
    none that `samples` trains on in that case, none in `skip` ((case, slice, value), e.g. the
    gate's objects and their neighbours). Only the label files of the samples' cases are read."""
    used = sorted({s.case for s in samples})
    trained = {(s.case, v) for s in samples for v in s.values}
    slices = {(s.case, s.slice) for s in samples}
    found: dict[tuple[int, int], tuple[int, ...]] = {}
    for s in index_slices([cases[i] for i in used]):
        case = used[s.case]
        values = tuple(v for v in s.values if (case, v) not in trained and (case, s.slice, v) not in skip)
        if (case, s.slice) in slices and values:
            found[(case, s.slice)] = values
    return found


def expand_box(box: Box, max_shift: float | tuple[float, float], rng: random.Random, height: int, width: int) -> Box:
    """Move each edge outwards by 0..max_shift pixels (x, y may differ: (sx, sy)), clipped to the slice.

    MedSAM's training script perturbs boxes this way (its `bbox_shift`, 0-20 px at 1024 px), so
    the model learns to segment from loose boxes an annotator draws.
    """
    shift_x, shift_y = max_shift if isinstance(max_shift, tuple) else (max_shift, max_shift)
    x0, y0, x1, y1 = box
    if shift_x > 0 or shift_y > 0:
        x0, y0 = x0 - rng.uniform(0, shift_x), y0 - rng.uniform(0, shift_y)
        x1, y1 = x1 + rng.uniform(0, shift_x), y1 + rng.uniform(0, shift_y)
    return max(x0, 0.0), max(y0, 0.0), min(x1, width - 1.0), min(y1, height - 1.0)


def loose_box(obj: np.ndarray, k: int, rng: random.Random, box3d: Box | None = None,
              rule: PropagationRule = PropagationRule()) -> Box:
    """A box one-box 3D propagation prompts slice k of the object `obj` (a (D, H, W) bool volume)
    with: the object's box over all its slices (`box3d`, computed when not given), as a 3D box
    gives it, or the box of its mask on a neighbouring slice grown by the rule's margin inside
    the 3D box, as the walk from that slice gives it."""
    box3d = box3d or mask_box(obj.any(axis=0))
    neighbours = [j for j in (k - 1, k + 1) if 0 <= j < obj.shape[0] and obj[j].any()]
    if not neighbours or rng.random() < LOOSE_3D_SHARE:
        return box3d
    return grow_box(mask_box(obj[rng.choice(neighbours)]), box3d, rule.margin(box3d))


class SliceDataset(Dataset):
    """Samples as model tensors: {"image": (3, S, S), "label": (1, L, L), "box": (4,)}.

    Training draws one of the slice's objects at random and jitters its box outwards by 0..`jitter`
    *model* pixels (the paper's 0-20 px at 1024 are 0-5 at LiteMedSAM's 256; seeded per draw);
    validation (`train=False`) takes the slice's first object (see `per_object`) and its exact box,
    so every epoch is scored on the same task. `groups` (one int per sample) comes back as "group".
    With `distill` ((case, slice) -> label values, see distill_objects) a training sample also
    holds the exact boxes of up to DISTILL_BOXES of those objects of its slice (drawn at random,
    none of the sample's own values) as "distill_box" (DISTILL_BOXES, 4), "distill_valid" the real ones.
    `loose` of the training draws take the box 3D propagation would give the slice instead (see
    loose_box). With `embed`, "image" holds the slice's embedding (C, h, w) from the segmenter's
    cache instead, for a network whose image encoder is frozen (see PromptedSam).
    """

    def __init__(self, cases: Sequence[Case], samples: Sequence[SliceSample], segmenter: Segmenter,
                 train: bool, jitter: float = 5, seed: int = 0, cache_volumes: int = 2,
                 groups: Sequence[int] | None = None,
                 distill: dict[tuple[int, int], tuple[int, ...]] | None = None, loose: float = 0.0,
                 embed: bool = False) -> None:
        self.cases = list(cases)
        self.samples = list(samples)
        self.segmenter = segmenter
        self.geometry = segmenter.model.geometry
        self.low_res = int(segmenter.model.net.prompt_encoder.mask_input_size[0])
        self.train = train
        self.jitter = jitter if train else 0
        self.seed = seed
        self.groups = list(groups) if groups is not None else [0] * len(self.samples)
        self.distill = distill if train else None
        self.loose = loose if train else 0.0
        self.embed = embed
        self.draws = 0
        self._boxes3d: dict[tuple[int, int], Box] = {}
        self.cache_volumes = cache_volumes
        self._volumes: OrderedDict[int, tuple[Volume, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[Volume, np.ndarray]:
        if i in self._volumes:
            self._volumes.move_to_end(i)
            return self._volumes[i]
        case = self.cases[i]
        volume = read_image(case.image)
        label = read_image(case.label).array  # type: ignore[arg-type]
        if label.shape != volume.array.shape[:3]:
            raise EngineInputError(f"{case.label.name}: label shape {label.shape} != image {volume.array.shape[:3]}")
        self._volumes[i] = (volume, label)
        while len(self._volumes) > self.cache_volumes:
            self._volumes.popitem(last=False)
        return volume, label

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        volume, label = self._load(sample.case)
        if self.train:
            self.draws += 1
            rng = random.Random(hash((self.seed, index, self.draws)))
            value = rng.choice(sample.values)
        else:
            rng = random.Random(0)
            value = sample.values[0]
        truth = label[sample.slice] == value
        height, width = volume.slice_shape
        sy, sx = Fit(height, width, self.geometry).scale  # model pixels per slice pixel
        if self.loose and rng.random() < self.loose:
            obj = label == value
            if (sample.case, value) not in self._boxes3d:
                self._boxes3d[(sample.case, value)] = mask_box(obj.any(axis=0))  # type: ignore[assignment]
            box = loose_box(obj, sample.slice, rng, self._boxes3d[(sample.case, value)])
        else:
            box = expand_box(mask_box(truth), (self.jitter / sx, self.jitter / sy), rng, height, width)  # type: ignore[arg-type]
        extra = None
        if self.distill is not None:
            others = [v for v in self.distill.get((sample.case, sample.slice), ()) if v not in sample.values]
            extra = [mask_box(label[sample.slice] == v) for v in rng.sample(others, min(len(others), DISTILL_BOXES))]
        item = prepare_sample(self.segmenter, volume, sample.slice, truth, box, self.low_res, extra, self.embed)
        item["group"] = torch.tensor(self.groups[index])
        return item


def prepare_sample(segmenter: Segmenter, volume: Volume, k: int, truth: np.ndarray, box: Box,
                   low_res: int, extra: Sequence[Box] | None = None, embed: bool = False) -> dict[str, torch.Tensor]:
    """Slice k as the model sees it at inference (modality, normaliser, fit, and the zoomed tile
    for a small box; with `embed` its embedding, cached), its target mask at the decoder's output
    resolution over the model input, and the box in model pixels; with `extra` (slice boxes) also
    those boxes on the same input (see model_boxes)."""
    modality = segmenter.modality_of(volume)
    normaliser = segmenter.normaliser(volume, modality, None, box, k)
    fit = Fit(*volume.slice_shape, segmenter.model.geometry)
    crop = segmenter.zoom.crop_for(box, fit) if segmenter.zoom else None
    if crop is not None:
        fit = Fit(crop[2] - crop[0], crop[3] - crop[1], segmenter.model.geometry)
        truth = truth[crop[0]:crop[2], crop[1]:crop[3]]
        box = (box[0] - crop[1], box[1] - crop[0], box[2] - crop[1], box[3] - crop[0])
    if embed:
        image = segmenter.embedding(volume, k, normaliser, crop)[0].clone()  # a plain tensor, not an inference one
    else:
        image = fit.image_to_model(segmenter.slice_input(volume, k, normaliser, crop))[0]
    mask = fit.image_to_model(truth[..., None].astype(np.float32))
    target = (F.interpolate(mask, size=(low_res, low_res), mode="area") > 0.5).float()[0]
    model_box = torch.from_numpy(fit.box_to_model(np.array([box]))[0]).float()
    item = {"image": image, "label": target, "box": model_box}
    if extra is not None:
        item["distill_box"], item["distill_valid"] = model_boxes(extra, fit, crop)
    return item


def model_boxes(boxes: Sequence[Box], fit: Fit, crop: Crop | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Slice boxes on the model input of `fit` (over `crop`'s tile, clipped to it), padded with
    zeros to DISTILL_BOXES: (DISTILL_BOXES, 4) model pixels, and which are real boxes with area."""
    out, valid = torch.zeros(DISTILL_BOXES, 4), torch.zeros(DISTILL_BOXES, dtype=torch.bool)
    y0, x0 = (crop[0], crop[1]) if crop else (0, 0)
    for i, (bx0, by0, bx1, by1) in enumerate(boxes):
        clipped = (max(bx0 - x0, 0.0), max(by0 - y0, 0.0), min(bx1 - x0, fit.width - 1.0), min(by1 - y0, fit.height - 1.0))
        if clipped[2] > clipped[0] and clipped[3] > clipped[1]:
            out[i] = torch.from_numpy(fit.box_to_model(np.array([clipped]))[0]).float()
            valid[i] = True
    return out, valid
