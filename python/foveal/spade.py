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
from ._common import _as_float, _as_int, _to_numpy, _torch_empty, is_torch

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

_KINDS = ("discrete", "continuous")


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
        num_bins = _as_int("Feature.binned", "num_bins", num_bins)
        if num_bins < 1:
            raise ValueError(
                f"foveal: Feature.binned: num_bins (feature {name!r}) must be >= 1, got {num_bins}"
            )
        return cls(name, "discrete", num_bins + 2, 0, num_bins + 1, shift)

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
        function = "Schema"
        features = list(features)
        for index, feature in enumerate(features):
            if not isinstance(feature, Feature):
                raise TypeError(
                    f"foveal: {function}: features[{index}] must be a foveal.spade.Feature, "
                    f"got {type(feature).__name__}"
                )
            if feature.kind not in _KINDS:
                raise ValueError(
                    f"foveal: {function}: features[{index}].kind (feature {feature.name!r}) must "
                    f"be 'discrete' or 'continuous', got {feature.kind!r}"
                )
        self._core = _core.SpadeSchema(
            [feature.name for feature in features],
            [feature.discrete for feature in features],
            [_as_int(function, "vocab_size", feature.vocab_size) for feature in features],
            [_as_int(function, "pad_id", feature.pad_id) for feature in features],
            [_as_int(function, "missing_id", feature.missing_id) for feature in features],
            [None if f.shift is None else _as_int(function, "shift", f.shift) for f in features],
        )
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
# Conversions.


def _input(function: str, name: str, x: Any, dims: str, dtype: Any) -> np.ndarray:
    """x as a numpy view with len(dims) dimensions and the given dtype (never converted)."""
    array = _to_numpy(function, name, x)
    ndim = len(dims.split(","))
    if array.ndim != ndim:
        raise ValueError(
            f"foveal: {function}: {name} must have {ndim} dimensions [{dims}], got {array.ndim} "
            f"(shape {tuple(array.shape)})"
        )
    if array.dtype != np.dtype(dtype):
        raise TypeError(
            f"foveal: {function}: {name} must have dtype {np.dtype(dtype).name}, "
            f"got {array.dtype.name}"
        )
    return array


def _optional_input(function: str, name: str, x: Any, dims: str, dtype: Any, needed: bool):
    """_input for an argument that is required exactly when `needed`."""
    if x is None:
        if needed:
            raise ValueError(f"foveal: {function}: {name} must be given for this schema")
        return None
    return _input(function, name, x, dims, dtype)


def _lengths(function: str, lengths: Any, batch: int) -> Optional[np.ndarray]:
    """Per-sequence lengths as an int64 array of B entries (any integer input), or None."""
    if lengths is None:
        return None
    array = np.asarray(_to_numpy(function, "lengths", lengths) if is_torch(lengths) else lengths)
    if array.dtype.kind not in "iu":
        raise TypeError(
            f"foveal: {function}: lengths must hold integers, got dtype {array.dtype.name}"
        )
    if array.shape != (batch,):
        raise ValueError(
            f"foveal: {function}: lengths must have shape (B,) = ({batch},), got {array.shape}"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def _new(like: Any, shape: tuple, dtype: Any) -> tuple[Any, np.ndarray]:
    """A new uninitialized tensor of the kind of `like` (the kernels write every element), and
    the numpy view they write (bool tensors as uint8)."""
    name = np.dtype(dtype).name
    if is_torch(like):
        tensor = _torch_empty(shape, dtype)
        array = tensor.numpy()
    else:
        tensor = array = np.empty(shape, dtype=dtype)
    return tensor, array.view(np.uint8) if name == "bool" else array


def _threads(function: str, num_threads: Optional[int]) -> int:
    return 0 if num_threads is None else _as_int(function, "num_threads", num_threads)


def _token_inputs(function: str, schema: Schema, ids: Any, values: Any, dims: str):
    """ids [.., Fd] and values [.., Fc] as numpy views (None where the schema has no such
    feature), the tensor whose kind results take, and the leading extents (B, L)."""
    if not isinstance(schema, Schema):
        raise TypeError(
            f"foveal: {function}: schema must be a foveal.spade.Schema, got {type(schema).__name__}"
        )
    id_array = _optional_input(function, "ids", ids, f"{dims}, Fd", np.int64, bool(schema.discrete))
    value_array = _optional_input(
        function, "values", values, f"{dims}, Fc", np.float32, bool(schema.continuous)
    )
    like, first = (ids, id_array) if id_array is not None else (values, value_array)
    return id_array, value_array, like, first.shape[:-1]


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
    function = "spade.delay"
    id_array, value_array, like, (batch, length) = _token_inputs(
        function, schema, ids, values, "B, n"
    )
    steps = schema.delayed_length(length)
    delayed_ids, delayed_ids_array = _new(like, (batch, steps, len(schema.discrete)), np.int64)
    delayed_values, delayed_values_array = _new(
        like, (batch, steps, len(schema.continuous)), np.float32
    )
    mask, mask_array = _new(like, (batch, steps, len(schema.features)), np.bool_)
    _core.spade_delay(
        schema._core,
        id_array,
        value_array,
        _lengths(function, lengths, batch),
        delayed_ids_array if schema.discrete else None,
        delayed_values_array if schema.continuous else None,
        mask_array,
        _threads(function, num_threads),
    )
    return (
        delayed_ids if schema.discrete else None,
        delayed_values if schema.continuous else None,
        mask,
    )


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
    function = "spade.undelay"
    id_array, value_array, like, (batch, steps) = _token_inputs(
        function, schema, delayed_ids, delayed_values, "B, T"
    )
    length = steps - schema.max_shift
    if length < 0:
        raise ValueError(
            f"foveal: {function}: the delayed length T must be >= max shift = "
            f"{schema.max_shift}, got {steps}"
        )
    ids, ids_array = _new(like, (batch, length, len(schema.discrete)), np.int64)
    values, values_array = _new(like, (batch, length, len(schema.continuous)), np.float32)
    _core.spade_undelay(
        schema._core,
        id_array,
        value_array,
        ids_array if schema.discrete else None,
        values_array if schema.continuous else None,
        _threads(function, num_threads),
    )
    return (ids if schema.discrete else None, values if schema.continuous else None)


def undelay_logits(
    schema: Schema, logits: Any, *, out: Any = None, num_threads: Optional[int] = None
):
    """Per-step predictions back in token order: logits ``[B, T, F, V]`` (float32 or float64)
    -> ``[B, n, F, V]``, ``out[i, f, :] = logits[i + s_f, f, :]``, n = T - max shift."""
    function = "spade.undelay_logits"
    array = _to_numpy(function, "logits", logits)
    if array.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(
            f"foveal: {function}: logits must have dtype float32 or float64, got {array.dtype.name}"
        )
    array = _input(function, "logits", array, "B, T, F, V", array.dtype)
    batch, steps, _, vocab = array.shape
    shape = (batch, max(steps - schema.max_shift, 0), len(schema.features), vocab)
    if out is None:
        out, out_array = _new(logits, shape, array.dtype)
    else:
        out_array = _input(function, "out", out, "B, n, F, V", array.dtype)
    _core.spade_undelay_logits(schema._core, array, out_array, _threads(function, num_threads))
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
    function = "spade.loss_mask"
    num_steps = _as_int(function, "num_steps", num_steps)
    batch = len(lengths)
    if num_steps < 1:
        raise ValueError(f"foveal: {function}: num_steps must be >= 1, got {num_steps}")
    mask, mask_array = _new(lengths, (batch, num_steps - 1, len(schema.features)), np.bool_)
    _core.spade_loss_mask(
        schema._core, _lengths(function, lengths, batch), mask_array, bool(include_stop)
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


def _weight(function: str, name: str, x: Any) -> np.ndarray:
    if is_torch(x):
        x = x.detach()
    array = _to_numpy(function, name, x)
    if array.dtype != np.float32:
        raise TypeError(
            f"foveal: {function}: {name} must have dtype float32, got {array.dtype.name}"
        )
    return array


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
        function = "SpadeEmbedding"
        if not isinstance(schema, Schema):
            raise TypeError(
                f"foveal: {function}: schema must be a foveal.spade.Schema, "
                f"got {type(schema).__name__}"
            )
        unknown = set(features) - {feature.name for feature in schema.features}
        if unknown:
            raise ValueError(
                f"foveal: {function}: features has no schema feature {sorted(unknown)}"
            )
        per_feature = []
        for feature in schema.features:
            if feature.name not in features:
                raise ValueError(
                    f"foveal: {function}: features must hold the weights of feature "
                    f"{feature.name!r}"
                )
            given = dict(features[feature.name])
            allowed = _FEATURE_KEYS[feature.kind]
            extra = set(given) - set(allowed)
            if extra:
                raise ValueError(
                    f"foveal: {function}: feature {feature.name!r} ({feature.kind}) takes weights "
                    f"{list(allowed)}, got also {sorted(extra)}"
                )
            per_feature.append(
                {
                    key: _weight(function, f"features[{feature.name!r}][{key!r}]", value)
                    for key, value in given.items()
                    if value is not None
                }
            )

        def optional(name: str, x: Any) -> Optional[np.ndarray]:
            return None if x is None else _weight(function, name, x)

        self.schema = schema
        self._core = _core.SpadeEmbedding(
            schema._core,
            per_feature,
            combine,
            optional("projection_weight", projection_weight),
            optional("projection_bias", projection_bias),
            _as_int(function, "condition_dim", condition_dim),
            _as_float(function, "norm_eps", norm_eps),
            optional("pad_vector", pad_vector),
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
        function = "SpadeEmbedding"
        id_array, value_array, like, (batch, steps) = _token_inputs(
            function, self.schema, ids, values, "B, T"
        )
        condition_array = None
        if condition is not None:
            condition_array = _to_numpy(function, "condition", condition)
            if condition_array.ndim == 2:  # [B, C]: the same vector at every step, stride 0
                condition_array = np.broadcast_to(
                    condition_array[:, None, :],
                    (condition_array.shape[0], steps, condition_array.shape[1]),
                )
            condition_array = _input(function, "condition", condition_array, "B, T, C", np.float32)
        shape = (batch, steps, self.d_model)
        if out is None:
            out, out_array = _new(like, shape, np.float32)
        else:
            out_array = _input(function, "out", out, "B, T, d_model", np.float32)
        self._core.forward(
            id_array, value_array, out_array, condition_array, _threads(function, num_threads)
        )
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
        function = "Decoder"
        if not isinstance(schema, Schema):
            raise TypeError(
                f"foveal: {function}: schema must be a foveal.spade.Schema, "
                f"got {type(schema).__name__}"
            )
        self.schema = schema
        self.batch = _as_int(function, "batch", batch)
        self.max_tokens = _as_int(function, "max_tokens", max_tokens)
        self._core = _core.SpadeDecoder(schema._core, self.batch, self.max_tokens)

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
        function = "Decoder.step"
        id_array, value_array, like, _ = _token_inputs(function, self.schema, ids, values, "B")
        step_ids, step_ids_array = _new(like, (self.batch, len(self.schema.discrete)), np.int64)
        step_values, step_values_array = _new(
            like, (self.batch, len(self.schema.continuous)), np.float32
        )
        completed, completed_array = _new(like, (self.batch,), np.int64)
        self._core.step(
            id_array,
            value_array,
            step_ids_array if self.schema.discrete else None,
            step_values_array if self.schema.continuous else None,
            completed_array,
        )
        return (
            step_ids if self.schema.discrete else None,
            step_values if self.schema.continuous else None,
            completed,
        )

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
