"""Vector quantization and codebook-collapse diagnostics (docs/vq.md).

``assign`` finds each row's nearest code (L2, or cosine: both sides normalized) by register
tiles with a running argmin, never forming the ``[N, K]`` distance matrix; ties go to the lowest
index and results are bitwise identical for any thread count. ``VectorQuantizer`` holds a
codebook with its usage statistics and the fixes for collapse (k-means++ and Lloyd
initialization, EMA updates with Laplace smoothing, dead-code restart); ``ResidualVQ`` stacks
quantizers on residuals. Tensors may be numpy arrays, torch CPU tensors or anything with
``__dlpack__`` or the buffer protocol; results have the kind of the input. Wrong dtypes raise
``TypeError``; wrong shapes or values (K = 0, NaN, decay outside (0, 1)) raise ``ValueError``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from . import _core
from ._common import _as_float, _as_int, _to_numpy, is_torch

__all__ = ["Assignment", "ResidualVQ", "VectorQuantizer", "assign", "effective_rank", "perplexity"]

_METRICS = ("l2", "cosine")


class Assignment(NamedTuple):
    """``indices [N]`` (int64) and ``sq_distances [N]`` (the input's float dtype)."""

    indices: Any
    sq_distances: Any


def _threads(function: str, num_threads: Optional[int]) -> int:
    return 0 if num_threads is None else _as_int(function, "num_threads", num_threads)


def _cosine(function: str, metric: str) -> bool:
    if metric not in _METRICS:
        raise ValueError(f"foveal: {function}: metric must be 'l2' or 'cosine', got {metric!r}")
    return metric == "cosine"


def _matrix(function: str, name: str, x: Any, dtypes: tuple = (np.float32,)) -> np.ndarray:
    """x as a 2-D numpy view of one of `dtypes` (never converted)."""
    array = _to_numpy(function, name, x)
    if array.dtype not in dtypes:
        allowed = " or ".join(np.dtype(dtype).name for dtype in dtypes)
        raise TypeError(
            f"foveal: {function}: {name} must have dtype {allowed}, got {array.dtype.name}"
        )
    if array.ndim != 2:
        raise ValueError(
            f"foveal: {function}: {name} must have 2 dimensions [N, D], got {array.ndim} "
            f"(shape {tuple(array.shape)})"
        )
    return array


def _new(like: Any, shape: tuple, dtype: Any) -> tuple[Any, np.ndarray]:
    """A new uninitialized tensor of like's kind (numpy or torch) and a numpy view of it."""
    if is_torch(like):
        import torch

        tensor = torch.from_numpy(np.empty(shape, dtype=dtype))
        return tensor, tensor.numpy()
    array = np.empty(shape, dtype=dtype)
    return array, array


def assign(
    x: Any, codebook: Any, *, metric: str = "l2", num_threads: Optional[int] = None
) -> Assignment:
    """x: [N, D], codebook: [K, D] (float32 or float64, the same)  ->  Assignment(indices [N]
    int64, sq_distances [N]): ``argmin_k ‖x_n - c_k‖²`` (cosine: of the normalized vectors,
    ``2 - 2 cos``), ties to the lowest k, distances clamped at 0."""
    function = "vq.assign"
    cosine = _cosine(function, metric)
    x_array = _matrix(function, "x", x, (np.float32, np.float64))
    codebook_array = _matrix(function, "codebook", codebook, (np.float32, np.float64))
    if codebook_array.dtype != x_array.dtype:
        raise TypeError(
            f"foveal: {function}: codebook must have dtype {x_array.dtype.name} (the dtype of "
            f"x), got {codebook_array.dtype.name}"
        )
    indices, indices_array = _new(x, (x_array.shape[0],), np.int64)
    distances, distances_array = _new(x, (x_array.shape[0],), x_array.dtype)
    _core.vq_assign(
        x_array,
        codebook_array,
        indices_array,
        distances_array,
        cosine,
        _threads(function, num_threads),
    )
    return Assignment(indices, distances)


def perplexity(counts: Any) -> float:
    """counts: [K] int64 (e.g. ``np.bincount(indices, minlength=K)``)  ->  ``exp(-Σ p log p)``
    of the usage: 1 when one code takes everything, K when all are used equally; 0 for no use."""
    array = _to_numpy("vq.perplexity", "counts", counts)
    if array.dtype != np.int64:
        raise TypeError(f"foveal: vq.perplexity: counts must have dtype int64, got {array.dtype}")
    return _core.vq_perplexity(array)


def effective_rank(matrix: Any) -> float:
    """matrix: [M, D] float32  ->  ``exp(H(s / Σs))`` of its singular values: how many
    directions the rows really span (embedding collapse shows as a small value)."""
    return _core.effective_rank(_matrix("vq.effective_rank", "matrix", matrix))


def _options(function: str, decay: Any, epsilon: Any, dead_threshold: Any) -> tuple:
    decay = _as_float(function, "decay", decay)
    epsilon = _as_float(function, "epsilon", epsilon)
    dead_threshold = _as_float(function, "dead_threshold", dead_threshold)
    if not 0 < decay < 1:
        raise ValueError(f"foveal: {function}: decay must be in (0, 1), got {decay}")
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise ValueError(f"foveal: {function}: epsilon must be finite and > 0, got {epsilon}")
    if not (np.isfinite(dead_threshold) and dead_threshold >= 0):
        raise ValueError(
            f"foveal: {function}: dead_threshold must be finite and >= 0, got {dead_threshold}"
        )
    return decay, epsilon, dead_threshold


def _init_kmeans(
    impl: Any, function: str, x: Any, lloyd_iterations: Any, seed: Any, num_threads: Any
) -> None:
    """Checks the arguments of an init_kmeans method and calls the compiled one."""
    impl.init_kmeans(
        _matrix(function, "x", x),
        _as_int(function, "lloyd_iterations", lloyd_iterations),
        _as_int(function, "seed", seed),
        _threads(function, num_threads),
    )


class VectorQuantizer:
    """A codebook ``[K, D]`` (float32) with the statistics of its use.

    ``update(x)`` assigns a batch, adds its counts to ``usage_counts()`` and applies the EMA
    update ``N_k ← gN_k + (1-g)n_k``, ``m_k ← gm_k + (1-g)Σ x``, ``c_k = m_k / N̂_k`` with the
    Laplace-smoothed ``N̂_k = (N_k + ε)/(ΣN + Kε)·ΣN``. A code whose usage EMA ``N_k`` is below
    ``dead_threshold`` is dead; ``restart_dead_codes(x)`` moves dead codes onto rows of x.
    Every method validates its input before changing any state.
    """

    def __init__(
        self,
        codebook: Any,
        *,
        metric: str = "l2",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_threshold: float = 1e-3,
    ) -> None:
        function = "VectorQuantizer"
        cosine = _cosine(function, metric)
        options = _options(function, decay, epsilon, dead_threshold)
        self._impl = _core.VectorQuantizer(
            _matrix(function, "codebook", codebook), cosine, *options
        )

    @classmethod
    def from_data(
        cls,
        x: Any,
        num_codes: int,
        *,
        lloyd_iterations: int = 10,
        seed: int = 0,
        num_threads: Optional[int] = None,
        **options: Any,
    ) -> VectorQuantizer:
        """A quantizer of ``num_codes`` codes initialized by k-means++ and Lloyd on x [N, D]."""
        x_array = _matrix("VectorQuantizer.from_data", "x", x)
        num_codes = _as_int("VectorQuantizer.from_data", "num_codes", num_codes)
        if num_codes < 1:
            raise ValueError(
                f"foveal: VectorQuantizer.from_data: num_codes must be >= 1, got {num_codes}"
            )
        quantizer = cls(np.zeros((num_codes, x_array.shape[1]), np.float32), **options)
        quantizer.init_kmeans(
            x_array, lloyd_iterations=lloyd_iterations, seed=seed, num_threads=num_threads
        )
        return quantizer

    @classmethod
    def _wrap(cls, impl: Any) -> VectorQuantizer:
        quantizer = cls.__new__(cls)
        quantizer._impl = impl
        return quantizer

    num_codes = property(lambda self: self._impl.num_codes, doc="K")
    dim = property(lambda self: self._impl.dim, doc="D")
    metric = property(lambda self: "cosine" if self._impl.cosine else "l2")
    decay = property(lambda self: self._impl.decay, doc="EMA decay (gamma)")
    epsilon = property(lambda self: self._impl.epsilon, doc="Laplace smoothing ε")
    dead_threshold = property(lambda self: self._impl.dead_threshold)

    @property
    def codebook(self) -> np.ndarray:
        """A copy of the codebook [K, D]."""
        return self._impl.codebook()

    @codebook.setter
    def codebook(self, codebook: Any) -> None:
        self._impl.set_codebook(_matrix("VectorQuantizer.codebook", "codebook", codebook))

    def quantize(self, x: Any, *, num_threads: Optional[int] = None) -> tuple[Any, Any, Any]:
        """x: [N, D]  ->  (indices [N], quantized [N, D], sq_distances [N]). Changes no state."""
        function = "VectorQuantizer.quantize"
        x_array = _matrix(function, "x", x)
        indices, indices_array = _new(x, (x_array.shape[0],), np.int64)
        quantized, quantized_array = _new(x, (x_array.shape[0], self.dim), np.float32)
        distances, distances_array = _new(x, (x_array.shape[0],), np.float32)
        self._impl.quantize(
            x_array,
            indices_array,
            quantized_array,
            distances_array,
            _threads(function, num_threads),
        )
        return indices, quantized, distances

    def init_kmeans(
        self,
        x: Any,
        *,
        lloyd_iterations: int = 10,
        seed: int = 0,
        num_threads: Optional[int] = None,
    ) -> None:
        """k-means++ seeding on x [N, D] (N >= 1) then ``lloyd_iterations`` Lloyd steps; resets
        the statistics."""
        _init_kmeans(
            self._impl, "VectorQuantizer.init_kmeans", x, lloyd_iterations, seed, num_threads
        )

    def update(
        self, x: Any, *, update_codebook: bool = True, num_threads: Optional[int] = None
    ) -> Any:
        """x: [N, D]  ->  indices [N]: assigns the batch, counts its codes and applies the EMA
        update (the codebook moves only when ``update_codebook``)."""
        function = "VectorQuantizer.update"
        x_array = _matrix(function, "x", x)
        indices, indices_array = _new(x, (x_array.shape[0],), np.int64)
        self._impl.update(
            x_array, indices_array, bool(update_codebook), _threads(function, num_threads)
        )
        return indices

    def restart_dead_codes(self, x: Any, *, seed: int = 0) -> int:
        """Moves every dead code onto a row of x [N, D] drawn at random; returns how many."""
        function = "VectorQuantizer.restart_dead_codes"
        return self._impl.restart_dead_codes(
            _matrix(function, "x", x), _as_int(function, "seed", seed)
        )

    def usage_counts(self) -> np.ndarray:
        """Rows assigned to each code by update() since construction or reset_usage(): [K]."""
        return self._impl.usage_counts()

    def cluster_size(self) -> np.ndarray:
        """The usage EMA N_k: [K] float64."""
        return self._impl.cluster_size()

    def reset_usage(self) -> None:
        self._impl.reset_usage()

    def perplexity(self) -> float:
        """Perplexity of usage_counts()."""
        return self._impl.perplexity()

    def num_dead_codes(self) -> int:
        """Codes whose usage EMA is below dead_threshold."""
        return self._impl.num_dead_codes()

    def codebook_effective_rank(self) -> float:
        """effective_rank of the codebook."""
        return self._impl.codebook_effective_rank()


class ResidualVQ:
    """S quantizers of K codes; stage s quantizes the residual the earlier stages left, giving
    codes ``[N, S]`` (the multi-codebook tokens of audio codecs)."""

    def __init__(
        self,
        num_stages: int,
        num_codes: int,
        dim: int,
        *,
        metric: str = "l2",
        decay: float = 0.99,
        epsilon: float = 1e-5,
        dead_threshold: float = 1e-3,
    ) -> None:
        function = "ResidualVQ"
        sizes = [
            _as_int(function, name, value)
            for name, value in (("num_stages", num_stages), ("num_codes", num_codes), ("dim", dim))
        ]
        for name, value in zip(("num_stages", "num_codes", "dim"), sizes):
            if value < 1:
                raise ValueError(f"foveal: {function}: {name} must be >= 1, got {value}")
        options = _options(function, decay, epsilon, dead_threshold)
        self._impl = _core.ResidualVQ(*sizes, _cosine(function, metric), *options)

    num_stages = property(lambda self: self._impl.num_stages, doc="S")
    dim = property(lambda self: self._impl.dim, doc="D")

    def stage(self, s: int) -> VectorQuantizer:
        """The quantizer of stage s (shares state with this ResidualVQ): per-stage diagnostics."""
        return VectorQuantizer._wrap(self._impl.stage(_as_int("ResidualVQ.stage", "s", s)))

    def encode(self, x: Any, *, num_threads: Optional[int] = None) -> tuple[Any, Any]:
        """x: [N, D]  ->  (codes [N, S] int64, quantized [N, D] = the sum of the chosen codes)."""
        function = "ResidualVQ.encode"
        x_array = _matrix(function, "x", x)
        codes, codes_array = _new(x, (x_array.shape[0], self.num_stages), np.int64)
        quantized, quantized_array = _new(x, (x_array.shape[0], self.dim), np.float32)
        self._impl.encode(x_array, codes_array, quantized_array, _threads(function, num_threads))
        return codes, quantized

    def decode(self, codes: Any) -> Any:
        """codes: [N, S] int64, each in [0, K)  ->  [N, D], the sum of the chosen codes."""
        function = "ResidualVQ.decode"
        array = _to_numpy(function, "codes", codes)
        if array.dtype != np.int64:
            raise TypeError(f"foveal: {function}: codes must have dtype int64, got {array.dtype}")
        if array.ndim != 2:
            raise ValueError(
                f"foveal: {function}: codes must have 2 dimensions [N, S], got {array.ndim}"
            )
        out, out_array = _new(codes, (array.shape[0], self.dim), np.float32)
        self._impl.decode(array, out_array)
        return out

    def init_kmeans(
        self,
        x: Any,
        *,
        lloyd_iterations: int = 10,
        seed: int = 0,
        num_threads: Optional[int] = None,
    ) -> None:
        """Each stage in turn: k-means++ and Lloyd on the residual of the stages before it."""
        _init_kmeans(self._impl, "ResidualVQ.init_kmeans", x, lloyd_iterations, seed, num_threads)

    def update(
        self, x: Any, *, update_codebook: bool = True, num_threads: Optional[int] = None
    ) -> None:
        """Each stage in turn: update() on its residual."""
        function = "ResidualVQ.update"
        self._impl.update(
            _matrix(function, "x", x), bool(update_codebook), _threads(function, num_threads)
        )
