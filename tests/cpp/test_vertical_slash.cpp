// tests/cpp/test_vertical_slash.cpp — foveal::vertical_slash_select and vertical_slash_attention
// against the float64 references (tests/reference/vertical_slash_reference.hpp: the selection;
// attention_reference with the selection's token mask: the attention), planted columns and
// slashes found, the same bits for any thread count, bad arguments rejected before out is
// touched. Shapes include 1, primes and non-multiples of the block sizes and of the engine's
// tiles.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <set>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/vertical_slash.hpp"
#include "harness.hpp"
#include "reference/token_topk_reference.hpp"
#include "reference/vertical_slash_reference.hpp"
#include "selection_cases.hpp"

namespace foveal::test {
namespace {

std::string sparse_string(const VerticalSlashOptions& s) {
  return describe("budget=", s.budget, " threshold=", s.threshold, " block_size=", s.block_size,
                  " last_queries=", s.last_queries, " local_tokens=", s.local_tokens);
}

struct SelectAndAttend {
  VerticalSlashOptions sparse;
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& /*bias*/) const {
    vertical_slash_attention(q, k, v, out, options, sparse, lse);
  }
};

// float64 selects exactly as the reference; float32 (its estimate rounded) may rank two nearly
// tied lines the other way, so each of its lists has the reference's size and shares nearly all
// of its keys.
template <typename T>
void expect_lists_match(const std::vector<std::vector<std::int64_t>>& have,
                        const std::vector<reference::ReferenceList>& want) {
  ASSERT_EQ(have.size(), want.size());
  for (std::size_t i = 0; i < have.size(); ++i) {
    ASSERT_TRUE(std::is_sorted(have[i].begin(), have[i].end())) << "list " << i;
    if constexpr (std::is_same_v<T, double>) {
      ASSERT_EQ(have[i], want[i].kept) << "list " << i;
    } else {
      EXPECT_EQ(have[i].size(), want[i].kept.size()) << "list " << i;
      std::vector<std::int64_t> common;
      std::set_intersection(have[i].begin(), have[i].end(), want[i].kept.begin(),
                            want[i].kept.end(), std::back_inserter(common));
      EXPECT_GE(static_cast<double>(common.size()), 0.9 * static_cast<double>(have[i].size()))
          << "list " << i;
    }
  }
}

template <typename T>
void expect_vertical_slash_matches(const Problem& p, const AttentionOptions& o,
                                   const VerticalSlashOptions& sparse) {
  SCOPED_TRACE(
      describe(problem_string(p), "\n  ", options_string(o), "\n  ", sparse_string(sparse)));
  const Inputs in = random_inputs(p);
  const TypedInputs<T> typed(in);
  const TokenSelection selection = vertical_slash_select(typed.qv(p), typed.kv(p), o, sparse);
  EXPECT_EQ(selection.block_size, sparse.block_size);
  EXPECT_EQ(selection.len_k, p.len_k);
  expect_lists_match<T>(lists_of(selection.offsets, selection.keys),
                        reference::vertical_slash_select_reference(
                            shape_of(p), in.q, in.k, reference_options(o),
                            {sparse.budget, sparse.threshold, sparse.block_size,
                             sparse.last_queries, sparse.local_tokens}));
  const reference::ReferenceOptions options = reference_options(o);
  const std::vector<double> bias = reference::token_topk_bias(
      shape_of(p), options, selection.block_size, lists_of(selection.offsets, selection.keys));
  Outputs want;
  reference::attention_reference(shape_of(p), in.q, in.k, in.v, options, want.out, want.lse, bias,
                                 p.batch, p.heads_q);
  const Outputs got = run_entry<T>(SelectAndAttend{sparse}, p, in, o);
  EXPECT_TRUE(matches_reference(got.out, want.out, kTolerance<T>)) << "out";
  EXPECT_TRUE(matches_reference(got.lse, want.lse, kTolerance<T>)) << "lse";
  expect_identical(got, run_entry<T>(AttendTokenSelection{&selection}, p, in, o));
}

template <typename T>
class VerticalSlash : public ::testing::Test {};
TYPED_TEST_SUITE(VerticalSlash, ElementTypes, ElementTypeNames);

TYPED_TEST(VerticalSlash, MatchesReferenceOnRandomShapesOptionsAndBudgets) {
  for (std::uint64_t seed = 500; seed < 560; ++seed) {
    RandomSource random(seed + 31);
    const Problem p = random_problem(seed, 2e6, kSelectionLengths, 5);
    VerticalSlashOptions sparse;
    const AttentionOptions o = random_prefill_options(random, p, sparse);
    sparse.last_queries = random.pick({Index{1}, Index{7}, Index{64}, Index{1000}});
    sparse.local_tokens = random.pick({Index{0}, Index{5}, Index{64}});
    expect_vertical_slash_matches<TypeParam>(p, o, sparse);
  }
}

TYPED_TEST(VerticalSlash, EveryGroupRatio) {
  for (Index ratio : kGroupRatios) {
    AttentionOptions o;
    o.causal = true;
    o.sink_tokens = 3;
    VerticalSlashOptions sparse;
    sparse.block_size = 23;
    sparse.budget = 0.2;
    sparse.local_tokens = 8;
    sparse.last_queries = 19;
    expect_vertical_slash_matches<TypeParam>(
        make_problem(1, 2 * ratio, 2, 300, 300, 16, 8, 300 + ratio), o, sparse);
  }
}

TYPED_TEST(VerticalSlash, KeepingEveryKeyIsDenseAttention) {
  VerticalSlashOptions sparse;
  sparse.budget = 1;
  sparse.block_size = 48;
  expect_keeping_everything_is_dense<TypeParam>(SelectAndAttend{sparse}, 230);
}

// Every query attends strongly to key 5 (a column) and to the key 37 positions back (a slash):
// both lines rank first, so every query block far enough keeps key 5 and the keys 37 back of its
// queries, besides its local keys.
TYPED_TEST(VerticalSlash, FindsAPlantedColumnAndSlash) {
  using T = TypeParam;
  const Index length = 640, dim = 32;
  const Problem p = make_problem(1, 2, 1, length, length, dim, dim, 610);
  Inputs in = random_inputs(p);
  for (double& x : in.q) x *= 0.1;
  for (double& x : in.k) x *= 0.1;
  // Column: key 5 along axis 0, every query too. Slash: key j carries code(j) on axes 1.., the
  // query at i the code of i - 37.
  // Codes of positions -64 .. length - 1: independent normal values (no two positions alike).
  std::mt19937_64 engine(611);
  std::normal_distribution<double> normal(0.0, std::sqrt(0.5));
  std::vector<double> codes(static_cast<std::size_t>((length + 64) * dim));
  for (double& x : codes) x = normal(engine);
  const auto code = [&](Index j, Index d) {
    return codes[static_cast<std::size_t>((j + 64) * dim + d)];
  };
  in.k[5 * dim + 0] += 4.0;
  for (Index j = 0; j < length; ++j)
    for (Index d = 1; d < dim; ++d) in.k[j * dim + d] += code(j, d);
  for (Index h = 0; h < 2; ++h)
    for (Index i = 0; i < length; ++i) {
      in.q[(h * length + i) * dim + 0] += 4.0;
      for (Index d = 1; d < dim; ++d) in.q[(h * length + i) * dim + d] += 2.0 * code(i - 37, d);
    }
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  VerticalSlashOptions sparse;
  sparse.block_size = 32;
  sparse.local_tokens = 0;
  sparse.budget = 0.5;  // from block 4 on, room for key 5 and a slash besides the local keys
  const TokenSelection selection = vertical_slash_select(typed.qv(p), typed.kv(p), o, sparse);
  for (Index block = 4; block < length / 32; ++block) {
    std::int64_t count = 0;
    const std::int64_t* kept = selection.kept(0, 0, block, &count);
    const std::set<std::int64_t> keys(kept, kept + count);
    EXPECT_EQ(keys.count(5), 1u) << block;
    for (Index i = block * 32; i < block * 32 + 32; ++i)
      EXPECT_EQ(keys.count(i - 37), 1u) << "block " << block << " query " << i;
  }
}

TYPED_TEST(VerticalSlash, ThresholdKeepsFewerKeysOnAConcentratedEstimate) {
  using T = TypeParam;
  const Problem p = make_problem(1, 1, 1, 256, 256, 16, 16, 620);
  Inputs in = random_inputs(p);
  for (Index j = 0; j < 3; ++j) in.k[j * p.dim + 1] += 12.0;  // keys 0..2 dominate everyone
  for (Index i = 0; i < 256; ++i) in.q[i * p.dim + 1] += 3.0;
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  VerticalSlashOptions sparse;
  sparse.block_size = 16;
  sparse.budget = 0.5;
  sparse.local_tokens = 0;
  const TokenSelection fixed = vertical_slash_select(typed.qv(p), typed.kv(p), o, sparse);
  sparse.threshold = 0.9;
  sparse.budget = 1;
  const TokenSelection adaptive = vertical_slash_select(typed.qv(p), typed.kv(p), o, sparse);
  EXPECT_LT(adaptive.keys.size() * 3, fixed.keys.size());
  // Every block keeps its own 16 positions (local) and, of the lines, the three dominant columns
  // and the few other lines that bring the estimate past 0.9 (a line adds keys to the blocks
  // whose candidates it crosses), a third of what the fixed budget keeps.
  for (Index block = 4; block < 16; ++block) {
    std::int64_t count = 0;
    const std::int64_t* kept = adaptive.kept(0, 0, block, &count);
    ASSERT_GE(count, 19) << block;
    for (Index i = 0; i < 3; ++i) EXPECT_EQ(kept[i], i) << block;
  }
}

TYPED_TEST(VerticalSlash, SameBitsForAnyThreadCount) {
  using T = TypeParam;
  const Problem p = make_problem(2, 8, 2, 333, 333, 32, 24, 730);
  const Inputs in = random_inputs(p);
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  o.sink_tokens = 4;
  VerticalSlashOptions sparse;
  sparse.block_size = 24;
  sparse.budget = 0.3;
  sparse.threshold = 0.8;
  std::vector<Outputs> results;
  std::vector<TokenSelection> selections;
  for (const int threads : {1, 2, 3}) {
    o.num_threads = threads;
    selections.push_back(vertical_slash_select(typed.qv(p), typed.kv(p), o, sparse));
    results.push_back(run_entry<T>(SelectAndAttend{sparse}, p, in, o));
  }
  for (std::size_t i = 1; i < results.size(); ++i) {
    EXPECT_EQ(selections[i].keys, selections[0].keys);
    EXPECT_EQ(selections[i].offsets, selections[0].offsets);
    expect_identical(results[i], results[0]);
  }
}

TEST(VerticalSlashHalf, SixteenBitStorageSelectsAsFloat) {
  const Problem p = make_problem(1, 4, 2, 150, 150, 32, 32, 830);
  Inputs in = random_inputs(p);
  for (std::vector<double>* values : {&in.q, &in.k, &in.v})
    for (double& x : *values) x = to_float(to_bfloat16(static_cast<float>(x)));
  const TypedInputs<float> wide(in);
  AttentionOptions o;
  o.causal = true;
  VerticalSlashOptions sparse;
  sparse.block_size = 32;
  sparse.budget = 0.4;
  sparse.local_tokens = 16;
  const TokenSelection selection = vertical_slash_select(wide.qv(p), wide.kv(p), o, sparse);
  std::vector<bfloat16> q16, k16;
  for (const double x : in.q) q16.push_back(to_bfloat16(static_cast<float>(x)));
  for (const double x : in.k) k16.push_back(to_bfloat16(static_cast<float>(x)));
  const TokenSelection selection16 =
      vertical_slash_select(TensorView<const bfloat16, 4>(q16.data(), p.q_shape()),
                            TensorView<const bfloat16, 4>(k16.data(), p.k_shape()), o, sparse);
  EXPECT_EQ(selection16.keys, selection.keys);
  EXPECT_EQ(selection16.offsets, selection.offsets);
}

TEST(VerticalSlashErrors, BadOptionsAreRejectedBeforeOutIsTouched) {
  const Problem p = make_problem(1, 2, 1, 100, 100, 8, 8, 930);
  const Inputs in = random_inputs(p);
  const TypedInputs<float> typed(in);
  AttentionOptions o;
  o.causal = true;
  VerticalSlashOptions good;
  good.block_size = 32;
  const UntouchedOut out(p);
  const auto with = [&](auto change) { return changed(good, change); };
  for (const auto& [sparse, needle] :
       {std::pair{with([](auto& s) { s.budget = 0; }), "budget"},
        std::pair{with([](auto& s) { s.budget = std::nan(""); }), "budget"},
        std::pair{with([](auto& s) { s.threshold = 1.5; }), "threshold"},
        std::pair{with([](auto& s) { s.block_size = 15; }), "block_size"},
        std::pair{with([](auto& s) { s.local_tokens = -1; }), "local_tokens"},
        std::pair{with([](auto& s) { s.last_queries = 0; }), "last_queries"}}) {
    out.expect_rejected([&] { vertical_slash_select(typed.qv(p), typed.kv(p), o, sparse); },
                        needle);
    out.expect_rejected(
        [&] {
          vertical_slash_attention(typed.qv(p), typed.kv(p), typed.vv(p), out.view, o, sparse);
        },
        needle);
  }
  o.window_left = -5;
  out.expect_rejected(
      [&] { vertical_slash_attention(typed.qv(p), typed.kv(p), typed.vv(p), out.view, o, good); },
      "window_left");
  // Empty calls: no rows, no work, options still checked.
  std::vector<float> cell(8, 0.0f);
  const TensorView<float, 4> empty(cell.data(), {1, 0, 10, 8}, {0, 0, 0, 1});
  EXPECT_NO_THROW(vertical_slash_attention(TensorView<const float, 4>(empty),
                                           TensorView<const float, 4>(empty),
                                           TensorView<const float, 4>(empty), empty, {}, good));
  EXPECT_THROW(
      vertical_slash_attention(TensorView<const float, 4>(empty), TensorView<const float, 4>(empty),
                               TensorView<const float, 4>(empty), empty, {},
                               with([](auto& s) { s.last_queries = -3; })),
      Error);
}

}  // namespace
}  // namespace foveal::test
