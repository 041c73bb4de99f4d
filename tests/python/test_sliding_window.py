"""foveal.sliding_window_attention against the float64 reference and PyTorch.

Tolerances as in test_attention.py (conftest.TOLERANCE). The window is applied by the same
engine as foveal.attention, so the two are compared bitwise.
"""

from __future__ import annotations

import foveal
import numpy as np
import pytest
from conftest import DTYPES, assert_close, make_qkv, reference_attention, visible_keys

# (B, Hq, Hkv, Lq, Lk, D, Dv): ones, primes, non-multiples of the 64-row / 128-key tiles.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (2, 4, 2, 67, 67, 16, 16),
    (1, 8, 2, 129, 129, 64, 32),
    (1, 3, 1, 200, 331, 31, 13),
    (2, 6, 3, 300, 300, 80, 80),
]
WINDOWS = [(0, 0), (1, 0), (5, 0), (63, 0), (128, 0), (129, 0), (7, 3), (30, 64)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", WINDOWS, ids=lambda w: f"left{w[0]}-right{w[1]}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, window, dtype, rng):
    q, k, v = make_qkv(rng, shape, dtype)
    left, right = window
    out, lse = foveal.sliding_window_attention(
        q, k, v, window_left=left, window_right=right, return_lse=True
    )
    ref_out, ref_lse = reference_attention(q, k, v, window_left=left, window_right=right)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sinks", [1, 4, 130])
def test_sinks_softcap_and_q_offset(sinks, dtype, rng):
    q, k, v = make_qkv(rng, (2, 4, 2, 90, 260, 32, 24), dtype)
    kwargs = dict(window_left=40, causal=True, sink_tokens=sinks, softcap=20.0, q_offset=150)
    out, lse = foveal.sliding_window_attention(q, k, v, return_lse=True, **kwargs)
    ref_out, ref_lse = reference_attention(q, k, v, **kwargs)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES)
def test_equals_attention_with_the_same_window_bitwise(dtype, rng):
    q, k, v = make_qkv(rng, (1, 8, 2, 333, 333, 64, 64), dtype)
    kwargs = dict(window_left=77, causal=True, sink_tokens=3)
    out, lse = foveal.sliding_window_attention(q, k, v, return_lse=True, **kwargs)
    dense_out, dense_lse = foveal.attention(q, k, v, return_lse=True, **kwargs)
    np.testing.assert_array_equal(out, dense_out)
    np.testing.assert_array_equal(lse, dense_lse)


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_covering_the_sequence_is_causal_attention_bitwise(dtype, rng):
    q, k, v = make_qkv(rng, (1, 4, 4, 257, 257, 32, 32), dtype)
    out = foveal.sliding_window_attention(q, k, v, window_left=257, causal=True)
    np.testing.assert_array_equal(out, foveal.attention(q, k, v, causal=True))


@pytest.mark.parametrize("dtype", DTYPES)
def test_window_zero_attends_to_the_diagonal_only(dtype, rng):
    q, k, v = make_qkv(rng, (1, 2, 2, 50, 50, 8, 8), dtype)
    out = foveal.sliding_window_attention(q, k, v, window_left=0, causal=True)
    np.testing.assert_array_equal(out, v)


def test_results_identical_for_any_thread_count(rng):
    q, k, v = make_qkv(rng, (2, 8, 4, 301, 301, 64, 64), np.float32)
    results = [
        foveal.sliding_window_attention(q, k, v, window_left=70, causal=True, num_threads=n)
        for n in (1, 2, 3)
    ]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_with_boolean_mask(dtype, torch, rng):
    q, k, v = (torch.from_numpy(x) for x in make_qkv(rng, (1, 8, 2, 300, 300, 64, 64), dtype))
    mask = torch.from_numpy(visible_keys(300, 300, causal=True, window_left=50))
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=True
    )
    out = foveal.sliding_window_attention(q, k, v, window_left=50, causal=True)
    assert isinstance(out, torch.Tensor)
    tol = 2e-5 if dtype == np.float32 else 1e-10
    torch.testing.assert_close(out, expected, rtol=0, atol=tol * max(1.0, expected.abs().max()))


def test_registry_kernel_gives_the_same_bits(rng):
    q, k, v = make_qkv(rng, (1, 4, 2, 100, 100, 16, 16), np.float32)
    kernel = foveal.make_attention("sliding_window", window_left=9, causal=True)
    assert kernel.name == "sliding_window"
    expected = foveal.sliding_window_attention(q, k, v, window_left=9, causal=True)
    np.testing.assert_array_equal(kernel(q, k, v), expected)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(window_left=-1, causal=True), "window_left must be >= 0"),
        (dict(window_left=-5, causal=True), "window_left must be >= 0 or -1"),
        (dict(window_left=4), "the window's right side must be bounded"),
        (dict(window_left=4, window_right=-1), "set causal = true or window_right >= 0"),
        (dict(window_left=4, causal=True, sink_tokens=-1), "sink_tokens must be >= 0"),
    ],
)
def test_bad_windows_raise_value_error(kwargs, message, rng):
    q, k, v = make_qkv(rng, (1, 2, 2, 8, 8, 4, 4), np.float32)
    out = np.full((1, 2, 8, 4), 7.0, np.float32)
    with pytest.raises(ValueError, match=message):
        foveal.sliding_window_attention(q, k, v, out=out, **kwargs)
    assert (out == 7.0).all()


def test_window_left_is_required(rng):
    q, k, v = make_qkv(rng, (1, 1, 1, 4, 4, 4, 4), np.float32)
    with pytest.raises(TypeError, match="window_left"):
        foveal.sliding_window_attention(q, k, v, causal=True)


def test_registry_rejects_unbounded_windows():
    with pytest.raises(ValueError, match="window_left must be >= 0"):
        foveal.make_attention("sliding_window", causal=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_queries_past_the_last_key(dtype, rng):
    """Keys that are an earlier piece of a longer sequence: q_offset > Lk places the queries
    after them, and the window still counts in positions."""
    q, k, v = make_qkv(rng, (1, 4, 2, 20, 150, 16, 16), dtype)
    kwargs = dict(window_left=100, causal=True, q_offset=190)
    out, lse = foveal.sliding_window_attention(q, k, v, return_lse=True, **kwargs)
    ref_out, ref_lse = reference_attention(q, k, v, **kwargs)
    assert_close(out, ref_out, dtype)
    assert_close(lse, ref_lse, dtype, "lse")
