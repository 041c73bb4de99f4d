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
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/registry.hpp"
#include "foveal/attention/sliding_window.hpp"
#include "harness.hpp"

namespace foveal::test {
namespace {

// The tolerances are kTolerance, those of foveal::attention for the same engine: a key wrongly
// in or out of the window changes an output by O(1 / window), at least 1e-3 here, and misses
// them by orders of magnitude.

// What the sweeps draw from (kHeadDims and kGroupRatios besides), and the most query heads of
// a random MQA problem.
constexpr Index kLengths[] = {1, 2, 7, 13, 63, 64, 65, 127, 129, 200, 300};
constexpr Index kCausalWindows[] = {0, 1, 5, 63, 64, 65, 127, 128, 129, 200};
constexpr Index kRightWindows[] = {0, 1, 5, 64, 129};
constexpr Index kSinkCounts[] = {0, 1, 4, 130};
constexpr Index kMaxMqaHeads = 5;

// Random bounded-window options: a causal window or a two-sided one, sinks, sometimes a
// softcap, an explicit scale or an explicit q_offset.
AttentionOptions random_window_options(RandomSource& random, const Problem& p) {
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
// The entry points under test, called by run_entry (the problems here have no bias).

// foveal::sliding_window_attention.
struct SlidingWindowAttention {
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& /*bias*/) const {
    sliding_window_attention(q, k, v, out, options, lse);
  }
};

// make_attention("sliding_window", {options, {}})->forward.
struct RegistrySlidingWindow {
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& /*bias*/) const {
    const std::unique_ptr<AttentionKernel> kernel =
        make_attention("sliding_window", AttentionConfig{options, {}});
    EXPECT_EQ(kernel->name(), "sliding_window");
    AttentionArgs<T> args;
    args.q = q;
    args.k = k;
    args.v = v;
    args.out = out;
    args.lse = lse;
    kernel->forward(args);
  }
};

// sliding_window_attention<T> agrees with the float64 reference on out and lse.
template <typename T>
void expect_window_matches_reference(const Problem& p, const AttentionOptions& o) {
  expect_matches_reference<T>(SlidingWindowAttention{}, p, o);
}

template <typename T>
class SlidingWindow : public ::testing::Test {};
TYPED_TEST_SUITE(SlidingWindow, ElementTypes, ElementTypeNames);

// The shapes the option tests run on: option_problems with a square of 300 (past two key
// blocks) and a single query against 200 keys.
std::vector<Problem> option_problems(std::uint64_t seed) {
  return test::option_problems(seed, 300, 200);
}

// ---------------------------------------------------------------------------------------------
// Agreement with the reference.

TYPED_TEST(SlidingWindow, MatchesReferenceOnRandomShapesAndWindows) {
  for (std::uint64_t seed = 1000; seed < 1040; ++seed) {
    test::RandomSource random(seed + 7);  // a stream apart from the one that made the shapes
    const Problem p = random_problem(seed, 3e6, kLengths, kMaxMqaHeads);
    expect_window_matches_reference<TypeParam>(p, random_window_options(random, p));
  }
}

TYPED_TEST(SlidingWindow, MatchesReferenceForEveryCausalWindow) {
  for (Index window : kCausalWindows)
    for (const Problem& p : {make_problem(1, 4, 2, 129, 300, 16, 24, 2000),
                             make_problem(2, 2, 1, 200, 200, 5, 3, 2001)}) {
      AttentionOptions options;
      options.causal = true;
      options.window_left = window;
      expect_window_matches_reference<TypeParam>(p, options);
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
        expect_window_matches_reference<TypeParam>(p, options);
    }
}

// Variable-length batches: each row's window and sinks over its own keys.
TYPED_TEST(SlidingWindow, VariableLengthMatchesReference) {
  for (const Problem& p : {make_problem(4, 4, 2, 130, 200, 16, 16, 24000),
                           make_problem(3, 3, 1, 1, 129, 31, 8, 24001)})
    for (std::uint64_t draw = 0; draw < 4; ++draw) {
      const KeyRangeCase ranges = random_key_ranges(p.batch, p.len_k, p.seed * 8 + draw);
      AttentionOptions two_sided;
      two_sided.window_left = 33;
      two_sided.window_right = 5;
      for (const AttentionOptions& options : {causal_window(0), causal_window(40, 3), two_sided})
        expect_matches_reference<TypeParam>(SlidingWindowAttention{}, p,
                                            ranges.applied_to(options));
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
        expect_window_matches_reference<TypeParam>(p, options);
      options.causal = false;
      options.window_right = 3;
      expect_window_matches_reference<TypeParam>(make_problem(1, 2, 1, 129, 200, 8, 8, 4100),
                                                 options);
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
        expect_window_matches_reference<TypeParam>(p, options);
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
        expect_window_matches_reference<TypeParam>(p, options);
      }
}

TYPED_TEST(SlidingWindow, EveryGroupRatioAndMqaMatchReference) {
  AttentionOptions options;
  options.causal = true;
  options.window_left = 20;
  for (Index ratio : kGroupRatios)
    for (Index heads_kv : {1, 3})
      expect_window_matches_reference<TypeParam>(
          make_problem(2, heads_kv * ratio, heads_kv, 33, 70, 16, 16, 7000), options);
}

TYPED_TEST(SlidingWindow, EveryHeadDimPairMatchesReference) {
  AttentionOptions options;
  options.causal = true;
  options.window_left = 17;
  options.sink_tokens = 1;
  for (Index dim : kHeadDims)
    for (Index dim_v : kHeadDims)
      expect_window_matches_reference<TypeParam>(make_problem(1, 2, 1, 37, 70, dim, dim_v, 8000),
                                                 options);
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
    const Outputs got = run_entry<T>(SlidingWindowAttention{}, p, in, options);
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
          expect_identical(run_entry<TypeParam>(SlidingWindowAttention{}, p, in, windowed),
                           run_attention<TypeParam>(p, in, causal));
        }
  }
}

// ---------------------------------------------------------------------------------------------
// The same bits whichever way it is called.

TYPED_TEST(SlidingWindow, EqualsDenseAttentionWithTheSameOptionsBitwise) {
  for (std::uint64_t seed = 11000; seed < 11040; ++seed) {
    test::RandomSource random(seed + 7);
    const Problem p = random_problem(seed, 1e7, kLengths, kMaxMqaHeads);
    AttentionOptions options = random_window_options(random, p);
    options.num_threads = static_cast<int>(random.integer(1, 3));
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
    const Inputs in = random_inputs(p);
    expect_identical(run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options),
                     run_attention<TypeParam>(p, in, options));
  }
}

TYPED_TEST(SlidingWindow, RegistryKernelGivesIdenticalBits) {
  for (std::uint64_t seed = 12000; seed < 12010; ++seed) {
    test::RandomSource random(seed + 7);
    const Problem p = random_problem(seed, 1e7, kLengths, kMaxMqaHeads);
    const AttentionOptions options = random_window_options(random, p);
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
    const Inputs in = random_inputs(p);
    expect_identical(run_entry<TypeParam>(RegistrySlidingWindow{}, p, in, options),
                     run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options));
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
    const Outputs single = run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options);
    for (int threads : {2, 3}) {
      options.num_threads = threads;
      SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(options)));
      expect_identical(run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options), single);
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
  const Outputs with_lse = run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options, {}, true);
  const Outputs without_lse =
      run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options, {}, false);
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
  const Outputs contiguous =
      run_entry<TypeParam>(SlidingWindowAttention{}, p, in, layout_options());
  for (const Layouts& layouts : {Layouts::all(Layout::kSwapped12), Layouts::all(Layout::kPadded),
                                 Layouts::all(Layout::kReversed), mixed}) {
    SCOPED_TRACE(test::describe("q layout: ", test::layout_name(layouts.q),
                                ", k layout: ", test::layout_name(layouts.k)));
    expect_identical(
        run_entry<TypeParam>(SlidingWindowAttention{}, p, in, layout_options(), layouts),
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
    expect_identical(run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options,
                                          Layouts::all(Layout::kOddUnitStrides)),
                     run_entry<TypeParam>(SlidingWindowAttention{}, p, in, options));
  }
}

#ifdef _OPENMP
TYPED_TEST(SlidingWindow, CallsFromInsideAnOpenMPParallelRegionGiveTheBitsOfSerialCalls) {
  // One tile of one (batch, kv head): a single task, which runs on the calling thread.
  using T = TypeParam;
  const Problem p = make_problem(1, 2, 1, 20, 100, 64, 64, 17000);
  const Inputs in = random_inputs(p);
  const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()),
      v(in.v.begin(), in.v.end());
  const TensorView<const T, 4> q_view(q.data(), p.q_shape()), k_view(k.data(), p.k_shape()),
      v_view(v.data(), p.v_shape());
  expect_parallel_region_calls_give_serial_bits([&](int num_threads) {
    AttentionOptions options = causal_window(30);
    options.num_threads = num_threads;
    exit_with_calls_differing_inside_a_parallel_region<T>(
        p.out_shape(), [&](const TensorView<T, 4>& out) {
          sliding_window_attention(q_view, k_view, v_view, out, options);
        });
  });
}
#endif

// ---------------------------------------------------------------------------------------------
// Rejected input: a foveal::Error naming what was wrong, thrown before out or lse is touched.

// B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 7, D = 3, Dv = 6: every extent distinct where the
// messages must tell them apart.
constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kLenQ = 5, kLenK = 7, kDim = 3, kDimV = 6;

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
    EXPECT_TRUE(holds_sentinel(out_storage_)) << "out was written before the error";
    EXPECT_TRUE(holds_sentinel(lse_storage_)) << "lse was written before the error";
  }
  void expect_rejected(std::initializer_list<std::string> pieces) {
    expect_rejected([&] { call(); }, pieces);
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
  EXPECT_FALSE(holds_sentinel(this->out_storage_));
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
}  // namespace foveal::test
