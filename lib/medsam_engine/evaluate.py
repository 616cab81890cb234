"""`main.py eval`: DSC/NSD of box-prompted segmentation on a datastore, against the filled box."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .atomicio import atomic_write
from .datastore import Case, label_names, list_cases
from .errors import EngineInputError
from .geometry import Box, Fit, mask_box
from .imageio import Volume, read_image
from .metrics import dsc, nsd
from .models import load_model
from .prompts import Box3DPrompt, KeySlicesPrompt
from .segmenter import Segmenter
from .prior import BoxPrior
from .propagation import PropagationRule
from .zoom import ZoomRule

COLUMNS = ["image", "label", "slice", "dsc", "nsd", "box_dsc", "box_nsd", "name", "box_side_model_px", "zoomed"]
SIZE_GROUPS = ((0, 16, "<16px"), (16, 24, "16-24px"), (24, 32, "24-32px"), (32, 64, "32-64px"), (64, 10 ** 9, ">=64px"))


def size_group(side_model_px: float) -> str:
    """Name of the size group of a box whose longest side is `side_model_px` at the model input."""
    return next(name for low, high, name in SIZE_GROUPS if low <= side_model_px < high)


def jitter_box(box: Box, pixels: float, rng: np.random.Generator, height: int, width: int) -> Box:
    """Move each edge by a random whole number of pixels in [-pixels, pixels], keeping >= 1 px extent."""
    if pixels <= 0:
        return box
    moved = np.asarray(box) + rng.integers(-int(pixels), int(pixels) + 1, size=4)
    x0, x1 = sorted(np.clip(moved[0::2], 0, width - 1))
    y0, y1 = sorted(np.clip(moved[1::2], 0, height - 1))
    x1, y1 = max(x1, min(x0 + 1, width - 1)), max(y1, min(y0 + 1, height - 1))
    x0, y0 = min(x0, x1 - 1), min(y0, y1 - 1)
    return float(x0), float(y0), float(x1), float(y1)


def filled_box(shape: tuple[int, ...], box: Box) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    mask[..., y0:y1 + 1, x0:x1 + 1] = True
    return mask


def _read_case(case: Case) -> tuple[Volume, np.ndarray]:
    volume = read_image(case.image)
    label = read_image(case.label).array  # type: ignore[arg-type]
    if label.shape != volume.array.shape[:3]:
        raise EngineInputError(f"{case.label.name}: label shape {label.shape} != image {volume.array.shape[:3]}")
    return volume, label


def rows_2d(seg: Segmenter, case: Case, jitter: float, rng: np.random.Generator) -> Iterator[dict]:
    volume, label = _read_case(case)
    modality = seg.modality_of(volume)
    height, width = volume.slice_shape
    fit = Fit(height, width, seg.model.geometry)
    for k in range(volume.num_slices):
        groups: dict[str, list] = defaultdict(list)
        for value in np.unique(label[k]):
            if value == 0:
                continue
            gt = label[k] == value
            box = mask_box(gt)
            if box is None or box[2] - box[0] < 1 or box[3] - box[1] < 1:
                continue  # one-pixel-thin objects have no box with area
            box = jitter_box(box, jitter, rng, height, width)
            norm = seg.normaliser(volume, modality, None, box, k)
            groups[norm.id].append((int(value), gt, box, norm))
        for members in groups.values():
            result = seg.segment_boxes(volume, k, [m[2] for m in members], members[0][3], tight=True)
            zoomed = [seg.zoom.crop_for(m[2], fit) is not None if seg.zoom else False for m in members]
            for (value, gt, box, _), pred, was_zoomed in zip(members, result.masks, zoomed):
                base = filled_box(gt.shape, box)
                side = fit.box_side(box)
                yield {"image": case.image_id, "label": value, "slice": k, "dsc": dsc(pred, gt), "nsd": nsd(pred, gt),
                       "box_dsc": dsc(base, gt), "box_nsd": nsd(base, gt), "box_side_model_px": round(side, 1),
                       "zoomed": int(was_zoomed)}


def _object_row(case: Case, value: int, volume: Volume, gt: np.ndarray, pred: np.ndarray, base: np.ndarray,
                side: float, zoomed: bool) -> dict:
    """One evaluated 3D object: the model's and the filled box's DSC and NSD (mm)."""
    return {"image": case.image_id, "label": value, "slice": "", "dsc": dsc(pred, gt),
            "nsd": nsd(pred, gt, spacing=volume.spacing), "box_dsc": dsc(base, gt),
            "box_nsd": nsd(base, gt, spacing=volume.spacing), "box_side_model_px": round(side, 1),
            "zoomed": int(zoomed)}


def _objects_3d(case: Case) -> Iterator[tuple[Volume, int, np.ndarray, np.ndarray]]:
    """(volume, label value, its mask, the slices it is on) for every object of a case with a box."""
    volume, label = _read_case(case)
    for value in np.unique(label):
        if value == 0:
            continue
        gt = label == value
        box = mask_box(gt.any(axis=0))
        if box is None or box[2] - box[0] < 1 or box[3] - box[1] < 1:
            continue
        yield volume, int(value), gt, np.flatnonzero(gt.any(axis=(1, 2)))


def rows_3d(seg: Segmenter, case: Case, jitter: float, rng: np.random.Generator) -> Iterator[dict]:
    """One 3D box per object (the union of its slice boxes over its slice range)."""
    for volume, value, gt, slices in _objects_3d(case):
        height, width = volume.slice_shape
        fit = Fit(height, width, seg.model.geometry)
        box = jitter_box(mask_box(gt.any(axis=0)), jitter, rng, height, width)  # type: ignore[arg-type]
        result = seg.segment(volume, [Box3DPrompt(box, int(slices[0]), int(slices[-1]))])
        base = np.zeros_like(gt)
        base[slices[0]:slices[-1] + 1] = filled_box(gt.shape[1:], box)
        side = fit.box_side(box)
        yield _object_row(case, value, volume, gt, result.label > 0, base, side, result.objects[0].zoomed_slices > 0)


def usable_slices(slices: np.ndarray, gt: np.ndarray) -> list[int]:
    """The slices among `slices` whose mask has a box with area (where a key box can be drawn)."""
    return [int(k) for k in slices if (b := mask_box(gt[k])) is not None and b[2] > b[0] and b[3] > b[1]]


def key_slices(slices: np.ndarray, gt: np.ndarray, keys: int) -> list[int]:
    """`keys` slices spread evenly from the object's first to its last slice (the ends and the middle
    for 3), each moved to the nearest slice whose mask has a box with area."""
    usable = usable_slices(slices, gt)
    if not usable:
        return []
    wanted = np.linspace(usable[0], usable[-1], max(1, keys))
    return sorted({min(usable, key=lambda k: (abs(k - w), k)) for w in wanted})


def segment_keys(seg: Segmenter, case: Case, volume: Volume, value: int, gt: np.ndarray,
                 boxes: dict[int, Box]) -> tuple[dict, np.ndarray]:
    """One object segmented from its key-slice boxes: its eval row (the filled-box baseline fills the
    boxes interpolated between the key slices) and the predicted mask."""
    fit = Fit(*volume.slice_shape, seg.model.geometry)
    result = seg.segment(volume, [KeySlicesPrompt(boxes)])
    base = np.zeros_like(gt)
    for k, box in seg.boxes_between_keys(volume, boxes).items():
        base[k] = filled_box(gt.shape[1:], box)
    side = max(fit.box_side(b) for b in boxes.values())
    pred = result.label > 0
    return _object_row(case, value, volume, gt, pred, base, side, result.objects[0].zoomed_slices > 0), pred


def _eval_3d_keys(seg: Segmenter, case: Case, jitter: float, rng: np.random.Generator,
                  keys: int = 3) -> Iterator[dict]:
    """Tight boxes on `keys` key slices of each object (the paper's annotation study), the rest from
    the engine."""
    for volume, value, gt, slices in _objects_3d(case):
        height, width = volume.slice_shape
        chosen = key_slices(slices, gt, keys)
        if not chosen:
            continue
        boxes = {k: jitter_box(mask_box(gt[k]), jitter, rng, height, width) for k in chosen}  # type: ignore[arg-type]
        yield segment_keys(seg, case, volume, value, gt, boxes)[0]


def _stats(rows: list[dict], prefix: str = "") -> dict:
    d = np.array([r[prefix + "dsc"] for r in rows], dtype=float)
    n = np.array([r[prefix + "nsd"] for r in rows], dtype=float)
    return {"n": len(rows), "dsc_median": float(np.median(d)), "dsc_mean": float(d.mean()),
            "nsd_median": float(np.median(n)), "nsd_mean": float(n.mean())}


def summarise(rows: list[dict]) -> dict:
    """Median and mean DSC/NSD for the model and the filled box: overall, per image, organ, size, image and size."""
    def both(subset: list[dict]) -> dict:
        return {"model": _stats(subset), "box": _stats(subset, "box_")}

    def grouped(key) -> dict:
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[key(row)].append(row)
        return {name: both(subset) for name, subset in sorted(groups.items())}

    return {"overall": both(rows),
            "per_image": grouped(lambda r: r["image"]),
            "per_organ": grouped(lambda r: f"{r['image']}/{r['name']}"),
            "per_size": grouped(lambda r: size_group(r["box_side_model_px"])),
            "per_image_size": grouped(lambda r: f"{r['image']}/{size_group(r['box_side_model_px'])}")}


def box_plot(rows: list[dict], path: Path) -> None:
    """Box plot of DSC per image, model beside the filled box."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = sorted({r["image"] for r in rows})
    model = [[r["dsc"] for r in rows if r["image"] == im] for im in images]
    box = [[r["box_dsc"] for r in rows if r["image"] == im] for im in images]
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(images), 4))
    positions = np.arange(len(images)) * 3
    p1 = ax.boxplot(model, positions=positions, widths=0.8, patch_artist=True)
    p2 = ax.boxplot(box, positions=positions + 1, widths=0.8, patch_artist=True)
    for patch in p1["boxes"]:
        patch.set_facecolor("#4c72b0")
    for patch in p2["boxes"]:
        patch.set_facecolor("#dd8452")
    ax.set_xticks(positions + 0.5, images)
    ax.set_ylabel("DSC")
    ax.set_ylim(0, 1)
    ax.legend([p1["boxes"][0], p2["boxes"][0]], ["MedSAM", "filled box"], loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def eval_setup(datastore: str | Path, out: str | Path, cases: list[Case], model: str, checkpoint: str | None,
               device: str | None, zoom: bool, prior: bool, propagation: PropagationRule = PropagationRule()
               ) -> tuple[Path, Segmenter, dict]:
    """The output folder (made), the segmenter and the label names of an eval run over `cases`."""
    if not cases:
        raise EngineInputError(f"no labelled images in {datastore}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seg = Segmenter(load_model(model, checkpoint, device), zoom=ZoomRule() if zoom else None,
                    prior=BoxPrior() if prior else None, propagation=propagation)
    return out, seg, label_names(datastore)


def collect_rows(cases: list[Case], names: dict, rows_of: Callable[[Case], Iterable[dict]], datastore: str | Path,
                 unit: str = "objects") -> list[dict]:
    """The eval rows of every case, each named after its label, with one progress line per image;
    EngineInputError when there are none."""
    rows: list[dict] = []
    for case in cases:
        for row in rows_of(case):
            row["name"] = names.get(case.image_id, {}).get(row["label"], str(row["label"]))
            rows.append(row)
        print(f"{case.image_id}: {sum(r['image'] == case.image_id for r in rows)} {unit}", flush=True)
    if not rows:
        raise EngineInputError(f"no objects to evaluate in {datastore}")
    return rows


def write_summary(summary: dict, path: Path) -> None:
    """summary.json, written whole (atomically)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1) + "\n"))


def evaluate(datastore: str | Path, out: str | Path, mode: str = "2d", jitter: float = 0.0,
             model: str = "medsam-lite", checkpoint: str | None = None, device: str | None = None,
             zoom: bool = True, prior: bool = True, limit: int | None = None, seed: int = 0, keys: int = 3,
             bone_boxes: bool = True, rounded_keys: bool = True) -> dict:
    """Evaluate every labelled image; writes per_case.csv, summary.json and dsc_boxplot.png in `out`.
    `bone_boxes=False` propagates 3D boxes in the bone window too; `rounded_keys=False` interpolates
    key-slice boxes linearly (PropagationRule)."""
    cases = list_cases(datastore)[:limit]
    out, seg, names = eval_setup(datastore, out, cases, model, checkpoint, device, zoom, prior,
                                 PropagationRule(bone_boxes=bone_boxes, rounded_keys=rounded_keys))
    rng = np.random.default_rng(seed)
    runs = {"2d": rows_2d, "3d": rows_3d, "3d-keys": partial(_eval_3d_keys, keys=keys)}
    if mode not in runs:
        raise EngineInputError(f"unknown eval mode {mode!r}; use one of {', '.join(runs)}")
    run = runs[mode]
    rows = collect_rows(cases, names, lambda case: run(seg, case, jitter, rng), datastore)
    with open(out / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: (f"{row[c]:.4f}" if isinstance(row[c], float) and c != "box_side_model_px" else row[c])
                             for c in COLUMNS})
    summary = {"model": seg.model.version, "mode": mode, "jitter": jitter,
               **({"keys": keys, "rounded_keys": rounded_keys} if mode == "3d-keys" else {}),
               "zoom": vars(seg.zoom) if seg.zoom else None, "prior": vars(seg.prior) if seg.prior else None,
               **({"bone_boxes": bone_boxes} if mode == "3d" else {}), **summarise(rows)}
    write_summary(summary, out / "summary.json")
    box_plot(rows, out / "dsc_boxplot.png")
    overall = summary["overall"]
    print(f"overall DSC median {overall['model']['dsc_median']:.3f} (filled box {overall['box']['dsc_median']:.3f}), "
          f"NSD median {overall['model']['nsd_median']:.3f} (filled box {overall['box']['nsd_median']:.3f}), "
          f"n={overall['model']['n']}")
    return summary
