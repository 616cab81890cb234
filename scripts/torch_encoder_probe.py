"""Probe: PyTorch's own ways to speed up LiteMedSAM's encoder on the CPU, against fp32 eager and
OpenVINO fp32 (the CPU default), in one run.

Variants (`--variants`, comma separated; all by default):

    fp32-eager     the torch module as built (the reference)
    ov-fp32        OpenVINO fp32, the project's CPU default (`build_encoder`, graph from disk if cached)
    channels-last  the module and its input in channels-last memory format, eager
    onednn-bf16    eager with oneDNN's bf16 math mode for fp32 convolutions and matmuls
                   (torch.backends.mkldnn.{conv,matmul}.fp32_precision = "bf16", set only around the call)
    inductor-fp32  torch.compile (inductor) with freezing, fp32
    inductor-bf16  torch.compile (inductor) with freezing, under bf16 autocast
    pt2e-int8      PT2E static int8 (torchao's X86InductorQuantizer, default recipe), calibrated on
                   unlabelled sample images (ct_chest, mr_brain; never eval data), then inductor with freezing

For each: the build time (conversion, calibration and the first encode, which compiles), the encode
ms p50 on a 256 px input made from a real CT slice, timed interleaved (one encode of each variant per
round, the order rotated, `--rounds` rounds after a warm-up one, medians), its ratios to fp32 eager and
to ov-fp32, the embedding's mean relative error against fp32 eager, and the mean slice DSC (exact boxes,
the `--objects` largest objects of `--slices` labelled slices spread over each of ct_512, ct_3mm,
mr_3mm) with its delta to fp32 eager per image ("masks_hold": every delta within 0.005). A variant
that fails to build is reported with its error and left out of the rest. Figures: README "Bench".
pt2e-int8 needs torchao, which the project does not install:  .venv/bin/pip install torchao==0.18.0

    .venv/bin/python scripts/torch_encoder_probe.py [--variants a,b] [--rounds 10] [--slices 3]
        [--objects 6] [--calibration 8] [--json out/torch-encoder-probe.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from pathlib import Path
from statistics import median
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

from ov_int8_probe import EVAL, calibration_inputs, eval_slices  # noqa: E402  (this script's folder)

from medsam_engine import Segmenter, load_model  # noqa: E402
from medsam_engine.bench import _slice_dsc  # noqa: E402
from medsam_engine.timing import cpu_name  # noqa: E402
from medsam_engine.cache import EmbeddingCache  # noqa: E402
from medsam_engine.encoders import build_encoder  # noqa: E402
from medsam_engine.geometry import Fit  # noqa: E402
from medsam_engine.timing import interleaved_ms  # noqa: E402

VARIANTS = ("fp32-eager", "ov-fp32", "channels-last", "onednn-bf16", "inductor-fp32", "inductor-bf16", "pt2e-int8")
EncodeFn = Callable[[torch.Tensor], torch.Tensor]


class FnEncoder:
    """An encode function behind the engine's encoder interface."""

    def __init__(self, fn: EncodeFn) -> None:
        self.fn = fn

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return self.fn(image)

    def encode_many(self, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [self.fn(image) for image in images]


def inference(fn: EncodeFn, autocast: bool = False) -> EncodeFn:
    """`fn` run under inference mode (and bf16 autocast), its output as contiguous fp32."""
    def run(image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return fn(image).float().contiguous()
    return run


def onednn_bf16(module: nn.Module) -> EncodeFn:
    """Eager, with oneDNN's bf16 math mode for fp32 convolutions and matmuls during the call only."""
    mkldnn = torch.backends.mkldnn

    def run(image: torch.Tensor) -> torch.Tensor:
        saved = mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision
        mkldnn.conv.fp32_precision = mkldnn.matmul.fp32_precision = "bf16"
        try:
            return module(image)
        finally:
            mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision = saved
    return run


def pt2e_int8(module: nn.Module, example: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    """The module exported, quantised with torchao's X86InductorQuantizer and calibrated on `calibration`."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    with torch.no_grad():
        exported = torch.export.export(module, (example,)).module()
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for image in calibration:
            prepared(image)
        converted = convert_pt2e(prepared)
    return move_exported_model_to_eval(converted)


def build(name: str, sam, example: torch.Tensor, calibration: Callable[[], list[torch.Tensor]]) -> EncodeFn:
    """The encode function of variant `name`, ready for inputs like `example`."""
    module = sam.net.image_encoder
    if name == "fp32-eager":
        return inference(module)
    if name == "ov-fp32":
        used, encoder = build_encoder("ov-fp32", module, torch.device("cpu"), sam.version, tuple(example.shape),
                                      sam.encoder_cache)
        if used != "ov-fp32":
            raise RuntimeError(f"ov-fp32 unavailable, build_encoder fell back to {used}")
        return encoder
    if name == "channels-last":
        last = copy.deepcopy(module).to(memory_format=torch.channels_last)
        return inference(lambda image: last(image.contiguous(memory_format=torch.channels_last)))
    if name == "onednn-bf16":
        return inference(onednn_bf16(module))
    if name in ("inductor-fp32", "inductor-bf16"):
        return inference(torch.compile(copy.deepcopy(module)), autocast=name == "inductor-bf16")
    if name == "pt2e-int8":
        return inference(torch.compile(pt2e_int8(copy.deepcopy(module), example, calibration())))
    raise ValueError(f"unknown variant {name!r}; one of {', '.join(VARIANTS)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma separated; fp32-eager is always run")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--slices", type=int, default=3, help="labelled slices per eval image (at most 5)")
    p.add_argument("--objects", type=int, default=6, help="largest objects per slice")
    p.add_argument("--calibration", type=int, default=8, help="slices per calibration image (pt2e-int8)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default="out/torch-encoder-probe.json")
    args = p.parse_args()
    names = ["fp32-eager"] + [n for n in args.variants.split(",") if n and n != "fp32-eager"]
    torch.set_num_threads(args.threads)
    torch._inductor.config.freezing = True  # for the compiled variants only: eager ones never read it

    sam = load_model("medsam-lite")
    sam.set_encoder("fp32-eager")
    seg = Segmenter(sam, EmbeddingCache())
    labelled = eval_slices()
    slices = [s for n in EVAL for i, s in enumerate(x for x in labelled if x[0] == n)
              if i in np.linspace(0, 4, args.slices).round()]
    _, volume, _, k = slices[0]  # a ct_512 slice, soft-tissue window
    example = Fit(*volume.slice_shape, sam.geometry).image_to_model(
        seg.slice_input(volume, k, seg.normaliser(volume, "CT", "soft_tissue", (0, 0, 1, 1), k)))
    calibration = lambda: [torch.from_numpy(x) for x in calibration_inputs(seg, args.calibration)]  # noqa: E731

    fns: dict[str, EncodeFn] = {}
    figures: dict[str, dict] = {}
    for name in names:
        start = time.perf_counter()
        try:
            fn = build(name, sam, example, calibration)
            fn(example)  # the first encode: inductor compiles here
        except Exception as exc:  # noqa: BLE001 - a variant's failure is a figure, not the probe's end
            traceback.print_exc()
            figures[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            continue
        fns[name] = fn
        figures[name] = {"build_s": round(time.perf_counter() - start, 1)}
        print(f"{name}: built in {figures[name]['build_s']} s", flush=True)

    base = fns["fp32-eager"](example)
    scores: dict[str, dict[tuple[str, int], float]] = {}
    for name, fn in fns.items():
        error = (fn(example) - base).abs()
        figures[name]["embedding_mean_rel"] = round(float(error.mean() / base.abs().mean()), 5)
        sam._backends["fp32-eager"] = ("fp32-eager", FnEncoder(fn))  # the probe swaps in each variant
        scores[name] = {(n, k): _slice_dsc(Segmenter(sam, EmbeddingCache()), v, lab, k, args.objects)
                     for n, v, lab, k in slices}
        print(f"{name}: slice DSC done", flush=True)

    times = interleaved_ms({name: (lambda fn=fn: fn(example)) for name, fn in fns.items()}, args.rounds)
    eager, ov = median(times["fp32-eager"]), median(times["ov-fp32"]) if "ov-fp32" in times else None
    for name in fns:
        ms = median(times[name])
        deltas = {n: round(float(np.mean([scores[name][key] - scores["fp32-eager"][key] for key in scores[name]
                                          if key[0] == n])), 4) for n in EVAL}
        figures[name].update({
            "encode_ms_p50": round(ms, 1), "ratio_to_fp32_eager": round(ms / eager, 3),
            "ratio_to_ov_fp32": round(ms / ov, 3) if ov else None,
            "slice_dsc_mean": round(float(np.mean(list(scores[name].values()))), 4),
            "slice_dsc_delta_per_image": deltas,
            "masks_hold": all(abs(d) <= 0.005 for d in deltas.values()),
        })
    out = {"cpu": cpu_name(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "rounds": args.rounds,
           "slices": [f"{n}[{k}]" for n, _, _, k in slices], "objects": args.objects, "variants": figures}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
