"""What limits one-box 3D propagation: its result against the proposals it chooses from.

    python scripts/propagation_study.py [--images ct_3mm mr_3mm] [--every 1] [--seeds 3] [--out out/propagation-study.json]

Every `every`-th 3D object of the sample data gets one box (the union of its slice boxes over its
slice range, as `main.py eval --mode 3d`). Volume DSC per object, of:

    default             the engine's one-box propagation (`Segmenter.segment`, as the eval)
    given box           the given box decoded on every slice
    tight boxes         each slice's own tight box (an annotator's box on every slice)
    oracle P,G          per slice, the better (by the ground truth) of the default's mask and the
                        given box's: the most any rule that chooses between the two can reach
    oracle P,G,N        the same, adding the masks of the neighbour slices' given-box masks' boxes,
                        grown by the rule's margin (proposals that do not depend on the walk)
    oracle over seeds   the best of the walks seeded on the `seeds` slices that fill the box best
                        (at least 3 apart) and on the middle slice

and the mean slice DSC of one walk step taken from the true mask of the slice before (its box grown
by the rule's margin) against the slice's own tight box. Prints medians and means per row and per
image, as JSON (also to --out). Encodes each slice once (the embeddings are cached).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from medsam_engine import Segmenter, load_model  # noqa: E402
from medsam_engine.cache import EmbeddingCache  # noqa: E402
from medsam_engine.datastore import list_cases  # noqa: E402
from medsam_engine.geometry import Box, mask_box  # noqa: E402
from medsam_engine.imageio import read_image  # noqa: E402
from medsam_engine.metrics import dsc  # noqa: E402
from medsam_engine.prompts import Box3DPrompt  # noqa: E402
from medsam_engine.propagation import SliceDecoder, grow_box, inside, propagate, seed_order  # noqa: E402

ROWS = ("default", "given box", "tight boxes", "oracle P,G", "oracle P,G,N", "oracle over seeds")


def _decodable(box: Box | None) -> bool:
    return box is not None and box[2] - box[0] >= 1 and box[3] - box[1] >= 1


def _stack(masks: dict[int, np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    volume = np.zeros(shape, dtype=bool)
    for k, mask in masks.items():
        volume[k] = mask
    return volume


def _memoised(decode: SliceDecoder) -> SliceDecoder:
    """`decode`, answering a (slice, boxes, tight) it was asked before from memory: every seeded
    walk asks for the given box on every slice again."""
    seen: dict[tuple, list[tuple[np.ndarray, float]]] = {}

    def again(k: int, boxes, tight: bool) -> list[tuple[np.ndarray, float]]:
        key = (k, tuple(tuple(b) for b in boxes), tight)
        if key not in seen:
            seen[key] = decode(k, boxes, tight)
        return seen[key]

    return again


def study_object(seg: Segmenter, volume, gt: np.ndarray, seeds: int) -> dict:
    """The rows above for one object (mask `gt`), and its one-step slice DSCs."""
    box = mask_box(gt.any(axis=0))
    slices = np.flatnonzero(gt.any(axis=(1, 2)))
    first, last = int(slices[0]), int(slices[-1])
    default = seg.segment(volume, [Box3DPrompt(box, first, last)]).label[first:last + 1] > 0
    norm = seg.normaliser(volume, seg.modality_of(volume), None, box, (first + last) // 2)
    decode = _memoised(seg.slice_decoder(volume, norm)[0])
    rule, span = seg.propagation, range(first, last + 1)
    margin = rule.margin(box)
    given = {k: decode(k, [box], False)[0] for k in span}
    given_masks = {k: inside(m, box) for k, (m, _) in given.items()}
    empty = np.zeros(volume.slice_shape, dtype=bool)

    def decoded(k: int, b: Box | None, tight: bool) -> np.ndarray:
        return inside(decode(k, [b], tight)[0][0], box) if _decodable(b) else empty

    tight = {k: decoded(k, mask_box(gt[k]), True) for k in span}
    neighbours = {k: [decoded(k, grow_box(mask_box(given_masks[j]), box, margin), False)
                      for j in (k - 1, k + 1) if j in given_masks and mask_box(given_masks[j]) is not None]
                  for k in span}

    def oracle(candidates: dict[int, list[np.ndarray]]) -> dict[int, np.ndarray]:
        return {k: max(c, key=lambda m: dsc(m, gt[k])) for k, c in candidates.items()}

    pg = {k: [default[k - first], given_masks[k]] for k in span}
    starts: list[int] = []
    for k in seed_order(given, box, first, last, rule.seed_edge):
        if len(starts) < seeds and all(abs(k - s) >= 3 for s in starts):
            starts.append(k)
    middle = (first + last) // 2
    walks = [propagate(decode, box, first, last, rule, seed=s)[0] for s in dict.fromkeys([*starts, middle])]
    step = [(dsc(decoded(k, grow_box(mask_box(gt[k - 1]), box, margin), False), gt[k]), dsc(tight[k], gt[k]))
            for k in span if k > first and _decodable(mask_box(gt[k - 1])) and gt[k].any()]
    whole = gt.shape
    scores = {
        "default": dsc(_stack({k: default[k - first] for k in span}, whole), gt),
        "given box": dsc(_stack(given_masks, whole), gt),
        "tight boxes": dsc(_stack(tight, whole), gt),
        "oracle P,G": dsc(_stack(oracle(pg), whole), gt),
        "oracle P,G,N": dsc(_stack(oracle({k: pg[k] + neighbours[k] for k in span}), whole), gt),
        "oracle over seeds": max(dsc(_stack(w, whole), gt) for w in walks),
    }
    return {"scores": scores, "step": step}


def study(datastore: Path, images: list[str] | None, every: int, seeds: int) -> dict:
    seg = Segmenter(load_model("medsam-lite", device="cpu"), cache=EmbeddingCache(max_bytes=4 << 30))
    per_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    steps: list[tuple[float, float]] = []
    index = 0
    for case in list_cases(datastore):
        if images and case.image_id not in images:
            continue
        volume, label = read_image(case.image), read_image(case.label).array
        for value in np.unique(label)[1:]:
            gt = label == value
            if not _decodable(mask_box(gt.any(axis=0))):
                continue
            index += 1
            if (index - 1) % every:
                continue
            result = study_object(seg, volume, gt, seeds)
            for row, score in result["scores"].items():
                per_image[case.image_id][row].append(score)
            steps += result["step"]
        print(case.image_id, "done", flush=True)

    def stats(values: list[float]) -> dict:
        return {"median": round(float(np.median(values)), 3), "mean": round(float(np.mean(values)), 3), "n": len(values)}

    overall = {row: stats([s for rows in per_image.values() for s in rows[row]]) for row in ROWS}
    step = np.array(steps)
    return {"every": every, "seeds": seeds, "overall": overall,
            "per_image": {image: {row: stats(rows[row]) for row in ROWS} for image, rows in per_image.items()},
            "one_step": {"slices": len(step), "from_true_previous_mask": round(float(step[:, 0].mean()), 3),
                         "tight_box": round(float(step[:, 1].mean()), 3)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datastore", type=Path, default=ROOT / "sample-datasets" / "totalseg")
    parser.add_argument("--images", nargs="*", help="image ids (default: all)")
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = study(args.datastore, args.images, args.every, args.seeds)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
