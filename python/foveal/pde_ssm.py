"""The PDE-SSM 2-D Fourier mixing block (docs/pde_ssm.md).

Every channel of an H x W token grid evolves by its own convection-diffusion-reaction PDE
``∂u/∂t = ∇·(K∇u) - b·∇u + r u``, solved exactly in the Fourier domain (one real FFT, a
multiplier, one inverse FFT; O(N log N) for N tokens):

- ``mode="initial_value"``: ``y = F⁻¹[exp(τλ) F x] + D x``
- ``mode="forced"``: ``y = F⁻¹[τ φ(τλ) F x] + D x`` with ``φ(z) = (e^z - 1) / z``

with ``λ(k) = -kᵀKk + r - i b·k``. ``boundary="periodic"`` transforms on H x W,
``boundary="zero"`` on 2H x 2W with the grid embedded top-left (no wrap-around).

Parameters (each with its own group count G dividing C; channel c uses entry c // (C // G)):
``diffusion`` [G, 3] (``diffusion_form="cholesky"``: (l_yy, l_xy, l_xx), K = L Lᵀ with
L = [[l_yy, 0], [l_xy, l_xx]]; ``"raw"``: (K_yy, K_xy, K_xx), must be positive semi-definite),
``velocity`` [G, 2] (b_y, b_x), ``reaction`` [G], ``time`` [G] (τ > 0), ``skip`` [G] or None.
Scalars and 1-D lists are accepted for a single group.

``x`` is ``[B, H, W, C]`` (``layout="channels_last"``) or ``[B, C, H, W]``
(``layout="channels_first"``), float32 or float64, a numpy array, a torch CPU tensor or
anything with ``__dlpack__`` or the buffer protocol; results have the kind and layout of x.
``PdeSsm`` caches the multiplier and the FFT plan for one grid and one set of parameters; for
autograd use ``foveal.torch.pde_ssm``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core
from ._common import float_dtype_arg, new_like, shape

__all__ = ["PdeSsm", "PdeSsmGradients", "pde_ssm", "pde_ssm_backward"]

_PARAMETERS = ("diffusion", "velocity", "reaction", "time", "skip")


class PdeSsmGradients(NamedTuple):
    """What ``backward`` returns: each entry has the shape of its argument, or is None where
    it was not asked for (``skip`` is None when the block has no skip)."""

    x: Any
    diffusion: Any
    velocity: Any
    reaction: Any
    time: Any
    skip: Any


def _dtype_of(value: Any) -> Optional[np.dtype]:
    """The numpy dtype of a tensor argument (None for numbers and lists, or no tensor)."""
    if value is None or isinstance(value, (int, float, list, tuple)):
        return None
    name = str(value.dtype).replace("torch.", "") if hasattr(value, "dtype") else None
    try:
        return np.dtype(name) if name is not None else np.asarray(value).dtype
    except (TypeError, ValueError):
        return None


def _parameters(values: tuple, dtype: Any) -> list:
    """The parameters as the compiled calls read them: numbers and lists become numpy arrays of
    ``dtype`` (x's, or the block's); tensors pass as they are (their dtype is checked there)."""
    return [
        np.asarray(value, dtype=dtype) if isinstance(value, (int, float, list, tuple)) else value
        for value in values
    ]


class PdeSsm:
    """The block for one H x W grid, C channels and one set of parameters, with its
    multiplier and FFT plan computed once (see the module docstring for the math).

    ``block(x)`` / ``block.forward(x)`` applies it to any batch; ``block.backward(x, grad_out)``
    returns the gradients. Parameter values are copied at construction: build a new block
    after changing them (``foveal.torch.pde_ssm`` does so at every call)."""

    def __init__(
        self,
        height: int,
        width: int,
        channels: int,
        diffusion: Any,
        velocity: Any,
        reaction: Any,
        time: Any,
        skip: Any = None,
        *,
        mode: str = "initial_value",
        boundary: str = "periodic",
        diffusion_form: str = "cholesky",
        dtype: Any = None,
        num_threads: Optional[int] = None,
    ) -> None:
        values = (diffusion, velocity, reaction, time, skip)
        if dtype is None:
            dtype = next((d for d in map(_dtype_of, values) if d is not None), np.float32)
        self._dtype = float_dtype_arg("PdeSsm", dtype)
        parameters = _parameters(values, self._dtype)
        core_class = _core.PdeSsmF64 if self._dtype == np.float64 else _core.PdeSsmF32
        self._impl = core_class(
            *parameters,
            height=height,
            width=width,
            channels=channels,
            mode=mode,
            boundary=boundary,
            diffusion_form=diffusion_form,
            num_threads=num_threads,
        )
        # The gradients of the parameters have their shapes (None: no skip).
        self._shapes = {
            name: None if value is None else shape(value)
            for name, value in zip(_PARAMETERS, parameters)
        }

    @property
    def height(self) -> int:
        return self._impl.height

    @property
    def width(self) -> int:
        return self._impl.width

    @property
    def channels(self) -> int:
        return self._impl.channels

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    @property
    def transform_shape(self) -> tuple[int, int]:
        """The FFT grid: (H, W) periodic, (2H, 2W) zero boundary."""
        return (self._impl.transform_height, self._impl.transform_width)

    def forward(
        self,
        x: Any,
        *,
        layout: str = "channels_last",
        out: Any = None,
        num_threads: Optional[int] = None,
    ) -> Any:
        """x: [B, H, W, C] (or [B, C, H, W] with ``layout="channels_first"``)  ->  y, same
        shape and layout. ``out`` (same shape and layout) receives y."""
        if out is None:
            out = new_like(x, shape(x), self._dtype)
        self._impl.forward(x, out, layout=layout, num_threads=num_threads)
        return out

    __call__ = forward

    def backward(
        self,
        x: Any,
        grad_out: Any,
        *,
        layout: str = "channels_last",
        input_grad: bool = True,
        parameter_grads: bool = True,
        num_threads: Optional[int] = None,
    ) -> PdeSsmGradients:
        """x, grad_out: [B, H, W, C] (or [B, C, H, W])  ->  PdeSsmGradients(x, diffusion,
        velocity, reaction, time, skip): ``grad_x = F⁻¹[conj(m) F grad_out] + D grad_out``
        and ``∂L/∂θ = Σ_k Re(conj(ĝ_k) ∂m_k/∂θ û_k)`` summed over each group's channels and
        the batch. ``input_grad`` / ``parameter_grads`` = False skip those (x is not read
        without parameter gradients)."""
        grad_x = new_like(grad_out, shape(grad_out), self._dtype) if input_grad else None
        grads = [
            new_like(grad_out, self._shapes[name], self._dtype)
            if parameter_grads and self._shapes[name] is not None
            else None
            for name in _PARAMETERS
        ]
        self._impl.backward(
            x if parameter_grads else None,
            grad_out,
            grad_x,
            *grads,
            layout=layout,
            num_threads=num_threads,
        )
        return PdeSsmGradients(grad_x, *grads)


def _x_dtype(x: Any) -> Any:
    """The dtype numbers and lists are converted to: x's when it is float64, else float32 (a
    wrong dtype of x is reported by the compiled call)."""
    return np.float64 if _dtype_of(x) == np.float64 else np.float32


def pde_ssm(
    x: Any,
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
    out: Any = None,
    num_threads: Optional[int] = None,
) -> Any:
    """x: [B, H, W, C] (or [B, C, H, W])  ->  y, same shape and layout: the block with these
    parameters (module docstring), its multiplier computed for this call (none for an empty
    batch)."""
    parameters = _parameters((diffusion, velocity, reaction, time, skip), _x_dtype(x))
    if out is None:
        out = new_like(x, shape(x))
    _core.pde_ssm(
        x,
        out,
        *parameters,
        mode=mode,
        boundary=boundary,
        diffusion_form=diffusion_form,
        layout=layout,
        num_threads=num_threads,
    )
    return out


def pde_ssm_backward(
    x: Any,
    grad_out: Any,
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
) -> PdeSsmGradients:
    """x, grad_out: [B, H, W, C] (or [B, C, H, W])  ->  PdeSsmGradients of the input and of
    every parameter (``PdeSsm.backward``)."""
    parameters = _parameters((diffusion, velocity, reaction, time, skip), _x_dtype(grad_out))
    grad_x = new_like(grad_out, shape(grad_out))
    grads = [None if p is None else new_like(grad_out, shape(p)) for p in parameters]
    _core.pde_ssm_backward(
        x,
        grad_out,
        grad_x,
        *grads,
        *parameters,
        mode=mode,
        boundary=boundary,
        diffusion_form=diffusion_form,
        layout=layout,
        num_threads=num_threads,
    )
    return PdeSsmGradients(grad_x, *grads)
