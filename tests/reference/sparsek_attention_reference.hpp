// tests/reference/sparsek_attention_reference.hpp — the executable spec of SparseK attention
// (docs/sparsek.md, include/foveal/sparsek/attention.hpp), float64.
//
// Plain loops over the definitions, no incremental tricks:
//   thresholds: SPARSEK of every prefix solved from scratch by the sort-and-scan reference;
//   selection:  for every query position, sort its pool by (u descending, index ascending),
//               keep the first topk, gate them with SPARSEK of the whole pool;
//   attention:  an explicit visibility + gate row per (query, key), then a dense softmax.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <vector>

#include "reference/attention_reference.hpp"
#include "reference/sparsek_reference.hpp"

namespace foveal::reference {

// ---------------------------------------------------------------------------------------------
// SPARSEK thresholds.

// Every τ that solves SPARSEK(z, k), i.e. Σ clip(z_i − τ, 0, 1) = k. With z_(k) the k-th
// largest score: when z_(k) − 1 >= z_(k+1), the top k can all be 1 and the rest 0, and every τ
// in [z_(k+1), z_(k) − 1] does that; otherwise some p_i is fractional and τ is the single point
// the sort-and-scan finds. Both −inf when k >= n (all ones; no finite τ is singled out).
// (Deciding by the gap rather than by looking for a fractional p keeps a p that rounds to
// 1 − 1e-16 from hiding a whole interval.)
struct ThresholdInterval {
  double low = 0, high = 0;
};

inline ThresholdInterval sparsek_threshold_interval(const std::vector<double>& z, std::int64_t k) {
  std::vector<double> p;
  const double tau = sparsek_reference(z, k, p);
  if (k >= static_cast<std::int64_t>(z.size())) return {tau, tau};
  std::vector<double> descending = z;
  std::sort(descending.begin(), descending.end(), std::greater<>());
  const double kth = descending[k - 1], next = descending[k];
  if (kth - 1 >= next) return {next, kth - 1};
  return {tau, tau};
}

// z: [n]  ->  [n]: entry m − 1 is the interval of τ of SPARSEK(z[0 .. m), k).
inline std::vector<ThresholdInterval> prefix_threshold_intervals(const std::vector<double>& z,
                                                                 std::int64_t k) {
  std::vector<ThresholdInterval> intervals;
  for (std::size_t m = 1; m <= z.size(); ++m) {
    const std::vector<double> prefix(z.begin(), z.begin() + static_cast<std::ptrdiff_t>(m));
    intervals.push_back(sparsek_threshold_interval(prefix, k));
  }
  return intervals;
}

// The `k` of `candidates` with the largest u (ties: lower index first), in increasing order.
inline std::vector<std::int64_t> top_k_keys(const std::vector<double>& u,
                                            std::vector<std::int64_t> candidates, std::int64_t k) {
  std::sort(candidates.begin(), candidates.end(),
            [&](std::int64_t a, std::int64_t b) { return u[a] > u[b] || (u[a] == u[b] && a < b); });
  if (static_cast<std::int64_t>(candidates.size()) > k) candidates.resize(k);
  std::sort(candidates.begin(), candidates.end());
  return candidates;
}

// z: [n]  ->  [n + 1]: entry m is the top-k set of the prefix of length m (entry 0 is empty).
inline std::vector<std::vector<std::int64_t>> prefix_top_k_sets(const std::vector<double>& z,
                                                                std::int64_t k) {
  std::vector<std::vector<std::int64_t>> sets(z.size() + 1);
  std::vector<std::int64_t> prefix;
  for (std::size_t m = 1; m <= z.size(); ++m) {
    prefix.push_back(static_cast<std::int64_t>(m) - 1);
    sets[m] = top_k_keys(z, prefix, k);
  }
  return sets;
}

// ---------------------------------------------------------------------------------------------
// Selection: which keys each query sees, with which gate.

enum class Gate { value, kv, none };

struct SparseKReferenceOptions {
  std::int64_t topk = 1, window = 0, sink_tokens = 0;
  Gate gate = Gate::value;
  bool causal = true;
  double scale = 0;  // 0 -> 1/sqrt(D)
  double softcap = 0;
  std::int64_t q_offset = -1;  // -1 -> Lk - Lq
};

// The absolute position of query i.
inline std::int64_t query_position(const SparseKReferenceOptions& o, std::int64_t len_q,
                                   std::int64_t len_k, std::int64_t i) {
  return (o.q_offset >= 0 ? o.q_offset : len_k - len_q) + i;
}

// The keys a query at `position` selects from, in increasing order:
//   causal: sink_tokens <= j <= position − window;  non-causal: sink_tokens <= j < Lk.
inline std::vector<std::int64_t> selection_pool(const SparseKReferenceOptions& o,
                                                std::int64_t len_k, std::int64_t position) {
  std::vector<std::int64_t> pool;
  for (std::int64_t j = o.sink_tokens; j < len_k; ++j)
    if (!o.causal || j <= position - o.window) pool.push_back(j);
  return pool;
}

// The selection of one query: keys in increasing order and their SPARSEK gates.
struct Selection {
  std::vector<std::int64_t> keys;
  std::vector<double> gates;
};

// u_row: [Lk] (one batch, one kv head)  ->  the selection of the query at `position`.
inline Selection select_keys(const SparseKReferenceOptions& o, const std::vector<double>& u_row,
                             std::int64_t position) {
  const std::vector<std::int64_t> pool =
      selection_pool(o, static_cast<std::int64_t>(u_row.size()), position);
  std::vector<double> pool_scores, pool_gates;
  for (std::int64_t j : pool) pool_scores.push_back(u_row[j]);
  sparsek_reference(pool_scores, o.topk, pool_gates);  // all 1 when the pool holds <= topk
  Selection selection;
  selection.keys = top_k_keys(u_row, pool, o.topk);
  for (std::int64_t key : selection.keys) {
    const auto slot = std::lower_bound(pool.begin(), pool.end(), key) - pool.begin();
    selection.gates.push_back(pool_gates[slot]);
  }
  return selection;
}

// u: [B, Hkv, Lk]  ->  indices, gates: [B, Hkv, Lq, topk] (the keys increasing, then -1 / 0).
inline void sparsek_select_reference(const std::vector<double>& u, std::int64_t batch,
                                     std::int64_t heads_kv, std::int64_t len_k, std::int64_t len_q,
                                     const SparseKReferenceOptions& o,
                                     std::vector<std::int64_t>& indices,
                                     std::vector<double>& gates) {
  indices.assign(batch * heads_kv * len_q * o.topk, -1);
  gates.assign(indices.size(), 0.0);
  for (std::int64_t row = 0; row < batch * heads_kv; ++row) {
    const std::vector<double> u_row(u.begin() + row * len_k, u.begin() + (row + 1) * len_k);
    for (std::int64_t i = 0; i < len_q; ++i) {
      const Selection selection = select_keys(o, u_row, query_position(o, len_q, len_k, i));
      for (std::size_t slot = 0; slot < selection.keys.size(); ++slot) {
        indices[(row * len_q + i) * o.topk + slot] = selection.keys[slot];
        gates[(row * len_q + i) * o.topk + slot] = selection.gates[slot];
      }
    }
  }
}

// What one query sees: visible[j], and the gate of key j where it is visible.
struct KeyGates {
  std::vector<bool> visible;
  std::vector<double> gate;
};

// Sinks (j < sink_tokens, and j <= position when causal) and, when causal, the window
// (position − window < j <= position) with gate 1, plus the selection with its gates.
inline KeyGates key_gates(const SparseKReferenceOptions& o, const std::vector<double>& u_row,
                          std::int64_t position) {
  const std::int64_t len_k = static_cast<std::int64_t>(u_row.size());
  KeyGates row{std::vector<bool>(len_k, false), std::vector<double>(len_k, 0.0)};
  for (std::int64_t j = 0; j < len_k; ++j) {
    const bool sink = j < o.sink_tokens && (!o.causal || j <= position);
    const bool in_window = o.causal && j > position - o.window && j <= position;
    if (sink || in_window) {
      row.visible[j] = true;
      row.gate[j] = 1.0;
    }
  }
  const Selection selection = select_keys(o, u_row, position);
  for (std::size_t slot = 0; slot < selection.keys.size(); ++slot) {
    row.visible[selection.keys[slot]] = true;
    row.gate[selection.keys[slot]] = selection.gates[slot];
  }
  return row;
}

// ---------------------------------------------------------------------------------------------
// Attention over the visible keys.

// Inputs contiguous row-major: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv],
// u [B, Hkv, Lk]. Writes out [B, Hq, Lq, Dv] and lse [B, Hq, Lq]. With g_ij the gate:
//   value: l_ij = cap(s q_i·k_j),      O_i = Σ_j softmax_j(l_ij) g_ij v_j
//   kv:    l_ij = cap(s q_i·(g_ij k_j)), O_i = Σ_j softmax_j(l_ij) g_ij v_j
//   none:  g_ij = 1
// over the visible keys only; lse_i = ln Σ_j exp(l_ij); no visible key: O_i = 0, lse = −inf.
inline void sparsek_attention_reference(const AttentionShape& s, const std::vector<double>& q,
                                        const std::vector<double>& k, const std::vector<double>& v,
                                        const std::vector<double>& u,
                                        const SparseKReferenceOptions& o, std::vector<double>& out,
                                        std::vector<double>& lse) {
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t group = s.heads_q / s.heads_kv;
  out.assign(s.batch * s.heads_q * s.len_q * s.dim_v, 0.0);
  lse.assign(s.batch * s.heads_q * s.len_q, -std::numeric_limits<double>::infinity());
  std::vector<double> logits(s.len_k);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t hk = 0; hk < s.heads_kv; ++hk) {
      const std::int64_t u_begin = (b * s.heads_kv + hk) * s.len_k;
      const std::vector<double> u_row(u.begin() + u_begin, u.begin() + u_begin + s.len_k);
      for (std::int64_t i = 0; i < s.len_q; ++i) {
        const KeyGates row = key_gates(o, u_row, query_position(o, s.len_q, s.len_k, i));
        for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const double* q_row = &q[((b * s.heads_q + h) * s.len_q + i) * s.dim];
          double max_logit = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < s.len_k; ++j) {
            if (!row.visible[j]) continue;
            const double gate = o.gate == Gate::none ? 1.0 : row.gate[j];
            const double* k_row = &k[((b * s.heads_kv + hk) * s.len_k + j) * s.dim];
            double dot = 0;
            for (std::int64_t d = 0; d < s.dim; ++d) dot += q_row[d] * k_row[d];
            double logit = scale * dot;
            if (o.gate == Gate::kv) logit = scale * (gate * dot);
            if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
            logits[j] = logit;
            max_logit = std::max(max_logit, logit);
          }
          if (max_logit == -std::numeric_limits<double>::infinity()) continue;  // sees nothing
          double sum = 0;
          for (std::int64_t j = 0; j < s.len_k; ++j)
            if (row.visible[j]) sum += std::exp(logits[j] - max_logit);
          double* o_row = &out[((b * s.heads_q + h) * s.len_q + i) * s.dim_v];
          for (std::int64_t j = 0; j < s.len_k; ++j) {
            if (!row.visible[j]) continue;
            const double gate = o.gate == Gate::none ? 1.0 : row.gate[j];
            const double weight = std::exp(logits[j] - max_logit) / sum * gate;
            const double* v_row = &v[((b * s.heads_kv + hk) * s.len_k + j) * s.dim_v];
            for (std::int64_t d = 0; d < s.dim_v; ++d) o_row[d] += weight * v_row[d];
          }
          lse[(b * s.heads_q + h) * s.len_q + i] = max_logit + std::log(sum);
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// The linear scorer.

// x: [B, L, Dm]  w: [H, Dm]  ->  u: [B, H, L] = x[b, j]·w[h] + slope·j
inline std::vector<double> linear_scores_reference(const std::vector<double>& x,
                                                   const std::vector<double>& w, std::int64_t batch,
                                                   std::int64_t len, std::int64_t dim_model,
                                                   std::int64_t heads, double slope) {
  std::vector<double> u(batch * heads * len, 0.0);
  for (std::int64_t b = 0; b < batch; ++b)
    for (std::int64_t h = 0; h < heads; ++h)
      for (std::int64_t j = 0; j < len; ++j) {
        double dot = 0;
        for (std::int64_t d = 0; d < dim_model; ++d)
          dot += x[(b * len + j) * dim_model + d] * w[h * dim_model + d];
        u[(b * heads + h) * len + j] = dot + slope * static_cast<double>(j);
      }
  return u;
}

}  // namespace foveal::reference
