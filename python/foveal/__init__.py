"""foveal: efficient attention and embedding operators for CPUs.

Every function takes numpy arrays, torch CPU tensors, or anything with ``__dlpack__`` or the
buffer protocol, without copying, and returns the kind of its first tensor argument (numpy in,
numpy out; torch in, torch out). Wrong dtypes raise ``TypeError``; wrong shapes or values raise
``ValueError`` whose message names the argument, the expected and the actual value.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core
from ._common import (
    CacheGeometry,
    attention_options,
    attention_outputs,
    cache_dtype_arg,
    cache_outputs,
    dtype_name,
    dtype_of_class,
    forwarded,
    new_like,
    shape,
    storage_array,
)

__version__: str = _core.__version__

__all__ = [
    "MAX_THREADS",
    "AttentionKernel",
    "BlockSelection",
    "KVCache",
    "PagedKVCache",
    "SnapKVSelection",
    "TokenSelection",
    "attention",
    "attention_backward",
    "attention_kernel_names",
    "batch_decode_attention",
    "batch_prefill_attention",
    "block_sparse_attention",
    "block_sparse_select",
    "build_info",
    "decode_attention",
    "get_num_threads",
    "make_attention",
    "merge_states",
    "quest_decode_attention",
    "set_num_threads",
    "sliding_window_attention",
    "sliding_window_attention_backward",
    "snapkv_compress",
    "snapkv_gather",
    "snapkv_select",
    "sparsek_attention",
    "token_topk_attention",
    "token_topk_select",
    "vertical_slash_attention",
    "vertical_slash_select",
]

MAX_THREADS: int = _core.MAX_THREADS
"""The most threads a call's ``num_threads`` or :func:`set_num_threads` accepts (1024)."""


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads foveal uses when a call names none; 0 restores the default
    (OpenMP's: OMP_NUM_THREADS or the core count, at most MAX_THREADS). Values outside
    [0, MAX_THREADS] raise ValueError. A call never starts more threads than it has tasks."""
    _core.set_num_threads(num_threads=num_threads)


def get_num_threads() -> int:
    """Returns the number of threads a call that names none will use."""
    return _core.get_num_threads()


def build_info() -> dict:
    """How foveal was built and which ISA level its kernels run (docs/build.md).

    Returns a dict: ``version``; ``compiler``; ``compiled_levels``, the ISA levels the kernels
    were compiled for, lowest first (``"sse4.2"``, ``"avx2"``, ``"avx512"``; ``"native"`` in a
    ``FOVEAL_NATIVE`` build); ``supported_levels``, those this CPU runs; ``requested_level``,
    the environment variable ``FOVEAL_ISA`` (``"auto"`` when unset); ``level``, the level in
    use. The level is chosen once per process, at the first call that runs a kernel (or this
    one): ``FOVEAL_ISA``'s level, else the highest supported one. A ``FOVEAL_ISA`` that names
    no compiled level, or a level this CPU lacks, raises ValueError here and in every call
    that runs a kernel.
    """
    return _core.build_info()


# --------------------------------------------------------------------------------------------
# Attention.


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    bias: Any = None,
    key_start: Any = None,
    key_length: Any = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Exact attention: ``softmax(scale * q @ k^T + bias, masked) @ v``, never forming [Lq, Lk].

    Shapes: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]`` -> out
    ``[B, Hq, Lq, Dv]``; Hq must be a multiple of Hkv (GQA/MQA). ``[B, L, H, D]`` memory is
    passed as ``x.transpose(1, 2)`` (a view; no copy). Float32 or float64, or 16-bit storage
    (torch.bfloat16, torch.float16, numpy.float16) computed in float32 with out rounded to it
    (and lse float32); all of q, k, v, out and bias the same dtype.

    Query i sits at position ``q_offset + i`` (default ``Lk - Lq``, bottom-right aligned) and
    sees key j when ``pos(i) - window_left <= j <= pos(i) + window_right`` (-1 = unbounded;
    ``causal=True`` is ``window_right=0``) or ``j < sink_tokens``. ``softcap`` > 0 applies
    ``softcap * tanh(logit / softcap)`` before ``bias`` is added. ``bias`` is additive,
    ``[B or 1, Hq or 1, Lq, Lk]`` (or ``[Lq, Lk]``, ``[Hq, Lq, Lk]``); a boolean mask
    (True = attend) is accepted too. A query that sees no key gets output 0 (and lse -inf); a
    NaN in q, or in the key or value of a key a query sees, gives NaN in that row only.

    Variable-length batches: ``key_start`` and ``key_length`` (``[B]`` ints each, a list, array
    or tensor; None = 0 and every key from the start) make batch row b's keys the rows
    ``[key_start[b], key_start[b] + key_length[b])`` of k and v, as left padding (transformers'
    batched generate), right padding or both leave them. Padding keys are never read, their key
    blocks are skipped, positions stay absolute, and the sinks are the first ``sink_tokens``
    keys of each row's range: the result of row b is that of a call on its own keys.

    Returns ``out``, or ``(out, lse)`` with ``return_lse=True`` (lse ``[B, Hq, Lq]``, natural
    log of each row's softmax denominator). ``out=`` writes into a given tensor.
    ``num_threads`` overrides the global setting for this call.
    """
    out, lse = attention_outputs(q, v, out, return_lse)
    _core.attention(
        q,
        k,
        v,
        out,
        lse,
        bias,
        **attention_options(locals()),
    )
    return (out, lse) if return_lse else out


def sliding_window_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    window_left: int,
    window_right: int = -1,
    causal: bool = False,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    key_start: Any = None,
    key_length: Any = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Local attention whose cost grows with ``L * window``, not ``L^2``.

    Same shapes, options and returns as :func:`attention` (no bias), but the window must be
    bounded: ``window_left >= 0`` keys before each query, and on the right ``causal=True`` or
    ``window_right >= 0``; the first ``sink_tokens`` keys stay visible (attention sinks). Runs
    the same kernel as ``attention`` with these options and gives the same bits; a window of at
    least Lk gives full (causal) attention. ``key_start`` / ``key_length``: variable-length
    batches, as in :func:`attention`.
    """
    out, lse = attention_outputs(q, v, out, return_lse)
    _core.sliding_window_attention(
        q,
        k,
        v,
        out,
        lse,
        **attention_options(locals()),
    )
    return (out, lse) if return_lse else out


def _attention_backward(
    sliding: bool,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    bias: Any,
    bias_grad: bool,
    grad_lse: Any,
    options: dict,
) -> tuple:
    grads = tuple(new_like(q, shape(x)) for x in (q, k, v))
    grad_bias = new_like(q, shape(bias)) if bias_grad else None
    _core.attention_backward(
        sliding, q, k, v, out, lse, grad_out, *grads, bias, grad_bias, grad_lse, **options
    )
    return (*grads, grad_bias) if bias_grad else grads


def attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    bias: Any = None,
    return_bias_grad: bool = False,
    grad_lse: Any = None,
    key_start: Any = None,
    key_length: Any = None,
    num_threads: Optional[int] = None,
):
    """The gradients of :func:`attention`: ``(grad_q, grad_k, grad_v)`` for the loss gradient
    ``grad_out`` ``[B, Hq, Lq, Dv]``, given the forward's ``out`` and ``lse`` (from
    ``return_lse=True``) and the same inputs and options. ``bias`` is read as in the forward;
    with ``return_bias_grad=True`` the result also holds ``grad_bias`` (the bias's shape: the
    logits' gradient summed over the dimensions it broadcasts; a float bias, not a mask).
    ``grad_lse`` ``[B, Hq, Lq]`` (optional): the loss's gradient with respect to ``lse`` too, for
    losses that read it (learned sink logits do). ``key_start`` / ``key_length``: the forward's
    key ranges (padding keys get zero gradients).
    grad_k and grad_v sum over the query heads of a GQA group. Recomputes the probabilities tile
    by tile (never an ``[Lq, Lk]`` matrix, except grad_bias); bitwise identical for any thread
    count. For autograd use :func:`foveal.torch.attention`.
    """
    options = attention_options(locals())
    return _attention_backward(
        False, q, k, v, out, lse, grad_out, bias, return_bias_grad, grad_lse, options
    )


def sliding_window_attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    *,
    window_left: int,
    window_right: int = -1,
    causal: bool = False,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    grad_lse: Any = None,
    key_start: Any = None,
    key_length: Any = None,
    num_threads: Optional[int] = None,
):
    """The gradients of :func:`sliding_window_attention` (see :func:`attention_backward`,
    ``grad_lse`` included); work grows with ``L * window`` as in the forward."""
    options = attention_options(locals())
    return _attention_backward(True, q, k, v, out, lse, grad_out, None, False, grad_lse, options)


def merge_states(
    out_a: Any,
    lse_a: Any,
    out_b: Any,
    lse_b: Any,
    *,
    out: Any = None,
    lse: Any = None,
    num_threads: Optional[int] = None,
):
    """Merges two attention states over disjoint sets of keys into the state over their union.

    ``out_a``, ``out_b``: ``[B, H, L, Dv]``; ``lse_a``, ``lse_b``: ``[B, H, L]`` (as returned by
    ``attention(..., return_lse=True)``). With ``m = max(lse_a, lse_b)``,
    ``w = exp(lse - m)``: ``out = (w_a out_a + w_b out_b) / (w_a + w_b)``,
    ``lse = m + log(w_a + w_b)``; a state with ``lse = -inf`` (no keys) has weight 0. Returns
    ``(out, lse)``. Pass ``out=out_a, lse=lse_a`` to merge in place. Every lse must be finite
    or -inf.
    """
    out_shape = shape(out_a)
    if out is None:
        out = new_like(out_a, out_shape)
    if lse is None:
        lse = new_like(out_a, out_shape[:3])
    _core.merge_states(out_a, lse_a, out_b, lse_b, out, lse, num_threads=num_threads)
    return out, lse


class KVCache(CacheGeometry):
    """Key/value storage for incremental decoding: keys ``[B, Hkv, capacity, D]`` and values
    ``[B, Hkv, capacity, Dv]`` with one length per sequence (a ragged batch).

    ``KVCache(batch, heads_kv, capacity, dim, dim_v=None, dtype="float32")`` owns zeroed
    storage (``dtype`` float32, float64, "bfloat16" or float16: a 16-bit cache holds half the
    bytes and decodes in float32; "int8": an 8-bit cache that quantizes what it appends, each
    run of 32 values of a row to int8 with one float32 scale (36 bytes per 32 values, 3.56x
    fewer than float32), takes float32 k, v and q and gives float32 out, its ``keys`` and
    ``values`` being dequantized copies); ``KVCache.wrap(keys, values)`` uses the caller's arrays or
    tensors (kept alive by the cache). With ``ring=True`` the cache is a ring buffer for
    sliding-window layers: once full, a new token overwrites the oldest one that is not among
    the first ``sink_tokens``; without it, appending past capacity raises ValueError. A
    rejected call changes nothing. With ``page_bounds=P`` > 0 the cache also keeps, for every
    run of P storage rows (a page), the elementwise min and max of its stored keys, kept current
    by append, truncate and reset, for :func:`quest_decode_attention`.

    Storage is zeroed lazily (untouched rows take no memory); a size that cannot be allocated
    raises MemoryError naming the byte count. Any number of threads may decode over one cache
    at once, but ``append``, ``truncate`` and ``reset`` must run alone: overlapping misuse
    raises ValueError ("the cache is being modified by another thread") and changes nothing.
    """

    def __init__(
        self,
        batch: int,
        heads_kv: int,
        capacity: int,
        dim: int,
        dim_v: Optional[int] = None,
        *,
        dtype: Any = "float32",
        ring: bool = False,
        sink_tokens: int = 0,
        page_bounds: int = 0,
    ) -> None:
        self._dtype = cache_dtype_arg("KVCache", dtype)
        self._cache = _KV_CACHE_CLASSES[dtype_name(self._dtype)](
            batch=batch,
            heads_kv=heads_kv,
            capacity=capacity,
            dim=dim,
            dim_v=dim_v,
            ring=ring,
            sink_tokens=sink_tokens,
            page_bounds=page_bounds,
        )

    @classmethod
    def wrap(
        cls,
        keys: Any,
        values: Any,
        *,
        ring: bool = False,
        sink_tokens: int = 0,
        lengths: Any = None,
        page_bounds: int = 0,
    ) -> KVCache:
        """A cache over existing storage: keys ``[B, Hkv, capacity, D]`` and values
        ``[B, Hkv, capacity, Dv]``, float32, float64, bfloat16 or float16, writable, innermost
        dimension contiguous. The cache writes appended tokens into them. ``lengths`` (default
        all 0) says how many tokens each sequence already holds there (laid out as the cache
        lays them out), so storage filled elsewhere is adopted without a copy. An int8 cache's
        storage is uint8 with one more dimension, the 36 bytes of each block of 32 values (its
        float32 scale, then 32 int8 values): ``[B, Hkv, capacity, blocks, 36]`` (D = 32 *
        blocks), the blocks of a row contiguous, 4-byte aligned."""
        self = cls.__new__(cls)
        self._cache = _core.wrap_kv_cache(
            keys,
            values,
            ring=ring,
            sink_tokens=sink_tokens,
            lengths=lengths,
            page_bounds=page_bounds,
        )
        self._dtype = dtype_of_class(_KV_CACHE_CLASSES, self._cache)
        return self

    batch = forwarded("batch", "Number of sequences B.")
    capacity = forwarded("capacity", "Rows of storage per sequence and head.")
    ring = forwarded("ring", "True for a ring buffer.")
    sink_tokens = forwarded("sink_tokens", "Leading tokens a ring buffer never overwrites.")

    @property
    def lengths(self) -> list[int]:
        """Tokens appended to each sequence so far (the position of its next token)."""
        return list(self._cache.lengths)

    def first_retained(self, sequence: int) -> int:
        """Where the stored non-sink tokens of ``sequence`` begin (ring mode drops older ones):
        positions ``[max(first_retained, sink_tokens), length)`` are held."""
        return self._cache.first_retained(sequence=sequence)

    @property
    def keys(self) -> Any:
        """The key storage ``[B, Hkv, capacity, D]``, read-only (ring rows wrap): a numpy array,
        or a torch tensor for a bfloat16 cache (numpy has no bfloat16); for an int8 cache a
        float32 copy of the dequantized keys."""
        return storage_array(self._cache.keys, self._dtype)

    @property
    def values(self) -> Any:
        """The value storage ``[B, Hkv, capacity, Dv]``, read-only (ring rows wrap): a numpy
        array, or a torch tensor for a bfloat16 cache; for an int8 cache a float32 copy of the
        dequantized values."""
        return storage_array(self._cache.values, self._dtype)

    def append(self, k: Any, v: Any, *, counts: Any = None) -> None:
        """Appends ``k`` ``[B, Hkv, n, D]`` and ``v`` ``[B, Hkv, n, Dv]`` to every sequence; with
        ``counts`` (B ints in [0, n]) sequence b takes only its first ``counts[b]`` steps."""
        self._cache.append(k, v, counts=counts)

    def truncate(self, length: int, *, sequence: Optional[int] = None) -> None:
        """Cuts every sequence longer than ``length`` to ``length`` (speculative-decoding
        rollback); with ``sequence``, cuts only that one (``length`` <= its length)."""
        self._cache.truncate(length=length, sequence=sequence)

    def reset(self) -> None:
        """Empties every sequence."""
        self._cache.reset()

    page_size = forwarded("page_size", "Rows per page of the page bounds (0: none kept).")

    @property
    def page_bounds(self) -> np.ndarray:
        """A copy of the page bounds ``[B, Hkv, pages, 2, D]`` (min, then max, of each page's
        stored keys; +inf / -inf for a page holding none). float64 caches keep them exactly; the
        others keep them in bfloat16, the min rounded down and the max rounded up (still bounds:
        half the bytes for the page selection to read), returned as float32."""
        return self._cache.page_bounds

    def refresh_page_bounds(self) -> None:
        """Recomputes every page bound: for wrapped storage whose stored keys the caller
        changed in place (append, truncate and reset keep the bounds current)."""
        self._cache.refresh_page_bounds()

    def __repr__(self) -> str:
        mode = f", ring=True, sink_tokens={self.sink_tokens}" if self.ring else ""
        return (
            f"foveal.KVCache(batch={self.batch}, heads_kv={self.heads_kv}, "
            f"capacity={self.capacity}, dim={self.dim}, dim_v={self.dim_v}, "
            f"dtype={dtype_name(self._dtype)}{mode}, lengths={self.lengths})"
        )


_KV_CACHE_CLASSES = {
    "float32": _core.KVCacheF32,
    "float64": _core.KVCacheF64,
    "bfloat16": _core.KVCacheBF16,
    "float16": _core.KVCacheF16,
    "int8": _core.KVCacheQ8,
}


def decode_attention(
    q: Any,
    cache: KVCache,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    key_start: Any = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Attention of the newest ``Lq`` tokens of every sequence over its cached keys.

    ``q``: ``[B, Hq, Lq, D]`` (Hq a multiple of the cache's Hkv) -> out ``[B, Hq, Lq, Dv]``.
    Query i of sequence b sits at position ``length_b - Lq + i``: append the new tokens' keys
    and values first. Options as in :func:`attention` (``causal=True`` for verifying Lq > 1
    speculative drafts; windows and sinks for local layers, also over a ring buffer). The
    keys are split into fixed chunks computed in parallel and merged in order, so results do not
    depend on the thread count. A NaN in q or in a key or value a query sees makes its row NaN,
    as in :func:`attention`. q and out have the cache's dtype (float32 over an int8 cache); over
    a bfloat16 or float16 cache lse is float32. ``key_start`` (``[B]`` ints, optional): left
    padding, sequence b's real keys start at position ``key_start[b]`` (the keys before it are
    never read; sinks count from it), as in :func:`attention`'s variable-length batches.
    """
    return _attend_cache("decode_attention", "decode", q, cache, out, return_lse, locals())


def quest_decode_attention(
    q: Any,
    cache: KVCache,
    *,
    budget: float = 1.0 / 16,
    local_pages: int = 1,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """:func:`decode_attention` over the pages Quest selects (docs/sparse_attention.md): the
    cache must keep page bounds (``KVCache(..., page_bounds=16)``). Of a (sequence, kv head)'s
    C candidate pages (pages storing a key some query sees, sinks apart) it keeps
    ``min(C, max(ceil(budget * C), local))``: the pages of the newest ``local_pages * page_size``
    positions, then those with the largest bound of the logit, the max over the group's query
    rows of ``sum_d max(q_d * min_d, q_d * max_d)``. The sinks are always seen. Options,
    shapes, dtypes and returns as :func:`decode_attention`; the same bits for any thread
    count. ``exp(lse - lse_dense)`` is the attention mass the kept pages hold.
    """
    extra = {"budget": budget, "local_pages": local_pages}
    return _attend_cache(
        "quest_decode_attention", "quest", q, cache, out, return_lse, locals(), extra
    )


def _attend_cache(
    function: str,
    method: str,
    q: Any,
    cache: Any,
    out: Any,
    return_lse: bool,
    arguments: dict,
    extra: Optional[dict] = None,
):
    """Runs the compiled cache method ``method`` (decode, quest) of a KVCache call: checks the
    cache's type, allocates out (and lse) and passes the attention options among
    ``arguments`` with ``extra``."""
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"foveal: {function}: cache must be a foveal.KVCache, got {type(cache).__name__}"
        )
    out, lse = cache_outputs(q, cache, out, return_lse)
    getattr(cache._cache, method)(q, out, lse, **(extra or {}), **attention_options(arguments))
    return (out, lse) if return_lse else out


def attention_kernel_names() -> list[str]:
    """The names make_attention accepts, sorted."""
    return list(_core.attention_kernel_names())


class AttentionKernel:
    """An attention kernel chosen by name and bound to its options (see make_attention)."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    @property
    def name(self) -> str:
        return self._kernel.name

    def __call__(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        bias: Any = None,
        return_lse: bool = False,
        out: Any = None,
        **extras: Any,
    ):
        """Runs the kernel: same shapes and returns as foveal.attention; extras are named
        kernel inputs of shape [*, *, *] (e.g. SparseK's scores)."""
        out, lse = attention_outputs(q, v, out, return_lse)
        self._kernel.forward(q, k, v, out, lse, bias, extras)
        return (out, lse) if return_lse else out

    def __repr__(self) -> str:
        return f"foveal.AttentionKernel({self.name!r})"


def make_attention(
    name: str,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
    **params: Any,
) -> AttentionKernel:
    """Builds the attention kernel registered as ``name`` ("dense", ...) with these options;
    kernel-specific settings go in ``params`` (e.g. ``topk=256``). Unknown names raise
    ValueError listing the known ones."""
    string_params = {key: str(value) for key, value in params.items()}
    kernel = _core.make_attention(
        name,
        string_params,
        **attention_options(locals()),
    )
    return AttentionKernel(kernel)


from . import paged as paged  # noqa: E402
from . import pde_ssm as pde_ssm  # noqa: E402  (after the helpers it uses)
from . import spade as spade  # noqa: E402  (after the helpers it uses)
from . import sparse as sparse  # noqa: E402
from . import sparsek as sparsek  # noqa: E402
from . import vq as vq  # noqa: E402
from .paged import PagedKVCache as PagedKVCache  # noqa: E402
from .paged import batch_decode_attention as batch_decode_attention  # noqa: E402
from .paged import batch_prefill_attention as batch_prefill_attention  # noqa: E402
from .sparse import BlockSelection as BlockSelection  # noqa: E402
from .sparse import SnapKVSelection as SnapKVSelection  # noqa: E402
from .sparse import TokenSelection as TokenSelection  # noqa: E402
from .sparse import block_sparse_attention as block_sparse_attention  # noqa: E402
from .sparse import block_sparse_select as block_sparse_select  # noqa: E402
from .sparse import snapkv_compress as snapkv_compress  # noqa: E402
from .sparse import snapkv_gather as snapkv_gather  # noqa: E402
from .sparse import snapkv_select as snapkv_select  # noqa: E402
from .sparse import token_topk_attention as token_topk_attention  # noqa: E402
from .sparse import token_topk_select as token_topk_select  # noqa: E402
from .sparse import vertical_slash_attention as vertical_slash_attention  # noqa: E402
from .sparse import vertical_slash_select as vertical_slash_select  # noqa: E402
from .sparsek import sparsek_attention as sparsek_attention  # noqa: E402
