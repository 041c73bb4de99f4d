"""Training-free sparse attention on foveal's engine (docs/sparse_attention.md).

``block_sparse_attention`` is prefill attention in which each block of queries attends only to
the key blocks a cheap pooled estimate ranks highest (plus its local blocks and the sinks), so
its time falls with the budget. ``token_topk_attention`` is its fine-grained sibling: each block
of queries keeps individual keys, gathered by index into the engine's key blocks.
``block_sparse_select`` / ``token_topk_select`` make the selection alone, as a
:class:`BlockSelection` / :class:`TokenSelection` that can be inspected, edited, reused, or built
by hand (a learned or fixed mask) and passed back with ``selection=``.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np

from . import _core
from ._common import attention_options, attention_outputs, new_like, shape, size

__all__ = [
    "BlockSelection",
    "TokenSelection",
    "block_sparse_attention",
    "block_sparse_select",
    "token_topk_attention",
    "token_topk_select",
]


class _Selection:
    """What BlockSelection and TokenSelection share: the CSR of ascending items (key blocks or
    keys) per list ``i = (b * heads_kv + h) * query_blocks + (Q - first_query_block)``, items
    ``[offsets[i], offsets[i + 1])``; ``_extent`` names how many items there are to choose from
    and ``_items`` the array."""

    __slots__ = ("batch", "block_size", "first_query_block", "heads_kv", "offsets", "query_blocks")
    _extent = ""
    _items = ""

    def __init__(
        self,
        *,
        block_size: int,
        batch: int,
        heads_kv: int,
        first_query_block: int,
        query_blocks: int,
        offsets: Any,
        **extent_and_items: Any,
    ) -> None:
        self.block_size = int(block_size)
        self.batch = int(batch)
        self.heads_kv = int(heads_kv)
        self.first_query_block = int(first_query_block)
        self.query_blocks = int(query_blocks)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        expected = {self._extent, self._items}
        if set(extent_and_items) != expected:
            raise TypeError(
                f"{type(self).__name__}: expected the keywords {sorted(expected)} besides the "
                f"block geometry, got {sorted(extent_and_items)}"
            )
        setattr(self, self._extent, int(extent_and_items[self._extent]))
        setattr(
            self, self._items, np.ascontiguousarray(extent_and_items[self._items], dtype=np.int64)
        )

    @property
    def _item_array(self) -> np.ndarray:
        return getattr(self, self._items)

    @classmethod
    def from_mask(cls, mask: Any, *, block_size: int, first_query_block: int = 0):
        """A selection from a boolean mask ``[B, Hkv, query_blocks, extent]`` (True = kept), the
        first query block being ``first_query_block``."""
        mask = np.asarray(mask)
        if mask.ndim != 4 or mask.dtype != np.bool_:
            raise ValueError(
                f"{cls.__name__}.from_mask: mask must be a boolean array [B, Hkv, query_blocks, "
                f"{cls._extent}], got dtype {mask.dtype} with shape {mask.shape}"
            )
        batch, heads_kv, query_blocks, extent = mask.shape
        flat = mask.reshape(batch * heads_kv * query_blocks, extent)
        counts = flat.sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        items = np.nonzero(flat)[1].astype(np.int64)
        return cls(
            block_size=block_size,
            batch=batch,
            heads_kv=heads_kv,
            first_query_block=first_query_block,
            query_blocks=query_blocks,
            offsets=offsets,
            **{cls._extent: extent, cls._items: items},
        )

    def _lists(self, method: str) -> int:
        """The number of lists, once offsets and the items are seen to follow the layout (a
        hand-made or edited selection may not); ValueError naming ``method`` otherwise."""
        lists = self.batch * self.heads_kv * self.query_blocks
        extent = getattr(self, self._extent)
        offsets, items = np.asarray(self.offsets), np.asarray(self._item_array)
        if not (
            min(self.batch, self.heads_kv, self.query_blocks, extent) >= 0
            and offsets.shape == (lists + 1,)
            and items.ndim == 1
            and offsets.dtype.kind in "iu"
            and items.dtype.kind in "iu"
            and offsets[0] == 0
            and offsets[-1] == len(items)
            and (np.diff(offsets) >= 0).all()
            and (len(items) == 0 or (items.min() >= 0 and items.max() < extent))
        ):
            raise ValueError(
                f"{type(self).__name__}.{method}: offsets must be batch * heads_kv * "
                f"query_blocks + 1 non-decreasing integers from 0 to len({self._items}), and "
                f"{self._items} integers in [0, {self._extent}); got {self!r} with offsets of "
                f"shape {offsets.shape}"
            )
        return lists

    def mask(self) -> np.ndarray:
        """The selection as a boolean array ``[B, Hkv, query_blocks, extent]``."""
        lists = self._lists("mask")
        extent = getattr(self, self._extent)
        result = np.zeros((lists, extent), dtype=bool)
        rows = np.repeat(np.arange(lists), np.diff(self.offsets))
        result[rows, self._item_array] = True
        return result.reshape(self.batch, self.heads_kv, self.query_blocks, extent)

    def kept(self, b: int, h: int, query_block: int) -> np.ndarray:
        """What query block ``query_block`` of (b, kv head h) keeps, ascending."""
        b, h, query_block = (operator.index(x) for x in (b, h, query_block))  # TypeError if not
        if not (
            0 <= b < self.batch
            and 0 <= h < self.heads_kv
            and self.first_query_block <= query_block < self.first_query_block + self.query_blocks
        ):
            raise ValueError(
                f"{type(self).__name__}.kept: (b, h, query_block) = ({b}, {h}, {query_block}) is "
                f"outside batch {self.batch}, heads_kv {self.heads_kv}, query blocks "
                f"[{self.first_query_block}, {self.first_query_block + self.query_blocks})"
            )
        self._lists("kept")
        i = (b * self.heads_kv + h) * self.query_blocks + (query_block - self.first_query_block)
        return self._item_array[self.offsets[i] : self.offsets[i + 1]]

    def density(self) -> float:
        """Kept items over all (query block, item) pairs: 1.0 for a dense selection (not
        counting the causal or window bounds the attention applies)."""
        pairs = self.batch * self.heads_kv * self.query_blocks * getattr(self, self._extent)
        return float(len(self._item_array)) / pairs if pairs else 0.0

    def _fields(self) -> dict:
        return {
            "block_size": self.block_size,
            "batch": self.batch,
            "heads_kv": self.heads_kv,
            "first_query_block": self.first_query_block,
            "query_blocks": self.query_blocks,
            self._extent: getattr(self, self._extent),
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value}" for name, value in self._fields().items())
        return f"{type(self).__name__}({fields}, kept={len(self._item_array)})"


class BlockSelection(_Selection):
    """The key blocks each query block keeps, per (batch, kv head).

    Positions are cut into blocks of ``block_size``: query position p is in query block
    ``p // block_size``, key j in key block ``j // block_size``. List
    ``i = (b * heads_kv + h) * query_blocks + (Q - first_query_block)`` holds the ascending
    key blocks ``blocks[offsets[i]:offsets[i + 1]]`` that query block Q of batch entry b and
    kv head h keeps (the query heads of a GQA group share it); ``key_blocks`` is
    ``ceil(Lk / block_size)``. ``offsets`` and ``blocks`` are int64 numpy arrays; a hand-made
    selection must follow the same layout (checked by the call that uses it). ``from_mask`` and
    ``mask`` convert from and to a boolean ``[B, Hkv, query_blocks, key_blocks]`` array.
    """

    __slots__ = ("blocks", "key_blocks")
    _extent = "key_blocks"
    _items = "blocks"


class TokenSelection(_Selection):
    """The keys each query block keeps, per (batch, kv head).

    Query position p is in query block ``p // block_size``. List
    ``i = (b * heads_kv + h) * query_blocks + (Q - first_query_block)`` holds the ascending
    key indices ``keys[offsets[i]:offsets[i + 1]]`` that query block Q of batch entry b and kv
    head h keeps (the query heads of a GQA group share it); ``len_k`` is Lk. ``offsets`` and
    ``keys`` are int64 numpy arrays; a hand-made selection must follow the same layout (checked
    by the call that uses it). ``from_mask`` and ``mask`` convert from and to a boolean
    ``[B, Hkv, query_blocks, Lk]`` array.
    """

    __slots__ = ("keys", "len_k")
    _extent = "len_k"
    _items = "keys"


def block_sparse_select(
    q: Any,
    k: Any,
    *,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    block_size: int = 64,
    local_blocks: int = 1,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> BlockSelection:
    """Selects the key blocks each query block keeps, from pooled queries and keys.

    q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]`` (float32, float64, bfloat16 or float16; Hq a
    multiple of Hkv). A query block's candidates are the key blocks inside the window of one of
    its queries (``causal``, ``window_left``, ``window_right`` as in :func:`foveal.attention`;
    sinks apart, they are always visible). It keeps ``min(C, max(ceil(budget * C), local))`` of
    its C candidates: its ``local_blocks`` local blocks (its own block index and those before it)
    and the others with the largest estimated attention mass, the group mean over query heads
    of ``softmax(scale * mean(q) . mean(k) + ln |block|)``; ties go to the lower block. With
    ``threshold`` > 0 (adaptive) it stops once the kept estimated mass reaches ``threshold``.
    ``block_size`` in [16, 4096]. The same selection for any thread count.
    """
    fields = _core.block_sparse_select(
        q,
        k,
        budget=budget,
        threshold=threshold,
        block_size=block_size,
        local_blocks=local_blocks,
        **attention_options(locals()),
    )
    return BlockSelection(**fields)


def block_sparse_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    selection: Optional[BlockSelection] = None,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    block_size: int = 64,
    local_blocks: int = 1,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Block-sparse attention: query i (position p) sees key j when :func:`foveal.attention`
    with the same options would show it and j is a sink or j's key block is kept by p's query
    block. Without ``selection`` the call selects first (see :func:`block_sparse_select` for
    ``budget``, ``threshold``, ``block_size``, ``local_blocks``); with one it attends over it
    (those four are then unused). Causal by default; causality and windows always bound the
    selection. Shapes, dtypes and returns as :func:`foveal.attention` (no bias): ``out``, or
    ``(out, lse)`` with ``return_lse=True``. Work is proportional to the kept keys; the same
    bits for any thread count.

    The attention mass the selection keeps for each query row is ``exp(lse - lse_dense)`` with
    ``lse_dense`` from :func:`foveal.attention` with the same options.
    """
    sparse = dict(
        budget=budget, threshold=threshold, block_size=block_size, local_blocks=local_blocks
    )
    return _attend(
        _core.block_sparse_attention, BlockSelection, selection, sparse, return_lse, locals()
    )


def token_topk_select(
    q: Any,
    k: Any,
    *,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    block_size: int = 64,
    local_tokens: int = 64,
    outliers: int = 1,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> TokenSelection:
    """Selects the keys each query block keeps, from the block's queries against every key.

    q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]`` (float32, float64, bfloat16 or float16; Hq a
    multiple of Hkv). Query block Q (positions ``[lo, hi]``, ``block_size`` of them) has as
    candidates the C keys inside the window of one of its queries (``causal``, ``window_left``,
    ``window_right`` as in :func:`foveal.attention`; sinks apart, they are always visible). It
    keeps ``min(C, max(ceil(budget * C), local))`` of them: its local keys (the candidates in
    ``[lo - local_tokens, hi]``) and the others with the largest estimated attention mass: per
    query head, the block's ``o = min(outliers, n - 1)`` queries farthest from its mean query
    are scored on their own and the other ``n - o`` by their mean, ``((n - o) / n) *
    softmax(scale * mean . k) + (1 / n) * sum of softmax(scale * outlier . k)`` (softcapped when
    ``softcap`` is set), averaged over the group; ties go to the lower key. A query that asks
    what the rest of its block does not (a retrieval query) keeps its own answer. With
    ``threshold`` > 0 (adaptive) it stops once the kept estimated mass reaches ``threshold``.
    The estimate costs ``(1 + outliers) / block_size`` of the dense q.k products.
    ``block_size`` in [16, 4096], ``outliers`` in [0, block_size). The same selection for any
    thread count.
    """
    fields = _core.token_topk_select(
        q,
        k,
        budget=budget,
        threshold=threshold,
        block_size=block_size,
        local_tokens=local_tokens,
        outliers=outliers,
        **attention_options(locals()),
    )
    return TokenSelection(**fields)


def token_topk_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    selection: Optional[TokenSelection] = None,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    block_size: int = 64,
    local_tokens: int = 64,
    outliers: int = 1,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Token top-k attention: query i (position p) sees key j when :func:`foveal.attention`
    with the same options would show it and j is a sink or is kept by p's query block. Without
    ``selection`` the call selects first (see :func:`token_topk_select` for ``budget``,
    ``threshold``, ``block_size``, ``local_tokens``, ``outliers``); with one it attends over it
    (those five are then unused). Causal by default; causality and windows always bound the
    selection. Shapes, dtypes and returns as :func:`foveal.attention` (no bias): ``out``, or
    ``(out, lse)`` with ``return_lse=True``. The kept keys are gathered by index into the
    engine's key blocks, so the work is proportional to the kept keys however scattered they
    are; the same bits for any thread count.
    """
    sparse = dict(
        budget=budget,
        threshold=threshold,
        block_size=block_size,
        local_tokens=local_tokens,
        outliers=outliers,
    )
    return _attend(
        _core.token_topk_attention, TokenSelection, selection, sparse, return_lse, locals()
    )


def vertical_slash_select(
    q: Any,
    k: Any,
    *,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    block_size: int = 64,
    last_queries: int = 64,
    local_tokens: int = 64,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> TokenSelection:
    """Selects the keys each query block keeps on the vertical-slash pattern (MInference's).

    q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]`` (float32, float64, bfloat16 or float16; Hq a
    multiple of Hkv). The last ``last_queries`` queries (every head of a GQA group) attend over
    their candidate keys (window past the sinks; ``scale``, ``softcap``); their probabilities give
    each column (a key) and each slash (a query-key distance) an estimated mass. The lines are
    ranked by mass per key they cost a query block (a column one key, a slash up to
    ``block_size``: its distance applied to every query of the block). Query block Q (positions
    ``[lo, hi]``) keeps ``min(C, max(ceil(budget * C), local))`` of its C candidates: its local
    keys (``[lo - local_tokens, hi]``), then the keys of the best lines, until full. With
    ``threshold`` > 0 (adaptive) it uses only the fewest best lines whose estimated masses reach
    ``threshold``. Returns a :class:`TokenSelection` (attend with
    :func:`token_topk_attention` or :func:`vertical_slash_attention`). The same selection for
    any thread count.
    """
    fields = _core.vertical_slash_select(
        q,
        k,
        budget=budget,
        threshold=threshold,
        block_size=block_size,
        last_queries=last_queries,
        local_tokens=local_tokens,
        **attention_options(locals()),
    )
    return TokenSelection(**fields)


def vertical_slash_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    selection: Optional[TokenSelection] = None,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    block_size: int = 64,
    last_queries: int = 64,
    local_tokens: int = 64,
    causal: bool = True,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Vertical-slash attention: :func:`vertical_slash_select` (``budget``, ``threshold``,
    ``block_size``, ``last_queries``, ``local_tokens``), then :func:`token_topk_attention` over
    the selection; with ``selection`` it attends over that one. Shapes, dtypes, options and
    returns as :func:`token_topk_attention`.
    """
    sparse = dict(
        budget=budget,
        threshold=threshold,
        block_size=block_size,
        last_queries=last_queries,
        local_tokens=local_tokens,
    )
    return _attend(
        _core.vertical_slash_attention, TokenSelection, selection, sparse, return_lse, locals()
    )


def _attend(core, selection_type, selection, sparse, return_lse, arguments):
    """Runs a sparse prefill binding: with ``selection`` over it, else selecting by ``sparse``;
    ``arguments`` are the public function's locals (q, k, v, out and the attention options)."""
    q, k, v = arguments["q"], arguments["k"], arguments["v"]
    out, lse = attention_outputs(q, v, arguments["out"], return_lse)
    options = attention_options(arguments)
    if selection is None:
        core(q, k, v, out, lse, None, None, **sparse, **options)
    else:
        if not isinstance(selection, selection_type):
            raise TypeError(
                f"{core.__name__}: selection must be a foveal.sparse.{selection_type.__name__}, "
                f"got {type(selection).__name__}"
            )
        core(
            q,
            k,
            v,
            out,
            lse,
            selection.offsets,
            selection._item_array,
            **selection._fields(),
            **options,
        )
    return (out, lse) if return_lse else out


# SnapKV: decode-time KV eviction (docs/sparse_attention.md#snapkv).

__all__ += ["SnapKVSelection", "snapkv_compress", "snapkv_gather", "snapkv_select"]


class SnapKVSelection:
    """The prompt keys SnapKV keeps: ``keys[b, h]`` (int64 ``[B, Hkv, kept]``) are the kept
    key indices of sequence b, kv head h, ascending; every head keeps ``kept`` of the ``len_k``
    prompt keys. Made by :func:`snapkv_select`; may be built or edited by hand within those
    rules (:func:`snapkv_gather` checks them)."""

    __slots__ = ("batch", "heads_kv", "kept", "keys", "len_k")

    def __init__(self, *, batch: int, heads_kv: int, len_k: int, kept: int, keys: Any) -> None:
        self.batch = int(batch)
        self.heads_kv = int(heads_kv)
        self.len_k = int(len_k)
        self.kept = int(kept)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        if keys.size == self.batch * self.heads_kv * self.kept:
            keys = keys.reshape(self.batch, self.heads_kv, self.kept)
        self.keys = keys

    @property
    def density(self) -> float:
        """The share of the prompt's keys kept (1 for an empty prompt)."""
        return self.kept / self.len_k if self.len_k > 0 else 1.0

    def __repr__(self) -> str:
        return (
            f"SnapKVSelection(batch={self.batch}, heads_kv={self.heads_kv}, "
            f"len_k={self.len_k}, kept={self.kept})"
        )


def snapkv_select(
    q: Any,
    k: Any,
    *,
    budget: float = 1.0 / 16,
    threshold: float = 0.0,
    window: int = 64,
    pool: int = 7,
    local_tokens: int = 64,
    causal: bool = True,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> SnapKVSelection:
    """SnapKV's selection (Li et al. 2024): which prompt keys each (sequence, kv head) keeps.

    q ``[B, Hq, Lq, D]`` (the prompt's queries; only the last ``min(window, Lq)`` rows, the
    observation window, are read), k ``[B, Hkv, Lk, D]`` (float32, float64, bfloat16 or
    float16; Hq a multiple of Hkv). Each observation row votes with its causal softmax over the
    keys it sees (``scale``, ``softcap``, ``q_offset`` as in :func:`foveal.attention`); votes are
    summed over the rows, averaged over the query heads of a GQA group and average-pooled along
    the keys with an odd kernel ``pool`` (zero padding). Every head keeps the sinks
    (``sink_tokens``), the newest ``local_tokens`` keys, then the best-voted others (ties to the
    lower key): ``min(Lk, max(ceil(budget * Lk), sinks + locals))`` keys. With ``threshold`` in
    (0, 1] (adaptive) a head needs the fewest keys whose pooled vote reaches ``threshold`` of its
    total; every head keeps the largest count any head of the batch needs (one cache length per
    sequence). ``causal`` must be True. Votes are float64; the same selection for any thread
    count.
    """
    fields = _core.snapkv_select(
        q,
        k,
        budget=budget,
        threshold=threshold,
        window=window,
        pool=pool,
        local_tokens=local_tokens,
        **attention_options(locals()),
    )
    return SnapKVSelection(**fields)


def snapkv_gather(
    selection: SnapKVSelection, k: Any, v: Any, *, out_k: Any = None, out_v: Any = None
) -> tuple[Any, Any]:
    """The kept rows of k ``[B, Hkv, Lk, D]`` and v ``[B, Hkv, Lk, Dv]``:
    ``(k_kept [B, Hkv, kept, D], v_kept [B, Hkv, kept, Dv])`` of k's kind and dtype (or written
    into ``out_k`` / ``out_v``). Append them to a :class:`foveal.KVCache` and decode on: the
    cache's positions are then slots, so a decode window counts kept keys."""
    if not isinstance(selection, SnapKVSelection):
        raise TypeError(
            "snapkv_gather: selection must be a foveal.sparse.SnapKVSelection, "
            f"got {type(selection).__name__}"
        )
    keys = np.asarray(selection.keys)
    if keys.dtype.kind not in "iu":
        raise TypeError(
            f"snapkv_gather: selection.keys must be an integer array, got {keys.dtype.name}"
        )
    k_shape, v_shape = shape(k), shape(v)
    kept = size(selection.kept)
    if out_k is None:
        out_k = new_like(k, (*k_shape[:2], kept, *k_shape[3:4]))
    if out_v is None:
        out_v = new_like(k, (*v_shape[:2], kept, *v_shape[3:4]))
    _core.snapkv_gather(
        k,
        v,
        out_k,
        out_v,
        np.ascontiguousarray(keys, dtype=np.int64).reshape(-1),
        batch=selection.batch,
        heads_kv=selection.heads_kv,
        len_k=selection.len_k,
        kept=selection.kept,
    )
    return out_k, out_v


def snapkv_compress(q: Any, k: Any, v: Any, **options: Any) -> tuple[Any, Any]:
    """:func:`snapkv_select` (``q``, ``k`` and its keyword ``options``) then
    :func:`snapkv_gather`: the compressed prompt ``(k_kept [B, Hkv, kept, D],
    v_kept [B, Hkv, kept, Dv])``, same kind and dtype as k."""
    return snapkv_gather(snapkv_select(q, k, **options), k, v)
