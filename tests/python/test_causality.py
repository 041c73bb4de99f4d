"""Causal always wins: no causal query sees a later key, sinks included, in every kernel.

Each test changes one key (its k and v rows) at a time and checks that every query before it
gives a bitwise identical result, while the query at that key's position does change."""

from __future__ import annotations

from typing import Callable

import foveal
import numpy as np
import pytest

LENGTH, HEADS_Q, HEADS_KV, DIM = 9, 4, 2, 16


def _inputs(rng, dtype):
    q = rng.standard_normal((1, HEADS_Q, LENGTH, DIM)).astype(dtype)
    k = rng.standard_normal((1, HEADS_KV, LENGTH, DIM)).astype(dtype)
    v = rng.standard_normal((1, HEADS_KV, LENGTH, DIM)).astype(dtype)
    u = rng.standard_normal((1, HEADS_KV, LENGTH)).astype(dtype)
    return q, k, v, u


def _decode(q, k, v, **options):
    """All LENGTH queries (Lq > 1) at once over a KV cache holding the LENGTH keys."""
    cache = foveal.KVCache(1, HEADS_KV, LENGTH, DIM, dtype=q.dtype.name)
    cache.append(k, v)
    return foveal.decode_attention(q, cache, **options)


KERNELS: dict[str, Callable] = {
    "dense": lambda q, k, v, u: foveal.attention(
        q, k, v, causal=True, window_left=2, sink_tokens=4
    ),
    "dense-unbounded": lambda q, k, v, u: foveal.attention(q, k, v, causal=True, sink_tokens=6),
    "window-right-0": lambda q, k, v, u: foveal.attention(
        q, k, v, window_left=1, window_right=0, sink_tokens=5
    ),
    "sliding-window": lambda q, k, v, u: foveal.sliding_window_attention(
        q, k, v, window_left=2, causal=True, sink_tokens=4
    ),
    "decode": lambda q, k, v, u: _decode(q, k, v, causal=True, window_left=2, sink_tokens=4),
    "sparsek": lambda q, k, v, u: foveal.sparsek_attention(
        q, k, v, u, 2, window=2, sink_tokens=4, causal=True
    ),
    "registry-dense": lambda q, k, v, u: foveal.make_attention(
        "dense", causal=True, window_left=2, sink_tokens=4
    )(q, k, v),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_no_causal_query_sees_a_later_key(kernel, dtype):
    rng = np.random.default_rng(7)
    q, k, v, u = _inputs(rng, dtype)
    run = KERNELS[kernel]
    base = np.asarray(run(q, k, v, u))
    for key in range(LENGTH):
        k2, v2 = k.copy(), v.copy()
        k2[:, :, key] += 5
        v2[:, :, key] += 5
        changed = np.asarray(run(q, k2, v2, u))
        assert np.array_equal(changed[:, :, :key], base[:, :, :key]), (
            f"{kernel}: a query before position {key} changed when key {key} changed"
        )
        assert not np.array_equal(changed[:, :, key], base[:, :, key]), (
            f"{kernel}: the query at position {key} does not see its own key"
        )


def test_the_reported_leak():
    """attention(q, k, v, causal=True, window_left=2, sink_tokens=4): query 0's output must not
    depend on key 3's value."""
    rng = np.random.default_rng(0)
    q, k, v, _ = _inputs(rng, np.float32)
    before = foveal.attention(q, k, v, causal=True, window_left=2, sink_tokens=4)
    v[:, :, 3] = 100.0
    after = foveal.attention(q, k, v, causal=True, window_left=2, sink_tokens=4)
    assert np.array_equal(before[:, :, 0], after[:, :, 0])


def test_non_causal_sinks_stay_visible_to_every_query():
    """Without a right edge, sinks are visible from every position (window_left only)."""
    rng = np.random.default_rng(1)
    q, k, v, _ = _inputs(rng, np.float64)
    out = foveal.attention(q, k, v, window_left=0, q_offset=0, sink_tokens=3)
    v2 = v.copy()
    v2[:, :, 2] += 1
    changed = foveal.attention(q, k, v2, window_left=0, q_offset=0, sink_tokens=3)
    assert not np.array_equal(out[:, :, 0], changed[:, :, 0])
