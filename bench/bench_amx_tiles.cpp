// The phases of a bfloat16 key block on AMX tiles (src/detail/amx_tiles.hpp), each alone and all
// four in the engine's order over a head's keys: where a bfloat16 prefill block's time goes.
//
//   build/bench/bench/bench_amx_tiles
//
// A block is 64 query rows (kBlockQ) against 128 keys (kBlockK) of dimension D = Dv:
//   BM_AmxScores      s_t = K Q^T on tiles (K read in place, queries packed once)
//   BM_AmxSoftmax     the online softmax fused with rounding P to bfloat16 and transposing it
//   BM_AmxPackValues  the block's V rows pair-interleaved for the tiles
//   BM_AmxAccumulate  acc += P V on tiles
//   BM_AmxTile/D/0    one query tile over the 32 blocks of a 4096-key head, the four phases in
//                     turn as the engine runs them, with each phase's share of the time
//                     (counters scores, softmax, pack_v, accumulate, from the time-stamp counter)
//   BM_AmxTile/D/1    the same with the head's V pair-interleaved once beforehand (as a dense
//                     or band call does, TileRunner::pack_values_once), not per block
//   BM_FmaChain/0|1   a chain of dependent FMAs, without (0) or with (1) one TDPBF16PS per
//                     iteration: the tiles' effect on the clock of everything else
// The file is compiled with the avx512 level's flags (bench/CMakeLists.txt); each benchmark
// reports an error where the dispatcher did not choose the avx512-amx level.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "detail/amx_tiles.hpp"
#include "detail/isa.hpp"
#include "foveal/core/tensor.hpp"

#if FOVEAL_AMX_TILES
#include <x86intrin.h>  // __rdtsc

namespace {

using foveal::Index;
namespace detail = foveal::detail;
namespace amx = foveal::detail::FOVEAL_LEVEL::amx;
using detail::kBlockK;
using detail::kBlockQ;

constexpr Index kHeadKeys = 4096;
constexpr int kRowTiles = static_cast<int>(kBlockQ / amx::kTileRows);
constexpr Index kSteps = kBlockK / amx::kStepValues;

// bfloat16 bits of small values of both signs (a deterministic pattern, no NaN or infinity).
std::vector<std::uint16_t> bfloat16_values(Index count, Index seed) {
  std::vector<std::uint16_t> values(static_cast<std::size_t>(count));
  for (Index i = 0; i < count; ++i)
    values[static_cast<std::size_t>(i)] =
        static_cast<std::uint16_t>(0x3c00 + ((i * 37 + seed) % 512) + ((i % 3 == 0) ? 0x8000 : 0));
  return values;
}

// One thread's tile state: the engine's scratch for one query tile of dimension D = Dv.
struct TileState {
  explicit TileState(Index dim)
      : dim(dim),
        scratch_memory(static_cast<std::size_t>(amx::Scratch::bytes(dim, dim) / 2 + 32)),
        s_t(static_cast<std::size_t>(kBlockK * kBlockQ)),
        acc(static_cast<std::size_t>(kBlockQ * dim)),
        keys(bfloat16_values(kHeadKeys * dim, 1)),
        values(bfloat16_values(kHeadKeys * dim, 2)) {
    // 64-byte aligned scratch, as the engine's workspace is.
    auto address = reinterpret_cast<std::uintptr_t>(scratch_memory.data());
    scratch = amx::Scratch::at(scratch_memory.data() + (64 - address % 64) % 64 / 2, dim);
    std::vector<const std::uint16_t*> rows(static_cast<std::size_t>(kBlockQ));
    for (Index r = 0; r < kBlockQ; ++r) rows[static_cast<std::size_t>(r)] = keys.data() + r * dim;
    amx::pack_queries(rows.data(), kBlockQ, dim, scratch.q_vnni);
    reset();
  }
  void reset() {
    std::fill(row_max, row_max + kBlockQ, -1e30f);
    std::fill(row_sum, row_sum + kBlockQ, 0.0f);
    std::fill(alpha, alpha + kBlockQ, 1.0f);
    std::fill(acc.begin(), acc.end(), 0.0f);
  }
  void scores(Index block) {
    amx::scores(keys.data() + block * kBlockK * dim, dim, kBlockK, scratch.k_tail, scratch.q_vnni,
                dim, kRowTiles, key_end, 1.0f, s_t.data());
  }
  void softmax() {
    amx::softmax_to_rows(s_t.data(), key_end, kRowTiles, kSteps, 0.125f, row_max, row_sum, alpha,
                         scratch.p_rows);
  }
  void pack_values(Index block) {
    const std::uint16_t* v = values.data() + block * kBlockK * dim;
    amx::pack_values([&](Index j) { return v + j * dim; }, kBlockK, kSteps, dim, scratch.v_vnni);
  }
  // The whole head's V pair-interleaved, as the tiles of a dense call read it.
  void pack_head_values() {
    packed_head.resize(static_cast<std::size_t>(kHeadKeys * dim));
    amx::pack_values([&](Index j) { return values.data() + j * dim; }, kHeadKeys,
                     kHeadKeys / amx::kStepValues, dim, packed_head.data());
  }
  void accumulate(const std::uint16_t* v_vnni) {
    amx::accumulate(scratch.p_rows, v_vnni, key_end, kRowTiles, dim, alpha, acc.data(), dim);
  }
  void accumulate() { accumulate(scratch.v_vnni); }

  Index dim;
  std::vector<std::uint16_t> scratch_memory;
  amx::Scratch scratch{};
  std::vector<float> s_t, acc;
  std::vector<std::uint16_t> keys, values, packed_head;
  Index key_end[kRowTiles] = {kBlockK, kBlockK, kBlockK, kBlockK};
  float row_max[kBlockQ], row_sum[kBlockQ], alpha[kBlockQ];
};

// Runs body between configuring and releasing the tiles, or reports why it cannot.
template <typename Body>
void with_tiles(benchmark::State& state, Body&& body) {
  if (!detail::amx_tiles_enabled()) {
    state.SkipWithError("the dispatcher did not choose the avx512-amx level (no AMX here)");
    return;
  }
  amx::configure();
  body();
  amx::release();
}

void set_product_flops(benchmark::State& state, Index dim) {
  state.counters["GFLOP/s"] = benchmark::Counter(2.0 * kBlockQ * kBlockK * dim * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

void BM_AmxScores(benchmark::State& state) {
  TileState tile(state.range(0));
  with_tiles(state, [&] {
    for (auto _ : state) {
      tile.scores(0);
      benchmark::DoNotOptimize(tile.s_t.data());
    }
  });
  set_product_flops(state, tile.dim);
}

void BM_AmxSoftmax(benchmark::State& state) {
  TileState tile(state.range(0));
  with_tiles(state, [&] {
    tile.scores(0);
    for (auto _ : state) {
      tile.softmax();
      benchmark::DoNotOptimize(tile.scratch.p_rows);
    }
  });
  state.SetItemsProcessed(state.iterations() * kBlockQ * kBlockK);  // probabilities
}

void BM_AmxPackValues(benchmark::State& state) {
  TileState tile(state.range(0));
  with_tiles(state, [&] {
    for (auto _ : state) {
      tile.pack_values(0);
      benchmark::DoNotOptimize(tile.scratch.v_vnni);
    }
  });
  state.SetBytesProcessed(state.iterations() * kBlockK * tile.dim * 2);
}

void BM_AmxAccumulate(benchmark::State& state) {
  TileState tile(state.range(0));
  with_tiles(state, [&] {
    tile.scores(0);
    tile.softmax();
    tile.pack_values(0);
    std::fill(tile.alpha, tile.alpha + kBlockQ, 1.0f);
    for (auto _ : state) {
      tile.accumulate();
      benchmark::DoNotOptimize(tile.acc.data());
    }
  });
  set_product_flops(state, tile.dim);
}

void BM_AmxTile(benchmark::State& state) {
  TileState tile(state.range(0));
  const bool packed_once = state.range(1) != 0;
  if (packed_once) tile.pack_head_values();
  constexpr Index kBlocks = kHeadKeys / kBlockK;
  std::uint64_t cycles[4] = {};
  with_tiles(state, [&] {
    for (auto _ : state) {
      tile.reset();
      for (Index block = 0; block < kBlocks; ++block) {
        const std::uint64_t t0 = __rdtsc();
        tile.scores(block);
        const std::uint64_t t1 = __rdtsc();
        tile.softmax();
        const std::uint64_t t2 = __rdtsc();
        if (!packed_once) tile.pack_values(block);
        const std::uint64_t t3 = __rdtsc();
        if (packed_once) {
          tile.accumulate(tile.packed_head.data() + block * kBlockK * tile.dim);
        } else {
          tile.accumulate();
        }
        const std::uint64_t t4 = __rdtsc();
        cycles[0] += t1 - t0;
        cycles[1] += t2 - t1;
        cycles[2] += t3 - t2;
        cycles[3] += t4 - t3;
      }
      benchmark::DoNotOptimize(tile.acc.data());
    }
  });
  const double total = static_cast<double>(cycles[0] + cycles[1] + cycles[2] + cycles[3]);
  if (total > 0) {
    const char* names[4] = {"scores", "softmax", "pack_v", "accumulate"};
    for (int i = 0; i < 4; ++i) state.counters[names[i]] = static_cast<double>(cycles[i]) / total;
  }
  state.counters["GFLOP/s"] = benchmark::Counter(4.0 * kBlockQ * kHeadKeys * tile.dim * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
  state.counters["s/block"] = benchmark::Counter(
      static_cast<double>(kBlocks),
      benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

// 256 dependent FMAs (the chain's latency, not the ports, sets the time), after one TDPBF16PS on
// tiles nothing reads when range(0) is 1.
FOVEAL_AMX_TARGET void fma_chain(benchmark::State& state, bool tile_product) {
  alignas(64) std::uint16_t operand[16 * 32] = {};
  _tile_loadd(4, operand, 64);
  _tile_loadd(6, operand, 64);
  _tile_zero(0);
  __m512 x = _mm512_set1_ps(0.5f);
  for (auto _ : state) {
    if (tile_product) _tile_dpbf16ps(0, 4, 6);
    for (int i = 0; i < 256; ++i) x = _mm512_fmadd_ps(x, x, x);
    benchmark::DoNotOptimize(x);
  }
}

void BM_FmaChain(benchmark::State& state) {
  with_tiles(state, [&] { fma_chain(state, state.range(0) != 0); });
  state.counters["s/FMA"] = benchmark::Counter(
      256, benchmark::Counter::kIsIterationInvariantRate | benchmark::Counter::kInvert);
}

BENCHMARK(BM_AmxScores)->Arg(64)->Arg(128);
BENCHMARK(BM_AmxSoftmax)->Arg(64)->Arg(128);
BENCHMARK(BM_AmxPackValues)->Arg(64)->Arg(128);
BENCHMARK(BM_AmxAccumulate)->Arg(64)->Arg(128);
BENCHMARK(BM_AmxTile)->Args({64, 0})->Args({64, 1})->Args({128, 0})->Args({128, 1});
BENCHMARK(BM_FmaChain)->Arg(0)->Arg(1);

}  // namespace

#else

// Builds without the AMX code (another compiler, FOVEAL_NATIVE): nothing to measure.
static void BM_AmxUnavailable(benchmark::State& state) {
  state.SkipWithError("this build has no AMX tiles (GCC's avx512 level only)");
  for (auto _ : state) {
  }
}
BENCHMARK(BM_AmxUnavailable);

#endif

BENCHMARK_MAIN();
