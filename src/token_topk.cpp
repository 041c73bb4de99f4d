// foveal::token_topk_select / token_topk_attention and vertical_slash_select /
// vertical_slash_attention (two ways to select a TokenSelection, one attention over it):
// validation, the selection's layout, then the level kernels (src/kernels/token_topk.hpp,
// src/kernels/vertical_slash.hpp).
#include "foveal/attention/token_topk.hpp"

#include <cmath>
#include <type_traits>

#include "detail/attention_setup.hpp"
#include "detail/block_sparse_geometry.hpp"
#include "detail/sparse_lists.hpp"
#include "foveal/attention/vertical_slash.hpp"

namespace foveal {

const std::int64_t* TokenSelection::kept(std::int64_t b, std::int64_t h, std::int64_t query_block,
                                         std::int64_t* count) const {
  return detail::kept_list("TokenSelection::kept", *this, keys, b, h, query_block, count);
}

namespace {

template <typename Sparse>
void require_sparse_options(const char* function, const Sparse& sparse) {
  check(std::isfinite(sparse.budget) && sparse.budget > 0 && sparse.budget <= 1, function,
        ": budget must be in (0, 1] (the fraction of candidate keys kept), got ", sparse.budget);
  check(std::isfinite(sparse.threshold) && sparse.threshold >= 0 && sparse.threshold <= 1, function,
        ": threshold must be in [0, 1] (0 = off; else the estimated attention mass to keep), "
        "got ",
        sparse.threshold);
  check(sparse.block_size >= 16 && sparse.block_size <= 4096, function,
        ": block_size must be in [16, 4096], got ", sparse.block_size);
  check(sparse.local_tokens >= 0, function, ": local_tokens must be >= 0, got ",
        sparse.local_tokens);
  if constexpr (std::is_same_v<Sparse, VerticalSlashOptions>) {
    check(sparse.last_queries >= 1, function,
          ": last_queries must be >= 1 (the queries that estimate the lines), got ",
          sparse.last_queries);
  } else {
    check(sparse.outliers >= 0 && sparse.outliers < sparse.block_size, function,
          ": outliers must be in [0, block_size) = [0, ", sparse.block_size,
          ") (the queries of a block scored on their own), got ", sparse.outliers);
  }
}

template <typename T, typename Sparse>
TokenSelection select_impl(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                           const AttentionOptions& options, const Sparse& sparse) {
  require_sparse_options(function, sparse);
  detail::SelectPlan<T> plan =
      detail::select_plan<T>(function, q, k, options, sparse.block_size, sparse.budget,
                             sparse.threshold, sparse.local_tokens);
  auto kernel = detail::kernels<T>().token_topk_select;
  if constexpr (std::is_same_v<Sparse, VerticalSlashOptions>) {
    plan.last_queries = sparse.last_queries;
    kernel = detail::kernels<T>().vertical_slash_select;
  } else {
    plan.outliers = sparse.outliers;
  }
  TokenSelection selection;
  selection.block_size = sparse.block_size;
  selection.batch = q.size(0);
  selection.heads_kv = k.size(1);
  selection.first_query_block = plan.first_query_block;
  selection.query_blocks = plan.query_blocks;
  selection.len_k = k.size(2);
  selection.offsets = detail::run_select(
      function, plan,
      [&](Index block) {
        return detail::token_block_geometry(plan.visibility, plan.q_offset, q.size(2),
                                            sparse.block_size, block, sparse.budget,
                                            sparse.local_tokens)
            .keep;
      },
      kernel, selection.keys);
  return selection;
}

constexpr const char* kSelect = "token_topk_select";
constexpr const char* kAttend = "token_topk_attention";
constexpr const char* kLinesSelect = "vertical_slash_select";
constexpr const char* kLinesAttend = "vertical_slash_attention";

// The one-call form; vertical_slash_attention too, over token top-k's engine.
template <typename T, typename Sparse>
void select_and_attend(const char* function, TensorView<const T, 4> q, TensorView<const T, 4> k,
                       TensorView<const T, 4> v, TensorView<T, 4> out,
                       const AttentionOptions& options, const Sparse& sparse,
                       TensorView<compute_type_t<T>, 3> lse) {
  detail::select_and_attend<T>(
      function, q, k, v, out, options, lse,
      [&] { return select_impl<T>(function, q, k, options, sparse); },
      [&] { require_sparse_options(function, sparse); }, detail::kernels<T>().token_topk_attention);
}

}  // namespace

#define FOVEAL_TOKEN_TOPK_ENTRY_POINTS(T, Lse)                                                \
  TokenSelection token_topk_select(TensorView<const T, 4> q, TensorView<const T, 4> k,        \
                                   const AttentionOptions& options,                           \
                                   const TokenTopkOptions& sparse) {                          \
    return select_impl<T>(kSelect, q, k, options, sparse);                                    \
  }                                                                                           \
  void token_topk_attention(TensorView<const T, 4> q, TensorView<const T, 4> k,               \
                            TensorView<const T, 4> v, TensorView<T, 4> out,                   \
                            const AttentionOptions& options, const TokenSelection& selection, \
                            TensorView<Lse, 3> lse) {                                         \
    detail::attend_selection<T>(kAttend, q, k, v, out, options, selection, lse,               \
                                detail::kernels<T>().token_topk_attention);                   \
  }                                                                                           \
  void token_topk_attention(TensorView<const T, 4> q, TensorView<const T, 4> k,               \
                            TensorView<const T, 4> v, TensorView<T, 4> out,                   \
                            const AttentionOptions& options, const TokenTopkOptions& sparse,  \
                            TensorView<Lse, 3> lse) {                                         \
    select_and_attend<T>(kAttend, q, k, v, out, options, sparse, lse);                        \
  }                                                                                           \
  TokenSelection vertical_slash_select(TensorView<const T, 4> q, TensorView<const T, 4> k,    \
                                       const AttentionOptions& options,                       \
                                       const VerticalSlashOptions& sparse) {                  \
    return select_impl<T>(kLinesSelect, q, k, options, sparse);                               \
  }                                                                                           \
  void vertical_slash_attention(TensorView<const T, 4> q, TensorView<const T, 4> k,           \
                                TensorView<const T, 4> v, TensorView<T, 4> out,               \
                                const AttentionOptions& options,                              \
                                const VerticalSlashOptions& sparse, TensorView<Lse, 3> lse) { \
    select_and_attend<T>(kLinesAttend, q, k, v, out, options, sparse, lse);                   \
  }

FOVEAL_TOKEN_TOPK_ENTRY_POINTS(float, float)
FOVEAL_TOKEN_TOPK_ENTRY_POINTS(double, double)
FOVEAL_TOKEN_TOPK_ENTRY_POINTS(bfloat16, float)
FOVEAL_TOKEN_TOPK_ENTRY_POINTS(float16, float)

#undef FOVEAL_TOKEN_TOPK_ENTRY_POINTS

}  // namespace foveal
