// libFuzzer harness: SPADE schemas from drawn features (names, kinds, vocabularies, PAD and
// MISSING ids, shifts), then delay / undelay / loss masks over drawn tensors and a decoder
// stepped with drawn predictions.
#include <optional>
#include <string>

#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

std::optional<foveal::SpadeSchema> draw_schema(FuzzedDataProvider& data) {
  std::vector<foveal::SpadeFeature> features;
  for (int f = data.ConsumeIntegralInRange<int>(0, 4); f > 0; --f) {
    foveal::SpadeFeature feature;
    feature.name = std::string(1, static_cast<char>('a' + data.ConsumeIntegralInRange<int>(0, 4)));
    feature.kind = data.ConsumeBool() ? foveal::SpadeFeatureKind::discrete
                                      : foveal::SpadeFeatureKind::continuous;
    feature.vocab_size = draw_index_option(data);
    feature.pad_id = draw_index_option(data);
    feature.missing_id = draw_index_option(data);
    // shift 0 means "the default"; mixing defaults and explicit shifts is a known finding
    // (harden: SPADE shift=0), so explicit shifts are drawn only without defaults.
    feature.shift = data.ConsumeBool() ? 0 : draw_index_option(data);
    features.push_back(feature);
  }
  bool any_default = false, any_explicit = false;
  for (const auto& feature : features) (feature.shift == 0 ? any_default : any_explicit) = true;
  if (any_default && any_explicit)
    for (auto& feature : features) feature.shift = 0;
  try {
    return foveal::SpadeSchema(features);
  } catch (const foveal::Error&) {
    return std::nullopt;
  }
}

void run(FuzzedDataProvider& data) {
  const std::optional<foveal::SpadeSchema> schema = draw_schema(data);
  if (!schema) return;
  if (schema->max_shift() > 64) return;  // long delayed streams: legitimately large, not drawn
  Arena<std::int64_t> ids_arena(data, 2);
  Arena<float> value_arena(data, 2);
  Arena<std::uint8_t> mask_arena(data, 1);
  for (auto& buffer : ids_arena.buffers)
    for (auto& id : buffer) id = data.ConsumeIntegralInRange<int>(0, 7) == 0 ? -1 : id & 3;
  const Index batch = draw_extent(data, 2), length = draw_extent(data, 5);
  const Index fd = schema->num_discrete(), fc = schema->num_continuous();
  const Index steps = length + schema->max_shift(), features = schema->num_features();
  const int threads = draw_threads(data);
  Expect expect;
  switch (data.ConsumeIntegralInRange<int>(0, 3)) {
    case 0: {
      auto ids =
          draw_view<const std::int64_t, std::int64_t, 3>(data, ids_arena, {batch, length, fd});
      auto values = draw_view<const float, float, 3>(data, value_arena, {batch, length, fc});
      auto delayed_ids =
          draw_view<std::int64_t, std::int64_t, 3>(data, ids_arena, {batch, steps, fd}, true);
      auto delayed_values = draw_view<float, float, 3>(data, value_arena, {batch, steps, fc}, true);
      auto mask = draw_view<std::uint8_t, std::uint8_t, 3>(data, mask_arena,
                                                           {batch, steps, features}, true);
      DrawnView<const std::int64_t, 1> lengths;
      if (data.ConsumeBool())
        lengths = draw_view<const std::int64_t, std::int64_t, 1>(data, ids_arena, {batch});
      expect.add(ids), expect.add(values), expect.add(delayed_ids), expect.add(delayed_values);
      expect.add(mask), expect.add(lengths);
      if (expect.unusable) return;
      run_call(expect, "spade_delay", [&] {
        foveal::spade_delay(*schema, ids.view, values.view, lengths.view, delayed_ids.view,
                            delayed_values.view, mask.view, threads);
      });
      break;
    }
    case 1: {
      const Index n = steps - schema->max_shift() - data.ConsumeIntegralInRange<int>(0, 1);
      auto delayed_ids =
          draw_view<const std::int64_t, std::int64_t, 3>(data, ids_arena, {batch, steps, fd});
      auto delayed_values = draw_view<const float, float, 3>(data, value_arena, {batch, steps, fc});
      auto ids = draw_view<std::int64_t, std::int64_t, 3>(data, ids_arena, {batch, n, fd}, true);
      auto values = draw_view<float, float, 3>(data, value_arena, {batch, n, fc}, true);
      expect.add(delayed_ids), expect.add(delayed_values), expect.add(ids), expect.add(values);
      if (expect.unusable) return;
      run_call(expect, "spade_undelay", [&] {
        foveal::spade_undelay(*schema, delayed_ids.view, delayed_values.view, ids.view, values.view,
                              threads);
      });
      break;
    }
    case 2: {
      auto lengths = draw_view<const std::int64_t, std::int64_t, 1>(data, ids_arena, {batch});
      auto mask = draw_view<std::uint8_t, std::uint8_t, 3>(data, mask_arena,
                                                           {batch, steps, features}, true);
      expect.add(lengths), expect.add(mask);
      if (expect.unusable) return;
      run_call(expect, "spade_loss_mask", [&] {
        foveal::spade_loss_mask(*schema, lengths.view, mask.view, data.ConsumeBool());
      });
      break;
    }
    default: {
      const Index max_tokens = draw_index_option(data);
      if (max_tokens > 64 || batch > 8) return;  // huge: the known OOM findings
      std::optional<foveal::SpadeDecoder> decoder;
      try {
        decoder.emplace(*schema, batch, max_tokens);
      } catch (const foveal::Error&) {
        return;
      }
      for (int step = data.ConsumeIntegralInRange<int>(1, 12); step > 0; --step) {
        Expect call;
        auto predicted_ids =
            draw_view<const std::int64_t, std::int64_t, 2>(data, ids_arena, {batch, fd});
        auto predicted_values = draw_view<const float, float, 2>(data, value_arena, {batch, fc});
        auto step_ids =
            draw_view<std::int64_t, std::int64_t, 2>(data, ids_arena, {batch, fd}, true);
        auto step_values = draw_view<float, float, 2>(data, value_arena, {batch, fc}, true);
        call.add(predicted_ids), call.add(predicted_values), call.add(step_ids);
        call.add(step_values);
        if (call.unusable) continue;
        run_call(call, "SpadeDecoder::step", [&] {
          decoder->step(predicted_ids.view, predicted_values.view, step_ids.view, step_values.view);
        });
        (void)decoder->done();
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  FuzzedDataProvider data(bytes, size);
  run(data);
  return 0;
}
