// src/detail/sparsek_selection.hpp (private) — the selection phase of SparseK attention: which keys
// each query position selects, described compactly. Internal to the library (benchmarks use it
// to time the selection on its own).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "detail/mask.hpp"
#include "foveal/attention/options.hpp"
#include "foveal/core/parallel.hpp"
#include "foveal/core/tensor.hpp"
#include "foveal/detail/validate.hpp"
#include "foveal/sparsek/attention.hpp"

namespace foveal::detail {

// The checks of SparseKOptions: the shared attention options (require_attention_options), then
// its own fields (topk, window, gate, window = 0 when not causal, the dense windows unused);
// messages begin with `function`. The q_offset check is the caller's.
// variable_length: the caller takes key ranges (sparsek_attention and its backward).
void require_sparsek_options(const char* function, const SparseKOptions& options,
                             bool variable_length = false);

// Positions and pools of one call (SparseKOptions, with the sizes applied).
struct SparseKGeometry {
  Index len_q = 0, len_k = 0;
  Index q_offset = 0;   // position of query 0 (resolved)
  Index window = 0;     // clamped to the reach of the call
  Index sinks = 0;      // clamped to Lk
  Index pool_size = 0;  // Lk - sinks: the keys a selection can draw from
  Index topk = 1;       // clamped to max(pool_size, 1)
  bool causal = true;

  // q_offset: the position of query 0 as resolved by the call (options.q_offset resolved, or a
  // variable-length row's, which may be negative); the two-argument form resolves options'.
  static SparseKGeometry make(const SparseKOptions& options, Index len_q, Index len_k,
                              Index q_offset);
  static SparseKGeometry make(const SparseKOptions& options, Index len_q, Index len_k);
  // How many pool keys (in key order) a query at `position` selects from.
  Index pool_length(Index position) const;
};

// The keys a SparseK query sees besides its selection, with gate 1: the sinks (j < sinks) and,
// causal, the window (position − window < j); causal queries never see a key after their own
// position, sinks included. Same interface as detail::Visibility, for the engine's blocks.
struct AlwaysVisible {
  Index window = 0;  // 0: none
  Index sinks = 0;
  Index len_k = 0;
  bool causal = true;

  bool sees(Index position, Index key) const {
    if (causal && key > position) return false;
    return key < sinks || (window > 0 && key > position - window);
  }

  // Sinks, then the window, as at most two ranges (one when they touch), clamped to [0, Lk).
  KeyRanges visible_ranges(Index position_lo, Index position_hi) const {
    const Index last = causal ? std::min(position_hi + 1, len_k) : len_k;
    KeyRange band{0, 0};
    if (causal && window > 0) band = {std::max<Index>(position_lo - window + 1, 0), last};
    return sinks_and_band(std::min(sinks, std::max<Index>(last, 0)), band);
  }

  // The smallest key range holding every key some position in [position_lo, position_hi] sees.
  KeyRange keys_seen(Index position_lo, Index position_hi) const {
    const KeyRanges visible = visible_ranges(position_lo, position_hi);
    if (visible.count == 0) return {0, 0};
    return {visible.ranges[0].begin, visible.ranges[visible.count - 1].end};
  }

  // The positions that see some key of [key_begin, key_end); exact for a single key.
  PositionRange positions_seeing(Index key_begin, Index key_end) const {
    constexpr Index kUnbounded = std::numeric_limits<Index>::max() / 4;
    const Index first = causal ? key_begin : -kUnbounded;
    if (key_begin < sinks) return {first, kUnbounded};
    if (!causal || window == 0) return {0, -1};
    return {first, key_end - 1 + window - 1};
  }

  // True when every position in [position_lo, position_hi] sees every key in [key_begin, key_end).
  bool sees_all(Index position_lo, Index position_hi, Index key_begin, Index key_end) const {
    if (causal && key_end - 1 > position_lo) return false;
    if (key_end <= sinks) return true;
    return causal && window > 0 && key_begin > position_hi - window;
  }
};

// The selection of one (batch, kv head), pool keys numbered from 0 (key = sinks + pool key).
struct HeadSelection {
  std::vector<double> tau;        // [pool_size + 1]: τ of the pool prefix of each length
  std::vector<Index> evicted_at;  // [pool_size]: the prefix length at which the key leaves the
                                  // top-k set (key + 1: never enters; pool_size + 1: never leaves)
};

// Pushes the pool keys of u[sinks ..] (stride u_stride) through the prefix threshold and top-k.
template <typename T>
void select_head(const T* u, Index u_stride, const SparseKGeometry& geometry,
                 HeadSelection& selection);

// The top-k set of increasing pool lengths, in increasing key order.
class SelectionSweep {
 public:
  explicit SelectionSweep(const HeadSelection& selection) : selection_(selection) {}
  // Moves to pool length `length` (never backwards).
  void advance_to(Index length);
  // The set at the current length (pool keys, increasing).
  const std::vector<Index>& live() const { return live_; }
  // Appends the pool keys in [length_lo, length_hi) that are ever selected.
  void append_entering(Index length_lo, Index length_hi, std::vector<Index>& keys) const;

 private:
  const HeadSelection& selection_;
  std::vector<Index> live_;
  Index next_ = 0;
};

// Per tile of kBlockQ query rows of one head: the keys (positions, increasing) that some row of
// the tile selects: keys[offsets[t] .. offsets[t + 1]).
struct TileUnions {
  std::vector<Index> offsets;
  std::vector<Index> keys;
};

void build_tile_unions(const HeadSelection& selection, const SparseKGeometry& geometry, Index group,
                       TileUnions& unions);

// u: [B, Hkv, Lk], finite.
template <typename T>
void require_scores(const char* function, const TensorView<const T, 3>& u, Index batch,
                    Index heads_kv, Index len_k) {
  require_valid_view(function, "u", u);
  require_extent(function, "u", u, 0, "k.shape[0] (B)", batch);
  require_extent(function, "u", u, 1, "k.shape[1] (Hkv)", heads_kv);
  require_extent(function, "u", u, 2, "k.shape[2] (Lk)", len_k);
  if (u.empty()) return;  // no loop over a huge B of an empty u
  for (Index b = 0; b < batch; ++b)
    for (Index h = 0; h < heads_kv; ++h)
      for (Index j = 0; j < len_k; ++j)
        check(std::isfinite(widen(u(b, h, j))), function, ": u[", b, ", ", h, ", ", j,
              "] must be finite, got ", widen(u(b, h, j)));
}

// The selection of every (batch, kv head), one task each.
template <typename T>
std::vector<HeadSelection> select_all(const TensorView<const T, 3>& u,
                                      const SparseKGeometry& geometry, int num_threads) {
  const Index batch = u.size(0), heads_kv = u.size(1);
  std::vector<HeadSelection> selections(static_cast<std::size_t>(batch * heads_kv));
  parallel_for(batch * heads_kv, team_size(batch * heads_kv, num_threads), [&](Index task) {
    select_head(u.address(task / heads_kv, task % heads_kv, 0), u.stride(2), geometry,
                selections[static_cast<std::size_t>(task)]);
  });
  return selections;
}

}  // namespace foveal::detail
