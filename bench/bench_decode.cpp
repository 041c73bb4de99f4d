// Google Benchmark for decode_attention and the machine's memory bandwidth.
//
// BM_Decode reads K and V once per step: GB/s = 2 * B * Hkv * Lk * D * sizeof(float) / time.
// BM_Copy copies a buffer far larger than the caches with OpenMP threads; its GB/s counts
// bytes read plus bytes written (the STREAM convention), the yardstick decode is held to.
// BM_SlidingWindow reports GFLOP/s of the visible (query, key) pairs and ns per query row, flat
// in L when the cost is O(L * W).
//
//   build/bench/bench/bench_decode --benchmark_filter='Decode|Copy'
#include <benchmark/benchmark.h>
#include <omp.h>

#include <cstring>
#include <random>

#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

void fill_random(float* data, Index count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (Index i = 0; i < count; ++i) data[i] = normal(rng);
}

// Args: Lk, threads. B = 1, Hq = 32, Hkv = 8, D = 128, one query (the decode shape).
void BM_Decode(benchmark::State& state) {
  const Index batch = 1, heads_q = 32, heads_kv = 8, dim = 128, len_k = state.range(0);
  foveal::KVCache<float> cache(batch, heads_kv, len_k, dim, dim);
  {
    foveal::Tensor<float, 4> k({batch, heads_kv, len_k, dim}), v({batch, heads_kv, len_k, dim});
    fill_random(k.data(), k.numel(), 1);
    fill_random(v.data(), v.numel(), 2);
    cache.append(k, v);
  }
  foveal::Tensor<float, 4> q({batch, heads_q, 1, dim}), out({batch, heads_q, 1, dim});
  fill_random(q.data(), q.numel(), 3);
  foveal::AttentionOptions options;
  options.num_threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    foveal::decode_attention(q, cache, options, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double bytes = 2.0 * batch * heads_kv * len_k * dim * sizeof(float);
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Decode)
    ->ArgNames({"Lk", "threads"})
    ->ArgsProduct({{4096, 32768, 131072}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: MiB per buffer, threads.
void BM_Copy(benchmark::State& state) {
  const auto count = static_cast<std::size_t>(state.range(0)) * (1 << 20) / sizeof(float);
  const int threads = static_cast<int>(state.range(1));
  auto source = foveal::detail::allocate_aligned<float>(count);
  auto target = foveal::detail::allocate_aligned<float>(count);
  std::memset(source.get(), 1, count * sizeof(float));
  std::memset(target.get(), 0, count * sizeof(float));
  for (auto _ : state) {
#pragma omp parallel num_threads(threads)
    {
      const std::size_t part = (count + threads - 1) / threads;
      const std::size_t begin =
          std::min(count, part * static_cast<std::size_t>(omp_get_thread_num()));
      const std::size_t end = std::min(count, begin + part);
      std::memcpy(target.get() + begin, source.get() + begin, (end - begin) * sizeof(float));
    }
    benchmark::DoNotOptimize(target.get());
    benchmark::ClobberMemory();
  }
  state.counters["GB/s"] = benchmark::Counter(2.0 * count * sizeof(float) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Copy)
    ->ArgNames({"MiB", "threads"})
    ->ArgsProduct({{1024}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: L, threads. B = 1, H = 16, D = 64, causal window of 256 keys.
void BM_SlidingWindow(benchmark::State& state) {
  const Index heads = 16, dim = 64, window = 256, len = state.range(0);
  foveal::Tensor<float, 4> q({1, heads, len, dim}), k({1, heads, len, dim}),
      v({1, heads, len, dim}), out({1, heads, len, dim});
  fill_random(q.data(), q.numel(), 1);
  fill_random(k.data(), k.numel(), 2);
  fill_random(v.data(), v.numel(), 3);
  foveal::AttentionOptions options;
  options.causal = true;
  options.window_left = window;
  options.num_threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    foveal::sliding_window_attention(q, k, v, out, options);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // Visible pairs: query i sees min(i, W) + 1 keys.
  double pairs = 0;
  for (Index i = 0; i < len; ++i) pairs += static_cast<double>(std::min(i, window) + 1);
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * heads * pairs * dim * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ns/row"] = benchmark::Counter(
      static_cast<double>(heads * len) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}
BENCHMARK(BM_SlidingWindow)
    ->ArgNames({"L", "threads"})
    ->ArgsProduct({{4096, 8192, 16384, 32768}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
