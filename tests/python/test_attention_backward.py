"""foveal.attention_backward / sliding_window_attention_backward and the torch autograd wrappers
foveal.torch.attention / sliding_window_attention, against torch autograd through a float64
reference.

The reference is plain torch in float64: the [Lq, Lk] mask from conftest.visible_keys, the
softcap, the bias, softmax and two matmuls, differentiated by torch.autograd; a row that sees no
key gives out = 0 and contributes nothing to any gradient.

Tolerances (elementwise, relative to the size of each gradient, as conftest.assert_close):
  float32: |grad - ref| <= 1e-4 * max(1, max|ref|)
  float64: |grad - ref| <= 1e-9 * max(1, max|ref|)
looser than the forward's 2e-5 / 1e-10 because the backward chains two more reductions (dP over
Dv, then grad_k / grad_v over every query row of a GQA group) and dS = P (dP - D) keeps a
difference of two numbers of the size of |grad_out| |v|; a wrong mask, scale, softcap derivative
or GQA sum is an O(1) error.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable

import foveal
import numpy as np
import pytest
from conftest import DTYPES, SEED, bias_as_float, make_qkv, visible_keys

BACKWARD_TOLERANCE = {np.dtype(np.float32): 1e-4, np.dtype(np.float64): 1e-9}


@pytest.fixture
def foveal_torch(torch: Any) -> Any:
    """The foveal.torch module (it imports torch; the test is skipped without torch)."""
    return importlib.import_module("foveal.torch")


def torch_reference(
    torch: Any,
    q: Any,
    k: Any,
    v: Any,
    scale: Any = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Any = None,
    bias: Any = None,
) -> Any:
    """out [B, Hq, Lq, Dv] from float64 torch tensors q, k, v, differentiable in each."""
    _, heads_q, len_q, dim = q.shape
    heads_kv, len_k = k.shape[1], k.shape[2]
    group = heads_q // heads_kv if heads_kv else 1
    keys = k.repeat_interleave(group, dim=1)  # query head h reads kv head h // group
    values = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    logits = scale * (q @ keys.transpose(-1, -2))
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    if isinstance(bias, torch.Tensor):  # a leaf whose gradient is wanted
        logits = logits + bias
    elif bias is not None:
        logits = logits + torch.from_numpy(bias_as_float(bias))
    mask = visible_keys(len_q, len_k, causal, window_left, window_right, sink_tokens, q_offset)
    visible = torch.from_numpy(mask) & (logits > -math.inf)
    seen = visible.any(dim=-1, keepdim=True)
    # Hidden keys get -inf (probability 0, no gradient); a row that sees nothing gets finite
    # logits and then probability 0 everywhere, so it gives 0 and back-propagates nothing.
    logits = torch.where(visible, logits, torch.full_like(logits, -math.inf))
    logits = torch.where(seen, logits, torch.zeros_like(logits))
    probabilities = torch.softmax(logits, dim=-1) * seen
    return probabilities @ values


def reference_gradients(torch: Any, q, k, v, grad_out, **options) -> tuple:
    """(grad_q, grad_k, grad_v) as float64 numpy arrays, by torch autograd on the reference."""
    leaves = [torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_() for x in (q, k, v)]
    out = torch_reference(torch, *leaves, **options)
    grads = torch.autograd.grad(
        out, leaves, torch.from_numpy(np.asarray(grad_out, dtype=np.float64)), allow_unused=True
    )
    return tuple(
        np.zeros(leaf.shape) if grad is None else grad.numpy() for leaf, grad in zip(leaves, grads)
    )


def assert_gradient_close(actual: Any, expected: np.ndarray, dtype: Any, what: str) -> None:
    actual = np.asarray(actual, dtype=np.float64)
    size = max(1.0, float(np.abs(expected).max())) if expected.size else 1.0
    np.testing.assert_allclose(
        actual,
        expected,
        rtol=0,
        atol=BACKWARD_TOLERANCE[np.dtype(dtype)] * size,
        err_msg=f"{what} (seed {SEED})",
    )


def make_bias(rng: np.random.Generator, kind: str, shape: tuple, dtype: Any) -> np.ndarray:
    """2d [Lq, Lk], 4d-h1 [B, 1, Lq, Lk] or 4d [B, Hq, Lq, Lk] normal entries, 10% -inf;
    bool2d: a mask with about 30% of entries False."""
    batch, heads_q, _, len_q, len_k, _, _ = shape
    if kind == "bool2d":
        return rng.random((len_q, len_k)) > 0.3
    dims = {"2d": (len_q, len_k), "4d-h1": (batch, 1, len_q, len_k)}.get(
        kind, (batch, heads_q, len_q, len_k)
    )
    bias = rng.standard_normal(dims)
    bias[rng.random(dims) < 0.1] = -np.inf
    return bias.astype(dtype)


def make_grad_out(rng: np.random.Generator, shape: tuple, dtype: Any) -> np.ndarray:
    batch, heads_q, _, len_q, _, _, dim_v = shape
    return rng.standard_normal((batch, heads_q, len_q, dim_v)).astype(dtype)


# ---------------------------------------------------------------------------------------------
# foveal.attention_backward against torch autograd.

# (B, Hq, Hkv, Lq, Lk, D, Dv): 1, primes, both sides of the 64-row tile and the 128-key block,
# Lq < Lk and Lq > Lk, GQA ratios 1 / 2 / 3 / 8, Dv != D.
SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (1, 2, 2, 1, 67, 16, 16),
    (2, 3, 3, 13, 13, 8, 8),
    (1, 4, 2, 65, 130, 32, 24),
    (2, 6, 2, 97, 61, 17, 33),
    (1, 8, 1, 70, 129, 64, 64),
    (3, 2, 1, 31, 129, 5, 7),
    (1, 3, 1, 129, 37, 31, 3),
]

# name -> options for (Lq, Lk); "bias" names a make_bias kind.
OPTIONS: dict[str, Callable[[int, int], dict]] = {
    "default": lambda lq, lk: {},
    "scale": lambda lq, lk: {"scale": 0.3125},
    "causal": lambda lq, lk: {"causal": True},
    "causal-top-left": lambda lq, lk: {"causal": True, "q_offset": 0},
    "window": lambda lq, lk: {"window_left": 5, "window_right": 2},
    "window-zero": lambda lq, lk: {"window_left": 0, "window_right": 0},
    "sliding-causal-sinks": lambda lq, lk: {"causal": True, "window_left": 7, "sink_tokens": 3},
    "softcap": lambda lq, lk: {"softcap": 2.5, "scale": 0.5},
    "q-offset-end": lambda lq, lk: {"q_offset": lk, "window_left": 40},
    "bias-2d": lambda lq, lk: {"bias": "2d"},
    "bias-4d-h1": lambda lq, lk: {"bias": "4d-h1"},
    "bias-4d": lambda lq, lk: {"bias": "4d", "causal": True},
    "mask-2d": lambda lq, lk: {"bias": "bool2d"},
    "everything": lambda lq, lk: {
        "scale": 0.25,
        "causal": True,
        "window_left": 9,
        "sink_tokens": 2,
        "softcap": 3.0,
        "q_offset": lk // 3,
        "bias": "4d",
    },
}


def run_backward(shape: tuple, options: dict, dtype: Any, rng: np.random.Generator):
    """Inputs, foveal's forward and backward, and the options as passed (bias made)."""
    q, k, v = make_qkv(rng, shape, dtype)
    options = dict(options)
    if "bias" in options:
        options["bias"] = make_bias(rng, options["bias"], shape, dtype)
    grad_out = make_grad_out(rng, shape, dtype)
    out, lse = foveal.attention(q, k, v, return_lse=True, **options)
    grads = foveal.attention_backward(q, k, v, out, lse, grad_out, **options)
    return (q, k, v, grad_out), options, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("option_name", list(OPTIONS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_torch_autograd(shape, option_name, dtype, rng, torch):
    options = OPTIONS[option_name](shape[3], shape[4])
    (q, k, v, grad_out), options, grads = run_backward(shape, options, dtype, rng)
    expected = reference_gradients(torch, q, k, v, grad_out, **options)
    assert isinstance(grads, tuple) and len(grads) == 3
    for name, got, want, like in zip(("grad_q", "grad_k", "grad_v"), grads, expected, (q, k, v)):
        assert isinstance(got, np.ndarray) and got.dtype == dtype, name
        assert got.shape == like.shape, name
        assert_gradient_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("seed", range(20), ids=lambda s: f"seed{s}")
def test_matches_torch_autograd_random(seed, dtype, torch):
    case_rng = np.random.default_rng(seed)
    pick = lambda values: values[int(case_rng.integers(len(values)))]  # noqa: E731
    heads_kv = pick([1, 2, 3])
    lengths = [1, 2, 7, 13, 63, 64, 65, 127, 128, 129, 200]
    dim = pick([1, 3, 16, 31, 64, 80, 128])
    shape = (
        pick([1, 2]),
        heads_kv * pick([1, 2, 3, 4, 8]),
        heads_kv,
        pick(lengths),
        pick(lengths),
        dim,
        pick([dim, 1, 3, 16, 31, 64, 80, 128]),
    )
    options: dict = {}
    if case_rng.random() < 0.3:
        options["scale"] = float(np.float32(case_rng.uniform(0.05, 1.5)))
    if case_rng.random() < 0.4:
        options["causal"] = True
    if case_rng.random() < 0.4:
        options["window_left"] = pick([0, 1, 4, 64, 127, 300])
    if not options.get("causal") and case_rng.random() < 0.3:
        options["window_right"] = pick([0, 1, 6, 128])
    if case_rng.random() < 0.3:
        options["sink_tokens"] = pick([1, 3, 130])
    if case_rng.random() < 0.3:
        options["softcap"] = float(np.float32(case_rng.uniform(0.5, 10.0)))
    if case_rng.random() < 0.3:
        options["q_offset"] = int(case_rng.integers(0, shape[4] + 1))
    if case_rng.random() < 0.3:
        options["bias"] = pick(["2d", "4d-h1", "4d", "bool2d"])
    (q, k, v, grad_out), options, grads = run_backward(
        shape, options, dtype, np.random.default_rng(seed)
    )
    expected = reference_gradients(torch, q, k, v, grad_out, **options)
    shown = {name: value for name, value in options.items() if name != "bias"}
    context = f"seed {seed}: shape {shape}, options {shown}, bias {options.get('bias') is not None}"
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, expected):
        try:
            assert_gradient_close(got, want, dtype, name)
        except AssertionError as error:
            raise AssertionError(f"{context}\n{error}") from None


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_rows_that_see_no_key_contribute_nothing(dtype, rng):
    # Lq > Lk, causal: the first Lq - Lk queries precede every key.
    shape = (2, 4, 2, 50, 20, 8, 6)
    q, k, v = make_qkv(rng, shape, dtype)
    grad_out = make_grad_out(rng, shape, dtype)
    out, lse = foveal.attention(q, k, v, causal=True, return_lse=True)
    grad_q, grad_k, grad_v = foveal.attention_backward(q, k, v, out, lse, grad_out, causal=True)
    assert np.all(grad_q[:, :, :30] == 0)
    other = grad_out.copy()
    other[:, :, :30] = 1e6
    again = foveal.attention_backward(q, k, v, out, lse, other, causal=True)
    for name, first, second in zip(("grad_q", "grad_k", "grad_v"), (grad_q, grad_k, grad_v), again):
        assert np.array_equal(first, second), name


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_sliding_window_backward_matches_torch_autograd(dtype, rng, torch):
    shape = (2, 6, 2, 97, 200, 16, 24)
    options = {"window_left": 20, "causal": True, "sink_tokens": 2, "softcap": 4.0}
    q, k, v = make_qkv(rng, shape, dtype)
    grad_out = make_grad_out(rng, shape, dtype)
    out, lse = foveal.sliding_window_attention(q, k, v, return_lse=True, **options)
    grads = foveal.sliding_window_attention_backward(q, k, v, out, lse, grad_out, **options)
    expected = reference_gradients(torch, q, k, v, grad_out, **options)
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, expected):
        assert isinstance(got, np.ndarray) and got.dtype == dtype, name
        assert_gradient_close(got, want, dtype, name)
    # A bounded window with window_right instead of causal.
    options = {"window_left": 3, "window_right": 5}
    out, lse = foveal.sliding_window_attention(q, k, v, return_lse=True, **options)
    grads = foveal.sliding_window_attention_backward(q, k, v, out, lse, grad_out, **options)
    expected = reference_gradients(torch, q, k, v, grad_out, **options)
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, expected):
        assert_gradient_close(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_torch_tensors_in_give_torch_tensors_out(dtype, rng, torch):
    shape = (1, 4, 2, 33, 70, 16, 8)
    q, k, v = (torch.from_numpy(x) for x in make_qkv(rng, shape, dtype))
    grad_out = torch.from_numpy(make_grad_out(rng, shape, dtype))
    out, lse = foveal.attention(q, k, v, causal=True, return_lse=True)
    grads = foveal.attention_backward(q, k, v, out, lse, grad_out, causal=True)
    from_numpy = foveal.attention_backward(
        q.numpy(), k.numpy(), v.numpy(), out.numpy(), lse.numpy(), grad_out.numpy(), causal=True
    )
    for name, got, want, like in zip(("grad_q", "grad_k", "grad_v"), grads, from_numpy, (q, k, v)):
        assert isinstance(got, torch.Tensor), name
        assert got.dtype == like.dtype and tuple(got.shape) == tuple(like.shape), name
        assert np.array_equal(got.numpy(), want), name
    out, lse = foveal.sliding_window_attention(q, k, v, window_left=4, causal=True, return_lse=True)
    grads = foveal.sliding_window_attention_backward(
        q, k, v, out, lse, grad_out, window_left=4, causal=True
    )
    assert all(isinstance(grad, torch.Tensor) for grad in grads)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_identical_bits_for_any_thread_count(dtype, rng):
    shape = (2, 4, 2, 200, 300, 32, 16)
    q, k, v = make_qkv(rng, shape, dtype)
    grad_out = make_grad_out(rng, shape, dtype)
    bias = make_bias(rng, "4d-h1", shape, dtype)
    options = {"causal": True, "window_left": 150, "sink_tokens": 3, "softcap": 10.0}
    out, lse = foveal.attention(q, k, v, bias=bias, return_lse=True, **options)
    single = foveal.attention_backward(
        q, k, v, out, lse, grad_out, bias=bias, num_threads=1, **options
    )
    out_nb, lse_nb = foveal.attention(q, k, v, return_lse=True, **options)
    sliding_single = foveal.sliding_window_attention_backward(
        q, k, v, out_nb, lse_nb, grad_out, num_threads=1, **options
    )
    for threads in (2, 3, 1):  # 1 again: a second call
        multi = foveal.attention_backward(
            q, k, v, out, lse, grad_out, bias=bias, num_threads=threads, **options
        )
        sliding = foveal.sliding_window_attention_backward(
            q, k, v, out_nb, lse_nb, grad_out, num_threads=threads, **options
        )
        for name, a, b, c, d in zip(
            ("grad_q", "grad_k", "grad_v"), multi, single, sliding, sliding_single
        ):
            assert np.array_equal(a, b), f"{name} num_threads={threads}"
            assert np.array_equal(c, d), f"sliding {name} num_threads={threads}"


# ---------------------------------------------------------------------------------------------
# foveal.torch.attention / sliding_window_attention: torch.autograd.Function wrappers.

# name -> (shape, options); small enough for gradcheck's finite differences.
GRADCHECK_CASES = {
    "causal": ((1, 2, 2, 6, 4, 3, 3), {"causal": True}),
    "window-sinks": (
        (1, 2, 1, 7, 9, 3, 2),
        {"window_left": 2, "window_right": 1, "sink_tokens": 2},
    ),
    "softcap": ((2, 2, 1, 5, 6, 4, 3), {"softcap": 0.8, "scale": 1.3}),
    "gqa": ((1, 6, 2, 4, 5, 3, 4), {}),
    "mqa-causal-sinks": (
        (2, 3, 1, 5, 5, 2, 3),
        {"causal": True, "window_left": 1, "sink_tokens": 1},
    ),
    "bias": ((2, 2, 1, 4, 6, 3, 2), {"bias": "4d", "causal": True}),
    "lq-gt-lk-offset": ((1, 2, 1, 7, 3, 3, 2), {"q_offset": 1, "window_left": 2}),
    "lq-lt-lk": ((1, 1, 1, 3, 8, 5, 1), {"scale": 0.6}),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case, rng, torch, foveal_torch):
    shape, options = GRADCHECK_CASES[case]
    options = dict(options)
    if "bias" in options:
        options["bias"] = torch.from_numpy(make_bias(rng, options["bias"], shape, np.float64))
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, shape, np.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: foveal_torch.attention(q, k, v, **options), (q, k, v)
    )


def test_gradcheck_sliding_window(rng, torch, foveal_torch):
    shape = (1, 4, 2, 9, 11, 3, 2)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, shape, np.float64))
    assert torch.autograd.gradcheck(
        lambda q, k, v: foveal_torch.sliding_window_attention(
            q, k, v, window_left=3, causal=True, sink_tokens=1, softcap=2.0
        ),
        (q, k, v),
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_autograd_wires_the_kernels(dtype, rng, torch, foveal_torch):
    # out is foveal.attention's, and .backward() gives foveal.attention_backward's bits; an input
    # that needs no grad gets none.
    shape = (2, 4, 2, 70, 130, 16, 8)
    q, k, v = make_qkv(rng, shape, dtype)
    grad_out = make_grad_out(rng, shape, dtype)
    bias = make_bias(rng, "4d", shape, dtype)
    options = {"causal": True, "sink_tokens": 2, "softcap": 5.0}
    out, lse = foveal.attention(q, k, v, bias=bias, return_lse=True, **options)
    expected = foveal.attention_backward(q, k, v, out, lse, grad_out, bias=bias, **options)
    leaves = [torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v)]
    got = foveal_torch.attention(*leaves, bias=torch.from_numpy(bias), **options)
    assert isinstance(got, torch.Tensor) and got.requires_grad
    assert np.array_equal(got.detach().numpy(), out)
    got.backward(torch.from_numpy(grad_out))
    for name, leaf, want in zip(("grad_q", "grad_k", "grad_v"), leaves, expected):
        assert leaf.grad is not None and np.array_equal(leaf.grad.numpy(), want), name
    q_only = torch.from_numpy(q.copy()).requires_grad_()
    k_fixed, v_fixed = torch.from_numpy(k), torch.from_numpy(v)
    foveal_torch.attention(
        q_only, k_fixed, v_fixed, bias=torch.from_numpy(bias), **options
    ).backward(torch.from_numpy(grad_out))
    assert k_fixed.grad is None and v_fixed.grad is None
    assert np.array_equal(q_only.grad.numpy(), expected[0])


def test_autograd_through_blhd_views(rng, torch, foveal_torch):
    # [B, L, H, D] activations passed as x.transpose(1, 2): the gradients reach the [B, L, H, D]
    # leaves with the bits of contiguous [B, H, L, D] inputs.
    shape = (2, 4, 2, 33, 70, 16, 16)
    q, k, v = make_qkv(rng, shape, np.float32)
    grad_out = torch.from_numpy(make_grad_out(rng, shape, np.float32))
    contiguous = [torch.from_numpy(x.copy()).requires_grad_() for x in (q, k, v)]
    foveal_torch.attention(*contiguous, causal=True).backward(grad_out)
    blhd = [torch.from_numpy(x.transpose(0, 2, 1, 3).copy()).requires_grad_() for x in (q, k, v)]
    out = foveal_torch.attention(*(x.transpose(1, 2) for x in blhd), causal=True)
    out.backward(grad_out)
    for name, a, b in zip(("q", "k", "v"), blhd, contiguous):
        assert np.array_equal(a.grad.transpose(1, 2).numpy(), b.grad.numpy()), name


# (bias shape kind, options): full, broadcast over B or Hq, 2-D and 3-D, with masks, softcap.
BIAS_GRADIENT_CASES = [
    ((2, 4, 2, 13, 17, 8, 6), "4d", {"causal": True}),
    ((2, 4, 2, 13, 17, 8, 6), "4d-h1", {"softcap": 2.0}),
    ((3, 2, 1, 65, 70, 16, 16), "2d", {"window_left": 9, "sink_tokens": 2, "causal": True}),
    ((1, 3, 3, 7, 129, 5, 4), "3d", {"q_offset": 100, "scale": 0.3}),
    ((2, 2, 1, 1, 9, 4, 4), "b1", {}),
]


def _bias_of(rng: np.random.Generator, kind: str, shape: tuple, dtype: Any) -> np.ndarray:
    _, heads_q, _, len_q, len_k, _, _ = shape
    dims = {"3d": (heads_q, len_q, len_k), "b1": (1, heads_q, len_q, len_k)}
    if kind in dims:
        bias = rng.standard_normal(dims[kind])
        bias[rng.random(dims[kind]) < 0.1] = -np.inf
        return bias.astype(dtype)
    return make_bias(rng, kind, shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
@pytest.mark.parametrize("case", range(len(BIAS_GRADIENT_CASES)))
def test_bias_gradient_matches_torch_autograd(case, dtype, rng, torch):
    shape, kind, options = BIAS_GRADIENT_CASES[case]
    q, k, v = make_qkv(rng, shape, dtype)
    bias = _bias_of(rng, kind, shape, dtype)
    grad_out = make_grad_out(rng, shape, dtype)
    out, lse = foveal.attention(q, k, v, bias=bias, return_lse=True, **options)
    grads = foveal.attention_backward(
        q, k, v, out, lse, grad_out, bias=bias, return_bias_grad=True, **options
    )
    assert len(grads) == 4 and grads[3].shape == bias.shape and grads[3].dtype == dtype
    leaves = [torch.from_numpy(np.asarray(x, dtype=np.float64)).requires_grad_() for x in (q, k, v)]
    bias_leaf = torch.from_numpy(bias.astype(np.float64)).requires_grad_()
    expected = torch.autograd.grad(
        torch_reference(torch, *leaves, bias=bias_leaf, **options),
        [*leaves, bias_leaf],
        torch.from_numpy(grad_out.astype(np.float64)),
    )
    for name, got, want in zip(("grad_q", "grad_k", "grad_v", "grad_bias"), grads, expected):
        assert_gradient_close(got, want.numpy(), dtype, name)
    # The same bits for any thread count (the broadcast sum runs in a fixed order).
    for threads in (1, 3):
        again = foveal.attention_backward(
            q, k, v, out, lse, grad_out, bias=bias, return_bias_grad=True, num_threads=threads,
            **options,
        )  # fmt: skip
        assert again[3].tobytes() == grads[3].tobytes()


def test_torch_bias_gets_its_gradient(rng, torch, foveal_torch):
    shape = (1, 2, 1, 5, 6, 3, 2)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, shape, np.float64))
    bias = torch.from_numpy(rng.standard_normal((5, 6))).requires_grad_()

    def f(q, k, v, bias):
        return foveal_torch.attention(q, k, v, bias=bias, causal=True, softcap=4.0)

    assert torch.autograd.gradcheck(f, (q, k, v, bias), eps=1e-6, atol=1e-8)


def test_a_mask_has_no_bias_gradient(rng):
    call = _valid_call(rng)
    mask = np.ones((5, 7), dtype=bool)
    with pytest.raises(ValueError, match=r"boolean mask bias has no gradient"):
        foveal.attention_backward(
            call["q"], call["k"], call["v"], call["out"], call["lse"], call["out"],
            bias=mask, return_bias_grad=True,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Bad input: ValueError (TypeError for dtypes) naming the argument, before anything is written.


def _valid_call(rng: np.random.Generator, dtype: Any = np.float32) -> dict:
    shape = (2, 4, 2, 5, 7, 3, 6)
    q, k, v = make_qkv(rng, shape, dtype)
    out, lse = foveal.attention(q, k, v, return_lse=True)
    return {
        "q": q,
        "k": k,
        "v": v,
        "out": out,
        "lse": lse,
        "grad_out": make_grad_out(rng, shape, dtype),
    }


BAD_ARGUMENTS: dict[str, tuple[Callable[[dict], None], type, str]] = {
    "q-dtype": (lambda a: a.update(q=a["q"].astype(np.int32)), TypeError, r"\bq\b"),
    "k-dtype": (lambda a: a.update(k=a["k"].astype(np.float64)), TypeError, r"\bk\b"),
    "out-dtype": (lambda a: a.update(out=a["out"].astype(np.float64)), TypeError, r"\bout\b"),
    "lse-dtype": (lambda a: a.update(lse=a["lse"].astype(np.float64)), TypeError, r"\blse\b"),
    "grad_out-dtype": (
        lambda a: a.update(grad_out=a["grad_out"].astype(np.float64)),
        TypeError,
        r"\bgrad_out\b",
    ),
    "v-ndim": (lambda a: a.update(v=a["v"][0]), ValueError, r"\bv\b"),
    "k-dim": (lambda a: a.update(k=a["k"][..., :2]), ValueError, r"\bk\b"),
    "out-shape": (lambda a: a.update(out=a["out"][:, :, :4]), ValueError, r"\bout\b"),
    "lse-shape": (lambda a: a.update(lse=a["lse"][:, :2]), ValueError, r"\blse\b"),
    "lse-ndim": (lambda a: a.update(lse=a["lse"][..., None]), ValueError, r"\blse\b"),
    "grad_out-shape": (
        lambda a: a.update(grad_out=a["grad_out"][..., :5]),
        ValueError,
        r"\bgrad_out\b",
    ),
    "grad_out-heads": (
        lambda a: a.update(grad_out=a["grad_out"][:, :2]),
        ValueError,
        r"\bgrad_out\b",
    ),
    "grad_out-inner-stride": (
        lambda a: a.update(grad_out=np.repeat(a["grad_out"], 2, axis=-1)[..., ::2]),
        ValueError,
        r"\bgrad_out\b",
    ),
    "grad_out-not-an-array": (lambda a: a.update(grad_out="grad"), TypeError, r"\bgrad_out\b"),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_is_named(case, rng):
    breaks, error, name = BAD_ARGUMENTS[case]
    arguments = _valid_call(rng)
    breaks(arguments)
    with pytest.raises(error, match=name):
        foveal.attention_backward(**arguments)


BAD_OPTIONS = {
    "window_left": ({"window_left": -2}, ValueError),
    "window_right": ({"window_right": -3}, ValueError),
    "sink_tokens": ({"sink_tokens": -1}, ValueError),
    "scale": ({"scale": -1.0}, ValueError),
    "softcap": ({"softcap": float("nan")}, ValueError),
    "q_offset": ({"q_offset": -2}, ValueError),
    "num_threads": ({"num_threads": -1}, ValueError),
    "causal": ({"causal": True, "window_right": 2}, ValueError),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_option_is_named(name, rng):
    options, error = BAD_OPTIONS[name]
    with pytest.raises(error, match=name):
        foveal.attention_backward(**_valid_call(rng), **options)


def test_bias_of_the_wrong_shape_is_named(rng):
    with pytest.raises(ValueError, match=r"\bbias\b"):
        foveal.attention_backward(**_valid_call(rng), bias=np.zeros((5, 6), dtype=np.float32))
    with pytest.raises(TypeError, match=r"\bbias\b"):
        foveal.attention_backward(**_valid_call(rng), bias=np.zeros((5, 7), dtype=np.float64))


def test_sliding_window_requires_a_bounded_window(rng):
    with pytest.raises(TypeError, match="window_left"):
        foveal.sliding_window_attention_backward(**_valid_call(rng), causal=True)  # missing
    with pytest.raises(ValueError, match="window_left"):
        foveal.sliding_window_attention_backward(**_valid_call(rng), window_left=-1, causal=True)
    with pytest.raises(ValueError, match="window"):
        foveal.sliding_window_attention_backward(**_valid_call(rng), window_left=3)  # right open
    with pytest.raises(TypeError):
        foveal.sliding_window_attention_backward(**_valid_call(rng), window_left=3, bias=None)


# --- Sink logits (gpt-oss's learned sinks) and the gradient through lse -----------------------


def sink_reference(torch: Any, q, k, v, sinks, **options) -> Any:
    """torch_reference whose softmax holds one more logit per query head (no value): the plain
    output times the share the sink leaves, exp(lse) / (exp(lse) + exp(s_h))."""
    _, heads_q, len_q, dim = q.shape
    group = heads_q // k.shape[1]
    keys = k.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(dim) if options.get("scale") is None else options["scale"]
    logits = scale * (q @ keys.transpose(-1, -2))
    if options.get("softcap", 0.0) > 0:
        logits = options["softcap"] * torch.tanh(logits / options["softcap"])
    mask = visible_keys(
        len_q,
        k.shape[2],
        options.get("causal", False),
        options.get("window_left", -1),
        options.get("window_right", -1),
        options.get("sink_tokens", 0),
        options.get("q_offset"),
    )
    logits = torch.where(torch.from_numpy(mask), logits, torch.full_like(logits, -math.inf))
    column = sinks.reshape(1, -1, 1, 1).expand(*logits.shape[:3], 1)
    weights = torch.softmax(torch.cat((logits, column), dim=-1), dim=-1)[..., :-1]
    return weights @ v.repeat_interleave(group, dim=1)


SINK_CASES = {
    "causal-gqa": ((2, 4, 2, 6, 6, 3, 3), {"causal": True}),
    "lq-gt-lk-softcap": ((1, 2, 1, 7, 4, 3, 2), {"causal": True, "softcap": 1.5}),
    "window-sinks": ((1, 2, 2, 8, 8, 4, 3), {"window_left": 2, "causal": True, "sink_tokens": 1}),
}


@pytest.mark.parametrize("case", list(SINK_CASES))
def test_sink_logits_match_the_reference_and_gradcheck(case, rng, torch, foveal_torch):
    shape, options = SINK_CASES[case]
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, shape, np.float64))
    sinks = torch.from_numpy(rng.standard_normal(shape[1])).requires_grad_()

    def f(q, k, v, sinks):
        return foveal_torch.attention(q, k, v, sink_logits=sinks, **options)

    out = f(q, k, v, sinks)
    expected = sink_reference(torch, q, k, v, sinks, **options)
    assert (out - expected).abs().max().item() <= 1e-13
    # Every gradient against autograd through the reference, then gradcheck.
    weights = torch.from_numpy(rng.standard_normal(out.shape))
    got = torch.autograd.grad((out * weights).sum(), (q, k, v, sinks))
    want = torch.autograd.grad((expected * weights).sum(), (q, k, v, sinks))
    for name, a, b in zip(("q", "k", "v", "sink_logits"), got, want):
        assert (a - b).abs().max().item() <= 1e-12, name
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


def test_sliding_window_sink_logits_gradcheck(rng, torch, foveal_torch):
    shape = (1, 4, 2, 9, 11, 3, 2)
    q, k, v = (torch.from_numpy(x).requires_grad_() for x in make_qkv(rng, shape, np.float64))
    sinks = torch.from_numpy(rng.standard_normal(4)).requires_grad_()

    def f(q, k, v, sinks):
        return foveal_torch.sliding_window_attention(
            q, k, v, window_left=3, causal=True, sink_logits=sinks
        )

    expected = sink_reference(torch, q, k, v, sinks, window_left=3, causal=True, q_offset=None)
    assert (f(q, k, v, sinks) - expected).abs().max().item() <= 1e-13
    assert torch.autograd.gradcheck(f, (q, k, v, sinks))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float32", "float64"])
def test_grad_lse_matches_autograd_through_the_reference(dtype, rng, torch):
    # foveal.attention_backward(grad_lse=...) against autograd of sum(g * out) + sum(h * lse)
    # through float64 torch (lse = logsumexp of the masked logits).
    shape = (2, 4, 2, 70, 130, 12, 10)
    options = {"causal": True, "softcap": 5.0}
    q, k, v = make_qkv(rng, shape, dtype)
    out, lse = foveal.attention(q, k, v, return_lse=True, **options)
    grad_out = make_grad_out(rng, shape, dtype)
    grad_lse = rng.standard_normal(lse.shape).astype(dtype)
    grads = foveal.attention_backward(q, k, v, out, lse, grad_out, grad_lse=grad_lse, **options)
    leaves = [torch.from_numpy(np.asarray(x, np.float64)).requires_grad_() for x in (q, k, v)]
    keys = leaves[1].repeat_interleave(2, dim=1)
    logits = 5.0 * torch.tanh(leaves[0] @ keys.transpose(-1, -2) / math.sqrt(12) / 5.0)
    mask = visible_keys(70, 130, True, -1, -1, 0, None)
    logits = torch.where(torch.from_numpy(mask), logits, torch.full_like(logits, -math.inf))
    reference_lse = torch.logsumexp(logits, dim=-1)
    reference_out = torch.softmax(logits, dim=-1) @ leaves[2].repeat_interleave(2, dim=1)
    loss = (reference_out * torch.from_numpy(grad_out.astype(np.float64))).sum() + (
        reference_lse * torch.from_numpy(grad_lse.astype(np.float64))
    ).sum()
    expected = torch.autograd.grad(loss, leaves)
    for name, got, want in zip(("grad_q", "grad_k", "grad_v"), grads, expected):
        assert_gradient_close(got, want.numpy(), dtype, name)
    # Without grad_lse the answer differs (the test would catch an ignored argument).
    plain = foveal.attention_backward(q, k, v, out, lse, grad_out, **options)
    assert np.abs(np.asarray(plain[0]) - np.asarray(grads[0])).max() > 1e-3


def test_broadcast_sink_logits_of_an_empty_batch_allocate_nothing(torch, foveal_torch):
    # Fuzz finding: 2^40 heads over an empty batch, sink_logits one value seen through a zero
    # stride. Checking their values materialized terabytes; no row uses them.
    heads = 1 << 40
    q = torch.zeros(1).as_strided((0, heads, 3, 4), (0, 0, 0, 0))
    k = torch.zeros(1).as_strided((0, heads, 5, 4), (0, 0, 0, 0))
    sinks = torch.zeros(1).as_strided((heads,), (0,))
    out = foveal_torch.attention(q, k, k, sink_logits=sinks)
    assert tuple(out.shape) == (0, heads, 3, 4)


def test_bad_sink_logits_are_named(rng, torch, foveal_torch):
    q, k, v = (torch.from_numpy(x) for x in make_qkv(rng, (1, 4, 2, 5, 5, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"sink_logits must have shape \[Hq\] = \[4\]"):
        foveal_torch.attention(q, k, v, sink_logits=torch.zeros(2))
    with pytest.raises(ValueError, match="sink_logits must be finite"):
        foveal_torch.attention(q, k, v, sink_logits=torch.tensor([0.0, math.inf, 0.0, 0.0]))
    with pytest.raises(TypeError, match="sink_logits must be a torch tensor"):
        foveal_torch.attention(q, k, v, sink_logits=[0.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="grad_lse"):
        out, lse = foveal.attention(q.numpy(), k.numpy(), v.numpy(), return_lse=True)
        foveal.attention_backward(
            q.numpy(), k.numpy(), v.numpy(), out, lse, out, grad_lse=np.zeros((1, 4, 6), np.float32)
        )
