"""FlashAttention's accuracy rule on FlashAttention's grid of shapes, in float32.

The rule: the error of the fast kernel against a float64 reference is at most twice the error
of a plain same-precision implementation (softmax(q k^T * scale) v in torch float32, masked),
plus a rounding-level tolerance (twice the rounding of the reference's values to float32 near
0.3, as FlashAttention's tests add). The grid follows FlashAttention's forward tests: head
dimensions from 32 to 256 (primes among them), query/key lengths that are not multiples of
any tile (113 x 203, 128 x 217, 108 x 256, 256 x 512, 512 x 256, 1023 x 1024), full, causal,
local (two-sided window) and causal local masks, GQA.
"""

from __future__ import annotations

import math

import foveal
import pytest

torch = pytest.importorskip("torch")

HEAD_DIMS = [32, 59, 64, 111, 128, 160, 224, 256]
LENGTHS = [(113, 203), (128, 217), (108, 256), (256, 512), (512, 256), (1023, 1024)]
MASKS = [(False, False), (True, False), (False, True), (True, True)]  # (causal, local)


def plain(q, k, v, scale, visible):
    logits = (q @ k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num() @ v


@pytest.mark.parametrize("dim", HEAD_DIMS)
def test_float32_error_within_twice_plain_float32(dim):
    failures = []
    for len_q, len_k in LENGTHS:
        for causal, local in MASKS:
            generator = torch.Generator().manual_seed(len_q * 7 + len_k * 13 + dim)
            q = torch.randn(1, 2, len_q, dim, generator=generator)
            k = torch.randn(1, 1, len_k, dim, generator=generator)
            v = torch.randn(1, 1, len_k, dim, generator=generator)
            # Bottom-right aligned positions; a local window reaches len_k / 4 back and (when
            # not causal) len_k / 8 ahead.
            position = torch.arange(len_q)[:, None] + (len_k - len_q)
            key = torch.arange(len_k)[None, :]
            visible = torch.ones(len_q, len_k, dtype=torch.bool)
            window_left = window_right = -1
            if local:
                window_left, window_right = len_k // 4, (0 if causal else len_k // 8)
                visible &= (key >= position - window_left) & (key <= position + window_right)
            if causal:
                visible &= key <= position
            scale = 1 / math.sqrt(dim)
            k_heads, v_heads = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
            reference = plain(q.double(), k_heads.double(), v_heads.double(), scale, visible)
            baseline = plain(q, k_heads, v_heads, scale, visible)
            out = foveal.attention(
                q,
                k,
                v,
                causal=causal,
                window_left=window_left,
                window_right=-1 if causal else window_right,
            )
            error = (out.double() - reference).abs().max().item()
            baseline_error = (baseline.double() - reference).abs().max().item()
            rounding = ((reference.float() + 0.3 - 0.3).double() - reference).abs().max().item()
            if error > 2 * baseline_error + 2 * rounding:
                failures.append(
                    f"{len_q}x{len_k} causal={causal} local={local}: foveal {error:.2e}, "
                    f"plain float32 {baseline_error:.2e}"
                )
    assert not failures, f"D={dim}: " + "; ".join(failures)
