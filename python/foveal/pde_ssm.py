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
from ._common import _as_int, _float_dtype, _new_like, _output, _to_numpy, float_dtype_arg
from .sparsek import _threads

__all__ = ["PdeSsm", "PdeSsmGradients", "pde_ssm", "pde_ssm_backward"]

_LAYOUTS = ("channels_last", "channels_first")


class PdeSsmGradients(NamedTuple):
    """What ``backward`` returns: each entry has the shape of its argument, or is None where
    it was not asked for (``skip`` is None when the block has no skip)."""

    x: Any
    diffusion: Any
    velocity: Any
    reaction: Any
    time: Any
    skip: Any


def _check_layout(function: str, layout: str) -> None:
    if layout not in _LAYOUTS:
        raise ValueError(
            f'foveal: {function}: layout must be "channels_last" ([B, H, W, C]) or '
            f'"channels_first" ([B, C, H, W]), got {layout!r}'
        )


def _grid(function: str, name: str, x: Any, layout: str) -> np.ndarray:
    """x as a numpy [B, H, W, C] view of its memory (channels_first: axes permuted)."""
    array = _to_numpy(function, name, x)
    _float_dtype(function, name, array)
    if array.ndim != 4:
        dims = "[B, H, W, C]" if layout == "channels_last" else "[B, C, H, W]"
        raise ValueError(
            f"foveal: {function}: {name} must have 4 dimensions {dims}, got {array.ndim} "
            f"(shape {tuple(array.shape)})"
        )
    return array if layout == "channels_last" else array.transpose(0, 2, 3, 1)


def _parameter(function: str, name: str, value: Any, columns: int, dtype: np.dtype) -> np.ndarray:
    """A parameter as a numpy [G, columns] (or [G] when columns is 0) array of x's dtype;
    scalars and lists are converted, arrays must already have x's dtype."""
    if isinstance(value, (int, float, list, tuple)):
        array = np.asarray(value, dtype=dtype)
    else:
        array = _to_numpy(function, name, value)
        if array.dtype != dtype:
            raise TypeError(
                f"foveal: {function}: {name} must have dtype {dtype.name} (the dtype of x), "
                f"got {array.dtype.name}"
            )
    if columns == 0:
        if array.ndim == 0:
            array = array.reshape(1)
        if array.ndim != 1:
            raise ValueError(
                f"foveal: {function}: {name} must have shape [G] (G groups dividing C), got "
                f"shape {tuple(array.shape)}"
            )
        return array
    if array.ndim == 1 and array.shape[0] == columns:
        array = array.reshape(1, columns)
    if array.ndim != 2 or array.shape[1] != columns:
        raise ValueError(
            f"foveal: {function}: {name} must have shape [G, {columns}] (G groups dividing C), "
            f"got shape {tuple(array.shape)}"
        )
    return array


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
        function = "PdeSsm"
        if dtype is None:
            dtype = _first_array_dtype(function, diffusion, velocity, reaction, time, skip)
        dtype = float_dtype_arg(function, dtype)
        for name, value in (("mode", mode), ("boundary", boundary)):
            if not isinstance(value, str):
                raise TypeError(
                    f"foveal: {function}: {name} must be a str, got {type(value).__name__}"
                )
        if not isinstance(diffusion_form, str):
            raise TypeError(
                f"foveal: {function}: diffusion_form must be a str, got "
                f"{type(diffusion_form).__name__}"
            )
        self._shapes = {}
        arrays = {}
        for name, value, columns in (
            ("diffusion", diffusion, 3),
            ("velocity", velocity, 2),
            ("reaction", reaction, 0),
            ("time", time, 0),
            ("skip", skip, 0),
        ):
            if value is None and name == "skip":
                arrays[name] = None
                continue
            self._shapes[name] = tuple(np.shape(value)) if not np.isscalar(value) else ()
            arrays[name] = _parameter(function, name, value, columns, dtype)
        self._dtype = dtype
        self._has_skip = skip is not None
        core_class = _core.PdeSsmF64 if dtype == np.float64 else _core.PdeSsmF32
        self._impl = core_class(
            _as_int(function, "height", height),
            _as_int(function, "width", width),
            _as_int(function, "channels", channels),
            arrays["diffusion"],
            arrays["velocity"],
            arrays["reaction"],
            arrays["time"],
            arrays["skip"],
            mode,
            boundary,
            diffusion_form,
            _threads(function, num_threads),
        )
        self._arrays = arrays  # the group counts of the gradients

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

    def _input(self, function: str, name: str, x: Any, layout: str) -> np.ndarray:
        array = _grid(function, name, x, layout)
        if array.dtype != self._dtype:
            raise TypeError(
                f"foveal: {function}: {name} must have dtype {self._dtype.name} (the block's), "
                f"got {array.dtype.name}"
            )
        return array

    def _new_grid(self, like: Any, shape: tuple, layout: str) -> tuple[Any, np.ndarray]:
        """A new tensor of x's kind in x's layout, and its [B, H, W, C] numpy view."""
        batch, height, width, channels = shape
        if layout == "channels_last":
            return _new_like(like, shape, self._dtype)
        tensor, array = _new_like(like, (batch, channels, height, width), self._dtype)
        return tensor, array.transpose(0, 2, 3, 1)

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
        function = "pde_ssm"
        _check_layout(function, layout)
        threads = _threads(function, num_threads)
        array = self._input(function, "x", x, layout)
        if out is None:
            result, out_array = self._new_grid(x, tuple(array.shape), layout)
        else:
            memory_shape = _shape_in_layout(array.shape, layout)
            result, out_array = _output(function, "out", out, x, memory_shape, self._dtype)
            if layout == "channels_first":
                out_array = out_array.transpose(0, 2, 3, 1)
        self._impl.forward(array, out_array, threads)
        return result

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
        function = "pde_ssm_backward"
        _check_layout(function, layout)
        threads = _threads(function, num_threads)
        grad_array = self._input(function, "grad_out", grad_out, layout)
        x_array = self._input(function, "x", x, layout) if parameter_grads else None
        if x_array is not None and x_array.shape != grad_array.shape:
            raise ValueError(
                f"foveal: {function}: grad_out must have the shape of x "
                f"{_shape_in_layout(x_array.shape, layout)}, got "
                f"{_shape_in_layout(grad_array.shape, layout)}"
            )
        grad_x, grad_x_array = (None, None)
        if input_grad:
            grad_x, grad_x_array = self._new_grid(grad_out, tuple(grad_array.shape), layout)
        grads = {}
        for name in ("diffusion", "velocity", "reaction", "time", "skip"):
            array = self._arrays[name]
            grads[name] = (
                _new_like(grad_out, array.shape, self._dtype)
                if parameter_grads and array is not None
                else (None, None)
            )
        self._impl.backward(
            x_array,
            grad_array,
            grad_x_array,
            *(grads[name][1] for name in ("diffusion", "velocity", "reaction", "time", "skip")),
            threads,
        )
        shaped = {
            name: None if tensor is None else tensor.reshape(self._shapes[name])
            for name, (tensor, _) in grads.items()
        }
        return PdeSsmGradients(grad_x, **shaped)


def _shape_in_layout(shape: tuple, layout: str) -> tuple:
    """A [B, H, W, C] shape as the caller's layout writes it."""
    batch, height, width, channels = shape
    return tuple(shape) if layout == "channels_last" else (batch, channels, height, width)


def _first_array_dtype(function: str, *values: Any) -> np.dtype:
    """The dtype of the first parameter given as an array (float32 when all are numbers)."""
    for value in values:
        if value is None or isinstance(value, (int, float, list, tuple)):
            continue
        return _float_dtype(function, "parameters", _to_numpy(function, "parameter", value))
    return np.dtype(np.float32)


def _block_for(
    function: str, name: str, like: Any, layout: str, parameters: tuple, **options: Any
) -> PdeSsm:
    """The block of the grid, channels and dtype of `like` (x or grad_out, in `layout`) with
    these parameters and options."""
    _check_layout(function, layout)
    grid = _grid(function, name, like, layout)
    _, height, width, channels = grid.shape
    return PdeSsm(height, width, channels, *parameters, dtype=grid.dtype, **options)


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
    parameters (module docstring), its multiplier computed for this call."""
    parameters = (diffusion, velocity, reaction, time, skip)
    block = _block_for(
        "pde_ssm",
        "x",
        x,
        layout,
        parameters,
        mode=mode,
        boundary=boundary,
        diffusion_form=diffusion_form,
        num_threads=num_threads,
    )
    return block.forward(x, layout=layout, out=out, num_threads=num_threads)


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
    parameters = (diffusion, velocity, reaction, time, skip)
    block = _block_for(
        "pde_ssm_backward",
        "grad_out",
        grad_out,
        layout,
        parameters,
        mode=mode,
        boundary=boundary,
        diffusion_form=diffusion_form,
        num_threads=num_threads,
    )
    return block.backward(x, grad_out, layout=layout, num_threads=num_threads)
