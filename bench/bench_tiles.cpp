// The two tile products of the attention engine on one tile (64 query rows, 128 keys, float),
// foveal's micro-kernels against Eigen 3.4's GEMM on the same operands. This is the measurement
// behind the choice of hand-written micro-kernels over Eigen for these tiles (they win here;
// Eigen serves where a general algorithm is needed, such as VQ's SVD: docs/getting_started.md).
//
//   build/bench/bench/bench_tiles
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <utility>
#include <vector>

#include "detail/flash_engine.hpp"

namespace {

using foveal::Index;
using foveal::detail::kBlockK;
using foveal::detail::kBlockQ;
using RowMatrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

constexpr Index kRows = kBlockQ;
constexpr Index kKeys = kBlockK;

void set_flops(benchmark::State& state, Index dim) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kRows * kKeys * dim * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// S = Q K^T with Eigen (row-major operands, as the engine holds them).
void BM_ScoresEigen(benchmark::State& state) {
  const Index dim = state.range(0);
  const RowMatrix q = RowMatrix::Random(kRows, dim), k = RowMatrix::Random(kKeys, dim);
  RowMatrix s(kRows, kKeys);
  for (auto _ : state) {
    s.noalias() = q * k.transpose();
    benchmark::DoNotOptimize(s.data());
  }
  set_flops(state, dim);
}

// The same scores with foveal's 6-key x 64-row micro-kernel (queries packed transposed).
void BM_ScoresFoveal(benchmark::State& state) {
  const Index dim = state.range(0);
  const RowMatrix k = RowMatrix::Random(kKeys, dim);
  std::vector<float> q_t(dim * kBlockQ, 0.01f), s_t(kBlockK * kBlockQ);
  const float* k_rows[kBlockK];
  for (Index j = 0; j < kKeys; ++j) k_rows[j] = &k(j, 0);
  const int row_vectors = static_cast<int>(kRows / foveal::detail::kLanes<float>);
  const auto all_rows = [row_vectors](Index, Index) { return std::pair<int, int>(0, row_vectors); };
  for (auto _ : state) {
    foveal::detail::compute_scores(q_t.data(), k_rows, kKeys, dim, row_vectors, all_rows,
                                   s_t.data());
    benchmark::DoNotOptimize(s_t.data());
  }
  set_flops(state, dim);
}

// O += P V with Eigen.
void BM_OutputEigen(benchmark::State& state) {
  const Index dim = state.range(0);
  const RowMatrix p = RowMatrix::Random(kRows, kKeys), v = RowMatrix::Random(kKeys, dim);
  RowMatrix o = RowMatrix::Zero(kRows, dim);
  for (auto _ : state) {
    o.noalias() += p * v;
    benchmark::DoNotOptimize(o.data());
  }
  set_flops(state, dim);
}

// O = O * alpha + P V with foveal's 6-row x 64-column micro-kernel (P held transposed).
void BM_OutputFoveal(benchmark::State& state) {
  const Index dim = state.range(0);
  const RowMatrix v = RowMatrix::Random(kKeys, dim);
  std::vector<float> p_t(kBlockK * kBlockQ, 0.001f), acc(kBlockQ * dim), alpha(kBlockQ, 1.0f);
  const float* v_rows[kBlockK];
  for (Index j = 0; j < kKeys; ++j) v_rows[j] = &v(j, 0);
  const auto all_keys = [](Index, Index) { return std::pair<Index, Index>(0, kKeys); };
  for (auto _ : state) {
    foveal::detail::accumulate_output(p_t.data(), alpha.data(), v_rows, kRows, dim, all_keys,
                                      acc.data(), dim);
    benchmark::DoNotOptimize(acc.data());
  }
  set_flops(state, dim);
}

BENCHMARK(BM_ScoresEigen)->ArgName("D")->Arg(64)->Arg(128);
BENCHMARK(BM_ScoresFoveal)->ArgName("D")->Arg(64)->Arg(128);
BENCHMARK(BM_OutputEigen)->ArgName("D")->Arg(64)->Arg(128);
BENCHMARK(BM_OutputFoveal)->ArgName("D")->Arg(64)->Arg(128);

}  // namespace

BENCHMARK_MAIN();
