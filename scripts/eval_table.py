"""Print Markdown tables from `main.py eval` summaries (per organ and per box size; model vs filled box).

    python scripts/eval_table.py out/eval-2d/summary.json [--compare out/eval-2d-plain/summary.json]
        [--compare-name "DSC plain"] [--min-n 5]

Summaries of `--loose` runs print the loose levels side by side; of `--clicks` runs, mean DSC after
each click and NoC@85 / NoC@90 per image and organ; of `--mode 3d-keys --add-boxes N` runs, mean volume
DSC after each added key-slice box and the mean boxes (initial + added) to reach 0.85 / 0.90, an object
that never does counted as initial + N + 1, with the share that never does. With `--compare`, the
mean DSC of both and the organs (in 3d, each object) higher or lower in the first run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


MISSING = {"model": {"dsc_median": float("nan")}}


def row(name: str, stats: dict, extra: dict | None = None) -> str:
    model, box = stats["model"], stats["box"]
    cells = [name, str(model["n"]), f"{model['dsc_median']:.3f}", f"{box['dsc_median']:.3f}",
             f"{model['nsd_median']:.3f}", f"{box['nsd_median']:.3f}"]
    if extra is not None:
        cells.append(f"{extra['model']['dsc_median']:.3f}")
    return "| " + " | ".join(cells) + " |"


def loose_tables(summary: dict, min_n: int) -> None:
    """DSC median (mean) per image and organ, one column per loose level."""
    runs = summary["loose_runs"]
    levels = list(runs)
    heads = " | ".join("tight" if float(p) == 0 else f"loose {p} %" for p in levels)
    for section in ("overall", "per_image", "per_size", "per_organ"):  # per_size: each level's own box side
        print(f"| {section.replace('per_', '')} | n | {heads} | filled box ({levels[-1]} %) |")
        print("|---" * (3 + len(levels)) + "|")
        names = ["overall"] if section == "overall" else list(runs[levels[0]][section])
        for name in names:
            stats = [runs[p]["overall"] if section == "overall" else runs[p][section].get(name) for p in levels]
            if any(s is None for s in stats) or stats[0]["model"]["n"] < min_n:
                continue
            cells = [f"{s['model']['dsc_median']:.3f} ({s['model']['dsc_mean']:.3f})" for s in stats]
            print(f"| {name} | {stats[0]['model']['n']} | " + " | ".join(cells) +
                  f" | {stats[-1]['box']['dsc_median']:.3f} |")
        print()


def curve_tables(runs: dict, steps: int, step_head: str, low_name: str, columns: list[tuple[str, str]],
                 min_n: int) -> None:
    """Mean DSC after 0..`steps` interactions, then `columns` (head, stats key; keys ending in
    "_failed" print as a share) per group, one table per run."""
    for run_name, run in runs.items():
        print(f"**{run_name}**\n")
        print("| group | n | " + " | ".join(f"DSC {step_head}{i}" for i in range(steps + 1)) + " | " +
              " | ".join(head for head, _ in columns) + " |")
        print("|---" * (steps + 3 + len(columns)) + "|")
        groups = [("overall", run["overall"])]
        if run["start_below_0.8"]:
            groups.append((low_name, run["start_below_0.8"]))
        groups += list(run["per_image"].items()) + list(run["per_organ"].items())
        for name, stats in groups:
            if stats["n"] < min_n:
                continue
            cells = [f"{stats[key]:.0%}" if key.endswith("_failed") else f"{stats[key]:.2f}" for _, key in columns]
            print(f"| {name} | {stats['n']} | " + " | ".join(f"{v:.3f}" for v in stats["dsc_mean"]) + " | " +
                  " | ".join(cells) + " |")
        print()


def click_tables(summary: dict, min_n: int) -> None:
    """Mean DSC after 0..N clicks and NoC per image and organ, one table per refinement run."""
    curve_tables(summary["click_runs"], summary["clicks"], "", "box DSC < 0.8",
                 [("NoC@85", "noc85_mean"), ("NoC@90", "noc90_mean"), ("never 90", "noc90_failed")], min_n)


def box_tables(summary: dict, min_n: int) -> None:
    """Mean volume DSC after 0..N added key-slice boxes and the boxes needed for 0.85 / 0.90."""
    print(f"model {summary['model']}, {summary['keys']} initial key slices, up to {summary['add_boxes']} added\n")
    curve_tables(summary["box_runs"], summary["add_boxes"], "+", "initial DSC < 0.8",
                 [("boxes@85", "boxes85_mean"), ("never 85", "boxes85_failed"), ("boxes@90", "boxes90_mean"),
                  ("never 90", "boxes90_failed")], min_n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path)
    parser.add_argument("--compare", type=Path, help="a second summary (e.g. --no-zoom --no-prior) shown as a last column")
    parser.add_argument("--compare-name", default="DSC plain", help="head of that column")
    parser.add_argument("--min-n", type=int, default=5, help="organs with fewer cases are left out")
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
    if summary.get("box_runs"):
        return box_tables(summary, args.min_n)
    if summary.get("click_runs"):
        return click_tables(summary, args.min_n)
    if summary.get("loose_runs"):
        return loose_tables(summary, args.min_n)
    other = json.loads(args.compare.read_text()) if args.compare else None
    extra_head = f" {args.compare_name} |" if other else ""
    print(f"model {summary['model']}, mode {summary['mode']}, jitter {summary['jitter']}\n")
    for section in ("per_image", "per_size", "per_image_size", "per_organ"):
        print(f"| {section[4:].replace('_', ' + ')} | n | DSC | DSC box | NSD | NSD box |{extra_head}")
        print("|---" * (6 + bool(other)) + "|")
        for name, stats in summary[section].items():
            if stats["model"]["n"] >= args.min_n:
                print(row(name, stats, other[section].get(name, MISSING) if other else None))
        print()
    print(row("overall", summary["overall"], other["overall"] if other else None))
    if other:
        print(paired(summary, other, args.compare_name))


def paired(summary: dict, other: dict, other_name: str) -> str:
    """Mean DSC of both runs and the organs (in 3d: the objects) whose median DSC is higher or lower
    than in the other run by more than 0.01."""
    pairs = [(stats["model"]["dsc_median"], other["per_organ"][name]["model"]["dsc_median"])
             for name, stats in summary["per_organ"].items() if name in other["per_organ"]]
    better = sum(a > b + 0.01 for a, b in pairs)
    worse = sum(a < b - 0.01 for a, b in pairs)
    return (f"\nmean DSC {summary['overall']['model']['dsc_mean']:.3f} ({other_name}: "
            f"{other['overall']['model']['dsc_mean']:.3f}); of {len(pairs)} organs, {better} higher and {worse} lower "
            f"than {other_name} by more than 0.01")


if __name__ == "__main__":
    main()
