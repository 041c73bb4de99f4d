"""The SPARSEK projection (OPERATORS.md §4, docs/sparsek.md).

``sparsek(z, k)`` projects every row (the last dimension) of the scores ``z`` onto the capped
simplex ``{0 <= p <= 1, sum(p) = k}``: ``p = clip(z - tau, 0, 1)`` with one threshold ``tau``
per row, found in expected O(n) by selecting the k-th largest score. ``sparsek_backward`` is its
vector-Jacobian product. Tensors may be numpy arrays, torch CPU tensors or anything with
``__dlpack__`` or the buffer protocol, float32 or float64, with any leading dimensions; results
have the kind of the input. For autograd use ``foveal.torch.sparsek``.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _as_int, _core, _float_dtype, _output, _to_numpy

__all__ = ["sparsek", "sparsek_backward"]


def _rows(function: str, name: str, x: Any) -> np.ndarray:
    """x as a numpy array of at least one dimension (float32 or float64)."""
    array = _to_numpy(function, name, x)
    _float_dtype(function, name, array)
    if array.ndim < 1:
        raise ValueError(f"foveal: {function}: {name} must have at least 1 dimension, got 0")
    return array


def _flat(function: str, name: str, array: np.ndarray, written: bool = False) -> np.ndarray:
    """array [..., n] as [rows, n]; an output must stay a view of its memory."""
    n = array.shape[-1]
    flat = array.reshape(int(np.prod(array.shape[:-1], dtype=np.int64)), n)
    if written and flat.size > 0 and not np.shares_memory(flat, array):
        raise ValueError(
            f"foveal: {function}: {name} must have leading dimensions that flatten without a copy"
        )
    return flat


def _threads(function: str, num_threads: Optional[int]) -> int:
    return 0 if num_threads is None else _as_int(function, "num_threads", num_threads)


def sparsek(
    z: Any,
    k: int,
    *,
    return_tau: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
) -> Any:
    """z: [..., n]  ->  p: [..., n] (and tau: [...] when ``return_tau``).

    ``p = argmin ‖p - z‖²`` over ``0 <= p <= 1, sum(p) = k`` per row, i.e.
    ``clip(z - tau, 0, 1)``. For ``k >= n`` every entry is 1 and tau is -inf. ``k >= 1``; ``z``
    must be finite (NaN or inf raise ValueError naming the position). ``out`` receives p."""
    function = "sparsek"
    k = _as_int(function, "k", k)
    threads = _threads(function, num_threads)
    array = _rows(function, "z", z)
    shape = tuple(array.shape)
    p, p_array = _output(function, "out", out, z, shape, array.dtype)
    tau, tau_array = (
        _output(function, "tau", None, z, shape[:-1], array.dtype) if return_tau else (None, None)
    )
    _core.sparsek(
        _flat(function, "z", array),
        k,
        _flat(function, "out", p_array, written=True),
        None if tau_array is None else tau_array.reshape(-1),
        threads,
    )
    return (p, tau) if return_tau else p


def sparsek_backward(p: Any, grad_p: Any, *, num_threads: Optional[int] = None) -> Any:
    """p, grad_p: [..., n]  ->  grad_z: [..., n] = ``1_F * (grad_p - mean_F(grad_p))`` per row,
    F = {0 < p < 1} (zero where F is empty)."""
    function = "sparsek_backward"
    threads = _threads(function, num_threads)
    p_array = _rows(function, "p", p)
    grad_array = _rows(function, "grad_p", grad_p)
    if grad_array.dtype != p_array.dtype:
        raise TypeError(
            f"foveal: {function}: grad_p must have dtype {p_array.dtype.name} (the dtype of p), "
            f"got {grad_array.dtype.name}"
        )
    if grad_array.shape != p_array.shape:
        raise ValueError(
            f"foveal: {function}: grad_p must have the shape of p {tuple(p_array.shape)}, "
            f"got {tuple(grad_array.shape)}"
        )
    grad_z, grad_z_array = _output(function, "grad_z", None, p, p_array.shape, p_array.dtype)
    _core.sparsek_backward(
        _flat(function, "p", p_array),
        _flat(function, "grad_p", grad_array),
        _flat(function, "grad_z", grad_z_array, written=True),
        threads,
    )
    return grad_z
