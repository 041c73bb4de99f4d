// src/kernels/vq.hpp — the vector-quantization assign kernel of one ISA level (included by
// level.cpp), on the plan that src/vq.cpp validated and made (detail/kernels.hpp).
//
// A task owns a block of rows. It packs them transposed (x_t[d][row], normalized for cosine) in
// its scratch, then walks the codebook in chunks that stay in cache; for each micro-tile of
// kRowVectors vectors of rows and kCodesPerMicro codes the dot products live in registers
// (codes broadcast, rows in lanes), become scores offset_k + scale_k · x·c_k, and update the
// per-row running minimum and its index. Codes are visited in increasing order and replace
// the minimum only when strictly smaller, so ties go to the lowest index. Each (row, code)
// score is the same sequence of operations whatever the tiling or thread, so results are
// bitwise identical for any thread count.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/simd.hpp"
#include "detail/with_count.hpp"
#include "foveal/core/parallel.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {
namespace vq {

constexpr int kCodesPerMicro = 6;
constexpr int kRowVectors = 4;
constexpr int kMicrosPerBlock = 4;
constexpr Index kCodesPerChunk = 40 * kCodesPerMicro;

template <typename T>
constexpr Index kRowsPerMicro = kRowVectors* kLanes<T>;
template <typename T>
constexpr Index kRowsPerBlock = kMicrosPerBlock* kRowsPerMicro<T>;

template <typename T>
using LaneIndex = VqLaneIndex<T>;
template <typename T>
using IndexVec = typename SimdTraits<T>::Bits;

// One task's memory: the transposed rows and the running minimum of each row.
template <typename T>
struct AssignScratch {
  AlignedArray<T> x_t;  // [dim][kRowsPerBlock]
  AlignedArray<T> row_sq_norm;
  AlignedArray<T> best_score;
  AlignedArray<LaneIndex<T>> best_index;

  explicit AssignScratch(Index dim)
      : x_t(allocate_aligned<T>(
            static_cast<std::size_t>(std::max<Index>(dim, 1) * kRowsPerBlock<T>))),
        row_sq_norm(allocate_aligned<T>(kRowsPerBlock<T>)),
        best_score(allocate_aligned<T>(kRowsPerBlock<T>)),
        best_index(allocate_aligned<LaneIndex<T>>(kRowsPerBlock<T>)) {}
};

// Updates the running minimum of kRowsPerMicro packed rows with the NC codes from `code_begin`.
template <typename T, int NC>
inline void argmin_micro(const VqAssignPlan<T>& params, const T* x_t, Index code_begin,
                         T* best_score, LaneIndex<T>* best_index) {
  constexpr int L = kLanes<T>;
  Vec<T> dots[NC][kRowVectors];
  FOVEAL_UNROLL
  for (int j = 0; j < NC; ++j) {
    FOVEAL_UNROLL
    for (int c = 0; c < kRowVectors; ++c) dots[j][c] = Vec<T>{};
  }
  const T* code = params.codebook + code_begin * params.code_stride;
  for (Index d = 0; d < params.dim; ++d) {
    Vec<T> rows[kRowVectors];
    FOVEAL_UNROLL
    for (int c = 0; c < kRowVectors; ++c) rows[c] = load(x_t + d * kRowsPerBlock<T> + c * L);
    FOVEAL_UNROLL
    for (int j = 0; j < NC; ++j) {
      const Vec<T> code_value = splat(code[j * params.code_stride + d]);
      FOVEAL_UNROLL
      for (int c = 0; c < kRowVectors; ++c) dots[j][c] += code_value * rows[c];
    }
  }
  FOVEAL_UNROLL
  for (int c = 0; c < kRowVectors; ++c) {
    Vec<T> best = load(best_score + c * L);
    IndexVec<T> index;
    std::memcpy(&index, best_index + c * L, sizeof(index));
    FOVEAL_UNROLL
    for (int j = 0; j < NC; ++j) {
      const Vec<T> score = splat(params.code_offset[code_begin + j]) +
                           splat(params.code_scale[code_begin + j]) * dots[j][c];
      const IndexVec<T> better = score < best;
      best = better ? score : best;
      const IndexVec<T> code_index = static_cast<LaneIndex<T>>(code_begin + j) - IndexVec<T>{};
      index = better ? code_index : index;
    }
    store(best_score + c * L, best);
    std::memcpy(best_index + c * L, &index, sizeof(index));
  }
}

// Packs rows [row_begin, row_begin + rows) transposed into scratch.x_t (zero past them) with
// their squared norms (cosine: normalized, norm 1 or 0).
template <typename T>
void pack_rows(const VqAssignPlan<T>& params, Index row_begin, Index rows,
               AssignScratch<T>& scratch) {
  constexpr Index pitch = kRowsPerBlock<T>;
  for (Index r = 0; r < rows; ++r) {
    const T* row = params.x + (row_begin + r) * params.x_stride;
    T sq_norm = 0;
    for (Index d = 0; d < params.dim; ++d) sq_norm += row[d] * row[d];
    T factor = 1;
    if (params.cosine) {
      factor = sq_norm > 0 ? T(1) / std::sqrt(sq_norm) : T(0);
      sq_norm = sq_norm > 0 ? T(1) : T(0);
    }
    scratch.row_sq_norm[r] = sq_norm;
    for (Index d = 0; d < params.dim; ++d) scratch.x_t[d * pitch + r] = row[d] * factor;
  }
  for (Index d = 0; d < params.dim; ++d)
    std::fill(&scratch.x_t[d * pitch + rows], &scratch.x_t[d * pitch + pitch], T(0));
}

template <typename T>
void assign_block(const VqAssignPlan<T>& params, Index block, AssignScratch<T>& scratch) {
  const Index row_begin = block * kRowsPerBlock<T>;
  const Index rows = std::min(kRowsPerBlock<T>, params.rows - row_begin);
  pack_rows(params, row_begin, rows, scratch);
  std::fill(&scratch.best_score[0], &scratch.best_score[kRowsPerBlock<T>],
            std::numeric_limits<T>::infinity());
  std::fill(&scratch.best_index[0], &scratch.best_index[kRowsPerBlock<T>], LaneIndex<T>(0));
  const Index micros = (rows + kRowsPerMicro<T> - 1) / kRowsPerMicro<T>;
  for (Index chunk = 0; chunk < params.codes; chunk += kCodesPerChunk) {
    const Index chunk_end = std::min(params.codes, chunk + kCodesPerChunk);
    for (Index micro = 0; micro < micros; ++micro) {
      const Index first_row = micro * kRowsPerMicro<T>;
      for (Index code = chunk; code < chunk_end; code += kCodesPerMicro) {
        const int count = static_cast<int>(std::min<Index>(kCodesPerMicro, chunk_end - code));
        with_count<kCodesPerMicro>(count, [&](auto nc) {
          argmin_micro<T, decltype(nc)::value>(params, &scratch.x_t[first_row], code,
                                               &scratch.best_score[first_row],
                                               &scratch.best_index[first_row]);
        });
      }
    }
  }
  for (Index r = 0; r < rows; ++r) {
    params.indices[(row_begin + r) * params.index_stride] = scratch.best_index[r];
    if (params.sq_distances != nullptr)
      params.sq_distances[(row_begin + r) * params.distance_stride] =
          std::max(T(0), scratch.row_sq_norm[r] + scratch.best_score[r]);
  }
}

}  // namespace vq

// The assignment of every row: one task per block of rows, with the thread's scratch.
template <typename T>
void vq_assign(const VqAssignPlan<T>& plan) {
  using namespace vq;
  const Index blocks = (plan.rows + kRowsPerBlock<T> - 1) / kRowsPerBlock<T>;
  const double work = static_cast<double>(plan.rows) * static_cast<double>(plan.codes) *
                      static_cast<double>(plan.dim);  // multiply-adds of the scores
  const int threads =
      team_size(blocks, plan.num_threads, work < 1e18 ? static_cast<Index>(work) : Index{1} << 60);
  std::vector<AssignScratch<T>> scratch;
  scratch.reserve(static_cast<std::size_t>(threads));
  for (int t = 0; t < threads; ++t) scratch.emplace_back(plan.dim);
  parallel_for(blocks, threads, [&](Index block) {
    assign_block(plan, block, scratch[static_cast<std::size_t>(thread_index())]);
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
