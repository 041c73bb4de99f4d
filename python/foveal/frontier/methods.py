"""The registry of attention methods that foveal.frontier measures.

A method is ``fn(q, k, v, budget, **opts) -> (out, lse)``:

- prefill: q ``[1, Hq, L, D]``, k and v ``[1, Hkv, L, D]`` (Hq a multiple of Hkv), causal;
- decode: q ``[1, Hq, n, D]``, the last n positions (bottom-right aligned), over all L keys;
- ``budget``: the fraction of the keys a query may visit, in (0, 1] (for a method registered
  with ``budget="threshold"``: its own adaptive threshold in (0, 1], recorded as given);
- ``opts``: ``num_threads`` (None: foveal's global setting) and the options given at
  registration; a decode method registered with ``prompt_queries=True`` also gets
  ``prompt_q`` ``[1, Hq, L - n, D]``: the queries of the positions before the decode queries
  (the prompt whose keys it may compress, as SnapKV does after the prefill);
- returns float32 ``out [1, Hq, Lq, Dv]`` and natural-log ``lse [1, Hq, Lq]``, foveal's
  convention (``return_lse=True``).

The recall the tool reports, ``exp(lse - lse_dense)`` per query, is the dense softmax mass on
the keys the method visited, and is exact only for a method that visits a subset of the causal
keys with unchanged logits (docs/frontier.md).

Adding a method is a short adapter: turn the budget into the kernel's parameters, call the kernel
with ``return_lse=True`` and register it for the phases it serves (see ``block_sparse`` and
``quest`` below).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

import foveal

PHASES = ("prefill", "decode")
BUDGET_KINDS = ("fraction", "threshold")


@dataclass(frozen=True)
class Method:
    """A registered method: its name, the phase it serves, the adapter and how it reads the
    budget (``"fraction"`` of keys, or its own ``"threshold"``)."""

    name: str
    phase: str
    fn: Callable
    budget: str = "fraction"
    options: tuple = ()
    prompt_queries: bool = False


_REGISTRY: dict = {}


def register_method(
    name: str,
    phase: str | Sequence[str],
    fn: Callable,
    *,
    budget: str = "fraction",
    prompt_queries: bool = False,
    **options,
) -> None:
    """Registers ``fn(q, k, v, budget, **opts) -> (out, lse)`` as ``name`` for ``phase``
    (``"prefill"``, ``"decode"`` or both as a sequence); ``options`` are passed to every call.
    With ``prompt_queries=True`` a decode call also gets ``prompt_q``, the queries before the
    decode queries. Registering a name again for a phase replaces it."""
    if not isinstance(name, str) or not name or "," in name:
        raise ValueError(
            f"foveal.frontier: register_method: name must be a non-empty string "
            f"without commas, got {name!r}"
        )
    if not callable(fn):
        raise TypeError(
            f"foveal.frontier: register_method: fn must be callable, got {type(fn).__name__}"
        )
    if budget not in BUDGET_KINDS:
        raise ValueError(
            f"foveal.frontier: register_method: budget must be one of "
            f"{', '.join(BUDGET_KINDS)}, got {budget!r}"
        )
    phases = (phase,) if isinstance(phase, str) else tuple(phase)
    for each in phases:
        if each not in PHASES:
            raise ValueError(
                f"foveal.frontier: register_method: phase must be one of "
                f"{', '.join(PHASES)}, got {each!r}"
            )
    for each in phases:
        _REGISTRY[name, each] = Method(
            name, each, fn, budget, tuple(sorted(options.items())), bool(prompt_queries)
        )


def method(name: str, phase: str) -> Method:
    """The method registered as ``name`` for ``phase``; ValueError naming the known ones."""
    if phase not in PHASES:
        raise ValueError(
            f"foveal.frontier: phase must be one of {', '.join(PHASES)}, got {phase!r}"
        )
    found = _REGISTRY.get((name, phase))
    if found is None:
        raise ValueError(
            f"foveal.frontier: method {name!r} is not registered for {phase}; "
            f"registered: {', '.join(method_names(phase))}"
        )
    return found


def method_names(phase: str | None = None) -> list:
    """The registered names (for one phase, or for any), sorted."""
    return sorted({name for name, each in _REGISTRY if phase in (None, each)})


def keys_for(budget: float, length: int) -> int:
    """The number of keys a fraction ``budget`` of ``length`` keys allows (at least 1)."""
    return max(1, min(length, round(budget * length)))


# --------------------------------------------------------------------------------------------
# The methods foveal has today.


def dense(q, k, v, budget, *, num_threads=None):
    """Causal attention over every key: the reference (the budget is ignored)."""
    return foveal.attention(q, k, v, causal=True, return_lse=True, num_threads=num_threads)


def window(q, k, v, budget, *, sink_tokens=4, num_threads=None):
    """StreamingLLM's local + sink baseline on foveal.sliding_window_attention: the budget's
    keys are ``sinks`` first keys (at most ``sink_tokens``, at most half the budget) and a
    causal window of the rest, ending at the query."""
    keys = keys_for(budget, k.shape[2])
    sinks = min(sink_tokens, keys // 2)
    return foveal.sliding_window_attention(
        q,
        k,
        v,
        window_left=keys - sinks - 1,
        causal=True,
        sink_tokens=sinks,
        return_lse=True,
        num_threads=num_threads,
    )


def block_sparse(q, k, v, budget, *, block_size=64, num_threads=None):
    """foveal.block_sparse_attention: each query block keeps ``budget`` of its candidate key
    blocks (its local block first, then the best by the pooled estimate); selection included."""
    return foveal.block_sparse_attention(
        q, k, v, budget=budget, block_size=block_size, return_lse=True, num_threads=num_threads
    )


def block_sparse_adaptive(q, k, v, threshold, *, block_size=64, num_threads=None):
    """foveal.block_sparse_attention with an adaptive budget: the fewest blocks whose estimated
    attention mass reaches ``threshold`` (top-p over the pooled estimate)."""
    return foveal.block_sparse_attention(
        q,
        k,
        v,
        budget=1.0,
        threshold=threshold,
        block_size=block_size,
        return_lse=True,
        num_threads=num_threads,
    )


def token_topk(q, k, v, budget, *, block_size=64, num_threads=None):
    """foveal.token_topk_attention: each query block keeps ``budget`` of its candidate keys (its
    local keys first, then the best by its estimate: its mean query and its farthest query);
    selection included."""
    return foveal.token_topk_attention(
        q, k, v, budget=budget, block_size=block_size, return_lse=True, num_threads=num_threads
    )


def token_topk_adaptive(q, k, v, threshold, *, block_size=64, num_threads=None):
    """foveal.token_topk_attention with an adaptive budget: the fewest keys whose estimated
    attention mass reaches ``threshold`` (top-p over the same estimate)."""
    return foveal.token_topk_attention(
        q,
        k,
        v,
        budget=1.0,
        threshold=threshold,
        block_size=block_size,
        return_lse=True,
        num_threads=num_threads,
    )


# Quest reads page bounds that a KVCache keeps as tokens are appended; a server pays for them
# once per token, not per call. The adapter builds one cache per captured (k, v) and reuses it,
# so the timed calls measure the decode step alone (bench/sparse_cases.py times the upkeep).
_QUEST_CACHES: dict = {}


def vertical_slash(q, k, v, budget, *, block_size=64, last_queries=64, num_threads=None):
    """foveal.vertical_slash_attention: the last ``last_queries`` queries estimate the mass of
    every column (key) and slash (query-key distance); each query block keeps ``budget`` of its
    candidate keys, its local keys first, then the best lines' keys; selection included."""
    return foveal.vertical_slash_attention(
        q,
        k,
        v,
        budget=budget,
        block_size=block_size,
        last_queries=last_queries,
        return_lse=True,
        num_threads=num_threads,
    )


def vertical_slash_adaptive(
    q, k, v, threshold, *, block_size=64, last_queries=64, num_threads=None
):
    """foveal.vertical_slash_attention with an adaptive budget: the fewest best lines whose
    estimated masses reach ``threshold``."""
    return foveal.vertical_slash_attention(
        q,
        k,
        v,
        budget=1.0,
        threshold=threshold,
        block_size=block_size,
        last_queries=last_queries,
        return_lse=True,
        num_threads=num_threads,
    )


def _quest_cache(k, v, page_size):
    key = (id(k), id(v), page_size)
    found = _QUEST_CACHES.get(key)
    if found is not None and found[0] is k and found[1] is v:
        return found[2]
    batch, heads_kv, length, dim = k.shape
    cache = foveal.KVCache(batch, heads_kv, length, dim, v.shape[3], page_bounds=page_size)
    cache.append(k, v)
    _QUEST_CACHES.clear()  # one captured layer at a time
    _QUEST_CACHES[key] = (k, v, cache)
    return cache


def quest(q, k, v, budget, *, page_size=16, num_threads=None):
    """foveal.quest_decode_attention: per (sequence, kv head), the pages with the largest
    bound of q.k (from the cache's per-page key min / max) plus the newest page."""
    cache = _quest_cache(k, v, page_size)
    return foveal.quest_decode_attention(
        q, cache, budget=budget, causal=True, return_lse=True, num_threads=num_threads
    )


# SnapKV compresses the prompt once, after the prefill, and every decode step then reads the
# compressed cache. The adapter keeps the compressed cache of the captured layer (per budget
# and options), so the timed calls measure the decode step alone, as for Quest.
_SNAPKV_PROMPTS: dict = {}


def _snapkv_cache(prompt_q, k, v, decode_queries, settings):
    """The KVCache a decode step reads after SnapKV: the kept prompt keys, then the decode
    positions' own keys."""
    key = (id(prompt_q), id(k), id(v), decode_queries, settings)
    found = _SNAPKV_PROMPTS.get(key)
    if found is not None and found[0] is prompt_q and found[1] is k and found[2] is v:
        return found[3]
    prompt = k.shape[2] - decode_queries
    k_kept, v_kept = foveal.snapkv_compress(
        prompt_q, k[:, :, :prompt], v[:, :, :prompt], **dict(settings)
    )
    batch, heads_kv, kept, dim = k_kept.shape
    cache = foveal.KVCache(batch, heads_kv, kept + decode_queries, dim, v.shape[3])
    cache.append(k_kept, v_kept)
    cache.append(np.ascontiguousarray(k[:, :, prompt:]), np.ascontiguousarray(v[:, :, prompt:]))
    if len(_SNAPKV_PROMPTS) > 64:  # one captured layer's budgets at a time
        _SNAPKV_PROMPTS.clear()
    _SNAPKV_PROMPTS[key] = (prompt_q, k, v, cache)
    return cache


def snapkv(
    q,
    k,
    v,
    budget,
    *,
    prompt_q,
    threshold=0.0,
    window=64,
    pool=7,
    local_tokens=64,
    sink_tokens=4,
    num_threads=None,
):
    """foveal.snapkv_compress, then decode: the last ``window`` prompt queries (``prompt_q``,
    the positions before the decode queries) vote for the prompt's keys; each kv head keeps
    ``budget`` of them (sinks, the newest ``local_tokens``, then the best pooled votes), and the
    decode queries attend causally over the kept prompt keys followed by their own keys. Sinks
    and locals take at most a quarter and a half of the budget's keys, so that the votes always
    choose some (at small budgets the locals alone would fill it). The compressed cache is made
    once per layer and budget (a KVCache), so the time is a decode step's."""
    decode_queries = q.shape[2]
    keys = keys_for(budget, max(1, k.shape[2] - decode_queries))
    sink_tokens = min(sink_tokens, keys // 4)
    local_tokens = min(local_tokens, keys // 2)
    settings = tuple(
        sorted(
            dict(
                budget=budget,
                threshold=threshold,
                window=window,
                pool=pool,
                local_tokens=local_tokens,
                sink_tokens=sink_tokens,
                num_threads=num_threads,
            ).items()
        )
    )
    cache = _snapkv_cache(prompt_q, k, v, decode_queries, settings)
    return foveal.decode_attention(q, cache, causal=True, return_lse=True, num_threads=num_threads)


def snapkv_adaptive(q, k, v, threshold, *, prompt_q, num_threads=None, **options):
    """SnapKV with an adaptive budget: every kv head keeps the fewest prompt keys whose pooled
    vote reaches ``threshold`` of its total, the largest count any head needs (one cache length
    per sequence)."""
    return snapkv(
        q, k, v, 1.0, prompt_q=prompt_q, threshold=threshold, num_threads=num_threads, **options
    )


register_method("dense", PHASES, dense)
register_method("window", PHASES, window)
register_method("block_sparse", "prefill", block_sparse)
register_method("block_sparse_adaptive", "prefill", block_sparse_adaptive, budget="threshold")
register_method("token_topk", "prefill", token_topk)
register_method("token_topk_adaptive", "prefill", token_topk_adaptive, budget="threshold")
register_method("vertical_slash", "prefill", vertical_slash)
register_method("vertical_slash_adaptive", "prefill", vertical_slash_adaptive, budget="threshold")
register_method("quest", "decode", quest)
register_method("snapkv", "decode", snapkv, prompt_queries=True)
register_method(
    "snapkv_adaptive", "decode", snapkv_adaptive, budget="threshold", prompt_queries=True
)


def as_array(value, name: str) -> np.ndarray:
    """A method's output as a numpy array (torch tensors are converted)."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(
            f"foveal.frontier: a method's {name} must be an array, got {type(value).__name__}"
        )
    return value
