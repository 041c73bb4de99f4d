// foveal/sparsek/cache.hpp — constant-memory SparseK decode (docs/sparsek_cache.md): the
// state that answers SparseK attention for the newest token of a growing sequence while keeping
// only the tokens that query (or any later one) can still see.
#pragma once

#include <vector>

#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"
#include "foveal/detail/sparsek_prefix.hpp"
#include "foveal/detail/use_guard.hpp"
#include "foveal/sparsek/attention.hpp"

namespace foveal {

// The selected tokens of one (sequence, kv head) for the newest query: positions in increasing
// order and their gates clip(u − τ, 0, 1).
template <typename T>
struct SparseKCacheSelection {
  std::vector<Index> positions;
  std::vector<T> gates;
};

// K, V and scores u of a batch of sequences that grow together, one token or a few at a time,
// for SparseK decode: the query at the newest position p = length() − 1 of every sequence sees
// what foveal::sparsek_attention(q, k, v, u, options) over the whole sequence shows the query
// at position p: the sinks (positions < sink_tokens, at or before p), the window (the last
// `window` positions), and the `topk` best-scored tokens of its pool (positions sink_tokens ..
// p − window) with their SPARSEK gates.
//
// Per (sequence, kv head) it stores only those tokens, in (sink_tokens + window + topk) rows
// allocated once: rows [0, sinks) hold the sinks, rows [sinks, sinks + window) a ring of the
// window, rows [sinks + window, capacity) the top-k slots. An appended token enters the window;
// the token that leaves it enters the pool (with window 0 the appended token enters the pool at
// once): it updates τ (detail::PrefixThreshold) and the top-k set (detail::PrefixTopK); if it
// joins the set it takes a free slot or the slot of the token it displaces, otherwise it is
// dropped for good. Thresholds of growing pools never decrease, so a dropped token is never
// needed again (docs/sparsek_cache.md).
//
// Memory. K/V/u storage is capacity() rows per head, whatever the length. Besides it, τ keeps
// one double per pool token with gate p > 0: at most topk with p = 1, plus the fractional ones
// (0 < p < 1), which are the pool scores in (τ, τ + 1). Their count is not bounded by topk:
// scores that all lie within 1 of each other keep every pool token fractional (8 bytes per
// token, never its K or V); with scores spread over many units (the position slope of
// sparsek_linear_scores) it levels off at a small multiple of topk, independent of the length
// (docs/sparsek_cache.md has numbers). threshold_entries() reports it.
//
// All sequences advance together (one length; ragged batches are a non-goal: use one cache per
// sequence). Tokens cannot be removed again (no truncate: an evicted token is gone). Every
// rejected call throws foveal::Error naming the argument and leaves the cache unchanged.
//
// Threads: like KVCache, any number of threads may attend at once, while append and reset must
// run alone; an overlapping mutation, or a read that overlaps a mutation, throws foveal::Error
// ("the cache is being modified by another thread") and changes nothing. Sizes whose byte count
// overflows throw foveal::Error; storage the system cannot provide throws foveal::MemoryError.
//
// Storage: S = float or double, or bfloat16 / float16 (K, V, q, out and u in S: half the bytes
// of float; scores, gates, τ and lse in float, the kernels computing in float as for a 16-bit
// KVCache).
template <typename S>
class SparseKCache {
 public:
  using Compute = compute_type_t<S>;  // of scores, gates and lse: float for 16-bit storage

  // An empty cache of `batch` sequences with `heads_kv` key/value heads, keys of dimension
  // `dim` and values of dimension `dim_v`. options as for sparsek_attention: topk >= 1,
  // window >= 0, sink_tokens >= 0, gate, scale (0: 1/sqrt(dim)), softcap, num_threads (0: the
  // global setting); causal must be true and q_offset -1 (the query is the newest token).
  SparseKCache(Index batch, Index heads_kv, Index dim, Index dim_v, const SparseKOptions& options);

  Index batch() const { return keys_.size(0); }
  Index heads_kv() const { return keys_.size(1); }
  Index dim() const { return keys_.size(3); }
  Index dim_v() const { return values_.size(3); }
  const SparseKOptions& options() const { return options_; }

  // Rows of storage per (sequence, kv head): sink_tokens + window + topk.
  Index capacity() const { return keys_.size(2); }
  // Tokens appended to every sequence so far (the position of the next one).
  Index length() const { return length_; }
  // Rows in use per (sequence, kv head): min(length, sinks) + the window's tokens + the
  // selected ones; never more than capacity().
  Index stored_rows() const;
  // The most scores τ holds for any (sequence, kv head) (see Memory above).
  Index threshold_entries() const;

  // The storage, [B, Hkv, capacity, D] and [B, Hkv, capacity, Dv] (row layout above; rows not
  // in use hold stale data).
  TensorView<const S, 4> keys() const { return keys_.view(); }
  TensorView<const S, 4> values() const { return values_.view(); }

  // k: [B, Hkv, n, D]  v: [B, Hkv, n, Dv]  u: [B, Hkv, n] (finite)
  // Appends n >= 0 tokens to every sequence (positions length() .. length() + n − 1); the
  // same as n appends of one token. Any strides.
  void append(TensorView<const S, 4> k, TensorView<const S, 4> v, TensorView<const S, 3> u);

  // q: [B, Hq, 1, D]  ->  out: [B, Hq, 1, Dv]  lse: [B, Hq, 1] (optional)
  // SparseK attention of the query at the newest position of every sequence (GQA: Hq a multiple
  // of Hkv; the query heads of a group share their kv head's selection). Needs length() >= 1.
  // One task per (sequence, kv head) on the shared engine: the selected tokens in gathered
  // blocks with their gates, then the sinks and the window; results are bitwise identical for
  // any thread count and equal sparsek_attention's row p to rounding.
  void attend(TensorView<const S, 4> q, TensorView<S, 4> out,
              TensorView<Compute, 3> lse = {}) const;

  // Empties every sequence (storage is kept; its contents are stale).
  void reset();

  // The selection of the newest query of `sequence` on kv head `head`, for inspection.
  SparseKCacheSelection<Compute> selected(Index sequence, Index head) const;
  // τ of that query's pool (−inf while the pool holds <= topk tokens).
  double threshold(Index sequence, Index head) const;

 private:
  // The selection state of one (sequence, kv head).
  struct HeadState {
    explicit HeadState(Index topk)
        : threshold(topk), top(topk), slot_position(static_cast<std::size_t>(topk), -1) {}
    detail::PrefixThreshold threshold;
    detail::PrefixTopK top;
    std::vector<Index> slot_position;  // per top-k slot: the position it holds, or -1
  };

  void require_head(const char* method, Index sequence, Index head) const;
  // Adds the token at `position` of head `head_index` (k, v rows with their strides, score).
  void push_token(Index head_index, Index position, const S* k_row, Index k_stride, const S* v_row,
                  Index v_stride, Compute score);
  // The pool token at `position` (rows as above) enters the pool of head `head_index`.
  void enter_pool(Index head_index, Index position, const S* k_row, Index k_stride, const S* v_row,
                  Index v_stride, Compute score);
  void write_row(Index head_index, Index row, const S* k_row, Index k_stride, const S* v_row,
                 Index v_stride, Compute score);
  // Storage row of the window token at `position` (>= sink_tokens).
  Index ring_row(Index position) const;
  // Tokens in the top-k slots of every head: min(pool size, topk).
  Index selected_count() const;
  // Rows [0, always_visible_rows()) hold the sinks and the window, contiguously.
  Index always_visible_rows() const;

  SparseKOptions options_;
  double scale_ = 1;  // options_.scale resolved (0 -> 1/sqrt(dim))
  Index length_ = 0;
  Tensor<S, 4> keys_;             // [B, Hkv, capacity, D]
  Tensor<S, 4> values_;           // [B, Hkv, capacity, Dv]
  Tensor<Compute, 3> scores_;     // [B, Hkv, capacity]: u of each stored row
  std::vector<HeadState> heads_;  // B * Hkv, sequence-major
  std::vector<Index> slot_rows_;  // [topk]: the storage row of each top-k slot
  detail::UseGuard guard_;        // detects concurrent append / reset / attend
};

extern template class SparseKCache<float>;
extern template class SparseKCache<double>;
extern template class SparseKCache<bfloat16>;
extern template class SparseKCache<float16>;

}  // namespace foveal
