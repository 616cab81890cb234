"""The simulated annotator: where corrective clicks go and of which kind, NoC, and loose boxes."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_engine.clicks import Click, clicks_needed, loose_box, next_click


def square(shape: tuple[int, int], y0: int, x0: int, size_y: int, size_x: int | None = None) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[y0:y0 + size_y, x0:x0 + (size_x or size_y)] = True
    return mask


def test_missed_part_gets_a_positive_click_at_its_centre() -> None:
    gt = square((64, 64), 10, 10, 30)
    pred = gt & ~square((64, 64), 10, 10, 9)  # the 9 x 9 corner at rows/cols 10..18 is missed
    pred |= square((64, 64), 50, 50, 3)  # a smaller false part elsewhere
    assert next_click(pred, gt) == Click(14.0, 14.0, True)


def test_larger_false_part_gets_a_negative_click_at_its_centre() -> None:
    gt = square((64, 64), 10, 10, 30)
    pred = gt & ~square((64, 64), 10, 10, 3)  # a 3 x 3 miss
    pred |= square((64, 64), 45, 20, 7, 11)  # a 7 x 11 false part: rows 45..51, cols 20..30
    click = next_click(pred, gt)
    assert click is not None and not click.positive
    assert click.y == 48.0 and 23.0 <= click.x <= 27.0  # the middle row, 4 px from its border


def test_region_at_the_slice_edge_is_clicked_inside_not_on_the_edge() -> None:
    gt = np.zeros((40, 40), dtype=bool)
    pred = square((40, 40), 0, 0, 9)  # false part in the corner: the edge counts as its border
    click = next_click(pred, gt)
    assert click == Click(4.0, 4.0, False)


def test_exact_mask_gets_no_click() -> None:
    gt = square((32, 32), 5, 5, 10)
    assert next_click(gt.copy(), gt) is None


def test_largest_region_wins_not_the_sum_of_its_kind() -> None:
    """Two 4 x 4 misses (32 px in all) lose to one 5 x 5 false part (25 px)."""
    gt = square((64, 64), 5, 5, 4) | square((64, 64), 5, 20, 4) | square((64, 64), 30, 30, 20)
    pred = square((64, 64), 30, 30, 20) | square((64, 64), 55, 5, 5)
    assert next_click(pred, gt) == Click(7.0, 57.0, False)


def test_noc_counts_clicks_until_the_threshold_and_caps_at_n() -> None:
    assert clicks_needed([0.9, 0.95], 0.85) == 0
    assert clicks_needed([0.5, 0.8, 0.86, 0.9], 0.85) == 2
    assert clicks_needed([0.5, 0.6, 0.7], 0.9) == 2


@pytest.mark.parametrize("pct", [0, 10, 25])
def test_loose_boxes_hold_the_tight_box_and_stay_within_pct(pct: float) -> None:
    rng = np.random.default_rng(3)
    grown = 0
    for _ in range(300):
        x0, y0 = rng.integers(0, 100, size=2)
        w, h = rng.integers(1, 120, size=2)
        tight = (float(x0), float(y0), float(min(x0 + w, 199)), float(min(y0 + h, 149)))
        box = loose_box(tight, pct, rng, 150, 200)
        assert box[0] <= tight[0] and box[1] <= tight[1] and box[2] >= tight[2] and box[3] >= tight[3]
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= 199 and box[3] <= 149
        side_x, side_y = tight[2] - tight[0] + 1, tight[3] - tight[1] + 1
        for moved, side in ((tight[0] - box[0], side_x), (box[2] - tight[2], side_x),
                            (tight[1] - box[1], side_y), (box[3] - tight[3], side_y)):
            assert moved <= np.ceil(pct / 100 * side)
        grown += box != tight
    assert (grown > 250) if pct else (grown == 0)
