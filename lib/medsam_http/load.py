"""Load on a real server: concurrent clients sending box requests on several images.

    python -m medsam_http.load --json out/load.json [--clients 8] [--requests 50] [--cache-mb 64]

The medsam app runs on a temporary copy of the datastore with a small embedding cache, so that
the requests evict. Each client (a thread with its own HTTP session) sends `requests` Slicer-style
box requests (JSON reply): with probability `hot` on one of a few "hot" slices per image (cached
after their first request, as when annotators work on the same slices), else on any slice of
any image (mostly not cached: encoded, and evicting). A reply with `cache.misses == 0` counts as
cached. A monitor polls GET /info/ (the embedding cache's bytes and bound) and the server
process's resident memory every `poll_s` seconds.

Figures: errors (must be 0), p50/p95 round-trip latency of cached and uncached requests,
throughput, the server's RSS after warm-up, at the end and at its peak, and the cache's peak
bytes against its bound (must not exceed it). Exit status 1 when a bound is missed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import requests

from .bench import _boxes, _jitter
from .server import ROOT, LabelServer

IMAGES = ("ct_512", "ct_3mm", "mr_3mm")


@dataclass
class Outcome:
    ms: float
    cached: bool | None = None  # None: the request failed
    error: str = ""


@dataclass
class Monitor:
    """Samples GET /info/ (cache bytes) and the server's RSS in a thread until stopped."""

    server: LabelServer
    poll_s: float
    cache_bytes: list[int] = field(default_factory=list)
    max_bytes: int = 0
    rss: list[int] = field(default_factory=list)
    errors: int = 0

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load-monitor", daemon=True)

    def sample(self) -> None:
        self.rss.append(server_rss(self.server))
        try:
            cache = requests.get(f"{self.server.url}/info/", timeout=30).json()["models"]["medsam"]["medsam"]["models"]["cache"]
        except (requests.RequestException, KeyError, ValueError):
            self.errors += 1
            return
        self.cache_bytes.append(int(cache["bytes"]))
        self.max_bytes = int(cache["max_bytes"])

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.sample()

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def server_rss(server: LabelServer) -> int:
    """Resident memory of the server process, in bytes."""
    return psutil.Process(server.process.pid).memory_info().rss  # type: ignore[union-attr]


def _request(session: requests.Session, url: str, image: str, box: list[int], k: int) -> Outcome:
    params = {"roi": [box[0], box[2], box[1], box[3], k, k], "foreground": [], "background": [], "label": "liver"}
    start = time.perf_counter()
    try:
        response = session.post(f"{url}/infer/medsam", params={"image": image, "output": "json"},
                                files={"params": (None, json.dumps(params))}, timeout=600)
        ms = (time.perf_counter() - start) * 1000
        if response.status_code != 200:
            return Outcome(ms, error=f"{response.status_code}: {response.text[:200]}")
        reply = response.json()
        if reply["cache"]["bytes"] > reply["cache"]["max_bytes"]:
            return Outcome(ms, error=f"cache over its bound: {reply['cache']}")
        if not reply["objects"] or reply["objects"][0]["slices"] != [k, k]:
            return Outcome(ms, error=f"unexpected reply: {str(reply)[:200]}")
        return Outcome(ms, cached=reply["cache"]["misses"] == 0)
    except (requests.RequestException, ValueError, KeyError) as exc:
        return Outcome((time.perf_counter() - start) * 1000, error=f"{type(exc).__name__}: {exc}")


def _plan(boxes: dict[str, dict[int, list[int]]], client: int, count: int, hot: float,
          hot_slices: int) -> list[tuple[str, int, list[int]]]:
    """The (image, slice, box) requests of one client, drawn with its own seed."""
    rng = random.Random(client)
    hot_set = []
    for image, per_slice in boxes.items():
        middle = len(per_slice) // 2
        hot_set += [(image, k) for k in range(middle, middle + hot_slices)]
    every = [(image, k) for image, per_slice in boxes.items() for k in per_slice]
    plan = []
    for i in range(count):
        image, k = rng.choice(hot_set) if rng.random() < hot else rng.choice(every)
        plan.append((image, k, _jitter(boxes[image][k], client * count + i)))
    return plan


def _percentiles(values: list[float]) -> dict[str, float | int]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(float(np.percentile(values, 50)), 1),
            "p95_ms": round(float(np.percentile(values, 95)), 1), "max_ms": round(max(values), 1)}


def measure(datastore: Path, clients: int = 8, requests_per_client: int = 50, cache_mb: int = 64,
            hot: float = 0.6, hot_slices: int = 2, conf: dict[str, str] | None = None, poll_s: float = 0.5) -> dict:
    """Start a server on a copy of `datastore`, run the load, return the figures."""
    with tempfile.TemporaryDirectory(prefix="medsam-load-") as tmp:
        studies = Path(tmp) / "studies"
        shutil.copytree(datastore, studies)
        boxes = {image: _boxes(studies, image)[1] for image in IMAGES if (studies / f"{image}.nii.gz").exists()}
        plans = [_plan(boxes, c, requests_per_client, hot, hot_slices) for c in range(clients)]
        server_conf = {**(conf or {}), "cache_mb": str(cache_mb)}
        with LabelServer(studies, Path(tmp) / "server.log", conf=server_conf) as server:
            rss_idle = server_rss(server)
            warm = requests.Session()
            for image, per_slice in boxes.items():  # load each image once: the run measures boxes, not reads
                k = len(per_slice) // 2
                outcome = _request(warm, server.url, image, per_slice[k], k)
                if outcome.error:
                    raise RuntimeError(f"warm-up request failed: {outcome.error}\n{server.log_tail()}")

            def client(plan: list[tuple[str, int, list[int]]]) -> list[Outcome]:
                session = requests.Session()
                return [_request(session, server.url, image, box, k) for image, k, box in plan]

            with Monitor(server, poll_s) as monitor:
                rss_before = monitor.rss[0] if monitor.rss else server_rss(server)
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=clients) as pool:
                    outcomes = [o for result in pool.map(client, plans) for o in result]
                wall_s = time.perf_counter() - started
            rss_after = server_rss(server)
            alive = server.alive()
    errors = [o.error for o in outcomes if o.error]
    peak_cache = max(monitor.cache_bytes, default=0)
    return {
        "load_clients": clients, "load_requests": len(outcomes), "load_images": list(boxes),
        "load_errors": len(errors), "load_error_examples": errors[:5], "load_server_alive": alive,
        "load_wall_s": round(wall_s, 1), "load_throughput_rps": round(len(outcomes) / wall_s, 2),
        "load_all": _percentiles([o.ms for o in outcomes if not o.error]),
        "load_cached": _percentiles([o.ms for o in outcomes if o.cached is True]),
        "load_uncached": _percentiles([o.ms for o in outcomes if o.cached is False]),
        "load_rss_idle_mb": round(rss_idle / 2**20, 1), "load_rss_before_mb": round(rss_before / 2**20, 1),
        "load_rss_after_mb": round(rss_after / 2**20, 1), "load_rss_peak_mb": round(max(monitor.rss + [rss_after]) / 2**20, 1),
        "load_cache_peak_mb": round(peak_cache / 2**20, 1), "load_cache_bound_mb": round(monitor.max_bytes / 2**20, 1),
        "load_cache_samples": len(monitor.cache_bytes), "load_monitor_errors": monitor.errors,
        "load_bounds_met": not errors and alive and monitor.max_bytes > 0 and peak_cache <= monitor.max_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="merge the figures into this JSON file")
    parser.add_argument("--datastore", type=Path, default=ROOT / "sample-datasets" / "totalseg")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=50, help="per client")
    parser.add_argument("--cache-mb", type=int, default=64)
    parser.add_argument("--hot", type=float, default=0.6, help="share of requests on the hot slices")
    parser.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                        help="server option, as `main.py serve --conf`")
    args = parser.parse_args(argv)
    results = measure(args.datastore, args.clients, args.requests, args.cache_mb, args.hot, conf=dict(args.conf))
    for key, value in results.items():
        print(f"{key:24s} {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        merged = json.loads(args.json.read_text()) if args.json.exists() else {}
        merged.update(results)
        args.json.write_text(json.dumps(merged, indent=2) + "\n")
    return 0 if results["load_bounds_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
