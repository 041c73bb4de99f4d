// tests/cpp/test_parallel.cpp — the work threshold of the thread team: a call whose work is
// below detail::min_work_per_thread() per thread runs on fewer threads (one when small),
// whatever num_threads asks, and gives the same bits as with no threshold.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#include "foveal/foveal.hpp"
#include "harness.hpp"

namespace foveal {
namespace {

// Sets the work per thread for the test's lifetime (harness.hpp turns it off for the others).
class WorkPerThread {
 public:
  explicit WorkPerThread(std::int64_t work) : saved_(detail::set_min_work_per_thread(work)) {}
  ~WorkPerThread() { detail::set_min_work_per_thread(saved_); }
  WorkPerThread(const WorkPerThread&) = delete;
  WorkPerThread& operator=(const WorkPerThread&) = delete;

 private:
  std::int64_t saved_;
};

constexpr std::int64_t kPortion = detail::kMinWorkPerThread;

TEST(TeamSize, OneThreadBelowTwoPortionsOfWork) {
  const WorkPerThread threshold(kPortion);
  EXPECT_EQ(detail::team_size(100, 2, 0), 1);
  EXPECT_EQ(detail::team_size(100, 2, 2 * kPortion - 1), 1);
  EXPECT_EQ(detail::team_size(100, 2, 2 * kPortion), 2);
  EXPECT_EQ(detail::team_size(100, 8, 3 * kPortion), 3);
  EXPECT_EQ(detail::team_size(100, 8, 100 * kPortion), 8);
  // Still never more than the tasks, the request or kMaxThreads.
  EXPECT_EQ(detail::team_size(3, 8, 100 * kPortion), 3);
  EXPECT_EQ(detail::team_size(100, 1, 100 * kPortion), 1);
  EXPECT_EQ(detail::team_size(1 << 20, kMaxThreads + 5, std::int64_t{1} << 62), kMaxThreads);
}

TEST(TeamSize, ZeroTurnsTheThresholdOff) {
  const WorkPerThread threshold(0);
  EXPECT_EQ(detail::team_size(100, 2, 0), 2);
  EXPECT_EQ(detail::team_size(100, 5, 1), 5);
}

TEST(TeamSize, NegativeWorkPerThreadIsRejected) {
  const WorkPerThread threshold(kPortion);
  EXPECT_TRUE(test::throws_error_with([] { detail::set_min_work_per_thread(-1); },
                                      {"set_min_work_per_thread: work must be >= 0", "got -1"}));
  EXPECT_EQ(detail::min_work_per_thread(), kPortion);
}

// One decode step of a small model: B = 1, Hq = 8, Hkv = 2, D = Dv = 64, one query, `length`
// cached keys; returns out's bits and the widest team any of its loops started.
struct DecodeRun {
  std::vector<float> out;
  int widest_team;
};

DecodeRun run_decode(Index length, int num_threads) {
  const Index heads_q = 8, heads_kv = 2, dim = 64;
  KVCache<float> cache(1, heads_kv, length, dim, dim);
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  Tensor<float, 4> k({1, heads_kv, length, dim}), v({1, heads_kv, length, dim});
  Tensor<float, 4> q({1, heads_q, 1, dim}), out({1, heads_q, 1, dim});
  for (Tensor<float, 4>* tensor : {&k, &v, &q})
    for (Index i = 0; i < tensor->numel(); ++i) tensor->data()[i] = normal(rng);
  cache.append(k.view(), v.view());
  AttentionOptions options;
  options.num_threads = num_threads;
  detail::widest_team() = 0;
  decode_attention(q.view(), cache, options, out.view());
  return {std::vector<float>(out.data(), out.data() + out.numel()), detail::widest_team()};
}

void expect_same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size());
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0);
}

TEST(WorkThreshold, SmallDecodeRunsOnOneThreadWhateverTheSetting) {
  const WorkPerThread threshold(detail::kMinWorkPerThread);
  // Work 8 × 64 × 128 = 65536 multiply-adds: far below two portions.
  const DecodeRun one = run_decode(64, 1);
  for (int threads : {2, 4}) {
    SCOPED_TRACE(test::describe(threads, " threads"));
    const DecodeRun run = run_decode(64, threads);
    EXPECT_EQ(run.widest_team, 1);
    expect_same_bits(run.out, one.out);
  }
}

TEST(WorkThreshold, LargeDecodeStillSplitsAcrossThreads) {
  const WorkPerThread threshold(detail::kMinWorkPerThread);
  // Enough keys for at least two portions of work and two chunks of keys.
  const Index length = 4 * detail::kMinWorkPerThread / (8 * 128) + 4096;
  const DecodeRun one = run_decode(length, 1);
  EXPECT_EQ(one.widest_team, 1);
  const DecodeRun two = run_decode(length, 2);
  EXPECT_EQ(two.widest_team, 2);
  expect_same_bits(two.out, one.out);
}

TEST(WorkThreshold, SameBitsWithAndWithoutTheThreshold) {
  for (Index length : {Index{64}, Index{5000}}) {
    SCOPED_TRACE(test::describe("length ", length));
    DecodeRun with, without;
    {
      const WorkPerThread threshold(detail::kMinWorkPerThread);
      with = run_decode(length, 2);
    }
    {
      const WorkPerThread threshold(0);
      without = run_decode(length, 2);
      EXPECT_EQ(without.widest_team, 2);
    }
    expect_same_bits(with.out, without.out);
  }
}

}  // namespace
}  // namespace foveal
