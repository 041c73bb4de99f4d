"""Helpers shared by the modules of the foveal package (private).

The compiled module reads every tensor argument itself (numpy arrays, torch CPU tensors,
``__dlpack__`` and buffer-protocol objects) and checks every value, with messages naming the
argument; the Python layer only allocates outputs of the caller's kind. The conversion helpers
below serve the modules whose bindings still take numpy arrays.
"""

from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np

from . import _core

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
    return type(x).__module__.split(".")[0] == "torch"


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_int(function: str, name: str, value: Any) -> int:
    """An int argument: TypeError for other types, ValueError outside int64; an argument named
    ``num_threads`` must be in [0, _core.MAX_THREADS]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"foveal: {function}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if name == "num_threads":
        if not 0 <= value <= _core.MAX_THREADS:
            raise ValueError(
                f"foveal: {function}: num_threads must be in [0, {_core.MAX_THREADS}] "
                f"(0 = the global setting), got {value}"
            )
    elif not _INT64_MIN <= value <= _INT64_MAX:
        raise ValueError(
            f"foveal: {function}: {name} must fit in a 64-bit integer "
            f"([-2**63, 2**63 - 1]), got {value}"
        )
    return value


def _as_float(function: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"foveal: {function}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def _to_numpy(function: str, name: str, x: Any) -> np.ndarray:
    """A numpy view of x's memory (never a copy)."""
    if isinstance(x, np.ndarray):
        return x
    if is_torch(x):
        if x.device.type != "cpu":
            raise ValueError(
                f"foveal: {function}: {name} must be on the CPU, got device {x.device}"
            )
        import torch

        # Under torch.no_grad() no graph is recorded, so such a tensor is a plain input.
        if x.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                f"foveal: {function}: {name} requires grad; foveal.{function} computes the "
                "forward pass only: pass a tensor that does not require grad "
                "(torch.no_grad() or .detach())"
            )
        try:
            return x.numpy()
        except TypeError:  # a dtype numpy has no type for (bfloat16, ...)
            wanted = "float32 or float64" if x.is_floating_point() else "a dtype numpy can view"
            raise TypeError(f"foveal: {function}: {name} must be {wanted}, got {x.dtype}") from None
    if hasattr(x, "__dlpack__"):
        return np.from_dlpack(x)
    try:
        view = memoryview(x)
    except TypeError:
        raise TypeError(
            f"foveal: {function}: {name} must be a numpy array, a torch CPU tensor or an object "
            f"with __dlpack__ or the buffer protocol, got {type(x).__name__}"
        ) from None
    return np.asarray(view)


def _int_list(function: str, name: str, values: Any) -> list[int]:
    """A sequence of ints (a list, tuple or integer array) as a list; None gives []."""
    if values is None:
        return []
    array = np.asarray(values)
    if array.ndim != 1 or not (array.size == 0 or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(
            f"foveal: {function}: {name} must be a sequence of ints, got {type(values).__name__}"
        )
    return [int(value) for value in array]


def _check_array(function: str, name: str, array: np.ndarray, dims: str, dtype: np.dtype) -> None:
    ndim = len(dims.split(","))
    if array.ndim != ndim:
        raise ValueError(
            f"foveal: {function}: {name} must have {ndim} dimensions [{dims}], got {array.ndim} "
            f"(shape {tuple(array.shape)})"
        )
    if array.dtype != dtype:
        raise TypeError(
            f"foveal: {function}: {name} must have dtype {dtype.name} (the dtype of q), "
            f"got {array.dtype.name}"
        )


def _float_dtype(function: str, name: str, array: np.ndarray) -> np.dtype:
    if array.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"foveal: {function}: {name} must have dtype float32 or float64, got {array.dtype.name}"
        )
    return array.dtype


def float_dtype_arg(function: str, dtype: Any) -> np.dtype:
    """A ``dtype=`` argument as a numpy dtype, float32 or float64 (TypeError otherwise)."""
    dtype = np.dtype(dtype)
    if dtype not in _FLOAT_DTYPES:
        raise TypeError(f"foveal: {function}: dtype must be float32 or float64, got {dtype}")
    return dtype


def _torch_empty(shape: tuple, dtype: np.dtype) -> Any:
    """torch.empty of a numpy dtype; an allocation failure is MemoryError (torch raises
    RuntimeError), naming the shape and the byte count."""
    import torch

    torch_dtype = getattr(torch, np.dtype(dtype).name)
    try:
        return torch.empty(shape, dtype=torch_dtype)
    except RuntimeError as error:
        if "memory" not in str(error) and "allocat" not in str(error):
            raise
        nbytes = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
        raise MemoryError(
            f"foveal: cannot allocate an output tensor of shape {tuple(shape)} and dtype "
            f"{np.dtype(dtype).name} ({nbytes} bytes): {error}"
        ) from None


def _new_like(reference: Any, shape: tuple, dtype: np.dtype) -> tuple[Any, np.ndarray]:
    """A new uninitialized tensor of the reference's kind, and a numpy view of it."""
    if is_torch(reference):
        tensor = _torch_empty(shape, dtype)
        return tensor, tensor.numpy()
    array = np.empty(shape, dtype=dtype)
    return array, array


def _output(function: str, name: str, given: Any, like: Any, shape: tuple, dtype: np.dtype):
    """The output tensor and its numpy view: `given` when the caller passed one, else new."""
    if given is None:
        return _new_like(like, shape, dtype)
    array = _to_numpy(function, name, given)
    _check_array(function, name, array, ",".join("?" * len(shape)), dtype)
    if tuple(array.shape) != tuple(shape):
        raise ValueError(
            f"foveal: {function}: {name} must have shape {tuple(shape)}, got {tuple(array.shape)}"
        )
    return given, array


def extent(value: Any) -> int:
    """An int option as the extent of an output to allocate: its value when it is an int in
    [0, 2**63), else 0 (the compiled call then rejects the option, naming it)."""
    try:
        value = operator.index(value)
    except TypeError:
        return 0
    return value if 0 <= value < 2**63 else 0
