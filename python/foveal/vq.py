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
from ._common import new_like, shape

__all__ = ["Assignment", "ResidualVQ", "VectorQuantizer", "assign", "effective_rank", "perplexity"]


class Assignment(NamedTuple):
    """``indices [N]`` (int64) and ``sq_distances [N]`` (the input's float dtype)."""

    indices: Any
    sq_distances: Any


def assign(
    x: Any, codebook: Any, *, metric: str = "l2", num_threads: Optional[int] = None
) -> Assignment:
    """x: [N, D], codebook: [K, D] (float32 or float64, the same)  ->  Assignment(indices [N]
    int64, sq_distances [N]): ``argmin_k ‖x_n - c_k‖²`` (cosine: of the normalized vectors,
    ``2 - 2 cos``), ties to the lowest k, distances clamped at 0."""
    rows = shape(x)[:1]
    indices, distances = new_like(x, rows, np.int64), new_like(x, rows)
    _core.vq_assign(x, codebook, indices, distances, metric=metric, num_threads=num_threads)
    return Assignment(indices, distances)


def perplexity(counts: Any) -> float:
    """counts: [K] int64 (e.g. ``np.bincount(indices, minlength=K)``)  ->  ``exp(-Σ p log p)``
    of the usage: 1 when one code takes everything, K when all are used equally; 0 for no use."""
    return _core.vq_perplexity(counts)


def effective_rank(matrix: Any) -> float:
    """matrix: [M, D] float32  ->  ``exp(H(s / Σs))`` of its singular values: how many
    directions the rows really span (embedding collapse shows as a small value)."""
    return _core.effective_rank(matrix)


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
        self._impl = _core.VectorQuantizer(
            codebook, metric=metric, decay=decay, epsilon=epsilon, dead_threshold=dead_threshold
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
        impl = _core.VectorQuantizer.from_data(
            x,
            num_codes=num_codes,
            lloyd_iterations=lloyd_iterations,
            seed=seed,
            num_threads=num_threads,
            **options,
        )
        return cls._wrap(impl)

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
        self._impl.set_codebook(codebook)

    def quantize(self, x: Any, *, num_threads: Optional[int] = None) -> tuple[Any, Any, Any]:
        """x: [N, D]  ->  (indices [N], quantized [N, D], sq_distances [N]). Changes no state."""
        rows = shape(x)[:1]
        indices = new_like(x, rows, np.int64)
        quantized = new_like(x, (*rows, self.dim), np.float32)
        distances = new_like(x, rows, np.float32)
        self._impl.quantize(x, indices, quantized, distances, num_threads=num_threads)
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
        self._impl.init_kmeans(
            x, lloyd_iterations=lloyd_iterations, seed=seed, num_threads=num_threads
        )

    def update(
        self, x: Any, *, update_codebook: bool = True, num_threads: Optional[int] = None
    ) -> Any:
        """x: [N, D]  ->  indices [N]: assigns the batch, counts its codes and applies the EMA
        update (the codebook moves only when ``update_codebook``)."""
        indices = new_like(x, shape(x)[:1], np.int64)
        self._impl.update(x, indices, update_codebook=update_codebook, num_threads=num_threads)
        return indices

    def restart_dead_codes(self, x: Any, *, seed: int = 0) -> int:
        """Moves every dead code onto a row of x [N, D] drawn at random; returns how many."""
        return self._impl.restart_dead_codes(x, seed=seed)

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
        self._impl = _core.ResidualVQ(
            num_stages=num_stages,
            num_codes=num_codes,
            dim=dim,
            metric=metric,
            decay=decay,
            epsilon=epsilon,
            dead_threshold=dead_threshold,
        )

    num_stages = property(lambda self: self._impl.num_stages, doc="S")
    dim = property(lambda self: self._impl.dim, doc="D")

    def stage(self, s: int) -> VectorQuantizer:
        """The quantizer of stage s (shares state with this ResidualVQ): per-stage diagnostics."""
        return VectorQuantizer._wrap(self._impl.stage(s=s))

    def encode(self, x: Any, *, num_threads: Optional[int] = None) -> tuple[Any, Any]:
        """x: [N, D]  ->  (codes [N, S] int64, quantized [N, D] = the sum of the chosen codes)."""
        rows = shape(x)[:1]
        codes = new_like(x, (*rows, self.num_stages), np.int64)
        quantized = new_like(x, (*rows, self.dim), np.float32)
        self._impl.encode(x, codes, quantized, num_threads=num_threads)
        return codes, quantized

    def decode(self, codes: Any) -> Any:
        """codes: [N, S] int64, each in [0, K)  ->  [N, D], the sum of the chosen codes."""
        out = new_like(codes, (*shape(codes)[:1], self.dim), np.float32)
        self._impl.decode(codes, out)
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
        self._impl.init_kmeans(
            x, lloyd_iterations=lloyd_iterations, seed=seed, num_threads=num_threads
        )

    def update(
        self, x: Any, *, update_codebook: bool = True, num_threads: Optional[int] = None
    ) -> None:
        """Each stage in turn: update() on its residual."""
        self._impl.update(x, update_codebook=update_codebook, num_threads=num_threads)
