// tests/reference/vq_reference.hpp — the executable spec of vector quantization (docs/vq.md).
//
// Plain float64 loops over the formulas, row-major std::vector<double>:
//   assign: idx_n = argmin_k ‖x_n − c_k‖² (cosine: of x/‖x‖ and c/‖c‖, zero stays zero), the
//   lowest k on ties ; perplexity exp(−Σ p log p) ; EMA N ← γN + (1−γ)n, m ← γm + (1−γ)Σx,
//   N̂ = (N + ε)/(ΣN + Kε)·ΣN, c = m / N̂ ; effective rank exp(H(σ/Σσ)) (σ from the eigenvalues
//   of the Gram matrix by Jacobi rotations, a route independent of Eigen's SVD).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace foveal::reference {

// row [D] scaled to unit norm (a zero row stays zero).
inline std::vector<double> normalized_row(const double* row, std::int64_t dim) {
  double sq_norm = 0;
  for (std::int64_t d = 0; d < dim; ++d) sq_norm += row[d] * row[d];
  std::vector<double> out(row, row + dim);
  if (sq_norm > 0)
    for (double& value : out) value /= std::sqrt(sq_norm);
  return out;
}

// ‖a − b‖² over dim entries.
inline double sq_distance_reference(const double* a, const double* b, std::int64_t dim) {
  double sum = 0;
  for (std::int64_t d = 0; d < dim; ++d) sum += (a[d] - b[d]) * (a[d] - b[d]);
  return sum;
}

// x [N, D], codebook [K, D] -> indices [N], sq_distances [N].
inline void vq_assign_reference(const std::vector<double>& x, const std::vector<double>& codebook,
                                std::int64_t n, std::int64_t k, std::int64_t dim, bool cosine,
                                std::vector<std::int64_t>& indices,
                                std::vector<double>& sq_distances) {
  indices.assign(static_cast<std::size_t>(n), 0);
  sq_distances.assign(static_cast<std::size_t>(n), 0);
  for (std::int64_t row = 0; row < n; ++row) {
    std::vector<double> point(x.begin() + row * dim, x.begin() + (row + 1) * dim);
    if (cosine) point = normalized_row(point.data(), dim);
    double best = std::numeric_limits<double>::infinity();
    for (std::int64_t code = 0; code < k; ++code) {
      std::vector<double> center(codebook.begin() + code * dim,
                                 codebook.begin() + (code + 1) * dim);
      if (cosine) center = normalized_row(center.data(), dim);
      const double distance = sq_distance_reference(point.data(), center.data(), dim);
      if (distance < best) {
        best = distance;
        indices[row] = code;
      }
    }
    sq_distances[row] = best;
  }
}

inline double perplexity_reference(const std::vector<std::int64_t>& counts) {
  double total = 0;
  for (std::int64_t count : counts) total += static_cast<double>(count);
  if (total == 0) return 0;
  double entropy = 0;
  for (std::int64_t count : counts)
    if (count > 0) entropy -= count / total * std::log(count / total);
  return std::exp(entropy);
}

// One EMA step on cluster_size [K], code_sums [K, D] with the batch x [N, D] assigned to
// indices; returns the new codebook [K, D].
inline std::vector<double> ema_update_reference(const std::vector<double>& x,
                                                const std::vector<std::int64_t>& indices,
                                                std::int64_t k, std::int64_t dim, double decay,
                                                double epsilon, std::vector<double>& cluster_size,
                                                std::vector<double>& code_sums) {
  std::vector<double> counts(static_cast<std::size_t>(k), 0), sums(code_sums.size(), 0);
  for (std::size_t row = 0; row < indices.size(); ++row) {
    counts[indices[row]] += 1;
    for (std::int64_t d = 0; d < dim; ++d) sums[indices[row] * dim + d] += x[row * dim + d];
  }
  double total = 0;
  for (std::int64_t code = 0; code < k; ++code) {
    cluster_size[code] = decay * cluster_size[code] + (1 - decay) * counts[code];
    total += cluster_size[code];
    for (std::int64_t d = 0; d < dim; ++d)
      code_sums[code * dim + d] =
          decay * code_sums[code * dim + d] + (1 - decay) * sums[code * dim + d];
  }
  std::vector<double> codebook(code_sums.size());
  for (std::int64_t code = 0; code < k; ++code) {
    const double smoothed = (cluster_size[code] + epsilon) / (total + k * epsilon) * total;
    for (std::int64_t d = 0; d < dim; ++d)
      codebook[code * dim + d] = code_sums[code * dim + d] / smoothed;
  }
  return codebook;
}

// matrix [M, D] -> exp(H(σ / Σσ)), σ² the eigenvalues of the Gram matrix AᵀA (cyclic Jacobi).
inline double effective_rank_reference(const std::vector<double>& matrix, std::int64_t m,
                                       std::int64_t dim) {
  std::vector<double> gram(static_cast<std::size_t>(dim * dim), 0);
  for (std::int64_t i = 0; i < dim; ++i)
    for (std::int64_t j = 0; j < dim; ++j)
      for (std::int64_t r = 0; r < m; ++r)
        gram[i * dim + j] += matrix[r * dim + i] * matrix[r * dim + j];
  for (int sweep = 0; sweep < 100; ++sweep) {
    double off = 0;
    for (std::int64_t p = 0; p < dim; ++p)
      for (std::int64_t q = p + 1; q < dim; ++q) off += gram[p * dim + q] * gram[p * dim + q];
    if (off < 1e-30) break;
    for (std::int64_t p = 0; p < dim; ++p)
      for (std::int64_t q = p + 1; q < dim; ++q) {
        const double apq = gram[p * dim + q];
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (gram[q * dim + q] - gram[p * dim + p]) / (2 * apq);
        const double t = (theta >= 0 ? 1 : -1) / (std::abs(theta) + std::sqrt(theta * theta + 1));
        const double c = 1 / std::sqrt(t * t + 1), s = t * c;
        for (std::int64_t r = 0; r < dim; ++r) {  // columns p, q
          const double grp = gram[r * dim + p], grq = gram[r * dim + q];
          gram[r * dim + p] = c * grp - s * grq;
          gram[r * dim + q] = s * grp + c * grq;
        }
        for (std::int64_t r = 0; r < dim; ++r) {  // rows p, q
          const double gpr = gram[p * dim + r], gqr = gram[q * dim + r];
          gram[p * dim + r] = c * gpr - s * gqr;
          gram[q * dim + r] = s * gpr + c * gqr;
        }
      }
  }
  std::vector<double> sigma(static_cast<std::size_t>(dim));
  double total = 0;
  for (std::int64_t i = 0; i < dim; ++i)
    total += sigma[i] = std::sqrt(std::max(0.0, gram[i * dim + i]));
  if (!(total > 0)) return 0;
  double entropy = 0;
  for (double value : sigma)
    if (value > 0) entropy -= value / total * std::log(value / total);
  return std::exp(entropy);
}

}  // namespace foveal::reference
