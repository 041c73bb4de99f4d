// sparsek_attention_backward: validation and the plan (generic code), then the ISA level's
// kernel (src/kernels/sparsek_backward.hpp, which describes the algorithm; docs/sparsek.md,
// "Backward"). Nothing depends on the thread count, so results are bitwise identical for any of
// them.
#include "foveal/sparsek/backward.hpp"

#include <algorithm>
#include <cmath>

#include "detail/attention_setup.hpp"
#include "detail/backward_setup.hpp"
#include "detail/kernels.hpp"
#include "detail/sparsek_selection.hpp"

namespace foveal {
namespace {

constexpr const char* kBackward = "sparsek_attention_backward";

using detail::SparseKGeometry;

template <typename T>
void require_finite_grad_out(const TensorView<const T, 4>& grad_out) {
  if (grad_out.empty()) return;
  for (Index b = 0; b < grad_out.size(0); ++b)
    for (Index h = 0; h < grad_out.size(1); ++h)
      for (Index i = 0; i < grad_out.size(2); ++i) {
        const T* row = grad_out.address(b, h, i, 0);
        for (Index d = 0; d < grad_out.size(3); ++d)
          check(std::isfinite(row[d]), kBackward, ": grad_out[", b, ", ", h, ", ", i, ", ", d,
                "] must be finite, got ", row[d]);
      }
}

// The backward of validated parameters (query 0 at params.forward.q_offset, any value).
template <typename T>
void run_backward(const detail::BackwardParams<T>& params, TensorView<const T, 3> u,
                  TensorView<T, 3> grad_u, const SparseKOptions& options) {
  const auto& forward = params.forward;
  const Index len_q = forward.q.size(2), len_k = forward.k.size(2);
  detail::SparseKBackwardPlan<T> plan;
  plan.params = params;
  plan.u = u;
  plan.grad_u = grad_u;
  plan.gate = options.gate;
  plan.geometry = SparseKGeometry::make(options, len_q, len_k, forward.q_offset);
  detail::kernels<T>().sparsek_attention_backward(plan);
}

template <typename T>
void backward_impl(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                   TensorView<const T, 3> u, TensorView<const T, 4> out, TensorView<const T, 3> lse,
                   TensorView<const T, 4> grad_out, const SparseKOptions& options,
                   TensorView<T, 4> grad_q, TensorView<T, 4> grad_k, TensorView<T, 4> grad_v,
                   TensorView<T, 3> grad_u) {
  detail::require_sparsek_options(kBackward, options, /*variable_length=*/true);
  const detail::BackwardParams<T> params =
      detail::prepare_backward<T>(kBackward, q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                                  options, {}, {}, /*variable_length=*/true);
  const Index batch = q.size(0), heads_kv = k.size(1), len_k = k.size(2);
  detail::require_scores(kBackward, u, batch, heads_kv, len_k);
  detail::require_disjoint(kBackward, "grad_q", grad_q, "u", u);
  detail::require_disjoint(kBackward, "grad_k", grad_k, "u", u);
  detail::require_disjoint(kBackward, "grad_v", grad_v, "u", u);
  if (!grad_u.is_null()) {
    detail::require_valid_view(kBackward, "grad_u", grad_u);
    detail::require_extent(kBackward, "grad_u", grad_u, 0, "u.shape[0] (B)", batch);
    detail::require_extent(kBackward, "grad_u", grad_u, 1, "u.shape[1] (Hkv)", heads_kv);
    detail::require_extent(kBackward, "grad_u", grad_u, 2, "u.shape[2] (Lk)", len_k);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "q", q);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "k", k);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "v", v);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "u", u);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "out", out);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "lse", lse);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "grad_out", grad_out);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "grad_q", grad_q);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "grad_k", grad_k);
    detail::require_disjoint(kBackward, "grad_u", grad_u, "grad_v", grad_v);
  }
  require_finite_grad_out(grad_out);
  const detail::AlignedArray<detail::SequenceKeys> sequences = detail::sequence_keys(
      kBackward, options, params.forward, params.forward.rows_per_head() > 0 || len_k > 0);
  if (batch == 0 || heads_kv == 0) return;
  if (sequences == nullptr) {
    run_backward(params, u, grad_u, options);
    return;
  }
  // A variable-length batch: each row is the backward of the call on its own keys; the padding
  // keys get zero gradients.
  using detail::narrow;
  using detail::row_keys;
  for (Index b = 0; b < batch; ++b) {
    const detail::SequenceKeys& row = sequences[static_cast<std::size_t>(b)];
    const Index first = row.first_row, count = row.visibility.len_k;
    detail::BackwardParams<T> own = params;
    own.forward = detail::row_params(params.forward, b, row);
    own.out = narrow(params.out, 0, b, 1);
    own.lse = narrow(params.lse, 0, b, 1);
    own.grad_out = narrow(params.grad_out, 0, b, 1);
    own.grad_q = narrow(params.grad_q, 0, b, 1);
    own.grad_k = row_keys(params.grad_k, b, row);
    own.grad_v = row_keys(params.grad_v, b, row);
    for (Index h = 0; h < heads_kv; ++h)
      for (Index j = 0; j < len_k; ++j) {
        if (j >= first && j < first + count) continue;
        std::fill_n(grad_k.address(b, h, j, 0), grad_k.size(3), T(0));
        std::fill_n(grad_v.address(b, h, j, 0), grad_v.size(3), T(0));
        if (!grad_u.is_null()) grad_u(b, h, j) = 0;
      }
    run_backward(own, row_keys(u, b, row), row_keys(grad_u, b, row), options);
  }
}

}  // namespace

void sparsek_attention_backward(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                TensorView<const float, 4> v, TensorView<const float, 3> u,
                                TensorView<const float, 4> out, TensorView<const float, 3> lse,
                                TensorView<const float, 4> grad_out, const SparseKOptions& options,
                                TensorView<float, 4> grad_q, TensorView<float, 4> grad_k,
                                TensorView<float, 4> grad_v, TensorView<float, 3> grad_u) {
  backward_impl<float>(q, k, v, u, out, lse, grad_out, options, grad_q, grad_k, grad_v, grad_u);
}

void sparsek_attention_backward(TensorView<const double, 4> q, TensorView<const double, 4> k,
                                TensorView<const double, 4> v, TensorView<const double, 3> u,
                                TensorView<const double, 4> out, TensorView<const double, 3> lse,
                                TensorView<const double, 4> grad_out, const SparseKOptions& options,
                                TensorView<double, 4> grad_q, TensorView<double, 4> grad_k,
                                TensorView<double, 4> grad_v, TensorView<double, 3> grad_u) {
  backward_impl<double>(q, k, v, u, out, lse, grad_out, options, grad_q, grad_k, grad_v, grad_u);
}

}  // namespace foveal
