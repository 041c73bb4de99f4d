// foveal/attention/vertical_slash.hpp — training-free sparse prefill on the vertical-slash
// pattern (MInference's): the attention of the last queries estimates which keys (columns, the
// "verticals") and which query-key distances (diagonals, the "slashes") carry the mass, and every
// block of queries attends to those lines, gathered by index on the token_topk engine.
#pragma once

#include <cstdint>

#include "foveal/attention/options.hpp"
#include "foveal/attention/token_topk.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// The estimate: the last min(last_queries, Lq) queries of the call, every query head, attend
// (softmax over their candidate keys: their window past the sinks, scale, softcap) and their
// probabilities, averaged over those rows and the heads of a GQA group, give each column j (the
// key j) and each slash d (the keys at distance d = position - j from their query) an estimated
// mass. The lines of a (batch, kv head) are ranked once, by mass per key they cost a query
// block: a column brings one key, a slash up to block_size (its distance applied to every query
// of the block); ties go to columns, then to the lower key or distance.
//
// Query positions are cut into blocks of block_size; the queries of a block and the query heads
// of a GQA group share one list of keys. Query block Q (queries at positions [lo, hi]) has as
// candidates the keys j >= the sinks in the window of some query of Q (C of them) and keeps
// n = min(C, max(ceil(budget * C), local)) of them, like token_topk: its local keys (the
// candidates in [lo - local_tokens, hi]), then the keys of the ranked lines, best line first: a
// column its key when it is a candidate, a slash d the candidates in [lo - d, hi - d] (every key
// at distance d of one of Q's queries; MInference's kernel covers slashes with such blocks too),
// until the list holds n keys (the last line's lowest keys first). With threshold > 0 (adaptive)
// a query block uses only the fewest best lines whose estimated masses add up to threshold (a
// key on both a kept column and a kept slash counts twice), and still at most n keys.
//
// Columns and slashes the estimate rows cannot see (keys before their window) are never
// ranked: with a sliding window, far blocks keep their local keys and the slashes.
struct VerticalSlashOptions {
  double budget = 1.0 / 16;        // in (0, 1]
  double threshold = 0;            // 0: off; else in (0, 1]
  std::int64_t block_size = 64;    // in [16, 4096]
  std::int64_t last_queries = 64;  // >= 1 (clipped to Lq)
  std::int64_t local_tokens = 64;  // >= 0
};

// Estimates and selects (see VerticalSlashOptions) for queries q [B, Hq, Lq, D] against keys
// k [B, Hkv, Lk, D] under `options` (causal, windows, sinks, scale, softcap, q_offset as in
// foveal::attention). The result is a TokenSelection: attend with token_topk_attention, or call
// vertical_slash_attention below. Work O(Hq * last_queries * Lk * D) for the estimate plus
// O(kept keys + lines walked) per list; memory O(B * Hkv * (Lk + Lq)) for the ranked lines and
// O(kBlockQ * Lk) per thread. Deterministic: the same selection for any thread count. Throws
// foveal::Error on invalid arguments.
TokenSelection vertical_slash_select(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                     const AttentionOptions& options,
                                     const VerticalSlashOptions& sparse = {});
TokenSelection vertical_slash_select(TensorView<const double, 4> q, TensorView<const double, 4> k,
                                     const AttentionOptions& options,
                                     const VerticalSlashOptions& sparse = {});
TokenSelection vertical_slash_select(TensorView<const bfloat16, 4> q,
                                     TensorView<const bfloat16, 4> k,
                                     const AttentionOptions& options,
                                     const VerticalSlashOptions& sparse = {});
TokenSelection vertical_slash_select(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                                     const AttentionOptions& options,
                                     const VerticalSlashOptions& sparse = {});

// Selects and attends in one call (vertical_slash_select, then token_topk_attention): shapes,
// options (no bias), lse, 16-bit storage, errors and bitwise identity as in token_topk_attention.
void vertical_slash_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                              TensorView<const float, 4> v, TensorView<float, 4> out,
                              const AttentionOptions& options, const VerticalSlashOptions& sparse,
                              TensorView<float, 3> lse = {});
void vertical_slash_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                              TensorView<const double, 4> v, TensorView<double, 4> out,
                              const AttentionOptions& options, const VerticalSlashOptions& sparse,
                              TensorView<double, 3> lse = {});
void vertical_slash_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                              TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                              const AttentionOptions& options, const VerticalSlashOptions& sparse,
                              TensorView<float, 3> lse = {});
void vertical_slash_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                              TensorView<const float16, 4> v, TensorView<float16, 4> out,
                              const AttentionOptions& options, const VerticalSlashOptions& sparse,
                              TensorView<float, 3> lse = {});

}  // namespace foveal
