"""Measure the fine-tuning gain on the sample data: DSC of an organ before and after fine-tuning.

    python scripts/finetune_gain.py survey [--image ct_3mm]
        DSC of every organ on its middle slice (exact box), lowest first: where the model is weak.
    python scripts/finetune_gain.py gain --organ colon [--train-image ct_3mm --eval-image ct_512]
        Fine-tune on a few slices of the organ in one image (the paper's recipe, engine's trainer),
        then report DSC before and after on the image's other slices and on the other image, and
        on other organs of the image and of ct_512 and mr_3mm (does the model forget them?). With
        --all-objects the training slices teach every labelled object on them, as an annotator's
        full label would. The other organs of the training image (never on or next to a slice
        they are scored on) are the run's anchor set and its replayed objects (--replay per
        training slice, the trainer's default; 0: none). --distill W weighs distillation towards
        the starting model's masks on the training slices' other labelled objects (the trainer's
        default; 0: off). The publish gate refuses
        an epoch that lowers them (or the organ's validation slices) by more than --max-drop; the
        result says whether it published. "after" scores the weights trained (the last epoch),
        published or not. --encoder-lr-scale 0.1 trains the image encoder at a tenth of the lr,
        0 freezes it.

Prints JSON (also written to --out/gain.json). CPU is fine for LiteMedSAM (minutes).
"""

from __future__ import annotations

import argparse
import functools
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
from medsam_engine.dataset import SliceSample, index_slices, spread  # noqa: E402
from medsam_engine.geometry import mask_box  # noqa: E402
from medsam_engine.imageio import read_image  # noqa: E402
from medsam_engine.metrics import dsc  # noqa: E402
from medsam_engine.training import TrainConfig, train  # noqa: E402

DATASTORE = ROOT / "sample-datasets" / "totalseg"


def organ_value(image: str, organ: str) -> int:
    return next(v for v, name in label_names(DATASTORE)[image].items() if name == organ)


@functools.cache
def final_label(image: str) -> np.ndarray:
    """The final label volume of a sample image (read once)."""
    return read_image(DATASTORE / "labels" / "final" / f"{image}.nii.gz").array


def slice_dsc(segmenter: Segmenter, image: str, value: int, slices: list[int]) -> list[float]:
    """DSC of the organ on each slice, prompted with its exact bounding box (as the app's tests)."""
    volume = read_image(DATASTORE / f"{image}.nii.gz")
    label = final_label(image)
    modality = segmenter.modality_of(volume)
    scores = []
    for k in slices:
        truth = label[k] == value
        box = mask_box(truth)
        normaliser = segmenter.normaliser(volume, modality, None, box, k)
        scores.append(dsc(segmenter.segment_boxes(volume, k, [box], normaliser).masks[0], truth))
    return scores


def survey(image: str) -> list[dict]:
    segmenter = Segmenter(load_model("medsam-lite", device="cpu"))
    label = final_label(image)
    rows = []
    for value, name in sorted(label_names(DATASTORE)[image].items()):
        on = np.flatnonzero((label == value).any(axis=(1, 2)))
        if on.size < 3:
            continue
        k = int(on[on.size // 2])
        rows.append({"organ": name, "value": value, "slices": int(on.size), "middle": k,
                     "dsc": round(slice_dsc(segmenter, image, value, [k])[0], 4)})
        print(rows[-1], flush=True)
    return sorted(rows, key=lambda r: r["dsc"])


def summary(scores: list[float]) -> dict:
    return {"n": len(scores), "dsc_mean": round(float(np.mean(scores)), 4), "dsc_median": round(float(np.median(scores)), 4)}


OTHER_ORGANS = ("liver", "spleen", "kidney_left", "kidney_right", "stomach")
UNSEEN_VOLUMES = ("ct_512", "mr_3mm")  # their other organs are never trained, replayed or anchors


def scored_slices(image: str, value: int, skip: set[int] = frozenset()) -> list[int]:
    """Three slices an organ is scored on (at a quarter, half and three quarters of its extent)."""
    label = final_label(image)
    ks = [int(k) for k in np.flatnonzero((label == value).reshape(label.shape[0], -1).sum(1) >= 50) if k not in skip]
    return [ks[len(ks) // 4], ks[len(ks) // 2], ks[3 * len(ks) // 4]]


def gain(organ: str, train_image: str, eval_image: str, train_slices: int, val_slices: int, epochs: int,
         batch_size: int, out: Path, seed: int, all_objects: bool = False, lr: float = 1e-4,
         encoder_lr_scale: float = 1.0, max_drop: float = 0.02, replay: float = TrainConfig.replay,
         distill: float = TrainConfig.distill) -> dict:
    cases = [c for c in list_cases(DATASTORE) if c.image_id in (train_image, eval_image)]
    ids = [c.image_id for c in cases]
    train_value, eval_value = organ_value(train_image, organ), organ_value(eval_image, organ)
    samples = index_slices(cases, {train_image: {train_value}, eval_image: {eval_value}}, min_pixels=50)
    own = [s for s in samples if ids[s.case] == train_image]
    other = [s for s in samples if ids[s.case] == eval_image]
    fit = spread(own[1::2], train_slices)  # odd positions: training; the rest held out
    held = [s for s in own if s not in fit]
    val = spread(held, val_slices)
    test_own = [s for s in held if s not in val]
    test_other = spread(other, 24)
    used = {s.slice for s in fit + val}
    if all_objects:  # the same slices, with every object an annotator labelled on them
        everything = {(s.case, s.slice): s for s in index_slices(cases) if ids[s.case] == train_image}
        fit, val = [everything[(s.case, s.slice)] for s in fit], [everything[(s.case, s.slice)] for s in val]
    others = {name: (organ_value(train_image, name), scored_slices(train_image, organ_value(train_image, name), used))
              for name in OTHER_ORGANS}
    names = {image: set(by_value.values()) for image, by_value in label_names(DATASTORE).items()}
    unseen = {f"{image} {name}": (image, organ_value(image, name), scored_slices(image, organ_value(image, name)))
              for image in UNSEEN_VOLUMES if image != train_image for name in OTHER_ORGANS if name in names[image]}

    def evaluate(model) -> dict:
        seg = Segmenter(model)
        return {f"{train_image} held-out slices": summary(slice_dsc(seg, train_image, train_value,
                                                                     [s.slice for s in test_own])),
                f"{eval_image} (other volume)": summary(slice_dsc(seg, eval_image, eval_value,
                                                                  [s.slice for s in test_other])),
                "other organs": {name: summary(slice_dsc(seg, train_image, value, ks))["dsc_mean"]
                                 for name, (value, ks) in others.items()},
                "other organs, other volumes": {key: summary(slice_dsc(seg, image, value, ks))["dsc_mean"]
                                                for key, (image, value, ks) in unseen.items()}}

    start = time.time()
    before = evaluate(load_model("medsam-lite", device="cpu"))
    print("before", before, flush=True)
    cfg = TrainConfig(output_dir=out / "run", publish_path=out / "model" / "medsam-lite.pt", stats_path=out / "train_stats.json",
                      max_epochs=epochs, batch_size=batch_size, lr=lr, device="cpu", publish_mode="best",
                      early_stop_patience=0, seed=seed, encoder_lr_scale=encoder_lr_scale, max_drop=max_drop,
                      max_anchor_objects=8, replay=replay, distill=distill)
    anchor_values = {organ_value(train_image, name) for name in OTHER_ORGANS} - {train_value}
    scored = {(value, k + d) for value, ks in others.values() for k in ks for d in (-1, 0, 1)}
    # anchors, replayed and distilled objects: never an organ on a slice it is scored on below, nor on a neighbour
    candidates = index_slices(cases, {train_image: anchor_values}, min_pixels=50)
    anchors = [SliceSample(s.case, s.slice, kept) for s in candidates
               if (kept := tuple(v for v in s.values if (v, s.slice) not in scored))]
    keep_off = {(ids.index(train_image), k, value) for value, k in scored}
    stats = train(cfg, cases, fit, val, anchors, keep_off)
    after = evaluate(load_model("medsam-lite", str(out / "run" / "checkpoint_last.pt"), device="cpu"))
    print("after", after, flush=True)
    return {"organ": organ, "all_objects": all_objects, "lr": lr, "encoder_lr_scale": encoder_lr_scale,
            "replay": replay, "replay_objects": stats["replay_objects"],
            "distill": distill, "distill_objects": stats["distill_objects"],
            "jitter_model_px": cfg.jitter, "train_image": train_image, "train_slices": [s.slice for s in fit],
            "val_slices": [s.slice for s in val], "epochs": epochs, "batch_size": batch_size,
            "best_epoch": stats["best_metric_epoch"], "val_dice": {"start": stats["baseline_val_dice"],
                                                                   "best": stats["best_metric"]},
            "published": (stats["published"] or {}).get("version"), "publish_refused": stats["publish_refused"],
            "gate": {"before": stats["baseline_by_group"], "last_epoch": stats["history"][-1].get("by_group")},
            "before": before, "after": after,
            "history": stats["history"], "minutes": round((time.time() - start) / 60, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("survey")
    p.add_argument("--image", default="ct_3mm")
    p = sub.add_parser("gain")
    p.add_argument("--organ", required=True)
    p.add_argument("--train-image", default="ct_3mm")
    p.add_argument("--eval-image", default="ct_512")
    p.add_argument("--train-slices", type=int, default=6)
    p.add_argument("--val-slices", type=int, default=3)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--encoder-lr-scale", type=float, default=0.0, help="image encoder lr = lr x this (0: frozen)")
    p.add_argument("--max-drop", type=float, default=0.02, help="publish gate: largest DSC drop allowed")
    p.add_argument("--replay", type=float, default=TrainConfig.replay,
                   help="objects of the other organs (not anchors) replayed per training slice (0: none)")
    p.add_argument("--distill", type=float, default=TrainConfig.distill,
                   help="weight of distillation towards the starting model's masks on other objects (0: off)")
    p.add_argument("--all-objects", action="store_true", help="train on every labelled object of the slices")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "out" / "finetune_gain")
    args = parser.parse_args()
    torch.set_num_threads(getattr(args, "threads", 2))
    if args.command == "survey":
        result = survey(args.image)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        result = gain(args.organ, args.train_image, args.eval_image, args.train_slices, args.val_slices,
                      args.epochs, args.batch_size, args.out, args.seed, args.all_objects, args.lr,
                      args.encoder_lr_scale, args.max_drop, args.replay, args.distill)
        (args.out / "gain.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
