"""Measure what training with loose boxes (`TrainConfig.loose_boxes`) does for one-box 3D on an
image never trained on.

    python scripts/loose_box_gain.py --hold-out ct_3mm [--draws 1200] [--loose 0.75]

Leaves one sample image out and fine-tunes on the others' final labels twice, with the engine's
trainer and the same draws: once as the trainer does by default (each slice's own box, jittered)
and once with `--loose` of the draws prompted by the boxes one-box propagation gives a slice.
Then scores the held-out image with the starting weights and both runs: one 3D box per object
(`main.py eval --mode 3d`) and each object's exact box on each slice (`--mode 2d`).

The encoder is frozen (the trainer's default), so the runs differ from the start only in the mask
decoder: one Segmenter encodes each held-out slice once and each run's decoder is loaded into it.
Prints JSON (also written to --out/<image>.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from medsam_engine import Segmenter, load_model  # noqa: E402
from medsam_engine.datastore import label_names, list_cases  # noqa: E402
from medsam_engine.dataset import index_slices, spread  # noqa: E402
from medsam_engine.evaluate import rows_2d, rows_3d  # noqa: E402
from medsam_engine.training import TrainConfig, train  # noqa: E402

DATASTORE = ROOT / "sample-datasets" / "totalseg"


def fine_tune(cases: list, loose: float, draws: int, out: Path, seed: int, lr: float) -> tuple[Path, dict]:
    """A run on every labelled slice of `cases` with about `draws` training draws; its last checkpoint
    and its stats. Nothing is published and nothing stops it early, so its validation (one slice,
    which the trainer requires) decides nothing."""
    cfg = TrainConfig(output_dir=out, device="cpu", lr=lr, seed=seed, loose_boxes=loose, publish_mode="never",
                      early_stop_patience=0, max_anchor_objects=0, replay=0, distill=0)
    fit = index_slices(cases)
    val = spread(fit, 1)
    cfg.max_epochs = max(1, round(draws / len(fit)))
    stats = train(cfg, cases, fit, val)
    return out / "checkpoint_last.pt", {"epochs": cfg.max_epochs, "train_slices": len(fit), "loose_boxes": loose,
                                        "val_dice": {"start": stats["baseline_val_dice"], "last": stats["history"][-1]
                                                     .get("val_dice")},
                                        "minutes": round(stats["history"][-1]["seconds"] / 60, 1)}


def scores(seg: Segmenter, case, names: dict) -> dict:
    """One-box 3D and exact-box 2D DSC on `case` (as main.py eval: no jitter)."""
    rng = np.random.default_rng(0)
    three = list(rows_3d(seg, case, 0.0, rng))
    two = np.array([r["dsc"] for r in rows_2d(seg, case, 0.0, rng)])
    d3 = np.array([r["dsc"] for r in three])
    strong = [r for r in three if r["box_dsc"] >= 0.4]
    return {"3d": {"n": len(three), "dsc_median": round(float(np.median(d3)), 4), "dsc_mean": round(float(d3.mean()), 4),
                   "strong_box_not_beaten": sum(r["dsc"] <= r["box_dsc"] for r in strong), "strong_box": len(strong)},
            "2d": {"n": len(two), "dsc_median": round(float(np.median(two)), 4), "dsc_mean": round(float(two.mean()), 4)},
            "3d_objects": {names.get(r["label"], str(r["label"])): round(r["dsc"], 4) for r in three}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hold-out", required=True, help="the sample image scored (never trained on)")
    parser.add_argument("--draws", type=int, default=1200, help="training draws per run (about)")
    parser.add_argument("--loose", type=float, default=0.75, help="share of the loose run's draws with loose boxes")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "loose_box_gain")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    cases = list_cases(DATASTORE)
    held = next(c for c in cases if c.image_id == args.hold_out)
    others = [c for c in cases if c is not held]
    names = label_names(DATASTORE).get(held.image_id, {})
    out = args.out / held.image_id
    runs = {"default boxes": 0.0, f"loose boxes {args.loose}": args.loose}
    checkpoints, info = {}, {}
    for run, loose in runs.items():
        checkpoints[run], info[run] = fine_tune(others, loose, args.draws, out / run.replace(" ", "_"), args.seed,
                                                args.lr)
        print(run, info[run], flush=True)
    seg = Segmenter(load_model("medsam-lite", device="cpu"))
    decoder = seg.model.net.mask_decoder
    encoder_state = seg.model.net.image_encoder.state_dict()
    result = {"hold_out": held.image_id, "trained_on": [c.image_id for c in others], "draws": args.draws,
              "lr": args.lr, "seed": args.seed, "runs": info, "scores": {"start": scores(seg, held, names)}}
    print("start", result["scores"]["start"]["3d"], result["scores"]["start"]["2d"], flush=True)
    for run, path in checkpoints.items():
        tuned = load_model("medsam-lite", str(path), device="cpu").net
        if any(not torch.equal(v, encoder_state[k]) for k, v in tuned.image_encoder.state_dict().items()):
            raise SystemExit(f"{run}: the image encoder changed; the cached embeddings do not apply")
        decoder.load_state_dict(tuned.mask_decoder.state_dict())
        result["scores"][run] = scores(seg, held, names)
        print(run, result["scores"][run]["3d"], result["scores"][run]["2d"], flush=True)
    result["minutes"] = round((time.time() - start) / 60, 1)
    out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{held.image_id}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
