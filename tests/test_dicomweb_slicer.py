"""3D Slicer's own MONAI Label client library against the Orthanc stack: next_sample, infer with an
(unsorted) roi, save_label; the label lands in Orthanc as DICOM SEG of the right series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from app_helpers import slicer_client_module
from dicomweb_helpers import assert_same_grid, seg_for, seg_to_image, series_geometry

# Per sample: a box (i0, j0, i1, j1) around an organ on slice 10, and the organ's name.
BOXES = {"ct": ((110, 190, 240, 390), "liver"), "mr": ((60, 40, 200, 220), "brain")}


@pytest.fixture(scope="module")
def client(dicomweb_stack, tmp_path_factory):
    return slicer_client_module().MONAILabelClient(dicomweb_stack.server.url,
                                                  tmpdir=str(tmp_path_factory.mktemp("slicer")))


def test_slicer_annotates_every_series_through_next_sample(dicomweb_stack, client):
    names = {uid: name for name, uid in dicomweb_stack.series.items()}
    done: list[str] = []
    for k_range in ((10, 10), (11, 9)):  # a 2D box, then a 3D box with its k ends swapped
        sample = client.next_sample("random", {})
        image = sample["id"]
        assert image in names and image not in done  # only series still unlabelled are offered
        (i0, j0, i1, j1), organ = BOXES[names[image]]
        result_file, reply = client.infer("medsam", image, {"roi": [i1, i0, j0, j1, *k_range], "label": organ})
        label = sitk.ReadImage(result_file)
        assert_same_grid(label, series_geometry(names[image]))
        array = sitk.GetArrayFromImage(label)
        assert reply["mode"] == ("2d" if k_range[0] == k_range[1] else "3d-box")
        assert np.count_nonzero(array[10]) > 1000
        assert set(np.nonzero(array.any(axis=(1, 2)))[0]) <= set(range(min(k_range), max(k_range) + 1))

        saved = client.save_label(image, result_file, params={"label_info": [{"name": organ, "idx": 1}]})
        assert saved["image"] == image
        segs = seg_for(dicomweb_stack.orthanc, image)
        assert len(segs) == 1
        seg_image, seg_names = seg_to_image(segs[0])
        assert seg_names == {1: organ}
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_image), array)
        done.append(image)
        Path(result_file).unlink()
    assert sorted(done) == sorted(names)
