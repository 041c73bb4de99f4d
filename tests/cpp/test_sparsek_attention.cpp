// tests/cpp/test_sparsek_attention.cpp — SparseK attention (docs/sparsek.md) against
// tests/reference/sparsek_attention_reference.hpp.
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  u: [B, Hkv, Lk]
//   ->  out: [B, Hq, Lq, Dv]  lse: [B, Hq, Lq]
// The prefix thresholds, the selection (indices and gates), the attention for every gate, the
// linear scorer and the registry kernel, each against the float64 reference, for float and
// double, over shapes that include 1, primes and lengths past the engine's 64-row tiles and
// 128-key blocks; plus thread-count determinism, strided views, the promised equality with
// dense causal attention, and every rejected argument. Each case prints its seed on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/registry.hpp"
#include "foveal/sparsek/attention.hpp"
#include "harness.hpp"
#include "reference/sparsek_attention_reference.hpp"
#include "sparsek_cases.hpp"

namespace foveal::test {
namespace {

// Tolerances on the normalized error (harness.hpp). float: the attention engine's (see
// attention_cases.hpp; the gates add one rounding of u − τ, ~1e-7 of |u|); double: sums of a
// few hundred products and a τ solved in double stay near 1e-14, so 1e-12 still catches any
// step that drops to float.
template <typename T>
inline constexpr double kSparseKTolerance = std::is_same_v<T, float> ? 2e-5 : 1e-12;

constexpr SparseKGate kGates[] = {SparseKGate::value, SparseKGate::kv, SparseKGate::none};

// ---------------------------------------------------------------------------------------------
// Scores.

// How a case's scores u are drawn: N(0, 1.5²) (several gates fractional), small integers
// (many ties, where the lower index must win), or all equal (every key tied).
enum class Scores { kNormal, kIntegers, kEqual };

const char* scores_name(Scores scores) {
  switch (scores) {
    case Scores::kNormal:
      return "normal";
    case Scores::kIntegers:
      return "integers 0..4";
    case Scores::kEqual:
      return "all equal";
  }
  return "?";
}

// `count` scores drawn from `seed`, rounded to float (exact for float, double and the reference).
std::vector<double> random_scores(std::uint64_t seed, Index count, Scores scores) {
  RandomSource random(seed);
  std::vector<double> values;
  switch (scores) {
    case Scores::kNormal:
      values = random.normal(static_cast<std::size_t>(count), 0, 1.5);
      break;
    case Scores::kIntegers:
      for (Index i = 0; i < count; ++i) values.push_back(static_cast<double>(random.integer(0, 4)));
      break;
    case Scores::kEqual:
      values.assign(static_cast<std::size_t>(count), 0.5);
      break;
  }
  return round_to<float>(values);
}

// The scores u: [B, Hkv, Lk] of problem `p` (a stream apart from its q, k, v).
std::vector<double> problem_scores(const Problem& p, Scores scores) {
  return random_scores(p.seed * 7919 + 17, p.batch * p.heads_kv * p.len_k, scores);
}

// ---------------------------------------------------------------------------------------------
// Calls and the reference (options: sparsek_cases.hpp).

// The float64 reference's out and lse.
Outputs sparsek_reference_outputs(const Problem& p, const Inputs& in, const std::vector<double>& u,
                                  const SparseKOptions& o) {
  const reference::AttentionShape shape{p.batch, p.heads_q, p.heads_kv, p.len_q,
                                        p.len_k, p.dim,     p.dim_v};
  Outputs result;
  reference::sparsek_attention_reference(shape, in.q, in.k, in.v, u, reference_options(o),
                                         result.out, result.lse);
  return result;
}

// sparsek_attention as an entry point of run_entry (which passes dense options and no bias).
template <typename T>
struct SparseKCall {
  TensorView<const T, 3> u;
  SparseKOptions options;
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions&, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>&) const {
    sparsek_attention(q, k, v, u, options, out, lse);
  }
};

// sparsek_attention<T> on T copies of the inputs placed as `layouts` (u as `u_layout`); fails
// the test when anything outside out or lse changed.
template <typename T>
Outputs run_sparsek(const Problem& p, const Inputs& in, const std::vector<double>& u,
                    const SparseKOptions& o, const Layouts& layouts = {},
                    Layout u_layout = Layout::kContiguous, bool with_lse = true) {
  const StridedBuffer<T, 3> scores(u, {p.batch, p.heads_kv, p.len_k}, u_layout,
                                   std::numeric_limits<T>::quiet_NaN());
  return run_entry<T>(SparseKCall<T>{scores.const_view(), o}, p, in, AttentionOptions{}, layouts,
                      with_lse);
}

// sparsek_attention in float and in double agrees with one float64 reference run.
void expect_matches_reference(const Problem& p, const SparseKOptions& o,
                              Scores scores = Scores::kNormal) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", sparsek_options_string(o),
                        " scores=", scores_name(scores)));
  const Inputs in = random_inputs(p);
  const std::vector<double> u = problem_scores(p, scores);
  const Outputs want = sparsek_reference_outputs(p, in, u, o);
  {
    SCOPED_TRACE("float");
    const Outputs got = run_sparsek<float>(p, in, u, o);
    EXPECT_TRUE(matches_reference(got.out, want.out, kSparseKTolerance<float>)) << "out";
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kSparseKTolerance<float>)) << "lse";
  }
  {
    SCOPED_TRACE("double");
    const Outputs got = run_sparsek<double>(p, in, u, o);
    EXPECT_TRUE(matches_reference(got.out, want.out, kSparseKTolerance<double>)) << "out";
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kSparseKTolerance<double>)) << "lse";
  }
}

// ---------------------------------------------------------------------------------------------
// Prefix thresholds.

// The row lengths and budgets the threshold tests sweep: 1, primes, a tile's worth and more;
// k = 1, 2, 5, n/2, n − 1, n and more than n.
constexpr Index kRowLengths[] = {1, 2, 3, 7, 13, 64, 127, 211};

std::vector<Index> prefix_budgets(Index n) {
  std::vector<Index> budgets;
  for (Index k : {Index{1}, Index{2}, Index{5}, n / 2, n - 1, n, n + 4})
    if (k >= 1) budgets.push_back(k);
  return budgets;
}

// tau and evicted_at of sparsek_prefix_thresholds<T> on `rows` rows of length n.
template <typename T>
void prefix_thresholds_of(const std::vector<double>& z, Index rows, Index n, Index k,
                          std::vector<double>& tau, std::vector<std::int64_t>& evicted_at,
                          int num_threads = 0) {
  const std::vector<T> z_t = convert<T>(z);
  std::vector<T> tau_t(static_cast<std::size_t>(rows * n), T(-7));
  evicted_at.assign(static_cast<std::size_t>(rows * n), -7);
  sparsek_prefix_thresholds(TensorView<const T, 2>(z_t.data(), {rows, n}), k,
                            TensorView<T, 2>(tau_t.data(), {rows, n}),
                            TensorView<std::int64_t, 2>(evicted_at.data(), {rows, n}), num_threads);
  tau.assign(tau_t.begin(), tau_t.end());
}

// prefix_thresholds_of<float> when `in_float`, else <double>.
void prefix_thresholds_in(bool in_float, const std::vector<double>& z, Index rows, Index n, Index k,
                          std::vector<double>& tau, std::vector<std::int64_t>& evicted_at) {
  if (in_float) {
    prefix_thresholds_of<float>(z, rows, n, k, tau, evicted_at);
  } else {
    prefix_thresholds_of<double>(z, rows, n, k, tau, evicted_at);
  }
}

// τ (of type T) solves SPARSEK of the prefix: it lies in the reference's interval of solutions
// (a point unless every entry is 0 or 1), up to one rounding to T and the double sums of m
// scores; exactly −inf while the prefix holds <= k keys.
template <typename T>
::testing::AssertionResult threshold_matches(double tau, const reference::ThresholdInterval& want,
                                             Index m, Index k) {
  if (m <= k) {
    if (tau == -kInfinity) return ::testing::AssertionSuccess();
    return ::testing::AssertionFailure() << "prefix " << m << " <= k: tau " << tau << " != -inf";
  }
  const double magnitude = 1 + std::max(std::abs(want.low), std::abs(want.high));
  const double tolerance = (8 * std::numeric_limits<T>::epsilon() +
                            16 * static_cast<double>(m) * std::numeric_limits<double>::epsilon()) *
                           magnitude;
  if (tau >= want.low - tolerance && tau <= want.high + tolerance)
    return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << "prefix " << m << ": tau " << tau << " outside [" << want.low << ", " << want.high
         << "] (tolerance " << tolerance << ")";
}

// The scores of a threshold row case: normal with spread 2, integers or all equal.
std::vector<double> threshold_scores(std::uint64_t seed, Index count, Scores scores) {
  std::vector<double> z = random_scores(seed, count, scores);
  if (scores == Scores::kNormal)
    for (double& value : z) value = static_cast<float>(value * 4 / 3);  // spread 2
  return z;
}

// The rows each sweep case holds.
constexpr Index kSweepRows = 2;

// Calls check(z, n, k) for every score kind, row length of kRowLengths and budget of
// prefix_budgets, z holding kSweepRows rows of n scores drawn from a seed counted up from
// `first_seed` (traced).
template <typename Check>
void for_each_threshold_case(std::uint64_t first_seed, Check&& check) {
  std::uint64_t seed = first_seed;
  for (Scores scores : {Scores::kNormal, Scores::kIntegers, Scores::kEqual})
    for (Index n : kRowLengths)
      for (Index k : prefix_budgets(n)) {
        ++seed;
        SCOPED_TRACE(describe("seed=", seed, " n=", n, " k=", k, " scores=", scores_name(scores)));
        check(threshold_scores(seed, kSweepRows * n, scores), n, k);
      }
}

TEST(SparseKPrefixThresholds, MatchReferenceForEveryPrefix) {
  for_each_threshold_case(20000, [](const std::vector<double>& z, Index n, Index k) {
    std::vector<double> tau_float, tau_double;
    std::vector<std::int64_t> evicted;
    prefix_thresholds_of<float>(z, kSweepRows, n, k, tau_float, evicted);
    prefix_thresholds_of<double>(z, kSweepRows, n, k, tau_double, evicted);
    for (Index r = 0; r < kSweepRows; ++r) {
      const std::vector<double> row(z.begin() + r * n, z.begin() + (r + 1) * n);
      const std::vector<reference::ThresholdInterval> want =
          reference::prefix_threshold_intervals(row, k);
      for (Index m = 1; m <= n; ++m) {
        ASSERT_TRUE(threshold_matches<float>(tau_float[r * n + m - 1], want[m - 1], m, k))
            << "float, row " << r;
        ASSERT_TRUE(threshold_matches<double>(tau_double[r * n + m - 1], want[m - 1], m, k))
            << "double, row " << r;
      }
    }
  });
}

TEST(SparseKPrefixThresholds, MatchReferenceOnLongRowsAtSampledPrefixes) {
  // n = 4099 exercises the O(n log n) path beyond anything the full sweep reaches; the
  // reference solves ~40 prefixes from scratch.
  const Index n = 4099;
  std::uint64_t seed = 21000;
  for (Scores scores : {Scores::kNormal, Scores::kIntegers})
    for (Index k : {Index{1}, Index{64}, Index{1000}, n - 1}) {
      ++seed;
      SCOPED_TRACE(describe("seed=", seed, " n=", n, " k=", k, " scores=", scores_name(scores)));
      const std::vector<double> z = threshold_scores(seed, n, scores);
      std::vector<double> tau_float, tau_double;
      std::vector<std::int64_t> evicted;
      prefix_thresholds_of<float>(z, 1, n, k, tau_float, evicted);
      prefix_thresholds_of<double>(z, 1, n, k, tau_double, evicted);
      std::vector<Index> prefixes = {k, std::min(n, k + 1), n};
      for (Index m = 1; m <= n; m += (m < 70 ? 23 : 211)) prefixes.push_back(m);
      for (Index m : prefixes) {
        const std::vector<double> prefix(z.begin(), z.begin() + m);
        const reference::ThresholdInterval want = reference::sparsek_threshold_interval(prefix, k);
        ASSERT_TRUE(threshold_matches<float>(tau_float[m - 1], want, m, k)) << "float";
        ASSERT_TRUE(threshold_matches<double>(tau_double[m - 1], want, m, k)) << "double";
      }
    }
}

TEST(SparseKPrefixThresholds, NeverDecrease) {
  std::uint64_t seed = 22000;
  const Index rows = 3, n = 3001;
  for (Scores scores : {Scores::kNormal, Scores::kEqual})
    for (Index k : {Index{1}, Index{2}, Index{17}, Index{256}, Index{2999}}) {
      ++seed;
      SCOPED_TRACE(describe("seed=", seed, " n=", n, " k=", k, " scores=", scores_name(scores)));
      const std::vector<double> z = threshold_scores(seed, rows * n, scores);
      for (bool is_float : {true, false}) {
        SCOPED_TRACE(is_float ? "float" : "double");
        std::vector<double> tau;
        std::vector<std::int64_t> evicted;
        prefix_thresholds_in(is_float, z, rows, n, k, tau, evicted);
        for (Index r = 0; r < rows; ++r)
          for (Index m = 2; m <= n; ++m)
            ASSERT_GE(tau[r * n + m - 1], tau[r * n + m - 2]) << "row " << r << " prefix " << m;
      }
    }
}

TEST(SparseKPrefixThresholds, EvictedAtGivesTheTopKSetOfEveryPrefix) {
  // The top-k set of the prefix of length m is { j < m : m < evicted_at[j] }, with
  // j + 1 <= evicted_at[j] <= n + 1; ties go to the lower index.
  for_each_threshold_case(23000, [](const std::vector<double>& z, Index n, Index k) {
    for (bool is_float : {true, false}) {
      SCOPED_TRACE(is_float ? "float" : "double");
      std::vector<double> tau;
      std::vector<std::int64_t> evicted;
      prefix_thresholds_in(is_float, z, kSweepRows, n, k, tau, evicted);
      for (Index r = 0; r < kSweepRows; ++r) {
        const std::vector<double> row(z.begin() + r * n, z.begin() + (r + 1) * n);
        const std::vector<std::vector<std::int64_t>> sets = reference::prefix_top_k_sets(row, k);
        for (Index j = 0; j < n; ++j) {
          ASSERT_GE(evicted[r * n + j], j + 1) << "row " << r << " key " << j;
          ASSERT_LE(evicted[r * n + j], n + 1) << "row " << r << " key " << j;
        }
        for (Index m = 1; m <= n; ++m) {
          std::vector<std::int64_t> selected;
          for (Index j = 0; j < m; ++j)
            if (m < evicted[r * n + j]) selected.push_back(j);
          ASSERT_EQ(selected, sets[m]) << "row " << r << " prefix " << m;
        }
      }
    }
  });
}

TEST(SparseKPrefixThresholds, IdenticalForOneTwoThreeThreads) {
  const Index rows = 7, n = 2003, k = 100;
  const std::vector<double> z = threshold_scores(24000, rows * n, Scores::kNormal);
  std::vector<double> tau1, tau2, tau3;
  std::vector<std::int64_t> evicted1, evicted2, evicted3;
  prefix_thresholds_of<float>(z, rows, n, k, tau1, evicted1, 1);
  prefix_thresholds_of<float>(z, rows, n, k, tau2, evicted2, 2);
  prefix_thresholds_of<float>(z, rows, n, k, tau3, evicted3, 3);
  EXPECT_TRUE(bitwise_equal(tau2, tau1));
  EXPECT_TRUE(bitwise_equal(tau3, tau1));
  EXPECT_EQ(evicted2, evicted1);
  EXPECT_EQ(evicted3, evicted1);
}

TEST(SparseKPrefixThresholds, EvictedAtIsOptionalAndEmptyRowsAreFine) {
  const std::vector<float> z = {0.5f, 2.0f, -1.0f, 3.0f};
  std::vector<float> with(4), without(4);
  std::vector<std::int64_t> evicted(4);
  sparsek_prefix_thresholds(TensorView<const float, 2>(z.data(), {1, 4}), 2,
                            TensorView<float, 2>(with.data(), {1, 4}),
                            TensorView<std::int64_t, 2>(evicted.data(), {1, 4}));
  sparsek_prefix_thresholds(TensorView<const float, 2>(z.data(), {1, 4}), 2,
                            TensorView<float, 2>(without.data(), {1, 4}));
  EXPECT_EQ(with, without);
  // Keys 0 and 1 fill the budget; key 3 evicts key 0 at prefix 4; key 2 never enters.
  EXPECT_EQ(evicted, (std::vector<std::int64_t>{4, 5, 3, 5}));
  sparsek_prefix_thresholds(TensorView<const float, 2>(nullptr, {0, 4}), 2,
                            TensorView<float, 2>(nullptr, {0, 4}));
  sparsek_prefix_thresholds(TensorView<const double, 2>(nullptr, {3, 0}), 1,
                            TensorView<double, 2>(nullptr, {3, 0}),
                            TensorView<std::int64_t, 2>(nullptr, {3, 0}));
}

// ---------------------------------------------------------------------------------------------
// Selection.

// sparsek_select<T> on `u` [B, Hkv, Lk] for Lq queries equals the reference: the same indices,
// the gates within one rounding of u − τ, -1 / exactly 0 in the unused slots.
template <typename T>
void expect_selection_matches(const std::vector<double>& u, Index batch, Index heads_kv,
                              Index len_k, Index len_q, const SparseKOptions& o) {
  SCOPED_TRACE((std::is_same_v<T, float> ? "float" : "double"));
  const std::vector<T> u_t = convert<T>(u);
  const Index slots = batch * heads_kv * len_q * o.topk;
  std::vector<std::int64_t> indices(static_cast<std::size_t>(slots), -7);
  std::vector<T> gates(static_cast<std::size_t>(slots), T(-7));
  sparsek_select(TensorView<const T, 3>(u_t.data(), {batch, heads_kv, len_k}), len_q, o,
                 TensorView<std::int64_t, 4>(indices.data(), {batch, heads_kv, len_q, o.topk}),
                 TensorView<T, 4>(gates.data(), {batch, heads_kv, len_q, o.topk}));
  std::vector<std::int64_t> want_indices;
  std::vector<double> want_gates;
  reference::sparsek_select_reference(u, batch, heads_kv, len_k, len_q, reference_options(o),
                                      want_indices, want_gates);
  double largest = 0;
  for (double value : u) largest = std::max(largest, std::abs(value));
  const double tolerance =
      (8 * std::numeric_limits<T>::epsilon() +
       16 * static_cast<double>(len_k) * std::numeric_limits<double>::epsilon()) *
      (1 + largest);
  for (Index slot = 0; slot < slots; ++slot) {
    const Index query = slot / o.topk;
    ASSERT_EQ(indices[slot], want_indices[slot])
        << "(b, h, i) row " << query << " slot " << slot % o.topk;
    if (want_indices[slot] < 0) {
      ASSERT_EQ(static_cast<double>(gates[slot]), 0.0) << "unused slot " << slot;
    } else {
      ASSERT_NEAR(static_cast<double>(gates[slot]), want_gates[slot], tolerance)
          << "(b, h, i) row " << query << " slot " << slot % o.topk;
    }
  }
}

TEST(SparseKSelect, MatchesReference) {
  std::uint64_t seed = 30000;
  struct Lengths {
    Index len_q, len_k;
  };
  for (const Lengths& lengths :
       {Lengths{1, 1}, Lengths{1, 97}, Lengths{37, 37}, Lengths{20, 131}, Lengths{131, 20}})
    for (bool causal : {true, false})
      for (Index window : {Index{0}, Index{1}, Index{5}, Index{200}})
        for (Index sinks : {Index{0}, Index{3}})
          for (Index topk : {Index{1}, Index{7}, lengths.len_k, lengths.len_k + 9}) {
            if (!causal && window > 0) continue;
            ++seed;
            for (Index q_offset : {Index{-1}, Index{0}, Index{lengths.len_k / 2 + 1}}) {
              SparseKOptions o = sparsek_options(topk, window, sinks, SparseKGate::value, causal);
              o.q_offset = q_offset;
              const Scores scores = seed % 3 == 0 ? Scores::kIntegers : Scores::kNormal;
              const Index batch = 2, heads_kv = 2;
              SCOPED_TRACE(describe("seed=", seed, " Lq=", lengths.len_q, " Lk=", lengths.len_k,
                                    " ", sparsek_options_string(o),
                                    " scores=", scores_name(scores)));
              const std::vector<double> u =
                  random_scores(seed, batch * heads_kv * lengths.len_k, scores);
              expect_selection_matches<float>(u, batch, heads_kv, lengths.len_k, lengths.len_q, o);
              expect_selection_matches<double>(u, batch, heads_kv, lengths.len_k, lengths.len_q, o);
            }
          }
}

TEST(SparseKSelect, TiesGoToTheLowerIndexAndShareTheirGate) {
  // Pool {0 .. 5} with scores 2, 1, 1, 1, 0, 1 and topk 2: key 0 wins with gate 1, key 1 wins
  // the tie at 1 against keys 2, 3, 5, and the four tied keys share the remaining unit: 1/4.
  const std::vector<double> u = {2, 1, 1, 1, 0, 1};
  for (bool causal : {true, false}) {
    SparseKOptions o = sparsek_options(2, 0, 0, SparseKGate::value, causal);
    std::vector<std::int64_t> indices(2);
    std::vector<double> gates(2);
    sparsek_select(TensorView<const double, 3>(u.data(), {1, 1, 6}), 1, o,
                   TensorView<std::int64_t, 4>(indices.data(), {1, 1, 1, 2}),
                   TensorView<double, 4>(gates.data(), {1, 1, 1, 2}));
    EXPECT_EQ(indices, (std::vector<std::int64_t>{0, 1}));
    EXPECT_EQ(gates[0], 1.0);
    EXPECT_DOUBLE_EQ(gates[1], 0.25);
  }
}

TEST(SparseKSelect, NonCausalSelectionIsSharedByEveryQuery) {
  const Index len_q = 9, len_k = 50, topk = 6;
  const std::vector<double> u = random_scores(31000, len_k, Scores::kNormal);
  const SparseKOptions o = sparsek_options(topk, 0, 2, SparseKGate::value, false);
  std::vector<std::int64_t> indices(len_q * topk);
  std::vector<double> gates(len_q * topk);
  sparsek_select(TensorView<const double, 3>(u.data(), {1, 1, len_k}), len_q, o,
                 TensorView<std::int64_t, 4>(indices.data(), {1, 1, len_q, topk}),
                 TensorView<double, 4>(gates.data(), {1, 1, len_q, topk}));
  for (Index i = 1; i < len_q; ++i)
    for (Index slot = 0; slot < topk; ++slot) {
      EXPECT_EQ(indices[i * topk + slot], indices[slot]);
      EXPECT_EQ(gates[i * topk + slot], gates[slot]);
    }
  for (Index slot = 0; slot < topk; ++slot) EXPECT_GE(indices[slot], 2) << "a sink was listed";
}

// ---------------------------------------------------------------------------------------------
// Attention against the reference.

// Lengths of the random sweeps: 1, primes, tile edges.
constexpr Index kLengths[] = {1, 2, 7, 13, 63, 64, 65, 129, 130};
constexpr Index kMaxMqaHeads = 5;

// Random options for a problem: topk in {1, 7, 64, 300, Lk, Lk + 5}, window in {0, 1, 33, 256},
// sinks 0 or 3, any gate, causal four times in five.
SparseKOptions random_options(RandomSource& random, const Problem& p) {
  SparseKOptions o;
  o.topk = random.pick({Index{1}, Index{7}, Index{64}, Index{300}, p.len_k, p.len_k + 5});
  o.causal = random.chance(0.8);
  o.window = o.causal ? random.pick({Index{0}, Index{1}, Index{33}, Index{256}}) : 0;
  o.sink_tokens = random.pick({Index{0}, Index{3}});
  o.gate = random.pick(kGates);
  return o;
}

TEST(SparseKAttention, MatchesReferenceOnRandomShapesAndOptions) {
  for (std::uint64_t seed = 40000; seed < 40060; ++seed) {
    RandomSource random(seed + 1);
    const Problem p = random_problem(seed, 2e6, kLengths, kMaxMqaHeads);
    expect_matches_reference(p, random_options(random, p),
                             random.chance(0.2) ? Scores::kIntegers : Scores::kNormal);
  }
}

TEST(SparseKAttention, MatchesReferenceForEveryGate) {
  for (SparseKGate gate : kGates)
    for (Index topk : {Index{1}, Index{7}, Index{64}, Index{300}})
      expect_matches_reference(make_problem(2, 4, 2, 97, 131, 16, 24, 41000),
                               sparsek_options(topk, 0, 0, gate));
}

TEST(SparseKAttention, MatchesReferenceAcrossTileAndBlockBoundaries) {
  // Lengths 200..700: several 64-query tiles and 128-key blocks, selections that reach back
  // across blocks, GQA, MQA, odd and different head dims.
  expect_matches_reference(make_problem(1, 2, 1, 700, 700, 17, 9, 42000),
                           sparsek_options(64, 33, 3, SparseKGate::value));
  expect_matches_reference(make_problem(1, 3, 3, 257, 613, 31, 16, 42001),
                           sparsek_options(300, 256, 0, SparseKGate::kv));
  expect_matches_reference(make_problem(2, 4, 1, 200, 521, 8, 23, 42002),
                           sparsek_options(7, 0, 3, SparseKGate::none, false));
  expect_matches_reference(make_problem(1, 2, 2, 389, 389, 64, 64, 42003),
                           sparsek_options(129, 1, 3, SparseKGate::value));
  expect_matches_reference(make_problem(1, 4, 2, 331, 331, 5, 3, 42004),
                           sparsek_options(1, 0, 0, SparseKGate::kv), Scores::kIntegers);
}

TEST(SparseKAttention, WindowAndSinksMatchReference) {
  // Every gate meets every window and sink count across the loop (the gate rotates).
  const std::vector<Problem> problems = option_problems(43000, 150, 127);
  int turn = 0;
  for (Index window : {Index{0}, Index{1}, Index{33}, Index{256}})
    for (Index sinks : {Index{0}, Index{3}})
      for (const Problem& p : problems)
        expect_matches_reference(p, sparsek_options(13, window, sinks, kGates[turn++ % 3]));
}

TEST(SparseKAttention, NonCausalMatchesReference) {
  for (SparseKGate gate : kGates)
    for (Index sinks : {Index{0}, Index{3}})
      for (const Problem& p : option_problems(44000, 130, 67))
        expect_matches_reference(p, sparsek_options(11, 0, sinks, gate, false));
}

TEST(SparseKAttention, ExplicitQueryOffsetMatchesReference) {
  int turn = 0;
  for (const Problem& p : option_problems(45000, 100, 90))
    for (Index q_offset : {Index{0}, Index{1}, p.len_k / 2, p.len_k, p.len_k + 7}) {
      SparseKOptions o = sparsek_options(9, 4, 2, kGates[turn++ % 3]);
      o.q_offset = q_offset;
      expect_matches_reference(p, o);
    }
}

TEST(SparseKAttention, ScaleAndSoftcapMatchReference) {
  for (double softcap : {0.0, 0.5, 3.0})
    for (double scale : {0.0, 0.3, 2.5})
      for (SparseKGate gate : kGates) {
        SparseKOptions o = sparsek_options(10, 5, 1, gate);
        o.scale = scale;
        o.softcap = softcap;
        expect_matches_reference(make_problem(1, 4, 2, 70, 133, 12, 12, 46000), o);
      }
}

TEST(SparseKAttention, TiedScoresMatchReference) {
  for (Scores scores : {Scores::kIntegers, Scores::kEqual})
    for (SparseKGate gate : kGates)
      for (bool causal : {true, false})
        expect_matches_reference(make_problem(2, 2, 1, 67, 150, 8, 8, 47000),
                                 sparsek_options(10, causal ? 3 : 0, 2, gate, causal), scores);
}

TEST(SparseKAttention, QueriesThatSeeNoKeyGetZeroAndMinusInfinityLse) {
  // Bottom-right with Lq > Lk: the first Lq − Lk queries precede every key (sinks included,
  // since causal sinks need j <= position).
  const Problem p = make_problem(2, 2, 1, 90, 30, 8, 6, 48000);
  for (SparseKGate gate : kGates) {
    const SparseKOptions o = sparsek_options(5, 2, 3, gate);
    SCOPED_TRACE(sparsek_options_string(o));
    expect_matches_reference(p, o);
    const Inputs in = random_inputs(p);
    const Outputs got = run_sparsek<float>(p, in, problem_scores(p, Scores::kNormal), o);
    for (Index row = 0; row < p.batch * p.heads_q * p.len_q; ++row) {
      const Index i = row % p.len_q;
      if (i >= p.len_q - p.len_k) {
        EXPECT_TRUE(std::isfinite(got.lse[row])) << "row " << row;
        continue;
      }
      EXPECT_EQ(got.lse[row], -kInfinity) << "row " << row;
      for (Index d = 0; d < p.dim_v; ++d) ASSERT_EQ(got.out[row * p.dim_v + d], 0.0) << row;
    }
  }
}

TEST(SparseKAttention, CausalSinksAfterTheQueryAreNotVisible) {
  // Causal sinks need j <= position: with q = k = 0 every visible key weighs the same, so out is
  // the mean of the visible v_j = j. Lq = Lk = 4, sinks 3, topk 1: query i sees keys 0 .. i
  // (query 3 adds key 3, its pool's only key).
  const std::vector<double> zeros(4, 0.0), v = {0, 1, 2, 3};
  std::vector<double> out(4), lse(4);
  SparseKOptions o = sparsek_options(1, 0, 3, SparseKGate::none);
  sparsek_attention(TensorView<const double, 4>(zeros.data(), {1, 1, 4, 1}),
                    TensorView<const double, 4>(zeros.data(), {1, 1, 4, 1}),
                    TensorView<const double, 4>(v.data(), {1, 1, 4, 1}),
                    TensorView<const double, 3>(zeros.data(), {1, 1, 4}), o,
                    TensorView<double, 4>(out.data(), {1, 1, 4, 1}),
                    TensorView<double, 3>(lse.data(), {1, 1, 4}));
  for (Index i = 0; i < 4; ++i) {
    EXPECT_NEAR(out[i], static_cast<double>(i) / 2, 1e-15) << "query " << i;
    EXPECT_NEAR(lse[i], std::log(static_cast<double>(i + 1)), 1e-15) << "query " << i;
  }
}

TEST(SparseKAttention, LseOutputDoesNotChangeOut) {
  const Problem p = make_problem(2, 4, 2, 70, 90, 12, 10, 49000);
  const Inputs in = random_inputs(p);
  const std::vector<double> u = problem_scores(p, Scores::kNormal);
  for (SparseKGate gate : kGates) {
    const SparseKOptions o = sparsek_options(8, 3, 2, gate);
    EXPECT_TRUE(bitwise_equal(run_sparsek<float>(p, in, u, o, {}, Layout::kContiguous, false).out,
                              run_sparsek<float>(p, in, u, o).out));
  }
}

// ---------------------------------------------------------------------------------------------
// Dense attention as a special case.

TEST(SparseKAttention, SelectingEveryKeyWithoutGatesIsDenseAttentionBitwise) {
  // topk >= Lk, window 0, no sinks, gate none: causal attention (causal) or full attention
  // (non-causal), bit for bit, whatever the query offset.
  for (const Problem& p :
       {make_problem(1, 2, 1, 1, 1, 4, 4, 50000), make_problem(2, 4, 2, 65, 129, 16, 24, 50001),
        make_problem(1, 3, 1, 129, 65, 31, 31, 50002),
        make_problem(1, 2, 2, 300, 300, 64, 80, 50003)})
    for (bool causal : {true, false})
      for (Index topk : {p.len_k, p.len_k + 10})
        for (Index q_offset : {Index{-1}, Index{0}, p.len_k / 3}) {
          SparseKOptions o = sparsek_options(topk, 0, 0, SparseKGate::none, causal);
          o.q_offset = q_offset;
          AttentionOptions dense;
          dense.causal = causal;
          dense.q_offset = q_offset;
          SCOPED_TRACE(describe(problem_string(p), "\n  ", sparsek_options_string(o)));
          const Inputs in = random_inputs(p);
          const std::vector<double> u = problem_scores(p, Scores::kNormal);
          {
            SCOPED_TRACE("float");
            expect_identical(run_sparsek<float>(p, in, u, o), run_attention<float>(p, in, dense));
          }
          {
            SCOPED_TRACE("double");
            expect_identical(run_sparsek<double>(p, in, u, o), run_attention<double>(p, in, dense));
          }
        }
}

TEST(SparseKAttention, WindowCoveringThePrefixIsDenseCausalForEveryGate) {
  // A window of Lk keys leaves every pool empty: every key <= position is visible with gate 1.
  const Problem p = make_problem(1, 4, 2, 80, 150, 16, 16, 51000);
  const Inputs in = random_inputs(p);
  AttentionOptions dense;
  dense.causal = true;
  const Outputs want = reference_outputs(p, in, dense);
  for (SparseKGate gate : kGates) {
    const SparseKOptions o = sparsek_options(3, p.len_k, 0, gate);
    SCOPED_TRACE(sparsek_options_string(o));
    const Outputs got = run_sparsek<double>(p, in, problem_scores(p, Scores::kNormal), o);
    EXPECT_TRUE(matches_reference(got.out, want.out, kSparseKTolerance<double>)) << "out";
    EXPECT_TRUE(matches_reference(got.lse, want.lse, kSparseKTolerance<double>)) << "lse";
  }
}

// ---------------------------------------------------------------------------------------------
// Threads and layouts.

TEST(SparseKAttention, IdenticalForOneTwoThreeThreads) {
  const DefaultThreadsOnExit restore;
  const Problem p = make_problem(2, 4, 2, 150, 300, 16, 16, 52000);
  const Inputs in = random_inputs(p);
  const std::vector<double> u = problem_scores(p, Scores::kNormal);
  for (SparseKGate gate : kGates) {
    SparseKOptions o = sparsek_options(20, 33, 3, gate);
    SCOPED_TRACE(sparsek_options_string(o));
    o.num_threads = 1;
    const Outputs one = run_sparsek<float>(p, in, u, o);
    const Outputs one_double = run_sparsek<double>(p, in, u, o);
    for (int threads : {2, 3}) {
      SCOPED_TRACE(describe("num_threads=", threads));
      o.num_threads = threads;
      expect_identical(run_sparsek<float>(p, in, u, o), one);
      expect_identical(run_sparsek<double>(p, in, u, o), one_double);
    }
    // The global setting, when the options leave it at 0.
    o.num_threads = 0;
    set_num_threads(3);
    expect_identical(run_sparsek<float>(p, in, u, o), one);
    set_num_threads(0);
  }
  // The selection too.
  const Index len_q = 150, topk = 20;
  const std::vector<float> u_float = convert<float>(u);
  std::vector<std::int64_t> indices1(2 * 2 * len_q * topk), indices3(indices1.size());
  std::vector<float> gates1(indices1.size()), gates3(indices1.size());
  for (int threads : {1, 3}) {
    SparseKOptions o = sparsek_options(topk, 33, 3);
    o.num_threads = threads;
    sparsek_select(
        TensorView<const float, 3>(u_float.data(), {2, 2, 300}), len_q, o,
        TensorView<std::int64_t, 4>((threads == 1 ? indices1 : indices3).data(),
                                    {2, 2, len_q, topk}),
        TensorView<float, 4>((threads == 1 ? gates1 : gates3).data(), {2, 2, len_q, topk}));
  }
  EXPECT_EQ(indices3, indices1);
  EXPECT_EQ(gates3, gates1);
}

TEST(SparseKAttention, StridedViewsMatchReference) {
  const Problem p = make_problem(2, 6, 2, 70, 130, 19, 21, 53000);
  const Inputs in = random_inputs(p);
  const std::vector<double> u = problem_scores(p, Scores::kNormal);
  for (SparseKGate gate : kGates) {
    const SparseKOptions o = sparsek_options(12, 5, 2, gate);
    const Outputs want = sparsek_reference_outputs(p, in, u, o);
    for (Layout layout :
         {Layout::kSwapped12, Layout::kPadded, Layout::kReversed, Layout::kOddUnitStrides}) {
      SCOPED_TRACE(describe(sparsek_options_string(o), " layout=", layout_name(layout)));
      const Outputs got_float = run_sparsek<float>(p, in, u, o, Layouts::all(layout), layout);
      EXPECT_TRUE(matches_reference(got_float.out, want.out, kSparseKTolerance<float>));
      EXPECT_TRUE(matches_reference(got_float.lse, want.lse, kSparseKTolerance<float>));
      const Outputs got_double = run_sparsek<double>(p, in, u, o, Layouts::all(layout), layout);
      EXPECT_TRUE(matches_reference(got_double.out, want.out, kSparseKTolerance<double>));
      EXPECT_TRUE(matches_reference(got_double.lse, want.lse, kSparseKTolerance<double>));
    }
  }
  // A single query head with a single query: size-1 dims with odd strides everywhere.
  const Problem single = make_problem(1, 1, 1, 1, 77, 8, 8, 53001);
  const Inputs single_in = random_inputs(single);
  const std::vector<double> single_u = problem_scores(single, Scores::kNormal);
  const SparseKOptions o = sparsek_options(6);
  EXPECT_TRUE(matches_reference(
      run_sparsek<float>(single, single_in, single_u, o, Layouts::all(Layout::kOddUnitStrides),
                         Layout::kOddUnitStrides)
          .out,
      sparsek_reference_outputs(single, single_in, single_u, o).out, kSparseKTolerance<float>));
}

// ---------------------------------------------------------------------------------------------
// Empty tensors.

TEST(SparseKAttention, EmptyBatchOrQueriesAreNoOps) {
  const SparseKOptions o = sparsek_options(4, 2, 1);
  for (const Problem& p :
       {make_problem(0, 2, 1, 5, 7, 4, 4, 54000), make_problem(2, 2, 1, 0, 7, 4, 4, 54001)}) {
    SCOPED_TRACE(problem_string(p));
    const Inputs in = random_inputs(p);
    const Outputs got = run_sparsek<float>(p, in, problem_scores(p, Scores::kNormal), o);
    EXPECT_TRUE(got.out.empty());
    EXPECT_TRUE(got.lse.empty());
  }
  std::vector<std::int64_t> indices;
  std::vector<float> gates;
  sparsek_select(TensorView<const float, 3>(nullptr, {2, 2, 0}), 0, o,
                 TensorView<std::int64_t, 4>(nullptr, {2, 2, 0, 4}),
                 TensorView<float, 4>(nullptr, {2, 2, 0, 4}));
}

TEST(SparseKAttention, NoKeysGivesZeroAndMinusInfinityLse) {
  // Lk = 0: every query sees no key.
  const Problem p = make_problem(1, 2, 1, 3, 0, 4, 5, 55000);
  for (bool causal : {true, false}) {
    const Outputs got = run_sparsek<float>(p, random_inputs(p), {},
                                           sparsek_options(4, 0, 0, SparseKGate::value, causal));
    for (double value : got.out) EXPECT_EQ(value, 0.0);
    for (double value : got.lse) EXPECT_EQ(value, -kInfinity);
  }
}

// ---------------------------------------------------------------------------------------------
// The linear scorer.

TEST(SparseKLinearScores, MatchReferenceWithSlope) {
  std::uint64_t seed = 56000;
  struct Shape3 {
    Index batch, len, dim_model, heads;
  };
  for (const Shape3& s : {Shape3{1, 1, 1, 1}, Shape3{2, 37, 16, 3}, Shape3{3, 300, 31, 2}})
    for (double slope : {0.0, 0.01, -0.5, 3.0}) {
      ++seed;
      SCOPED_TRACE(describe("seed=", seed, " B=", s.batch, " L=", s.len, " Dm=", s.dim_model,
                            " H=", s.heads, " slope=", slope));
      RandomSource random(seed);
      const std::vector<double> x = round_to<float>(random.normal(s.batch * s.len * s.dim_model));
      const std::vector<double> w = round_to<float>(random.normal(s.heads * s.dim_model));
      const std::vector<double> want =
          reference::linear_scores_reference(x, w, s.batch, s.len, s.dim_model, s.heads, slope);
      const Shape<3> x_shape{s.batch, s.len, s.dim_model}, u_shape{s.batch, s.heads, s.len};
      for (Layout layout : {Layout::kContiguous, Layout::kPadded}) {
        const StridedBuffer<float, 3> x_float(x, x_shape, layout, 0.0f);
        const StridedBuffer<float, 2> w_float(w, {s.heads, s.dim_model}, layout, 0.0f);
        const StridedBuffer<float, 3> u_float(u_shape, layout, -7.0f);
        sparsek_linear_scores(x_float.const_view(), w_float.const_view(), slope, u_float.view(), 2);
        EXPECT_TRUE(matches_reference(gather(u_float.view()), want, 2e-6)) << "float";
        EXPECT_TRUE(u_float.outside_untouched());
        const StridedBuffer<double, 3> x_double(x, x_shape, layout, 0.0);
        const StridedBuffer<double, 2> w_double(w, {s.heads, s.dim_model}, layout, 0.0);
        const StridedBuffer<double, 3> u_double(u_shape, layout, -7.0);
        sparsek_linear_scores(x_double.const_view(), w_double.const_view(), slope, u_double.view());
        EXPECT_TRUE(matches_reference(gather(u_double.view()), want, 1e-14)) << "double";
      }
    }
}

// ---------------------------------------------------------------------------------------------
// The registry.

template <typename T>
void expect_registry_kernel_equals_direct_call(const Problem& p, SparseKGate gate, bool causal) {
  SCOPED_TRACE(describe(problem_string(p), " gate=", to_string(gate), " causal=", causal,
                        std::is_same_v<T, float> ? " float" : " double"));
  SparseKOptions direct = sparsek_options(9, causal ? 4 : 0, 2, gate, causal);
  direct.softcap = 5;
  direct.scale = 0.4;
  AttentionConfig config;
  config.options.causal = causal;
  config.options.sink_tokens = direct.sink_tokens;
  config.options.softcap = direct.softcap;
  config.options.scale = direct.scale;
  config.params = {
      {"topk", "9"}, {"window", std::to_string(direct.window)}, {"gate", to_string(gate)}};
  const std::unique_ptr<AttentionKernel> kernel = make_attention("sparsek", config);
  EXPECT_EQ(kernel->name(), "sparsek");

  const Inputs in = random_inputs(p);
  const std::vector<double> u = problem_scores(p, Scores::kNormal);
  const std::vector<T> q = convert<T>(in.q), k = convert<T>(in.k), v = convert<T>(in.v);
  const std::vector<T> scores = convert<T>(u);
  Tensor<T, 4> out(p.out_shape());
  Tensor<T, 3> lse(p.lse_shape());
  AttentionArgs<T> args;
  args.q = TensorView<const T, 4>(q.data(), p.q_shape());
  args.k = TensorView<const T, 4>(k.data(), p.k_shape());
  args.v = TensorView<const T, 4>(v.data(), p.v_shape());
  args.out = out.view();
  args.lse = lse.view();
  args.extras["u"] = TensorView<const T, 3>(scores.data(), {p.batch, p.heads_kv, p.len_k});
  kernel->forward(args);
  expect_identical(Outputs{gather(out.view()), gather(lse.view())},
                   run_sparsek<T>(p, in, u, direct));
}

TEST(SparseKAttention, RegistryKernelEqualsDirectCall) {
  const std::vector<std::string> names = attention_kernel_names();
  EXPECT_NE(std::find(names.begin(), names.end(), "sparsek"), names.end());
  for (SparseKGate gate : kGates)
    for (bool causal : {true, false}) {
      expect_registry_kernel_equals_direct_call<float>(make_problem(2, 4, 2, 40, 70, 8, 6, 57000),
                                                       gate, causal);
      expect_registry_kernel_equals_direct_call<double>(make_problem(1, 3, 1, 33, 33, 5, 7, 57001),
                                                        gate, causal);
    }
}

TEST(SparseKAttention, RegistryRejectsBadParams) {
  AttentionConfig config;
  config.options.causal = true;
  config.params = {{"topk", "0"}};
  EXPECT_TRUE(throws_error_with([&] { make_attention("sparsek", config); }, {"topk"}));
  config.params = {{"topk", "4"}, {"gate", "soft"}};
  EXPECT_TRUE(throws_error_with([&] { make_attention("sparsek", config); },
                                {"gate", "value", "kv", "none"}));
  config.params = {{"topk", "4"}, {"topkk", "3"}};
  EXPECT_TRUE(throws_error_with([&] { make_attention("sparsek", config); }, {"topkk"}));
}

// ---------------------------------------------------------------------------------------------
// Rejected input: a foveal::Error naming the argument, thrown before anything is written.

TEST(SparseKAttention, GateNamesParse) {
  for (SparseKGate gate : kGates) EXPECT_EQ(parse_sparsek_gate(to_string(gate)), gate);
  EXPECT_EQ(std::string(to_string(SparseKGate::value)), "value");
  EXPECT_EQ(std::string(to_string(SparseKGate::kv)), "kv");
  EXPECT_EQ(std::string(to_string(SparseKGate::none)), "none");
  EXPECT_TRUE(
      throws_error_with([] { parse_sparsek_gate("hard"); }, {"hard", "value", "kv", "none"}));
}

// B = 2, Hq = 4, Hkv = 2, Lq = 5, Lk = 7, D = 3, Dv = 6, topk = 3 (distinct where messages
// must tell them apart).
constexpr Index kBatch = 2, kHeadsQ = 4, kHeadsKv = 2, kLenQ = 5, kLenK = 7, kDim = 3, kDimV = 6,
                kTopK = 3;

// A valid call of each entry point whose arguments the tests break one at a time.
class SparseKErrors : public ::testing::Test {
 protected:
  SparseKErrors()
      : q_(kBatch * kHeadsQ * kLenQ * kDim, 0.5f),
        k_(kBatch * kHeadsKv * kLenK * kDim, 0.25f),
        v_(kBatch * kHeadsKv * kLenK * kDimV, 1.0f),
        u_(2 * kBatch * kHeadsKv * kLenK, 0.0f),
        out_(kBatch * kHeadsQ * kLenQ * kDimV, float(kSentinel)),
        lse_(kBatch * kHeadsQ * kLenQ, float(kSentinel)),
        indices_(kBatch * kHeadsKv * kLenQ * kTopK * 2, std::int64_t(kSentinel)),
        gates_(kBatch * kHeadsKv * kLenQ * kTopK * 2, float(kSentinel)) {
    for (std::size_t i = 0; i < u_.size(); ++i) u_[i] = static_cast<float>(i % 5);
    options = sparsek_options(kTopK, 2, 1);
  }

  TensorView<const float, 4> q(Index heads_q = kHeadsQ) const {
    return TensorView<const float, 4>(q_.data(), {kBatch, heads_q, kLenQ, kDim});
  }
  TensorView<const float, 4> k() const {
    return TensorView<const float, 4>(k_.data(), {kBatch, kHeadsKv, kLenK, kDim});
  }
  TensorView<const float, 4> v() const {
    return TensorView<const float, 4>(v_.data(), {kBatch, kHeadsKv, kLenK, kDimV});
  }
  TensorView<const float, 3> u(const Shape<3>& shape = {kBatch, kHeadsKv, kLenK}) const {
    return TensorView<const float, 3>(u_.data(), shape);
  }
  TensorView<float, 4> out(Index heads_q = kHeadsQ) {
    return TensorView<float, 4>(out_.data(), {kBatch, heads_q, kLenQ, kDimV});
  }
  TensorView<float, 3> lse(Index heads_q = kHeadsQ) {
    return TensorView<float, 3>(lse_.data(), {kBatch, heads_q, kLenQ});
  }
  TensorView<std::int64_t, 4> indices(const Shape<4>& shape = {kBatch, kHeadsKv, kLenQ, kTopK}) {
    return TensorView<std::int64_t, 4>(indices_.data(), shape);
  }
  TensorView<float, 4> gates(const Shape<4>& shape = {kBatch, kHeadsKv, kLenQ, kTopK}) {
    return TensorView<float, 4>(gates_.data(), shape);
  }

  // `call` throws foveal::Error naming every piece, and no output was written.
  template <typename Call>
  void expect_rejected(Call&& call, std::initializer_list<std::string> pieces) {
    EXPECT_TRUE(throws_error_with(call, pieces));
    EXPECT_TRUE(holds_sentinel(out_)) << "out was written before the error";
    EXPECT_TRUE(holds_sentinel(lse_)) << "lse was written before the error";
    EXPECT_TRUE(holds_sentinel(indices_)) << "indices were written before the error";
    EXPECT_TRUE(holds_sentinel(gates_)) << "gates were written before the error";
  }

  // The attention call with `options` as the test left them.
  void attention_with(const SparseKOptions& o) {
    sparsek_attention(q(), k(), v(), u(), o, out(), lse());
  }
  void expect_attention_rejected(const SparseKOptions& o,
                                 std::initializer_list<std::string> pieces) {
    expect_rejected([&] { attention_with(o); }, pieces);
  }

  std::vector<float> q_, k_, v_, u_, out_, lse_;
  std::vector<std::int64_t> indices_;
  std::vector<float> gates_;
  SparseKOptions options;
};

TEST_F(SparseKErrors, ValidCallsAreAccepted) {
  attention_with(options);
  sparsek_select(u(), kLenQ, options, indices(), gates());
}

TEST_F(SparseKErrors, TopKMustBePositive) {
  for (Index topk : {Index{0}, Index{-3}}) {
    SparseKOptions o = options;
    o.topk = topk;
    expect_attention_rejected(o, {"sparsek_attention", "topk", std::to_string(topk)});
    expect_rejected(
        [&] {
          sparsek_select(u(), kLenQ, o, indices({kBatch, kHeadsKv, kLenQ, topk < 0 ? 0 : topk}),
                         gates({kBatch, kHeadsKv, kLenQ, topk < 0 ? 0 : topk}));
        },
        {"sparsek_select", "topk"});
  }
}

TEST_F(SparseKErrors, ScoresMustBeFiniteAndTheMessageNamesThePosition) {
  u_[(1 * kHeadsKv + 0) * kLenK + 4] = std::numeric_limits<float>::quiet_NaN();
  expect_attention_rejected(options, {"sparsek_attention", "u[1, 0, 4]", "finite", "nan"});
  expect_rejected([&] { sparsek_select(u(), kLenQ, options, indices(), gates()); },
                  {"sparsek_select", "u[1, 0, 4]", "nan"});
  u_[(1 * kHeadsKv + 0) * kLenK + 4] = 0;
  u_[(0 * kHeadsKv + 1) * kLenK + 6] = std::numeric_limits<float>::infinity();
  expect_attention_rejected(options, {"sparsek_attention", "u[0, 1, 6]", "finite", "inf"});
  u_[(0 * kHeadsKv + 1) * kLenK + 6] = -std::numeric_limits<float>::infinity();
  expect_attention_rejected(options, {"u[0, 1, 6]", "-inf"});
}

TEST_F(SparseKErrors, ScoreShapeMustMatchKeys) {
  const Shape<3> wrong[] = {
      {kBatch + 1, kHeadsKv, kLenK}, {kBatch, kHeadsKv - 1, kLenK}, {kBatch, kHeadsKv, kLenK - 1}};
  for (int dim = 0; dim < 3; ++dim) {
    SCOPED_TRACE(describe("dim ", dim));
    expect_rejected(
        [&] { sparsek_attention(q(), k(), v(), u(wrong[dim]), options, out(), lse()); },
        {"sparsek_attention", describe("u.shape[", dim, "]"), describe(wrong[dim][dim])});
  }
}

TEST_F(SparseKErrors, WindowAndSinksMustBeNonNegative) {
  SparseKOptions o = options;
  o.window = -1;
  expect_attention_rejected(o, {"sparsek_attention", "window", "-1"});
  expect_rejected([&] { sparsek_select(u(), kLenQ, o, indices(), gates()); },
                  {"sparsek_select", "window"});
  o = options;
  o.sink_tokens = -2;
  expect_attention_rejected(o, {"sparsek_attention", "sink_tokens", "-2"});
  expect_rejected([&] { sparsek_select(u(), kLenQ, o, indices(), gates()); },
                  {"sparsek_select", "sink_tokens"});
}

TEST_F(SparseKErrors, NonCausalCallsNeedNoWindow) {
  SparseKOptions o = options;
  o.causal = false;
  o.window = 3;
  expect_attention_rejected(o, {"sparsek_attention", "window"});
  expect_rejected([&] { sparsek_select(u(), kLenQ, o, indices(), gates()); },
                  {"sparsek_select", "window"});
}

TEST_F(SparseKErrors, QueryHeadsMustBeAMultipleOfKeyHeads) {
  expect_rejected([&] { sparsek_attention(q(3), k(), v(), u(), options, out(3), lse(3)); },
                  {"sparsek_attention", "multiple"});
}

TEST_F(SparseKErrors, ScaleAndSoftcapMustBeFinite) {
  for (double bad :
       {std::numeric_limits<double>::quiet_NaN(), std::numeric_limits<double>::infinity()}) {
    SparseKOptions o = options;
    o.scale = bad;
    expect_attention_rejected(o, {"sparsek_attention", "scale"});
    o = options;
    o.softcap = bad;
    expect_attention_rejected(o, {"sparsek_attention", "softcap"});
  }
}

TEST_F(SparseKErrors, SelectionShapesMustMatch) {
  const Shape<4> good{kBatch, kHeadsKv, kLenQ, kTopK};
  for (int dim = 0; dim < 4; ++dim) {
    Shape<4> wrong = good;
    wrong[dim] += 1;
    SCOPED_TRACE(describe("dim ", dim));
    expect_rejected([&] { sparsek_select(u(), kLenQ, options, indices(wrong), gates()); },
                    {"sparsek_select", describe("indices.shape[", dim, "]")});
    expect_rejected([&] { sparsek_select(u(), kLenQ, options, indices(), gates(wrong)); },
                    {"sparsek_select", describe("gates.shape[", dim, "]")});
  }
}

TEST_F(SparseKErrors, PrefixThresholdArgumentsAreChecked) {
  std::vector<float> z = {1, 2, 3, 4, 5, 6};
  std::vector<float> tau(6, float(kSentinel));
  std::vector<std::int64_t> evicted(6, std::int64_t(kSentinel));
  const TensorView<const float, 2> z_view(z.data(), {2, 3});
  const auto tau_view = [&](Index rows, Index n) {
    return TensorView<float, 2>(tau.data(), {rows, n});
  };
  const auto evicted_view = [&](Index rows, Index n) {
    return TensorView<std::int64_t, 2>(evicted.data(), {rows, n});
  };
  EXPECT_TRUE(throws_error_with(
      [&] { sparsek_prefix_thresholds(z_view, 0, tau_view(2, 3), evicted_view(2, 3)); },
      {"sparsek_prefix_thresholds", "k", "0"}));
  EXPECT_TRUE(throws_error_with([&] { sparsek_prefix_thresholds(z_view, 1, tau_view(3, 2)); },
                                {"sparsek_prefix_thresholds", "tau.shape[0]"}));
  EXPECT_TRUE(throws_error_with([&] { sparsek_prefix_thresholds(z_view, 1, tau_view(2, 2)); },
                                {"sparsek_prefix_thresholds", "tau.shape[1]"}));
  EXPECT_TRUE(throws_error_with(
      [&] { sparsek_prefix_thresholds(z_view, 1, tau_view(2, 3), evicted_view(2, 2)); },
      {"sparsek_prefix_thresholds", "evicted_at.shape[1]"}));
  z[5] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_error_with(
      [&] { sparsek_prefix_thresholds(z_view, 1, tau_view(2, 3), evicted_view(2, 3)); },
      {"sparsek_prefix_thresholds", "z[1, 2]", "nan"}));
  z[5] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws_error_with([&] { sparsek_prefix_thresholds(z_view, 1, tau_view(2, 3)); },
                                {"z[1, 2]", "inf"}));
  EXPECT_TRUE(holds_sentinel(tau)) << "tau was written before the error";
  EXPECT_TRUE(holds_sentinel(evicted)) << "evicted_at was written before the error";
}

TEST_F(SparseKErrors, LinearScoreArgumentsAreChecked) {
  const std::vector<float> x(2 * 5 * 4, 1.0f), w(3 * 4, 1.0f);
  std::vector<float> scores(2 * 3 * 5 * 2, float(kSentinel));
  const TensorView<const float, 3> x_view(x.data(), {2, 5, 4});
  const auto w_view = [&](Index heads, Index dim) {
    return TensorView<const float, 2>(w.data(), {heads, dim});
  };
  const auto u_view = [&](Index batch, Index heads, Index len) {
    return TensorView<float, 3>(scores.data(), {batch, heads, len});
  };
  EXPECT_TRUE(throws_error_with(
      [&] {
        sparsek_linear_scores(x_view, w_view(3, 4), std::numeric_limits<double>::quiet_NaN(),
                              u_view(2, 3, 5));
      },
      {"sparsek_linear_scores", "slope"}));
  EXPECT_TRUE(
      throws_error_with([&] { sparsek_linear_scores(x_view, w_view(4, 3), 0.0, u_view(2, 4, 5)); },
                        {"sparsek_linear_scores", "w.shape[1]"}));
  EXPECT_TRUE(
      throws_error_with([&] { sparsek_linear_scores(x_view, w_view(3, 4), 0.0, u_view(3, 3, 5)); },
                        {"sparsek_linear_scores", "u.shape[0]"}));
  EXPECT_TRUE(
      throws_error_with([&] { sparsek_linear_scores(x_view, w_view(3, 4), 0.0, u_view(2, 2, 5)); },
                        {"sparsek_linear_scores", "u.shape[1]"}));
  EXPECT_TRUE(
      throws_error_with([&] { sparsek_linear_scores(x_view, w_view(3, 4), 0.0, u_view(2, 3, 6)); },
                        {"sparsek_linear_scores", "u.shape[2]"}));
  EXPECT_TRUE(holds_sentinel(scores)) << "u was written before the error";
}

}  // namespace
}  // namespace foveal::test
