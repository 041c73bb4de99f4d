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
    attention_options,
    attention_outputs,
    dtype_name,
    new_like,
    shape,
    size,
    storage_dtype_arg,
)

__all__ = [
    "SparseKCache",
    "linear_scores",
    "prefix_thresholds",
    "sparsek",
    "sparsek_attention",
    "sparsek_attention_backward",
    "sparsek_backward",
    "sparsek_select",
]


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
    shape_z = shape(z)
    if out is None:
        out = new_like(z, shape_z)
    tau = new_like(z, shape_z[:-1]) if return_tau else None
    _core.sparsek(z, out, tau, k=k, num_threads=num_threads)
    return (out, tau) if return_tau else out


def sparsek_backward(p: Any, grad_p: Any, *, num_threads: Optional[int] = None) -> Any:
    """p, grad_p: [..., n]  ->  grad_z: [..., n] = ``1_F * (grad_p - mean_F(grad_p))`` per row,
    F = {0 < p < 1} (zero where F is empty)."""
    grad_z = new_like(p, shape(p))
    _core.sparsek_backward(p, grad_p, grad_z, num_threads=num_threads)
    return grad_z


# --------------------------------------------------------------------------------------------
# SparseK attention (docs/sparsek.md).


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
    key_start: Any = None,
    key_length: Any = None,
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
    ``key_start`` / ``key_length`` (``[B]`` ints): variable-length batches as in
    :func:`foveal.attention`; row b is the call on its own keys and scores.

    Returns ``out``, or ``(out, lse)`` with ``return_lse=True``. Gradients:
    :func:`sparsek_attention_backward`; autograd: :func:`foveal.torch.sparsek_attention`.
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


def sparsek_attention_backward(
    q: Any,
    k: Any,
    v: Any,
    u: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    topk: int,
    *,
    window: int = 0,
    sink_tokens: int = 0,
    gate: str = "value",
    causal: bool = True,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    score_grad: bool = True,
    key_start: Any = None,
    key_length: Any = None,
    num_threads: Optional[int] = None,
) -> tuple[Any, Any, Any, Any]:
    """The gradients of :func:`sparsek_attention`: ``(grad_q, grad_k, grad_v, grad_u)`` for the
    loss gradient ``grad_out`` ``[B, Hq, Lq, Dv]``, given the forward's ``out`` and ``lse``
    (``return_lse=True``) and the same inputs and options.

    ``grad_u`` ``[B, Hkv, Lk]`` is the gradient to the scores through the SPARSEK gates: on the
    fractional support F of each query's pool (keys with ``0 < u - tau < 1``) a gate moves with
    its own score and, through tau, against the mean over F (``dm_j/du_l = [j = l] - 1/|F|``).
    It is what trains a scorer such as :func:`linear_scores`; ``score_grad=False`` skips it
    (None is returned). Gate ``"none"`` has no derivative in u: zeros. grad_k, grad_v and
    grad_u sum over the query heads of a group. Bitwise identical for any thread count. For
    autograd use :func:`foveal.torch.sparsek_attention`. ``key_start`` / ``key_length``: the
    forward's key ranges (padding keys get zero gradients).
    """
    grads = [new_like(q, shape(x)) for x in (q, k, v)]
    grad_u = new_like(q, shape(u)) if score_grad else None
    _core.sparsek_attention_backward(
        q,
        k,
        v,
        u,
        out,
        lse,
        grad_out,
        *grads,
        grad_u,
        topk=topk,
        window=window,
        gate=gate,
        **attention_options(locals()),
    )
    return (*grads, grad_u)


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
    u_shape = shape(u)
    out_shape = (*u_shape[:2], size(len_q), size(topk))
    indices = new_like(u, out_shape, np.int64)
    gates = new_like(u, out_shape)
    _core.sparsek_select(
        u,
        indices,
        gates,
        len_q=len_q,
        topk=topk,
        window=window,
        sink_tokens=sink_tokens,
        causal=causal,
        q_offset=q_offset,
        num_threads=num_threads,
    )
    return indices, gates


def prefix_thresholds(
    z: Any, k: int, *, return_evicted: bool = False, num_threads: Optional[int] = None
) -> Any:
    """z ``[..., n]`` -> tau ``[..., n]``: ``tau[..., m - 1]`` is the SPARSEK threshold of the
    prefix ``z[..., :m]`` (-inf while ``m <= k``), all n of them in O(n log n) per row. With
    ``return_evicted=True`` also ``evicted_at`` (int64 ``[..., n]``): key j is in the top-k set of
    the prefixes of length ``j + 1 .. evicted_at - 1`` (``j + 1``: never; ``n + 1``: to the end)."""
    z_shape = shape(z)
    tau = new_like(z, z_shape)
    evicted = new_like(z, z_shape, np.int64) if return_evicted else None
    _core.sparsek_prefix_thresholds(z, tau, evicted, k=k, num_threads=num_threads)
    return (tau, evicted) if return_evicted else tau


def linear_scores(x: Any, w: Any, *, slope: float = 0.0, num_threads: Optional[int] = None) -> Any:
    """x ``[B, L, Dm]``, w ``[H, Dm]`` -> u ``[B, H, L]`` with ``u[b, h, j] = x[b, j] · w[h] +
    slope * j``: the paper's linear scorer (one per kv head) with its position slope."""
    x_shape, w_shape = shape(x), shape(w)
    u = new_like(x, (*x_shape[:1], *w_shape[:1], *x_shape[1:2]))
    _core.sparsek_linear_scores(x, w, u, slope=slope, num_threads=num_threads)
    return u


# --------------------------------------------------------------------------------------------
# Constant-memory decode (docs/sparsek_cache.md).


class SparseKCache:
    """Constant-memory SparseK decode: the state that answers :func:`sparsek_attention` for the
    newest token of ``batch`` sequences that grow together, one token or a few at a time.

    ``SparseKCache(batch, heads_kv, dim, dim_v=None, topk=..., window=0, sink_tokens=0,
    gate="value", scale=None, softcap=0.0, dtype="float32")``; ``dtype`` float32, float64,
    "bfloat16" or float16 (a 16-bit cache stores K and V in half the bytes and takes k, v, u, q
    in its dtype — torch tensors for bfloat16 — computing in float32; lse and the gates are
    float32). After appending the tokens at
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
        self._dtype = storage_dtype_arg("SparseKCache", dtype)
        self._cache = _SPARSEK_CACHE_CLASSES[dtype_name(self._dtype)](
            batch=batch,
            heads_kv=heads_kv,
            dim=dim,
            dim_v=dim_v,
            topk=topk,
            window=window,
            sink_tokens=sink_tokens,
            gate=gate,
            scale=scale,
            softcap=softcap,
            num_threads=num_threads,
        )
        self._options = dict(topk=topk, window=window, sink_tokens=sink_tokens, gate=gate)

    dtype = property(
        lambda self: self._dtype,
        doc='float32, float64 or float16 (numpy dtype), or "bfloat16".',
    )
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
        self._cache.append(k, v, u)

    def attend(self, q: Any, *, return_lse: bool = False, out: Any = None) -> Any:
        """q ``[B, Hq, 1, D]`` (the query of the newest token; Hq a multiple of Hkv) -> out
        ``[B, Hq, 1, Dv]``, or ``(out, lse)`` with ``return_lse=True``: SparseK attention over the
        sinks, the window and the selected tokens with their gates. Results do not depend on the
        thread count."""
        q_shape = shape(q)
        if out is None:
            out = new_like(q, (*q_shape[:3], self.dim_v), self._dtype)
        lse_dtype = self._dtype if dtype_name(self._dtype) in ("float32", "float64") else "float32"
        lse = new_like(q, q_shape[:3], lse_dtype) if return_lse else None
        self._cache.attend(q, out, lse)
        return (out, lse) if return_lse else out

    def selected(self, sequence: int, head: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions int64, gates) of the tokens the newest query of ``sequence`` selects on kv
        head ``head``, positions increasing (sinks and window tokens are not listed)."""
        return self._cache.selected(sequence=sequence, head=head)

    def threshold(self, sequence: int, head: int) -> float:
        """The SPARSEK threshold tau of the newest query's pool (-inf while it holds <= topk)."""
        return self._cache.threshold(sequence=sequence, head=head)

    def reset(self) -> None:
        """Empties every sequence."""
        self._cache.reset()

    def __repr__(self) -> str:
        return (
            f"foveal.sparsek.SparseKCache(batch={self.batch}, heads_kv={self.heads_kv}, "
            f"dim={self.dim}, dim_v={self.dim_v}, topk={self.topk}, window={self.window}, "
            f"sink_tokens={self.sink_tokens}, gate={self.gate!r}, "
            f"dtype={dtype_name(self._dtype)}, "
            f"length={self.length})"
        )


_SPARSEK_CACHE_CLASSES = {
    "float32": _core.SparseKCacheF32,
    "float64": _core.SparseKCacheF64,
    "bfloat16": _core.SparseKCacheBF16,
    "float16": _core.SparseKCacheF16,
}
