// foveal/core/dtype.hpp — the element types foveal stores and computes in, and their names.
//
// float and double are computed in themselves. bfloat16 and float16 are storage types: the
// kernels read them, compute in float and round what they write back to them (round to
// nearest, ties to even; NaN stays NaN). Values such as lse and the states of merge_states stay
// float for them: compute_type_t<S> names the type of those.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

namespace foveal {

// The 16 high bits of an IEEE float32: 8 exponent bits, 7 mantissa bits (torch.bfloat16).
struct bfloat16 {
  std::uint16_t bits;
};

// IEEE 754 binary16: 5 exponent bits, 10 mantissa bits (torch.float16, numpy.float16).
struct float16 {
  std::uint16_t bits;
};

enum class DType { float32, float64, bfloat16, float16 };

// Thirty-two consecutive values of a row quantized to 8 bits (the element of an 8-bit KV
// cache, KVCache<q8_block>): value i is scale * values[i], symmetric, with one float scale per
// block (a row of D values is ceil(D / 32) blocks; the values past D are 0). Per block rather
// than per row: real keys have a few channels of outliers, and a block confines the coarse
// steps their large scale brings to the 31 values that share it. 36 bytes per 32 values: 3.56x
// fewer than float32.
struct q8_block {
  static constexpr int kValues = 32;
  float scale;
  std::int8_t values[kValues];
};

// Value d of a row of q8_blocks (exact: an 8-bit value times its block's scale).
inline float q8_value(const q8_block* row, std::int64_t d) {
  const q8_block& block = row[d / q8_block::kValues];
  return block.scale * static_cast<float>(block.values[d % q8_block::kValues]);
}

// `count` <= 32 floats as one q8_block: scale = max |x| / 127, values[i] = x[i] / scale rounded
// to nearest (ties to even), the rest 0. A block holding a NaN or an infinity gets a NaN scale
// (every value of it reads back as NaN: NaN in, NaN out); an all-zero block scale 0.
inline q8_block quantize_q8(const float* x, int count) {
  q8_block block{};
  float largest = 0;
  bool finite = true;
  for (int i = 0; i < count; ++i) {
    const float magnitude = std::fabs(x[i]);
    finite = finite && magnitude <= std::numeric_limits<float>::max();  // false for inf, NaN
    largest = magnitude > largest ? magnitude : largest;
  }
  if (!finite) {
    block.scale = std::numeric_limits<float>::quiet_NaN();
    return block;
  }
  if (largest == 0) return block;
  block.scale = largest / 127.0f;  // (0 or subnormal for blocks below ~1e-36: no UB, values ~0)
  // In double: 127 / largest overflows float for subnormal blocks (x * inf would be NaN).
  const double inverse = 127.0 / static_cast<double>(largest);
  for (int i = 0; i < count; ++i) {
    // |x * inverse| <= 127 up to one rounding, which the clamp absorbs.
    double q = std::nearbyint(static_cast<double>(x[i]) * inverse);
    q = q > 127.0 ? 127.0 : (q < -127.0 ? -127.0 : q);
    block.values[i] = static_cast<std::int8_t>(q);
  }
  return block;
}

namespace detail {

inline std::uint32_t float_to_bits(float x) {
  std::uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
}

inline float bits_to_float(std::uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

}  // namespace detail

inline float to_float(bfloat16 x) { return detail::bits_to_float(std::uint32_t{x.bits} << 16); }

inline float to_float(float16 x) {
  const std::uint32_t sign = std::uint32_t{x.bits & 0x8000u} << 16;
  const std::uint32_t exponent = (x.bits >> 10) & 0x1fu;
  const std::uint32_t mantissa = x.bits & 0x3ffu;
  if (exponent == 0x1f) return detail::bits_to_float(sign | 0x7f800000u | (mantissa << 13));
  if (exponent != 0)
    return detail::bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  // Zero or subnormal: mantissa * 2^-24, exact in float.
  const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
  return detail::bits_to_float(sign | detail::float_to_bits(magnitude));
}

// Rounds to the nearest bfloat16, ties to even; NaN stays a (quiet) NaN.
inline bfloat16 to_bfloat16(float x) {
  std::uint32_t bits = detail::float_to_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return {static_cast<std::uint16_t>((bits >> 16) | 0x0040u)};
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return {static_cast<std::uint16_t>(bits >> 16)};
}

// The bfloat16 next to x toward +inf (`up`: the smallest one >= x) or toward -inf (the largest
// one <= x): an upper or lower bound rounded so stays one. NaN stays a (quiet) NaN.
inline bfloat16 to_bfloat16_toward(float x, bool up) {
  const std::uint32_t bits = detail::float_to_bits(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u)
    return {static_cast<std::uint16_t>((bits >> 16) | 0x0040u)};
  auto high = static_cast<std::uint16_t>(bits >> 16);
  // Dropping the low bits moves toward zero; one step away from zero where that is the wrong
  // side (the largest finite float rounds up to infinity).
  const bool negative = (bits >> 31) != 0;
  if ((bits & 0xffffu) != 0 && up != negative) ++high;
  return {high};
}

// Rounds to the nearest float16, ties to even: magnitudes from 65520 on become infinity, those
// below 2^-14 subnormals; NaN stays a (quiet) NaN.
inline float16 to_float16(float x) {
  const std::uint32_t bits = detail::float_to_bits(x);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  std::uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u)
    return {static_cast<std::uint16_t>(sign | 0x7e00u | ((magnitude >> 13) & 0x3ffu))};
  if (magnitude >= 0x477ff000u) return {static_cast<std::uint16_t>(sign | 0x7c00u)};
  if (magnitude >= 0x38800000u) {
    // A normal float16: drop 13 mantissa bits rounding to even, rebias the exponent by 112.
    magnitude += 0xfffu + ((magnitude >> 13) & 1u);
    return {static_cast<std::uint16_t>(sign | ((magnitude - (112u << 23)) >> 13))};
  }
  // A subnormal (or zero): adding 0.5 rounds |x| to a multiple of 2^-24, ties to even, in float
  // arithmetic; the low mantissa bits of the sum are then the float16's mantissa.
  const float rounded = detail::bits_to_float(magnitude) + 0.5f;
  return {static_cast<std::uint16_t>(sign | (detail::float_to_bits(rounded) - 0x3f000000u))};
}

// `x` (a float or double the kernels computed) as an element of the type S foveal stores:
// to_bfloat16 / to_float16 for the 16-bit types (round to nearest even), a plain conversion for
// float and double. The kernels write every output element through it.
template <typename S, typename T>
inline S to_storage(T x) {
  if constexpr (std::is_same_v<S, bfloat16>) {
    return to_bfloat16(static_cast<float>(x));
  } else if constexpr (std::is_same_v<S, float16>) {
    return to_float16(static_cast<float>(x));
  } else {
    return static_cast<S>(x);
  }
}

// The type lse and merge states take next to elements of S: float for the 16-bit types.
template <typename S>
struct compute_type {
  using type = S;
};
template <>
struct compute_type<bfloat16> {
  using type = float;
};
template <>
struct compute_type<float16> {
  using type = float;
};
template <>
struct compute_type<q8_block> {
  using type = float;
};
template <typename S>
using compute_type_t = typename compute_type<std::remove_const_t<S>>::type;

// True for the element types the kernels compute in (float, double).
template <typename T>
inline constexpr bool is_supported_dtype_v =
    std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double>;

// True for the 16-bit storage types.
template <typename T>
inline constexpr bool is_half_dtype_v = std::is_same_v<std::remove_const_t<T>, bfloat16> ||
                                        std::is_same_v<std::remove_const_t<T>, float16>;

namespace detail {

// x in the compute type of its storage type (exact).
template <typename T>
compute_type_t<T> widen(T x) {
  if constexpr (is_half_dtype_v<T>) {
    return to_float(x);
  } else {
    return x;
  }
}

}  // namespace detail

// The DType tag of an element type.
template <typename T>
constexpr DType dtype_of() {
  using U = std::remove_const_t<T>;
  static_assert(is_supported_dtype_v<T> || is_half_dtype_v<T>,
                "foveal stores float, double, bfloat16 and float16");
  if constexpr (std::is_same_v<U, float>) return DType::float32;
  if constexpr (std::is_same_v<U, double>) return DType::float64;
  if constexpr (std::is_same_v<U, bfloat16>) return DType::bfloat16;
  return DType::float16;
}

// "float32", "float64", "bfloat16", "float16", as numpy and torch spell them.
constexpr const char* dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32:
      return "float32";
    case DType::float64:
      return "float64";
    case DType::bfloat16:
      return "bfloat16";
    case DType::float16:
      return "float16";
  }
  return "unknown";
}

}  // namespace foveal
