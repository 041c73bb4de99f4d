// src/detail/block_sparse_geometry.hpp (private) — which key blocks (block_sparse_select) or
// keys (token_topk_select) a query block may keep and how many it keeps: one definition for the
// entry points (which size the selection) and the level kernels (which fill it).
#pragma once

#include <algorithm>
#include <cmath>

#include "detail/mask.hpp"
#include "foveal/attention/options.hpp"
#include "foveal/core/error.hpp"
#include "foveal/core/tensor.hpp"

namespace foveal::detail {

// floor(value / divisor) for divisor > 0 (positions are negative when Lq > Lk, bottom-right).
inline Index floor_divide(Index value, Index divisor) {
  const Index quotient = value / divisor;
  return quotient * divisor > value ? quotient - 1 : quotient;
}

// The query blocks of a call whose queries sit at positions [q_offset, q_offset + len_q).
struct QueryBlocks {
  Index first = 0;  // floor(q_offset / block_size)
  Index count = 0;
};

// Empty views may have huge extents: a call whose last query position passes 2^63 - 1 is
// rejected (foveal::Error naming `function`) instead of overflowing.
inline QueryBlocks query_blocks_of(const char* function, Index q_offset, Index len_q,
                                   Index block_size) {
  if (len_q == 0) return {};
  Index last = 0;
  check(!__builtin_add_overflow(q_offset, len_q - 1, &last), function, ": q_offset (", q_offset,
        ") + Lq (", len_q, ") passes the largest position, 2^63 - 1");
  const Index first = floor_divide(q_offset, block_size);
  return {first, floor_divide(last, block_size) - first + 1};
}

// ceil(count / divisor) for count >= 0, divisor > 0, without overflowing.
inline Index ceil_divide(Index count, Index divisor) {
  return count / divisor + (count % divisor != 0);
}

// The visibility rule of `options` for a call's shapes.
inline Visibility visibility_of(const AttentionOptions& options, Index len_q, Index len_k,
                                Index q_offset) {
  return Visibility::make(options.causal, options.window_left, options.window_right,
                          options.sink_tokens, len_q, len_k, q_offset);
}

struct QueryBlockGeometry {
  Index position_lo = 0;      // the call's first query position in the block
  Index position_hi = -1;     // its last (position_hi < position_lo: no query)
  Index candidate_begin = 0;  // key blocks [candidate_begin, candidate_end) are candidates
  Index candidate_end = 0;
  Index local_begin = 0;  // the local candidates: [local_begin, candidate_end) ∩ [.., block]
  Index local_end = 0;
  Index keep = 0;  // how many blocks the block keeps at most (exactly, without a threshold)
};

// Query block `block` of a call whose queries sit at positions [q_offset, q_offset + len_q):
// its candidates are the key blocks that intersect the band (window, causal) of one of its
// queries; sinks are not candidates (they are always visible).
inline QueryBlockGeometry query_block_geometry(const Visibility& visibility, Index q_offset,
                                               Index len_q, Index block_size, Index block,
                                               double budget, Index local_blocks) {
  QueryBlockGeometry geometry;
  geometry.position_lo = std::max(q_offset, block * block_size);
  geometry.position_hi = std::min(q_offset + len_q, (block + 1) * block_size) - 1;
  if (geometry.position_hi < geometry.position_lo) return geometry;
  const KeyRange band = visibility.band(geometry.position_lo, geometry.position_hi);
  if (band.end <= band.begin) return geometry;
  geometry.candidate_begin = band.begin / block_size;
  geometry.candidate_end = (band.end + block_size - 1) / block_size;
  const Index candidates = geometry.candidate_end - geometry.candidate_begin;
  // Local blocks: `block` and the local_blocks - 1 before it, as far as they are candidates.
  geometry.local_end = std::clamp(block + 1, geometry.candidate_begin, geometry.candidate_end);
  geometry.local_begin = std::clamp(block + 1 - std::min(local_blocks, block + 1),
                                    geometry.candidate_begin, geometry.local_end);
  const Index local = geometry.local_end - geometry.local_begin;
  const auto wanted = static_cast<Index>(std::ceil(budget * static_cast<double>(candidates)));
  geometry.keep = std::min(candidates, std::max(wanted, local));
  return geometry;
}

struct TokenBlockGeometry {
  Index position_lo = 0;      // the call's first query position in the block
  Index position_hi = -1;     // its last (position_hi < position_lo: no query)
  Index candidate_begin = 0;  // keys [candidate_begin, candidate_end) are candidates
  Index candidate_end = 0;
  Index local_begin = 0;  // the local candidates [local_begin, local_end)
  Index local_end = 0;
  Index keep = 0;  // how many keys the block keeps at most (exactly, without a threshold)
};

// Query block `block` of token_topk_select (see foveal/attention/token_topk.hpp): its candidates
// are the keys past the sinks in the band of its queries, its local keys those candidates in
// [position_lo - local_tokens, position_hi].
inline TokenBlockGeometry token_block_geometry(const Visibility& visibility, Index q_offset,
                                               Index len_q, Index block_size, Index block,
                                               double budget, Index local_tokens) {
  TokenBlockGeometry geometry;
  geometry.position_lo = std::max(q_offset, block * block_size);
  geometry.position_hi = std::min(q_offset + len_q, (block + 1) * block_size) - 1;
  if (geometry.position_hi < geometry.position_lo) return geometry;
  const KeyRange band = visibility.band(geometry.position_lo, geometry.position_hi);
  geometry.candidate_begin = std::max(band.begin, visibility.sinks_end(geometry.position_hi));
  geometry.candidate_end = std::max(band.end, geometry.candidate_begin);
  const Index candidates = geometry.candidate_end - geometry.candidate_begin;
  // position_lo - local_tokens without overflow (positions and local_tokens are bounded by the
  // views' extents, which may be huge only when the views are empty).
  const Index local_from = local_tokens >= geometry.position_lo - geometry.candidate_begin
                               ? geometry.candidate_begin
                               : geometry.position_lo - local_tokens;
  geometry.local_begin = std::clamp(local_from, geometry.candidate_begin, geometry.candidate_end);
  geometry.local_end =
      std::clamp(geometry.position_hi + 1, geometry.local_begin, geometry.candidate_end);
  const Index local = geometry.local_end - geometry.local_begin;
  const auto wanted = static_cast<Index>(std::ceil(budget * static_cast<double>(candidates)));
  geometry.keep = std::min(candidates, std::max(wanted, local));
  return geometry;
}

}  // namespace foveal::detail
