// Vector quantization (docs/vq.md) against tests/reference/vq_reference.hpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpp/harness.hpp"
#include "foveal/embedding/vq.hpp"
#include "reference/vq_reference.hpp"

namespace foveal {
namespace {

using test::describe;
using test::RandomSource;
using test::throws_error_with;

template <typename T>
TensorView<const T, 2> matrix_view(const std::vector<T>& values, Index rows, Index cols) {
  return TensorView<const T, 2>(values.data(), {rows, cols});
}

template <typename T>
TensorView<T, 1> vector_view(std::vector<T>& values) {
  return TensorView<T, 1>(values.data(), {static_cast<Index>(values.size())});
}

struct AssignCase {
  Index n, k, dim;
};

// Shapes with 1, primes and counts that are no multiple of the tiles (6 codes, 64 / 256 rows).
const AssignCase kAssignCases[] = {{1, 1, 1},    {1, 7, 3},      {7, 13, 5},    {97, 37, 64},
                                   {300, 7, 3},  {257, 509, 17}, {64, 6, 16},   {513, 241, 2},
                                   {1031, 1, 9}, {5, 1024, 64},  {256, 12, 128}};

template <typename T>
void check_assign_against_reference(VqMetric metric) {
  const bool cosine = metric == VqMetric::cosine;
  std::uint64_t seed = 11;
  for (const AssignCase& shape : kAssignCases) {
    RandomSource random(++seed);
    SCOPED_TRACE(describe("seed=", seed, " N=", shape.n, " K=", shape.k, " D=", shape.dim,
                          cosine ? " cosine" : " l2"));
    const std::vector<double> x = test::round_to<T>(random.normal(shape.n * shape.dim));
    const std::vector<double> codebook = test::round_to<T>(random.normal(shape.k * shape.dim));
    const std::vector<T> x_t = test::convert<T>(x), codebook_t = test::convert<T>(codebook);
    std::vector<std::int64_t> indices(shape.n, -1), ref_indices;
    std::vector<T> distances(shape.n, -1);
    std::vector<double> ref_distances;
    vq_assign(matrix_view(x_t, shape.n, shape.dim), matrix_view(codebook_t, shape.k, shape.dim),
              vector_view(indices), vector_view(distances), metric, 2);
    reference::vq_assign_reference(x, codebook, shape.n, shape.k, shape.dim, cosine, ref_indices,
                                   ref_distances);
    const double tolerance = (sizeof(T) == 4 ? 1e-5 : 1e-12) * 8 * (shape.dim + 4);
    for (Index row = 0; row < shape.n; ++row) {
      ASSERT_GE(indices[row], 0);
      ASSERT_LT(indices[row], shape.k);
      // A different index is allowed only where the reference distances tie within rounding.
      std::vector<double> point(x.begin() + row * shape.dim, x.begin() + (row + 1) * shape.dim);
      std::vector<double> chosen(codebook.begin() + indices[row] * shape.dim,
                                 codebook.begin() + (indices[row] + 1) * shape.dim);
      if (cosine) {
        point = reference::normalized_row(point.data(), shape.dim);
        chosen = reference::normalized_row(chosen.data(), shape.dim);
      }
      const double chosen_distance =
          reference::sq_distance_reference(point.data(), chosen.data(), shape.dim);
      const double scale = 1 + ref_distances[row];
      EXPECT_LE(chosen_distance - ref_distances[row], tolerance * scale) << "row " << row;
      EXPECT_NEAR(distances[row], ref_distances[row], tolerance * scale) << "row " << row;
    }
  }
}

TEST(VqAssign, FloatL2MatchesReference) { check_assign_against_reference<float>(VqMetric::l2); }
TEST(VqAssign, FloatCosineMatchesReference) {
  check_assign_against_reference<float>(VqMetric::cosine);
}
TEST(VqAssign, DoubleL2MatchesReference) { check_assign_against_reference<double>(VqMetric::l2); }
TEST(VqAssign, DoubleCosineMatchesReference) {
  check_assign_against_reference<double>(VqMetric::cosine);
}

TEST(VqAssign, IndicesMatchReferenceExactlyForDoubles) {
  RandomSource random(5);
  const Index n = 200, k = 77, dim = 11;
  const std::vector<double> x = random.normal(n * dim), codebook = random.normal(k * dim);
  std::vector<std::int64_t> indices(n), ref_indices;
  std::vector<double> ref_distances;
  vq_assign(matrix_view(x, n, dim), matrix_view(codebook, k, dim), vector_view(indices));
  reference::vq_assign_reference(x, codebook, n, k, dim, false, ref_indices, ref_distances);
  EXPECT_EQ(indices, ref_indices);
}

TEST(VqAssign, TiesGoToTheLowestIndex) {
  // Codes 0..9 cycle through 3 distinct vectors, so every row has exact ties; also the zero
  // row is equidistant from ±e_0.
  const Index dim = 4, k = 10;
  const double distinct[3][4] = {{1, 0, 0, 0}, {-1, 0, 0, 0}, {0, 2, 0, 0}};
  std::vector<float> codebook(k * dim);
  for (Index code = 0; code < k; ++code)
    for (Index d = 0; d < dim; ++d) codebook[code * dim + d] = distinct[code % 3][d];
  const std::vector<float> x = {1, 0, 0, 0, -1, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5};
  for (VqMetric metric : {VqMetric::l2, VqMetric::cosine}) {
    std::vector<std::int64_t> indices(5, -1);
    vq_assign(matrix_view(x, 5, dim), matrix_view(codebook, k, dim), vector_view(indices), {},
              metric);
    EXPECT_EQ(indices[0], 0);
    EXPECT_EQ(indices[1], 1);
    EXPECT_EQ(indices[2], 2);
    EXPECT_EQ(indices[3], 0);  // the zero row: codes 0 and 1 tie (l2), all tie (cosine)
    EXPECT_EQ(indices[4], 0);  // equidistant from all three (orthogonal or symmetric)
  }
}

TEST(VqAssign, BitwiseIdenticalForOneTwoThreeThreads) {
  RandomSource random(3);
  const Index n = 1500, k = 301, dim = 33;
  const std::vector<float> x = test::convert<float>(random.normal(n * dim));
  const std::vector<float> codebook = test::convert<float>(random.normal(k * dim));
  for (VqMetric metric : {VqMetric::l2, VqMetric::cosine}) {
    std::vector<std::int64_t> first_indices;
    std::vector<double> first_distances;
    for (int threads = 1; threads <= 3; ++threads) {
      std::vector<std::int64_t> indices(n);
      std::vector<float> distances(n);
      vq_assign(matrix_view(x, n, dim), matrix_view(codebook, k, dim), vector_view(indices),
                vector_view(distances), metric, threads);
      const std::vector<double> as_double(distances.begin(), distances.end());
      if (threads == 1) {
        first_indices = indices;
        first_distances = as_double;
        continue;
      }
      EXPECT_EQ(indices, first_indices) << threads << " threads";
      EXPECT_TRUE(test::bitwise_equal(as_double, first_distances)) << threads << " threads";
    }
  }
}

TEST(VqAssign, StridedRowsMatchContiguous) {
  RandomSource random(8);
  const Index n = 70, k = 20, dim = 9, pitch = 13;
  const std::vector<float> padded = test::convert<float>(random.normal(n * pitch));
  std::vector<float> packed(n * dim);
  for (Index row = 0; row < n; ++row)
    for (Index d = 0; d < dim; ++d) packed[row * dim + d] = padded[row * pitch + d];
  const std::vector<float> codebook = test::convert<float>(random.normal(k * dim));
  std::vector<std::int64_t> strided_indices(2 * n), indices(n);
  vq_assign(TensorView<const float, 2>(padded.data(), {n, dim}, {pitch, 1}),
            matrix_view(codebook, k, dim),
            TensorView<std::int64_t, 1>(strided_indices.data(), {n}, {2}));
  vq_assign(matrix_view(packed, n, dim), matrix_view(codebook, k, dim), vector_view(indices));
  for (Index row = 0; row < n; ++row) EXPECT_EQ(strided_indices[2 * row], indices[row]);
}

TEST(VqDiagnostics, PerplexityMatchesReference) {
  const std::vector<std::vector<std::int64_t>> cases = {
      {5, 0, 0, 0}, {1, 1, 1, 1}, {3, 1, 0, 7, 2}, {0, 0}, {123456, 1}};
  for (const auto& counts : cases) {
    const TensorView<const std::int64_t, 1> view(counts.data(),
                                                 {static_cast<Index>(counts.size())});
    EXPECT_NEAR(vq_perplexity(view), reference::perplexity_reference(counts), 1e-12);
  }
  const std::vector<std::int64_t> even(16, 3);
  EXPECT_NEAR(vq_perplexity(TensorView<const std::int64_t, 1>(even.data(), {16})), 16, 1e-12);
}

// Fuzz finding: one count seen 2^40 times through a zero stride took hours to sum. It is K equal
// uses (0 when the count is 0); the same answer as the loop on a small broadcast.
TEST(VqDiagnostics, BroadcastCountsAnswerAtOnce) {
  const std::int64_t three = 3, zero = 0, negative = -1;
  const Index huge = Index{1} << 40;
  EXPECT_EQ(vq_perplexity(TensorView<const std::int64_t, 1>(&three, {huge}, {0})),
            static_cast<double>(huge));
  EXPECT_EQ(vq_perplexity(TensorView<const std::int64_t, 1>(&zero, {huge}, {0})), 0.0);
  const std::vector<std::int64_t> seven(7, 3);
  EXPECT_NEAR(vq_perplexity(TensorView<const std::int64_t, 1>(&three, {7}, {0})),
              vq_perplexity(TensorView<const std::int64_t, 1>(seven.data(), {7})), 1e-12);
  EXPECT_THROW(vq_perplexity(TensorView<const std::int64_t, 1>(&negative, {huge}, {0})), Error);
}

TEST(VqDiagnostics, EffectiveRankMatchesReference) {
  RandomSource random(21);
  const Index m = 50, dim = 8;
  std::vector<double> full = test::round_to<float>(random.normal(m * dim));
  // Rank 2: every row a combination of two directions.
  std::vector<double> low(m * dim);
  const std::vector<double> basis = random.normal(2 * dim), weights = random.normal(2 * m);
  for (Index r = 0; r < m; ++r)
    for (Index d = 0; d < dim; ++d)
      low[r * dim + d] =
          static_cast<float>(weights[2 * r] * basis[d] + weights[2 * r + 1] * basis[dim + d]);
  for (const auto* matrix : {&full, &low}) {
    const std::vector<float> as_float = test::convert<float>(*matrix);
    const double got = effective_rank(matrix_view(as_float, m, dim));
    EXPECT_NEAR(got, reference::effective_rank_reference(*matrix, m, dim), 1e-4);
  }
  EXPECT_LE(effective_rank(matrix_view(test::convert<float>(low), m, dim)), 2.0 + 1e-4);
  const std::vector<float> zeros(12, 0.0f);
  EXPECT_EQ(effective_rank(matrix_view(zeros, 3, 4)), 0.0);
}

TEST(VectorQuantizer, EmaUpdateMatchesReference) {
  RandomSource random(31);
  const Index n = 300, k = 17, dim = 6;
  const VqOptions options{VqMetric::l2, 0.8, 1e-3, 1e-3};
  const std::vector<double> initial = test::round_to<float>(random.normal(k * dim));
  VectorQuantizer quantizer(matrix_view(test::convert<float>(initial), k, dim), options);
  std::vector<double> cluster_size(k, 1.0), code_sums = initial, codebook = initial;
  std::vector<std::int64_t> total_counts(k, 0);
  for (int step = 0; step < 3; ++step) {
    const std::vector<double> x = test::round_to<float>(random.normal(n * dim, 0.5, 2));
    const std::vector<float> x_float = test::convert<float>(x);
    std::vector<std::int64_t> indices(n), ref_indices;
    std::vector<double> ref_distances;
    quantizer.update(matrix_view(x_float, n, dim), vector_view(indices));
    reference::vq_assign_reference(x, codebook, n, k, dim, false, ref_indices, ref_distances);
    ASSERT_EQ(indices, ref_indices) << "step " << step;
    for (std::int64_t index : indices) ++total_counts[index];
    codebook = reference::ema_update_reference(x, indices, k, dim, options.decay, options.epsilon,
                                               cluster_size, code_sums);
    for (Index code = 0; code < k; ++code) {
      EXPECT_NEAR(quantizer.cluster_size()(code), cluster_size[code], 1e-9);
      EXPECT_EQ(quantizer.usage_counts()(code), total_counts[code]);
      for (Index d = 0; d < dim; ++d)
        EXPECT_NEAR(quantizer.codebook()(code, d), codebook[code * dim + d], 1e-5);
    }
    codebook = test::round_to<float>(codebook);
  }
  EXPECT_NEAR(quantizer.perplexity(), reference::perplexity_reference(total_counts), 1e-12);
  std::vector<double> final_codebook(k * dim);
  for (Index code = 0; code < k; ++code)
    for (Index d = 0; d < dim; ++d) final_codebook[code * dim + d] = quantizer.codebook()(code, d);
  EXPECT_NEAR(quantizer.codebook_effective_rank(),
              reference::effective_rank_reference(final_codebook, k, dim), 1e-4);
}

// Four tight clusters far apart, 60 rows each.
std::vector<float> clustered_rows(RandomSource& random, Index per_cluster, Index dim,
                                  std::vector<double>& centers) {
  const Index clusters = 4;
  centers = random.normal(clusters * dim, 0, 20);
  std::vector<float> rows;
  for (Index c = 0; c < clusters; ++c) {
    const std::vector<double> noise = random.normal(per_cluster * dim, 0, 0.1);
    for (Index r = 0; r < per_cluster; ++r)
      for (Index d = 0; d < dim; ++d)
        rows.push_back(static_cast<float>(centers[c * dim + d] + noise[r * dim + d]));
  }
  return rows;
}

TEST(VectorQuantizer, KmeansPlusPlusPicksDataRowsAndLloydFindsClusterMeans) {
  RandomSource random(41);
  const Index per_cluster = 60, dim = 5, n = 4 * per_cluster;
  std::vector<double> centers;
  const std::vector<float> x = clustered_rows(random, per_cluster, dim, centers);
  VectorQuantizer seeded(4, dim);
  seeded.init_kmeans(matrix_view(x, n, dim), 0, 7);
  for (Index code = 0; code < 4; ++code) {
    bool is_row = false;
    for (Index row = 0; row < n && !is_row; ++row) {
      bool equal = true;
      for (Index d = 0; d < dim; ++d) equal &= seeded.codebook()(code, d) == x[row * dim + d];
      is_row = equal;
    }
    EXPECT_TRUE(is_row) << "code " << code << " is not a row of x";
  }
  VectorQuantizer fitted(4, dim);
  fitted.init_kmeans(matrix_view(x, n, dim), 5, 7);
  std::vector<std::int64_t> indices(n);
  fitted.quantize(matrix_view(x, n, dim), vector_view(indices));
  // Each code is the mean of the rows assigned to it (Lloyd's fixed point) and every code is used.
  std::vector<double> sums(4 * dim, 0);
  std::vector<std::int64_t> counts(4, 0);
  for (Index row = 0; row < n; ++row) {
    ++counts[indices[row]];
    for (Index d = 0; d < dim; ++d) sums[indices[row] * dim + d] += x[row * dim + d];
  }
  for (Index code = 0; code < 4; ++code) {
    EXPECT_EQ(counts[code], per_cluster);
    for (Index d = 0; d < dim; ++d)
      EXPECT_NEAR(fitted.codebook()(code, d), sums[code * dim + d] / counts[code], 1e-4);
  }
  EXPECT_EQ(fitted.num_dead_codes(), 0);
}

TEST(VectorQuantizer, DeadCodesAreCountedAndRestartedFromTheBatch) {
  RandomSource random(51);
  const Index per_cluster = 30, dim = 3, n = 4 * per_cluster, k = 8;
  std::vector<double> centers;
  const std::vector<float> x = clustered_rows(random, per_cluster, dim, centers);
  // Codes 0..3 sit on the clusters, codes 4..7 far away from all data.
  std::vector<float> codebook(k * dim);
  for (Index code = 0; code < k; ++code)
    for (Index d = 0; d < dim; ++d)
      codebook[code * dim + d] =
          code < 4 ? static_cast<float>(centers[code * dim + d]) : 1000.0f + code;
  VqOptions options;
  options.decay = 0.5;
  options.dead_threshold = 0.1;
  VectorQuantizer quantizer(matrix_view(codebook, k, dim), options);
  EXPECT_EQ(quantizer.num_dead_codes(), 0);
  for (int step = 0; step < 4; ++step) quantizer.update(matrix_view(x, n, dim), {}, false);
  EXPECT_EQ(quantizer.num_dead_codes(), 4);  // 0.5^4 < 0.1
  EXPECT_NEAR(quantizer.perplexity(), 4, 1e-9);
  EXPECT_EQ(quantizer.restart_dead_codes(matrix_view(x, n, dim), 3), 4);
  EXPECT_EQ(quantizer.num_dead_codes(), 0);
  for (Index code = 4; code < k; ++code) {
    EXPECT_EQ(quantizer.cluster_size()(code), 1.0);
    bool is_row = false;
    for (Index row = 0; row < n && !is_row; ++row) {
      bool equal = true;
      for (Index d = 0; d < dim; ++d) equal &= quantizer.codebook()(code, d) == x[row * dim + d];
      is_row = equal;
    }
    EXPECT_TRUE(is_row) << "code " << code;
  }
  for (Index code = 0; code < 4; ++code)  // live codes untouched
    for (Index d = 0; d < dim; ++d)
      EXPECT_EQ(quantizer.codebook()(code, d), codebook[code * dim + d]);
}

TEST(ResidualVQ, EncodeQuantizesResidualsAndDecodeSumsCodes) {
  RandomSource random(61);
  const Index n = 400, dim = 8, stages = 3, k = 16;
  const std::vector<float> x = test::convert<float>(random.normal(n * dim));
  ResidualVQ rvq(stages, k, dim);
  rvq.init_kmeans(matrix_view(x, n, dim), 4, 9);
  std::vector<std::int64_t> codes(n * stages, -1);
  std::vector<float> quantized(n * dim), decoded(n * dim);
  rvq.encode(matrix_view(x, n, dim), TensorView<std::int64_t, 2>(codes.data(), {n, stages}),
             TensorView<float, 2>(quantized.data(), {n, dim}));
  rvq.decode(TensorView<const std::int64_t, 2>(codes.data(), {n, stages}),
             TensorView<float, 2>(decoded.data(), {n, dim}));
  EXPECT_EQ(decoded, quantized);
  // Stage by stage: the codes are the nearest codes to the residual, and the error shrinks.
  std::vector<double> residual(x.begin(), x.end());
  double previous_error = std::numeric_limits<double>::infinity();
  for (Index s = 0; s < stages; ++s) {
    std::vector<double> codebook(k * dim);
    for (Index code = 0; code < k; ++code)
      for (Index d = 0; d < dim; ++d) codebook[code * dim + d] = rvq.stage(s).codebook()(code, d);
    std::vector<std::int64_t> ref_indices;
    std::vector<double> ref_distances;
    reference::vq_assign_reference(residual, codebook, n, k, dim, false, ref_indices,
                                   ref_distances);
    double error = 0;
    for (Index row = 0; row < n; ++row) {
      EXPECT_EQ(codes[row * stages + s], ref_indices[row]) << "stage " << s << " row " << row;
      for (Index d = 0; d < dim; ++d)
        residual[row * dim + d] = static_cast<float>(static_cast<float>(residual[row * dim + d]) -
                                                     codebook[ref_indices[row] * dim + d]);
      error += ref_distances[row];
    }
    EXPECT_LT(error, previous_error);
    previous_error = error;
  }
  rvq.update(matrix_view(x, n, dim));
  EXPECT_GT(rvq.stage(0).perplexity(), 1.0);
}

// ---------------------------------------------------------------------------------------------
// Rejected input leaves the outputs untouched.

TEST(VqErrors, AssignRejectsBadInput) {
  const Index n = 6, k = 4, dim = 3;
  std::vector<float> x(n * dim, 0.5f), codebook(k * dim, 1.0f);
  std::vector<std::int64_t> indices(n, -7);
  std::vector<float> distances(n, -7.0f);
  const auto assign = [&](Index rows, Index codes, Index x_dim, Index code_dim) {
    return [&, rows, codes, x_dim, code_dim] {
      vq_assign(matrix_view(x, rows, x_dim), matrix_view(codebook, codes, code_dim),
                TensorView<std::int64_t, 1>(indices.data(), {rows}),
                TensorView<float, 1>(distances.data(), {rows}));
    };
  };
  EXPECT_TRUE(throws_error_with(assign(n, 0, dim, dim),
                                {"foveal: vq_assign: codebook.shape[0] (K) must be >= 1, got 0"}));
  EXPECT_TRUE(throws_error_with(assign(n, k, dim, 2),
                                {"vq_assign: x.shape[1] must equal codebook.shape[1] (D) = 2"}));
  x[4 * dim + 1] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_error_with(assign(n, k, dim, dim), {"x[4, 1] must be finite, got nan"}));
  x[4 * dim + 1] = 0.5f;
  codebook[2 * dim] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(
      throws_error_with(assign(n, k, dim, dim), {"codebook[2, 0] must be finite, got inf"}));
  codebook[2 * dim] = 1.0f;
  EXPECT_TRUE(throws_error_with(
      [&] {
        vq_assign(matrix_view(x, n, dim), matrix_view(codebook, k, dim),
                  TensorView<std::int64_t, 1>(indices.data(), {n - 1}));
      },
      {"indices.shape[0] must equal x.shape[0] (N) = 6, got 5"}));
  for (Index row = 0; row < n; ++row) {
    EXPECT_EQ(indices[row], -7);
    EXPECT_EQ(distances[row], -7.0f);
  }
}

TEST(VqErrors, QuantizerRejectsBadOptionsAndInput) {
  const auto make = [](double decay, double threshold, double epsilon) {
    return [=] {
      VqOptions options;
      options.decay = decay;
      options.dead_threshold = threshold;
      options.epsilon = epsilon;
      VectorQuantizer quantizer(4, 3, options);
    };
  };
  for (double decay : {0.0, 1.0, -0.5, 1.5, std::nan("")})
    EXPECT_TRUE(throws_error_with(make(decay, 0.1, 1e-5),
                                  {"VectorQuantizer: options.decay must be in (0, 1), got"}));
  EXPECT_TRUE(throws_error_with(make(0.9, -1, 1e-5),
                                {"options.dead_threshold must be finite and >= 0", "got -1"}));
  EXPECT_TRUE(
      throws_error_with(make(0.9, 0.1, 0), {"options.epsilon must be finite and > 0, got 0"}));
  EXPECT_TRUE(throws_error_with([] { VectorQuantizer quantizer(0, 3); },
                                {"VectorQuantizer: num_codes (K) must be >= 1, got 0"}));

  std::vector<float> codebook = {1, 0, 0, 1}, x = {1, 2, 3, 4, 5, 6};
  VectorQuantizer quantizer(matrix_view(codebook, 2, 2));
  EXPECT_TRUE(throws_error_with([&] { quantizer.update(matrix_view(x, 2, 3)); },
                                {"VectorQuantizer::update: x.shape[1] must equal dim (D) = 2"}));
  x[3] = std::numeric_limits<float>::infinity();
  EXPECT_TRUE(throws_error_with([&] { quantizer.update(matrix_view(x, 3, 2)); },
                                {"x[1, 1] must be finite"}));
  EXPECT_TRUE(throws_error_with([&] { quantizer.init_kmeans(matrix_view(x, 3, 2), 2, 0); },
                                {"VectorQuantizer::init_kmeans: x[1, 1] must be finite"}));
  EXPECT_TRUE(throws_error_with([&] { quantizer.restart_dead_codes(matrix_view(x, 0, 2), 0); },
                                {"x.shape[0] (N) must be >= 1, got 0"}));
  // Nothing changed.
  EXPECT_EQ(quantizer.usage_counts()(0), 0);
  EXPECT_EQ(quantizer.cluster_size()(1), 1.0);
  EXPECT_EQ(quantizer.codebook()(0, 0), 1.0f);
  EXPECT_EQ(quantizer.codebook()(1, 1), 1.0f);

  ResidualVQ rvq(2, 2, 2);
  const std::vector<std::int64_t> codes = {0, 5};
  std::vector<float> out(2, -7.0f);
  EXPECT_TRUE(throws_error_with(
      [&] {
        rvq.decode(TensorView<const std::int64_t, 2>(codes.data(), {1, 2}),
                   TensorView<float, 2>(out.data(), {1, 2}));
      },
      {"ResidualVQ::decode: codes[0, 1] must be in [0, 2), got 5"}));
  EXPECT_EQ(out[0], -7.0f);
}

}  // namespace
}  // namespace foveal
