"""foveal: efficient attention and embedding operators for CPUs.

Every function takes numpy arrays, torch CPU tensors, or anything with ``__dlpack__`` or the
buffer protocol, without copying, and returns the kind of its first tensor argument (numpy in,
numpy out; torch in, torch out). Wrong dtypes raise ``TypeError``; wrong shapes or values raise
``ValueError`` whose message names the argument, the expected and the actual value.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from . import _core

__version__: str = _core.__version__

__all__ = [
    "AttentionKernel",
    "attention",
    "attention_kernel_names",
    "get_num_threads",
    "make_attention",
    "set_num_threads",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads foveal uses when a call names none; 0 restores the default."""
    _core.set_num_threads(_as_int("set_num_threads", "num_threads", num_threads))


def get_num_threads() -> int:
    """Returns the number of threads a call that names none will use."""
    return _core.get_num_threads()


# --------------------------------------------------------------------------------------------
# Conversion between the caller's tensors and numpy views of the same memory.


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _as_int(function: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"foveal: {function}: {name} must be an int, got {type(value).__name__}")
    return int(value)


def _as_float(function: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"foveal: {function}: {name} must be a number, got {type(value).__name__}")
    return float(value)


def _to_numpy(function: str, name: str, x: Any) -> np.ndarray:
    """A numpy view of x's memory (never a copy)."""
    if isinstance(x, np.ndarray):
        return x
    if _is_torch(x):
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
        return x.numpy()
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


def _new_like(reference: Any, shape: tuple, dtype: np.dtype) -> tuple[Any, np.ndarray]:
    """A new uninitialized tensor of the reference's kind, and a numpy view of it."""
    if _is_torch(reference):
        import torch

        tensor = torch.empty(shape, dtype=torch.float32 if dtype == np.float32 else torch.float64)
        return tensor, tensor.numpy()
    array = np.empty(shape, dtype=dtype)
    return array, array


def _bias_array(function: str, bias: Any, dtype: np.dtype) -> np.ndarray:
    """bias as a 4-D array of q's dtype; a boolean mask (True = attend) becomes 0 / -inf."""
    array = _to_numpy(function, "bias", bias)
    if array.ndim not in (2, 3, 4):
        raise ValueError(
            f"foveal: {function}: bias must have 2, 3 or 4 dimensions ([Lq, Lk], [Hq, Lq, Lk] or "
            f"[B, Hq, Lq, Lk], size-1 B and Hq broadcast), got {array.ndim}"
        )
    if array.dtype == np.bool_:
        array = np.where(array, dtype.type(0), dtype.type(-np.inf))
    elif array.dtype != dtype:
        raise TypeError(
            f"foveal: {function}: bias must have dtype {dtype.name} (the dtype of q) or bool, "
            f"got {array.dtype.name}"
        )
    return array.reshape((1,) * (4 - array.ndim) + array.shape)


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


# --------------------------------------------------------------------------------------------
# Attention.


def _option_args(
    function: str,
    scale: Optional[float],
    causal: bool,
    window_left: int,
    window_right: int,
    sink_tokens: int,
    softcap: float,
    q_offset: Optional[int],
    num_threads: Optional[int],
) -> dict:
    if scale is not None:
        scale = _as_float(function, "scale", scale)
        if not scale > 0:
            raise ValueError(
                f"foveal: {function}: scale must be finite and > 0 (None = 1/sqrt(D)), got {scale}"
            )
    return dict(
        scale=0.0 if scale is None else scale,
        causal=bool(causal),
        window_left=_as_int(function, "window_left", window_left),
        window_right=_as_int(function, "window_right", window_right),
        sink_tokens=_as_int(function, "sink_tokens", sink_tokens),
        softcap=_as_float(function, "softcap", softcap),
        q_offset=-1 if q_offset is None else _as_int(function, "q_offset", q_offset),
        num_threads=0 if num_threads is None else _as_int(function, "num_threads", num_threads),
    )


def _attention_arrays(function: str, q: Any, k: Any, v: Any, bias: Any):
    q_array = _to_numpy(function, "q", q)
    dtype = _float_dtype(function, "q", q_array)
    _check_array(function, "q", q_array, "B, Hq, Lq, D", dtype)
    k_array = _to_numpy(function, "k", k)
    _check_array(function, "k", k_array, "B, Hkv, Lk, D", dtype)
    v_array = _to_numpy(function, "v", v)
    _check_array(function, "v", v_array, "B, Hkv, Lk, Dv", dtype)
    bias_array = None if bias is None else _bias_array(function, bias, dtype)
    return q_array, k_array, v_array, bias_array, dtype


class _AttentionOutputs:
    """out [B, Hq, Lq, Dv] (given or new) and, when asked for, lse [B, Hq, Lq], as tensors of
    q's kind and as the numpy views the kernels write."""

    def __init__(
        self,
        function: str,
        q: Any,
        q_array: np.ndarray,
        v_array: np.ndarray,
        out: Any,
        return_lse: bool,
        dtype: np.dtype,
    ) -> None:
        out_shape = (*q_array.shape[:3], v_array.shape[3])
        self.out_tensor, self.out_array = _output(function, "out", out, q, out_shape, dtype)
        self.return_lse = return_lse
        self.lse_tensor, self.lse_array = (
            _new_like(q, out_shape[:3], dtype) if return_lse else (None, None)
        )

    def result(self):
        return (self.out_tensor, self.lse_tensor) if self.return_lse else self.out_tensor


def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    bias: Any = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Exact attention: ``softmax(scale * q @ k^T + bias, masked) @ v``, never forming [Lq, Lk].

    Shapes: q ``[B, Hq, Lq, D]``, k ``[B, Hkv, Lk, D]``, v ``[B, Hkv, Lk, Dv]`` -> out
    ``[B, Hq, Lq, Dv]``; Hq must be a multiple of Hkv (GQA/MQA). ``[B, L, H, D]`` memory is
    passed as ``x.transpose(1, 2)`` (a view; no copy). Float32 or float64, all the same dtype.

    Query i sits at position ``q_offset + i`` (default ``Lk - Lq``, bottom-right aligned) and
    sees key j when ``pos(i) - window_left <= j <= pos(i) + window_right`` (-1 = unbounded;
    ``causal=True`` is ``window_right=0``) or ``j < sink_tokens``. ``softcap`` > 0 applies
    ``softcap * tanh(logit / softcap)`` before ``bias`` is added. ``bias`` is additive,
    ``[B or 1, Hq or 1, Lq, Lk]`` (or ``[Lq, Lk]``, ``[Hq, Lq, Lk]``); a boolean mask
    (True = attend) is accepted too. A query that sees no key gets output 0 (and lse -inf).

    Returns ``out``, or ``(out, lse)`` with ``return_lse=True`` (lse ``[B, Hq, Lq]``, natural
    log of each row's softmax denominator). ``out=`` writes into a given tensor.
    ``num_threads`` overrides the global setting for this call.
    """
    function = "attention"
    options = _option_args(
        function,
        scale,
        causal,
        window_left,
        window_right,
        sink_tokens,
        softcap,
        q_offset,
        num_threads,
    )
    q_array, k_array, v_array, bias_array, dtype = _attention_arrays(function, q, k, v, bias)
    outputs = _AttentionOutputs(function, q, q_array, v_array, out, return_lse, dtype)
    _core.attention(
        q_array, k_array, v_array, outputs.out_array, outputs.lse_array, bias_array, **options
    )
    return outputs.result()


def attention_kernel_names() -> list[str]:
    """The names make_attention accepts, sorted."""
    return list(_core.attention_kernel_names())


class AttentionKernel:
    """An attention kernel chosen by name and bound to its options (see make_attention)."""

    def __init__(self, kernel: Any) -> None:
        self._kernel = kernel

    @property
    def name(self) -> str:
        return self._kernel.name

    def __call__(
        self,
        q: Any,
        k: Any,
        v: Any,
        *,
        bias: Any = None,
        return_lse: bool = False,
        out: Any = None,
        **extras: Any,
    ):
        """Runs the kernel: same shapes and returns as foveal.attention; extras are named
        kernel inputs of shape [*, *, *] (e.g. SparseK's scores)."""
        function = f"{self.name} attention"
        q_array, k_array, v_array, bias_array, dtype = _attention_arrays(function, q, k, v, bias)
        extra_arrays = {}
        for extra_name, extra in extras.items():
            array = _to_numpy(function, extra_name, extra)
            _check_array(function, extra_name, array, "?, ?, ?", dtype)
            extra_arrays[extra_name] = array
        outputs = _AttentionOutputs(function, q, q_array, v_array, out, return_lse, dtype)
        self._kernel.forward(
            q_array,
            k_array,
            v_array,
            outputs.out_array,
            outputs.lse_array,
            bias_array,
            extra_arrays,
        )
        return outputs.result()

    def __repr__(self) -> str:
        return f"foveal.AttentionKernel({self.name!r})"


def make_attention(
    name: str,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
    **params: Any,
) -> AttentionKernel:
    """Builds the attention kernel registered as ``name`` ("dense", ...) with these options;
    kernel-specific settings go in ``params`` (e.g. ``topk=256``). Unknown names raise
    ValueError listing the known ones."""
    function = "make_attention"
    options = _option_args(
        function,
        scale,
        causal,
        window_left,
        window_right,
        sink_tokens,
        softcap,
        q_offset,
        num_threads,
    )
    string_params = {key: str(value) for key, value in params.items()}
    return AttentionKernel(_core.make_attention(name, params=string_params, **options))


from . import spade as spade  # noqa: E402  (after the helpers it uses)
