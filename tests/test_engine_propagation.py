"""3D from 2D on synthetic volumes whose answer is known: box propagation and key-slice boxes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from engine_helpers import dice, make_volume
from medsam_engine import Box3DPrompt, KeySlicesPrompt, Segmenter
from medsam_engine.geometry import Box, mask_box
from medsam_engine.propagation import PropagationRule, interpolate_boxes, propagate, seed_order
from medsam_engine.prior import BoxPrior


def ellipsoid(shape: tuple[int, int, int], centre: tuple[float, float, float],
              radii: tuple[float, float, float]) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return ((z - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((x - centre[2]) / radii[2]) ** 2 <= 1


class ThresholdDecoder:
    """A deterministic slice decoder: everything bright inside each box (ends inclusive)."""

    def __init__(self, volume: np.ndarray) -> None:
        self.volume = volume
        self.calls: list[tuple[int, list[Box]]] = []

    def __call__(self, k: int, boxes, tight: bool) -> list[tuple[np.ndarray, float]]:
        self.calls.append((k, list(boxes)))
        out = []
        for box in boxes:
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            mask = np.zeros(self.volume.shape[1:], dtype=bool)
            mask[y0:y1 + 1, x0:x1 + 1] = self.volume[k, y0:y1 + 1, x0:x1 + 1] > 0.5
            out.append((mask, 0.9))
        return out

    def first_boxes(self) -> dict[int, Box]:
        """The propagated box of each slice (the first box of its last call)."""
        return {k: boxes[0] for k, boxes in self.calls}


# Slices 4..16 hold the ellipsoid; slices 1 and 19-20 hold other bright things inside the same box,
# reachable only if propagation walks on past an empty slice.
TRUTH = ellipsoid((21, 64, 64), centre=(10, 30, 34), radii=(6.5, 12, 16))
VOLUME = TRUTH.astype(np.float32)
VOLUME[1, 25:35, 30:40] = 1.0
VOLUME[19:21, 28:32, 30:36] = 1.0
BOX = (10.0, 10.0, 55.0, 50.0)
MIDDLE = PropagationRule(seed="middle")
RULES = [PropagationRule(), MIDDLE, PropagationRule(given_box_proposal=False, seed="middle")]


def test_ellipsoid_slices_as_expected() -> None:
    assert np.flatnonzero(TRUTH.any(axis=(1, 2))).tolist() == list(range(4, 17))


@pytest.mark.parametrize("rule", RULES)
def test_propagation_recovers_the_ellipsoid_and_stops_at_empty_slices(rule: PropagationRule) -> None:
    decode = ThresholdDecoder(VOLUME)
    masks, ious = propagate(decode, BOX, 4, 16, rule)
    assert sorted(masks) == list(range(4, 17))
    assert sorted(ious) == sorted(masks) and set(ious.values()) == {0.9}
    for k in range(4, 17):
        np.testing.assert_array_equal(masks[k], TRUTH[k], err_msg=f"slice {k}")


def test_middle_seed_walks_out_from_the_middle_and_stops_at_empty_slices() -> None:
    decode = ThresholdDecoder(VOLUME)
    masks, _ = propagate(decode, BOX, 0, 20, MIDDLE)
    assert decode.calls[0] == (10, [BOX])  # the middle slice, with the given box
    assert sorted(masks) == list(range(3, 18))  # one empty slice on each side ends the walk
    assert not masks[3].any() and not masks[17].any()
    assert 19 not in {k for k, _ in decode.calls} and 1 not in masks  # the distractors are never reached


@pytest.mark.parametrize("rule", [PropagationRule(), MIDDLE])
def test_an_explicit_seed_starts_the_walk_there(rule: PropagationRule) -> None:
    decode = ThresholdDecoder(VOLUME)
    masks, _ = propagate(decode, BOX, 4, 16, rule, seed=6)
    walked = [k for k, boxes in decode.calls if boxes[0] != BOX]  # slices decoded with a propagated box
    assert walked[0] == 7 and walked.index(5) == len(range(7, 17))  # up from 6 first, then down from 5
    for k in range(4, 17):
        np.testing.assert_array_equal(masks[k], TRUTH[k], err_msg=f"slice {k}")
    with pytest.raises(ValueError, match="outside"):
        propagate(ThresholdDecoder(VOLUME), BOX, 4, 16, rule, seed=17)


def test_propagation_boxes_follow_the_previous_mask_inside_the_given_box() -> None:
    decode = ThresholdDecoder(VOLUME)
    propagate(decode, BOX, 0, 20, MIDDLE)
    margin = max(2.0, 0.1 * max(BOX[2] - BOX[0], BOX[3] - BOX[1]))
    boxes = decode.first_boxes()
    for k, box in boxes.items():
        assert BOX[0] <= box[0] <= box[2] <= BOX[2] and BOX[1] <= box[1] <= box[3] <= BOX[3], (k, box)
    for k in range(11, 18):  # upwards: each box is the slice below's mask box grown by the margin
        x0, y0, x1, y1 = mask_box(TRUTH[k - 1])
        expected = (max(x0 - margin, BOX[0]), max(y0 - margin, BOX[1]), min(x1 + margin, BOX[2]), min(y1 + margin, BOX[3]))
        assert boxes[k] == pytest.approx(expected)
    x0, y0, x1, y1 = mask_box(TRUTH[5])
    assert boxes[4] == pytest.approx((x0 - margin, y0 - margin, x1 + margin, y1 + margin))


@pytest.mark.parametrize("rule", RULES)
def test_propagation_stays_in_the_slice_range(rule: PropagationRule) -> None:
    decode = ThresholdDecoder(VOLUME)
    masks, _ = propagate(decode, BOX, 8, 13, rule)
    assert sorted(masks) == list(range(8, 14)) and {k for k, _ in decode.calls} <= set(range(8, 14))
    for k in range(8, 14):
        np.testing.assert_array_equal(masks[k], TRUTH[k])


def test_propagation_with_an_empty_middle_slice_segments_only_it() -> None:
    decode = ThresholdDecoder(VOLUME)
    masks, _ = propagate(decode, BOX, 17, 19, MIDDLE)  # middle 18 is empty; 19 holds a distractor
    assert sorted(masks) == [18] and not masks[18].any()
    assert [k for k, _ in decode.calls] == [18]


@pytest.mark.parametrize("rule", RULES)
def test_propagation_masks_never_leave_the_given_box(rule: PropagationRule) -> None:
    """The decoder here ignores boxes and segments every bright pixel: masks are still cut to the box."""
    class Everything(ThresholdDecoder):
        def __call__(self, k, boxes, tight):
            return [(self.volume[k] > 0.5, 0.9) for _ in boxes]

    small = (20.0, 20.0, 40.0, 35.0)  # cuts through the ellipsoid
    masks, _ = propagate(Everything(VOLUME), small, 4, 16, rule)
    assert sorted(masks) == list(range(4, 17))
    for k, mask in masks.items():
        expected = np.zeros_like(mask)
        expected[20:36, 20:41] = TRUTH[k, 20:36, 20:41]
        np.testing.assert_array_equal(mask, expected, err_msg=f"slice {k}")


def _cone_with_a_distractor() -> tuple[np.ndarray, np.ndarray, Box]:
    """A square object growing from slice 4 (3 px) to 16 (27 px), and a bright distractor in the
    corner of its 3D box on the middle slice 10 only, 4 px from the object there."""
    truth = np.zeros((21, 64, 64), dtype=bool)
    for k in range(4, 17):
        half = 1 + (k - 4)
        truth[k, 32 - half:32 + half + 1, 40 - half:40 + half + 1] = True
    volume = truth.astype(np.float32)
    volume[10, 19:21, 27:29] = 1.0
    return truth, volume, mask_box(truth.any(axis=0))


def test_seeds_are_ordered_by_how_their_masks_fill_the_box_then_by_the_middle() -> None:
    box = (10.0, 10.0, 29.0, 29.0)
    full, half, empty = (np.zeros((40, 40), dtype=bool) for _ in range(3))
    full[10:30, 10:30] = True
    half[10:30, 10:20] = True
    given = {2: (half, 0.9), 3: (full, 0.9), 4: (half, 0.9), 5: (empty, 0.9), 6: (full, 0.9), 7: (full, 0.5)}
    # 3 and 6 fill it (3 nearer the middle, 4); 7 fills it with a lower IoU; 4 and 2 half fill it
    assert seed_order(given, box, 2, 7) == [3, 6, 7, 4, 2, 5]
    assert seed_order(given, box, 2, 7, edge=0.34) == [4, 5, 3, 6, 7, 2]  # 2 slices at each end last


def test_fill_seed_avoids_a_misleading_middle_slice() -> None:
    truth, volume, box = _cone_with_a_distractor()
    middle, _ = propagate(ThresholdDecoder(volume), box, 4, 16, MIDDLE)
    assert middle[10][19:21, 27:29].all()  # seeded with the loose box, the middle slice takes the distractor
    decode = ThresholdDecoder(volume)
    masks, _ = propagate(decode, box, 4, 16, PropagationRule(seed="fill"))
    assert sorted(masks) == list(range(4, 17))
    for k in range(4, 17):
        np.testing.assert_array_equal(masks[k], truth[k], err_msg=f"slice {k}")


class LargestBlobDecoder(ThresholdDecoder):
    """A decoder that, like a box-prompted model, answers the dominant structure in each box: the
    largest connected bright region inside it."""

    def __call__(self, k: int, boxes, tight: bool) -> list[tuple[np.ndarray, float]]:
        out = []
        for mask, iou in super().__call__(k, boxes, tight):
            parts, n = ndimage.label(mask)
            if n:
                mask = parts == 1 + int(np.argmax(ndimage.sum(mask, parts, range(1, n + 1))))
            out.append((mask, iou))
        return out


def test_agreement_with_the_previous_slice_stops_a_jump_to_a_bigger_structure() -> None:
    """The cone of _cone_with_a_distractor without it, and on its small end slices 4-6 a bigger
    block in a corner of the 3D box: there the given box's own mask is the block, and the walk
    keeps the cone (the proposal that agrees with the slice before)."""
    truth, volume, box = _cone_with_a_distractor()
    volume[10] = truth[10]
    block = np.zeros_like(truth)
    block[4:7, 19:26, 27:35] = True  # 56 px: more than the cone's 9, 25, 49 there
    volume[block] = 1.0
    decode = LargestBlobDecoder(volume)
    for k in (4, 5, 6):
        np.testing.assert_array_equal(decode(k, [box], False)[0][0], block[k])
    masks, _ = propagate(decode, box, 4, 16, PropagationRule())
    assert sorted(masks) == list(range(4, 17))
    for k in range(4, 17):
        np.testing.assert_array_equal(masks[k], truth[k], err_msg=f"slice {k}")


def test_interpolate_boxes_between_two_keys() -> None:
    boxes = interpolate_boxes({2: (0.0, 0.0, 10.0, 10.0), 6: (4.0, 8.0, 14.0, 18.0)})
    assert sorted(boxes) == [2, 3, 4, 5, 6]
    assert boxes[2] == (0.0, 0.0, 10.0, 10.0) and boxes[6] == pytest.approx((4.0, 8.0, 14.0, 18.0))
    assert boxes[3] == pytest.approx((1.0, 2.0, 11.0, 12.0))
    assert boxes[4] == pytest.approx((2.0, 4.0, 12.0, 14.0))


def test_interpolate_boxes_piecewise_linear_over_unsorted_keys() -> None:
    boxes = interpolate_boxes({9: (20.0, 20.0, 40.0, 40.0), 1: (0.0, 0.0, 10.0, 10.0), 5: (10.0, 0.0, 30.0, 20.0)},
                              rounded=False)
    assert sorted(boxes) == list(range(1, 10))
    assert boxes[3] == pytest.approx((5.0, 0.0, 20.0, 15.0))
    assert boxes[5] == pytest.approx((10.0, 0.0, 30.0, 20.0))
    assert boxes[7] == pytest.approx((15.0, 10.0, 35.0, 30.0))
    assert boxes[9] == pytest.approx((20.0, 20.0, 40.0, 40.0))


def test_rounded_boxes_grow_as_an_ellipse_chord_inside_the_slice() -> None:
    """Halfway from a 10 px box to a 20 px one, a side is 10 + 10 * sqrt(3) / 2 px long around the
    linear centre (12.5, 7.5), cut at the slice's edge (top 0); halfway back down to 10 px, the
    same length (the chord mirrored)."""
    keys = {1: (0.0, 0.0, 10.0, 10.0), 5: (10.0, 0.0, 30.0, 20.0), 9: (15.0, 5.0, 25.0, 15.0)}
    boxes = interpolate_boxes(keys, bound=(0.0, 0.0, 63.0, 63.0))
    half = (10 + 10 * np.sqrt(3) / 2) / 2
    assert boxes[3] == pytest.approx((12.5 - half, 0.0, 12.5 + half, 7.5 + half))
    assert boxes[7] == pytest.approx((20 - half, 10 - half, 20 + half, 10 + half))
    assert boxes[1] == (0.0, 0.0, 10.0, 10.0) and boxes[5] == (10.0, 0.0, 30.0, 20.0)


def test_rounded_boxes_hold_an_ellipsoids_sections_where_linear_ones_cut_them() -> None:
    """Key boxes on an ellipsoid's end slices and its middle (the paper's three key slices): the
    rounded boxes hold every slice's section (to a pixel); linear ones cut most of the sections
    between the keys."""
    truth = ellipsoid((23, 64, 64), centre=(11, 32, 30), radii=(11.5, 20.0, 26.0))
    slices = [k for k in range(truth.shape[0]) if truth[k].any()]
    keys = {k: mask_box(truth[k]) for k in (slices[0], 11, slices[-1])}

    def cut(box: Box, k: int) -> bool:
        own = mask_box(truth[k])
        return box[0] > own[0] + 1 or box[1] > own[1] + 1 or box[2] < own[2] - 1 or box[3] < own[3] - 1

    between = [k for k in slices if k not in keys]
    assert not [k for k in between if cut(interpolate_boxes(keys)[k], k)]
    assert len([k for k in between if cut(interpolate_boxes(keys, rounded=False)[k], k)]) >= 0.8 * len(between)


def test_interpolate_boxes_single_and_adjacent_keys() -> None:
    assert interpolate_boxes({4: (1.0, 2.0, 3.0, 4.0)}) == {4: (1.0, 2.0, 3.0, 4.0)}
    boxes = interpolate_boxes({3: (0.0, 0.0, 5.0, 5.0), 4: (1.0, 1.0, 6.0, 6.0)})
    assert sorted(boxes) == [3, 4] and boxes[4] == pytest.approx((1.0, 1.0, 6.0, 6.0))


# ---- the real LiteMedSAM on a synthetic volume ------------------------------------------------
# A bright ellipsoid in Gaussian noise, 12 slices of 96 x 96; it fills slices 1..10.
SYNTH_TRUTH = ellipsoid((12, 96, 96), centre=(5.5, 48, 46), radii=(5.0, 22.0, 28.0))
SYNTH_SPACING = (2.0, 1.0, 1.0)
# Measured: DSC 0.92 over the volume (the model also finds a faint mask on the empty end slices
# 0 and 11, and over-segments the small end caps 1 and 10 at DSC ~0.8); 0.99+ on slices 2..9.
SYNTH_DSC_FLOOR = 0.85
SYNTH_INNER_DSC_FLOOR = 0.95


@pytest.fixture(scope="module")
def synthetic(lite_model):
    rng = np.random.default_rng(0)
    array = rng.normal(100, 20, SYNTH_TRUTH.shape).astype(np.float32)
    array[SYNTH_TRUTH] += 200
    volume = make_volume(array, "synthetic-ellipsoid-12x96x96", spacing=SYNTH_SPACING)
    segmenter = Segmenter(lite_model)
    x0, y0, x1, y1 = mask_box(SYNTH_TRUTH.any(axis=0))
    result = segmenter.segment(volume, [Box3DPrompt(box=[x0 - 2, y0 - 2, x1 + 2, y1 + 2], first=0, last=11, label=3)],
                               modality="MR")
    return segmenter, volume, result


def test_lite_box3d_propagation_recovers_the_ellipsoid(synthetic) -> None:
    _, volume, result = synthetic
    assert result.label.shape == SYNTH_TRUTH.shape and set(np.unique(result.label)) <= {0, 3}
    assert dice(result.label == 3, SYNTH_TRUTH) >= SYNTH_DSC_FLOOR
    for k in range(2, 10):
        assert dice(result.label[k] == 3, SYNTH_TRUTH[k]) >= SYNTH_INNER_DSC_FLOOR, f"slice {k}"
    obj = result.objects[0]
    assert obj.label == 3 and obj.slices[0] <= 1 and obj.slices[-1] >= 10  # the walk reached both ends
    assert obj.preprocessing.startswith("clip:") and result.modality == "MR"
    assert result.cache_misses == 12  # one encode per slice of the box's range (later visits hit the cache)
    assert obj.decoded_boxes >= 12


def test_lite_box3d_volume_in_ml(synthetic) -> None:
    _, volume, result = synthetic
    obj = result.objects[0]
    voxel_ml = np.prod(SYNTH_SPACING) / 1000
    assert obj.voxels == int(np.count_nonzero(result.label == 3))
    assert obj.volume_ml == pytest.approx(obj.voxels * voxel_ml) and result.volume_ml == pytest.approx(obj.volume_ml)
    truth_ml = SYNTH_TRUTH.sum() * voxel_ml  # ~25.8 mL
    assert 0.8 * truth_ml <= obj.volume_ml <= 1.3 * truth_ml


def test_lite_box3d_does_not_leak_into_a_brighter_neighbour(lite_model) -> None:
    """The synthetic ellipsoid with a brighter disc touching its rim on slices 7-9, inside the 3D
    box's empty corner. Measured: volume DSC 0.86; no neighbour pixel labelled on slices 7-8, 45 of
    its 222 on slice 9 (where the ellipsoid's cap is small)."""
    rng = np.random.default_rng(0)
    neighbour = np.zeros_like(SYNTH_TRUTH)
    yy, xx = np.mgrid[:96, :96]
    for k in (7, 8, 9):
        neighbour[k] = ((yy - 30) ** 2 + (xx - 66) ** 2 <= 9 ** 2) & ~SYNTH_TRUTH[k]
    array = rng.normal(100, 20, SYNTH_TRUTH.shape).astype(np.float32)
    array[SYNTH_TRUTH] += 200
    array[neighbour] += 400
    volume = make_volume(array, "synthetic-ellipsoid-bright-neighbour", spacing=SYNTH_SPACING)
    x0, y0, x1, y1 = mask_box(SYNTH_TRUTH.any(axis=0))
    box = [x0 - 2, y0 - 2, x1 + 2, y1 + 2]
    assert neighbour[:, int(y0) - 2:int(y1) + 3, int(x0) - 2:int(x1) + 3].sum() > 0.8 * neighbour.sum()  # inside the box
    result = Segmenter(lite_model).segment(volume, [Box3DPrompt(box=box, first=0, last=11)], modality="MR")
    mask = result.label == 1
    assert dice(mask, SYNTH_TRUTH) >= 0.8
    for k in (7, 8):
        assert (mask[k] & neighbour[k]).sum() <= 0.05 * neighbour[k].sum(), f"slice {k}"
        assert dice(mask[k], SYNTH_TRUTH[k]) >= SYNTH_INNER_DSC_FLOOR, f"slice {k}"
    assert (mask[9] & neighbour[9]).sum() <= 0.3 * neighbour[9].sum()


def test_lite_box3d_seeds_a_diagonal_disc_away_from_the_box_ends(lite_model) -> None:
    """A disc (radius 11) moving diagonally across its 3D box, so no slice fills the box and every
    given-box mask over-segments (DSC 0.30-0.71); the most over-segmented, at the ends, fill the box
    best. Seeded on slice 2 instead of an end, the walk up shrinks onto the disc. Measured: slices
    8-11 DSC 0.87-0.99, volume DSC 0.55 (seeded on an end, 0.47 and 0.30-0.61 per slice). Slices
    0-7 stay over-segmented (0.36-0.71): not fixed."""
    n, yy, xx = 12, *np.mgrid[:96, :96]
    truth = np.stack([(yy - (24 + 48 * k / (n - 1))) ** 2 + (xx - (24 + 48 * k / (n - 1))) ** 2 <= 11 ** 2
                      for k in range(n)])
    array = np.random.default_rng(0).normal(100, 20, truth.shape).astype(np.float32)
    array[truth] += 200
    volume = make_volume(array, "synthetic-diagonal-disc", spacing=SYNTH_SPACING)
    x0, y0, x1, y1 = mask_box(truth.any(axis=0))
    result = Segmenter(lite_model).segment(volume, [Box3DPrompt(box=[x0 - 2, y0 - 2, x1 + 2, y1 + 2], first=0,
                                                                last=n - 1)], modality="MR")
    mask = result.label == 1
    for k in range(8, n):
        assert dice(mask[k], truth[k]) >= 0.85, f"slice {k}"
    assert dice(mask, truth) >= 0.5


def test_lite_key_slices_reuse_embeddings_and_recover_the_ellipsoid(synthetic) -> None:
    segmenter, volume, _ = synthetic
    keys = {k: mask_box(SYNTH_TRUTH[k]) for k in (2, 5, 9)}
    result = segmenter.segment(volume, [KeySlicesPrompt(boxes=keys)], modality="MR")
    assert result.objects[0].slices == list(range(2, 10))
    assert (result.cache_misses, result.cache_hits) == (0, 8)  # every slice was encoded by the 3D box
    assert not result.label[:2].any() and not result.label[10:].any()
    assert dice(result.label[2:10] == 1, SYNTH_TRUTH[2:10]) >= SYNTH_INNER_DSC_FLOOR


def test_lite_key_slices_on_an_ellipsoids_ends_and_middle_recover_it_with_rounded_boxes(lite_model) -> None:
    """Tight boxes on the first, middle and last slice of a bright ellipsoid: the real LiteMedSAM keeps
    each mask inside its box, so linear boxes between the keys cut the sections short (measured:
    volume DSC 0.80, 0.38-0.66 on the slices next to the ends) and rounded ones recover it (0.996)."""
    truth = ellipsoid((17, 96, 96), centre=(8, 48, 46), radii=(8.5, 24.0, 30.0))
    array = np.random.default_rng(1).normal(100, 20, truth.shape).astype(np.float32)
    array[truth] += 200
    volume = make_volume(array, "synthetic-ellipsoid-key-ends", spacing=SYNTH_SPACING)
    keys = {k: mask_box(truth[k]) for k in (0, 8, 16)}
    found = {}
    for rounded in (True, False):
        segmenter = Segmenter(lite_model, propagation=PropagationRule(rounded_keys=rounded))
        found[rounded] = dice(segmenter.segment(volume, [KeySlicesPrompt(boxes=keys)], modality="MR").label == 1, truth)
    assert found[True] >= 0.95 and found[False] < 0.85


def test_lite_key_slices_give_every_interpolated_box_the_small_box_prior(lite_model) -> None:
    """Boxes interpolated between tight key-slice boxes are tight too: small ones get the box prior
    on every slice (on the sample data's key slices this raised the median DSC of ct_3mm + mr_3mm
    from 0.692 to 0.711, README "3D"); a 3D box's loose boxes never do."""
    truth = ellipsoid((10, 96, 96), centre=(4.5, 48, 46), radii=(4.0, 6.0, 7.0))
    rng = np.random.default_rng(2)
    array = rng.normal(100, 20, truth.shape).astype(np.float32)
    array[truth] += 200
    volume = make_volume(array, "synthetic-small-ellipsoid", spacing=SYNTH_SPACING)
    segmenter = Segmenter(lite_model, prior=BoxPrior(fill_gate=float("inf")))  # shift whenever the prior is given
    keys = {k: mask_box(truth[k]) for k in (2, 4, 7)}
    result = segmenter.segment(volume, [KeySlicesPrompt(boxes=keys)], modality="MR")
    obj = result.objects[0]
    assert obj.slices == list(range(2, 8)) and obj.prior_slices == 6 and obj.zoomed_slices == 0
    assert dice(result.label[2:8] == 1, truth[2:8]) >= 0.8
    x0, y0, x1, y1 = mask_box(truth.any(axis=0))
    loose = segmenter.segment(volume, [Box3DPrompt(box=[x0, y0, x1, y1], first=1, last=8)], modality="MR")
    assert loose.objects[0].prior_slices == 0


def test_lite_key_slices_keep_one_ct_window_when_a_box_is_added(lite_model) -> None:
    """The CT window of a key-slice run comes from all its key boxes together: a further box whose
    own region would get the lung window (mostly air) leaves it as it was, so no slice is encoded
    again (the window of the middle key box alone flipped to lung here and re-encoded all 8)."""
    rng = np.random.default_rng(3)
    array = rng.normal(40, 10, (10, 64, 64)).astype(np.float32)
    array[1:9, 22:42, 22:42] += 110  # the object, soft tissue
    array[4, 20:44, 20:44] = rng.normal(-850, 30, (24, 24))  # slice 4: an air pocket where it was
    volume = make_volume(array, "synthetic-ct-key-window")
    box = (20.0, 20.0, 43.0, 43.0)
    segmenter = Segmenter(lite_model)
    two = segmenter.segment(volume, [KeySlicesPrompt(boxes={1: box, 8: box})], modality="CT")
    assert two.objects[0].preprocessing.startswith("window:soft_tissue") and two.cache_misses == 8
    assert segmenter.normaliser(volume, "CT", None, box, 4).id.startswith("window:lung")  # alone: lung
    three = segmenter.segment(volume, [KeySlicesPrompt(boxes={1: box, 4: box, 8: box})], modality="CT")
    assert three.objects[0].preprocessing == two.objects[0].preprocessing
    assert (three.cache_misses, three.cache_hits) == (0, 8)
