// src/detail/convert.hpp (private) — loads of stored elements (float, double, bfloat16,
// float16) as vectors of their compute type, and the conversions back.
//
// bfloat16 widens by a shift (the 16 high bits of a float); float16 uses F16C's vcvtph2ps where
// the level has it (AVX2 and up) and a scalar conversion otherwise.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "detail/isa.hpp"
#include "detail/simd.hpp"
#include "foveal/core/dtype.hpp"

// F16C's conversions: every level of 32 bytes and up lists f16c among its target features; a
// native build has them when the compiler says so.
#if (defined(__x86_64__) || defined(__i386__)) && FOVEAL_SIMD_BYTES >= 32 && \
    ((defined(FOVEAL_LEVEL_VECTOR_BYTES) && FOVEAL_LEVEL_VECTOR_BYTES > 0) || defined(__F16C__))
#define FOVEAL_HAS_F16C 1
#else
#define FOVEAL_HAS_F16C 0
#endif

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// A stored element as its compute type.
template <typename T>
inline T to_compute(T x) {
  return x;
}
inline float to_compute(bfloat16 x) { return to_float(x); }
inline float to_compute(float16 x) { return to_float(x); }

// A computed value rounded to the storage type S (foveal::to_storage, the public spelling).
template <typename S, typename T>
inline S from_compute(T x) {
  return to_storage<S>(x);
}

namespace convert_detail {

typedef std::uint16_t HalfBits __attribute__((vector_size(kVectorBytes / 2)));
typedef std::uint32_t WordBits __attribute__((vector_size(kVectorBytes)));

inline Vec<float> widen_bfloat16(const HalfBits& half) {
  const WordBits words = __builtin_convertvector(half, WordBits) << 16;
  Vec<float> vector;
  std::memcpy(&vector, &words, sizeof(vector));
  return vector;
}

inline Vec<float> widen_float16(const std::uint16_t* source) {
#if FOVEAL_HAS_F16C && FOVEAL_SIMD_BYTES == 64
  // The masked form: GCC 12's unmasked _mm512_cvtph_ps reads an undefined register (a
  // -Wmaybe-uninitialized warning); with every lane selected it is the same instruction.
  return reinterpret_cast<Vec<float>>(
      _mm512_maskz_cvtph_ps(static_cast<__mmask16>(0xffff),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source))));
#elif FOVEAL_HAS_F16C && FOVEAL_SIMD_BYTES == 32
  return reinterpret_cast<Vec<float>>(
      _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(source))));
#else
  Vec<float> vector;
  for (int lane = 0; lane < kLanes<float>; ++lane) vector[lane] = to_float(float16{source[lane]});
  return vector;
#endif
}

// kLanes<float> int8 values as floats: one sign-extending load and one conversion where the
// level has them (GCC 12 scalarizes __builtin_convertvector from 8-bit lanes: 16 scalar
// conversions per vector, slower than reading float32).
inline Vec<float> widen_int8(const std::int8_t* source) {
#if (defined(__x86_64__) || defined(__i386__)) && FOVEAL_SIMD_BYTES == 64
  // The masked forms, every lane selected (as widen_float16: GCC 12's unmasked ones read an
  // undefined register).
  const auto all = static_cast<__mmask16>(0xffff);
  return reinterpret_cast<Vec<float>>(_mm512_maskz_cvtepi32_ps(
      all,
      _mm512_maskz_cvtepi8_epi32(all, _mm_loadu_si128(reinterpret_cast<const __m128i*>(source)))));
#elif (defined(__x86_64__) || defined(__i386__)) && FOVEAL_SIMD_BYTES == 32 && \
    ((defined(FOVEAL_LEVEL_VECTOR_BYTES) && FOVEAL_LEVEL_VECTOR_BYTES > 0) || defined(__AVX2__))
  return reinterpret_cast<Vec<float>>(_mm256_cvtepi32_ps(
      _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(source)))));
#elif (defined(__x86_64__) || defined(__i386__)) && FOVEAL_SIMD_BYTES == 16 && defined(__SSE4_1__)
  std::int32_t bits;
  std::memcpy(&bits, source, sizeof(bits));
  return reinterpret_cast<Vec<float>>(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_cvtsi32_si128(bits))));
#else
  Vec<float> vector;
  for (int lane = 0; lane < kLanes<float>; ++lane) vector[lane] = static_cast<float>(source[lane]);
  return vector;
#endif
}

}  // namespace convert_detail

// kLanes<T> elements from any address, as a vector of T = compute_type_t<S>.
template <typename T, typename S>
inline Vec<T> load_as(const S* source) {
  if constexpr (std::is_same_v<S, T>) {
    return load(source);
  } else if constexpr (std::is_same_v<S, bfloat16>) {
#if (defined(__x86_64__) || defined(__i386__)) && FOVEAL_SIMD_BYTES == 64
    // One zero-extending load and one shift (GCC 12 splits __builtin_convertvector's widening
    // into two halves, an extract and an insert: five instructions per vector).
    const __m512i words =
        _mm512_maskz_cvtepu16_epi32(static_cast<__mmask16>(0xffff),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source)));
    return reinterpret_cast<Vec<float>>(
        _mm512_maskz_slli_epi32(static_cast<__mmask16>(0xffff), words, 16));
#else
    convert_detail::HalfBits half;
    std::memcpy(&half, source, sizeof(half));
    return convert_detail::widen_bfloat16(half);
#endif
  } else {
    static_assert(std::is_same_v<S, float16>, "a stored type of foveal");
    std::uint16_t bits[kLanes<float>];
    std::memcpy(bits, source, sizeof(bits));
    return convert_detail::widen_float16(bits);
  }
}

// The first `count` (< kLanes<T>) elements from `source`; the other lanes are 0.
template <typename T, typename S>
inline Vec<T> load_partial_as(const S* source, int count) {
  if constexpr (std::is_same_v<S, T>) {
    return load_partial(source, count);
  } else {
    S padded[kLanes<T>] = {};
    std::memcpy(padded, source, sizeof(S) * static_cast<std::size_t>(count));
    return load_as<T>(padded);
  }
}

// Rows of stored values, as the engine reads K and V: a row of S is S[0 .. count), a row of
// q8_block is ceil(count / 32) blocks (value d is block d / 32's scale times its value d % 32).

// Lanes [d, d + kLanes<T>) of a row, d a multiple of kLanes<T> (which divides 32, so the lanes of
// a q8_block row lie in one block: one load, one conversion and one multiply by its scale).
template <typename T, typename S>
inline Vec<T> load_row(const S* row, Index d) {
  if constexpr (std::is_same_v<S, q8_block>) {
    static_assert(std::is_same_v<T, float> && q8_block::kValues % kLanes<float> == 0,
                  "q8_block rows are read as whole float vectors inside one block");
    const q8_block& block = row[d / q8_block::kValues];
    return convert_detail::widen_int8(block.values + d % q8_block::kValues) * splat(block.scale);
  } else {
    return load_as<T>(row + d);
  }
}

// Value d of a row as T.
template <typename T, typename S>
inline T row_value(const S* row, Index d) {
  if constexpr (std::is_same_v<S, q8_block>) {
    return q8_value(row, d);
  } else {
    return to_compute(row[d]);
  }
}

// to[0 .. count) = the row's values [0 .. count) as T.
template <typename T, typename S>
inline void convert_row(const S* from, Index count, T* to) {
  constexpr int L = kLanes<T>;
  Index i = 0;
  for (; i + L <= count; i += L) store(to + i, load_row<T>(from, i));
  for (; i < count; ++i) to[i] = row_value<T>(from, i);
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
