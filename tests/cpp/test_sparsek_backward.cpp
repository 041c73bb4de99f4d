// tests/cpp/test_sparsek_backward.cpp — the gradients of SparseK attention
// (foveal/sparsek/backward.hpp) with respect to q, k, v and the scores u.
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  u: [B, Hkv, Lk]
// out, grad_out: [B, Hq, Lq, Dv]  lse: [B, Hq, Lq]
//   ->  grad_q, grad_k, grad_v (the shapes of q, k, v)  grad_u: [B, Hkv, Lk]
//
// 1. SparseKBackwardReference: the float64 reference (reference/sparsek_backward_reference.hpp)
//    against central finite differences of the forward reference in q, k, v and u, for every
//    gate with and without window, sinks, softcap, GQA, non-causal; u is drawn so that no gate
//    sits near 0 or 1 and no two scores near each other (the gradient's breakpoints), and every
//    case has fractional gates, some of them on keys outside the selection.
// 2. SparseKBackward: the kernel against the reference over random shapes (1, primes, both sides
//    of the 64-row tiles and 128-key blocks), GQA/MQA, D != Dv, every gate, windows, sinks,
//    q_offset, softcap; grad_u wherever the scores are continuous (normal), q, k, v also for
//    tied integer scores.
// 3. Bitwise identical gradients for 1, 2 and 3 threads and for a second call; strided layouts
//    give the bits of contiguous ones and nothing outside the gradients is written; with every
//    key selected the gradients are foveal::attention_backward's, bit for bit.
// 4. SparseKBackwardErrors: every invalid argument throws foveal::Error naming it before any
//    gradient is written.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/backward.hpp"
#include "foveal/sparsek/attention.hpp"
#include "foveal/sparsek/backward.hpp"
#include "harness.hpp"
#include "reference/sparsek_backward_reference.hpp"
#include "sparsek_cases.hpp"

namespace foveal::test {
namespace {

// Tolerances on the normalized error, as the dense backward's (test_attention_backward.cpp):
// float 1e-4 (the forward's out and lse are float, the sums run over every row of a group), double
// 1e-9 (every source ~1e-15; anything computed in float on the way fails). grad_u adds one
// rounding of u − τ in T per gate and a difference of prefix sums per key (compensated).
template <typename T>
inline constexpr double kGradTolerance = std::is_same_v<T, float> ? 1e-4 : 1e-9;

constexpr SparseKGate kAllGates[] = {SparseKGate::value, SparseKGate::kv, SparseKGate::none};
constexpr Index kSweepLengths[] = {1, 2, 7, 13, 64, 65, 129, 200, 257};

struct Grads {
  std::vector<double> q, k, v, u;  // logical row-major
};

Shape<3> u_shape(const Problem& p) { return {p.batch, p.heads_kv, p.len_k}; }

std::vector<double> draw_grad_out(const Problem& p) {
  RandomSource random(p.seed * 31 + 5);
  return round_to<float>(random.normal(static_cast<std::size_t>(shape_numel<4>(p.out_shape()))));
}

// Scores N(0, stddev²) rounded to float, or small integers (ties everywhere).
std::vector<double> draw_scores(const Problem& p, std::uint64_t salt, double stddev,
                                bool integers = false) {
  RandomSource random(p.seed * 7919 + salt);
  std::vector<double> u =
      random.normal(static_cast<std::size_t>(shape_numel<3>(u_shape(p))), 0, stddev);
  if (integers)
    for (double& value : u) value = std::floor(std::abs(value) * 2);
  return round_to<float>(u);
}

Grads reference_grads(const Problem& p, const Inputs& in, const std::vector<double>& u,
                      const std::vector<double>& g, const SparseKOptions& o) {
  Grads r;
  reference::sparsek_backward_reference(shape_of(p), in.q, in.k, in.v, u, g, reference_options(o),
                                        r.q, r.k, r.v, r.u);
  return r;
}

// sparsek_attention<T> on contiguous copies: the out and lse a training step hands back.
template <typename T>
Outputs kernel_forward(const Problem& p, const Inputs& in, const std::vector<double>& u,
                       const SparseKOptions& o) {
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 3> scores(u, u_shape(p), Layout::kContiguous, T(0));
  const StridedBuffer<T, 4> out(p.out_shape(), Layout::kContiguous, T(0));
  const StridedBuffer<T, 3> lse(p.lse_shape(), Layout::kContiguous, T(0));
  sparsek_attention(q.const_view(), k.const_view(), v.const_view(), scores.const_view(), o,
                    out.view(), lse.view());
  return {gather(out.view()), gather(lse.view())};
}

// How a backward call is run: the layout of every tensor, the calls, whether grad_u is asked for.
struct Run {
  Layout layout = Layout::kContiguous;
  int calls = 1;
  bool with_grad_u = true;
};

// sparsek_attention_backward<T> on the inputs placed as `run.layout` (padding NaN), gradients
// starting as NaN; fails the test if anything outside the gradients changed.
template <typename T>
Grads run_backward(const Problem& p, const Inputs& in, const std::vector<double>& u,
                   const Outputs& forward, const std::vector<double>& g, const SparseKOptions& o,
                   const Run& run = {}) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), run.layout, nan);
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), run.layout, nan);
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), run.layout, nan);
  const StridedBuffer<T, 3> scores(u, u_shape(p), run.layout, nan);
  const StridedBuffer<T, 4> out(forward.out, p.out_shape(), run.layout, nan);
  const StridedBuffer<T, 3> lse(forward.lse, p.lse_shape(), run.layout, nan);
  const StridedBuffer<T, 4> grad_out(g, p.out_shape(), run.layout, nan);
  const StridedBuffer<T, 4> grad_q(p.q_shape(), run.layout, nan);
  const StridedBuffer<T, 4> grad_k(p.k_shape(), run.layout, nan);
  const StridedBuffer<T, 4> grad_v(p.v_shape(), run.layout, nan);
  const StridedBuffer<T, 3> grad_u(u_shape(p), run.layout, nan);
  for (const StridedBuffer<T, 4>* gradient : {&grad_q, &grad_k, &grad_v})
    for_each_element(gradient->view(), [&](T& element) { element = nan; });
  for_each_element(grad_u.view(), [&](T& element) { element = nan; });
  for (int call = 0; call < run.calls; ++call)
    sparsek_attention_backward(q.const_view(), k.const_view(), v.const_view(), scores.const_view(),
                               out.const_view(), lse.const_view(), grad_out.const_view(), o,
                               grad_q.view(), grad_k.view(), grad_v.view(),
                               run.with_grad_u ? grad_u.view() : TensorView<T, 3>());
  EXPECT_TRUE(grad_q.outside_untouched()) << "wrote outside grad_q";
  EXPECT_TRUE(grad_k.outside_untouched()) << "wrote outside grad_k";
  EXPECT_TRUE(grad_v.outside_untouched()) << "wrote outside grad_v";
  EXPECT_TRUE(grad_u.outside_untouched()) << "wrote outside grad_u";
  return {gather(grad_q.view()), gather(grad_k.view()), gather(grad_v.view()),
          run.with_grad_u ? gather(grad_u.view()) : std::vector<double>{}};
}

void expect_close(const Grads& got, const Grads& want, double tolerance, bool check_u) {
  EXPECT_TRUE(matches_reference(got.q, want.q, tolerance)) << "grad_q";
  EXPECT_TRUE(matches_reference(got.k, want.k, tolerance)) << "grad_k";
  EXPECT_TRUE(matches_reference(got.v, want.v, tolerance)) << "grad_v";
  if (check_u) {
    EXPECT_TRUE(matches_reference(got.u, want.u, tolerance)) << "grad_u";
  }
}

void expect_same_bits(const Grads& got, const Grads& want) {
  EXPECT_TRUE(bitwise_equal(got.q, want.q)) << "grad_q";
  EXPECT_TRUE(bitwise_equal(got.k, want.k)) << "grad_k";
  EXPECT_TRUE(bitwise_equal(got.v, want.v)) << "grad_v";
  EXPECT_TRUE(bitwise_equal(got.u, want.u)) << "grad_u";
}

// ---------------------------------------------------------------------------------------------
// 1. The reference against finite differences.

// Where the gates of a case sit: how many (query, pool key) pairs are fractional, inside and
// outside the selection, and the smallest distance of any score to a breakpoint of its query
// (u − τ = 0 or 1) or to another score of the pool (where the top-k set changes).
struct GateSurvey {
  Index fractional_selected = 0, fractional_unselected = 0;
  double margin = std::numeric_limits<double>::infinity();
};

GateSurvey survey_gates(const Problem& p, const std::vector<double>& u, const SparseKOptions& o) {
  const reference::SparseKReferenceOptions ro = reference_options(o);
  GateSurvey survey;
  for (Index row = 0; row < p.batch * p.heads_kv; ++row) {
    const std::vector<double> u_row(u.begin() + row * p.len_k, u.begin() + (row + 1) * p.len_k);
    for (Index i = 0; i < p.len_q; ++i) {
      const Index position = reference::query_position(ro, p.len_q, p.len_k, i);
      const std::vector<std::int64_t> pool = reference::selection_pool(ro, p.len_k, position);
      std::vector<double> scores, gates;
      for (std::int64_t j : pool) scores.push_back(u_row[j]);
      const double tau = reference::sparsek_reference(scores, o.topk, gates);
      const std::vector<std::int64_t> selected = reference::top_k_keys(u_row, pool, o.topk);
      for (std::size_t a = 0; a < pool.size(); ++a) {
        for (std::size_t b = a + 1; b < pool.size(); ++b)
          survey.margin = std::min(survey.margin, std::abs(scores[a] - scores[b]));
        if (!std::isfinite(tau)) continue;
        survey.margin =
            std::min({survey.margin, std::abs(scores[a] - tau), std::abs(scores[a] - tau - 1)});
        if (gates[a] > 0 && gates[a] < 1) {
          const bool in = std::binary_search(selected.begin(), selected.end(), pool[a]);
          ++(in ? survey.fractional_selected : survey.fractional_unselected);
        }
      }
    }
  }
  return survey;
}

double weighted_output(const Problem& p, const Inputs& in, const std::vector<double>& u,
                       const std::vector<double>& g, const SparseKOptions& o) {
  std::vector<double> out, lse;
  reference::sparsek_attention_reference(shape_of(p), in.q, in.k, in.v, u, reference_options(o),
                                         out, lse);
  double sum = 0;
  for (std::size_t i = 0; i < g.size(); ++i) sum += g[i] * out[i];
  return sum;
}

// Central differences of weighted_output, h = 1e-6 (the scores are >= 1e-3 from any breakpoint,
// so no step crosses one).
Grads finite_difference_grads(const Problem& p, const Inputs& in, const std::vector<double>& u,
                              const std::vector<double>& g, const SparseKOptions& o) {
  constexpr double kStep = 1e-6;
  Inputs moved = in;
  std::vector<double> moved_u = u;
  const auto differentiate = [&](std::vector<double>& values) {
    return central_differences(values, kStep,
                               [&] { return weighted_output(p, moved, moved_u, g, o); });
  };
  Grads r;
  r.q = differentiate(moved.q);
  r.k = differentiate(moved.k);
  r.v = differentiate(moved.v);
  r.u = differentiate(moved_u);
  return r;
}

// The first scores (seeds from p.seed on) whose gates are >= 1e-3 from every breakpoint.
std::vector<double> scores_away_from_breakpoints(const Problem& p, const SparseKOptions& o,
                                                 GateSurvey* survey) {
  for (std::uint64_t salt = 1;; ++salt) {
    const std::vector<double> u = draw_scores(p, salt, 0.7);
    *survey = survey_gates(p, u, o);
    if (survey->margin > 1e-3) return u;
  }
}

void expect_reference_matches_finite_differences(const Problem& p, const SparseKOptions& o) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", sparsek_options_string(o)));
  const Inputs in = random_inputs(p);
  const std::vector<double> g = draw_grad_out(p);
  GateSurvey survey;
  const std::vector<double> u = scores_away_from_breakpoints(p, o, &survey);
  const Grads analytic = reference_grads(p, in, u, g, o);
  const Grads numeric = finite_difference_grads(p, in, u, g, o);
  expect_close(analytic, numeric, 1e-7, true);
  const std::vector<double> zeros(analytic.u.size(), 0.0);
  if (o.gate == SparseKGate::none) {
    EXPECT_TRUE(bitwise_equal(analytic.u, zeros));
  } else {
    // The case exercises the Jacobian: fractional gates, some on unselected pool keys (which
    // get a gradient only through τ), and a gradient to u that is not zero.
    EXPECT_GT(survey.fractional_selected, 0);
    EXPECT_GT(survey.fractional_unselected, 0);
    EXPECT_GT(max_normalized_error(analytic.u, zeros).value, 1e-3);
  }
}

TEST(SparseKBackwardReference, MatchesFiniteDifferencesCausal) {
  for (SparseKGate gate : kAllGates)
    expect_reference_matches_finite_differences(make_problem(1, 2, 1, 7, 9, 3, 4, 200),
                                                sparsek_options(3, 0, 0, gate));
}

TEST(SparseKBackwardReference, MatchesFiniteDifferencesWithWindowAndSinks) {
  for (SparseKGate gate : kAllGates)
    expect_reference_matches_finite_differences(make_problem(1, 2, 2, 8, 11, 3, 2, 201),
                                                sparsek_options(2, 2, 1, gate));
}

TEST(SparseKBackwardReference, MatchesFiniteDifferencesNonCausalGqaSoftcap) {
  for (SparseKGate gate : kAllGates) {
    SparseKOptions o = sparsek_options(3, 0, 1, gate, false);
    o.softcap = 0.8;
    o.scale = 1.3;
    expect_reference_matches_finite_differences(make_problem(2, 3, 1, 4, 8, 4, 3, 202), o);
  }
}

TEST(SparseKBackwardReference, MatchesFiniteDifferencesWithQueryOffset) {
  for (SparseKGate gate : {SparseKGate::value, SparseKGate::kv}) {
    SparseKOptions o = sparsek_options(2, 1, 0, gate);
    o.q_offset = 3;
    expect_reference_matches_finite_differences(make_problem(1, 1, 1, 6, 10, 2, 3, 203), o);
  }
}

// ---------------------------------------------------------------------------------------------
// 2. The kernel against the reference.

template <typename T>
class SparseKBackward : public ::testing::Test {};
TYPED_TEST_SUITE(SparseKBackward, ElementTypes, ElementTypeNames);

// The kernel's gradients for `p`, `o` and `u` (forward by the kernel, as in training) against
// the reference's; grad_u only where the scores are continuous.
template <typename T>
void expect_kernel_matches_reference(const Problem& p, const SparseKOptions& o,
                                     const std::vector<double>& u, bool check_u) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", sparsek_options_string(o)));
  const Inputs in = random_inputs(p);
  const std::vector<double> g = draw_grad_out(p);
  const Grads want = reference_grads(p, in, u, g, o);
  const Grads got = run_backward<T>(p, in, u, kernel_forward<T>(p, in, u, o), g, o);
  expect_close(got, want, kGradTolerance<T>, check_u);
}

SparseKOptions random_options(RandomSource& random, const Problem& p) {
  SparseKOptions o;
  o.gate = random.pick(kAllGates);
  o.causal = random.chance(0.8);
  o.topk = random.pick(
      {Index{1}, Index{2}, Index{3}, Index{7}, Index{16}, Index{64}, Index{200}, Index{300}});
  o.sink_tokens = random.pick({Index{0}, Index{0}, Index{1}, Index{3}});
  if (o.causal) {
    o.window = random.pick({Index{0}, Index{0}, Index{1}, Index{5}, Index{33}});
    if (random.chance(0.25)) o.q_offset = random.integer(0, 2 * p.len_k);
  }
  if (random.chance(0.2)) o.softcap = 4.0;
  if (random.chance(0.2)) o.scale = 0.3;
  return o;
}

TYPED_TEST(SparseKBackward, MatchesReferenceOnRandomShapesAndOptions) {
  for (std::uint64_t seed = 300; seed < 336; ++seed) {
    const Problem p = random_problem(seed, 3e6, kSweepLengths, 6);
    RandomSource random(seed);
    const SparseKOptions o = random_options(random, p);
    const bool integers = seed % 4 == 0;  // ties: q, k, v only (u − τ sits on breakpoints)
    expect_kernel_matches_reference<TypeParam>(p, o, draw_scores(p, 1, 1.0, integers), !integers);
  }
}

TYPED_TEST(SparseKBackward, MatchesReferenceWithWindowSinksAndLongUnions) {
  // Lq * group > 64 (several tiles) and unions over 128 keys (several gathered blocks).
  for (SparseKGate gate : kAllGates) {
    const Problem p = make_problem(1, 4, 2, 150, 300, 16, 24, 400);
    expect_kernel_matches_reference<TypeParam>(p, sparsek_options(140, 33, 3, gate),
                                               draw_scores(p, 1, 1.0), true);
    const Problem mqa = make_problem(2, 3, 1, 67, 131, 31, 5, 401);
    expect_kernel_matches_reference<TypeParam>(mqa, sparsek_options(20, 0, 2, gate, false),
                                               draw_scores(mqa, 1, 0.5), true);
  }
}

TYPED_TEST(SparseKBackward, MatchesReferenceWithSoftcapAndQueryOffset) {
  for (SparseKGate gate : kAllGates) {
    SparseKOptions o = sparsek_options(9, 4, 1, gate);
    o.softcap = 2.0;
    o.scale = 0.9;
    o.q_offset = 40;
    const Problem p = make_problem(1, 2, 1, 70, 97, 8, 13, 402);
    expect_kernel_matches_reference<TypeParam>(p, o, draw_scores(p, 1, 1.0), true);
  }
}

TYPED_TEST(SparseKBackward, RowsThatSeeNothingAndEmptyQueries) {
  for (SparseKGate gate : kAllGates) {
    // q_offset 0 with no window: the first query sees only key 0 (pool of one); Lq > Lk.
    SparseKOptions o = sparsek_options(2, 0, 0, gate);
    o.q_offset = 0;
    const Problem p = make_problem(1, 2, 1, 9, 5, 3, 3, 403);
    expect_kernel_matches_reference<TypeParam>(p, o, draw_scores(p, 1, 1.0), true);
    // No queries: every gradient of k, v and u is zero, none is left unwritten.
    const Problem empty = make_problem(1, 2, 1, 0, 6, 3, 3, 404);
    const Inputs in = random_inputs(empty);
    const std::vector<double> u = draw_scores(empty, 1, 1.0);
    const Grads got =
        run_backward<TypeParam>(empty, in, u, {{}, {}}, {}, sparsek_options(2, 0, 0, gate));
    EXPECT_TRUE(bitwise_equal(got.k, std::vector<double>(got.k.size(), 0.0)));
    EXPECT_TRUE(bitwise_equal(got.v, std::vector<double>(got.v.size(), 0.0)));
    EXPECT_TRUE(bitwise_equal(got.u, std::vector<double>(got.u.size(), 0.0)));
  }
}

TYPED_TEST(SparseKBackward, GateNoneHasZeroScoreGradientAndGradUIsOptional) {
  const Problem p = make_problem(1, 2, 1, 80, 80, 8, 8, 405);
  const Inputs in = random_inputs(p);
  const std::vector<double> g = draw_grad_out(p);
  const std::vector<double> u = draw_scores(p, 1, 1.0);
  for (SparseKGate gate : kAllGates) {
    const SparseKOptions o = sparsek_options(10, 3, 1, gate);
    const Outputs forward = kernel_forward<TypeParam>(p, in, u, o);
    const Grads with_u = run_backward<TypeParam>(p, in, u, forward, g, o);
    Run without;
    without.with_grad_u = false;
    Grads without_u = run_backward<TypeParam>(p, in, u, forward, g, o, without);
    without_u.u = with_u.u;
    expect_same_bits(without_u, with_u);
    if (gate == SparseKGate::none) {
      EXPECT_TRUE(bitwise_equal(with_u.u, std::vector<double>(with_u.u.size(), 0.0)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 3. Determinism, layouts, dense equality.

TYPED_TEST(SparseKBackward, BitwiseIdenticalForThreadCountsAndRepeatedCalls) {
  const Problem p = make_problem(2, 4, 2, 197, 211, 16, 12, 500);
  const Inputs in = random_inputs(p);
  const std::vector<double> g = draw_grad_out(p);
  const std::vector<double> u = draw_scores(p, 1, 1.0);
  for (SparseKGate gate : kAllGates) {
    SparseKOptions o = sparsek_options(24, 17, 2, gate);
    o.num_threads = 1;
    const Outputs forward = kernel_forward<TypeParam>(p, in, u, o);
    Run twice;
    twice.calls = 2;
    const Grads first = run_backward<TypeParam>(p, in, u, forward, g, o);
    expect_same_bits(run_backward<TypeParam>(p, in, u, forward, g, o, twice), first);
    for (int threads : {2, 3}) {
      SCOPED_TRACE(describe("threads=", threads, " gate=", to_string(gate)));
      o.num_threads = threads;
      expect_same_bits(run_backward<TypeParam>(p, in, u, forward, g, o), first);
    }
  }
}

TYPED_TEST(SparseKBackward, StridedLayoutsGiveTheBitsOfContiguous) {
  const Problem p = make_problem(1, 2, 1, 70, 70, 16, 16, 501);
  const Inputs in = random_inputs(p);
  const std::vector<double> g = draw_grad_out(p);
  const std::vector<double> u = draw_scores(p, 1, 1.0);
  const SparseKOptions o = sparsek_options(12, 5, 1, SparseKGate::kv);
  const Outputs forward = kernel_forward<TypeParam>(p, in, u, o);
  const Grads contiguous = run_backward<TypeParam>(p, in, u, forward, g, o);
  for (Layout layout : {Layout::kSwapped12, Layout::kPadded, Layout::kReversed}) {
    SCOPED_TRACE(layout_name(layout));
    Run run;
    run.layout = layout;
    expect_same_bits(run_backward<TypeParam>(p, in, u, forward, g, o, run), contiguous);
  }
}

TYPED_TEST(SparseKBackward, EveryKeySelectedIsDenseCausalBackward) {
  // topk >= Lk, no window, no sinks: every gate is 1, so every gate gives dense causal
  // attention's gradients, bit for bit, and no gradient reaches u.
  const Problem p = make_problem(1, 4, 2, 100, 150, 16, 8, 502);
  const Inputs in = random_inputs(p);
  const std::vector<double> g = draw_grad_out(p);
  const std::vector<double> u = draw_scores(p, 1, 1.0);
  AttentionOptions dense;
  dense.causal = true;
  const Outputs forward = run_attention<TypeParam>(p, in, dense);
  const Grads want = [&] {
    const TypeParam nan = std::numeric_limits<TypeParam>::quiet_NaN();
    const StridedBuffer<TypeParam, 4> q(in.q, p.q_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> k(in.k, p.k_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> v(in.v, p.v_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> out(forward.out, p.out_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 3> lse(forward.lse, p.lse_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> grad_out(g, p.out_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> grad_q(p.q_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> grad_k(p.k_shape(), Layout::kContiguous, nan);
    const StridedBuffer<TypeParam, 4> grad_v(p.v_shape(), Layout::kContiguous, nan);
    attention_backward(q.const_view(), k.const_view(), v.const_view(), out.const_view(),
                       lse.const_view(), grad_out.const_view(), grad_q.view(), grad_k.view(),
                       grad_v.view(), dense);
    return Grads{gather(grad_q.view()), gather(grad_k.view()), gather(grad_v.view()),
                 std::vector<double>(static_cast<std::size_t>(shape_numel<3>(u_shape(p))), 0.0)};
  }();
  for (SparseKGate gate : kAllGates) {
    SCOPED_TRACE(to_string(gate));
    expect_same_bits(
        run_backward<TypeParam>(p, in, u, forward, g, sparsek_options(150, 0, 0, gate)), want);
  }
}

// ---------------------------------------------------------------------------------------------
// 4. Rejected arguments.

// Valid float arguments of a small case; each test breaks one.
struct BadCall {
  Problem p = make_problem(1, 2, 1, 5, 6, 4, 3, 600);
  std::vector<float> q, k, v, u, out, lse, grad_out;
  std::vector<float> grad_q, grad_k, grad_v, grad_u;
  SparseKOptions options = sparsek_options(2, 1, 1, SparseKGate::value);

  BadCall() {
    const Inputs in = random_inputs(p);
    q = convert<float>(in.q);
    k = convert<float>(in.k);
    v = convert<float>(in.v);
    u = convert<float>(draw_scores(p, 1, 1.0));
    out.assign(static_cast<std::size_t>(shape_numel<4>(p.out_shape())), 0.5f);
    lse.assign(static_cast<std::size_t>(shape_numel<3>(p.lse_shape())), 0.25f);
    grad_out = convert<float>(draw_grad_out(p));
    grad_q.assign(q.size(), 7.0f);
    grad_k.assign(k.size(), 7.0f);
    grad_v.assign(v.size(), 7.0f);
    grad_u.assign(u.size(), 7.0f);
  }
  TensorView<const float, 4> view4(const std::vector<float>& data, const Shape<4>& s) const {
    return TensorView<const float, 4>(data.data(), s);
  }
  TensorView<float, 4> out4(std::vector<float>& data, const Shape<4>& s) {
    return TensorView<float, 4>(data.data(), s);
  }
  TensorView<const float, 4> qv() const { return view4(q, p.q_shape()); }
  TensorView<const float, 4> kv() const { return view4(k, p.k_shape()); }
  TensorView<const float, 4> vv() const { return view4(v, p.v_shape()); }
  TensorView<const float, 3> uv() const { return TensorView<const float, 3>(u.data(), u_shape(p)); }
  TensorView<const float, 4> outv() const { return view4(out, p.out_shape()); }
  TensorView<const float, 3> lsev() const {
    return TensorView<const float, 3>(lse.data(), p.lse_shape());
  }
  TensorView<const float, 4> gv() const { return view4(grad_out, p.out_shape()); }
  TensorView<float, 4> gq() { return out4(grad_q, p.q_shape()); }
  TensorView<float, 4> gk() { return out4(grad_k, p.k_shape()); }
  TensorView<float, 4> gvv() { return out4(grad_v, p.v_shape()); }
  TensorView<float, 3> gu() { return TensorView<float, 3>(grad_u.data(), u_shape(p)); }

  bool gradients_untouched() const {
    for (const std::vector<float>* gradient : {&grad_q, &grad_k, &grad_v, &grad_u})
      for (float value : *gradient)
        if (value != 7.0f) return false;
    return true;
  }
};

// call(bad) throws naming every piece and leaves every gradient as it was.
template <typename Call>
void expect_rejected(BadCall& bad, Call&& call, std::initializer_list<std::string> pieces) {
  EXPECT_TRUE(throws_error_with([&] { call(bad); }, pieces));
  EXPECT_TRUE(bad.gradients_untouched());
}

void call_backward(BadCall& b) {
  sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(), b.gv(), b.options,
                             b.gq(), b.gk(), b.gvv(), b.gu());
}

TEST(SparseKBackwardErrors, AValidCallWrites) {
  BadCall bad;
  call_backward(bad);
  EXPECT_FALSE(bad.gradients_untouched());
}

TEST(SparseKBackwardErrors, OptionsAndScores) {
  BadCall bad;
  bad.options.topk = 0;
  expect_rejected(bad, call_backward, {"sparsek_attention_backward", "topk must be >= 1"});
  bad.options = sparsek_options(2, 3, 0, SparseKGate::value, false);
  expect_rejected(bad, call_backward, {"sparsek_attention_backward", "window needs causal"});
  bad = BadCall();
  bad.u[4] = std::numeric_limits<float>::infinity();
  expect_rejected(bad, call_backward, {"u[0, 0, 4] must be finite"});
}

TEST(SparseKBackwardErrors, LseMissingOrMisshaped) {
  BadCall bad;
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(),
                                               TensorView<const float, 3>(), b.gv(), b.options,
                                               b.gq(), b.gk(), b.gvv(), b.gu());
                  },
                  {"lse is required"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(),
                                               TensorView<const float, 3>(b.lse.data(), {1, 2, 4}),
                                               b.gv(), b.options, b.gq(), b.gk(), b.gvv(), b.gu());
                  },
                  {"lse.shape[2] must equal q.shape[2] (Lq) = 5, got 4"});
}

TEST(SparseKBackwardErrors, GradientShapesAndStrides) {
  BadCall bad;
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(),
                                               b.gv(), b.options, b.gq(), b.gk(), b.gvv(),
                                               TensorView<float, 3>(b.grad_u.data(), {1, 1, 5}));
                  },
                  {"grad_u.shape[2] must equal u.shape[2] (Lk) = 6, got 5"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(),
                                               b.gv(), b.options, b.out4(b.grad_q, {1, 2, 5, 3}),
                                               b.gk(), b.gvv(), b.gu());
                  },
                  {"grad_q.shape[3] must equal q.shape[3] (D) = 4, got 3"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(),
                                               b.view4(b.grad_out, {1, 2, 5, 2}), b.options, b.gq(),
                                               b.gk(), b.gvv(), b.gu());
                  },
                  {"grad_out.shape[3] must equal out.shape[3] (Dv) = 3, got 2"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    // Every key of grad_u on one element: a self-overlapping output.
                    sparsek_attention_backward(
                        b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(), b.gv(), b.options,
                        b.gq(), b.gk(), b.gvv(),
                        TensorView<float, 3>(b.grad_u.data(), {1, 1, 6}, {6, 6, 0}));
                  },
                  {"grad_u is an output whose elements may overlap"});
}

TEST(SparseKBackwardErrors, NonFiniteGradOut) {
  BadCall bad;
  bad.grad_out[7] = std::numeric_limits<float>::quiet_NaN();
  expect_rejected(bad, call_backward, {"grad_out[0, 0, 2, 1] must be finite, got nan"});
}

TEST(SparseKBackwardErrors, GradientsOverlappingInputsOrEachOther) {
  BadCall bad;
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(),
                                               b.gv(), b.options, b.gq(), b.gk(), b.gvv(),
                                               TensorView<float, 3>(b.u.data(), u_shape(b.p)));
                  },
                  {"grad_u must not overlap u"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(),
                                               b.gv(), b.options, b.gq(), b.gk(), b.gvv(),
                                               TensorView<float, 3>(b.grad_k.data(), u_shape(b.p)));
                  },
                  {"grad_u must not overlap grad_k"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    std::vector<float>& shared = b.grad_v;  // grad_k and u placed in one buffer
                    shared.resize(64, 7.0f);
                    sparsek_attention_backward(
                        b.qv(), b.kv(), b.vv(),
                        TensorView<const float, 3>(shared.data() + 40, u_shape(b.p)), b.outv(),
                        b.lsev(), b.gv(), b.options, b.gq(),
                        TensorView<float, 4>(shared.data() + 20, b.p.k_shape()),
                        b.out4(b.grad_k, b.p.v_shape()), b.gu());
                  },
                  {"grad_k must not overlap u"});
  expect_rejected(bad,
                  [](BadCall& b) {
                    sparsek_attention_backward(
                        b.qv(), b.kv(), b.vv(), b.uv(), b.outv(), b.lsev(), b.gv(), b.options,
                        b.gq(), b.gk(), b.gvv(),
                        TensorView<float, 3>(b.grad_out.data(), u_shape(b.p)));
                  },
                  {"grad_u must not overlap grad_out"});
}

}  // namespace
}  // namespace foveal::test
