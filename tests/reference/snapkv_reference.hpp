// tests/reference/snapkv_reference.hpp — the executable spec of SnapKV's selection
// (foveal/attention/snapkv.hpp), in plain float64 loops.
//
// The observation rows are the last min(window, Lq) queries (positions q_offset + i, causal).
// For kv head h: vote[j] = (1 / group) * sum over the group's query heads and the observation
// rows of softmax over the row's visible keys of scale * q . k_j (softcapped); pooled[j] = the
// sum of vote over [j - pool/2, j + pool/2] ∩ [0, Lk), divided by pool. Every head keeps the
// sinks, the newest local_tokens keys, then the others by pooled vote (ties to the lower key),
// n = min(Lk, max(ceil(budget * Lk), forced)) in all; with a threshold, the count is the largest
// over heads of the fewest keys (forced first, then by vote) whose pooled vote reaches
// threshold * the head's total, at most n.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "reference/attention_reference.hpp"

namespace foveal::reference {

struct SnapKVReferenceOptions {
  double budget = 1.0 / 16;
  double threshold = 0;
  std::int64_t window = 64;
  std::int64_t pool = 7;
  std::int64_t local_tokens = 64;
};

struct SnapKVReference {
  std::int64_t kept = 0;
  std::vector<std::vector<std::int64_t>> keys;  // per (b, kv head), ascending
  std::vector<std::vector<double>> pooled;      // per (b, kv head), per key
};

inline SnapKVReference snapkv_select_reference(const AttentionShape& s,
                                               const std::vector<double>& q,
                                               const std::vector<double>& k,
                                               const ReferenceOptions& o,
                                               const SnapKVReferenceOptions& snap) {
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_kv > 0 ? s.heads_q / s.heads_kv : 0;
  const std::int64_t window = std::min(snap.window, s.len_q);
  const std::int64_t len_k = s.len_k;
  auto q_at = [&](std::int64_t b, std::int64_t h, std::int64_t i, std::int64_t d) {
    return q[static_cast<std::size_t>(((b * s.heads_q + h) * s.len_q + i) * s.dim + d)];
  };
  auto k_at = [&](std::int64_t b, std::int64_t h, std::int64_t j, std::int64_t d) {
    return k[static_cast<std::size_t>(((b * s.heads_kv + h) * len_k + j) * s.dim + d)];
  };
  auto is_forced = [&](std::int64_t j) {
    return j < o.sink_tokens || j >= len_k - snap.local_tokens;
  };
  std::int64_t forced = 0;
  for (std::int64_t j = 0; j < len_k; ++j) forced += is_forced(j) ? 1 : 0;
  const std::int64_t by_budget =
      static_cast<std::int64_t>(std::ceil(snap.budget * static_cast<double>(len_k)));
  const std::int64_t n = std::min(len_k, std::max(by_budget, forced));

  SnapKVReference result;
  std::vector<std::vector<std::int64_t>> orders;  // per head: every key, forced ones first
  std::vector<std::int64_t> needed;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_kv; ++h) {
      std::vector<double> vote(static_cast<std::size_t>(len_k), 0.0);
      for (std::int64_t g = 0; g < group; ++g) {
        std::vector<double> head_vote(static_cast<std::size_t>(len_k), 0.0);
        for (std::int64_t i = s.len_q - window; i < s.len_q; ++i) {
          const std::int64_t position = q_offset + i;
          std::vector<double> logits;
          for (std::int64_t j = 0; j < len_k && j <= position; ++j) {
            double dot = 0;
            for (std::int64_t d = 0; d < s.dim; ++d)
              dot += q_at(b, h * group + g, i, d) * k_at(b, h, j, d);
            double logit = scale * dot;
            if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
            logits.push_back(logit);
          }
          if (logits.empty()) continue;
          const double largest = *std::max_element(logits.begin(), logits.end());
          double total = 0;
          for (double& value : logits) {
            value = std::exp(value - largest);
            total += value;
          }
          for (std::size_t j = 0; j < logits.size(); ++j) head_vote[j] += logits[j] / total;
        }
        for (std::int64_t j = 0; j < len_k; ++j)
          vote[static_cast<std::size_t>(j)] += head_vote[static_cast<std::size_t>(j)];
      }
      for (double& value : vote) value /= static_cast<double>(std::max<std::int64_t>(group, 1));
      std::vector<double> pooled(static_cast<std::size_t>(len_k), 0.0);
      for (std::int64_t j = 0; j < len_k; ++j) {
        double sum = 0;
        for (std::int64_t t = j - snap.pool / 2; t <= j + snap.pool / 2; ++t)
          if (t >= 0 && t < len_k) sum += vote[static_cast<std::size_t>(t)];
        pooled[static_cast<std::size_t>(j)] = sum / static_cast<double>(snap.pool);
      }
      // Forced keys first (ascending), then the others by vote, ties to the lower key.
      std::vector<std::int64_t> order, others;
      for (std::int64_t j = 0; j < len_k; ++j) (is_forced(j) ? order : others).push_back(j);
      std::stable_sort(others.begin(), others.end(), [&](std::int64_t a, std::int64_t c) {
        return pooled[static_cast<std::size_t>(a)] > pooled[static_cast<std::size_t>(c)];
      });
      order.insert(order.end(), others.begin(), others.end());
      std::int64_t count = n;
      if (snap.threshold > 0) {
        double total = 0, mass = 0;
        for (std::int64_t j = 0; j < len_k; ++j) total += pooled[static_cast<std::size_t>(j)];
        count = forced;
        for (std::int64_t j = 0; j < len_k; ++j)
          if (is_forced(j)) mass += pooled[static_cast<std::size_t>(j)];
        if (total > 0)
          while (count < n && mass < snap.threshold * total)
            mass += pooled[static_cast<std::size_t>(order[static_cast<std::size_t>(count++)])];
      }
      needed.push_back(count);
      orders.push_back(order);
      result.pooled.push_back(pooled);
    }
  result.kept = n;
  if (snap.threshold > 0) {
    result.kept = forced;
    for (const std::int64_t count : needed) result.kept = std::max(result.kept, count);
  }
  for (const auto& order : orders) {
    std::vector<std::int64_t> keys(order.begin(), order.begin() + result.kept);
    std::sort(keys.begin(), keys.end());
    result.keys.push_back(keys);
  }
  return result;
}

}  // namespace foveal::reference
