// foveal::attention_backward and sliding_window_attention_backward: validation, then the engine's
// backward (detail/flash_backward.hpp, a kernel of the ISA level in use) with the forward's band
// policy.
#include <algorithm>

#include "detail/attention_setup.hpp"
#include "detail/backward_setup.hpp"
#include "detail/kernels.hpp"
#include "foveal/attention/backward.hpp"
#include "foveal/attention/sliding_window.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {
namespace {

// grad_bias has the bias's shape, overlaps nothing the call reads or writes, and comes only
// with a bias.
template <typename T>
void require_bias_gradient(const char* function, const detail::BackwardParams<T>& params,
                           TensorView<const T, 4> bias, TensorView<T, 4> grad_bias) {
  check(!bias.is_null(), function,
        ": grad_bias needs the bias it is the gradient of (bias is "
        "null)");
  const char* dims[4] = {"bias.shape[0]", "bias.shape[1]", "bias.shape[2] (Lq)",
                         "bias.shape[3] (Lk)"};
  detail::require_valid_view(function, "grad_bias", grad_bias);
  for (int d = 0; d < 4; ++d)
    detail::require_extent(function, "grad_bias", grad_bias, d, dims[d], bias.size(d));
  detail::require_no_self_overlap(function, "grad_bias", grad_bias);
  const auto& forward = params.forward;
  const struct {
    const char* name;
    TensorView<const T, 4> view;
  } reads[] = {{"q", forward.q},
               {"k", forward.k},
               {"v", forward.v},
               {"out", params.out},
               {"grad_out", params.grad_out},
               {"bias", bias},
               {"grad_q", params.grad_q},
               {"grad_k", params.grad_k},
               {"grad_v", params.grad_v}};
  for (const auto& entry : reads)
    detail::require_disjoint(function, "grad_bias", grad_bias, entry.name, entry.view);
  detail::require_disjoint(function, "grad_bias", grad_bias, "lse", params.lse);
  if (!params.grad_lse.is_null())
    detail::require_disjoint(function, "grad_bias", grad_bias, "grad_lse", params.grad_lse);
}

template <typename T>
void backward_impl(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                   TensorView<const T, 4> v, TensorView<const T, 4> out, TensorView<const T, 3> lse,
                   TensorView<const T, 4> grad_out, TensorView<T, 4> grad_q,
                   TensorView<T, 4> grad_k, TensorView<T, 4> grad_v,
                   const AttentionOptions& options, TensorView<const T, 4> bias,
                   TensorView<T, 4> grad_bias, TensorView<const T, 3> grad_lse) {
  detail::BackwardParams<T> params =
      detail::prepare_backward<T>(function, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                                  options, bias, grad_lse, /*variable_length=*/true);
  // Variable-length calls: every (batch, kv head) task reads its row's keys, unless the call has
  // neither query rows nor keys (then the backward does nothing).
  const detail::AlignedArray<detail::SequenceKeys> sequences = detail::sequence_keys(
      function, options, params.forward, params.forward.rows_per_head() > 0 || k.size(2) > 0);
  params.forward.sequences = sequences.get();
  if (grad_bias.is_null()) {
    detail::kernels<T>().band_attention_backward(params,
                                                 detail::band_policy(params.forward, options));
    return;
  }
  require_bias_gradient(function, params, bias, grad_bias);
  // The logits' gradient of every (batch, head, query, key): written in place when the bias has
  // the full shape, else into a scratch summed over the broadcast dimensions afterwards.
  const Index batch = q.size(0), heads = q.size(1), len_q = q.size(2), len_k = k.size(2);
  const bool full = bias.size(0) == batch && bias.size(1) == heads;
  Tensor<T, 4> scratch;
  if (full) {
    params.grad_logits = grad_bias;
  } else {
    scratch = Tensor<T, 4>({batch, heads, len_q, len_k});
    params.grad_logits = scratch.view();
  }
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads; ++h)
      for (Index i = 0; i < len_q; ++i)
        std::fill_n(params.grad_logits.address(b, h, i, 0), len_k, T(0));
  detail::kernels<T>().band_attention_backward(params,
                                               detail::band_policy(params.forward, options));
  if (full) return;
  // grad_bias[b', h', i, j] = Σ over the (b, h) it broadcasts to, b outer, h inner.
  for (Index b2 = 0; b2 < grad_bias.size(0); ++b2)
    for (Index h2 = 0; h2 < grad_bias.size(1); ++h2)
      for (Index i = 0; i < len_q; ++i)
        for (Index j = 0; j < len_k; ++j) {
          T sum = 0;
          for (Index b = grad_bias.size(0) == 1 ? 0 : b2;
               b < (grad_bias.size(0) == 1 ? batch : b2 + 1); ++b)
            for (Index h = grad_bias.size(1) == 1 ? 0 : h2;
                 h < (grad_bias.size(1) == 1 ? heads : h2 + 1); ++h)
              sum += scratch.view()(b, h, i, j);
          grad_bias(b2, h2, i, j) = sum;
        }
}

}  // namespace

void attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                        TensorView<const float, 4> v, TensorView<const float, 4> out,
                        TensorView<const float, 3> lse, TensorView<const float, 4> grad_out,
                        TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                        TensorView<float, 4> grad_v, const AttentionOptions& options,
                        TensorView<const float, 4> bias, TensorView<float, 4> grad_bias,
                        TensorView<const float, 3> grad_lse) {
  backward_impl<float>("attention_backward", q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                       options, bias, grad_bias, grad_lse);
}

void attention_backward(TensorView<const double, 4> q, TensorView<const double, 4> k,
                        TensorView<const double, 4> v, TensorView<const double, 4> out,
                        TensorView<const double, 3> lse, TensorView<const double, 4> grad_out,
                        TensorView<double, 4> grad_q, TensorView<double, 4> grad_k,
                        TensorView<double, 4> grad_v, const AttentionOptions& options,
                        TensorView<const double, 4> bias, TensorView<double, 4> grad_bias,
                        TensorView<const double, 3> grad_lse) {
  backward_impl<double>("attention_backward", q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                        options, bias, grad_bias, grad_lse);
}

void sliding_window_attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                       TensorView<const float, 4> v, TensorView<const float, 4> out,
                                       TensorView<const float, 3> lse,
                                       TensorView<const float, 4> grad_out,
                                       TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                                       TensorView<float, 4> grad_v, const AttentionOptions& options,
                                       TensorView<const float, 3> grad_lse) {
  detail::require_bounded_window("sliding_window_attention_backward", options);
  backward_impl<float>("sliding_window_attention_backward", q, k, v, out, lse, grad_out, grad_q,
                       grad_k, grad_v, options, {}, {}, grad_lse);
}

void sliding_window_attention_backward(
    TensorView<const double, 4> q, TensorView<const double, 4> k, TensorView<const double, 4> v,
    TensorView<const double, 4> out, TensorView<const double, 3> lse,
    TensorView<const double, 4> grad_out, TensorView<double, 4> grad_q,
    TensorView<double, 4> grad_k, TensorView<double, 4> grad_v, const AttentionOptions& options,
    TensorView<const double, 3> grad_lse) {
  detail::require_bounded_window("sliding_window_attention_backward", options);
  backward_impl<double>("sliding_window_attention_backward", q, k, v, out, lse, grad_out, grad_q,
                        grad_k, grad_v, options, {}, {}, grad_lse);
}

}  // namespace foveal
