// foveal/detail/simd.hpp — fixed-width vectors through GCC/Clang vector extensions.
//
// The width follows the compile flags (64 bytes with AVX-512, 32 with AVX, else 16), so the
// same kernels compile to the widest registers the target has without intrinsics.
#pragma once

#include <cstdint>
#include <cstring>

namespace foveal::detail {

#if defined(__AVX512F__)
inline constexpr int kVectorBytes = 64;
inline constexpr int kVectorRegisters = 32;
#elif defined(__AVX__)
inline constexpr int kVectorBytes = 32;
inline constexpr int kVectorRegisters = 16;
#elif defined(__x86_64__)
inline constexpr int kVectorBytes = 16;
inline constexpr int kVectorRegisters = 16;
#else
inline constexpr int kVectorBytes = 16;
inline constexpr int kVectorRegisters = 32;  // AArch64 NEON
#endif

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

}  // namespace foveal::detail
