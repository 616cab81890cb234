"""Latency measurement for the benches: variants timed interleaved, so drift lands on all of them."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_ms(fns: dict[str, Callable[[], object]], rounds: int,
                   device: torch.device | None = None) -> dict[str, list[float]]:
    """Call each function once per round, round robin (the order rotated each round, so no variant
    always runs right after the same one), after one warm-up round; times in ms per function."""
    names = list(fns)
    for name in names:
        fns[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            _sync(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def p50_ms(fn: Callable[[], object], repeats: int, device: torch.device | None = None) -> float:
    """Median ms of `repeats` calls after one warm-up call."""
    return median(interleaved_ms({"fn": fn}, repeats, device)["fn"])


def rss_mb() -> float | None:
    """This process's resident memory in MB (Linux /proc; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name (as lscpu gives it), else platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"
