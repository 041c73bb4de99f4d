// foveal/attention/kv_cache.hpp — key/value storage for incremental decoding.
#pragma once

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "foveal/core/dtype.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"
#include "foveal/detail/use_guard.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {

namespace detail {

// to[0 .. count) = from[0], from[stride], ...: one row of a strided view into contiguous memory.
template <typename T>
void copy_strided_row(const T* from, Index stride, T* to, Index count) {
  if (stride == 1 || count <= 1) {
    if (count > 0) std::memcpy(to, from, sizeof(T) * static_cast<std::size_t>(count));
    return;
  }
  for (Index d = 0; d < count; ++d) to[d] = from[d * stride];
}

// What a cache of elements T takes in append: float for an 8-bit cache, T otherwise.
template <typename T>
using cache_input_t = std::conditional_t<std::is_same_v<T, q8_block>, float, T>;

// Elements of T that hold a row of `count` values: ceil(count / 32) blocks for q8_block.
template <typename T>
constexpr Index stored_width(Index count) {
  if constexpr (std::is_same_v<T, q8_block>) {
    return count / q8_block::kValues + (count % q8_block::kValues != 0);
  } else {
    return count;
  }
}

// Value d of a stored row, in its compute type (exact: an 8-bit value times its block's scale).
template <typename T>
compute_type_t<T> stored_value(const T* row, Index d) {
  if constexpr (std::is_same_v<T, q8_block>) {
    return q8_value(row, d);
  } else {
    return widen(row[d]);
  }
}

// Stores `count` values from[0], from[stride], ... as a row of T (quantized for q8_block).
template <typename T>
void store_row(const cache_input_t<T>* from, Index stride, T* to, Index count) {
  if constexpr (std::is_same_v<T, q8_block>) {
    float gathered[q8_block::kValues];
    for (Index first = 0; first < count; first += q8_block::kValues) {
      const int values = static_cast<int>(std::min<Index>(q8_block::kValues, count - first));
      for (int i = 0; i < values; ++i) gathered[i] = from[(first + i) * stride];
      to[first / q8_block::kValues] = quantize_q8(gathered, values);
    }
  } else {
    copy_strided_row(from, stride, to, count);
  }
}

}  // namespace detail

struct KVCacheOptions {
  // Ring buffer for sliding-window layers: once full, a new token overwrites the oldest one
  // that is not a sink. Without it, appending past capacity is an error.
  bool ring = false;
  // The first tokens of every sequence, never overwritten in ring mode (attention sinks).
  Index sink_tokens = 0;
  // Page bounds for query-aware page selection (quest_decode_attention): when > 0, the cache
  // keeps, for every run of `page_bounds` consecutive storage rows (a page) of every sequence and
  // kv head, the elementwise minimum and maximum of the stored keys (page_bound_t: rounded
  // outward to bfloat16 unless the keys are float64), updated by append, truncate and reset (a
  // page's bounds are recomputed from its stored rows whenever a row of it changes: one page
  // per decoded token). 0: no bounds.
  Index page_bounds = 0;
};

// The element of a cache's page bounds. bfloat16, the minimum rounded down and the maximum
// rounded up (still bounds of every stored key, looser by at most 2^-8 of each value): the page
// selection reads the bounds of every page each step, and half the bytes of float bounds make
// it about twice as fast (it is bound by memory). float64 caches keep exact float64 bounds.
template <typename T>
using page_bound_t =
    std::conditional_t<std::is_same_v<compute_type_t<T>, double>, double, bfloat16>;

namespace detail {

// x as a lower (`up` false) or upper bound of type B: rounded toward -inf or +inf.
template <typename B, typename C>
B bound_toward(C x, bool up) {
  if constexpr (std::is_same_v<B, bfloat16>) {
    return to_bfloat16_toward(x, up);
  } else {
    return x;
  }
}

}  // namespace detail

// Rows [row, row + count) of a sequence's storage hold positions [position, position + count).
struct KVCacheSpan {
  Index row = 0;
  Index position = 0;
  Index count = 0;
};

// Where a sequence's stored tokens are: at most three spans, in increasing position order
// (the sinks, then the older and the newer part of a wrapped ring).
struct KVCacheLayout {
  KVCacheSpan spans[3];
  int count = 0;
};

// K and V storage of a batch of sequences, [B, Hkv, capacity, D] and [B, Hkv, capacity, Dv],
// either owned (64-byte aligned, zeroed) or wrapping caller memory, with one length per
// sequence (a ragged batch). A sequence's tokens sit at positions 0, 1, ..., length - 1. In
// ring mode, position p is stored in row p for p < sink_tokens and otherwise in row
// sink_tokens + (p - sink_tokens) % (capacity - sink_tokens); the rows keep the sinks and the
// newest capacity - sink_tokens other tokens. Every rejected call leaves the cache unchanged.
//
// Owned storage is zeroed lazily: large caches are mapped from the kernel's zero pages, so rows
// never written take no memory (decode reads only the rows of stored tokens). A size whose byte
// count overflows throws foveal::Error; storage the system cannot provide throws
// foveal::MemoryError (a std::bad_alloc) naming the byte count.
//
// Threads. Any number of threads may read one cache at once (decode_attention); append,
// truncate and reset must run alone. A mutation that overlaps another mutation or a read, and a
// read that overlaps a mutation, throws foveal::Error ("the cache is being modified by another
// thread") instead of corrupting memory; the call that throws changes nothing.
//
// T is float, double, bfloat16, float16 or q8_block. KVCache<q8_block> is an 8-bit cache: it
// takes float keys and values (input_type) and stores each row of D values as ceil(D / 32)
// blocks (storage [B, Hkv, capacity, ceil(D / 32)]), quantized as it appends; decode_attention
// reads the blocks and scales them in its K/V loads. Over caller memory its D is 32 * blocks.
template <typename T>
class KVCache {
 public:
  // The element type append takes: float for an 8-bit cache, T otherwise.
  using input_type = detail::cache_input_t<T>;
  // Values of a row one stored element holds: 32 for q8_block, 1 otherwise.
  static constexpr Index kValuesPerElement = std::is_same_v<T, q8_block> ? q8_block::kValues : 1;

  // An owned cache of `batch` empty sequences.
  KVCache(Index batch, Index heads_kv, Index capacity, Index dim, Index dim_v,
          const KVCacheOptions& options = {})
      : options_(options), dim_(dim), dim_v_(dim_v) {
    check(batch >= 0 && heads_kv >= 0 && capacity >= 0 && dim >= 1 && dim_v >= 0,
          "KVCache: sizes must be >= 0 (D >= 1), got batch = ", batch, ", heads_kv = ", heads_kv,
          ", capacity = ", capacity, ", dim = ", dim, ", dim_v = ", dim_v);
    require_options(capacity);
    keys_owned_ =
        Tensor<T, 4>({batch, heads_kv, capacity, detail::stored_width<T>(dim)}, "KVCache keys");
    values_owned_ =
        Tensor<T, 4>({batch, heads_kv, capacity, detail::stored_width<T>(dim_v)}, "KVCache values");
    keys_ = keys_owned_.view();
    values_ = values_owned_.view();
    allocate_bounds();
    reset();
  }

  // A cache over caller memory (which must outlive it): keys [B, Hkv, capacity, D], values
  // [B, Hkv, capacity, Dv], any strides with a unit innermost stride, not overlapping.
  // `lengths` (empty: all 0) says how many tokens each sequence already holds there, laid out
  // as this cache lays them out (so a cache can adopt storage that was filled elsewhere).
  KVCache(TensorView<T, 4> keys, TensorView<T, 4> values, const KVCacheOptions& options = {},
          const std::vector<Index>& lengths = {})
      : options_(options), keys_(keys), values_(values) {
    constexpr const char* kFunction = "KVCache";
    detail::require_valid_view(kFunction, "keys", keys);
    detail::require_valid_view(kFunction, "values", values);
    // Valid views address every element in 64 bits, so 32 values per 36-byte block fit too.
    dim_ = keys.size(3) * kValuesPerElement;
    dim_v_ = values.size(3) * kValuesPerElement;
    detail::require_extent(kFunction, "values", values, 0, "keys.shape[0] (B)", keys.size(0));
    detail::require_extent(kFunction, "values", values, 1, "keys.shape[1] (Hkv)", keys.size(1));
    detail::require_extent(kFunction, "values", values, 2, "keys.shape[2] (capacity)",
                           keys.size(2));
    check(keys.size(3) >= 1, kFunction, ": keys.shape[3] (D) must be >= 1, got ", keys.size(3));
    detail::require_unit_inner_stride(kFunction, "keys", keys);
    detail::require_unit_inner_stride(kFunction, "values", values);
    detail::require_disjoint(kFunction, "keys", keys, "values", values);
    require_options(keys.size(2));
    check(lengths.empty() || static_cast<Index>(lengths.size()) == batch(), kFunction,
          ": lengths must be empty or have one entry per sequence (", batch(), "), got ",
          lengths.size());
    for (std::size_t b = 0; b < lengths.size(); ++b)
      check(lengths[b] >= 0 && (options_.ring || lengths[b] <= capacity()), kFunction, ": lengths[",
            b, "] must be >= 0", options_.ring ? "" : " and <= capacity = ",
            options_.ring ? "" : std::to_string(capacity()), ", got ", lengths[b]);
    allocate_bounds();
    reset();
    for (std::size_t b = 0; b < lengths.size(); ++b) {
      lengths_[b] = lengths[b];
      if (options_.ring)
        first_retained_[b] = std::max(options_.sink_tokens, lengths[b] - ring_rows());
    }
    refresh_bounds();
  }

  Index batch() const { return keys_.size(0); }
  Index heads_kv() const { return keys_.size(1); }
  Index capacity() const { return keys_.size(2); }
  Index dim() const { return dim_; }
  Index dim_v() const { return dim_v_; }
  bool ring() const { return options_.ring; }
  Index sink_tokens() const { return options_.sink_tokens; }
  // Rows per page of the page bounds (0: the cache keeps none) and the number of pages.
  Index page_size() const { return options_.page_bounds; }
  Index pages() const {
    const Index size = options_.page_bounds;  // ceil(capacity / size) without overflowing
    return size > 0 ? capacity() / size + (capacity() % size != 0) : 0;
  }
  // [B, Hkv, pages, 2, D]: [..., 0, :] the minimum and [..., 1, :] the maximum of the stored keys
  // of each page (+inf and -inf where a page holds none), rounded outward to page_bound_t.
  // Empty without page bounds.
  TensorView<const page_bound_t<T>, 5> page_bounds() const { return bounds_.view(); }

  // Tokens appended to `sequence` so far (its next position).
  Index length(Index sequence) const {
    require_sequence("length", sequence);
    return lengths_[static_cast<std::size_t>(sequence)];
  }
  const std::vector<Index>& lengths() const { return lengths_; }

  // Held by a call that reads the cache (decode_attention) for its whole run: throws
  // foveal::Error while append, truncate or reset runs on another thread (see Threads above).
  detail::UseGuard::Read read_guard(const char* function) const {
    return detail::UseGuard::Read(guard_, "cache", function);
  }

  // Where the stored non-sink tokens of `sequence` begin: they are the positions
  // [max(first_retained, sink_tokens), length). Always sink_tokens without ring mode.
  Index first_retained(Index sequence) const {
    require_sequence("first_retained", sequence);
    return first_retained_[static_cast<std::size_t>(sequence)];
  }

  // True when `position` of `sequence` is stored (appended and not overwritten).
  bool holds(Index sequence, Index position) const {
    const Index length = this->length(sequence);
    if (position < 0 || position >= length) return false;
    return position < options_.sink_tokens ||
           position >= first_retained_[static_cast<std::size_t>(sequence)];
  }

  // The storage row of `position` (stored or not).
  Index row_of(Index position) const {
    if (!options_.ring || position < options_.sink_tokens) return position;
    return options_.sink_tokens + (position - options_.sink_tokens) % ring_rows();
  }

  // The spans of stored tokens of `sequence`, in increasing position order.
  KVCacheLayout layout(Index sequence) const {
    const Index length = this->length(sequence);
    KVCacheLayout layout;
    const auto add = [&layout](Index row, Index position, Index count) {
      if (count > 0) layout.spans[layout.count++] = {row, position, count};
    };
    if (!options_.ring) {
      add(0, 0, length);
      return layout;
    }
    const Index sinks = std::min(options_.sink_tokens, length);
    add(0, 0, sinks);
    const Index first = first_retained_[static_cast<std::size_t>(sequence)];
    const Index count = length - first;
    if (count <= 0) return layout;
    const Index first_row = row_of(first);
    const Index before_wrap = std::min(count, capacity() - first_row);
    add(first_row, first, before_wrap);
    add(options_.sink_tokens, first + before_wrap, count - before_wrap);
    return layout;
  }

  // The storage: [B, Hkv, capacity, D] and [B, Hkv, capacity, Dv] (blocks for q8_block:
  // [..., ceil(D / 32)] and [..., ceil(Dv / 32)]).
  TensorView<const T, 4> keys() const { return keys_; }
  TensorView<const T, 4> values() const { return values_; }

  // k: [B, Hkv, n, D]  v: [B, Hkv, n, Dv]
  // Appends n steps to every sequence (positions length .. length + n - 1).
  void append(TensorView<const input_type, 4> k, TensorView<const input_type, 4> v) {
    append(k, v, std::vector<Index>(static_cast<std::size_t>(batch()), k.size(2)));
  }

  // k: [B, Hkv, n, D]  v: [B, Hkv, n, Dv]  counts: B values in [0, n]
  // Appends the first counts[b] steps of k[b] and v[b] to sequence b (a ragged append). Without
  // ring mode a sequence may not grow past capacity.
  void append(TensorView<const input_type, 4> k, TensorView<const input_type, 4> v,
              const std::vector<Index>& counts) {
    constexpr const char* kFunction = "KVCache::append";
    const detail::UseGuard::Mutation mutation(guard_, "cache", kFunction);
    detail::require_valid_view(kFunction, "k", k);
    detail::require_valid_view(kFunction, "v", v);
    detail::require_extent(kFunction, "k", k, 0, "the cache's batch (B)", batch());
    detail::require_extent(kFunction, "k", k, 1, "the cache's heads_kv (Hkv)", heads_kv());
    detail::require_extent(kFunction, "k", k, 3, "the cache's dim (D)", dim());
    detail::require_extent(kFunction, "v", v, 0, "the cache's batch (B)", batch());
    detail::require_extent(kFunction, "v", v, 1, "the cache's heads_kv (Hkv)", heads_kv());
    detail::require_extent(kFunction, "v", v, 2, "k.shape[2] (n)", k.size(2));
    detail::require_extent(kFunction, "v", v, 3, "the cache's dim_v (Dv)", dim_v());
    detail::require_disjoint(kFunction, "the cache's keys", keys_, "k", k);
    detail::require_disjoint(kFunction, "the cache's keys", keys_, "v", v);
    detail::require_disjoint(kFunction, "the cache's values", values_, "k", k);
    detail::require_disjoint(kFunction, "the cache's values", values_, "v", v);
    check(static_cast<Index>(counts.size()) == batch(), kFunction,
          ": counts must have one entry per sequence (", batch(), "), got ", counts.size());
    for (Index b = 0; b < batch(); ++b) {
      const Index count = counts[static_cast<std::size_t>(b)];
      check(count >= 0 && count <= k.size(2), kFunction, ": counts[", b,
            "] must be in [0, n = ", k.size(2), "], got ", count);
      const Index length = lengths_[static_cast<std::size_t>(b)];
      check(count <= std::numeric_limits<Index>::max() - length, kFunction, ": sequence ", b,
            " holds ", length, " tokens; appending ", count,
            " would overflow its position (positions are int64)");
      check(options_.ring || count <= capacity() - length, kFunction, ": sequence ", b, " holds ",
            length, " tokens; appending ", count, " would exceed the capacity of ", capacity(),
            " (not a ring buffer)");
    }
    for (Index b = 0; b < batch(); ++b) {
      const auto index = static_cast<std::size_t>(b);
      const Index count = counts[index];
      const Index start = lengths_[index];
      // In a ring, the steps that a later step of this call overwrites, [overwritten_begin,
      // overwritten_end), are never written (nor visited: n may be huge for an empty k).
      const Index overwritten_begin = std::clamp<Index>(options_.sink_tokens - start, 0, count);
      const Index overwritten_end =
          options_.ring ? std::max(overwritten_begin, count - ring_rows()) : overwritten_begin;
      touched_.clear();
      for (Index step = 0; step < count && heads_kv() > 0; ++step) {
        if (step == overwritten_begin) step = overwritten_end;
        if (step >= count) break;
        const Index position = start + step;
        const Index row = row_of(position);
        for (Index h = 0; h < heads_kv(); ++h) {
          detail::store_row(k.address(b, h, step, 0), k.stride(3), keys_.address(b, h, row, 0),
                            dim());
          detail::store_row(v.address(b, h, step, 0), v.stride(3), values_.address(b, h, row, 0),
                            dim_v());
        }
        touch_row(row);
      }
      lengths_[index] = start + count;
      if (options_.ring)
        first_retained_[index] = std::max(first_retained_[index], start + count - ring_rows());
      recompute_touched(b);
    }
  }

  // Recomputes every page bound from the stored keys: for a cache over caller memory whose
  // stored keys the caller changed in place (append, truncate and reset keep them current).
  void refresh_page_bounds() {
    const detail::UseGuard::Mutation mutation(guard_, "cache", "KVCache::refresh_page_bounds");
    refresh_bounds();
  }

  // Every sequence longer than `length` is cut to `length` (speculative-decoding rollback).
  void truncate(Index length) {
    const detail::UseGuard::Mutation mutation(guard_, "cache", "KVCache::truncate");
    check(length >= 0, "KVCache::truncate: length must be >= 0, got ", length);
    for (Index b = 0; b < batch(); ++b)
      if (lengths_[static_cast<std::size_t>(b)] > length) cut(b, length);
  }

  // Cuts `sequence` to `length` <= its length.
  void truncate(Index sequence, Index length) {
    const detail::UseGuard::Mutation mutation(guard_, "cache", "KVCache::truncate");
    require_sequence("truncate", sequence);
    const Index current = lengths_[static_cast<std::size_t>(sequence)];
    check(length >= 0 && length <= current, "KVCache::truncate: length of sequence ", sequence,
          " must be in [0, ", current, "], got ", length);
    cut(sequence, length);
  }

  // Empties every sequence (the storage keeps its contents until overwritten).
  void reset() {
    const detail::UseGuard::Mutation mutation(guard_, "cache", "KVCache::reset");
    lengths_.assign(static_cast<std::size_t>(batch()), 0);
    first_retained_.assign(static_cast<std::size_t>(batch()), options_.sink_tokens);
    clear_bounds();
  }

 private:
  void require_options(Index capacity) const {
    check(options_.sink_tokens >= 0 && options_.sink_tokens <= capacity,
          "KVCache: sink_tokens must be in [0, capacity = ", capacity, "], got ",
          options_.sink_tokens);
    check(!options_.ring || options_.sink_tokens < capacity,
          "KVCache: a ring buffer needs capacity > sink_tokens (room for non-sink tokens), got "
          "capacity = ",
          capacity, " and sink_tokens = ", options_.sink_tokens);
  }

  void require_sequence(const char* method, Index sequence) const {
    check(sequence >= 0 && sequence < batch(), "KVCache::", method, ": sequence must be in [0, ",
          batch(), "), got ", sequence);
  }

  Index ring_rows() const { return capacity() - options_.sink_tokens; }

  // Positions from `length` on are dropped; stored ones before it stay.
  void cut(Index sequence, Index length) {
    const auto index = static_cast<std::size_t>(sequence);
    // The rows of the dropped positions leave their pages (at most one row per storage row).
    touched_.clear();
    // No heads: no bounds to update (and the capacity of storage of no elements may be huge).
    const Index dropped = std::min(lengths_[index] - length, capacity());
    for (Index position = length;
         position < length + dropped && options_.page_bounds > 0 && heads_kv() > 0; ++position)
      touch_row(row_of(position));
    lengths_[index] = length;
    // Positions in [length, first_retained) were overwritten: nothing but sinks is left, and
    // the tokens appended next start a fresh run.
    if (length < first_retained_[index])
      first_retained_[index] = std::max(length, options_.sink_tokens);
    recompute_touched(sequence);
  }

  void allocate_bounds() {
    check(options_.page_bounds >= 0 && options_.page_bounds <= (Index{1} << 30),
          "KVCache: page_bounds must be in [0, 2**30] (rows per page; 0 = no page bounds), got ",
          options_.page_bounds);
    if (options_.page_bounds == 0) return;
    bounds_ =
        Tensor<page_bound_t<T>, 5>({batch(), heads_kv(), pages(), 2, dim()}, "KVCache page bounds");
    // Scratch of one page's exact extremes: no bounds, no scratch (the extents of empty
    // storage may be huge).
    if (bounds_.numel() > 0) extremes_.resize(static_cast<std::size_t>(2 * dim()));
  }

  // Every page empty: +inf / -inf.
  void clear_bounds() {
    using B = page_bound_t<T>;
    using C = compute_type_t<T>;
    constexpr C kInf = std::numeric_limits<C>::infinity();
    const B low = detail::bound_toward<B>(kInf, false), high = detail::bound_toward<B>(-kInf, true);
    B* bound = bounds_.data();
    for (Index page = 0; page < batch() * heads_kv() * pages(); ++page, bound += 2 * dim()) {
      std::fill_n(bound, dim(), low);
      std::fill_n(bound + dim(), dim(), high);
    }
  }

  // Marks the page of `row` for recomputation (consecutive rows share a page: pushed once).
  void touch_row(Index row) {
    if (options_.page_bounds == 0) return;
    const Index page = row / options_.page_bounds;
    if (touched_.empty() || touched_.back() != page) touched_.push_back(page);
  }

  void recompute_touched(Index sequence) {
    if (options_.page_bounds == 0 || touched_.empty()) return;
    std::sort(touched_.begin(), touched_.end());
    touched_.erase(std::unique(touched_.begin(), touched_.end()), touched_.end());
    recompute_pages(sequence);
  }

  void refresh_bounds() {
    // No heads: no bounds (and storage of no elements may have a huge capacity).
    for (Index b = 0; b < batch() && options_.page_bounds > 0 && heads_kv() > 0; ++b) {
      touched_.clear();
      for (Index page = 0; page < pages(); ++page) touched_.push_back(page);
      recompute_pages(b);
    }
  }

  // The bounds of pages touched_ of `sequence` from the keys of their stored rows.
  void recompute_pages(Index sequence) {
    using B = page_bound_t<T>;
    using C = compute_type_t<T>;
    const KVCacheLayout stored = layout(sequence);
    const Index page_size = options_.page_bounds;
    for (const Index page : touched_) {
      const Index row_begin = page * page_size;
      const Index row_end = std::min(capacity(), row_begin + page_size);
      for (Index h = 0; h < heads_kv(); ++h) {
        C* low = extremes_.data();
        C* high = low + dim();
        std::fill_n(low, dim(), std::numeric_limits<C>::infinity());
        std::fill_n(high, dim(), -std::numeric_limits<C>::infinity());
        for (int s = 0; s < stored.count; ++s) {
          const Index first = std::max(row_begin, stored.spans[s].row);
          const Index last = std::min(row_end, stored.spans[s].row + stored.spans[s].count);
          for (Index row = first; row < last; ++row) {
            const T* key = keys_.address(sequence, h, row, 0);
            for (Index d = 0; d < dim(); ++d) {
              const C x = detail::stored_value(key, d);
              low[d] = std::min(low[d], x);
              high[d] = std::max(high[d], x);
            }
          }
        }
        B* bound = bounds_.view().address(sequence, h, page, 0, 0);
        for (Index d = 0; d < dim(); ++d) {
          bound[d] = detail::bound_toward<B>(low[d], false);
          bound[dim() + d] = detail::bound_toward<B>(high[d], true);
        }
      }
    }
  }

  KVCacheOptions options_;
  Tensor<T, 4> keys_owned_;
  Tensor<T, 4> values_owned_;
  TensorView<T, 4> keys_;
  TensorView<T, 4> values_;
  Index dim_ = 0;    // D (values per stored key row)
  Index dim_v_ = 0;  // Dv
  std::vector<Index> lengths_;
  std::vector<Index> first_retained_;
  Tensor<page_bound_t<T>, 5> bounds_;        // [B, Hkv, pages, 2, D] with page bounds
  std::vector<compute_type_t<T>> extremes_;  // [2, D]: a page's exact min and max
  std::vector<Index> touched_;               // pages to recompute (append, truncate)
  detail::UseGuard guard_;
};

}  // namespace foveal
