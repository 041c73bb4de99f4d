// tests/cpp/test_token_topk.cpp — foveal::token_topk_select and token_topk_attention against
// the float64 references (tests/reference/token_topk_reference.hpp: the selection;
// attention_reference with a token mask: the attention), and the promises of the header:
// causality and windows bound the selection, sinks stay visible, the same bits for any thread
// count, 16-bit storage equals float32 rounded, bad arguments rejected before out is touched.
// Shapes include 1, primes and non-multiples of the block sizes and of the engine's tiles; GQA
// groups make tiles straddle query blocks (the per-(row, key) mask path).
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/token_topk.hpp"
#include "harness.hpp"
#include "reference/token_topk_reference.hpp"
#include "selection_cases.hpp"

namespace foveal::test {
namespace {

std::string sparse_string(const TokenTopkOptions& s) {
  return describe("budget=", s.budget, " threshold=", s.threshold, " block_size=", s.block_size,
                  " local_tokens=", s.local_tokens, " outliers=", s.outliers);
}

// The one-call form, as an entry of run_entry.
struct SelectAndAttend {
  TokenTopkOptions sparse;
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& /*bias*/) const {
    token_topk_attention(q, k, v, out, options, sparse, lse);
  }
};

Outputs reference_over(const Problem& p, const Inputs& in, const AttentionOptions& o,
                       const TokenSelection& selection) {
  const reference::AttentionShape shape = shape_of(p);
  const reference::ReferenceOptions options = reference_options(o);
  const std::vector<double> bias = reference::token_topk_bias(
      shape, options, selection.block_size, lists_of(selection.offsets, selection.keys));
  Outputs result;
  reference::attention_reference(shape, in.q, in.k, in.v, options, result.out, result.lse, bias,
                                 p.batch, p.heads_q);
  return result;
}

// Selects with T, checks the selection against the reference, attends over it with T (strided
// layouts too, and the one-call form) and checks out and lse against the reference over the same
// selection.
template <typename T>
void expect_token_topk_matches(const Problem& p, const AttentionOptions& o,
                               const TokenTopkOptions& sparse) {
  SCOPED_TRACE(
      describe(problem_string(p), "\n  ", options_string(o), "\n  ", sparse_string(sparse)));
  const Inputs in = random_inputs(p);
  const TypedInputs<T> typed(in);
  const TokenSelection selection = token_topk_select(typed.qv(p), typed.kv(p), o, sparse);
  EXPECT_EQ(selection.block_size, sparse.block_size);
  EXPECT_EQ(selection.len_k, p.len_k);
  expect_selection_matches(
      lists_of(selection.offsets, selection.keys),
      reference::token_topk_select_reference(shape_of(p), in.q, in.k, reference_options(o),
                                             {sparse.budget, sparse.threshold, sparse.block_size,
                                              sparse.local_tokens, sparse.outliers}),
      std::is_same_v<T, float> ? 1e-4 : 1e-10);
  const Outputs want = reference_over(p, in, o, selection);
  for (const Layout layout : {Layout::kContiguous, Layout::kPadded}) {
    const Outputs got =
        run_entry<T>(AttendTokenSelection{&selection}, p, in, o, Layouts::all(layout));
    EXPECT_TRUE(matches_reference(got.out, want.out, kTolerance<T>))
        << "out " << layout_name(layout);
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kTolerance<T>))
        << "lse " << layout_name(layout);
  }
  expect_identical(run_entry<T>(SelectAndAttend{sparse}, p, in, o),
                   run_entry<T>(AttendTokenSelection{&selection}, p, in, o));
}

template <typename T>
class TokenTopk : public ::testing::Test {};
TYPED_TEST_SUITE(TokenTopk, ElementTypes, ElementTypeNames);

TYPED_TEST(TokenTopk, MatchesReferenceOnRandomShapesOptionsAndBudgets) {
  for (std::uint64_t seed = 300; seed < 360; ++seed) {
    RandomSource random(seed + 17);
    const Problem p = random_problem(seed, 2e6, kSelectionLengths, 5);
    TokenTopkOptions sparse;
    const AttentionOptions o = random_prefill_options(random, p, sparse);
    sparse.local_tokens = random.pick({Index{0}, Index{5}, Index{64}});
    sparse.outliers = random.pick({Index{0}, Index{1}, Index{2}, Index{7}});
    expect_token_topk_matches<TypeParam>(p, o, sparse);
  }
}

TYPED_TEST(TokenTopk, EveryGroupRatioAndLongerSequences) {
  // Groups of 1 .. 16 query heads: a tile of 64 rows spans 64 / group positions, so with blocks
  // of 16 and 23 positions tiles straddle query blocks (keys kept by some rows only).
  for (Index ratio : kGroupRatios)
    for (const Index block_size : {Index{16}, Index{23}}) {
      AttentionOptions o;
      o.causal = true;
      o.sink_tokens = 3;
      TokenTopkOptions sparse;
      sparse.block_size = block_size;
      sparse.budget = 0.2;
      sparse.local_tokens = 8;
      expect_token_topk_matches<TypeParam>(
          make_problem(1, 2 * ratio, 2, 300, 300, 16, 8, 200 + ratio), o, sparse);
    }
}

TYPED_TEST(TokenTopk, BlocksWithoutAnEstimateBeforeWindowedOnes) {
  // Regression (fuzz_sparse, ASan): the first blocks keep all their candidates (no estimate)
  // and start at key 0; the later ones, estimated, start past it (window 120). The estimate's
  // span covered the estimated blocks only, and the softmax of the first blocks' rows wrote
  // before the buffer.
  AttentionOptions o;
  o.causal = true;
  o.window_left = 120;
  TokenTopkOptions sparse;
  sparse.block_size = 16;
  sparse.local_tokens = 16;
  sparse.budget = 0.25;
  expect_token_topk_matches<TypeParam>(make_problem(1, 1, 1, 300, 300, 16, 16, 220), o, sparse);
}

TYPED_TEST(TokenTopk, KeepingEveryKeyIsDenseAttention) {
  TokenTopkOptions sparse;
  sparse.budget = 1;
  sparse.block_size = 48;
  expect_keeping_everything_is_dense<TypeParam>(SelectAndAttend{sparse}, 210);
}

TYPED_TEST(TokenTopk, CausalityAndWindowsBoundAHandMadeSelection) {
  // A selection that keeps every key for every query block (future ones too): the causal /
  // window rule still decides, so the result is dense attention with those options.
  const Problem p = make_problem(1, 4, 2, 200, 200, 16, 16, 410);
  for (const Index window : {Index{-1}, Index{37}}) {
    AttentionOptions o;
    o.causal = true;
    o.window_left = window;
    o.sink_tokens = 5;
    TokenSelection all;
    all.block_size = 32;
    all.batch = 1;
    all.heads_kv = 2;
    all.first_query_block = 0;
    all.query_blocks = 7;
    all.len_k = 200;
    all.offsets.push_back(0);
    for (Index list = 0; list < 14; ++list) {
      for (Index key = 0; key < 200; ++key) all.keys.push_back(key);
      all.offsets.push_back(static_cast<std::int64_t>(all.keys.size()));
    }
    const Inputs in = random_inputs(p);
    const Outputs got = run_entry<TypeParam>(AttendTokenSelection{&all}, p, in, o);
    const Outputs want = reference_outputs(p, in, o);
    EXPECT_TRUE(matches_reference(got.out, want.out, kTolerance<TypeParam>)) << window;
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kTolerance<TypeParam>)) << window;
  }
}

TYPED_TEST(TokenTopk, FindsPlantedFarKeys) {
  // Five scattered keys share a direction that the queries of the last block point at strongly;
  // with room for five keys besides the local ones, those five are kept.
  using T = TypeParam;
  const Problem p = make_problem(1, 2, 1, 512, 512, 32, 32, 510);
  Inputs in = random_inputs(p);
  const Index planted[] = {3, 77, 150, 301, 402};
  for (const Index j : planted) in.k[j * p.dim + 0] += 8.0;
  for (Index h = 0; h < 2; ++h)
    for (Index i = 480; i < 512; ++i) in.q[(h * p.len_q + i) * p.dim + 0] += 6.0;
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  TokenTopkOptions sparse;
  sparse.block_size = 32;
  sparse.local_tokens = 0;
  sparse.budget = 37.0 / 512.0;  // ceil(budget * 512) = 37 = 32 local + 5
  const TokenSelection selection = token_topk_select(typed.qv(p), typed.kv(p), o, sparse);
  std::int64_t count = 0;
  const std::int64_t* kept = selection.kept(0, 0, 15, &count);
  ASSERT_EQ(count, 37);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(kept[i], planted[i]);
  for (int i = 5; i < 37; ++i) EXPECT_EQ(kept[i], 480 + i - 5);
}

TYPED_TEST(TokenTopk, ThresholdKeepsFewerKeysOnAConcentratedEstimate) {
  using T = TypeParam;
  const Problem p = make_problem(1, 1, 1, 256, 256, 16, 16, 610);
  Inputs in = random_inputs(p);
  for (Index j = 0; j < 4; ++j) in.k[j * p.dim + 1] += 12.0;  // keys 0..3 dominate everyone
  for (Index i = 0; i < 256; ++i) in.q[i * p.dim + 1] += 3.0;
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  TokenTopkOptions sparse;
  sparse.block_size = 16;
  sparse.budget = 0.5;
  sparse.local_tokens = 0;
  const TokenSelection fixed = token_topk_select(typed.qv(p), typed.kv(p), o, sparse);
  sparse.threshold = 0.9;
  sparse.budget = 1;  // no cap but the candidates
  const TokenSelection adaptive = token_topk_select(typed.qv(p), typed.kv(p), o, sparse);
  // Every block keeps its own 16 positions (local) and, past them, the four dominant keys alone
  // (some of them: together they hold ~0.99 of the estimated mass), where a fixed budget of 0.5
  // keeps half the candidates.
  EXPECT_LT(adaptive.keys.size() * 3, fixed.keys.size());
  for (Index block = 1; block < 16; ++block) {
    std::int64_t count = 0;
    const std::int64_t* kept = adaptive.kept(0, 0, block, &count);
    ASSERT_GE(count, 17) << block;
    ASSERT_LE(count, 20) << block;
    const std::int64_t far = count - 16;
    for (Index i = 0; i < far; ++i) EXPECT_LT(kept[i], 4) << block;
    for (Index i = far; i < count; ++i) EXPECT_EQ(kept[i], block * 16 + i - far) << block;
  }
}

TYPED_TEST(TokenTopk, SameBitsForAnyThreadCount) {
  using T = TypeParam;
  const Problem p = make_problem(2, 8, 2, 333, 333, 32, 24, 710);
  const Inputs in = random_inputs(p);
  const TypedInputs<T> typed(in);
  AttentionOptions o;
  o.causal = true;
  o.sink_tokens = 4;
  TokenTopkOptions sparse;
  sparse.block_size = 24;
  sparse.budget = 0.3;
  sparse.threshold = 0.8;
  std::vector<Outputs> results;
  std::vector<TokenSelection> selections;
  for (const int threads : {1, 2, 3}) {
    o.num_threads = threads;
    selections.push_back(token_topk_select(typed.qv(p), typed.kv(p), o, sparse));
    results.push_back(run_entry<T>(AttendTokenSelection{&selections.back()}, p, in, o));
  }
  for (std::size_t i = 1; i < results.size(); ++i) {
    EXPECT_EQ(selections[i].keys, selections[0].keys);
    EXPECT_EQ(selections[i].offsets, selections[0].offsets);
    expect_identical(results[i], results[0]);
  }
}

TEST(TokenTopkHalf, SixteenBitStorageIsTheFloatResultRounded) {
  const Problem p = make_problem(1, 4, 2, 150, 150, 32, 32, 810);
  Inputs in = random_inputs(p);
  for (std::vector<double>* values : {&in.q, &in.k, &in.v})
    for (double& x : *values) x = to_float(to_bfloat16(static_cast<float>(x)));
  const TypedInputs<float> wide(in);
  AttentionOptions o;
  o.causal = true;
  TokenTopkOptions sparse;
  sparse.block_size = 32;
  sparse.budget = 0.4;
  sparse.local_tokens = 16;
  const TokenSelection selection = token_topk_select(wide.qv(p), wide.kv(p), o, sparse);
  std::vector<float> out(static_cast<std::size_t>(shape_numel<4>(p.out_shape())));
  token_topk_attention(wide.qv(p), wide.kv(p), wide.vv(p),
                       TensorView<float, 4>(out.data(), p.out_shape()), o, selection);
  std::vector<bfloat16> q16, k16, v16;
  for (const double x : in.q) q16.push_back(to_bfloat16(static_cast<float>(x)));
  for (const double x : in.k) k16.push_back(to_bfloat16(static_cast<float>(x)));
  for (const double x : in.v) v16.push_back(to_bfloat16(static_cast<float>(x)));
  const TensorView<const bfloat16, 4> q(q16.data(), p.q_shape()), k(k16.data(), p.k_shape()),
      v(v16.data(), p.v_shape());
  const TokenSelection selection16 = token_topk_select(q, k, o, sparse);
  EXPECT_EQ(selection16.keys, selection.keys);
  std::vector<bfloat16> out16(out.size());
  token_topk_attention(q, k, v, TensorView<bfloat16, 4>(out16.data(), p.out_shape()), o, selection);
  // On AMX tiles (D and Dv multiples of 32, 8 rows per head and more): within bfloat16 rounding.
  for (std::size_t i = 0; i < out.size(); ++i) {
    if (amx_tiles_in_use()) {
      ASSERT_NEAR(to_float(out16[i]), out[i], 4e-3 * (1 + std::abs(out[i]))) << i;
    } else {
      ASSERT_EQ(to_float(out16[i]), to_float(to_bfloat16(out[i]))) << i;
    }
  }
}

// The edge cases the block-sparse fuzzing found, on token_topk's shared plumbing: calls without
// query rows do no work (no kv heads: nothing may divide by Hkv; no query heads but kv heads:
// nothing may divide by the group of 0; huge Lk of an empty view: nothing may be sized by it),
// rows that are not contiguous are rejected, and kept() of a broken selection is an error.
TEST(TokenTopkRegressions, EmptyCallsStridedRowsAndBrokenSelections) {
  std::vector<float> cell(8, 0.0f);
  const auto view = [&](std::array<Index, 4> shape) {
    return TensorView<float, 4>(cell.data(), shape, {0, 0, 0, 1});
  };
  AttentionOptions o;
  o.causal = true;
  o.q_offset = 4;
  TokenTopkOptions sparse;
  sparse.block_size = 41;
  sparse.budget = 0.5;
  const TensorView<const float, 4> q = view({2, 0, 46, 6}), k = view({2, 0, 85, 6});
  token_topk_attention(q, k, view({2, 0, 85, 7}), view({2, 0, 46, 7}), o, sparse);
  EXPECT_EQ(token_topk_select(q, k, o, sparse).offsets, std::vector<std::int64_t>{0});
  // No query heads, two kv heads: empty lists' selection is made without estimating.
  const TokenSelection headless = token_topk_select(q, view({2, 2, 85, 6}), o, sparse);
  EXPECT_EQ(headless.offsets.size(), std::size_t{2 * 2 * 2 + 1});
  // ... and with a threshold every list needs an estimate, with no rows to make one (regression,
  // Python fuzz: the lists read a mass that was never allocated): zero masses, the lowest keys.
  TokenTopkOptions adaptive = sparse;
  adaptive.threshold = 0.9;
  const TokenSelection headless_adaptive = token_topk_select(q, view({2, 2, 85, 6}), o, adaptive);
  EXPECT_EQ(headless_adaptive.offsets, headless.offsets);
  EXPECT_EQ(headless_adaptive.keys, headless.keys);
  const Index huge = Index{1} << 62;
  const TensorView<const float, 4> q0 = view({0, 1, 4, 6}), k0 = view({0, 1, huge, 6});
  token_topk_attention(q0, k0, view({0, 1, huge, 7}), view({0, 1, 4, 7}), o, sparse);
  EXPECT_EQ(token_topk_select(q0, k0, o, sparse).len_k, huge);
  o.q_offset = std::numeric_limits<Index>::max() / 8;
  EXPECT_THROW(token_topk_select(view({0, 1, std::numeric_limits<Index>::max(), 6}), k0, o, sparse),
               Error);

  std::vector<float> data(2 * 40 * 8, 0.5f);
  const TensorView<const float, 4> rows(data.data(), {1, 1, 40, 8});
  const TensorView<const float, 4> strided(data.data(), {1, 1, 40, 8}, {640, 640, 16, 2});
  EXPECT_NO_THROW(token_topk_select(rows, rows, {}, sparse));
  EXPECT_THROW(token_topk_select(strided, rows, {}, sparse), Error);
  EXPECT_THROW(token_topk_select(rows, strided, {}, sparse), Error);

  TokenSelection selection;
  selection.block_size = 16;
  selection.batch = selection.heads_kv = selection.query_blocks = 1;
  selection.len_k = 5;
  selection.offsets = {0, 2};
  selection.keys = {0, 4};
  std::int64_t count = -1;
  EXPECT_EQ(selection.kept(0, 0, 0, &count), selection.keys.data());
  EXPECT_EQ(count, 2);
  TokenSelection past = selection;
  past.offsets[1] = 3;
  EXPECT_THROW(past.kept(0, 0, 0, &count), Error);
  TokenSelection shifted = selection;
  shifted.first_query_block = std::numeric_limits<std::int64_t>::min();
  EXPECT_THROW(shifted.kept(0, 0, 5, &count), Error);
}

TEST(TokenTopkErrors, BadOptionsAndSelectionsAreRejectedBeforeOutIsTouched) {
  const Problem p = make_problem(1, 2, 1, 100, 100, 8, 8, 910);
  const Inputs in = random_inputs(p);
  const TypedInputs<float> typed(in);
  AttentionOptions o;
  o.causal = true;
  TokenTopkOptions good;
  good.block_size = 32;
  good.budget = 0.5;
  good.local_tokens = 4;
  const TokenSelection selection = token_topk_select(typed.qv(p), typed.kv(p), o, good);
  const UntouchedOut out(p);
  const auto& out_view = out.view;
  const auto expect_rejected = [&](const auto& call, const char* needle) {
    out.expect_rejected(call, needle);
  };
  const auto with = [&](auto change) { return changed(good, change); };
  for (const auto& [sparse, needle] :
       {std::pair{with([](auto& s) { s.budget = 0; }), "budget"},
        std::pair{with([](auto& s) { s.budget = 1.5; }), "budget"},
        std::pair{with([](auto& s) { s.budget = std::nan(""); }), "budget"},
        std::pair{with([](auto& s) { s.threshold = -0.1; }), "threshold"},
        std::pair{with([](auto& s) { s.threshold = std::nan(""); }), "threshold"},
        std::pair{with([](auto& s) { s.block_size = 8; }), "block_size"},
        std::pair{with([](auto& s) { s.block_size = 5000; }), "block_size"},
        std::pair{with([](auto& s) { s.local_tokens = -1; }), "local_tokens"},
        std::pair{with([](auto& s) { s.outliers = -1; }), "outliers"},
        std::pair{with([](auto& s) { s.outliers = 32; }), "outliers"}}) {
    expect_rejected([&] { token_topk_select(typed.qv(p), typed.kv(p), o, sparse); }, needle);
    expect_rejected(
        [&] { token_topk_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, o, sparse); },
        needle);
  }
  const auto edited = [&](auto change) { return changed(selection, change); };
  for (const auto& [bad, needle] :
       {std::pair{edited([](auto& s) { s.block_size = 64; }), "query_blocks"},
        std::pair{edited([](auto& s) { s.block_size = 7; }), "block_size"},
        std::pair{edited([](auto& s) { s.batch = 2; }), "batch"},
        std::pair{edited([](auto& s) { s.heads_kv = 2; }), "heads_kv"},
        std::pair{edited([](auto& s) { s.len_k = 101; }), "len_k"},
        std::pair{edited([](auto& s) { s.offsets.pop_back(); }), "offsets"},
        std::pair{edited([](auto& s) { s.keys.push_back(0); }), "offsets"},
        std::pair{edited([](auto& s) { s.keys[0] = 100; }), "not a key"},
        std::pair{edited([](auto& s) { s.keys[0] = -1; }), "not a key"},
        std::pair{edited([](auto& s) {
                    std::size_t list = 0;
                    while (s.offsets[list + 1] - s.offsets[list] < 2) ++list;
                    s.keys[s.offsets[list] + 1] = s.keys[s.offsets[list]];
                  }),
                  "strictly increasing"},
        std::pair{edited([](auto& s) { s.offsets[1] = s.offsets[2] + 1; }), "must not decrease"}}) {
    expect_rejected(
        [&] { token_topk_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, o, bad); },
        needle);
  }
  AttentionOptions shifted = o;
  shifted.q_offset = 40;
  expect_rejected(
      [&] {
        token_topk_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, shifted, selection);
      },
      "first_query_block");
  o.window_left = -5;
  expect_rejected(
      [&] { token_topk_attention(typed.qv(p), typed.kv(p), typed.vv(p), out_view, o, good); },
      "window_left");
  EXPECT_THROW(selection.kept(0, 0, 4, nullptr), Error);
}

}  // namespace
}  // namespace foveal::test
