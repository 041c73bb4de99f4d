// src/kernels/sparsek_backward.hpp — the SparseK backward kernel of one ISA level (included by
// level.cpp; docs/sparsek.md, "Backward"): the engine's backward (detail/flash_backward.hpp) with
// the forward's visit policy (detail/sparsek_policy.hpp), on the plan that
// src/sparsek/backward.cpp validated and made.
//
// One task per (batch, kv head), with per-thread memory reused from head to head:
// 1. the selection again (detail::select_head, detail::build_tile_unions): τ of every pool
//    prefix and one eviction point per key, 16 bytes per pool key, plus the tile unions;
// 2. the tiles of query rows in increasing order, each with the forward's policy of that tile.
//    The policy's gate_gradients hook (detail/sparsek_gates.hpp) turns the recomputed P and dP
//    into dS and P m and sums the gates' gradients dm over the fractional gates into two arrays:
//    by key, Σ_i dm_il (the δ term of the SPARSEK Jacobian), and by query, c_i = Σ_{j selected,
//    fractional} dm_ij (over the query heads of the group too);
// 3. the support terms. Query i's pool projection has the fractional support
//    F_i = { pool keys l < n_i : 0 < u_l − τ_i < 1 } (n_i its pool length), and grad_u_l gets
//    −Σ_{i : l ∈ F_i} c_i / |F_i|. Along the queries n_i and τ_i never decrease, so each of the
//    three conditions holds on a prefix or a suffix of the queries and l ∈ F_i exactly for the
//    queries of one interval, found by binary search. |F_i| is then a difference array over
//    the queries (+1 where an interval begins, −1 where it ends) and the sum over an interval
//    a difference of (compensated) prefix sums of c_i / |F_i|: O(Lk log Lq + Lq) per head,
//    with no per-query pool ever formed. The fractional test is the kernel's own, u − τ in T,
//    so the support, its size and the gates that feed it agree exactly.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "detail/flash_backward.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/sparsek_policy.hpp"
#include "detail/sparsek_selection.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Per-thread memory of a head task of the SparseK backward.
template <typename T>
struct SparseKHeadScratch {
  HeadSelection selection;
  TileUnions unions;
  PolicyScratch<T> policy{0};
  std::vector<T> grad_score;        // [Lk]: Σ_i dm_il over fractional gates, by key position
  std::vector<double> grad_row;     // [Lq]: c_i
  std::vector<T> row_threshold;     // [Lq]: τ_i in T, as the gates use it
  std::vector<Index> support_size;  // [Lq + 1]: difference array, then |F_i|
  std::vector<double> prefix, prefix_error;  // [Lq + 1]: Σ_{i' < i} c_i' / |F_i'|, compensated
};

// The queries [begin, end) whose fractional support holds pool key `pool_key` with score
// `score` (in T), given every query's threshold in T (non-decreasing).
struct QueryInterval {
  Index begin = 0, end = 0;
};

template <typename T>
QueryInterval support_queries(const SparseKGeometry& geometry, Index pool_key, T score,
                              const std::vector<T>& row_threshold) {
  const auto first_where = [&](auto&& holds) {  // holds: false, ..., false, true, ..., true
    Index low = 0, high = geometry.len_q;
    while (low < high) {
      const Index middle = low + (high - low) / 2;
      if (holds(middle)) {
        high = middle;
      } else {
        low = middle + 1;
      }
    }
    return low;
  };
  const auto excess = [&](Index i) { return score - row_threshold[static_cast<std::size_t>(i)]; };
  const Index in_pool =
      first_where([&](Index i) { return geometry.pool_length(geometry.q_offset + i) > pool_key; });
  const Index below_one = first_where([&](Index i) { return excess(i) < T(1); });
  const Index not_above_zero = first_where([&](Index i) { return !(excess(i) > T(0)); });
  const Index begin = std::max(in_pool, below_one);
  return {begin, std::max(begin, not_above_zero)};
}

// grad_u of one (batch, kv head) from the sums of the gates' gradients (see the file comment).
template <typename T>
void write_score_gradients(const SparseKGeometry& geometry, const T* u, Index u_stride,
                           SparseKHeadScratch<T>& scratch, T* grad_u, Index grad_u_stride) {
  const Index len_q = geometry.len_q;
  const auto queries = static_cast<std::size_t>(len_q);
  scratch.row_threshold.resize(queries);
  for (Index i = 0; i < len_q; ++i) {
    const Index length = geometry.pool_length(geometry.q_offset + i);
    scratch.row_threshold[static_cast<std::size_t>(i)] =
        static_cast<T>(scratch.selection.tau[static_cast<std::size_t>(length)]);
  }
  const auto interval_of = [&](Index pool_key) {
    return support_queries(geometry, pool_key, u[(geometry.sinks + pool_key) * u_stride],
                           scratch.row_threshold);
  };
  scratch.support_size.assign(queries + 1, 0);
  for (Index pool_key = 0; pool_key < geometry.pool_size; ++pool_key) {
    const QueryInterval interval = interval_of(pool_key);
    if (interval.begin == interval.end) continue;
    ++scratch.support_size[static_cast<std::size_t>(interval.begin)];
    --scratch.support_size[static_cast<std::size_t>(interval.end)];
  }
  // Prefix sums of c_i / |F_i|, Neumaier-compensated: an interval's sum is a difference of two
  // prefixes and must not lose the digits the prefix before it carries.
  scratch.prefix.assign(queries + 1, 0.0);
  scratch.prefix_error.assign(queries + 1, 0.0);
  Index size = 0;
  double sum = 0, error = 0;
  for (std::size_t i = 0; i < queries; ++i) {
    size += scratch.support_size[i];
    const double term = size > 0 ? scratch.grad_row[i] / static_cast<double>(size) : 0.0;
    const double next = sum + term;
    error += std::abs(sum) >= std::abs(term) ? (sum - next) + term : (term - next) + sum;
    sum = next;
    scratch.prefix[i + 1] = sum;
    scratch.prefix_error[i + 1] = error;
  }
  for (Index key = 0; key < geometry.len_k; ++key) {
    double gradient = static_cast<double>(scratch.grad_score[static_cast<std::size_t>(key)]);
    if (key >= geometry.sinks) {
      const QueryInterval interval = interval_of(key - geometry.sinks);
      const auto b = static_cast<std::size_t>(interval.begin);
      const auto e = static_cast<std::size_t>(interval.end);
      gradient -= (scratch.prefix[e] - scratch.prefix[b]) +
                  (scratch.prefix_error[e] - scratch.prefix_error[b]);
    }
    grad_u[key * grad_u_stride] = static_cast<T>(gradient);
  }
}

template <typename T>
void sparsek_attention_backward(const SparseKBackwardPlan<T>& plan) {
  const BackwardParams<T>& params = plan.params;
  const SparseKGeometry& geometry = plan.geometry;
  const TensorView<const T, 3>& u = plan.u;
  const TensorView<T, 3>& grad_u = plan.grad_u;
  const Index len_q = geometry.len_q, len_k = geometry.len_k;
  const Index group = params.forward.q.size(1) / params.forward.k.size(1);
  const AlwaysVisible always_visible{geometry.window, geometry.sinks, len_k, geometry.causal};
  const SparseKGate gate = plan.gate;
  const bool gated = gate != SparseKGate::none;
  run_backward_heads(
      params,
      [&](const BackwardRunner<T>& runner, Index b, Index h, const BackwardWorkspace<T>& workspace,
          SparseKHeadScratch<T>& scratch) {
        const T* u_row = u.address(b, h, 0);
        select_head(u_row, u.stride(2), geometry, scratch.selection);
        build_tile_unions(scratch.selection, geometry, group, scratch.unions);
        const std::vector<Index>& offsets = scratch.unions.offsets;
        Index widest_union = 0;
        for (std::size_t t = 0; t + 1 < offsets.size(); ++t)
          widest_union = std::max(widest_union, offsets[t + 1] - offsets[t]);
        scratch.policy.reserve_union(widest_union);
        GateGradientSums<T> sums;
        if (gated) {
          scratch.grad_score.assign(static_cast<std::size_t>(len_k), T(0));
          scratch.grad_row.assign(static_cast<std::size_t>(len_q), 0.0);
          sums = {scratch.grad_score.data(), scratch.grad_row.data()};
        }
        runner.run_head(b, h, workspace, [&](Index flat_begin) {
          const auto tile = static_cast<std::size_t>(flat_begin / kBlockQ);
          return SparseKPolicy<T>(geometry, always_visible, scratch.selection, u_row, u.stride(2),
                                  scratch.unions.keys.data() + offsets[tile],
                                  offsets[tile + 1] - offsets[tile], group, flat_begin, gate,
                                  scratch.policy, sums);
        });
        if (grad_u.is_null()) return;
        T* grad_u_row = grad_u.address(b, h, 0);
        if (!gated) {
          for (Index key = 0; key < len_k; ++key) grad_u_row[key * grad_u.stride(2)] = T(0);
          return;
        }
        write_score_gradients(geometry, u_row, u.stride(2), scratch, grad_u_row, grad_u.stride(2));
      },
      SparseKHeadScratch<T>{}, gate == SparseKGate::kv);
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
