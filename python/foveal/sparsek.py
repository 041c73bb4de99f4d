"""The SPARSEK projection (docs/sparsek.md).

``sparsek(z, k)`` projects every row (the last dimension) of the scores ``z`` onto the capped
simplex ``{0 <= p <= 1, sum(p) = k}``: ``p = clip(z - tau, 0, 1)`` with one threshold ``tau``
per row, found in expected O(n) by selecting the k-th largest score. ``sparsek_backward`` is its
vector-Jacobian product. Tensors may be numpy arrays, torch CPU tensors or anything with
``__dlpack__`` or the buffer protocol, float32 or float64, with any leading dimensions; results
have the kind of the input. For autograd use ``foveal.torch.sparsek``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._common import (
    _as_float,
    _as_int,
    _check_array,
    _float_dtype,
    _new_like,
    _output,
    _to_numpy,
    _torch_empty,
    attention_options,
    attention_outputs,
    float_dtype_arg,
    is_torch,
)

__all__ = [
    "SparseKCache",
    "linear_scores",
    "prefix_thresholds",
    "sparsek",
    "sparsek_attention",
    "sparsek_backward",
    "sparsek_select",
]

_GATES = ("value", "kv", "none")


def _rows(function: str, name: str, x: Any) -> np.ndarray:
    """x as a numpy array of at least one dimension (float32 or float64)."""
    array = _to_numpy(function, name, x)
    _float_dtype(function, name, array)
    if array.ndim < 1:
        raise ValueError(f"foveal: {function}: {name} must have at least 1 dimension, got 0")
    return array


def _flat(function: str, name: str, array: np.ndarray, written: bool = False) -> np.ndarray:
    """array [..., n] as [rows, n]; an output must stay a view of its memory."""
    n = array.shape[-1]
    flat = array.reshape(int(np.prod(array.shape[:-1], dtype=np.int64)), n)
    if written and flat.size > 0 and not np.shares_memory(flat, array):
        raise ValueError(
            f"foveal: {function}: {name} must have leading dimensions that flatten without a copy"
        )
    return flat


def _threads(function: str, num_threads: Optional[int]) -> int:
    return 0 if num_threads is None else _as_int(function, "num_threads", num_threads)


def sparsek(
    z: Any,
    k: int,
    *,
    return_tau: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
) -> Any:
    """z: [..., n]  ->  p: [..., n] (and tau: [...] when ``return_tau``).

    ``p = argmin ‖p - z‖²`` over ``0 <= p <= 1, sum(p) = k`` per row, i.e.
    ``clip(z - tau, 0, 1)``. For ``k >= n`` every entry is 1 and tau is -inf. ``k >= 1``; ``z``
    must be finite (NaN or inf raise ValueError naming the position). ``out`` receives p."""
    function = "sparsek"
    k = _as_int(function, "k", k)
    threads = _threads(function, num_threads)
    array = _rows(function, "z", z)
    shape = tuple(array.shape)
    p, p_array = _output(function, "out", out, z, shape, array.dtype)
    tau, tau_array = (
        _output(function, "tau", None, z, shape[:-1], array.dtype) if return_tau else (None, None)
    )
    _core.sparsek(
        _flat(function, "z", array),
        k,
        _flat(function, "out", p_array, written=True),
        None if tau_array is None else tau_array.reshape(-1),
        threads,
    )
    return (p, tau) if return_tau else p


def sparsek_backward(p: Any, grad_p: Any, *, num_threads: Optional[int] = None) -> Any:
    """p, grad_p: [..., n]  ->  grad_z: [..., n] = ``1_F * (grad_p - mean_F(grad_p))`` per row,
    F = {0 < p < 1} (zero where F is empty)."""
    function = "sparsek_backward"
    threads = _threads(function, num_threads)
    p_array = _rows(function, "p", p)
    grad_array = _rows(function, "grad_p", grad_p)
    if grad_array.dtype != p_array.dtype:
        raise TypeError(
            f"foveal: {function}: grad_p must have dtype {p_array.dtype.name} (the dtype of p), "
            f"got {grad_array.dtype.name}"
        )
    if grad_array.shape != p_array.shape:
        raise ValueError(
            f"foveal: {function}: grad_p must have the shape of p {tuple(p_array.shape)}, "
            f"got {tuple(grad_array.shape)}"
        )
    grad_z, grad_z_array = _output(function, "grad_z", None, p, p_array.shape, p_array.dtype)
    _core.sparsek_backward(
        _flat(function, "p", p_array),
        _flat(function, "grad_p", grad_array),
        _flat(function, "grad_z", grad_z_array, written=True),
        threads,
    )
    return grad_z


# --------------------------------------------------------------------------------------------
# SparseK attention (docs/sparsek.md).


def _selection_args(
    function: str,
    topk: int,
    window: int,
    sink_tokens: int,
    causal: bool,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> dict:
    topk = _as_int(function, "topk", topk)
    if topk < 1:
        raise ValueError(f"foveal: {function}: topk must be >= 1, got {topk}")
    window = _as_int(function, "window", window)
    if window < 0:
        raise ValueError(f"foveal: {function}: window must be >= 0 (0: no window), got {window}")
    return dict(
        topk=topk,
        window=window,
        sink_tokens=_as_int(function, "sink_tokens", sink_tokens),
        causal=bool(causal),
        q_offset=-1 if q_offset is None else _as_int(function, "q_offset", q_offset),
        num_threads=_threads(function, num_threads),
    )


def _gate_and_scale(function: str, gate: Any, scale: Optional[float]) -> float:
    """Checks the gate name and the scale; returns the scale for _core (0 = 1/sqrt(D))."""
    if not isinstance(gate, str) or gate not in _GATES:
        raise ValueError(
            f"foveal: {function}: gate must be one of {', '.join(map(repr, _GATES))}, got {gate!r}"
        )
    if scale is None:
        return 0.0
    scale = _as_float(function, "scale", scale)
    if not scale > 0:
        raise ValueError(
            f"foveal: {function}: scale must be finite and > 0 (None = 1/sqrt(D)), got {scale}"
        )
    return scale


def sparsek_attention(
    q: Any,
    k: Any,
    v: Any,
    u: Any,
    topk: int,
    *,
    window: int = 0,
    sink_tokens: int = 0,
    gate: str = "value",
    causal: bool = True,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
) -> Any:
    """SparseK attention: each query attends to the ``topk`` keys with the highest scores ``u``
    among the keys it may select from, weighted by their SPARSEK gates, plus the last ``window``
    keys and the first ``sink_tokens`` keys, which are always visible with gate 1.

    Shapes: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]``, u
    ``[B, Hkv, Lk]`` (one score per key and kv head, e.g. from :func:`linear_scores`) -> out
    ``[B, Hq, Lq, Dv]``. Query i sits at position ``q_offset + i`` (default ``Lk - Lq``).
    Causal: the query at position p selects from the keys ``sink_tokens <= j <= p - window``
    (thresholds of nested prefixes, so a key evicted once never returns); non-causal: all
    queries share one selection from every key after the sinks (``window`` must be 0).
    ``gate``: ``"value"`` scales each selected value by its gate, ``"kv"`` scales key and
    value, ``"none"`` is hard top-k. ``topk`` larger than the pool selects all of it.

    Returns ``out``, or ``(out, lse)`` with ``return_lse=True``. Forward only (no autograd).
    """
    out, lse = attention_outputs(q, v, out, return_lse)
    _core.sparsek_attention(
        q,
        k,
        v,
        u,
        out,
        lse,
        topk=topk,
        window=window,
        gate=gate,
        **attention_options(locals()),
    )
    return (out, lse) if return_lse else out


def sparsek_select(
    u: Any,
    topk: int,
    len_q: int,
    *,
    window: int = 0,
    sink_tokens: int = 0,
    causal: bool = True,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> tuple[Any, Any]:
    """u ``[B, Hkv, Lk]`` -> (indices int64 ``[B, Hkv, Lq, topk]``, gates ``[B, Hkv, Lq, topk]``):
    the keys :func:`sparsek_attention` selects for each of ``len_q`` query positions, in
    increasing order, padded with -1 (gate 0) where fewer keys are available. Sinks and window
    keys are not listed (always visible, gate 1)."""
    function = "sparsek_select"
    selection = _selection_args(function, topk, window, sink_tokens, causal, q_offset, num_threads)
    len_q = _as_int(function, "len_q", len_q)
    if len_q < 0:
        raise ValueError(f"foveal: {function}: len_q must be >= 0, got {len_q}")
    u_array = _to_numpy(function, "u", u)
    dtype = _float_dtype(function, "u", u_array)
    _check_array(function, "u", u_array, "B, Hkv, Lk", dtype)
    shape = (*u_array.shape[:2], len_q, selection["topk"])
    if is_torch(u):
        indices = _torch_empty(shape, np.int64)
        indices_array = indices.numpy()
    else:
        indices = indices_array = np.empty(shape, dtype=np.int64)
    gates, gates_array = _new_like(u, shape, dtype)
    _core.sparsek_select(u_array, len_q, indices_array, gates_array, **selection)
    return indices, gates


def prefix_thresholds(
    z: Any, k: int, *, return_evicted: bool = False, num_threads: Optional[int] = None
) -> Any:
    """z ``[..., n]`` -> tau ``[..., n]``: ``tau[..., m - 1]`` is the SPARSEK threshold of the
    prefix ``z[..., :m]`` (-inf while ``m <= k``), all n of them in O(n log n) per row. With
    ``return_evicted=True`` also ``evicted_at`` (int64 ``[..., n]``): key j is in the top-k set of
    the prefixes of length ``j + 1 .. evicted_at - 1`` (``j + 1``: never; ``n + 1``: to the end)."""
    function = "sparsek_prefix_thresholds"
    k = _as_int(function, "k", k)
    threads = _threads(function, num_threads)
    array = _rows(function, "z", z)
    shape = tuple(array.shape)
    tau, tau_array = _new_like(z, shape, array.dtype)
    evicted = evicted_array = None
    if return_evicted:
        if is_torch(z):
            evicted = _torch_empty(shape, np.int64)
            evicted_array = evicted.numpy()
        else:
            evicted = evicted_array = np.empty(shape, dtype=np.int64)
    _core.sparsek_prefix_thresholds(
        _flat(function, "z", array),
        k,
        _flat(function, "tau", tau_array, written=True),
        None if evicted_array is None else _flat(function, "evicted_at", evicted_array, True),
        threads,
    )
    return (tau, evicted) if return_evicted else tau


def linear_scores(x: Any, w: Any, *, slope: float = 0.0, num_threads: Optional[int] = None) -> Any:
    """x ``[B, L, Dm]``, w ``[H, Dm]`` -> u ``[B, H, L]`` with ``u[b, h, j] = x[b, j] · w[h] +
    slope * j``: the paper's linear scorer (one per kv head) with its position slope."""
    function = "sparsek_linear_scores"
    slope = _as_float(function, "slope", slope)
    threads = _threads(function, num_threads)
    x_array = _to_numpy(function, "x", x)
    dtype = _float_dtype(function, "x", x_array)
    _check_array(function, "x", x_array, "B, L, Dm", dtype)
    w_array = _to_numpy(function, "w", w)
    _check_array(function, "w", w_array, "H, Dm", dtype)
    if w_array.shape[1] != x_array.shape[2]:
        raise ValueError(
            f"foveal: {function}: w.shape[1] must equal x.shape[2] (Dm) = {x_array.shape[2]}, "
            f"got {w_array.shape[1]}"
        )
    u, u_array = _new_like(x, (x_array.shape[0], w_array.shape[0], x_array.shape[1]), dtype)
    _core.sparsek_linear_scores(x_array, w_array, slope, u_array, threads)
    return u


# --------------------------------------------------------------------------------------------
# Constant-memory decode (docs/sparsek_cache.md).


class SparseKCache:
    """Constant-memory SparseK decode: the state that answers :func:`sparsek_attention` for the
    newest token of ``batch`` sequences that grow together, one token or a few at a time.

    ``SparseKCache(batch, heads_kv, dim, dim_v=None, topk=..., window=0, sink_tokens=0,
    gate="value", scale=None, softcap=0.0, dtype="float32")``. After appending the tokens at
    positions ``0 .. p`` (keys, values and their scores ``u``), :meth:`attend` with the query of
    position ``p`` equals row ``p`` of ``sparsek_attention(q, k, v, u, topk, window=...,
    sink_tokens=..., gate=...)`` over the whole sequence, to rounding.

    Per sequence and kv head only ``sink_tokens + window + topk`` rows of K and V are kept,
    allocated once: the sinks, the last ``window`` tokens, and the ``topk`` best-scored tokens of
    the pool (the tokens that left the window). A token that falls out of the top-k set is
    dropped for good: SPARSEK thresholds of a growing pool never decrease, so no later query can
    select it again. The threshold's own state holds one float64 per pool token with a gate
    above 0 (see :attr:`threshold_entries`). Sequences cannot have different lengths and tokens
    cannot be removed (no truncate). A rejected call raises ValueError or TypeError naming the
    argument and changes nothing.
    """

    def __init__(
        self,
        batch: int,
        heads_kv: int,
        dim: int,
        dim_v: Optional[int] = None,
        *,
        topk: int,
        window: int = 0,
        sink_tokens: int = 0,
        gate: str = "value",
        scale: Optional[float] = None,
        softcap: float = 0.0,
        dtype: Any = "float32",
        num_threads: Optional[int] = None,
    ) -> None:
        function = "SparseKCache"
        dtype = float_dtype_arg(function, dtype)
        scale = _gate_and_scale(function, gate, scale)
        selection = _selection_args(function, topk, window, sink_tokens, True, None, num_threads)
        sizes = [
            _as_int(function, name, value)
            for name, value in (
                ("batch", batch),
                ("heads_kv", heads_kv),
                ("dim", dim),
                ("dim_v", dim if dim_v is None else dim_v),
            )
        ]
        cache_class = _core.SparseKCacheF32 if dtype == np.float32 else _core.SparseKCacheF64
        self._cache = cache_class(
            *sizes,
            topk=selection["topk"],
            window=selection["window"],
            sink_tokens=selection["sink_tokens"],
            gate=gate,
            scale=scale,
            softcap=_as_float(function, "softcap", softcap),
            num_threads=selection["num_threads"],
        )
        self._dtype = dtype
        self._options = dict(
            topk=selection["topk"],
            window=selection["window"],
            sink_tokens=selection["sink_tokens"],
            gate=gate,
        )

    dtype = property(lambda self: self._dtype, doc="float32 or float64 (numpy dtype).")
    batch = property(lambda self: self._cache.batch, doc="Number of sequences B.")
    heads_kv = property(lambda self: self._cache.heads_kv, doc="Number of key/value heads Hkv.")
    dim = property(lambda self: self._cache.dim, doc="Key dimension D.")
    dim_v = property(lambda self: self._cache.dim_v, doc="Value dimension Dv.")
    topk = property(lambda self: self._options["topk"], doc="Selection budget per query.")
    window = property(lambda self: self._options["window"], doc="Always-visible last tokens.")
    sink_tokens = property(lambda self: self._options["sink_tokens"], doc="Always-visible first.")
    gate = property(lambda self: self._options["gate"], doc='"value", "kv" or "none".')
    capacity = property(
        lambda self: self._cache.capacity,
        doc="Rows of K/V storage per sequence and kv head: sink_tokens + window + topk.",
    )
    length = property(
        lambda self: self._cache.length, doc="Tokens appended so far (the next position)."
    )
    stored_rows = property(
        lambda self: self._cache.stored_rows,
        doc="Rows in use per sequence and kv head (never more than capacity).",
    )
    threshold_entries = property(
        lambda self: self._cache.threshold_entries,
        doc="The most float64 scores the threshold state holds for any sequence and kv head: "
        "at most topk with gate 1 plus those with a fractional gate (scores within 1 above tau).",
    )

    def append(self, k: Any, v: Any, u: Any) -> None:
        """Appends ``k`` ``[B, Hkv, n, D]``, ``v`` ``[B, Hkv, n, Dv]`` and their scores ``u``
        ``[B, Hkv, n]`` (finite) to every sequence: the same as n appends of one token."""
        function = "SparseKCache.append"
        k_array = _to_numpy(function, "k", k)
        _check_array(function, "k", k_array, "B, Hkv, n, D", self._dtype)
        v_array = _to_numpy(function, "v", v)
        _check_array(function, "v", v_array, "B, Hkv, n, Dv", self._dtype)
        u_array = _to_numpy(function, "u", u)
        _check_array(function, "u", u_array, "B, Hkv, n", self._dtype)
        self._cache.append(k_array, v_array, u_array)

    def attend(self, q: Any, *, return_lse: bool = False, out: Any = None) -> Any:
        """q ``[B, Hq, 1, D]`` (the query of the newest token; Hq a multiple of Hkv) -> out
        ``[B, Hq, 1, Dv]``, or ``(out, lse)`` with ``return_lse=True``: SparseK attention over the
        sinks, the window and the selected tokens with their gates. Results do not depend on the
        thread count."""
        function = "SparseKCache.attend"
        q_array = _to_numpy(function, "q", q)
        _check_array(function, "q", q_array, "B, Hq, 1, D", self._dtype)
        out_shape = (*q_array.shape[:3], self.dim_v)
        out_tensor, out_array = _output(function, "out", out, q, out_shape, self._dtype)
        lse_tensor, lse_array = (
            _new_like(q, out_shape[:3], self._dtype) if return_lse else (None, None)
        )
        self._cache.attend(q_array, out_array, lse_array)
        return (out_tensor, lse_tensor) if return_lse else out_tensor

    def selected(self, sequence: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions int64, gates) of the tokens the newest query of ``sequence`` selects on kv
        head ``head``, positions increasing (sinks and window tokens are not listed)."""
        function = "SparseKCache.selected"
        return self._cache.selected(
            _as_int(function, "sequence", sequence), _as_int(function, "head", head)
        )

    def threshold(self, sequence: int, head: int) -> float:
        """The SPARSEK threshold tau of the newest query's pool (-inf while it holds <= topk)."""
        function = "SparseKCache.threshold"
        return self._cache.threshold(
            _as_int(function, "sequence", sequence), _as_int(function, "head", head)
        )

    def reset(self) -> None:
        """Empties every sequence."""
        self._cache.reset()

    def __repr__(self) -> str:
        return (
            f"foveal.sparsek.SparseKCache(batch={self.batch}, heads_kv={self.heads_kv}, "
            f"dim={self.dim}, dim_v={self.dim_v}, topk={self.topk}, window={self.window}, "
            f"sink_tokens={self.sink_tokens}, gate={self.gate!r}, dtype={self._dtype.name}, "
            f"length={self.length})"
        )
