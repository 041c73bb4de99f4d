// tests/cpp/test_attention.cpp — foveal::attention against the float64 reference.
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]   bias: [B or 1, Hq or 1, Lq, Lk]
// Every test runs for float and double. Shapes include 1, primes and non-multiples of the
// engine's tiles (64 query rows, 64 keys, micro-kernels of 6 keys / 6 rows, 16 floats or 8
// doubles per vector); every case prints its seed and shapes on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/core/parallel.hpp"
#include "harness.hpp"

namespace foveal::test {
namespace {

// The lengths the sweeps draw from, and the most query heads of a random MQA problem.
constexpr Index kLengths[] = {1, 2, 7, 13, 63, 64, 65, 127, 129, 200};
constexpr Index kMaxMqaHeads = 6;

// foveal::attention<T> gives the same bits with `layouts` as with contiguous tensors.
template <typename T>
void expect_layout_gives_identical_bits(const Problem& p, const AttentionOptions& o,
                                        const Layouts& layouts) {
  SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  expect_identical(run_attention<T>(p, in, o, layouts), run_attention<T>(p, in, o));
}

// With inputs `in`, the rows (b, h, i) for which `masked(b, h, i)` holds are exactly 0 with
// lse = -inf, the others have a finite lse, and everything agrees with the reference.
template <typename T, typename Masked>
void expect_masked_rows_empty(const Problem& p, const Inputs& in, const AttentionOptions& o,
                              Masked&& masked) {
  SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(o)));
  const Outputs got = run_attention<T>(p, in, o);
  const Outputs want = reference_outputs(p, in, o);
  EXPECT_TRUE(test::matches_reference(got.out, want.out, kTolerance<T>)) << "out";
  EXPECT_TRUE(test::matches_reference(got.lse, want.lse, kTolerance<T>)) << "lse";
  Index masked_rows = 0;
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads_q; ++h)
      for (Index i = 0; i < p.len_q; ++i) {
        const Index row = (b * p.heads_q + h) * p.len_q + i;
        if (!masked(b, h, i)) {
          EXPECT_TRUE(std::isfinite(got.lse[row])) << "row b=" << b << " h=" << h << " i=" << i;
          continue;
        }
        ++masked_rows;
        EXPECT_EQ(got.lse[row], -kInfinity) << "row b=" << b << " h=" << h << " i=" << i;
        for (Index d = 0; d < p.dim_v; ++d)
          ASSERT_EQ(got.out[row * p.dim_v + d], 0.0)
              << "row b=" << b << " h=" << h << " i=" << i << " d=" << d;
      }
  EXPECT_GT(masked_rows, 0) << "the case masks no row";
}

template <typename T>
class Attention : public ::testing::Test {};
TYPED_TEST_SUITE(Attention, ElementTypes, ElementTypeNames);

// The shapes the option tests run on: option_problems with a square of 200 and a single query
// against 127 keys.
std::vector<Problem> option_problems(std::uint64_t seed) {
  return test::option_problems(seed, 200, 127);
}

// ---------------------------------------------------------------------------------------------
// Agreement with the reference over shapes.

TYPED_TEST(Attention, MatchesReferenceOnRandomShapes) {
  for (std::uint64_t seed = 1000; seed < 1048; ++seed)
    expect_matches_reference<TypeParam>(random_problem(seed, 1.2e7, kLengths, kMaxMqaHeads),
                                        AttentionOptions{});
}

TYPED_TEST(Attention, MatchesReferenceForEveryLengthPair) {
  for (bool causal : {false, true})
    for (Index len_q : kLengths)
      for (Index len_k : kLengths) {
        AttentionOptions options;
        options.causal = causal;
        expect_matches_reference<TypeParam>(make_problem(1, 3, 1, len_q, len_k, 5, 7, 2000),
                                            options);
      }
}

TYPED_TEST(Attention, MatchesReferenceForEveryHeadDimPair) {
  for (Index dim : kHeadDims)
    for (Index dim_v : kHeadDims)
      expect_matches_reference<TypeParam>(make_problem(1, 2, 1, 37, 70, dim, dim_v, 3000),
                                          AttentionOptions{});
}

TYPED_TEST(Attention, MatchesReferenceForEveryGroupRatio) {
  for (Index ratio : kGroupRatios)
    for (Index heads_kv : {1, 2, 3})
      expect_matches_reference<TypeParam>(
          make_problem(2, heads_kv * ratio, heads_kv, 33, 70, 16, 16, 4000), AttentionOptions{});
}

// ---------------------------------------------------------------------------------------------
// Every option, alone and combined.

TYPED_TEST(Attention, ExplicitScaleMatchesReference) {
  for (float scale : {0.05f, 0.3f, 1.0f, 2.5f}) {
    AttentionOptions options;
    options.scale = scale;
    for (const Problem& p : option_problems(5000)) expect_matches_reference<TypeParam>(p, options);
  }
}

TYPED_TEST(Attention, CausalMatchesReference) {
  AttentionOptions options;
  options.causal = true;
  for (const Problem& p : option_problems(6000)) expect_matches_reference<TypeParam>(p, options);
}

TYPED_TEST(Attention, CausalWithExplicitZeroRightWindowMatchesReference) {
  AttentionOptions options;
  options.causal = true;
  options.window_right = 0;
  for (const Problem& p : option_problems(6100)) expect_matches_reference<TypeParam>(p, options);
}

TYPED_TEST(Attention, WindowsBindWhenQueriesOutnumberKeys) {
  // Bottom-right with Lq > Lk puts the first queries at negative positions: a right window
  // wider than Lk + Lq - Lk still hides the only key from them (found by the pytest sweep).
  for (Index right : {0, 6, 12, 13})
    for (Index left : {-1, 3}) {
      AttentionOptions options;
      options.window_left = left;
      options.window_right = right;
      expect_matches_reference<TypeParam>(make_problem(2, 3, 3, 13, 1, 8, 1, 7100), options);
      expect_matches_reference<TypeParam>(make_problem(1, 2, 1, 70, 5, 8, 4, 7101), options);
    }
}

TYPED_TEST(Attention, WindowMatchesReference) {
  const std::vector<Problem> problems = {make_problem(1, 2, 1, 129, 200, 8, 8, 7000),
                                         make_problem(2, 2, 2, 65, 63, 8, 3, 7001)};
  for (Index left : {-1, 0, 1, 5, 64, 300})
    for (Index right : {-1, 0, 1, 5, 64, 300}) {
      AttentionOptions options;
      options.window_left = left;
      options.window_right = right;
      for (const Problem& p : problems) expect_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(Attention, CausalSlidingWindowMatchesReference) {
  for (Index left : {0, 1, 5, 64, 300}) {
    AttentionOptions options;
    options.causal = true;
    options.window_left = left;
    for (const Problem& p : option_problems(7100)) expect_matches_reference<TypeParam>(p, options);
  }
}

TYPED_TEST(Attention, SinkTokensMatchReference) {
  struct Window {
    bool causal;
    Index left, right;
  };
  for (Index sinks : {0, 1, 4, 70, 1000})
    for (const Window& window : {Window{false, -1, -1}, Window{true, -1, -1}, Window{true, 5, -1},
                                 Window{false, 0, 0}, Window{false, 3, 2}}) {
      AttentionOptions options;
      options.sink_tokens = sinks;
      options.causal = window.causal;
      options.window_left = window.left;
      options.window_right = window.right;
      for (const Problem& p : {make_problem(1, 2, 1, 100, 150, 8, 8, 8000),
                               make_problem(2, 1, 1, 130, 65, 4, 9, 8001)})
        expect_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(Attention, SoftcapMatchesReference) {
  for (float softcap : {0.5f, 2.0f, 30.0f})
    for (float scale : {0.0f, 1.5f}) {
      AttentionOptions options;
      options.softcap = softcap;
      options.scale = scale;
      for (const Problem& p : option_problems(9000))
        expect_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(Attention, ExplicitQueryOffsetMatchesReference) {
  for (const Problem& p : option_problems(10000)) {
    std::vector<Index> offsets = {0, 1, p.len_k / 2, p.len_k};
    if (p.len_k >= p.len_q) offsets.push_back(p.len_k - p.len_q);  // the default, spelled out
    for (Index q_offset : offsets)
      for (int mask = 0; mask < 4; ++mask) {
        AttentionOptions options;
        options.q_offset = q_offset;
        options.causal = mask == 1;
        if (mask == 2) {
          options.window_left = 3;
          options.window_right = 1;
        }
        if (mask == 3) {
          options.causal = true;
          options.sink_tokens = 2;
        }
        expect_matches_reference<TypeParam>(p, options);
      }
  }
}

TYPED_TEST(Attention, BiasBroadcastsOverBatchAndHeads) {
  const Problem base = make_problem(2, 4, 2, 70, 90, 12, 10, 11000);
  for (Index bias_batch : {Index{1}, base.batch})
    for (Index bias_heads : {Index{1}, base.heads_q})
      for (bool causal : {false, true}) {
        AttentionOptions options;
        options.causal = causal;
        expect_matches_reference<TypeParam>(with_bias(base, bias_batch, bias_heads), options);
      }
}

TYPED_TEST(Attention, NegativeInfinityBiasEntriesAreNeverAttended) {
  const Problem base = make_problem(2, 3, 1, 66, 131, 9, 9, 12000);
  for (double masked_share : {0.3, 0.9, 0.99})
    for (Index bias_heads : {Index{1}, base.heads_q}) {
      AttentionOptions options;
      options.softcap = 4;
      expect_matches_reference<TypeParam>(with_bias(base, 2, bias_heads, masked_share), options);
    }
}

TYPED_TEST(Attention, RandomOptionCombinationsMatchReference) {
  for (std::uint64_t seed = 13000; seed < 13080; ++seed) {
    test::RandomSource random(seed + 1);  // a stream apart from the one that made the shapes
    Problem p = random_problem(seed, 3e6, kLengths, kMaxMqaHeads);
    if (random.chance(0.5)) {
      p = with_bias(p, random.pick({Index{1}, p.batch}), random.pick({Index{1}, p.heads_q}),
                    random.pick({0.0, 0.0, 0.2}));
    }
    AttentionOptions options;
    options.scale = random.pick({0.0f, 0.2f, 0.9f});
    options.causal = random.chance(0.4);
    const Index windows[] = {-1, -1, 0, 1, 5, 63, 64, 100, 1000};
    options.window_left = random.pick(windows);
    options.window_right =
        options.causal ? random.pick({Index{-1}, Index{0}}) : random.pick(windows);
    options.sink_tokens = random.pick({Index{0}, Index{0}, Index{1}, Index{4}, p.len_k + 3});
    options.softcap = random.pick({0.0f, 0.0f, 3.0f, 20.0f});
    options.q_offset = random.chance(0.5) ? -1 : random.integer(0, p.len_k);
    expect_matches_reference<TypeParam>(p, options);
  }
}

TYPED_TEST(Attention, LseOutputDoesNotChangeOut) {
  const Problem p = with_bias(make_problem(2, 4, 2, 70, 90, 12, 10, 14000), 1, 4, 0.1);
  AttentionOptions options;
  options.causal = true;
  options.sink_tokens = 3;
  const Inputs in = random_inputs(p);
  const Outputs with_lse = run_attention<TypeParam>(p, in, options, Layouts{}, true);
  const Outputs without_lse = run_attention<TypeParam>(p, in, options, Layouts{}, false);
  EXPECT_TRUE(test::bitwise_equal(without_lse.out, with_lse.out));
}

// ---------------------------------------------------------------------------------------------
// Rows that see no key: output exactly 0, lse = -inf.

TYPED_TEST(Attention, CausalRowsBeforeTheFirstKeyAreEmpty) {
  // Bottom-right alignment with Lq > Lk: query i sits at Lk - Lq + i, so the first Lq - Lk
  // queries precede every key.
  const Problem p = make_problem(2, 2, 1, 100, 30, 8, 6, 15000);
  AttentionOptions options;
  options.causal = true;
  expect_masked_rows_empty<TypeParam>(p, random_inputs(p), options,
                                      [&](Index, Index, Index i) { return i < p.len_q - p.len_k; });
}

TYPED_TEST(Attention, ZeroWindowRowsPastTheLastKeyAreEmpty) {
  const Problem p = make_problem(1, 3, 3, 80, 50, 8, 6, 16000);
  AttentionOptions options;
  options.window_left = 0;
  options.window_right = 0;
  options.q_offset = 10;  // positions 10 .. 89; keys 0 .. 49
  expect_masked_rows_empty<TypeParam>(p, random_inputs(p), options, [&](Index, Index, Index i) {
    return options.q_offset + i >= p.len_k;
  });
}

TYPED_TEST(Attention, RowsWhoseWindowStartsPastTheLastKeyAreEmpty) {
  const Problem p = make_problem(1, 2, 1, 90, 20, 5, 5, 16100);
  AttentionOptions options;
  options.window_left = 5;
  options.q_offset = 10;  // query i sees keys >= 5 + i: none once i >= 15
  expect_masked_rows_empty<TypeParam>(p, random_inputs(p), options,
                                      [&](Index, Index, Index i) { return i >= 15; });
}

TYPED_TEST(Attention, AllNegativeInfinityBiasRowIsEmpty) {
  const Problem p = with_bias(make_problem(2, 2, 1, 70, 40, 8, 6, 17000), 2, 2);
  const auto masked = [](Index b, Index h, Index i) {
    return i == 0 || i == 5 || i == 64 || (b == 1 && h == 0 && i == 33);
  };
  Inputs in = random_inputs(p);
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads_q; ++h)
      for (Index i = 0; i < p.len_q; ++i)
        if (masked(b, h, i))
          for (Index j = 0; j < p.len_k; ++j)
            in.bias[((b * p.heads_q + h) * p.len_q + i) * p.len_k + j] = -kInfinity;
  AttentionOptions options;
  options.sink_tokens = 2;  // a -inf bias hides even the sinks
  expect_masked_rows_empty<TypeParam>(p, in, options, masked);
}

// ---------------------------------------------------------------------------------------------
// Strided inputs and outputs give the same bits as contiguous ones.

// A case that exercises every tensor: GQA, bias, lse, causal with sinks and a softcap.
Problem layout_problem() {
  return with_bias(make_problem(2, 6, 2, 70, 130, 19, 21, 18000), 2, 1, 0.05);
}

AttentionOptions layout_options() {
  AttentionOptions options;
  options.causal = true;
  options.sink_tokens = 3;
  options.softcap = 5;
  return options;
}

TYPED_TEST(Attention, BlhdMemoryViewedThroughTransposeGivesIdenticalBits) {
  expect_layout_gives_identical_bits<TypeParam>(layout_problem(), layout_options(),
                                                Layouts::all(Layout::kSwapped12));
}

TYPED_TEST(Attention, PaddedRowStridesGiveIdenticalBits) {
  expect_layout_gives_identical_bits<TypeParam>(layout_problem(), layout_options(),
                                                Layouts::all(Layout::kPadded));
}

TYPED_TEST(Attention, NegativeStridesGiveIdenticalBits) {
  expect_layout_gives_identical_bits<TypeParam>(layout_problem(), layout_options(),
                                                Layouts::all(Layout::kReversed));
}

TYPED_TEST(Attention, MixedLayoutsGiveIdenticalBits) {
  Layouts layouts;
  layouts.q = Layout::kSwapped12;
  layouts.k = Layout::kPadded;
  layouts.v = Layout::kReversed;
  layouts.out = Layout::kPadded;
  layouts.lse = Layout::kSwapped12;
  layouts.bias = Layout::kReversed;
  expect_layout_gives_identical_bits<TypeParam>(layout_problem(), layout_options(), layouts);
}

// Causal attention on contiguous copies of q, k and v with `bias` given as a view as it is
// (the bias of `p` in other memory) gives the bits of run_attention with the bias of `p`.
template <typename T>
void expect_bias_view_gives_identical_bits(const Problem& p, const Inputs& in,
                                           const TensorView<const T, 4>& bias) {
  AttentionOptions options;
  options.causal = true;
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> out(p.out_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 3> lse(p.lse_shape(), Layout::kContiguous, T(0));
  attention(q.const_view(), k.const_view(), v.const_view(), out.view(), options, lse.view(), bias);
  expect_identical(Outputs{test::gather(out.view()), test::gather(lse.view())},
                   run_attention<T>(p, in, options));
}

TYPED_TEST(Attention, ExpandedBiasGivesTheBitsOfABroadcastBias) {
  // A [1, 1, Lq, Lk] bias, and the same memory seen as [B, Hq, Lq, Lk] with stride 0 (what
  // torch's expand() hands over).
  using T = TypeParam;
  const Problem p = with_bias(make_problem(2, 4, 2, 70, 90, 12, 10, 18500), 1, 1, 0.1);
  const Inputs in = random_inputs(p);
  const StridedBuffer<T, 4> bias(in.bias, p.bias_shape(), Layout::kContiguous, T(0));
  expect_bias_view_gives_identical_bits<T>(
      p, in,
      TensorView<const T, 4>(bias.const_view().data(), {p.batch, p.heads_q, p.len_q, p.len_k},
                             {0, 0, p.len_k, 1}));
}

TYPED_TEST(Attention, TransposedBiasGivesTheBitsOfAContiguousBias) {
  // The bias is the one input read element by element, so any stride works for it, the
  // innermost included: a [B, Hq, Lk, Lq] buffer seen as [B, Hq, Lq, Lk].
  using T = TypeParam;
  const Problem p = with_bias(make_problem(2, 4, 2, 70, 90, 12, 10, 18600), 2, 4, 0.1);
  const Inputs in = random_inputs(p);
  const Shape<4> shape = p.bias_shape();
  std::vector<T> transposed(in.bias.size());
  for (Index b = 0; b < shape[0]; ++b)
    for (Index h = 0; h < shape[1]; ++h)
      for (Index i = 0; i < shape[2]; ++i)
        for (Index j = 0; j < shape[3]; ++j)
          transposed[((b * shape[1] + h) * shape[3] + j) * shape[2] + i] =
              static_cast<T>(in.bias[((b * shape[1] + h) * shape[2] + i) * shape[3] + j]);
  expect_bias_view_gives_identical_bits<T>(
      p, in,
      TensorView<const T, 4>(transposed.data(), shape,
                             {shape[1] * shape[2] * shape[3], shape[2] * shape[3], 1, shape[2]}));
}

TYPED_TEST(Attention, SizeOneDimensionsAcceptAnyStride) {
  // Everything but Lk is 1; then a single head and batch with D = Dv = 1.
  for (const Problem& p : {with_bias(make_problem(1, 1, 1, 1, 37, 1, 1, 19000), 1, 1),
                           with_bias(make_problem(1, 1, 1, 40, 1, 5, 1, 19001), 1, 1),
                           make_problem(1, 1, 1, 3, 70, 1, 1, 19002)})
    expect_layout_gives_identical_bits<TypeParam>(p, AttentionOptions{},
                                                  Layouts::all(Layout::kOddUnitStrides));
}

// ---------------------------------------------------------------------------------------------
// Thread count never changes a bit.

TYPED_TEST(Attention, IdenticalBitsForAnyPerCallThreadCount) {
  const Problem p = with_bias(make_problem(2, 4, 2, 200, 150, 32, 16, 20000), 1, 4, 0.05);
  const Inputs in = random_inputs(p);
  AttentionOptions options;
  options.causal = true;
  options.window_left = 90;
  options.num_threads = 1;
  const Outputs single = run_attention<TypeParam>(p, in, options);
  for (int threads : {2, 3, 0}) {
    SCOPED_TRACE(test::describe("num_threads=", threads));
    options.num_threads = threads;
    const Outputs multi = run_attention<TypeParam>(p, in, options);
    expect_identical(multi, single);
  }
}

TYPED_TEST(Attention, IdenticalBitsForAnyGlobalThreadCount) {
  const test::DefaultThreadsOnExit restore_default;
  const Problem p = make_problem(3, 3, 1, 130, 200, 20, 20, 21000);
  const Inputs in = random_inputs(p);
  AttentionOptions options;  // num_threads = 0: the global setting
  options.sink_tokens = 5;
  set_num_threads(1);
  const Outputs single = run_attention<TypeParam>(p, in, options);
  for (int threads : {2, 3}) {
    SCOPED_TRACE(test::describe("set_num_threads(", threads, ")"));
    set_num_threads(threads);
    const Outputs multi = run_attention<TypeParam>(p, in, options);
    expect_identical(multi, single);
  }
}

// ---------------------------------------------------------------------------------------------
// Variable-length batches: each batch row over its own key rows (key_start / key_length).

// The option sets the variable-length tests sweep: none, causal, a causal window with sinks, a
// two-sided window, softcap and scale, and an explicit q_offset past every range's start.
std::vector<AttentionOptions> variable_length_options(Index len_k) {
  std::vector<AttentionOptions> sets(6);
  sets[1].causal = true;
  sets[2] = causal_window(17, 3);
  sets[3].window_left = 40;
  sets[3].window_right = 9;
  sets[4].causal = true;
  sets[4].softcap = 2.5;
  sets[4].scale = 0.3;
  sets[5].causal = true;
  sets[5].q_offset = len_k;
  sets[5].sink_tokens = 2;
  return sets;
}

TYPED_TEST(Attention, VariableLengthMatchesReference) {
  std::vector<Problem> problems = option_problems(21000);
  problems.push_back(make_problem(4, 6, 2, 130, 257, 16, 16, 21010));
  problems.push_back(with_bias(make_problem(3, 2, 1, 70, 140, 8, 8, 21011), 1, 2, 0.05));
  for (const Problem& p : problems)
    for (std::uint64_t draw = 0; draw < 4; ++draw) {
      const KeyRangeCase ranges = random_key_ranges(p.batch, p.len_k, p.seed * 16 + draw);
      for (const AttentionOptions& options : variable_length_options(p.len_k))
        expect_matches_reference<TypeParam>(p, ranges.applied_to(options));
    }
}

// Padding keys are never read: NaN there changes nothing (a visited NaN key would poison the
// row even where masked, through 0 * NaN in the value sum).
TYPED_TEST(Attention, VariableLengthNeverReadsPaddingKeys) {
  const Problem p = make_problem(3, 4, 2, 150, 300, 16, 12, 21100);
  KeyRangeCase ranges;
  ranges.start = {0, 130, 299};
  ranges.length = {170, 170, 1};
  const Inputs in = random_inputs(p);
  const Inputs poisoned = with_nan_padding(p, in, ranges);
  for (const AttentionOptions& options : variable_length_options(p.len_k)) {
    const AttentionOptions o = ranges.applied_to(options);
    SCOPED_TRACE(options_string(o));
    expect_identical(run_attention<TypeParam>(p, poisoned, o), run_attention<TypeParam>(p, in, o));
  }
}

// Where every row's query positions are past its range's start (an explicit q_offset), a row
// of a variable-length call is a call on its own keys with q_offset moved by the start: the
// same tiles, blocks and bits.
TYPED_TEST(Attention, VariableLengthRowsGiveTheBitsOfCallsOnTheirOwnKeys) {
  using T = TypeParam;
  const Problem p = with_bias(make_problem(3, 4, 2, 70, 260, 16, 8, 21200), 3, 4, 0.05);
  const Inputs in = random_inputs(p);
  KeyRangeCase ranges;
  ranges.start = {0, 77, 200};
  ranges.length = {260, 150, 0};
  AttentionOptions options = causal_window(100, 4);
  options.q_offset = 210;
  const Outputs whole = run_attention<T>(p, in, ranges.applied_to(options));
  for (Index b = 0; b < p.batch; ++b) {
    SCOPED_TRACE(test::describe("row ", b));
    const auto start = static_cast<Index>(ranges.start[static_cast<std::size_t>(b)]);
    const auto length = static_cast<Index>(ranges.length[static_cast<std::size_t>(b)]);
    Problem row = p;
    row.batch = 1;
    row.bias_batch = 1;
    row.len_k = length;
    Inputs own;
    const auto slice = [&](const std::vector<double>& from, Index heads, Index columns, Index first,
                           Index count, Index width) {
      std::vector<double> to;
      for (Index h = 0; h < heads; ++h)
        for (Index j = first; j < first + count; ++j) {
          const auto at = from.begin() + ((b * heads + h) * columns + j) * width;
          to.insert(to.end(), at, at + width);
        }
      return to;
    };
    own.q = slice(in.q, p.heads_q, p.len_q, 0, p.len_q, p.dim);
    own.k = slice(in.k, p.heads_kv, p.len_k, start, length, p.dim);
    own.v = slice(in.v, p.heads_kv, p.len_k, start, length, p.dim_v);
    // The bias rows of batch row b, columns [start, start + length).
    for (Index h = 0; h < p.heads_q; ++h)
      for (Index i = 0; i < p.len_q; ++i) {
        const auto at = in.bias.begin() + ((b * p.heads_q + h) * p.len_q + i) * p.len_k + start;
        own.bias.insert(own.bias.end(), at, at + length);
      }
    AttentionOptions alone = options;
    alone.q_offset = options.q_offset - start;
    const Outputs want = run_attention<T>(row, own, alone);
    const Index out_row = p.heads_q * p.len_q * p.dim_v, lse_row = p.heads_q * p.len_q;
    EXPECT_TRUE(test::bitwise_equal(
        std::vector<double>(whole.out.begin() + b * out_row, whole.out.begin() + (b + 1) * out_row),
        want.out));
    EXPECT_TRUE(test::bitwise_equal(
        std::vector<double>(whole.lse.begin() + b * lse_row, whole.lse.begin() + (b + 1) * lse_row),
        want.lse));
  }
}

TYPED_TEST(Attention, VariableLengthGivesIdenticalBitsForAnyThreadCount) {
  const Problem p = make_problem(5, 4, 2, 90, 200, 32, 16, 21300);
  const Inputs in = random_inputs(p);
  const KeyRangeCase ranges = random_key_ranges(p.batch, p.len_k, 21301);
  AttentionOptions options = causal_window(60, 2);
  options.num_threads = 1;
  const Outputs single = run_attention<TypeParam>(p, in, ranges.applied_to(options));
  for (int threads : {2, 3}) {
    options.num_threads = threads;
    expect_identical(run_attention<TypeParam>(p, in, ranges.applied_to(options)), single);
  }
}

// ---------------------------------------------------------------------------------------------
// Empty tensors are valid input.

TYPED_TEST(Attention, EmptyQueriesAreAccepted) {
  using T = TypeParam;
  for (const Problem& p :
       {make_problem(2, 4, 2, 0, 9, 8, 8, 0), make_problem(1, 1, 1, 0, 0, 3, 3, 0)}) {
    Tensor<T, 4> q(p.q_shape()), k(p.k_shape()), v(p.v_shape()), out(p.out_shape());
    Tensor<T, 3> lse(p.lse_shape());
    AttentionOptions options;
    options.causal = true;
    EXPECT_NO_THROW(attention(q.view(), k.view(), v.view(), out.view(), options, lse.view()));
  }
}

TYPED_TEST(Attention, EmptyKeysGiveZeroOutputAndNegativeInfiniteLse) {
  using T = TypeParam;
  const Problem p = make_problem(2, 4, 2, 70, 0, 8, 5, 0);
  for (bool causal : {false, true}) {
    SCOPED_TRACE(test::describe("causal=", causal));
    StridedBuffer<T, 4> out(p.out_shape(), Layout::kContiguous, T(7));
    StridedBuffer<T, 3> lse(p.lse_shape(), Layout::kContiguous, T(7));
    AttentionOptions options;
    options.causal = causal;
    options.sink_tokens = 4;
    Tensor<T, 4> q(p.q_shape());
    // As torch hands over empty tensors: null data, strides computed as if the empty dim were 1.
    const TensorView<const T, 4> k(nullptr, p.k_shape(), {p.heads_kv * p.dim, p.dim, p.dim, 1});
    const TensorView<const T, 4> v(nullptr, p.v_shape(),
                                   {p.heads_kv * p.dim_v, p.dim_v, p.dim_v, 1});
    attention(q.view(), k, v, out.view(), options, lse.view());
    for (double value : test::gather(out.view())) ASSERT_EQ(value, 0.0);
    for (double value : test::gather(lse.view())) ASSERT_EQ(value, -kInfinity);
  }
}

TYPED_TEST(Attention, EmptyBatchIsAccepted) {
  using T = TypeParam;
  const Problem p = make_problem(0, 4, 2, 9, 11, 8, 8, 0);
  Tensor<T, 4> q(p.q_shape()), k(p.k_shape()), v(p.v_shape()), out(p.out_shape());
  Tensor<T, 3> lse(p.lse_shape());
  Tensor<T, 4> bias({1, 4, 9, 11});
  EXPECT_NO_THROW(attention(q.view(), k.view(), v.view(), out.view(), {}, lse.view(), bias.view()));
}

TYPED_TEST(Attention, ZeroHeadsAreAccepted) {
  using T = TypeParam;
  for (Index heads_kv : {0, 2}) {
    SCOPED_TRACE(test::describe("Hq=0 Hkv=", heads_kv));
    const Problem p = make_problem(2, 0, heads_kv, 9, 11, 8, 8, 0);
    Tensor<T, 4> q(p.q_shape()), k(p.k_shape()), v(p.v_shape()), out(p.out_shape());
    Tensor<T, 3> lse(p.lse_shape());
    EXPECT_NO_THROW(attention(q.view(), k.view(), v.view(), out.view(), {}, lse.view()));
  }
}

TYPED_TEST(Attention, EmptyValueRowsStillGiveLse) {
  // Dv = 0: out has no elements, but lse is still the log of each row's denominator. lse does
  // not depend on v, so the reference runs with Dv = 1 on the same q and k (same seed).
  const Problem p = make_problem(2, 2, 1, 70, 40, 8, 0, 22000);
  Problem with_values = p;
  with_values.dim_v = 1;
  AttentionOptions options;
  options.causal = true;
  const Outputs got = run_attention<TypeParam>(p, random_inputs(p), options);
  const Outputs want = reference_outputs(with_values, random_inputs(with_values), options);
  EXPECT_TRUE(got.out.empty());
  EXPECT_TRUE(test::matches_reference(got.lse, want.lse, kTolerance<TypeParam>));
}

// ---------------------------------------------------------------------------------------------
// Properties of the result.

TYPED_TEST(Attention, ProbabilityRowsSumToOne) {
  // With v = 1 every output is the sum of its row's probabilities: 1 where the row sees a key,
  // 0 where it sees none.
  const Problem base = make_problem(2, 4, 2, 100, 70, 16, 3, 23000);
  std::vector<AttentionOptions> cases(4);
  cases[1].causal = true;
  cases[2].window_left = 10;
  cases[2].window_right = 3;
  cases[2].sink_tokens = 2;
  cases[3].softcap = 2;
  for (const AttentionOptions& options : cases)
    for (const Problem& p : {base, with_bias(base, 2, 4, 0.5)}) {
      SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
      Inputs in = random_inputs(p);
      in.v.assign(in.v.size(), 1.0);
      const Outputs want = reference_outputs(p, in, options);
      std::vector<double> expected(want.out.size());
      for (std::size_t row = 0; row < want.lse.size(); ++row)
        for (Index d = 0; d < p.dim_v; ++d)
          expected[row * p.dim_v + d] = std::isfinite(want.lse[row]) ? 1.0 : 0.0;
      const Outputs got = run_attention<TypeParam>(p, in, options);
      EXPECT_TRUE(test::matches_reference(got.out, expected, kTolerance<TypeParam>));
    }
}

TYPED_TEST(Attention, ZeroWindowCopiesTheValueAtTheQueryPosition) {
  // Window (0, 0): query i sees only key pos(i), so its softmax is exactly [1] and its output
  // is v[pos(i)], bit for bit.
  const Problem p = make_problem(2, 4, 2, 40, 70, 12, 9, 24000);
  const Inputs in = random_inputs(p);
  for (Index q_offset : {Index{0}, Index{3}, p.len_k - p.len_q, Index{-1}}) {
    SCOPED_TRACE(test::describe("q_offset=", q_offset));
    AttentionOptions options;
    options.window_left = 0;
    options.window_right = 0;
    options.q_offset = q_offset;
    const Index first_position = q_offset == -1 ? p.len_k - p.len_q : q_offset;
    const Outputs got = run_attention<TypeParam>(p, in, options);
    const Index group = p.heads_q / p.heads_kv;
    for (Index b = 0; b < p.batch; ++b)
      for (Index h = 0; h < p.heads_q; ++h)
        for (Index i = 0; i < p.len_q; ++i) {
          const Index key = first_position + i;
          for (Index d = 0; d < p.dim_v; ++d) {
            const double value = in.v[((b * p.heads_kv + h / group) * p.len_k + key) * p.dim_v + d];
            ASSERT_EQ(got.out[((b * p.heads_q + h) * p.len_q + i) * p.dim_v + d], value)
                << "b=" << b << " h=" << h << " i=" << i << " d=" << d;
          }
        }
  }
}

TYPED_TEST(Attention, LseStaysAccurateOverManyKeyBlocks) {
  // q = 0 makes every logit 0, so lse = log(Lk) exactly and out = mean(v). The error of lse
  // must not grow with the number of 64-key blocks the engine walks through.
  for (Index len_k : {Index{64}, Index{4096}, Index{1} << 20}) {
    SCOPED_TRACE(test::describe("Lk=", len_k));
    Problem p = make_problem(1, 1, 1, 1, len_k, 1, 1, 25000);
    Inputs in = random_inputs(p);
    in.q.assign(1, 0.0);
    in.v.assign(in.v.size(), 1.0);
    const Outputs got = run_attention<TypeParam>(p, in, AttentionOptions{});
    EXPECT_TRUE(test::matches_reference(got.lse, {std::log(static_cast<double>(len_k))},
                                        kTolerance<TypeParam>));
    EXPECT_TRUE(test::matches_reference(got.out, {1.0}, kTolerance<TypeParam>));
  }
}

}  // namespace
}  // namespace foveal::test
