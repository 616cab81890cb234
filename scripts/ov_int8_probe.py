"""Probe: LiteMedSAM's encoder quantised to int8 with NNCF, against OpenVINO fp32 (the CPU default).

Calibrated on slices that are not eval data (the unlabelled sample images ct_chest, in the soft
tissue and lung windows, and mr_brain), then compared on eval slices: the mean slice DSC of their
objects with exact boxes, the embedding error, and the encode time, timed interleaved.
Needs NNCF, which the project does not install:  .venv/bin/pip install nncf==3.4.0

    .venv/bin/python scripts/ov_int8_probe.py [--calibration 16] [--rounds 10] [--json out/int8.json]
        [--keep-fp32 REGEX ...] [--keep-fp32-types TYPE ...]

`--keep-fp32` keeps the graph's operations whose names match in fp32 (NNCF's ignored scope), e.g.
`'.*layers\.[123]\..*' '.*neck.*'` quantises only the first stage (its operations are unnamed after
OpenVINO folds the batch norms). `--keep-fp32-types` keeps operations of those OpenVINO types, e.g.
`Convolution GroupConvolution` quantises only the matrix products (the attention stages' linears).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from medsam_engine import Segmenter, load_model  # noqa: E402
from medsam_engine.bench import _slice_dsc  # noqa: E402
from medsam_engine.timing import cpu_name  # noqa: E402
from medsam_engine.cache import EmbeddingCache  # noqa: E402
from medsam_engine.geometry import Fit  # noqa: E402
from medsam_engine.imageio import read_image  # noqa: E402
from medsam_engine.preprocess import parse_window  # noqa: E402
from medsam_engine.timing import interleaved_ms  # noqa: E402

DATA = REPO / "sample-datasets" / "totalseg"
CALIBRATION = ("ct_chest", "mr_brain")  # unlabelled: never eval data
EVAL = ("ct_512", "ct_3mm", "mr_3mm")


class Int8Encoder:
    """The quantised graph behind the engine's encoder interface."""

    def __init__(self, compiled) -> None:
        self.request = compiled.create_infer_request()

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.request.infer({0: image.numpy()})[0].copy())

    def encode_many(self, images):
        return [self(image) for image in images]


def calibration_inputs(seg: Segmenter, per_image: int) -> list[np.ndarray]:
    inputs = []
    for name in CALIBRATION:
        volume = read_image(DATA / f"{name}.nii.gz")
        height, width = volume.slice_shape
        fit = Fit(height, width, seg.model.geometry)
        modality = seg.modality_of(volume)
        for k in np.linspace(0, volume.num_slices - 1, per_image).astype(int):
            norms = ([parse_window("soft_tissue"), parse_window("lung")] if modality == "CT"
                     else [seg.normaliser(volume, modality, None, (0, 0, width - 1, height - 1), int(k))])
            inputs += [fit.image_to_model(seg.slice_input(volume, int(k), norm)).numpy() for norm in norms]
    return inputs


def eval_slices() -> list[tuple[str, object, np.ndarray, int]]:
    """Five evenly spread labelled slices of each eval image."""
    out = []
    for name in EVAL:
        volume, label = read_image(DATA / f"{name}.nii.gz"), read_image(DATA / "labels" / "final" / f"{name}.nii.gz").array
        labelled = np.flatnonzero(label.any(axis=(1, 2)))
        for k in labelled[np.linspace(0, len(labelled) - 1, 7).astype(int)[1:-1]]:
            out.append((name, volume, label, int(k)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calibration", type=int, default=16, help="slices per calibration image")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", default="out/int8-probe.json")
    p.add_argument("--keep-fp32", nargs="*", default=[], metavar="REGEX", help="operation names left in fp32")
    p.add_argument("--keep-fp32-types", nargs="*", default=[], metavar="TYPE", help="operation types left in fp32")
    args = p.parse_args()
    import nncf
    import openvino as ov

    sam = load_model("medsam-lite")
    sam.set_encoder("ov-fp32")
    seg = Segmenter(sam, EmbeddingCache())
    fp32 = sam.encoder_backend()
    inputs = calibration_inputs(seg, args.calibration)
    start = time.perf_counter()
    quantised = nncf.quantize(fp32.graph, nncf.Dataset(inputs), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(inputs), ignored_scope=nncf.IgnoredScope(patterns=args.keep_fp32,
                                                                                       types=args.keep_fp32_types,
                                                                                       validate=False))
    quantise_s = time.perf_counter() - start
    int8 = Int8Encoder(ov.Core().compile_model(quantised, "CPU", {"PERFORMANCE_HINT": "LATENCY",
                                                                  "INFERENCE_NUM_THREADS": torch.get_num_threads()}))

    slices = eval_slices()
    reference = {(n, k): _slice_dsc(Segmenter(sam, EmbeddingCache()), v, lab, k) for n, v, lab, k in slices}
    sam._backends[sam.encoder] = (sam.encoder, int8)  # the probe swaps the backend in place of ov-fp32
    quant = {(n, k): _slice_dsc(Segmenter(sam, EmbeddingCache()), v, lab, k) for n, v, lab, k in slices}
    name, volume, label, k = slices[0]
    image = Fit(*volume.slice_shape, sam.geometry).image_to_model(
        seg.slice_input(volume, k, seg.normaliser(volume, "CT", "soft_tissue", (0, 0, 1, 1), k)))
    error = (int8(image) - fp32(image)).abs()
    times = interleaved_ms({"ov-fp32": lambda: fp32(image), "ov-int8": lambda: int8(image)}, args.rounds)
    figures = {
        "cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "calibration_inputs": len(inputs),
        "kept_fp32": args.keep_fp32, "kept_fp32_types": args.keep_fp32_types,
        "quantise_s": round(quantise_s, 1),
        "embedding_max_abs": round(float(error.max()), 4),
        "embedding_mean_rel": round(float(error.mean() / fp32(image).abs().mean()), 4),
        "encode_ms_p50": {n: round(median(t), 1) for n, t in times.items()},
        "int8_ratio_to_ov_fp32": round(median(times["ov-int8"]) / median(times["ov-fp32"]), 3),
        "slice_dsc_mean": {"ov-fp32": round(float(np.mean(list(reference.values()))), 4),
                           "ov-int8": round(float(np.mean(list(quant.values()))), 4)},
        "slice_dsc_per_image_delta": {n: round(float(np.mean([quant[key] - reference[key] for key in reference
                                                              if key[0] == n])), 4) for n in EVAL},
        "slices_worse_by_more_than_0.01": sum(quant[key] < reference[key] - 0.01 for key in reference),
        "slices": len(reference),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    for key, value in figures.items():
        print(f"{key:>32}: {value}")


if __name__ == "__main__":
    main()
