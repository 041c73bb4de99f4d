// src/kernels/sparsek.hpp — the SparseK kernels of one ISA level (included by level.cpp): the
// engine runs of sparsek_attention and SparseKCache::attend over the selections that their entry
// points (src/sparsek/*.cpp) made.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/sparsek_gates.hpp"
#include "detail/sparsek_selection.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Per-thread memory of the policy: one entry per key of a tile's union, one per tile row.
template <typename T>
struct PolicyScratch {
  std::vector<Index> row_begin, row_end;
  std::vector<T> score;
  std::vector<T> row_threshold;

  explicit PolicyScratch(Index widest_union)
      : row_begin(static_cast<std::size_t>(widest_union)),
        row_end(static_cast<std::size_t>(widest_union)),
        score(static_cast<std::size_t>(widest_union)),
        row_threshold(static_cast<std::size_t>(kBlockQ)) {}
};

// The visit policy of one tile: its union of selected keys in gathered blocks, then the sinks
// and the window (AlwaysVisible) as contiguous blocks.
template <typename T>
class SparseKPolicy : public GatedKeyHooks<T>, public RulePolicy<AlwaysVisible> {
 public:
  SparseKPolicy(const SparseKGeometry& geometry, const AlwaysVisible& always_visible,
                const HeadSelection& selection, const T* u, Index u_stride, const Index* keys,
                Index key_count, Index group, Index flat_begin, SparseKGate gate,
                PolicyScratch<T>& scratch)
      : GatedKeyHooks<T>({keys, scratch.score.data(), scratch.row_threshold.data(),
                          scratch.row_begin.data(), scratch.row_end.data(), gate}),
        RulePolicy<AlwaysVisible>(always_visible),
        keys_(keys),
        key_count_(key_count),
        scratch_(scratch) {
    const Index rows = std::min(kBlockQ, geometry.len_q * group - flat_begin);
    num_rows_ = rows;
    // The first row of the tile at or after a position; positions are clamped to the queries'
    // span first so that "never" (a huge bound) cannot overflow.
    const auto first_row_at = [&](Index position) {
      const Index clamped =
          std::clamp(position, geometry.q_offset, geometry.q_offset + geometry.len_q);
      return std::clamp<Index>((clamped - geometry.q_offset) * group - flat_begin, 0, rows);
    };
    constexpr Index kNever = std::numeric_limits<Index>::max() / 4;
    for (Index i = 0; i < key_count; ++i) {
      const Index key = keys[i];
      Index row_begin = 0, row_end = rows;
      if (geometry.causal) {
        // Pool key key - sinks is selected for pool lengths [key - sinks + 1, evicted_at), i.e.
        // positions [key + window, evicted_at + window + sinks - 1).
        const Index evicted = selection.evicted_at[static_cast<std::size_t>(key - geometry.sinks)];
        const Index end_position =
            evicted > geometry.pool_size ? kNever : evicted + geometry.window + geometry.sinks - 1;
        row_begin = first_row_at(key + geometry.window);
        row_end = first_row_at(end_position);
      }
      scratch.row_begin[static_cast<std::size_t>(i)] = row_begin;
      scratch.row_end[static_cast<std::size_t>(i)] = row_end;
      scratch.score[static_cast<std::size_t>(i)] = u[key * u_stride];
    }
    for (Index r = 0; r < kBlockQ; ++r) {
      const Index flat = flat_begin + std::min(r, rows - 1);
      const Index length = geometry.pool_length(geometry.q_offset + flat / group);
      scratch.row_threshold[static_cast<std::size_t>(r)] =
          static_cast<T>(selection.tau[static_cast<std::size_t>(length)]);
    }
  }

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    for (Index begin = 0; begin < key_count_; begin += kBlockK) {
      const Index count = std::min(kBlockK, key_count_ - begin);
      bool partial = false;
      for (Index i = begin; i < begin + count; ++i)
        partial = partial || scratch_.row_begin[static_cast<std::size_t>(i)] > 0 ||
                  scratch_.row_end[static_cast<std::size_t>(i)] < num_rows_;
      visit(KeyBlock{0, count, keys_ + begin, partial, 0});
    }
    this->for_each_visible_block(position_lo, position_hi, visit);
  }

 private:
  const Index* keys_;
  Index key_count_;
  Index num_rows_ = 0;
  const PolicyScratch<T>& scratch_;
};

template <typename T>
void sparsek_attention(const SparseKPlan<T>& plan) {
  const FlashParams<T>& params = plan.params;
  const SparseKGeometry& geometry = plan.geometry;
  const Index batch = params.q.size(0), heads_kv = params.k.size(1);
  const Index group = params.q.size(1) / heads_kv;
  const AlwaysVisible always_visible{geometry.window, geometry.sinks, geometry.len_k,
                                     geometry.causal};
  const TileGrid grid(batch, heads_kv, params.rows_per_head());
  run_engine(
      params, grid.num_tasks(),
      [&](Index task, PolicyScratch<T>& scratch) {
        const TileGrid::Cell cell = grid.cell(task);
        const Index head_task = cell.outer * heads_kv + cell.kv_head;
        const TileUnions& head_unions = plan.unions[static_cast<std::size_t>(head_task)];
        const auto tile = static_cast<std::size_t>(cell.flat_begin / kBlockQ);
        const Index union_begin = head_unions.offsets[tile];
        const Index union_end = head_unions.offsets[tile + 1];
        return plan_tile(
            SparseKPolicy<T>(geometry, always_visible,
                             plan.selections[static_cast<std::size_t>(head_task)],
                             plan.u.address(cell.outer, cell.kv_head, 0), plan.u.stride(2),
                             head_unions.keys.data() + union_begin, union_end - union_begin, group,
                             cell.flat_begin, plan.gate, scratch),
            tile_of(params, cell.outer, cell.kv_head, cell.flat_begin));
      },
      PolicyScratch<T>(plan.widest_union));
}

// Visits the selected slots of one (sequence, kv head) as gathered blocks, then the sinks and
// the window (rows [0, always_visible)) as contiguous ones. Every query row of the tile sits at
// the newest position and sees every one of these keys, so nothing is masked.
template <typename T>
class SparseKCachePolicy : public GatedKeyHooks<T>, public RulePolicy<AllKeys> {
 public:
  SparseKCachePolicy(const GatedKeyData<T>& selected, Index selected_count, Index always_visible)
      : GatedKeyHooks<T>(selected),
        RulePolicy<AllKeys>({always_visible}),
        slot_rows_(selected.keys),
        selected_count_(selected_count) {}

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    for (Index begin = 0; begin < selected_count_; begin += kBlockK)
      visit(KeyBlock{0, std::min(kBlockK, selected_count_ - begin), slot_rows_ + begin, false, 0});
    this->for_each_visible_block(position_lo, position_hi, visit);
  }

 private:
  const Index* slot_rows_;
  Index selected_count_;
};

// Per-thread memory of the cache policy: τ of each tile row.
template <typename T>
struct RowThresholds {
  T values[kBlockQ];
};

template <typename T>
void sparsek_cache_attention(const SparseKCachePlan<T>& plan) {
  const FlashParams<T>& params = plan.params;
  const Index heads_kv = params.k.size(1);
  const TileGrid grid(params.q.size(0), heads_kv, params.rows_per_head());
  run_engine(
      params, grid.num_tasks(),
      [&](Index task, RowThresholds<T>& scratch) {
        const TileGrid::Cell cell = grid.cell(task);
        const Index head = cell.outer * heads_kv + cell.kv_head;
        // Every row of the tile is the newest query: one τ for all.
        std::fill_n(scratch.values, kBlockQ, plan.thresholds[static_cast<std::size_t>(head)]);
        GatedKeyData<T> gated;
        gated.keys = plan.slot_rows;
        gated.score = plan.scores + head * plan.score_stride;
        gated.row_threshold = scratch.values;
        gated.gate = plan.gate;
        return plan_tile(SparseKCachePolicy<T>(gated, plan.selected, plan.always_visible),
                         tile_of(params, cell.outer, cell.kv_head, cell.flat_begin));
      },
      RowThresholds<T>{});
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
