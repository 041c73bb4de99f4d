// src/detail/simd.hpp (private) — fixed-width vectors through GCC/Clang vector extensions.
//
// The width follows the ISA level being compiled (64 bytes with AVX-512, 32 with AVX2, else 16;
// detail/isa.hpp), so the same kernels compile to the widest registers of each level without
// intrinsics.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <utility>

#include "detail/isa.hpp"

// Fully unrolls the loop that follows: the loops over a micro-kernel's register arrays must
// be unrolled at any optimization level, or the arrays live in memory instead of registers
// (GCC -O2 leaves them rolled: a 5x slower kernel in RelWithDebInfo builds).
#define FOVEAL_UNROLL _Pragma("GCC unroll 64")

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

inline constexpr int kVectorBytes = FOVEAL_SIMD_BYTES;
inline constexpr int kVectorRegisters = FOVEAL_SIMD_REGISTERS;

template <typename T>
struct SimdTraits;

template <>
struct SimdTraits<float> {
  typedef float Vector __attribute__((vector_size(kVectorBytes)));
  typedef std::int32_t Bits __attribute__((vector_size(kVectorBytes)));
};

template <>
struct SimdTraits<double> {
  typedef double Vector __attribute__((vector_size(kVectorBytes)));
  typedef std::int64_t Bits __attribute__((vector_size(kVectorBytes)));
};

template <typename T>
using Vec = typename SimdTraits<T>::Vector;

// Number of T lanes in one vector.
template <typename T>
inline constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));

// Loads kLanes<T> elements from any address.
template <typename T>
inline Vec<T> load(const T* source) {
  Vec<T> vector;
  std::memcpy(&vector, source, sizeof(vector));
  return vector;
}

// Stores kLanes<T> elements to any address.
template <typename T>
inline void store(T* destination, const Vec<T>& vector) {
  std::memcpy(destination, &vector, sizeof(vector));
}

// Every lane set to `value`.
template <typename T>
inline Vec<T> splat(T value) {
  // x - 0 == x for every x (also -0 and NaN), so this folds to a single broadcast; the
  // tempting `Vec{} + x` does not, since 0 + -0 == +0.
  return value - Vec<T>{};
}

// Lane-wise maximum of two vectors of the same type (b where a < b, else a).
template <typename V>
inline V vector_max(const V& a, const V& b) {
  return a < b ? b : a;
}

// The sum of the lanes of `x`, lane 0 first.
template <typename T>
inline T sum_lanes(const Vec<T>& x) {
  T sum = 0;
  for (int lane = 0; lane < kLanes<T>; ++lane) sum += x[lane];
  return sum;
}

// sum_i term(a[i], b[i]) over i < count for a lane-wise term (a product, a bound): kLanes
// partial sums, one per lane, added up at the end (a scalar tail past the last full vector).
// Not the order of a sequential loop, so not its rounding: for estimates, not for results.
template <typename T, typename Term>
inline T lanewise_sum(const T* a, const T* b, std::ptrdiff_t count, Term&& term) {
  constexpr int L = kLanes<T>;
  Vec<T> sums{};
  std::ptrdiff_t i = 0;
  for (; i + L <= count; i += L) sums += term(load(a + i), load(b + i));
  T sum = sum_lanes<T>(sums);
  for (; i < count; ++i) sum += term(a[i], b[i]);
  return sum;
}

// Loads the first `count` (< kLanes<T>) elements from `source`; the other lanes are 0.
template <typename T>
inline Vec<T> load_partial(const T* source, int count) {
  Vec<T> vector{};
  std::memcpy(&vector, source, sizeof(T) * static_cast<std::size_t>(count));
  return vector;
}

namespace simd_detail {

// Source lane of output `lane` in one step of sum_lanes_of_each: u and v each hold
// lanes / group sums of `group` lanes; the output holds twice as many sums of group / 2 lanes,
// u's first. `upper` selects the second half of each group. Indices >= lanes name v's lanes.
constexpr int halving_index(int lanes, int group, int lane, bool upper) {
  const int half = group / 2;
  const int groups_per_vector = lanes / group;
  const int out_group = lane / half;
  return (out_group < groups_per_vector ? 0 : lanes) + (out_group % groups_per_vector) * group +
         lane % half + (upper ? half : 0);
}

template <typename T, int Group, int... Lane>
inline Vec<T> halving_step(const Vec<T>& u, const Vec<T>& v,
                           std::integer_sequence<int, Lane...> /*lanes*/) {
  constexpr int L = kLanes<T>;
#if defined(__clang__)  // Clang spells GCC's __builtin_shuffle with one constant per lane
  return __builtin_shufflevector(u, v, halving_index(L, Group, Lane, false)...) +
         __builtin_shufflevector(u, v, halving_index(L, Group, Lane, true)...);
#else
  using Bits = typename SimdTraits<T>::Bits;
  constexpr Bits lower{halving_index(L, Group, Lane, false)...};
  constexpr Bits upper{halving_index(L, Group, Lane, true)...};
  return __builtin_shuffle(u, v, lower) + __builtin_shuffle(u, v, upper);
#endif
}

template <typename T, int Group>
inline void halve_all(Vec<T>* x) {
  constexpr int count = Group;  // vectors entering this step, each holding kLanes / Group sums
  FOVEAL_UNROLL
  for (int i = 0; i < count / 2; ++i)
    x[i] = halving_step<T, Group>(x[2 * i], x[2 * i + 1],
                                  std::make_integer_sequence<int, kLanes<T>>{});
  if constexpr (Group > 2) halve_all<T, Group / 2>(x);
}

}  // namespace simd_detail

namespace simd_detail {

// Lane j of the transposition step at distance d for the row pair (i, i + d), (i & d) == 0:
// the d x d blocks off the diagonal of each 2d x 2d block trade places.
constexpr int transpose_index(int lanes, int distance, int lane, bool upper) {
  const bool odd = (lane & distance) != 0;
  if (!upper) return odd ? lanes + lane - distance : lane;
  return odd ? lanes + lane : lane + distance;
}

template <typename T, int Distance, int... Lane>
inline void transpose_step(Vec<T>* x, std::integer_sequence<int, Lane...> /*lanes*/) {
  constexpr int L = kLanes<T>;
#if !defined(__clang__)
  using Bits = typename SimdTraits<T>::Bits;
  constexpr Bits lower{transpose_index(L, Distance, Lane, false)...};
  constexpr Bits upper{transpose_index(L, Distance, Lane, true)...};
#endif
  FOVEAL_UNROLL
  for (int i = 0; i < L; ++i) {
    if ((i & Distance) != 0) continue;
    const Vec<T> u = x[i], v = x[i + Distance];
#if defined(__clang__)
    x[i] = __builtin_shufflevector(u, v, transpose_index(L, Distance, Lane, false)...);
    x[i + Distance] = __builtin_shufflevector(u, v, transpose_index(L, Distance, Lane, true)...);
#else
    x[i] = __builtin_shuffle(u, v, lower);
    x[i + Distance] = __builtin_shuffle(u, v, upper);
#endif
  }
  if constexpr (2 * Distance < L)
    transpose_step<T, 2 * Distance>(x, std::make_integer_sequence<int, L>{});
}

}  // namespace simd_detail

// Transposes the kLanes x kLanes matrix whose row r is x[r] in place: lane c of x[r] becomes
// lane r of x[c] (log2(kLanes) rounds of two-vector shuffles).
template <typename T>
inline void transpose(Vec<T> (&x)[kLanes<T>]) {
  simd_detail::transpose_step<T, 1>(x, std::make_integer_sequence<int, kLanes<T>>{});
}

// Returns the vector whose lane i is the sum of the lanes of x[i] (a transposing reduction:
// kLanes - 1 shuffle pairs for kLanes sums instead of log2(kLanes) shuffles per sum).
// Overwrites x.
template <typename T>
inline Vec<T> sum_lanes_of_each(Vec<T> (&x)[kLanes<T>]) {
  if constexpr (kLanes < T >> 1) simd_detail::halve_all<T, kLanes<T>>(x);
  return x[0];
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
