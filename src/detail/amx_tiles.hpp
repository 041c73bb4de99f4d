// src/detail/amx_tiles.hpp (private) — the bfloat16 tile products of the engine on CPUs with
// AMX (Advanced Matrix Extensions: AMX-TILE and AMX-BF16, e.g. Intel Sapphire Rapids).
//
// AMX multiplies 16 x 32 bfloat16 tiles into 16 x 16 float accumulators (TDPBF16PS: 8192
// multiply-adds per instruction, about 16 times what AVX-512 FMAs do in the same time). The
// engine uses it for the two products of a bfloat16 tile against a key block, keeping its own
// layouts (flash_engine.hpp):
//   scores  s_t[key][row] = K[key][:] . Q[row][:]   A = K rows read in place (any row stride;
//                                                    a gathered block's rows staged contiguous),
//                                                    B = the tile's queries in pair-interleaved
//                                                    ("VNNI") form, packed once per tile
//   output  acc[row][col] += sum_key P[row][key] V[key][col]
//                                                    A = the probabilities, rounded to bfloat16
//                                                    and transposed from s_t, B = the block's V
//                                                    rows pair-interleaved, C = the float32
//                                                    accumulators, loaded and stored back
// The online softmax runs here too (softmax_to_rows: the engine's, fused with the rounding and
// transposition of P); softcap, bias, masks and gates stay the engine's float code, on s_t (a
// gated block's probabilities are rounded after the gates: probabilities_to_rows). The products
// accumulate in float; rounding P to bfloat16 for the second product is what every bfloat16
// flash attention does (the output is rounded to bfloat16 anyway). Keys a row tile does not see
// (key_end) are skipped in both products.
//
// Only the AVX-512 level of a GCC build compiles this code (FOVEAL_AMX_TILES), each function
// with AMX among its target features, so no other code holds an AMX instruction; it runs only
// when the dispatcher chose the "avx512-amx" level (amx_tiles_enabled(): the CPU has AMX-BF16
// and the OS granted the tile state). Tiles are configured per task (configure / release), as
// the tile state belongs to the thread.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "detail/flash_plan.hpp"  // kBlockQ, kBlockK
#include "detail/isa.hpp"
#include "detail/simd.hpp"
#include "detail/softmax_math.hpp"
#include "foveal/core/tensor.hpp"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    defined(FOVEAL_LEVEL_VECTOR_BYTES) && FOVEAL_LEVEL_VECTOR_BYTES == 64
#define FOVEAL_AMX_TILES 1
#include <immintrin.h>
#else
#define FOVEAL_AMX_TILES 0
#endif

#if FOVEAL_AMX_TILES

// The tile helpers of one step are inlined into their loops, so that their 16 registers of
// pairs stay in registers (an out-of-line call passes them through memory).
#define FOVEAL_AMX_INLINE inline __attribute__((always_inline))

#define FOVEAL_AMX_TARGET                                                     \
  __attribute__((                                                             \
      target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512cd,avx512dq,avx512vl," \
             "avx512bf16,amx-tile,amx-bf16")))

FOVEAL_LEVEL_PUSH
namespace foveal::detail {
inline namespace FOVEAL_LEVEL {
namespace amx {

inline constexpr Index kTileRows = 16;    // rows of every tile
inline constexpr Index kStepValues = 32;  // bfloat16 values per tile row: one step of a product
inline constexpr Index kTileFloats = 16;  // floats per accumulator row

// The shapes the tiles serve: D a whole number of 32-value steps, Dv of 16-column tiles.
inline bool supports(Index dim, Index dim_v) {
  return dim > 0 && dim_v > 0 && dim % kStepValues == 0 && dim_v % kTileFloats == 0;
}

// Per-thread scratch of a tile of queries of dimension D and values of dimension Dv: the packed
// queries, a staged partial key tile, the transposed probabilities and the block's interleaved
// values, all bfloat16. (A per-thread cache of interleaved value blocks, so that every tile of a
// head would not pack the same blocks again, was tried: the B tiles then came from L2 instead of
// L1, and the time went from the packing to the products, unchanged.)
struct Scratch {
  std::uint16_t* q_vnni;   // [D / 2][kBlockQ][2]
  std::uint16_t* k_block;  // [kBlockK][D]: a gathered block's K rows, zero to a whole tile
  std::uint16_t* k_tail;   // [16][D]
  std::uint16_t* p_rows;   // [kBlockQ][kBlockK]
  std::uint16_t* v_vnni;   // [kBlockK / 2][Dv][2]

  static Index bytes(Index dim, Index dim_v) {
    return 2 *
           (dim * kBlockQ + kBlockK * dim + kTileRows * dim + kBlockQ * kBlockK + kBlockK * dim_v);
  }
  static Scratch at(void* memory, Index dim) {
    auto* base = static_cast<std::uint16_t*>(memory);
    Scratch scratch{};
    scratch.q_vnni = base;
    scratch.k_block = scratch.q_vnni + dim * kBlockQ;
    scratch.k_tail = scratch.k_block + kBlockK * dim;
    scratch.p_rows = scratch.k_tail + kTileRows * dim;
    scratch.v_vnni = scratch.p_rows + kBlockQ * kBlockK;
    return scratch;
  }
};

// Eight tiles of 16 rows x 64 bytes: 0-3 accumulators, 4-5 A operands, 6-7 B operands.
FOVEAL_AMX_TARGET inline void configure() {
  struct alignas(64) Config {
    std::uint8_t palette;
    std::uint8_t start_row;
    std::uint8_t reserved[14];
    std::uint16_t bytes_per_row[16];
    std::uint8_t rows[16];
  } config;
  std::memset(&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; ++t) {
    config.bytes_per_row[t] = 64;
    config.rows[t] = 16;
  }
  // GCC 12 sees the configuration's first byte alone as read by LDTILECFG and drops the other
  // stores: a compiler barrier keeps them.
  __asm__ __volatile__("" : : "r"(&config) : "memory");
  _tile_loadconfig(&config);
}

FOVEAL_AMX_TARGET inline void release() { _tile_release(); }

// Transposes a 16 x 16 matrix of 32-bit elements held one row per register. (The zero-masking
// forms with every lane selected: GCC 12's unmasked ones read an undefined register.)
FOVEAL_AMX_TARGET FOVEAL_AMX_INLINE void transpose_16x16(__m512i* rows) {
  constexpr __mmask16 kAll32 = 0xffff;
  constexpr __mmask8 kAll64 = 0xff;
  __m512i t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_maskz_unpacklo_epi32(kAll32, rows[2 * k], rows[2 * k + 1]);
    t[2 * k + 1] = _mm512_maskz_unpackhi_epi32(kAll32, rows[2 * k], rows[2 * k + 1]);
  }
  __m512i u[16];  // u[4k + m], 128-bit lane l: rows 4k .. 4k + 3 of column 4l + m
  for (int k = 0; k < 4; ++k) {
    u[4 * k] = _mm512_maskz_unpacklo_epi64(kAll64, t[4 * k], t[4 * k + 2]);
    u[4 * k + 1] = _mm512_maskz_unpackhi_epi64(kAll64, t[4 * k], t[4 * k + 2]);
    u[4 * k + 2] = _mm512_maskz_unpacklo_epi64(kAll64, t[4 * k + 1], t[4 * k + 3]);
    u[4 * k + 3] = _mm512_maskz_unpackhi_epi64(kAll64, t[4 * k + 1], t[4 * k + 3]);
  }
  for (int m = 0; m < 4; ++m) {
    const __m512i even_lo = _mm512_maskz_shuffle_i32x4(kAll32, u[m], u[4 + m], 0x88);
    const __m512i odd_lo = _mm512_maskz_shuffle_i32x4(kAll32, u[m], u[4 + m], 0xdd);
    const __m512i even_hi = _mm512_maskz_shuffle_i32x4(kAll32, u[8 + m], u[12 + m], 0x88);
    const __m512i odd_hi = _mm512_maskz_shuffle_i32x4(kAll32, u[8 + m], u[12 + m], 0xdd);
    rows[m] = _mm512_maskz_shuffle_i32x4(kAll32, even_lo, even_hi, 0x88);
    rows[8 + m] = _mm512_maskz_shuffle_i32x4(kAll32, even_lo, even_hi, 0xdd);
    rows[4 + m] = _mm512_maskz_shuffle_i32x4(kAll32, odd_lo, odd_hi, 0x88);
    rows[12 + m] = _mm512_maskz_shuffle_i32x4(kAll32, odd_lo, odd_hi, 0xdd);
  }
}

// q_vnni[d / 2][r][d % 2] = q_rows[r][d] for r < num_rows, 0 for the other rows of the tile.
// q_rows[r] points at query row r (bfloat16 bits, D values): 16 rows by 16 pairs at a time,
// transposed as 32-bit pairs.
FOVEAL_AMX_TARGET inline void pack_queries(const std::uint16_t* const* q_rows, Index num_rows,
                                           Index dim, std::uint16_t* q_vnni) {
  auto* pairs = reinterpret_cast<std::uint32_t*>(q_vnni);  // [D / 2][kBlockQ]
  const __m512i zero = _mm512_setzero_si512();
  for (Index r0 = 0; r0 < kBlockQ; r0 += kTileRows) {
    for (Index i0 = 0; i0 < dim / 2; i0 += 16) {
      __m512i block[16];  // block[r][i] = pair i0 + i of row r0 + r
      for (int r = 0; r < 16; ++r)
        block[r] = r0 + r < num_rows ? _mm512_loadu_si512(q_rows[r0 + r] + 2 * i0) : zero;
      transpose_16x16(block);  // block[i][r]
      for (int i = 0; i < 16; ++i) _mm512_storeu_si512(pairs + (i0 + i) * kBlockQ + r0, block[i]);
    }
  }
}

// Accumulators (NK key tiles) x (NR row tiles) of s_t at keys j0, rows r0: tile 0 = (key tile 0,
// row tile 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1).
template <int NK, int NR>
FOVEAL_AMX_TARGET inline void score_tiles(const std::uint16_t* k, Index k_stride,
                                          const std::uint16_t* q_vnni, Index dim, float* s_t) {
  const Index k_bytes = k_stride * 2;
  constexpr Index kQBytes = kBlockQ * 4;  // a row of pairs
  _tile_zero(0);
  if constexpr (NR > 1) _tile_zero(1);
  if constexpr (NK > 1) _tile_zero(2);
  if constexpr (NK > 1 && NR > 1) _tile_zero(3);
  for (Index d = 0; d < dim; d += kStepValues) {
    const std::uint16_t* q_step = q_vnni + d * kBlockQ;  // pair row d / 2
    _tile_loadd(4, k + d, k_bytes);
    _tile_loadd(6, q_step, kQBytes);
    if constexpr (NR > 1) _tile_loadd(7, q_step + 2 * kTileRows, kQBytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NR > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NK > 1) {
      _tile_loadd(5, k + kTileRows * k_stride + d, k_bytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NR > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  constexpr Index kSBytes = kBlockQ * 4;
  _tile_stored(0, s_t, kSBytes);
  if constexpr (NR > 1) _tile_stored(1, s_t + kTileFloats, kSBytes);
  if constexpr (NK > 1) _tile_stored(2, s_t + kTileRows * kBlockQ, kSBytes);
  if constexpr (NK > 1 && NR > 1) _tile_stored(3, s_t + kTileRows * kBlockQ + kTileFloats, kSBytes);
}

// s_t[j][r] = multiplier * sum_d k[j][d] q[r][d] for j < num_keys rounded up to 16 (the rows
// past num_keys score the zero keys of k_tail) and r < 16 * row_tiles, except where row tile c
// sees no key: the 32-key pieces from key_end[c] on (and key_end[c + 1] for the pair of row
// tiles computed together) are left as they were. Key j's row is k + j * k_stride for the whole
// tiles; a partial last tile is read from k_tail ([16][D], zero past the block), which the
// caller stages.
FOVEAL_AMX_TARGET inline void scores(const std::uint16_t* k, Index k_stride, Index num_keys,
                                     const std::uint16_t* k_tail, const std::uint16_t* q_vnni,
                                     Index dim, int row_tiles, const Index* key_end,
                                     float multiplier, float* s_t) {
  const Index whole = num_keys / kTileRows;
  const auto row_pass = [&](const std::uint16_t* keys, Index stride, Index j0, auto nk) {
    constexpr int NK = decltype(nk)::value;
    for (int c = 0; c < row_tiles; c += 2) {
      const Index end = c + 1 < row_tiles ? std::max(key_end[c], key_end[c + 1]) : key_end[c];
      if (j0 >= end) continue;
      const std::uint16_t* q = q_vnni + c * kTileRows * 2;
      float* s = s_t + j0 * kBlockQ + c * kTileFloats;
      if (c + 1 < row_tiles) {
        score_tiles<NK, 2>(keys, stride, q, dim, s);
      } else {
        score_tiles<NK, 1>(keys, stride, q, dim, s);
      }
    }
  };
  Index j0 = 0;
  for (; j0 + 2 * kTileRows <= whole * kTileRows; j0 += 2 * kTileRows)
    row_pass(k + j0 * k_stride, k_stride, j0, std::integral_constant<int, 2>{});
  if (j0 < whole * kTileRows) {
    row_pass(k + j0 * k_stride, k_stride, j0, std::integral_constant<int, 1>{});
    j0 += kTileRows;
  }
  if (j0 < num_keys) row_pass(k_tail, dim, j0, std::integral_constant<int, 1>{});
  if (multiplier == 1.0f) return;
  const Index keys = (num_keys + kTileRows - 1) / kTileRows * kTileRows;
  const __m512 scale = _mm512_set1_ps(multiplier);
  for (Index j = 0; j < keys; ++j)
    for (int c = 0; c < row_tiles; ++c) {
      float* slot = s_t + j * kBlockQ + c * kTileFloats;
      _mm512_storeu_ps(slot, _mm512_mul_ps(_mm512_loadu_ps(slot), scale));
    }
}

// The index that interleaves a converted pair of keys (lanes 0-15: key 2i's rows, lanes 16-31:
// key 2i + 1's) into one 32-bit (key 2i, key 2i + 1) pair per row.
FOVEAL_AMX_TARGET inline __m512i pair_interleave() {
  alignas(64) std::uint16_t interleave[32];
  for (int r = 0; r < 16; ++r) {
    interleave[2 * r] = static_cast<std::uint16_t>(r);
    interleave[2 * r + 1] = static_cast<std::uint16_t>(16 + r);
  }
  return _mm512_load_si512(interleave);
}

// out[r * kBlockK + i] = bfloat16(probability(j0 + i)[r]) (round to nearest even) for the 32 keys
// of one step from j0 and the 16 rows of a row tile; probability(j) is called once per key, in
// key order.
template <typename Probability>
FOVEAL_AMX_TARGET FOVEAL_AMX_INLINE void store_step_rows(Probability&& probability, Index j0,
                                                         __m512i index, std::uint16_t* out) {
  __m512i pairs[16];  // pairs[i][r] = (P[r][2i], P[r][2i + 1]) of this step's keys
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) {
    const Vec<float> first = probability(j0 + 2 * i);
    const Vec<float> second = probability(j0 + 2 * i + 1);
    const auto both = reinterpret_cast<__m512i>(
        _mm512_cvtne2ps_pbh(reinterpret_cast<__m512>(second), reinterpret_cast<__m512>(first)));
    pairs[i] = _mm512_permutexvar_epi16(index, both);
  }
  transpose_16x16(pairs);  // pairs[r][i]
  for (int r = 0; r < 16; ++r) _mm512_storeu_si512(out + r * kBlockK, pairs[r]);
}

// The engine's online softmax of one block (flash_engine.hpp), fused with the conversion of the
// probabilities for the tiles: for every row tile c and key j < key_end[c] (<= the block's key
// count; the tile's rows see no later key) the logit is multiplier * s_t[j][r]
// (multiplier > 0); row_max, row_sum and alpha are updated as online_softmax does, and
// p_rows[r][j] = bfloat16(p[j][r]) (round to nearest even) for j < 32 * steps, 0 from
// key_end[c] on. s_t is left as it was.
FOVEAL_AMX_TARGET inline void softmax_to_rows(const float* s_t, const Index* key_end, int row_tiles,
                                              Index steps, float multiplier, float* row_max,
                                              float* row_sum, float* alpha, std::uint16_t* p_rows) {
  const __m512i index = pair_interleave();
  const float negative_infinity = -std::numeric_limits<float>::infinity();
  for (int c = 0; c < row_tiles; ++c) {
    const float* column = s_t + c * kTileFloats;
    const Index num_keys = key_end[c];
    // The largest logit: multiplying by a positive number is monotone.
    const Vec<float> block_max = column_max(column, num_keys, kBlockQ) * multiplier;
    const Vec<float> old_max = load(row_max + c * kTileFloats);
    const Vec<float> new_max = vector_max(old_max, block_max);
    // A row that has seen only masked keys keeps max -inf; subtracting 0 keeps exp2 at 0.
    const Vec<float> safe_max = new_max == negative_infinity ? Vec<float>{} : new_max;
    const Vec<float> rescale = exp2_nonpositive(old_max - safe_max);
    Vec<float> block_sum{};
    const auto probability = [&](Index j) {
      const Vec<float> p = exp2_nonpositive<3>(load(column + j * kBlockQ) * multiplier - safe_max);
      block_sum += p;
      return p;
    };
    const auto tail_probability = [&](Index j) {
      return j < num_keys ? probability(j) : Vec<float>{};
    };
    std::uint16_t* out = p_rows + c * kTileRows * kBlockK;
    // Whole steps of seen keys, then the steps with keys past key_end[c] (zeros).
    const Index whole = std::min(steps, num_keys / kStepValues);
    for (Index step = 0; step < whole; ++step)
      store_step_rows(probability, step * kStepValues, index, out + step * kStepValues);
    for (Index step = whole; step < steps; ++step)
      store_step_rows(tail_probability, step * kStepValues, index, out + step * kStepValues);
    store(row_max + c * kTileFloats, new_max);
    store(row_sum + c * kTileFloats, load(row_sum + c * kTileFloats) * rescale + block_sum);
    store(alpha + c * kTileFloats, rescale);
  }
}

// p_rows[r][j] = bfloat16(s_t[j][r]) for the probabilities the engine's online softmax left in
// s_t (and the policy weighted), j < 32 * steps, 0 from key_end[c] on: the conversion half of
// softmax_to_rows.
FOVEAL_AMX_TARGET inline void probabilities_to_rows(const float* s_t, const Index* key_end,
                                                    int row_tiles, Index steps,
                                                    std::uint16_t* p_rows) {
  const __m512i index = pair_interleave();
  for (int c = 0; c < row_tiles; ++c) {
    const float* column = s_t + c * kTileFloats;
    const Index num_keys = key_end[c];
    const auto probability = [&](Index j) {
      return j < num_keys ? load(column + j * kBlockQ) : Vec<float>{};
    };
    std::uint16_t* out = p_rows + c * kTileRows * kBlockK;
    for (Index step = 0; step < steps; ++step)
      store_step_rows(probability, step * kStepValues, index, out + step * kStepValues);
  }
}

// v_vnni[i][c][t] = v[2i + t][c] for i < 16 * steps, c < Dv; 0 for keys >= num_keys. Key j's
// row is row(j) (bfloat16 bits).
template <typename Row>
FOVEAL_AMX_TARGET inline void pack_values(Row&& row, Index num_keys, Index steps, Index dim_v,
                                          std::uint16_t* v_vnni) {
  alignas(64) std::uint16_t low[32];
  alignas(64) std::uint16_t high[32];
  for (int c = 0; c < 16; ++c) {
    low[2 * c] = static_cast<std::uint16_t>(c);
    low[2 * c + 1] = static_cast<std::uint16_t>(32 + c);
    high[2 * c] = static_cast<std::uint16_t>(16 + c);
    high[2 * c + 1] = static_cast<std::uint16_t>(48 + c);
  }
  const __m512i low_index = _mm512_load_si512(low);
  const __m512i high_index = _mm512_load_si512(high);
  const __m512i zero = _mm512_setzero_si512();
  for (Index i = 0; i < kTileRows * steps; ++i) {
    const std::uint16_t* first = 2 * i < num_keys ? row(2 * i) : nullptr;
    const std::uint16_t* second = 2 * i + 1 < num_keys ? row(2 * i + 1) : nullptr;
    std::uint16_t* out = v_vnni + i * dim_v * 2;
    Index c0 = 0;
    for (; c0 + 32 <= dim_v; c0 += 32) {
      const __m512i a = first != nullptr ? _mm512_loadu_si512(first + c0) : zero;
      const __m512i b = second != nullptr ? _mm512_loadu_si512(second + c0) : zero;
      _mm512_storeu_si512(out + 2 * c0, _mm512_permutex2var_epi16(a, low_index, b));
      _mm512_storeu_si512(out + 2 * c0 + 32, _mm512_permutex2var_epi16(a, high_index, b));
    }
    if (c0 < dim_v) {  // 16 columns left
      const __mmask32 half = 0xffff;
      const __m512i a = first != nullptr ? _mm512_maskz_loadu_epi16(half, first + c0) : zero;
      const __m512i b = second != nullptr ? _mm512_maskz_loadu_epi16(half, second + c0) : zero;
      _mm512_storeu_si512(out + 2 * c0, _mm512_permutex2var_epi16(a, low_index, b));
    }
  }
}

// Accumulators (NR row tiles) x (NC column tiles) of acc at rows r0, columns c0, loaded and
// stored back: tile 0 = (row tile 0, column tile 0), 1 = (0, 1), 2 = (1, 0), 3 = (1, 1).
template <int NR, int NC>
FOVEAL_AMX_TARGET inline void accumulate_tiles(const std::uint16_t* p_rows,
                                               const std::uint16_t* v_vnni, Index steps,
                                               Index dim_v, float* acc, Index acc_stride) {
  constexpr Index kPBytes = kBlockK * 2;
  const Index v_bytes = dim_v * 4;  // a row of pairs
  const Index acc_bytes = acc_stride * 4;
  float* const acc_tiles[4] = {acc, acc + kTileFloats, acc + kTileRows * acc_stride,
                               acc + kTileRows * acc_stride + kTileFloats};
  _tile_loadd(0, acc_tiles[0], acc_bytes);
  if constexpr (NC > 1) _tile_loadd(1, acc_tiles[1], acc_bytes);
  if constexpr (NR > 1) _tile_loadd(2, acc_tiles[2], acc_bytes);
  if constexpr (NR > 1 && NC > 1) _tile_loadd(3, acc_tiles[3], acc_bytes);
  for (Index step = 0; step < steps; ++step) {
    const std::uint16_t* p = p_rows + step * kStepValues;
    const std::uint16_t* v = v_vnni + step * kTileRows * dim_v * 2;
    _tile_loadd(4, p, kPBytes);
    _tile_loadd(6, v, v_bytes);
    if constexpr (NC > 1) _tile_loadd(7, v + 2 * kTileFloats, v_bytes);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NC > 1) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NR > 1) {
      _tile_loadd(5, p + kTileRows * kBlockK, kPBytes);
      _tile_dpbf16ps(2, 5, 6);
      if constexpr (NC > 1) _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc_tiles[0], acc_bytes);
  if constexpr (NC > 1) _tile_stored(1, acc_tiles[1], acc_bytes);
  if constexpr (NR > 1) _tile_stored(2, acc_tiles[2], acc_bytes);
  if constexpr (NR > 1 && NC > 1) _tile_stored(3, acc_tiles[3], acc_bytes);
}

// acc[r][c] = acc[r][c] * alpha[r] + sum_j p_rows[r][j] v[j][c] for r < 16 * row_tiles,
// c < Dv (acc: row stride acc_stride), over the 32-key steps before key_end of the row tile (of
// the pair of row tiles computed together). The products accumulate onto the rescaled rows in
// float, 32 keys per rounding; rows whose alpha is 1 are not rescaled.
FOVEAL_AMX_TARGET inline void accumulate(const std::uint16_t* p_rows, const std::uint16_t* v_vnni,
                                         const Index* key_end, int row_tiles, Index dim_v,
                                         const float* alpha, float* acc, Index acc_stride) {
  for (Index r = 0; r < row_tiles * kTileRows; ++r) {
    if (alpha[r] == 1.0f) continue;
    const __m512 rescale = _mm512_set1_ps(alpha[r]);
    float* row = acc + r * acc_stride;
    for (Index c = 0; c < dim_v; c += kTileFloats)
      _mm512_storeu_ps(row + c, _mm512_mul_ps(_mm512_loadu_ps(row + c), rescale));
  }
  const Index col_tiles = dim_v / kTileFloats;
  for (int r = 0; r < row_tiles; r += 2) {
    const std::uint16_t* p = p_rows + r * kTileRows * kBlockK;
    const bool two_rows = r + 1 < row_tiles;
    const Index end = two_rows ? std::max(key_end[r], key_end[r + 1]) : key_end[r];
    const Index steps = (end + kStepValues - 1) / kStepValues;
    if (steps == 0) continue;
    for (Index c = 0; c < col_tiles; c += 2) {
      const std::uint16_t* v = v_vnni + c * kTileFloats * 2;
      float* a = acc + r * kTileRows * acc_stride + c * kTileFloats;
      const bool two_cols = c + 1 < col_tiles;
      if (two_rows && two_cols) {
        accumulate_tiles<2, 2>(p, v, steps, dim_v, a, acc_stride);
      } else if (two_rows) {
        accumulate_tiles<2, 1>(p, v, steps, dim_v, a, acc_stride);
      } else if (two_cols) {
        accumulate_tiles<1, 2>(p, v, steps, dim_v, a, acc_stride);
      } else {
        accumulate_tiles<1, 1>(p, v, steps, dim_v, a, acc_stride);
      }
    }
  }
}

}  // namespace amx
}  // namespace FOVEAL_LEVEL
}  // namespace foveal::detail
FOVEAL_LEVEL_POP

#endif  // FOVEAL_AMX_TILES
