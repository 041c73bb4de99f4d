// foveal::attention: validation, then the flash engine with the band policy.
#include "detail/attention_setup.hpp"
#include "foveal/attention/dense.hpp"

namespace foveal {
namespace {

template <typename T>
void attention_impl(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                    TensorView<T, 4> out, const AttentionOptions& options,
                    TensorView<compute_type_t<T>, 3> lse, TensorView<const T, 4> bias) {
  const auto params = detail::prepare_attention<T>("attention", q, k, v, out, options, lse, bias,
                                                   /*variable_length=*/true);
  detail::run_band_attention("attention", params, options);
}

}  // namespace

void attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
               TensorView<const float, 4> v, TensorView<float, 4> out,
               const AttentionOptions& options, TensorView<float, 3> lse,
               TensorView<const float, 4> bias) {
  attention_impl<float>(q, k, v, out, options, lse, bias);
}

void attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
               TensorView<const double, 4> v, TensorView<double, 4> out,
               const AttentionOptions& options, TensorView<double, 3> lse,
               TensorView<const double, 4> bias) {
  attention_impl<double>(q, k, v, out, options, lse, bias);
}

void attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
               TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
               const AttentionOptions& options, TensorView<float, 3> lse,
               TensorView<const bfloat16, 4> bias) {
  attention_impl<bfloat16>(q, k, v, out, options, lse, bias);
}

void attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
               TensorView<const float16, 4> v, TensorView<float16, 4> out,
               const AttentionOptions& options, TensorView<float, 3> lse,
               TensorView<const float16, 4> bias) {
  attention_impl<float16>(q, k, v, out, options, lse, bias);
}

}  // namespace foveal
