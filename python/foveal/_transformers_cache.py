"""FovealCache: a transformers ``Cache`` whose layers keep keys and values in foveal KVCaches.

Imported by ``foveal.transformers`` on first use of ``FovealCache`` (this module needs
transformers; ``import foveal.transformers`` does not).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, get_layer_types_and_kwargs

from . import KVCache, decode_attention
from .transformers import LAYER_KEY

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _error(what: str) -> ValueError:
    return ValueError(f"foveal: FovealCache: {what}")


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(f"foveal: FovealCache: {what} is not supported")


class FovealCacheLayer(CacheLayerMixin):
    """One decoder layer's keys and values: storage ``[max_batch_size, Hkv, capacity, D]``
    allocated once, appended in place through a foveal ``KVCache`` (a ring buffer of
    ``window`` rows for a sliding-window layer).

    ``update`` returns what the layer's attention sees, in the sizes ``get_mask_sizes``
    announced: for a full layer, views of the storage (every token so far, in order); for a
    window layer, the incoming tokens on the first call, the ring's rows (every one of them
    inside the window of the single new query, in ring order) for one new token, and the
    retained window followed by the new tokens otherwise (a copy)."""

    is_compileable = False
    is_croppable = False

    def __init__(
        self,
        max_batch_size: int,
        heads_kv: int,
        max_cache_len: int,
        dim: int,
        dtype: torch.dtype,
        window: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.max_cache_len = max_cache_len
        self.window = window
        self.is_sliding = window is not None
        capacity = max_cache_len if window is None else min(window, max_cache_len)
        shape = (max_batch_size, heads_kv, capacity, dim)
        self.storage = (torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
        self.dtype = dtype
        self.cache: Optional[KVCache] = None  # wraps storage[:batch] from the first update on
        self.length = 0  # tokens appended to every sequence
        self.in_ring_order = False  # update returned the ring's rows, not position order
        self.attended = False  # foveal's attention function saw the last update

    @property
    def capacity(self) -> int:
        return self.storage[0].shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch = key_states.shape[0]
        keys, values = self.storage
        if batch > keys.shape[0]:
            raise _error(
                f"batch of {batch} sequences, the cache holds max_batch_size={keys.shape[0]} "
                "(num_beams and num_return_sequences multiply generate's batch)"
            )
        for name, states, store in (("key", key_states, keys), ("value", value_states, values)):
            if states.dtype != self.dtype:
                raise TypeError(
                    f"foveal: FovealCache: {name} states are {states.dtype}, the cache holds "
                    f"{self.dtype} (make the cache with the model's dtype)"
                )
            if tuple(states.shape[1:2]) + tuple(states.shape[3:]) != (
                store.shape[1],
                store.shape[3],
            ):
                raise _error(
                    f"{name} states {tuple(states.shape)} do not match the cache's "
                    f"[B, {store.shape[1]}, L, {store.shape[3]}] (the config's kv heads, head_dim)"
                )
        self.batch_size = batch
        self.cache = KVCache.wrap(keys[:batch], values[:batch], ring=self.is_sliding)
        self.is_initialized = True

    def _position_rows(self, first: int, count: int) -> torch.Tensor:
        """The storage rows of positions first .. first + count - 1."""
        return torch.arange(first, first + count) % self.capacity

    def _stored(self, first: int, count: int) -> tuple:
        """Keys and values of positions first .. first + count - 1, in position order."""
        batch = self.batch_size
        if not self.is_sliding or first + count <= self.capacity:
            return tuple(t[:batch, :, first : first + count] for t in self.storage)
        rows = self._position_rows(first, count)
        return tuple(t[:batch].index_select(2, rows) for t in self.storage)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Appends ``[B, Hkv, L, D]`` keys and values; returns the keys and values the layer's
        attention sees (see the class). Leaves the layer in the attention kwargs, where
        foveal's attention function finds it."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif key_states.shape[0] != self.batch_size:
            raise _error(
                f"batch of {key_states.shape[0]} sequences, the cache holds {self.batch_size} "
                "(call reset() before a new batch)"
            )
        before, new = self.length, key_states.shape[2]
        if before + new > self.max_cache_len:
            raise _error(
                f"{before} cached tokens + {new} new exceed max_cache_len={self.max_cache_len} "
                "(make the cache with a larger max_cache_len)"
            )
        if before > 0 and not self.attended:
            raise _error(
                "the previous step's attention was not foveal's: FovealCache needs "
                "attn_implementation='foveal' (foveal.transformers.register(), then "
                "model.set_attn_implementation('foveal'))"
            )
        attention_kwargs = kwargs.get("kwargs")
        if not isinstance(attention_kwargs, dict):
            raise _unsupported(
                "a model whose attention layers do not hand their kwargs to Cache.update "
                "(update(..., kwargs=kwargs), as transformers' Llama does)"
            )
        attention_kwargs[LAYER_KEY] = self
        self.attended = False
        kept = None
        if self.is_sliding and before > 0 and new > 1:
            kept = self._stored(before - min(before, self.window - 1), min(before, self.window - 1))
        self.cache.append(key_states, value_states)
        self.length = before + new
        self.in_ring_order = False
        if not self.is_sliding:
            return self._stored(0, self.length)
        if before == 0:
            return key_states, value_states
        if kept is not None:
            return tuple(torch.cat(pair, dim=2) for pair in zip(kept, (key_states, value_states)))
        rows = min(self.length, self.capacity)
        self.in_ring_order = self.length > self.capacity
        return tuple(t[: self.batch_size, :, :rows] for t in self.storage)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(kv_length, kv_offset) of what update will return for query_length new tokens."""
        before = self.length
        if not self.is_sliding or before == 0:
            return before + query_length, 0
        if query_length == 1:
            rows = min(before + 1, self.capacity)
            return rows, before + 1 - rows
        kept = min(before, self.window - 1)
        return kept + query_length, before - kept

    def keys_in_position_order(self, kv_length: int) -> tuple:
        """After an update that returned the ring's rows: the same keys and values in position
        order (for a mask that depends on where each key sits, e.g. padding)."""
        return self._stored(self.length - kv_length, kv_length)

    def decode(self, query: torch.Tensor, options: dict) -> torch.Tensor:
        """foveal.decode_attention of query ``[B, Hq, Lq, D]`` (the newest Lq tokens) over the
        cache, with band options (window_left, causal, scale, softcap, key_start)."""
        return decode_attention(query.contiguous(), self.cache, **options)

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        """Empties the layer (the storage stays; the next update may bring a new batch size)."""
        self.cache = None
        self.length = 0
        self.in_ring_order = False
        self.attended = False
        self.is_initialized = False

    def offload(self):
        raise _unsupported("offloading")

    def prefetch(self):
        raise _unsupported("offloading")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise _unsupported("beam search (reorder_cache)")

    def crop(self, tokens_to_remove: int) -> None:
        raise _unsupported("crop (assisted or speculative generation)")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise _unsupported("batch_repeat_interleave (num_return_sequences > 1 or beam search)")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise _unsupported("batch_select_indices (contrastive search)")


class FovealCache(Cache):
    """A transformers ``Cache`` over preallocated foveal KVCaches, one ``FovealCacheLayer`` per
    decoder layer: ``max_cache_len`` tokens per sequence (a sliding-window layer keeps a ring
    of ``min(window, max_cache_len)`` rows), ``max_batch_size`` sequences, in ``dtype``
    (default: the config's dtype, else float32; float32, bfloat16 or float16).

    For ``attn_implementation="foveal"`` (after ``foveal.transformers.register()``): its
    attention function finds the layer in the attention kwargs and runs decode steps as
    ``foveal.decode_attention`` over the layer's cache, with no copy of the keys."""

    def __init__(
        self,
        config: Any,
        max_batch_size: int,
        max_cache_len: int,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        config = config.get_text_config(decoder=True)
        if max_batch_size < 1 or max_cache_len < 1:
            raise _error(
                f"max_batch_size and max_cache_len must be >= 1, got {max_batch_size} and "
                f"{max_cache_len}"
            )
        if dtype is None:
            dtype = getattr(config, "dtype", None)
            dtype = dtype if isinstance(dtype, torch.dtype) else torch.float32
        if dtype not in _DTYPES:
            raise _error(f"dtype must be float32, bfloat16 or float16, got {dtype}")
        heads_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
        layers = []
        for layer_type, extra in zip(layer_types, layer_kwargs):
            if layer_type not in ("full_attention", "sliding_attention"):
                raise _unsupported(f"layer type {layer_type!r}")
            window = extra.get("sliding_window") if layer_type == "sliding_attention" else None
            layers.append(
                FovealCacheLayer(max_batch_size, heads_kv, max_cache_len, dim, dtype, window)
            )
        super().__init__(layers=layers)
        self.max_batch_size = max_batch_size
        self.max_cache_len = max_cache_len
