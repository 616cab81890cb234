"""Drafts from infer answers (lib/infers/drafts.py) on MONAI Label's real local datastore: how answers
merge by label value, which files count as datastore images, and the draft written beside no final
label. The loop through the server is in test_app_train.py."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np

from app_helpers import REPO_ROOT, SAMPLE_DIR

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))

from lib.datastore import local_datastore  # noqa: E402
from lib.infers.drafts import DraftWriter, datastore_id, merge_draft  # noqa: E402
from medsam_engine.imageio import read_image  # noqa: E402


def test_answers_merge_by_label_value_on_the_slices_they_cover():
    draft = np.zeros((4, 8, 8), np.uint16)
    draft[0, :2, :2] = 2  # liver on slice 0
    draft[1, :2, :2] = 2  # liver on slice 1
    draft[1, 6:, 6:] = 3  # spleen on slice 1
    answer = np.zeros((4, 8, 8), np.uint8)
    answer[1, 3:5, 3:5] = 1  # a new liver answer on slice 1
    merged = merge_draft(draft, answer, 2)
    assert (merged[0] == draft[0]).all()  # slices the answer does not cover: kept
    assert (merged[1, :2, :2] == 0).all() and (merged[1, 3:5, 3:5] == 2).all()  # liver replaced there
    assert (merged[1, 6:, 6:] == 3).all()  # the other value kept
    assert (draft[1, :2, :2] == 2).all()  # the stored draft is not changed in place
    assert (merge_draft(None, answer, None) == answer).all()  # no name, no draft: the answer's own values


def test_draft_written_for_datastore_images_only_and_never_beside_a_final_label(tmp_path: Path):
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    datastore = local_datastore(str(studies))
    assert datastore_id(datastore, str(studies / "mr_brain.nii.gz")) == "mr_brain"
    copy = tmp_path / "mr_brain.nii.gz"
    shutil.copy(studies / "mr_brain.nii.gz", copy)
    assert datastore_id(datastore, str(copy)) is None  # same name, not the datastore's file (an upload)

    writer = DraftWriter(lambda: datastore, ["lesion", "liver"])
    volume = read_image(studies / "mr_brain.nii.gz")
    answer = np.zeros(volume.array.shape, np.uint8)
    answer[10, 100:120, 100:120] = 1
    assert writer.save(str(studies / "ct_3mm.nii.gz"), read_image(studies / "ct_3mm.nii.gz"),
                       np.ones(read_image(studies / "ct_3mm.nii.gz").array.shape, np.uint8), "liver", "v")[
        "reason"] == "the image has a final label"
    assert writer.save(str(copy), volume, answer, "liver", "v")["queued"] is False
    assert writer.save(str(studies / "mr_brain.nii.gz"), volume, answer, "liver", "v")["queued"] is True
    deadline = time.monotonic() + 60
    while writer.status()["pending"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert writer.status() == {"queued": 1, "written": 1, "skipped": 0, "failed": 0, "pending": 0}
    label_id = datastore.get_label_by_image_id("mr_brain", "original")
    stored = read_image(datastore.get_label_uri(label_id, "original")).array
    assert np.array_equal(stored, answer * 2)  # liver is the 2nd label name
    assert datastore.get_label_info(label_id, "original")["label_names"] == {"liver": 2}
    assert not datastore.get_label_by_image_id("mr_brain", "final")
    assert not list(tmp_path.glob("medsam-draft-*")) and not [p for p in studies.rglob(".*") if "tmp" in p.name]
