"""Threads that do not fight: a call too small to split runs on one thread whatever the thread
setting, so a 2-thread decode step of a small model is not slower than a 1-thread one."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import foveal
import numpy as np
import pytest
from foveal import _core


@pytest.fixture
def default_threshold() -> Any:
    """The work threshold at its default for the test (conftest.py turns it off)."""
    saved = _core._set_min_work_per_thread(_core._MIN_WORK_PER_THREAD)
    yield _core._MIN_WORK_PER_THREAD
    _core._set_min_work_per_thread(saved)


def test_work_per_thread_is_positive_and_negative_values_are_rejected(default_threshold: int):
    assert default_threshold > 0
    with pytest.raises(ValueError, match="work must be >= 0"):
        _core._set_min_work_per_thread(-1)
    assert _core._min_work_per_thread() == default_threshold


def _small_model(rng: np.random.Generator) -> tuple:
    """Four layers of decode attention (Hq = 8, Hkv = 2, D = 64) over 1024 cached tokens."""
    caches, queries = [], []
    for _ in range(4):
        cache = foveal.KVCache(1, 2, 1024, 64, dtype=np.float32)
        k = rng.standard_normal((1, 2, 1024, 64), dtype=np.float32)
        cache.append(k, rng.standard_normal((1, 2, 1024, 64), dtype=np.float32))
        caches.append(cache)
        queries.append(rng.standard_normal((1, 8, 1, 64), dtype=np.float32))
    return caches, queries


def _step(caches: list, queries: list, out: np.ndarray, threads: int) -> None:
    for cache, q in zip(caches, queries):
        foveal.decode_attention(q, cache, out=out, num_threads=threads)


def test_same_bits_with_and_without_the_threshold(rng: np.random.Generator, default_threshold):
    caches, queries = _small_model(rng)
    results = []
    for work in (default_threshold, 0):
        _core._set_min_work_per_thread(work)
        for threads in (1, 2):
            results.append(foveal.decode_attention(queries[0], caches[0], num_threads=threads))
    for result in results[1:]:
        assert np.array_equal(result, results[0])


def _step_times(caches: list, queries: list, out: np.ndarray) -> tuple:
    """The medians of 21 rounds of 10 steps at 1 and at 2 threads, in alternating order."""
    times = {1: [], 2: []}
    for threads in (1, 2):  # warm-up: the thread pool and the caches
        _step(caches, queries, out, threads)
    for round_index in range(21):
        for threads in (1, 2) if round_index % 2 == 0 else (2, 1):
            start = time.perf_counter()
            for _ in range(10):
                _step(caches, queries, out, threads)
            times[threads].append(time.perf_counter() - start)
    return statistics.median(times[1]), statistics.median(times[2])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_two_thread_decode_of_a_small_model_is_not_slower(
    rng: np.random.Generator, default_threshold
):
    # A relative check, not a timing: the 1- and 2-thread steps alternate, so machine load hits
    # both alike, their medians are compared with a generous margin, and a burst of load gets
    # two more tries. Without the threshold, 2 threads are several times slower here on a
    # busy machine (docs/benchmarks.md#threads-for-small-calls).
    caches, queries = _small_model(rng)
    out = np.empty((1, 8, 1, 64), dtype=np.float32)
    tries = []
    for _ in range(3):
        one, two = _step_times(caches, queries, out)
        tries.append(f"2 threads {two * 1e3:.2f} ms vs 1 thread {one * 1e3:.2f} ms")
        if two <= 1.3 * one:
            return
    pytest.fail("; ".join(tries))
