// Google Benchmark for decode_attention and the machine's memory bandwidth.
//
// BM_Decode reads K and V once per step: GB/s = the cache bytes of K and V / time, for float,
// bfloat16 and 8-bit (q8_block) caches.
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
#include <type_traits>

#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

void fill_random(float* data, Index count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (Index i = 0; i < count; ++i) data[i] = normal(rng);
}

// Args: Lk, threads. B = 1, Hq = 32, Hkv = 8, D = 128, one query (the decode shape).
// KV: the cache's element type (float, bfloat16, or q8_block: an 8-bit cache of 36 bytes per 32
// values); q and out are float for float and 8-bit caches, the cache's type otherwise.
template <typename KV>
void BM_Decode(benchmark::State& state) {
  using Q = std::conditional_t<std::is_same_v<KV, foveal::q8_block>, float, KV>;
  const Index batch = 1, heads_q = 32, heads_kv = 8, dim = 128, len_k = state.range(0);
  foveal::KVCache<KV> cache(batch, heads_kv, len_k, dim, dim);
  {
    foveal::Tensor<float, 4> k({batch, heads_kv, len_k, dim}), v({batch, heads_kv, len_k, dim});
    fill_random(k.data(), k.numel(), 1);
    fill_random(v.data(), v.numel(), 2);
    foveal::Tensor<Q, 4> k_in({batch, heads_kv, len_k, dim}), v_in({batch, heads_kv, len_k, dim});
    for (Index i = 0; i < k.numel(); ++i) {
      k_in.data()[i] = foveal::to_storage<Q>(k.data()[i]);
      v_in.data()[i] = foveal::to_storage<Q>(v.data()[i]);
    }
    cache.append(k_in, v_in);
  }
  foveal::Tensor<Q, 4> q({batch, heads_q, 1, dim}), out({batch, heads_q, 1, dim});
  {
    foveal::Tensor<float, 4> q_values({batch, heads_q, 1, dim});
    fill_random(q_values.data(), q_values.numel(), 3);
    for (Index i = 0; i < q.numel(); ++i) q.data()[i] = foveal::to_storage<Q>(q_values.data()[i]);
  }
  foveal::AttentionOptions options;
  options.num_threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    foveal::decode_attention(q, cache, options, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  // Bytes of cache read per step: the stored rows of K and V.
  const double bytes = 2.0 * batch * heads_kv * len_k * static_cast<double>(sizeof(KV)) *
                       static_cast<double>(foveal::detail::stored_width<KV>(dim));
  state.counters["GB/s"] =
      benchmark::Counter(bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_TEMPLATE(BM_Decode, float)
    ->ArgNames({"Lk", "threads"})
    ->ArgsProduct({{4096, 32768, 131072}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_Decode, foveal::bfloat16)
    ->ArgNames({"Lk", "threads"})
    ->ArgsProduct({{4096, 32768, 131072}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_Decode, foveal::q8_block)
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
