"""foveal operators as torch autograd Functions (imports torch; only for users who have it).

``sparsek(z, k)`` is the SPARSEK projection (``foveal.sparsek.sparsek``) with its backward
(``foveal.sparsek.sparsek_backward``) wired into autograd, for CPU float32 / float64 tensors
with any leading dimensions.

``pde_ssm(x, diffusion, velocity, reaction, time, skip)`` is the PDE-SSM block
(``foveal.pde_ssm``) differentiable in the input and every parameter: each call builds the
block's multiplier once and its backward reuses it.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from . import pde_ssm as _pde_ssm
from . import sparsek as _sparsek

__all__ = ["PdeSsm", "SparseK", "pde_ssm", "sparsek"]


class SparseK(torch.autograd.Function):
    """z: [..., n], k  ->  p: [..., n] = SPARSEK(z, k) per row; backward
    ``1_F * (g - mean_F(g))`` with F = {0 < p < 1}."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, k: int) -> torch.Tensor:
        p = _sparsek.sparsek(z.detach().contiguous(), k)
        ctx.save_for_backward(p)
        return p

    @staticmethod
    def backward(ctx: Any, grad_p: torch.Tensor) -> tuple[torch.Tensor, None]:
        (p,) = ctx.saved_tensors
        grad_z = _sparsek.sparsek_backward(p, grad_p.detach().contiguous())
        return grad_z, None


def sparsek(z: torch.Tensor, k: int) -> torch.Tensor:
    """z: [..., n]  ->  p: [..., n], differentiable in z (see ``SparseK``)."""
    return SparseK.apply(z, k)


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
