"""The embedding cache: hits, LRU eviction by bytes, thread safety; and the segmenter's use of it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from engine_helpers import make_volume
from medsam_engine import Segmenter, SlicePrompt
from medsam_engine.cache import EmbeddingCache

KB = 1000  # 250 float32 values


def _tensor(fill: float, nbytes: int = KB) -> torch.Tensor:
    return torch.full((nbytes // 4,), fill, dtype=torch.float32)


def test_hit_miss_and_stats() -> None:
    cache = EmbeddingCache(max_bytes=10 * KB)
    calls: list[str] = []

    def compute(name: str):
        return lambda: calls.append(name) or _tensor(len(calls))

    first, hit1 = cache.get_or_compute("a", compute("a"))
    again, hit2 = cache.get_or_compute("a", compute("a"))
    other, hit3 = cache.get_or_compute("b", compute("b"))
    assert (hit1, hit2, hit3) == (False, True, False)
    assert again is first and calls == ["a", "b"]
    assert float(other[0]) == 2.0
    assert (cache.stats.hits, cache.stats.misses, cache.stats.evictions) == (1, 2, 0)
    assert len(cache) == 2 and cache.nbytes == 2 * KB
    assert "a" in cache and "c" not in cache and cache.get("c") is None


def test_eviction_by_bytes_in_lru_order() -> None:
    cache = EmbeddingCache(max_bytes=3 * KB)
    for name in "abc":
        cache.put(name, _tensor(ord(name)))
    assert cache.nbytes == 3 * KB and cache.stats.evictions == 0
    assert cache.get("a") is not None  # "a" is now the most recently used, "b" the least
    cache.put("d", _tensor(4))
    assert [k for k in "abcd" if k in cache] == ["a", "c", "d"]
    assert cache.stats.evictions == 1 and cache.nbytes == 3 * KB
    cache.put("e", _tensor(5, 2 * KB))  # needs two entries' room: "c" then "a" go
    assert [k for k in "abcde" if k in cache] == ["d", "e"]
    assert cache.stats.evictions == 3 and cache.nbytes == 3 * KB


def test_replacing_a_key_counts_its_bytes_once() -> None:
    cache = EmbeddingCache(max_bytes=3 * KB)
    cache.put("a", _tensor(1))
    cache.put("a", _tensor(2, 2 * KB))
    assert len(cache) == 1 and cache.nbytes == 2 * KB
    assert float(cache.get("a")[0]) == 2.0


def test_tensor_larger_than_the_bound_is_not_stored() -> None:
    cache = EmbeddingCache(max_bytes=3 * KB)
    cache.put("small", _tensor(1))
    cache.put("huge", _tensor(2, 4 * KB))
    assert "huge" not in cache and "small" in cache and cache.nbytes == KB
    assert cache.stats.evictions == 0  # nothing else was pushed out for it
    value, hit = cache.get_or_compute("huge", lambda: _tensor(3, 4 * KB))
    assert not hit and float(value[0]) == 3.0 and "huge" not in cache


def test_clear_empties_the_cache() -> None:
    cache = EmbeddingCache(max_bytes=3 * KB)
    cache.put("a", _tensor(1))
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0 and "a" not in cache


def test_concurrent_get_or_compute_computes_once() -> None:
    cache = EmbeddingCache(max_bytes=10 * KB)
    threads_n = 8
    barrier = threading.Barrier(threads_n)
    calls: list[int] = []
    results: list[tuple[torch.Tensor, bool]] = []
    lock = threading.Lock()

    def compute() -> torch.Tensor:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for every other thread to arrive while this one computes
        return _tensor(7)

    def worker() -> None:
        barrier.wait()
        result = cache.get_or_compute("slice-3", compute)
        with lock:
            results.append(result)

    threads = [threading.Thread(target=worker) for _ in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(calls) == 1
    assert len(results) == threads_n
    assert all(value is results[0][0] for value, _ in results)
    assert sorted(hit for _, hit in results) == [False] + [True] * (threads_n - 1)
    assert (cache.stats.misses, cache.stats.hits) == (1, threads_n - 1)


def test_concurrent_different_keys_each_compute_once() -> None:
    cache = EmbeddingCache(max_bytes=100 * KB)
    counts: dict[int, int] = {}
    lock = threading.Lock()
    barrier = threading.Barrier(12)

    def worker(i: int) -> None:
        key = i % 3
        barrier.wait()

        def compute() -> torch.Tensor:
            with lock:
                counts[key] = counts.get(key, 0) + 1
            time.sleep(0.1)
            return _tensor(key)

        value, _ = cache.get_or_compute(key, compute)
        assert float(value[0]) == key

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert counts == {0: 1, 1: 1, 2: 1}
    assert cache.stats.misses == 3 and cache.stats.hits == 9


def test_a_failed_compute_is_not_cached_and_can_be_retried() -> None:
    cache = EmbeddingCache(max_bytes=10 * KB)

    def boom() -> torch.Tensor:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.get_or_compute("k", boom)
    assert "k" not in cache
    value, hit = cache.get_or_compute("k", lambda: _tensor(1))
    assert not hit and float(value[0]) == 1.0


def test_compute_missing_computes_only_absent_keys_in_one_call() -> None:
    cache = EmbeddingCache(max_bytes=100 * KB)
    cache.put("a", _tensor(1))
    calls: list[list] = []

    def compute(keys: list) -> list[torch.Tensor]:
        calls.append(keys)
        return [_tensor(ord(k)) for k in keys]

    assert cache.compute_missing(["a", "b", "c", "b"], compute) == 2
    assert calls == [["b", "c"]] and float(cache.get("c")[0]) == ord("c") and float(cache.get("a")[0]) == 1
    assert cache.compute_missing(["a", "b"], compute) == 0 and len(calls) == 1
    assert cache.stats.misses == 2


def test_get_or_compute_waits_for_a_batch_computing_its_key() -> None:
    """A key claimed by compute_missing is not computed again by a concurrent get_or_compute, and
    a key already being computed elsewhere is left out of the batch."""
    cache = EmbeddingCache(max_bytes=100 * KB)
    started, batch_keys = threading.Event(), []

    def slow_batch(keys: list) -> list[torch.Tensor]:
        batch_keys.extend(keys)
        started.set()
        time.sleep(0.3)
        return [_tensor(5) for _ in keys]

    batch = threading.Thread(target=cache.compute_missing, args=(["x", "y"], slow_batch))
    batch.start()
    started.wait(5)
    value, hit = cache.get_or_compute("x", lambda: _tensor(-1))  # waits for the batch's value
    batch.join(5)
    assert float(value[0]) == 5 and hit and batch_keys == ["x", "y"]

    release = threading.Event()
    single = threading.Thread(target=cache.get_or_compute, args=("z", lambda: release.wait(5) and _tensor(9)))
    single.start()
    time.sleep(0.1)  # "z" is now being computed by the other thread
    assert cache.compute_missing(["z", "w"], lambda keys: [_tensor(3) for _ in keys]) == 1
    release.set()
    single.join(5)
    assert float(cache.get("z")[0]) == 9 and float(cache.get("w")[0]) == 3


def test_a_failed_batch_stores_nothing_and_frees_its_keys() -> None:
    cache = EmbeddingCache(max_bytes=10 * KB)

    def boom(keys: list) -> list[torch.Tensor]:
        raise RuntimeError("encoder failed")

    with pytest.raises(RuntimeError, match="encoder failed"):
        cache.compute_missing(["k"], boom)
    assert "k" not in cache
    assert cache.compute_missing(["k"], lambda keys: [_tensor(2)]) == 1


# ---- the segmenter's use of the cache ------------------------------------------------------
def _disc_volume(key: str) -> object:
    rng = np.random.default_rng(1)
    array = rng.normal(50, 5, (2, 64, 80)).astype(np.float32)
    yy, xx = np.mgrid[:64, :80]
    array[:, (yy - 30) ** 2 + (xx - 40) ** 2 < 15 ** 2] = 200
    return make_volume(array, key)


def test_second_box_on_a_slice_never_reencodes(tiny_vit_model, monkeypatch: pytest.MonkeyPatch) -> None:
    encodes: list[int] = []
    original = tiny_vit_model.encode
    monkeypatch.setattr(tiny_vit_model, "encode", lambda image: encodes.append(1) or original(image))  # a counter
    segmenter = Segmenter(tiny_vit_model, EmbeddingCache(max_bytes=64 << 20))
    volume = _disc_volume("cache-disc")
    first = segmenter.segment(volume, [SlicePrompt([20, 10, 60, 50], slice=0)], modality="MR")
    second = segmenter.segment(volume, [SlicePrompt([25, 15, 55, 45], slice=0, label=2)], modality="MR")
    assert (first.cache_misses, first.cache_hits) == (1, 0)
    assert (second.cache_misses, second.cache_hits) == (0, 1)
    assert len(encodes) == 1
    # another slice, or another preprocessing of the same slice, is a new embedding
    third = segmenter.segment(volume, [SlicePrompt([20, 10, 60, 50], slice=1)], modality="MR")
    fourth = segmenter.segment(volume, [SlicePrompt([20, 10, 60, 50], slice=0)], modality="CT", window="lung")
    assert third.cache_misses == 1 and fourth.cache_misses == 1 and len(encodes) == 3
    # two boxes in one call on one slice: one embedding
    both = segmenter.segment(volume, [SlicePrompt([20, 10, 60, 50], slice=1, label=1),
                                      SlicePrompt([30, 20, 50, 40], slice=1, label=2)], modality="MR")
    assert (both.cache_misses, both.cache_hits) == (0, 2) and len(encodes) == 3


def test_cache_key_includes_the_model_version(tiny_vit_model, lite_model) -> None:
    cache = EmbeddingCache(max_bytes=64 << 20)
    assert Segmenter(tiny_vit_model, cache).cache is cache  # an empty cache given is the one used
    volume = _disc_volume("cache-versions")
    prompt = [SlicePrompt([20, 10, 60, 50], slice=0)]
    tiny = Segmenter(tiny_vit_model, cache).segment(volume, prompt, modality="MR")
    lite = Segmenter(lite_model, cache).segment(volume, prompt, modality="MR")
    assert tiny.cache_misses == 1 and lite.cache_misses == 1 and len(cache) == 2
    assert tiny.model != lite.model
