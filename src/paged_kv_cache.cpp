// foveal::PagedKVCache: page tables, reference counts and a free stack over one pool.
//
// Every mutating method validates everything and counts the pages it will take before it
// changes anything, so a rejected call (including pool exhaustion) leaves every sequence as it
// was. The free stack hands out the lowest-numbered page first at the start and the most
// recently freed page afterwards: a server that frees and allocates keeps touching the same
// (already resident) pages, so resident memory stays flat.
#include "foveal/attention/paged_kv_cache.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <string>
#include <utility>

#include "foveal/attention/kv_cache.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {

namespace {

Index ceil_div(Index a, Index b) { return a / b + (a % b != 0 ? 1 : 0); }

// view[s] of a [S, ...] view.
template <typename T>
TensorView<const T, 3> entry(const TensorView<const T, 4>& view, Index s) {
  return TensorView<const T, 3>(view.data() + s * view.stride(0),
                                {view.size(1), view.size(2), view.size(3)},
                                {view.stride(1), view.stride(2), view.stride(3)});
}

// True when the pages of keys and values interleave without touching: both views step by the
// same page stride and each page of values fits in the gap between two pages of keys (the two
// halves of a [num_pages, 2, Hkv, page_size, D] tensor). Their byte spans overlap, so the
// general disjointness check would reject them.
template <typename T>
bool pages_interleave(const TensorView<T, 4>& keys, const TensorView<T, 4>& values) {
  const Index page_stride = keys.stride(0);
  if (page_stride <= 0 || values.stride(0) != page_stride) return false;
  for (int d = 1; d < 4; ++d)
    if (keys.stride(d) < 0 || values.stride(d) < 0) return false;
  const auto extent = [](const TensorView<T, 4>& view) {  // elements one page spans
    Index span = 1;
    for (int d = 1; d < 4; ++d) span += (view.size(d) - 1) * view.stride(d);
    return span;
  };
  const Index offset = ((values.data() - keys.data()) % page_stride + page_stride) % page_stride;
  return offset >= extent(keys) && page_stride - offset >= extent(values);
}

}  // namespace

template <typename T>
PagedKVCache<T>::PagedKVCache(Index num_pages, Index page_size, Index heads_kv, Index dim,
                              Index dim_v) {
  check(num_pages >= 0 && page_size >= 1 && heads_kv >= 1 && dim >= 1 && dim_v >= 0,
        "PagedKVCache: sizes must be num_pages >= 0, page_size >= 1, heads_kv >= 1, dim >= 1, "
        "dim_v >= 0, got num_pages = ",
        num_pages, ", page_size = ", page_size, ", heads_kv = ", heads_kv, ", dim = ", dim,
        ", dim_v = ", dim_v);
  // Head-major storage [Hkv, num_pages, page_size, D] seen as [num_pages, Hkv, page_size, D]:
  // the rows of consecutive pages of one head are consecutive, so a sequence whose pages are
  // consecutive (what a long append gets from the free stack) is read as long blocks.
  keys_owned_ = Tensor<T, 4>({heads_kv, num_pages, page_size, detail::stored_width<T>(dim)},
                             "PagedKVCache keys");
  values_owned_ = Tensor<T, 4>({heads_kv, num_pages, page_size, detail::stored_width<T>(dim_v)},
                               "PagedKVCache values");
  keys_ = keys_owned_.view().transpose(0, 1);
  values_ = values_owned_.view().transpose(0, 1);
  page_rows_ = page_size;
  dim_ = dim;
  dim_v_ = dim_v;
  validate_pool();
}

template <typename T>
PagedKVCache<T>::PagedKVCache(TensorView<T, 4> keys, TensorView<T, 4> values)
    : keys_(keys), values_(values) {
  constexpr const char* kFunction = "PagedKVCache";
  detail::require_valid_view(kFunction, "keys", keys);
  detail::require_valid_view(kFunction, "values", values);
  detail::require_extent(kFunction, "values", values, 0, "keys.shape[0] (num_pages)", keys.size(0));
  detail::require_extent(kFunction, "values", values, 1, "keys.shape[1] (Hkv)", keys.size(1));
  detail::require_extent(kFunction, "values", values, 2, "keys.shape[2] (page_size)", keys.size(2));
  check(keys.size(1) >= 1 && keys.size(2) >= 1 && keys.size(3) >= 1, kFunction,
        ": keys must have Hkv >= 1, page_size >= 1 and D >= 1, got shape [", keys.size(0), ", ",
        keys.size(1), ", ", keys.size(2), ", ", keys.size(3), "]");
  detail::require_unit_inner_stride(kFunction, "keys", keys);
  detail::require_unit_inner_stride(kFunction, "values", values);
  if (!pages_interleave(keys, values))
    detail::require_disjoint(kFunction, "keys", keys, "values", values);
  // Rows are addressed as page * page_rows + slot from the pool's first row.
  const auto rows_per_page = [kFunction](const char* name, const TensorView<T, 4>& view) {
    if (view.size(0) <= 1) return Index{-1};  // one page: any stride works
    check(view.stride(2) > 0 && view.stride(0) > 0 && view.stride(0) % view.stride(2) == 0,
          kFunction, ": ", name, ".stride(0) (page stride, ", view.stride(0),
          ") must be a positive multiple of ", name, ".stride(2) (row stride, ", view.stride(2),
          ")");
    return view.stride(0) / view.stride(2);
  };
  // (The views are valid: their element counts, hence these products, fit an Index.)
  dim_ = keys.size(3) * KVCache<T>::kValuesPerElement;
  dim_v_ = values.size(3) * KVCache<T>::kValuesPerElement;
  const Index key_rows = rows_per_page("keys", keys);
  const Index value_rows = dim_v() > 0 ? rows_per_page("values", values) : key_rows;
  check(key_rows == value_rows || value_rows == -1 || key_rows == -1, kFunction,
        ": keys and values must be as many rows apart from page to page (keys.stride(0) / "
        "keys.stride(2) = ",
        key_rows, ", values.stride(0) / values.stride(2) = ", value_rows, ")");
  page_rows_ = key_rows != -1 ? key_rows : std::max<Index>(value_rows, 0);
  validate_pool();
}

template <typename T>
void PagedKVCache<T>::validate_pool() {
  check(num_pages() <= std::numeric_limits<Index>::max() / std::max<Index>(page_size(), 1),
        "PagedKVCache: num_pages * page_size overflows");
  references_.assign(static_cast<std::size_t>(num_pages()), 0);
  free_.clear();
  for (Index page = num_pages() - 1; page >= 0; --page) free_.push_back(page);
}

template <typename T>
Index PagedKVCache<T>::references(Index page) const {
  check(page >= 0 && page < num_pages(), "PagedKVCache::references: page must be in [0, ",
        num_pages(), "), got ", page);
  return references_[static_cast<std::size_t>(page)];
}

template <typename T>
const typename PagedKVCache<T>::Sequence& PagedKVCache<T>::find(Index sequence,
                                                                const char* method) const {
  const auto found = sequences_.find(sequence);
  check(found != sequences_.end(), "PagedKVCache::", method, ": sequence ", sequence,
        " is not in the cache (never added, or removed)");
  return found->second;
}

template <typename T>
typename PagedKVCache<T>::Sequence& PagedKVCache<T>::find(Index sequence, const char* method) {
  return const_cast<Sequence&>(std::as_const(*this).find(sequence, method));
}

template <typename T>
std::vector<Index> PagedKVCache<T>::sequences() const {
  std::vector<Index> ids;
  ids.reserve(sequences_.size());
  for (const auto& entry : sequences_) ids.push_back(entry.first);
  return ids;
}

template <typename T>
void PagedKVCache<T>::require_pages(const char* function, Index needed, const char* what) const {
  if (needed <= free_pages()) return;
  throw MemoryError("foveal: " + std::string(function) + ": the pool has " +
                    std::to_string(free_pages()) + " free pages of " + std::to_string(num_pages()) +
                    " (" + std::to_string(page_size()) + " tokens each), but " + what + " needs " +
                    std::to_string(needed) +
                    "; nothing was changed (remove or truncate a sequence, or use a larger pool)");
}

template <typename T>
Index PagedKVCache<T>::take_page() {
  const Index page = free_.back();
  free_.pop_back();
  references_[static_cast<std::size_t>(page)] = 1;
  return page;
}

template <typename T>
void PagedKVCache<T>::unreference(Index page) {
  if (page == kReleased) return;
  if (--references_[static_cast<std::size_t>(page)] == 0) free_.push_back(page);
}

template <typename T>
void PagedKVCache<T>::copy_slots(Index from_page, Index to_page, Index slots) {
  for (Index h = 0; h < heads_kv(); ++h)
    for (Index r = 0; r < slots; ++r) {
      detail::copy_strided_row(keys_.address(from_page, h, r, 0), 1,
                               keys_.address(to_page, h, r, 0), keys_.size(3));
      detail::copy_strided_row(values_.address(from_page, h, r, 0), 1,
                               values_.address(to_page, h, r, 0), values_.size(3));
    }
}

template <typename T>
Index PagedKVCache<T>::add_sequence() {
  const detail::UseGuard::Mutation mutation(guard_, "paged cache", "PagedKVCache::add_sequence");
  const Index id = next_id_++;
  sequences_.emplace(id, Sequence{});
  return id;
}

template <typename T>
Index PagedKVCache<T>::fork(Index parent) {
  constexpr const char* kFunction = "PagedKVCache::fork";
  const detail::UseGuard::Mutation mutation(guard_, "paged cache", kFunction);
  const Sequence& source = find(parent, "fork");
  const Index partial = source.length % page_size();
  require_pages(kFunction, partial > 0 ? 1 : 0, "copying the parent's partial last page");
  Sequence child;
  child.length = source.length;
  child.pages = source.pages;
  child.released = source.released;
  const Index full = source.length / page_size();
  for (Index i = 0; i < full; ++i)
    if (child.pages[i] != kReleased) ++references_[static_cast<std::size_t>(child.pages[i])];
  if (partial > 0) {
    const Index copy = take_page();
    copy_slots(source.pages[static_cast<std::size_t>(full)], copy, partial);
    child.pages[static_cast<std::size_t>(full)] = copy;
  }
  const Index id = next_id_++;
  sequences_.emplace(id, std::move(child));
  return id;
}

template <typename T>
void PagedKVCache<T>::remove(Index sequence) {
  const detail::UseGuard::Mutation mutation(guard_, "paged cache", "PagedKVCache::remove");
  const Sequence& found = find(sequence, "remove");
  for (Index page : found.pages) unreference(page);
  sequences_.erase(sequence);
}

template <typename T>
void PagedKVCache<T>::truncate(Index sequence, Index length) {
  const detail::UseGuard::Mutation mutation(guard_, "paged cache", "PagedKVCache::truncate");
  Sequence& found = find(sequence, "truncate");
  check(length >= 0 && length <= found.length, "PagedKVCache::truncate: length of sequence ",
        sequence, " must be in [0, ", found.length, "], got ", length);
  const auto keep = static_cast<std::size_t>(ceil_div(length, page_size()));
  // Appends would write into the kept partial page, which a released one no longer is.
  check(length % page_size() == 0 || found.pages[keep - 1] != kReleased,
        "PagedKVCache::truncate: length ", length, " of sequence ", sequence,
        " would end inside a released page (positions [", (length / page_size()) * page_size(),
        ", ", (length / page_size() + 1) * page_size(), ")); cut at a page boundary or later");
  for (std::size_t i = keep; i < found.pages.size(); ++i) {
    found.released -= found.pages[i] == kReleased ? 1 : 0;
    unreference(found.pages[i]);
  }
  found.pages.resize(keep);
  found.length = length;
}

template <typename T>
Index PagedKVCache<T>::release(Index sequence, Index begin, Index end) {
  const detail::UseGuard::Mutation mutation(guard_, "paged cache", "PagedKVCache::release");
  Sequence& found = find(sequence, "release");
  check(begin >= 0 && begin <= end && end <= found.length, "PagedKVCache::release: positions [",
        begin, ", ", end, ") of sequence ", sequence,
        " must satisfy 0 <= begin <= end <= ", found.length, " (its length)");
  Index count = 0;
  // The pages wholly inside [begin, end): from the first that starts at or after begin to the
  // last that ends at or before end (never the partial last page: end <= length).
  for (Index index = ceil_div(begin, page_size()); index < end / page_size(); ++index) {
    Index& page = found.pages[static_cast<std::size_t>(index)];
    if (page == kReleased) continue;
    unreference(page);
    page = kReleased;
    ++count;
  }
  found.released += count;
  return count;
}

template <typename T>
bool PagedKVCache<T>::holds(Index sequence, Index position) const {
  const Sequence& found = find(sequence, "holds");
  return position >= 0 && position < found.length &&
         found.pages[static_cast<std::size_t>(position / page_size())] != kReleased;
}

template <typename T>
Index PagedKVCache<T>::pages_for_append(const Sequence& sequence, Index count,
                                        std::map<Index, Index>& copied) const {
  if (count == 0) return 0;
  const Index partial = sequence.length % page_size();
  // Writing into a shared partial page copies it first (and the copy drops a reference, so a
  // later sequence of the same call may find the page no longer shared).
  bool copy = false;
  if (partial > 0) {
    const Index page = sequence.pages.back();
    copy = references_[static_cast<std::size_t>(page)] - copied[page] > 1;
    if (copy) ++copied[page];
  }
  return (copy ? 1 : 0) + ceil_div(sequence.length + count, page_size()) -
         static_cast<Index>(sequence.pages.size());
}

template <typename T>
void PagedKVCache<T>::append_rows(Sequence& sequence, TensorView<const input_type, 3> k,
                                  TensorView<const input_type, 3> v, Index count) {
  if (count == 0) return;
  const Index partial = sequence.length % page_size();
  if (partial > 0 && references_[static_cast<std::size_t>(sequence.pages.back())] > 1) {
    const Index copy = take_page();
    copy_slots(sequence.pages.back(), copy, partial);
    unreference(sequence.pages.back());
    sequence.pages.back() = copy;
  }
  for (Index step = 0; step < count; ++step) {
    const Index position = sequence.length + step;
    const Index slot = position % page_size();
    if (slot == 0) sequence.pages.push_back(take_page());
    const Index page = sequence.pages.back();
    for (Index h = 0; h < heads_kv(); ++h) {
      detail::store_row<T>(k.address(h, step, 0), k.stride(2), keys_.address(page, h, slot, 0),
                           dim());
      detail::store_row<T>(v.address(h, step, 0), v.stride(2), values_.address(page, h, slot, 0),
                           dim_v());
    }
  }
  sequence.length += count;
}

template <typename T>
void PagedKVCache<T>::append(Index sequence, TensorView<const input_type, 3> k,
                             TensorView<const input_type, 3> v) {
  const TensorView<const input_type, 4> k4(k.data(), {1, k.size(0), k.size(1), k.size(2)},
                                           {0, k.stride(0), k.stride(1), k.stride(2)});
  const TensorView<const input_type, 4> v4(v.data(), {1, v.size(0), v.size(1), v.size(2)},
                                           {0, v.stride(0), v.stride(1), v.stride(2)});
  append(std::vector<Index>{sequence}, k4, v4);
}

template <typename T>
void PagedKVCache<T>::append(const std::vector<Index>& sequences, TensorView<const input_type, 4> k,
                             TensorView<const input_type, 4> v, const std::vector<Index>& counts) {
  constexpr const char* kFunction = "PagedKVCache::append";
  const detail::UseGuard::Mutation mutation(guard_, "paged cache", kFunction);
  const auto num = static_cast<Index>(sequences.size());
  detail::require_valid_view(kFunction, "k", k);
  detail::require_valid_view(kFunction, "v", v);
  detail::require_extent(kFunction, "k", k, 0, "the number of sequences (S)", num);
  detail::require_extent(kFunction, "k", k, 1, "the cache's heads_kv (Hkv)", heads_kv());
  detail::require_extent(kFunction, "k", k, 3, "the cache's dim (D)", dim());
  detail::require_extent(kFunction, "v", v, 0, "the number of sequences (S)", num);
  detail::require_extent(kFunction, "v", v, 1, "the cache's heads_kv (Hkv)", heads_kv());
  detail::require_extent(kFunction, "v", v, 2, "k.shape[2] (n)", k.size(2));
  detail::require_extent(kFunction, "v", v, 3, "the cache's dim_v (Dv)", dim_v());
  detail::require_disjoint(kFunction, "the pool's keys", keys_, "k", k);
  detail::require_disjoint(kFunction, "the pool's keys", keys_, "v", v);
  detail::require_disjoint(kFunction, "the pool's values", values_, "k", k);
  detail::require_disjoint(kFunction, "the pool's values", values_, "v", v);
  check(counts.empty() || static_cast<Index>(counts.size()) == num, kFunction,
        ": counts must be empty or have one entry per sequence (", num, "), got ", counts.size());
  Index needed = 0;
  std::map<Index, Index> copied;
  for (Index s = 0; s < num; ++s) {
    const Index id = sequences[static_cast<std::size_t>(s)];
    const Sequence& found = find(id, "append");
    for (Index t = 0; t < s; ++t)
      check(sequences[static_cast<std::size_t>(t)] != id, kFunction, ": sequence ", id,
            " is listed twice (at ", t, " and ", s, ")");
    const Index count = counts.empty() ? k.size(2) : counts[static_cast<std::size_t>(s)];
    check(count >= 0 && count <= k.size(2), kFunction, ": counts[", s,
          "] must be in [0, n = ", k.size(2), "], got ", count);
    check(count <= std::numeric_limits<Index>::max() / 2 - found.length, kFunction, ": sequence ",
          id, " would overflow its position");
    needed += pages_for_append(found, count, copied);
  }
  require_pages(kFunction, needed, "this append");
  for (Index s = 0; s < num; ++s) {
    const Index count = counts.empty() ? k.size(2) : counts[static_cast<std::size_t>(s)];
    append_rows(find(sequences[static_cast<std::size_t>(s)], "append"), entry(k, s), entry(v, s),
                count);
  }
}

template class PagedKVCache<float>;
template class PagedKVCache<double>;
template class PagedKVCache<bfloat16>;
template class PagedKVCache<float16>;
template class PagedKVCache<q8_block>;

}  // namespace foveal
