"""foveal.block_sparse_select / block_sparse_attention against float64 numpy references.

The selection reference pools queries and keys per block, estimates each candidate block's mass
and keeps local blocks first, then the best (docs/sparse_attention.md). The attention reference
is conftest.reference_attention with the selection as a -inf bias: a key is visible when the
attention options show it and it is a sink or its block is kept by the query's block.
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
    local_blocks,
    causal=True,
    window_left=-1,
    window_right=-1,
    softcap=0.0,
    q_offset=None,
):
    """Per (b, kv head, query block): (kept blocks, mass per key block, keep)."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    bs = block_size
    offset = len_k - len_q if q_offset is None else q_offset
    key_blocks = -(-len_k // bs)
    band = visible_keys(len_q, len_k, causal, window_left, window_right, 0, q_offset)
    scale = 1.0 / math.sqrt(dim)
    lists = []
    first, last = offset // bs, (offset + len_q - 1) // bs
    for b in range(batch):
        for h in range(heads_kv):
            for block in range(first, last + 1):
                lo, hi = max(offset, block * bs), min(offset + len_q, (block + 1) * bs)
                rows = slice(lo - offset, hi - offset)
                seen = band[rows].any(axis=0)
                cands = [c for c in range(key_blocks) if seen[c * bs : (c + 1) * bs].any()]
                local = [c for c in cands if block - local_blocks < c <= block]
                keep = min(len(cands), max(math.ceil(budget * len(cands)), len(local)))
                mass = np.zeros(key_blocks)
                for g in range(group):
                    mq = q[b, h * group + g, rows].mean(axis=0)
                    logits = []
                    for c in cands:
                        keys = k[b, h, c * bs : (c + 1) * bs]
                        logit = scale * mq @ keys.mean(axis=0)
                        if softcap > 0:
                            logit = softcap * math.tanh(logit / softcap)
                        logits.append(logit + math.log(len(keys)))
                    logits = np.array(logits)
                    weights = np.exp(logits - logits.max()) if len(cands) else logits
                    for c, w in zip(cands, weights):
                        mass[c] += w / weights.sum() / group
                kept = list(local)
                kept_mass = mass[kept].sum()
                others = sorted((c for c in cands if c not in local), key=lambda c: (-mass[c], c))
                for c in others:
                    if len(kept) >= keep or (threshold > 0 and kept_mass >= threshold):
                        break
                    kept.append(c)
                    kept_mass += mass[c]
                lists.append((sorted(kept), mass, keep))
    return lists


def selection_bias(selection, len_q, len_k, heads_q, sink_tokens, q_offset):
    """[B, Hq, Lq, Lk] float64: 0 where the selection keeps the key (or it is a sink), -inf else."""
    offset = len_k - len_q if q_offset is None else q_offset
    mask = selection.mask()  # [B, Hkv, QB, KB]
    group = heads_q // selection.heads_kv
    bs = selection.block_size
    query_blocks = (offset + np.arange(len_q)) // bs - selection.first_query_block
    key_blocks = np.arange(len_k) // bs
    kept = mask[:, :, query_blocks][:, :, :, key_blocks]  # [B, Hkv, Lq, Lk]
    kept = np.repeat(kept, group, axis=1)
    kept[..., :sink_tokens] = True
    return np.where(kept, 0.0, -np.inf)


def check_selection(selection, want, slack):
    lists = [
        selection.blocks[selection.offsets[i] : selection.offsets[i + 1]].tolist()
        for i in range(len(selection.offsets) - 1)
    ]
    assert len(lists) == len(want)
    for have, (kept, mass, keep) in zip(lists, want):
        assert have == sorted(have) and len(have) <= keep
        if have == kept:
            continue
        assert len(have) == len(kept)
        lowest = min(mass[c] for c in kept)
        assert all(mass[c] >= lowest - slack for c in set(have) - set(kept)), (have, kept)


CASES = [
    # shape (B, Hq, Hkv, Lq, Lk, D, Dv), attention options, sparse options
    ((1, 2, 1, 200, 200, 16, 16), dict(), dict(block_size=32, budget=0.25)),
    ((2, 4, 2, 129, 129, 31, 13), dict(sink_tokens=4), dict(block_size=16, budget=0.1)),
    ((1, 6, 2, 67, 300, 8, 8), dict(softcap=5.0), dict(block_size=23, budget=0.5, threshold=0.9)),
    ((1, 3, 3, 1, 257, 16, 16), dict(), dict(block_size=64, budget=1 / 16, local_blocks=2)),
    (
        (1, 2, 2, 150, 150, 16, 16),
        dict(window_left=70, sink_tokens=1),
        dict(block_size=32, budget=0.5, local_blocks=0),
    ),
    ((1, 2, 1, 100, 160, 16, 16), dict(q_offset=30), dict(block_size=16, budget=0.3)),
    (
        (1, 2, 1, 90, 90, 16, 16),
        dict(causal=False, window_left=20, window_right=20),
        dict(block_size=16, budget=0.5),
    ),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[0])))
def test_matches_references(case, dtype, rng):
    shape, options, sparse = case
    q, k, v = make_qkv(rng, shape, dtype)
    selection = foveal.block_sparse_select(q, k, **options, **sparse)
    full = dict(dict(threshold=0.0, local_blocks=1), **sparse)
    ref_options = {
        n: options[n]
        for n in ("causal", "window_left", "window_right", "softcap", "q_offset")
        if n in options
    }
    check_selection(
        selection,
        reference_select(q, k, **full, **ref_options),
        1e-5 if dtype == np.float32 else 1e-12,
    )
    out, lse = foveal.block_sparse_attention(
        q, k, v, selection=selection, return_lse=True, **options
    )
    causal = options.get("causal", True)
    bias = selection_bias(
        selection,
        shape[3],
        shape[4],
        shape[1],
        options.get("sink_tokens", 0),
        options.get("q_offset"),
    )
    ref_out, ref_lse = reference_attention(q, k, v, bias=bias, **dict(options, causal=causal))
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")
    # The one-call form selects the same way.
    again = foveal.block_sparse_attention(q, k, v, **options, **sparse)
    np.testing.assert_array_equal(again, out)


def test_recall_from_lse_and_a_planted_block(rng):
    """The kept attention mass of a row is exp(lse - lse_dense); a planted far block is found."""
    q, k, v = make_qkv(rng, (1, 2, 1, 512, 512, 32, 32), np.float64)
    k[0, 0, 64:96, 0] += 6.0
    q[0, :, 480:, 0] += 6.0
    selection = foveal.block_sparse_select(q, k, block_size=32, budget=2 / 16)
    assert selection.kept(0, 0, 15).tolist() == [2, 15]
    _, lse = foveal.block_sparse_attention(q, k, v, selection=selection, return_lse=True)
    _, dense_lse = foveal.attention(q, k, v, causal=True, return_lse=True)
    recall = np.exp(lse - dense_lse)
    bias = selection_bias(selection, 512, 512, 2, 0, None)
    logits = np.einsum("hid,hjd->hij", q[0], np.repeat(k[0], 2, axis=0)) / math.sqrt(32)
    logits = np.where(np.tril(np.ones((512, 512), bool)), logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    kept_mass = (p * (bias[0] == 0)).sum(-1)
    np.testing.assert_allclose(recall[0], kept_mass, rtol=1e-9)
    assert recall[0, :, 480:].mean() > 0.9  # the planted block carries the mass
    assert recall[0, :, 480:].min() > 0.5


def test_budget_one_is_dense_and_threads_agree(rng):
    q, k, v = make_qkv(rng, (2, 8, 2, 300, 300, 32, 32), np.float32)
    dense = foveal.attention(q, k, v, causal=True, sink_tokens=2)
    out = foveal.block_sparse_attention(q, k, v, budget=1.0, block_size=48, sink_tokens=2)
    assert_close(out, dense, np.float32)
    results = [
        foveal.block_sparse_attention(
            q, k, v, budget=0.3, threshold=0.8, block_size=40, num_threads=t
        )
        for t in (1, 2, 3)
    ]
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])


def test_torch_bfloat16(torch):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 4, 200, 32, generator=g, dtype=torch.bfloat16) for _ in range(3))
    out, lse = foveal.block_sparse_attention(q, k, v, block_size=32, budget=0.3, return_lse=True)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    wide = foveal.block_sparse_attention(q.float(), k.float(), v.float(), block_size=32, budget=0.3)
    assert_rounded(out, wide, 32, 32)


def test_selection_from_mask_round_trips_and_bad_input_is_rejected(rng):
    q, k, v = make_qkv(rng, (1, 2, 1, 100, 100, 8, 8), np.float32)
    selection = foveal.block_sparse_select(q, k, block_size=32, budget=0.5)
    again = foveal.BlockSelection.from_mask(selection.mask(), block_size=32)
    np.testing.assert_array_equal(again.offsets, selection.offsets)
    np.testing.assert_array_equal(again.blocks, selection.blocks)
    assert 0 < selection.density() <= 1
    out = np.full((1, 2, 100, 8), 7.0, np.float32)
    for kwargs, needle in [
        (dict(budget=0), "budget"),
        (dict(block_size=8), "block_size"),
        (dict(threshold=1.5), "threshold"),
        (dict(local_blocks=-1), "local_blocks"),
    ]:
        with pytest.raises(ValueError, match=needle):
            foveal.block_sparse_attention(q, k, v, out=out, **kwargs)
        assert (out == 7.0).all()
    bad = foveal.BlockSelection.from_mask(selection.mask(), block_size=16)
    with pytest.raises(ValueError, match="query_blocks"):
        foveal.block_sparse_attention(q, k, v, selection=bad, out=out)
    bad = foveal.BlockSelection.from_mask(selection.mask()[:, :, :, ::-1].copy(), block_size=32)
    bad.blocks = bad.blocks[::-1].copy()
    with pytest.raises(ValueError, match=r"strictly increasing|not a key block"):
        foveal.block_sparse_attention(q, k, v, selection=bad, out=out)
    assert (out == 7.0).all()
    with pytest.raises(TypeError, match="selection"):
        foveal.block_sparse_attention(q, k, v, selection="all")
    with pytest.raises(ValueError, match="kept"):
        selection.kept(0, 0, 99)


def test_selection_methods_reject_a_broken_layout_and_empty_key_axes_round_trip(rng):
    # Regressions (the fuzz suite): mask() of a selection whose blocks left [0, key_blocks)
    # raised IndexError, kept() of one with too few offsets too, and kept() of a float index;
    # from_mask of a mask without key blocks (Lk = 0) failed to reshape.
    q, k, _ = make_qkv(rng, (1, 2, 1, 100, 100, 8, 8), np.float32)
    selection = foveal.block_sparse_select(q, k, block_size=32, budget=0.5)
    selection.key_blocks -= 1
    with pytest.raises(ValueError, match="mask"):
        selection.mask()
    selection.key_blocks += 1
    selection.offsets = selection.offsets[:-1]
    with pytest.raises(ValueError, match="kept"):
        selection.kept(0, 0, selection.first_query_block)
    with pytest.raises(TypeError):
        foveal.block_sparse_select(q, k, block_size=32).kept(0, 0.5, 0)
    no_keys = foveal.block_sparse_select(q, k[:, :, :0], block_size=32)
    assert no_keys.mask().shape == (1, 1, 4, 0)
    again = foveal.BlockSelection.from_mask(no_keys.mask(), block_size=32)
    np.testing.assert_array_equal(again.offsets, no_keys.offsets)
