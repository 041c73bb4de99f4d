// src/detail/merge_math.hpp (private) — the log-sum-exp merge of attention states, one row at a
// time.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "detail/convert.hpp"
#include "detail/isa.hpp"
#include "detail/simd.hpp"
#include "foveal/core/tensor.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Merges `count` states (outs[c][0..dim_v), lses[c]) of one query row, in order c = 0, 1, ...:
// out = sum_c w_c outs[c] / sum_c w_c, w_c = e^(lses[c] - max lse), lse = max + log sum_c w_c;
// all -inf (or count = 0) gives out = 0, lse = -inf; a NaN lse (a state that met a NaN in q, k
// or v) gives out = NaN, lse = NaN: NaN in, NaN out, as in one pass of attention over all the
// keys (std::max alone would drop it). `out` may be one of outs (each element is
// written after every state's element is read). `weights` is scratch for count values; lse may
// be null. out is T or a storage type S of T (rounded as it is written).
template <typename T, typename S = T>
void merge_state_row(Index count, const T* const* outs, const T* lses, Index dim_v, T* weights,
                     S* out, T* lse) {
  constexpr int L = kLanes<T>;
  const T negative_infinity = -std::numeric_limits<T>::infinity();
  T max = negative_infinity;
  for (Index c = 0; c < count; ++c) {
    if (std::isnan(lses[c])) {
      std::fill(out, out + dim_v, from_compute<S>(std::numeric_limits<T>::quiet_NaN()));
      if (lse != nullptr) *lse = std::numeric_limits<T>::quiet_NaN();
      return;
    }
    max = std::max(max, lses[c]);
  }
  if (max == negative_infinity) {
    std::fill(out, out + dim_v, from_compute<S>(T(0)));
    if (lse != nullptr) *lse = negative_infinity;
    return;
  }
  T total = 0;
  for (Index c = 0; c < count; ++c) {
    weights[c] = std::exp(lses[c] - max);
    total += weights[c];
  }
  const T inverse = T(1) / total;
  for (Index c = 0; c < count; ++c) weights[c] *= inverse;
  Index d = 0;
  for (; d + L <= dim_v; d += L) {
    Vec<T> sum{};
    for (Index c = 0; c < count; ++c) sum += splat(weights[c]) * load(outs[c] + d);
    if constexpr (std::is_same_v<S, T>) {
      store(out + d, sum);
    } else {
      for (int lane = 0; lane < L; ++lane) out[d + lane] = from_compute<S>(sum[lane]);
    }
  }
  for (; d < dim_v; ++d) {
    T sum = 0;
    for (Index c = 0; c < count; ++c) sum += weights[c] * outs[c][d];
    out[d] = from_compute<S>(sum);
  }
  if (lse != nullptr) *lse = max + std::log(total);
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
