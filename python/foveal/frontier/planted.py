"""Q/K/V with planted attention structure whose answers are known (data for foveal.frontier).

Every head's logits are ``l_ij = q_i . k_j / sqrt(D) = noise_ij + sum_c beta_c S_c(i, j)``: a
background ``noise_ij`` ~ N(0, sigma^2) from a block of random dimensions, plus one structured
term per planted component ``c`` in its own block of dimensions (the blocks are orthogonal, so
the terms add exactly); then, in the default ``basis="rotated"``, the whole head is turned by one
random rotation of the D dimensions, which keeps every dot product and hides the blocks from
per-channel statistics. ``basis="channels"`` leaves the blocks in their own channels: the same
logits, but each component shows in a few channels of Q and K, as the structure of real keys
concentrates in a few outlier channels. Methods that use only dot products (dense, window,
block_sparse, token_topk, vertical_slash, snapkv) answer the same in both bases; per-channel
summaries (Quest's page bounds) need the channels: in the rotated basis a planted direction
spreads over all D channels, about 1/sqrt(D) of its length in each, less than the spread of the
other keys in a channel.
``S_c`` peaks at 1 on the component's *planted keys* ``P_c(i)``:

- ``local``: ``S = K(i - j)``, a rotary-style code (pairs of dimensions rotating at per-head
  random frequencies, ``q_i . k_j = sum_f cos(w_f (i - j))``) whose frequencies are drawn so
  that ``K`` is a Gaussian bump of width ``width`` around the diagonal;
  ``P(i) = {j : 0 <= i - j <= width}``.
- ``slash``: ``S = sum_o K(i - j - o)`` for a few offsets o (diagonal lines);
  ``P(i) = {j : |i - j - o| <= width}``.
- ``sink``: the first ``sinks`` keys carry a shared direction every query aligns with;
  ``P(i) = {j < sinks}``.
- ``vertical``: a few key columns anywhere in the sequence carry that direction;
  ``P(i) = the columns``.
- ``retrieval``: ``pairs`` query positions (the last ``decode_queries`` positions among them,
  so that decoding has something to find) each match one key far back (at least L/4 before it)
  through a direction of their own; the other queries see only the background.
  ``P(i) = {the planted key}`` for a planted query, empty otherwise.

A mixture (``"local+sink"``) puts several components in one head. Each component's strength
``beta_c`` is set, alone with the background, so that the dense softmax mass on its planted keys
averages ``mass`` (default 0.7) over the rows it is measured on (the planted queries of
``retrieval``, evenly spread rows of the second half of the sequence otherwise); in a mixture
the components then compete, and the masses measured with all of them are recorded in
``PlantedHead.mass``.

Expected recall of an ideal method (one that keeps, per query, the ``budget * L`` keys of
largest probability): once the budget covers the planted keys, at least the planted mass. The
planted keys per query number ``width + 1`` (local), ``len(offsets) * (2 width + 1)`` (slash),
``sinks`` (sink), ``len(columns)`` (vertical) and 1 (retrieval), so at L = 4096 and a budget of
1/64 (64 keys) an ideal method keeps at least ``mass`` of every kind with the defaults, plus the
largest part of the background's ``1 - mass``. A sliding window with sinks is ideal for local
and sink heads only: it misses slash lines beyond its width, vertical columns outside it, and
the planted keys of retrieval, which lie at least L/4 back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

KINDS = ("local", "slash", "sink", "vertical", "retrieval")
BASES = ("rotated", "channels")

# The share of the D dimensions that carries the background noise; the rest is structure.
NOISE_SHARE = 4


@dataclass
class PlantedHead:
    """What was planted in one head (see the module docstring for the meaning of each field).

    ``pairs``: ``[R, 2]`` int (query position, planted key position) of ``retrieval``;
    ``columns``: the key positions of ``vertical``; ``offsets``: the offsets of ``slash``;
    ``strength``: ``beta_c`` per component; ``mass``: the measured dense softmax mass on each
    component's planted keys and on their union (``"all"``), with every component present."""

    kind: str
    components: tuple
    width: int = 0
    sinks: int = 0
    offsets: tuple = ()
    columns: tuple = ()
    pairs: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), dtype=np.int64))
    strength: dict = field(default_factory=dict)
    mass: dict = field(default_factory=dict)

    def planted_keys(self, rows: np.ndarray, length: int, component: str = "all") -> np.ndarray:
        """``[len(rows), length]`` bool: the planted keys of query ``rows`` (causal: never past
        the row), of one component or of all of them."""
        rows = np.asarray(rows, dtype=np.int64)
        parts = self.components if component == "all" else (component,)
        position = rows[:, None]
        key = np.arange(length)[None, :]
        mask = np.zeros((len(rows), length), dtype=bool)
        for part in parts:
            if part == "local":
                mask |= (position - key >= 0) & (position - key <= self.width)
            elif part == "slash":
                for offset in self.offsets:
                    mask |= np.abs(position - key - offset) <= self.width
            elif part == "sink":
                mask |= key < self.sinks
            elif part == "vertical":
                mask[:, list(self.columns)] = True
            elif part == "retrieval":
                planted = dict(zip(self.pairs[:, 0].tolist(), self.pairs[:, 1].tolist()))
                for index, row in enumerate(rows.tolist()):
                    if row in planted:
                        mask[index, planted[row]] = True
        return mask & (key <= position)


@dataclass
class Planted:
    """q, k, v: float32 ``[1, H, L, D]``; ``heads``: one PlantedHead per head; ``basis``:
    ``"rotated"`` or ``"channels"`` (see the module docstring)."""

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    heads: list
    seed: int
    basis: str = "rotated"

    @property
    def kinds(self) -> list:
        return [head.kind for head in self.heads]

    @property
    def pairs(self) -> list:
        """Per head, its retrieval pairs ``[R, 2]`` (query position, planted key); empty for a
        head without a retrieval component."""
        return [head.pairs for head in self.heads]


def parse_kinds(kinds: Sequence[str] | str) -> list:
    """``"local,sink+vertical"`` or a list of such names -> checked names, one per head."""
    if isinstance(kinds, str):
        kinds = [part.strip() for part in kinds.split(",") if part.strip()]
    kinds = list(kinds)
    if not kinds:
        raise ValueError("foveal.frontier: planted: kinds must name at least one kind, got none")
    for kind in kinds:
        if not isinstance(kind, str):
            raise TypeError(f"foveal.frontier: planted: kinds must be strings, got {kind!r}")
        parts = kind.split("+")
        for part in parts:
            if part not in KINDS:
                raise ValueError(
                    f"foveal.frontier: planted: kind must be one of {', '.join(KINDS)} or a "
                    f"'+' mixture of them, got {kind!r}"
                )
        if len(set(parts)) != len(parts):
            raise ValueError(f"foveal.frontier: planted: kind {kind!r} repeats a component")
    return kinds


def planted(
    kinds: Sequence[str] | str,
    length: int,
    *,
    heads: Optional[int] = None,
    dim: int = 128,
    seed: int = 0,
    mass: float = 0.7,
    noise: float = 1.0,
    width: int = 8,
    sinks: int = 4,
    columns: int = 8,
    offsets: int = 3,
    pairs: int = 8,
    decode_queries: int = 1,
    basis: str = "rotated",
) -> Planted:
    """Q/K/V ``[1, H, L, D]`` float32 with planted structure, deterministic in ``seed``.

    ``kinds``: one kind per head (``"local"``, ``"slash"``, ``"sink"``, ``"vertical"``,
    ``"retrieval"`` or a ``+`` mixture), a list or a comma-separated string, repeated in turn
    over ``heads`` (default: one head per kind). ``mass``: the dense softmax mass each component
    puts on its planted keys, in (0, 1); ``noise``: the background logits' standard deviation;
    ``width``: the local and slash bands; ``sinks``, ``columns``, ``offsets``, ``pairs``: how
    many sink keys, vertical columns, slash lines and retrieval pairs per head;
    ``decode_queries``: the last positions that are retrieval queries; ``basis``:
    ``"rotated"`` (a random rotation hides the structure from every channel) or ``"channels"``
    (each component in channels of its own; the same heads otherwise).
    """
    kinds = parse_kinds(kinds)
    heads = len(kinds) if heads is None else heads
    _check_int("heads", heads, 1)
    _check_int("length", length, 16)
    _check_int("dim", dim, 16)
    _check_int("width", width, 1)
    _check_int("sinks", sinks, 1)
    _check_int("columns", columns, 1)
    _check_int("offsets", offsets, 1)
    _check_int("pairs", pairs, 1)
    _check_int("decode_queries", decode_queries, 1)
    for name, value in (("mass", mass), ("noise", noise)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
            raise TypeError(f"foveal.frontier: planted: {name} must be a number, got {value!r}")
    if not 0.0 < mass < 1.0:
        raise ValueError(f"foveal.frontier: planted: mass must be in (0, 1), got {mass}")
    if not noise >= 0.0:
        raise ValueError(f"foveal.frontier: planted: noise must be >= 0, got {noise}")
    if basis not in BASES:
        raise ValueError(
            f"foveal.frontier: planted: basis must be one of {', '.join(BASES)}, got {basis!r}"
        )
    if decode_queries > pairs:
        raise ValueError(
            f"foveal.frontier: planted: decode_queries must be <= pairs ({pairs}), got "
            f"{decode_queries}"
        )
    shape = dict(width=width, sinks=sinks, columns=columns, offsets=offsets, pairs=pairs)
    q = np.empty((1, heads, length, dim), dtype=np.float32)
    k = np.empty_like(q)
    v = np.empty_like(q)
    described = []
    # One generator per head from one seed sequence: a head does not depend on the others.
    streams = np.random.SeedSequence(seed).spawn(heads)
    for head in range(heads):
        rng = np.random.default_rng(streams[head])
        kind = kinds[head % len(kinds)]
        q_head, k_head, info = _head(rng, kind, length, dim, mass, noise, decode_queries, shape)
        # Drawn in both bases, so that a head's values are the same in both.
        rotation = _rotation(rng, dim)
        if basis == "rotated":
            q_head, k_head = q_head @ rotation, k_head @ rotation
        q[0, head] = q_head
        k[0, head] = k_head
        v[0, head] = rng.standard_normal((length, dim))
        described.append(info)
    return Planted(q, k, v, described, seed, basis)


def _check_int(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"foveal.frontier: planted: {name} must be an int, got {value!r}")
    if value < least:
        raise ValueError(f"foveal.frontier: planted: {name} must be >= {least}, got {value}")


def _rotation(rng: np.random.Generator, dim: int) -> np.ndarray:
    """A random orthogonal [dim, dim] matrix: Gram-Schmidt (twice, for orthogonality to
    rounding) on a Gaussian one. Not numpy.linalg.qr, whose threaded LAPACK can take seconds
    on a busy machine for this tiny matrix."""
    basis = rng.standard_normal((dim, dim))
    for column in range(dim):
        vector = basis[:, column]
        for _ in range(2):
            done = basis[:, :column]
            vector = vector - done @ (done.T @ vector)
        basis[:, column] = vector / np.linalg.norm(vector)
    return basis


def _blocks(components: tuple, dim: int, pairs: int) -> dict:
    """How many dimensions each component gets: a quarter for the noise, one for sink and
    vertical, one per pair for retrieval, the rest split evenly between local and slash (in
    pairs, for the rotary code)."""
    sizes = {"noise": max(1, dim // NOISE_SHARE)}
    free = dim - sizes["noise"]
    for part in components:
        if part in ("sink", "vertical"):
            sizes[part] = 1
        elif part == "retrieval":
            sizes[part] = pairs
    free -= sum(size for name, size in sizes.items() if name != "noise")
    rotary = [part for part in components if part in ("local", "slash")]
    for part in rotary:
        sizes[part] = 2 * (free // (2 * len(rotary)))
        if sizes[part] < 2:
            raise ValueError(
                f"foveal.frontier: planted: dim {dim} leaves no room for {'+'.join(components)}; "
                "raise dim or lower pairs"
            )
    if free < 0:
        raise ValueError(
            f"foveal.frontier: planted: dim {dim} is too small for {'+'.join(components)}"
        )
    return sizes


def _rotary(positions: np.ndarray, frequencies: np.ndarray) -> np.ndarray:
    """[len(positions), 2F] unit-scaled rotary code: code(a) . code(b) = mean_f cos(w_f (a - b))."""
    angle = positions[:, None].astype(np.float64) * frequencies[None, :]
    scale = 1.0 / math.sqrt(len(frequencies))
    return np.concatenate([np.cos(angle), np.sin(angle)], axis=1) * scale


def _head(rng, kind, length, dim, mass, noise, decode_queries, shape) -> tuple:
    """(q [L, D] and k [L, D] float64 before the rotation, PlantedHead) for one head."""
    components = tuple(kind.split("+"))
    sizes = _blocks(components, dim, shape["pairs"])
    info = PlantedHead(kind=kind, components=components, width=shape["width"])
    positions = np.arange(length)
    # The structured terms as (query part, key part) with q_part . k_part = S_c (unit strength).
    parts = {}
    for part in components:
        if part in ("local", "slash"):
            # A Gaussian bump exp(-x^2 / (2 s^2)), s = width / 2, as the mean of cos(w x)
            # over frequencies w ~ N(0, 1 / s^2) (Bochner: the bump's spectrum).
            spread = shape["width"] / 2.0
            frequencies = rng.standard_normal(sizes[part] // 2) / spread
            key_code = _rotary(positions, frequencies)
            if part == "local":
                query_code = key_code
            else:
                candidates = np.arange(2 * shape["width"] + 1, length // 2)
                if len(candidates) == 0:
                    raise ValueError(
                        f"foveal.frontier: planted: slash needs length >= 4 * width + 4 = "
                        f"{4 * shape['width'] + 4}, got {length}"
                    )
                count = min(shape["offsets"], len(candidates))
                chosen = rng.choice(candidates, size=count, replace=False)
                info.offsets = tuple(sorted(int(o) for o in chosen))
                query_code = sum(_rotary(positions - o, frequencies) for o in info.offsets)
            parts[part] = (query_code, key_code)
        elif part in ("sink", "vertical"):
            key_code = np.zeros((length, 1))
            if part == "sink":
                info.sinks = min(shape["sinks"], length // 4)
                key_code[: info.sinks] = 1.0
            else:
                count = min(shape["columns"], length // 4)
                chosen = rng.choice(np.arange(length // 8, length), size=count, replace=False)
                info.columns = tuple(sorted(int(c) for c in chosen))
                key_code[list(info.columns)] = 1.0
            parts[part] = (np.ones((length, 1)), key_code)
        else:
            info.pairs = _retrieval_pairs(rng, length, shape["pairs"], decode_queries)
            query_code = np.zeros((length, sizes[part]))
            key_code = np.zeros((length, sizes[part]))
            for index, (row, key) in enumerate(info.pairs.tolist()):
                query_code[row, index] = 1.0
                key_code[key, index] = 1.0
            parts[part] = (query_code, key_code)
    # Background: entries N(0, t^2) over n dims give q . k / sqrt(D) ~ N(0, n t^4 / D).
    count = sizes["noise"]
    spread = math.sqrt(noise) * (dim / count) ** 0.25
    q_noise = rng.standard_normal((length, count)) * spread
    k_noise = rng.standard_normal((length, count)) * spread
    rows = _measured_rows(info, length)
    every = np.unique(np.concatenate(list(rows.values())))
    background = q_noise[every] @ k_noise.T / math.sqrt(dim)
    structure = {part: query[every] @ key.T for part, (query, key) in parts.items()}
    for part in components:
        index = np.searchsorted(every, rows[part])
        info.strength[part] = _calibrate(
            background[index], structure[part][index], rows[part], info, part, mass
        )
    # q . k / sqrt(D) must give beta S: the query part carries beta, both carry D^(1/4).
    root = dim**0.25
    q_head = np.concatenate(
        [q_noise] + [info.strength[part] * root * parts[part][0] for part in components], axis=1
    )
    k_head = np.concatenate([k_noise] + [root * parts[part][1] for part in components], axis=1)
    pad = dim - q_head.shape[1]
    q_head = np.pad(q_head, ((0, 0), (0, pad)))
    k_head = np.pad(k_head, ((0, 0), (0, pad)))
    logits = background + sum(info.strength[part] * structure[part] for part in components)
    probabilities = _causal_softmax(logits, every)
    for part in (*components, "all"):
        measured = np.isin(every, rows[part]) if part != "all" else slice(None)
        kept = (probabilities * info.planted_keys(every, length, part)).sum(axis=1)
        info.mass[part] = float(kept[measured].mean())
    return q_head, k_head, info


def _retrieval_pairs(rng, length: int, count: int, decode_queries: int) -> np.ndarray:
    """[count, 2] (query, key): the last decode_queries positions and others drawn from the
    second half; each key drawn at least L/4 before its query, all keys distinct."""
    count = min(count, length // 4)
    if decode_queries > count:
        raise ValueError(
            f"foveal.frontier: planted: decode_queries must be <= {count} retrieval pairs at "
            f"length {length}, got {decode_queries}"
        )
    last = np.arange(length - decode_queries, length)
    others = rng.choice(
        np.arange(length // 2, length - decode_queries), size=count - len(last), replace=False
    )
    queries = np.sort(np.concatenate([others, last]))
    keys = []
    for row in queries.tolist():
        choices = np.setdiff1d(np.arange(0, row - length // 4), keys)
        keys.append(int(rng.choice(choices)))
    return np.stack([queries, np.array(keys)], axis=1).astype(np.int64)


def _measured_rows(info: PlantedHead, length: int) -> dict:
    """The query rows on which each component's mass is set and measured."""
    spread = np.unique(np.linspace(length // 2, length - 1, 64).astype(np.int64))
    rows = {}
    for part in info.components:
        rows[part] = info.pairs[:, 0].copy() if part == "retrieval" else spread
    return rows


def _causal_softmax(logits: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Row-wise softmax of [len(rows), L] logits over the keys j <= row."""
    visible = np.arange(logits.shape[1])[None, :] <= rows[:, None]
    masked = np.where(visible, logits, -np.inf)
    weights = np.exp(masked - masked.max(axis=1, keepdims=True))
    return weights / weights.sum(axis=1, keepdims=True)


def _calibrate(background, structure, rows, info: PlantedHead, part: str, mass: float) -> float:
    """The strength beta >= 0 at which the mean softmax mass of ``background + beta *
    structure`` (rows ``rows``) on the component's planted keys is ``mass`` to 1e-4
    (bisection: the mass grows with beta)."""
    planted_keys = info.planted_keys(rows, background.shape[1], part)
    visible = np.arange(background.shape[1])[None, :] <= rows[:, None]
    background = np.where(visible, background, -np.inf)

    def kept(beta: float) -> float:
        logits = background + beta * structure
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        return float(((weights * planted_keys).sum(axis=1) / weights.sum(axis=1)).mean())

    low, high = 0.0, 1.0
    while kept(high) < mass and high < 1e3:
        low, high = high, 2.0 * high
    for _ in range(40):
        middle = 0.5 * (low + high)
        found = kept(middle)
        if abs(found - mass) < 1e-4:
            return middle
        low, high = (middle, high) if found < mass else (low, middle)
    return 0.5 * (low + high)
