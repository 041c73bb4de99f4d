// src/kernels/token_topk.hpp — fine-grained (token) top-k prefill of one ISA level (included by
// level.cpp): the pooled estimate that selects keys per query block, and the engine run over a
// selection with the kept keys gathered by index. The entry points (src/token_topk.cpp) validate
// and size; these compute.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "detail/block_sparse_geometry.hpp"
#include "detail/convert.hpp"
#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/simd.hpp"
#include "detail/softmax_math.hpp"
#include "foveal/core/parallel.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// An unsigned integer that orders masses as numbers (NaN, from NaN inputs, lowest): what the
// selection sorts, so that it compares plain integers. Branch-free, so that a loop of it
// vectorizes.
template <typename T>
using MassRank = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;

template <typename T>
MassRank<T> mass_rank(T mass) {
  using Rank = MassRank<T>;
  Rank bits;
  std::memcpy(&bits, &mass, sizeof(bits));
  constexpr Rank kSign = Rank{1} << (8 * sizeof(Rank) - 1);
  const Rank ordered = (bits & kSign) != 0 ? ~bits : bits | kSign;
  return mass == mass ? ordered : Rank{0};
}

// Vectors of ranks, and how many ranks a vector holds.
template <typename Rank>
using RankVec __attribute__((vector_size(kVectorBytes))) = Rank;
template <typename Rank>
inline constexpr Index kRankLanes = kVectorBytes / static_cast<Index>(sizeof(Rank));

// How many of ranks[0, n) are >= x: four vector counters (independent chains), then the rest.
template <typename Rank>
Index count_at_least(const Rank* ranks, Index n, Rank x) {
  using V = RankVec<Rank>;
  constexpr Index L = kRankLanes<Rank>;
  Index total = 0;
  // Lane counters of Rank width: at most 2^20 / L per lane per chunk, no overflow.
  for (Index begin = 0; begin < n; begin += Index{1} << 20) {
    const Index end = std::min(n, begin + (Index{1} << 20));
    const V bound = V{} + x;
    V counts[4] = {};
    Index i = begin;
    for (; i + 4 * L <= end; i += 4 * L)
      for (int c = 0; c < 4; ++c) {
        V value;
        std::memcpy(&value, ranks + i + c * L, sizeof(value));
        counts[c] -= reinterpret_cast<V>(value >= bound);  // -1 where true
      }
    const V sum = counts[0] + counts[1] + counts[2] + counts[3];
    for (Index lane = 0; lane < L; ++lane) total += static_cast<Index>(sum[lane]);
    for (; i < end; ++i) total += static_cast<Index>(ranks[i] >= x);
  }
  return total;
}

// The least of ranks[0, n) that is >= x (the largest Rank when none is).
template <typename Rank>
Rank least_at_least(const Rank* ranks, Index n, Rank x) {
  using V = RankVec<Rank>;
  constexpr Index L = kRankLanes<Rank>;
  constexpr Rank kNone = std::numeric_limits<Rank>::max();
  const V bound = V{} + x, none = V{} + kNone;
  V least = none;
  Index i = 0;
  for (; i + L <= n; i += L) {
    V value;
    std::memcpy(&value, ranks + i, sizeof(value));
    const V candidate = value >= bound ? value : none;
    least = candidate < least ? candidate : least;
  }
  Rank result = kNone;
  for (Index lane = 0; lane < L; ++lane) result = std::min(result, static_cast<Rank>(least[lane]));
  for (; i < n; ++i)
    if (ranks[i] >= x) result = std::min(result, ranks[i]);
  return result;
}

// The `wanted`-th largest of ranks[0, n) (1 <= wanted <= n), by bisection on its value: the
// largest x with at least `wanted` ranks >= x, between the least and the largest rank. One
// vectorized count per step, cheaper than a selection algorithm's data-dependent branches on
// the few thousand ranks of a list. A step that counts exactly `wanted` ranks >= its middle
// ends the search: the answer is the least of them (about log2(n) steps on distinct masses
// instead of one per bit of the range).
template <typename Rank>
Rank largest_with_count(const Rank* ranks, Index n, Index wanted) {
  Rank low = std::numeric_limits<Rank>::max(), high = 0;
  for (Index i = 0; i < n; ++i) {
    low = std::min(low, ranks[i]);
    high = std::max(high, ranks[i]);
  }
  // count(>= low) = n >= wanted, and the answer is in [low, high].
  while (low < high) {
    const Rank middle = static_cast<Rank>(low + (high - low) / 2 + 1);
    const Index count = count_at_least(ranks, n, middle);
    if (count == wanted) return least_at_least(ranks, n, middle);
    if (count > wanted) {
      low = middle;
    } else {
      high = static_cast<Rank>(middle - 1);
    }
  }
  return low;
}

// One row of the estimate: a representative query of (query block `block`, query head `head`)
// and the weight of its softmax in the block's mass.
template <typename T>
struct EstimateRow {
  Index block;  // within the task
  T weight;     // (its share of the block's queries) / group
};

// Per-thread memory of the selection.
template <typename T>
struct TokenSelectScratch {
  std::vector<T> q_t;                // [D][kBlockQ]: a pass's representative queries, transposed
  std::vector<T> sum;                // [D]: a block's queries of one head, summed
  std::vector<T> distance;           // [block_size]: each query's squared distance to the mean
  std::vector<Index> chosen;         // the block's queries by distance, farthest first
  std::vector<EstimateRow<T>> rows;  // the task's estimate rows
  std::vector<T> queries;            // [rows][D]: their representative queries
  std::vector<T> s_t;                // [kBlockK][kBlockQ]: one key block's scores
  std::vector<T> widened;            // [kBlockK][D]: 16-bit keys in the compute type
  std::vector<const T*> k_rows;      // [kBlockK]
  std::vector<T> logits;             // [kBlockQ][span]: a pass's base-2 logits
  std::vector<T> mass;               // [blocks][span]: estimated mass per block and key
  std::vector<Index> order;          // the candidates past the local keys
  std::vector<MassRank<T>> ranks;    // their ranks, in key order
  std::vector<std::int64_t> list;    // one block's kept keys
};

// The largest of logits[0, count) (-inf when empty; NaN lanes ignored).
template <typename T>
T largest_of(const T* logits, Index count) {
  constexpr int L = kLanes<T>;
  Vec<T> largest_lanes = splat(-std::numeric_limits<T>::infinity());
  Index j = 0;
  for (; j + L <= count; j += L) largest_lanes = vector_max(largest_lanes, load(logits + j));
  T largest = -std::numeric_limits<T>::infinity();
  for (int lane = 0; lane < L; ++lane) largest = std::max(largest, largest_lanes[lane]);
  for (; j < count; ++j) largest = std::max(largest, logits[j]);
  return largest;
}

// logits[0, count) to exp2(logit - largest) in place; returns their sum.
template <typename T>
T exponentiate(T* logits, Index count, T largest) {
  constexpr int L = kLanes<T>;
  const Vec<T> shift = splat(largest);
  Vec<T> sum_lanes_v{};
  Index j = 0;
  for (; j + L <= count; j += L) {
    const Vec<T> x = load(logits + j) - shift;  // <= 0 (or NaN)
    const Vec<T> p = exp2_nonpositive(x > Vec<T>{} ? Vec<T>{} : x);
    store(logits + j, p);
    sum_lanes_v += p;
  }
  T total = sum_lanes<T>(sum_lanes_v);
  for (; j < count; ++j) {
    logits[j] = std::exp2(std::min(logits[j] - largest, T(0)));
    total += logits[j];
  }
  return total;
}

// The base-2 softmax of logits[0, count), scaled by `weight`, in place; false (logits left
// unnormalized) when no logit is finite or the sum is not positive and finite.
template <typename T>
bool scaled_softmax(T* logits, Index count, T weight) {
  constexpr int L = kLanes<T>;
  const T largest = largest_of(logits, count);
  if (!std::isfinite(largest)) return false;
  const T total = exponentiate(logits, count, largest);
  if (!(total > 0) || !std::isfinite(total)) return false;
  const Vec<T> scale = splat(weight / total);
  Index j = 0;
  for (; j + L <= count; j += L) store(logits + j, load(logits + j) * scale);
  for (; j < count; ++j) logits[j] *= weight / total;
  return true;
}

// mass[0, count) += weight * softmax(logits[0, count)) (base 2; logits overwritten); nothing
// when no logit is finite or the sum is not positive and finite.
template <typename T>
void add_softmax(T* logits, Index count, T weight, T* mass) {
  constexpr int L = kLanes<T>;
  const T largest = largest_of(logits, count);
  if (!std::isfinite(largest)) return;
  const T total = exponentiate(logits, count, largest);
  if (!(total > 0) || !std::isfinite(total)) return;
  const T factor = weight / total;
  const Vec<T> scale = splat(factor);
  Index j = 0;
  for (; j + L <= count; j += L) store(mass + j, load(mass + j) + load(logits + j) * scale);
  for (; j < count; ++j) mass[j] += logits[j] * factor;
}

// The logits of the estimate (scale * q.k in base 2, through the softcap when there is one).
template <typename T>
struct EstimateLogits {
  T multiplier;      // scale * log2(e), or scale / softcap
  T cap_multiplier;  // softcap * log2(e)
  bool capped;

  explicit EstimateLogits(double scale, double softcap)
      : multiplier(static_cast<T>(softcap > 0 ? scale / softcap : scale * kLog2E)),
        cap_multiplier(static_cast<T>(softcap * kLog2E)),
        capped(softcap > 0) {}

  // logits[0, count) from the multiplied products to base-2 logits (the softcap's tanh).
  void finish(T* logits, Index count) const {
    if (!capped) return;
    constexpr int L = kLanes<T>;
    Index j = 0;
    for (; j + L <= count; j += L)
      store(logits + j, tanh(load(logits + j)) * splat(cap_multiplier));
    for (; j < count; ++j) logits[j] = static_cast<T>(std::tanh(logits[j]) * cap_multiplier);
  }
};

// Scores the `rows` query rows in own.q_t ([D][kBlockQ], transposed) against the keys
// [span_begin, span_end) of (b, kv head h): multiplier * q.k into logits[r * span + j -
// span_begin].
template <typename S, typename T>
void score_span(const TensorView<const S, 4>& k, Index b, Index h, Index span_begin, Index span_end,
                Index rows, T multiplier, TokenSelectScratch<T>& own, T* logits) {
  const Index dim = k.size(3), span = span_end - span_begin;
  const int row_vectors = static_cast<int>((rows + kLanes<T> - 1) / kLanes<T>);
  static_assert(kBlockQ % kLanes<T> == 0, "the score tile holds whole row vectors");
  for (Index j0 = span_begin; j0 < span_end; j0 += kBlockK) {
    const Index count = std::min(kBlockK, span_end - j0);
    for (Index j = 0; j < count; ++j) {
      const S* row = k.address(b, h, j0 + j, 0);
      if constexpr (std::is_same_v<S, T>) {
        own.k_rows[static_cast<std::size_t>(j)] = row;
      } else {
        T* to = own.widened.data() + j * dim;
        for (Index d = 0; d < dim; ++d) to[d] = to_compute(row[d]);
        own.k_rows[static_cast<std::size_t>(j)] = to;
      }
    }
    compute_scores(
        own.q_t.data(), own.k_rows.data(), count, dim, multiplier, row_vectors,
        [&](Index, Index) {
          return std::pair<int, int>{0, row_vectors};
        },
        own.s_t.data());
    // own.s_t is [key][row]; logits are [row][key]: whole kLanes x kLanes tiles transposed in
    // registers, the last keys one by one.
    constexpr Index L = kLanes<T>;
    const T* scores = own.s_t.data();
    T* to = logits + (j0 - span_begin);
    Index j = 0;
    for (; j + L <= count; j += L)
      for (Index r0 = 0; r0 < rows; r0 += L) {
        Vec<T> tile[L];
        for (Index i = 0; i < L; ++i) tile[i] = load(scores + (j + i) * kBlockQ + r0);
        transpose<T>(tile);
        for (Index r = r0; r < std::min(rows, r0 + L); ++r) store(to + r * span + j, tile[r - r0]);
      }
    for (; j < count; ++j)
      for (Index r = 0; r < rows; ++r) to[r * span + j] = scores[j * kBlockQ + r];
  }
}

// Sizes own's buffers for scoring against keys of dimension `dim` (q_t zeroed).
template <typename S, typename T>
void prepare_scoring(Index dim, TokenSelectScratch<T>& own) {
  own.q_t.assign(static_cast<std::size_t>(dim * kBlockQ), T(0));
  own.s_t.resize(static_cast<std::size_t>(kBlockK * kBlockQ));
  own.k_rows.resize(static_cast<std::size_t>(kBlockK));
  if constexpr (!std::is_same_v<S, T>) own.widened.resize(static_cast<std::size_t>(kBlockK * dim));
}

// The estimate rows of query block `block` (within the task) of query head `head`: the mean of
// its queries but the outliers, then each outlier (see foveal::TokenTopkOptions), appended to
// own.rows / own.queries.
template <typename S, typename T>
void add_estimate_rows(const SelectPlan<S>& plan, Index b, Index head, Index block,
                       const TokenBlockGeometry& g, Index group, TokenSelectScratch<T>& own) {
  const auto& q = plan.q;
  const Index dim = q.size(3);
  const Index first = g.position_lo - plan.q_offset;
  const Index n = g.position_hi - g.position_lo + 1;
  const Index outliers = std::min(plan.outliers, n - 1);
  own.sum.assign(static_cast<std::size_t>(dim), T(0));
  T* sum = own.sum.data();
  for (Index i = first; i < first + n; ++i) {
    const S* row = q.address(b, head, i, 0);
    for (Index d = 0; d < dim; ++d) sum[d] += to_compute(row[d]);
  }
  const auto at = own.queries.size();
  own.queries.resize(at + static_cast<std::size_t>((1 + outliers) * dim));
  T* mean = own.queries.data() + at;  // the first row: the mean of the others
  const T inverse_n = T(1) / static_cast<T>(n);
  if (outliers > 0) {
    for (Index d = 0; d < dim; ++d) mean[d] = sum[d] * inverse_n;
    own.distance.resize(static_cast<std::size_t>(n));
    own.chosen.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) {
      const S* row = q.address(b, head, first + i, 0);
      T total = 0;
      for (Index d = 0; d < dim; ++d) {
        const T x = to_compute(row[d]) - mean[d];
        total += x * x;
      }
      own.distance[static_cast<std::size_t>(i)] = total;
      own.chosen[static_cast<std::size_t>(i)] = i;
    }
    // Farthest first, ties to the earlier query (NaN distances last).
    const auto farther = [&](Index a, Index c) {
      const auto rank_a = mass_rank(own.distance[static_cast<std::size_t>(a)]);
      const auto rank_c = mass_rank(own.distance[static_cast<std::size_t>(c)]);
      return rank_a > rank_c || (rank_a == rank_c && a < c);
    };
    std::partial_sort(own.chosen.begin(), own.chosen.begin() + outliers, own.chosen.end(), farther);
    for (Index o = 0; o < outliers; ++o) {
      const S* row = q.address(b, head, first + own.chosen[static_cast<std::size_t>(o)], 0);
      T* to = own.queries.data() + at + static_cast<std::size_t>((1 + o) * dim);
      for (Index d = 0; d < dim; ++d) {
        to[d] = to_compute(row[d]);
        sum[d] -= to[d];
      }
    }
  }
  const T inverse_rest = T(1) / static_cast<T>(n - outliers);
  for (Index d = 0; d < dim; ++d) mean[d] = sum[d] * inverse_rest;
  const T per_head = T(1) / static_cast<T>(group);
  own.rows.push_back({block, static_cast<T>(n - outliers) * inverse_n * per_head});
  for (Index o = 0; o < outliers; ++o) own.rows.push_back({block, inverse_n * per_head});
}

template <typename S>
void token_topk_select(const SelectPlan<S>& plan) {
  using T = compute_type_t<S>;
  const auto& q = plan.q;
  const auto& k = plan.k;
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = k.size(1), len_k = k.size(2);
  const Index group = heads_q / heads_kv;
  const Index bs = plan.block_size;
  // Query blocks per task: their group's representative queries fill about one tile of kBlockQ
  // rows, so every key the task loads is scored against all of them.
  const Index rows_per_block = group * (1 + plan.outliers);
  const Index per_task =
      group > 0 ? std::max<Index>(1, kBlockQ / rows_per_block) : plan.query_blocks;
  const Index chunks = (plan.query_blocks + per_task - 1) / per_task;
  const Index tasks = batch * heads_kv * chunks;
  const Index lists = batch * heads_kv * plan.query_blocks;
  const double work = static_cast<double>(lists) * static_cast<double>(rows_per_block) *
                      static_cast<double>(len_k) * static_cast<double>(dim);
  const int threads = team_size(tasks, plan.num_threads, saturated_work(work));
  std::vector<TokenSelectScratch<T>> scratch(static_cast<std::size_t>(threads));
  const EstimateLogits<T> logits_of(plan.scale, plan.softcap);
  parallel_for(tasks, threads, [&](Index task) {
    TokenSelectScratch<T>& own = scratch[static_cast<std::size_t>(thread_index())];
    const Index b = task / (heads_kv * chunks);
    const Index h = task / chunks % heads_kv;
    const Index first_list = (b * heads_kv + h) * plan.query_blocks + task % chunks * per_task;
    const Index first_block = plan.first_query_block + task % chunks * per_task;
    const Index blocks =
        std::min(per_task, plan.first_query_block + plan.query_blocks - first_block);
    std::vector<TokenBlockGeometry> geometry(static_cast<std::size_t>(blocks));
    std::vector<char> settled(static_cast<std::size_t>(blocks));
    Index span_begin = std::numeric_limits<Index>::max(), span_end = 0;
    own.rows.clear();
    own.queries.clear();
    for (Index i = 0; i < blocks; ++i) {
      TokenBlockGeometry& g = geometry[static_cast<std::size_t>(i)];
      g = token_block_geometry(plan.visibility, plan.q_offset, len_q, bs, first_block + i,
                               plan.budget, plan.local);
      const Index candidates = g.candidate_end - g.candidate_begin;
      const Index local = g.local_end - g.local_begin;
      // A list that is every candidate or exactly the local keys needs no estimate.
      settled[static_cast<std::size_t>(i)] =
          plan.threshold <= 0 && (g.keep == candidates || g.keep == local);
      if (candidates == 0 || settled[static_cast<std::size_t>(i)]) continue;
      span_begin = std::min(span_begin, g.candidate_begin);
      span_end = std::max(span_end, g.candidate_end);
      for (Index head = h * group; head < (h + 1) * group; ++head)
        add_estimate_rows(plan, b, head, i, g, group, own);
    }
    const auto row_count = static_cast<Index>(own.rows.size());
    // Blocks that need an estimate have a mass (zero without query heads: no rows to score).
    const Index span = span_end > span_begin ? span_end - span_begin : 0;
    own.mass.assign(static_cast<std::size_t>(blocks * span), T(0));

    if (row_count > 0) {
      prepare_scoring<S>(dim, own);
      own.logits.resize(static_cast<std::size_t>(std::min(kBlockQ, row_count) * span));
      for (Index row0 = 0; row0 < row_count; row0 += kBlockQ) {
        const Index rows = std::min(kBlockQ, row_count - row0);
        std::fill(own.q_t.begin(), own.q_t.end(), T(0));
        for (Index r = 0; r < rows; ++r) {
          const T* from = own.queries.data() + (row0 + r) * dim;
          T* column = own.q_t.data() + r;
          for (Index d = 0; d < dim; ++d) column[d * kBlockQ] = from[d];
        }
        score_span(k, b, h, span_begin, span_end, rows, logits_of.multiplier, own,
                   own.logits.data());
        // Each row's softmax over its block's candidates, weighted into the block's mass.
        for (Index r = 0; r < rows; ++r) {
          const EstimateRow<T>& row = own.rows[static_cast<std::size_t>(row0 + r)];
          const TokenBlockGeometry& g = geometry[static_cast<std::size_t>(row.block)];
          T* logits = own.logits.data() + r * span + (g.candidate_begin - span_begin);
          const Index count = g.candidate_end - g.candidate_begin;
          logits_of.finish(logits, count);
          add_softmax(logits, count, row.weight,
                      own.mass.data() + row.block * span + (g.candidate_begin - span_begin));
        }
      }
    }

    // Each block's list: local keys first, then the others by estimated mass.
    for (Index i = 0; i < blocks; ++i) {
      const TokenBlockGeometry& g = geometry[static_cast<std::size_t>(i)];
      const Index list = first_list + i;
      std::int64_t* kept = plan.items + plan.capacity[list];
      Index count = 0;
      const Index candidates = g.candidate_end - g.candidate_begin;
      const Index local = g.local_end - g.local_begin;
      if (candidates == 0 || settled[static_cast<std::size_t>(i)]) {
        const Index first = g.keep == candidates ? g.candidate_begin : g.local_begin;
        for (Index c = 0; c < g.keep; ++c) kept[count++] = first + c;
        plan.counts[list] = count;
        continue;
      }
      // mass[key - candidate_begin]: the block's estimated mass of each candidate.
      const T* mass = own.mass.data() + i * span + (g.candidate_begin - span_begin);
      const Index others = candidates - local;
      const Index wanted = std::min(others, g.keep - local);
      if (plan.threshold > 0) {
        // Local keys, then the others by mass until the kept mass reaches the threshold.
        T kept_mass = 0;
        for (Index key = g.local_begin; key < g.local_end; ++key) {
          kept[count++] = key;
          kept_mass += mass[key - g.candidate_begin];
        }
        own.order.clear();
        for (Index key = g.candidate_begin; key < g.local_begin; ++key) own.order.push_back(key);
        for (Index key = g.local_end; key < g.candidate_end; ++key) own.order.push_back(key);
        const auto by_mass = [&](Index a, Index c) {
          const auto rank_a = mass_rank(mass[a - g.candidate_begin]);
          const auto rank_c = mass_rank(mass[c - g.candidate_begin]);
          return rank_a > rank_c || (rank_a == rank_c && a < c);
        };
        std::partial_sort(own.order.begin(), own.order.begin() + wanted, own.order.end(), by_mass);
        for (Index r = 0; r < wanted; ++r) {
          if (kept_mass >= static_cast<T>(plan.threshold)) break;
          const Index key = own.order[static_cast<std::size_t>(r)];
          kept[count++] = key;
          kept_mass += mass[key - g.candidate_begin];
        }
        std::sort(kept, kept + count);
        plan.counts[list] = count;
        continue;
      }
      // The wanted-th largest rank among the others (cut), then one ascending pass that takes
      // the ranks above it and, of the ranks equal to it, the lowest keys: already in key order.
      const Index before = g.local_begin - g.candidate_begin;
      own.ranks.resize(static_cast<std::size_t>(others));
      auto* ranks = own.ranks.data();
      const T* after = mass + (g.local_end - g.candidate_begin) - before;
      for (Index j = 0; j < before; ++j) ranks[j] = mass_rank(mass[j]);
      for (Index j = before; j < others; ++j) ranks[j] = mass_rank(after[j]);
      using Rank = MassRank<T>;
      Rank cut = 0;
      Index ties = 0;  // of the ranks equal to cut, how many to take
      if (wanted > 0) {
        cut = largest_with_count(ranks, others, wanted);
        const Index above = cut == std::numeric_limits<Rank>::max()
                                ? 0
                                : count_at_least(ranks, others, static_cast<Rank>(cut + 1));
        ties = wanted - above;
      } else {
        cut = std::numeric_limits<Rank>::max();  // takes nothing: no rank is above it
      }
      // One ascending pass, branch-free: every key is written, the count advances for the taken
      // ones (the ranks above the cut and, of those equal to it, the lowest `ties` keys).
      own.list.resize(static_cast<std::size_t>(candidates));
      std::int64_t* to = own.list.data();
      const auto take = [&](Index first_key, const Rank* from, Index n) {
        for (Index j = 0; j < n; ++j) {
          const bool tie = from[j] == cut && ties > 0;
          ties -= static_cast<Index>(tie);
          to[count] = first_key + j;
          count += static_cast<Index>(from[j] > cut || tie);
        }
      };
      take(g.candidate_begin, ranks, before);
      for (Index key = g.local_begin; key < g.local_end; ++key) to[count++] = key;
      take(g.local_end, ranks + before, others - before);
      std::copy(to, to + count, kept);
      plan.counts[list] = count;
    }
  });
}

// Per-thread memory of the attention policy: the tile's kept keys, gathered, and which of the
// tile's query blocks keep each key.
struct TokenTopkScratch {
  std::vector<std::int64_t> merged;
  std::vector<Index> everywhere;    // kept by every query block of the tile
  std::vector<Index> somewhere;     // kept by some of them
  std::vector<std::uint8_t> marks;  // [Lk]: bit i: kept by the tile's i-th query block
  Index list_lo = 0;
  Index spanned = 1;
};

// The visit policy of one tile: the sinks, then the kept keys gathered by index into blocks of
// up to kBlockK keys. Keys every query block of the tile keeps are masked by the visibility
// rule alone (no mask at all off the diagonal); keys only some keep, per (row, key).
class TokenTopkPolicy : public RulePolicy<Visibility> {
 public:
  TokenTopkPolicy(const Visibility& visibility, Index block_size, Index first_query_block,
                  const std::int64_t* offsets, const std::int64_t* keys, TokenTopkScratch& scratch)
      : RulePolicy(visibility),
        block_size_(block_size),
        first_query_block_(first_query_block),
        offsets_(offsets),
        keys_(keys),
        scratch_(scratch) {}

  bool sees(Index position, Index key) const {
    if (!rule().sees(position, key)) return false;
    if (key < rule().sink_tokens || scratch_.spanned == 1) return true;
    const Index list = floor_divide(position, block_size_) - first_query_block_;
    return (scratch_.marks[static_cast<std::size_t>(key)] >> (list - scratch_.list_lo) & 1) != 0;
  }

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const Visibility& visibility = rule();
    const Index sinks_end = visibility.sinks_end(position_hi);
    for_each_aligned_block({0, sinks_end}, 0, visibility, position_lo, position_hi, visit);
    const Index list_lo = floor_divide(position_lo, block_size_) - first_query_block_;
    const Index list_hi = floor_divide(position_hi, block_size_) - first_query_block_;
    scratch_.list_lo = list_lo;
    // A tile spans at most kBlockQ positions, so at most 5 query blocks of >= 16: one bit each.
    scratch_.spanned = list_hi - list_lo + 1;
    // Gathered blocks of up to kBlockK keys; masked unless every row sees every key of the run
    // [first, last] they span (by the rule; membership is settled by `masked_by_lists`).
    const auto visit_gathered = [&](const Index* keys, Index count, bool masked_by_lists) {
      for (Index at = 0; at < count; at += kBlockK) {
        const Index n = std::min(kBlockK, count - at);
        const bool masked = masked_by_lists || !visibility.sees_all(position_lo, position_hi,
                                                                    keys[at], keys[at + n - 1] + 1);
        visit(KeyBlock{0, n, keys + at, masked, 0});
      }
    };
    if (scratch_.spanned == 1) {
      const std::int64_t* first = keys_ + offsets_[list_lo];
      const std::int64_t* last = keys_ + offsets_[list_lo + 1];
      first = std::lower_bound(first, last, sinks_end);
      visit_gathered(first, last - first, false);
      return;
    }
    // Tiles that straddle query blocks: mark which blocks keep each key, split the keys into
    // those all keep and those some keep.
    std::vector<std::int64_t>& merged = scratch_.merged;
    merged.clear();
    for (Index list = list_lo; list <= list_hi; ++list) {
      const auto bit = static_cast<std::uint8_t>(1u << (list - list_lo));
      for (std::int64_t at = offsets_[list]; at < offsets_[list + 1]; ++at) {
        const std::int64_t key = keys_[at];
        if (key < sinks_end) continue;
        std::uint8_t& mark = scratch_.marks[static_cast<std::size_t>(key)];
        if (mark == 0) merged.push_back(key);
        mark = static_cast<std::uint8_t>(mark | bit);
      }
    }
    std::sort(merged.begin(), merged.end());
    const auto all = static_cast<std::uint8_t>((1u << scratch_.spanned) - 1);
    scratch_.everywhere.clear();
    scratch_.somewhere.clear();
    for (const std::int64_t key : merged)
      (scratch_.marks[static_cast<std::size_t>(key)] == all ? scratch_.everywhere
                                                            : scratch_.somewhere)
          .push_back(key);
    visit_gathered(scratch_.everywhere.data(), static_cast<Index>(scratch_.everywhere.size()),
                   false);
    visit_gathered(scratch_.somewhere.data(), static_cast<Index>(scratch_.somewhere.size()), true);
    for (const std::int64_t key : merged) scratch_.marks[static_cast<std::size_t>(key)] = 0;
  }

 private:
  Index block_size_;
  Index first_query_block_;
  const std::int64_t* offsets_;
  const std::int64_t* keys_;
  TokenTopkScratch& scratch_;
};

template <typename S>
void token_topk_attention(const SelectionPlan<S>& plan) {
  const FlashParams<S>& params = plan.params;
  const Index batch = params.q.size(0), heads_kv = params.k.size(1), len_k = params.k.size(2);
  const Index group = params.q.size(1) / heads_kv;
  const Index lists = batch * heads_kv * plan.query_blocks;
  // Work: every kept key for every row of its query block (an upper bound).
  const double kept_keys = static_cast<double>(plan.offsets[lists]) *
                           static_cast<double>(plan.block_size) * static_cast<double>(group);
  const double work =
      std::min(static_cast<double>(dense_work(params)),
               kept_keys * static_cast<double>(params.q.size(3) + params.v.size(3)));
  TokenTopkScratch prototype;
  prototype.marks.assign(static_cast<std::size_t>(len_k), 0);
  const TileGrid grid(batch, heads_kv, params.rows_per_head());
  run_engine(
      params, grid.num_tasks(), saturated_work(work),
      [&](Index task, TokenTopkScratch& scratch) {
        const TileGrid::Cell cell = grid.cell(task);
        const Index head_lists = (cell.outer * heads_kv + cell.kv_head) * plan.query_blocks;
        return plan_tile(TokenTopkPolicy(plan.visibility, plan.block_size, plan.first_query_block,
                                         plan.offsets + head_lists, plan.items, scratch),
                         tile_of(params, cell.outer, cell.kv_head, cell.flat_begin));
      },
      prototype);
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
