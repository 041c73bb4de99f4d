// tests/cpp/test_merge.cpp — foveal::merge_states against the float64 formulas, and the property
// that makes it useful: attention over pieces of the keys, merged, is attention over all keys.
//
// out_a, out_b: [B, H, L, Dv]  lse_a, lse_b: [B, H, L]  ->  out: [B, H, L, Dv], lse (optional)
// m = max(lse_a, lse_b), w = e^(lse - m), out = (w_a out_a + w_b out_b) / (w_a + w_b),
// lse = m + log(w_a + w_b); two -inf states give out = 0, lse = -inf. Every test runs for
// float and double; every case prints its seed and shapes on failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "attention_cases.hpp"
#include "foveal/attention/dense.hpp"
#include "foveal/attention/merge.hpp"
#include "harness.hpp"
#include "reference/decode_reference.hpp"

namespace foveal::test {
namespace {

// Tolerance of one merge against the formulas, on the normalized error (harness.hpp): each
// output is two products, a sum and a scaling by the normalized weights, each weight one exp
// and one division, so a correct merge is within a few ulps of the largest input; 8 ulps
// (float eps 1.2e-7, double eps 2.2e-16) leaves margin while a wrong weight misses by far.
template <typename T>
constexpr double kMergeTolerance = std::is_same_v<T, float> ? 1e-6 : 2e-15;

// Merged attention pieces are held to kTolerance against the float64 reference over all keys:
// the engine's few hundred ulps for these sizes; the up to four merges add a few ulps each.

// ---------------------------------------------------------------------------------------------
// Two random states and the call under test.

struct MergeShape {
  Index batch = 1, heads = 1, len = 1, dim_v = 1;
  Shape<4> out_shape() const { return {batch, heads, len, dim_v}; }
  Shape<3> lse_shape() const { return {batch, heads, len}; }
};

std::string shape_string(const MergeShape& s) {
  return test::describe("out=", test::shape_string(s.out_shape()));
}

// An attention state: out and lse, as attention returns them.
using State = Outputs;

// out ~ N(0, 1); lse uniform in [-8, 8], -inf with probability `empty_share`, and now and then
// far from every other (weights that underflow to 0). Rounded to float.
State random_state(const MergeShape& s, test::RandomSource& random, double empty_share) {
  State state;
  state.out = test::round_to<float>(random.normal(test::shape_numel<4>(s.out_shape())));
  state.lse = test::round_to<float>(random.uniform(test::shape_numel<3>(s.lse_shape()), -8, 8));
  for (double& value : state.lse) {
    if (random.chance(empty_share)) value = -kInfinity;
    if (random.chance(0.05)) value = random.pick({-150.0, 150.0});
  }
  return state;
}

// The formulas in float64.
State reference_merge(const MergeShape& s, const State& a, const State& b) {
  State merged;
  reference::merge_reference(s.dim_v, a.out, a.lse, b.out, b.lse, merged.out, merged.lse);
  return merged;
}

struct MergeLayouts {
  Layout out_a = Layout::kContiguous, lse_a = Layout::kContiguous;
  Layout out_b = Layout::kContiguous, lse_b = Layout::kContiguous;
  Layout out = Layout::kContiguous, lse = Layout::kContiguous;
  static MergeLayouts all(Layout layout) {
    return {layout, layout, layout, layout, layout, layout};
  }
};

// Where the result goes.
enum class Destination {
  kSeparate,  // out and lse of their own
  kIntoA,     // out = out_a, lse = lse_a (the same views)
  kIntoB,     // out = out_b, lse = lse_b
  kCrossed,   // out = out_a, lse = lse_b
};

// Runs merge_states<T> on T copies of a and b placed as `layouts` (padding holds NaN), writing
// to `destination`; returns out and, when `with_lse`, lse. Fails the test if anything outside
// the views changed.
template <typename T>
State run_merge(const MergeShape& s, const State& a, const State& b, int num_threads = 0,
                Destination destination = Destination::kSeparate, const MergeLayouts& layouts = {},
                bool with_lse = true) {
  const T nan = std::numeric_limits<T>::quiet_NaN();
  const StridedBuffer<T, 4> out_a(a.out, s.out_shape(), layouts.out_a, nan);
  const StridedBuffer<T, 3> lse_a(a.lse, s.lse_shape(), layouts.lse_a, nan);
  const StridedBuffer<T, 4> out_b(b.out, s.out_shape(), layouts.out_b, nan);
  const StridedBuffer<T, 3> lse_b(b.lse, s.lse_shape(), layouts.lse_b, nan);
  const StridedBuffer<T, 4> out(s.out_shape(), layouts.out, nan);
  const StridedBuffer<T, 3> lse(s.lse_shape(), layouts.lse, nan);
  TensorView<T, 4> out_view = out.view();
  TensorView<T, 3> lse_view = lse.view();
  if (destination == Destination::kIntoA) {
    out_view = out_a.view();
    lse_view = lse_a.view();
  } else if (destination == Destination::kIntoB) {
    out_view = out_b.view();
    lse_view = lse_b.view();
  } else if (destination == Destination::kCrossed) {
    out_view = out_a.view();
    lse_view = lse_b.view();
  }
  merge_states(out_a.const_view(), lse_a.const_view(), out_b.const_view(), lse_b.const_view(),
               out_view, with_lse ? lse_view : TensorView<T, 3>(), num_threads);
  for (const auto* buffer : {&out_a, &out_b, &out})
    EXPECT_TRUE(buffer->outside_untouched()) << "merge_states wrote outside a view";
  for (const auto* buffer : {&lse_a, &lse_b, &lse})
    EXPECT_TRUE(buffer->outside_untouched()) << "merge_states wrote outside a view";
  State merged;
  merged.out = test::gather(out_view);
  if (with_lse) merged.lse = test::gather(lse_view);
  return merged;
}

// Shapes with 1, primes and non-multiples of the 64-row tasks and of the vector width.
MergeShape random_shape(test::RandomSource& random) {
  MergeShape s;
  s.batch = random.integer(1, 3);
  s.heads = random.integer(1, 4);
  s.len = random.pick({Index{1}, Index{7}, Index{64}, Index{65}, Index{130}});
  s.dim_v = random.pick({Index{1}, Index{3}, Index{16}, Index{31}, Index{80}});
  return s;
}

template <typename T>
class MergeStates : public ::testing::Test {};

TYPED_TEST_SUITE(MergeStates, ElementTypes, ElementTypeNames);

// ---------------------------------------------------------------------------------------------
// The formulas.

TYPED_TEST(MergeStates, MatchesTheFormulas) {
  for (std::uint64_t seed = 100; seed < 130; ++seed) {
    test::RandomSource random(seed);
    const MergeShape s = random_shape(random);
    SCOPED_TRACE(test::describe("seed=", seed, " ", shape_string(s)));
    const State a = random_state(s, random, 0.15);
    const State b = random_state(s, random, 0.15);
    const State want = reference_merge(s, a, b);
    const State got = run_merge<TypeParam>(s, a, b);
    EXPECT_TRUE(test::matches_reference(got.out, want.out, kMergeTolerance<TypeParam>)) << "out";
    EXPECT_TRUE(test::matches_reference(got.lse, want.lse, kMergeTolerance<TypeParam>)) << "lse";
  }
}

TYPED_TEST(MergeStates, EmptyStatesHaveNoWeight) {
  // A -inf state contributes nothing: merged with a state that has keys, the result is that
  // state exactly; two of them give out = 0, lse = -inf.
  test::RandomSource random(200);
  const MergeShape s{2, 3, 65, 19};
  const State full = random_state(s, random, 0);
  State empty = random_state(s, random, 0);
  std::fill(empty.lse.begin(), empty.lse.end(), -kInfinity);
  expect_identical(run_merge<TypeParam>(s, full, empty), full);
  expect_identical(run_merge<TypeParam>(s, empty, full), full);
  const State none = run_merge<TypeParam>(s, empty, empty);
  for (double value : none.out) ASSERT_EQ(value, 0.0);
  for (double value : none.lse) ASSERT_EQ(value, -kInfinity);
  // Row by row: empty on the left, on the right, on both sides or on neither.
  State a = random_state(s, random, 0), b = random_state(s, random, 0);
  for (std::size_t row = 0; row < a.lse.size(); ++row) {
    if (row % 4 == 1 || row % 4 == 3) a.lse[row] = -kInfinity;
    if (row % 4 == 2 || row % 4 == 3) b.lse[row] = -kInfinity;
  }
  const State got = run_merge<TypeParam>(s, a, b);
  const State want = reference_merge(s, a, b);
  EXPECT_TRUE(test::matches_reference(got.out, want.out, kMergeTolerance<TypeParam>));
  for (std::size_t row = 0; row < a.lse.size(); ++row) {
    // Rows 1 and 2 (mod 4) are the non-empty side exactly; row 3 is empty.
    const State* only = row % 4 == 1 ? &b : row % 4 == 2 ? &a : nullptr;
    const double want_lse = row % 4 == 3 ? -kInfinity : only != nullptr ? only->lse[row] : 0;
    if (row % 4 == 0) continue;
    EXPECT_EQ(got.lse[row], want_lse) << "row " << row;
    for (Index d = 0; d < s.dim_v; ++d) {
      const std::size_t at = row * static_cast<std::size_t>(s.dim_v) + static_cast<std::size_t>(d);
      ASSERT_EQ(got.out[at], only != nullptr ? only->out[at] : 0.0) << "row " << row;
    }
  }
}

TYPED_TEST(MergeStates, MergingAStateWithItselfKeepsOutAndAddsLogTwo) {
  test::RandomSource random(300);
  const MergeShape s{1, 4, 130, 31};
  const State a = random_state(s, random, 0);  // every row has keys
  const State got = run_merge<TypeParam>(s, a, a);
  EXPECT_TRUE(test::bitwise_equal(got.out, a.out)) << "equal weights of one half: out exact";
  std::vector<double> want_lse = a.lse;
  for (double& value : want_lse) value += std::log(2.0);
  EXPECT_TRUE(test::matches_reference(got.lse, want_lse, kMergeTolerance<TypeParam>));
}

// ---------------------------------------------------------------------------------------------
// The property: attention over key pieces, merged, is attention over all keys.

// The shape of the states of attention on `p`.
MergeShape state_shape(const Problem& p) { return {p.batch, p.heads_q, p.len_q, p.dim_v}; }

// The options that make attention over the keys [begin, end) — given as their own K/V, key j
// being key begin + j of the whole — see what `whole` sees of them, for queries from position
// whole.q_offset, which must be >= begin (q_offset may not be negative, -1 being the
// bottom-right default): query 0 sits at whole.q_offset - begin in the piece's coordinates
// (past the piece's last key when the piece precedes the queries), and the sinks are the first
// whole.sink_tokens - begin keys of the piece.
AttentionOptions piece_options(const AttentionOptions& whole, Index begin) {
  AttentionOptions piece = whole;
  piece.q_offset = whole.q_offset - begin;
  piece.sink_tokens = std::max<Index>(0, whole.sink_tokens - begin);
  return piece;
}

// attention<T>(q, k[:, :, begin:end], v[:, :, begin:end]) with `options`: the state of a piece.
template <typename T>
State attention_state(const Problem& p, const std::vector<T>& q, const std::vector<T>& k,
                      const std::vector<T>& v, Index begin, Index end,
                      const AttentionOptions& options) {
  const TensorView<const T, 4> q_view(q.data(), p.q_shape());
  const TensorView<const T, 4> k_whole(k.data(), p.k_shape());
  const TensorView<const T, 4> v_whole(v.data(), p.v_shape());
  const TensorView<const T, 4> k_piece(k.data() + begin * k_whole.stride(2),
                                       {p.batch, p.heads_kv, end - begin, p.dim},
                                       k_whole.strides());
  const TensorView<const T, 4> v_piece(v.data() + begin * v_whole.stride(2),
                                       {p.batch, p.heads_kv, end - begin, p.dim_v},
                                       v_whole.strides());
  Tensor<T, 4> out(state_shape(p).out_shape());
  Tensor<T, 3> lse(state_shape(p).lse_shape());
  attention(q_view, k_piece, v_piece, out.view(), options, lse.view());
  return State{test::gather(out.view()), test::gather(lse.view())};
}

TYPED_TEST(MergeStates, MergedKeyPiecesEqualAttentionOverAllKeys) {
  using T = TypeParam;
  Index empty_piece_rows = 0;  // rows some piece gave no key: the merges saw -inf states
  for (std::uint64_t seed = 400; seed < 440; ++seed) {
    test::RandomSource random(seed);
    Problem p;
    do {  // a reference of at most 2e6 multiply-adds
      p.seed = seed;
      p.batch = random.integer(1, 2);
      p.heads_kv = random.integer(1, 2);
      p.heads_q = p.heads_kv * random.pick({Index{1}, Index{2}, Index{3}, Index{4}});
      p.len_q = random.pick({Index{1}, Index{7}, Index{64}, Index{65}, Index{130}});
      p.len_k = random.pick({Index{2}, Index{13}, Index{129}, Index{200}, Index{300}});
      p.dim = random.pick({Index{1}, Index{3}, Index{16}, Index{31}});
      p.dim_v = random.pick({Index{1}, Index{5}, Index{16}, Index{33}});
    } while (p.work() > 2e6);
    AttentionOptions whole;
    whole.causal = random.chance(0.6);
    whole.window_left = random.pick({Index{-1}, Index{-1}, Index{0}, Index{9}, Index{70}});
    if (!whole.causal) whole.window_right = random.pick({Index{-1}, Index{0}, Index{4}});
    whole.sink_tokens = random.pick({Index{0}, Index{0}, Index{3}});
    whole.softcap = random.pick({0.0f, 0.0f, 4.0f});
    whole.q_offset =
        random.chance(0.5) && p.len_q <= p.len_k ? p.len_k - p.len_q : random.integer(0, p.len_k);
    // 2 to 5 pieces, cut anywhere from key 0 to query 0's position (empty pieces included).
    std::vector<Index> cuts = {0};
    const Index pieces = random.integer(2, 5);
    for (Index i = 1; i < pieces; ++i) cuts.push_back(random.integer(0, whole.q_offset));
    std::sort(cuts.begin(), cuts.end());
    cuts.push_back(p.len_k);
    SCOPED_TRACE(test::describe(problem_string(p), "\n  ", options_string(whole)));

    const std::vector<double> q =
        test::round_to<float>(random.normal(test::shape_numel<4>(p.q_shape())));
    const std::vector<double> k =
        test::round_to<float>(random.normal(test::shape_numel<4>(p.k_shape())));
    const std::vector<double> v =
        test::round_to<float>(random.normal(test::shape_numel<4>(p.v_shape())));
    const std::vector<T> q_t(q.begin(), q.end()), k_t(k.begin(), k.end()), v_t(v.begin(), v.end());

    // Merge the pieces one by one, in place into the running state or into a new one.
    const MergeShape s = state_shape(p);
    State merged;
    for (std::size_t i = 0; i + 1 < cuts.size(); ++i) {
      SCOPED_TRACE(test::describe("piece [", cuts[i], ", ", cuts[i + 1], ")"));
      const State piece =
          attention_state<T>(p, q_t, k_t, v_t, cuts[i], cuts[i + 1], piece_options(whole, cuts[i]));
      for (double value : piece.lse) empty_piece_rows += value == -kInfinity;
      if (i == 0) {
        merged = piece;
        continue;
      }
      switch (random.integer(0, 2)) {
        case 0:
          merged = run_merge<T>(s, merged, piece, 0, Destination::kIntoA);
          break;
        case 1:
          merged = run_merge<T>(s, piece, merged, 0, Destination::kIntoB);
          break;
        default:
          merged = run_merge<T>(s, merged, piece);
      }
    }

    const State want = reference_outputs(p, Inputs{q, k, v, {}}, whole);
    EXPECT_TRUE(test::matches_reference(merged.out, want.out, kTolerance<T>)) << "out";
    EXPECT_TRUE(test::matches_reference(merged.lse, want.lse, kTolerance<T>)) << "lse";
    const State at_once = attention_state<T>(p, q_t, k_t, v_t, 0, p.len_k, whole);
    EXPECT_TRUE(test::matches_reference(merged.out, at_once.out, kTolerance<T>))
        << "out against one attention call";
    EXPECT_TRUE(test::matches_reference(merged.lse, at_once.lse, kTolerance<T>))
        << "lse against one attention call";
  }
  EXPECT_GT(empty_piece_rows, 0) << "no piece was fully masked for any row";
}

// ---------------------------------------------------------------------------------------------
// The same bits in place, without lse, on any thread count and for any layout.

TYPED_TEST(MergeStates, InPlaceGivesTheBitsOfOutOfPlace) {
  for (std::uint64_t seed = 500; seed < 510; ++seed) {
    test::RandomSource random(seed);
    const MergeShape s = random_shape(random);
    SCOPED_TRACE(test::describe("seed=", seed, " ", shape_string(s)));
    const State a = random_state(s, random, 0.1);
    const State b = random_state(s, random, 0.1);
    const State separate = run_merge<TypeParam>(s, a, b);
    expect_identical(run_merge<TypeParam>(s, a, b, 0, Destination::kIntoA), separate);
    expect_identical(run_merge<TypeParam>(s, a, b, 0, Destination::kIntoB), separate);
    expect_identical(run_merge<TypeParam>(s, a, b, 0, Destination::kCrossed), separate);
    expect_identical(
        run_merge<TypeParam>(s, a, b, 0, Destination::kIntoA, MergeLayouts::all(Layout::kPadded)),
        separate);
  }
}

TYPED_TEST(MergeStates, LseOutputIsOptional) {
  test::RandomSource random(600);
  const MergeShape s{2, 3, 65, 17};
  const State a = random_state(s, random, 0.1);
  const State b = random_state(s, random, 0.1);
  const State with_lse = run_merge<TypeParam>(s, a, b);
  for (Destination destination : {Destination::kSeparate, Destination::kIntoA}) {
    const State without_lse = run_merge<TypeParam>(s, a, b, 0, destination, {}, false);
    EXPECT_TRUE(test::bitwise_equal(without_lse.out, with_lse.out));
  }
}

TYPED_TEST(MergeStates, IdenticalBitsForAnyThreadCount) {
  const test::DefaultThreadsOnExit restore_default;
  test::RandomSource random(700);
  const MergeShape s{3, 4, 65, 33};  // 780 rows: 13 tasks of 64
  const State a = random_state(s, random, 0.1);
  const State b = random_state(s, random, 0.1);
  const State single = run_merge<TypeParam>(s, a, b, 1);
  for (int threads : {2, 3, 5, 0}) {
    SCOPED_TRACE(test::describe("num_threads=", threads));
    expect_identical(run_merge<TypeParam>(s, a, b, threads), single);
  }
  set_num_threads(3);
  expect_identical(run_merge<TypeParam>(s, a, b, 0), single);
}

TYPED_TEST(MergeStates, StridedViewsGiveIdenticalBits) {
  test::RandomSource random(800);
  const MergeShape s{2, 3, 70, 19};
  const State a = random_state(s, random, 0.1);
  const State b = random_state(s, random, 0.1);
  const State contiguous = run_merge<TypeParam>(s, a, b);
  MergeLayouts mixed;
  mixed.out_a = Layout::kSwapped12;
  mixed.lse_a = Layout::kReversed;
  mixed.out_b = Layout::kPadded;
  mixed.lse_b = Layout::kSwapped12;
  mixed.out = Layout::kReversed;
  mixed.lse = Layout::kPadded;
  for (const MergeLayouts& layouts :
       {MergeLayouts::all(Layout::kSwapped12), MergeLayouts::all(Layout::kPadded),
        MergeLayouts::all(Layout::kReversed), mixed}) {
    SCOPED_TRACE(test::describe("out_a layout: ", test::layout_name(layouts.out_a)));
    expect_identical(run_merge<TypeParam>(s, a, b, 0, Destination::kSeparate, layouts), contiguous);
  }
  const MergeShape ones{1, 1, 1, 9};
  const State a1 = random_state(ones, random, 0), b1 = random_state(ones, random, 0);
  expect_identical(run_merge<TypeParam>(ones, a1, b1, 0, Destination::kSeparate,
                                        MergeLayouts::all(Layout::kOddUnitStrides)),
                   run_merge<TypeParam>(ones, a1, b1));
}

TYPED_TEST(MergeStates, EmptyStatesAreAccepted) {
  using T = TypeParam;
  for (const MergeShape& s :
       {MergeShape{0, 3, 5, 4}, MergeShape{2, 3, 0, 4}, MergeShape{2, 3, 5, 0}}) {
    SCOPED_TRACE(shape_string(s));
    test::RandomSource random(900);
    const State a = random_state(s, random, 0.1), b = random_state(s, random, 0.1);
    const State got = run_merge<T>(s, a, b);
    EXPECT_EQ(got.out.size(), a.out.size());
  }
}

// ---------------------------------------------------------------------------------------------
// Rejected input: a foveal::Error naming what was wrong, thrown before anything is written.

// B = 2, H = 3, L = 5, Dv = 4: every extent distinct where the messages must tell them apart.
constexpr Index kBatch = 2, kHeads = 3, kLen = 5, kDimV = 4;

template <typename T>
class MergeErrors : public ::testing::Test {
 protected:
  // Buffers are twice the size the valid shapes need, so larger shapes and shifted views stay
  // inside them. The inputs are valid states (out 0.5, lse 1), the outputs hold a sentinel.
  MergeErrors()
      : out_a_storage_(2 * kBatch * kHeads * kLen * kDimV, T(0.5)),
        out_b_storage_(2 * kBatch * kHeads * kLen * kDimV, T(0.5)),
        lse_a_storage_(2 * kBatch * kHeads * kLen, T(1)),
        lse_b_storage_(2 * kBatch * kHeads * kLen, T(1)),
        out_storage_(2 * kBatch * kHeads * kLen * kDimV, T(kSentinel)),
        lse_storage_(2 * kBatch * kHeads * kLen, T(kSentinel)) {
    out_a = out_view(out_a_storage_);
    out_b = out_view(out_b_storage_);
    lse_a = lse_view(lse_a_storage_);
    lse_b = lse_view(lse_b_storage_);
    out = out_view(out_storage_);
    lse = lse_view(lse_storage_);
  }

  static TensorView<T, 4> out_view(std::vector<T>& storage, Index offset = 0,
                                   const Shape<4>& shape = {kBatch, kHeads, kLen, kDimV}) {
    return TensorView<T, 4>(storage.data() + offset, shape);
  }
  static TensorView<T, 3> lse_view(std::vector<T>& storage, Index offset = 0,
                                   const Shape<3>& shape = {kBatch, kHeads, kLen}) {
    return TensorView<T, 3>(storage.data() + offset, shape);
  }

  void call() const { merge_states(out_a, lse_a, out_b, lse_b, out, lse, num_threads); }

  // call() throws foveal::Error naming every piece, and no output or input memory changed.
  void expect_rejected(std::initializer_list<std::string> pieces) {
    const std::vector<T> out_a_before = out_a_storage_, lse_a_before = lse_a_storage_;
    EXPECT_TRUE(test::throws_error_with([&] { call(); }, pieces));
    EXPECT_TRUE(holds_sentinel(out_storage_)) << "out was written before the error";
    EXPECT_TRUE(holds_sentinel(lse_storage_)) << "lse was written before the error";
    EXPECT_TRUE(same_bits(out_a_storage_, out_a_before)) << "out_a's memory was written";
    EXPECT_TRUE(same_bits(lse_a_storage_, lse_a_before)) << "lse_a's memory was written";
  }

  static bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
  }

  std::vector<T> out_a_storage_, out_b_storage_, lse_a_storage_, lse_b_storage_, out_storage_,
      lse_storage_;
  TensorView<T, 4> out_a, out_b, out;
  TensorView<T, 3> lse_a, lse_b, lse;
  int num_threads = 0;
};

TYPED_TEST_SUITE(MergeErrors, ElementTypes, ElementTypeNames);

TYPED_TEST(MergeErrors, ValidCallIsAccepted) {
  EXPECT_NO_THROW(this->call());
  EXPECT_FALSE(holds_sentinel(this->out_storage_));
}

TYPED_TEST(MergeErrors, StateShapesMustMatch) {
  this->out_b = this->out_view(this->out_b_storage_, 0, {kBatch, kHeads, kLen - 1, kDimV});
  this->expect_rejected(
      {"foveal: merge_states: ", "out_b.shape[2] must equal out_a.shape[2] (L) = 5, got 4"});
  this->out_b = this->out_view(this->out_b_storage_, 0, {kBatch, kHeads, kLen, kDimV + 1});
  this->expect_rejected(
      {"merge_states: ", "out_b.shape[3] must equal out_a.shape[3] (Dv) = 4", "got 5"});
  this->out_b = this->out_view(this->out_b_storage_);
  this->lse_a = this->lse_view(this->lse_a_storage_, 0, {1, kHeads, kLen});
  this->expect_rejected(
      {"merge_states: ", "lse_a.shape[0] must equal out_a.shape[0] (B) = 2", "got 1"});
  this->lse_a = this->lse_view(this->lse_a_storage_);
  this->lse_b = this->lse_view(this->lse_b_storage_, 0, {kBatch, kHeads + 1, kLen});
  this->expect_rejected(
      {"merge_states: ", "lse_b.shape[1] must equal out_a.shape[1] (H) = 3", "got 4"});
}

TYPED_TEST(MergeErrors, OutputShapesMustMatch) {
  this->out = this->out_view(this->out_storage_, 0, {kBatch, 1, kLen, kDimV});
  this->expect_rejected(
      {"foveal: merge_states: ", "out.shape[1] must equal out_a.shape[1] (H) = 3, got 1"});
  this->out = this->out_view(this->out_storage_);
  this->lse = this->lse_view(this->lse_storage_, 0, {kBatch, kHeads, kLen + 2});
  this->expect_rejected(
      {"merge_states: ", "lse.shape[2] must equal out_a.shape[2] (L) = 5, got 7"});
}

// (A NaN lse is a state that met a NaN: it merges into a NaN row, test_hardening.cpp.)
TYPED_TEST(MergeErrors, PositiveInfiniteLseIsRejectedWithItsIndex) {
  this->lse_b_storage_[(0 * kHeads + 1) * kLen + 4] = std::numeric_limits<TypeParam>::infinity();
  this->expect_rejected({"foveal: merge_states: lse_b[0, 1, 4] = inf",
                         "a log-sum-exp must be finite, -inf (a state without keys) or NaN"});
}

TYPED_TEST(MergeErrors, PartialOverlapWithAnInputIsRejectedButTheSameViewIsAccepted) {
  // out one row further into out_a's memory than out_a itself.
  this->out = this->out_view(this->out_a_storage_, kDimV);
  this->expect_rejected({"foveal: merge_states: out must not overlap out_a in memory"});
  this->out = this->out_view(this->out_b_storage_, kDimV);
  this->expect_rejected({"merge_states: out must not overlap out_b in memory"});
  this->out = this->out_view(this->out_storage_);
  this->lse = this->lse_view(this->lse_a_storage_, 1);
  this->expect_rejected({"merge_states: lse must not overlap lse_a in memory"});
  this->lse = this->lse_view(this->lse_storage_);
  this->out = this->out_view(this->lse_a_storage_, 0, {1, 1, 2, kDimV});
  this->out_a = this->out_view(this->out_a_storage_, 0, {1, 1, 2, kDimV});
  this->out_b = this->out_view(this->out_b_storage_, 0, {1, 1, 2, kDimV});
  this->lse_a = this->lse_view(this->lse_a_storage_, 0, {1, 1, 2});
  this->lse_b = this->lse_view(this->lse_b_storage_, 0, {1, 1, 2});
  this->lse = this->lse_view(this->lse_storage_, 0, {1, 1, 2});
  this->expect_rejected({"merge_states: out must not overlap lse_a in memory"});
  // The very same views: in place.
  this->out = this->out_a;
  this->lse = this->lse_a;
  EXPECT_NO_THROW(this->call());
}

TYPED_TEST(MergeErrors, NonUnitInnerStrideIsRejected) {
  Shape<4> strides = this->out_b.strides();
  strides[3] = 2;
  this->out_b = TensorView<TypeParam, 4>(this->out_b_storage_.data(), this->out_b.shape(), strides);
  this->expect_rejected(
      {"merge_states: out_b must have stride 1 in its last dimension", "got stride 2"});
}

TYPED_TEST(MergeErrors, NegativeThreadCountIsRejected) {
  this->num_threads = -1;
  this->expect_rejected(
      {"foveal: merge_states: num_threads must be in [0, 1024] (0 = the global setting), got -1"});
}

}  // namespace
}  // namespace foveal::test
