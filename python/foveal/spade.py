"""SPADE split-and-delay embeddings (docs/spade.md).

A token has F features in schema order: discrete ones (bins with a PAD and a MISSING id) travel
as int64 ``ids [B, L, Fd]``, continuous ones (energies) as float32 ``values [B, L, Fc]``, each
in schema order. Feature f is delayed by its shift ``s_f`` (default ``f + 1``, strictly
increasing), so the delayed sequence of n tokens has ``T = n + max s_f`` steps and step 0 is all
MISSING. Tensors may be numpy arrays, torch CPU tensors or anything with ``__dlpack__`` or the
buffer protocol; results have the kind of the first tensor argument. Wrong dtypes raise
``TypeError``; wrong shapes or values (ids outside the vocabulary, NaN energies, lengths > n)
raise ``ValueError`` naming the feature and the position.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core
from ._common import is_torch, new_like, shape, size

__all__ = [
    "Decoder",
    "Feature",
    "NextStep",
    "Schema",
    "SpadeEmbedding",
    "delay",
    "loss_mask",
    "next_step",
    "undelay",
    "undelay_logits",
]


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature of a token. ``kind`` is "discrete" (ids in ``[0, vocab_size)`` with the
    given PAD and MISSING ids) or "continuous" (MISSING and PAD are the value 0). ``shift`` is
    the feature's delay; None means the default, its index in the schema + 1."""

    name: str
    kind: str = "discrete"
    vocab_size: int = 0
    pad_id: int = 0
    missing_id: int = 0
    shift: Optional[int] = None

    @classmethod
    def binned(cls, name: str, num_bins: int, shift: Optional[int] = None) -> Feature:
        """A binned feature: vocabulary ``num_bins + 2``, PAD = 0, bins ``1..num_bins``,
        MISSING = ``num_bins + 1``."""
        vocab_size, pad_id, missing_id = _core.spade_binned(name=name, num_bins=num_bins)
        return cls(name, "discrete", vocab_size, pad_id, missing_id, shift)

    @classmethod
    def continuous(cls, name: str, shift: Optional[int] = None) -> Feature:
        """A continuous feature (e.g. an energy)."""
        return cls(name, "continuous", shift=shift)

    @property
    def discrete(self) -> bool:
        return self.kind == "discrete"


class Schema:
    """The ordered features of a token, validated: unique names, ids inside the vocabulary,
    shifts >= 1 and strictly increasing (defaults filled in)."""

    def __init__(self, features: Sequence[Feature]) -> None:
        features = list(features)
        for index, feature in enumerate(features):
            if not isinstance(feature, Feature):
                raise TypeError(
                    f"foveal: Schema: features[{index}] must be a foveal.spade.Feature, "
                    f"got {type(feature).__name__}"
                )
        self._core = _core.SpadeSchema([dataclasses.asdict(feature) for feature in features])
        self.features: tuple[Feature, ...] = tuple(
            dataclasses.replace(feature, shift=shift)
            for feature, shift in zip(features, self._core.shifts)
        )

    @property
    def shifts(self) -> tuple[int, ...]:
        return tuple(feature.shift for feature in self.features)

    @property
    def max_shift(self) -> int:
        return self._core.max_shift

    @property
    def discrete(self) -> tuple[Feature, ...]:
        """The discrete features, in order: the columns of ``ids``."""
        return tuple(feature for feature in self.features if feature.discrete)

    @property
    def continuous(self) -> tuple[Feature, ...]:
        """The continuous features, in order: the columns of ``values``."""
        return tuple(feature for feature in self.features if not feature.discrete)

    def delayed_length(self, num_tokens: int) -> int:
        """T = n + max shift: the number of steps of a delayed sequence of n tokens."""
        return num_tokens + self.max_shift

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{f.name}:{f.shift}" + (f"/{f.vocab_size}" if f.discrete else "")
            for f in self.features
        )
        return f"foveal.spade.Schema({parts})"


# --------------------------------------------------------------------------------------------
# Helpers: the compiled calls check every tensor and option, naming it.


def _schema(function: str, schema: Any) -> Schema:
    if not isinstance(schema, Schema):
        raise TypeError(
            f"foveal: {function}: schema must be a foveal.spade.Schema, got {type(schema).__name__}"
        )
    return schema


def _tokens(ids: Any, values: Any, rank: int) -> tuple[Any, tuple]:
    """The tensor whose kind results take (ids, else values) and its `rank` leading extents (0
    for what has fewer: the compiled call then rejects the tensor, naming it)."""
    like = ids if ids is not None else values
    extents = shape(like)[:rank]
    return like, extents + (0,) * (rank - len(extents))


def _ints(x: Any) -> Any:
    """lengths as the compiled calls read them (a sequence of ints): a torch tensor as a list,
    since its elements are 0-d tensors."""
    return x.tolist() if is_torch(x) else x


def _parts(schema: Schema, like: Any, leading: tuple) -> tuple[Any, Any]:
    """New ids ``[*leading, Fd]`` (int64) and values ``[*leading, Fc]`` (float32) of like's
    kind; None where the schema has no such feature."""
    fd, fc = len(schema.discrete), len(schema.continuous)
    return (
        new_like(like, (*leading, fd), np.int64) if fd else None,
        new_like(like, (*leading, fc), np.float32) if fc else None,
    )


# --------------------------------------------------------------------------------------------
# Delay and undelay.


def delay(
    schema: Schema,
    ids: Any = None,
    values: Any = None,
    lengths: Any = None,
    *,
    num_threads: Optional[int] = None,
):
    """Applies the delay pattern: ``delayed[t, f] = token[t - s_f, f]`` for
    ``s_f <= t < s_f + len``, MISSING (continuous: 0) at the other steps below
    ``len + max shift``, PAD (continuous: 0) after.

    ids: int64 ``[B, n, Fd]``, values: float32 ``[B, n, Fc]``, lengths: ``[B]`` integers (None: all
    n; positions past a length are not read). Returns ``(delayed_ids [B, T, Fd], delayed_values
    [B, T, Fc], mask [B, T, F])`` with T = n + max shift; None stands for an empty part, and
    mask (bool) is True exactly at the data steps.
    """
    schema = _schema("spade.delay", schema)
    like, (batch, length) = _tokens(ids, values, 2)
    steps = schema.delayed_length(length)
    delayed_ids, delayed_values = _parts(schema, like, (batch, steps))
    mask = new_like(like, (batch, steps, len(schema.features)), np.bool_)
    _core.spade_delay(
        schema._core,
        ids,
        values,
        delayed_ids,
        delayed_values,
        mask,
        lengths=_ints(lengths),
        num_threads=num_threads,
    )
    return delayed_ids, delayed_values, mask


def undelay(
    schema: Schema,
    delayed_ids: Any = None,
    delayed_values: Any = None,
    *,
    num_threads: Optional[int] = None,
):
    """The inverse of delay: ``token[i, f] = delayed[i + s_f, f]`` for ``i < n = T - max
    shift``. Returns ``(ids [B, n, Fd], values [B, n, Fc])`` (None for an empty part); positions
    past a sequence's length get what its delayed stream holds there (MISSING, then PAD)."""
    schema = _schema("spade.undelay", schema)
    like, (batch, steps) = _tokens(delayed_ids, delayed_values, 2)
    ids, values = _parts(schema, like, (batch, max(steps - schema.max_shift, 0)))
    _core.spade_undelay(
        schema._core, delayed_ids, delayed_values, ids, values, num_threads=num_threads
    )
    return ids, values


def undelay_logits(
    schema: Schema, logits: Any, *, out: Any = None, num_threads: Optional[int] = None
):
    """Per-step predictions back in token order: logits ``[B, T, F, V]`` (float32 or float64)
    -> ``[B, n, F, V]``, ``out[i, f, :] = logits[i + s_f, f, :]``, n = T - max shift."""
    schema = _schema("spade.undelay_logits", schema)
    if out is None:
        _, (batch, steps, _, vocab) = _tokens(logits, None, 4)
        shape_ = (batch, max(steps - schema.max_shift, 0), len(schema.features), vocab)
        out = new_like(logits, shape_)
    _core.spade_undelay_logits(schema._core, logits, out, num_threads=num_threads)
    return out


# --------------------------------------------------------------------------------------------
# Training.


class NextStep(NamedTuple):
    """The next-step pairs of a delayed batch: views of the same memory (no copies)."""

    input_ids: Any  # [B, T - 1, Fd], steps 0..T-2
    input_values: Any  # [B, T - 1, Fc]
    target_ids: Any  # [B, T - 1, Fd], steps 1..T-1
    target_values: Any  # [B, T - 1, Fc]
    loss_mask: Any  # [B, T - 1, F], the validity of the target step


def next_step(delayed_ids: Any = None, delayed_values: Any = None, mask: Any = None) -> NextStep:
    """Splits delay's outputs into model inputs (steps 0..T-2) and targets (steps 1..T-1); the
    loss mask is ``mask[:, 1:]``. Slices, so torch tensors stay torch tensors (and on any
    device)."""

    def first(x):
        return None if x is None else x[:, :-1]

    def rest(x):
        return None if x is None else x[:, 1:]

    return NextStep(
        first(delayed_ids),
        first(delayed_values),
        rest(delayed_ids),
        rest(delayed_values),
        rest(mask),
    )


def loss_mask(schema: Schema, lengths: Any, num_steps: int, *, include_stop: bool = False):
    """The loss mask ``[B, T - 1, F]`` (bool) of next-step training for sequences of these
    lengths delayed to ``num_steps`` = T steps: the validity of each target step, as
    ``next_step(...).loss_mask``, computed without delaying. With ``include_stop`` the first
    stream's step right after its last token also counts: the stop the generator learns
    (without it that step is masked out, since the stream holds no data there)."""
    schema = _schema("spade.loss_mask", schema)
    try:
        batch = len(lengths)
    except TypeError:  # not a sequence: the compiled call names lengths
        batch = 0
    steps = max(size(num_steps) - 1, 0)
    mask = new_like(lengths, (batch, steps, len(schema.features)), np.bool_)
    _core.spade_loss_mask(
        schema._core, mask, lengths=_ints(lengths), num_steps=num_steps, include_stop=include_stop
    )
    return mask


# --------------------------------------------------------------------------------------------
# The embedding module.

_FEATURE_KEYS = {
    "discrete": ("table", "norm_weight", "norm_bias"),
    "continuous": ("hidden_weight", "hidden_bias", "output_weight", "output_bias"),
}

# state_dict names of a PyTorch SPADE embedding (see docs/spade.md and tests/python).
_STATE_KEYS = {
    "table": "table.weight",
    "norm_weight": "norm.weight",
    "norm_bias": "norm.bias",
    "hidden_weight": "mlp.0.weight",
    "hidden_bias": "mlp.0.bias",
    "output_weight": "mlp.2.weight",
    "output_bias": "mlp.2.bias",
}


def _detached(x: Any) -> Any:
    """A weight as the constructor reads it: it is copied, so a parameter that requires grad is
    read detached."""
    return x.detach() if is_torch(x) else x


class SpadeEmbedding:
    """The SPADE input embedding with trained weights: per feature an ``nn.Embedding`` table
    (optionally followed by a LayerNorm) or a ``Linear(1, H) - SiLU - Linear(H, E)`` MLP, then
    ``projection(cat(e_0, ..., e_{F-1}, condition))`` (combine="concat") or ``sum_f e_f``
    (combine="sum", every E = d_model, no projection). Steps whose discrete ids are all PAD give
    ``pad_vector`` (default zeros).

    ``features`` maps each feature name to its float32 arrays, in PyTorch layouts: discrete
    ``table [V, E]`` (+ ``norm_weight``, ``norm_bias [E]``), continuous ``hidden_weight [H, 1]``,
    ``hidden_bias [H]``, ``output_weight [E, H]``, ``output_bias [E]``. ``projection_weight`` is
    ``[d_model, sum E + condition_dim]``. The weights are copied and folded at construction
    (see docs/spade.md), so later changes to the arrays are not seen.
    """

    def __init__(
        self,
        schema: Schema,
        features: Mapping[str, Mapping[str, Any]],
        *,
        projection_weight: Any = None,
        projection_bias: Any = None,
        combine: str = "concat",
        condition_dim: int = 0,
        norm_eps: float = 1e-5,
        pad_vector: Any = None,
    ) -> None:
        self.schema = _schema("SpadeEmbedding", schema)
        self._core = _core.SpadeEmbedding(
            schema._core,
            {
                name: {key: _detached(value) for key, value in dict(weights).items()}
                for name, weights in dict(features).items()
            },
            _detached(projection_weight),
            _detached(projection_bias),
            _detached(pad_vector),
            combine=combine,
            condition_dim=condition_dim,
            norm_eps=norm_eps,
        )

    @classmethod
    def from_state_dict(
        cls, schema: Schema, state_dict: Mapping[str, Any], *, prefix: str = "", **options: Any
    ) -> SpadeEmbedding:
        """Loads a PyTorch module's ``state_dict()`` with these names (after ``prefix``):
        ``features.<name>.table.weight``, ``features.<name>.norm.{weight,bias}``,
        ``features.<name>.mlp.{0,2}.{weight,bias}``, ``projection.{weight,bias}``. ``options``
        are the constructor's keywords (combine, condition_dim, norm_eps, pad_vector)."""
        features = {}
        for feature in schema.features:
            names = {
                key: f"{prefix}features.{feature.name}.{_STATE_KEYS[key]}"
                for key in _FEATURE_KEYS[feature.kind]
            }
            features[feature.name] = {
                key: state_dict[name] for key, name in names.items() if name in state_dict
            }
        return cls(
            schema,
            features,
            projection_weight=state_dict.get(f"{prefix}projection.weight"),
            projection_bias=state_dict.get(f"{prefix}projection.bias"),
            **options,
        )

    @classmethod
    def from_torch(cls, schema: Schema, module: Any, **options: Any) -> SpadeEmbedding:
        """``from_state_dict(schema, module.state_dict(), **options)``."""
        return cls.from_state_dict(schema, module.state_dict(), **options)

    @property
    def d_model(self) -> int:
        return self._core.d_model

    @property
    def condition_dim(self) -> int:
        return self._core.condition_dim

    def __call__(
        self,
        ids: Any = None,
        values: Any = None,
        *,
        condition: Any = None,
        out: Any = None,
        num_threads: Optional[int] = None,
    ):
        """Embeds delayed tokens: ids int64 ``[B, T, Fd]``, values float32 ``[B, T, Fc]``,
        condition float32 ``[B, T, C]`` or ``[B, C]`` (one vector per sequence, not copied)
        -> float32 ``[B, T, d_model]``. Results do not depend on the thread count."""
        if out is None:
            like, leading = _tokens(ids, values, 2)
            out = new_like(like, (*leading, self.d_model), np.float32)
        self._core.forward(ids, values, out, condition, num_threads=num_threads)
        return out

    def __repr__(self) -> str:
        return f"foveal.spade.SpadeEmbedding({self.schema!r}, d_model={self.d_model})"


# --------------------------------------------------------------------------------------------
# Generation.


class Decoder:
    """The bookkeeping of generating ``batch`` sequences step by step (see SpadeDecoder in
    docs/spade.md). Feed the model step 0 (all MISSING, ``first_step()``), then call
    ``step(ids, values)`` with its predictions for the next step: it returns the step to feed
    back (MISSING forced before a stream starts; after the first stream predicts PAD or MISSING,
    the stop, or reaches max_tokens, the later streams finish their owed steps, then MISSING / PAD
    as delay lays a sequence out) and, per sequence, the index of the token this step completed
    (-1 if none). ``tokens()`` gives the undelayed result so far."""

    def __init__(self, schema: Schema, batch: int, max_tokens: int) -> None:
        self.schema = _schema("Decoder", schema)
        self._core = _core.SpadeDecoder(schema._core, batch=batch, max_tokens=max_tokens)
        self.batch: int = self._core.batch
        self.max_tokens: int = self._core.max_tokens

    def first_step(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Step 0, the start step: every stream MISSING (continuous 0)."""
        missing = np.array([f.missing_id for f in self.schema.discrete], np.int64)
        ids = np.tile(missing, (self.batch, 1))
        values = np.zeros((self.batch, len(self.schema.continuous)), np.float32)
        return (
            ids if self.schema.discrete else None,
            values if self.schema.continuous else None,
        )

    def step(self, ids: Any = None, values: Any = None):
        """ids int64 ``[B, Fd]`` and values float32 ``[B, Fc]``: the predictions for the next
        step. Returns ``(step_ids, step_values, completed [B])``, of the kind of the inputs."""
        like = ids if ids is not None else values
        step_ids, step_values = _parts(self.schema, like, (self.batch,))
        completed = new_like(like, (self.batch,), np.int64)
        self._core.step(ids, values, step_ids, step_values, completed)
        return step_ids, step_values, completed

    @property
    def current_step(self) -> int:
        """The index of the last step emitted (0: only the start step)."""
        return self._core.current_step

    @property
    def lengths(self) -> list[int]:
        """Per sequence, its number of tokens once its first stream has stopped, else -1."""
        return [self._core.length(b) for b in range(self.batch)]

    @property
    def finished(self) -> list[bool]:
        """Per sequence, whether every stream has emitted all its tokens."""
        return [self._core.finished(b) for b in range(self.batch)]

    @property
    def done(self) -> bool:
        return self._core.done()

    def tokens(self) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Copies of the tokens so far, undelayed: ids ``[B, max_tokens, Fd]`` and values
        ``[B, max_tokens, Fc]``; PAD / 0 where nothing has arrived."""
        return (
            self._core.ids() if self.schema.discrete else None,
            self._core.values() if self.schema.continuous else None,
        )
