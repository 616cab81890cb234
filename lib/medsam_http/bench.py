"""HTTP latency of the medsam app: full round trips through a real MONAI Label server.

Two server runs on a temporary copy of the datastore:

1. background encoding off: the first request on the image (load + encode), then boxes on slices
   never encoded (`http_cold_slice_ms_p50`) and new boxes on an open slice (`http_cached_ms_p50`);
2. background encoding on (the default server): after the first box, the bench waits until the
   background encoder has done the image, then draws the first box on each other slice
   (`http_uncached_ms_p50`: the first box on a new slice, as a user meets it after opening an image).

The figures name the encoder the server ran (`http_server_encoder`, as its replies name it).

Requests are made as Slicer makes them (multipart reply: JSON + NIfTI label), and also as OHIF
makes them (raw NRRD, `http_cached_ohif_ms_p50`). Figures are medians over the repeats.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
from requests_toolbelt.multipart.decoder import MultipartDecoder

from .server import LabelServer

OHIF_PARAMS = {"result_extension": ".nrrd", "result_dtype": "uint8", "result_compress": False, "restore_label_idx": False}


def _boxes(datastore: Path, image: str) -> tuple[int, dict[int, list[int]]]:
    """Slice count and a box per slice: the liver's bounding box where the sample labels it, else
    the middle half of the slice."""
    array = sitk.GetArrayViewFromImage(sitk.ReadImage(str(datastore / f"{image}.nii.gz")))
    depth, height, width = array.shape[:3]
    names_file, label_file = datastore / "labels.json", datastore / "labels" / "final" / f"{image}.nii.gz"
    mask = None
    if names_file.exists() and label_file.exists():
        names = json.loads(names_file.read_text()).get(image, {})
        value = next((int(v) for v, n in names.items() if n == "liver"), None)
        if value is not None:
            mask = sitk.GetArrayFromImage(sitk.ReadImage(str(label_file))) == value
    boxes = {}
    for k in range(depth):
        if mask is not None and mask[k].any():
            ys, xs = np.nonzero(mask[k])
            boxes[k] = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
        else:
            boxes[k] = [width // 4, height // 4, 3 * width // 4, 3 * height // 4]
    return depth, boxes


def _jitter(box: list[int], i: int) -> list[int]:
    """A slightly different box each time: a new box, not a repeated request."""
    d = (i % 5) - 2
    return [box[0] + d, box[1] - d, box[2] + d, box[3] - d]


class _Client:
    def __init__(self, url: str, image: str) -> None:
        self.url, self.image = url, image
        self.session = requests.Session()

    def slicer(self, box: list[int], k: int) -> tuple[float, dict]:
        """Slicer-style request (roi, multipart reply with JSON and NIfTI): (round trip ms, reply JSON)."""
        params = {"roi": [box[2], box[0], box[3], box[1], k, k], "foreground": [], "background": [], "label": "liver"}
        start = time.perf_counter()
        response = self.session.post(f"{self.url}/infer/medsam", params={"image": self.image},
                                     files={"params": (None, json.dumps(params))}, timeout=600)
        elapsed = (time.perf_counter() - start) * 1000
        response.raise_for_status()
        parts = MultipartDecoder.from_response(response).parts
        reply = next(json.loads(p.text) for p in parts if b'name="params"' in p.headers[b"Content-Disposition"])
        return elapsed, reply

    def ohif(self, box: list[int], k: int) -> float:
        """OHIF-style request (two corner clicks, raw NRRD reply): round trip ms."""
        params = {"foreground": [[box[0], box[1], k], [box[2], box[3], k]], "background": [], **OHIF_PARAMS}
        start = time.perf_counter()
        response = self.session.post(f"{self.url}/infer/medsam", params={"image": self.image, "output": "image"},
                                     files={"params": (None, json.dumps(params))}, timeout=600)
        elapsed = (time.perf_counter() - start) * 1000
        response.raise_for_status()
        if not response.content.startswith(b"NRRD"):
            raise RuntimeError("OHIF-style request did not get an NRRD reply")
        return elapsed


def _background_done(url: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = requests.get(f"{url}/info/", timeout=60).json()["models"]["medsam"]["medsam"]["background_encoding"]
        if status["planned"] and status["encoded"] >= status["planned"]:
            return status
        if time.monotonic() > deadline:
            raise RuntimeError(f"background encoding unfinished after {timeout:.0f} s: {status}")
        time.sleep(0.5)


def _p50(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def measure(datastore: Path, image: str = "ct_512", repeats: int = 10, conf: dict[str, str] | None = None,
            workdir: Path | None = None) -> dict:
    """Run both server phases and return the figures (milliseconds)."""
    datastore = Path(datastore)
    conf = dict(conf or {})
    with tempfile.TemporaryDirectory(prefix="medsam-http-bench-", dir=workdir) as tmp:
        studies = Path(tmp) / "studies"
        shutil.copytree(datastore, studies)
        depth, boxes = _boxes(studies, image)
        focus = depth // 2
        others = [k for k in sorted(range(depth), key=lambda s: (abs(s - focus), s)) if k != focus]
        cold_slices = others[:repeats]
        results: dict = {"http_image": image, "http_slices": depth, "http_repeats": repeats}

        with LabelServer(studies, Path(tmp) / "server-cold.log", conf={**conf, "prefetch_slices": "0"}) as server:
            client = _Client(server.url, image)
            first_ms, first = client.slicer(boxes[focus], focus)
            cold = [client.slicer(boxes[k], k) for k in cold_slices]
            cached = [client.slicer(_jitter(boxes[focus], i), focus) for i in range(repeats)]
            ohif = [client.ohif(_jitter(boxes[focus], i), focus) for i in range(repeats)]
        if any(r["cache"]["misses"] == 0 for _, r in cold) or any(r["cache"]["misses"] for _, r in cached):
            raise RuntimeError("cache behaved unexpectedly: cold slices hit or cached boxes missed")
        results.update({
            "http_server_encoder": first["model"]["encoder"],
            "http_first_request_ms": round(first_ms, 1),
            "http_first_request_server_ms": first["latency_ms"],
            "http_cold_slice_ms_p50": _p50([ms for ms, _ in cold]),
            "http_cold_slice_encode_ms_p50": _p50([r["latency_ms"]["encode"] for _, r in cold]),
            "http_cached_ms_p50": _p50([ms for ms, _ in cached]),
            "http_cached_server_ms_p50": {key: _p50([r["latency_ms"][key] for _, r in cached])
                                          for key in ("load", "encode", "decode", "write", "total")},
            "http_cached_ohif_ms_p50": _p50(ohif),
        })

        with LabelServer(studies, Path(tmp) / "server.log", conf=conf) as server:
            client = _Client(server.url, image)
            client.slicer(boxes[focus], focus)
            started = time.perf_counter()
            status = _background_done(server.url, timeout=60.0 * depth)
            results["http_background_encode_s"] = round(time.perf_counter() - started, 1)
            results["http_background_slices"] = status["encoded"]
            uncached = [client.slicer(boxes[k], k) for k in others[:repeats]]
        results.update({
            "http_uncached_ms_p50": _p50([ms for ms, _ in uncached]),
            "http_uncached_server_ms_p50": {key: _p50([r["latency_ms"][key] for _, r in uncached])
                                            for key in ("load", "encode", "decode", "write", "total")},
        })
        results["http_cold_vs_uncached_ratio"] = round(results["http_cold_slice_ms_p50"] / results["http_uncached_ms_p50"], 2)
    return results


def run_http_bench(json_path: Path, datastore: Path, model: str = "medsam-lite", checkpoint: str | None = None,
                   device: str | None = None, repeats: int = 10, image: str = "ct_512") -> dict:
    """Measure, print, and merge the figures into `json_path` (keeping what the engine bench wrote)."""
    conf = {"model": model}
    if checkpoint:
        conf["checkpoint"] = checkpoint
    if device:
        conf["device"] = device
    results = measure(Path(datastore), image=image, repeats=repeats, conf=conf)
    json_path = Path(json_path)
    merged = json.loads(json_path.read_text()) if json_path.exists() else {}
    merged.update(results)
    json_path.write_text(json.dumps(merged, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:34s} {value}")
    return results
