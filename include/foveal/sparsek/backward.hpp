// foveal/sparsek/backward.hpp — the gradients of foveal::sparsek_attention with respect to q, k,
// v and the scores u (through the SPARSEK gates), on the forward's engine and visit policy.
#pragma once

#include "foveal/core/tensor.hpp"
#include "foveal/sparsek/attention.hpp"

namespace foveal {

// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  u: [B, Hkv, Lk]
// out: [B, Hq, Lq, Dv]  lse: [B, Hq, Lq]  grad_out: [B, Hq, Lq, Dv]   (out and lse as
// sparsek_attention returned them with the same options; lse is required)
//   ->  grad_q: [B, Hq, Lq, D]  grad_k: [B, Hkv, Lk, D]  grad_v: [B, Hkv, Lk, Dv]
//       grad_u: [B, Hkv, Lk] (optional: a null view skips the scores' gradient)
// The vector-Jacobian product of sparsek_attention (docs/sparsek.md, "Backward"). With P the
// softmax weights of the visible keys recomputed from lse, m the gates and D_i = grad_out_i·out_i:
//   value: grad_v += P m grad_out,  dx = P (m grad_out·v − D),  dm = P grad_out·v
//   kv:    the same dx, dm = P grad_out·v + dx s q·k, and q, k receive dx m
// (dx times the softcap's derivative when a softcap is set). The gates m = clip(u_j − τ_i, 0, 1)
// pass dm on to u through the SPARSEK Jacobian of each query's pool: on the pool's fractional
// support F_i = { l : 0 < u_l − τ_i < 1 }, ∂m_j/∂u_l = δ_jl − 1/|F_i|, so
//   grad_u_l = Σ_i [l ∈ F_i] (dm_il − (1/|F_i|) Σ_{j ∈ F_i selected} dm_ij)
// summed over the rows and the query heads of each group; gates at exactly 0 or 1, sinks and the
// window have no derivative in u. Gate none (hard top-k) has none anywhere: grad_u is all zeros.
// Work is O(Lq·(topk + window + sinks)·D) like the forward, plus the selection again and
// O(Lk log Lq) for the support terms per (batch, kv head). No atomics and no split that depends
// on the thread count: the gradients are bitwise identical for any number of threads and call
// after call. Throws foveal::Error naming the argument (every check of sparsek_attention, the
// gradients' shapes and strides, a missing or mis-shaped lse, a non-finite grad_out, gradients
// that overlap each other or an input) before writing anything.
void sparsek_attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                TensorView<const float, 4> v, TensorView<const float, 3> u,
                                TensorView<const float, 4> out, TensorView<const float, 3> lse,
                                TensorView<const float, 4> grad_out, const SparseKOptions& options,
                                TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                                TensorView<float, 4> grad_v, TensorView<float, 3> grad_u = {});
void sparsek_attention_backward(TensorView<const double, 4> q, TensorView<const double, 4> k,
                                TensorView<const double, 4> v, TensorView<const double, 3> u,
                                TensorView<const double, 4> out, TensorView<const double, 3> lse,
                                TensorView<const double, 4> grad_out, const SparseKOptions& options,
                                TensorView<double, 4> grad_q, TensorView<double, 4> grad_k,
                                TensorView<double, 4> grad_v, TensorView<double, 3> grad_u = {});

}  // namespace foveal
