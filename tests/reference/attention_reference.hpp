// tests/reference/attention_reference.hpp — the executable spec of dense attention.
//
// Plain float64 loops over the formulas of docs/attention.md, no tiling, no tricks:
//   l_ij = s * q_i . k_j ; softcap: l = c * tanh(l / c) ; + bias_ij ; masked when not visible
//   P_i = softmax_j(l_ij) over visible keys ; O_i = sum_j P_ij v_j ; lse_i = log sum_j e^l_ij
// A row with no visible key gives O = 0 and lse = -inf.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace foveal::reference {

struct AttentionShape {
  std::int64_t batch = 1, heads_q = 1, heads_kv = 1, len_q = 1, len_k = 1, dim = 1, dim_v = 1;
};

struct ReferenceOptions {
  double scale = 0;  // 0 -> 1/sqrt(D)
  bool causal = false;
  std::int64_t window_left = -1, window_right = -1, sink_tokens = 0;
  double softcap = 0;
  std::int64_t q_offset = -1;  // -1 -> Lk - Lq
  // Variable-length batches: batch row b's keys are [key_start[b], key_start[b] + key_length[b])
  // (empty vectors: 0 and Lk - start). Positions stay absolute; the sinks are the first keys
  // of the row's range.
  std::vector<std::int64_t> key_start, key_length;
};

// True when the query at absolute position `pos` sees key `j` (docs/attention.md): j inside
// the window, or j a sink that is not past the window's right edge (causal always wins).
inline bool reference_sees(const ReferenceOptions& o, std::int64_t pos, std::int64_t j) {
  const std::int64_t right = o.causal ? 0 : o.window_right;
  const bool right_ok = right < 0 || j <= pos + right;
  const bool left_ok = o.window_left < 0 || j >= pos - o.window_left;
  return right_ok && (left_ok || j < o.sink_tokens);
}

// reference_sees for batch row b of a variable-length call: nothing outside the row's keys, and
// inside them the rule with the sinks counted from the range's first key (the rule depends on
// pos - j only, apart from the sinks).
inline bool reference_sees_in_row(const ReferenceOptions& o, std::int64_t len_k, std::int64_t b,
                                  std::int64_t pos, std::int64_t j) {
  if (o.key_start.empty() && o.key_length.empty()) return reference_sees(o, pos, j);
  const std::int64_t start = o.key_start.empty() ? 0 : o.key_start[b];
  const std::int64_t length = o.key_length.empty() ? len_k - start : o.key_length[b];
  if (j < start || j >= start + length) return false;
  return reference_sees(o, pos - start, j - start);
}

// Inputs are contiguous row-major: q [B, Hq, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv],
// bias (optional, may be empty) [Bb, Hb, Lq, Lk] with Bb in {1, B} and Hb in {1, Hq}.
// Writes out [B, Hq, Lq, Dv] and lse [B, Hq, Lq].
inline void attention_reference(const AttentionShape& s, const std::vector<double>& q,
                                const std::vector<double>& k, const std::vector<double>& v,
                                const ReferenceOptions& o, std::vector<double>& out,
                                std::vector<double>& lse, const std::vector<double>& bias = {},
                                std::int64_t bias_batch = 1, std::int64_t bias_heads = 1) {
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_kv > 0 ? s.heads_q / s.heads_kv : 1;
  out.assign(s.batch * s.heads_q * s.len_q * s.dim_v, 0.0);
  lse.assign(s.batch * s.heads_q * s.len_q, 0.0);
  std::vector<double> logits(s.len_k);
  std::vector<bool> visible(s.len_k);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_q; ++h)
      for (std::int64_t i = 0; i < s.len_q; ++i) {
        const std::int64_t hk = h / group;
        const double* q_row = &q[((b * s.heads_q + h) * s.len_q + i) * s.dim];
        double max_logit = -std::numeric_limits<double>::infinity();
        bool any = false;
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          visible[j] = reference_sees_in_row(o, s.len_k, b, q_offset + i, j);
          const double* k_row = &k[((b * s.heads_kv + hk) * s.len_k + j) * s.dim];
          double dot = 0;
          for (std::int64_t d = 0; d < s.dim; ++d) dot += q_row[d] * k_row[d];
          double logit = scale * dot;
          if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
          if (!bias.empty()) {
            const std::int64_t bb = bias_batch == 1 ? 0 : b;
            const std::int64_t bh = bias_heads == 1 ? 0 : h;
            logit += bias[((bb * bias_heads + bh) * s.len_q + i) * s.len_k + j];
          }
          if (!visible[j] || logit == -std::numeric_limits<double>::infinity()) {
            visible[j] = false;
            continue;
          }
          logits[j] = logit;
          any = true;
          if (logit > max_logit) max_logit = logit;
        }
        double* o_row = out.data() + ((b * s.heads_q + h) * s.len_q + i) * s.dim_v;
        double& row_lse = lse[(b * s.heads_q + h) * s.len_q + i];
        if (!any) {
          row_lse = -std::numeric_limits<double>::infinity();
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < s.len_k; ++j)
          if (visible[j]) sum += std::exp(logits[j] - max_logit);
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          if (!visible[j]) continue;
          const double p = std::exp(logits[j] - max_logit) / sum;
          const double* v_row = v.data() + ((b * s.heads_kv + hk) * s.len_k + j) * s.dim_v;
          for (std::int64_t d = 0; d < s.dim_v; ++d) o_row[d] += p * v_row[d];
        }
        row_lse = max_logit + std::log(sum);
      }
}

}  // namespace foveal::reference
