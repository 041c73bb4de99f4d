// The SPARSEK projection (docs/sparsek.md) against tests/reference/sparsek_reference.hpp, and
// its properties: the capped simplex, the KKT conditions, ties, huge scores, the backward.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "cpp/harness.hpp"
#include "foveal/sparsek/projection.hpp"
#include "reference/sparsek_reference.hpp"

namespace foveal {
namespace {

using test::describe;
using test::RandomSource;
using test::throws_error_with;

// Views of a vector's memory: [rows, n] rows, or the whole vector as [size].
template <typename Vector>
auto rows_view(Vector& values, Index rows, Index n) {
  using Element = std::remove_reference_t<decltype(*values.data())>;
  return TensorView<Element, 2>(values.data(), {rows, n});
}
template <typename T>
TensorView<T, 1> vector_view(std::vector<T>& values) {
  return TensorView<T, 1>(values.data(), {static_cast<Index>(values.size())});
}

// The budgets of the contract for a row of length n: 1, 2, n/2, n − 1, n and more than n.
std::vector<Index> budgets_for(Index n) {
  std::vector<Index> budgets = {1, 2, n / 2, n - 1, n, n + 3};
  std::vector<Index> valid;
  for (Index k : budgets)
    if (k >= 1) valid.push_back(k);
  return valid;
}

const Index kLengths[] = {1, 2, 7, 64, 257, 1000};

// Rounding of one p entry, and of Σp over a row: |Σp − k| <= 4·n·ε of the output type
// (each of the n outputs is rounded once from the double solution).
template <typename T>
double sum_tolerance(Index n) {
  return 4.0 * static_cast<double>(n) * std::numeric_limits<T>::epsilon();
}

template <typename T>
void check_against_reference() {
  std::uint64_t seed = 100;
  const Index rows = 3;
  for (Index n : kLengths) {
    for (Index k : budgets_for(n)) {
      RandomSource random(++seed);
      SCOPED_TRACE(describe("seed=", seed, " n=", n, " k=", k));
      // Scores of spread 2 so that several scores are fractional.
      const std::vector<double> z = test::round_to<T>(random.normal(rows * n, 0, 2));
      const std::vector<T> z_t = test::convert<T>(z);
      std::vector<T> p(rows * n, T(-7)), tau(rows, T(-7));
      sparsek(rows_view(z_t, rows, n), k, rows_view(p, rows, n), vector_view(tau), 2);
      for (Index r = 0; r < rows; ++r) {
        std::vector<double> row(z.begin() + r * n, z.begin() + (r + 1) * n), expected;
        const double expected_tau = reference::sparsek_reference(row, k, expected);
        // One rounding to T, plus τ's double rounding, which grows with the n summed scores.
        const double tolerance =
            8 * std::numeric_limits<T>::epsilon() +
            16 * static_cast<double>(n) * std::numeric_limits<double>::epsilon();
        // τ is unique only when some p is clearly fractional (else any τ between the zeros and the
        // ones is a solution; ProjectionPropertiesHold checks it through the KKT conditions).
        bool has_fractional = false;
        for (double value : expected) has_fractional |= value > 1e-6 && value < 1 - 1e-6;
        if (k >= n) {
          EXPECT_EQ(tau[r], -std::numeric_limits<T>::infinity());
        } else if (has_fractional) {
          EXPECT_NEAR(tau[r], expected_tau, tolerance * (1 + std::abs(expected_tau)));
        }
        for (Index i = 0; i < n; ++i)
          ASSERT_NEAR(p[r * n + i], expected[i], tolerance) << "row " << r << " i " << i;
      }
    }
  }
}

TEST(SparseK, FloatMatchesReference) { check_against_reference<float>(); }
TEST(SparseK, DoubleMatchesReference) { check_against_reference<double>(); }

// p ∈ [0, 1], Σp = k within sum_tolerance, and the KKT conditions of the projection with the
// returned τ: p_i = 1 ⇒ z_i − τ >= 1; p_i = 0 ⇒ z_i <= τ; otherwise p_i = z_i − τ.
template <typename T>
void check_projection_properties(const std::vector<T>& z, Index rows, Index n, Index k) {
  std::vector<T> p(rows * n), tau(rows);
  sparsek(rows_view(z, rows, n), k, rows_view(p, rows, n), vector_view(tau), 3);
  const double eps = std::numeric_limits<T>::epsilon();
  for (Index r = 0; r < rows; ++r) {
    double sum = 0;
    for (Index i = 0; i < n; ++i) {
      const double value = p[r * n + i];
      ASSERT_GE(value, 0.0);
      ASSERT_LE(value, 1.0);
      sum += value;
      if (k >= n) continue;
      const double score = z[r * n + i], threshold = tau[r];
      const double slack = 4 * eps * std::max(1.0, std::abs(score));
      if (value == 1) {
        EXPECT_GE(score - threshold, 1 - slack) << "row " << r << " i " << i;
      } else if (value == 0) {
        EXPECT_LE(score, threshold + slack) << "row " << r << " i " << i;
      } else {
        EXPECT_NEAR(value, score - threshold, slack) << "row " << r << " i " << i;
      }
    }
    EXPECT_NEAR(sum, static_cast<double>(std::min(k, n)), sum_tolerance<T>(n)) << "row " << r;
  }
}

TEST(SparseK, ProjectionPropertiesHold) {
  std::uint64_t seed = 500;
  for (Index n : kLengths)
    for (Index k : budgets_for(n)) {
      RandomSource random(++seed);
      SCOPED_TRACE(describe("seed=", seed, " n=", n, " k=", k));
      const std::vector<double> z = random.normal(4 * n, 0, 3);
      check_projection_properties(test::convert<float>(z), 4, n, k);
      check_projection_properties(z, 4, n, k);
    }
}

TEST(SparseK, TiesShareTheirMass) {
  // Three scores tied at the boundary of a k = 2 budget with one clear winner: the winner
  // takes 1 and the ties share the remaining 1 exactly.
  const std::vector<double> z = {5.0, 0.0, 0.0, 0.0, -10.0};
  std::vector<double> p(5), tau(1);
  sparsek(rows_view(z, 1, 5), 2, rows_view(p, 1, 5), vector_view(tau), 1);
  EXPECT_EQ(p[0], 1.0);
  EXPECT_EQ(p[1], p[2]);
  EXPECT_EQ(p[2], p[3]);
  EXPECT_NEAR(p[1], 1.0 / 3, 1e-15);
  EXPECT_EQ(p[4], 0.0);
  check_projection_properties(z, 1, 5, 2);
}

TEST(SparseK, AllEqualScoresGiveKOverN) {
  for (Index n : {2, 7, 64, 1000})
    for (Index k : {Index(1), n / 2 > 0 ? n / 2 : 1, n - 1}) {
      SCOPED_TRACE(describe("n=", n, " k=", k));
      const std::vector<float> z(n, 3.25f);
      std::vector<float> p(n);
      sparsek(rows_view(z, 1, n), k, rows_view(p, 1, n));
      for (float value : p) EXPECT_FLOAT_EQ(value, static_cast<float>(static_cast<double>(k) / n));
    }
}

TEST(SparseK, HugeScoresStayFinite) {
  // ±1e30 (float) and ±1e300 (double): scores 1 apart cannot be told apart at that magnitude,
  // so the winners take 1, ties share, losers get 0, and nothing is NaN.
  {
    const std::vector<float> z = {1e30f, -1e30f, 1e30f, 0.0f, -1e30f, 3e30f};
    std::vector<float> p(6), tau(1);
    sparsek(rows_view(z, 1, 6), 2, rows_view(p, 1, 6), vector_view(tau));
    EXPECT_EQ(p[5], 1.0f);
    EXPECT_EQ(p[0], 0.5f);
    EXPECT_EQ(p[2], 0.5f);
    EXPECT_EQ(p[1], 0.0f);
    EXPECT_EQ(p[3], 0.0f);
    EXPECT_EQ(p[4], 0.0f);
    EXPECT_TRUE(std::isfinite(tau[0]));
  }
  {
    const double big = std::numeric_limits<double>::max();
    const std::vector<double> z = {big, -big, 1e300, -1e300, 0.0};
    std::vector<double> p(5), tau(1);
    sparsek(rows_view(z, 1, 5), 1, rows_view(p, 1, 5), vector_view(tau));
    EXPECT_EQ(p[0], 1.0);
    for (Index i = 1; i < 5; ++i) EXPECT_EQ(p[i], 0.0);
    EXPECT_TRUE(std::isfinite(tau[0]));
  }
  RandomSource random(9);
  std::vector<double> wide = random.normal(257, 0, 1e6);
  check_projection_properties(wide, 1, 257, 17);
}

TEST(SparseK, BudgetAtLeastLengthGivesAllOnes) {
  const std::vector<float> z = {0.5f, -3.0f, 2.0f};
  for (Index k : {3, 4, 100}) {
    std::vector<float> p(3, -1.0f), tau(1, 0.0f);
    sparsek(rows_view(z, 1, 3), k, rows_view(p, 1, 3), vector_view(tau));
    for (float value : p) EXPECT_EQ(value, 1.0f);
    EXPECT_EQ(tau[0], -std::numeric_limits<float>::infinity());
  }
}

TEST(SparseK, EmptyRowsAndNoRows) {
  std::vector<float> tau(3, 0.0f);
  sparsek(TensorView<const float, 2>(nullptr, {3, 0}), 2, TensorView<float, 2>(nullptr, {3, 0}),
          vector_view(tau));
  for (float value : tau) EXPECT_EQ(value, -std::numeric_limits<float>::infinity());
  sparsek(TensorView<const float, 2>(nullptr, {0, 5}), 2, TensorView<float, 2>(nullptr, {0, 5}));
  sparsek_backward(TensorView<const float, 2>(nullptr, {3, 0}),
                   TensorView<const float, 2>(nullptr, {3, 0}),
                   TensorView<float, 2>(nullptr, {3, 0}));
}

TEST(SparseK, ResultsIdenticalForOneTwoThreeThreads) {
  RandomSource random(77);
  const Index rows = 37, n = 1000;
  const std::vector<float> z = test::convert<float>(random.normal(rows * n));
  std::vector<float> p1(rows * n), p2(rows * n), p3(rows * n), t1(rows), t2(rows), t3(rows);
  sparsek(rows_view(z, rows, n), 50, rows_view(p1, rows, n), vector_view(t1), 1);
  sparsek(rows_view(z, rows, n), 50, rows_view(p2, rows, n), vector_view(t2), 2);
  sparsek(rows_view(z, rows, n), 50, rows_view(p3, rows, n), vector_view(t3), 3);
  EXPECT_EQ(p1, p2);
  EXPECT_EQ(p1, p3);
  EXPECT_EQ(t1, t2);
  EXPECT_EQ(t1, t3);
  const std::vector<float> g = test::convert<float>(random.normal(rows * n));
  std::vector<float> g1(rows * n), g2(rows * n), g3(rows * n);
  const TensorView<const float, 2> p_view = rows_view(std::as_const(p1), rows, n);
  sparsek_backward(p_view, rows_view(g, rows, n), rows_view(g1, rows, n), 1);
  sparsek_backward(p_view, rows_view(g, rows, n), rows_view(g2, rows, n), 2);
  sparsek_backward(p_view, rows_view(g, rows, n), rows_view(g3, rows, n), 3);
  EXPECT_EQ(g1, g2);
  EXPECT_EQ(g1, g3);
}

// ⟨g, ∂p/∂z · e_j⟩ by central differences of the reference, in double, against grad_z[j].
TEST(SparseK, BackwardMatchesFiniteDifferences) {
  std::uint64_t seed = 900;
  for (Index n : {2, 7, 64, 257})
    for (Index k : {Index(1), n / 2 > 0 ? n / 2 : 1, n - 1}) {
      RandomSource random(++seed);
      SCOPED_TRACE(describe("seed=", seed, " n=", n, " k=", k));
      const std::vector<double> z = random.normal(n, 0, 2);
      const std::vector<double> g = random.normal(n);
      std::vector<double> p(n), grad_z(n);
      sparsek(rows_view(z, 1, n), k, rows_view(p, 1, n));
      sparsek_backward(rows_view(std::as_const(p), 1, n), rows_view(g, 1, n),
                       rows_view(grad_z, 1, n));
      EXPECT_EQ(grad_z, reference::sparsek_backward_reference(p, g));
      const double h = 1e-6;
      for (Index j = 0; j < n; ++j) {
        std::vector<double> up = z, down = z, p_up, p_down;
        up[j] += h;
        down[j] -= h;
        reference::sparsek_reference(up, k, p_up);
        reference::sparsek_reference(down, k, p_down);
        double directional = 0;
        for (Index i = 0; i < n; ++i) directional += g[i] * (p_up[i] - p_down[i]) / (2 * h);
        ASSERT_NEAR(grad_z[j], directional, 1e-6 * (1 + std::abs(directional))) << "j " << j;
      }
    }
}

TEST(SparseK, BadInputIsRejectedAndOutputsUntouched) {
  std::vector<float> z = {1, 2, 3, 4, 5, 6};
  std::vector<float> p(6, -5.0f), tau(2, -5.0f);
  const auto z_view = rows_view(std::as_const(z), 2, 3);
  EXPECT_TRUE(throws_error_with([&] { sparsek(z_view, 0, rows_view(p, 2, 3)); },
                                {"foveal: sparsek: k must be >= 1, got 0"}));
  EXPECT_TRUE(throws_error_with([&] { sparsek(z_view, 1, rows_view(p, 3, 2)); },
                                {"sparsek: p.shape[0] must equal z.shape[0] (N) = 2, got 3"}));
  std::vector<float> short_tau(1);
  EXPECT_TRUE(
      throws_error_with([&] { sparsek(z_view, 1, rows_view(p, 2, 3), vector_view(short_tau)); },
                        {"sparsek: tau.shape[0] must equal z.shape[0] (N) = 2, got 1"}));
  EXPECT_TRUE(throws_error_with([&] { sparsek(z_view, 1, rows_view(z, 2, 3)); },
                                {"sparsek: p must not overlap z in memory"}));
  z[4] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_error_with([&] { sparsek(z_view, 1, rows_view(p, 2, 3), vector_view(tau)); },
                                {"sparsek: z[1, 1] must be finite, got nan"}));
  z[4] = -std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws_error_with([&] { sparsek(z_view, 1, rows_view(p, 2, 3)); },
                                {"sparsek: z[1, 1] must be finite, got -inf"}));
  for (float value : p) EXPECT_EQ(value, -5.0f);
  for (float value : tau) EXPECT_EQ(value, -5.0f);

  std::vector<float> grad(6, 1.0f), grad_z(6, -5.0f);
  EXPECT_TRUE(throws_error_with(
      [&] {
        sparsek_backward(rows_view(std::as_const(p), 2, 3), rows_view(std::as_const(grad), 3, 2),
                         rows_view(grad_z, 2, 3));
      },
      {"sparsek_backward: grad_p.shape[0] must equal p.shape[0] (N) = 2, got 3"}));
  EXPECT_TRUE(throws_error_with(
      [&] {
        sparsek_backward(rows_view(std::as_const(p), 2, 3), rows_view(std::as_const(grad), 2, 3),
                         rows_view(grad, 2, 3));
      },
      {"sparsek_backward: grad_z must not overlap grad_p in memory"}));
  for (float value : grad_z) EXPECT_EQ(value, -5.0f);
}

}  // namespace
}  // namespace foveal
