// tests/reference/sparsek_backward_reference.hpp — the executable spec of the SparseK attention
// backward (the vector-Jacobian product of sparsek_attention_reference, including the scores u).
//
// Plain float64 loops, nothing taken from the kernel: every query's pool is built, projected by
// the sort-and-scan SPARSEK reference and its top-k sorted out again; probabilities are
// recomputed from scratch (never from lse). For one row (b, h, i), query head h reading kv head
// hk, g = grad_out[b, h, i], visible keys j with gates m_j (1 for sinks, window and gate none):
//   t_j = q_i·k_j ;  a_j = s m_j t_j (kv) or s t_j ;  l_j = c tanh(a_j / c) with a softcap c, else
//   a_j ;  P_j = softmax_j(l_j) ;  out_i = Σ_j P_j m_j v_j ;  D_i = g·out_i ;  dP_j = g·v_j ;
//   dl_j = P_j (m_j dP_j − D_i)   (the gradient of the logit) ;
//   da_j = dl_j (1 − tanh²(a_j / c)) with a softcap, else dl_j ;
//   grad_v[j] += P_j m_j g ;
//   value, none: grad_q[i] += s da_j k_j ;      grad_k[j] += s da_j q_i ;      dm_j = P_j dP_j
//   kv:          grad_q[i] += s da_j m_j k_j ;  grad_k[j] += s da_j m_j q_i ;  dm_j = P_j dP_j
//                                                                               + da_j s t_j
// The gates' gradients of the selected keys (summed over the query heads of the group) form
// grad_p over the query's whole pool (0 for the pool keys not selected), and the SPARSEK
// projection's own backward (sparsek_backward_reference: 1_F (grad_p − mean_F grad_p), F the
// fractional entries of the pool's projection) carries them to u. Gate none: grad_u = 0.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference/sparsek_attention_reference.hpp"
#include "reference/sparsek_reference.hpp"

namespace foveal::reference {

// Inputs as sparsek_attention_reference, plus grad_out [B, Hq, Lq, Dv]. Writes grad_q, grad_k,
// grad_v (the shapes of q, k, v) and grad_u [B, Hkv, Lk]: the gradients of
// sum(grad_out * out) with out = sparsek_attention_reference(q, k, v, u).
inline void sparsek_backward_reference(const AttentionShape& s, const std::vector<double>& q,
                                       const std::vector<double>& k, const std::vector<double>& v,
                                       const std::vector<double>& u,
                                       const std::vector<double>& grad_out,
                                       const SparseKReferenceOptions& o,
                                       std::vector<double>& grad_q, std::vector<double>& grad_k,
                                       std::vector<double>& grad_v, std::vector<double>& grad_u) {
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t group = s.heads_q / s.heads_kv;
  grad_q.assign(s.batch * s.heads_q * s.len_q * s.dim, 0.0);
  grad_k.assign(s.batch * s.heads_kv * s.len_k * s.dim, 0.0);
  grad_v.assign(s.batch * s.heads_kv * s.len_k * s.dim_v, 0.0);
  grad_u.assign(s.batch * s.heads_kv * s.len_k, 0.0);
  std::vector<double> dot(s.len_k), pre(s.len_k), logit(s.len_k), p(s.len_k), out_row(s.dim_v);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t hk = 0; hk < s.heads_kv; ++hk) {
      const std::int64_t u_begin = (b * s.heads_kv + hk) * s.len_k;
      const std::vector<double> u_row(u.begin() + u_begin, u.begin() + u_begin + s.len_k);
      auto k_row = [&](std::int64_t j) {
        return &k[((b * s.heads_kv + hk) * s.len_k + j) * s.dim];
      };
      auto v_row = [&](std::int64_t j) {
        return &v[((b * s.heads_kv + hk) * s.len_k + j) * s.dim_v];
      };
      for (std::int64_t i = 0; i < s.len_q; ++i) {
        const std::int64_t position = query_position(o, s.len_q, s.len_k, i);
        const KeyGates row = key_gates(o, u_row, position);
        // The pool, its projection and its selection, for the gates' way back to u.
        const std::vector<std::int64_t> pool = selection_pool(o, s.len_k, position);
        std::vector<double> pool_scores, pool_gates;
        for (std::int64_t j : pool) pool_scores.push_back(u_row[j]);
        sparsek_reference(pool_scores, o.topk, pool_gates);
        const std::vector<std::int64_t> selected = top_k_keys(u_row, pool, o.topk);
        std::vector<double> grad_gate(s.len_k, 0.0);  // dm_j summed over the group's heads
        for (std::int64_t h = hk * group; h < (hk + 1) * group; ++h) {
          const std::int64_t q_index = (b * s.heads_q + h) * s.len_q + i;
          const double* q_row = &q[q_index * s.dim];
          const double* g_row = &grad_out[q_index * s.dim_v];
          double max_logit = -std::numeric_limits<double>::infinity();
          for (std::int64_t j = 0; j < s.len_k; ++j) {
            if (!row.visible[j]) continue;
            const double gate = o.gate == Gate::kv ? row.gate[j] : 1.0;
            double t = 0;
            for (std::int64_t d = 0; d < s.dim; ++d) t += q_row[d] * k_row(j)[d];
            dot[j] = t;
            pre[j] = scale * (gate * t);
            logit[j] = o.softcap > 0 ? o.softcap * std::tanh(pre[j] / o.softcap) : pre[j];
            max_logit = std::max(max_logit, logit[j]);
          }
          if (max_logit == -std::numeric_limits<double>::infinity()) continue;  // sees nothing
          double sum = 0;
          for (std::int64_t j = 0; j < s.len_k; ++j)
            if (row.visible[j]) sum += std::exp(logit[j] - max_logit);
          std::fill(out_row.begin(), out_row.end(), 0.0);
          for (std::int64_t j = 0; j < s.len_k; ++j) {
            if (!row.visible[j]) continue;
            p[j] = std::exp(logit[j] - max_logit) / sum;
            const double gate = o.gate == Gate::none ? 1.0 : row.gate[j];
            for (std::int64_t d = 0; d < s.dim_v; ++d) out_row[d] += p[j] * gate * v_row(j)[d];
          }
          double delta = 0;
          for (std::int64_t d = 0; d < s.dim_v; ++d) delta += g_row[d] * out_row[d];
          double* grad_q_row = &grad_q[q_index * s.dim];
          for (std::int64_t j = 0; j < s.len_k; ++j) {
            if (!row.visible[j]) continue;
            const double gate = o.gate == Gate::none ? 1.0 : row.gate[j];
            double dp = 0;
            for (std::int64_t d = 0; d < s.dim_v; ++d) dp += g_row[d] * v_row(j)[d];
            const double dl = p[j] * (gate * dp - delta);
            double da = dl;
            if (o.softcap > 0) {
              const double th = std::tanh(pre[j] / o.softcap);
              da = dl * (1 - th * th);
            }
            const double dt = o.gate == Gate::kv ? scale * da * gate : scale * da;
            double* grad_k_row = &grad_k[((b * s.heads_kv + hk) * s.len_k + j) * s.dim];
            double* grad_v_row = &grad_v[((b * s.heads_kv + hk) * s.len_k + j) * s.dim_v];
            for (std::int64_t d = 0; d < s.dim; ++d) {
              grad_q_row[d] += dt * k_row(j)[d];
              grad_k_row[d] += dt * q_row[d];
            }
            for (std::int64_t d = 0; d < s.dim_v; ++d) grad_v_row[d] += p[j] * gate * g_row[d];
            grad_gate[j] += p[j] * dp + (o.gate == Gate::kv ? da * scale * dot[j] : 0.0);
          }
        }
        if (o.gate == Gate::none) continue;
        // Only the selected keys carry their gate into the output.
        std::vector<double> grad_pool(pool.size(), 0.0);
        for (std::size_t slot = 0; slot < pool.size(); ++slot)
          if (std::binary_search(selected.begin(), selected.end(), pool[slot]))
            grad_pool[slot] = grad_gate[pool[slot]];
        const std::vector<double> grad_scores = sparsek_backward_reference(pool_gates, grad_pool);
        for (std::size_t slot = 0; slot < pool.size(); ++slot)
          grad_u[u_begin + pool[slot]] += grad_scores[slot];
      }
    }
}

}  // namespace foveal::reference
