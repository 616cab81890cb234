"""Intensity preprocessing: CT windows, percentile clipping, modality inference, automatic window."""

from __future__ import annotations

import numpy as np
import pytest

from engine_helpers import dice, make_volume
from medsam_engine import Box3DPrompt, EngineInputError, Segmenter
from medsam_engine.preprocess import (
    CT_WINDOWS,
    KeepRGB,
    PercentileClip,
    Window,
    auto_window,
    bone_boxes,
    drawn_around_bone,
    infer_modality,
    normalise_modality,
    parse_window,
    percentile_clip,
)
from medsam_engine.propagation import PropagationRule


# ---- windows -----------------------------------------------------------------------------
@pytest.mark.parametrize("width, level", [(400.0, 40.0), (1500.0, -160.0), (80.0, 40.0), (1800.0, 400.0), (7.0, -3.5)])
def test_window_maps_bottom_level_top_to_0_127_5_255(width: float, level: float) -> None:
    window = Window("w", width, level)
    values = np.array([level - width / 2, level, level + width / 2], dtype=np.float64)
    np.testing.assert_allclose(window.apply(values), [0.0, 127.5, 255.0], atol=1e-9)


def test_window_clips_outside_and_is_linear_inside() -> None:
    window = Window("soft_tissue", 400.0, 40.0)
    values = np.array([-3000.0, -161.0, -60.0, 140.0, 241.0, 3000.0])
    np.testing.assert_allclose(window.apply(values), [0.0, 0.0, 63.75, 191.25, 255.0, 255.0])


def test_window_presets_are_the_papers_numbers() -> None:
    assert CT_WINDOWS["soft_tissue"] == (400.0, 40.0)
    assert CT_WINDOWS["lung"] == (1500.0, -160.0)
    assert CT_WINDOWS["brain"] == (80.0, 40.0)
    assert "bone" in CT_WINDOWS and CT_WINDOWS["bone"][1] > 200  # a bone level sits well above soft tissue
    lung = parse_window("lung")
    assert (lung.name, lung.width, lung.level) == ("lung", 1500.0, -160.0)
    assert lung.id == "window:lung:1500/-160"


# ---- parse_window ------------------------------------------------------------------------
@pytest.mark.parametrize("spec, expected", [
    ("soft_tissue", Window("soft_tissue", 400.0, 40.0)),
    ("Soft Tissue", Window("soft_tissue", 400.0, 40.0)),
    ("abdomen", Window("soft_tissue", 400.0, 40.0)),
    ("soft-tissue", Window("soft_tissue", 400.0, 40.0)),
    ("BRAIN", Window("brain", 80.0, 40.0)),
    ("bone", Window("bone", *CT_WINDOWS["bone"])),
    ("350/50", Window("custom", 350.0, 50.0)),
    ("2000/-600", Window("custom", 2000.0, -600.0)),
    ({"width": 350, "level": -20}, Window("custom", 350.0, -20.0)),
    ((1500, -600), Window("custom", 1500.0, -600.0)),
    ([80, "40"], Window("custom", 80.0, 40.0)),
])
def test_parse_window_forms(spec: object, expected: Window) -> None:
    assert parse_window(spec) == expected


@pytest.mark.parametrize("spec", [None, "", "auto"])
def test_parse_window_auto_means_none(spec: object) -> None:
    assert parse_window(spec) is None


@pytest.mark.parametrize("spec, words", [
    ("liver", "unknown CT window"),
    ("abc/40", "numeric"),
    ("400/", "numeric"),
    ("0/40", "positive"),
    ("-400/40", "positive"),
    ("nan/40", "positive"),
    ("400/inf", "positive"),
    ({"width": 400}, "numeric"),
    ({"width": "wide", "level": 40}, "numeric"),
    ((1, 2, 3), "cannot read"),
    (42, "cannot read"),
])
def test_parse_window_errors_name_the_problem(spec: object, words: str) -> None:
    with pytest.raises(EngineInputError, match=words):
        parse_window(spec)


# ---- percentile clip ---------------------------------------------------------------------
def test_percentile_clip_bounds_on_known_array() -> None:
    values = np.arange(1, 1001, dtype=np.float64)  # 1..1000: p0.5 = 1 + 0.005*999, p99.5 = 1 + 0.995*999
    clip = percentile_clip(values.reshape(10, 10, 10))
    assert clip.low == pytest.approx(5.995)
    assert clip.high == pytest.approx(995.005)
    out = clip.apply(np.array([0.0, 5.995, 500.0, 995.005, 5000.0]))
    np.testing.assert_allclose(out, [0.0, 0.0, (500 - 5.995) * 255 / (995.005 - 5.995), 255.0, 255.0])


def test_percentile_clip_ignores_zero_background() -> None:
    values = np.zeros(5000)
    values[:1000] = np.arange(1, 1001)
    clip = percentile_clip(values.reshape(5, 10, 100))
    assert (clip.low, clip.high) == pytest.approx((5.995, 995.005))


def test_percentile_clip_constant_volume_is_finite() -> None:
    clip = percentile_clip(np.zeros((2, 4, 4)))
    assert (clip.low, clip.high) == (0.0, 0.0)
    assert np.all(clip.apply(np.zeros((4, 4))) == 0)
    assert PercentileClip(1.0, 3.0).id != PercentileClip(1.0, 4.0).id  # bounds enter the cache key


def test_keep_rgb_passes_8bit_values_through() -> None:
    rgb = np.array([[[0, 128, 255], [300, -5, 7]]], dtype=np.float32)
    np.testing.assert_array_equal(KeepRGB().apply(rgb), [[[0, 128, 255], [255, 0, 7]]])


# ---- modality ----------------------------------------------------------------------------
def test_infer_modality_ct_mr_rgb(sample_volume) -> None:
    rng = np.random.default_rng(0)
    body = rng.normal(40, 30, (8, 32, 32))
    ct = body.copy()
    ct[:, :6] = -1000  # air above the body
    assert infer_modality(ct) == "CT"
    assert infer_modality(np.abs(body) * 10) == "OTHER"  # MR-like: no values far below zero
    assert infer_modality(body - 300) == "OTHER"  # negative, but not air
    assert infer_modality(np.zeros((1, 8, 8, 3))) == "RGB"
    assert infer_modality(sample_volume("ct_3mm")[0].array) == "CT"
    assert infer_modality(sample_volume("ct_512")[0].array) == "CT"
    assert infer_modality(sample_volume("mr_3mm")[0].array) == "OTHER"


@pytest.mark.parametrize("given, expected", [
    ("CT", "CT"), ("ct", "CT"), ("MRI", "MR"), (" mr ", "MR"), ("DX", "XR"), ("CR", "XR"),
    ("US", "US"), ("PT", "OTHER"), (None, None), ("", None),
])
def test_normalise_modality(given: str | None, expected: str | None) -> None:
    assert normalise_modality(given) == expected


def test_unknown_modality_is_an_input_error() -> None:
    with pytest.raises(EngineInputError, match="unknown modality 'banana'"):
        normalise_modality("banana")


# ---- automatic CT window -----------------------------------------------------------------
@pytest.mark.parametrize("values, name", [
    ([-850.0, -900.0, -700.0, 20.0], "lung"),
    ([700.0, 900.0, 1200.0, 30.0], "bone"),
    ([30.0, 60.0, 45.0, -900.0, 1000.0], "soft_tissue"),
    ([-400.0], "soft_tissue"),  # the thresholds are strict
    ([300.0], "soft_tissue"),
    ([-401.0], "lung"),
    ([301.0], "bone"),
    ([], "soft_tissue"),
])
def test_auto_window_choice(values: list[float], name: str) -> None:
    window = auto_window(np.array(values))
    assert window == Window(name, *CT_WINDOWS[name])


def _ct_phantom() -> np.ndarray:
    """A CT-like volume: air lung on the left, soft tissue in the middle, bone on the right."""
    volume = np.full((3, 40, 60), -1000.0, dtype=np.float32)
    volume[:, :, 20:40] = 50.0
    volume[:, :, 40:] = 900.0
    return volume


def test_segmenter_picks_window_from_the_box_and_says_so(lite_model) -> None:
    volume = make_volume(_ct_phantom(), "phantom-ct")
    segmenter = Segmenter(lite_model)
    modality = segmenter.modality_of(volume)
    assert modality == "CT"
    picks = {name: segmenter.normaliser(volume, modality, None, box, 1)
             for name, box in {"lung": (2, 2, 17, 37), "soft_tissue": (22, 2, 37, 37), "bone": (42, 2, 57, 37)}.items()}
    assert {name: norm.name for name, norm in picks.items()} == {n: n for n in picks}
    # a window the caller gives wins over the automatic choice
    assert segmenter.normaliser(volume, modality, "400/40", (2, 2, 17, 37), 1) == Window("custom", 400.0, 40.0)
    # and the model input is that window mapped to [0, 1]
    values = segmenter.slice_input(volume, 1, picks["soft_tissue"])
    assert values.shape == (40, 60, 3) and values.dtype == np.float32
    np.testing.assert_allclose(values[5, [5, 30, 50]], [[0.0] * 3, [(50 + 160) / 400] * 3, [1.0] * 3], atol=1e-6)


def test_segmenter_grey_images_use_the_volume_percentile_clip(lite_model) -> None:
    array = np.zeros((2, 20, 20), dtype=np.float32)
    array[0] = np.arange(1, 401).reshape(20, 20)
    array[1] = 1000.0 + np.arange(400).reshape(20, 20)
    volume = make_volume(array, "mr-like")
    segmenter = Segmenter(lite_model)
    assert segmenter.modality_of(volume) == "OTHER"
    norm = segmenter.normaliser(volume, "MR", "lung", (0, 0, 10, 10), 0)  # a CT window is ignored for MR
    expected = np.percentile(array[array != 0], [0.5, 99.5])
    assert isinstance(norm, PercentileClip)
    assert (norm.low, norm.high) == pytest.approx(tuple(expected))
    # the bounds come from the whole volume, so slice 0 stays below mid-grey
    assert segmenter.slice_input(volume, 0, norm).max() < 0.5


@pytest.mark.parametrize("surround, name", [(-850.0, "lung"), (60.0, "soft_tissue"), (-1000.0, "soft_tissue")])
def test_soft_tissue_box_in_lung_gets_the_lung_window(lite_model, surround: float, name: str) -> None:
    """A 40 HU nodule filling its box: lung parenchyma around it means a lung lesion; liver or the
    air outside the body around it does not."""
    plane = np.full((3, 64, 64), surround, dtype=np.float32)
    plane[:, 24:40, 24:40] = 40.0
    plane[:, 0, 0] = -1024.0  # air somewhere, so the image reads as CT
    volume = make_volume(plane, f"nodule-{surround}")
    segmenter = Segmenter(lite_model)
    window = segmenter.normaliser(volume, "CT", None, (24.0, 24.0, 39.0, 39.0), 1)
    assert window == Window(name, *CT_WINDOWS[name])


# ---- bone window for a 3D box drawn around a bone ------------------------------------------
def _plane_with_bone(columns: slice, ring_bone: bool = False) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """A soft-tissue plane with bone (600 HU) in the given columns of a 41-px box at (30, 30), and
    around the box as well when `ring_bone`."""
    plane = np.full((101, 101), 40.0, dtype=np.float32)
    if ring_bone:
        plane[10:91, 10:91] = 600.0
        plane[30:71, 30:71] = 40.0
    plane[30:71, columns] = 600.0
    return plane, (30.0, 30.0, 70.0, 70.0)


@pytest.mark.parametrize("columns, ring_bone, expected", [
    (slice(48, 52), False, True),  # a 4-px band through the middle: 4 of its 25 columns
    (slice(48, 50), False, False),  # 2 of 25 columns: under a tenth
    (slice(30, 38), False, False),  # bone along the box's side only (a rib beside an organ)
    (slice(45, 55), True, False),  # bone around the box too (a canal)
    (slice(0, 0), False, False),
])
def test_drawn_around_bone_reads_the_box_middle_and_its_ring(columns: slice, ring_bone: bool,
                                                               expected: bool) -> None:
    plane, box = _plane_with_bone(columns, ring_bone)
    assert drawn_around_bone(plane, box) is expected


def _rib_volume() -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Soft tissue with a bright 'rib' whose 7-px cross-section moves along an arc from slice to slice,
    and the rib's 3D box (the union of its slice boxes)."""
    volume = np.full((15, 96, 96), 40.0, dtype=np.float32)
    volume[:, 0, 0] = -1000.0  # air somewhere, so the image reads as CT
    xs, ys = [], []
    for k, t in enumerate(np.linspace(0.0, np.pi / 2, 15)):
        cx, cy = int(round(30 + 30 * np.cos(t))), int(round(70 - 30 * np.sin(t)))
        volume[k, cy - 3:cy + 4, cx - 3:cx + 4] = 600.0
        xs += [cx - 3, cx + 3]
        ys += [cy - 3, cy + 3]
    return volume, (float(min(xs)), float(min(ys)), float(max(xs)), float(max(ys)))


def test_3d_box_around_a_rib_gets_the_bone_window(lite_model) -> None:
    array, box = _rib_volume()
    volume = make_volume(array, "rib-phantom")
    segmenter = Segmenter(lite_model)
    # the middle slice alone is soft tissue: the rib is a speck in its box
    assert segmenter.normaliser(volume, "CT", None, box, 7) == Window("soft_tissue", *CT_WINDOWS["soft_tissue"])
    # over the box's slices the rib is a band that the box frames
    assert segmenter.normaliser_3d(volume, "CT", None, box, 0, 14) == Window("bone", *CT_WINDOWS["bone"])
    # a window the caller gives wins
    assert segmenter.normaliser_3d(volume, "CT", "lung", box, 0, 14) == Window("lung", *CT_WINDOWS["lung"])


def test_3d_box_inside_bone_keeps_the_soft_tissue_window(lite_model) -> None:
    """A soft cord in a bright bony canal (the box inside the ring of bone, bone around it as well)
    and an organ with a rib along one side of its box are not bones."""
    array = np.full((10, 96, 96), 40.0, dtype=np.float32)
    array[:, 0, 0] = -1000.0
    yy, xx = np.mgrid[:96, :96]
    radius = np.hypot(yy - 48, xx - 48)
    array[:, (radius > 6) & (radius < 16)] = 700.0  # the canal's bone
    cord = (42.0, 42.0, 54.0, 54.0)
    organ = (10.0, 10.0, 40.0, 40.0)
    array[:, 10:41, 10:12] = 500.0  # a rib along the organ's left side
    volume = make_volume(array, "canal-phantom")
    segmenter = Segmenter(lite_model)
    soft = Window("soft_tissue", *CT_WINDOWS["soft_tissue"])
    assert segmenter.normaliser_3d(volume, "CT", None, cord, 0, 9) == soft
    assert segmenter.normaliser_3d(volume, "CT", None, organ, 0, 9) == soft


def _rib_with_neighbour() -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """The rib phantom with a smaller, separate piece of bone (a neighbour's tip) in its box's corner."""
    volume, box = _rib_volume()
    volume[5:10, 62:68, 28:34] = 500.0
    return volume, box


def test_bone_boxes_are_the_largest_pieces_own_boxes() -> None:
    volume, box = _rib_with_neighbour()
    boxes = bone_boxes(volume, box, 0, 14)
    assert sorted(boxes) == list(range(15))
    for k, found in boxes.items():
        rows, cols = np.nonzero(volume[k] == 600.0)  # the rib's 7-px cross-section, not the neighbour
        assert found == (cols.min(), rows.min(), cols.max(), rows.max()), k
    assert bone_boxes(np.full((3, 20, 20), 40.0), (2.0, 2.0, 17.0, 17.0), 0, 2) == {}


def test_bone_boxes_widen_a_one_pixel_bone_inside_the_box() -> None:
    volume = np.full((2, 20, 20), 40.0)
    volume[:, 5, 10:18] = 400.0  # one row thick, along the box's lower edge
    assert bone_boxes(volume, (8.0, 2.0, 17.0, 5.0), 0, 1) == {0: (10.0, 4.0, 17.0, 5.0), 1: (10.0, 4.0, 17.0, 5.0)}


def test_3d_box_around_a_rib_is_decoded_with_the_ribs_own_boxes(lite_model) -> None:
    """Propagated from the loose 3D box, the real LiteMedSAM loses the rib (volume DSC about 0.06);
    each slice decoded with the rib's own box finds it (about 0.89) and leaves the neighbour out."""
    array, box = _rib_with_neighbour()
    volume = make_volume(array, "rib-neighbour-phantom")
    rib = array == 600.0
    found = {}
    for rule in (PropagationRule(), PropagationRule(bone_boxes=False)):
        result = Segmenter(lite_model, propagation=rule).segment(volume, [Box3DPrompt(box, 0, 14)], "CT")
        assert result.objects[0].preprocessing == "window:bone:1800/400"
        found[rule.bone_boxes] = result.label == 1
    assert dice(found[True], rib) >= 0.8
    assert dice(found[False], rib) < 0.3
    assert not found[True][5:10, 62:68, 28:34].any()  # not the neighbour
    x0, y0, x1, y1 = (int(v) for v in box)
    outside = np.ones(rib.shape, dtype=bool)
    outside[:, y0:y1 + 1, x0:x1 + 1] = False
    assert not (found[True] & outside).any()
