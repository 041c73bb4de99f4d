// foveal/embedding/vq.hpp — vector quantization (OPERATORS.md §7): nearest-code assignment by
// register tiles with a running argmin, the VectorQuantizer with its codebook-collapse
// diagnostics and fixes (k-means++ and Lloyd init, EMA updates with Laplace smoothing, dead-code
// restart), and the ResidualVQ that stacks quantizers on residuals.
#pragma once

#include <cstdint>
#include <vector>

#include "foveal/core/tensor.hpp"

namespace foveal {

// l2: nearest code by ‖x − c‖²; cosine: by ‖x̂ − ĉ‖² = 2 − 2 cos(x, c), both sides normalized
// (a zero vector stays zero).
enum class VqMetric { l2, cosine };

// x: [N, D]  codebook: [K, D]  ->  indices: [N]  sq_distances: [N] (may be null)
// indices[n] = argmin_k ‖x_n − c_k‖² (cosine: of the normalized vectors), ties to the lowest k;
// sq_distances[n] that distance, clamped at 0. Computed as ‖c_k‖² − 2 x_n·c_k by register tiles
// with a running argmin per row: no [N, K] buffer, extra memory O(threads · tile + K). Inputs
// must be finite with unit inner stride; K >= 1. Results are bitwise identical for any thread
// count.
void vq_assign(TensorView<const float, 2> x, TensorView<const float, 2> codebook,
               TensorView<std::int64_t, 1> indices, TensorView<float, 1> sq_distances = {},
               VqMetric metric = VqMetric::l2, int num_threads = 0);
void vq_assign(TensorView<const double, 2> x, TensorView<const double, 2> codebook,
               TensorView<std::int64_t, 1> indices, TensorView<double, 1> sq_distances = {},
               VqMetric metric = VqMetric::l2, int num_threads = 0);

// counts: [K]  ->  exp(−Σ p_k log p_k) with p = counts / Σ counts: the number of equally used
// codes that would give the same entropy (1 when one code takes everything, K when all are
// used equally); 0 when every count is 0. Counts must be >= 0.
double vq_perplexity(TensorView<const std::int64_t, 1> counts);

// matrix: [M, D]  ->  exp(H(σ / Σσ)) over its singular values σ (Eigen's SVD, float64): how
// many directions the rows really span (the embedding-collapse diagnostic); 0 for a zero
// matrix. Entries must be finite.
double effective_rank(TensorView<const float, 2> matrix);

struct VqOptions {
  VqMetric metric = VqMetric::l2;
  double decay = 0.99;           // EMA γ, in (0, 1)
  double epsilon = 1e-5;         // Laplace smoothing ε, > 0
  double dead_threshold = 1e-3;  // a code whose usage EMA N_k is below this is dead, >= 0
};

// A codebook [K, D] with the statistics of its use. update() assigns a batch, counts the codes
// it used and applies the EMA update; the diagnostics read those statistics. Every method
// validates its input before changing any state.
class VectorQuantizer {
 public:
  // A zero codebook of K codes of dimension D (set it, or initialize it from data).
  VectorQuantizer(Index num_codes, Index dim, const VqOptions& options = {});
  // codebook: [K, D], copied.
  explicit VectorQuantizer(TensorView<const float, 2> codebook, const VqOptions& options = {});

  Index num_codes() const { return codebook_.size(0); }
  Index dim() const { return codebook_.size(1); }
  const VqOptions& options() const { return options_; }
  TensorView<const float, 2> codebook() const { return codebook_.view(); }

  // codebook: [K, D]  ->  replaces the codes; the EMA sums restart from them (m_k = N_k c_k).
  void set_codebook(TensorView<const float, 2> codebook);

  // x: [N, D]  ->  indices: [N]  quantized: [N, D] (may be null: c_{indices[n]})
  // sq_distances: [N] (may be null). Changes no state.
  void quantize(TensorView<const float, 2> x, TensorView<std::int64_t, 1> indices,
                TensorView<float, 2> quantized = {}, TensorView<float, 1> sq_distances = {},
                int num_threads = 0) const;

  // x: [N, D], N >= 1  ->  codebook: k-means++ seeding (D² sampling from a generator seeded with
  // `seed`), then `lloyd_iterations` Lloyd steps (a code left without rows keeps its place; for
  // cosine the means are normalized). The Lloyd steps stop early once the assignment of the
  // rows no longer changes (the codes are then the means of their rows: more steps would change
  // nothing), so a huge lloyd_iterations is merely an upper bound. Between steps it calls the
  // interrupt check (set_interrupt_check); an interrupted call leaves the quantizer unchanged.
  // Resets the statistics, N_k = 1 for every code.
  void init_kmeans(TensorView<const float, 2> x, Index lloyd_iterations, std::uint64_t seed,
                   int num_threads = 0);

  // x: [N, D]  ->  indices: [N] (may be null): assigns the batch, adds its counts n_k to the
  // usage counts, and updates N_k ← γN_k + (1−γ)n_k, m_k ← γm_k + (1−γ)Σ_{idx=k} x and, when
  // `update_codebook`, c_k = m_k / N̂_k with N̂_k = (N_k + ε) / (ΣN + Kε) · ΣN.
  void update(TensorView<const float, 2> x, TensorView<std::int64_t, 1> indices = {},
              bool update_codebook = true, int num_threads = 0);

  // x: [N, D], N >= 1  ->  replaces every dead code (N_k < dead_threshold) by a row of x drawn
  // uniformly (distinct rows while there are enough) with a generator seeded with `seed`, and
  // sets its N_k = max(1, dead_threshold), m_k = N_k c_k. Returns the number replaced.
  Index restart_dead_codes(TensorView<const float, 2> x, std::uint64_t seed);

  // Per-code number of rows assigned by update() since construction or reset_usage(): [K].
  TensorView<const std::int64_t, 1> usage_counts() const { return usage_counts_.view(); }
  // The usage EMA N_k: [K].
  TensorView<const double, 1> cluster_size() const { return cluster_size_.view(); }
  void reset_usage();

  // vq_perplexity of the usage counts.
  double perplexity() const;
  // The number of codes with N_k < dead_threshold.
  Index num_dead_codes() const;
  // effective_rank of the codebook.
  double codebook_effective_rank() const;

 private:
  void reset_statistics(double cluster_size);
  // init_kmeans' work on the codebook (the caller restores it if this throws).
  void kmeans_codebook(TensorView<const float, 2> x, Index lloyd_iterations, std::uint64_t seed,
                       int num_threads);

  VqOptions options_;
  Tensor<float, 2> codebook_;
  Tensor<double, 1> cluster_size_;  // N_k
  Tensor<double, 2> code_sums_;     // m_k
  Tensor<std::int64_t, 1> usage_counts_;
};

// S VectorQuantizers, stage s quantizing the residual x − Σ_{t<s} ĉ_t that the earlier stages
// left: codes [N, S], the multi-codebook tokens of audio codecs.
class ResidualVQ {
 public:
  // S stages of K codes of dimension D, each with `options`.
  ResidualVQ(Index num_stages, Index num_codes, Index dim, const VqOptions& options = {});

  Index num_stages() const { return static_cast<Index>(stages_.size()); }
  Index dim() const { return dim_; }
  VectorQuantizer& stage(Index s) { return stages_[static_cast<std::size_t>(s)]; }
  const VectorQuantizer& stage(Index s) const { return stages_[static_cast<std::size_t>(s)]; }

  // x: [N, D]  ->  codes: [N, S]  quantized: [N, D] (may be null: the sum of the chosen codes).
  void encode(TensorView<const float, 2> x, TensorView<std::int64_t, 2> codes,
              TensorView<float, 2> quantized = {}, int num_threads = 0) const;

  // codes: [N, S], each in [0, K_s)  ->  out: [N, D] = Σ_s c_{s, codes[n, s]}.
  void decode(TensorView<const std::int64_t, 2> codes, TensorView<float, 2> out) const;

  // x: [N, D]  ->  each stage in turn init_kmeans on the residual of the stages before it
  // (stage s seeded with seed + s). Stops early and checks for interrupts as
  // VectorQuantizer::init_kmeans does; an interrupted call leaves every stage unchanged.
  void init_kmeans(TensorView<const float, 2> x, Index lloyd_iterations, std::uint64_t seed,
                   int num_threads = 0);

  // x: [N, D]  ->  each stage in turn update()s on its residual (computed with the codebook as
  // it was before that stage's update).
  void update(TensorView<const float, 2> x, bool update_codebook = true, int num_threads = 0);

 private:
  Index dim_ = 0;
  std::vector<VectorQuantizer> stages_;
};

}  // namespace foveal
