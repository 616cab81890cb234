"""`main.py bench`: engine latency on real sample data, printed and written as JSON."""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from statistics import median

import numpy as np
import torch

from .cache import EmbeddingCache
from .datastore import list_cases
from .encoder_choice import AUTO
from .encoders import ENCODERS
from .geometry import Fit, mask_box
from .imageio import read_image
from .metrics import dsc
from .models import SamModel, load_model
from .prompts import Box3DPrompt
from .segmenter import Segmenter
from .timing import cpu_name, interleaved_ms, p50_ms, rss_mb

REFERENCE = "fp32-eager"
AHEAD_SLICES = 8  # slices per encode_many call timed against encoding them one by one


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


def _slice_dsc(seg: Segmenter, volume, label: np.ndarray, k: int, objects: int | None = None) -> float:
    """Mean DSC over the objects of slice k (the `objects` largest; all by default) with their exact boxes."""
    modality = seg.modality_of(volume)
    scores = []
    values, areas = np.unique(label[k][label[k] > 0], return_counts=True)
    for value in values[np.argsort(-areas, kind="stable")][:objects]:
        gt = label[k] == value
        box = mask_box(gt)
        if box is None or box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        result = seg.segment_boxes(volume, k, [box], seg.normaliser(volume, modality, None, box, k), tight=True)
        scores.append(dsc(result.masks[0], gt))
    return float(np.mean(scores))


def _variants(device: torch.device) -> list[str]:
    """The encoders worth comparing on `device` (OpenVINO's run on the CPU only)."""
    return [name for name in ENCODERS if device.type == "cpu" or not name.startswith("ov-")]


def _encode_with(sam: SamModel, name: str, image: torch.Tensor) -> torch.Tensor:
    sam.set_encoder(name)
    return sam.encode(image)


def _decoder_ab(sam: SamModel, embedding: torch.Tensor, boxes: torch.Tensor, repeats: int) -> dict[str, float]:
    """The engine's decode (`decoder.predict_masks`) against the library's `MaskDecoder` forward,
    interleaved, with one thread (as the server decodes) and with the bench's threads."""
    net = sam.net

    @torch.inference_mode()
    def library() -> None:
        sparse, dense = net.prompt_encoder(points=None, boxes=boxes, masks=None)
        net.mask_decoder(image_embeddings=embedding, image_pe=net.prompt_encoder.get_dense_pe(),
                         sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False)

    threads = torch.get_num_threads()
    figures = {}
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        times = interleaved_ms({"engine": lambda: sam.decode(embedding, boxes), "library": library}, repeats, sam.device)
        figures[f"decode_{n}t_engine_ms_p50"] = round(median(times["engine"]), 1)
        figures[f"decode_{n}t_library_ms_p50"] = round(median(times["library"]), 1)
        figures[f"decode_{n}t_ratio_to_library"] = round(median(times["engine"]) / median(times["library"]), 3)
    torch.set_num_threads(threads)
    return figures


def run_bench(json_path: str | Path, datastore: str | Path, model: str = "medsam-lite",
              checkpoint: str | None = None, device: str | None = None, repeats: int = 10) -> dict:
    """Encode/decode latency on the 512 px CT slice and a cold 3D box with the default encoder, and
    every encoder variant against fp32 eager: timed interleaved (one encode of each per round,
    `repeats` rounds, medians), first encode after start (conversion or load from disk), slice DSC."""
    rss_start = rss_mb()
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
    seg = Segmenter(sam, EmbeddingCache())
    norm = seg.normaliser(volume, seg.modality_of(volume), None, box, k)
    image = Fit(height, width, sam.geometry).image_to_model(seg.slice_input(volume, k, norm))
    results: dict[str, object] = {
        "model": sam.version, "device": str(sam.device),
        "device_name": torch.cuda.get_device_name() if sam.device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
        "load_s": round(load_s, 2), "slice": f"{slice_case.image_id}[{k}] {width}x{height}", "rounds": repeats,
        "rss_start_mb": rss_start, "rss_after_load_mb": rss_mb(),
    }

    # The default encoder first, as a server meets it: made at its first encode after start (for
    # ov-auto, the time to build and time its candidates); then it is timed as the one it chose.
    default = sam.encoder
    variants: dict[str, dict] = {}
    encodes = {}
    skipped: dict[str, str] = {}
    for name in [default] + [n for n in _variants(sam.device) if n != default]:
        sam.set_encoder(name)
        start = time.perf_counter()
        sam.encode(image)
        first_s = time.perf_counter() - start
        if name == AUTO:
            results.update({"auto_chose": sam.encoder_variant, "auto_first_encode_s": round(first_s, 2),
                            "rss_default_warm_mb": rss_mb()})
            continue
        if sam.encoder_variant != name:
            skipped[name] = f"unavailable, fell back to {sam.encoder_variant}"
            continue
        variants[name] = {"first_encode_s": round(first_s, 2),
                          "source": getattr(sam.encoder_backend(), "source", "torch")}
        encodes[name] = partial(_encode_with, sam, name, image)
        if name == default:
            results["rss_default_warm_mb"] = rss_mb()
    times = interleaved_ms(encodes, repeats, sam.device)
    base = median(times[REFERENCE])
    for name, figures in variants.items():
        sam.set_encoder(name)
        figures["encode_ms_p50"] = round(median(times[name]), 1)
        figures["ratio_to_fp32_eager"] = round(median(times[name]) / base, 3)
        figures["slice_dsc_mean"] = round(_slice_dsc(Segmenter(sam, EmbeddingCache()), volume, label, k), 4)
    for figures in variants.values():
        figures["slice_dsc_vs_fp32_eager"] = round(figures["slice_dsc_mean"] - variants[REFERENCE]["slice_dsc_mean"], 4)
    results["rss_all_variants_mb"] = rss_mb()
    sam.set_encoder(default)
    default = sam.encoder_variant
    results.update({"variants": variants, "skipped_variants": skipped, "encoder_variant": default,
                    "encode_ms_p50": variants[default]["encode_ms_p50"],
                    "encode_ratio_to_eager": variants[default]["ratio_to_fp32_eager"],
                    "first_encode_s": results.get("auto_first_encode_s", variants[default]["first_encode_s"])})

    seg = Segmenter(sam, EmbeddingCache())
    seg.embedding(volume, k, norm)
    rng = np.random.default_rng(0)

    def decode() -> None:
        shift = rng.integers(-5, 6, size=4)
        seg.segment_boxes(volume, k, [tuple(np.clip(np.asarray(box) + shift, 0, width - 1))], norm)

    results["decode_ms_p50"] = round(p50_ms(decode, repeats * 3, sam.device), 1)
    results.update(_decoder_ab(sam, seg.embedding(volume, k, norm),
                               torch.from_numpy(Fit(height, width, sam.geometry).box_to_model(np.array([box]))).float(),
                               repeats * 3))

    # A volume's slices with the default encoder: all at once (encode_many) against one by one
    batch = [image] * AHEAD_SLICES
    ahead = interleaved_ms({"many": lambda: sam.encode_many(batch), "one": lambda: [sam.encode(x) for x in batch]},
                           max(3, repeats // 2), sam.device)
    results.update({"encode_ahead_slices": AHEAD_SLICES,
                    "encode_many_ms_per_slice_p50": round(median(ahead["many"]) / AHEAD_SLICES, 1),
                    "encode_one_by_one_ms_per_slice_p50": round(median(ahead["one"]) / AHEAD_SLICES, 1),
                    "encode_many_ratio": round(median(ahead["many"]) / median(ahead["one"]), 3),
                    "rss_after_encode_ahead_mb": rss_mb()})

    vol_case = cases.get("ct_3mm") or slice_case
    volume3 = images[vol_case.image_id]
    label3 = read_image(vol_case.label).array  # type: ignore[arg-type]
    value, first, last = _longest_object(label3)
    box3 = mask_box((label3 == value).any(axis=0))
    seg = Segmenter(sam, EmbeddingCache())
    start = time.perf_counter()
    out = seg.segment(volume3, [Box3DPrompt(box3, first, last)])
    volume_s = time.perf_counter() - start
    n_slices = len(out.objects[0].slices)
    results.update({"volume": f"{vol_case.image_id} label {value}", "volume_slices": n_slices,
                    "volume_s": round(volume_s, 2), "volume_dsc": round(dsc(out.label > 0, label3 == value), 4),
                    # the cold 3D box against as many fp32 eager encodes, both measured in this run
                    "volume_ratio_to_eager": round(volume_s * 1000 / (n_slices * base), 3),
                    "rss_end_mb": rss_mb()})
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(results, indent=1) + "\n")
    for key, value in results.items():
        if key != "variants":
            print(f"{key:>22}: {value}")
    for name, figures in variants.items():
        print(f"{name:>12}: encode {figures['encode_ms_p50']:7.1f} ms = {figures['ratio_to_fp32_eager']:.2f}x of "
              f"fp32-eager, slice DSC {figures['slice_dsc_mean']:.4f} ({figures['slice_dsc_vs_fp32_eager']:+.4f}), "
              f"first encode {figures['first_encode_s']} s ({figures['source']})")
    return results
