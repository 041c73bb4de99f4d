// tests/cpp/test_paged_attention.cpp — foveal::PagedKVCache, batch_decode_attention and
// batch_prefill_attention against the float64 decode reference.
//
// The test keeps its own record of every token appended to every sequence (forks copy the
// record), and the reference reads only that record, never the pool: a page table that points
// at the wrong page, a copy-on-write that writes into a shared page, or a prefix read for the
// wrong group all show. Lengths straddle the page sizes and the 1024-key chunks; page sizes
// include 1 and primes. Every typed test runs for float, double and 8-bit pools
// (PagedKVCache<q8_block>, float queries): for those the record holds what quantize_q8 makes of
// each appended row, read back as scale * value, so the reference is the float64 attention over
// the dequantized pool and a kernel that reads the wrong block or scale shows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <map>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/batch_attention.hpp"
#include "foveal/attention/decode.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "foveal/attention/paged_kv_cache.hpp"
#include "foveal/core/parallel.hpp"
#include "harness.hpp"
#include "reference/decode_reference.hpp"

namespace foveal::test {
namespace {

// The element type of q, k, v and out next to a pool of T (float for an 8-bit pool).
template <typename T>
using Input = typename PagedKVCache<T>::input_type;

// Appends `count` values from[0 .. count) to `record` as a pool of T stores them: exactly, or
// quantized to blocks of 32 and read back.
template <typename T>
void record_row(const Input<T>* from, Index count, std::vector<double>& record) {
  if constexpr (std::is_same_v<T, q8_block>) {
    for (Index first = 0; first < count; first += q8_block::kValues) {
      const int values = static_cast<int>(std::min<Index>(q8_block::kValues, count - first));
      const q8_block block = quantize_q8(from + first, values);
      for (int i = 0; i < values; ++i)
        record.push_back(static_cast<double>(block.scale) * block.values[i]);
    }
  } else {
    for (Index d = 0; d < count; ++d) record.push_back(from[d]);
  }
}

// A paged cache and the record of what each of its sequences holds.
template <typename T>
class RecordedPool {
 public:
  RecordedPool(Index num_pages, Index page_size, Index heads_kv, Index dim, Index dim_v,
               std::uint64_t seed)
      : cache_(num_pages, page_size, heads_kv, dim, dim_v), random_(seed) {}

  PagedKVCache<T>& cache() { return cache_; }
  const reference::SequenceRecord& record(Index id) const { return records_.at(id); }

  Index add() {
    const Index id = cache_.add_sequence();
    records_[id] = {};
    return id;
  }
  Index fork(Index parent) {
    const Index id = cache_.fork(parent);
    records_[id] = records_.at(parent);
    return id;
  }
  void remove(Index id) {
    cache_.remove(id);
    records_.erase(id);
  }
  void truncate(Index id, Index length) {
    cache_.truncate(id, length);
    reference::SequenceRecord& record = records_.at(id);
    record.length = length;
    record.k.resize(static_cast<std::size_t>(length * cache_.heads_kv() * cache_.dim()));
    record.v.resize(static_cast<std::size_t>(length * cache_.heads_kv() * cache_.dim_v()));
  }

  // Random keys and values for `ids` (n steps each; k: [S, Hkv, n, D]).
  std::pair<Tensor<Input<T>, 4>, Tensor<Input<T>, 4>> random_steps(Index sequences, Index n) {
    const Index heads_kv = cache_.heads_kv(), dim = cache_.dim(), dim_v = cache_.dim_v();
    Tensor<Input<T>, 4> k({sequences, heads_kv, n, dim});
    Tensor<Input<T>, 4> v({sequences, heads_kv, n, dim_v});
    scatter(round_to<float>(random_.normal(static_cast<std::size_t>(k.numel()))), k.view());
    scatter(round_to<float>(random_.normal(static_cast<std::size_t>(v.numel()))), v.view());
    return {std::move(k), std::move(v)};
  }

  // Records the first counts[s] steps of k[s], v[s] as appended to ids[s].
  void record_steps(const std::vector<Index>& ids, const Tensor<Input<T>, 4>& k,
                    const Tensor<Input<T>, 4>& v, const std::vector<Index>& counts) {
    for (std::size_t s = 0; s < ids.size(); ++s) {
      reference::SequenceRecord& record = records_.at(ids[s]);
      const Index count = counts.empty() ? k.size(2) : counts[s];
      const auto entry = static_cast<Index>(s);
      for (Index step = 0; step < count; ++step)
        for (Index h = 0; h < cache_.heads_kv(); ++h) {
          record_row<T>(k.view().address(entry, h, step, 0), cache_.dim(), record.k);
          record_row<T>(v.view().address(entry, h, step, 0), cache_.dim_v(), record.v);
        }
      record.length += count;
    }
  }

  void append(const std::vector<Index>& ids, Index n, const std::vector<Index>& counts = {}) {
    auto [k, v] = random_steps(static_cast<Index>(ids.size()), n);
    cache_.append(ids, k.view(), v.view(), counts);
    record_steps(ids, k, v, counts);
  }

  // Grows `id` by `count` tokens in appends of random sizes.
  void grow(Index id, Index count) {
    while (count > 0) {
      const Index n = std::min(count, random_.integer(1, 700));
      append({id}, n);
      count -= n;
    }
  }

 private:
  PagedKVCache<T> cache_;
  RandomSource random_;
  std::map<Index, reference::SequenceRecord> records_;
};

struct Call {
  Index heads_q = 1, len_q = 1;
  AttentionOptions options;
  PrefixSharing sharing = PrefixSharing::detect;
  int num_threads = 0;
};

// batch_decode_attention over `ids` with random queries; returns (out, lse) and the reference.
template <typename T>
std::pair<Outputs, Outputs> decode_and_reference(RecordedPool<T>& pool,
                                                 const std::vector<Index>& ids, const Call& call,
                                                 std::uint64_t seed,
                                                 BatchAttentionInfo* info = nullptr) {
  using Q = Input<T>;
  const PagedKVCache<T>& cache = pool.cache();
  const auto entries = static_cast<Index>(ids.size());
  const Shape<4> q_shape{entries, call.heads_q, call.len_q, cache.dim()};
  RandomSource random(seed);
  const std::vector<double> q_values = round_to<float>(random.normal(shape_numel<4>(q_shape)));
  Tensor<Q, 4> q(q_shape);
  scatter(q_values, q.view());
  Tensor<Q, 4> out({entries, call.heads_q, call.len_q, cache.dim_v()});
  Tensor<Q, 3> lse({entries, call.heads_q, call.len_q});
  AttentionOptions options = call.options;
  options.num_threads = call.num_threads;
  batch_decode_attention(q.view(), cache, ids, options, out.view(), lse.view(), call.sharing, info);
  Outputs got{gather(out.view()), gather(lse.view())};
  std::vector<reference::SequenceRecord> records;
  for (Index id : ids) records.push_back(pool.record(id));
  const reference::DecodeShape shape{call.heads_q, cache.heads_kv(), call.len_q, cache.dim(),
                                     cache.dim_v()};
  Outputs want;
  reference::decode_reference(shape, q_values, records, reference_options(call.options), want.out,
                              want.lse);
  return {got, want};
}

template <typename T>
void expect_matches(const std::pair<Outputs, Outputs>& result) {
  EXPECT_TRUE(matches_reference(result.first.out, result.second.out, kTolerance<Input<T>>))
      << "out";
  EXPECT_TRUE(matches_reference(result.first.lse, result.second.lse, kTolerance<Input<T>>))
      << "lse";
}

using PoolTypes = ::testing::Types<float, double, q8_block>;
struct PoolTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, q8_block> ? "int8" : (std::is_same_v<T, float> ? "float" : "double");
  }
};

template <typename T>
class PagedAttention : public ::testing::Test {};
TYPED_TEST_SUITE(PagedAttention, PoolTypes, PoolTypeNames);

TYPED_TEST(PagedAttention, RaggedBatchesMatchReferenceForEveryPageSize) {
  using T = TypeParam;
  const std::vector<Index> lengths = {1, 2, 16, 127, 129, 1023, 1025, 2100};
  for (Index page_size : {1, 3, 16, 61, 128, 256}) {
    RecordedPool<T> pool(4423 / page_size + 16, page_size, 2, 24, 16,
                         100 + static_cast<std::uint64_t>(page_size));
    std::vector<Index> ids;
    for (Index length : lengths) {
      ids.push_back(pool.add());
      pool.grow(ids.back(), length);
    }
    for (const auto& [heads_q, len_q, causal, window, sinks, softcap] :
         std::vector<std::tuple<Index, Index, bool, Index, Index, double>>{
             {2, 1, false, -1, 0, 0.0},
             {8, 1, false, -1, 0, 0.0},
             {6, 1, false, 100, 4, 0.0},
             {4, 1, false, -1, 0, 30.0}}) {
      SCOPED_TRACE(describe("page_size=", page_size, " Hq=", heads_q, " Lq=", len_q,
                            " window=", window, " sinks=", sinks, " softcap=", softcap));
      Call call;
      call.heads_q = heads_q;
      call.len_q = len_q;
      call.options.causal = causal;
      call.options.window_left = window;
      call.options.sink_tokens = sinks;
      call.options.softcap = softcap;
      expect_matches<T>(decode_and_reference(pool, ids, call, 7));
    }
  }
}

TYPED_TEST(PagedAttention, CausalDraftsAndPrefillRowsMatchReference) {
  using T = TypeParam;
  RecordedPool<T> pool(4096, 32, 3, 16, 16, 5);
  std::vector<Index> ids;
  for (Index length : {70, 134, 1030, 333}) {
    ids.push_back(pool.add());
    pool.grow(ids.back(), length);
  }
  for (Index len_q : {2, 5, 70}) {  // 70 * 2 rows: the unsplit path
    SCOPED_TRACE(describe("Lq=", len_q));
    Call call;
    call.heads_q = 6;
    call.len_q = len_q;
    call.options.causal = true;
    expect_matches<T>(decode_and_reference(pool, ids, call, 11));
    call.options.window_left = 40;
    expect_matches<T>(decode_and_reference(pool, ids, call, 12));
  }
}

// Sequences forked from one prompt share its pages: the cascade reads them once and gives the
// reference's results; without sharing too; the pool holds the prompt once.
TYPED_TEST(PagedAttention, ForkedSequencesShareThePrefix) {
  using T = TypeParam;
  constexpr Index kPage = 16;
  RecordedPool<T> pool(2048, kPage, 2, 32, 24, 9);
  const Index prompt = pool.add();
  pool.grow(prompt, 2500 + 7);  // a partial last page
  const Index prompt_pages = pool.cache().pages_in_use();
  EXPECT_EQ(prompt_pages, (2507 + kPage - 1) / kPage);
  std::vector<Index> ids = {prompt};
  for (int child = 0; child < 5; ++child) ids.push_back(pool.fork(prompt));
  // Each fork copies only the partial page.
  EXPECT_EQ(pool.cache().pages_in_use(), prompt_pages + 5);
  for (std::size_t s = 0; s < ids.size(); ++s) pool.grow(ids[s], static_cast<Index>(3 * s + 1));
  const Index unrelated = pool.add();
  pool.grow(unrelated, 900);
  ids.push_back(unrelated);
  for (Index heads_q : {2, 8}) {
    for (Index len_q : {1, 3}) {
      SCOPED_TRACE(describe("Hq=", heads_q, " Lq=", len_q));
      Call call;
      call.heads_q = heads_q;
      call.len_q = len_q;
      call.options.causal = true;
      BatchAttentionInfo info;
      const auto shared = decode_and_reference(pool, ids, call, 21, &info);
      expect_matches<T>(shared);
      EXPECT_EQ(info.shared_groups, 1);
      EXPECT_EQ(info.shared_tokens, 2500 / kPage * kPage);  // the full shared pages
      call.sharing = PrefixSharing::off;
      const auto alone = decode_and_reference(pool, ids, call, 21, &info);
      expect_matches<T>(alone);
      EXPECT_EQ(info.shared_groups, 0);
      // A window that cuts into the prefix: no sharing, still the reference's result.
      call.sharing = PrefixSharing::detect;
      call.options.window_left = 300;
      expect_matches<T>(decode_and_reference(pool, ids, call, 22, &info));
      EXPECT_EQ(info.shared_groups, 0);
    }
  }
}

// A prompt forked into samples, one of which is extended and forked again, and one of those
// once more: three nested levels of sharing (a multi-level cascade), each read once, and the
// reference's results with and without sharing.
TYPED_TEST(PagedAttention, NestedForksShareEveryLevel) {
  using T = TypeParam;
  constexpr Index kPage = 16;
  RecordedPool<T> pool(2048, kPage, 2, 32, 24, 31);
  const Index prompt = pool.add();
  pool.grow(prompt, 1005);  // 62 full pages (992 tokens) and a partial one
  std::vector<Index> ids = {prompt};
  for (int child = 0; child < 3; ++child) ids.push_back(pool.fork(prompt));
  const Index extended = ids[1];
  pool.grow(extended, 700);  // 1705 tokens: 106 full pages (1696 tokens)
  for (int child = 0; child < 3; ++child) ids.push_back(pool.fork(extended));
  const Index deeper = ids[4];
  pool.grow(deeper, 300);  // 2005 tokens: 125 full pages (2000 tokens)
  ids.push_back(pool.fork(deeper));
  const Index unrelated = pool.add();
  pool.grow(unrelated, 500);
  ids.push_back(unrelated);
  for (std::size_t s = 0; s < ids.size(); ++s) pool.grow(ids[s], static_cast<Index>(2 * s + 1));
  for (Index len_q : {1, 2}) {
    SCOPED_TRACE(describe("Lq=", len_q));
    Call call;
    call.heads_q = 8;
    call.len_q = len_q;
    call.options.causal = true;
    BatchAttentionInfo info;
    expect_matches<T>(decode_and_reference(pool, ids, call, 41, &info));
    // All eight forks over [0, 992); the extended sample, its three forks and the fork of a
    // fork over [992, 1696); that last pair over [1696, 2000).
    EXPECT_EQ(info.shared_groups, 3);
    EXPECT_EQ(info.shared_tokens, 992 + (1696 - 992) + (2000 - 1696));
    // Each level's shared pass and the merges run in a fixed order: the same bits for any
    // thread count.
    const int threads_before = call.num_threads;
    call.num_threads = 1;
    const Outputs one = decode_and_reference(pool, ids, call, 41).first;
    for (int threads : {2, 3}) {
      call.num_threads = threads;
      const Outputs many = decode_and_reference(pool, ids, call, 41).first;
      EXPECT_TRUE(bitwise_equal(many.out, one.out)) << threads << " threads";
      EXPECT_TRUE(bitwise_equal(many.lse, one.lse)) << threads << " threads";
    }
    call.num_threads = threads_before;
    call.sharing = PrefixSharing::off;
    expect_matches<T>(decode_and_reference(pool, ids, call, 41, &info));
    EXPECT_EQ(info.shared_groups, 0);
  }
}

TYPED_TEST(PagedAttention, BitwiseIdenticalForAnyThreadCount) {
  using T = TypeParam;
  RecordedPool<T> pool(4096, 64, 2, 16, 16, 13);
  const Index prompt = pool.add();
  pool.grow(prompt, 3000);
  std::vector<Index> ids = {prompt, pool.fork(prompt), pool.fork(prompt)};
  for (Index s = 0; s < 3; ++s) pool.grow(ids[static_cast<std::size_t>(s)], 10 * s + 1);
  ids.push_back(pool.add());
  pool.grow(ids.back(), 4100);
  Call call;
  call.heads_q = 8;
  call.num_threads = 1;
  const Outputs one = decode_and_reference(pool, ids, call, 3).first;
  for (int threads : {2, 3, 8}) {
    call.num_threads = threads;
    const Outputs many = decode_and_reference(pool, ids, call, 3).first;
    EXPECT_TRUE(bitwise_equal(many.out, one.out)) << threads << " threads";
    EXPECT_TRUE(bitwise_equal(many.lse, one.lse)) << threads << " threads";
  }
}

// Copy-on-write: a child truncated into the shared pages and grown again leaves the parent's
// tokens as they were; removing sequences frees exactly their own pages.
TYPED_TEST(PagedAttention, CopyOnWriteAndPageAccounting) {
  using T = TypeParam;
  constexpr Index kPage = 8;
  RecordedPool<T> pool(64, kPage, 1, 8, 8, 17);
  const Index parent = pool.add();
  pool.grow(parent, 40);  // 5 full pages
  EXPECT_EQ(pool.cache().pages_in_use(), 5);
  const Index child = pool.fork(parent);
  EXPECT_EQ(pool.cache().pages_in_use(), 5);
  EXPECT_EQ(pool.cache().references(pool.cache().page_table(parent)[0]), 2);
  pool.truncate(child, 21);  // into shared page 2, which stays shared
  EXPECT_EQ(pool.cache().pages_in_use(), 5);
  pool.grow(child, 30);                               // copies page 2 first, then 3 new pages
  EXPECT_EQ(pool.cache().pages_in_use(), 5 + 1 + 4);  // 51 tokens: 7 pages, 4 new
  EXPECT_NE(pool.cache().page_table(child)[2], pool.cache().page_table(parent)[2]);
  Call call;
  call.heads_q = 2;
  expect_matches<T>(decode_and_reference(pool, {parent, child}, call, 5));
  pool.remove(parent);
  EXPECT_EQ(pool.cache().pages_in_use(), 7);  // the child's 7 (2 of them were shared)
  expect_matches<T>(decode_and_reference(pool, {child}, call, 6));
  pool.remove(child);
  EXPECT_EQ(pool.cache().pages_in_use(), 0);
  EXPECT_EQ(pool.cache().free_pages(), 64);
}

TYPED_TEST(PagedAttention, ChunkedPrefillMatchesReference) {
  using T = TypeParam;
  using Q = Input<T>;
  RecordedPool<T> pool(4096, 16, 2, 16, 8, 23);
  std::vector<Index> ids = {pool.add(), pool.add(), pool.add()};
  pool.grow(ids[1], 100);
  const Index heads_q = 4, chunk = 40;
  RandomSource random(29);
  for (int round = 0; round < 3; ++round) {
    const std::vector<Index> counts = {chunk, 7, round == 1 ? 0 : 33};
    auto [k, v] = pool.random_steps(3, chunk);
    Tensor<Q, 4> q({3, heads_q, chunk, 16});
    const std::vector<double> q_values = round_to<float>(random.normal(q.numel()));
    scatter(q_values, q.view());
    Tensor<Q, 4> out({3, heads_q, chunk, 8});
    Tensor<Q, 3> lse({3, heads_q, chunk});
    AttentionOptions options;
    options.causal = true;
    batch_prefill_attention(q.view(), k.view(), v.view(), pool.cache(), ids, counts, options,
                            out.view(), lse.view());
    pool.record_steps(ids, k, v, counts);
    // The reference, one sequence at a time over its new rows.
    for (std::size_t s = 0; s < ids.size(); ++s) {
      const Index rows = counts[s];
      const reference::DecodeShape shape{heads_q, 2, rows, 16, 8};
      std::vector<double> q_rows, want_out, want_lse;
      for (Index h = 0; h < heads_q; ++h)
        for (Index i = 0; i < rows; ++i)
          for (Index d = 0; d < 16; ++d) q_rows.push_back(q(static_cast<Index>(s), h, i, d));
      reference::decode_reference(shape, q_rows, {pool.record(ids[s])}, reference_options(options),
                                  want_out, want_lse);
      std::vector<double> got_out, got_lse;
      for (Index h = 0; h < heads_q; ++h)
        for (Index i = 0; i < chunk; ++i) {
          const bool used = i < rows;
          for (Index d = 0; d < 8; ++d) {
            if (used) {
              got_out.push_back(out(static_cast<Index>(s), h, i, d));
            } else {
              EXPECT_EQ(out(static_cast<Index>(s), h, i, d), Q(0));
            }
          }
          if (used) {
            got_lse.push_back(lse(static_cast<Index>(s), h, i));
          } else {
            EXPECT_EQ(lse(static_cast<Index>(s), h, i), -std::numeric_limits<Q>::infinity());
          }
        }
      EXPECT_TRUE(matches_reference(got_out, want_out, kTolerance<Q>)) << "round " << round;
      EXPECT_TRUE(matches_reference(got_lse, want_lse, kTolerance<Q>)) << "round " << round;
    }
  }
}

// A sliding-window server: after every step each sequence releases the pages its window and
// sinks no longer see, so it holds a bounded number of pages however long it grows, and batch
// decode and prefill still match the reference (which reads the full record).
TYPED_TEST(PagedAttention, ReleasedPagesKeepAWindowedSequenceBounded) {
  using T = TypeParam;
  using Q = Input<T>;
  constexpr Index kPage = 16, kWindow = 40, kSinks = 3;
  RecordedPool<T> pool(24, kPage, 2, 16, 8, 37);
  const std::vector<Index> ids = {pool.add(), pool.add()};
  pool.grow(ids[0], 5);
  Call call;
  call.heads_q = 4;
  call.options.causal = true;
  call.options.window_left = kWindow;
  call.options.sink_tokens = kSinks;
  Index released = 0;
  for (int step = 0; step < 60; ++step) {
    pool.append(ids, 1 + step % 7);
    for (Index id : ids) {
      // The next query (at the newest position) sees [length - 1 - window, length) and sinks.
      const Index length = pool.cache().length(id);
      const Index begin = std::min(kSinks, length);
      released += pool.cache().release(id, begin, std::max(begin, length - 1 - kWindow));
      // Page 0 (the sinks), the pages of the window and the partial last one at most.
      EXPECT_LE(
          static_cast<Index>(pool.cache().page_table(id).size()) - pool.cache().released_pages(id),
          1 + (kWindow + 1) / kPage + 2)
          << step;
      if (length - 1 - kWindow >= 0) {
        EXPECT_TRUE(pool.cache().holds(id, length - 1 - kWindow));
      }
      EXPECT_TRUE(pool.cache().holds(id, 0));
    }
    if (step % 10 == 9) expect_matches<T>(decode_and_reference(pool, ids, call, 50 + step));
  }
  EXPECT_GT(released, 10);
  EXPECT_FALSE(pool.cache().holds(ids[0], kPage + 1));
  // Holding every page it ever used would need more than the pool has.
  EXPECT_GT(pool.cache().length(ids[0]) / kPage, pool.cache().num_pages() / 2);

  // A query that sees a released key (no window) is rejected, and out stays as it was.
  Tensor<Q, 4> q({2, 4, 1, 16});
  Tensor<Q, 4> out({2, 4, 1, 8});
  std::fill_n(out.data(), out.numel(), Q(7));
  EXPECT_THROW(batch_decode_attention(q.view(), pool.cache(), ids, {}, out.view()), Error);
  for (Index i = 0; i < out.numel(); ++i) ASSERT_EQ(out.data()[i], Q(7));
  // So is a prefill whose new rows would see one, before it appends.
  const Index length = pool.cache().length(ids[1]);
  auto [k, v] = pool.random_steps(1, 3);
  Tensor<Q, 4> pq({1, 4, 3, 16});
  Tensor<Q, 4> pout({1, 4, 3, 8});
  AttentionOptions wide = call.options;
  wide.window_left = kWindow + 3 * kPage;
  EXPECT_THROW(batch_prefill_attention(pq.view(), k.view(), v.view(), pool.cache(), {ids[1]}, {},
                                       wide, pout.view()),
               Error);
  EXPECT_EQ(pool.cache().length(ids[1]), length);
  // A fork shares the released entries; truncating into a released page is an error, cutting
  // at a page boundary inside the released run is not.
  const Index child = pool.fork(ids[0]);
  EXPECT_EQ(pool.cache().released_pages(child), pool.cache().released_pages(ids[0]));
  expect_matches<T>(decode_and_reference(pool, {ids[0], child}, call, 99));
  EXPECT_THROW(pool.cache().truncate(child, kPage + 5), Error);
  EXPECT_EQ(pool.cache().length(child), pool.cache().length(ids[0]));
  EXPECT_THROW(pool.cache().release(child, 5, pool.cache().length(child) + 1), Error);
  pool.truncate(child, 2 * kPage);
  EXPECT_EQ(pool.cache().released_pages(child), 1);
  pool.remove(child);
  pool.remove(ids[0]);
  pool.remove(ids[1]);
  EXPECT_EQ(pool.cache().free_pages(), pool.cache().num_pages());
}

// Every rejected call throws before changing anything.
TYPED_TEST(PagedAttention, BadInputChangesNothing) {
  using T = TypeParam;
  using Q = Input<T>;
  RecordedPool<T> pool(6, 4, 1, 4, 4, 31);
  const Index a = pool.add();
  pool.grow(a, 10);              // 3 pages
  const Index b = pool.fork(a);  // copies the partial page: 4 in use
  const auto snapshot = [&] {
    return std::make_tuple(pool.cache().sequences(), pool.cache().length(a), pool.cache().length(b),
                           pool.cache().page_table(a), pool.cache().page_table(b),
                           pool.cache().free_pages());
  };
  const auto before = snapshot();
  auto [k, v] = pool.random_steps(2, 9);
  // Pool exhaustion: 2 free pages, the append needs 2 for a and 2 for b.
  EXPECT_THROW(pool.cache().append({a, b}, k.view(), v.view()), MemoryError);
  EXPECT_EQ(snapshot(), before);
  EXPECT_THROW(pool.cache().append({a, a}, k.view(), v.view()), Error);           // listed twice
  EXPECT_THROW(pool.cache().append({a, 99}, k.view(), v.view()), Error);          // unknown id
  EXPECT_THROW(pool.cache().append({a, b}, k.view(), v.view(), {1, 10}), Error);  // count > n
  EXPECT_THROW(pool.cache().truncate(a, 11), Error);
  EXPECT_THROW(pool.cache().fork(42), Error);
  EXPECT_EQ(snapshot(), before);
  const Index c = pool.add();
  pool.grow(c, 8);                          // takes the last 2 pages
  EXPECT_THROW(pool.fork(b), MemoryError);  // b's partial page needs a copy
  pool.remove(c);
  EXPECT_THROW(pool.cache().remove(c), Error);  // removed
  EXPECT_EQ(snapshot(), before);

  Tensor<Q, 4> q({2, 2, 1, 4});
  Tensor<Q, 4> out({2, 2, 1, 4});
  const Q nan = std::numeric_limits<Q>::quiet_NaN();
  std::fill_n(out.data(), out.numel(), nan);
  AttentionOptions options;
  EXPECT_THROW(batch_decode_attention(q.view(), pool.cache(), {a, c}, options, out.view()), Error);
  EXPECT_THROW(batch_decode_attention(q.view(), pool.cache(), {a}, options, out.view()), Error);
  Tensor<Q, 4> long_q({2, 2, 11, 4});
  Tensor<Q, 4> long_out({2, 2, 11, 4});
  EXPECT_THROW(
      batch_decode_attention(long_q.view(), pool.cache(), {a, b}, options, long_out.view()),
      Error);  // Lq > length
  options.q_offset = 3;
  EXPECT_THROW(batch_decode_attention(q.view(), pool.cache(), {a, b}, options, out.view()), Error);
  for (Index i = 0; i < out.numel(); ++i) EXPECT_TRUE(std::isnan(out.data()[i]));
  // A prefill that does not fit changes no sequence.
  Tensor<Q, 4> pq({2, 2, 9, 4});
  Tensor<Q, 4> pout({2, 2, 9, 4});
  options.q_offset = -1;
  EXPECT_THROW(batch_prefill_attention(pq.view(), k.view(), v.view(), pool.cache(), {a, b}, {},
                                       options, pout.view()),
               MemoryError);
  EXPECT_EQ(snapshot(), before);
  // So does one whose scale and softcap are out of the compute type's range (found by
  // fuzz_half: the check ran after the append).
  options.softcap = std::numeric_limits<double>::denorm_min();
  EXPECT_THROW(batch_prefill_attention(pq.view(), k.view(), v.view(), pool.cache(), {a, b}, {1, 1},
                                       options, pout.view()),
               Error);
  EXPECT_EQ(snapshot(), before);
  // And one whose k counts more elements than an Index holds, before anything measures k (the
  // overlap check of out and k overflowed: UBSan, found by fuzz_half).
  options.softcap = 0;
  const TensorView<const Q, 4> huge_k(k.data(), {2, Index{1} << 62, 9, 4}, {0, 0, 0, 1});
  EXPECT_THROW(batch_prefill_attention(pq.view(), huge_k, v.view(), pool.cache(), {a, b}, {1, 1},
                                       options, pout.view()),
               Error);
  EXPECT_EQ(snapshot(), before);
}

// A pool over `memory`, a caller's [num_pages, 2, Hkv, page, width] array of E: keys are [:, 0],
// values [:, 1]. `strides` gets the views' strides.
template <typename E>
PagedKVCache<E> combined_pool(std::vector<E>& memory, Index pages, Index heads, Index page,
                              Index width, Shape<4>& strides) {
  memory.assign(static_cast<std::size_t>(pages * 2 * heads * page * width), E{});
  const Shape<4> shape{pages, heads, page, width};
  strides = {2 * heads * page * width, page * width, width, 1};
  return PagedKVCache<E>(TensorView<E, 4>(memory.data(), shape, strides),
                         TensorView<E, 4>(memory.data() + heads * page * width, shape, strides));
}

TEST(PagedKVCache, WrapsCallerMemoryOfACombinedPool) {
  constexpr Index kPages = 10, kHeads = 2, kPage = 4, kDim = 8;
  std::vector<float> memory;
  Shape<4> strides;
  PagedKVCache<float> cache = combined_pool(memory, kPages, kHeads, kPage, kDim, strides);
  EXPECT_EQ(cache.page_rows(), 2 * kHeads * kPage);
  const Index id = cache.add_sequence();
  Tensor<float, 3> k({kHeads, 6, kDim});
  Tensor<float, 3> v({kHeads, 6, kDim});
  for (Index i = 0; i < k.numel(); ++i) {
    k.data()[i] = static_cast<float>(i);
    v.data()[i] = static_cast<float>(-i);
  }
  cache.append(id, k.view(), v.view());
  // Token 5 of head 1 is slot 1 of the sequence's second page.
  const Index page = cache.page_table(id)[1];
  const float* key = memory.data() + page * strides[0] + 1 * strides[1] + 1 * kDim;
  const float* value = key + kHeads * kPage * kDim;
  for (Index d = 0; d < kDim; ++d) {
    EXPECT_EQ(key[d], k(1, 5, d));
    EXPECT_EQ(value[d], v(1, 5, d));
  }
  // Page strides that are not a whole number of rows are rejected.
  EXPECT_THROW(
      PagedKVCache<float>(TensorView<float, 4>(memory.data(), {3, 1, 4, 8}, {33, 32, 8, 1}),
                          TensorView<float, 4>(memory.data() + 200, {3, 1, 4, 8}, {33, 32, 8, 1})),
      Error);
}

// An 8-bit pool stores what an 8-bit KVCache stores: the same blocks, bit for bit, whatever the
// page a token lands in, and batch decode over it agrees with decode_attention over the cache.
TEST(PagedKVCache, EightBitPagesHoldTheBlocksOfAnEightBitKVCache) {
  constexpr Index kHeads = 2, kDim = 80, kDimV = 40, kLength = 300;
  PagedKVCache<q8_block> pool(40, 16, kHeads, kDim, kDimV);
  KVCache<q8_block> contiguous(1, kHeads, kLength, kDim, kDimV);
  EXPECT_EQ(pool.keys().size(3), 3);  // ceil(80 / 32) blocks per key
  EXPECT_EQ(pool.values().size(3), 2);
  EXPECT_EQ(pool.page_bytes(), static_cast<std::size_t>(kHeads * 16 * 5) * sizeof(q8_block));
  RandomSource random(41);
  Tensor<float, 4> k({1, kHeads, kLength, kDim});
  Tensor<float, 4> v({1, kHeads, kLength, kDimV});
  scatter(random.normal(static_cast<std::size_t>(k.numel()), 0, 4), k.view());
  scatter(random.normal(static_cast<std::size_t>(v.numel())), v.view());
  const Index id = pool.add_sequence();
  pool.append({id}, k.view(), v.view());
  contiguous.append(k.view(), v.view());
  const auto same_block = [](const q8_block& a, const q8_block& b) {
    return std::memcmp(&a, &b, sizeof(q8_block)) == 0;
  };
  for (Index position = 0; position < kLength; ++position) {
    const Index page = pool.page_table(id)[static_cast<std::size_t>(position / 16)];
    for (Index h = 0; h < kHeads; ++h) {
      for (Index block = 0; block < 3; ++block)
        ASSERT_TRUE(same_block(pool.keys()(page, h, position % 16, block),
                               contiguous.keys()(0, h, position, block)))
            << position;
      for (Index block = 0; block < 2; ++block)
        ASSERT_TRUE(same_block(pool.values()(page, h, position % 16, block),
                               contiguous.values()(0, h, position, block)))
            << position;
    }
  }
  Tensor<float, 4> q({1, 6, 1, kDim});
  scatter(random.normal(static_cast<std::size_t>(q.numel())), q.view());
  Tensor<float, 4> paged_out({1, 6, 1, kDimV});
  Tensor<float, 4> contiguous_out({1, 6, 1, kDimV});
  batch_decode_attention(q.view(), pool, {id}, {}, paged_out.view());
  decode_attention(q.view(), contiguous, {}, contiguous_out.view());
  EXPECT_TRUE(matches_reference(gather(paged_out.view()), gather(contiguous_out.view()),
                                kTolerance<float>));
}

TEST(PagedKVCache, EightBitPoolOverCallerMemoryHoldsThirtyTwoValuesPerBlock) {
  constexpr Index kHeads = 1;
  std::vector<q8_block> memory;
  Shape<4> strides;
  PagedKVCache<q8_block> cache = combined_pool(memory, 6, kHeads, 4, 2, strides);
  EXPECT_EQ(cache.dim(), 64);
  EXPECT_EQ(cache.dim_v(), 64);
  const Index id = cache.add_sequence();
  Tensor<float, 3> k({kHeads, 5, 64});
  Tensor<float, 3> v({kHeads, 5, 64});
  for (Index i = 0; i < k.numel(); ++i) {
    k.data()[i] = static_cast<float>(i % 64 - 20);
    v.data()[i] = static_cast<float>(i % 7);
  }
  cache.append(id, k.view(), v.view());
  // Token 4 is slot 0 of the second page: its first key block holds k(0, 4, 0 .. 31).
  const q8_block& block = memory[static_cast<std::size_t>(cache.page_table(id)[1] * strides[0])];
  for (int i = 0; i < q8_block::kValues; ++i)
    EXPECT_NEAR(q8_value(&block, i), k(0, 4, i), block.scale / 2) << i;
  // A row of the wrong width (D counts values, 64 here) is rejected and changes nothing.
  Tensor<float, 3> narrow({kHeads, 1, 60});
  EXPECT_THROW(cache.append(id, narrow.view(), v.view()), Error);
  EXPECT_EQ(cache.length(id), 5);
}

}  // namespace
}  // namespace foveal::test
