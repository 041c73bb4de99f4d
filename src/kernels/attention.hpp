// src/kernels/attention.hpp — the attention kernels of one ISA level (included by level.cpp):
// the band forward and backward, split-KV decode, merge_states. The entry points in src/*.cpp
// validate and plan; these run the engine on the plans (detail/kernels.hpp).
#pragma once

#include <algorithm>
#include <vector>

#include "detail/flash_backward.hpp"
#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "detail/kernels.hpp"
#include "detail/merge_math.hpp"
#include "foveal/core/parallel.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// A variable-length call (params.sequences set) runs each batch row with its own band; the
// policy is then unused.
template <typename T>
void band_attention(const FlashParams<T>& params, const BandPolicy& policy) {
  if (params.sequences != nullptr) {
    run_sequence_band_attention(params);
  } else {
    run_flash_attention(params, policy);
  }
}

template <typename T>
void band_attention_backward(const BackwardParams<T>& params, const BandPolicy& policy) {
  if (params.forward.sequences != nullptr) {
    run_sequence_band_backward(params);
  } else {
    run_flash_backward(params, policy);
  }
}

// The positions a plan's chunks span (an empty chunk counts 0): the key count of the work
// estimate that picks the thread count of a split-KV call.
template <typename Chunk>
Index keys_in_chunks(const std::vector<Chunk>& chunks) {
  Index keys = 0;
  for (const Chunk& chunk : chunks)
    keys += std::max<Index>(chunk.positions.end - chunk.positions.begin, 0);
  return keys;
}

// Visits the stored keys of one sequence inside one chunk of positions. The rule and the tile's
// positions count from the sequence's first real key, at absolute position first_key (0 unless
// the batch is left-padded); the chunk and the cache's layout speak of absolute positions.
class DecodeChunkPolicy : public RulePolicy<Visibility> {
 public:
  DecodeChunkPolicy(const Visibility& visibility, const KVCacheLayout& layout, KeyRange chunk,
                    Index first_key = 0)
      : RulePolicy(visibility), layout_(layout), chunk_(chunk), first_key_(first_key) {}

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const KeyRanges visible = rule().visible_ranges(position_lo, position_hi);
    for (int r = 0; r < visible.count; ++r) {
      const KeyRange wanted = intersect(shifted(visible.ranges[r], first_key_), chunk_);
      for (int s = 0; s < layout_.count; ++s) {
        const KVCacheSpan& span = layout_.spans[s];
        const KeyRange stored = intersect(wanted, {span.position, span.position + span.count});
        for_each_aligned_block(shifted(stored, -first_key_), span.position - span.row - first_key_,
                               rule(), position_lo, position_hi, visit);
      }
    }
  }

 private:
  static KeyRange intersect(KeyRange a, KeyRange b) {
    return {std::max(a.begin, b.begin), std::min(a.end, b.end)};
  }

  KVCacheLayout layout_;
  KeyRange chunk_;
  Index first_key_;
};

// S: the stored type of q and out, KV that of the cache (S, or q8_block under float queries);
// states and lse are in T = compute_type_t<S>.
template <typename S, typename KV = S>
void decode_attention(const DecodePlan<S, KV>& plan) {
  using T = compute_type_t<S>;
  const FlashParams<S, KV>& params = plan.params;
  const KVCache<KV>& cache = *plan.cache;
  const TensorView<S, 4> out = params.out;
  const TensorView<T, 3> lse = params.lse;
  const Index batch = params.q.size(0), heads_q = params.q.size(1), len_q = params.q.size(2);
  const Index heads_kv = params.k.size(1), group = heads_q / heads_kv;
  const Index num_chunks = static_cast<Index>(plan.chunks.size());
  const Index dim_v = params.dim_v();
  const Index state_size = heads_q * len_q * dim_v;  // one chunk's partial outputs
  const Index lse_size = heads_q * len_q;
  AlignedArray<T> partial_out;
  AlignedArray<T> partial_lse;
  if (plan.split) {
    partial_out = allocate_aligned<T>(static_cast<std::size_t>(num_chunks * state_size));
    partial_lse = allocate_aligned<T>(static_cast<std::size_t>(num_chunks * lse_size));
  }

  // One task per (chunk, kv head, tile); a chunk's rows go to its own state (stride 0 over the
  // batch dimension) when split, else straight to the outputs. Every row of a sequence sees
  // at most its chunks' positions.
  const TileGrid grid(num_chunks, heads_kv, extent_product({len_q, group}));
  const Index work =
      attention_work(params, extent_product({heads_q, len_q}), keys_in_chunks(plan.chunks));
  run_engine(params, grid.num_tasks(), work, [&](Index task, NoPolicyScratch&) {
    const TileGrid::Cell cell = grid.cell(task);
    const DecodeChunk& chunk = plan.chunks[static_cast<std::size_t>(cell.outer)];
    const auto sequence = static_cast<std::size_t>(chunk.sequence);
    const Index first_key = plan.first_key.empty() ? 0 : plan.first_key[sequence];
    Tile<S> tile = tile_of(params, chunk.sequence, cell.kv_head, cell.flat_begin);
    tile.q_offset = cache.length(chunk.sequence) - len_q - first_key;
    if (plan.split) {
      tile.state = TensorView<T, 4>(partial_out.get() + cell.outer * state_size,
                                    {batch, heads_q, len_q, dim_v}, {0, len_q * dim_v, dim_v, 1});
      tile.lse = TensorView<T, 3>(partial_lse.get() + cell.outer * lse_size,
                                  {batch, heads_q, len_q}, {0, len_q, 1});
    }
    return plan_tile(DecodeChunkPolicy(plan.visibility[sequence], cache.layout(chunk.sequence),
                                       chunk.positions, first_key),
                     tile);
  });
  if (!plan.split) return;

  // Merge each query row's chunk states in chunk order.
  const std::vector<Index>& first_chunk = plan.first_chunk;
  Index max_chunks = 0;
  for (Index b = 0; b < batch; ++b)
    max_chunks = std::max(max_chunks, first_chunk[static_cast<std::size_t>(b) + 1] -
                                          first_chunk[static_cast<std::size_t>(b)]);
  // A row's merge reads its chunks' states: Dv multiply-adds per chunk.
  const int merge_threads =
      team_size(batch * heads_q, params.num_threads, num_chunks * heads_q * len_q * dim_v);
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
                         static_cast<std::size_t>(thread_index());
    for (Index i = 0; i < len_q; ++i) {
      for (Index c = 0; c < count; ++c) {
        const Index row = (h * len_q + i);
        state_rows[scratch + c] = partial_out.get() + (first + c) * state_size + row * dim_v;
        state_lse[scratch + c] = partial_lse[(first + c) * lse_size + row];
      }
      merge_state_row<T, S>(count, state_rows.data() + scratch, state_lse.data() + scratch, dim_v,
                            weights.data() + scratch, out.address(b, h, i, 0),
                            lse.is_null() ? nullptr : lse.address(b, h, i));
    }
  });
}

// Visits the keys of one sequence of a PagedKVCache inside one chunk of positions, page by
// page (runs of pages that are consecutive in memory as one): the key at position p is slot
// p % page_size of page table[p / page_size], row table[p / page_size] * page_rows + p %
// page_size of the pool.
class PagedChunkPolicy : public RulePolicy<Visibility> {
 public:
  PagedChunkPolicy(const Visibility& visibility, const Index* table, Index page_size,
                   Index page_rows, KeyRange chunk)
      : RulePolicy(visibility),
        table_(table),
        page_size_(page_size),
        page_rows_(page_rows),
        chunk_(chunk) {}

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const KeyRanges visible = rule().visible_ranges(position_lo, position_hi);
    for (int r = 0; r < visible.count; ++r) {
      const Index begin = std::max(visible.ranges[r].begin, chunk_.begin);
      const Index end = std::min(visible.ranges[r].end, chunk_.end);
      for (Index page_begin = begin; page_begin < end;) {
        const Index index = page_begin / page_size_;
        // Consecutive pages whose rows are consecutive too (an owned pool's pages p, p + 1)
        // are one run of rows: visited as whole blocks of the engine, not page by page.
        Index last = index;
        while ((last + 1) * page_size_ < end && page_rows_ == page_size_ &&
               table_[last + 1] == table_[last] + 1)
          ++last;
        const Index page_end = std::min(end, (last + 1) * page_size_);
        const Index offset = index * page_size_ - table_[index] * page_rows_;
        for_each_aligned_block({page_begin, page_end}, offset, rule(), position_lo, position_hi,
                               visit);
        page_begin = page_end;
      }
    }
  }

 private:
  const Index* table_;
  Index page_size_;
  Index page_rows_;
  KeyRange chunk_;
};

// S: the stored type of q and out, KV the pool's; states and lse are in T = compute_type_t<S>.
template <typename S, typename KV = S>
void paged_attention(const PagedPlan<S, KV>& plan) {
  using T = compute_type_t<S>;
  for (const PagedPass<S, KV>& pass : plan.passes) {
    const Index tiles = ceil_div(pass.params.rows_per_head(), kBlockQ);
    const std::vector<PagedChunk<S>>& chunks = pass.chunks;
    // A chunk's rows (one entry of the pass's q) see at most its positions.
    const Index work = attention_work(pass.params, pass.params.q.size(1) * pass.params.q.size(2),
                                      keys_in_chunks(chunks));
    run_engine(pass.params, pass.num_tasks, work, [&](Index task, NoPolicyScratch&) {
      const auto found = std::upper_bound(
          chunks.begin(), chunks.end(), task,
          [](Index value, const PagedChunk<S>& chunk) { return value < chunk.first_task; });
      const PagedChunk<S>& chunk = *(found - 1);
      const Index local = task - chunk.first_task;
      // Late tiles first: under a causal mask they see the most keys.
      const Index tile_index = tiles - 1 - local % tiles;
      const Tile<S> tile{chunk.entry, local / tiles, tile_index * kBlockQ, chunk.q_offset,
                         chunk.out,   chunk.lse,     chunk.state};
      const auto table = static_cast<std::size_t>(chunk.table);
      return plan_tile(PagedChunkPolicy(plan.visibility[table], plan.tables[table], plan.page_size,
                                        plan.page_rows, chunk.positions),
                       tile);
    });
  }

  // Merge each output row's states in order.
  const TensorView<S, 4> out = plan.out;
  const TensorView<T, 3> lse = plan.lse;
  const Index entries = out.size(0), heads_q = out.size(1), len_q = out.size(2);
  const Index dim_v = out.size(3);
  Index max_sources = 1;
  for (Index s = 0; s < entries; ++s)
    max_sources = std::max(max_sources, plan.first_source[static_cast<std::size_t>(s) + 1] -
                                            plan.first_source[static_cast<std::size_t>(s)]);
  const auto sources = static_cast<Index>(plan.sources.size());
  const int merge_threads =
      team_size(entries * heads_q, plan.num_threads, sources * heads_q * len_q * dim_v);
  const auto scratch_size = static_cast<std::size_t>(max_sources * merge_threads);
  std::vector<const T*> state_rows(scratch_size);
  std::vector<T> state_lse(scratch_size);
  std::vector<T> weights(scratch_size);
  parallel_for(entries * heads_q, merge_threads, [&](Index task) {
    const Index s = task / heads_q, h = task % heads_q;
    const Index first = plan.first_source[static_cast<std::size_t>(s)];
    const Index count = plan.first_source[static_cast<std::size_t>(s) + 1] - first;
    if (count == 0) return;  // written by its tiles
    const auto scratch =
        static_cast<std::size_t>(max_sources) * static_cast<std::size_t>(thread_index());
    for (Index i = 0; i < len_q; ++i) {
      for (Index c = 0; c < count; ++c) {
        const PagedSource<S>& source = plan.sources[static_cast<std::size_t>(first + c)];
        state_rows[scratch + c] = source.out + h * source.out_head_stride + i * dim_v;
        state_lse[scratch + c] = source.lse[h * source.lse_head_stride + i];
      }
      merge_state_row<T, S>(count, state_rows.data() + scratch, state_lse.data() + scratch, dim_v,
                            weights.data() + scratch, out.address(s, h, i, 0),
                            lse.is_null() ? nullptr : lse.address(s, h, i));
    }
  });
}

template <typename T>
void merge_states(const MergePlan<T>& plan) {
  const TensorView<T, 4> out = plan.out;
  const Index heads = out.size(1), len = out.size(2), dim_v = out.size(3);
  const Index rows = out.size(0) * heads * len;
  // Rows are independent: a fixed split into blocks of rows, any thread count.
  constexpr Index kRowsPerTask = 64;
  const Index num_tasks = (rows + kRowsPerTask - 1) / kRowsPerTask;
  const int threads = team_size(num_tasks, plan.num_threads, 2 * rows * dim_v);
  parallel_for(num_tasks, threads, [&](Index task) {
    const Index row_end = std::min(rows, (task + 1) * kRowsPerTask);
    for (Index row = task * kRowsPerTask; row < row_end; ++row) {
      const Index b = row / (heads * len), h = row / len % heads, i = row % len;
      const T* outs[2] = {plan.out_a.address(b, h, i, 0), plan.out_b.address(b, h, i, 0)};
      const T lses[2] = {plan.lse_a(b, h, i), plan.lse_b(b, h, i)};
      T weights[2];
      merge_state_row<T>(2, outs, lses, dim_v, weights, out.address(b, h, i, 0),
                         plan.lse.is_null() ? nullptr : plan.lse.address(b, h, i));
    }
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
