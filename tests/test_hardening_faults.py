"""Faults through the real server: kill -9 in the middle of a label save and of a training
checkpoint, and a full disk, then a restart on the same folders.

What must hold afterwards: the server starts; every label file is the old one (byte for byte) or
the new one (whole, voxel for voxel: the server re-encodes what it is sent) and the datastore lists
it; no temporary file is left; the served model is the last one published whole, and its file
loads; a failed write answers an error at once and changes nothing; once space is back, saving works.

The kills land mid-write by construction, not by luck: the writing process is stopped (SIGSTOP)
every millisecond or two, its open files are read from /proc, and when it has the file of
interest open for writing it gets SIGKILL right there (Linux only, as the server).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import psutil
import pytest
import requests
import SimpleITK as sitk

from app_helpers import SAMPLE_DIR, SERVER_CONF, bbox, infer_json, organ_mask
from medsam_engine.atomicio import TEMP_SUFFIX
from medsam_engine.imageio import read_image
from medsam_engine.models import load_state_dict
from medsam_http.server import LabelServer

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

# A run small enough for two shared CPU cores (as tests/test_app_train.py): 2 training slices, 1 validation slice.
TINY = {"train_batch_size": 2, "max_train_slices": 2, "max_val_slices": 1, "val_split": 0.3,
        "early_stop_patience": 0, "threads": 1, "publish": "best"}
LIVER_24 = {"boxes": [[*bbox(organ_mask("ct_3mm", "liver")[24]), 24]]}
IMAGE = "ct_512"  # the largest sample: 512 x 512 x 20


# ---- processes and files ---------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temporaries(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TEMP_SUFFIX}*"))


def _open_for_writing(pid: int, root: Path) -> list[str]:
    """Files under `root` that process `pid` has open: written to, or (inside a temporary
    directory) being flushed to disk."""
    found = []
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
            flags = int((Path(f"/proc/{pid}/fdinfo") / fd).read_text().split("flags:")[1].split()[0], 8)
        except (OSError, IndexError, ValueError):
            continue
        if target.startswith(f"{root}/") and (flags & os.O_ACCMODE != os.O_RDONLY or TEMP_SUFFIX in target):
            found.append(target)
    return found


def kill_mid_write(watched: int, root: Path, wanted: Callable[[str], bool], busy: Callable[[], bool],
                   rng: random.Random, victim: int | None = None) -> str | None:
    """While `busy()`: stop process `watched`, and if it is writing a file under `root` that is
    `wanted`, SIGKILL `victim` (default: the watched process) and return that file; else let it
    run for 0-2 ms. None if `busy()` ended first."""
    while busy():
        try:
            os.kill(watched, signal.SIGSTOP)
        except ProcessLookupError:
            return None
        try:
            hits = [path for path in _open_for_writing(watched, root) if wanted(path)]
        except OSError:
            hits = []
        if hits:
            os.kill(victim or watched, signal.SIGKILL)
            return hits[0]
        os.kill(watched, signal.SIGCONT)
        time.sleep(rng.uniform(0.0, 0.002))
    return None


def _label(seed: int) -> tuple[np.ndarray, bytes]:
    """A label of random values on the image's grid, and its .nii.gz bytes: random, so gzip cannot
    shrink it (5 MB), and each seed's file differs."""
    reference = sitk.ReadImage(str(SAMPLE_DIR / f"{IMAGE}.nii.gz"))
    shape = sitk.GetArrayViewFromImage(reference).shape
    values = np.random.default_rng(seed).integers(1, 255, size=shape, dtype=np.uint8)
    label = sitk.GetImageFromArray(values)
    label.CopyInformation(reference)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "label.nii.gz"
        sitk.WriteImage(label, str(path), useCompression=True, compressionLevel=1)
        return values, path.read_bytes()


def _voxels(path: Path) -> np.ndarray:
    """A stored label's voxels; EngineInputError if the file is truncated (the engine's reader checks)."""
    return read_image(path).array


def _put_label(url: str, data: bytes, timeout: float = 120) -> requests.Response:
    return requests.put(f"{url}/datastore/label", params={"image": IMAGE, "tag": "final"},
                        files={"label": (f"{IMAGE}.nii.gz", io.BytesIO(data))}, timeout=timeout)


def _check_datastore(url: str, studies: Path) -> dict:
    """The datastore JSON parses, lists every sample image and each labelled one's final label under
    its own name, and no temporary file is left anywhere in the folder."""
    config = json.loads((studies / "datastore_v2.json").read_text())
    listing = requests.get(f"{url}/datastore/", params={"output": "all"}, timeout=30).json()
    assert set(listing["objects"]) == {"ct_3mm", "ct_512", "mr_3mm", "ct_chest", "mr_brain"}
    labelled = {image: obj for image, obj in config["objects"].items() if "final" in obj["labels"]}
    assert set(labelled) == {"ct_3mm", "ct_512", "mr_3mm"}
    for image, obj in labelled.items():
        assert obj["labels"]["final"]["info"]["name"] == f"{image}.nii.gz"
    assert sorted(p.name for p in (studies / "labels" / "final").iterdir()) == \
        ["ct_3mm.nii.gz", "ct_512.nii.gz", "mr_3mm.nii.gz"]
    assert _temporaries(studies) == []
    return config


def _train_stats(url: str) -> dict:
    return requests.get(f"{url}/info/", timeout=30).json().get("train_stats", {}).get("medsam", {})


def _wait_train(url: str, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = requests.get(f"{url}/train/", timeout=30).json()
        if task.get("status") not in ("SUBMITTED", "RUNNING"):
            return task
        time.sleep(1.0)
    raise AssertionError(f"training did not end in {timeout:.0f} s")


def _train_process(server: LabelServer, timeout: float = 60.0) -> psutil.Process:
    """MONAI Label's train subprocess of the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(server.process.pid).children(recursive=True):
            if "monailabel.interfaces.utils.app" in " ".join(child.cmdline()):
                return child
        time.sleep(0.2)
    raise AssertionError("no train subprocess")


class Servers:
    """Starts the app on one datastore (and model folder) as often as a test restarts it."""

    def __init__(self, work: Path, studies: Path, model_dir: Path | None = None) -> None:
        self.work, self.studies, self.model_dir = work, studies, model_dir
        self.current: LabelServer | None = None
        self.starts = 0

    def start(self) -> LabelServer:
        conf = dict(SERVER_CONF)
        if self.model_dir:
            conf["model_dir"] = str(self.model_dir)
        self.starts += 1
        self.current = LabelServer(self.studies, self.work / f"server-{self.starts}.log", conf=conf,
                                   env={"MONAI_LABEL_SESSION_PATH": str(self.work / "sessions")}).start()
        return self.current

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()


@pytest.fixture()
def servers(tmp_path: Path):
    studies = tmp_path / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    group = Servers(tmp_path, studies, tmp_path / "model")
    yield group
    group.stop()


# ---- kill -9 during a label save -------------------------------------------------------------
SAVE_TARGETS = {
    # the label file itself (MONAI Label's own datastore writes it in place)
    "label": lambda path: "/labels/final/" in path and path.endswith(f"/{IMAGE}.nii.gz"),
    # the datastore's JSON (MONAI Label's own datastore truncates and rewrites it)
    "datastore JSON": lambda path: path.endswith("/datastore_v2.json"),
}


def test_kill_during_label_save_leaves_old_or_new_label(servers: Servers):
    """The server stores the label it is sent re-encoded (checked on the image's grid, NIfTI): the
    old label is compared byte for byte, the new one by its voxels, read by a reader that refuses
    a truncated file."""
    studies = servers.studies
    label_file = studies / "labels" / "final" / f"{IMAGE}.nii.gz"
    others = {name: _sha(studies / "labels" / "final" / f"{name}.nii.gz") for name in ("ct_3mm", "mr_3mm")}
    server = servers.start()
    stored = label_file.read_bytes()
    rng = random.Random(0)
    seed = 0
    for target, wanted in SAVE_TARGETS.items():
        for attempt in range(40):
            seed += 1
            voxels, data = _label(seed)
            replies: list[requests.Response | Exception] = []

            def save() -> None:
                try:
                    replies.append(_put_label(server.url, data))
                except requests.RequestException as exc:
                    replies.append(exc)

            thread = threading.Thread(target=save)
            thread.start()
            hit = kill_mid_write(server.process.pid, studies, wanted, thread.is_alive, rng)
            thread.join()
            if hit:
                break
            assert isinstance(replies[0], requests.Response) and replies[0].status_code == 200, replies[0]
            stored = label_file.read_bytes()
            assert np.array_equal(_voxels(label_file), voxels)
        else:
            pytest.fail(f"in 40 saves no kill landed while the server wrote the {target}")
        print(f"{target}: killed in save {attempt + 1} while the server wrote {hit}")
        server.process.wait(timeout=30)
        assert server.process.returncode == -signal.SIGKILL

        server = servers.start()  # the datastore JSON must still load
        on_disk = label_file.read_bytes()
        assert on_disk == stored or np.array_equal(_voxels(label_file), voxels), \
            f"killed while writing {hit}: the label is neither the old nor the new one"
        stored = on_disk
        _check_datastore(server.url, studies)
        assert {name: _sha(studies / "labels" / "final" / f"{name}.nii.gz") for name in others} == others

    voxels, data = _label(seed + 1)
    assert _put_label(server.url, data).status_code == 200  # saving works after the restarts
    assert np.array_equal(_voxels(label_file), voxels)
    _check_datastore(server.url, studies)


# ---- kill -9 during training -------------------------------------------------------------------
def test_kill_during_training_checkpoint_serves_last_published_model(servers: Servers):
    model_dir = servers.model_dir
    published = model_dir / "medsam-lite.pt"
    server = servers.start()
    bundled = infer_json(server.url, "ct_3mm", LIVER_24).json()["model"]["version"]
    response = requests.post(f"{server.url}/train/medsam", json={**TINY, "max_epochs": 3}, timeout=60)
    assert response.status_code == 200, response.text
    trainer = _train_process(server)

    deadline = time.monotonic() + 600
    while _train_stats(server.url).get("published") is None:  # epoch 1 published whole
        assert trainer.is_running() and time.monotonic() < deadline, server.log_tail()
        time.sleep(0.5)
    last_good = _train_stats(server.url)["published"]
    assert last_good["version"] == f"medsam-lite@{_sha(published)[:12]}" != bundled

    # Epoch 2 writes its checkpoint (and publishes it if better): kill -9 the server right then.
    hit = kill_mid_write(trainer.pid, model_dir, lambda path: TEMP_SUFFIX in path, trainer.is_running,
                         random.Random(1), victim=server.process.pid)
    try:
        assert hit, "training ended before a checkpoint write could be interrupted"
        print(f"killed the server while its train subprocess wrote {hit}")
        server.process.wait(timeout=30)
        gone, _ = psutil.wait_procs([trainer], timeout=15)
        assert gone, "the train subprocess outlived the server it was started by"
    finally:
        if trainer.is_running():
            trainer.kill()

    server = servers.start()
    assert _temporaries(model_dir) == []
    manifest = json.loads((model_dir / "medsam-lite.json").read_text())
    served = f"medsam-lite@{_sha(published)[:12]}"
    assert manifest["current"]["version"] == served  # the file the server serves, whole
    assert served in {entry["version"] for entry in manifest["history"]}
    if not hit.endswith("/medsam-lite.json"):  # only the manifest is written after the served file is replaced
        assert served == last_good["version"]
    reply = infer_json(server.url, "ct_3mm", LIVER_24)
    assert reply.status_code == 200 and reply.json()["model"]["version"] == served
    assert load_state_dict(published)  # the served file loads, as do the run's checkpoints
    for checkpoint in model_dir.rglob("*.pt"):
        assert load_state_dict(checkpoint), checkpoint
    assert _train_stats(server.url)["status"] == "stopped"


# ---- a full disk ---------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    try:
        return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
                              capture_output=True).returncode == 0
    except OSError:  # no mount command
        return False


class TmpfsDisk:
    """A small tmpfs holding the datastore and the model folder, filled up to the last MB."""

    error = "No space left on device"  # the label (5 MB) and a checkpoint (40 MB) do not fit in the last MB
    refusal = 507  # Insufficient Storage: the datastore could not write the label

    def __init__(self, root: Path) -> None:
        if os.geteuid() != 0 or not _mount_tmpfs(root, 160):
            pytest.skip("mounting a tmpfs is not permitted here (the RLIMIT_FSIZE variant covers it)")
        self.root = root
        self.filler = root / "filler"

    def fill(self, server: LabelServer) -> None:
        free = shutil.disk_usage(self.root).free
        with open(self.filler, "wb") as out:
            out.truncate(0)
            block = b"\0" * (1 << 20)
            for _ in range(free // len(block) - 1):
                out.write(block)

    def fill_all(self, server: LabelServer) -> None:
        """No byte left: even the datastore JSON (a few KB) does not fit."""
        self.fill(server)
        with open(self.filler, "ab", buffering=0) as out:
            try:
                while True:
                    out.write(b"\0" * 4096)
            except OSError:
                pass

    def free(self, server: LabelServer) -> None:
        self.filler.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.root)], check=False)


class FileSizeLimit:
    """No mount needed: RLIMIT_FSIZE on the server process (inherited by its train subprocess):
    writing past 4 MB into any file fails with EFBIG (Python ignores SIGXFSZ). The label (5 MB)
    is then refused as its upload is spooled to a file, before the datastore (FastAPI answers any
    error reading the form "400 There was an error parsing the body"); a checkpoint (40 MB) fails
    where it is written. (Log lines the server writes past 4 MB into a file are lost meanwhile.)"""

    error = "File too large"
    refusal = None  # any 4xx/5xx
    limit = 4 << 20

    def __init__(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root = root

    def fill(self, server: LabelServer) -> None:
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (self.limit, hard))

    def fill_all(self, server: LabelServer) -> None:
        """No file may grow at all: the datastore JSON (a few KB) cannot be written either."""
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (0, hard))

    def free(self, server: LabelServer) -> None:
        _, hard = resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(server.process.pid, resource.RLIMIT_FSIZE, (hard, hard))

    def close(self) -> None:
        pass


@pytest.mark.parametrize("disk_kind", [TmpfsDisk, FileSizeLimit], ids=["tmpfs", "rlimit"])
def test_full_disk_refuses_label_and_checkpoint_and_keeps_old(tmp_path: Path, disk_kind: type):
    disk = disk_kind(tmp_path / "disk")
    servers = Servers(tmp_path, disk.root / "studies", disk.root / "model")
    try:
        shutil.copytree(SAMPLE_DIR, servers.studies)
        server = servers.start()
        label_file = servers.studies / "labels" / "final" / f"{IMAGE}.nii.gz"
        old_label = label_file.read_bytes()
        version = infer_json(server.url, "ct_3mm", LIVER_24).json()["model"]["version"]
        voxels, new_label = _label(7)
        disk.fill(server)

        started = time.monotonic()
        refused = _put_label(server.url, new_label)
        assert refused.status_code >= 400 and time.monotonic() - started < 60, refused.text
        if disk.refusal:
            assert refused.status_code == disk.refusal and disk.error in refused.json()["detail"], refused.text
        assert label_file.read_bytes() == old_label
        _check_datastore(server.url, servers.studies)

        response = requests.post(f"{server.url}/train/medsam", json={**TINY, "max_epochs": 1}, timeout=60)
        assert response.status_code == 200, response.text
        task = _wait_train(server.url)
        assert task["status"] == "ERROR" and any(disk.error in line for line in task["details"]), task
        assert not (servers.model_dir / "medsam-lite.pt").exists()
        assert _temporaries(servers.model_dir) == []
        assert infer_json(server.url, "ct_3mm", LIVER_24).json()["model"]["version"] == version
        assert server.alive()

        disk.free(server)
        saved = _put_label(server.url, new_label)
        assert saved.status_code == 200, saved.text
        assert np.array_equal(_voxels(label_file), voxels)
        _check_datastore(server.url, servers.studies)
    finally:
        servers.stop()
        disk.close()


@pytest.mark.parametrize("disk_kind", [TmpfsDisk, FileSizeLimit], ids=["tmpfs", "rlimit"])
def test_full_disk_refuses_info_updates_and_keeps_old(tmp_path: Path, disk_kind: type):
    disk = disk_kind(tmp_path / "disk")
    servers = Servers(tmp_path, disk.root / "studies")
    updates = {"image": ("image/info", {"image": "ct_3mm"}), "label": ("label/info", {"label": "ct_3mm", "tag": "final"})}

    def update(kind: str, value: str) -> requests.Response:
        route, params = updates[kind]
        return requests.put(f"{server.url}/datastore/{route}", params=params, data={"info": json.dumps({"note": value})},
                            timeout=60)

    def note(kind: str) -> str | None:
        route, params = updates[kind]
        return requests.get(f"{server.url}/datastore/{route}", params=params, timeout=30).json().get("note")

    try:
        shutil.copytree(SAMPLE_DIR, servers.studies)
        server = servers.start()
        config = servers.studies / "datastore_v2.json"
        for kind in updates:
            assert update(kind, "old").status_code == 200
        before = config.read_bytes()
        disk.fill_all(server)
        for kind in updates:
            refused = update(kind, "new")
            assert refused.status_code == 507 and disk.error in refused.json()["detail"], refused.text
            assert note(kind) == "old"  # the server's listing did not change either
        assert config.read_bytes() == before and _temporaries(servers.studies) == []
        assert server.alive()

        disk.free(server)
        for kind in updates:
            assert update(kind, "new").status_code == 200
            assert note(kind) == "new"
        stored = json.loads(config.read_text())["objects"]["ct_3mm"]
        assert stored["image"]["info"]["note"] == stored["labels"]["final"]["info"]["note"] == "new"
    finally:
        servers.stop()
        disk.close()


def test_concurrent_uploads_of_one_image_id_store_one(servers: Servers):
    server = servers.start()
    uploads = [SAMPLE_DIR / f"{image}.nii.gz" for image in ("ct_3mm", "mr_3mm")] * 3
    answers: list[tuple[Path, requests.Response]] = []
    start = threading.Barrier(len(uploads))

    def upload(path: Path) -> None:
        start.wait()
        with open(path, "rb") as data:
            answers.append((path, requests.put(f"{server.url}/datastore/image", params={"image": "twin"},
                                               files={"file": (path.name, data)}, timeout=120)))

    threads = [threading.Thread(target=upload, args=(path,)) for path in uploads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    codes = sorted(response.status_code for _, response in answers)
    assert codes == [200] + [409] * (len(uploads) - 1), [response.text for _, response in answers]
    stored = next(path for path, response in answers if response.status_code == 200)
    assert (servers.studies / "twin.nii.gz").read_bytes() == stored.read_bytes()
