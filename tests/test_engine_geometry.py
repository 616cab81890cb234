"""Boxes and masks between the slice grid and the model input: LiteMedSAM's letterbox (256 px,
longest side scaled, padded bottom/right) and MedSAM ViT-B's stretch to 1024 x 1024."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsam_engine import EngineInputError
from medsam_engine.geometry import Fit, check_box, mask_box
from medsam_engine.models import InputGeometry

LITE = InputGeometry(256, letterbox=True)
VIT_B = InputGeometry(1024, letterbox=False)


# ---- check_box -----------------------------------------------------------------------------
def test_check_box_keeps_a_box_inside() -> None:
    assert check_box([10, 20, 30, 40], 100, 120) == ((10.0, 20.0, 30.0, 40.0), False)
    assert check_box(np.array([10.5, 20, 30, 40.25]), 100, 120) == ((10.5, 20.0, 30.0, 40.25), False)


@pytest.mark.parametrize("box", [[30, 40, 10, 20], [10, 40, 30, 20], [30, 20, 10, 40]])
def test_check_box_sorts_inverted_corners(box: list[int]) -> None:
    assert check_box(box, 100, 120) == ((10.0, 20.0, 30.0, 40.0), False)


def test_check_box_touching_the_border_is_not_clipped() -> None:
    assert check_box([0, 0, 119, 99], 100, 120) == ((0.0, 0.0, 119.0, 99.0), False)
    assert check_box([119, 99, 100, 80], 100, 120) == ((100.0, 80.0, 119.0, 99.0), False)


@pytest.mark.parametrize("box, expected", [
    ([-5, 10, 30, 40], (0.0, 10.0, 30.0, 40.0)),
    ([10, -1, 30, 40], (10.0, 0.0, 30.0, 40.0)),
    ([100, 10, 500, 40], (100.0, 10.0, 119.0, 40.0)),
    ([10, 90, 30, 100], (10.0, 90.0, 30.0, 99.0)),
    ([200, 250, -50, -60], (0.0, 0.0, 119.0, 99.0)),
])
def test_check_box_clips_and_reports_it(box: list[int], expected: tuple) -> None:
    assert check_box(box, 100, 120) == (expected, True)


# ---- letterbox (LiteMedSAM) ----------------------------------------------------------------
def test_letterbox_scale_and_size() -> None:
    fit = Fit(101, 122, LITE)
    s = 256 / 122
    assert fit.scale == pytest.approx((s, s))
    assert fit.resized == (212, 256)  # round(101 * 256 / 122) = 212 rows, the rest is padding
    assert Fit(512, 512, LITE).resized == (256, 256)
    assert Fit(300, 150, LITE).resized == (256, 128)  # tall image: padding on the right


def test_letterbox_box_both_ways() -> None:
    fit = Fit(512, 512, LITE)
    np.testing.assert_allclose(fit.box_to_model(np.array([[100, 50, 300, 400]])), [[50, 25, 150, 200]])
    np.testing.assert_allclose(fit.box_from_model(np.array([[50, 25, 150, 200]])), [[100, 50, 300, 400]])
    tall = Fit(300, 150, LITE)  # one scale for both axes: 256 / 300
    np.testing.assert_allclose(tall.box_to_model(np.array([[0, 0, 150, 300]])), [[0, 0, 128, 256]])


def test_stretch_box_both_ways() -> None:
    fit = Fit(512, 256, VIT_B)  # H 512, W 256 -> sy 2, sx 4
    assert fit.scale == (2.0, 4.0)
    assert fit.resized == (1024, 1024)
    np.testing.assert_allclose(fit.box_to_model(np.array([[10, 20, 30, 40]])), [[40, 40, 120, 80]])
    np.testing.assert_allclose(fit.box_from_model(np.array([[40, 40, 120, 80]])), [[10, 20, 30, 40]])


@pytest.mark.parametrize("geometry", [LITE, VIT_B], ids=["letterbox256", "stretch1024"])
@pytest.mark.parametrize("shape", [(101, 122), (512, 512), (91, 117), (40, 300)])
def test_box_round_trip_and_border(geometry: InputGeometry, shape: tuple[int, int]) -> None:
    height, width = shape
    fit = Fit(height, width, geometry)
    rng = np.random.default_rng(height * width)
    boxes = np.sort(rng.uniform(0, [width - 1, height - 1, width - 1, height - 1], (20, 4)).reshape(20, 2, 2), axis=1)
    boxes = boxes.reshape(20, 4)
    np.testing.assert_allclose(fit.box_from_model(fit.box_to_model(boxes)), boxes, atol=1e-9)
    # a box touching all four borders ends inside the resized image, less than a pixel from its edge
    model = fit.box_to_model(np.array([[0, 0, width - 1, height - 1]]))[0]
    (h, w), (sy, sx) = fit.resized, fit.scale
    assert model[0] == 0 and model[1] == 0
    assert w - sx - 0.5 <= model[2] < w and h - sy - 0.5 <= model[3] < h
    assert max(h, w) == geometry.size and h <= geometry.size and w <= geometry.size


# ---- images into the model -----------------------------------------------------------------
def test_image_to_model_letterbox_pads_bottom_right() -> None:
    image = np.full((101, 122, 3), 0.7, dtype=np.float32)
    tensor = Fit(101, 122, LITE).image_to_model(image)
    assert tensor.shape == (1, 3, 256, 256)
    assert torch.allclose(tensor[..., :212, :], torch.tensor(0.7), atol=1e-5)
    assert torch.count_nonzero(tensor[..., 212:, :]) == 0


def test_image_to_model_moves_content_with_the_box_mapping() -> None:
    image = np.zeros((100, 200, 3), dtype=np.float32)
    image[20:40, 100:150] = 1.0  # box [100, 20, 149, 39]
    for geometry in (LITE, VIT_B):
        fit = Fit(100, 200, geometry)
        tensor = fit.image_to_model(image)[0, 0].numpy()
        found = mask_box(tensor > 0.5)
        edges = fit.box_to_model(np.array([[100, 20, 150, 40]]))[0]  # outer pixel edges of the block
        np.testing.assert_allclose(found, [edges[0], edges[1], edges[2] - 1, edges[3] - 1], atol=1.0)


def test_stretch_fills_the_whole_input() -> None:
    tensor = Fit(50, 80, VIT_B).image_to_model(np.full((50, 80, 3), 0.25, dtype=np.float32))
    assert tensor.shape == (1, 3, 1024, 1024)
    assert torch.allclose(tensor, torch.tensor(0.25), atol=1e-5)


# ---- logits back to the slice --------------------------------------------------------------
def _square_logits(low: int, y0: int, y1: int, x0: int, x1: int, n: int = 1) -> torch.Tensor:
    logits = torch.full((n, 1, low, low), -10.0)
    logits[:, :, y0:y1, x0:x1] = 10.0
    return logits


def test_logits_to_slice_letterbox_puts_square_back() -> None:
    fit = Fit(101, 122, LITE)  # LiteMedSAM's low-res logits are 256 x 256, one per model pixel
    out = fit.logits_to_slice(_square_logits(256, 64, 128, 32, 160, n=2))
    assert out.shape == (2, 101, 122)
    s = 256 / 122
    found = mask_box(out[0].numpy() > 0)
    np.testing.assert_allclose(found, [32 / s, 64 / s, 160 / s - 1, 128 / s - 1], atol=1.0)
    assert torch.equal(out[0] > 0, out[1] > 0)


def test_logits_to_slice_ignores_the_padding() -> None:
    fit = Fit(101, 122, LITE)
    out = fit.logits_to_slice(_square_logits(256, 214, 256, 0, 256))  # only the padding rows are "on"
    assert not torch.any(out > 0)


def test_logits_to_slice_stretch_puts_square_back() -> None:
    fit = Fit(101, 122, VIT_B)  # ViT-B's 256 x 256 logits cover the 1024 input: 4 model pixels each
    out = fit.logits_to_slice(_square_logits(256, 64, 128, 32, 160))
    assert out.shape == (1, 101, 122)
    sy, sx = fit.scale
    found = mask_box(out[0].numpy() > 0)
    np.testing.assert_allclose(found, [32 * 4 / sx, 64 * 4 / sy, 160 * 4 / sx - 1, 128 * 4 / sy - 1], atol=1.0)


@pytest.mark.parametrize("geometry, low", [(LITE, 256), (VIT_B, 256), (InputGeometry(256, False), 64)],
                         ids=["letterbox256", "stretch1024", "stretch256"])
def test_box_to_model_and_mask_back_round_trip(geometry: InputGeometry, low: int) -> None:
    """A box taken to model space, drawn there as a filled mask and mapped back lands on itself."""
    fit = Fit(101, 122, geometry)
    box = np.array([30.0, 20.0, 90.0, 70.0])
    mx0, my0, mx1, my1 = fit.box_to_model(box[None])[0] * low / geometry.size
    logits = _square_logits(low, round(my0), round(my1), round(mx0), round(mx1))
    found = mask_box(fit.logits_to_slice(logits)[0].numpy() > 0)
    np.testing.assert_allclose(found, box, atol=2.0)


def test_mask_box() -> None:
    mask = np.zeros((10, 12), dtype=bool)
    assert mask_box(mask) is None
    mask[2:5, 3] = True
    mask[7, 9] = True
    assert mask_box(mask) == (3.0, 2.0, 9.0, 7.0)


@pytest.mark.parametrize("box", [[200, 10, 300, 40], [-50, -50, -1, -1], [10, 100, 30, 150]])
def test_check_box_wholly_outside_raises(box: list[int]) -> None:
    with pytest.raises(EngineInputError, match="outside"):
        check_box(box, 100, 120)
