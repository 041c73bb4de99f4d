// src/kernels/spade.hpp — the SPADE embedding's forward of one ISA level (included by level.cpp),
// on the plan SpadeEmbedding::forward (src/spade.cpp) validated and made: per output row, the
// gathered rows of the folded discrete tables, SiLU of the continuous features' hidden units and
// the condition values times their folded dense rows, plus the bias.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/simd.hpp"
#include "detail/softmax_math.hpp"
#include "foveal/core/parallel.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {
namespace spade {

using FloatVec = Vec<float>;

// SiLU(z) = z * sigmoid(z) lane-wise, with sigmoid from e = exp(-|z|) so that nothing overflows.
inline FloatVec silu(FloatVec z) {
  const FloatVec magnitude = z < 0.0f ? -z : z;
  const FloatVec e = exp2_nonpositive(magnitude * static_cast<float>(-kLog2E));
  const FloatVec reciprocal = 1.0f / (1.0f + e);
  return z * (z < 0.0f ? e * reciprocal : reciprocal);
}

// The inputs of one output row: the gathered rows of the folded discrete tables and the
// coefficients of the dense rows (SiLU activations, then condition values).
struct RowTerms {
  const float* const* gathered;
  Index num_gathered;
  const float* coefficients;
  Index num_coefficients;
};

// acc[0, kVectors) = bias + sum of gathered rows + sum_k coefficients[k] * dense_rows[k], all
// at columns [column, column + kVectors * lanes).
template <int kVectors>
inline void accumulate_columns(const float* bias, const RowTerms& terms, const float* dense_rows,
                               Index row_stride, Index column, FloatVec* acc) {
  for (int v = 0; v < kVectors; ++v) acc[v] = load(bias + column + v * kLanes<float>);
  for (Index g = 0; g < terms.num_gathered; ++g) {
    const float* row = terms.gathered[g] + column;
    for (int v = 0; v < kVectors; ++v) acc[v] += load(row + v * kLanes<float>);
  }
  for (Index k = 0; k < terms.num_coefficients; ++k) {
    const FloatVec coefficient = splat(terms.coefficients[k]);
    const float* row = dense_rows + k * row_stride + column;
    for (int v = 0; v < kVectors; ++v) acc[v] += coefficient * load(row + v * kLanes<float>);
  }
}

// Rows of (B, T) handed to one task: fixed, so results never depend on the thread count.
constexpr Index kTileRows = 64;
// Vectors per accumulation block: 8 accumulators leave registers for the loads.
constexpr int kBlockVectors = 8;

}  // namespace spade

// SPADE is float only: the double table's entry is the same code.
template <typename T>
void spade_embedding(const SpadeEmbeddingPlan& plan) {
  using namespace spade;
  constexpr int kFloatLanes = kLanes<float>;
  const Index num_discrete = plan.num_discrete;
  const Index steps = plan.out.size(1);
  const Index hidden_total = plan.dense_inputs - plan.condition_dim;
  const Index hidden_padded = (hidden_total + kFloatLanes - 1) / kFloatLanes * kFloatLanes;
  const Index coefficients_size = std::max(hidden_padded, plan.dense_inputs);
  const Index rows = plan.out.size(0) * steps;
  const Index num_tiles = (rows + kTileRows - 1) / kTileRows;
  // Per-thread scratch, allocated once, for the threads the loop starts (at most its tiles):
  // the coefficients and the gathered row pointers.
  const int team = team_size(num_tiles, plan.num_threads);
  std::vector<float> coefficient_scratch(static_cast<std::size_t>(team * coefficients_size));
  std::vector<const float*> gathered_scratch(static_cast<std::size_t>(team * num_discrete));
  parallel_for(num_tiles, team, [&](Index tile) {
    const Index thread = thread_index();
    float* coefficients = coefficient_scratch.data() + thread * coefficients_size;
    const float** gathered = gathered_scratch.data() + thread * num_discrete;
    const RowTerms terms{gathered, num_discrete, coefficients, plan.dense_inputs};
    for (Index row = tile * kTileRows, end = std::min(rows, row + kTileRows); row < end; ++row) {
      const Index b = row / steps, t = row % steps;
      float* out_row = plan.out.address(b, t, 0);
      bool all_pad = num_discrete > 0;
      for (Index column = 0; column < num_discrete; ++column) {
        const Index id = plan.ids(b, t, column);
        all_pad &= id == plan.pad_ids[column];
        gathered[column] = plan.tables[column] + id * plan.row_stride;
      }
      if (all_pad) {
        std::memcpy(out_row, plan.pad_row, sizeof(float) * plan.d_model);
        continue;
      }
      // SiLU(w1 * x + b1) of every continuous feature, whole vectors (zero padding: SiLU(0) = 0),
      // then the condition values after them.
      Index hidden = 0;
      for (Index column = 0; column < plan.num_continuous; ++column) {
        const float x = plan.values(b, t, column);
        for (Index k = 0; k < plan.hidden_sizes[column]; ++k, ++hidden)
          coefficients[hidden] = plan.hidden_weight[hidden] * x + plan.hidden_bias[hidden];
      }
      for (; hidden < hidden_padded; ++hidden) coefficients[hidden] = 0.0f;
      for (Index k = 0; k < hidden_padded; k += kFloatLanes)
        store(coefficients + k, silu(load(coefficients + k)));
      for (Index c = 0; c < plan.condition_dim; ++c)
        coefficients[hidden_total + c] = plan.condition(b, t, c);

      FloatVec acc[kBlockVectors];
      Index column = 0;
      for (; column + kBlockVectors * kFloatLanes <= plan.d_model;
           column += kBlockVectors * kFloatLanes) {
        accumulate_columns<kBlockVectors>(plan.bias, terms, plan.dense_rows, plan.row_stride,
                                          column, acc);
        for (int v = 0; v < kBlockVectors; ++v) store(out_row + column + v * kFloatLanes, acc[v]);
      }
      for (; column < plan.d_model; column += kFloatLanes) {
        accumulate_columns<1>(plan.bias, terms, plan.dense_rows, plan.row_stride, column, acc);
        const Index count = std::min<Index>(kFloatLanes, plan.d_model - column);
        if (count == kFloatLanes) {
          store(out_row + column, acc[0]);
        } else {
          std::memcpy(out_row + column, &acc[0], sizeof(float) * count);
        }
      }
    }
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
