"""Sweep the small-box prior's gate (`BoxPrior.fill_gate`) on the sample data's 2D objects.

    python scripts/prior_sweep.py [--every 6] [--offset 0] [--loose 0 10 25] [--gates 0.4 0.5 0.6 inf]

Every `every`-th object (from `offset`) of every slice gets its exact box and boxes drawn 0..PCT %
loose (as `main.py eval --loose`); each box is decoded once without the prior, then thresholded
under each gate (`inf`: the shift on every small box; `none`: no prior). Prints DSC mean / median
per gate and loose level, as JSON (also to --out).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from medsam_engine import Segmenter, load_model  # noqa: E402
from medsam_engine.cache import EmbeddingCache  # noqa: E402
from medsam_engine.clicks import loose_box  # noqa: E402
from medsam_engine.datastore import list_cases  # noqa: E402
from medsam_engine.evaluate_interactive import _objects_2d  # noqa: E402
from medsam_engine.geometry import Fit  # noqa: E402
from medsam_engine.imageio import read_image  # noqa: E402
from medsam_engine.metrics import dsc  # noqa: E402
from medsam_engine.prior import BoxPrior  # noqa: E402


def sweep(datastore: Path, every: int, offset: int, loose: list[float], gates: list[float]) -> dict:
    seg = Segmenter(load_model("medsam-lite", device="cpu"), cache=EmbeddingCache(max_bytes=4 << 30))
    rules = {"none": None, **{f"{g:g}": BoxPrior(fill_gate=g) for g in gates}}
    scores: dict[str, dict[str, list[float]]] = {rule: {f"{p:g}": [] for p in loose} for rule in rules}
    for case in list_cases(datastore):
        volume, label = read_image(case.image), read_image(case.label).array
        height, width = volume.slice_shape
        fit = Fit(height, width, seg.model.geometry)
        modality = seg.modality_of(volume)
        rngs = {p: np.random.default_rng([0, int(round(p * 100))]) for p in loose}  # as main.py eval --loose
        for index, (k, _, gt, tight) in enumerate(_objects_2d(label)):
            if index % every != offset:
                continue
            for p in loose:
                box = loose_box(tight, p, rngs[p], height, width)
                norm = seg.normaliser(volume, modality, None, box, k)
                raw = seg.segment_boxes(volume, k, [box], norm, tight=False).logits[0]
                side = fit.box_side(box)
                for rule, prior in rules.items():
                    logits = prior.apply(raw, box)[0] if prior is not None and prior.applies(side) else raw
                    scores[rule][f"{p:g}"].append(dsc((logits > 0).numpy(), gt))
        print(case.image_id, "done", flush=True)
    return {"every": every, "offset": offset, "n": len(scores["none"][f"{loose[0]:g}"]),
            "rules": {rule: {p: {"mean": round(float(np.mean(v)), 4), "median": round(float(np.median(v)), 4)}
                             for p, v in levels.items()} for rule, levels in scores.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datastore", type=Path, default=ROOT / "sample-datasets" / "totalseg")
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--loose", type=float, nargs="+", default=[0.0, 10.0, 25.0])
    parser.add_argument("--gates", type=float, nargs="+", default=[0.4, 0.5, 0.6, math.inf])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = sweep(args.datastore, args.every, args.offset, args.loose, args.gates)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
