"""What the fault tests (test_hardening_faults.py) rely on, without a server: atomic writes and
the removal of temporaries a killed writer left, the manifest pointing at the served weights after
a publish killed half-way, the app's datastore under a real write failure, and the cache's bound on
concurrent encodes."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from app_helpers import REPO_ROOT, SAMPLE_DIR
from medsam_engine.atomicio import TEMP_SUFFIX, atomic_write, remove_stale_temps, staged
from medsam_engine.cache import EmbeddingCache
from medsam_engine.checkpoints import manifest_path, publish, reconcile_manifest
from medsam_engine.models import file_sha256

sys.path.insert(0, str(REPO_ROOT / "apps" / "medsam"))

from lib.datastore.errors import LabelRejected  # noqa: E402
from lib.datastore.local import AtomicLocalDatastore, ImageExists  # noqa: E402


def _temps(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TEMP_SUFFIX}"))


def test_atomic_write_that_fails_keeps_the_old_file_and_no_temporary(tmp_path: Path):
    target = tmp_path / "label.nii.gz"
    target.write_bytes(b"old")

    def half_then_fail(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, half_then_fail)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["label.nii.gz"]
    with staged(tmp_path / "a.json") as a, staged(target) as b:  # two files, both written before either rename
        a.write_text("{}")
        b.write_bytes(b"new")
        assert not (tmp_path / "a.json").exists() and target.read_bytes() == b"old"
    assert target.read_bytes() == b"new" and sorted(os.listdir(tmp_path)) == ["a.json", "label.nii.gz"]


def test_stale_temporaries_of_dead_writers_are_removed_live_ones_kept(tmp_path: Path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {
            "dead": f".x.nii.gz.{int(dead.stdout)}-0123abcd.k2j4.partial",
            "live": f".x.nii.gz.{live.pid}-0123abcd.k2j4.partial",
            "earlier_self": f".x.nii.gz.{os.getpid()}-0123abcd.k2j4.partial",  # same pid, another process
            "not_ours": ".x.nii.gz.partial",
        }
        for name in names.values():
            (tmp_path / "labels" / name).mkdir(parents=True)
            (tmp_path / "labels" / name / "x.nii.gz").write_bytes(b"half")
        with staged(tmp_path / "labels" / "y.nii.gz") as mine:
            mine.write_bytes(b"being written")
            removed = remove_stale_temps(tmp_path, recursive=True)
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["earlier_self"]])
        assert sorted(p.name for p in (tmp_path / "labels").iterdir()) == \
            sorted([names["live"], names["not_ours"], "y.nii.gz"])
    finally:
        live.kill()
        live.wait()


def test_manifest_follows_the_served_file_after_a_publish_killed_before_its_manifest(tmp_path: Path):
    served = tmp_path / "model" / "medsam-lite.pt"
    first = publish(served, {"w": torch.zeros(3)}, "medsam-lite", {"epoch": 1})
    before = manifest_path(served).read_text()
    second = publish(served, {"w": torch.ones(3)}, "medsam-lite", {"epoch": 2})
    assert reconcile_manifest(served) == second  # consistent: nothing to do

    manifest_path(served).write_text(before)  # as if killed after the served file was replaced
    entry = reconcile_manifest(served)
    assert entry["version"] == second["version"] == f"medsam-lite@{file_sha256(served)[:12]}"
    assert entry["number"] == 2 and entry["epoch"] == 2 and entry["file"] == second["file"]
    manifest = json.loads(manifest_path(served).read_text())
    assert manifest["current"] == entry and [e["number"] for e in manifest["history"]] == [1, 2]
    assert first["version"] != entry["version"]
    assert reconcile_manifest(tmp_path / "none.pt") is None


# The app's datastore in a process whose files may not grow past 256 kB (RLIMIT_FSIZE: EFBIG, a
# real write failure without a mount): a label of random values (about 700 kB as NIfTI) over the
# sample's fails, then the sample's own label is saved.
SAVE_UNDER_LIMIT = r"""
import hashlib, json, pathlib, resource, sys
sys.path.insert(0, sys.argv[1])
from lib.datastore.local import AtomicLocalDatastore, StorageError
studies, big, small = map(pathlib.Path, sys.argv[2:5])
store = AtomicLocalDatastore(str(studies), auto_reload=False)
resource.setrlimit(resource.RLIMIT_FSIZE, (256 << 10, resource.RLIM_INFINITY))
state = lambda: {"label": hashlib.sha256((studies / "labels/final/ct_3mm.nii.gz").read_bytes()).hexdigest(),
                 "config": (studies / "datastore_v2.json").read_text(), "files": sorted(map(str, studies.rglob("*"))),
                 "info": store.get_label_info("ct_3mm", "final")}
before = state()
try:
    store.save_label("ct_3mm", str(big), "final", {"user": "big"})
    error = None
except StorageError as exc:
    error = [exc.errno, str(exc)]
after_error = state()
store.save_label("ct_3mm", str(small), "final", {"user": "small"})
print(json.dumps({"error": error, "unchanged": before == after_error}))
"""


def test_datastore_write_failure_changes_nothing_then_saving_works(tmp_path: Path):
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    big = tmp_path / "big.nii.gz"
    sitk.WriteImage(_on_grid(np.random.default_rng(0).integers(1, 65535, (30, 101, 122), dtype=np.uint16)), str(big))
    small = SAMPLE_DIR / "labels" / "final" / "ct_3mm.nii.gz"
    done = subprocess.run([sys.executable, "-c", SAVE_UNDER_LIMIT, str(REPO_ROOT / "apps" / "medsam"), str(studies),
                           str(big), str(small)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    # SimpleITK does not report the refused write: the datastore finds the file short on reading it back
    assert result["error"][0] == 27 and "could not store label ct_3mm.nii.gz: File too large" in result["error"][1]
    assert result["unchanged"]  # label file, JSON, listing, and no file left behind
    label = studies / "labels" / "final" / "ct_3mm.nii.gz"
    assert _voxels(label).tolist() == _voxels(small).tolist()  # the next save went through
    config = json.loads((studies / "datastore_v2.json").read_text())
    assert config["objects"]["ct_3mm"]["labels"]["final"]["info"]["user"] == "small"
    assert _temps(studies) == []


def _on_grid(array: np.ndarray, image: str = "ct_3mm") -> sitk.Image:
    label = sitk.GetImageFromArray(array)
    label.CopyInformation(sitk.ReadImage(str(SAMPLE_DIR / f"{image}.nii.gz")))
    return label


def _voxels(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_unreadable_datastore_json_is_set_aside_and_rebuilt_and_extension_change_replaces(tmp_path: Path):
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    (studies / "datastore_v2.json").write_text('{"name": "half-writ')  # as MONAI Label's own datastore leaves it
    store = AtomicLocalDatastore(str(studies), auto_reload=False)
    assert sorted(store.get_labeled_images()) == ["ct_3mm", "ct_512", "mr_3mm"]
    assert len(list(studies.glob("datastore_v2.json.unreadable-*"))) == 1
    json.loads((studies / "datastore_v2.json").read_text())

    nrrd = tmp_path / "label.nrrd"
    nrrd.write_bytes(b"NRRD0004\n")
    with pytest.raises(LabelRejected):  # the datastore checks a label against its image before storing it
        store.save_label("mr_3mm", str(nrrd), "final", {})
    final = studies / "labels" / "final"
    sitk.WriteImage(sitk.ReadImage(str(final / "mr_3mm.nii.gz")), str(final / "mr_3mm.nii"))
    (final / "mr_3mm.nii.gz").unlink()
    store = AtomicLocalDatastore(str(studies), auto_reload=False)
    assert store.get_label_uri("mr_3mm", "final").endswith("mr_3mm.nii")
    sitk.WriteImage(sitk.ReadImage(str(final / "mr_3mm.nii")), str(nrrd))
    store.save_label("mr_3mm", str(nrrd), "final", {})  # stored as .nii.gz, replacing the .nii
    assert sorted(p.name for p in final.iterdir()) == ["ct_3mm.nii.gz", "ct_512.nii.gz", "mr_3mm.nii.gz"]
    assert store.get_label_uri("mr_3mm", "final").endswith("mr_3mm.nii.gz")


def _run_together(*jobs) -> None:
    """Run the jobs in threads started at once; re-raise the first error any of them raised."""
    start, errors = threading.Barrier(len(jobs)), []

    def run(job) -> None:
        start.wait()
        try:
            job()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def test_datastore_info_updates_racing_label_saves_are_all_kept(tmp_path: Path):
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    labels = [sitk.GetImageFromArray(np.full((4, 5, 6), i + 1, np.uint16)) for i in range(2)]  # stored as given
    store = AtomicLocalDatastore(str(studies), auto_reload=True)  # its file watcher reconciles on every rename
    rounds = 60

    def arriving(seed: int, call: Callable[[int], object]) -> Callable[[], None]:
        """`call(i)` for each round, each after a random pause (as requests come)."""
        def calls() -> None:
            pause = random.Random(seed)
            for i in range(rounds):
                time.sleep(pause.uniform(0, 0.004))
                call(i)
        return calls

    try:
        _run_together(
            arriving(0, lambda i: store.store_label("ct_3mm", labels[i % 2], "final", {"round": i})),
            arriving(1, lambda i: store.store_label("ct_512", labels[i % 2], f"tag{i}", {})),
            arriving(2, lambda i: store.update_image_info("ct_3mm", {f"image{i}": i})),
            arriving(3, lambda i: store.update_label_info("ct_3mm", "final", {f"label{i}": i})),
            arriving(4, lambda i: store.update_label_info("mr_3mm", "final", {f"label{i}": i})),
        )
    finally:
        store._observer.stop()
        store._observer.join()
    reloaded = AtomicLocalDatastore(str(studies), auto_reload=False)
    for ds in (store, reloaded):  # the listing in memory, and as stored
        assert {f"image{i}" for i in range(rounds)} <= set(ds.get_image_info("ct_3mm"))
        assert {f"label{i}" for i in range(rounds)} <= set(ds.get_label_info("mr_3mm", "final"))
        assert ds.get_label_info("ct_3mm", "final")["round"] == rounds - 1
        assert set(ds.get_labels_by_image_id("ct_512")) == {"final", *(f"tag{i}" for i in range(rounds))}
    assert _voxels(studies / "labels" / "final" / "ct_3mm.nii.gz").max() == (rounds - 1) % 2 + 1
    assert _temps(studies) == []


def test_datastore_adds_an_image_id_once_when_racing(tmp_path: Path):
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    store = AtomicLocalDatastore(str(studies), auto_reload=False)
    uploads = [tmp_path / f"upload{i}.nii.gz" for i in range(8)]
    for upload in uploads:
        upload.write_bytes(os.urandom(20000))
    added, refused = [], []

    def add(upload: Path) -> None:
        try:
            store.add_image("new", str(upload), {"from": upload.name}, replace=False)
            added.append(upload)
        except ImageExists:
            refused.append(upload)

    _run_together(*(lambda upload=upload: add(upload) for upload in uploads))
    assert len(added) == 1 and len(refused) == len(uploads) - 1
    stored = studies / "new.nii.gz"
    assert stored.read_bytes() == added[0].read_bytes()
    for ds in (store, AtomicLocalDatastore(str(studies), auto_reload=False)):
        assert ds.get_image_info("new")["from"] == added[0].name

    store.store_label("new", sitk.GetImageFromArray(np.ones((2, 3, 4), np.uint8)), "final", {})
    with pytest.raises(ImageExists):  # an existing image's file (sample ct_3mm) is not replaced either
        store.add_image("ct_3mm", str(uploads[1]), {}, replace=False)
    store.add_image("new", str(uploads[1]), {}, replace=True)  # the default, as MONAI Label's callers expect
    assert store.get_label_uri("new", "final") and stored.read_bytes() == uploads[1].read_bytes()


def test_cache_bounds_concurrent_computes_and_answers_hits_meanwhile():
    cache = EmbeddingCache(max_bytes=1 << 20, max_computing=2)
    cache.put("hot", torch.zeros(4))
    release = threading.Event()
    running, peak, lock = [0], [0], threading.Lock()

    def compute() -> torch.Tensor:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return torch.ones(4)

    threads = [threading.Thread(target=cache.get_or_compute, args=(f"k{i}", compute)) for i in range(5)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 10
    while running[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    started = time.monotonic()
    value, hit = cache.get_or_compute("hot", compute)  # both slots busy: a hit does not wait
    assert hit and time.monotonic() - started < 1.0
    time.sleep(0.2)
    assert running[0] == 2  # the other three misses queue
    release.set()
    for thread in threads:
        thread.join(10)
    assert peak[0] == 2 and all(f"k{i}" in cache for i in range(5))
