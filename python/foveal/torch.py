"""foveal operators as torch autograd Functions (imports torch; only for users who have it).

``sparsek(z, k)`` is the SPARSEK projection (``foveal.sparsek.sparsek``) with its backward
(``foveal.sparsek.sparsek_backward``) wired into autograd, for CPU float32 / float64 tensors
with any leading dimensions.
"""

from __future__ import annotations

from typing import Any

import torch

from . import sparsek as _sparsek

__all__ = ["SparseK", "sparsek"]


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
