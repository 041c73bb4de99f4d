// src/detail/with_count.hpp (private) — picking a compile-time size for a run-time count.
#pragma once

#include <type_traits>

#include "detail/isa.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Calls body(std::integral_constant<int, N>{}) with N = count, for a run-time count in
// [1, Max]: how a micro-kernel of compile-time size is picked for a partial tile.
template <int Max, typename Body>
inline void with_count(int count, Body&& body) {
  if constexpr (Max > 1) {
    if (count < Max) return with_count<Max - 1>(count, body);
  }
  body(std::integral_constant<int, Max>{});
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
