"""
foveal's compiled kernels; use the functions of the foveal package instead.
"""

from __future__ import annotations

import collections.abc
import typing

import numpy
import numpy.typing

__all__: list[str] = [
    "MAX_THREADS",
    "AttentionKernel",
    "KVCacheF32",
    "KVCacheF64",
    "PdeSsmF32",
    "PdeSsmF64",
    "ResidualVQ",
    "SpadeDecoder",
    "SpadeEmbedding",
    "SpadeSchema",
    "SparseKCacheF32",
    "SparseKCacheF64",
    "VectorQuantizer",
    "attention",
    "attention_backward",
    "attention_kernel_names",
    "effective_rank",
    "get_num_threads",
    "make_attention",
    "merge_states",
    "set_num_threads",
    "sliding_window_attention",
    "spade_binned",
    "spade_delay",
    "spade_loss_mask",
    "spade_undelay",
    "spade_undelay_logits",
    "sparsek",
    "sparsek_attention",
    "sparsek_backward",
    "sparsek_linear_scores",
    "sparsek_prefix_thresholds",
    "sparsek_select",
    "vq_assign",
    "vq_perplexity",
    "wrap_kv_cache",
]

class SpadeSchema:
    def __init__(self, features: collections.abc.Sequence[dict]) -> None: ...
    @property
    def max_shift(self) -> int: ...
    @property
    def shifts(self) -> list[int]: ...

class SpadeEmbedding:
    def __init__(
        self,
        schema: SpadeSchema,
        features: dict,
        projection_weight: typing.Any | None,
        projection_bias: typing.Any | None,
        pad_vector: typing.Any | None,
        **kwargs,
    ) -> None: ...
    def forward(
        self,
        ids: typing.Any | None,
        values: typing.Any | None,
        out: typing.Any,
        condition: typing.Any | None,
        **kwargs,
    ) -> None: ...
    @property
    def condition_dim(self) -> int: ...
    @property
    def d_model(self) -> int: ...

class SpadeDecoder:
    def __init__(self, schema: SpadeSchema, **kwargs) -> None: ...
    def done(self) -> bool: ...
    def finished(self, b: typing.SupportsInt | typing.SupportsIndex) -> bool: ...
    def ids(self) -> numpy.typing.NDArray[numpy.int64]: ...
    def length(self, b: typing.SupportsInt | typing.SupportsIndex) -> int: ...
    def step(
        self,
        ids: typing.Any | None,
        values: typing.Any | None,
        step_ids: typing.Any | None,
        step_values: typing.Any | None,
        completed: typing.Any,
    ) -> None: ...
    def values(self) -> numpy.typing.NDArray[numpy.float32]: ...
    @property
    def batch(self) -> int: ...
    @property
    def current_step(self) -> int: ...
    @property
    def max_tokens(self) -> int: ...

class VectorQuantizer:
    @staticmethod
    def from_data(x: typing.Any, **kwargs) -> VectorQuantizer: ...
    def __init__(self, codebook: typing.Any, **kwargs) -> None: ...
    def cluster_size(self) -> numpy.typing.NDArray[numpy.float64]: ...
    def codebook(self) -> numpy.typing.NDArray[numpy.float32]: ...
    def codebook_effective_rank(self) -> float: ...
    def init_kmeans(self, x: typing.Any, **kwargs) -> None: ...
    def num_dead_codes(self) -> int: ...
    def perplexity(self) -> float: ...
    def quantize(
        self,
        x: typing.Any,
        indices: typing.Any,
        quantized: typing.Any | None,
        sq_distances: typing.Any | None,
        **kwargs,
    ) -> None: ...
    def reset_usage(self) -> None: ...
    def restart_dead_codes(self, x: typing.Any, **kwargs) -> int: ...
    def set_codebook(self, codebook: typing.Any) -> None: ...
    def update(self, x: typing.Any, indices: typing.Any | None, **kwargs) -> None: ...
    def usage_counts(self) -> numpy.typing.NDArray[numpy.int64]: ...
    @property
    def cosine(self) -> bool: ...
    @property
    def dead_threshold(self) -> float: ...
    @property
    def decay(self) -> float: ...
    @property
    def dim(self) -> int: ...
    @property
    def epsilon(self) -> float: ...
    @property
    def num_codes(self) -> int: ...

class ResidualVQ:
    def __init__(self, **kwargs) -> None: ...
    def decode(self, codes: typing.Any, out: typing.Any) -> None: ...
    def encode(
        self, x: typing.Any, codes: typing.Any, quantized: typing.Any | None, **kwargs
    ) -> None: ...
    def init_kmeans(self, x: typing.Any, **kwargs) -> None: ...
    def stage(self, **kwargs) -> VectorQuantizer: ...
    def update(self, x: typing.Any, **kwargs) -> None: ...
    @property
    def dim(self) -> int: ...
    @property
    def num_stages(self) -> int: ...

class SparseKCacheF32:
    def __init__(
        self,
        batch: typing.SupportsInt | typing.SupportsIndex,
        heads_kv: typing.SupportsInt | typing.SupportsIndex,
        dim: typing.SupportsInt | typing.SupportsIndex,
        dim_v: typing.SupportsInt | typing.SupportsIndex,
        topk: typing.SupportsInt | typing.SupportsIndex,
        window: typing.SupportsInt | typing.SupportsIndex,
        sink_tokens: typing.SupportsInt | typing.SupportsIndex,
        gate: str,
        scale: typing.SupportsFloat | typing.SupportsIndex,
        softcap: typing.SupportsFloat | typing.SupportsIndex,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    def append(self, k: numpy.ndarray, v: numpy.ndarray, u: numpy.ndarray) -> None: ...
    def attend(self, q: numpy.ndarray, out: numpy.ndarray, lse: numpy.ndarray | None) -> None: ...
    def reset(self) -> None: ...
    def selected(
        self,
        sequence: typing.SupportsInt | typing.SupportsIndex,
        head: typing.SupportsInt | typing.SupportsIndex,
    ) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.float32]]: ...
    def threshold(
        self,
        sequence: typing.SupportsInt | typing.SupportsIndex,
        head: typing.SupportsInt | typing.SupportsIndex,
    ) -> float: ...
    @property
    def batch(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dim_v(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def stored_rows(self) -> int: ...
    @property
    def threshold_entries(self) -> int: ...

class SparseKCacheF64:
    def __init__(
        self,
        batch: typing.SupportsInt | typing.SupportsIndex,
        heads_kv: typing.SupportsInt | typing.SupportsIndex,
        dim: typing.SupportsInt | typing.SupportsIndex,
        dim_v: typing.SupportsInt | typing.SupportsIndex,
        topk: typing.SupportsInt | typing.SupportsIndex,
        window: typing.SupportsInt | typing.SupportsIndex,
        sink_tokens: typing.SupportsInt | typing.SupportsIndex,
        gate: str,
        scale: typing.SupportsFloat | typing.SupportsIndex,
        softcap: typing.SupportsFloat | typing.SupportsIndex,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    def append(self, k: numpy.ndarray, v: numpy.ndarray, u: numpy.ndarray) -> None: ...
    def attend(self, q: numpy.ndarray, out: numpy.ndarray, lse: numpy.ndarray | None) -> None: ...
    def reset(self) -> None: ...
    def selected(
        self,
        sequence: typing.SupportsInt | typing.SupportsIndex,
        head: typing.SupportsInt | typing.SupportsIndex,
    ) -> tuple[numpy.typing.NDArray[numpy.int64], numpy.typing.NDArray[numpy.float64]]: ...
    def threshold(
        self,
        sequence: typing.SupportsInt | typing.SupportsIndex,
        head: typing.SupportsInt | typing.SupportsIndex,
    ) -> float: ...
    @property
    def batch(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dim_v(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def stored_rows(self) -> int: ...
    @property
    def threshold_entries(self) -> int: ...

class PdeSsmF32:
    def __init__(
        self,
        height: typing.SupportsInt | typing.SupportsIndex,
        width: typing.SupportsInt | typing.SupportsIndex,
        channels: typing.SupportsInt | typing.SupportsIndex,
        diffusion: numpy.ndarray,
        velocity: numpy.ndarray,
        reaction: numpy.ndarray,
        time: numpy.ndarray,
        skip: numpy.ndarray | None,
        mode: str,
        boundary: str,
        diffusion_form: str,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    def backward(
        self,
        x: numpy.ndarray | None,
        grad_out: numpy.ndarray,
        grad_x: numpy.ndarray | None,
        grad_diffusion: numpy.ndarray | None,
        grad_velocity: numpy.ndarray | None,
        grad_reaction: numpy.ndarray | None,
        grad_time: numpy.ndarray | None,
        grad_skip: numpy.ndarray | None,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    def forward(
        self,
        x: numpy.ndarray,
        out: numpy.ndarray,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    @property
    def channels(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def transform_height(self) -> int: ...
    @property
    def transform_width(self) -> int: ...
    @property
    def width(self) -> int: ...

class PdeSsmF64:
    def __init__(
        self,
        height: typing.SupportsInt | typing.SupportsIndex,
        width: typing.SupportsInt | typing.SupportsIndex,
        channels: typing.SupportsInt | typing.SupportsIndex,
        diffusion: numpy.ndarray,
        velocity: numpy.ndarray,
        reaction: numpy.ndarray,
        time: numpy.ndarray,
        skip: numpy.ndarray | None,
        mode: str,
        boundary: str,
        diffusion_form: str,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    def backward(
        self,
        x: numpy.ndarray | None,
        grad_out: numpy.ndarray,
        grad_x: numpy.ndarray | None,
        grad_diffusion: numpy.ndarray | None,
        grad_velocity: numpy.ndarray | None,
        grad_reaction: numpy.ndarray | None,
        grad_time: numpy.ndarray | None,
        grad_skip: numpy.ndarray | None,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    def forward(
        self,
        x: numpy.ndarray,
        out: numpy.ndarray,
        num_threads: typing.SupportsInt | typing.SupportsIndex,
    ) -> None: ...
    @property
    def channels(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def transform_height(self) -> int: ...
    @property
    def transform_width(self) -> int: ...
    @property
    def width(self) -> int: ...

class KVCacheF32:
    def __init__(self, **kwargs) -> None: ...
    def append(self, k: typing.Any, v: typing.Any, **kwargs) -> None: ...
    def decode(self, q: typing.Any, out: typing.Any, lse: typing.Any | None, **kwargs) -> None: ...
    def first_retained(self, **kwargs) -> int: ...
    def reset(self) -> None: ...
    def truncate(self, **kwargs) -> None: ...
    @property
    def batch(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dim_v(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def keys(self) -> numpy.ndarray: ...
    @property
    def lengths(self) -> list[int]: ...
    @property
    def ring(self) -> bool: ...
    @property
    def sink_tokens(self) -> int: ...
    @property
    def values(self) -> numpy.ndarray: ...

class KVCacheF64:
    def __init__(self, **kwargs) -> None: ...
    def append(self, k: typing.Any, v: typing.Any, **kwargs) -> None: ...
    def decode(self, q: typing.Any, out: typing.Any, lse: typing.Any | None, **kwargs) -> None: ...
    def first_retained(self, **kwargs) -> int: ...
    def reset(self) -> None: ...
    def truncate(self, **kwargs) -> None: ...
    @property
    def batch(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def dim_v(self) -> int: ...
    @property
    def heads_kv(self) -> int: ...
    @property
    def keys(self) -> numpy.ndarray: ...
    @property
    def lengths(self) -> list[int]: ...
    @property
    def ring(self) -> bool: ...
    @property
    def sink_tokens(self) -> int: ...
    @property
    def values(self) -> numpy.ndarray: ...

class AttentionKernel:
    def forward(
        self,
        q: typing.Any,
        k: typing.Any,
        v: typing.Any,
        out: typing.Any,
        lse: typing.Any | None,
        bias: typing.Any | None,
        extras: collections.abc.Mapping[str, typing.Any],
    ) -> None: ...
    @property
    def name(self) -> str: ...

def attention(
    q: typing.Any,
    k: typing.Any,
    v: typing.Any,
    out: typing.Any,
    lse: typing.Any | None,
    bias: typing.Any | None,
    **kwargs,
) -> None: ...
def attention_backward(
    sliding: bool,
    q: typing.Any,
    k: typing.Any,
    v: typing.Any,
    out: typing.Any,
    lse: typing.Any,
    grad_out: typing.Any,
    grad_q: typing.Any,
    grad_k: typing.Any,
    grad_v: typing.Any,
    bias: typing.Any | None,
    **kwargs,
) -> None: ...
def attention_kernel_names() -> list[str]: ...
def effective_rank(matrix: typing.Any) -> float: ...
def get_num_threads() -> int: ...
def make_attention(
    name: str, params: collections.abc.Mapping[str, str], **kwargs
) -> AttentionKernel: ...
def merge_states(
    out_a: typing.Any,
    lse_a: typing.Any,
    out_b: typing.Any,
    lse_b: typing.Any,
    out: typing.Any,
    lse: typing.Any | None,
    **kwargs,
) -> None: ...
def set_num_threads(**kwargs) -> None: ...
def sliding_window_attention(
    q: typing.Any, k: typing.Any, v: typing.Any, out: typing.Any, lse: typing.Any | None, **kwargs
) -> None: ...
def spade_binned(**kwargs) -> tuple[int, int, int]: ...
def spade_delay(
    schema: SpadeSchema,
    ids: typing.Any | None,
    values: typing.Any | None,
    delayed_ids: typing.Any | None,
    delayed_values: typing.Any | None,
    mask: typing.Any,
    **kwargs,
) -> None: ...
def spade_loss_mask(schema: SpadeSchema, loss_mask: typing.Any, **kwargs) -> None: ...
def spade_undelay(
    schema: SpadeSchema,
    delayed_ids: typing.Any | None,
    delayed_values: typing.Any | None,
    ids: typing.Any | None,
    values: typing.Any | None,
    **kwargs,
) -> None: ...
def spade_undelay_logits(
    schema: SpadeSchema, logits: typing.Any, out: typing.Any, **kwargs
) -> None: ...
def sparsek(
    z: numpy.ndarray,
    k: typing.SupportsInt | typing.SupportsIndex,
    p: numpy.ndarray,
    tau: numpy.ndarray | None,
    num_threads: typing.SupportsInt | typing.SupportsIndex,
) -> None: ...
def sparsek_attention(
    q: typing.Any,
    k: typing.Any,
    v: typing.Any,
    u: typing.Any,
    out: typing.Any,
    lse: typing.Any | None,
    **kwargs,
) -> None: ...
def sparsek_backward(
    p: numpy.ndarray,
    grad_p: numpy.ndarray,
    grad_z: numpy.ndarray,
    num_threads: typing.SupportsInt | typing.SupportsIndex,
) -> None: ...
def sparsek_linear_scores(
    x: numpy.ndarray,
    w: numpy.ndarray,
    slope: typing.SupportsFloat | typing.SupportsIndex,
    u: numpy.ndarray,
    num_threads: typing.SupportsInt | typing.SupportsIndex,
) -> None: ...
def sparsek_prefix_thresholds(
    z: numpy.ndarray,
    k: typing.SupportsInt | typing.SupportsIndex,
    tau: numpy.ndarray,
    evicted_at: numpy.ndarray | None,
    num_threads: typing.SupportsInt | typing.SupportsIndex,
) -> None: ...
def sparsek_select(
    u: numpy.ndarray,
    len_q: typing.SupportsInt | typing.SupportsIndex,
    indices: numpy.ndarray,
    gates: numpy.ndarray,
    topk: typing.SupportsInt | typing.SupportsIndex,
    window: typing.SupportsInt | typing.SupportsIndex,
    sink_tokens: typing.SupportsInt | typing.SupportsIndex,
    causal: bool,
    q_offset: typing.SupportsInt | typing.SupportsIndex,
    num_threads: typing.SupportsInt | typing.SupportsIndex,
) -> None: ...
def vq_assign(
    x: typing.Any,
    codebook: typing.Any,
    indices: typing.Any,
    sq_distances: typing.Any | None,
    **kwargs,
) -> None: ...
def vq_perplexity(counts: typing.Any) -> float: ...
def wrap_kv_cache(keys: typing.Any, values: typing.Any, **kwargs) -> typing.Any: ...

MAX_THREADS: int = 1024
__version__: str = "0.1.0"
