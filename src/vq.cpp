// Vector quantization (docs/vq.md): the tiled assign kernel, the VectorQuantizer's
// initialization, EMA update, dead-code restart and diagnostics, and the ResidualVQ.
#include "foveal/embedding/vq.hpp"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>

#include "detail/kernels.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/detail/validate.hpp"

namespace foveal {

namespace {

// The assignment of validated input (see vq_assign).
template <typename T>
void assign_unchecked(TensorView<const T, 2> x, TensorView<const T, 2> codebook,
                      TensorView<std::int64_t, 1> indices, TensorView<T, 1> sq_distances,
                      VqMetric metric, int num_threads) {
  const Index num_codes = codebook.size(0);
  const Index dim = codebook.size(1);
  std::vector<T> code_offset(static_cast<std::size_t>(num_codes));
  std::vector<T> code_scale(static_cast<std::size_t>(num_codes));
  const bool cosine = metric == VqMetric::cosine;
  for (Index k = 0; k < num_codes; ++k) {
    const T* code = &codebook(k, 0);
    T sq_norm = 0;
    for (Index d = 0; d < dim; ++d) sq_norm += code[d] * code[d];
    if (cosine) {
      code_offset[k] = sq_norm > 0 ? T(1) : T(0);
      code_scale[k] = sq_norm > 0 ? T(-2) / std::sqrt(sq_norm) : T(0);
    } else {
      code_offset[k] = sq_norm;
      code_scale[k] = T(-2);
    }
  }
  const detail::VqAssignPlan<T> plan{x.data(),
                                     x.stride(0),
                                     x.size(0),
                                     dim,
                                     codebook.data(),
                                     codebook.stride(0),
                                     num_codes,
                                     code_offset.data(),
                                     code_scale.data(),
                                     cosine,
                                     indices.data(),
                                     indices.stride(0),
                                     sq_distances.is_null() ? nullptr : sq_distances.data(),
                                     sq_distances.is_null() ? 0 : sq_distances.stride(0),
                                     detail::resolve_num_threads(num_threads)};
  detail::kernels<T>().vq_assign(plan);
}

// ---------------------------------------------------------------------------------------------
// Validation.

// Every entry of `matrix` [M, D] finite; rows are scanned in parallel and the first bad entry
// (in row-major order) is reported.
template <typename T>
void require_finite(const char* function, const char* name, TensorView<const T, 2> matrix,
                    int num_threads) {
  constexpr Index kRowsPerTask = 1024;
  const Index tasks = (matrix.size(0) + kRowsPerTask - 1) / kRowsPerTask;
  std::vector<std::uint8_t> bad(static_cast<std::size_t>(tasks), 0);
  const int threads = detail::team_size(tasks, detail::resolve_num_threads(num_threads),
                                        matrix.size(0) * matrix.size(1));
  parallel_for(tasks, threads, [&](Index task) {
    bool any_bad = false;
    const Index end = std::min(matrix.size(0), (task + 1) * kRowsPerTask);
    for (Index r = task * kRowsPerTask; r < end; ++r)
      for (Index d = 0; d < matrix.size(1); ++d) any_bad |= !std::isfinite(matrix(r, d));
    bad[static_cast<std::size_t>(task)] = any_bad;
  });
  for (Index task = 0; task < tasks; ++task) {
    if (!bad[static_cast<std::size_t>(task)]) continue;
    for (Index r = task * kRowsPerTask; r < matrix.size(0); ++r)
      for (Index d = 0; d < matrix.size(1); ++d)
        check(std::isfinite(matrix(r, d)), function, ": ", name, "[", r, ", ", d,
              "] must be finite, got ", matrix(r, d));
  }
}

// A [N, D] input: valid, unit inner stride, D = `dim` (when >= 0), finite.
template <typename T>
void require_rows(const char* function, const char* name, TensorView<const T, 2> rows, Index dim,
                  const char* dim_name, int num_threads) {
  detail::require_num_threads(function, num_threads);
  detail::require_valid_view(function, name, rows);
  detail::require_unit_inner_stride(function, name, rows);
  if (dim >= 0) detail::require_extent(function, name, rows, 1, dim_name, dim);
  require_finite(function, name, rows, num_threads);
}

// An optional [N] output (null accepted): valid, N entries, disjoint from `read`.
template <typename T, typename R, int Rank>
void require_row_output(const char* function, const char* name, TensorView<T, 1> output, Index n,
                        const char* read_name, const TensorView<R, Rank>& read) {
  if (output.is_null()) return;
  detail::require_valid_view(function, name, output);
  detail::require_extent(function, name, output, 0, "x.shape[0] (N)", n);
  detail::require_disjoint(function, name, output, read_name, read);
}

template <typename T>
void vq_assign_checked(TensorView<const T, 2> x, TensorView<const T, 2> codebook,
                       TensorView<std::int64_t, 1> indices, TensorView<T, 1> sq_distances,
                       VqMetric metric, int num_threads) {
  constexpr const char* kFunction = "vq_assign";
  detail::require_valid_view(kFunction, "codebook", codebook);
  check(codebook.size(0) >= 1, kFunction, ": codebook.shape[0] (K) must be >= 1, got ",
        codebook.size(0));
  check(codebook.size(0) <= std::numeric_limits<detail::VqLaneIndex<T>>::max(), kFunction,
        ": codebook.shape[0] (K) must be <= ", std::numeric_limits<detail::VqLaneIndex<T>>::max(),
        ", got ", codebook.size(0));
  detail::require_unit_inner_stride(kFunction, "codebook", codebook);
  require_rows(kFunction, "x", x, codebook.size(1), "codebook.shape[1] (D)", num_threads);
  require_finite(kFunction, "codebook", codebook, num_threads);
  check(!indices.is_null(), kFunction, ": indices must be given");
  require_row_output(kFunction, "indices", indices, x.size(0), "x", x);
  detail::require_disjoint(kFunction, "indices", indices, "codebook", codebook);
  require_row_output(kFunction, "sq_distances", sq_distances, x.size(0), "x", x);
  detail::require_disjoint(kFunction, "sq_distances", sq_distances, "codebook", codebook);
  detail::require_disjoint(kFunction, "sq_distances", sq_distances, "indices", indices);
  assign_unchecked(x, codebook, indices, sq_distances, metric, num_threads);
}

void require_options(const char* function, const VqOptions& options) {
  check(options.metric == VqMetric::l2 || options.metric == VqMetric::cosine, function,
        ": options.metric must be l2 or cosine");
  check(options.decay > 0 && options.decay < 1, function, ": options.decay must be in (0, 1), got ",
        options.decay);
  check(std::isfinite(options.epsilon) && options.epsilon > 0, function,
        ": options.epsilon must be finite and > 0, got ", options.epsilon);
  detail::require_finite_nonnegative(function, "options.dead_threshold", options.dead_threshold,
                                     "the usage below which a code is dead");
}

// rows [N, D]: a contiguous copy, normalized row by row for cosine (zero rows stay zero).
Tensor<float, 2> metric_rows(TensorView<const float, 2> rows, VqMetric metric) {
  Tensor<float, 2> copy({rows.size(0), rows.size(1)});
  for (Index n = 0; n < rows.size(0); ++n) {
    double sq_norm = 0;
    for (Index d = 0; d < rows.size(1); ++d) sq_norm += double(rows(n, d)) * rows(n, d);
    const double factor =
        metric == VqMetric::cosine ? (sq_norm > 0 ? 1 / std::sqrt(sq_norm) : 0.0) : 1.0;
    for (Index d = 0; d < rows.size(1); ++d) copy(n, d) = static_cast<float>(rows(n, d) * factor);
  }
  return copy;
}

double sq_distance(const float* a, const float* b, Index dim) {
  double sum = 0;
  for (Index d = 0; d < dim; ++d) {
    const double difference = double(a[d]) - b[d];
    sum += difference * difference;
  }
  return sum;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Free functions.

void vq_assign(TensorView<const float, 2> x, TensorView<const float, 2> codebook,
               TensorView<std::int64_t, 1> indices, TensorView<float, 1> sq_distances,
               VqMetric metric, int num_threads) {
  vq_assign_checked(x, codebook, indices, sq_distances, metric, num_threads);
}

void vq_assign(TensorView<const double, 2> x, TensorView<const double, 2> codebook,
               TensorView<std::int64_t, 1> indices, TensorView<double, 1> sq_distances,
               VqMetric metric, int num_threads) {
  vq_assign_checked(x, codebook, indices, sq_distances, metric, num_threads);
}

double vq_perplexity(TensorView<const std::int64_t, 1> counts) {
  constexpr const char* kFunction = "vq_perplexity";
  detail::require_valid_view(kFunction, "counts", counts);
  if (counts.size(0) > 0 && counts.stride(0) == 0) {
    // One count seen K times (a broadcast view, K unbounded by memory): K equal uses.
    check(counts(0) >= 0, kFunction, ": counts[0] must be >= 0, got ", counts(0));
    return counts(0) == 0 ? 0.0 : static_cast<double>(counts.size(0));
  }
  double total = 0;
  for (Index k = 0; k < counts.size(0); ++k) {
    check(counts(k) >= 0, kFunction, ": counts[", k, "] must be >= 0, got ", counts(k));
    total += static_cast<double>(counts(k));
  }
  if (total == 0) return 0;
  double entropy = 0;
  for (Index k = 0; k < counts.size(0); ++k) {
    if (counts(k) == 0) continue;
    const double p = static_cast<double>(counts(k)) / total;
    entropy -= p * std::log(p);
  }
  return std::exp(entropy);
}

// ---------------------------------------------------------------------------------------------
// VectorQuantizer.

VectorQuantizer::VectorQuantizer(Index num_codes, Index dim, const VqOptions& options)
    : options_(options) {
  constexpr const char* kFunction = "VectorQuantizer";
  check(num_codes >= 1, kFunction, ": num_codes (K) must be >= 1, got ", num_codes);
  check(dim >= 1, kFunction, ": dim (D) must be >= 1, got ", dim);
  require_options(kFunction, options);
  codebook_ = Tensor<float, 2>({num_codes, dim}, "VectorQuantizer codebook");
  reset_statistics(1.0);
}

VectorQuantizer::VectorQuantizer(TensorView<const float, 2> codebook, const VqOptions& options)
    : options_(options) {
  constexpr const char* kFunction = "VectorQuantizer";
  require_options(kFunction, options);
  detail::require_valid_view(kFunction, "codebook", codebook);
  check(codebook.size(0) >= 1, kFunction, ": codebook.shape[0] (K) must be >= 1, got ",
        codebook.size(0));
  check(codebook.size(1) >= 1, kFunction, ": codebook.shape[1] (D) must be >= 1, got ",
        codebook.size(1));
  codebook_ = Tensor<float, 2>({codebook.size(0), codebook.size(1)}, "VectorQuantizer codebook");
  set_codebook(codebook);
}

void VectorQuantizer::set_codebook(TensorView<const float, 2> codebook) {
  constexpr const char* kFunction = "VectorQuantizer::set_codebook";
  detail::require_valid_view(kFunction, "codebook", codebook);
  detail::require_extent(kFunction, "codebook", codebook, 0, "num_codes (K)", num_codes());
  detail::require_extent(kFunction, "codebook", codebook, 1, "dim (D)", dim());
  require_finite(kFunction, "codebook", codebook, 0);
  for (Index k = 0; k < num_codes(); ++k)
    for (Index d = 0; d < dim(); ++d) codebook_(k, d) = codebook(k, d);
  reset_statistics(1.0);
}

void VectorQuantizer::reset_statistics(double cluster_size) {
  cluster_size_ = Tensor<double, 1>({num_codes()}, "VectorQuantizer cluster sizes");
  code_sums_ = Tensor<double, 2>({num_codes(), dim()}, "VectorQuantizer code sums");
  for (Index k = 0; k < num_codes(); ++k) {
    cluster_size_(k) = cluster_size;
    for (Index d = 0; d < dim(); ++d) code_sums_(k, d) = cluster_size * codebook_(k, d);
  }
  reset_usage();
}

void VectorQuantizer::reset_usage() { usage_counts_ = Tensor<std::int64_t, 1>({num_codes()}); }

void VectorQuantizer::quantize(TensorView<const float, 2> x, TensorView<std::int64_t, 1> indices,
                               TensorView<float, 2> quantized, TensorView<float, 1> sq_distances,
                               int num_threads) const {
  constexpr const char* kFunction = "VectorQuantizer::quantize";
  require_rows(kFunction, "x", x, dim(), "dim (D)", num_threads);
  check(!indices.is_null(), kFunction, ": indices must be given");
  require_row_output(kFunction, "indices", indices, x.size(0), "x", x);
  require_row_output(kFunction, "sq_distances", sq_distances, x.size(0), "x", x);
  detail::require_disjoint(kFunction, "sq_distances", sq_distances, "indices", indices);
  if (!quantized.is_null()) {
    detail::require_valid_view(kFunction, "quantized", quantized);
    detail::require_extent(kFunction, "quantized", quantized, 0, "x.shape[0] (N)", x.size(0));
    detail::require_extent(kFunction, "quantized", quantized, 1, "dim (D)", dim());
    detail::require_disjoint(kFunction, "quantized", quantized, "x", x);
    detail::require_disjoint(kFunction, "quantized", quantized, "indices", indices);
    detail::require_disjoint(kFunction, "quantized", quantized, "sq_distances", sq_distances);
  }
  assign_unchecked(x, codebook(), indices, sq_distances, options_.metric, num_threads);
  if (quantized.is_null()) return;
  for (Index n = 0; n < x.size(0); ++n)
    for (Index d = 0; d < dim(); ++d) quantized(n, d) = codebook_(indices(n), d);
}

void VectorQuantizer::init_kmeans(TensorView<const float, 2> x, Index lloyd_iterations,
                                  std::uint64_t seed, int num_threads) {
  constexpr const char* kFunction = "VectorQuantizer::init_kmeans";
  require_rows(kFunction, "x", x, dim(), "dim (D)", num_threads);
  check(x.size(0) >= 1, kFunction, ": x.shape[0] (N) must be >= 1, got ", x.size(0));
  check(lloyd_iterations >= 0, kFunction, ": lloyd_iterations must be >= 0, got ",
        lloyd_iterations);
  // An interrupted call (detail::check_interrupt throws) restores the codebook it changed; the
  // statistics are reset only once the codebook is final.
  Tensor<float, 2> saved({num_codes(), dim()}, "VectorQuantizer codebook");
  std::copy(codebook_.data(), codebook_.data() + codebook_.numel(), saved.data());
  try {
    kmeans_codebook(x, lloyd_iterations, seed, num_threads);
  } catch (...) {
    codebook_ = std::move(saved);
    throw;
  }
  reset_statistics(1.0);
}

void VectorQuantizer::kmeans_codebook(TensorView<const float, 2> x, Index lloyd_iterations,
                                      std::uint64_t seed, int num_threads) {
  const Tensor<float, 2> rows = metric_rows(x, options_.metric);
  const Index n_rows = rows.size(0);
  std::mt19937_64 generator(seed);
  // k-means++: each next code is a row drawn with probability proportional to its squared
  // distance to the nearest code so far (uniformly once every row sits on a code).
  std::vector<double> nearest(static_cast<std::size_t>(n_rows),
                              std::numeric_limits<double>::infinity());
  constexpr Index kRowsPerTask = 256;
  const Index tasks = (n_rows + kRowsPerTask - 1) / kRowsPerTask;
  Index chosen = std::uniform_int_distribution<Index>(0, n_rows - 1)(generator);
  for (Index k = 0; k < num_codes(); ++k) {
    detail::check_interrupt();
    if (k > 0) {
      const double total = std::accumulate(nearest.begin(), nearest.end(), 0.0);
      if (total > 0) {
        const double target = std::uniform_real_distribution<double>(0, total)(generator);
        double cumulative = 0;
        chosen = n_rows - 1;
        for (Index n = 0; n < n_rows; ++n) {
          cumulative += nearest[static_cast<std::size_t>(n)];
          if (cumulative > target && nearest[static_cast<std::size_t>(n)] > 0) {
            chosen = n;
            break;
          }
        }
      } else {
        chosen = std::uniform_int_distribution<Index>(0, n_rows - 1)(generator);
      }
    }
    std::memcpy(&codebook_(k, 0), &rows(chosen, 0), sizeof(float) * static_cast<size_t>(dim()));
    parallel_for(tasks, detail::resolve_num_threads(num_threads), [&](Index task) {
      for (Index n = task * kRowsPerTask; n < std::min(n_rows, (task + 1) * kRowsPerTask); ++n) {
        double& distance = nearest[static_cast<std::size_t>(n)];
        distance = std::min(distance, sq_distance(&rows(n, 0), &codebook_(k, 0), dim()));
      }
    });
  }
  // Lloyd: every code moves to the mean of the rows assigned to it.
  // Stops early once an assignment repeats the previous one: the codes are already the means
  // of their rows, so every further step would give the same bits.
  Tensor<std::int64_t, 1> assignment({n_rows}, "VectorQuantizer k-means assignment");
  Tensor<std::int64_t, 1> previous({n_rows}, "VectorQuantizer k-means assignment");
  for (Index iteration = 0; iteration < lloyd_iterations; ++iteration) {
    detail::check_interrupt();
    assign_unchecked(rows.view(), codebook(), assignment.view(), {}, options_.metric, num_threads);
    if (iteration > 0 && std::equal(assignment.data(), assignment.data() + n_rows, previous.data()))
      break;
    std::swap(assignment, previous);
    const Tensor<std::int64_t, 1>& current = previous;
    std::vector<double> sums(static_cast<std::size_t>(num_codes() * dim()), 0.0);
    std::vector<Index> counts(static_cast<std::size_t>(num_codes()), 0);
    for (Index n = 0; n < n_rows; ++n) {
      const Index code = current(n);
      ++counts[static_cast<std::size_t>(code)];
      for (Index d = 0; d < dim(); ++d) sums[code * dim() + d] += rows(n, d);
    }
    for (Index k = 0; k < num_codes(); ++k) {
      const Index count = counts[static_cast<std::size_t>(k)];
      if (count == 0) continue;
      double sq_norm = 0;
      for (Index d = 0; d < dim(); ++d) {
        const double mean = sums[k * dim() + d] / static_cast<double>(count);
        sums[k * dim() + d] = mean;
        sq_norm += mean * mean;
      }
      const double factor =
          options_.metric == VqMetric::cosine && sq_norm > 0 ? 1 / std::sqrt(sq_norm) : 1.0;
      for (Index d = 0; d < dim(); ++d)
        codebook_(k, d) = static_cast<float>(sums[k * dim() + d] * factor);
    }
  }
}

void VectorQuantizer::update(TensorView<const float, 2> x, TensorView<std::int64_t, 1> indices,
                             bool update_codebook, int num_threads) {
  constexpr const char* kFunction = "VectorQuantizer::update";
  require_rows(kFunction, "x", x, dim(), "dim (D)", num_threads);
  require_row_output(kFunction, "indices", indices, x.size(0), "x", x);
  Tensor<std::int64_t, 1> own_indices;
  if (indices.is_null()) {
    own_indices = Tensor<std::int64_t, 1>({x.size(0)});
    indices = own_indices.view();
  }
  assign_unchecked(x, codebook(), indices, {}, options_.metric, num_threads);
  std::vector<double> batch_counts(static_cast<std::size_t>(num_codes()), 0.0);
  std::vector<double> batch_sums(static_cast<std::size_t>(num_codes() * dim()), 0.0);
  for (Index n = 0; n < x.size(0); ++n) {
    const Index code = indices(n);
    batch_counts[static_cast<std::size_t>(code)] += 1;
    ++usage_counts_(code);
    for (Index d = 0; d < dim(); ++d) batch_sums[code * dim() + d] += x(n, d);
  }
  const double decay = options_.decay;
  double total = 0;
  for (Index k = 0; k < num_codes(); ++k) {
    cluster_size_(k) = decay * cluster_size_(k) + (1 - decay) * batch_counts[k];
    for (Index d = 0; d < dim(); ++d)
      code_sums_(k, d) = decay * code_sums_(k, d) + (1 - decay) * batch_sums[k * dim() + d];
    total += cluster_size_(k);
  }
  if (!update_codebook || !(total > 0)) return;
  const double epsilon = options_.epsilon;
  const double smoothing = total / (total + static_cast<double>(num_codes()) * epsilon);
  for (Index k = 0; k < num_codes(); ++k) {
    const double smoothed_size = (cluster_size_(k) + epsilon) * smoothing;
    for (Index d = 0; d < dim(); ++d)
      codebook_(k, d) = static_cast<float>(code_sums_(k, d) / smoothed_size);
  }
}

Index VectorQuantizer::restart_dead_codes(TensorView<const float, 2> x, std::uint64_t seed) {
  constexpr const char* kFunction = "VectorQuantizer::restart_dead_codes";
  require_rows(kFunction, "x", x, dim(), "dim (D)", 0);
  check(x.size(0) >= 1, kFunction, ": x.shape[0] (N) must be >= 1, got ", x.size(0));
  std::mt19937_64 generator(seed);
  // A partial Fisher-Yates shuffle draws distinct rows; it starts over once they run out.
  std::vector<Index> order(static_cast<std::size_t>(x.size(0)));
  std::iota(order.begin(), order.end(), Index(0));
  Index drawn = 0;
  Index replaced = 0;
  const double restarted_size = std::max(1.0, options_.dead_threshold);
  for (Index k = 0; k < num_codes(); ++k) {
    if (!(cluster_size_(k) < options_.dead_threshold)) continue;
    if (drawn == x.size(0)) drawn = 0;
    const Index pick = std::uniform_int_distribution<Index>(drawn, x.size(0) - 1)(generator);
    std::swap(order[static_cast<std::size_t>(drawn)], order[static_cast<std::size_t>(pick)]);
    const Index row = order[static_cast<std::size_t>(drawn++)];
    cluster_size_(k) = restarted_size;
    for (Index d = 0; d < dim(); ++d) {
      codebook_(k, d) = x(row, d);
      code_sums_(k, d) = restarted_size * x(row, d);
    }
    ++replaced;
  }
  return replaced;
}

double VectorQuantizer::perplexity() const { return vq_perplexity(usage_counts()); }

Index VectorQuantizer::num_dead_codes() const {
  Index dead = 0;
  for (Index k = 0; k < num_codes(); ++k) dead += cluster_size_(k) < options_.dead_threshold;
  return dead;
}

double VectorQuantizer::codebook_effective_rank() const { return effective_rank(codebook()); }

// ---------------------------------------------------------------------------------------------
// ResidualVQ.

namespace {

// residual [N, D] -= codebook[indices[n]] row by row.
void subtract_codes(TensorView<const float, 2> codebook, TensorView<const std::int64_t, 1> indices,
                    Tensor<float, 2>& residual) {
  for (Index n = 0; n < residual.size(0); ++n)
    for (Index d = 0; d < residual.size(1); ++d) residual(n, d) -= codebook(indices(n), d);
}

// A contiguous copy of rows [N, D].
Tensor<float, 2> copy_rows(TensorView<const float, 2> rows) {
  return metric_rows(rows, VqMetric::l2);
}

// Column s of codes [N, S] as an [N] view.
template <typename T>
TensorView<T, 1> column(TensorView<T, 2> codes, Index s) {
  return TensorView<T, 1>(codes.address(0, s), {codes.size(0)}, {codes.stride(0)});
}

}  // namespace

ResidualVQ::ResidualVQ(Index num_stages, Index num_codes, Index dim, const VqOptions& options)
    : dim_(dim) {
  check(num_stages >= 1, "ResidualVQ: num_stages (S) must be >= 1, got ", num_stages);
  for (Index s = 0; s < num_stages; ++s) stages_.emplace_back(num_codes, dim, options);
}

void ResidualVQ::encode(TensorView<const float, 2> x, TensorView<std::int64_t, 2> codes,
                        TensorView<float, 2> quantized, int num_threads) const {
  constexpr const char* kFunction = "ResidualVQ::encode";
  require_rows(kFunction, "x", x, dim_, "dim (D)", num_threads);
  detail::require_valid_view(kFunction, "codes", codes);
  detail::require_extent(kFunction, "codes", codes, 0, "x.shape[0] (N)", x.size(0));
  detail::require_extent(kFunction, "codes", codes, 1, "num_stages (S)", num_stages());
  detail::require_disjoint(kFunction, "codes", codes, "x", x);
  if (!quantized.is_null()) {
    detail::require_valid_view(kFunction, "quantized", quantized);
    detail::require_extent(kFunction, "quantized", quantized, 0, "x.shape[0] (N)", x.size(0));
    detail::require_extent(kFunction, "quantized", quantized, 1, "dim (D)", dim_);
    detail::require_disjoint(kFunction, "quantized", quantized, "x", x);
    detail::require_disjoint(kFunction, "quantized", quantized, "codes", codes);
  }
  Tensor<float, 2> residual = copy_rows(x);
  for (Index s = 0; s < num_stages(); ++s) {
    const TensorView<std::int64_t, 1> stage_codes = column(codes, s);
    assign_unchecked(TensorView<const float, 2>(residual.view()), stage(s).codebook(), stage_codes,
                     {}, stage(s).options().metric, num_threads);
    subtract_codes(stage(s).codebook(), stage_codes, residual);
  }
  if (!quantized.is_null()) decode(codes, quantized);
}

void ResidualVQ::decode(TensorView<const std::int64_t, 2> codes, TensorView<float, 2> out) const {
  constexpr const char* kFunction = "ResidualVQ::decode";
  detail::require_valid_view(kFunction, "codes", codes);
  detail::require_extent(kFunction, "codes", codes, 1, "num_stages (S)", num_stages());
  detail::require_valid_view(kFunction, "out", out);
  detail::require_extent(kFunction, "out", out, 0, "codes.shape[0] (N)", codes.size(0));
  detail::require_extent(kFunction, "out", out, 1, "dim (D)", dim_);
  detail::require_disjoint(kFunction, "out", out, "codes", codes);
  for (Index n = 0; n < codes.size(0); ++n)
    for (Index s = 0; s < num_stages(); ++s)
      check(codes(n, s) >= 0 && codes(n, s) < stage(s).num_codes(), kFunction, ": codes[", n, ", ",
            s, "] must be in [0, ", stage(s).num_codes(), "), got ", codes(n, s));
  for (Index n = 0; n < codes.size(0); ++n)
    for (Index d = 0; d < dim_; ++d) {
      float sum = 0;
      for (Index s = 0; s < num_stages(); ++s) sum += stage(s).codebook()(codes(n, s), d);
      out(n, d) = sum;
    }
}

void ResidualVQ::init_kmeans(TensorView<const float, 2> x, Index lloyd_iterations,
                             std::uint64_t seed, int num_threads) {
  constexpr const char* kFunction = "ResidualVQ::init_kmeans";
  require_rows(kFunction, "x", x, dim_, "dim (D)", num_threads);
  check(x.size(0) >= 1, kFunction, ": x.shape[0] (N) must be >= 1, got ", x.size(0));
  check(lloyd_iterations >= 0, kFunction, ": lloyd_iterations must be >= 0, got ",
        lloyd_iterations);
  Tensor<float, 2> residual = copy_rows(x);
  Tensor<std::int64_t, 1> stage_codes({x.size(0)});
  // New stages replace the old ones only once all are trained (an interrupt changes nothing).
  std::vector<VectorQuantizer> trained;
  trained.reserve(stages_.size());
  for (Index s = 0; s < num_stages(); ++s) {
    VectorQuantizer& fresh = trained.emplace_back(stage(s).codebook(), stage(s).options());
    fresh.init_kmeans(residual.view(), lloyd_iterations, seed + static_cast<std::uint64_t>(s),
                      num_threads);
    fresh.quantize(residual.view(), stage_codes.view(), {}, {}, num_threads);
    subtract_codes(fresh.codebook(), stage_codes.view(), residual);
  }
  stages_.swap(trained);
}

void ResidualVQ::update(TensorView<const float, 2> x, bool update_codebook, int num_threads) {
  constexpr const char* kFunction = "ResidualVQ::update";
  require_rows(kFunction, "x", x, dim_, "dim (D)", num_threads);
  Tensor<float, 2> residual = copy_rows(x);
  Tensor<std::int64_t, 1> stage_codes({x.size(0)});
  for (Index s = 0; s < num_stages(); ++s) {
    const Tensor<float, 2> codebook_before = copy_rows(stage(s).codebook());
    stage(s).update(residual.view(), stage_codes.view(), update_codebook, num_threads);
    subtract_codes(codebook_before.view(), stage_codes.view(), residual);
  }
}

}  // namespace foveal
