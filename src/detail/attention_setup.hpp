// Checks and parameter setup shared by the attention entry points (attention,
// sliding_window_attention, decode_attention). Internal to the library.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "detail/flash_plan.hpp"
#include "detail/kernels.hpp"
#include "foveal/attention/decode.hpp"
#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal::detail {

// The options every attention entry point takes (the q_offset check is the caller's: its
// allowed range depends on where the keys come from). Key ranges (variable-length batches) are
// for the callers that say they take them; their values are checked by sequence_keys.
inline void require_attention_options(const char* function, const AttentionOptions& options,
                                      bool variable_length = false) {
  check(variable_length || (options.key_start.is_null() && options.key_length.is_null()), function,
        ": key_start and key_length (variable-length batches) are taken by attention, "
        "sliding_window_attention, sparsek_attention, their backwards and decode_attention "
        "(key_start) only; here they must be null");
  require_finite_nonnegative(function, "scale", options.scale, "0 = 1/sqrt(D)");
  require_finite_nonnegative(function, "softcap", options.softcap, "0 = off");
  require_window(function, "window_left", options.window_left);
  require_window(function, "window_right", options.window_right);
  check(!options.causal || options.window_right == -1 || options.window_right == 0, function,
        ": causal=true means window_right = 0, but window_right = ", options.window_right);
  check(options.sink_tokens >= 0, function, ": sink_tokens must be >= 0, got ",
        options.sink_tokens);
  require_num_threads(function, options.num_threads);
}

// Any position >= 0 works (queries past the last key: keys that are a piece of a longer
// sequence), or -1 for bottom-right alignment; the bound keeps position arithmetic far from
// overflow.
inline void require_q_offset(const char* function, std::int64_t q_offset) {
  constexpr Index kMaxOffset = std::numeric_limits<Index>::max() / 8;
  check(q_offset == -1 || (q_offset >= 0 && q_offset <= kMaxOffset), function,
        ": q_offset must be in [0, ", kMaxOffset,
        "] (the position of query 0) or -1 (bottom-right: Lk - Lq), got ", q_offset);
}

// Where the key/value geometry of a call comes from, for messages: e.g. {"k.shape[1]", Hkv,
// "v.shape[3]", Dv}.
struct KeyValueShape {
  const char* heads_kv_name;
  Index heads_kv;
  const char* dim_v_name;
  Index dim_v;
};

// The element type of lse next to outputs of type Out (float for 16-bit storage; const if Out is).
template <typename Out>
using LseOf =
    std::conditional_t<std::is_const_v<Out>, const compute_type_t<Out>, compute_type_t<Out>>;

// q: [B, Hq, Lq, D] -> out: [B, Hq, Lq, Dv], lse: [B, Hq, Lq] or null, against keys and values
// of the given shape.
// Out is T, or const T where a backward reads the forward's out and lse (then they are not
// outputs: no self-overlap check).
template <typename T, typename Out = T>
void require_queries_and_outputs(const char* function, const TensorView<const T, 4>& q,
                                 const TensorView<Out, 4>& out,
                                 const TensorView<LseOf<Out>, 3>& lse, const KeyValueShape& kv) {
  require_valid_view(function, "q", q);
  require_valid_view(function, "out", out);
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2);
  check(q.size(3) >= 1, function, ": q.shape[3] (D) must be >= 1, got ", q.size(3));
  check(kv.heads_kv > 0 ? heads_q % kv.heads_kv == 0 : heads_q == 0, function,
        ": q.shape[1] (Hq = ", heads_q, ") must be a multiple of ", kv.heads_kv_name,
        " (Hkv = ", kv.heads_kv, ")");
  require_extent(function, "out", out, 0, "q.shape[0] (B)", batch);
  require_extent(function, "out", out, 1, "q.shape[1] (Hq)", heads_q);
  require_extent(function, "out", out, 2, "q.shape[2] (Lq)", len_q);
  require_extent(function, "out", out, 3, std::string(kv.dim_v_name) + " (Dv)", kv.dim_v);
  require_unit_inner_stride(function, "q", q);
  require_unit_inner_stride(function, "out", out);
  require_disjoint(function, "out", out, "q", q);
  if (lse.is_null()) return;
  require_valid_view(function, "lse", lse);
  require_extent(function, "lse", lse, 0, "q.shape[0] (B)", batch);
  require_extent(function, "lse", lse, 1, "q.shape[1] (Hq)", heads_q);
  require_extent(function, "lse", lse, 2, "q.shape[2] (Lq)", len_q);
  require_disjoint(function, "lse", lse, "q", q);
  require_disjoint(function, "lse", lse, "out", out);
}

// The logit scale of a call (0 -> 1/sqrt(D)), checked to be representable with the softcap in
// the compute type T.
template <typename T>
double resolve_scale(const char* function, const AttentionOptions& options, Index dim) {
  const double scale =
      options.scale > 0 ? options.scale : 1.0 / std::sqrt(static_cast<double>(dim));
  const auto multipliers = logit_multipliers<T>(scale, options.softcap);
  check(std::isfinite(multipliers.query) && (options.softcap == 0 || multipliers.cap > 0), function,
        ": scale = ", scale, " with softcap = ", options.softcap, " is out of the range of ",
        dtype_name(dtype_of<T>()));
  return scale;
}

// Validates a call with explicit K/V (attention, sliding_window_attention; with Out = const T,
// the backward, whose out and lse are the forward's) and builds the engine parameters.
template <typename T, typename Out = T>
FlashParams<T> prepare_attention(const char* function, TensorView<const T, 4> q,
                                 TensorView<const T, 4> k, TensorView<const T, 4> v,
                                 TensorView<Out, 4> out, const AttentionOptions& options,
                                 TensorView<LseOf<Out>, 3> lse, TensorView<const T, 4> bias,
                                 bool variable_length = false) {
  require_valid_view(function, "k", k);
  require_valid_view(function, "v", v);
  require_queries_and_outputs<T, Out>(function, q, out, lse,
                                      {"k.shape[1]", k.size(1), "v.shape[3]", v.size(3)});
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = k.size(1), len_k = k.size(2);
  require_extent(function, "k", k, 0, "q.shape[0] (B)", batch);
  require_extent(function, "k", k, 3, "q.shape[3] (D)", dim);
  require_extent(function, "v", v, 0, "q.shape[0] (B)", batch);
  require_extent(function, "v", v, 1, "k.shape[1] (Hkv)", heads_kv);
  require_extent(function, "v", v, 2, "k.shape[2] (Lk)", len_k);
  require_unit_inner_stride(function, "k", k);
  require_unit_inner_stride(function, "v", v);
  require_disjoint(function, "out", out, "k", k);
  require_disjoint(function, "out", out, "v", v);
  if (!lse.is_null()) {
    require_disjoint(function, "lse", lse, "k", k);
    require_disjoint(function, "lse", lse, "v", v);
  }
  if (!bias.is_null()) {
    require_valid_view(function, "bias", bias);
    check(bias.size(0) == 1 || bias.size(0) == batch, function,
          ": bias.shape[0] must be 1 or q.shape[0] (B) = ", batch, ", got ", bias.size(0));
    check(bias.size(1) == 1 || bias.size(1) == heads_q, function,
          ": bias.shape[1] must be 1 or q.shape[1] (Hq) = ", heads_q, ", got ", bias.size(1));
    require_extent(function, "bias", bias, 2, "q.shape[2] (Lq)", len_q);
    require_extent(function, "bias", bias, 3, "k.shape[2] (Lk)", len_k);
    require_disjoint(function, "out", out, "bias", bias);
    if (!lse.is_null()) require_disjoint(function, "lse", lse, "bias", bias);
  }
  require_attention_options(function, options, variable_length);
  require_q_offset(function, options.q_offset);

  FlashParams<T> params;
  params.q = q;
  params.k = k;
  params.v = v;
  if constexpr (std::is_same_v<Out, T>) {
    params.out = out;
    params.lse = lse;
  }
  if (!bias.is_null()) {
    // Broadcast dimensions read the same row: stride 0.
    params.bias = TensorView<const T, 4>(
        bias.data(), {batch, heads_q, len_q, len_k},
        {bias.size(0) == 1 ? 0 : bias.stride(0), bias.size(1) == 1 ? 0 : bias.stride(1),
         bias.stride(2), bias.stride(3)});
  }
  params.q_offset = options.q_offset == -1 ? len_k - len_q : options.q_offset;
  params.scale = resolve_scale<compute_type_t<T>>(function, options, dim);
  params.softcap = options.softcap;
  params.num_threads = resolve_num_threads(options.num_threads);
  return params;
}

// Calls chunk(KeyRange) for each piece of `range` cut at the multiples of kDecodeChunkKeys: the
// split-KV chunks of decode_attention and batch_decode_attention, which depend only on
// positions, never on the thread count.
template <typename Chunk>
void for_each_decode_chunk(KeyRange range, Chunk&& chunk) {
  for (Index begin = range.begin; begin < range.end;) {
    const Index end = aligned_piece_end(begin, range.end, kDecodeChunkKeys);
    chunk(KeyRange{begin, end});
    begin = end;
  }
}

// The band policy of `options` (windows, causal, sinks) for the call's queries and keys: what
// the forward and the backward visit.
template <typename T>
BandPolicy band_policy(const FlashParams<T>& params, const AttentionOptions& options) {
  return BandPolicy(Visibility::make(options.causal, options.window_left, options.window_right,
                                     options.sink_tokens, params.q.size(2), params.k.size(2),
                                     params.q_offset));
}

// The given key ranges of `options` are valid 1-D views of one entry per batch row.
inline void require_key_range_views(const char* function, const AttentionOptions& options,
                                    Index batch) {
  for (const auto& [name, view] :
       {std::pair<const char*, TensorView<const std::int64_t, 1>>("key_start", options.key_start),
        {"key_length", options.key_length}}) {
    if (view.is_null()) continue;
    require_valid_view(function, name, view);
    require_extent(function, name, view, 0, "q.shape[0] (B)", batch);
  }
}

// The key rows and positions of each batch row of a variable-length call (options.key_start
// and key_length), checked against the call's B and Lk: [B] entries, or none (null) when the
// options have no key ranges or the call is not `needed` (it visits no key: then the views'
// shapes are checked and their values are not read, since B may count 2^40 empty rows).
template <typename T>
AlignedArray<SequenceKeys> sequence_keys(const char* function, const AttentionOptions& options,
                                         const FlashParams<T>& params, bool needed) {
  const auto& start = options.key_start;
  const auto& length = options.key_length;
  if (start.is_null() && length.is_null()) return nullptr;
  const Index batch = params.q.size(0), len_q = params.q.size(2), len_k = params.k.size(2);
  require_key_range_views(function, options, batch);
  if (!needed) return nullptr;
  AlignedArray<SequenceKeys> sequences =
      allocate_aligned<SequenceKeys>(static_cast<std::size_t>(batch), function);
  for (Index b = 0; b < batch; ++b) {
    const Index first = start.is_null() ? 0 : start(b);
    check(first >= 0 && first <= len_k, function, ": key_start[", b,
          "] must be in [0, Lk = ", len_k, "], got ", first);
    const Index count = length.is_null() ? len_k - first : length(b);
    check(count >= 0 && count <= len_k - first, function, ": key_length[", b,
          "] must be in [0, Lk - key_start[", b, "] = ", len_k - first, "], got ", count);
    const Index q_offset = params.q_offset - first;
    sequences[static_cast<std::size_t>(b)] = {
        first, q_offset,
        Visibility::make(options.causal, options.window_left, options.window_right,
                         options.sink_tokens, len_q, count, q_offset)};
  }
  return sequences;
}

// `view` with dimension `dim` narrowed to [begin, begin + count) (within its extent).
template <typename T, int Rank>
TensorView<T, Rank> narrow(const TensorView<T, Rank>& view, int dim, Index begin, Index count) {
  if (view.is_null()) return view;
  auto shape = view.shape();
  shape[static_cast<std::size_t>(dim)] = count;
  return TensorView<T, Rank>(view.data() + begin * view.stride(dim), shape, view.strides());
}

// Batch row b's keys (dimension 2, [row.first_row, + row.visibility.len_k)) of a [B, H, Lk, ...]
// view.
template <typename View>
View row_keys(const View& view, Index b, const SequenceKeys& row) {
  return narrow(narrow(view, 0, b, 1), 2, row.first_row, row.visibility.len_k);
}

// Batch row b of a variable-length call as a call of its own: its queries, outputs and lse, its
// keys, values and bias columns, and its positions (query 0 at row.q_offset).
template <typename T>
FlashParams<T> row_params(const FlashParams<T>& params, Index b, const SequenceKeys& row) {
  FlashParams<T> own = params;
  own.q = narrow(params.q, 0, b, 1);
  own.k = row_keys(params.k, b, row);
  own.v = row_keys(params.v, b, row);
  own.out = narrow(params.out, 0, b, 1);
  own.lse = narrow(params.lse, 0, b, 1);
  own.bias = narrow(narrow(params.bias, 0, b, 1), 3, row.first_row, row.visibility.len_k);
  own.q_offset = row.q_offset;
  own.sequences = nullptr;
  return own;
}

// Runs the level's engine with the band policy of `options`, each batch row over its own keys
// when the options have key ranges.
template <typename T>
void run_band_attention(const char* function, FlashParams<T> params,
                        const AttentionOptions& options) {
  const AlignedArray<SequenceKeys> sequences =
      sequence_keys(function, options, params, params.rows_per_head() > 0);
  params.sequences = sequences.get();
  kernels<T>().band_attention(params, band_policy(params, options));
}

}  // namespace foveal::detail
