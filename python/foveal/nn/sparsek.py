"""Causal self-attention layers on foveal's kernels: :class:`SparseKAttention` (SparseK, with a
learned linear scorer and a constant-memory decode path) and its :class:`DenseAttention` twin.

Shapes: ``x`` ``[B, L, d_model]`` -> ``[B, L, d_model]``. Heads: ``num_heads`` query heads of
``head_dim = d_model // num_heads`` and ``num_kv_heads`` key/value heads (grouped-query attention:
``num_heads`` a multiple of ``num_kv_heads``). Rotary position embedding (``rotary=True``) rotates
the pairs ``(i, i + head_dim / 2)`` of q and k by ``position · base^(-2i / head_dim)``.

SparseK (docs/sparsek.md): the scorer ``u[b, h, j] = x[b, j] · w[h]`` (one weight row per kv head)
ranks the keys; the query at position p attends to the ``topk`` best-scored keys of its pool
``sink_tokens <= j <= p - window`` weighted by their SPARSEK gates, plus the last ``window`` keys
and the first ``sink_tokens`` keys. ``w`` is trained by the scores' gradient of
``foveal.torch.sparsek_attention`` (through the gates).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from foveal import sparsek as _sparsek
from foveal._common import HALF_DTYPES, dtype_name

__all__ = ["DenseAttention", "DeterministicLinear", "SparseKAttention"]

_GATES = ("value", "kv", "none")
_MODES = ("sparsek", "dense", "window")


def _check_int(owner: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"foveal: {owner}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"foveal: {owner}: {name} must be >= {minimum}, got {value}")
    return value


def rotary_tables(
    offset: int, length: int, dim: int, base: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) ``[length, dim / 2]`` of the angles ``(offset + t) · base^(-2i / dim)``,
    computed in float64 and rounded to ``dtype``."""
    exponents = torch.arange(dim // 2, dtype=torch.float64) * (-2.0 / dim)
    frequencies = torch.pow(torch.tensor(base, dtype=torch.float64), exponents)
    positions = torch.arange(offset, offset + length, dtype=torch.float64)
    angles = positions[:, None] * frequencies[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_embedding(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x ``[B, H, L, D]`` with the pairs ``(i, i + D/2)`` of each position rotated by the angles
    of :func:`rotary_tables`."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def _tree_sum(parts: torch.Tensor) -> torch.Tensor:
    """parts [n, ...] -> their sum, added pairwise in a fixed order (elementwise adds only)."""
    while parts.shape[0] > 1:
        half = parts.shape[0] // 2
        head = parts[:half] + parts[half : 2 * half]
        parts = torch.cat((head, parts[2 * half :])) if parts.shape[0] % 2 else head
    return parts[0]


_CHUNK = 512  # rows per partial product of a weight gradient


class _LinearFunction(torch.autograd.Function):
    """y = x Wᵀ (+ b) whose weight and bias gradients reduce over the rows in fixed chunks of
    _CHUNK rows (one small matrix product each, batched) added pairwise: the bits do not depend
    on the thread count, which a single large torch product over all rows does not promise."""

    @staticmethod
    def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        y = torch.matmul(x, weight.t())
        return y if bias is None else y + bias

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad_x = torch.matmul(grad_y, weight) if ctx.needs_input_grad[0] else None
        rows_g = grad_y.reshape(-1, grad_y.shape[-1])
        rows_x = x.reshape(-1, x.shape[-1])
        padding = (-rows_g.shape[0]) % _CHUNK
        if padding:
            rows_g = torch.cat((rows_g, rows_g.new_zeros(padding, rows_g.shape[1])))
            rows_x = torch.cat((rows_x, rows_x.new_zeros(padding, rows_x.shape[1])))
        chunks_g = rows_g.view(-1, _CHUNK, rows_g.shape[1])
        chunks_x = rows_x.view(-1, _CHUNK, rows_x.shape[1])
        grad_weight = _tree_sum(torch.bmm(chunks_g.transpose(1, 2), chunks_x))
        grad_bias = _tree_sum(chunks_g.sum(dim=1)) if ctx.has_bias else None
        return grad_x, grad_weight, grad_bias


class DeterministicLinear(nn.Linear):
    """``torch.nn.Linear`` (same parameters, same forward) whose weight and bias gradients are
    bitwise identical for any thread count (see ``_LinearFunction``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LinearFunction.apply(x, self.weight, self.bias)


class _CausalAttention(nn.Module):
    """The projections, rotary embedding and input checks shared by both layers."""

    _name = "attention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        rotary: bool,
        rotary_base: float,
        bias: bool,
        num_threads: Optional[int],
        dtype: Optional[torch.dtype],
    ) -> None:
        super().__init__()
        self.num_threads = num_threads
        owner = self._name
        _check_int(owner, "d_model", d_model, 1)
        _check_int(owner, "num_heads", num_heads, 1)
        _check_int(owner, "num_kv_heads", num_kv_heads, 1)
        if d_model % num_heads:
            raise ValueError(
                f"foveal: {owner}: d_model ({d_model}) must be a multiple of num_heads "
                f"({num_heads})"
            )
        if num_heads % num_kv_heads:
            raise ValueError(
                f"foveal: {owner}: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                f"({num_kv_heads})"
            )
        head_dim = d_model // num_heads
        if rotary and head_dim % 2:
            raise ValueError(
                f"foveal: {owner}: rotary needs an even head_dim = d_model / num_heads, got "
                f"{head_dim}"
            )
        self.d_model, self.num_heads, self.num_kv_heads = d_model, num_heads, num_kv_heads
        self.head_dim, self.rotary, self.rotary_base = head_dim, bool(rotary), float(rotary_base)
        kv_dim = num_kv_heads * head_dim
        self.q_proj = DeterministicLinear(d_model, d_model, bias=bias, dtype=dtype)
        self.k_proj = DeterministicLinear(d_model, kv_dim, bias=bias, dtype=dtype)
        self.v_proj = DeterministicLinear(d_model, kv_dim, bias=bias, dtype=dtype)
        self.o_proj = DeterministicLinear(d_model, d_model, bias=bias, dtype=dtype)

    def _check_input(self, x: object) -> torch.Tensor:
        """Rejects x by name before any parameter is read (eager only: under torch.compile the
        shapes are the traced program's)."""
        owner = self._name
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"foveal: {owner}: x must be a torch tensor, got {type(x).__name__}")
        if torch.compiler.is_compiling():
            return x
        dtype = self.q_proj.weight.dtype
        if x.dtype != dtype:
            raise TypeError(
                f"foveal: {owner}: x must have the parameters' dtype {dtype}, got {x.dtype}"
            )
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(
                f"foveal: {owner}: x must have shape [B, L, {self.d_model}] (d_model="
                f"{self.d_model}), got {list(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"foveal: {owner}: x must be finite (it holds NaN or inf)")
        return x

    def _heads(self, x: torch.Tensor, offset: int) -> tuple:
        """x [B, L, d_model] -> q [B, Hq, L, D], k and v [B, Hkv, L, D] (rotary applied)."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.rotary:
            tables = rotary_tables(offset, length, self.head_dim, self.rotary_base, q.dtype)
            q, k = rotary_embedding(q, *tables), rotary_embedding(k, *tables)
        return q.contiguous(), k.contiguous(), v.contiguous()

    def _merge(self, out: torch.Tensor) -> torch.Tensor:
        """out [B, Hq, L, D] -> o_proj of [B, L, d_model]."""
        batch, _, length, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, self.d_model))


class DenseAttention(_CausalAttention):
    """Causal multi-head attention (``foveal.torch.attention``, or
    ``foveal.torch.sliding_window_attention`` over the last ``window`` keys when ``window > 0``)
    with the same projections and rotary embedding as :class:`SparseKAttention`: its dense twin
    (``DenseAttention.from_sparsek(layer)`` copies the weights). ``causal=False``: every query
    sees every key (``window`` must be 0), e.g. over the tokens of an image.

    ``x`` ``[B, L, d_model]`` -> ``[B, L, d_model]``."""

    _name = "DenseAttention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: Optional[int] = None,
        *,
        window: int = 0,
        causal: bool = True,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        bias: bool = False,
        num_threads: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        shared = (rotary, rotary_base, bias, num_threads, dtype)
        super().__init__(d_model, num_heads, num_kv_heads, *shared)
        self.window = _check_int(self._name, "window", window, 0)
        if not isinstance(causal, bool):
            raise TypeError(f"foveal: {self._name}: causal must be a bool, got {causal!r}")
        if window and not causal:
            raise ValueError(f"foveal: {self._name}: window must be 0 when causal is False")
        self.causal = causal

    @classmethod
    def from_sparsek(cls, layer: "SparseKAttention", window: int = 0) -> "DenseAttention":
        """A DenseAttention with the projections of ``layer`` (copies; the scorer is dropped)."""
        twin = cls(
            layer.d_model,
            layer.num_heads,
            layer.num_kv_heads,
            window=window,
            rotary=layer.rotary,
            rotary_base=layer.rotary_base,
            bias=layer.q_proj.bias is not None,
            num_threads=layer.num_threads,
            dtype=layer.q_proj.weight.dtype,
        )
        twin.load_state_dict(layer.state_dict(), strict=False)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        q, k, v = self._heads(x, 0)
        if self.window > 0:
            out = _foveal_torch.sliding_window_attention(
                q, k, v, window_left=self.window - 1, causal=True, num_threads=self.num_threads
            )
        else:
            out = _foveal_torch.attention(q, k, v, causal=self.causal, num_threads=self.num_threads)
        return self._merge(out)


class SparseKAttention(_CausalAttention):
    """Causal SparseK self-attention (``foveal.torch.sparsek_attention``) with q/k/v/o
    projections, optional rotary embedding and the linear scorer ``u = x · wᵀ``
    (``score_weight`` ``[num_kv_heads, d_model]``, trained through the scores' gradient).

    ``forward(x)``: ``x`` ``[B, L, d_model]`` -> ``[B, L, d_model]`` (training and prefill).
    Decode: ``cache = layer.new_cache(batch)`` (a ``foveal.sparsek.SparseKCache`` holding
    ``sink_tokens + window + topk`` rows per sequence and kv head, whatever the length), then
    ``layer.decode(x_new, cache)`` with ``x_new`` ``[B, n, d_model]`` the next n tokens ->
    ``[B, n, d_model]``, the rows ``forward`` gives for those positions (to rounding).

    ``gate``: ``"value"`` / ``"kv"`` / ``"none"`` (docs/sparsek.md). ``score_init_std``: the
    scorer's initial weights are N(0, score_init_std² / d_model), so that scores of unit-size
    inputs spread over about ``score_init_std`` (SPARSEK gates are fractional within 1 of the
    threshold). :class:`DenseAttention` ``.from_sparsek(layer)`` is the dense twin with the same
    weights.
    """

    _name = "SparseKAttention"

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_kv_heads: int,
        topk: int,
        window: int = 0,
        sink_tokens: int = 0,
        gate: str = "value",
        *,
        rotary: bool = True,
        rotary_base: float = 10000.0,
        bias: bool = False,
        score_init_std: float = 1.0,
        num_threads: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        shared = (rotary, rotary_base, bias, num_threads, dtype)
        super().__init__(d_model, num_heads, num_kv_heads, *shared)
        owner = self._name
        self.topk = _check_int(owner, "topk", topk, 1)
        self.window = _check_int(owner, "window", window, 0)
        self.sink_tokens = _check_int(owner, "sink_tokens", sink_tokens, 0)
        if gate not in _GATES:
            raise ValueError(f"foveal: {owner}: gate must be one of {_GATES}, got {gate!r}")
        self.gate = gate
        self.score_init_std = float(score_init_std)
        self.score_weight = nn.Parameter(torch.empty(num_kv_heads, d_model, dtype=dtype))
        self.reset_scorer()

    def reset_scorer(self) -> None:
        """Draws the scorer's weights from N(0, score_init_std² / d_model)."""
        with torch.no_grad():
            self.score_weight.normal_(0.0, self.score_init_std / math.sqrt(self.d_model))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x ``[B, L, d_model]`` -> u ``[B, num_kv_heads, L]``."""
        return _LinearFunction.apply(x, self.score_weight, None).transpose(1, 2)

    def _options(self) -> dict:
        return dict(window=self.window, sink_tokens=self.sink_tokens, gate=self.gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        q, k, v = self._heads(x, 0)
        u = self.scores(x).contiguous()
        out = _foveal_torch.sparsek_attention(
            q, k, v, u, self.topk, causal=True, num_threads=self.num_threads, **self._options()
        )
        return self._merge(out)

    def new_cache(self, batch: int) -> _sparsek.SparseKCache:
        """An empty decode cache for ``batch`` sequences (the parameters' dtype)."""
        dtype = self.q_proj.weight.dtype
        name = dtype_name(dtype)
        if name not in ("float32", "float64", *HALF_DTYPES):
            raise TypeError(
                f"foveal: {self._name}: decode needs float32, float64, bfloat16 or float16, got "
                f"{dtype}"
            )
        return _sparsek.SparseKCache(
            batch,
            self.num_kv_heads,
            self.head_dim,
            topk=self.topk,
            dtype=name,
            num_threads=self.num_threads,
            **self._options(),
        )

    @torch.no_grad()
    def decode(self, x: torch.Tensor, cache: _sparsek.SparseKCache) -> torch.Tensor:
        """x ``[B, n, d_model]``: the next n tokens of the cache's sequences -> ``[B, n,
        d_model]``. Appends their keys, values and scores to ``cache`` one token at a time and
        attends with each token's query (no gradient)."""
        x = self._check_input(x)
        if not isinstance(cache, _sparsek.SparseKCache):
            raise TypeError(
                f"foveal: {self._name}: cache must be a foveal.sparsek.SparseKCache (from "
                f"new_cache), got {type(cache).__name__}"
            )
        expected = (
            x.shape[0],
            self.num_kv_heads,
            self.head_dim,
            self.topk,
            *self._options().values(),
        )
        got = (
            cache.batch,
            cache.heads_kv,
            cache.dim,
            cache.topk,
            cache.window,
            cache.sink_tokens,
            cache.gate,
        )
        if got != expected:
            raise ValueError(
                f"foveal: {self._name}: cache must match the layer and x (batch, heads_kv, dim, "
                f"topk, window, sink_tokens, gate) = {expected}, got {got}"
            )
        q, k, v = self._heads(x, cache.length)
        u = self.scores(x).contiguous()
        rows = []
        for t in range(x.shape[1]):
            step = slice(t, t + 1)
            cache.append(
                k[:, :, step].contiguous(), v[:, :, step].contiguous(), u[:, :, step].contiguous()
            )
            rows.append(cache.attend(q[:, :, step].contiguous()))
        return self._merge(torch.cat(rows, dim=2))


# Last: foveal.torch re-exports this module's classes at its end, so it may be importing this
# module right now; by this line everything it imports from here is defined.
from foveal import torch as _foveal_torch  # noqa: E402
