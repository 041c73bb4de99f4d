// tests/cpp/test_attention.cpp — foveal::attention against the float64 reference.
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]   bias: [B or 1, Hq or 1, Lq, Lk]
// Every test runs for float and double. Shapes include 1, primes and non-multiples of the
// engine's tiles (64 query rows, 64 keys, micro-kernels of 6 keys / 6 rows, 16 floats or 8
// doubles per vector); every case prints its seed and shapes on failure.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "foveal/attention/dense.hpp"
#include "foveal/core/parallel.hpp"
#include "harness.hpp"
#include "reference/attention_reference.hpp"

namespace foveal {
namespace {

using test::Layout;
using test::Shape;
using test::StridedBuffer;

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Tolerances on the normalized error (harness.hpp: max |got - ref| / max |ref|).
// float: each logit sums D products and each output Lk weighted values in fp32 (eps 1.2e-7),
// through a polynomial exp2 (relative error 2.4e-7) and tanh; for D and Lk up to a few hundred
// that stays within a few hundred ulps of the output scale, so 2e-5 has margin while a wrong
// mask, scale or bias (an O(1) change) misses by orders of magnitude.
// double: the same sums in fp64 with libm exp2 / tanh (~1e-14); 1e-10 still catches any
// computation that drops to fp32 on the way.
template <typename T>
constexpr double kTolerance = std::is_same_v<T, float> ? 2e-5 : 1e-10;

// The lengths, head dims and GQA ratios the sweeps draw from.
constexpr Index kLengths[] = {1, 2, 7, 13, 63, 64, 65, 127, 129, 200};
constexpr Index kHeadDims[] = {1, 3, 16, 31, 64, 80, 128};
constexpr Index kGroupRatios[] = {1, 2, 3, 4, 8};

// ---------------------------------------------------------------------------------------------
// One attention problem: shapes, bias layout and the seed of its inputs.

struct Problem {
  Index batch = 1, heads_q = 1, heads_kv = 1, len_q = 1, len_k = 1, dim = 1, dim_v = 1;
  Index bias_batch = 0;          // 0: no bias; else 1 (broadcast) or batch
  Index bias_heads = 0;          // 1 (broadcast) or heads_q when there is a bias
  double masked_bias_share = 0;  // share of bias entries that are -inf
  std::uint64_t seed = 1;

  Shape<4> q_shape() const { return {batch, heads_q, len_q, dim}; }
  Shape<4> k_shape() const { return {batch, heads_kv, len_k, dim}; }
  Shape<4> v_shape() const { return {batch, heads_kv, len_k, dim_v}; }
  Shape<4> out_shape() const { return {batch, heads_q, len_q, dim_v}; }
  Shape<3> lse_shape() const { return {batch, heads_q, len_q}; }
  Shape<4> bias_shape() const { return {bias_batch, bias_heads, len_q, len_k}; }
  bool has_bias() const { return bias_batch > 0; }
  // Multiply-adds of the reference: what a case costs.
  double work() const {
    return static_cast<double>(batch * heads_q * len_q) * static_cast<double>(len_k) *
           static_cast<double>(dim + dim_v);
  }
};

Problem make_problem(Index batch, Index heads_q, Index heads_kv, Index len_q, Index len_k,
                     Index dim, Index dim_v, std::uint64_t seed) {
  Problem problem;
  problem.batch = batch;
  problem.heads_q = heads_q;
  problem.heads_kv = heads_kv;
  problem.len_q = len_q;
  problem.len_k = len_k;
  problem.dim = dim;
  problem.dim_v = dim_v;
  problem.seed = seed;
  return problem;
}

Problem with_bias(Problem problem, Index bias_batch, Index bias_heads, double masked_share = 0) {
  problem.bias_batch = bias_batch;
  problem.bias_heads = bias_heads;
  problem.masked_bias_share = masked_share;
  return problem;
}

std::string problem_string(const Problem& p) {
  std::ostringstream text;
  text << "seed=" << p.seed << " q=" << test::shape_string(p.q_shape())
       << " k=" << test::shape_string(p.k_shape()) << " v=" << test::shape_string(p.v_shape());
  if (p.has_bias()) {
    text << " bias=" << test::shape_string(p.bias_shape())
         << " masked share=" << p.masked_bias_share;
  }
  return text.str();
}

std::string options_string(const AttentionOptions& o) {
  std::ostringstream text;
  text << "scale=" << o.scale << " causal=" << o.causal << " window_left=" << o.window_left
       << " window_right=" << o.window_right << " sink_tokens=" << o.sink_tokens
       << " softcap=" << o.softcap << " q_offset=" << o.q_offset
       << " num_threads=" << o.num_threads;
  return text.str();
}

// A random problem drawn from the sweep lists whose reference costs at most `max_work`.
Problem random_problem(std::uint64_t seed, double max_work) {
  test::RandomSource random(seed);
  for (;;) {
    Problem p;
    p.seed = seed;
    p.batch = random.integer(1, 3);
    if (random.chance(0.2)) {  // MQA: one kv head for all query heads
      p.heads_kv = 1;
      p.heads_q = random.integer(2, 6);
    } else {
      p.heads_kv = random.integer(1, 2);
      p.heads_q = p.heads_kv * random.pick(kGroupRatios);
    }
    p.len_q = random.pick(kLengths);
    p.len_k = random.pick(kLengths);
    p.dim = random.pick(kHeadDims);
    p.dim_v = random.chance(0.5) ? p.dim : random.pick(kHeadDims);
    if (p.work() <= max_work) return p;
  }
}

// ---------------------------------------------------------------------------------------------
// Inputs, the reference and the call under test.

// q, k, v ~ N(0, 1); bias ~ N(0, 1) with a share of entries -inf. All values are rounded to
// float, so one set of inputs is exact for float, double and the float64 reference alike.
struct Inputs {
  std::vector<double> q, k, v, bias;
};

Inputs random_inputs(const Problem& p) {
  test::RandomSource random(p.seed);
  Inputs in;
  in.q = test::round_to<float>(random.normal(test::shape_numel<4>(p.q_shape())));
  in.k = test::round_to<float>(random.normal(test::shape_numel<4>(p.k_shape())));
  in.v = test::round_to<float>(random.normal(test::shape_numel<4>(p.v_shape())));
  if (p.has_bias()) {
    in.bias = test::round_to<float>(random.normal(test::shape_numel<4>(p.bias_shape())));
    for (double& entry : in.bias)
      if (random.chance(p.masked_bias_share)) entry = -kInfinity;
  }
  return in;
}

struct Outputs {
  std::vector<double> out, lse;  // logical row-major
};

Outputs reference_outputs(const Problem& p, const Inputs& in, const AttentionOptions& o) {
  reference::ReferenceOptions options;
  options.scale = o.scale;
  options.causal = o.causal;
  options.window_left = o.window_left;
  options.window_right = o.window_right;
  options.sink_tokens = o.sink_tokens;
  options.softcap = o.softcap;
  options.q_offset = o.q_offset;
  const reference::AttentionShape shape{p.batch, p.heads_q, p.heads_kv, p.len_q,
                                        p.len_k, p.dim,     p.dim_v};
  Outputs result;
  reference::attention_reference(shape, in.q, in.k, in.v, options, result.out, result.lse, in.bias,
                                 p.has_bias() ? p.bias_batch : 1, p.has_bias() ? p.bias_heads : 1);
  return result;
}

// Where each tensor of a call lives in memory.
struct Layouts {
  Layout q = Layout::kContiguous, k = Layout::kContiguous, v = Layout::kContiguous;
  Layout out = Layout::kContiguous, lse = Layout::kContiguous, bias = Layout::kContiguous;
  static Layouts all(Layout layout) { return {layout, layout, layout, layout, layout, layout}; }
};

// Runs foveal::attention on T copies of the inputs placed as `layouts` (padding holds NaN) and
// returns out and, when `with_lse`, lse. Fails the test if anything outside out or lse changed.
template <typename T>
Outputs run_attention(const Problem& p, const Inputs& in, const AttentionOptions& o,
                      const Layouts& layouts = {}, bool with_lse = true) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), layouts.q, nan);
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), layouts.k, nan);
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), layouts.v, nan);
  const StridedBuffer<T, 4> bias(in.bias, p.has_bias() ? p.bias_shape() : Shape<4>{}, layouts.bias,
                                 nan);
  const StridedBuffer<T, 4> out(p.out_shape(), layouts.out, nan);
  const StridedBuffer<T, 3> lse(p.lse_shape(), layouts.lse, nan);
  attention(q.const_view(), k.const_view(), v.const_view(), out.view(), o,
            with_lse ? lse.view() : TensorView<T, 3>(),
            p.has_bias() ? bias.const_view() : TensorView<const T, 4>());
  EXPECT_TRUE(out.outside_untouched()) << "attention wrote outside out";
  EXPECT_TRUE(lse.outside_untouched()) << "attention wrote outside lse";
  Outputs result;
  result.out = test::gather(out.view());
  if (with_lse) result.lse = test::gather(lse.view());
  return result;
}

// foveal::attention<T> agrees with the float64 reference on out and lse.
template <typename T>
void expect_matches_reference(const Problem& p, const AttentionOptions& o) {
  SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const Outputs want = reference_outputs(p, in, o);
  const Outputs got = run_attention<T>(p, in, o);
  EXPECT_TRUE(test::matches_reference(got.out, want.out, kTolerance<T>)) << "out";
  EXPECT_TRUE(test::matches_reference(got.lse, want.lse, kTolerance<T>)) << "lse";
}

// foveal::attention<T> gives the same bits with `layouts` as with contiguous tensors.
template <typename T>
void expect_layout_gives_identical_bits(const Problem& p, const AttentionOptions& o,
                                        const Layouts& layouts) {
  SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const Outputs contiguous = run_attention<T>(p, in, o);
  const Outputs strided = run_attention<T>(p, in, o, layouts);
  EXPECT_TRUE(test::bitwise_equal(strided.out, contiguous.out)) << "out";
  EXPECT_TRUE(test::bitwise_equal(strided.lse, contiguous.lse)) << "lse";
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

struct ElementTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};

using ElementTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(Attention, ElementTypes, ElementTypeNames);

// A few shapes the option tests run on: GQA with Lq < Lk, Lq > Lk with MQA, square with
// Dv < D, and a single query against a long key sequence.
std::vector<Problem> option_problems(std::uint64_t seed) {
  return {make_problem(2, 4, 2, 65, 129, 16, 24, seed),
          make_problem(1, 3, 1, 129, 65, 31, 31, seed + 1),
          make_problem(1, 2, 2, 200, 200, 8, 5, seed + 2),
          make_problem(3, 1, 1, 1, 127, 64, 80, seed + 3)};
}

// ---------------------------------------------------------------------------------------------
// Agreement with the reference over shapes.

TYPED_TEST(Attention, MatchesReferenceOnRandomShapes) {
  for (std::uint64_t seed = 1000; seed < 1048; ++seed)
    expect_matches_reference<TypeParam>(random_problem(seed, 1.2e7), AttentionOptions{});
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
    Problem p = random_problem(seed, 3e6);
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

// Runs attention on contiguous copies of q, k and v with `bias` given as a view as it is.
template <typename T>
Outputs run_with_bias_view(const Problem& p, const Inputs& in, const AttentionOptions& options,
                           const TensorView<const T, 4>& bias) {
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> out(p.out_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 3> lse(p.lse_shape(), Layout::kContiguous, T(0));
  attention(q.const_view(), k.const_view(), v.const_view(), out.view(), options, lse.view(), bias);
  return Outputs{test::gather(out.view()), test::gather(lse.view())};
}

TYPED_TEST(Attention, ExpandedBiasGivesTheBitsOfABroadcastBias) {
  // A [1, 1, Lq, Lk] bias, and the same memory seen as [B, Hq, Lq, Lk] with stride 0 (what
  // torch's expand() hands over).
  using T = TypeParam;
  const Problem p = with_bias(make_problem(2, 4, 2, 70, 90, 12, 10, 18500), 1, 1, 0.1);
  const Inputs in = random_inputs(p);
  AttentionOptions options;
  options.causal = true;
  const Outputs broadcast = run_attention<T>(p, in, options);
  const StridedBuffer<T, 4> bias(in.bias, p.bias_shape(), Layout::kContiguous, T(0));
  const TensorView<const T, 4> expanded(bias.const_view().data(),
                                        {p.batch, p.heads_q, p.len_q, p.len_k}, {0, 0, p.len_k, 1});
  const Outputs got = run_with_bias_view<T>(p, in, options, expanded);
  EXPECT_TRUE(test::bitwise_equal(got.out, broadcast.out));
  EXPECT_TRUE(test::bitwise_equal(got.lse, broadcast.lse));
}

TYPED_TEST(Attention, TransposedBiasGivesTheBitsOfAContiguousBias) {
  // The bias is the one input read element by element, so any stride works for it, the
  // innermost included: a [B, Hq, Lk, Lq] buffer seen as [B, Hq, Lq, Lk].
  using T = TypeParam;
  const Problem p = with_bias(make_problem(2, 4, 2, 70, 90, 12, 10, 18600), 2, 4, 0.1);
  const Inputs in = random_inputs(p);
  AttentionOptions options;
  options.causal = true;
  const Outputs contiguous = run_attention<T>(p, in, options);
  const Shape<4> shape = p.bias_shape();
  std::vector<T> transposed(in.bias.size());
  for (Index b = 0; b < shape[0]; ++b)
    for (Index h = 0; h < shape[1]; ++h)
      for (Index i = 0; i < shape[2]; ++i)
        for (Index j = 0; j < shape[3]; ++j)
          transposed[((b * shape[1] + h) * shape[3] + j) * shape[2] + i] =
              static_cast<T>(in.bias[((b * shape[1] + h) * shape[2] + i) * shape[3] + j]);
  const TensorView<const T, 4> bias(
      transposed.data(), shape, {shape[1] * shape[2] * shape[3], shape[2] * shape[3], 1, shape[2]});
  const Outputs got = run_with_bias_view<T>(p, in, options, bias);
  EXPECT_TRUE(test::bitwise_equal(got.out, contiguous.out));
  EXPECT_TRUE(test::bitwise_equal(got.lse, contiguous.lse));
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
    EXPECT_TRUE(test::bitwise_equal(multi.out, single.out)) << "out";
    EXPECT_TRUE(test::bitwise_equal(multi.lse, single.lse)) << "lse";
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
    EXPECT_TRUE(test::bitwise_equal(multi.out, single.out)) << "out";
    EXPECT_TRUE(test::bitwise_equal(multi.lse, single.lse)) << "lse";
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
}  // namespace foveal
