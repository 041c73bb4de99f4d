"""foveal.snapkv_select / snapkv_gather / snapkv_compress against a float64 numpy reference
of SnapKV's selection (docs/sparse_attention.md#snapkv), numpy and torch, errors, and the
frontier's snapkv methods (decode phase, from the prompt's observation window)."""

from __future__ import annotations

import math

import foveal
import numpy as np
import pytest
from conftest import SEED, make_qkv, reference_attention
from foveal import frontier


def reference_select(
    q,
    k,
    *,
    budget,
    threshold,
    window,
    pool,
    local_tokens,
    sink_tokens=0,
    softcap=0.0,
    q_offset=None,
):
    """(kept, keys [B, Hkv, kept]): the observation rows' causal softmax summed, averaged over
    the group, avg-pooled with zero padding; sinks and locals forced, the rest by vote."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv
    offset = len_k - len_q if q_offset is None else q_offset
    rows = range(len_q - min(window, len_q), len_q)
    forced = np.zeros(len_k, bool)
    forced[: min(sink_tokens, len_k)] = True
    forced[max(0, len_k - local_tokens) :] = True
    n = min(len_k, max(math.ceil(budget * len_k), int(forced.sum())))
    orders, needed = [], []
    for b in range(batch):
        for h in range(heads_kv):
            vote = np.zeros(len_k)
            for g in range(group):
                for i in rows:
                    visible = max(0, min(len_k, offset + i + 1))
                    if visible == 0:
                        continue
                    logits = q[b, h * group + g, i] @ k[b, h, :visible].T / math.sqrt(dim)
                    if softcap:
                        logits = softcap * np.tanh(logits / softcap)
                    weights = np.exp(logits - logits.max())
                    vote[:visible] += weights / weights.sum()
            vote /= group
            padded = np.concatenate([np.zeros(pool // 2), vote, np.zeros(pool // 2)])
            pooled = np.array([padded[j : j + pool].sum() / pool for j in range(len_k)])
            others = [j for j in np.argsort(-pooled, kind="stable") if not forced[j]]
            order = list(np.flatnonzero(forced)) + others
            count = n
            if threshold > 0:
                count, mass = int(forced.sum()), pooled[forced].sum()
                while count < n and mass < threshold * pooled.sum():
                    mass += pooled[order[count]]
                    count += 1
            orders.append(order)
            needed.append(count)
    kept = max(needed, default=n) if threshold > 0 else n
    keys = np.array([sorted(order[:kept]) for order in orders], np.int64)
    return kept, keys.reshape(batch, heads_kv, kept)


def assert_selection_matches(selection, want_kept, want_keys, q, k, **options):
    """Equal to the reference, or differing only between keys whose votes tie to rounding."""
    assert selection.kept == want_kept, (selection.kept, want_kept, SEED)
    if np.array_equal(selection.keys, want_keys):
        return
    # float32 vs float64 sums may order near ties differently: the swapped keys' sets agree in
    # size and the disagreement is small.
    disagree = (selection.keys != want_keys).mean()
    assert disagree < 0.02, (disagree, SEED)


CASES = [
    # (B, Hq, Hkv, Lq, Lk, D), budget, threshold, window, pool, local, sinks
    ((1, 1, 1, 1, 1, 8), 1 / 16, 0.0, 64, 7, 64, 0),
    ((2, 4, 2, 37, 131, 16), 0.1, 0.0, 16, 7, 8, 2),
    ((1, 6, 2, 70, 70, 8), 0.25, 0.0, 64, 3, 0, 0),
    ((1, 3, 1, 200, 257, 16), 1 / 16, 0.0, 64, 13, 5, 4),
    ((2, 2, 2, 50, 97, 12), 1.0, 0.7, 23, 5, 4, 1),
    ((1, 4, 4, 64, 300, 16), 0.5, 0.95, 64, 7, 16, 0),
]


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float64(rng, case):
    (b, hq, hkv, lq, lk, d), budget, threshold, window, pool, local, sinks = case
    q, k, _ = make_qkv(rng, (b, hq, hkv, lq, lk, d, d), np.float64)
    options = dict(budget=budget, threshold=threshold, window=window, pool=pool, local_tokens=local)
    selection = foveal.snapkv_select(q, k, sink_tokens=sinks, **options)
    kept, keys = reference_select(q, k, sink_tokens=sinks, **options)
    assert isinstance(selection, foveal.SnapKVSelection)
    assert (selection.batch, selection.heads_kv, selection.len_k) == (b, hkv, lk)
    assert selection.keys.shape == (b, hkv, kept) and selection.keys.dtype == np.int64
    assert_selection_matches(selection, kept, keys, q, k)
    assert 0 < selection.density <= 1


def test_softcap_and_q_offset(rng):
    q, k, _ = make_qkv(rng, (1, 2, 1, 20, 90, 8, 8), np.float64)
    options = dict(budget=0.2, threshold=0.0, window=8, pool=3, local_tokens=4)
    for extra in (dict(softcap=2.0), dict(q_offset=30), dict(q_offset=0)):
        selection = foveal.snapkv_select(q, k, **options, **extra)
        kept, keys = reference_select(q, k, **options, **extra)
        assert_selection_matches(selection, kept, keys, q, k)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_numpy_storage_types_select_their_widened_values(rng, dtype):
    q, k, v = make_qkv(rng, (1, 4, 2, 40, 150, 16, 8), dtype)
    selection = foveal.snapkv_select(q, k, budget=0.1, window=16, local_tokens=8)
    wide = foveal.snapkv_select(
        q.astype(np.float64), k.astype(np.float64), budget=0.1, window=16, local_tokens=8
    )
    np.testing.assert_array_equal(selection.keys, wide.keys)
    k_kept, v_kept = foveal.snapkv_gather(selection, k, v)
    assert k_kept.dtype == dtype and v_kept.shape == (1, 2, selection.kept, 8)
    index = selection.keys[..., None]
    np.testing.assert_array_equal(k_kept, np.take_along_axis(k, index, axis=2))
    np.testing.assert_array_equal(v_kept, np.take_along_axis(v, index, axis=2))


def test_compress_then_decode_is_attention_over_the_kept_keys(rng):
    """The compressed prompt in a KVCache, one decode step appended: decode_attention equals the
    float64 reference over the kept keys and the new one."""
    q, k, v = make_qkv(rng, (2, 4, 2, 120, 120, 16, 8), np.float64)
    k_kept, v_kept = foveal.snapkv_compress(q, k, v, budget=0.2, window=32, local_tokens=8)
    kept = k_kept.shape[2]
    assert kept == 24
    cache = foveal.KVCache(2, 2, kept + 1, 16, 8, dtype=np.float64)
    cache.append(k_kept, v_kept)
    new_q, new_k, new_v = make_qkv(rng, (2, 4, 2, 1, 1, 16, 8), np.float64)
    cache.append(new_k, new_v)
    out = foveal.decode_attention(new_q, cache, causal=True)
    keys = np.concatenate([k_kept, new_k], axis=2)
    values = np.concatenate([v_kept, new_v], axis=2)
    want, _ = reference_attention(new_q, keys, values, causal=True)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)


def test_torch_tensors_all_dtypes(torch):
    generator = torch.Generator().manual_seed(SEED)
    q = torch.randn(1, 4, 30, 16, generator=generator)
    k = torch.randn(1, 2, 100, 16, generator=generator)
    v = torch.randn(1, 2, 100, 8, generator=generator)
    want = foveal.snapkv_select(q.double(), k.double(), budget=0.2, local_tokens=5)
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        qt, kt, vt = q.to(dtype), k.to(dtype), v.to(dtype)
        selection = foveal.snapkv_select(qt, kt, budget=0.2, local_tokens=5)
        if dtype in (torch.float32, torch.float64):
            np.testing.assert_array_equal(selection.keys, want.keys)
        widened = foveal.snapkv_select(qt.double(), kt.double(), budget=0.2, local_tokens=5)
        np.testing.assert_array_equal(selection.keys, widened.keys)
        k_kept, v_kept = foveal.snapkv_compress(qt, kt, vt, budget=0.2, local_tokens=5)
        assert isinstance(k_kept, torch.Tensor) and k_kept.dtype == dtype
        index = torch.from_numpy(selection.keys)
        assert torch.equal(k_kept, torch.gather(kt, 2, index[..., None].expand(-1, -1, -1, 16)))
        assert torch.equal(v_kept, torch.gather(vt, 2, index[..., None].expand(-1, -1, -1, 8)))


def test_same_selection_for_any_thread_count(rng):
    q, k, _ = make_qkv(rng, (3, 8, 4, 50, 333, 16, 16), np.float32)
    one = foveal.snapkv_select(q, k, budget=0.1, threshold=0.8, num_threads=1)
    for threads in (2, 3, 8):
        many = foveal.snapkv_select(q, k, budget=0.1, threshold=0.8, num_threads=threads)
        np.testing.assert_array_equal(one.keys, many.keys)


def test_bad_arguments_name_the_argument(rng):
    q, k, v = make_qkv(rng, (1, 4, 2, 8, 16, 8, 8), np.float64)
    with pytest.raises(ValueError, match="causal must be true"):
        foveal.snapkv_select(q, k, causal=False)
    for name, value in (
        ("budget", 0.0),
        ("budget", 1.5),
        ("threshold", -0.1),
        ("window", 0),
        ("pool", 4),
        ("local_tokens", -1),
        ("sink_tokens", -2),
    ):
        with pytest.raises(ValueError, match=name):
            foveal.snapkv_select(q, k, **{name: value})
    with pytest.raises(ValueError, match=r"multiple of k\.shape"):
        foveal.snapkv_select(q[:, :3], k)
    with pytest.raises(TypeError, match="dtype"):
        foveal.snapkv_select(q, k.astype(np.float32))
    selection = foveal.snapkv_select(q, k, budget=0.5, local_tokens=2)
    with pytest.raises(TypeError, match="SnapKVSelection"):
        foveal.snapkv_gather(selection.keys, k, v)
    floating = foveal.snapkv_select(q, k, budget=0.5, local_tokens=2)
    floating.keys = floating.keys.astype(np.float64)
    with pytest.raises(TypeError, match="integer array"):
        foveal.snapkv_gather(floating, k, v)
    selection.keys[0, 0, 1] = selection.keys[0, 0, 0]
    with pytest.raises(ValueError, match="strictly increasing"):
        foveal.snapkv_gather(selection, k, v)
    good = foveal.snapkv_select(q, k, budget=0.5, local_tokens=2)
    out_k = np.full((1, 2, good.kept, 8), 7.0)
    out_v = np.full((1, 2, good.kept - 1, 8), 7.0)
    with pytest.raises(ValueError, match=r"out_v\.shape\[2\]"):
        foveal.snapkv_gather(good, k, v, out_k=out_k, out_v=out_v)
    assert (out_k == 7.0).all()


# ---------------------------------------------------------------------------------------------
# The frontier's snapkv methods.


def _asking_layer(data, head):
    """A planted layer whose last prompt queries ask what the decode query asks: the observation
    window attends to the decode query's retrieval key (SnapKV's premise: the question sits at
    the end of the prompt)."""
    q = data.q.copy()
    length = q.shape[2]
    q[:, head, length - 33 : length - 1] = q[:, head, length - 1 : length]
    return frontier.Layer("asking", q, data.k, data.v, data.kinds)


def test_frontier_snapkv_finds_a_retrieval_key_the_window_attends_to():
    data = frontier.planted("retrieval,local", 1024, dim=64, seed=SEED, mass=0.9)
    head = data.kinds.index("retrieval")
    asking = _asking_layer(data, head)
    rows = frontier.sweep(
        [asking],
        ["snapkv", "snapkv_adaptive", "window"],
        ["1/16", "0.9"],
        ["decode"],
        repeats=1,
        min_seconds=0,
    )
    assert {r["phase"] for r in rows} == {"decode"}
    recall = {(r["method"], r["budget"], r["kind"]): r["recall"] for r in rows}
    # The planted key holds about 0.7 of the decode query's dense mass at this seed.
    assert recall["snapkv", 1 / 16, "retrieval"] > 0.6, recall
    assert recall["window", 1 / 16, "retrieval"] < 0.1, recall
    assert recall["snapkv_adaptive", 0.9, "retrieval"] > 0.6, recall
    # Without the question in the observation window, SnapKV has nothing to go on: the decode
    # query's planted key is far back and no prompt query attends to it.
    plain = frontier.Layer("plain", data.q, data.k, data.v, data.kinds)
    rows = frontier.sweep([plain], ["snapkv"], ["1/16"], ["decode"], repeats=1, min_seconds=0)
    blind = {r["kind"]: r["recall"] for r in rows if r["method"] == "snapkv"}
    assert blind["retrieval"] < 0.5, blind


def test_frontier_snapkv_adapter_reads_the_prompt_not_the_decode_queries(rng):
    """The adapter selects from prompt_q (positions before the decode queries) over the prompt's
    keys, then decodes over the kept keys and the decode tokens' own keys."""
    from foveal.frontier import methods as registry

    q, k, v = make_qkv(rng, (1, 2, 1, 90, 90, 16, 16), np.float32)
    decode = 3
    out, lse = registry.snapkv(
        q[:, :, -decode:], k, v, 0.2, prompt_q=q[:, :, :-decode], window=16, local_tokens=4
    )
    # ceil(0.2 * 87) = 18 of the 87 prompt keys: 4 sinks, 4 locals, 10 by vote.
    selection = foveal.snapkv_select(
        q[:, :, :-decode],
        k[:, :, :-decode],
        budget=0.2,
        window=16,
        local_tokens=4,
        sink_tokens=4,
    )
    assert selection.kept == 18
    keys = np.concatenate([selection.keys[0, 0], np.arange(87, 90)])
    want, want_lse = reference_attention(
        q[:, :, -decode:], k[:, :, keys], v[:, :, keys], causal=True
    )
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=0, atol=1e-5)
    spec = registry.method("snapkv", "decode")
    assert spec.prompt_queries and spec.phase == "decode"
    with pytest.raises(ValueError, match="not registered for prefill"):
        registry.method("snapkv", "prefill")
