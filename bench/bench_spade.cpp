// Google Benchmark for SPADE (docs/spade.md), on the case of compare_torch.py --only spade:
// B = 32 sequences of n = 1024 tokens, z / x / y binned into 30 bins (table width 64) and a
// continuous energy (MLP 1-16-16), d_model = 256. Counters: tokens/s (delayed steps per second
// for the embedding, tokens for delay / undelay) and GB/s of the tensors read and written.
//
//   build/bench/bench/bench_spade
#include <benchmark/benchmark.h>

#include <array>
#include <cstdint>
#include <random>
#include <vector>

#include "foveal/foveal.hpp"

namespace {

using foveal::Index;

constexpr Index kBatch = 32, kLength = 1024, kBins = 30, kWidth = 64, kHidden = 16, kDModel = 256;

foveal::SpadeSchema shower_schema() {
  return foveal::SpadeSchema(
      {foveal::SpadeFeature::binned("z", kBins), foveal::SpadeFeature::binned("x", kBins),
       foveal::SpadeFeature::binned("y", kBins), foveal::SpadeFeature::continuous("energy")});
}

// The tokens of the batch and their delayed form.
struct ShowerBatch {
  foveal::SpadeSchema schema = shower_schema();
  Index steps = kLength + schema.max_shift();
  foveal::Tensor<std::int64_t, 3> ids{{kBatch, kLength, 3}};
  foveal::Tensor<float, 3> values{{kBatch, kLength, 1}};
  foveal::Tensor<std::int64_t, 3> delayed_ids{{kBatch, steps, 3}};
  foveal::Tensor<float, 3> delayed_values{{kBatch, steps, 1}};
  foveal::Tensor<std::uint8_t, 3> mask{{kBatch, steps, 4}};

  ShowerBatch() {
    std::mt19937 rng(7);
    std::uniform_int_distribution<std::int64_t> bin(1, kBins);
    std::exponential_distribution<float> energy(1.0f);
    for (Index i = 0; i < ids.numel(); ++i) ids.data()[i] = bin(rng);
    for (Index i = 0; i < values.numel(); ++i) values.data()[i] = energy(rng);
    foveal::spade_delay(schema, ids, values, {}, delayed_ids, delayed_values, mask);
  }

  // Bytes of the token batch (ids + values) and of its delayed form with the mask.
  double token_bytes() const { return kBatch * kLength * (3 * 8.0 + 4.0); }
  double delayed_bytes() const { return kBatch * steps * (3 * 8.0 + 4.0 + 4.0); }
};

// Random weights in PyTorch layouts, owned here.
struct ShowerWeights {
  std::vector<std::vector<float>> storage;
  foveal::SpadeEmbeddingWeights weights;

  template <int Rank>
  foveal::TensorView<const float, Rank> random(std::mt19937& rng,
                                               const std::array<Index, Rank>& shape) {
    std::normal_distribution<float> normal(0.0f, 0.2f);
    Index count = 1;
    for (Index extent : shape) count *= extent;
    storage.emplace_back(static_cast<std::size_t>(count));
    for (float& value : storage.back()) value = normal(rng);
    return foveal::TensorView<const float, Rank>(storage.back().data(), shape);
  }

  explicit ShowerWeights(bool layer_norm) {
    std::mt19937 rng(11);
    for (int f = 0; f < 3; ++f) {
      foveal::SpadeFeatureWeights feature;
      feature.table = random<2>(rng, {kBins + 2, kWidth});
      if (layer_norm) {
        feature.norm_weight = random<1>(rng, {kWidth});
        feature.norm_bias = random<1>(rng, {kWidth});
      }
      weights.features.push_back(feature);
    }
    foveal::SpadeFeatureWeights energy;
    energy.hidden_weight = random<2>(rng, {kHidden, 1});
    energy.hidden_bias = random<1>(rng, {kHidden});
    energy.output_weight = random<2>(rng, {kHidden, kHidden});
    energy.output_bias = random<1>(rng, {kHidden});
    weights.features.push_back(energy);
    weights.projection_weight = random<2>(rng, {kDModel, 3 * kWidth + kHidden});
    weights.projection_bias = random<1>(rng, {kDModel});
  }
};

// Args: layer_norm, threads.
void BM_SpadeEmbedding(benchmark::State& state) {
  const ShowerBatch batch;
  const ShowerWeights weights(state.range(0) != 0);
  const foveal::SpadeEmbedding embedding(batch.schema, weights.weights);
  foveal::Tensor<float, 3> out({kBatch, batch.steps, kDModel});
  const int threads = static_cast<int>(state.range(1));
  for (auto _ : state) {
    embedding.forward(batch.delayed_ids, batch.delayed_values, out, {}, threads);
    benchmark::DoNotOptimize(out.data());
    benchmark::ClobberMemory();
  }
  const double steps = static_cast<double>(kBatch * batch.steps);
  state.counters["tokens/s"] =
      benchmark::Counter(steps, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] =
      benchmark::Counter((batch.delayed_bytes() + steps * kDModel * 4.0) * 1e-9,
                         benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_SpadeEmbedding)
    ->ArgNames({"layer_norm", "threads"})
    ->ArgsProduct({{0, 1}, {1, 2}})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// Times pass(batch, threads) over the token batch and its delayed form. Args: threads.
template <typename Pass>
void time_token_pass(benchmark::State& state, Pass&& pass) {
  ShowerBatch batch;
  const int threads = static_cast<int>(state.range(0));
  for (auto _ : state) {
    pass(batch, threads);
    benchmark::ClobberMemory();
  }
  state.counters["tokens/s"] =
      benchmark::Counter(kBatch * kLength, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GB/s"] = benchmark::Counter((batch.token_bytes() + batch.delayed_bytes()) * 1e-9,
                                              benchmark::Counter::kIsIterationInvariantRate);
}

// delay of the token batch into preallocated outputs.
void BM_SpadeDelay(benchmark::State& state) {
  time_token_pass(state, [](ShowerBatch& batch, int threads) {
    foveal::spade_delay(batch.schema, batch.ids, batch.values, {}, batch.delayed_ids,
                        batch.delayed_values, batch.mask, threads);
  });
}
BENCHMARK(BM_SpadeDelay)->ArgNames({"threads"})->Arg(1)->Arg(2)->UseRealTime();

// undelay of the delayed batch into preallocated outputs.
void BM_SpadeUndelay(benchmark::State& state) {
  time_token_pass(state, [](ShowerBatch& batch, int threads) {
    foveal::spade_undelay(batch.schema, batch.delayed_ids, batch.delayed_values, batch.ids,
                          batch.values, threads);
  });
}
BENCHMARK(BM_SpadeUndelay)->ArgNames({"threads"})->Arg(1)->Arg(2)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
