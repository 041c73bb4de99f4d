// Google Benchmark for VQ assign (docs/vq.md), on the case of compare_torch.py --suite vq:
// fp32, N = 65536 rows, D = 64, K in {512, 1024, 4096}, L2 and cosine, 1 and 2 threads.
// Counter: flops/s of the x·cᵀ products, 2·N·K·D per call (printed as e.g. flops=150G/s).
//
//   build/bench/bench/bench_vq
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>

#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

constexpr Index kRows = 65536, kDim = 64;

foveal::Tensor<float, 2> normal_matrix(Index rows, Index cols, unsigned seed) {
  foveal::Tensor<float, 2> matrix({rows, cols});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) matrix(i, j) = normal(rng);
  return matrix;
}

// Args: K, threads, cosine.
void BM_VqAssign(benchmark::State& state) {
  const Index codes = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  const auto metric = state.range(2) != 0 ? foveal::VqMetric::cosine : foveal::VqMetric::l2;
  const foveal::Tensor<float, 2> x = normal_matrix(kRows, kDim, 1);
  const foveal::Tensor<float, 2> codebook = normal_matrix(codes, kDim, 2);
  foveal::Tensor<std::int64_t, 1> indices({kRows});
  foveal::Tensor<float, 1> sq_distances({kRows});
  for (auto _ : state) {
    foveal::vq_assign(x.view(), codebook.view(), indices.view(), sq_distances.view(), metric,
                      threads);
    benchmark::DoNotOptimize(indices.data());
  }
  const double flops = 2.0 * kRows * codes * kDim;  // shown as flops=...G/s
  state.counters["flops"] =
      benchmark::Counter(flops, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_VqAssign)
    ->ArgNames({"K", "threads", "cosine"})
    ->ArgsProduct({{512, 1024, 4096}, {1, 2}, {0, 1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
