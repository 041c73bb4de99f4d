// Shared pieces of the libFuzzer harnesses (tests/fuzz/cpp, docs/testing.md).
//
// Views are drawn over small heap buffers (exactly sized, so AddressSanitizer sees any read or
// write past them). A drawn view is either
//   - valid: every element it can reach lies inside its buffer (the library may read it), or
//   - invalid: a negative extent, or an element count or stride span that no 64-bit byte
//     offset can address. The library must reject it (foveal::Error) before touching memory.
// A view that is representable but reaches outside its buffer would break the caller's side of
// the contract (the library cannot know a buffer's size), so it is never drawn: the harness
// gives the input up instead (Outcome::skip).
#pragma once

#include <fuzzer/FuzzedDataProvider.h>

#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <memory>
#include <new>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "foveal/foveal.hpp"

namespace foveal_fuzz {

using foveal::Index;

// Elements per buffer: small, so that kernels stay fast under the sanitizers.
inline constexpr Index kBufferElements = 512;
// Elements per non-empty view (zero strides reach many with few buffer elements).
inline constexpr Index kMaxElements = Index{1} << 14;

// A value from a palette of awkward numbers, or a small ordinary one.
template <typename T>
T draw_value(FuzzedDataProvider& data) {
  const auto pick = data.ConsumeIntegral<std::uint8_t>();
  switch (pick % 16) {
    case 0:
      return std::numeric_limits<T>::quiet_NaN();
    case 1:
      return std::numeric_limits<T>::infinity();
    case 2:
      return -std::numeric_limits<T>::infinity();
    case 3:
      return std::numeric_limits<T>::max();
    case 4:
      return std::numeric_limits<T>::denorm_min();
    case 5:
      return 0;
    default:
      return static_cast<T>(static_cast<int>(pick) - 128) / 16;
  }
}

// `count` buffers of kBufferElements elements of T (any type foveal stores: a 16-bit one
// holds the float values rounded), filled from the fuzz data.
template <typename T>
struct Arena {
  std::vector<std::vector<T>> buffers;
  Arena(FuzzedDataProvider& data, int count) : buffers(static_cast<std::size_t>(count)) {
    using C = foveal::compute_type_t<T>;
    const bool special = data.ConsumeBool();
    for (auto& buffer : buffers) {
      buffer.resize(static_cast<std::size_t>(kBufferElements));
      for (Index i = 0; i < kBufferElements; ++i)
        buffer[static_cast<std::size_t>(i)] = foveal::to_storage<T>(
            special && i < 8 ? draw_value<C>(data) : static_cast<C>((i * 37 % 17) - 8) / 8);
    }
  }
};

// a * b, saturated at the largest Index (shapes derived from drawn extents stay drawable).
inline Index saturated_product(Index a, Index b) {
  Index product = 0;
  if (__builtin_mul_overflow(a, b, &product))
    return (a < 0) != (b < 0) ? std::numeric_limits<Index>::min()
                              : std::numeric_limits<Index>::max();
  return product;
}

// A signed extent: mostly 0..5; sometimes negative or huge.
inline Index draw_extent(FuzzedDataProvider& data, Index small_max = 5) {
  const auto pick = data.ConsumeIntegral<std::uint8_t>();
  if (pick < 236) return pick % (small_max + 1);
  constexpr Index kSpecial[] = {-1,
                                -2,
                                Index{1} << 31,
                                Index{1} << 40,
                                Index{1} << 62,
                                std::numeric_limits<Index>::max(),
                                std::numeric_limits<Index>::min(),
                                (Index{1} << 61) + 1};
  return kSpecial[pick % 8];
}

enum class Validity { valid, invalid, unusable };

template <typename T, int Rank>
struct DrawnView {
  foveal::TensorView<T, Rank> view;
  Validity validity = Validity::valid;
};

// Whether the library must reject a view of this shape and these strides (see the top).
template <int Rank>
bool must_reject(const std::array<Index, Rank>& shape, const std::array<Index, Rank>& strides,
                 std::size_t element_size) {
  __int128 count = 1, span = 0;
  bool overflow = false;
  for (int d = 0; d < Rank; ++d) {
    if (shape[d] < 0) return true;
  }
  for (int d = 0; d < Rank; ++d) {
    if (!overflow) count *= shape[d];
    if (count > std::numeric_limits<Index>::max()) overflow = true;
    if (shape[d] > 1) {
      const __int128 stride = strides[d] < 0 ? -static_cast<__int128>(strides[d]) : strides[d];
      if (!overflow) span += (static_cast<__int128>(shape[d]) - 1) * stride;
      if (span > std::numeric_limits<Index>::max()) overflow = true;
    }
  }
  return overflow || span > std::numeric_limits<Index>::max() / static_cast<__int128>(element_size);
}

// A view over one of the arena's buffers with the given logical shape (perturbed now and then)
// and drawn strides. `writable_output`: the view is written by the library, so it is never
// drawn overlapping itself (stride 0 or interleaved rows: a known finding, see
// tests/fuzz/cases.py KNOWN "overlapping_out").
template <typename T, typename Elem, int Rank>
DrawnView<T, Rank> draw_view(FuzzedDataProvider& data, Arena<Elem>& arena,
                             std::array<Index, Rank> shape, bool writable_output = false) {
  DrawnView<T, Rank> drawn;
  if (data.ConsumeIntegralInRange<int>(0, 15) == 0)
    shape[static_cast<std::size_t>(data.ConsumeIntegralInRange<int>(0, Rank - 1))] =
        draw_extent(data);
  std::array<Index, Rank> strides{};
  const int mode = data.ConsumeIntegralInRange<int>(0, writable_output ? 3 : 5);
  Index running = 1;
  for (int d = Rank - 1; d >= 0; --d) {
    const Index extent = shape[static_cast<std::size_t>(d)] > 0 ? shape[d] : 1;
    switch (mode) {
      case 0:  // row-major contiguous
      case 1:
        strides[d] = running;
        break;
      case 2:  // row-major with gaps
        strides[d] = running * (d == Rank - 1 ? 1 : 2);
        break;
      case 3:  // reversed axis order (column-major)
        strides[Rank - 1 - d] = 0;
        break;
      case 4:  // arbitrary small strides of any sign (may overlap)
        strides[d] = data.ConsumeIntegralInRange<Index>(-9, 9);
        break;
      default:  // all zero but one huge stride now and then
        strides[d] = data.ConsumeIntegralInRange<int>(0, 7) == 0 ? draw_extent(data) : 0;
    }
    if (mode != 4 && mode != 5 && extent < (Index{1} << 20) && running < (Index{1} << 40)) {
      running *= extent;
      if (mode == 2) running *= 2;
    }
  }
  if (mode == 3) {
    Index step = 1;
    for (int d = 0; d < Rank; ++d) {
      strides[d] = step;
      const Index extent = shape[static_cast<std::size_t>(d)] > 0 ? shape[d] : 1;
      if (extent < (Index{1} << 20) && step < (Index{1} << 40)) step *= extent;
    }
  }
  if (data.ConsumeIntegralInRange<int>(0, 5) == 0 &&
      strides[0] != std::numeric_limits<Index>::min())
    strides[0] = -strides[0];
  auto& buffer = arena.buffers[static_cast<std::size_t>(
      data.ConsumeIntegralInRange<int>(0, static_cast<int>(arena.buffers.size()) - 1))];
  if (must_reject<Rank>(shape, strides, sizeof(T))) {
    drawn.view = foveal::TensorView<T, Rank>(buffer.data(), shape, strides);
    drawn.validity = Validity::invalid;
    return drawn;
  }
  // The lowest and highest element offsets the view reaches (no overflow: checked above).
  Index lowest = 0, highest = 0, count = 1;
  for (int d = 0; d < Rank; ++d) {
    count *= shape[d];
    if (shape[d] == 0) continue;
    const Index reach = (shape[d] - 1) * strides[d];
    (reach < 0 ? lowest : highest) += reach;
  }
  if (count == 0) {  // nothing is read: any base in the buffer
    drawn.view = foveal::TensorView<T, Rank>(buffer.data(), shape, strides);
    return drawn;
  }
  // Unusable: reaching outside the buffer (the caller's contract), or so many elements (zero
  // strides) that reading them is legitimately slow. Empty views of huge extents stay: no
  // work may depend on their extents.
  if (highest - lowest >= kBufferElements || count > kMaxElements) {
    drawn.validity = Validity::unusable;
    return drawn;
  }
  const Index base =
      -lowest + data.ConsumeIntegralInRange<Index>(0, kBufferElements - 1 - (highest - lowest));
  drawn.view = foveal::TensorView<T, Rank>(buffer.data() + base, shape, strides);
  return drawn;
}

// The flat element `flat` (row-major order) of `view`.
template <typename T, int Rank>
T& element(const foveal::TensorView<T, Rank>& view, Index flat) {
  Index offset = 0;
  for (int d = Rank - 1; d >= 0; --d) {
    offset += (flat % view.size(d)) * view.stride(d);
    flat /= view.size(d);
  }
  return view.data()[offset];
}

// x in double (a 16-bit storage type widened exactly).
template <typename T>
double widen(T x) {
  if constexpr (foveal::is_half_dtype_v<T>) {
    return foveal::to_float(x);
  } else {
    return static_cast<double>(x);
  }
}

// The outcome of one fuzz input, summed over every view it drew.
struct Expect {
  bool invalid = false;
  bool unusable = false;
  template <typename V>
  void add(const V& drawn) {
    invalid |= drawn.validity == Validity::invalid;
    unusable |= drawn.validity == Validity::unusable;
  }
};

// Runs `call`: foveal::Error and std::bad_alloc are accepted answers; an invalid view that is
// not rejected is a finding (abort with a message). Anything else thrown escapes to libFuzzer,
// which reports it as a crash.
template <typename Call>
void run_call(const Expect& expect, const char* what, Call&& call) {
  bool rejected = false;
  try {
    call();
  } catch (const foveal::Error&) {
    rejected = true;
  } catch (const std::bad_alloc&) {
    rejected = true;
  }
  if (expect.invalid && !rejected) {
    std::fprintf(stderr, "foveal fuzz: %s accepted a view it must reject\n", what);
    std::abort();
  }
}

// The message of the last rejection answer_of saw, for the report of a finding.
inline std::string last_error;

[[noreturn]] inline void finding(const char* what, const char* message) {
  std::fprintf(stderr, "foveal fuzz: %s: %s (the last rejection: %s)\n", what, message,
               last_error.c_str());
  std::abort();
}

enum class Answer { accepted, rejected, out_of_memory };

// run_call (an invalid view accepted aborts), and what the call answered.
template <typename Call>
Answer answer_of(const Expect& expect, const char* what, Call&& call) {
  Answer answer = Answer::accepted;
  run_call(expect, what, [&] {
    try {
      call();
    } catch (const foveal::Error& error) {
      answer = Answer::rejected;
      last_error = error.what();
      throw;
    } catch (const std::bad_alloc& error) {
      answer = Answer::out_of_memory;
      last_error = error.what();
      throw;
    }
  });
  return answer;
}

// A cost bound: the harnesses skip inputs whose valid views would make the kernels run long
// (a legitimately large problem is not a finding). A zero factor means no work at all.
template <typename... Factors>
bool too_costly(Factors... factors) {
  double cost = 1;
  for (double factor : {static_cast<double>(factors)...}) cost *= factor;  // 0: no work
  return cost > 2e6;
}

inline double draw_option(FuzzedDataProvider& data) {
  constexpr double kValues[] = {0.0,
                                0.125,
                                1.0,
                                30.0,
                                -1.0,
                                std::numeric_limits<double>::quiet_NaN(),
                                std::numeric_limits<double>::infinity(),
                                -std::numeric_limits<double>::infinity(),
                                1e-300,
                                1e300,
                                std::numeric_limits<double>::denorm_min(),
                                0.5};
  return kValues[data.ConsumeIntegralInRange<int>(0, 11)];
}

// An index-like option: mostly small, sometimes negative or huge.
inline Index draw_index_option(FuzzedDataProvider& data) {
  const auto pick = data.ConsumeIntegral<std::uint8_t>();
  if (pick < 200) return static_cast<Index>(pick % 12) - 1;
  return draw_extent(data);
}

// Thread counts: 0 (the global setting), 1 or 2, now and then negative or huge (rejected).
inline int draw_threads(FuzzedDataProvider& data) {
  constexpr int kOdd[] = {-1, 1025, std::numeric_limits<int>::max()};
  const int pick = data.ConsumeIntegralInRange<int>(0, 15);
  return pick < 13 ? pick % 3 : kOdd[pick - 13];
}

// The extents of one attention call: q [B, Hkv * G, Lq, D], k [B, Hkv, Lk, D], v [B, Hkv, Lk,
// Dv].
struct AttentionDims {
  Index batch, heads_kv, group, len_q, len_k, dim, dim_v, heads_q;
};

inline AttentionDims draw_attention_dims(FuzzedDataProvider& data) {
  AttentionDims dims{};
  dims.batch = draw_extent(data, 2);
  dims.heads_kv = draw_extent(data, 2);
  dims.group = draw_extent(data, 3);
  dims.len_q = draw_extent(data, 6);
  dims.len_k = draw_extent(data, 8);
  dims.dim = draw_extent(data, 8);
  dims.dim_v = draw_extent(data, 8);
  dims.heads_q = saturated_product(dims.heads_kv, dims.group);
  return dims;
}

// Maybe (when not `sliding`, on a coin) a bias [B or 1, Hq or 1, Lq, Lk]; else absent.
template <typename T>
DrawnView<const T, 4> draw_bias(FuzzedDataProvider& data, Arena<T>& arena,
                                const AttentionDims& dims, bool sliding, Expect& expect) {
  DrawnView<const T, 4> bias;
  if (!sliding && data.ConsumeBool()) {
    bias =
        draw_view<const T, T, 4>(data, arena,
                                 {data.ConsumeBool() ? dims.batch : 1,
                                  data.ConsumeBool() ? dims.heads_q : 1, dims.len_q, dims.len_k});
    expect.add(bias);
  }
  return bias;
}

// Whether to give up an attention input: a view reaches outside its buffer, or the valid call
// would run long.
inline bool give_up(const Expect& expect, const AttentionDims& dims) {
  return expect.unusable ||
         (!expect.invalid && too_costly(dims.batch, dims.heads_q, dims.len_q, dims.len_k,
                                        double(dims.dim) + double(dims.dim_v) + 1));
}

// Options of an attention call; q_offset any value (`any_q_offset`), else -1 or (rejected by
// the cache calls) 3.
inline foveal::AttentionOptions draw_attention_options(FuzzedDataProvider& data,
                                                       bool any_q_offset) {
  foveal::AttentionOptions options;
  options.scale = data.ConsumeBool() ? 0.0 : draw_option(data);
  options.causal = data.ConsumeBool();
  options.window_left = draw_index_option(data);
  options.window_right = draw_index_option(data);
  options.sink_tokens = draw_index_option(data);
  options.softcap = data.ConsumeBool() ? 0.0 : draw_option(data);
  if (any_q_offset)
    options.q_offset = data.ConsumeBool() ? -1 : draw_index_option(data);
  else
    options.q_offset = data.ConsumeIntegralInRange<int>(0, 7) == 0 ? 3 : -1;
  options.num_threads = draw_threads(data);
  return options;
}

// Key ranges of a variable-length call (AttentionOptions::key_start / key_length), owned, or
// none: one in three calls draws each of start and length, about B entries (now and then one
// more or one fewer) of values mostly in [0, Lk], sometimes just outside or extreme.
struct DrawnKeyRanges {
  std::vector<std::int64_t> start, length;
  bool has_start = false, has_length = false;

  void draw(FuzzedDataProvider& data, Index batch, Index len_k) {
    const auto values = [&](std::vector<std::int64_t>& into) {
      Index count = std::min<Index>(batch, 64);
      const int change = data.ConsumeIntegralInRange<int>(0, 15);
      if (change == 0) count += 1;
      if (change == 1 && count > 0) count -= 1;
      for (Index b = 0; b < count; ++b) {
        const int pick = data.ConsumeIntegralInRange<int>(0, 15);
        const Index bound = std::clamp<Index>(len_k, 0, Index{1} << 20);  // extents may be < 0
        into.push_back(pick < 13   ? data.ConsumeIntegralInRange<Index>(0, bound)
                       : pick < 15 ? draw_index_option(data)
                                   : (pick % 2 ? std::numeric_limits<Index>::max() : -2));
      }
    };
    has_start = data.ConsumeIntegralInRange<int>(0, 2) == 0;
    if (has_start) values(start);
    has_length = data.ConsumeIntegralInRange<int>(0, 2) == 0;
    if (has_length) values(length);
  }

  // `options` with views of the drawn ranges (null where none was drawn).
  void apply(foveal::AttentionOptions& options) const {
    static const std::int64_t kNone = 0;
    const auto view = [](bool given, const std::vector<std::int64_t>& values) {
      if (!given) return foveal::TensorView<const std::int64_t, 1>();
      return foveal::TensorView<const std::int64_t, 1>(values.empty() ? &kNone : values.data(),
                                                       {static_cast<Index>(values.size())});
    };
    options.key_start = view(has_start, start);
    options.key_length = view(has_length, length);
  }
};

// The arguments of a KVCache append: k [B, Hkv, n, D], v [B, Hkv, n, Dv] and, when ragged,
// counts (about B of them, any values). `expect.unusable`: no counts were drawn; give it up.
template <typename T>
struct DrawnAppend {
  DrawnView<const T, 4> k, v;
  std::vector<Index> counts;
  bool ragged = false;
  Expect expect;
};

template <typename T>
DrawnAppend<T> draw_append(FuzzedDataProvider& data, Arena<T>& arena, Index batch, Index heads_kv,
                           Index dim, Index dim_v) {
  DrawnAppend<T> drawn;
  const Index n = draw_extent(data, 4);
  drawn.k = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, n, dim});
  drawn.v = draw_view<const T, T, 4>(data, arena, {batch, heads_kv, n, dim_v});
  drawn.expect.add(drawn.k);
  drawn.expect.add(drawn.v);
  if (drawn.expect.unusable) return drawn;
  drawn.ragged = data.ConsumeBool();
  for (Index i = 0; drawn.ragged && i < batch + data.ConsumeIntegralInRange<int>(-1, 1); ++i)
    drawn.counts.push_back(draw_index_option(data));
  return drawn;
}

// A KVCache of the drawn sizes {B, Hkv, capacity, D, Dv} and options, or null (give the input
// up). Owned (`owned`): sizes above `owned_max` are not drawn (huge ones are known findings:
// size overflow in Tensor allocation, OOM on huge KVCache) and a rejected construction gives
// the input up. Otherwise over writable keys and values drawn in `arena`, with drawn lengths
// (up to 2**63 - 1: an append must not overflow the position counter); more than `wrapped_max`
// sequences or heads allocate in proportion (the known finding "OOM on huge KVCache"): not
// drawn. A view the cache must reject and accepts aborts (run_call).
template <typename T>
std::unique_ptr<foveal::KVCache<T>> draw_kv_cache(FuzzedDataProvider& data, Arena<T>& arena,
                                                  bool owned, const std::array<Index, 5>& sizes,
                                                  const foveal::KVCacheOptions& options,
                                                  Index owned_max, Index wrapped_max) {
  const auto [batch, heads_kv, capacity, dim, dim_v] = sizes;
  std::unique_ptr<foveal::KVCache<T>> cache;
  if (owned) {
    for (Index size : sizes)
      if (size > owned_max) return nullptr;
    try {
      cache = std::make_unique<foveal::KVCache<T>>(batch, heads_kv, capacity, dim, dim_v, options);
    } catch (const foveal::Error&) {
    }
    return cache;
  }
  Expect expect;
  auto keys = draw_view<T, T, 4>(data, arena, {batch, heads_kv, capacity, dim}, true);
  auto values = draw_view<T, T, 4>(data, arena, {batch, heads_kv, capacity, dim_v}, true);
  expect.add(keys);
  expect.add(values);
  if (expect.unusable) return nullptr;
  if (!expect.invalid && (batch > wrapped_max || heads_kv > wrapped_max)) return nullptr;
  std::vector<Index> lengths;
  if (data.ConsumeBool())
    for (int b = data.ConsumeIntegralInRange<int>(0, 3); b > 0; --b)
      lengths.push_back(draw_index_option(data));
  run_call(expect, "KVCache(keys, values)", [&] {
    cache = std::make_unique<foveal::KVCache<T>>(keys.view, values.view, options, lengths);
  });
  return cache;
}

// A PagedKVCache's observable state: every sequence's id, length and page table, and the number
// of free pages (what a rejected call must leave as it was).
template <typename KV>
auto pool_state(const foveal::PagedKVCache<KV>& pool) {
  std::vector<std::tuple<Index, Index, std::vector<Index>>> sequences;
  for (Index id : pool.sequences())
    sequences.emplace_back(id, pool.length(id), pool.page_table(id));
  return std::make_pair(sequences, pool.free_pages());
}

// The counts of a ragged paged append or prefill of `sequences` sequences: none (every row
// appends all n), or one per sequence give or take one, now and then any number.
inline std::vector<Index> draw_append_counts(FuzzedDataProvider& data, Index sequences) {
  std::vector<Index> counts;
  if (data.ConsumeBool())
    for (Index i = sequences + data.ConsumeIntegralInRange<int>(-1, 1); i > 0; --i)
      counts.push_back(data.ConsumeIntegralInRange<int>(0, 7) == 0 ? draw_index_option(data)
                                                                   : draw_extent(data, 4));
  return counts;
}

}  // namespace foveal_fuzz
