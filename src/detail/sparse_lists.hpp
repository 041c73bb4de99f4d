// src/detail/sparse_lists.hpp (private) — what the selections of block_sparse_select and
// token_topk_select share: the checks of the q / k pair they estimate from and the plan of the
// selection kernel, the run that turns the kernels' fixed-capacity lists into a CSR, the checks
// of a caller's selection, the plan of the attention over it and the two ways to run that
// attention (over a caller's selection, or selecting first).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "detail/attention_setup.hpp"
#include "detail/block_sparse_geometry.hpp"
#include "detail/kernels.hpp"
#include "foveal/attention/block_sparse.hpp"
#include "foveal/attention/token_topk.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// selection.<name> == expected, else an error that says what it should be.
inline void require_selection_field(const char* function, const char* name, Index got,
                                    Index expected, const char* what) {
  check(got == expected, function, ": selection.", name, " must be ", expected, " (", what,
        "), got ", got, "; was the selection made for other q, k or q_offset?");
}

// q [B, Hq, Lq, D] and k [B, Hkv, Lk, D] valid, Hq a multiple of Hkv, options valid.
template <typename T>
void require_select_inputs(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                           const AttentionOptions& options) {
  require_valid_view(function, "q", q);
  require_valid_view(function, "k", k);
  // The selection kernels read rows of q and k as contiguous vectors.
  require_unit_inner_stride(function, "q", q);
  require_unit_inner_stride(function, "k", k);
  const Index batch = q.size(0), heads_q = q.size(1), dim = q.size(3);
  const Index heads_kv = k.size(1);
  check(dim >= 1, function, ": q.shape[3] (D) must be >= 1, got ", dim);
  check(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0, function,
        ": q.shape[1] (Hq = ", heads_q, ") must be a multiple of k.shape[1] (Hkv = ", heads_kv,
        ")");
  require_extent(function, "k", k, 0, "q.shape[0] (B)", batch);
  require_extent(function, "k", k, 3, "q.shape[3] (D)", dim);
  require_attention_options(function, options);
  require_q_offset(function, options.q_offset);
}

// The selection kernel's plan for q, k and options (checked here), with the sparse options
// (checked by the caller) and the compute type's resolved scale; no lists yet.
template <typename T>
SelectPlan<T> select_plan(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                          const AttentionOptions& options, Index block_size, double budget,
                          double threshold, Index local) {
  require_select_inputs(function, q, k, options);
  const Index len_q = q.size(2), len_k = k.size(2);
  SelectPlan<T> plan;
  plan.q = q;
  plan.k = k;
  plan.q_offset = options.q_offset == -1 ? len_k - len_q : options.q_offset;
  plan.visibility = visibility_of(options, len_q, len_k, plan.q_offset);
  plan.scale = resolve_scale<compute_type_t<T>>(function, options, q.size(3));
  plan.softcap = options.softcap;
  plan.block_size = block_size;
  plan.local = local;
  plan.budget = budget;
  plan.threshold = threshold;
  const QueryBlocks blocks = query_blocks_of(function, plan.q_offset, len_q, block_size);
  plan.first_query_block = blocks.first;
  plan.query_blocks = blocks.count;
  plan.num_threads = resolve_num_threads(options.num_threads);
  return plan;
}

// The number of lists of a selection, batch * heads_kv * query_blocks, checked like a size.
inline Index list_count(const char* function, Index batch, Index heads_kv, Index query_blocks) {
  return checked_numel<std::int64_t>(function, {batch, heads_kv, query_blocks});
}

// Whether a call has no query row to compute (out and lse are empty): it does no work, and no
// work may depend on the other extents (those of empty views may be anything).
template <typename T>
bool no_rows(TensorView<const T, 4> q) {
  return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0;
}

// The list of (b, h, query_block) in a selection's CSR (offsets, items): a pointer to its first
// item and its count. The fields of a hand-made or edited selection may be anything: no
// overflowing arithmetic, and never a list outside the items (foveal::Error naming `name`).
template <typename Selection>
const std::int64_t* kept_list(const char* name, const Selection& selection,
                              const std::vector<std::int64_t>& items, std::int64_t b,
                              std::int64_t h, std::int64_t query_block, std::int64_t* count) {
  std::int64_t relative = 0;
  const bool in_blocks =
      !__builtin_sub_overflow(query_block, selection.first_query_block, &relative) &&
      relative >= 0 && relative < selection.query_blocks;
  check(b >= 0 && b < selection.batch && h >= 0 && h < selection.heads_kv && in_blocks, name,
        ": (b, h, query_block) = (", b, ", ", h, ", ", query_block, ") is outside batch ",
        selection.batch, ", heads_kv ", selection.heads_kv, ", the ", selection.query_blocks,
        " query blocks from ", selection.first_query_block);
  std::int64_t list = 0;
  const bool fits = !__builtin_mul_overflow(b, selection.heads_kv, &list) &&
                    !__builtin_add_overflow(list, h, &list) &&
                    !__builtin_mul_overflow(list, selection.query_blocks, &list) &&
                    !__builtin_add_overflow(list, relative, &list);
  const auto& offsets = selection.offsets;
  const bool inside = fits && static_cast<std::size_t>(list) + 1 < offsets.size();
  const auto at = inside ? static_cast<std::size_t>(list) : 0;
  const auto size = static_cast<std::int64_t>(items.size());
  check(inside && offsets[at] >= 0 && offsets[at] <= offsets[at + 1] && offsets[at + 1] <= size,
        name, ": the list of (b, h, query_block) = (", b, ", ", h, ", ", query_block,
        ") is not within the ", offsets.size(), " offsets and ", size,
        " items: the selection breaks its layout");
  *count = offsets[at + 1] - offsets[at];
  return items.data() + offsets[at];
}

// `count` elements of E in `vector`, or a foveal::MemoryError naming `what` where the system
// cannot provide them: the extents of a call without rows (Hq = 0) may be huge while its
// selection still has B * Hkv * query_blocks lists, and std::vector would throw a bare
// std::bad_alloc (or abort under a sanitizer). The probe asks for zeroed memory, which large
// requests take from mmap: refused without an abort, and nothing is touched.
template <typename E>
void assign_checked(std::vector<E>& vector, Index count, const char* what) {
  {
    const AlignedArray<E> probe =
        allocate_aligned<E>(static_cast<std::size_t>(count), what, /*zeroed=*/true);
  }
  vector.assign(static_cast<std::size_t>(count), E{});
}

// Moves list i's counts[i] items from items[capacity[i] ..] to the front, in order, and returns
// the CSR offsets; items is shrunk to the total.
inline std::vector<std::int64_t> compact_lists(const std::vector<Index>& capacity,
                                               const std::vector<Index>& counts,
                                               std::vector<std::int64_t>& items, const char* what) {
  std::vector<std::int64_t> offsets;
  assign_checked(offsets, static_cast<Index>(counts.size()) + 1, what);
  std::int64_t written = 0;
  for (std::size_t at = 0; at < counts.size(); ++at) {
    const std::int64_t* from = items.data() + capacity[at];
    std::copy(from, from + counts[at], items.data() + written);
    written += counts[at];
    offsets[at + 1] = written;
  }
  items.resize(static_cast<std::size_t>(written));
  return offsets;
}

// Runs a selection kernel over the plan's B * Hkv * query_blocks lists, list i having room for
// keep_of(query block) items, and returns the CSR offsets of what it kept; `items` receives the
// kept items, compacted.
template <typename T, typename KeepOf>
std::vector<std::int64_t> run_select(const char* function, SelectPlan<T> plan, KeepOf&& keep_of,
                                     void (*kernel)(const SelectPlan<T>&),
                                     std::vector<std::int64_t>& items) {
  const Index lists = list_count(function, plan.q.size(0), plan.k.size(1), plan.query_blocks);
  const std::string what = std::string(function) + ": the selection's lists";
  // Room for each list's `keep`; the kernel may keep fewer (threshold), compacted below.
  std::vector<Index> capacity, counts;
  assign_checked(capacity, lists + 1, what.c_str());
  assign_checked(counts, lists, what.c_str());
  for (Index list = 0; list < lists; ++list)
    capacity[static_cast<std::size_t>(list) + 1] =
        capacity[static_cast<std::size_t>(list)] +
        keep_of(plan.first_query_block + list % plan.query_blocks);
  assign_checked(items, capacity.back(), what.c_str());
  if (lists > 0) {
    plan.capacity = capacity.data();
    plan.items = items.data();
    plan.counts = counts.data();
    kernel(plan);
  }
  return compact_lists(capacity, counts, items, what.c_str());
}

// The attention kernel's plan over a selection whose items are `items`.
template <typename T, typename Selection>
SelectionPlan<T> selection_plan(const FlashParams<T>& params, const AttentionOptions& options,
                                const Selection& selection,
                                const std::vector<std::int64_t>& items) {
  SelectionPlan<T> plan;
  plan.params = params;
  plan.visibility = visibility_of(options, params.q.size(2), params.k.size(2), params.q_offset);
  plan.block_size = selection.block_size;
  plan.first_query_block = selection.first_query_block;
  plan.query_blocks = selection.query_blocks;
  plan.offsets = selection.offsets.data();
  plan.items = items.data();
  return plan;
}

// The geometry fields a selection must share with the call (batch, heads_kv, the query blocks),
// named selection.<field> in the errors.
template <typename Selection>
void require_selection_geometry(const char* function, const Selection& selection, Index batch,
                                Index heads_kv, Index q_offset, Index len_q) {
  check(selection.block_size >= 16 && selection.block_size <= 4096, function,
        ": selection.block_size must be in [16, 4096], got ", selection.block_size);
  const QueryBlocks blocks = query_blocks_of(function, q_offset, len_q, selection.block_size);
  require_selection_field(function, "batch", selection.batch, batch, "q.shape[0]");
  require_selection_field(function, "heads_kv", selection.heads_kv, heads_kv, "k.shape[1]");
  require_selection_field(function, "first_query_block", selection.first_query_block, blocks.first,
                          "floor(q_offset / block_size)");
  require_selection_field(function, "query_blocks", selection.query_blocks, blocks.count,
                          "the query blocks holding the call's queries");
}

// `lists` strictly increasing lists of items in [0, limit) as a CSR (offsets, items), named
// selection.<offsets_name> / selection.<items_name> in the errors.
inline void require_lists(const char* function, const std::vector<std::int64_t>& offsets,
                          const std::vector<std::int64_t>& items, Index lists, Index limit,
                          const char* items_name, const char* what) {
  check(static_cast<Index>(offsets.size()) == lists + 1, function,
        ": selection.offsets must have batch * heads_kv * query_blocks + 1 = ", lists + 1,
        " entries, got ", offsets.size());
  check(offsets[0] == 0 && offsets.back() == static_cast<Index>(items.size()), function,
        ": selection.offsets must run from 0 to selection.", items_name, ".size() = ", items.size(),
        ", got ", offsets[0], " .. ", offsets.back());
  for (Index list = 0; list < lists; ++list) {
    const auto at = static_cast<std::size_t>(list);
    check(offsets[at] <= offsets[at + 1], function,
          ": selection.offsets must not decrease, got offsets[", list, "] = ", offsets[at],
          " > offsets[", list + 1, "] = ", offsets[at + 1]);
  }
  for (Index list = 0; list < lists; ++list) {
    const auto at = static_cast<std::size_t>(list);
    const Index begin = offsets[at], end = offsets[at + 1];
    for (Index i = begin; i < end; ++i) {
      const std::int64_t item = items[static_cast<std::size_t>(i)];
      check(item >= 0 && item < limit, function, ": selection.", items_name, "[", i, "] = ", item,
            " is not ", what, " in [0, ", limit, ")");
      // (The message's arguments are evaluated before the check: no items[-1] for i = 0.)
      const std::int64_t previous = i == begin ? -1 : items[static_cast<std::size_t>(i) - 1];
      check(previous < item, function, ": the ", items_name, " of list ", list,
            " must be strictly increasing; selection.", items_name, "[", i - 1, "] = ", previous,
            ", selection.", items_name, "[", i, "] = ", item);
    }
  }
}

// The items of a selection: key blocks or keys.
inline const std::vector<std::int64_t>& selection_items(const BlockSelection& selection) {
  return selection.blocks;
}
inline const std::vector<std::int64_t>& selection_items(const TokenSelection& selection) {
  return selection.keys;
}

// A selection must match the call's geometry and be a valid CSR of strictly increasing key
// blocks (BlockSelection) or keys (TokenSelection).
inline void require_selection(const char* function, const BlockSelection& selection, Index batch,
                              Index heads_kv, Index q_offset, Index len_q, Index len_k) {
  require_selection_geometry(function, selection, batch, heads_kv, q_offset, len_q);
  const Index key_blocks = ceil_divide(len_k, selection.block_size);
  require_selection_field(function, "key_blocks", selection.key_blocks, key_blocks,
                          "ceil(Lk / block_size)");
  require_lists(function, selection.offsets, selection.blocks,
                list_count(function, batch, heads_kv, selection.query_blocks), key_blocks, "blocks",
                "a key block");
}
inline void require_selection(const char* function, const TokenSelection& selection, Index batch,
                              Index heads_kv, Index q_offset, Index len_q, Index len_k) {
  require_selection_geometry(function, selection, batch, heads_kv, q_offset, len_q);
  require_selection_field(function, "len_k", selection.len_k, len_k, "k.shape[2]");
  require_lists(function, selection.offsets, selection.keys,
                list_count(function, batch, heads_kv, selection.query_blocks), len_k, "keys",
                "a key");
}

// A sparse prefill attention over a caller's selection (block_sparse_attention,
// token_topk_attention): the attention's checks, then the selection's against the call, then
// `kernel` over it. Nothing is written before every check has passed.
template <typename T, typename Selection>
void attend_selection(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                      TensorView<const T, 4> v, TensorView<T, 4> out,
                      const AttentionOptions& options, const Selection& selection,
                      TensorView<compute_type_t<T>, 3> lse,
                      void (*kernel)(const SelectionPlan<T>&)) {
  const auto params = prepare_attention<T>(function, q, k, v, out, options, lse, {});
  require_selection(function, selection, q.size(0), k.size(1), params.q_offset, q.size(2),
                    k.size(2));
  if (no_rows(q)) return;  // nothing to write
  kernel(selection_plan(params, options, selection, selection_items(selection)));
}

// The one-call form: the attention's checks first, then select() (which checks the sparse
// options and makes the selection), then `kernel` over it. Without query rows there is nothing
// to select nor write, and only require_options() runs.
template <typename T, typename Select, typename RequireOptions>
void select_and_attend(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                       TensorView<const T, 4> v, TensorView<T, 4> out,
                       const AttentionOptions& options, TensorView<compute_type_t<T>, 3> lse,
                       Select&& select, RequireOptions&& require_options,
                       void (*kernel)(const SelectionPlan<T>&)) {
  const auto params = prepare_attention<T>(function, q, k, v, out, options, lse, {});
  if (no_rows(q)) {
    require_options();
    return;
  }
  const auto selection = select();
  kernel(selection_plan(params, options, selection, selection_items(selection)));
}

}  // namespace foveal::detail
