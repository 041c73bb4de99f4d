"""The measurement: methods x budgets x phases over layers of captured or planted Q/K/V.

Per (layer, head, method, budget, phase) a row with the relative L2 error of the method's
output against dense attention, the recall (the dense softmax mass it keeps, from the two
log-sum-exps, docs/frontier.md) and the time of the call (best of several, over all heads of
the layer; dense is timed in the same run).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Optional, Sequence

import numpy as np

from . import methods as registry

SCHEMA = "foveal.frontier/1"
ROW_FIELDS = (
    "layer",
    "length",
    "head",
    "kind",
    "phase",
    "method",
    "budget",
    "error",
    "recall",
    "recall_min",
    "found",
    "time_s",
    "dense_time_s",
)


@dataclass
class Layer:
    """One attention layer's inputs: q ``[1, Hq, L, D]``, k and v ``[1, Hkv, L, D]`` float32
    (Hq a multiple of Hkv); ``kinds``: a label per query head (the planted kind, or None);
    ``pairs``: for planted data, per query head the ``[R, 2]`` (query position, planted key)
    pairs of its retrieval component (empty for other heads), which the sweep's ``found`` counts
    (see :func:`found_fraction`)."""

    name: str
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kinds: list = field(default_factory=list)
    pairs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        check_layer(self)
        if not self.kinds:
            self.kinds = [None] * self.q.shape[1]
        if self.pairs:
            check_pairs(self)

    @property
    def length(self) -> int:
        return self.k.shape[2]


def check_pairs(layer: Layer) -> None:
    """ValueError naming the layer when ``pairs`` is not one ``[R, 2]`` integer array of
    (query position, key) in [0, L) per query head."""
    where = f"foveal.frontier: layer {layer.name!r}"
    heads, length = layer.q.shape[1], layer.length
    if len(layer.pairs) != heads:
        raise ValueError(
            f"{where}: pairs must have one entry per query head ({heads}), got {len(layer.pairs)}"
        )
    for head, pairs in enumerate(layer.pairs):
        pairs = np.asarray(pairs)
        if pairs.size == 0:
            continue
        if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.dtype.kind not in "iu":
            raise ValueError(
                f"{where}: pairs[{head}] must be an [R, 2] integer array, got "
                f"{pairs.dtype} {list(pairs.shape)}"
            )
        if pairs.min() < 0 or pairs.max() >= length:
            raise ValueError(f"{where}: pairs[{head}] must hold positions in [0, {length})")


def check_layer(layer: Layer) -> None:
    """TypeError / ValueError naming the argument when q, k, v are not float32 [1, H, L, D]
    arrays with matching sizes."""
    where = f"foveal.frontier: layer {layer.name!r}"
    for name in ("q", "k", "v"):
        array = getattr(layer, name)
        if not isinstance(array, np.ndarray):
            raise TypeError(f"{where}: {name} must be a numpy array, got {type(array).__name__}")
        if array.dtype != np.float32:
            raise TypeError(f"{where}: {name} must be float32, got {array.dtype}")
        if array.ndim != 4 or array.shape[0] != 1:
            raise ValueError(f"{where}: {name} must be [1, H, L, D], got {list(array.shape)}")
    q, k, v = layer.q, layer.k, layer.v
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"{where}: v must be [1, Hkv, L, Dv] with k's [1, Hkv, L] = "
            f"{list(k.shape[:3])}, got {list(v.shape)}"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"{where}: q's head dim must equal k's ({k.shape[3]}), got {q.shape[3]}")
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"{where}: q must have as many positions as k ({k.shape[2]}), got {q.shape[2]}"
        )
    if q.shape[1] % k.shape[1]:
        raise ValueError(
            f"{where}: q's heads must be a multiple of k's ({k.shape[1]}), got {q.shape[1]}"
        )
    if layer.kinds and len(layer.kinds) != q.shape[1]:
        raise ValueError(
            f"{where}: kinds must have one entry per query head ({q.shape[1]}), "
            f"got {len(layer.kinds)}"
        )


def parse_budget(value) -> float:
    """``"1/64"``, ``"0.05"`` or a number -> a float in (0, 1]; ValueError otherwise."""
    try:
        budget = float(Fraction(value)) if isinstance(value, str) else float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        raise ValueError(
            f"foveal.frontier: budget must be a number or a fraction such as 1/64, got {value!r}"
        ) from None
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"foveal.frontier: budget must be in (0, 1], got {value!r}")
    return budget


# Timing: at least ``repeats`` calls, and more (up to MAX_CALLS) until ``min_seconds`` have
# passed, so that a sub-millisecond decode call is not timed on a single unlucky wake-up.
MAX_CALLS = 200


def _timed(fn, repeats: int, min_seconds: float) -> tuple:
    """(the first call's result, the best time of the calls in seconds)."""
    best = float("inf")
    result = None
    calls, spent = 0, 0.0
    while calls < repeats or (spent < min_seconds and calls < MAX_CALLS):
        start = time.perf_counter()
        outcome = fn()
        elapsed = time.perf_counter() - start
        best, spent, calls = min(best, elapsed), spent + elapsed, calls + 1
        result = outcome if result is None else result
    return result, best


def _call(spec: registry.Method, q, k, v, budget: float, num_threads, prompt_q=None) -> tuple:
    extra = {"prompt_q": prompt_q} if spec.prompt_queries and spec.phase == "decode" else {}
    out, lse = spec.fn(q, k, v, budget, num_threads=num_threads, **dict(spec.options), **extra)
    out, lse = registry.as_array(out, "out"), registry.as_array(lse, "lse")
    expected = ((*q.shape[:3], v.shape[3]), q.shape[:3])
    if out.shape != expected[0] or lse.shape != expected[1]:
        raise ValueError(
            f"foveal.frontier: method {spec.name!r} returned out "
            f"{list(out.shape)} and lse {list(lse.shape)}, expected "
            f"{list(expected[0])} and {list(expected[1])}"
        )
    return out, lse


def head_metrics(out, lse, dense_out, dense_lse) -> tuple:
    """Per head: (relative L2 error of out against dense_out over the head's [Lq, Dv],
    mean recall over its queries, smallest recall), all ``[H]`` float64, computed in float64
    one head at a time (no float64 copy of a whole layer).

    recall_i = exp(lse_i - dense_lse_i): the dense softmax mass on the keys the method visited
    (exact for a subset of dense's keys with the same logits), clipped to 1 against float32
    rounding of a row that kept every key."""
    heads = out.shape[1]
    error = np.empty(heads)
    for head in range(heads):
        reference = dense_out[0, head].astype(np.float64)
        difference = out[0, head].astype(np.float64) - reference
        norm = max(float(np.sqrt((reference**2).sum())), np.finfo(float).tiny)
        error[head] = np.sqrt((difference**2).sum()) / norm
    recall = np.exp(lse[0].astype(np.float64) - dense_lse[0].astype(np.float64))
    recall = np.minimum(recall, 1.0)
    return error, recall.mean(axis=1), recall.min(axis=1)


def _probe(layer: Layer, first_row: int) -> tuple:
    """The values that reveal which planted keys a method visits: v ``[1, H, L, R]`` with
    v[h, key_r, r] = 1 for each retrieval pair r of head h whose query is a row of the phase
    (position >= first_row), and per head its pairs as (row of the phase, key); None without
    such pairs or when Hq != Hkv (a GQA group shares its values)."""
    heads = layer.q.shape[1]
    if not layer.pairs or layer.k.shape[1] != heads:
        return None
    pairs = [
        [(int(query) - first_row, int(key)) for query, key in np.asarray(layer.pairs[h]).tolist()]
        for h in range(heads)
    ]
    pairs = [[(row, key) for row, key in head if row >= 0] for head in pairs]
    width = max((len(head) for head in pairs), default=0)
    if width == 0:
        return None
    values = np.zeros((1, heads, layer.length, width), dtype=np.float32)
    for h, head in enumerate(pairs):
        for r, (_, key) in enumerate(head):
            values[0, h, key, r] = 1.0
    return values, pairs


def found_fraction(out: np.ndarray, pairs: list) -> np.ndarray:
    """Per head, the fraction of its planted pairs whose query gave its planted key a positive
    weight (visited it), from a method's output over :func:`_probe`'s values; NaN for a head
    without pairs."""
    found = np.full(len(pairs), np.nan)
    for h, head in enumerate(pairs):
        if head:
            found[h] = np.mean([out[0, h, row, r] > 0 for r, (row, _) in enumerate(head)])
    return found


def sweep(
    layers: Sequence[Layer],
    methods: Sequence[str] = ("dense", "window"),
    budgets: Sequence = ("1/64", "1/32", "1/16", "1/8", "1/4"),
    phases: Sequence[str] = registry.PHASES,
    *,
    decode_queries: int = 1,
    repeats: int = 3,
    min_seconds: float = 0.2,
    num_threads: Optional[int] = None,
) -> list:
    """The result rows (dicts with ROW_FIELDS) of every method at every budget in every phase
    over every layer. Dense attention, the reference, is always measured (once, budget 1).
    Each time is the best of at least ``repeats`` calls, more while their total stays under
    ``min_seconds`` (at most 200)."""
    layers = list(layers)
    if not layers:
        raise ValueError("foveal.frontier: sweep: layers must hold at least one layer, got none")
    for layer in layers:
        if not isinstance(layer, Layer):
            raise TypeError(
                f"foveal.frontier: sweep: layers must be frontier.Layer objects, "
                f"got {type(layer).__name__}"
            )
    budgets = sorted({parse_budget(budget) for budget in budgets})
    if not budgets:
        raise ValueError("foveal.frontier: sweep: budgets must hold at least one budget")
    _check_count("decode_queries", decode_queries)
    _check_count("repeats", repeats)
    if (
        isinstance(min_seconds, bool)
        or not isinstance(min_seconds, (int, float))
        or not (min_seconds >= 0)
    ):
        raise ValueError(
            f"foveal.frontier: sweep: min_seconds must be a number >= 0, got {min_seconds!r}"
        )
    timing = (repeats, float(min_seconds))
    # Every name and phase is checked before anything runs: a method runs in the phases it is
    # registered for (block_sparse: prefill; quest: decode) and must serve at least one of them.
    for name in methods:
        if not any(name in registry.method_names(phase) for phase in phases):
            registry.method(name, phases[0])  # the error naming the registered methods
    plan = [
        (
            phase,
            [
                registry.method(name, phase)
                for name in methods
                if name != "dense" and name in registry.method_names(phase)
            ],
        )
        for phase in phases
    ]
    rows = []
    for layer in layers:
        for phase, specs in plan:
            rows.extend(_measure(layer, phase, specs, budgets, decode_queries, timing, num_threads))
    return rows


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"foveal.frontier: sweep: {name} must be an int >= 1, got {value!r}")


def _measure(layer, phase, specs, budgets, decode_queries, timing, num_threads) -> list:
    if phase == "decode" and decode_queries > layer.length:
        raise ValueError(
            f"foveal.frontier: sweep: decode_queries must be <= the length of layer "
            f"{layer.name!r} ({layer.length}), got {decode_queries}"
        )
    q = layer.q if phase == "prefill" else layer.q[:, :, -decode_queries:]
    q = np.ascontiguousarray(q)
    # The queries before the decode queries, for methods that compress the prompt (SnapKV).
    prompt_q = None if phase == "prefill" else layer.q[:, :, : layer.length - decode_queries]
    reference = registry.method("dense", phase)
    (dense_out, dense_lse), dense_time = _timed(
        lambda: _call(reference, q, layer.k, layer.v, 1.0, num_threads), *timing
    )
    rows = []
    probe = _probe(layer, 0 if phase == "prefill" else layer.length - decode_queries)

    def record(spec, budget, out, lse, seconds) -> None:
        error, recall, recall_min = head_metrics(out, lse, dense_out, dense_lse)
        found = np.full(q.shape[1], np.nan)
        if probe is not None:
            # One more call (untimed) over the probe values: which planted keys it visited.
            seen, _ = _call(spec, q, layer.k, probe[0], budget, num_threads, prompt_q)
            found = found_fraction(seen, probe[1])
        for head in range(q.shape[1]):
            rows.append(
                dict(
                    layer=layer.name,
                    length=layer.length,
                    head=head,
                    kind=layer.kinds[head],
                    phase=phase,
                    method=spec.name,
                    budget=budget,
                    error=float(error[head]),
                    recall=float(recall[head]),
                    recall_min=float(recall_min[head]),
                    found=None if np.isnan(found[head]) else float(found[head]),
                    time_s=seconds,
                    dense_time_s=dense_time,
                )
            )

    record(reference, 1.0, dense_out, dense_lse, dense_time)
    # Each output is reduced to its metrics before the next call: one layer's output at a time.
    for spec in specs:
        for budget in budgets:
            (out, lse), seconds = _timed(
                lambda spec=spec, budget=budget: _call(
                    spec, q, layer.k, layer.v, budget, num_threads, prompt_q
                ),
                *timing,
            )
            record(spec, budget, out, lse, seconds)
    return rows
