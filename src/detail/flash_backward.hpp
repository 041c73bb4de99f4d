// src/detail/flash_backward.hpp (private) — the backward of the tiled attention engine.
//
// FlashAttention-2's backward (Dao, 2023): the probabilities P of a tile are recomputed from the
// forward's lse, D_i = Σ_d dO[i, d] O[i, d], and with dP = dO Vᵀ
//   dS = P ∘ (dP − D)  (times the softcap's tanh derivative),
//   dV += Pᵀ dO,   dK += scale dSᵀ Q,   dQ += scale dS K.
// It runs on the forward's visit policies, so a tile visits exactly the key blocks (and masks)
// the forward visited and a window costs O(L·W) here too. One task per (batch, kv head): its
// query tiles (every query head of the group) are visited in increasing order; a tile's dQ is
// accumulated in scratch over its key blocks and written once, and the kv head's dK and dV are
// accumulated in place, tile after tile. Every gradient element is therefore a sum in one fixed
// order, whatever the thread count: no atomics, no per-thread partial sums.
//
// Gated keys (SparseK): a policy with kGatesKeys (flash_engine.hpp) may weight the keys of the
// blocks it visits by index with per-(row, key) gates m. Where its gates_outputs() is true, the
// backward hands such a block to the policy's gate_gradients hook with P and dP = dO Vᵀ; the hook
// returns P ∘ m (the weights of dV) and dS (the weights of dQ and dK) in their place and takes
// the gradient of each gate for itself. With gates_logits() (the logits were scaled by m too) the
// logits before the gate are kept for it in raw_t.
//
// Layouts: the tile's queries are packed as in the forward (q_t[D][kBlockQ]; the score kernel
// turns q.k into base-2 logits) and grad_out likewise (do_t[Dv][kBlockQ]), so S and dP are the
// forward's score micro-kernel; P and dS stay transposed (s_t[key][row]); the three accumulations
// read their weights by broadcast, so one micro-kernel serves row-major (dQ) and transposed (dK,
// dV) weights.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// A gathered block of a gated policy as the backward hands it to gate_gradients: for keys
// j < block.count and rows r < row_vectors * kLanes, at j * kBlockQ + r.
template <typename T>
struct GatedBlockGradients {
  int row_vectors = 0;
  Index num_rows = 0;
  T* p_t = nullptr;              // in: P (the softmax weights, before any gate); out: P ∘ m
  T* dp_t = nullptr;             // in: dP = dO·v; out: dS = ∂loss/∂(q·k) / scale
  const T* raw_t = nullptr;      // the logits before the gate scaled them (gates_logits() only)
  const T* tanh_t = nullptr;     // the softcap's tanh of every logit; null without a softcap
  const T* row_delta = nullptr;  // [kBlockQ]: D_i = Σ_d dO[i, d] O[i, d]
  T logit_unit = 1;              // raw_t times this is s q·k
};

// True for policies with the backward's gated-key hooks for element type T.
template <typename Policy, typename T, typename = void>
struct HasGateGradientHooks : std::false_type {};
template <typename Policy, typename T>
struct HasGateGradientHooks<Policy, T,
                            std::void_t<decltype(std::declval<const Policy&>().gates_outputs()),
                                        decltype(std::declval<const Policy&>().gates_logits()),
                                        decltype(std::declval<const Policy&>().gate_gradients(
                                            std::declval<const KeyBlock&>(),
                                            std::declval<const GatedBlockGradients<T>&>()))>>
    : std::true_type {};

// acc_rows[r][col0 + i] += Σ_{j < count} w[j * j_stride + r * r_stride] * src_rows[j][col0 + i]
// for r < NR and i < CV * kLanes: NR output rows, CV vectors wide, each weight broadcast.
template <typename T, int NR, int CV>
inline void accumulate_micro(const T* w, Index j_stride, Index r_stride, const T* const* src_rows,
                             Index count, Index col0, T* const* acc_rows) {
  constexpr int L = kLanes<T>;
  Vec<T> sums[NR][CV];
  FOVEAL_UNROLL
  for (int r = 0; r < NR; ++r) {
    FOVEAL_UNROLL
    for (int c = 0; c < CV; ++c) sums[r][c] = load(acc_rows[r] + col0 + c * L);
  }
  for (Index j = 0; j < count; ++j) {
    const T* source = src_rows[j] + col0;
    Vec<T> values[CV];
    FOVEAL_UNROLL
    for (int c = 0; c < CV; ++c) values[c] = load(source + c * L);
    const T* weights = w + j * j_stride;
    FOVEAL_UNROLL
    for (int r = 0; r < NR; ++r) {
      const Vec<T> weight = splat(weights[r * r_stride]);
      FOVEAL_UNROLL
      for (int c = 0; c < CV; ++c) sums[r][c] += weight * values[c];
    }
  }
  FOVEAL_UNROLL
  for (int r = 0; r < NR; ++r) {
    FOVEAL_UNROLL
    for (int c = 0; c < CV; ++c) store(acc_rows[r] + col0 + c * L, sums[r][c]);
  }
}

// acc_rows[r][0 .. cols) += Σ_{j in range(r)} w[j * j_stride + r * r_stride] * src_rows[j][0 ..
// cols) for r < num_acc (a product of the weights, read either way round, with rows of `cols`).
// count_range(r0, r1) -> {j_begin, j_end} bounds the terms of rows [r0, r1) with a nonzero
// weight (a masked block's trimmed edges); the others are skipped. Their weights are exact
// zeros and the accumulators never hold -0 (they start at +0, and +0 + -0 is +0), so skipping
// them changes no bit.
template <typename T, typename CountRange>
inline void accumulate_rows(const T* w, Index j_stride, Index r_stride, const T* const* src_rows,
                            Index count, Index cols, T* const* acc_rows, Index num_acc,
                            CountRange&& count_range) {
  constexpr int L = kLanes<T>;
  const Index full_vectors = cols / L;
  for (Index r0 = 0; r0 < num_acc; r0 += kRowsPerMicro) {
    const int rows = static_cast<int>(std::min<Index>(kRowsPerMicro, num_acc - r0));
    const auto [range_begin, range_end] = count_range(r0, r0 + rows);
    const Index j_begin = std::clamp<Index>(range_begin, 0, count);
    const Index j_end = std::clamp<Index>(range_end, j_begin, count);
    if (j_end == j_begin) continue;
    const T* w_part = w + r0 * r_stride + j_begin * j_stride;
    for (Index c0 = 0; c0 < full_vectors; c0 += kColVectorsPerMicro) {
      const int vectors = static_cast<int>(std::min<Index>(kColVectorsPerMicro, full_vectors - c0));
      with_count<kRowsPerMicro>(rows, [&](auto nr) {
        with_count<kColVectorsPerMicro>(vectors, [&](auto cv) {
          accumulate_micro<T, decltype(nr)::value, decltype(cv)::value>(
              w_part, j_stride, r_stride, src_rows + j_begin, j_end - j_begin, c0 * L,
              acc_rows + r0);
        });
      });
    }
    // Columns past the last full vector.
    for (Index col = full_vectors * L; col < cols; ++col)
      for (Index r = r0; r < r0 + rows; ++r) {
        T sum = acc_rows[r][col];
        for (Index j = j_begin; j < j_end; ++j)
          sum += w[j * j_stride + r * r_stride] * src_rows[j][col];
        acc_rows[r][col] = sum;
      }
  }
}

// The same over every term.
template <typename T>
inline void accumulate_rows(const T* w, Index j_stride, Index r_stride, const T* const* src_rows,
                            Index count, Index cols, T* const* acc_rows, Index num_acc) {
  accumulate_rows(w, j_stride, r_stride, src_rows, count, cols, acc_rows, num_acc,
                  [count](Index, Index) { return std::pair<Index, Index>(0, count); });
}

// Per-thread scratch of BackwardRunner::run_head, allocated once per call.
template <typename T>
class BackwardWorkspace {
 public:
  // raw_logits: room for the logits before a gate (policies whose gates_logits() is true).
  BackwardWorkspace(Index dim, Index dim_v, int num_threads, bool raw_logits = false)
      : dq_stride_(round_up(dim)),
        q_t_size_(round_up(dim * kBlockQ)),
        do_t_size_(round_up(dim_v * kBlockQ)),
        tile_size_(round_up(kBlockK * kBlockQ)),
        dq_size_(round_up(kBlockQ * dq_stride_)),
        raw_size_(raw_logits ? tile_size_ : 0),
        memory_(allocate_aligned<T>(
            static_cast<std::size_t>(per_thread() * std::max(num_threads, 1)))) {}

  struct Scratch {
    T* q_t;     // [D][kBlockQ]: the tile's queries, transposed
    T* do_t;    // [Dv][kBlockQ]: the tile's grad_out, transposed
    T* s_t;     // [kBlockK][kBlockQ]: logits, then P
    T* dp_t;    // [kBlockK][kBlockQ]: dP, then dS
    T* tanh_t;  // [kBlockK][kBlockQ]: the softcap's tanh of each logit
    T* dq;      // [kBlockQ][dq_stride]: the tile's dQ, unscaled
    T* raw_t;   // [kBlockK][kBlockQ]: logits before a gate; null unless asked for
  };

  Index dq_stride() const { return dq_stride_; }

  Scratch for_this_thread() const {
    T* base = memory_.get() + per_thread() * thread_index();
    T* q_t = base;
    T* do_t = q_t + q_t_size_;
    T* s_t = do_t + do_t_size_;
    T* dp_t = s_t + tile_size_;
    T* tanh_t = dp_t + tile_size_;
    T* dq = tanh_t + tile_size_;
    T* raw_t = raw_size_ > 0 ? dq + dq_size_ : nullptr;
    return {q_t, do_t, s_t, dp_t, tanh_t, dq, raw_t};
  }

 private:
  static Index round_up(Index count) {
    constexpr Index line = static_cast<Index>(kTensorAlignment / sizeof(T));
    return (count + line - 1) / line * line;
  }
  Index per_thread() const {
    return q_t_size_ + do_t_size_ + 3 * tile_size_ + dq_size_ + raw_size_;
  }

  Index dq_stride_;
  Index q_t_size_;
  Index do_t_size_;
  Index tile_size_;
  Index dq_size_;
  Index raw_size_;
  AlignedArray<T> memory_;
};

template <typename T>
class BackwardRunner {
 public:
  explicit BackwardRunner(const BackwardParams<T>& params)
      : params_(params),
        forward_(params.forward, 0),
        group_(params.forward.q.size(1) / params.forward.k.size(1)),
        dim_(params.forward.q.size(3)),
        dim_v_(params.forward.v.size(3)),
        has_softcap_(params.forward.softcap > 0),
        logit_unit_(static_cast<T>(
            params.forward.scale /
            static_cast<double>(
                logit_multipliers<T>(params.forward.scale, params.forward.softcap).query))) {}

  // Every gradient of (batch, kv_head): grad_q of the group's query heads, grad_k and grad_v of
  // the kv head. policy_of_tile(flat_begin) gives the visit policy of the tile of rows
  // [flat_begin, flat_begin + kBlockQ), the forward's for that tile; tiles run in increasing
  // order. Query 0 sits at position q_offset (the forward's unless a variable-length call's
  // row says otherwise).
  template <typename PolicyOfTile>
  void run_head(Index batch, Index kv_head, const BackwardWorkspace<T>& ws,
                PolicyOfTile&& policy_of_tile) const {
    run_head(batch, kv_head, ws, params_.forward.q_offset, policy_of_tile);
  }
  template <typename PolicyOfTile>
  void run_head(Index batch, Index kv_head, const BackwardWorkspace<T>& ws, Index q_offset,
                PolicyOfTile&& policy_of_tile) const {
    const auto& grad_k = params_.grad_k;
    const auto& grad_v = params_.grad_v;
    const Index len_k = grad_k.size(2);
    for (Index key = 0; key < len_k; ++key) {
      std::fill_n(grad_k.address(batch, kv_head, key, 0), dim_, T(0));
      std::fill_n(grad_v.address(batch, kv_head, key, 0), dim_v_, T(0));
    }
    const typename BackwardWorkspace<T>::Scratch scratch = ws.for_this_thread();
    const Index rows_per_head = params_.forward.q.size(2) * group_;
    for (Index flat_begin = 0; flat_begin < rows_per_head; flat_begin += kBlockQ)
      run_tile(policy_of_tile(flat_begin), batch, kv_head, flat_begin, q_offset, scratch,
               ws.dq_stride());
    // dK was accumulated from unscaled queries.
    const T scale = static_cast<T>(params_.forward.scale);
    for (Index key = 0; key < len_k; ++key) {
      T* row = grad_k.address(batch, kv_head, key, 0);
      for (Index d = 0; d < dim_; ++d) row[d] *= scale;
    }
  }

 private:
  template <typename Policy>
  void run_tile(const Policy& policy, Index batch, Index kv_head, Index flat_begin, Index q_offset,
                const typename BackwardWorkspace<T>::Scratch& scratch, Index dq_stride) const {
    static_assert(!GatesKeys<Policy>::value || HasGateGradientHooks<Policy, T>::value,
                  "a policy with kGatesKeys needs gates_outputs, gates_logits and gate_gradients "
                  "for the backward (see the comment at the top of flash_backward.hpp)");
    constexpr int L = kLanes<T>;
    const FlashParams<T>& forward = params_.forward;
    const Index num_rows = std::min(kBlockQ, forward.q.size(2) * group_ - flat_begin);
    const int row_vectors = static_cast<int>((num_rows + L - 1) / L);

    Index positions[kBlockQ];
    Index query_index[kBlockQ];
    Index head[kBlockQ];
    const T* q_rows[kBlockQ];
    const T* grad_out_rows[kBlockQ];
    T* dq_rows[kBlockQ];
    alignas(kTensorAlignment) T row_lse2[kBlockQ];   // lse in base 2; +inf: the row sees nothing
    alignas(kTensorAlignment) T row_delta[kBlockQ];  // D_i = Σ_d dO[i, d] O[i, d]
    const T infinity = std::numeric_limits<T>::infinity();
    for (Index r = 0; r < kBlockQ; ++r) {
      const Index flat = flat_begin + std::min(r, num_rows - 1);
      query_index[r] = flat / group_;
      head[r] = kv_head * group_ + flat % group_;
      positions[r] = q_offset + query_index[r];
      dq_rows[r] = scratch.dq + r * dq_stride;
      if (r >= num_rows) {
        row_lse2[r] = infinity;
        row_delta[r] = 0;
        continue;
      }
      q_rows[r] = forward.q.address(batch, head[r], query_index[r], 0);
      grad_out_rows[r] = params_.grad_out.address(batch, head[r], query_index[r], 0);
      const T lse = params_.lse(batch, head[r], query_index[r]);
      row_lse2[r] = lse == -infinity ? infinity : static_cast<T>(lse * kLog2E);
      const T* out_row = params_.out.address(batch, head[r], query_index[r], 0);
      T delta = 0;
      for (Index d = 0; d < dim_v_; ++d) delta += grad_out_rows[r][d] * out_row[d];
      if (!params_.grad_lse.is_null()) delta -= params_.grad_lse(batch, head[r], query_index[r]);
      row_delta[r] = delta;
    }
    forward_.pack_queries(batch, num_rows, query_index, head, scratch.q_t);
    for (Index r = 0; r < num_rows; ++r)
      for (Index d = 0; d < dim_v_; ++d) scratch.do_t[d * kBlockQ + r] = grad_out_rows[r][d];
    for (Index d = 0; d < dim_v_; ++d)
      std::fill(scratch.do_t + d * kBlockQ + num_rows, scratch.do_t + (d + 1) * kBlockQ, T(0));
    for (Index r = 0; r < num_rows; ++r) std::fill_n(dq_rows[r], dim_, T(0));

    const auto& k = forward.k;
    const auto& v = forward.v;
    const T* k_base = k.data() + batch * k.stride(0) + kv_head * k.stride(1);
    const T* v_base = v.data() + batch * v.stride(0) + kv_head * v.stride(1);
    policy.for_each_block(positions[0], positions[num_rows - 1], [&](const KeyBlock& block) {
      const T* k_rows[kBlockK];
      const T* v_rows[kBlockK];
      T* grad_k_rows[kBlockK];
      T* grad_v_rows[kBlockK];
      Index keys[kBlockK];
      for (Index j = 0; j < block.count; ++j) {
        keys[j] = block.index != nullptr ? block.index[j] : block.begin + j;
        k_rows[j] = k_base + keys[j] * k.stride(2);
        v_rows[j] = v_base + keys[j] * v.stride(2);
        grad_k_rows[j] = params_.grad_k.address(batch, kv_head, keys[j], 0);
        grad_v_rows[j] = params_.grad_v.address(batch, kv_head, keys[j], 0);
      }
      // Inside a masked contiguous block the five products skip the rows and keys whose
      // probabilities are all zero, as in the forward (BlockBounds): their scores are -inf
      // uncomputed, P and dS there are exact zeros.
      const BlockBounds<Policy> bounds(policy, block, positions, num_rows);
      const auto rows_seeing = [&](Index j0, Index j1) { return bounds.rows_seeing(j0, j1); };
      const auto row_vectors_seeing = [&](Index j0, Index j1) {
        return bounds.template row_vectors_seeing<T>(j0, j1);
      };
      const auto keys_seen_by = [&](Index r0, Index r1) { return bounds.keys_seen_by(r0, r1); };
      // A gathered block of a policy with gates: its hook computes dS (below).
      bool gated = false;
      if constexpr (GatesKeys<Policy>::value)
        gated = block.index != nullptr && policy.gates_outputs();
      // The forward's logits, then P = 2^(s - lse2).
      compute_scores(scratch.q_t, k_rows, block.count, dim_, forward_.query_multiplier(),
                     row_vectors, row_vectors_seeing, scratch.s_t);
      if constexpr (GatesKeys<Policy>::value) {
        if (gated && policy.gates_logits())
          std::copy_n(scratch.s_t, block.count * kBlockQ, scratch.raw_t);
      }
      forward_.transform_logits(batch, block, keys, num_rows, row_vectors, query_index, head,
                                positions, policy, scratch.s_t,
                                has_softcap_ ? scratch.tanh_t : nullptr);
      for (Index j = 0; j < block.count; ++j)
        for (int c = 0; c < row_vectors; ++c) {
          T* slot = scratch.s_t + j * kBlockQ + c * L;
          store(slot, exp2_nonpositive(load(slot) - load(row_lse2 + c * L)));
        }
      // dP = dO Vᵀ, then dS = P ∘ (dP − D), times 1 − tanh² under a softcap. Where P = 0 (a
      // key the row does not see) dS is 0 even if the key's value is NaN: NaN reaches only the
      // rows that see it, as in the forward.
      compute_scores(scratch.do_t, v_rows, block.count, dim_v_, T(1), row_vectors,
                     row_vectors_seeing, scratch.dp_t);
      if constexpr (GatesKeys<Policy>::value) {
        if (gated) {
          policy.gate_gradients(
              block, GatedBlockGradients<T>{row_vectors, num_rows, scratch.s_t, scratch.dp_t,
                                            scratch.raw_t, has_softcap_ ? scratch.tanh_t : nullptr,
                                            row_delta, logit_unit_});
        }
      }
      if (!gated && !params_.grad_logits.is_null()) {
        // ∂loss/∂logit = P ∘ (dP − D), before the softcap's factor: the bias is added after it.
        for (Index j = 0; j < block.count; ++j)
          for (Index r = 0; r < num_rows; ++r) {
            const T p = scratch.s_t[j * kBlockQ + r];
            params_.grad_logits(batch, head[r], query_index[r], keys[j]) =
                p == T(0) ? T(0) : p * (scratch.dp_t[j * kBlockQ + r] - row_delta[r]);
          }
      }
      if (!gated) logit_gradients(block.count, row_vectors, row_delta, scratch);
      // dV[key] += Σ_r P[key][r] dO[r];  dK[key] += Σ_r dS[key][r] q[r];  dQ[r] += Σ_key dS k.
      accumulate_rows(scratch.s_t, 1, kBlockQ, grad_out_rows, num_rows, dim_v_, grad_v_rows,
                      block.count, rows_seeing);
      accumulate_rows(scratch.dp_t, 1, kBlockQ, q_rows, num_rows, dim_, grad_k_rows, block.count,
                      rows_seeing);
      accumulate_rows(scratch.dp_t, kBlockQ, 1, k_rows, block.count, dim_, dq_rows, num_rows,
                      keys_seen_by);
    });

    const T scale = static_cast<T>(forward.scale);
    for (Index r = 0; r < num_rows; ++r) {
      T* grad_q_row = params_.grad_q.address(batch, head[r], query_index[r], 0);
      for (Index d = 0; d < dim_; ++d) grad_q_row[d] = dq_rows[r][d] * scale;
    }
  }

  // dS = P ∘ (dP − D) in dp_t, times 1 − tanh² under a softcap. Where P = 0 (a key the row
  // does not see) dS is 0 even if the key's value is NaN: NaN reaches only the rows that see it,
  // as in the forward.
  void logit_gradients(Index num_keys, int row_vectors, const T* row_delta,
                       const typename BackwardWorkspace<T>::Scratch& scratch) const {
    constexpr int L = kLanes<T>;
    const Vec<T> one = splat(T(1));
    const Vec<T> zero{};
    for (Index j = 0; j < num_keys; ++j)
      for (int c = 0; c < row_vectors; ++c) {
        const Index at = j * kBlockQ + c * L;
        const Vec<T> p = load(scratch.s_t + at);
        Vec<T> ds = p * (load(scratch.dp_t + at) - load(row_delta + c * L));
        if (has_softcap_) {
          const Vec<T> t = load(scratch.tanh_t + at);
          ds = ds * (one - t * t);
        }
        store(scratch.dp_t + at, p == zero ? zero : ds);
      }
  }

  const BackwardParams<T>& params_;
  TileRunner<T> forward_;
  Index group_;
  Index dim_;
  Index dim_v_;
  bool has_softcap_;
  T logit_unit_;  // engine logit units (base 2, or over the softcap) -> s q·k
};

// The backward's driver: runs head_task(runner, batch, kv_head, workspace, scratch) for every
// (batch, kv head) on at most params.forward.num_threads threads, with engine scratch and a copy
// of `head_scratch` for each thread (the task's alone while it runs). A task computes every
// gradient of its head, so which thread runs it never changes a result.
template <typename T, typename HeadTask, typename HeadScratch = NoPolicyScratch>
void run_backward_heads(const BackwardParams<T>& params, HeadTask&& head_task,
                        const HeadScratch& head_scratch = {}, bool raw_logits = false) {
  // Without query rows and keys every gradient is empty: nothing to do, however many (batch,
  // kv head) pairs the extents of the empty views count (otherwise the gradients of q or of k
  // hold a row per pair, so their count is bounded by real memory).
  const auto& q = params.forward.q;
  const bool no_rows = q.size(0) == 0 || q.size(1) == 0 || q.size(2) == 0;
  if (no_rows && params.forward.k.size(2) == 0) return;
  const Index heads_kv = params.forward.k.size(1);
  const Index num_tasks = q.size(0) * heads_kv;
  if (num_tasks == 0) return;
  // The backward recomputes the scores and adds three products per (row, key): about twice the
  // forward's multiply-adds.
  const Index work = dense_work(params.forward);
  const int num_threads = team_size(num_tasks, params.forward.num_threads,
                                    work < std::numeric_limits<Index>::max() / 2 ? 2 * work : work);
  const BackwardWorkspace<T> workspace(params.forward.q.size(3), params.forward.v.size(3),
                                       num_threads, raw_logits);
  std::vector<HeadScratch> scratch(static_cast<std::size_t>(num_threads), head_scratch);
  const BackwardRunner<T> runner(params);
  parallel_for(num_tasks, num_threads, [&](Index task) {
    head_task(runner, task / heads_kv, task % heads_kv, workspace,
              scratch[static_cast<std::size_t>(thread_index())]);
  });
}

// Runs the backward of every (batch, kv head) with one policy (the forward's).
template <typename T, typename Policy>
void run_flash_backward(const BackwardParams<T>& params, const Policy& policy) {
  run_backward_heads(params, [&](const BackwardRunner<T>& runner, Index batch, Index kv_head,
                                 const BackwardWorkspace<T>& workspace, NoPolicyScratch&) {
    runner.run_head(batch, kv_head, workspace, [&](Index) -> const Policy& { return policy; });
  });
}

// The backward of a variable-length band call: each batch row with its own keys and positions
// (params.forward.sequences), as its forward ran.
template <typename T>
void run_sequence_band_backward(const BackwardParams<T>& params) {
  run_backward_heads(params, [&](const BackwardRunner<T>& runner, Index batch, Index kv_head,
                                 const BackwardWorkspace<T>& workspace, NoPolicyScratch&) {
    const SequenceKeys& sequence = params.forward.sequences[batch];
    const BandPolicy policy(sequence.visibility, sequence.first_row);
    runner.run_head(batch, kv_head, workspace, sequence.q_offset,
                    [&](Index) -> const BandPolicy& { return policy; });
  });
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
