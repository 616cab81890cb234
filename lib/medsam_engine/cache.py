"""A thread-safe LRU cache of image embeddings, bounded in bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


class EmbeddingCache:
    """Maps a key (image, slice, preprocessing, model version) to an embedding tensor.

    Least recently used entries are dropped once the total exceeds `max_bytes`. Concurrent
    requests for the same missing key compute it once: the others wait for that result. With
    `max_computing`, at most that many keys are computed at once (each encode holds the encoder's
    activations and, on a CPU, cores): further misses queue, while hits are answered at once.
    """

    def __init__(self, max_bytes: int = 512 << 20, max_computing: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_computing = max_computing
        self._computing = threading.BoundedSemaphore(max_computing) if max_computing else nullcontext()
        self._entries: OrderedDict[Hashable, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[Hashable, threading.Lock] = {}
        self.stats = CacheStats()

    @staticmethod
    def size_of(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: Hashable) -> torch.Tensor | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: torch.Tensor) -> None:
        size = self.size_of(value)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= self.size_of(old)
            if size > self.max_bytes:
                return
            self._entries[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= self.size_of(dropped)
                self.stats.evictions += 1

    def get_or_compute(self, key: Hashable, compute: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        """Return (embedding, hit). On a miss, `compute` runs once per key even under concurrency."""
        value = self.get(key)
        if value is not None:
            with self._lock:
                self.stats.hits += 1
            return value, True
        with self._lock:
            key_lock = self._pending.setdefault(key, threading.Lock())
        with key_lock:
            value = self.get(key)
            if value is not None:
                with self._lock:
                    self.stats.hits += 1
                return value, True
            try:
                with self._computing:
                    value = compute()
                self.put(key, value)
                with self._lock:
                    self.stats.misses += 1
            finally:
                with self._lock:
                    self._pending.pop(key, None)
            return value, False

    def compute_missing(self, keys: Sequence[Hashable],
                        compute: Callable[[list[Hashable]], list[torch.Tensor]]) -> int:
        """Compute, in one call of `compute`, the keys that are neither cached nor being computed
        elsewhere, and store them; returns how many. Concurrent `get_or_compute` calls for those
        keys wait for this result, as for any other computing key."""
        claimed: list[tuple[Hashable, threading.Lock]] = []
        with self._lock:
            for key in dict.fromkeys(keys):
                if key in self._entries or key in self._pending:
                    continue
                key_lock = threading.Lock()
                key_lock.acquire()
                self._pending[key] = key_lock
                claimed.append((key, key_lock))
        try:
            if claimed:
                with self._computing:
                    values = compute([key for key, _ in claimed])
                for (key, _), value in zip(claimed, values, strict=True):
                    self.put(key, value)
                with self._lock:
                    self.stats.misses += len(claimed)
        finally:
            with self._lock:
                for key, key_lock in claimed:
                    self._pending.pop(key, None)
                    key_lock.release()
        return len(claimed)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
