// foveal::block_sparse_select / block_sparse_attention: validation, the selection's layout, then
// the level kernels (src/kernels/block_sparse.hpp).
#include "foveal/attention/block_sparse.hpp"

#include <cmath>
#include <string>

#include "detail/attention_setup.hpp"
#include "detail/block_sparse_geometry.hpp"

namespace foveal {

const std::int64_t* BlockSelection::kept(std::int64_t b, std::int64_t h, std::int64_t query_block,
                                         std::int64_t* count) const {
  // The fields of a hand-made or edited selection may be anything: no overflowing arithmetic.
  std::int64_t relative = 0;
  const bool in_blocks = !__builtin_sub_overflow(query_block, first_query_block, &relative) &&
                         relative >= 0 && relative < query_blocks;
  check(b >= 0 && b < batch && h >= 0 && h < heads_kv && in_blocks,
        "BlockSelection::kept: (b, h, query_block) = (", b, ", ", h, ", ", query_block,
        ") is outside batch ", batch, ", heads_kv ", heads_kv, ", the ", query_blocks,
        " query blocks from ", first_query_block);
  // The list (b * heads_kv + h) * query_blocks + relative; never one outside blocks.
  std::int64_t list = 0;
  const bool fits = !__builtin_mul_overflow(b, heads_kv, &list) &&
                    !__builtin_add_overflow(list, h, &list) &&
                    !__builtin_mul_overflow(list, query_blocks, &list) &&
                    !__builtin_add_overflow(list, relative, &list);
  const bool inside = fits && static_cast<std::size_t>(list) + 1 < offsets.size();
  const auto at = inside ? static_cast<std::size_t>(list) : 0;
  const auto size = static_cast<std::int64_t>(blocks.size());
  check(inside && offsets[at] >= 0 && offsets[at] <= offsets[at + 1] && offsets[at + 1] <= size,
        "BlockSelection::kept: the list of (b, h, query_block) = (", b, ", ", h, ", ", query_block,
        ") is not within the ", offsets.size(), " offsets and ", size,
        " blocks: the selection breaks its layout");
  *count = offsets[at + 1] - offsets[at];
  return blocks.data() + offsets[at];
}

namespace {

void require_sparse_options(const char* function, const BlockSparseOptions& sparse) {
  check(std::isfinite(sparse.budget) && sparse.budget > 0 && sparse.budget <= 1, function,
        ": budget must be in (0, 1] (the fraction of key blocks kept), got ", sparse.budget);
  check(std::isfinite(sparse.threshold) && sparse.threshold >= 0 && sparse.threshold <= 1, function,
        ": threshold must be in [0, 1] (0 = off; else the estimated attention mass "
        "to keep), got ",
        sparse.threshold);
  check(sparse.block_size >= 16 && sparse.block_size <= 4096, function,
        ": block_size must be in [16, 4096], got ", sparse.block_size);
  check(sparse.local_blocks >= 0, function, ": local_blocks must be >= 0, got ",
        sparse.local_blocks);
}

// The block geometry of a call: first query block and counts.
struct BlockLayout {
  Index first_query_block = 0;
  Index query_blocks = 0;
  Index key_blocks = 0;
};

// Empty views may have huge extents: ceil(Lk / block_size) and the last query position are
// computed without overflowing, and a call whose last query position passes 2^63 - 1 is
// rejected.
BlockLayout block_layout(const char* function, Index q_offset, Index len_q, Index len_k,
                         Index block_size) {
  BlockLayout layout;
  layout.key_blocks = len_k / block_size + (len_k % block_size != 0);
  if (len_q == 0) return layout;
  Index last = 0;
  check(!__builtin_add_overflow(q_offset, len_q - 1, &last), function, ": q_offset (", q_offset,
        ") + Lq (", len_q, ") passes the largest position, 2^63 - 1");
  layout.first_query_block = detail::floor_divide(q_offset, block_size);
  layout.query_blocks = detail::floor_divide(last, block_size) - layout.first_query_block + 1;
  return layout;
}

// The number of lists of a selection, batch * heads_kv * query_blocks, checked like a size.
Index list_count(const char* function, Index batch, Index heads_kv, const BlockLayout& layout) {
  return detail::checked_numel<std::int64_t>(function, {batch, heads_kv, layout.query_blocks});
}

// Whether a call has no query row to compute (out and lse are empty).
template <typename T>
bool no_rows(TensorView<const T, 4> q) {
  return q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0;
}

detail::Visibility visibility_of(const AttentionOptions& options, Index len_q, Index len_k,
                                 Index q_offset) {
  return detail::Visibility::make(options.causal, options.window_left, options.window_right,
                                  options.sink_tokens, len_q, len_k, q_offset);
}

template <typename T>
BlockSelection select_impl(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                           const AttentionOptions& options, const BlockSparseOptions& sparse) {
  require_sparse_options(function, sparse);
  detail::require_valid_view(function, "q", q);
  detail::require_valid_view(function, "k", k);
  // The kernel pools rows of q and k as contiguous vectors.
  detail::require_unit_inner_stride(function, "q", q);
  detail::require_unit_inner_stride(function, "k", k);
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2), dim = q.size(3);
  const Index heads_kv = k.size(1), len_k = k.size(2);
  check(dim >= 1, function, ": q.shape[3] (D) must be >= 1, got ", dim);
  check(heads_kv > 0 ? heads_q % heads_kv == 0 : heads_q == 0, function,
        ": q.shape[1] (Hq = ", heads_q, ") must be a multiple of k.shape[1] (Hkv = ", heads_kv,
        ")");
  detail::require_extent(function, "k", k, 0, "q.shape[0] (B)", batch);
  detail::require_extent(function, "k", k, 3, "q.shape[3] (D)", dim);
  detail::require_attention_options(function, options);
  detail::require_q_offset(function, options.q_offset);

  const Index q_offset = options.q_offset == -1 ? len_k - len_q : options.q_offset;
  const BlockLayout layout = block_layout(function, q_offset, len_q, len_k, sparse.block_size);
  const detail::Visibility visibility = visibility_of(options, len_q, len_k, q_offset);
  const double scale = detail::resolve_scale<compute_type_t<T>>(function, options, dim);

  BlockSelection selection;
  selection.block_size = sparse.block_size;
  selection.batch = batch;
  selection.heads_kv = heads_kv;
  selection.first_query_block = layout.first_query_block;
  selection.query_blocks = layout.query_blocks;
  selection.key_blocks = layout.key_blocks;
  const Index lists = list_count(function, batch, heads_kv, layout);
  // Room for each list's `keep`; the kernel may keep fewer (threshold), compacted below.
  std::vector<Index> capacity(static_cast<std::size_t>(lists) + 1, 0);
  for (Index list = 0; list < lists; ++list) {
    const Index block = layout.first_query_block + list % layout.query_blocks;
    const detail::QueryBlockGeometry geometry = detail::query_block_geometry(
        visibility, q_offset, len_q, sparse.block_size, block, sparse.budget, sparse.local_blocks);
    capacity[static_cast<std::size_t>(list) + 1] =
        capacity[static_cast<std::size_t>(list)] + geometry.keep;
  }
  selection.blocks.resize(static_cast<std::size_t>(capacity.back()));
  std::vector<Index> counts(static_cast<std::size_t>(lists), 0);
  if (lists > 0) {
    detail::BlockSelectPlan<T> plan;
    plan.q = q;
    plan.k = k;
    plan.visibility = visibility;
    plan.q_offset = q_offset;
    plan.scale = scale;
    plan.softcap = options.softcap;
    plan.block_size = sparse.block_size;
    plan.local_blocks = sparse.local_blocks;
    plan.budget = sparse.budget;
    plan.threshold = sparse.threshold;
    plan.first_query_block = layout.first_query_block;
    plan.query_blocks = layout.query_blocks;
    plan.key_blocks = layout.key_blocks;
    plan.capacity = capacity.data();
    plan.blocks = selection.blocks.data();
    plan.counts = counts.data();
    plan.num_threads = detail::resolve_num_threads(options.num_threads);
    detail::kernels<T>().block_sparse_select(plan);
  }
  selection.offsets.assign(static_cast<std::size_t>(lists) + 1, 0);
  std::int64_t written = 0;
  for (Index list = 0; list < lists; ++list) {
    const auto at = static_cast<std::size_t>(list);
    const std::int64_t* from = selection.blocks.data() + capacity[at];
    std::copy(from, from + counts[at], selection.blocks.data() + written);
    written += counts[at];
    selection.offsets[at + 1] = written;
  }
  selection.blocks.resize(static_cast<std::size_t>(written));
  return selection;
}

// A selection must match the call's geometry and be a valid CSR of strictly increasing blocks.
void require_selection(const char* function, const BlockSelection& selection, Index batch,
                       Index heads_kv, Index q_offset, Index len_q, Index len_k) {
  check(selection.block_size >= 16 && selection.block_size <= 4096, function,
        ": selection.block_size must be in [16, 4096], got ", selection.block_size);
  const BlockLayout layout = block_layout(function, q_offset, len_q, len_k, selection.block_size);
  const auto mismatch = [&](const char* name, Index got, Index expected, const char* what) {
    check(got == expected, function, ": selection.", name, " must be ", expected, " (", what,
          "), got ", got, "; was the selection made for other q, k or q_offset?");
  };
  mismatch("batch", selection.batch, batch, "q.shape[0]");
  mismatch("heads_kv", selection.heads_kv, heads_kv, "k.shape[1]");
  mismatch("first_query_block", selection.first_query_block, layout.first_query_block,
           "floor(q_offset / block_size)");
  mismatch("query_blocks", selection.query_blocks, layout.query_blocks,
           "the query blocks holding the call's queries");
  mismatch("key_blocks", selection.key_blocks, layout.key_blocks, "ceil(Lk / block_size)");
  const Index lists = list_count(function, batch, heads_kv, layout);
  check(static_cast<Index>(selection.offsets.size()) == lists + 1, function,
        ": selection.offsets must have batch * heads_kv * query_blocks + 1 = ", lists + 1,
        " entries, got ", selection.offsets.size());
  check(selection.offsets[0] == 0 &&
            selection.offsets.back() == static_cast<Index>(selection.blocks.size()),
        function, ": selection.offsets must run from 0 to selection.blocks.size() = ",
        selection.blocks.size(), ", got ", selection.offsets[0], " .. ", selection.offsets.back());
  for (Index list = 0; list < lists; ++list) {
    const auto at = static_cast<std::size_t>(list);
    check(selection.offsets[at] <= selection.offsets[at + 1], function,
          ": selection.offsets must not decrease, got offsets[", list,
          "] = ", selection.offsets[at], " > offsets[", list + 1,
          "] = ", selection.offsets[at + 1]);
  }
  for (Index list = 0; list < lists; ++list) {
    const auto at = static_cast<std::size_t>(list);
    const Index begin = selection.offsets[at], end = selection.offsets[at + 1];
    for (Index i = begin; i < end; ++i) {
      const std::int64_t block = selection.blocks[static_cast<std::size_t>(i)];
      check(block >= 0 && block < layout.key_blocks, function, ": selection.blocks[", i,
            "] = ", block, " is not a key block in [0, ", layout.key_blocks, ")");
      // (The message's arguments are evaluated before the check: no blocks[-1] for i = 0.)
      const std::int64_t previous =
          i == begin ? -1 : selection.blocks[static_cast<std::size_t>(i) - 1];
      check(previous < block, function, ": the blocks of list ", list,
            " must be strictly increasing; selection.blocks[", i - 1, "] = ", previous,
            ", selection.blocks[", i, "] = ", block);
    }
  }
}

template <typename T>
void attend_impl(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                 TensorView<const T, 4> v, TensorView<T, 4> out, const AttentionOptions& options,
                 const BlockSelection& selection, TensorView<compute_type_t<T>, 3> lse) {
  const auto params = detail::prepare_attention<T>(function, q, k, v, out, options, lse, {});
  const Index len_q = q.size(2), len_k = k.size(2);
  require_selection(function, selection, q.size(0), k.size(1), params.q_offset, len_q, len_k);
  if (no_rows(q)) return;  // nothing to write (and no work may depend on the other extents)
  detail::BlockSparsePlan<T> plan;
  plan.params = params;
  plan.visibility = visibility_of(options, len_q, len_k, params.q_offset);
  plan.block_size = selection.block_size;
  plan.first_query_block = selection.first_query_block;
  plan.query_blocks = selection.query_blocks;
  plan.offsets = selection.offsets.data();
  plan.blocks = selection.blocks.data();
  detail::kernels<T>().block_sparse_attention(plan);
}

constexpr const char* kSelect = "block_sparse_select";
constexpr const char* kAttend = "block_sparse_attention";

template <typename T>
void select_and_attend(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                       TensorView<T, 4> out, const AttentionOptions& options,
                       const BlockSparseOptions& sparse, TensorView<compute_type_t<T>, 3> lse) {
  // Everything the attention checks is checked before the selection is made.
  detail::prepare_attention<T>(kAttend, q, k, v, out, options, lse, {});
  if (no_rows(q)) {  // nothing to select nor write: only the options are left to check
    require_sparse_options(kAttend, sparse);
    return;
  }
  const BlockSelection selection = select_impl<T>(kAttend, q, k, options, sparse);
  attend_impl<T>(kAttend, q, k, v, out, options, selection, lse);
}

}  // namespace

#define FOVEAL_BLOCK_SPARSE_ENTRY_POINTS(T, Lse)                                                 \
  BlockSelection block_sparse_select(TensorView<const T, 4> q, TensorView<const T, 4> k,         \
                                     const AttentionOptions& options,                            \
                                     const BlockSparseOptions& sparse) {                         \
    return select_impl<T>(kSelect, q, k, options, sparse);                                       \
  }                                                                                              \
  void block_sparse_attention(TensorView<const T, 4> q, TensorView<const T, 4> k,                \
                              TensorView<const T, 4> v, TensorView<T, 4> out,                    \
                              const AttentionOptions& options, const BlockSelection& selection,  \
                              TensorView<Lse, 3> lse) {                                          \
    attend_impl<T>(kAttend, q, k, v, out, options, selection, lse);                              \
  }                                                                                              \
  void block_sparse_attention(TensorView<const T, 4> q, TensorView<const T, 4> k,                \
                              TensorView<const T, 4> v, TensorView<T, 4> out,                    \
                              const AttentionOptions& options, const BlockSparseOptions& sparse, \
                              TensorView<Lse, 3> lse) {                                          \
    select_and_attend<T>(q, k, v, out, options, sparse, lse);                                    \
  }

FOVEAL_BLOCK_SPARSE_ENTRY_POINTS(float, float)
FOVEAL_BLOCK_SPARSE_ENTRY_POINTS(double, double)
FOVEAL_BLOCK_SPARSE_ENTRY_POINTS(bfloat16, float)
FOVEAL_BLOCK_SPARSE_ENTRY_POINTS(float16, float)

#undef FOVEAL_BLOCK_SPARSE_ENTRY_POINTS

}  // namespace foveal
