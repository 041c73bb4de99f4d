// tests/cpp/test_attention_backward.cpp — the gradients of foveal::attention and
// foveal::sliding_window_attention (foveal/attention/backward.hpp).
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  out, grad_out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]   bias: [B or 1, Hq or 1, Lq, Lk]
//   ->  grad_q: [B, Hq, Lq, D]  grad_k: [B, Hkv, Lk, D]  grad_v: [B, Hkv, Lk, Dv]
//
// 1. AttentionBackwardReference: the float64 reference (reference/attention_backward_reference.hpp)
//    against central finite differences of the forward reference, one small case per option.
// 2. AttentionBackward / SlidingWindowBackward: the kernels against the reference over shapes
//    (1, primes, non-multiples of the engine's 64-row tiles and 128-key blocks), head dims, GQA
//    ratios and every option; rows that see no key; empty tensors.
// 3. Bitwise identical gradients for any thread count and for a second call.
// 4. Strided layouts ([B, L, H, D] memory seen through a transpose, padding, negative strides)
//    give the bits of contiguous tensors, and nothing outside the gradients is written.
// 5. AttentionBackwardErrors: every invalid argument throws foveal::Error naming it before any
//    gradient is written.
// The kernels' out and lse are those foveal::attention returns, as a training step passes them.
// Every typed test runs for float and double; every case prints its seed and shapes on failure.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/backward.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/core/parallel.hpp"
#include "harness.hpp"
#include "reference/attention_backward_reference.hpp"

namespace foveal::test {
namespace {

// Tolerances on the normalized error (max |got - ref| / max |ref|, per gradient).
// The backward chains more reductions than the forward (kTolerance: 2e-5 / 1e-10): dP sums Dv
// products, grad_k and grad_v then sum over every query row of a GQA group (up to Lq * 8 terms,
// thousands here), and dS = P (dP - D_i) keeps the difference of two O(|g| |v|) numbers, so
// their rounding errors land in full on a smaller result. P is recomputed from the forward's
// float lse (itself within 2e-5 of the reference) and D_i comes from the forward's float out.
// float: 1e-4, five times the forward's bound, still orders of magnitude below what a wrong
// mask, scale, softcap derivative or a missed GQA head gives (O(1) of the gradient's scale).
// double: 1e-9; every error source is ~1e-15 relative, and anything computed in float on the
// way (~1e-7) still fails.
template <typename T>
inline constexpr double kBackwardTolerance = std::is_same_v<T, float> ? 1e-4 : 1e-9;

// The lengths the sweeps draw from: 1, primes, and both sides of the 64-row tile and of the
// 128-key block.
constexpr Index kLengths[] = {1, 2, 7, 13, 63, 64, 65, 127, 128, 129, 200, 257};
constexpr Index kMaxMqaHeads = 6;

// ---------------------------------------------------------------------------------------------
// Gradients: the reference, and the kernels on inputs placed in any layout.

struct Gradients {
  std::vector<double> grad_q, grad_k, grad_v;  // logical row-major
};

// grad_out ~ N(0, 1) rounded to float, from a stream apart from the one random_inputs draws.
std::vector<double> random_grad_out(const Problem& p) {
  RandomSource random(p.seed ^ 0x9E3779B97F4A7C15ULL);
  return round_to<float>(random.normal(static_cast<std::size_t>(shape_numel<4>(p.out_shape()))));
}

reference::AttentionShape reference_shape(const Problem& p) {
  return {p.batch, p.heads_q, p.heads_kv, p.len_q, p.len_k, p.dim, p.dim_v};
}

// The float64 reference's gradients for `p` on `in` and `grad_out`.
Gradients reference_gradients(const Problem& p, const Inputs& in,
                              const std::vector<double>& grad_out, const AttentionOptions& o) {
  Gradients result;
  reference::attention_backward_reference(reference_shape(p), in.q, in.k, in.v, grad_out,
                                          reference_options(o), result.grad_q, result.grad_k,
                                          result.grad_v, in.bias, p.has_bias() ? p.bias_batch : 1,
                                          p.has_bias() ? p.bias_heads : 1);
  return result;
}

// Where each tensor of a backward call lives in memory.
struct BackwardLayouts {
  Layout q = Layout::kContiguous, k = Layout::kContiguous, v = Layout::kContiguous;
  Layout out = Layout::kContiguous, lse = Layout::kContiguous, grad_out = Layout::kContiguous;
  Layout bias = Layout::kContiguous;
  Layout grad_q = Layout::kContiguous, grad_k = Layout::kContiguous, grad_v = Layout::kContiguous;
  static BackwardLayouts all(Layout layout) {
    BackwardLayouts layouts;
    layouts.q = layouts.k = layouts.v = layouts.out = layouts.lse = layouts.grad_out = layout;
    layouts.bias = layouts.grad_q = layouts.grad_k = layouts.grad_v = layout;
    return layouts;
  }
};

// foveal::attention_backward as an entry point of run_backward.
struct DenseBackward {
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<const T, 4>& out,
                  const TensorView<const T, 3>& lse, const TensorView<const T, 4>& grad_out,
                  const TensorView<T, 4>& grad_q, const TensorView<T, 4>& grad_k,
                  const TensorView<T, 4>& grad_v, const AttentionOptions& options,
                  const TensorView<const T, 4>& bias) const {
    attention_backward(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, options, bias);
  }
};

// foveal::sliding_window_attention_backward as an entry point of run_backward (no bias).
struct SlidingWindowBackward {
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<const T, 4>& out,
                  const TensorView<const T, 3>& lse, const TensorView<const T, 4>& grad_out,
                  const TensorView<T, 4>& grad_q, const TensorView<T, 4>& grad_k,
                  const TensorView<T, 4>& grad_v, const AttentionOptions& options,
                  const TensorView<const T, 4>& bias) const {
    ASSERT_TRUE(bias.empty()) << "sliding_window_attention_backward takes no bias";
    sliding_window_attention_backward(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, options);
  }
};

// Runs `entry` `calls` times on T copies of the inputs, of the forward's `out` and `lse` and of
// `grad_out` placed as `layouts` (padding holds NaN), into gradients that start as `fill`
// (NaN by default: an element the kernel fails to write, or reads before writing, shows).
// Returns the gradients of the last call; fails the test if anything outside them changed.
template <typename T, typename Entry>
Gradients run_backward(const Entry& entry, const Problem& p, const Inputs& in,
                       const Outputs& forward, const std::vector<double>& grad_out,
                       const AttentionOptions& o, const BackwardLayouts& layouts = {},
                       int calls = 1, T fill = std::numeric_limits<T>::quiet_NaN()) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), layouts.q, nan);
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), layouts.k, nan);
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), layouts.v, nan);
  const StridedBuffer<T, 4> bias(in.bias, p.has_bias() ? p.bias_shape() : Shape<4>{}, layouts.bias,
                                 nan);
  const StridedBuffer<T, 4> out(forward.out, p.out_shape(), layouts.out, nan);
  const StridedBuffer<T, 3> lse(forward.lse, p.lse_shape(), layouts.lse, nan);
  const StridedBuffer<T, 4> g(grad_out, p.out_shape(), layouts.grad_out, nan);
  const StridedBuffer<T, 4> grad_q(p.q_shape(), layouts.grad_q, nan);
  const StridedBuffer<T, 4> grad_k(p.k_shape(), layouts.grad_k, nan);
  const StridedBuffer<T, 4> grad_v(p.v_shape(), layouts.grad_v, nan);
  for (const StridedBuffer<T, 4>* gradient : {&grad_q, &grad_k, &grad_v})
    for_each_element(gradient->view(), [&](T& element) { element = fill; });
  for (int call = 0; call < calls; ++call) {
    entry(q.const_view(), k.const_view(), v.const_view(), out.const_view(), lse.const_view(),
          g.const_view(), grad_q.view(), grad_k.view(), grad_v.view(), o,
          p.has_bias() ? bias.const_view() : TensorView<const T, 4>());
  }
  EXPECT_TRUE(grad_q.outside_untouched()) << "wrote outside grad_q";
  EXPECT_TRUE(grad_k.outside_untouched()) << "wrote outside grad_k";
  EXPECT_TRUE(grad_v.outside_untouched()) << "wrote outside grad_v";
  return {gather(grad_q.view()), gather(grad_k.view()), gather(grad_v.view())};
}

// foveal::attention<T>'s out and lse for `p` on `in`: what the backward is given.
template <typename T>
Outputs forward_outputs(const Problem& p, const Inputs& in, const AttentionOptions& o) {
  return run_attention<T>(p, in, o);
}

void expect_gradients_match(const Gradients& got, const Gradients& want, double tolerance) {
  EXPECT_TRUE(matches_reference(got.grad_q, want.grad_q, tolerance)) << "grad_q";
  EXPECT_TRUE(matches_reference(got.grad_k, want.grad_k, tolerance)) << "grad_k";
  EXPECT_TRUE(matches_reference(got.grad_v, want.grad_v, tolerance)) << "grad_v";
}

void expect_identical(const Gradients& got, const Gradients& want) {
  EXPECT_TRUE(bitwise_equal(got.grad_q, want.grad_q)) << "grad_q";
  EXPECT_TRUE(bitwise_equal(got.grad_k, want.grad_k)) << "grad_k";
  EXPECT_TRUE(bitwise_equal(got.grad_v, want.grad_v)) << "grad_v";
}

// `entry` on T agrees with the float64 reference on every gradient for the inputs of `p`.
template <typename T, typename Entry>
void expect_backward_matches_reference(const Entry& entry, const Problem& p,
                                       const AttentionOptions& o) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const Gradients want = reference_gradients(p, in, grad_out, o);
  const Gradients got = run_backward<T>(entry, p, in, forward_outputs<T>(p, in, o), grad_out, o);
  expect_gradients_match(got, want, kBackwardTolerance<T>);
}

template <typename T>
void expect_backward_matches_reference(const Problem& p, const AttentionOptions& o) {
  expect_backward_matches_reference<T>(DenseBackward{}, p, o);
}

// ---------------------------------------------------------------------------------------------
// 1. The reference against central finite differences of the forward reference.

// f(q, k, v) = sum(grad_out * out): the scalar whose gradient is the vector-Jacobian product.
double weighted_output(const Problem& p, const Inputs& in, const std::vector<double>& grad_out,
                       const AttentionOptions& o) {
  const Outputs forward = reference_outputs(p, in, o);
  double sum = 0;
  for (std::size_t index = 0; index < grad_out.size(); ++index)
    sum += grad_out[index] * forward.out[index];
  return sum;
}

// The gradients of weighted_output by central differences (f(x + h) - f(x - h)) / 2h, one
// input element at a time. h = 1e-5: truncation ~h^2 |f'''| ~ 1e-10, rounding ~1e-16 |f| / h
// ~ 1e-10 for the small cases here.
Gradients finite_difference_gradients(const Problem& p, const Inputs& in,
                                      const std::vector<double>& grad_out,
                                      const AttentionOptions& o) {
  constexpr double kStep = 1e-5;
  Inputs moved = in;
  const auto differentiate = [&](std::vector<double>& values) {
    return central_differences(values, kStep,
                               [&] { return weighted_output(p, moved, grad_out, o); });
  };
  Gradients result;
  result.grad_q = differentiate(moved.q);
  result.grad_k = differentiate(moved.k);
  result.grad_v = differentiate(moved.v);
  return result;
}

// The reference's gradients agree with finite differences to 1e-7 of their scale (the finite
// differences' own error is ~1e-10 of it; a wrong term of the chain rule is O(1)).
void expect_reference_matches_finite_differences(const Problem& p, const AttentionOptions& o) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const Gradients analytic = reference_gradients(p, in, grad_out, o);
  const Gradients numeric = finite_difference_gradients(p, in, grad_out, o);
  expect_gradients_match(analytic, numeric, 1e-7);
  // The case must exercise something: a gradient of exact zeros would match zeros trivially.
  for (const std::vector<double>* gradient : {&analytic.grad_q, &analytic.grad_k, &analytic.grad_v})
    EXPECT_GT(max_normalized_error(*gradient, std::vector<double>(gradient->size(), 0.0)).value,
              1e-3);
}

// Rows (b, h, i) that see no key: the reference gives grad_q = 0 there exactly, and keys
// that no row of a kv head sees get grad_k = grad_v = 0 exactly.
void expect_unseen_rows_and_keys_give_exact_zeros(const Problem& p, const AttentionOptions& o,
                                                  const Gradients& gradients, Index* empty_rows,
                                                  Index* unseen_keys) {
  const reference::ReferenceOptions ro = reference_options(o);
  const Index q_offset = o.q_offset >= 0 ? o.q_offset : p.len_k - p.len_q;
  const Index group = p.heads_q / p.heads_kv;
  *empty_rows = *unseen_keys = 0;
  for (Index b = 0; b < p.batch; ++b) {
    for (Index h = 0; h < p.heads_q; ++h)
      for (Index i = 0; i < p.len_q; ++i) {
        bool sees = false;
        for (Index j = 0; j < p.len_k; ++j) sees |= reference::reference_sees(ro, q_offset + i, j);
        if (sees) continue;
        ++*empty_rows;
        for (Index d = 0; d < p.dim; ++d)
          ASSERT_EQ(gradients.grad_q[((b * p.heads_q + h) * p.len_q + i) * p.dim + d], 0.0);
      }
    for (Index hk = 0; hk < p.heads_kv; ++hk)
      for (Index j = 0; j < p.len_k; ++j) {
        bool seen = false;
        for (Index i = 0; i < p.len_q; ++i) seen |= reference::reference_sees(ro, q_offset + i, j);
        if (seen || group == 0) continue;
        ++*unseen_keys;
        const Index key = (b * p.heads_kv + hk) * p.len_k + j;
        for (Index d = 0; d < p.dim; ++d) ASSERT_EQ(gradients.grad_k[key * p.dim + d], 0.0);
        for (Index d = 0; d < p.dim_v; ++d) ASSERT_EQ(gradients.grad_v[key * p.dim_v + d], 0.0);
      }
  }
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithoutOptions) {
  expect_reference_matches_finite_differences(make_problem(2, 2, 2, 5, 7, 3, 4, 100), {});
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithExplicitScale) {
  AttentionOptions options;
  options.scale = 0.7;
  expect_reference_matches_finite_differences(make_problem(1, 2, 1, 4, 6, 5, 3, 101), options);
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWhenCausal) {
  // Lq > Lk: the first two queries precede every key and see nothing.
  AttentionOptions options;
  options.causal = true;
  const Problem p = make_problem(1, 2, 1, 7, 5, 3, 3, 102);
  expect_reference_matches_finite_differences(p, options);
  Index empty_rows = 0, unseen_keys = 0;
  expect_unseen_rows_and_keys_give_exact_zeros(
      p, options, reference_gradients(p, random_inputs(p), random_grad_out(p), options),
      &empty_rows, &unseen_keys);
  EXPECT_EQ(empty_rows, 2 * 2);
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithAWindow) {
  AttentionOptions options;
  options.window_left = 2;
  options.window_right = 1;
  expect_reference_matches_finite_differences(make_problem(1, 2, 2, 6, 9, 3, 2, 103), options);
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithSinks) {
  AttentionOptions options = causal_window(1, 2);
  expect_reference_matches_finite_differences(make_problem(1, 1, 1, 8, 8, 3, 3, 104), options);
  options = AttentionOptions{};
  options.window_left = 0;
  options.window_right = 0;
  options.sink_tokens = 3;
  expect_reference_matches_finite_differences(make_problem(1, 2, 1, 6, 7, 2, 3, 105), options);
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithASoftcap) {
  // A small cap with a large scale saturates the tanh (derivative far from 1); a large cap
  // barely bends it.
  for (double softcap : {0.6, 5.0}) {
    AttentionOptions options;
    options.softcap = softcap;
    options.scale = 1.5;
    expect_reference_matches_finite_differences(make_problem(1, 2, 1, 5, 6, 4, 3, 106), options);
  }
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithABias) {
  // Broadcast over batch, per head, with -inf entries; then per batch, broadcast over heads,
  // with a softcap before the bias.
  expect_reference_matches_finite_differences(
      with_bias(make_problem(2, 2, 1, 5, 6, 3, 3, 107), 1, 2, 0.3), {});
  AttentionOptions options;
  options.softcap = 1.0;
  options.causal = true;
  expect_reference_matches_finite_differences(
      with_bias(make_problem(2, 2, 2, 4, 6, 3, 2, 108), 2, 1, 0.2), options);
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithGroupedQueryHeads) {
  // GQA (3 query heads per kv head) and MQA: grad_k and grad_v sum over the group.
  expect_reference_matches_finite_differences(make_problem(1, 6, 2, 4, 5, 3, 2, 109), {});
  AttentionOptions options;
  options.causal = true;
  expect_reference_matches_finite_differences(make_problem(2, 3, 1, 3, 5, 2, 3, 110), options);
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithValueDimOtherThanKeyDim) {
  expect_reference_matches_finite_differences(make_problem(1, 2, 1, 4, 5, 3, 1, 111), {});
  expect_reference_matches_finite_differences(make_problem(1, 2, 1, 4, 5, 1, 5, 112), {});
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithAnExplicitQueryOffset) {
  // q_offset = 0 with causal: the last keys are seen by no query (grad_k = grad_v = 0 there).
  const Problem p = make_problem(1, 2, 1, 4, 8, 3, 3, 113);
  AttentionOptions options;
  options.causal = true;
  options.q_offset = 0;
  expect_reference_matches_finite_differences(p, options);
  Index empty_rows = 0, unseen_keys = 0;
  expect_unseen_rows_and_keys_give_exact_zeros(
      p, options, reference_gradients(p, random_inputs(p), random_grad_out(p), options),
      &empty_rows, &unseen_keys);
  EXPECT_EQ(unseen_keys, 4);
  // Queries past the last key with a left window: the last rows see nothing.
  options = AttentionOptions{};
  options.q_offset = 5;
  options.window_left = 2;
  options.window_right = 0;
  const Problem late = make_problem(1, 1, 1, 6, 7, 3, 2, 114);
  expect_reference_matches_finite_differences(late, options);
  expect_unseen_rows_and_keys_give_exact_zeros(
      late, options, reference_gradients(late, random_inputs(late), random_grad_out(late), options),
      &empty_rows, &unseen_keys);
  EXPECT_EQ(empty_rows, 2);  // positions 9 and 10 would see keys >= 7: none
}

TEST(AttentionBackwardReference, MatchesFiniteDifferencesWithEveryOptionAtOnce) {
  AttentionOptions options = causal_window(2, 1);
  options.scale = 0.8;
  options.softcap = 2.0;
  options.q_offset = 1;
  expect_reference_matches_finite_differences(
      with_bias(make_problem(2, 4, 2, 5, 7, 3, 4, 115), 1, 4, 0.2), options);
}

// ---------------------------------------------------------------------------------------------
// 2. The kernels against the reference.

template <typename T>
class AttentionBackward : public ::testing::Test {};
TYPED_TEST_SUITE(AttentionBackward, ElementTypes, ElementTypeNames);

// The shapes option tests run on (attention_cases.hpp): GQA with Lq < Lk, MQA with Lq > Lk,
// a 130 x 130 square with Dv < D and a single query against 257 keys (three key blocks).
std::vector<Problem> option_problems(std::uint64_t seed) {
  return test::option_problems(seed, 130, 257);
}

TYPED_TEST(AttentionBackward, MatchesReferenceOnRandomShapes) {
  for (std::uint64_t seed = 1000; seed < 1040; ++seed)
    expect_backward_matches_reference<TypeParam>(random_problem(seed, 4e6, kLengths, kMaxMqaHeads),
                                                 AttentionOptions{});
}

TYPED_TEST(AttentionBackward, MatchesReferenceForEveryLengthPair) {
  for (bool causal : {false, true})
    for (Index len_q : kLengths)
      for (Index len_k : kLengths) {
        AttentionOptions options;
        options.causal = causal;
        expect_backward_matches_reference<TypeParam>(
            make_problem(1, 3, 1, len_q, len_k, 5, 7, 2000), options);
      }
}

TYPED_TEST(AttentionBackward, MatchesReferenceForEveryHeadDimPair) {
  for (Index dim : kHeadDims)
    for (Index dim_v : kHeadDims)
      expect_backward_matches_reference<TypeParam>(make_problem(1, 2, 1, 37, 70, dim, dim_v, 3000),
                                                   AttentionOptions{});
}

TYPED_TEST(AttentionBackward, MatchesReferenceForEveryGroupRatio) {
  for (Index ratio : kGroupRatios)
    for (Index heads_kv : {1, 2, 3}) {
      AttentionOptions options;
      options.causal = ratio % 2 == 0;
      expect_backward_matches_reference<TypeParam>(
          make_problem(2, heads_kv * ratio, heads_kv, 33, 130, 16, 16, 4000), options);
    }
}

TYPED_TEST(AttentionBackward, ExplicitScaleMatchesReference) {
  for (float scale : {0.05f, 0.3f, 1.0f, 2.5f}) {
    AttentionOptions options;
    options.scale = scale;
    for (const Problem& p : option_problems(5000))
      expect_backward_matches_reference<TypeParam>(p, options);
  }
}

TYPED_TEST(AttentionBackward, CausalMatchesReference) {
  AttentionOptions options;
  options.causal = true;
  for (const Problem& p : option_problems(6000))
    expect_backward_matches_reference<TypeParam>(p, options);
}

TYPED_TEST(AttentionBackward, WindowMatchesReference) {
  const std::vector<Problem> problems = {make_problem(1, 2, 1, 129, 200, 8, 8, 7000),
                                         make_problem(2, 2, 2, 65, 63, 8, 3, 7001)};
  for (Index left : {-1, 0, 1, 5, 64, 300})
    for (Index right : {-1, 0, 1, 5, 128, 300}) {
      AttentionOptions options;
      options.window_left = left;
      options.window_right = right;
      for (const Problem& p : problems) expect_backward_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(AttentionBackward, CausalSlidingWindowMatchesReference) {
  for (Index left : {0, 1, 5, 127, 128, 300})
    for (const Problem& p : option_problems(7100))
      expect_backward_matches_reference<TypeParam>(p, causal_window(left));
}

TYPED_TEST(AttentionBackward, SinkTokensMatchReference) {
  struct Window {
    bool causal;
    Index left, right;
  };
  for (Index sinks : {0, 1, 4, 130, 1000})
    for (const Window& window : {Window{false, -1, -1}, Window{true, -1, -1}, Window{true, 5, -1},
                                 Window{false, 0, 0}, Window{false, 3, 2}}) {
      AttentionOptions options;
      options.sink_tokens = sinks;
      options.causal = window.causal;
      options.window_left = window.left;
      options.window_right = window.right;
      for (const Problem& p : {make_problem(1, 2, 1, 100, 150, 8, 8, 8000),
                               make_problem(2, 1, 1, 130, 65, 4, 9, 8001)})
        expect_backward_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(AttentionBackward, SoftcapMatchesReference) {
  for (float softcap : {0.5f, 2.0f, 30.0f})
    for (float scale : {0.0f, 1.5f}) {
      AttentionOptions options;
      options.softcap = softcap;
      options.scale = scale;
      for (const Problem& p : option_problems(9000))
        expect_backward_matches_reference<TypeParam>(p, options);
    }
}

TYPED_TEST(AttentionBackward, ExplicitQueryOffsetMatchesReference) {
  for (const Problem& p : option_problems(10000)) {
    std::vector<Index> offsets = {0, 1, p.len_k / 2, p.len_k};
    if (p.len_k >= p.len_q) offsets.push_back(p.len_k - p.len_q);
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
        expect_backward_matches_reference<TypeParam>(p, options);
      }
  }
}

TYPED_TEST(AttentionBackward, BiasBroadcastsOverBatchAndHeads) {
  const Problem base = make_problem(2, 4, 2, 70, 130, 12, 10, 11000);
  for (Index bias_batch : {Index{1}, base.batch})
    for (Index bias_heads : {Index{1}, base.heads_q})
      for (bool causal : {false, true}) {
        AttentionOptions options;
        options.causal = causal;
        expect_backward_matches_reference<TypeParam>(with_bias(base, bias_batch, bias_heads),
                                                     options);
      }
}

TYPED_TEST(AttentionBackward, NegativeInfinityBiasEntriesGetNoGradient) {
  const Problem base = make_problem(2, 3, 1, 66, 131, 9, 9, 12000);
  for (double masked_share : {0.3, 0.9, 0.99})
    for (Index bias_heads : {Index{1}, base.heads_q}) {
      AttentionOptions options;
      options.softcap = 4;
      expect_backward_matches_reference<TypeParam>(with_bias(base, 2, bias_heads, masked_share),
                                                   options);
    }
}

TYPED_TEST(AttentionBackward, RandomOptionCombinationsMatchReference) {
  for (std::uint64_t seed = 13000; seed < 13060; ++seed) {
    RandomSource random(seed + 1);  // a stream apart from the one that made the shapes
    Problem p = random_problem(seed, 2e6, kLengths, kMaxMqaHeads);
    if (random.chance(0.5)) {
      p = with_bias(p, random.pick({Index{1}, p.batch}), random.pick({Index{1}, p.heads_q}),
                    random.pick({0.0, 0.0, 0.2}));
    }
    AttentionOptions options;
    options.scale = random.pick({0.0f, 0.2f, 0.9f});
    options.causal = random.chance(0.4);
    const Index windows[] = {-1, -1, 0, 1, 5, 63, 64, 127, 128, 1000};
    options.window_left = random.pick(windows);
    options.window_right =
        options.causal ? random.pick({Index{-1}, Index{0}}) : random.pick(windows);
    options.sink_tokens = random.pick({Index{0}, Index{0}, Index{1}, Index{4}, p.len_k + 3});
    options.softcap = random.pick({0.0f, 0.0f, 3.0f, 20.0f});
    options.q_offset = random.chance(0.5) ? -1 : random.integer(0, p.len_k);
    expect_backward_matches_reference<TypeParam>(p, options);
  }
}

TYPED_TEST(AttentionBackward, InputsSharingMemoryAreAccepted) {
  // Self-attention on one tensor: q, k and v are the same memory (only the gradients must not
  // overlap anything). The gradients are still those of each argument on its own.
  using T = TypeParam;
  const Problem p = make_problem(2, 3, 3, 70, 70, 16, 16, 13500);
  Inputs in = random_inputs(p);
  in.k = in.q;
  in.v = in.q;
  AttentionOptions options;
  options.causal = true;
  const std::vector<double> grad_out = random_grad_out(p);
  const Outputs forward = forward_outputs<T>(p, in, options);
  const std::vector<T> x(in.q.begin(), in.q.end());
  const std::vector<T> out(forward.out.begin(), forward.out.end());
  const std::vector<T> lse(forward.lse.begin(), forward.lse.end());
  const std::vector<T> g(grad_out.begin(), grad_out.end());
  Tensor<T, 4> grad_q(p.q_shape()), grad_k(p.k_shape()), grad_v(p.v_shape());
  const TensorView<const T, 4> x_view(x.data(), p.q_shape());
  attention_backward(x_view, x_view, x_view, TensorView<const T, 4>(out.data(), p.out_shape()),
                     TensorView<const T, 3>(lse.data(), p.lse_shape()),
                     TensorView<const T, 4>(g.data(), p.out_shape()), grad_q.view(), grad_k.view(),
                     grad_v.view(), options);
  expect_gradients_match({gather(grad_q.view()), gather(grad_k.view()), gather(grad_v.view())},
                         reference_gradients(p, in, grad_out, options), kBackwardTolerance<T>);
}

// ---------------------------------------------------------------------------------------------
// Rows that see no key contribute nothing; keys no row sees get zero gradients.

// With inputs `in`, the rows (b, h, i) for which `masked(b, h, i)` holds get grad_q = 0
// exactly, changing their grad_out changes no bit of any gradient, and everything agrees with
// the reference.
template <typename T, typename Masked>
void expect_masked_rows_contribute_nothing(const Problem& p, const Inputs& in,
                                           const AttentionOptions& o, Masked&& masked) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o)));
  const std::vector<double> grad_out = random_grad_out(p);
  const Outputs forward = forward_outputs<T>(p, in, o);
  const Gradients got = run_backward<T>(DenseBackward{}, p, in, forward, grad_out, o);
  expect_gradients_match(got, reference_gradients(p, in, grad_out, o), kBackwardTolerance<T>);
  std::vector<double> other_grad_out = grad_out;
  Index masked_rows = 0;
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads_q; ++h)
      for (Index i = 0; i < p.len_q; ++i) {
        if (!masked(b, h, i)) continue;
        ++masked_rows;
        const Index row = (b * p.heads_q + h) * p.len_q + i;
        ASSERT_EQ(forward.lse[row], -kInfinity) << "row b=" << b << " h=" << h << " i=" << i;
        for (Index d = 0; d < p.dim; ++d)
          ASSERT_EQ(got.grad_q[row * p.dim + d], 0.0)
              << "grad_q row b=" << b << " h=" << h << " i=" << i << " d=" << d;
        for (Index d = 0; d < p.dim_v; ++d) other_grad_out[row * p.dim_v + d] = 1e6 * (d + 1);
      }
  EXPECT_GT(masked_rows, 0) << "the case masks no row";
  expect_identical(run_backward<T>(DenseBackward{}, p, in, forward, other_grad_out, o), got);
}

TYPED_TEST(AttentionBackward, CausalRowsBeforeTheFirstKeyContributeNothing) {
  const Problem p = make_problem(2, 2, 1, 100, 30, 8, 6, 15000);
  AttentionOptions options;
  options.causal = true;
  expect_masked_rows_contribute_nothing<TypeParam>(
      p, random_inputs(p), options, [&](Index, Index, Index i) { return i < p.len_q - p.len_k; });
}

TYPED_TEST(AttentionBackward, RowsWhoseWindowStartsPastTheLastKeyContributeNothing) {
  const Problem p = make_problem(1, 2, 1, 90, 20, 5, 5, 16100);
  AttentionOptions options;
  options.window_left = 5;
  options.q_offset = 10;  // query i sees keys >= 5 + i: none once i >= 15
  expect_masked_rows_contribute_nothing<TypeParam>(p, random_inputs(p), options,
                                                   [&](Index, Index, Index i) { return i >= 15; });
}

TYPED_TEST(AttentionBackward, AllNegativeInfinityBiasRowsContributeNothing) {
  const Problem p = with_bias(make_problem(2, 2, 1, 70, 140, 8, 6, 17000), 2, 2);
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
  expect_masked_rows_contribute_nothing<TypeParam>(p, in, options, masked);
}

TYPED_TEST(AttentionBackward, KeysNoQuerySeesGetZeroGradients) {
  // Top-left causal with Lk > Lq: keys Lq .. Lk - 1 (two whole 128-key blocks among them) are
  // seen by no query; their grad_k and grad_v must be written as exact zeros (the buffers start
  // as NaN).
  using T = TypeParam;
  const Problem p = make_problem(2, 4, 2, 40, 300, 8, 7, 17500);
  AttentionOptions options;
  options.causal = true;
  options.q_offset = 0;
  const Inputs in = random_inputs(p);
  const Gradients got = run_backward<T>(DenseBackward{}, p, in, forward_outputs<T>(p, in, options),
                                        random_grad_out(p), options);
  for (Index bh = 0; bh < p.batch * p.heads_kv; ++bh)
    for (Index j = p.len_q; j < p.len_k; ++j) {
      for (Index d = 0; d < p.dim; ++d)
        ASSERT_EQ(got.grad_k[(bh * p.len_k + j) * p.dim + d], 0.0) << "key " << j;
      for (Index d = 0; d < p.dim_v; ++d)
        ASSERT_EQ(got.grad_v[(bh * p.len_k + j) * p.dim_v + d], 0.0) << "key " << j;
    }
}

TYPED_TEST(AttentionBackward, ZeroWindowGivesTheValueGradientOfACopy) {
  // Window (0, 0): query i sees only key pos(i), so P = [1]: grad_v[pos(i)] is the sum of the
  // group's grad_out rows and grad_q = grad_k = 0 (dS = 1 * (g.v - g.out) with out = v).
  const Problem p = make_problem(2, 4, 2, 40, 70, 12, 9, 24000);
  AttentionOptions options;
  options.window_left = 0;
  options.window_right = 0;
  expect_backward_matches_reference<TypeParam>(p, options);
}

// ---------------------------------------------------------------------------------------------
// Empty tensors are valid input.

TYPED_TEST(AttentionBackward, EmptyQueriesGiveZeroKeyAndValueGradients) {
  using T = TypeParam;
  const Problem p = make_problem(2, 4, 2, 0, 9, 8, 5, 0);
  const Inputs in = random_inputs(p);
  const Gradients got = run_backward<T>(DenseBackward{}, p, in, Outputs{}, {}, AttentionOptions{});
  EXPECT_TRUE(got.grad_q.empty());
  for (double value : got.grad_k) ASSERT_EQ(value, 0.0);
  for (double value : got.grad_v) ASSERT_EQ(value, 0.0);
}

TYPED_TEST(AttentionBackward, EmptyKeysGiveZeroQueryGradients) {
  using T = TypeParam;
  const Problem p = make_problem(2, 4, 2, 70, 0, 8, 5, 0);
  const Inputs in = random_inputs(p);
  for (bool causal : {false, true}) {
    SCOPED_TRACE(describe("causal=", causal));
    AttentionOptions options;
    options.causal = causal;
    options.sink_tokens = 4;
    const Outputs forward = forward_outputs<T>(p, in, options);
    const Gradients got =
        run_backward<T>(DenseBackward{}, p, in, forward, random_grad_out(p), options);
    for (double value : got.grad_q) ASSERT_EQ(value, 0.0);
    EXPECT_TRUE(got.grad_k.empty());
    EXPECT_TRUE(got.grad_v.empty());
  }
}

TYPED_TEST(AttentionBackward, EmptyValueRowsGiveZeroGradients) {
  // Dv = 0: out and grad_out have no elements, so grad_out . v = 0 and every gradient is 0.
  // Regression: dP = dO·vᵀ was an empty sum left unwritten, so the scratch held what an earlier
  // call left there; the call with Dv = 5 first leaves such values in freed memory.
  using T = TypeParam;
  AttentionOptions options;
  options.causal = true;
  const Problem earlier = make_problem(2, 2, 1, 70, 40, 8, 5, 22001);
  const Inputs earlier_in = random_inputs(earlier);
  run_backward<T>(DenseBackward{}, earlier, earlier_in,
                  forward_outputs<T>(earlier, earlier_in, options), random_grad_out(earlier),
                  options);
  const Problem p = make_problem(2, 2, 1, 70, 40, 8, 0, 22000);
  const Inputs in = random_inputs(p);
  const Gradients got =
      run_backward<T>(DenseBackward{}, p, in, forward_outputs<T>(p, in, options), {}, options);
  for (double value : got.grad_q) ASSERT_EQ(value, 0.0);
  for (double value : got.grad_k) ASSERT_EQ(value, 0.0);
  EXPECT_TRUE(got.grad_v.empty());
}

TYPED_TEST(AttentionBackward, EmptyBatchAndZeroHeadsAreAccepted) {
  using T = TypeParam;
  for (const Problem& p :
       {make_problem(0, 4, 2, 9, 11, 8, 8, 0), make_problem(2, 0, 2, 9, 11, 8, 8, 0),
        make_problem(2, 0, 0, 9, 11, 8, 8, 0)}) {
    SCOPED_TRACE(problem_string(p));
    Tensor<T, 4> q(p.q_shape()), k(p.k_shape()), v(p.v_shape()), out(p.out_shape()),
        grad_out(p.out_shape()), grad_q(p.q_shape()), grad_k(p.k_shape()), grad_v(p.v_shape());
    Tensor<T, 3> lse(p.lse_shape());
    EXPECT_NO_THROW(attention_backward(q.view(), k.view(), v.view(), out.view(), lse.view(),
                                       grad_out.view(), grad_q.view(), grad_k.view(),
                                       grad_v.view()));
    for (double value : gather(grad_k.view())) ASSERT_EQ(value, 0.0);
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Thread count and repeated calls never change a bit.

// A case with several tiles and key blocks per (batch, kv head), GQA, a bias and a window.
Problem thread_problem() {
  return with_bias(make_problem(2, 4, 2, 200, 300, 32, 16, 20000), 1, 4, 0.05);
}

AttentionOptions thread_options() {
  AttentionOptions options = causal_window(150, 3);
  options.softcap = 10;
  return options;
}

TYPED_TEST(AttentionBackward, IdenticalBitsForAnyPerCallThreadCount) {
  using T = TypeParam;
  const Problem p = thread_problem();
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  AttentionOptions options = thread_options();
  const Outputs forward = forward_outputs<T>(p, in, options);
  options.num_threads = 1;
  const Gradients single = run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options);
  for (int threads : {2, 3, 0}) {
    SCOPED_TRACE(describe("num_threads=", threads));
    options.num_threads = threads;
    expect_identical(run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options), single);
  }
}

TYPED_TEST(AttentionBackward, IdenticalBitsForAnyGlobalThreadCount) {
  using T = TypeParam;
  const DefaultThreadsOnExit restore_default;
  const Problem p = make_problem(3, 3, 1, 130, 200, 20, 20, 21000);
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  AttentionOptions options;  // num_threads = 0: the global setting
  options.sink_tokens = 5;
  const Outputs forward = forward_outputs<T>(p, in, options);
  set_num_threads(1);
  const Gradients single = run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options);
  for (int threads : {2, 3}) {
    SCOPED_TRACE(describe("set_num_threads(", threads, ")"));
    set_num_threads(threads);
    expect_identical(run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options), single);
  }
}

TYPED_TEST(AttentionBackward, SecondCallGivesIdenticalBits) {
  // The gradients are overwritten, never accumulated: a second call into buffers that hold the
  // first call's results, or a call into buffers holding garbage, gives the bits of the first.
  using T = TypeParam;
  const Problem p = thread_problem();
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  AttentionOptions options = thread_options();
  options.num_threads = 3;
  const Outputs forward = forward_outputs<T>(p, in, options);
  const Gradients first = run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options);
  expect_identical(run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options, {}, 2),
                   first);
  expect_identical(
      run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options, {}, 1, T(-7.5)), first);
}

#ifdef _OPENMP
TYPED_TEST(AttentionBackward, CallsFromInsideAnOpenMPParallelRegionGiveTheBitsOfSerialCalls) {
  using T = TypeParam;
  const Problem p = make_problem(1, 2, 1, 70, 150, 16, 16, 20500);
  const Inputs in = random_inputs(p);
  AttentionOptions forward_options;
  forward_options.causal = true;
  const Outputs forward = forward_outputs<T>(p, in, forward_options);
  const std::vector<double> grad_out = random_grad_out(p);
  const std::vector<T> q(in.q.begin(), in.q.end()), k(in.k.begin(), in.k.end()),
      v(in.v.begin(), in.v.end()), out(forward.out.begin(), forward.out.end()),
      lse(forward.lse.begin(), forward.lse.end()), g(grad_out.begin(), grad_out.end());
  expect_parallel_region_calls_give_serial_bits([&](int num_threads) {
    AttentionOptions options = forward_options;
    options.num_threads = num_threads;
    // The calls' grad_q is compared; grad_k and grad_v go to buffers of each call's own.
    exit_with_calls_differing_inside_a_parallel_region<T>(
        p.q_shape(), [&](const TensorView<T, 4>& grad_q) {
          Tensor<T, 4> grad_k(p.k_shape()), grad_v(p.v_shape());
          attention_backward(TensorView<const T, 4>(q.data(), p.q_shape()),
                             TensorView<const T, 4>(k.data(), p.k_shape()),
                             TensorView<const T, 4>(v.data(), p.v_shape()),
                             TensorView<const T, 4>(out.data(), p.out_shape()),
                             TensorView<const T, 3>(lse.data(), p.lse_shape()),
                             TensorView<const T, 4>(g.data(), p.out_shape()), grad_q, grad_k.view(),
                             grad_v.view(), options);
        });
  });
}
#endif

// ---------------------------------------------------------------------------------------------
// 4. Strided tensors give the same bits as contiguous ones.

// A case that exercises every tensor: GQA, bias, causal with sinks and a softcap.
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

template <typename T>
void expect_layouts_give_identical_bits(const Problem& p, const AttentionOptions& o,
                                        const BackwardLayouts& layouts) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const Outputs forward = forward_outputs<T>(p, in, o);
  expect_identical(run_backward<T>(DenseBackward{}, p, in, forward, grad_out, o, layouts),
                   run_backward<T>(DenseBackward{}, p, in, forward, grad_out, o));
}

TYPED_TEST(AttentionBackward, BlhdMemoryViewedThroughTransposeGivesIdenticalBits) {
  expect_layouts_give_identical_bits<TypeParam>(layout_problem(), layout_options(),
                                                BackwardLayouts::all(Layout::kSwapped12));
}

TYPED_TEST(AttentionBackward, PaddedRowStridesGiveIdenticalBits) {
  expect_layouts_give_identical_bits<TypeParam>(layout_problem(), layout_options(),
                                                BackwardLayouts::all(Layout::kPadded));
}

TYPED_TEST(AttentionBackward, NegativeStridesGiveIdenticalBits) {
  expect_layouts_give_identical_bits<TypeParam>(layout_problem(), layout_options(),
                                                BackwardLayouts::all(Layout::kReversed));
}

TYPED_TEST(AttentionBackward, MixedLayoutsGiveIdenticalBits) {
  BackwardLayouts layouts;
  layouts.q = Layout::kSwapped12;
  layouts.k = Layout::kPadded;
  layouts.v = Layout::kReversed;
  layouts.out = Layout::kPadded;
  layouts.lse = Layout::kSwapped12;  // lse, like bias, is read element by element: any stride
  layouts.grad_out = Layout::kReversed;
  layouts.bias = Layout::kReversed;
  layouts.grad_q = Layout::kPadded;
  layouts.grad_k = Layout::kSwapped12;
  layouts.grad_v = Layout::kReversed;
  expect_layouts_give_identical_bits<TypeParam>(layout_problem(), layout_options(), layouts);
}

TYPED_TEST(AttentionBackward, SizeOneDimensionsAcceptAnyStride) {
  for (const Problem& p : {with_bias(make_problem(1, 1, 1, 1, 37, 1, 1, 19000), 1, 1),
                           with_bias(make_problem(1, 1, 1, 40, 1, 5, 1, 19001), 1, 1),
                           make_problem(1, 1, 1, 3, 70, 1, 1, 19002)})
    expect_layouts_give_identical_bits<TypeParam>(p, AttentionOptions{},
                                                  BackwardLayouts::all(Layout::kOddUnitStrides));
}

// ---------------------------------------------------------------------------------------------
// sliding_window_attention_backward.

template <typename T>
class SlidingWindowBackwardTest : public ::testing::Test {};
TYPED_TEST_SUITE(SlidingWindowBackwardTest, ElementTypes, ElementTypeNames);

TYPED_TEST(SlidingWindowBackwardTest, MatchesReference) {
  for (std::uint64_t seed = 30000; seed < 30012; ++seed) {
    RandomSource random(seed + 1);
    const Problem p = random_problem(seed, 4e6, kLengths, kMaxMqaHeads);
    AttentionOptions options;
    options.window_left = random.pick({Index{0}, Index{1}, Index{17}, Index{64}, Index{130}});
    if (random.chance(0.5)) {
      options.causal = true;
    } else {
      options.window_right = random.pick({Index{0}, Index{3}, Index{128}});
    }
    options.sink_tokens = random.pick({Index{0}, Index{0}, Index{2}, Index{129}});
    options.softcap = random.pick({0.0f, 0.0f, 5.0f});
    options.q_offset = random.chance(0.7) ? -1 : random.integer(0, p.len_k);
    expect_backward_matches_reference<TypeParam>(SlidingWindowBackward{}, p, options);
  }
}

TYPED_TEST(SlidingWindowBackwardTest, GivesTheBitsOfAttentionBackward) {
  // The forward's contract (sliding_window.hpp) carried over: the same engine and key tiles.
  using T = TypeParam;
  const Problem p = make_problem(2, 4, 2, 200, 300, 16, 24, 31000);
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  for (Index left : {0, 5, 128, 400}) {
    AttentionOptions options = causal_window(left, 3);
    SCOPED_TRACE(options_string(options));
    const Outputs forward = forward_outputs<T>(p, in, options);
    expect_identical(run_backward<T>(SlidingWindowBackward{}, p, in, forward, grad_out, options),
                     run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options));
  }
}

TYPED_TEST(SlidingWindowBackwardTest, IdenticalBitsForAnyThreadCountAndLayout) {
  using T = TypeParam;
  const Problem p = make_problem(2, 6, 2, 150, 260, 24, 8, 32000);
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  AttentionOptions options = causal_window(70, 2);
  options.num_threads = 1;
  const Outputs forward = forward_outputs<T>(p, in, options);
  const Gradients single =
      run_backward<T>(SlidingWindowBackward{}, p, in, forward, grad_out, options);
  for (int threads : {2, 3}) {
    SCOPED_TRACE(describe("num_threads=", threads));
    options.num_threads = threads;
    expect_identical(run_backward<T>(SlidingWindowBackward{}, p, in, forward, grad_out, options),
                     single);
  }
  expect_identical(run_backward<T>(SlidingWindowBackward{}, p, in, forward, grad_out, options,
                                   BackwardLayouts::all(Layout::kSwapped12)),
                   single);
}

// ---------------------------------------------------------------------------------------------
// 4b. Variable-length batches (key_start / key_length): each batch row over its own keys.

// Dense and sliding-window backwards of variable-length calls agree with the reference (which
// gives padding keys no gradient), over left, right and two-sided padding and empty rows.
TYPED_TEST(AttentionBackward, VariableLengthMatchesReference) {
  std::vector<Problem> problems = {make_problem(3, 4, 2, 70, 140, 16, 8, 33000),
                                   make_problem(2, 3, 1, 130, 129, 8, 8, 33001),
                                   make_problem(4, 2, 2, 1, 200, 16, 16, 33002)};
  problems.push_back(with_bias(make_problem(2, 2, 1, 65, 90, 8, 5, 33003), 1, 2, 0.05));
  for (const Problem& p : problems)
    for (std::uint64_t draw = 0; draw < 3; ++draw) {
      const KeyRangeCase ranges = random_key_ranges(p.batch, p.len_k, p.seed * 8 + draw);
      AttentionOptions causal;
      causal.causal = true;
      AttentionOptions capped = causal_window(30, 2);
      capped.softcap = 3.0;
      AttentionOptions offset = causal_window(50, 1);
      offset.q_offset = p.len_k;
      for (const AttentionOptions& options : {AttentionOptions{}, causal, capped, offset})
        expect_backward_matches_reference<TypeParam>(p, ranges.applied_to(options));
      if (p.has_bias()) continue;
      AttentionOptions two_sided;
      two_sided.window_left = 20;
      two_sided.window_right = 7;
      for (const AttentionOptions& options : {capped, two_sided})
        expect_backward_matches_reference<TypeParam>(SlidingWindowBackward{}, p,
                                                     ranges.applied_to(options));
    }
}

// Padding keys are never read and get exact zero gradients: NaN in them changes no bit.
TYPED_TEST(AttentionBackward, VariableLengthPaddingKeysAreNeverReadAndGetZeroGradients) {
  using T = TypeParam;
  const Problem p = make_problem(3, 4, 2, 100, 260, 16, 12, 33100);
  KeyRangeCase ranges;
  ranges.start = {0, 130, 259};
  ranges.length = {150, 130, 1};
  const AttentionOptions options = ranges.applied_to(causal_window(70, 2));
  const Inputs in = random_inputs(p);
  const Inputs poisoned = with_nan_padding(p, in, ranges);
  const std::vector<double> grad_out = random_grad_out(p);
  const Outputs forward = forward_outputs<T>(p, in, options);
  const Gradients clean = run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options);
  expect_identical(run_backward<T>(DenseBackward{}, p, poisoned, forward, grad_out, options),
                   clean);
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads_kv; ++h)
      for (Index j = 0; j < p.len_k; ++j) {
        if (!ranges.is_padding(b, j, p.len_k)) continue;
        const Index row = (b * p.heads_kv + h) * p.len_k + j;
        for (Index d = 0; d < p.dim; ++d) ASSERT_EQ(clean.grad_k[row * p.dim + d], 0.0);
        for (Index d = 0; d < p.dim_v; ++d) ASSERT_EQ(clean.grad_v[row * p.dim_v + d], 0.0);
      }
}

TYPED_TEST(AttentionBackward, VariableLengthGivesIdenticalBitsForAnyThreadCount) {
  using T = TypeParam;
  const Problem p = make_problem(5, 4, 2, 80, 180, 16, 16, 33200);
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const KeyRangeCase ranges = random_key_ranges(p.batch, p.len_k, 33201);
  AttentionOptions options = ranges.applied_to(causal_window(50, 2));
  options.num_threads = 1;
  const Outputs forward = forward_outputs<T>(p, in, options);
  const Gradients single = run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options);
  for (int threads : {2, 3}) {
    SCOPED_TRACE(describe("num_threads=", threads));
    options.num_threads = threads;
    expect_identical(run_backward<T>(DenseBackward{}, p, in, forward, grad_out, options), single);
  }
}

// ---------------------------------------------------------------------------------------------
// 5. Rejected input: a foveal::Error naming what was wrong, thrown before any gradient is
// written.

// B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 7, D = 3, Dv = 6: every extent distinct where the
// messages must tell them apart.
constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kLenQ = 5, kLenK = 7, kDim = 3, kDimV = 6;
// Every buffer holds twice the largest tensor (the bias), so any tensor of the call, resized or
// with doubled strides, fits in any buffer.
constexpr Index kStorage = 2 * kBatch * kHeadsQ * kLenQ * kLenK;

// A message check of throws_error_with's kind that also accepts any one of `alternatives`
// (for messages whose word order the contract leaves open).
template <typename Call>
::testing::AssertionResult throws_error_with_one_of(Call&& call,
                                                    const std::vector<std::string>& pieces,
                                                    const std::vector<std::string>& alternatives) {
  try {
    call();
  } catch (const Error& error) {
    const std::string message = error.what();
    for (const std::string& piece : pieces)
      if (message.find(piece) == std::string::npos)
        return ::testing::AssertionFailure()
               << "message \"" << message << "\" does not contain \"" << piece << "\"";
    if (alternatives.empty()) return ::testing::AssertionSuccess() << message;
    for (const std::string& alternative : alternatives)
      if (message.find(alternative) != std::string::npos)
        return ::testing::AssertionSuccess() << message;
    return ::testing::AssertionFailure()
           << "message \"" << message << "\" contains none of the alternatives, e.g. \""
           << alternatives.front() << "\"";
  } catch (const std::exception& other) {
    return ::testing::AssertionFailure() << "threw something else: " << other.what();
  }
  return ::testing::AssertionFailure() << "did not throw";
}

template <typename T>
class AttentionBackwardErrors : public ::testing::Test {
 public:  // the cases below break the call through a reference to the fixture
  AttentionBackwardErrors() { reset(); }

  // Every view valid again, inputs holding plain values and the gradients the sentinel.
  void reset() {
    for (std::vector<T>* storage : {&q_storage, &k_storage, &v_storage, &out_storage, &lse_storage,
                                    &grad_out_storage, &bias_storage})
      storage->assign(kStorage, T(0.25));
    for (std::vector<T>* storage : {&grad_q_storage, &grad_k_storage, &grad_v_storage})
      storage->assign(kStorage, T(kSentinel));
    q = TensorView<const T, 4>(q_storage.data(), {kBatch, kHeadsQ, kLenQ, kDim});
    k = TensorView<const T, 4>(k_storage.data(), {kBatch, kHeadsKv, kLenK, kDim});
    v = TensorView<const T, 4>(v_storage.data(), {kBatch, kHeadsKv, kLenK, kDimV});
    out = TensorView<const T, 4>(out_storage.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
    lse = TensorView<const T, 3>(lse_storage.data(), {kBatch, kHeadsQ, kLenQ});
    grad_out = TensorView<const T, 4>(grad_out_storage.data(), {kBatch, kHeadsQ, kLenQ, kDimV});
    bias = TensorView<const T, 4>(bias_storage.data(), {kBatch, kHeadsQ, kLenQ, kLenK});
    grad_q = TensorView<T, 4>(grad_q_storage.data(), {kBatch, kHeadsQ, kLenQ, kDim});
    grad_k = TensorView<T, 4>(grad_k_storage.data(), {kBatch, kHeadsKv, kLenK, kDim});
    grad_v = TensorView<T, 4>(grad_v_storage.data(), {kBatch, kHeadsKv, kLenK, kDimV});
    options = AttentionOptions{};
  }

  void call() const {
    attention_backward(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, options, bias);
  }

  // sliding_window_attention_backward on the same arguments (its bias is never passed).
  void call_sliding_window() const {
    sliding_window_attention_backward(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, options);
  }

  bool gradients_untouched() const {
    return holds_sentinel(grad_q_storage) && holds_sentinel(grad_k_storage) &&
           holds_sentinel(grad_v_storage);
  }

  // `rejected_call` throws foveal::Error whose message starts with "foveal: <function>: " and
  // names every piece (and one of `alternatives` when given), and no gradient was written.
  template <typename Call>
  void expect_rejected(Call&& rejected_call, const std::string& function,
                       std::vector<std::string> pieces,
                       const std::vector<std::string>& alternatives = {}) {
    pieces.insert(pieces.begin(), "foveal: " + function + ": ");
    EXPECT_TRUE(throws_error_with_one_of(rejected_call, pieces, alternatives));
    EXPECT_TRUE(gradients_untouched()) << "a gradient was written before the error";
  }
  void expect_rejected(std::vector<std::string> pieces,
                       const std::vector<std::string>& alternatives = {}) {
    expect_rejected([&] { call(); }, "attention_backward", std::move(pieces), alternatives);
  }

  // `view` with the stride of its last dimension set to `stride`.
  template <typename U>
  static TensorView<U, 4> with_inner_stride(const TensorView<U, 4>& view, Index stride) {
    Shape<4> strides = view.strides();
    strides[3] = stride;
    return TensorView<U, 4>(view.data(), view.shape(), strides);
  }

  std::vector<T> q_storage, k_storage, v_storage, out_storage, lse_storage, grad_out_storage,
      bias_storage, grad_q_storage, grad_k_storage, grad_v_storage;
  TensorView<const T, 4> q, k, v, out, grad_out, bias;
  TensorView<const T, 3> lse;
  TensorView<T, 4> grad_q, grad_k, grad_v;
  AttentionOptions options;
};

TYPED_TEST_SUITE(AttentionBackwardErrors, ElementTypes, ElementTypeNames);

// One way to break the valid call, and what the message must say.
template <typename Fixture>
struct BrokenCall {
  std::string what;
  std::function<void(Fixture&)> breaks;
  std::vector<std::string> pieces;
};

TYPED_TEST(AttentionBackwardErrors, ValidCallIsAccepted) {
  EXPECT_NO_THROW(this->call());
  EXPECT_FALSE(holds_sentinel(this->grad_q_storage));
  EXPECT_FALSE(holds_sentinel(this->grad_k_storage));
  EXPECT_FALSE(holds_sentinel(this->grad_v_storage));
  this->reset();
  this->bias = {};
  EXPECT_NO_THROW(this->call());
  this->reset();
  this->options = causal_window(2);
  EXPECT_NO_THROW(this->call_sliding_window());
  EXPECT_FALSE(holds_sentinel(this->grad_q_storage));
}

TYPED_TEST(AttentionBackwardErrors, EveryMisshapenArgumentIsNamed) {
  using T = TypeParam;
  using F = AttentionBackwardErrors<T>;
  using In = TensorView<const T, 4>;
  using Out = TensorView<T, 4>;
  const auto in = [](std::vector<T>& storage, const Shape<4>& shape) {
    return In(storage.data(), shape);
  };
  const auto grad = [](std::vector<T>& storage, const Shape<4>& shape) {
    return Out(storage.data(), shape);
  };
  const std::vector<BrokenCall<F>> cases = {
      // Batch.
      {"k batch",
       [&](F& f) {
         f.k = in(f.k_storage, {kBatch + 1, kHeadsKv, kLenK, kDim});
       },
       {"k.shape[0]", "(B) = 2", "got 3"}},
      {"v batch",
       [&](F& f) {
         f.v = in(f.v_storage, {1, kHeadsKv, kLenK, kDimV});
       },
       {"v.shape[0]", "(B) = 2", "got 1"}},
      {"out batch",
       [&](F& f) {
         f.out = in(f.out_storage, {1, kHeadsQ, kLenQ, kDimV});
       },
       {"out.shape[0]", "(B) = 2", "got 1"}},
      {"lse batch",
       [&](F& f) {
         f.lse = TensorView<const T, 3>(f.lse_storage.data(), {kBatch + 1, kHeadsQ, kLenQ});
       },
       {"lse.shape[0]", "(B) = 2", "got 3"}},
      {"grad_out batch",
       [&](F& f) {
         f.grad_out = in(f.grad_out_storage, {1, kHeadsQ, kLenQ, kDimV});
       },
       {"grad_out.shape[0]", "(B) = 2", "got 1"}},
      {"grad_q batch",
       [&](F& f) {
         f.grad_q = grad(f.grad_q_storage, {1, kHeadsQ, kLenQ, kDim});
       },
       {"grad_q.shape[0]", "(B) = 2", "got 1"}},
      {"grad_k batch",
       [&](F& f) {
         f.grad_k = grad(f.grad_k_storage, {kBatch + 1, kHeadsKv, kLenK, kDim});
       },
       {"grad_k.shape[0]", "(B) = 2", "got 3"}},
      {"grad_v batch",
       [&](F& f) {
         f.grad_v = grad(f.grad_v_storage, {1, kHeadsKv, kLenK, kDimV});
       },
       {"grad_v.shape[0]", "(B) = 2", "got 1"}},
      // Heads.
      {"v heads",
       [&](F& f) {
         f.v = in(f.v_storage, {kBatch, 1, kLenK, kDimV});
       },
       {"v.shape[1]", "(Hkv) = 2", "got 1"}},
      {"out heads",
       [&](F& f) {
         f.out = in(f.out_storage, {kBatch, kHeadsKv, kLenQ, kDimV});
       },
       {"out.shape[1]", "(Hq) = 4", "got 2"}},
      {"lse heads",
       [&](F& f) {
         f.lse = TensorView<const T, 3>(f.lse_storage.data(), {kBatch, 1, kLenQ});
       },
       {"lse.shape[1]", "(Hq) = 4", "got 1"}},
      {"grad_out heads",
       [&](F& f) {
         f.grad_out = in(f.grad_out_storage, {kBatch, kHeadsKv, kLenQ, kDimV});
       },
       {"grad_out.shape[1]", "(Hq) = 4", "got 2"}},
      {"grad_q heads",
       [&](F& f) {
         f.grad_q = grad(f.grad_q_storage, {kBatch, kHeadsKv, kLenQ, kDim});
       },
       {"grad_q.shape[1]", "(Hq) = 4", "got 2"}},
      {"grad_k heads",
       [&](F& f) {
         f.grad_k = grad(f.grad_k_storage, {kBatch, kHeadsQ, kLenK, kDim});
       },
       {"grad_k.shape[1]", "(Hkv) = 2", "got 4"}},
      {"grad_v heads",
       [&](F& f) {
         f.grad_v = grad(f.grad_v_storage, {kBatch, 1, kLenK, kDimV});
       },
       {"grad_v.shape[1]", "(Hkv) = 2", "got 1"}},
      // Lengths.
      {"v length",
       [&](F& f) {
         f.v = in(f.v_storage, {kBatch, kHeadsKv, kLenK + 1, kDimV});
       },
       {"v.shape[2]", "(Lk) = 7", "got 8"}},
      {"out length",
       [&](F& f) {
         f.out = in(f.out_storage, {kBatch, kHeadsQ, kLenQ + 1, kDimV});
       },
       {"out.shape[2]", "(Lq) = 5", "got 6"}},
      {"lse length",
       [&](F& f) {
         f.lse = TensorView<const T, 3>(f.lse_storage.data(), {kBatch, kHeadsQ, kLenQ - 1});
       },
       {"lse.shape[2]", "(Lq) = 5", "got 4"}},
      {"grad_out length",
       [&](F& f) {
         f.grad_out = in(f.grad_out_storage, {kBatch, kHeadsQ, kLenQ + 1, kDimV});
       },
       {"grad_out.shape[2]", "(Lq) = 5", "got 6"}},
      {"grad_q length",
       [&](F& f) {
         f.grad_q = grad(f.grad_q_storage, {kBatch, kHeadsQ, kLenQ - 1, kDim});
       },
       {"grad_q.shape[2]", "(Lq) = 5", "got 4"}},
      {"grad_k length",
       [&](F& f) {
         f.grad_k = grad(f.grad_k_storage, {kBatch, kHeadsKv, kLenK - 1, kDim});
       },
       {"grad_k.shape[2]", "(Lk) = 7", "got 6"}},
      {"grad_v length",
       [&](F& f) {
         f.grad_v = grad(f.grad_v_storage, {kBatch, kHeadsKv, kLenK + 1, kDimV});
       },
       {"grad_v.shape[2]", "(Lk) = 7", "got 8"}},
      // Head dims.
      {"k head dim",
       [&](F& f) {
         f.k = in(f.k_storage, {kBatch, kHeadsKv, kLenK, kDim + 2});
       },
       {"k.shape[3]", "(D) = 3", "got 5"}},
      {"out head dim",
       [&](F& f) {
         f.out = in(f.out_storage, {kBatch, kHeadsQ, kLenQ, kDimV - 1});
       },
       {"out.shape[3]", "(Dv) = 6", "got 5"}},
      {"grad_out head dim",
       [&](F& f) {
         f.grad_out = in(f.grad_out_storage, {kBatch, kHeadsQ, kLenQ, kDimV + 1});
       },
       {"grad_out.shape[3]", "(Dv) = 6", "got 7"}},
      {"grad_q head dim",
       [&](F& f) {
         f.grad_q = grad(f.grad_q_storage, {kBatch, kHeadsQ, kLenQ, kDim + 1});
       },
       {"grad_q.shape[3]", "(D) = 3", "got 4"}},
      {"grad_k head dim",
       [&](F& f) {
         f.grad_k = grad(f.grad_k_storage, {kBatch, kHeadsKv, kLenK, kDim - 1});
       },
       {"grad_k.shape[3]", "(D) = 3", "got 2"}},
      {"grad_v head dim",
       [&](F& f) {
         f.grad_v = grad(f.grad_v_storage, {kBatch, kHeadsKv, kLenK, kDimV - 2});
       },
       {"grad_v.shape[3]", "(Dv) = 6", "got 4"}},
      // Shapes that cannot hold at all.
      {"group",
       [&](F& f) {
         f.k = in(f.k_storage, {kBatch, 3, kLenK, kDim});
         f.v = in(f.v_storage, {kBatch, 3, kLenK, kDimV});
         f.grad_k = grad(f.grad_k_storage, {kBatch, 3, kLenK, kDim});
         f.grad_v = grad(f.grad_v_storage, {kBatch, 3, kLenK, kDimV});
       },
       {"q.shape[1] (Hq = 4)", "multiple of k.shape[1] (Hkv = 3)"}},
      {"zero head dim",
       [&](F& f) {
         f.q = in(f.q_storage, {kBatch, kHeadsQ, kLenQ, 0});
         f.k = in(f.k_storage, {kBatch, kHeadsKv, kLenK, 0});
         f.grad_q = grad(f.grad_q_storage, {kBatch, kHeadsQ, kLenQ, 0});
         f.grad_k = grad(f.grad_k_storage, {kBatch, kHeadsKv, kLenK, 0});
       },
       {"q.shape[3] (D) must be >= 1", "got 0"}},
      {"negative extent of grad_k",
       [&](F& f) {
         f.grad_k = grad(f.grad_k_storage, {kBatch, kHeadsKv, -1, kDim});
       },
       {"grad_k.shape[2] must be >= 0", "got -1"}},
      {"negative extent of grad_out",
       [&](F& f) {
         f.grad_out = in(f.grad_out_storage, {kBatch, -kHeadsQ, kLenQ, kDimV});
       },
       {"grad_out.shape[1] must be >= 0", "got -4"}},
      // The bias (no gradient, but still checked).
      {"bias batch",
       [&](F& f) {
         f.bias = in(f.bias_storage, {3, kHeadsQ, kLenQ, kLenK});
       },
       {"bias.shape[0] must be 1 or q.shape[0] (B) = 2", "got 3"}},
      {"bias heads",
       [&](F& f) {
         f.bias = in(f.bias_storage, {kBatch, kHeadsKv, kLenQ, kLenK});
       },
       {"bias.shape[1] must be 1 or q.shape[1] (Hq) = 4", "got 2"}},
      {"bias rows",
       [&](F& f) {
         f.bias = in(f.bias_storage, {1, 1, 1, kLenK});
       },
       {"bias.shape[2]", "(Lq) = 5", "got 1"}},
      {"bias columns",
       [&](F& f) {
         f.bias = in(f.bias_storage, {1, 1, kLenQ, 1});
       },
       {"bias.shape[3]", "(Lk) = 7", "got 1"}},
  };
  for (const BrokenCall<F>& broken : cases) {
    SCOPED_TRACE(broken.what);
    this->reset();
    broken.breaks(*this);
    this->expect_rejected(broken.pieces);
  }
}

TYPED_TEST(AttentionBackwardErrors, NonUnitInnerStrideIsNamed) {
  // q, k, v, out, grad_out and the gradients feed the micro-kernels: their last dimension must
  // be contiguous. (lse and bias are read element by element and may have any strides: see
  // MixedLayoutsGiveIdenticalBits.)
  using T = TypeParam;
  using F = AttentionBackwardErrors<T>;
  const std::vector<BrokenCall<F>> cases = {
      {"q", [](F& f) { f.q = F::with_inner_stride(f.q, 2); }, {"q must have stride 1"}},
      {"k", [](F& f) { f.k = F::with_inner_stride(f.k, 2); }, {"k must have stride 1"}},
      {"v", [](F& f) { f.v = F::with_inner_stride(f.v, -1); }, {"v must have stride 1"}},
      {"out", [](F& f) { f.out = F::with_inner_stride(f.out, 2); }, {"out must have stride 1"}},
      {"grad_out",
       [](F& f) { f.grad_out = F::with_inner_stride(f.grad_out, 2); },
       {"grad_out must have stride 1"}},
      {"grad_q",
       [](F& f) { f.grad_q = F::with_inner_stride(f.grad_q, 2); },
       {"grad_q must have stride 1"}},
      {"grad_k",
       [](F& f) { f.grad_k = F::with_inner_stride(f.grad_k, 2); },
       {"grad_k must have stride 1"}},
      {"grad_v",
       [](F& f) { f.grad_v = F::with_inner_stride(f.grad_v, 2); },
       {"grad_v must have stride 1"}},
  };
  for (const BrokenCall<F>& broken : cases) {
    SCOPED_TRACE(broken.what);
    this->reset();
    broken.breaks(*this);
    std::vector<std::string> pieces = broken.pieces;
    pieces.push_back("in its last dimension");
    this->expect_rejected(pieces);
  }
}

TYPED_TEST(AttentionBackwardErrors, NullDataWithElementsIsNamed) {
  using T = TypeParam;
  using F = AttentionBackwardErrors<T>;
  const std::vector<BrokenCall<F>> cases = {
      {"q",
       [](F& f) {
         f.q = {nullptr, f.q.shape()};
       },
       {"q has 120 elements"}},
      {"k",
       [](F& f) {
         f.k = {nullptr, f.k.shape()};
       },
       {"k has 84 elements"}},
      {"v",
       [](F& f) {
         f.v = {nullptr, f.v.shape()};
       },
       {"v has 168 elements"}},
      {"out",
       [](F& f) {
         f.out = {nullptr, f.out.shape()};
       },
       {"out has 240 elements"}},
      {"lse",
       [](F& f) {
         f.lse = {nullptr, f.lse.shape()};
       },
       {"lse has 40 elements"}},
      {"grad_out",
       [](F& f) {
         f.grad_out = {nullptr, f.grad_out.shape()};
       },
       {"grad_out has 240 elements"}},
      {"bias",
       [](F& f) {
         f.bias = {nullptr, f.bias.shape()};
       },
       {"bias has 280 elements"}},
      {"grad_q",
       [](F& f) {
         f.grad_q = {nullptr, f.grad_q.shape()};
       },
       {"grad_q has 120 elements"}},
      {"grad_k",
       [](F& f) {
         f.grad_k = {nullptr, f.grad_k.shape()};
       },
       {"grad_k has 84 elements"}},
      {"grad_v",
       [](F& f) {
         f.grad_v = {nullptr, f.grad_v.shape()};
       },
       {"grad_v has 168 elements"}},
  };
  for (const BrokenCall<F>& broken : cases) {
    SCOPED_TRACE(broken.what);
    this->reset();
    broken.breaks(*this);
    std::vector<std::string> pieces = broken.pieces;
    pieces.push_back("but its data pointer is null");
    this->expect_rejected(pieces);
  }
}

TYPED_TEST(AttentionBackwardErrors, GradientOverlappingAnInputIsNamed) {
  // Each gradient against each input: the input starting at the gradient's first element
  // (exact aliasing for grad_q and q) and at its last element (one shared element).
  using T = TypeParam;
  using F = AttentionBackwardErrors<T>;
  struct Gradient {
    const char* name;
    std::function<TensorView<T, 4>(F&)> view;
  };
  struct Input {
    const char* name;
    std::function<void(F&, T*)> place;  // points the input at the given memory
  };
  const std::vector<Gradient> gradients = {{"grad_q", [](F& f) { return f.grad_q; }},
                                           {"grad_k", [](F& f) { return f.grad_k; }},
                                           {"grad_v", [](F& f) { return f.grad_v; }}};
  const std::vector<Input> inputs = {
      {"q",
       [](F& f, T* at) {
         f.q = {at, f.q.shape()};
       }},
      {"k",
       [](F& f, T* at) {
         f.k = {at, f.k.shape()};
       }},
      {"v",
       [](F& f, T* at) {
         f.v = {at, f.v.shape()};
       }},
      {"out",
       [](F& f, T* at) {
         f.out = {at, f.out.shape()};
       }},
      {"lse",
       [](F& f, T* at) {
         f.lse = {at, f.lse.shape()};
       }},
      {"grad_out",
       [](F& f, T* at) {
         f.grad_out = {at, f.grad_out.shape()};
       }},
      {"bias",
       [](F& f, T* at) {
         f.bias = {at, f.bias.shape()};
       }},
  };
  for (const Gradient& gradient : gradients)
    for (const Input& input : inputs)
      for (bool at_last_element : {false, true}) {
        SCOPED_TRACE(describe(gradient.name, " and ", input.name,
                              at_last_element ? " sharing one element" : " starting together"));
        this->reset();
        const TensorView<T, 4> written = gradient.view(*this);
        input.place(*this, written.data() + (at_last_element ? written.numel() - 1 : 0));
        // Named in either order (validate.hpp's require_disjoint puts the written one first).
        this->expect_rejected(
            {"must not overlap"},
            {describe(gradient.name, " must not overlap ", input.name, " in memory"),
             describe(input.name, " must not overlap ", gradient.name, " in memory")});
      }
}

TYPED_TEST(AttentionBackwardErrors, GradientsOverlappingEachOtherAreNamed) {
  using T = TypeParam;
  using F = AttentionBackwardErrors<T>;
  struct Pair {
    const char* first;
    const char* second;
    std::function<void(F&)> overlap;
  };
  const std::vector<Pair> pairs = {
      {"grad_q", "grad_k",
       [](F& f) {
         f.grad_k = {f.grad_q.data() + f.grad_q.numel() - 1, f.grad_k.shape()};
       }},
      {"grad_q", "grad_v",
       [](F& f) {
         f.grad_v = {f.grad_q.data(), f.grad_v.shape()};
       }},
      {"grad_k", "grad_v",
       [](F& f) {
         f.grad_v = {f.grad_k.data() + 5, f.grad_v.shape()};
       }},
  };
  for (const Pair& pair : pairs) {
    SCOPED_TRACE(describe(pair.first, " and ", pair.second));
    this->reset();
    pair.overlap(*this);
    this->expect_rejected({"must not overlap"},
                          {describe(pair.first, " must not overlap ", pair.second),
                           describe(pair.second, " must not overlap ", pair.first)});
  }
}

TYPED_TEST(AttentionBackwardErrors, AdjacentMemoryIsNotOverlap) {
  // Each input placed right after the end of grad_v's memory, in the same buffer: accepted.
  const auto place_after_grad_v = [&](auto& view) {
    view = {this->grad_v.data() + this->grad_v.numel(), view.shape()};
  };
  for (int input = 0; input < 4; ++input) {
    SCOPED_TRACE(describe("input ", input));
    this->reset();
    if (input == 0) place_after_grad_v(this->q);
    if (input == 1) place_after_grad_v(this->lse);
    if (input == 2) place_after_grad_v(this->grad_out);
    if (input == 3) place_after_grad_v(this->bias);
    EXPECT_NO_THROW(this->call());
  }
}

TYPED_TEST(AttentionBackwardErrors, BadOptionsAreNamed) {
  using T = TypeParam;
  using F = AttentionBackwardErrors<T>;
  const std::vector<BrokenCall<F>> cases = {
      {"window_left",
       [](F& f) { f.options.window_left = -2; },
       {"window_left must be >= 0 or -1 (unbounded)", "got -2"}},
      {"window_right",
       [](F& f) { f.options.window_right = -5; },
       {"window_right must be >= 0 or -1 (unbounded)", "got -5"}},
      {"causal and window_right",
       [](F& f) {
         f.options.causal = true;
         f.options.window_right = 2;
       },
       {"causal=true means window_right = 0", "window_right = 2"}},
      {"sink_tokens",
       [](F& f) { f.options.sink_tokens = -1; },
       {"sink_tokens must be >= 0", "got -1"}},
      {"nan scale",
       [](F& f) { f.options.scale = std::numeric_limits<double>::quiet_NaN(); },
       {"scale must be finite and >= 0", "nan"}},
      {"infinite scale",
       [](F& f) { f.options.scale = std::numeric_limits<double>::infinity(); },
       {"scale must be finite and >= 0", "got inf"}},
      {"negative scale",
       [](F& f) { f.options.scale = -0.5; },
       {"scale must be finite and >= 0", "got -0.5"}},
      {"nan softcap",
       [](F& f) { f.options.softcap = std::numeric_limits<double>::quiet_NaN(); },
       {"softcap must be finite and >= 0", "nan"}},
      {"negative softcap",
       [](F& f) { f.options.softcap = -1; },
       {"softcap must be finite and >= 0", "got -1"}},
      {"q_offset",
       [](F& f) { f.options.q_offset = -2; },
       {"q_offset must be in [0, 1152921504606846975] (the position of query 0) or -1", "got -2"}},
      {"q_offset near overflow",
       [](F& f) { f.options.q_offset = std::numeric_limits<Index>::max() / 4; },
       {"q_offset must be in [0, 1152921504606846975]", "got 2305843009213693951"}},
      {"num_threads",
       [](F& f) { f.options.num_threads = -1; },
       {"num_threads must be in [0, 1024]", "got -1"}},
  };
  for (const BrokenCall<F>& broken : cases) {
    SCOPED_TRACE(broken.what);
    this->reset();
    broken.breaks(*this);
    this->expect_rejected(broken.pieces);
  }
  if constexpr (std::is_same_v<T, float>) {
    // Finite as double options, out of range once they reach float32 logits.
    this->reset();
    this->options.scale = 1e39;
    this->expect_rejected({"scale = 1e+39 with softcap = 0 is out of the range of float32"});
    this->reset();
    this->options.softcap = 1e-50;
    this->expect_rejected({"with softcap = 1e-50 is out of the range of float32"});
  }
}

TYPED_TEST(AttentionBackwardErrors, SlidingWindowRejectsUnboundedWindowsAndNamesItself) {
  const std::string function = "sliding_window_attention_backward";
  const auto call = [&] { this->call_sliding_window(); };
  this->reset();
  this->options = causal_window(2);
  this->options.window_left = -1;
  this->expect_rejected(call, function, {"window_left must be >= 0", "got -1"});
  this->reset();
  this->options.window_left = 2;  // causal = false, window_right = -1
  this->expect_rejected(call, function, {"the window's right side must be bounded"});
  this->reset();
  this->options = causal_window(2);
  this->options.window_right = 3;
  this->expect_rejected(call, function, {"causal=true means window_right = 0"});
  this->reset();
  this->options = causal_window(2);
  this->grad_k =
      TensorView<TypeParam, 4>(this->grad_k_storage.data(), {kBatch, kHeadsKv, kLenK, kDim + 1});
  this->expect_rejected(call, function, {"grad_k.shape[3]", "(D) = 3", "got 4"});
  this->reset();
  this->options = causal_window(2);
  this->lse = TensorView<const TypeParam, 3>(this->grad_v_storage.data(), this->lse.shape());
  this->expect_rejected(call, function, {"grad_v must not overlap lse in memory"});
}

// grad_bias: only with a bias, of the bias's shape, overlapping nothing; nothing is written
// when it is rejected. A broadcast bias's gradient is the sum over the broadcast dimensions.
TYPED_TEST(AttentionBackwardErrors, BiasGradientIsCheckedAndSummedOverBroadcasts) {
  using T = TypeParam;
  std::vector<T> grad_bias_storage(kStorage, T(kSentinel));
  const auto grad_bias_of = [&](const Shape<4>& shape) {
    return TensorView<T, 4>(grad_bias_storage.data(), shape);
  };
  const auto call_with = [&](TensorView<const T, 4> bias, TensorView<T, 4> grad_bias) {
    attention_backward(this->q, this->k, this->v, this->out, this->lse, this->grad_out,
                       this->grad_q, this->grad_k, this->grad_v, this->options, bias, grad_bias);
  };
  const Shape<4> full = {kBatch, kHeadsQ, kLenQ, kLenK};
  this->expect_rejected([&] { call_with({}, grad_bias_of(full)); }, "attention_backward",
                        {"grad_bias needs the bias"});
  this->expect_rejected(
      [&] {
        call_with(this->bias, grad_bias_of({kBatch, kHeadsQ, kLenQ, 1}));
      },
      "attention_backward", {"grad_bias.shape[3]", "bias.shape[3] (Lk)"});
  this->expect_rejected(
      [&] {
        call_with(this->bias, TensorView<T, 4>(const_cast<T*>(this->q.data()), this->bias.shape()));
      },
      "attention_backward", {"grad_bias", "q"});
  EXPECT_TRUE(holds_sentinel(grad_bias_storage));

  // Varied inputs, then the gradient of a [1, Hq, Lq, Lk] bias equals the batch sum of the full
  // one's, in the same order; 1 and 3 threads give the same bits.
  for (std::vector<T>* storage : {&this->q_storage, &this->k_storage, &this->v_storage,
                                  &this->grad_out_storage, &this->bias_storage})
    for (std::size_t i = 0; i < storage->size(); ++i)
      (*storage)[i] = static_cast<T>(std::sin(0.37 * static_cast<double>(i) + storage->size()));
  const Shape<4> one_batch = {1, kHeadsQ, kLenQ, kLenK};
  std::vector<T> full_grad(kStorage), broadcast_grad(kStorage), again(kStorage);
  const TensorView<const T, 4> broadcast_bias(this->bias_storage.data(), one_batch);
  std::vector<T> lse_storage(kStorage);
  std::vector<T> out_storage(kStorage);
  const TensorView<T, 4> out_view(out_storage.data(), this->out.shape());
  const TensorView<T, 3> lse_view(lse_storage.data(), this->lse.shape());
  attention(this->q, this->k, this->v, out_view, this->options, lse_view, broadcast_bias);
  this->out = out_view;
  this->lse = lse_view;
  // The broadcast bias as a full one (its rows repeated over the batch).
  std::vector<T> repeated(kStorage);
  const TensorView<T, 4> repeated_view(repeated.data(), full);
  for (Index b = 0; b < kBatch; ++b)
    for (Index h = 0; h < kHeadsQ; ++h)
      for (Index i = 0; i < kLenQ; ++i)
        for (Index j = 0; j < kLenK; ++j) repeated_view(b, h, i, j) = broadcast_bias(0, h, i, j);
  call_with(repeated_view, TensorView<T, 4>(full_grad.data(), full));
  call_with(broadcast_bias, TensorView<T, 4>(broadcast_grad.data(), one_batch));
  const TensorView<const T, 4> full_view(full_grad.data(), full);
  const TensorView<const T, 4> sum_view(broadcast_grad.data(), one_batch);
  for (Index h = 0; h < kHeadsQ; ++h)
    for (Index i = 0; i < kLenQ; ++i)
      for (Index j = 0; j < kLenK; ++j) {
        T sum = 0;
        for (Index b = 0; b < kBatch; ++b) sum += full_view(b, h, i, j);
        EXPECT_EQ(sum, sum_view(0, h, i, j));
      }
  this->options.num_threads = 3;
  call_with(broadcast_bias, TensorView<T, 4>(again.data(), one_batch));
  EXPECT_EQ(again, broadcast_grad);
}

// ---------------------------------------------------------------------------------------------
// 6. grad_lse: a loss that also reads the forward's lse (learned sink logits scale out by
//    sigmoid(lse - s)) adds grad_lse_i P_ij to each logit's gradient.

// grad_lse ~ N(0, 1) rounded to float, from a stream of its own.
std::vector<double> random_grad_lse(const Problem& p) {
  RandomSource random(p.seed ^ 0x5851F42D4C957F2DULL);
  return round_to<float>(random.normal(static_cast<std::size_t>(shape_numel<3>(p.lse_shape()))));
}

Gradients reference_gradients_with_lse(const Problem& p, const Inputs& in,
                                       const std::vector<double>& grad_out,
                                       const std::vector<double>& grad_lse,
                                       const AttentionOptions& o) {
  Gradients result;
  reference::attention_backward_reference(reference_shape(p), in.q, in.k, in.v, grad_out,
                                          reference_options(o), result.grad_q, result.grad_k,
                                          result.grad_v, in.bias, p.has_bias() ? p.bias_batch : 1,
                                          p.has_bias() ? p.bias_heads : 1, grad_lse);
  return result;
}

// The reference with grad_lse against central differences of sum(grad_out * out) +
// sum(grad_lse * lse) (rows that see no key have lse = -inf whatever the inputs: left out).
void expect_lse_reference_matches_finite_differences(const Problem& p, const AttentionOptions& o) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const std::vector<double> grad_lse = random_grad_lse(p);
  Inputs moved = in;
  const auto loss = [&] {
    const Outputs forward = reference_outputs(p, moved, o);
    double sum = 0;
    for (std::size_t i = 0; i < grad_out.size(); ++i) sum += grad_out[i] * forward.out[i];
    for (std::size_t i = 0; i < grad_lse.size(); ++i)
      if (std::isfinite(forward.lse[i])) sum += grad_lse[i] * forward.lse[i];
    return sum;
  };
  Gradients numeric;
  numeric.grad_q = central_differences(moved.q, 1e-5, loss);
  numeric.grad_k = central_differences(moved.k, 1e-5, loss);
  numeric.grad_v = central_differences(moved.v, 1e-5, loss);
  const Gradients analytic = reference_gradients_with_lse(p, in, grad_out, grad_lse, o);
  expect_gradients_match(analytic, numeric, 1e-7);
  // And the lse term changes the answer (a reference that ignored grad_lse would fail above).
  const Gradients without = reference_gradients(p, in, grad_out, o);
  EXPECT_GT(max_normalized_error(without.grad_q, analytic.grad_q).value, 1e-3);
}

TEST(AttentionBackwardReference, LseGradientMatchesFiniteDifferences) {
  expect_lse_reference_matches_finite_differences(make_problem(2, 2, 1, 5, 7, 3, 4, 116), {});
  AttentionOptions options;
  options.causal = true;  // Lq > Lk: two rows see nothing
  options.softcap = 1.5;
  expect_lse_reference_matches_finite_differences(
      with_bias(make_problem(1, 4, 2, 7, 5, 3, 3, 117), 1, 4, 0.2), options);
}

// attention_backward / sliding_window_attention_backward with grad_lse, as run_backward's entry.
template <typename T>
struct BackwardWithLse {
  TensorView<const T, 3> grad_lse;
  bool sliding = false;
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<const T, 4>& out,
                  const TensorView<const T, 3>& lse, const TensorView<const T, 4>& grad_out,
                  const TensorView<T, 4>& grad_q, const TensorView<T, 4>& grad_k,
                  const TensorView<T, 4>& grad_v, const AttentionOptions& options,
                  const TensorView<const T, 4>& bias) const {
    if (sliding) {
      sliding_window_attention_backward(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v,
                                        options, grad_lse);
    } else {
      attention_backward(q, k, v, out, lse, grad_out, grad_q, grad_k, grad_v, options, bias, {},
                         grad_lse);
    }
  }
};

template <typename T>
void expect_lse_backward_matches_reference(const Problem& p, const AttentionOptions& o,
                                           bool sliding, Layout grad_lse_layout) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o), sliding ? " (sliding)" : ""));
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const std::vector<double> grad_lse = random_grad_lse(p);
  const StridedBuffer<T, 3> grad_lse_buffer(grad_lse, p.lse_shape(), grad_lse_layout,
                                            std::numeric_limits<T>::quiet_NaN());
  const BackwardWithLse<T> entry{grad_lse_buffer.const_view(), sliding};
  const Gradients got = run_backward<T>(entry, p, in, forward_outputs<T>(p, in, o), grad_out, o);
  expect_gradients_match(got, reference_gradients_with_lse(p, in, grad_out, grad_lse, o),
                         kBackwardTolerance<T>);
}

TYPED_TEST(AttentionBackward, LseGradientMatchesReference) {
  for (std::uint64_t seed = 31000; seed < 31016; ++seed) {
    RandomSource random(seed + 1);
    Problem p = random_problem(seed, 2e6, kLengths, kMaxMqaHeads);
    AttentionOptions options;
    options.causal = random.chance(0.5);
    options.softcap = random.pick({0.0f, 0.0f, 5.0f});
    if (random.chance(0.3)) p = with_bias(p, 1, p.heads_q, 0.1);
    const Layout layout = random.pick({Layout::kContiguous, Layout::kPadded});
    expect_lse_backward_matches_reference<TypeParam>(p, options, false, layout);
  }
}

TYPED_TEST(SlidingWindowBackwardTest, LseGradientMatchesReference) {
  for (std::uint64_t seed = 32000; seed < 32008; ++seed) {
    RandomSource random(seed + 1);
    const Problem p = random_problem(seed, 2e6, kLengths, kMaxMqaHeads);
    AttentionOptions options;
    options.window_left = random.pick({Index{0}, Index{17}, Index{130}});
    options.causal = true;
    options.sink_tokens = random.pick({Index{0}, Index{2}});
    expect_lse_backward_matches_reference<TypeParam>(p, options, true, Layout::kContiguous);
  }
}

TYPED_TEST(AttentionBackward, LseGradientGivesIdenticalBitsForAnyThreadCount) {
  const Problem p = make_problem(2, 4, 2, 130, 257, 24, 20, 33000);
  const Inputs in = random_inputs(p);
  const std::vector<double> grad_out = random_grad_out(p);
  const StridedBuffer<TypeParam, 3> grad_lse(random_grad_lse(p), p.lse_shape(), Layout::kContiguous,
                                             std::numeric_limits<TypeParam>::quiet_NaN());
  AttentionOptions options;
  options.causal = true;
  const Outputs forward = forward_outputs<TypeParam>(p, in, options);
  const BackwardWithLse<TypeParam> entry{grad_lse.const_view(), false};
  options.num_threads = 1;
  const Gradients one = run_backward<TypeParam>(entry, p, in, forward, grad_out, options);
  for (int threads : {2, 3, 8}) {
    options.num_threads = threads;
    expect_identical(run_backward<TypeParam>(entry, p, in, forward, grad_out, options), one);
  }
}

TYPED_TEST(AttentionBackwardErrors, MisshapenOrOverlappingGradLseIsNamed) {
  using T = TypeParam;
  std::vector<T> storage(static_cast<std::size_t>(shape_numel<3>(this->lse.shape())) + 8, T(0));
  const Shape<3> shape = this->lse.shape();
  // One extent wrong at a time.
  for (int d = 0; d < 3; ++d) {
    Shape<3> wrong = shape;
    wrong[d] += 1;
    const TensorView<const T, 3> bad(storage.data(), wrong);
    this->expect_rejected(
        [&] {
          attention_backward(this->q, this->k, this->v, this->out, this->lse, this->grad_out,
                             this->grad_q, this->grad_k, this->grad_v, this->options, this->bias,
                             {}, bad);
        },
        "attention_backward", {"grad_lse"});
    this->expect_rejected(
        [&] {
          sliding_window_attention_backward(this->q, this->k, this->v, this->out, this->lse,
                                            this->grad_out, this->grad_q, this->grad_k,
                                            this->grad_v, causal_window(2), bad);
        },
        "sliding_window_attention_backward", {"grad_lse"});
  }
  // Read from the memory of a gradient the call writes.
  const TensorView<const T, 3> inside_grad_q(this->grad_q.data(), shape);
  this->expect_rejected(
      [&] {
        attention_backward(this->q, this->k, this->v, this->out, this->lse, this->grad_out,
                           this->grad_q, this->grad_k, this->grad_v, this->options, this->bias, {},
                           inside_grad_q);
      },
      "attention_backward", {"grad_q", "grad_lse"});
  // A well-formed grad_lse is accepted.
  const TensorView<const T, 3> good(storage.data(), shape);
  EXPECT_NO_THROW(attention_backward(this->q, this->k, this->v, this->out, this->lse,
                                     this->grad_out, this->grad_q, this->grad_k, this->grad_v,
                                     this->options, this->bias, {}, good));
}
}  // namespace
}  // namespace foveal::test
