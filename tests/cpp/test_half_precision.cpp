// tests/cpp/test_half_precision.cpp — bfloat16 and float16 storage: the conversions, and
// attention, sliding_window_attention, decode_attention and the paged batch calls on 16-bit q,
// k, v, out and caches, for any thread count and from several threads at once.
//
// The kernels compute in float on the stored values and round only what they write, so a
// 16-bit call must give exactly the float call's results on the same (16-bit representable)
// inputs, out rounded to the storage type and lse unchanged, bit for bit: that is checked over
// random shapes, options and layouts, for the many-row tiles (which convert a key block at a
// time) and the few-row tiles of decode (which convert as they load). The float64 reference
// bounds the total error.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/batch_attention.hpp"
#include "foveal/attention/decode.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/kv_cache.hpp"
#include "foveal/attention/paged_kv_cache.hpp"
#include "foveal/attention/sliding_window.hpp"
#include "foveal/core/dtype.hpp"
#include "foveal/sparsek/attention.hpp"
#include "harness.hpp"

namespace foveal::test {
namespace {

template <typename H>
double widen(H x) {
  return static_cast<double>(to_float(x));
}

// Rounded through float, as a float32 result is stored.
template <typename H>
H narrow(double x) {
  return to_storage<H>(static_cast<float>(x));
}

template <typename H>
std::uint16_t bits_of(double x) {
  return narrow<H>(x).bits;
}

using HalfTypes = ::testing::Types<bfloat16, float16>;
struct HalfTypeNames {
  template <typename H>
  static std::string GetName(int) {
    return std::is_same_v<H, bfloat16> ? "bfloat16" : "float16";
  }
};

template <typename H>
class HalfPrecision : public ::testing::Test {};
TYPED_TEST_SUITE(HalfPrecision, HalfTypes, HalfTypeNames);

bool is_nan_bits(bfloat16 x) { return (x.bits & 0x7f80) == 0x7f80 && (x.bits & 0x7f) != 0; }
bool is_nan_bits(float16 x) { return (x.bits & 0x7c00) == 0x7c00 && (x.bits & 0x3ff) != 0; }

// Every 16-bit pattern survives a round trip through float; the midpoint between two
// neighbours rounds to the even one, and the floats just beside it to the nearer one.
TYPED_TEST(HalfPrecision, ConversionsRoundToNearestEven) {
  using H = TypeParam;
  for (std::uint32_t bits = 0; bits <= 0xffff; ++bits) {
    const H x{static_cast<std::uint16_t>(bits)};
    const float wide = to_float(x);
    if (is_nan_bits(x)) {
      ASSERT_TRUE(std::isnan(wide)) << bits;
      ASSERT_TRUE(is_nan_bits(narrow<H>(wide))) << bits;
      continue;
    }
    ASSERT_EQ(narrow<H>(wide).bits, bits) << "round trip of " << wide;
  }
  // Neighbours a < b among the positive finite values (pattern order is value order).
  const std::uint32_t infinity = std::is_same_v<H, bfloat16> ? 0x7f80 : 0x7c00;
  for (std::uint32_t bits = 0; bits + 1 < infinity; ++bits) {
    const float a = to_float(H{static_cast<std::uint16_t>(bits)});
    const float b = to_float(H{static_cast<std::uint16_t>(bits + 1)});
    const float middle = static_cast<float>((static_cast<double>(a) + b) / 2);
    ASSERT_EQ(static_cast<double>(middle), (static_cast<double>(a) + b) / 2) << "exact midpoint";
    const std::uint32_t even = (bits % 2 == 0) ? bits : bits + 1;
    ASSERT_EQ(narrow<H>(middle).bits, even) << "tie between " << a << " and " << b;
    ASSERT_EQ(narrow<H>(std::nextafter(middle, 0.0f)).bits, bits) << a;
    ASSERT_EQ(narrow<H>(std::nextafter(middle, std::numeric_limits<float>::infinity())).bits,
              bits + 1)
        << b;
    ASSERT_EQ(narrow<H>(-middle).bits, even | 0x8000u) << "sign of " << -middle;
  }
  // Past the largest finite value: infinity from the midpoint to it on.
  const float largest = to_float(H{static_cast<std::uint16_t>(infinity - 1)});
  EXPECT_EQ(narrow<H>(std::numeric_limits<float>::infinity()).bits, infinity);
  EXPECT_EQ(narrow<H>(-std::numeric_limits<float>::infinity()).bits, infinity | 0x8000u);
  EXPECT_EQ(narrow<H>(largest).bits, infinity - 1);
  EXPECT_TRUE(is_nan_bits(narrow<H>(std::numeric_limits<float>::quiet_NaN())));
}

// ---------------------------------------------------------------------------------------------
// Attention: a 16-bit call equals the float call on the same values, out rounded.

// Values rounded to H (so the float call sees the same numbers).
template <typename H>
std::vector<double> representable(std::vector<double> values) {
  for (double& value : values) value = widen(narrow<H>(value));
  return values;
}

template <typename T, int Rank>
struct Buffer {
  std::vector<T> data;
  Shape<Rank> shape{};
  Shape<Rank> strides{};

  // Row-major storage of `values`, its innermost dimension padded by `pad` elements.
  static Buffer make(const std::vector<double>& values, const Shape<Rank>& shape, Index pad,
                     T fill) {
    Buffer buffer;
    buffer.shape = shape;
    Index stride = 1;
    for (int dim = Rank - 1; dim >= 0; --dim) {
      buffer.strides[dim] = stride;
      stride *= shape[dim] + (dim == Rank - 1 ? pad : 0);
    }
    buffer.data.assign(static_cast<std::size_t>(stride), fill);
    Index flat = 0;
    if (!values.empty()) {
      for_each_element(buffer.view(), [&](T& element) {
        element = convert(values[static_cast<std::size_t>(flat++)]);
      });
    }
    return buffer;
  }
  static T convert(double value) {
    if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
      return narrow<T>(value);
    } else {
      return static_cast<T>(value);
    }
  }
  TensorView<T, Rank> view() { return {data.data(), shape, strides}; }
  TensorView<const T, Rank> const_view() const { return {data.data(), shape, strides}; }
  std::vector<double> values() const {
    std::vector<double> result;
    for_each_element(const_view(), [&](const T& element) {
      if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
        result.push_back(widen(element));
      } else {
        result.push_back(static_cast<double>(element));
      }
    });
    return result;
  }
};

// The inputs rounded to H (q, k, v and the bias): what a call on H storage reads.
template <typename H>
Inputs representable_inputs(Inputs in) {
  in.q = representable<H>(in.q);
  in.k = representable<H>(in.k);
  in.v = representable<H>(in.v);
  in.bias = representable<H>(in.bias);
  return in;
}

// The results of one call on T storage: out as doubles and the bits of out, lse.
struct Run {
  std::vector<double> out;
  std::vector<double> lse;
};

template <typename T>
T nan_of() {
  if constexpr (std::is_same_v<T, bfloat16> || std::is_same_v<T, float16>) {
    return narrow<T>(std::numeric_limits<double>::quiet_NaN());
  } else {
    return std::numeric_limits<T>::quiet_NaN();
  }
}

enum class Operator { attention, sliding_window };

template <typename T>
Run run_dense(Operator op, const Problem& p, const Inputs& in, const AttentionOptions& options,
              Index pad) {
  using C = compute_type_t<T>;
  const auto q = Buffer<T, 4>::make(in.q, p.q_shape(), pad, nan_of<T>());
  const auto k = Buffer<T, 4>::make(in.k, p.k_shape(), pad, nan_of<T>());
  const auto v = Buffer<T, 4>::make(in.v, p.v_shape(), pad, nan_of<T>());
  const auto bias =
      Buffer<T, 4>::make(in.bias, p.has_bias() ? p.bias_shape() : Shape<4>{}, pad, nan_of<T>());
  auto out = Buffer<T, 4>::make({}, p.out_shape(), pad, nan_of<T>());
  auto lse = Buffer<C, 3>::make({}, p.lse_shape(), 0, std::numeric_limits<C>::quiet_NaN());
  if (op == Operator::attention) {
    attention(q.const_view(), k.const_view(), v.const_view(), out.view(), options, lse.view(),
              p.has_bias() ? bias.const_view() : TensorView<const T, 4>());
  } else {
    sliding_window_attention(q.const_view(), k.const_view(), v.const_view(), out.view(), options,
                             lse.view());
  }
  return {out.values(), lse.values()};
}

// Per element of output: rounding to H (half an ulp of the output scale: 2^-9 for bfloat16,
// 2^-11 for float16) on top of the float engine's error, plus the inputs' own rounding, which
// the reference sees too (it runs on the rounded inputs).
template <typename H>
constexpr double kHalfTolerance = std::is_same_v<H, bfloat16> ? 4e-3 : 1e-3;

// On AMX tiles (amx_tiles_in_use) a bfloat16 call's results are the float call's within
// bfloat16 rounding.
template <typename H>
bool on_amx_tiles(Index dim, Index dim_v) {
  return std::is_same_v<H, bfloat16> && amx_tiles_in_use() && dim % 32 == 0 && dim_v % 16 == 0;
}

// half holds the float call's results rounded to H (on AMX tiles: within H's rounding of them).
template <typename H>
void expect_rounded_float_results(const Run& half, const Run& single, bool tiles = false) {
  if (tiles) {
    EXPECT_TRUE(matches_reference(half.out, single.out, kHalfTolerance<H>)) << "out";
    EXPECT_TRUE(matches_reference(half.lse, single.lse, kTolerance<float>)) << "lse";
    return;
  }
  ASSERT_EQ(half.out.size(), single.out.size());
  for (std::size_t i = 0; i < half.out.size(); ++i) {
    const double want = widen(narrow<H>(single.out[i]));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(half.out[i])) << "out[" << i << "]";
    } else {
      ASSERT_EQ(half.out[i], want) << "out[" << i << "]: float gave " << single.out[i];
    }
  }
  EXPECT_TRUE(bitwise_equal(half.lse, single.lse)) << "lse";
}

TYPED_TEST(HalfPrecision, AttentionIsTheFloatCallRounded) {
  using H = TypeParam;
  constexpr Index kLengthChoices[] = {1, 2, 17, 64, 65, 129, 200};
  for (std::uint64_t seed = 1; seed <= 40; ++seed) {
    Problem p = random_problem(seed * 7919, 2e6, kLengthChoices, 4);
    RandomSource random(seed);
    if (random.chance(0.3)) p = with_bias(p, 1, p.heads_q, 0.1);
    Inputs in = random_inputs(p);
    in = representable_inputs<H>(in);
    AttentionOptions options;
    options.causal = random.chance(0.5);
    if (random.chance(0.3)) options.window_left = random.integer(0, 40);
    if (random.chance(0.2)) options.sink_tokens = random.integer(1, 4);
    if (random.chance(0.2)) options.softcap = 20;
    options.num_threads = static_cast<int>(random.integer(1, 2));
    const Index pad = random.chance(0.5) ? 0 : 3;
    SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(options), " pad=", pad));

    const Run half = run_dense<H>(Operator::attention, p, in, options, pad);
    const Run single = run_dense<float>(Operator::attention, p, in, options, 0);
    expect_rounded_float_results<H>(half, single, on_amx_tiles<H>(p.dim, p.dim_v));
    const Outputs want = reference_outputs(p, in, options);
    EXPECT_TRUE(matches_reference(half.out, want.out, kHalfTolerance<H>)) << "out";
    EXPECT_TRUE(matches_reference(half.lse, want.lse, kTolerance<float>)) << "lse";

    AttentionOptions other_threads = options;
    other_threads.num_threads = 3 - options.num_threads;
    const Run again = run_dense<H>(Operator::attention, p, in, other_threads, 0);
    EXPECT_TRUE(bitwise_equal(again.out, half.out)) << "thread count changed out";
  }
}

TYPED_TEST(HalfPrecision, SlidingWindowIsTheFloatCallRounded) {
  using H = TypeParam;
  for (std::uint64_t seed = 1; seed <= 6; ++seed) {
    Problem p = make_problem(2, 4, 2, 300 + static_cast<Index>(seed), 300, 64, 48, seed);
    Inputs in = random_inputs(p);
    in = representable_inputs<H>(in);
    const AttentionOptions options = causal_window(static_cast<Index>(seed) * 20, seed % 3);
    SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(options)));
    const Run half = run_dense<H>(Operator::sliding_window, p, in, options, 0);
    const Run single = run_dense<float>(Operator::sliding_window, p, in, options, 0);
    expect_rounded_float_results<H>(half, single, on_amx_tiles<H>(p.dim, p.dim_v));
  }
}

// ---------------------------------------------------------------------------------------------
// SparseK attention on 16-bit q, k, v, scores u and out: the scores are widened exactly, so the
// selection, the thresholds and the gates are the float call's, and so is everything after.

template <typename T>
Run run_sparsek(const Problem& p, const Inputs& in, const std::vector<double>& u,
                const SparseKOptions& options, Index pad) {
  using C = compute_type_t<T>;
  const auto q = Buffer<T, 4>::make(in.q, p.q_shape(), pad, nan_of<T>());
  const auto k = Buffer<T, 4>::make(in.k, p.k_shape(), pad, nan_of<T>());
  const auto v = Buffer<T, 4>::make(in.v, p.v_shape(), pad, nan_of<T>());
  const auto scores = Buffer<T, 3>::make(u, {p.batch, p.heads_kv, p.len_k}, pad, nan_of<T>());
  auto out = Buffer<T, 4>::make({}, p.out_shape(), pad, nan_of<T>());
  auto lse = Buffer<C, 3>::make({}, p.lse_shape(), 0, std::numeric_limits<C>::quiet_NaN());
  sparsek_attention(q.const_view(), k.const_view(), v.const_view(), scores.const_view(), options,
                    out.view(), lse.view());
  return {out.values(), lse.values()};
}

TYPED_TEST(HalfPrecision, SparseKAttentionIsTheFloatCallRounded) {
  using H = TypeParam;
  constexpr Index kLengthChoices[] = {1, 2, 17, 64, 65, 129, 200, 301};
  constexpr SparseKGate kGates[] = {SparseKGate::value, SparseKGate::kv, SparseKGate::none};
  for (std::uint64_t seed = 1; seed <= 44; ++seed) {
    // The last cases: shapes for AMX tiles (D % 32 == 0, Dv % 16 == 0), many rows per head.
    const Problem p =
        seed <= 40 ? random_problem(seed * 104729, 2e6, kLengthChoices, 4)
                   : make_problem(1, 4, 1, 230 + static_cast<Index>(seed), 301, 64, 32, seed);
    RandomSource random(seed + 500);
    const Inputs in = representable_inputs<H>(random_inputs(p));
    // Scores rounded to H; a third of the cases in small integers (ties: the lower index wins).
    std::vector<double> u;
    const auto count = static_cast<std::size_t>(p.batch * p.heads_kv * p.len_k);
    if (random.chance(0.3)) {
      for (std::size_t i = 0; i < count; ++i)
        u.push_back(static_cast<double>(random.integer(0, 4)));
    } else {
      u = representable<H>(random.normal(count, 0, 1.5));
    }
    SparseKOptions options;
    options.topk = random.pick({Index{1}, Index{7}, Index{64}, p.len_k + 3});
    options.causal = random.chance(0.8);
    options.window = options.causal ? random.pick({Index{0}, Index{1}, Index{33}}) : 0;
    options.sink_tokens = random.pick({Index{0}, Index{3}});
    if (seed > 40) {
      options.causal = true;
      options.window = 40;
      options.sink_tokens = static_cast<Index>(seed % 3);
    }
    options.gate = random.pick(kGates);
    if (random.chance(0.2)) options.softcap = 20;
    options.num_threads = static_cast<int>(random.integer(1, 2));
    const Index pad = random.chance(0.5) ? 0 : 3;
    SCOPED_TRACE(describe(problem_string(p), "\n  topk=", options.topk, " window=", options.window,
                          " sinks=", options.sink_tokens, " gate=", to_string(options.gate),
                          " causal=", options.causal, " softcap=", options.softcap, " pad=", pad));

    const Run half = run_sparsek<H>(p, in, u, options, pad);
    const Run single = run_sparsek<float>(p, in, u, options, 0);
    // Tiles of more than 8 rows (a call with more than 8 query rows per kv head) may run on AMX.
    const bool many_rows = p.len_q * (p.heads_q / p.heads_kv) > 8;
    expect_rounded_float_results<H>(half, single, many_rows && on_amx_tiles<H>(p.dim, p.dim_v));

    for (const int threads : {1, 2, 3}) {
      if (threads == options.num_threads) continue;
      SparseKOptions other_threads = options;
      other_threads.num_threads = threads;
      const Run again = run_sparsek<H>(p, in, u, other_threads, 0);
      EXPECT_TRUE(bitwise_equal(again.out, half.out)) << threads << " threads changed out";
      EXPECT_TRUE(bitwise_equal(again.lse, half.lse)) << threads << " threads changed lse";
    }
  }
}

TYPED_TEST(HalfPrecision, SparseKAttentionRejectsNonFiniteScoresNaming) {
  using H = TypeParam;
  const Problem p = make_problem(1, 2, 1, 5, 9, 8, 8, 77);
  const Inputs in = representable_inputs<H>(random_inputs(p));
  std::vector<double> u(9, 0.5);
  u[4] = std::numeric_limits<double>::infinity();
  SparseKOptions options;
  options.topk = 2;
  const auto q = Buffer<H, 4>::make(in.q, p.q_shape(), 0, nan_of<H>());
  const auto k = Buffer<H, 4>::make(in.k, p.k_shape(), 0, nan_of<H>());
  const auto v = Buffer<H, 4>::make(in.v, p.v_shape(), 0, nan_of<H>());
  const auto scores = Buffer<H, 3>::make(u, {1, 1, 9}, 0, nan_of<H>());
  auto out = Buffer<H, 4>::make(std::vector<double>(10 * 8, 0.25), p.out_shape(), 0, nan_of<H>());
  try {
    sparsek_attention(q.const_view(), k.const_view(), v.const_view(), scores.const_view(), options,
                      out.view());
    FAIL() << "an infinite score was accepted";
  } catch (const Error& error) {
    EXPECT_NE(std::string(error.what()).find("u[0, 0, 4] must be finite, got inf"),
              std::string::npos)
        << error.what();
  }
  for (double value : out.values()) ASSERT_EQ(value, 0.25) << "out changed";
}

// ---------------------------------------------------------------------------------------------
// Decode over a 16-bit KV cache (contiguous and ring), split-KV merged into 16-bit out.

// Appends `lengths` tokens to the sequences of `cache` (of T), values of H drawn from `random`,
// in pieces of up to 700 steps, so that a ring wraps.
template <typename T, typename H>
void fill_cache(KVCache<T>& cache, const std::vector<Index>& lengths, RandomSource& random) {
  const Index batch = cache.batch(), heads_kv = cache.heads_kv();
  const Index dim = cache.dim(), dim_v = cache.dim_v();
  Index longest = 0;
  for (Index length : lengths) longest = std::max(longest, length);
  for (Index done = 0; done < longest;) {
    const Index step = std::min<Index>(700, longest - done);
    const auto k = Buffer<T, 4>::make(
        representable<H>(random.normal(static_cast<std::size_t>(batch * heads_kv * step * dim))),
        {batch, heads_kv, step, dim}, 0, nan_of<T>());
    const auto v = Buffer<T, 4>::make(
        representable<H>(random.normal(static_cast<std::size_t>(batch * heads_kv * step * dim_v))),
        {batch, heads_kv, step, dim_v}, 0, nan_of<T>());
    std::vector<Index> counts;
    for (Index length : lengths) counts.push_back(std::clamp<Index>(length - done, 0, step));
    cache.append(k.const_view(), v.const_view(), counts);
    done += step;
  }
}

// decode_attention of q over `cache` into fresh outputs.
template <typename T>
Run decode_once(TensorView<const T, 4> q, const KVCache<T>& cache,
                const AttentionOptions& options) {
  using C = compute_type_t<T>;
  const Index batch = q.size(0), heads_q = q.size(1), len_q = q.size(2);
  auto out = Buffer<T, 4>::make({}, {batch, heads_q, len_q, cache.dim_v()}, 0, nan_of<T>());
  auto lse =
      Buffer<C, 3>::make({}, {batch, heads_q, len_q}, 0, std::numeric_limits<C>::quiet_NaN());
  decode_attention(q, cache, options, out.view(), lse.view());
  return {out.values(), lse.values()};
}

// T: the storage of the call; H: the 16-bit type whose values the data are drawn in.
template <typename T, typename H>
Run run_decode(const std::vector<Index>& lengths, Index heads_q, Index heads_kv, Index len_q,
               Index dim, Index dim_v, Index capacity, const KVCacheOptions& cache_options,
               const AttentionOptions& options, std::uint64_t seed) {
  const auto batch = static_cast<Index>(lengths.size());
  KVCache<T> cache(batch, heads_kv, capacity, dim, dim_v, cache_options);
  RandomSource random(seed);
  fill_cache<T, H>(cache, lengths, random);
  const auto q = Buffer<T, 4>::make(
      representable<H>(random.normal(static_cast<std::size_t>(batch * heads_q * len_q * dim))),
      {batch, heads_q, len_q, dim}, 0, nan_of<T>());
  return decode_once(q.const_view(), cache, options);
}

TYPED_TEST(HalfPrecision, DecodeIsTheFloatCallRounded) {
  using H = TypeParam;
  struct Case {
    std::vector<Index> lengths;
    Index heads_q, heads_kv, len_q, dim, dim_v, capacity;
    bool ring;
    Index sinks, window;
  };
  const Case cases[] = {
      {{3000, 1, 1025}, 8, 2, 1, 128, 128, 3000, false, 0, -1},
      {{2500, 700}, 4, 1, 3, 64, 80, 2600, false, 0, -1},
      {{5000, 130}, 4, 2, 1, 31, 31, 600, true, 4, 500},
      {{1024}, 32, 8, 1, 128, 128, 1024, false, 0, -1},
  };
  std::uint64_t seed = 11;
  for (const Case& c : cases) {
    for (int threads = 1; threads <= 2; ++threads) {
      KVCacheOptions cache_options;
      cache_options.ring = c.ring;
      cache_options.sink_tokens = c.sinks;
      AttentionOptions options;
      options.causal = true;
      options.window_left = c.window;
      options.sink_tokens = c.sinks;
      options.num_threads = threads;
      SCOPED_TRACE(
          describe("case with dim ", c.dim, " capacity ", c.capacity, " threads ", threads));
      const Run half = run_decode<H, H>(c.lengths, c.heads_q, c.heads_kv, c.len_q, c.dim, c.dim_v,
                                        c.capacity, cache_options, options, seed);
      const Run single = run_decode<float, H>(c.lengths, c.heads_q, c.heads_kv, c.len_q, c.dim,
                                              c.dim_v, c.capacity, cache_options, options, seed);
      expect_rounded_float_results<H>(half, single, on_amx_tiles<H>(c.dim, c.dim_v));
    }
    ++seed;
  }
}

// ---------------------------------------------------------------------------------------------
// Paged pools: batch prefill and batch decode (with a forked prompt shared as a prefix).

template <typename T, typename H>
std::pair<Run, Run> run_paged(int threads) {
  using C = compute_type_t<T>;
  constexpr Index kHeadsKv = 2, kHeadsQ = 8, kDim = 64, kPage = 16;
  PagedKVCache<T> pool(200, kPage, kHeadsKv, kDim, kDim);
  RandomSource random(5);
  const Index prompt = pool.add_sequence();
  const Index other = pool.add_sequence();
  AttentionOptions options;
  options.causal = true;
  options.num_threads = threads;
  // Prefill: the prompt (700 tokens) and another sequence (300) in one chunked call.
  const Index n = 700;
  const auto draw = [&](Shape<4> shape) {
    return Buffer<T, 4>::make(representable<H>(random.normal(static_cast<std::size_t>(
                                  shape[0] * shape[1] * shape[2] * shape[3]))),
                              shape, 0, nan_of<T>());
  };
  const auto q = draw({2, kHeadsQ, n, kDim});
  const auto k = draw({2, kHeadsKv, n, kDim});
  const auto v = draw({2, kHeadsKv, n, kDim});
  auto out = Buffer<T, 4>::make({}, {2, kHeadsQ, n, kDim}, 0, nan_of<T>());
  auto lse = Buffer<C, 3>::make({}, {2, kHeadsQ, n}, 0, std::numeric_limits<C>::quiet_NaN());
  batch_prefill_attention(q.const_view(), k.const_view(), v.const_view(), pool, {prompt, other},
                          {n, 300}, options, out.view(), lse.view());
  const Run prefill{out.values(), lse.values()};
  // Decode: three forks of the prompt and the other sequence, one new token each.
  std::vector<Index> ids = {pool.fork(prompt), pool.fork(prompt), pool.fork(prompt), other};
  const auto k1 = draw({4, kHeadsKv, 1, kDim});
  const auto v1 = draw({4, kHeadsKv, 1, kDim});
  pool.append(ids, k1.const_view(), v1.const_view());
  const auto q1 = draw({4, kHeadsQ, 1, kDim});
  auto out1 = Buffer<T, 4>::make({}, {4, kHeadsQ, 1, kDim}, 0, nan_of<T>());
  auto lse1 = Buffer<C, 3>::make({}, {4, kHeadsQ, 1}, 0, std::numeric_limits<C>::quiet_NaN());
  BatchAttentionInfo info;
  batch_decode_attention(q1.const_view(), pool, ids, options, out1.view(), lse1.view(),
                         PrefixSharing::detect, &info);
  EXPECT_EQ(info.shared_groups, 1) << "the forks share the prompt's pages";
  return {prefill, Run{out1.values(), lse1.values()}};
}

TYPED_TEST(HalfPrecision, PagedPoolsAreTheFloatCallRounded) {
  using H = TypeParam;
  for (int threads = 1; threads <= 2; ++threads) {
    SCOPED_TRACE(describe("threads ", threads));
    const auto [half_prefill, half_decode] = run_paged<H, H>(threads);
    const auto [prefill, decode] = run_paged<float, H>(threads);
    expect_rounded_float_results<H>(half_prefill, prefill, on_amx_tiles<H>(64, 64));
    expect_rounded_float_results<H>(half_decode, decode, on_amx_tiles<H>(64, 64));
  }
}

// ---------------------------------------------------------------------------------------------
// Threads: the same bits for 1, 2 and 3 threads (3 divides none of the task counts below), and
// for calls from several threads at once on shared inputs.

void expect_same_bits(const Run& got, const Run& want) {
  EXPECT_TRUE(bitwise_equal(got.out, want.out)) << "out";
  EXPECT_TRUE(bitwise_equal(got.lse, want.lse)) << "lse";
}

TYPED_TEST(HalfPrecision, IdenticalBitsForOneTwoAndThreeThreads) {
  using H = TypeParam;
  const Problem dense = with_bias(make_problem(2, 6, 2, 77, 131, 40, 24, 31), 1, 6, 0.1);
  Inputs in = random_inputs(dense);
  in = representable_inputs<H>(in);
  const Problem band = make_problem(1, 4, 2, 300, 300, 64, 48, 32);
  Inputs band_in = random_inputs(band);
  band_in = representable_inputs<H>(band_in);
  KVCacheOptions ring;
  ring.ring = true;
  ring.sink_tokens = 4;

  Run attention_1, band_1, decode_1, ring_1, prefill_1, batch_decode_1;
  for (int threads = 1; threads <= 3; ++threads) {
    SCOPED_TRACE(describe("threads ", threads));
    AttentionOptions options;
    options.causal = true;
    options.softcap = 30;
    options.num_threads = threads;
    const Run attention_run = run_dense<H>(Operator::attention, dense, in, options, 0);
    AttentionOptions band_options = causal_window(50, 2);
    band_options.num_threads = threads;
    const Run band_run = run_dense<H>(Operator::sliding_window, band, band_in, band_options, 3);
    // Split-KV decode: 1500 keys in chunks, a ragged batch; and a wrapped ring with sinks.
    const Run decode_run = run_decode<H, H>({1500, 3, 777}, 6, 2, 1, 64, 64, 1500, {}, options, 33);
    AttentionOptions ring_options = causal_window(500, 4);
    ring_options.num_threads = threads;
    const Run ring_run =
        run_decode<H, H>({2100, 130}, 4, 2, 2, 31, 31, 600, ring, ring_options, 34);
    const auto [prefill_run, batch_decode_run] = run_paged<H, H>(threads);
    if (threads == 1) {
      attention_1 = attention_run;
      band_1 = band_run;
      decode_1 = decode_run;
      ring_1 = ring_run;
      prefill_1 = prefill_run;
      batch_decode_1 = batch_decode_run;
      continue;
    }
    {
      SCOPED_TRACE("attention");
      expect_same_bits(attention_run, attention_1);
    }
    {
      SCOPED_TRACE("sliding_window_attention");
      expect_same_bits(band_run, band_1);
    }
    {
      SCOPED_TRACE("decode_attention");
      expect_same_bits(decode_run, decode_1);
    }
    {
      SCOPED_TRACE("decode_attention, ring");
      expect_same_bits(ring_run, ring_1);
    }
    {
      SCOPED_TRACE("batch_prefill_attention");
      expect_same_bits(prefill_run, prefill_1);
    }
    {
      SCOPED_TRACE("batch_decode_attention");
      expect_same_bits(batch_decode_run, batch_decode_1);
    }
  }
}

// Calls of every 16-bit entry point from eight threads at once: q, k, v, one KVCache and one
// paged pool shared read-only by several of them, a cache and a pool of its own for others,
// outputs of its own for each. Every call gives bitwise what it gives alone.
TYPED_TEST(HalfPrecision, ConcurrentCallsOnSharedInputsGiveTheLoneResults) {
  using H = TypeParam;
  const Problem p = with_bias(make_problem(1, 4, 2, 130, 200, 32, 24, 41), 1, 4, 0.1);
  Inputs in = random_inputs(p);
  const auto q = Buffer<H, 4>::make(in.q, p.q_shape(), 0, nan_of<H>());
  const auto k = Buffer<H, 4>::make(in.k, p.k_shape(), 0, nan_of<H>());
  const auto v = Buffer<H, 4>::make(in.v, p.v_shape(), 0, nan_of<H>());
  const auto bias = Buffer<H, 4>::make(in.bias, p.bias_shape(), 0, nan_of<H>());
  const auto dense = [&](Operator op, int threads) {
    return [&, op, threads] {
      auto out = Buffer<H, 4>::make({}, p.out_shape(), 0, nan_of<H>());
      auto lse = Buffer<float, 3>::make({}, p.lse_shape(), 0, std::nanf(""));
      AttentionOptions options = causal_window(op == Operator::attention ? -1 : 40, 2);
      options.num_threads = threads;
      if (op == Operator::attention) {
        attention(q.const_view(), k.const_view(), v.const_view(), out.view(), options, lse.view(),
                  bias.const_view());
      } else {
        sliding_window_attention(q.const_view(), k.const_view(), v.const_view(), out.view(),
                                 options, lse.view());
      }
      return Run{out.values(), lse.values()};
    };
  };

  // Decode: one cache that three threads read, and a cache of its own for a fourth.
  RandomSource random(42);
  KVCache<H> shared_cache(2, 2, 1300, 64, 48);
  fill_cache<H, H>(shared_cache, {1250, 333}, random);
  KVCache<H> own_cache(1, 2, 900, 64, 48);
  fill_cache<H, H>(own_cache, {900}, random);
  const auto decode_q = Buffer<H, 4>::make(representable<H>(random.normal(2 * 8 * 2 * 64)),
                                           {2, 8, 2, 64}, 0, nan_of<H>());
  const auto decode = [&](const KVCache<H>& cache, int threads) {
    return [&, threads] {
      AttentionOptions options;
      options.causal = true;
      options.num_threads = threads;
      // The first cache.batch() sequences' queries.
      const TensorView<const H, 4> rows(decode_q.data.data(), {cache.batch(), 8, 2, 64},
                                        decode_q.strides);
      return decode_once(rows, cache, options);
    };
  };

  // A paged pool that two threads read (a forked prompt: the shared-prefix path), and a pool
  // of its own for each prefill, made inside the call.
  PagedKVCache<H> pool(64, 16, 2, 32, 32);
  const Index prompt = pool.add_sequence();
  const auto draw = [&](Shape<4> shape) {
    return Buffer<H, 4>::make(representable<H>(random.normal(static_cast<std::size_t>(
                                  shape[0] * shape[1] * shape[2] * shape[3]))),
                              shape, 0, nan_of<H>());
  };
  const auto prompt_k = draw({1, 2, 300, 32}), prompt_v = draw({1, 2, 300, 32});
  pool.append({prompt}, prompt_k.const_view(), prompt_v.const_view());
  const std::vector<Index> ids = {prompt, pool.fork(prompt), pool.add_sequence()};
  const auto step_k = draw({3, 2, 5, 32}), step_v = draw({3, 2, 5, 32});
  pool.append(ids, step_k.const_view(), step_v.const_view());
  const auto pool_q = draw({3, 4, 1, 32});
  const auto batch_decode = [&](int threads) {
    return [&, threads] {
      AttentionOptions options;
      options.num_threads = threads;
      auto out = Buffer<H, 4>::make({}, {3, 4, 1, 32}, 0, nan_of<H>());
      auto lse = Buffer<float, 3>::make({}, {3, 4, 1}, 0, std::nanf(""));
      batch_decode_attention(pool_q.const_view(), pool, ids, options, out.view(), lse.view());
      return Run{out.values(), lse.values()};
    };
  };
  const auto prefill_q = draw({2, 4, 150, 32});
  const auto prefill_k = draw({2, 2, 150, 32}), prefill_v = draw({2, 2, 150, 32});
  const auto prefill = [&](int threads) {
    return [&, threads] {
      PagedKVCache<H> own_pool(32, 16, 2, 32, 32);
      const std::vector<Index> sequences = {own_pool.add_sequence(), own_pool.add_sequence()};
      AttentionOptions options;
      options.causal = true;
      options.num_threads = threads;
      auto out = Buffer<H, 4>::make({}, {2, 4, 150, 32}, 0, nan_of<H>());
      auto lse = Buffer<float, 3>::make({}, {2, 4, 150}, 0, std::nanf(""));
      batch_prefill_attention(prefill_q.const_view(), prefill_k.const_view(),
                              prefill_v.const_view(), own_pool, sequences, {150, 97}, options,
                              out.view(), lse.view());
      return Run{out.values(), lse.values()};
    };
  };

  // SparseK on the dense call's q, k, v with scores of its own.
  const std::vector<double> scores = representable<H>(random.normal(2 * 200, 0, 1.5));
  const auto sparsek = [&](int threads) {
    return [&, threads] {
      SparseKOptions options;
      options.topk = 20;
      options.window = 16;
      options.sink_tokens = 2;
      options.num_threads = threads;
      return run_sparsek<H>(p, in, scores, options, 0);
    };
  };

  const std::vector<std::function<Run()>> calls = {dense(Operator::attention, 2),
                                                   dense(Operator::sliding_window, 3),
                                                   decode(shared_cache, 1),
                                                   decode(shared_cache, 2),
                                                   decode(shared_cache, 3),
                                                   decode(own_cache, 2),
                                                   batch_decode(1),
                                                   batch_decode(3),
                                                   prefill(2),
                                                   sparsek(1),
                                                   sparsek(3)};
  std::vector<Run> alone;
  for (const auto& call : calls) alone.push_back(call());

  constexpr int kRounds = 3;
  std::vector<std::vector<Run>> results(calls.size());
  std::vector<std::thread> threads;
  std::atomic<int> waiting{static_cast<int>(calls.size())};
  for (std::size_t i = 0; i < calls.size(); ++i) {
    threads.emplace_back([&, i] {
      waiting.fetch_sub(1);
      while (waiting.load() > 0) std::this_thread::yield();  // start together
      for (int round = 0; round < kRounds; ++round) results[i].push_back(calls[i]());
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (std::size_t i = 0; i < calls.size(); ++i) {
    SCOPED_TRACE(describe("call ", i));
    ASSERT_EQ(results[i].size(), static_cast<std::size_t>(kRounds));
    for (const Run& run : results[i]) expect_same_bits(run, alone[i]);
  }
}

// A 16-bit cache takes 16-bit K and V only, and decode checks its arguments as for float.
TYPED_TEST(HalfPrecision, DecodeRejectsBadArguments) {
  using H = TypeParam;
  KVCache<H> cache(1, 2, 16, 8, 8);
  auto k = Buffer<H, 4>::make(std::vector<double>(2 * 4 * 8, 0.5), {1, 2, 4, 8}, 0, nan_of<H>());
  cache.append(k.const_view(), k.const_view());
  auto q = Buffer<H, 4>::make(std::vector<double>(2 * 5 * 8, 0.5), {1, 2, 5, 8}, 0, nan_of<H>());
  auto out = Buffer<H, 4>::make({}, {1, 2, 5, 8}, 0, nan_of<H>());
  EXPECT_THROW(decode_attention(q.const_view(), cache, {}, out.view()), Error);
  for (const double value : out.values()) EXPECT_TRUE(std::isnan(value)) << "out was written";
}

// ---------------------------------------------------------------------------------------------
// The shapes AMX tiles serve (D a multiple of 32, Dv of 16): on the avx512-amx level these
// bfloat16 calls run on the tiles (src/detail/amx_tiles.hpp), elsewhere on the float kernels;
// both meet the same checks.

TEST(AmxTileShapes, MatchTheReferenceOnRandomShapesAndOptions) {
  constexpr Index kDims[] = {32, 64, 96, 128, 160, 256};
  constexpr Index kValueDims[] = {16, 32, 48, 64, 128, 256};
  constexpr Index kLengths[] = {1, 9, 16, 17, 31, 33, 64, 65, 127, 128, 129, 200, 257};
  for (std::uint64_t seed = 1; seed <= 36; ++seed) {
    RandomSource random(seed * 104729);
    Problem p;
    p.seed = seed;
    p.batch = random.integer(1, 2);
    p.heads_kv = random.integer(1, 2);
    p.heads_q = p.heads_kv * random.pick(kGroupRatios);
    p.len_q = random.pick(kLengths);
    p.len_k = random.pick(kLengths);
    p.dim = random.pick(kDims);
    p.dim_v = random.pick(kValueDims);
    if (random.chance(0.25)) p = with_bias(p, 1, p.heads_q, 0.1);
    Inputs in = random_inputs(p);
    in = representable_inputs<bfloat16>(in);
    AttentionOptions options;
    options.causal = random.chance(0.5);
    if (random.chance(0.3)) options.window_left = random.integer(0, 150);
    if (random.chance(0.2)) options.sink_tokens = random.integer(1, 4);
    if (random.chance(0.2)) options.softcap = 20;
    options.num_threads = 1;
    const Index pad = random.chance(0.5) ? 0 : 5;  // strided rows
    SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(options), " pad=", pad));
    const ::foveal::test::Run one = run_dense<bfloat16>(Operator::attention, p, in, options, pad);
    const Outputs want = reference_outputs(p, in, options);
    EXPECT_TRUE(matches_reference(one.out, want.out, kHalfTolerance<bfloat16>)) << "out";
    EXPECT_TRUE(matches_reference(one.lse, want.lse, kTolerance<float>)) << "lse";
    for (const int threads : {2, 3}) {
      options.num_threads = threads;
      expect_same_bits(run_dense<bfloat16>(Operator::attention, p, in, options, 0), one);
    }
  }
}

// A key that a window hides from some rows: its NaN value reaches only the rows that see it (on
// tiles, 0 * NaN would be NaN for every row of the block), and an infinite key does the same.
TEST(AmxTileShapes, AMaskedOutNonFiniteKeyReachesOnlyTheRowsThatSeeIt) {
  const Problem p = make_problem(1, 2, 1, 300, 300, 64, 64, 41);
  Inputs in = random_inputs(p);
  in = representable_inputs<bfloat16>(in);
  constexpr Index kBadValue = 100, kBadKey = 200, kWindow = 20;
  for (Index d = 0; d < p.dim_v; ++d) in.v[static_cast<std::size_t>(kBadValue * p.dim_v + d)] = NAN;
  in.k[static_cast<std::size_t>(kBadKey * p.dim)] = INFINITY;
  AttentionOptions options;
  options.causal = true;
  options.window_left = kWindow;
  const ::foveal::test::Run got = run_dense<bfloat16>(Operator::attention, p, in, options, 0);
  Inputs clean = in;
  for (Index d = 0; d < p.dim_v; ++d)
    clean.v[static_cast<std::size_t>(kBadValue * p.dim_v + d)] = 0;
  clean.k[static_cast<std::size_t>(kBadKey * p.dim)] = 0;
  const Outputs want = reference_outputs(p, clean, options);
  const auto sees = [&](Index row, Index key) { return key <= row && key >= row - kWindow; };
  for (Index h = 0; h < p.heads_q; ++h)
    for (Index row = 0; row < p.len_q; ++row)
      for (Index d = 0; d < p.dim_v; ++d) {
        const auto at = static_cast<std::size_t>((h * p.len_q + row) * p.dim_v + d);
        if (sees(row, kBadValue)) {
          EXPECT_TRUE(std::isnan(got.out[at])) << "row " << row;
        } else if (!sees(row, kBadKey)) {
          ASSERT_TRUE(std::isfinite(got.out[at])) << "row " << row;
          ASSERT_NEAR(got.out[at], want.out[at], 2e-2) << "row " << row;
        }
      }
}

// A variable-length call on tiles: NaN in every padding key and value never reaches a row (the
// same bits as without it), and every row matches the reference. The ranges cover the ways a
// block meets V interleaved once per call (a dense call with many rows per kv head): whole
// blocks, a row ending on a 32-key step inside the keys, a row ending mid-step inside them, a
// row starting at an odd key, a row reaching the last key, and a one-key row.
TEST(AmxTileShapes, VariableLengthPaddingNeverReachesARow) {
  const Problem p = make_problem(4, 4, 2, 200, 300, 64, 32, 43);
  const Inputs in = representable_inputs<bfloat16>(random_inputs(p));
  KeyRangeCase ranges;
  ranges.start = {0, 131, 0, 299};
  ranges.length = {160, 169, 170, 1};
  const Inputs poisoned = with_nan_padding(p, in, ranges);
  std::vector<AttentionOptions> option_sets(4);
  option_sets[1].causal = true;
  option_sets[2].causal = true;
  option_sets[2].window_left = 40;
  option_sets[2].sink_tokens = 2;
  option_sets[3].softcap = 20;
  for (const AttentionOptions& base : option_sets) {
    const AttentionOptions options = ranges.applied_to(base);
    SCOPED_TRACE(options_string(options));
    const ::foveal::test::Run clean = run_dense<bfloat16>(Operator::attention, p, in, options, 0);
    expect_same_bits(run_dense<bfloat16>(Operator::attention, p, poisoned, options, 0), clean);
    const Outputs want = reference_outputs(p, in, options);
    EXPECT_TRUE(matches_reference(clean.out, want.out, kHalfTolerance<bfloat16>)) << "out";
    EXPECT_TRUE(matches_reference(clean.lse, want.lse, kTolerance<float>)) << "lse";
  }
}

}  // namespace
}  // namespace foveal::test
