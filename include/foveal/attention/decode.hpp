// foveal/attention/decode.hpp — attention of a few new queries over a KV cache (split-KV).
#pragma once

#include "foveal/attention/kv_cache.hpp"
#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// Keys per split-KV chunk of decode_attention: fixed, so results never depend on the number
// of threads. A multiple of the engine's key block.
inline constexpr Index kDecodeChunkKeys = 1024;

// q: [B, Hq, Lq, D]  cache: B sequences of Hkv heads, D, Dv  ->  out: [B, Hq, Lq, Dv]
// lse (optional): [B, Hq, Lq].
// Attention of the newest Lq tokens of every sequence over that sequence's cached keys: query
// i of sequence b sits at position length_b - Lq + i (its own K/V must already be appended) and
// sees the keys options allow among positions [0, length_b) (causal for speculative
// verification of Lq > 1 drafts; windows and sinks for local layers, also over a ring buffer
// whose positions wrap). The query heads of a GQA group share every K/V load; the keys are
// split into chunks of kDecodeChunkKeys positions computed in parallel and merged in chunk
// order (merge_states), so results are bitwise identical for any thread count and equal
// foveal::attention over the same keys to rounding. Lq must be <= every length; every key a
// query may see must still be stored (a ring buffer too small for the window is an error);
// options.q_offset must be -1. Throws foveal::Error on any invalid argument before writing.
void decode_attention(TensorView<const float, 4> q, const KVCache<float>& cache,
                      const AttentionOptions& options, TensorView<float, 4> out,
                      TensorView<float, 3> lse = {});
void decode_attention(TensorView<const double, 4> q, const KVCache<double>& cache,
                      const AttentionOptions& options, TensorView<double, 4> out,
                      TensorView<double, 3> lse = {});
// A cache of 16-bit storage: q and out of the same type, computed in float, lse float.
void decode_attention(TensorView<const bfloat16, 4> q, const KVCache<bfloat16>& cache,
                      const AttentionOptions& options, TensorView<bfloat16, 4> out,
                      TensorView<float, 3> lse = {});
void decode_attention(TensorView<const float16, 4> q, const KVCache<float16>& cache,
                      const AttentionOptions& options, TensorView<float16, 4> out,
                      TensorView<float, 3> lse = {});
// An 8-bit cache (KVCache<q8_block>): float q, out and lse. The engine reads the stored blocks
// and multiplies each loaded vector by its block's scale (no dequantized copy of the cache; a
// tile of more than a few query rows dequantizes one key block at a time into its scratch), so
// the result is decode_attention over the dequantized keys and values, to float rounding.
void decode_attention(TensorView<const float, 4> q, const KVCache<q8_block>& cache,
                      const AttentionOptions& options, TensorView<float, 4> out,
                      TensorView<float, 3> lse = {});

// Quest (query-aware page selection) for decode over a cache with page bounds
// (KVCacheOptions::page_bounds): the keys of each sequence and kv head are visited only in the
// pages whose bound on q.k ranks highest, so a step reads about `budget` of the cache.
//
// Pages are runs of page_size() storage rows. A page is a candidate when it stores a key that
// some query sees (options' window, causal; sinks apart: the sink keys are always visited). Of
// C candidates a (sequence, kv head) keeps n = min(C, max(ceil(budget * C), local)): the pages
// holding the newest local_pages * page_size positions (local), then the pages with the largest
// upper bound of the logit, max over the query rows of the head's group (Lq x query heads) of
// sum_d max(q_d * min_d, q_d * max_d) (ties: the lower page). The query heads of a GQA group
// share the selection (and so every K/V load).
struct QuestOptions {
  double budget = 1.0 / 16;  // in (0, 1]
  Index local_pages = 1;     // >= 0
};

// decode_attention in which each query sees, of the keys decode_attention would show it, the
// sinks and the keys of its (sequence, kv head)'s kept pages. The cache must keep page bounds.
// Shapes, options, lse, 16-bit storage, errors and bitwise identity for any thread count as in
// decode_attention. Work: the bounds of every candidate page (2 D values per page and kv head)
// plus the kept pages' keys and values.
void quest_decode_attention(TensorView<const float, 4> q, const KVCache<float>& cache,
                            const AttentionOptions& options, const QuestOptions& quest,
                            TensorView<float, 4> out, TensorView<float, 3> lse = {});
void quest_decode_attention(TensorView<const double, 4> q, const KVCache<double>& cache,
                            const AttentionOptions& options, const QuestOptions& quest,
                            TensorView<double, 4> out, TensorView<double, 3> lse = {});
void quest_decode_attention(TensorView<const bfloat16, 4> q, const KVCache<bfloat16>& cache,
                            const AttentionOptions& options, const QuestOptions& quest,
                            TensorView<bfloat16, 4> out, TensorView<float, 3> lse = {});
void quest_decode_attention(TensorView<const float16, 4> q, const KVCache<float16>& cache,
                            const AttentionOptions& options, const QuestOptions& quest,
                            TensorView<float16, 4> out, TensorView<float, 3> lse = {});
// An 8-bit cache: float q, out and lse; the page bounds are those of the dequantized keys.
void quest_decode_attention(TensorView<const float, 4> q, const KVCache<q8_block>& cache,
                            const AttentionOptions& options, const QuestOptions& quest,
                            TensorView<float, 4> out, TensorView<float, 3> lse = {});

}  // namespace foveal
