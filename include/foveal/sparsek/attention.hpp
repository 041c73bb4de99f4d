// foveal/sparsek/attention.hpp — SparseK attention (docs/sparsek.md): every query
// attends to the `topk` keys with the largest scores u among the keys it may select from, each
// weighted by its SPARSEK gate, plus an optional sliding window and sinks that are always
// visible. Also: the causal SPARSEK thresholds of every prefix, the selection itself for
// inspection, and the linear scorer.
#pragma once

#include <cstdint>
#include <string>

#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// Where the SPARSEK gate m_ij of a selected key enters the attention (docs/sparsek.md):
//   value: O_i = Σ_j softmax_j(s q_i·k_j) m_ij v_j    (the softmax normalizer is ungated)
//   kv:    k_j and v_j both scaled by m_ij:  O_i = Σ_j softmax_j(m_ij s q_i·k_j) m_ij v_j
//   none:  hard top-k, m_ij = 1
// Window and sink keys always have gate 1.
enum class SparseKGate { value, kv, none };

// Parses "value", "kv", "none"; anything else is a foveal::Error naming the choices.
SparseKGate parse_sparsek_gate(const std::string& name);
const char* to_string(SparseKGate gate);

// Query i sits at position p_i = q_offset + i. It always sees the sinks (keys j < sink_tokens;
// when causal only those with j <= p_i: no query sees a later key) and, when causal, the window of
// the last `window` keys (p_i − window < j <= p_i). The rest of the keys it may see form its pool:
//   causal:      pool(p) = { j : sink_tokens <= j <= p − window }
//   non-causal:  pool    = { j : sink_tokens <= j < Lk }   (one selection shared by all queries)
// From its pool it selects S(p) = the `topk` keys with the largest u (ties: lower index first)
// with gates m_j = SPARSEK(u_pool, topk)_j (all 1 when the pool has <= topk keys). Thresholds
// of nested pools never decrease, so a key that leaves the selection never returns.
// The options shared with every attention variant (scale, softcap, causal, sink_tokens, q_offset,
// num_threads) come from AttentionOptions; causal defaults to true here. SparseK's window is its
// own `window`, so window_left must stay -1 and window_right -1 (or 0, the same as causal).
struct SparseKOptions : AttentionOptions {
  std::int64_t topk = 0;    // >= 1; a topk >= the pool size selects the whole pool
  std::int64_t window = 0;  // >= 0 (0: no window); non-causal calls need window = 0
  SparseKGate gate = SparseKGate::value;

  SparseKOptions() { causal = true; }
};

// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  u: [B, Hkv, Lk]
//   ->  out: [B, Hq, Lq, Dv]  lse: [B, Hq, Lq] (optional; ln of the softmax normalizer: Σ exp of
//   the logits, which only the kv gate scales)
// SparseK attention: softmax over the visible keys (sinks, window, selection) with gates as
// `options.gate` says. Hq must be a multiple of Hkv; the query heads of a group share their kv
// head's selection. u must be finite. A query that sees no key gets 0 and lse = -inf. Work is
// O(Lq·(topk + window + sinks)·D) plus the selection, O(Lk log topk) per (batch, kv head).
// Results are bitwise identical for any thread count; with topk >= Lk, window = 0, no sinks
// and gate none it is causal (or full) attention.
void sparsek_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                       TensorView<const float, 4> v, TensorView<const float, 3> u,
                       const SparseKOptions& options, TensorView<float, 4> out,
                       TensorView<float, 3> lse = {});
void sparsek_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                       TensorView<const double, 4> v, TensorView<const double, 3> u,
                       const SparseKOptions& options, TensorView<double, 4> out,
                       TensorView<double, 3> lse = {});
// 16-bit storage: q, k, v, u and out in bfloat16 (or float16), computed in float: the scores
// widened (exact), so the selection, τ and the gates are those of the same values in float32;
// out rounded to the storage type; lse stays float.
void sparsek_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                       TensorView<const bfloat16, 4> v, TensorView<const bfloat16, 3> u,
                       const SparseKOptions& options, TensorView<bfloat16, 4> out,
                       TensorView<float, 3> lse = {});
void sparsek_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                       TensorView<const float16, 4> v, TensorView<const float16, 3> u,
                       const SparseKOptions& options, TensorView<float16, 4> out,
                       TensorView<float, 3> lse = {});

// u: [B, Hkv, Lk]  ->  indices: [B, Hkv, Lq, topk] (int64)  gates: [B, Hkv, Lq, topk]
// The selection sparsek_attention makes for each query position, for inspection: the selected
// keys in increasing order, then -1 (gate 0) where the pool holds fewer than topk keys. Sinks
// and window keys are not listed (they are always visible with gate 1). Lq and the options
// determine the query positions exactly as in sparsek_attention; options.gate does not matter.
void sparsek_select(TensorView<const float, 3> u, Index len_q, const SparseKOptions& options,
                    TensorView<std::int64_t, 4> indices, TensorView<float, 4> gates);
void sparsek_select(TensorView<const double, 3> u, Index len_q, const SparseKOptions& options,
                    TensorView<std::int64_t, 4> indices, TensorView<double, 4> gates);

// z: [N, n]  ->  tau: [N, n]  evicted_at: [N, n] (int64, optional)
// The SPARSEK threshold of every prefix: tau[r][m - 1] = τ of SPARSEK(z[r][0 .. m), k) for
// m = 1..n (−inf while m <= k, where every entry is 1). The top-k set of the prefix of length m
// is { j < m : m < evicted_at[r][j] }: key j is selected from prefix length j + 1 until
// evicted_at[r][j] (j + 1: never selected; n + 1: still selected at the end). O(n log n) per
// row, not O(n²): thresholds never decrease along the prefix.
void sparsek_prefix_thresholds(TensorView<const float, 2> z, Index k, TensorView<float, 2> tau,
                               TensorView<std::int64_t, 2> evicted_at = {}, int num_threads = 0);
void sparsek_prefix_thresholds(TensorView<const double, 2> z, Index k, TensorView<double, 2> tau,
                               TensorView<std::int64_t, 2> evicted_at = {}, int num_threads = 0);

// x: [B, L, Dm]  w: [H, Dm]  ->  u: [B, H, L]
// The linear scorer of the paper: u[b, h, j] = x[b, j]·w[h] + slope * j (the position slope
// keeps scores from having to grow with the length). slope must be finite.
void sparsek_linear_scores(TensorView<const float, 3> x, TensorView<const float, 2> w, double slope,
                           TensorView<float, 3> u, int num_threads = 0);
void sparsek_linear_scores(TensorView<const double, 3> x, TensorView<const double, 2> w,
                           double slope, TensorView<double, 3> u, int num_threads = 0);

}  // namespace foveal
