// tests/cpp/test_hardening.cpp — the rules every entry point keeps on hostile input (issue 14):
// checked sizes, bounded thread counts, caches that detect concurrent misuse, allocation
// failures as foveal::MemoryError, outputs that overlap themselves rejected, and NaN in, NaN
// out in every attention kernel.
#include <gtest/gtest.h>

#include <array>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <new>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "detail/mask.hpp"
#include "foveal/foveal.hpp"
#include "harness.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace foveal::test {
namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Fills a tensor with a deterministic pattern in [-1, 1].
template <typename T, int Rank>
void fill(Tensor<T, Rank>& tensor, int seed) {
  for (Index i = 0; i < tensor.numel(); ++i)
    tensor.data()[i] = static_cast<T>(std::sin(0.7 * static_cast<double>(i) + seed));
}

template <typename T, int Rank>
bool all_finite(const TensorView<const T, Rank>& view) {
  for (Index i = 0; i < view.numel(); ++i)
    if (!std::isfinite(view.data()[i])) return false;
  return true;
}

// The resident set size of this process, in bytes.
Index resident_bytes() {
  std::ifstream statm("/proc/self/statm");
  Index pages = 0, resident = 0;
  statm >> pages >> resident;
  return resident * 4096;
}

// ---------------------------------------------------------------------------------------------
// 1. Sizes.

TEST(HardeningSizes, TensorShapeWhoseByteCountOverflowsIsAnErrorNamingTheShape) {
  EXPECT_TRUE(throws_error_with(
      [] {
        Tensor<float, 4>({1, 1, Index{1} << 62, 128});
      },
      {"Tensor: shape [1, 1, 4611686018427387904, 128]", "overflows"}));
  // The element count fits, the byte count does not.
  EXPECT_TRUE(throws_error_with([] { Tensor<double, 1>({Index{1} << 61}); },
                                {"shape [2305843009213693952] of 8-byte elements"}));
  EXPECT_TRUE(throws_error_with([] { Tensor<float, 2>({-1, 3}); }, {"shape[0] must be >= 0"}));
  // A zero extent makes any shape empty.
  const Tensor<float, 3> empty({Index{1} << 62, 0, Index{1} << 62});
  EXPECT_EQ(empty.data(), nullptr);
  EXPECT_EQ(detail::checked_numel<float>("x", {3, 0, Index{1} << 62}), 0);
}

// Empty views may have huge extents ([0, H, 2^63 - 1, D] is a valid query of no elements); the
// window reach |q_offset| + Lq + Lk saturates instead of overflowing (found by fuzz_attention
// under UBSan).
TEST(HardeningSizes, VisibilityOfHugeEmptyExtentsDoesNotOverflow) {
  constexpr Index kHuge = std::numeric_limits<Index>::max();
  const detail::Visibility both = detail::Visibility::make(false, 5, 7, 2, kHuge, kHuge, -kHuge);
  EXPECT_EQ(both.window_left, 5);
  EXPECT_EQ(both.window_right, 7);
  const detail::Visibility huge_window =
      detail::Visibility::make(true, kHuge, -1, 0, kHuge, kHuge, kHuge / 8);
  EXPECT_EQ(huge_window.window_left, -1);  // a window no smaller than the reach bounds nothing
}

// A ring buffer's positions may reach 2^63 - 1 (a ring over caller memory adopting such a
// length); a decode there with a right window computed window edges and the next split-KV
// chunk boundary past the Index range (found by fuzz_kv_cache under UBSan).
TEST(HardeningSizes, DecodeNearTheLargestPositionDoesNotOverflow) {
  constexpr Index kHuge = std::numeric_limits<Index>::max();
  KVCacheOptions ring;
  ring.ring = true;
  const std::vector<float> row = {1, 2, 3, 4};
  Tensor<float, 4> keys({1, 1, 8, 4}), values({1, 1, 8, 4});
  for (Index r = 0; r < 8; ++r)
    for (Index d = 0; d < 4; ++d)
      keys(0, 0, r, d) = values(0, 0, r, d) = row[static_cast<std::size_t>(d)];
  KVCache<float> cache(keys.view(), values.view(), ring, {kHuge - 1});
  EXPECT_EQ(cache.length(0), kHuge - 1);
  const Tensor<float, 4> q({1, 2, 1, 4});
  Tensor<float, 4> out({1, 2, 1, 4});
  AttentionOptions options;
  options.window_left = 5;
  options.window_right = 6;
  decode_attention(q.view(), cache, options, out.view());
  for (Index d = 0; d < 4; ++d) EXPECT_EQ(out(0, 0, 0, d), row[static_cast<std::size_t>(d)]);
}

TEST(HardeningSizes, KVCacheWithOverflowingCapacityIsAnError) {
  EXPECT_TRUE(throws_error_with([] { KVCache<float>(1, 1, Index{1} << 62, 128, 128); },
                                {"KVCache keys: shape [1, 1, 4611686018427387904, 128]"}));
}

TEST(HardeningSizes, SparseKCacheWithOverflowingRowCountIsAnError) {
  SparseKOptions options;
  options.topk = std::numeric_limits<Index>::max();
  options.window = 8;
  EXPECT_TRUE(throws_error_with([&] { SparseKCache<float>(1, 1, 4, 4, options); },
                                {"SparseKCache: sink_tokens + window + topk"}));
  options.topk = Index{1} << 60;
  EXPECT_TRUE(throws_error_with([&] { SparseKCache<float>(1, 1, 64, 64, options); },
                                {"SparseKCache keys: shape"}));
}

TEST(HardeningSizes, SpadeDecoderWithOverflowingMaxTokensIsAnError) {
  const SpadeSchema schema({SpadeFeature::binned("a", 3)});
  EXPECT_TRUE(throws_error_with([&] { SpadeDecoder(schema, 4, Index{1} << 62); },
                                {"SpadeDecoder ids: shape [4, 4611686018427387904, 1]"}));
}

TEST(HardeningSizes, VectorQuantizerWithOverflowingCodebookIsAnError) {
  EXPECT_TRUE(throws_error_with([] { VectorQuantizer(Index{1} << 40, Index{1} << 40); },
                                {"VectorQuantizer codebook: shape"}));
}

// ---------------------------------------------------------------------------------------------
// 2. Thread counts.

// Views of any extents over one small buffer, every stride 0 but the last: the empty views
// (and huge broadcast inputs) of the size regressions below.
struct EmptyViews {
  std::vector<float> cell = std::vector<float>(16, 0.0f);
  TensorView<float, 4> view(std::array<Index, 4> shape) {
    return TensorView<float, 4>(cell.data(), shape, {0, 0, 0, 1});
  }
  TensorView<float, 3> view3(std::array<Index, 3> shape) {
    return TensorView<float, 3>(cell.data(), shape, {0, 0, 0});
  }
};

// Regressions (the Python fuzz suite): backwards of calls without query rows and keys over
// empty views whose other extents count 2^40 (batch, kv head) pairs ran one empty task per pair
// (a hang); every gradient is empty, so they return at once.
TEST(HardeningSizes, BackwardsWithoutRowsAndKeysDoNoWorkWhateverTheOtherExtents) {
  EmptyViews cell;
  const auto view = [&](std::array<Index, 4> shape) { return cell.view(shape); };
  const auto view3 = [&](std::array<Index, 3> shape) { return cell.view3(shape); };
  const Index huge = Index{1} << 40;
  AttentionOptions options;
  options.causal = true;
  // Hq = 0 rows, Hkv = 2^40 heads of no keys.
  const TensorView<const float, 4> q = view({1, 0, 0, 6}), k = view({1, huge, 0, 6});
  attention_backward(q, k, k, q, view3({1, 0, 0}), q, view({1, 0, 0, 6}), view({1, huge, 0, 6}),
                     view({1, huge, 0, 6}), options);
  // B = 2^40 sequences of no queries and no keys.
  const TensorView<const float, 4> qb = view({huge, 1, 0, 6}), kb = view({huge, 1, 0, 6});
  SparseKOptions sparse;
  sparse.topk = 4;
  sparsek_attention_backward(qb, kb, kb, view3({huge, 1, 0}), qb, view3({huge, 1, 0}), qb, sparse,
                             view({huge, 1, 0, 6}), view({huge, 1, 0, 6}), view({huge, 1, 0, 6}),
                             view3({huge, 1, 0}));
}

// Regression (fuzz_attention in CI): an empty query whose Lq and GQA group multiply past 2^63
// ([0, 2^40, 2^40, D] against one kv head) overflowed the rows per head while the call was
// planned (UBSan: signed overflow). Counts of rows and tiles now saturate; there is nothing to
// compute, and nothing is written.
TEST(HardeningSizes, EmptyQueriesWhoseExtentsMultiplyPast64BitsDoNoWork) {
  EmptyViews cell;
  const auto view = [&](std::array<Index, 4> shape) { return cell.view(shape); };
  const auto view3 = [&](std::array<Index, 3> shape) { return cell.view3(shape); };
  const Index huge = Index{1} << 40;
  for (const bool causal : {false, true}) {
    AttentionOptions options;
    options.causal = causal;
    options.q_offset = 0;
    // B = 0: Lq * Hq / Hkv = 2^80 rows per head.
    attention(view({0, huge, huge, 6}), view({0, 1, 3, 6}), view({0, 1, 3, 5}),
              view({0, huge, huge, 5}), options, view3({0, huge, huge}));
    options.window_left = 2;
    options.window_right = causal ? -1 : 1;
    sliding_window_attention(view({0, huge, huge, 6}), view({0, 1, 3, 6}), view({0, 1, 3, 5}),
                             view({0, huge, huge, 5}), options, view3({0, huge, huge}));
  }
  for (const float value : cell.cell) EXPECT_EQ(value, 0.0f);
}

// Key ranges (variable-length batches) are taken by the band entry points, SparseK attention
// (and key_start by decode_attention) only: every other one that shares AttentionOptions names them
// instead of ignoring them, and writes nothing.
TEST(HardeningOptions, KeyRangesOutsideTheBandEntryPointsAreRejected) {
  const Index batch = 2, heads = 2, len = 9, dim = 4;
  std::vector<float> q_storage(batch * heads * len * dim, 0.5f);
  std::vector<float> out_storage(q_storage.size(), 7.0f);
  const TensorView<const float, 4> q(q_storage.data(), {batch, heads, len, dim});
  const TensorView<float, 4> out(out_storage.data(), {batch, heads, len, dim});
  const std::int64_t starts[2] = {0, 3};
  AttentionOptions options;
  options.causal = true;
  options.key_start = TensorView<const std::int64_t, 1>(starts, {2});
  const std::string expected = "key_start and key_length (variable-length batches)";

  KVCacheOptions paged;
  paged.page_bounds = 4;
  KVCache<float> cache(batch, heads, 16, dim, dim, paged);
  cache.append(q, q);
  EXPECT_TRUE(test::throws_error_with([&] { quest_decode_attention(q, cache, options, {}, out); },
                                      {"quest_decode_attention", expected}));
  std::vector<float> u_storage(batch * heads * len, 0.0f);
  const TensorView<const float, 3> u(u_storage.data(), {batch, heads, len});
  SparseKOptions sparse;
  static_cast<AttentionOptions&>(sparse) = options;
  sparse.topk = 4;
  std::vector<std::int64_t> indices_storage(batch * heads * len * 4, 0);
  std::vector<float> gates_storage(indices_storage.size(), 0.0f);
  const TensorView<std::int64_t, 4> indices(indices_storage.data(), {batch, heads, len, 4});
  const TensorView<float, 4> gates(gates_storage.data(), {batch, heads, len, 4});
  EXPECT_TRUE(test::throws_error_with([&] { sparsek_select(u, len, sparse, indices, gates); },
                                      {"sparsek_select", expected}));
  BlockSparseOptions blocks;
  blocks.block_size = 4;
  EXPECT_TRUE(test::throws_error_with(
      [&] { block_sparse_attention(q, q, q, out, options, blocks); }, {expected}));
  AttentionConfig config;
  config.options = options;
  EXPECT_TRUE(test::throws_error_with([&] { make_attention("dense", config); },
                                      {"keeps its options", "key_start and key_length"}));
  for (const float value : out_storage) ASSERT_EQ(value, 7.0f);
}

// Regression (fuzz_sparse): a selection without query rows (Hq = 0) whose Lq counts 2^61 + 1
// still has B * Hkv * query_blocks = 2^57 lists; sizing their offsets threw a bare
// std::bad_alloc (under ASan, an abort). No system holds them: a foveal::MemoryError that names
// the call, and a selection of an ordinary size still works.
TEST(HardeningSizes, SelectionsTooLargeToHoldAreAMemoryError) {
  std::vector<float> cell(16, 0.0f);
  const Index huge = (Index{1} << 61) + 1;
  const TensorView<const float, 4> q(cell.data(), {2, 0, huge, 1}, {0, 0, 0, 1});
  const TensorView<const float, 4> k(cell.data(), {2, 2, 12, 1}, {0, 0, 1, 1});
  const auto memory_error_naming = [](auto&& call, const std::string& name) {
    try {
      call();
    } catch (const MemoryError& error) {
      return std::string(error.what()).find(name + ": the selection's lists") != std::string::npos;
    }
    return false;
  };
  EXPECT_TRUE(
      memory_error_naming([&] { block_sparse_select(q, k, {}, {}); }, "block_sparse_select"));
  EXPECT_TRUE(memory_error_naming([&] { token_topk_select(q, k, {}, {}); }, "token_topk_select"));
  const TensorView<const float, 4> few(cell.data(), {2, 0, 100, 1}, {0, 0, 0, 1});
  const BlockSelection selection = block_sparse_select(few, k, {}, {});
  EXPECT_GE(selection.query_blocks, 1);
  EXPECT_EQ(static_cast<Index>(selection.offsets.size()), 2 * 2 * selection.query_blocks + 1);
}

TEST(HardeningThreads, SetNumThreadsRejectsCountsAboveTheMaximum) {
  EXPECT_TRUE(throws_error_with([] { set_num_threads(kMaxThreads + 1); },
                                {"set_num_threads: num_threads must be in [0, 1024]", "got 1025"}));
  EXPECT_TRUE(throws_error_with([] { set_num_threads(-1); }, {"got -1"}));
  const int before = get_num_threads();
  set_num_threads(kMaxThreads);
  EXPECT_EQ(get_num_threads(), kMaxThreads);
  set_num_threads(0);
  EXPECT_EQ(get_num_threads(), before);
  EXPECT_LE(get_num_threads(), kMaxThreads);
}

TEST(HardeningThreads, ParallelForNeverStartsMoreThreadsThanTasks) {
  EXPECT_EQ(detail::team_size(5, 1000), 5);
  EXPECT_EQ(detail::team_size(1 << 20, 100000), kMaxThreads);
  EXPECT_EQ(detail::team_size(0, 8), 1);
  EXPECT_EQ(detail::team_size(3, 0), 1);
  std::atomic<int> most_slots{0};
  std::atomic<int> most_team{1};
  parallel_for(5, kMaxThreads, [&](Index) {
    int slot = detail::thread_index() + 1;
    int seen = most_slots.load();
    while (slot > seen && !most_slots.compare_exchange_weak(seen, slot)) {
    }
#ifdef _OPENMP
    int team = omp_get_num_threads();
    seen = most_team.load();
    while (team > seen && !most_team.compare_exchange_weak(seen, team)) {
    }
#endif
  });
  EXPECT_LE(most_slots.load(), 5);
  EXPECT_LE(most_team.load(), 5);
}

TEST(HardeningThreads, EntryPointsRejectAbsurdThreadCountsBeforeStartingAny) {
  Tensor<float, 2> z({64, 8}), p({64, 8});
  fill(z, 1);
  EXPECT_TRUE(throws_error_with([&] { sparsek(z.view(), 3, p.view(), {}, 100000); },
                                {"sparsek: num_threads must be in [0, 1024]", "got 100000"}));
  // The largest accepted count runs (with at most one thread per task).
  sparsek(z.view(), 3, p.view(), {}, kMaxThreads);
  Tensor<float, 2> reference({64, 8});
  sparsek(z.view(), 3, reference.view(), {}, 1);
  for (Index i = 0; i < p.numel(); ++i) ASSERT_EQ(p.data()[i], reference.data()[i]);

  Tensor<float, 4> q({1, 2, 4, 8}), out({1, 2, 4, 8});
  fill(q, 2);
  AttentionOptions options;
  options.num_threads = kMaxThreads + 1;
  EXPECT_TRUE(
      throws_error_with([&] { attention(q.view(), q.view(), q.view(), out.view(), options); },
                        {"attention: num_threads must be in [0, 1024]", "got 1025"}));
  EXPECT_TRUE(throws_error_with(
      [&] {
        Tensor<float, 3> lse({1, 2, 4});
        merge_states(out.view(), lse.view(), out.view(), lse.view(), q.view(), {}, 5000);
      },
      {"merge_states: num_threads must be in [0, 1024]"}));
  VectorQuantizer quantizer(4, 8);
  EXPECT_TRUE(throws_error_with(
      [&] {
        Tensor<std::int64_t, 1> indices({64});
        quantizer.quantize(z.view(), indices.view(), {}, {}, 2000);
      },
      {"num_threads must be in [0, 1024]"}));
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrent use of one cache.

TEST(HardeningConcurrency, KVCacheMutationDuringAReadIsAnErrorAndChangesNothing) {
  KVCache<float> cache(1, 1, 8, 4, 4);
  Tensor<float, 4> step({1, 1, 1, 4});
  fill(step, 3);
  cache.append(step.view(), step.view());
  {
    const auto reading = cache.read_guard("decode_attention");
    const auto another = cache.read_guard("decode_attention");  // reads share the cache
    EXPECT_TRUE(throws_error_with([&] { cache.append(step.view(), step.view()); },
                                  {"KVCache::append: the cache is being read by another thread"}));
    EXPECT_TRUE(throws_error_with([&] { cache.reset(); }, {"KVCache::reset: the cache is being"}));
    EXPECT_TRUE(throws_error_with([&] { cache.truncate(0); }, {"KVCache::truncate"}));
  }
  EXPECT_EQ(cache.length(0), 1);
  cache.append(step.view(), step.view());  // free again
  EXPECT_EQ(cache.length(0), 2);
}

// Two threads appending to and resetting one cache: every call either runs alone or throws
// foveal::Error; the cache never holds more than its capacity and never crashes. (Without the
// guard, two appends of 2 steps pass the capacity check of a batch of 4 sequences and the
// second starts from the first one's new length: length 10 of 8, rows written out of bounds.)
TEST(HardeningConcurrency, KVCacheConcurrentAppendAndResetNeverCorruptsIt) {
  constexpr Index kCapacity = 8;
  KVCache<float> cache(4, 4, kCapacity, 2048, 2048);
  Tensor<float, 4> step({4, 4, 2, 2048});
  fill(step, 4);
  std::atomic<long> rejected{0};
  std::atomic<bool> bad_length{false};
  const auto worker = [&](int id) {
    for (int i = 0; i < 4000; ++i) {
      try {
        if (i % 40 == id) {
          cache.reset();
        } else {
          cache.append(step.view(), step.view());
        }
      } catch (const Error& error) {
        const std::string message = error.what();
        if (message.find("another thread") != std::string::npos) {
          ++rejected;
        } else if (message.find("exceed the capacity") == std::string::npos) {
          ADD_FAILURE() << message;
        }
      }
      for (Index b = 0; b < 4; ++b)
        if (cache.length(b) > kCapacity) bad_length = true;
    }
  };
  std::thread a(worker, 0), b(worker, 1);
  a.join();
  b.join();
  EXPECT_FALSE(bad_length.load());
  std::printf("rejected concurrent calls: %ld\n", rejected.load());
}

// Decodes while another thread appends: a decode that meets an append throws; the others give
// the result of the cache as it was.
TEST(HardeningConcurrency, KVCacheDecodeConcurrentWithAppendsNeverCrashes) {
  KVCache<float> cache(1, 1, Index{1} << 16, 32, 32);
  Tensor<float, 4> step({1, 1, 1, 32}), q({1, 4, 1, 32}), out({1, 4, 1, 32});
  fill(step, 5);
  fill(q, 6);
  cache.append(step.view(), step.view());
  std::atomic<bool> stop{false};
  std::thread writer([&] {
    while (!stop && cache.length(0) < (Index{1} << 16) - 1) {
      try {
        cache.append(step.view(), step.view());
      } catch (const Error&) {
      }
    }
  });
  for (int i = 0; i < 3000; ++i) {
    try {
      decode_attention(q.view(), cache, AttentionOptions{}, out.view());
    } catch (const Error& error) {
      EXPECT_NE(std::string(error.what()).find("another thread"), std::string::npos)
          << error.what();
    }
  }
  stop = true;
  writer.join();
  // On a busy machine every decode may have met an append; once the writer is gone the cache
  // must still be whole and usable.
  EXPECT_NO_THROW(decode_attention(q.view(), cache, AttentionOptions{}, out.view()));
  EXPECT_TRUE(all_finite(TensorView<const float, 4>(out.view())));
}

TEST(HardeningConcurrency, SparseKCacheConcurrentAppendResetAndAttendNeverCrash) {
  SparseKOptions options;
  options.topk = 64;
  options.window = 16;
  SparseKCache<float> cache(2, 4, 64, 64, options);
  Tensor<float, 4> k({2, 4, 96, 64}), q({2, 4, 1, 64}), out({2, 4, 1, 64});
  Tensor<float, 3> u({2, 4, 96});
  fill(k, 7);
  fill(q, 8);
  fill(u, 9);
  cache.append(k.view(), k.view(), u.view());
  const auto worker = [&](int id) {
    for (int i = 0; i < 1500; ++i) {
      try {
        if (id == 2) {
          cache.attend(q.view(), out.view());
        } else if ((i + id) % 7 == 0) {
          cache.reset();
        } else {
          cache.append(k.view(), k.view(), u.view());
        }
      } catch (const Error& error) {
        const std::string message = error.what();
        if (message.find("another thread") == std::string::npos &&
            message.find("the cache is empty") == std::string::npos)
          ADD_FAILURE() << message;
      }
    }
  };
  std::thread a(worker, 0), b(worker, 1), c(worker, 2);
  a.join();
  b.join();
  c.join();
  EXPECT_LE(cache.stored_rows(), cache.capacity());
}

// ---------------------------------------------------------------------------------------------
// 4. Allocation failures.

TEST(HardeningMemory, AnAllocationTheSystemCannotProvideIsMemoryErrorWithTheByteCount) {
  // 2^53 rows of 16 floats: 2^59 bytes, beyond any address space, but no overflow.
  try {
    KVCache<float> cache(1, 1, Index{1} << 53, 16, 16);
    FAIL() << "a 2^59-byte cache was allocated";
  } catch (const MemoryError& error) {
    const std::string message = error.what();
    EXPECT_NE(message.find("KVCache keys: cannot allocate 576460752303423488 bytes"),
              std::string::npos)
        << message;
  }
  // It is a std::bad_alloc, never a foveal::Error.
  EXPECT_THROW((Tensor<double, 2>({Index{1} << 30, Index{1} << 28})), std::bad_alloc);
}

TEST(HardeningMemory, LargeCachesTakeNoMemoryUntilWritten) {
  const Index before = resident_bytes();
  // 1 GiB of keys and 1 GiB of values.
  KVCache<float> cache(1, 8, Index{1} << 15, 1024, 1024);
  EXPECT_LT(resident_bytes() - before, Index{64} << 20);
  EXPECT_EQ(cache.keys()(0, 7, (Index{1} << 15) - 1, 1023), 0.0f);  // zeroed on first touch
  Tensor<float, 4> step({1, 8, 1, 1024});
  fill(step, 9);
  cache.append(step.view(), step.view());
  EXPECT_EQ(cache.keys()(0, 3, 0, 5), step(0, 3, 0, 5));
}

// ---------------------------------------------------------------------------------------------
// 5. Outputs that overlap themselves.

TEST(HardeningOverlap, NoSelfOverlapAcceptsDistinctLayoutsAndRejectsOverlappingOnes) {
  std::vector<float> memory(1024);
  const auto check_view = [&](Shape<3> shape, Shape<3> strides, Index offset) {
    detail::require_no_self_overlap("f", "out",
                                    TensorView<float, 3>(memory.data() + offset, shape, strides));
  };
  check_view({2, 3, 4}, {12, 4, 1}, 0);    // contiguous
  check_view({4, 3, 2}, {1, 4, 12}, 0);    // transposed
  check_view({2, 3, 4}, {-12, 4, 1}, 12);  // negative stride
  check_view({2, 1, 4}, {4, 0, 1}, 0);     // a size-1 dim with stride 0
  check_view({2, 3, 4}, {100, 4, 1}, 0);   // gaps
  EXPECT_TRUE(throws_error_with(
      [&] {
        check_view({2, 3, 4}, {0, 4, 1}, 0);
      },
      {"f: out is an output whose elements may overlap"}));
  EXPECT_TRUE(throws_error_with([&] { check_view({2, 3, 4}, {8, 4, 1}, 0); }, {"out"}));
  EXPECT_TRUE(throws_error_with([&] { check_view({2, 3, 4}, {12, 2, 1}, 0); }, {"out"}));
}

// The reproducer of the issue: out [2, 4, 8, 16] with stride 0 over the batch.
TEST(HardeningOverlap, EveryAttentionEntryPointRejectsAStrideZeroOut) {
  Tensor<float, 4> q({2, 4, 8, 16});
  fill(q, 10);
  Tensor<float, 4> memory({1, 4, 8, 16});
  for (Index i = 0; i < memory.numel(); ++i) memory.data()[i] = 7;
  const TensorView<float, 4> out(memory.data(), {2, 4, 8, 16}, {0, 128, 16, 1});
  Tensor<float, 3> lse_memory({1, 4, 8});
  const TensorView<float, 3> lse(lse_memory.data(), {2, 4, 8}, {0, 8, 1});
  const char* expected = "out is an output whose elements may overlap";
  EXPECT_TRUE(throws_error_with([&] { attention(q.view(), q.view(), q.view(), out, {}); },
                                {"attention: ", expected}));
  AttentionOptions window;
  window.window_left = 2;
  window.causal = true;
  EXPECT_TRUE(throws_error_with(
      [&] { sliding_window_attention(q.view(), q.view(), q.view(), out, window); },
      {"sliding_window_attention: ", expected}));
  Tensor<float, 4> good({2, 4, 8, 16});
  EXPECT_TRUE(
      throws_error_with([&] { attention(q.view(), q.view(), q.view(), good.view(), {}, lse); },
                        {"lse is an output whose elements may overlap"}));
  Tensor<float, 3> lse_a({2, 4, 8});
  EXPECT_TRUE(
      throws_error_with([&] { merge_states(q.view(), lse_a.view(), q.view(), lse_a.view(), out); },
                        {"merge_states: ", expected}));
  KVCache<float> cache(2, 4, 8, 16, 16);
  cache.append(q.view(), q.view());
  EXPECT_TRUE(throws_error_with([&] { decode_attention(q.view(), cache, {}, out); },
                                {"decode_attention: ", expected}));
  Tensor<float, 3> u({2, 4, 8});
  fill(u, 11);
  SparseKOptions sparse;
  sparse.topk = 2;
  EXPECT_TRUE(throws_error_with(
      [&] { sparsek_attention(q.view(), q.view(), q.view(), u.view(), sparse, out); },
      {"sparsek_attention: ", expected}));
  for (Index i = 0; i < memory.numel(); ++i) ASSERT_EQ(memory.data()[i], 7) << "out was written";
  // A mirrored (negative-stride) out is fine and gives the same numbers.
  Tensor<float, 4> mirrored_memory({2, 4, 8, 16});
  const TensorView<float, 4> mirrored(mirrored_memory.data() + 7 * 16, {2, 4, 8, 16},
                                      {512, 128, -16, 1});
  attention(q.view(), q.view(), q.view(), mirrored, {});
  attention(q.view(), q.view(), q.view(), good.view(), {});
  for (Index i = 0; i < 8; ++i) ASSERT_EQ(mirrored(1, 2, i, 3), good(1, 2, i, 3));
}

TEST(HardeningOverlap, OtherOutputsAreCheckedToo) {
  Tensor<float, 2> z({4, 8});
  fill(z, 12);
  std::vector<float> memory(8, 7.0f);
  const TensorView<float, 2> p(memory.data(), {4, 8}, {0, 1});
  EXPECT_TRUE(throws_error_with([&] { sparsek(z.view(), 3, p); },
                                {"sparsek: p is an output whose elements may overlap"}));
  std::vector<std::int64_t> index_memory(1, -5);
  const TensorView<std::int64_t, 1> indices(index_memory.data(), {4}, {0});
  EXPECT_TRUE(throws_error_with([&] { vq_assign(z.view(), z.view(), indices); },
                                {"vq_assign: indices is an output whose elements may overlap"}));
  EXPECT_EQ(index_memory[0], -5);
  for (float value : memory) EXPECT_EQ(value, 7.0f);
}

// ---------------------------------------------------------------------------------------------
// 6. NaN in, NaN out.

// Causal attention over 8 keys with a NaN in key 3 (of k or of v): rows 0-2 do not see it and
// stay finite, rows 3-7 are NaN, in every output element and their lse.
template <typename Run>
void expect_nan_from_key_3(Run&& run, bool in_values) {
  Tensor<float, 4> q({1, 2, 8, 16}), k({1, 2, 8, 16}), v({1, 2, 8, 16}), out({1, 2, 8, 16});
  Tensor<float, 3> lse({1, 2, 8});
  fill(q, 13);
  fill(k, 14);
  fill(v, 15);
  (in_values ? v : k)(0, 1, 3, 5) = kNaN;
  run(q, k, v, out, lse);
  for (Index i = 0; i < 8; ++i) {
    for (Index d = 0; d < 16; ++d) {
      EXPECT_TRUE(std::isfinite(out(0, 0, i, d))) << "head 0 never sees the NaN: row " << i;
      if (i < 3) {
        EXPECT_TRUE(std::isfinite(out(0, 1, i, d))) << "row " << i << " does not see key 3";
      } else if (!in_values || d == 5) {
        EXPECT_TRUE(std::isnan(out(0, 1, i, d))) << "row " << i << " sees key 3, d " << d;
      }
    }
    if (i < 3) {
      EXPECT_TRUE(std::isfinite(lse(0, 1, i)));
    } else if (!in_values) {
      EXPECT_TRUE(std::isnan(lse(0, 1, i))) << i;
    }
  }
}

TEST(HardeningNaN, DenseAndSlidingWindowAttentionPropagateNaN) {
  for (bool in_values : {false, true}) {
    AttentionOptions causal;
    causal.causal = true;
    expect_nan_from_key_3(
        [&](auto& q, auto& k, auto& v, auto& out, auto& lse) {
          attention(q.view(), k.view(), v.view(), out.view(), causal, lse.view());
        },
        in_values);
    AttentionOptions window = causal;
    window.window_left = 16;
    expect_nan_from_key_3(
        [&](auto& q, auto& k, auto& v, auto& out, auto& lse) {
          sliding_window_attention(q.view(), k.view(), v.view(), out.view(), window, lse.view());
        },
        in_values);
  }
}

TEST(HardeningNaN, DecodeAttentionPropagatesNaNLikeAttention) {
  for (bool in_values : {false, true}) {
    AttentionOptions causal;
    causal.causal = true;
    expect_nan_from_key_3(
        [&](auto& q, auto& k, auto& v, auto& out, auto& lse) {
          KVCache<float> cache(1, 2, 8, 16, 16);
          cache.append(k.view(), v.view());
          decode_attention(q.view(), cache, causal, out.view(), lse.view());
        },
        in_values);
  }
}

// One query over 3000 keys: the keys are split into chunks whose states are merged; a NaN in
// one chunk makes the merged row NaN (it used to drop that chunk: 0 and lse -inf for a lone
// NaN key).
TEST(HardeningNaN, SplitKVDecodeMergesANaNChunkIntoANaNRow) {
  for (Index length : {Index{1}, Index{3000}}) {
    KVCache<float> cache(1, 1, 4096, 16, 16);
    Tensor<float, 4> k({1, 1, length, 16}), q({1, 2, 1, 16}), out({1, 2, 1, 16});
    Tensor<float, 3> lse({1, 2, 1});
    fill(k, 16);
    fill(q, 17);
    k(0, 0, length / 2, 0) = kNaN;
    cache.append(k.view(), k.view());
    decode_attention(q.view(), cache, {}, out.view(), lse.view());
    for (Index h = 0; h < 2; ++h) {
      EXPECT_TRUE(std::isnan(lse(0, h, 0))) << length;
      for (Index d = 0; d < 16; ++d) EXPECT_TRUE(std::isnan(out(0, h, 0, d))) << length;
    }
  }
}

TEST(HardeningNaN, MergeStatesPropagatesANaNLse) {
  Tensor<float, 4> a({1, 1, 2, 4}), b({1, 1, 2, 4}), out({1, 1, 2, 4});
  Tensor<float, 3> lse_a({1, 1, 2}), lse_b({1, 1, 2}), lse({1, 1, 2});
  fill(a, 18);
  fill(b, 19);
  lse_a(0, 0, 1) = kNaN;
  lse_b(0, 0, 0) = -std::numeric_limits<float>::infinity();
  merge_states(a.view(), lse_a.view(), b.view(), lse_b.view(), out.view(), lse.view());
  for (Index d = 0; d < 4; ++d) {
    EXPECT_EQ(out(0, 0, 0, d), a(0, 0, 0, d));
    EXPECT_TRUE(std::isnan(out(0, 0, 1, d)));
  }
  EXPECT_TRUE(std::isnan(lse(0, 0, 1)));
  EXPECT_TRUE(throws_error_with(
      [&] {
        lse_b(0, 0, 0) = std::numeric_limits<float>::infinity();
        merge_states(a.view(), lse_a.view(), b.view(), lse_b.view(), out.view(), lse.view());
      },
      {"lse_b[0, 0, 0] = inf"}));
}

TEST(HardeningNaN, SparseKAttentionPropagatesNaN) {
  // topk >= the pool: every causal key is selected, so rows see exactly keys 0..i.
  SparseKOptions options;
  options.topk = 8;
  options.window = 2;
  options.gate = SparseKGate::none;
  for (bool in_values : {false, true}) {
    expect_nan_from_key_3(
        [&](auto& q, auto& k, auto& v, auto& out, auto& lse) {
          Tensor<float, 3> u({1, 2, 8});
          fill(u, 20);
          sparsek_attention(q.view(), k.view(), v.view(), u.view(), options, out.view(),
                            lse.view());
        },
        in_values);
  }
}

TEST(HardeningNaN, SparseKCachePropagatesNaN) {
  SparseKOptions options;
  options.topk = 4;
  options.window = 2;
  options.gate = SparseKGate::none;
  for (bool in_values : {false, true}) {
    SparseKCache<float> cache(1, 1, 8, 8, options);
    Tensor<float, 4> k({1, 1, 6, 8}), v({1, 1, 6, 8}), q({1, 2, 1, 8}), out({1, 2, 1, 8});
    Tensor<float, 3> u({1, 1, 6}), lse({1, 2, 1});
    fill(k, 21);
    fill(v, 22);
    fill(q, 23);
    fill(u, 24);
    (in_values ? v : k)(0, 0, 2, 1) = kNaN;
    cache.append(k.view(), v.view(), u.view());
    cache.attend(q.view(), out.view(), lse.view());
    for (Index h = 0; h < 2; ++h) {
      EXPECT_TRUE(std::isnan(out(0, h, 0, 1)));
      if (!in_values) {
        EXPECT_TRUE(std::isnan(lse(0, h, 0)));
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 8. k-means stops when it has converged, and can be interrupted.

TEST(HardeningKMeans, HugeLloydIterationsStopOnceAssignmentsRepeat) {
  Tensor<float, 2> x({200, 4});
  fill(x, 25);
  VectorQuantizer converged(4, 4), bounded(4, 4);
  converged.init_kmeans(x.view(), Index{1} << 40, 7);  // returns: it converges
  bounded.init_kmeans(x.view(), 1000, 7);
  for (Index i = 0; i < 16; ++i)
    EXPECT_EQ(converged.codebook().data()[i], bounded.codebook().data()[i]);
  ResidualVQ residual(2, 4, 4);
  residual.init_kmeans(x.view(), Index{1} << 40, 7);
}

int interrupt_calls = 0;
void interrupt_after_three() {
  if (++interrupt_calls > 3) throw std::runtime_error("interrupted");
}

TEST(HardeningKMeans, AnInterruptStopsKMeansAndLeavesTheQuantizerUnchanged) {
  Tensor<float, 2> x({200, 4});
  fill(x, 26);
  Tensor<float, 2> codes({4, 4});
  fill(codes, 27);
  VectorQuantizer quantizer(codes.view());
  ResidualVQ residual(2, 4, 4);
  residual.init_kmeans(x.view(), 2, 1);
  const float before = residual.stage(1).codebook()(2, 3);
  interrupt_calls = 0;
  set_interrupt_check(&interrupt_after_three);
  EXPECT_THROW(quantizer.init_kmeans(x.view(), Index{1} << 40, 7), std::runtime_error);
  interrupt_calls = 0;
  EXPECT_THROW(residual.init_kmeans(x.view(), Index{1} << 40, 9), std::runtime_error);
  set_interrupt_check(nullptr);
  for (Index i = 0; i < 16; ++i) EXPECT_EQ(quantizer.codebook().data()[i], codes.data()[i]);
  EXPECT_EQ(residual.stage(1).codebook()(2, 3), before);
}

// ---------------------------------------------------------------------------------------------
// 9. SPADE shifts.

TEST(HardeningSpade, AnExplicitShiftOfZeroIsRejectedWithItsValue) {
  EXPECT_TRUE(throws_error_with(
      [] {
        SpadeSchema({SpadeFeature::binned("z", 4, 2), SpadeFeature::binned("x", 4, 0)});
      },
      {"features[1].shift (feature \"x\") must be >= 1", "got 0"}));
  EXPECT_TRUE(throws_error_with([] { SpadeSchema({SpadeFeature::binned("z", 4, 0)}); },
                                {"features[0].shift", "got 0"}));
  const SpadeSchema defaults({SpadeFeature::binned("z", 4), SpadeFeature::continuous("e")});
  EXPECT_EQ(defaults.feature(1).shift, 2);
}

}  // namespace
}  // namespace foveal::test
