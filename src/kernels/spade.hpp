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

// SiLU(z) and its derivative sigmoid(z) (1 + z (1 - sigmoid(z))) lane-wise.
inline void silu_and_slope(FloatVec z, FloatVec& value, FloatVec& slope) {
  const FloatVec magnitude = z < 0.0f ? -z : z;
  const FloatVec e = exp2_nonpositive(magnitude * static_cast<float>(-kLog2E));
  const FloatVec reciprocal = 1.0f / (1.0f + e);
  const FloatVec sigmoid = z < 0.0f ? e * reciprocal : reciprocal;
  value = z * sigmoid;
  slope = sigmoid * (1.0f + z * (1.0f - sigmoid));
}

// The lanes of v added in order.
inline float sum_lanes(FloatVec v) {
  float lanes[kLanes<float>];
  std::memcpy(lanes, &v, sizeof(lanes));
  float sum = 0.0f;
  for (float lane : lanes) sum += lane;
  return sum;
}

// kLanes floats of a grad_out row from `column` on (zeros past `count`).
inline FloatVec load_columns(const float* row, Index column, Index d_model) {
  const Index count = d_model - column;
  if (count >= kLanes<float>) return load(row + column);
  return count > 0 ? load_partial(row + column, static_cast<int>(count)) : FloatVec{};
}

// out[j] = rows[j] . g (d_model floats; rows zero padded to whole vectors) for kRows rows.
template <int kRows>
inline void dot_rows(const float* rows, Index row_stride, const float* g, Index d_model,
                     float* out) {
  FloatVec acc[kRows] = {};
  for (Index column = 0; column < d_model; column += kLanes<float>) {
    const FloatVec gv = load_columns(g, column, d_model);
    for (int j = 0; j < kRows; ++j) acc[j] += load(rows + j * row_stride + column) * gv;
  }
  for (int j = 0; j < kRows; ++j) out[j] = sum_lanes(acc[j]);
}

// The backward's column pass: vectors of columns per task (kColumnVectors * lanes divides
// kSpadeSumFloats at every level), rows per chunk, and dense coefficients per register group.
constexpr Index kColumnVectors = 4;
constexpr Index kRowChunk = 64;
constexpr Index kDenseGroup = kVectorRegisters >= 32 ? 4 : 2;

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

// The backward's sums (SpadeEmbeddingBackwardPlan). A row pass in fixed tiles of kTileRows rows
// finds the kept rows, their dense coefficients and, from dense_rows . grad_out, the gradients
// of the condition and of the hidden units (per-tile partial sums, added in tile order); a
// column pass, each thread owning whole blocks of columns, adds the grad_out rows in row order
// into the per-id table sums, the dense sums and the total. No sum depends on the thread count.
template <typename T>
void spade_embedding_backward(const SpadeEmbeddingBackwardPlan& plan) {
  using namespace spade;
  constexpr Index kFloatLanes = kLanes<float>;
  const Index steps = plan.grad_out.size(1);
  const Index rows = plan.grad_out.size(0) * steps;
  const Index dense = plan.dense_inputs;
  const Index dense_padded = (dense + kDenseGroup - 1) / kDenseGroup * kDenseGroup;
  const Index hidden_total = dense - plan.condition_dim;
  const Index hidden_padded = (hidden_total + kFloatLanes - 1) / kFloatLanes * kFloatLanes;
  const Index num_tiles = (rows + kTileRows - 1) / kTileRows;
  const Index d_model = plan.d_model;
  const auto row_of = [&](const auto& view, Index row) {
    return view.address(row / steps, row % steps, 0);
  };

  std::vector<std::uint8_t> kept(static_cast<std::size_t>(rows));
  std::vector<float> coefficients(static_cast<std::size_t>(rows * dense_padded), 0.0f);
  std::vector<double> tile_hidden(static_cast<std::size_t>(num_tiles * 2 * hidden_total), 0.0);
  const int team = team_size(num_tiles, plan.num_threads);
  const Index scratch_size = 3 * hidden_padded + dense;
  std::vector<float> scratch(static_cast<std::size_t>(team * scratch_size));
  parallel_for(num_tiles, team, [&](Index tile) {
    float* z = scratch.data() + thread_index() * scratch_size;
    float* slope = z + hidden_padded;
    float* x_of = slope + hidden_padded;
    float* gradient = x_of + hidden_padded;
    double* partial = tile_hidden.data() + tile * 2 * hidden_total;
    for (Index row = tile * kTileRows, end = std::min(rows, row + kTileRows); row < end; ++row) {
      const Index b = row / steps, t = row % steps;
      bool all_pad = plan.num_discrete > 0;
      for (Index column = 0; column < plan.num_discrete; ++column)
        all_pad &= plan.ids(b, t, column) == plan.pad_ids[column];
      kept[static_cast<std::size_t>(row)] = !all_pad;
      if (all_pad) {
        for (Index c = 0; c < plan.condition_dim; ++c) plan.grad_condition(b, t, c) = 0.0f;
        continue;
      }
      float* coefficient = coefficients.data() + row * dense_padded;
      Index hidden = 0;
      for (Index column = 0; column < plan.num_continuous; ++column) {
        const float x = plan.values(b, t, column);
        for (Index k = 0; k < plan.hidden_sizes[column]; ++k, ++hidden) {
          z[hidden] = plan.hidden_weight[hidden] * x + plan.hidden_bias[hidden];
          x_of[hidden] = x;
        }
      }
      for (; hidden < hidden_padded; ++hidden) z[hidden] = 0.0f;
      for (Index k = 0; k < hidden_padded; k += kFloatLanes) {
        FloatVec value, derivative;
        silu_and_slope(load(z + k), value, derivative);
        store(z + k, value);
        store(slope + k, derivative);
      }
      // (No continuous feature: no coefficients, and the buffers may be null.)
      if (hidden_total > 0)
        std::memcpy(coefficient, z, sizeof(float) * static_cast<std::size_t>(hidden_total));
      for (Index c = 0; c < plan.condition_dim; ++c)
        coefficient[hidden_total + c] = plan.condition(b, t, c);

      const float* g = row_of(plan.grad_out, row);
      Index k = 0;
      for (; k + 4 <= dense; k += 4)
        dot_rows<4>(plan.dense_rows + k * plan.row_stride, plan.row_stride, g, d_model,
                    gradient + k);
      for (; k < dense; ++k)
        dot_rows<1>(plan.dense_rows + k * plan.row_stride, plan.row_stride, g, d_model,
                    gradient + k);
      for (k = 0; k < hidden_total; ++k) {
        const double dz = static_cast<double>(gradient[k]) * slope[k];
        partial[k] += dz * x_of[k];
        partial[hidden_total + k] += dz;
      }
      for (Index c = 0; c < plan.condition_dim; ++c)
        plan.grad_condition(b, t, c) = gradient[hidden_total + c];
    }
  });
  for (Index tile = 0; tile < num_tiles; ++tile)
    for (Index j = 0; j < 2 * hidden_total; ++j)
      plan.hidden_grads[j] += tile_hidden[static_cast<std::size_t>(tile * 2 * hidden_total + j)];

  // The column pass: blocks of kColumnVectors vectors of columns of every sum (the caller zeroed
  // them), each summing its slice of the kept grad_out rows in row order, in chunks of
  // kRowChunk rows: first the total and the per-id table sums, then the dense sums kDenseGroup
  // coefficients at a time in registers (the chunk's slice stays in L1). Each thread owns a
  // contiguous range of blocks and walks the chunks in order, its blocks inside, so that it
  // reads grad_out once, front to back; a sum's order is the row order whatever the range.
  const Index block_columns = kColumnVectors * kFloatLanes;
  const Index column_blocks = (d_model + block_columns - 1) / block_columns;
  const auto add_chunk = [&](Index first, Index chunk, Index chunk_end) {
    const auto load_row = [&](Index row, FloatVec* g) {
      const float* grad_row = row_of(plan.grad_out, row);
      for (Index v = 0; v < kColumnVectors; ++v)
        g[v] = load_columns(grad_row, first + v * kFloatLanes, d_model);
    };
    FloatVec total[kColumnVectors];
    for (Index v = 0; v < kColumnVectors; ++v)
      total[v] = load(plan.grad_sum + first + v * kFloatLanes);
    for (Index row = chunk; row < chunk_end; ++row) {
      if (!kept[static_cast<std::size_t>(row)]) continue;
      FloatVec g[kColumnVectors];
      load_row(row, g);
      for (Index v = 0; v < kColumnVectors; ++v) total[v] += g[v];
      const Index b = row / steps, t = row % steps;
      for (Index c = 0; c < plan.num_discrete; ++c) {
        float* sum = plan.table_sums[c] + plan.ids(b, t, c) * plan.sum_stride + first;
        for (Index v = 0; v < kColumnVectors; ++v)
          store(sum + v * kFloatLanes, load(sum + v * kFloatLanes) + g[v]);
      }
    }
    for (Index v = 0; v < kColumnVectors; ++v)
      store(plan.grad_sum + first + v * kFloatLanes, total[v]);
    for (Index k0 = 0; k0 < dense; k0 += kDenseGroup) {
      const Index group = std::min(kDenseGroup, dense - k0);
      FloatVec acc[kDenseGroup][kColumnVectors] = {};
      for (Index j = 0; j < group; ++j)
        for (Index v = 0; v < kColumnVectors; ++v)
          acc[j][v] = load(plan.dense_sums + (k0 + j) * plan.sum_stride + first + v * kFloatLanes);
      for (Index row = chunk; row < chunk_end; ++row) {
        if (!kept[static_cast<std::size_t>(row)]) continue;
        FloatVec g[kColumnVectors];
        load_row(row, g);
        const float* coefficient = coefficients.data() + row * dense_padded + k0;
        for (Index j = 0; j < kDenseGroup; ++j) {
          const FloatVec scale = splat(coefficient[j]);
          for (Index v = 0; v < kColumnVectors; ++v) acc[j][v] += scale * g[v];
        }
      }
      for (Index j = 0; j < group; ++j)
        for (Index v = 0; v < kColumnVectors; ++v)
          store(plan.dense_sums + (k0 + j) * plan.sum_stride + first + v * kFloatLanes, acc[j][v]);
    }
  };
  const int parts = team_size(column_blocks, plan.num_threads);
  parallel_for(parts, parts, [&](Index part) {
    const Index begin = column_blocks * part / parts, end = column_blocks * (part + 1) / parts;
    for (Index chunk = 0; chunk < rows; chunk += kRowChunk)
      for (Index block = begin; block < end; ++block)
        add_chunk(block * block_columns, chunk, std::min(rows, chunk + kRowChunk));
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
