// src/detail/flash_engine.hpp (private) — the ONE tiled online-softmax attention engine.
//
// Every attention variant is this engine plus a visit policy that says which key blocks a tile
// of query rows visits and which positions inside a visited block are masked.
//
// Layout of the work. A tile is up to kBlockQ query rows of one (batch, kv head); with GQA the
// rows are the (position, query head) pairs of the group, position-major, so the query heads of
// a group share every K/V row the tile loads. The tile's queries are packed once, transposed
// into q_t[D][kBlockQ]; K and V rows are read in place from the caller's memory
// (any row stride, unit inner stride), so nothing of K or V is ever copied. Scores are kept
// transposed, s_t[key][row]: the softmax statistics of kLanes rows are then plain vertical
// vector operations (no horizontal reductions), and the two products are register-blocked
// micro-kernels:
//   scores   s_t[j][rows]   += k[j][d] (broadcast) * q_t[d][rows]     6 keys x 4 vectors
//   output   acc[row][cols] += p[j][row] (broadcast) * v[j][cols]     6 rows x 4 vectors
// Logits are kept in base 2 (each finished dot product is multiplied by the scale times log2 e)
// so the softmax uses exp2. Tiles of at
// most kFewRows rows (decode: the queries of one GQA group) score keys as dot products along D
// instead, so no lane is spent on rows that do not exist.
//
// Policy interface, checked by the compiler (IsVisitPolicy below); RulePolicy supplies the mask
// queries of a visibility rule, so a policy usually writes for_each_block alone:
//   template <class Visit> void for_each_block(Index position_lo, Index position_hi,
//                                              Visit&& visit) const;
//       calls visit(KeyBlock) for every key block the rows at those positions may see; a
//       block's K/V rows are [begin, begin + count) or index[0..count), and the key in row i
//       sits at position i + position_offset.
//   bool sees(Index position, Index key_position) const;   consulted only inside blocks
//                                                          marked needs_mask and visited by
//                                                          index (without gating hooks).
//   KeyRange keys_seen(Index position_lo, Index position_hi) const;       (key positions)
//   PositionRange positions_seeing(Index key_begin, Index key_end) const; (key positions)
//       conservative bounds used inside masked contiguous blocks to skip the rows and keys
//       that cannot contribute (the triangle of a causal diagonal block, the edges of a band);
//       for a single key (key_end = key_begin + 1) exact: the masks of contiguous blocks are
//       built from it, so sees() is consulted only inside masked blocks visited by index.
// Policies that gather keys by index and weight them per row (SparseK) also declare
// `static constexpr bool kGatesKeys = true` and provide, for the blocks they visit with an
// index (they find their own per-key data from block.index):
//   void scale_logits(const KeyBlock&, int row_vectors, T* s_t) const;   before the softcap
//   void mask_logits(const KeyBlock&, Index num_rows, T* s_t) const;     for needs_mask blocks,
//                                                                        instead of sees()
//   void gate_probabilities(const KeyBlock&, int row_vectors, T* s_t) const;  after the softmax,
//       scaling what a key adds to the output but not the softmax normalizer.
//
// The driver. run_engine runs a list of tasks; each task names its policy and its Tile (the
// rows of one (batch, kv head), their position and where they are written) and may use
// per-thread policy scratch that the driver allocates once per call. TileGrid is the usual task
// list: every tile of every (batch, kv head), or of every (key chunk, kv head) for split-KV.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "detail/amx_tiles.hpp"
#include "detail/convert.hpp"
#include "detail/flash_plan.hpp"
#include "detail/isa.hpp"
#include "detail/mask.hpp"
#include "detail/simd.hpp"
#include "detail/softmax_math.hpp"
#include "detail/with_count.hpp"
#include "foveal/attention/kv_cache.hpp"  // stored_width
#include "foveal/core/parallel.hpp"
#include "foveal/core/tensor.hpp"

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {

// Micro-kernel shapes: as many accumulators as the register file holds next to the operands
// (24 of 32 registers with AVX-512, 12 of 16 otherwise; more spills and halves the speed).
inline constexpr bool kWideRegisterFile = kVectorRegisters >= 32;
inline constexpr int kKeysPerMicro = kWideRegisterFile ? 6 : 4;
inline constexpr int kRowVectorsPerMicro = kWideRegisterFile ? 4 : 3;
inline constexpr int kRowsPerMicro = kWideRegisterFile ? 6 : 4;
inline constexpr int kColVectorsPerMicro = kWideRegisterFile ? 4 : 3;
// Tiles of at most this many rows (decode: one query per head of a GQA group) compute their
// scores as dot products along D, so no vector lane is spent on a row that does not exist.
template <typename T>
inline constexpr Index kFewRows = std::max(1, kLanes<T> / 2);
// Rows per dot-product micro-kernel: 1, 2 or 4 rows with kLanes / rows keys each.
template <typename T>
inline constexpr int kMaxDotRows = std::min(4, kLanes<T>);

// ---------------------------------------------------------------------------------------------
// Micro-kernels.

// Dimensions the score accumulators sum before they are added to the stored scores. A dot
// product of D terms rounded one term at a time loses up to ~D ulps (and its rounding errors
// grow like sqrt(D) on random data); summed in runs of kScoreRun and the runs added up, it
// loses ~kScoreRun + D / kScoreRun. At D = 256 in fp32 that halves the output error against
// float64 (FlashAttention's rule: at most 2x a plain fp32 implementation's), for one load, add
// and store of the accumulators per run.
inline constexpr Index kScoreRun = 64;

// s_t[j][0 .. QV*kLanes) = multiplier * sum_d k_rows[j][d] * q_t[d][0 .. QV*kLanes), j < NK.
// q_t and s_t have row stride kBlockQ.
template <typename T, int NK, int QV>
inline void score_micro(const T* q_t, const T* const* k_rows, Index dim, T multiplier, T* s_t) {
  constexpr int L = kLanes<T>;
  if (dim == 0) {  // an empty sum (the backward's dO·v with Dv = 0)
    FOVEAL_UNROLL
    for (int j = 0; j < NK; ++j) {
      FOVEAL_UNROLL
      for (int c = 0; c < QV; ++c) store(s_t + j * kBlockQ + c * L, Vec<T>{});
    }
    return;
  }
  for (Index d0 = 0; d0 < dim; d0 += kScoreRun) {
    const Index d1 = std::min(dim, d0 + kScoreRun);
    Vec<T> acc[NK][QV];
    FOVEAL_UNROLL
    for (int j = 0; j < NK; ++j) {
      FOVEAL_UNROLL
      for (int c = 0; c < QV; ++c) acc[j][c] = Vec<T>{};
    }
    for (Index d = d0; d < d1; ++d) {
      const T* q_column = q_t + d * kBlockQ;
      Vec<T> q_vectors[QV];
      FOVEAL_UNROLL
      for (int c = 0; c < QV; ++c) q_vectors[c] = load(q_column + c * L);
      FOVEAL_UNROLL
      for (int j = 0; j < NK; ++j) {
        const Vec<T> key = splat(k_rows[j][d]);
        FOVEAL_UNROLL
        for (int c = 0; c < QV; ++c) acc[j][c] += key * q_vectors[c];
      }
    }
    FOVEAL_UNROLL
    for (int j = 0; j < NK; ++j) {
      FOVEAL_UNROLL
      for (int c = 0; c < QV; ++c) {
        T* scores = s_t + j * kBlockQ + c * L;
        const Vec<T> sum = d0 == 0 ? acc[j][c] : load(scores) + acc[j][c];
        store(scores, d1 == dim ? sum * multiplier : sum);
      }
    }
  }
}

// How far ahead of the 8-bit block or 16-bit row being read the cache's next rows are
// prefetched: the conversions make the loop compute-bound enough that the hardware prefetcher
// alone leaves memory stalls (consecutive keys' rows are consecutive in a cache). Decode, Hq 32,
// Hkv 8, D 128, Lk 32768-131072, one thread, Intel Xeon (AMX host): 16-bit rows without it read
// 5.5 GB/s (bfloat16 1.4x faster than float32), with 2048 bytes 1.8-1.9x, with 4096 1.8-2.0x;
// 8-bit blocks 2.8-3.0x at 2048, 2.6-3.2x at 4096. float32 rows gain nothing measurable.
inline constexpr Index kQ8PrefetchBytes = 4096;

// The lines [at + kQ8PrefetchBytes, + bytes): a 16-bit row's successor in the stream.
inline void prefetch_ahead(const void* at, Index bytes) {
  constexpr Index kLine = 64;
  const char* first = static_cast<const char*>(at) + kQ8PrefetchBytes;
  for (Index offset = 0; offset < bytes; offset += kLine) __builtin_prefetch(first + offset);
}

// Scores of a few rows as dot products along D: s_t[j][r] = multiplier * sum_d k_rows[j][d] *
// q_rows[r][d] for j < kLanes / NR, r < NR. q_rows has row stride q_stride (a multiple of kLanes,
// zero padded past D); the kLanes (key, row) sums are reduced together by one transposing sum.
// Keys are stored as S (converted as they are loaded).
template <typename T, int NR, typename S = T>
inline void dot_score_micro(const T* q_rows, Index q_stride, const S* const* k_rows, Index dim,
                            T multiplier, T* s_t) {
  constexpr int L = kLanes<T>;
  constexpr int NK = L / NR;
  Vec<T> acc[L];  // acc[key * NR + row]
  FOVEAL_UNROLL
  for (int i = 0; i < L; ++i) acc[i] = Vec<T>{};
  // Key by key, each row read front to back: K streams through memory in address order (four
  // rows read side by side stall on misses: 10-15% fewer GB/s in decode from DRAM).
  if constexpr (std::is_same_v<S, q8_block>) {
    // 8-bit keys block by block: one scale per 32 values, the block's vectors at fixed offsets
    // (no address arithmetic per vector). The last block is zero past D, q_rows past D too.
    constexpr int kPerBlock = q8_block::kValues / L;
    const Index vectors = (dim + L - 1) / L;
    FOVEAL_UNROLL
    for (int j = 0; j < NK; ++j) {
      const q8_block* block = k_rows[j];
      const T* q_column = q_rows;
      for (Index v = 0; v < vectors; v += kPerBlock, ++block, q_column += kPerBlock * L) {
        __builtin_prefetch(reinterpret_cast<const char*>(block) + kQ8PrefetchBytes);
        const Vec<T> scale = splat(block->scale);
        const int count = static_cast<int>(std::min<Index>(kPerBlock, vectors - v));
        FOVEAL_UNROLL
        for (int i = 0; i < kPerBlock; ++i) {
          if (i >= count) break;
          const Vec<T> key = convert_detail::widen_int8(block->values + i * L) * scale;
          FOVEAL_UNROLL
          for (int r = 0; r < NR; ++r)
            acc[j * NR + r] += key * load(q_column + r * q_stride + i * L);
        }
      }
    }
  } else {
    const Index full = dim / L * L;
    FOVEAL_UNROLL
    for (int j = 0; j < NK; ++j) {
      const S* key_row = k_rows[j];
      if constexpr (sizeof(S) == 2) prefetch_ahead(key_row, dim * Index{sizeof(S)});
      for (Index d = 0; d < full; d += L) {
        const Vec<T> key = load_as<T>(key_row + d);
        FOVEAL_UNROLL
        for (int r = 0; r < NR; ++r) acc[j * NR + r] += key * load(q_rows + r * q_stride + d);
      }
      if (full < dim) {
        const Vec<T> key = load_partial_as<T>(key_row + full, static_cast<int>(dim - full));
        FOVEAL_UNROLL
        for (int r = 0; r < NR; ++r) acc[j * NR + r] += key * load(q_rows + r * q_stride + full);
      }
    }
  }
  const Vec<T> sums = sum_lanes_of_each<T>(acc) * multiplier;
  FOVEAL_UNROLL
  for (int j = 0; j < NK; ++j) {
    FOVEAL_UNROLL
    for (int r = 0; r < NR; ++r) s_t[j * kBlockQ + r] = sums[j * NR + r];
  }
}

// Scores of `num_keys` keys against the first `row_vectors` vectors of packed queries.
// row_vector_range(j0, j1) -> {c_begin, c_end} names the row vectors that can see any key of
// [j0, j1); the scores of the other row vectors for those keys are set to -inf uncomputed.
template <typename T, typename RowVectorRange>
inline void compute_scores(const T* q_t, const T* const* k_rows, Index num_keys, Index dim,
                           T multiplier, int row_vectors, RowVectorRange&& row_vector_range,
                           T* s_t) {
  constexpr int L = kLanes<T>;
  const Vec<T> masked = splat(-std::numeric_limits<T>::infinity());
  for (Index j0 = 0; j0 < num_keys; j0 += kKeysPerMicro) {
    const int keys = static_cast<int>(std::min<Index>(kKeysPerMicro, num_keys - j0));
    const auto [c_begin, c_end] = row_vector_range(j0, j0 + keys);
    for (int j = 0; j < keys; ++j) {
      for (int c = 0; c < c_begin; ++c) store(s_t + (j0 + j) * kBlockQ + c * L, masked);
      for (int c = std::max(c_end, c_begin); c < row_vectors; ++c)
        store(s_t + (j0 + j) * kBlockQ + c * L, masked);
    }
    for (int c0 = c_begin; c0 < c_end; c0 += kRowVectorsPerMicro) {
      const int vectors = std::min(kRowVectorsPerMicro, c_end - c0);
      with_count<kKeysPerMicro>(keys, [&](auto nk) {
        with_count<kRowVectorsPerMicro>(vectors, [&](auto qv) {
          score_micro<T, decltype(nk)::value, decltype(qv)::value>(
              q_t + c0 * L, k_rows + j0, dim, multiplier, s_t + j0 * kBlockQ + c0 * L);
        });
      });
    }
  }
}

// The bounds of a block visited by a tile's rows (positions[0 .. num_rows), nondecreasing). Inside
// a masked contiguous block (a causal diagonal, a band edge) whole row vectors miss some key
// groups and whole row groups miss some keys: the policy's conservative bounds name the rows and
// keys that may contribute, and the products skip the rest (their probabilities are exact
// zeros). Any other block: every row and key. Keys and rows are indices into the block and tile.
template <typename Policy>
class BlockBounds {
 public:
  BlockBounds(const Policy& policy, const KeyBlock& block, const Index* positions, Index num_rows)
      : policy_(policy),
        positions_(positions),
        num_rows_(num_rows),
        count_(block.count),
        first_position_(block.begin + block.position_offset),
        trim_(block.needs_mask && block.index == nullptr) {}

  // The rows [first, end) that may see a key of [j0, j1); first == end when none.
  std::pair<Index, Index> rows_seeing(Index j0, Index j1) const {
    if (!trim_) return {0, num_rows_};
    const PositionRange seeing =
        policy_.positions_seeing(first_position_ + j0, first_position_ + j1);
    const Index* end = positions_ + num_rows_;
    const Index first = std::lower_bound(positions_, end, seeing.first) - positions_;
    const Index last = std::upper_bound(positions_, end, seeing.last) - positions_;
    return {first, std::max(first, last)};
  }

  // The row vectors (kLanes<T> rows each) holding rows_seeing(j0, j1).
  template <typename T>
  std::pair<int, int> row_vectors_seeing(Index j0, Index j1) const {
    constexpr Index L = kLanes<T>;
    const auto [first, end] = rows_seeing(j0, j1);
    if (end <= first) return {0, 0};
    return {static_cast<int>(first / L), static_cast<int>((end + L - 1) / L)};
  }

  // The keys [begin, end) that rows [r0, r1) may see.
  std::pair<Index, Index> keys_seen_by(Index r0, Index r1) const {
    if (!trim_) return {0, count_};
    const KeyRange seen = policy_.keys_seen(positions_[r0], positions_[r1 - 1]);
    return {std::clamp<Index>(seen.begin - first_position_, 0, count_),
            std::clamp<Index>(seen.end - first_position_, 0, count_)};
  }

 private:
  const Policy& policy_;
  const Index* positions_;
  Index num_rows_;
  Index count_;
  Index first_position_;
  bool trim_;
};

// Rows gathered by index (pages, selected keys) lie anywhere: the hardware prefetcher, which
// follows one address stream, finds each run cold, and decode (a few rows per key: little
// compute to hide the misses) reads them at half the speed of contiguous rows. While it scores
// key j the decode loop prefetches the K row kGatherPrefetchKeys keys ahead and the V row of key
// j, which the output reads once the block is scored (Quest over pages of 16 at Lk 131072, one
// thread: about 6% less time per step, the kept pages' pass about 10%).
inline constexpr Index kGatherPrefetchKeys = 16;

// The rows of a gathered block that compute_few_row_scores prefetches (none when k is null).
template <typename S>
struct GatherPrefetch {
  const S* const* k = nullptr;
  const S* const* v = nullptr;
  Index k_bytes = 0;  // bytes of a K row, and of a V row
  Index v_bytes = 0;
};

inline void prefetch_row(const void* row, Index bytes) {
  constexpr Index kLine = 64;
  const char* first = static_cast<const char*>(row);
  for (Index at = 0; at < bytes; at += kLine) __builtin_prefetch(first + at);
}

// Scores of num_rows <= kFewRows rows (see dot_score_micro). k_rows must hold valid pointers up
// to num_keys rounded up to kLanes; s_t rows past num_keys receive scores of those repeats.
template <typename T, typename S>
inline void compute_few_row_scores(const T* q_rows, Index q_stride, const S* const* k_rows,
                                   Index num_keys, Index dim, T multiplier, Index num_rows, T* s_t,
                                   const GatherPrefetch<S>& prefetch = {}) {
  constexpr int L = kLanes<T>;
  // The first kGatherPrefetchKeys K rows now: the loop prefetches from there on.
  if (prefetch.k != nullptr)
    for (Index j = 0; j < std::min(num_keys, kGatherPrefetchKeys); ++j)
      prefetch_row(prefetch.k[j], prefetch.k_bytes);
  const auto rows_at_a_time = [&](Index r0, auto nr) {
    constexpr int NR = decltype(nr)::value;
    constexpr Index NK = L / NR;
    for (Index j0 = 0; j0 < num_keys; j0 += NK) {
      if (prefetch.k != nullptr && r0 == 0) {  // the first pass over the keys reads them
        const Index ahead = std::min(num_keys, j0 + kGatherPrefetchKeys + NK);
        for (Index j = j0 + kGatherPrefetchKeys; j < ahead; ++j)
          prefetch_row(prefetch.k[j], prefetch.k_bytes);
        for (Index j = j0; j < std::min(num_keys, j0 + NK); ++j)
          prefetch_row(prefetch.v[j], prefetch.v_bytes);
      }
      dot_score_micro<T, NR, S>(q_rows + r0 * q_stride, q_stride, k_rows + j0, dim, multiplier,
                                s_t + j0 * kBlockQ + r0);
    }
    return NR;
  };
  // 4, 2 or 1 rows at a time (never more than kMaxDotRows).
  constexpr int kFour = kMaxDotRows<T> >= 4 ? 4 : 1;
  constexpr int kTwo = kMaxDotRows<T> >= 2 ? 2 : 1;
  for (Index r0 = 0; r0 < num_rows;) {
    const Index remaining = num_rows - r0;
    if (kMaxDotRows<T> >= 4 && remaining >= 4) {
      r0 += rows_at_a_time(r0, std::integral_constant<int, kFour>{});
    } else if (kMaxDotRows<T> >= 2 && remaining >= 2) {
      r0 += rows_at_a_time(r0, std::integral_constant<int, kTwo>{});
    } else {
      r0 += rows_at_a_time(r0, std::integral_constant<int, 1>{});
    }
  }
}

// acc[r][cols] = acc[r][cols] * alpha[r] + sum_j p_t[j][r] * v_rows[j][cols] for r < NR,
// cols = col0 .. col0 + CV*kLanes. p_t has row stride kBlockQ; acc has row stride acc_stride.
// The block's sum is formed on its own and added to the rescaled accumulator once (one FMA, as
// the rescaling cost before), so a row's output sums its keys block by block: a sum of Lk terms
// rounded term by term would lose accuracy in proportion to Lk.
// Masked: a zero probability adds nothing even when the value is NaN (a masked-out key's NaN
// must not reach the rows that do not see it; 0 * NaN would be NaN).
template <typename T, int NR, int CV, bool Masked = false, typename S = T>
inline void output_micro(const T* p_t, const T* alpha, const S* const* v_rows, Index num_keys,
                         Index col0, T* acc, Index acc_stride) {
  constexpr int L = kLanes<T>;
  Vec<T> sums[NR][CV];
  FOVEAL_UNROLL
  for (int r = 0; r < NR; ++r) {
    FOVEAL_UNROLL
    for (int c = 0; c < CV; ++c) sums[r][c] = Vec<T>{};
  }
  for (Index j = 0; j < num_keys; ++j) {
    const S* v_row = v_rows[j];
    Vec<T> values[CV];
    if constexpr (std::is_same_v<S, q8_block> &&
                  (kColVectorsPerMicro * L) % q8_block::kValues == 0) {
      // col0 is a whole number of 8-bit blocks: every vector's block and offset is constant.
      const q8_block* blocks = v_row + col0 / q8_block::kValues;
      __builtin_prefetch(reinterpret_cast<const char*>(blocks) + kQ8PrefetchBytes);
      FOVEAL_UNROLL
      for (int c = 0; c < CV; ++c) {
        const q8_block& block = blocks[c * L / q8_block::kValues];
        values[c] = convert_detail::widen_int8(block.values + c * L % q8_block::kValues) *
                    splat(block.scale);
      }
    } else {
      if constexpr (sizeof(S) == 2) prefetch_ahead(v_row + col0, CV * L * Index{sizeof(S)});
      FOVEAL_UNROLL
      for (int c = 0; c < CV; ++c) values[c] = load_row<T>(v_row, col0 + c * L);
    }
    const T* p_row = p_t + j * kBlockQ;
    FOVEAL_UNROLL
    for (int r = 0; r < NR; ++r) {
      const Vec<T> weight = splat(p_row[r]);
      if constexpr (Masked) {
        if (p_row[r] == T(0)) continue;
      }
      FOVEAL_UNROLL
      for (int c = 0; c < CV; ++c) sums[r][c] += weight * values[c];
    }
  }
  FOVEAL_UNROLL
  for (int r = 0; r < NR; ++r) {
    FOVEAL_UNROLL
    for (int c = 0; c < CV; ++c) {
      T* out = acc + r * acc_stride + col0 + c * L;
      store(out, load(out) * alpha[r] + sums[r][c]);
    }
  }
}

// True when rows[j][0 .. cols) is finite for every j < count (x - x is 0 exactly for finite x).
template <typename T, typename S>
inline bool all_finite(const S* const* rows, Index count, Index cols) {
  constexpr int L = kLanes<T>;
  const Index full = cols / L * L;
  Vec<T> sum{};
  for (Index j = 0; j < count; ++j) {
    const S* row = rows[j];
    for (Index c = 0; c < full; c += L) {
      const Vec<T> x = load_row<T>(row, c);
      sum += x - x;
    }
    for (Index c = full; c < cols; ++c) sum[0] += row_value<T>(row, c) - row_value<T>(row, c);
  }
  for (int lane = 0; lane < L; ++lane)
    if (sum[lane] != T(0)) return false;
  return true;
}

// acc[r][:] = acc[r][:] * alpha[r] + sum_j p_t[j][r] * v_rows[j][:] for r < num_rows.
// key_range(r0, r1) -> {j_begin, j_end} bounds the keys that rows [r0, r1) can see; the
// probabilities of the others are 0 and are skipped. In a `masked` block zero probabilities
// are skipped one by one too, so a masked-out key's NaN value never reaches a row.
template <typename T, typename S, typename KeyRangeOfRows>
inline void accumulate_output(const T* p_t, const T* alpha, const S* const* v_rows, Index num_rows,
                              Index dim_v, KeyRangeOfRows&& key_range, T* acc, Index acc_stride,
                              bool masked = false) {
  constexpr int L = kLanes<T>;
  const Index full_vectors = dim_v / L;
  for (Index r0 = 0; r0 < num_rows; r0 += kRowsPerMicro) {
    const int rows = static_cast<int>(std::min<Index>(kRowsPerMicro, num_rows - r0));
    const auto [j_begin, j_end] = key_range(r0, r0 + rows);
    const Index num_keys = std::max<Index>(j_end - j_begin, 0);
    const T* p_part = p_t + j_begin * kBlockQ + r0;
    const S* const* v_part = v_rows + j_begin;
    T* acc_part = acc + r0 * acc_stride;
    for (Index c0 = 0; c0 < full_vectors; c0 += kColVectorsPerMicro) {
      const int vectors = static_cast<int>(std::min<Index>(kColVectorsPerMicro, full_vectors - c0));
      const Index col0 = c0 * L;
      with_count<kRowsPerMicro>(rows, [&](auto nr) {
        with_count<kColVectorsPerMicro>(vectors, [&](auto cv) {
          if (masked) {
            output_micro<T, decltype(nr)::value, decltype(cv)::value, true, S>(
                p_part, alpha + r0, v_part, num_keys, col0, acc_part, acc_stride);
          } else {
            output_micro<T, decltype(nr)::value, decltype(cv)::value, false, S>(
                p_part, alpha + r0, v_part, num_keys, col0, acc_part, acc_stride);
          }
        });
      });
    }
    // Columns past the last full vector (Dv not a multiple of kLanes).
    for (Index col = full_vectors * L; col < dim_v; ++col) {
      for (Index r = r0; r < r0 + rows; ++r) {
        T sum = 0;
        for (Index j = j_begin; j < j_end; ++j)
          if (!masked || p_t[j * kBlockQ + r] != T(0))
            sum += p_t[j * kBlockQ + r] * row_value<T>(v_rows[j], col);
        acc[r * acc_stride + col] = acc[r * acc_stride + col] * alpha[r] + sum;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// One tile of query rows.

// `count` rounded up to whole vectors of T: the row stride of packed and converted rows.
template <typename T>
inline Index whole_vectors(Index count) {
  return (count + kLanes<T> - 1) / kLanes<T> * kLanes<T>;
}

template <typename T>
struct TileScratch {
  T* q_t;               // [D][kBlockQ]: queries, transposed (few-row tiles: [rows][D'])
  T* s_t;               // [kBlockK][kBlockQ]: scores, then probabilities, of the current key block
  T* acc;               // [kBlockQ][acc_stride]: unnormalized output
  T* kv = nullptr;      // 16-bit storage: the key block's K rows, then its V rows, as T
  void* amx = nullptr;  // bfloat16 tiles on AMX: amx::Scratch
};

// S is the stored element type of q, out and bias, KV that of k and v (S, or q8_block under
// float queries); the tile computes in T = compute_type_t<S>. Few-row tiles convert K and V rows
// as the micro-kernels load them; larger tiles convert each key block once into scratch.kv (a
// cost of 1 / kBlockQ of the block's arithmetic) and run the float micro-kernels on it.
template <typename S, typename KV = S>
class TileRunner {
  using T = compute_type_t<S>;

 public:
  TileRunner(const FlashParams<S, KV>& params, Index acc_stride)
      : params_(params),
        group_(params.q.size(1) / params.k.size(1)),
        dim_(params.q.size(3)),
        dim_v_(params.dim_v()),
        acc_stride_(acc_stride) {
    // Logits are produced in base 2. With a softcap the queries carry scale / softcap and the
    // cap multiplies tanh by softcap * log2 e afterwards.
    const Multipliers multipliers = logit_multipliers<T>(params.scale, params.softcap);
    q_multiplier_ = multipliers.query;
    cap_multiplier_ = multipliers.cap;
#if FOVEAL_AMX_TILES
    // (A call whose tiles all have few rows, a decode step, runs none on AMX: no scratch.)
    if constexpr (kAmxCapable)
      use_amx_ = amx::supports(dim_, dim_v_) && params.rows_per_head() > kFewRows<T> &&
                 amx_tiles_enabled();
#endif
  }

  // With the AMX tiles and more than one tile of rows per head, every tile of a head would
  // pair-interleave the same V blocks again: pack_values_once does it once per call for every
  // (batch, kv head), into `memory` (values_once_count() elements), which the tiles then read
  // (16-18% less time per block in bench_amx_tiles' BM_AmxTile/D/1 than /D/0, medians of 5).
  // Only where that is less packing: the queries span at least half the keys (every tile
  // visits at least a block, so the tiles visit at least as many keys as there are), else 0.
  // The keys are padded with zeros to a whole 32-key step and one step more, so that a block at
  // the end of the keys reads zeros past them whatever its first key.
  Index values_once_count() const {
#if FOVEAL_AMX_TILES
    if (use_amx_ && params_.rows_per_head() > kBlockQ &&
        params_.q.size(2) >= (params_.k.size(2) + 1) / 2)
      return params_.k.size(0) * params_.k.size(1) * packed_keys() * dim_v_;
#endif
    return 0;
  }
  void pack_values_once(std::uint16_t* memory, int num_threads) {
#if FOVEAL_AMX_TILES
    if constexpr (kAmxCapable) {
      const auto& v = params_.v;
      const Index heads = v.size(1), keys = v.size(2), padded = packed_keys();
      parallel_for(v.size(0) * heads, num_threads, [&](Index task) {
        const bfloat16* rows = v.data() + task / heads * v.stride(0) + task % heads * v.stride(1);
        const Index row_stride = v.stride(2);
        amx::pack_values(
            [&](Index j) { return reinterpret_cast<const std::uint16_t*>(rows + j * row_stride); },
            keys, padded / amx::kStepValues, dim_v_, memory + task * padded * dim_v_);
      });
      packed_values_ = memory;
    }
#else
    (void)memory;
    (void)num_threads;
#endif
  }

  // Bytes of per-thread scratch the AMX tiles need (0 when they are not used).
  Index amx_scratch_bytes() const {
#if FOVEAL_AMX_TILES
    if (use_amx_) return amx::Scratch::bytes(dim_, dim_v_);
#endif
    return 0;
  }

  // Runs the rows of `tile` with `policy`.
  template <typename Policy>
  void run(const Policy& policy, const Tile<S>& tile, const TileScratch<T>& scratch) const {
    static_assert(IsVisitPolicy<Policy>::value,
                  "a visit policy needs for_each_block, sees, keys_seen and positions_seeing "
                  "(see the comment at the top of flash_engine.hpp)");
    static_assert(!GatesKeys<Policy>::value || HasGateHooks<Policy, T>::value,
                  "a policy with kGatesKeys needs scale_logits, mask_logits and "
                  "gate_probabilities");
    constexpr int L = kLanes<T>;
    const Index batch = tile.batch, kv_head = tile.kv_head, flat_begin = tile.flat_begin;
    const Index num_rows = std::min(kBlockQ, params_.q.size(2) * group_ - flat_begin);
    const int row_vectors = static_cast<int>((num_rows + L - 1) / L);

    Index positions[kBlockQ];
    Index query_index[kBlockQ];
    Index head[kBlockQ];
    for (Index r = 0; r < kBlockQ; ++r) {
      const Index flat = flat_begin + std::min(r, num_rows - 1);
      query_index[r] = flat / group_;
      head[r] = kv_head * group_ + flat % group_;
      positions[r] = tile.q_offset + query_index[r];
    }

    const bool few_rows = num_rows <= kFewRows<T>;
#if FOVEAL_AMX_TILES
    // bfloat16 tiles of many rows multiply on AMX: queries packed for it, tiles configured for
    // this thread until the tile is done.
    const bool amx_tile = use_amx_ && !few_rows;
    amx::Scratch amx_scratch{};
    if (amx_tile) {
      amx_scratch = amx::Scratch::at(scratch.amx, dim_);
      pack_amx_queries(batch, num_rows, query_index, head, amx_scratch.q_vnni);
      amx::configure();
    }
#endif
    // The float kernels' packed queries; a tile on AMX packs them only if a block gathered by
    // index (which the tiles do not take) comes.
    bool queries_packed = false;
    const auto pack_float_queries = [&] {
      if (queries_packed) return;
      queries_packed = true;
      if (few_rows) {
        pack_query_rows(batch, num_rows, query_index, head, scratch.q_t);
      } else {
        pack_queries(batch, num_rows, query_index, head, scratch.q_t);
      }
    };
#if FOVEAL_AMX_TILES
    if (!amx_tile) pack_float_queries();
#else
    pack_float_queries();
#endif

    T row_max[kBlockQ];
    T row_sum[kBlockQ];
    T alpha[kBlockQ];
    std::fill(row_max, row_max + kBlockQ, -std::numeric_limits<T>::infinity());
    std::fill(row_sum, row_sum + kBlockQ, T(0));
    // (The AMX tiles accumulate whole tiles of 16 rows.)
    const Index zeroed_rows = std::min(kBlockQ, whole_vectors<T>(num_rows));
    for (Index r = 0; r < zeroed_rows; ++r)
      std::fill_n(scratch.acc + r * acc_stride_, dim_v_, T(0));

    const auto& k = params_.k;
    const auto& v = params_.v;
    const KV* k_base = k.data() + batch * k.stride(0) + kv_head * k.stride(1);
    const KV* v_base = v.data() + batch * v.stride(0) + kv_head * v.stride(1);
    const Index k_row_stride = k.stride(2);
    const Index v_row_stride = v.stride(2);

    policy.for_each_block(positions[0], positions[num_rows - 1], [&](const KeyBlock& block) {
      const KV* k_rows[kBlockK];
      const KV* v_rows[kBlockK];
      Index keys[kBlockK];
      for (Index j = 0; j < block.count; ++j) {
        keys[j] = block.index != nullptr ? block.index[j] : block.begin + j;
        k_rows[j] = k_base + keys[j] * k_row_stride;
        v_rows[j] = v_base + keys[j] * v_row_stride;
      }
      if constexpr (!std::is_same_v<KV, T>) {
        if (!few_rows) {
#if FOVEAL_AMX_TILES
          if (amx_tile) {
            visit_block_amx(policy, tile, scratch, amx_scratch, block, keys, k_rows, v_rows,
                            num_rows, row_vectors, query_index, head, positions, row_max, row_sum,
                            alpha);
            return;
          }
#endif
          pack_float_queries();
          // Convert the block once; the float micro-kernels then read it.
          const T* k_converted[kBlockK];
          const T* v_converted[kBlockK];
          convert_block(k_rows, v_rows, block.count, scratch.kv, k_converted, v_converted);
          visit_block(policy, tile, scratch, block, keys, k_converted, v_converted, num_rows,
                      row_vectors, query_index, head, positions, row_max, row_sum, alpha);
          return;
        }
      }
      visit_block(policy, tile, scratch, block, keys, k_rows, v_rows, num_rows, row_vectors,
                  query_index, head, positions, row_max, row_sum, alpha);
    });

#if FOVEAL_AMX_TILES
    if (amx_tile) amx::release();
#endif
    write_rows(tile, num_rows, query_index, head, row_max, row_sum, scratch.acc);
  }

#if FOVEAL_AMX_TILES
  // visit_block for a key block of a bfloat16 tile on AMX (amx_tiles.hpp): the two products on
  // tiles, the logits' transforms and the softmax as in visit_block. A gathered block's K rows
  // are staged contiguous first; its gates (a policy with kGatesKeys) weight the probabilities
  // in float before they are rounded for the tiles.
  template <typename Policy>
  void visit_block_amx(const Policy& policy, const Tile<S>& tile, const TileScratch<T>& scratch,
                       const amx::Scratch& amx_scratch, const KeyBlock& block, const Index* keys,
                       const KV* const* k_rows, const KV* const* v_rows, Index num_rows,
                       int row_vectors, const Index* query_index, const Index* head,
                       const Index* positions, T* row_max, T* row_sum, T* alpha) const {
    const Index count = block.count;
    const auto bits = [](const KV* row) { return reinterpret_cast<const std::uint16_t*>(row); };
    const auto row_bytes = static_cast<std::size_t>(dim_) * sizeof(std::uint16_t);
    const bool gathered = block.index != nullptr;
    // K rows in place with their stride, or (gathered) staged in k_block; a partial last tile of
    // 16 keys is read with zeros after it (the rows after the block's may lie past the end of k).
    const Index whole = count / amx::kTileRows * amx::kTileRows;
    const std::uint16_t* k_first = bits(k_rows[0]);
    Index k_stride = params_.k.stride(2);
    const std::uint16_t* k_tail = amx_scratch.k_tail;
    if (gathered) {
      for (Index j = 0; j < count; ++j)
        std::memcpy(amx_scratch.k_block + j * dim_, bits(k_rows[j]), row_bytes);
      const Index padded = (count + amx::kTileRows - 1) / amx::kTileRows * amx::kTileRows;
      std::memset(amx_scratch.k_block + count * dim_, 0,
                  static_cast<std::size_t>(padded - count) * row_bytes);
      k_first = amx_scratch.k_block;
      k_stride = dim_;
      k_tail = amx_scratch.k_block + whole * dim_;
    } else if (whole < count) {
      std::memset(amx_scratch.k_tail, 0, static_cast<std::size_t>(amx::kTileRows) * row_bytes);
      for (Index j = whole; j < count; ++j)
        std::memcpy(amx_scratch.k_tail + (j - whole) * dim_, bits(k_rows[j]), row_bytes);
    }
    // A masked-out key's non-finite value must not reach the rows that do not see it (0 * inf
    // is NaN on tiles too): such a block's values go through the float kernels, skipping zeros.
    const bool tiles_output = !block.needs_mask || all_finite<T>(v_rows, count, dim_v_);
    // Gates weight a gathered block's probabilities: the engine's softmax leaves them in s_t.
    bool gates = false;
    if constexpr (GatesKeys<Policy>::value) gates = gathered;
    // Without softcap, bias and gates only masks (-inf) transform the logits: the softmax
    // applies the logit multiplier as it reads them, saving a pass over the scores.
    const bool late_multiplier =
        tiles_output && !gates && cap_multiplier_ == 0 && params_.bias.data() == nullptr;
    // Where a row tile's last row sees its last key (a causal diagonal, a band's right edge):
    // the later keys' products and probabilities are skipped for the tile.
    Index key_end[kBlockQ / amx::kTileRows] = {};
    for (int c = 0; c < row_vectors; ++c) {
      key_end[c] = count;
      if (!block.needs_mask || gathered) continue;
      const Index last_row = std::min(num_rows, (c + 1) * amx::kTileRows) - 1;
      const KeyRange seen = policy.keys_seen(positions[c * amx::kTileRows], positions[last_row]);
      key_end[c] = std::clamp<Index>(seen.end - (block.begin + block.position_offset), 0, count);
    }
    amx::scores(k_first, k_stride, count, k_tail, amx_scratch.q_vnni, dim_, row_vectors, key_end,
                late_multiplier ? T(1) : q_multiplier_, scratch.s_t);
    transform_logits(tile.batch, block, keys, num_rows, row_vectors, query_index, head, positions,
                     policy, scratch.s_t);
    if (!tiles_output || gates)
      online_softmax(count, row_vectors, scratch.s_t, row_max, row_sum, alpha);
    if constexpr (GatesKeys<Policy>::value) {
      if (gates) policy.gate_probabilities(block, row_vectors, scratch.s_t);
    }
    if (!tiles_output) {
      accumulate_output(
          scratch.s_t, alpha, v_rows, num_rows, dim_v_,
          [&](Index, Index) { return std::pair<Index, Index>(0, count); }, scratch.acc, acc_stride_,
          true);
      return;
    }
    // The values of the keys some row tile sees, in whole 32-key steps.
    const Index seen = *std::max_element(key_end, key_end + row_vectors);
    const Index steps = (seen + amx::kStepValues - 1) / amx::kStepValues;
    if (gates) {
      amx::probabilities_to_rows(scratch.s_t, key_end, row_vectors, steps, amx_scratch.p_rows);
    } else {
      amx::softmax_to_rows(scratch.s_t, key_end, row_vectors, steps,
                           late_multiplier ? q_multiplier_ : T(1), row_max, row_sum, alpha,
                           amx_scratch.p_rows);
    }
    // The block's V pairs from pack_values_once where its pairs are the head's (an even first
    // key) and its last step holds no key past the block but the zeros after the last key.
    const std::uint16_t* v_vnni = amx_scratch.v_vnni;
    if (packed_values_ != nullptr && !gathered && block.begin % 2 == 0 &&
        (count % amx::kStepValues == 0 || block.begin + count == params_.k.size(2))) {
      v_vnni =
          packed_values_ +
          ((tile.batch * params_.k.size(1) + tile.kv_head) * packed_keys() + block.begin) * dim_v_;
    } else {
      amx::pack_values([&](Index j) { return bits(v_rows[j]); }, seen, steps, dim_v_,
                       amx_scratch.v_vnni);
    }
    amx::accumulate(amx_scratch.p_rows, v_vnni, key_end, row_vectors, dim_v_, alpha, scratch.acc,
                    acc_stride_);
  }

  // amx::pack_queries on the tile's query rows.
  void pack_amx_queries(Index batch, Index num_rows, const Index* query_index, const Index* head,
                        std::uint16_t* q_vnni) const {
    const auto& q = params_.q;
    const std::uint16_t* rows[kBlockQ];
    for (Index r = 0; r < num_rows; ++r)
      rows[r] = reinterpret_cast<const std::uint16_t*>(
          q.data() + batch * q.stride(0) + head[r] * q.stride(1) + query_index[r] * q.stride(2));
    amx::pack_queries(rows, num_rows, dim_, q_vnni);
  }
#endif

  // Scores one key block against the tile's rows, updates the softmax statistics and adds the
  // block's values to the output accumulators. Row is T or S: K and V rows as stored or
  // converted.
  template <typename Policy, typename Row>
  void visit_block(const Policy& policy, const Tile<S>& tile, const TileScratch<T>& scratch,
                   const KeyBlock& block, const Index* keys, const Row** k_rows,
                   const Row* const* v_rows, Index num_rows, int row_vectors,
                   const Index* query_index, const Index* head, const Index* positions, T* row_max,
                   T* row_sum, T* alpha) const {
    constexpr int L = kLanes<T>;
    const Index batch = tile.batch;
    const bool few_rows = num_rows <= kFewRows<T>;
    const BlockBounds<Policy> bounds(policy, block, positions, num_rows);
    const auto row_vectors_seeing = [&](Index j0, Index j1) {
      return bounds.template row_vectors_seeing<T>(j0, j1);
    };
    const auto keys_seen_by = [&](Index r0, Index r1) { return bounds.keys_seen_by(r0, r1); };
    if (few_rows) {
      // The micro-kernel reads whole groups of keys: repeat the last row to fill the group.
      const Index padded = (block.count + L - 1) / L * L;
      std::fill(k_rows + block.count, k_rows + padded, k_rows[block.count - 1]);
      GatherPrefetch<Row> prefetch;
      if (block.index != nullptr) {
        constexpr auto kSize = static_cast<Index>(sizeof(Row));
        prefetch = {k_rows, v_rows, stored_width<Row>(dim_) * kSize,
                    stored_width<Row>(dim_v_) * kSize};
      }
      compute_few_row_scores(scratch.q_t, query_row_stride(), k_rows, block.count, dim_,
                             q_multiplier_, num_rows, scratch.s_t, prefetch);
    } else if constexpr (std::is_same_v<Row, T>) {  // stored rows reach here converted
      compute_scores(scratch.q_t, k_rows, block.count, dim_, q_multiplier_, row_vectors,
                     row_vectors_seeing, scratch.s_t);
    }
    transform_logits(batch, block, keys, num_rows, row_vectors, query_index, head, positions,
                     policy, scratch.s_t);
    online_softmax(block.count, row_vectors, scratch.s_t, row_max, row_sum, alpha);
    if constexpr (GatesKeys<Policy>::value) {
      if (block.index != nullptr) policy.gate_probabilities(block, row_vectors, scratch.s_t);
    }
    // A masked-out key must not reach the rows that do not see it, but 0 * NaN (or 0 * inf)
    // is NaN: only a masked block with a non-finite value skips zero probabilities one by
    // one; with finite values adding 0 * v changes nothing.
    const bool skip_zeros = block.needs_mask && !all_finite<T>(v_rows, block.count, dim_v_);
    accumulate_output(scratch.s_t, alpha, v_rows, num_rows, dim_v_, keys_seen_by, scratch.acc,
                      acc_stride_, skip_zeros);
  }

  // The K rows of a block converted to T in kv[0 .. count * D'), then its V rows after them
  // (D' and Dv' rounded up to whole vectors).
  void convert_block(const KV* const* k_rows, const KV* const* v_rows, Index count, T* kv,
                     const T** k_converted, const T** v_converted) const {
    const Index k_stride = whole_vectors<T>(dim_);
    const Index v_stride = whole_vectors<T>(dim_v_);
    T* v_base = kv + kBlockK * k_stride;
    for (Index j = 0; j < count; ++j) {
      convert_row(k_rows[j], dim_, kv + j * k_stride);
      convert_row(v_rows[j], dim_v_, v_base + j * v_stride);
      k_converted[j] = kv + j * k_stride;
      v_converted[j] = v_base + j * v_stride;
    }
  }

  // The pieces of run() that the backward (src/detail/flash_backward.hpp) shares.

  // What the score micro-kernels multiply each finished dot product by: the logit scale times
  // log2 e (over the softcap with one), turning q.k into a base-2 logit. Applied to the finished
  // sum, not to the packed queries: rounding each q[d] * multiplier would add D independent
  // roundings to every logit (the largest fp32 error of the engine, measured on FlashAttention's
  // grid).
  T query_multiplier() const { return q_multiplier_; }

  // Row stride of the packed queries of a few-row tile: D rounded up to whole vectors.
  Index query_row_stride() const { return whole_vectors<T>(dim_); }

  // q_rows[r][d] = q[batch, head[r], query_index[r], d], zero past D.
  void pack_query_rows(Index batch, Index num_rows, const Index* query_index, const Index* head,
                       T* q_rows) const {
    const auto& q = params_.q;
    const Index stride = query_row_stride();
    for (Index r = 0; r < num_rows; ++r) {
      const S* q_row =
          q.data() + batch * q.stride(0) + head[r] * q.stride(1) + query_index[r] * q.stride(2);
      T* packed = q_rows + r * stride;
      for (Index d = 0; d < dim_; ++d) packed[d] = to_compute(q_row[d]);
      std::fill(packed + dim_, packed + stride, T(0));
    }
  }

  // q_t[d][r] = q[batch, head[r], query_index[r], d]; rows past num_rows are 0.
  void pack_queries(Index batch, Index num_rows, const Index* query_index, const Index* head,
                    T* q_t) const {
    const auto& q = params_.q;
    for (Index r = 0; r < num_rows; ++r) {
      const S* q_row =
          q.data() + batch * q.stride(0) + head[r] * q.stride(1) + query_index[r] * q.stride(2);
      for (Index d = 0; d < dim_; ++d) q_t[d * kBlockQ + r] = to_compute(q_row[d]);
    }
    for (Index d = 0; d < dim_; ++d)
      std::fill(q_t + d * kBlockQ + num_rows, q_t + (d + 1) * kBlockQ, T(0));
  }

  // Softcap, additive bias and mask, in that order, on s_t[j][r] (base-2 logits). With a
  // softcap, tanh_t (when given; same layout as s_t) receives the tanh of every logit, which
  // the backward needs for the softcap's derivative.
  template <typename Policy>
  void transform_logits(Index batch, const KeyBlock& block, const Index* keys, Index num_rows,
                        int row_vectors, const Index* query_index, const Index* head,
                        const Index* positions, const Policy& policy, T* s_t,
                        T* tanh_t = nullptr) const {
    constexpr int L = kLanes<T>;
    constexpr bool kGathered = GatesKeys<Policy>::value;
    if constexpr (kGathered) {
      if (block.index != nullptr) policy.scale_logits(block, row_vectors, s_t);
    }
    if (cap_multiplier_ > 0) {
      for (Index j = 0; j < block.count; ++j)
        for (int c = 0; c < row_vectors; ++c) {
          T* slot = s_t + j * kBlockQ + c * L;
          const Vec<T> capped = tanh(load(slot));
          if (tanh_t != nullptr) store(tanh_t + j * kBlockQ + c * L, capped);
          store(slot, capped * cap_multiplier_);
        }
    }
    if (params_.bias.data() != nullptr) {
      const auto& bias = params_.bias;
      const T log2e = static_cast<T>(kLog2E);
      for (Index r = 0; r < num_rows; ++r) {
        const S* bias_row = bias.data() + batch * bias.stride(0) + head[r] * bias.stride(1) +
                            query_index[r] * bias.stride(2);
        for (Index j = 0; j < block.count; ++j)
          s_t[j * kBlockQ + r] += to_compute(bias_row[keys[j] * bias.stride(3)]) * log2e;
      }
    }
    if constexpr (kGathered) {
      if (block.needs_mask && block.index != nullptr) {
        policy.mask_logits(block, num_rows, s_t);
        return;
      }
    }
    if (!block.needs_mask) return;
    const T masked = -std::numeric_limits<T>::infinity();
    if (block.index != nullptr) {
      for (Index j = 0; j < block.count; ++j)
        for (Index r = 0; r < num_rows; ++r)
          if (!policy.sees(positions[r], keys[j] + block.position_offset))
            s_t[j * kBlockQ + r] = masked;
      return;
    }
    // A key is seen by one interval of positions, and rows are sorted by position: mask the
    // rows before and after it, two fills per key instead of a test per (row, key).
    for (Index j = 0; j < block.count; ++j) {
      const Index key = keys[j] + block.position_offset;
      const PositionRange seeing = policy.positions_seeing(key, key + 1);
      const Index* first = positions;
      const Index* last = positions + num_rows;
      const Index r_begin = std::lower_bound(first, last, seeing.first) - first;
      const Index r_end = std::max(r_begin, std::upper_bound(first, last, seeing.last) - first);
      T* column = s_t + j * kBlockQ;
      std::fill(column, column + r_begin, masked);
      std::fill(column + r_end, column + num_rows, masked);
    }
  }

 private:
  // Turns the block's logits into probabilities relative to the updated running max and
  // updates the running max and sum; alpha[r] rescales what the row accumulated before.
  static void online_softmax(Index num_keys, int row_vectors, T* s_t, T* row_max, T* row_sum,
                             T* alpha) {
    constexpr int L = kLanes<T>;
    const T negative_infinity = -std::numeric_limits<T>::infinity();
    for (int c = 0; c < row_vectors; ++c) {
      T* column = s_t + c * L;
      const Vec<T> block_max = column_max(column, num_keys, kBlockQ);
      const Vec<T> old_max = load(row_max + c * L);
      const Vec<T> new_max = vector_max(old_max, block_max);
      // A row that has seen only masked keys keeps max -inf; subtracting 0 keeps exp2 at 0.
      const Vec<T> safe_max = new_max == negative_infinity ? Vec<T>{} : new_max;
      const Vec<T> rescale = exp2_nonpositive(old_max - safe_max);
      Vec<T> block_sum{};
      for (Index j = 0; j < num_keys; ++j) {
        const Vec<T> p = exp2_nonpositive(load(column + j * kBlockQ) - safe_max);
        store(column + j * kBlockQ, p);
        block_sum += p;
      }
      store(row_max + c * L, new_max);
      store(row_sum + c * L, load(row_sum + c * L) * rescale + block_sum);
      store(alpha + c * L, rescale);
    }
  }

  // out = acc / row_sum (0 for rows that saw no key); lse = ln 2 * (max + log2 sum). A NaN
  // sum (a NaN in q or in a seen key) gives NaN out and lse: NaN in, NaN out.
  // A tile with a state writes its rows there, in T, instead of to out.
  void write_rows(const Tile<S>& tile, Index num_rows, const Index* query_index, const Index* head,
                  const T* row_max, const T* row_sum, const T* acc) const {
    const Index batch = tile.batch;
    const auto& lse = tile.lse;
    for (Index r = 0; r < num_rows; ++r) {
      const bool saw_keys = !(row_sum[r] <= T(0));  // NaN counts as seen
      const T inverse = saw_keys ? T(1) / row_sum[r] : T(0);
      const T* acc_row = acc + r * acc_stride_;
      if (tile.state.data() != nullptr) {
        T* state_row = tile.state.address(batch, head[r], query_index[r], 0);
        for (Index d = 0; d < dim_v_; ++d) state_row[d] = acc_row[d] * inverse;
      } else {
        S* out_row = tile.out.address(batch, head[r], query_index[r], 0);
        for (Index d = 0; d < dim_v_; ++d) out_row[d] = from_compute<S>(acc_row[d] * inverse);
      }
      if (lse.data() != nullptr) {
        lse(batch, head[r], query_index[r]) =
            saw_keys ? static_cast<T>(kLn2 * (static_cast<double>(row_max[r]) +
                                              std::log2(static_cast<double>(row_sum[r]))))
                     : -std::numeric_limits<T>::infinity();
      }
    }
  }

  // bfloat16 storage: the tiles of many rows may multiply on AMX (amx_tiles.hpp).
  static constexpr bool kAmxCapable = std::is_same_v<S, bfloat16> && std::is_same_v<KV, bfloat16>;
#if FOVEAL_AMX_TILES
  // Keys of a head in packed_values_: Lk rounded up to a whole step, plus one step.
  Index packed_keys() const {
    return (params_.k.size(2) + amx::kStepValues - 1) / amx::kStepValues * amx::kStepValues +
           amx::kStepValues;
  }
#endif

  const FlashParams<S, KV>& params_;
  Index group_;
  Index dim_;
  Index dim_v_;
  Index acc_stride_;
  T q_multiplier_ = 1;
  T cap_multiplier_ = 0;
  bool use_amx_ = false;
  const std::uint16_t* packed_values_ = nullptr;  // pack_values_once's, or null
};

// Per-thread scratch of TileRunner::run for tiles of queries of dimension D and values of
// dimension Dv, allocated once per call; each part is a whole number of 64-byte lines. With
// `convert_kv` (16-bit storage) it holds a converted key block too.
template <typename T>
class TileWorkspace {
 public:
  TileWorkspace(Index dim, Index dim_v, int num_threads, bool convert_kv = false,
                Index amx_bytes = 0)
      : acc_stride_(whole_vectors<T>(dim_v)),
        q_t_size_(round_up(std::max(dim * kBlockQ, kFewRows<T> * whole_vectors<T>(dim)))),
        s_t_size_(round_up(kBlockK * kBlockQ)),
        acc_size_(round_up(kBlockQ * acc_stride_)),
        kv_size_(convert_kv ? round_up(kBlockK * (whole_vectors<T>(dim) + acc_stride_)) : 0),
        amx_size_(round_up((amx_bytes + static_cast<Index>(sizeof(T)) - 1) /
                           static_cast<Index>(sizeof(T)))),
        memory_(allocate_aligned<T>(
            static_cast<std::size_t>(per_thread() * std::max(num_threads, 1)))) {}

  // The scratch of the calling thread inside a parallel_for body.
  TileScratch<T> for_this_thread() const {
    T* base = memory_.get() + per_thread() * thread_index();
    T* kv = base + q_t_size_ + s_t_size_ + acc_size_;
    T* amx = kv + kv_size_;
    return {base, base + q_t_size_, base + q_t_size_ + s_t_size_, kv_size_ > 0 ? kv : nullptr,
            amx_size_ > 0 ? amx : nullptr};
  }

 private:
  static Index round_up(Index count) {
    constexpr Index line = static_cast<Index>(kTensorAlignment / sizeof(T));
    return (count + line - 1) / line * line;
  }
  Index per_thread() const { return q_t_size_ + s_t_size_ + acc_size_ + kv_size_ + amx_size_; }

  Index acc_stride_;
  Index q_t_size_;
  Index s_t_size_;
  Index acc_size_;
  Index kv_size_;
  Index amx_size_;
  AlignedArray<T> memory_;
};

// The multiply-adds of `rows` query rows that each visit at most `keys` keys: rows × keys ×
// (D + Dv), saturated at the largest Index (a bound for detail::team_size, never a size).
// An amount of work computed in double, as an Index saturated at half the largest (a bound for
// detail::team_size, never a size).
inline Index saturated_work(double work) {
  constexpr auto kLargest = static_cast<double>(std::numeric_limits<Index>::max() / 2);
  return work < kLargest ? static_cast<Index>(work) : static_cast<Index>(kLargest);
}

template <typename S, typename KV>
Index attention_work(const FlashParams<S, KV>& params, Index rows, Index keys) {
  return saturated_work(static_cast<double>(rows) * static_cast<double>(keys) *
                        static_cast<double>(params.q.size(3) + params.dim_v()));
}

// The work of a call whose every query row may see every key of params.k: an upper bound.
template <typename S>
Index dense_work(const FlashParams<S>& params) {
  return attention_work(params, params.query_rows(), params.k.size(2));
}

// The engine's driver: runs tasks [0, num_tasks) on at most params.num_threads threads (never
// more than there are tasks, one for less than detail::min_work_per_thread() of `work`, the
// call's multiply-adds or an upper bound of them), with engine scratch and a copy of
// `policy_scratch` for each thread, allocated once. plan(task, PolicyScratch&) returns the task's
// PlannedTile; a policy may keep what it builds in the scratch it is given, which is its thread's
// alone while the task runs. Which thread runs a task never changes what the task computes.
// `values_once`: the tasks visit every head's keys in contiguous blocks (dense and band calls),
// so bfloat16 tiles on AMX may interleave all of V once up front (TileRunner::pack_values_once).
// (Not for gathered keys or caches, whose calls read a part of V.)
template <typename S, typename KV, typename Plan, typename PolicyScratch = NoPolicyScratch>
void run_engine(const FlashParams<S, KV>& params, Index num_tasks, Index work, Plan&& plan,
                const PolicyScratch& policy_scratch = {}, bool values_once = false) {
  using T = compute_type_t<S>;
  if (num_tasks <= 0) return;
  const int num_threads = team_size(num_tasks, params.num_threads, work);
  TileRunner<S, KV> runner(params, whole_vectors<T>(params.dim_v()));
  const TileWorkspace<T> workspace(params.q.size(3), params.dim_v(), num_threads,
                                   !std::is_same_v<KV, T>, runner.amx_scratch_bytes());
  AlignedArray<std::uint16_t> packed_values;
  if (const Index count = values_once ? runner.values_once_count() : 0; count > 0) {
    packed_values = allocate_aligned<std::uint16_t>(static_cast<std::size_t>(count),
                                                    "interleaved bfloat16 values");
    runner.pack_values_once(packed_values.get(), num_threads);
  }
  std::vector<PolicyScratch> scratch(static_cast<std::size_t>(num_threads), policy_scratch);
  parallel_for(num_tasks, num_threads, [&](Index task) {
    const auto planned = plan(task, scratch[static_cast<std::size_t>(thread_index())]);
    runner.run(planned.policy, planned.tile, workspace.for_this_thread());
  });
}

// Runs the engine over every tile of every (batch, kv head) with one policy.
template <typename T, typename Policy>
void run_flash_attention(const FlashParams<T>& params, const Policy& policy) {
  const TileGrid grid(params.q.size(0), params.k.size(1), params.rows_per_head());
  run_engine(
      params, grid.num_tasks(), dense_work(params),
      [&](Index task, NoPolicyScratch&) {
        const TileGrid::Cell cell = grid.cell(task);
        return plan_tile(policy, tile_of(params, cell.outer, cell.kv_head, cell.flat_begin));
      },
      NoPolicyScratch{}, /*values_once=*/true);
}

// Runs the engine over every tile of a variable-length band call: the tiles of batch row b with
// its own keys and positions (params.sequences[b]).
template <typename T>
void run_sequence_band_attention(const FlashParams<T>& params) {
  const TileGrid grid(params.q.size(0), params.k.size(1), params.rows_per_head());
  run_engine(
      params, grid.num_tasks(), dense_work(params),
      [&](Index task, NoPolicyScratch&) {
        const TileGrid::Cell cell = grid.cell(task);
        const SequenceKeys& sequence = params.sequences[cell.outer];
        Tile<T> tile = tile_of(params, cell.outer, cell.kv_head, cell.flat_begin);
        tile.q_offset = sequence.q_offset;
        return plan_tile(BandPolicy(sequence.visibility, sequence.first_row), tile);
      },
      NoPolicyScratch{}, /*values_once=*/true);
}

}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP
