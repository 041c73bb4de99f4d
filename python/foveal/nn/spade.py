"""The SPADE input embedding (docs/spade.md) as a trainable torch module.

:class:`SpadeEmbedding` holds the weights of the SPADE embedding as ordinary torch parameters,
named so that ``foveal.spade.SpadeEmbedding.from_torch`` (the folded inference embedding) loads
its ``state_dict``: ``features.<name>.table.weight``, ``features.<name>.norm.{weight,bias}``,
``features.<name>.mlp.{0,2}.{weight,bias}``, ``projection.{weight,bias}``. Forward and backward
run in foveal's C++ library as the custom ops ``foveal::spade_embedding`` and
``foveal::spade_embedding_backward`` (registered for autograd, with fake implementations, so
``torch.compile(fullgraph=True)`` traces them). Gradients are bitwise identical for any thread
count.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from foveal import _core
from foveal import spade as _spade

__all__ = ["SpadeEmbedding"]

_COMBINES = ("concat", "sum")


@functools.lru_cache(maxsize=64)
def _unpack(spec: str) -> tuple:
    """The op's spec string -> (core schema, per-feature parameter keys, keywords)."""
    data = json.loads(spec)
    schema = _core.SpadeSchema(data["features"])
    return schema, data["keys"], data["options"]


def _weights(spec: str, tensors: list) -> tuple:
    """The flat parameter list -> the features dict and projection of the core API."""
    schema, keys, options = _unpack(spec)
    features, at = {}, 0
    for name, feature_keys in keys["features"]:
        features[name] = {key: tensors[at + i].detach() for i, key in enumerate(feature_keys)}
        at += len(feature_keys)
    projection = [None, None]
    for i, key in enumerate(keys["projection"]):
        projection[("weight", "bias").index(key)] = tensors[at + i].detach()
    return schema, features, projection, options


def _leading(ids: Optional[torch.Tensor], values: Optional[torch.Tensor]) -> tuple:
    like = ids if ids is not None else values
    return like.shape[0], like.shape[1]


@torch.library.custom_op("foveal::spade_embedding", mutates_args=())
def _spade_embedding_op(
    ids: Optional[torch.Tensor],
    values: Optional[torch.Tensor],
    condition: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    spec: str,
    d_model: int,
    num_threads: Optional[int],
) -> torch.Tensor:
    schema, features, (weight, bias), options = _weights(spec, weights)
    embedding = _core.SpadeEmbedding(schema, features, weight, bias, None, **options)
    out = torch.empty((*_leading(ids, values), d_model), dtype=torch.float32)
    embedding.forward(ids, values, out, condition, num_threads=num_threads)
    return out


@_spade_embedding_op.register_fake
def _(ids, values, condition, weights, spec, d_model, num_threads):
    like = ids if ids is not None else values
    return like.new_empty((like.shape[0], like.shape[1], d_model), dtype=torch.float32)


@torch.library.custom_op("foveal::spade_embedding_backward", mutates_args=())
def _spade_embedding_backward_op(
    ids: Optional[torch.Tensor],
    values: Optional[torch.Tensor],
    condition: Optional[torch.Tensor],
    weights: list[torch.Tensor],
    grad_out: torch.Tensor,
    spec: str,
    num_threads: Optional[int],
) -> list[torch.Tensor]:
    schema, features, (weight, bias), options = _weights(spec, weights)
    grads = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
    _, keys, _ = _unpack(spec)
    grad_features, at = {}, 0
    for name, feature_keys in keys["features"]:
        grad_features[name] = {key: grads[at + i] for i, key in enumerate(feature_keys)}
        at += len(feature_keys)
    grad_projection = [None, None]
    for i, key in enumerate(keys["projection"]):
        grad_projection[("weight", "bias").index(key)] = grads[at + i]
    grad_condition = None
    if condition is not None:
        grad_condition = torch.empty(condition.shape, dtype=torch.float32)
    _core.spade_embedding_backward(
        schema, features, weight, bias, ids, values, condition, grad_out.contiguous(),
        grad_features, *grad_projection, grad_condition, num_threads=num_threads, **options,
    )  # fmt: skip
    return [*grads, grad_condition if condition is not None else grad_out.new_empty(0)]


@_spade_embedding_backward_op.register_fake
def _(ids, values, condition, weights, grad_out, spec, num_threads):
    grads = [torch.empty_like(w) for w in weights]
    return [*grads, torch.empty_like(condition) if condition is not None else grad_out.new_empty(0)]


def _setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ids, values, condition, weights, spec, _d_model, num_threads = inputs
    ctx.save_for_backward(ids, values, condition, *weights)
    ctx.spec, ctx.num_threads = spec, num_threads


def _backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
    ids, values, condition, *weights = ctx.saved_tensors
    grads = _spade_embedding_backward_op(
        ids, values, condition, weights, grad_out, ctx.spec, ctx.num_threads
    )
    grad_condition = grads[-1] if condition is not None else None
    return None, None, grad_condition, list(grads[:-1]), None, None, None


_spade_embedding_op.register_autograd(_backward, setup_context=_setup_context)


class _Feature(nn.Module):
    """One feature's embedding: ``table`` (+ ``norm``) or ``mlp``."""

    def __init__(self, discrete: bool, vocab_size: int, width: int, hidden: int, layer_norm: bool):
        super().__init__()
        if discrete:
            self.table = nn.Embedding(vocab_size, width)
            self.norm = nn.LayerNorm(width) if layer_norm else None
        else:
            self.mlp = nn.Sequential(nn.Linear(1, hidden), nn.SiLU(), nn.Linear(hidden, width))


class SpadeEmbedding(nn.Module):
    """The SPADE split-and-delay input embedding (docs/spade.md), trainable.

    ``schema`` (``foveal.spade.Schema``) lists the token features. Per discrete feature an
    ``nn.Embedding(vocab_size, embedding_dim)`` table, followed by a ``LayerNorm`` when
    ``layer_norm``; per continuous feature ``Linear(1, hidden) - SiLU - Linear(hidden,
    embedding_dim)``. ``embedding_dim`` is one width E for every feature or a dict giving each
    feature's. ``combine="concat"`` (SPADE): ``out = projection(cat(e_0, ..., e_{F-1},
    condition))`` with ``projection = nn.Linear(sum E + condition_dim, d_model, bias=bias)``;
    ``combine="sum"`` (MusicGen): ``out = sum_f e_f`` with every width ``d_model``, no
    projection, no condition. Steps whose discrete ids are all PAD give zeros (and no
    gradient).

    Shapes: ``ids`` int64 ``[B, T, Fd]`` and ``values`` float32 ``[B, T, Fc]`` (delayed tokens,
    e.g. from :meth:`delay`; either may be None when the schema has no such features),
    ``condition`` float32 ``[B, T, C]`` (C = ``condition_dim``) or None -> float32
    ``[B, T, d_model]``. Differentiable in every parameter and in ``condition``. Parameters are
    float32 (the C++ embedding computes in float32); gradients are bitwise identical for any
    thread count (``num_threads``, default ``foveal.get_num_threads()``).

    Bad inputs raise before anything runs: a non-tensor or wrong dtype is a ``TypeError``, a
    wrong shape, an id outside its vocabulary or a non-finite value a ``ValueError`` that names
    the argument (and, for tokens, the feature and position).
    """

    def __init__(
        self,
        schema: _spade.Schema,
        d_model: int,
        *,
        embedding_dim: Union[int, Mapping[str, int]] = 16,
        hidden: int = 16,
        layer_norm: bool = False,
        combine: str = "concat",
        condition_dim: int = 0,
        bias: bool = True,
        norm_eps: float = 1e-5,
        num_threads: Optional[int] = None,
    ) -> None:
        super().__init__()
        owner = "SpadeEmbedding"
        if not isinstance(schema, _spade.Schema):
            raise TypeError(
                f"foveal: {owner}: schema must be a foveal.spade.Schema, "
                f"got {type(schema).__name__}"
            )
        names = [f.name for f in schema.features]
        if isinstance(embedding_dim, Mapping):
            if set(embedding_dim) != set(names):
                raise ValueError(
                    f"foveal: {owner}: embedding_dim must map every feature {names} to its width, "
                    f"got keys {sorted(embedding_dim)}"
                )
            widths = dict(embedding_dim)
        else:
            widths = {name: embedding_dim for name in names}
        checked = [("d_model", d_model), ("hidden", hidden)]
        checked += [(f"embedding_dim[{name!r}]", width) for name, width in widths.items()]
        for name, value in checked:
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"foveal: {owner}: {name} must be an int >= 1, got {value!r}")
        if combine not in _COMBINES:
            raise ValueError(
                f"foveal: {owner}: combine must be one of {_COMBINES}, got {combine!r}"
            )
        if (
            isinstance(condition_dim, bool)
            or not isinstance(condition_dim, int)
            or condition_dim < 0
        ):
            raise ValueError(
                f"foveal: {owner}: condition_dim must be an int >= 0, got {condition_dim!r}"
            )
        if combine == "sum" and condition_dim:
            raise ValueError(f"foveal: {owner}: combine='sum' takes no condition (condition_dim=0)")
        if not norm_eps > 0.0:
            raise ValueError(f"foveal: {owner}: norm_eps must be > 0, got {norm_eps!r}")
        if combine == "sum":
            widths = {name: d_model for name in names}
        self.schema, self.d_model, self.combine = schema, d_model, combine
        self.condition_dim, self.num_threads = condition_dim, num_threads
        self.features = nn.ModuleDict(
            {
                feature.name: _Feature(
                    feature.discrete, feature.vocab_size, widths[feature.name], hidden, layer_norm
                )
                for feature in schema.features
            }
        )
        self.projection = None
        if combine == "concat":
            inputs = sum(widths.values()) + condition_dim
            self.projection = nn.Linear(inputs, d_model, bias=bias)
        self._spec = json.dumps(
            {
                "features": [
                    {
                        "name": f.name,
                        "kind": f.kind,
                        "vocab_size": f.vocab_size,
                        "pad_id": f.pad_id,
                        "missing_id": f.missing_id,
                        "shift": f.shift,
                    }
                    for f in schema.features
                ],
                "keys": self._keys(),
                "options": {
                    "combine": combine,
                    "condition_dim": condition_dim,
                    "norm_eps": float(norm_eps),
                },
            },
            sort_keys=True,
        )

    def _keys(self) -> dict:
        """The parameter keys of the core API, in the order of :meth:`_parameters_in_order`."""
        features = []
        for name, feature in self.features.items():
            if hasattr(feature, "table"):
                keys = ["table"] + (
                    ["norm_weight", "norm_bias"] if feature.norm is not None else []
                )
            else:
                keys = ["hidden_weight", "hidden_bias", "output_weight", "output_bias"]
            features.append([name, keys])
        projection = []
        if self.projection is not None:
            projection = ["weight"] + (["bias"] if self.projection.bias is not None else [])
        return {"features": features, "projection": projection}

    def _parameters_in_order(self) -> list:
        tensors = []
        for feature in self.features.values():
            if hasattr(feature, "table"):
                tensors.append(feature.table.weight)
                if feature.norm is not None:
                    tensors += [feature.norm.weight, feature.norm.bias]
            else:
                first, _, second = feature.mlp
                tensors += [first.weight, first.bias, second.weight, second.bias]
        if self.projection is not None:
            tensors.append(self.projection.weight)
            if self.projection.bias is not None:
                tensors.append(self.projection.bias)
        return tensors

    def _check_inputs(self, ids: Any, values: Any, condition: Any) -> tuple:
        owner = "SpadeEmbedding"
        counts = {"ids": len(self.schema.discrete), "values": len(self.schema.continuous)}
        dtypes = {"ids": torch.int64, "values": torch.float32, "condition": torch.float32}
        given = {"ids": ids, "values": values, "condition": condition}
        for name, tensor in given.items():
            if tensor is None:
                if name != "condition" and counts[name] > 0:
                    raise TypeError(
                        f"foveal: {owner}: {name} must be given: the schema has {counts[name]} "
                        f"{'discrete' if name == 'ids' else 'continuous'} features"
                    )
                continue
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(
                    f"foveal: {owner}: {name} must be a torch tensor, got {type(tensor).__name__}"
                )
            if tensor.dtype != dtypes[name]:
                raise TypeError(
                    f"foveal: {owner}: {name} must be {dtypes[name]}, got {tensor.dtype}"
                )
        if torch.compiler.is_compiling():
            return ids, values, condition
        leading = None
        for name in ("ids", "values"):
            tensor = given[name]
            if tensor is None:
                continue
            if tensor.dim() != 3 or tensor.shape[2] != counts[name]:
                letter = "Fd" if name == "ids" else "Fc"
                raise ValueError(
                    f"foveal: {owner}: {name} must have shape [B, T, {letter}] with {letter} = "
                    f"{counts[name]}, got {list(tensor.shape)}"
                )
            if leading is not None and tuple(tensor.shape[:2]) != leading:
                raise ValueError(
                    f"foveal: {owner}: values must have the same [B, T] as ids {list(leading)}, "
                    f"got {list(tensor.shape[:2])}"
                )
            leading = tuple(tensor.shape[:2])
        if condition is not None:
            if self.condition_dim == 0:
                raise ValueError(f"foveal: {owner}: condition given but condition_dim is 0")
            if condition.dim() != 3 or tuple(condition.shape) != (*leading, self.condition_dim):
                raise ValueError(
                    f"foveal: {owner}: condition must have shape [B, T, C] = "
                    f"{[*leading, self.condition_dim]}, got {list(condition.shape)}"
                )
        elif self.condition_dim > 0:
            raise ValueError(
                f"foveal: {owner}: condition [B, T, {self.condition_dim}] must be given"
            )
        for tensor in self._parameters_in_order():
            if tensor.dtype != torch.float32:
                raise TypeError(
                    f"foveal: {owner}: parameters must be float32 (the C++ embedding computes in "
                    f"float32), got {tensor.dtype}"
                )
        return ids, values, condition

    def forward(
        self,
        ids: Optional[torch.Tensor],
        values: Optional[torch.Tensor] = None,
        condition: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """ids int64 ``[B, T, Fd]``, values float32 ``[B, T, Fc]``, condition float32
        ``[B, T, C]`` or None -> float32 ``[B, T, d_model]``."""
        ids, values, condition = self._check_inputs(ids, values, condition)
        return _spade_embedding_op(
            ids, values, condition, self._parameters_in_order(), self._spec, self.d_model,
            self.num_threads,
        )  # fmt: skip

    # Delay, undelay and the training masks, on torch tensors (foveal.spade's functions with
    # this module's schema; results are torch tensors).

    def delay(self, ids: Any, values: Any, lengths: Any = None) -> tuple:
        """Tokens ``[B, n, Fd]`` / ``[B, n, Fc]`` (lengths ``[B]``, default all n) -> delayed
        ``ids [B, T, Fd]``, ``values [B, T, Fc]``, ``mask [B, T, F]`` (T = n + max shift)."""
        return _spade.delay(self.schema, ids, values, lengths)

    def undelay(self, delayed_ids: Any, delayed_values: Any) -> tuple:
        """Delayed ``[B, T, ...]`` -> tokens ``[B, T - max shift, ...]``."""
        return _spade.undelay(self.schema, delayed_ids, delayed_values)

    def loss_mask(self, lengths: Any, num_steps: int, *, include_stop: bool = False) -> Any:
        """The loss mask ``[B, num_steps - 1, F]``: the validity of each target step
        (docs/spade.md, Training)."""
        return _spade.loss_mask(self.schema, lengths, num_steps, include_stop=include_stop)

    def extra_repr(self) -> str:
        return (
            f"features={[f.name for f in self.schema.features]}, d_model={self.d_model}, "
            f"combine={self.combine!r}, condition_dim={self.condition_dim}"
        )
