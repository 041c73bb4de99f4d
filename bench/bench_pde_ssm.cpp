// Google Benchmark for the PDE-SSM block (docs/pde_ssm.md), on the case of compare_torch.py
// --suite pde: fp32, B = 8, C = 256, H = W in {32, 64, 128}, periodic and zero boundary, 1 and
// 2 threads; forward with a cached multiplier (PdeSsm::forward), the free function (multiplier
// built per call) and the backward. Counters: time per token (B·H·W tokens of C channels) and the
// bytes/s of the grids read and written.
//
//   build/bench/bench/bench_pde_ssm
#include <benchmark/benchmark.h>

#include <random>

#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

constexpr Index kBatch = 8, kChannels = 256;

foveal::Tensor<float, 4> normal_grid(Index side, unsigned seed) {
  foveal::Tensor<float, 4> grid({kBatch, side, side, kChannels});
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal;
  float* values = grid.data();
  for (Index i = 0; i < grid.numel(); ++i) values[i] = normal(rng);
  return grid;
}

// Per-channel parameters: mild diffusion, some convection, decay, τ = 1, a skip.
struct Parameters {
  Parameters() : diffusion({kChannels, 3}), velocity({kChannels, 2}), scalars({3, kChannels}) {
    for (Index c = 0; c < kChannels; ++c) {
      diffusion(c, 0) = 0.6f, diffusion(c, 1) = 0.1f, diffusion(c, 2) = 0.5f;
      velocity(c, 0) = 0.3f + 0.01f * static_cast<float>(c % 7), velocity(c, 1) = -0.2f;
      scalars(0, c) = -0.05f, scalars(1, c) = 1.0f, scalars(2, c) = 0.5f;
    }
  }
  foveal::PdeSsmParameters<float> views() const {
    foveal::PdeSsmParameters<float> p;
    p.diffusion = diffusion.view();
    p.velocity = velocity.view();
    p.reaction = foveal::TensorView<const float, 1>(scalars.data(), {kChannels});
    p.time = foveal::TensorView<const float, 1>(scalars.data() + kChannels, {kChannels});
    p.skip = foveal::TensorView<const float, 1>(scalars.data() + 2 * kChannels, {kChannels});
    return p;
  }
  foveal::Tensor<float, 2> diffusion, velocity, scalars;
};

foveal::PdeSsmOptions options_for(Index zero_boundary) {
  foveal::PdeSsmOptions options;
  options.boundary =
      zero_boundary ? foveal::PdeSsmBoundary::zero : foveal::PdeSsmBoundary::periodic;
  return options;
}

void set_counters(benchmark::State& state, Index side, double grids_moved) {
  const double tokens = static_cast<double>(kBatch * side * side);
  // Seconds per token (printed with an SI prefix, e.g. per_token=930ns).
  state.counters["per_token"] = benchmark::Counter(
      tokens, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
  state.counters["bytes"] = benchmark::Counter(grids_moved * tokens * kChannels * 4,
                                               benchmark::Counter::kIsIterationInvariantRate);
}

// Args: side, zero boundary, threads, cached (PdeSsm) or free function.
void BM_PdeSsmForward(benchmark::State& state) {
  const Index side = state.range(0);
  const foveal::PdeSsmOptions options = options_for(state.range(1));
  const int threads = static_cast<int>(state.range(2));
  const bool cached = state.range(3) != 0;
  const foveal::Tensor<float, 4> x = normal_grid(side, 1);
  foveal::Tensor<float, 4> out({kBatch, side, side, kChannels});
  const Parameters parameters;
  const foveal::PdeSsm<float> block(side, side, kChannels, parameters.views(), options, threads);
  for (auto _ : state) {
    if (cached) {
      block.forward(x.view(), out.view(), threads);
    } else {
      foveal::pde_ssm(x.view(), parameters.views(), out.view(), options, threads);
    }
    benchmark::DoNotOptimize(out.data());
  }
  set_counters(state, side, 2);
}

// Args: side, zero boundary, threads: the backward of every input and parameter.
void BM_PdeSsmBackward(benchmark::State& state) {
  const Index side = state.range(0);
  const foveal::PdeSsmOptions options = options_for(state.range(1));
  const int threads = static_cast<int>(state.range(2));
  const foveal::Tensor<float, 4> x = normal_grid(side, 1), grad_out = normal_grid(side, 2);
  foveal::Tensor<float, 4> grad_x({kBatch, side, side, kChannels});
  const Parameters parameters;
  foveal::Tensor<float, 2> grad_diffusion({kChannels, 3}), grad_velocity({kChannels, 2});
  foveal::Tensor<float, 2> grad_scalars({3, kChannels});
  foveal::PdeSsmGradients<float> gradients;
  gradients.diffusion = grad_diffusion.view();
  gradients.velocity = grad_velocity.view();
  gradients.reaction = foveal::TensorView<float, 1>(grad_scalars.data(), {kChannels});
  gradients.time = foveal::TensorView<float, 1>(grad_scalars.data() + kChannels, {kChannels});
  gradients.skip = foveal::TensorView<float, 1>(grad_scalars.data() + 2 * kChannels, {kChannels});
  const foveal::PdeSsm<float> block(side, side, kChannels, parameters.views(), options, threads);
  for (auto _ : state) {
    block.backward(x.view(), grad_out.view(), grad_x.view(), gradients, threads);
    benchmark::DoNotOptimize(grad_x.data());
  }
  set_counters(state, side, 3);
}

}  // namespace

BENCHMARK(BM_PdeSsmForward)
    ->ArgNames({"side", "zero", "threads", "cached"})
    ->ArgsProduct({{32, 64, 128}, {0, 1}, {1, 2}, {1, 0}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK(BM_PdeSsmBackward)
    ->ArgNames({"side", "zero", "threads"})
    ->ArgsProduct({{32, 64, 128}, {0, 1}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK_MAIN();
