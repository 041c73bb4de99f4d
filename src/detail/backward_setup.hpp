// Checks and parameter setup shared by the backward entry points (attention_backward,
// sliding_window_attention_backward, sparsek_attention_backward): generic
// code, run before the ISA level's kernel. Internal to the library.
#pragma once

#include "detail/attention_setup.hpp"
#include "detail/flash_plan.hpp"

namespace foveal::detail {

// Checks every argument (q, k, v, out, lse, bias and the options as the forward checks them; the
// gradients' shapes, strides and aliasing) and builds the engine's parameters.
template <typename T>
BackwardParams<T> prepare_backward(const char* function, TensorView<const T, 4> q,
                                   TensorView<const T, 4> k, TensorView<const T, 4> v,
                                   TensorView<const T, 4> out, TensorView<const T, 3> lse,
                                   TensorView<const T, 4> grad_out, TensorView<T, 4> grad_q,
                                   TensorView<T, 4> grad_k, TensorView<T, 4> grad_v,
                                   const AttentionOptions& options, TensorView<const T, 4> bias,
                                   TensorView<const T, 3> grad_lse = {},
                                   bool variable_length = false) {
  check(!lse.is_null(), function, ": lse is required (the forward's, return_lse)");
  BackwardParams<T> params;
  // The forward's checks of q, k, v, bias and the options, with out and lse as the forward
  // returned them (read here, not written).
  params.forward =
      prepare_attention<T, const T>(function, q, k, v, out, options, lse, bias, variable_length);
  params.out = out;
  params.lse = lse;
  params.grad_out = grad_out;
  params.grad_q = grad_q;
  params.grad_k = grad_k;
  params.grad_v = grad_v;

  // Each gradient has the shape of what it is the gradient of; grad_out has out's.
  const struct {
    const char* name;
    TensorView<const T, 4> view;
    TensorView<const T, 4> like;
    const char* dims[4];
  } shapes[] = {
      {"grad_out",
       grad_out,
       out,
       {"out.shape[0] (B)", "out.shape[1] (Hq)", "out.shape[2] (Lq)", "out.shape[3] (Dv)"}},
      {"grad_q",
       grad_q,
       q,
       {"q.shape[0] (B)", "q.shape[1] (Hq)", "q.shape[2] (Lq)", "q.shape[3] (D)"}},
      {"grad_k",
       grad_k,
       k,
       {"k.shape[0] (B)", "k.shape[1] (Hkv)", "k.shape[2] (Lk)", "k.shape[3] (D)"}},
      {"grad_v",
       grad_v,
       v,
       {"v.shape[0] (B)", "v.shape[1] (Hkv)", "v.shape[2] (Lk)", "v.shape[3] (Dv)"}},
  };
  for (const auto& entry : shapes) {
    require_valid_view(function, entry.name, entry.view);
    for (int d = 0; d < 4; ++d)
      require_extent(function, entry.name, entry.view, d, entry.dims[d], entry.like.size(d));
    require_unit_inner_stride(function, entry.name, entry.view);
  }
  // The gradients overlap nothing the call reads, nor each other.
  const struct {
    const char* name;
    TensorView<T, 4> gradient;
  } gradients[] = {{"grad_q", grad_q}, {"grad_k", grad_k}, {"grad_v", grad_v}};
  for (const auto& entry : gradients) {
    require_no_self_overlap(function, entry.name, entry.gradient);
    require_disjoint(function, entry.name, entry.gradient, "q", q);
    require_disjoint(function, entry.name, entry.gradient, "k", k);
    require_disjoint(function, entry.name, entry.gradient, "v", v);
    require_disjoint(function, entry.name, entry.gradient, "out", out);
    require_disjoint(function, entry.name, entry.gradient, "lse", lse);
    require_disjoint(function, entry.name, entry.gradient, "grad_out", grad_out);
    if (!bias.is_null()) require_disjoint(function, entry.name, entry.gradient, "bias", bias);
  }
  if (!grad_lse.is_null()) {
    // Read like lse, one value per query row; the gradients must not overwrite it.
    require_valid_view(function, "grad_lse", grad_lse);
    const char* dims[3] = {"q.shape[0] (B)", "q.shape[1] (Hq)", "q.shape[2] (Lq)"};
    for (int d = 0; d < 3; ++d)
      require_extent(function, "grad_lse", grad_lse, d, dims[d], q.size(d));
    for (const auto& entry : gradients)
      require_disjoint(function, entry.name, entry.gradient, "grad_lse", grad_lse);
    params.grad_lse = grad_lse;
  }
  require_disjoint(function, "grad_q", grad_q, "grad_k", grad_k);
  require_disjoint(function, "grad_q", grad_q, "grad_v", grad_v);
  require_disjoint(function, "grad_k", grad_k, "grad_v", grad_v);
  return params;
}

}  // namespace foveal::detail
