"""Print Markdown tables from `main.py eval` summaries (per organ and per box size; model vs filled box).

    python scripts/eval_table.py out/eval-2d/summary.json [--compare out/eval-2d-plain/summary.json]
        [--compare-name "DSC plain"] [--min-n 5]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summary", type=Path)
    parser.add_argument("--compare", type=Path, help="a second summary (e.g. --no-zoom --no-prior) shown as a last column")
    parser.add_argument("--compare-name", default="DSC plain", help="head of that column")
    parser.add_argument("--min-n", type=int, default=5, help="organs with fewer cases are left out")
    args = parser.parse_args()
    summary = json.loads(args.summary.read_text())
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


if __name__ == "__main__":
    main()
