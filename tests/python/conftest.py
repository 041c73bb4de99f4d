"""Shared fixtures and the float64 numpy reference of dense attention (docs/attention.md).

The reference is the executable spec in Python: plain numpy in float64, no tiling, no online
softmax, mirroring tests/reference/attention_reference.hpp.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import pytest

SEED = 20240611


@pytest.fixture(autouse=True, scope="session")
def work_threshold_off() -> Any:
    """The thread-count tests compare 1 thread with 2 on shapes small enough that foveal's work
    threshold would run both on one thread: the session turns it off (test_threads.py, which
    checks the threshold, turns it back on where it needs it)."""
    from foveal import _core

    saved = _core._set_min_work_per_thread(0)
    yield
    _core._set_min_work_per_thread(saved)


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator; every test that draws numbers starts from the same state."""
    return np.random.default_rng(SEED)


@pytest.fixture
def torch() -> Any:
    """The torch module; the test is skipped where torch is not installed."""
    return pytest.importorskip("torch")


@pytest.fixture
def at_one_and_two_threads() -> Any:
    """run(function) -> [function() with torch and foveal at 1 thread, the same at 2 threads]
    (the thread counts are restored afterwards)."""
    torch = pytest.importorskip("torch")
    import foveal

    def run(function: Any) -> list:
        saved = torch.get_num_threads(), foveal.get_num_threads()
        results = []
        try:
            for threads in (1, 2):
                torch.set_num_threads(threads)
                foveal.set_num_threads(threads)
                results.append(function())
        finally:
            torch.set_num_threads(saved[0])
            foveal.set_num_threads(saved[1])
        return results

    return run


@pytest.fixture
def smoke_run() -> Any:
    """run(name) -> the results of examples/training/<name>.py's main(["--smoke"]) (a few steps
    that assert the loss falls, writing nothing); the thread counts are restored afterwards."""
    import importlib.util
    from pathlib import Path

    torch = pytest.importorskip("torch")
    import foveal

    def run(name: str) -> list:
        path = Path(__file__).resolve().parents[2] / "examples" / "training" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
        saved = torch.get_num_threads(), foveal.get_num_threads()
        try:
            return script.main(["--smoke"])
        finally:  # the script fixes its thread count
            torch.set_num_threads(saved[0])
            foveal.set_num_threads(saved[1])

    return run


def visible_keys(
    len_q: int,
    len_k: int,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    q_offset: Optional[int] = None,
    key_start: int = 0,
    key_length: Optional[int] = None,
) -> np.ndarray:
    """[Lq, Lk] booleans: query i (at position q_offset + i) sees key j (docs/attention.md):
    j inside the window, or j a sink not past the window's right edge (causal always wins).
    With key_start / key_length (one row of a variable-length batch) only the keys
    [key_start, key_start + key_length) exist, and the sinks are the first of them."""
    offset = len_k - len_q if q_offset is None or q_offset == -1 else q_offset
    position = offset + np.arange(len_q)[:, None]
    key = np.arange(len_k)[None, :]
    end = len_k if key_length is None else key_start + key_length
    right = 0 if causal else window_right
    before_right_edge = np.ones((len_q, len_k), dtype=bool)
    if right >= 0:
        before_right_edge &= key <= position + right
    inside_left_edge = np.ones((len_q, len_k), dtype=bool)
    if window_left >= 0:
        inside_left_edge &= key >= position - window_left
    exists = (key >= key_start) & (key < end)
    return exists & before_right_edge & (inside_left_edge | (key - key_start < sink_tokens))


def bias_as_float(bias: Any) -> np.ndarray:
    """A boolean mask (True = attend) as 0 / -inf; a float bias as float64."""
    bias = np.asarray(bias)
    if bias.dtype == np.bool_:
        return np.where(bias, 0.0, -np.inf)
    return bias.astype(np.float64)


def reference_attention(
    q: Any,
    k: Any,
    v: Any,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    bias: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(out [B, Hq, Lq, Dv], lse [B, Hq, Lq]) in float64.

    l_ij = scale * q_i . k_j ; softcap: l = c * tanh(l / c) ; + bias_ij ; keys not visible (or
    with l = -inf) are dropped ; P_i = softmax over the rest ; O_i = sum_j P_ij v_j ;
    lse_i = log sum_j exp(l_ij). A row without a visible key gives O = 0 and lse = -inf.
    """
    q, k, v = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    batch, heads_q, len_q, dim = q.shape
    heads_kv, len_k, dim_v = k.shape[1], k.shape[2], v.shape[3]
    out = np.zeros((batch, heads_q, len_q, dim_v))
    lse = np.full((batch, heads_q, len_q), -np.inf)
    if out.size == 0 or len_k == 0:
        return out, lse
    group = heads_q // heads_kv
    k = np.repeat(k, group, axis=1)  # query head h reads kv head h // group
    v = np.repeat(v, group, axis=1)
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    logits = scale * np.einsum("bhid,bhjd->bhij", q, k)
    if softcap > 0:
        logits = softcap * np.tanh(logits / softcap)
    if bias is not None:
        logits = logits + bias_as_float(bias)  # broadcasts [Lq, Lk], [Hq|1, ...], [B|1, ...]
    visible = visible_keys(len_q, len_k, causal, window_left, window_right, sink_tokens, q_offset)
    visible = visible & (logits > -np.inf)
    logits = np.where(visible, logits, -np.inf)
    any_visible = visible.any(axis=-1)
    row_max = np.where(any_visible, logits.max(axis=-1), 0.0)
    weights = np.where(visible, np.exp(logits - row_max[..., None]), 0.0)
    row_sum = weights.sum(axis=-1)
    safe_sum = np.where(any_visible, row_sum, 1.0)
    out = np.einsum("bhij,bhjd->bhid", weights / safe_sum[..., None], v)
    with np.errstate(divide="ignore"):
        lse = np.where(any_visible, row_max + np.log(safe_sum), -np.inf)
    return out, lse


def quantize_rows(x: np.ndarray) -> np.ndarray:
    """The spec of an 8-bit cache or pool (dtype="int8"): x [..., D] float32 as it stores it, in
    blocks of 32 values with scale max |x| / 127 and values rounded to nearest, dequantized
    (float64)."""
    x = np.asarray(x, np.float32)
    dim = x.shape[-1]
    padded = np.zeros((*x.shape[:-1], -(-dim // 32) * 32), np.float32)
    padded[..., :dim] = x
    blocks = padded.reshape((*x.shape[:-1], padded.shape[-1] // 32, 32))
    largest = np.abs(blocks).max(axis=-1, keepdims=True)
    scale = largest / np.float32(127)
    # The values rounded in float64 (127 / largest overflows float32 for subnormal blocks).
    with np.errstate(divide="ignore", invalid="ignore"):
        inverse = np.where(largest > 0, 127.0 / largest.astype(np.float64), 0.0)
    values = np.clip(np.rint(blocks.astype(np.float64) * inverse), -127, 127)
    dequantized = scale.astype(np.float64) * values
    return dequantized.reshape(padded.shape)[..., :dim]


def blocks_of(storage: np.ndarray) -> np.ndarray:
    """The values a uint8 [..., blocks, 36] storage holds, dequantized (float32 scale * int8)."""
    scale = np.ascontiguousarray(storage[..., :4]).view(np.float32)
    values = np.ascontiguousarray(storage[..., 4:]).view(np.int8).astype(np.float32)
    return (scale * values).reshape(*storage.shape[:-2], -1)


# Tolerances (elementwise, relative to max(1, max|ref|)): float32 2e-5 (a few float32 ulps of
# softmax rounding), float64 1e-10.
DTYPES = [np.float32, np.float64]
TOLERANCE = {np.dtype(np.float32): 2e-5, np.dtype(np.float64): 1e-10}


def bfloat16_toward(x: Any, up: bool) -> np.ndarray:
    """The bfloat16 next to each value toward +inf (``up``) or -inf, as float64: what a KVCache
    of a type other than float64 stores as a page's maximum or minimum key (from the definition:
    multiples of the binade's spacing; infinities, NaN and zero stay)."""
    x = np.asarray(x, dtype=np.float64)
    moved = np.isfinite(x) & (x != 0)
    safe = np.where(moved, x, 1.0)
    # frexp: x = m 2^e with 0.5 <= |m| < 1, so the binade starts at 2^(e - 1); 8 significant bits
    # and float32's exponent range (subnormals from 2^-126 down).
    exponent = np.maximum(np.frexp(safe)[1] - 1, -126)
    spacing = np.ldexp(1.0, exponent - 7)
    rounded = (np.ceil if up else np.floor)(safe / spacing) * spacing
    largest = 3.3895313892515355e38  # (2 - 2^-7) 2^127
    rounded = np.where(np.abs(rounded) > largest, np.copysign(np.inf, rounded), rounded)
    return np.where(moved, rounded, x)


def tolerance(dtype: Any) -> float:
    return TOLERANCE[np.dtype(dtype)]


def assert_close(actual: Any, expected: np.ndarray, dtype: Any, what: str = "out") -> None:
    """|actual - expected| <= tol(dtype) * max(1, max|expected|), infinities equal in place."""
    actual = np.asarray(actual, dtype=np.float64)
    finite = expected[np.isfinite(expected)]
    size = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    np.testing.assert_allclose(
        actual, expected, rtol=0, atol=tolerance(dtype) * size, err_msg=f"{what} (seed {SEED})"
    )
    assert not np.isnan(actual).any(), f"{what} has NaN"


def make_qkv(rng: np.random.Generator, shape: tuple, dtype: Any):
    """q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] with standard normal entries."""
    batch, heads_q, heads_kv, len_q, len_k, dim, dim_v = shape
    q = rng.standard_normal((batch, heads_q, len_q, dim)).astype(dtype)
    k = rng.standard_normal((batch, heads_kv, len_k, dim)).astype(dtype)
    v = rng.standard_normal((batch, heads_kv, len_k, dim_v)).astype(dtype)
    return q, k, v


@pytest.fixture
def reference() -> Any:
    """The reference function, for tests that prefer a fixture over an import."""
    return reference_attention


def on_amx_tiles(dtype: Any, d: int, dv: int) -> bool:
    """On the avx512-amx level, bfloat16 calls whose D is a multiple of 32 and Dv of 16 multiply
    on AMX tiles with the probabilities rounded to bfloat16: their results are the float32
    call's within bfloat16 rounding, not its rounded bits."""
    import foveal

    level = foveal.build_info()["level"]
    return "bfloat16" in str(dtype) and level == "avx512-amx" and d % 32 == 0 and dv % 16 == 0


def assert_rounded(out: Any, want: Any, d: int, dv: int, lse: Any = None, want_lse: Any = None):
    """out (a 16-bit tensor) is want (float32) rounded to out's dtype, and lse is want_lse;
    on AMX tiles (on_amx_tiles), within bfloat16 rounding of them."""
    import torch

    if on_amx_tiles(out.dtype, d, dv):
        scale = want.abs().max().clamp_min(1e-30)
        assert ((out.float() - want).abs().max() / scale).item() <= 4e-3
        if lse is not None:
            finite = want_lse.isfinite()
            assert torch.equal(lse.isfinite(), finite)
            assert (lse[finite] - want_lse[finite]).abs().max().item() <= 1e-4
        return
    assert torch.equal(out, want.to(out.dtype))
    if lse is not None:
        assert torch.equal(lse, want_lse)
