// foveal/attention/batch_attention.hpp — one call for the decode (or a prefill chunk) of many
// sequences of a PagedKVCache: planned split-KV over pages, and shared-prefix (cascade) reads.
#pragma once

#include <vector>

#include "foveal/attention/options.hpp"
#include "foveal/attention/paged_kv_cache.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// Whether a batch call looks for keys that several of its sequences share (the same pages, as
// after PagedKVCache::fork) and reads them once for all of them.
enum class PrefixSharing {
  detect,  // from the page tables (the default)
  off,     // every sequence reads all its keys itself
};

// What the plan of a batch call did: how the work was split (for tests, benchmarks, logs).
struct BatchAttentionInfo {
  Index tasks = 0;          // engine tasks (one tile of query rows over one chunk of keys)
  Index chunks = 0;         // chunks of keys, each read once per kv head
  Index shared_groups = 0;  // groups (levels of the cascade) whose shared keys were read once
  Index shared_tokens = 0;  // sum over those groups of the number of keys they share
};

// q: [S, Hq, Lq, D]  ->  out: [S, Hq, Lq, Dv], lse (optional): [S, Hq, Lq].
// Row s attends over sequence sequences[s] of the cache (ids may repeat): its query i sits at
// position length - Lq + i (append its own K/V first) and sees the keys options allow, exactly
// as decode_attention over a contiguous cache (GQA, causal for Lq > 1 drafts, windows, sinks,
// softcap, scale; options.q_offset must be -1). The plan depends only on the lengths and page
// tables: each sequence's visible keys are cut into chunks of kDecodeChunkKeys positions (one
// chunk when its Lq * group rows fill more than a tile), every (chunk, kv head, tile) is one
// task handed out dynamically, and the chunk states of a row are merged in position order, so
// the results are bitwise identical for any thread count. With PrefixSharing::detect, sequences
// whose page tables begin with the same pages form a group: the queries of the whole group are
// stacked into one tile set and attend over the shared prefix with each page read once (when
// every query of the group sees the whole prefix: no window cutting into it), and each
// sequence adds its own suffix through a merge of the states. Sharing nests (a multi-level
// cascade): members of a group that hold still more pages in common (a sample that was extended
// and forked again) form a deeper group over the keys past the first level, and so on; each
// sequence reads only what lies past its deepest level. Throws foveal::Error on invalid
// arguments (an unknown id, Lq > a length, shape or dtype mismatches) before writing anything.
void batch_decode_attention(TensorView<const float, 4> q, const PagedKVCache<float>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<float, 4> out, TensorView<float, 3> lse = {},
                            PrefixSharing sharing = PrefixSharing::detect,
                            BatchAttentionInfo* info = nullptr);
void batch_decode_attention(TensorView<const double, 4> q, const PagedKVCache<double>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<double, 4> out, TensorView<double, 3> lse = {},
                            PrefixSharing sharing = PrefixSharing::detect,
                            BatchAttentionInfo* info = nullptr);

// Chunked prefill. q: [S, Hq, n, D]  k: [S, Hkv, n, D]  v: [S, Hkv, n, Dv]  counts: S values in
// [0, n] (empty: all n)  ->  out: [S, Hq, n, Dv], lse (optional): [S, Hq, n].
// Appends the first counts[s] tokens of k[s], v[s] to sequences[s] (distinct ids), then attends
// those tokens' queries over the sequence's cached keys and themselves (causal when
// options.causal; windows, sinks, softcap as in batch_decode_attention). Rows i >= counts[s]
// get out = 0 and lse = -inf. Validation and the page count come first: a rejected call (an
// exhausted pool throws foveal::MemoryError) changes no sequence and writes nothing.
void batch_prefill_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                             TensorView<const float, 4> v, PagedKVCache<float>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<float, 4> out,
                             TensorView<float, 3> lse = {},
                             PrefixSharing sharing = PrefixSharing::detect,
                             BatchAttentionInfo* info = nullptr);
void batch_prefill_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                             TensorView<const double, 4> v, PagedKVCache<double>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<double, 4> out,
                             TensorView<double, 3> lse = {},
                             PrefixSharing sharing = PrefixSharing::detect,
                             BatchAttentionInfo* info = nullptr);

// 16-bit pools (PagedKVCache<bfloat16>, PagedKVCache<float16>): q, k, v and out of the pool's
// type, computed in float32 (lse float32), out the float32 result rounded.
void batch_decode_attention(TensorView<const bfloat16, 4> q, const PagedKVCache<bfloat16>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<bfloat16, 4> out, TensorView<float, 3> lse = {},
                            PrefixSharing sharing = PrefixSharing::detect,
                            BatchAttentionInfo* info = nullptr);
void batch_prefill_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                             TensorView<const bfloat16, 4> v, PagedKVCache<bfloat16>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<bfloat16, 4> out,
                             TensorView<float, 3> lse = {},
                             PrefixSharing sharing = PrefixSharing::detect,
                             BatchAttentionInfo* info = nullptr);
void batch_decode_attention(TensorView<const float16, 4> q, const PagedKVCache<float16>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<float16, 4> out, TensorView<float, 3> lse = {},
                            PrefixSharing sharing = PrefixSharing::detect,
                            BatchAttentionInfo* info = nullptr);
void batch_prefill_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                             TensorView<const float16, 4> v, PagedKVCache<float16>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<float16, 4> out,
                             TensorView<float, 3> lse = {},
                             PrefixSharing sharing = PrefixSharing::detect,
                             BatchAttentionInfo* info = nullptr);

// 8-bit pools (PagedKVCache<q8_block>): float32 q, k, v, out and lse; the keys and values are
// read from their blocks inside the engine (never dequantized into a copy), so a result is
// that of the float32 call over the dequantized pool.
void batch_decode_attention(TensorView<const float, 4> q, const PagedKVCache<q8_block>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<float, 4> out, TensorView<float, 3> lse = {},
                            PrefixSharing sharing = PrefixSharing::detect,
                            BatchAttentionInfo* info = nullptr);
void batch_prefill_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                             TensorView<const float, 4> v, PagedKVCache<q8_block>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<float, 4> out,
                             TensorView<float, 3> lse = {},
                             PrefixSharing sharing = PrefixSharing::detect,
                             BatchAttentionInfo* info = nullptr);

}  // namespace foveal
