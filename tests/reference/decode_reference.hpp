// tests/reference/decode_reference.hpp — the executable spec of decode attention and of merging
// partial attention states (docs/decode.md).
//
// Plain float64 loops, no chunks, no tricks:
//   decode: query i of sequence b sits at position length_b - Lq + i and attends, as in
//           attention_reference, over that sequence's keys at positions [0, length_b) as
//           appended (a ring buffer's overwriting is the kernel's business, not the spec's);
//           with o.key_start (left padding), only from position key_start[b] on.
//   merge:  m = max(lse_a, lse_b), w_a = e^(lse_a - m), w_b = e^(lse_b - m),
//           out = (w_a out_a + w_b out_b) / (w_a + w_b), lse = m + log(w_a + w_b);
//           two -inf states give out = 0, lse = -inf.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference/attention_reference.hpp"

namespace foveal::reference {

// Everything appended to one sequence of a KV cache, position-major:
// k [length, Hkv, D] and v [length, Hkv, Dv].
struct SequenceRecord {
  std::int64_t length = 0;
  std::vector<double> k, v;
};

struct DecodeShape {
  std::int64_t heads_q = 1, heads_kv = 1, len_q = 1, dim = 1, dim_v = 1;
};

// q: [B, Hq, Lq, D] row-major with B = sequences.size(). Writes out [B, Hq, Lq, Dv] and
// lse [B, Hq, Lq]. options.q_offset is ignored: the queries are the newest Lq positions.
inline void decode_reference(const DecodeShape& s, const std::vector<double>& q,
                             const std::vector<SequenceRecord>& sequences,
                             const ReferenceOptions& o, std::vector<double>& out,
                             std::vector<double>& lse) {
  constexpr double kNegativeInfinity = -std::numeric_limits<double>::infinity();
  const auto batch = static_cast<std::int64_t>(sequences.size());
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t group = s.heads_q / s.heads_kv;
  out.assign(static_cast<std::size_t>(batch * s.heads_q * s.len_q * s.dim_v), 0.0);
  lse.assign(static_cast<std::size_t>(batch * s.heads_q * s.len_q), 0.0);
  for (std::int64_t b = 0; b < batch; ++b) {
    const SequenceRecord& sequence = sequences[static_cast<std::size_t>(b)];
    std::vector<double> logits(static_cast<std::size_t>(sequence.length));
    std::vector<bool> visible(static_cast<std::size_t>(sequence.length));
    for (std::int64_t h = 0; h < s.heads_q; ++h)
      for (std::int64_t i = 0; i < s.len_q; ++i) {
        const std::int64_t hk = h / group;
        const std::int64_t position = sequence.length - s.len_q + i;
        const double* q_row =
            &q[static_cast<std::size_t>(((b * s.heads_q + h) * s.len_q + i) * s.dim)];
        double max_logit = kNegativeInfinity;
        for (std::int64_t j = 0; j < sequence.length; ++j) {
          const auto jj = static_cast<std::size_t>(j);
          // Keys the query does not see are skipped before their logit is formed: the result
          // is the same, and long sequences with short windows stay cheap.
          visible[jj] = reference_sees_in_row(o, sequence.length, b, position, j);
          if (!visible[jj]) continue;
          const double* k_row =
              &sequence.k[static_cast<std::size_t>((j * s.heads_kv + hk) * s.dim)];
          double dot = 0;
          for (std::int64_t d = 0; d < s.dim; ++d) dot += q_row[d] * k_row[d];
          double logit = scale * dot;
          if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
          logits[jj] = logit;
          max_logit = std::max(max_logit, logit);
        }
        const auto row = static_cast<std::size_t>((b * s.heads_q + h) * s.len_q + i);
        if (max_logit == kNegativeInfinity) {
          lse[row] = kNegativeInfinity;
          continue;
        }
        double sum = 0;
        for (std::int64_t j = 0; j < sequence.length; ++j)
          if (visible[static_cast<std::size_t>(j)])
            sum += std::exp(logits[static_cast<std::size_t>(j)] - max_logit);
        double* o_row = &out[row * static_cast<std::size_t>(s.dim_v)];
        for (std::int64_t j = 0; j < sequence.length; ++j) {
          if (!visible[static_cast<std::size_t>(j)]) continue;
          const double p = std::exp(logits[static_cast<std::size_t>(j)] - max_logit) / sum;
          const double* v_row =
              &sequence.v[static_cast<std::size_t>((j * s.heads_kv + hk) * s.dim_v)];
          for (std::int64_t d = 0; d < s.dim_v; ++d) o_row[d] += p * v_row[d];
        }
        lse[row] = max_logit + std::log(sum);
      }
  }
}

// out_a, out_b: [rows, Dv]  lse_a, lse_b: [rows]  ->  out [rows, Dv], lse [rows].
inline void merge_reference(std::int64_t dim_v, const std::vector<double>& out_a,
                            const std::vector<double>& lse_a, const std::vector<double>& out_b,
                            const std::vector<double>& lse_b, std::vector<double>& out,
                            std::vector<double>& lse) {
  constexpr double kNegativeInfinity = -std::numeric_limits<double>::infinity();
  const std::size_t rows = lse_a.size();
  const auto width = static_cast<std::size_t>(dim_v);
  out.assign(rows * width, 0.0);
  lse.assign(rows, kNegativeInfinity);
  for (std::size_t row = 0; row < rows; ++row) {
    const double m = std::max(lse_a[row], lse_b[row]);
    if (m == kNegativeInfinity) continue;  // no keys on either side: out 0, lse -inf
    const double w_a = std::exp(lse_a[row] - m);
    const double w_b = std::exp(lse_b[row] - m);
    for (std::size_t d = 0; d < width; ++d)
      out[row * width + d] =
          (w_a * out_a[row * width + d] + w_b * out_b[row * width + d]) / (w_a + w_b);
    lse[row] = m + std::log(w_a + w_b);
  }
}

}  // namespace foveal::reference
