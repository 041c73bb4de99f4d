"""foveal.sparsek.SparseKCache: constant-memory SparseK decode.

After appending tokens 0 .. p, ``attend`` with the query of position p is row p of
``foveal.sparsek_attention`` over the whole sequence. Every step of a 1,000-step
decode is compared with that prefill, for numpy and torch inputs; bad input raises ValueError or
TypeError naming the argument and changes nothing.
"""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from conftest import assert_rounded, on_amx_tiles
from foveal.sparsek import SparseKCache

TOLERANCE = {np.float32: 2e-5, np.float64: 1e-11}


def make_sequence(rng, batch, heads_kv, heads_q, length, dim, dim_v, dtype):
    """q, k, v and scores u (spread 1.5 plus a slope, so that tokens keep being evicted)."""
    q = rng.standard_normal((batch, heads_q, length, dim)).astype(dtype)
    k = rng.standard_normal((batch, heads_kv, length, dim)).astype(dtype)
    v = rng.standard_normal((batch, heads_kv, length, dim_v)).astype(dtype)
    u = (1.5 * rng.standard_normal((batch, heads_kv, length)) + 0.002 * np.arange(length)).astype(
        dtype
    )
    return q, k, v, u


def assert_close(got, want, tolerance):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    error = np.abs(got - want) / (1 + np.abs(want))
    worst = np.unravel_index(np.argmax(error), error.shape)
    assert error.max() <= tolerance, f"error {error.max():.3g} at {worst}"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "gate, window, sinks", [("value", 0, 0), ("kv", 16, 2), ("none", 5, 1), ("value", 16, 2)]
)
def test_every_step_of_1000_matches_prefill(rng, dtype, gate, window, sinks):
    length, topk = 1000, 24
    q, k, v, u = make_sequence(rng, 2, 2, 4, length, 8, 6, dtype)
    options = dict(window=window, sink_tokens=sinks, gate=gate)
    want, want_lse = foveal.sparsek_attention(q, k, v, u, topk, return_lse=True, **options)
    cache = SparseKCache(2, 2, 8, 6, topk=topk, dtype=dtype, **options)
    got = np.empty_like(want)
    got_lse = np.empty_like(want_lse)
    for p in range(length):
        cache.append(k[:, :, p : p + 1], v[:, :, p : p + 1], u[:, :, p : p + 1])
        out, lse = cache.attend(q[:, :, p : p + 1], return_lse=True)
        got[:, :, p : p + 1], got_lse[:, :, p : p + 1] = out, lse
        assert cache.stored_rows <= cache.capacity == sinks + window + topk
    assert_close(got, want, TOLERANCE[dtype])
    assert_close(got_lse, want_lse, TOLERANCE[dtype])
    assert cache.length == length


def test_torch_inputs_give_torch_outputs(rng, torch):
    q, k, v, u = make_sequence(rng, 1, 2, 6, 300, 5, 7, np.float32)
    want = foveal.sparsek_attention(q, k, v, u, 10, window=4)
    cache = SparseKCache(1, 2, 5, 7, topk=10, window=4)
    tensors = [torch.from_numpy(x) for x in (q, k, v, u)]
    for p in range(300):
        cache.append(
            tensors[1][:, :, p : p + 1], tensors[2][:, :, p : p + 1], tensors[3][:, :, p : p + 1]
        )
        out = cache.attend(tensors[0][:, :, p : p + 1])
        assert isinstance(out, torch.Tensor) and out.shape == (1, 6, 1, 7)
        assert_close(out.numpy(), want[:, :, p : p + 1], TOLERANCE[np.float32])


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
@pytest.mark.parametrize(
    "heads_q, dim, dim_v, gate", [(4, 8, 6, "value"), (2, 32, 16, "kv"), (12, 32, 16, "none")]
)
def test_half_storage_is_the_float32_cache_rounded(
    rng, torch, dtype_name, heads_q, dim, dim_v, gate
):
    # 16-bit K, V, u, q and out, float32 lse and gates: the float32 cache on the same values,
    # rounded (within bfloat16 rounding where the tiles of a 12-row group run on AMX).
    half = getattr(torch, dtype_name)
    arrays = make_sequence(rng, 1, 2, heads_q, 300, dim, dim_v, np.float32)
    q, k, v, u = (torch.from_numpy(x).to(half) for x in arrays)
    options = dict(topk=9, window=6, sink_tokens=1, gate=gate)
    single = SparseKCache(1, 2, dim, dim_v, **options)
    cache = SparseKCache(1, 2, dim, dim_v, dtype=dtype_name, **options)
    assert "bfloat16" in repr(cache) or "float16" in repr(cache)
    tiles = heads_q // 2 > 8 and on_amx_tiles(half, dim, dim_v)
    for p in range(300):
        step = slice(p, p + 1)
        cache.append(k[:, :, step], v[:, :, step], u[:, :, step])
        single.append(*(x[:, :, step].float() for x in (k, v, u)))
        out, lse = cache.attend(q[:, :, step], return_lse=True)
        want, want_lse = single.attend(q[:, :, step].float(), return_lse=True)
        assert out.dtype == half and lse.dtype == torch.float32
        if tiles:
            assert_rounded(out, want, dim, dim_v, lse, want_lse)
        else:
            assert torch.equal(out, want.to(half)), f"step {p}"
            assert torch.equal(lse, want_lse), f"step {p}"
    for head in range(2):
        positions, gates = cache.selected(0, head)
        want_positions, want_gates = single.selected(0, head)
        assert np.array_equal(positions, want_positions)
        assert gates.dtype == np.float32 and np.array_equal(gates, want_gates)


def test_half_storage_rejects_other_dtypes(rng, torch):
    cache = SparseKCache(1, 1, 4, 4, topk=2, dtype="bfloat16")
    rows = torch.zeros((1, 1, 1, 4), dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="u"):
        cache.append(rows, rows, torch.zeros((1, 1, 1)))
    with pytest.raises(TypeError, match="k"):
        cache.append(rows.float(), rows, torch.zeros((1, 1, 1), dtype=torch.bfloat16))
    assert cache.length == 0
    cache.append(rows, rows, torch.zeros((1, 1, 1), dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="lse"):
        cache._cache.attend(rows, rows.clone(), torch.zeros((1, 1, 1), dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="q"):
        cache.attend(rows.float())


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_a_huge_batch_of_no_heads_appends_and_attends_at_once(dtype):
    # Fuzz finding: B = 2^58 with Hkv = 0 looped over the batch to check no scores.
    from numpy.lib.stride_tricks import as_strided

    def broadcast(shape):
        return as_strided(np.zeros(1, dtype), shape, (0,) * len(shape))

    batch = 2**58
    cache = SparseKCache(batch, 0, 2, 1, topk=4, sink_tokens=3, dtype=dtype)
    cache.append(broadcast((batch, 0, 0, 2)), broadcast((batch, 0, 0, 1)), broadcast((batch, 0, 0)))
    cache.append(broadcast((batch, 0, 1, 2)), broadcast((batch, 0, 1, 1)), broadcast((batch, 0, 1)))
    assert cache.length == 1
    assert cache.attend(broadcast((batch, 0, 1, 2))).shape == (batch, 0, 1, 1)


def test_appending_several_tokens_equals_one_at_a_time(rng):
    q, k, v, u = make_sequence(rng, 2, 1, 3, 400, 4, 4, np.float64)
    single = SparseKCache(2, 1, 4, 4, topk=7, window=3, sink_tokens=2, dtype=np.float64)
    chunked = SparseKCache(2, 1, 4, 4, topk=7, window=3, sink_tokens=2, dtype=np.float64)
    p = 0
    for n in [1, 5, 80, 2, 33, 9, 70, 200]:
        for j in range(p, p + n):
            single.append(k[:, :, j : j + 1], v[:, :, j : j + 1], u[:, :, j : j + 1])
        chunked.append(k[:, :, p : p + n], v[:, :, p : p + n], u[:, :, p : p + n])
        p += n
        query = q[:, :, p - 1 : p]
        np.testing.assert_array_equal(chunked.attend(query), single.attend(query))
        for b in range(2):
            np.testing.assert_array_equal(chunked.selected(b, 0)[0], single.selected(b, 0)[0])
    assert chunked.length == single.length == 400


def test_selection_matches_sparsek_select(rng):
    _, _, _, u = make_sequence(rng, 1, 2, 2, 200, 1, 1, np.float64)
    cache = SparseKCache(1, 2, 3, 3, topk=6, window=4, sink_tokens=1, dtype=np.float64)
    zeros = np.zeros((1, 2, 200, 3))
    cache.append(zeros, zeros, u)
    indices, gates = foveal.sparsek.sparsek_select(u, 6, 200, window=4, sink_tokens=1)
    for h in range(2):
        positions, cache_gates = cache.selected(0, h)
        np.testing.assert_array_equal(positions, indices[0, h, -1])
        np.testing.assert_allclose(cache_gates, gates[0, h, -1], rtol=0, atol=1e-15)
        assert cache.threshold(0, h) > -np.inf
    assert cache.stored_rows == 1 + 4 + 6
    cache.reset()
    assert cache.length == 0 and cache.stored_rows == 0


def test_bad_input_raises_and_changes_nothing(rng):
    q, k, v, u = make_sequence(rng, 1, 2, 4, 10, 3, 2, np.float32)
    cache = SparseKCache(1, 2, 3, 2, topk=3, window=2)
    with pytest.raises(ValueError, match="empty"):
        cache.attend(q[:, :, :1])
    cache.append(k[:, :, :6], v[:, :, :6], u[:, :, :6])
    before = cache.attend(q[:, :, 5:6])

    bad_u = u[:, :, 6:9].copy()
    bad_u[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"u\[0, 1, 2\] \(position 8\) must be finite"):
        cache.append(k[:, :, 6:9], v[:, :, 6:9], bad_u)
    with pytest.raises(ValueError, match=r"k\.shape\[3\]"):
        cache.append(np.zeros((1, 2, 1, 4), np.float32), v[:, :, 6:7], u[:, :, 6:7])
    with pytest.raises(ValueError, match=r"u must have 3 dimensions"):
        cache.append(k[:, :, 6:7], v[:, :, 6:7], u[:, :, 6])
    with pytest.raises(TypeError, match=r"v must have dtype float32"):
        cache.append(k[:, :, 6:7], v[:, :, 6:7].astype(np.float64), u[:, :, 6:7])
    with pytest.raises(ValueError, match=r"q\.shape\[2\] \(Lq\) must be 1"):
        cache.attend(q[:, :, 4:6])
    with pytest.raises(ValueError, match=r"Hq = 3.*multiple"):
        cache.attend(q[:, :3, 5:6])
    with pytest.raises(TypeError, match=r"q must have dtype float32"):
        cache.attend(q[:, :, 5:6].astype(np.float64))
    assert cache.length == 6
    np.testing.assert_array_equal(cache.attend(q[:, :, 5:6]), before)

    with pytest.raises(ValueError, match="topk must be >= 1"):
        SparseKCache(1, 1, 2, topk=0)
    with pytest.raises(ValueError, match="window must be >= 0"):
        SparseKCache(1, 1, 2, topk=1, window=-1)
    with pytest.raises(ValueError, match='gate must be "value", "kv" or "none", got "soft"'):
        SparseKCache(1, 1, 2, topk=1, gate="soft")
    with pytest.raises(TypeError, match="dtype must be float32, float64, bfloat16 or float16"):
        SparseKCache(1, 1, 2, topk=1, dtype=np.int32)
    with pytest.raises(ValueError, match="sink_tokens must be >= 0"):
        SparseKCache(1, 1, 2, topk=1, sink_tokens=-1)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        SparseKCache(1, 1, 2, topk=1, scale=-2.0)
