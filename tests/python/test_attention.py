"""foveal.attention against the float64 reference, against PyTorch, and its memory contract.

Tolerances (elementwise, relative to the size of the result):
  float32: |out - ref| <= 2e-5 * max(1, max|ref|)   (a few float32 ulps of softmax rounding)
  float64: |out - ref| <= 1e-10 * max(1, max|ref|)
lse gets the same bounds relative to max(1, max|lse|). Every case names its seed in its id.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import foveal
import numpy as np
import pytest
from conftest import (
    DTYPES,
    SEED,
    assert_close,
    make_qkv,
    reference_attention,
    visible_keys,
)


def make_bias(rng: np.random.Generator, kind: str, shape: tuple, dtype: Any) -> np.ndarray:
    """A bias of the named layout: 2d [Lq, Lk], 3d [Hq, Lq, Lk], 4d-b1 [1, Hq, ...],
    4d-h1 [B, 1, ...], 4d [B, Hq, ...]; bool* are masks with about 30% of entries False."""
    batch, heads_q, _, len_q, len_k, _, _ = shape
    layout = kind.removeprefix("bool")
    dims = {
        "2d": (len_q, len_k),
        "3d": (heads_q, len_q, len_k),
        "4d-b1": (1, heads_q, len_q, len_k),
        "4d-h1": (batch, 1, len_q, len_k),
        "4d": (batch, heads_q, len_q, len_k),
    }[layout]
    if kind.startswith("bool"):
        return rng.random(dims) > 0.3
    return rng.standard_normal(dims).astype(dtype)


# ---------------------------------------------------------------------------------------------
# Against the float64 reference: hand-picked shapes x every option.

# (B, Hq, Hkv, Lq, Lk, D, Dv): 1, primes, non-multiples of the 64-row tile, Lq < Lk and
# Lq > Lk, GQA ratios 1 / 2 / 3 / 8, Dv != D.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (1, 2, 2, 1, 67, 16, 16),
    (2, 3, 3, 13, 13, 8, 8),
    (1, 4, 2, 65, 130, 32, 24),
    (2, 6, 2, 97, 61, 17, 33),
    (1, 8, 1, 70, 70, 64, 64),
    (3, 2, 1, 31, 129, 5, 7),
    (1, 3, 1, 129, 37, 40, 3),
]

# name -> options for (Lq, Lk). Scales and softcaps are exact float32 numbers (see
# test_float64_scale_keeps_float64_precision for others).
OPTIONS: dict[str, Callable[[int, int], dict]] = {
    "default": lambda lq, lk: {},
    "scale": lambda lq, lk: {"scale": 0.3125},
    "causal": lambda lq, lk: {"causal": True},
    "causal-top-left": lambda lq, lk: {"causal": True, "q_offset": 0},
    "window": lambda lq, lk: {"window_left": 5, "window_right": 2},
    "window-left-only": lambda lq, lk: {"window_left": 11},
    "window-right-only": lambda lq, lk: {"window_right": 3, "q_offset": 0},
    "window-zero": lambda lq, lk: {"window_left": 0, "window_right": 0},
    "sliding-causal-sinks": lambda lq, lk: {"causal": True, "window_left": 7, "sink_tokens": 3},
    "sinks-only-window": lambda lq, lk: {"window_left": 0, "window_right": 0, "sink_tokens": 70},
    "softcap": lambda lq, lk: {"softcap": 2.5, "scale": 0.5},
    "q-offset": lambda lq, lk: {"q_offset": lk // 2, "causal": True},
    "q-offset-end": lambda lq, lk: {"q_offset": lk, "window_left": 40},
    "bias-2d": lambda lq, lk: {"bias": "2d"},
    "bias-3d": lambda lq, lk: {"bias": "3d"},
    "bias-4d-b1": lambda lq, lk: {"bias": "4d-b1"},
    "bias-4d-h1": lambda lq, lk: {"bias": "4d-h1"},
    "bias-4d": lambda lq, lk: {"bias": "4d"},
    "mask-2d": lambda lq, lk: {"bias": "bool2d"},
    "mask-4d": lambda lq, lk: {"bias": "bool4d"},
    "everything": lambda lq, lk: {
        "scale": 0.25,
        "causal": True,
        "window_left": 9,
        "sink_tokens": 2,
        "softcap": 3.0,
        "q_offset": lk // 3,
        "bias": "4d-b1",
    },
}


def run_case(shape: tuple, options: dict, dtype: Any, rng: np.random.Generator):
    q, k, v = make_qkv(rng, shape, dtype)
    options = dict(options)
    if "bias" in options:
        options["bias"] = make_bias(rng, options["bias"], shape, dtype)
    out, lse = foveal.attention(q, k, v, return_lse=True, **options)
    expected_out, expected_lse = reference_attention(q, k, v, **options)
    return out, lse, expected_out, expected_lse


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("option_name", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, option_name, dtype, rng):
    options = OPTIONS[option_name](shape[3], shape[4])
    out, lse, expected_out, expected_lse = run_case(shape, options, dtype, rng)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and lse.dtype == dtype
    assert out.shape == (*shape[:2], shape[3], shape[6]) and lse.shape == (*shape[:2], shape[3])
    assert_close(out, expected_out, dtype, "out")
    assert_close(lse, expected_lse, dtype, "lse")


def random_case(seed: int):
    """A random shape and a random combination of options (seeded)."""
    case_rng = np.random.default_rng(seed)
    pick = lambda values: values[int(case_rng.integers(len(values)))]  # noqa: E731
    heads_kv = pick([1, 2, 3])
    lengths = [1, 2, 3, 7, 13, 31, 63, 64, 65, 97, 128, 131]
    dim = pick([1, 2, 3, 8, 17, 32, 63, 80])
    shape = (
        pick([1, 2, 3]),
        heads_kv * pick([1, 2, 3, 4]),
        heads_kv,
        pick(lengths),
        pick(lengths),
        dim,
        pick([dim, dim, 1, 5, 16, 24]),
    )
    len_k = shape[4]
    options: dict = {}
    if case_rng.random() < 0.3:
        options["scale"] = float(np.float32(case_rng.uniform(0.05, 1.5)))
    if case_rng.random() < 0.4:
        options["causal"] = True
    if case_rng.random() < 0.4:
        options["window_left"] = pick([0, 1, 4, 17, 100])
    if not options.get("causal") and case_rng.random() < 0.3:
        options["window_right"] = pick([0, 1, 6, 70])
    if case_rng.random() < 0.3:
        options["sink_tokens"] = pick([1, 3, 64, 200])
    if case_rng.random() < 0.3:
        options["softcap"] = float(np.float32(case_rng.uniform(0.5, 10.0)))
    if case_rng.random() < 0.3:
        options["q_offset"] = int(case_rng.integers(0, len_k + 1))
    if case_rng.random() < 0.4:
        options["bias"] = pick(["2d", "3d", "4d-b1", "4d-h1", "4d", "bool2d", "bool4d"])
    return shape, options


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(30), ids=lambda s: f"seed{s}")
def test_matches_reference_random(seed, dtype):
    shape, options = random_case(seed)
    out, lse, expected_out, expected_lse = run_case(
        shape, options, dtype, np.random.default_rng(seed)
    )
    context = f"seed {seed}: shape {shape}, options {options}"
    try:
        assert_close(out, expected_out, dtype, "out")
        assert_close(lse, expected_lse, dtype, "lse")
    except AssertionError as error:
        raise AssertionError(f"{context}\n{error}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_lse_is_optional_and_does_not_change_out(dtype, rng):
    q, k, v = make_qkv(rng, (2, 4, 2, 33, 70, 16, 16), dtype)
    out = foveal.attention(q, k, v, causal=True)
    out_with_lse, _ = foveal.attention(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, np.ndarray)
    assert np.array_equal(out, out_with_lse)


# ---------------------------------------------------------------------------------------------
# Properties that read like the contract.


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_rows_sum_to_one(dtype, rng):
    q, k, _ = make_qkv(rng, (2, 4, 2, 40, 90, 16, 1), dtype)
    ones = np.ones((2, 2, 90, 8), dtype=dtype)
    out = foveal.attention(q, k, ones, window_left=20, window_right=3)
    assert_close(out, np.ones(out.shape), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_default_scale_is_inverse_sqrt_of_d(dtype, rng):
    q, k, v = make_qkv(rng, (1, 2, 2, 10, 20, 16, 8), dtype)
    # D = 16: 1/sqrt(D) = 0.25 exactly, so both calls run the same arithmetic.
    assert np.array_equal(foveal.attention(q, k, v), foveal.attention(q, k, v, scale=0.25))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_window_zero_sees_only_its_own_position(dtype, rng):
    q, k, v = make_qkv(rng, (2, 3, 1, 20, 50, 8, 8), dtype)
    out, lse = foveal.attention(
        q, k, v, window_left=0, window_right=0, q_offset=17, return_lse=True
    )
    expected = np.broadcast_to(v[:, :, 17:37], out.shape)
    assert_close(out, expected.astype(np.float64), dtype)
    logits = np.einsum(
        "bhid,bhid->bhi",
        q.astype(np.float64),
        np.broadcast_to(k[:, :, 17:37], q.shape).astype(np.float64),
    )
    assert_close(lse, logits / math.sqrt(8), dtype, "lse")


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_causal_is_window_right_zero(dtype, rng):
    q, k, v = make_qkv(rng, (1, 4, 2, 77, 100, 16, 16), dtype)
    assert np.array_equal(
        foveal.attention(q, k, v, causal=True), foveal.attention(q, k, v, window_right=0)
    )
    assert np.array_equal(
        foveal.attention(q, k, v, causal=True),
        foveal.attention(q, k, v, causal=True, window_right=0),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_default_q_offset_is_bottom_right(dtype, rng):
    q, k, v = make_qkv(rng, (1, 2, 2, 30, 75, 8, 8), dtype)
    default = foveal.attention(q, k, v, causal=True)
    assert np.array_equal(default, foveal.attention(q, k, v, causal=True, q_offset=45))
    assert np.array_equal(default, foveal.attention(q, k, v, causal=True, q_offset=-1))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_windows_wider_than_the_sequence_are_unbounded(dtype, rng):
    q, k, v = make_qkv(rng, (1, 2, 1, 40, 70, 8, 8), dtype)
    unbounded = foveal.attention(q, k, v)
    wide = foveal.attention(q, k, v, window_left=10**12, window_right=10**15)
    assert np.array_equal(unbounded, wide)
    assert np.array_equal(foveal.attention(q, k, v, sink_tokens=10**9), unbounded)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_boolean_mask_equals_zero_minus_inf_bias(dtype, rng):
    q, k, v = make_qkv(rng, (2, 2, 2, 50, 66, 8, 8), dtype)
    mask = rng.random((2, 1, 50, 66)) > 0.5
    as_bias = np.where(mask, 0.0, -np.inf).astype(dtype)
    assert np.array_equal(
        foveal.attention(q, k, v, bias=mask), foveal.attention(q, k, v, bias=as_bias)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_broadcast_bias_equals_expanded_bias(dtype, rng):
    shape = (2, 4, 2, 37, 70, 8, 8)
    q, k, v = make_qkv(rng, shape, dtype)
    full = (2, 4, 37, 70)
    for kind in ["2d", "3d", "4d-b1", "4d-h1", "bool2d", "bool4d"]:
        bias = make_bias(rng, kind, shape, dtype)
        expanded = np.ascontiguousarray(np.broadcast_to(bias, full))
        assert np.array_equal(
            foveal.attention(q, k, v, bias=bias), foveal.attention(q, k, v, bias=expanded)
        ), kind
    # A stride-0 view and a transposed view of a bias are read in place.
    bias = make_bias(rng, "2d", shape, dtype)
    expanded = np.ascontiguousarray(np.broadcast_to(bias, full))
    assert np.array_equal(
        foveal.attention(q, k, v, bias=np.broadcast_to(bias, full)),
        foveal.attention(q, k, v, bias=expanded),
    )
    transposed = np.ascontiguousarray(bias.T).T
    assert np.array_equal(
        foveal.attention(q, k, v, bias=transposed), foveal.attention(q, k, v, bias=expanded)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_any_strides_but_the_innermost(dtype, rng):
    q, k, v = make_qkv(rng, (2, 4, 2, 40, 140, 16, 12), dtype)
    q_view = q[::-1, :, ::-1]  # negative strides
    k_view = k[:, :, ::2]  # every other key
    v_view = v[:, ::-1, ::2]
    expected = foveal.attention(*map(np.ascontiguousarray, (q_view, k_view, v_view)), causal=True)
    assert np.array_equal(foveal.attention(q_view, k_view, v_view, causal=True), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_float64_scale_keeps_float64_precision(dtype, rng):
    """Scales and softcaps that are not float32 numbers are honored to the input's precision."""
    q, k, v = make_qkv(rng, (1, 2, 2, 9, 21, 16, 8), dtype)
    for options in [{"scale": 0.1}, {"scale": 0.7, "softcap": 0.3}]:
        out = foveal.attention(q, k, v, **options)
        assert_close(out, reference_attention(q, k, v, **options)[0], dtype, str(options))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_tiny_scale_is_not_replaced_by_the_default(dtype, rng):
    """A positive scale is used as given, however small (it must not become 0 = default)."""
    q, k, v = make_qkv(rng, (1, 1, 1, 4, 6, 16, 4), dtype)
    out = foveal.attention(q, k, v, scale=1e-50)
    # scale ~ 0: every logit ~ 0, so each row averages v.
    expected = np.broadcast_to(v.astype(np.float64).mean(axis=2, keepdims=True), out.shape)
    assert_close(out, expected, dtype)


# ---------------------------------------------------------------------------------------------
# Rows that see no key; empty inputs.


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_fully_masked_rows_give_zero_and_minus_inf(dtype, rng):
    q, k, v = make_qkv(rng, (2, 2, 1, 70, 30, 8, 8), dtype)
    cases = {
        # Lq > Lk, bottom-right causal: the first 40 queries precede every key.
        "causal": ({"causal": True}, np.arange(70) < 40),
        # Every query sits past the last key and sees only its own position.
        "window": ({"q_offset": 30, "window_left": 0, "window_right": 0}, np.ones(70, bool)),
        "bool-mask": ({"bias": np.arange(70)[:, None] % 3 != np.zeros((1, 30))}, None),
        "float-mask": (
            {
                "bias": np.where(
                    np.arange(70)[:, None] % 3 == 0, -np.inf, np.zeros((1, 30))
                ).astype(dtype)
            },
            None,
        ),
    }
    for name, (options, masked_rows) in cases.items():
        if masked_rows is None:
            masked_rows = np.arange(70) % 3 == 0
        out, lse = foveal.attention(q, k, v, return_lse=True, **options)
        assert not np.isnan(out).any() and not np.isnan(lse).any(), name
        assert np.all(out[:, :, masked_rows] == 0), name
        assert np.all(lse[:, :, masked_rows] == -np.inf), name
        assert np.all(np.isfinite(lse[:, :, ~masked_rows])), name
        expected_out, expected_lse = reference_attention(q, k, v, **options)
        assert_close(out, expected_out, dtype, name)
        assert_close(lse, expected_lse, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_sinks_rescue_rows_outside_the_window(dtype, rng):
    q, k, v = make_qkv(rng, (1, 2, 2, 5, 9, 4, 4), dtype)
    out = foveal.attention(q, k, v, q_offset=9, window_left=0, window_right=0, sink_tokens=1)
    assert_close(out, np.broadcast_to(v[:, :, :1], out.shape).astype(np.float64), dtype)


EMPTY_SHAPES = {
    "Lq=0": (1, 2, 1, 0, 5, 4, 3),
    "Lk=0": (1, 2, 1, 5, 0, 4, 3),
    "B=0": (0, 2, 1, 5, 5, 4, 3),
    "H=0": (1, 0, 0, 5, 5, 4, 3),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(EMPTY_SHAPES))
def test_empty_inputs(name, dtype, rng):
    shape = EMPTY_SHAPES[name]
    q, k, v = make_qkv(rng, shape, dtype)
    out, lse = foveal.attention(q, k, v, return_lse=True)
    batch, heads_q, _, len_q, _, _, dim_v = shape
    assert out.shape == (batch, heads_q, len_q, dim_v) and lse.shape == (batch, heads_q, len_q)
    assert np.all(out == 0) and np.all(lse == -np.inf)


def test_empty_torch_inputs(torch):
    q = torch.zeros(1, 2, 0, 4)
    k = torch.ones(1, 1, 5, 4)
    out, _ = foveal.attention(q, k, k, return_lse=True)
    assert isinstance(out, torch.Tensor) and tuple(out.shape) == (1, 2, 0, 4)
    out = foveal.attention(torch.ones(1, 2, 3, 4), torch.zeros(1, 1, 0, 4), torch.zeros(1, 1, 0, 4))
    assert torch.equal(out, torch.zeros(1, 2, 3, 4))


# ---------------------------------------------------------------------------------------------
# Agreement with torch.nn.functional.scaled_dot_product_attention.


def torch_case(torch, rng, shape, dtype):
    q, k, v = make_qkv(rng, shape, dtype)
    return q, k, v, torch.from_numpy(q), torch.from_numpy(k), torch.from_numpy(v)


TORCH_SHAPES = [(2, 4, 4, 33, 33, 16, 16), (1, 3, 3, 70, 129, 32, 24), (2, 2, 2, 97, 45, 8, 8)]


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("shape", TORCH_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_torch_non_causal(shape, dtype, torch, rng):
    *_, tq, tk, tv = torch_case(torch, rng, shape, dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    out = foveal.attention(tq, tk, tv)
    assert isinstance(out, torch.Tensor) and out.dtype == tq.dtype
    assert_close(out.numpy(), expected.double().numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_torch_causal_square(dtype, torch, rng):
    *_, tq, tk, tv = torch_case(torch, rng, (2, 4, 4, 100, 100, 16, 16), dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    assert_close(
        foveal.attention(tq, tk, tv, causal=True).numpy(), expected.double().numpy(), dtype
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("lengths", [(37, 100), (100, 37)], ids=["Lq<Lk", "Lq>Lk"])
def test_torch_causal_bottom_right(lengths, dtype, torch, rng):
    """torch's is_causal is top-left aligned; foveal's default is bottom-right, as this mask."""
    len_q, len_k = lengths
    *_, tq, tk, tv = torch_case(torch, rng, (1, 2, 2, len_q, len_k, 16, 16), dtype)
    mask = visible_keys(len_q, len_k, causal=True)
    seen = mask.any(axis=1)  # torch gives NaN for rows that see nothing; foveal gives 0
    expected = torch.nn.functional.scaled_dot_product_attention(
        tq, tk, tv, attn_mask=torch.from_numpy(mask)
    )
    out = foveal.attention(tq, tk, tv, causal=True).numpy()
    assert_close(out[:, :, seen], expected.double().numpy()[:, :, seen], dtype)
    assert np.all(out[:, :, ~seen] == 0)
    # And q_offset=0 is torch's top-left alignment.
    top_left = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    assert_close(
        foveal.attention(tq, tk, tv, causal=True, q_offset=0).numpy(),
        top_left.double().numpy(),
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("heads", [(4, 2), (6, 2), (8, 1)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_torch_gqa(heads, dtype, torch, rng):
    heads_q, heads_kv = heads
    *_, tq, tk, tv = torch_case(torch, rng, (2, heads_q, heads_kv, 65, 80, 16, 20), dtype)
    expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, enable_gqa=True)
    assert_close(foveal.attention(tq, tk, tv).numpy(), expected.double().numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_torch_explicit_scale(dtype, torch, rng):
    *_, tq, tk, tv = torch_case(torch, rng, (1, 2, 2, 40, 50, 24, 24), dtype)
    for scale in [0.0625, 0.5, 1.25]:  # float32 numbers (see test_float64_scale_keeps_...)
        expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, scale=scale)
        assert_close(
            foveal.attention(tq, tk, tv, scale=scale).numpy(),
            expected.double().numpy(),
            dtype,
            f"scale {scale}",
        )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_torch_masks_as_bias(dtype, torch, rng):
    *_, tq, tk, tv = torch_case(torch, rng, (2, 3, 3, 45, 70, 16, 16), dtype)
    float_mask = torch.from_numpy(rng.standard_normal((2, 1, 45, 70)).astype(dtype))
    bool_mask = torch.from_numpy(rng.random((45, 70)) > 0.4)
    bool_mask[:, 0] = True  # every row sees a key (torch gives NaN otherwise)
    for mask in [float_mask, bool_mask]:
        expected = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=mask)
        assert_close(
            foveal.attention(tq, tk, tv, bias=mask).numpy(),
            expected.double().numpy(),
            dtype,
            f"mask {mask.dtype}",
        )


# ---------------------------------------------------------------------------------------------
# Memory: output kinds, zero-copy views, out=, threads.


def test_numpy_in_numpy_out(rng):
    q, k, v = make_qkv(rng, (1, 2, 1, 5, 6, 4, 3), np.float32)
    out, lse = foveal.attention(q, k, v, return_lse=True)
    assert type(out) is np.ndarray and type(lse) is np.ndarray
    assert out.dtype == np.float32 and lse.dtype == np.float32


def test_torch_in_torch_out(torch, rng):
    _, _, _, tq, tk, tv = torch_case(torch, rng, (1, 2, 1, 5, 6, 4, 3), np.float64)
    out, lse = foveal.attention(tq, tk, tv, return_lse=True)
    assert isinstance(out, torch.Tensor) and isinstance(lse, torch.Tensor)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    assert tuple(out.shape) == (1, 2, 5, 3) and tuple(lse.shape) == (1, 2, 5)
    # The first tensor decides the kind.
    assert isinstance(foveal.attention(tq, tk.numpy(), tv.numpy()), torch.Tensor)
    assert isinstance(foveal.attention(tq.numpy(), tk, tv), np.ndarray)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_blhd_numpy_views_equal_contiguous_copies(dtype, rng):
    # [B, L, H, D] memory, as a model holds it after the projection.
    q_blhd = rng.standard_normal((2, 70, 4, 16)).astype(dtype)
    k_blhd = rng.standard_normal((2, 90, 2, 16)).astype(dtype)
    v_blhd = rng.standard_normal((2, 90, 2, 8)).astype(dtype)
    views = [x.transpose(0, 2, 1, 3) for x in (q_blhd, k_blhd, v_blhd)]
    copies = [np.ascontiguousarray(x) for x in views]
    out, lse = foveal.attention(*views, causal=True, return_lse=True)
    expected_out, expected_lse = foveal.attention(*copies, causal=True, return_lse=True)
    assert np.array_equal(out, expected_out) and np.array_equal(lse, expected_lse)


def test_blhd_torch_views_equal_contiguous_copies(torch):
    generator = torch.Generator().manual_seed(SEED)
    q_blhd = torch.randn(2, 70, 4, 16, generator=generator)
    k_blhd = torch.randn(2, 90, 2, 16, generator=generator)
    v_blhd = torch.randn(2, 90, 2, 8, generator=generator)
    views = [x.transpose(1, 2) for x in (q_blhd, k_blhd, v_blhd)]
    assert not views[0].is_contiguous()
    out = foveal.attention(*views, window_left=10, window_right=10)
    expected = foveal.attention(*(x.contiguous() for x in views), window_left=10, window_right=10)
    assert torch.equal(out, expected)
    # Writing the output straight into [B, L, H, Dv] memory.
    out_blhd = torch.empty(2, 70, 4, 8)
    result = foveal.attention(*views, window_left=10, window_right=10, out=out_blhd.transpose(1, 2))
    assert result.data_ptr() == out_blhd.data_ptr()
    assert torch.equal(out_blhd.transpose(1, 2), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_out_numpy_is_written_and_returned(dtype, rng):
    q, k, v = make_qkv(rng, (2, 2, 2, 20, 30, 8, 6), dtype)
    expected = foveal.attention(q, k, v)
    out = np.full((2, 2, 20, 6), np.nan, dtype=dtype)
    result = foveal.attention(q, k, v, out=out)
    assert result is out and np.array_equal(out, expected)
    # A strided view: the result is the view, its memory the caller's buffer.
    buffer = np.full((2, 20, 2, 6), np.nan, dtype=dtype)
    view = buffer.transpose(0, 2, 1, 3)
    result, lse = foveal.attention(q, k, v, out=view, return_lse=True)
    assert result is view and np.shares_memory(result, buffer)
    assert np.array_equal(view, expected) and lse.shape == (2, 2, 20)


def test_out_torch_is_written_and_returned(torch, rng):
    _, _, _, tq, tk, tv = torch_case(torch, rng, (1, 4, 2, 20, 30, 8, 8), np.float32)
    expected = foveal.attention(tq, tk, tv, causal=True)
    out = torch.full((1, 4, 20, 8), float("nan"))
    result = foveal.attention(tq, tk, tv, causal=True, out=out)
    assert result is out and torch.equal(out, expected)
    # A numpy out for torch inputs is fine too: the given object comes back.
    out_numpy = np.empty((1, 4, 20, 8), dtype=np.float32)
    assert foveal.attention(tq, tk, tv, causal=True, out=out_numpy) is out_numpy


def thread_inputs(rng: np.random.Generator, dtype: Any):
    # Several 64-row tiles per head and several key blocks, so threads really split the work.
    return make_qkv(rng, (2, 4, 2, 150, 200, 24, 16), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_results_identical_for_any_thread_count(dtype, rng):
    q, k, v = thread_inputs(rng, dtype)
    bias = rng.standard_normal((150, 200)).astype(dtype)
    options = dict(
        causal=True, window_left=90, sink_tokens=5, softcap=4.0, bias=bias, return_lse=True
    )
    out_1, lse_1 = foveal.attention(q, k, v, num_threads=1, **options)
    for num_threads in (2, 3):
        out, lse = foveal.attention(q, k, v, num_threads=num_threads, **options)
        assert np.array_equal(out, out_1) and np.array_equal(lse, lse_1), num_threads


def test_results_identical_with_set_num_threads(rng):
    q, k, v = thread_inputs(rng, np.float32)
    expected = foveal.attention(q, k, v, num_threads=1)
    before = foveal.get_num_threads()
    try:
        for num_threads in (1, 2, 3):
            foveal.set_num_threads(num_threads)
            assert foveal.get_num_threads() == num_threads
            assert np.array_equal(foveal.attention(q, k, v), expected), num_threads
    finally:
        foveal.set_num_threads(0)
    assert foveal.get_num_threads() == before


def test_kernel_matches_function(rng):
    q, k, v = make_qkv(rng, (1, 4, 2, 30, 40, 8, 8), np.float64)
    kernel = foveal.make_attention("dense", window_left=5, sink_tokens=2)
    out, lse = kernel(q, k, v, return_lse=True)
    expected_out, expected_lse = foveal.attention(
        q, k, v, window_left=5, sink_tokens=2, return_lse=True
    )
    assert np.array_equal(out, expected_out) and np.array_equal(lse, expected_lse)
