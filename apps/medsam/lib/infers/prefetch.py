"""Background encoding of an open image's slices, so the first box on a new slice only decodes."""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from medsam_engine import Segmenter
from medsam_engine.imageio import Volume
from medsam_engine.preprocess import Normaliser

logger = logging.getLogger(__name__)

# Nice value of the background encoder: a request's thread gets ~90% of a core it shares with it;
# not 19, which on a machine busy with other work would leave it almost no CPU at all.
BACKGROUND_NICE = 10


@dataclass
class _Job:
    segmenter: Segmenter
    volume: Volume
    normaliser: Normaliser
    slices: list[int]  # in encoding order

    def pending(self) -> int | None:
        for k in self.slices:
            if not self.segmenter.is_cached(self.volume, k, self.normaliser):
                return k
        return None

    def encoded(self) -> int:
        return sum(self.segmenter.is_cached(self.volume, k, self.normaliser) for k in self.slices)


def _lowest_priority() -> None:
    """Make the calling thread the CPU's last choice (Linux applies a thread id's nice value to that
    thread alone), so a request's decode is not slowed by a background encode running beside it."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)
    except (AttributeError, OSError):  # not Linux, or not permitted: keep the default priority
        logger.info("background encoding runs at normal priority")


class Prefetcher:
    """One daemon thread that encodes the slices of the image last asked for, nearest the user's
    slice first, with the intensity preprocessing that request used.

    It yields to requests: a slice is started only when no request is running and none has ended
    in the last `idle_s` seconds, so on a CPU a box waits at most for one slice being encoded.
    """

    def __init__(self, max_slices: int, idle_s: float = 0.25) -> None:
        self.max_slices = max_slices
        self.idle_s = idle_s
        self._cond = threading.Condition()
        self._job: _Job | None = None
        self._active = 0
        self._last_request = 0.0
        self._thread: threading.Thread | None = None

    @contextmanager
    def request(self) -> Iterator[None]:
        """Mark a request in flight: background encoding pauses until it is over."""
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                self._last_request = time.monotonic()
                self._cond.notify_all()

    def focus(self, segmenter: Segmenter, volume: Volume, normaliser: Normaliser, k: int) -> None:
        """Encode `volume`'s slices around slice k from now on (replaces the previous image's job)."""
        if self.max_slices <= 0:
            return
        order = sorted(range(volume.num_slices), key=lambda s: (abs(s - k), s))[: self.max_slices]
        with self._cond:
            self._job = _Job(segmenter, volume, normaliser, order)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="medsam-prefetch", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def status(self) -> dict:
        job = self._job
        if job is None:
            return {"enabled": self.max_slices > 0, "image": None, "encoded": 0, "planned": 0}
        return {"enabled": True, "image": job.volume.key, "preprocessing": job.normaliser.id,
                "encoded": job.encoded(), "planned": len(job.slices)}

    def _next(self) -> tuple[_Job, int]:
        """Block until there is a slice to encode and the server is idle."""
        with self._cond:
            while True:
                job = self._job
                k = job.pending() if job else None
                if k is None:
                    self._cond.wait()
                    continue
                wait = self.idle_s - (time.monotonic() - self._last_request)
                if self._active == 0 and wait <= 0:
                    return job, k  # type: ignore[return-value]
                self._cond.wait(wait if self._active == 0 else None)

    def _run(self) -> None:
        _lowest_priority()
        while True:
            job, k = self._next()
            try:
                job.segmenter.embedding(job.volume, k, job.normaliser)
            except Exception:  # keep serving: a failed background encode only loses the head start
                logger.exception("background encoding of slice %d failed; stopping this image's prefetch", k)
                with self._cond:
                    if self._job is job:
                        self._job = None
