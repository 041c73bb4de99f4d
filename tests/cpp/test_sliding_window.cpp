// tests/cpp/test_sliding_window.cpp — foveal::sliding_window_attention against the float64
// reference, and the properties its header promises.
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]
// Query i sits at position p = q_offset + i and sees the keys [p - window_left, p + window_right]
// (causal: window_right = 0) plus the first sink_tokens keys. Every test runs for float and
// double. Shapes include 1, primes and non-multiples of the engine's tiles (64 query rows,
// 128-key blocks, micro-kernels of 6 keys / 6 rows, 16 floats or 8 doubles per vector); every
// case prints its seed, shapes and options on failure.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "foveal/attention/dense.hpp"
#include "foveal/attention/registry.hpp"
#include "foveal/attention/sliding_window.hpp"
#include "harness.hpp"
#include "reference/attention_reference.hpp"

namespace foveal {
namespace {

using test::Layout;
using test::Shape;
using test::StridedBuffer;

constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Tolerances on the normalized error (harness.hpp: max |got - ref| / max |ref|), the ones of
// test_attention.cpp for the same engine. float: each logit sums up to 128 products and each
// output up to a few hundred weighted values in fp32 (eps 1.2e-7), through a polynomial exp2
// (relative error 2.4e-7) and tanh; that stays within a few hundred ulps of the output scale,
// so 2e-5 has margin while a key wrongly in or out of the window (an O(1 / window) change of
// the output, at least 1e-3 here) misses by orders of magnitude.
// double: the same sums in fp64 with libm exp2 / tanh (~1e-14); 1e-10 still catches any step
// that drops to fp32.
template <typename T>
constexpr double kTolerance = std::is_same_v<T, float> ? 2e-5 : 1e-10;

// What the sweeps draw from.
constexpr Index kLengths[] = {1, 2, 7, 13, 63, 64, 65, 127, 129, 200, 300};
constexpr Index kHeadDims[] = {1, 3, 16, 31, 64, 80, 128};
constexpr Index kGroupRatios[] = {1, 2, 3, 4, 8};
constexpr Index kCausalWindows[] = {0, 1, 5, 63, 64, 65, 127, 128, 129, 200};
constexpr Index kRightWindows[] = {0, 1, 5, 64, 129};
constexpr Index kSinkCounts[] = {0, 1, 4, 130};

// ---------------------------------------------------------------------------------------------
// One problem: shapes and the seed of its inputs.

struct Problem {
  Index batch = 1, heads_q = 1, heads_kv = 1, len_q = 1, len_k = 1, dim = 1, dim_v = 1;
  std::uint64_t seed = 1;

  Shape<4> q_shape() const { return {batch, heads_q, len_q, dim}; }
  Shape<4> k_shape() const { return {batch, heads_kv, len_k, dim}; }
  Shape<4> v_shape() const { return {batch, heads_kv, len_k, dim_v}; }
  Shape<4> out_shape() const { return {batch, heads_q, len_q, dim_v}; }
  Shape<3> lse_shape() const { return {batch, heads_q, len_q}; }
  // Multiply-adds of the reference, which forms every logit whatever the window: what a case
  // costs.
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

std::string problem_string(const Problem& p) {
  return test::describe("seed=", p.seed, " q=", test::shape_string(p.q_shape()),
                        " k=", test::shape_string(p.k_shape()),
                        " v=", test::shape_string(p.v_shape()));
}

std::string options_string(const AttentionOptions& o) {
  return test::describe("scale=", o.scale, " causal=", o.causal, " window_left=", o.window_left,
                        " window_right=", o.window_right, " sink_tokens=", o.sink_tokens,
                        " softcap=", o.softcap, " q_offset=", o.q_offset,
                        " num_threads=", o.num_threads);
}

// A random problem from the sweep lists (MQA in one case of five) whose reference costs at
// most `max_work`.
Problem random_problem(std::uint64_t seed, double max_work) {
  test::RandomSource random(seed);
  for (;;) {
    Problem p;
    p.seed = seed;
    p.batch = random.integer(1, 3);
    if (random.chance(0.2)) {
      p.heads_kv = 1;
      p.heads_q = random.integer(2, 5);
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

// Random bounded-window options: a causal window or a two-sided one, sinks, sometimes a
// softcap, an explicit scale or an explicit q_offset.
AttentionOptions random_window_options(test::RandomSource& random, const Problem& p) {
  AttentionOptions options;
  if (random.chance(0.3)) {
    options.window_left = random.pick(kCausalWindows);
    options.window_right = random.pick(kRightWindows);
  } else {
    options.causal = true;
    options.window_left = random.pick(kCausalWindows);
    options.window_right = random.pick({Index{-1}, Index{0}});
  }
  options.sink_tokens = random.pick(kSinkCounts);
  options.softcap = random.pick({0.0f, 0.0f, 3.0f, 20.0f});
  options.scale = random.pick({0.0f, 0.0f, 0.3f});
  options.q_offset = random.chance(0.5) ? -1 : random.integer(0, p.len_k);
  return options;
}

// ---------------------------------------------------------------------------------------------
// Inputs, the reference and the calls under test.

// q, k, v ~ N(0, 1), rounded to float so that one set of inputs is exact for float, double
// and the float64 reference alike.
struct Inputs {
  std::vector<double> q, k, v;
};

Inputs random_inputs(const Problem& p) {
  test::RandomSource random(p.seed);
  Inputs in;
  in.q = test::round_to<float>(random.normal(test::shape_numel<4>(p.q_shape())));
  in.k = test::round_to<float>(random.normal(test::shape_numel<4>(p.k_shape())));
  in.v = test::round_to<float>(random.normal(test::shape_numel<4>(p.v_shape())));
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
  reference::attention_reference(shape, in.q, in.k, in.v, options, result.out, result.lse);
  return result;
}

// Which entry point computes a call.
enum class Entry {
  kSlidingWindow,  // foveal::sliding_window_attention
  kDense,          // foveal::attention
  kRegistry,       // make_attention("sliding_window", {options, {}})->forward
};

// Where each tensor of a call lives in memory.
struct Layouts {
  Layout q = Layout::kContiguous, k = Layout::kContiguous, v = Layout::kContiguous;
  Layout out = Layout::kContiguous, lse = Layout::kContiguous;
  static Layouts all(Layout layout) { return {layout, layout, layout, layout, layout}; }
};

// Runs `entry` on T copies of the inputs placed as `layouts` (padding holds NaN) and returns out
// and, when `with_lse`, lse. Fails the test if anything outside out or lse changed.
template <typename T>
Outputs run(Entry entry, const Problem& p, const Inputs& in, const AttentionOptions& o,
            const Layouts& layouts = {}, bool with_lse = true) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), layouts.q, nan);
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), layouts.k, nan);
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), layouts.v, nan);
  const StridedBuffer<T, 4> out(p.out_shape(), layouts.out, nan);
  const StridedBuffer<T, 3> lse(p.lse_shape(), layouts.lse, nan);
  const TensorView<T, 3> lse_view = with_lse ? lse.view() : TensorView<T, 3>();
  switch (entry) {
    case Entry::kSlidingWindow:
      sliding_window_attention(q.const_view(), k.const_view(), v.const_view(), out.view(), o,
                               lse_view);
      break;
    case Entry::kDense:
      attention(q.const_view(), k.const_view(), v.const_view(), out.view(), o, lse_view);
      break;
    case Entry::kRegistry: {
      const std::unique_ptr<AttentionKernel> kernel =
          make_attention("sliding_window", AttentionConfig{o, {}});
      EXPECT_EQ(kernel->name(), "sliding_window");
      AttentionArgs<T> args;
      args.q = q.const_view();
      args.k = k.const_view();
      args.v = v.const_view();
      args.out = out.view();
      args.lse = lse_view;
      kernel->forward(args);
      break;
    }
  }
  EXPECT_TRUE(out.outside_untouched()) << "wrote outside out";
  EXPECT_TRUE(lse.outside_untouched()) << "wrote outside lse";
  Outputs result;
  result.out = test::gather(out.view());
  if (with_lse) result.lse = test::gather(lse.view());
  return result;
}

// sliding_window_attention<T> agrees with the float64 reference on out and lse.
template <typename T>
void expect_matches_reference(const Problem& p, const AttentionOptions& o) {
  SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const Outputs want = reference_outputs(p, in, o);
  const Outputs got = run<T>(Entry::kSlidingWindow, p, in, o);
  EXPECT_TRUE(test::matches_reference(got.out, want.out, kTolerance<T>)) << "out";
  EXPECT_TRUE(test::matches_reference(got.lse, want.lse, kTolerance<T>)) << "lse";
}

// `got` and `want` hold the same bits in out and lse.
void expect_identical(const Outputs& got, const Outputs& want) {
  EXPECT_TRUE(test::bitwise_equal(got.out, want.out)) << "out";
  EXPECT_TRUE(test::bitwise_equal(got.lse, want.lse)) << "lse";
}

template <typename T>
class SlidingWindow : public ::testing::Test {};

struct ElementTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};

using ElementTypes = ::testing::Types<float, double>;
TYPED_TEST_SUITE(SlidingWindow, ElementTypes, ElementTypeNames);

// Shapes the option tests run on: GQA with Lq < Lk, MQA with Lq > Lk, square with Dv < D and
// lengths past two key blocks, and a single query against many keys.
std::vector<Problem> option_problems(std::uint64_t seed) {
  return {make_problem(2, 4, 2, 65, 129, 16, 24, seed),
          make_problem(1, 3, 1, 129, 65, 31, 31, seed + 1),
          make_problem(1, 2, 2, 300, 300, 8, 5, seed + 2),
          make_problem(3, 1, 1, 1, 200, 64, 80, seed + 3)};
}

// ---------------------------------------------------------------------------------------------
// Agreement with the reference.

TYPED_TEST(SlidingWindow, MatchesReferenceOnRandomShapesAndWindows) {
  for (std::uint64_t seed = 1000; seed < 1040; ++seed) {
    test::RandomSource random(seed + 7);  // a stream apart from the one that made the shapes
    const Problem p = random_problem(seed, 3e6);
    expect_matches_reference<TypeParam>(p, random_window_options(random, p));
  }
}

TYPED_TEST(SlidingWindow, MatchesReferenceForEveryCausalWindow) {
  for (Index window : kCausalWindows)
    for (const Problem& p : {make_problem(1, 4, 2, 129, 300, 16, 24, 2000),
                             make_problem(2, 2, 1, 200, 200, 5, 3, 2001)}) {
      AttentionOptions options;
      options.causal = true;
      options.window_left = window;
      expect_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(SlidingWindow, MatchesReferenceForTwoSidedWindows) {
  for (Index left : {0, 1, 5, 64, 129})
    for (Index right : kRightWindows) {
      AttentionOptions options;
      options.window_left = left;
      options.window_right = right;
      for (const Problem& p :
           {make_problem(1, 2, 1, 129, 200, 8, 8, 3000), make_problem(2, 2, 2, 65, 63, 8, 3, 3001)})
        expect_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(SlidingWindow, SinkTokensMatchReference) {
  // 130 sinks reach past the first key block and, for Lk = 65 or 129, past every key; the
  // largest Index makes every key a sink.
  for (Index sinks : {Index{0}, Index{1}, Index{4}, Index{130}, std::numeric_limits<Index>::max()})
    for (Index window : {0, 5, 64, 129}) {
      AttentionOptions options;
      options.causal = true;
      options.window_left = window;
      options.sink_tokens = sinks;
      for (const Problem& p : option_problems(4000))
        expect_matches_reference<TypeParam>(p, options);
      options.causal = false;
      options.window_right = 3;
      expect_matches_reference<TypeParam>(make_problem(1, 2, 1, 129, 200, 8, 8, 4100), options);
    }
}

TYPED_TEST(SlidingWindow, SoftcapMatchesReference) {
  for (float softcap : {0.5f, 2.0f, 30.0f})
    for (float scale : {0.0f, 1.5f}) {
      AttentionOptions options;
      options.causal = true;
      options.window_left = 63;
      options.softcap = softcap;
      options.scale = scale;
      for (const Problem& p : option_problems(5000))
        expect_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(SlidingWindow, ExplicitAndDefaultQueryOffsetsMatchReference) {
  // Lq != Lk in both directions: -1 puts the last query at the last key (Lq > Lk: the first
  // queries precede every key), an explicit offset puts query 0 anywhere in [0, Lk].
  for (const Problem& p :
       {make_problem(2, 4, 2, 65, 200, 16, 24, 6000), make_problem(1, 3, 1, 200, 65, 31, 31, 6001)})
    for (Index q_offset : {Index{-1}, Index{0}, Index{1}, p.len_k / 2, p.len_k})
      for (bool causal : {true, false}) {
        AttentionOptions options;
        options.q_offset = q_offset;
        options.causal = causal;
        options.window_left = 13;
        options.window_right = causal ? -1 : 2;
        options.sink_tokens = causal ? 2 : 0;
        expect_matches_reference<TypeParam>(p, options);
      }
}

TYPED_TEST(SlidingWindow, EveryGroupRatioAndMqaMatchReference) {
  AttentionOptions options;
  options.causal = true;
  options.window_left = 20;
  for (Index ratio : kGroupRatios)
    for (Index heads_kv : {1, 3})
      expect_matches_reference<TypeParam>(
          make_problem(2, heads_kv * ratio, heads_kv, 33, 70, 16, 16, 7000), options);
}

TYPED_TEST(SlidingWindow, EveryHeadDimPairMatchesReference) {
  AttentionOptions options;
  options.causal = true;
  options.window_left = 17;
  options.sink_tokens = 1;
  for (Index dim : kHeadDims)
    for (Index dim_v : kHeadDims)
      expect_matches_reference<TypeParam>(make_problem(1, 2, 1, 37, 70, dim, dim_v, 8000), options);
}

// ---------------------------------------------------------------------------------------------
// Window 0 is the diagonal; a window of Lk or more is full causal attention.

TYPED_TEST(SlidingWindow, ZeroWindowEqualsTheDiagonalOnly) {
  // Query i sees only the key at its own position p: its softmax is exactly [1], so its output
  // is v[p] bit for bit and its lse is its own logit (softcapped when asked). A query whose
  // position holds no key (p < 0 or p >= Lk) sees nothing: 0 and -inf.
  using T = TypeParam;
  struct Case {
    Index len_q, len_k, q_offset;
    bool causal;
    double softcap;
  };
  for (const Case& c :
       {Case{40, 70, -1, true, 0}, Case{40, 70, 3, false, 0}, Case{70, 40, -1, true, 0},
        Case{70, 40, 10, false, 0}, Case{13, 13, -1, true, 2.5}, Case{129, 200, 71, true, 0}}) {
    const Problem p = make_problem(2, 4, 2, c.len_q, c.len_k, 12, 9, 9000 + c.len_q + c.len_k);
    AttentionOptions options;
    options.causal = c.causal;
    options.window_left = 0;
    options.window_right = c.causal ? -1 : 0;
    options.q_offset = c.q_offset;
    options.softcap = c.softcap;
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
    const Inputs in = random_inputs(p);
    const Outputs got = run<T>(Entry::kSlidingWindow, p, in, options);
    const Index first_position = c.q_offset == -1 ? p.len_k - p.len_q : c.q_offset;
    const Index group = p.heads_q / p.heads_kv;
    const double scale = 1.0 / std::sqrt(static_cast<double>(p.dim));
    std::vector<double> own_logits(got.lse.size());
    for (Index b = 0; b < p.batch; ++b)
      for (Index h = 0; h < p.heads_q; ++h)
        for (Index i = 0; i < p.len_q; ++i) {
          const Index row = (b * p.heads_q + h) * p.len_q + i;
          const Index key = first_position + i;
          const Index kv_row = (b * p.heads_kv + h / group) * p.len_k + key;
          if (key < 0 || key >= p.len_k) {
            own_logits[row] = -kInfinity;
            for (Index d = 0; d < p.dim_v; ++d)
              ASSERT_EQ(got.out[row * p.dim_v + d], 0.0) << "b=" << b << " h=" << h << " i=" << i;
            continue;
          }
          double dot = 0;
          for (Index d = 0; d < p.dim; ++d) dot += in.q[row * p.dim + d] * in.k[kv_row * p.dim + d];
          double logit = scale * dot;
          if (c.softcap > 0) logit = c.softcap * std::tanh(logit / c.softcap);
          own_logits[row] = logit;
          for (Index d = 0; d < p.dim_v; ++d)
            ASSERT_EQ(got.out[row * p.dim_v + d], in.v[kv_row * p.dim_v + d])
                << "b=" << b << " h=" << h << " i=" << i << " d=" << d;
        }
    EXPECT_TRUE(test::matches_reference(got.lse, own_logits, kTolerance<T>)) << "lse";
  }
}

TYPED_TEST(SlidingWindow, WindowOfAtLeastLkEqualsCausalAttentionBitwise) {
  // Every position is at most Lk - 1 here, so a window of Lk or more hides no key.
  for (const Problem& p :
       {make_problem(2, 4, 2, 65, 129, 16, 24, 10000),
        make_problem(1, 3, 1, 200, 63, 31, 31, 10001), make_problem(1, 2, 2, 300, 300, 8, 5, 10002),
        make_problem(3, 1, 1, 1, 200, 64, 80, 10003)}) {
    const Inputs in = random_inputs(p);
    std::vector<Index> offsets = {-1};
    if (p.len_q <= p.len_k) offsets.push_back(p.len_k / 2 - p.len_q / 2);
    for (Index window : {p.len_k, p.len_k + 1, p.len_k + p.len_q, 10 * p.len_k + 1000,
                         std::numeric_limits<Index>::max()})
      for (Index sinks : {0, 4})
        for (Index q_offset : offsets) {
          AttentionOptions causal;
          causal.causal = true;
          causal.sink_tokens = sinks;
          causal.q_offset = q_offset;
          AttentionOptions windowed = causal;
          windowed.window_left = window;
          SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(windowed)));
          expect_identical(run<TypeParam>(Entry::kSlidingWindow, p, in, windowed),
                           run<TypeParam>(Entry::kDense, p, in, causal));
        }
  }
}

// ---------------------------------------------------------------------------------------------
// The same bits whichever way it is called.

TYPED_TEST(SlidingWindow, EqualsDenseAttentionWithTheSameOptionsBitwise) {
  for (std::uint64_t seed = 11000; seed < 11040; ++seed) {
    test::RandomSource random(seed + 7);
    const Problem p = random_problem(seed, 1e7);
    AttentionOptions options = random_window_options(random, p);
    options.num_threads = static_cast<int>(random.integer(1, 3));
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
    const Inputs in = random_inputs(p);
    expect_identical(run<TypeParam>(Entry::kSlidingWindow, p, in, options),
                     run<TypeParam>(Entry::kDense, p, in, options));
  }
}

TYPED_TEST(SlidingWindow, RegistryKernelGivesIdenticalBits) {
  for (std::uint64_t seed = 12000; seed < 12010; ++seed) {
    test::RandomSource random(seed + 7);
    const Problem p = random_problem(seed, 1e7);
    const AttentionOptions options = random_window_options(random, p);
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
    const Inputs in = random_inputs(p);
    expect_identical(run<TypeParam>(Entry::kRegistry, p, in, options),
                     run<TypeParam>(Entry::kSlidingWindow, p, in, options));
  }
}

TYPED_TEST(SlidingWindow, IdenticalBitsForOneTwoAndThreeThreads) {
  const Problem p = make_problem(2, 4, 2, 300, 300, 32, 16, 13000);
  const Inputs in = random_inputs(p);
  for (Index window : {0, 5, 129}) {
    AttentionOptions options;
    options.causal = true;
    options.window_left = window;
    options.sink_tokens = 4;
    options.num_threads = 1;
    const Outputs single = run<TypeParam>(Entry::kSlidingWindow, p, in, options);
    for (int threads : {2, 3}) {
      options.num_threads = threads;
      SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
      expect_identical(run<TypeParam>(Entry::kSlidingWindow, p, in, options), single);
    }
  }
}

TYPED_TEST(SlidingWindow, LseOutputDoesNotChangeOut) {
  const Problem p = make_problem(2, 4, 2, 70, 130, 12, 10, 14000);
  const Inputs in = random_inputs(p);
  AttentionOptions options;
  options.causal = true;
  options.window_left = 40;
  options.sink_tokens = 3;
  const Outputs with_lse = run<TypeParam>(Entry::kSlidingWindow, p, in, options, {}, true);
  const Outputs without_lse = run<TypeParam>(Entry::kSlidingWindow, p, in, options, {}, false);
  EXPECT_TRUE(test::bitwise_equal(without_lse.out, with_lse.out));
}

// A case that exercises every tensor: GQA, lse, a causal window with sinks and a softcap.
Problem layout_problem() { return make_problem(2, 6, 2, 70, 200, 19, 21, 15000); }

AttentionOptions layout_options() {
  AttentionOptions options;
  options.causal = true;
  options.window_left = 65;
  options.sink_tokens = 3;
  options.softcap = 5;
  return options;
}

TYPED_TEST(SlidingWindow, StridedLayoutsGiveIdenticalBits) {
  Layouts mixed;
  mixed.q = Layout::kSwapped12;
  mixed.k = Layout::kPadded;
  mixed.v = Layout::kReversed;
  mixed.out = Layout::kPadded;
  mixed.lse = Layout::kSwapped12;
  const Problem p = layout_problem();
  const Inputs in = random_inputs(p);
  const Outputs contiguous = run<TypeParam>(Entry::kSlidingWindow, p, in, layout_options());
  for (const Layouts& layouts : {Layouts::all(Layout::kSwapped12), Layouts::all(Layout::kPadded),
                                 Layouts::all(Layout::kReversed), mixed}) {
    SCOPED_TRACE(test::describe("q layout: ", test::layout_name(layouts.q),
                                ", k layout: ", test::layout_name(layouts.k)));
    expect_identical(run<TypeParam>(Entry::kSlidingWindow, p, in, layout_options(), layouts),
                     contiguous);
  }
}

TYPED_TEST(SlidingWindow, SizeOneDimensionsAcceptAnyStride) {
  AttentionOptions options;
  options.causal = true;
  options.window_left = 5;
  for (const Problem& p :
       {make_problem(1, 1, 1, 1, 37, 1, 1, 16000), make_problem(1, 1, 1, 40, 1, 5, 1, 16001)}) {
    SCOPED_TRACE(problem_string(p));
    const Inputs in = random_inputs(p);
    expect_identical(run<TypeParam>(Entry::kSlidingWindow, p, in, options,
                                    Layouts::all(Layout::kOddUnitStrides)),
                     run<TypeParam>(Entry::kSlidingWindow, p, in, options));
  }
}

#ifdef _OPENMP
// Makes 16 sliding_window_attention calls with `num_threads` from inside an OpenMP parallel
// region of 4 threads (a caller running one attention per thread of its own) and exits with
// the number of calls whose out differs from the same call made outside any parallel region.
template <typename T>
[[noreturn]] void exit_with_calls_differing_inside_a_parallel_region(int num_threads) {
  // One tile of one (batch, kv head): a single task, which runs on the calling thread.
  const Problem p = make_problem(1, 2, 1, 20, 100, 64, 64, 17000);
  const Inputs in = random_inputs(p);
  const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()),
      v(in.v.begin(), in.v.end());
  const TensorView<const T, 4> q_view(q.data(), p.q_shape()), k_view(k.data(), p.k_shape()),
      v_view(v.data(), p.v_shape());
  AttentionOptions options;
  options.causal = true;
  options.window_left = 30;
  options.num_threads = num_threads;
  Tensor<T, 4> alone(p.out_shape());
  sliding_window_attention(q_view, k_view, v_view, alone.view(), options);
  constexpr int kCalls = 16;
  int differing = 0;
#pragma omp parallel for num_threads(4) reduction(+ : differing)
  for (int call = 0; call < kCalls; ++call) {
    Tensor<T, 4> out(p.out_shape());
    sliding_window_attention(q_view, k_view, v_view, out.view(), options);
    differing += std::memcmp(out.data(), alone.data(), sizeof(T) * out.numel()) != 0;
  }
  std::fprintf(stderr, "%d of %d calls differ\n", differing, kCalls);
  std::exit(differing);
}

TYPED_TEST(SlidingWindow, CallsFromInsideAnOpenMPParallelRegionGiveTheBitsOfSerialCalls) {
  // Each call runs in a child process: a broken per-thread scratch crashes rather than fails.
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  for (int threads : {1, 0}) {
    SCOPED_TRACE(test::describe("num_threads=", threads));
    EXPECT_EXIT(exit_with_calls_differing_inside_a_parallel_region<TypeParam>(threads),
                ::testing::ExitedWithCode(0), "0 of 16 calls differ");
  }
}
#endif

// ---------------------------------------------------------------------------------------------
// Rejected input: a foveal::Error naming what was wrong, thrown before out or lse is touched.

// B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 7, D = 3, Dv = 6: every extent distinct where the
// messages must tell them apart.
constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kLenQ = 5, kLenK = 7, kDim = 3, kDimV = 6;
constexpr double kSentinel = 12345.0;

template <typename T>
class SlidingWindowErrors : public ::testing::Test {
 protected:
  // Buffers are twice the size the valid shapes need, so larger shapes stay inside them.
  SlidingWindowErrors()
      : q_storage_(2 * kBatch * kHeadsQ * kLenQ * kDim, T(0.5)),
        k_storage_(2 * kBatch * kHeadsKv * kLenK * kDim, T(0.25)),
        v_storage_(2 * kBatch * kHeadsKv * kLenK * kDimV, T(1)),
        bias_storage_(kBatch * kHeadsQ * kLenQ * kLenK, T(0)),
        out_storage_(2 * kBatch * kHeadsQ * kLenQ * kDimV, T(kSentinel)),
        lse_storage_(2 * kBatch * kHeadsQ * kLenQ, T(kSentinel)) {
    q = TensorView<const T, 4>(q_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDim});
    k = TensorView<const T, 4>(k_storage_.data(), {kBatch, kHeadsKv, kLenK, kDim});
    v = TensorView<const T, 4>(v_storage_.data(), {kBatch, kHeadsKv, kLenK, kDimV});
    out = TensorView<T, 4>(out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
    lse = TensorView<T, 3>(lse_storage_.data(), {kBatch, kHeadsQ, kLenQ});
    options.causal = true;
    options.window_left = 2;
  }

  void call() const { sliding_window_attention(q, k, v, out, options, lse); }

  // `rejected_call` (by default call()) throws foveal::Error naming every piece, and out and
  // lse keep their sentinel.
  template <typename Call>
  void expect_rejected(Call&& rejected_call, std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(test::throws_error_with(rejected_call, pieces));
    EXPECT_TRUE(untouched(out_storage_)) << "out was written before the error";
    EXPECT_TRUE(untouched(lse_storage_)) << "lse was written before the error";
  }
  void expect_rejected(std::initializer_list<std::string> pieces) {
    expect_rejected([&] { call(); }, pieces);
  }

  static bool untouched(const std::vector<T>& storage) {
    for (T value : storage)
      if (value != T(kSentinel)) return false;
    return true;
  }

  std::vector<T> q_storage_, k_storage_, v_storage_, bias_storage_, out_storage_, lse_storage_;
  TensorView<const T, 4> q, k, v;
  TensorView<T, 4> out;
  TensorView<T, 3> lse;
  AttentionOptions options;
};

TYPED_TEST_SUITE(SlidingWindowErrors, ElementTypes, ElementTypeNames);

TYPED_TEST(SlidingWindowErrors, ValidCallIsAccepted) {
  EXPECT_NO_THROW(this->call());
  EXPECT_FALSE(this->untouched(this->out_storage_));
}

TYPED_TEST(SlidingWindowErrors, UnboundedLeftWindowIsRejected) {
  this->options.window_left = -1;
  this->expect_rejected({"foveal: sliding_window_attention: ", "window_left must be >= 0", "got -1",
                         "for unbounded attention call foveal::attention"});
}

TYPED_TEST(SlidingWindowErrors, LeftWindowBelowMinusOneIsRejected) {
  this->options.window_left = -3;
  this->expect_rejected(
      {"foveal: sliding_window_attention: ", "window_left must be >= 0 or -1", "got -3"});
}

TYPED_TEST(SlidingWindowErrors, UnboundedRightSideIsRejected) {
  this->options.causal = false;
  this->options.window_right = -1;
  this->expect_rejected(
      {"foveal: sliding_window_attention: ", "the window's right side must be bounded",
       "causal = false and window_right = -1"});
}

TYPED_TEST(SlidingWindowErrors, CausalWithPositiveRightWindowIsRejected) {
  this->options.window_right = 3;
  this->expect_rejected(
      {"sliding_window_attention: ", "causal=true means window_right = 0", "window_right = 3"});
}

TYPED_TEST(SlidingWindowErrors, KeyBatchMustMatchQuery) {
  this->k =
      TensorView<const TypeParam, 4>(this->k_storage_.data(), {kBatch + 1, kHeadsKv, kLenK, kDim});
  this->expect_rejected(
      {"foveal: sliding_window_attention: ", "k.shape[0]", "q.shape[0] (B) = 2", "got 3"});
}

TYPED_TEST(SlidingWindowErrors, QueryHeadsMustBeAMultipleOfKeyHeads) {
  this->k = TensorView<const TypeParam, 4>(this->k_storage_.data(), {kBatch, 3, kLenK, kDim});
  this->v = TensorView<const TypeParam, 4>(this->v_storage_.data(), {kBatch, 3, kLenK, kDimV});
  this->expect_rejected(
      {"sliding_window_attention: ", "q.shape[1] (Hq = 4)", "multiple of k.shape[1] (Hkv = 3)"});
}

TYPED_TEST(SlidingWindowErrors, OutHeadDimMustMatchValue) {
  this->out =
      TensorView<TypeParam, 4>(this->out_storage_.data(), {kBatch, kHeadsQ, kLenQ, kDimV - 1});
  this->expect_rejected(
      {"sliding_window_attention: ", "out.shape[3]", "v.shape[3] (Dv) = 6", "got 5"});
}

TYPED_TEST(SlidingWindowErrors, QueryOffsetBelowMinusOneIsRejected) {
  this->options.q_offset = -3;
  this->expect_rejected(
      {"sliding_window_attention: ", "(the position of query 0) or -1", "got -3"});
}

TYPED_TEST(SlidingWindowErrors, RegistryKernelRejectsAnUnboundedWindowWhenMade) {
  for (Index window_left : {-1, -4}) {
    AttentionOptions options;
    options.causal = true;
    options.window_left = window_left;
    EXPECT_TRUE(test::throws_error_with(
        [&] {
          make_attention("sliding_window", AttentionConfig{options, {}});
        },
        {"make_attention(\"sliding_window\")", "window_left must be >= 0",
         test::describe("got ", window_left)}));
  }
  AttentionOptions right_unbounded;
  right_unbounded.window_left = 4;
  EXPECT_TRUE(test::throws_error_with(
      [&] {
        make_attention("sliding_window", AttentionConfig{right_unbounded, {}});
      },
      {"make_attention(\"sliding_window\")", "right side must be bounded"}));
}

TYPED_TEST(SlidingWindowErrors, RegistryKernelRejectsABias) {
  using T = TypeParam;
  const std::unique_ptr<AttentionKernel> kernel =
      make_attention("sliding_window", AttentionConfig{this->options, {}});
  AttentionArgs<T> args;
  args.q = this->q;
  args.k = this->k;
  args.v = this->v;
  args.out = this->out;
  args.lse = this->lse;
  args.bias = TensorView<const T, 4>(this->bias_storage_.data(), {kBatch, kHeadsQ, kLenQ, kLenK});
  this->expect_rejected([&] { kernel->forward(args); }, {"sliding_window: takes no bias"});
}

TYPED_TEST(SlidingWindowErrors, RegistryKernelRejectsParams) {
  EXPECT_TRUE(test::throws_error_with(
      [&] {
        make_attention("sliding_window", AttentionConfig{this->options, {{"window", "4"}}});
      },
      {"kernel 'sliding_window' takes no params", "'window'"}));
}

}  // namespace
}  // namespace foveal
