"""Vector-quantization layers for training (docs/vq.md, "Training modules").

``VectorQuantize`` replaces each D-vector of its input by the nearest code of a codebook
``[K, D]`` and returns ``(quantized, indices, commit_loss)``: the forward value of
``quantized`` is the chosen codes, its gradient passes straight through to the input
(straight-through estimator), and ``commit_loss = commitment_weight · mean ‖x - sg(c)‖²`` pulls
the encoder towards its codes. The codebook is no parameter: in training mode each forward
moves it by exponential moving averages of the rows assigned to each code, seeds it by
k-means++ and Lloyd on the first batch (``kmeans_init``), and restarts dead codes (usage EMA
below ``threshold_dead``) on rows of the batch. ``ResidualVQ`` stacks quantizers on residuals.

The nearest-code search is foveal's C++ ``vq.assign`` (no ``[N, K]`` distance matrix) and the
k-means init is ``foveal.vq.VectorQuantizer.from_data``; both, with the EMA update and the
restart, are ``torch.library`` custom ops (``torch.ops.foveal.vq_assign``, ``.vq_kmeans_init``,
``.vq_ema_update``) with fake implementations, so ``torch.compile(fullgraph=True)`` traces a
module without graph breaks. Every result, gradients and codebook updates included, is bitwise
identical for any thread count.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
import torch.nn.functional as F

from foveal import vq as _vq

__all__ = ["ResidualVQ", "VectorQuantize"]


# --------------------------------------------------------------------------------------------
# Custom ops. Each reads detached float32 rows [N, D]; the mutating ones change the buffers
# they name only after every check has passed.


def _require_finite(function: str, x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"{function}: x must be finite, got {x[row, col].item()} at row {row}, "
            f"column {col} of its [N, D] view"
        )


@torch.library.custom_op("foveal::vq_assign", mutates_args=())
def _assign_op(
    x: torch.Tensor, codebook: torch.Tensor, cosine: bool, num_threads: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: [N, D], codebook: [K, D] -> (indices [N] int64, codes [N, D] = codebook[indices],
    counts [K] int64). The codes are gathered here, not by the caller: a compiled graph could
    otherwise read the codebook after the EMA update has changed it."""
    metric = "cosine" if cosine else "l2"  # vq.assign names a non-finite entry of x
    x = x.detach().contiguous()  # the kernel reads unit-stride rows
    indices = _vq.assign(x, codebook.detach(), metric=metric, num_threads=num_threads)[0]
    codes = codebook.detach().index_select(0, indices)
    return indices, codes, torch.bincount(indices, minlength=codebook.shape[0])


@_assign_op.register_fake
def _(x, codebook, cosine, num_threads):
    indices = x.new_empty(x.shape[0], dtype=torch.int64)
    return indices, x.new_empty(x.shape), x.new_empty(codebook.shape[0], dtype=torch.int64)


@torch.library.custom_op(
    "foveal::vq_kmeans_init", mutates_args=("codebook", "cluster_size", "code_sums", "initted")
)
def _kmeans_init_op(
    x: torch.Tensor,
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    code_sums: torch.Tensor,
    initted: torch.Tensor,
    cosine: bool,
    iterations: int,
    seed: int,
    num_threads: Optional[int],
) -> None:
    """Once (while ``initted`` is False): the codebook by k-means++ and Lloyd on x, N_k = 1."""
    if bool(initted):
        return
    x = x.detach().contiguous()
    _require_finite("VectorQuantize", x)
    quantizer = _vq.VectorQuantizer.from_data(
        x,
        codebook.shape[0],
        lloyd_iterations=iterations,
        seed=seed,
        num_threads=num_threads,
        metric="cosine" if cosine else "l2",
    )
    codebook.copy_(torch.from_numpy(quantizer.codebook))
    cluster_size.fill_(1.0)
    code_sums.copy_(codebook)
    initted.fill_(True)


@torch.library.custom_op(
    "foveal::vq_ema_update", mutates_args=("codebook", "cluster_size", "code_sums", "step")
)
def _ema_update_op(
    x: torch.Tensor,
    indices: torch.Tensor,
    counts: torch.Tensor,
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    code_sums: torch.Tensor,
    step: torch.Tensor,
    decay: float,
    epsilon: float,
    threshold_dead: float,
    cosine: bool,
    seed: int,
) -> None:
    """The EMA update of the statistics and the codebook, then the dead-code restart."""
    x = x.detach()
    num_codes = codebook.shape[0]
    # Sums per code in float64; index_add_ (and _fixed_order_sum below) add in an order that
    # does not depend on the thread count.
    sums = torch.zeros(code_sums.shape, dtype=torch.float64).index_add_(0, indices, x.double())
    cluster_size.mul_(decay).add_(counts.double(), alpha=1.0 - decay)
    code_sums.mul_(decay).add_(sums, alpha=1.0 - decay)
    total = _fixed_order_sum(cluster_size)
    smoothed = (cluster_size + epsilon) / (total + num_codes * epsilon) * total
    codes = code_sums / smoothed[:, None]
    if cosine:
        codes = F.normalize(codes, dim=1)
    codebook.copy_(codes)
    dead = (cluster_size < threshold_dead).nonzero().flatten()
    if dead.numel() > 0:
        generator = torch.Generator().manual_seed((seed * 1_000_003 + int(step)) % 2**63)
        rows = x.shape[0]
        if dead.numel() <= rows:
            chosen = torch.randperm(rows, generator=generator)[: dead.numel()]
        else:
            chosen = torch.randint(rows, (dead.numel(),), generator=generator)
        codebook[dead] = x[chosen]
        cluster_size[dead] = max(1.0, threshold_dead)
        code_sums[dead] = cluster_size[dead, None] * codebook[dead].double()
    step.add_(1)


@_kmeans_init_op.register_fake
def _(x, codebook, cluster_size, code_sums, initted, *options):
    return None


@_ema_update_op.register_fake
def _(x, indices, counts, codebook, cluster_size, code_sums, step, *options):
    return None


# --------------------------------------------------------------------------------------------
# Argument checks: a wrong argument raises before anything changes, naming it.


def _integer(function: str, name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{function}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{function}: {name} must be >= {minimum}, got {value}")
    return int(value)


def _real(function: str, name: str, value: object, low: float, high: float, closed: str) -> float:
    """value as float in [low, high] with the open ends as `closed` says ("[]", "()", "[)"...)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{function}: {name} must be a float, got {type(value).__name__}")
    value = float(value)
    low_ok = value >= low if closed[0] == "[" else value > low
    high_ok = value <= high if closed[1] == "]" else value < high
    if math.isnan(value) or not (low_ok and high_ok):
        raise ValueError(
            f"{function}: {name} must be in {closed[0]}{low}, {high}{closed[1]}, got {value}"
        )
    return value


def _threads(function: str, num_threads: object) -> Optional[int]:
    return None if num_threads is None else _integer(function, "num_threads", num_threads, 1)


def _rows(function: str, x: object, dim: int) -> torch.Tensor:
    """x: [..., D] float32 -> its [N, D] view."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{function}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise TypeError(f"{function}: x.dtype must be torch.float32, got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] != dim:
        raise ValueError(f"{function}: x must have shape [..., {dim}] (dim), got {list(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{function}: x must have at least one row, got shape {list(x.shape)}")
    if x.device.type != "cpu":
        raise ValueError(f"{function}: x must be on the CPU, got device {x.device}")
    return x.reshape(-1, dim)


def _fixed_order_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum of a vector, added in an order that does not depend on the thread count (torch's
    full reduction splits the work by threads): blocks of 1024 are summed one output each,
    until at most 1024 values are left for a serial sum."""
    while values.numel() > 1024:
        values = F.pad(values, (0, -values.numel() % 1024)).reshape(-1, 1024).sum(dim=1)
    return values.sum()


def _straight_through(rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The value of `codes` (bit for bit) with the gradient of the identity in `rows`."""
    return codes + (rows - rows.detach())


# --------------------------------------------------------------------------------------------
# Modules.


class VectorQuantize(torch.nn.Module):
    """Vector quantization with a straight-through estimator and an EMA codebook.

    Shapes: ``x [..., D]`` float32  ->  ``quantized [..., D]``, ``indices [...]`` int64,
    ``commit_loss []`` (a 0-dim tensor).

    ``quantized`` has the value of the chosen codes ``c[indices]`` (cosine: of the normalized
    input and codes) and the gradient of the identity with respect to x;
    ``commit_loss = commitment_weight · mean((x - c[indices])²)`` has a gradient for x only.
    In training mode a forward also (1) on its first call, when ``kmeans_init``, sets the
    codebook by k-means++ and ``kmeans_iters`` Lloyd steps on the batch; (2) after assigning,
    updates (g = decay) the usage EMA ``N_k ← gN_k + (1-g)n_k`` and the sums
    ``m_k ← gm_k + (1-g)Σ x`` and sets ``c_k = m_k / N̂_k`` (Laplace-smoothed ``N̂_k``, as
    ``foveal.vq.VectorQuantizer``);
    (3) moves every code with ``N_k < threshold_dead`` onto a row of the batch (drawn from a
    generator seeded by ``seed`` and the step) with ``N_k = max(1, threshold_dead)``. In eval
    mode nothing changes but the usage diagnostics.

    Diagnostics (of the last forward's batch, or of the codebook): ``perplexity``,
    ``codes_used``, ``num_dead_codes`` (``N_k < threshold_dead``), ``effective_rank`` (of the
    codebook, ``foveal.vq.effective_rank``).

    Buffers: ``codebook [K, D]`` float32, ``cluster_size [K]`` and ``code_sums [K, D]``
    float64, ``initted`` and ``step`` (saved in the state dict), ``last_counts [K]`` (not).
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        decay: float = 0.99,
        commitment_weight: float = 1.0,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        threshold_dead: float = 1e-3,
        cosine: bool = False,
        epsilon: float = 1e-5,
        seed: int = 0,
        num_threads: Optional[int] = None,
    ) -> None:
        super().__init__()
        fn = type(self).__name__
        self.dim = _integer(fn, "dim", dim, 1)
        self.codebook_size = _integer(fn, "codebook_size", codebook_size, 1)
        self.decay = _real(fn, "decay", decay, 0.0, 1.0, "()")
        self.commitment_weight = _real(
            fn, "commitment_weight", commitment_weight, 0.0, math.inf, "[)"
        )
        self.kmeans_init = bool(kmeans_init)
        self.kmeans_iters = _integer(fn, "kmeans_iters", kmeans_iters, 0)
        self.threshold_dead = _real(fn, "threshold_dead", threshold_dead, 0.0, math.inf, "[)")
        self.cosine = bool(cosine)
        self.epsilon = _real(fn, "epsilon", epsilon, 0.0, math.inf, "()")
        self.seed = _integer(fn, "seed", seed, 0)
        self.num_threads = _threads(fn, num_threads)
        generator = torch.Generator().manual_seed(self.seed)
        codebook = torch.randn(self.codebook_size, self.dim, generator=generator)
        if self.cosine:
            codebook = F.normalize(codebook, dim=1)
        self.register_buffer("codebook", codebook)
        self.register_buffer("cluster_size", torch.ones(self.codebook_size, dtype=torch.float64))
        self.register_buffer("code_sums", codebook.double())
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer(
            "last_counts", torch.zeros(self.codebook_size, dtype=torch.int64), persistent=False
        )

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, decay={self.decay}, "
            f"commitment_weight={self.commitment_weight}, kmeans_init={self.kmeans_init}, "
            f"threshold_dead={self.threshold_dead}, cosine={self.cosine}"
        )

    def _quantize(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows [N, D] (already normalized for cosine) -> (codes [N, D] without gradient,
        indices [N], commit_loss []); in training mode also the codebook updates."""
        detached = rows.detach()
        if self.training and self.kmeans_init:
            _kmeans_init_op(
                detached,
                self.codebook,
                self.cluster_size,
                self.code_sums,
                self.initted,
                self.cosine,
                self.kmeans_iters,
                self.seed,
                self.num_threads,
            )
        indices, codes, counts = _assign_op(detached, self.codebook, self.cosine, self.num_threads)
        self.last_counts.copy_(counts)
        if self.training:
            _ema_update_op(
                detached,
                indices,
                counts,
                self.codebook,
                self.cluster_size,
                self.code_sums,
                self.step,
                self.decay,
                self.epsilon,
                self.threshold_dead,
                self.cosine,
                self.seed,
            )
        commit_loss = _fixed_order_sum((rows - codes).square().sum(dim=1)) / rows.numel()
        return codes, indices, commit_loss * self.commitment_weight

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] float32 -> (quantized [..., D], indices [...] int64, commit_loss [])."""
        rows = _rows(type(self).__name__, x, self.dim)
        if self.cosine:
            rows = F.normalize(rows, dim=1)
        codes, indices, commit_loss = self._quantize(rows)
        quantized = _straight_through(rows, codes)
        return quantized.reshape(x.shape), indices.reshape(x.shape[:-1]), commit_loss

    @property
    def perplexity(self) -> float:
        """exp(entropy) of the code usage of the last forward's batch (1: collapse, K: even)."""
        return _vq.perplexity(self.last_counts)

    @property
    def codes_used(self) -> int:
        """The number of codes the last forward's batch used."""
        return int((self.last_counts > 0).sum())

    @property
    def num_dead_codes(self) -> int:
        """Codes whose usage EMA N_k is below threshold_dead (0 when the threshold is 0)."""
        return int((self.cluster_size < self.threshold_dead).sum())

    @property
    def effective_rank(self) -> float:
        """exp(entropy) of the codebook's normalized singular values: the directions it spans."""
        return _vq.effective_rank(self.codebook.detach().contiguous())


class ResidualVQ(torch.nn.Module):
    """``num_quantizers`` VectorQuantize stages on residuals: stage s quantizes
    ``r_s = x - Σ_{t<s} c_t`` (``r_0 = x``).

    Shapes: ``x [..., D]`` float32  ->  ``quantized [..., D]``, ``indices [..., S]`` int64,
    ``commit_loss [S]`` (one per stage; sum them for training).

    ``quantized`` has the value ``Σ_s c_s`` and the gradient of the identity (straight
    through); stage s's commitment loss ``commitment_weight · mean((r_s - c_s)²)`` reaches x
    through ``r_s``. Every keyword of VectorQuantize but ``cosine`` goes to each stage (stage
    s gets ``seed + s``); the stages are ``layers``, each with its own diagnostics and buffers.
    """

    def __init__(
        self, num_quantizers: int, dim: int, codebook_size: int, *, seed: int = 0, **options
    ) -> None:
        """options: the keywords of VectorQuantize (decay, commitment_weight, kmeans_init,
        kmeans_iters, threshold_dead, epsilon, num_threads) but cosine."""
        super().__init__()
        fn = type(self).__name__
        self.num_quantizers = _integer(fn, "num_quantizers", num_quantizers, 1)
        _integer(fn, "seed", seed, 0)
        if "cosine" in options:
            raise TypeError(f"{fn}: cosine is not supported (residuals are not unit vectors)")
        self.dim = dim
        self.layers = torch.nn.ModuleList(
            VectorQuantize(dim, codebook_size, seed=seed + s, **options)
            for s in range(self.num_quantizers)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [..., D] float32 -> (quantized [..., D], indices [..., S] int64, commit_loss [S])."""
        rows = _rows(type(self).__name__, x, self.dim)
        residual, total = rows, None
        all_indices, losses = [], []
        for layer in self.layers:
            codes, indices, loss = layer._quantize(residual)
            residual = residual - codes
            total = codes if total is None else total + codes
            all_indices.append(indices)
            losses.append(loss)
        quantized = _straight_through(rows, total)
        indices = torch.stack(all_indices, dim=1)
        return (
            quantized.reshape(x.shape),
            indices.reshape(*x.shape[:-1], self.num_quantizers),
            torch.stack(losses),
        )

    def _per_stage(self, name: str) -> list:
        return [getattr(layer, name) for layer in self.layers]

    perplexity = property(lambda self: self._per_stage("perplexity"), doc="Each stage's.")
    codes_used = property(lambda self: self._per_stage("codes_used"), doc="Each stage's.")
    num_dead_codes = property(lambda self: self._per_stage("num_dead_codes"), doc="Each stage's.")
    effective_rank = property(lambda self: self._per_stage("effective_rank"), doc="Each stage's.")
