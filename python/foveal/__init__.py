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
    "MAX_THREADS",
    "AttentionKernel",
    "KVCache",
    "attention",
    "attention_backward",
    "attention_kernel_names",
    "build_info",
    "decode_attention",
    "get_num_threads",
    "make_attention",
    "merge_states",
    "set_num_threads",
    "sliding_window_attention",
    "sliding_window_attention_backward",
    "sparsek_attention",
]

_FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def set_num_threads(num_threads: int) -> None:
    """Sets the number of threads foveal uses when a call names none; 0 restores the default
    (OpenMP's: OMP_NUM_THREADS or the core count, at most MAX_THREADS). Values outside
    [0, MAX_THREADS] raise ValueError. A call never starts more threads than it has tasks."""
    _core.set_num_threads(_as_int("set_num_threads", "num_threads", num_threads))


def get_num_threads() -> int:
    """Returns the number of threads a call that names none will use."""
    return _core.get_num_threads()


def build_info() -> dict:
    """How foveal was built and which ISA level its kernels run (docs/build.md).

    Returns a dict: ``version``; ``compiler``; ``compiled_levels``, the ISA levels the kernels
    were compiled for, lowest first (``"sse4.2"``, ``"avx2"``, ``"avx512"``; ``"native"`` in a
    ``FOVEAL_NATIVE`` build); ``supported_levels``, those this CPU runs; ``requested_level``,
    the environment variable ``FOVEAL_ISA`` (``"auto"`` when unset); ``level``, the level in
    use. The level is chosen once per process, at the first call that runs a kernel (or this
    one): ``FOVEAL_ISA``'s level, else the highest supported one. A ``FOVEAL_ISA`` that names
    no compiled level, or a level this CPU lacks, raises ValueError here and in every call
    that runs a kernel.
    """
    return _core.build_info()


# --------------------------------------------------------------------------------------------
# Conversion between the caller's tensors and numpy views of the same memory.


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


MAX_THREADS: int = _core.MAX_THREADS
"""The most threads a call's ``num_threads`` or :func:`set_num_threads` accepts (1024)."""

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _as_int(function: str, name: str, value: Any) -> int:
    """An int argument: TypeError for other types, ValueError outside int64; an argument named
    ``num_threads`` must be in [0, MAX_THREADS]."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"foveal: {function}: {name} must be an int, got {type(value).__name__}")
    value = int(value)
    if name == "num_threads":
        if not 0 <= value <= MAX_THREADS:
            raise ValueError(
                f"foveal: {function}: num_threads must be in [0, {MAX_THREADS}] "
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


def _float_dtype_arg(function: str, dtype: Any) -> np.dtype:
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
    if _is_torch(reference):
        tensor = _torch_empty(shape, dtype)
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
    (True = attend) is accepted too. A query that sees no key gets output 0 (and lse -inf); a
    NaN in q, or in the key or value of a key a query sees, gives NaN in that row only.

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


def sliding_window_attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    window_left: int,
    window_right: int = -1,
    causal: bool = False,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Local attention whose cost grows with ``L * window``, not ``L^2``.

    Same shapes, options and returns as :func:`attention` (no bias), but the window must be
    bounded: ``window_left >= 0`` keys before each query, and on the right ``causal=True`` or
    ``window_right >= 0``; the first ``sink_tokens`` keys stay visible (attention sinks). Runs
    the same kernel as ``attention`` with these options and gives the same bits; a window of at
    least Lk gives full (causal) attention.
    """
    function = "sliding_window_attention"
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
    q_array, k_array, v_array, _, dtype = _attention_arrays(function, q, k, v, None)
    outputs = _AttentionOutputs(function, q, q_array, v_array, out, return_lse, dtype)
    _core.sliding_window_attention(
        q_array, k_array, v_array, outputs.out_array, outputs.lse_array, **options
    )
    return outputs.result()


def _attention_backward(
    function: str,
    sliding: bool,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    bias: Any,
    options: dict,
):
    q_array, k_array, v_array, bias_array, dtype = _attention_arrays(function, q, k, v, bias)
    arrays = []
    for name, tensor, dims in (
        ("out", out, "B, Hq, Lq, Dv"),
        ("lse", lse, "B, Hq, Lq"),
        ("grad_out", grad_out, "B, Hq, Lq, Dv"),
    ):
        array = _to_numpy(function, name, tensor)
        _check_array(function, name, array, dims, dtype)
        arrays.append(array)
    grads = [_new_like(q, array.shape, dtype) for array in (q_array, k_array, v_array)]
    _core.attention_backward(
        sliding,
        q_array,
        k_array,
        v_array,
        *arrays,
        *(array for _, array in grads),
        bias_array,
        **options,
    )
    return tuple(tensor for tensor, _ in grads)


def attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    bias: Any = None,
    num_threads: Optional[int] = None,
):
    """The gradients of :func:`attention`: ``(grad_q, grad_k, grad_v)`` for the loss gradient
    ``grad_out`` ``[B, Hq, Lq, Dv]``, given the forward's ``out`` and ``lse`` (from
    ``return_lse=True``) and the same inputs and options. ``bias`` is read as in the forward and
    gets no gradient. grad_k and grad_v sum over the query heads of a GQA group. Recomputes the
    probabilities tile by tile (never an ``[Lq, Lk]`` matrix); bitwise identical for any
    thread count. For autograd use :func:`foveal.torch.attention`.
    """
    function = "attention_backward"
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
    return _attention_backward(function, False, q, k, v, out, lse, grad_out, bias, options)


def sliding_window_attention_backward(
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    grad_out: Any,
    *,
    window_left: int,
    window_right: int = -1,
    causal: bool = False,
    sink_tokens: int = 0,
    scale: Optional[float] = None,
    softcap: float = 0.0,
    q_offset: Optional[int] = None,
    num_threads: Optional[int] = None,
):
    """The gradients of :func:`sliding_window_attention` (see :func:`attention_backward`); work
    grows with ``L * window`` as in the forward."""
    function = "sliding_window_attention_backward"
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
    return _attention_backward(function, True, q, k, v, out, lse, grad_out, None, options)


def merge_states(
    out_a: Any,
    lse_a: Any,
    out_b: Any,
    lse_b: Any,
    *,
    out: Any = None,
    lse: Any = None,
    num_threads: Optional[int] = None,
):
    """Merges two attention states over disjoint sets of keys into the state over their union.

    ``out_a``, ``out_b``: ``[B, H, L, Dv]``; ``lse_a``, ``lse_b``: ``[B, H, L]`` (as returned by
    ``attention(..., return_lse=True)``). With ``m = max(lse_a, lse_b)``,
    ``w = exp(lse - m)``: ``out = (w_a out_a + w_b out_b) / (w_a + w_b)``,
    ``lse = m + log(w_a + w_b)``; a state with ``lse = -inf`` (no keys) has weight 0. Returns
    ``(out, lse)``. Pass ``out=out_a, lse=lse_a`` to merge in place. Every lse must be finite
    or -inf.
    """
    function = "merge_states"
    out_a_array = _to_numpy(function, "out_a", out_a)
    dtype = _float_dtype(function, "out_a", out_a_array)
    _check_array(function, "out_a", out_a_array, "B, H, L, Dv", dtype)
    lse_a_array = _to_numpy(function, "lse_a", lse_a)
    _check_array(function, "lse_a", lse_a_array, "B, H, L", dtype)
    out_b_array = _to_numpy(function, "out_b", out_b)
    _check_array(function, "out_b", out_b_array, "B, H, L, Dv", dtype)
    lse_b_array = _to_numpy(function, "lse_b", lse_b)
    _check_array(function, "lse_b", lse_b_array, "B, H, L", dtype)
    out_tensor, out_array = _output(function, "out", out, out_a, out_a_array.shape, dtype)
    lse_tensor, lse_array = _output(function, "lse", lse, out_a, out_a_array.shape[:3], dtype)
    _core.merge_states(
        out_a_array,
        lse_a_array,
        out_b_array,
        lse_b_array,
        out_array,
        lse_array,
        num_threads=0 if num_threads is None else _as_int(function, "num_threads", num_threads),
    )
    return out_tensor, lse_tensor


def _forwarded(name: str, doc: str) -> property:
    """A read-only property that reads the compiled cache's attribute `name`."""
    return property(lambda self: getattr(self._cache, name), doc=doc)


class KVCache:
    """Key/value storage for incremental decoding: keys ``[B, Hkv, capacity, D]`` and values
    ``[B, Hkv, capacity, Dv]`` with one length per sequence (a ragged batch).

    ``KVCache(batch, heads_kv, capacity, dim, dim_v=None, dtype="float32")`` owns zeroed
    storage; ``KVCache.wrap(keys, values)`` uses the caller's arrays or tensors (kept alive by
    the cache). With ``ring=True`` the cache is a ring buffer for sliding-window layers: once
    full, a new token overwrites the oldest one that is not among the first ``sink_tokens``;
    without it, appending past capacity raises ValueError. A rejected call changes nothing.

    Storage is zeroed lazily (untouched rows take no memory); a size that cannot be allocated
    raises MemoryError naming the byte count. Any number of threads may decode over one cache
    at once, but ``append``, ``truncate`` and ``reset`` must run alone: overlapping misuse
    raises ValueError ("the cache is being modified by another thread") and changes nothing.
    """

    def __init__(
        self,
        batch: int,
        heads_kv: int,
        capacity: int,
        dim: int,
        dim_v: Optional[int] = None,
        *,
        dtype: Any = "float32",
        ring: bool = False,
        sink_tokens: int = 0,
    ) -> None:
        function = "KVCache"
        dtype = _float_dtype_arg(function, dtype)
        sizes = [
            _as_int(function, name, value)
            for name, value in (
                ("batch", batch),
                ("heads_kv", heads_kv),
                ("capacity", capacity),
                ("dim", dim),
                ("dim_v", dim if dim_v is None else dim_v),
            )
        ]
        cache_class = _core.KVCacheF32 if dtype == np.float32 else _core.KVCacheF64
        self._cache = cache_class(
            *sizes, ring=bool(ring), sink_tokens=_as_int(function, "sink_tokens", sink_tokens)
        )
        self._dtype = dtype

    @classmethod
    def wrap(
        cls,
        keys: Any,
        values: Any,
        *,
        ring: bool = False,
        sink_tokens: int = 0,
        lengths: Any = None,
    ) -> KVCache:
        """A cache over existing storage: keys ``[B, Hkv, capacity, D]`` and values
        ``[B, Hkv, capacity, Dv]``, float32 or float64, writable, innermost dimension
        contiguous. The cache writes appended tokens into them. ``lengths`` (default all 0)
        says how many tokens each sequence already holds there (laid out as the cache lays them
        out), so storage filled elsewhere is adopted without a copy."""
        function = "KVCache.wrap"
        keys_array = _to_numpy(function, "keys", keys)
        dtype = _float_dtype(function, "keys", keys_array)
        _check_array(function, "keys", keys_array, "B, Hkv, capacity, D", dtype)
        values_array = _to_numpy(function, "values", values)
        _check_array(function, "values", values_array, "B, Hkv, capacity, Dv", dtype)
        cache_class = _core.KVCacheF32 if dtype == np.float32 else _core.KVCacheF64
        self = cls.__new__(cls)
        self._cache = cache_class.wrap(
            keys_array,
            values_array,
            ring=bool(ring),
            sink_tokens=_as_int(function, "sink_tokens", sink_tokens),
            lengths=_int_list(function, "lengths", lengths),
        )
        self._dtype = dtype
        return self

    dtype = property(lambda self: self._dtype, doc="float32 or float64 (numpy dtype).")
    batch = _forwarded("batch", "Number of sequences B.")
    heads_kv = _forwarded("heads_kv", "Number of key/value heads Hkv.")
    capacity = _forwarded("capacity", "Rows of storage per sequence and head.")
    dim = _forwarded("dim", "Key dimension D.")
    dim_v = _forwarded("dim_v", "Value dimension Dv.")
    ring = _forwarded("ring", "True for a ring buffer.")
    sink_tokens = _forwarded("sink_tokens", "Leading tokens a ring buffer never overwrites.")

    @property
    def lengths(self) -> list[int]:
        """Tokens appended to each sequence so far (the position of its next token)."""
        return list(self._cache.lengths)

    def first_retained(self, sequence: int) -> int:
        """Where the stored non-sink tokens of ``sequence`` begin (ring mode drops older ones):
        positions ``[max(first_retained, sink_tokens), length)`` are held."""
        return self._cache.first_retained(_as_int("KVCache.first_retained", "sequence", sequence))

    @property
    def keys(self) -> np.ndarray:
        """The key storage ``[B, Hkv, capacity, D]``, read-only (ring rows wrap)."""
        return self._cache.keys

    @property
    def values(self) -> np.ndarray:
        """The value storage ``[B, Hkv, capacity, Dv]``, read-only (ring rows wrap)."""
        return self._cache.values

    def append(self, k: Any, v: Any, *, counts: Any = None) -> None:
        """Appends ``k`` ``[B, Hkv, n, D]`` and ``v`` ``[B, Hkv, n, Dv]`` to every sequence; with
        ``counts`` (B ints in [0, n]) sequence b takes only its first ``counts[b]`` steps."""
        function = "KVCache.append"
        k_array = _to_numpy(function, "k", k)
        _check_array(function, "k", k_array, "B, Hkv, n, D", self._dtype)
        v_array = _to_numpy(function, "v", v)
        _check_array(function, "v", v_array, "B, Hkv, n, Dv", self._dtype)
        count_list = None if counts is None else _int_list(function, "counts", counts)
        self._cache.append(k_array, v_array, counts=count_list)

    def truncate(self, length: int, *, sequence: Optional[int] = None) -> None:
        """Cuts every sequence longer than ``length`` to ``length`` (speculative-decoding
        rollback); with ``sequence``, cuts only that one (``length`` <= its length)."""
        function = "KVCache.truncate"
        length = _as_int(function, "length", length)
        if sequence is None:
            self._cache.truncate(length)
        else:
            self._cache.truncate_sequence(_as_int(function, "sequence", sequence), length)

    def reset(self) -> None:
        """Empties every sequence."""
        self._cache.reset()

    def __repr__(self) -> str:
        mode = f", ring=True, sink_tokens={self.sink_tokens}" if self.ring else ""
        return (
            f"foveal.KVCache(batch={self.batch}, heads_kv={self.heads_kv}, "
            f"capacity={self.capacity}, dim={self.dim}, dim_v={self.dim_v}, "
            f"dtype={self._dtype.name}{mode}, lengths={self.lengths})"
        )


def decode_attention(
    q: Any,
    cache: KVCache,
    *,
    scale: Optional[float] = None,
    causal: bool = False,
    window_left: int = -1,
    window_right: int = -1,
    sink_tokens: int = 0,
    softcap: float = 0.0,
    return_lse: bool = False,
    out: Any = None,
    num_threads: Optional[int] = None,
):
    """Attention of the newest ``Lq`` tokens of every sequence over its cached keys.

    ``q``: ``[B, Hq, Lq, D]`` (Hq a multiple of the cache's Hkv) -> out ``[B, Hq, Lq, Dv]``.
    Query i of sequence b sits at position ``length_b - Lq + i``: append the new tokens' keys
    and values first. Options as in :func:`attention` (``causal=True`` for verifying Lq > 1
    speculative drafts; windows and sinks for local layers, also over a ring buffer). The
    keys are split into fixed chunks computed in parallel and merged in order, so results do not
    depend on the thread count. A NaN in q or in a key or value a query sees makes its row NaN,
    as in :func:`attention`.
    """
    function = "decode_attention"
    if not isinstance(cache, KVCache):
        raise TypeError(
            f"foveal: {function}: cache must be a foveal.KVCache, got {type(cache).__name__}"
        )
    options = _option_args(
        function,
        scale,
        causal,
        window_left,
        window_right,
        sink_tokens,
        softcap,
        None,
        num_threads,
    )
    del options["q_offset"]
    q_array = _to_numpy(function, "q", q)
    _check_array(function, "q", q_array, "B, Hq, Lq, D", cache.dtype)
    out_shape = (*q_array.shape[:3], cache.dim_v)
    out_tensor, out_array = _output(function, "out", out, q, out_shape, cache.dtype)
    lse_tensor, lse_array = _new_like(q, out_shape[:3], cache.dtype) if return_lse else (None, None)
    cache._cache.decode(q_array, out_array, lse_array, **options)
    return (out_tensor, lse_tensor) if return_lse else out_tensor


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


from . import pde_ssm as pde_ssm  # noqa: E402  (after the helpers it uses)
from . import spade as spade  # noqa: E402  (after the helpers it uses)
from . import sparsek as sparsek  # noqa: E402
from . import vq as vq  # noqa: E402
from .sparsek import sparsek_attention as sparsek_attention  # noqa: E402
