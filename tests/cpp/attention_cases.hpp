// tests/cpp/attention_cases.hpp — the attention cases every attention operator's tests share.
//
// q: [B, Hq, Lq, D]  k: [B, Hkv, Lk, D]  v: [B, Hkv, Lk, Dv]  ->  out: [B, Hq, Lq, Dv]
// lse: [B, Hq, Lq]   bias: [B or 1, Hq or 1, Lq, Lk]
// One attention problem (shapes, an optional bias, the seed of its inputs), its inputs, the
// float64 reference's outputs, a call of any entry point (foveal::attention,
// sliding_window_attention, a registry kernel) on those inputs placed in any layout, and the
// checks the tests make of the results. Built on harness.hpp.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "foveal/attention/dense.hpp"
#include "foveal/attention/options.hpp"
#include "foveal/core/build_info.hpp"
#include "harness.hpp"
#include "reference/attention_reference.hpp"

namespace foveal::test {

inline constexpr double kInfinity = std::numeric_limits<double>::infinity();

// Tolerances of the attention engine on the normalized error (harness.hpp: max |got - ref| /
// max |ref|). float: each logit sums D products and each output Lk weighted values in fp32 (eps
// 1.2e-7), through a polynomial exp2 (1.2 ulp) and tanh; for D and Lk up to a few
// hundred that stays within a few hundred ulps of the output scale, so 2e-5 has margin while a
// wrong mask, scale or bias (an O(1) change) misses by orders of magnitude.
// double: the same sums in fp64 with libm exp2 / tanh (~1e-14); 1e-10 still catches any
// computation that drops to fp32 on the way.
template <typename T>
inline constexpr double kTolerance = std::is_same_v<T, float> ? 2e-5 : 1e-10;

// True on the avx512-amx level: there the bfloat16 tiles of more than a few rows whose D is a
// whole number of 32-value steps and Dv of 16-column tiles multiply on AMX tiles, with the
// probabilities rounded to bfloat16 (src/detail/amx_tiles.hpp), so their results are the float
// call's within bfloat16 rounding, not its rounded bits.
inline bool amx_tiles_in_use() { return build_info().level == "avx512-amx"; }

// The head dims and GQA ratios the sweeps draw from.
inline constexpr Index kHeadDims[] = {1, 3, 16, 31, 64, 80, 128};
inline constexpr Index kGroupRatios[] = {1, 2, 3, 4, 8};

// The element types every typed test runs for, named "float" and "double" in the test names.
using ElementTypes = ::testing::Types<float, double>;
struct ElementTypeNames {
  template <typename T>
  static std::string GetName(int) {
    return std::is_same_v<T, float> ? "float" : "double";
  }
};

// ---------------------------------------------------------------------------------------------
// One attention problem: shapes, bias layout and the seed of its inputs.

struct Problem {
  Index batch = 1, heads_q = 1, heads_kv = 1, len_q = 1, len_k = 1, dim = 1, dim_v = 1;
  Index bias_batch = 0;          // 0: no bias; else 1 (broadcast) or batch
  Index bias_heads = 0;          // 1 (broadcast) or heads_q when there is a bias
  double masked_bias_share = 0;  // share of bias entries that are -inf
  std::uint64_t seed = 1;

  Shape<4> q_shape() const { return {batch, heads_q, len_q, dim}; }
  Shape<4> k_shape() const { return {batch, heads_kv, len_k, dim}; }
  Shape<4> v_shape() const { return {batch, heads_kv, len_k, dim_v}; }
  Shape<4> out_shape() const { return {batch, heads_q, len_q, dim_v}; }
  Shape<3> lse_shape() const { return {batch, heads_q, len_q}; }
  Shape<4> bias_shape() const { return {bias_batch, bias_heads, len_q, len_k}; }
  bool has_bias() const { return bias_batch > 0; }
  // Multiply-adds of the reference, which forms every logit whatever the mask: what a case
  // costs.
  double work() const {
    return static_cast<double>(batch * heads_q * len_q) * static_cast<double>(len_k) *
           static_cast<double>(dim + dim_v);
  }
};

// A problem without bias.
// The shape of p as the references spell it.
inline reference::AttentionShape shape_of(const Problem& p) {
  return {p.batch, p.heads_q, p.heads_kv, p.len_q, p.len_k, p.dim, p.dim_v};
}

inline Problem make_problem(Index batch, Index heads_q, Index heads_kv, Index len_q, Index len_k,
                            Index dim, Index dim_v, std::uint64_t seed) {
  return Problem{batch, heads_q, heads_kv, len_q, len_k, dim, dim_v, 0, 0, 0, seed};
}

// `problem` with a [bias_batch, bias_heads, Lq, Lk] bias, `masked_share` of it -inf.
inline Problem with_bias(Problem problem, Index bias_batch, Index bias_heads,
                         double masked_share = 0) {
  problem.bias_batch = bias_batch;
  problem.bias_heads = bias_heads;
  problem.masked_bias_share = masked_share;
  return problem;
}

// "seed=7 q=[...] k=[...] v=[...]" and the bias, for SCOPED_TRACE.
inline std::string problem_string(const Problem& p) {
  std::ostringstream text;
  text << "seed=" << p.seed << " q=" << shape_string(p.q_shape())
       << " k=" << shape_string(p.k_shape()) << " v=" << shape_string(p.v_shape());
  if (p.has_bias()) {
    text << " bias=" << shape_string(p.bias_shape()) << " masked share=" << p.masked_bias_share;
  }
  return text.str();
}

// "[3 0 7]" for a 1-D index view, "null" for none.
inline std::string index_string(const TensorView<const std::int64_t, 1>& view) {
  if (view.is_null()) return "null";
  std::ostringstream text;
  text << "[";
  for (Index b = 0; b < view.size(0); ++b) text << (b > 0 ? " " : "") << view(b);
  text << "]";
  return text.str();
}

// Every field of the options, for SCOPED_TRACE.
inline std::string options_string(const AttentionOptions& o) {
  return describe("scale=", o.scale, " causal=", o.causal, " window_left=", o.window_left,
                  " window_right=", o.window_right, " sink_tokens=", o.sink_tokens,
                  " softcap=", o.softcap, " q_offset=", o.q_offset, " num_threads=", o.num_threads,
                  " key_start=", index_string(o.key_start),
                  " key_length=", index_string(o.key_length));
}

// The key ranges of a variable-length case (AttentionOptions::key_start / key_length), owned;
// an empty vector stands for a null view.
struct KeyRangeCase {
  std::vector<std::int64_t> start, length;

  // `options` with views of these ranges.
  AttentionOptions applied_to(AttentionOptions options) const {
    const auto view = [](const std::vector<std::int64_t>& values) {
      return values.empty() ? TensorView<const std::int64_t, 1>()
                            : TensorView<const std::int64_t, 1>(
                                  values.data(), {static_cast<Index>(values.size())});
    };
    options.key_start = view(start);
    options.key_length = view(length);
    return options;
  }

  // True when key row j is padding for batch row b (outside its range) among len_k keys.
  bool is_padding(Index b, Index j, Index len_k) const {
    const auto at = static_cast<std::size_t>(b);
    const Index first = start.empty() ? 0 : start[at];
    const Index count = length.empty() ? len_k - first : length[at];
    return j < first || j >= first + count;
  }
};

// Key ranges for `batch` rows of `len_k` keys, drawn from `seed` in one of four kinds: left
// padding (every range ends at Lk), right padding (every range starts at 0, null start), both,
// and start-only (null length). Rows of no keys and of every key come up among them.
inline KeyRangeCase random_key_ranges(Index batch, Index len_k, std::uint64_t seed) {
  RandomSource random(seed);
  const int kind = static_cast<int>(random.integer(0, 3));
  KeyRangeCase ranges;
  for (Index b = 0; b < batch; ++b) {
    const auto pick = [&](Index hi) {  // 0, hi, or anything in between
      const Index draw = random.integer(0, 19);
      return draw < 3 ? Index{0} : draw < 6 ? hi : random.integer(0, hi);
    };
    const Index start = kind == 1 ? 0 : pick(len_k);
    const Index length = kind == 0 || kind == 3 ? len_k - start : pick(len_k - start);
    if (kind != 1) ranges.start.push_back(start);
    if (kind != 3) ranges.length.push_back(length);
  }
  return ranges;
}

// A random problem without bias whose reference costs at most `max_work`: Lq and Lk from
// `lengths`, D and Dv from kHeadDims, and in one case of five MQA with 2 to `max_mqa_heads`
// query heads, else GQA with 1 or 2 kv heads and a ratio from kGroupRatios.
template <typename Lengths>
Problem random_problem(std::uint64_t seed, double max_work, const Lengths& lengths,
                       Index max_mqa_heads) {
  RandomSource random(seed);
  for (;;) {
    Problem p;
    p.seed = seed;
    p.batch = random.integer(1, 3);
    if (random.chance(0.2)) {  // MQA: one kv head for all query heads
      p.heads_kv = 1;
      p.heads_q = random.integer(2, max_mqa_heads);
    } else {
      p.heads_kv = random.integer(1, 2);
      p.heads_q = p.heads_kv * random.pick(kGroupRatios);
    }
    p.len_q = random.pick(lengths);
    p.len_k = random.pick(lengths);
    p.dim = random.pick(kHeadDims);
    p.dim_v = random.chance(0.5) ? p.dim : random.pick(kHeadDims);
    if (p.work() <= max_work) return p;
  }
}

// The shapes option tests run on, seeds seed to seed + 3: GQA with Lq < Lk, MQA with Lq > Lk,
// a square [square_length, square_length] with Dv < D, and a single query against
// `single_query_keys` keys.
inline std::vector<Problem> option_problems(std::uint64_t seed, Index square_length,
                                            Index single_query_keys) {
  return {make_problem(2, 4, 2, 65, 129, 16, 24, seed),
          make_problem(1, 3, 1, 129, 65, 31, 31, seed + 1),
          make_problem(1, 2, 2, square_length, square_length, 8, 5, seed + 2),
          make_problem(3, 1, 1, 1, single_query_keys, 64, 80, seed + 3)};
}

// The options of a causal sliding window of `window_left` keys before each query plus the
// first `sink_tokens` keys.
inline AttentionOptions causal_window(Index window_left, Index sink_tokens = 0) {
  AttentionOptions options;
  options.causal = true;
  options.window_left = window_left;
  options.sink_tokens = sink_tokens;
  return options;
}

// ---------------------------------------------------------------------------------------------
// Inputs, the reference and the calls under test.

// q, k, v ~ N(0, 1); bias ~ N(0, 1) with a share of entries -inf. All values are rounded to
// float, so one set of inputs is exact for float, double and the float64 reference alike.
struct Inputs {
  std::vector<double> q, k, v, bias;  // logical row-major
};

// The inputs of `p`, drawn from p.seed.
inline Inputs random_inputs(const Problem& p) {
  RandomSource random(p.seed);
  Inputs in;
  in.q = round_to<float>(random.normal(shape_numel<4>(p.q_shape())));
  in.k = round_to<float>(random.normal(shape_numel<4>(p.k_shape())));
  in.v = round_to<float>(random.normal(shape_numel<4>(p.v_shape())));
  if (p.has_bias()) {
    in.bias = round_to<float>(random.normal(shape_numel<4>(p.bias_shape())));
    for (double& entry : in.bias)
      if (random.chance(p.masked_bias_share)) entry = -kInfinity;
  }
  return in;
}

// `in` with NaN in every key and value row that `ranges` makes padding.
inline Inputs with_nan_padding(const Problem& p, Inputs in, const KeyRangeCase& ranges) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (Index b = 0; b < p.batch; ++b)
    for (Index h = 0; h < p.heads_kv; ++h)
      for (Index j = 0; j < p.len_k; ++j) {
        if (!ranges.is_padding(b, j, p.len_k)) continue;
        const Index row = (b * p.heads_kv + h) * p.len_k + j;
        std::fill_n(in.k.begin() + row * p.dim, p.dim, nan);
        std::fill_n(in.v.begin() + row * p.dim_v, p.dim_v, nan);
      }
  return in;
}

// What attention computes (also the state merge_states combines).
struct Outputs {
  std::vector<double> out, lse;  // logical row-major
};

// `o` as the reference spells it.
inline reference::ReferenceOptions reference_options(const AttentionOptions& o) {
  reference::ReferenceOptions options;
  options.scale = o.scale;
  options.causal = o.causal;
  options.window_left = o.window_left;
  options.window_right = o.window_right;
  options.sink_tokens = o.sink_tokens;
  options.softcap = o.softcap;
  options.q_offset = o.q_offset;
  for (Index b = 0; b < o.key_start.size(0); ++b) options.key_start.push_back(o.key_start(b));
  for (Index b = 0; b < o.key_length.size(0); ++b) options.key_length.push_back(o.key_length(b));
  return options;
}

// The float64 reference's out and lse for `p` on `in`.
inline Outputs reference_outputs(const Problem& p, const Inputs& in, const AttentionOptions& o) {
  const reference::AttentionShape shape{p.batch, p.heads_q, p.heads_kv, p.len_q,
                                        p.len_k, p.dim,     p.dim_v};
  Outputs result;
  reference::attention_reference(shape, in.q, in.k, in.v, reference_options(o), result.out,
                                 result.lse, in.bias, p.has_bias() ? p.bias_batch : 1,
                                 p.has_bias() ? p.bias_heads : 1);
  return result;
}

// Where each tensor of a call lives in memory (an operator without some of them ignores those).
struct Layouts {
  Layout q = Layout::kContiguous, k = Layout::kContiguous, v = Layout::kContiguous;
  Layout out = Layout::kContiguous, lse = Layout::kContiguous, bias = Layout::kContiguous;
  static Layouts all(Layout layout) { return {layout, layout, layout, layout, layout, layout}; }
};

// foveal::attention as an entry point of run_entry, which calls
// entry(q, k, v, out, options, lse, bias) with an empty lse or bias view when there is none.
struct DenseAttention {
  template <typename T>
  void operator()(const TensorView<const T, 4>& q, const TensorView<const T, 4>& k,
                  const TensorView<const T, 4>& v, const TensorView<T, 4>& out,
                  const AttentionOptions& options, const TensorView<T, 3>& lse,
                  const TensorView<const T, 4>& bias) const {
    attention(q, k, v, out, options, lse, bias);
  }
};

// Runs `entry` on T copies of the inputs placed as `layouts` (padding holds NaN) and returns out
// and, when `with_lse`, lse. Fails the test if anything outside out or lse changed.
template <typename T, typename Entry>
Outputs run_entry(const Entry& entry, const Problem& p, const Inputs& in, const AttentionOptions& o,
                  const Layouts& layouts = {}, bool with_lse = true) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> q(in.q, p.q_shape(), layouts.q, nan);
  const StridedBuffer<T, 4> k(in.k, p.k_shape(), layouts.k, nan);
  const StridedBuffer<T, 4> v(in.v, p.v_shape(), layouts.v, nan);
  const StridedBuffer<T, 4> bias(in.bias, p.has_bias() ? p.bias_shape() : Shape<4>{}, layouts.bias,
                                 nan);
  const StridedBuffer<T, 4> out(p.out_shape(), layouts.out, nan);
  const StridedBuffer<T, 3> lse(p.lse_shape(), layouts.lse, nan);
  entry(q.const_view(), k.const_view(), v.const_view(), out.view(), o,
        with_lse ? lse.view() : TensorView<T, 3>(),
        p.has_bias() ? bias.const_view() : TensorView<const T, 4>());
  EXPECT_TRUE(out.outside_untouched()) << "wrote outside out";
  EXPECT_TRUE(lse.outside_untouched()) << "wrote outside lse";
  Outputs result;
  result.out = gather(out.view());
  if (with_lse) result.lse = gather(lse.view());
  return result;
}

// run_entry with foveal::attention.
template <typename T>
Outputs run_attention(const Problem& p, const Inputs& in, const AttentionOptions& o,
                      const Layouts& layouts = {}, bool with_lse = true) {
  return run_entry<T>(DenseAttention{}, p, in, o, layouts, with_lse);
}

// `entry` on T agrees with the float64 reference on out and lse for the inputs of `p`.
template <typename T, typename Entry>
void expect_matches_reference(const Entry& entry, const Problem& p, const AttentionOptions& o) {
  SCOPED_TRACE(describe(problem_string(p), "\n  ", options_string(o)));
  const Inputs in = random_inputs(p);
  const Outputs want = reference_outputs(p, in, o);
  const Outputs got = run_entry<T>(entry, p, in, o);
  EXPECT_TRUE(matches_reference(got.out, want.out, kTolerance<T>)) << "out";
  EXPECT_TRUE(matches_reference(got.lse, want.lse, kTolerance<T>)) << "lse";
}

// foveal::attention<T> agrees with the float64 reference on out and lse.
template <typename T>
void expect_matches_reference(const Problem& p, const AttentionOptions& o) {
  expect_matches_reference<T>(DenseAttention{}, p, o);
}

// `got` and `want` hold the same bits in out and lse.
inline void expect_identical(const Outputs& got, const Outputs& want) {
  EXPECT_TRUE(bitwise_equal(got.out, want.out)) << "out";
  EXPECT_TRUE(bitwise_equal(got.lse, want.lse)) << "lse";
}

// ---------------------------------------------------------------------------------------------
// Rejected calls.

// What outputs hold before a call that must be rejected, so that a write shows.
inline constexpr double kSentinel = 12345.0;

// True when every element of `storage` still holds kSentinel.
template <typename T>
bool holds_sentinel(const std::vector<T>& storage) {
  for (T value : storage)
    if (value != T(kSentinel)) return false;
  return true;
}

// ---------------------------------------------------------------------------------------------
// Callers that run attention from threads of their own.

#ifdef _OPENMP
// Makes 16 calls of call(out), out of `out_shape`, from inside an OpenMP parallel region of 4
// threads (a caller running one attention per thread of its own) and exits with the number of
// calls whose out differs from the same call made outside any parallel region (0: all equal).
template <typename T, typename Call>
[[noreturn]] void exit_with_calls_differing_inside_a_parallel_region(const Shape<4>& out_shape,
                                                                     const Call& call) {
  Tensor<T, 4> alone(out_shape);
  call(alone.view());
  constexpr int kCalls = 16;
  int differing = 0;
#pragma omp parallel for num_threads(4) reduction(+ : differing)
  for (int index = 0; index < kCalls; ++index) {
    Tensor<T, 4> out(out_shape);
    call(out.view());
    differing += std::memcmp(out.data(), alone.data(), sizeof(T) * out.numel()) != 0;
  }
  std::fprintf(stderr, "%d of %d calls differ\n", differing, kCalls);
  std::exit(differing);
}

// exit_with_differing_calls(num_threads), which must end in
// exit_with_calls_differing_inside_a_parallel_region, finds no differing call for num_threads
// 1 and 0 (the global setting). Each runs in a child process: a broken per-thread scratch
// crashes rather than fails.
template <typename ExitWithDifferingCalls>
void expect_parallel_region_calls_give_serial_bits(
    const ExitWithDifferingCalls& exit_with_differing_calls) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  for (int threads : {1, 0}) {
    SCOPED_TRACE(describe("num_threads=", threads));
    EXPECT_EXIT(exit_with_differing_calls(threads), ::testing::ExitedWithCode(0),
                "0 of 16 calls differ");
  }
}
#endif

}  // namespace foveal::test
