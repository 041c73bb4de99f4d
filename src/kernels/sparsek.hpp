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
#include "detail/sparsek_policy.hpp"
#include "detail/sparsek_selection.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// S: the storage type; scores, gates and thresholds in T = compute_type_t<S>.
template <typename S>
void sparsek_attention(const SparseKPlan<S>& plan) {
  using T = compute_type_t<S>;
  const FlashParams<S>& params = plan.params;
  const SparseKGeometry& geometry = plan.geometry;
  const Index batch = params.q.size(0), heads_kv = params.k.size(1);
  const Index group = params.q.size(1) / heads_kv;
  const AlwaysVisible always_visible{geometry.window, geometry.sinks, geometry.len_k,
                                     geometry.causal};
  const TileGrid grid(batch, heads_kv, params.rows_per_head());
  run_engine(
      params, grid.num_tasks(), dense_work(params),
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

// S: the cache's storage type; scores, gates and thresholds in T = compute_type_t<S>.
template <typename S>
void sparsek_cache_attention(const SparseKCachePlan<S>& plan) {
  using T = compute_type_t<S>;
  const FlashParams<S>& params = plan.params;
  const Index heads_kv = params.k.size(1);
  const TileGrid grid(params.q.size(0), heads_kv, params.rows_per_head());
  // Each row sees the selected keys and the always-visible ones.
  const Index work =
      attention_work(params, params.query_rows(), plan.selected + plan.always_visible);
  run_engine(
      params, grid.num_tasks(), work,
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
