// foveal::batch_decode_attention and foveal::batch_prefill_attention: validation and the plan.
//
// The plan is made from the lengths and page tables alone (never the thread count):
//   1. Shared prefixes (PrefixSharing::detect). Entries whose page tables start with the same
//      page form a group; its prefix is the longest run of pages they all hold, cut to the
//      positions before every member's first query. When every query of every member sees all
//      of the prefix, the group gets a pass of its own: the members' queries are stacked into
//      one query entry ([1, Hq, members * Lq, D]) that attends over the prefix in chunks, so each
//      prefix page is read once per kv head for the whole group and the tiles are full.
//   2. Every entry's own keys (after its group's prefix, if any) are cut into chunks of
//      kDecodeChunkKeys positions when its Lq * group rows fit one tile (decode), or visited
//      whole by its tiles otherwise (a prefill chunk has rows enough to keep threads busy).
//   3. An entry with one chunk and no prefix writes its outputs directly; every other entry
//      gets a state per chunk, merged in position order (prefix chunks, then its own).
// Tasks are (chunk, kv head, tile) and go to threads dynamically; each writes only its own
// state or rows, so the results are bitwise identical for any thread count.
#include "foveal/attention/batch_attention.hpp"

#include <algorithm>
#include <limits>
#include <map>
#include <vector>

#include "detail/attention_setup.hpp"
#include "detail/kernels.hpp"
#include "foveal/attention/decode.hpp"

namespace foveal {
namespace {

using detail::KeyRange;
using detail::KeyRanges;
using detail::Visibility;

// The checks of both entry points. With `prefill`, the lengths are checked after the append.
// T: the element type of q and out; KV: the pool's (T, or q8_block under float queries).
template <typename T, typename KV>
void validate(const char* function, TensorView<const T, 4> q, const PagedKVCache<KV>& cache,
              const std::vector<Index>& sequences, const AttentionOptions& options,
              TensorView<T, 4> out, TensorView<compute_type_t<T>, 3> lse, bool prefill) {
  detail::require_queries_and_outputs(
      function, q, out, lse,
      {"cache.heads_kv()", cache.heads_kv(), "cache.dim_v()", cache.dim_v()});
  detail::require_extent(function, "q", q, 0, "the number of sequences (S)",
                         static_cast<Index>(sequences.size()));
  detail::require_extent(function, "q", q, 3, "cache.dim() (D)", cache.dim());
  detail::require_disjoint(function, "out", out, "the pool's keys", cache.keys());
  detail::require_disjoint(function, "out", out, "the pool's values", cache.values());
  if (!lse.is_null()) {
    detail::require_disjoint(function, "lse", lse, "the pool's keys", cache.keys());
    detail::require_disjoint(function, "lse", lse, "the pool's values", cache.values());
    detail::require_disjoint(function, "lse", lse, "out", out);
  }
  detail::require_attention_options(function, options);
  // Before a prefill appends: the plan resolves the scale again, once the call is certain.
  detail::resolve_scale<compute_type_t<T>>(function, options, q.size(3));
  check(options.q_offset == -1, function,
        ": q_offset must be -1 (the queries are the newest tokens of each sequence), got ",
        options.q_offset);
  for (std::size_t s = 0; s < sequences.size(); ++s) {
    check(cache.contains(sequences[s]), function, ": sequences[", s, "] = ", sequences[s],
          " is not in the cache (never added, or removed)");
    if (!prefill) {
      const Index length = cache.length(sequences[s]);
      check(q.size(2) <= length, function, ": sequence ", sequences[s], " (sequences[", s,
            "]) holds ", length, " tokens but Lq = ", q.size(2),
            " queries need their keys appended first (Lq must be <= every length)");
    }
  }
}

// Throws unless every key that the `rows` newest queries of sequence `id` (of `length` tokens,
// q.shape[2] = len_q) see is still held: none of them in a released page.
template <typename KV>
void require_held(const char* function, const PagedKVCache<KV>& cache, Index id, Index length,
                  Index rows, Index len_q, const AttentionOptions& options) {
  if (rows <= 0 || cache.released_pages(id) == 0) return;
  const Index q_offset = length - rows;
  const Visibility seen =
      Visibility::make(options.causal, options.window_left, options.window_right,
                       options.sink_tokens, len_q, length, q_offset);
  const KeyRanges visible = seen.visible_ranges(q_offset, length - 1);
  const std::vector<Index>& table = cache.page_table(id);
  const Index page_size = cache.page_size();
  for (int r = 0; r < visible.count; ++r) {
    const KeyRange range = visible.ranges[r];
    // (Pages past the table hold a prefill's new tokens.)
    for (Index page = range.begin / page_size;
         page < static_cast<Index>(table.size()) && page * page_size < range.end; ++page)
      check(table[static_cast<std::size_t>(page)] != PagedKVCache<KV>::kReleased, function,
            ": the queries of sequence ", id, " see position ",
            std::max(range.begin, page * page_size),
            ", whose page was released "
            "(PagedKVCache::release); release only what no query will see (with window_left w "
            "and s sinks, a query at position p sees [0, s) and [p - w, p])");
  }
}

// T: the stored type of q and out, KV the pool's; states, stacked-query scratch aside, and lse
// are in C = compute_type_t<T>.
template <typename T, typename KV>
struct Planner {
  using C = compute_type_t<T>;
  const char* function;
  TensorView<const T, 4> q;
  const PagedKVCache<KV>& cache;
  const std::vector<Index>& sequences;
  const std::vector<Index>& rows;  // queries in use per entry (<= Lq)
  const AttentionOptions& options;
  TensorView<T, 4> out;
  TensorView<C, 3> lse;

  detail::PagedPlan<T, KV> plan;
  std::vector<detail::AlignedArray<T>> query_buffers;  // stacked queries
  std::vector<detail::AlignedArray<C>> state_buffers;  // states and their lse
  BatchAttentionInfo info;

  Index entries() const { return q.size(0); }
  Index heads_q() const { return q.size(1); }
  Index len_q() const { return q.size(2); }
  Index dim_v() const { return cache.dim_v(); }
  Index length(Index s) const { return cache.length(sequences[static_cast<std::size_t>(s)]); }
  Index q_offset(Index s) const { return length(s) - rows[static_cast<std::size_t>(s)]; }

  // The pool as the engine's k and v for `entries` query entries.
  detail::FlashParams<T, KV> params_for(TensorView<const T, 4> queries, TensorView<T, 4> outputs,
                                        TensorView<C, 3> lses) const {
    detail::FlashParams<T, KV> params;
    const TensorView<const KV, 4> keys = cache.keys();
    const TensorView<const KV, 4> values = cache.values();
    const Index pool_rows = cache.num_pages() * cache.page_rows();
    params.q = queries;
    params.k = TensorView<const KV, 4>(keys.data(),
                                       {queries.size(0), keys.size(1), pool_rows, keys.size(3)},
                                       {0, keys.stride(1), keys.stride(2), 1});
    params.v = TensorView<const KV, 4>(values.data(),
                                       {queries.size(0), values.size(1), pool_rows, values.size(3)},
                                       {0, values.stride(1), values.stride(2), 1});
    params.value_dim = cache.dim_v();
    params.out = outputs;
    params.lse = lses;
    params.scale = detail::resolve_scale<C>(function, options, q.size(3));
    params.softcap = options.softcap;
    params.num_threads = plan.num_threads;
    return params;
  }

  template <typename E>
  static E* allocate(std::vector<detail::AlignedArray<E>>& buffers, Index count) {
    buffers.push_back(
        detail::allocate_aligned<E>(static_cast<std::size_t>(std::max<Index>(count, 1))));
    return buffers.back().get();
  }

  // Cuts `range` into the chunks of detail::for_each_decode_chunk.
  static void cut(KeyRange range, std::vector<KeyRange>& chunks) {
    detail::for_each_decode_chunk(range, [&chunks](KeyRange chunk) { chunks.push_back(chunk); });
  }

  // One level of the cascade: `members` (entries, in order) hold the same pages for the keys
  // [begin, end), and every query of every member sees all of them.
  struct Group {
    std::vector<Index> members;
    Index begin = 0;
    Index end = 0;
  };

  const std::vector<Index>& table_of(Index entry) const {
    return cache.page_table(sequences[static_cast<std::size_t>(entry)]);
  }

  // Where the pages `members` share from page `first` on end, in tokens, capped by their cached
  // lengths (a member's own newest keys are not shared).
  Index shared_end(const std::vector<Index>& members, std::size_t first) const {
    const std::vector<Index>& lead = table_of(members.front());
    std::size_t common = lead.size();
    Index end = std::numeric_limits<Index>::max();
    for (Index s : members) {
      const std::vector<Index>& table = table_of(s);
      std::size_t same = first;
      while (same < std::min(common, table.size()) && table[same] == lead[same] &&
             lead[same] != PagedKVCache<KV>::kReleased)
        ++same;
      common = same;
      end = std::min(end, q_offset(s));
    }
    return std::min(end, static_cast<Index>(common) * cache.page_size());
  }

  // Step 1: the levels of the cascade. `members` share every page before `begin` (a page
  // boundary); those that also share the page at `begin` form a group over the keys they share
  // from there, and the members of a group that share still more pages form a deeper one (a
  // prompt forked into samples, one of which was extended and forked again). A group is taken
  // only when every query of every member sees all its keys, and only a taken group is looked
  // into: the keys before a member's deepest level are then all read by its levels. The groups
  // and their order depend on the page tables and lengths alone.
  void collect_groups(const std::vector<Index>& members, Index begin,
                      std::vector<Group>& groups) const {
    const auto page = static_cast<std::size_t>(begin / cache.page_size());
    std::map<Index, std::vector<Index>> by_page;
    for (Index s : members) {
      const std::vector<Index>& table = table_of(s);
      if (table.size() > page && q_offset(s) > begin && rows[static_cast<std::size_t>(s)] > 0)
        by_page[table[page]].push_back(s);
    }
    for (auto& [first_page, subset] : by_page) {
      if (first_page == PagedKVCache<KV>::kReleased || subset.size() < 2) continue;
      const Index end = shared_end(subset, page);
      if (end <= begin) continue;
      // Every query of every member must see the whole level (a window may cut into it).
      bool all_see = true;
      for (Index s : subset)
        all_see = all_see &&
                  plan.visibility[static_cast<std::size_t>(s)].sees_all(
                      q_offset(s), q_offset(s) + rows[static_cast<std::size_t>(s)] - 1, begin, end);
      if (!all_see) continue;
      groups.push_back({subset, begin, end});
      if (end % cache.page_size() == 0) collect_groups(subset, end, groups);
    }
  }

  std::vector<Group> find_groups() const {
    std::vector<Index> everyone(static_cast<std::size_t>(entries()));
    for (Index s = 0; s < entries(); ++s) everyone[static_cast<std::size_t>(s)] = s;
    std::vector<Group> groups;
    collect_groups(everyone, 0, groups);
    return groups;
  }

  void run(PrefixSharing sharing) {
    plan.num_threads = detail::resolve_num_threads(options.num_threads);
    plan.page_size = cache.page_size();
    plan.page_rows = cache.page_rows();
    plan.out = out;
    plan.lse = lse;
    const Index heads_kv = cache.heads_kv();
    const Index group_size = heads_q() / heads_kv;
    for (Index s = 0; s < entries(); ++s) {
      plan.tables.push_back(cache.page_table(sequences[static_cast<std::size_t>(s)]).data());
      plan.visibility.push_back(Visibility::make(options.causal, options.window_left,
                                                 options.window_right, options.sink_tokens, len_q(),
                                                 length(s), q_offset(s)));
    }
    std::vector<std::vector<detail::PagedSource<T>>> sources(static_cast<std::size_t>(entries()));
    std::vector<Index> own_start(static_cast<std::size_t>(entries()), 0);

    if (sharing == PrefixSharing::detect) {
      for (const Group& group : find_groups()) {
        const auto members = static_cast<Index>(group.members.size());
        const Index stacked = members * len_q();
        // The members' queries stacked: row (h, m * Lq + i) = q[member m, h, i].
        T* queries = allocate(query_buffers, heads_q() * stacked * q.size(3));
        for (Index m = 0; m < members; ++m)
          for (Index h = 0; h < heads_q(); ++h)
            for (Index i = 0; i < len_q(); ++i)
              std::copy_n(q.address(group.members[static_cast<std::size_t>(m)], h, i, 0), q.size(3),
                          queries + ((h * stacked) + m * len_q() + i) * q.size(3));
        const TensorView<const T, 4> stacked_q(queries, {1, heads_q(), stacked, q.size(3)});
        std::vector<KeyRange> ranges;
        cut({group.begin, group.end}, ranges);
        const Index state_size = heads_q() * stacked * dim_v();
        C* states = allocate(state_buffers, static_cast<Index>(ranges.size()) * state_size);
        C* state_lses =
            allocate(state_buffers, static_cast<Index>(ranges.size()) * heads_q() * stacked);
        detail::PagedPass<T, KV> pass;
        pass.params = params_for(stacked_q, {}, {});
        plan.tables.push_back(plan.tables[static_cast<std::size_t>(group.members.front())]);
        plan.visibility.push_back(Visibility::make(false, -1, -1, 0, stacked, group.end, 0));
        const Index tiles = (stacked * group_size + detail::kBlockQ - 1) / detail::kBlockQ;
        for (std::size_t c = 0; c < ranges.size(); ++c) {
          detail::PagedChunk<T> chunk;
          chunk.entry = 0;
          chunk.table = static_cast<Index>(plan.tables.size()) - 1;
          chunk.positions = ranges[c];
          chunk.q_offset = 0;
          chunk.first_task = pass.num_tasks;
          C* state = states + static_cast<Index>(c) * state_size;
          C* state_lse = state_lses + static_cast<Index>(c) * heads_q() * stacked;
          chunk.state = TensorView<C, 4>(state, {1, heads_q(), stacked, dim_v()},
                                         {0, stacked * dim_v(), dim_v(), 1});
          chunk.lse = TensorView<C, 3>(state_lse, {1, heads_q(), stacked}, {0, stacked, 1});
          pass.chunks.push_back(chunk);
          pass.num_tasks += heads_kv * tiles;
          for (Index m = 0; m < members; ++m)
            sources[static_cast<std::size_t>(group.members[static_cast<std::size_t>(m)])].push_back(
                {state + m * len_q() * dim_v(), state_lse + m * len_q(), stacked * dim_v(),
                 stacked});
        }
        for (Index s : group.members)
          own_start[static_cast<std::size_t>(s)] =
              std::max(own_start[static_cast<std::size_t>(s)], group.end);
        info.shared_groups += 1;
        info.shared_tokens += group.end - group.begin;
        info.chunks += static_cast<Index>(ranges.size());
        info.tasks += pass.num_tasks;
        plan.passes.push_back(std::move(pass));
      }
    }

    // Step 2: every entry's own keys.
    const bool split = len_q() * group_size <= detail::kBlockQ;
    const Index tiles = (len_q() * group_size + detail::kBlockQ - 1) / detail::kBlockQ;
    std::vector<std::vector<KeyRange>> own(static_cast<std::size_t>(entries()));
    Index state_count = 0;
    for (Index s = 0; s < entries(); ++s) {
      const auto index = static_cast<std::size_t>(s);
      const Index start = own_start[index];
      const Index count = rows[index];
      if (!split) {
        // An entry that appends nothing has no rows: no chunk over its cached keys either.
        if (count > 0 && start < length(s)) own[index].push_back({start, length(s)});
      } else if (count > 0) {
        const KeyRanges visible =
            plan.visibility[index].visible_ranges(q_offset(s), q_offset(s) + count - 1);
        for (int r = 0; r < visible.count; ++r)
          cut({std::max(start, visible.ranges[r].begin), visible.ranges[r].end}, own[index]);
      }
      // No chunk and no prefix: one empty chunk writes the rows' zeros and -inf.
      if (own[index].empty() && sources[index].empty()) own[index].push_back({0, 0});
      if (own[index].size() > 1 || !sources[index].empty())
        state_count += static_cast<Index>(own[index].size());
    }
    const Index state_size = heads_q() * len_q() * dim_v();
    C* states = state_count > 0 ? allocate(state_buffers, state_count * state_size) : nullptr;
    C* state_lses =
        state_count > 0 ? allocate(state_buffers, state_count * heads_q() * len_q()) : nullptr;
    detail::PagedPass<T, KV> pass;
    pass.params = params_for(q, out, lse);
    Index state = 0;
    for (Index s = 0; s < entries(); ++s) {
      const auto index = static_cast<std::size_t>(s);
      const bool direct = own[index].size() == 1 && sources[index].empty();
      for (const KeyRange& range : own[index]) {
        detail::PagedChunk<T> chunk;
        chunk.entry = s;
        chunk.table = s;
        chunk.positions = range;
        chunk.q_offset = q_offset(s);
        chunk.first_task = pass.num_tasks;
        if (direct) {
          chunk.out = out;
          chunk.lse = lse;
        } else {
          C* state_out = states + state * state_size;
          C* state_lse = state_lses + state * heads_q() * len_q();
          ++state;
          chunk.state = TensorView<C, 4>(state_out, {entries(), heads_q(), len_q(), dim_v()},
                                         {0, len_q() * dim_v(), dim_v(), 1});
          chunk.lse = TensorView<C, 3>(state_lse, {entries(), heads_q(), len_q()}, {0, len_q(), 1});
          sources[index].push_back({state_out, state_lse, len_q() * dim_v(), len_q()});
        }
        pass.chunks.push_back(chunk);
        pass.num_tasks += heads_kv * tiles;
      }
      info.chunks += static_cast<Index>(own[index].size());
    }
    info.tasks += pass.num_tasks;
    plan.passes.push_back(std::move(pass));

    plan.first_source.assign(1, 0);
    for (const auto& list : sources) {
      plan.sources.insert(plan.sources.end(), list.begin(), list.end());
      plan.first_source.push_back(static_cast<Index>(plan.sources.size()));
    }
    detail::kernels<KV>().paged_attention(plan);

    // Rows past an entry's count (a ragged prefill) are padding.
    for (Index s = 0; s < entries(); ++s)
      for (Index h = 0; h < heads_q(); ++h)
        for (Index i = rows[static_cast<std::size_t>(s)]; i < len_q(); ++i) {
          std::fill_n(out.address(s, h, i, 0), dim_v(), T{});  // +0 in every stored type
          if (!lse.is_null()) lse(s, h, i) = -std::numeric_limits<C>::infinity();
        }
  }
};

template <typename T, typename KV>
void run_batch(const char* function, TensorView<const T, 4> q, const PagedKVCache<KV>& cache,
               const std::vector<Index>& sequences, const std::vector<Index>& rows,
               const AttentionOptions& options, TensorView<T, 4> out,
               TensorView<compute_type_t<T>, 3> lse, PrefixSharing sharing,
               BatchAttentionInfo* info) {
  Planner<T, KV> planner{function, q, cache, sequences, rows, options, out, lse, {}, {}, {}, {}};
  if (q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0) planner.run(sharing);
  if (info != nullptr) *info = planner.info;
}

template <typename T, typename KV = T>
void decode_impl(TensorView<const T, 4> q, const PagedKVCache<KV>& cache,
                 const std::vector<Index>& sequences, const AttentionOptions& options,
                 TensorView<T, 4> out, TensorView<compute_type_t<T>, 3> lse, PrefixSharing sharing,
                 BatchAttentionInfo* info) {
  constexpr const char* kFunction = "batch_decode_attention";
  const auto reading = cache.read_guard(kFunction);
  validate(kFunction, q, cache, sequences, options, out, lse, false);
  for (Index id : sequences)
    require_held(kFunction, cache, id, cache.length(id), q.size(2), q.size(2), options);
  const std::vector<Index> rows(sequences.size(), q.size(2));
  run_batch(kFunction, q, cache, sequences, rows, options, out, lse, sharing, info);
}

template <typename T, typename KV = T>
void prefill_impl(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                  PagedKVCache<KV>& cache, const std::vector<Index>& sequences,
                  const std::vector<Index>& counts, const AttentionOptions& options,
                  TensorView<T, 4> out, TensorView<compute_type_t<T>, 3> lse, PrefixSharing sharing,
                  BatchAttentionInfo* info) {
  constexpr const char* kFunction = "batch_prefill_attention";
  {
    const auto reading = cache.read_guard(kFunction);
    validate(kFunction, q, cache, sequences, options, out, lse, true);
    // k and v are views the overlap checks below can measure (cache.append checks the rest).
    detail::require_valid_view(kFunction, "k", k);
    detail::require_valid_view(kFunction, "v", v);
    detail::require_extent(kFunction, "k", k, 2, "q.shape[2] (n)", q.size(2));
    detail::require_disjoint(kFunction, "out", out, "k", k);
    detail::require_disjoint(kFunction, "out", out, "v", v);
    if (!lse.is_null()) {
      detail::require_disjoint(kFunction, "lse", lse, "k", k);
      detail::require_disjoint(kFunction, "lse", lse, "v", v);
    }
    // The new rows' keys, counted after the append (a bad count is cache.append's to reject).
    if (counts.empty() || counts.size() == sequences.size()) {
      for (std::size_t s = 0; s < sequences.size(); ++s) {
        const Index count = counts.empty() ? q.size(2) : counts[s];
        const Index length = cache.length(sequences[s]);
        if (count >= 0 && count <= q.size(2) &&
            count <= std::numeric_limits<Index>::max() / 2 - length)
          require_held(kFunction, cache, sequences[s], length + count, count, q.size(2), options);
      }
    }
  }
  // Checks the rest (k, v, counts, distinct ids, free pages) and appends, or throws unchanged.
  cache.append(sequences, k, v, counts);
  const auto reading = cache.read_guard(kFunction);
  const std::vector<Index> rows =
      counts.empty() ? std::vector<Index>(sequences.size(), q.size(2)) : counts;
  run_batch(kFunction, q, cache, sequences, rows, options, out, lse, sharing, info);
}

}  // namespace

void batch_decode_attention(TensorView<const float, 4> q, const PagedKVCache<float>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<float, 4> out, TensorView<float, 3> lse,
                            PrefixSharing sharing, BatchAttentionInfo* info) {
  decode_impl<float>(q, cache, sequences, options, out, lse, sharing, info);
}

void batch_decode_attention(TensorView<const double, 4> q, const PagedKVCache<double>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<double, 4> out, TensorView<double, 3> lse,
                            PrefixSharing sharing, BatchAttentionInfo* info) {
  decode_impl<double>(q, cache, sequences, options, out, lse, sharing, info);
}

void batch_prefill_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                             TensorView<const float, 4> v, PagedKVCache<float>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<float, 4> out,
                             TensorView<float, 3> lse, PrefixSharing sharing,
                             BatchAttentionInfo* info) {
  prefill_impl<float>(q, k, v, cache, sequences, counts, options, out, lse, sharing, info);
}

void batch_prefill_attention(TensorView<const double, 4> q, TensorView<const double, 4> k,
                             TensorView<const double, 4> v, PagedKVCache<double>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<double, 4> out,
                             TensorView<double, 3> lse, PrefixSharing sharing,
                             BatchAttentionInfo* info) {
  prefill_impl<double>(q, k, v, cache, sequences, counts, options, out, lse, sharing, info);
}

void batch_decode_attention(TensorView<const bfloat16, 4> q, const PagedKVCache<bfloat16>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<bfloat16, 4> out, TensorView<float, 3> lse,
                            PrefixSharing sharing, BatchAttentionInfo* info) {
  decode_impl<bfloat16>(q, cache, sequences, options, out, lse, sharing, info);
}

void batch_prefill_attention(TensorView<const bfloat16, 4> q, TensorView<const bfloat16, 4> k,
                             TensorView<const bfloat16, 4> v, PagedKVCache<bfloat16>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<bfloat16, 4> out,
                             TensorView<float, 3> lse, PrefixSharing sharing,
                             BatchAttentionInfo* info) {
  prefill_impl<bfloat16>(q, k, v, cache, sequences, counts, options, out, lse, sharing, info);
}

void batch_decode_attention(TensorView<const float16, 4> q, const PagedKVCache<float16>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<float16, 4> out, TensorView<float, 3> lse,
                            PrefixSharing sharing, BatchAttentionInfo* info) {
  decode_impl<float16>(q, cache, sequences, options, out, lse, sharing, info);
}

void batch_prefill_attention(TensorView<const float16, 4> q, TensorView<const float16, 4> k,
                             TensorView<const float16, 4> v, PagedKVCache<float16>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<float16, 4> out,
                             TensorView<float, 3> lse, PrefixSharing sharing,
                             BatchAttentionInfo* info) {
  prefill_impl<float16>(q, k, v, cache, sequences, counts, options, out, lse, sharing, info);
}

void batch_decode_attention(TensorView<const float, 4> q, const PagedKVCache<q8_block>& cache,
                            const std::vector<Index>& sequences, const AttentionOptions& options,
                            TensorView<float, 4> out, TensorView<float, 3> lse,
                            PrefixSharing sharing, BatchAttentionInfo* info) {
  decode_impl<float, q8_block>(q, cache, sequences, options, out, lse, sharing, info);
}

void batch_prefill_attention(TensorView<const float, 4> q, TensorView<const float, 4> k,
                             TensorView<const float, 4> v, PagedKVCache<q8_block>& cache,
                             const std::vector<Index>& sequences, const std::vector<Index>& counts,
                             const AttentionOptions& options, TensorView<float, 4> out,
                             TensorView<float, 3> lse, PrefixSharing sharing,
                             BatchAttentionInfo* info) {
  prefill_impl<float, q8_block>(q, k, v, cache, sequences, counts, options, out, lse, sharing,
                                info);
}

}  // namespace foveal
