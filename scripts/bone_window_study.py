"""Where the bone window helps: the CT objects of the sample data, today's window against bone.

    python scripts/bone_window_study.py --prompt 3d|2d|keys [--objects flipped|other] [--every 1]
                                        [--json out/bone-study-3d.json]

`--prompt 3d`: one 3D box per object, as `main.py eval --mode 3d`; `keys`: tight boxes on 3 key
slices, as `--mode 3d-keys`; `2d`: every slice's exact box, as `main.py eval`. `--objects flipped`
takes the prompts that `preprocess.drawn_around_bone` calls bone (for 3d, over the box's slices; for
2d and keys, on the box's own slice, every key box) and that the median rule does not already send
to the bone window; `other` takes the rest. Each prompt is segmented twice with the engine: in the
window the median rule picks (`Segmenter.normaliser`, `normaliser_over`; no bone rule) and in the
bone window. Prints one JSON row per prompt (DSC for each), then medians, means and counts of
prompts better or worse by more than 0.01, overall and per image and organ group.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))

from medsam_engine import Box3DPrompt, KeySlicesPrompt, Segmenter, SlicePrompt, load_model  # noqa: E402
from medsam_engine.cache import EmbeddingCache  # noqa: E402
from medsam_engine.datastore import label_names, list_cases  # noqa: E402
from medsam_engine.evaluate import key_slices  # noqa: E402
from medsam_engine.geometry import mask_box  # noqa: E402
from medsam_engine.imageio import Volume, read_image  # noqa: E402
from medsam_engine.metrics import dsc  # noqa: E402
from medsam_engine.preprocess import drawn_around_bone  # noqa: E402

DATA = ROOT / "sample-datasets" / "totalseg"


def _has_area(box: tuple | None) -> bool:
    return box is not None and box[2] > box[0] and box[3] > box[1]


Prompt = Box3DPrompt | KeySlicesPrompt | SlicePrompt


def prompts(seg: Segmenter, kind: str) -> Iterator[tuple[str, Volume, Prompt, np.ndarray, int | None, str, bool]]:
    """(name, volume, prompt, truth, the slice scored or None for the volume, the median rule's window,
    flipped) for every CT prompt of `kind`. `flipped`: the bone rule calls it bone (for 3d and keys,
    the object's 3D box over its slices) and the median rule does not."""
    names = label_names(DATA)
    for case in list_cases(DATA):
        volume = read_image(case.image)
        if seg.modality_of(volume) != "CT":
            continue
        label = read_image(case.label).array
        hu = volume.array
        for value in np.unique(label)[1:]:
            truth = label == value
            name = f"{case.image_id}/{names.get(case.image_id, {}).get(int(value), value)}"
            slices = np.flatnonzero(truth.any(axis=(1, 2)))
            box = mask_box(truth.any(axis=0))
            if not _has_area(box):
                continue
            first, last = int(slices[0]), int(slices[-1])
            bone_3d = drawn_around_bone(hu[first:last + 1].max(axis=0), box)
            if kind == "3d":
                window = seg.normaliser(volume, "CT", None, box, (first + last) // 2).name
                yield name, volume, Box3DPrompt(box, first, last), truth, None, window, window != "bone" and bone_3d
            elif kind == "keys":
                boxes = {k: mask_box(truth[k]) for k in key_slices(slices, truth, 3)}
                window = seg.normaliser_over(volume, "CT", None, sorted(boxes.items())).name
                yield name, volume, KeySlicesPrompt(boxes), truth, None, window, window != "bone" and bone_3d
            else:
                for k in slices:
                    b = mask_box(truth[k])
                    if not _has_area(b):
                        continue
                    window = seg.normaliser(volume, "CT", None, b, int(k)).name
                    flipped = window != "bone" and drawn_around_bone(hu[k], b)
                    yield f"{name}[{k}]", volume, SlicePrompt(b, int(k)), truth, int(k), window, flipped


def group(name: str) -> str:
    """image/organ without its side and number (ribs, vertebrae)."""
    image, organ = name.split("[")[0].split("/")
    return f"{image}/{re.sub(r'(_left|_right)?(_[A-Z]?[0-9]+)?$', '', organ)}"


def summary(rows: list[dict]) -> dict:
    a = np.array([[r["median_rule"], r["bone"]] for r in rows])
    return {"n": len(rows), "median": [round(float(v), 4) for v in np.median(a, axis=0)],
            "mean": [round(float(v), 4) for v in a.mean(axis=0)],
            "bone_better": int((a[:, 1] > a[:, 0] + 0.01).sum()), "bone_worse": int((a[:, 1] < a[:, 0] - 0.01).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", choices=["3d", "2d", "keys"], default="3d")
    parser.add_argument("--objects", choices=["flipped", "other"], default="flipped")
    parser.add_argument("--every", type=int, default=1, help="every n-th selected prompt")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    seg = Segmenter(load_model("medsam-lite", device="cpu"), EmbeddingCache(max_bytes=6 << 30))
    rows: list[dict] = []
    selected = 0
    for name, volume, prompt, truth, k, window, flipped in prompts(seg, args.prompt):
        if flipped != (args.objects == "flipped"):
            continue
        selected += 1
        if (selected - 1) % args.every:
            continue
        row: dict = {"name": name, "window": window}
        for key, chosen in (("median_rule", window), ("bone", "bone")):
            label = seg.segment(volume, [prompt], "CT", chosen).label > 0
            row[key] = round(dsc(label, truth) if k is None else dsc(label[k], truth[k]), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)
    groups = defaultdict(list)
    for row in rows:
        groups[group(row["name"])].append(row)
    out = {"prompt": args.prompt, "objects": args.objects, "every": args.every, "encoder": seg.model.encoder_variant,
           "overall": summary(rows) if rows else {}, "groups": {g: summary(r) for g, r in sorted(groups.items())},
           "rows": rows}
    print(json.dumps({k: v for k, v in out.items() if k != "rows"}, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
