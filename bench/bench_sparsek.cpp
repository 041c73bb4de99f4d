// Google Benchmark for SparseK attention (fp32 and bf16, B = 1, H = 16, D = 64, causal,
// topk = 256).
//
// BM_SparseK<float>, BM_SparseK<foveal::bfloat16>: the whole call (the second on bfloat16
//   copies of the same inputs). GFLOP/s counts the visible (query, key) pairs, 4 D flops each
//   (q·k and p·v), i.e. the work an ideal kernel does: Lq * min(topk + window + 1, ...) pairs.
// BM_SparseKSelection: the selection phase alone (thresholds, top-k, tile unions), the part the
//   issue asks to report separately.
// BM_DenseCausal: foveal's own dense causal attention on the same tensors, for the ratio.
// BM_SparseKTraining / BM_DenseCausalTraining: a training step's attention, forward (with lse)
//   then backward (SparseK: grad_q, grad_k, grad_v and grad_u, gate value), on the same tensors.
//
//   build/bench/bench/bench_sparsek --benchmark_filter='L:16384'
#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "detail/sparsek_selection.hpp"
#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

constexpr Index kHeads = 16, kDim = 64, kTopK = 256;

void fill_random(float* data, Index count, unsigned seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  for (Index i = 0; i < count; ++i) data[i] = normal(rng);
}

struct Inputs {
  foveal::Tensor<float, 4> q, k, v, out;
  foveal::Tensor<float, 3> u;
  explicit Inputs(Index len)
      : q({1, kHeads, len, kDim}),
        k({1, kHeads, len, kDim}),
        v({1, kHeads, len, kDim}),
        out({1, kHeads, len, kDim}),
        u({1, kHeads, len}) {
    fill_random(q.data(), q.numel(), 1);
    fill_random(k.data(), k.numel(), 2);
    fill_random(v.data(), v.numel(), 3);
    fill_random(u.data(), u.numel(), 4);
  }
};

// What a training step adds: lse, the incoming gradient and the gradients.
struct TrainingTensors {
  foveal::Tensor<float, 3> lse;
  foveal::Tensor<float, 4> grad_out, grad_q, grad_k, grad_v;
  foveal::Tensor<float, 3> grad_u;
  explicit TrainingTensors(Index len)
      : lse({1, kHeads, len}),
        grad_out({1, kHeads, len, kDim}),
        grad_q({1, kHeads, len, kDim}),
        grad_k({1, kHeads, len, kDim}),
        grad_v({1, kHeads, len, kDim}),
        grad_u({1, kHeads, len}) {
    fill_random(grad_out.data(), grad_out.numel(), 5);
  }
};

// Visible (query, key) pairs of a causal SparseK call.
double visible_pairs(Index len, Index window) {
  double pairs = 0;
  for (Index p = 0; p < len; ++p)
    pairs += static_cast<double>(std::min(p + 1, window) +
                                 std::min(std::max<Index>(p + 1 - window, 0), kTopK));
  return pairs * kHeads;
}

// Args: L, window, threads. T: float, or bfloat16 copies of the same inputs (float32
// arithmetic on the stored values, on AMX tiles where the CPU has them).
template <typename T>
void BM_SparseK(benchmark::State& state) {
  const Index len = state.range(0);
  const Inputs inputs(len);
  const auto copy = [](const auto& from, auto& to) {
    for (Index i = 0; i < from.numel(); ++i) to.data()[i] = foveal::to_storage<T>(from.data()[i]);
  };
  foveal::Tensor<T, 4> q({1, kHeads, len, kDim}), k({1, kHeads, len, kDim}),
      v({1, kHeads, len, kDim}), out({1, kHeads, len, kDim});
  foveal::Tensor<T, 3> u({1, kHeads, len});
  copy(inputs.q, q);
  copy(inputs.k, k);
  copy(inputs.v, v);
  copy(inputs.u, u);
  foveal::SparseKOptions options;
  options.topk = kTopK;
  options.window = state.range(1);
  options.num_threads = static_cast<int>(state.range(2));
  for (auto _ : state) {
    foveal::sparsek_attention(q, k, v, u, options, out);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(visible_pairs(len, options.window) * 4 * kDim * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK_TEMPLATE(BM_SparseK, float)
    ->ArgNames({"L", "W", "threads"})
    ->ArgsProduct({{4096, 16384, 65536}, {0, 256}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();
BENCHMARK_TEMPLATE(BM_SparseK, foveal::bfloat16)
    ->ArgNames({"L", "W", "threads"})
    ->ArgsProduct({{4096, 16384, 65536}, {0, 256}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: L, window. One thread: the selection of all 16 heads, one after the other.
void BM_SparseKSelection(benchmark::State& state) {
  const Index len = state.range(0);
  foveal::Tensor<float, 1> u({len});
  fill_random(u.data(), len, 4);
  foveal::SparseKOptions options;
  options.topk = kTopK;
  options.window = state.range(1);
  const auto geometry = foveal::detail::SparseKGeometry::make(options, len, len);
  foveal::detail::HeadSelection selection;
  foveal::detail::TileUnions unions;
  for (auto _ : state) {
    for (Index head = 0; head < kHeads; ++head) {
      foveal::detail::select_head(u.data(), 1, geometry, selection);
      foveal::detail::build_tile_unions(selection, geometry, 1, unions);
      benchmark::DoNotOptimize(unions.keys.data());
    }
  }
}
BENCHMARK(BM_SparseKSelection)
    ->ArgNames({"L", "W"})
    ->ArgsProduct({{4096, 16384, 65536}, {0, 256}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: L, threads.
void BM_DenseCausal(benchmark::State& state) {
  const Index len = state.range(0);
  Inputs inputs(len);
  foveal::AttentionOptions options;
  options.causal = true;
  options.num_threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    foveal::attention(inputs.q, inputs.k, inputs.v, inputs.out, options);
    benchmark::DoNotOptimize(inputs.out.data());
    benchmark::ClobberMemory();
  }
  const double pairs = static_cast<double>(len) * static_cast<double>(len + 1) / 2 * kHeads;
  state.counters["GFLOP/s"] =
      benchmark::Counter(pairs * 4 * kDim * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_DenseCausal)
    ->ArgNames({"L", "threads"})
    ->ArgsProduct({{4096, 16384}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: L, window, threads.
void BM_SparseKTraining(benchmark::State& state) {
  const Index len = state.range(0);
  Inputs inputs(len);
  TrainingTensors t(len);
  foveal::SparseKOptions options;
  options.topk = kTopK;
  options.window = state.range(1);
  options.num_threads = static_cast<int>(state.range(2));
  for (auto _ : state) {
    foveal::sparsek_attention(inputs.q, inputs.k, inputs.v, inputs.u, options, inputs.out, t.lse);
    foveal::sparsek_attention_backward(inputs.q, inputs.k, inputs.v, inputs.u, inputs.out, t.lse,
                                       t.grad_out, options, t.grad_q, t.grad_k, t.grad_v, t.grad_u);
    benchmark::DoNotOptimize(t.grad_u.data());
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_SparseKTraining)
    ->ArgNames({"L", "W", "threads"})
    ->ArgsProduct({{4096, 16384}, {0, 256}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Args: L, threads.
void BM_DenseCausalTraining(benchmark::State& state) {
  const Index len = state.range(0);
  Inputs inputs(len);
  TrainingTensors t(len);
  foveal::AttentionOptions options;
  options.causal = true;
  options.num_threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    foveal::attention(inputs.q, inputs.k, inputs.v, inputs.out, options, t.lse);
    foveal::attention_backward(inputs.q, inputs.k, inputs.v, inputs.out, t.lse, t.grad_out,
                               t.grad_q, t.grad_k, t.grad_v, options);
    benchmark::DoNotOptimize(t.grad_v.data());
    benchmark::ClobberMemory();
  }
}
BENCHMARK(BM_DenseCausalTraining)
    ->ArgNames({"L", "threads"})
    ->ArgsProduct({{4096, 16384}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
