"""The app's auto-training trigger on MONAI Label's real local datastore (no server needed)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from app_helpers import REPO_ROOT, SAMPLE_DIR

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))

from lib.trainers.auto import AutoTrain  # noqa: E402
from monailabel.datastore.local import LocalDatastore  # noqa: E402


@pytest.fixture()
def datastore(tmp_path: Path) -> LocalDatastore:
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies, ignore=shutil.ignore_patterns("labels"))
    return LocalDatastore(str(studies), auto_reload=False)


def test_auto_train_after_every_n_final_labels(datastore: LocalDatastore):
    label = SAMPLE_DIR / "labels" / "final"
    auto = AutoTrain(every=2)
    saved = datastore.save_label("ct_3mm", str(label / "ct_3mm.nii.gz"), "final", {})
    assert not auto.label_saved(datastore, "ct_3mm", saved)
    draft = datastore.save_label("mr_3mm", str(label / "mr_3mm.nii.gz"), "original", {})
    assert not auto.label_saved(datastore, "mr_3mm", draft)  # a draft is not an annotator's label
    saved = datastore.save_label("mr_3mm", str(label / "mr_3mm.nii.gz"), "final", {})
    assert auto.label_saved(datastore, "mr_3mm", saved)  # the second final label: time to train
    auto.started()
    assert not auto.label_saved(datastore, "mr_3mm", saved)  # the same save seen again counts once
    assert not AutoTrain(every=0).label_saved(datastore, "ct_3mm", saved)  # off by default
