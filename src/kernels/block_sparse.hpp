// src/kernels/block_sparse.hpp — block-sparse prefill of one ISA level (included by level.cpp):
// the pooled estimate that selects key blocks per query block, and the engine run over a
// selection. The entry points (src/block_sparse.cpp) validate and size; these compute.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "detail/block_sparse_geometry.hpp"
#include "detail/convert.hpp"
#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/simd.hpp"
#include "foveal/core/parallel.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// sum_d a[d] * b[d] over `dim` values in the compute type, lane by lane.
template <typename T>
T pooled_dot(const T* a, const T* b, Index dim) {
  return lanewise_sum(a, b, dim, [](auto x, auto y) { return x * y; });
}

// Per-thread memory of the selection: the pooled queries of a group, the estimated logits and
// masses of the candidates, their order.
template <typename T>
struct SelectScratch {
  std::vector<T> pooled_q;    // [group][D]
  std::vector<double> logit;  // [candidates]
  std::vector<double> mass;   // [candidates]
  std::vector<Index> order;   // [candidates]
};

template <typename S>
void block_sparse_select(const SelectPlan<S>& plan) {
  using T = compute_type_t<S>;
  const auto& q = plan.q;
  const auto& k = plan.k;
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = k.size(1), len_k = k.size(2);
  const Index group = heads_q / heads_kv;
  const Index bs = plan.block_size;
  const Index key_blocks = ceil_divide(len_k, bs);

  // The mean key of every (batch, kv head, key block).
  std::vector<T> pooled_k(static_cast<std::size_t>(batch * heads_kv * key_blocks * dim));
  const Index key_tasks = batch * heads_kv * key_blocks;
  // Every key row is read once (saturated: zero-stride views may have huge extents).
  const double key_work = static_cast<double>(batch) * static_cast<double>(heads_kv) *
                          static_cast<double>(len_k) * static_cast<double>(dim);
  parallel_for(key_tasks, team_size(key_tasks, plan.num_threads, saturated_work(key_work)),
               [&](Index task) {
                 const Index b = task / (heads_kv * key_blocks);
                 const Index h = task / key_blocks % heads_kv;
                 const Index block = task % key_blocks;
                 const Index begin = block * bs, end = std::min(len_k, begin + bs);
                 T* mean = pooled_k.data() + task * dim;
                 std::fill_n(mean, dim, T(0));
                 for (Index j = begin; j < end; ++j) {
                   const S* row = k.address(b, h, j, 0);
                   for (Index d = 0; d < dim; ++d) mean[d] += to_compute(row[d]);
                 }
                 const T inverse = T(1) / static_cast<T>(end - begin);
                 for (Index d = 0; d < dim; ++d) mean[d] *= inverse;
               });

  const Index lists = batch * heads_kv * plan.query_blocks;
  const int threads =
      team_size(lists, plan.num_threads, len_q * heads_q * dim + lists * group * key_blocks * dim);
  std::vector<SelectScratch<T>> scratch(static_cast<std::size_t>(threads));
  for (SelectScratch<T>& own : scratch) {
    own.pooled_q.resize(static_cast<std::size_t>(group * dim));
    own.logit.resize(static_cast<std::size_t>(group * key_blocks));
    own.mass.resize(static_cast<std::size_t>(key_blocks));
    own.order.resize(static_cast<std::size_t>(key_blocks));
  }
  parallel_for(lists, threads, [&](Index list) {
    SelectScratch<T>& own = scratch[static_cast<std::size_t>(thread_index())];
    const Index b = list / (heads_kv * plan.query_blocks);
    const Index h = list / plan.query_blocks % heads_kv;
    const Index block = plan.first_query_block + list % plan.query_blocks;
    const QueryBlockGeometry geometry = query_block_geometry(plan.visibility, plan.q_offset, len_q,
                                                             bs, block, plan.budget, plan.local);
    std::int64_t* kept = plan.items + plan.capacity[list];
    Index count = 0;
    const Index candidates = geometry.candidate_end - geometry.candidate_begin;
    const Index local = geometry.local_end - geometry.local_begin;
    if (plan.threshold <= 0 && (geometry.keep == candidates || geometry.keep == local)) {
      // Everything, or the local blocks alone: nothing to estimate.
      const Index first =
          geometry.keep == candidates ? geometry.candidate_begin : geometry.local_begin;
      for (Index c = 0; c < geometry.keep; ++c) kept[count++] = first + c;
      plan.counts[list] = count;
      return;
    }

    // The mean query of each head of the group over the block's queries.
    const Index first_query = geometry.position_lo - plan.q_offset;
    const Index queries = geometry.position_hi - geometry.position_lo + 1;
    for (Index g = 0; g < group; ++g) {
      T* mean = own.pooled_q.data() + g * dim;
      std::fill_n(mean, dim, T(0));
      for (Index i = first_query; i < first_query + queries; ++i) {
        const S* row = q.address(b, h * group + g, i, 0);
        for (Index d = 0; d < dim; ++d) mean[d] += to_compute(row[d]);
      }
      const T inverse = T(1) / static_cast<T>(queries);
      for (Index d = 0; d < dim; ++d) mean[d] *= inverse;
    }

    // Each head's softmax over the candidates, averaged over the group.
    std::fill_n(own.mass.begin(), candidates, 0.0);
    for (Index g = 0; g < group; ++g) {
      double largest = -std::numeric_limits<double>::infinity();
      for (Index c = 0; c < candidates; ++c) {
        const Index key_block = geometry.candidate_begin + c;
        const T* mean_k = pooled_k.data() + ((b * heads_kv + h) * key_blocks + key_block) * dim;
        double logit = plan.scale *
                       static_cast<double>(pooled_dot(own.pooled_q.data() + g * dim, mean_k, dim));
        if (plan.softcap > 0) logit = plan.softcap * std::tanh(logit / plan.softcap);
        const Index keys = std::min(len_k, (key_block + 1) * bs) - key_block * bs;
        logit += std::log(static_cast<double>(keys));
        own.logit[static_cast<std::size_t>(c)] = logit;
        largest = std::max(largest, logit);
      }
      double total = 0;
      for (Index c = 0; c < candidates; ++c) {
        double& logit = own.logit[static_cast<std::size_t>(c)];
        logit = std::isfinite(largest) ? std::exp(logit - largest) : 0.0;
        total += logit;
      }
      const double weight = total > 0 ? 1.0 / (total * static_cast<double>(group)) : 0.0;
      for (Index c = 0; c < candidates; ++c)
        own.mass[static_cast<std::size_t>(c)] += own.logit[static_cast<std::size_t>(c)] * weight;
    }

    // Local blocks first, then the others by estimated mass (ties: the lower block).
    const Index local_first = geometry.local_begin - geometry.candidate_begin;
    const Index local_last = geometry.local_end - geometry.candidate_begin;
    double kept_mass = 0;
    Index others = 0;
    for (Index c = 0; c < candidates; ++c) {
      if (c >= local_first && c < local_last) {
        kept[count++] = geometry.candidate_begin + c;
        kept_mass += own.mass[static_cast<std::size_t>(c)];
      } else {
        own.order[static_cast<std::size_t>(others++)] = c;
      }
    }
    const auto by_mass = [&](Index a, Index c) {
      const double mass_a = own.mass[static_cast<std::size_t>(a)];
      const double mass_c = own.mass[static_cast<std::size_t>(c)];
      return mass_a > mass_c || (mass_a == mass_c && a < c);
    };
    const Index wanted = std::min(others, geometry.keep - count);
    std::partial_sort(own.order.begin(), own.order.begin() + wanted, own.order.begin() + others,
                      by_mass);
    for (Index r = 0; r < wanted; ++r) {
      if (plan.threshold > 0 && kept_mass >= plan.threshold) break;
      const Index c = own.order[static_cast<std::size_t>(r)];
      kept[count++] = geometry.candidate_begin + c;
      kept_mass += own.mass[static_cast<std::size_t>(c)];
    }
    std::sort(kept, kept + count);
    plan.counts[list] = count;
  });
}

// The visit policy of one tile: the key blocks that every query block of the tile keeps are
// visited whole (masked by the visibility rule alone), together with the sinks; blocks that
// only some of the tile's query blocks keep are visited by index, masked per (row, key).
class BlockSparsePolicy : public RulePolicy<Visibility> {
 public:
  BlockSparsePolicy(const Visibility& visibility, Index block_size, Index first_query_block,
                    const std::int64_t* offsets, const std::int64_t* blocks, const Index* key_rows,
                    std::vector<std::int64_t>& scratch)
      : RulePolicy(visibility),
        block_size_(block_size),
        first_query_block_(first_query_block),
        offsets_(offsets),
        blocks_(blocks),
        key_rows_(key_rows),
        scratch_(scratch) {}

  // The rule's answer, and the key's block kept by the position's query block (or a sink).
  bool sees(Index position, Index key) const {
    if (!rule().sees(position, key)) return false;
    if (key < rule().sink_tokens) return true;
    const Index list = floor_divide(position, block_size_) - first_query_block_;
    const std::int64_t* first = blocks_ + offsets_[list];
    const std::int64_t* last = blocks_ + offsets_[list + 1];
    return std::binary_search(first, last, key / block_size_);
  }

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const Index list_lo = floor_divide(position_lo, block_size_) - first_query_block_;
    const Index list_hi = floor_divide(position_hi, block_size_) - first_query_block_;
    const Index spanned = list_hi - list_lo + 1;
    // Every kept block of the tile's query blocks, once per query block that keeps it.
    std::vector<std::int64_t>& merged = scratch_;
    merged.assign(blocks_ + offsets_[list_lo], blocks_ + offsets_[list_hi + 1]);
    if (spanned > 1) std::sort(merged.begin(), merged.end());

    const Visibility& visibility = rule();
    const KeyRange band = visibility.band(position_lo, position_hi);
    const Index sinks_end = visibility.sinks_end(position_hi);
    KeyRange run{0, sinks_end};  // the contiguous keys visited next, sinks first
    const auto flush = [&] {
      if (run.begin < run.end)
        for_each_aligned_block(run, 0, visibility, position_lo, position_hi, visit);
    };
    for (std::size_t at = 0; at < merged.size();) {
      const std::int64_t block = merged[at];
      std::size_t next = at;
      while (next < merged.size() && merged[next] == block) ++next;
      const bool everywhere = static_cast<Index>(next - at) == spanned;
      at = next;
      const Index begin = std::max(block * block_size_, band.begin);
      const Index end = std::min((block + 1) * block_size_, band.end);
      if (everywhere) {
        if (begin >= end) continue;
        if (begin <= run.end) {
          run.end = std::max(run.end, end);
        } else {
          flush();
          run = {begin, end};
        }
        continue;
      }
      // Kept by some rows only: by index, masked by sees(). Sink keys are in the run.
      for (Index first = std::max(begin, sinks_end); first < end; first += kBlockK)
        visit(KeyBlock{0, std::min(kBlockK, end - first), key_rows_ + first, true, 0});
    }
    flush();
  }

 private:
  Index block_size_;
  Index first_query_block_;
  const std::int64_t* offsets_;
  const std::int64_t* blocks_;
  const Index* key_rows_;  // key_rows_[j] = j
  std::vector<std::int64_t>& scratch_;
};

template <typename S>
void block_sparse_attention(const SelectionPlan<S>& plan) {
  const FlashParams<S>& params = plan.params;
  const Index batch = params.q.size(0), heads_kv = params.k.size(1), len_k = params.k.size(2);
  const Index group = params.q.size(1) / heads_kv;
  const Index lists = batch * heads_kv * plan.query_blocks;
  std::vector<Index> key_rows(static_cast<std::size_t>(len_k));
  std::iota(key_rows.begin(), key_rows.end(), Index{0});
  // Work: every kept block's keys for every row of its query block (an upper bound).
  double kept_keys = static_cast<double>(plan.offsets[lists]) *
                     static_cast<double>(plan.block_size) * static_cast<double>(group);
  kept_keys *= static_cast<double>(plan.block_size);
  const double bound = static_cast<double>(dense_work(params));
  const double work =
      std::min(bound, kept_keys * static_cast<double>(params.q.size(3) + params.v.size(3)));
  const TileGrid grid(batch, heads_kv, params.rows_per_head());
  run_engine(
      params, grid.num_tasks(), saturated_work(work),
      [&](Index task, std::vector<std::int64_t>& scratch) {
        const TileGrid::Cell cell = grid.cell(task);
        const Index head_lists = (cell.outer * heads_kv + cell.kv_head) * plan.query_blocks;
        return plan_tile(
            BlockSparsePolicy(plan.visibility, plan.block_size, plan.first_query_block,
                              plan.offsets + head_lists, plan.items, key_rows.data(), scratch),
            tile_of(params, cell.outer, cell.kv_head, cell.flat_begin));
      },
      std::vector<std::int64_t>{});
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
