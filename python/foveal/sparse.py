"""Training-free sparse attention on foveal's engine (docs/sparse_attention.md).

``block_sparse_attention`` is prefill attention in which each block of queries attends only to
the key blocks a cheap pooled estimate ranks highest (plus its local blocks and the sinks), so
its time falls with the budget. ``block_sparse_select`` makes the selection alone, as a
:class:`BlockSelection` that can be inspected, edited, reused, or built by hand (a learned or
fixed block mask) and passed back with ``selection=``.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np

from . import _core
from ._common import attention_options, attention_outputs

__all__ = ["BlockSelection", "block_sparse_attention", "block_sparse_select"]


class BlockSelection:
    """The key blocks each query block keeps, per (batch, kv head).

    Positions are cut into blocks of ``block_size``: query position p is in query block
    ``p // block_size``, key j in key block ``j // block_size``. List
    ``i = (b * heads_kv + h) * query_blocks + (Q - first_query_block)`` holds the ascending
    key blocks ``blocks[offsets[i]:offsets[i + 1]]`` that query block Q of batch entry b and
    kv head h keeps (the query heads of a GQA group share it). ``offsets`` and ``blocks`` are
    int64 numpy arrays; a hand-made selection must follow the same layout (checked by the call
    that uses it).
    """

    __slots__ = (
        "batch",
        "block_size",
        "blocks",
        "first_query_block",
        "heads_kv",
        "key_blocks",
        "offsets",
        "query_blocks",
    )

    def __init__(
        self,
        *,
        block_size: int,
        batch: int,
        heads_kv: int,
        first_query_block: int,
        query_blocks: int,
        key_blocks: int,
        offsets: Any,
        blocks: Any,
    ) -> None:
        self.block_size = int(block_size)
        self.batch = int(batch)
        self.heads_kv = int(heads_kv)
        self.first_query_block = int(first_query_block)
        self.query_blocks = int(query_blocks)
        self.key_blocks = int(key_blocks)
        self.offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        self.blocks = np.ascontiguousarray(blocks, dtype=np.int64)

    @classmethod
    def from_mask(
        cls, mask: Any, *, block_size: int, first_query_block: int = 0
    ) -> "BlockSelection":
        """A selection from a boolean block mask ``[B, Hkv, query_blocks, key_blocks]`` (True =
        kept), the first query block being ``first_query_block``."""
        mask = np.asarray(mask)
        if mask.ndim != 4 or mask.dtype != np.bool_:
            raise ValueError(
                "BlockSelection.from_mask: mask must be a boolean array [B, Hkv, query_blocks, "
                f"key_blocks], got dtype {mask.dtype} with shape {mask.shape}"
            )
        batch, heads_kv, query_blocks, key_blocks = mask.shape
        flat = mask.reshape(batch * heads_kv * query_blocks, key_blocks)
        counts = flat.sum(axis=1)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        blocks = np.nonzero(flat)[1].astype(np.int64)
        return cls(
            block_size=block_size,
            batch=batch,
            heads_kv=heads_kv,
            first_query_block=first_query_block,
            query_blocks=query_blocks,
            key_blocks=key_blocks,
            offsets=offsets,
            blocks=blocks,
        )

    def _lists(self, method: str) -> int:
        """The number of lists, once offsets and blocks are seen to follow the layout (a
        hand-made or edited selection may not); ValueError naming ``method`` otherwise."""
        lists = self.batch * self.heads_kv * self.query_blocks
        offsets, blocks = np.asarray(self.offsets), np.asarray(self.blocks)
        if not (
            min(self.batch, self.heads_kv, self.query_blocks, self.key_blocks) >= 0
            and offsets.shape == (lists + 1,)
            and blocks.ndim == 1
            and offsets.dtype.kind in "iu"
            and blocks.dtype.kind in "iu"
            and offsets[0] == 0
            and offsets[-1] == len(blocks)
            and (np.diff(offsets) >= 0).all()
            and (len(blocks) == 0 or (blocks.min() >= 0 and blocks.max() < self.key_blocks))
        ):
            raise ValueError(
                f"BlockSelection.{method}: offsets must be batch * heads_kv * query_blocks + 1 "
                "non-decreasing integers from 0 to len(blocks), and blocks integers in "
                f"[0, key_blocks); got {self!r} with offsets of shape {offsets.shape}"
            )
        return lists

    def mask(self) -> np.ndarray:
        """The selection as a boolean array ``[B, Hkv, query_blocks, key_blocks]``."""
        lists = self._lists("mask")
        result = np.zeros((lists, self.key_blocks), dtype=bool)
        rows = np.repeat(np.arange(lists), np.diff(self.offsets))
        result[rows, self.blocks] = True
        return result.reshape(self.batch, self.heads_kv, self.query_blocks, self.key_blocks)

    def kept(self, b: int, h: int, query_block: int) -> np.ndarray:
        """The key blocks query block ``query_block`` of (b, kv head h) keeps, ascending."""
        b, h, query_block = (operator.index(x) for x in (b, h, query_block))  # TypeError if not
        if not (
            0 <= b < self.batch
            and 0 <= h < self.heads_kv
            and self.first_query_block <= query_block < self.first_query_block + self.query_blocks
        ):
            raise ValueError(
                f"BlockSelection.kept: (b, h, query_block) = ({b}, {h}, {query_block}) is outside "
                f"batch {self.batch}, heads_kv {self.heads_kv}, query blocks "
                f"[{self.first_query_block}, {self.first_query_block + self.query_blocks})"
            )
        self._lists("kept")
        i = (b * self.heads_kv + h) * self.query_blocks + (query_block - self.first_query_block)
        return self.blocks[self.offsets[i] : self.offsets[i + 1]]

    def density(self) -> float:
        """Kept key blocks over all (query block, key block) pairs: 1.0 for a dense selection
        (not counting the causal or window bounds the attention applies)."""
        pairs = self.batch * self.heads_kv * self.query_blocks * self.key_blocks
        return float(len(self.blocks)) / pairs if pairs else 0.0

    def _fields(self) -> dict:
        return {
            "block_size": self.block_size,
            "batch": self.batch,
            "heads_kv": self.heads_kv,
            "first_query_block": self.first_query_block,
            "query_blocks": self.query_blocks,
            "key_blocks": self.key_blocks,
        }

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={value}" for name, value in self._fields().items())
        return f"BlockSelection({fields}, kept={len(self.blocks)})"


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
    out, lse = attention_outputs(q, v, out, return_lse)
    options = attention_options(locals())
    if selection is None:
        _core.block_sparse_attention(
            q,
            k,
            v,
            out,
            lse,
            None,
            None,
            budget=budget,
            threshold=threshold,
            block_size=block_size,
            local_blocks=local_blocks,
            **options,
        )
    else:
        if not isinstance(selection, BlockSelection):
            raise TypeError(
                "block_sparse_attention: selection must be a foveal.sparse.BlockSelection, got "
                f"{type(selection).__name__}"
            )
        _core.block_sparse_attention(
            q, k, v, out, lse, selection.offsets, selection.blocks, **selection._fields(), **options
        )
    return (out, lse) if return_lse else out
