// tests/reference/token_topk_reference.hpp — the executable spec of token top-k selection
// (foveal/attention/token_topk.hpp), in plain float64 loops.
//
// Query positions are cut into blocks of `bs`. Query block Q (positions [lo, hi]) has as
// candidates the keys that the window of some of its queries shows (sinks apart) and that are not
// sinks visible to it; it keeps n = min(C, max(ceil(budget * C), local)) of its C candidates: the
// local ones (candidates in [lo - local_tokens, hi]), then the others by estimated mass, ties to
// the lower key; with a threshold it stops once the kept mass reaches it. The mass of candidate j
// is the group mean over query heads h of
//   ((n - o) / n) softmax_j(s(mean of the others)) + (1 / n) sum_x softmax_j(s(x)),
// s(x) = scale * x . k_j (softcapped), over Q's n queries of head h of which the o =
// min(outliers, n - 1) farthest from their mean (squared distance, ties to the earlier query)
// are the outliers x and the rest "the others".
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "reference/attention_reference.hpp"
#include "reference/block_sparse_reference.hpp"

namespace foveal::reference {

struct TokenTopkReferenceOptions {
  double budget = 1.0 / 16;
  double threshold = 0;
  std::int64_t block_size = 64;
  std::int64_t local_tokens = 64;
  std::int64_t outliers = 1;
};

// Lists in the order (b, kv head, query block), query blocks from floor(q_offset / bs); each
// list's mass is indexed by key (0 for non-candidates).
inline std::vector<ReferenceList> token_topk_select_reference(
    const AttentionShape& s, const std::vector<double>& q, const std::vector<double>& k,
    const ReferenceOptions& o, const TokenTopkReferenceOptions& sparse) {
  const std::int64_t bs = sparse.block_size;
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_q / s.heads_kv;
  std::vector<ReferenceList> lists;
  if (s.len_q == 0) return lists;
  const std::int64_t first_block = floor_div(q_offset, bs);
  const std::int64_t last_block = floor_div(q_offset + s.len_q - 1, bs);
  ReferenceOptions band = o;
  band.sink_tokens = 0;
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_kv; ++h)
      for (std::int64_t block = first_block; block <= last_block; ++block) {
        ReferenceList list;
        list.mass.assign(static_cast<std::size_t>(s.len_k), 0.0);
        const std::int64_t lo = std::max(q_offset, block * bs);
        const std::int64_t hi = std::min(q_offset + s.len_q, (block + 1) * bs) - 1;
        std::vector<std::int64_t> candidates, local;
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          bool in_band = false, visible_sink = false;
          for (std::int64_t pos = lo; pos <= hi; ++pos) {
            in_band = in_band || reference_sees(band, pos, j);
            visible_sink = visible_sink || (j < o.sink_tokens && reference_sees(o, pos, j));
          }
          if (!in_band || visible_sink) continue;
          candidates.push_back(j);
          if (j >= lo - sparse.local_tokens && j <= hi) local.push_back(j);
        }
        const auto count = static_cast<std::int64_t>(candidates.size());
        const auto wanted = static_cast<std::int64_t>(std::ceil(sparse.budget * count));
        list.keep = std::min(count, std::max(wanted, static_cast<std::int64_t>(local.size())));
        for (std::int64_t g = 0; g < group; ++g) {
          const std::int64_t head = h * group + g;
          const std::int64_t n = hi - lo + 1;
          const auto query = [&](std::int64_t pos, std::int64_t d) {
            return q[static_cast<std::size_t>(
                ((b * s.heads_q + head) * s.len_q + (pos - q_offset)) * s.dim + d)];
          };
          std::vector<double> mean_q(static_cast<std::size_t>(s.dim), 0.0);
          for (std::int64_t pos = lo; pos <= hi; ++pos)
            for (std::int64_t d = 0; d < s.dim; ++d) mean_q[d] += query(pos, d);
          for (double& x : mean_q) x /= static_cast<double>(n);
          // Outliers: farthest from the mean first, ties to the earlier query.
          std::vector<std::pair<double, std::int64_t>> far;
          for (std::int64_t pos = lo; pos <= hi; ++pos) {
            double distance = 0;
            for (std::int64_t d = 0; d < s.dim; ++d)
              distance += (query(pos, d) - mean_q[d]) * (query(pos, d) - mean_q[d]);
            far.emplace_back(-distance, pos);
          }
          std::sort(far.begin(), far.end());
          const std::int64_t chosen = std::min(sparse.outliers, n - 1);
          std::vector<std::int64_t> outliers;
          for (std::int64_t x = 0; x < chosen; ++x) outliers.push_back(far[x].second);
          std::vector<double> rest(static_cast<std::size_t>(s.dim), 0.0);
          for (std::int64_t pos = lo; pos <= hi; ++pos) {
            if (std::find(outliers.begin(), outliers.end(), pos) != outliers.end()) continue;
            for (std::int64_t d = 0; d < s.dim; ++d) rest[d] += query(pos, d);
          }
          for (double& x : rest) x /= static_cast<double>(n - chosen);
          const auto add_row = [&](const std::vector<double>& row, double weight) {
            std::vector<double> logits;
            for (const std::int64_t j : candidates) {
              double dot = 0;
              for (std::int64_t d = 0; d < s.dim; ++d)
                dot += row[d] * k[((b * s.heads_kv + h) * s.len_k + j) * s.dim + d];
              double logit = scale * dot;
              if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
              logits.push_back(logit);
            }
            add_softmax(logits, candidates, weight / static_cast<double>(group), list.mass);
          };
          add_row(rest, static_cast<double>(n - chosen) / static_cast<double>(n));
          for (const std::int64_t pos : outliers) {
            std::vector<double> row(static_cast<std::size_t>(s.dim));
            for (std::int64_t d = 0; d < s.dim; ++d) row[d] = query(pos, d);
            add_row(row, 1.0 / static_cast<double>(n));
          }
        }
        keep_local_then_by_mass(list, candidates, local, sparse.threshold);
        lists.push_back(list);
      }
  return lists;
}

// The additive bias [B, Hq, Lq, Lk] that turns attention_reference into token top-k attention
// over `kept` lists (the layout of foveal::TokenSelection): -inf where the key is not a sink and
// not kept by the query's block.
inline std::vector<double> token_topk_bias(const AttentionShape& s, const ReferenceOptions& o,
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
        for (std::int64_t j = 0; j < s.len_k; ++j)
          if (j >= o.sink_tokens && !std::binary_search(list.begin(), list.end(), j))
            bias[static_cast<std::size_t>(((b * s.heads_q + h) * s.len_q + i) * s.len_k + j)] =
                -std::numeric_limits<double>::infinity();
      }
  return bias;
}

}  // namespace foveal::reference
