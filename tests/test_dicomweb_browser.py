"""OHIF in a real browser (Debian's headless Chromium, driven by npm playwright-core) on the Orthanc
stack: open the CT, connect the MONAI Label panel, click two corners of a box around the liver,
run `medsam`, and find the segmentation in the viewer (tests/browser/ohif_medsam.js)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from app_helpers import REPO_ROOT
from browser_helpers import run_driver
from dicomweb_helpers import save_label, seg_for, seg_to_image

SCREENSHOT_COPY = REPO_ROOT / "out" / "browser" / "ohif-medsam.png"  # kept after the run, for the README
LIVER_BOX = (110, 190, 240, 390)  # i0, j0, i1, j1 on the slice OHIF opens the CT at


@pytest.fixture(scope="module")
def ohif_run(dicomweb_stack, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ohif")
    box = ",".join(map(str, LIVER_BOX))
    result = run_driver("ohif_medsam.js", dicomweb_stack.server.url, "TotalSegmentator, CT", box, "liver", str(out),
                        out=out)
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "ohif-medsam.png", SCREENSHOT_COPY)
    return result, out


def test_medsam_listed_in_point_prompts(ohif_run):
    result, _ = ohif_run
    assert [m.strip() for m in result["models"]] == ["medsam"]
    assert result["box_tool"] is True and result["console_medsam"] == []  # the clicks went through the box tool


def test_clicks_arrive_as_box_corners(ohif_run, dicomweb_stack):
    result, _ = ohif_run
    assert f"image={dicomweb_stack.series['ct']}" in result["request_url"]
    clicks = result["params"]["foreground"]
    assert len(clicks) == 2 and clicks[0][2] == clicks[1][2]
    corners = np.array([[c[0], c[1]] for c in clicks])
    np.testing.assert_allclose(corners, [LIVER_BOX[:2], LIVER_BOX[2:]], atol=2)
    assert result["params"]["result_extension"] == ".nrrd"


def test_segmentation_appears_in_the_viewer(ohif_run):
    result, out = ohif_run
    assert result["status"] == 200
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "reply.nrrd")))
    k = result["params"]["foreground"][0][2]
    assert np.count_nonzero(label) == np.count_nonzero(label[k]) > 2000
    assert result["voxels_before"] == 0
    assert result["voxels_after"] == np.count_nonzero(label)  # OHIF holds exactly the returned mask

    # ...and draws it: pixels inside the clicked box change colour once the result is shown.
    (x0, y0), (x1, y1) = [(c["x"], c["y"]) for c in result["clicks"]]
    crop = (int(x0) + 3, int(y0) + 3, int(x1) - 3, int(y1) - 3)
    before = np.asarray(Image.open(out / "ohif-clicks.png").convert("RGB").crop(crop), dtype=int)
    after = np.asarray(Image.open(out / "ohif-medsam.png").convert("RGB").crop(crop), dtype=int)
    changed = np.abs(after - before).sum(axis=2) > 30
    assert changed.mean() > 0.2, f"only {changed.mean():.1%} of the box's screen pixels changed"


def test_label_saved_as_ohif_sends_it_becomes_a_seg(ohif_run, dicomweb_stack, tmp_path):
    """OHIF's MonaiLabelClient.save_label uploads the raw voxels as label.bin (x fastest)."""
    _, out = ohif_run
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "reply.nrrd"))).astype(np.uint8)
    path = tmp_path / "label.bin"
    path.write_bytes(label.tobytes())
    ct = dicomweb_stack.series["ct"]
    response = save_label(dicomweb_stack.server.url, ct, path, {"label_info": [{"name": "liver", "idx": 1}]})
    assert response.status_code == 200, response.text
    segs = seg_for(dicomweb_stack.orthanc, ct)
    assert len(segs) == 1
    image, names = seg_to_image(segs[0])
    assert names == {1: "liver"}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), label)
