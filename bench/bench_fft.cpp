// The real 2-D FFT backend (detail/fft.hpp) on the work of one PDE-SSM layer: forward and
// inverse transforms of x: [B=8, H, W, C=256] float, channels-last, every channel, on the
// periodic grid (H x W) and on the zero-padded one (2H x 2W, input in the top-left corner,
// output cropped back). foveal transforms chunks of kPreferredLanes channels at once; Eigen's
// FFT module (kissfft inside) does the same transforms channel by channel. This is the
// measurement behind docs/fft.md.
//
//   build/bench/bench/bench_fft --benchmark_counters_tabular=true
//
// Counters: GFLOP/s by the convention 5 N log2 N flops per complex transform of N points, so
// one real 2-D forward + inverse pair of an [Hf, Wf] grid counts as 5 Hf Wf log2(Hf Wf) per
// channel (each real transform is half a complex one); ns/token: time / (B H W).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <vector>

#include "detail/fft.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/core/tensor.hpp"

#ifdef FOVEAL_BENCH_HAS_EIGEN
#include <unsupported/Eigen/FFT>
#endif

namespace {

using foveal::Index;
using foveal::Tensor;
using foveal::detail::RealFft2d;

constexpr Index kBatch = 8;
constexpr Index kChannels = 256;

// The data grid (grid x grid) and the transform grid (doubled when padded).
struct Problem {
  Index grid, height, width;

  explicit Problem(const benchmark::State& state)
      : grid(state.range(0)),
        height(grid * (state.range(1) ? 2 : 1)),
        width(grid * (state.range(1) ? 2 : 1)) {}
  Index tokens() const { return kBatch * grid * grid; }
  double flops() const {
    const double points = static_cast<double>(height * width);
    return 5.0 * points * std::log2(points) * kBatch * kChannels;
  }
};

void set_counters(benchmark::State& state, const Problem& problem) {
  state.counters["GFLOP/s"] =
      benchmark::Counter(problem.flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["ns/token"] = benchmark::Counter(
      static_cast<double>(problem.tokens()) * 1e-9,
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// x: [B, grid, grid, C] (or [B, C, grid, grid] when !channels_last) -> out: same, through
// forward + inverse of every (batch, chunk) on `threads` threads (1: a plain loop, as a caller
// that parallelizes elsewhere runs it).
void run_foveal(benchmark::State& state, int threads, bool channels_last = true) {
  const Problem problem(state);
  const Index lanes = RealFft2d<float>::kPreferredLanes;
  const Index chunks = kChannels / lanes;
  const RealFft2d<float> plan(problem.height, problem.width);
  const Index grid = problem.grid;
  std::vector<float> x(kBatch * grid * grid * kChannels, 0.5f), out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 101) * 0.01f;
  std::vector<Tensor<float, 1>> spectra, works;
  for (int thread = 0; thread < threads; ++thread) {
    spectra.emplace_back(Tensor<float, 1>::Shape{plan.spectrum_size(lanes)});
    works.emplace_back(Tensor<float, 1>::Shape{plan.work_size(lanes)});
  }
  const Index pixels = grid * grid;
  const Index stride_y = channels_last ? grid * kChannels : grid;
  const Index stride_x = channels_last ? kChannels : 1;
  const Index stride_c = channels_last ? 1 : pixels;
  for (auto _ : state) {
    foveal::parallel_for(kBatch * chunks, threads, [&](Index task) {
      const Index batch = task / chunks, chunk = task % chunks;
      const int slot = foveal::detail::thread_index();
      const Index offset = batch * pixels * kChannels + chunk * lanes * stride_c;
      float* spectrum = spectra[slot].data();
      float* work = works[slot].data();
      plan.forward(x.data() + offset, stride_y, stride_x, stride_c, grid, grid, lanes, spectrum,
                   work);
      plan.inverse(spectrum, out.data() + offset, stride_y, stride_x, stride_c, grid, grid, lanes,
                   work);
    });
    benchmark::DoNotOptimize(out.data());
  }
  set_counters(state, problem);
}

void BM_FovealForwardInverse(benchmark::State& state) { run_foveal(state, 1); }
void BM_FovealForwardInverse2Threads(benchmark::State& state) { run_foveal(state, 2); }
void BM_FovealForwardInverseChannelsFirst(benchmark::State& state) { run_foveal(state, 1, false); }

void grids(benchmark::internal::Benchmark* bench) {
  bench->ArgNames({"grid", "padded"})->Unit(benchmark::kMillisecond);
  for (int padded = 0; padded < 2; ++padded)
    for (Index grid : {32, 64, 128, 256}) bench->Args({grid, padded});
}

// One thread: CPU time (and the counters from it), which on a shared machine is what the
// kernel cost; two threads: real time, the only measure of a team.
BENCHMARK(BM_FovealForwardInverse)->Apply(grids);
BENCHMARK(BM_FovealForwardInverse2Threads)->Apply(grids)->UseRealTime();
BENCHMARK(BM_FovealForwardInverseChannelsFirst)->Apply(grids);

#ifdef FOVEAL_BENCH_HAS_EIGEN
// The same transforms with Eigen's FFT module, one channel at a time: real FFTs of the rows
// (half spectrum), complex FFTs of the columns, and back.
void BM_EigenForwardInverse(benchmark::State& state) {
  using Complex = std::complex<float>;
  const Problem problem(state);
  const Index grid = problem.grid, height = problem.height, width = problem.width;
  const Index spectrum_width = width / 2 + 1;
  std::vector<float> x(kBatch * grid * grid * kChannels), out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>((i * 7919) % 101) * 0.01f;
  Eigen::FFT<float> fft;
  fft.SetFlag(Eigen::FFT<float>::HalfSpectrum);
  std::vector<float> plane(height * width), row(width);
  std::vector<Complex> spectrum(height * spectrum_width), column(height), column_out(height);
  for (auto _ : state) {
    for (Index batch = 0; batch < kBatch; ++batch)
      for (Index channel = 0; channel < kChannels; ++channel) {
        const Index base = batch * grid * grid * kChannels + channel;
        std::fill(plane.begin(), plane.end(), 0.0f);
        for (Index y = 0; y < grid; ++y)
          for (Index col = 0; col < grid; ++col)
            plane[y * width + col] = x[base + (y * grid + col) * kChannels];
        for (Index y = 0; y < height; ++y)
          fft.fwd(spectrum.data() + y * spectrum_width, plane.data() + y * width, width);
        for (Index kx = 0; kx < spectrum_width; ++kx) {
          for (Index ky = 0; ky < height; ++ky) column[ky] = spectrum[ky * spectrum_width + kx];
          fft.fwd(column_out.data(), column.data(), height);
          fft.inv(column.data(), column_out.data(), height);
          for (Index ky = 0; ky < height; ++ky) spectrum[ky * spectrum_width + kx] = column[ky];
        }
        for (Index y = 0; y < grid; ++y) {
          fft.inv(row.data(), spectrum.data() + y * spectrum_width, width);
          for (Index col = 0; col < grid; ++col)
            out[base + (y * grid + col) * kChannels] = row[col];
        }
      }
    benchmark::DoNotOptimize(out.data());
  }
  set_counters(state, problem);
}

BENCHMARK(BM_EigenForwardInverse)
    ->ArgNames({"grid", "padded"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->Args({32, 0})
    ->Args({64, 0})
    ->Args({128, 0})
    ->Args({32, 1})
    ->Args({64, 1});
#endif

}  // namespace

BENCHMARK_MAIN();
