// src/kernels/quest.hpp — Quest decode of one ISA level (included by level.cpp): page selection
// from a KVCache's page bounds, then the engine over the kept pages. The entry point
// (src/decode.cpp) validates; this computes.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "detail/convert.hpp"
#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/simd.hpp"
#include "detail/with_count.hpp"
#include "foveal/core/parallel.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Stored rows [row_begin, row_end) holding positions row + offset.
struct RowSegment {
  Index row_begin = 0;
  Index row_end = 0;
  Index offset = 0;
};

// What the pages of (sequence, kv head) may show to queries at positions [lo, hi]: the stored
// rows of the band's positions past the sinks, at most three segments (a ring's spans).
struct QuestGeometry {
  RowSegment segments[3];
  int count = 0;
  Index sinks_end = 0;  // positions [0, sinks_end) are visited as sinks

  template <typename S>
  QuestGeometry(const KVCache<S>& cache, Index sequence, const Visibility& visibility, Index lo,
                Index hi) {
    const KeyRange band = visibility.band(lo, hi);
    sinks_end = visibility.sinks_end(hi);
    const Index first = std::max(band.begin, sinks_end);
    const KVCacheLayout layout = cache.layout(sequence);
    for (int s = 0; s < layout.count; ++s) {
      const KVCacheSpan& span = layout.spans[s];
      const Index begin = std::max(first, span.position);
      const Index end = std::min(band.end, span.position + span.count);
      if (begin >= end) continue;
      const Index offset = span.position - span.row;
      segments[count++] = {begin - offset, end - offset, offset};
    }
  }
};

// Quest's page scores: scores[i] = max over the rows r of sum_d max(q_rd * low_d, q_rd *
// high_d), at least q_r.k for every key k of page i (low <= k <= high). queries: [rows][dim];
// bounds_of(i): page i's bounds, low[0 .. dim) then high. The selection reads every page's
// bounds at every step, so this must keep up with memory: a page's bounds are widened once for
// up to four rows, and the lane sums of kLanes (page, row) pairs are reduced together
// (sum_lanes_of_each) where one horizontal sum per pair would cost more than its bounds.
template <typename T, typename B, typename BoundsOf>
void score_pages(const T* queries, Index rows, Index dim, Index count, BoundsOf&& bounds_of,
                 T* scores) {
  constexpr int L = kLanes<T>;
  constexpr int kRowsAtATime = 4;
  const Index full = dim / L * L;
  // Pages per reduction: each takes `rows` of the L sums (one row alone past L rows).
  const Index per_reduction = rows <= L ? L / rows : 1;
  Vec<T> acc[L];
  for (Index first = 0; first < count; first += per_reduction) {
    const Index pages = std::min(per_reduction, count - first);
    T best[L];
    std::fill_n(best, L, -std::numeric_limits<T>::infinity());
    for (Index r_begin = 0; r_begin < rows; r_begin += L) {
      const Index r_count = std::min<Index>(L, rows - r_begin);
      for (int i = 0; i < L; ++i) acc[i] = Vec<T>{};
      for (Index p = 0; p < pages; ++p) {
        const B* low = bounds_of(first + p);
        const B* high = low + dim;
        for (Index r0 = 0; r0 < r_count; r0 += kRowsAtATime) {
          const int nr = static_cast<int>(std::min<Index>(kRowsAtATime, r_count - r0));
          with_count<kRowsAtATime>(nr, [&](auto n) {
            constexpr int NR = decltype(n)::value;
            const T* q = queries + (r_begin + r0) * dim;
            Vec<T> sums[NR] = {};
            for (Index d = 0; d < full; d += L) {
              const Vec<T> below = load_as<T>(low + d), above = load_as<T>(high + d);
              FOVEAL_UNROLL
              for (int r = 0; r < NR; ++r) {
                const Vec<T> x = load(q + r * dim + d);
                sums[r] += vector_max(x * below, x * above);
              }
            }
            FOVEAL_UNROLL
            for (int r = 0; r < NR; ++r) acc[p * r_count + r0 + r] = sums[r];
          });
        }
      }
      const Vec<T> sums = sum_lanes_of_each<T>(acc);
      for (Index p = 0; p < pages; ++p) {
        const B* low = bounds_of(first + p);
        const B* high = low + dim;
        for (Index r = 0; r < r_count; ++r) {
          T bound = sums[p * r_count + r];
          const T* q = queries + (r_begin + r) * dim;
          for (Index d = full; d < dim; ++d) {
            const T below = to_compute(low[d]), above = to_compute(high[d]);
            bound += std::max(q[d] * below, q[d] * above);
          }
          best[p] = std::max(best[p], bound);
        }
      }
    }
    std::copy_n(best, pages, scores + first);
  }
}

// Per-thread memory of the selection.
template <typename T>
struct QuestScratch {
  std::vector<T> queries;    // [rows][D]
  std::vector<Index> pages;  // candidates
  std::vector<char> forced;  // per candidate
  std::vector<T> scores;     // per candidate
  std::vector<Index> order;  // the candidates that are not forced, then ranked
  std::vector<T> bounded;    // their scores, in that order
};

// Visits the sinks, then the kept pages' stored rows in the band, gathered into blocks by index,
// masked by the visibility rule.
class QuestPolicy : public RulePolicy<Visibility> {
 public:
  QuestPolicy(const Visibility& visibility, const QuestGeometry& geometry,
              const KVCacheLayout& layout, const Index* kept, Index kept_count, Index page_size)
      : RulePolicy(visibility),
        geometry_(geometry),
        layout_(layout),
        kept_(kept),
        kept_count_(kept_count),
        page_size_(page_size) {}

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const Visibility& visibility = rule();
    const auto visit_positions = [&](Index begin, Index end, Index offset) {
      for_each_aligned_block({begin, end}, offset, visibility, position_lo, position_hi, visit);
    };
    for (int s = 0; s < layout_.count; ++s) {
      const KVCacheSpan& span = layout_.spans[s];
      const Index end = std::min(geometry_.sinks_end, span.position + span.count);
      if (span.position < end) visit_positions(span.position, end, span.position - span.row);
    }
    // The kept rows, gathered by index into blocks of up to kBlockK rows that share a position
    // offset (a ring's segments differ): a page is too short a block to visit alone (the
    // per-block softmax update would cost as much as its keys).
    Index rows[kBlockK];
    Index count = 0, offset = 0, first_position = 0, last_position = 0;
    const auto flush = [&] {
      if (count == 0) return;
      const bool masked =
          !visibility.sees_all(position_lo, position_hi, first_position, last_position + 1);
      visit(KeyBlock{0, count, rows, masked, offset});
      count = 0;
    };
    for (Index i = 0; i < kept_count_; ++i) {
      const Index row_begin = kept_[i] * page_size_;
      const Index row_end = row_begin + page_size_;
      for (int s = 0; s < geometry_.count; ++s) {
        const RowSegment& segment = geometry_.segments[s];
        const Index begin = std::max(row_begin, segment.row_begin);
        const Index end = std::min(row_end, segment.row_end);
        if (begin >= end) continue;
        if (segment.offset != offset) flush();
        offset = segment.offset;
        for (Index row = begin; row < end; ++row) {
          if (count == 0) first_position = row + offset;
          last_position = row + offset;
          rows[count++] = row;
          if (count == kBlockK) flush();
        }
      }
    }
    flush();
  }

 private:
  QuestGeometry geometry_;
  KVCacheLayout layout_;
  const Index* kept_;
  Index kept_count_;
  Index page_size_;
};

// S: the stored type of q and out, KV that of the cache (S, or q8_block under float queries).
template <typename S, typename KV = S>
void quest_decode_attention(const QuestPlan<S, KV>& plan) {
  using T = compute_type_t<S>;
  const FlashParams<S, KV>& params = plan.params;
  const KVCache<KV>& cache = *plan.cache;
  const Index batch = params.q.size(0), heads_q = params.q.size(1), len_q = params.q.size(2);
  const Index dim = params.q.size(3);
  const Index heads_kv = cache.heads_kv(), group = heads_q / heads_kv;
  const Index page_size = cache.page_size();
  const auto bounds = cache.page_bounds();
  const Index rows = extent_product({group, len_q});

  // Pass 1: each (sequence, kv head)'s kept pages, ascending.
  const Index heads = batch * heads_kv;
  std::vector<std::vector<Index>> kept(static_cast<std::size_t>(heads));
  const Index bound_work = extent_product({heads, cache.pages(), rows, dim});
  const int threads = team_size(heads, params.num_threads, bound_work);
  std::vector<QuestScratch<T>> scratch(static_cast<std::size_t>(threads));
  parallel_for(heads, threads, [&](Index task) {
    QuestScratch<T>& own = scratch[static_cast<std::size_t>(thread_index())];
    const Index b = task / heads_kv, h = task % heads_kv;
    const Index length = cache.length(b);
    const QuestGeometry geometry(cache, b, plan.visibility[static_cast<std::size_t>(b)],
                                 length - len_q, length - 1);
    // Candidates, and which are local (the newest local_pages * page_size positions).
    own.pages.clear();
    own.forced.clear();
    // local_pages * page_size may pass 2^63 (local_pages <= 2^40, page_size <= 2^30).
    Index local_rows = 0;
    if (__builtin_mul_overflow(plan.local_pages, page_size, &local_rows)) local_rows = length;
    const Index local_from = length - std::min(local_rows, length);
    for (int s = 0; s < geometry.count; ++s) {
      const RowSegment& segment = geometry.segments[s];
      for (Index page = segment.row_begin / page_size; page * page_size < segment.row_end; ++page) {
        const Index last_row = std::min(segment.row_end, (page + 1) * page_size) - 1;
        const bool local = last_row + segment.offset >= local_from;
        if (!own.pages.empty() && own.pages.back() == page) {
          own.forced.back() = static_cast<char>(own.forced.back() || local);
        } else {
          own.pages.push_back(page);
          own.forced.push_back(static_cast<char>(local));
        }
      }
    }
    std::vector<Index>& chosen = kept[static_cast<std::size_t>(task)];
    const auto candidates = static_cast<Index>(own.pages.size());
    Index forced = 0;
    for (const char f : own.forced) forced += f;
    const auto wanted =
        static_cast<Index>(std::ceil(plan.budget * static_cast<double>(candidates)));
    const Index keep = std::min(candidates, std::max(wanted, forced));
    if (keep == candidates) {
      chosen = own.pages;
    } else {
      // The group's query rows, widened.
      own.queries.resize(static_cast<std::size_t>(rows * dim));
      for (Index g = 0; g < group; ++g)
        for (Index i = 0; i < len_q; ++i) {
          const S* row = params.q.address(b, h * group + g, i, 0);
          T* to = own.queries.data() + (g * len_q + i) * dim;
          for (Index d = 0; d < dim; ++d) to[d] = to_compute(row[d]);
        }
      own.order.clear();
      for (Index c = 0; c < candidates; ++c) {
        if (own.forced[static_cast<std::size_t>(c)]) {
          chosen.push_back(own.pages[static_cast<std::size_t>(c)]);
        } else {
          own.order.push_back(c);
        }
      }
      own.scores.assign(static_cast<std::size_t>(candidates), T(0));
      own.bounded.resize(own.order.size());
      using B = page_bound_t<KV>;
      score_pages<T, B>(
          own.queries.data(), rows, dim, static_cast<Index>(own.order.size()),
          [&](Index i) {
            const Index c = own.order[static_cast<std::size_t>(i)];
            return bounds.address(b, h, own.pages[static_cast<std::size_t>(c)], 0, 0);
          },
          own.bounded.data());
      // A NaN bound (an infinite key where a query is 0: 0 * inf) ranks first, as an infinite
      // one: the comparison below needs an order, and such a page is one dense attention sees.
      for (std::size_t i = 0; i < own.order.size(); ++i) {
        const T bound = own.bounded[i];
        own.scores[static_cast<std::size_t>(own.order[i])] =
            std::isnan(bound) ? std::numeric_limits<T>::infinity() : bound;
      }
      const Index others = keep - forced;
      const auto by_score = [&](Index a, Index c) {
        const T score_a = own.scores[static_cast<std::size_t>(a)];
        const T score_c = own.scores[static_cast<std::size_t>(c)];
        return score_a > score_c || (score_a == score_c && a < c);
      };
      // The set of the `others` best (a strict total order: one set); sorted by page below.
      if (others > 0 && others < static_cast<Index>(own.order.size()))
        std::nth_element(own.order.begin(), own.order.begin() + (others - 1), own.order.end(),
                         by_score);
      for (Index r = 0; r < others; ++r)
        chosen.push_back(
            own.pages[static_cast<std::size_t>(own.order[static_cast<std::size_t>(r)])]);
      std::sort(chosen.begin(), chosen.end());
    }
  });

  // Pass 2: the engine over the kept pages.
  Index kept_rows = 0;
  for (const auto& pages : kept) kept_rows += static_cast<Index>(pages.size()) * page_size;
  const Index work = attention_work(params, rows, kept_rows + cache.sink_tokens() * heads);
  const TileGrid grid(batch, heads_kv, rows);
  run_engine(params, grid.num_tasks(), work, [&](Index task, NoPolicyScratch&) {
    const TileGrid::Cell cell = grid.cell(task);
    const Index b = cell.outer;
    const Index length = cache.length(b);
    const Visibility& visibility = plan.visibility[static_cast<std::size_t>(b)];
    const std::vector<Index>& pages = kept[static_cast<std::size_t>(b * heads_kv + cell.kv_head)];
    Tile<S> tile = tile_of(params, b, cell.kv_head, cell.flat_begin);
    tile.q_offset = length - len_q;
    return plan_tile(
        QuestPolicy(visibility, QuestGeometry(cache, b, visibility, length - len_q, length - 1),
                    cache.layout(b), pages.data(), static_cast<Index>(pages.size()), page_size),
        tile);
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
