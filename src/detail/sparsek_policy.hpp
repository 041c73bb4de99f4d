// src/detail/sparsek_policy.hpp (private) — SparseK attention's visit policy on the engine, shared
// by the forward and the backward kernels of an ISA level (src/kernels/sparsek.hpp,
// src/kernels/sparsek_backward.hpp; code of the level region, detail/isa.hpp): a
// tile visits the union of its rows' selections as gathered blocks (gated by the hooks of
// detail/sparsek_gates.hpp), then the sinks and the window as contiguous blocks.
#pragma once

#include <algorithm>
#include <limits>
#include <vector>

#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "detail/sparsek_gates.hpp"
#include "detail/sparsek_selection.hpp"
#include "foveal/sparsek/attention.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Per-thread memory of the policy: one entry per key of a tile's union, one per tile row.
template <typename T>
struct PolicyScratch {
  std::vector<Index> row_begin, row_end;
  std::vector<T> score;
  std::vector<T> row_threshold;

  explicit PolicyScratch(Index widest_union = 0)
      : row_begin(static_cast<std::size_t>(widest_union)),
        row_end(static_cast<std::size_t>(widest_union)),
        score(static_cast<std::size_t>(widest_union)),
        row_threshold(static_cast<std::size_t>(kBlockQ)) {}

  // Room for unions of up to `widest_union` keys.
  void reserve_union(Index widest_union) {
    const auto size = static_cast<std::size_t>(widest_union);
    if (score.size() >= size) return;
    row_begin.resize(size);
    row_end.resize(size);
    score.resize(size);
  }
};

// Where the backward sums the gradients of a head's gates (GatedKeyData): grad_score [Lk] by key
// position, grad_row [Lq] by query.
template <typename T>
struct GateGradientSums {
  T* grad_score = nullptr;
  double* grad_row = nullptr;
};

// The visit policy of one tile: its union of selected keys in gathered blocks, then the sinks
// and the window (AlwaysVisible) as contiguous blocks.
template <typename T>
class SparseKPolicy : public GatedKeyHooks<T>, public RulePolicy<AlwaysVisible> {
 public:
  // u: the head's scores, in T or in the 16-bit storage type T computes for.
  template <typename U>
  SparseKPolicy(const SparseKGeometry& geometry, const AlwaysVisible& always_visible,
                const HeadSelection& selection, const U* u, Index u_stride, const Index* keys,
                Index key_count, Index group, Index flat_begin, SparseKGate gate,
                PolicyScratch<T>& scratch, const GateGradientSums<T>& sums = {})
      : GatedKeyHooks<T>({keys, scratch.score.data(), scratch.row_threshold.data(),
                          scratch.row_begin.data(), scratch.row_end.data(), gate, sums.grad_score,
                          sums.grad_row, flat_begin, group}),
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
      scratch.score[static_cast<std::size_t>(i)] = widen(u[key * u_stride]);
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

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
