// tests/reference/vertical_slash_reference.hpp — the executable spec of the vertical-slash
// selection (foveal/attention/vertical_slash.hpp), in plain float64 loops.
//
// The last `last_queries` queries (every head of a GQA group) attend over their candidates (their
// window past the sinks); weighted by 1 / (rows * group), probability p of key j for the query at
// position pos adds to column j and to slash pos - j. Lines: every column in the hull of the rows'
// candidates and every slash from the first row's position minus the hull's last key to the last
// row's position minus its first key; ranked by mass per key (a slash's mass / block_size), ties
// to columns, then the lower key or distance. Query block Q keeps its local keys, then the keys
// of the lines in rank order (a slash d: candidates in [lo - d, hi - d], ascending) until it holds
// n = min(C, max(ceil(budget * C), local)); with a threshold only the shortest prefix of lines
// whose masses reach it, and when the budget keeps every candidate, all of them.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <vector>

#include "reference/attention_reference.hpp"
#include "reference/block_sparse_reference.hpp"

namespace foveal::reference {

struct VerticalSlashReferenceOptions {
  double budget = 1.0 / 16;
  double threshold = 0;
  std::int64_t block_size = 64;
  std::int64_t last_queries = 64;
  std::int64_t local_tokens = 64;
};

// Whether key j is a candidate of the query at `pos`: in its window, and not a sink it sees.
inline bool vertical_slash_candidate(const ReferenceOptions& o, std::int64_t pos, std::int64_t j) {
  ReferenceOptions band = o;
  band.sink_tokens = 0;
  return reference_sees(band, pos, j) && !(j < o.sink_tokens && reference_sees(o, pos, j));
}

// Lists in the order (b, kv head, query block), query blocks from floor(q_offset / bs); `mass`
// is left empty (the lines, not the keys, carry the estimate).
inline std::vector<ReferenceList> vertical_slash_select_reference(
    const AttentionShape& s, const std::vector<double>& q, const std::vector<double>& k,
    const ReferenceOptions& o, const VerticalSlashReferenceOptions& sparse) {
  const std::int64_t bs = sparse.block_size;
  const double scale = o.scale > 0 ? o.scale : 1.0 / std::sqrt(static_cast<double>(s.dim));
  const std::int64_t q_offset = o.q_offset >= 0 ? o.q_offset : s.len_k - s.len_q;
  const std::int64_t group = s.heads_q / s.heads_kv;
  std::vector<ReferenceList> lists;
  if (s.len_q == 0) return lists;
  const std::int64_t rows = std::min(sparse.last_queries, s.len_q);
  const std::int64_t first_pos = q_offset + s.len_q - rows;
  const std::int64_t last_pos = q_offset + s.len_q - 1;
  const std::int64_t first_block = floor_div(q_offset, bs);
  const std::int64_t last_block = floor_div(last_pos, bs);
  for (std::int64_t b = 0; b < s.batch; ++b)
    for (std::int64_t h = 0; h < s.heads_kv; ++h) {
      // The estimate.
      std::int64_t hull_begin = s.len_k, hull_end = 0;
      for (std::int64_t pos = first_pos; pos <= last_pos; ++pos)
        for (std::int64_t j = 0; j < s.len_k; ++j)
          if (vertical_slash_candidate(o, pos, j)) {
            hull_begin = std::min(hull_begin, j);
            hull_end = std::max(hull_end, j + 1);
          }
      // Lines (kind 0: column of key x; kind 1: slash of distance x) with their masses.
      std::vector<std::tuple<double, int, std::int64_t>> lines;  // (density, kind, x)
      std::vector<double> column, slash;
      const std::int64_t first_distance = first_pos - (hull_end - 1);
      if (hull_end > hull_begin) {
        column.assign(static_cast<std::size_t>(hull_end - hull_begin), 0.0);
        slash.assign(static_cast<std::size_t>(last_pos - hull_begin - first_distance + 1), 0.0);
        for (std::int64_t pos = first_pos; pos <= last_pos; ++pos)
          for (std::int64_t g = 0; g < group; ++g) {
            const std::int64_t head = h * group + g;
            std::vector<std::int64_t> candidates;
            std::vector<double> logits;
            for (std::int64_t j = 0; j < s.len_k; ++j) {
              if (!vertical_slash_candidate(o, pos, j)) continue;
              double dot = 0;
              for (std::int64_t d = 0; d < s.dim; ++d)
                dot += q[((b * s.heads_q + head) * s.len_q + (pos - q_offset)) * s.dim + d] *
                       k[((b * s.heads_kv + h) * s.len_k + j) * s.dim + d];
              double logit = scale * dot;
              if (o.softcap > 0) logit = o.softcap * std::tanh(logit / o.softcap);
              candidates.push_back(j);
              logits.push_back(logit);
            }
            if (candidates.empty()) continue;
            double largest = -std::numeric_limits<double>::infinity();
            for (const double x : logits) largest = std::max(largest, x);
            double total = 0;
            for (double& x : logits) total += x = std::exp(x - largest);
            const double weight = 1.0 / static_cast<double>(rows * group);
            for (std::size_t i = 0; i < candidates.size(); ++i) {
              const double p = weight * logits[i] / total;
              column[static_cast<std::size_t>(candidates[i] - hull_begin)] += p;
              slash[static_cast<std::size_t>(pos - candidates[i] - first_distance)] += p;
            }
          }
        for (std::size_t c = 0; c < column.size(); ++c)
          lines.emplace_back(column[c], 0, hull_begin + static_cast<std::int64_t>(c));
        for (std::size_t d = 0; d < slash.size(); ++d)
          lines.emplace_back(slash[d] / static_cast<double>(bs), 1,
                             first_distance + static_cast<std::int64_t>(d));
      }
      std::sort(lines.begin(), lines.end(), [](const auto& x, const auto& y) {
        if (std::get<0>(x) != std::get<0>(y)) return std::get<0>(x) > std::get<0>(y);
        if (std::get<1>(x) != std::get<1>(y)) return std::get<1>(x) < std::get<1>(y);
        return std::get<2>(x) < std::get<2>(y);
      });
      std::size_t chosen = lines.size();
      if (sparse.threshold > 0) {
        double reached = 0;
        for (std::size_t at = 0; at < lines.size(); ++at) {
          const auto& [density, kind, x] = lines[at];
          reached += kind == 0 ? density : density * static_cast<double>(bs);
          if (reached >= sparse.threshold) {
            chosen = at + 1;
            break;
          }
        }
      }

      // The lists.
      for (std::int64_t block = first_block; block <= last_block; ++block) {
        ReferenceList list;
        const std::int64_t lo = std::max(q_offset, block * bs);
        const std::int64_t hi = std::min(q_offset + s.len_q, (block + 1) * bs) - 1;
        std::vector<std::int64_t> candidates;
        std::vector<bool> is_candidate(static_cast<std::size_t>(s.len_k), false);
        std::int64_t local = 0;
        for (std::int64_t j = 0; j < s.len_k; ++j) {
          bool any = false;
          for (std::int64_t pos = lo; pos <= hi && !any; ++pos)
            any = vertical_slash_candidate(o, pos, j);
          if (!any) continue;
          candidates.push_back(j);
          is_candidate[static_cast<std::size_t>(j)] = true;
          if (j >= lo - sparse.local_tokens && j <= hi) ++local;
        }
        const auto count = static_cast<std::int64_t>(candidates.size());
        const auto wanted = static_cast<std::int64_t>(std::ceil(sparse.budget * count));
        list.keep = std::min(count, std::max(wanted, local));
        if (sparse.threshold <= 0 && list.keep == count) {
          list.kept = candidates;
          lists.push_back(list);
          continue;
        }
        std::vector<bool> taken(static_cast<std::size_t>(s.len_k), false);
        const auto take = [&](std::int64_t j) {
          if (j < 0 || j >= s.len_k || !is_candidate[static_cast<std::size_t>(j)] ||
              taken[static_cast<std::size_t>(j)] ||
              static_cast<std::int64_t>(list.kept.size()) >= list.keep)
            return;
          taken[static_cast<std::size_t>(j)] = true;
          list.kept.push_back(j);
        };
        for (const std::int64_t j : candidates)
          if (j >= lo - sparse.local_tokens && j <= hi) take(j);
        for (std::size_t at = 0; at < chosen; ++at) {
          const auto& [density, kind, x] = lines[at];
          if (kind == 0) {
            take(x);
          } else {
            for (std::int64_t j = lo - x; j <= hi - x; ++j) take(j);
          }
        }
        std::sort(list.kept.begin(), list.kept.end());
        lists.push_back(list);
      }
    }
  return lists;
}

}  // namespace foveal::reference
