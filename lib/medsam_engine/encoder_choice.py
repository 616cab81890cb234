"""The CPU default encoder, `ov-auto`: of OpenVINO fp32 and `ov-mixed`, the faster on this machine.

OpenVINO's bf16 hint is faster than its fp32 on some CPUs and slower on others (README "Bench": an
AMD EPYC and an Intel Xeon), so the choice is timed: at the first encode, interleaved rounds of
each candidate, and `ov-mixed` is kept only when it takes at most `MIXED_SHARE` of fp32's time (its
bf16 tail moves embeddings a little, so a tie goes to fp32). The choice is remembered on disk beside
the graphs, per model (not per weights: fine-tuned weights run at the same speed), input shape,
OpenVINO version, CPU and thread count, so a restart or a newly published checkpoint builds only the
chosen backend.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median
from typing import Callable, Sequence

import torch

from .atomicio import atomic_write
from .timing import interleaved_ms

logger = logging.getLogger(__name__)

AUTO = "ov-auto"
MIXED_SHARE = 0.9  # ov-mixed's time at most this share of ov-fp32's to be chosen
ROUNDS = 5


@dataclass(frozen=True)
class Choice:
    """A timed choice: the backend kept, the median ms of each candidate, and where it was timed."""

    chosen: str
    ms: dict[str, float]
    machine: str


def choice_path(cache_dir: Path, version: str, shape: tuple[int, ...], ov_version: str) -> Path:
    """Where the choice for the model of weights `version` ("name@hash") at input `shape` is remembered."""
    name = version.partition("@")[0]
    return cache_dir / f"{name}.choice_{'x'.join(map(str, shape))}_ov{ov_version.split('-')[0]}.json"


def read_choice(path: Path, machine: str, candidates: Sequence[str]) -> Choice | None:
    """The remembered choice, if it was made on this machine among these candidates."""
    try:
        data = json.loads(path.read_text())
        choice = Choice(data["chosen"], dict(data["ms"]), data["machine"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if choice.machine != machine or choice.chosen not in candidates or set(choice.ms) != set(candidates):
        return None
    return choice


def decide(ms: dict[str, float]) -> str:
    """`ov-mixed` when timed and at most MIXED_SHARE of `ov-fp32`'s time, else the fastest other."""
    if "ov-mixed" in ms and "ov-fp32" in ms:
        return "ov-mixed" if ms["ov-mixed"] <= MIXED_SHARE * ms["ov-fp32"] else "ov-fp32"
    return min(ms, key=ms.__getitem__)


def choose(build: Callable[[str], object], candidates: Sequence[str], shape: tuple[int, ...], record: Path,
           machine: str, rounds: int = ROUNDS) -> tuple[str, object]:
    """(name, backend) of the candidate to use: the remembered one, else each built by `build` (one
    that fails is left out, logged; none left raises the last error), timed on a zero input of
    `shape` (`rounds` interleaved rounds after a warm-up), the choice logged and remembered."""
    remembered = read_choice(record, machine, candidates)
    if remembered is not None:
        return remembered.chosen, build(remembered.chosen)
    built: dict[str, object] = {}
    error: Exception | None = None
    for name in candidates:
        try:
            built[name] = build(name)
        except Exception as exc:  # noqa: BLE001 - a candidate's conversion or compile error of any type
            logger.warning("encoder %s left out of %s (%s: %s)", name, AUTO, type(exc).__name__,
                           (str(exc).splitlines() or [""])[0])
            error = exc
    if not built:
        raise error or RuntimeError(f"no {AUTO} candidate")
    image = torch.zeros(shape)
    times = interleaved_ms({name: (lambda e=encoder: e(image)) for name, encoder in built.items()}, rounds)
    ms = {name: round(median(values), 1) for name, values in times.items()}
    chosen = decide(ms)
    if set(built) == set(candidates):
        try:
            atomic_write(record, lambda tmp: tmp.write_text(json.dumps(asdict(Choice(chosen, ms, machine)))))
        except OSError as exc:  # a read-only or full cache: choose again next start
            logger.warning("encoder choice not saved to %s: %s", record, exc)
    logger.info("encoder %s: %s (median ms %s on %s)", AUTO, chosen, ms, machine)
    return chosen, built[chosen]
