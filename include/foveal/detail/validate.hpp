// foveal/detail/validate.hpp — argument checks shared by every entry point.
//
// Each check throws foveal::Error with "foveal: <function>: <argument> ..." naming what was
// expected and what came, so kernels can trust their input.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// An output view writes each of its elements to a memory location of its own: no two index
// tuples reach the same address (a stride-0 or otherwise self-overlapping view would make
// elements overwrite each other, a silently wrong result). Dimensions sorted by |stride| must
// each step over everything the inner ones reach: |stride| > sum over inner dims of
// (size - 1) * |stride|. Size-1 dimensions are ignored; negative strides are fine. Called by
// require_valid_view for every writable view, after it has bounded the span.
template <typename T, int Rank>
void require_no_self_overlap(const char* function, const char* name,
                             const TensorView<T, Rank>& view) {
  if (view.empty()) return;
  std::array<std::pair<Index, Index>, Rank> dims{};  // (|stride|, size) of dims with size > 1
  int count = 0;
  for (int dim = 0; dim < Rank; ++dim)
    if (view.size(dim) > 1)
      dims[count++] = {view.stride(dim) < 0 ? -view.stride(dim) : view.stride(dim), view.size(dim)};
  for (int i = 1; i < count; ++i)  // insertion sort by |stride| (at most Rank entries)
    for (int j = i; j > 0 && dims[j].first < dims[j - 1].first; --j)
      std::swap(dims[j], dims[j - 1]);
  Index reach = 0;  // the largest offset the inner dimensions reach
  for (int i = 0; i < count; ++i) {
    check(dims[i].first > reach, function, ": ", name,
          " is an output whose elements may overlap each other in memory (a dimension of size ",
          dims[i].second, " has stride ", dims[i].first, ", but must step over the ", reach + 1,
          " elements the dimensions with smaller strides span); pass a tensor with distinct "
          "memory per element, e.g. a contiguous one");
    reach += (dims[i].second - 1) * dims[i].first;
  }
}

// Every extent >= 0 and a non-null pointer whenever there is at least one element; a writable
// view (an output: every non-const view foveal takes is written) must not overlap itself.
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
  if constexpr (!std::is_const_v<T>) require_no_self_overlap(function, name, view);
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
