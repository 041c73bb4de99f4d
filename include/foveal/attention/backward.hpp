// foveal/attention/backward.hpp — the gradients of foveal::attention and
// foveal::sliding_window_attention, on the same engine and visit policies as the forward.
#pragma once

#include "foveal/attention/options.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]  grad_out: [B, Hq, Lq, Dv]  (out and lse as the forward returned them)
//   ->  grad_q: [B, Hq, Lq, D]  grad_k: [B, Hkv, Lk, D]  grad_v: [B, Hkv, Lk, Dv]
// The vector-Jacobian product of foveal::attention with the same options and bias: with P the
// attention probabilities recomputed from lse and
// D_i = Σ_d grad_out[i, d] out[i, d],
//   grad_v = Pᵀ grad_out,   dS = P ∘ (grad_out vᵀ − D),   grad_q = scale dS k,
//   grad_k = scale dSᵀ q,
// with dS multiplied by the softcap's tanh derivative when a softcap is set. grad_k and grad_v
// sum over the query heads of a GQA group. grad_bias (optional, only with a bias; the bias's
// shape, [B or 1, Hq or 1, Lq, Lk]) receives P ∘ (grad_out vᵀ − D), the gradient of the logits
// the bias is added to (after the softcap), summed over the dimensions the bias broadcasts in a
// fixed order; it is the one gradient that is an [Lq, Lk] matrix, and a broadcast bias needs a
// [B, Hq, Lq, Lk] scratch for the sum. grad_lse (optional, [B, Hq, Lq]): the loss's gradient
// with respect to the forward's lse as well, for losses that read it (learned sink logits,
// out · sigmoid(lse - s), do): since ∂lse_i/∂logit_ij = P_ij, D_i becomes D_i - grad_lse_i
// (every other formula unchanged; grad_v does not depend on it). Rows that see no key
// (lse = -inf) contribute nothing.
// Never forms an [Lq, Lk] matrix; no atomics and no split that depends on the thread count, so
// the gradients are bitwise identical for any number of threads. Throws foveal::Error on any
// invalid argument before touching a gradient.
void attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                        TensorView<const float, 4> v, TensorView<const float, 4> out,
                        TensorView<const float, 3> lse, TensorView<const float, 4> grad_out,
                        TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                        TensorView<float, 4> grad_v, const AttentionOptions& options = {},
                        TensorView<const float, 4> bias = {}, TensorView<float, 4> grad_bias = {},
                        TensorView<const float, 3> grad_lse = {});
void attention_backward(TensorView<const double, 4> q, TensorView<const double, 4> k,
                        TensorView<const double, 4> v, TensorView<const double, 4> out,
                        TensorView<const double, 3> lse, TensorView<const double, 4> grad_out,
                        TensorView<double, 4> grad_q, TensorView<double, 4> grad_k,
                        TensorView<double, 4> grad_v, const AttentionOptions& options = {},
                        TensorView<const double, 4> bias = {}, TensorView<double, 4> grad_bias = {},
                        TensorView<const double, 3> grad_lse = {});

// The same for foveal::sliding_window_attention (a bounded window, no bias; grad_lse as above):
// work is O(Lq * (window + sinks) * D), like the forward.
void sliding_window_attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                       TensorView<const float, 4> v, TensorView<const float, 4> out,
                                       TensorView<const float, 3> lse,
                                       TensorView<const float, 4> grad_out,
                                       TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                                       TensorView<float, 4> grad_v, const AttentionOptions& options,
                                       TensorView<const float, 3> grad_lse = {});
void sliding_window_attention_backward(
    TensorView<const double, 4> q, TensorView<const double, 4> k, TensorView<const double, 4> v,
    TensorView<const double, 4> out, TensorView<const double, 3> lse,
    TensorView<const double, 4> grad_out, TensorView<double, 4> grad_q,
    TensorView<double, 4> grad_k, TensorView<double, 4> grad_v, const AttentionOptions& options,
    TensorView<const double, 3> grad_lse = {});

}  // namespace foveal
