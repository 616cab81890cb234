"""Active learning: which image an annotator should label next, and why (a score).

- diversity: the unlabelled image whose pooled encoder features are farthest from every labelled
  image's (one step of k-center greedy); features are cached per image file and model version.
- uncertainty: among images with a draft label, the one whose masks disagree most when the draft's
  boxes are jittered (the model is unsure where the object ends).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from .evaluate import jitter_box
from .geometry import mask_box
from .imageio import Volume
from .preprocess import parse_window
from .segmenter import Segmenter


@dataclass
class Pick:
    """The chosen image, its score, and every candidate's score."""

    image_id: str
    score: float
    reason: str
    scores: dict[str, float]


def feature_slices(num_slices: int, count: int) -> list[int]:
    """`count` slices spread over the middle 80% of the volume (the ends are often outside the body)."""
    if num_slices <= 2:
        return list(range(num_slices))
    low, high = int(num_slices * 0.1), max(int(num_slices * 0.1) + 1, int(np.ceil(num_slices * 0.9)) - 1)
    return sorted({int(k) for k in np.linspace(low, high, min(count, num_slices)).round()})


def image_features(segmenter: Segmenter, volume: Volume, slices: int = 4) -> np.ndarray:
    """Mean and standard deviation over space of the encoder's embedding, averaged over a few
    slices, L2-normalised: one vector per image. CT uses the soft-tissue window (no box to pick one)."""
    modality = segmenter.modality_of(volume)
    height, width = volume.slice_shape
    vectors = []
    for k in feature_slices(volume.num_slices, slices):
        if modality == "CT":
            normaliser = parse_window("soft_tissue")
        else:
            normaliser = segmenter.normaliser(volume, modality, None, (0, 0, width - 1, height - 1), k)
        embedding = segmenter.embedding(volume, k, normaliser)[0].float()
        vectors.append(torch.cat([embedding.mean(dim=(1, 2)), embedding.std(dim=(1, 2))]).cpu().numpy())
    feature = np.mean(vectors, axis=0)
    return feature / max(float(np.linalg.norm(feature)), 1e-12)


class FeatureCache:
    """Image features in memory and, when `directory` is given, in one .npy file per image and model."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory else None
        self._items: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def get(self, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            if key in self._items:
                return self._items[key]
        path = self._path(key)
        if path is not None and path.is_file():
            value = np.load(path)
        else:
            value = compute()
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_name(f".{path.stem}.tmp.npy")
                np.save(tmp, value)
                tmp.replace(path)
        with self._lock:
            self._items[key] = value
        return value

    def _path(self, key: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"


def k_center_pick(labelled: np.ndarray, candidates: np.ndarray) -> tuple[int, np.ndarray]:
    """One k-center greedy step: the candidate whose nearest labelled feature is farthest.

    Returns its index and every candidate's distance to its nearest labelled feature. With nothing
    labelled yet the candidates' mean stands in for the labelled set, so the most atypical image
    comes first. Written here: MONAI and MONAI Label have no k-center selection.
    """
    reference = labelled if len(labelled) else candidates.mean(axis=0, keepdims=True)
    distances = np.linalg.norm(candidates[:, None, :] - reference[None, :, :], axis=2).min(axis=1)
    return int(np.argmax(distances)), distances


def pick_diverse(labelled: dict[str, Callable[[], np.ndarray]],
                 candidates: dict[str, Callable[[], np.ndarray]]) -> Pick | None:
    """Diversity strategy over feature getters (image id -> function returning its feature)."""
    if not candidates:
        return None
    ids = sorted(candidates)
    cand = np.stack([candidates[i]() for i in ids])
    ref = np.stack([labelled[i]() for i in sorted(labelled)]) if labelled else np.zeros((0, cand.shape[1]))
    best, distances = k_center_pick(ref, cand)
    scores = {i: round(float(d), 6) for i, d in zip(ids, distances)}
    reason = (f"farthest from the {len(labelled)} labelled image(s) in encoder feature space "
              f"(distance {distances[best]:.4f})" if labelled else
              f"no labelled image yet: the least typical image (distance {distances[best]:.4f} from the mean)")
    return Pick(ids[best], float(distances[best]), reason, scores)


def mask_disagreement(masks: Sequence[np.ndarray]) -> float:
    """1 - mean pairwise Dice of the masks (0: identical; 1: no overlap at all)."""
    dices = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            a, b = masks[i], masks[j]
            total = int(a.sum()) + int(b.sum())
            dices.append(1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total)
    return float(1.0 - np.mean(dices)) if dices else 0.0


def box_uncertainty(segmenter: Segmenter, volume: Volume, draft: np.ndarray, slices: int = 3, boxes: int = 4,
                    jitter: float = 10.0, seed: int = 0) -> float:
    """Mean disagreement of the masks from `boxes` jittered copies of the draft's box (plus the box
    itself) on the `slices` slices where the draft's largest object is largest."""
    if draft.shape != volume.array.shape[:3]:
        raise ValueError(f"draft label shape {draft.shape} != image {volume.array.shape[:3]}")
    values, counts = np.unique(draft[draft > 0], return_counts=True)
    if values.size == 0:
        return 0.0
    obj = draft == values[np.argmax(counts)]
    area = obj.reshape(obj.shape[0], -1).sum(axis=1)
    rng = np.random.default_rng(seed)
    modality = segmenter.modality_of(volume)
    height, width = volume.slice_shape
    scores = []
    for k in [int(k) for k in np.argsort(-area)[:slices] if area[k] > 0]:
        box = mask_box(obj[k])
        if box is None or box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        variants = [box] + [jitter_box(box, jitter, rng, height, width) for _ in range(boxes)]
        normaliser = segmenter.normaliser(volume, modality, None, box, k)
        result = segmenter.segment_boxes(volume, k, variants, normaliser)
        scores.append(mask_disagreement(list(result.masks)))
    return float(np.mean(scores)) if scores else 0.0


def pick_uncertain(candidates: dict[str, Callable[[], float]]) -> Pick | None:
    """Uncertainty strategy over score getters (image id -> function returning its disagreement)."""
    if not candidates:
        return None
    scores = {i: round(float(candidates[i]()), 6) for i in sorted(candidates)}
    best = max(scores, key=lambda i: scores[i])
    return Pick(best, scores[best], f"masks under jittered boxes disagree most on its draft label "
                                    f"(1 - mean pairwise Dice {scores[best]:.4f})", scores)
