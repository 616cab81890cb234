"""The medsam server on a real Orthanc through DICOMweb: listing, modality from the DICOM header,
label geometry, DICOM SEG write-back read voxel for voxel, bad labels refused, restart."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import SimpleITK as sitk

from app_helpers import SAMPLE_DIR, id_requests, infer_json, ohif_infer
from dicomweb_helpers import assert_same_grid, save_label, seg_for, seg_series, seg_to_image, series_geometry
from monailabel.datastore.utils.colors import GENERIC_ANATOMY_COLORS
from pydicom_seg.template import rgb_to_cielab

LIVER_BOX = [110, 190, 240, 390, 10]  # CT sample, slice 10: the liver (image's left)
LIVER_HU = (40, 250)  # contrast-enhanced liver parenchyma


def stats(url: str) -> dict:
    return requests.get(f"{url}/datastore/", params={"output": "stats"}, timeout=60).json()


@pytest.fixture(scope="module")
def saved_ct(dicomweb_stack, tmp_path_factory) -> dict:
    """A MedSAM liver label on the CT plus a hand-drawn second segment, saved as final."""
    url, ct = dicomweb_stack.server.url, dicomweb_stack.series["ct"]
    tmp = tmp_path_factory.mktemp("saved-ct")
    response = ohif_infer(url, ct, {"boxes": [LIVER_BOX]})
    assert response.status_code == 200, response.text
    image = sitk.ReadImage(str(_write(tmp / "medsam.nrrd", response.content)))
    label = sitk.GetArrayFromImage(image)
    label[4, 300:340, 320:360] = 2  # a second segment, as an edit in the viewer would add
    edited = sitk.GetImageFromArray(label)
    edited.CopyInformation(image)
    path = tmp / "edited.nrrd"
    sitk.WriteImage(edited, str(path))
    before = len(seg_series(dicomweb_stack.orthanc))
    saved = save_label(url, ct, path, {"label_info": [{"name": "liver", "idx": 1}, {"name": "lesion", "idx": 2}]})
    return {"response": saved, "label": label, "image": edited, "segs_before": before}


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_series_listed_through_the_server(dicomweb_stack):
    url = dicomweb_stack.server.url
    assert stats(url)["total"] == 2  # CT and MR; MONAI Label's default filter would list the CT only
    sample = requests.post(f"{url}/activelearning/random", timeout=60).json()
    assert sample["id"] in dicomweb_stack.series.values()
    assert "itkimage2segimage" not in dicomweb_stack.server.log_tail(10_000)  # no dcmqi download tried


def test_proxy_forwards_the_query_and_the_pacs_answer(dicomweb_stack):
    """OHIF's DICOMweb traffic through /proxy/dicom: a QIDO search keeps its filter (MONAI Label's
    proxy dropped the query and listed every study), WADO metadata comes back as JSON."""
    url, ct = dicomweb_stack.server.url, dicomweb_stack.series["ct"]
    studies = requests.get(f"{url}/proxy/dicom/qido/studies", timeout=60)
    assert studies.status_code == 200, studies.text
    assert len(studies.json()) >= 2
    nobody = requests.get(f"{url}/proxy/dicom/qido/studies", params={"PatientID": "nobody-xyz"}, timeout=60)
    assert nobody.status_code in (200, 204), nobody.text
    assert not nobody.content.strip() or nobody.json() == []
    study = next(s for s in studies.json() if ct in requests.get(
        f"{url}/proxy/dicom/qido/studies/{s['0020000D']['Value'][0]}/series", timeout=60).text)
    uid = study["0020000D"]["Value"][0]
    metadata = requests.get(f"{url}/proxy/dicom/wado/studies/{uid}/series/{ct}/metadata", timeout=60)
    assert metadata.status_code == 200 and metadata.headers["content-type"].startswith("application/dicom+json")
    assert len(metadata.json()) == 20  # the CT sample's slices
    missing = requests.get(f"{url}/proxy/dicom/wado/studies/1.2.3/series/4.5.6/metadata", timeout=60)
    assert missing.status_code == 404


@pytest.mark.parametrize("name, modality, preprocessing", [("ct", "CT", "window:"), ("mr", "MR", "clip:")])
def test_modality_from_the_dicom_header(dicomweb_stack, name, modality, preprocessing):
    box = LIVER_BOX if name == "ct" else [60, 40, 200, 220, 10]
    response = infer_json(dicomweb_stack.server.url, dicomweb_stack.series[name], {"boxes": [box]})
    assert response.status_code == 200, response.text
    reply = response.json()
    # Inferred from intensities the MR would be "OTHER": "MR" can only come from the header.
    assert reply["modality"] == modality
    assert reply["window"].startswith(preprocessing)


def test_explicit_modality_wins_over_the_header(dicomweb_stack):
    response = infer_json(dicomweb_stack.server.url, dicomweb_stack.series["ct"],
                          {"boxes": [LIVER_BOX], "modality": "MR"})
    assert response.status_code == 200, response.text
    assert response.json()["modality"] == "MR" and response.json()["window"].startswith("clip:")


def test_label_is_on_the_series_grid(dicomweb_stack, tmp_path):
    response = ohif_infer(dicomweb_stack.server.url, dicomweb_stack.series["ct"], {"boxes": [LIVER_BOX]})
    assert response.status_code == 200, response.text
    image = sitk.ReadImage(str(_write(tmp_path / "label.nrrd", response.content)))
    assert_same_grid(image, series_geometry("ct"))
    label = sitk.GetArrayFromImage(image)
    ct = sitk.GetArrayFromImage(series_geometry("ct"))
    assert np.count_nonzero(label) == np.count_nonzero(label[10]) > 2000
    assert LIVER_HU[0] < float(np.median(ct[label > 0])) < LIVER_HU[1]  # liver, not fat or bone


def test_saved_label_lands_in_orthanc_as_dicom_seg(dicomweb_stack, saved_ct):
    assert saved_ct["response"].status_code == 200, saved_ct["response"].text
    ct = dicomweb_stack.series["ct"]
    segs = seg_for(dicomweb_stack.orthanc, ct)
    assert len(segs) == 1 and len(seg_series(dicomweb_stack.orthanc)) == saved_ct["segs_before"] + 1
    seg = segs[0]
    assert seg.Modality == "SEG" and seg.SOPClassUID == pydicom.uid.UID("1.2.840.10008.5.1.4.1.1.66.4")
    assert {str(ref.SeriesInstanceUID) for ref in seg.ReferencedSeriesSequence} == {ct}
    assert len(seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 20
    image, names = seg_to_image(seg)
    assert names == {1: "liver", 2: "lesion"}
    assert list(seg.SegmentSequence[0].RecommendedDisplayCIELabValue) == rgb_to_cielab(GENERIC_ANATOMY_COLORS["liver"])
    assert_same_grid(image, series_geometry("ct"))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), saved_ct["label"])  # voxel for voxel


def test_saved_series_listed_as_labelled(dicomweb_stack, saved_ct):
    assert saved_ct["response"].status_code == 200
    assert stats(dicomweb_stack.server.url)["completed"] == 1
    sample = requests.post(f"{dicomweb_stack.server.url}/activelearning/random", timeout=60).json()
    assert sample["id"] == dicomweb_stack.series["mr"]  # the only unlabelled series left


@pytest.mark.parametrize("case", ["other_series_size", "garbage", "empty", "shifted", "negative", "params", "short_bin"])
def test_bad_label_refused_and_nothing_stored(dicomweb_stack, tmp_path, case):
    ct = dicomweb_stack.series["ct"]
    reference = series_geometry("ct")
    array = np.zeros(sitk.GetArrayViewFromImage(reference).shape, np.int16)
    array[10, 200:260, 150:200] = 1
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    params = {"label_info": [{"name": "liver", "idx": 1}]}
    path = tmp_path / "label.nrrd"
    expect = "label refused"
    if case == "other_series_size":
        image = sitk.Image(256, 256, 20, sitk.sitkUInt8) + 1
        expect = "does not match the image"
    elif case == "garbage":
        path = _write(tmp_path / "label.nii.gz", b"not an image at all")
    elif case == "empty":
        image = image * 0
        expect = "empty"
    elif case == "shifted":
        image.SetOrigin(tuple(o + 5.0 for o in reference.GetOrigin()))
        expect = "origin"
    elif case == "negative":
        image = image * -1
        expect = "0..65535"
    elif case == "params":
        params, expect = "{not json", "params is not valid JSON"
    elif case == "short_bin":  # OHIF's raw voxels, one slice short
        path = _write(tmp_path / "label.bin", array[1:].astype(np.uint8).tobytes())
        expect = "voxels"
    if not path.exists():
        sitk.WriteImage(image, str(path))
    before = len(seg_series(dicomweb_stack.orthanc))
    if case == "params":
        with open(path, "rb") as f:
            response = requests.put(f"{dicomweb_stack.server.url}/datastore/label", params={"image": ct},
                                    files={"label": (path.name, f), "params": (None, params)}, timeout=120)
    else:
        response = save_label(dicomweb_stack.server.url, ct, path, params)
    assert response.status_code == 400, response.text
    assert expect in response.json()["detail"]
    assert len(seg_series(dicomweb_stack.orthanc)) == before


def test_label_for_unknown_series_is_404(dicomweb_stack, tmp_path):
    path = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 2, sitk.sitkUInt8) + 1, str(path))
    response = save_label(dicomweb_stack.server.url, "1.2.3.4.5.6.7", path)
    assert response.status_code == 404 and "unknown image id" in response.json()["detail"]


def test_ids_cannot_leave_the_cache(dicomweb_stack):
    """MONAI Label's DICOMweb datastore joins an image or label id to its cache folder: stock, GET
    /datastore/image?image=../../x served x.nii.gz from beside the cache (when a non-empty folder x
    is there too). Every route that takes an id refuses one that is not a plain name (400); series
    UIDs still pass."""
    url, workdir = dicomweb_stack.server.url, dicomweb_stack.workdir
    planted = workdir / "planted"  # what ../../planted names from the cache's image folder
    (planted / "x").mkdir(parents=True)
    (planted / "x" / "slice.dcm").write_bytes(b"planted")
    shutil.copy(SAMPLE_DIR / "mr_3mm.nii.gz", planted / "x.nii.gz")
    before = sorted(planted.rglob("*"))
    for image_id in ("../../planted/x", str(planted / "x"), "../../../../planted/x"):
        for method, path, kwargs in id_requests(image_id):
            response = requests.request(method, f"{url}{path}", timeout=120, **kwargs)
            case = (method, path, image_id, response.status_code, response.text[:200])
            assert response.status_code == 400, case
            assert method == "HEAD" or "is not a valid id" in response.json()["detail"], case
    ct = dicomweb_stack.series["ct"]
    for method, path, kwargs in id_requests(ct, tag="../../planted"):
        if "tag" in kwargs["params"]:
            response = requests.request(method, f"{url}{path}", timeout=120, **kwargs)
            assert response.status_code == 400, (method, path, response.text[:200])
    assert sorted(planted.rglob("*")) == before
    assert (planted / "x.nii.gz").read_bytes() == (SAMPLE_DIR / "mr_3mm.nii.gz").read_bytes()
    assert requests.head(f"{url}/datastore/image", params={"image": ct}, timeout=300).status_code == 200
    assert requests.get(f"{url}/datastore/image/info", params={"image": ct}, timeout=60).status_code == 200


def test_still_labelled_after_a_restart(dicomweb_stack, saved_ct):
    assert saved_ct["response"].status_code == 200
    dicomweb_stack.restart_server()  # new process, empty cache: only Orthanc remembers
    url = dicomweb_stack.server.url
    assert stats(url) == {"total": 2, "completed": 1, "label_tags": {}}
    sample = requests.post(f"{url}/activelearning/random", timeout=60).json()
    assert sample["id"] == dicomweb_stack.series["mr"]
    # What MONAI Label's training reads: the image and the label rebuilt from the SEG in Orthanc.
    datalist = requests.get(f"{url}/datastore/", params={"output": "train"}, timeout=300).json()
    assert len(datalist) == 1 and dicomweb_stack.series["ct"] in datalist[0]["image"]
    label = sitk.ReadImage(datalist[0]["label"])
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), saved_ct["label"])
    assert_same_grid(label, series_geometry("ct"))


def test_pacs_that_is_down_is_502_with_its_reason_not_an_unknown_image(dicomweb_stack, tmp_path):
    """Orthanc stopped: a series the server has not cached (its info, an infer, a label save) gets
    502 naming the DICOMweb server and why (the app answered 404 "unknown image id" to an outage);
    a cached series is still served; the proxy answers 502. Orthanc is started again after."""
    url, orthanc = dicomweb_stack.server.url, dicomweb_stack.orthanc
    label = tmp_path / "label.nrrd"
    sitk.WriteImage(sitk.Image(8, 8, 2, sitk.sitkUInt8) + 1, str(label))
    orthanc.stop()
    try:
        for method, path, kwargs in [
            ("GET", "/datastore/image/info", {"params": {"image": "1.2.826.0.1.3680043.2.1125.999"}}),
            ("POST", "/infer/medsam", {"params": {"image": "1.2.826.0.1.3680043.2.1125.999", "output": "json"},
                                       "files": {"params": (None, '{"boxes": [[1, 1, 5, 5, 0]]}')}}),
            ("PUT", "/datastore/label", {"params": {"image": "1.2.826.0.1.3680043.2.1125.999"},
                                         "files": {"label": ("label.nrrd", label.read_bytes())}}),
        ]:
            response = requests.request(method, f"{url}{path}", timeout=120, **kwargs)
            assert response.status_code == 502, (method, path, response.status_code, response.text[:300])
            detail = response.json()["detail"]
            assert orthanc.dicomweb_url in detail and "cannot be reached" in detail, detail
        ct = dicomweb_stack.series["ct"]  # downloaded by the tests above: served from the cache
        assert requests.get(f"{url}/datastore/image/info", params={"image": ct}, timeout=60).status_code == 200
        assert requests.get(f"{url}/proxy/dicom/qido/studies", timeout=60).status_code == 502
    finally:
        orthanc.start()
