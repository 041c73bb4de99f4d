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

import itertools
import warnings
import weakref
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
    key_start: Optional[torch.Tensor],
    key_length: Optional[torch.Tensor],
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


_HALF = (torch.bfloat16, torch.float16)


@_attention_op.register_fake
def _(q, k, v, bias, starts, lengths, sliding, scale, causal, wl, wr, sinks, softcap, q_offset, n):
    out = q.new_empty((*q.shape[:3], v.shape[3]))
    lse_dtype = torch.float32 if q.dtype in _HALF else q.dtype  # 16-bit storage: lse float32
    return out, q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("foveal::attention_backward", mutates_args=())
def _attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    key_start: Optional[torch.Tensor],
    key_length: Optional[torch.Tensor],
    bias_grad: bool,
    sliding: bool,
    scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    sink_tokens: int,
    softcap: float,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    keywords = attention_options(locals())
    tensors = [t.detach() for t in (q, k, v, out, lse)]
    # Autograd may hand over an expanded (stride-0) gradient: the kernel reads unit rows.
    grad_out = grad_out.detach().contiguous()
    # lse's gradient in lse's dtype (float32 for 16-bit storage); any strides.
    grad_lse = None if grad_lse is None else grad_lse.detach().to(lse.dtype)
    bias = None if bias is None else bias.detach()
    dtypes = [t.dtype for t in (q, k, v)] + [bias.dtype if bias_grad else q.dtype]
    if q.dtype in _HALF:
        # 16-bit storage: the backward runs in float32 on widened copies (the values are exact
        # in float32), its gradients rounded to the inputs' dtype.
        tensors = [t.float() for t in tensors]
        grad_out = grad_out.float()
        bias = None if bias is None else bias.float()
    if sliding:
        grads = _foveal.sliding_window_attention_backward(
            *tensors, grad_out, grad_lse=grad_lse, **keywords
        )
        grads = (*grads, q.new_empty(0))
    elif not bias_grad:
        grads = _foveal.attention_backward(
            *tensors, grad_out, bias=bias, grad_lse=grad_lse, **keywords
        )
        grads = (*grads, q.new_empty(0))  # an op returns tensors: an empty one for no gradient
    else:
        grads = _foveal.attention_backward(
            *tensors, grad_out, bias=bias, return_bias_grad=True, grad_lse=grad_lse, **keywords
        )
    return tuple(grad.to(dtype) for grad, dtype in zip(grads, dtypes))


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, grad_out, grad_lse, bias, starts, lengths, bias_grad, sliding, *options):
    grads = tuple(t.new_empty(t.shape) for t in (q, k, v))  # contiguous, as the op returns
    return (*grads, bias.new_empty(bias.shape) if bias_grad else q.new_empty(0))


def _attention_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, bias, key_start, key_length, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, bias, key_start, key_length)
    ctx.options = options


def _attention_backward(ctx: Any, grad_out: torch.Tensor, grad_lse: torch.Tensor) -> tuple:
    # Autograd materializes both gradients (zeros for an output the loss does not read).
    q, k, v, out, lse, bias, key_start, key_length = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    grads = _attention_backward_op(
        q, k, v, out, lse, grad_out, grad_lse, bias, key_start, key_length, bias_grad, *ctx.options
    )
    bias_gradient = grads[3] if bias_grad else None
    return (*grads[:3], bias_gradient, None, None, *(None for _ in ctx.options))


_attention_op.register_autograd(_attention_backward, setup_context=_attention_setup_context)


def _checked_options(function: str, options: dict) -> tuple:
    """(key_start, key_length, the other options): the key ranges as int64 tensors (or None),
    the options with their types checked (the custom ops' schema would raise RuntimeError);
    under torch.compile they are the traced program's constants and go to the op as they are."""
    ranges = tuple(_index_tensor(function, name, options.pop(name)) for name in _KEY_RANGES)
    if torch.compiler.is_compiling():
        return (*ranges, options)
    return (*ranges, _core.attention_options(function, **options))


_KEY_RANGES = ("key_start", "key_length")


def _index_tensor(function: str, name: str, value: Any) -> Optional[torch.Tensor]:
    """value (None, a sequence of ints, an integer array or tensor) as a 1-D int64 CPU tensor;
    its shape and values are checked by the compiled call."""
    if value is None:
        return None
    try:
        tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as error:
        raise TypeError(
            f"foveal: {function}: {name} must be a sequence of 64-bit ints, got "
            f"{type(value).__name__} ({error})"
        ) from None
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise TypeError(
            f"foveal: {function}: {name} must be a sequence of ints, got {tensor.dtype} values"
        )
    return tensor.to(device="cpu", dtype=torch.int64)


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
    sink_logits: Optional[torch.Tensor] = None,
    key_start: Any = None,
    key_length: Any = None,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``foveal.attention`` differentiable in q, k, v and a float bias (the arguments are the
    same, variable-length ``key_start`` / ``key_length`` included; a bias that requires grad
    gets ``foveal.attention_backward``'s grad_bias).

    ``sink_logits`` ``[Hq]`` (optional; gpt-oss's learned sinks): one more logit per query head
    in every row's softmax denominator, a key no value stands for, so a row may give part of
    its attention to nothing: ``out_i = Σ_j e^(l_ij) v_j / (e^(s_h) + Σ_j e^(l_ij))``, which is
    the plain output times ``sigmoid(lse_i - s_h)``. Differentiable in ``sink_logits`` too (its
    gradient and the one it sends back through lse are exact, see
    ``foveal.attention_backward``'s ``grad_lse``)."""
    key_start, key_length, options = _checked_options("attention", attention_options(locals()))
    out, lse = _attention_op(q, k, v, bias, key_start, key_length, False, **options)
    return out if sink_logits is None else _with_sink_logits("attention", out, lse, sink_logits)


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
    sink_logits: Optional[torch.Tensor] = None,
    key_start: Any = None,
    key_length: Any = None,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``foveal.sliding_window_attention`` differentiable in q and k and v (and in
    ``sink_logits``, as in :func:`attention`; variable-length ``key_start`` / ``key_length``
    too)."""
    function = "sliding_window_attention"
    key_start, key_length, options = _checked_options(function, attention_options(locals()))
    out, lse = _attention_op(q, k, v, None, key_start, key_length, True, **options)
    if sink_logits is None:
        return out
    return _with_sink_logits("sliding_window_attention", out, lse, sink_logits)


def _with_sink_logits(
    function: str, out: torch.Tensor, lse: torch.Tensor, sink_logits: object
) -> torch.Tensor:
    """out [B, Hq, Lq, Dv] scaled by each row's share of a softmax that also holds the head's
    sink logit: sigmoid(lse - s_h), computed in lse's dtype (float32 for 16-bit outputs). A
    row that sees no key (lse = -inf) stays 0."""
    if not isinstance(sink_logits, torch.Tensor):
        raise TypeError(
            f"foveal: {function}: sink_logits must be a torch tensor, got "
            f"{type(sink_logits).__name__}"
        )
    if not torch.compiler.is_compiling():
        heads = out.shape[1]
        if sink_logits.dim() != 1 or sink_logits.shape[0] != heads:
            raise ValueError(
                f"foveal: {function}: sink_logits must have shape [Hq] = [{heads}] (one logit "
                f"per query head), got {list(sink_logits.shape)}"
            )
        if not sink_logits.is_floating_point():
            raise TypeError(
                f"foveal: {function}: sink_logits must be a float tensor, got {sink_logits.dtype}"
            )
        # Checked only when some row uses them: an empty output puts no bound on Hq, and a
        # broadcast sink_logits of 10^12 heads would make the check allocate terabytes.
        if out.numel() > 0 and not bool(torch.isfinite(sink_logits).all()):
            raise ValueError(
                f"foveal: {function}: sink_logits must be finite (it holds NaN or inf)"
            )
    share = torch.sigmoid(lse - sink_logits.to(lse.dtype).reshape(1, -1, 1))
    return (out.to(lse.dtype) * share.unsqueeze(-1)).to(out.dtype)


# SparseK attention as custom ops, differentiable in q, k, v and the scores u.

_SPARSEK_OPTIONS = ("topk", "window", "gate", "sink_tokens", "causal", "scale", "softcap")


@torch.library.custom_op("foveal::sparsek_attention", mutates_args=())
def _sparsek_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    key_start: Optional[torch.Tensor],
    key_length: Optional[torch.Tensor],
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
    lse_dtype = torch.float32 if q.dtype in _HALF else q.dtype  # 16-bit storage: lse float32
    return q.new_empty((*q.shape[:3], v.shape[3])), q.new_empty(q.shape[:3], dtype=lse_dtype)


@torch.library.custom_op("foveal::sparsek_attention_backward", mutates_args=())
def _sparsek_attention_backward_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    u: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    key_start: Optional[torch.Tensor],
    key_length: Optional[torch.Tensor],
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
        if name in (*_SPARSEK_OPTIONS, *_KEY_RANGES, "q_offset", "num_threads", "score_grad")
    }
    dtypes = [t.dtype for t in (q, k, v, u)]
    if q.dtype in _HALF:
        # 16-bit storage: the backward runs in float32 on widened copies (the values are exact
        # in float32, lse is float32 already), its gradients rounded to the inputs' dtypes.
        tensors = [t.float() for t in tensors]
        grad_out = grad_out.float()
    grad_q, grad_k, grad_v, grad_u = _sparsek.sparsek_attention_backward(
        *tensors, grad_out, **options
    )
    grads = (grad_q, grad_k, grad_v, torch.zeros_like(u) if grad_u is None else grad_u)
    return tuple(grad.to(dtype) for grad, dtype in zip(grads, dtypes))


@_sparsek_attention_backward_op.register_fake
def _(q, k, v, u, out, lse, grad_out, *options):
    return tuple(t.new_empty(t.shape) for t in (q, k, v, u))  # contiguous, as the op returns


def _sparsek_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    q, k, v, u, key_start, key_length, *options = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, u, out, lse, key_start, key_length)
    ctx.options = options


def _sparsek_backward(ctx: Any, grad_out: torch.Tensor, _grad_lse: Any) -> tuple:
    q, k, v, u, out, lse, key_start, key_length = ctx.saved_tensors
    score_grad = ctx.needs_input_grad[3]
    grads = _sparsek_attention_backward_op(
        q, k, v, u, out, lse, grad_out, key_start, key_length, score_grad, *ctx.options
    )
    grad_u = grads[3] if score_grad else None
    return (*grads[:3], grad_u, None, None, *(None for _ in ctx.options))


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
    key_start: Any = None,
    key_length: Any = None,
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """``foveal.sparsek.sparsek_attention`` differentiable in q, k, v and the scores u (the
    arguments are the same, variable-length ``key_start`` / ``key_length`` included): the
    scores' gradient flows through the SPARSEK gates, so a scorer such as
    ``foveal.sparsek.linear_scores`` (or any torch module producing u) trains."""
    options = {name: value for name, value in locals().items() if name not in ("q", "k", "v", "u")}
    # (no comprehension over options: it would make options a cell that locals() reads unset)
    starts = _index_tensor("sparsek_attention", "key_start", options.pop("key_start"))
    lengths = _index_tensor("sparsek_attention", "key_length", options.pop("key_length"))
    if not torch.compiler.is_compiling():
        options = _core.sparsek_options("sparsek_attention", **options)
    return _sparsek_attention_op(q, k, v, u, starts, lengths, **options)[0]


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


# PDE-SSM as custom ops. The forward op builds the block (its multiplier table and FFT plan) and
# keeps it in _BLOCKS under a handle it returns as a tensor; the backward op reuses it while the
# handle lives (the autograd graph holds it), else builds the block again (same bits).

_BLOCKS: dict[int, Any] = {}
_next_handle = itertools.count(1)
_PDE_OPTIONS = ("mode", "boundary", "diffusion_form", "layout", "num_threads")


def _grid_of(x: torch.Tensor, layout: str) -> tuple:
    return tuple(x.shape[1:]) if layout == "channels_last" else (*x.shape[2:], x.shape[1])


def _block(x: torch.Tensor, parameters: list, options: dict) -> Any:
    block_options = {key: options[key] for key in ("mode", "boundary", "diffusion_form")}
    dtype = "float64" if x.dtype == torch.float64 else "float32"
    grid = _grid_of(x, options["layout"])
    if len(grid) != 3:  # the compiled call names x and its rank
        _pde_ssm.pde_ssm(x, *parameters, **options)
    return _pde_ssm.PdeSsm(
        *grid, *parameters, dtype=dtype, num_threads=options["num_threads"], **block_options
    )


@torch.library.custom_op("foveal::pde_ssm", mutates_args=())
def _pde_ssm_op(
    x: torch.Tensor,
    diffusion: torch.Tensor,
    velocity: torch.Tensor,
    reaction: torch.Tensor,
    time: torch.Tensor,
    skip: Optional[torch.Tensor],
    mode: str,
    boundary: str,
    diffusion_form: str,
    layout: str,
    num_threads: Optional[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    options = {name: value for name, value in locals().items() if name in _PDE_OPTIONS}
    parameters = [None if p is None else p.detach() for p in (diffusion, velocity, reaction, time)]
    parameters.append(None if skip is None else skip.detach())
    block = _block(x, parameters, options)
    y = block.forward(x.detach(), layout=layout, num_threads=num_threads)
    handle = torch.tensor([next(_next_handle)], dtype=torch.int64)
    _BLOCKS[int(handle)] = block
    weakref.finalize(handle, _BLOCKS.pop, int(handle), None)
    return y, handle


@_pde_ssm_op.register_fake
def _(x, *args):
    return x.new_empty(x.shape), torch.empty(1, dtype=torch.int64)


@torch.library.custom_op("foveal::pde_ssm_backward", mutates_args=())
def _pde_ssm_backward_op(
    handle: torch.Tensor,
    x: torch.Tensor,
    grad_out: torch.Tensor,
    diffusion: torch.Tensor,
    velocity: torch.Tensor,
    reaction: torch.Tensor,
    time: torch.Tensor,
    skip: Optional[torch.Tensor],
    mode: str,
    boundary: str,
    diffusion_form: str,
    layout: str,
    num_threads: Optional[int],
    input_grad: bool,
    parameter_grads: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    options = {name: value for name, value in locals().items() if name in _PDE_OPTIONS}
    parameters = [p.detach() for p in (diffusion, velocity, reaction, time)]
    parameters.append(None if skip is None else skip.detach())
    block = _BLOCKS.get(int(handle)) or _block(x, parameters, options)
    grads = block.backward(
        x.detach(),
        grad_out.detach(),
        layout=layout,
        input_grad=input_grad,
        parameter_grads=parameter_grads,
        num_threads=num_threads,
    )
    # An op returns tensors: an empty one where a gradient was not computed.
    return tuple(x.new_empty(0) if g is None else g for g in grads)


@_pde_ssm_backward_op.register_fake
def _(handle, x, grad_out, diffusion, velocity, reaction, time, skip, *options):
    input_grad, parameter_grads = options[-2:]
    parameters = (diffusion, velocity, reaction, time, skip)
    return (
        x.new_empty(x.shape if input_grad else (0,)),
        *(x.new_empty(p.shape if parameter_grads and p is not None else (0,)) for p in parameters),
    )


def _pde_ssm_setup_context(ctx: Any, inputs: tuple, output: tuple) -> None:
    x, diffusion, velocity, reaction, time, skip, *options = inputs
    ctx.save_for_backward(output[1], x, diffusion, velocity, reaction, time, skip)
    ctx.options = options


def _pde_ssm_backward(ctx: Any, grad_out: torch.Tensor, _grad_handle: Any) -> tuple:
    handle, x, diffusion, velocity, reaction, time, skip = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grads = _pde_ssm_backward_op(
        handle, x, grad_out, diffusion, velocity, reaction, time, skip, *ctx.options,
        needs[0], any(needs[1:6]),
    )  # fmt: skip
    return (
        *(g if need else None for g, need in zip(grads, needs[:6])),
        *(None for _ in ctx.options),
    )


_pde_ssm_op.register_autograd(_pde_ssm_backward, setup_context=_pde_ssm_setup_context)


def _parameter_tensor(function: str, name: str, value: Any, like: torch.Tensor) -> Any:
    """A parameter given as a number or list becomes a tensor (no gradient) of x's dtype:
    float64 for float64 x, else float32 (another dtype of x is rejected by name later)."""
    if value is None or isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (int, float, list, tuple)):
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        with warnings.catch_warnings():  # numbers beyond float32 become inf: rejected by name
            warnings.simplefilter("ignore")
            return torch.tensor(value, dtype=dtype)
    raise TypeError(
        f"foveal: {function}: {name} must be a torch tensor, a number or a list, got "
        f"{type(value).__name__}"
    )


def pde_ssm(
    x: torch.Tensor,
    diffusion: Any,
    velocity: Any,
    reaction: Any,
    time: Any,
    skip: Any = None,
    *,
    mode: str = "initial_value",
    boundary: str = "periodic",
    diffusion_form: str = "cholesky",
    layout: str = "channels_last",
    num_threads: Optional[int] = None,
) -> torch.Tensor:
    """x: [B, H, W, C] (or [B, C, H, W])  ->  y, differentiable in x and every parameter given
    as a tensor (the arguments are those of ``foveal.pde_ssm.pde_ssm``). The custom op
    ``foveal::pde_ssm`` with its backward op registered for autograd; the backward reuses the
    block (multiplier and plan) the forward built."""
    function = "pde_ssm"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"foveal: {function}: x must be a torch tensor, got {type(x).__name__}")
    parameters = [
        _parameter_tensor(function, name, value, x)
        for name, value in zip(
            ("diffusion", "velocity", "reaction", "time", "skip"),
            (diffusion, velocity, reaction, time, skip),
        )
    ]
    if any(p is None for p in parameters[:4]):
        raise TypeError(f"foveal: {function}: diffusion, velocity, reaction and time are required")
    options = {name: value for name, value in locals().items() if name in _PDE_OPTIONS}
    if not torch.compiler.is_compiling():
        options = _core.pde_ssm_options(function, **options)
    return _pde_ssm_op(x, *parameters, **options)[0]


class PdeSsm:
    """``PdeSsm.apply(x, diffusion, velocity, reaction, time, skip, options)``: the same as
    :func:`pde_ssm` with the options in a dict (kept for code written against the earlier
    autograd.Function)."""

    @staticmethod
    def apply(x, diffusion, velocity, reaction, time, skip, options):
        return pde_ssm(x, diffusion, velocity, reaction, time, skip, **options)


from foveal.nn.pde import PdeSsm2d  # noqa: E402, F401
from foveal.nn.spade import SpadeEmbedding  # noqa: E402, F401
from foveal.nn.sparsek import DenseAttention, SparseKAttention  # noqa: E402, F401
from foveal.nn.vq import ResidualVQ, VectorQuantize  # noqa: E402, F401
