// foveal/attention/token_topk.hpp — training-free fine-grained sparse prefill: each block of
// queries attends to the individual keys a cheap pooled estimate ranks highest (plus its local
// keys and the sinks), gathered by index into the shared engine's key blocks, so the time falls
// with the budget even though the kept keys are scattered.
#pragma once

#include <cstdint>
#include <vector>

#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// How many keys each query block keeps. Query positions are cut into blocks of block_size
// (position p is in query block floor(p / block_size)); the queries of a block, and the query
// heads of a GQA group, share one list of keys. Query block Q (its queries at positions
// [lo, hi]) has as candidates the keys j >= the sinks that the window (causal / window_left /
// window_right) of some query of Q shows, a contiguous range of C keys; it keeps
//   n = min(C, max(ceil(budget * C), local))
// of them: its `local` local keys (the candidates in [lo - local_tokens, hi]: the block's own
// positions and the local_tokens before them, so the diagonal stays dense), then the others by
// estimated attention mass. With threshold > 0 (adaptive, "top-p") it keeps the fewest keys,
// local ones first, whose estimated mass reaches threshold, at most n of them.
//
// The estimate, for each query head h of a GQA group: Q's n queries of head h are split into
// its o = min(outliers, n - 1) outlier queries (the o farthest from the block's mean query in
// squared distance, ties to the earlier query) and the other n - o, represented by their mean
// m_h. The estimated mass of candidate j is the block's mean attention with the others
// answered by their mean,
//   ((n - o) / n) softmax_j(s(m_h, k_j)) + (1 / n) sum over outliers x of softmax_j(s(x, k_j)),
// s(x, k) = scale * x . k (through the softcap when there is one), the softmaxes over Q's
// candidates, averaged over the group's heads. A query that asks something the rest of its
// block does not (a retrieval query) is an outlier and keeps its own answer instead of being
// diluted in the mean. It costs (1 + o) / block_size of the dense q.k products (every key is
// scored 1 + o times per query block, not once per query). Ties go to the lower key.
struct TokenTopkOptions {
  double budget = 1.0 / 16;        // in (0, 1]
  double threshold = 0;            // 0: off; else in (0, 1]
  std::int64_t block_size = 64;    // in [16, 4096]
  std::int64_t local_tokens = 64;  // >= 0
  std::int64_t outliers = 1;       // in [0, block_size)
};

// The keys each query block keeps, per (batch, kv head): for list
// i = (b * heads_kv + h) * query_blocks + (Q - first_query_block), the ascending key indices
// keys[offsets[i] .. offsets[i + 1]). token_topk_select makes one; a caller may build or edit
// one too (a learned or hand-made token mask), within these rules: offsets has
// batch * heads_kv * query_blocks + 1 non-decreasing entries from 0 to keys.size(), and every
// list is strictly increasing in [0, len_k).
struct TokenSelection {
  std::int64_t block_size = 0;
  std::int64_t batch = 0;
  std::int64_t heads_kv = 0;
  std::int64_t first_query_block = 0;  // floor(position of query 0 / block_size)
  std::int64_t query_blocks = 0;       // query blocks that hold a query of the call
  std::int64_t len_k = 0;              // Lk
  std::vector<std::int64_t> offsets;
  std::vector<std::int64_t> keys;

  // The kept keys of query block `query_block` of (b, kv head h): a pointer to the first and
  // the count.
  const std::int64_t* kept(std::int64_t b, std::int64_t h, std::int64_t query_block,
                           std::int64_t* count) const;
};

// Estimates and selects (see TokenTopkOptions) for queries q [B, Hq, Lq, D] against keys
// k [B, Hkv, Lk, D] under `options` (causal, windows, sinks, scale, softcap, q_offset as in
// foveal::attention). O(Hq * (Lq / block_size) * Lk * D) work and O(kBlockQ * Lk) memory per
// thread. Deterministic: the same selection for any thread count. Throws foveal::Error on
// invalid arguments.
TokenSelection token_topk_select(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                 const AttentionOptions& options,
                                 const TokenTopkOptions& sparse = {});
TokenSelection token_topk_select(TensorView<const double, 4> q, TensorView<const double, 4> k,
                                 const AttentionOptions& options,
                                 const TokenTopkOptions& sparse = {});
TokenSelection token_topk_select(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                                 const AttentionOptions& options,
                                 const TokenTopkOptions& sparse = {});
TokenSelection token_topk_select(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                                 const AttentionOptions& options,
                                 const TokenTopkOptions& sparse = {});

// Attention in which query i (position p) sees key j when foveal::attention with `options`
// would show it AND (j < sink_tokens or j is kept by p's query block in `selection`): causal
// always wins, a window bounds the selection, sinks stay visible. Shapes, options (no bias),
// lse and 16-bit storage as in foveal::attention; a query that sees no key gets 0 and lse -inf.
// Work O(Lq * kept keys * (D + Dv)): the engine gathers the kept keys by index into blocks,
// masked only where the rule or a tile straddling two query blocks needs it. Bitwise identical
// for any thread count. Throws foveal::Error (before touching out) on invalid arguments,
// including a selection made for other shapes, block size or query positions.
void token_topk_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                          TensorView<const float, 4> v, TensorView<float, 4> out,
                          const AttentionOptions& options, const TokenSelection& selection,
                          TensorView<float, 3> lse = {});
void token_topk_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                          TensorView<const double, 4> v, TensorView<double, 4> out,
                          const AttentionOptions& options, const TokenSelection& selection,
                          TensorView<double, 3> lse = {});
void token_topk_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                          TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                          const AttentionOptions& options, const TokenSelection& selection,
                          TensorView<float, 3> lse = {});
void token_topk_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                          TensorView<const float16, 4> v, TensorView<float16, 4> out,
                          const AttentionOptions& options, const TokenSelection& selection,
                          TensorView<float, 3> lse = {});

// Selects and attends in one call (token_topk_select, then token_topk_attention).
void token_topk_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                          TensorView<const float, 4> v, TensorView<float, 4> out,
                          const AttentionOptions& options, const TokenTopkOptions& sparse,
                          TensorView<float, 3> lse = {});
void token_topk_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                          TensorView<const double, 4> v, TensorView<double, 4> out,
                          const AttentionOptions& options, const TokenTopkOptions& sparse,
                          TensorView<double, 3> lse = {});
void token_topk_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                          TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                          const AttentionOptions& options, const TokenTopkOptions& sparse,
                          TensorView<float, 3> lse = {});
void token_topk_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                          TensorView<const float16, 4> v, TensorView<float16, 4> out,
                          const AttentionOptions& options, const TokenTopkOptions& sparse,
                          TensorView<float, 3> lse = {});

}  // namespace foveal
