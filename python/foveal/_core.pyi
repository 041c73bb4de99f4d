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
