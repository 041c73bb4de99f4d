// src/detail/mask.hpp (private) — the mask algebra: which keys a query position sees.
//
// Everything is a window: causal is (left = unbounded, right = 0), -1 means unbounded, and
// the first `sink_tokens` keys widen the window to the left: a sink is visible from every
// position that the window's right edge has reached, so causal always wins (no causal query sees
// a later key, sinks included). Positions are absolute (q_offset + i).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// Half-open key range [begin, end); empty when end <= begin.
struct KeyRange {
  Index begin = 0;
  Index end = 0;
};

// `range` moved by `by` positions (between coordinates that count from different keys).
inline KeyRange shifted(KeyRange range, Index by) { return {range.begin + by, range.end + by}; }

// At most two disjoint key ranges in increasing order.
struct KeyRanges {
  KeyRange ranges[2];
  int count = 0;
};

// Closed position range [first, last]; empty when last < first.
struct PositionRange {
  Index first = 0;
  Index last = -1;
};

// The sinks [0, sinks_end) and a band, as at most two ranges in increasing order (one when they
// touch or overlap); empty ranges are left out.
inline KeyRanges sinks_and_band(Index sinks_end, KeyRange band) {
  KeyRanges visible;
  const auto add = [&visible](KeyRange range) {
    if (range.begin < range.end) visible.ranges[visible.count++] = range;
  };
  if (band.end <= band.begin) {
    add({0, sinks_end});
  } else if (sinks_end < band.begin) {
    add({0, sinks_end});
    add(band);
  } else {
    add({0, std::max(band.end, sinks_end)});
  }
  return visible;
}

struct Visibility {
  Index window_left = -1;   // -1: unbounded
  Index window_right = -1;  // -1: unbounded

  // a + b saturated to the Index range: positions may reach 2^63 - 1 (a cache's length), and a
  // window's edge past it must not wrap around.
  static Index plus(Index a, Index b) {
    Index sum = 0;
    if (!__builtin_add_overflow(a, b, &sum)) return sum;
    return b > 0 ? std::numeric_limits<Index>::max() : std::numeric_limits<Index>::min();
  }
  Index sink_tokens = 0;
  Index len_k = 0;

  // Builds the normalized form for queries at positions [q_offset, q_offset + Lq) (q_offset is
  // negative when bottom-right aligned with Lq > Lk): causal folded into window_right, and
  // windows so wide that they cannot bound anything (>= |q_offset| + Lq + Lk) turned into -1,
  // so position arithmetic cannot overflow.
  static Visibility make(bool causal, Index window_left, Index window_right, Index sink_tokens,
                         Index len_q, Index len_k, Index q_offset) {
    // Saturating: empty views may have huge extents (a [0, H, 2^62, D] query).
    constexpr Index kMax = std::numeric_limits<Index>::max();
    Index reach = q_offset < 0 ? -q_offset : q_offset;
    for (const Index extent : {len_q, len_k}) reach = extent > kMax - reach ? kMax : reach + extent;
    Visibility visibility;
    visibility.window_left = window_left >= reach ? -1 : window_left;
    const Index right = causal ? 0 : window_right;
    visibility.window_right = right >= reach ? -1 : right;
    visibility.sink_tokens = std::min(sink_tokens, len_k);
    visibility.len_k = len_k;
    return visibility;
  }

  // True when a query at `position` sees `key`.
  bool sees(Index position, Index key) const {
    const bool before_right_edge = window_right < 0 || key <= plus(position, window_right);
    if (key < sink_tokens) return before_right_edge;
    return before_right_edge && (window_left < 0 || key >= plus(position, -window_left));
  }

  // The keys inside the window of at least one position in [position_lo, position_hi],
  // clamped to [0, Lk). Sinks are not included.
  KeyRange band(Index position_lo, Index position_hi) const {
    const Index begin = window_left < 0 ? 0 : plus(position_lo, -window_left);
    const Index end = window_right < 0 ? len_k : plus(plus(position_hi, window_right), 1);
    return {std::clamp<Index>(begin, 0, len_k), std::clamp<Index>(end, 0, len_k)};
  }

  // The end of the sinks that some position <= position_hi sees: sinks past the right edge of
  // its window are not visible yet.
  Index sinks_end(Index position_hi) const {
    if (window_right < 0) return sink_tokens;
    return std::clamp<Index>(plus(plus(position_hi, window_right), 1), 0, sink_tokens);
  }

  // The keys that some position in [position_lo, position_hi] may see, as the sinks and the
  // band (one range when they touch); empty ranges are left out.
  KeyRanges visible_ranges(Index position_lo, Index position_hi) const {
    return sinks_and_band(sinks_end(position_hi), band(position_lo, position_hi));
  }

  // The smallest key range holding every key that some position in [position_lo, position_hi]
  // sees, sinks included.
  KeyRange keys_seen(Index position_lo, Index position_hi) const {
    const KeyRange range = band(position_lo, position_hi);
    const Index sinks = sinks_end(position_hi);
    if (sinks == 0) return range;
    if (range.end <= range.begin) return {0, sinks};
    return {0, std::max(range.end, sinks)};
  }

  // The positions that see at least one key of [key_begin, key_end) (a non-empty range).
  PositionRange positions_seeing(Index key_begin, Index key_end) const {
    constexpr Index kUnbounded = std::numeric_limits<Index>::max() / 4;
    const Index first = window_right < 0 ? -kUnbounded : key_begin - window_right;
    if (key_begin < sink_tokens) return {first, kUnbounded};
    return {first, window_left < 0 ? kUnbounded : plus(key_end - 1, window_left)};
  }

  // True when every position in [position_lo, position_hi] sees every key in [key_begin, key_end).
  bool sees_all(Index position_lo, Index position_hi, Index key_begin, Index key_end) const {
    const bool before_right_edge =
        window_right < 0 || key_end - 1 <= plus(position_lo, window_right);
    if (key_end <= sink_tokens) return before_right_edge;
    return before_right_edge && (window_left < 0 || key_begin >= plus(position_hi, -window_left));
  }
};

// Every one of `len_k` keys is visible from every position: a decode step whose query rows all
// sit at the newest position, over rows that hold only keys it sees.
struct AllKeys {
  Index len_k = 0;

  bool sees(Index, Index) const { return true; }
  KeyRanges visible_ranges(Index, Index) const { return sinks_and_band(len_k, {0, 0}); }
  KeyRange keys_seen(Index, Index) const { return {0, len_k}; }
  PositionRange positions_seeing(Index, Index) const {
    constexpr Index kUnbounded = std::numeric_limits<Index>::max() / 4;
    return {-kUnbounded, kUnbounded};
  }
  bool sees_all(Index, Index, Index, Index) const { return true; }
};

}  // namespace foveal::detail
