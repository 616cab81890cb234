"""How much annotators still correct: Dice between the model's draft label and the final one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EngineInputError
from .imageio import read_image
from .metrics import dsc


def draft_dice(draft: np.ndarray, final: np.ndarray) -> float:
    """Foreground Dice (any label value counts as foreground) of a draft against the final label."""
    if draft.shape != final.shape:
        raise EngineInputError(f"draft label shape {draft.shape} != final label shape {final.shape}")
    return dsc(draft > 0, final > 0)


def draft_dice_files(draft: str | Path, final: str | Path) -> float:
    """draft_dice of two label files."""
    return draft_dice(read_image(draft).array, read_image(final).array)
