"""foveal.KVCache, foveal.decode_attention and foveal.merge_states.

Decode is checked against the float64 reference over each sequence's full history (kept by the
test, not read back from the cache) and against PyTorch SDPA; tolerances as in
test_attention.py (conftest.TOLERANCE).
"""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from conftest import DTYPES, assert_close, reference_attention, visible_keys


class History:
    """A KVCache and, beside it, every key and value appended to it, per sequence."""

    def __init__(self, rng, batch, heads_kv, capacity, dim, dim_v, dtype, **options):
        self.rng = rng
        self.dtype = dtype
        self.cache = foveal.KVCache(batch, heads_kv, capacity, dim, dim_v, dtype=dtype, **options)
        self.keys = [np.zeros((heads_kv, 0, dim)) for _ in range(batch)]
        self.values = [np.zeros((heads_kv, 0, dim_v)) for _ in range(batch)]

    def append(self, steps, counts=None):
        c = self.cache
        k = self.rng.standard_normal((c.batch, c.heads_kv, steps, c.dim)).astype(self.dtype)
        v = self.rng.standard_normal((c.batch, c.heads_kv, steps, c.dim_v)).astype(self.dtype)
        c.append(k, v, counts=counts)
        for b in range(c.batch):
            n = steps if counts is None else counts[b]
            self.keys[b] = np.concatenate([self.keys[b], k[b, :, :n]], axis=1)
            self.values[b] = np.concatenate([self.values[b], v[b, :, :n]], axis=1)

    def truncate(self, length, sequence=None):
        self.cache.truncate(length, sequence=sequence)
        for b in range(self.cache.batch) if sequence is None else [sequence]:
            self.keys[b] = self.keys[b][:, :length]
            self.values[b] = self.values[b][:, :length]

    def reference(self, q, **options):
        """(out, lse) of the newest Lq positions of every sequence, in float64."""
        outs, lses = [], []
        for b in range(self.cache.batch):
            out, lse = reference_attention(
                q[b : b + 1], self.keys[b][None], self.values[b][None], **options
            )
            outs.append(out)
            lses.append(lse)
        return np.concatenate(outs), np.concatenate(lses)


def random_q(rng, cache, heads_q, len_q, dtype):
    return rng.standard_normal((cache.batch, heads_q, len_q, cache.dim)).astype(dtype)


# --------------------------------------------------------------------------------------------
# KVCache.


def test_owned_cache_geometry_and_lengths():
    cache = foveal.KVCache(3, 2, 10, 8, 5)
    assert (cache.batch, cache.heads_kv, cache.capacity, cache.dim, cache.dim_v) == (3, 2, 10, 8, 5)
    assert cache.lengths == [0, 0, 0]
    assert cache.keys.shape == (3, 2, 10, 8) and cache.values.shape == (3, 2, 10, 5)
    assert not cache.keys.flags.writeable
    assert cache.dtype == np.float32 and not cache.ring


def test_append_writes_rows_in_order_and_ragged_counts(rng):
    cache = foveal.KVCache(2, 2, 8, 4, 3, dtype=np.float64)
    k = rng.standard_normal((2, 2, 5, 4))
    v = rng.standard_normal((2, 2, 5, 3))
    cache.append(k, v, counts=[5, 2])
    assert cache.lengths == [5, 2]
    np.testing.assert_array_equal(cache.keys[0, :, :5], k[0])
    np.testing.assert_array_equal(cache.values[1, :, :2], v[1, :, :2])
    cache.append(k[:, :, :1], v[:, :, :1])
    assert cache.lengths == [6, 3]
    np.testing.assert_array_equal(cache.keys[1, :, 2], k[1, :, 0])


def test_appending_past_capacity_is_an_error_and_changes_nothing(rng):
    cache = foveal.KVCache(2, 1, 4, 2, 2)
    k = rng.standard_normal((2, 1, 3, 2)).astype(np.float32)
    cache.append(k, k, counts=[3, 1])
    keys_before = cache.keys.copy()
    with pytest.raises(ValueError, match="sequence 0 holds 3 tokens; appending 2 would exceed"):
        cache.append(k[:, :, :2], k[:, :, :2])
    assert cache.lengths == [3, 1]
    np.testing.assert_array_equal(cache.keys, keys_before)


@pytest.mark.parametrize(
    ("k_shape", "v_shape", "message"),
    [
        ((1, 2, 1, 4), (2, 2, 1, 4), r"k.shape\[0\] must equal the cache's batch"),
        ((2, 3, 1, 4), (2, 3, 1, 4), r"k.shape\[1\] must equal the cache's heads_kv"),
        ((2, 2, 1, 5), (2, 2, 1, 4), r"k.shape\[3\] must equal the cache's dim"),
        ((2, 2, 1, 4), (2, 2, 1, 3), r"v.shape\[3\] must equal the cache's dim_v"),
        ((2, 2, 2, 4), (2, 2, 1, 4), r"v.shape\[2\] must equal k.shape\[2\]"),
    ],
)
def test_append_of_the_wrong_shape_is_rejected(k_shape, v_shape, message):
    cache = foveal.KVCache(2, 2, 4, 4, 4)
    with pytest.raises(ValueError, match=message):
        cache.append(np.ones(k_shape, np.float32), np.ones(v_shape, np.float32))
    assert cache.lengths == [0, 0]


def test_append_of_the_wrong_dtype_is_a_type_error():
    cache = foveal.KVCache(1, 1, 4, 4)
    with pytest.raises(TypeError, match="dtype float32"):
        cache.append(np.ones((1, 1, 1, 4)), np.ones((1, 1, 1, 4)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sink_tokens=5), r"sink_tokens must be in \[0, capacity = 4\]"),
        (dict(ring=True, sink_tokens=4), "a ring buffer needs capacity > sink_tokens"),
        (dict(sink_tokens=-1), "sink_tokens must be in"),
    ],
)
def test_bad_cache_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        foveal.KVCache(1, 1, 4, 4, **kwargs)


def test_counts_out_of_range_and_bad_truncate():
    cache = foveal.KVCache(2, 1, 4, 2)
    ones = np.ones((2, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"counts\[1\] must be in \[0, n = 2\], got 3"):
        cache.append(ones, ones, counts=[1, 3])
    with pytest.raises(ValueError, match="counts must have one entry per sequence"):
        cache.append(ones, ones, counts=[1])
    cache.append(ones, ones)
    with pytest.raises(ValueError, match=r"length of sequence 1 must be in \[0, 2\], got 3"):
        cache.truncate(3, sequence=1)
    with pytest.raises(ValueError, match=r"sequence must be in \[0, 2\), got 2"):
        cache.truncate(0, sequence=2)
    assert cache.lengths == [2, 2]


def test_truncate_and_reset():
    cache = foveal.KVCache(2, 1, 8, 2)
    ones = np.ones((2, 1, 5, 2), np.float32)
    cache.append(ones, ones, counts=[5, 3])
    cache.truncate(4)
    assert cache.lengths == [4, 3]
    cache.truncate(1, sequence=1)
    assert cache.lengths == [4, 1]
    cache.reset()
    assert cache.lengths == [0, 0]


def test_ring_keeps_sinks_and_the_newest_tokens(rng):
    cache = foveal.KVCache(1, 1, 6, 1, ring=True, sink_tokens=2)
    for position in range(11):
        value = np.full((1, 1, 1, 1), position, np.float32)
        cache.append(value, value)
    # Rows: 0, 1 hold the sinks; rows 2..5 hold positions 2 + (p - 2) % 4 for p in 7..10.
    assert cache.keys[0, 0, :, 0].tolist() == [0, 1, 10, 7, 8, 9]
    assert cache.lengths == [11] and cache.first_retained(0) == 7


def test_wrap_uses_caller_memory_with_lengths(rng, torch):
    keys = torch.zeros((1, 2, 16, 4))
    values = torch.zeros((1, 2, 16, 4))
    keys[0, :, :3] = torch.randn(2, 3, 4)
    values[0, :, :3] = torch.randn(2, 3, 4)
    cache = foveal.KVCache.wrap(keys, values, lengths=[3])
    assert cache.lengths == [3]
    k = torch.randn(1, 2, 1, 4)
    cache.append(k, k)
    torch.testing.assert_close(keys[0, :, 3], k[0, :, 0])
    q = torch.randn(1, 4, 1, 4)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, keys[:, :, :4], values[:, :, :4], enable_gqa=True
    )
    torch.testing.assert_close(foveal.decode_attention(q, cache), expected)


def test_wrap_rejects_lengths_past_capacity():
    storage = np.zeros((1, 1, 4, 2), np.float32)
    with pytest.raises(ValueError, match=r"lengths\[0\] must be >= 0 and <= capacity = 4"):
        foveal.KVCache.wrap(storage, storage.copy(), lengths=[5])


# --------------------------------------------------------------------------------------------
# decode_attention.

DECODE_CASES = [
    # (B, Hq, Hkv, D, Dv, lengths of the sequences, Lq)
    (1, 1, 1, 1, 1, [1], 1),
    (2, 4, 2, 16, 16, [130, 7], 1),
    (3, 8, 2, 37, 19, [1025, 1, 300], 1),
    (1, 32, 8, 64, 64, [2100], 1),
    (2, 6, 3, 32, 40, [1030, 2050], 4),
    (1, 8, 1, 16, 16, [400], 9),  # 72 rows per head: more than one tile, no split
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES, ids=lambda c: f"B{c[0]}-Hq{c[1]}-Lq{c[6]}")
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(causal=True),
        dict(causal=True, window_left=100, sink_tokens=3),
        {"softcap": 5.0},
    ],
    ids=["full", "causal", "window-sinks", "softcap"],
)
def test_decode_matches_reference_on_ragged_batches(case, options, dtype, rng):
    batch, heads_q, heads_kv, dim, dim_v, lengths, len_q = case
    history = History(rng, batch, heads_kv, max(lengths), dim, dim_v, dtype)
    history.append(max(lengths), counts=lengths)
    q = random_q(rng, history.cache, heads_q, len_q, dtype)
    out, lse = foveal.decode_attention(q, history.cache, return_lse=True, **options)
    ref_out, ref_lse = history.reference(q, **options)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_equals_attention_over_the_same_keys(dtype, rng):
    history = History(rng, 1, 4, 5000, 64, 64, dtype)
    history.append(4500)
    q = random_q(rng, history.cache, 16, 3, dtype)
    out = foveal.decode_attention(q, history.cache, causal=True)
    keys = history.cache.keys[:, :, :4500]
    values = history.cache.values[:, :, :4500]
    assert_close(out, foveal.attention(q, keys, values, causal=True).astype(np.float64), dtype)


def test_decode_is_identical_for_any_thread_count(rng):
    history = History(rng, 2, 8, 5000, 128, 128, np.float32)
    history.append(5000, counts=[4999, 3333])
    q = random_q(rng, history.cache, 32, 1, np.float32)
    results = [foveal.decode_attention(q, history.cache, num_threads=n) for n in (1, 2, 3, 5)]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


def test_speculative_rollback(rng):
    """Verify 4 drafts (causal), reject the last 2, append 1 token: same as never drafting."""
    history = History(rng, 1, 2, 64, 16, 16, np.float32)
    history.append(20)
    history.append(4)
    q = random_q(rng, history.cache, 4, 4, np.float32)
    out = foveal.decode_attention(q, history.cache, causal=True)
    assert_close(out, history.reference(q, causal=True)[0], np.float32)
    history.truncate(22)
    history.append(1)
    q = random_q(rng, history.cache, 4, 1, np.float32)
    assert_close(foveal.decode_attention(q, history.cache), history.reference(q)[0], np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_matches_torch_gqa(dtype, torch, rng):
    k = torch.from_numpy(rng.standard_normal((1, 8, 3000, 128)).astype(dtype))
    v = torch.from_numpy(rng.standard_normal((1, 8, 3000, 128)).astype(dtype))
    q = torch.from_numpy(rng.standard_normal((1, 32, 1, 128)).astype(dtype))
    cache = foveal.KVCache(1, 8, 3000, 128, dtype=dtype)
    cache.append(k, v)
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    out = foveal.decode_attention(q, cache)
    assert isinstance(out, torch.Tensor)
    tol = 2e-5 if dtype == np.float32 else 1e-10
    torch.testing.assert_close(out, expected, rtol=0, atol=tol)


def test_ring_buffer_10000_steps_match_dense_masked_reference(rng):
    """10,000 single-token steps through a ring of window + 1 + sinks rows (W = 1024, 4 sinks):
    the cache never grows, and every 1000th step equals dense attention over the whole history
    under the explicit window-and-sinks mask."""
    window, sinks, steps = 1024, 4, 10000
    heads_q, heads_kv, dim = 4, 2, 16
    cache = foveal.KVCache(1, heads_kv, window + 1 + sinks, dim, ring=True, sink_tokens=sinks)
    keys = rng.standard_normal((1, heads_kv, steps, dim)).astype(np.float32)
    values = rng.standard_normal((1, heads_kv, steps, dim)).astype(np.float32)
    storage = cache.keys
    checked = 0
    for step in range(steps):
        cache.append(keys[:, :, step : step + 1], values[:, :, step : step + 1])
        q = rng.standard_normal((1, heads_q, 1, dim)).astype(np.float32)
        out = foveal.decode_attention(q, cache, causal=True, window_left=window, sink_tokens=sinks)
        if (step + 1) % 1000 == 0:
            length = step + 1
            mask = visible_keys(1, length, causal=True, window_left=window, sink_tokens=sinks)
            ref_out, _ = reference_attention(
                q, keys[:, :, :length], values[:, :, :length], bias=mask
            )
            assert_close(out, ref_out, np.float32, f"step {length}")
            checked += 1
    assert checked == 10
    assert cache.keys.shape == storage.shape and cache.keys.ctypes.data == storage.ctypes.data


def test_ring_with_speculative_queries_and_wrap(rng):
    window, sinks = 50, 2
    history = History(rng, 2, 2, window + 4 + sinks, 8, 8, np.float32, ring=True, sink_tokens=sinks)
    options = dict(causal=True, window_left=window, sink_tokens=sinks)
    for _ in range(30):
        history.append(4, counts=[4, 3])
        q = random_q(rng, history.cache, 4, 3, np.float32)
        out = foveal.decode_attention(q, history.cache, **options)
        assert_close(out, history.reference(q, **options)[0], np.float32)


def test_window_larger_than_the_ring_is_an_error(rng):
    cache = foveal.KVCache(1, 1, 20, 4, ring=True, sink_tokens=2)
    ones = np.ones((1, 1, 30, 4), np.float32)
    cache.append(ones, ones)
    q = np.ones((1, 1, 1, 4), np.float32)
    out = np.full((1, 1, 1, 4), 7.0, np.float32)
    with pytest.raises(ValueError, match=r"which the ring buffer .* no longer holds"):
        foveal.decode_attention(q, cache, causal=True, window_left=25, out=out)
    with pytest.raises(ValueError, match="no longer holds"):
        foveal.decode_attention(q, cache, causal=True, window_left=5, sink_tokens=4, out=out)
    assert (out == 7.0).all()
    foveal.decode_attention(q, cache, causal=True, window_left=17, sink_tokens=2, out=out)


@pytest.mark.parametrize(
    ("q_shape", "kwargs", "message", "error"),
    [
        ((1, 2, 5, 4), {}, "sequence 0 holds 4 tokens but Lq = 5", ValueError),
        ((2, 2, 1, 4), {}, r"q.shape\[0\] must equal cache.batch\(\)", ValueError),
        ((1, 2, 1, 3), {}, r"q.shape\[3\] must equal cache.dim\(\)", ValueError),
        ((1, 3, 1, 4), {}, "must be a multiple of cache.heads_kv", ValueError),
        ((1, 2, 1, 4), dict(window_left=-2), "window_left must be >= 0 or -1", ValueError),
        ((1, 2, 1, 4), dict(num_threads=-1), r"num_threads must be in \[0, 1024\]", ValueError),
    ],
)
def test_decode_bad_input(q_shape, kwargs, message, error):
    cache = foveal.KVCache(1, 2, 8, 4)
    ones = np.ones((1, 2, 4, 4), np.float32)
    cache.append(ones, ones)
    with pytest.raises(error, match=message):
        foveal.decode_attention(np.ones(q_shape, np.float32), cache, **kwargs)


def test_decode_needs_a_cache_and_its_dtype():
    cache = foveal.KVCache(1, 1, 4, 4)
    with pytest.raises(TypeError, match=r"cache must be a foveal\.KVCache"):
        foveal.decode_attention(np.ones((1, 1, 1, 4), np.float32), object())
    with pytest.raises(TypeError, match="dtype float32"):
        foveal.decode_attention(np.ones((1, 1, 1, 4)), cache)


# --------------------------------------------------------------------------------------------
# merge_states.


def merge_reference(out_a, lse_a, out_b, lse_b):
    m = np.maximum(lse_a, lse_b)
    safe = np.where(np.isfinite(m), m, 0.0)
    w_a, w_b = np.exp(lse_a - safe), np.exp(lse_b - safe)
    total = w_a + w_b
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (w_a[..., None] * out_a + w_b[..., None] * out_b) / total[..., None]
        lse = safe + np.log(total)
    empty = total == 0
    return np.where(empty[..., None], 0.0, out), np.where(empty, -np.inf, lse)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("pieces", [2, 3, 5])
def test_attention_over_split_keys_merges_to_attention_over_all(pieces, dtype, rng):
    """Split K/V at random points, attend to each piece under the piece's part of the mask,
    merge one piece at a time: equal to attention over all keys. Causal pieces leave some rows
    without keys (lse -inf), which must not disturb the merge."""
    len_q, len_k = 37, 301
    q = rng.standard_normal((2, 4, len_q, 24)).astype(dtype)
    k = rng.standard_normal((2, 2, len_k, 24)).astype(dtype)
    v = rng.standard_normal((2, 2, len_k, 20)).astype(dtype)
    inner = sorted(rng.choice(np.arange(1, len_k), pieces - 1, replace=False).tolist())
    cuts = [0, *inner, len_k]
    for causal in (False, True):
        visible = visible_keys(len_q, len_k, causal=causal)
        out = lse = None
        for begin, end in zip(cuts[:-1], cuts[1:]):
            piece = foveal.attention(
                q,
                k[:, :, begin:end],
                v[:, :, begin:end],
                bias=visible[:, begin:end],
                return_lse=True,
            )
            out, lse = piece if out is None else foveal.merge_states(out, lse, *piece)
        ref_out, ref_lse = reference_attention(q, k, v, causal=causal)
        assert_close(out, ref_out, dtype, f"causal={causal}")
        assert_close(lse, ref_lse, dtype, f"lse causal={causal}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_merge_matches_formula_with_minus_inf_states(dtype, rng):
    out_a = rng.standard_normal((2, 3, 5, 7)).astype(dtype)
    out_b = rng.standard_normal((2, 3, 5, 7)).astype(dtype)
    lse_a = rng.standard_normal((2, 3, 5)).astype(dtype)
    lse_b = rng.standard_normal((2, 3, 5)).astype(dtype)
    lse_a[0, 0, :2] = -np.inf  # one side empty
    lse_a[1, 2, 3] = lse_b[1, 2, 3] = -np.inf  # both empty
    out, lse = foveal.merge_states(out_a, lse_a, out_b, lse_b)
    ref_out, ref_lse = merge_reference(
        *(x.astype(np.float64) for x in (out_a, lse_a, out_b, lse_b))
    )
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")
    assert (out[1, 2, 3] == 0).all() and lse[1, 2, 3] == -np.inf


@pytest.mark.parametrize("in_place", ["a", "b"])
def test_merge_in_place_equals_out_of_place(in_place, rng):
    out_a = rng.standard_normal((1, 2, 9, 33)).astype(np.float32)
    out_b = rng.standard_normal((1, 2, 9, 33)).astype(np.float32)
    lse_a = rng.standard_normal((1, 2, 9)).astype(np.float32)
    lse_b = rng.standard_normal((1, 2, 9)).astype(np.float32)
    expected_out, expected_lse = foveal.merge_states(out_a, lse_a, out_b, lse_b)
    target_out, target_lse = (out_a, lse_a) if in_place == "a" else (out_b, lse_b)
    result = foveal.merge_states(out_a, lse_a, out_b, lse_b, out=target_out, lse=target_lse)
    assert result[0] is target_out and result[1] is target_lse
    np.testing.assert_array_equal(target_out, expected_out)
    np.testing.assert_array_equal(target_lse, expected_lse)


def test_merge_torch_in_torch_out(torch):
    out_a, out_b = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4)
    lse_a, lse_b = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    out, lse = foveal.merge_states(out_a, lse_a, out_b, lse_b)
    expected_lse = torch.logaddexp(lse_a, lse_b)
    weight_a = torch.exp(lse_a - expected_lse)[..., None]
    expected = weight_a * out_a + (1 - weight_a) * out_b
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(lse, expected_lse)
    torch.testing.assert_close(out, expected)


def test_merge_rejects_plus_inf_lse():
    out = np.zeros((1, 1, 3, 2), np.float32)
    lse = np.zeros((1, 1, 3), np.float32)
    lse_bad = lse.copy()
    lse_bad[0, 0, 2] = np.inf
    target = np.full_like(out, 7.0)
    with pytest.raises(ValueError, match=r"lse_b\[0, 0, 2\] = .*must be finite, -inf .* or NaN"):
        foveal.merge_states(out, lse, out, lse_bad, out=target)
    assert (target == 7.0).all()


def test_merge_propagates_nan_lse_to_its_row_only():
    out = np.ones((1, 1, 3, 2), np.float32)
    lse = np.zeros((1, 1, 3), np.float32)
    lse_nan = lse.copy()
    lse_nan[0, 0, 2] = np.nan
    merged, merged_lse = foveal.merge_states(out, lse, out, lse_nan)
    assert np.isnan(merged[0, 0, 2]).all() and np.isnan(merged_lse[0, 0, 2])
    assert np.isfinite(merged[0, 0, :2]).all() and np.isfinite(merged_lse[0, 0, :2]).all()


def test_merge_rejects_partial_overlap_and_shape_mismatch():
    storage = np.zeros((1, 1, 5, 2), np.float32)
    lse = np.zeros((1, 1, 4), np.float32)
    out_a, shifted = storage[:, :, :4], storage[:, :, 1:]
    with pytest.raises(ValueError, match="out must not overlap out_a"):
        foveal.merge_states(out_a, lse, out_a.copy(), lse.copy(), out=shifted)
    with pytest.raises(ValueError, match=r"out_b.shape\[3\] must equal out_a.shape\[3\]"):
        foveal.merge_states(out_a, lse, np.zeros((1, 1, 4, 3), np.float32), lse)


def test_merge_results_identical_for_any_thread_count(rng):
    states = [rng.standard_normal(s).astype(np.float32) for s in [(2, 8, 300, 64), (2, 8, 300)] * 2]
    results = [foveal.merge_states(*states, num_threads=n)[0] for n in (1, 2, 3)]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])
