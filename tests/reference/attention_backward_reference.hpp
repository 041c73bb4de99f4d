// tests/reference/attention_backward_reference.hpp — the executable spec of the attention
// backward (the vector-Jacobian product of attention_reference).
//
// Plain float64 loops, no tiling, no tricks, and nothing taken from the forward: every row's
// probabilities are recomputed from scratch (never from lse). For one row (b, h, i) with
// query head h reading kv head h / (Hq / Hkv) and g = grad_out[b, h, i]:
//   t_j = q_i . k_j ; a_j = s * t_j ; softcap: c_j = c * tanh(a_j / c), else c_j = a_j ;
//   l_j = c_j + bias_ij ; visible_j as attention_reference says (mask, and l_j != -inf) ;
//   P_j = softmax_j(l_j) over the visible keys ; out_i = sum_j P_j v_j ;
//   grad_v[j] += P_j g ;                      dP_j = g . v_j ;  D_i = g . out_i ;
//   dL_j = P_j (dP_j - D_i)                   (the gradient of the logit l_j) ;
//   dT_j = dL_j * dl_j/dt_j, dl_j/dt_j = s (1 - tanh^2(a_j / c)) with a softcap, else s ;
//   grad_q[i] += dT_j k_j ;  grad_k[j] += dT_j q_i   (summed over the heads of a GQA group).
// The bias is a constant (no gradient). A row that sees no key contributes nothing to any
// gradient; a key that no row sees gets grad_k = grad_v = 0. With grad_lse (the loss also reads
// lse_i = log sum_j exp(l_j), whose derivative in l_j is P_j): dL_j += grad_lse_i P_j, i.e.
// D_i is replaced by D_i - grad_lse_i.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference/attention_reference.hpp"

namespace foveal::reference {

// The gradients of sum(grad_out * attention_reference(q, k, v).out) (+ sum(grad_lse * lse) when
// grad_lse [B, Hq, Lq] is given) with respect to q, k and v.
// Inputs are contiguous row-major as in attention_reference, plus grad_out [B, Hq, Lq, Dv].
// Writes grad_q [B, Hq, Lq, D], grad_k [B, Hkv, Lk, D] and grad_v [B, Hkv, Lk, Dv].
inline void attention_backward_reference(const AttentionShape& s, const std::vector<double>& q,
                                         const std::vector<double>& k, const std::vector<double>& v,
                                         const std::vector<double>& grad_out,
                                         const ReferenceOptions& o, std::vector<double>& grad_q,
                                         std::vector<double>& grad_k, std::vector<double>& grad_v,
                                         const std::vector<double>& bias = {},
                                         std::int64_t bias_batch = 1, std::int64_t bias_heads = 1,
                                         const std::vector<double>& grad_lse = {}) {
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_kv > 0 ? s.heads_q / s.heads_kv : 1;
  grad_q.assign(s.batch * s.heads_q * s.len_q * s.dim, 0.0);
  grad_k.assign(s.batch * s.heads_kv * s.len_k * s.dim, 0.0);
  grad_v.assign(s.batch * s.heads_kv * s.len_k * s.dim_v, 0.0);
  std::vector<double> logits(s.len_k), slope(s.len_k), p(s.len_k), out_row(s.dim_v);
  std::vector<bool> visible(s.len_k);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_q; ++h)
      for (std::int64_t i = 0; i < s.len_q; ++i) {
        const std::int64_t hk = h / group;
        const std::int64_t row = (b * s.heads_q + h) * s.len_q + i;
        const double* q_row = &q[row * s.dim];
        const double* g_row = &grad_out[row * s.dim_v];
        auto k_row = [&](std::int64_t j) {
          return &k[((b * s.heads_kv + hk) * s.len_k + j) * s.dim];
        };
        auto v_row = [&](std::int64_t j) {
          return &v[((b * s.heads_kv + hk) * s.len_k + j) * s.dim_v];
        };
        // Logits, their derivative in t = q . k, and which keys the row sees.
        double max_logit = -std::numeric_limits<double>::infinity();
        bool any = false;
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          double dot = 0;
          for (std::int64_t d = 0; d < s.dim; ++d) dot += q_row[d] * k_row(j)[d];
          double logit = scale * dot;
          slope[j] = scale;
          if (o.softcap > 0) {
            const double t = std::tanh(logit / o.softcap);
            logit = o.softcap * t;
            slope[j] = scale * (1 - t * t);
          }
          if (!bias.empty()) {
            const std::int64_t bb = bias_batch == 1 ? 0 : b;
            const std::int64_t bh = bias_heads == 1 ? 0 : h;
            logit += bias[((bb * bias_heads + bh) * s.len_q + i) * s.len_k + j];
          }
          visible[j] = reference_sees_in_row(o, s.len_k, b, q_offset + i, j) &&
                       logit != -std::numeric_limits<double>::infinity();
          if (!visible[j]) continue;
          logits[j] = logit;
          any = true;
          if (logit > max_logit) max_logit = logit;
        }
        if (!any) continue;  // the row sees no key: out = 0 whatever q, k, v are
        // P, and out recomputed from P.
        double sum = 0;
        for (std::int64_t j = 0; j < s.len_k; ++j)
          if (visible[j]) sum += std::exp(logits[j] - max_logit);
        for (std::int64_t d = 0; d < s.dim_v; ++d) out_row[d] = 0;
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          p[j] = visible[j] ? std::exp(logits[j] - max_logit) / sum : 0.0;
          for (std::int64_t d = 0; d < s.dim_v; ++d) out_row[d] += p[j] * v_row(j)[d];
        }
        double row_dot = 0;  // D_i = g . out_i
        for (std::int64_t d = 0; d < s.dim_v; ++d) row_dot += g_row[d] * out_row[d];
        if (!grad_lse.empty()) row_dot -= grad_lse[row];
        // Back through P v, the softmax, the softcap and the scale, into q, k and v.
        double* gq_row = &grad_q[row * s.dim];
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          if (!visible[j]) continue;
          const std::int64_t key = (b * s.heads_kv + hk) * s.len_k + j;
          double dp = 0;
          for (std::int64_t d = 0; d < s.dim_v; ++d) {
            dp += g_row[d] * v_row(j)[d];
            grad_v[key * s.dim_v + d] += p[j] * g_row[d];
          }
          const double dlogit = p[j] * (dp - row_dot);
          const double ddot = dlogit * slope[j];
          for (std::int64_t d = 0; d < s.dim; ++d) {
            gq_row[d] += ddot * k_row(j)[d];
            grad_k[key * s.dim + d] += ddot * q_row[d];
          }
        }
      }
}

}  // namespace foveal::reference
