// foveal/detail/validate.hpp — argument checks shared by every entry point.
//
// Each check throws foveal::Error with "foveal: <function>: <argument> ..." naming what was
// expected and what came, so kernels can trust their input.
#pragma once

#include <cmath>
#include <limits>
#include <string>

#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// Every extent >= 0 and a non-null pointer whenever there is at least one element.
template <typename T, int Rank>
void require_valid_view(const char* function, const char* name, const TensorView<T, Rank>& view) {
  for (int dim = 0; dim < Rank; ++dim)
    check(view.size(dim) >= 0, function, ": ", name, ".shape[", dim, "] must be >= 0, got ",
          view.size(dim));
  // The element count and the span of the strides must fit in an Index (in bytes), so that
  // no later index arithmetic can overflow.
  Index count = 1;
  Index span = 0;
  bool overflow = false;
  for (int dim = 0; dim < Rank; ++dim) {
    overflow |= __builtin_mul_overflow(count, view.size(dim), &count);
    if (view.size(dim) <= 1) continue;
    const Index stride = view.stride(dim);
    Index term = 0;
    overflow |= stride == std::numeric_limits<Index>::min() ||
                __builtin_mul_overflow(view.size(dim) - 1, stride < 0 ? -stride : stride, &term) ||
                __builtin_add_overflow(span, term, &span);
  }
  check(!overflow && span <= std::numeric_limits<Index>::max() / static_cast<Index>(sizeof(T)),
        function, ": ", name,
        "'s shape and strides reach beyond what a 64-bit byte offset can address");
  check(view.data() != nullptr || view.empty(), function, ": ", name, " has ", view.numel(),
        " elements but its data pointer is null");
}

// The last dimension is contiguous (stride 1) unless it has at most one element or the view
// is empty (numpy gives empty arrays all-zero strides).
template <typename T, int Rank>
void require_unit_inner_stride(const char* function, const char* name,
                               const TensorView<T, Rank>& view) {
  check(view.size(Rank - 1) <= 1 || view.empty() || view.stride(Rank - 1) == 1, function, ": ",
        name, " must have stride 1 in its last dimension, got stride ", view.stride(Rank - 1),
        " (make that dimension contiguous; other dimensions may have any stride)");
}

// view.shape[dim] == expected, where `expected_name` says where the expectation comes from.
template <typename T, int Rank>
void require_extent(const char* function, const char* name, const TensorView<T, Rank>& view,
                    int dim, const std::string& expected_name, Index expected) {
  check(view.size(dim) == expected, function, ": ", name, ".shape[", dim, "] must equal ",
        expected_name, " = ", expected, ", got ", view.size(dim));
}

// The memory `written` may touch does not overlap the memory `read` may touch.
template <typename A, int RankA, typename B, int RankB>
void require_disjoint(const char* function, const char* written_name,
                      const TensorView<A, RankA>& written, const char* read_name,
                      const TensorView<B, RankB>& read) {
  check(!byte_range(written).overlaps(byte_range(read)), function, ": ", written_name,
        " must not overlap ", read_name, " in memory");
}

// A finite, non-negative scalar option.
inline void require_finite_nonnegative(const char* function, const char* name, double value,
                                       const char* meaning) {
  check(std::isfinite(value) && value >= 0, function, ": ", name, " must be finite and >= 0 (",
        meaning, "), got ", value);
}

// A window bound: >= 0, or -1 for unbounded.
inline void require_window(const char* function, const char* name, Index value) {
  check(value >= -1, function, ": ", name, " must be >= 0 or -1 (unbounded), got ", value);
}

}  // namespace foveal::detail
