"""`main.py eval --loose PCT ... --clicks N`: 2D eval as an annotator works: loose boxes, then
simulated corrective clicks (DSC after each click, NoC@85 / NoC@90). `--mode 3d-keys --add-boxes N`:
key-slice boxes added one at a time on the worst slice or in the largest gap (volume DSC after each box,
boxes to 0.85 / 0.90)."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from .atomicio import staged
from .clicks import clicks_needed, loose_box, next_click
from .datastore import Case, list_cases
from .errors import EngineInputError
from .evaluate import (_objects_3d, _read_case, box_plot, collect_rows, eval_setup, filled_box, key_slices,
                       segment_keys, summarise, usable_slices, write_summary)
from .geometry import Box, Fit, mask_box
from .imageio import Volume
from .metrics import dsc, nsd
from .prompts import KeySlicesPrompt
from .refine import METHODS, Refinement
from .segmenter import Segmenter

THRESHOLDS = (0.85, 0.90)
BASE_COLUMNS = ["image", "label", "slice", "name", "loose", "refine", "dsc", "nsd", "box_dsc", "box_nsd",
                "box_side_model_px"]


def _objects_2d(label: np.ndarray) -> Iterator[tuple[int, int, np.ndarray, Box]]:
    """(slice, label value, mask, exact box) of every object on every slice whose box has area."""
    for k in range(label.shape[0]):
        for value in np.unique(label[k]):
            if value == 0:
                continue
            gt = label[k] == value
            box = mask_box(gt)
            if box is not None and box[2] - box[0] >= 1 and box[3] - box[1] >= 1:
                yield k, int(value), gt, box


def click_curve(run: Refinement, gt: np.ndarray, clicks: int) -> list[float]:
    """DSC of the box's mask, then after each simulated corrective click (stops early when exact)."""
    curve = [dsc(run.mask, gt)]
    for _ in range(clicks):
        click = next_click(run.mask, gt)
        curve.append(dsc(run.add(click), gt) if click is not None else curve[-1])
    return curve


def _eval_case(seg: Segmenter, volume: Volume, label: np.ndarray, image: str, loose: Sequence[float],
               clicks: int, methods: Sequence[str], seed: int, every: int = 1) -> Iterator[dict]:
    height, width = volume.slice_shape
    fit = Fit(height, width, seg.model.geometry)
    rngs = {pct: np.random.default_rng([seed, int(round(pct * 100))]) for pct in loose}
    for index, (k, value, gt, tight) in enumerate(_objects_2d(label)):
        if index % every:
            continue
        for pct in loose:
            box = loose_box(tight, pct, rngs[pct], height, width)
            base = filled_box(gt.shape, box)
            side = fit.box_side(box)
            row = {"image": image, "label": value, "slice": k, "loose": pct, "box_dsc": dsc(base, gt),
                   "box_nsd": nsd(base, gt), "box_side_model_px": round(side, 1)}
            for method in methods if clicks else ("",):
                run = Refinement(seg, volume, k, box, method=method or "rules")
                curve = click_curve(run, gt, clicks)
                yield {**row, "refine": method, "dsc": curve[0], "nsd": nsd(run.mask, gt) if not clicks else "",
                       "curve": curve}


Needed = Callable[[dict, float], int]


def noc(row: dict, threshold: float) -> int:
    """NoC@threshold of a click row (capped at its number of clicks)."""
    return clicks_needed(row["curve"], threshold)


def curve_stats(rows: list[dict], needed: Needed = noc, name: str = "noc") -> dict:
    """Mean and median DSC after 0..N interactions, and the mean of `needed` (interactions to reach
    0.85 / 0.90, as `{name}85_mean`) with the share never reaching it (`{name}85_failed`)."""
    curves = np.array([r["curve"] for r in rows], dtype=float)
    stats = {"n": len(rows), "dsc_mean": [round(float(v), 4) for v in curves.mean(axis=0)],
             "dsc_median": [round(float(v), 4) for v in np.median(curves, axis=0)]}
    for t in THRESHOLDS:
        counts = np.array([needed(r, t) for r in rows], dtype=float)
        stats[f"{name}{int(t * 100)}_mean"] = round(float(counts.mean()), 3)
        stats[f"{name}{int(t * 100)}_failed"] = round(float(np.mean(curves.max(axis=1) < t)), 3)
    return stats


def summarise_clicks(rows: list[dict], needed: Needed = noc, name: str = "noc") -> dict:
    """Curves and `needed` stats overall, per image, per organ, and on the objects whose first mask is below 0.8."""
    def grouped(key) -> dict:
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            groups[key(row)].append(row)
        return {group: curve_stats(subset, needed, name) for group, subset in sorted(groups.items())}

    low = [r for r in rows if r["curve"][0] < 0.8]
    return {"overall": curve_stats(rows, needed, name), "start_below_0.8": curve_stats(low, needed, name) if low else None,
            "per_image": grouped(lambda r: r["image"]), "per_organ": grouped(lambda r: f"{r['image']}/{r['name']}")}


def curve_plot(runs: dict, path: Path, xlabel: str = "corrective clicks after the box") -> None:
    """Mean DSC against the number of interactions, one line per run and image; 0.85 and 0.90 dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for t in THRESHOLDS:
        ax.axhline(t, color="grey", lw=0.8, ls="--")
    for name, run in runs.items():
        line = ax.plot(run["overall"]["dsc_mean"], marker="o", lw=2, label=f"{name} (all)")[0]
        for image, stats in run["per_image"].items():
            ax.plot(stats["dsc_mean"], ls=":", color=line.get_color(), alpha=0.6)
            ax.annotate(image, (len(stats["dsc_mean"]) - 1, stats["dsc_mean"][-1]), fontsize=7,
                        color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean DSC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_csv(rows: list[dict], clicks: int, path: Path) -> None:
    columns = BASE_COLUMNS + [f"dsc_click{i}" for i in range(1, clicks + 1)] + \
        ([f"noc{int(t * 100)}" for t in THRESHOLDS] if clicks else [])
    with staged(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            cells = {c: (f"{v:.4f}" if isinstance(v, float) and c not in ("box_side_model_px", "loose") else v)
                     for c, v in row.items()}
            cells.update({f"dsc_click{i}": f"{v:.4f}" for i, v in enumerate(row["curve"][1:], 1)})
            if clicks:
                cells.update({f"noc{int(t * 100)}": clicks_needed(row["curve"], t) for t in THRESHOLDS})
            writer.writerow(cells)


def evaluate_interactive(datastore: str | Path, out: str | Path, loose: Sequence[float] = (0.0,), clicks: int = 0,
                         refine: Sequence[str] = ("rules",), model: str = "medsam-lite", checkpoint: str | None = None,
                         device: str | None = None, zoom: bool = True, prior: bool = True, limit: int | None = None,
                         seed: int = 0, images: Sequence[str] | None = None, every: int = 1) -> dict:
    """2D eval with boxes loosened by each of `loose` (%), then `clicks` simulated corrective clicks with
    each refinement in `refine`; writes per_case.csv, summary.json, dsc_boxplot.png (and
    dsc_per_click.png with clicks) in `out`. `images` keeps only those image ids, `every` only every
    n-th object of an image (for quick runs). Embeddings are shared across loose levels and refinements."""
    if clicks < 0 or any(p < 0 for p in loose):
        raise EngineInputError("--clicks and --loose must not be negative")
    unknown = [m for m in refine if m not in METHODS]
    if unknown:
        raise EngineInputError(f"unknown refinement {unknown[0]!r}; use one of {', '.join(METHODS)}")
    cases = [c for c in list_cases(datastore) if not images or c.image_id in images][:limit]
    out, seg, names = eval_setup(datastore, out, cases, model, checkpoint, device, zoom, prior)
    def rows_of(case: Case) -> Iterator[dict]:
        volume, label = _read_case(case)
        return _eval_case(seg, volume, label, case.image_id, list(loose), clicks, list(refine), seed, every)

    rows = collect_rows(cases, names, rows_of, datastore, unit="rows")
    _write_csv(rows, clicks, out / "per_case.csv")
    first = refine[0] if clicks else ""
    summary: dict = {"model": seg.model.version, "mode": "2d", "loose": list(loose), "clicks": clicks,
                     "refine": list(refine) if clicks else [], "seed": seed, "every": every,
                     "zoom": vars(seg.zoom) if seg.zoom else None, "prior": vars(seg.prior) if seg.prior else None,
                     "loose_runs": {}, "click_runs": {}}
    for pct in loose:
        at = [r for r in rows if r["loose"] == pct and r["refine"] == first]
        if not clicks:
            summary["loose_runs"][f"{pct:g}"] = summarise(at)
        else:
            for method in refine:
                summary["click_runs"][f"{method}, loose {pct:g}%"] = summarise_clicks(
                    [r for r in rows if r["loose"] == pct and r["refine"] == method])
    write_summary(summary, out / "summary.json")
    if clicks:
        curve_plot(summary["click_runs"], out / "dsc_per_click.png")
        for name, run in summary["click_runs"].items():
            o = run["overall"]
            print(f"{name}: mean DSC per click {o['dsc_mean']}, NoC@85 {o['noc85_mean']}, NoC@90 {o['noc90_mean']}")
    else:
        box_plot([r for r in rows if r["loose"] == loose[-1]], out / "dsc_boxplot.png")
        for pct, run in summary["loose_runs"].items():
            print(f"loose {pct}%: DSC median {run['overall']['model']['dsc_median']:.3f} mean "
                  f"{run['overall']['model']['dsc_mean']:.3f} (filled box {run['overall']['box']['dsc_median']:.3f}), "
                  f"n={run['overall']['model']['n']}")
    return summary


# ---- 3D: key-slice boxes added on the worst slice, or in the largest gap ----------------------
def worst_slice(pred: np.ndarray, gt: np.ndarray, candidates: Iterable[int]) -> int | None:
    """Of the `candidates` slices (where the object is), the one with the lowest slice DSC; ties: the
    one with the most missed plus extra voxels, then the lowest index. None without candidates."""
    def badness(k: int) -> tuple[float, int, int]:
        p, g = pred[k].astype(bool), gt[k].astype(bool)
        total = int(p.sum() + g.sum())
        score = 2 * int((p & g).sum()) / total if total else 1.0
        return score, -int((p ^ g).sum()), k

    return min(candidates, key=badness, default=None)


def gap_slice(boxed: Iterable[int], candidates: Iterable[int]) -> int | None:
    """The slice an annotator who does not know the truth boxes next: the middle of the largest gap
    between two boxed slices (ties: the lowest gap), or the `candidates` slice nearest to it inside
    that gap (ties: the lower one); None when no candidate lies between two boxed slices."""
    keys, pool = sorted(boxed), sorted(candidates)
    gaps = [(a, b) for a, b in zip(keys, keys[1:]) if any(a < k < b for k in pool)]
    if not gaps:
        return None
    a, b = max(gaps, key=lambda gap: (gap[1] - gap[0], -gap[0]))
    return min((k for k in pool if a < k < b), key=lambda k: (abs(2 * k - a - b), k))


# where `--add-boxes` puts each box: (the run's name, the plot's words)
NEXT_SLICE = {"worst": ("worst-slice boxes", "on the worst slice"), "gap": ("gap boxes", "in the largest gap")}


def boxes_needed(row: dict, threshold: float) -> int:
    """Key-slice boxes (initial plus added) until the volume DSC first reaches `threshold`; an object
    that never does counts one box more than the run allows (initial + N + 1)."""
    reached = next((i for i, value in enumerate(row["curve"]) if value >= threshold), len(row["curve"]))
    return row["keys"] + reached


def _eval_key_boxes(seg: Segmenter, case: Case, keys: int, add_boxes: int, every: int,
                    next_slice: str = "worst") -> Iterator[dict]:
    """Per object: tight boxes on `keys` key slices, then up to `add_boxes` tight boxes each on the
    worst slice without a box (`next_slice` "worst", an oracle) or in the largest gap between boxed
    slices ("gap", `gap_slice`), re-segmenting after each; the curve holds the volume DSC after 0..N
    added boxes (the last value repeated once no slice is left to box)."""
    for index, (volume, value, gt, slices) in enumerate(_objects_3d(case)):
        chosen = key_slices(slices, gt, keys)
        if index % every or not chosen:
            continue
        boxes = {k: mask_box(gt[k]) for k in chosen}
        row, pred = segment_keys(seg, case, volume, value, gt, boxes)  # type: ignore[arg-type]
        usable, curve, added = usable_slices(slices, gt), [row["dsc"]], []
        for _ in range(add_boxes):
            free = [s for s in usable if s not in boxes]
            k = worst_slice(pred, gt, free) if next_slice == "worst" else gap_slice(boxes, free)
            if k is not None:
                boxes[k] = mask_box(gt[k])  # type: ignore[assignment]
                added.append(k)
                pred = seg.segment(volume, [KeySlicesPrompt(boxes)]).label > 0
            curve.append(dsc(pred, gt) if k is not None else curve[-1])
        yield {**row, "keys": len(chosen), "curve": curve, "added": added}


KEY_COLUMNS = ["image", "label", "name", "keys", "dsc", "nsd", "box_dsc", "box_nsd", "box_side_model_px"]


def _write_key_csv(rows: list[dict], add_boxes: int, path: Path) -> None:
    columns = KEY_COLUMNS + [f"dsc_box{i}" for i in range(1, add_boxes + 1)] + \
        [f"boxes{int(t * 100)}" for t in THRESHOLDS] + ["added_slices"]
    with staged(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            cells = {c: (f"{v:.4f}" if isinstance(v, float) and c != "box_side_model_px" else v) for c, v in row.items()}
            cells.update({f"dsc_box{i}": f"{v:.4f}" for i, v in enumerate(row["curve"][1:], 1)})
            cells.update({f"boxes{int(t * 100)}": boxes_needed(row, t) for t in THRESHOLDS})
            cells["added_slices"] = ";".join(str(k) for k in row["added"])
            writer.writerow(cells)


def evaluate_key_boxes(datastore: str | Path, out: str | Path, keys: int = 3, add_boxes: int = 4,
                       model: str = "medsam-lite", checkpoint: str | None = None, device: str | None = None,
                       zoom: bool = True, prior: bool = True, limit: int | None = None,
                       images: Sequence[str] | None = None, every: int = 1, next_slice: str = "worst") -> dict:
    """3D annotation effort: tight boxes on `keys` key slices per object, then up to `add_boxes` more,
    each on the object's worst slice or in the largest gap (`next_slice`, see `_eval_key_boxes`);
    writes per_case.csv, summary.json (volume DSC after each added box, boxes to 0.85 / 0.90, share
    never reaching) and dsc_per_box.png in `out`."""
    if add_boxes < 1 or keys < 1 or every < 1:
        raise EngineInputError("--add-boxes, --keys and --every must be at least 1")
    if next_slice not in NEXT_SLICE:
        raise EngineInputError(f"--next must be one of {', '.join(NEXT_SLICE)}, got {next_slice!r}")
    cases = [c for c in list_cases(datastore) if not images or c.image_id in images][:limit]
    out, seg, names = eval_setup(datastore, out, cases, model, checkpoint, device, zoom, prior)
    rows = collect_rows(cases, names, lambda case: _eval_key_boxes(seg, case, keys, add_boxes, every, next_slice),
                       datastore)
    _write_key_csv(rows, add_boxes, out / "per_case.csv")
    added, where = NEXT_SLICE[next_slice]
    run_name = f"{keys} key slices + {added}"
    summary = {"model": seg.model.version, "mode": "3d-keys", "keys": keys, "add_boxes": add_boxes, "every": every,
               "next": next_slice,
               "zoom": vars(seg.zoom) if seg.zoom else None, "prior": vars(seg.prior) if seg.prior else None,
               "initial": summarise(rows), "box_runs": {run_name: summarise_clicks(rows, boxes_needed, "boxes")}}
    write_summary(summary, out / "summary.json")
    curve_plot(summary["box_runs"], out / "dsc_per_box.png",
               xlabel=f"key-slice boxes added {where} (after {keys} initial)")
    o = summary["box_runs"][run_name]["overall"]
    print(f"{run_name}: mean volume DSC per added box {o['dsc_mean']}, boxes to 0.85 {o['boxes85_mean']} "
          f"(never {o['boxes85_failed']:.0%}), to 0.90 {o['boxes90_mean']} (never {o['boxes90_failed']:.0%})")
    return summary
