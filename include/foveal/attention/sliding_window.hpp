// foveal/attention/sliding_window.hpp — local (banded) attention whose cost grows with L * W.
#pragma once

#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
// lse (optional): [B, Hq, Lq].
// Attention in which query i (position p = q_offset + i) sees the keys
// [p - window_left, p + window_right] plus the first sink_tokens keys: work and time are
// O(Lq * (window + sinks) * D), never O(Lq * Lk). options.window_left must be >= 0 and the
// right side bounded (causal = true, or window_right >= 0); everything else is as in
// foveal::attention (GQA, softcap, q_offset, lse, fully masked rows give 0 / -inf). It runs
// the same engine and the same key tiles as foveal::attention with these options, so the two
// are bitwise equal; a window of at least Lk equals full (causal) attention bitwise.
// Throws foveal::Error on any invalid argument before touching out.
void sliding_window_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                              TensorView<const float, 4> v, TensorView<float, 4> out,
                              const AttentionOptions& options, TensorView<float, 3> lse = {});
void sliding_window_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                              TensorView<const double, 4> v, TensorView<double, 4> out,
                              const AttentionOptions& options, TensorView<double, 3> lse = {});
// 16-bit storage: computed in float, out rounded to the storage type; lse stays float.
void sliding_window_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                              TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                              const AttentionOptions& options, TensorView<float, 3> lse = {});
void sliding_window_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                              TensorView<const float16, 4> v, TensorView<float16, 4> out,
                              const AttentionOptions& options, TensorView<float, 3> lse = {});

namespace detail {

// Throws unless `options` describe a bounded window (see sliding_window_attention).
void require_bounded_window(const char* function, const AttentionOptions& options);

}  // namespace detail
}  // namespace foveal
