"""A paged KV cache for serving many sequences, and batched attention over it (docs/serving.md).

``PagedKVCache`` keeps the keys and values of every sequence in one pool of fixed-size pages;
``batch_decode_attention`` runs the decode step of a whole batch of sequences in one call and
``batch_prefill_attention`` appends a chunk of new tokens per sequence and attends them.
Sequences forked from one prompt share its pages, and a batch call reads shared pages once.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _core
from ._common import (
    CacheGeometry,
    attention_options,
    cache_dtype_arg,
    cache_outputs,
    dtype_name,
    dtype_of_class,
    forwarded,
    shape,
    storage_array,
    tensor_dtype_name,
)

_PAGED_CLASSES = {
    "float32": _core.PagedKVCacheF32,
    "float64": _core.PagedKVCacheF64,
    "bfloat16": _core.PagedKVCacheBF16,
    "float16": _core.PagedKVCacheF16,
    "int8": _core.PagedKVCacheQ8,
}


class PagedKVCache(CacheGeometry):
    """Keys and values of many sequences in one pool of pages: keys ``[num_pages, Hkv,
    page_size, D]``, values ``[num_pages, Hkv, page_size, Dv]``.

    ``PagedKVCache(num_pages, page_size, heads_kv, dim, dim_v=None, dtype="float32")`` owns its
    pool (zeroed lazily: pages never written take no memory; ``dtype`` float32, float64,
    "bfloat16" or float16: 16-bit pages hold half the bytes and attend in float32; int8: each
    run of 32 values of a row is stored as int8 with one float32 scale, 36 bytes per 32 values,
    quantized as it is appended; such a pool takes float32 k, v and q, gives float32 out, and its
    ``keys`` and ``values`` are float32 copies of the dequantized pool);
    ``PagedKVCache.wrap(pool)`` uses a caller's ``[num_pages, 2, Hkv, page_size, D]`` tensor
    (keys ``pool[:, 0]``, values ``pool[:, 1]``), so a Python server can own the memory.

    A sequence is an id (from :meth:`add_sequence` or :meth:`fork`; ids are never reused) with a
    page table: token p sits in slot ``p % page_size`` of page ``page_table(id)[p //
    page_size]``. :meth:`fork` shares the parent's full pages (copy-on-write: an append never
    writes into a shared page) and copies its partial last page. A call that would need more
    pages than are free raises ``MemoryError`` and changes nothing; an unknown or removed id,
    or a wrong shape, raises ``ValueError`` and changes nothing. Batch attention may run from
    several threads at once, but mutations must run alone (overlapping misuse raises
    ValueError).
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        heads_kv: int,
        dim: int,
        dim_v: Optional[int] = None,
        *,
        dtype: Any = "float32",
    ) -> None:
        self._dtype = cache_dtype_arg("PagedKVCache", dtype)
        self._cache = _PAGED_CLASSES[dtype_name(self._dtype)](
            num_pages=num_pages, page_size=page_size, heads_kv=heads_kv, dim=dim, dim_v=dim_v
        )

    @classmethod
    def wrap(cls, pool: Any = None, *, keys: Any = None, values: Any = None) -> PagedKVCache:
        """A cache over caller memory: ``pool`` ``[num_pages, 2, Hkv, page_size, D]`` (keys are
        ``pool[:, 0]``, values ``pool[:, 1]``), or ``keys`` ``[num_pages, Hkv, page_size, D]``
        and ``values`` ``[num_pages, Hkv, page_size, Dv]`` given separately. float32, float64,
        bfloat16 or float16, writable, innermost dimension contiguous; kept alive by the cache.
        An int8 pool is uint8 memory with one more dimension, the 36 bytes of each block of 32
        values (its float32 scale, then 32 int8 values): ``[num_pages, 2, Hkv, page_size,
        blocks, 36]`` (D = 32 * blocks), 4-byte aligned. The pages are all free: the cache
        starts with no sequences."""
        if (pool is None) == (keys is None and values is None):
            raise TypeError("foveal: PagedKVCache.wrap: give either pool or both keys and values")
        if pool is not None:
            pool_shape = shape(pool)
            blocks = tensor_dtype_name(pool) == "uint8"  # an 8-bit pool's bytes
            if len(pool_shape) != (6 if blocks else 5) or pool_shape[1] != 2:
                layout = "blocks, 36" if blocks else "D"
                raise ValueError(
                    "foveal: PagedKVCache.wrap: pool must have shape [num_pages, 2, Hkv, "
                    f"page_size, {layout}], got {list(pool_shape)}"
                )
            keys, values = pool[:, 0], pool[:, 1]
        self = cls.__new__(cls)
        self._cache = _core.wrap_paged_kv_cache(keys, values)
        self._dtype = dtype_of_class(_PAGED_CLASSES, self._cache)
        return self

    num_pages = forwarded("num_pages", "Pages in the pool.")
    page_size = forwarded("page_size", "Tokens per page.")
    free_pages = forwarded("free_pages", "Pages no sequence holds.")
    pages_in_use = forwarded("pages_in_use", "Pages some sequence holds (shared ones once).")
    page_bytes = forwarded("page_bytes", "Bytes of keys and values one page holds.")

    @property
    def bytes_in_use(self) -> int:
        """Bytes of the pages in use (shared pages counted once)."""
        return self.pages_in_use * self.page_bytes

    @property
    def sequences(self) -> list[int]:
        """The ids of the live sequences, increasing."""
        return list(self._cache.sequences)

    @property
    def keys(self) -> Any:
        """The key pool ``[num_pages, Hkv, page_size, D]``, read-only (a torch.bfloat16 tensor
        for a bfloat16 pool, else numpy)."""
        return storage_array(self._cache.keys, self._dtype)

    @property
    def values(self) -> Any:
        """The value pool ``[num_pages, Hkv, page_size, Dv]``, read-only (as ``keys``)."""
        return storage_array(self._cache.values, self._dtype)

    def add_sequence(self) -> int:
        """Starts an empty sequence; returns its id."""
        return self._cache.add_sequence()

    def fork(self, sequence: int) -> int:
        """A new sequence holding ``sequence``'s tokens: full pages shared, the partial last
        page copied (MemoryError when no page is free for it). Returns its id."""
        return self._cache.fork(sequence=sequence)

    def remove(self, sequence: int) -> None:
        """Forgets ``sequence`` and frees the pages no other sequence holds."""
        self._cache.remove(sequence=sequence)

    def truncate(self, sequence: int, length: int) -> None:
        """Cuts ``sequence`` to ``length`` tokens (<= its length), freeing pages it no longer
        needs (speculative-decoding rollback); a length inside a released page is a
        ValueError."""
        self._cache.truncate(sequence=sequence, length=length)

    def release(self, sequence: int, begin: int, end: int) -> int:
        """Frees the pages of ``sequence`` that lie wholly inside positions ``[begin, end)``
        (``0 <= begin <= end <= length``), for a sliding-window layer: after each step,
        ``release(s, sink_tokens, length - 1 - window)`` keeps only the pages its next query can
        see. Positions keep their numbers; ``page_table`` shows a released page as -1; a batch
        call whose queries would see a released position raises ValueError. Returns how many
        pages this call released."""
        return self._cache.release(sequence=sequence, begin=begin, end=end)

    def holds(self, sequence: int, position: int) -> bool:
        """Whether ``sequence`` still holds the key at ``position`` (False once released)."""
        return bool(self._cache.holds(sequence=sequence, position=position))

    def released_pages(self, sequence: int) -> int:
        """How many entries of ``sequence``'s page table are released."""
        return self._cache.released_pages(sequence=sequence)

    def length(self, sequence: int) -> int:
        """Tokens ``sequence`` holds (the position of its next token)."""
        return self._cache.length(sequence=sequence)

    def page_table(self, sequence: int) -> list[int]:
        """The pages of ``sequence``, in position order (-1 for a released page)."""
        return list(self._cache.page_table(sequence=sequence))

    def references(self, page: int) -> int:
        """How many sequences hold ``page`` (0: free)."""
        return self._cache.references(page=page)

    def __contains__(self, sequence: int) -> bool:
        return bool(self._cache.contains(sequence=sequence))

    def append(
        self, sequences: Union[int, Sequence[int]], k: Any, v: Any, *, counts: Any = None
    ) -> None:
        """Appends tokens. With one id: ``k`` ``[Hkv, n, D]``, ``v`` ``[Hkv, n, Dv]``. With a
        list of S distinct ids: ``k`` ``[S, Hkv, n, D]``, ``v`` ``[S, Hkv, n, Dv]`` and
        optional ``counts`` (S ints in [0, n]: sequence s takes its first counts[s] tokens);
        all or nothing (MemoryError if the pool cannot hold every append)."""
        if isinstance(sequences, (int, np.integer)):
            if len(shape(k)) != 3 or len(shape(v)) != 3:
                raise ValueError(
                    "foveal: PagedKVCache.append: with one sequence id, k and v must be "
                    f"[Hkv, n, D] and [Hkv, n, Dv], got {list(shape(k))} and {list(shape(v))}"
                )
            sequences, k, v = [sequences], k[None], v[None]
        self._cache.append(k, v, sequences=list(sequences), counts=counts)

    def __repr__(self) -> str:
        return (
            f"foveal.PagedKVCache(num_pages={self.num_pages}, page_size={self.page_size}, "
            f"heads_kv={self.heads_kv}, dim={self.dim}, dim_v={self.dim_v}, "
            f"dtype={dtype_name(self._dtype)}, sequences={len(self.sequences)}, "
            f"pages_in_use={self.pages_in_use})"
        )


def _check_cache(function: str, cache: Any) -> None:
    if not isinstance(cache, PagedKVCache):
        raise TypeError(
            f"foveal: {function}: cache must be a foveal.PagedKVCache, got {type(cache).__name__}"
        )


def _results(out: Any, lse: Any, info: dict, return_lse: bool, return_info: bool) -> Any:
    results = (out,) + ((lse,) if return_lse else ()) + ((info,) if return_info else ())
    return results[0] if len(results) == 1 else results


def batch_decode_attention(
    q: Any,
    cache: PagedKVCache,
    sequences: Sequence[int],
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    share_prefixes: bool = True,
    return_lse: bool = False,
    return_info: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """The decode step of a batch of sequences in one call.

    ``q``: ``[S, Hq, Lq, D]`` -> out ``[S, Hq, Lq, Dv]``; row s attends over the cache's sequence
    ``sequences[s]``, whose query i sits at position ``length - Lq + i`` (append the new
    tokens first), with the options of :func:`foveal.decode_attention` (GQA, ``causal`` for
    Lq > 1 drafts, windows, sinks, softcap). Long sequences are split into fixed chunks of keys
    and short ones run side by side, so every thread stays busy; the plan depends only on the
    lengths and page tables, so results are bitwise identical for any thread count. With
    ``share_prefixes`` (default), sequences that share their first pages (forks of one
    prompt) read the shared pages once for the whole group. ``return_lse`` adds lse
    ``[S, Hq, Lq]``; ``return_info`` adds a dict of what the plan did (tasks, chunks,
    shared_groups, shared_tokens).
    """
    function = "batch_decode_attention"
    _check_cache(function, cache)
    out, lse = cache_outputs(q, cache, out, return_lse)
    info = cache._cache.decode(
        q,
        out,
        lse,
        sequences=list(sequences),
        share_prefixes=share_prefixes,
        **attention_options(locals()),
    )
    return _results(out, lse, info, return_lse, return_info)


def batch_prefill_attention(
    q: Any,
    k: Any,
    v: Any,
    cache: PagedKVCache,
    sequences: Sequence[int],
    *,
    counts: Any = None,
    scale: Optional[float] = None,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    share_prefixes: bool = True,
    return_lse: bool = False,
    return_info: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Chunked prefill: appends a chunk of new tokens to each sequence and attends them.

    ``q`` ``[S, Hq, n, D]``, ``k`` ``[S, Hkv, n, D]``, ``v`` ``[S, Hkv, n, Dv]``; ``counts``
    (S ints in [0, n], default all n) says how many of the n tokens sequence s takes. The
    tokens are appended to ``sequences[s]`` (distinct ids), then their queries attend over
    the sequence's cached keys and themselves, causally by default. Rows past counts[s] are 0
    (lse -inf). A call the pool cannot hold raises MemoryError and changes nothing.
    """
    function = "batch_prefill_attention"
    _check_cache(function, cache)
    out, lse = cache_outputs(q, cache, out, return_lse)
    info = cache._cache.prefill(
        q,
        k,
        v,
        out,
        lse,
        sequences=list(sequences),
        counts=counts,
        share_prefixes=share_prefixes,
        **attention_options(locals()),
    )
    return _results(out, lse, info, return_lse, return_info)
