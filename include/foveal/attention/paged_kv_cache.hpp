// foveal/attention/paged_kv_cache.hpp — a pool of fixed-size K/V pages shared by many sequences.
#pragma once

#include <cstddef>
#include <map>
#include <vector>

#include "foveal/attention/kv_cache.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"
#include "foveal/detail/use_guard.hpp"

namespace foveal {

// Keys and values of many sequences in one pool of pages, for a server that decodes sequences
// of very different lengths that come and go. A page holds `page_size` consecutive tokens of one
// sequence for every kv head: keys [num_pages, Hkv, page_size, D], values [num_pages, Hkv,
// page_size, Dv]. A sequence is a page table (its pages in position order) and a length; token
// p sits in slot p % page_size of page table[p / page_size]. Sequences hold only the pages they
// use: pages in use = sum over sequences of ceil(length / page_size), minus what is shared.
//
// Sharing. fork(parent) gives a new sequence that shares the parent's full pages (copy-on-write)
// and a copy of its partial last page, so parallel samples of one prompt hold the prompt once.
// A shared page is never written: an append that would write into one (after a truncate into
// shared pages) copies it first. batch_decode_attention (batch_attention.hpp) finds shared
// pages in the page tables and reads them once for all the sequences that share them.
//
// Errors. Every rejected call throws before changing anything: an unknown or removed sequence
// id, a bad shape or length throw foveal::Error; a call that needs more pages than are free
// throws foveal::MemoryError ("the pool has 3 free pages ... needs 7"), so a server can catch it
// to preempt a sequence, and every sequence is as it was.
//
// Storage. Owned pools are 64-byte aligned and zeroed lazily (pages never written take no
// memory), and stored head-major (keys() is a [num_pages, Hkv, page_size, D] view of
// [Hkv, num_pages, page_size, D] memory), so the pages p, p + 1, ... of a long append, which
// the free stack hands out in order, are one run of rows per head that attention reads as
// whole blocks. A pool over caller memory (e.g. the two halves of a torch tensor [num_pages, 2,
// Hkv, page_size, D]) must outlive the cache. Sequence ids are never reused.
//
// Released pages. A sliding-window layer never reads its old tokens again: release(sequence,
// begin, end) frees the sequence's pages that lie wholly inside positions [begin, end) (with
// window_left w and s sinks, [s, p - w) once the next query sits at position p), so the pages
// a windowed sequence holds stay bounded by its window and sinks. A released page stays in the page
// table as kReleased (-1), positions keep their numbers, and a batch call whose queries would see a
// released position throws foveal::Error naming it. A fork shares the parent's released entries
// (nothing to share); truncate may cut whole released pages off but not into one.
//
// 8-bit pools (PagedKVCache<q8_block>). Each row of D values is stored as ceil(D / 32) blocks of
// 32 int8 values and a float scale (foveal::q8_block, as in KVCache<q8_block>): append takes
// float32 K and V and quantizes them, keys() and values() are views of blocks, and dim() /
// dim_v() count values, not blocks. Over caller memory, D is 32 values per block.
//
// Threads. Any number of threads may read the cache at once (batch_decode_attention); add, fork,
// append, truncate and remove must run alone: overlapping misuse throws foveal::Error ("the
// paged cache is being modified by another thread") and changes nothing.
template <typename T>
class PagedKVCache {
 public:
  // What append takes: float for an 8-bit pool, T otherwise.
  using input_type = detail::cache_input_t<T>;
  // A page table's entry for a released page.
  static constexpr Index kReleased = -1;

  // An owned pool of `num_pages` pages of `page_size` tokens.
  PagedKVCache(Index num_pages, Index page_size, Index heads_kv, Index dim, Index dim_v);

  // A pool over caller memory: keys [num_pages, Hkv, page_size, D] and values [num_pages, Hkv,
  // page_size, Dv], unit innermost stride, not overlapping. The engine addresses a page's rows
  // from the pool's first row, so each view's page stride must be a whole number of its row
  // stride, the same number for keys and values (true for contiguous pools and for the halves
  // of a [num_pages, 2, Hkv, page_size, D] tensor).
  PagedKVCache(TensorView<T, 4> keys, TensorView<T, 4> values);

  Index num_pages() const { return keys_.size(0); }
  Index heads_kv() const { return keys_.size(1); }
  Index page_size() const { return keys_.size(2); }
  // Values per key and per value row (for an 8-bit pool, not the blocks that hold them).
  Index dim() const { return dim_; }
  Index dim_v() const { return dim_v_; }

  Index free_pages() const { return static_cast<Index>(free_.size()); }
  Index pages_in_use() const { return num_pages() - free_pages(); }
  // Bytes of K and V one page holds (all heads).
  std::size_t page_bytes() const {
    return static_cast<std::size_t>(heads_kv() * page_size() * (keys_.size(3) + values_.size(3))) *
           sizeof(T);
  }
  // How many page tables hold `page` (0: free).
  Index references(Index page) const;

  // Starts an empty sequence and returns its id.
  Index add_sequence();
  // Starts a sequence holding the tokens of `parent`: its full pages shared, its partial last
  // page (if any) copied to a new page. Returns the new id.
  Index fork(Index parent);
  // Frees the sequence's pages (those no other sequence holds) and forgets its id.
  void remove(Index sequence);
  // Cuts `sequence` to `length` <= its length, freeing the pages it no longer needs. A length
  // inside a released page (not at its start) is an error.
  void truncate(Index sequence, Index length);
  // Releases the pages of `sequence` that lie wholly inside positions [begin, end), 0 <= begin
  // <= end <= its length (a page shared with another sequence is freed when its last holder
  // lets it go). Returns how many of its pages this call released.
  Index release(Index sequence, Index begin, Index end);
  // Whether `sequence` still holds the key at `position` (false once its page is released).
  bool holds(Index sequence, Index position) const;
  // How many of the pages in `sequence`'s table are released.
  Index released_pages(Index sequence) const { return find(sequence, "released_pages").released; }

  // k: [Hkv, n, D]  v: [Hkv, n, Dv]: appends n tokens to `sequence`.
  void append(Index sequence, TensorView<const input_type, 3> k, TensorView<const input_type, 3> v);
  // k: [S, Hkv, n, D]  v: [S, Hkv, n, Dv]  counts: S values in [0, n] (empty: all n)
  // Appends the first counts[s] tokens of k[s], v[s] to sequences[s] (distinct ids), all or
  // nothing: if the pool cannot hold every append, none happens.
  void append(const std::vector<Index>& sequences, TensorView<const input_type, 4> k,
              TensorView<const input_type, 4> v, const std::vector<Index>& counts = {});

  bool contains(Index sequence) const { return sequences_.count(sequence) != 0; }
  Index length(Index sequence) const { return find(sequence, "length").length; }
  // The pages of `sequence` in position order (kReleased for released pages).
  const std::vector<Index>& page_table(Index sequence) const {
    return find(sequence, "page_table").pages;
  }
  // The ids of the live sequences, increasing.
  std::vector<Index> sequences() const;

  // The pool: [num_pages, Hkv, page_size, D] and [num_pages, Hkv, page_size, Dv] (the last
  // extent in blocks for an 8-bit pool).
  TensorView<const T, 4> keys() const { return keys_; }
  TensorView<const T, 4> values() const { return values_; }
  // Rows of the pool's row stride from one page to the next (same for keys and values): slot
  // r of page p of head h is row p * page_rows() + r counted from keys().data() + h * stride(1).
  Index page_rows() const { return page_rows_; }

  // Held by a call that reads the cache for its whole run (see Threads above).
  detail::UseGuard::Read read_guard(const char* function) const {
    return detail::UseGuard::Read(guard_, "paged cache", function);
  }

 private:
  struct Sequence {
    std::vector<Index> pages;
    Index length = 0;
    Index released = 0;  // entries of pages that are kReleased
  };

  void validate_pool();
  const Sequence& find(Index sequence, const char* method) const;
  Sequence& find(Index sequence, const char* method);
  void require_pages(const char* function, Index needed, const char* what) const;
  Index take_page();
  // Drops one reference to `page` (none for kReleased); a page nobody holds is free again.
  void unreference(Index page);
  void copy_slots(Index from_page, Index to_page, Index slots);
  // Pages an append of `count` tokens to `sequence` takes from the pool; `copied` counts the
  // shared pages earlier appends of the same call copy.
  Index pages_for_append(const Sequence& sequence, Index count,
                         std::map<Index, Index>& copied) const;
  void append_rows(Sequence& sequence, TensorView<const input_type, 3> k,
                   TensorView<const input_type, 3> v, Index count);

  Tensor<T, 4> keys_owned_;
  Tensor<T, 4> values_owned_;
  TensorView<T, 4> keys_;
  TensorView<T, 4> values_;
  Index page_rows_ = 0;
  Index dim_ = 0;
  Index dim_v_ = 0;
  std::map<Index, Sequence> sequences_;
  Index next_id_ = 0;
  std::vector<Index> free_;        // a stack: the next page handed out is free_.back()
  std::vector<Index> references_;  // per page
  detail::UseGuard guard_;
};

extern template class PagedKVCache<float>;
extern template class PagedKVCache<double>;
extern template class PagedKVCache<bfloat16>;
extern template class PagedKVCache<float16>;
extern template class PagedKVCache<q8_block>;

}  // namespace foveal
