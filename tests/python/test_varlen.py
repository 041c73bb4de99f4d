"""Variable-length batches: ``key_start`` / ``key_length`` in foveal.attention,
sliding_window_attention, their backwards and foveal.torch, against the float64 references.

Batch row b's keys are the rows [key_start[b], key_start[b] + key_length[b]) of k and v;
positions stay absolute and the sinks are the first keys of each row's range. The reference is
the dense one with a boolean bias that shows each row exactly the keys the rule gives it.
"""

from __future__ import annotations

import importlib
from typing import Any

import foveal
import numpy as np
import pytest
from conftest import DTYPES, SEED, assert_close, make_qkv, reference_attention, visible_keys
from test_attention_backward import assert_gradient_close, reference_gradients


def row_masks(len_q: int, len_k: int, starts: list, lengths: list, **options) -> np.ndarray:
    """[B, 1, Lq, Lk] booleans: what each query of each row sees (conftest.visible_keys over
    the row's keys; positions absolute, sinks counted from the row's first key)."""
    return np.stack(
        [
            visible_keys(len_q, len_k, key_start=start, key_length=length, **options)[None]
            for start, length in zip(starts, lengths)
        ]
    )


def draw_ranges(rng: np.random.Generator, batch: int, len_k: int) -> tuple:
    """(starts, lengths): left, right and two-sided padding, rows of no keys and of every key."""
    starts, lengths = [], []
    for b in range(batch):
        kind = b % 4
        start = [0, len_k // 3, int(rng.integers(0, len_k + 1)), len_k][kind]
        room = len_k - start
        length = [room, room, int(rng.integers(0, room + 1)), 0][kind]
        starts.append(start)
        lengths.append(length)
    return starts, lengths


OPTIONS = {
    "none": {},
    "causal": {"causal": True},
    "causal-window-sinks": {"causal": True, "window_left": 13, "sink_tokens": 3},
    "two-sided-window": {"window_left": 20, "window_right": 6},
    "softcap-scale": {"causal": True, "softcap": 2.0, "scale": 0.4},
    "explicit-offset": {"causal": True, "q_offset": 40, "sink_tokens": 2},
}
REFERENCE_KEYS = ("scale", "softcap")


def mask_options(options: dict) -> dict:
    return {name: value for name, value in options.items() if name not in REFERENCE_KEYS}


def reference_options(options: dict) -> dict:
    return {name: value for name, value in options.items() if name in REFERENCE_KEYS}


SHAPES = [(4, 4, 2, 37, 70, 16, 8), (5, 3, 1, 1, 129, 8, 8), (4, 2, 2, 65, 65, 31, 5)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_reference(shape, name, dtype, rng):
    q, k, v = make_qkv(rng, shape, dtype)
    starts, lengths = draw_ranges(rng, shape[0], shape[4])
    options = OPTIONS[name]
    masks = row_masks(shape[3], shape[4], starts, lengths, **mask_options(options))
    want_out, want_lse = reference_attention(q, k, v, bias=masks, **reference_options(options))
    out, lse = foveal.attention(
        q, k, v, key_start=starts, key_length=lengths, return_lse=True, **options
    )
    assert_close(out, want_out, dtype)
    assert_close(lse, want_lse, dtype, "lse")
    if options.get("window_left", -1) >= 0:
        windowed = foveal.sliding_window_attention(
            q, k, v, key_start=starts, key_length=lengths, **options
        )
        np.testing.assert_array_equal(windowed, out)


def test_start_or_length_alone_and_any_integer_sequence(rng, torch):
    shape = (3, 2, 1, 20, 50, 8, 8)
    q, k, v = make_qkv(rng, shape, np.float64)
    starts = [0, 10, 49]
    masks = row_masks(20, 50, starts, [50, 40, 1], causal=True)
    want, _ = reference_attention(q, k, v, bias=masks)
    for given in (starts, tuple(starts), np.array(starts), torch.tensor(starts)):
        assert_close(foveal.attention(q, k, v, causal=True, key_start=given), want, np.float64)
    lengths = [5, 50, 0]
    masks = row_masks(20, 50, [0, 0, 0], lengths, causal=True)
    want, _ = reference_attention(q, k, v, bias=masks)
    got = foveal.attention(q, k, v, causal=True, key_length=np.array(lengths, dtype=np.int32))
    assert_close(got, want, np.float64)


def test_padding_keys_are_never_read(rng):
    shape = (3, 4, 2, 50, 200, 16, 16)
    q, k, v = make_qkv(rng, shape, np.float32)
    starts, lengths = [0, 130, 199], [130, 70, 1]
    poisoned_k, poisoned_v = k.copy(), v.copy()
    for b, (start, length) in enumerate(zip(starts, lengths)):
        for x in (poisoned_k, poisoned_v):
            x[b, :, :start] = np.nan
            x[b, :, start + length :] = np.nan
    ranges = {"key_start": starts, "key_length": lengths, "causal": True, "window_left": 30}
    clean = foveal.attention(q, k, v, **ranges)
    np.testing.assert_array_equal(foveal.attention(q, poisoned_k, poisoned_v, **ranges), clean)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["causal", "causal-window-sinks", "softcap-scale"])
def test_backward_matches_torch_autograd(name, dtype, rng, torch):
    shape = (4, 4, 2, 33, 70, 8, 8)
    q, k, v = make_qkv(rng, shape, dtype)
    grad_out = rng.standard_normal((4, 4, 33, 8)).astype(dtype)
    starts, lengths = draw_ranges(rng, 4, 70)
    options = OPTIONS[name]
    ranges = {"key_start": starts, "key_length": lengths}
    out, lse = foveal.attention(q, k, v, return_lse=True, **ranges, **options)
    grads = foveal.attention_backward(q, k, v, out, lse, grad_out, **ranges, **options)
    masks = row_masks(33, 70, starts, lengths, **mask_options(options))
    want = reference_gradients(torch, q, k, v, grad_out, bias=masks, **reference_options(options))
    for got, expected, what in zip(grads, want, ("grad_q", "grad_k", "grad_v")):
        assert_gradient_close(got, expected, dtype, what)
    if options.get("window_left", -1) >= 0:
        sliding = foveal.sliding_window_attention_backward(
            q, k, v, out, lse, grad_out, **ranges, **options
        )
        for got, expected in zip(sliding, grads):
            np.testing.assert_array_equal(got, expected)


def test_gradcheck(rng, torch):
    ftorch = importlib.import_module("foveal.torch")
    shape = (3, 2, 1, 6, 9, 3, 2)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, shape, np.float64))
    starts, lengths = torch.tensor([0, 3, 9]), torch.tensor([9, 4, 0])
    for options in ({"causal": True, "sink_tokens": 1}, {"window_left": 2, "window_right": 1}):
        assert torch.autograd.gradcheck(
            lambda q, k, v, options=options: ftorch.attention(
                q, k, v, key_start=starts, key_length=lengths, **options
            ),
            (q, k, v),
        )
    assert torch.autograd.gradcheck(
        lambda q, k, v: ftorch.sliding_window_attention(
            q, k, v, window_left=3, causal=True, key_start=starts, key_length=lengths
        ),
        (q, k, v),
    )


def test_torch_autograd_matches_the_reference_and_compiles(rng, torch):
    ftorch = importlib.import_module("foveal.torch")
    shape = (4, 4, 2, 20, 48, 8, 8)
    q, k, v = (torch.from_numpy(x) for x in make_qkv(rng, shape, np.float32))
    starts, lengths = draw_ranges(rng, 4, 48)
    grad_out = torch.randn(4, 4, 20, 8, generator=torch.Generator().manual_seed(SEED))

    def gradients(function: Any) -> list:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = function(*leaves)
        out.backward(grad_out)
        return [out.detach(), *(leaf.grad for leaf in leaves)]

    def run(q, k, v):
        return ftorch.attention(q, k, v, causal=True, key_start=starts, key_length=lengths)

    eager = gradients(run)
    masks = row_masks(20, 48, starts, lengths, causal=True)
    want_out, _ = reference_attention(q.numpy(), k.numpy(), v.numpy(), bias=masks)
    assert_close(eager[0].numpy(), want_out, np.float32)
    want = reference_gradients(torch, q.numpy(), k.numpy(), v.numpy(), grad_out.numpy(), bias=masks)
    for got, expected, what in zip(eager[1:], want, ("grad_q", "grad_k", "grad_v")):
        assert_gradient_close(got.numpy(), expected, np.float32, what)
    compiled = gradients(torch.compile(run, fullgraph=True, backend="eager"))
    for got, expected in zip(compiled, eager):
        assert torch.equal(got, expected)


def test_16_bit_storage(rng, torch):
    shape = (3, 4, 2, 40, 90, 16, 16)
    q, k, v = (torch.from_numpy(x).to(torch.bfloat16) for x in make_qkv(rng, shape, np.float32))
    starts, lengths = [0, 50, 20], [90, 40, 0]
    out = foveal.attention(q, k, v, causal=True, key_start=starts, key_length=lengths)
    assert out.dtype == torch.bfloat16
    masks = row_masks(40, 90, starts, lengths, causal=True)
    want, _ = reference_attention(*(x.float().numpy() for x in (q, k, v)), bias=masks)
    # bfloat16 keeps 8 bits: the output's rounding alone is 2^-9 of its size.
    np.testing.assert_allclose(out.float().numpy(), want, rtol=0, atol=1e-2)


def test_identical_bits_for_any_thread_count(rng):
    shape = (6, 4, 2, 100, 150, 16, 16)
    q, k, v = make_qkv(rng, shape, np.float32)
    starts, lengths = draw_ranges(rng, 6, 150)
    grad_out = rng.standard_normal((6, 4, 100, 16)).astype(np.float32)
    options = {"causal": True, "window_left": 40, "key_start": starts, "key_length": lengths}
    results = []
    for threads in (1, 2):
        out, lse = foveal.attention(q, k, v, return_lse=True, num_threads=threads, **options)
        grads = foveal.attention_backward(
            q, k, v, out, lse, grad_out, num_threads=threads, **options
        )
        results.append((out, lse, *grads))
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


@pytest.mark.parametrize(
    "ranges, error, message",
    [
        ({"key_start": [0, 1]}, ValueError, "key_start.shape[0] must equal q.shape[0] (B) = 3"),
        ({"key_start": []}, ValueError, "key_start.shape[0] must equal q.shape[0] (B) = 3"),
        ({"key_start": [0, 0, 11]}, ValueError, "key_start[2] must be in [0, Lk = 10], got 11"),
        ({"key_start": [0, -1, 0]}, ValueError, "key_start[1] must be in [0, Lk = 10], got -1"),
        (
            {"key_start": [4, 0, 0], "key_length": [7, 1, 1]},
            ValueError,
            "key_length[0] must be in [0, Lk - key_start[0] = 6], got 7",
        ),
        ({"key_length": [1.5, 1, 1]}, TypeError, "key_length must be a sequence of ints"),
        ({"key_length": 3}, TypeError, "key_length must be a sequence of ints"),
    ],
)
def test_bad_ranges_are_named_and_nothing_is_written(ranges, error, message, rng):
    q, k, v = make_qkv(rng, (3, 2, 1, 5, 10, 4, 4), np.float32)
    out = np.full((3, 2, 5, 4), 7.0, dtype=np.float32)
    with pytest.raises(error, match=_escaped(message)):
        foveal.attention(q, k, v, out=out, **ranges)
    assert (out == 7.0).all()


def _escaped(message: str) -> str:
    import re

    return re.escape(message)


@pytest.mark.parametrize("options", [{}, {"causal": True, "window_left": 9, "sink_tokens": 2}])
def test_decode_over_a_left_padded_cache(options, rng):
    """decode_attention's key_start: the newest tokens of left-padded sequences over their own
    keys, as attention with the same ranges over the cache's contents."""
    batch, heads_q, heads_kv, length, dim = 4, 4, 2, 40, 8
    _, k, v = make_qkv(rng, (batch, heads_q, heads_kv, 1, length, dim, dim), np.float64)
    cache = foveal.KVCache(batch, heads_kv, 64, dim, dim, dtype=np.float64)
    cache.append(k, v)
    starts = [0, 17, 39, 40]
    for len_q in (1, 3):
        q = rng.standard_normal((batch, heads_q, len_q, dim))
        step = dict(options, causal=len_q > 1)
        out, lse = foveal.decode_attention(q, cache, key_start=starts, return_lse=True, **step)
        masks = row_masks(len_q, length, starts, [length - s for s in starts], **step)
        want_out, want_lse = reference_attention(q, k, v, bias=masks)
        assert_close(out, want_out, np.float64)
        assert_close(lse, want_lse, np.float64, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_sparsek_rows_are_calls_on_their_own_keys(dtype, rng, torch):
    """sparsek_attention (forward, backward and foveal.torch's autograd) over a left-padded
    batch: each row gives the bits of the call on its own keys and scores."""
    import foveal.sparsek

    ftorch = importlib.import_module("foveal.torch")
    batch, length = 3, 60
    q, k, v = make_qkv(rng, (batch, 4, 2, 25, length, 8, 8), dtype)
    u = rng.standard_normal((batch, 2, length)).astype(dtype)
    starts = [0, 20, 59]
    options = {"window": 3, "sink_tokens": 1}
    out, lse = foveal.sparsek.sparsek_attention(
        q, k, v, u, 6, key_start=starts, return_lse=True, **options
    )
    grad_out = rng.standard_normal(out.shape).astype(dtype)
    grads = foveal.sparsek.sparsek_attention_backward(
        q, k, v, u, out, lse, grad_out, 6, key_start=starts, **options
    )
    leaves = [torch.from_numpy(x).requires_grad_() for x in (q, k, v, u)]
    taped = ftorch.sparsek_attention(*leaves, 6, key_start=torch.tensor(starts), **options)
    taped.backward(torch.from_numpy(grad_out))
    np.testing.assert_array_equal(taped.detach().numpy(), out)
    for leaf, grad in zip(leaves, grads):
        np.testing.assert_array_equal(leaf.grad.numpy(), grad)
    for b, start in enumerate(starts):
        keys = [x[b : b + 1, :, start:] for x in (k, v)]
        own_u = u[b : b + 1, :, start:]
        own_out, own_lse = foveal.sparsek.sparsek_attention(
            q[b : b + 1], *keys, own_u, 6, return_lse=True, **options
        )
        np.testing.assert_array_equal(out[b : b + 1], own_out)
        np.testing.assert_array_equal(lse[b : b + 1], own_lse)
        own = foveal.sparsek.sparsek_attention_backward(
            q[b : b + 1], *keys, own_u, own_out, own_lse, grad_out[b : b + 1], 6, **options
        )
        np.testing.assert_array_equal(grads[0][b : b + 1], own[0])
        for grad, own_grad in zip(grads[1:], own[1:]):
            np.testing.assert_array_equal(grad[b : b + 1, :, start:], own_grad)
            assert not grad[b, :, :start].any()  # padding keys: no gradient


def test_decode_and_sparsek_give_identical_bits_for_any_thread_count(rng):
    """decode_attention's key_start and SparseK's key ranges, forward and backward: 1, 2 and 3
    threads give the same bits."""
    import foveal.sparsek

    q, k, v = make_qkv(rng, (4, 4, 2, 30, 300, 16, 16), np.float32)
    u = rng.standard_normal((4, 2, 300)).astype(np.float32)
    grad_out = rng.standard_normal((4, 4, 30, 16)).astype(np.float32)
    cache = foveal.KVCache(4, 2, 512, 16, 16)
    cache.append(k, v)
    starts, lengths = [0, 100, 250, 299], [300, 150, 50, 1]
    results = []
    for threads in (1, 2, 3):
        decoded = foveal.decode_attention(
            q[:, :, -2:], cache, causal=True, key_start=starts, num_threads=threads
        )
        ranges = {"key_start": starts, "key_length": lengths, "num_threads": threads}
        out, lse = foveal.sparsek.sparsek_attention(
            q, k, v, u, 8, window=4, return_lse=True, **ranges
        )
        grads = foveal.sparsek.sparsek_attention_backward(
            q, k, v, u, out, lse, grad_out, 8, window=4, **ranges
        )
        results.append((decoded, out, lse, *grads))
    for other in results[1:]:
        for one, two in zip(results[0], other):
            np.testing.assert_array_equal(one, two)
