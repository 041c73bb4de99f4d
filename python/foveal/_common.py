"""Helpers shared by the modules of the foveal package (private).

The compiled module reads every tensor argument itself (numpy arrays, torch CPU tensors,
``__dlpack__`` and buffer-protocol objects) and checks every value, with messages naming the
argument; the Python layer only allocates outputs of the caller's kind.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

ATTENTION_OPTIONS = (
    "scale",
    "causal",
    "window_left",
    "window_right",
    "sink_tokens",
    "softcap",
    "q_offset",
    "num_threads",
)


def attention_options(arguments: dict) -> dict:
    """The attention options among a function's arguments (pass ``locals()``), as the compiled
    calls take them: None keeps its meaning (the default), every value is checked there."""
    return {name: arguments[name] for name in ATTENTION_OPTIONS if name in arguments}


def _numpy_view(x: Any) -> Optional[np.ndarray]:
    """A numpy view of x's memory for reading its shape and dtype, or None."""
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.from_dlpack(x) if hasattr(x, "__dlpack__") else np.asarray(memoryview(x))
    except (TypeError, ValueError, BufferError, RuntimeError):
        return None


def shape(x: Any) -> tuple:
    """x's shape (() for what is no tensor: the compiled call then names the argument)."""
    if isinstance(x, np.ndarray) or is_torch(x):
        return tuple(x.shape)
    view = _numpy_view(x)
    return () if view is None else view.shape


def size(value: Any) -> int:
    """An output dimension taken from an argument: the int, or 0 when it is no int >= 0 (the
    compiled call then rejects the argument by name before the output is used)."""
    try:
        value = operator.index(value)
    except TypeError:
        return 0
    return value if 0 <= value < 2**63 and not isinstance(value, bool) else 0


def new_like(like: Any, shape: tuple, dtype: Any = None) -> Any:
    """A new uninitialized tensor of the kind of ``like`` (torch for a torch tensor, else numpy),
    with ``like``'s dtype unless ``dtype`` (a numpy dtype) is given."""
    if is_torch(like):
        import torch

        torch_dtype = like.dtype if dtype is None else getattr(torch, np.dtype(dtype).name)
        return _allocate(torch.empty, shape, torch_dtype)
    if dtype is None:
        view = _numpy_view(like)
        dtype = np.float32 if view is None else view.dtype
    return _allocate(np.empty, shape, dtype)


def attention_outputs(q: Any, v: Any, out: Any, return_lse: bool) -> tuple[Any, Any]:
    """out ``[B, Hq, Lq, Dv]`` (the given one, or new of q's kind and dtype) and, when asked for,
    lse ``[B, Hq, Lq]``. Shapes and dtypes are checked by the compiled call."""
    q_shape = shape(q)
    if out is None:
        out = new_like(q, q_shape[:3] + shape(v)[3:4])
    return out, new_like(q, q_shape[:3]) if return_lse else None


def cache_outputs(q: Any, cache: Any, out: Any, return_lse: bool) -> tuple[Any, Any]:
    """out ``[S, Hq, Lq, Dv]`` (the given one, or new of q's kind in the cache's dtype) and, when
    asked for, lse ``[S, Hq, Lq]``, for attention over a cache (``dim_v`` and ``dtype``)."""
    q_shape = shape(q)
    if out is None:
        out = new_like(q, (*q_shape[:3], cache.dim_v), cache.dtype)
    return out, new_like(q, q_shape[:3], cache.dtype) if return_lse else None


def forwarded(name: str, doc: str) -> property:
    """A read-only property reading the attribute ``name`` of the compiled object ``_cache``."""
    return property(lambda self: getattr(self._cache, name), doc=doc)


class CacheGeometry:
    """The properties every cache class shares (it keeps the compiled cache in ``_cache`` and
    its numpy dtype in ``_dtype``)."""

    _dtype: np.dtype
    dtype = property(lambda self: self._dtype, doc="float32 or float64 (numpy dtype).")
    heads_kv = forwarded("heads_kv", "Number of key/value heads Hkv.")
    dim = forwarded("dim", "Key dimension D.")
    dim_v = forwarded("dim_v", "Value dimension Dv.")


def _allocate(empty: Any, shape: tuple, dtype: Any) -> Any:
    """empty(shape, dtype=dtype); running out of memory is MemoryError naming the shape and the
    byte count (torch raises RuntimeError)."""
    try:
        return empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as error:
        if (
            isinstance(error, RuntimeError)
            and "memory" not in str(error)
            and "allocat" not in str(error)
        ):
            raise
        name = str(dtype).replace("torch.", "")
        itemsize = np.dtype(name).itemsize if name in np.sctypeDict else 0
        nbytes = int(np.prod(shape, dtype=object)) * itemsize
        raise MemoryError(
            f"foveal: cannot allocate an output tensor of shape {tuple(shape)} and dtype "
            f"{name} ({nbytes} bytes): {error}"
        ) from None


def is_torch(x: Any) -> bool:
    """Whether x is a torch object (outputs follow the kind of their first tensor argument)."""
    return type(x).__module__.split(".")[0] == "torch"


def float_dtype_arg(function: str, dtype: Any) -> np.dtype:
    """A ``dtype=`` argument as a numpy dtype, float32 or float64 (TypeError otherwise)."""
    dtype = np.dtype(dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"foveal: {function}: dtype must be float32 or float64, got {dtype}")
    return dtype
