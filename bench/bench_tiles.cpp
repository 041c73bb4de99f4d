// The two tile products of the attention engine on one tile (64 query rows, 128 keys, float),
// foveal's micro-kernels against Eigen 3.4's GEMM on the same operands. This is the measurement
// behind the choice of hand-written micro-kernels over Eigen for these tiles (they win here;
// Eigen serves where a general algorithm is needed, such as VQ's SVD: docs/getting_started.md).
// Compiled as the avx512 level's code, Eigen included (bench/CMakeLists.txt): an AVX-512 CPU only.
//
//   build/bench/bench/bench_tiles
#include <benchmark/benchmark.h>

#include <Eigen/Dense>
#include <utility>
#include <vector>

#include "detail/flash_backward.hpp"
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
    foveal::detail::compute_scores(q_t.data(), k_rows, kKeys, dim, 1.0f, row_vectors, all_rows,
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

// The backward's accumulations on one tile and block (accumulate_rows, 6 rows x 64 columns per
// micro-kernel): dK/dV (transposed weights: acc rows are the block's keys, summed over the tile's
// rows) and dQ (acc rows are the tile's rows, summed over the block's keys).
void BM_AccumulateFoveal(benchmark::State& state) {
  const Index dim = state.range(0);
  const bool keys_major = state.range(1) == 0;  // 0: dK/dV, 1: dQ
  const Index num_acc = keys_major ? kKeys : kRows, count = keys_major ? kRows : kKeys;
  const RowMatrix src = RowMatrix::Random(count, dim);
  RowMatrix acc = RowMatrix::Zero(num_acc, dim);
  std::vector<float> w(kBlockK * kBlockQ, 0.001f);
  std::vector<const float*> src_rows(count);
  std::vector<float*> acc_rows(num_acc);
  for (Index j = 0; j < count; ++j) src_rows[j] = &src(j, 0);
  for (Index r = 0; r < num_acc; ++r) acc_rows[r] = &acc(r, 0);
  for (auto _ : state) {
    if (keys_major)
      foveal::detail::accumulate_rows(w.data(), 1, kBlockQ, src_rows.data(), count, dim,
                                      acc_rows.data(), num_acc);
    else
      foveal::detail::accumulate_rows(w.data(), kBlockQ, 1, src_rows.data(), count, dim,
                                      acc_rows.data(), num_acc);
    benchmark::DoNotOptimize(acc.data());
  }
  set_flops(state, dim);
}

BENCHMARK(BM_ScoresEigen)->ArgName("D")->Arg(64)->Arg(128);
BENCHMARK(BM_ScoresFoveal)->ArgName("D")->Arg(16)->Arg(32)->Arg(64)->Arg(128)->Arg(256);
BENCHMARK(BM_OutputEigen)->ArgName("D")->Arg(64)->Arg(128);
BENCHMARK(BM_OutputFoveal)->ArgName("D")->Arg(16)->Arg(32)->Arg(64)->Arg(128)->Arg(256);

BENCHMARK(BM_AccumulateFoveal)->ArgNames({"D", "dQ"})->ArgsProduct({{64, 128}, {0, 1}});

}  // namespace

BENCHMARK_MAIN();
