// foveal::decode_attention: split-KV attention over a KV cache, on the shared engine.
//
// The visible keys of each sequence are cut into chunks of kDecodeChunkKeys positions. Every
// (chunk, kv head) is one engine tile run with a policy that visits only that chunk's stored
// rows (a ring buffer's rows are contiguous runs of positions, so blocks carry a position
// offset); the tile writes its chunk's (O, lse) to a scratch state, and a second pass merges the
// states of each query row in chunk order. Chunking depends only on the data, never on the
// thread count, so results are bitwise identical for any number of threads.
#include "foveal/attention/decode.hpp"

#include <vector>

#include "attention_setup.hpp"
#include "foveal/detail/merge_math.hpp"

namespace foveal {
namespace {

constexpr const char* kFunction = "decode_attention";

using detail::KeyBlock;
using detail::KeyRange;
using detail::KeyRanges;
using detail::Visibility;

KeyRange intersect(KeyRange a, KeyRange b) {
  return {std::max(a.begin, b.begin), std::min(a.end, b.end)};
}

// Visits the stored keys of one sequence inside one chunk of positions.
class CachePolicy {
 public:
  CachePolicy(const Visibility& visibility, const KVCacheLayout& layout, KeyRange chunk)
      : visibility_(visibility), layout_(layout), chunk_(chunk) {}

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const KeyRanges visible = visibility_.visible_ranges(position_lo, position_hi);
    for (int r = 0; r < visible.count; ++r) {
      const KeyRange wanted = intersect(visible.ranges[r], chunk_);
      for (int s = 0; s < layout_.count; ++s) {
        const KVCacheSpan& span = layout_.spans[s];
        const KeyRange stored = intersect(wanted, {span.position, span.position + span.count});
        detail::for_each_aligned_block(stored, span.position - span.row, visibility_, position_lo,
                                       position_hi, visit);
      }
    }
  }

  bool sees(Index position, Index key) const { return visibility_.sees(position, key); }
  KeyRange keys_seen(Index position_lo, Index position_hi) const {
    return visibility_.keys_seen(position_lo, position_hi);
  }
  detail::PositionRange positions_seeing(Index key_begin, Index key_end) const {
    return visibility_.positions_seeing(key_begin, key_end);
  }

 private:
  Visibility visibility_;
  KVCacheLayout layout_;
  KeyRange chunk_;
};

// One unit of key work of one sequence.
struct Chunk {
  Index sequence;
  KeyRange positions;
};

template <typename T>
void decode_impl(TensorView<const T, 4> q, const KVCache<T>& cache, const AttentionOptions& options,
                 TensorView<T, 4> out, TensorView<T, 3> lse) {
  detail::require_queries_and_outputs(
      kFunction, q, out, lse,
      {"cache.heads_kv()", cache.heads_kv(), "cache.dim_v()", cache.dim_v()});
  detail::require_extent(kFunction, "q", q, 0, "cache.batch() (B)", cache.batch());
  detail::require_extent(kFunction, "q", q, 3, "cache.dim() (D)", cache.dim());
  detail::require_disjoint(kFunction, "out", out, "the cache's keys", cache.keys());
  detail::require_disjoint(kFunction, "out", out, "the cache's values", cache.values());
  if (!lse.is_null()) {
    detail::require_disjoint(kFunction, "lse", lse, "the cache's keys", cache.keys());
    detail::require_disjoint(kFunction, "lse", lse, "the cache's values", cache.values());
  }
  detail::require_attention_options(kFunction, options);
  check(options.q_offset == -1, kFunction,
        ": q_offset must be -1 (the queries are the newest Lq tokens of each sequence), got ",
        options.q_offset);

  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = cache.heads_kv();
  std::vector<Visibility> visibility(static_cast<std::size_t>(batch));
  for (Index b = 0; b < batch; ++b) {
    const Index length = cache.length(b);
    check(len_q <= length, kFunction, ": sequence ", b, " holds ", length,
          " tokens but Lq = ", len_q,
          " queries need their keys appended first (Lq must be <= every length)");
    const Visibility seen =
        Visibility::make(options.causal, options.window_left, options.window_right,
                         options.sink_tokens, len_q, length, length - len_q);
    // Every key a query may see must still be stored (a ring buffer overwrites old tokens).
    if (len_q > 0) {
      const KeyRanges visible = seen.visible_ranges(length - len_q, length - 1);
      for (int r = 0; r < visible.count; ++r) {
        const KeyRange range = visible.ranges[r];
        const Index first_needed = std::max(range.begin, cache.sink_tokens());
        check(first_needed >= range.end || first_needed >= cache.first_retained(b), kFunction,
              ": the queries of sequence ", b, " see position ", first_needed,
              ", which the ring buffer (capacity ", cache.capacity(), ", ", cache.sink_tokens(),
              " sinks) no longer holds: it keeps positions from ", cache.first_retained(b),
              " on; use a larger capacity or a smaller window");
      }
    }
    visibility[static_cast<std::size_t>(b)] = seen;
  }

  detail::FlashParams<T> params;
  params.q = q;
  params.k = cache.keys();
  params.v = cache.values();
  params.scale = detail::resolve_scale<T>(kFunction, options, dim);
  params.softcap = options.softcap;
  const int requested_threads = detail::resolve_num_threads(options.num_threads);
  if (batch == 0 || heads_q == 0 || len_q == 0) return;

  const Index group = heads_q / heads_kv;
  const Index tiles_per_head = (len_q * group + detail::kBlockQ - 1) / detail::kBlockQ;
  // Split the keys when a head's queries fit one tile; otherwise the tiles themselves are
  // enough parallel work and each visits all its keys.
  const bool split = tiles_per_head == 1;
  std::vector<Chunk> chunks;
  std::vector<Index> first_chunk(static_cast<std::size_t>(batch) + 1, 0);
  for (Index b = 0; b < batch; ++b) {
    const Index length = cache.length(b);
    if (!split) {
      chunks.push_back({b, {0, length}});
    } else {
      const KeyRanges visible =
          visibility[static_cast<std::size_t>(b)].visible_ranges(length - len_q, length - 1);
      for (int r = 0; r < visible.count; ++r)
        for (Index begin = visible.ranges[r].begin; begin < visible.ranges[r].end;) {
          const Index end =
              std::min(visible.ranges[r].end, (begin / kDecodeChunkKeys + 1) * kDecodeChunkKeys);
          chunks.push_back({b, {begin, end}});
          begin = end;
        }
    }
    first_chunk[static_cast<std::size_t>(b) + 1] = static_cast<Index>(chunks.size());
  }

  const Index num_chunks = static_cast<Index>(chunks.size());
  const Index dim_v = cache.dim_v();
  const Index state_size = heads_q * len_q * dim_v;  // one chunk's partial outputs
  const Index lse_size = heads_q * len_q;
  detail::AlignedArray<T> partial_out;
  detail::AlignedArray<T> partial_lse;
  if (split) {
    partial_out = detail::allocate_aligned<T>(static_cast<std::size_t>(num_chunks * state_size));
    partial_lse = detail::allocate_aligned<T>(static_cast<std::size_t>(num_chunks * lse_size));
  }

  const Index num_tasks = num_chunks * heads_kv * tiles_per_head;
  const int num_threads = detail::threads_for(num_tasks, requested_threads);
  const detail::TileWorkspace<T> workspace(dim, dim_v, num_threads);
  parallel_for(num_tasks, num_threads, [&](Index task) {
    const Index tile = task % tiles_per_head;
    const Index kv_head = task / tiles_per_head % heads_kv;
    const Index chunk_index = task / tiles_per_head / heads_kv;
    const Chunk& chunk = chunks[static_cast<std::size_t>(chunk_index)];
    detail::FlashParams<T> task_params = params;
    task_params.q_offset = cache.length(chunk.sequence) - len_q;
    if (split) {
      // The chunk's state goes to its own scratch; stride 0 over the batch dimension.
      task_params.out =
          TensorView<T, 4>(partial_out.get() + chunk_index * state_size,
                           {batch, heads_q, len_q, dim_v}, {0, len_q * dim_v, dim_v, 1});
      task_params.lse = TensorView<T, 3>(partial_lse.get() + chunk_index * lse_size,
                                         {batch, heads_q, len_q}, {0, len_q, 1});
    } else {
      task_params.out = out;
      task_params.lse = lse;
    }
    const detail::TileRunner<T> runner(task_params, workspace.acc_stride());
    const CachePolicy policy(visibility[static_cast<std::size_t>(chunk.sequence)],
                             cache.layout(chunk.sequence), chunk.positions);
    runner.run(policy, chunk.sequence, kv_head, tile * detail::kBlockQ,
               workspace.for_this_thread());
  });
  if (!split) return;

  // Merge each query row's chunk states in chunk order.
  Index max_chunks = 0;
  for (Index b = 0; b < batch; ++b)
    max_chunks = std::max(max_chunks, first_chunk[static_cast<std::size_t>(b) + 1] -
                                          first_chunk[static_cast<std::size_t>(b)]);
  const int merge_threads = detail::threads_for(batch * heads_q, requested_threads);
  const auto scratch_size =
      static_cast<std::size_t>(std::max<Index>(max_chunks, 1) * merge_threads);
  std::vector<const T*> state_rows(scratch_size);
  std::vector<T> state_lse(scratch_size);
  std::vector<T> weights(scratch_size);
  parallel_for(batch * heads_q, merge_threads, [&](Index task) {
    const Index b = task / heads_q, h = task % heads_q;
    const Index first = first_chunk[static_cast<std::size_t>(b)];
    const Index count = first_chunk[static_cast<std::size_t>(b) + 1] - first;
    const auto scratch = static_cast<std::size_t>(std::max<Index>(max_chunks, 1)) *
                         static_cast<std::size_t>(detail::thread_index());
    for (Index i = 0; i < len_q; ++i) {
      for (Index c = 0; c < count; ++c) {
        const Index row = (h * len_q + i);
        state_rows[scratch + c] = partial_out.get() + (first + c) * state_size + row * dim_v;
        state_lse[scratch + c] = partial_lse[(first + c) * lse_size + row];
      }
      detail::merge_state_row<T>(count, state_rows.data() + scratch, state_lse.data() + scratch,
                                 dim_v, weights.data() + scratch, out.address(b, h, i, 0),
                                 lse.is_null() ? nullptr : lse.address(b, h, i));
    }
  });
}

}  // namespace

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

}  // namespace foveal
