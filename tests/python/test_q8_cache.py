"""foveal.KVCache(dtype="int8"): the 8-bit KV cache and decode over it.

The cache quantizes every run of 32 values of an appended row to int8 with one float32 scale
(``max |x| / 127``, values rounded to nearest). The tests quantize by that spec in numpy, check
the cache's dequantized storage against it, and check decode (and Quest) against the float64
reference over the dequantized values the test computed itself (conftest.reference_attention).
"""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from conftest import (
    assert_close,
    bfloat16_toward,
    blocks_of,
    quantize_rows,
    reference_attention,
)


def filled(rng, lengths, heads_kv, dim, dim_v, capacity=None, outliers=0.0, **options):
    """An int8 cache grown to `lengths` by ragged appends, and per sequence the dequantized
    keys and values [Hkv, length, D] and the raw ones."""
    capacity = capacity or max(lengths)
    cache = foveal.KVCache(len(lengths), heads_kv, capacity, dim, dim_v, dtype="int8", **options)
    channel = np.ones(dim, np.float32)
    if outliers:
        channel[rng.choice(dim, 2, replace=False)] = 10.0**outliers
    raw = [[np.zeros((heads_kv, 0, dim)), np.zeros((heads_kv, 0, dim_v))] for _ in lengths]
    while any(cache.lengths[b] < n for b, n in enumerate(lengths)):
        steps = int(rng.choice([1, 5, 300, 1100]))
        counts = [max(0, min(steps, n - cache.lengths[b])) for b, n in enumerate(lengths)]
        k = (rng.standard_normal((len(lengths), heads_kv, steps, dim)) * channel).astype(np.float32)
        v = rng.standard_normal((len(lengths), heads_kv, steps, dim_v)).astype(np.float32)
        cache.append(k, v, counts=counts)
        for b, n in enumerate(counts):
            raw[b][0] = np.concatenate([raw[b][0], k[b, :, :n]], axis=1)
            raw[b][1] = np.concatenate([raw[b][1], v[b, :, :n]], axis=1)
    return cache, raw


def reference(q, raw, quantized=True, **options):
    outs, lses = [], []
    for b, (k, v) in enumerate(raw):
        if quantized:
            k, v = quantize_rows(k), quantize_rows(v)
        out, lse = reference_attention(q[b : b + 1], k[None], v[None], **options)
        outs.append(out)
        lses.append(lse)
    return np.concatenate(outs), np.concatenate(lses)


def test_stored_values_are_the_spec_and_within_half_a_step():
    rng = np.random.default_rng(1)
    cache, raw = filled(rng, [70], 2, 80, 33, outliers=2)
    keys, values = cache.keys, cache.values
    assert keys.dtype == np.float32 and keys.shape == (1, 2, 70, 80)
    assert values.shape == (1, 2, 70, 33)
    np.testing.assert_array_equal(keys[0], quantize_rows(raw[0][0]).astype(np.float32))
    np.testing.assert_array_equal(values[0], quantize_rows(raw[0][1]).astype(np.float32))
    k = raw[0][0]
    blocks = np.abs(np.pad(k, ((0, 0), (0, 0), (0, 16)))).reshape(2, 70, 3, 32).max(-1)
    step = np.repeat(blocks / 127, 32, axis=-1)[..., :80]
    assert (np.abs(keys[0] - k) <= step * (0.5 + 1e-5)).all()
    assert cache.dtype == np.int8
    assert "dtype=int8" in repr(cache)


@pytest.mark.parametrize("dim, dim_v", [(1, 5), (31, 64), (64, 64), (80, 128), (128, 96)])
@pytest.mark.parametrize("len_q, causal", [(1, False), (3, True), (20, True)])
def test_decode_matches_the_reference_over_the_dequantized_values(dim, dim_v, len_q, causal):
    rng = np.random.default_rng(dim * 100 + len_q)
    cache, raw = filled(rng, [1500, 37], 2, dim, dim_v)
    q = rng.standard_normal((2, 8, len_q, dim)).astype(np.float32)
    out, lse = foveal.decode_attention(q, cache, causal=causal, return_lse=True)
    assert out.dtype == np.float32 and lse.dtype == np.float32
    want, want_lse = reference(q, raw, causal=causal)
    assert_close(out, want, np.float32)
    assert_close(lse, want_lse, np.float32, "lse")


def test_ring_buffer_with_sinks_and_window():
    rng = np.random.default_rng(3)
    cache, raw = filled(rng, [2000, 900], 2, 64, 64, capacity=520, ring=True, sink_tokens=4)
    q = rng.standard_normal((2, 4, 1, 64)).astype(np.float32)
    options = dict(causal=True, window_left=500, sink_tokens=4)
    out = foveal.decode_attention(q, cache, **options)
    want, _ = reference(q, raw, **options)
    assert_close(out, want, np.float32)


def test_torch_tensors_and_identical_bits_for_any_thread_count():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    cache, raw = filled(rng, [3000], 8, 128, 128)
    q = torch.randn(1, 32, 1, 128, generator=torch.Generator().manual_seed(4))
    outs = [foveal.decode_attention(q, cache, num_threads=t) for t in (1, 2, 3)]
    assert outs[0].dtype == torch.float32
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    want, _ = reference(q.numpy(), raw)
    assert_close(outs[0].numpy(), want, np.float32)


def test_quest_over_an_int8_cache():
    rng = np.random.default_rng(5)
    cache, raw = filled(rng, [2000], 2, 64, 64, page_bounds=16)
    q = rng.standard_normal((1, 4, 1, 64)).astype(np.float32)
    np.testing.assert_array_equal(
        cache.page_bounds[0, 0, 0, 0], bfloat16_toward(cache.keys[0, 0, :16].min(axis=0), False)
    )
    out = foveal.quest_decode_attention(q, cache, budget=1.0)
    assert_close(out, reference(q, raw)[0], np.float32)
    sparse = foveal.quest_decode_attention(q, cache, budget=0.25)
    assert np.isfinite(sparse).all() and not np.array_equal(sparse, out)


def test_error_against_the_unquantized_floats():
    # The whole pipeline against float64 over the floats as appended: within 1% on Gaussian
    # keys (the values' rounding, ~0.8%, dominates); outlier channels cost more (the test of
    # tests/cpp/test_q8_cache.cpp measures them against one scale per row).
    rng = np.random.default_rng(6)
    cache, raw = filled(rng, [4096], 2, 128, 128)
    q = rng.standard_normal((1, 8, 1, 128)).astype(np.float32)
    out = foveal.decode_attention(q, cache)
    exact, _ = reference(q, raw, quantized=False)
    error = np.linalg.norm(out - exact) / np.linalg.norm(exact)
    assert 1e-4 < error < 1e-2, error


def test_bad_dtypes_are_named_and_change_nothing():
    cache = foveal.KVCache(1, 2, 8, 32, dtype="int8")
    k = np.ones((1, 2, 3, 32))
    with pytest.raises(
        TypeError, match=r"k must have dtype float32 \(an 8-bit cache takes float32\)"
    ):
        cache.append(k, k)
    assert cache.lengths == [0]
    cache.append(k.astype(np.float32), k.astype(np.float32))
    out = np.full((1, 4, 1, 32), 7.0, np.float32)
    with pytest.raises(
        TypeError, match=r"q must have dtype float32 \(an 8-bit cache takes float32\)"
    ):
        foveal.decode_attention(np.zeros((1, 4, 1, 32)), cache, out=out)
    assert (out == 7).all()
    with pytest.raises(
        TypeError, match="dtype must be float32, float64, bfloat16, float16 or int8"
    ):
        foveal.KVCache(1, 2, 8, 8, dtype="int16")


def test_wrapped_uint8_storage_holds_the_blocks_and_decodes_like_an_owned_cache():
    """KVCache.wrap of uint8 [B, Hkv, capacity, blocks, 36]: appends write the spec's blocks
    into the caller's bytes, decode gives the owned int8 cache's bits, and storage filled
    elsewhere (here: a copy) is adopted through lengths."""
    rng = np.random.default_rng(5)
    owned, raw = filled(rng, [50], 2, 96, 64)
    keys = np.zeros((1, 2, 64, 3, 36), np.uint8)
    values = np.zeros((1, 2, 64, 2, 36), np.uint8)
    cache = foveal.KVCache.wrap(keys, values)
    assert cache.dtype == np.int8 and cache.dim == 96 and cache.dim_v == 64
    k, v = (x.astype(np.float32)[None] for x in raw[0])
    cache.append(k, v)
    want = quantize_rows(k[0]).astype(np.float32)
    np.testing.assert_array_equal(blocks_of(keys)[0, :, :50], want)
    np.testing.assert_array_equal(cache.keys[0, :, :50], want)
    q = rng.standard_normal((1, 8, 1, 96)).astype(np.float32)
    out, lse = foveal.decode_attention(q, cache, return_lse=True)
    want_out, want_lse = foveal.decode_attention(q, owned, return_lse=True)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)
    adopted = foveal.KVCache.wrap(keys.copy(), values.copy(), lengths=[50])
    np.testing.assert_array_equal(foveal.decode_attention(q, adopted), out)


def test_wrapped_uint8_storage_of_a_bad_layout_is_rejected():
    good = np.zeros((1, 1, 8, 2, 36), np.uint8)
    with pytest.raises(ValueError, match="36 bytes"):
        foveal.KVCache.wrap(np.zeros((1, 1, 8, 2, 35), np.uint8), good)
    with pytest.raises(ValueError, match="aligned"):
        foveal.KVCache.wrap(np.zeros((1, 1, 8, 2, 37), np.uint8)[..., 1:], good)
    with pytest.raises(ValueError, match="stride"):
        foveal.KVCache.wrap(np.zeros((1, 1, 8, 4, 36), np.uint8)[:, :, :, ::2], good)
    with pytest.raises(ValueError, match="whole number"):  # sequences 580 bytes apart
        wide = np.zeros((2, 1, 8 * 2 * 36 + 4), np.uint8)[..., : 8 * 2 * 36]
        foveal.KVCache.wrap(wide.reshape(2, 1, 8, 2, 36), good)
    with pytest.raises(TypeError, match="uint8"):
        foveal.KVCache.wrap(good, np.zeros((1, 1, 8, 2, 36), np.float32))
