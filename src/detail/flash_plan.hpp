// src/detail/flash_plan.hpp (private) — what the attention engine is given: its parameters,
// tiles, key blocks and visit policies (see flash_engine.hpp). Generic code: entry points build
// these once, outside any ISA level, and hand them to a level's kernels (detail/kernels.hpp).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

#include "detail/mask.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::detail {

inline constexpr double kLog2E = 1.4426950408889634073599246810019;
inline constexpr double kLn2 = 0.69314718055994530941723212145818;

inline constexpr Index kBlockQ = 64;   // query rows per tile
inline constexpr Index kBlockK = 128;  // keys per block

// The product of extents: 0 when one is 0, else saturated at the largest Index. The extents of an
// empty view may multiply past 2^63 (only its element count, 0, must fit), so counts of rows or
// tiles taken from them are formed this way; for a view with elements the product is exact.
inline Index extent_product(std::initializer_list<Index> extents) {
  for (const Index extent : extents)
    if (extent == 0) return 0;
  Index product = 1;
  for (const Index extent : extents)
    if (__builtin_mul_overflow(product, extent, &product)) return std::numeric_limits<Index>::max();
  return product;
}

// ceil(count / step) for count >= 0, step > 0, without forming count + step - 1.
inline Index ceil_div(Index count, Index step) { return count / step + (count % step != 0); }

// One batch row of a variable-length call (AttentionOptions::key_start / key_length): its keys
// are the rows [first_row, first_row + visibility.len_k) of k and v, and positions count from
// first_row, so its query 0 sits at q_offset (the call's absolute q_offset minus first_row) and
// visibility is the call's rule over the row's keys alone.
struct SequenceKeys {
  Index first_row = 0;
  Index q_offset = 0;
  Visibility visibility;
};

// Everything the engine needs, validated by the entry point before the engine runs.
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq] or null; bias: [B, Hq, Lq, Lk] (broadcast dims have stride 0) or null.
// T is the stored element type; lse is in its compute type (float for bfloat16 and float16).
// KV is the stored type of k and v: T, or q8_block under float queries (an 8-bit KV cache,
// whose k and v are [B, Hkv, Lk, ceil(D / 32)] blocks and whose Dv is value_dim).
template <typename T, typename KV = T>
struct FlashParams {
  TensorView<const T, 4> q;
  TensorView<const KV, 4> k, v;
  TensorView<T, 4> out;
  TensorView<compute_type_t<T>, 3> lse;
  TensorView<const T, 4> bias;
  Index q_offset = 0;  // position of query 0
  double scale = 1;    // applied to q.k
  double softcap = 0;  // 0: off
  int num_threads = 1;

  Index value_dim = 0;  // Dv of q8_block values (unused otherwise)
  // [B] the key rows of each batch row in a variable-length call (band policies only), or null.
  const SequenceKeys* sequences = nullptr;

  // Query rows per (batch, kv head): Lq times the GQA group (0 without kv heads; saturated
  // when an empty query's Lq and Hq multiply past 2^63, as [0, 2^40, 2^40, D] does).
  Index rows_per_head() const {
    return k.size(1) > 0 ? extent_product({q.size(2), q.size(1) / k.size(1)}) : 0;
  }
  // Query rows of the call: B * Hq * Lq (saturated likewise).
  Index query_rows() const { return extent_product({q.size(0), q.size(1), q.size(2)}); }
  // Dv: the values' last extent, or value_dim for q8_block values.
  Index dim_v() const {
    if constexpr (std::is_same_v<KV, q8_block>) {
      return value_dim;
    } else {
      return v.size(3);
    }
  }
};

// One engine task: the flat rows [flat_begin, flat_begin + kBlockQ) of (batch, kv_head), a flat
// row being position * group + head_in_group, with query 0 at position q_offset; the rows are
// written to out and lse (the call's outputs), or to state and lse (the scratch state of a
// split-KV chunk, kept in the compute type) when state is set.
template <typename T>
struct Tile {
  Index batch = 0;
  Index kv_head = 0;
  Index flat_begin = 0;
  Index q_offset = 0;
  TensorView<T, 4> out;
  TensorView<compute_type_t<T>, 3> lse;
  TensorView<compute_type_t<T>, 4> state;
};

// The tile of the call's own outputs and query positions.
template <typename T, typename KV>
Tile<T> tile_of(const FlashParams<T, KV>& params, Index batch, Index kv_head, Index flat_begin) {
  return {batch, kv_head, flat_begin, params.q_offset, params.out, params.lse, {}};
}

// A block of keys to visit: the K/V rows [begin, begin + count), or index[0..count) when index
// is set. The key stored in row i sits at position i + position_offset (nonzero only where
// storage wraps, as in a ring-buffer KV cache); masks and policy bounds speak of positions.
struct KeyBlock {
  Index begin = 0;
  Index count = 0;
  const Index* index = nullptr;
  bool needs_mask = false;
  Index position_offset = 0;
};

// The end of the piece of [begin, end) that starts at begin and stops at the next multiple of
// `step` after begin, or at end if that comes first; the multiple is never formed (positions
// reach 2^63 - 1).
inline Index aligned_piece_end(Index begin, Index end, Index step) {
  const Index room = step - begin % step;
  return end - begin <= room ? end : begin + room;
}

// Visits the keys at `positions` in blocks aligned to multiples of kBlockK positions, so that
// any two policies covering the same keys use identical blocks (and identical arithmetic). The
// key at position p is stored in row p - position_offset.
template <typename Seen, typename Visit>
void for_each_aligned_block(KeyRange positions, Index position_offset, const Seen& visibility,
                            Index position_lo, Index position_hi, Visit&& visit) {
  for (Index begin = positions.begin; begin < positions.end;) {
    const Index end = aligned_piece_end(begin, positions.end, kBlockK);
    visit(KeyBlock{begin - position_offset, end - begin, nullptr,
                   !visibility.sees_all(position_lo, position_hi, begin, end), position_offset});
    begin = end;
  }
}

// The base of every visit policy: the engine's mask queries answered by a visibility rule
// (Visibility, SparseK's AlwaysVisible, AllKeys: anything with sees, keys_seen,
// positions_seeing, sees_all and visible_ranges), so that a policy writes only what it changes.
template <typename Rule>
class RulePolicy {
 public:
  explicit RulePolicy(const Rule& rule) : rule_(rule) {}

  bool sees(Index position, Index key) const { return rule_.sees(position, key); }
  KeyRange keys_seen(Index position_lo, Index position_hi) const {
    return rule_.keys_seen(position_lo, position_hi);
  }
  PositionRange positions_seeing(Index key_begin, Index key_end) const {
    return rule_.positions_seeing(key_begin, key_end);
  }
  const Rule& rule() const { return rule_; }

 protected:
  // Visits every key the rule shows to some position in [position_lo, position_hi], stored in
  // rows equal to their positions, in aligned blocks.
  template <typename Visit>
  void for_each_visible_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const KeyRanges visible = rule_.visible_ranges(position_lo, position_hi);
    for (int i = 0; i < visible.count; ++i)
      for_each_aligned_block(visible.ranges[i], 0, rule_, position_lo, position_hi, visit);
  }

 private:
  Rule rule_;
};

// Dense attention with windows and sinks: visits the sink keys and the band of the tile. The key
// at position p is stored in row first_row + p (first_row > 0: a row of a variable-length call).
class BandPolicy : public RulePolicy<Visibility> {
 public:
  explicit BandPolicy(const Visibility& visibility, Index first_row = 0)
      : RulePolicy(visibility), first_row_(first_row) {}

  template <typename Visit>
  void for_each_block(Index position_lo, Index position_hi, Visit&& visit) const {
    const KeyRanges visible = rule().visible_ranges(position_lo, position_hi);
    for (int i = 0; i < visible.count; ++i)
      for_each_aligned_block(visible.ranges[i], -first_row_, rule(), position_lo, position_hi,
                             visit);
  }

 private:
  Index first_row_;
};

// True for policies with the gathered-key hooks (see the file comment).
template <typename Policy, typename = void>
struct GatesKeys : std::false_type {};
template <typename Policy>
struct GatesKeys<Policy, std::void_t<decltype(Policy::kGatesKeys)>>
    : std::bool_constant<Policy::kGatesKeys> {};

// True for types with the policy interface (see the file comment).
template <typename Policy, typename = void>
struct IsVisitPolicy : std::false_type {};
template <typename Policy>
struct IsVisitPolicy<
    Policy,
    std::void_t<decltype(std::declval<const Policy&>().for_each_block(
                    Index{}, Index{}, std::declval<void (&)(const KeyBlock&)>())),
                std::enable_if_t<std::is_same_v<
                    decltype(std::declval<const Policy&>().sees(Index{}, Index{})), bool>>,
                std::enable_if_t<std::is_same_v<
                    decltype(std::declval<const Policy&>().keys_seen(Index{}, Index{})), KeyRange>>,
                std::enable_if_t<std::is_same_v<
                    decltype(std::declval<const Policy&>().positions_seeing(Index{}, Index{})),
                    PositionRange>>>> : std::true_type {};

// True for policies that provide the three gated-key hooks for element type T.
template <typename Policy, typename T, typename = void>
struct HasGateHooks : std::false_type {};
template <typename Policy, typename T>
struct HasGateHooks<Policy, T,
                    std::void_t<decltype(std::declval<const Policy&>().scale_logits(
                                    std::declval<const KeyBlock&>(), int{}, std::declval<T*>())),
                                decltype(std::declval<const Policy&>().mask_logits(
                                    std::declval<const KeyBlock&>(), Index{}, std::declval<T*>())),
                                decltype(std::declval<const Policy&>().gate_probabilities(
                                    std::declval<const KeyBlock&>(), int{}, std::declval<T*>()))>>
    : std::true_type {};

// Logits are produced in base 2: queries are packed times `query`; with a softcap (cap > 0)
// the engine then computes cap * tanh(q.k) with query = scale / softcap, cap = softcap * log2 e.
template <typename T>
struct Multipliers {
  T query;
  T cap;
};

template <typename T>
Multipliers<T> logit_multipliers(double scale, double softcap) {
  if (softcap > 0) return {static_cast<T>(scale / softcap), static_cast<T>(softcap * kLog2E)};
  return {static_cast<T>(scale * kLog2E), T(0)};
}

// The usual task list: `outer` units (batch entries; split-KV decode: key chunks) times kv
// heads times tiles of kBlockQ flat rows. Tiles late in the sequence come first: under a causal
// mask they see the most keys, and handed out first they finish with the rest.
struct TileGrid {
  Index outer = 0;
  Index heads_kv = 0;
  Index tiles_per_head = 0;

  TileGrid(Index outer_units, Index kv_heads, Index rows_per_head)
      : outer(outer_units), heads_kv(kv_heads), tiles_per_head(ceil_div(rows_per_head, kBlockQ)) {}

  // Exact whenever a task exists (then the queries are not empty and B * Hq * Lq fits).
  Index num_tasks() const { return extent_product({outer, heads_kv, tiles_per_head}); }

  struct Cell {
    Index outer;
    Index kv_head;
    Index flat_begin;
  };
  Cell cell(Index task) const {
    const Index tile = tiles_per_head - 1 - task % tiles_per_head;
    const Index head_task = task / tiles_per_head;
    return {head_task / heads_kv, head_task % heads_kv, tile * kBlockQ};
  }
};

// What a task of run_engine runs: a policy over a tile.
template <typename Policy, typename T>
struct PlannedTile {
  Policy policy;
  Tile<T> tile;
};

template <typename Policy, typename T>
PlannedTile<Policy, T> plan_tile(const Policy& policy, const Tile<T>& tile) {
  return {policy, tile};
}

// The per-thread policy scratch of policies that need none.
struct NoPolicyScratch {};

// What the backward reads and writes; `forward` holds q, k, v, bias and the options exactly as
// the forward ran (its out and lse are not used).
// out, grad_out: [B, Hq, Lq, Dv]  lse: [B, Hq, Lq]  ->  grad_q: [B, Hq, Lq, D]
// grad_k: [B, Hkv, Lk, D]  grad_v: [B, Hkv, Lk, Dv]
template <typename T>
struct BackwardParams {
  FlashParams<T> forward;
  TensorView<const T, 4> out;
  TensorView<const T, 3> lse;
  TensorView<const T, 4> grad_out;
  TensorView<T, 4> grad_q, grad_k, grad_v;
  // Optional: [B, Hq, Lq, Lk], zeroed, receives ∂loss/∂bias (the logits' gradient) of every key a
  // task visits; each entry belongs to one (batch, kv head) task.
  TensorView<T, 4> grad_logits;
  // Optional: [B, Hq, Lq], ∂loss/∂lse when the loss also reads the forward's lse (e.g. through
  // learned sink logits): since ∂lse_i/∂l_ij = P_ij, it adds g_i P_ij to each logit's gradient,
  // which is D_i replaced by D_i - g_i in dS = P ∘ (dP - D).
  TensorView<const T, 3> grad_lse;
};

}  // namespace foveal::detail
