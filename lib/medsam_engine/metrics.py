"""DSC and NSD (normalised surface distance) of binary masks, computed with MONAI's metrics."""

from __future__ import annotations

import warnings
from typing import Sequence

import numpy as np
import torch
from monai.metrics import compute_dice, compute_surface_dice


def _one_hot(mask: np.ndarray) -> torch.Tensor:
    fg = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool)).float()
    return torch.stack([1 - fg, fg])[None]


def dsc(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice similarity coefficient; 1.0 when both masks are empty."""
    if not pred.any() and not gt.any():
        return 1.0
    return float(compute_dice(_one_hot(pred), _one_hot(gt), include_background=False, ignore_empty=False)[0, 0])


def nsd(pred: np.ndarray, gt: np.ndarray, tolerance: float = 2.0, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at `tolerance` (in the units of `spacing`; pixels when None)."""
    if not pred.any() and not gt.any():
        return 1.0
    if not pred.any() or not gt.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = compute_surface_dice(_one_hot(pred), _one_hot(gt), [tolerance], include_background=False,
                                     spacing=list(spacing) if spacing is not None else None)
    return float(value[0, 0])
