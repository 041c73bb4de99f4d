// tests/reference/page_bound_reference.hpp — what a KVCache stores as a page bound, given the
// exact minimum or maximum of a page's keys: float64 caches the value itself, the others the
// bfloat16 next to it toward -inf (a minimum) or +inf (a maximum). Written from the definition
// (multiples of the binade's bfloat16 spacing), not from the library's bit manipulation.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>

#include "foveal/core/dtype.hpp"

namespace foveal::reference {

// The bfloat16 next to x toward +inf (`up`) or -inf; infinities, NaN and zero stay.
inline double bfloat16_toward(double x, bool up) {
  if (!std::isfinite(x) || x == 0) return x;
  // bfloat16 has 8 significant bits and float32's exponent range (subnormals from 2^-126 down).
  const int exponent = std::max(std::ilogb(x), -126);
  const double spacing = std::ldexp(1.0, exponent - 7);
  const double rounded = (up ? std::ceil(x / spacing) : std::floor(x / spacing)) * spacing;
  constexpr double kLargest = 3.3895313892515355e38;  // (2 - 2^-7) * 2^127
  if (std::fabs(rounded) > kLargest)
    return std::copysign(std::numeric_limits<double>::infinity(), rounded);
  return rounded;
}

// A stored bound as a double (bfloat16 widens exactly).
inline double bound_value(bfloat16 x) { return to_float(x); }
inline double bound_value(double x) { return x; }

// The stored bound of a cache of element T for the exact extreme x (`up`: a maximum).
template <typename T>
double stored_bound(double x, bool up) {
  if constexpr (std::is_same_v<compute_type_t<T>, double>) {
    return x;
  } else {
    return bfloat16_toward(x, up);
  }
}

}  // namespace foveal::reference
