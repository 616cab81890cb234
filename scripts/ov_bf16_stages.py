"""Probe: OpenVINO bf16 on parts of LiteMedSAM's encoder only, against OpenVINO fp32 (the CPU default).

The encoder is converted in five stages (patch embedding with the first, convolutional stage; the
three attention stages; the neck), each compiled in fp32 and with the bf16 precision hint. Each mix
of precisions is scored on the eval slices of `ov_int8_probe.py` (the mean slice DSC of their
objects with exact boxes, and the embedding's mean relative error) and timed as the sum of its
stages' medians (every stage in both precisions timed interleaved). OpenVINO's CPU plugin gives no
per-operation precision under the bf16 hint (it ignores the fp32 marks a graph's operations may
carry), hence the split (`medsam_engine.stages`). The engine's `ov-mixed` encoder is the mix
this probe found to keep the masks.

    .venv/bin/python scripts/ov_bf16_stages.py [--rounds 10] [--json out/bf16-stages.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
sys.path.insert(0, str(REPO / "scripts"))

from medsam_engine import Segmenter, load_model  # noqa: E402
from medsam_engine.bench import _slice_dsc  # noqa: E402
from medsam_engine.timing import cpu_name  # noqa: E402
from medsam_engine.cache import EmbeddingCache  # noqa: E402
from medsam_engine.geometry import Fit  # noqa: E402
from medsam_engine.stages import tinyvit_stages  # noqa: E402
from medsam_engine.timing import interleaved_ms  # noqa: E402
from ov_int8_probe import EVAL, eval_slices  # noqa: E402

PRECISIONS = ("f32", "bf16")


class StagedEncoder:
    """The stages' compiled graphs run in turn, each in its own precision (the engine's encoder interface)."""

    def __init__(self, compiled: list[dict], mix: tuple[str, ...]) -> None:
        self.requests = [stage[precision].create_infer_request() for stage, precision in zip(compiled, mix)]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        x = image.numpy()
        for request in self.requests:
            x = request.infer({0: x})[0].copy()
        return torch.from_numpy(x)

    def encode_many(self, images):
        return [self(image) for image in images]


def mixes(count: int) -> list[tuple[str, ...]]:
    """All fp32, all bf16, each stage alone in bf16, and each stage alone kept in fp32."""
    one = [tuple("bf16" if j == i else "f32" for j in range(count)) for i in range(count)]
    kept = [tuple("f32" if j == i else "bf16" for j in range(count)) for i in range(count)]
    return [("f32",) * count, ("bf16",) * count, *one, *kept]


def prefix_mixes(count: int) -> list[tuple[str, ...]]:
    """The first n stages kept in fp32 and the rest in bf16, for n = count (all fp32, the reference,
    first) down to 0 (all bf16)."""
    return [tuple("f32" if j < n else "bf16" for j in range(count)) for n in range(count, -1, -1)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--json", default="out/bf16-stages.json")
    p.add_argument("--fine", action="store_true",
                   help="split the first stage into the patch embedding, its blocks and its patch merging")
    p.add_argument("--only-prefixes", action="store_true",
                   help="score the mixes that keep the first n stages in fp32 and the rest in bf16, instead")
    args = p.parse_args()
    import openvino as ov

    sam = load_model("medsam-lite")
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": torch.get_num_threads(), "PERFORMANCE_HINT": "LATENCY"}
    names, compiled, inputs = [], [], []
    x = torch.zeros(1, 3, sam.geometry.size, sam.geometry.size)
    with torch.no_grad():
        for name, module in tinyvit_stages(sam.net.image_encoder, fine=args.fine):
            graph = ov.convert_model(module.eval(), example_input=x, input=[tuple(x.shape)])
            compiled.append({pr: core.compile_model(graph, "CPU", {**config, "INFERENCE_PRECISION_HINT": pr})
                             for pr in PRECISIONS})
            names.append(name)
            inputs.append(x.numpy())
            x = module(x)
    times = interleaved_ms({f"{name}:{pr}": (lambda c=stage[pr], i=i: c(i))
                            for name, stage, i in zip(names, compiled, inputs) for pr in PRECISIONS}, args.rounds)
    stage_ms = {key: round(median(t), 1) for key, t in times.items()}

    slices = eval_slices()
    seg = Segmenter(sam, EmbeddingCache())
    _, volume0, _, k0 = slices[0]
    probe = Fit(*volume0.slice_shape, sam.geometry).image_to_model(
        seg.slice_input(volume0, k0, seg.normaliser(volume0, "CT", "soft_tissue", (0, 0, 1, 1), k0)))
    rows, reference, reference_embedding = [], None, None
    for mix in (prefix_mixes if args.only_prefixes else mixes)(len(names)):
        encoder = StagedEncoder(compiled, mix)
        sam._backends[sam.encoder] = (sam.encoder, encoder)  # the probe swaps the backend in place of the default
        dscs = {(n, k): _slice_dsc(Segmenter(sam, EmbeddingCache()), v, lab, k) for n, v, lab, k in slices}
        embedding = encoder(probe)
        if reference is None:
            reference, reference_embedding = dscs, embedding
        ms = sum(stage_ms[f"{name}:{pr}"] for name, pr in zip(names, mix))
        rows.append({
            "bf16_stages": [name for name, pr in zip(names, mix) if pr == "bf16"],
            "ms": round(ms, 1),
            "embedding_mean_rel": round(float((embedding - reference_embedding).abs().mean()
                                              / reference_embedding.abs().mean()), 4),
            "slice_dsc_delta": {n: round(float(np.mean([dscs[key] - reference[key] for key in dscs if key[0] == n])), 4)
                                for n in EVAL},
            "slices_worse_by_more_than_0.01": sum(dscs[key] < reference[key] - 0.01 for key in dscs),
        })
        print(json.dumps(rows[-1]), flush=True)
    total = rows[0]["ms"]
    for row in rows:
        row["ratio_to_fp32"] = round(row["ms"] / total, 3)
    figures = {"cpu": cpu_name(), "torch_threads": torch.get_num_threads(), "rounds": args.rounds,
               "slices": len(slices), "stage_ms_p50": stage_ms, "mixes": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(figures, indent=1) + "\n")
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
