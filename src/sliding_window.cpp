// foveal::sliding_window_attention: the band policy of the shared engine.
#include "foveal/attention/sliding_window.hpp"

#include "detail/attention_setup.hpp"

namespace foveal {
namespace detail {

void require_bounded_window(const char* function, const AttentionOptions& options) {
  require_window(function, "window_left", options.window_left);
  check(options.window_left >= 0, function,
        ": window_left must be >= 0 (keys before the query that are visible), got ",
        options.window_left, "; for unbounded attention call foveal::attention");
  check(options.causal || options.window_right >= 0, function,
        ": the window's right side must be bounded: set causal = true or window_right >= 0, got "
        "causal = false and window_right = ",
        options.window_right);
}

}  // namespace detail

namespace {

constexpr const char* kFunction = "sliding_window_attention";

template <typename T>
void sliding_window_impl(TensorView<const T, 4> q, TensorView<const T, 4> k,
                         TensorView<const T, 4> v, TensorView<T, 4> out,
                         const AttentionOptions& options, TensorView<compute_type_t<T>, 3> lse) {
  detail::require_bounded_window(kFunction, options);
  const auto params = detail::prepare_attention<T>(kFunction, q, k, v, out, options, lse, {},
                                                   /*variable_length=*/true);
  detail::run_band_attention(kFunction, params, options);
}

}  // namespace

void sliding_window_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                              TensorView<const float, 4> v, TensorView<float, 4> out,
                              const AttentionOptions& options, TensorView<float, 3> lse) {
  sliding_window_impl<float>(q, k, v, out, options, lse);
}

void sliding_window_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                              TensorView<const double, 4> v, TensorView<double, 4> out,
                              const AttentionOptions& options, TensorView<double, 3> lse) {
  sliding_window_impl<double>(q, k, v, out, options, lse);
}

void sliding_window_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                              TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                              const AttentionOptions& options, TensorView<float, 3> lse) {
  sliding_window_impl<bfloat16>(q, k, v, out, options, lse);
}

void sliding_window_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                              TensorView<const float16, 4> v, TensorView<float16, 4> out,
                              const AttentionOptions& options, TensorView<float, 3> lse) {
  sliding_window_impl<float16>(q, k, v, out, options, lse);
}

}  // namespace foveal
