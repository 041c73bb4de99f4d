// foveal/attention/snapkv.hpp — SnapKV (Li et al. 2024, arXiv 2404.14469): decode-time KV
// eviction. After the prefill, the prompt's last queries (the observation window) vote for the
// prompt keys they attend to; each (sequence, kv head) keeps the sinks, the newest keys and the
// best-voted ones, and decode runs on that compressed cache.
#pragma once

#include <cstdint>
#include <vector>

#include "foveal/attention/options.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal {

// What SnapKV keeps of a prompt of Lk keys, the same count for every (batch, kv head).
// The observation window is the last W = min(window, Lq) query rows of the call. The vote of key
// j, per kv head: for each query head h of its GQA group and each observation row i, the
// softmax over the keys row i sees (causal, positions as in foveal::attention: q_offset, -1 =
// bottom-right) of scale * q_i . k_j (through the softcap when there is one), summed over the
// rows, averaged over the group's heads; then average-pooled along the keys with a window of
// `pool` keys centred on j, zeros past either end, always dividing by `pool` (avg_pool1d with
// padding pool / 2 and count_include_pad), so that neighbours of a voted key survive with it.
// Forced keys: the sinks [0, sink_tokens) and the newest local_tokens keys
// [Lk - local_tokens, Lk) (with local_tokens >= window they hold the observation window's own
// positions, as in the paper). Each head keeps
//   n = min(Lk, max(ceil(budget * Lk), forced))
// keys: the forced ones, then the others by pooled vote, ties to the lower key.
// With threshold > 0 (adaptive) a head needs the fewest keys, forced ones first and then by
// vote, whose pooled vote reaches threshold * its total pooled vote (at most n). A KVCache
// keeps one length per sequence, so every head keeps the same count: the largest count any
// (batch, kv head) needs; the heads that need fewer top up by vote.
struct SnapKVOptions {
  double budget = 1.0 / 16;        // in (0, 1]: the fraction of the prompt's keys kept
  double threshold = 0;            // 0: off; else in (0, 1]: the pooled vote to keep
  std::int64_t window = 64;        // >= 1: observation rows (the last min(window, Lq) queries)
  std::int64_t pool = 7;           // odd, >= 1: the pooling kernel along the keys
  std::int64_t local_tokens = 64;  // >= 0: the newest keys always kept
};

// The keys SnapKV keeps: keys[(b * heads_kv + h) * kept + i], i < kept, strictly increasing per
// (b, h), in [0, len_k). snapkv_select makes one; a caller may build or edit one within these
// rules (snapkv_gather checks them).
struct SnapKVSelection {
  std::int64_t batch = 0;
  std::int64_t heads_kv = 0;
  std::int64_t len_k = 0;  // the prompt's keys
  std::int64_t kept = 0;   // keys kept per (b, h)
  std::vector<std::int64_t> keys;
};

// q [B, Hq, Lq, D] (the prompt's queries; only the last min(window, Lq) rows are read),
// k [B, Hkv, Lk, D] -> the selection of SnapKVOptions. options: causal must be true (the
// prompt's attention), no window_left (a sliding-window layer keeps its window instead), sinks,
// scale, softcap, q_offset and num_threads as in foveal::attention. The votes are computed in
// float64 whatever the storage type (16-bit inputs are widened): O(B * Hq * W * Lk * D) work,
// O(Lk) memory per thread plus O(B * Hkv * Lk) for the votes. Deterministic: the same selection
// for any thread count. Throws foveal::Error on invalid arguments.
SnapKVSelection snapkv_select(TensorView<const float, 4> q, TensorView<const float, 4> k,
                              const AttentionOptions& options, const SnapKVOptions& snap = {});
SnapKVSelection snapkv_select(TensorView<const double, 4> q, TensorView<const double, 4> k,
                              const AttentionOptions& options, const SnapKVOptions& snap = {});
SnapKVSelection snapkv_select(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                              const AttentionOptions& options, const SnapKVOptions& snap = {});
SnapKVSelection snapkv_select(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                              const AttentionOptions& options, const SnapKVOptions& snap = {});

// k [B, Hkv, Lk, D], v [B, Hkv, Lk, Dv] -> out_k [B, Hkv, kept, D], out_v [B, Hkv, kept, Dv]:
// row i of (b, h) is the prompt's row selection.keys[(b * Hkv + h) * kept + i] (any strides).
// Append out_k / out_v to a KVCache and decode on: positions in that cache are slots, so a
// decode window or q_offset counts kept keys, not prompt positions (rope is already in the
// keys). Throws foveal::Error (before writing) on invalid arguments, including a selection
// made for other shapes or breaking its rules.
void snapkv_gather(const SnapKVSelection& selection, TensorView<const float, 4> k,
                   TensorView<const float, 4> v, TensorView<float, 4> out_k,
                   TensorView<float, 4> out_v);
void snapkv_gather(const SnapKVSelection& selection, TensorView<const double, 4> k,
                   TensorView<const double, 4> v, TensorView<double, 4> out_k,
                   TensorView<double, 4> out_v);
void snapkv_gather(const SnapKVSelection& selection, TensorView<const bfloat16, 4> k,
                   TensorView<const bfloat16, 4> v, TensorView<bfloat16, 4> out_k,
                   TensorView<bfloat16, 4> out_v);
void snapkv_gather(const SnapKVSelection& selection, TensorView<const float16, 4> k,
                   TensorView<const float16, 4> v, TensorView<float16, 4> out_k,
                   TensorView<float16, 4> out_v);

}  // namespace foveal
