"""Stubs for foveal._core, the compiled half of the package (python/foveal/_core.cpp).

Arrays are numpy arrays as they are: no conversion happens here. foveal/__init__.py converts
the caller's tensors, fills the defaults and checks types before calling these functions.
"""

from collections.abc import Mapping
from typing import Any, SupportsFloat, SupportsIndex, SupportsInt

import numpy.typing as npt

__version__: str

_Array = npt.NDArray[Any]
_Float = SupportsFloat | SupportsIndex
_Int = SupportsInt | SupportsIndex

# The largest num_threads any call or set_num_threads accepts (1024).
MAX_THREADS: int

# Sets the number of threads a call that names none uses; 0 restores the default.
def set_num_threads(num_threads: _Int) -> None: ...

# The number of threads a call that names none uses (>= 1).
def get_num_threads() -> int: ...

# q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
# lse: [B, Hq, Lq] or None; bias: [B or 1, Hq or 1, Lq, Lk] or None. All float32 or all
# float64. scale 0 -> 1/sqrt(D); window -1 -> unbounded; q_offset -1 -> Lk - Lq;
# num_threads 0 -> the global setting. Writes out (and lse); releases the GIL.
def attention(
    q: _Array,
    k: _Array,
    v: _Array,
    out: _Array,
    lse: _Array | None,
    bias: _Array | None,
    scale: _Float,
    causal: bool,
    window_left: _Int,
    window_right: _Int,
    sink_tokens: _Int,
    softcap: _Float,
    q_offset: _Int,
    num_threads: _Int,
) -> None: ...

# The names make_attention accepts, sorted.
def attention_kernel_names() -> list[str]: ...

class AttentionKernel:
    # The name the kernel was registered under.
    @property
    def name(self) -> str: ...
    # Same tensors as attention(); extras are named kernel inputs of shape [*, *, *].
    def forward(
        self,
        q: _Array,
        k: _Array,
        v: _Array,
        out: _Array,
        lse: _Array | None,
        bias: _Array | None,
        extras: Mapping[str, _Array],
    ) -> None: ...

# Builds the kernel registered as `name` with these options and kernel-specific params.
def make_attention(
    name: str,
    scale: _Float,
    causal: bool,
    window_left: _Int,
    window_right: _Int,
    sink_tokens: _Int,
    softcap: _Float,
    q_offset: _Int,
    num_threads: _Int,
    params: Mapping[str, str],
) -> AttentionKernel: ...

# Same as attention() without bias; the window must be bounded (window_left >= 0, and causal
# or window_right >= 0).
def sliding_window_attention(
    q: _Array,
    k: _Array,
    v: _Array,
    out: _Array,
    lse: _Array | None,
    scale: _Float,
    causal: bool,
    window_left: _Int,
    window_right: _Int,
    sink_tokens: _Int,
    softcap: _Float,
    q_offset: _Int,
    num_threads: _Int,
) -> None: ...

# out_a, out_b, out: [B, H, L, Dv]; lse_a, lse_b, lse: [B, H, L]. Writes the merged state; out
# may be out_a or out_b (in place).
def merge_states(
    out_a: _Array,
    lse_a: _Array,
    out_b: _Array,
    lse_b: _Array,
    out: _Array,
    lse: _Array | None,
    num_threads: _Int,
) -> None: ...

# KVCache<float> / KVCache<double>: storage [B, Hkv, capacity, D] and [B, Hkv, capacity, Dv].
class _KVCache:
    def __init__(
        self,
        batch: _Int,
        heads_kv: _Int,
        capacity: _Int,
        dim: _Int,
        dim_v: _Int,
        ring: bool,
        sink_tokens: _Int,
    ) -> None: ...
    # Adopts caller storage (kept alive) holding `lengths` tokens per sequence ([] = none).
    @staticmethod
    def wrap(
        keys: _Array, values: _Array, ring: bool, sink_tokens: _Int, lengths: list[int]
    ) -> _KVCache: ...
    @property
    def batch(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dim_v(self) -> int: ...
    @property
    def ring(self) -> bool: ...
    @property
    def sink_tokens(self) -> int: ...
    @property
    def lengths(self) -> list[int]: ...
    def first_retained(self, sequence: _Int) -> int: ...
    # Read-only numpy views of the storage.
    @property
    def keys(self) -> _Array: ...
    @property
    def values(self) -> _Array: ...
    # k: [B, Hkv, n, D], v: [B, Hkv, n, Dv]; counts (B values in [0, n]) or None for n each.
    def append(self, k: _Array, v: _Array, counts: list[int] | None) -> None: ...
    def truncate(self, length: _Int) -> None: ...
    def truncate_sequence(self, sequence: _Int, length: _Int) -> None: ...
    def reset(self) -> None: ...
    # decode_attention(q, cache, options, out, lse) with q_offset -1.
    def decode(
        self,
        q: _Array,
        out: _Array,
        lse: _Array | None,
        scale: _Float,
        causal: bool,
        window_left: _Int,
        window_right: _Int,
        sink_tokens: _Int,
        softcap: _Float,
        num_threads: _Int,
    ) -> None: ...

class KVCacheF32(_KVCache): ...
class KVCacheF64(_KVCache): ...

# ---------------------------------------------------------------------------------------------
# SPADE (python/foveal/_spade.cpp). ids: int64, values / weights: float32, masks: uint8. A
# None array stands for a part the schema does not have (no discrete or no continuous feature).

class SpadeSchema:
    # One entry per feature in each list; shift 0 -> the default f + 1. Validates.
    def __init__(
        self,
        names: list[str],
        discrete: list[bool],
        vocab_sizes: list[_Int],
        pad_ids: list[_Int],
        missing_ids: list[_Int],
        shifts: list[_Int | None],
    ) -> None: ...
    @property
    def shifts(self) -> list[int]: ...
    @property
    def max_shift(self) -> int: ...

# ids: [B, n, Fd]  values: [B, n, Fc]  lengths: [B] or None  ->  delayed_ids: [B, T, Fd]
# delayed_values: [B, T, Fc]  mask: [B, T, F]; T = n + max shift.
def spade_delay(
    schema: SpadeSchema,
    ids: _Array | None,
    values: _Array | None,
    lengths: _Array | None,
    delayed_ids: _Array | None,
    delayed_values: _Array | None,
    mask: _Array,
    num_threads: _Int,
) -> None: ...

# delayed_ids: [B, T, Fd]  delayed_values: [B, T, Fc]  ->  ids: [B, n, Fd]  values: [B, n, Fc]
def spade_undelay(
    schema: SpadeSchema,
    delayed_ids: _Array | None,
    delayed_values: _Array | None,
    ids: _Array | None,
    values: _Array | None,
    num_threads: _Int,
) -> None: ...

# logits: [B, T, F, V]  ->  out: [B, n, F, V] (float32 or float64, both the same)
def spade_undelay_logits(
    schema: SpadeSchema, logits: _Array, out: _Array, num_threads: _Int
) -> None: ...

# lengths: [B] or None  ->  loss_mask: [B, T - 1, F], the validity of the target step.
def spade_loss_mask(
    schema: SpadeSchema, lengths: _Array | None, loss_mask: _Array, include_stop: bool
) -> None: ...

class SpadeEmbedding:
    # features: per schema feature a dict of arrays keyed by SpadeFeatureWeights' member names;
    # combine: "concat" or "sum". Validates, copies and folds the weights.
    def __init__(
        self,
        schema: SpadeSchema,
        features: list[Mapping[str, _Array]],
        combine: str,
        projection_weight: _Array | None,
        projection_bias: _Array | None,
        condition_dim: _Int,
        norm_eps: _Float,
        pad_vector: _Array | None,
    ) -> None: ...
    @property
    def d_model(self) -> int: ...
    @property
    def condition_dim(self) -> int: ...
    # ids: [B, T, Fd]  values: [B, T, Fc]  condition: [B, T, C] or None  ->  out: [B, T, d_model]
    def forward(
        self,
        ids: _Array | None,
        values: _Array | None,
        out: _Array,
        condition: _Array | None,
        num_threads: _Int,
    ) -> None: ...

class SpadeDecoder:
    def __init__(self, schema: SpadeSchema, batch: _Int, max_tokens: _Int) -> None: ...
    # predicted_ids: [B, Fd]  predicted_values: [B, Fc]  ->  step_ids: [B, Fd]
    # step_values: [B, Fc]  completed: [B] (token index completed at this step, or -1)
    def step(
        self,
        predicted_ids: _Array | None,
        predicted_values: _Array | None,
        step_ids: _Array | None,
        step_values: _Array | None,
        completed: _Array,
    ) -> None: ...
    @property
    def current_step(self) -> int: ...
    def length(self, b: _Int) -> int: ...
    def finished(self, b: _Int) -> bool: ...
    def done(self) -> bool: ...
    # Copies: [B, max_tokens, Fd] int64 and [B, max_tokens, Fc] float32.
    def ids(self) -> _Array: ...
    def values(self) -> _Array: ...

# Vector quantization (_vq.cpp).

# x: [N, D]  codebook: [K, D] (float32 or float64)  ->  indices: [N] int64, sq_distances: [N]
def vq_assign(
    x: _Array,
    codebook: _Array,
    indices: _Array,
    sq_distances: _Array | None,
    cosine: bool,
    num_threads: _Int,
) -> None: ...
def vq_perplexity(counts: _Array) -> float: ...
def effective_rank(matrix: _Array) -> float: ...

class VectorQuantizer:
    def __init__(
        self, codebook: _Array, cosine: bool, decay: float, epsilon: float, dead_threshold: float
    ) -> None: ...
    @property
    def num_codes(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def cosine(self) -> bool: ...
    @property
    def decay(self) -> float: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def dead_threshold(self) -> float: ...
    # A copy: [K, D] float32.
    def codebook(self) -> _Array: ...
    def set_codebook(self, codebook: _Array) -> None: ...
    # x: [N, D]  ->  indices: [N]  quantized: [N, D] or None  sq_distances: [N] or None
    def quantize(
        self,
        x: _Array,
        indices: _Array,
        quantized: _Array | None,
        sq_distances: _Array | None,
        num_threads: _Int,
    ) -> None: ...
    def init_kmeans(
        self, x: _Array, lloyd_iterations: _Int, seed: _Int, num_threads: _Int
    ) -> None: ...
    def update(
        self, x: _Array, indices: _Array | None, update_codebook: bool, num_threads: _Int
    ) -> None: ...
    def restart_dead_codes(self, x: _Array, seed: _Int) -> int: ...
    # Copies: [K] int64 and [K] float64.
    def usage_counts(self) -> _Array: ...
    def cluster_size(self) -> _Array: ...
    def reset_usage(self) -> None: ...
    def perplexity(self) -> float: ...
    def num_dead_codes(self) -> int: ...
    def codebook_effective_rank(self) -> float: ...

class ResidualVQ:
    def __init__(
        self,
        num_stages: _Int,
        num_codes: _Int,
        dim: _Int,
        cosine: bool,
        decay: float,
        epsilon: float,
        dead_threshold: float,
    ) -> None: ...
    @property
    def num_stages(self) -> int: ...
    @property
    def dim(self) -> int: ...
    def stage(self, s: _Int) -> VectorQuantizer: ...
    # x: [N, D]  ->  codes: [N, S]  quantized: [N, D] or None
    def encode(
        self, x: _Array, codes: _Array, quantized: _Array | None, num_threads: _Int
    ) -> None: ...
    def decode(self, codes: _Array, out: _Array) -> None: ...
    def init_kmeans(
        self, x: _Array, lloyd_iterations: _Int, seed: _Int, num_threads: _Int
    ) -> None: ...
    def update(self, x: _Array, update_codebook: bool, num_threads: _Int) -> None: ...

# z: [N, n]  ->  p: [N, n]  tau: [N] or None
def sparsek(z: _Array, k: _Int, p: _Array, tau: _Array | None, num_threads: _Int) -> None: ...

# p, grad_p: [N, n]  ->  grad_z: [N, n]
def sparsek_backward(p: _Array, grad_p: _Array, grad_z: _Array, num_threads: _Int) -> None: ...

# SparseKCache<float> / SparseKCache<double>: constant-memory SparseK decode (sparsek.py wraps
# it). Storage of sink_tokens + window + topk rows per (sequence, kv head), allocated once.
class _SparseKCache:
    # gate: "value", "kv" or "none"; scale 0 -> 1/sqrt(D); num_threads 0 -> the global setting.
    def __init__(
        self,
        batch: _Int,
        heads_kv: _Int,
        dim: _Int,
        dim_v: _Int,
        topk: _Int,
        window: _Int,
        sink_tokens: _Int,
        gate: str,
        scale: _Float,
        softcap: _Float,
        num_threads: _Int,
    ) -> None: ...
    @property
    def batch(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dim_v(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def stored_rows(self) -> int: ...
    @property
    def threshold_entries(self) -> int: ...
    # k: [B, Hkv, n, D]  v: [B, Hkv, n, Dv]  u: [B, Hkv, n]
    def append(self, k: _Array, v: _Array, u: _Array) -> None: ...
    # q: [B, Hq, 1, D]  ->  out: [B, Hq, 1, Dv]  lse: [B, Hq, 1] or None
    def attend(self, q: _Array, out: _Array, lse: _Array | None) -> None: ...
    def reset(self) -> None: ...
    # (positions int64 [n], gates [n]) of the newest query's selection, positions increasing.
    def selected(self, sequence: _Int, head: _Int) -> tuple[_Array, _Array]: ...
    def threshold(self, sequence: _Int, head: _Int) -> float: ...

class SparseKCacheF32(_SparseKCache): ...
class SparseKCacheF64(_SparseKCache): ...

# The PDE-SSM block (python/foveal/_pde_ssm.cpp): parameters diffusion [G, 3], velocity [G, 2],
# reaction, time, skip [G] (skip may be None), copied at construction with the multiplier
# computed; mode "initial_value" | "forced", boundary "periodic" | "zero", diffusion_form
# "cholesky" | "raw" (unknown names raise ValueError). x, out: [B, H, W, C] views (any strides).
class PdeSsmF32:
    def __init__(
        self,
        height: _Int,
        width: _Int,
        channels: _Int,
        diffusion: _Array,
        velocity: _Array,
        reaction: _Array,
        time: _Array,
        skip: _Array | None,
        mode: str,
        boundary: str,
        diffusion_form: str,
        num_threads: _Int,
    ) -> None: ...
    @property
    def height(self) -> int: ...
    @property
    def width(self) -> int: ...
    @property
    def channels(self) -> int: ...
    @property
    def transform_height(self) -> int: ...
    @property
    def transform_width(self) -> int: ...
    # x: [B, H, W, C]  ->  out: [B, H, W, C]; releases the GIL.
    def forward(self, x: _Array, out: _Array, num_threads: _Int) -> None: ...
    # x (None: no parameter gradients), grad_out: [B, H, W, C]  ->  grad_x [B, H, W, C] and
    # the parameter gradients (each None: not computed); releases the GIL.
    def backward(
        self,
        x: _Array | None,
        grad_out: _Array,
        grad_x: _Array | None,
        grad_diffusion: _Array | None,
        grad_velocity: _Array | None,
        grad_reaction: _Array | None,
        grad_time: _Array | None,
        grad_skip: _Array | None,
        num_threads: _Int,
    ) -> None: ...

# The same for float64 arrays.
class PdeSsmF64(PdeSsmF32): ...
