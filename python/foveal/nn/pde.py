"""The PDE-SSM 2-D spatial mixing layer (docs/pde_ssm.md) as a torch module.

:class:`PdeSsm2d` holds unconstrained parameters and maps them to the block's parameters so that
every value an optimiser can reach is a stable PDE:

- diffusion: Cholesky factors ``(l_yy, l_xy, l_xx)`` (``diffusion_form="cholesky"``), so
  ``K = L Lᵀ`` is positive semi-definite by construction;
- reaction: ``r = -max_reaction * sigmoid(reaction_logit)`` in ``(-max_reaction, 0)``: decay
  only, bounded, so ``|exp(τ r)| <= 1`` and ``τ r`` never approaches the block's limit of 80;
- time: ``τ = softplus(time_logit) + min_time > 0``;
- velocity ``(b_y, b_x)`` and skip ``D`` are free.

Initialisation (``reset_parameters``; torch's global generator, so ``torch.manual_seed`` fixes
it): per group, diagonal Cholesky factors ``l_yy, l_xx`` log-uniform in ``[0.3, 2]`` and
``l_xy = 0`` (isotropic-ish kernels from a few cells to most of a 32 grid), velocity
N(0, 0.5²), reaction in ``(-0.4, -0.02)`` (log-uniform), τ = 1, skip D = 1 (the layer starts as
identity plus a smoothing).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn
from torch.nn import functional

__all__ = ["PdeSsm2d"]

_MODES = ("initial_value", "forced")
_BOUNDARIES = ("periodic", "zero")
_LAYOUTS = ("channels_last", "channels_first")


def _inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    return y + torch.log(-torch.expm1(-y))


class PdeSsm2d(nn.Module):
    """PDE-SSM spatial mixing over an H x W grid: every channel group evolves by its own
    convection-diffusion-reaction PDE solved in the Fourier domain (``foveal.torch.pde_ssm``).

    ``x``: ``[B, H, W, C]`` (``layout="channels_last"``, default) or ``[B, C, H, W]``
    (``"channels_first"``) -> ``y`` of the same shape. Any H, W; C = ``channels``.
    ``groups`` (default ``channels``) divides ``channels``: channel c uses the PDE of group
    ``c // (channels // groups)``. ``mode``: ``"initial_value"`` (``y = u(τ)`` from ``u(0) =
    x``) or ``"forced"``; ``boundary``: ``"periodic"`` or ``"zero"``; ``skip``: add ``D ⊙ x``.

    Parameters (all ``[groups, ...]``): ``diffusion_factor`` [G, 3], ``velocity`` [G, 2],
    ``reaction_logit`` [G], ``time_logit`` [G], ``skip`` [G]. The block's parameters are the
    properties ``diffusion``, ``reaction``, ``time`` (see the module docstring for the maps).
    """

    def __init__(
        self,
        channels: int,
        groups: Optional[int] = None,
        mode: str = "initial_value",
        boundary: str = "periodic",
        *,
        layout: str = "channels_last",
        skip: bool = True,
        max_reaction: float = 1.0,
        min_time: float = 1e-3,
        num_threads: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        owner = "PdeSsm2d"
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"foveal: {owner}: channels must be an int >= 1, got {channels!r}")
        groups = channels if groups is None else groups
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"foveal: {owner}: groups must be an int >= 1, got {groups!r}")
        if channels % groups:
            raise ValueError(
                f"foveal: {owner}: groups ({groups}) must divide channels ({channels})"
            )
        for name, value, allowed in (
            ("mode", mode, _MODES),
            ("boundary", boundary, _BOUNDARIES),
            ("layout", layout, _LAYOUTS),
        ):
            if value not in allowed:
                raise ValueError(f"foveal: {owner}: {name} must be one of {allowed}, got {value!r}")
        if not max_reaction > 0.0:
            raise ValueError(f"foveal: {owner}: max_reaction must be > 0, got {max_reaction}")
        if not min_time > 0.0:
            raise ValueError(f"foveal: {owner}: min_time must be > 0, got {min_time}")
        self.channels, self.groups, self.mode, self.boundary = channels, groups, mode, boundary
        self.layout, self.num_threads = layout, num_threads
        self.max_reaction, self.min_time = float(max_reaction), float(min_time)
        self.diffusion_factor = nn.Parameter(torch.empty(groups, 3, dtype=dtype))
        self.velocity = nn.Parameter(torch.empty(groups, 2, dtype=dtype))
        self.reaction_logit = nn.Parameter(torch.empty(groups, dtype=dtype))
        self.time_logit = nn.Parameter(torch.empty(groups, dtype=dtype))
        self.skip = nn.Parameter(torch.empty(groups, dtype=dtype)) if skip else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The documented initialisation (module docstring)."""
        groups = self.groups
        with torch.no_grad():
            diagonal = torch.exp(torch.empty(groups, 2).uniform_(math.log(0.3), math.log(2.0)))
            factor = torch.stack((diagonal[:, 0], torch.zeros(groups), diagonal[:, 1]), dim=1)
            self.diffusion_factor.copy_(factor)
            self.velocity.normal_(0.0, 0.5)
            decay = torch.exp(torch.empty(groups).uniform_(math.log(0.02), math.log(0.4)))
            fraction = decay / self.max_reaction
            self.reaction_logit.copy_(torch.log(fraction) - torch.log1p(-fraction))
            self.time_logit.copy_(_inverse_softplus(torch.full((groups,), 1.0 - self.min_time)))
            if self.skip is not None:
                self.skip.fill_(1.0)

    @property
    def diffusion(self) -> torch.Tensor:
        """The Cholesky factors (l_yy, l_xy, l_xx) [G, 3]: K = L Lᵀ."""
        return self.diffusion_factor

    @property
    def reaction(self) -> torch.Tensor:
        """r [G] in (-max_reaction, 0)."""
        return -self.max_reaction * torch.sigmoid(self.reaction_logit)

    @property
    def time(self) -> torch.Tensor:
        """τ [G] > min_time."""
        return functional.softplus(self.time_logit) + self.min_time

    def _check_input(self, x: object) -> None:
        owner = "PdeSsm2d"
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"foveal: {owner}: x must be a torch tensor, got {type(x).__name__}")
        if torch.compiler.is_compiling():
            return
        dtype = self.velocity.dtype
        if x.dtype != dtype:
            raise TypeError(
                f"foveal: {owner}: x must have the parameters' dtype {dtype}, got {x.dtype}"
            )
        expected = "[B, H, W, C]" if self.layout == "channels_last" else "[B, C, H, W]"
        channel_axis = 3 if self.layout == "channels_last" else 1
        if x.dim() != 4 or x.shape[channel_axis] != self.channels:
            raise ValueError(
                f"foveal: {owner}: x must have shape {expected} with C = {self.channels} "
                f"(layout={self.layout!r}), got {list(x.shape)}"
            )
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"foveal: {owner}: x must be finite (it holds NaN or inf)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return _foveal_torch.pde_ssm(
            x,
            self.diffusion,
            self.velocity,
            self.reaction,
            self.time,
            self.skip,
            mode=self.mode,
            boundary=self.boundary,
            layout=self.layout,
            num_threads=self.num_threads,
        )

    def extra_repr(self) -> str:
        return (
            f"{self.channels}, groups={self.groups}, mode={self.mode!r}, "
            f"boundary={self.boundary!r}, layout={self.layout!r}, skip={self.skip is not None}"
        )


# Last: foveal.torch re-exports this module's classes at its end, so it may be importing this
# module right now; by this line everything it imports from here is defined.
from foveal import torch as _foveal_torch  # noqa: E402
