// foveal::block_sparse_select / block_sparse_attention: validation, the selection's layout, then
// the level kernels (src/kernels/block_sparse.hpp).
#include "foveal/attention/block_sparse.hpp"

#include <cmath>
#include <string>

#include "detail/attention_setup.hpp"
#include "detail/block_sparse_geometry.hpp"
#include "detail/sparse_lists.hpp"

namespace foveal {

const std::int64_t* BlockSelection::kept(std::int64_t b, std::int64_t h, std::int64_t query_block,
                                         std::int64_t* count) const {
  return detail::kept_list("BlockSelection::kept", *this, blocks, b, h, query_block, count);
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

template <typename T>
BlockSelection select_impl(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                           const AttentionOptions& options, const BlockSparseOptions& sparse) {
  require_sparse_options(function, sparse);
  const detail::SelectPlan<T> plan =
      detail::select_plan<T>(function, q, k, options, sparse.block_size, sparse.budget,
                             sparse.threshold, sparse.local_blocks);
  const Index len_q = q.size(2), len_k = k.size(2);
  BlockSelection selection;
  selection.block_size = sparse.block_size;
  selection.batch = q.size(0);
  selection.heads_kv = k.size(1);
  selection.first_query_block = plan.first_query_block;
  selection.query_blocks = plan.query_blocks;
  selection.key_blocks = detail::ceil_divide(len_k, sparse.block_size);
  selection.offsets = detail::run_select(
      function, plan,
      [&](Index block) {
        return detail::query_block_geometry(plan.visibility, plan.q_offset, len_q,
                                            sparse.block_size, block, sparse.budget,
                                            sparse.local_blocks)
            .keep;
      },
      detail::kernels<T>().block_sparse_select, selection.blocks);
  return selection;
}

constexpr const char* kSelect = "block_sparse_select";
constexpr const char* kAttend = "block_sparse_attention";

template <typename T>
void select_and_attend(TensorView<const T, 4> q, TensorView<const T, 4> k, TensorView<const T, 4> v,
                       TensorView<T, 4> out, const AttentionOptions& options,
                       const BlockSparseOptions& sparse, TensorView<compute_type_t<T>, 3> lse) {
  detail::select_and_attend<T>(
      kAttend, q, k, v, out, options, lse,
      [&] { return select_impl<T>(kAttend, q, k, options, sparse); },
      [&] { require_sparse_options(kAttend, sparse); },
      detail::kernels<T>().block_sparse_attention);
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
    detail::attend_selection<T>(kAttend, q, k, v, out, options, selection, lse,                  \
                                detail::kernels<T>().block_sparse_attention);                    \
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
