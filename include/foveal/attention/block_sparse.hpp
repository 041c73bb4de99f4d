// foveal/attention/block_sparse.hpp — training-free block-sparse prefill attention: each block
// of queries attends to the key blocks a cheap pooled estimate ranks highest (plus its local
// blocks and the sinks), on the shared engine, so the time falls with the budget.
#pragma once

#include <cstdint>
#include <vector>

#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// How many key blocks each query block keeps. Positions are cut into blocks of block_size
// (query position p is in query block floor(p / block_size), key j in key block
// floor(j / block_size)). A query block's candidates are the key blocks that intersect the
// window of some query of the block (sinks apart); it keeps
//   n = min(candidates, max(ceil(budget * candidates), local))
// blocks: its `local_blocks` local blocks (its own block index and the ones before it, those that
// are candidates) and the best-estimated others. With threshold > 0 (adaptive, "top-p") it keeps
// the fewest blocks, local ones first, whose estimated attention mass reaches threshold, at
// most n of them, so the kept count grows or shrinks with how concentrated the estimate is.
//
// The estimate of query block Q and key block K, for each query head h of a GQA group:
// logit = scale * mean_Q(q_h) . mean_K(k) (through the softcap when there is one) +
// ln(count of K's keys); the softmax of these logits over Q's candidates estimates the mass
// of each block, and the group's heads are averaged (the heads of a group share the selection,
// so they share every K/V row the engine loads). Ties go to the lower block index.
struct BlockSparseOptions {
  double budget = 1.0 / 16;       // in (0, 1]
  double threshold = 0;           // 0: off; else in (0, 1]
  std::int64_t block_size = 64;   // in [16, 4096]
  std::int64_t local_blocks = 1;  // >= 0
};

// The key blocks each query block keeps, per (batch, kv head): for list
// i = (b * heads_kv + h) * query_blocks + (Q - first_query_block), the ascending key block
// indices blocks[offsets[i] .. offsets[i + 1]). block_sparse_select makes one; a caller may
// build or edit one too (a learned or hand-made block mask), within these rules: offsets has
// batch * heads_kv * query_blocks + 1 non-decreasing entries from 0 to blocks.size(), and every
// list is strictly increasing in [0, key_blocks).
struct BlockSelection {
  std::int64_t block_size = 0;
  std::int64_t batch = 0;
  std::int64_t heads_kv = 0;
  std::int64_t first_query_block = 0;  // floor(position of query 0 / block_size)
  std::int64_t query_blocks = 0;       // query blocks that hold a query of the call
  std::int64_t key_blocks = 0;         // ceil(Lk / block_size)
  std::vector<std::int64_t> offsets;
  std::vector<std::int64_t> blocks;

  // The kept key blocks of query block `query_block` of (b, kv head h): a pointer to the first
  // and the count.
  const std::int64_t* kept(std::int64_t b, std::int64_t h, std::int64_t query_block,
                           std::int64_t* count) const;
};

// Estimates and selects (see BlockSparseOptions) for queries q [B, Hq, Lq, D] against keys
// k [B, Hkv, Lk, D] under `options` (causal, windows, sinks, scale, softcap, q_offset as in
// foveal::attention). O(Lq * D + Lk * D + Hq * (Lq / bs) * (Lk / bs) * D) work. Deterministic:
// the same selection for any thread count. Throws foveal::Error on invalid arguments.
BlockSelection block_sparse_select(TensorView<const float, 4> q, TensorView<const float, 4> k,
                                   const AttentionOptions& options,
                                   const BlockSparseOptions& sparse = {});
BlockSelection block_sparse_select(TensorView<const double, 4> q, TensorView<const double, 4> k,
                                   const AttentionOptions& options,
                                   const BlockSparseOptions& sparse = {});
BlockSelection block_sparse_select(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                                   const AttentionOptions& options,
                                   const BlockSparseOptions& sparse = {});
BlockSelection block_sparse_select(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                                   const AttentionOptions& options,
                                   const BlockSparseOptions& sparse = {});

// Attention in which query i (position p) sees key j when foveal::attention with `options`
// would show it AND (j < sink_tokens or j's key block is kept by p's query block in
// `selection`): causal always wins, a window bounds the selection, sinks stay visible. Shapes,
// options (no bias), lse and 16-bit storage as in foveal::attention; a query that sees no key
// gets 0 and lse -inf. Work O(Lq * kept keys * (D + Dv)): the engine visits only kept blocks,
// whole blocks unmasked where every row of a tile keeps them. Bitwise identical for any thread
// count. Throws foveal::Error (before touching out) on invalid arguments, including a selection
// made for other shapes, block size or query positions.
void block_sparse_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                            TensorView<const float, 4> v, TensorView<float, 4> out,
                            const AttentionOptions& options, const BlockSelection& selection,
                            TensorView<float, 3> lse = {});
void block_sparse_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                            TensorView<const double, 4> v, TensorView<double, 4> out,
                            const AttentionOptions& options, const BlockSelection& selection,
                            TensorView<double, 3> lse = {});
void block_sparse_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                            TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                            const AttentionOptions& options, const BlockSelection& selection,
                            TensorView<float, 3> lse = {});
void block_sparse_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                            TensorView<const float16, 4> v, TensorView<float16, 4> out,
                            const AttentionOptions& options, const BlockSelection& selection,
                            TensorView<float, 3> lse = {});

// Selects and attends in one call (block_sparse_select, then block_sparse_attention).
void block_sparse_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                            TensorView<const float, 4> v, TensorView<float, 4> out,
                            const AttentionOptions& options, const BlockSparseOptions& sparse,
                            TensorView<float, 3> lse = {});
void block_sparse_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                            TensorView<const double, 4> v, TensorView<double, 4> out,
                            const AttentionOptions& options, const BlockSparseOptions& sparse,
                            TensorView<double, 3> lse = {});
void block_sparse_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                            TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out,
                            const AttentionOptions& options, const BlockSparseOptions& sparse,
                            TensorView<float, 3> lse = {});
void block_sparse_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                            TensorView<const float16, 4> v, TensorView<float16, 4> out,
                            const AttentionOptions& options, const BlockSparseOptions& sparse,
                            TensorView<float, 3> lse = {});

}  // namespace foveal
