// foveal::merge_states: validation, then merge_state_row over every query row.
#include "foveal/attention/merge.hpp"

#include <cmath>

#include "detail/kernels.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {
namespace {

constexpr const char* kFunction = "merge_states";

// The same view (in place) or no overlap at all.
template <typename A, typename B, int Rank>
void require_same_or_disjoint(const char* written_name, const TensorView<A, Rank>& written,
                              const char* read_name, const TensorView<B, Rank>& read) {
  const bool same =
      static_cast<const void*>(written.data()) == static_cast<const void*>(read.data()) &&
      written.shape() == read.shape() && written.strides() == read.strides();
  if (!same) detail::require_disjoint(kFunction, written_name, written, read_name, read);
}

// Every lse is finite or -inf: NaN or +inf would turn the whole merge into NaN silently.
template <typename T>
void require_valid_lse(const char* name, const TensorView<const T, 3>& lse) {
  if (lse.empty()) return;  // no loop over a huge extent of an empty view
  for (Index b = 0; b < lse.size(0); ++b)
    for (Index h = 0; h < lse.size(1); ++h)
      for (Index i = 0; i < lse.size(2); ++i) {
        const T value = lse(b, h, i);
        check(!(value == std::numeric_limits<T>::infinity()), kFunction, ": ", name, "[", b, ", ",
              h, ", ", i, "] = ", value,
              "; a log-sum-exp must be finite, -inf (a state without keys) or NaN (a state that "
              "met a NaN: the merged row is NaN)");
      }
}

template <typename T>
void merge_impl(TensorView<const T, 4> out_a, TensorView<const T, 3> lse_a,
                TensorView<const T, 4> out_b, TensorView<const T, 3> lse_b, TensorView<T, 4> out,
                TensorView<T, 3> lse, int num_threads) {
  using detail::require_extent;
  detail::require_valid_view(kFunction, "out_a", out_a);
  detail::require_valid_view(kFunction, "lse_a", lse_a);
  detail::require_valid_view(kFunction, "out_b", out_b);
  detail::require_valid_view(kFunction, "lse_b", lse_b);
  detail::require_valid_view(kFunction, "out", out);
  const char* dim_names[] = {"out_a.shape[0] (B)", "out_a.shape[1] (H)", "out_a.shape[2] (L)",
                             "out_a.shape[3] (Dv)"};
  for (int dim = 0; dim < 4; ++dim) {
    require_extent(kFunction, "out_b", out_b, dim, dim_names[dim], out_a.size(dim));
    require_extent(kFunction, "out", out, dim, dim_names[dim], out_a.size(dim));
  }
  for (int dim = 0; dim < 3; ++dim) {
    require_extent(kFunction, "lse_a", lse_a, dim, dim_names[dim], out_a.size(dim));
    require_extent(kFunction, "lse_b", lse_b, dim, dim_names[dim], out_a.size(dim));
  }
  detail::require_unit_inner_stride(kFunction, "out_a", out_a);
  detail::require_unit_inner_stride(kFunction, "out_b", out_b);
  detail::require_unit_inner_stride(kFunction, "out", out);
  require_same_or_disjoint("out", out, "out_a", out_a);
  require_same_or_disjoint("out", out, "out_b", out_b);
  detail::require_disjoint(kFunction, "out", out, "lse_a", lse_a);
  detail::require_disjoint(kFunction, "out", out, "lse_b", lse_b);
  if (!lse.is_null()) {
    detail::require_valid_view(kFunction, "lse", lse);
    for (int dim = 0; dim < 3; ++dim)
      require_extent(kFunction, "lse", lse, dim, dim_names[dim], out_a.size(dim));
    require_same_or_disjoint("lse", lse, "lse_a", lse_a);
    require_same_or_disjoint("lse", lse, "lse_b", lse_b);
    detail::require_disjoint(kFunction, "lse", lse, "out_a", out_a);
    detail::require_disjoint(kFunction, "lse", lse, "out_b", out_b);
    detail::require_disjoint(kFunction, "lse", lse, "out", out);
  }
  detail::require_num_threads(kFunction, num_threads);
  require_valid_lse("lse_a", lse_a);
  require_valid_lse("lse_b", lse_b);

  detail::kernels<T>().merge_states(
      {out_a, out_b, lse_a, lse_b, out, lse, detail::resolve_num_threads(num_threads)});
}

}  // namespace

void merge_states(TensorView<const float, 4> out_a, TensorView<const float, 3> lse_a,
                  TensorView<const float, 4> out_b, TensorView<const float, 3> lse_b,
                  TensorView<float, 4> out, TensorView<float, 3> lse, int num_threads) {
  merge_impl<float>(out_a, lse_a, out_b, lse_b, out, lse, num_threads);
}

void merge_states(TensorView<const double, 4> out_a, TensorView<const double, 3> lse_a,
                  TensorView<const double, 4> out_b, TensorView<const double, 3> lse_b,
                  TensorView<double, 4> out, TensorView<double, 3> lse, int num_threads) {
  merge_impl<double>(out_a, lse_a, out_b, lse_b, out, lse, num_threads);
}

}  // namespace foveal
