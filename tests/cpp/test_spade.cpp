// tests/cpp/test_spade.cpp — SPADE split-and-delay (docs/spade.md) against the float64
// reference: the delay pattern and its masks, undelay, the training helpers, the folded
// embedding, the generation state machine, and every rejected input.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "foveal/embedding/spade.hpp"
#include "harness.hpp"
#include "reference/spade_reference.hpp"

namespace foveal {
namespace {

using reference::SpadeReferenceFeature;
using test::Layout;
using test::RandomSource;
using test::Shape;
using test::StridedBuffer;

constexpr std::uint64_t kSeed = 20240717;
constexpr Layout kAnyLayouts[] = {Layout::kContiguous, Layout::kPadded, Layout::kReversed,
                                  Layout::kSwapped12};
// Layouts with a unit-stride last dimension (what SpadeEmbedding.forward's out needs).
constexpr Layout kRowLayouts[] = {Layout::kContiguous, Layout::kPadded, Layout::kReversed};

// ---------------------------------------------------------------------------------------------
// Random schemas and tokens.

// 1..max_features features of random kinds (the first discrete when asked), vocabularies of
// 3..40 ids with PAD and MISSING at random places, shifts strictly increasing by 1..3.
SpadeSchema random_schema(RandomSource& random, Index max_features, bool discrete_first) {
  std::vector<SpadeFeature> features;
  const Index count = random.integer(1, max_features);
  Index shift = 0;
  for (Index f = 0; f < count; ++f) {
    shift += random.integer(1, 3);
    const std::string name = "feature" + std::to_string(f);
    if ((discrete_first && f == 0) || random.chance(0.6)) {
      SpadeFeature feature;
      feature.name = name;
      feature.vocab_size = random.integer(3, 40);
      feature.pad_id = random.integer(0, feature.vocab_size - 1);
      do {
        feature.missing_id = random.integer(0, feature.vocab_size - 1);
      } while (feature.missing_id == feature.pad_id);
      feature.shift = shift;
      features.push_back(feature);
    } else {
      features.push_back(SpadeFeature::continuous(name, shift));
    }
  }
  return SpadeSchema(features);
}

std::vector<SpadeReferenceFeature> reference_features(const SpadeSchema& schema) {
  std::vector<SpadeReferenceFeature> features;
  for (const SpadeFeature& feature : schema.features()) {
    SpadeReferenceFeature described;
    described.discrete = feature.kind == SpadeFeatureKind::discrete;
    described.vocab_size = feature.vocab_size;
    described.pad_id = feature.pad_id;
    described.missing_id = feature.missing_id;
    described.shift = feature.shift;
    features.push_back(described);
  }
  return features;
}

// Tokens [B, L, F] of every feature as doubles: ids uniform over the vocabulary (never PAD or
// MISSING when `data_ids_only`), values N(0, 2) rounded to float.
std::vector<double> random_tokens(RandomSource& random, const SpadeSchema& schema, Index batch,
                                  Index length, bool data_ids_only) {
  std::vector<double> tokens;
  for (Index i = 0; i < batch * length; ++i)
    for (const SpadeFeature& feature : schema.features()) {
      if (feature.kind == SpadeFeatureKind::continuous) {
        tokens.push_back(static_cast<float>(random.normal(1, 0, 2)[0]));
        continue;
      }
      Index id = 0;
      do {
        id = random.integer(0, feature.vocab_size - 1);
      } while (data_ids_only && (id == feature.pad_id || id == feature.missing_id));
      tokens.push_back(static_cast<double>(id));
    }
  return tokens;
}

// Tokens of all F features [B, L, F] split into ids [B, L, Fd] and values [B, L, Fc].
struct SplitTokens {
  std::vector<double> ids, values;
};

SplitTokens split_tokens(const SpadeSchema& schema, const std::vector<double>& tokens) {
  SplitTokens split;
  const Index num_features = schema.num_features();
  for (std::size_t at = 0; at < tokens.size(); ++at) {
    const Index f = static_cast<Index>(at) % num_features;
    auto& target = schema.feature(f).kind == SpadeFeatureKind::discrete ? split.ids : split.values;
    target.push_back(tokens[at]);
  }
  return split;
}

// Per-sequence lengths in [0, n], n itself about half the time.
std::vector<double> random_lengths(RandomSource& random, Index batch, Index n) {
  std::vector<double> lengths;
  for (Index b = 0; b < batch; ++b)
    lengths.push_back(static_cast<double>(random.chance(0.5) ? n : random.integer(0, n)));
  return lengths;
}

// ---------------------------------------------------------------------------------------------
// One delay call on strided buffers.

// The buffers of spade_delay for B sequences of n tokens: inputs from `tokens` [B, n, F];
// outputs filled with `fill` before the call.
struct DelayCase {
  DelayCase(const SpadeSchema& schema, Index batch, Index n, const std::vector<double>& tokens,
            const std::vector<double>& lengths, Layout layout, double fill)
      : schema(schema),
        split(split_tokens(schema, tokens)),
        steps(n + schema.max_shift()),
        ids(split.ids, {batch, n, schema.num_discrete()}, layout, 0),
        values(split.values, {batch, n, schema.num_continuous()}, layout, 0),
        lengths_buffer(lengths, {batch}, Layout::kContiguous, 0),
        delayed_ids({batch, steps, schema.num_discrete()}, layout, static_cast<std::int64_t>(fill)),
        delayed_values({batch, steps, schema.num_continuous()}, layout, static_cast<float>(fill)),
        mask({batch, steps, schema.num_features()}, layout, static_cast<std::uint8_t>(fill)) {}

  void run(int num_threads = 0) const {
    spade_delay(schema, ids.const_view(), values.const_view(), lengths_buffer.const_view(),
                delayed_ids.view(), delayed_values.view(), mask.view(), num_threads);
  }

  // delayed ids and values joined back into [B, T, F] doubles, in schema order.
  std::vector<double> delayed_tokens() const {
    return join(test::gather(delayed_ids.view()), test::gather(delayed_values.view()));
  }

  std::vector<double> join(const std::vector<double>& id_part,
                           const std::vector<double>& value_part) const {
    std::vector<double> joined;
    std::size_t next_id = 0, next_value = 0;
    const std::size_t total = id_part.size() + value_part.size();
    for (std::size_t at = 0; at < total; ++at) {
      const Index f = static_cast<Index>(at) % schema.num_features();
      joined.push_back(schema.feature(f).kind == SpadeFeatureKind::discrete
                           ? id_part[next_id++]
                           : value_part[next_value++]);
    }
    return joined;
  }

  const SpadeSchema& schema;
  SplitTokens split;
  Index steps;
  StridedBuffer<std::int64_t, 3> ids;
  StridedBuffer<float, 3> values;
  StridedBuffer<std::int64_t, 1> lengths_buffer;
  StridedBuffer<std::int64_t, 3> delayed_ids;
  StridedBuffer<float, 3> delayed_values;
  StridedBuffer<std::uint8_t, 3> mask;
};

std::vector<std::int64_t> as_lengths(const std::vector<double>& lengths) {
  return std::vector<std::int64_t>(lengths.begin(), lengths.end());
}

// ---------------------------------------------------------------------------------------------
// Schema.

TEST(SpadeSchema, DefaultShiftsAreFeatureIndexPlusOne) {
  const SpadeSchema schema({SpadeFeature::binned("z", 30), SpadeFeature::binned("x", 30),
                            SpadeFeature::binned("y", 30), SpadeFeature::continuous("E")});
  for (Index f = 0; f < 4; ++f) EXPECT_EQ(schema.feature(f).shift, f + 1);
  EXPECT_EQ(schema.max_shift(), 4);
  EXPECT_EQ(schema.num_discrete(), 3);
  EXPECT_EQ(schema.num_continuous(), 1);
  EXPECT_EQ(schema.column(3), 0);
}

TEST(SpadeSchema, BinnedLayoutIsPadZeroBinsThenMissing) {
  const SpadeFeature feature = SpadeFeature::binned("x", 30);
  EXPECT_EQ(feature.vocab_size, 32);
  EXPECT_EQ(feature.pad_id, 0);
  EXPECT_EQ(feature.missing_id, 31);
}

TEST(SpadeSchema, RejectsShiftsThatAreNotStrictlyIncreasingOrBelowOne) {
  EXPECT_TRUE(test::throws_error_with(
      [] {
        SpadeSchema({SpadeFeature::binned("z", 4, 2), SpadeFeature::binned("x", 4, 2)});
      },
      {"SpadeSchema: features[1].shift (feature \"x\") must be > features[0].shift = 2", "got 2"}));
  EXPECT_TRUE(test::throws_error_with(
      [] {
        SpadeSchema({SpadeFeature::binned("z", 4, 3), SpadeFeature::continuous("E", 1)});
      },
      {"feature \"E\"", "strictly increase", "got 1"}));
  EXPECT_TRUE(
      test::throws_error_with([] { SpadeSchema({SpadeFeature::binned("z", 4, -1)}); },
                              {"features[0].shift (feature \"z\") must be >= 1", "got -1"}));
}

TEST(SpadeSchema, RejectsBadFeatures) {
  EXPECT_TRUE(test::throws_error_with([] { SpadeSchema(std::vector<SpadeFeature>{}); },
                                      {"features must not be empty"}));
  EXPECT_TRUE(test::throws_error_with(
      [] {
        SpadeSchema({SpadeFeature::binned("x", 4), SpadeFeature::binned("x", 4)});
      },
      {"features[1].name must be unique", "\"x\""}));
  SpadeFeature feature = SpadeFeature::binned("y", 4);
  feature.missing_id = 6;
  EXPECT_TRUE(
      test::throws_error_with([&] { SpadeSchema({feature}); },
                              {"features[0].missing_id (feature \"y\")", "[0, 6)", "got 6"}));
  EXPECT_TRUE(test::throws_error_with([] { SpadeFeature::binned("y", 0); }, {"num_bins", "got 0"}));
}

// ---------------------------------------------------------------------------------------------
// Delay and undelay.

TEST(SpadeDelay, MatchesTheReferenceForRandomShapesLengthsAndLayouts) {
  RandomSource random(kSeed);
  for (int trial = 0; trial < 60; ++trial) {
    const SpadeSchema schema = random_schema(random, 5, false);
    const Index batch = random.pick({1, 2, 3, 5}), n = random.pick({0, 1, 2, 3, 7, 13});
    const Layout layout = random.pick(kAnyLayouts);
    SCOPED_TRACE(test::describe("seed=", kSeed, " trial=", trial, " B=", batch, " n=", n, " F=",
                                schema.num_features(), " layout=", test::layout_name(layout)));
    const auto tokens = random_tokens(random, schema, batch, n, false);
    const auto lengths = random_lengths(random, batch, n);
    const DelayCase delay(schema, batch, n, tokens, lengths, layout, 77);
    delay.run();

    std::vector<double> expected, expected_mask;
    reference::spade_delay_reference(reference_features(schema), batch, n, as_lengths(lengths),
                                     tokens, expected, expected_mask);
    EXPECT_TRUE(test::bitwise_equal(delay.delayed_tokens(), expected));
    EXPECT_TRUE(test::bitwise_equal(test::gather(delay.mask.view()), expected_mask));
    EXPECT_TRUE(delay.delayed_ids.outside_untouched());
    EXPECT_TRUE(delay.mask.outside_untouched());
  }
}

TEST(SpadeDelay, StepZeroIsAllMissingAndMasked) {
  RandomSource random(kSeed + 1);
  const SpadeSchema schema({SpadeFeature::binned("z", 30), SpadeFeature::binned("x", 30),
                            SpadeFeature::binned("y", 30), SpadeFeature::continuous("E")});
  const auto tokens = random_tokens(random, schema, 2, 5, false);
  const DelayCase delay(schema, 2, 5, tokens, {5, 2}, Layout::kContiguous, 0);
  delay.run();
  for (Index b = 0; b < 2; ++b) {
    for (Index column = 0; column < 3; ++column)
      EXPECT_EQ(delay.delayed_ids.view()(b, 0, column), 31);
    EXPECT_EQ(delay.delayed_values.view()(b, 0, 0), 0.0f);
    for (Index f = 0; f < 4; ++f) EXPECT_EQ(delay.mask.view()(b, 0, f), 0);
  }
  // The shorter sequence: MISSING until step len + max shift = 6, PAD from there on.
  EXPECT_EQ(delay.delayed_ids.view()(1, 5, 2), 31);
  EXPECT_EQ(delay.delayed_ids.view()(1, 6, 0), 0);
  EXPECT_EQ(delay.mask.view()(1, 4, 2), 1);  // y (shift 3) of token 1
  EXPECT_EQ(delay.mask.view()(1, 5, 2), 0);
}

TEST(SpadeUndelay, InvertsDelayForEveryValidInput) {
  RandomSource random(kSeed + 2);
  for (int trial = 0; trial < 60; ++trial) {
    const SpadeSchema schema = random_schema(random, 5, false);
    const Index batch = random.pick({1, 2, 3, 7}), n = random.pick({0, 1, 2, 5, 11, 17});
    const Layout layout = random.pick(kAnyLayouts);
    SCOPED_TRACE(test::describe("seed=", kSeed + 2, " trial=", trial, " B=", batch, " n=", n,
                                " layout=", test::layout_name(layout)));
    const auto tokens = random_tokens(random, schema, batch, n, false);
    const auto lengths = random_lengths(random, batch, n);
    const DelayCase delay(schema, batch, n, tokens, lengths, layout, 0);
    delay.run();
    StridedBuffer<std::int64_t, 3> ids({batch, n, schema.num_discrete()}, layout, -5);
    StridedBuffer<float, 3> values({batch, n, schema.num_continuous()}, layout, -5.0f);
    spade_undelay(schema, delay.delayed_ids.const_view(), delay.delayed_values.const_view(),
                  ids.view(), values.view());

    // Positions inside a sequence come back exactly; past its end, what the delayed stream
    // holds there (MISSING, then PAD).
    std::vector<double> expected = tokens;
    const auto delayed = delay.delayed_tokens();
    const Index num_features = schema.num_features();
    for (Index b = 0; b < batch; ++b)
      for (Index i = static_cast<Index>(lengths[b]); i < n; ++i)
        for (Index f = 0; f < num_features; ++f)
          expected[(b * n + i) * num_features + f] =
              delayed[(b * delay.steps + i + schema.feature(f).shift) * num_features + f];
    EXPECT_TRUE(test::bitwise_equal(
        delay.join(test::gather(ids.view()), test::gather(values.view())), expected));
  }
}

template <typename T>
void check_undelay_logits(std::uint64_t seed) {
  RandomSource random(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const SpadeSchema schema = random_schema(random, 4, false);
    const Index batch = random.pick({1, 2, 3}), n = random.pick({0, 1, 4, 7});
    const Index vocab = random.pick({1, 5, 33}), steps = n + schema.max_shift();
    const Index num_features = schema.num_features();
    const Layout layout = random.pick(kAnyLayouts);
    SCOPED_TRACE(
        test::describe("seed=", seed, " trial=", trial, " layout=", test::layout_name(layout)));
    const auto logits_values =
        random.normal(static_cast<std::size_t>(batch * steps * num_features * vocab));
    const StridedBuffer<T, 4> logits(test::round_to<T>(logits_values),
                                     {batch, steps, num_features, vocab}, layout, 0);
    StridedBuffer<T, 4> out({batch, n, num_features, vocab}, layout, 0);
    spade_undelay_logits(schema, logits.const_view(), out.view());
    std::vector<double> expected;
    for (Index b = 0; b < batch; ++b)
      for (Index i = 0; i < n; ++i)
        for (Index f = 0; f < num_features; ++f)
          for (Index v = 0; v < vocab; ++v)
            expected.push_back(static_cast<T>(
                logits_values
                    [((b * steps + i + schema.feature(f).shift) * num_features + f) * vocab + v]));
    EXPECT_TRUE(test::bitwise_equal(test::gather(out.view()), expected));
  }
}

TEST(SpadeUndelay, LogitsComeBackInTokenOrder) {
  check_undelay_logits<float>(kSeed + 3);
  check_undelay_logits<double>(kSeed + 4);
}

TEST(SpadeDelay, IdenticalForOneTwoAndThreeThreads) {
  // Large enough (B * T * F > 3 * 2^17) that three threads really start.
  RandomSource random(kSeed + 5);
  const SpadeSchema schema({SpadeFeature::binned("z", 30), SpadeFeature::binned("x", 30),
                            SpadeFeature::continuous("E"), SpadeFeature::binned("y", 7),
                            SpadeFeature::continuous("t")});
  const Index batch = 97, n = 1001;
  const auto tokens = random_tokens(random, schema, batch, n, false);
  const auto lengths = random_lengths(random, batch, n);
  const DelayCase single(schema, batch, n, tokens, lengths, Layout::kContiguous, 0);
  single.run(1);
  for (int threads : {2, 3}) {
    const DelayCase multi(schema, batch, n, tokens, lengths, Layout::kContiguous, 0);
    multi.run(threads);
    EXPECT_TRUE(test::bitwise_equal(multi.delayed_tokens(), single.delayed_tokens()));
    EXPECT_TRUE(
        test::bitwise_equal(test::gather(multi.mask.view()), test::gather(single.mask.view())));
  }
}

// ---------------------------------------------------------------------------------------------
// Training helpers.

TEST(SpadeTraining, LossMaskIsTheValidityOfTheTargetStep) {
  RandomSource random(kSeed + 6);
  for (int trial = 0; trial < 30; ++trial) {
    const SpadeSchema schema = random_schema(random, 5, true);
    const Index batch = random.pick({1, 2, 5}), n = random.pick({1, 2, 6, 13});
    const auto lengths = random_lengths(random, batch, n);
    const auto tokens = random_tokens(random, schema, batch, n, false);
    const DelayCase delay(schema, batch, n, tokens, lengths, Layout::kContiguous, 0);
    delay.run();
    const Index steps = delay.steps, num_features = schema.num_features();
    const StridedBuffer<std::int64_t, 1> lengths_buffer(lengths, {batch}, Layout::kContiguous, 0);
    for (bool include_stop : {false, true}) {
      SCOPED_TRACE(test::describe("trial=", trial, " include_stop=", include_stop));
      Tensor<std::uint8_t, 3> loss_mask({batch, steps - 1, num_features});
      spade_loss_mask(schema, lengths_buffer.const_view(), loss_mask, include_stop);
      const auto next = spade_next_step<const std::uint8_t>(delay.mask.const_view());
      std::vector<double> expected = test::gather(next.targets);
      if (include_stop) {
        // The first stream's step after its last token: where the generator learns to stop.
        for (Index b = 0; b < batch; ++b) {
          const Index stop_step = schema.feature(0).shift + static_cast<Index>(lengths[b]);
          if (stop_step < steps) expected[((b * (steps - 1)) + stop_step - 1) * num_features] = 1;
        }
      }
      EXPECT_TRUE(test::bitwise_equal(test::gather(loss_mask.view()), expected));
    }
  }
}

TEST(SpadeTraining, NextStepViewsAreInputsZeroToTMinusTwoAndTargetsOneToTMinusOne) {
  Tensor<std::int64_t, 3> delayed({2, 5, 3});
  for (Index i = 0; i < delayed.numel(); ++i) delayed.data()[i] = i;
  const auto next = spade_next_step<std::int64_t>(delayed);
  ASSERT_EQ(next.inputs.size(1), 4);
  ASSERT_EQ(next.targets.size(1), 4);
  for (Index b = 0; b < 2; ++b)
    for (Index t = 0; t < 4; ++t)
      for (Index c = 0; c < 3; ++c) {
        EXPECT_EQ(&next.inputs(b, t, c), &delayed(b, t, c));
        EXPECT_EQ(&next.targets(b, t, c), &delayed(b, t + 1, c));
      }
}

// ---------------------------------------------------------------------------------------------
// The embedding.

struct ModelOptions {
  bool layer_norm = false;
  bool sum = false;
  Index condition_dim = 0;
  Index d_model = 48;
  bool pad_vector = false;
};

// Random options: LayerNorm, sum or concat, condition size, d_model among `d_models`, pad vector.
ModelOptions random_options(RandomSource& random, std::initializer_list<Index> d_models) {
  ModelOptions options;
  options.layer_norm = random.chance(0.5);
  options.sum = random.chance(0.25);
  options.condition_dim = options.sum ? 0 : random.pick({0, 0, 1, 5});
  options.d_model = random.pick(d_models);
  options.pad_vector = random.chance(0.5);
  return options;
}

// Random weights for `schema`, as float arrays the embedding reads and as the same numbers in
// the double reference model.
class RandomModel {
 public:
  RandomModel(RandomSource& random, const SpadeSchema& schema, const ModelOptions& options) {
    reference.features = reference_features(schema);
    reference.sum = options.sum;
    reference.d_model = options.d_model;
    reference.condition_dim = options.sum ? 0 : options.condition_dim;
    weights.combine = options.sum ? SpadeCombine::sum : SpadeCombine::concat;
    weights.condition_dim = reference.condition_dim;
    Index concat_width = 0;
    for (SpadeReferenceFeature& feature : reference.features) {
      SpadeFeatureWeights feature_weights;
      feature.width = options.sum ? options.d_model : random.integer(1, 21);
      concat_width += feature.width;
      if (feature.discrete) {
        feature_weights.table =
            matrix(random, feature.table, feature.vocab_size, feature.width, 1.0);
        if (options.layer_norm) {
          feature_weights.norm_weight =
              vector(random, feature.norm_weight, feature.width, 1.0, 1.0);
          feature_weights.norm_bias = vector(random, feature.norm_bias, feature.width, 0.0, 0.5);
        }
      } else {
        feature.hidden = random.integer(1, 19);
        feature_weights.hidden_weight =
            matrix(random, feature.hidden_weight, feature.hidden, 1, 1.0);
        feature_weights.hidden_bias = vector(random, feature.hidden_bias, feature.hidden, 0.0, 0.5);
        feature_weights.output_weight =
            matrix(random, feature.output_weight, feature.width, feature.hidden, 0.3);
        feature_weights.output_bias = vector(random, feature.output_bias, feature.width, 0.0, 0.5);
      }
      weights.features.push_back(feature_weights);
    }
    if (!options.sum) {
      weights.projection_weight = matrix(random, reference.projection_weight, options.d_model,
                                         concat_width + reference.condition_dim, 0.2);
      weights.projection_bias =
          vector(random, reference.projection_bias, options.d_model, 0.0, 0.5);
    }
    if (options.pad_vector)
      weights.pad_vector = vector(random, reference.pad_vector, options.d_model, 0.0, 1.0);
  }

  reference::SpadeReferenceModel reference;
  SpadeEmbeddingWeights weights;

 private:
  // N(mean, stddev^2) numbers rounded to float: kept as doubles in `values`, as floats here.
  const float* store(RandomSource& random, std::vector<double>& values, Index count, double mean,
                     double stddev) {
    values = test::round_to<float>(random.normal(static_cast<std::size_t>(count), mean, stddev));
    storage_.push_back(test::convert<float>(values));
    return storage_.back().data();
  }
  TensorView<const float, 2> matrix(RandomSource& random, std::vector<double>& values, Index rows,
                                    Index columns, double stddev) {
    return {store(random, values, rows * columns, 0.0, stddev), {rows, columns}};
  }
  TensorView<const float, 1> vector(RandomSource& random, std::vector<double>& values, Index count,
                                    double mean, double stddev) {
    return {store(random, values, count, mean, stddev), {count}};
  }

  std::vector<std::vector<float>> storage_;
};

// Delayed tokens [B, T, F] as an embedding sees them: delay of random tokens with random lengths.
std::vector<double> delayed_tokens(RandomSource& random, const SpadeSchema& schema, Index batch,
                                   Index n) {
  const auto tokens = random_tokens(random, schema, batch, n, false);
  const DelayCase delay(schema, batch, n, tokens, random_lengths(random, batch, n),
                        Layout::kContiguous, 0);
  delay.run();
  return delay.delayed_tokens();
}

// forward on strided buffers of `tokens` [B, T, F]; returns out as doubles.
std::vector<double> run_forward(const SpadeEmbedding& embedding, const std::vector<double>& tokens,
                                const std::vector<double>& condition, Index batch, Index steps,
                                Layout layout, int num_threads = 0,
                                bool broadcast_condition = false) {
  const SpadeSchema& schema = embedding.schema();
  const SplitTokens split = split_tokens(schema, tokens);
  const StridedBuffer<std::int64_t, 3> ids(split.ids, {batch, steps, schema.num_discrete()}, layout,
                                           0);
  const StridedBuffer<float, 3> values(split.values, {batch, steps, schema.num_continuous()},
                                       layout, 0);
  const Index condition_dim = embedding.condition_dim();
  const StridedBuffer<float, 3> condition_buffer(
      condition, {batch, broadcast_condition ? 1 : steps, condition_dim}, Layout::kContiguous, 0);
  TensorView<const float, 3> condition_view;
  if (condition_dim > 0) {
    condition_view = condition_buffer.const_view();
    if (broadcast_condition) {  // one vector per sequence: stride 0 over T
      condition_view =
          TensorView<const float, 3>(condition_view.data(), {batch, steps, condition_dim},
                                     {condition_view.stride(0), 0, condition_view.stride(2)});
    }
  }
  StridedBuffer<float, 3> out({batch, steps, embedding.d_model()}, layout,
                              std::numeric_limits<float>::quiet_NaN());
  embedding.forward(ids.const_view(), values.const_view(), out.view(), condition_view, num_threads);
  EXPECT_TRUE(out.outside_untouched());
  return test::gather(out.view());
}

TEST(SpadeEmbedding, MatchesTheReference) {
  RandomSource random(kSeed + 7);
  for (int trial = 0; trial < 40; ++trial) {
    const ModelOptions options = random_options(random, {1, 7, 16, 37, 64, 131, 256});
    const bool broadcast = random.chance(0.5);
    const SpadeSchema schema = random_schema(random, 5, false);
    const Index batch = random.pick({1, 2, 3}), n = random.pick({1, 3, 8, 19});
    const Index steps = n + schema.max_shift();
    const Layout layout = random.pick(kRowLayouts);
    SCOPED_TRACE(test::describe("seed=", kSeed + 7, " trial=", trial,
                                " layer_norm=", options.layer_norm, " sum=", options.sum,
                                " C=", options.condition_dim, " d_model=", options.d_model,
                                " broadcast=", broadcast, " layout=", test::layout_name(layout)));
    const RandomModel model(random, schema, options);
    const SpadeEmbedding embedding(schema, model.weights);
    const auto tokens = delayed_tokens(random, schema, batch, n);
    const auto condition = test::round_to<float>(random.normal(
        static_cast<std::size_t>(batch * (broadcast ? 1 : steps) * options.condition_dim)));
    std::vector<double> expanded;  // [B, T, C] for the reference
    for (Index b = 0; b < batch; ++b)
      for (Index t = 0; t < steps; ++t)
        for (Index c = 0; c < options.condition_dim; ++c)
          expanded.push_back(
              condition[((broadcast ? b : b * steps + t)) * options.condition_dim + c]);
    std::vector<double> expected;
    reference::spade_embedding_reference(model.reference, batch, steps, tokens, expanded, expected);
    const auto got = run_forward(embedding, tokens, condition, batch, steps, layout, 0, broadcast);
    // float32 rounding of a sum of a few dozen terms plus the polynomial exp of SiLU.
    EXPECT_TRUE(test::matches_reference(got, expected, 3e-6));
  }
}

TEST(SpadeEmbedding, PadStepsGiveThePadVector) {
  RandomSource random(kSeed + 8);
  const SpadeSchema schema({SpadeFeature::binned("z", 4), SpadeFeature::continuous("E")});
  ModelOptions options;
  options.pad_vector = true;
  const RandomModel model(random, schema, options);
  const SpadeEmbedding embedding(schema, model.weights);
  const std::vector<double> tokens = {0, 1.5, 0, -2.0};  // two PAD steps, energies ignored
  const auto got = run_forward(embedding, tokens, {}, 1, 2, Layout::kContiguous);
  for (Index t = 0; t < 2; ++t)
    for (Index o = 0; o < options.d_model; ++o)
      EXPECT_EQ(got[t * options.d_model + o], static_cast<float>(model.reference.pad_vector[o]));
}

TEST(SpadeEmbedding, IdenticalForOneTwoAndThreeThreads) {
  RandomSource random(kSeed + 9);
  const SpadeSchema schema({SpadeFeature::binned("z", 30), SpadeFeature::binned("x", 30),
                            SpadeFeature::binned("y", 30), SpadeFeature::continuous("E")});
  ModelOptions options;
  options.d_model = 100;
  options.condition_dim = 3;
  const RandomModel model(random, schema, options);
  const SpadeEmbedding embedding(schema, model.weights);
  const Index batch = 3, n = 97, steps = n + schema.max_shift();
  const auto tokens = delayed_tokens(random, schema, batch, n);
  const auto condition = test::round_to<float>(random.normal(batch * steps * 3));
  const auto single =
      run_forward(embedding, tokens, condition, batch, steps, Layout::kContiguous, 1);
  for (int threads : {2, 3})
    EXPECT_TRUE(test::bitwise_equal(
        run_forward(embedding, tokens, condition, batch, steps, Layout::kContiguous, threads),
        single))
        << threads << " threads";
}

// ---------------------------------------------------------------------------------------------
// The embedding's backward.

// Gradient buffers for every weight of `weights` (NaN filled), their views, and the gradients
// read back as doubles in the reference's layouts.
class GradientBuffers {
 public:
  GradientBuffers(const SpadeEmbeddingWeights& weights, Index condition_size) {
    for (const SpadeFeatureWeights& w : weights.features) {
      SpadeFeatureGradients g;
      g.table = like(w.table);
      g.norm_weight = like(w.norm_weight);
      g.norm_bias = like(w.norm_bias);
      g.hidden_weight = like(w.hidden_weight);
      g.hidden_bias = like(w.hidden_bias);
      g.output_weight = like(w.output_weight);
      g.output_bias = like(w.output_bias);
      views.features.push_back(g);
    }
    views.projection_weight = like(weights.projection_weight);
    views.projection_bias = like(weights.projection_bias);
    condition_ = std::vector<float>(static_cast<std::size_t>(condition_size), kUnwritten);
  }

  // Every buffer as one vector per gradient, in a fixed order.
  std::vector<std::vector<double>> all() const {
    std::vector<std::vector<double>> out;
    for (const auto& buffer : storage_) out.emplace_back(buffer.begin(), buffer.end());
    out.emplace_back(condition_.begin(), condition_.end());
    return out;
  }

  static constexpr float kUnwritten = 7.0f;
  SpadeEmbeddingGradients views;
  std::vector<float> condition_;

 private:
  template <int Rank>
  TensorView<float, Rank> like(const TensorView<const float, Rank>& weight) {
    if (weight.is_null()) return {};
    storage_.emplace_back(static_cast<std::size_t>(weight.numel()), kUnwritten);
    typename TensorView<float, Rank>::Shape shape;
    for (int dim = 0; dim < Rank; ++dim) shape[static_cast<std::size_t>(dim)] = weight.size(dim);
    return TensorView<float, Rank>(storage_.back().data(), shape);
  }
  std::vector<std::vector<float>> storage_;
};

// The reference's gradients in GradientBuffers::all()'s order.
std::vector<std::vector<double>> reference_order(const SpadeEmbeddingWeights& weights,
                                                 const reference::SpadeReferenceGradients& grads) {
  std::vector<std::vector<double>> out;
  for (std::size_t f = 0; f < weights.features.size(); ++f) {
    const SpadeFeatureWeights& w = weights.features[f];
    const reference::SpadeReferenceFeatureGradients& g = grads.features[f];
    for (const auto& [weight_given, values] : {std::pair{!w.table.is_null(), &g.table},
                                               {!w.norm_weight.is_null(), &g.norm_weight},
                                               {!w.norm_bias.is_null(), &g.norm_bias},
                                               {!w.hidden_weight.is_null(), &g.hidden_weight},
                                               {!w.hidden_bias.is_null(), &g.hidden_bias},
                                               {!w.output_weight.is_null(), &g.output_weight},
                                               {!w.output_bias.is_null(), &g.output_bias}})
      if (weight_given) out.push_back(*values);
  }
  if (!weights.projection_weight.is_null()) out.push_back(grads.projection_weight);
  if (!weights.projection_bias.is_null()) out.push_back(grads.projection_bias);
  out.push_back(grads.condition);
  return out;
}

// spade_embedding_backward on strided buffers of `tokens` [B, T, F] and `grad_out`; returns the
// gradients in GradientBuffers::all()'s order.
std::vector<std::vector<double>> run_backward(const SpadeSchema& schema,
                                              const SpadeEmbeddingWeights& weights,
                                              const std::vector<double>& tokens,
                                              const std::vector<double>& condition,
                                              const std::vector<double>& grad_out, Index batch,
                                              Index steps, Index d_model, Layout layout,
                                              int num_threads = 0) {
  const SplitTokens split = split_tokens(schema, tokens);
  const StridedBuffer<std::int64_t, 3> ids(split.ids, {batch, steps, schema.num_discrete()}, layout,
                                           0);
  const StridedBuffer<float, 3> values(split.values, {batch, steps, schema.num_continuous()},
                                       layout, 0);
  const Index condition_dim = weights.condition_dim;
  const StridedBuffer<float, 3> condition_buffer(condition, {batch, steps, condition_dim}, layout,
                                                 0);
  const StridedBuffer<float, 3> grad(grad_out, {batch, steps, d_model}, layout, 0);
  GradientBuffers buffers(weights, batch * steps * condition_dim);
  TensorView<const float, 3> condition_view;
  if (condition_dim > 0) {
    condition_view = condition_buffer.const_view();
    buffers.views.condition =
        TensorView<float, 3>(buffers.condition_.data(), {batch, steps, condition_dim});
  }
  spade_embedding_backward(schema, weights, ids.const_view(), values.const_view(), condition_view,
                           grad.const_view(), buffers.views, num_threads);
  return buffers.all();
}

TEST(SpadeEmbeddingBackward, MatchesTheReference) {
  RandomSource random(kSeed + 31);
  for (int trial = 0; trial < 40; ++trial) {
    const ModelOptions options = random_options(random, {1, 7, 16, 37, 64, 131});
    const SpadeSchema schema = random_schema(random, 5, false);
    const Index batch = random.pick({1, 2, 3}), n = random.pick({1, 3, 8, 19});
    const Index steps = n + schema.max_shift();
    const Layout layout = random.pick(kRowLayouts);
    SCOPED_TRACE(test::describe("seed=", kSeed + 31, " trial=", trial,
                                " layer_norm=", options.layer_norm, " sum=", options.sum,
                                " C=", options.condition_dim, " d_model=", options.d_model,
                                " layout=", test::layout_name(layout)));
    const RandomModel model(random, schema, options);
    const auto tokens = delayed_tokens(random, schema, batch, n);
    const auto condition = test::round_to<float>(
        random.normal(static_cast<std::size_t>(batch * steps * options.condition_dim)));
    const auto grad_out = test::round_to<float>(
        random.normal(static_cast<std::size_t>(batch * steps * options.d_model)));
    const auto expected = reference_order(
        model.weights, reference::spade_embedding_backward_reference(model.reference, batch, steps,
                                                                     tokens, condition, grad_out));
    const auto got = run_backward(schema, model.weights, tokens, condition, grad_out, batch, steps,
                                  options.d_model, layout);
    ASSERT_EQ(got.size(), expected.size());
    for (std::size_t i = 0; i < got.size(); ++i)
      // float32 sums over at most a few hundred steps; the SiLU's polynomial exp.
      EXPECT_TRUE(test::matches_reference(got[i], expected[i], 2e-5)) << "gradient " << i;
  }
}

TEST(SpadeEmbeddingBackward, IdenticalForOneTwoAndThreeThreads) {
  RandomSource random(kSeed + 32);
  const SpadeSchema schema({SpadeFeature::binned("z", 30), SpadeFeature::binned("x", 30),
                            SpadeFeature::binned("y", 30), SpadeFeature::continuous("E")});
  ModelOptions options;
  options.d_model = 101;
  options.condition_dim = 3;
  options.layer_norm = true;
  const RandomModel model(random, schema, options);
  const Index batch = 3, n = 97, steps = n + schema.max_shift();
  const auto tokens = delayed_tokens(random, schema, batch, n);
  const auto condition = test::round_to<float>(random.normal(batch * steps * 3));
  const auto grad_out = test::round_to<float>(random.normal(batch * steps * options.d_model));
  const auto single = run_backward(schema, model.weights, tokens, condition, grad_out, batch, steps,
                                   options.d_model, Layout::kContiguous, 1);
  for (int threads : {2, 3}) {
    const auto got = run_backward(schema, model.weights, tokens, condition, grad_out, batch, steps,
                                  options.d_model, Layout::kContiguous, threads);
    for (std::size_t i = 0; i < got.size(); ++i)
      EXPECT_TRUE(test::bitwise_equal(got[i], single[i])) << threads << " threads, gradient " << i;
  }
}

TEST(SpadeEmbeddingBackward, PadStepsGiveNoGradient) {
  RandomSource random(kSeed + 33);
  const SpadeSchema schema({SpadeFeature::binned("z", 4), SpadeFeature::continuous("E")});
  ModelOptions options;
  const RandomModel model(random, schema, options);
  const std::vector<double> tokens = {0, 1.5, 0, -2.0};  // two PAD steps
  const std::vector<double> grad_out(2 * options.d_model, 1.0);
  for (const auto& gradient : run_backward(schema, model.weights, tokens, {}, grad_out, 1, 2,
                                           options.d_model, Layout::kContiguous))
    for (double value : gradient) EXPECT_EQ(value, 0.0);
}

// ---------------------------------------------------------------------------------------------
// Generation.

// Replays delayed sequences through the decoder, the model's predictions being the next step
// where it holds data or the stop, and garbage (which the decoder must override) elsewhere.
TEST(SpadeDecoder, ReplaysOneThousandRandomSequencesExactly) {
  RandomSource random(kSeed + 10);
  constexpr Index kBatch = 8;
  Index replayed = 0;
  for (int trial = 0; replayed < 1000; ++trial) {
    const SpadeSchema schema = random_schema(random, 5, true);
    const Index n = random.integer(0, 12), num_features = schema.num_features();
    SCOPED_TRACE(
        test::describe("seed=", kSeed + 10, " trial=", trial, " n=", n, " F=", num_features));
    const auto tokens = random_tokens(random, schema, kBatch, n, true);
    const auto lengths = random_lengths(random, kBatch, n);
    const DelayCase delay(schema, kBatch, n, tokens, lengths, Layout::kContiguous, 0);
    delay.run();
    const auto delayed = delay.delayed_tokens();
    const Index steps = delay.steps, max_shift = schema.max_shift(),
                first_shift = schema.feature(0).shift;
    const auto garbage = random_tokens(random, schema, kBatch, steps + 2, false);

    SpadeDecoder decoder(schema, kBatch, n);
    Tensor<std::int64_t, 2> predicted_ids({kBatch, schema.num_discrete()}),
        step_ids({kBatch, schema.num_discrete()});
    Tensor<float, 2> predicted_values({kBatch, schema.num_continuous()}),
        step_values({kBatch, schema.num_continuous()});
    Tensor<std::int64_t, 1> completed({kBatch});
    Index step = 0;
    while (!decoder.done()) {
      ++step;
      ASSERT_LE(step, steps + 1) << "the decoder never finished";
      std::vector<double> fed, expected_step;
      for (Index b = 0; b < kBatch; ++b) {
        const Index length = static_cast<Index>(lengths[b]);
        for (Index f = 0; f < num_features; ++f) {
          const Index at = (b * steps + step) * num_features + f;
          const bool data = step < steps && delay.mask.view()(b, step, f) != 0;
          const bool stop = f == 0 && step == first_shift + length && step < steps;
          const double value =
              data || stop ? delayed[at] : garbage[(b * (steps + 2) + step) * num_features + f];
          const SpadeFeature& feature = schema.feature(f);
          if (feature.kind == SpadeFeatureKind::discrete) {
            predicted_ids(b, schema.column(f)) = static_cast<std::int64_t>(value);
          } else {
            predicted_values(b, schema.column(f)) = static_cast<float>(value);
          }
          const double pad = feature.kind == SpadeFeatureKind::discrete ? feature.pad_id : 0.0;
          expected_step.push_back(step < steps ? delayed[at] : pad);
        }
      }
      decoder.step(predicted_ids, predicted_values, step_ids, step_values, completed);
      ASSERT_TRUE(test::bitwise_equal(
          delay.join(test::gather(step_ids.view()), test::gather(step_values.view())),
          expected_step))
          << "step " << step;
      for (Index b = 0; b < kBatch; ++b) {
        const Index length = static_cast<Index>(lengths[b]);
        const Index token = step - max_shift;
        EXPECT_EQ(completed(b), token >= 0 && token < length ? token : -1)
            << "b=" << b << " step " << step;
        const bool finished = step >= std::max(length + max_shift - 1, first_shift + length);
        EXPECT_EQ(decoder.finished(b), finished) << "b=" << b << " step " << step;
      }
    }
    for (Index b = 0; b < kBatch; ++b) EXPECT_EQ(decoder.length(b), static_cast<Index>(lengths[b]));
    std::vector<double> expected = tokens;  // PAD / 0 past each sequence's end
    for (Index b = 0; b < kBatch; ++b)
      for (Index i = static_cast<Index>(lengths[b]); i < n; ++i)
        for (Index f = 0; f < num_features; ++f) {
          const SpadeFeature& feature = schema.feature(f);
          expected[(b * n + i) * num_features + f] =
              feature.kind == SpadeFeatureKind::discrete ? feature.pad_id : 0.0;
        }
    EXPECT_TRUE(test::bitwise_equal(
        delay.join(test::gather(decoder.ids()), test::gather(decoder.values())), expected));
    replayed += kBatch;
  }
}

TEST(SpadeDecoder, StopsAtMaxTokensAndForcesMissingBeforeAStreamStarts) {
  const SpadeSchema schema({SpadeFeature::binned("z", 3), SpadeFeature::binned("x", 3, 3)});
  SpadeDecoder decoder(schema, 1, 2);
  Tensor<std::int64_t, 2> predicted({1, 2}), step_ids({1, 2});
  Tensor<std::int64_t, 1> completed({1});
  const std::vector<std::vector<std::int64_t>> expected = {
      {1, 4}, {2, 4}, {4, 1}, {4, 2}};  // z: 1 2 stop; x waits until step 3
  for (std::size_t step = 0; step < expected.size(); ++step) {
    predicted(0, 0) = predicted(0, 1) = static_cast<std::int64_t>(step) % 2 + 1;
    decoder.step(predicted, {}, step_ids, {}, completed);
    EXPECT_EQ(step_ids(0, 0), expected[step][0]) << "step " << step + 1;
    EXPECT_EQ(step_ids(0, 1), expected[step][1]) << "step " << step + 1;
  }
  EXPECT_EQ(decoder.length(0), 2);
  EXPECT_TRUE(decoder.done());
  EXPECT_EQ(completed(0), 1);
}

TEST(SpadeDecoder, RejectsAContinuousFirstFeatureAndBadPredictions) {
  EXPECT_TRUE(test::throws_error_with(
      [] { SpadeDecoder(SpadeSchema({SpadeFeature::continuous("E")}), 1, 4); },
      {"first feature (lowest shift) must be discrete", "\"E\""}));
  const SpadeSchema schema({SpadeFeature::binned("z", 3), SpadeFeature::continuous("E")});
  SpadeDecoder decoder(schema, 2, 4);
  Tensor<std::int64_t, 2> predicted_ids({2, 1}), step_ids({2, 1});
  Tensor<float, 2> predicted_values({2, 1}), step_values({2, 1});
  predicted_ids(1, 0) = 9;
  EXPECT_TRUE(test::throws_error_with(
      [&] { decoder.step(predicted_ids, predicted_values, step_ids, step_values); },
      {"SpadeDecoder.step: ids[1, 0, 0] (feature \"z\", sequence 1, position 0)", "[0, 5)",
       "got 9"}));
  predicted_ids(1, 0) = 1;
  predicted_values(0, 0) = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(test::throws_error_with(
      [&] { decoder.step(predicted_ids, predicted_values, step_ids, step_values); },
      {"values[0, 0, 0] (feature \"E\", sequence 0", "must be finite, got nan"}));
  EXPECT_EQ(decoder.current_step(), 0);
}

// ---------------------------------------------------------------------------------------------
// Rejected input: the message names the argument (feature, position) and outputs keep their fill.

class SpadeErrors : public ::testing::Test {
 protected:
  static constexpr Index kBatch = 2, kLength = 5;
  static constexpr double kFill = 99;

  SpadeErrors()
      : schema({SpadeFeature::binned("z", 30), SpadeFeature::binned("x", 30),
                SpadeFeature::binned("y", 30), SpadeFeature::continuous("energy")}),
        random(kSeed + 11),
        tokens(random_tokens(random, schema, kBatch, kLength, false)),
        lengths{kLength, 3} {}

  // Runs spade_delay on `tokens` and `lengths` (after the test changed them).
  ::testing::AssertionResult delay_rejected(std::initializer_list<std::string> pieces,
                                            Index ids_columns = 3) {
    DelayCase delay(schema, kBatch, kLength, tokens, lengths, Layout::kContiguous, kFill);
    auto ids = delay.ids.const_view();
    if (ids_columns != 3)
      ids = TensorView<const std::int64_t, 3>(ids.data(), {kBatch, kLength, ids_columns});
    const auto result = test::throws_error_with(
        [&] {
          spade_delay(schema, ids, delay.values.const_view(), delay.lengths_buffer.const_view(),
                      delay.delayed_ids.view(), delay.delayed_values.view(), delay.mask.view());
        },
        pieces);
    if (!result) return result;
    for (double value : delay.delayed_tokens())
      if (value != kFill) return ::testing::AssertionFailure() << "delayed output was written";
    for (double value : test::gather(delay.mask.view()))
      if (value != kFill) return ::testing::AssertionFailure() << "mask was written";
    return result;
  }

  void set_token(Index b, Index i, Index f, double value) {
    tokens[(b * kLength + i) * schema.num_features() + f] = value;
  }

  SpadeSchema schema;
  RandomSource random;
  std::vector<double> tokens;
  std::vector<double> lengths;
};

TEST_F(SpadeErrors, IdsOutsideTheVocabulary) {
  set_token(1, 2, 1, 32);
  EXPECT_TRUE(
      delay_rejected({"spade_delay: ids[1, 2, 1] (feature \"x\", sequence 1, position 2) must be "
                      "in [0, 32), got 32"}));
  set_token(1, 2, 1, -1);
  EXPECT_TRUE(delay_rejected({"feature \"x\", sequence 1, position 2", "got -1"}));
}

TEST_F(SpadeErrors, PositionsPastTheLengthAreNotRead) {
  set_token(1, 4, 0, 1000);  // sequence 1 has length 3
  DelayCase delay(schema, kBatch, kLength, tokens, lengths, Layout::kContiguous, kFill);
  EXPECT_NO_THROW(delay.run());
}

TEST_F(SpadeErrors, NanEnergies) {
  set_token(0, 4, 3, std::numeric_limits<double>::quiet_NaN());
  EXPECT_TRUE(delay_rejected(
      {"values[0, 4, 0] (feature \"energy\", sequence 0, position 4) must be finite, got nan"}));
}

TEST_F(SpadeErrors, WrongNumberOfFeatures) {
  EXPECT_TRUE(delay_rejected(
      {"spade_delay: ids.shape[2] must equal number of discrete features (Fd) = 3, got 2"}, 2));
}

TEST_F(SpadeErrors, LengthsLongerThanTheSequence) {
  lengths[1] = kLength + 1;
  EXPECT_TRUE(delay_rejected({"spade_delay: lengths[1] must be in [0, n = 5], got 6"}));
}

TEST_F(SpadeErrors, EmbeddingRejectsBadTokensWithoutWriting) {
  ModelOptions options;
  const RandomModel model(random, schema, options);
  const SpadeEmbedding embedding(schema, model.weights);
  const Index steps = 4;
  std::vector<double> step_tokens(static_cast<std::size_t>(kBatch * steps * 4), 1.0);
  const auto expect_rejected = [&](std::initializer_list<std::string> pieces) {
    const SplitTokens split = split_tokens(schema, step_tokens);
    const StridedBuffer<std::int64_t, 3> ids(split.ids, {kBatch, steps, 3}, Layout::kContiguous, 0);
    const StridedBuffer<float, 3> values(split.values, {kBatch, steps, 1}, Layout::kContiguous, 0);
    StridedBuffer<float, 3> out({kBatch, steps, options.d_model}, Layout::kContiguous, 7.0f);
    EXPECT_TRUE(test::throws_error_with(
        [&] { embedding.forward(ids.const_view(), values.const_view(), out.view()); }, pieces));
    for (double value : test::gather(out.view())) ASSERT_EQ(value, 7.0) << "out was written";
  };
  step_tokens[(1 * steps + 3) * 4 + 2] = 40;
  expect_rejected({"SpadeEmbedding.forward: ids[1, 3, 2] (feature \"y\", sequence 1, position 3)",
                   "must be in [0, 32), got 40"});
  step_tokens[(1 * steps + 3) * 4 + 2] = 1;
  step_tokens[(0 * steps + 1) * 4 + 3] = std::numeric_limits<double>::infinity();
  expect_rejected({"values[0, 1, 0] (feature \"energy\", sequence 0, position 1) must be finite"});
}

TEST_F(SpadeErrors, EmbeddingRejectsWeightsOfTheWrongShape) {
  ModelOptions options;
  RandomModel model(random, schema, options);
  auto weights = model.weights;
  weights.features[1].table = TensorView<const float, 2>(weights.features[1].table.data(), {31, 1});
  EXPECT_TRUE(test::throws_error_with(
      [&] { SpadeEmbedding(schema, weights); },
      {"features[1].table (feature \"x\").shape[0] must equal vocab_size = 32, got 31"}));
  weights = model.weights;
  weights.projection_weight = TensorView<const float, 2>(
      weights.projection_weight.data(), {options.d_model, weights.projection_weight.size(1) - 1});
  EXPECT_TRUE(
      test::throws_error_with([&] { SpadeEmbedding(schema, weights); },
                              {"projection_weight.shape[1] must equal sum of feature widths"}));
  weights = model.weights;
  weights.features.pop_back();
  EXPECT_TRUE(test::throws_error_with([&] { SpadeEmbedding(schema, weights); },
                                      {"one entry per schema feature (4), got 3"}));
}

TEST_F(SpadeErrors, BackwardRejectsBadInputsWithoutWriting) {
  ModelOptions options;
  options.layer_norm = true;
  const RandomModel model(random, schema, options);
  const Index steps = 4;
  std::vector<double> step_tokens(static_cast<std::size_t>(kBatch * steps * 4), 1.0);
  const auto expect_rejected = [&](std::initializer_list<std::string> pieces, Index d_model,
                                   const auto& edit) {
    const SplitTokens split = split_tokens(schema, step_tokens);
    const StridedBuffer<std::int64_t, 3> ids(split.ids, {kBatch, steps, 3}, Layout::kContiguous, 0);
    const StridedBuffer<float, 3> values(split.values, {kBatch, steps, 1}, Layout::kContiguous, 0);
    const StridedBuffer<float, 3> grad({kBatch, steps, d_model}, Layout::kContiguous, 1.0f);
    GradientBuffers buffers(model.weights, 0);
    edit(buffers.views);
    EXPECT_TRUE(test::throws_error_with(
        [&] {
          spade_embedding_backward(schema, model.weights, ids.const_view(), values.const_view(), {},
                                   grad.const_view(), buffers.views);
        },
        pieces));
    for (const auto& gradient : buffers.all())
      for (double value : gradient) ASSERT_EQ(value, GradientBuffers::kUnwritten);
  };
  const auto keep = [](SpadeEmbeddingGradients&) {};
  step_tokens[(1 * steps + 3) * 4 + 2] = 40;
  expect_rejected({"spade_embedding_backward: ids[1, 3, 2] (feature \"y\", sequence 1, "
                   "position 3)",
                   "must be in [0, 32), got 40"},
                  options.d_model, keep);
  step_tokens[(1 * steps + 3) * 4 + 2] = 1;
  step_tokens[(0 * steps + 1) * 4 + 3] = std::numeric_limits<double>::quiet_NaN();
  expect_rejected({"values[0, 1, 0] (feature \"energy\", sequence 0, position 1) must be finite"},
                  options.d_model, keep);
  step_tokens[(0 * steps + 1) * 4 + 3] = 0.5;
  expect_rejected({"spade_embedding_backward: grad_out.shape[2] must equal d_model = 48, got 47"},
                  options.d_model - 1, keep);
  expect_rejected({"gradients.features[0].table (feature \"z\").shape[0] must be 32"},
                  options.d_model, [](SpadeEmbeddingGradients& g) {
                    g.features[0].table = TensorView<float, 2>(g.features[0].table.data(),
                                                               {31, g.features[0].table.size(1)});
                  });
  expect_rejected({"gradients.features[3].table (feature \"energy\") is given but its weight is "
                   "not"},
                  options.d_model,
                  [](SpadeEmbeddingGradients& g) { g.features[3].table = g.features[0].table; });
}

}  // namespace
}  // namespace foveal
