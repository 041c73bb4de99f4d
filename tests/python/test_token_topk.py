"""foveal.token_topk_select / token_topk_attention against float64 numpy references.

The selection reference takes each query block's mean query per head, estimates every candidate
key's mass by a softmax of its dot product with it, and keeps local keys first, then the best
(docs/sparse_attention.md). The attention reference is conftest.reference_attention with the
selection as a -inf bias: a key is visible when the attention options show it and it is a sink or
it is kept by the query's block.
"""

from __future__ import annotations

import math

import foveal
import numpy as np
import pytest
from conftest import (
    DTYPES,
    assert_close,
    assert_rounded,
    make_qkv,
    reference_attention,
    visible_keys,
)


def reference_select(
    q,
    k,
    *,
    budget,
    threshold,
    block_size,
    local_tokens,
    outliers=1,
    causal=True,
    window_left=-1,
    window_right=-1,
    sink_tokens=0,
    softcap=0.0,
    q_offset=None,
):
    """Per (b, kv head, query block): (kept keys, mass per key, keep)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    bs = block_size
    offset = len_k - len_q if q_offset is None else q_offset
    band = visible_keys(len_q, len_k, causal, window_left, window_right, 0, q_offset)
    seen = visible_keys(len_q, len_k, causal, window_left, window_right, sink_tokens, q_offset)
    scale = 1.0 / math.sqrt(dim)
    lists = []
    for b in range(batch):
        for h in range(heads_kv):
            for block in range(offset // bs, (offset + len_q - 1) // bs + 1):
                lo, hi = max(offset, block * bs), min(offset + len_q, (block + 1) * bs) - 1
                rows = slice(lo - offset, hi + 1 - offset)
                keys = np.arange(len_k)
                sinks = (keys < sink_tokens) & seen[rows].any(axis=0)
                cands = keys[band[rows].any(axis=0) & ~sinks]
                local = cands[(cands >= lo - local_tokens) & (cands <= hi)]
                keep = min(len(cands), max(math.ceil(budget * len(cands)), len(local)))
                mass = np.zeros(len_k)
                for g in range(group):
                    block = q[b, h * group + g, rows]
                    n = len(block)
                    # Outliers: farthest from the block's mean query, ties to the earlier one.
                    distance = ((block - block.mean(axis=0)) ** 2).sum(axis=1)
                    count = min(outliers, n - 1)
                    chosen = sorted(range(n), key=lambda i: (-distance[i], i))[:count]
                    rest = np.delete(block, chosen, axis=0).mean(axis=0)
                    representatives = [(rest, (n - count) / n)] + [
                        (block[i], 1 / n) for i in chosen
                    ]
                    for query, weight in representatives:
                        logits = scale * (k[b, h, cands] @ query)
                        if softcap > 0:
                            logits = softcap * np.tanh(logits / softcap)
                        if len(cands):
                            w = np.exp(logits - logits.max())
                            mass[cands] += weight * w / w.sum() / group
                kept = list(local)
                kept_mass = mass[kept].sum()
                others = sorted(
                    (int(j) for j in cands if j not in local), key=lambda j: (-mass[j], j)
                )
                for j in others:
                    if len(kept) >= keep or (threshold > 0 and kept_mass >= threshold):
                        break
                    kept.append(j)
                    kept_mass += mass[j]
                lists.append((sorted(int(j) for j in kept), mass, keep))
    return lists


def selection_bias(selection, len_q, len_k, heads_q, sink_tokens, q_offset):
    """[B, Hq, Lq, Lk] float64: 0 where the selection keeps the key (or it is a sink), -inf else."""
    offset = len_k - len_q if q_offset is None else q_offset
    mask = selection.mask()  # [B, Hkv, QB, Lk]
    group = heads_q // selection.heads_kv
    query_blocks = (offset + np.arange(len_q)) // selection.block_size
    kept = mask[:, :, query_blocks - selection.first_query_block]  # [B, Hkv, Lq, Lk]
    kept = np.repeat(kept, group, axis=1)
    kept[..., :sink_tokens] = True
    return np.where(kept, 0.0, -np.inf)


def check_selection(selection, want, slack):
    lists = [
        selection.keys[selection.offsets[i] : selection.offsets[i + 1]].tolist()
        for i in range(len(selection.offsets) - 1)
    ]
    assert len(lists) == len(want)
    for have, (kept, mass, keep) in zip(lists, want):
        assert have == sorted(have) and len(have) <= keep
        if have == kept:
            continue
        assert len(have) == len(kept)
        lowest = min(mass[j] for j in kept)
        assert all(mass[j] >= lowest * (1 - slack) - slack for j in set(have) - set(kept))


CASES = [
    # shape (B, Hq, Hkv, Lq, Lk, D, Dv), attention options, sparse options
    ((1, 2, 1, 200, 200, 16, 16), dict(), dict(block_size=32, budget=0.25, local_tokens=8)),
    ((2, 4, 2, 129, 129, 31, 13), dict(sink_tokens=4), dict(block_size=16, budget=0.1)),
    ((1, 2, 2, 150, 150, 16, 16), dict(), dict(block_size=32, budget=0.1, outliers=0)),
    ((1, 4, 2, 140, 140, 16, 16), dict(), dict(block_size=16, budget=0.2, outliers=15)),
    ((1, 6, 2, 67, 300, 8, 8), dict(softcap=5.0), dict(block_size=23, budget=0.5, threshold=0.9)),
    ((1, 3, 3, 1, 257, 16, 16), dict(), dict(block_size=64, budget=1 / 16, local_tokens=0)),
    (
        (1, 2, 2, 150, 150, 16, 16),
        dict(window_left=70, sink_tokens=1),
        dict(block_size=32, budget=0.5, local_tokens=5),
    ),
    ((1, 2, 1, 100, 160, 16, 16), dict(q_offset=30), dict(block_size=16, budget=0.3)),
    (
        (1, 2, 1, 90, 90, 16, 16),
        dict(causal=False, window_left=20, window_right=20),
        dict(block_size=16, budget=0.5, local_tokens=3),
    ),
    # A group of 8 heads: tiles of 64 rows span 8 positions, straddling blocks of 20.
    ((1, 8, 1, 120, 120, 16, 16), dict(), dict(block_size=20, budget=0.2, local_tokens=4)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_matches_references(case, dtype, rng):
    shape, options, sparse = case
    q, k, v = make_qkv(rng, shape, dtype)
    selection = foveal.token_topk_select(q, k, **options, **sparse)
    full = dict(dict(threshold=0.0, local_tokens=64, outliers=1), **sparse)
    ref_options = {
        n: options[n]
        for n in ("causal", "window_left", "window_right", "sink_tokens", "softcap", "q_offset")
        if n in options
    }
    check_selection(
        selection,
        reference_select(q, k, **full, **ref_options),
        1e-4 if dtype == np.float32 else 1e-10,
    )
    out, lse = foveal.token_topk_attention(q, k, v, selection=selection, return_lse=True, **options)
    bias = selection_bias(
        selection,
        shape[3],
        shape[4],
        shape[1],
        options.get("sink_tokens", 0),
        options.get("q_offset"),
    )
    causal = options.get("causal", True)
    ref_out, ref_lse = reference_attention(q, k, v, bias=bias, **dict(options, causal=causal))
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")
    again = foveal.token_topk_attention(q, k, v, **options, **sparse)
    np.testing.assert_array_equal(again, out)


def test_planted_keys_are_found_and_recall_is_the_kept_mass(rng):
    """Five scattered keys that the last block's queries point at are the five kept past the
    block's own positions; exp(lse - lse_dense) is the dense attention mass the call keeps."""
    q, k, v = make_qkv(rng, (1, 2, 1, 512, 512, 32, 32), np.float64)
    planted = [3, 77, 150, 301, 402]
    k[0, 0, planted, 0] += 8.0
    q[0, :, 480:, 0] += 6.0
    selection = foveal.token_topk_select(q, k, block_size=32, budget=37 / 512, local_tokens=0)
    assert selection.kept(0, 0, 15).tolist() == planted + list(range(480, 512))
    _, lse = foveal.token_topk_attention(q, k, v, selection=selection, return_lse=True)
    _, dense_lse = foveal.attention(q, k, v, causal=True, return_lse=True)
    recall = np.exp(lse - dense_lse)
    assert recall[0, :, 480:].mean() > 0.9


def test_a_retrieval_query_keeps_its_own_key_as_an_outlier(rng):
    """One query of a block asks for a key far back that the rest of its block does not want:
    the block's mean dilutes it 64 times and loses it among keys the others prefer; scored on
    its own as an outlier, its key is kept (and the planted retrieval row sees it)."""
    length, dim, bs = 4096, 32, 64
    q = np.zeros((1, 1, length, dim))
    k = rng.standard_normal((1, 1, length, dim)) * 0.5
    q[0, 0, :, 1] = 8.0  # every query likes keys with a large component 1 ...
    k[0, 0, :, 0] = 0.0
    k[0, 0, 100, 1] = 0.0  # ... which the planted key lacks
    k[0, 0, 100, 0] = 12.0
    row = 3600  # in block 56; only it asks for component 0
    q[0, 0, row] = 0.0
    q[0, 0, row, 0] = 12.0
    kept = {}
    for outliers in (0, 1, 2):
        selection = foveal.token_topk_select(
            q, k, budget=1 / 16, block_size=bs, local_tokens=0, outliers=outliers
        )
        kept[outliers] = 100 in selection.kept(0, 0, row // bs).tolist()
    assert kept == {0: False, 1: True, 2: True}
    _, lse = foveal.token_topk_attention(q, k, k, budget=1 / 16, return_lse=True)
    _, dense_lse = foveal.attention(q, k, k, causal=True, return_lse=True)
    assert np.exp(lse - dense_lse)[0, 0, row] > 0.99


def test_budget_one_is_dense_and_threads_agree(rng):
    q, k, v = make_qkv(rng, (2, 8, 2, 300, 300, 32, 32), np.float32)
    dense = foveal.attention(q, k, v, causal=True, sink_tokens=2)
    out = foveal.token_topk_attention(q, k, v, budget=1.0, block_size=48, sink_tokens=2)
    assert_close(out, dense, np.float32)
    results = [
        foveal.token_topk_attention(
            q, k, v, budget=0.3, threshold=0.8, block_size=24, num_threads=t
        )
        for t in (1, 2, 3)
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_torch_bfloat16(torch):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 4, 200, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    out, lse = foveal.token_topk_attention(q, k, v, block_size=32, budget=0.3, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    wide = foveal.token_topk_attention(q.float(), k.float(), v.float(), block_size=32, budget=0.3)
    assert_rounded(out, wide, 32, 32)


def test_selection_from_mask_round_trips_and_bad_input_is_rejected(rng):
    q, k, v = make_qkv(rng, (1, 2, 1, 100, 100, 8, 8), np.float32)
    selection = foveal.token_topk_select(q, k, block_size=32, budget=0.5, local_tokens=4)
    again = foveal.TokenSelection.from_mask(selection.mask(), block_size=32)
    np.testing.assert_array_equal(again.offsets, selection.offsets)
    np.testing.assert_array_equal(again.keys, selection.keys)
    assert again.len_k == 100 and 0 < selection.density() <= 1
    assert "TokenSelection(" in repr(selection)
    out = np.full((1, 2, 100, 8), 7.0, np.float32)
    for kwargs, needle in [
        (dict(budget=0), "budget"),
        (dict(block_size=8), "block_size"),
        (dict(threshold=1.5), "threshold"),
        (dict(local_tokens=-1), "local_tokens"),
        (dict(outliers=-1), r"outliers must be in \[0, block_size\) = \[0, 64\) .*got -1"),
        (dict(block_size=32, outliers=32), r"outliers must be in \[0, block_size\) = \[0, 32\)"),
    ]:
        with pytest.raises(ValueError, match=needle):
            foveal.token_topk_attention(q, k, v, out=out, **kwargs)
        assert (out == 7.0).all()
    bad = foveal.TokenSelection.from_mask(selection.mask(), block_size=16)
    with pytest.raises(ValueError, match="query_blocks"):
        foveal.token_topk_attention(q, k, v, selection=bad, out=out)
    bad = foveal.TokenSelection.from_mask(selection.mask(), block_size=32)
    bad.keys = bad.keys[::-1].copy()
    with pytest.raises(ValueError, match="strictly increasing"):
        foveal.token_topk_attention(q, k, v, selection=bad, out=out)
    bad.keys = np.full_like(selection.keys, 100)
    with pytest.raises(ValueError, match="not a key"):
        foveal.token_topk_attention(q, k, v, selection=bad, out=out)
    assert (out == 7.0).all()
    with pytest.raises(TypeError, match="selection"):
        foveal.token_topk_attention(q, k, v, selection=foveal.block_sparse_select(q, k))
    with pytest.raises(ValueError, match="kept"):
        selection.kept(0, 0, 99)
    with pytest.raises(TypeError, match="keys"):
        foveal.TokenSelection(
            block_size=32, batch=1, heads_kv=1, first_query_block=0, query_blocks=1, offsets=[0]
        )
