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
# The 16-bit storage types: computed in float32, lse float32. numpy has float16 only.
HALF_DTYPES = ("bfloat16", "float16")
_STORAGE_DTYPES = ("float32", "float64", *HALF_DTYPES)

ATTENTION_OPTIONS = (
    "scale",
    "causal",
    "window_left",
    "window_right",
    "sink_tokens",
    "softcap",
    "q_offset",
    "num_threads",
    "key_start",
    "key_length",
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


def dtype_name(dtype: Any) -> str:
    """The name of a numpy dtype, a torch dtype or a name ("float32", "bfloat16", ...)."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        return dtype
    if type(dtype).__module__.split(".")[0] == "torch":
        return str(dtype).replace("torch.", "")
    return np.dtype(dtype).name


def tensor_dtype_name(x: Any) -> str:
    """The name of x's dtype ("" for what is no tensor)."""
    if is_torch(x):
        return str(x.dtype).replace("torch.", "")
    view = _numpy_view(x)
    return "" if view is None else view.dtype.name


def lse_dtype(dtype: Any) -> Any:
    """The dtype of lse next to outputs of ``dtype``: float32 for the 16-bit types."""
    return np.dtype(np.float32) if dtype_name(dtype) in HALF_DTYPES else dtype


def new_like(like: Any, shape: tuple, dtype: Any = None) -> Any:
    """A new uninitialized tensor of the kind of ``like`` (torch for a torch tensor, else numpy),
    with ``like``'s dtype unless ``dtype`` (a numpy dtype or a dtype name) is given."""
    if is_torch(like):
        import torch

        torch_dtype = like.dtype if dtype is None else getattr(torch, dtype_name(dtype))
        return _allocate(torch.empty, shape, torch_dtype)
    if dtype is None:
        view = _numpy_view(like)
        dtype = np.float32 if view is None else view.dtype
    if dtype_name(dtype) == "bfloat16":
        raise TypeError(
            "foveal: numpy has no bfloat16: pass torch tensors to work with bfloat16 caches"
        )
    return _allocate(np.empty, shape, dtype)


def attention_outputs(q: Any, v: Any, out: Any, return_lse: bool) -> tuple[Any, Any]:
    """out ``[B, Hq, Lq, Dv]`` (the given one, or new of q's kind and dtype) and, when asked for,
    lse ``[B, Hq, Lq]`` (float32 for 16-bit q). Shapes and dtypes are checked by the compiled
    call."""
    q_shape = shape(q)
    if out is None:
        out = new_like(q, q_shape[:3] + shape(v)[3:4])
    if not return_lse:
        return out, None
    half = tensor_dtype_name(q) in HALF_DTYPES
    return out, new_like(q, q_shape[:3], np.float32 if half else None)


def cache_outputs(q: Any, cache: Any, out: Any, return_lse: bool) -> tuple[Any, Any]:
    """out ``[S, Hq, Lq, Dv]`` (the given one, or new of q's kind in the cache's dtype) and, when
    asked for, lse ``[S, Hq, Lq]`` (float32 for a 16-bit cache), for attention over a cache
    (``dim_v`` and ``dtype``)."""
    q_shape = shape(q)
    # An 8-bit cache takes and gives float32.
    dtype = np.dtype(np.float32) if dtype_name(cache.dtype) == "int8" else cache.dtype
    if out is None:
        out = new_like(q, (*q_shape[:3], cache.dim_v), dtype)
    return out, new_like(q, q_shape[:3], lse_dtype(dtype)) if return_lse else None


def forwarded(name: str, doc: str) -> property:
    """A read-only property reading the attribute ``name`` of the compiled object ``_cache``."""
    return property(lambda self: getattr(self._cache, name), doc=doc)


class CacheGeometry:
    """The properties every cache class shares (it keeps the compiled cache in ``_cache`` and
    its numpy dtype in ``_dtype``)."""

    _dtype: Any
    dtype = property(
        lambda self: self._dtype,
        doc="float32, float64, float16 or int8 (a numpy dtype), or the name 'bfloat16'.",
    )
    heads_kv = forwarded("heads_kv", "Number of key/value heads Hkv.")
    dim = forwarded("dim", "Key dimension D.")
    dim_v = forwarded("dim_v", "Value dimension Dv.")


def _allocate(empty: Any, shape: tuple, dtype: Any) -> Any:
    """empty(shape, dtype=dtype); running out of memory is MemoryError naming the shape and the
    byte count (torch raises RuntimeError), and so is a shape whose strides do not fit 64 bits
    (torch: "Stride calculation overflowed", even for an empty shape)."""
    try:
        return empty(shape, dtype=dtype)
    except (RuntimeError, MemoryError) as error:
        if isinstance(error, RuntimeError) and not any(
            word in str(error) for word in ("memory", "allocat", "overflow")
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


def storage_dtype_arg(function: str, dtype: Any) -> Any:
    """A ``dtype=`` argument of a cache that may hold 16-bit values: float32, float64 or float16
    as a numpy dtype, bfloat16 as the name "bfloat16" (names, numpy and torch dtypes accepted;
    TypeError otherwise)."""
    try:
        name = dtype_name(dtype)
    except TypeError:
        name = str(dtype)
    if name not in _STORAGE_DTYPES:
        raise TypeError(
            f"foveal: {function}: dtype must be float32, float64, bfloat16 or float16, got {dtype}"
        )
    return name if name == "bfloat16" else np.dtype(name)


def cache_dtype_arg(function: str, dtype: Any) -> Any:
    """A ``dtype=`` argument of a KV cache: what :func:`storage_dtype_arg` takes, or int8 (an
    8-bit cache, as ``np.dtype(np.int8)``; numpy and torch int8 and the name accepted)."""
    try:
        if dtype_name(dtype) == "int8":
            return np.dtype(np.int8)
    except TypeError:
        pass
    try:
        return storage_dtype_arg(function, dtype)
    except TypeError:
        raise TypeError(
            f"foveal: {function}: dtype must be float32, float64, bfloat16, float16 or int8, "
            f"got {dtype}"
        ) from None


def storage_array(array: np.ndarray, dtype: Any) -> Any:
    """The cache's storage as handed out by the compiled module; bfloat16 storage comes as its
    uint16 bits and is returned as a read-only-in-spirit torch.bfloat16 view of them."""
    if dtype_name(dtype) != "bfloat16":
        return array
    import warnings

    import torch

    with warnings.catch_warnings():  # torch warns that the array is not writable
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array).view(torch.bfloat16)


def dtype_of_class(classes: dict, cache: Any) -> Any:
    """The dtype (as storage_dtype_arg gives it) of a compiled cache object, by its class among
    ``classes`` (dtype name -> compiled class)."""
    for name, cache_class in classes.items():
        if type(cache) is cache_class:
            return cache_dtype_arg("cache", name)
    raise TypeError(f"foveal: not a compiled cache: {type(cache).__name__}")


def float_dtype_arg(function: str, dtype: Any) -> np.dtype:
    """A ``dtype=`` argument as a numpy dtype, float32 or float64 (TypeError otherwise)."""
    dtype = np.dtype(dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"foveal: {function}: dtype must be float32 or float64, got {dtype}")
    return dtype
