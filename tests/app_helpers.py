"""Helpers for the app tests (tests/test_app_*.py): the real server, real clients, sample masks."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from functools import lru_cache
from pathlib import Path
from types import ModuleType

import numpy as np
import requests
import SimpleITK as sitk

from medsam_http.server import LabelServer

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "sample-datasets" / "totalseg"
SLICER_CLIENT = Path(sys.prefix) / "monailabel" / "plugins" / "slicer" / "MONAILabel" / "MONAILabelLib" / "client.py"

# Few background-encoded slices: enough to test the feature, little CPU on a shared 2-core machine.
SERVER_CONF = {"prefetch_slices": "3", "max_encodes": "2"}


def start_test_server(workdir: Path) -> LabelServer:
    """Copy the sample datastore into `workdir` and start the medsam app on it."""
    studies = workdir / "studies"
    shutil.copytree(SAMPLE_DIR, studies)
    env = {"MONAI_LABEL_SESSION_PATH": str(workdir / "sessions")}
    return LabelServer(studies, workdir / "server.log", conf=SERVER_CONF, env=env).start()


@lru_cache(maxsize=1)
def slicer_client_module() -> ModuleType:
    """3D Slicer's MONAI Label client library, installed with monailabel, imported by file path."""
    spec = importlib.util.spec_from_file_location("slicer_monailabel_client", SLICER_CLIENT)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def ohif_infer(url: str, image: str, params: dict, model: str = "medsam") -> requests.Response:
    """POST an infer request as OHIF's MONAI Label panel does (MonaiLabelClient.infer)."""
    params = dict(params, result_extension=".nrrd", result_dtype="uint8", result_compress=False,
                  restore_label_idx=False)
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "image"},
                         files={"params": (None, json.dumps(params))},
                         headers={"accept": "application/json, multipart/form-data"}, timeout=300)


def id_requests(image_id: str, tag: str = "final") -> list[tuple[str, str, dict]]:
    """(method, path, keyword arguments for `requests.request`) of every route that takes a client's
    image or label id (and label tag), sending `image_id` (and `tag`)."""
    labelled = {"label": image_id, "tag": tag}
    return [
        ("POST", "/infer/medsam", {"params": {"image": image_id, "output": "json"},
                                   "files": {"params": (None, json.dumps({"boxes": [[1, 1, 5, 5, 0]]}))}}),
        ("GET", "/datastore/image", {"params": {"image": image_id}}),
        ("HEAD", "/datastore/image", {"params": {"image": image_id}}),
        ("GET", "/datastore/image/info", {"params": {"image": image_id}}),
        ("PUT", "/datastore/image/info", {"params": {"image": image_id}, "data": {"info": "{}"}}),
        ("DELETE", "/datastore/image", {"params": {"id": image_id}}),
        ("PUT", "/datastore/label", {"params": {"image": image_id, "tag": tag},
                                     "files": {"label": ("label.nii.gz", b"never read")}}),
        ("GET", "/datastore/label", {"params": labelled}),
        ("HEAD", "/datastore/label", {"params": {"image": image_id, "tag": tag}}),
        ("GET", "/datastore/label/info", {"params": labelled}),
        ("PUT", "/datastore/label/info", {"params": labelled, "data": {"info": "{}"}}),
        ("PUT", "/datastore/updatelabelinfo", {"params": labelled, "data": {"params": "{}"}}),
        ("DELETE", "/datastore/label", {"params": {"id": image_id, "tag": tag}}),
    ]


def infer_json(url: str, image: str, params: dict | str, model: str = "medsam") -> requests.Response:
    """POST an infer request asking for the JSON reply only (`params` as a dict, or raw text)."""
    text = params if isinstance(params, str) else json.dumps(params)
    return requests.post(f"{url}/infer/{model}", params={"image": image, "output": "json"},
                         files={"params": (None, text)}, timeout=300)


def read_label(data: bytes | Path, suffix: str = ".nrrd", tmp: Path | None = None) -> np.ndarray:
    """A returned label file (path, or bytes written to `tmp`) as a (Z, Y, X) array."""
    if isinstance(data, bytes):
        assert tmp is not None
        path = tmp / f"reply{suffix}"
        path.write_bytes(data)
        data = path
    return sitk.GetArrayFromImage(sitk.ReadImage(str(data)))


def organ_mask(image: str, organ: str) -> np.ndarray:
    """The sample's reference mask of `organ` in `image` (labels/final, names from labels.json)."""
    names = json.loads((SAMPLE_DIR / "labels.json").read_text())[image]
    value = next(int(v) for v, name in names.items() if name == organ)
    label = sitk.GetArrayFromImage(sitk.ReadImage(str(SAMPLE_DIR / "labels" / "final" / f"{image}.nii.gz")))
    return label == value


def bbox(mask2d: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a 2D mask, ends inclusive."""
    ys, xs = np.nonzero(mask2d)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(a, b).sum() / total)


def background_status(url: str) -> dict:
    info = requests.get(f"{url}/info/", timeout=30).json()
    return info["models"]["medsam"]["medsam"]["background_encoding"]


def wait_for_background(url: str, image_path_part: str, timeout: float = 240.0) -> dict:
    """Poll /info/ until the background encoder has encoded every planned slice of the image."""
    deadline = time.monotonic() + timeout
    status: dict = {}
    while time.monotonic() < deadline:
        status = background_status(url)
        if status.get("image") and image_path_part in status["image"] and status["encoded"] >= status["planned"]:
            return status
        time.sleep(1.0)
    raise AssertionError(f"background encoding did not finish in {timeout:.0f} s: {status}")


def write_dicom_series(image_path: Path, out_dir: Path, modality: str = "MR") -> list[Path]:
    """Write a volume as a DICOM series, one file per slice (SimpleITK's series-writing recipe)."""
    image = sitk.ReadImage(str(image_path))
    out_dir.mkdir(parents=True, exist_ok=True)
    series_uid = "1.2.826.0.1.3680043.2.1125.1." + str(abs(hash(str(image_path))) % 10**12)
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(image.GetDepth()):
        plane = image[:, :, k]
        tags = {
            "0008|0060": modality, "0020|000e": series_uid, "0020|000d": series_uid + ".0",
            "0020|0037": orientation, "0020|0013": str(k + 1),
            "0020|0032": "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0018|0050": str(image.GetSpacing()[2]), "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        path = out_dir / f"slice{k:03d}.dcm"
        writer.SetFileName(str(path))
        writer.Execute(plane)
        files.append(path)
    return files
