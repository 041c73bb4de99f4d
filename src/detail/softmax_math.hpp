// src/detail/softmax_math.hpp (private) — vectorized exp2 and tanh for the online softmax.
#pragma once

#include <cmath>
#include <limits>

#include "detail/flash_plan.hpp"  // kLog2E
#include "detail/isa.hpp"
#include "detail/simd.hpp"

#if defined(__x86_64__)
#include <immintrin.h>  // outside the region: the intrinsics carry their own target attributes
#endif

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Returns 2^x lane-wise for x <= 0 (the softmax only ever exponentiates x - max): a degree-6
// polynomial on the fraction (relative error 2e-9 in exact arithmetic; evaluated in float, 1.16
// ulp at worst) scaled by 2^round(x). Degree 5 (2.2 ulp) was one FMA cheaper, but its error
// alone put the fp32 output error past twice a plain fp32 softmax's on FlashAttention's grid.
// x <= -160 (and -inf) gives exactly 0, x in (-149, -126) a subnormal, and NaN stays NaN.
// Degree 3 (relative error 1.0e-4, three FMAs fewer) serves probabilities that are rounded to
// bfloat16 (relative error up to 2^-8, 39 times more) before they are used: the AMX tiles'
// softmax (amx_tiles.hpp), where it replaced degree 4 (3e-6) at 5% less time per block.
template <int Degree = 6>
inline Vec<float> exp2_nonpositive(Vec<float> x) {
  static_assert(Degree == 6 || Degree == 3, "the fitted degrees are 3 and 6");
#if FOVEAL_SIMD_BYTES == 64 && defined(__x86_64__)
  // max(-160, x) keeps NaN (vmaxps returns its second operand when one is NaN), and vscalefps
  // inserts the exponent with correct underflow to 0, so no masks or integer tricks are needed.
  // (The all-lanes masked forms avoid GCC 12's false -Wmaybe-uninitialized on the plain ones.)
  const __mmask16 all = static_cast<__mmask16>(0xFFFF);
  const __m512 floor = _mm512_set1_ps(-160.0f);
  const __m512 clamped = _mm512_mask_max_ps(floor, all, floor, (__m512)x);
  const __m512 rounded = _mm512_mask_roundscale_ps(clamped, all, clamped,
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const Vec<float> fraction = (Vec<float>)_mm512_sub_ps(clamped, rounded);  // in [-0.5, 0.5]
#else
  using Bits = SimdTraits<float>::Bits;
  const Vec<float> clamped = x < -127.0f ? splat(-127.0f) : x;
  // Adding 1.5 * 2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
  const Vec<float> shifted = clamped + 12582912.0f;
  const Vec<float> rounded = shifted - 12582912.0f;
  const Vec<float> fraction = clamped - rounded;  // in [-0.5, 0.5]
#endif
  // Minimax-fitted with the constant term pinned to 1, so that 2^0 is exactly 1 (a row that
  // sees a single key copies its value exactly).
  Vec<float> poly;
  if constexpr (Degree == 6) {
    poly = splat(0.00015353361959569156f);
    poly = poly * fraction + 0.0013398875016719103f;
    poly = poly * fraction + 0.00961843691766262f;
    poly = poly * fraction + 0.055503323674201965f;
    poly = poly * fraction + 0.24022647738456726f;
    poly = poly * fraction + 0.6931471824645996f;
  } else {
    poly = splat(0.05500893f);
    poly = poly * fraction + 0.24221097f;
    poly = poly * fraction + 0.6932829f;
  }
  poly = poly * fraction + 1.0f;
#if FOVEAL_SIMD_BYTES == 64 && defined(__x86_64__)
  return (Vec<float>)_mm512_mask_scalef_ps((__m512)poly, all, (__m512)poly, rounded);
#else
  const Bits exponent = ((Bits)shifted - (Bits)splat(12582912.0f)) << 23;
  const Vec<float> result = (Vec<float>)((Bits)poly + exponent);
  const Vec<float> flushed = x < -126.0f ? Vec<float>{} : result;
  return x == x ? flushed : x;  // NaN in, NaN out
#endif
}

// Double lanes go through the C library: the float64 path is for accuracy, not speed.
inline Vec<double> exp2_nonpositive(Vec<double> x) {
  Vec<double> result{};
  for (int lane = 0; lane < kLanes<double>; ++lane) result[lane] = std::exp2(x[lane]);
  return result;
}

// Returns tanh(x) lane-wise. Float: odd Taylor series near 0 (no cancellation), else
// sign(x) * (1 - e) / (1 + e) with e = 2^(-2|x| log2 e); relative error below 4e-7.
inline Vec<float> tanh(Vec<float> x) {
  const Vec<float> magnitude = x < 0.0f ? -x : x;
  const Vec<float> e = exp2_nonpositive(magnitude * static_cast<float>(-2.0 * kLog2E));
  const Vec<float> far = (1.0f - e) / (1.0f + e);
  const Vec<float> x2 = magnitude * magnitude;
  // x - x^3/3 + 2x^5/15 - 17x^7/315, exact to float rounding for |x| < 1/16.
  const Vec<float> near =
      magnitude * (1.0f + x2 * (-1.0f / 3.0f + x2 * (2.0f / 15.0f + x2 * (-17.0f / 315.0f))));
  const Vec<float> value = magnitude < 0.0625f ? near : far;
  return x < 0.0f ? -value : value;
}

inline Vec<double> tanh(Vec<double> x) {
  Vec<double> result{};
  for (int lane = 0; lane < kLanes<double>; ++lane) result[lane] = std::tanh(x[lane]);
  return result;
}

// The lane-wise largest of column[j * stride] over j < count, from -inf up: what a block's
// softmax subtracts. NaN lanes are never taken (vector_max keeps its first argument unless it
// is smaller), and the maximum is exact in any order, so four independent chains give the bits
// of one: they run at the loads' rate instead of one vmaxps latency per key (a quarter of a
// bfloat16 AMX block's time with one chain).
template <typename T>
inline Vec<T> column_max(const T* column, Index count, Index stride) {
  const Vec<T> lowest = splat(-std::numeric_limits<T>::infinity());
  Vec<T> chains[4] = {lowest, lowest, lowest, lowest};
  Index j = 0;
  for (; j + 4 <= count; j += 4) {
    FOVEAL_UNROLL
    for (int u = 0; u < 4; ++u) chains[u] = vector_max(chains[u], load(column + (j + u) * stride));
  }
  for (; j < count; ++j) chains[0] = vector_max(chains[0], load(column + j * stride));
  return vector_max(vector_max(chains[0], chains[1]), vector_max(chains[2], chains[3]));
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
