// src/kernels/vertical_slash.hpp — the vertical-slash selection of one ISA level (included by
// level.cpp): the last queries' attention estimates the mass of every column (a key) and every
// slash (a diagonal, one distance between query and key); the lines are ranked once per
// (batch, kv head) and each query block takes its keys from them, best line first. The lists are
// a foveal::TokenSelection, attended by token_topk_attention's engine run.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "detail/block_sparse_geometry.hpp"
#include "detail/kernels.hpp"
#include "foveal/core/parallel.hpp"
#include "kernels/token_topk.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// The lines of one (batch, kv head), best first. A line id below `columns` is the column of key
// column_begin + id; above, the slash of distance (query position - key) first_distance + id -
// columns.
struct RankedLines {
  Index column_begin = 0;
  Index columns = 0;
  Index first_distance = 0;
  Index chosen = 0;  // the lines a query block may use: all, or the prefix that reaches τ
  std::vector<Index> order;
};

template <typename T>
struct LineScratch {
  TokenSelectScratch<T> scoring;
  std::vector<T> column_mass;
  std::vector<T> slash_mass;
  std::vector<std::pair<MassRank<T>, Index>> entries;
  std::vector<std::uint64_t> packed, buffer;
};

// Sorts `keys` ascending: least significant byte first, skipping the bytes all keys share.
inline void radix_sort(std::vector<std::uint64_t>& keys, std::vector<std::uint64_t>& buffer) {
  if (keys.empty()) return;
  buffer.resize(keys.size());
  std::uint64_t differ = 0;
  for (const std::uint64_t key : keys) differ |= key ^ keys.front();
  for (int shift = 0; shift < 64; shift += 8) {
    if (((differ >> shift) & 0xff) == 0) continue;
    std::array<std::size_t, 257> start{};
    for (const std::uint64_t key : keys) ++start[((key >> shift) & 0xff) + 1];
    for (std::size_t digit = 1; digit < start.size(); ++digit) start[digit] += start[digit - 1];
    for (const std::uint64_t key : keys) buffer[start[(key >> shift) & 0xff]++] = key;
    keys.swap(buffer);
  }
}

// The index of the lowest set bit of a nonzero word, by a de Bruijn multiplication: baseline
// code may not hold the BMI instruction (tzcnt) a count-trailing-zeros builtin compiles to.
inline int lowest_bit(std::uint64_t bits) {
  constexpr std::uint64_t kDeBruijn = 0x022fdd63cc95386dULL;  // every 6-bit window once
  constexpr std::array<std::uint8_t, 64> kIndex = [] {
    std::array<std::uint8_t, 64> index{};
    for (int bit = 0; bit < 64; ++bit)
      index[(kDeBruijn << bit) >> 58] = static_cast<std::uint8_t>(bit);
    return index;
  }();
  return kIndex[((bits & (~bits + 1)) * kDeBruijn) >> 58];
}

// The candidates of the query at `position`: its band past the sinks.
inline KeyRange row_candidates(const Visibility& visibility, Index position) {
  const KeyRange band = visibility.band(position, position);
  const Index begin = std::max(band.begin, visibility.sinks_end(position));
  return {begin, std::max(band.end, begin)};
}

// The estimate and the ranking of (b, kv head h).
template <typename S, typename T>
void rank_lines(const SelectPlan<S>& plan, Index b, Index h, const EstimateLogits<T>& logits_of,
                LineScratch<T>& own, RankedLines& lines) {
  const auto& q = plan.q;
  const auto& k = plan.k;
  const Index heads_kv = k.size(1), len_q = q.size(2), dim = q.size(3);
  const Index group = q.size(1) / heads_kv;
  // No query heads: no estimate rows (and Lq, of an empty view, may be anything).
  if (group == 0) return;
  const Index estimate_rows = std::min(plan.last_queries, len_q);
  const Index first_row = len_q - estimate_rows;
  Index span_begin = std::numeric_limits<Index>::max(), span_end = 0;
  for (Index i = first_row; i < len_q; ++i) {
    const KeyRange candidates = row_candidates(plan.visibility, plan.q_offset + i);
    if (candidates.end <= candidates.begin) continue;
    span_begin = std::min(span_begin, candidates.begin);
    span_end = std::max(span_end, candidates.end);
  }
  if (span_end <= span_begin) return;  // no line: the lists keep their local keys only
  const Index span = span_end - span_begin;
  const Index first_position = plan.q_offset + first_row;
  lines.column_begin = span_begin;
  lines.columns = span;
  lines.first_distance = first_position - (span_end - 1);
  const Index slashes = (plan.q_offset + len_q - 1 - span_begin) - lines.first_distance + 1;
  own.column_mass.assign(static_cast<std::size_t>(span), T(0));
  own.slash_mass.assign(static_cast<std::size_t>(slashes), T(0));

  // Rows (query first_row + r / group, head h * group + r % group), kBlockQ at a time; each
  // row's softmax over its candidates, weighted so that every line family sums to <= 1.
  TokenSelectScratch<T>& scoring = own.scoring;
  prepare_scoring<S>(dim, scoring);
  const Index rows_total = estimate_rows * group;
  scoring.logits.resize(static_cast<std::size_t>(std::min(kBlockQ, rows_total) * span));
  const T weight = T(1) / static_cast<T>(rows_total);
  for (Index row0 = 0; row0 < rows_total; row0 += kBlockQ) {
    const Index rows = std::min(kBlockQ, rows_total - row0);
    std::fill(scoring.q_t.begin(), scoring.q_t.end(), T(0));
    for (Index r = 0; r < rows; ++r) {
      const S* row =
          q.address(b, h * group + (row0 + r) % group, first_row + (row0 + r) / group, 0);
      for (Index d = 0; d < dim; ++d)
        scoring.q_t[static_cast<std::size_t>(d * kBlockQ + r)] = to_compute(row[d]);
    }
    score_span(k, b, h, span_begin, span_end, rows, logits_of.multiplier, scoring,
               scoring.logits.data());
    for (Index r = 0; r < rows; ++r) {
      const Index position = first_position + (row0 + r) / group;
      const KeyRange candidates = row_candidates(plan.visibility, position);
      const Index count = candidates.end - candidates.begin;
      if (count <= 0) continue;
      T* p = scoring.logits.data() + r * span + (candidates.begin - span_begin);
      logits_of.finish(p, count);
      if (!scaled_softmax(p, count, weight)) continue;
      T* columns = own.column_mass.data() + (candidates.begin - span_begin);
      for (Index j = 0; j < count; ++j) columns[j] += p[j];
      // Key candidates.begin + j lies on the slash of distance position - candidates.begin - j.
      T* slash = own.slash_mass.data() + (position - candidates.begin - lines.first_distance);
      for (Index j = 0; j < count; ++j) slash[-j] += p[j];
    }
  }

  // Ranked by mass per key a query block pays for the line: a column brings one key, a slash up
  // to block_size (its keys for the block's queries). Ties: columns first, then the lower id.
  const T per_slash_key = T(1) / static_cast<T>(plan.block_size);
  const auto rank_of = [&](Index id) {
    return id < span
               ? mass_rank(own.column_mass[static_cast<std::size_t>(id)])
               : mass_rank(own.slash_mass[static_cast<std::size_t>(id - span)] * per_slash_key);
  };
  const Index count = span + slashes;
  lines.order.resize(static_cast<std::size_t>(count));
  if (sizeof(MassRank<T>) == 4 && count <= (Index{1} << 32)) {
    // (~rank, id) packed in 64 bits: ascending order is the ranking.
    own.packed.resize(static_cast<std::size_t>(count));
    for (Index id = 0; id < count; ++id)
      own.packed[static_cast<std::size_t>(id)] =
          static_cast<std::uint64_t>(static_cast<std::uint32_t>(~rank_of(id))) << 32 |
          static_cast<std::uint64_t>(id);
    radix_sort(own.packed, own.buffer);
    for (Index at = 0; at < count; ++at)
      lines.order[static_cast<std::size_t>(at)] =
          static_cast<Index>(own.packed[static_cast<std::size_t>(at)] & 0xffffffffu);
  } else {
    own.entries.clear();
    for (Index id = 0; id < count; ++id) own.entries.emplace_back(rank_of(id), id);
    std::sort(own.entries.begin(), own.entries.end(), [](const auto& x, const auto& y) {
      return x.first > y.first || (x.first == y.first && x.second < y.second);
    });
    for (Index at = 0; at < count; ++at)
      lines.order[static_cast<std::size_t>(at)] = own.entries[static_cast<std::size_t>(at)].second;
  }
  lines.chosen = static_cast<Index>(lines.order.size());
  if (plan.threshold > 0) {
    // The fewest lines whose estimated masses reach τ (a key on a kept column and a kept slash
    // counts twice: the sum bounds the kept mass from above).
    T reached = 0;
    for (Index at = 0; at < lines.chosen; ++at) {
      const Index id = lines.order[static_cast<std::size_t>(at)];
      reached += id < span ? own.column_mass[static_cast<std::size_t>(id)]
                           : own.slash_mass[static_cast<std::size_t>(id - span)];
      if (reached >= static_cast<T>(plan.threshold)) {
        lines.chosen = at + 1;
        break;
      }
    }
  }
}

// Query block `block`'s list: its local keys, then the keys of the lines in rank order, until
// it holds `keep` keys (the last line's lowest keys first). `taken` is a zeroed bit per key (left
// zeroed): the keys are marked there and read back in ascending order, no sort.
inline Index fill_list(const TokenBlockGeometry& g, const RankedLines& lines, bool adaptive,
                       std::vector<std::uint64_t>& taken, std::int64_t* kept) {
  Index count = 0;
  if (!adaptive && g.keep == g.candidate_end - g.candidate_begin) {
    for (Index key = g.candidate_begin; key < g.candidate_end; ++key) kept[count++] = key;
    return count;
  }
  if (g.candidate_end <= g.candidate_begin) return 0;
  const auto take = [&](Index key) {
    std::uint64_t& word = taken[static_cast<std::size_t>(key >> 6)];
    const std::uint64_t bit = std::uint64_t{1} << (key & 63);
    count += (word & bit) == 0;
    word |= bit;
  };
  for (Index key = g.local_begin; key < g.local_end; ++key) take(key);
  for (Index at = 0; at < lines.chosen && count < g.keep; ++at) {
    const Index id = lines.order[static_cast<std::size_t>(at)];
    if (id < lines.columns) {
      const Index key = lines.column_begin + id;
      if (key >= g.candidate_begin && key < g.candidate_end) take(key);
      continue;
    }
    const Index distance = lines.first_distance + (id - lines.columns);
    const Index first = std::max(g.candidate_begin, g.position_lo - distance);
    const Index last = std::min(g.candidate_end - 1, g.position_hi - distance);
    for (Index key = first; key <= last && count < g.keep; ++key) take(key);
  }
  // Every marked key is a candidate: read the candidates' words back, clearing them.
  Index written = 0;
  for (Index word = g.candidate_begin >> 6; word <= (g.candidate_end - 1) >> 6; ++word) {
    std::uint64_t bits = taken[static_cast<std::size_t>(word)];
    taken[static_cast<std::size_t>(word)] = 0;
    for (; bits != 0; bits &= bits - 1) kept[written++] = word * 64 + lowest_bit(bits);
  }
  return written;
}

template <typename S>
void vertical_slash_select(const SelectPlan<S>& plan) {
  using T = compute_type_t<S>;
  const Index batch = plan.q.size(0), heads_q = plan.q.size(1), len_q = plan.q.size(2);
  const Index heads_kv = plan.k.size(1), len_k = plan.k.size(2), dim = plan.q.size(3);
  const Index heads = batch * heads_kv;
  const Index group = heads_q / heads_kv;

  // 1. The lines of every (batch, kv head).
  std::vector<RankedLines> ranked(static_cast<std::size_t>(heads));
  const double estimate_work = static_cast<double>(heads) * static_cast<double>(group) *
                               static_cast<double>(std::min(plan.last_queries, len_q)) *
                               static_cast<double>(len_k) * static_cast<double>(dim);
  const int rank_threads = team_size(heads, plan.num_threads, saturated_work(estimate_work));
  std::vector<LineScratch<T>> scratch(static_cast<std::size_t>(rank_threads));
  const EstimateLogits<T> logits_of(plan.scale, plan.softcap);
  parallel_for(heads, rank_threads, [&](Index task) {
    rank_lines(plan, task / heads_kv, task % heads_kv, logits_of,
               scratch[static_cast<std::size_t>(thread_index())],
               ranked[static_cast<std::size_t>(task)]);
  });
  scratch.clear();

  // 2. The lists, kBlocksPerTask query blocks a task.
  constexpr Index kBlocksPerTask = 16;
  const Index chunks = ceil_divide(plan.query_blocks, kBlocksPerTask);
  const double list_work = static_cast<double>(plan.capacity[heads * plan.query_blocks]) *
                           static_cast<double>(plan.block_size);
  const int list_threads = team_size(heads * chunks, plan.num_threads, saturated_work(list_work));
  std::vector<std::vector<std::uint64_t>> taken(static_cast<std::size_t>(list_threads));
  parallel_for(heads * chunks, list_threads, [&](Index task) {
    std::vector<std::uint64_t>& own = taken[static_cast<std::size_t>(thread_index())];
    if (own.empty()) own.assign(static_cast<std::size_t>(len_k / 64 + 1), 0);
    const Index head = task / chunks;
    const Index first = task % chunks * kBlocksPerTask;
    const Index last = std::min(plan.query_blocks, first + kBlocksPerTask);
    for (Index relative = first; relative < last; ++relative) {
      const TokenBlockGeometry g =
          token_block_geometry(plan.visibility, plan.q_offset, len_q, plan.block_size,
                               plan.first_query_block + relative, plan.budget, plan.local);
      const Index list = head * plan.query_blocks + relative;
      plan.counts[list] = fill_list(g, ranked[static_cast<std::size_t>(head)], plan.threshold > 0,
                                    own, plan.items + plan.capacity[list]);
    }
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
