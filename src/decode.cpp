// foveal::decode_attention: split-KV attention over a KV cache, on the shared engine.
//
// Validation and the chunk plan run here; the engine and the merge are the level's kernel
// (src/kernels/attention.hpp). The visible keys of each sequence are cut into chunks of
// kDecodeChunkKeys positions. Every (chunk, kv head) is one engine tile run with a policy that
// visits only that chunk's stored rows (a ring buffer's rows are contiguous runs of positions, so
// blocks carry a position offset); the tile writes its chunk's (O, lse) to a scratch state, and a
// second pass merges the states of each query row in chunk order. Chunking depends only on the
// data, never on the thread count, so results are bitwise identical for any number of threads.
#include "foveal/attention/decode.hpp"

#include <cmath>
#include <vector>

#include "detail/attention_setup.hpp"
#include "detail/kernels.hpp"

namespace foveal {
namespace {

constexpr const char* kFunction = "decode_attention";

using detail::KeyRange;
using detail::KeyRanges;
using detail::Visibility;

// Validates a decode call over `cache` and fills the engine parameters and the visibility of
// every sequence.
template <typename T, typename KV>
void prepare_decode(const char* function, TensorView<const T, 4> q, const KVCache<KV>& cache,
                    const AttentionOptions& options, TensorView<T, 4> out,
                    TensorView<compute_type_t<T>, 3> lse, detail::FlashParams<T, KV>& params,
                    std::vector<Visibility>& visibility, std::vector<Index>* first_key = nullptr) {
  detail::require_queries_and_outputs(
      function, q, out, lse,
      {"cache.heads_kv()", cache.heads_kv(), "cache.dim_v()", cache.dim_v()});
  detail::require_extent(function, "q", q, 0, "cache.batch() (B)", cache.batch());
  detail::require_extent(function, "q", q, 3, "cache.dim() (D)", cache.dim());
  detail::require_disjoint(function, "out", out, "the cache's keys", cache.keys());
  detail::require_disjoint(function, "out", out, "the cache's values", cache.values());
  if (!lse.is_null()) {
    detail::require_disjoint(function, "lse", lse, "the cache's keys", cache.keys());
    detail::require_disjoint(function, "lse", lse, "the cache's values", cache.values());
  }
  detail::require_attention_options(function, options, first_key != nullptr);
  check(options.q_offset == -1, function,
        ": q_offset must be -1 (the queries are the newest Lq tokens of each sequence), got ",
        options.q_offset);
  // Left padding: each sequence's first real position (key_start); its end is its length.
  const auto& start = options.key_start;
  check(options.key_length.is_null(), function,
        ": key_length must be null (each sequence's keys end at its length in the cache); "
        "key_start gives where they begin");
  detail::require_key_range_views(function, options, q.size(0));

  const Index batch = q.size(0), len_q = q.size(2), dim = q.size(3);
  visibility.resize(static_cast<std::size_t>(batch));
  if (first_key != nullptr)
    first_key->assign(start.is_null() ? 0 : static_cast<std::size_t>(batch), 0);
  for (Index b = 0; b < batch; ++b) {
    const Index length = cache.length(b);
    check(len_q <= length, function, ": sequence ", b, " holds ", length,
          " tokens but Lq = ", len_q,
          " queries need their keys appended first (Lq must be <= every length)");
    const Index first = start.is_null() ? 0 : start(b);
    check(first >= 0 && first <= length, function, ": key_start[", b,
          "] must be in [0, the sequence's length = ", length, "], got ", first);
    if (!start.is_null()) (*first_key)[static_cast<std::size_t>(b)] = first;
    // Positions relative to the first real key (the sinks are counted from it).
    const Visibility seen =
        Visibility::make(options.causal, options.window_left, options.window_right,
                         options.sink_tokens, len_q, length - first, length - len_q - first);
    // Every key a query may see must still be stored (a ring buffer overwrites old tokens).
    if (len_q > 0) {
      const KeyRanges visible = seen.visible_ranges(length - len_q - first, length - 1 - first);
      for (int r = 0; r < visible.count; ++r) {
        const KeyRange range = detail::shifted(visible.ranges[r], first);
        const Index first_needed = std::max(range.begin, cache.sink_tokens());
        check(first_needed >= range.end || first_needed >= cache.first_retained(b), function,
              ": the queries of sequence ", b, " see position ", first_needed,
              ", which the ring buffer (capacity ", cache.capacity(), ", ", cache.sink_tokens(),
              " sinks) no longer holds: it keeps positions from ", cache.first_retained(b),
              " on; use a larger capacity or a smaller window");
      }
    }
    visibility[static_cast<std::size_t>(b)] = seen;
  }

  params.q = q;
  params.k = cache.keys();
  params.v = cache.values();
  params.value_dim = cache.dim_v();
  params.out = out;
  params.lse = lse;
  params.scale = detail::resolve_scale<compute_type_t<T>>(function, options, dim);
  params.softcap = options.softcap;
  params.num_threads = detail::resolve_num_threads(options.num_threads);
}

template <typename T, typename KV = T>
void decode_impl(TensorView<const T, 4> q, const KVCache<KV>& cache,
                 const AttentionOptions& options, TensorView<T, 4> out,
                 TensorView<compute_type_t<T>, 3> lse) {
  detail::DecodePlan<T, KV> plan;
  prepare_decode(kFunction, q, cache, options, out, lse, plan.params, plan.visibility,
                 &plan.first_key);
  const std::vector<Visibility>& visibility = plan.visibility;
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2);
  const Index heads_kv = cache.heads_kv();
  if (batch == 0 || heads_q == 0 || len_q == 0) return;

  const Index group = heads_q / heads_kv;
  // Split the keys when a head's queries fit one tile; otherwise the tiles themselves are
  // enough parallel work and each visits all its keys.
  plan.cache = &cache;
  plan.split = len_q * group <= detail::kBlockQ;
  std::vector<detail::DecodeChunk>& chunks = plan.chunks;
  plan.first_chunk.assign(static_cast<std::size_t>(batch) + 1, 0);
  for (Index b = 0; b < batch; ++b) {
    const Index length = cache.length(b);
    const Index first = plan.first_key.empty() ? 0 : plan.first_key[static_cast<std::size_t>(b)];
    if (!plan.split) {
      chunks.push_back({b, {first, length}});
    } else {
      // The visible keys (relative to the first real one) as absolute positions, cut into
      // chunks.
      const KeyRanges visible = visibility[static_cast<std::size_t>(b)].visible_ranges(
          length - len_q - first, length - 1 - first);
      for (int r = 0; r < visible.count; ++r)
        detail::for_each_decode_chunk(detail::shifted(visible.ranges[r], first),
                                      [&](KeyRange chunk) {
                                        chunks.push_back({b, chunk});
                                      });
    }
    plan.first_chunk[static_cast<std::size_t>(b) + 1] = static_cast<Index>(chunks.size());
  }
  detail::kernels<KV>().decode_attention(plan);
}

constexpr const char* kQuest = "quest_decode_attention";

template <typename T, typename KV = T>
void quest_impl(TensorView<const T, 4> q, const KVCache<KV>& cache, const AttentionOptions& options,
                const QuestOptions& quest, TensorView<T, 4> out,
                TensorView<compute_type_t<T>, 3> lse) {
  check(std::isfinite(quest.budget) && quest.budget > 0 && quest.budget <= 1, kQuest,
        ": budget must be in (0, 1] (the fraction of pages kept), got ", quest.budget);
  check(quest.local_pages >= 0 && quest.local_pages <= (Index{1} << 40), kQuest,
        ": local_pages must be in [0, 2**40], got ", quest.local_pages);
  check(cache.page_size() > 0, kQuest,
        ": the cache keeps no page bounds; make it with KVCacheOptions::page_bounds > 0 "
        "(Python: KVCache(..., page_bounds=16))");
  detail::QuestPlan<T, KV> plan;
  prepare_decode(kQuest, q, cache, options, out, lse, plan.params, plan.visibility);
  if (q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0) return;
  plan.cache = &cache;
  plan.budget = quest.budget;
  plan.local_pages = quest.local_pages;
  detail::kernels<KV>().quest_decode_attention(plan);
}

}  // namespace

#define FOVEAL_QUEST_ENTRY_POINT(T, KV, Lse)                                              \
  void quest_decode_attention(TensorView<const T, 4> q, const KVCache<KV>& cache,         \
                              const AttentionOptions& options, const QuestOptions& quest, \
                              TensorView<T, 4> out, TensorView<Lse, 3> lse) {             \
    const auto reading = cache.read_guard(kQuest);                                        \
    quest_impl<T, KV>(q, cache, options, quest, out, lse);                                \
  }

FOVEAL_QUEST_ENTRY_POINT(float, float, float)
FOVEAL_QUEST_ENTRY_POINT(double, double, double)
FOVEAL_QUEST_ENTRY_POINT(bfloat16, bfloat16, float)
FOVEAL_QUEST_ENTRY_POINT(float16, float16, float)
FOVEAL_QUEST_ENTRY_POINT(float, q8_block, float)
#undef FOVEAL_QUEST_ENTRY_POINT

void decode_attention(TensorView<const float, 4> q, const KVCache<float>& cache,
                      const AttentionOptions& options, TensorView<float, 4> out,
                      TensorView<float, 3> lse) {
  const auto reading = cache.read_guard(kFunction);
  decode_impl<float>(q, cache, options, out, lse);
}

void decode_attention(TensorView<const double, 4> q, const KVCache<double>& cache,
                      const AttentionOptions& options, TensorView<double, 4> out,
                      TensorView<double, 3> lse) {
  const auto reading = cache.read_guard(kFunction);
  decode_impl<double>(q, cache, options, out, lse);
}

void decode_attention(TensorView<const bfloat16, 4> q, const KVCache<bfloat16>& cache,
                      const AttentionOptions& options, TensorView<bfloat16, 4> out,
                      TensorView<float, 3> lse) {
  const auto reading = cache.read_guard(kFunction);
  decode_impl<bfloat16>(q, cache, options, out, lse);
}

void decode_attention(TensorView<const float16, 4> q, const KVCache<float16>& cache,
                      const AttentionOptions& options, TensorView<float16, 4> out,
                      TensorView<float, 3> lse) {
  const auto reading = cache.read_guard(kFunction);
  decode_impl<float16>(q, cache, options, out, lse);
}

void decode_attention(TensorView<const float, 4> q, const KVCache<q8_block>& cache,
                      const AttentionOptions& options, TensorView<float, 4> out,
                      TensorView<float, 3> lse) {
  const auto reading = cache.read_guard(kFunction);
  decode_impl<float, q8_block>(q, cache, options, out, lse);
}

}  // namespace foveal
