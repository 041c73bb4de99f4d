// tests/reference/sparsek_reference.hpp — the executable spec of the SPARSEK projection
// (docs/sparsek.md), float64.
//
// f(τ) = Σ clip(z_i − τ, 0, 1) is piecewise linear and non-increasing with breakpoints z_i and
// z_i − 1: sort all 2n breakpoints descending, walk down them keeping f and its slope, and stop
// at the segment where f reaches k; τ is the linear solution there. k >= n gives all ones.
// The backward is the formula: 1_F ⊙ (g − mean_F(g)), F = {0 < p < 1}.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

namespace foveal::reference {

// z: [n]  ->  p: [n]; returns τ (−inf for k >= n).
inline double sparsek_reference(const std::vector<double>& z, std::int64_t k,
                                std::vector<double>& p) {
  const std::int64_t n = static_cast<std::int64_t>(z.size());
  p.assign(z.size(), 1.0);
  if (k >= n) return -std::numeric_limits<double>::infinity();
  // (position, slope change below it): z_i makes i fractional, z_i − 1 makes it one.
  std::vector<std::pair<double, double>> breakpoints;
  for (double value : z) {
    breakpoints.emplace_back(value, 1.0);
    breakpoints.emplace_back(value - 1, -1.0);
  }
  std::sort(breakpoints.begin(), breakpoints.end(), std::greater<>());
  // Above the largest breakpoint f = 0; below breakpoint b, f(τ) = f(b) + slope·(b − τ).
  double f = 0, slope = 0, previous = breakpoints.front().first, tau = previous;
  for (const auto& [position, slope_change] : breakpoints) {
    const double f_here = f + slope * (previous - position);
    if (f_here >= static_cast<double>(k)) {
      tau = previous - (static_cast<double>(k) - f) / slope;
      break;
    }
    f = f_here;
    previous = tau = position;
    slope += slope_change;
  }
  for (std::int64_t i = 0; i < n; ++i) p[i] = std::min(1.0, std::max(0.0, z[i] - tau));
  return tau;
}

// p: [n]  grad_p: [n]  ->  grad_z: [n]
inline std::vector<double> sparsek_backward_reference(const std::vector<double>& p,
                                                      const std::vector<double>& grad_p) {
  double sum = 0;
  double count = 0;
  for (std::size_t i = 0; i < p.size(); ++i)
    if (p[i] > 0 && p[i] < 1) {
      sum += grad_p[i];
      count += 1;
    }
  std::vector<double> grad_z(p.size(), 0.0);
  for (std::size_t i = 0; i < p.size(); ++i)
    if (p[i] > 0 && p[i] < 1) grad_z[i] = grad_p[i] - sum / count;
  return grad_z;
}

}  // namespace foveal::reference
