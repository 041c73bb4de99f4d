// foveal::attention: validation, then the flash engine with the band policy.
#include <cmath>

#include "foveal/attention/dense.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/detail/flash_engine.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {
namespace {

constexpr const char* kFunction = "attention";

template <typename T>
void attention_impl(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                    TensorView<T, 4> out, const AttentionOptions& options, TensorView<T, 3> lse,
                    TensorView<const T, 4> bias) {
  using detail::require_extent;
  detail::require_valid_view(kFunction, "q", q);
  detail::require_valid_view(kFunction, "k", k);
  detail::require_valid_view(kFunction, "v", v);
  detail::require_valid_view(kFunction, "out", out);
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = k.size(1), len_k = k.size(2), dim_v = v.size(3);
  check(dim >= 1, kFunction, ": q.shape[3] (D) must be >= 1, got ", dim);
  require_extent(kFunction, "k", k, 0, "q.shape[0] (B)", batch);
  require_extent(kFunction, "k", k, 3, "q.shape[3] (D)", dim);
  require_extent(kFunction, "v", v, 0, "q.shape[0] (B)", batch);
  require_extent(kFunction, "v", v, 1, "k.shape[1] (Hkv)", heads_kv);
  require_extent(kFunction, "v", v, 2, "k.shape[2] (Lk)", len_k);
  check(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0, kFunction,
        ": q.shape[1] (Hq = ", heads_q, ") must be a multiple of k.shape[1] (Hkv = ", heads_kv,
        ")");
  require_extent(kFunction, "out", out, 0, "q.shape[0] (B)", batch);
  require_extent(kFunction, "out", out, 1, "q.shape[1] (Hq)", heads_q);
  require_extent(kFunction, "out", out, 2, "q.shape[2] (Lq)", len_q);
  require_extent(kFunction, "out", out, 3, "v.shape[3] (Dv)", dim_v);
  detail::require_unit_inner_stride(kFunction, "q", q);
  detail::require_unit_inner_stride(kFunction, "k", k);
  detail::require_unit_inner_stride(kFunction, "v", v);
  detail::require_unit_inner_stride(kFunction, "out", out);
  detail::require_disjoint(kFunction, "out", out, "q", q);
  detail::require_disjoint(kFunction, "out", out, "k", k);
  detail::require_disjoint(kFunction, "out", out, "v", v);

  if (!lse.is_null()) {
    detail::require_valid_view(kFunction, "lse", lse);
    require_extent(kFunction, "lse", lse, 0, "q.shape[0] (B)", batch);
    require_extent(kFunction, "lse", lse, 1, "q.shape[1] (Hq)", heads_q);
    require_extent(kFunction, "lse", lse, 2, "q.shape[2] (Lq)", len_q);
    detail::require_disjoint(kFunction, "lse", lse, "q", q);
    detail::require_disjoint(kFunction, "lse", lse, "k", k);
    detail::require_disjoint(kFunction, "lse", lse, "v", v);
    detail::require_disjoint(kFunction, "lse", lse, "out", out);
  }
  if (!bias.is_null()) {
    detail::require_valid_view(kFunction, "bias", bias);
    check(bias.size(0) == 1 || bias.size(0) == batch, kFunction,
          ": bias.shape[0] must be 1 or q.shape[0] (B) = ", batch, ", got ", bias.size(0));
    check(bias.size(1) == 1 || bias.size(1) == heads_q, kFunction,
          ": bias.shape[1] must be 1 or q.shape[1] (Hq) = ", heads_q, ", got ", bias.size(1));
    require_extent(kFunction, "bias", bias, 2, "q.shape[2] (Lq)", len_q);
    require_extent(kFunction, "bias", bias, 3, "k.shape[2] (Lk)", len_k);
    detail::require_disjoint(kFunction, "out", out, "bias", bias);
    if (!lse.is_null()) detail::require_disjoint(kFunction, "lse", lse, "bias", bias);
  }

  detail::require_finite_nonnegative(kFunction, "scale", options.scale, "0 = 1/sqrt(D)");
  detail::require_finite_nonnegative(kFunction, "softcap", options.softcap, "0 = off");
  detail::require_window(kFunction, "window_left", options.window_left);
  detail::require_window(kFunction, "window_right", options.window_right);
  check(!options.causal || options.window_right == -1 || options.window_right == 0, kFunction,
        ": causal=true means window_right = 0, but window_right = ", options.window_right);
  check(options.sink_tokens >= 0, kFunction, ": sink_tokens must be >= 0, got ",
        options.sink_tokens);
  check(options.q_offset == -1 || (options.q_offset >= 0 && options.q_offset <= len_k), kFunction,
        ": q_offset must be in [0, Lk = ", len_k, "] or -1 (bottom-right: Lk - Lq), got ",
        options.q_offset);
  check(options.num_threads >= 0, kFunction,
        ": num_threads must be >= 0 (0 = global setting), got ", options.num_threads);

  detail::FlashParams<T> params;
  params.q = q;
  params.k = k;
  params.v = v;
  params.out = out;
  params.lse = lse;
  if (!bias.is_null()) {
    // Broadcast dimensions read the same row: stride 0.
    params.bias = TensorView<const T, 4>(
        bias.data(), {batch, heads_q, len_q, len_k},
        {bias.size(0) == 1 ? 0 : bias.stride(0), bias.size(1) == 1 ? 0 : bias.stride(1),
         bias.stride(2), bias.stride(3)});
  }
  params.q_offset = options.q_offset == -1 ? len_k - len_q : options.q_offset;
  params.scale = options.scale > 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(dim));
  params.softcap = options.softcap;
  const auto multipliers = detail::logit_multipliers<T>(params.scale, params.softcap);
  check(std::isfinite(multipliers.query) && (options.softcap == 0 || multipliers.cap > 0),
        kFunction, ": scale = ", params.scale, " with softcap = ", options.softcap,
        " is out of the range of ", dtype_name(dtype_of<T>()));
  params.num_threads = detail::resolve_num_threads(options.num_threads);

  const auto visibility = detail::Visibility::make(
      options.causal, options.window_left, options.window_right, options.sink_tokens, len_q, len_k);
  detail::run_flash_attention(params, detail::BandPolicy(visibility));
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

}  // namespace foveal
