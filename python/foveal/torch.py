"""foveal operators for torch autograd (imports torch; only for users who have it).

``attention(q, k, v, ...)`` and ``sliding_window_attention(q, k, v, ...)`` are
``foveal.attention`` / ``foveal.sliding_window_attention`` differentiable in q, k and v
(``foveal.attention_backward``); ``sparsek_attention(q, k, v, u, topk, ...)`` is
``foveal.sparsek.sparsek_attention`` differentiable in q, k, v and the scores u
(``foveal.sparsek.sparsek_attention_backward``); ``sparsek(z, k)`` is the SPARSEK projection
differentiable in z. Their gradients are deterministic: bitwise identical for any thread count.
Each is a torch.library custom op (``torch.ops.foveal.attention``, ``.sparsek_attention``,
``.sparsek``, with their backward ops) with a fake implementation and registered autograd, so
``torch.compile(fullgraph=True)`` traces them without graph breaks.

``pde_ssm(x, diffusion, velocity, reaction, time, skip)`` is the PDE-SSM block
(``foveal.pde_ssm``) differentiable in the input and every parameter, as an autograd.Function:
each call builds the block's multiplier once and its backward reuses it (not yet a custom op:
torch.compile breaks the graph there).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import foveal as _foveal

from . import _core
from . import pde_ssm as _pde_ssm
from . import sparsek as _sparsek
from ._common import attention_options

__all__ = [
    "PdeSsm",
    "SparseK",
    "attention",
    "pde_ssm",
    "sliding_window_attention",
    "sparsek",
    "sparsek_attention",
]


# Attention as torch.library custom ops: torch.compile traces them as single nodes (their fake
# implementations give the output shapes) and autograd reaches the backward op, so a compiled
# model runs foveal's kernels forward and backward without graph breaks.


@torch.library.custom_op("foveal::attention", mutates_args=())
def _attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: Optional[torch.Tensor],
    sliding: bool,
    scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    sink_tokens: int,
    softcap: float,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    keywords = attention_options(locals())
    q, k, v = q.detach(), k.detach(), v.detach()
    if sliding:
        return _foveal.sliding_window_attention(q, k, v, return_lse=True, **keywords)
    bias = None if bias is None else bias.detach()
    return _foveal.attention(q, k, v, bias=bias, return_lse=True, **keywords)


@_attention_op.register_fake
def _(q, k, v, bias, sliding, scale, causal, wl, wr, sinks, softcap, q_offset, threads):
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    return out, q.new_empty(q.shape[:3])


@torch.library.custom_op("foveal::attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    bias: Optional[torch.Tensor],
    sliding: bool,
    scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    sink_tokens: int,
    softcap: float,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keywords = attention_options(locals())
    tensors = [t.detach() for t in (q, k, v, out, lse)]
    # Autograd may hand over an expanded (stride-0) gradient: the kernel reads unit rows.
    grad_out = grad_out.detach().contiguous()
    if sliding:
        return _foveal.sliding_window_attention_backward(*tensors, grad_out, **keywords)
    bias = None if bias is None else bias.detach()
    return _foveal.attention_backward(*tensors, grad_out, bias=bias, **keywords)


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, bias, sliding, *options):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))  # contiguous, as the op returns


def _attention_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, bias, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias)
    ctx.options = options


def _attention_backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple:
    q, k, v, out, lse, bias = ctx.saved_tensors
    grads = _attention_backward_op(q, k, v, out, lse, grad_out, bias, *ctx.options)
    return (*grads, None, *(None for _ in ctx.options))


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _checked_options(function: str, options: dict) -> dict:
    """The options with their types checked (the custom ops' schema would raise RuntimeError);
    under torch.compile they are the traced program's constants and go to the op as they are."""
    if torch.compiler.is_compiling():
        return options
    return _core.attention_options(function, **options)


def _no_bias_gradient(bias: Optional[torch.Tensor]) -> None:
    if bias is not None and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "foveal: attention: bias requires grad, but foveal computes no bias gradient yet: "
            "pass bias.detach()"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    bias: Optional[torch.Tensor] = None,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``foveal.attention`` differentiable in q, k and v (the arguments are the same; bias gets
    no gradient)."""
    _no_bias_gradient(bias)
    options = _checked_options("attention", attention_options(locals()))
    return _attention_op(q, k, v, bias, False, **options)[0]


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window_left: int,
    window_right: int = -1,
    causal: bool = False,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``foveal.sliding_window_attention`` differentiable in q, k and v."""
    options = _checked_options("sliding_window_attention", attention_options(locals()))
    return _attention_op(q, k, v, None, True, **options)[0]


# SparseK attention as custom ops, differentiable in q, k, v and the scores u.

_SPARSEK_OPTIONS = ("topk", "window", "gate", "sink_tokens", "causal", "scale", "softcap")


@torch.library.custom_op("foveal::sparsek_attention", mutates_args=())
def _sparsek_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    topk: int,
    window: int,
    gate: str,
    sink_tokens: int,
    causal: bool,
    scale: Optional[float],
    softcap: float,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, u = (t.detach() for t in (q, k, v, u))
    options = {name: value for name, value in locals().items() if name not in ("q", "k", "v", "u")}
    return _sparsek.sparsek_attention(q, k, v, u, return_lse=True, **options)


@_sparsek_attention_op.register_fake
def _(q, k, v, u, *options):
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3])


@torch.library.custom_op("foveal::sparsek_attention_backward", mutates_args=())
def _sparsek_attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    score_grad: bool,
    topk: int,
    window: int,
    gate: str,
    sink_tokens: int,
    causal: bool,
    scale: Optional[float],
    softcap: float,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    tensors = [t.detach() for t in (q, k, v, u, out, lse)]
    # Autograd may hand over an expanded (stride-0) gradient: the kernel reads unit rows.
    grad_out = grad_out.detach().contiguous()
    options = {
        name: value
        for name, value in locals().items()
        if name in (*_SPARSEK_OPTIONS, "q_offset", "num_threads", "score_grad")
    }
    grad_q, grad_k, grad_v, grad_u = _sparsek.sparsek_attention_backward(
        *tensors, grad_out, **options
    )
    return grad_q, grad_k, grad_v, torch.zeros_like(u) if grad_u is None else grad_u


@_sparsek_attention_backward_op.register_fake
def _(q, k, v, u, out, lse, grad_out, *options):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, u))  # contiguous, as the op returns


def _sparsek_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, u, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, u, out, lse)
    ctx.options = options


def _sparsek_backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple:
    q, k, v, u, out, lse = ctx.saved_tensors
    score_grad = ctx.needs_input_grad[3]
    grads = _sparsek_attention_backward_op(q, k, v, u, out, lse, grad_out, score_grad, *ctx.options)
    return (*grads[:3], grads[3] if score_grad else None, *(None for _ in ctx.options))


_sparsek_attention_op.register_autograd(_sparsek_backward, setup_context=_sparsek_setup_context)


def sparsek_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    topk: int,
    *,
    window: int = 0,
    sink_tokens: int = 0,
    gate: str = "value",
    causal: bool = True,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``foveal.sparsek.sparsek_attention`` differentiable in q, k, v and the scores u (the
    arguments are the same): the scores' gradient flows through the SPARSEK gates, so a scorer
    such as ``foveal.sparsek.linear_scores`` (or any torch module producing u) trains."""
    options = {name: value for name, value in locals().items() if name not in ("q", "k", "v", "u")}
    if not torch.compiler.is_compiling():
        options = _core.sparsek_options("sparsek_attention", **options)
    return _sparsek_attention_op(q, k, v, u, **options)[0]


# The SPARSEK projection as custom ops.


@torch.library.custom_op("foveal::sparsek", mutates_args=())
def _sparsek_op(z: torch.Tensor, k: int, num_threads: Optional[int]) -> torch.Tensor:
    return _sparsek.sparsek(z.detach(), k, num_threads=num_threads)


@_sparsek_op.register_fake
def _(z, k, num_threads):
    return z.new_empty(z.shape)


@torch.library.custom_op("foveal::sparsek_backward", mutates_args=())
def _sparsek_backward_op(
    p: torch.Tensor, grad_p: torch.Tensor, num_threads: Optional[int]
) -> torch.Tensor:
    return _sparsek.sparsek_backward(p.detach(), grad_p.detach(), num_threads=num_threads)


@_sparsek_backward_op.register_fake
def _(p, grad_p, num_threads):
    return p.new_empty(p.shape)


def _sparsek_projection_setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
    ctx.save_for_backward(output)
    ctx.num_threads = inputs[2]


def _sparsek_projection_backward(ctx: Any, grad_p: torch.Tensor) -> tuple:
    (p,) = ctx.saved_tensors
    return _sparsek_backward_op(p, grad_p, ctx.num_threads), None, None


_sparsek_op.register_autograd(
    _sparsek_projection_backward, setup_context=_sparsek_projection_setup_context
)


def sparsek(z: torch.Tensor, k: int, *, num_threads: Optional[int] = None) -> torch.Tensor:
    """z: [..., n]  ->  p: [..., n] = SPARSEK(z, k) per row (``foveal.sparsek.sparsek``),
    differentiable in z: ``grad_z = 1_F * (grad_p - mean_F(grad_p))`` with F = {0 < p < 1}.
    The custom op ``foveal::sparsek`` with its backward op registered for autograd."""
    if not torch.compiler.is_compiling():
        options = _core.sparsek_projection_options(k=k, num_threads=num_threads)
        k, num_threads = options["k"], options["num_threads"]
    return _sparsek_op(z, k, num_threads)


class SparseK:
    """``SparseK.apply(z, k)``: the same as :func:`sparsek` (kept for code written against the
    earlier autograd.Function)."""

    apply = staticmethod(sparsek)


class PdeSsm(torch.autograd.Function):
    """x: [B, H, W, C] (or [B, C, H, W] with layout="channels_first") and the block's
    parameters  ->  y (``foveal.pde_ssm.pde_ssm``); backward
    ``foveal.pde_ssm.PdeSsm.backward`` on the block the forward built."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        diffusion: torch.Tensor,
        velocity: torch.Tensor,
        reaction: torch.Tensor,
        time: torch.Tensor,
        skip: Optional[torch.Tensor],
        options: dict,
    ) -> torch.Tensor:
        layout = options.get("layout", "channels_last")
        block_options = {key: value for key, value in options.items() if key != "layout"}
        grid = x.shape[1:] if layout == "channels_last" else (*x.shape[2:], x.shape[1])
        # Parameters may also be numbers or lists (no gradient flows to them).
        parameters = [
            p.detach() if isinstance(p, torch.Tensor) else p
            for p in (diffusion, velocity, reaction, time, skip)
        ]
        block = _pde_ssm.PdeSsm(*grid, *parameters, dtype=_numpy_dtype(x), **block_options)
        ctx.block, ctx.layout = block, layout
        ctx.save_for_backward(x)
        return block.forward(x.detach(), layout=layout)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = ctx.block.backward(
            x.detach(),
            grad_out.detach(),
            layout=ctx.layout,
            input_grad=needs[0],
            parameter_grads=any(needs[1:6]),
        )
        return (
            grads.x if needs[0] else None,
            *(gradient if need else None for gradient, need in zip(grads[1:], needs[1:6])),
            None,
        )


def _numpy_dtype(x: torch.Tensor) -> str:
    return "float64" if x.dtype == torch.float64 else "float32"


def pde_ssm(
    x: torch.Tensor,
    diffusion: torch.Tensor,
    velocity: torch.Tensor,
    reaction: torch.Tensor,
    time: torch.Tensor,
    skip: Optional[torch.Tensor] = None,
    *,
    mode: str = "initial_value",
    boundary: str = "periodic",
    diffusion_form: str = "cholesky",
    layout: str = "channels_last",
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """x: [B, H, W, C] (or [B, C, H, W])  ->  y, differentiable in x and every parameter
    (see ``PdeSsm``; the arguments are those of ``foveal.pde_ssm.pde_ssm``)."""
    options = dict(
        mode=mode,
        boundary=boundary,
        diffusion_form=diffusion_form,
        layout=layout,
        num_threads=num_threads,
    )
    return PdeSsm.apply(x, diffusion, velocity, reaction, time, skip, options)
