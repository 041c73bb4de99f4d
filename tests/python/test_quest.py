"""KVCache page bounds and foveal.quest_decode_attention against float64 numpy references
(docs/sparse_attention.md): bounds are the min / max of each page's stored keys; Quest keeps the
local pages, then the pages with the largest bound of q.k, and attends over them and the sinks.
"""

from __future__ import annotations

import math

import foveal
import numpy as np
import pytest
from conftest import bfloat16_toward


def stored_positions(cache, b):
    """{row: position} of sequence b (ring buffers wrap)."""
    length = cache.lengths[b]
    first = cache.first_retained(b)
    rows = {}
    for position in range(length):
        if position < cache.sink_tokens or position >= first:
            if cache.ring and position >= cache.sink_tokens:
                row = cache.sink_tokens + (position - cache.sink_tokens) % (
                    cache.capacity - cache.sink_tokens
                )
            else:
                row = position
            rows[row] = position
    return rows


def reference_bounds(cache, keys_by_position):
    batch, heads_kv = cache.batch, cache.heads_kv
    pages = -(-cache.capacity // cache.page_size)
    low = np.full((batch, heads_kv, pages, cache.dim), np.inf)
    high = np.full((batch, heads_kv, pages, cache.dim), -np.inf)
    for b in range(batch):
        for row, position in stored_positions(cache, b).items():
            page = row // cache.page_size
            key = keys_by_position[b][position]  # [Hkv, D]
            low[b, :, page] = np.minimum(low[b, :, page], key)
            high[b, :, page] = np.maximum(high[b, :, page], key)
    if cache.page_bounds.dtype != np.float64:  # kept in bfloat16, rounded outward
        low, high = bfloat16_toward(low, False), bfloat16_toward(high, True)
    return np.stack([low, high], axis=3)


@pytest.mark.parametrize("ring", [False, True])
def test_bounds_follow_appends_truncates_and_resets(ring, rng):
    capacity = 90 if ring else 200
    cache = foveal.KVCache(
        2, 2, capacity, 8, ring=ring, sink_tokens=3 if ring else 0, page_bounds=10
    )
    keys = [[], []]
    for n, counts in [(25, [25, 4]), (40, [40, 40]), (70, [70, 1])]:
        k = rng.standard_normal((2, 2, n, 8)).astype(np.float32)
        cache.append(k, k, counts=counts)
        for b in range(2):
            keys[b].extend(k[b, :, i] for i in range(counts[b]))
        np.testing.assert_array_equal(cache.page_bounds, reference_bounds(cache, keys))
    cache.truncate(50)
    keys = [ks[:50] for ks in keys]
    np.testing.assert_array_equal(cache.page_bounds, reference_bounds(cache, keys))
    cache.reset()
    assert np.isinf(cache.page_bounds).all()


def reference_quest(q, cache, k_all, v_all, budget, local_pages, sink_tokens=0):
    """(out, lse) in float64 for one sequence, no ring; q [1, Hq, Lq, D], causal."""
    _, heads_q, len_q, dim = q.shape
    heads_kv, length = k_all.shape[1], k_all.shape[2]
    group = heads_q // heads_kv
    page = cache.page_size
    q64, k64, v64 = (np.asarray(x, np.float64) for x in (q, k_all, v_all))
    out = np.zeros((1, heads_q, len_q, v_all.shape[3]))
    lse = np.full((1, heads_q, len_q), -np.inf)
    for h in range(heads_kv):
        pages = [p for p in range(-(-length // page)) if (p + 1) * page > sink_tokens]
        local_from = length - local_pages * page
        local = [p for p in pages if min(length, (p + 1) * page) - 1 >= local_from]
        keep = min(len(pages), max(math.ceil(budget * len(pages)), len(local)))
        scores = {}
        for p in pages:
            if p in local:
                continue
            rows = k64[0, h, p * page : min(length, (p + 1) * page)]
            lo, hi = rows.min(0), rows.max(0)
            qs = q64[0, h * group : (h + 1) * group].reshape(-1, dim)
            scores[p] = np.max(np.maximum(qs * lo, qs * hi).sum(-1))
        ranked = sorted(scores, key=lambda p: (-scores[p], p))
        kept = set(local) | set(ranked[: keep - len(local)])
        for g in range(group):
            head = h * group + g
            for i in range(len_q):
                position = length - len_q + i
                seen = [j for j in range(position + 1) if j < sink_tokens or j // page in kept]
                logits = q64[0, head, i] @ k64[0, h, seen].T / math.sqrt(dim)
                m = logits.max()
                w = np.exp(logits - m)
                out[0, head, i] = w @ v64[0, h, seen] / w.sum()
                lse[0, head, i] = m + math.log(w.sum())
    return out, lse


@pytest.mark.parametrize(
    "budget,local_pages,len_q,sinks",
    [(1 / 16, 1, 1, 0), (0.2, 0, 1, 0), (0.3, 2, 3, 5), (1.0, 1, 1, 0)],
)
def test_matches_reference(budget, local_pages, len_q, sinks, rng):
    length = 1000
    k = rng.standard_normal((1, 2, length, 16))
    v = rng.standard_normal((1, 2, length, 12))
    q = rng.standard_normal((1, 4, len_q, 16))
    cache = foveal.KVCache(1, 2, length, 16, 12, dtype=np.float64, page_bounds=16)
    cache.append(k, v)
    out, lse = foveal.quest_decode_attention(
        q,
        cache,
        budget=budget,
        local_pages=local_pages,
        causal=True,
        sink_tokens=sinks,
        return_lse=True,
    )
    want_out, want_lse = reference_quest(q, cache, k, v, budget, local_pages, sinks)
    np.testing.assert_allclose(out, want_out, rtol=0, atol=1e-10)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-10)
    if budget == 1.0:
        dense = foveal.decode_attention(q, cache, causal=True, sink_tokens=sinks)
        np.testing.assert_allclose(out, dense, atol=1e-12)


def test_planted_key_is_found_and_threads_agree(rng):
    length, dim = 4096, 32
    k = rng.standard_normal((1, 1, length, dim)).astype(np.float32)
    v = rng.standard_normal((1, 1, length, dim)).astype(np.float32)
    q = rng.standard_normal((1, 4, 1, dim)).astype(np.float32)
    k[0, 0, 100] = 3 * q[0, 0, 0]
    cache = foveal.KVCache(1, 1, length, dim, page_bounds=16)
    cache.append(k, v)
    _, lse = foveal.quest_decode_attention(q, cache, budget=1 / 32, return_lse=True)
    _, dense_lse = foveal.decode_attention(q, cache, return_lse=True)
    assert math.exp(lse[0, 0, 0] - dense_lse[0, 0, 0]) > 0.9
    results = [
        foveal.quest_decode_attention(q, cache, budget=0.1, num_threads=t) for t in (1, 2, 3)
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_sixteen_bit_caches(torch):
    g = torch.Generator().manual_seed(5)
    k, v = (torch.randn(1, 2, 600, 32, generator=g) for _ in range(2))
    q = torch.randn(1, 4, 1, 32, generator=g)
    wide = foveal.KVCache(1, 2, 600, 32, page_bounds=32)
    wide.append(k.bfloat16().float(), v.bfloat16().float())
    half = foveal.KVCache(1, 2, 600, 32, dtype="bfloat16", page_bounds=32)
    half.append(k.bfloat16(), v.bfloat16())
    out = foveal.quest_decode_attention(q.bfloat16(), half, budget=0.25)
    assert out.dtype == torch.bfloat16
    want = foveal.quest_decode_attention(q.bfloat16().float(), wide, budget=0.25)
    assert torch.equal(out, want.bfloat16())


def test_bad_arguments(rng):
    plain = foveal.KVCache(1, 1, 64, 8)
    paged = foveal.KVCache(1, 1, 64, 8, page_bounds=16)
    kv = rng.standard_normal((1, 1, 64, 8)).astype(np.float32)
    plain.append(kv, kv)
    paged.append(kv, kv)
    q = np.ones((1, 1, 1, 8), np.float32)
    out = np.full((1, 1, 1, 8), 7.0, np.float32)
    with pytest.raises(ValueError, match="page bounds"):
        foveal.quest_decode_attention(q, plain, out=out)
    with pytest.raises(ValueError, match="budget"):
        foveal.quest_decode_attention(q, paged, budget=0, out=out)
    with pytest.raises(ValueError, match="local_pages"):
        foveal.quest_decode_attention(q, paged, local_pages=-1, out=out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="page_bounds"):
        foveal.KVCache(1, 1, 64, 8, page_bounds=-2)
    with pytest.raises(TypeError, match="KVCache"):
        foveal.quest_decode_attention(q, "cache")
