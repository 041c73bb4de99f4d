// The SPARSEK projection (docs/sparsek.md) and its backward.
//
// Per row, in the shifted domain d_i = z_i − z_(k) (double) with s = τ − z_(k) ∈ [−1, 0):
// f(s) = Σ clip(d_i − s, 0, 1) is continuous and non-increasing, f(−1) >= k > f(0). Scores with
// d_i >= 1 are 1 and scores with d_i <= −1 are 0 for every s in the bracket, so only the
// candidates with |d_i| < 1 are kept. Their breakpoints d_c and d_c − 1 are cut by median
// pivots: each pivot evaluation halves the breakpoints left inside the bracket, and a candidate
// with no breakpoint inside any more folds into constants (ones, or the linear part
// Σ d_c − s·count), so the work is expected O(n). When no breakpoint is left inside, f is
// linear on the bracket and s solves it in closed form. Working on d keeps ties exact (tied
// scores get d = 0 and the same p) and huge scores finite (|d| may round, or overflow to ±inf
// in double input, where clip saturates).
#include "foveal/sparsek/projection.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {

namespace {

// One thread's memory for one row length.
template <typename T>
struct RowScratch {
  std::vector<T> scores;            // the row, reordered by the selection
  std::vector<double> candidates;   // d_c of the scores with |d_c| < 1 still undecided
  std::vector<double> breakpoints;  // their breakpoints inside the bracket

  explicit RowScratch(Index n)
      : scores(static_cast<std::size_t>(n)),
        candidates(static_cast<std::size_t>(n)),
        breakpoints(2 * static_cast<std::size_t>(n)) {}
};

// The contributions to f of the scores decided on the current bracket [low, high].
struct DecidedPart {
  double ones = 0;        // scores with p = 1
  double linear_sum = 0;  // Σ d_c of the scores fractional on the whole bracket
  double linear_count = 0;

  double at(double s) const { return ones + linear_sum - linear_count * s; }
};

// s = τ − z_(k) for the shifted scores of one row (see the file comment).
inline double solve_shift(Index k, std::vector<double>& candidates, Index candidate_count,
                          double ones, std::vector<double>& breakpoints) {
  DecidedPart decided;
  decided.ones = ones;
  double low = -1, high = 0;
  const double target = static_cast<double>(k);
  // Folds the candidates without a breakpoint strictly inside (low, high) into `decided`.
  auto settle = [&] {
    Index kept = 0;
    for (Index c = 0; c < candidate_count; ++c) {
      const double d = candidates[c];
      const bool upper_inside = d > low && d < high;
      const bool lower_inside = d - 1 > low && d - 1 < high;
      if (upper_inside || lower_inside) {
        candidates[kept++] = d;
      } else if (d - 1 >= high) {
        decided.ones += 1;
      } else if (d > low) {  // d − 1 <= low and d >= high: fractional on the whole bracket
        decided.linear_sum += d;
        decided.linear_count += 1;
      }  // else d <= low: zero on the whole bracket
    }
    candidate_count = kept;
  };
  settle();
  while (candidate_count > 0) {
    Index breakpoint_count = 0;
    for (Index c = 0; c < candidate_count; ++c) {
      const double d = candidates[c];
      if (d > low && d < high) breakpoints[breakpoint_count++] = d;
      if (d - 1 > low && d - 1 < high) breakpoints[breakpoint_count++] = d - 1;
    }
    auto middle = breakpoints.begin() + breakpoint_count / 2;
    std::nth_element(breakpoints.begin(), middle, breakpoints.begin() + breakpoint_count);
    const double pivot = *middle;
    double f = decided.at(pivot);
    for (Index c = 0; c < candidate_count; ++c)
      f += std::min(1.0, std::max(0.0, candidates[c] - pivot));
    if (f >= target)
      low = pivot;
    else
      high = pivot;
    settle();
  }
  // f is linear on [low, high] with f(low) >= k > f(high), so the slope is non-zero; the guard
  // only protects against a rounding-level inconsistency.
  if (decided.linear_count == 0) return low;
  const double s = (decided.ones + decided.linear_sum - target) / decided.linear_count;
  return std::min(high, std::max(low, s));
}

template <typename T>
void project_row(const T* z, Index stride, Index n, Index k, T* p, Index p_stride, T* tau,
                 RowScratch<T>& scratch) {
  if (k >= n) {
    for (Index i = 0; i < n; ++i) p[i * p_stride] = T(1);
    if (tau != nullptr) *tau = -std::numeric_limits<T>::infinity();
    return;
  }
  for (Index i = 0; i < n; ++i) scratch.scores[i] = z[i * stride];
  const auto kth = scratch.scores.begin() + (k - 1);
  std::nth_element(scratch.scores.begin(), kth, scratch.scores.begin() + n, std::greater<T>());
  const double kth_score = static_cast<double>(*kth);
  double ones = 0;
  Index candidate_count = 0;
  for (Index i = 0; i < n; ++i) {
    const double d = static_cast<double>(z[i * stride]) - kth_score;
    if (d >= 1)
      ones += 1;
    else if (d > -1)
      scratch.candidates[candidate_count++] = d;
  }
  const double shift =
      solve_shift(k, scratch.candidates, candidate_count, ones, scratch.breakpoints);
  for (Index i = 0; i < n; ++i) {
    const double d = static_cast<double>(z[i * stride]) - kth_score;
    p[i * p_stride] = static_cast<T>(std::min(1.0, std::max(0.0, d - shift)));
  }
  if (tau != nullptr) *tau = static_cast<T>(kth_score + shift);
}

// Rows per parallel task: enough work per task to amortize the scheduling.
inline Index rows_per_task(Index n) { return std::max<Index>(1, 16384 / std::max<Index>(n, 1)); }

// Every z[r, i] finite, else an error naming the first bad position (lowest row, then column).
template <typename T>
void require_finite_scores(const char* function, TensorView<const T, 2> z, int num_threads) {
  if (z.empty()) return;  // nothing to check: no per-row state for a huge N of empty rows
  const Index rows = z.size(0), n = z.size(1);
  std::vector<Index> first_bad(static_cast<std::size_t>(rows), -1);
  parallel_for(rows, num_threads, [&](std::int64_t r) {
    for (Index i = 0; i < n; ++i)
      if (!std::isfinite(z(r, i))) {
        first_bad[r] = i;
        return;
      }
  });
  for (Index r = 0; r < rows; ++r)
    if (first_bad[r] >= 0)
      check(false, function, ": z[", r, ", ", first_bad[r], "] must be finite, got ",
            z(r, first_bad[r]));
}

template <typename T>
void sparsek_checked(TensorView<const T, 2> z, Index k, TensorView<T, 2> p, TensorView<T, 1> tau,
                     int num_threads) {
  constexpr const char* kFunction = "sparsek";
  detail::require_num_threads(kFunction, num_threads);
  check(k >= 1, kFunction, ": k must be >= 1, got ", k);
  detail::require_valid_view(kFunction, "z", z);
  check(!p.is_null() || z.empty(), kFunction, ": p must be given");
  detail::require_valid_view(kFunction, "p", p);
  detail::require_extent(kFunction, "p", p, 0, "z.shape[0] (N)", z.size(0));
  detail::require_extent(kFunction, "p", p, 1, "z.shape[1] (n)", z.size(1));
  detail::require_disjoint(kFunction, "p", p, "z", z);
  if (!tau.is_null()) {
    detail::require_valid_view(kFunction, "tau", tau);
    detail::require_extent(kFunction, "tau", tau, 0, "z.shape[0] (N)", z.size(0));
    detail::require_disjoint(kFunction, "tau", tau, "z", z);
    detail::require_disjoint(kFunction, "tau", tau, "p", p);
  }
  const int threads = detail::resolve_num_threads(num_threads);
  require_finite_scores(kFunction, z, threads);

  const Index rows = z.size(0), n = z.size(1);
  if (n == 0 || rows == 0) {  // nothing to project (and no scratch of n scores to allocate)
    for (Index r = 0; r < rows && !tau.is_null(); ++r) tau(r) = -std::numeric_limits<T>::infinity();
    return;
  }
  const Index block = rows_per_task(n);
  const Index tasks = (rows + block - 1) / block;
  // Scratch for the threads the loop starts: never more than its tasks.
  const int team = detail::team_size(tasks, threads);
  std::vector<RowScratch<T>> scratch;
  scratch.reserve(static_cast<std::size_t>(team));
  for (int t = 0; t < team; ++t) scratch.emplace_back(k >= n ? 0 : n);
  parallel_for(tasks, team, [&](std::int64_t task) {
    RowScratch<T>& mine = scratch[detail::thread_index()];
    const Index end = std::min(rows, (task + 1) * block);
    for (Index r = task * block; r < end; ++r)
      project_row(&z(r, 0), z.stride(1), n, k, &p(r, 0), p.stride(1),
                  tau.is_null() ? nullptr : &tau(r), mine);
  });
}

template <typename T>
void backward_row(const T* p, Index p_stride, const T* grad_p, Index grad_stride, Index n,
                  T* grad_z, Index out_stride) {
  double sum = 0;
  Index count = 0;
  for (Index i = 0; i < n; ++i) {
    const T value = p[i * p_stride];
    if (value > T(0) && value < T(1)) {
      sum += static_cast<double>(grad_p[i * grad_stride]);
      ++count;
    }
  }
  const double mean = count > 0 ? sum / static_cast<double>(count) : 0.0;
  for (Index i = 0; i < n; ++i) {
    const T value = p[i * p_stride];
    const bool fractional = value > T(0) && value < T(1);
    grad_z[i * out_stride] =
        fractional ? static_cast<T>(static_cast<double>(grad_p[i * grad_stride]) - mean) : T(0);
  }
}

template <typename T>
void sparsek_backward_checked(TensorView<const T, 2> p, TensorView<const T, 2> grad_p,
                              TensorView<T, 2> grad_z, int num_threads) {
  constexpr const char* kFunction = "sparsek_backward";
  detail::require_num_threads(kFunction, num_threads);
  detail::require_valid_view(kFunction, "p", p);
  detail::require_valid_view(kFunction, "grad_p", grad_p);
  detail::require_extent(kFunction, "grad_p", grad_p, 0, "p.shape[0] (N)", p.size(0));
  detail::require_extent(kFunction, "grad_p", grad_p, 1, "p.shape[1] (n)", p.size(1));
  check(!grad_z.is_null() || p.empty(), kFunction, ": grad_z must be given");
  detail::require_valid_view(kFunction, "grad_z", grad_z);
  detail::require_extent(kFunction, "grad_z", grad_z, 0, "p.shape[0] (N)", p.size(0));
  detail::require_extent(kFunction, "grad_z", grad_z, 1, "p.shape[1] (n)", p.size(1));
  detail::require_disjoint(kFunction, "grad_z", grad_z, "p", p);
  detail::require_disjoint(kFunction, "grad_z", grad_z, "grad_p", grad_p);
  const int threads = detail::resolve_num_threads(num_threads);
  const Index rows = p.size(0), n = p.size(1);
  if (n == 0) return;
  const Index block = rows_per_task(n);
  parallel_for((rows + block - 1) / block, threads, [&](std::int64_t task) {
    const Index end = std::min(rows, (task + 1) * block);
    for (Index r = task * block; r < end; ++r)
      backward_row(&p(r, 0), p.stride(1), &grad_p(r, 0), grad_p.stride(1), n, &grad_z(r, 0),
                   grad_z.stride(1));
  });
}

}  // namespace

void sparsek(TensorView<const float, 2> z, Index k, TensorView<float, 2> p,
             TensorView<float, 1> tau, int num_threads) {
  sparsek_checked(z, k, p, tau, num_threads);
}

void sparsek(TensorView<const double, 2> z, Index k, TensorView<double, 2> p,
             TensorView<double, 1> tau, int num_threads) {
  sparsek_checked(z, k, p, tau, num_threads);
}

void sparsek_backward(TensorView<const float, 2> p, TensorView<const float, 2> grad_p,
                      TensorView<float, 2> grad_z, int num_threads) {
  sparsek_backward_checked(p, grad_p, grad_z, num_threads);
}

void sparsek_backward(TensorView<const double, 2> p, TensorView<const double, 2> grad_p,
                      TensorView<double, 2> grad_z, int num_threads) {
  sparsek_backward_checked(p, grad_p, grad_z, num_threads);
}

}  // namespace foveal
