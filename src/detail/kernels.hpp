// src/detail/kernels.hpp (private) — the kernels of an ISA level, as one table of entry points.
//
// An entry point validates its arguments and plans the call in generic code, then hands a plan
// (the structs below: views, scalars, the results of the setup) to the kernel of the ISA level
// chosen at the first call (src/dispatch.cpp). FOVEAL_KERNELS lists the kernels once: the table
// type, each level's table (src/kernels/level.cpp) and the declarations of the level's
// implementations all come from this one list. A kernel writes outputs; it never throws.
#pragma once

#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "detail/block_sparse_geometry.hpp"
#include "detail/fft.hpp"
#include "detail/flash_plan.hpp"
#include "detail/isa.hpp"
#include "detail/mask.hpp"
#include "detail/sparsek_selection.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/sparsek/attention.hpp"

namespace foveal::detail {

// decode_attention: split-KV over the stored keys of every sequence. A chunk is the positions
// of one sequence that one group of engine tiles visits; with `split`, each chunk's rows go to a
// scratch state and the states of a query row are merged in chunk order.
struct DecodeChunk {
  Index sequence;
  KeyRange positions;
};

// KV is the cache's element type: T, or q8_block under float queries.
template <typename T, typename KV = T>
struct DecodePlan {
  FlashParams<T, KV> params;
  const KVCache<KV>* cache = nullptr;
  std::vector<Visibility> visibility;  // one per sequence, positions from its first key
  std::vector<Index> first_key;        // [B] each sequence's first real position, or empty: 0
  std::vector<DecodeChunk> chunks;     // in sequence order, absolute positions
  std::vector<Index> first_chunk;      // [B + 1]: the chunks of sequence b start here
  bool split = false;
};

// quest_decode_attention: the kernel selects each (sequence, kv head)'s pages from the cache's
// page bounds, then runs one engine tile per (sequence, kv head, tile) over the kept pages.
template <typename T, typename KV = T>
struct QuestPlan {
  FlashParams<T, KV> params;
  const KVCache<KV>* cache = nullptr;
  std::vector<Visibility> visibility;  // one per sequence
  double budget = 1;
  Index local_pages = 1;
};

// batch_decode_attention / batch_prefill_attention over a PagedKVCache. A pass is one run of
// the engine over one query tensor (the call's q, or the stacked queries of a group of
// sequences that share a prefix); its k and v are the pool seen as [entries (stride 0), Hkv,
// rows, D], a page's slot r being row page * page_rows + r. A chunk is the key positions one
// group of tiles visits for one query entry, written to the outputs or to a state; the states of
// a call's output entry s are merged in the order of sources[first_source[s] ..
// first_source[s + 1]).
// T is the element type of q and out (states and lse are in its compute type); KV the pool's:
// T, or q8_block under float queries.
template <typename T>
struct PagedChunk {
  Index entry = 0;       // dim 0 of the pass's q
  Index table = 0;       // which page table and visibility (PagedPlan::tables)
  KeyRange positions;    // the key positions visited
  Index q_offset = 0;    // position of the entry's query 0
  Index first_task = 0;  // the chunk's tasks start here (heads_kv * tiles of them)
  TensorView<T, 4> out;  // the outputs, unless state is set
  TensorView<compute_type_t<T>, 4> state;  // a state with stride 0 over dim 0, or null
  TensorView<compute_type_t<T>, 3> lse;
};

template <typename T, typename KV = T>
struct PagedPass {
  FlashParams<T, KV> params;
  std::vector<PagedChunk<T>> chunks;
  Index num_tasks = 0;
};

// One state of output row (s, h, i): out + h * out_head_stride + i * Dv, lse + h *
// lse_head_stride + i.
template <typename T>
struct PagedSource {
  const compute_type_t<T>* out;
  const compute_type_t<T>* lse;
  Index out_head_stride;
  Index lse_head_stride;
};

template <typename T, typename KV = T>
struct PagedPlan {
  std::vector<PagedPass<T, KV>> passes;
  std::vector<const Index*> tables;    // page tables
  std::vector<Visibility> visibility;  // one per table entry
  Index page_size = 0;
  Index page_rows = 0;
  std::vector<PagedSource<T>> sources;
  std::vector<Index> first_source;  // [S + 1]
  TensorView<T, 4> out;             // [S, Hq, Lq, Dv]
  TensorView<compute_type_t<T>, 3> lse;
  int num_threads = 1;
};

// sparsek_attention: the selection of every (batch, kv head) and the union of selected keys of
// every tile, made by the generic code.
template <typename T>
struct SparseKPlan {
  FlashParams<T> params;
  TensorView<const T, 3> u;
  SparseKGeometry geometry;
  SparseKGate gate = SparseKGate::value;
  std::vector<HeadSelection> selections;  // [B * Hkv]
  std::vector<TileUnions> unions;         // [B * Hkv]
  Index widest_union = 0;
};

// sparsek_attention_backward: the kernel selects again per (batch, kv head) (τ and the tile
// unions, as the forward did) and writes grad_q, grad_k, grad_v and, when not null, grad_u.
template <typename T>
struct SparseKBackwardPlan {
  BackwardParams<T> params;
  TensorView<const T, 3> u;
  TensorView<T, 3> grad_u;  // [B, Hkv, Lk] or null
  SparseKGeometry geometry;
  SparseKGate gate = SparseKGate::value;
};

// SparseKCache::attend: every tile row is the newest query; the selected slots of head
// (b, h) are the rows slot_rows[0, selected) with scores scores[(b * Hkv + h) * score_stride ..].
template <typename T>
struct SparseKCachePlan {
  FlashParams<T> params;
  const Index* slot_rows = nullptr;
  const compute_type_t<T>* scores = nullptr;  // (16-bit storage: float scores)
  Index score_stride = 0;
  Index selected = 0;
  Index always_visible = 0;
  std::vector<compute_type_t<T>> thresholds;  // [B * Hkv]: τ of each head
  SparseKGate gate = SparseKGate::value;
};

// block_sparse_select and token_topk_select: the pooled estimate and the selection of every
// list (batch, kv head, query block), list i = (b * Hkv + h) * query_blocks + (block -
// first_query_block). The kernel writes list i's kept items (key blocks or keys), ascending, at
// items[capacity[i] ..] and their number at counts[i] (at most capacity[i + 1] - capacity[i],
// the block's `keep`).
template <typename T>
struct SelectPlan {
  TensorView<const T, 4> q, k;
  Visibility visibility;
  Index q_offset = 0;
  double scale = 1;
  double softcap = 0;
  Index block_size = 64;
  Index local = 1;         // local_blocks or local_tokens
  Index last_queries = 0;  // vertical_slash_select: the query rows of the estimate
  Index outliers = 0;      // token_topk_select: the queries per block scored on their own
  double budget = 1;
  double threshold = 0;
  Index first_query_block = 0;
  Index query_blocks = 0;
  const Index* capacity = nullptr;  // [lists + 1]
  std::int64_t* items = nullptr;
  Index* counts = nullptr;  // [lists]
  int num_threads = 1;
};

// block_sparse_attention and token_topk_attention over a validated selection
// (foveal::BlockSelection's or foveal::TokenSelection's layout: items are key blocks or keys).
template <typename T>
struct SelectionPlan {
  FlashParams<T> params;
  Visibility visibility;
  Index block_size = 64;
  Index first_query_block = 0;
  Index query_blocks = 0;
  const std::int64_t* offsets = nullptr;
  const std::int64_t* items = nullptr;
};

// merge_states: out = merge(a, b) row by row, rows [0, B * H * L) of [B, H, L, Dv].
template <typename T>
struct MergePlan {
  TensorView<const T, 4> out_a, out_b;
  TensorView<const T, 3> lse_a, lse_b;
  TensorView<T, 4> out;
  TensorView<T, 3> lse;
  int num_threads = 1;
};

// vq_assign (and the VectorQuantizer's assignments): the nearest code of every row of x [N, D]
// by score offset_k + scale_k · x·c_k, ties to the lowest index.
// The integer lane type that carries code indices next to T scores (K is at most its maximum).
template <typename T>
using VqLaneIndex = std::conditional_t<sizeof(T) == 4, std::int32_t, std::int64_t>;

template <typename T>
struct VqAssignPlan {
  const T* x;
  Index x_stride;
  Index rows;
  Index dim;
  const T* codebook;
  Index code_stride;
  Index codes;
  const T* code_offset;  // [K]: ‖c_k‖² (cosine: 1, or 0 for a zero code)
  const T* code_scale;   // [K]: −2 (cosine: −2 / ‖c_k‖, or 0)
  bool cosine;
  std::int64_t* indices;
  Index index_stride;
  T* sq_distances;  // may be null
  Index distance_stride;
  int num_threads;  // resolved
};

// Moments PDE-SSM's backward accumulates per channel (pde_moments_and_adjoint).
inline constexpr int kPdeMomentCount = 8;

// PDE-SSM's backward: what the fused moments-and-adjoint pass over one chunk's spectra needs
// (derivative null: the initial-value mode).
template <typename T>
struct PdeMomentPass {
  const T* multiplier;        // the chunk's table (skip folded in)
  const T* derivative;        // the chunk's ∂m/∂λ table (forced mode), else null: τ (m − D)
  const T* time;              // [lanes] τ
  const T* skip;              // [lanes] D
  const T* column_weight;     // [Ws] w(kx) (1 on self-conjugate columns, else 2)
  const T* column_weight_k;   // [Ws] w(kx) kx
  const T* column_weight_kk;  // [Ws] w(kx) kx²
  const double* row_k;        // [Ht] ky
  Index rows, columns, lanes;
};

// SpadeEmbedding::forward: the folded rows (padded to kSpadeRowFloats, the widest level's lanes,
// so that every level reads whole vectors) and the validated inputs. float only.
inline constexpr Index kSpadeRowFloats = 16;
// spade_embedding_backward's sums: rows padded to whole column blocks of every level.
inline constexpr Index kSpadeSumFloats = 64;

struct SpadeEmbeddingPlan {
  TensorView<const std::int64_t, 3> ids;  // [B, T, Fd]
  TensorView<const float, 3> values;      // [B, T, Fc]
  TensorView<const float, 3> condition;   // [B, T, condition_dim] or null
  TensorView<float, 3> out;               // [B, T, d_model]
  const float* const* tables = nullptr;   // [Fd]: folded rows, row_stride apart
  const std::int64_t* pad_ids = nullptr;  // [Fd]
  Index num_discrete = 0;
  const Index* hidden_sizes = nullptr;  // [Fc]
  Index num_continuous = 0;
  const float* hidden_weight = nullptr;  // all continuous features' hidden units, concatenated
  const float* hidden_bias = nullptr;
  const float* dense_rows = nullptr;  // [dense_inputs, row_stride]
  const float* bias = nullptr;        // [row_stride]
  const float* pad_row = nullptr;     // [d_model]
  Index row_stride = 0, d_model = 0, dense_inputs = 0, condition_dim = 0;
  int num_threads = 1;  // resolved
};

// spade_embedding_backward: the sums the gradients of SpadeEmbedding's weights are made of
// (src/spade.cpp finishes them in double). Rows whose discrete ids are all PAD (their output is
// the constant pad vector) contribute nothing. float only.
struct SpadeEmbeddingBackwardPlan {
  TensorView<const std::int64_t, 3> ids;  // [B, T, Fd]
  TensorView<const float, 3> values;      // [B, T, Fc]
  TensorView<const float, 3> condition;   // [B, T, condition_dim] or null
  TensorView<const float, 3> grad_out;    // [B, T, d_model], unit last stride
  TensorView<float, 3> grad_condition;    // [B, T, condition_dim] or null
  const std::int64_t* pad_ids = nullptr;  // [Fd]
  Index num_discrete = 0;
  const Index* hidden_sizes = nullptr;  // [Fc]
  Index num_continuous = 0;
  const float* hidden_weight = nullptr;  // all continuous features' hidden units
  const float* hidden_bias = nullptr;
  const float* dense_rows = nullptr;  // [dense_inputs, row_stride], zero padded
  Index row_stride = 0, d_model = 0, dense_inputs = 0, condition_dim = 0;
  // Outputs, sum_stride floats per row (a multiple of kSpadeSumFloats), zeroed by the caller
  // and added into:
  Index sum_stride = 0;
  float* const* table_sums = nullptr;  // [Fd]: [V_f, row_stride]: sum of grad_out rows by id
  float* dense_sums = nullptr;         // [dense_inputs, row_stride]: sum of coefficient * grad_out
  float* grad_sum = nullptr;           // [row_stride]: sum of grad_out rows
  double* hidden_grads = nullptr;      // [2, hidden total]: d/d hidden_weight, d/d hidden_bias
  int num_threads = 1;                 // resolved
};

// X(name, parameters): every kernel, for T = float and T = double.
#define FOVEAL_KERNELS(X)                                                      \
  X(band_attention, (const FlashParams<T>&, const BandPolicy&))                \
  X(band_attention_backward, (const BackwardParams<T>&, const BandPolicy&))    \
  X(decode_attention, (const DecodePlan<T>&))                                  \
  X(quest_decode_attention, (const QuestPlan<T>&))                             \
  X(paged_attention, (const PagedPlan<T>&))                                    \
  X(sparsek_attention, (const SparseKPlan<T>&))                                \
  X(block_sparse_select, (const SelectPlan<T>&))                               \
  X(block_sparse_attention, (const SelectionPlan<T>&))                         \
  X(token_topk_select, (const SelectPlan<T>&))                                 \
  X(token_topk_attention, (const SelectionPlan<T>&))                           \
  X(vertical_slash_select, (const SelectPlan<T>&))                             \
  X(sparsek_attention_backward, (const SparseKBackwardPlan<T>&))               \
  X(sparsek_cache_attention, (const SparseKCachePlan<T>&))                     \
  X(merge_states, (const MergePlan<T>&))                                       \
  X(vq_assign, (const VqAssignPlan<T>&))                                       \
  X(real_fft_2d, (Index, Index, std::shared_ptr<const RealFft2dKernel<T>>&))   \
  X(pde_multiply_spectrum, (T*, const T*, Index, Index, bool))                 \
  X(pde_moments_and_adjoint, (const PdeMomentPass<T>&, T*, const T*, double*)) \
  X(spade_embedding, (const SpadeEmbeddingPlan&))                              \
  X(spade_embedding_backward, (const SpadeEmbeddingBackwardPlan&))

// One level's kernels for element type T.
template <typename T>
struct Kernels {
#define FOVEAL_KERNEL_POINTER(name, parameters) void(*name) parameters;
  FOVEAL_KERNELS(FOVEAL_KERNEL_POINTER)
#undef FOVEAL_KERNEL_POINTER
};

// The kernels that also take 16-bit storage (bfloat16, float16), computing in float.
#define FOVEAL_HALF_KERNELS(X)                                  \
  X(band_attention, (const FlashParams<T>&, const BandPolicy&)) \
  X(decode_attention, (const DecodePlan<T>&))                   \
  X(quest_decode_attention, (const QuestPlan<T>&))              \
  X(paged_attention, (const PagedPlan<T>&))                     \
  X(sparsek_attention, (const SparseKPlan<T>&))                 \
  X(block_sparse_select, (const SelectPlan<T>&))                \
  X(block_sparse_attention, (const SelectionPlan<T>&))          \
  X(token_topk_select, (const SelectPlan<T>&))                  \
  X(token_topk_attention, (const SelectionPlan<T>&))            \
  X(vertical_slash_select, (const SelectPlan<T>&))              \
  X(sparsek_cache_attention, (const SparseKCachePlan<T>&))

template <typename T>
struct HalfKernels {
#define FOVEAL_KERNEL_POINTER(name, parameters) void(*name) parameters;
  FOVEAL_HALF_KERNELS(FOVEAL_KERNEL_POINTER)
#undef FOVEAL_KERNEL_POINTER
};

// The kernels over an 8-bit KV cache (KVCache<q8_block>, PagedKVCache<q8_block>) with float
// queries.
struct Q8Kernels {
  void (*decode_attention)(const DecodePlan<float, q8_block>&);
  void (*quest_decode_attention)(const QuestPlan<float, q8_block>&);
  void (*paged_attention)(const PagedPlan<float, q8_block>&);
};

struct KernelTable {
  Kernels<float> f32;
  Kernels<double> f64;
  HalfKernels<bfloat16> bf16;
  HalfKernels<float16> f16;
  Q8Kernels q8;
};

// The table of the level in use, chosen at the first call (FOVEAL_ISA or the best level the CPU
// supports); throws foveal::Error, at every call, when FOVEAL_ISA names no usable level.
const KernelTable& kernel_table();

template <typename T>
const auto& kernels() {
  if constexpr (std::is_same_v<T, float>) {
    return kernel_table().f32;
  } else if constexpr (std::is_same_v<T, double>) {
    return kernel_table().f64;
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return kernel_table().bf16;
  } else if constexpr (std::is_same_v<T, q8_block>) {
    return kernel_table().q8;
  } else {
    static_assert(std::is_same_v<T, float16>, "foveal stores float, double, bfloat16, float16");
    return kernel_table().f16;
  }
}

}  // namespace foveal::detail

// Each level's table, defined by src/kernels/level.cpp: foveal_kernels_<namespace>.
#define FOVEAL_KERNEL_TABLE_DECLARATION(ns, name, check) \
  extern const foveal::detail::KernelTable foveal_kernels_##ns;
FOVEAL_ISA_LEVELS(FOVEAL_KERNEL_TABLE_DECLARATION)
#undef FOVEAL_KERNEL_TABLE_DECLARATION
