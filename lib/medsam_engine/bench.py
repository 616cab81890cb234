"""`main.py bench`: engine latency on real sample data, printed and written as JSON."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from statistics import median
from typing import Callable

import numpy as np
import torch

from .cache import EmbeddingCache
from .datastore import list_cases
from .geometry import Fit, mask_box
from .imageio import read_image
from .metrics import dsc
from .models import load_model
from .prompts import Box3DPrompt
from .segmenter import Segmenter


VARIANTS = (("fp32", "eager"), ("bf16", "eager"), ("fp32", "traced"))  # encoder precision, graph


def _p50_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return median(times)


def _largest_slice(label: np.ndarray) -> int:
    return int(np.argmax((label > 0).sum(axis=(1, 2))))


def _longest_object(label: np.ndarray) -> tuple[int, int, int]:
    """(value, first, last) of the label value spanning most slices."""
    best = (0, 0, -1)
    for value in np.unique(label[label > 0]):
        slices = np.flatnonzero((label == value).any(axis=(1, 2)))
        if slices[-1] - slices[0] > best[2] - best[1]:
            best = (int(value), int(slices[0]), int(slices[-1]))
    return best


def _slice_dsc(seg: Segmenter, volume, label: np.ndarray, k: int) -> float:
    """Mean DSC over the objects of slice k with their exact boxes."""
    modality = seg.modality_of(volume)
    scores = []
    for value in np.unique(label[k][label[k] > 0]):
        gt = label[k] == value
        box = mask_box(gt)
        if box is None or box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        result = seg.segment_boxes(volume, k, [box], seg.normaliser(volume, modality, None, box, k), tight=True)
        scores.append(dsc(result.masks[0], gt))
    return float(np.mean(scores))


def run_bench(json_path: str | Path, datastore: str | Path, model: str = "medsam-lite",
              checkpoint: str | None = None, device: str | None = None, repeats: int = 10) -> dict:
    """Measure encode/decode p50 on a 512 px CT slice and a cold 3D box (default encoder), and compare
    the encoder variants (fp32/bf16, eager/traced) on the slice."""
    start = time.perf_counter()
    sam = load_model(model, checkpoint, device)
    load_s = time.perf_counter() - start
    cases = {c.image_id: c for c in list_cases(datastore)}
    images = {image_id: read_image(case.image) for image_id, case in cases.items()}
    slice_id = max(images, key=lambda image_id: images[image_id].slice_shape[0])
    slice_case, volume = cases[slice_id], images[slice_id]
    label = read_image(slice_case.label).array  # type: ignore[arg-type]
    k = _largest_slice(label)
    height, width = volume.slice_shape
    box = mask_box(label[k] > 0)
    results: dict[str, object] = {
        "model": sam.version, "device": str(sam.device),
        "device_name": torch.cuda.get_device_name() if sam.device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_s": round(load_s, 2), "slice": f"{slice_case.image_id}[{k}] {width}x{height}",
    }
    variants = {}
    default = (sam.precision, sam.graph)
    for precision, graph in VARIANTS:
        sam.precision, sam.graph = precision, graph
        seg = Segmenter(sam, EmbeddingCache())
        norm = seg.normaliser(volume, seg.modality_of(volume), None, box, k)
        fit = Fit(height, width, sam.geometry)
        image = fit.image_to_model(seg.slice_input(volume, k, norm))
        start = time.perf_counter()
        sam.encode(image)  # the first call traces a traced graph
        first_s = time.perf_counter() - start
        encode = _p50_ms(lambda: sam.encode(image), repeats)
        seg.embedding(volume, k, norm)
        rng = np.random.default_rng(0)

        def decode() -> None:
            shift = rng.integers(-5, 6, size=4)
            seg.segment_boxes(volume, k, [tuple(np.clip(np.asarray(box) + shift, 0, width - 1))], norm)

        variants[f"{precision}-{graph}"] = {
            "encode_ms_p50": round(encode, 1), "first_encode_s": round(first_s, 2),
            "decode_ms_p50": round(_p50_ms(decode, repeats * 3), 1),
            "slice_dsc_mean": round(_slice_dsc(seg, volume, label, k), 4)}
    sam.precision, sam.graph = default
    results["variants"] = variants
    results.update(variants[sam.encoder_variant])
    results["encoder_variant"] = sam.encoder_variant

    vol_case = cases.get("ct_3mm") or slice_case
    volume3 = images[vol_case.image_id]
    label3 = read_image(vol_case.label).array  # type: ignore[arg-type]
    value, first, last = _longest_object(label3)
    box3 = mask_box((label3 == value).any(axis=0))
    seg = Segmenter(sam, EmbeddingCache())
    start = time.perf_counter()
    out = seg.segment(volume3, [Box3DPrompt(box3, first, last)])
    results.update({"volume": f"{vol_case.image_id} label {value}", "volume_slices": len(out.objects[0].slices),
                    "volume_s": round(time.perf_counter() - start, 2),
                    "volume_dsc": round(dsc(out.label > 0, label3 == value), 4)})
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results.items():
        print(f"{key:>16}: {value}")
    base = variants["fp32-eager"]
    for name, figures in variants.items():
        print(f"{name:>12}: encode {figures['encode_ms_p50'] / base['encode_ms_p50']:.2f}x of fp32-eager, "
              f"slice DSC {figures['slice_dsc_mean'] - base['slice_dsc_mean']:+.4f}")
    return results
