// tests/reference/block_sparse_reference.hpp — the executable spec of block-sparse selection
// (foveal/attention/block_sparse.hpp), in plain float64 loops.
//
// Positions are cut into blocks of `bs`. Query block Q's candidates are the key blocks that
// intersect the window (causal / window_left / window_right, sinks apart) of one of its queries;
// it keeps n = min(C, max(ceil(budget * C), local)) of its C candidates: the local ones (blocks
// Q - local_blocks + 1 .. Q that are candidates), then the others by estimated mass, ties to the
// lower block; with a threshold it stops once the kept mass reaches it. The mass of candidate K
// is the group mean over query heads of softmax_K(scale * mean_Q(q_h) . mean_K(k) (softcapped)
// + ln |K|).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "reference/attention_reference.hpp"

namespace foveal::reference {

struct BlockSparseReferenceOptions {
  double budget = 1.0 / 16;
  double threshold = 0;
  std::int64_t block_size = 64;
  std::int64_t local_blocks = 1;
};

inline std::int64_t floor_div(std::int64_t a, std::int64_t b) {
  return a >= 0 ? a / b : -((-a + b - 1) / b);
}

// One list: the kept blocks (ascending) and every candidate's mass (indexed by key block; 0 for
// non-candidates).
struct ReferenceList {
  std::vector<std::int64_t> kept;
  std::vector<double> mass;
  std::int64_t keep = 0;  // n
};

// mass[candidates[i]] += weight * softmax(logits)[i].
inline void add_softmax(const std::vector<double>& logits,
                        const std::vector<std::int64_t>& candidates, double weight,
                        std::vector<double>& mass) {
  double largest = -std::numeric_limits<double>::infinity();
  for (const double l : logits) largest = std::max(largest, l);
  double total = 0;
  for (const double l : logits) total += std::exp(l - largest);
  for (std::size_t i = 0; i < candidates.size(); ++i)
    mass[static_cast<std::size_t>(candidates[i])] += weight * std::exp(logits[i] - largest) / total;
}

// Fills list.kept (list.mass and list.keep set): the local items first, then the other
// candidates by mass (ties: the lower item) while fewer than list.keep are kept and, with a
// threshold, the kept mass is below it; ascending.
inline void keep_local_then_by_mass(ReferenceList& list,
                                    const std::vector<std::int64_t>& candidates,
                                    const std::vector<std::int64_t>& local, double threshold) {
  double kept_mass = 0;
  for (const std::int64_t c : local) {
    list.kept.push_back(c);
    kept_mass += list.mass[static_cast<std::size_t>(c)];
  }
  std::vector<std::int64_t> others;
  for (const std::int64_t c : candidates)
    if (std::find(local.begin(), local.end(), c) == local.end()) others.push_back(c);
  std::stable_sort(others.begin(), others.end(), [&](std::int64_t x, std::int64_t y) {
    return list.mass[static_cast<std::size_t>(x)] > list.mass[static_cast<std::size_t>(y)];
  });
  for (const std::int64_t c : others) {
    if (static_cast<std::int64_t>(list.kept.size()) >= list.keep) break;
    if (threshold > 0 && kept_mass >= threshold) break;
    list.kept.push_back(c);
    kept_mass += list.mass[static_cast<std::size_t>(c)];
  }
  std::sort(list.kept.begin(), list.kept.end());
}

// Lists in the order (b, kv head, query block), query blocks from floor(q_offset / bs).
inline std::vector<ReferenceList> block_sparse_select_reference(
    const AttentionShape& s, const std::vector<double>& q, const std::vector<double>& k,
    const ReferenceOptions& o, const BlockSparseReferenceOptions& sparse) {
  const std::int64_t bs = sparse.block_size;
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_q / s.heads_kv;
  const std::int64_t key_blocks = (s.len_k + bs - 1) / bs;
  std::vector<ReferenceList> lists;
  if (s.len_q == 0) return lists;
  const std::int64_t first_block = floor_div(q_offset, bs);
  const std::int64_t last_block = floor_div(q_offset + s.len_q - 1, bs);
  // Sinks apart: the window alone decides candidates.
  ReferenceOptions band = o;
  band.sink_tokens = 0;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_kv; ++h)
      for (std::int64_t block = first_block; block <= last_block; ++block) {
        ReferenceList list;
        list.mass.assign(static_cast<std::size_t>(key_blocks), 0.0);
        const std::int64_t lo = std::max(q_offset, block * bs);
        const std::int64_t hi = std::min(q_offset + s.len_q, (block + 1) * bs) - 1;
        std::vector<bool> candidate(static_cast<std::size_t>(key_blocks), false);
        for (std::int64_t pos = lo; pos <= hi; ++pos)
          for (std::int64_t j = 0; j < s.len_k; ++j)
            if (reference_sees(band, pos, j)) candidate[static_cast<std::size_t>(j / bs)] = true;
        std::vector<std::int64_t> candidates;
        for (std::int64_t c = 0; c < key_blocks; ++c)
          if (candidate[static_cast<std::size_t>(c)]) candidates.push_back(c);
        const auto count = static_cast<std::int64_t>(candidates.size());
        std::vector<std::int64_t> local;
        for (const std::int64_t c : candidates)
          if (c <= block && c > block - sparse.local_blocks) local.push_back(c);
        const auto wanted = static_cast<std::int64_t>(std::ceil(sparse.budget * count));
        list.keep = std::min(count, std::max(wanted, static_cast<std::int64_t>(local.size())));
        // Masses.
        for (std::int64_t g = 0; g < group; ++g) {
          const std::int64_t head = h * group + g;
          std::vector<double> mean_q(static_cast<std::size_t>(s.dim), 0.0);
          for (std::int64_t pos = lo; pos <= hi; ++pos)
            for (std::int64_t d = 0; d < s.dim; ++d)
              mean_q[d] += q[((b * s.heads_q + head) * s.len_q + (pos - q_offset)) * s.dim + d];
          for (double& x : mean_q) x /= static_cast<double>(hi - lo + 1);
          std::vector<double> logits;
          for (const std::int64_t c : candidates) {
            const std::int64_t begin = c * bs, end = std::min(s.len_k, begin + bs);
            double dot = 0;
            for (std::int64_t d = 0; d < s.dim; ++d) {
              double mean_k = 0;
              for (std::int64_t j = begin; j < end; ++j)
                mean_k += k[((b * s.heads_kv + h) * s.len_k + j) * s.dim + d];
              dot += mean_q[d] * mean_k / static_cast<double>(end - begin);
            }
            double logit = scale * dot;
            if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
            logits.push_back(logit + std::log(static_cast<double>(end - begin)));
          }
          add_softmax(logits, candidates, 1.0 / static_cast<double>(group), list.mass);
        }
        keep_local_then_by_mass(list, candidates, local, sparse.threshold);
        lists.push_back(list);
      }
  return lists;
}

// The additive bias [B, Hq, Lq, Lk] that turns attention_reference into block-sparse attention
// over `kept` lists (the layout of foveal::BlockSelection): -inf where the key is not a sink and
// its block is not kept by the query's block.
inline std::vector<double> block_sparse_bias(const AttentionShape& s, const ReferenceOptions& o,
                                             std::int64_t bs,
                                             const std::vector<std::vector<std::int64_t>>& kept) {
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_q / s.heads_kv;
  const std::int64_t first_block = s.len_q > 0 ? floor_div(q_offset, bs) : 0;
  const std::int64_t query_blocks =
      s.len_q > 0 ? floor_div(q_offset + s.len_q - 1, bs) - first_block + 1 : 0;
  std::vector<double> bias(static_cast<std::size_t>(s.batch * s.heads_q * s.len_q * s.len_k), 0);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_q; ++h)
      for (std::int64_t i = 0; i < s.len_q; ++i) {
        const std::int64_t block = floor_div(q_offset + i, bs);
        const auto& list = kept[static_cast<std::size_t>(
            (b * s.heads_kv + h / group) * query_blocks + (block - first_block))];
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          const bool in =
              j < o.sink_tokens || std::find(list.begin(), list.end(), j / bs) != list.end();
          if (!in)
            bias[static_cast<std::size_t>(((b * s.heads_q + h) * s.len_q + i) * s.len_k + j)] =
                -std::numeric_limits<double>::infinity();
        }
      }
  return bias;
}

}  // namespace foveal::reference
