// foveal/core/dtype.hpp — the element types foveal computes in, and their names.
#pragma once

#include <type_traits>

namespace foveal {

enum class DType { float32, float64 };

// True for the element types the kernels are instantiated for.
template <typename T>
inline constexpr bool is_supported_dtype_v =
    std::is_same_v<std::remove_const_t<T>, float> || std::is_same_v<std::remove_const_t<T>, double>;

// The DType tag of a supported element type.
template <typename T>
constexpr DType dtype_of() {
  static_assert(is_supported_dtype_v<T>, "foveal computes in float and double");
  return std::is_same_v<std::remove_const_t<T>, float> ? DType::float32 : DType::float64;
}

// "float32" / "float64", as numpy and torch spell them.
constexpr const char* dtype_name(DType dtype) {
  return dtype == DType::float32 ? "float32" : "float64";
}

}  // namespace foveal
