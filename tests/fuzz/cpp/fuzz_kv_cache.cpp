// libFuzzer harness: a KVCache (owned or over drawn views; float, double, or an owned 8-bit
// cache of float inputs) and a drawn sequence of appends, truncations, resets, layout queries
// and decode_attention calls. A rejected call must leave the cache's lengths unchanged.
#include <algorithm>
#include <memory>

#include "fuzz_common.hpp"

namespace {

using namespace foveal_fuzz;

template <typename T>
void check_unchanged(const foveal::KVCache<T>& cache, const std::vector<Index>& before,
                     const char* what) {
  if (cache.lengths() != before) {
    std::fprintf(stderr, "foveal fuzz: a rejected %s changed the cache's lengths\n", what);
    std::abort();
  }
}

// T: the element type of the views drawn (q, out, k and v appended); KV: the cache's (T, or
// q8_block for T = float, owned only).
template <typename T, typename KV = T>
void run(FuzzedDataProvider& data) {
  Arena<T> arena(data, 3);
  const Index batch = draw_extent(data, 2), heads_kv = draw_extent(data, 2);
  const Index capacity = draw_extent(data, 6), dim = draw_extent(data, 5);
  const Index dim_v = draw_extent(data, 5);
  foveal::KVCacheOptions options;
  options.ring = data.ConsumeBool();
  options.sink_tokens = draw_index_option(data);
  const bool owned = data.ConsumeBool();
  std::unique_ptr<foveal::KVCache<KV>> cache;
  if constexpr (std::is_same_v<KV, T>) {
    cache = draw_kv_cache(data, arena, owned, {batch, heads_kv, capacity, dim, dim_v}, options, 16,
                          Index{1} << 20);
  } else {
    if (std::max({batch, heads_kv, capacity, dim, dim_v}) > 64) return;
    try {
      cache = std::make_unique<foveal::KVCache<KV>>(batch, heads_kv, capacity, dim, dim_v, options);
    } catch (const foveal::Error&) {
    }
  }
  if (!cache) return;
  const Index b = cache->batch(), h = cache->heads_kv(), d = cache->dim(), dv = cache->dim_v();
  for (int step = data.ConsumeIntegralInRange<int>(1, 8); step > 0; --step) {
    const std::vector<Index> before = cache->lengths();
    switch (data.ConsumeIntegralInRange<int>(0, 5)) {
      case 0:
      case 1: {  // append, maybe ragged
        const DrawnAppend<T> drawn = draw_append(data, arena, b, h, d, dv);
        if (drawn.expect.unusable) break;
        bool rejected = false;
        run_call(drawn.expect, "KVCache::append", [&] {
          try {
            if (drawn.ragged)
              cache->append(drawn.k.view, drawn.v.view, drawn.counts);
            else
              cache->append(drawn.k.view, drawn.v.view);
          } catch (const foveal::Error&) {
            rejected = true;
            throw;
          }
        });
        if (rejected) check_unchanged(*cache, before, "append");
        break;
      }
      case 2: {  // decode
        const Index group = draw_extent(data, 3), len_q = draw_extent(data, 3);
        Expect expect;
        auto q = draw_view<const T, T, 4>(data, arena, {b, saturated_product(h, group), len_q, d});
        auto out =
            draw_view<T, T, 4>(data, arena, {b, saturated_product(h, group), len_q, dv}, true);
        expect.add(q);
        expect.add(out);
        DrawnView<T, 3> lse;
        if (data.ConsumeBool()) {
          lse = draw_view<T, T, 3>(data, arena, {b, saturated_product(h, group), len_q}, true);
          expect.add(lse);
        }
        if (expect.unusable) break;
        foveal::AttentionOptions attention = draw_attention_options(data, false);
        DrawnKeyRanges ranges;  // key_start: left padding (a key_length is rejected)
        ranges.draw(data, b, cache->capacity());
        ranges.apply(attention);
        run_call(expect, "decode_attention",
                 [&] { foveal::decode_attention(q.view, *cache, attention, out.view, lse.view); });
        check_unchanged(*cache, before, "decode_attention");
        break;
      }
      case 3: {  // truncate all or one sequence
        const Index length = draw_index_option(data);
        try {
          if (data.ConsumeBool())
            cache->truncate(length);
          else
            cache->truncate(draw_index_option(data), length);
        } catch (const foveal::Error&) {
          check_unchanged(*cache, before, "truncate");
        }
        break;
      }
      case 4:
        cache->reset();
        break;
      default: {  // queries
        const Index sequence = draw_index_option(data);
        try {
          const foveal::KVCacheLayout layout = cache->layout(sequence);
          Index stored = 0;
          for (int s = 0; s < layout.count; ++s) {
            const foveal::KVCacheSpan& span = layout.spans[s];
            if (span.row < 0 || span.count < 0 || span.row + span.count > cache->capacity()) {
              std::fprintf(stderr, "foveal fuzz: KVCache::layout gave a span outside storage\n");
              std::abort();
            }
            stored += span.count;
          }
          if (stored > cache->capacity()) {
            std::fprintf(stderr, "foveal fuzz: KVCache::layout holds more than capacity\n");
            std::abort();
          }
          (void)cache->holds(sequence, draw_index_option(data));
          (void)cache->first_retained(sequence);
        } catch (const foveal::Error&) {
        }
      }
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* bytes, std::size_t size) {
  FuzzedDataProvider data(bytes, size);
  switch (data.ConsumeIntegralInRange<int>(0, 2)) {
    case 0:
      run<float>(data);
      break;
    case 1:
      run<double>(data);
      break;
    default:
      run<float, foveal::q8_block>(data);
  }
  return 0;
}
