// Google Benchmark for foveal::attention. Counters: GFLOP/s (4 * B * Hq * Lq * Lk * D multiply-adds
// counted as two flops each; causal counts only the visible half), and for the memory case the
// growth of the peak resident set while attention runs.
//
//   build/bench/bench/bench_attention --benchmark_filter=Dense
#include <benchmark/benchmark.h>
#include <sys/resource.h>

#include <random>

#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

foveal::Tensor<float, 4> random_tensor(Index b, Index h, Index l, Index d, unsigned seed) {
  foveal::Tensor<float, 4> tensor({b, h, l, d});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (Index i = 0; i < tensor.numel(); ++i) tensor.data()[i] = normal(rng);
  return tensor;
}

// Multiply-add flops of one forward pass (QK^T and PV), only visible pairs when causal.
double attention_flops(Index batch, Index heads, Index len, Index dim, bool causal) {
  const double pairs =
      causal ? 0.5 * static_cast<double>(len) * (len + 1) : static_cast<double>(len) * len;
  return 4.0 * batch * heads * pairs * dim;
}

// Args: L, D, causal, threads. B = 1, H = 16 as in the comparison with PyTorch.
void BM_Dense(benchmark::State& state) {
  const Index batch = 1, heads = 16, len = state.range(0), dim = state.range(1);
  const bool causal = state.range(2) != 0;
  auto q = random_tensor(batch, heads, len, dim, 1);
  auto k = random_tensor(batch, heads, len, dim, 2);
  auto v = random_tensor(batch, heads, len, dim, 3);
  foveal::Tensor<float, 4> out({batch, heads, len, dim});
  foveal::AttentionOptions options;
  options.causal = causal;
  options.num_threads = static_cast<int>(state.range(3));
  for (auto _ : state) {
    foveal::attention(q, k, v, out, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(attention_flops(batch, heads, len, dim, causal) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Dense)
    ->ArgNames({"L", "D", "causal", "threads"})
    ->ArgsProduct({{1024, 4096}, {64, 128}, {0, 1}, {1}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

long peak_rss_kib() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_maxrss;
}

// Peak extra memory of one forward pass at L = 32768 (B = 1, H = 1, D = 64): the growth of the
// peak resident set, in bytes, after inputs and output are allocated and touched.
void BM_PeakMemory(benchmark::State& state) {
  const Index len = state.range(0), dim = 64;
  auto q = random_tensor(1, 1, len, dim, 1);
  auto k = random_tensor(1, 1, len, dim, 2);
  auto v = random_tensor(1, 1, len, dim, 3);
  foveal::Tensor<float, 4> out({1, 1, len, dim});
  foveal::AttentionOptions options;
  options.causal = true;
  const long before = peak_rss_kib();
  for (auto _ : state) foveal::attention(q, k, v, out, options);
  state.counters["extra_peak_bytes"] = static_cast<double>(peak_rss_kib() - before) * 1024.0;
  state.counters["scores_matrix_bytes"] = static_cast<double>(len) * len * sizeof(float);
}
BENCHMARK(BM_PeakMemory)->Arg(32768)->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
