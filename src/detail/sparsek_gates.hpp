// The engine's gated-key hooks (detail/flash_engine.hpp) for SparseK's selected keys, shared by
// the prefill policy (detail/sparsek_policy.hpp) and the decode policy of SparseKCache
// (src/sparsek/cache.cpp), and the backward's hook (detail/flash_backward.hpp) that differentiates
// the gates. Internal to the library.
//
// A policy visits its selected keys as gathered blocks whose index points into one array of
// keys; everything a hook needs per key (its score u, the rows that may see it) sits at the
// same offset in parallel arrays, and the threshold τ of every tile row in one more.
#pragma once

#include <algorithm>
#include <limits>

#include "detail/flash_backward.hpp"
#include "detail/flash_engine.hpp"
#include "detail/isa.hpp"
#include "foveal/sparsek/attention.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Where a policy keeps the per-key and per-row data of its gathered keys.
template <typename T>
struct GatedKeyData {
  const Index* keys = nullptr;       // the gathered rows; a block's index points in here
  const T* score = nullptr;          // score[i] = u of keys[i]
  const T* row_threshold = nullptr;  // [kBlockQ]: τ of each tile row (padding rows too)
  const Index* row_begin = nullptr;  // rows [row_begin[i], row_end[i]) of the tile select
  const Index* row_end = nullptr;    // keys[i]; null when every row selects every key
  SparseKGate gate = SparseKGate::value;
  // The backward's sums of the gates' gradients dm over the fractional gates (0 < m < 1, the
  // only ones with a derivative in u); null in the forward. Tile row r is the query
  // (flat_begin + r) / group.
  T* grad_score = nullptr;     // [Lk] by key position: Σ over rows of dm
  double* grad_row = nullptr;  // [Lq] by query: Σ over its selected keys and query heads of dm
  Index flat_begin = 0;
  Index group = 1;
};

// The gated-key hooks over GatedKeyData: a policy derives from it and visits blocks with an
// index into data.keys. Gates are m = clip(u_j − τ_r, 0, 1), computed in T over whole row
// vectors.
template <typename T>
class GatedKeyHooks {
 public:
  static constexpr bool kGatesKeys = true;

  explicit GatedKeyHooks(const GatedKeyData<T>& data) : data_(data) {}

  // kv gate: the logit of a selected key is m * s q·k.
  void scale_logits(const KeyBlock& block, int row_vectors, T* s_t) const {
    if (data_.gate == SparseKGate::kv) multiply_by_gates(block, row_vectors, s_t);
  }

  // Rows outside the interval in which they select a key do not see it (only blocks a policy
  // marks needs_mask come here, and only policies with row ranges mark them).
  void mask_logits(const KeyBlock& block, Index num_rows, T* s_t) const {
    const T masked = -std::numeric_limits<T>::infinity();
    const Index first = block.index - data_.keys;
    for (Index j = 0; j < block.count; ++j) {
      const Index i = first + j;
      T* column = s_t + j * kBlockQ;
      std::fill(column, column + std::min(data_.row_begin[i], num_rows), masked);
      std::fill(column + std::min(data_.row_end[i], num_rows), column + num_rows, masked);
    }
  }

  // value and kv gates: what a selected key adds to the output is scaled by m.
  void gate_probabilities(const KeyBlock& block, int row_vectors, T* s_t) const {
    if (data_.gate != SparseKGate::none) multiply_by_gates(block, row_vectors, s_t);
  }

  // The backward's hooks. Blocks of gate none need nothing beyond the dense backward.
  bool gates_outputs() const { return data_.gate != SparseKGate::none; }
  bool gates_logits() const { return data_.gate == SparseKGate::kv; }

  // With g = grad_out, P the ungated softmax weights, dP = g·v and x the logit of (row, key):
  //   value: O = Σ P m v        dx = P (m dP − D)       dm = P dP
  //   kv:    x = cap(m s q·k)   dx = P (m dP − D)       dm = P dP + dx cap'·s q·k
  // and dS = dx cap' (value), dx cap' m (kv), cap' = 1 − tanh² under a softcap (else 1); dV
  // takes P m. dm of the fractional gates is added to grad_score (by key) and grad_row (by
  // query); a row that does not see a key (P = 0) adds nothing, not even a NaN of its value.
  void gate_gradients(const KeyBlock& block, const GatedBlockGradients<T>& b) const {
    constexpr int L = kLanes<T>;
    const Index first = block.index - data_.keys;
    const bool kv = data_.gate == SparseKGate::kv;
    const Vec<T> zero{};
    const Vec<T> one = splat(T(1));
    const Vec<T> unit = splat(b.logit_unit);
    Vec<T> row_sums[kBlockQ / L];
    for (int c = 0; c < b.row_vectors; ++c) row_sums[c] = zero;
    for (Index j = 0; j < block.count; ++j) {
      const Vec<T> score = splat(data_.score[first + j]);
      Vec<T> key_sum = zero;
      for (int c = 0; c < b.row_vectors; ++c) {
        const Index at = j * kBlockQ + c * L;
        const Vec<T> excess = score - load(data_.row_threshold + c * L);
        Vec<T> gate = excess < zero ? zero : excess;
        gate = gate > one ? one : gate;
        const Vec<T> p = load(b.p_t + at);
        const Vec<T> dp = load(b.dp_t + at);
        Vec<T> dx = p * (gate * dp - load(b.row_delta + c * L));
        if (b.tanh_t != nullptr) {
          const Vec<T> t = load(b.tanh_t + at);
          dx = dx * (one - t * t);
        }
        Vec<T> dm = p * dp;
        Vec<T> ds = dx;
        if (kv) {
          dm += dx * (load(b.raw_t + at) * unit);
          ds = dx * gate;
        }
        dm = ((excess > zero) & (excess < one) & (p != zero)) ? dm : zero;
        key_sum += dm;
        row_sums[c] += dm;
        store(b.p_t + at, p * gate);
        store(b.dp_t + at, p == zero ? zero : ds);
      }
      T total = 0;
      for (int lane = 0; lane < L; ++lane) total += key_sum[lane];
      data_.grad_score[data_.keys[first + j]] += total;
    }
    for (Index r = 0; r < b.num_rows; ++r)
      data_.grad_row[(data_.flat_begin + r) / data_.group] += row_sums[r / L][r % L];
  }

 private:
  // s_t[j][r] *= clip(u_j − τ_r, 0, 1) over whole row vectors.
  void multiply_by_gates(const KeyBlock& block, int row_vectors, T* s_t) const {
    constexpr int L = kLanes<T>;
    const Index first = block.index - data_.keys;
    const Vec<T> zero{};
    const Vec<T> one = splat(T(1));
    for (Index j = 0; j < block.count; ++j) {
      const Vec<T> score = splat(data_.score[first + j]);
      T* column = s_t + j * kBlockQ;
      for (int c = 0; c < row_vectors; ++c) {
        Vec<T> gate = score - load(data_.row_threshold + c * L);
        gate = gate < zero ? zero : gate;
        gate = gate > one ? one : gate;
        store(column + c * L, load(column + c * L) * gate);
      }
    }
  }

  GatedKeyData<T> data_;
};

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
