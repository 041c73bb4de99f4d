// foveal::attention_backward and sliding_window_attention_backward: validation, then the engine's
// backward (detail/flash_backward.hpp, a kernel of the ISA level in use) with the forward's band
// policy.
#include "detail/attention_setup.hpp"
#include "detail/backward_setup.hpp"
#include "detail/kernels.hpp"
#include "foveal/attention/backward.hpp"
#include "foveal/attention/sliding_window.hpp"

namespace foveal {
namespace {

template <typename T>
void backward_impl(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                   TensorView<const T, 4> v, TensorView<const T, 4> out, TensorView<const T, 3> lse,
                   TensorView<const T, 4> grad_out, TensorView<T, 4> grad_q,
                   TensorView<T, 4> grad_k, TensorView<T, 4> grad_v,
                   const AttentionOptions& options, TensorView<const T, 4> bias) {
  const detail::BackwardParams<T> params = detail::prepare_backward<T>(
      function, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, options, bias);
  detail::kernels<T>().band_attention_backward(params,
                                               detail::band_policy(params.forward, options));
}

}  // namespace

void attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                        TensorView<const float, 4> v, TensorView<const float, 4> out,
                        TensorView<const float, 3> lse, TensorView<const float, 4> grad_out,
                        TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                        TensorView<float, 4> grad_v, const AttentionOptions& options,
                        TensorView<const float, 4> bias) {
  backward_impl<float>("attention_backward", q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                       options, bias);
}

void attention_backward(TensorView<const double, 4> q, TensorView<const double, 4> k,
                        TensorView<const double, 4> v, TensorView<const double, 4> out,
                        TensorView<const double, 3> lse, TensorView<const double, 4> grad_out,
                        TensorView<double, 4> grad_q, TensorView<double, 4> grad_k,
                        TensorView<double, 4> grad_v, const AttentionOptions& options,
                        TensorView<const double, 4> bias) {
  backward_impl<double>("attention_backward", q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                        options, bias);
}

void sliding_window_attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                       TensorView<const float, 4> v, TensorView<const float, 4> out,
                                       TensorView<const float, 3> lse,
                                       TensorView<const float, 4> grad_out,
                                       TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                                       TensorView<float, 4> grad_v,
                                       const AttentionOptions& options) {
  detail::require_bounded_window("sliding_window_attention_backward", options);
  backward_impl<float>("sliding_window_attention_backward", q, k, v, out, lse, grad_out, grad_q,
                       grad_k, grad_v, options, {});
}

void sliding_window_attention_backward(
    TensorView<const double, 4> q, TensorView<const double, 4> k, TensorView<const double, 4> v,
    TensorView<const double, 4> out, TensorView<const double, 3> lse,
    TensorView<const double, 4> grad_out, TensorView<double, 4> grad_q,
    TensorView<double, 4> grad_k, TensorView<double, 4> grad_v, const AttentionOptions& options) {
  detail::require_bounded_window("sliding_window_attention_backward", options);
  backward_impl<double>("sliding_window_attention_backward", q, k, v, out, lse, grad_out, grad_q,
                        grad_k, grad_v, options, {});
}

}  // namespace foveal
