// libFuzzer harness: a PagedKVCache (float, double, or 8-bit of float inputs; fuzz_half drives
// the 16-bit ones in lockstep with a float pool) under a drawn sequence of sequence operations
// (add, fork, append, truncate, remove, release) and batch calls (batch_decode_attention,
// batch_prefill_attention, with prefix sharing on or off: forks of forks make multi-level
// cascades). Invariants, besides the common ones (no crash; errors are foveal::Error; invalid
// views rejected): a rejected call leaves every sequence, page table and the free pages as they
// were; a batch decode never changes them; after every step each page's reference count is the
// number of table entries holding it and the pages in use are the distinct pages the tables
// hold (forks share, copy-on-write copies, remove, truncate and release free).
#include <algorithm>
#include <memory>
#include <tuple>
#include <utility>
#include <vector>

#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

template <typename KV>
void check_accounting(const foveal::PagedKVCache<KV>& pool, const char* what) {
  std::vector<Index> held;
  for (Index id : pool.sequences())
    for (Index page : pool.page_table(id))
      if (page != foveal::PagedKVCache<KV>::kReleased) held.push_back(page);
  std::sort(held.begin(), held.end());
  // Each page's reference count is the number of table entries that hold it.
  for (std::size_t i = 0; i < held.size();) {
    std::size_t j = i;
    while (j < held.size() && held[j] == held[i]) ++j;
    if (pool.references(held[i]) != static_cast<Index>(j - i))
      finding(what, "a page's reference count is not the number of table entries holding it");
    i = j;
  }
  held.erase(std::unique(held.begin(), held.end()), held.end());
  if (static_cast<Index>(held.size()) != pool.pages_in_use())
    finding(what, "the pages in use are not the distinct pages the tables hold");
}

template <typename T, typename KV = T>
void run_paged(FuzzedDataProvider& data) {
  Arena<T> arena(data, 3);
  const Index pages = draw_extent(data, 8), page_size = draw_extent(data, 4);
  const Index heads_kv = draw_extent(data, 2), dim = draw_extent(data, 5);
  const Index dim_v = draw_extent(data, 5);
  if (std::max({pages, page_size, heads_kv, dim, dim_v}) > 16) return;
  std::unique_ptr<foveal::PagedKVCache<KV>> pool;
  try {
    pool = std::make_unique<foveal::PagedKVCache<KV>>(pages, page_size, heads_kv, dim, dim_v);
  } catch (const foveal::Error&) {
    return;
  }
  const Index d = pool->dim(), dv = pool->dim_v();
  std::vector<Index> ids = {pool->add_sequence(), pool->add_sequence()};
  const auto draw_id = [&] {
    return data.ConsumeIntegralInRange<int>(0, 9) == 0
               ? draw_index_option(data)
               : ids[data.ConsumeIntegralInRange<std::size_t>(0, ids.size() - 1)];
  };
  for (int step = data.ConsumeIntegralInRange<int>(1, 10); step > 0; --step) {
    const auto before = pool_state(*pool);
    const auto check_unchanged = [&](const char* what) {
      if (pool_state(*pool) != before) finding(what, "a rejected call changed the pool");
    };
    const int op = data.ConsumeIntegralInRange<int>(0, 6);
    if (op <= 3) {  // append, prefill (appends, then attends), batch decode
      std::vector<Index> sequences;
      for (int n = data.ConsumeIntegralInRange<int>(0, 3); n > 0; --n)
        sequences.push_back(draw_id());
      const auto count = static_cast<Index>(sequences.size());
      const Index n = draw_extent(data, 4), group = draw_extent(data, 3);
      const Index heads_q = saturated_product(heads_kv, group);
      Expect expect;
      DrawnView<const T, 4> k, v;
      std::vector<Index> counts;
      if (op <= 2) {
        k = draw_view<const T, T, 4>(data, arena, {count, heads_kv, n, d});
        v = draw_view<const T, T, 4>(data, arena, {count, heads_kv, n, dv});
        expect.add(k);
        expect.add(v);
        counts = draw_append_counts(data, count);
      }
      if (op == 0) {
        if (expect.unusable) continue;
        const Answer answer = answer_of(expect, "PagedKVCache::append",
                                        [&] { pool->append(sequences, k.view, v.view, counts); });
        if (answer != Answer::accepted) check_unchanged("PagedKVCache::append");
        check_accounting(*pool, "PagedKVCache::append");
        continue;
      }
      auto q = draw_view<const T, T, 4>(data, arena, {count, heads_q, n, d});
      auto out = draw_view<T, T, 4>(data, arena, {count, heads_q, n, dv}, true);
      expect.add(q);
      expect.add(out);
      DrawnView<T, 3> lse;
      if (data.ConsumeBool()) {
        lse = draw_view<T, T, 3>(data, arena, {count, heads_q, n}, true);
        expect.add(lse);
      }
      if (expect.unusable) continue;
      const foveal::AttentionOptions options = draw_attention_options(data, false);
      const auto sharing =
          data.ConsumeBool() ? foveal::PrefixSharing::detect : foveal::PrefixSharing::off;
      if (op <= 2) {
        const Answer answer = answer_of(expect, "batch_prefill_attention", [&] {
          foveal::batch_prefill_attention(q.view, k.view, v.view, *pool, sequences, counts, options,
                                          out.view, lse.view, sharing);
        });
        // Every check runs before the append: a rejected prefill leaves the pool as it was.
        if (answer != Answer::accepted) check_unchanged("batch_prefill_attention");
        check_accounting(*pool, "batch_prefill_attention");
        continue;
      }
      run_call(expect, "batch_decode_attention", [&] {
        foveal::batch_decode_attention(q.view, *pool, sequences, options, out.view, lse.view,
                                       sharing);
      });
      check_unchanged("batch_decode_attention");  // a read, accepted or not
    } else if (op == 4) {                         // fork or a new sequence
      const bool fork = data.ConsumeBool();
      const Index parent = draw_id();
      Index id = -1;
      const Answer answer = answer_of(Expect{}, "PagedKVCache::fork", [&] {
        id = fork ? pool->fork(parent) : pool->add_sequence();
      });
      if (answer != Answer::accepted) {
        check_unchanged("PagedKVCache::fork");
        continue;
      }
      ids.push_back(id);
      check_accounting(*pool, "PagedKVCache::fork");
    } else {  // truncate, remove, or release
      const int cut = data.ConsumeIntegralInRange<int>(0, 2);
      const Index sequence = draw_id();
      const Index begin = draw_index_option(data), end = draw_index_option(data);
      const char* what = cut == 0   ? "PagedKVCache::remove"
                         : cut == 1 ? "PagedKVCache::truncate"
                                    : "PagedKVCache::release";
      const Answer answer = answer_of(Expect{}, what, [&] {
        if (cut == 0)
          pool->remove(sequence);
        else if (cut == 1)
          pool->truncate(sequence, begin);
        else
          (void)pool->release(sequence, begin, end);
      });
      if (answer != Answer::accepted) check_unchanged(what);
      check_accounting(*pool, what);
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  FuzzedDataProvider data(bytes, size);
  switch (data.ConsumeIntegralInRange<int>(0, 2)) {
    case 0:
      run_paged<float>(data);
      break;
    case 1:
      run_paged<double>(data);
      break;
    default:
      run_paged<float, foveal::q8_block>(data);
  }
  return 0;
}
